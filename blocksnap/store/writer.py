"""Writing to a repository: a writer's place in the registry (Registration) and the
StoreWriter that seals, packs, stores and indexes the records a snapshot run adds."""

from __future__ import annotations

import os
import secrets
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from blocksnap.errors import BlocksnapError, StoreError
from blocksnap.store import records
from blocksnap.store.backend import ObjectStore, ObjectWriter
from blocksnap.store.config import RepositoryConfig
from blocksnap.store.index import Index
from blocksnap.store.lmdbenv import lmdb_errors
from blocksnap.store.locks import Deadline, Session, WriterSessions
from blocksnap.store.nodecache import NodeCache
from blocksnap.store.packs import KIND_BLOCK, KIND_NODE, PackBuilder, pack_name


class OpenStore(Protocol):
    """What writers use of an open repository: the Store (store/repository.py), which
    creates them, and which this module therefore does not import."""

    @property
    def index(self) -> Index: ...

    @property
    def backend(self) -> ObjectStore: ...

    @property
    def config(self) -> RepositoryConfig: ...

    @property
    def sessions(self) -> WriterSessions: ...

    @property
    def avoid(self) -> frozenset[bytes]:
        """Ids a collection list under way names: stored again, never referred to."""
        ...

    @property
    def node_cache(self) -> NodeCache | None:
        """Where this host keeps map nodes (object storage only)."""
        ...

    def require_writable(self) -> None: ...


class Registration:
    """A place in the writer registry, held by a live session for as long as it runs.

    Snapshots, synthesize, prune and gc register, so that gc knows which objects they may
    still refer to (by the epoch) and, once one of them dies, what it left (by its intents).
    """

    def __init__(self, store: OpenStore) -> None:
        store.require_writable()
        self.store = store
        self._session: Session = store.sessions.start()
        self.id = self._session.id
        try:
            self.epoch = store.index.register_writer(self.id, os.getpid())
        except BaseException:
            self._session.end()
            raise
        self._closed = False
        self._keep = False

    def intent(self, name: str) -> bytes:
        """The intent key for putting or deleting the object name."""
        return self.id + name.encode()

    def valid(self) -> bool:
        """Whether the session still holds (see Session.valid): checked before a commit."""
        return self._session.valid()

    def deadline(self) -> Deadline | None:
        """When a commit put now must land (see Session.deadline)."""
        return self._session.deadline()

    def keep_intents(self) -> None:
        """An object this registration meant to delete may still exist: when it ends, it
        stays in the registry with its intents (as abandon), for gc to finish the work."""
        self._keep = True

    def close(self) -> None:
        if self._keep:
            self.abandon()
        elif not self._closed:
            self._closed = True
            try:
                self.store.index.unregister_writer(self.id)
            finally:
                self._session.end()

    def abandon(self) -> None:
        """End without leaving the registry: gc then deletes what the intents name and
        the index lacks, as for a writer that was killed."""
        if not self._closed:
            self._closed = True
            self._session.end()

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _OpenPack:
    """A pack being written: its name and intent, its layout, the ids and node children
    it holds, and its writer once the pack thread has opened it."""

    def __init__(self, registration: Registration, kind: int) -> None:
        self.id = secrets.token_bytes(16)
        self.name = pack_name(self.id)
        self.intent = registration.intent(self.name)
        self.kind = kind
        self.builder = PackBuilder()
        self.pending: set[bytes] = set()  # ids in the pack
        self.children: dict[bytes, list[bytes]] = {}  # of the nodes in the pack
        self.out: ObjectWriter | None = None
        self.unsynced = 0  # bytes written since the last sync
        self.indexed = False


class StoreWriter:
    """A registered writer: packs new records, writing each pack while it fills and
    indexing it once sealed, on a background thread.

    Registration (see store/index.py) gives the writer a start epoch; until it closes, gc
    keeps every object the writer may refer to, and the writer asks claim() rather than
    "is it indexed" before referring to an object.  Map nodes and data blocks fill two
    packs apart (one open pack per kind), so that metadata stays in small packs of its
    own.  Records go to the pack thread in parts of WRITE_PART bytes, which it writes and,
    every SYNC_EVERY bytes, syncs, so writing and fsync overlap with reading and
    compressing and sealing a pack waits only for its last part and its table of
    contents.  At most one sealed pack is being finished while the next fills.  Packs are
    indexed in the order they are sealed, and a node pack is sealed only after the open
    block pack, so a node is never indexed before the blocks it names.  flush() returns
    once everything added is durable and indexed; a failure in the background is raised
    by the next add() or flush().

    The engine hands raw blocks and nodes over and never builds a record: seal() (on any
    thread: the snapshot's workers compress in parallel) makes the record as the config
    says, and add() (on the calling thread) queues it.
    """

    WRITE_PART = 1 << 20
    SYNC_EVERY = 4 << 20
    MAX_QUEUED = 8  # tasks (mostly parts of WRITE_PART) queued when add() takes a record

    def __init__(self, store: OpenStore) -> None:
        self.store = store
        self.registration = Registration(store)
        self.epoch = self.registration.epoch
        self._open: dict[int, _OpenPack] = {}  # kind -> its open pack, once it has a record
        self._sealed: deque[tuple[Future[int], set[bytes]]] = deque()  # not yet indexed
        self._tasks: deque[Future[int]] = deque()  # on the pack thread, in order
        self._started: list[_OpenPack] = []  # packs begun and not yet indexed
        self.written_size = 0  # bytes of stored packs, this session
        self.indexed_packs: list[bytes] = []  # in the order they were indexed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocksnap-pack")
        self.keep_nodes = True  # the nodes it seals go to the node cache, if there is one

    def missing(self, object_ids: list[bytes]) -> list[bool]:
        """For each id, whether this writer must store the object (see Index.claim)."""
        return [not ok for ok in self.store.index.claim(object_ids, self.epoch, self.store.avoid)]

    def _queued(self, object_id: bytes) -> bool:
        return any(object_id in pack.pending for pack in self._open.values()) or any(
            object_id in ids for _, ids in self._sealed
        )

    def has(self, object_id: bytes) -> bool:
        """Whether the object may be referred to: usable in the index, or queued here."""
        return (
            self._queued(object_id)
            or self.store.index.claim([object_id], self.epoch, self.store.avoid)[0]
        )

    def seal(self, kind: int, raw: bytes | memoryview, object_id: bytes) -> records.Sealed:
        """Seal raw bytes (kind KIND_BLOCK or KIND_NODE, object_id their strong hash) into
        a record for add(), as the repository's config says (compression level, later the
        key).  Thread-safe, and touches no state of the writer: the engine's worker
        threads seal in parallel while the calling thread adds."""
        return records.seal(kind, raw, object_id, self.store.config.compression_level)

    def seal_block(self, raw: bytes | memoryview, block_id: bytes) -> records.Sealed:
        return self.seal(KIND_BLOCK, raw, block_id)

    def seal_node(self, raw: bytes | memoryview, node_id: bytes) -> records.Sealed:
        cache = self.store.node_cache
        if cache is not None and self.keep_nodes:  # the next snapshot reads it as parent's
            cache.put(node_id, bytes(raw))
        return self.seal(KIND_NODE, raw, node_id)

    def add(
        self,
        sealed: records.Sealed,
        *,
        checked: bool = False,
        children: list[bytes] | None = None,
    ) -> int:
        """Queue a sealed record (from seal()) unless the object exists; return bytes added.

        children: for a map node, the ids its entries name (counted when it is indexed).
        checked=True means the caller asked missing() moments ago and the object was
        absent; only this writer's own queue is consulted then.  Should another writer
        store the same object meanwhile, the index keeps one copy and the other is garbage.
        """
        object_id = sealed.id
        if self._queued(object_id):
            return 0
        if not checked and not self.missing([object_id])[0]:
            return 0
        self._reap()
        # Storage slower than the engine makes the caller wait here, before this record
        # changes any state (a failure of the work waited for leaves the writer as it
        # was), rather than pile up parts of packs in memory.  One add queues at most a
        # few more tasks (begin, a part, and sealing: a part and the finish, twice).
        while len(self._tasks) >= self.MAX_QUEUED:
            self._reap(until=self._tasks[0])
        kind = sealed.kind
        pack = self._open.get(kind)
        if pack is None:
            pack = self._open[kind] = _OpenPack(self.registration, kind)
            self._started = [p for p in self._started if not p.indexed]
            self._started.append(pack)
            self._submit(self._begin, pack)
        pack.builder.add(sealed.data)
        pack.pending.add(object_id)
        if children:
            pack.children[object_id] = children
        if pack.builder.size >= self.store.config.pack_target_size:
            self._seal(kind)
        elif len(pack.builder.buffer) >= self.WRITE_PART:
            self._submit(self._write, pack, pack.builder.take())
        return sealed.size

    # --- on the pack thread ----------------------------------------------------------------

    def _begin(self, pack: _OpenPack) -> int:
        self.store.index.add_intent(pack.intent)
        pack.out = self.store.backend.create(pack.name)
        return 0

    def _write(self, pack: _OpenPack, data: bytearray) -> int:
        if pack.out is None:
            raise StoreError(f"pack {pack.name} was not opened")
        pack.out.write(data)
        pack.unsynced += len(data)
        if pack.unsynced >= self.SYNC_EVERY:
            pack.out.sync()
            pack.unsynced = 0
        return 0

    def _finish(self, pack: _OpenPack) -> int:
        if pack.out is None:
            raise StoreError(f"pack {pack.name} was not opened")
        pack.out.commit()
        builder = pack.builder
        with lmdb_errors("indexing pack"):
            self.store.index.add_pack(
                pack.id,
                builder.size,
                builder.records,
                pack.children,
                pack.intent,
                replace=self.store.avoid,
            )
        pack.indexed = True
        self.indexed_packs.append(pack.id)
        return builder.size

    # --- on the calling thread -------------------------------------------------------------

    def _submit(self, fn: Callable[..., int], *args: Any) -> None:
        self._tasks.append(self._pool.submit(fn, *args))

    def _reap(self, until: Future[int] | None = None, wait: bool = False) -> None:
        """Collect background work in order, raising the first failure: what has finished,
        and everything up to the task until (to the end when wait)."""
        while self._tasks and (wait or until is not None or self._tasks[0].done()):
            task = self._tasks.popleft()
            self.written_size += task.result()
            if task is until:
                break
        while self._sealed and self._sealed[0][0].done():
            self._sealed.popleft()

    def _seal(self, kind: int) -> None:
        """Seal the open pack of a kind (a node pack after the block pack: see above)."""
        if kind == KIND_NODE and KIND_BLOCK in self._open:
            self._seal(KIND_BLOCK)
        pack = self._open.pop(kind, None)
        if pack is None:
            return
        pack.builder.seal()  # the table of contents and trailer: the pack's last part
        self._submit(self._write, pack, pack.builder.take())
        if self._sealed:  # at most one sealed pack being finished while the next fills
            self._reap(until=self._sealed[0][0])
        self._submit(self._finish, pack)
        self._sealed.append((self._tasks[-1], pack.pending))

    def flush(self) -> None:
        """Store and index everything added so far; return when it is durable."""
        self._seal(KIND_NODE)  # and the block pack before it
        self._seal(KIND_BLOCK)
        self._reap(wait=True)

    def close(self) -> None:
        """Wait for the background thread and leave the registry.  A pack begun and not
        indexed (the run failed or was interrupted) is deleted; what was indexed and not
        committed stays unreferenced, for gc."""
        cleaned = True
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for pack in self._started:
                # Only a failed or interrupted run gets here, and its own error is the one
                # to report: a pack that cannot be deleted now is left to gc (below).
                try:
                    if pack.out is not None:
                        pack.out.abort()
                    if not pack.indexed and not self.store.index.has_pack(pack.id):
                        self.store.backend.delete(pack.name)
                except (BlocksnapError, OSError):
                    cleaned = False
        finally:
            if cleaned:
                self.registration.close()
            else:  # the intents stay, and gc deletes what the index lacks
                self.registration.abandon()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
