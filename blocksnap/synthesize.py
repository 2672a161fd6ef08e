"""Synthetic fulls: a new base snapshot made from what the repository already holds.

A snapshot's block map is complete by itself, so a synthetic full shares its source
snapshot's map outright: no source is read and no block is copied.  What it adds is a
check (every block the map names is present in the index with an intact entry) and a
record of kind synthetic-full, which differentials then use as their base.  Its commit
counts one more reference to the shared map's root, so the synthetic full holds the map's
blocks by itself and stays restorable after every older snapshot is pruned.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping

from blocksnap.blockmap import LEAF_SPAN, ZERO_ID, BlockMap
from blocksnap.errors import IntegrityError
from blocksnap.model import (
    BLOCK_ID_SIZE,
    Progress,
    ProgressCallback,
    SnapshotCounts,
    SnapshotInfo,
    SnapshotKind,
)
from blocksnap.snapshot import check_labels
from blocksnap.store.repository import Store


def synthesize(
    store: Store,
    volume: str,
    snapshot: str = "latest",
    *,
    labels: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
) -> SnapshotInfo:
    """Make a synthetic full of one of the volume's snapshots and commit it."""
    checked_labels = check_labels(labels)
    report = progress or (lambda _p: None)
    with store.lock_volume(volume), store.writer() as writer:
        # Registered first: the source's map and blocks then outlive a concurrent prune.
        source = store.resolve(volume, snapshot)
        clock = time.perf_counter()
        block_map = BlockMap(
            store.read_node, source.map_root, source.map_height, source.block_count
        )
        zero = 0
        leaves = block_map.leaf_count()
        for leaf in range(leaves):
            _, ids = block_map.leaf(leaf)
            wanted = []
            for i in range(0, len(ids), BLOCK_ID_SIZE):
                block_id = ids[i : i + BLOCK_ID_SIZE]
                if block_id == ZERO_ID:
                    zero += 1
                else:
                    wanted.append(block_id)
            for block_id, present in zip(wanted, store.index.present(wanted), strict=True):
                if not present:
                    raise IntegrityError(
                        f"snapshot {source.id} refers to block {block_id.hex()}, which is missing "
                        f"from the index or damaged there; no synthetic full was made "
                        f"(run verify)"
                    )
            done = min((leaf + 1) * LEAF_SPAN * source.block_size, source.image_size)
            report(Progress("checking", done, source.image_size))
        info = SnapshotInfo(
            id=secrets.token_hex(16),
            volume=volume,
            time=source.time,  # the moment the data is from, not when it was synthesized
            kind=SnapshotKind.SYNTHETIC,
            parent=source.id,
            image_size=source.image_size,
            block_size=source.block_size,
            counts=SnapshotCounts(zero=zero),
            stored_size=0,
            metadata_size=0,
            duration=time.perf_counter() - clock,
            labels=checked_labels,
            map_root=source.map_root,
            map_height=source.map_height,
        )
        store.commit_snapshot(info, writer)
        return info
