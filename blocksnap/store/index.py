"""The LMDB index: where each object lives, and the catalog of volumes and snapshots.

The environment is the directory REPO/index (data.mdb, lock.mdb).  Named databases:

    meta       b"format" -> b"1"; b"repository" -> the repository id (ASCII hex)
    objects    object id (32 bytes) -> location, 38 bytes little-endian:
                 pack id (16 bytes), offset u64 (of the record header), stored_size u32,
                 raw_size u32, kind u8, codec u8, crc32 u32 (of key and the 34 bytes before)
    packs      pack id (16 bytes) -> JSON {"size", "records", "time"}
    volumes    volume name (UTF-8) -> JSON {"block_size", "created", "next_seq"}
    snapshots  snapshot id (32 ASCII hex digits) -> snapshot record (see store/catalog.py)
    timeline   volume name (UTF-8) + b"\\x00" + sequence u64 big-endian -> snapshot id

Everything here can be rebuilt from the packs and the snapshot objects (store/rebuild.py).
Every value that the engine trusts carries its own check, so a damaged entry is reported
as damage rather than followed.  Write transactions are short: one per sealed pack and
one per committed snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from blocksnap.errors import BlocksnapError, IntegrityError, StoreError
from blocksnap.store.packs import Record

INDEX_FORMAT = b"1"
MAP_SIZE = 1 << 40  # address space only: the file grows with use
_LOC = struct.Struct("<16sQIIBB")
_CRC = struct.Struct("<I")
_SEQ = struct.Struct(">Q")


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


def timeline_key(volume: str, seq: int) -> bytes:
    return volume.encode() + b"\x00" + _SEQ.pack(seq)


@contextlib.contextmanager
def lmdb_errors(what: str) -> Iterator[None]:
    """Turn LMDB's exceptions into blocksnap's, naming what was being done."""
    try:
        yield
    except BlocksnapError:
        raise
    except lmdb.MapFullError as exc:
        raise StoreError(f"{what}: index map full (raise MAP_SIZE)") from exc
    except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
        raise IntegrityError(f"{what}: the index is damaged ({exc}); run repair") from exc
    except lmdb.DiskError as exc:
        raise StoreError(f"{what}: disk error in the index ({exc})") from exc
    except lmdb.Error as exc:
        raise StoreError(f"{what}: index error ({exc})") from exc


def _json(value: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"index entry for {what} is damaged") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"index entry for {what} is damaged")
    return obj


class Index:
    """An open LMDB index environment with its named databases."""

    def __init__(self, path: str, create: bool = False, readonly: bool = False) -> None:
        with lmdb_errors(f"opening index {path}"):
            self.env = lmdb.open(
                path,
                map_size=MAP_SIZE,
                max_dbs=8,
                subdir=True,
                create=create,
                readonly=readonly,
                readahead=False,  # random lookups in a large index; no useless readahead
                max_readers=1024,
                lock=True,
            )
            if not readonly:
                # Slots of readers that were killed (kill -9) would otherwise pin old pages.
                self.env.reader_check()
            self.meta = self.env.open_db(b"meta", create=not readonly)
            self.objects = self.env.open_db(b"objects", create=not readonly)
            self.packs = self.env.open_db(b"packs", create=not readonly)
            self.volumes = self.env.open_db(b"volumes", create=not readonly)
            self.snapshots = self.env.open_db(b"snapshots", create=not readonly)
            self.timeline = self.env.open_db(b"timeline", create=not readonly)

    def close(self) -> None:
        self.env.close()

    def initialize(self, repository_id: str) -> None:
        with lmdb_errors("initialising index"), self.env.begin(write=True) as txn:
            txn.put(b"format", INDEX_FORMAT, db=self.meta)
            txn.put(b"repository", repository_id.encode(), db=self.meta)

    def check_identity(self, repository_id: str) -> None:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            fmt = txn.get(b"format", db=self.meta)
            rid = txn.get(b"repository", db=self.meta)
        if fmt != INDEX_FORMAT:
            raise IntegrityError(f"index format {fmt!r} is not {INDEX_FORMAT!r}; run repair")
        if rid != repository_id.encode():
            raise IntegrityError("index belongs to another repository; run repair")

    # --- reads -------------------------------------------------------------------------

    def location(self, object_id: bytes) -> Location | None:
        with lmdb_errors("reading index"), self.env.begin(buffers=True) as txn:
            value = txn.get(object_id, db=self.objects)
            return decode_location(object_id, bytes(value)) if value is not None else None

    def missing(self, object_ids: list[bytes]) -> list[bool]:
        """For each id, whether the index lacks it (one read transaction for the batch)."""
        with lmdb_errors("reading index"), self.env.begin(buffers=True) as txn:
            return [txn.get(i, db=self.objects) is None for i in object_ids]

    def present(self, object_ids: list[bytes]) -> list[bool]:
        """For each id, whether the index has an intact entry for it (checksum verified)."""
        out = []
        with lmdb_errors("reading index"), self.env.begin(buffers=True) as txn:
            for i in object_ids:
                value = txn.get(i, db=self.objects)
                try:
                    if value is not None:
                        decode_location(i, bytes(value))
                except IntegrityError:
                    value = None
                out.append(value is not None)
        return out

    def iter_objects(self) -> Iterator[tuple[bytes, Location | IntegrityError]]:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            for key, value in txn.cursor(db=self.objects):
                try:
                    yield key, decode_location(key, value)
                except IntegrityError as exc:
                    yield key, exc

    def object_count(self) -> int:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            return int(txn.stat(self.objects)["entries"])

    def volume(self, name: str) -> dict[str, Any] | None:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            value = txn.get(name.encode(), db=self.volumes)
        return _json(value, f"volume {name}") if value is not None else None

    def volume_names(self) -> list[str]:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            return [bytes(k).decode() for k, _ in txn.cursor(db=self.volumes)]

    def snapshot_ids(self, volume: str) -> list[str]:
        """The volume's snapshot ids, oldest first."""
        prefix = volume.encode() + b"\x00"
        ids = []
        with lmdb_errors("reading index"), self.env.begin() as txn:
            cur = txn.cursor(db=self.timeline)
            if cur.set_range(prefix):
                for key, value in cur:
                    if not key.startswith(prefix):
                        break
                    ids.append(bytes(value).decode())
        return ids

    def snapshot_record(self, snapshot_id: str) -> bytes | None:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            value = txn.get(snapshot_id.encode(), db=self.snapshots)
        return bytes(value) if value is not None else None

    def all_snapshot_ids(self) -> list[str]:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            return [bytes(k).decode() for k, _ in txn.cursor(db=self.snapshots)]

    def pack_infos(self) -> dict[bytes, dict[str, Any]]:
        with lmdb_errors("reading index"), self.env.begin() as txn:
            return {
                bytes(k): _json(v, f"pack {bytes(k).hex()}") for k, v in txn.cursor(db=self.packs)
            }

    # --- writes ------------------------------------------------------------------------

    def add_pack(self, pack_id: bytes, size: int, records: list[Record]) -> None:
        """Register a sealed, durable pack and every record in it, in one transaction."""
        info = json.dumps({"size": size, "records": len(records), "time": time.time()})
        with lmdb_errors("indexing pack"), self.env.begin(write=True) as txn:
            txn.put(pack_id, info.encode(), db=self.packs)
            for rec in records:
                loc = Location(
                    pack_id, rec.offset, rec.stored_size, rec.raw_size, rec.kind, rec.codec
                )
                # overwrite=False: a concurrent writer that stored the same content first
                # keeps its entry; this copy becomes unreferenced garbage.
                txn.put(rec.id, encode_location(rec.id, loc), db=self.objects, overwrite=False)

    def commit_snapshot(
        self, volume: str, block_size: int, snapshot_id: str, record: bytes
    ) -> None:
        """Make a snapshot visible: catalog entry, timeline entry and volume, atomically."""
        with lmdb_errors("committing snapshot"), self.env.begin(write=True) as txn:
            raw = txn.get(volume.encode(), db=self.volumes)
            if raw is None:
                vol: dict[str, Any] = {
                    "block_size": block_size,
                    "created": time.time(),
                    "next_seq": 0,
                }
            else:
                vol = _json(raw, f"volume {volume}")
                if vol["block_size"] != block_size:
                    raise IntegrityError(f"volume {volume}: block size changed under a writer")
            seq = int(vol["next_seq"])
            vol["next_seq"] = seq + 1
            txn.put(volume.encode(), json.dumps(vol).encode(), db=self.volumes)
            txn.put(snapshot_id.encode(), record, db=self.snapshots)
            txn.put(timeline_key(volume, seq), snapshot_id.encode(), db=self.timeline)


# LMDB forbids opening one environment twice in a process, yet a service may hold several
# Repository objects on the same path; they share one Index, counted here.
_shared: dict[str, tuple[Index, int]] = {}
_shared_lock = threading.Lock()


def acquire(path: str) -> Index:
    """The process-wide Index for path, opened on first use."""
    key = os.path.realpath(path)
    with _shared_lock:
        index, users = _shared.get(key, (None, 0))
        if index is None:
            index = Index(key)
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
