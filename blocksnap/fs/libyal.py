"""Nodes over the file entries of libfsext and libfsxfs, which share one POSIX entry API.

Both bindings come from the libyal project and expose the same file entry: a POSIX mode,
owner, nanosecond times, inode number and link count, and
`read_buffer_at_offset(size, offset)`.  The modules `ext` and `xfs` open a volume and add
directory entries, symlink targets and extended attributes, which blocksnap reads itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from blocksnap.fs.node import FileKind, FileStat, Node, kind_of_mode


class PosixEntryNode:
    """A libfsext or libfsxfs file entry."""

    __slots__ = ("_entry",)

    def __init__(self, entry: Any) -> None:
        self._entry = entry

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

    def lookup(self, name: str) -> Node | None:
        raise NotImplementedError

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._entry.read_buffer_at_offset(size, offset))

    def xattrs(self) -> dict[str, bytes]:
        """Both libraries read extended attributes wrongly (see `extattrs` and
        `xfsattrs`): each subclass reads them with blocksnap's own reader."""
        raise NotImplementedError
