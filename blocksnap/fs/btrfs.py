"""The btrfs adapter, over dissect.btrfs (AGPL-3): only with the extra `blocksnap[btrfs]`.

The default install holds no AGPL code, so this module imports dissect only when an image
is recognised as btrfs (by its superblock magic); without the extra, that image is a
FilesystemError that names the extra.  dissect walks the B-trees (chunks, roots,
subvolumes, directories) through `btrfstree.CheckedBtrfs`, which checks every node.
blocksnap reads the rest from the leaf items itself (little-endian):

Inode item (key INODE_ITEM 1, 160 bytes): size u64 at 16, nlink u32 at 40, uid, gid and
mode u32 at 44, 48 and 52; atime and mtime at 112 and 136, each seconds s64 and
nanoseconds u32.

Directory and xattr items (keys DIR_ITEM 84 by name hash, XATTR_ITEM 24 by name hash;
entries with colliding hashes packed one after another): the location key (objectid u64,
type u8: 1 an inode, 132 a subvolume root; offset u64), transid u64, data_len u16,
name_len u16 and type u8, then the name, then data_len bytes (an xattr's value, stored
in the form setxattr takes, POSIX ACLs included).

File extent items (key EXTENT_DATA 108, by file offset): ram_bytes u64 at 8,
compression u8 at 16 (0 none, 1 zlib, 2 lzo, 3 zstd), encryption u8 at 17, other
encoding u16 at 18, type u8 at 20 (0 inline, the data following at 21; 1 regular;
2 preallocated, reading as zeros); for regular ones disk_bytenr, disk_num_bytes, offset
into the decoded extent and num_bytes, u64 each from 21.  A disk_bytenr of 0 is a hole,
as is any range no extent covers.  A compressed extent holds at most 128 KiB either way;
blocksnap decodes it itself with the output bounded by that, where dissect would inflate
whatever a hostile extent asks.  Checksums of file data (the csum tree) are not checked.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, BinaryIO

import google_crc32c
import zstandard

from blocksnap.errors import FilesystemError
from blocksnap.fs.btrfsdamage import BtrfsDamage
from blocksnap.fs.node import FileKind, FileStat, Mounted, Node, kind_of_mode

if TYPE_CHECKING:
    from blocksnap.fs.btrfstree import CheckedBtrfs

NAME = "btrfs"
EXTRA = "blocksnap[btrfs]"

_MAGIC_AT, _MAGIC = 0x10040, b"_BHRfS_M"
_INODE_ITEM, _XATTR_ITEM, _DIR_ITEM, _EXTENT_DATA = 1, 24, 84, 108
_ROOT_ITEM = 132
_INODE_SIZE = 160
_DIR_ENTRY = struct.Struct("<QBQQHHB")  # location key, transid, data_len, name_len, type
_EXTENT_HEAD = struct.Struct("<QQBBHB")  # generation, ram_bytes, compression, encryption, ...
_EXTENT_DISK = struct.Struct("<QQQQ")  # disk_bytenr, disk_num_bytes, offset, num_bytes
MAX_COMPRESSED = 128 << 10
MAX_SYMLINK = 4095


def detect(image: BinaryIO) -> bool:
    image.seek(_MAGIC_AT)
    return image.read(len(_MAGIC)) == _MAGIC


def mount(image: BinaryIO) -> Mounted:
    try:
        from blocksnap.fs.btrfstree import CheckedBtrfs
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("dissect"):
            raise
        raise FilesystemError(
            f"btrfs is read only with the optional extra {EXTRA} (dissect.btrfs, AGPL-3), "
            f"which is not installed: pip install '{EXTRA}'"
        ) from exc
    fs = CheckedBtrfs(image)
    with fs.errors():
        root = fs.default_subvolume.root
    return Mounted(
        root=BtrfsNode(fs, root),
        kind="btrfs",
        library=f"dissect.btrfs {metadata.version('dissect.btrfs')}",
        case_insensitive=False,
        close=lambda: None,
    )


def name_hash(name: bytes) -> int:
    """The hash btrfs files directory and xattr items under: CRC32C seeded with ~1 and
    without the final inversion."""
    return int(google_crc32c.extend(1, name)) ^ 0xFFFFFFFF


def _entries(data: bytes) -> Iterator[tuple[tuple[int, int], int, bytes, bytes]]:
    """The packed entries of a DIR_ITEM or XATTR_ITEM: (location objectid and type, file
    type, name, data)."""
    at = 0
    while at < len(data):
        if at + _DIR_ENTRY.size > len(data):
            raise BtrfsDamage("a directory or xattr item is cut short")
        objectid, key_type, _off, _transid, data_len, name_len, ftype = _DIR_ENTRY.unpack_from(
            data, at
        )
        at += _DIR_ENTRY.size
        if at + name_len + data_len > len(data):
            raise BtrfsDamage("a directory or xattr entry runs past its item")
        yield (
            (objectid, key_type),
            ftype,
            data[at : at + name_len],
            data[at + name_len : at + name_len + data_len],
        )
        at += name_len + data_len


@dataclass(frozen=True, slots=True)
class _Extent:
    start: int  # file offset
    length: int
    kind: int  # 0 inline, 1 regular, 2 preallocated
    compression: int
    ram_bytes: int
    disk_bytenr: int = 0
    disk_num_bytes: int = 0
    offset: int = 0  # into the decoded extent
    inline: bytes = b""

    @property
    def end(self) -> int:
        return self.start + self.length


def _extent(start: int, data: bytes) -> _Extent:
    if len(data) < _EXTENT_HEAD.size:
        raise BtrfsDamage(f"the file extent at {start} is cut short")
    _gen, ram_bytes, compression, encryption, encoding, kind = _EXTENT_HEAD.unpack_from(data)
    if encryption or encoding or compression > 3 or kind > 2:
        raise BtrfsDamage(
            f"the file extent at {start} is stored in an unknown way "
            f"(compression {compression}, encryption {encryption}, encoding {encoding}, "
            f"type {kind})"
        )
    if kind == 0:
        inline = bytes(data[_EXTENT_HEAD.size :])
        return _Extent(start, ram_bytes, 0, compression, ram_bytes, inline=inline)
    if len(data) < _EXTENT_HEAD.size + _EXTENT_DISK.size:
        raise BtrfsDamage(f"the file extent at {start} is cut short")
    bytenr, disk_bytes, offset, length = _EXTENT_DISK.unpack_from(data, _EXTENT_HEAD.size)
    if compression and (disk_bytes > MAX_COMPRESSED or ram_bytes > MAX_COMPRESSED):
        raise BtrfsDamage(f"the compressed file extent at {start} exceeds 128 KiB")
    return _Extent(start, length, kind, compression, ram_bytes, bytenr, disk_bytes, offset)


def _decode(compression: int, data: bytes, limit: int) -> bytes:
    """At most `limit` bytes decoded from a compressed extent."""
    try:
        if compression == 1:
            return zlib.decompressobj().decompress(data, limit)
        if compression == 3:
            # One frame, padded with zeros to a whole sector: a read stops at the frame's
            # end (or at the limit), where a second read would take the zeros for a frame.
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            return reader.read(limit)
        return _decode_lzo(data, limit)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise BtrfsDamage(f"a compressed extent does not decode: {exc}") from exc


def _decode_lzo(data: bytes, limit: int) -> bytes:
    """btrfs's LZO framing: the total length u32, then segments of a length u32 and LZO1X
    data, a segment header never straddling a 4 KiB sector (the rest is padding)."""
    from dissect.util.compression import lzo  # a dependency of dissect.btrfs

    sector = 4096
    out = bytearray()
    at = 4
    while at + 4 <= len(data) and len(out) < limit:
        if sector - at % sector < 4:
            at += sector - at % sector
            continue
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        if size == 0 or at + size > len(data):
            break
        try:
            out += lzo.decompress(data[at : at + size], False, sector + sector // 16 + 67)
        except Exception as exc:  # the native decoder's own error types are not exported
            raise BtrfsDamage(f"an LZO segment does not decode: {exc}") from exc
        at += size
    return bytes(out[:limit])


class _ExtentWalk:
    """A file's extents in file order, walked forward across sequential reads; a read
    that starts before the end of an extent already passed starts the walk again, so no
    list of a file's extents is kept."""

    def __init__(self, node: BtrfsNode) -> None:
        self._node = node
        self._items: Iterator[_Extent] | None = None
        self._held: _Extent | None = None  # the first extent not passed yet
        self._passed_to = 0  # the furthest end of the extents passed

    def covering(self, start: int, end: int) -> list[_Extent]:
        if self._items is None or start < self._passed_to:
            self._items, self._passed_to = self._node.extent_items(), 0
            self._held = next(self._items, None)
        found = []
        while self._held is not None and self._held.start < end:
            if self._held.end > start:
                found.append(self._held)
            if self._held.end > end:
                break  # the next read may need it too
            self._passed_to = max(self._passed_to, self._held.end)
            self._held = next(self._items, None)
        return found


class BtrfsNode:
    """A btrfs inode of one subvolume, by dissect's INode."""

    __slots__ = ("_decoded", "_fs", "_inode", "_walk")

    def __init__(self, fs: CheckedBtrfs, inode: Any) -> None:
        self._fs = fs
        self._inode = inode
        self._walk: _ExtentWalk | None = None
        self._decoded: tuple[int, bytes] | None = None  # the last compressed extent read

    def _find(self, key_type: int, offset: int) -> bytes | None:
        try:
            _item, data = self._inode.subvolume.tree.find(self._inode.inum, key_type, offset)
        except KeyError:
            return None
        return bytes(data)

    def stat(self, path: str, name: str) -> FileStat:
        with self._fs.errors():
            item = self._find(_INODE_ITEM, 0)
        if item is None or len(item) < _INODE_SIZE:
            raise BtrfsDamage(f"inode {self._inode.inum} is missing or cut short")
        (size,) = struct.unpack_from("<Q", item, 16)
        nlink, uid, gid, mode = struct.unpack_from("<IIII", item, 40)
        atime, atime_ns = struct.unpack_from("<qI", item, 112)
        mtime, mtime_ns = struct.unpack_from("<qI", item, 136)
        kind = kind_of_mode(mode)
        target = None
        if kind is FileKind.SYMLINK:
            if size > MAX_SYMLINK:
                raise BtrfsDamage(f"symlink of {size} bytes")
            target = self.read(0, size).decode("utf-8", "surrogateescape")
        return FileStat(
            path=path,
            name=name,
            kind=kind,
            size=size if kind in (FileKind.FILE, FileKind.SYMLINK) else 0,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=mtime * 1_000_000_000 + mtime_ns,
            atime_ns=atime * 1_000_000_000 + atime_ns,
            nlink=nlink,
            # Inode numbers repeat between subvolumes (each root is 256).
            file_id=(self._inode.subvolume.objectid << 64) | self._inode.inum,
            target=target,
        )

    def _child(self, location: tuple[int, int], ftype: int) -> BtrfsNode:
        objectid, key_type = location
        inode = self._inode
        if key_type == _ROOT_ITEM:
            child = self._fs.open_subvolume(objectid, inode).root
        elif key_type == _INODE_ITEM:
            child = inode.subvolume.inode(objectid, ftype, inode)
        else:
            raise BtrfsDamage(f"a directory entry points to a key of type {key_type}")
        return BtrfsNode(self._fs, child)

    def children(self) -> Iterator[tuple[str, Node]]:
        with self._fs.errors():
            entries = iter(self._inode.iterdir())
        while True:
            with self._fs.errors():
                found = next(entries, None)
            if found is None:
                return
            name, child = found
            if name not in (".", ".."):
                yield name, BtrfsNode(self._fs, child)

    def lookup(self, name: str) -> Node | None:
        raw = name.encode("utf-8", "surrogateescape")
        with self._fs.errors():
            data = self._find(_DIR_ITEM, name_hash(raw))
            if data is None:
                return None
            for location, ftype, entry_name, _ in _entries(data):
                if entry_name == raw:
                    return self._child(location, ftype)
        return None

    def extent_items(self) -> Iterator[_Extent]:
        cursor = self._inode.subvolume.tree.cursor()
        with self._fs.errors():
            items = cursor.iter(self._inode.inum, _EXTENT_DATA, 0, ignore_offset=True)
        while True:
            with self._fs.errors():
                found = next(items, None)
            if found is None:
                return
            item, data = found
            yield _extent(int(item.key.offset), bytes(data))

    def _content(self, extent: _Extent) -> bytes:
        """The decoded bytes of a compressed extent, or an inline extent's."""
        if extent.kind == 0 and not extent.compression:
            return extent.inline
        if extent.kind == 0:
            return _decode(extent.compression, extent.inline, MAX_COMPRESSED)
        if self._decoded is not None and self._decoded[0] == extent.disk_bytenr:
            return self._decoded[1]
        with self._fs.errors():
            raw = self._fs.read_logical(extent.disk_bytenr, extent.disk_num_bytes)
        data = _decode(extent.compression, raw, extent.ram_bytes)
        self._decoded = (extent.disk_bytenr, data)
        return data

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)  # what no extent covers is a hole: zeros
        end = offset + size
        if self._walk is None:
            self._walk = _ExtentWalk(self)
        for extent in self._walk.covering(offset, end):
            lo, hi = max(offset, extent.start), min(end, extent.end)
            if extent.kind == 2 or (extent.kind == 1 and extent.disk_bytenr == 0):
                continue
            skip = lo - extent.start
            if extent.kind == 1 and not extent.compression:
                with self._fs.errors():
                    chunk = self._fs.read_logical(
                        extent.disk_bytenr + extent.offset + skip, hi - lo
                    )
            else:
                at = extent.offset + skip
                chunk = self._content(extent)[at : at + hi - lo]
            out[lo - offset : lo - offset + len(chunk)] = chunk
        return bytes(out)

    def data_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        # As read() reads: a preallocated extent, or a regular one at disk address 0, is
        # a hole.  Extents come in key order, so by file offset.
        for extent in self.extent_items():
            if extent.start >= size:
                return
            holds_data = extent.kind == 0 or (extent.kind == 1 and extent.disk_bytenr != 0)
            if holds_data and extent.length:
                yield (extent.start, min(size, extent.end))

    def xattrs(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        cursor = self._inode.subvolume.tree.cursor()
        with self._fs.errors():
            for _item, data in cursor.iter(self._inode.inum, _XATTR_ITEM, 0, ignore_offset=True):
                for _loc, _type, name, value in _entries(bytes(data)):
                    found[name.decode("utf-8", "surrogateescape")] = value
        return found
