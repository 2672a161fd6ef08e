"""The index's catalog: volumes, snapshots and their timeline (a cache of the snapshot
records), settings (a cache of the settings objects, and the host-local removing
marks) and the checkpoints of interrupted runs (host-local); see store/index.py.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from blocksnap.errors import IntegrityError, LockedError, NotFoundError, ProtectedError
from blocksnap.store.entries import (
    PROTECTED_PREFIX,
    REMOVING_PREFIX,
    SEQ,
    json_entry,
    pinned_roots,
    timeline_key,
)
from blocksnap.store.lmdbenv import lmdb_errors, prefixed
from blocksnap.store.objectindex import ObjectIndex

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn


class CatalogIndex(ObjectIndex):
    """The volumes, snapshots, timeline, settings and checkpoints databases of an Index."""

    def volume(self, name: str) -> dict[str, Any] | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(name.encode(), db=self.volumes)
        return json_entry(value, f"volume {name}") if value is not None else None

    def volume_names(self) -> list[str]:
        with lmdb_errors("reading index"), self._begin() as txn:
            return [bytes(k).decode() for k, _ in txn.cursor(db=self.volumes)]

    def snapshot_ids(self, volume: str) -> list[str]:
        """The volume's snapshot ids, oldest first."""
        prefix = volume.encode() + b"\x00"
        with lmdb_errors("reading index"), self._begin() as txn:
            return [value.decode() for _, value in prefixed(txn, self.timeline, prefix)]

    def snapshot_records(self, volume: str) -> list[tuple[str, bytes]]:
        """(id, record) of the volume's snapshots, oldest first, from one transaction, so
        a snapshot removed concurrently is either listed whole or not at all."""
        prefix = volume.encode() + b"\x00"
        out = []
        with lmdb_errors("reading index"), self._begin() as txn:
            for _, value in prefixed(txn, self.timeline, prefix):
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

    def setting(self, key: bytes) -> bytes | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            value = txn.get(key, db=self.settings)
        return None if value is None else bytes(value)

    def settings_with(self, prefix: bytes) -> dict[bytes, bytes]:
        """Every setting whose key starts with prefix, the prefix removed from the keys."""
        with lmdb_errors("reading index"), self._begin() as txn:
            return {k[len(prefix) :]: v for k, v in prefixed(txn, self.settings, prefix)}

    # --- writes ------------------------------------------------------------------------

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

        def body(txn: Txn) -> bool:
            if intent is not None:
                txn.delete(intent, db=self.intents)
            if drop_checkpoint:
                self._drop_checkpoint(txn, volume)
            if txn.get(snapshot_id.encode(), db=self.snapshots) is not None:
                return False  # a sync of the catalog got here first
            raw = txn.get(volume.encode(), db=self.volumes)
            if raw is not None:
                vol = json_entry(raw, f"volume {volume}")
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
            for key, _ in prefixed(txn, self.timeline, prefix):
                last = max(last, int(SEQ.unpack_from(key, len(prefix))[0]))
        return last + 1

    def _drop_checkpoint(self, txn: Txn, volume: str) -> None:
        old = txn.get(volume.encode(), db=self.checkpoints)
        if old is not None:
            epoch = self._epoch(txn)
            for root in pinned_roots(bytes(old), volume.encode()):
                self._decref(txn, root, epoch)
            txn.delete(volume.encode(), db=self.checkpoints)

    def drop_checkpoints(self) -> None:
        """Drop every volume's checkpoint (what they pin may be gone: store/collection.py)."""

        def body(txn: Txn) -> None:
            for volume in [bytes(k).decode() for k, _ in txn.cursor(db=self.checkpoints)]:
                self._drop_checkpoint(txn, volume)

        self._write("dropping checkpoints", body)

    def put_checkpoint(self, volume: str, record: bytes, pinned: list[bytes]) -> None:
        """Replace the volume's checkpoint; record's "pinned" must list pinned, in hex.

        The new roots are counted before the old ones are released, so what both share
        never touches 0."""
        if pinned_roots(record, volume.encode()) != pinned:
            raise ValueError("checkpoint record does not list the roots it pins")

        def body(txn: Txn) -> None:
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

        def body(txn: Txn) -> bool:
            key = snapshot_id.encode()
            if txn.get(key, db=self.snapshots) is None:
                return False
            if txn.get(PROTECTED_PREFIX + key, db=self.settings) is not None:
                raise ProtectedError(f"snapshot {snapshot_id} is protected")
            txn.put(REMOVING_PREFIX + key, writer_id, db=self.settings)
            txn.put(intent, b"", db=self.intents)
            return True

        return self._write("removing snapshot", body)

    def unmark_removing(
        self,
        snapshot_id: str,
        intent: bytes | None = None,
        *,
        marked_by: bytes | None = None,
        unregistered: bool = False,
    ) -> bool:
        """End a removal that did not happen (its tombstone was never written); False if
        it is not marked (so).  marked_by: only if that writer's mark it still is;
        unregistered: only if that writer has left the registry.  Both are checked in
        the same transaction, so a prune that registers and marks meanwhile keeps its
        mark."""

        def body(txn: Txn) -> bool:
            key = REMOVING_PREFIX + snapshot_id.encode()
            marker = txn.get(key, db=self.settings)
            if marker is None:
                return False
            if marked_by is not None and bytes(marker) != marked_by:
                return False
            if unregistered and txn.get(bytes(marker), db=self.writers_db) is not None:
                return False
            txn.delete(key, db=self.settings)
            if intent is not None:
                txn.delete(intent, db=self.intents)
            return True

        return self._write("removing snapshot", body)

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

        def body(txn: Txn) -> bool:
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
                doc = json_entry(bytes(record), f"snapshot {snapshot_id}")
                volume = str(doc["volume"]).encode()
                found = timeline_key(str(doc["volume"]), int(doc["seq"]), snapshot_id)
                root = bytes.fromhex(doc["map"]["root"])
            except (KeyError, TypeError, ValueError) as exc:
                raise IntegrityError(f"index entry for snapshot {snapshot_id} is damaged") from exc
            if txn.get(found, db=self.timeline) != key:
                raise IntegrityError(f"snapshot {snapshot_id} is not in its volume's timeline")
            txn.delete(found, db=self.timeline)
            txn.delete(key, db=self.snapshots)
            if next(prefixed(txn, self.timeline, volume + b"\x00"), None) is None:
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

        def body(txn: Txn) -> None:
            if only_if is not None and txn.get(only_if, db=self.snapshots) is None:
                raise NotFoundError(f"snapshot {only_if.decode()} does not exist")
            if only_if is not None and txn.get(REMOVING_PREFIX + only_if, db=self.settings):
                raise LockedError(f"snapshot {only_if.decode()} is being removed by a prune")
            txn.put(key, value, db=self.settings)

        self._write("writing settings", body)

    def delete_setting(self, key: bytes) -> None:
        def body(txn: Txn) -> None:
            txn.delete(key, db=self.settings)

        self._write("writing settings", body)
