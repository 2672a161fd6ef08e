"""A lazy, seekable, read-only image over a snapshot, fetching blocks on demand."""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass

from blocksnap.blockmap import ZERO_ID, BlockMap
from blocksnap.errors import IntegrityError
from blocksnap.model import BlockSource, SnapshotInfo

DEFAULT_CACHE_SIZE = 32 << 20


@dataclass(slots=True)
class ReadStats:
    """What an ImageReader fetched: blocks from the store, cache hits, bytes decoded."""

    blocks_fetched: int = 0
    cache_hits: int = 0
    bytes_fetched: int = 0


class ImageReader(io.RawIOBase):
    """The snapshot's image as a binary file; every fetched block is checked against its ID."""

    def __init__(
        self,
        source: BlockSource,
        info: SnapshotInfo,
        cache_size: int = DEFAULT_CACHE_SIZE,
        touched: set[int] | None = None,
    ) -> None:
        """`touched`, if given, gets the index of every block read, from the cache or not."""
        super().__init__()
        self.touched = touched
        self.info = info
        self.size = info.image_size
        self._source = source
        self._map = BlockMap(source.read_node, info.map_root, info.map_height, info.block_count)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = max(1, cache_size // info.block_size)
        self._pos = 0
        self.stats = ReadStats()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed image")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def block(self, block_index: int) -> bytes:
        """One block's content (short for the last block), through the cache."""
        if self.touched is not None:
            self.touched.add(block_index)
        hit = self._cache.get(block_index)
        if hit is not None:
            self._cache.move_to_end(block_index)
            self.stats.cache_hits += 1
            return hit
        bs = self.info.block_size
        length = min(bs, self.size - block_index * bs)
        _digest, block_id = self._map.entry(block_index)
        if block_id == ZERO_ID:
            data = bytes(length)
        else:
            data = self._source.read_block(block_id)
            self.stats.blocks_fetched += 1
            self.stats.bytes_fetched += len(data)
            if len(data) != length:
                raise IntegrityError(
                    f"block {block_index} of snapshot {self.info.id} holds {len(data)} bytes, "
                    f"expected {length}"
                )
        self._cache[block_index] = data
        if len(self._cache) > self._cache_blocks:
            self._cache.popitem(last=False)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed image")
        out = memoryview(buffer).cast("B")
        want = max(0, min(len(out), self.size - self._pos))
        bs = self.info.block_size
        done = 0
        while done < want:
            pos = self._pos + done
            index, within = divmod(pos, bs)
            data = self.block(index)
            n = min(len(data) - within, want - done)
            out[done : done + n] = data[within : within + n]
            done += n
        self._pos += done
        return done
