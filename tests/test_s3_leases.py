"""Leases across hosts on a real S3 server (store/objectlocks.py), with the races a
fault proxy in front of it makes: a request retried late after a lost answer, a taker
stalled between what it read and what it writes, a damaged lease."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import LockedError
from blocksnap.store.location import S3Options
from blocksnap.store.locks import LocalLocks
from blocksnap.store.objectlocks import LOWER_KEPT, ObjectLocks, ObjectSessions
from blocksnap.store.s3 import S3Backend
from tests.s3proxy import FaultProxy, Match, request, until
from tests.s3server import S3_BUCKET, S3Server, SnapshotThread, use_server

TTL = 4.0


def _writes(fragment: str) -> Match:
    """Any request that writes or deletes under fragment, or a batch delete (whose keys
    are in its body)."""
    return lambda m, path: (
        (m in ("PUT", "DELETE") and fragment in path) or (m == "POST" and path.endswith("?delete"))
    )


def _locks(backend: S3Backend, tmp_path: Path, host: str) -> ObjectLocks:
    local = tmp_path / host
    (local / "locks").mkdir(parents=True, exist_ok=True)
    return ObjectLocks(backend, ObjectSessions(backend, ttl=TTL, host=host), LocalLocks(str(local)))


def _held_elsewhere(locks: ObjectLocks) -> bool:
    """Whether taking gc now is refused because a live holder has it."""
    try:
        with locks.hold("gc", busy="busy"):
            return False
    except LockedError as error:
        assert "on host" in str(error), error
        return True


def test_a_release_retried_late_never_touches_the_next_holders_lease(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    """The holder's release is carried out, its answer lost, and botocore's retry held
    at the proxy until another host has taken the lease.  When the retry goes through
    at last, the new holder still holds it, alone."""
    direct = s3_server.backend(s3_prefix)
    first = _locks(s3_server.backend(s3_prefix, endpoint=proxy.endpoint), tmp_path, "first")
    second = _locks(direct, tmp_path, "second")
    third = _locks(direct, tmp_path, "third")
    entered = threading.Event()
    leave = threading.Event()
    failure: list[BaseException] = []

    def hold_then_release() -> None:
        try:
            with first.hold("gc", busy="busy"):
                entered.set()
                leave.wait(60)
                proxy.inject("lose-answer", _writes("/locks/gc"))
                proxy.inject("stall", _writes("/locks/gc"))
        except BaseException as error:  # reported by the test below
            failure.append(error)

    holder = threading.Thread(target=hold_then_release)
    holder.start()
    try:
        assert entered.wait(60)
        assert _held_elsewhere(second)
        leave.set()
        with contextlib.ExitStack() as stack:
            _take_when_free(second, stack)  # the release reached the server
            # ... and its retry comes to wait at the proxy (after botocore's backoff).
            assert until(lambda: [rule.hits for rule in proxy.rules] == [1, 1]), proxy.rules
            proxy.released.set()  # the late retry goes through now
            holder.join(60)
            assert not holder.is_alive() and not failure, failure
            second.confirm("gc")  # still the holder, alone
            assert _held_elsewhere(third)
    finally:
        leave.set()
        proxy.released.set()
        holder.join(60)
        for locks in (first, second, third):
            locks.sessions.close()


def _take_when_free(locks: ObjectLocks, stack: contextlib.ExitStack) -> None:
    """Take gc, trying again for a while as long as another holds it."""
    deadline = time.monotonic() + 60
    while True:
        try:
            stack.enter_context(locks.hold("gc", busy="busy"))
            return
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_taker_that_read_a_stale_generation_holds_nothing(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    """A taker reads that the lease is free, then stalls before its create.  Meanwhile
    other hosts take and release the lease, enough times that the generation it is
    about to create is taken and deleted already.  Its create then succeeds, on a lower
    generation, and it must not think it holds the lease."""
    direct = s3_server.backend(s3_prefix)
    stalled = _locks(s3_server.backend(s3_prefix, endpoint=proxy.endpoint), tmp_path, "stalled")
    others = _locks(direct, tmp_path, "others")
    with others.hold("gc", busy="busy"):
        pass  # generation 1, released: the stalled taker goes for generation 2
    rule = proxy.inject("stall", request("PUT", "/locks/gc/"))
    outcome: list[object] = []

    def take() -> None:
        try:
            with stalled.hold("gc", busy="busy"):
                outcome.append(stalled.token("gc"))
        except LockedError as error:
            outcome.append(error)

    taker = threading.Thread(target=take)
    taker.start()
    try:
        assert until(lambda: rule.hits == 1)
        for _ in range(LOWER_KEPT + 2):  # generations 2.., the lower ones deleted
            with others.hold("gc", busy="busy"):
                pass
        gens = [o.name for o in direct.list("locks/gc/")]
        assert "locks/gc/" + "2".zfill(20) not in gens, gens
        with others.hold("gc", busy="busy"):
            top = others.token("gc")
            proxy.released.set()  # the stalled create of generation 2 goes through
            taker.join(60)
            assert not taker.is_alive()
            others.confirm("gc")  # the holder still holds it
        # The stalled taker found its generation below the highest: it did not hold
        # the lease then; it saw the live holder and was refused.
        assert len(outcome) == 1 and isinstance(outcome[0], LockedError), outcome
        assert "on host others" in str(outcome[0])
        gens = [o.name for o in direct.list("locks/gc/")]
        assert gens[-1] == f"locks/gc/{top:020d}", gens
        assert "locks/gc/" + "2".zfill(20) not in gens, gens  # deleted again
    finally:
        proxy.released.set()
        taker.join(60)
        stalled.sessions.close()
        others.sessions.close()


def test_generations_only_grow_and_stay_few(
    s3_server: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    """Each take is the next generation, its fencing token; a release leaves a tombstone,
    never a gap; the lower generations are deleted once LOWER_KEPT pile up."""
    backend = s3_server.backend(s3_prefix)
    locks = _locks(backend, tmp_path, "host")
    tokens = []
    try:
        for _ in range(3 * LOWER_KEPT):
            with locks.hold("gc", busy="busy"):
                tokens.append(locks.token("gc"))
                locks.confirm("gc")
            listed = [o.name for o in backend.list("locks/gc/")]
            assert len(listed) <= LOWER_KEPT + 1, listed
            assert listed[-1] == f"locks/gc/{tokens[-1]:020d}"
            assert json.loads(backend.get(listed[-1]))["released"] is True
        assert tokens == list(range(1, 3 * LOWER_KEPT + 1))
        # A higher generation than the holder's (no taker makes one while it is valid):
        # the holder stops.
        with locks.hold("gc", busy="busy"):
            backend.put(f"locks/gc/{locks.token('gc') + 1:020d}", b"{}")
            with pytest.raises(LockedError, match="lost the gc lease to another process"):
                locks.confirm("gc")
        with pytest.raises(LockedError, match="lost the gc lease"):
            locks.confirm("gc")  # not held now
    finally:
        locks.sessions.close()


def test_a_damaged_lease_is_never_taken_over(
    s3_server: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    backend = s3_server.backend(s3_prefix)
    locks = _locks(backend, tmp_path, "host")
    try:
        with locks.hold("gc", busy="busy"):
            pass
        backend.put("locks/gc/" + "2".zfill(20), b"\x00not json")
        damaged = pytest.raises(LockedError, match=r"locks/gc/0+2 cannot be read.*delete that")
        with damaged, locks.hold("gc", busy="busy"):
            pass
        backend.delete("locks/gc/" + "2".zfill(20))
        with locks.hold("gc", busy="busy"):
            assert locks.token("gc") == 2
    finally:
        locks.sessions.close()


def test_a_snapshot_whose_volume_lease_lapsed_is_not_committed(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeats of the volume lease's session fail while those of the writer's
    session go through: another host may take the volume over, so the snapshot must not
    commit (the chain would fork), though its writer's session is valid."""
    use_server(
        monkeypatch, s3_server, endpoint=False, BLOCKSNAP_SESSION_TTL=str(TTL), AWS_MAX_ATTEMPTS="1"
    )
    url = f"s3://{S3_BUCKET}/{s3_prefix}"
    options = S3Options(endpoint_url=proxy.endpoint, cache_dir=str(tmp_path / "cache"))
    blocksnap.Repository.init(url, s3=options).close()
    host = SnapshotThread(url, options, "vol", ext4_image, pause_at="packs-written")
    host.start()
    try:
        assert host.paused.wait(120)
        direct = s3_server.backend(s3_prefix)
        (lease,) = [o.name for o in direct.list("locks/") if o.name.startswith("locks/volume-")]
        session = json.loads(direct.get(lease))["session"]
        rule = proxy.inject("slow-down", request("PUT", f"/sessions/{session}"), count=10**6)
        assert until(lambda: rule.hits >= 3)  # ttl/2 and more without a heartbeat
        time.sleep(TTL / 2)
    finally:
        host.resume()
        host.join(120)
    assert isinstance(host.outcome, LockedError), host.outcome
    assert re.search(r"was not committed: lost the volume-\w+ lease", str(host.outcome))
    assert not list(direct.list("snapshots/"))
