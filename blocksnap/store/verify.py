"""Verification of a repository: every snapshot complete, and optionally every byte intact.

Without read_data it checks metadata: each snapshot record, every node of its block map
(read and hashed), that every block it names is in the index, and that the index entry
points inside a pack that exists.  With read_data it also reads every pack whole,
checks each record's checksum, decompresses it and re-hashes the content, on all cores.
Every problem names the snapshots it damages.

It also recounts, from one consistent view of the index, every reference count (each map
node's entries and each snapshot's root) and every pack's live bytes, and reports any
drift from what the index keeps: the backstop behind gc's exact counts.

Verify runs safely beside snapshots, prune and gc, and never writes to the repository
(so it works on a read-only copy).  It checks one view of the index, read in one
transaction and copied to a private environment on disk (store/indexcopy.py), so that it
never holds LMDB's old pages back for the hours a --read-data run may take, and so that
its memory stays flat in the repository's size: what it keeps per object (the view, the
recount's tally, the entries of each pack) and per map leaf (what it found there, so that
a leaf that many snapshots share is checked once) is on disk; in memory is only what it
keeps per pack, per snapshot, or per damaged object.

What storage lacks is then either damage or a concurrent gc's doing: a pack compacted
away after the view, a snapshot pruned and collected.  Before anything missing is called
damage it is looked at again in the current index: an object that moved is checked where
it is now, a map node is read where it is now, and damage to a snapshot that no longer
exists is no damage.  Only what is still missing from a state that names it is reported.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from blocksnap.blockmap import ZERO_ID, BlockMap, node_children
from blocksnap.errors import BlocksnapError, IntegrityError, MissingObjectError
from blocksnap.model import BLOCK_ID_SIZE, Progress, ProgressCallback, ProgressUnit
from blocksnap.store import catalog, sync
from blocksnap.store.backend import ObjectInfo
from blocksnap.store.indexcopy import IndexCopy
from blocksnap.store.packindex import many_tocs
from blocksnap.store.packs import HEADER_SIZE, KIND_NODE, pack_name, walk_pack
from blocksnap.store.records import open_checked
from blocksnap.store.repository import Store

INTERRUPTED_REPAIR = ("index.rebuild", "index.old")  # see store/rebuild.py
_ATTEMPTS = 4  # looks again at what a concurrent gc moved, before calling it damage
READ_BUDGET = 64 << 20  # whole packs --read-data holds at once, as far as it can
_TALLY_BOUND = 100_000  # distinct objects the recount counts in memory before adding them
_LEAF_BOUND = 10_000  # map leaves whose notes the snapshot walk keeps in memory
_NOTE = struct.Struct(">HI")  # a leaf's note: entry count, blocks referenced (see _Leaves)


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


class _Listing:
    """The objects under a prefix: from one listing, and, since a listing may lag behind
    writes (see store/backend.py), from a stat of each name it leaves out, so that a
    stale listing never reads as a missing object."""

    def __init__(self, store: Store, prefix: str) -> None:
        self._store = store
        self._found = {o.name: o for o in store.backend.list(prefix)}
        self._absent: set[str] = set()

    def info(self, name: str) -> ObjectInfo | None:
        info = self._found.get(name)
        if info is None and name not in self._absent:
            try:
                info = self._found[name] = self._store.backend.stat(name)
            except MissingObjectError:
                self._absent.add(name)
        return info

    def size(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else info.size

    def names(self) -> set[str]:
        """The names found to exist (a stale listing can only make this short)."""
        return set(self._found)


_buffers = threading.local()  # each read-data worker's pack buffer


def _pack_buffer(size: int, room: int) -> memoryview:
    """This thread's buffer for a pack of size bytes, made once for room bytes (the
    largest pack's size) unless size is larger.  Each worker reads every pack into one
    buffer: packs read into buffers of their own, freed in turn, stayed in malloc's heap
    of each thread (glibc raises its threshold for handing large buffers back to the size
    of the largest freed), 30-45 MiB more at peak on a 4 GiB repository."""
    buffer: bytearray | None = getattr(_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        _buffers.buffer = None  # never two at once
        buffer = _buffers.buffer = bytearray(max(size, room))
    return memoryview(buffer)[:size]


def _read_pack(
    store: Store, name: str, pack_id: bytes, size: int, room: int
) -> tuple[int, set[int], dict[int, str], list[str]] | None:
    """Check every record of one pack, listed with size bytes, read into this thread's
    buffer of room bytes at least: (bytes read, good offsets, bad offset -> message,
    damage to the pack's structure), or None when it is gone.

    Offset -1 in the bad map means the pack's table of contents is damaged, so an offset
    its scan did not find may hold a record that was lost with it.
    """
    try:
        buffer = _pack_buffer(size, room)
        data = buffer[: store.backend.get_into(name, buffer)]  # packs are immutable
        walk = walk_pack(data, pack_id.hex())
    except MissingObjectError:
        return None
    except BlocksnapError as exc:  # a pack of a newer format: not read, and said so
        return 0, set(), {-1: str(exc)}, [str(exc)]
    good: set[int] = set()
    bad: dict[int, str] = {}
    for rec, error in walk.records:
        if error is None:  # walk_pack checked header and check: decode and verify the id
            payload = memoryview(data)[rec.offset + HEADER_SIZE : rec.end]
            where = f"pack {pack_id.hex()} at offset {rec.offset}: record {rec.id.hex()}"
            try:
                open_checked(rec, payload, store.hash, where)
            except IntegrityError as exc:
                error = exc
        if error is None:
            good.add(rec.offset)
        else:
            bad[rec.offset] = str(error)
    if not walk.complete:
        bad[-1] = "; ".join(str(e) for e in walk.problems)
    return len(data), good, bad, [str(e) for e in walk.problems]


class _Reader:
    """Reads map nodes where the view put them; a node whose pack a concurrent gc
    compacted away is looked up again in the current index (as Store.read_object does)."""

    def __init__(self, store: Store, view: IndexCopy) -> None:
        self.store = store
        self.view = view

    def node(self, node_id: bytes) -> bytes:
        loc = self.view.location(node_id)
        if loc is None:
            why = self.view.damaged.get(node_id, "is not in the index")
            raise IntegrityError(f"map node {node_id.hex()}: {why}")
        try:
            return self.store.read_at(node_id, loc)
        except MissingObjectError:
            return self.store.read_node(node_id)


class _Leaves:
    """What the snapshot walk found in each distinct map leaf: checked once however many
    snapshots share it (56 restore points of a volume share most of their leaves), and
    kept as notes in the view on disk, _LEAF_BOUND leaves at a time in memory.

    A note holds the leaf's entry count, the blocks it references that are not zero and
    the damage messages of its blocks.  A leaf at a position whose entry count differs
    from its note is read again, so that the map's shape is checked at every position."""

    def __init__(self, view: IndexCopy, bad_objects: dict[bytes, str], gone: set[bytes]) -> None:
        self._view = view
        self._bad = bad_objects
        self._gone = gone
        self._pending: dict[bytes, bytes] = {}

    def check(self, block_map: BlockMap, leaf_index: int) -> tuple[int, list[str]]:
        """(blocks referenced, damage messages) of one leaf of block_map."""
        leaf_id = block_map.leaf_id(leaf_index)
        note = self._pending.get(leaf_id) or self._view.note(leaf_id)
        if note is not None:
            size, referenced = _NOTE.unpack_from(note)
            if size == block_map.leaf_size(leaf_index):
                found = note[_NOTE.size :].decode()
                return referenced, found.split("\x00") if found else []
        _digests, ids = block_map.leaf(leaf_index)
        blocks = [ids[k : k + BLOCK_ID_SIZE] for k in range(0, len(ids), BLOCK_ID_SIZE)]
        blocks = [block_id for block_id in blocks if block_id != ZERO_ID]
        absent = self._view.absent(blocks)
        messages: list[str] = []
        for block_id in blocks:
            if block_id in self._bad:
                messages.append(f"block {block_id.hex()}: {self._bad[block_id]}")
            elif block_id in self._gone:
                messages.append(f"block {block_id.hex()} was collected by gc")
            elif block_id in absent:
                messages.append(f"block {block_id.hex()} is not in the index")
        size = len(ids) // BLOCK_ID_SIZE
        self._pending[leaf_id] = _NOTE.pack(size, len(blocks)) + "\x00".join(messages).encode()
        if len(self._pending) >= _LEAF_BOUND:
            self._view.add_notes(self._pending)
            self._pending.clear()
        return len(blocks), messages


def _recount(store: Store, report: VerifyReport, view: IndexCopy, limit: int = 20) -> list[str]:
    """Messages for every count and live-byte total that differs from a full recount.

    The recount needs every map node of its view, counted or not.  When a concurrent gc
    deleted one after view was read, the recount starts again from a new view; after
    _ATTEMPTS such races it is left out (counts_checked stays 0) rather than guessed.
    The counts go to the view's tally on disk, _TALLY_BOUND distinct objects at a time."""
    for attempt in range(_ATTEMPTS):
        with contextlib.ExitStack() as own:
            if attempt:
                view = own.enter_context(store.index.copy())
            problems = _tally(store, view)
            if problems is None:
                continue  # raced with a gc
            return problems + _drift(report, view, limit)
    return []


def _tally(store: Store, view: IndexCopy) -> list[str] | None:
    """Count every reference of the view into its tally: the problems found on the way,
    or None when a concurrent gc collected a map node since the view."""
    reader = _Reader(store, view)
    tally: Counter[bytes] = Counter()
    problems: list[str] = []
    for _volume, snapshot_id, record in view.snapshots():
        if record is None:
            continue  # reported with the snapshots
        try:
            tally[catalog.decode(record, f"snapshot {snapshot_id}").map_root] += 1
        except IntegrityError as exc:
            problems.append(f"reference recount: {exc}")
    tally.update(view.pinned)  # an interrupted snapshot's checkpoint
    for object_id, loc in view.locations():
        if loc.kind != KIND_NODE:
            continue
        try:
            tally.update(node_children(reader.node(object_id)))
        except MissingObjectError as exc:
            if store.index.location(object_id) is None:  # collected since the view
                return None
            problems.append(f"reference recount: {exc}")
        except BlocksnapError as exc:
            problems.append(f"reference recount: map node {object_id.hex()}: {exc}")
        if len(tally) >= _TALLY_BOUND:
            view.add_tally(tally)
            tally.clear()
    view.add_tally(tally)
    return problems


def _drift(report: VerifyReport, view: IndexCopy, limit: int) -> list[str]:
    """Messages (at most limit, then how many more) for every count of the view that its
    tally does not match, and every pack's live bytes that its entries do not add up to."""
    drift: list[str] = []
    more = 0
    counts_checked = unreferenced = 0
    for object_id, count, expected in _pairs(view.counts(), view.tally()):
        if count is not None:
            counts_checked += 1
            unreferenced += count == 0
        if (count or 0) != (expected or 0):
            if len(drift) < limit:
                drift.append(
                    f"reference count drift: object {object_id.hex()} has {count}, "
                    f"recount gives {expected or 0}"
                )
            else:
                more += 1
    report.counts_checked = counts_checked
    report.unreferenced_objects = unreferenced
    live: Counter[bytes] = Counter()
    for _object_id, loc in view.locations():
        live[loc.pack] += HEADER_SIZE + loc.stored_size
    for pack_id, info in sorted(view.packs.items()):
        if int(info.get("live", 0)) != live[pack_id]:
            if len(drift) < limit:
                drift.append(
                    f"live bytes drift: pack {pack_id.hex()} has {int(info.get('live', 0))}, "
                    f"recount gives {live[pack_id]}"
                )
            else:
                more += 1
    if more:
        drift.append(f"... and {more} more counts drifted")
    return drift


def _pairs(
    left: Iterator[tuple[bytes, int]], right: Iterator[tuple[bytes, int]]
) -> Iterator[tuple[bytes, int | None, int | None]]:
    """(key, left's value or None, right's value or None) for every key of two iterators
    of (key, value) in key order."""
    a, b = next(left, None), next(right, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield a[0], a[1], None
            a = next(left, None)
        elif a is None or b[0] < a[0]:
            yield b[0], None, b[1]
            b = next(right, None)
        else:
            yield a[0], a[1], b[1]
            a, b = next(left, None), next(right, None)


def _settle(
    store: Store, view: IndexCopy, suspects: dict[bytes, str], read_data: bool
) -> tuple[dict[bytes, str], set[bytes]]:
    """Decide, against the current index, about objects whose pack was missing when
    verify looked for it: (damaged object -> message, objects collected since the view).

    A pack can vanish after the view only through gc, which first moves every entry out
    of it (compaction) or deletes them (collection).  So an object still indexed at the
    same place is damage; one indexed elsewhere is checked there (again, if it moved
    again meanwhile); one no longer indexed was collected, which is damage only if a
    snapshot that still exists needs it (decided with the snapshots)."""
    bad: dict[bytes, str] = {}
    gone: set[bytes] = set()
    seen = {object_id: view.location(object_id) for object_id in suspects}
    pending = dict(suspects)
    for _attempt in range(_ATTEMPTS):
        if not pending:
            break
        present = _Listing(store, "packs/")
        again: dict[bytes, str] = {}
        ids = list(pending)
        for object_id, loc in zip(ids, store.index.locations(ids), strict=True):
            message = pending[object_id]
            if loc is None:
                gone.add(object_id)
            elif loc == seen[object_id]:
                bad[object_id] = message
            elif (size := present.size(pack_name(loc.pack))) is None:
                seen[object_id] = loc
                again[object_id] = f"pack {loc.pack.hex()} is missing"
            elif loc.offset + HEADER_SIZE + loc.stored_size > size:
                bad[object_id] = f"pack {loc.pack.hex()} is truncated"
            elif read_data:
                try:
                    store.read_at(object_id, loc)
                except MissingObjectError:
                    seen[object_id] = loc
                    again[object_id] = f"pack {loc.pack.hex()} is missing"
                except BlocksnapError as exc:
                    bad[object_id] = str(exc)
        pending = again
    bad.update(pending)  # still moving after every attempt: say what was last found
    return bad, gone


def _in_unindexed_packs(store: Store, entry: catalog.Entry) -> bool | None:
    """Whether a record is a commit of another host since this cache synced, on a store
    that hosts share: its map root is in a pack its run wrote that this index does not
    know, and every such pack is there, readable from its TOC and named gone by no list
    (the next command that writes indexes them).  None: every such pack is, and the
    root is in none of them (the run found it in a pack of an earlier run: unchanged
    data).  Only the TOCs are read."""
    if not store.shared:
        return False
    unknown = {}
    for pack_id in entry.packs:
        if store.index.has_pack(pack_id):
            continue
        if store.index.is_gone(pack_id):
            return False  # collected: never indexed again
        try:
            unknown[pack_id] = store.backend.stat(pack_name(pack_id)).size
        except MissingObjectError:
            return False  # lost
    root = entry.info.map_root
    found = False
    for _pack, _size, toc in many_tocs(store.backend, unknown):
        if isinstance(toc, BlocksnapError):
            return False
        found = found or any(rec.id == root for rec in toc)
    return found or None


def _in_other_packs(store: Store, roots: set[bytes]) -> set[bytes]:
    """Of roots, those in a pack in storage that this index does not know and no list
    names gone: what another host's runs wrote since this cache synced (the next command
    that writes indexes them, as sync does for a root in no pack of its run).  A listing
    of packs/, and only the TOCs are read, a batch at a time."""
    unknown = sorted(store.unknown_packs().items())
    found: set[bytes] = set()
    for at in range(0, len(unknown), _TOC_BATCH):
        for _pack, _size, toc in many_tocs(store.backend, dict(unknown[at : at + _TOC_BATCH])):
            if not isinstance(toc, BlocksnapError):
                found.update(rec.id for rec in toc if rec.id in roots)
        if found == roots:
            break
    return found


def verify(
    store: Store,
    *,
    read_data: bool = False,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
) -> VerifyReport:
    # 1. One view of the index; storage is listed after it, so everything the view names
    # was written before the listing, and what is missing was deleted since (or is lost).
    # check_pages: LMDB reads damaged pages unchecked.
    with store.index.copy(check_pages=True, by_pack=read_data) as view:
        return _verify(store, view, read_data, progress, workers)


def _verify(
    store: Store,
    view: IndexCopy,
    read_data: bool,
    progress: ProgressCallback | None,
    workers: int | None,
) -> VerifyReport:
    report = VerifyReport()
    say: Callable[[Progress], None] = progress or (lambda _p: None)
    damage: dict[str, set[str]] = defaultdict(set)  # message -> snapshot labels
    labels: dict[str, str] = {}  # label -> snapshot id

    present = _Listing(store, "packs/")
    records = _Listing(store, "snapshots/")
    # 2. Index entries: decodable, pointing into a pack that exists and is long enough.
    bad_objects: dict[bytes, str] = dict(view.damaged)
    suspects: dict[bytes, str] = {}  # pack missing: gc may have deleted it since the view
    report.objects_indexed = view.objects + len(view.damaged)
    for key, loc in view.locations():
        name = pack_name(loc.pack)
        size = present.size(name)
        if size is None:
            suspects[key] = f"pack {loc.pack.hex()} is missing"
        elif loc.offset + HEADER_SIZE + loc.stored_size > size:
            bad_objects[key] = f"pack {loc.pack.hex()} is truncated"
    for pack_id, pack_info in view.packs.items():
        name = pack_name(pack_id)
        size = present.size(name)
        if size is not None and size != pack_info.get("size"):
            recorded_size = pack_info.get("size")
            msg = f"pack {pack_id.hex()} has {size} bytes, index says {recorded_size}"
            damage.setdefault(msg, set())

    # 3. With read_data: every record of every pack, checked and re-hashed.
    if read_data:
        sizes = {p: present.size(pack_name(p)) for p in view.packs}
        total = sum(size or 0 for size in sizes.values())
        largest = max((size or 0 for size in sizes.values()), default=1)
        packs = [(pack_name(p), p, size, largest) for p, size in sizes.items() if size is not None]
        parallel = workers or max(
            1, min(store.backend.capabilities.max_parallelism, READ_BUDGET // max(1, largest))
        )
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            results = _bounded_map(
                pool, lambda item: (item[1], _read_pack(store, *item)), packs, 2 * parallel
            )
            for pack_id, read in results:
                if read is None:  # deleted since the listing
                    for _offset, key in view.in_pack(pack_id):
                        suspects[key] = f"pack {pack_id.hex()} is missing"
                    continue
                report.packs_checked += 1
                size, good, bad, broken = read
                for msg in broken:  # the records it costs are named below, by snapshot
                    damage.setdefault(msg, set())
                report.bytes_read += size
                say(Progress("read-data", report.bytes_read, total, ProgressUnit.BYTES))
                for offset, key in view.in_pack(pack_id):
                    if offset in bad:
                        bad_objects[key] = bad[offset]
                    elif offset not in good:
                        bad_objects.setdefault(
                            key,
                            bad.get(-1, f"no record at offset {offset} of pack {pack_id.hex()}"),
                        )
    settled, gone = _settle(store, view, suspects, read_data)
    bad_objects.update(settled)

    # 4. Snapshots: record, map, and every block they name.
    reader = _Reader(store, view)
    leaves = _Leaves(view, bad_objects, gone)
    for volume, snapshot_id, record in view.snapshots():
        label = f"{volume}@{snapshot_id[:12]}"
        labels[label] = snapshot_id
        report.snapshots_checked += 1
        say(
            Progress(
                "snapshots", report.snapshots_checked, view.snapshot_count, ProgressUnit.SNAPSHOTS
            )
        )
        try:
            if record is None:
                raise IntegrityError(
                    f"volume {volume}: timeline names snapshot {snapshot_id}, which has no "
                    "record; run repair --rebuild-index"
                )
            info = catalog.decode(record, f"snapshot {snapshot_id}")
            problem = _record_object_problem(store, records, snapshot_id, record)
            if problem is not None:
                damage[problem].add(label)
            block_map = BlockMap(reader.node, info.map_root, info.map_height, info.block_count)
            for leaf_index in range(block_map.leaf_count()):
                referenced, found = leaves.check(block_map, leaf_index)
                report.blocks_referenced += referenced
                for msg in found:
                    damage[msg].add(label)
        except BlocksnapError as exc:
            damage[str(exc)].add(label)

    # 5. The backstop: recount references and live bytes, compare with the index.
    for msg in _recount(store, report, view):
        damage.setdefault(msg, set())

    # 6. What a snapshot pruned since the view suffered (its record, map or blocks deleted
    # by the prune and a gc) is no damage: only snapshots that still exist count.
    current = _current_snapshots(store) if any(damage.values()) else set()
    problems = []
    for msg, snaps in sorted(damage.items()):
        alive = sorted(s for s in snaps if labels[s] in current)
        if alive or not snaps:
            problems.append(Problem(msg, alive))
    cached = {snapshot_id for _v, snapshot_id, _r in view.snapshots()}
    removed = sync.listed_ids(store.backend, catalog.TOMBSTONES)
    listed = {catalog.id_of(name) for name in records.names()}
    uncached = {s for s in listed - cached - removed if s is not None}
    if uncached:
        uncached -= _current_snapshots(store)  # cached since the view
    report.leftovers = []
    elsewhere: list[tuple[str, bytes]] = []  # (record, root in no pack of its run)
    for snapshot_id in sorted(uncached):
        name = catalog.object_name(snapshot_id)
        try:  # a record the index lacks commits a snapshot: it must be readable
            entry, _body = catalog.read_record(store.backend.get, snapshot_id)
        except MissingObjectError:
            continue
        except BlocksnapError as exc:
            problems.append(Problem(f"{exc}; the snapshot it commits is not in the index"))
            continue
        listed_record = records.info(name)
        if listed_record is not None and entry.late(listed_record.mtime):
            report.leftovers.append(
                f"{name} (a record that landed after its deadline: no snapshot; the gc of "
                "its writer's host deletes it)"
            )
            continue
        root = entry.info.map_root
        placed = True if root in view else _in_unindexed_packs(store, entry)
        if placed is None:
            elsewhere.append((snapshot_id, root))
        elif placed:
            report.leftovers.append(_new_commit(snapshot_id))
        else:  # its blocks are not kept for it (a local store, or its run's packs are lost)
            problems.append(_rootless(snapshot_id, root))
    if elsewhere:
        in_other = _in_other_packs(store, {root for _s, root in elsewhere})
        for snapshot_id, root in elsewhere:
            if root in in_other:
                report.leftovers.append(_new_commit(snapshot_id))
            else:
                problems.append(_rootless(snapshot_id, root))
    report.leftovers += sorted(
        f"snapshot {s} (removed, its tombstone exists, and still in the index: the next "
        "command that opens the repository for writing forgets it)"
        for s in cached & removed
        if s is not None
    )
    report.leftovers += sorted(
        f"snapshots/{s} (record of a removed snapshot: gc deletes it)"
        for s in listed & removed
        if s is not None
    )
    report.leftovers += [f"{p} (unfinished write)" for p in store.backend.leftovers()]
    report.leftovers += [
        f"{name} (left by an interrupted repair; the next repair --rebuild-index removes it)"
        for name in INTERRUPTED_REPAIR
        if os.path.exists(os.path.join(store.path, name))
    ]
    # Settings are few (a volume's or a snapshot's); tombstones only accumulate, so they
    # are read with the rest of the data.
    problems += _undecodable(store, catalog.SETTINGS, catalog.decode_setting, _REWRITTEN)
    if read_data:
        problems += _undecodable(
            store, catalog.TOMBSTONES, catalog.decode_tombstone, "the removal stands"
        )
    report.problems = problems
    return report


_REWRITTEN = "repair --rebuild-index writes it again where it can"
_TOC_BATCH = 64  # packs whose tables of contents are in memory at once


def _new_commit(snapshot_id: str) -> str:
    return (
        f"{catalog.object_name(snapshot_id)} (a committed snapshot the index lacks: the "
        "next command that opens the repository for writing indexes it)"
    )


def _rootless(snapshot_id: str, root: bytes) -> Problem:
    return Problem(
        f"snapshot {snapshot_id} is committed and not in the index, and its map root "
        f"{root.hex()} is not in the index either"
    )


def _undecodable(
    store: Store, prefix: str, decode: Callable[[bytes, str], object], advice: str
) -> list[Problem]:
    """A problem for every object under prefix that decode refuses."""
    found = []
    for listed in store.backend.list(prefix):
        try:
            decode(store.backend.get(listed.name), listed.name)
        except MissingObjectError:
            continue  # removed since the listing
        except BlocksnapError as exc:
            found.append(Problem(f"{exc}; {advice}"))
    return found


def _record_object_problem(
    store: Store, records: _Listing, snapshot_id: str, cached: bytes
) -> str | None:
    """What is wrong with a cached snapshot's record object, if anything: it must hold
    the index's copy of the record, byte for byte."""
    name = catalog.object_name(snapshot_id)
    fix = "repair --rebuild-index writes it again from the index's copy"
    if records.size(name) is None:
        return f"snapshot record object {name} is missing; {fix}"
    try:
        body = catalog.unframe(catalog.SNAPSHOT_MAGIC, store.backend.get(name), name)
    except MissingObjectError:
        return None  # removed since the listing: decided with the snapshots that remain
    except BlocksnapError as exc:
        return f"{exc}; {fix}"
    if body != cached:
        return f"{name} differs from the index's copy of the record; {fix}"
    return None


_I = TypeVar("_I")
_R = TypeVar("_R")


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable[[_I], _R], items: Iterable[_I], window: int
) -> Iterator[_R]:
    """fn of every item, in order, with at most window of them submitted and not yet
    taken: a slow consumer never lets finished results pile up."""
    pending: deque[Future[_R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _current_snapshots(store: Store) -> set[str]:
    """The ids of every snapshot committed now."""
    return {s for volume in store.volumes() for s in store.index.snapshot_ids(volume)}
