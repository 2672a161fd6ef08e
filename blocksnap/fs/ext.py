"""The ext2/3/4 adapter, over libfsext (LGPL), with The Sleuth Kit for inline data.

libfsext reads extents, htree directories, and fast and slow symlinks, through the file
object it is given.  Inline data (ext4's inline_data feature: a small file, symlink or
directory kept in the inode, its tail in the "system.data" extended attribute) it reads
wrongly: libfsext 20260821 returns the first 60 bytes and then zeros, and cannot open an
inline directory longer than that.  On a filesystem with that feature, inodes flagged
inline are read through TSK instead (measured right on images written by mkfs.ext4 -d and
by the kernel), and their names are listed by it.

Extended attributes, and the inode flags, come from `extattrs`, blocksnap's own reader:
libfsext reads a value over 60 bytes wrongly, and forgets an inode's attributes once the
inode is in its cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyfsext
import pytsk3

from blocksnap.fs.extattrs import INLINE_DATA_FLAG, ExtAttributes
from blocksnap.fs.image import Window
from blocksnap.fs.libyal import PosixEntryNode
from blocksnap.fs.node import FileKind, FileStat, Mounted, Node
from blocksnap.fs.tsk import TskImage, TskNode, entries

NAME = "ext"
LIBRARY = f"libfsext {pyfsext.get_version()}"


def detect(image: BinaryIO) -> bool:
    return bool(pyfsext.check_volume_signature_file_object(image))


def mount(image: BinaryIO) -> Mounted:
    volume = pyfsext.volume()
    volume.open_file_object(image)

    def read_inode(number: int, size: int) -> bytes:
        return bytes(volume.get_file_entry_by_inode(number).read_buffer_at_offset(size, 0))

    try:
        attributes = ExtAttributes(image, read_inode)
    except BaseException:
        volume.close()
        raise
    inline = _Inline(image) if attributes.incompat & _INLINE_DATA else None
    return Mounted(
        root=ExtNode(volume.get_root_directory(), volume, "", inline, attributes),
        kind=_kind(attributes.compat, attributes.incompat),
        library=LIBRARY,
        case_insensitive=False,
        close=volume.close,
    )


# Superblock feature flags.
_HAS_JOURNAL = 0x4
_EXT4_INCOMPAT = 0x40 | 0x80 | 0x200  # extents, 64bit, flex_bg
_INLINE_DATA = 0x8000
_INLINE_XATTR = "system.data"


def _kind(compat: int, incompat: int) -> str:
    """ext2, ext3 or ext4, by the features the superblock declares (as blkid names them)."""
    if incompat & _EXT4_INCOMPAT:
        return "ext4"
    return "ext3" if compat & _HAS_JOURNAL else "ext2"


def _xattrs(attributes: ExtAttributes, inode: int) -> dict[str, bytes]:
    """An inode's extended attributes; XattrsIncompleteError names any not read."""
    return attributes.of(inode).complete(hidden=(_INLINE_XATTR,))


class _Inline:
    """TSK's view of the same filesystem, opened on first need, for inline data."""

    def __init__(self, image: BinaryIO) -> None:
        if not isinstance(image, Window):
            raise TypeError("the ext adapter reads a Window")
        self._image = image
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = pytsk3.FS_Info(TskImage(self._image))
        return self._fs

    def file(self, inode: int) -> Any:
        return self.fs.open_meta(inode=inode)

    def children(
        self, inode: int, volume: Any, path: str | None, attributes: ExtAttributes
    ) -> Iterator[tuple[str, Node]]:
        """A directory's entries as TSK lists them: libfsext nodes where libfsext can
        open the inode, else TSK ones."""
        for name, child in self._listing(inode):
            child_path = None if path is None or "/" in name else f"{path}/{name}"
            try:
                entry = volume.get_file_entry_by_inode(int(child.info.meta.addr))
            except OSError:
                yield name, _TskExtNode(child, self, volume, child_path, attributes)
            else:
                yield name, ExtNode(entry, volume, child_path, self, attributes)

    def _listing(self, inode: int) -> Iterator[tuple[str, Any]]:
        return entries(self.file(inode))

    def missing(
        self, inode: int, volume: Any, path: str | None, seen: set[str], attributes: ExtAttributes
    ) -> Iterator[tuple[str, Node]]:
        """The entries of a directory that libfsext could not open, as TSK nodes."""
        for name, child in self._listing(inode):
            if name not in seen:
                child_path = None if path is None or "/" in name else f"{path}/{name}"
                yield name, _TskExtNode(child, self, volume, child_path, attributes)


class ExtNode(PosixEntryNode):
    """A libfsext entry; its content comes from TSK when it is kept inline."""

    __slots__ = ("_attributes", "_flags", "_inline")

    def __init__(
        self,
        entry: Any,
        volume: Any,
        path: str | None,
        inline: _Inline | None,
        attributes: ExtAttributes,
    ) -> None:
        super().__init__(entry, volume, path)
        self._inline = inline
        self._attributes = attributes
        self._flags: int | None = None

    def _node(self, entry: Any, path: str | None) -> PosixEntryNode:
        return ExtNode(entry, self._volume, path, self._inline, self._attributes)

    def _inode_flags(self) -> int:
        """The inode's flags, read (and with metadata_csum, its checksum checked) once."""
        if self._flags is None:
            self._flags = self._attributes.flags(int(self._entry.inode_number))
        return self._flags

    def _is_inline(self) -> bool:
        return self._inline is not None and bool(self._inode_flags() & INLINE_DATA_FLAG)

    def _inline_file(self) -> Any:
        """The TSK file of this entry if its data is inline, else None."""
        if not self._is_inline():
            return None
        assert self._inline is not None
        return self._inline.file(int(self._entry.inode_number))

    def stat(self, path: str, name: str) -> FileStat:
        self._inode_flags()  # libfsext does not check the inode's checksum
        st = super().stat(path, name)
        if st.kind is FileKind.SYMLINK and (file := self._inline_file()) is not None:
            target = bytes(file.read_random(0, st.size)).decode("utf-8", "surrogateescape")
            return dataclasses.replace(st, target=target)
        return st

    def children(self) -> Iterator[tuple[str, Node]]:
        if self._inline is None:
            yield from super().children()
            return
        inode = int(self._entry.inode_number)
        if self._is_inline():
            # libfsext lists only the first 60 bytes of an inline directory
            yield from self._inline.children(inode, self._volume, self._path, self._attributes)
            return
        # libfsext fails on an entry whose inode holds an inline directory longer than
        # 60 bytes: TSK reads those.
        seen, failed = set(), False
        for i in range(int(self._entry.number_of_sub_file_entries)):
            try:
                child = self._entry.get_sub_file_entry(i)
            except OSError:
                failed = True
                continue
            name = str(child.name)
            seen.add(name)
            path = None if self._path is None or "/" in name else f"{self._path}/{name}"
            yield name, self._node(child, path)
        if failed:
            yield from self._inline.missing(inode, self._volume, self._path, seen, self._attributes)

    def read(self, offset: int, size: int) -> bytes:
        file = self._inline_file()
        if file is None:
            return super().read(offset, size)
        return bytes(file.read_random(offset, size))

    def data_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        if self._is_inline():
            if size:
                yield (0, size)
            return
        yield from super().data_ranges(size)

    def xattrs(self) -> dict[str, bytes]:
        return _xattrs(self._attributes, int(self._entry.inode_number))


_TSK_KINDS = {
    pytsk3.TSK_FS_META_TYPE_REG: FileKind.FILE,
    pytsk3.TSK_FS_META_TYPE_DIR: FileKind.DIRECTORY,
    pytsk3.TSK_FS_META_TYPE_LNK: FileKind.SYMLINK,
    pytsk3.TSK_FS_META_TYPE_CHR: FileKind.CHAR_DEVICE,
    pytsk3.TSK_FS_META_TYPE_BLK: FileKind.BLOCK_DEVICE,
    pytsk3.TSK_FS_META_TYPE_FIFO: FileKind.FIFO,
    pytsk3.TSK_FS_META_TYPE_SOCK: FileKind.SOCKET,
}


class _TskExtNode(TskNode):
    """An inode libfsext cannot open (an inline directory longer than 60 bytes), read by
    TSK; its extended attributes come from `extattrs` like any other's."""

    __slots__ = ("_attributes", "_inline", "_path", "_volume")

    def __init__(
        self, file: Any, inline: _Inline, volume: Any, path: str | None, attributes: ExtAttributes
    ) -> None:
        super().__init__(inline.fs, file, exfat=False)
        self._inline = inline
        self._volume = volume
        self._path = path
        self._attributes = attributes

    def stat(self, path: str, name: str) -> FileStat:
        meta = self._file.info.meta
        self._attributes.flags(int(meta.addr))  # checks the inode's checksum
        kind = _TSK_KINDS.get(meta.type, FileKind.OTHER)
        size = int(meta.size)
        target = None
        if kind is FileKind.SYMLINK:
            target = bytes(self._file.read_random(0, size)).decode("utf-8", "surrogateescape")
        return FileStat(
            path=path,
            name=name,
            kind=kind,
            size=size,
            mode=int(meta.mode) & 0o7777,
            uid=int(meta.uid),
            gid=int(meta.gid),
            mtime_ns=int(meta.mtime) * 1_000_000_000 + int(meta.mtime_nano),
            atime_ns=int(meta.atime) * 1_000_000_000 + int(meta.atime_nano),
            nlink=int(meta.nlink),
            file_id=int(meta.addr),
            target=target,
        )

    def children(self) -> Iterator[tuple[str, Node]]:
        inode = int(self._file.info.meta.addr)
        yield from self._inline.children(inode, self._volume, self._path, self._attributes)

    def xattrs(self) -> dict[str, bytes]:
        return _xattrs(self._attributes, int(self._file.info.meta.addr))
