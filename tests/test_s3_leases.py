"""Leases across hosts on a real S3 server (store/objectlocks.py), with the races a
fault proxy in front of it makes: a request retried late after a lost answer, a taker
stalled between what it read and what it writes, a damaged lease."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import LockedError, StoreError, UsageError
from blocksnap.model import SnapshotInfo
from blocksnap.store import catalog, collection, s3
from blocksnap.store.backend import ObjectStore
from blocksnap.store.gc import GcReport
from blocksnap.store.location import S3Options
from blocksnap.store.locks import LocalLocks
from blocksnap.store.objectlocks import LOWER_KEPT, ObjectLocks, ObjectSessions, session_ttl
from blocksnap.store.s3 import S3Backend
from tests.s3proxy import FaultProxy, Match, request, until
from tests.s3server import S3_BUCKET, S3Server, SnapshotThread, assert_restores, use_server

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


def _through_proxy(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ttl: float = TTL,
) -> tuple[str, S3Options]:
    """A new repository whose host reaches the server through the proxy, with sessions
    of ttl and no retries by botocore: its URL and that host's options."""
    use_server(
        monkeypatch, s3_server, endpoint=False, BLOCKSNAP_SESSION_TTL=str(ttl), AWS_MAX_ATTEMPTS="1"
    )
    url = f"s3://{S3_BUCKET}/{s3_prefix}"
    options = S3Options(endpoint_url=proxy.endpoint, cache_dir=str(tmp_path / "cache"))
    blocksnap.Repository.init(url, s3=options).close()
    return url, options


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
    url, options = _through_proxy(proxy, s3_server, s3_prefix, tmp_path, monkeypatch)
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


def _held_record_put(
    proxy: FaultProxy, url: str, options: S3Options, image: Path, *, fail_delete: bool
) -> SnapshotThread:
    """A snapshot whose record put the proxy holds until well past the record's deadline
    (commit_by, in the server's time), then lets through; fail_delete: every later write
    or delete of a record (a batch delete too) fails as well, so that the late record
    stays.  Returns the ended thread."""
    host = SnapshotThread(url, options, "vol", image, pause_at="packs-written")
    host.start()
    try:
        assert host.paused.wait(120)
        rule = proxy.inject("stall", request("PUT", "/snapshots/"))
        if fail_delete:
            proxy.inject("slow-down", _writes("/snapshots/"), count=10**6)
        host.resume()
        assert until(lambda: rule.hits == 1, 60)
        time.sleep(TTL + 1.5)  # past commit_by: one second and ttl/2 after a heartbeat
    finally:
        proxy.released.set()
        host.resume()
        host.join(120)
    return host


def _other_host(url: str, tmp_path: Path, name: str) -> blocksnap.Repository:
    """The repository as a host with a cache of its own and no proxy sees it."""
    return blocksnap.Repository(url, s3=S3Options(cache_dir=str(tmp_path / name)))


def test_a_record_that_lands_after_its_deadline_is_no_snapshot(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The record put is checked valid, then held (a retry, a proxy, a busy server) until
    other hosts could have found the writer's session dead.  The writer sees from the
    record's modification time that it landed late, deletes it and reports the snapshot
    not committed; nothing of it is left as a snapshot."""
    url, options = _through_proxy(proxy, s3_server, s3_prefix, tmp_path, monkeypatch)
    host = _held_record_put(proxy, url, options, ext4_image, fail_delete=False)
    assert isinstance(host.outcome, StoreError), host.outcome
    assert re.search(
        r"snapshot \w+ was not committed: its record reached the storage after "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
        str(host.outcome),
    ), host.outcome
    direct = s3_server.backend(s3_prefix)
    assert not list(direct.list("snapshots/"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    with blocksnap.Repository(url, s3=options) as repo:  # the writer's own cache
        assert repo.snapshots("vol") == []
        report = repo.verify()
        assert report.ok, report.problems
    # The writer runs again, and commits.
    with blocksnap.Repository(url, s3=options) as repo:
        info = repo.snapshot("vol", ext4_image)
        entry, _body = catalog.read_record(direct.get, info.id)
        assert entry.commit_by is not None
        assert not entry.late(direct.stat(f"snapshots/{info.id}").mtime)
        assert [s.id for s in repo.snapshots("vol")] == [info.id]


def test_a_late_record_that_stays_is_left_out_everywhere_and_collected(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, and the writer's delete of its late record fails too: another host
    leaves the record out (no snapshot, no parent for its next one), verify names it
    only as a leftover, a rebuilt index leaves it out, and the writer's own gc, which
    finds it among the intents of a writer that ended, deletes it."""
    url, options = _through_proxy(proxy, s3_server, s3_prefix, tmp_path, monkeypatch)
    host = _held_record_put(proxy, url, options, ext4_image, fail_delete=True)
    assert isinstance(host.outcome, StoreError), host.outcome
    assert "was not committed: its record reached the storage after" in str(host.outcome)
    direct = s3_server.backend(s3_prefix)
    (late,) = [o.name for o in direct.list("snapshots/")]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    with _other_host(url, tmp_path, "other") as repo:
        assert repo.snapshots("vol") == []
        report = repo.verify()
        assert report.ok, report.problems
        assert [x for x in report.leftovers if x.startswith(late)] == [
            f"{late} (a record that landed after its deadline: no snapshot; the gc of its "
            "writer's host deletes it)"
        ]
        info = repo.snapshot("vol", ext4_image)
        assert info.parent is None  # the late record is no parent
    other = S3Options(cache_dir=str(tmp_path / "other"))
    rebuilt = blocksnap.repair_index(url, s3=other)
    assert rebuilt.snapshots == 1 and not rebuilt.damaged, rebuilt
    proxy.rules.clear()  # the writer's host, its cache (named by the proxy's endpoint)
    with blocksnap.Repository(url, s3=options) as repo:
        gc = repo.gc()
        assert not gc.problems, gc.problems
        assert gc.leftovers_deleted >= 1
        assert [o.name for o in direct.list("snapshots/")] == [f"snapshots/{info.id}"]
        assert [s.id for s in repo.snapshots("vol")] == [info.id]
        assert repo.verify(read_data=True).ok
    with blocksnap.Repository(url, s3=other) as repo:
        assert [s.id for s in repo.snapshots("vol")] == [info.id]
        assert repo.verify(read_data=True).ok


def test_a_record_answered_in_time_commits_though_its_time_cannot_be_read(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stat of the record after its put fails: a put answered well before the
    deadline surely landed in time, so the snapshot is committed all the same."""
    # A ttl of 20 s: a put answered within 10 s of a heartbeat (every 5 s) is in time.
    url, options = _through_proxy(proxy, s3_server, s3_prefix, tmp_path, monkeypatch, 20.0)
    host = SnapshotThread(url, options, "vol", ext4_image, pause_at="packs-written")
    host.start()
    assert host.paused.wait(120)
    rule = proxy.inject("slow-down", request("HEAD", "/snapshots/"))
    info = host.result()
    assert rule.hits == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    with _other_host(url, tmp_path, "other") as repo:
        assert [s.id for s in repo.snapshots("vol")] == [info.id]


def test_a_record_put_in_doubt_is_decided_by_what_lands_before_the_deadline(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client gives up on the record put (a read timeout) while the proxy still holds
    it, and lets it through a moment later, before the record's deadline.  The writer
    keeps its session and the volume's lease until the record could only land late, and
    then finds it: the snapshot is committed, and every host sees it.  (Were the session
    ended at once, gc could collect what the record refers to before it landed.)"""
    # commit_by is 7 s after a heartbeat; they come every 3 s, and the put lands at most
    # 2.5 s after it is sent.
    url, options = _through_proxy(proxy, s3_server, s3_prefix, tmp_path, monkeypatch, 12.0)
    monkeypatch.setattr(s3, "READ_TIMEOUT", 2.0)  # for the snapshot's client (not init's)
    host = SnapshotThread(url, options, "vol", ext4_image, pause_at="packs-written")
    host.start()
    try:
        assert host.paused.wait(120)
        rule = proxy.inject("stall", request("PUT", "/snapshots/"))
        host.resume()
        assert until(lambda: rule.hits == 1, 60)
        time.sleep(2.5)  # the client timed out: its put is in doubt
        assert host.is_alive()  # still deciding
    finally:
        proxy.released.set()  # the held put lands now, within the deadline
        host.resume()
        host.join(120)
    assert isinstance(host.outcome, SnapshotInfo), host.outcome
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    with _other_host(url, tmp_path, "other") as repo:
        assert [s.id for s in repo.snapshots("vol")] == [host.outcome.id]
        assert repo.verify(read_data=True).ok


def test_a_record_written_again_by_repair_is_not_late(
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """repair --rebuild-index writes a lost record again from the index's copy, long
    after its deadline: without the deadline, so that every host still counts it."""
    use_server(monkeypatch, s3_server, BLOCKSNAP_SESSION_TTL=str(TTL))
    url = f"s3://{S3_BUCKET}/{s3_prefix}"
    own = S3Options(cache_dir=str(tmp_path / "own"))
    with blocksnap.Repository.init(url, s3=own) as repo:
        info = repo.snapshot("vol", ext4_image)
    direct = s3_server.backend(s3_prefix)
    entry, _body = catalog.read_record(direct.get, info.id)
    assert entry.commit_by is not None
    direct.delete(f"snapshots/{info.id}")
    time.sleep(TTL)  # well past commit_by
    rebuilt = blocksnap.repair_index(url, s3=own)
    assert len(rebuilt.restored) == 1, rebuilt
    entry, _body = catalog.read_record(direct.get, info.id)
    assert not entry.late(direct.stat(f"snapshots/{info.id}").mtime)
    with _other_host(url, tmp_path, "other") as repo:
        assert [s.id for s in repo.snapshots("vol")] == [info.id]
        assert repo.verify().ok


@pytest.mark.parametrize("raw", ["3.5", "0", "86401", "soon"])
def test_a_session_ttl_that_leaves_no_margin_is_refused(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below 4 s a record's deadline would keep no margin against clocks (ttl/2 - 1)."""
    monkeypatch.setenv("BLOCKSNAP_SESSION_TTL", raw)
    with pytest.raises(UsageError, match=f"BLOCKSNAP_SESSION_TTL='{raw}' is not"):
        session_ttl()
    monkeypatch.setenv("BLOCKSNAP_SESSION_TTL", "4")
    assert session_ttl() == 4.0


def _garbage(repo: blocksnap.Repository, tmp_path: Path) -> tuple[SnapshotInfo, bytes]:
    """Two versions of a volume, the first pruned: its blocks and map nodes are garbage.
    Returns the snapshot kept and its bytes."""
    image = tmp_path / "vol.img"
    data = bytearray(os.urandom(8 << 20))
    image.write_bytes(data)
    repo.snapshot("vol", image)
    data[2 << 20 : 4 << 20] = os.urandom(2 << 20)
    image.write_bytes(data)
    kept = repo.snapshot("vol", image)
    repo.prune("vol", blocksnap.Policy(keep_last=1))
    return kept, bytes(data)


class _GcThread(threading.Thread):
    def __init__(self, url: str, options: S3Options) -> None:
        super().__init__()
        self.url, self.options = url, options
        self.outcome: GcReport | BaseException | None = None

    def run(self) -> None:
        try:
            with blocksnap.Repository(self.url, s3=self.options) as repo:
                self.outcome = repo.gc()
        except BaseException as exc:
            self.outcome = exc


def _collected(backend: S3Backend) -> collection.CollectionList | None:
    """The first done list that collected anything."""
    for seq, name in collection.listed(backend).items():
        lst = collection.read(backend, seq, name)
        if lst is not None and lst.state == collection.DONE and lst.collected:
            return lst
    return None


@pytest.mark.parametrize("late", ["pending", "armed", "done", "done first"])
def test_a_list_written_late_never_replaces_the_next_holders(
    proxy: FaultProxy,
    s3_server: S3Server,
    s3_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    late: str,
) -> None:
    """Host A's gc publishes a collection list, and its write of the list (pending, or its
    next state: armed, or done) is held (a retry, a proxy, a busy server) while A's
    heartbeats fail.  Host B takes the maintenance lease over and collects.  When A's
    write lands at last, it finds its seq (taken by B's fence) or its state (B's) taken
    and changes nothing, A stops, and every host restores and verifies.  Done first: A's
    done list lands just before B's, which then finds it and goes by it (A's copies and
    nodes)."""
    url, options = _through_proxy(proxy, s3_server, s3_prefix, tmp_path, monkeypatch)
    with blocksnap.Repository(url, s3=options) as repo:
        kept, expected = _garbage(repo, tmp_path)
    a_list = collection.list_name(2)  # A's gc: its fence is list 1
    suffix = {"pending": "", "armed": ".armed", "done": ".done", "done first": ".done"}[late]
    held = proxy.inject("stall", lambda m, path: m == "PUT" and path.endswith(a_list + suffix))
    host_a = _GcThread(url, options)
    direct = s3_server.backend(s3_prefix)
    mine: list[collection.CollectionList] = []  # B's done list, done first
    if late == "done first":
        advance = collection.advance

        def after_a(
            backend: ObjectStore, lst: collection.CollectionList
        ) -> collection.CollectionList:
            if (
                lst.name == a_list
                and lst.state == collection.DONE
                and threading.current_thread() is not host_a
            ):
                mine.append(lst)
                proxy.released.set()  # A's done lands now
                assert until(lambda: any(direct.list(a_list + ".done")), 30)
            return advance(backend, lst)

        monkeypatch.setattr(collection, "advance", after_a)
    host_a.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    try:
        assert until(lambda: held.hits == 1, 60)
        proxy.inject("slow-down", request("PUT", "/sessions/"), count=10**6)
        deadline = time.monotonic() + 60
        while True:  # until A's lease has run out, and then A's other sessions
            with contextlib.suppress(LockedError), _other_host(url, tmp_path, "b") as repo:
                report = repo.gc()
                assert report.problems == [], report
                if (lst := _collected(direct)) is not None:
                    break
            assert time.monotonic() < deadline, "A's sessions never ran out"
            time.sleep(0.5)
        stored = {o.name: direct.get(o.name) for o in direct.list(collection.PREFIX)}
    finally:
        proxy.released.set()
        host_a.join(120)
    assert not host_a.is_alive()
    assert isinstance(host_a.outcome, LockedError), host_a.outcome
    # A's late write changed nothing.
    assert {o.name: direct.get(o.name) for o in direct.list(collection.PREFIX)} == stored
    assert lst.nodes is not None
    if late == "done first":
        (own,) = mine
        assert lst.name == a_list and lst.nodes != own.nodes  # A's list, found by B
    else:
        assert report.objects_deleted > 0, report
        assert (lst.name == a_list) is (late != "pending")  # B's own, when A's never landed
    with _other_host(url, tmp_path, "c") as repo:
        assert [s.id for s in repo.snapshots("vol")] == [kept.id]
        again = repo.gc()
        assert again.problems == [] and again.objects_deleted == 0, again
    for host in ("cache", "b", "c"):  # A's own cache follows too
        cache = S3Options(cache_dir=str(tmp_path / host))  # no proxy
        assert_restores(url, cache, kept, expected, tmp_path / f"{host}.img")
