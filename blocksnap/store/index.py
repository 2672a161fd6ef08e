"""The LMDB index: where each object lives, who refers to it, and the snapshot catalog.

The environment is the directory REPO/index (data.mdb, lock.mdb).  Named databases:

    meta       b"format" -> b"2"; b"repository" -> the repository id (ASCII hex);
               b"epoch" -> u64 big-endian, the logical clock of the writer registry
    objects    object id (32 bytes) -> location, 38 bytes little-endian:
                 pack id (16 bytes), offset u64 (of the record header), stored_size u32,
                 raw_size u32, kind u8, codec u8, crc32 u32 (of key and the 34 bytes before)
    refs       object id -> count u32 + since u64, little-endian: how many indexed map
               nodes, committed snapshots and checkpoints refer to the object (a node
               counts every entry that names the object); since is the epoch at which
               the count last became 0 (meaningful only when it is 0)
    unref      since (u64 big-endian) + object id -> b"": every object whose count is 0,
               oldest first; garbage collection walks only this
    packs      pack id (16 bytes) -> JSON {"size", "records", "time", "live"}; live is the
               bytes of records (header included) that index entries point at
    sparse     pack id -> b"": packs that lost live bytes since gc last looked at them
    writers    writer id (16 bytes) -> JSON {"epoch", "pid", "started"}: the registry of
               processes that may be about to refer to objects (see below)
    intents    writer id + object name (UTF-8) -> b"": objects a writer is about to put
               or delete; the transaction that indexes (or unindexes) the object clears
               the entry, so what a killed writer left is known exactly
    volumes    volume name (UTF-8) -> JSON {"block_size"}, for every volume with snapshots
    snapshots  snapshot id (32 ASCII hex digits) -> snapshot record body (store/catalog.py)
    timeline   volume name (UTF-8) + b"\\x00" + seq u64 big-endian + snapshot id -> id:
               the volume's snapshots in the order of their records' (seq, id)
    settings   b"policy\\x00" + volume -> JSON retention policy (see retention.py);
               b"protected\\x00" + snapshot id -> b"" for a protected snapshot;
               b"removing\\x00" + snapshot id -> writer id, while a prune removes it
               (host-local: protecting it is refused meanwhile)
    checkpoints volume name (UTF-8) -> checkpoint record of the volume's interrupted
               snapshot run (see store/catalog.py); each root in its "pinned" list holds
               one reference, so gc keeps what a resumed run will take from it.  The next
               snapshot committed to the volume drops it.  A rebuilt index has none.

Reference counts are exact: a new map node increments its children in the transaction
that indexes its pack, a snapshot commit increments its root, and removing a snapshot
decrements it.  Garbage collection deletes an object whose count is 0 and decrements its
children in the same transaction.

The writer registry keeps that safe while snapshots run.  A writer registers (the epoch
is incremented and becomes the writer's start epoch) before it looks anything up; from
then on it may refer to any object it finds whose count is positive or became 0 at or
after its start epoch.  An object that became 0 before its start it revives first (see
claim): its since moves to the current epoch, or, if gc took it meanwhile, the writer
stores it again.  Garbage collection therefore deletes only objects that became 0 before
the start of every live writer, re-checking since in its own transaction.  A writer
holds an flock on locks/writer-<id>.lock for its lifetime, so one that was killed is
found; gc then deletes the objects named by its intents that never became part of the
index, and removes it from the registry.

Before LMDB maps data.mdb, its two meta pages are read with plain reads and the file is
refused (IntegrityError) unless both are intact and it holds every page up to the newest
one's last page: LMDB would map a truncated file and the first access past its end would
kill the process with SIGBUS.  verify also checks the structure of every page in use
(check_pages), since LMDB follows damaged node sizes and page numbers unchecked.  A file
truncated while a process has it mapped cannot be caught that way; one damaged before
the open is (store/lmdbfile.py).

Everything here but the writer registry, its intents, the removing marks and the
checkpoints (host-local state) is a cache of the objects: it can be rebuilt from the
packs, the snapshot records, the tombstones and the settings objects (store/rebuild.py),
and Store.sync_catalog brings its catalog up to date with them.  Every value that the
engine trusts carries its own check, so a damaged entry is reported as damage rather
than followed.  Write transactions are
short: one per sealed pack, per committed or removed snapshot, and per batch of gc.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import lmdb

from blocksnap.errors import (
    BlocksnapError,
    IntegrityError,
    NotFoundError,
    ProtectedError,
    StoreError,
)
from blocksnap.store import lmdbfile
from blocksnap.store.packs import HEADER_SIZE, Record, overhead_size

INDEX_FORMAT = b"3"
# The map is address space, not memory, but under an address-space limit (ulimit -v, on
# batch systems) it counts: it starts at MAP_INITIAL_SIZE or twice the data file, capped
# to what the limit leaves (less _reserve() for the rest of the process), and grows when
# a write fills it.  It is never below MAP_MIN_SIZE and the data file plus that.
MAP_INITIAL_SIZE = 1 << 30
MAP_MIN_SIZE = 64 << 20
_MIB = 1 << 20
_LOC = struct.Struct("<16sQIIBB")
_CRC = struct.Struct("<I")
_SEQ = struct.Struct(">Q")
_REF = struct.Struct("<IQ")
POLICY_PREFIX = b"policy\x00"
PROTECTED_PREFIX = b"protected\x00"
REMOVING_PREFIX = b"removing\x00"


@dataclass(frozen=True, slots=True)
class Location:
    """Where an object's record is: pack, header offset, sizes, kind and codec."""

    pack: bytes
    offset: int
    stored_size: int
    raw_size: int
    kind: int
    codec: int


def encode_location(key: bytes, loc: Location) -> bytes:
    body = _LOC.pack(loc.pack, loc.offset, loc.stored_size, loc.raw_size, loc.kind, loc.codec)
    return body + _CRC.pack(zlib.crc32(key + body))


def decode_location(key: bytes, value: bytes) -> Location:
    if len(value) != _LOC.size + _CRC.size:
        raise IntegrityError(f"index entry for object {key.hex()} is damaged (size)")
    body = value[: _LOC.size]
    if _CRC.unpack_from(value, _LOC.size)[0] != zlib.crc32(key + body):
        raise IntegrityError(f"index entry for object {key.hex()} is damaged (checksum)")
    return Location(*_LOC.unpack(body))


@dataclass(frozen=True, slots=True)
class IndexView:
    """The index as one read transaction saw it (Index.view)."""

    locations: dict[bytes, Location]  # object id -> location, for every intact entry
    damaged: dict[bytes, str]  # object id -> why its entry cannot be trusted
    counts: dict[bytes, int]  # object id -> reference count
    packs: dict[bytes, dict[str, Any]]  # pack id -> pack entry
    snapshots: list[tuple[str, str, bytes | None]]  # (volume, id, record or None), in order
    pinned: list[bytes]  # the roots checkpoints hold references to


def timeline_key(volume: str, seq: int, snapshot_id: str) -> bytes:
    return volume.encode() + b"\x00" + _SEQ.pack(seq) + snapshot_id.encode()


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


REPAIR_HINT = "run `blocksnap repair REPO --rebuild-index`"


def _json(value: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"index entry for {what} is damaged") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"index entry for {what} is damaged")
    return obj


def _prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry of db whose key starts with prefix, in key order."""
    cur = txn.cursor(db=db)
    if cur.set_range(prefix):
        for key, value in cur:
            if not bytes(key).startswith(prefix):
                return
            yield bytes(key), bytes(value)


def _pinned(record: bytes, volume: bytes) -> list[bytes]:
    """The roots a checkpoint record holds references to."""
    try:
        return [bytes.fromhex(h) for h in _json(record, f"checkpoint of {volume!r}")["pinned"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"index entry for the checkpoint of {volume!r} is damaged") from exc


def _not_indexed(object_id: bytes) -> IntegrityError:
    return IntegrityError(
        f"object {object_id.hex()} is referred to but not in the index; run verify"
    )


def _refs_value(count: int, since: int) -> bytes:
    return _REF.pack(count, since)


_T = TypeVar("_T")
if TYPE_CHECKING:  # the stubs' Transaction is generic, the runtime class is not
    _Txn = lmdb.Transaction[bytes]
    _BufferTxn = lmdb.Transaction[memoryview]
_V = TypeVar("_V", "_Txn", "_BufferTxn")


def _address_space_limit() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _address_space_used() -> int:
    """Bytes of address space this process has mapped (VmSize)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reserve(limit: int) -> int:
    """Address space left for the rest of the process: threads' stacks and malloc arenas,
    pack buffers, whole packs read by verify."""
    return min(512 * _MIB, limit // 4)


def _limit_error(size: int, limit: int) -> StoreError:
    return StoreError(
        f"cannot map the index ({size // _MIB} MiB): the address-space limit (ulimit -v) "
        f"is {limit // _MIB} MiB, and this process uses {_address_space_used() // _MIB} MiB "
        "of it already; raise the limit"
    )


def map_size_for(data_size: int, wanted: int, mapped: int = 0) -> int:
    """The map size to use: wanted, capped by the address-space limit (counting the map of
    mapped bytes this process holds now as free), but never below what the data needs.

    Raises StoreError naming the limit when even that does not fit."""
    needed = max(MAP_MIN_SIZE, data_size + MAP_MIN_SIZE)
    size = max(wanted, needed)
    limit = _address_space_limit()
    if limit is not None:
        room = limit - (_address_space_used() - mapped) - _reserve(limit)
        if room < needed:
            raise _limit_error(needed, limit)
        size = min(size, room)
    return size // _MIB * _MIB


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


class Index:
    """An open LMDB index environment with its named databases."""

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
        map_size = map_size_for(self._data_size(), max(MAP_INITIAL_SIZE, 2 * self._data_size()))
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
            limit = _address_space_limit()
            if limit is not None and "Cannot allocate memory" in str(exc):
                raise _limit_error(size, limit) from exc
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
                limit = _address_space_limit()
                if limit is None:  # cannot happen: 2 * current always fits then
                    raise StoreError(f"index map full at {current // _MIB} MiB")
                raise _limit_error(2 * current, limit)
            try:
                with self._no_room(size):
                    self.env.set_mapsize(size)
            except (BlocksnapError, lmdb.Error) as exc:
                # LMDB unmapped the old map before failing to map the new one, and has no
                # map now: no transaction may begin on this environment again.
                self._broken = f"the index cannot be used after failing to grow its map ({exc})"
                raise StoreError(self._broken) from exc

    def _begin(self, *, write: bool = False) -> contextlib.AbstractContextManager[_Txn]:
        """A transaction (committed on normal exit, aborted on an exception); see _opened."""
        return self._opened(lambda: self.env.begin(write=write))

    def _begin_buffers(self) -> contextlib.AbstractContextManager[_BufferTxn]:
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

    def _write(self, what: str, body: Callable[[_Txn], _T]) -> _T:
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

    def initialize(self, repository_id: str) -> None:
        def body(txn: _Txn) -> None:
            txn.put(b"format", INDEX_FORMAT, db=self.meta)
            txn.put(b"repository", repository_id.encode(), db=self.meta)
            txn.put(b"epoch", _SEQ.pack(0), db=self.meta)

        self._write("initialising index", body)

    def check_identity(self, repository_id: str) -> None:
        with lmdb_errors("reading index"), self._begin() as txn:
            fmt = txn.get(b"format", db=self.meta)
            rid = txn.get(b"repository", db=self.meta)
        if fmt != INDEX_FORMAT:
            raise IntegrityError(
                f"index format {fmt!r} is not {INDEX_FORMAT!r}; run repair --rebuild-index"
            )
        if rid != repository_id.encode():
            raise IntegrityError("index belongs to another repository; run repair")

    # --- reads -------------------------------------------------------------------------

    def location(self, object_id: bytes) -> Location | None:
        with lmdb_errors("reading index"), self._begin_buffers() as txn:
            value = txn.get(object_id, db=self.objects)
            return decode_location(object_id, bytes(value)) if value is not None else None

    def locations(
        self, object_ids: Sequence[bytes], *, strict: bool = False
    ) -> list[Location | None]:
        """Each id's location (None when absent or damaged), in one read transaction.
        strict: a damaged entry raises IntegrityError, as location() does."""
        out: list[Location | None] = []
        with lmdb_errors("reading index"), self._begin_buffers() as txn:
            for i in object_ids:
                value = txn.get(i, db=self.objects)
                try:
                    out.append(None if value is None else decode_location(i, bytes(value)))
                except IntegrityError:
                    if strict:
                        raise
                    out.append(None)
        return out

    def claim(self, object_ids: list[bytes], epoch: int) -> list[bool]:
        """For each id, whether a writer registered at epoch may refer to it.

        It may when the object is indexed and its count is positive or became 0 at or
        after epoch.  An object unreferenced since before the writer started could be
        collected at any moment, so it is revived instead: its since moves to the current
        epoch in a write transaction, which LMDB orders against gc's collect (collect
        re-checks since).  Either the revival commits first and gc keeps the object, or
        gc does and the object is gone, so False tells the writer to store it again.
        Reviving is what lets a resumed snapshot, or any writer, use what a killed
        writer stored but never committed, instead of storing it twice.
        """
        out: list[bool] = []
        stale: list[int] = []
        with lmdb_errors("reading index"), self._begin_buffers() as txn:
            for i, object_id in enumerate(object_ids):
                value = txn.get(object_id, db=self.refs)
                if value is None:
                    out.append(False)
                    continue
                count, since = _REF.unpack(value)
                out.append(count > 0 or since >= epoch)
                if not out[-1]:
                    stale.append(i)
        if stale:

            def body(txn: _Txn) -> None:
                now = self._epoch(txn)
                for i in stale:
                    object_id = object_ids[i]
                    ref = txn.get(object_id, db=self.refs)
                    if ref is None or txn.get(object_id, db=self.objects) is None:
                        continue
                    count, since = _REF.unpack(ref)
                    if count == 0 and since < now:
                        txn.delete(_SEQ.pack(since) + object_id, db=self.unref)
                        self._set_unreferenced(txn, object_id, now)
                    out[i] = True

            self._write("writing index", body)
        return out

    def first_missing(self, ids: bytes) -> tuple[bytes | None, int]:
        """Check a run of 32-byte ids (all-zero ids, zero blocks, are skipped and counted):
        (the first id without an intact index entry or None, the number of zero ids).

        decode_location's checks, without building a Location: synthesize runs this over
        every block of a volume."""
        size = _LOC.size
        crc = _CRC.unpack_from
        crc32 = zlib.crc32
        zero_id = bytes(32)
        zeros = 0
        with lmdb_errors("reading index"), self._begin_buffers() as txn:
            get = txn.get
            db = self.objects
            for k in range(0, len(ids), 32):
                object_id = ids[k : k + 32]
                if object_id == zero_id:
                    zeros += 1
                    continue
                value = get(object_id, None, db)
                if (
                    value is None
                    or len(value) != size + _CRC.size
                    or crc(value, size)[0] != crc32(value[:size], crc32(object_id))
                ):
                    return bytes(object_id), zeros
        return None, zeros

    def iter_objects(self) -> Iterator[tuple[bytes, Location | IntegrityError]]:
        with lmdb_errors("reading index"), self._begin() as txn:
            for key, value in txn.cursor(db=self.objects):
                try:
                    yield key, decode_location(key, value)
                except IntegrityError as exc:
                    yield key, exc

    def view(self, *, check_pages: bool = False) -> IndexView:
        """Everything verify checks, copied out of one read transaction, so that it sees
        one consistent state however long it then takes (see store/verify.py).  check_pages:
        first check the structure of every page of that state (store/lmdbfile.py), which
        LMDB would read unchecked."""
        for _attempt in range(8):
            with lmdb_errors("reading index"), self._begin() as txn:
                if check_pages and not lmdbfile.check_pages(self.path, txn.id()):
                    continue  # two commits since it began: its pages may be reused
                return self._view(txn)
        raise StoreError("the index changed too often to check its pages; try again")

    def _view(self, txn: _Txn) -> IndexView:
        locations: dict[bytes, Location] = {}
        damaged: dict[bytes, str] = {}
        snapshots: list[tuple[str, str, bytes | None]] = []
        for key, value in txn.cursor(db=self.objects):
            try:
                locations[key] = decode_location(key, value)
            except IntegrityError as exc:
                damaged[key] = str(exc)
        counts = {key: int(_REF.unpack(value)[0]) for key, value in txn.cursor(db=self.refs)}
        packs = {key: _json(value, f"pack {key.hex()}") for key, value in txn.cursor(db=self.packs)}
        for name, _ in txn.cursor(db=self.volumes):
            volume = name.decode()
            for _, snapshot_id in _prefixed(txn, self.timeline, name + b"\x00"):
                record = txn.get(snapshot_id, db=self.snapshots)
                snapshots.append((volume, snapshot_id.decode(), record))
        pinned = [
            root for key, value in txn.cursor(db=self.checkpoints) for root in _pinned(value, key)
        ]
        return IndexView(locations, damaged, counts, packs, snapshots, pinned)

    def unreferenced_count(self) -> int:
        with lmdb_errors("reading index"), self._begin() as txn:
            return int(txn.stat(self.unref)["entries"])

    def object_count(self) -> int:
        with lmdb_errors("reading index"), self._begin() as txn:
            return int(txn.stat(self.objects)["entries"])

    def volume(self, name: str) -> dict[str, Any] | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(name.encode(), db=self.volumes)
        return _json(value, f"volume {name}") if value is not None else None

    def volume_names(self) -> list[str]:
        with lmdb_errors("reading index"), self._begin() as txn:
            return [bytes(k).decode() for k, _ in txn.cursor(db=self.volumes)]

    def snapshot_ids(self, volume: str) -> list[str]:
        """The volume's snapshot ids, oldest first."""
        prefix = volume.encode() + b"\x00"
        with lmdb_errors("reading index"), self._begin() as txn:
            return [value.decode() for _, value in _prefixed(txn, self.timeline, prefix)]

    def snapshot_records(self, volume: str) -> list[tuple[str, bytes]]:
        """(id, record) of the volume's snapshots, oldest first, from one transaction, so
        a snapshot removed concurrently is either listed whole or not at all."""
        prefix = volume.encode() + b"\x00"
        out = []
        with lmdb_errors("reading index"), self._begin() as txn:
            for _, value in _prefixed(txn, self.timeline, prefix):
                record = txn.get(value, db=self.snapshots)
                if record is None:
                    raise IntegrityError(
                        f"volume {volume}: timeline names snapshot {value.decode()}, "
                        "which has no record; run repair --rebuild-index"
                    )
                out.append((value.decode(), bytes(record)))
        return out

    def cached_snapshot_ids(self) -> set[str]:
        """The ids of every snapshot in the catalog."""
        with lmdb_errors("reading index"), self._begin() as txn:
            return {bytes(k).decode() for k, _ in txn.cursor(db=self.snapshots)}

    def snapshot_record(self, snapshot_id: str) -> bytes | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(snapshot_id.encode(), db=self.snapshots)
        return bytes(value) if value is not None else None

    def pack_infos(self) -> dict[bytes, dict[str, Any]]:
        with lmdb_errors("reading index"), self._begin() as txn:
            return {
                bytes(k): _json(v, f"pack {bytes(k).hex()}") for k, v in txn.cursor(db=self.packs)
            }

    def sparse_packs(self) -> dict[bytes, dict[str, Any]]:
        """The packs that lost live bytes since gc last looked, with their pack entries."""
        out = {}
        with lmdb_errors("reading index"), self._begin() as txn:
            for key, _ in txn.cursor(db=self.sparse):
                value = txn.get(key, db=self.packs)
                if value is not None:
                    out[bytes(key)] = _json(value, f"pack {bytes(key).hex()}")
        return out

    def setting(self, key: bytes) -> bytes | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(key, db=self.settings)
        return None if value is None else bytes(value)

    def settings_with(self, prefix: bytes) -> dict[bytes, bytes]:
        """Every setting whose key starts with prefix, the prefix removed from the keys."""
        with lmdb_errors("reading index"), self._begin() as txn:
            return {k[len(prefix) :]: v for k, v in _prefixed(txn, self.settings, prefix)}

    # --- the writer registry -----------------------------------------------------------

    def register_writer(self, writer_id: bytes, pid: int) -> int:
        """Add a writer to the registry and return its start epoch (a new, larger one)."""

        def body(txn: _Txn) -> int:
            epoch = self._epoch(txn) + 1
            txn.put(b"epoch", _SEQ.pack(epoch), db=self.meta)
            entry = {"epoch": epoch, "pid": pid, "started": time.time()}
            txn.put(writer_id, json.dumps(entry).encode(), db=self.writers_db)
            return epoch

        return self._write("registering writer", body)

    def unregister_writer(self, writer_id: bytes) -> None:
        """Remove a writer and any intents it left, in one transaction."""

        def body(txn: _Txn) -> None:
            txn.delete(writer_id, db=self.writers_db)
            for key in [k for k, _ in _prefixed(txn, self.intents, writer_id)]:
                txn.delete(key, db=self.intents)

        self._write("unregistering writer", body)

    def add_intent(self, key: bytes) -> None:
        def body(txn: _Txn) -> None:
            txn.put(key, b"", db=self.intents)

        self._write("registering writer", body)

    def drop_intent(self, key: bytes) -> None:
        def body(txn: _Txn) -> None:
            txn.delete(key, db=self.intents)

        self._write("registering writer", body)

    def intents_of(self, writer_id: bytes) -> list[str]:
        """The object names a writer meant to put or delete and did not finish with."""
        with lmdb_errors("reading index"), self._begin() as txn:
            return [
                k[len(writer_id) :].decode() for k, _ in _prefixed(txn, self.intents, writer_id)
            ]

    def has_pack(self, pack_id: bytes) -> bool:
        with lmdb_errors("reading index"), self._begin() as txn:
            return txn.get(pack_id, db=self.packs) is not None

    def writers(self) -> dict[bytes, dict[str, Any]]:
        with lmdb_errors("reading index"), self._begin() as txn:
            return {
                bytes(k): _json(v, f"writer {bytes(k).hex()}")
                for k, v in txn.cursor(db=self.writers_db)
            }

    def epoch(self) -> int:
        with lmdb_errors("reading index"), self._begin() as txn:
            return self._epoch(txn)

    # --- writes ------------------------------------------------------------------------

    def _epoch(self, txn: lmdb.Transaction) -> int:
        value = txn.get(b"epoch", db=self.meta)
        return 0 if value is None else int(_SEQ.unpack(value)[0])

    def _ref(self, txn: lmdb.Transaction, object_id: bytes) -> tuple[int, int]:
        value = txn.get(object_id, db=self.refs)
        if value is None:
            raise _not_indexed(object_id)
        count, since = _REF.unpack(value)
        return int(count), int(since)

    def _set_unreferenced(self, txn: lmdb.Transaction, object_id: bytes, epoch: int) -> None:
        txn.put(object_id, _refs_value(0, epoch), db=self.refs)
        txn.put(_SEQ.pack(epoch) + object_id, b"", db=self.unref)

    def _incref(self, txn: lmdb.Transaction, object_id: bytes) -> None:
        count, since = self._ref(txn, object_id)
        if count == 0:
            txn.delete(_SEQ.pack(since) + object_id, db=self.unref)
        txn.put(object_id, _refs_value(count + 1, 0), db=self.refs)

    def _incref_many(self, txn: lmdb.Transaction, increments: Counter[bytes]) -> None:
        """_incref each id by its count: the thousands of children of a pack's new map
        nodes, in key order, each read and written once."""
        refs, unref, unpack = self.refs, self.unref, _REF.unpack
        for object_id in sorted(increments):
            value = txn.get(object_id, db=refs)
            if value is None:
                raise _not_indexed(object_id)
            count, since = unpack(value)
            if count == 0:
                txn.delete(_SEQ.pack(since) + object_id, db=unref)
            txn.put(object_id, _refs_value(count + increments[object_id], 0), db=refs)

    def _decref(self, txn: lmdb.Transaction, object_id: bytes, epoch: int) -> None:
        count, _since = self._ref(txn, object_id)
        if count == 0:
            raise IntegrityError(
                f"reference count of object {object_id.hex()} would fall below zero; "
                "run verify, then repair --rebuild-index"
            )
        if count == 1:
            self._set_unreferenced(txn, object_id, epoch)
        else:
            txn.put(object_id, _refs_value(count - 1, 0), db=self.refs)

    def _adjust_live(self, txn: lmdb.Transaction, deltas: dict[bytes, int]) -> None:
        for pack_id, delta in deltas.items():
            value = txn.get(pack_id, db=self.packs)
            if value is None or not delta:
                continue
            info = _json(bytes(value), f"pack {pack_id.hex()}")
            info["live"] = int(info.get("live", 0)) + delta
            txn.put(pack_id, json.dumps(info).encode(), db=self.packs)
            if delta < 0:
                txn.put(pack_id, b"", db=self.sparse)

    def add_pack(
        self,
        pack_id: bytes,
        size: int,
        records: list[Record],
        children: dict[bytes, list[bytes]] | None = None,
        intent: bytes | None = None,
    ) -> list[bytes]:
        """Register a sealed, durable pack and its records in one transaction.

        children maps a node's id to the ids its entries name; a newly indexed node
        increments each of them.  An object indexed already keeps its entry when its count
        is positive (this copy is dead weight for compaction).  When its count is 0, this
        copy replaces it and counts as new at the current epoch: the writer that stored it
        again found it unreferenced since before its start.  intent (a key from
        add_intent) is cleared in the same transaction.  Returns the ids newly indexed.
        """
        known = children or {}

        def body(txn: _Txn) -> list[bytes]:
            added: list[bytes] = []
            deltas: dict[bytes, int] = {}
            increments: Counter[bytes] = Counter()
            live = 0
            epoch = self._epoch(txn)
            for rec in records:
                loc = Location(
                    pack_id, rec.offset, rec.stored_size, rec.raw_size, rec.kind, rec.codec
                )
                old = txn.get(rec.id, db=self.objects)
                if old is None:
                    self._set_unreferenced(txn, rec.id, epoch)
                    increments.update(known.get(rec.id, ()))
                    added.append(rec.id)
                else:
                    try:
                        old_loc: Location | None = decode_location(rec.id, bytes(old))
                    except IntegrityError:
                        old_loc = None  # a damaged entry: this intact copy repairs it
                    if old_loc is not None:
                        count, since = self._ref(txn, rec.id)
                        if count or old_loc.pack == pack_id:
                            continue
                        txn.delete(_SEQ.pack(since) + rec.id, db=self.unref)
                        self._set_unreferenced(txn, rec.id, epoch)
                        deltas[old_loc.pack] = deltas.get(old_loc.pack, 0) - (
                            HEADER_SIZE + old_loc.stored_size
                        )
                txn.put(rec.id, encode_location(rec.id, loc), db=self.objects)
                live += HEADER_SIZE + rec.stored_size
            self._incref_many(txn, increments)
            info = {"size": size, "records": len(records), "time": time.time(), "live": live}
            txn.put(pack_id, json.dumps(info).encode(), db=self.packs)
            if live < size - overhead_size(len(records)):
                txn.put(pack_id, b"", db=self.sparse)
            self._adjust_live(txn, deltas)
            if intent is not None:
                txn.delete(intent, db=self.intents)
            return added

        return self._write("indexing pack", body)

    def commit_snapshot(
        self,
        volume: str,
        block_size: int,
        snapshot_id: str,
        record: bytes,
        root: bytes,
        seq: int,
        intent: bytes | None = None,
        *,
        drop_checkpoint: bool = False,
    ) -> bool:
        """Cache a committed snapshot: catalog, timeline at (seq, id), volume and its
        root's count, at once; False (and nothing changed) if it is cached already.

        drop_checkpoint: the snapshot supersedes the volume's interrupted run, whose
        checkpoint (and the references it pins) goes in the same transaction."""

        def body(txn: _Txn) -> bool:
            if intent is not None:
                txn.delete(intent, db=self.intents)
            if drop_checkpoint:
                self._drop_checkpoint(txn, volume)
            if txn.get(snapshot_id.encode(), db=self.snapshots) is not None:
                return False  # a sync of the catalog got here first
            raw = txn.get(volume.encode(), db=self.volumes)
            if raw is not None:
                vol = _json(raw, f"volume {volume}")
                if vol["block_size"] != block_size:
                    raise IntegrityError(
                        f"snapshot {snapshot_id} has block size {block_size}, "
                        f"volume {volume} {vol['block_size']}"
                    )
            self._incref(txn, root)
            txn.put(
                volume.encode(), json.dumps({"block_size": block_size}).encode(), db=self.volumes
            )
            txn.put(snapshot_id.encode(), record, db=self.snapshots)
            txn.put(timeline_key(volume, seq, snapshot_id), snapshot_id.encode(), db=self.timeline)
            return True

        return self._write("committing snapshot", body)

    def next_seq(self, volume: str) -> int:
        """1 + the highest seq among the volume's cached snapshots (1 for none)."""
        prefix = volume.encode() + b"\x00"
        last = 0
        with lmdb_errors("reading index"), self._begin() as txn:
            for key, _ in _prefixed(txn, self.timeline, prefix):
                last = max(last, int(_SEQ.unpack_from(key, len(prefix))[0]))
        return last + 1

    def _drop_checkpoint(self, txn: lmdb.Transaction, volume: str) -> None:
        old = txn.get(volume.encode(), db=self.checkpoints)
        if old is not None:
            epoch = self._epoch(txn)
            for root in _pinned(bytes(old), volume.encode()):
                self._decref(txn, root, epoch)
            txn.delete(volume.encode(), db=self.checkpoints)

    def put_checkpoint(self, volume: str, record: bytes, pinned: list[bytes]) -> None:
        """Replace the volume's checkpoint; record's "pinned" must list pinned, in hex.

        The new roots are counted before the old ones are released, so what both share
        never touches 0."""
        if _pinned(record, volume.encode()) != pinned:
            raise ValueError("checkpoint record does not list the roots it pins")

        def body(txn: _Txn) -> None:
            for root in pinned:
                self._incref(txn, root)
            self._drop_checkpoint(txn, volume)
            txn.put(volume.encode(), record, db=self.checkpoints)

        self._write("saving checkpoint", body)

    def checkpoint(self, volume: str) -> bytes | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(volume.encode(), db=self.checkpoints)
        return None if value is None else bytes(value)

    def mark_removing(self, snapshot_id: str, writer_id: bytes, intent: bytes) -> bool:
        """Begin removing a snapshot: refuse a protected one (ProtectedError, in the same
        transaction as protecting it would be), mark it as being removed by the writer,
        so that protecting it is refused until the removal ends, and record the intent
        (for its tombstone).  False if it is not (or no longer) cached."""

        def body(txn: _Txn) -> bool:
            key = snapshot_id.encode()
            if txn.get(key, db=self.snapshots) is None:
                return False
            if txn.get(PROTECTED_PREFIX + key, db=self.settings) is not None:
                raise ProtectedError(f"snapshot {snapshot_id} is protected")
            txn.put(REMOVING_PREFIX + key, writer_id, db=self.settings)
            txn.put(intent, b"", db=self.intents)
            return True

        return self._write("removing snapshot", body)

    def unmark_removing(self, snapshot_id: str, intent: bytes | None = None) -> None:
        """End a removal that did not happen (its tombstone was never written)."""

        def body(txn: _Txn) -> None:
            txn.delete(REMOVING_PREFIX + snapshot_id.encode(), db=self.settings)
            if intent is not None:
                txn.delete(intent, db=self.intents)

        self._write("removing snapshot", body)

    def remove_snapshot(
        self,
        snapshot_id: str,
        intent: bytes | None = None,
        done: bytes | None = None,
    ) -> bool:
        """Forget a snapshot whose tombstone exists, releasing its root; False if it is
        not cached (any more).  Its protection and removing mark go too.  intent (for
        deleting the record object afterwards) is recorded and done (the tombstone's
        intent) cleared in the same transaction."""

        def body(txn: _Txn) -> bool:
            key = snapshot_id.encode()
            txn.delete(REMOVING_PREFIX + key, db=self.settings)
            txn.delete(PROTECTED_PREFIX + key, db=self.settings)
            if done is not None:
                txn.delete(done, db=self.intents)
            if intent is not None:
                txn.put(intent, b"", db=self.intents)
            record = txn.get(key, db=self.snapshots)
            if record is None:
                return False
            try:
                doc = _json(bytes(record), f"snapshot {snapshot_id}")
                volume = str(doc["volume"]).encode()
                found = timeline_key(str(doc["volume"]), int(doc["seq"]), snapshot_id)
                root = bytes.fromhex(doc["map"]["root"])
            except (KeyError, TypeError, ValueError) as exc:
                raise IntegrityError(f"index entry for snapshot {snapshot_id} is damaged") from exc
            if txn.get(found, db=self.timeline) != key:
                raise IntegrityError(f"snapshot {snapshot_id} is not in its volume's timeline")
            txn.delete(found, db=self.timeline)
            txn.delete(key, db=self.snapshots)
            if next(_prefixed(txn, self.timeline, volume + b"\x00"), None) is None:
                txn.delete(volume, db=self.volumes)  # a volume exists while it has snapshots
            self._decref(txn, root, self._epoch(txn))
            return True

        return self._write("removing snapshot", body)

    def removing(self) -> dict[str, bytes]:
        """Snapshot id -> the writer removing it, for every removal under way."""
        return {k.decode(): v for k, v in self.settings_with(REMOVING_PREFIX).items()}

    def put_setting(self, key: bytes, value: bytes, *, only_if: bytes | None = None) -> None:
        """Set a setting; with only_if, only while that snapshot exists and no prune is
        removing it."""

        def body(txn: _Txn) -> None:
            if only_if is not None and txn.get(only_if, db=self.snapshots) is None:
                raise NotFoundError(f"snapshot {only_if.decode()} does not exist")
            if only_if is not None and txn.get(REMOVING_PREFIX + only_if, db=self.settings):
                raise NotFoundError(f"snapshot {only_if.decode()} is being removed")
            txn.put(key, value, db=self.settings)

        self._write("writing settings", body)

    def delete_setting(self, key: bytes) -> None:
        def body(txn: _Txn) -> None:
            txn.delete(key, db=self.settings)

        self._write("writing settings", body)

    # --- garbage collection ------------------------------------------------------------

    def condemned(
        self, limit: int, after: bytes = b"", batch: int = 256
    ) -> list[tuple[bytes, Location | None]]:
        """Up to batch unref keys after `after` whose epoch is below limit, with locations."""
        out: list[tuple[bytes, Location | None]] = []
        with lmdb_errors("reading index"), self._begin() as txn:
            cur = txn.cursor(db=self.unref)
            if not cur.set_range(after):
                return out
            for key, _ in cur:
                key = bytes(key)
                if key == after:
                    continue
                if _SEQ.unpack_from(key)[0] >= limit or len(out) >= batch:
                    break
                value = txn.get(key[_SEQ.size :], db=self.objects)
                try:
                    loc = decode_location(key[_SEQ.size :], value) if value is not None else None
                except IntegrityError:
                    loc = None
                out.append((key, loc))
        return out

    def collect(self, items: list[tuple[bytes, list[bytes]]], limit: int) -> int:
        """Delete condemned objects, each given by its unref key and the ids it names.

        An object is deleted only if it is still unreferenced since the same epoch (a
        writer may have revived it meanwhile); its children are decremented in the same
        transaction.  Returns how many objects were deleted.
        """

        def body(txn: _Txn) -> int:
            deleted = 0
            deltas: dict[bytes, int] = {}
            epoch = self._epoch(txn)
            for key, children in items:
                since = int(_SEQ.unpack_from(key)[0])
                object_id = key[_SEQ.size :]
                value = txn.get(object_id, db=self.refs)
                if since >= limit or value != _refs_value(0, since):
                    continue
                raw = txn.get(object_id, db=self.objects)
                if raw is not None:
                    try:
                        loc = decode_location(object_id, bytes(raw))
                    except IntegrityError:
                        pass  # a damaged entry: nothing in a pack to account for
                    else:
                        size = HEADER_SIZE + loc.stored_size
                        deltas[loc.pack] = deltas.get(loc.pack, 0) - size
                    txn.delete(object_id, db=self.objects)
                txn.delete(object_id, db=self.refs)
                txn.delete(key, db=self.unref)
                for child in children:
                    self._decref(txn, child, epoch)
                deleted += 1
            self._adjust_live(txn, deltas)
            return deleted

        return self._write("collecting garbage", body)

    def move_records(
        self,
        new_pack: tuple[bytes, int, list[Record]] | None,
        moves: dict[bytes, tuple[bytes, int]],
        retire: dict[bytes, list[tuple[bytes, int]]],
        intent: tuple[bytes | None, Callable[[bytes], bytes]] | None = None,
    ) -> list[bytes]:
        """Finish a compaction step in one transaction; return the packs retired.

        new_pack is (id, size, records) of a pack holding copies; moves maps each copied id
        to the (pack, offset) it was copied from, and the entry moves to the copy only if
        it still points there.  retire maps each old pack to all of its (id, offset)
        records: it leaves the index only once no entry points into it.  intent is
        (the new pack's intent key, a function giving the intent key for deleting a pack);
        the first is cleared and one of the second recorded per retired pack.
        """

        def body(txn: _Txn) -> list[bytes]:
            retired: list[bytes] = []
            deltas: dict[bytes, int] = {}
            if new_pack is not None:
                pack_id, size, records = new_pack
                live = 0
                for rec in records:
                    raw = txn.get(rec.id, db=self.objects)
                    if raw is None:
                        continue
                    old = decode_location(rec.id, bytes(raw))
                    if (old.pack, old.offset) != moves.get(rec.id):
                        continue
                    loc = Location(
                        pack_id, rec.offset, rec.stored_size, rec.raw_size, rec.kind, rec.codec
                    )
                    txn.put(rec.id, encode_location(rec.id, loc), db=self.objects)
                    deltas[old.pack] = deltas.get(old.pack, 0) - (HEADER_SIZE + old.stored_size)
                    live += HEADER_SIZE + rec.stored_size
                info = {"size": size, "records": len(records), "time": time.time(), "live": live}
                txn.put(pack_id, json.dumps(info).encode(), db=self.packs)
            self._adjust_live(txn, deltas)
            for old_pack, contents in retire.items():
                still = False
                for object_id, offset in contents:
                    raw = txn.get(object_id, db=self.objects)
                    if raw is None:
                        continue
                    try:
                        loc = decode_location(object_id, bytes(raw))
                    except IntegrityError:
                        continue
                    if loc.pack == old_pack and loc.offset == offset:
                        still = True
                        break
                txn.delete(old_pack, db=self.sparse)
                if not still:
                    txn.delete(old_pack, db=self.packs)
                    retired.append(old_pack)
                    if intent is not None:
                        txn.put(intent[1](old_pack), b"", db=self.intents)
            if intent is not None and intent[0] is not None:
                txn.delete(intent[0], db=self.intents)
            return retired

        return self._write("compacting packs", body)

    def unmark_sparse(self, pack_ids: list[bytes]) -> None:
        def body(txn: _Txn) -> None:
            for pack_id in pack_ids:
                txn.delete(pack_id, db=self.sparse)

        self._write("writing index", body)

    # --- rebuild -----------------------------------------------------------------------

    def forget_objects(self, object_ids: Sequence[bytes]) -> None:
        """Take objects out of the index, their records becoming dead bytes of their
        packs (rebuild: map nodes that nothing can reach, whose children gc took)."""

        def body(txn: _Txn) -> None:
            deltas: dict[bytes, int] = {}
            for object_id in object_ids:
                raw = txn.get(object_id, db=self.objects)
                if raw is None:
                    continue
                loc = decode_location(object_id, bytes(raw))
                deltas[loc.pack] = deltas.get(loc.pack, 0) - (HEADER_SIZE + loc.stored_size)
                ref = txn.get(object_id, db=self.refs)
                if ref is not None:
                    count, since = _REF.unpack(ref)
                    if count == 0:
                        txn.delete(_SEQ.pack(since) + object_id, db=self.unref)
                    txn.delete(object_id, db=self.refs)
                txn.delete(object_id, db=self.objects)
            self._adjust_live(txn, deltas)

        self._write("writing index", body)

    def forget_unreferenced(self) -> int:
        """forget_objects for every object whose count is 0; return how many (rebuild:
        with nothing running, they are garbage)."""
        with lmdb_errors("reading index"), self._begin() as txn:
            ids = [bytes(k)[_SEQ.size :] for k, _ in txn.cursor(db=self.unref)]
        for start in range(0, len(ids), 4096):
            self.forget_objects(ids[start : start + 4096])
        return len(ids)

    def set_counts(self, counts: dict[bytes, int]) -> None:
        """Set every object's count from a full recount (rebuild); the rest become 0."""

        def body(txn: _Txn) -> None:
            txn.drop(self.unref, delete=False)
            for key, _ in txn.cursor(db=self.objects):
                key = bytes(key)
                count = counts.get(key, 0)
                if count:
                    txn.put(key, _refs_value(count, 0), db=self.refs)
                else:
                    self._set_unreferenced(txn, key, 0)

        self._write("writing index", body)


# LMDB forbids opening one environment twice in a process, yet a service may hold several
# Repository objects on the same path; they share one Index, counted here.
_shared: dict[str, tuple[Index, int]] = {}
_shared_lock = threading.Lock()


def acquire(path: str, *, read_only: bool = False) -> Index:
    """The process-wide Index for path, opened on first use; read_only for a repository
    on a read-only filesystem (see Index)."""
    key = os.path.realpath(path)
    with _shared_lock:
        index, users = _shared.get(key, (None, 0))
        if index is None:
            index = Index(key, readonly=read_only, lock=not read_only)
        _shared[key] = (index, users + 1)
        return index


def release(index: Index) -> None:
    """Give back an Index from acquire; the last user closes it."""
    with _shared_lock:
        for key, (shared, users) in list(_shared.items()):
            if shared is index:
                if users > 1:
                    _shared[key] = (shared, users - 1)
                else:
                    del _shared[key]
                    index.close()
                return
