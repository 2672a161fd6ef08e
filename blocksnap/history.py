"""The versions of one path across a volume's snapshots, told apart by content digest.

A file's digest is XXH3-128 of its content; a symlink's, of its target; a directory's, of
its sorted listing (name, kind, size, mtime of each entry).  Snapshots with the same map
root hold the same image, so they are not read again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from blocksnap.errors import FilesystemError, PathNotFoundError
from blocksnap.fs.filesystem import Entry, FileSystem
from blocksnap.fs.node import FileKind, FileStat
from blocksnap.model import SnapshotInfo

_READ_SIZE = 1 << 20


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
        offset = 0
        while offset < st.size:
            data = entry.read(offset, _READ_SIZE)
            h.update(data)
            offset += len(data)
    elif st.kind is FileKind.SYMLINK:
        h.update((st.target or "").encode("utf-8", "surrogateescape"))
    elif st.kind is FileKind.DIRECTORY:
        for child in sorted((c.stat for c in entry.children()), key=lambda s: s.path):
            line = f"{child.name}\0{child.kind.value}\0{child.size}\0{child.mtime_ns}\n"
            h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def versions(
    snapshots: list[SnapshotInfo],
    path: str,
    open_fs: Callable[[SnapshotInfo], FileSystem],
) -> list[Version]:
    """One Version per snapshot, in the order given (oldest first)."""
    found: list[Version] = []
    last_root: bytes | None = None
    last_present: str | None = None  # digest of the previous present version
    was_present = False
    for info in snapshots:
        if info.map_root == last_root and found and found[-1].state is not VersionState.UNREADABLE:
            prev = found[-1]
            same = VersionState.UNCHANGED if prev.stat is not None else VersionState.ABSENT
            found.append(Version(info, same, prev.stat, prev.digest))
            continue
        last_root = info.map_root
        try:
            with open_fs(info) as fs:
                try:
                    entry = fs.lookup(path)
                    stat, value = entry.stat, digest(entry)
                except PathNotFoundError:
                    stat, value = None, None
        except FilesystemError as exc:
            found.append(Version(info, VersionState.UNREADABLE, None, None, str(exc)))
            was_present = False
            continue
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
