"""Writing files from a snapshot's filesystem to the host, never outside the target.

The image is untrusted: its owner chose every name, link target and mode in it.  So:

- Every host path is reached from an open directory descriptor, one component at a time,
  with O_NOFOLLOW: a symlink on the host, old or just restored, is never followed, and a
  directory on the way that turns out to be a symlink is refused.
- Names that cannot be one host path component ("", ".", "..", "/" or NUL inside, over
  255 bytes) are refused.  So are device nodes, FIFOs and sockets.
- A symlink is restored only if it points inside the target: a relative target may climb
  ("..") only at its start, and no higher than the link's own depth.  An absolute target
  is refused with --to; with --in-place it is rewritten relative to ROOT, which is the
  filesystem's root there.
- Hard links are made only to files this extraction wrote, under the names it wrote them
  (a renamed directory's too), and a link that reaches another inode is undone.
- A file is written to a temporary name and renamed into place when complete, so a failure
  leaves no half-written file under the real name; --overwrite replaces atomically.

Temporary names are ".NAME.blocksnap-SPACE-PID-RANDOM": PID is the writing process and
SPACE (8 hex digits) names this boot of the kernel and the pid namespace it is in.  A
failure or Ctrl-C removes the file; a process killed outright cannot, so each extraction,
before it writes into a directory, removes the regular files and symlinks there with
names of exactly that form, its own SPACE, and a PID no process has: their writer is
gone, and a pid is not reused while its process lives.  A concurrent extraction into the
same directory, from this host or another sharing it, is never touched; a stale file from
another host, or one whose pid a new process took, is left (and is hidden).

Regular files keep their holes, mode, owner (when run as root), timestamps and extended
attributes.  What could not be restored is listed in the report, never silently dropped:
an entry the image fails (a damaged inode, listing or extent map) is listed and the rest
goes on, and a directory whose restore stops keeps its mode, owner and times, or is
removed if this run made it and it stayed empty.  Holes: only the ranges the file's
extent map says may hold data are read (see Entry.data_ranges), so a file of a terabyte's
apparent size and a few blocks of data costs those blocks; within them, all-zero 4 KiB
pieces are not written either.  The restored file is sparse where the source was.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import hashlib
import os
import re
import secrets
import stat as stat_mod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blocksnap.errors import (
    FilesystemError,
    IntegrityError,
    RestoreError,
    UsageError,
    XattrsIncompleteError,
)
from blocksnap.fs.filesystem import MAX_DEPTH, Entry, split_path, valid_name
from blocksnap.fs.node import FileKind, FileStat

if TYPE_CHECKING:
    from blocksnap.fs.filesystem import FileSystem

_NAME_MAX = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_NAME = re.compile(r"\..*\.blocksnap-([0-9a-f]{8})-([1-9][0-9]*)-[0-9a-f]{8}", re.DOTALL)


class Conflict(enum.Enum):
    """What to do when the target name exists already."""

    SKIP = "skip"  # leave what is there
    OVERWRITE = "overwrite"  # replace it (a directory is merged into, never replaced)
    RENAME = "rename"  # keep both: the restored copy gets NAME.restored[.N]


@dataclass(slots=True)
class ExtractReport:
    target: str
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes_written: int = 0
    blocks_fetched: int = 0  # image blocks read from the store for this extraction
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image path, why)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (image path, host name)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # metadata not restored
    cleaned: list[str] = field(default_factory=list)  # stale temporary files removed (host)


def _umask() -> int:
    """The process umask, read without setting it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@functools.cache
def _process_space() -> str | None:
    """The SPACE of the temporary names this process writes (see the module docstring);
    None where the host cannot tell, and then no stale file is judged."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _host_name_problem(name: str) -> str | None:
    if not valid_name(name):
        return f"invalid name {name!r}"
    try:
        encoded = os.fsencode(name)
    except UnicodeError:
        return f"name {name!r} cannot be encoded on this host"
    if len(encoded) > _NAME_MAX:
        return f"name longer than {_NAME_MAX} bytes"
    return None


def contained_target(target: str, depth: int, *, in_place: bool) -> str | None:
    """The symlink target to write for a link `depth` directories below the extraction
    root, or None if it would point outside.  See the module docstring for the rule."""
    if not target or "\0" in target:
        return None
    if target.startswith("/"):
        if not in_place:
            return None
        parts = split_path(target)
        if ".." in parts:
            return None
        return "/".join([".."] * depth + parts) or "."
    climbs, seen_name = 0, False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if seen_name:
                return None
            climbs += 1
        else:
            seen_name = True
    return target if climbs <= depth else None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class _Extraction:
    def __init__(self, fs: FileSystem, root_fd: int, in_place: bool, conflict: Conflict) -> None:
        self.fs = fs
        self.root_fd = root_fd
        self.in_place = in_place
        self.conflict = conflict
        self.as_root = os.geteuid() == 0
        self.umask = _umask()
        # file_id -> the host path (from root) of the file written for it, and its inode
        self.links: dict[int, tuple[str, tuple[int, int]]] = {}
        self.visited: set[int | None] = set()
        self.swept: set[tuple[int, int]] = set()  # (st_dev, st_ino) of directories swept
        self.report = ExtractReport(target="")

    # --- conflicts and names ---------------------------------------------------------

    def _existing(self, dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _free_name(self, dir_fd: int, name: str) -> str | None:
        for n in range(1, 1000):
            candidate = f"{name}.restored" + (f".{n}" if n > 1 else "")
            if len(os.fsencode(candidate)) > _NAME_MAX:
                return None
            if self._existing(dir_fd, candidate) is None:
                return candidate
        return None

    def _place(
        self, entry: Entry, dir_fd: int, name: str, *, directory: bool
    ) -> tuple[str, bool] | None:
        """The host name to write `entry` under, after the conflict rule, and whether
        something there now is to be replaced; None to skip."""
        found = self._existing(dir_fd, name)
        if found is None:
            return name, False
        if directory and stat_mod.S_ISDIR(found.st_mode):
            return name, False  # merged into
        if self.conflict is Conflict.SKIP:
            self.report.skipped.append((entry.path, "exists"))
            return None
        if self.conflict is Conflict.RENAME:
            new = self._free_name(dir_fd, name)
            if new is None:
                self.report.skipped.append((entry.path, "exists, and no free name to rename to"))
                return None
            self.report.renamed.append((entry.path, new))
            return new, False
        if stat_mod.S_ISDIR(found.st_mode):
            self.report.skipped.append((entry.path, "exists as a directory, not replaced"))
            return None
        if directory:
            os.unlink(name, dir_fd=dir_fd)
            return name, False
        return name, True

    def _temp_name(self, name: str) -> str:
        stem = os.fsencode(name)[:200].decode("utf-8", "ignore")
        space = _process_space() or "00000000"
        return f".{stem}.blocksnap-{space}-{os.getpid()}-{secrets.token_hex(4)}"

    def _sweep(self, dir_fd: int, dir_rel: str) -> None:
        """Remove, once per directory, the temporary files that a killed extraction left
        here (see the module docstring for which)."""
        space = _process_space()
        st = os.fstat(dir_fd)
        if space is None or (st.st_dev, st.st_ino) in self.swept:
            return
        self.swept.add((st.st_dev, st.st_ino))
        for name in os.listdir(dir_fd):
            found = _TEMP_NAME.fullmatch(name)
            if found is None or found.group(1) != space or _alive(int(found.group(2))):
                continue
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
                if not (stat_mod.S_ISREG(mode) or stat_mod.S_ISLNK(mode)):
                    continue
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # another extraction swept it first
            self.report.cleaned.append(f"{dir_rel}/{name}" if dir_rel else name)

    # --- metadata --------------------------------------------------------------------

    def _default_mode(self, kind: FileKind) -> int:
        return (0o777 if kind is FileKind.DIRECTORY else 0o666) & ~self.umask

    def _metadata(self, fd: int, entry: Entry) -> None:
        st = entry.stat
        if self.as_root and st.uid is not None and st.gid is not None:
            try:
                os.fchown(fd, st.uid, st.gid)
            except OSError as exc:
                self.report.warnings.append((entry.path, f"owner not set: {exc.strerror}"))
        os.fchmod(fd, st.mode if st.mode is not None else self._default_mode(st.kind))
        try:
            xattrs = entry.xattrs()
        except XattrsIncompleteError as exc:
            xattrs = exc.readable
            for key, why in exc.unreadable.items():
                self.report.warnings.append((entry.path, f"xattr {key} not restored: {why}"))
        except (FilesystemError, IntegrityError) as exc:  # the times still go on
            xattrs = {}
            self.report.warnings.append((entry.path, f"xattrs not restored: {exc}"))
        for key, value in xattrs.items():
            try:
                os.setxattr(fd, key, value)
            except OSError as exc:
                self.report.warnings.append((entry.path, f"xattr {key} not set: {exc.strerror}"))
        self._times(entry.stat, fd)

    def _times(self, st: FileStat, fd: int, name: str | None = None, dir_fd: int = -1) -> None:
        if st.mtime_ns is None:
            return
        times = (st.atime_ns if st.atime_ns is not None else st.mtime_ns, st.mtime_ns)
        if name is None:
            os.utime(fd, ns=times)
        else:
            os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)

    # --- one entry -------------------------------------------------------------------

    def restore(self, entry: Entry, dir_fd: int, name: str, rel: str, depth: int) -> None:
        """Restore one entry; if the image fails it (a damaged inode, listing or extent
        map, a damaged block in the store) that is reported and the next one goes on.  A
        host error (disk full, permissions) stops the extraction."""
        try:
            self._restore(entry, dir_fd, name, rel, depth)
        except (FilesystemError, IntegrityError) as exc:
            self.report.skipped.append((entry.path, f"failed: {exc}"))

    def _restore(self, entry: Entry, dir_fd: int, name: str, rel: str, depth: int) -> None:
        problem = _host_name_problem(name)
        if problem is not None:
            self.report.skipped.append((entry.path, problem))
            return
        kind = entry.stat.kind
        if kind is FileKind.DIRECTORY:
            self._directory(entry, dir_fd, name, rel, depth)
        elif kind is FileKind.FILE:
            self._file(entry, dir_fd, name, rel)
        elif kind is FileKind.SYMLINK:
            self._symlink(entry, dir_fd, name, rel, depth)
        else:
            self.report.skipped.append((entry.path, f"{kind.value} not restored"))

    def _directory(self, entry: Entry, dir_fd: int, name: str, rel: str, depth: int) -> None:
        if entry.stat.file_id in self.visited:
            self.report.skipped.append((entry.path, "directory met twice (a loop in the image)"))
            return
        if depth > MAX_DEPTH:
            self.report.skipped.append((entry.path, f"deeper than {MAX_DEPTH} levels"))
            return
        self.visited.add(entry.stat.file_id)
        place = self._place(entry, dir_fd, name, directory=True)
        if place is None:
            return
        placed = place[0]
        created = False
        try:
            os.mkdir(placed, 0o700, dir_fd=dir_fd)
            created = True
        except FileExistsError:
            pass
        try:
            fd = os.open(placed, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if created:  # not left behind empty and closed to everyone
                os.rmdir(placed, dir_fd=dir_fd)
            self.report.skipped.append(
                (entry.path, f"{placed} is not a directory here: {exc.strerror}")
            )
            return
        removed = False
        try:
            here = f"{_parent(rel)}/{placed}" if "/" in rel else placed  # renamed, maybe
            for child in entry.children():
                self.restore(child, fd, child.name, f"{here}/{child.name}", depth + 1)
        except BaseException:
            # The listing failed, or the host did: what was restored here keeps the
            # directory's mode, owner and times; a directory made just now and left empty
            # goes.  Whatever fails in that is reported, never raised over the cause.
            try:
                if created and not os.listdir(fd):
                    os.rmdir(placed, dir_fd=dir_fd)
                    removed = True
                elif created or self.conflict is Conflict.OVERWRITE:
                    self._metadata(fd, entry)
            except (OSError, FilesystemError, IntegrityError) as exc:
                self.report.warnings.append((entry.path, f"metadata not restored: {exc}"))
            raise
        else:
            if created or self.conflict is Conflict.OVERWRITE:
                self._metadata(fd, entry)
        finally:
            os.close(fd)
            if created and not removed:
                self.report.directories += 1

    def _file(self, entry: Entry, dir_fd: int, name: str, rel: str) -> None:
        place = self._place(entry, dir_fd, name, directory=False)
        if place is None:
            return
        # Replacing a file: its new content reaches the disk before the rename does, so
        # a crash leaves the old file or the new one, never an empty one.
        placed, replacing = place
        st = entry.stat
        rel = rel.rsplit("/", 1)[0] + "/" + placed if "/" in rel else placed
        tracked = st.file_id is not None and (st.nlink is None or st.nlink > 1)
        self._sweep(dir_fd, _parent(rel))
        temp = self._temp_name(placed)
        try:
            linked_to = self.links.get(st.file_id) if tracked and st.file_id is not None else None
            if linked_to is not None and self._link(*linked_to, dir_fd, temp):
                self.report.hardlinks += 1
                if replacing:  # the content was written for the first name, unsynced
                    _fsync_at(dir_fd, temp)
            else:
                self._write(entry, dir_fd, temp, durable=replacing)
                self.report.files += 1
                if tracked and st.file_id is not None:
                    written = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
                    self.links[st.file_id] = (rel, (written.st_dev, written.st_ino))
            os.rename(temp, placed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            if replacing:
                os.fsync(dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
            raise

    def _link(self, source: str, inode: tuple[int, int], dir_fd: int, temp: str) -> bool:
        """Link `temp` to the file written at `source`; False, and nothing made, if that
        cannot be done or what `source` leads to now is another file (linkat follows a
        symlink on the way, which the host may have put there since)."""
        try:
            os.link(source, temp, src_dir_fd=self.root_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (
                errno.EXDEV,
                errno.EPERM,
                errno.EMLINK,
                errno.ENOENT,
                errno.ENOTDIR,
                errno.ELOOP,
            ):
                return False
            raise
        linked = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
        if (linked.st_dev, linked.st_ino) != inode:
            os.unlink(temp, dir_fd=dir_fd)
            return False
        return True

    def _write(self, entry: Entry, dir_fd: int, temp: str, *, durable: bool) -> None:
        size = entry.stat.size
        fd = os.open(temp, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            # Only what the extent map says may hold data is read, and zeros are left
            # unwritten, so the cost follows the data, not the apparent size.
            for offset, run in entry.data_runs():
                _pwrite_all(fd, run, offset)
                self.report.bytes_written += len(run)
            os.ftruncate(fd, size)
            self._metadata(fd, entry)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _symlink(self, entry: Entry, dir_fd: int, name: str, rel: str, depth: int) -> None:
        st = entry.stat
        target = contained_target(st.target or "", depth, in_place=self.in_place)
        if target is None:
            self.report.skipped.append(
                (entry.path, f"symlink to {st.target!r} points outside the target")
            )
            return
        if target != st.target:
            self.report.warnings.append(
                (entry.path, f"absolute target {st.target!r} written as {target!r}")
            )
        place = self._place(entry, dir_fd, name, directory=False)
        if place is None:
            return
        placed = place[0]
        self._sweep(dir_fd, _parent(rel))
        temp = self._temp_name(placed)
        os.symlink(target, temp, dir_fd=dir_fd)
        try:
            if self.as_root and st.uid is not None and st.gid is not None:
                os.chown(temp, st.uid, st.gid, dir_fd=dir_fd, follow_symlinks=False)
            self._times(st, -1, temp, dir_fd)
            os.rename(temp, placed, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(temp, dir_fd=dir_fd)
            raise
        self.report.symlinks += 1

    # --- the parents of an in-place path ---------------------------------------------

    def enter_parents(self, entry: Entry) -> tuple[int, str] | None:
        """Open (creating if missing) the host directories above `entry` under ROOT; the
        descriptor of the last one and the path from ROOT.  None, reported, if one of them
        is not a real directory on the host."""
        parts = split_path(entry.path)[:-1]
        fd = os.dup(self.root_fd)
        rel = ""
        image_path = ""
        try:
            for part in parts:
                image_path += "/" + part
                rel = f"{rel}/{part}" if rel else part
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, self._default_mode(FileKind.DIRECTORY), dir_fd=fd)
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    self.report.skipped.append(
                        (
                            entry.path,
                            f"{image_path} on the host is not a directory "
                            f"({exc.strerror}); not followed",
                        )
                    )
                    os.close(fd)
                    return None
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd, rel


def _parent(rel: str) -> str:
    """The host path, from the target, of the directory that `rel` is in."""
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def _fsync_at(dir_fd: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def extract(
    fs: FileSystem,
    paths: list[str],
    target: str,
    *,
    in_place: bool = False,
    conflict: Conflict | str = Conflict.SKIP,
) -> ExtractReport:
    """Restore `paths` (files, links or whole trees) from `fs`.

    With in_place=False, each path lands in the directory `target` (created if missing)
    under its own name; with in_place=True, `target` is where the filesystem's root is on
    the host, and each path goes back where it was below it.
    """
    try:
        rule = Conflict(conflict)
    except ValueError:
        raise UsageError(
            f"unknown conflict rule {conflict!r}: use skip, overwrite or rename"
        ) from None
    if not paths:
        raise UsageError("name at least one path to extract")
    entries = [fs.lookup(path) for path in paths]  # every path resolves before any write
    if in_place and not os.path.isdir(target):
        raise RestoreError(f"{target}: ROOT for an in-place restore must be a directory")
    try:
        if not in_place:
            os.makedirs(target, exist_ok=True)
        root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(
            f"{target}: cannot use as the extraction target: {exc.strerror}"
        ) from exc
    fetched_before = fs.stats.blocks_fetched
    job = _Extraction(fs, root_fd, in_place, rule)
    job.report.target = target
    try:
        for entry in entries:
            _extract_one(job, entry)
    except OSError as exc:
        raise RestoreError(
            f"{target}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        ) from exc
    finally:
        os.close(root_fd)
    job.report.blocks_fetched = fs.stats.blocks_fetched - fetched_before
    return job.report


def _extract_one(job: _Extraction, entry: Entry) -> None:
    if entry.path == "/":
        # The root is merged into the target: its entries land directly in it.
        root_fd = os.dup(job.root_fd)
        try:
            job.visited.add(entry.stat.file_id)
            for child in entry.children():
                job.restore(child, root_fd, child.name, child.name, 0)
        except (FilesystemError, IntegrityError) as exc:  # the root's listing
            job.report.skipped.append((entry.path, f"failed: {exc}"))
        finally:
            os.close(root_fd)
        return
    if not job.in_place:
        job.restore(entry, job.root_fd, entry.name, entry.name, 0)
        return
    opened = job.enter_parents(entry)
    if opened is None:
        return
    fd, rel = opened
    try:
        depth = rel.count("/") + 1 if rel else 0
        job.restore(entry, fd, entry.name, f"{rel}/{entry.name}" if rel else entry.name, depth)
    finally:
        os.close(fd)
