"""The index's LMDB environment: opening it with its named databases, a map that other
processes may grow and that grows when a write fills it, and the transactions on it.

The databases and what they hold are documented in store/index.py; the map's size in
store/mapsize.py.  Every transaction of a process holds a gate shared, and resizing the
map holds it exclusive (_Gate), since LMDB may resize only with no transaction open.
ScratchEnv is a private environment that one process fills, reads and throws away
(verify's copy of the index, store/indexcopy.py), and keeps the pages of its map out of
the process's resident set (store/resident.py), as IndexEnv.trim_resident does for a
long reader of the index.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from blocksnap.errors import BlocksnapError, IntegrityError, StoreError
from blocksnap.store import lmdbfile, mapsize
from blocksnap.store.mapsize import MIB, address_space_limit, limit_error, map_size_for
from blocksnap.store.resident import Trimmer

REPAIR_HINT = "run `blocksnap repair REPO --rebuild-index`"


@contextlib.contextmanager
def lmdb_errors(what: str) -> Iterator[None]:
    """Turn LMDB's exceptions into blocksnap's, naming what was being done."""
    try:
        yield
    except BlocksnapError:
        raise
    except lmdb.MapFullError as exc:
        raise StoreError(f"{what}: index map full") from exc
    except (
        lmdb.CorruptedError,
        lmdb.PageNotFoundError,
        lmdb.InvalidError,
        lmdb.VersionMismatchError,
        lmdb.IncompatibleError,
        lmdb.BadTxnError,
        lmdb.BadValsizeError,
        lmdb.BadDbiError,
        lmdb.PanicError,
        struct.error,  # a value of the wrong size: LMDB did not notice the damage
        UnicodeDecodeError,
    ) as exc:
        raise IntegrityError(f"{what}: the index is damaged ({exc}); {REPAIR_HINT}") from exc
    except lmdb.ReadonlyError as exc:
        raise StoreError(f"{what}: the index is read-only ({exc})") from exc
    except lmdb.DiskError as exc:
        raise StoreError(f"{what}: disk error in the index ({exc})") from exc
    except lmdb.Error as exc:
        raise StoreError(f"{what}: index error ({exc})") from exc


def prefixed(
    txn: lmdb.Transaction, db: Any, prefix: bytes, start: bytes = b""
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry of db whose key starts with prefix, in key order, from
    the first key at or after start (when start is after prefix)."""
    cur = txn.cursor(db=db)
    if cur.set_range(max(prefix, start)):
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                return
            yield bytes(key), bytes(value)


_T = TypeVar("_T")
if TYPE_CHECKING:  # the stubs' Transaction is generic, the runtime class is not
    Txn = lmdb.Transaction[bytes]
    BufferTxn = lmdb.Transaction[memoryview]
_V = TypeVar("_V", "Txn", "BufferTxn")


class _Gate:
    """Every transaction of this process holds the gate shared; resizing the map holds it
    exclusive, because LMDB lets set_mapsize run only while the process has no
    transaction open.  Shared holds never wait for a resize that is only waiting, so a
    thread may nest them; a thread holding one cannot resize."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False
        self._held = threading.local()

    def _depth(self) -> int:
        return int(getattr(self._held, "depth", 0))

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1
        self._held.depth = self._depth() + 1
        try:
            yield
        finally:
            self._held.depth -= 1
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Yields False (and resizes nothing) when this thread holds the gate shared."""
        if self._depth():
            yield False
            return
        with self._cond:
            while self._resizing or self._active:
                self._cond.wait()
            self._resizing = True
        try:
            yield True
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class IndexEnv:
    """An open LMDB index environment with its named databases, and its transactions."""

    def __init__(
        self, path: str, create: bool = False, readonly: bool = False, lock: bool = True
    ) -> None:
        """lock=False (only with readonly, for a read-only filesystem, where no process
        can write) opens without LMDB's lock file, which cannot be opened there."""
        self.path = path
        self._gate = _Gate()
        self._readonly = readonly
        self._broken: str | None = None
        if not (create and not os.path.exists(os.path.join(path, "data.mdb"))):
            lmdbfile.check_data_file(path)
        map_size = map_size_for(
            self._data_size(), max(mapsize.MAP_INITIAL_SIZE, 2 * self._data_size())
        )
        with lmdb_errors(f"opening index {path}"), self._no_room(map_size):
            self.env = lmdb.open(
                os.fsencode(path),  # py-lmdb encodes a str strictly: non-UTF-8 paths fail
                map_size=map_size,
                max_dbs=16,
                subdir=True,
                create=create,
                readonly=readonly,
                readahead=False,  # random lookups in a large index; no useless readahead
                max_readers=1024,
                lock=lock or not readonly,
            )
            if not readonly:
                # Slots of readers that were killed (kill -9) would otherwise pin old pages.
                self.env.reader_check()

            def db(name: bytes) -> Any:
                return self.env.open_db(name, create=not readonly)

            self.meta = db(b"meta")
            self.objects = db(b"objects")
            self.refs = db(b"refs")
            self.unref = db(b"unref")
            self.packs = db(b"packs")
            self.sparse = db(b"sparse")
            self.writers_db = db(b"writers")
            self.intents = db(b"intents")
            self.volumes = db(b"volumes")
            self.snapshots = db(b"snapshots")
            self.timeline = db(b"timeline")
            self.settings = db(b"settings")
            self.checkpoints = db(b"checkpoints")
        self._trimmer = Trimmer(os.path.join(path, "data.mdb"))

    def close(self) -> None:
        self.env.close()

    # --- transactions and the map --------------------------------------------------------

    def _data_size(self) -> int:
        try:
            return os.stat(os.path.join(self.path, "data.mdb")).st_size
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def _no_room(self, size: int) -> Iterator[None]:
        """Say that the address-space limit is why LMDB could not map size bytes."""
        try:
            yield
        except lmdb.Error as exc:
            limit = address_space_limit()
            if limit is not None and "Cannot allocate memory" in str(exc):
                raise limit_error(size, limit) from exc
            raise

    def _resize(self, seen: int, grow: bool) -> None:
        """Make the map larger than seen bytes (grow: a write filled it), or adopt what
        another process wrote beyond it (not grow); nothing if another thread did it."""
        with self._gate.exclusive() as alone:
            if not alone:
                raise StoreError("index map full while this thread holds a read transaction")
            current = int(self.env.info()["map_size"])
            if current > seen:
                return
            data = self._data_size()
            wanted = max(2 * current, 2 * data) if grow else max(current, 2 * data)
            size = map_size_for(data, wanted, mapped=current)
            if grow and size <= current:
                limit = address_space_limit()
                if limit is None:  # cannot happen: 2 * current always fits then
                    raise StoreError(f"index map full at {current // MIB} MiB")
                raise limit_error(2 * current, limit)
            try:
                with self._no_room(size):
                    self.env.set_mapsize(size)
            except (BlocksnapError, lmdb.Error) as exc:
                # LMDB unmapped the old map before failing to map the new one, and has no
                # map now: no transaction may begin on this environment again.
                self._broken = f"the index cannot be used after failing to grow its map ({exc})"
                raise StoreError(self._broken) from exc

    def _begin(self, *, write: bool = False) -> contextlib.AbstractContextManager[Txn]:
        """A transaction (committed on normal exit, aborted on an exception); see _opened."""
        return self._opened(lambda: self.env.begin(write=write))

    def _begin_buffers(self) -> contextlib.AbstractContextManager[BufferTxn]:
        """A read transaction whose values are buffers into the map, valid inside it."""
        return self._opened(lambda: self.env.begin(buffers=True))

    @contextlib.contextmanager
    def _opened(self, begin: Callable[[], _V]) -> Iterator[_V]:
        """The transaction begin() opens, holding the gate shared.  When another process
        grew the map past this one's, LMDB refuses to begin (MapResizedError) until this
        process adopts a map large enough."""
        for _attempt in range(8):
            if self._broken is not None:
                raise StoreError(self._broken)
            with self._gate.shared():
                seen = int(self.env.info()["map_size"])
                try:
                    txn = begin()
                except lmdb.MapResizedError:
                    pass
                else:
                    with txn:
                        yield txn
                    return
            self._resize(seen, grow=False)
        raise StoreError("the index map keeps being resized by other processes")

    def _map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def trim_resident(self) -> None:
        """Drop the map's pages from this process's resident set: for a reader of much
        of the index (verify's copy), every few thousand entries.  Safe inside a
        transaction of this thread: the gate keeps the map where it is.  Not done after
        every transaction: a snapshot's lookups, faulting its pages back in, measured
        1.3-1.4x slower, and random lookups map the pages again at once (README, the
        memory budget), so a trim every 0.25 s left a snapshot's peak where it was."""
        with self._gate.shared():
            self._trimmer.trim(self._map_size())

    def _write(self, what: str, body: Callable[[Txn], _T]) -> _T:
        """Run body in a write transaction, and again in a new one after growing the map
        when it fills: body must keep its state inside, so that a rerun starts afresh."""
        with lmdb_errors(what):
            while True:
                seen = int(self.env.info()["map_size"])
                try:
                    with self._begin(write=True) as txn:
                        return body(txn)
                except lmdb.MapFullError:
                    if self._readonly:
                        raise
                    self._resize(seen, grow=True)


class ScratchEnv:
    """A private LMDB environment in a directory of its own that one thread fills, reads
    and throws away: never synced, never shared, its map small at first and doubled when
    a write fills it.  Errors name what (through lmdb_errors).

    Reads (read, scan) each open a transaction of their own and hold none between
    batches, so that a write may grow the map in between."""

    def __init__(self, path: str, names: Iterable[bytes], what: str, map_size: int) -> None:
        self._what = what
        names = list(names)
        with lmdb_errors(f"opening {what}"):
            self._env = lmdb.open(
                os.fsencode(path),
                map_size=map_size,
                max_dbs=len(names),
                sync=False,  # thrown away: it never needs to survive a crash
                metasync=False,
                readahead=False,
                max_readers=8,
            )
        self.dbs: dict[bytes, Any] = {}
        with lmdb_errors(f"opening {what}"):
            for name in names:
                self.dbs[name] = self._env.open_db(name)
        self._trimmer = Trimmer(os.path.join(path, "data.mdb"))

    def close(self) -> None:
        self._env.close()

    def _map_size(self) -> int:
        return int(self._env.info()["map_size"])

    def write(self, body: Callable[[Txn], _T]) -> _T:
        """Run body in a write transaction, and again in a new one after doubling the map
        when it fills: body must keep its state inside, so that a rerun starts afresh.
        Under an address-space limit that leaves no room, LMDB's error says so."""
        with lmdb_errors(f"writing {self._what}"):
            while True:
                try:
                    with self._env.begin(write=True) as txn:
                        result = body(txn)
                    break
                except lmdb.MapFullError:  # aborted: no transaction is open now
                    self._env.set_mapsize(2 * self._map_size())
        self._trimmer.maybe_trim(self._map_size)
        return result

    def read(self, body: Callable[[Txn], _T]) -> _T:
        """body's result, run in a read transaction."""
        with lmdb_errors(f"reading {self._what}"), self._env.begin() as txn:
            result = body(txn)
        self._trimmer.maybe_trim(self._map_size)
        return result

    def scan(self, db: Any, prefix: bytes, batch: int) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry of db whose key starts with prefix, in key order,
        read batch entries at a time, each batch in a transaction of its own."""

        def chunk_from(start: bytes) -> list[tuple[bytes, bytes]]:
            return self.read(
                lambda txn: list(itertools.islice(prefixed(txn, db, prefix, start), batch))
            )

        start = prefix
        while True:
            chunk = chunk_from(start)
            yield from chunk
            if len(chunk) < batch:
                return
            start = chunk[-1][0] + b"\x00"  # the next key after the last one read
