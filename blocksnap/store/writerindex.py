"""The index's writer registry: the epoch, the registered writers and their intents, and
claim, by which a registered writer may refer to an object gc could otherwise collect
(the rules are in store/index.py).  Host-local state: never rebuilt.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from blocksnap.store.entries import REF, SEQ, json_entry
from blocksnap.store.lmdbenv import lmdb_errors, prefixed
from blocksnap.store.objectindex import ObjectIndex

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn


class WriterIndex(ObjectIndex):
    """The meta epoch, writers and intents databases of an Index."""

    def claim(
        self, object_ids: list[bytes], epoch: int, avoid: frozenset[bytes] = frozenset()
    ) -> list[bool]:
        """For each id, whether a writer registered at epoch may refer to it.

        It may when the object is indexed and its count is positive or became 0 at or
        after epoch.  An object unreferenced since before the writer started could be
        collected at any moment, so it is revived instead: its since moves to the current
        epoch in a write transaction, which LMDB orders against gc's collect (collect
        re-checks since).  Either the revival commits first and gc keeps the object, or
        gc does and the object is gone, so False tells the writer to store it again.
        Reviving is what lets a resumed snapshot, or any writer, use what a killed
        writer stored but never committed, instead of storing it twice.

        avoid: ids that a collection list names (store/collection.py), refused whatever
        their count; so is an id whose copy was deleted elsewhere (no location left, or
        one in a pack the index no longer has).
        """
        out: list[bool] = []
        stale: list[int] = []
        with lmdb_errors("reading index"), self._begin_buffers() as txn:
            for i, object_id in enumerate(object_ids):
                value = txn.get(object_id, db=self.refs)
                place = txn.get(object_id, db=self.objects)
                if (
                    value is None
                    or place is None
                    or object_id in avoid
                    or txn.get(bytes(place[:16]), db=self.packs) is None
                ):
                    out.append(False)
                    continue
                count, since = REF.unpack(value)
                out.append(count > 0 or since >= epoch)
                if not out[-1]:
                    stale.append(i)
        if stale:

            def body(txn: Txn) -> None:
                now = self._epoch(txn)
                for i in stale:
                    object_id = object_ids[i]
                    ref = txn.get(object_id, db=self.refs)
                    if ref is None or txn.get(object_id, db=self.objects) is None:
                        continue
                    count, since = REF.unpack(ref)
                    if count == 0 and since < now:
                        txn.delete(SEQ.pack(since) + object_id, db=self.unref)
                        self._set_unreferenced(txn, object_id, now)
                    out[i] = True

            self._write("writing index", body)
        return out

    def register_writer(self, writer_id: bytes, pid: int) -> int:
        """Add a writer to the registry and return its start epoch (a new, larger one)."""

        def body(txn: Txn) -> int:
            epoch = self._epoch(txn) + 1
            txn.put(b"epoch", SEQ.pack(epoch), db=self.meta)
            entry = {"epoch": epoch, "pid": pid, "started": time.time()}
            txn.put(writer_id, json.dumps(entry).encode(), db=self.writers_db)
            return epoch

        return self._write("registering writer", body)

    def unregister_writer(self, writer_id: bytes) -> None:
        """Remove a writer and any intents it left, in one transaction."""

        def body(txn: Txn) -> None:
            txn.delete(writer_id, db=self.writers_db)
            for key in [k for k, _ in prefixed(txn, self.intents, writer_id)]:
                txn.delete(key, db=self.intents)

        self._write("unregistering writer", body)

    def add_intent(self, key: bytes) -> None:
        def body(txn: Txn) -> None:
            txn.put(key, b"", db=self.intents)

        self._write("registering writer", body)

    def drop_intent(self, key: bytes) -> None:
        def body(txn: Txn) -> None:
            txn.delete(key, db=self.intents)

        self._write("registering writer", body)

    def intents_of(self, writer_id: bytes) -> list[str]:
        """The object names a writer meant to put or delete and did not finish with."""
        with lmdb_errors("reading index"), self._begin() as txn:
            return [k[len(writer_id) :].decode() for k, _ in prefixed(txn, self.intents, writer_id)]

    def writers(self) -> dict[bytes, dict[str, Any]]:
        with lmdb_errors("reading index"), self._begin() as txn:
            return {
                bytes(k): json_entry(v, f"writer {bytes(k).hex()}")
                for k, v in txn.cursor(db=self.writers_db)
            }

    def epoch(self) -> int:
        with lmdb_errors("reading index"), self._begin() as txn:
            return self._epoch(txn)
