"""The index's part of garbage collection (store/gc.py): finding what is condemned,
collecting it with its children's counts, and moving records when packs are compacted.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from blocksnap.errors import IntegrityError
from blocksnap.store.collection import DONE, CollectionList
from blocksnap.store.entries import (
    DEAD,
    GONE,
    REF,
    SEQ,
    SPARE,
    Location,
    decode_location,
    encode_location,
    json_entry,
    refs_value,
)
from blocksnap.store.lmdbenv import lmdb_errors
from blocksnap.store.objectindex import ObjectIndex
from blocksnap.store.packs import HEADER_SIZE, Record

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn


class GcIndex(ObjectIndex):
    """The steps of gc on an Index, each one write transaction."""

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
                if SEQ.unpack_from(key)[0] >= limit or len(out) >= batch:
                    break
                value = txn.get(key[SEQ.size :], db=self.objects)
                try:
                    loc = decode_location(key[SEQ.size :], value) if value is not None else None
                except IntegrityError:
                    loc = None
                out.append((key, loc))
        return out

    def collect(
        self,
        items: list[tuple[bytes, list[bytes]]],
        limit: int,
        places: dict[bytes, bytes | None] | None = None,
    ) -> list[tuple[bytes, bytes | None]]:
        """Delete condemned objects, each given by its unref key and the ids it names.

        An object is deleted only if it is still unreferenced since the same epoch (a
        writer may have revived it meanwhile), and, with places, only while the index
        places it in the pack places gives (None: nowhere), the copy a collection list
        names; its children are decremented in the same transaction.  One with a spare
        copy (ObjectIndex.keep_spares) moves there instead, unreferenced anew, its
        children still counted: the next list condemns that copy.  Returns the (object
        id, pack id or None) deleted.
        """

        def body(txn: Txn) -> list[tuple[bytes, bytes | None]]:
            deleted: list[tuple[bytes, bytes | None]] = []
            deltas: dict[bytes, int] = {}
            epoch = self._epoch(txn)
            for key, children in items:
                since = int(SEQ.unpack_from(key)[0])
                object_id = key[SEQ.size :]
                value = txn.get(object_id, db=self.refs)
                if since >= limit or value != refs_value(0, since):
                    continue
                raw = txn.get(object_id, db=self.objects)
                pack: bytes | None = None
                loc: Location | None = None
                if raw is not None:
                    with contextlib.suppress(IntegrityError):  # damaged: no pack to account
                        loc = decode_location(object_id, bytes(raw))
                where = None if loc is None else loc.pack
                if places is not None and places.get(object_id) != where:
                    continue  # placed anew since the list named its copy: it stays
                if loc is not None and self._place_spare(txn, object_id, epoch, deltas):
                    # Another copy of it takes the place: that copy is not collected yet
                    # (it may be a writer's of another host that has not committed).
                    deltas[loc.pack] = deltas.get(loc.pack, 0) - HEADER_SIZE - loc.stored_size
                    continue
                self._drop_spares(txn, object_id)
                if raw is not None:
                    if loc is not None:
                        size = HEADER_SIZE + loc.stored_size
                        deltas[loc.pack] = deltas.get(loc.pack, 0) - size
                        pack = loc.pack
                    txn.delete(object_id, db=self.objects)
                txn.delete(object_id, db=self.refs)
                txn.delete(key, db=self.unref)
                for child in children:
                    self._decref(txn, child, epoch)
                deleted.append((object_id, pack))
            self._adjust_live(txn, deltas)
            return deleted

        return self._write("collecting garbage", body)

    def unreferenced(self, object_ids: list[bytes]) -> list[tuple[bytes, Location | None]]:
        """(unref key, location) of each of object_ids whose count is 0 now."""
        out: list[tuple[bytes, Location | None]] = []
        with lmdb_errors("reading index"), self._begin() as txn:
            for object_id in object_ids:
                value = txn.get(object_id, db=self.refs)
                if value is None:
                    continue
                count, since = REF.unpack(value)
                if count:
                    continue
                raw = txn.get(object_id, db=self.objects)
                try:
                    loc = decode_location(object_id, bytes(raw)) if raw is not None else None
                except IntegrityError:
                    loc = None
                out.append((SEQ.pack(since) + object_id, loc))
        return out

    def pack_info(self, pack_id: bytes) -> dict[str, Any] | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(pack_id, db=self.packs)
        return None if value is None else json_entry(value, f"pack {pack_id.hex()}")

    def collections_applied(self) -> int:
        """The highest seq up to which this index follows the collection lists."""
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(b"collections", db=self.meta)
        return 0 if value is None else int(SEQ.unpack(value)[0])

    def set_collections_applied(self, seq: int) -> None:
        def body(txn: Txn) -> None:
            txn.put(b"collections", SEQ.pack(seq), db=self.meta)

        self._write("following a collection", body)

    def relocate(self, moves: list[tuple[bytes, bytes, Location]]) -> None:
        """For each (object id, deleted pack, location): the index's entry for the object,
        if it is in that pack, moves to the location (a copy gc elsewhere kept)."""

        def body(txn: Txn) -> None:
            deltas: dict[bytes, int] = {}
            for object_id, pack_id, loc in moves:
                txn.delete(SPARE + object_id + pack_id, db=self.meta)
                raw = txn.get(object_id, db=self.objects)
                if raw is None:
                    continue
                try:
                    old = decode_location(object_id, bytes(raw))
                except IntegrityError:
                    old = None
                if old is None or old.pack == pack_id:
                    txn.delete(SPARE + object_id + loc.pack, db=self.meta)
                    txn.put(object_id, encode_location(object_id, loc), db=self.objects)
                    # The live bytes move with it, so that its new pack is never taken
                    # for empty (its copy there was dead weight here until now).
                    size = HEADER_SIZE + loc.stored_size
                    deltas[loc.pack] = deltas.get(loc.pack, 0) + size
                    if old is not None:
                        deltas[old.pack] = deltas.get(old.pack, 0) - (HEADER_SIZE + old.stored_size)
            self._adjust_live(txn, deltas)

        self._write("following a collection", body)

    def forget_copies(
        self,
        copies: list[tuple[bytes, bytes]],
        children: dict[bytes, list[bytes]] | None = None,
    ) -> bool:
        """Forget the copies (object id, pack id) that gc on another host deleted (store/
        collection.py), each only where the index places the object in that pack.  An
        object with a spare copy moves there, its count and children as they are (see
        ObjectIndex.keep_spares).  Else one at count 0 leaves the index, and one still
        counted (by nodes or checkpoints of this host that no snapshot committed) keeps
        its count without a place, so that no writer refers to it and the next copy
        stored takes its place.  Returns whether any was still counted.  children: the
        ids each map node among them names, released as it leaves the index (a child may
        fall to count 0, for a later gc here).  A node left out keeps its children
        counted: a leak, mended by repair --rebuild-index, never a loss."""
        released = children or {}

        def body(txn: Txn) -> bool:
            deltas: dict[bytes, int] = {}
            epoch = self._epoch(txn)
            self._mark(txn, copies, [])
            placed: list[tuple[bytes, bytes]] = []
            for object_id, pack_id in dict.fromkeys(copies):
                raw = txn.get(object_id, db=self.objects)
                if raw is None:
                    continue
                try:
                    loc = decode_location(object_id, bytes(raw))
                except IntegrityError:
                    continue
                if loc.pack == pack_id:
                    deltas[pack_id] = deltas.get(pack_id, 0) - (HEADER_SIZE + loc.stored_size)
                    if self._place_spare(txn, object_id, epoch, deltas):
                        continue  # another copy takes the place, the count stays
                    txn.delete(object_id, db=self.objects)
                    placed.append((object_id, pack_id))
            # Those at count 0 leave, releasing what they name, until none falls to 0: a
            # child listed before its node is counted by it until the node goes.
            left = placed
            while True:
                still = []
                for object_id, pack_id in left:
                    count, since = self._ref(txn, object_id)
                    if count:
                        still.append((object_id, pack_id))
                        continue
                    txn.delete(object_id, db=self.refs)
                    txn.delete(SEQ.pack(since) + object_id, db=self.unref)
                    self._drop_spares(txn, object_id)
                    for child in released.get(object_id, ()):
                        value = txn.get(child, db=self.refs)
                        if value is not None and REF.unpack(value)[0] > 0:
                            self._decref(txn, child, epoch)
                if len(still) == len(left):
                    break
                left = still
            self._adjust_live(txn, deltas)
            return bool(left)

        return self._write("following a collection", body)

    def forget_packs(self, pack_ids: list[bytes]) -> None:
        """Forget packs that a done list names deleted, for good: a pack listed later (its
        delete not done yet, or a killed gc's) is never indexed again (is_gone)."""

        def body(txn: Txn) -> None:
            for pack_id in pack_ids:
                txn.delete(pack_id, db=self.packs)
                txn.delete(pack_id, db=self.sparse)
            self._mark(txn, [], pack_ids)

        self._write("following a collection", body)

    def note_collections(
        self,
        copies: list[tuple[bytes, bytes]],
        packs: list[bytes],
        condemned: Sequence[tuple[int, list[tuple[bytes, bytes]]]] = (),
    ) -> None:
        """Remember copies (object, pack) and packs that done lists name collected and
        deleted, so that a pack indexed later leaves them out (add_pack): a rebuild
        notes every list before it indexes the packs (note_lists).  condemned: (seq, copies) of each
        list under way, whose copies add_pack takes for weak (placed only where no other
        copy is) until acquit."""

        def body(txn: Txn) -> None:
            self._mark(txn, copies, packs)
            for seq, pairs in condemned:
                value = SEQ.pack(seq)
                for object_id, pack_id in pairs:
                    key = DEAD + pack_id + object_id
                    old = txn.get(key, db=self.meta)
                    if old is not None and (old == b"" or bytes(old) >= value):
                        continue  # collected already, or condemned by a later list
                    if txn.get(GONE + pack_id, db=self.meta) is None:
                        txn.put(key, value, db=self.meta)

        self._write("following a collection", body)

    def note_lists(self, lists: Sequence[CollectionList]) -> None:
        """note_collections for lists read just now: what the done ones collected and
        deleted, and what those under way condemn.  Called after the listing that named
        the packs about to be indexed (a sync's, a discovery's, a rebuild's): a copy a
        writer stored again since a list was published is in such a pack only if the
        list was there to read."""
        done = [lst for lst in lists if lst.state == DONE]
        under_way = [(lst.seq, lst.condemned) for lst in lists if lst.state != DONE]
        if done or any(pairs for _, pairs in under_way):
            self.note_collections(
                [c for lst in done for c in lst.collected],
                [p for lst in done for p in lst.deleted_packs],
                under_way,
            )

    def acquit(self, seq: int, condemned: list[tuple[bytes, bytes]]) -> None:
        """Drop the marks list seq (done, followed) left on the copies it condemned and
        did not collect: those it collected are marked dead by then."""
        value = SEQ.pack(seq)

        def body(txn: Txn) -> None:
            for object_id, pack_id in condemned:
                key = DEAD + pack_id + object_id
                if txn.get(key, db=self.meta) == value:
                    txn.delete(key, db=self.meta)

        self._write("following a collection", body)

    def _mark(self, txn: Txn, copies: list[tuple[bytes, bytes]], packs: list[bytes]) -> None:
        for pack_id in packs:
            txn.put(GONE + pack_id, b"", db=self.meta)
            # Its copies' marks are needed no more: the whole pack is left out.
            cursor = txn.cursor(db=self.meta)
            prefix = DEAD + pack_id
            if cursor.set_range(prefix):
                while bytes(cursor.key()).startswith(prefix):
                    if not cursor.delete():
                        break
        for object_id, pack_id in copies:
            txn.delete(SPARE + object_id + pack_id, db=self.meta)
            if txn.get(GONE + pack_id, db=self.meta) is None:
                txn.put(DEAD + pack_id + object_id, b"", db=self.meta)

    def has_marks(self, pack_id: bytes) -> bool:
        """Whether a list named or condemned any copy in the pack (DEAD marks)."""
        prefix = DEAD + pack_id
        with lmdb_errors("reading index"), self._begin() as txn:
            cursor = txn.cursor(db=self.meta)
            return cursor.set_range(prefix) and bytes(cursor.key()).startswith(prefix)

    def is_gone(self, pack_id: bytes) -> bool:
        """Whether a done list named the pack deleted (forget_packs)."""
        with lmdb_errors("reading index"), self._begin() as txn:
            return txn.get(GONE + pack_id, db=self.meta) is not None

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

        def body(txn: Txn) -> list[bytes]:
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
        def body(txn: Txn) -> None:
            for pack_id in pack_ids:
                txn.delete(pack_id, db=self.sparse)

        self._write("writing index", body)
