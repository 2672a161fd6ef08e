"""Paths over an adapter's nodes: lookup, listing, walking and file streams, errors named.

Everything an adapter's library raises becomes a `FilesystemError` naming the path, unless
a blocksnap error (a damaged block, a missing pack) was its cause: that one is raised as
itself.  Symlinks met while resolving a path are followed inside the filesystem, never on
the host, and at most `MAX_SYMLINKS` times.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import re
from collections import deque
from collections.abc import Callable, Iterator
from functools import cached_property

from blocksnap.errors import BlocksnapError, FilesystemError, PathNotFoundError
from blocksnap.fs.image import Latch, PositionalFile
from blocksnap.fs.node import FileKind, FileStat, Mounted, Node
from blocksnap.fs.volumes import Partition
from blocksnap.reader import ImageReader

MAX_SYMLINKS = 40
MAX_DEPTH = 256  # directory levels a walk descends; deeper trees are reported, not read
HOLE_SIZE = 4096  # all-zero pieces of this size, aligned in the file, count as holes
CHUNK_SIZE = 1 << 20  # bytes of a file read at once by data_runs
_ZERO = bytes(HOLE_SIZE)
STREAM_BUFFER_SIZE = 1 << 20

# What the C libraries raise for a damaged or unsupported structure.
LIBRARY_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    RuntimeError,
    MemoryError,
    OverflowError,
    IndexError,
    KeyError,
    AttributeError,
    SystemError,
)

SkipCallback = Callable[[str, str], None]  # (path, reason)


def short_reason(exc: BaseException) -> str:
    """The first clause of a library's message, without its function-name prefixes."""
    text = str(exc) or type(exc).__name__
    text = re.sub(r"^\w+: ", "", text.strip())
    return text.split(". ", 1)[0].rstrip(".")


@contextlib.contextmanager
def library_errors(latch: Latch, what: str) -> Iterator[None]:
    """A blocksnap error that a library swallowed is raised as itself; any other error of
    the library becomes a FilesystemError "what: reason"."""
    try:
        yield
    except BlocksnapError:
        raise
    except LIBRARY_ERRORS as exc:
        cause = latch.take()
        if cause is not None:
            raise cause from exc
        raise FilesystemError(f"{what}: {short_reason(exc)}") from exc


def valid_name(name: str) -> bool:
    """Whether a directory entry's name can be a path component at all."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _join(directory: str, name: str) -> str:
    # Not posixpath.join: a name that starts with "/" must not replace the directory.
    return directory.rstrip("/") + "/" + name


def split_path(path: str) -> list[str]:
    if "\0" in path:
        raise FilesystemError(f"{path!r}: a path cannot hold a NUL character")
    return [part for part in path.split("/") if part not in ("", ".")]


class FileSystem:
    """The filesystem inside a snapshot's image, read lazily through one adapter.

    It owns the image reader it was opened on, and closes it with itself."""

    def __init__(
        self, mounted: Mounted, latch: Latch, image: ImageReader, partition: Partition | None
    ) -> None:
        self._mounted = mounted
        self._latch = latch
        self._image = image
        self.snapshot = image.info
        self.kind = mounted.kind
        self.library = mounted.library
        self.case_insensitive = mounted.case_insensitive
        self.partition = partition
        self.stats = image.stats  # blocks fetched from the store so far
        self.root = Entry(self, "/", "/", mounted.root)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(*LIBRARY_ERRORS):
                self._mounted.close()
            self._image.close()

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def translate(self, path: str) -> Iterator[None]:
        """Raise what the library raises as a FilesystemError naming `path`."""
        if self._closed:
            raise FilesystemError("the filesystem is closed")
        with library_errors(self._latch, f"{self.kind}: {path}"):
            yield

    # --- paths -----------------------------------------------------------------------------

    def lookup(self, path: str, *, follow_symlinks: bool = False) -> Entry:
        """The entry at `path`; symlinks along the way are followed, the last one only if
        asked.  ".." never climbs above the root."""
        pending = split_path(path)
        pending.reverse()
        trail: list[Entry] = [self.root]
        hops = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if len(trail) > 1:
                    trail.pop()
                continue
            here = trail[-1]
            if here.stat.kind is not FileKind.DIRECTORY:
                raise PathNotFoundError(f"{here.path}: not a directory")
            entry = here.child(part)
            if entry.stat.kind is FileKind.SYMLINK and (pending or follow_symlinks):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise FilesystemError(f"{path}: too many levels of symbolic links")
                target = entry.stat.target or ""
                if target.startswith("/"):
                    trail = [self.root]
                pending.extend(reversed(split_path(target)))
                continue
            trail.append(entry)
        return trail[-1]

    def stat(self, path: str, *, follow_symlinks: bool = False) -> FileStat:
        return self.lookup(path, follow_symlinks=follow_symlinks).stat

    def listdir(self, path: str = "/") -> list[FileStat]:
        """A directory's entries, sorted by name; a symlink to a directory is followed."""
        directory = self.lookup(path, follow_symlinks=True)
        if directory.stat.kind is not FileKind.DIRECTORY:
            raise FilesystemError(f"{directory.path}: not a directory")
        return sorted((child.stat for child in directory.children()), key=lambda s: s.path)

    def open(self, path: str) -> io.BufferedReader:
        """A regular file's content as a binary file object (a symlink is followed)."""
        return self.lookup(path, follow_symlinks=True).open()

    def readlink(self, path: str) -> str:
        stat = self.stat(path)
        if stat.kind is not FileKind.SYMLINK or stat.target is None:
            raise FilesystemError(f"{path}: not a symbolic link")
        return stat.target

    def xattrs(self, path: str) -> dict[str, bytes]:
        return self.lookup(path).xattrs()

    def walk(self, path: str = "/", on_skip: SkipCallback | None = None) -> Iterator[Entry]:
        """`path` and everything under it, parents before children, without following
        symlinks.  A directory met twice (a hostile image can link one into itself), one
        deeper than MAX_DEPTH, or an entry whose name cannot be a path component, is
        reported to `on_skip` and not entered."""
        top = self.lookup(path)
        yield top
        if top.stat.kind is not FileKind.DIRECTORY:
            return
        seen = {top.stat.file_id}
        stack = [top.children()]
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            if not valid_name(entry.name):
                if on_skip:
                    on_skip(entry.path, f"invalid name {entry.name!r}")
                continue
            yield entry
            if entry.stat.kind is not FileKind.DIRECTORY:
                continue
            if entry.stat.file_id in seen:
                if on_skip:
                    on_skip(entry.path, "directory already visited (a loop in the image)")
            elif len(stack) >= MAX_DEPTH:
                if on_skip:
                    on_skip(entry.path, f"deeper than {MAX_DEPTH} directory levels")
            else:
                seen.add(entry.stat.file_id)
                stack.append(entry.children())

    def find(self, pattern: str = "*", path: str = "/") -> Iterator[FileStat]:
        """Entries whose name (or, for a pattern with "/", whose path) matches a glob."""
        key: Callable[[Entry], str] = (lambda e: e.path) if "/" in pattern else (lambda e: e.name)
        for entry in self.walk(path):
            if fnmatch.fnmatchcase(key(entry), pattern):
                yield entry.stat


class Entry:
    """One file, directory or link of a FileSystem, by the path it was reached through."""

    __slots__ = ("__dict__", "_fs", "_node", "name", "path")

    def __init__(self, fs: FileSystem, path: str, name: str, node: Node) -> None:
        self._fs = fs
        self._node = node
        self.path = path
        self.name = name

    def __repr__(self) -> str:
        return f"Entry({self.path!r})"

    @cached_property
    def stat(self) -> FileStat:
        with self._fs.translate(self.path):
            return self._node.stat(self.path, self.name)

    def children(self) -> Iterator[Entry]:
        """The entries of this directory, names as stored (see valid_name)."""
        with self._fs.translate(self.path):
            found = self._node.children()
        while True:
            with self._fs.translate(self.path):
                item = next(found, None)
            if item is None:
                return
            name, node = item
            yield Entry(self._fs, _join(self.path, name), name, node)

    def child(self, name: str) -> Entry:
        """The entry called `name` here: the exact name first, then any case where the
        filesystem ignores case."""
        with self._fs.translate(self.path):
            found = self._node.lookup(name)
        if found is not None:
            return Entry(self._fs, _join(self.path, name), name, found)
        folded: Entry | None = None
        fold = name.casefold() if self._fs.case_insensitive else None
        for entry in self.children():
            if entry.name == name:
                return entry
            if folded is None and fold is not None and entry.name.casefold() == fold:
                folded = entry
        if folded is None:
            raise PathNotFoundError(f"{_join(self.path, name)}: no such file or directory")
        return folded

    def xattrs(self) -> dict[str, bytes]:
        with self._fs.translate(self.path):
            return self._node.xattrs()

    def read(self, offset: int, size: int) -> bytes:
        """Exactly min(size, file size - offset) bytes of content; anything shorter is an
        error, never silently short data."""
        want = max(0, min(size, self.stat.size - offset))
        if want == 0:
            return b""
        with self._fs.translate(self.path):
            data = self._node.read(offset, want)
        if len(data) != want:
            raise FilesystemError(
                f"{self.path}: read {len(data)} bytes at {offset}, expected {want}"
            )
        return data

    def data_runs(self) -> Iterator[tuple[int, memoryview]]:
        """(offset, bytes) of the file's content, in order, leaving out all-zero HOLE_SIZE
        pieces (aligned in the file); only what data_ranges says may hold data is read,
        in chunks aligned to CHUNK_SIZE, and everything else counts as zeros.  The runs
        follow the content alone, not the extent map: a sparse file and a dense one with
        the same bytes give the same runs, so what is written (extract) or hashed
        (versions) costs the data, never the apparent size."""
        for start, end, parts in _windows(self.data_ranges(), self.stat.size):
            offset = start
            while offset < end:
                stop = min(end, (offset // CHUNK_SIZE + 1) * CHUNK_SIZE)
                if len(parts) == 1 and parts[0][0] <= offset and stop <= parts[0][1]:
                    chunk = memoryview(self.read(offset, stop - offset))
                else:  # pieces of holes between the ranges read as the zeros they are
                    buf = bytearray(stop - offset)
                    while parts and parts[0][0] < stop:
                        lo, hi = max(parts[0][0], offset), min(parts[0][1], stop)
                        buf[lo - offset : hi - offset] = self.read(lo, hi - lo)
                        if parts[0][1] > stop:
                            break
                        parts.popleft()
                    chunk = memoryview(buf)
                for first, last in _runs(chunk):
                    yield offset + first, chunk[first:last]
                offset = stop

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """The (start, end) byte ranges of a regular file that may hold data, from its
        extent map: sorted, disjoint, not touching, inside the file's size.  Everything
        else reads as zeros, so a copy need not read it.  The map is the image's: ranges
        past the size are cut, overlapping ones merged, and one that starts before the
        one before it is a FilesystemError (it would be neither skipped nor read twice
        without keeping the whole map)."""
        size = self.stat.size
        with self._fs.translate(self.path):
            found = self._node.data_ranges(size)
        held: tuple[int, int] | None = None
        while True:
            with self._fs.translate(self.path):
                item = next(found, None)
            if item is None:
                break
            start, end = max(0, item[0]), min(size, item[1])
            if start >= end:
                continue
            if held is not None and start < held[0]:
                raise FilesystemError(
                    f"{self.path}: the extent map is out of order ({start} after {held[0]})"
                )
            if held is not None and start <= held[1]:
                held = (held[0], max(held[1], end))
                continue
            if held is not None:
                yield held
            held = (start, end)
        if held is not None:
            yield held

    def open(self) -> io.BufferedReader:
        if self.stat.kind is not FileKind.FILE:
            raise FilesystemError(f"{self.path}: not a regular file ({self.stat.kind.value})")
        return io.BufferedReader(_EntryStream(self), STREAM_BUFFER_SIZE)


class _EntryStream(PositionalFile):
    """A regular file's content as a raw, seekable binary stream."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(entry.stat.size)
        self._entry = entry

    def pread(self, offset: int, size: int) -> bytes:
        return self._entry.read(offset, size)


def _windows(
    ranges: Iterator[tuple[int, int]], size: int
) -> Iterator[tuple[int, int, deque[tuple[int, int]]]]:
    """Sorted, disjoint (start, end) ranges grouped into windows widened to HOLE_SIZE
    boundaries (or the file's end): (start, end, the ranges inside)."""
    held: tuple[int, int, deque[tuple[int, int]]] | None = None
    for first, last in ranges:
        start = first - first % HOLE_SIZE
        end = min(size, -(-last // HOLE_SIZE) * HOLE_SIZE)
        if held is not None and start < held[1]:
            held[2].append((first, last))
            held = (held[0], end, held[2])
            continue
        if held is not None:
            yield held
        held = (start, end, deque([(first, last)]))
    if held is not None:
        yield held


def _runs(data: memoryview) -> list[tuple[int, int]]:
    """(start, end) of the runs of data (which starts HOLE_SIZE-aligned in its file) that
    are not all-zero HOLE_SIZE pieces."""
    if data.nbytes == 0 or bytes(data).count(0) == data.nbytes:
        return []
    runs: list[tuple[int, int]] = []
    start = -1
    for at in range(0, len(data), HOLE_SIZE):
        piece = data[at : at + HOLE_SIZE]
        zero = piece == _ZERO[: len(piece)]
        if not zero and start < 0:
            start = at
        elif zero and start >= 0:
            runs.append((start, at))
            start = -1
    if start >= 0:
        runs.append((start, len(data)))
    return runs
