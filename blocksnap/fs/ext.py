"""The ext2/3/4 adapter, over libfsext (LGPL; PyPI libfsext-python).

libfsext reads extents, htree directories, inline data, fast and slow symlinks and
extended attributes, through the file object it is given.
"""

from __future__ import annotations

from typing import BinaryIO

import pyfsext

from blocksnap.fs.libyal import PosixEntryNode
from blocksnap.fs.node import Mounted

NAME = "ext"
LIBRARY = f"libfsext {pyfsext.get_version()}"


def detect(image: BinaryIO) -> bool:
    return bool(pyfsext.check_volume_signature_file_object(image))


def mount(image: BinaryIO) -> Mounted:
    volume = pyfsext.volume()
    volume.open_file_object(image)
    return Mounted(
        root=PosixEntryNode(volume.get_root_directory(), volume, ""),
        kind=_kind(image),
        library=LIBRARY,
        case_insensitive=False,
        close=volume.close,
    )


# Superblock feature flags (offsets from the start of the superblock, at byte 1024).
_COMPAT, _INCOMPAT = 0x5C, 0x60
_HAS_JOURNAL = 0x4
_EXT4_INCOMPAT = 0x40 | 0x80 | 0x200  # extents, 64bit, flex_bg


def _kind(image: BinaryIO) -> str:
    """ext2, ext3 or ext4, by the features the superblock declares (as blkid names them)."""
    image.seek(1024)
    sb = image.read(1024)
    if len(sb) < _INCOMPAT + 4:
        return "ext"
    compat = int.from_bytes(sb[_COMPAT : _COMPAT + 4], "little")
    incompat = int.from_bytes(sb[_INCOMPAT : _INCOMPAT + 4], "little")
    if incompat & _EXT4_INCOMPAT:
        return "ext4"
    return "ext3" if compat & _HAS_JOURNAL else "ext2"
