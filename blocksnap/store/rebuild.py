"""Rebuilding the LMDB index from what storage holds: packs, snapshot records, tombstones
and settings objects.

The snapshots are the records no tombstone names, in each volume's (seq, id) order, so
the rebuilt catalog, latest~N and every parent are the ones the objects define.  A
record object that is damaged or missing while the old index (if it still opens) holds
an intact copy of a snapshot no tombstone names is written again from that copy and
reported as restored; one with no intact copy is reported, never silently dropped.

Reference counts are recounted from scratch: every map node counts its entries, and
every snapshot its root.  Nothing can be running while the rebuild holds a local
repository (no writer, no checkpoint kept: both are host-local and start afresh), so
what no snapshot reaches is garbage: map nodes no root reaches (gc may have taken their
children already) and objects no one counts are left out of the new index, as gc
would have collected them, and their records become dead bytes for gc's compaction.

On a store that hosts share, writers on other hosts may be running meanwhile: the
records are listed before the packs (a committed record's packs are all listed then),
the collection lists after (store/collection.py: their marks, before any pack is
indexed), and the rebuild holds a writer session where it can write one, so that no
list armed while it runs is carried out before it ends.  What no snapshot reaches may
be a running writer's, so it stays in the index at count 0, for gc's lists to collect
or its commit to count; only map nodes that name objects no pack holds are left out,
their bytes still counted live so that no gc takes their pack for empty.

A pack is indexed from its table of contents, read from its tail (store/packindex.py), so
a pack of data blocks costs one or two small ranged reads, not a download.  Its blocks are
not read: a damaged one is found when it is read (restore, verify --read-data).  Map
nodes are read and checked, since their children are counted; they live in packs of
their own, each read in one range.  A pack whose trailer or TOC is damaged is read whole
and scanned, every record in it checked, so the damage costs only the records it hit.
A pack, record or setting of a format this blocksnap does not know stops the rebuild
(UnsupportedFormatError) before anything is swapped: leaving it out would lose it.

The new index is built in REPO/index.rebuild, marked complete with a file named COMPLETE,
and then swapped in with two renames.  A crash before COMPLETE leaves the old index in
force; a crash between the renames is finished by the next open (see Store in
repository.py); verify reports what an interrupted rebuild left.  The whole run holds
the repository's lock exclusively, so no reader or writer sees the swap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

from blocksnap.blockmap import node_children
from blocksnap.errors import (
    BlocksnapError,
    IntegrityError,
    MissingObjectError,
    StoreError,
    UnsupportedFormatError,
)
from blocksnap.model import Progress, ProgressCallback, ProgressUnit
from blocksnap.store import catalog, collection, sync
from blocksnap.store.backend import ObjectStore
from blocksnap.store.config import CONFIG_NAME
from blocksnap.store.entries import POLICY_PREFIX, PROTECTED_PREFIX
from blocksnap.store.index import Index
from blocksnap.store.locks import Locks, WriterSessions
from blocksnap.store.packindex import many_pack_contents
from blocksnap.store.repository import Store, on_read_only_filesystem

REBUILD_DIR = "index.rebuild"
COMPLETE_MARK = "COMPLETE"


@dataclass(slots=True)
class RebuildReport:
    packs: int = 0
    objects: int = 0
    snapshots: int = 0
    damaged: list[str] = field(default_factory=list)  # records and objects left out
    restored: list[str] = field(default_factory=list)  # record objects written again
    garbage: int = 0  # objects left out as unreachable (gc would have collected them)


@dataclass(slots=True)
class _Old:
    """What the index being replaced still holds intact, to write lost objects again."""

    records: dict[str, bytes] = field(default_factory=dict)  # snapshot id -> body
    policies: dict[str, tuple[str, dict[str, object]]] = field(default_factory=dict)
    # (policy object name -> (volume, policy))


def _old_index(path: str, repository_id: str) -> _Old:
    """The old index's intact records and policies, if it opens and is this
    repository's (an index copied in from elsewhere lends nothing)."""
    found = _Old()
    location = os.path.join(path, "index")
    if not os.path.exists(os.path.join(location, "data.mdb")):
        return found
    try:
        old = Index(location, readonly=True)
    except BlocksnapError:
        return found
    try:
        old.check_identity(repository_id)
        for snapshot_id in old.cached_snapshot_ids():
            body = old.snapshot_record(snapshot_id)
            if body is None:
                continue
            try:
                if catalog.decode(body, snapshot_id).id == snapshot_id:
                    found.records[snapshot_id] = body
            except BlocksnapError:
                continue
        for key, value in old.settings_with(POLICY_PREFIX).items():
            try:
                volume, policy = key.decode(), json.loads(value)
            except ValueError:
                continue
            if isinstance(policy, dict):
                found.policies[catalog.policy_name(volume)] = (volume, policy)
    except BlocksnapError:
        return _Old()
    finally:
        old.close()
    return found


@dataclass(frozen=True, slots=True)
class _Found:
    """A snapshot the objects define, and why its record must be written again, if so."""

    entry: catalog.Entry
    body: bytes
    restore: str | None = None


def _catalog(store: Store, old: dict[str, bytes], report: RebuildReport) -> list[_Found]:
    """The snapshots the objects define: records that no tombstone names and that landed
    by their deadline (store/catalog.py: one that landed later is none).  One
    whose record object is damaged or missing is taken from the old index's copy (to be
    written again once it is indexed); one with no intact copy is reported."""
    removed = sync.listed_ids(store.backend, catalog.TOMBSTONES)
    found: list[_Found] = []
    listed = {o.name: o.mtime for o in store.backend.list(catalog.SNAPSHOTS)}
    ids = {catalog.id_of(name) for name in listed}
    for name in sorted(listed):
        if catalog.id_of(name) is None:
            report.damaged.append(f"{name}: not a snapshot record name")
    for snapshot_id in sorted({i for i in ids | set(old) if i is not None}):
        if snapshot_id in removed or store.exists(catalog.tombstone_name(snapshot_id)):
            continue  # (a listing may lag behind a removal: never bring one back)
        name = catalog.object_name(snapshot_id)
        try:
            entry, body = catalog.read_record(store.backend.get, snapshot_id)
        except UnsupportedFormatError:
            raise
        except MissingObjectError:
            why = f"{name} was missing"
        except BlocksnapError as exc:
            why = str(exc)
        else:
            if not _late(store, entry, name, listed):
                found.append(_Found(entry, body))
            continue
        copy = old.get(snapshot_id)
        if copy is None:
            report.damaged.append(f"{why}; snapshot {snapshot_id} left out (no intact copy)")
            continue
        # Cached, so judged in time: its new object must not read as landing late.
        copy = catalog.without_deadline(copy)
        found.append(_Found(catalog.decode_entry(copy, name), copy, why))
    return found


def _late(store: Store, entry: catalog.Entry, name: str, listed: dict[str, float]) -> bool:
    """Whether a record read whole landed after its deadline: then no snapshot."""
    if entry.commit_by is None:
        return False
    mtime = listed.get(name)
    if mtime is None:  # read, though the listing missed it
        try:
            mtime = store.backend.stat(name).mtime
        except MissingObjectError:
            return True  # deleted since it was read (a removal, its writer's gc): none now
    return entry.late(mtime)


def _valid(found: list[_Found], nodes: set[bytes], report: RebuildReport) -> list[_Found]:
    """The snapshots that can be indexed, in each volume's order: the root of each is an
    indexed map node, and a volume's block size is its first snapshot's."""
    valid = []
    block_sizes: dict[str, int] = {}
    for item in sorted(found, key=lambda f: (f.entry.info.volume, f.entry.order)):
        info = item.entry.info
        size = block_sizes.setdefault(info.volume, info.block_size)
        if info.map_root not in nodes:
            report.damaged.append(
                f"snapshot {info.id} left out: its map root {info.map_root.hex()} is in no pack"
            )
        elif info.block_size != size:
            report.damaged.append(
                f"snapshot {info.id} left out: block size {info.block_size}, volume "
                f"{info.volume} {size}"
            )
        else:
            valid.append(item)
    return valid


def _restore_settings(
    store: Store,
    index: Index,
    snapshots: set[str],
    old_policies: dict[str, tuple[str, dict[str, object]]],
    report: RebuildReport,
) -> None:
    """Saved policies and protections, from their objects (see store/catalog.py); a
    damaged one is written again (a policy from the old index's copy)."""
    for entry in store.backend.list(catalog.SETTINGS):
        name = entry.name
        try:
            setting = catalog.decode_setting(store.backend.get(name), name)
        except UnsupportedFormatError:
            raise
        except BlocksnapError as exc:
            base = name.rsplit("/", 1)[-1]
            snapshot_id = base.removeprefix("protected-")
            if base.startswith("protected-") and snapshot_id in snapshots:
                # A damaged protection still protects (the safe side): written again.
                store.backend.put(name, catalog.encode_protected(snapshot_id))
                index.put_setting(PROTECTED_PREFIX + snapshot_id.encode(), b"")
                report.restored.append(f"{exc}; snapshot {snapshot_id} kept protected")
            elif name in old_policies:
                volume, policy = old_policies[name]
                store.backend.put(name, catalog.encode_policy(volume, policy))
                index.put_setting(
                    POLICY_PREFIX + volume.encode(), json.dumps(policy, sort_keys=True).encode()
                )
                report.restored.append(f"{exc}; written again from the index's copy")
            else:
                report.damaged.append(str(exc))
            continue
        if setting.kind == "protected" and setting.snapshot in snapshots:
            index.put_setting(PROTECTED_PREFIX + str(setting.snapshot).encode(), b"")
        elif setting.kind == "policy" and setting.volume is not None:
            index.put_setting(
                POLICY_PREFIX + setting.volume.encode(),
                json.dumps(setting.policy, sort_keys=True).encode(),
            )


def _read_node(store: Store, index: Index, node_id: bytes) -> bytes | None:
    loc = index.location(node_id)
    return None if loc is None else store.read_at(node_id, loc)


def _drop_unreachable(
    store: Store,
    index: Index,
    nodes: set[bytes],
    entries: list[catalog.Entry],
    counts: Counter[bytes],
    report: RebuildReport,
    shared: bool = False,
) -> None:
    """Leave out the map nodes no snapshot's root reaches, uncounting their children.

    Such a node is garbage (nothing runs while the rebuild holds the repository), and
    gc may have collected its children already: counting them would make gc and verify
    fail on objects that are not there.  Only interior nodes are read for the walk
    (a few per thousand leaves); the dead ones are read again to uncount them.

    shared: writers on other hosts may be running, and their uncommitted nodes reach no
    root yet; gc elsewhere deletes a pack in which a cache places nothing at once.  So
    only the nodes that name an object not indexed (up the tree) are left out, their
    bytes still counted live in their packs (a leak, never a loss); the rest stay, at
    count 0 if nothing counts them, for gc's collection lists."""
    reached: set[bytes] = set()
    stack = [(e.info.map_root, e.info.map_height - 1) for e in entries]
    while stack:
        node, level = stack.pop()
        if node in reached or node not in nodes:
            continue
        reached.add(node)
        if level > 0:
            raw = _read_node(store, index, node)
            if raw is not None:
                stack.extend((child, level - 1) for child in node_children(raw))
    named: dict[bytes, list[bytes]] = {}
    unread: list[bytes] = []
    for node in sorted(nodes - reached):
        raw = _read_node(store, index, node)
        if raw is None:
            unread.append(node)
        else:
            named[node] = node_children(raw)
    dead = set(unread) | (_broken(index, named) if shared else set(named))
    for node in dead:
        counts.subtract(named.get(node, ()))
    for object_id in [k for k, n in counts.items() if n <= 0]:
        del counts[object_id]
    index.forget_objects(sorted(dead), keep_live=shared)
    report.garbage += len(dead)


def _broken(index: Index, named: dict[bytes, list[bytes]]) -> set[bytes]:
    """The nodes among named (node -> its children) that name an object the index lacks
    or another such node."""
    broken = {
        node for node, kids in named.items() if any(loc is None for loc in index.locations(kids))
    }
    grew = bool(broken)
    while grew:
        grew = False
        for node, kids in named.items():
            if node not in broken and any(kid in broken for kid in kids):
                broken.add(node)
                grew = True
    return broken


def _note_collections(store: Store, index: Index, report: RebuildReport) -> None:
    """Mark in the new index what the lists of a shared store collected and deleted, and
    what those under way condemn (GcIndex.note_lists), before any pack is indexed: a copy
    collected in a pack that lives on would otherwise be indexed again, and a condemned
    one may take the place of the copy a writer stored since; following the list would
    then take that place away (store/collection.py).  A damaged list is reported (the
    copies it names may be indexed again); one of a newer format stops the rebuild."""
    lists = []
    for seq, name in collection.listed(store.backend).items():
        try:
            lst = collection.read(store.backend, seq, name)
        except IntegrityError as exc:
            report.damaged.append(str(exc))
            continue
        if lst is not None:
            lists.append(lst)
    index.note_lists(lists)


def index_missing(path: str, *, objects_elsewhere: bool = False) -> bool:
    """Whether path is a repository whose index directory is gone (deleted, or lost with
    a host's disk) and not about to be swapped in: a rebuild brings it back.
    objects_elsewhere: the objects (the config among them) are in an injected backend,
    and path is only the directory of the index and host-local state."""
    return (
        (objects_elsewhere or os.path.isfile(os.path.join(path, CONFIG_NAME)))
        and os.path.isdir(path)
        and not os.path.exists(os.path.join(path, "index", "data.mdb"))
        and not os.path.exists(os.path.join(path, REBUILD_DIR, COMPLETE_MARK))
        and not on_read_only_filesystem(path)
    )


def rebuild_index(
    path: str,
    progress: ProgressCallback | None = None,
    *,
    backend: ObjectStore | None = None,
    locks: Locks | None = None,
    sessions: WriterSessions | None = None,
) -> RebuildReport:
    """Build the index at path afresh from the objects (backend, locks and sessions: as
    for Store; the store closes the backend when done)."""
    report = RebuildReport()
    with Store(path, exclusive=True, backend=backend, locks=locks, sessions=sessions) as store:
        old = _old_index(path, store.config.id)
        new_path = os.path.join(path, REBUILD_DIR)
        shutil.rmtree(new_path, ignore_errors=True)
        index = Index(new_path, create=True)
        index.keep_spares = store.shared
        session = None
        try:
            # On a shared store, gc elsewhere waits for this session: no list armed from
            # now on is carried out while the packs are indexed.  Insurance only (the
            # marks noted below keep the rebuild right without it): credentials that may
            # only read, or storage failing writes, rebuild without one.
            if store.shared:
                with contextlib.suppress(StoreError):
                    session = store.sessions.start()
            index.initialize(store.config.id)
            # The records before the packs: every pack a committed record names is
            # listed then (a writer on another host stores its packs before its record).
            found = _catalog(store, old.records, report)
            counts: Counter[bytes] = Counter()
            nodes: set[bytes] = set()
            done = 0
            listed: list[tuple[str, int, bytes]] = []
            for entry in store.backend.list("packs/"):
                try:
                    pack_id = bytes.fromhex(entry.name.rsplit("/", 1)[1])
                except ValueError:
                    report.damaged.append(f"{entry.name}: not a pack name")
                    continue
                listed.append((entry.name, entry.size, pack_id))
            if store.shared:  # after the listing: see GcIndex.note_lists
                _note_collections(store, index, report)
            named = [(name, size) for name, size, p in listed if not index.is_gone(p)]
            total = sum(size for _, size in named)
            for name, read in many_pack_contents(store.backend, store.hash, named):
                try:
                    size, good, children, damaged = read.result()
                except MissingObjectError:
                    if not store.shared:
                        raise
                    continue  # gc on another host deleted it since the listing
                pack_id = bytes.fromhex(name.rsplit("/", 1)[1])
                report.damaged += damaged
                # Counted only for nodes indexed from this pack, not for duplicate copies.
                for added in index.add_pack(pack_id, size, good):
                    kids = children.get(added)
                    if kids is not None:
                        nodes.add(added)
                        counts.update(kids)
                report.packs += 1
                report.objects += len(good)
                done += size
                if progress:  # bytes of packs read: packs differ widely in size
                    progress(Progress("packs", done, total, ProgressUnit.BYTES))
            entries = _valid(found, nodes, report)
            _drop_unreachable(
                store, index, nodes, [f.entry for f in entries], counts, report, store.shared
            )
            index.set_counts(counts)
            committed: set[str] = set()
            for item in entries:  # in each volume's order
                info = item.entry.info
                index.commit_snapshot(
                    info.volume,
                    info.block_size,
                    info.id,
                    item.body,
                    info.map_root,
                    item.entry.seq,
                )
                committed.add(info.id)
                report.snapshots += 1
                if item.restore is not None:
                    store.backend.put(
                        catalog.object_name(info.id),
                        catalog.frame(catalog.SNAPSHOT_MAGIC, item.body),
                    )
                    report.restored.append(f"{item.restore}; written again from the index's copy")
            _restore_settings(store, index, committed, old.policies, report)
            if not store.shared:
                report.garbage += index.forget_unreferenced()
            if session is not None and not session.valid():
                raise StoreError(
                    "the rebuilt index was not swapped in: this rebuild's session lapsed "
                    "(its heartbeat to the storage failed), so gc elsewhere may have "
                    "stopped waiting for it; run the repair again"
                )
        finally:
            if session is not None:
                session.end()
            index.close()
        open(os.path.join(new_path, COMPLETE_MARK), "wb").close()
        old_path = os.path.join(path, "index")
        trash = os.path.join(path, "index.old")
        shutil.rmtree(trash, ignore_errors=True)
        if os.path.exists(old_path):
            os.rename(old_path, trash)
        os.rename(new_path, old_path)
        shutil.rmtree(trash, ignore_errors=True)
    return report
