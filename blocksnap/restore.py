"""Whole-image restore: a snapshot onto a new sparse file, an existing file or a device.

A new file is built under a temporary name beside the target and renamed into place only
when complete, so a failed or interrupted restore leaves nothing behind.  An existing file
or block device is written in place (a device with O_DIRECT, in runs gathered in aligned
buffers, where it takes them); with only_changed, each of its blocks is first read
and compared (by the same seeded XXH3-128 change filter that snapshots use) and only blocks
that differ are written.  Every block written was checked against its ID by the source.

Workers take the image in chunks of CHUNK_SIZE and ask the source for a chunk's blocks in
batches of read_batch_size bytes (model.READ_BATCH_SIZE, less where READ_BUDGET shared
by the workers is smaller), which a store reads with one ranged get per run of nearby
records: a restore from a remote store is bound by its bandwidth, not by a round trip per
block.  Each worker holds at most one batch.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from blocksnap import native
from blocksnap.blockmap import ZERO_ID, BlockMap
from blocksnap.errors import Interrupted, RestoreError
from blocksnap.model import (
    BLOCK_ID_SIZE,
    READ_BATCH_SIZE,
    BlockSource,
    Progress,
    ProgressCallback,
    ProgressUnit,
    SnapshotInfo,
)
from blocksnap.workers import worker_pool

CHUNK_SIZE = 8 << 20
# Block bytes all workers together hold from the source at once, at most: on a host with
# many cores each worker's batch is smaller than READ_BATCH_SIZE, so memory stays flat.
READ_BUDGET = 64 << 20
# Onto a block device, blocks go through one aligned buffer per worker of DIRECT_RUN bytes
# with O_DIRECT: buffered writes and the final fsync took a loop device 3.4 s per GiB on
# the reference machine, direct ones 0.5 s (dd bs=4M to 16M oflag=direct conv=fsync).
DIRECT_RUN = 2 << 20
DIRECT_ALIGN = 4096  # offsets and lengths of direct writes: any device's logical block
O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere devices are written buffered


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    while view:
        done = os.pwrite(fd, view, pos)
        view, pos = view[done:], pos + done


class _DirectWriter:
    """A worker's writes onto a device: consecutive blocks gathered in an aligned buffer
    and written with O_DIRECT in runs; what is not aligned (the image's end, on a larger
    device) goes through the ordinary descriptor, as does everything once the device
    refuses a direct write (EINVAL: a logical block larger than DIRECT_ALIGN)."""

    def __init__(self, direct_fd: int, fd: int, block_size: int) -> None:
        self.direct_fd = direct_fd
        self.fd = fd
        self.size = max(DIRECT_RUN, block_size)
        self.buf = mmap.mmap(-1, self.size)  # page-aligned, as O_DIRECT needs
        self.view = memoryview(self.buf)
        self.start = 0  # where in the target the buffer's first byte goes
        self.fill = 0

    def add(self, pos: int, data: bytes | memoryview) -> None:
        if self.fill and (pos != self.start + self.fill or self.fill + len(data) > self.size):
            self.flush()
        if not self.fill:
            self.start = pos
        self.view[self.fill : self.fill + len(data)] = data
        self.fill += len(data)

    def discard(self) -> None:
        """Forget what is gathered: the chunk it belongs to failed."""
        self.fill = 0

    def flush(self) -> None:
        fill, self.fill = self.fill, 0
        aligned = 0 if self.start % DIRECT_ALIGN else fill // DIRECT_ALIGN * DIRECT_ALIGN
        if aligned and self.direct_fd >= 0:
            try:
                _pwrite_all(self.direct_fd, self.view[:aligned], self.start)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_fd = -1
                aligned = 0
        else:
            aligned = 0
        if aligned < fill:
            _pwrite_all(self.fd, self.view[aligned:fill], self.start + aligned)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore did."""

    target: str
    image_size: int
    blocks_written: int
    blocks_unchanged: int  # with only_changed: blocks already right in the target
    zero_blocks: int  # left as holes (new file) or written as zeros (in place)
    # written + unchanged + zero == the snapshot's block count
    bytes_written: int


def _open_device(target: str, image_size: int) -> tuple[int, bool]:
    """Return (fd of the target if it is a block device else -1, whether target is new)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise RestoreError(f"cannot inspect {target}: {exc.strerror or exc}") from exc
    try:
        if st is not None and stat.S_ISBLK(st.st_mode):
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < image_size:
                os.close(fd)
                raise RestoreError(
                    f"device {target} holds {size} bytes; the image needs {image_size}"
                )
            return fd, False
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise RestoreError(f"target {target} is not a regular file or block device")
        return -1, st is None
    except PermissionError:
        raise RestoreError(f"permission denied opening {target}") from None


def restore_image(
    source: BlockSource,
    info: SnapshotInfo,
    target: str,
    *,
    filter_seed: int,
    only_changed: bool = False,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    read_batch_size: int = READ_BATCH_SIZE,
) -> RestoreResult:
    """Write the snapshot's image to target (see the module docstring for the cases).
    read_batch_size: block bytes asked of the source at once; one block size gives one
    read per block (the benchmarks compare the two)."""
    fd, is_new = _open_device(target, info.image_size)
    device = fd >= 0
    direct_fd = -1
    tmp: str | None = None
    in_place = fd >= 0 or (not is_new and only_changed)
    try:
        if fd < 0:
            if in_place:
                fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
                os.ftruncate(fd, info.image_size)
            else:
                directory = os.path.dirname(os.path.abspath(target))
                tmp = os.path.join(
                    directory, f".{os.path.basename(target)}.blocksnap-{secrets.token_hex(4)}"
                )
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                os.ftruncate(fd, info.image_size)
        if device and O_DIRECT:
            # The device already opened (not the path again, which a symlink re-pointed
            # meanwhile could turn into another device); not every device takes O_DIRECT.
            with contextlib.suppress(OSError):
                direct_fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | O_DIRECT | os.O_CLOEXEC)
        result = _write(
            source,
            info,
            fd,
            direct_fd,
            in_place,
            only_changed,
            filter_seed,
            progress,
            workers,
            read_batch_size,
        )
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if tmp is not None:
            os.rename(tmp, target)
            tmp = None
        return RestoreResult(target, info.image_size, *result)
    except KeyboardInterrupt:
        raise Interrupted("restore interrupted") from None
    except PermissionError:
        raise RestoreError(f"permission denied writing {target}") from None
    except OSError as exc:
        raise RestoreError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        if direct_fd >= 0:
            os.close(direct_fd)
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _write(
    source: BlockSource,
    info: SnapshotInfo,
    fd: int,
    direct_fd: int,
    in_place: bool,
    only_changed: bool,
    seed: int,
    progress: ProgressCallback | None,
    workers: int | None,
    read_batch_size: int,
) -> tuple[int, int, int, int]:
    bs = info.block_size
    workers = workers or os.cpu_count() or 2
    per_batch = max(1, min(read_batch_size, READ_BUDGET // workers) // bs)
    block_map = BlockMap(source.read_node, info.map_root, info.map_height, info.block_count)
    per_chunk = max(1, CHUNK_SIZE // bs)
    totals = [0, 0, 0, 0]  # written, unchanged, zero, bytes
    report: Callable[[Progress], None] = progress or (lambda _p: None)
    zeros = bytes(bs)
    local = threading.local()  # each worker's _DirectWriter, onto a device

    def work(start: int, digests: bytes, ids: bytes) -> tuple[int, int, int, int]:
        count = len(ids) // BLOCK_ID_SIZE
        offset = start * bs
        length = min(count * bs, info.image_size - offset)
        current_flags = current = None
        if only_changed and in_place:
            existing = os.pread(fd, length, offset)
            current_flags = bytearray(count)
            current = bytearray(count * 16)
            native.scan(existing, bs, seed, digests, current_flags, current)
        out: _DirectWriter | None = None
        if direct_fd >= 0:
            out = getattr(local, "out", None)
            if out is None:
                out = local.out = _DirectWriter(direct_fd, fd, bs)
            out.discard()  # what a failed chunk of this worker left is not written
        written = unchanged = zero = nbytes = 0
        wanted: list[tuple[int, bytes]] = []  # (i, block id) of the blocks to write
        for i in range(count):
            if current_flags is not None and not current_flags[i] & native.FLAG_CHANGED:
                unchanged += 1
            else:
                wanted.append((i, ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE]))
        for first in range(0, len(wanted), per_batch):
            run = wanted[first : first + per_batch]
            # Zero blocks are not stored: their entries (b"") are replaced below.
            contents = source.read_blocks([block_id for _, block_id in run])
            for (i, block_id), data in zip(run, contents, strict=True):
                pos = offset + i * bs
                size = min(bs, info.image_size - pos)
                view = memoryview(data)
                if block_id == ZERO_ID:
                    zero += 1
                    if not in_place:
                        continue  # a hole in the new sparse file
                    view = memoryview(zeros)[:size]
                else:
                    written += 1
                    if len(data) != size:
                        raise RestoreError(
                            f"block {start + i} holds {len(data)} bytes, expected {size}"
                        )
                if out is not None:
                    out.add(pos, view)
                else:
                    _pwrite_all(fd, view, pos)
                nbytes += size
        if out is not None:
            out.flush()  # the chunk's last run: a chunk's work is done when it is written
        return written, unchanged, zero, nbytes

    def collect(future: Future[tuple[int, int, int, int]]) -> None:
        for k, v in enumerate(future.result()):
            totals[k] += v
        done_blocks = totals[0] + totals[1] + totals[2]
        done = min(done_blocks * bs, info.image_size)
        report(Progress("restore", done, info.image_size, ProgressUnit.BYTES))

    in_flight: deque[Future[tuple[int, int, int, int]]] = deque()
    # On any error the pool cancels what has not started and joins what runs before the
    # target's descriptor is closed: workers write to it.
    with worker_pool(workers, "blocksnap-restore") as pool:
        for start in range(0, info.block_count, per_chunk):
            n = min(per_chunk, info.block_count - start)
            digests, ids = block_map.entries(start, n)
            in_flight.append(pool.submit(work, start, digests, ids))
            if len(in_flight) > workers * 2:
                collect(in_flight.popleft())
        while in_flight:
            collect(in_flight.popleft())
    written, unchanged, zero, nbytes = totals
    return written, unchanged, zero, nbytes
