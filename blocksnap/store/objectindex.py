"""The index's objects, reference counts and packs: where each object's record is, how
many refer to it (and since when none does), and each pack's size and live bytes.

The counting here (exact, in the transaction of the change) is what the writer registry,
the catalog, gc and rebuild build on; the layout is documented in store/index.py.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from blocksnap.errors import IntegrityError
from blocksnap.store.entries import (
    CRC,
    DEAD,
    GONE,
    LOC,
    REF,
    SEQ,
    SPARE,
    Location,
    decode_location,
    encode_location,
    json_entry,
    not_indexed,
    refs_value,
)
from blocksnap.store.lmdbenv import IndexEnv, lmdb_errors
from blocksnap.store.packs import HEADER_SIZE, Record, overhead_size

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn


class ObjectIndex(IndexEnv):
    """The objects, refs, unref, packs and sparse databases of an Index."""

    # On a store that hosts share, the index remembers the copies of an object that it
    # does not place (spares), so that one takes the place when the placed copy is
    # collected or deleted: a copy a writer of another host stored since may be the
    # one its snapshot will need, and its pack must never look empty here meanwhile.
    keep_spares = False

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

    def first_missing(self, ids: bytes) -> tuple[bytes | None, int]:
        """Check a run of 32-byte ids (all-zero ids, zero blocks, are skipped and counted):
        (the first id without an intact index entry or None, the number of zero ids).

        decode_location's checks, without building a Location: synthesize runs this over
        every block of a volume."""
        size = LOC.size
        crc = CRC.unpack_from
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
                    or len(value) != size + CRC.size
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

    def unreferenced_count(self) -> int:
        with lmdb_errors("reading index"), self._begin() as txn:
            return int(txn.stat(self.unref)["entries"])

    def object_count(self) -> int:
        with lmdb_errors("reading index"), self._begin() as txn:
            return int(txn.stat(self.objects)["entries"])

    def pack_infos(self) -> dict[bytes, dict[str, Any]]:
        with lmdb_errors("reading index"), self._begin() as txn:
            return {
                bytes(k): json_entry(v, f"pack {bytes(k).hex()}")
                for k, v in txn.cursor(db=self.packs)
            }

    def sparse_packs(self) -> dict[bytes, dict[str, Any]]:
        """The packs that lost live bytes since gc last looked, with their pack entries."""
        out = {}
        with lmdb_errors("reading index"), self._begin() as txn:
            for key, _ in txn.cursor(db=self.sparse):
                value = txn.get(key, db=self.packs)
                if value is not None:
                    out[bytes(key)] = json_entry(value, f"pack {bytes(key).hex()}")
        return out

    def has_pack(self, pack_id: bytes) -> bool:
        with lmdb_errors("reading index"), self._begin() as txn:
            return txn.get(pack_id, db=self.packs) is not None

    # --- counting, in the caller's write transaction ---------------------------------

    def _epoch(self, txn: Txn) -> int:
        value = txn.get(b"epoch", db=self.meta)
        return 0 if value is None else int(SEQ.unpack(value)[0])

    def _ref(self, txn: Txn, object_id: bytes) -> tuple[int, int]:
        value = txn.get(object_id, db=self.refs)
        if value is None:
            raise not_indexed(object_id)
        count, since = REF.unpack(value)
        return int(count), int(since)

    def _set_unreferenced(self, txn: Txn, object_id: bytes, epoch: int) -> None:
        txn.put(object_id, refs_value(0, epoch), db=self.refs)
        txn.put(SEQ.pack(epoch) + object_id, b"", db=self.unref)

    def _incref(self, txn: Txn, object_id: bytes) -> None:
        count, since = self._ref(txn, object_id)
        if count == 0:
            txn.delete(SEQ.pack(since) + object_id, db=self.unref)
        txn.put(object_id, refs_value(count + 1, 0), db=self.refs)

    def _incref_many(self, txn: Txn, increments: Counter[bytes]) -> None:
        """_incref each id by its count: the thousands of children of a pack's new map
        nodes, in key order, each read and written once."""
        refs, unref, unpack = self.refs, self.unref, REF.unpack
        for object_id in sorted(increments):
            value = txn.get(object_id, db=refs)
            if value is None:
                raise not_indexed(object_id)
            count, since = unpack(value)
            if count == 0:
                txn.delete(SEQ.pack(since) + object_id, db=unref)
            txn.put(object_id, refs_value(count + increments[object_id], 0), db=refs)

    def _decref(self, txn: Txn, object_id: bytes, epoch: int) -> None:
        count, _since = self._ref(txn, object_id)
        if count == 0:
            raise IntegrityError(
                f"reference count of object {object_id.hex()} would fall below zero; "
                "run verify, then repair --rebuild-index"
            )
        if count == 1:
            self._set_unreferenced(txn, object_id, epoch)
        else:
            txn.put(object_id, refs_value(count - 1, 0), db=self.refs)

    def _adjust_live(self, txn: Txn, deltas: dict[bytes, int]) -> None:
        for pack_id, delta in deltas.items():
            value = txn.get(pack_id, db=self.packs)
            if value is None or not delta:
                continue
            info = json_entry(bytes(value), f"pack {pack_id.hex()}")
            info["live"] = int(info.get("live", 0)) + delta
            txn.put(pack_id, json.dumps(info).encode(), db=self.packs)
            if delta < 0:
                txn.put(pack_id, b"", db=self.sparse)

    def _keep_spare(self, txn: Txn, object_id: bytes, loc: Location) -> None:
        if self.keep_spares:
            txn.put(SPARE + object_id + loc.pack, encode_location(object_id, loc), db=self.meta)

    def _take_spare(self, txn: Txn, object_id: bytes) -> Location | None:
        """Take out of the spares the object's copy to place it in: one in a pack the
        index has and no list named deleted or collected it in, one no list under way
        condemns first.  Those that cannot serve are dropped."""
        prefix = SPARE + object_id
        usable: list[tuple[bytes, Location, bool]] = []
        stale: list[bytes] = []
        cursor = txn.cursor(db=self.meta)
        if cursor.set_range(prefix):
            for raw_key, value in cursor:
                key = bytes(raw_key)
                if not key.startswith(prefix):
                    break
                pack_id = key[len(prefix) :]
                mark = txn.get(DEAD + pack_id + object_id, db=self.meta)
                try:
                    loc = decode_location(object_id, bytes(value))
                except IntegrityError:
                    stale.append(key)
                    continue
                if (
                    txn.get(pack_id, db=self.packs) is None
                    or txn.get(GONE + pack_id, db=self.meta) is not None
                    or (mark is not None and not mark)
                ):
                    stale.append(key)
                    continue
                usable.append((key, loc, mark is not None))
        usable.sort(key=lambda u: u[2])  # not condemned first
        for key in stale + [u[0] for u in usable[:1]]:
            txn.delete(key, db=self.meta)
        return usable[0][1] if usable else None

    def _drop_spares(self, txn: Txn, object_id: bytes) -> None:
        """Forget every spare of an object that leaves the index."""
        prefix = SPARE + object_id
        cursor = txn.cursor(db=self.meta)
        if cursor.set_range(prefix):
            while bytes(cursor.key()).startswith(prefix):
                if not cursor.delete():
                    break

    def _place_spare(
        self, txn: Txn, object_id: bytes, epoch: int, deltas: dict[bytes, int]
    ) -> bool:
        """Place the object in a spare copy, if it has one, its place being gone: its
        count stays, and at count 0 it is unreferenced anew (stored again, as far as gc
        here is concerned)."""
        spare = self._take_spare(txn, object_id) if self.keep_spares else None
        if spare is None:
            return False
        txn.put(object_id, encode_location(object_id, spare), db=self.objects)
        deltas[spare.pack] = deltas.get(spare.pack, 0) + HEADER_SIZE + spare.stored_size
        value = txn.get(object_id, db=self.refs)
        if value is not None:
            count, since = REF.unpack(value)
            if not count:
                txn.delete(SEQ.pack(since) + object_id, db=self.unref)
                self._set_unreferenced(txn, object_id, epoch)
        return True

    def _left_out(
        self, txn: Txn, pack_id: bytes, records: list[Record], known: dict[bytes, list[bytes]]
    ) -> tuple[set[bytes], set[bytes]]:
        """The records of a pack that add_pack leaves out: copies a done list named
        collected, and nodes that name one of them that is indexed nowhere else (they
        could not count it), up the tree; and the weak ones, copies a list under way
        condemns (GcIndex.note_collections)."""
        skipped: set[bytes] = set()
        weak: set[bytes] = set()
        for rec in records:
            mark = txn.get(DEAD + pack_id + rec.id, db=self.meta)
            if mark is not None:
                (weak if len(mark) else skipped).add(rec.id)
        if not skipped:
            return skipped, weak
        missing = {i for i in skipped if txn.get(i, db=self.refs) is None}
        grew = True
        while grew and missing:
            grew = False
            for rec in records:
                if rec.id not in skipped and any(c in missing for c in known.get(rec.id, ())):
                    skipped.add(rec.id)
                    if txn.get(rec.id, db=self.refs) is None:
                        missing.add(rec.id)
                    grew = True
        return skipped, weak

    # --- writes ------------------------------------------------------------------------

    def add_pack(
        self,
        pack_id: bytes,
        size: int,
        records: list[Record],
        children: dict[bytes, list[bytes]] | None = None,
        intent: bytes | None = None,
        replace: frozenset[bytes] = frozenset(),
    ) -> list[bytes]:
        """Register a sealed, durable pack and its records in one transaction.

        children maps a node's id to the ids its entries name; a newly indexed node
        increments each of them.  An object indexed already keeps its entry when its count
        is positive (this copy is dead weight for compaction).  When its count is 0, this
        copy replaces it and counts as new at the current epoch: the writer that stored it
        again found it unreferenced since before its start.  intent (a key from
        add_intent) is cleared in the same transaction.  replace: ids whose copy here
        replaces the indexed one whatever its count (the candidates of a collection list
        under way, store/collection.py).  Returns the ids newly indexed.  A pack may be
        added again (two discoveries of one pack, or one racing its writer's own
        indexing): what it places already stays and counts in its live bytes, and
        replace still applies.  Copies and packs that done lists named collected or
        deleted (GcIndex marks) are left out; a copy that a list under way condemns is
        weak: it never replaces another, and any other replaces it whatever its count.
        """
        known = children or {}

        def body(txn: Txn) -> list[bytes]:
            added: list[bytes] = []
            if txn.get(GONE + pack_id, db=self.meta) is not None:
                # A done list named it deleted (a gc killed before the delete, or one
                # under way): none of it is indexed again.
                if intent is not None:
                    txn.delete(intent, db=self.intents)
                return added
            deltas: dict[bytes, int] = {}
            increments: Counter[bytes] = Counter()
            live = 0
            epoch = self._epoch(txn)
            skipped, weak = self._left_out(txn, pack_id, records, known)
            for rec in records:
                loc = Location(
                    pack_id, rec.offset, rec.stored_size, rec.raw_size, rec.kind, rec.codec
                )
                old = txn.get(rec.id, db=self.objects)
                if rec.id in skipped and (old is None or not _placed_in(rec.id, old, pack_id)):
                    continue  # a copy a done list named collected: never again
                if old is None:
                    # Counted but without a place: its copy was deleted on another host
                    # (GcIndex.forget_copies) while nodes here still name it; this copy
                    # is its place now, its children counted already.
                    if txn.get(rec.id, db=self.refs) is None:
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
                        if old_loc.pack == pack_id:
                            live += HEADER_SIZE + rec.stored_size  # placed by a first add
                            continue
                        if rec.id in weak:
                            # condemned: the copy indexed may be its successor
                            self._keep_spare(txn, rec.id, loc)
                            continue
                        if (
                            count
                            and rec.id not in replace
                            and txn.get(DEAD + old_loc.pack + rec.id, db=self.meta) is None
                        ):
                            # dead weight, unless its indexed copy is condemned
                            self._keep_spare(txn, rec.id, loc)
                            continue
                        if not count:
                            txn.delete(SEQ.pack(since) + rec.id, db=self.unref)
                            self._set_unreferenced(txn, rec.id, epoch)
                        deltas[old_loc.pack] = deltas.get(old_loc.pack, 0) - (
                            HEADER_SIZE + old_loc.stored_size
                        )
                        self._keep_spare(txn, rec.id, old_loc)
                if self.keep_spares:
                    txn.delete(SPARE + rec.id + pack_id, db=self.meta)
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


def _placed_in(object_id: bytes, value: bytes, pack_id: bytes) -> bool:
    try:
        return decode_location(object_id, bytes(value)).pack == pack_id
    except IntegrityError:
        return False
