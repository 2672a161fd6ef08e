"""The protocol every filesystem adapter implements, and the values it returns.

An adapter wraps one filesystem library.  It hands out nodes, one per file, directory or
link; the layer above (`blocksnap.fs.filesystem`) turns paths into nodes and library
exceptions into `FilesystemError`, so an adapter stays a thin translation of its library.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol


class FileKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "dir"
    SYMLINK = "symlink"
    CHAR_DEVICE = "chardev"
    BLOCK_DEVICE = "blockdev"
    FIFO = "fifo"
    SOCKET = "socket"
    OTHER = "other"


# The file type bits of a POSIX st_mode, as ext and XFS store them.
_MODE_KINDS = {
    0o100000: FileKind.FILE,
    0o040000: FileKind.DIRECTORY,
    0o120000: FileKind.SYMLINK,
    0o020000: FileKind.CHAR_DEVICE,
    0o060000: FileKind.BLOCK_DEVICE,
    0o010000: FileKind.FIFO,
    0o140000: FileKind.SOCKET,
}


def kind_of_mode(mode: int) -> FileKind:
    return _MODE_KINDS.get(mode & 0o170000, FileKind.OTHER)


@dataclass(frozen=True, slots=True)
class FileStat:
    """One file's metadata as the filesystem records it; None where it records nothing."""

    path: str  # absolute, "/"-separated, whatever the filesystem's own separator
    name: str  # as stored: a hostile image may put "/" in it, so it is not taken from path
    kind: FileKind
    size: int
    mode: int | None  # permission bits (0o7777); FAT and NTFS have none
    uid: int | None
    gid: int | None
    mtime_ns: int | None  # nanoseconds since the Unix epoch
    atime_ns: int | None
    nlink: int | None  # None where the filesystem keeps no link count
    file_id: int | None  # inode or MFT reference: equal for hard links
    target: str | None = None  # a symlink's target


class Node(Protocol):
    """One entry of a filesystem as an adapter sees it."""

    def stat(self, path: str, name: str) -> FileStat:
        """The entry's metadata, reported under `path` and `name`."""
        ...

    def children(self) -> Iterator[tuple[str, Node]]:
        """A directory's entries, without "." and ".."; names as stored."""
        ...

    def lookup(self, name: str) -> Node | None:
        """The directory's entry called `name` if the library can find it without reading
        every entry; None sends the caller to children()."""
        ...

    def read(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes of a regular file's content from `offset`."""
        ...

    def data_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        """The (start, end) byte ranges of a regular file of `size` bytes that may hold
        data, in file order, from the file's own extent map; whatever lies outside them
        reads as zeros (a hole, or an extent allocated but never written).  An adapter
        that cannot tell yields (0, size).  The image is hostile: the layer above clips and
        merges what comes from here, and refuses it out of order."""
        ...

    def xattrs(self) -> dict[str, bytes]:
        """Extended attributes by full name ("user.x", "security.selinux"); {} if none."""
        ...


@dataclass(frozen=True, slots=True)
class Mounted:
    """What an adapter returns when it recognised an image: the root and how to let go."""

    root: Node
    kind: str  # "ext4", "xfs", "ntfs", "fat32", "exfat" ...
    library: str  # the library and its version, as reported by the library
    case_insensitive: bool
    close: Callable[[], None]
