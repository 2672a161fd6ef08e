"""Rebuilding the LMDB index from what storage holds: packs, snapshot and settings objects.

Reference counts are recounted from scratch: every indexed map node counts its entries,
and every snapshot its root.

The new index is built in REPO/index.rebuild, marked complete with a file named COMPLETE,
and then swapped in with two renames.  A crash before COMPLETE leaves the old index in
force; a crash between the renames is finished by the next open (see Store in repository.py).  The
whole run holds the repository's lock exclusively, so no reader or writer sees the swap.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from blocksnap.blockmap import node_children
from blocksnap.errors import BlocksnapError, IntegrityError
from blocksnap.model import Progress, ProgressCallback, SnapshotInfo
from blocksnap.store import catalog
from blocksnap.store.codec import decompress
from blocksnap.store.index import POLICY_PREFIX, PROTECTED_PREFIX, Index
from blocksnap.store.packs import HEADER_SIZE, KIND_NODE, Record, iter_records
from blocksnap.store.repository import Store

REBUILD_DIR = "index.rebuild"
COMPLETE_MARK = "COMPLETE"


@dataclass(slots=True)
class RebuildReport:
    packs: int = 0
    objects: int = 0
    snapshots: int = 0
    damaged: list[str] = field(default_factory=list)  # records and objects left out


def _chain_order(snapshots: list[SnapshotInfo]) -> list[SnapshotInfo]:
    """Oldest first: by start time, and a parent always before its children."""
    by_id = {s.id: s for s in snapshots}

    def depth(s: SnapshotInfo) -> int:
        d, seen = 0, set()
        while s.parent in by_id and s.parent not in seen:
            seen.add(s.parent)
            s = by_id[s.parent]
            d += 1
        return d

    return sorted(snapshots, key=lambda s: (s.time, depth(s), s.id))


def _restore_settings(
    store: Store, index: Index, snapshots: set[str], report: RebuildReport
) -> None:
    """Saved policies and protections, from their objects (see store/repository.py)."""
    for entry in store.backend.list("settings/"):
        name = entry.name
        base = name.rsplit("/", 1)[1]
        if base.startswith("protected-"):
            snapshot_id = base[len("protected-") :]
            if snapshot_id in snapshots:
                index.put_setting(PROTECTED_PREFIX + snapshot_id.encode(), b"")
            continue
        try:
            doc = json.loads(store.backend.get(name))
            volume, policy = str(doc["volume"]), doc["policy"]
            if not isinstance(policy, dict):
                raise TypeError("policy is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            report.damaged.append(f"{name}: damaged settings object ({exc})")
            continue
        index.put_setting(
            POLICY_PREFIX + volume.encode(), json.dumps(policy, sort_keys=True).encode()
        )


def rebuild_index(path: str, progress: ProgressCallback | None = None) -> RebuildReport:
    report = RebuildReport()
    with Store(path, exclusive=True) as store:
        new_path = os.path.join(path, REBUILD_DIR)
        shutil.rmtree(new_path, ignore_errors=True)
        index = Index(new_path, create=True)
        try:
            index.initialize(store.config.id)
            packs = list(store.backend.list("packs/"))
            counts: Counter[bytes] = Counter()
            total = sum(p.size for p in packs)
            done = 0
            for entry in packs:
                name, size = entry.name, entry.size
                try:
                    pack_id = bytes.fromhex(name.rsplit("/", 1)[1])
                except ValueError:
                    report.damaged.append(f"{name}: not a pack name")
                    continue
                data = store.backend.get(name)
                good: list[Record] = []
                children: dict[bytes, list[bytes]] = {}
                for rec, error in iter_records(data, pack_id.hex()):
                    if rec is not None and error is None:
                        start = rec.offset + HEADER_SIZE
                        try:
                            raw = decompress(
                                rec.codec,
                                memoryview(data)[start : start + rec.stored_size],
                                rec.raw_size,
                                name,
                            )
                            if store.hash(raw) != rec.id:
                                raise IntegrityError(
                                    f"{name}: record {rec.id.hex()} content does not match its id"
                                )
                            if rec.kind == KIND_NODE:
                                children[rec.id] = node_children(raw)
                        except IntegrityError as exc:
                            error = exc
                    if error is None and rec is not None:
                        good.append(rec)
                    else:
                        report.damaged.append(str(error))
                # Counted only for nodes indexed from this pack, not for duplicate copies.
                for added in index.add_pack(pack_id, len(data), good):
                    for child in children.get(added, ()):
                        counts[child] += 1
                report.packs += 1
                report.objects += len(good)
                done += size
                if progress:
                    progress(Progress("packs", done, total))
            index.set_counts(counts)
            found: dict[str, list[SnapshotInfo]] = defaultdict(list)
            bodies: dict[str, bytes] = {}
            for entry in store.backend.list("snapshots/"):
                name = entry.name
                try:
                    body = catalog.unframe(store.backend.get(name), name)
                    info = catalog.decode(body, name)
                except BlocksnapError as exc:
                    report.damaged.append(str(exc))
                    continue
                found[info.volume].append(info)
                bodies[info.id] = body
            for volume, snaps in found.items():
                for info in _chain_order(snaps):
                    try:
                        index.commit_snapshot(
                            volume, info.block_size, info.id, bodies[info.id], info.map_root
                        )
                    except IntegrityError as exc:
                        report.damaged.append(f"snapshot {info.id} left out: {exc}")
                        continue
                    report.snapshots += 1
            _restore_settings(store, index, set(bodies), report)
        finally:
            index.close()
        open(os.path.join(new_path, COMPLETE_MARK), "wb").close()
        old = os.path.join(path, "index")
        trash = os.path.join(path, "index.old")
        shutil.rmtree(trash, ignore_errors=True)
        if os.path.exists(old):
            os.rename(old, trash)
        os.rename(new_path, old)
        shutil.rmtree(trash, ignore_errors=True)
    return report
