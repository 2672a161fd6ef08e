"""Which blocks of a volume to read: changed-extent hints and a sparse file's data, as runs.

A run is (first block, end block), half-open; run lists are sorted and disjoint.

Changed-extent hints come from whoever tracks writes to the volume (a hypervisor's dirty
bitmap, LVM thin_delta, VMware CBT) as byte extents (offset, length).  The text form has
one "OFFSET LENGTH" pair of decimal byte counts per line; blank lines and "#" comments
are ignored.  Extents may come in any order and may overlap or touch; each must lie
inside the image.  A block is read when any byte of it is in an extent.

Holes of a sparse regular file are found with SEEK_DATA/SEEK_HOLE, lazily, so that a
file with millions of extents costs no memory up front.  A block wholly inside a hole
reads as zeros, so it is recorded as a zero block without being read.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import TextIO

from blocksnap.errors import SourceError, UsageError

MAX_HINT_LINE = 200


def parse_extents(lines: Iterable[str], what: str = "changed extents") -> list[tuple[int, int]]:
    """(offset, length) pairs from the text form; UsageError names the first bad line."""
    out: list[tuple[int, int]] = []
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_HINT_LINE:
            raise UsageError(f"{what} line {number}: line too long")
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) != 2 or not all(f.isascii() and f.isdigit() for f in fields):
            raise UsageError(
                f"{what} line {number}: expected OFFSET LENGTH in decimal bytes, got {text[:60]!r}"
            )
        out.append((int(fields[0]), int(fields[1])))
    return out


def read_extents(stream: TextIO, what: str) -> list[tuple[int, int]]:
    """parse_extents over a text stream, turning decoding errors into UsageError."""
    try:
        return parse_extents(stream, what)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what}: not text ({exc.reason})") from None


def hint_runs(
    extents: Iterable[tuple[int, int]], image_size: int, block_size: int
) -> list[tuple[int, int]]:
    """The block runs that the extents touch, merged; UsageError for an invalid extent."""
    cleaned: list[tuple[int, int]] = []
    for item in extents:
        try:
            offset, length = item
        except (TypeError, ValueError):
            raise UsageError(f"changed extent {item!r} is not an (offset, length) pair") from None
        if not isinstance(offset, int) or not isinstance(length, int):
            raise UsageError(f"changed extent {item!r} is not a pair of integers")
        if offset < 0 or length < 0:
            raise UsageError(f"changed extent ({offset}, {length}) is negative")
        if offset + length > image_size:
            raise UsageError(
                f"changed extent ({offset}, {length}) ends at {offset + length}, "
                f"past the end of the {image_size}-byte image"
            )
        if length:
            cleaned.append((offset // block_size, -(-(offset + length) // block_size)))
    cleaned.sort()
    runs: list[tuple[int, int]] = []
    for first, end in cleaned:
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((first, end))
    return runs


def runs_fingerprint(runs: list[tuple[int, int]] | None) -> str | None:
    """A short digest of a run list, to tell whether a resumed run got the same hints."""
    if runs is None:
        return None
    h = hashlib.sha256()
    for first, end in runs:
        h.update(f"{first} {end}\n".encode())
    return h.hexdigest()[:32]


class DataRuns:
    """The blocks of a regular file that hold data, found lazily with SEEK_DATA/SEEK_HOLE.

    Blocks are asked about in increasing order; a file system that cannot tell holes
    apart makes everything data.
    """

    def __init__(self, fd: int, size: int, block_size: int) -> None:
        self.fd = fd
        self.size = size
        self.bs = block_size
        self.block_count = -(-size // block_size)
        self._run: tuple[int, int] | None = None  # the first data run ending after _from
        self._from = 0
        self.supported = True

    def _seek(self, offset: int, whence: int) -> int | None:
        """lseek, or None for ENXIO (no more data past offset)."""
        try:
            return os.lseek(self.fd, offset, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self.supported = False
                return offset
            raise SourceError(f"cannot find the holes of the source: {exc.strerror}") from exc

    def _find(self, block: int) -> tuple[int, int]:
        """The first data run (in blocks) that ends after block."""
        if not self.supported:
            return (block, self.block_count)
        data = self._seek(block * self.bs, os.SEEK_DATA)
        if data is None or data >= self.size:
            return (self.block_count, self.block_count)
        hole = self._seek(data, os.SEEK_HOLE)
        if not self.supported or hole is None:
            return (block, self.block_count)
        first, end = data // self.bs, min(self.block_count, -(-hole // self.bs))
        # Holes smaller than a block do not split a run: the block around them is read.
        while end < self.block_count:
            data = self._seek(end * self.bs, os.SEEK_DATA)
            if data is None or data >= self.size or not self.supported:
                break
            if data // self.bs > end:
                break
            hole = self._seek(data, os.SEEK_HOLE)
            if hole is None or not self.supported:
                end = self.block_count
                break
            end = max(end, min(self.block_count, -(-hole // self.bs)))
        return (first, end)

    def split(self, first: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(first, end, holds data) runs covering blocks first..end, in order."""
        pos = first
        while pos < end:
            if self._run is None or self._run[1] <= pos or self._from > pos:
                self._run = self._find(pos)
                self._from = pos
            data_first, data_end = self._run
            if data_first > pos:
                stop = min(data_first, end)
                yield (pos, stop, False)
            else:
                stop = min(data_end, end)
                yield (pos, stop, True)
            pos = stop
