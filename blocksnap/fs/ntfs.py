"""The NTFS adapter, over libfsntfs (LGPL; PyPI libfsntfs-python).

NTFS has no POSIX owner or mode; hard links share an MFT entry.  Symlinks are either
Windows reparse points or the "IntxLNK" system files that ntfs-3g writes by default.
The metadata files ($MFT, $Bitmap, $Extend ... MFT entries 0-23) are not listed.
Alternate data streams are the extended attributes "user.NAME", as ntfs-3g shows them
(its default streams_interface=xattr): restored into ntfs-3g they are streams again.  A
stream longer than an xattr can hold (64 KiB) is named as left out.  Security
descriptors are not restored.

A file's data runs come from libfsntfs's extents (see `libyal`).  In a compressed file a
compression unit (16 clusters) is stored as data runs followed by a sparse run that is
not a hole: the unit decompresses to its full length.  So every data run is taken to the
end of its unit, whether or not the file is compressed (its $DATA attribute, not the
flags libfsntfs shows, decides that); an uncompressed file reads a few zeros more.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import pyfsntfs

from blocksnap.fs.attrs import XATTR_SIZE_MAX, InodeAttributes
from blocksnap.fs.libyal import extent_data_ranges
from blocksnap.fs.node import FileKind, FileStat, Mounted, Node

NAME = "ntfs"
LIBRARY = f"libfsntfs {pyfsntfs.get_version()}"

_FIRST_USER_ENTRY = 24  # MFT entries below this are reserved for the filesystem itself
_FILETIME_UNIX_EPOCH = 116444736000000000  # 100 ns intervals from 1601 to 1970
_ATTRIBUTE_SYSTEM = 0x4
_INTX_SYMLINK = b"IntxLNK\x01"
_INTX_MAX_SIZE = 8 + 2 * 4096
_COMPRESSION_UNIT_CLUSTERS = 16


def detect(image: BinaryIO) -> bool:
    return bool(pyfsntfs.check_volume_signature_file_object(image))


def mount(image: BinaryIO) -> Mounted:
    volume = pyfsntfs.volume()
    volume.open_file_object(image)
    return Mounted(
        root=NtfsNode(
            volume.get_root_directory(),
            _COMPRESSION_UNIT_CLUSTERS * int(volume.cluster_block_size),
        ),
        kind="ntfs",
        library=LIBRARY,
        case_insensitive=True,
        close=volume.close,
    )


def _ns(filetime: int) -> int:
    return (filetime - _FILETIME_UNIX_EPOCH) * 100


class NtfsNode:
    """A libfsntfs file entry."""

    __slots__ = ("_entry", "_unit_size")

    def __init__(self, entry: Any, unit_size: int) -> None:
        self._entry = entry
        self._unit_size = unit_size  # of a compression unit, in bytes

    def _intx_target(self, size: int) -> str | None:
        e = self._entry
        if not int(e.file_attribute_flags) & _ATTRIBUTE_SYSTEM or not 8 < size <= _INTX_MAX_SIZE:
            return None
        data = bytes(e.read_buffer_at_offset(size, 0))
        if not data.startswith(_INTX_SYMLINK):
            return None
        return data[8:].decode("utf-16-le", "surrogatepass").rstrip("\0")

    def stat(self, path: str, name: str) -> FileStat:
        e = self._entry
        size = int(e.size or 0)
        target: str | None = None
        if e.has_directory_entries_index():
            kind = FileKind.DIRECTORY
        else:
            reparse = e.symbolic_link_target
            target = str(reparse).replace("\\", "/") if reparse else self._intx_target(size)
            kind = FileKind.SYMLINK if target is not None else FileKind.FILE
        return FileStat(
            path=path,
            name=name,
            kind=kind,
            size=0 if kind is FileKind.DIRECTORY else size,
            mode=None,
            uid=None,
            gid=None,
            mtime_ns=_ns(int(e.get_modification_time_as_integer())),
            atime_ns=_ns(int(e.get_access_time_as_integer())),
            nlink=None,
            file_id=int(e.file_reference) & ((1 << 48) - 1),
            target=target,
        )

    def children(self) -> Iterator[tuple[str, Node]]:
        for child in self._entry.sub_file_entries:
            if int(child.file_reference) & ((1 << 48) - 1) < _FIRST_USER_ENTRY:
                continue
            yield str(child.name), NtfsNode(child, self._unit_size)

    def lookup(self, name: str) -> Node | None:
        return None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._entry.read_buffer_at_offset(size, offset))

    def data_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        unit = max(1, self._unit_size)
        for start, end in extent_data_ranges(self._entry, size):
            yield (start, min(size, -(-end // unit) * unit))

    def xattrs(self) -> dict[str, bytes]:
        attrs = InodeAttributes(flags=0)
        for i in range(int(self._entry.number_of_alternate_data_streams)):
            stream = self._entry.get_alternate_data_stream(i)
            name, size = f"user.{stream.name}", int(stream.size or 0)
            if size > XATTR_SIZE_MAX:
                attrs.unreadable[name] = f"a stream of {size} bytes, more than an xattr holds"
                continue
            value = bytes(stream.read_buffer_at_offset(size, 0)) if size else b""
            if len(value) != size:
                attrs.unreadable[name] = f"read {len(value)} of its {size} bytes"
            else:
                attrs.found[name] = value
        return attrs.complete()
