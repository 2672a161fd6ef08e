"""The XFS adapter, over libfsxfs (LGPL; PyPI libfsxfs-python), with blocksnap's own
reader for extended attributes.

libfsxfs reads XFS version 4 and 5 (CRC) volumes: short-form, block, leaf and node
directories, extent and B+tree data forks and symlinks.  Its extended attributes are
wrong in three ways (measured on 20260901, see `xfsattrs`), so those, and the check of
each inode's CRC, come from `xfsattrs`.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import pyfsxfs

from blocksnap.fs.libyal import PosixEntryNode
from blocksnap.fs.node import FileStat, Mounted
from blocksnap.fs.xfsattrs import XfsAttributes

NAME = "xfs"
LIBRARY = f"libfsxfs {pyfsxfs.get_version()}"


def detect(image: BinaryIO) -> bool:
    return bool(pyfsxfs.check_volume_signature_file_object(image))


def mount(image: BinaryIO) -> Mounted:
    volume = pyfsxfs.volume()
    volume.open_file_object(image)
    try:
        attributes = XfsAttributes(image)
    except BaseException:
        volume.close()
        raise
    return Mounted(
        root=XfsNode(volume.get_root_directory(), volume, "", attributes),
        kind="xfs",
        library=LIBRARY,
        case_insensitive=False,
        close=volume.close,
    )


class XfsNode(PosixEntryNode):
    """A libfsxfs entry whose inode is checked, and whose attributes are read, by
    blocksnap."""

    __slots__ = ("_attributes",)

    def __init__(
        self, entry: Any, volume: Any, path: str | None, attributes: XfsAttributes
    ) -> None:
        super().__init__(entry, volume, path)
        self._attributes = attributes

    def _node(self, entry: Any, path: str | None) -> PosixEntryNode:
        return XfsNode(entry, self._volume, path, self._attributes)

    def stat(self, path: str, name: str) -> FileStat:
        self._attributes.check(int(self._entry.inode_number))
        return super().stat(path, name)

    def xattrs(self) -> dict[str, bytes]:
        return self._attributes.of(int(self._entry.inode_number)).complete()
