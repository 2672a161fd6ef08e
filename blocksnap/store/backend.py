"""The storage seam: the object-store contract every backend keeps, and the local backend.

Everything the repository keeps as truth (config, packs, snapshot records, settings) goes
through ObjectStore, so an object store (S3) can stand in for a directory without the
engine knowing.  The contract is written for object storage's semantics and the local
backend keeps it too; tests/test_backend_conformance.py holds every backend and wrapper
to it.

The contract (what a caller may rely on):

- Names are '/'-separated relative paths such as "packs/ab/ab12...": no empty segment,
  no "." or "..", no leading "/", and never containing TMP_MARKER.  A name is an object
  or nothing; there are no directories.
- Atomic visibility: an object is either absent or whole.  Nothing is visible under a
  name (to get, stat or list) until put() returns or commit() of a create() returns,
  and by then it is durable.  Replacing an object swaps the whole of it: a reader sees
  the old bytes or the new, never a mix or a prefix.
- Create-if-absent: put(..., exclusive=True) (and create(..., exclusive=True)) stores
  the object only if nothing exists under the name, else raises ObjectExistsError and
  changes nothing.  Of any number of racing exclusive puts of a name, from any number of
  processes or hosts, exactly one wins when capabilities.atomic_exclusive_create.
- Read-after-write: once put() or commit() returned, every get() and stat() of the name,
  from any process, returns the new object; once delete() returned, they raise
  MissingObjectError.  One exception: a backend may keep an object it has read open
  (the local backend keeps file descriptors), so a backend instance that read an object
  before another process replaced or deleted it may go on returning the old object,
  whole, until it is closed.  The repository never depends on that case: what it reads
  through a long-lived backend (packs, snapshot records) is written once under a new
  name, and a pack deleted by gc holds the same checked records as its new place.
- Listing: list(prefix) yields every object whose put returned before the call and that
  was not deleted before it (list-after-write; both the local backend and S3 since 2020
  promise it), in no particular order.  Objects put or deleted while a listing runs may
  or may not be in it.  A caller never treats a listing as proof that an object is gone
  before acting on that (a stale listing must cost a retry or a report, never data):
  stat() answers that for one name.
- Ranged reads: get(name, offset, length) returns the bytes from offset, at most length
  of them (to the end when None); past the end it returns fewer, or b"" when offset is at
  or beyond the end.  A negative offset or length is a UsageError.
- Deletes: delete(name) and delete_many(names) remove objects (and any unfinished write
  of them); a missing name is not an error.
- Errors are StoreError or its kinds: MissingObjectError for an absent object,
  ObjectExistsError for a lost create-if-absent, TransientStoreError for a failure that
  may pass when the same call is repeated (see store/retrying.py); never an OSError.
- capabilities is declared by the backend, never probed: callers adapt to it.
- close() releases what the backend holds (descriptors, connections); it is idempotent.

An object can also be written in parts (create): a pack is written while it fills, so
that sealing it waits only for what was written last, not for the whole pack.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import secrets
import stat
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from blocksnap.errors import (
    MissingObjectError,
    ObjectExistsError,
    StoreError,
    TransientStoreError,
    UsageError,
)

TMP_MARKER = ".tmp-"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as stat() and list() see it."""

    name: str
    size: int  # bytes
    mtime: float  # seconds since the epoch, when the object was last written


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers, declared by it, so that callers adapt instead of probing."""

    min_part_size: int  # bytes: every part of a create() but the last must be this big
    max_parallelism: int  # concurrent requests worth issuing
    atomic_exclusive_create: bool  # racing exclusive puts of a name: exactly one wins
    local: bool  # a filesystem of this host (flock and host-local state are meaningful)
    # ObjectWriter.sync() makes everything written so far durable; when false (S3: less
    # than a part cannot be sent before commit), it is a hint and only commit() is durable.
    sync_durable: bool = True


class ObjectWriter(Protocol):
    """A new object being written in parts; invisible under its name until commit().

    A write, sync or commit that raises ends the writer: the object is discarded, and
    every later write, sync or commit raises StoreError, so that an object missing a
    part can never be committed.
    """

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append data."""
        ...

    def sync(self) -> None:
        """Make what was written so far durable, so that commit() has less to wait for."""
        ...

    def commit(self) -> None:
        """Make the whole object durable and visible under its name, atomically (an
        exclusive one raises ObjectExistsError if the name was taken meanwhile)."""
        ...

    def abort(self) -> None:
        """Discard the unfinished object; nothing appears under its name.  Idempotent."""
        ...


class ObjectStore(Protocol):
    """The narrow interface every storage backend implements (the contract is above)."""

    @property
    def capabilities(self) -> Capabilities:
        """What this backend offers."""
        ...

    def create(self, name: str, *, exclusive: bool = False) -> ObjectWriter:
        """Start writing a new object in parts; an existing one is replaced on commit,
        or with exclusive, kept (commit raises ObjectExistsError)."""
        ...

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False
    ) -> None:
        """Store a whole object atomically and durably; an existing one is replaced, or
        with exclusive, kept and ObjectExistsError raised."""
        ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read length bytes (all when None) from offset; fewer if the object is shorter."""
        ...

    def get_into(self, name: str, buffer: memoryview) -> int:
        """Read the object from its start into buffer, as much of it as fits; the bytes
        read (fewer than len(buffer) if the object is shorter).  A caller that reads many
        large objects reuses one buffer, where get would allocate one each time."""
        ...

    def stat(self, name: str) -> ObjectInfo:
        """The object's size and time; MissingObjectError if there is none."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every complete object whose name starts with prefix (a plain string prefix)."""
        ...

    def delete(self, name: str) -> None:
        """Remove an object and any unfinished write of it; a missing one is not an error."""
        ...

    def delete_many(self, names: Iterable[str]) -> None:
        """delete() for every name, in as few requests as the backend can."""
        ...

    def leftovers(self, prefix: str = "") -> builtins.list[str]:
        """The names under prefix (a plain string prefix) that have an unfinished write
        beside them (temporary files, incomplete uploads: a writer died, or is still
        writing), sorted; what discard_partial removes.  They are never part of the
        repository."""
        ...

    def discard_partial(self, name: str) -> None:
        """Remove what an interrupted write of name left beside it (temporary files,
        incomplete uploads), never the object itself; nothing there is not an error."""
        ...

    def close(self) -> None:
        """Release descriptors and connections; idempotent."""
        ...


def check_name(name: str) -> None:
    """Refuse a name outside the contract (see the module doc)."""
    parts = name.split("/")
    if (
        not name
        or "\x00" in name
        or TMP_MARKER in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise StoreError(f"invalid object name {name!r}")


def check_range(offset: int, length: int | None) -> None:
    if offset < 0 or (length is not None and length < 0):
        raise UsageError(f"invalid object range: offset {offset}, length {length}")


def fill(buffer: memoryview, read_at: Callable[[memoryview, int], int]) -> int:
    """Fill buffer from the start by read_at(the rest of it, offset), which returns the
    bytes it read (0 at the end); the bytes read in all.  get_into of every backend."""
    done = 0
    while done < len(buffer):
        n = read_at(buffer[done:], done)
        if not n:
            break
        done += n
    return done


_TRANSIENT = frozenset({errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.EINTR})


def _os_error(action: str, name: str, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while {action} {name}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied while {action} {name}")
    if exc.errno in _TRANSIENT:
        return TransientStoreError(f"{action} {name} failed for now: {exc.strerror or exc}")
    return StoreError(f"I/O error while {action} {name}: {exc.strerror or exc}")


def _missing(name: str) -> MissingObjectError:
    return MissingObjectError(f"object {name} is missing from the repository")


def _fsync_directory(path: str) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalBackend:
    """Objects as files below a directory: write to a temporary name, fsync, rename (or
    link, for create-if-absent, which fails with EEXIST if the name exists).

    private: top-level entries of root that hold host-local state (the repository's
    index and locks), not objects: list() never yields them and no name may start there.
    """

    def __init__(self, root: str, fd_cache_size: int = 64, *, private: Iterable[str] = ()) -> None:
        self.root = root
        self._private = frozenset(private)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_cache_size = fd_cache_size
        self._lock = threading.Lock()
        # A descriptor evicted or forgotten while a read uses it is closed when that read
        # ends, never under it: its number could be reused for another file meanwhile.
        self._reading: Counter[int] = Counter()
        self._closing: set[int] = set()
        self._capabilities = Capabilities(
            min_part_size=1,
            max_parallelism=os.cpu_count() or 2,
            atomic_exclusive_create=True,
            local=True,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _path(self, name: str) -> str:
        check_name(name)
        if name.split("/", 1)[0] in self._private:
            raise StoreError(f"invalid object name {name!r} (host-local state)")
        return os.path.join(self.root, *name.split("/"))

    def create(self, name: str, *, exclusive: bool = False) -> _LocalWriter:
        return _LocalWriter(self, name, exclusive)

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False
    ) -> None:
        out = self.create(name, exclusive=exclusive)
        try:
            out.write(data)
            out.commit()
        finally:
            out.abort()  # a no-op once committed

    def _retire(self, fd: int) -> None:
        """Close fd now, or when the last read using it ends (call with the lock held)."""
        if self._reading[fd]:
            self._closing.add(fd)
        else:
            os.close(fd)

    def _release(self, fd: int) -> None:
        with self._lock:
            self._reading[fd] -= 1
            if self._reading[fd] <= 0:
                del self._reading[fd]
                if fd in self._closing:
                    self._closing.discard(fd)
                    os.close(fd)

    def _fd(self, name: str) -> int:
        """A descriptor of the object, in use until _release(fd)."""
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
                self._reading[fd] += 1
                return fd
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(name) from None
        except OSError as exc:
            raise _os_error("opening", name, exc) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory is no object
            os.close(fd)
            raise _missing(name)
        with self._lock:
            other = self._fds.get(name)
            if other is not None:  # another thread opened it meanwhile
                os.close(fd)
                self._reading[other] += 1
                return other
            self._fds[name] = fd
            self._reading[fd] += 1
            while len(self._fds) > self._fd_cache_size:
                _, old = self._fds.popitem(last=False)
                self._retire(old)
        return fd

    def _forget(self, name: str) -> None:
        with self._lock:
            fd = self._fds.pop(name, None)
            if fd is not None:
                self._retire(fd)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        fd = self._fd(name)
        try:
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise _os_error("reading", name, exc) from exc
        finally:
            self._release(fd)

    def get_into(self, name: str, buffer: memoryview) -> int:
        fd = self._fd(name)
        try:
            done = fill(buffer, lambda rest, offset: os.preadv(fd, [rest], offset))
        except OSError as exc:
            raise _os_error("reading", name, exc) from exc
        finally:
            self._release(fd)
        return done

    def stat(self, name: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(name))
        except (FileNotFoundError, NotADirectoryError):
            raise _missing(name) from None
        except OSError as exc:
            raise _os_error("looking up", name, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _missing(name)
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the deepest directory the prefix names whole; filter the rest.
        head = prefix.rpartition("/")[0]
        if head:
            check_name(head)
        top = os.path.join(self.root, *head.split("/")) if head else self.root

        def fail(exc: OSError) -> None:
            if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                raise _os_error("listing", prefix or "the repository", exc) from exc

        for dirpath, dirs, files in os.walk(top, onerror=fail):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            if rel_dir == ".":
                rel_dir = ""
                dirs[:] = [d for d in dirs if d not in self._private]
                files = [f for f in files if f not in self._private]
            for filename in files:
                if TMP_MARKER in filename:
                    continue  # an unfinished put: never part of the repository
                rel = f"{rel_dir}/{filename}" if rel_dir else filename
                if not rel.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, filename))
                except FileNotFoundError:
                    continue  # deleted while listing
                except OSError as exc:
                    raise _os_error("listing", rel, exc) from exc
                if stat.S_ISREG(st.st_mode):
                    yield ObjectInfo(rel, st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        self._forget(name)
        directory, base = os.path.split(self._path(name))
        self._unlink(name, directory, [base, *self._partial(name)])

    def discard_partial(self, name: str) -> None:
        directory = os.path.dirname(self._path(name))
        self._unlink(name, directory, self._partial(name))

    def _partial(self, name: str) -> builtins.list[str]:
        """The temporary files beside name: writes of it that were never finished (or
        whose writer died between linking the object and unlinking them)."""
        directory, base = os.path.split(self._path(name))
        try:
            return [f for f in os.listdir(directory) if f.startswith(base + TMP_MARKER)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _os_error("listing", name, exc) from exc

    def _unlink(self, name: str, directory: str, victims: builtins.list[str]) -> None:
        for victim in victims:
            try:
                os.unlink(os.path.join(directory, victim))
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                raise _os_error("deleting", name, exc) from exc

    def delete_many(self, names: Iterable[str]) -> None:
        for name in names:
            self.delete(name)

    def leftovers(self, prefix: str = "") -> builtins.list[str]:
        """The names of temporary files of puts that never finished (a writer was killed
        mid-write, or is writing)."""
        found = set()
        for dirpath, _dirs, files in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for filename in files:
                if TMP_MARKER in filename:
                    base = filename.split(TMP_MARKER, 1)[0]
                    name = base if rel_dir == "." else f"{rel_dir}/{base}"
                    if name.startswith(prefix):
                        found.add(name)
        return sorted(found)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), OrderedDict()
            for fd in fds:
                self._retire(fd)


class _LocalWriter:
    """An object written to a temporary file beside its name, fsynced, then renamed into
    place, or for create-if-absent hard-linked (link fails if the name exists, atomically,
    where a rename would replace it) and the temporary name removed."""

    def __init__(self, backend: LocalBackend, name: str, exclusive: bool) -> None:
        self._backend = backend
        self.name = name
        self._exclusive = exclusive
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
            if self._exclusive:
                try:
                    os.link(self._tmp, self._path)
                except FileExistsError:
                    self.abort()
                    raise ObjectExistsError(f"object {self.name} exists already") from None
                os.unlink(self._tmp)
            else:
                os.rename(self._tmp, self._path)
            # The new name is durable only once the directory entry is on disk.
            _fsync_directory(os.path.dirname(self._path))
        self._backend._forget(self.name)

    def abort(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)
