"""A repository on S3 shared by hosts: s3:// URLs, per-host caches, leases and sessions kept
as objects (store/objectlocks.py), the capability probe of init, and what gc refuses.

Every host here is a cache directory of its own (as separate hosts would have), on one
real SeaweedFS; the CLI runs as a user would, credentials in the AWS environment.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import pytest

import blocksnap
from blocksnap.errors import LockedError, StoreError
from blocksnap.store import catalog
from blocksnap.store.init import probe_create_if_absent
from blocksnap.store.location import S3Options
from blocksnap.store.locks import LocalLocks
from blocksnap.store.objectlocks import ObjectLocks, ObjectSessions
from blocksnap.store.packs import pack_name
from blocksnap.store.s3 import S3Backend
from tests.conftest import debugfs, run_cli
from tests.s3proxy import until
from tests.s3server import S3_BUCKET, S3Server, rclone_s3, use_server


@pytest.fixture
def aws_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The server's endpoint and credentials in the environment, as a user sets them."""
    use_server(monkeypatch, s3_server, BLOCKSNAP_SESSION_TTL="4")
    yield


def _url(prefix: str) -> str:
    return f"s3://{S3_BUCKET}/{prefix}"


def _cli(cache: Path, *args: str) -> dict[str, object] | list[object]:
    proc = run_cli(*args, "--cache-dir", str(cache), "--json", check=True)
    loaded: dict[str, object] | list[object] = json.loads(proc.stdout)
    return loaded


def test_s3_url_on_two_hosts_through_the_cli(
    aws_env: None, s3_prefix: str, ext4_image: Path, tmp_path: Path
) -> None:
    url = _url(s3_prefix)
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    init = _cli(host_a, "init", url)
    assert isinstance(init, dict) and init["repository"] == url
    # init again: refused, one line, nothing changed
    again = run_cli("init", url, "--cache-dir", str(host_a))
    assert again.returncode != 0 and again.stderr.count("\n") == 1
    assert "holds a repository already" in again.stderr

    v1 = ext4_image.read_bytes()
    first = _cli(host_a, "snapshot", url, "web01", str(ext4_image))
    assert isinstance(first, dict)
    # Host B, an empty cache: the same repository, rebuilt from the bucket.
    listed_b = _cli(host_b, "list", url, "web01")
    listed_a = _cli(host_a, "list", url, "web01")
    assert listed_a == listed_b
    # Host B writes the next snapshot of another volume and the next of web01 (one at a
    # time: the volume lease is free); host A, whose cache knew none of B's packs, sees
    # and restores them.
    new_file = tmp_path / "new.bin"
    new_file.write_bytes(os.urandom(2 << 20))
    debugfs(ext4_image, f"write {new_file} new.bin")
    v2 = ext4_image.read_bytes()
    second = _cli(host_b, "snapshot", url, "web01", str(ext4_image))
    assert isinstance(second, dict)
    _cli(host_b, "snapshot", url, "db01", str(ext4_image))
    info = _cli(host_a, "info", url, "web01", "latest")
    assert isinstance(info, dict) and info["id"] == second["id"]
    assert info["parent"] == first["id"]
    for host in (host_a, host_b):
        for snap, expected in (("latest~1", v1), ("latest", v2)):
            target = tmp_path / f"{host.name}-{snap}.img"
            run_cli(
                "restore", url, "web01", snap, str(target), "--cache-dir", str(host), check=True
            )
            assert target.read_bytes() == expected
    out = tmp_path / "out"
    run_cli(
        "extract",
        url,
        "web01",
        "latest",
        "/new.bin",
        "--to",
        str(out),
        "--cache-dir",
        str(host_a),
        check=True,
    )
    assert (out / "new.bin").read_bytes() == new_file.read_bytes()
    # Two hosts wrote: gc from either is clean, and so is verify on both.
    for host in (host_a, host_b):
        gc = _cli(host, "gc", url)
        assert isinstance(gc, dict) and gc["problems"] == [], gc
    for host in (host_a, host_b):
        checked = _cli(host, "verify", url, "--read-data")
        assert isinstance(checked, dict) and checked["ok"], checked


def test_one_writing_host_collects_and_the_others_cache_follows(
    aws_env: None, s3_server: S3Server, s3_prefix: str, ext4_image: Path, tmp_path: Path
) -> None:
    url = _url(s3_prefix)
    a = S3Options(cache_dir=str(tmp_path / "a"))
    b = S3Options(cache_dir=str(tmp_path / "b"))
    with blocksnap.Repository.init(url, s3=a) as repo:
        first = repo.snapshot("vol", ext4_image)
        debugfs(ext4_image, "rm docs/note3.txt")
        second = repo.snapshot("vol", ext4_image)
        expected = ext4_image.read_bytes()
    with blocksnap.Repository(url, s3=b) as reader:  # a host that only reads
        assert [s.id for s in reader.snapshots("vol")] == [first.id, second.id]
    with blocksnap.Repository(url, s3=a) as repo:
        pruned = repo.prune("vol", blocksnap.Policy(keep_last=1))
        assert pruned.removed == [first.id]
        report = repo.gc()
        assert report.problems == [] and report.objects_deleted > 0
        assert repo.verify(read_data=True).ok
    with blocksnap.Repository(url, s3=b) as reader:
        assert [s.id for s in reader.snapshots("vol")] == [second.id]
        target = tmp_path / "restored.img"
        reader.restore("vol", "latest", target)
        assert target.read_bytes() == expected


def _hold_lease(backend_args: dict[str, str], prefix: str, name: str, ready: object) -> None:
    backend = S3Backend(
        S3_BUCKET,
        prefix,
        endpoint_url=backend_args["endpoint_url"],
        access_key=backend_args["access_key"],
        secret_key=backend_args["secret_key"],
        region=backend_args["region"],
    )
    cache = backend_args["cache"]
    sessions = ObjectSessions(backend, ttl=4.0)
    locks = ObjectLocks(backend, sessions, LocalLocks(cache))
    with locks.hold(name, busy="busy"):
        ready.set()  # type: ignore[attr-defined]
        time.sleep(600)


def test_lease_of_a_killed_holder_runs_out_and_a_live_one_holds(
    s3_server: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    args = {
        "endpoint_url": s3_server.endpoint,
        "access_key": s3_server.access_key,
        "secret_key": s3_server.secret_key,
        "region": s3_server.region,
    }
    (tmp_path / "locks").mkdir()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(
        target=_hold_lease,
        args=({**args, "cache": str(tmp_path / "other")}, s3_prefix, "gc", ready),
    )
    (tmp_path / "other" / "locks").mkdir(parents=True)
    child.start()
    try:
        assert ready.wait(60)
        backend = s3_server.backend(s3_prefix)
        sessions = ObjectSessions(backend, ttl=4.0, host="checker")
        locks = ObjectLocks(backend, sessions, LocalLocks(str(tmp_path)))
        # Alive and heartbeating past several ttls: never taken over.
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline:
            with pytest.raises(LockedError, match=r"busy \(on host"), locks.hold("gc", busy="busy"):
                pass
            time.sleep(1)
        os.kill(child.pid or 0, signal.SIGKILL)
        child.join()
        killed = time.monotonic()
        taken = None
        while time.monotonic() - killed < 30:
            try:
                with locks.hold("gc", busy="busy"):
                    taken = time.monotonic() - killed
                    locks.confirm("gc")
                    # Another taker is refused while this one holds it.
                    other = ObjectLocks(
                        backend,
                        ObjectSessions(backend, ttl=4.0),
                        LocalLocks(str(tmp_path / "other")),
                    )
                    with pytest.raises(LockedError), other.hold("gc", busy="busy"):
                        pass
                break
            except LockedError:
                time.sleep(0.5)
        assert taken is not None and 3.0 <= taken < 12.0, taken
        # One generation per take: the dead holder's, then this one's (the other taker
        # was refused); the last is a tombstone, and nothing else is left.
        names = [o.name for o in backend.list("locks/")]
        assert names == [f"locks/gc/{gen:020d}" for gen in (1, 2)], names
        assert json.loads(backend.get(names[-1]))["released"] is True
        sessions.close()
    finally:
        if child.is_alive():
            child.kill()
        child.join()


def test_sessions_go_by_the_servers_clock_not_the_hosts(
    s3_server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = s3_server.backend(s3_prefix)
    writer_host = ObjectSessions(backend, ttl=4.0, host="fast-clock")
    session = writer_host.start()
    real = time.time
    for skew in (600.0, -600.0):  # this host's clock ten minutes off either way
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)
        checker = ObjectSessions(backend, ttl=4.0, host="checker")
        assert checker.alive(session.id)
        time.sleep(2.5)
        assert checker.alive(session.id)  # heartbeats keep it alive past ttl/2
    monkeypatch.setattr(time, "time", real)
    session.end()
    assert not ObjectSessions(backend, ttl=4.0).alive(session.id)
    writer_host.close()


class _Overwriting(S3Backend):
    """A server that ignores If-None-Match: every put replaces."""

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False
    ) -> None:
        super().put(name, data)


def test_init_refuses_storage_without_create_if_absent(s3_server: S3Server, s3_prefix: str) -> None:
    good = s3_server.backend(s3_prefix)
    probe_create_if_absent(good, "here")
    assert not list(good.list(""))  # nothing left behind
    bad = s3_server.backend(s3_prefix, kind=_Overwriting)
    with pytest.raises(StoreError, match="does not keep create-if-absent"):
        probe_create_if_absent(bad, "there")
    assert not list(good.list(""))


def test_init_refuses_rclone_serve_s3_which_ignores_if_none_match(
    tmp_path: Path,
) -> None:
    """A second real S3 implementation: `rclone serve s3` 1.75 answers a PUT with
    If-None-Match: * by replacing the object.  init's probe finds that and refuses, with
    one line, before anything is written; a repository there would lose commits."""
    with rclone_s3(tmp_path / "rclone") as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "blocksnap",
                "init",
                f"s3://{S3_BUCKET}/repo",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--s3-endpoint",
                server.endpoint,
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                "AWS_ACCESS_KEY_ID": server.access_key,
                "AWS_SECRET_ACCESS_KEY": server.secret_key,
                "AWS_REGION": server.region,
            },
            timeout=120,
        )
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "does not keep create-if-absent" in proc.stderr, proc.stderr
        assert "an existing object was replaced" in proc.stderr or "racing" in proc.stderr
        # Nothing is left (a stat of each listed key: rclone's own listing may lag).
        client = server.client()
        for obj in client.list_objects_v2(Bucket=S3_BUCKET).get("Contents", []):
            with pytest.raises(botocore.exceptions.ClientError, match=r"404|Not Found"):
                client.head_object(Bucket=S3_BUCKET, Key=obj["Key"])
        client.close()


def test_two_hosts_on_one_volume_the_second_is_refused(
    aws_env: None, s3_prefix: str, ext4_image: Path, tmp_path: Path
) -> None:
    url = _url(s3_prefix)
    a = S3Options(cache_dir=str(tmp_path / "a"))
    with blocksnap.Repository.init(url, s3=a) as repo:
        repo.snapshot("vol", ext4_image)
        with repo.store.lock_volume("vol"):  # host A's snapshot of vol runs
            proc = run_cli(
                "snapshot", url, "vol", str(ext4_image), "--cache-dir", str(tmp_path / "b")
            )
            assert proc.returncode == 4, proc.stderr
            assert proc.stderr.count("\n") == 1
            assert "already running" in proc.stderr and "on host" in proc.stderr
            other = run_cli(
                "snapshot", url, "other", str(ext4_image), "--cache-dir", str(tmp_path / "b")
            )
            assert other.returncode == 0, other.stderr  # another volume never waits
        assert len(repo.snapshots("vol")) == 1


def test_bad_urls_are_one_line(aws_env: None, tmp_path: Path) -> None:
    for url, message in (
        ("s3://", "does not name a bucket"),
        ("s3://key:secret@bucket/p", "never in the URL"),
        (f"s3://no-such-bucket-{os.getpid()}/p", "no-such-bucket"),
        (f"s3://{S3_BUCKET}/not-a-repository-{os.getpid()}", "not a blocksnap repository"),
    ):
        proc = run_cli("list", url, "--cache-dir", str(tmp_path))
        assert proc.returncode != 0, url
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr, (url, proc.stderr)


def test_a_sessions_deadline_comes_before_any_host_can_find_it_dead(
    s3_server: S3Server, s3_prefix: str
) -> None:
    """Session.deadline: one second and ttl/2 after its last heartbeat's modification
    time, in the server's whole seconds, which is before the earliest moment another host
    finds it dead (ttl after that heartbeat, plus the second of rounding); its local
    bound is at most that far after the heartbeat was sent, and moves with each one."""
    backend = s3_server.backend(s3_prefix)
    sessions = ObjectSessions(backend, ttl=4.0)
    session = sessions.start()
    try:
        sent, mtime, written = session.beaten
        first = session.deadline()
        assert mtime == backend.stat(f"sessions/{session.id.hex()}").mtime
        assert first.server == math.floor(mtime + 1 + 2.0) < mtime + 1 + 4.0
        assert sent < first.local <= sent + 2.0
        assert until(lambda: session.beaten[0] > sent, 10)  # the next heartbeat
        assert session.deadline().local > first.local
        # From `past` on the server's time is beyond commit_by's second.
        assert first.past == written + (first.server + 1 - mtime)
    finally:
        sessions.close()


def test_a_session_whose_heartbeats_had_a_gap_stays_invalid(
    s3_server: S3Server, s3_prefix: str
) -> None:
    """Another host may have found the session dead during the gap and acted on it
    (collected what the writer refers to), so a heartbeat after it does not restore it."""
    backend = s3_server.backend(s3_prefix)
    sessions = ObjectSessions(backend, ttl=4.0)
    session = sessions.start()
    try:
        assert session.valid()
        session.last_beat -= 2.5  # the heartbeats stopped for more than ttl/2
        session.beat(time.monotonic(), *session.beaten[1:])  # and came back
        assert not session.valid()
        assert sessions.alive(session.id)  # to others it looks alive again: hence the rule
    finally:
        sessions.close()


def test_a_session_ended_while_storage_was_down_is_dead_here_at_once(
    s3_server: S3Server, s3_prefix: str
) -> None:
    """Its object could not be deleted, and looks alive for a ttl more: this process
    knows better, for alive() and for the listing gc arms its lists from alike."""
    backend = s3_server.backend(s3_prefix)
    sessions = ObjectSessions(backend, ttl=60.0)
    session = sessions.start()
    with pytest.MonkeyPatch.context() as patch:  # the delete of its end fails
        patch.setattr(backend, "delete", lambda name: (_ for _ in ()).throw(StoreError("down")))
        session.end()
    assert backend.stat(f"sessions/{session.id.hex()}")  # the object is still there
    other = ObjectSessions(backend, ttl=60.0, host="other")
    assert not other.alive(session.id)
    assert [info.alive for info in other.listing() if info.id == session.id] == [False]
    sessions.close()


def test_verify_takes_another_hosts_new_commit_for_what_it_is(
    aws_env: None, s3_server: S3Server, s3_prefix: str, ext4_image: Path, tmp_path: Path
) -> None:
    """A host verifies while another commits a snapshot of data this host's cache has
    never indexed: that record is a leftover (the next writing command indexes it), not
    damage.  A record whose map root is in none of the packs it names still is."""
    url = _url(s3_prefix)
    a = S3Options(cache_dir=str(tmp_path / "a"))
    b = S3Options(cache_dir=str(tmp_path / "b"))
    with blocksnap.Repository.init(url, s3=a) as repo:
        repo.snapshot("vol", ext4_image)
    noise = tmp_path / "noise.img"
    noise.write_bytes(os.urandom(4 << 20))
    with blocksnap.Repository(url, s3=a) as verifier:
        with blocksnap.Repository(url, s3=b) as other:
            new = other.snapshot("other", noise)  # after the verifier's sync
        report = verifier.verify()
        assert report.ok, report.problems
        assert any(new.id in leftover for leftover in report.leftovers), report.leftovers
    # Two commits after the verifier's sync, the second of unchanged data: its map root
    # is in the packs of the first, which it does not name, and it is no damage either.
    noise.write_bytes(os.urandom(4 << 20))
    with blocksnap.Repository(url, s3=a) as verifier:
        with blocksnap.Repository(url, s3=b) as other:
            first = other.snapshot("idle", noise)
            again = other.snapshot("idle", noise)
        assert again.map_root == first.map_root and again.parent == first.id
        report = verifier.verify()
        assert report.ok, report.problems
        for snapshot in (first, again):
            assert any(snapshot.id in x for x in report.leftovers), report.leftovers
    # Another commit after the verifier's sync, whose packs are then lost: its map root
    # is nowhere, and that is damage.
    backend = s3_server.backend(s3_prefix)
    noise.write_bytes(os.urandom(4 << 20))
    with blocksnap.Repository(url, s3=a) as verifier:
        with blocksnap.Repository(url, s3=b) as other:
            lost = other.snapshot("third", noise)
        entry, _body = catalog.read_record(backend.get, lost.id)
        assert entry.packs
        backend.delete_many(pack_name(p) for p in entry.packs)
        report = verifier.verify()
        assert [p.message for p in report.problems] == [
            f"snapshot {lost.id} is committed and not in the index, and its map root "
            f"{lost.map_root.hex()} is not in the index either"
        ], report.problems
