"""A copy on disk of the index as one read transaction saw it, which verify checks at leisure.

verify (store/verify.py) needs one consistent state of the index for as long as it runs,
hours with --read-data.  Holding LMDB's read transaction that long would keep every page
freed meanwhile from reuse, so the index file would grow with every commit of the
snapshots and gc running beside it; copying the state into Python objects instead costs
about a kilobyte of memory per object, which grows with the repository without bound.
So Index.copy writes the state into a private LMDB environment in a temporary directory
and releases the transaction at once.  Memory then stays flat in repository size; the
copy costs disk of about the size of the index's objects and counts.

The directory is made by tempfile (TMPDIR says where) and removed on close; a verify
killed with kill -9 leaves it for the system's cleaning of its temporary directory.  The
copy is private to one process and never reopened, so its layout is no kept format:

    objects   object id -> its location value as the index holds it (every intact
              entry; the damaged ones are kept in memory, in damaged)
    refs      object id -> reference count, u32 little-endian
    bypack    pack id + offset u64 big-endian -> object id, only when asked for: every
              entry pointing into a pack, in the order of the pack's records
    snapshots n u64 big-endian -> volume and snapshot id lengths (u16, u16), a flag
              (1: the record follows), volume, id, record: the catalog in timeline order
    tally     object id -> count u32 little-endian: the caller's own counts (add_tally)
    notes     key -> the caller's note of it (add_notes): what verify found in a map leaf

The packs, the pinned roots and the damaged entries are kept in memory: one entry per
pack of about 16 MiB, per checkpoint, per damaged entry.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from blocksnap.errors import IntegrityError, StoreError
from blocksnap.store.entries import REF, Location, decode_location, json_entry, pinned_roots
from blocksnap.store.lmdbenv import ScratchEnv, prefixed

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn

_INITIAL_MAP = 4 << 20  # small (under ulimit -v it is address space); doubles when full
_BATCH = 2_000  # entries per transaction: bounds a write's dirty pages and a read's list
_COUNT = struct.Struct("<I")
_N = struct.Struct(">Q")
_OFFSET = struct.Struct(">Q")
_SNAPSHOT = struct.Struct(">HHB")
_DBS = (b"objects", b"refs", b"bypack", b"snapshots", b"tally", b"notes")


class IndexCopy:
    """The index as one read transaction saw it (see the module docstring); close it, or
    use it as a context manager, to remove it."""

    damaged: dict[bytes, str]  # object id -> why its entry cannot be trusted
    packs: dict[bytes, dict[str, Any]]  # pack id -> pack entry
    pinned: list[bytes]  # the roots checkpoints hold references to
    objects: int  # intact object entries
    snapshot_count: int

    def __init__(self, source: Any, txn: Txn, *, by_pack: bool = False) -> None:
        """Copy what txn sees of source (an Index); by_pack: also the bypack database."""
        self._env: ScratchEnv | None = None
        try:
            self._dir = tempfile.mkdtemp(prefix="blocksnap-verify-")
        except OSError as exc:
            raise StoreError(
                f"verify cannot make its copy of the index in {tempfile.gettempdir()} "
                f"({exc.strerror}); TMPDIR says where"
            ) from exc
        try:
            self._env = ScratchEnv(self._dir, _DBS, "verify's copy of the index", _INITIAL_MAP)
            dbs = self._env.dbs
            self._objects, self._refs, self._bypack, self._snapshots, self._tally, self._notes = (
                dbs[name] for name in _DBS
            )
            self._source = source
            self._copy(source, txn, by_pack)
        except BaseException:
            self.close()
            raise

    @property
    def _scratch(self) -> ScratchEnv:
        if self._env is None:
            raise StoreError("verify's copy of the index is closed")
        return self._env

    def _copy(self, source: Any, txn: Txn, by_pack: bool) -> None:
        self.damaged = {}
        intact: list[tuple[bytes, Location]] = []

        def objects() -> Iterator[tuple[bytes, bytes]]:
            for key, value in txn.cursor(db=source.objects):
                try:
                    loc = decode_location(key, value)
                except IntegrityError as exc:
                    self.damaged[key] = str(exc)
                    continue
                if by_pack:
                    intact.append((key, loc))
                    if len(intact) >= _BATCH:
                        self._fill(self._bypack, _by_pack(intact), append=False)
                        intact.clear()
                yield key, value

        self.objects = self._fill(self._objects, objects(), append=True)
        if intact:
            self._fill(self._bypack, _by_pack(intact), append=False)
        self._fill(
            self._refs,
            ((key, _COUNT.pack(REF.unpack(value)[0])) for key, value in txn.cursor(db=source.refs)),
            append=True,
        )
        self.packs = {
            key: json_entry(value, f"pack {key.hex()}")
            for key, value in txn.cursor(db=source.packs)
        }

        def snapshots() -> Iterator[tuple[bytes, bytes]]:
            n = 0
            for name, _ in txn.cursor(db=source.volumes):
                for _, snapshot_id in prefixed(txn, source.timeline, name + b"\x00"):
                    record = txn.get(snapshot_id, db=source.snapshots)
                    head = _SNAPSHOT.pack(len(name), len(snapshot_id), record is not None)
                    yield _N.pack(n), head + name + snapshot_id + (record or b"")
                    n += 1

        self.snapshot_count = self._fill(self._snapshots, snapshots(), append=True)
        self.pinned = [
            root
            for key, value in txn.cursor(db=source.checkpoints)
            for root in pinned_roots(value, key)
        ]

    def _fill(self, db: Any, items: Iterable[tuple[bytes, bytes]], *, append: bool) -> int:
        """Put items into db in batches (append: they come in key order); their number."""
        total = 0
        batch: list[tuple[bytes, bytes]] = []
        for item in items:
            batch.append(item)
            if len(batch) >= _BATCH:
                total += self._put(db, batch, append)
                batch = []
                self._source.trim_resident()  # the source's transaction is a long one
        if batch:
            total += self._put(db, batch, append)
        return total

    def _put(self, db: Any, batch: list[tuple[bytes, bytes]], append: bool) -> int:
        self._scratch.write(lambda txn: txn.cursor(db=db).putmulti(batch, append=append))
        return len(batch)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> IndexCopy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------

    def _scan(self, db: Any, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Every entry of db under prefix in key order, _BATCH at a time, so that none
        holds a transaction open between batches (add_tally may grow the map)."""
        return self._scratch.scan(db, prefix, _BATCH)

    def _get(self, db: Any, key: bytes) -> bytes | None:
        value: bytes | None = self._scratch.read(lambda txn: txn.get(key, db=db))
        return value

    def location(self, object_id: bytes) -> Location | None:
        """Where the object's intact entry put it, or None."""
        value = self._get(self._objects, object_id)
        return None if value is None else decode_location(object_id, value)

    def __contains__(self, object_id: bytes) -> bool:
        """Whether the object has an intact entry."""
        return self._get(self._objects, object_id) is not None

    def absent(self, object_ids: list[bytes]) -> set[bytes]:
        """Those of object_ids that have no intact entry, looked up in one transaction."""
        return self._scratch.read(
            lambda txn: {i for i in object_ids if txn.get(i, db=self._objects) is None}
        )

    def locations(self) -> Iterator[tuple[bytes, Location]]:
        """Every intact entry, in object id order."""
        for key, value in self._scan(self._objects):
            yield key, decode_location(key, value)

    def in_pack(self, pack_id: bytes) -> Iterator[tuple[int, bytes]]:
        """(offset, object id) of every entry pointing into the pack, in offset order
        (only in a copy made with by_pack)."""
        for key, object_id in self._scan(self._bypack, pack_id):
            yield _OFFSET.unpack_from(key, len(pack_id))[0], object_id

    def counts(self) -> Iterator[tuple[bytes, int]]:
        """(object id, reference count) of every count, in object id order."""
        for key, value in self._scan(self._refs):
            yield key, _COUNT.unpack(value)[0]

    def snapshots(self) -> Iterator[tuple[str, str, bytes | None]]:
        """(volume, snapshot id, record or None) of every snapshot, volume by volume in
        timeline order."""
        for _, value in self._scan(self._snapshots):
            volume_size, id_size, has_record = _SNAPSHOT.unpack_from(value)
            at = _SNAPSHOT.size
            volume = value[at : at + volume_size].decode()
            at += volume_size
            snapshot_id = value[at : at + id_size].decode()
            at += id_size
            yield volume, snapshot_id, value[at:] if has_record else None

    # --- the caller's tally ----------------------------------------------------------

    def add_tally(self, counts: dict[bytes, int]) -> None:
        """Add counts to the tally, in one transaction."""

        def add(txn: Txn) -> None:
            for key in sorted(counts):
                old = txn.get(key, db=self._tally)
                value = counts[key] + (0 if old is None else _COUNT.unpack(old)[0])
                txn.put(key, _COUNT.pack(value), db=self._tally)

        self._scratch.write(add)

    def tally(self) -> Iterator[tuple[bytes, int]]:
        """(object id, count) of every object the tally counted, in object id order."""
        for key, value in self._scan(self._tally):
            yield key, _COUNT.unpack(value)[0]

    # --- the caller's notes ----------------------------------------------------------

    def add_notes(self, notes: dict[bytes, bytes]) -> None:
        """Keep notes (key -> note, replacing an older one), in one transaction."""
        self._put(self._notes, sorted(notes.items()), append=False)

    def note(self, key: bytes) -> bytes | None:
        """The note kept for key, or None."""
        return self._get(self._notes, key)


def _by_pack(entries: list[tuple[bytes, Location]]) -> list[tuple[bytes, bytes]]:
    return sorted((loc.pack + _OFFSET.pack(loc.offset), key) for key, loc in entries)
