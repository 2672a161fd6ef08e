"""The ext2/3/4 adapter, over libfsext (LGPL), with The Sleuth Kit for inline data.

libfsext reads extents, htree directories, and fast and slow symlinks, through the file
object it is given.  Inline data (ext4's inline_data feature: a small file, symlink or
directory kept in the inode, its tail in the "system.data" extended attribute) it reads
wrongly: libfsext 20260821 returns the first 60 bytes and then zeros, and cannot open an
inline directory longer than that.  On a filesystem with that feature, inodes flagged
inline are read through TSK instead (measured right on images written by mkfs.ext4 -d and
by the kernel).

Names and symlink targets are bytes on Linux, and libfsext decodes them as UTF-8, failing
on any other ("unable to retrieve name size"), and cuts them at a NUL byte.  So directory
entries are parsed by `extdir` from the directory's content as TSK reads it (or from the
inode, inline), and each child is opened by its inode number; a target is read from the
inode's block area or through TSK.  A lookup of one name still goes through libfsext's
path lookup, which follows an htree index, where the name is UTF-8 (see `libyal`).  A
name is carried as its bytes decoded as UTF-8 with surrogateescape, so os.fsencode gives
the exact bytes back.

Extended attributes, and the inode flags, come from `extattrs`, blocksnap's own reader:
libfsext reads a value over 60 bytes wrongly, and forgets an inode's attributes once the
inode is in its cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import pyfsext
import pytsk3

from blocksnap.fs.extattrs import INLINE_DATA_FLAG, ExtAttributes
from blocksnap.fs.extdir import FILETYPE_FEATURE, DirectoryDamage, decode_name, region_entries
from blocksnap.fs.image import Window
from blocksnap.fs.libyal import PosixEntryNode, child_path
from blocksnap.fs.node import FileKind, FileStat, Mounted, Node
from blocksnap.fs.tsk import TskImage, TskNode

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
    ext = _Ext(image, volume, attributes)
    return Mounted(
        root=ExtNode(volume.get_root_directory(), ext, ""),
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
_BLOCK_AREA, _BLOCK_AREA_SIZE = 0x28, 60  # in the inode
_DIRECTORY_CHUNK_BLOCKS = 256  # blocks of a directory read at once


def _kind(compat: int, incompat: int) -> str:
    """ext2, ext3 or ext4, by the features the superblock declares (as blkid names them)."""
    if incompat & _EXT4_INCOMPAT:
        return "ext4"
    return "ext3" if compat & _HAS_JOURNAL else "ext2"


def _xattrs(attributes: ExtAttributes, inode: int) -> dict[str, bytes]:
    """An inode's extended attributes; XattrsIncompleteError names any not read."""
    return attributes.of(inode).complete(hidden=(_INLINE_XATTR,))


class _Ext:
    """What every node of one ext filesystem shares: the libfsext volume, blocksnap's own
    inode reader, and TSK's view of the same filesystem, opened on first need, which
    reads directories' content and slow symlinks' targets as bytes, and inline data."""

    def __init__(self, image: BinaryIO, volume: Any, attributes: ExtAttributes) -> None:
        if not isinstance(image, Window):
            raise TypeError("the ext adapter reads a Window")
        self._image = image
        self._fs: Any = None
        self.volume = volume
        self.attributes = attributes
        self.inline_data = bool(attributes.incompat & _INLINE_DATA)
        self.filetype = bool(attributes.incompat & FILETYPE_FEATURE)

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = pytsk3.FS_Info(TskImage(self._image))
        return self._fs

    def file(self, inode: int) -> Any:
        return self.fs.open_meta(inode=inode)

    def is_inline(self, inode: int) -> bool:
        return self.inline_data and bool(self.attributes.flags(inode) & INLINE_DATA_FLAG)

    def node(self, inode: int, path: str | None) -> Node:
        """The node of an inode: libfsext's where it can open the inode, else TSK's."""
        try:
            entry = self.volume.get_file_entry_by_inode(inode)
        except OSError:
            return _TskExtNode(self.file(inode), self)
        return ExtNode(entry, self, path)

    def entries(self, inode: int) -> Iterator[tuple[str, int]]:
        """(name, inode) of a directory's entries, names as stored (see `extdir`)."""
        if self.is_inline(inode):
            area = self.attributes.inode(inode)[_BLOCK_AREA : _BLOCK_AREA + _BLOCK_AREA_SIZE]
            where = f"inode {inode}'s inline entries"
            yield from region_entries(area[4:], self.filetype, where)
            rest = self.attributes.of(inode).found.get(_INLINE_XATTR, b"")
            yield from region_entries(rest, self.filetype, f"{where} in {_INLINE_XATTR}")
            return
        file = self.file(inode)
        size = int(file.info.meta.size)
        block_size = self.attributes.block_size
        for offset in range(0, size, _DIRECTORY_CHUNK_BLOCKS * block_size):
            want = min(_DIRECTORY_CHUNK_BLOCKS * block_size, size - offset)
            data = bytes(file.read_random(offset, want))
            if len(data) != want:
                raise DirectoryDamage(f"read {len(data)} bytes at {offset}, expected {want}")
            for at in range(0, want, block_size):
                block = data[at : at + block_size]
                where = f"directory block {(offset + at) // block_size}"
                yield from region_entries(block, self.filetype, where)

    def children(self, inode: int, path: str | None) -> Iterator[tuple[str, Node]]:
        for name, number in self.entries(inode):
            yield name, self.node(number, child_path(path, name))

    def scan(self, inode: int, path: str | None, name: str) -> Node | None:
        """The entry `name` of a directory, reading its blocks and then the one inode."""
        for found, number in self.entries(inode):
            if found == name:
                return self.node(number, child_path(path, name))
        return None

    def target(self, inode: int, size: int) -> str:
        """A symlink's target, as stored: inline, in the block area (a fast symlink: one
        that holds no blocks but an xattr block), or in its data blocks."""
        if self.is_inline(inode):
            raw = bytes(self.file(inode).read_random(0, size))
        else:
            head = self.attributes.inode(inode)
            blocks = int.from_bytes(head[0x1C:0x20], "little")
            xattr_block = int.from_bytes(head[0x68:0x6C], "little")
            own = blocks - (self.attributes.block_size >> 9 if xattr_block else 0)
            if size < _BLOCK_AREA_SIZE and own == 0:
                raw = head[_BLOCK_AREA : _BLOCK_AREA + size]
            else:
                raw = bytes(self.file(inode).read_random(0, size))
        if len(raw) != size:
            raise OSError(f"symlink target: read {len(raw)} bytes, expected {size}")
        return decode_name(raw)


class ExtNode(PosixEntryNode):
    """A libfsext entry; its content comes from TSK when it is kept inline, and its
    directory entries and symlink target from blocksnap's own reading (see `extdir`)."""

    __slots__ = ("_ext", "_flags")

    def __init__(self, entry: Any, ext: _Ext, path: str | None) -> None:
        super().__init__(entry, ext.volume, path)
        self._ext = ext
        self._flags: int | None = None

    def _node(self, entry: Any, path: str | None) -> Node:
        return ExtNode(entry, self._ext, path)

    def _inode(self) -> int:
        return int(self._entry.inode_number)

    def _inode_flags(self) -> int:
        """The inode's flags, read (and with metadata_csum, its checksum checked) once."""
        if self._flags is None:
            self._flags = self._ext.attributes.flags(self._inode())
        return self._flags

    def _is_inline(self) -> bool:
        return self._ext.inline_data and bool(self._inode_flags() & INLINE_DATA_FLAG)

    def _inline_file(self) -> Any:
        """The TSK file of this entry if its data is inline, else None."""
        if not self._is_inline():
            return None
        return self._ext.file(self._inode())

    def stat(self, path: str, name: str) -> FileStat:
        self._inode_flags()  # libfsext does not check the inode's checksum
        return super().stat(path, name)

    def _target(self) -> str:
        # libfsext decodes a target as UTF-8, failing on other bytes and cutting at NUL.
        return self._ext.target(self._inode(), int(self._entry.size or 0))

    def children(self) -> Iterator[tuple[str, Node]]:
        return self._ext.children(self._inode(), self._path)

    def _scan(self, name: str) -> Node | None:
        return self._ext.scan(self._inode(), self._path, name)

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
        return _xattrs(self._ext.attributes, self._inode())


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
    TSK; its entries, and its extended attributes, come from blocksnap's own reading like
    any other's."""

    __slots__ = ("_ext",)

    def __init__(self, file: Any, ext: _Ext) -> None:
        super().__init__(ext.fs, file, exfat=False)
        self._ext = ext

    def stat(self, path: str, name: str) -> FileStat:
        meta = self._file.info.meta
        self._ext.attributes.flags(int(meta.addr))  # checks the inode's checksum
        kind = _TSK_KINDS.get(meta.type, FileKind.OTHER)
        size = int(meta.size)
        target = None
        if kind is FileKind.SYMLINK:
            target = self._ext.target(int(meta.addr), size)
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
        # libfsext cannot open this inode, so no path through it: None, entries read.
        return self._ext.children(int(self._file.info.meta.addr), None)

    def lookup(self, name: str) -> Node | None:
        return self._ext.scan(int(self._file.info.meta.addr), None, name)

    def xattrs(self) -> dict[str, bytes]:
        return _xattrs(self._ext.attributes, int(self._file.info.meta.addr))
