"""Bringing the index up to date with the objects: snapshots committed or removed without
it, and the settings.

The objects are the truth and the index their cache (store/__init__.py).  sync() runs
when a repository is opened for writing, in every writer before it chooses a parent and
a place in the volume's order, and first in gc.  It

- forgets every cached snapshot that a tombstone names (a removal killed after its
  tombstone, or, later, made by another host);
- caches every record that no tombstone names and the index lacks (a commit whose index
  step failed or was killed), after a stat of its tombstone, since a listing may lag
  behind a removal; when the record is the one of the run that the volume's checkpoint
  belongs to (the same start time and parent), the checkpoint goes in the same
  transaction, as the run's own commit would have dropped it;
- brings protections and policies in line with their objects (a protect, unprotect or
  policy change killed between its object and its index step).

A record whose object landed after the deadline it carries (store/catalog.py's
commit_by: a put that a retry, a proxy or a busy server held past its session's
validity) is no snapshot: sync leaves it out and counts it nowhere else (verify lists
it; the gc of its writer's host deletes it and reclaims its packs, as an interrupted
writer's).

On a store that hosts share (S3), a record another host committed names a map root in
packs this host's index has never seen.  Such a record names the packs its run wrote,
and sync indexes those it lacks from their tables of contents (store/packindex.py)
before it caches the record; should the root still be missing (the run referred to
packs another run of its host wrote and no record named yet), every pack the index
lacks is indexed, once per sync.

What it cannot do is reported, never raised, so that one bad object does not stop every
command.  A record that exists and could not be cached for a passing reason (storage
unreachable, a format this blocksnap does not read) is also named in `blocking`: gc
collects nothing while there is one, since the blocks of that snapshot may be
unreferenced in the index.  One that is damaged, or names a root that is not there or a
block size its volume does not have, is only reported: keeping every block would not
mend it.  The next commit of a volume is ordered after every record of it that could
be read (`pending_seq`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blocksnap.errors import BlocksnapError, IntegrityError, MissingObjectError
from blocksnap.store import catalog
from blocksnap.store.backend import ObjectStore
from blocksnap.store.entries import POLICY_PREFIX, PROTECTED_PREFIX
from blocksnap.store.index import Index


@dataclass(slots=True)
class SyncReport:
    cached: list[str] = field(default_factory=list)  # snapshots brought into the index
    forgotten: list[str] = field(default_factory=list)  # removed snapshots taken out
    settings: int = 0  # protections and policies brought in line
    problems: list[str] = field(default_factory=list)
    # Of problems, those that may leave packs the index does not account for (a record
    # not cached, a pack not read): what a reconciliation of packs must wait for.
    unaccounted: list[str] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)  # records that stand, not cached
    pending_seq: dict[str, int] = field(default_factory=dict)  # volume -> their highest seq

    def unaccount(self, problem: str) -> None:
        """Note a problem that may leave packs unaccounted for."""
        self.problems.append(problem)
        self.unaccounted.append(problem)


def exists(backend: ObjectStore, name: str) -> bool:
    """Whether the object is there (a stat, not a listing, which may lag)."""
    try:
        backend.stat(name)
    except MissingObjectError:
        return False
    return True


def sync(
    backend: ObjectStore,
    index: Index,
    discover: Callable[[Sequence[bytes] | None], list[str]] | None = None,
    listed: Callable[[], None] | None = None,
) -> SyncReport:
    """Bring index up to date with the objects in backend (see the module doc).
    discover: on a store that hosts share, indexes the packs this index does not know,
    those given or else every one (returning what it could not read), for a record whose
    map root is not indexed: a snapshot another host committed.  listed: called once the
    records and tombstones are listed, before the index changes."""
    report = SyncReport()
    listed_all = discover is None
    records = listed_times(backend, catalog.SNAPSHOTS)
    tombstones = listed_ids(backend, catalog.TOMBSTONES)
    if listed is not None:
        listed()
    cached = index.cached_snapshot_ids()
    for snapshot_id in sorted(tombstones & cached):
        try:
            if index.remove_snapshot(snapshot_id):
                report.forgotten.append(snapshot_id)
        except BlocksnapError as exc:
            report.problems.append(f"removed snapshot {snapshot_id} stays in the index: {exc}")
    for snapshot_id in sorted(records.keys() - tombstones - cached):
        try:
            if exists(backend, catalog.tombstone_name(snapshot_id)):
                continue  # a listing may lag behind a removal: never bring one back
            entry, body = catalog.read_record(backend.get, snapshot_id)
        except MissingObjectError:
            continue  # removed since the listing
        except IntegrityError as exc:  # damaged: nobody can read that snapshot
            report.unaccount(f"snapshot {snapshot_id} cannot be indexed: {exc}")
            continue
        except BlocksnapError as exc:  # unreadable now, or of a newer format: it stands
            report.unaccount(f"snapshot {snapshot_id} cannot be indexed: {exc}")
            report.blocking.append(snapshot_id)
            continue
        if entry.late(records[snapshot_id]):
            continue
        try:
            if discover is not None and index.location(entry.info.map_root) is None:
                found = discover(entry.packs) if entry.packs else []
                if not listed_all and index.location(entry.info.map_root) is None:
                    listed_all = True  # the run took objects from packs it did not write
                    found = discover(None)
                for problem in found:
                    report.unaccount(problem)
            if cache_entry(index, entry, body):
                report.cached.append(snapshot_id)
        except BlocksnapError as exc:
            report.unaccount(f"snapshot {snapshot_id} cannot be indexed: {exc}")
            # On a shared store a root not found may be in a pack not read yet: it stands.
            if discover is not None or not lasting_fault(index, entry):
                report.blocking.append(snapshot_id)
            volume = entry.info.volume
            report.pending_seq[volume] = max(report.pending_seq.get(volume, 0), entry.seq)
    _sync_settings(backend, index, report)
    return report


def lasting_fault(index: Index, entry: catalog.Entry) -> bool:
    """Whether a readable record cannot be cached for a fault of its own, which keeping
    every block would not mend: its map root is not in the index, or its volume has
    another block size.  Anything else (the index failing, say) may pass."""
    info = entry.info
    try:
        volume = index.volume(info.volume)
        return index.location(info.map_root) is None or (
            volume is not None and volume["block_size"] != info.block_size
        )
    except BlocksnapError:
        return False


def listed_ids(backend: ObjectStore, prefix: str) -> set[str]:
    """The snapshot ids that the objects listed under snapshots/ or tombstones/ name."""
    return set(listed_times(backend, prefix))


def listed_times(backend: ObjectStore, prefix: str) -> dict[str, float]:
    """The snapshot ids that the objects listed under snapshots/ or tombstones/ name,
    each with its object's modification time."""
    return {i: o.mtime for o in backend.list(prefix) if (i := catalog.id_of(o.name)) is not None}


def cache_record(backend: ObjectStore, index: Index, snapshot_id: str) -> bool:
    """Read a snapshot's record and cache it (see cache_entry)."""
    entry, body = catalog.read_record(backend.get, snapshot_id)
    return cache_entry(index, entry, body)


def cache_entry(index: Index, entry: catalog.Entry, body: bytes) -> bool:
    """Cache a committed snapshot that the index lacks, with its run's checkpoint going;
    False if it was cached already."""
    info = entry.info
    raw = index.checkpoint(info.volume)
    ours = False
    if raw is not None:
        try:
            checkpoint = catalog.decode_checkpoint(raw, f"checkpoint of {info.volume}")
            ours = (checkpoint.time, checkpoint.parent) == (info.time, info.parent)
        except BlocksnapError:
            ours = False  # a damaged checkpoint is refused when resumed
    return index.commit_snapshot(
        info.volume,
        info.block_size,
        info.id,
        body,
        info.map_root,
        entry.seq,
        drop_checkpoint=ours,
    )


def _sync_settings(backend: ObjectStore, index: Index, report: SyncReport) -> None:
    names = {o.name for o in backend.list(catalog.SETTINGS)}
    prefix = catalog.protected_name("")
    protected_objects = {
        n[len(prefix) :]
        for n in names
        if n.startswith(prefix) and catalog.SNAPSHOT_ID.fullmatch(n[len(prefix) :])
    }
    snapshots = index.cached_snapshot_ids()
    cached = {k.decode() for k in index.settings_with(PROTECTED_PREFIX)}
    for snapshot_id in sorted((protected_objects & snapshots) - cached):
        index.put_setting(PROTECTED_PREFIX + snapshot_id.encode(), b"")
        report.settings += 1
    for snapshot_id in sorted(cached - protected_objects):
        if not exists(backend, catalog.protected_name(snapshot_id)):
            index.delete_setting(PROTECTED_PREFIX + snapshot_id.encode())
            report.settings += 1
    policies = index.settings_with(POLICY_PREFIX)
    seen: set[bytes] = set()
    for name in sorted(n for n in names if n.startswith(catalog.SETTINGS + "policy-")):
        try:
            setting = catalog.decode_setting(backend.get(name), name)
        except MissingObjectError:
            continue
        except BlocksnapError as exc:  # the index keeps what it has
            report.problems.append(str(exc))
            continue
        if setting.volume is None:
            continue
        key = setting.volume.encode()
        seen.add(key)
        value = json.dumps(setting.policy, sort_keys=True).encode()
        if policies.get(key) != value:
            index.put_setting(POLICY_PREFIX + key, value)
            report.settings += 1
    for key in sorted(set(policies) - seen):
        if not exists(backend, catalog.policy_name(key.decode())):
            index.delete_setting(POLICY_PREFIX + key)
            report.settings += 1
