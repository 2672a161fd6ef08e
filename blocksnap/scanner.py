"""The scan of a snapshot run: the per-buffer work on worker threads (Scanner: read,
filter against the parent, hash and seal what changed) and the writer of the new block
map (MapWriter), which stores its nodes through the store writer."""

from __future__ import annotations

import re
from dataclasses import dataclass

from blocksnap import native
from blocksnap.blockmap import LEAF_SPAN, BlockMap, MapBuilder, node_children
from blocksnap.errors import SourceError
from blocksnap.model import BLOCK_ID_SIZE, FILTER_DIGEST_SIZE
from blocksnap.store.records import Sealed
from blocksnap.store.repository import Store
from blocksnap.store.writer import StoreWriter

READ_PART = 1 << 20  # read and scan in parts that stay in a core's L2 cache
# Flags worth a look in Python: zero, changed, or both; most blocks of an incremental have 0.
_INTERESTING = re.compile(b"[\x01-\x03]")


@dataclass(slots=True)
class Scanned:
    """A worker's result for one buffer: the map entries, the new records and the counts."""

    count: int
    digests: bytearray
    ids: bytearray
    new: list[Sealed]  # records of the blocks the index lacked, sealed by the worker
    zero: int
    changed: list[int]  # indices, within the buffer, of blocks that differ from the parent
    hashed: int


class Scanner:
    """The per-buffer work that runs on worker threads."""

    def __init__(self, store: Store, writer: StoreWriter, block_size: int) -> None:
        self.store = store
        self.writer = writer
        self.block_size = block_size
        self.seed = store.config.filter_seed
        self.hash = store.hash

    def __call__(
        self,
        buf: memoryview,
        parent_digests: bytes | None,
        parent_ids: bytes,
        read_at: tuple[int, int, str] | None = None,
    ) -> Scanned:
        """Scan buf against the parent's entries; with read_at=(fd, offset, name), first
        fill buf from that file (natively, each part scanned while still in cache)."""
        bs = self.block_size
        count = -(-len(buf) // bs)
        flags = bytearray(count)
        digests = bytearray(count * FILTER_DIGEST_SIZE)
        if read_at is None:
            native.scan(buf, bs, self.seed, parent_digests, flags, digests)
        else:
            fd, offset, name = read_at
            part = max(bs, READ_PART // bs * bs)
            try:
                got = native.read_scan(
                    fd, offset, buf, part, bs, self.seed, parent_digests, flags, digests
                )
            except OSError as exc:
                raise SourceError(f"error reading {name}: {exc.strerror or exc}") from exc
            if got < len(buf):
                raise SourceError(
                    f"{name} shrank while being read (ended at {offset + got}, "
                    f"{offset + len(buf)} bytes expected at least)"
                )
        ids = bytearray(parent_ids)
        zero = 0
        changed: list[int] = []
        hashed: list[tuple[int, bytes]] = []
        zero_id = bytes(BLOCK_ID_SIZE)
        for match in _INTERESTING.finditer(flags):
            i = match.start()
            f = flags[i]
            if f & native.FLAG_CHANGED:
                changed.append(i)
            if f & native.FLAG_ZERO:
                zero += 1
                ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE] = zero_id
            elif f & native.FLAG_CHANGED:
                block_id = self.hash(buf[i * bs : (i + 1) * bs])
                ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE] = block_id
                hashed.append((i, block_id))
        new: list[Sealed] = []
        if hashed:
            missing = self.writer.missing([block_id for _, block_id in hashed])
            for (i, block_id), absent in zip(hashed, missing, strict=True):
                if absent:  # sealed (compressed) here, on the worker thread
                    new.append(self.writer.seal_block(buf[i * bs : (i + 1) * bs], block_id))
        return Scanned(count, digests, ids, new, zero, changed, len(hashed))


class MapWriter:
    """Collects entries block by block and emits leaves to a MapBuilder."""

    def __init__(self, writer: StoreWriter, store: Store) -> None:
        self.writer = writer
        self.store = store
        self.metadata_size = 0
        self.builder = MapBuilder(self._put_node)
        self.digests = bytearray()
        self.ids = bytearray()
        self.block_count = 0  # entries taken so far
        self._last: tuple[bytes, bytes] = (b"", b"")  # (node, id): runs of equal leaves

    def _put_node(self, node: bytes) -> bytes:
        if node == self._last[0]:
            return self._last[1]
        node_id = self.store.hash(node)
        if not self.writer.has(node_id):
            self.metadata_size += self.writer.add(
                self.writer.seal_node(node, node_id), checked=True, children=node_children(node)
            )
        self._last = (node, node_id)
        return node_id

    def extend(self, digests: bytes | bytearray, ids: bytes | bytearray) -> None:
        self.block_count += len(digests) // FILTER_DIGEST_SIZE
        self.digests += digests
        self.ids += ids
        leaf_digests = LEAF_SPAN * FILTER_DIGEST_SIZE
        while len(self.digests) >= leaf_digests:
            self.builder.add_leaf(
                self.digests[:leaf_digests], self.ids[: LEAF_SPAN * BLOCK_ID_SIZE]
            )
            del self.digests[:leaf_digests]
            del self.ids[: LEAF_SPAN * BLOCK_ID_SIZE]

    def copy(self, source: BlockMap, end: int, total: int) -> None:
        """Take the entries up to block end from source, whose blocks are known to be the
        same; whole leaves by id, unread.  total: the new map's block count."""
        while self.block_count < end:
            leaf = self.block_count // LEAF_SPAN
            leaf_end = min((leaf + 1) * LEAF_SPAN, total)
            if (
                not self.digests
                and end >= leaf_end
                and leaf < source.leaf_count()
                and source.leaf_size(leaf) == leaf_end - leaf * LEAF_SPAN
            ):
                self.builder.add_leaf_id(source.leaf_id(leaf))
                self.block_count = leaf_end
            else:
                stop = min(end, leaf_end)
                self.extend(*source.entries(self.block_count, stop - self.block_count))

    def close_copy(self) -> tuple[bytes, int]:
        """(root, height) of a map of the entries so far; the map goes on growing."""
        return self.builder.close_copy(self.block_count, self.digests, self.ids)

    def finish(self) -> tuple[bytes, int]:
        if self.digests:
            self.builder.add_leaf(self.digests, self.ids)
            self.digests, self.ids = bytearray(), bytearray()
        return self.builder.finish(self.block_count)
