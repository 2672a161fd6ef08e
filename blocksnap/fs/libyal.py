"""Nodes over the file entries of libfsext and libfsxfs, which share one POSIX entry API.

Both bindings come from the libyal project and expose the same file entry: a POSIX mode,
owner, nanosecond times, inode number and link count, extended attributes, and
`read_buffer_at_offset(size, offset)`.  The modules `ext` and `xfs` only open a volume.
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
            target=str(e.symbolic_link_target) if kind is FileKind.SYMLINK else None,
        )

    def children(self) -> Iterator[tuple[str, Node]]:
        for child in self._entry.sub_file_entries:
            yield str(child.name), PosixEntryNode(child)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._entry.read_buffer_at_offset(size, offset))

    def xattrs(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for attribute in self._entry.extended_attributes:
            found[str(attribute.name)] = bytes(attribute.read_buffer_at_offset(attribute.size, 0))
        return found
