"""The index's part of a rebuild (store/rebuild.py): forgetting what nothing can reach and
setting every reference count from a full recount.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from blocksnap.store.entries import REF, SEQ, decode_location, refs_value
from blocksnap.store.lmdbenv import lmdb_errors
from blocksnap.store.objectindex import ObjectIndex
from blocksnap.store.packs import HEADER_SIZE

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn


class RebuildIndex(ObjectIndex):
    """The steps of a rebuild on an Index."""

    def forget_objects(self, object_ids: Sequence[bytes], *, keep_live: bool = False) -> None:
        """Take objects out of the index, their records becoming dead bytes of their
        packs (rebuild: map nodes that nothing can reach, whose children gc took).
        keep_live: their packs' live bytes stay as they are (see rebuild's
        _drop_unreachable on a shared store)."""

        def body(txn: Txn) -> None:
            deltas: dict[bytes, int] = {}
            for object_id in object_ids:
                raw = txn.get(object_id, db=self.objects)
                if raw is None:
                    continue
                loc = decode_location(object_id, bytes(raw))
                deltas[loc.pack] = deltas.get(loc.pack, 0) - (HEADER_SIZE + loc.stored_size)
                ref = txn.get(object_id, db=self.refs)
                if ref is not None:
                    count, since = REF.unpack(ref)
                    if count == 0:
                        txn.delete(SEQ.pack(since) + object_id, db=self.unref)
                    txn.delete(object_id, db=self.refs)
                txn.delete(object_id, db=self.objects)
                self._drop_spares(txn, object_id)
            if not keep_live:
                self._adjust_live(txn, deltas)

        self._write("writing index", body)

    def forget_unreferenced(self) -> int:
        """forget_objects for every object whose count is 0; return how many (rebuild:
        with nothing running, they are garbage)."""
        with lmdb_errors("reading index"), self._begin() as txn:
            ids = [bytes(k)[SEQ.size :] for k, _ in txn.cursor(db=self.unref)]
        for start in range(0, len(ids), 4096):
            self.forget_objects(ids[start : start + 4096])
        return len(ids)

    def set_counts(self, counts: dict[bytes, int]) -> None:
        """Set every object's count from a full recount (rebuild); the rest become 0."""

        def body(txn: Txn) -> None:
            txn.drop(self.unref, delete=False)
            for key, _ in txn.cursor(db=self.objects):
                key = bytes(key)
                count = counts.get(key, 0)
                if count:
                    txn.put(key, refs_value(count, 0), db=self.refs)
                else:
                    self._set_unreferenced(txn, key, 0)

        self._write("writing index", body)
