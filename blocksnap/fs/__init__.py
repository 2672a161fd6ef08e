"""Reading the filesystem inside a snapshot's image, through one adapter per library.

| module | library (licence)          | reads                   |
|--------|----------------------------|-------------------------|
| ext    | libfsext (LGPL-3)          | ext2, ext3, ext4        |
| xfs    | libfsxfs (LGPL-3)          | XFS v4 and v5           |
| ntfs   | libfsntfs (LGPL-3)         | NTFS                    |
| tsk    | pytsk3 (Apache, CPL, IPL)  | FAT12/16/32, exFAT      |
| volumes| libvsgpt, libvsmbr (LGPL-3)| GPT and MBR partitions  |

`probe.open_filesystem` picks the adapter; `filesystem.FileSystem` is what callers use.
"""

from __future__ import annotations

from blocksnap.fs.filesystem import Entry, FileSystem
from blocksnap.fs.node import FileKind, FileStat
from blocksnap.fs.probe import list_partitions, open_filesystem
from blocksnap.fs.volumes import Partition

__all__ = [
    "Entry",
    "FileKind",
    "FileStat",
    "FileSystem",
    "Partition",
    "list_partitions",
    "open_filesystem",
]
