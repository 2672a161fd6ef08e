"""A byte range of an image as a file object that filesystem libraries read through.

Libraries written in C call `read`, `seek` and `get_size` (libyal) or `read(offset, size)`
(The Sleuth Kit) and turn any exception from them into an error of their own.  A blocksnap
error raised underneath (a damaged block, a pack gone) must keep its name, so every window
of one image shares a `Latch` that remembers it for the layer above to raise instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from blocksnap.errors import BlocksnapError

PositionalRead = Callable[[int, int], bytes]


class Latch:
    """The first blocksnap error a library swallowed, kept until taken."""

    def __init__(self) -> None:
        self.failure: BlocksnapError | None = None

    def take(self) -> BlocksnapError | None:
        failure, self.failure = self.failure, None
        return failure


class PositionalFile(io.RawIOBase):
    """A seekable, read-only binary file over `pread(offset, size)` and a size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def get_size(self) -> int:
        return self.size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
        if base is None or base + offset < 0:
            raise ValueError(f"invalid seek ({offset}, {whence})")
        self._pos = base + offset
        return self._pos

    def pread(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, short only at the end."""
        raise NotImplementedError

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        data = self.pread(self._pos, len(out))
        out[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        data = self.pread(self._pos, size)
        self._pos += len(data)
        return data


class Window(PositionalFile):
    """Bytes [offset, offset + size) of a positional reader, as a seekable binary file."""

    def __init__(self, pread: PositionalRead, offset: int, size: int, latch: Latch) -> None:
        super().__init__(size)
        self._pread = pread
        self.offset = offset
        self.latch = latch

    def sub(self, offset: int, size: int) -> Window:
        """The window [offset, offset + size) of this one, sharing its latch."""
        return Window(self._pread, self.offset + offset, size, self.latch)

    def pread(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size == 0 or offset < 0:
            return b""
        try:
            data = self._pread(self.offset + offset, size)
        except BlocksnapError as exc:
            if self.latch.failure is None:
                self.latch.failure = exc
            raise
        if len(data) != size:
            raise OSError(f"short read at {self.offset + offset}: {len(data)} of {size} bytes")
        return data
