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
from collections.abc import Callable

from blocksnap.blockmap import LEAF_SPAN, BlockMap
from blocksnap.errors import IntegrityError
from blocksnap.model import (
    BlockSource,
    Progress,
    ProgressCallback,
    ProgressUnit,
    SnapshotCounts,
    SnapshotInfo,
    SnapshotKind,
)

# A run of 32-byte block IDs -> (the first without an intact index entry or None, the
# number of all-zero IDs): the store index's first_missing.
FirstMissing = Callable[[bytes], tuple[bytes | None, int]]


def synthesize(
    source: SnapshotInfo,
    blocks: BlockSource,
    first_missing: FirstMissing,
    *,
    labels: dict[str, str],
    progress: ProgressCallback | None = None,
) -> SnapshotInfo:
    """The record of a synthetic full of `source`, once every block its map names is
    present; the caller holds the volume's lock and a writer registered before `source`
    was resolved (so its map and blocks outlive a concurrent prune), and commits it."""
    report = progress or (lambda _p: None)
    clock = time.perf_counter()
    block_map = BlockMap(blocks.read_node, source.map_root, source.map_height, source.block_count)
    zero = 0
    leaves = block_map.leaf_count()
    for leaf in range(leaves):
        _, ids = block_map.leaf(leaf)
        missing, zeros = first_missing(ids)
        if missing is not None:
            raise IntegrityError(
                f"snapshot {source.id} refers to block {missing.hex()}, which is missing "
                "from the index or damaged there; no synthetic full was made (run verify)"
            )
        zero += zeros
        done = min((leaf + 1) * LEAF_SPAN * source.block_size, source.image_size)
        report(Progress("checking", done, source.image_size, ProgressUnit.BYTES))
    return SnapshotInfo(
        id=secrets.token_hex(16),
        volume=source.volume,
        time=source.time,  # the moment the data is from, not when it was synthesized
        kind=SnapshotKind.SYNTHETIC,
        parent=source.id,
        image_size=source.image_size,
        block_size=source.block_size,
        counts=SnapshotCounts(zero=zero),
        stored_size=0,
        metadata_size=0,
        duration=time.perf_counter() - clock,
        labels=labels,
        map_root=source.map_root,
        map_height=source.map_height,
    )
