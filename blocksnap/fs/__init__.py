"""Reading the filesystem inside a snapshot's image, through one adapter per library.

| module | library (licence)          | reads                   |
|--------|----------------------------|-------------------------|
| ext    | libfsext (LGPL-3)          | ext2, ext3, ext4        |
| xfs    | libfsxfs (LGPL-3)          | XFS v4 and v5           |
| extattrs, xfsattrs | (their own readers) | ext and XFS xattrs, inode checks |
| ntfs   | libfsntfs (LGPL-3)         | NTFS                    |
| tsk    | pytsk3 (Apache, CPL, IPL)  | FAT12/16/32, exFAT      |
| volumes| libvsgpt, libvsmbr (LGPL-3)| GPT and MBR partitions  |
| lvm    | (its own reader)           | LVM2 logical volumes    |

`probe.open_filesystem` picks the adapter; `filesystem.FileSystem` is what callers use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocksnap.fs.filesystem import Entry, FileSystem
    from blocksnap.fs.node import FileKind, FileStat
    from blocksnap.fs.probe import list_partitions, open_filesystem
    from blocksnap.fs.volumes import Partition

# Imported on first use (PEP 562): the libraries load only when a filesystem is read, so
# the CLI starts fast and a Ctrl-C during start-up never lands inside a library's import.
_LAZY = {
    "Entry": "blocksnap.fs.filesystem",
    "FileSystem": "blocksnap.fs.filesystem",
    "FileKind": "blocksnap.fs.node",
    "FileStat": "blocksnap.fs.node",
    "list_partitions": "blocksnap.fs.probe",
    "open_filesystem": "blocksnap.fs.probe",
    "Partition": "blocksnap.fs.volumes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blocksnap.fs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Entry",
    "FileKind",
    "FileStat",
    "FileSystem",
    "Partition",
    "list_partitions",
    "open_filesystem",
]
