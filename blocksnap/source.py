"""The source of a snapshot: a file, block device or stream opened for reading, its exact
size and changes to it while it is read, and its identity, by which a resumed run tells
that it reads the same medium as the run it resumes."""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO

from blocksnap.errors import SourceError, UsageError

# What a snapshot reads: a path (image file or block device) or a readable binary stream.
SourceArg = str | os.PathLike[str] | BinaryIO | io.RawIOBase | io.BufferedIOBase


def _disk_sequence(st: os.stat_result) -> int | None:
    """The block device's diskseq (Linux 5.15 and later): a number the kernel never gives
    twice until reboot, new each time a medium is attached (a loop device set up again on
    another file, a device-mapper device made again under the same name).  For a partition,
    its disk's.  None where the kernel has none."""
    base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    place = f"{base}/../diskseq" if os.path.exists(f"{base}/partition") else f"{base}/diskseq"
    try:
        with open(place, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class Source:
    """A readable volume: exact size when known, detection of size changes, and an
    identity that tells whether a later run reads the same medium (see resume_from in
    snapshot.py)."""

    def __init__(self, source: SourceArg, source_id: str | None = None) -> None:
        self._owned = False
        self.size: int | None = None
        self.regular = False
        self._base = 0  # a stream's position when handed over: its offset 0
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise SourceError(f"source {path} does not exist") from None
            except PermissionError:
                raise SourceError(f"permission denied reading {path}") from None
            except OSError as exc:
                raise SourceError(f"cannot open {path}: {exc.strerror or exc}") from exc
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                os.close(fd)
                raise SourceError(f"source {path} is not a regular file or block device")
            self.regular = stat.S_ISREG(st.st_mode)
            self.size = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, 0, os.SEEK_SET)
            self.fd: int | None = fd
            self.file: BinaryIO | io.RawIOBase | io.BufferedIOBase = os.fdopen(
                fd, "rb", buffering=0
            )
            self.name = path
            self._owned = True
            self.identity: dict[str, int | str]
            if self.regular:
                # Any write or replacement in place sets ctime, which no caller can set
                # back (unlike mtime, which touch -r restores).
                self.identity = {
                    "dev": st.st_dev,
                    "ino": st.st_ino,
                    "mtime_ns": st.st_mtime_ns,
                    "ctime_ns": st.st_ctime_ns,
                    "size": self.size,
                }
            else:
                self.identity = {"rdev": st.st_rdev, "size": self.size}
                if (seq := _disk_sequence(st)) is not None:
                    self.identity["diskseq"] = seq
        else:
            self.fd = None
            self.file = source
            self.name = getattr(source, "name", "<stream>")
            try:
                if source.seekable():
                    self._base = source.tell()
                    self.size = source.seek(0, os.SEEK_END) - self._base
                    source.seek(self._base)
            except OSError:
                self.size = None
            self.identity = {} if self.size is None else {"size": self.size}
        if source_id is not None:
            if not source_id or not source_id.isprintable():
                raise UsageError("the source id must be printable text")
            # The caller's name for the medium stands in for the kernel's: the same
            # image attached again is the same medium to it (its content is compared).
            self.identity.pop("diskseq", None)
            self.identity["source_id"] = source_id
        self.done = 0

    @property
    def identified(self) -> bool:
        """Whether the identity changes when the medium does: a regular file (its inode
        and ctime), a block device with a diskseq, or a source id the caller vouches for."""
        return self.regular or "diskseq" in self.identity or "source_id" in self.identity

    def read_at(self, offset: int, size: int) -> bytes:
        """size bytes at offset (fewer at the end), for checks outside the scan."""
        if self.fd is not None:
            try:
                return os.pread(self.fd, size, offset)
            except OSError as exc:
                raise SourceError(f"error reading {self.name}: {exc.strerror or exc}") from exc
        view = memoryview(bytearray(size))
        got = self.read_into(view, offset)
        return bytes(view[:got])

    def _read_into(self, view: memoryview) -> int:
        readinto = getattr(self.file, "readinto", None)
        try:
            if readinto is not None:
                got = readinto(view)
                return got or 0
            data = self.file.read(len(view))
        except OSError as exc:
            raise SourceError(f"error reading {self.name}: {exc.strerror or exc}") from exc
        view[: len(data)] = data
        return len(data)

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill view from offset of a stream (seeking if needed); fewer bytes only at the
        end of the volume, 0 after it."""
        if offset != self.done:
            try:
                self.file.seek(self._base + offset)
            except OSError as exc:
                raise SourceError(f"cannot seek in {self.name}: {exc.strerror or exc}") from exc
            self.done = offset
        want = len(view) if self.size is None else min(len(view), self.size - self.done)
        got = 0
        while got < want:
            n = self._read_into(view[got:want])
            if n == 0:
                break
            got += n
        self.done += got
        if self.size is not None and got < want:
            raise SourceError(
                f"{self.name} shrank while being read ({self.size} bytes expected, "
                f"ended at {self.done})"
            )
        if (
            self.size is not None
            and self.done == self.size
            and got > 0
            and self._read_into(memoryview(bytearray(1)))
        ):
            raise SourceError(f"{self.name} grew while being read (past {self.size} bytes)")
        return got

    def check_end(self) -> None:
        """For a path source read by the workers: refuse it if its size changed meanwhile."""
        assert self.fd is not None and self.size is not None
        try:
            end = os.lseek(self.fd, 0, os.SEEK_END)
            grew = os.pread(self.fd, 1, self.size)
        except OSError as exc:
            raise SourceError(f"error reading {self.name}: {exc.strerror or exc}") from exc
        if grew or end > self.size:
            raise SourceError(f"{self.name} grew while being read (past {self.size} bytes)")
        if end < self.size:
            raise SourceError(
                f"{self.name} shrank while being read ({self.size} bytes expected, now {end})"
            )

    def close(self) -> None:
        if self._owned:
            self.file.close()
