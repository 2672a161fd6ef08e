"""Finding the filesystem in an image: the whole image, a partition or a logical volume.

Adapters are tried in the order of ADAPTERS on the whole image, then on every partition
and LVM logical volume; the first whose library recognises the bytes mounts it.  A disk
with several filesystems needs a choice: a partition number, or "VG/LV".
"""

from __future__ import annotations

import importlib
from types import ModuleType

from blocksnap.errors import FilesystemError
from blocksnap.fs.filesystem import FileSystem, library_errors
from blocksnap.fs.image import Latch, Window
from blocksnap.fs.lvm import find_logical_volumes
from blocksnap.fs.volumes import Partition, Place, find_partitions
from blocksnap.reader import ImageReader

# Adapter modules under blocksnap.fs, and the filesystems each one is asked about.
ADAPTERS = {
    "ext": "ext2/3/4",
    "xfs": "XFS",
    "ntfs": "NTFS",
    "btrfs": "btrfs",  # before TSK, whose probing reads across the image
    "tsk": "FAT and exFAT",
}


def _adapters() -> list[ModuleType]:
    return [importlib.import_module(f"blocksnap.fs.{name}") for name in ADAPTERS]


def _tried() -> str:
    return ", ".join(ADAPTERS.values())


def _recognise(window: Window, adapters: list[ModuleType]) -> ModuleType | None:
    for adapter in adapters:
        window.seek(0)
        try:
            with library_errors(window.latch, adapter.NAME):
                if adapter.detect(window):
                    return adapter
        except FilesystemError:
            continue  # the library did not recognise the bytes
    return None


def _mount(
    adapter: ModuleType, window: Window, reader: ImageReader, partition: Partition | None
) -> FileSystem:
    where = f"partition {partition.name}" if partition else "the image"
    window.seek(0)
    with library_errors(
        window.latch, f"{where} looks like {ADAPTERS[adapter.NAME]} but cannot be read"
    ):
        mounted = adapter.mount(window)
    return FileSystem(mounted, window.latch, reader, partition)


def _pread(reader: ImageReader) -> Window:
    def pread(offset: int, size: int) -> bytes:
        reader.seek(offset)
        return reader.read(size)

    return Window(pread, 0, reader.size, Latch())


def _places(whole: Window, lvm: bool = True) -> tuple[list[Place], list[str]]:
    """The image's partitions and (unless `lvm` is false) LVM logical volumes, and what
    made LVM unreadable where a physical volume is damaged."""
    with library_errors(whole.latch, "the partition table cannot be read"):
        partitions = find_partitions(whole)
    windows = [(f"partition {p.name}", whole.sub(p.offset, p.size)) for p in partitions]
    places = [Place(p, window) for p, (_where, window) in zip(partitions, windows, strict=True)]
    if not lvm:
        return places, []
    with library_errors(whole.latch, "the LVM metadata cannot be read"):
        logical, problems = find_logical_volumes(whole, windows or [("the image", whole)])
    return places + logical, problems


def list_partitions(reader: ImageReader) -> list[tuple[Partition, str | None]]:
    """Every partition and logical volume of the image, with the filesystem kind found on
    it (None when there is none, or the logical volume cannot be read)."""
    whole = _pread(reader)
    adapters = _adapters()
    found = []
    for place in _places(whole)[0]:
        adapter = _recognise(place.window, adapters) if place.window is not None else None
        found.append((place.partition, ADAPTERS[adapter.NAME] if adapter else None))
    return found


def open_filesystem(reader: ImageReader, partition: int | str | None = None) -> FileSystem:
    """Mount the filesystem of the image, or of `partition`: a partition number (from 1)
    or a logical volume as "VG/LV".

    The FileSystem owns `reader` from here on; closing it closes the reader."""
    whole = _pread(reader)
    adapters = _adapters()
    if partition is None:
        adapter = _recognise(whole, adapters)
        if adapter is not None:
            return _mount(adapter, whole, reader, None)
    # A partition chosen by number needs no LVM scan, which would read every partition.
    places, problems = _places(whole, lvm=partition is None or "/" in str(partition))
    damaged = f"; {'; '.join(problems)}" if problems else ""
    if partition is not None:
        wanted = str(partition)
        candidates = [p for p in places if p.partition.name == wanted]
        if not candidates:
            names = ", ".join(p.partition.name for p in places) or "none"
            raise FilesystemError(f"no partition {wanted} (the image has: {names}){damaged}")
        if candidates[0].problem is not None:
            raise FilesystemError(candidates[0].problem)
    else:
        candidates = places
    mountable: list[tuple[Partition, ModuleType, Window]] = []
    for place in candidates:
        if place.window is None:
            continue
        adapter = _recognise(place.window, adapters)
        if adapter is not None:
            mountable.append((place.partition, adapter, place.window))
    if not mountable:
        where = (
            f"partition {partition}"
            if partition is not None
            else f"the image or its {len(places)} partitions and logical volumes"
            if places
            else "the image (no partition table or LVM either)"
        )
        raise FilesystemError(f"no known filesystem on {where}: tried {_tried()}{damaged}")
    if len(mountable) > 1:
        listed = ", ".join(f"{p.name} ({ADAPTERS[a.NAME]})" for p, a, _ in mountable)
        raise FilesystemError(
            f"the image holds {len(mountable)} filesystems, on {listed}: "
            "choose one with --partition N or --partition VG/LV"
        )
    p, adapter, window = mountable[0]
    return _mount(adapter, window, reader, p)
