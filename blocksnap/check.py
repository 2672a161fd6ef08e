"""Verification of a repository: every snapshot complete, and optionally every byte intact.

Without read_data it checks metadata: each snapshot record, every node of its block map
(read and hashed), that every block it names is in the index, and that the index entry
points inside a pack that exists.  With read_data it also reads every pack whole,
checks each record's checksum, decompresses it and re-hashes the content, on all cores.
Every problem names the snapshots it damages.

It also recounts, from one consistent view of the index, every reference count (each map
node's entries and each snapshot's root) and every pack's live bytes, and reports any
drift from what the index keeps: the backstop behind gc's exact counts.  Run it while no
prune or gc runs, or a concurrent change may show as drift.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from blocksnap.blockmap import ZERO_ID, BlockMap, node_children
from blocksnap.errors import BlocksnapError, IntegrityError
from blocksnap.model import BLOCK_ID_SIZE, Progress, ProgressCallback
from blocksnap.store import catalog
from blocksnap.store.codec import decompress
from blocksnap.store.index import Location
from blocksnap.store.packs import HEADER_SIZE, KIND_NODE, iter_records
from blocksnap.store.repository import Store, pack_name


@dataclass(slots=True)
class Problem:
    """One kind of damage and the snapshots ("volume@id") it affects."""

    message: str
    snapshots: list[str] = field(default_factory=list)


@dataclass(slots=True)
class VerifyReport:
    snapshots_checked: int = 0
    blocks_referenced: int = 0
    objects_indexed: int = 0
    packs_checked: int = 0
    bytes_read: int = 0
    unreferenced_objects: int = 0  # garbage: count 0, for gc (or kept for running writers)
    counts_checked: int = 0  # reference counts recounted
    leftovers: list[str] = field(default_factory=list)  # of interrupted writers; harmless
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_snapshots(self) -> list[str]:
        return sorted({s for p in self.problems for s in p.snapshots})


def _read_pack(store: Store, name: str, pack_id: bytes) -> tuple[int, set[int], dict[int, str]]:
    """Check every record of one pack: (bytes read, good offsets, bad offset -> message).

    Offset -1 in the bad map means the pack's structure broke and the walk stopped.
    """
    data = store.backend.get(name)
    good: set[int] = set()
    bad: dict[int, str] = {}
    for rec, error in iter_records(data, pack_id.hex()):
        if rec is not None and error is None:
            start = rec.offset + HEADER_SIZE
            payload = memoryview(data)[start : start + rec.stored_size]
            try:
                raw = decompress(rec.codec, payload, rec.raw_size, f"pack {pack_id.hex()}")
                if store.hash(raw) != rec.id:
                    error = IntegrityError(f"record {rec.id.hex()}: content does not match its id")
            except IntegrityError as exc:
                error = exc
        if error is None and rec is not None:
            good.add(rec.offset)
        else:
            bad[rec.offset if rec is not None else -1] = str(error)
    return len(data), good, bad


def _recount(store: Store, report: VerifyReport, limit: int = 20) -> list[str]:
    """Messages for every count and live-byte total that differs from a full recount."""
    locations, counts, live, records, pinned = store.index.counting_view()
    expected: Counter[bytes] = Counter()
    expected_live: Counter[bytes] = Counter()
    problems: list[str] = []
    for record in records:
        try:
            expected[catalog.decode(record, "snapshot record").map_root] += 1
        except IntegrityError as exc:
            problems.append(f"reference recount: {exc}")
    expected.update(pinned)  # an interrupted snapshot's checkpoint
    for object_id, loc in locations.items():
        expected_live[loc.pack] += HEADER_SIZE + loc.stored_size
        if loc.kind != KIND_NODE:
            continue
        try:
            expected.update(node_children(store.read_at(object_id, loc)))
        except BlocksnapError as exc:
            problems.append(f"reference recount: map node {object_id.hex()}: {exc}")
    drift = [
        f"reference count drift: object {object_id.hex()} has {counts.get(object_id)}, "
        f"recount gives {expected[object_id]}"
        for object_id in sorted(set(counts) | set(expected))
        if counts.get(object_id, 0) != expected[object_id]
    ]
    report.counts_checked = len(counts)
    report.unreferenced_objects = sum(1 for count in counts.values() if count == 0)
    drift += [
        f"live bytes drift: pack {pack_id.hex()} has {value}, recount gives "
        f"{expected_live[pack_id]}"
        for pack_id, value in sorted(live.items())
        if value != expected_live[pack_id]
    ]
    if len(drift) > limit:
        drift = [*drift[:limit], f"... and {len(drift) - limit} more counts drifted"]
    return problems + drift


def verify(
    store: Store,
    *,
    read_data: bool = False,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> VerifyReport:
    report = VerifyReport()
    say: Callable[[Progress], None] = progress or (lambda _p: None)
    damage: dict[str, set[str]] = defaultdict(set)  # message -> snapshots

    # 1. Packs present and their sizes.
    present = {name: size for name, size in store.backend.list("packs/")}
    recorded = store.index.pack_infos()
    # 2. Index entries: decodable, pointing into a pack that exists and is long enough.
    bad_objects: dict[bytes, str] = {}
    locations: dict[bytes, Location] = {}
    for key, loc in store.index.iter_objects():
        report.objects_indexed += 1
        if isinstance(loc, IntegrityError):
            bad_objects[key] = str(loc)
            continue
        locations[key] = loc
        name = pack_name(loc.pack)
        if name not in present:
            bad_objects[key] = f"pack {loc.pack.hex()} is missing"
        elif loc.offset + HEADER_SIZE + loc.stored_size > present[name]:
            bad_objects[key] = f"pack {loc.pack.hex()} is truncated"
    for pack_id, pack_info in recorded.items():
        name = pack_name(pack_id)
        if name in present and present[name] != pack_info.get("size"):
            recorded_size = pack_info.get("size")
            msg = f"pack {pack_id.hex()} has {present[name]} bytes, index says {recorded_size}"
            damage.setdefault(msg, set())

    # 3. With read_data: every record of every pack, checked and re-hashed.
    if read_data:
        packs = [(pack_name(p), p) for p in recorded if pack_name(p) in present]
        total = sum(present[n] for n, _ in packs)
        by_pack: dict[bytes, dict[int, bytes]] = defaultdict(dict)
        for key, loc in locations.items():
            by_pack[loc.pack][loc.offset] = key
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
            results = pool.map(lambda item: (item[1], _read_pack(store, *item)), packs)
            for pack_id, (size, good, bad) in results:
                report.packs_checked += 1
                report.bytes_read += size
                say(Progress("read-data", report.bytes_read, total))
                for offset, key in by_pack[pack_id].items():
                    if offset in bad:
                        bad_objects[key] = bad[offset]
                    elif offset not in good:
                        bad_objects.setdefault(
                            key,
                            bad.get(-1, f"no record at offset {offset} of pack {pack_id.hex()}"),
                        )

    # 4. Snapshots: record, map, and every block they name.
    snapshot_objects = {name.split("/", 1)[1] for name, _ in store.backend.list("snapshots/")}
    committed = set()
    for volume in store.volumes():
        for snapshot_id in store.index.snapshot_ids(volume):
            committed.add(snapshot_id)
            label = f"{volume}@{snapshot_id[:12]}"
            report.snapshots_checked += 1
            say(Progress("snapshots", report.snapshots_checked, 0))
            try:
                info = store.snapshot(snapshot_id)
                if snapshot_id not in snapshot_objects:
                    damage[f"snapshot object {snapshot_id} is missing"].add(label)
                block_map = BlockMap(
                    store.read_node, info.map_root, info.map_height, info.block_count
                )
                for leaf_index in range(block_map.leaf_count()):
                    _digests, ids = block_map.leaf(leaf_index)
                    for k in range(0, len(ids), BLOCK_ID_SIZE):
                        block_id = ids[k : k + BLOCK_ID_SIZE]
                        if block_id == ZERO_ID:
                            continue
                        report.blocks_referenced += 1
                        if block_id in bad_objects:
                            damage[f"block {block_id.hex()}: {bad_objects[block_id]}"].add(label)
                        elif block_id not in locations:
                            damage[f"block {block_id.hex()} is not in the index"].add(label)
            except BlocksnapError as exc:
                damage[str(exc)].add(label)

    # 5. The backstop: recount references and live bytes, compare with the index.
    for msg in _recount(store, report):
        damage.setdefault(msg, set())
    report.leftovers = sorted(
        f"snapshots/{s} (record of an uncommitted snapshot)" for s in snapshot_objects - committed
    )
    leftovers = getattr(store.backend, "leftovers", None)
    if leftovers is not None:
        report.leftovers += [f"{p} (unfinished write)" for p in leftovers()]
    report.problems = [Problem(msg, sorted(snaps)) for msg, snaps in sorted(damage.items())]
    return report
