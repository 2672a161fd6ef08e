"""The XFS adapter, over libfsxfs (LGPL; PyPI libfsxfs-python).

libfsxfs reads XFS version 4 and 5 (CRC) volumes: short-form, block, leaf and node
directories, extent and B+tree data forks, symlinks and extended attributes.
"""

from __future__ import annotations

from typing import BinaryIO

import pyfsxfs

from blocksnap.fs.libyal import PosixEntryNode
from blocksnap.fs.node import Mounted

NAME = "xfs"
LIBRARY = f"libfsxfs {pyfsxfs.get_version()}"


def detect(image: BinaryIO) -> bool:
    return bool(pyfsxfs.check_volume_signature_file_object(image))


def mount(image: BinaryIO) -> Mounted:
    volume = pyfsxfs.volume()
    volume.open_file_object(image)
    return Mounted(
        root=PosixEntryNode(volume.get_root_directory(), volume, ""),
        kind="xfs",
        library=LIBRARY,
        case_insensitive=False,
        close=volume.close,
    )
