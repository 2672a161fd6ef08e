"""The XFS adapter, over libfsxfs (LGPL; PyPI libfsxfs-python), with blocksnap's own
readers for extended attributes, directory entries and symlink targets.

libfsxfs reads XFS version 4 and 5 (CRC) volumes: short-form, block, leaf and node
directories, extent and B+tree data forks and symlinks.  Its extended attributes are
wrong in three ways (measured on 20260901, see `xfsattrs`), so those, and the check of
each inode's CRC, come from `xfsattrs`.  It decodes names and symlink targets as UTF-8,
failing on any other bytes, so those come from `xfsdir`, each child opened by its inode
number (a lookup of one UTF-8 name still goes through libfsxfs's path lookup, see
`libyal`); a name is carried as its bytes decoded with surrogateescape (see `extdir`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import pyfsxfs

from blocksnap.fs.libyal import PosixEntryNode, child_path
from blocksnap.fs.node import FileStat, Mounted, Node
from blocksnap.fs.xfsattrs import XfsAttributes
from blocksnap.fs.xfsdir import XfsDirectories

NAME = "xfs"
LIBRARY = f"libfsxfs {pyfsxfs.get_version()}"


def detect(image: BinaryIO) -> bool:
    return bool(pyfsxfs.check_volume_signature_file_object(image))


def mount(image: BinaryIO) -> Mounted:
    volume = pyfsxfs.volume()
    volume.open_file_object(image)
    try:
        attributes = XfsAttributes(image)
        directories = XfsDirectories(attributes)
    except BaseException:
        volume.close()
        raise
    return Mounted(
        root=XfsNode(volume.get_root_directory(), volume, "", attributes, directories),
        kind="xfs",
        library=LIBRARY,
        case_insensitive=False,
        close=volume.close,
    )


class XfsNode(PosixEntryNode):
    """A libfsxfs entry whose inode is checked, and whose attributes are read, by
    blocksnap."""

    __slots__ = ("_attributes", "_directories")

    def __init__(
        self,
        entry: Any,
        volume: Any,
        path: str | None,
        attributes: XfsAttributes,
        directories: XfsDirectories,
    ) -> None:
        super().__init__(entry, volume, path)
        self._attributes = attributes
        self._directories = directories

    def _node(self, entry: Any, path: str | None) -> Node:
        return XfsNode(entry, self._volume, path, self._attributes, self._directories)

    def _child(self, inode: int, name: str) -> Node:
        entry = self._volume.get_file_entry_by_inode(inode)
        return self._node(entry, child_path(self._path, name))

    def children(self) -> Iterator[tuple[str, Node]]:
        for name, inode in self._directories.entries(int(self._entry.inode_number)):
            yield name, self._child(inode, name)

    def _scan(self, name: str) -> Node | None:
        for found, inode in self._directories.entries(int(self._entry.inode_number)):
            if found == name:
                return self._child(inode, name)
        return None

    def _target(self) -> str:
        return self._directories.target(int(self._entry.inode_number))

    def stat(self, path: str, name: str) -> FileStat:
        self._attributes.check(int(self._entry.inode_number))
        return super().stat(path, name)

    def xattrs(self) -> dict[str, bytes]:
        return self._attributes.of(int(self._entry.inode_number)).complete()
