"""Rebuilding the LMDB index from what storage holds: packs, snapshot and settings objects.

Reference counts are recounted from scratch: every indexed map node counts its entries,
and every snapshot its root.

A pack is indexed from its table of contents, read from its tail (store/packs.py), so a
pack of data blocks costs one or two small ranged reads, not a download.  Its blocks are
not read: a damaged one is found when it is read (restore, verify --read-data).  Map
nodes are read and checked, since their children are counted; they live in packs of
their own, each read in one range.  A pack whose trailer or TOC is damaged is read whole
and scanned, every record in it checked, so the damage costs only the records it hit.
A pack of a format this blocksnap does not know stops the rebuild (UnsupportedFormatError)
before anything is swapped: leaving its records out would lose them.

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
from blocksnap.model import Progress, ProgressCallback, ProgressUnit, SnapshotInfo
from blocksnap.store import catalog
from blocksnap.store.index import POLICY_PREFIX, PROTECTED_PREFIX, Index
from blocksnap.store.packs import (
    HEADER_SIZE,
    KIND_NODE,
    Record,
    read_toc,
    walk_pack,
)
from blocksnap.store.records import open_checked, open_record
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


def _index_pack(
    store: Store, name: str, size: int, report: RebuildReport
) -> tuple[list[Record], dict[bytes, list[bytes]]]:
    """The intact records of one pack and the children of its map nodes.

    The table of contents comes from the pack's tail (packs.read_toc), so a pack of data
    blocks costs one or two small reads; its blocks are checked when read (and by verify
    --read-data).  Map nodes are read and checked here, their children being needed for
    the counts; they sit in packs of their own, read in one range.  A pack whose trailer
    or TOC is damaged is read whole and scanned, and every record is checked.
    """
    pack = name.rsplit("/", 1)[1]
    where = f"pack {pack}"
    try:
        records = read_toc(lambda at, length: store.backend.get(name, at, length), size, where)
    except IntegrityError as exc:
        data = store.backend.get(name)
        walk = walk_pack(data, pack)
        report.damaged.append(f"{exc}; its records were found by scanning it")
        report.damaged += [str(e) for e in walk.problems if str(e) != str(exc)]
        candidates = walk.records
        check_all, base = True, 0
    else:
        nodes = [rec for rec in records if rec.kind == KIND_NODE]
        base = nodes[0].offset if nodes else 0
        data = store.backend.get(name, base, nodes[-1].end - base) if nodes else b""
        candidates = [(rec, None) for rec in records]
        check_all = False
    good: list[Record] = []
    children: dict[bytes, list[bytes]] = {}
    view = memoryview(data)
    for rec, error in candidates:
        if error is None and (check_all or rec.kind == KIND_NODE):
            at = f"{where} at offset {rec.offset}"
            record = view[rec.offset - base : rec.end - base]
            try:
                if check_all:  # walk_pack checked header and check already
                    raw = open_checked(rec, record[HEADER_SIZE:], store.hash, at)
                else:
                    raw = open_record(
                        record,
                        rec.id,
                        rec,
                        store.hash,
                        at,
                        listed_check=rec.check,
                        against="the table of contents",
                    )
                if rec.kind == KIND_NODE:
                    children[rec.id] = node_children(raw)
            except IntegrityError as exc:
                error = exc
        if error is None:
            good.append(rec)
        else:
            report.damaged.append(str(error))
    return good, children


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
                good, children = _index_pack(store, name, size, report)
                # Counted only for nodes indexed from this pack, not for duplicate copies.
                for added in index.add_pack(pack_id, size, good):
                    for child in children.get(added, ()):
                        counts[child] += 1
                report.packs += 1
                report.objects += len(good)
                done += size
                if progress:  # bytes of packs read: packs differ widely in size
                    progress(Progress("packs", done, total, ProgressUnit.BYTES))
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
