"""Finding the filesystem in an image: on the whole image, else on each partition.

Adapters are tried in the order of ADAPTERS; the first whose library recognises the
bytes mounts it.  A disk with several filesystems needs a partition number.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from blocksnap.errors import FilesystemError
from blocksnap.fs.filesystem import FileSystem, library_errors
from blocksnap.fs.image import Latch, Window
from blocksnap.fs.volumes import Partition, find_partitions
from blocksnap.reader import ImageReader

# Adapter modules under blocksnap.fs, and the filesystems each one is asked about.
ADAPTERS = {
    "ext": "ext2/3/4",
    "xfs": "XFS",
    "ntfs": "NTFS",
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
    where = f"partition {partition.number}" if partition else "the image"
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


def list_partitions(reader: ImageReader) -> list[tuple[Partition, str | None]]:
    """Every partition of the image with the filesystem kind recognised on it (or None)."""
    whole = _pread(reader)
    adapters = _adapters()
    found = []
    for partition in _partitions(whole):
        window = whole.sub(partition.offset, partition.size)
        adapter = _recognise(window, adapters)
        found.append((partition, ADAPTERS[adapter.NAME] if adapter else None))
    return found


def _partitions(whole: Window) -> list[Partition]:
    with library_errors(whole.latch, "the partition table cannot be read"):
        return find_partitions(whole)


def open_filesystem(reader: ImageReader, partition: int | None = None) -> FileSystem:
    """Mount the filesystem of the image, or of partition number `partition` (from 1).

    The FileSystem owns `reader` from here on; closing it closes the reader."""
    whole = _pread(reader)
    adapters = _adapters()
    if partition is None:
        adapter = _recognise(whole, adapters)
        if adapter is not None:
            return _mount(adapter, whole, reader, None)
    partitions = _partitions(whole)
    if partition is not None:
        chosen = [p for p in partitions if p.number == partition]
        if not chosen:
            numbers = ", ".join(str(p.number) for p in partitions) or "none"
            raise FilesystemError(f"no partition {partition} (the image has: {numbers})")
        candidates = chosen
    else:
        candidates = partitions
    mountable: list[tuple[Partition, ModuleType, Window]] = []
    for p in candidates:
        window = whole.sub(p.offset, p.size)
        adapter = _recognise(window, adapters)
        if adapter is not None:
            mountable.append((p, adapter, window))
    if not mountable:
        where = (
            f"partition {partition}"
            if partition is not None
            else f"the image or its {len(partitions)} partitions"
            if partitions
            else "the image (no partition table either)"
        )
        raise FilesystemError(f"no known filesystem on {where}: tried {_tried()}")
    if len(mountable) > 1:
        listed = ", ".join(f"{p.number} ({ADAPTERS[a.NAME]})" for p, a, _ in mountable)
        raise FilesystemError(
            f"the image holds {len(mountable)} filesystems, on partitions {listed}: "
            "choose one with --partition N"
        )
    p, adapter, window = mountable[0]
    return _mount(adapter, window, reader, p)
