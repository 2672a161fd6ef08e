"""The versions of one path across a volume's snapshots, told apart by content digest.

A file's digest is XXH3-128 of its content; a symlink's, of its target; a directory's, of
its sorted listing (name, kind, size, mtime of each entry).

A snapshot is read only where it could differ.  Finding the path and digesting it reads a
set of image blocks (its footprint: the partition table, the filesystem's metadata on the
way, the file's own blocks), and what it finds depends on nothing else.  So when none of
those blocks changed from one snapshot to the next (told from the two block maps, whose
shared leaves are skipped unread) and the image kept its size, the next snapshot would
read the same bytes and find the same thing: it is not read.  That spares the snapshots
in which only other partitions or logical volumes of a disk changed.  A filesystem that
was written at all rewrites its superblock's counters, which every lookup reads, so there
the path is read again; telling a large file's versions apart by the block IDs under its
extents, without reading it, is not done yet.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from blocksnap.errors import FilesystemError, PathNotFoundError
from blocksnap.fs.filesystem import Entry, FileSystem
from blocksnap.fs.node import FileKind, FileStat
from blocksnap.model import SnapshotInfo


class VersionState(enum.Enum):
    ADDED = "added"  # present, and absent (or unreadable) in the snapshot before
    CHANGED = "changed"  # present before too, with other content
    UNCHANGED = "unchanged"
    REMOVED = "removed"  # absent, present before
    ABSENT = "absent"  # absent here and before
    UNREADABLE = "unreadable"  # the filesystem of this snapshot could not be read


@dataclass(frozen=True, slots=True)
class Version:
    snapshot: SnapshotInfo
    state: VersionState
    stat: FileStat | None
    digest: str | None  # hex; None when absent
    error: str | None = None  # why the snapshot was unreadable


def digest(entry: Entry) -> str:
    h = xxhash.xxh3_128()
    st = entry.stat
    h.update(st.kind.value.encode() + b"\0")
    if st.kind is FileKind.FILE:
        # The runs that are not zeros, with their offsets: the same for the same content
        # whatever the extent map, and a hostile sparse file costs its data, not its size.
        h.update(st.size.to_bytes(8, "little"))
        for offset, run in entry.data_runs():
            h.update(offset.to_bytes(8, "little"))
            h.update(run)
    elif st.kind is FileKind.SYMLINK:
        h.update((st.target or "").encode("utf-8", "surrogateescape"))
    elif st.kind is FileKind.DIRECTORY:
        for child in sorted((c.stat for c in entry.children()), key=lambda s: s.path):
            line = f"{child.name}\0{child.kind.value}\0{child.size}\0{child.mtime_ns}\n"
            h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _untouched(footprint: list[int], changed: list[tuple[int, int]]) -> bool:
    """Whether no block of the sorted `footprint` lies in the (first, count) ranges."""
    for first, count in changed:
        i = bisect.bisect_left(footprint, first)
        if i < len(footprint) and footprint[i] < first + count:
            return False
    return True


def versions(
    snapshots: list[SnapshotInfo],
    path: str,
    open_fs: Callable[[SnapshotInfo, set[int]], FileSystem],
    changed_blocks: Callable[[SnapshotInfo, SnapshotInfo], list[tuple[int, int]]],
) -> list[Version]:
    """One Version per snapshot, in the order given (oldest first).

    `open_fs(info, touched)` opens a snapshot's filesystem, adding to `touched` every image
    block it reads; `changed_blocks(a, b)` gives the block ranges that differ."""
    found: list[Version] = []
    footprint: list[int] | None = None  # blocks the last snapshot actually read needed
    last_present: str | None = None  # digest of the previous present version
    was_present = False
    for info in snapshots:
        prev = found[-1] if found else None
        if (
            prev is not None
            and footprint is not None
            and (prev.snapshot.block_size, prev.snapshot.image_size)
            == (info.block_size, info.image_size)  # libraries read the size too
            and _untouched(footprint, changed_blocks(prev.snapshot, info))
        ):
            same = VersionState.UNCHANGED if prev.stat is not None else VersionState.ABSENT
            found.append(Version(info, same, prev.stat, prev.digest))
            continue
        touched: set[int] = set()
        try:
            with open_fs(info, touched) as fs:
                try:
                    entry = fs.lookup(path)
                    stat, value = entry.stat, digest(entry)
                except PathNotFoundError:
                    stat, value = None, None
        except FilesystemError as exc:
            found.append(Version(info, VersionState.UNREADABLE, None, None, str(exc)))
            footprint, was_present = None, False
            continue
        footprint = sorted(touched)
        if stat is None:
            state = VersionState.REMOVED if was_present else VersionState.ABSENT
        elif not was_present:
            state = VersionState.ADDED
        else:
            state = VersionState.UNCHANGED if value == last_present else VersionState.CHANGED
        found.append(Version(info, state, stat, value))
        was_present = stat is not None
        if value is not None:
            last_present = value
    return found
