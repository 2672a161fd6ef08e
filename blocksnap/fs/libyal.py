"""Nodes over the file entries of libfsext and libfsxfs, which share one POSIX entry API.

Both bindings come from the libyal project and expose the same file entry: a POSIX mode,
owner, nanosecond times, inode number and link count, and
`read_buffer_at_offset(size, offset)`, and the extent list `get_extent(i)`: (physical
offset, size, flags) in file order, each extent starting where the one before ended (so
also in its reads: an extent whose logical start overlaps the one before is read after
it, measured with a crafted ext4 inode), holes
and unwritten (preallocated) extents included with the sparse flag (bit 0) set, which the
library reads as zeros (measured on libfsext 20260821 and libfsxfs 20260901, on files
written by the kernel: a hole between or after extents, and posix_fallocate's extents over
non-zero disk, all come back flagged).  The modules `ext` and `xfs` open a volume and add
directory entries, symlink targets and extended attributes, which blocksnap reads itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from blocksnap.fs.node import FileKind, FileStat, Node, kind_of_mode

SPARSE_FLAG = 0x1  # LIBFSEXT_EXTENT_FLAG_IS_SPARSE, and the same bit in libfsxfs and libfsntfs


def extent_data_ranges(entry: Any, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of a libyal file entry that its extent list does not flag sparse.  An
    entry without extents keeps its data elsewhere (ext4 inline data, an NTFS resident
    attribute): all of it is data."""
    count = int(entry.number_of_extents)
    if count == 0:
        if size:
            yield (0, size)
        return
    at = 0
    for index in range(count):
        if at >= size:
            return  # a last extent is rounded up to a block; a hostile one runs on
        _physical, length, flags = entry.get_extent(index)
        start, at = at, at + int(length)
        if not int(flags) & SPARSE_FLAG and at > start:
            yield (start, min(at, size))


def child_path(path: str | None, name: str) -> str | None:
    """The path the libraries' path lookup can reach a directory's entry `name` by; None
    below a name that no path they take can spell: one holding "/" or NUL, or bytes that
    are not UTF-8 (they decode paths as UTF-8)."""
    if path is None or "/" in name or "\0" in name or not _utf8(name):
        return None
    return f"{path}/{name}"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class PosixEntryNode:
    """A libfsext or libfsxfs file entry, with the volume, and the path it was reached by
    (None where the libraries' path lookup cannot reach it)."""

    __slots__ = ("_entry", "_path", "_volume")

    def __init__(self, entry: Any, volume: Any, path: str | None) -> None:
        self._entry = entry
        self._volume = volume
        self._path = path

    def stat(self, path: str, name: str) -> FileStat:
        e = self._entry
        mode = int(e.file_mode)
        kind = kind_of_mode(mode)
        return FileStat(
            path=path,
            name=name,
            kind=kind,
            size=int(e.size or 0),
            mode=mode & 0o7777,
            uid=int(e.owner_identifier),
            gid=int(e.group_identifier),
            mtime_ns=int(e.get_modification_time_as_integer()),
            atime_ns=int(e.get_access_time_as_integer()),
            nlink=int(e.number_of_links),
            file_id=int(e.inode_number),
            target=self._target() if kind is FileKind.SYMLINK else None,
        )

    def _target(self) -> str:
        """The symlink's target (the libraries decode it as UTF-8, failing on other bytes:
        a subclass that can read the bytes does)."""
        return str(self._entry.symbolic_link_target)

    def children(self) -> Iterator[tuple[str, Node]]:
        """Both libraries decode names as UTF-8, failing on other bytes, and cut them at
        NUL: each subclass reads directory entries with blocksnap's own reader."""
        raise NotImplementedError

    def _node(self, entry: Any, path: str | None) -> Node:
        """A node for another entry of the same volume (subclasses return their own)."""
        raise NotImplementedError

    def _scan(self, name: str) -> Node | None:
        """The entry `name` found in blocksnap's own reading of the directory."""
        raise NotImplementedError

    def lookup(self, name: str) -> Node | None:
        # The library's path lookup follows a large directory's index, where reading the
        # entries reads every block of it (libfsext: 8 ms against 34 ms for iterating a
        # directory of 3,000 files, which reads every entry's inode).  It matches a
        # name exactly, not one cut at NUL, but takes only UTF-8, and fails in a
        # directory block holding a name it cannot decode: then the entries are read.
        path = child_path(self._path, name)
        if path is None:
            return self._scan(name)
        try:
            entry = self._volume.get_file_entry_by_path(path)
        except OSError:
            return self._scan(name)
        return None if entry is None else self._node(entry, path)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._entry.read_buffer_at_offset(size, offset))

    def data_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        yield from extent_data_ranges(self._entry, size)

    def xattrs(self) -> dict[str, bytes]:
        """Both libraries read extended attributes wrongly (see `extattrs` and
        `xfsattrs`): each subclass reads them with blocksnap's own reader."""
        raise NotImplementedError
