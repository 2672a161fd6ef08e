"""The storage seam: whole-object put, ranged get, list and delete, plus the local backend.

Everything the store keeps outside LMDB (packs, snapshot records) goes through ObjectStore,
so an object-storage backend (S3) can stand in for a directory without the engine knowing.
Names are '/'-separated relative paths such as "packs/ab/ab12...".

An object can also be written in parts (create): a pack is written while it fills, so
that sealing it waits only for what was written last, not for the whole pack.  Either
way, nothing is visible under the name until the whole object is durable.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from blocksnap.errors import MissingObjectError, StoreError

TMP_MARKER = ".tmp-"


class ObjectWriter(Protocol):
    """A new object being written in parts; invisible under its name until commit()."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append data."""
        ...

    def sync(self) -> None:
        """Make what was written so far durable, so that commit() has less to wait for."""
        ...

    def commit(self) -> None:
        """Make the whole object durable and visible under its name, atomically."""
        ...

    def abort(self) -> None:
        """Discard the unfinished object; nothing appears under its name."""
        ...


class ObjectStore(Protocol):
    """The narrow interface every storage backend implements."""

    def create(self, name: str) -> ObjectWriter:
        """Start writing a new object in parts; an existing one is replaced on commit."""
        ...

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store a whole object atomically and durably; an existing one is replaced."""
        ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read length bytes (all when None) from offset; fewer if the object is shorter."""
        ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield (name, size) for every complete object whose name starts with prefix."""
        ...

    def delete(self, name: str) -> None:
        """Remove an object and any unfinished write of it; a missing one is not an error."""
        ...


def _os_error(action: str, name: str, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while {action} {name}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {action} {name}")
    return StoreError(f"I/O error while {action} {name}: {exc.strerror or exc}")


class LocalBackend:
    """Objects as files below a directory: write to a temporary name, fsync, rename."""

    def __init__(self, root: str, fd_cache_size: int = 64) -> None:
        self.root = root
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_cache_size = fd_cache_size
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StoreError(f"invalid object name {name!r}")
        return os.path.join(self.root, *name.split("/"))

    def create(self, name: str) -> _LocalWriter:
        return _LocalWriter(self, name)

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        out = self.create(name)
        out.write(data)
        out.commit()

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                return fd
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingObjectError(f"object {name} is missing from the repository") from None
        except OSError as exc:
            raise _os_error("opening", name, exc) from exc
        with self._lock:
            other = self._fds.get(name)
            if other is not None:  # another thread opened it meanwhile
                os.close(fd)
                return other
            self._fds[name] = fd
            while len(self._fds) > self._fd_cache_size:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def _forget(self, name: str) -> None:
        with self._lock:
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        fd = self._fd(name)
        try:
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise _os_error("reading", name, exc) from exc

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        top = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        for dirpath, _dirs, files in os.walk(top):
            for filename in files:
                if TMP_MARKER in filename:
                    continue  # an unfinished put: never part of the repository
                path = os.path.join(dirpath, filename)
                rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                try:
                    size = os.stat(path).st_size
                except FileNotFoundError:
                    continue
                yield rel, size

    def delete(self, name: str) -> None:
        self._forget(name)
        path = self._path(name)
        directory, base = os.path.split(path)
        try:
            partial = [f for f in os.listdir(directory) if f.startswith(base + TMP_MARKER)]
        except FileNotFoundError:
            partial = []
        except OSError as exc:
            raise _os_error("listing", name, exc) from exc
        for victim in [base, *partial]:
            try:
                os.unlink(os.path.join(directory, victim))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error("deleting", name, exc) from exc

    def leftovers(self) -> builtins.list[str]:
        """Temporary files of puts that never finished (a writer was killed mid-write)."""
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            found += [os.path.join(dirpath, f) for f in files if TMP_MARKER in f]
        return found

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), OrderedDict()
        for fd in fds:
            os.close(fd)


class _LocalWriter:
    """An object written to a temporary file beside its name, fsynced, then renamed."""

    def __init__(self, backend: LocalBackend, name: str) -> None:
        self._backend = backend
        self.name = name
        self._path = backend._path(name)
        self._tmp = f"{self._path}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(self._tmp, flags, 0o644)
        except OSError as exc:
            raise _os_error("writing", name, exc) from exc

    @contextlib.contextmanager
    def _writing(self) -> Iterator[int]:
        """The open descriptor; an OSError meanwhile aborts the object as a StoreError."""
        if self._fd < 0:
            raise StoreError(f"object {self.name} is no longer being written")
        try:
            yield self._fd
        except OSError as exc:
            self.abort()
            raise _os_error("writing", self.name, exc) from exc

    def write(self, data: bytes | bytearray | memoryview) -> None:
        with self._writing() as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

    def sync(self) -> None:
        with self._writing() as fd:
            os.fdatasync(fd)

    def commit(self) -> None:
        with self._writing() as fd:
            os.fsync(fd)
            os.close(fd)
            self._fd = -1
            os.rename(self._tmp, self._path)
            # The rename is durable only once the directory entry is on disk.
            dir_fd = os.open(os.path.dirname(self._path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._backend._forget(self.name)

    def abort(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)
