"""Locks and writer sessions kept as objects, for a repository that several hosts share.

A repository on object storage (S3) is written by processes on many hosts, which share
no filesystem to flock.  This module keeps the two protocols of store/locks.py on the
objects themselves, with create-if-absent (the backend's atomic_exclusive_create) as
the only atomic step.

Sessions, sessions/<id> (id: 32 hex digits, random).  A session's object is created
create-if-absent when it starts, written again (a heartbeat) every ttl/4 seconds by a
thread of the process that started it, and deleted when it ends.  A session is alive
while its object exists and its last heartbeat is younger than ttl.

Time is the server's, never a host's clock: a heartbeat's age is the server's
modification time of the object (S3 LastModified, whole seconds) measured against the
server's time now, which each process learns from the modification time of its own
latest heartbeat plus the time elapsed since on its monotonic clock.  Both rounding
errors count in favour of the session, so a host whose clock is off by any amount
never makes another's live session look dead.  A process also watches its own
sessions: one whose heartbeats were ever ttl/2 apart is no longer valid, for good
(Session.valid): a writer checks that before it commits, and the holder of a lease
(confirm) before every step that deletes and before a commit under the volume's lease,
so each stops well before any other host may have found it dead, and never acts on what
it decided before such a gap.

A check before a write does not bound when the write lands: a request a client retries,
or that a proxy or a busy server holds, may land minutes later.  So a snapshot record
carries a deadline in the server's time (Session.deadline: one second and ttl/2 after
the modification time of its session's last heartbeat before the put, and of its
lease's), and counts only if its own modification time is no later
(store/catalog.py).  No other host can have found the session dead by then (that takes
ttl after the heartbeat), and the margin of ttl/2 - 1 seconds covers the rounding of
S3's whole seconds and the clocks of the server's gateways.  The writer reads its
record's modification time after the put, as every reader judges by it, and deletes a
record that landed late and reports the snapshot not committed; should that read fail,
a put answered within ttl/2 seconds (whole) of sending the heartbeat it counts from
surely landed in time (Deadline.local: this trusts the gateways' clocks to agree within
a second).  A put that failed in a way that may still land (a timeout, a reset, an
interrupt) keeps the session and the lease alive until the server's time is surely past
the deadline (Deadline.past), and what is there then decides.

Leases, locks/<name>/<gen>, for the locks that must hold across hosts (volume-<h>, one
snapshot of a volume at a time; gc, maintenance).  gen is a generation, 20 decimal
digits, and the holder of a lease is whoever created its highest generation: taking
is a listing of locks/<name>/, a read of the highest generation G, and, if that is
released or its holder session is dead, the create-if-absent of generation G + 1, of
which exactly one taker wins.  A lease names its holder's session and lives exactly as
long as that session: it needs no expiry of its own, and its fencing token is its
generation, which only grows.  Its holder releases it by writing a tombstone over its
own generation.  Nothing ever deletes the highest generation, or writes any but its
own: a request that a client retries late (botocore's retries, minutes later after a
lost answer) therefore never touches another holder's lease.  Lower generations are
superseded for good, and any holder deletes them once there are LOWER_KEPT of them.
A taker that read a stale highest generation may still win the create of a lower one
(taken and deleted meanwhile): it lists again after its create, and holds the lease
only if its generation is the highest there, else deletes it and starts over.  So at
any moment at most one valid session holds a lease, and confirm() checks exactly that:
its session is valid and its generation the highest.  The "repository" lock guards only
a host's own cache (store/location.py), so it stays a local flock; so does every lock
within a host, taken before the lease.  (Leases were one object, locks/<name>, before
0.2.0, which was never released: no host runs that layout, and such an object is
ignored.)

Object bodies are UTF-8 JSON with "format": 1 and the keys below; a reader ignores keys
it does not know.  A lease it cannot decode (damaged, or a newer format without a
"session" key) is never broken: whether its holder lives cannot be told, so taking it
says so and names the object to delete by hand.

    sessions/<id>       {"format": 1, "host", "pid", "started" (ISO 8601 UTC, this host's)}
    locks/<name>/<gen>  {"format": 1, "session": hex id, "host", "pid"}, and once released
                        the same with "released": true
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from blocksnap.errors import (
    BlocksnapError,
    LockedError,
    MissingObjectError,
    ObjectExistsError,
    StoreError,
    UsageError,
)
from blocksnap.store.backend import ObjectStore
from blocksnap.store.locks import REPOSITORY_LOCK, Deadline, LocalLocks

DEFAULT_TTL = 60.0  # seconds without a heartbeat after which a session is dead
SESSIONS = "sessions/"
LOCKS = "locks/"
FORMAT = 1
# The body of a clock probe: never empty, since SeaweedFS 4.48 answers an empty PUT so
# that the next request on its connection hangs for a minute.
MARK = b'{"format": 1}\n'
_SESSION_NAME = re.compile(r"sessions/([0-9a-f]{32})")
_LOCK_NAME = re.compile(r"[0-9a-z-]+")
_GEN = re.compile(r"[0-9]{20}")
# Lower generations of a lease that may pile up before its holder deletes them: each take
# adds one, so this bounds the listing and spares a delete on most takes.
LOWER_KEPT = 4
TAKE_ROUNDS = 8  # listings a taker reads before it gives up to a race it keeps losing
# Sessions this process ended, whether or not their delete reached the storage (it may be
# down): known dead here without waiting for their ttl.
_ENDED: set[bytes] = set()


def session_ttl() -> float:
    """The session ttl in force: BLOCKSNAP_SESSION_TTL (seconds) or DEFAULT_TTL.  Every
    host sharing a repository must use the same."""
    raw = os.environ.get("BLOCKSNAP_SESSION_TTL")
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        raise UsageError(f"BLOCKSNAP_SESSION_TTL={raw!r} is not a number of seconds") from None
    # At least 4: a record's deadline keeps ttl/2 - 1 seconds of margin (see the module doc).
    if not 4.0 <= ttl <= 86400.0:
        raise UsageError(f"BLOCKSNAP_SESSION_TTL={raw!r} is not between 4 and 86400 seconds")
    return ttl


def session_name(session_id: bytes) -> str:
    return f"{SESSIONS}{session_id.hex()}"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as listed: its id, and whether it is alive."""

    id: bytes
    alive: bool


class ObjectSession:
    """A started session: heartbeated by its ObjectSessions until end()."""

    def __init__(self, sessions: ObjectSessions, session_id: bytes, body: bytes) -> None:
        self._sessions = sessions
        self._id = session_id
        self.body = body
        self.lock = threading.Lock()  # a heartbeat and end() never overlap
        self.ended = False
        # (monotonic time sent, the server's modification time, a monotonic time by
        # which it was written) of the last heartbeat that succeeded: one tuple, so that
        # a deadline reads those of one heartbeat.
        self.beaten = (time.monotonic(), 0.0, time.monotonic())
        # Once two successful heartbeats were ttl/2 apart, another host may have found the
        # session dead meanwhile (and acted on it): it stays invalid for good.
        self.lapsed = False

    @property
    def id(self) -> bytes:
        return self._id

    @property
    def last_beat(self) -> float:
        return self.beaten[0]

    @last_beat.setter
    def last_beat(self, sent: float) -> None:
        self.beaten = (sent, *self.beaten[1:])

    def beat(self, sent: float, mtime: float, written: float) -> None:
        """Note a successful heartbeat, sent at monotonic time sent, written by the
        server at modification time mtime before monotonic time written: it counts from
        when it was sent."""
        if time.monotonic() - self.last_beat >= self._sessions.ttl / 2:
            self.lapsed = True
        self.beaten = (sent, mtime, written)

    def deadline(self) -> Deadline:
        """When a write made now must land to count as made while this session is valid
        (see the module doc): by the server's time one second and ttl/2 after its last
        heartbeat.  Ask it right after valid(), and check valid() again after: a
        heartbeat that follows a lapse moves the deadline on."""
        sent, mtime, written = self.beaten
        server = math.floor(mtime + 1.0 + self._sessions.ttl / 2)
        # The server's time at `sent` was below mtime + 1 (mtime is whole seconds, the
        # heartbeat written after it was sent): an answer by `local` landed by `server`.
        # At `written` it was mtime at least: by `past` it is beyond server's second.
        return Deadline(server, sent + (server - mtime - 1.0), written + (server + 1 - mtime))

    def valid(self) -> bool:
        """Whether no other host can have found this session dead, now or at any moment
        since it started (see the module doc)."""
        if self.ended or self.lapsed:
            return False
        if time.monotonic() - self.last_beat >= self._sessions.ttl / 2:
            self.lapsed = True
            return False
        return True

    def end(self) -> None:
        with self.lock:
            if self.ended:
                return
            self.ended = True
        self._sessions.drop(self)
        with contextlib.suppress(BlocksnapError):  # a dead session is dead anyway
            self._sessions.backend.delete(session_name(self._id))


class ObjectSessions:
    """Writer sessions as heartbeated objects (the WriterSessions protocol of
    store/locks.py; see the module doc)."""

    def __init__(
        self, backend: ObjectStore, *, ttl: float | None = None, host: str | None = None
    ) -> None:
        self.backend = backend
        self.ttl = session_ttl() if ttl is None else ttl
        self.host = host or socket.gethostname()
        self._live: dict[bytes, ObjectSession] = {}
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # The server's time, as (its seconds at a heartbeat, our monotonic time then).
        self._clock: tuple[float, float] | None = None

    # --- the clock -----------------------------------------------------------------------

    def _stamp(self, name: str) -> tuple[float, float]:
        """Note the server's time from the object just written under name; return the
        object's modification time and a monotonic time by which it was written."""
        before = time.monotonic()
        mtime = self.backend.stat(name).mtime
        with self._guard:
            self._clock = (mtime, before)
        return mtime, before

    def server_now(self) -> float:
        """A lower bound of the server's time now (seconds since the epoch)."""
        with self._guard:
            clock = self._clock
        if clock is None or time.monotonic() - clock[1] > self.ttl / 4:
            name = f"{SESSIONS}clock-{secrets.token_hex(16)}"
            self.backend.put(name, MARK)
            try:
                self._stamp(name)
            finally:
                self.backend.delete(name)
            with self._guard:
                clock = self._clock
            assert clock is not None
        mtime, at = clock
        return mtime + (time.monotonic() - at)

    def age(self, mtime: float) -> float:
        """A lower bound of how long ago the server wrote an object of modification time
        mtime (whole seconds on S3: the write may be up to a second later)."""
        return self.server_now() - (mtime + 1.0)

    # --- the protocol --------------------------------------------------------------------

    def start(self) -> ObjectSession:
        body = json.dumps(
            {
                "format": FORMAT,
                "host": self.host,
                "pid": os.getpid(),
                "started": datetime.datetime.now(datetime.UTC).isoformat(),
            },
            sort_keys=True,
        ).encode()
        for _attempt in range(8):
            session_id = secrets.token_bytes(16)
            name = session_name(session_id)
            sent = time.monotonic()
            try:
                self.backend.put(name, body, exclusive=True)
            except ObjectExistsError:
                continue
            session = ObjectSession(self, session_id, body)
            try:
                # It counts from when it was sent: the server wrote it no earlier.
                session.beaten = (sent, *self._stamp(name))
            except BaseException:
                session.end()
                raise
            with self._guard:
                self._live[session_id] = session
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._beat_forever, name="blocksnap-heartbeat", daemon=True
                    )
                    self._thread.start()
            return session
        raise LockedError("could not start a writer session: every new id was taken")

    def own(self) -> set[bytes]:
        """The ids of the sessions this instance runs."""
        with self._guard:
            return set(self._live)

    def drop(self, session: ObjectSession) -> None:
        """Stop heartbeating a session (it ended)."""
        with self._guard:
            self._live.pop(session.id, None)
            _ENDED.add(session.id)

    def alive(self, session_id: bytes) -> bool:
        with self._guard:
            own = self._live.get(session_id)
            if session_id in _ENDED:
                return False
        if own is not None:
            return not own.ended
        try:
            info = self.backend.stat(session_name(session_id))
        except MissingObjectError:
            return False
        return self.age(info.mtime) < self.ttl

    def forget(self, session_id: bytes) -> None:
        self.backend.delete(session_name(session_id))

    def sweep(self, registered: Callable[[bytes], bool]) -> int:
        """Delete the objects of dead sessions that no writer of this host's index is
        registered under (a writer that is, gc forgets with its registry entry)."""
        swept = 0
        for info in self.listing():
            if not info.alive and not registered(info.id):
                self.forget(info.id)
                swept += 1
        return swept

    def listing(self) -> list[SessionInfo]:
        """Every session whose object exists, with whether it is alive."""
        out: list[SessionInfo] = []
        for obj in self.backend.list(SESSIONS):
            match = _SESSION_NAME.fullmatch(obj.name)
            if match is None:
                continue
            session_id = bytes.fromhex(match.group(1))
            with self._guard:
                ended = session_id in _ENDED  # here: dead, whatever its object says
            out.append(SessionInfo(session_id, not ended and self.age(obj.mtime) < self.ttl))
        return out

    def close(self) -> None:
        """End every session still running and stop the heartbeat thread."""
        with self._guard:
            live = list(self._live.values())
        for session in live:
            session.end()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)

    # --- the heartbeat -------------------------------------------------------------------

    def _beat_forever(self) -> None:
        while not self._wake.wait(self.ttl / 4):
            with self._guard:
                live = list(self._live.values())
            for session in live:
                self._beat(session)

    def _beat(self, session: ObjectSession) -> None:
        name = session_name(session.id)
        with session.lock:
            if session.ended:
                return
            sent = time.monotonic()
            try:
                self.backend.put(name, session.body)
                mtime, written = self._stamp(name)
            except BlocksnapError:
                return  # tried again next time; valid() turns false if this goes on
            session.beat(sent, mtime, written)


class ObjectLocks:
    """The Locks protocol of store/locks.py across hosts: a local flock, then a lease
    object (see the module doc); the repository lock stays local."""

    def __init__(self, backend: ObjectStore, sessions: ObjectSessions, local: LocalLocks) -> None:
        self.backend = backend
        self.sessions = sessions
        self.local = local
        self._held: dict[str, tuple[ObjectSession, int]] = {}

    @contextlib.contextmanager
    def hold(self, name: str, *, busy: str, shared: bool = False) -> Iterator[None]:
        with self.local.hold(name, busy=busy, shared=shared):
            if name == REPOSITORY_LOCK:
                yield
                return
            if shared or not _LOCK_NAME.fullmatch(name):
                raise UsageError(f"no shared or unnamed lease {name!r}")
            session = self.sessions.start()
            try:
                gen = self._take(name, session, busy)
                self._held[name] = (session, gen)
                try:
                    yield
                finally:
                    del self._held[name]
                    self._release(name, session, gen)
            finally:
                session.end()

    def token(self, name: str) -> int:
        """The fencing token of a lease this process holds: its generation."""
        return self._held[name][1]

    def deadline(self, name: str) -> Deadline | None:
        """When a write must land to count as made under the lease (Session.deadline);
        None for a lock that is not a lease held here."""
        held = self._held.get(name)
        if held is None:
            return None
        deadline = held[0].deadline()
        if not held[0].valid():  # a heartbeat after a lapse moves the deadline on
            raise LockedError(f"lost the {name} lease: its session lapsed")
        return deadline

    def confirm(self, name: str) -> None:
        """Raise LockedError unless this process still holds the lease, and no other host
        can have found it dead: called before every step that deletes, and before a
        snapshot commits."""
        held = self._held.get(name)
        if held is None or not held[0].valid():
            raise LockedError(f"lost the {name} lease (its heartbeat failed); stopped")
        gens = self._generations(name)
        if not gens or gens[-1] != held[1]:
            raise LockedError(f"lost the {name} lease to another process; stopped")
        if not held[0].valid():  # the listing may have been slow: still valid after it
            raise LockedError(f"lost the {name} lease (its heartbeat failed); stopped")

    def _generations(self, name: str) -> list[int]:
        """The generations of a lease that exist, lowest first."""
        prefix = f"{LOCKS}{name}/"
        return sorted(
            int(obj.name[len(prefix) :])
            for obj in self.backend.list(prefix)
            if _GEN.fullmatch(obj.name[len(prefix) :])
        )

    def _take(self, name: str, session: ObjectSession, busy: str) -> int:
        """Create the next generation of a lease, as the one taker that wins it; return it."""
        body = {"format": FORMAT, "session": session.id.hex(), "pid": os.getpid()}
        body["host"] = self.sessions.host
        data_ours = json.dumps(body, sort_keys=True).encode()
        for _round in range(TAKE_ROUNDS):
            gens = self._generations(name)
            top = gens[-1] if gens else 0
            if top:
                lease = _generation(name, top)
                try:
                    holder = _holder(self.backend.get(lease))
                except MissingObjectError:
                    continue  # the highest is never deleted: this listing was stale
                if holder is None:
                    # A newer blocksnap's lease, or a damaged one: whether its holder
                    # lives cannot be told, so it is never taken over here.
                    raise LockedError(
                        f"{busy} (the lease {lease} cannot be read; if no maintenance runs "
                        "on any host, delete that object)"
                    )
                holder_id, host, pid, released = holder
                if holder_id == session.id and not released:
                    # Our own create, whose answer was lost: the retry found it there.
                    self._tidy(name, gens, top)
                    return top
                if not released and self.sessions.alive(holder_id):
                    raise LockedError(f"{busy} (on host {host}, pid {pid})")
            gen = top + 1
            try:
                self.backend.put(_generation(name, gen), data_ours, exclusive=True)
            except ObjectExistsError:
                continue  # another taker won it (or our own retried create: read next)
            after = self._generations(name)
            if after and after[-1] > gen:
                # Our view was stale: gen had been taken and superseded meanwhile, so
                # ours is a lower generation, which holds nothing.
                with contextlib.suppress(BlocksnapError):
                    self.backend.delete(_generation(name, gen))
                continue
            if gen not in after:
                with contextlib.suppress(BlocksnapError):
                    self._release(name, session, gen)
                raise StoreError(
                    f"the listing of {LOCKS}{name}/ does not show the lease just created "
                    "there: leases need listings that follow writes"
                )
            self._tidy(name, after, gen)
            return gen
        raise LockedError(f"{busy} (other processes keep taking it)")

    def _tidy(self, name: str, gens: list[int], gen: int) -> None:
        """Delete the generations below gen once LOWER_KEPT of them have piled up."""
        lower = [g for g in gens if g < gen]
        if len(lower) >= LOWER_KEPT:
            with contextlib.suppress(BlocksnapError):  # the next holder tries again
                self.backend.delete_many(_generation(name, g) for g in lower)

    def _release(self, name: str, session: ObjectSession, gen: int) -> None:
        """Write a tombstone over our own generation: never a delete, which a late retry
        could carry onto the next holder's lease."""
        body = {"format": FORMAT, "session": session.id.hex(), "pid": os.getpid()}
        body.update(host=self.sessions.host, released=True)
        with contextlib.suppress(BlocksnapError):  # a lease left behind dies with us
            self.backend.put(_generation(name, gen), json.dumps(body, sort_keys=True).encode())


def _generation(name: str, gen: int) -> str:
    return f"{LOCKS}{name}/{gen:020d}"


def _holder(data: bytes) -> tuple[bytes, str, int, bool] | None:
    """(session id, host, pid, released) that a lease names, or None if it cannot be
    read."""
    try:
        body = json.loads(data)
        session_id = bytes.fromhex(body["session"])
        if len(session_id) != 16:
            return None
        released = body.get("released", False)
        if not isinstance(released, bool):
            return None
        return session_id, str(body.get("host", "?")), int(body.get("pid", 0)), released
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
