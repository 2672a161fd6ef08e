"""Partition tables inside an image: GPT (libvsgpt) and MBR with logical partitions (libvsmbr).

Partitions are numbered as Linux numbers them: a GPT entry by its place in the table
(from 1); an MBR primary by its slot (1-4), and the logical partitions inside the extended
one from 5, in chain order.  libvsmbr lists partitions without their slots, so the four
slot entries of the MBR are read here to number the primaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyvsgpt
import pyvsmbr

from blocksnap.fs.image import Window


@dataclass(frozen=True, slots=True)
class Partition:
    """Where a filesystem can be: a partition-table entry, or an LVM logical volume."""

    name: str  # "1", "5", ...: a table entry's number; "VG/LV": a logical volume
    scheme: str  # "gpt", "mbr" or "lvm"
    offset: int  # bytes from the start of the image (a logical volume: its first extent)
    size: int
    type: str  # GPT type GUID, the MBR type byte as "0x83", or LVM segment types

    @property
    def number(self) -> int | None:
        """The table entry's number (from 1); None for a logical volume."""
        return int(self.name) if self.name.isdigit() else None


@dataclass(frozen=True, slots=True)
class Place:
    """A partition or logical volume with the window that reads it, or the reason none can."""

    partition: Partition
    window: Window | None
    problem: str | None = None


def find_partitions(image: Window) -> list[Partition]:
    """The partitions of a partitioned image; [] if it has no table either library knows."""
    image.seek(0)
    if pyvsgpt.check_volume_signature_file_object(image):
        table = pyvsgpt.volume()
        table.open_file_object(image)
        found = [
            Partition(str(i + 1), "gpt", int(p.volume_offset), int(p.size), str(p.type_identifier))
            for i, p in enumerate(table.partitions)
        ]
        table.close()
        return _inside(image, found)
    image.seek(0)
    if pyvsmbr.check_volume_signature_file_object(image):
        table = pyvsmbr.volume()
        table.open_file_object(image)
        slots = _mbr_slots(image)
        found, logical = [], 5
        for p in table.partitions:
            offset = int(p.volume_offset)
            number = slots.get(offset)
            if number is None:
                number, logical = logical, logical + 1
            found.append(Partition(str(number), "mbr", offset, int(p.size), f"0x{int(p.type):02x}"))
        table.close()
        return _inside(image, found)
    return []


_MBR_SECTOR = 512
_MBR_SLOTS = 0x1BE  # four 16-byte entries: type at +4, first sector (LE32) at +8


def _mbr_slots(image: Window) -> dict[int, int]:
    """Byte offset -> slot number (1-4) of the MBR's used primary entries."""
    sector = image.pread(0, _MBR_SECTOR)
    slots = {}
    for slot in range(4):
        entry = sector[_MBR_SLOTS + 16 * slot : _MBR_SLOTS + 16 * (slot + 1)]
        if len(entry) == 16 and entry[4] != 0:
            slots[int.from_bytes(entry[8:12], "little") * _MBR_SECTOR] = slot + 1
    return slots


def _inside(image: Window, partitions: list[Partition]) -> list[Partition]:
    """Drop entries that point outside the image (a damaged or hostile table)."""
    return [p for p in partitions if p.size > 0 and 0 <= p.offset <= image.size - p.size]
