"""The FAT12/16/32 and exFAT adapter, over The Sleuth Kit (pytsk3; Apache, CPL and IPL).

libfsfat was tried first and left: its release 20260826 decodes FAT and exFAT dates one
month late.  TSK reads deleted entries and adds virtual files ($MBR, $FAT1, $OrphanFiles,
exFAT's $ALLOC_BITMAP and $UPCASE_TABLE); only allocated, real entries are listed.
FAT has no owner, mode or link count, and its times are local times without a zone:
TSK reads them in the zone of the process (UTC on servers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

import pytsk3

from blocksnap.fs.image import Window
from blocksnap.fs.node import FileKind, FileStat, Mounted, Node

NAME = "tsk"
LIBRARY = "The Sleuth Kit (pytsk3 " + str(getattr(pytsk3, "get_version", lambda: "?")()) + ")"

_KINDS = {
    pytsk3.TSK_FS_TYPE_FAT12: "fat12",
    pytsk3.TSK_FS_TYPE_FAT16: "fat16",
    pytsk3.TSK_FS_TYPE_FAT32: "fat32",
    pytsk3.TSK_FS_TYPE_EXFAT: "exfat",
}
_VIRTUAL = {pytsk3.TSK_FS_META_TYPE_VIRT, pytsk3.TSK_FS_META_TYPE_VIRT_DIR}
_EXFAT_METADATA = {"$ALLOC_BITMAP", "$UPCASE_TABLE", "$VOLUME_GUID", "$TEXFAT"}


class TskImage(pytsk3.Img_Info):  # type: ignore[misc]
    """A Window as a TSK image: TSK asks for (offset, size) and the size."""

    def __init__(self, window: Window) -> None:
        self._window = window
        super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

    def close(self) -> None:
        pass

    def read(self, offset: int, size: int) -> bytes:
        return self._window.pread(offset, size)

    def get_size(self) -> int:
        return self._window.size


def detect(image: BinaryIO) -> bool:
    return _open(image) is not None


def _open(image: BinaryIO) -> tuple[Any, str] | None:
    if not isinstance(image, Window):
        raise TypeError("the TSK adapter reads a Window")
    try:
        fs = pytsk3.FS_Info(TskImage(image))
    except OSError:
        return None
    kind = _KINDS.get(fs.info.ftype)
    return (fs, kind) if kind else None


def mount(image: BinaryIO) -> Mounted:
    opened = _open(image)
    if opened is None:
        raise OSError("not a FAT or exFAT filesystem")
    fs, kind = opened
    root = fs.open_meta(inode=fs.info.root_inum)
    return Mounted(
        root=TskNode(fs, root, kind == "exfat", is_root=True),
        kind=kind,
        library=LIBRARY,
        case_insensitive=True,
        close=lambda: None,
    )


def entries(directory: Any) -> Iterator[tuple[str, Any]]:
    """The allocated, real entries of a TSK directory: no deleted entries, no virtual
    files of TSK's own, no "." or ".."."""
    for child in directory.as_directory():
        name_info, meta = child.info.name, child.info.meta
        if meta is None or not int(name_info.flags) & pytsk3.TSK_FS_NAME_FLAG_ALLOC:
            continue
        if meta.type in _VIRTUAL:
            continue
        name = bytes(name_info.name).decode("utf-8", "surrogateescape")
        if name not in (".", ".."):
            yield name, child


def _ns(seconds: int, nanos: int) -> int | None:
    return seconds * 1_000_000_000 + nanos if seconds else None


class TskNode:
    """A TSK file, with its filesystem kept alive by the reference."""

    __slots__ = ("_exfat", "_file", "_fs", "_is_root")

    def __init__(self, fs: Any, file: Any, exfat: bool, is_root: bool = False) -> None:
        self._fs = fs
        self._file = file
        self._exfat = exfat
        self._is_root = is_root

    def stat(self, path: str, name: str) -> FileStat:
        meta = self._file.info.meta
        if meta.type == pytsk3.TSK_FS_META_TYPE_DIR:
            kind = FileKind.DIRECTORY
        elif meta.type == pytsk3.TSK_FS_META_TYPE_REG:
            kind = FileKind.FILE
        else:
            kind = FileKind.OTHER
        return FileStat(
            path=path,
            name=name,
            kind=kind,
            size=0 if kind is FileKind.DIRECTORY else int(meta.size),
            mode=None,
            uid=None,
            gid=None,
            mtime_ns=_ns(int(meta.mtime), int(meta.mtime_nano)),
            atime_ns=_ns(int(meta.atime), int(meta.atime_nano)),
            nlink=None,
            file_id=int(meta.addr),
        )

    def children(self) -> Iterator[tuple[str, Node]]:
        for name, child in entries(self._file):
            if self._exfat and self._is_root and name in _EXFAT_METADATA:
                continue
            yield name, TskNode(self._fs, child, self._exfat)

    def lookup(self, name: str) -> Node | None:
        return None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._file.read_random(offset, size))

    def data_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        # FAT and exFAT have no holes; an inline ext4 file (see `ext`) is all data.
        if size:
            yield (0, size)

    def xattrs(self) -> dict[str, bytes]:
        return {}
