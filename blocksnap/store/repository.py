"""The open repository: verified reads, the catalog and settings, and its writers.

The package doc (store/__init__.py) gives the layout and which state is truth, cache and
host-local.  Store takes the backend, the locks and the writer sessions injected (the
defaults are the local ones on this directory), so an object store can hold the
objects while the index and host-local state stay in a local directory.

Crash safety comes from ordering.  A pack is durable (fsync of file and directory)
before the index transaction that refers to it commits.  A snapshot's packs are durable
and indexed before its record object is created, and that creation (create-if-absent)
commits the snapshot; the index transaction after it only caches it.  Removing a
snapshot creates its tombstone first, then uncaches it, then deletes its record.
Anything a killed writer leaves (temporary files, packs no committed snapshot refers
to, a record a tombstone names) is ignored by readers, reported by verify and reclaimed
by gc, which also caches what a writer committed and could not cache.  The same holds
when the step after an object's put fails rather than the process: the writer keeps its
intents, and gc deals with them as for a killed writer.

A repository on a read-only filesystem (an off-site copy, a filesystem snapshot) is
opened for reading only: the shared lock is taken on an O_RDONLY descriptor, the index
is opened read-only without LMDB's lock file (which cannot be written there, and is not
needed where no process can write), and everything that would write (registering a
writer, locking a volume or gc, settings, repair) fails at once with a StoreError saying
so.  A read-only mount of a repository that is written through another mount is not
such a case: its readers have no LMDB reader slot, so use a writable path for those.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import blake3

from blocksnap import blockid
from blocksnap.blockmap import ZERO_ID, node_children
from blocksnap.errors import (
    BlocksnapError,
    IntegrityError,
    Interrupted,
    LockedError,
    MissingObjectError,
    NotFoundError,
    ObjectExistsError,
    ProtectedError,
    StoreError,
    TransientStoreError,
    UsageError,
)
from blocksnap.model import BLOCK_ID_SIZE, FILTER_DIGEST_SIZE, Checkpoint, SnapshotInfo
from blocksnap.store import catalog, collection, nodecache, reads, records, sync
from blocksnap.store import index as index_module
from blocksnap.store.backend import LocalBackend, ObjectStore
from blocksnap.store.config import read_config
from blocksnap.store.entries import POLICY_PREFIX, PROTECTED_PREFIX, Location
from blocksnap.store.index import Index
from blocksnap.store.locks import (
    GC_LOCK,
    REPOSITORY_LOCK,
    Deadline,
    LocalLocks,
    LocalSessions,
    Locks,
    WriterSessions,
)
from blocksnap.store.objectlocks import ObjectLocks, ObjectSessions
from blocksnap.store.packindex import many_pack_contents
from blocksnap.store.packs import HEADER_SIZE, KIND_BLOCK, KIND_NODE, Record, pack_name
from blocksnap.store.writer import Registration, StoreWriter

_SNAPSHOT_NAME = re.compile(r"latest(?:~(\d+))?")

# Private top-level entries of the repository directory: host-local state, no objects.
LOCAL_STATE = ("lock", "locks", "index", "index.rebuild", "index.old")


def local_backend(path: str) -> LocalBackend:
    """The backend of a repository whose objects are in its own directory."""
    return LocalBackend(path, private=LOCAL_STATE)


def on_read_only_filesystem(path: str) -> bool:
    """Whether path is on a filesystem mounted read-only (a snapshot, an immutable copy)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_only_error(path: str) -> StoreError:
    return StoreError(
        f"repository {path} is on a read-only filesystem: only reading commands work there"
    )


def _finish_rebuild_swap(path: str) -> None:
    """If a rebuild was killed between its two renames, complete it (see store/rebuild.py)."""
    index = os.path.join(path, "index")
    rebuilt = os.path.join(path, "index.rebuild")
    if not os.path.exists(index) and os.path.exists(os.path.join(rebuilt, "COMPLETE")):
        with contextlib.suppress(FileNotFoundError):  # another process finished it first
            os.rename(rebuilt, index)


# A block map's leaf entry per block (a filter digest and an id); its inner nodes add 1/256.
MAP_BYTES_PER_BLOCK = FILTER_DIGEST_SIZE + BLOCK_ID_SIZE


class Store:
    """An open repository: the BlockSource for readers and the target of writers.

    path is the repository's local directory: the index and the host-local state (see
    the module doc), and with the default backend its objects too.  backend, locks and
    sessions are injected; each defaults to the local one on path, or, for a backend that
    is not local (capabilities.local false: S3), to the ones kept as objects in it
    (store/objectlocks.py), which hold across hosts.  The store owns the backend and
    what it made: close() closes them.
    """

    def __init__(
        self,
        path: str,
        *,
        exclusive: bool = False,
        backend: ObjectStore | None = None,
        locks: Locks | None = None,
        sessions: WriterSessions | None = None,
        node_cache_limit: int = nodecache.DEFAULT_LIMIT,
    ) -> None:
        self.path = path
        if not os.path.isdir(path):
            if not os.path.exists(path):
                raise NotFoundError(f"repository {path} does not exist")
            raise NotFoundError(f"{path} is not a blocksnap repository")
        # On a read-only filesystem nothing can write, so every reader opens the index
        # read-only and without LMDB's lock file, and what would write says why it cannot.
        self.read_only = on_read_only_filesystem(path)
        if exclusive and self.read_only:
            raise read_only_error(path)
        self.backend: ObjectStore = backend if backend is not None else local_backend(path)
        self._stack = contextlib.ExitStack()
        self._stack.callback(self.backend.close)
        self.shared = not self.backend.capabilities.local  # hosts share it: S3
        local_locks = LocalLocks(path, read_only=self.read_only)
        if self.shared and (locks is None) != (sessions is None):
            self._stack.close()
            raise UsageError("locks and writer sessions go together: pass both or neither")
        if self.shared and sessions is None:
            object_sessions = ObjectSessions(self.backend)
            self._stack.callback(object_sessions.close)  # before the backend closes
            sessions = object_sessions
            locks = ObjectLocks(self.backend, object_sessions, local_locks)
        self.locks: Locks = locks or local_locks
        self.sessions: WriterSessions = sessions or LocalSessions(path)
        self._index: Index | None = None
        # volume -> the highest seq of a record that stands and could not be cached
        self._pending_seq: dict[str, int] = {}
        # On a shared store: the candidates of the collection lists not yet carried out
        # (store/collection.py), which writers store again rather than refer to.
        self.avoid: frozenset[bytes] = frozenset()
        # The candidates of each list under way that a follow saw (seq -> ids), kept until
        # one sees it done: a follow from an older read never drops what a newer one saw.
        self._under_way: dict[int, frozenset[bytes]] = {}
        self._under_way_lock = threading.Lock()
        try:
            self.config = read_config(self.backend, path)
            if exclusive:  # a repair rewrites the index and deletes: it writes
                self.config.check_writable(path)
            self._stack.enter_context(
                self.locks.hold(
                    REPOSITORY_LOCK,
                    shared=not exclusive,
                    busy="repository is in use by another process"
                    if exclusive
                    else "repository is locked by a repair in progress",
                )
            )
            if not exclusive:
                if not self.read_only:
                    _finish_rebuild_swap(path)
                self._index = index_module.acquire(
                    os.path.join(path, "index"), read_only=self.read_only
                )
                self._index.keep_spares = self.shared
                try:
                    # A shared store's cache of the format before is rebuilt, unless
                    # only read (see store/index.py INDEX_FORMAT).
                    self._index.check_identity(
                        self.config.id, upgrade=not self.shared or self.read_only
                    )
                except BaseException:
                    index_module.release(self._index)
                    self._index = None
                    raise
        except BaseException:
            self._stack.close()
            raise
        self.hash: Callable[[bytes | memoryview], bytes] = blockid.hasher(self.config.block_id)
        # On object storage every node read is a request: this host keeps the nodes it
        # fetched, under a limit (store/nodecache.py); 0 keeps none.
        self.node_cache: nodecache.NodeCache | None = None
        if self.shared and not self.read_only:
            nodes = os.path.join(path, nodecache.DIRECTORY)
            if node_cache_limit > 0:
                self.node_cache = nodecache.NodeCache(nodes, node_cache_limit, self.hash)
            else:
                shutil.rmtree(nodes, ignore_errors=True)  # a cache of none holds none

    def require_writable(self) -> None:
        """Raise the one-line StoreError of a repository that cannot be written."""
        if self.read_only:
            raise read_only_error(self.path)
        self.config.check_writable(self.path)

    @property
    def index(self) -> Index:
        if self._index is None:
            raise StoreError("repository is closed")
        return self._index

    def close(self) -> None:
        if self._index is not None:
            index_module.release(self._index)
            self._index = None
        self._stack.close()  # the lock, then the backend

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------

    def read_object(self, object_id: bytes, kind: int = KIND_BLOCK, *, keep: bool = True) -> bytes:
        """Return an object's raw bytes, checked against its record checksum and its id.
        keep=False: a node read is not kept in the node cache (gc reading what it frees)."""
        return self._read_objects([object_id], kind, keep=keep)[object_id]

    def _read_objects(
        self, object_ids: Sequence[bytes], kind: int, *, keep: bool = True
    ) -> dict[bytes, bytes]:
        """Each object's raw bytes by id, checked as by read_object.  All are looked up in
        one index read, and records of one pack that lie close together are fetched by
        one ranged get (store/reads.py).  When gc has just moved objects to a compacted
        pack and deleted the old one, their lookup is repeated once.  Everything read is
        held in the result at once: callers bound the batch.  Map nodes come from the
        host's node cache where it holds them (store/nodecache.py), and those fetched go
        into it unless keep is False."""
        unique = list(dict.fromkeys(object_ids))
        found: dict[bytes, bytes] = {}
        # Looked up even when cached: an object the index no longer holds is missing.
        cache = self.node_cache if kind == KIND_NODE else None
        located = []
        for object_id, loc in zip(unique, self.index.locations(unique, strict=True), strict=True):
            if loc is None:
                raise MissingObjectError(f"object {object_id.hex()} is not in the index")
            raw = cache.get(object_id) if cache is not None else None
            if raw is not None:
                found[object_id] = raw
            else:
                located.append((object_id, loc))
        fetched = [object_id for object_id, _ in located]
        for extent in reads.plan(located):
            try:
                data = self.backend.get(pack_name(extent.pack), extent.offset, extent.length)
            except MissingObjectError:
                data = None  # handled below, so that what it raises does not chain to this
            if data is None:
                self._read_moved(extent, kind, found)
            else:
                self._decode_extent(extent, data, kind, found)
        if cache is not None and keep:
            for object_id in fetched:
                cache.put(object_id, found[object_id])
        return found

    def _read_moved(self, extent: reads.Extent, kind: int, found: dict[bytes, bytes]) -> None:
        """Read an extent's records again where the index says they are now: its pack
        was deleted after they were looked up.  A second miss is raised."""
        ids = [object_id for object_id, _ in extent.records]
        if self.shared and not self.read_only:
            # gc on another host may have deleted the pack, keeping copies elsewhere: its
            # collection list says where (store/collection.py).
            self.follow_collections()
        moved = []
        for (object_id, loc), now in zip(
            extent.records, self.index.locations(ids, strict=True), strict=True
        ):
            what = f"object {object_id.hex()}"
            if now is None:
                raise MissingObjectError(
                    f"{what} was removed while being read (its snapshot was pruned)"
                )
            if now == loc:
                raise MissingObjectError(f"{what}: pack {loc.pack.hex()} is missing")
            moved.append((object_id, now))
        for again in reads.plan(moved):
            data = self.backend.get(pack_name(again.pack), again.offset, again.length)
            self._decode_extent(again, data, kind, found)

    def _decode_extent(
        self, extent: reads.Extent, data: bytes, kind: int, found: dict[bytes, bytes]
    ) -> None:
        view = memoryview(data)
        for object_id, loc in extent.records:
            what = f"object {object_id.hex()}"
            found[object_id] = self._decode(object_id, kind, loc, extent.record(view, loc), what)

    def read_at(self, object_id: bytes, loc: Location) -> bytes:
        """Read an object from a location given by the caller (no index lookup), checked."""
        what = f"object {object_id.hex()}"
        data = self.backend.get(pack_name(loc.pack), loc.offset, HEADER_SIZE + loc.stored_size)
        return self._decode(object_id, loc.kind, loc, data, what)

    def _decode(
        self, object_id: bytes, kind: int, loc: Location, data: bytes | memoryview, what: str
    ) -> bytes:
        where = f"{what} in pack {loc.pack.hex()} at offset {loc.offset}"
        if loc.kind != kind:
            raise IntegrityError(f"{where}: the index holds it as another kind of object")
        return records.open_record(data, object_id, loc, self.hash, where)

    def read_block(self, block_id: bytes) -> bytes:
        return self.read_object(block_id, KIND_BLOCK)

    def read_blocks(self, block_ids: Sequence[bytes]) -> list[bytes]:
        """See BlockSource.read_blocks: one index read and one get per extent for all."""
        found = self._read_objects([i for i in block_ids if i != ZERO_ID], KIND_BLOCK)
        return [b"" if i == ZERO_ID else found[i] for i in block_ids]

    def read_node(self, node_id: bytes, *, keep: bool = True) -> bytes:
        return self.read_object(node_id, KIND_NODE, keep=keep)

    def keeps_map(self, block_count: int) -> bool:
        """Whether the node cache should keep the nodes of a map of block_count blocks
        (store/nodecache.py NodeCache.holds)."""
        cache = self.node_cache
        return cache is not None and cache.holds(block_count * MAP_BYTES_PER_BLOCK)

    def snapshot(self, snapshot_id: str) -> SnapshotInfo:
        record = self.index.snapshot_record(snapshot_id)
        if record is None:
            raise NotFoundError(f"snapshot {snapshot_id} does not exist")
        return catalog.decode(record, f"snapshot {snapshot_id}")

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's committed snapshots, oldest first."""
        return [
            catalog.decode(record, f"snapshot {snapshot_id}")
            for snapshot_id, record in self.index.snapshot_records(volume)
        ]

    def volumes(self) -> list[str]:
        return self.index.volume_names()

    def volume_block_size(self, volume: str) -> int | None:
        vol = self.index.volume(volume)
        return int(vol["block_size"]) if vol is not None else None

    def resolve(self, volume: str, name: str) -> SnapshotInfo:
        """A snapshot by id, unique id prefix, "latest" or "latest~N"."""
        ids = self.index.snapshot_ids(volume)
        if not ids:
            if self.index.volume(volume) is None:
                raise NotFoundError(f"volume {volume!r} does not exist")
            raise NotFoundError(f"volume {volume!r} has no snapshots")
        match = _SNAPSHOT_NAME.fullmatch(name)
        if match:
            back = int(match.group(1) or 0)
            if back >= len(ids):
                raise NotFoundError(f"{name}: volume {volume!r} has only {len(ids)} snapshots")
            return self.snapshot(ids[-1 - back])
        if not re.fullmatch(r"[0-9a-f]{1,32}", name):
            raise UsageError(f"{name!r} is not a snapshot id, prefix, latest or latest~N")
        found = [i for i in ids if i.startswith(name)]
        if not found:
            raise NotFoundError(f"snapshot {name} not found in volume {volume!r}")
        if len(found) > 1:
            raise UsageError(f"snapshot prefix {name} is ambiguous ({len(found)} matches)")
        return self.snapshot(found[0])

    # --- writing -----------------------------------------------------------------------

    def lock_volume(self, volume: str) -> contextlib.AbstractContextManager[None]:
        self.require_writable()
        return self.locks.hold(
            _volume_lock(volume), busy=f"a snapshot of volume {volume!r} is already running"
        )

    def lock_gc(self) -> contextlib.AbstractContextManager[None]:
        """The maintenance lock: one gc at a time; on a shared store, one gc or prune at
        a time across hosts, a lease (store/objectlocks.py)."""
        self.require_writable()
        busy = (
            "maintenance (gc or prune) is already running"
            if self.shared
            else ("garbage collection is already running")
        )
        return self.locks.hold(GC_LOCK, busy=busy)

    def lock_prune(self) -> contextlib.AbstractContextManager[None]:
        """What a prune holds: on a shared store the maintenance lease, so that no gc of
        another host runs between its tombstones and its sync (see store/gc.py); nothing
        locally, where gc's registry covers prunes."""
        return self.lock_gc() if self.shared else contextlib.nullcontext()

    def confirm_gc(self) -> None:
        """Raise LockedError if the maintenance lock was lost (see Locks.confirm)."""
        self.locks.confirm(GC_LOCK)

    def writer(self) -> StoreWriter:
        """A registered writer, the catalog synced first (the writer then chooses a
        parent and a place in the volume's order from what the objects say)."""
        writer = StoreWriter(self)
        try:
            self.sync_catalog()
        except BaseException:
            writer.close()
            raise
        return writer

    def commit_snapshot(
        self, info: SnapshotInfo, writer: StoreWriter, *, drop_checkpoint: bool = False
    ) -> None:
        """Make every written object durable, then commit the snapshot by creating its
        record object, then cache it in the index, in that order.

        The record's create-if-absent put is the commit point: from then on the snapshot
        exists, whatever happens to the index transaction that follows.  Should that
        fail, the writer keeps its intents and the next sync caches it (as for a writer
        killed at that moment); the error says that the snapshot is committed.
        drop_checkpoint: this snapshot supersedes the volume's interrupted run."""
        writer.flush()
        if not writer.registration.valid():
            # gc on another host may have found this writer dead and stopped waiting for
            # it (store/collection.py): what it refers to may be going.
            raise StoreError(
                f"snapshot {info.id} was not committed: this writer's session lapsed "
                "(its heartbeat to the storage failed); run the snapshot again"
            )
        try:
            # On a shared store the volume's lease may lapse apart from the writer's
            # session: then another host may be committing to this volume.
            self.locks.confirm(_volume_lock(info.volume))
            lease_deadline = self.locks.deadline(_volume_lock(info.volume))
        except LockedError as exc:
            raise LockedError(
                f"snapshot {info.id} was not committed: {exc}; run the snapshot again"
            ) from None
        deadline = _earliest(writer.registration.deadline(), lease_deadline)
        if not writer.registration.valid():  # a heartbeat after a lapse moves it on
            raise StoreError(
                f"snapshot {info.id} was not committed: this writer's session lapsed "
                "(its heartbeat to the storage failed); run the snapshot again"
            )
        seq = max(self.index.next_seq(info.volume), self._pending_seq.get(info.volume, 0) + 1)
        packs = writer.indexed_packs if self.shared else None
        commit_by = None if deadline is None else deadline.server
        body = catalog.encode(info, self.config.algorithms(), seq, packs, commit_by)
        data = catalog.frame(catalog.SNAPSHOT_MAGIC, body)
        name = catalog.object_name(info.id)
        intent = writer.registration.intent(name)
        self.index.add_intent(intent)
        try:
            self.backend.put(name, data, exclusive=True)
        except BaseException as exc:
            if deadline is not None and (
                isinstance(exc, TransientStoreError) or not isinstance(exc, BlocksnapError)
            ):
                # The put may still land (a request held or retried somewhere): this
                # session and the volume's lease stay until it can only land late, and
                # what is there then decides, as it does for every host.
                _wait_until(deadline.past)
            landed = self._landed(name, data, writer.registration)
            if landed is None:
                by = "" if deadline is None else f" and was modified by {_utc(deadline.server)}"
                raise StoreError(
                    f"cannot tell whether snapshot {info.id} was committed ({exc}): it was "
                    f"if its record exists{by}; the next command that opens the repository "
                    "sees"
                ) from exc
            if not landed:
                raise
            # The put's answer was lost, but the record is there: the snapshot is committed.
        if deadline is not None:
            self._landed_in_time(name, info.id, deadline, writer.registration)
        try:
            self.index.commit_snapshot(
                info.volume,
                info.block_size,
                info.id,
                body,
                info.map_root,
                seq,
                intent,
                drop_checkpoint=drop_checkpoint,
            )
        except BaseException as exc:
            writer.registration.keep_intents()  # the next sync or gc caches the snapshot
            committed = (
                f"snapshot {info.id} is committed, but the index could not record it yet; "
                "the next command that opens the repository does"
            )
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(f"interrupted: {committed}") from None
            if isinstance(exc, BlocksnapError):
                raise StoreError(f"{committed} ({exc})") from exc
            raise

    def _landed(self, name: str, data: bytes, registration: Registration) -> bool | None:
        """After a create-if-absent put of data raised: whether the object is there with
        those bytes (its answer was lost), or None when that cannot be told: then the
        registration keeps its intents, and what exists decides (for a record or a
        tombstone: the next sync, or gc, goes by whether it is there)."""
        try:
            return self.backend.get(name) == data  # (another's bytes are not ours to delete)
        except MissingObjectError:
            with contextlib.suppress(BlocksnapError):  # what an unfinished write left
                self.backend.delete(name)
            return False
        except BaseException:
            registration.keep_intents()
            return None

    def _landed_in_time(
        self, name: str, snapshot_id: str, deadline: Deadline, registration: Registration
    ) -> None:
        """A record just put: return if it landed by its deadline (it is the snapshot),
        else delete it and raise (it is none).  Its modification time decides, as for
        every reader (sync.py), so that a server clock that jumped misleads no one."""
        answered = time.monotonic()
        try:
            mtime = self.backend.stat(name).mtime
        except MissingObjectError:
            mtime = math.inf  # gone by now (a removal, or storage that lost it): it is none
        except BlocksnapError as exc:
            if answered <= deadline.local:
                return  # answered so soon that it surely landed in time
            registration.keep_intents()
            raise StoreError(
                f"cannot tell whether snapshot {snapshot_id} was committed ({exc}): it was "
                f"if its record exists and was modified by {_utc(deadline.server)}; the "
                "next command that opens the repository sees"
            ) from exc
        if not catalog.landed_late(deadline.server, mtime):
            return
        try:
            self.backend.delete(name)
        except BlocksnapError:  # every reader leaves it out; this host's gc deletes it
            registration.keep_intents()
        raise StoreError(
            f"snapshot {snapshot_id} was not committed: its record reached the storage "
            f"after {_utc(deadline.server)}, when other hosts may have found this writer's "
            "session dead; run the snapshot again"
        )

    def save_checkpoint(self, checkpoint: Checkpoint, writer: StoreWriter) -> None:
        """Record the checkpoint; the caller flushed its writer, so its map is durable.
        Refused once the writer's session lapsed: what the map refers to may be going,
        and a resume uses it without asking (store/collection.py)."""
        if not writer.registration.valid():
            raise StoreError(
                "this writer's session lapsed (its heartbeat to the storage failed); "
                "no checkpoint is saved: run the snapshot again"
            )
        self.index.put_checkpoint(
            checkpoint.volume, catalog.encode_checkpoint(checkpoint), checkpoint.pinned
        )

    def checkpoint(self, volume: str) -> Checkpoint | None:
        """The checkpoint of the volume's interrupted snapshot run, if there is one."""
        raw = self.index.checkpoint(volume)
        if raw is None or (self.shared and self.avoid):
            # A collection list under way may name what the checkpoint's map refers to
            # without asking (store/collection.py): the run starts from the beginning.
            return None
        return catalog.decode_checkpoint(raw, f"checkpoint of {volume}")

    def remove_snapshot(self, info: SnapshotInfo, registration: Registration) -> bool:
        """Remove a committed snapshot (refused if protected); False if it was gone already.

        The tombstone object, created before the index forgets the snapshot, is the
        removal's commit point; the record object is deleted after.  Its blocks stay
        until gc finds them unreferenced.
        """
        tombstone = catalog.tombstone_name(info.id)
        marked = registration.intent(tombstone)
        if not self.index.mark_removing(info.id, registration.id, marked):
            return False
        try:
            # The protection's object is the truth: a protect whose index step did not
            # happen (killed after its put) still protects.
            if self.exists(catalog.protected_name(info.id)):
                raise ProtectedError(f"snapshot {info.id} is protected")
            data = catalog.encode_tombstone(info)
            try:
                self.backend.put(tombstone, data, exclusive=True)
                removed = True
            except ObjectExistsError:
                removed = False  # another process removed it first
            except BaseException as exc:
                landed = self._landed(tombstone, data, registration)
                if landed is None:
                    raise StoreError(
                        f"cannot tell whether snapshot {info.id} was removed ({exc}): it was "
                        "if its tombstone exists; the next gc settles it"
                    ) from exc
                if not landed:
                    raise
                removed = True
        except BaseException:
            with contextlib.suppress(BlocksnapError):  # the first error is the one to tell
                if not self.exists(tombstone):
                    self.index.unmark_removing(info.id, marked)
            raise
        name = catalog.object_name(info.id)
        self.index.remove_snapshot(info.id, intent=registration.intent(name), done=marked)
        self._delete_or_leave_to_gc(name, registration)
        return removed

    def exists(self, name: str) -> bool:
        """Whether the object is there (a stat, not a listing, which may lag)."""
        return sync.exists(self.backend, name)

    def sync_catalog(self) -> sync.SyncReport:
        """Bring the index up to date with the objects (store/sync.py); nothing on a
        read-only filesystem, whose index no process writes."""
        if self.read_only:
            return sync.SyncReport()
        lists: list[collection.CollectionList] | None = None

        def note() -> None:
            # After the listing of the records whose packs the sync may index, before it
            # indexes any: the lists are marked, so that a pack it finds leaves out what
            # they collected or deleted and takes what they condemn for weak.  They are
            # applied after it, once the snapshots it removes have released their roots.
            nonlocal lists
            lists = self._unapplied_lists()
            self.index.note_lists(lists)

        report = sync.sync(
            self.backend,
            self.index,
            self.index_unknown_packs if self.shared else None,
            note if self.shared else None,
        )
        if lists is not None:
            self.follow_collections(lists)
        for volume, seq in report.pending_seq.items():
            self._pending_seq[volume] = max(self._pending_seq.get(volume, 0), seq)
        return report

    def _unapplied_lists(self) -> list[collection.CollectionList]:
        """The collection lists after the seq up to which the index follows them."""
        applied = self.index.collections_applied()
        found = (
            collection.read(self.backend, seq, name)
            for seq, name in collection.listed(self.backend, applied).items()
        )
        return [lst for lst in found if lst is not None]

    def follow_collections(self, lists: list[collection.CollectionList] | None = None) -> None:
        """Bring the index in line with the collection lists of gc on other hosts
        (store/collection.py): forget the copies they deleted, and note the candidates
        of those under way in avoid.  Should a copy still counted here go (by this host's
        uncommitted nodes or checkpoints), every checkpoint goes too.  lists: those
        after the applied seq, read just before (else they are read now)."""
        applied = self.index.collections_applied()
        under_way: dict[int, frozenset[bytes]] = {}
        done: set[int] = set()
        counted = False
        advanced = applied
        # Seqs have no gaps, but a paged listing may miss a list that landed between its
        # pages (a late one, before a fence: see store/collection.py): the seq applied
        # never passes a gap, so that such a list is read next time.
        gapless, previous = True, applied
        for found in self._unapplied_lists() if lists is None else lists:
            seq = found.seq
            if seq <= applied:
                continue
            gapless, previous = gapless and seq == previous + 1, seq
            if found.state != collection.DONE:
                under_way[seq] = frozenset(found.candidates)
                continue
            done.add(seq)
            # Done lists after one under way are applied again next time: a no-op.
            released = self._released_children(found)
            counted |= self.index.forget_copies(found.collected, released)
            self.index.acquit(seq, found.condemned)
            self.index.relocate(found.relocated)
            self.index.forget_packs(found.deleted_packs)
            if not under_way and gapless:
                advanced = seq
        if counted:
            self.index.drop_checkpoints()
        if advanced != applied:
            self.index.set_collections_applied(advanced)
        with self._under_way_lock:
            self._under_way.update(under_way)
            for seq in [s for s in self._under_way if s in done or s <= advanced]:
                del self._under_way[seq]
            self.avoid = frozenset().union(*self._under_way.values())

    def _released_children(self, lst: collection.CollectionList) -> dict[bytes, list[bytes]]:
        """The children of each map node that a done list collects and that the index
        places there, which forget_copies takes out of the index: from the
        list's nodes object, else from the node cache or storage while the pack is
        still there.  A node found nowhere is left out (its children stay counted: see
        GcIndex.forget_copies).  A list applied again finds nothing placed: a no-op."""
        pairs = set(lst.collected)
        ids = list(dict.fromkeys(object_id for object_id, _ in lst.collected))
        forgotten = [
            (object_id, loc)
            for object_id, loc in zip(ids, self.index.locations(ids), strict=True)
            if loc is not None and loc.kind == KIND_NODE and (object_id, loc.pack) in pairs
        ]
        if not forgotten:
            return {}
        stored: dict[bytes, list[bytes]] = {}
        if lst.nodes is not None:
            # Gone or damaged: what the cache or the packs still hold.
            with contextlib.suppress(MissingObjectError, IntegrityError):
                stored = collection.read_nodes(self.backend, lst.nodes)
        out: dict[bytes, list[bytes]] = {}
        for object_id, loc in forgotten:
            if object_id in stored:
                out[object_id] = stored[object_id]
                continue
            raw = self.node_cache.get(object_id) if self.node_cache is not None else None
            try:
                out[object_id] = node_children(raw or self.read_at(object_id, loc))
            except BlocksnapError:
                continue
        return out

    def listed_packs(self) -> dict[bytes, int]:
        """Every pack listed under packs/ (id -> size): a listing of every pack."""
        listed: dict[bytes, int] = {}
        for obj in self.backend.list("packs/"):
            try:
                pack_id = bytes.fromhex(obj.name.rsplit("/", 1)[-1])
            except ValueError:
                continue
            if len(pack_id) == 16:
                listed[pack_id] = obj.size
        return listed

    def unknown_packs(self) -> dict[bytes, int]:
        """The packs listed under packs/ that the index lacks and that no done list named
        deleted (id -> size): a listing of every pack."""
        return {
            p: size
            for p, size in self.listed_packs().items()
            if not self.index.has_pack(p) and not self.index.is_gone(p)
        }

    def index_unknown_packs(self, named: Sequence[bytes] | None = None) -> list[str]:
        """Index the packs in storage that the index lacks (packs other hosts wrote),
        from their tables of contents: those named (a record names its run's), or every
        one listed under packs/; return what could not be read."""
        problems: list[str] = []
        found: list[tuple[bytes, int, list[Record], dict[bytes, list[bytes]]]] = []
        marked: list[tuple[bytes, int, list[Record], dict[bytes, list[bytes]]]] = []
        unknown: list[tuple[str, int | None]]
        if named is None:
            unknown = [(pack_name(p), size) for p, size in self.unknown_packs().items()]
            if unknown and self.shared:
                self.index.note_lists(self._unapplied_lists())  # after the listing
        else:
            unknown = [
                (pack_name(p), None)
                for p in named
                if not self.index.has_pack(p) and not self.index.is_gone(p)
            ]
        for name, read in many_pack_contents(self.backend, self.hash, unknown):
            pack_id = bytes.fromhex(name.rsplit("/", 1)[-1])
            try:
                size, good, children, damaged = read.result()
            except MissingObjectError:
                continue  # deleted since (gc: its objects live elsewhere; or a leftover)
            except BlocksnapError as exc:
                if named is not None and isinstance(exc, TransientStoreError):
                    raise  # the record stays blocking; a listing of packs/ would not help
                problems.append(f"pack {pack_id.hex()} cannot be indexed: {exc}")
                continue
            problems += damaged
            found.append((pack_id, size, good, children))
        # A node counts its children as its pack is indexed, so each pack goes in once
        # every object its nodes name is indexed: blocks first, then the map level by level.
        while found:
            ready = [
                pack
                for pack in found
                if all(
                    self.index.location(child) is not None or child in pack[3]
                    for kids in pack[3].values()
                    for child in kids
                )
            ]
            if not ready:
                problems += [f"pack {p[0].hex()} names objects no pack holds" for p in found]
                break
            for pack_id, size, good, children in ready:
                self.index.add_pack(pack_id, size, good, children)
            marked += [p for p in ready if self.index.has_marks(p[0])]
            found = [p for p in found if p not in ready]
        # A node left out of a pack for naming a copy there that a list collected
        # (ObjectIndex._left_out) is indexed in a second add once what it names is
        # indexed from other packs: as a spare, as in a cache that indexed those first.
        for pack_id, size, good, children in marked:
            self.index.add_pack(pack_id, size, good, children)
        return problems

    def _delete_or_leave_to_gc(self, name: str, registration: Registration) -> None:
        """Delete an object named by this registration's intent, dropping the intent; if
        the delete fails, the registration keeps its intents when it ends, so that gc
        deletes the object as it would after a killed writer (and the error goes on)."""
        intent = registration.intent(name)
        try:
            self.backend.delete(name)
        except BaseException:
            registration.keep_intents()
            raise
        self.index.drop_intent(intent)

    def register(self) -> Registration:
        return Registration(self)

    # --- settings: objects (the truth), cached in the index ------------------------------

    def save_policy(self, volume: str, policy: dict[str, object] | None) -> None:
        """Save (or with None, clear) the volume's retention policy: its object first."""
        self.require_writable()
        key = POLICY_PREFIX + volume.encode()
        name = catalog.policy_name(volume)
        if policy is None:
            self.backend.delete(name)
            self.index.delete_setting(key)
            return
        self.backend.put(name, catalog.encode_policy(volume, policy))
        self.index.put_setting(key, json.dumps(policy, sort_keys=True).encode())

    def policy(self, volume: str) -> dict[str, object] | None:
        raw = self.index.setting(POLICY_PREFIX + volume.encode())
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise IntegrityError(f"saved policy of volume {volume!r} is damaged") from exc
        if not isinstance(value, dict):
            raise IntegrityError(f"saved policy of volume {volume!r} is damaged")
        return value

    def set_protected(self, snapshot_id: str, protected: bool) -> None:
        """Protect a snapshot from pruning, or lift that.  The object is written first and
        removed first: it is the truth, and prune looks at it as well as at the index,
        so a crash leaves the snapshot protected or not, never half."""
        self.require_writable()
        key = PROTECTED_PREFIX + snapshot_id.encode()
        name = catalog.protected_name(snapshot_id)
        if not protected:
            self.backend.delete(name)
            self.index.delete_setting(key)
            return
        marker = self.index.removing().get(snapshot_id)
        if marker is not None and not self.sessions.alive(marker):
            # A prune that died removing it: finished if its tombstone is there, else
            # called off (the mark only if it is still that prune's).
            if self.exists(catalog.tombstone_name(snapshot_id)):
                self.index.remove_snapshot(snapshot_id)
            else:
                self.index.unmark_removing(snapshot_id, marked_by=marker)
        self.backend.put(name, catalog.encode_protected(snapshot_id))
        try:
            self.index.put_setting(key, b"", only_if=snapshot_id.encode())
            if self.exists(catalog.tombstone_name(snapshot_id)):  # removed, not yet synced
                self.index.delete_setting(key)
                raise NotFoundError(f"snapshot {snapshot_id} does not exist")
        except BaseException:
            with contextlib.suppress(BlocksnapError):
                self.backend.delete(name)
            raise

    def protected(self) -> set[str]:
        return {k.decode() for k in self.index.settings_with(PROTECTED_PREFIX)}

    # --- the writer registry -------------------------------------------------------------

    def writer_status(self) -> tuple[dict[bytes, dict[str, Any]], list[bytes]]:
        """(live writers with their entries, ids of registered writers that died).

        A writer's session is alive while it runs (see store/locks.py), so a registered
        writer whose session is not alive ended without unregistering.
        """
        live, dead = {}, []
        for writer_id, entry in self.index.writers().items():
            if self.sessions.alive(writer_id):
                live[writer_id] = entry
            else:
                dead.append(writer_id)
        return live, dead

    def sweep_orphan_locks(self) -> int:
        """Remove what the sessions of writers killed while they registered or
        unregistered left (no registry entry, not alive); return how many."""
        return self.sessions.sweep(lambda writer_id: writer_id in self.index.writers())

    def forget_writer(self, writer_id: bytes) -> None:
        """Remove a dead writer from the registry (its intents dealt with) and its session."""
        self.index.unregister_writer(writer_id)
        self.sessions.forget(writer_id)


def _earliest(*deadlines: Deadline | None) -> Deadline | None:
    """The deadline that comes first of those given (None: none given)."""
    given = [d for d in deadlines if d is not None]
    if not given:
        return None
    return Deadline(
        min(d.server for d in given),
        min(d.local for d in given),
        max(d.past for d in given),
    )


def _wait_until(moment: float) -> None:
    """Sleep until the monotonic time moment, a Ctrl-C meanwhile held back until then (a
    commit in doubt keeps its session and lease until its record can only land late)."""
    interrupted = False
    while (left := moment - time.monotonic()) > 0:
        try:
            time.sleep(min(left, 1.0))
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


def _utc(seconds: int) -> str:
    """A server time, as people read it."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _volume_lock(volume: str) -> str:
    """The name of the lock a snapshot of volume holds."""
    return f"volume-{blake3.blake3(volume.encode()).hexdigest()[:32]}"
