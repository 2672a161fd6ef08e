"""Garbage collection: delete what nothing refers to, compact sparse packs, report bytes freed.

Three steps, each safe to interrupt at any instant (kill -9 included):

1. The index's catalog is brought up to date with the snapshot records and tombstones
   (Store.sync_catalog), so that a snapshot committed by a writer that died before its
   index step counts its root before anything is collected.  Writers that died (their
   session is not alive) are then cleaned up exactly: every object named by one of
   their intents that is not part of the repository (a pack not indexed, a record a
   tombstone names or that landed after its deadline, one a compaction meant to delete)
   is deleted, a removal that never wrote its tombstone is called off, and the writer
   leaves the registry.  Record objects of removed snapshots that a prune could not
   delete go too.  A record that landed after its deadline goes only this way, named by
   its writer's intent: one late for another reason (a store copied object by object
   has new modification times) is left for people to judge.
2. Objects whose reference count is 0 since before the start of every live writer (see
   store/index.py) are deleted from the index, in batches; a deleted map node decrements
   its children in the same transaction, so whole trees go in one run when no writer is
   running, and level by level as writers come and go otherwise.  The walk covers only
   the unreferenced objects, so its cost follows what was pruned, not the repository.
3. Packs that lost live bytes are looked at: an empty one is deleted, and one whose live
   fraction is below the threshold has its live records copied verbatim into new packs
   first (map nodes and data blocks into packs of their own kind).
   Index entries move in the transaction that retires the old pack; a reader that looked
   up the old place retries once (Store.read_object).

On a store that hosts share (S3) gc holds the maintenance lease (store/objectlocks.py),
which prune holds as well, and checks that it still holds it before every step that
deletes.  Each host's cache has its own registry, which other hosts' writers are not
in, so step 2 goes in two phases through collection lists (store/collection.py): the
objects at count 0 are published as candidates, the writers then alive are waited for
(this run or a later one), and only then, after a sync that counts what they committed,
do the candidates still at count 0 leave the index.  Each run first publishes an empty
list (a fence) so that no list a gc that lost the lease publishes late lands after this
run's work.  Step 3 deletes only the packs in which nothing is placed any more: moving
live records would leave other caches placing them in deleted packs (compaction across
hosts is a next step).

A full reconciliation (full=True, gc --full) lists the whole store once, which steady
gc never does: on a shared store it also reclaims what writers of hosts that never came
back left, packs no snapshot uses and unfinished uploads, through a collection list
(store/collection.py); on a local repository, where the registry names every writer's
objects, it indexes a pack that is neither indexed nor any writer's (a repository copied
mid-write, an index lost), so that its garbage is collected.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from blocksnap.blockmap import node_children
from blocksnap.errors import (
    BlocksnapError,
    IntegrityError,
    LockedError,
    MissingObjectError,
    ObjectExistsError,
    UsageError,
)
from blocksnap.model import Progress, ProgressCallback, ProgressUnit
from blocksnap.store import catalog, collection, sync
from blocksnap.store.entries import SEQ, Location
from blocksnap.store.objectlocks import ObjectSessions
from blocksnap.store.packindex import many_tocs
from blocksnap.store.packs import (
    KIND_BLOCK,
    KIND_NODE,
    KINDS,
    PackBuilder,
    Record,
    overhead_size,
    pack_name,
    walk_pack,
)
from blocksnap.store.records import open_record
from blocksnap.store.repository import Store
from blocksnap.store.writer import Registration

DEFAULT_COMPACT_BELOW = 0.8  # compact a pack once more than a fifth of it is garbage
_BATCH = 512
_MAX_LEVELS = 16  # lists one run carries out at most: a map's height is far below


@dataclass(slots=True)
class GcReport:
    objects_deleted: int = 0
    packs_deleted: int = 0  # emptied or compacted away
    packs_compacted: int = 0  # of those, the ones whose live records were copied
    packs_written: int = 0
    bytes_copied: int = 0  # record bytes copied into new packs
    bytes_freed: int = 0  # storage given back: packs and leftovers deleted, less new packs
    leftovers_deleted: int = 0  # objects of writers that died
    orphan_packs: int = 0  # of packs_deleted: packs no snapshot or writer had (--full)
    unfinished_discarded: int = 0  # unfinished writes of writers that died (--full)
    dead_writers: int = 0
    live_writers: int = 0
    unreferenced_left: int = 0  # kept because a running writer may still refer to them
    lists_published: int = 0  # collection lists written (a shared store only)
    waiting_writers: int = 0  # writers a list waits for (a shared store only)
    problems: list[str] = field(default_factory=list)


def collect_garbage(
    store: Store,
    *,
    compact_below: float = DEFAULT_COMPACT_BELOW,
    full: bool = False,
    progress: ProgressCallback | None = None,
) -> GcReport:
    """Run one garbage collection over the whole repository (one gc at a time); full:
    reconcile with a listing of the whole store as well (see the module doc)."""
    if not 0.0 <= compact_below <= 1.0:
        raise UsageError(f"compaction threshold {compact_below} is not between 0 and 1")
    report = GcReport()
    say: Callable[[Progress], None] = progress or (lambda _p: None)
    with store.lock_gc(), store.register() as me:
        if store.shared:
            _fence(store)
        # On a shared store: the lists whose writers are gone, found before the sync that
        # takes in what those writers committed (store/collection.py).
        ready = _ready_lists(store, report, me.id) if store.shared else []
        synced = store.sync_catalog()
        report.problems += synced.problems
        blocking = [f"snapshot {s}" for s in synced.blocking]
        if full and synced.unaccounted:
            # A record that could not be indexed may name packs that would look orphaned
            # (a damaged policy, say, names none: it does not hold the reconciliation).
            report.problems.append(
                "the full reconciliation was skipped while records stand unindexed (see above)"
            )
            full = False
        # The epoch is read before the registry: a writer missing from the registry read
        # registered after it, so its epoch exceeds this one and the limit below.
        epoch = store.index.epoch()
        live, dead = store.writer_status()
        live.pop(me.id, None)
        report.live_writers = len(live)
        report.dead_writers = len(dead)
        for writer_id in dead:
            try:
                _clean_dead_writer(store, writer_id, report)
            except BlocksnapError as exc:  # it stays registered, its epoch in the limit
                report.problems.append(f"a writer that died stays registered: {exc}")
                blocking.append(f"writer {writer_id.hex()}")
        store.sweep_orphan_locks()
        _end_abandoned_removals(store)
        _delete_removed_records(store, me, report)
        if blocking:
            # A committed snapshot the index could not take in may have its blocks at
            # count 0: collecting anything now could delete them.
            report.problems.append(
                "nothing was collected while these stand unindexed: "
                + ", ".join(blocking)
                + " (see above); gc collects once they are indexed"
            )
            report.unreferenced_left = store.index.unreferenced_count()
            return report
        # Every live writer registered before the registry read is in live; any that
        # registers later gets an epoch above `epoch`, so it revives (Index.claim) before
        # using anything collectable below, and collect re-checks that in its transaction.
        limit = min((int(w["epoch"]) for w in live.values()), default=epoch + 1)
        try:
            if store.shared:
                counted_all = not synced.unaccounted
                _collect_shared(
                    store, me.id, ready, limit, report, say, full=full, counted_all=counted_all
                )
            else:
                strays = _index_strays(store, report) if full else []
                _collect(store, limit, report, say)
                _compact(store, me, compact_below, report, say)
                report.orphan_packs += sum(not store.index.has_pack(p) for p in strays)
        except BaseException:
            # A pack put or deleted by a step that raised may still exist unindexed (a
            # delete that failed, a put whose answer was lost): the intents stay, and the
            # next gc finishes the work as for a writer that was killed.
            me.keep_intents()
            raise
        report.unreferenced_left = store.index.unreferenced_count()
    return report


def _clean_dead_writer(store: Store, writer_id: bytes, report: GcReport) -> None:
    removing = store.index.removing()
    for name in store.index.intents_of(writer_id):
        snapshot_id = catalog.id_of(name)
        if name.startswith("packs/"):
            keep = store.index.has_pack(bytes.fromhex(name.rsplit("/", 1)[-1]))
        elif name.startswith(catalog.SNAPSHOTS) and snapshot_id is not None:
            # One never written may have left an unfinished write, which the delete takes.
            keep = _standing_record(store, name, snapshot_id, report)
        elif name.startswith(catalog.TOMBSTONES) and snapshot_id is not None:
            # A removal: done if its tombstone exists (the sync above applied it),
            # else it never happened and the snapshot stays.
            keep = store.exists(name)
            if not keep and removing.get(snapshot_id) == writer_id:
                store.index.unmark_removing(snapshot_id, marked_by=writer_id)
        else:
            keep = False
        if keep:  # a write killed between linking it and removing its temporary file
            store.backend.discard_partial(name)
        if not keep:
            store.confirm_gc()
            try:
                size = store.backend.stat(name).size
            except MissingObjectError:
                size = 0
            store.backend.delete(name)
            report.leftovers_deleted += 1
            report.bytes_freed += size
    store.forget_writer(writer_id)


def _standing_record(store: Store, name: str, snapshot_id: str, report: GcReport) -> bool:
    """Whether a dead writer's record is a snapshot: it exists, no tombstone names it and
    it landed by its deadline (store/catalog.py).  One that the sync above did not cache
    (it appeared after the listing) is cached now, before the writer's epoch stops
    keeping its blocks; one that cannot be cached raises, so the writer stays
    registered."""
    try:
        mtime = store.backend.stat(name).mtime
    except MissingObjectError:
        return False
    if store.exists(catalog.tombstone_name(snapshot_id)):
        return False
    if store.index.snapshot_record(snapshot_id) is not None:
        return True
    try:
        entry, body = catalog.read_record(store.backend.get, snapshot_id)
    except MissingObjectError:
        return False
    except IntegrityError as exc:  # damaged: no one can read that snapshot
        report.problems.append(f"snapshot {snapshot_id} cannot be indexed: {exc}")
        return True
    if entry.late(mtime):
        return False
    try:
        sync.cache_entry(store.index, entry, body)
    except BlocksnapError as exc:
        if not sync.lasting_fault(store.index, entry):
            raise
        report.problems.append(f"snapshot {snapshot_id} cannot be indexed: {exc}")
    return True


def _end_abandoned_removals(store: Store) -> None:
    """Removal marks whose writer left the registry without its intents (its step after
    the tombstone's put failed in a way it could not tell): done if the tombstone
    exists, called off if not, so that nothing stays unprotectable.  The marks are read
    before the registry, and the mark goes only if its writer is still unregistered in
    the transaction that removes it: a prune that registers and marks meanwhile keeps
    its mark."""
    marks = store.index.removing()
    registered = store.index.writers()
    for snapshot_id, writer_id in marks.items():
        if writer_id in registered:
            continue
        if store.exists(catalog.tombstone_name(snapshot_id)):
            store.index.remove_snapshot(snapshot_id)
        else:
            store.index.unmark_removing(snapshot_id, marked_by=writer_id, unregistered=True)


def _delete_removed_records(store: Store, me: Registration, report: GcReport) -> None:
    """Delete the record objects that tombstones name (a prune whose delete failed)."""
    tombstones = sync.listed_ids(store.backend, catalog.TOMBSTONES)
    for entry in store.backend.list(catalog.SNAPSHOTS):
        snapshot_id = catalog.id_of(entry.name)
        if snapshot_id is None or snapshot_id not in tombstones:
            continue
        intent = me.intent(entry.name)
        store.index.add_intent(intent)
        store.confirm_gc()
        store.backend.delete(entry.name)
        store.index.drop_intent(intent)
        report.leftovers_deleted += 1
        report.bytes_freed += entry.size


def _collect(store: Store, limit: int, report: GcReport, say: Callable[[Progress], None]) -> None:
    # Children released in a pass are keyed by the current epoch, which may sort before
    # the cursor among keys of the same epoch, so passes repeat until one frees nothing.
    progress = True
    while progress:
        progress = False
        after = b""
        while batch := store.index.condemned(limit, after, _BATCH):
            after = batch[-1][0]
            items: list[tuple[bytes, list[bytes]]] = []
            for key, loc in batch:
                children: list[bytes] = []
                if loc is not None and loc.kind == KIND_NODE:
                    object_id = key[8:]
                    try:
                        children = node_children(store.read_node(object_id, keep=False))
                    except BlocksnapError as exc:
                        # Its children's counts cannot be released: keep it, and say so.
                        report.problems.append(f"map node {object_id.hex()} kept: {exc}")
                        continue
                items.append((key, children))
            store.confirm_gc()
            deleted = len(store.index.collect(items, limit))
            report.objects_deleted += deleted
            progress = progress or deleted > 0
            say(Progress("collect", report.objects_deleted, 0, ProgressUnit.OBJECTS))


def _alive_writers(store: Store, me: bytes) -> list[bytes]:
    """The sessions alive now but this gc's own (its registration me, its lease): other
    hosts' and processes', and the writers registered by this process's other threads
    (injected local sessions mean one host: none)."""
    sessions = store.sessions
    if not isinstance(sessions, ObjectSessions):
        return []
    own = sessions.own() - set(store.index.writers()) | {me}
    return [s.id for s in sessions.listing() if s.alive and s.id not in own]


def _arm(store: Store, lst: collection.CollectionList, me: bytes) -> collection.CollectionList:
    """List into a published list the sessions that may have referred to its candidates
    before they could see it: every one alive now (see store/collection.py).  Returns
    the list as stored: another gc's, if one armed it first (a late write)."""
    lst.waiting_for = _alive_writers(store, me)
    lst.state = collection.ARMED
    store.confirm_gc()
    return _advance(store, lst)


def _advance(store: Store, lst: collection.CollectionList) -> collection.CollectionList:
    """Store the list's new state; the list as stored.  Another gc's state found there
    was written late by a gc that lost the lease: if this one lost it too, it stops
    (LockedError), else it goes by what it found."""
    stored = collection.advance(store.backend, lst)
    if stored is not lst:
        store.confirm_gc()
    return stored


def _ready_lists(store: Store, report: GcReport, me: bytes) -> list[collection.CollectionList]:
    """The lists under way whose waited-for writers are all gone; one a killed gc left
    pending is armed now (later is as safe: whoever it missed has ended)."""
    ready = []
    applied = store.index.collections_applied()  # every list up to it is done
    for seq, name in collection.listed(store.backend, applied).items():
        lst = collection.read(store.backend, seq, name)
        if lst is not None and lst.state == collection.PENDING:
            lst = _arm(store, lst, me)
        if lst is None or lst.state == collection.DONE:
            continue
        waiting = [w for w in lst.waiting_for if w != me and store.sessions.alive(w)]
        if waiting:
            report.waiting_writers = max(report.waiting_writers, len(waiting))
        else:
            ready.append(lst)
    return ready


def _collect_shared(
    store: Store,
    me: bytes,
    ready: list[collection.CollectionList],
    limit: int,
    report: GcReport,
    say: Callable[[Progress], None],
    *,
    full: bool,
    counted_all: bool,
) -> None:
    """Collection on a store that hosts share, in two phases (store/collection.py): the
    lists whose writers are gone are carried out; then the objects at count 0 go into a
    new list, carried out at once if no writer is alive, and so on down the trees.
    full: the first new list also names the orphans and unfinished writes found now.
    counted_all: the sync indexed every record, so a list may retire its orphans."""
    for lst in ready:
        _execute(store, lst, limit, report, retire=counted_all)
    found = _find_orphans(store, report) if full else None
    for _level in range(_MAX_LEVELS):
        store.follow_collections()  # the lists under way, this run's done
        candidates: list[bytes] = []
        condemned: list[tuple[bytes, bytes]] = []
        after = b""
        while batch := store.index.condemned(limit, after, 4096):
            after = batch[-1][0]
            for key, loc in batch:
                if key[8:] not in store.avoid:
                    candidates.append(key[8:])
                    if loc is not None:
                        condemned.append((key[8:], loc.pack))
        lst = collection.CollectionList(seq=0, candidates=candidates, condemned=condemned)
        if found is not None:
            lst.orphans, lst.unfinished, copies = found
            named = set(candidates)
            lst.candidates += list(dict.fromkeys(i for i, _ in copies if i not in named))
            lst.condemned += copies
            found = None
        if not (lst.candidates or lst.orphans or lst.unfinished):
            break
        _publish(store, lst)
        report.lists_published += 1
        lst = _arm(store, lst, me)
        if lst.state == collection.DONE:
            continue  # done by another gc first: followed on the next level
        if lst.waiting_for:
            report.waiting_writers = max(report.waiting_writers, len(lst.waiting_for))
            break
        # Every writer that could have referred to a candidate has ended, having
        # committed (if it did) before the listing: the sync counts what it committed.
        synced = store.sync_catalog()
        if synced.blocking:  # a snapshot not counted: the list waits for a later run
            report.problems += synced.problems
            break
        _execute(store, lst, limit, report, retire=not synced.unaccounted)
        say(Progress("collect", report.objects_deleted, 0, ProgressUnit.OBJECTS))
    _delete_empty_packs(store, report)


def _intended(store: Store) -> set[str]:
    """The names the writers registered in this cache are about to put or delete."""
    return {
        name for writer_id in store.index.writers() for name in store.index.intents_of(writer_id)
    }


def _find_orphans(
    store: Store, report: GcReport
) -> tuple[list[bytes], list[str], list[tuple[bytes, bytes]]]:
    """The packs in storage that this cache, just synced, does not know and that no
    writer registered here is writing, the names with unfinished writes, and the copies
    (id, orphan) of the orphans' records: a full listing of packs/ and of the unfinished
    writes.  An orphan whose table of contents cannot be read stays (its records go
    unnamed)."""
    listed = store.listed_packs()
    unfinished = store.backend.leftovers()
    intended = _intended(store)  # after the listings: see _index_strays
    _delete_gone_packs(store, listed, report)
    unknown = {
        p: size
        for p, size in listed.items()
        if pack_name(p) not in intended
        and not store.index.has_pack(p)
        and not store.index.is_gone(p)
    }
    unfinished = [name for name in unfinished if name not in intended]
    orphans: list[bytes] = []
    copies: list[tuple[bytes, bytes]] = []
    for pack_id, _size, toc in many_tocs(store.backend, unknown):
        if isinstance(toc, MissingObjectError):
            continue  # deleted since the listing
        if isinstance(toc, BlocksnapError):
            report.problems.append(f"pack {pack_id.hex()} kept: {toc}")
            continue
        orphans.append(pack_id)
        copies += [(rec.id, pack_id) for rec in toc]
    return orphans, unfinished, copies


def _delete_gone_packs(store: Store, listed: dict[bytes, int], report: GcReport) -> None:
    """Delete the packs listed (id -> size) that a done list named deleted already (a gc
    killed before deleting them): every cache that follows forgets them and none
    indexes them again."""
    for pack_id, size in listed.items():
        if store.index.is_gone(pack_id):
            store.confirm_gc()
            store.backend.delete(pack_name(pack_id))
            report.packs_deleted += 1
            report.bytes_freed += size


def _index_strays(store: Store, report: GcReport) -> list[bytes]:
    """On a local repository: index the packs in storage that neither the index nor any
    registered writer's intent names (see the module doc).  The listing comes before
    the intents: a writer names its pack in an intent before creating it, and clears the
    intent as it indexes the pack, so one it still writes is seen in one or the other."""
    listed = store.unknown_packs()
    intended = _intended(store)
    strays = [p for p in listed if pack_name(p) not in intended and not store.index.has_pack(p)]
    if strays:
        report.problems += store.index_unknown_packs(strays)
    return strays


def _execute(
    store: Store, lst: collection.CollectionList, limit: int, report: GcReport, *, retire: bool
) -> None:
    """Carry out a list whose writers are gone: its candidates still at count 0 (since
    before every live writer here) and placed where it condemned them leave the index,
    or move to a spare copy (GcIndex.collect), the list naming the condemned copy
    collected either way.  The list says so first (more than
    was collected is safe: a cache that forgets a copy only stores it again), and with
    retire, names deleted its orphans that the index still lacks and no writer here
    writes, with their copies, before they are deleted: their records stay avoided up to
    that list.  Its unfinished writes are discarded."""
    items: list[tuple[bytes, list[bytes]]] = []
    copies: list[tuple[bytes, bytes]] = []
    nodes: dict[bytes, list[bytes]] = {}
    places: dict[bytes, bytes | None] = {}
    # A copy the list did not condemn was placed here since it was published (a pack
    # discovered, rebuilt or relocated into: maybe a writer's that started after it and
    # has not committed yet): not collected now.  Lists from before they named their
    # copies are taken as they are.
    condemned = set(lst.condemned) if lst.names_condemned else None
    for key, loc in store.index.unreferenced(lst.candidates):
        if SEQ.unpack(key[:8])[0] >= limit:
            continue  # revived or stored again since the list: not collected now
        if loc is not None and condemned is not None and (key[8:], loc.pack) not in condemned:
            continue
        places[key[8:]] = None if loc is None else loc.pack
        children: list[bytes] = []
        if loc is not None:
            copies.append((key[8:], loc.pack))
            if loc.kind == KIND_NODE:
                try:
                    children = node_children(store.read_node(key[8:], keep=False))
                except BlocksnapError as exc:
                    report.problems.append(f"map node {key[8:].hex()} kept: {exc}")
                    continue
                nodes[key[8:]] = children
        items.append((key, children))
    lst.state = collection.DONE
    lst.collected = copies
    orphans = _orphans_to_retire(store, lst, report) if retire else {}
    if lst.orphans and not retire:
        report.problems.append(
            f"{len(lst.orphans)} orphan packs kept while records stand unindexed (see "
            "above); a later gc --full reclaims them"
        )
    collecting = {object_id for object_id, _ in copies}
    sizes = _name_copies(store, lst, orphans, nodes, report, collecting)
    stored = _write_done(store, lst, nodes)
    if stored is not lst:
        # Another gc, which lost the lease to this one, finished the list first (its write
        # landed late): that list is the one every cache follows.
        _carry_out(store, stored, report)
        return
    for start in range(0, len(items), _BATCH):
        store.confirm_gc()
        batch = items[start : start + _BATCH]
        report.objects_deleted += len(store.index.collect(batch, limit, places))
    _discard_unfinished(store, lst, report)
    _delete_named_packs(store, sizes, report)
    report.orphan_packs += len(sizes)


def _discard_unfinished(store: Store, lst: collection.CollectionList, report: GcReport) -> None:
    for name in lst.unfinished:
        store.confirm_gc()
        try:
            store.backend.discard_partial(name)
        except BlocksnapError as exc:
            report.problems.append(f"unfinished write of {name} kept: {exc}")
            continue
        report.unfinished_discarded += 1


def _orphans_to_retire(
    store: Store, lst: collection.CollectionList, report: GcReport
) -> dict[bytes, int]:
    """The list's orphans (id -> size) still unknown to the index after the sync that
    counted what its waited-for writers committed, and not being written here."""
    intended = _intended(store)
    orphans: dict[bytes, int] = {}
    for pack_id in lst.orphans:
        if store.index.has_pack(pack_id) or pack_name(pack_id) in intended:
            continue  # a snapshot that a waited-for writer committed uses it
        try:
            orphans[pack_id] = store.backend.stat(pack_name(pack_id)).size
        except MissingObjectError:
            continue  # gone already
        except BlocksnapError as exc:
            report.problems.append(f"pack {pack_id.hex()} kept: {exc}")
    return orphans


def _write_done(
    store: Store, lst: collection.CollectionList, nodes: dict[bytes, list[bytes]]
) -> collection.CollectionList:
    """Store a list done, the children of the map nodes it collects first (only the lease
    holder writes under gc/); returns the list as stored (another gc's, if it was first)."""
    store.confirm_gc()
    if nodes:
        lst.nodes = collection.write_nodes(store.backend, lst.seq, nodes)
    return _advance(store, lst)


def _fence(store: Store) -> None:
    """Take the next seq with an empty done list, before this run reads or writes any
    list: a list that a gc which lost the lease publishes late was numbered before it,
    so it finds its seq taken (store/collection.py).  One that landed first is read as
    any other."""
    for _attempt in range(3):
        fence = collection.CollectionList(seq=_next_seq(store), state=collection.DONE)
        store.confirm_gc()
        try:
            collection.publish(store.backend, fence)
            return
        except ObjectExistsError:
            continue  # a late list landed just now: after it
    raise LockedError("collection lists are being published by another gc: try again later")


def _next_seq(store: Store) -> int:
    seqs = collection.listed_seqs(store.backend)
    return (seqs[-1] if seqs else 0) + 1


def _publish(
    store: Store, lst: collection.CollectionList, nodes: dict[bytes, list[bytes]] | None = None
) -> None:
    """Publish a new list at the next seq (pending, or done with the children of the map
    nodes it collects).  After this run's fence no other gc takes a seq: one taken means
    maintenance runs elsewhere (the list is not published again with another seq, as it
    was computed without the one that took it)."""
    lst.seq = _next_seq(store)
    store.confirm_gc()
    if nodes:
        lst.nodes = collection.write_nodes(store.backend, lst.seq, nodes)
    try:
        collection.publish(store.backend, lst)
    except ObjectExistsError:
        raise LockedError(
            f"collection list {lst.seq} was published by another gc as this one published "
            "it: maintenance runs elsewhere"
        ) from None


def _carry_out(store: Store, lst: collection.CollectionList, report: GcReport) -> None:
    """Carry out a done list another gc stored: the index follows it, then what it names
    deleted and discarded goes."""
    store.follow_collections()
    sizes: dict[bytes, int] = {}
    for pack_id in lst.deleted_packs:
        try:
            sizes[pack_id] = store.backend.stat(pack_name(pack_id)).size
        except MissingObjectError:
            continue
    _discard_unfinished(store, lst, report)
    _delete_named_packs(store, sizes, report)


def _name_copies(
    store: Store,
    lst: collection.CollectionList,
    packs: dict[bytes, int],
    nodes: dict[bytes, list[bytes]],
    report: GcReport,
    collecting: frozenset[bytes] | set[bytes] = frozenset(),
) -> dict[bytes, int]:
    """Name in a done list the packs (id -> size) that will be deleted, with every copy
    they hold: where the object lives on elsewhere (relocated), or that it is gone
    (collected: also those the list collects now, collecting), so that no cache keeps a
    place in them, and what their collected map nodes name (nodes).  Returns the packs
    named, with their sizes; one whose table of contents cannot be read, or in which the
    index still places something, is kept."""
    named: dict[bytes, int] = {}
    for pack_id, size, toc in many_tocs(store.backend, packs):
        if isinstance(toc, MissingObjectError):
            toc = []  # gone already
        elif isinstance(toc, BlocksnapError):
            report.problems.append(f"pack {pack_id.hex()} kept: {toc}")
            continue
        places = [
            None if rec.id in collecting else loc
            for rec, loc in zip(toc, store.index.locations([r.id for r in toc]), strict=True)
        ]
        if any(loc is not None and loc.pack == pack_id for loc in places):
            # Its live count is wrong: something is placed in it.  Keep it.
            report.problems.append(f"pack {pack_id.hex()} kept: it holds live records")
            continue
        gone = [rec for rec, loc in zip(toc, places, strict=True) if loc is None]
        nodes.update(_children_in(store, pack_id, size, gone))
        for rec, loc in zip(toc, places, strict=True):
            if loc is None:
                lst.collected.append((rec.id, pack_id))
            else:
                lst.relocated.append((rec.id, pack_id, loc))
        lst.deleted_packs.append(pack_id)
        named[pack_id] = size
    return named


def _delete_named_packs(store: Store, sizes: dict[bytes, int], report: GcReport) -> None:
    """Delete the packs a done list (stored) named deleted, then forget them.  A gc
    killed between leaves packs named deleted that still exist: storage lost until a
    reconciliation (gc --full), never an object."""
    for pack_id in sizes:
        store.confirm_gc()
        store.backend.delete(pack_name(pack_id))
        report.packs_deleted += 1
        report.bytes_freed += sizes[pack_id]
    if sizes:
        store.index.forget_packs(list(sizes))


def _delete_empty_packs(store: Store, report: GcReport) -> None:
    """Delete the packs in which the index places nothing, through a done list of their
    own (_name_copies)."""
    sparse = store.index.sparse_packs()
    # Moving live records would leave other caches placing them in deleted packs:
    # partly live packs stay as they are (compaction is a next step of issue 17).
    store.index.unmark_sparse([p for p, info in sparse.items() if int(info.get("live", 0)) > 0])
    empty = {p: int(info["size"]) for p, info in sparse.items() if int(info.get("live", 0)) <= 0}
    done = collection.CollectionList(seq=0, state=collection.DONE)
    nodes: dict[bytes, list[bytes]] = {}
    sizes = _name_copies(store, done, empty, nodes, report)
    if not sizes:
        return
    _publish(store, done, nodes)
    report.lists_published += 1
    _delete_named_packs(store, sizes, report)


def _children_in(
    store: Store, pack_id: bytes, size: int, gone: list[Record]
) -> dict[bytes, list[bytes]]:
    """What the map nodes among a pack's collected records name, for caches that still
    count them (store/collection.py), from one read of the pack (nodes have packs of
    their own).  A node that cannot be read is left out: those caches keep its children
    counted, a leak, never a loss."""
    wanted = [rec for rec in gone if rec.kind == KIND_NODE]
    if not wanted:
        return {}
    name = pack_name(pack_id)
    try:
        data = store.backend.get(name, 0, size)
    except BlocksnapError:
        return {}
    out: dict[bytes, list[bytes]] = {}
    for rec in wanted:
        loc = Location(pack_id, rec.offset, rec.stored_size, rec.raw_size, rec.kind, rec.codec)
        where = f"map node {rec.id.hex()} in pack {pack_id.hex()}"
        with contextlib.suppress(BlocksnapError):
            raw = open_record(data[rec.offset : rec.end], rec.id, loc, store.hash, where)
            out[rec.id] = node_children(raw)
    return out


def _compact(
    store: Store,
    me: Registration,
    compact_below: float,
    report: GcReport,
    say: Callable[[Progress], None],
) -> None:
    sparse = store.index.sparse_packs()
    todo: list[tuple[bytes, int]] = []
    fine: list[bytes] = []
    for pack_id, info in sparse.items():
        payload = int(info["size"]) - overhead_size(int(info.get("records", 0)))
        live = int(info.get("live", 0))
        if live <= 0 or payload <= 0 or live / payload < compact_below:
            todo.append((pack_id, int(info["size"])))
        else:
            fine.append(pack_id)  # looked at again once it loses more
    store.index.unmark_sparse(fine)

    # Copies of map nodes and of data blocks go to new packs of their own kind.
    builders = {kind: PackBuilder() for kind in KINDS}
    moves: dict[int, dict[bytes, tuple[bytes, int]]] = {kind: {} for kind in KINDS}
    retire: dict[bytes, list[tuple[bytes, int]]] = {}
    sizes: dict[bytes, int] = {}

    def finish() -> None:
        nonlocal retire
        # One transaction per new pack; the old packs are retired by the last, once
        # every copy is indexed (a crash between leaves them indexed, for the next gc).
        kinds = [kind for kind in KINDS if builders[kind].records] or [KIND_BLOCK]
        for k, kind in enumerate(kinds):
            builder = builders[kind]
            new_pack = None
            new_intent = None
            if builder.records:
                pack_id = secrets.token_bytes(16)
                name = pack_name(pack_id)
                new_intent = me.intent(name)
                store.index.add_intent(new_intent)
                builder.seal()
                store.backend.put(name, builder.buffer)
                new_pack = (pack_id, builder.size, builder.records)
                report.packs_written += 1
                report.bytes_copied += builder.records_size
                report.bytes_freed -= builder.size
            last = k == len(kinds) - 1
            retired = store.index.move_records(
                new_pack,
                moves[kind],
                retire if last else {},
                (new_intent, lambda p: me.intent(pack_name(p))),
            )
            for pack_id in retired:
                store.confirm_gc()
                store.backend.delete(pack_name(pack_id))
                store.index.drop_intent(me.intent(pack_name(pack_id)))
                report.packs_deleted += 1
                report.bytes_freed += sizes[pack_id]
                if any(p == pack_id for m in moves.values() for p, _ in m.values()):
                    report.packs_compacted += 1
        for kind in KINDS:
            builders[kind], moves[kind] = PackBuilder(), {}
        retire = {}

    for done, (pack_id, size) in enumerate(todo, 1):
        sizes[pack_id] = size
        name = pack_name(pack_id)
        try:
            data = store.backend.get(name)
            walk = walk_pack(data, pack_id.hex())
        except BlocksnapError as exc:
            report.problems.append(f"pack {pack_id.hex()} not compacted: {exc}")
            continue
        # A pack whose table of contents is damaged may hold records the scan missed:
        # its live records are copied, but the pack itself is kept.
        intact = walk.complete
        if not intact:
            report.problems += [f"pack {pack_id.hex()} not compacted: {e}" for e in walk.problems]
        records = walk.records
        locations = store.index.locations([rec.id for rec, _ in records])
        contents = []
        for (rec, error), loc in zip(records, locations, strict=True):
            contents.append((rec.id, rec.offset))
            if loc is None or (loc.pack, loc.offset) != (pack_id, rec.offset):
                continue  # garbage
            if error is not None:
                intact = False
                report.problems.append(f"pack {pack_id.hex()} not compacted: {error}")
                continue
            builders[rec.kind].add(data[rec.offset : rec.end])
            moves[rec.kind][rec.id] = (pack_id, rec.offset)
        if intact:
            retire[pack_id] = contents
        if any(b.size >= store.config.pack_target_size for b in builders.values()):
            finish()
        say(Progress("compact", done, len(todo), ProgressUnit.PACKS))
    if any(moves.values()) or retire:
        finish()
