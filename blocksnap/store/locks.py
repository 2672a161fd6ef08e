"""Locks and writer liveness: the protocols the store uses, and their local flock implementation.

Locks: named, non-blocking, exclusive or shared, held for the duration of a `with`, and
released by the death of their holder.  The store uses these names:

    repository   shared by every operation, exclusive for repair --rebuild-index
    volume-<h>   a snapshot (or synthesize) of one volume, h a hash of its name
    gc           one garbage collection at a time

WriterSessions: a proof of life for each registered writer (the registry itself, with
each writer's epoch and intents, is in the index; see store/index.py).  A session is
started before its writer registers and ended after it unregisters, and alive() is true
exactly while the process that started it runs and has not ended it, so that gc can
tell a running writer from one that was killed.

The local implementation is flock(2) on files of the repository's directory: the lock
file REPO/lock for "repository", REPO/locks/<name>.lock for the others, and
REPO/locks/writer-<id>.lock held by each session.  Its guarantees hold between the
processes of one host (and on filesystems whose flock spans hosts); an object store
shared by several hosts needs implementations on the objects themselves:
store/objectlocks.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from blocksnap.errors import LockedError, StoreError

REPOSITORY_LOCK = "repository"
GC_LOCK = "gc"
_SESSION = re.compile(r"writer-([0-9a-f]{32})\.lock")


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a write must land to count as made while a session is valid: by the server's
    time `server` (whole seconds since the epoch, as objects' modification times are),
    which a write answered by the monotonic time `local` surely did.  From the monotonic
    time `past` on, the server's time is surely beyond that second: a write landing
    then is late whoever judges it."""

    server: int
    local: float
    past: float


class Locks(Protocol):
    """Named locks, taken without waiting (LockedError when they are held)."""

    def hold(
        self, name: str, *, busy: str, shared: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the lock for the duration; busy is the LockedError message if it is held
        (exclusively, or at all when exclusive is asked for)."""
        ...

    def confirm(self, name: str) -> None:
        """Raise LockedError unless this process still holds the exclusive lock name (a
        lease across hosts can be lost; an flock cannot): asked before deleting, and
        before a snapshot commits."""
        ...

    def deadline(self, name: str) -> Deadline | None:
        """For a lease held here, when a write must land to count as made under it
        (Session.deadline); None for a lock that cannot be lost."""
        ...


class Session(Protocol):
    """A started writer session: its id, alive until end()."""

    @property
    def id(self) -> bytes:
        """16 bytes, unique among the sessions of the repository."""
        ...

    def end(self) -> None:
        """Stop being alive (idempotent)."""
        ...

    def valid(self) -> bool:
        """Whether no other process can have found this session dead yet."""
        ...

    def deadline(self) -> Deadline | None:
        """When a write made now must land for no other process to have found this
        session dead by then (asked right after valid()); None where sessions cannot
        lapse while their process runs."""
        ...


class WriterSessions(Protocol):
    """Writer liveness (see the module doc)."""

    def start(self) -> Session:
        """A new session, alive from now on."""
        ...

    def alive(self, session_id: bytes) -> bool:
        """Whether the session runs: started, not ended, and its process alive."""
        ...

    def forget(self, session_id: bytes) -> None:
        """Remove what a dead session left (its writer has left the registry)."""
        ...

    def sweep(self, registered: Callable[[bytes], bool]) -> int:
        """Remove what dead sessions left whose writer is not registered, asked while
        no writer can start under that id; return how many."""
        ...


class _Flock:
    """An flock held on an open file, released by close() (or by the death of the
    process): the one place that opens a lock file and takes its lock."""

    def __init__(
        self,
        path: str,
        *,
        shared: bool = False,
        create: bool = True,
        read_only: bool = False,
        exclusive_create: bool = False,
    ) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create and not read_only:
            flags |= os.O_CREAT | (os.O_EXCL if exclusive_create else 0)
        self.path = path
        self.fd = os.open(path, flags | os.O_CLOEXEC, 0o644)  # the caller maps OSError
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BaseException:
            os.close(self.fd)
            raise  # BlockingIOError: someone holds it

    def names_file(self) -> bool:
        """Whether the path still names the locked file (nobody unlinked it meanwhile)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class LocalLocks:
    """Locks as flock on files below a repository directory.

    read_only (the repository is on a read-only filesystem): a shared lock is taken on
    an O_RDONLY descriptor, which flock accepts, and a missing lock file is no lock at
    all, since nothing can take it exclusively there.  Exclusive locks are refused
    before this is reached (Store.require_writable).
    """

    def __init__(self, root: str, *, read_only: bool = False) -> None:
        self.root = root
        self.read_only = read_only

    def path(self, name: str) -> str:
        if name == REPOSITORY_LOCK:
            return os.path.join(self.root, "lock")
        if not re.fullmatch(r"[0-9a-z-]+", name):
            raise StoreError(f"invalid lock name {name!r}")
        return os.path.join(self.root, "locks", f"{name}.lock")

    def confirm(self, name: str) -> None:
        """An flock is held until its holder lets go or dies: nothing to check."""

    def deadline(self, name: str) -> Deadline | None:
        return None

    @contextlib.contextmanager
    def hold(self, name: str, *, busy: str, shared: bool = False) -> Iterator[None]:
        path = self.path(name)
        read_only = self.read_only and shared
        lock: _Flock | None = None
        try:
            lock = _Flock(path, shared=shared, read_only=read_only)
        except BlockingIOError:
            raise LockedError(busy) from None
        except OSError as exc:
            if not (read_only and exc.errno == errno.ENOENT):
                raise StoreError(f"cannot open lock {path}: {exc.strerror or exc}") from exc
        try:
            yield
        finally:
            if lock is not None:
                lock.close()


class _LocalSession:
    def __init__(self, sessions: LocalSessions, session_id: bytes, lock: _Flock) -> None:
        self._sessions = sessions
        self._id = session_id
        self._lock = lock

    @property
    def id(self) -> bytes:
        return self._id

    def valid(self) -> bool:
        """Alive exactly while the flock is held."""
        return self._lock.fd >= 0

    def deadline(self) -> Deadline | None:
        return None

    def end(self) -> None:
        if self._lock.fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock.path)
            self._lock.close()


class LocalSessions:
    """Sessions as flocks on REPO/locks/writer-<id>.lock: a lock that can be taken, or a
    lock file that is gone, means its session's process ended without ending it."""

    def __init__(self, root: str) -> None:
        self.directory = os.path.join(root, "locks")

    def _path(self, session_id: bytes) -> str:
        return os.path.join(self.directory, f"writer-{session_id.hex()}.lock")

    def start(self) -> _LocalSession:
        for _attempt in range(8):
            session_id = secrets.token_bytes(16)
            path = self._path(session_id)
            try:
                lock = _Flock(path, exclusive_create=True)
            except BlockingIOError:
                continue  # sweep() locked the new file before this did
            except OSError as exc:
                raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
            # sweep() may take the lock of a file with no registry entry and unlink it;
            # if that happened to this new file before it was locked here, the path no
            # longer names it, and the session starts again under a new id.
            if lock.names_file():
                return _LocalSession(self, session_id, lock)
            lock.close()
        raise LockedError("could not register as a writer: lock files keep disappearing")

    def alive(self, session_id: bytes) -> bool:
        try:
            lock = _Flock(self._path(session_id), create=False)
        except FileNotFoundError:
            return False
        except BlockingIOError:
            return True
        except OSError as exc:
            path = self._path(session_id)
            raise StoreError(f"cannot open lock {path}: {exc.strerror or exc}") from exc
        lock.close()  # taken, so nobody held it
        return False

    def forget(self, session_id: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(session_id))

    def sweep(self, registered: Callable[[bytes], bool]) -> int:
        swept = 0
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise StoreError(f"cannot list {self.directory}: {exc.strerror or exc}") from exc
        for name in names:
            match = _SESSION.fullmatch(name)
            if match is None:
                continue
            session_id = bytes.fromhex(match.group(1))
            if registered(session_id):
                continue
            try:
                lock = _Flock(os.path.join(self.directory, name), create=False)
            except (BlockingIOError, FileNotFoundError):
                continue
            except OSError as exc:
                raise StoreError(f"cannot open lock {name}: {exc.strerror or exc}") from exc
            try:
                # Held here, so no writer can start under this id meanwhile.
                if not registered(session_id) and lock.names_file():
                    os.unlink(lock.path)
                    swept += 1
            except FileNotFoundError:
                pass
            finally:
                lock.close()
        return swept
