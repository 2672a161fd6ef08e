"""A lazy, seekable, read-only image over a snapshot, fetching blocks on demand."""

from __future__ import annotations

import io
from collections import OrderedDict
from dataclasses import dataclass

from blocksnap.blockmap import ZERO_ID, BlockMap
from blocksnap.errors import IntegrityError
from blocksnap.model import BLOCK_ID_SIZE, READ_BATCH_SIZE, BlockSource, SnapshotInfo

DEFAULT_CACHE_SIZE = 16 << 20  # blocks kept; 32 MiB fetched no fewer for a whole tree (README)


@dataclass(slots=True)
class ReadStats:
    """What an ImageReader fetched: blocks from the store, cache hits, bytes decoded."""

    blocks_fetched: int = 0  # read-ahead included
    cache_hits: int = 0  # blocks served from the cache, fetched by an earlier read
    bytes_fetched: int = 0
    blocks_read_ahead: int = 0  # of blocks_fetched, those fetched before a read asked


class ImageReader(io.RawIOBase):
    """The snapshot's image as a binary file; every fetched block is checked against its ID.

    The blocks one read needs that are not cached are fetched in one batch
    (BlockSource.read_blocks, at most model.READ_BATCH_SIZE bytes and half the cache at a
    time).  A read that starts where the previous one ended continues a sequential run,
    and its batch also takes blocks past the read: half as many as the run has covered so
    far, up to that same bound.  A file or image read front to back so costs a few large
    reads of the store, and what it fetches past its end is at most half of what it read,
    while random reads fetch only what they touch.
    """

    def __init__(
        self,
        source: BlockSource,
        info: SnapshotInfo,
        cache_size: int = DEFAULT_CACHE_SIZE,
        touched: set[int] | None = None,
    ) -> None:
        """`touched`, if given, gets the index of every block read, from the cache or not
        (blocks read ahead count once a read asks for them)."""
        super().__init__()
        self.touched = touched
        self.info = info
        self.size = info.image_size
        self._source = source
        self._map = BlockMap(source.read_node, info.map_root, info.map_height, info.block_count)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_blocks = max(1, cache_size // info.block_size)
        # Half the cache, so that a batch never evicts the blocks it was fetched for.
        self._batch_blocks = max(
            1, min(READ_BATCH_SIZE // info.block_size, self._cache_blocks // 2)
        )
        self._pos = 0
        self._run_start = 0  # where the current sequential run of reads began
        self._run_end = -1  # where the last read ended
        self._fresh: set[int] = set()  # fetched for the read in progress: no cache hit
        self._zero = bytes(info.block_size)  # shared by every cached zero block
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
        if block_index not in self._cache:
            self._fetch(block_index, block_index, 0)
        data = self._cache[block_index]
        self._cache.move_to_end(block_index)
        if block_index in self._fresh:
            self._fresh.discard(block_index)
        else:
            self.stats.cache_hits += 1
        return data

    def _fetch(self, first: int, last: int, ahead: int) -> None:
        """Cache the blocks first..last that are missing, in one batch, and up to `ahead`
        blocks after last; the batch is cut at its bound and at the image's end."""
        end = min(last + 1 + ahead, first + self._batch_blocks, self.info.block_count)
        wanted = [i for i in range(first, end) if i not in self._cache]
        if not wanted:
            return
        _digests, ids = self._map.entries(wanted[0], wanted[-1] + 1 - wanted[0])
        bs = self.info.block_size
        at = [(i - wanted[0]) * BLOCK_ID_SIZE for i in wanted]
        block_ids = [ids[o : o + BLOCK_ID_SIZE] for o in at]
        contents = self._source.read_blocks(block_ids)
        for i, block_id, data in zip(wanted, block_ids, contents, strict=True):
            length = min(bs, self.size - i * bs)
            if block_id == ZERO_ID:
                data = self._zero if length == bs else bytes(length)
            else:
                self.stats.blocks_fetched += 1
                self.stats.bytes_fetched += len(data)
                if i > last:
                    self.stats.blocks_read_ahead += 1
                if len(data) != length:
                    raise IntegrityError(
                        f"block {i} of snapshot {self.info.id} holds {len(data)} bytes, "
                        f"expected {length}"
                    )
            self._cache[i] = data
            if i <= last:
                self._fresh.add(i)
        while len(self._cache) > self._cache_blocks:
            self._fresh.discard(self._cache.popitem(last=False)[0])

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed image")
        out = memoryview(buffer).cast("B")
        want = max(0, min(len(out), self.size - self._pos))
        if want == 0:
            return 0
        bs = self.info.block_size
        if self._pos != self._run_end:
            self._run_start = self._pos
        last = (self._pos + want - 1) // bs
        ahead = 0
        if self._run_start < self._pos:  # this read continues a sequential run
            ahead = (self._pos + want - self._run_start) // bs // 2
        self._fresh.clear()
        done = 0
        while done < want:
            pos = self._pos + done
            index, within = divmod(pos, bs)
            if index not in self._cache:
                self._fetch(index, last, ahead)
            data = self.block(index)
            n = min(len(data) - within, want - done)
            out[done : done + n] = data[within : within + n]
            done += n
        self._pos += done
        self._run_end = self._pos
        return done
