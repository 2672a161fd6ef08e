"""The index's part of garbage collection (store/gc.py): finding what is condemned,
collecting it with its children's counts, and moving records when packs are compacted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from blocksnap.errors import IntegrityError
from blocksnap.store.entries import SEQ, Location, decode_location, encode_location, refs_value
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

    def collect(self, items: list[tuple[bytes, list[bytes]]], limit: int) -> int:
        """Delete condemned objects, each given by its unref key and the ids it names.

        An object is deleted only if it is still unreferenced since the same epoch (a
        writer may have revived it meanwhile); its children are decremented in the same
        transaction.  Returns how many objects were deleted.
        """

        def body(txn: Txn) -> int:
            deleted = 0
            deltas: dict[bytes, int] = {}
            epoch = self._epoch(txn)
            for key, children in items:
                since = int(SEQ.unpack_from(key)[0])
                object_id = key[SEQ.size :]
                value = txn.get(object_id, db=self.refs)
                if since >= limit or value != refs_value(0, since):
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
