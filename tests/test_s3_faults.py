"""The S3 server killed with kill -9 and started again, during uploads, a restore and gc;
and requests that fail on the way (503 SlowDown, lost answers) under the whole engine.

Each kill ends the command with one typed error (after botocore's bounded retries), and
once the server is back nothing committed is lost: every committed snapshot restores
byte-identical, verify --read-data passes, and the interrupted work can be done again.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import BlocksnapError
from blocksnap.model import Progress
from blocksnap.store import collection
from blocksnap.store.backend import ObjectStore
from blocksnap.store.location import S3Options
from tests.conftest import debugfs, run_cli
from tests.s3proxy import fault_proxy
from tests.s3server import S3_BUCKET, S3Server, Weed, running_weed, use_server

PACK_TARGET_SIZE = 4 << 20  # bytes: many packs, so that a kill lands between them


@pytest.fixture
def weed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Weed]:
    """A SeaweedFS of this test's own, which the test may kill, with the AWS environment
    pointing at it."""
    with running_weed(tmp_path / "weed") as server:
        # AWS_MAX_ATTEMPTS: a dead server fails fast.
        use_server(
            monkeypatch,
            server.server,
            endpoint=False,
            BLOCKSNAP_SESSION_TTL="4",
            AWS_MAX_ATTEMPTS="2",
        )
        client = server.server.client()
        client.create_bucket(Bucket=S3_BUCKET)
        client.close()
        yield server


def _kill_at(weed: Weed, phase: str, done: int) -> blocksnap.model.ProgressCallback:
    def callback(p: Progress) -> None:
        if p.phase == phase and p.done >= done and weed.proc is not None:
            weed.kill()

    return callback


def _check_all(repo: blocksnap.Repository, expected: dict[str, bytes], tmp_path: Path) -> None:
    report = repo.verify(read_data=True)
    assert report.ok, report.problems
    for snapshot_id, image in expected.items():
        target = tmp_path / f"check-{snapshot_id}.img"
        repo.restore("vol", snapshot_id, target)
        assert target.read_bytes() == image
        target.unlink()


@pytest.mark.slow
def test_server_killed_during_uploads_restore_and_gc(
    weed: Weed, ext4_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{S3_BUCKET}/repo"
    options = S3Options(endpoint_url=weed.server.endpoint, cache_dir=str(tmp_path / "cache"))
    expected: dict[str, bytes] = {}
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    with blocksnap.Repository.init(url, s3=options, pack_target_size=PACK_TARGET_SIZE) as repo:
        first = repo.snapshot("vol", ext4_image)
        expected[first.id] = ext4_image.read_bytes()

        # 1. Killed while packs go up: the snapshot fails, nothing of it is committed.
        debugfs(ext4_image, f"write {big} big.bin")
        with pytest.raises(BlocksnapError) as failed:
            repo.snapshot("vol", ext4_image, progress=_kill_at(weed, "read", 6 << 20))
        assert "\n" not in str(failed.value)
        weed.start()
    with blocksnap.Repository(url, s3=options) as repo:
        assert [s.id for s in repo.snapshots("vol")] == [first.id]
        _check_all(repo, expected, tmp_path)
        second = repo.snapshot("vol", ext4_image)  # done again, once the server is back
        expected[second.id] = ext4_image.read_bytes()

        # 2. Killed during a restore: one error, and the target is not left half-written.
        target = tmp_path / "restored.img"
        with pytest.raises(BlocksnapError):
            repo.restore("vol", second.id, target, progress=_kill_at(weed, "restore", 1 << 20))
        assert not target.exists()
        weed.start()
    with blocksnap.Repository(url, s3=options) as repo:
        _check_all(repo, expected, tmp_path)

        # 3. Killed during gc, after a prune.
        debugfs(ext4_image, "rm big.bin")
        third = repo.snapshot("vol", ext4_image, full=True)
        expected[third.id] = ext4_image.read_bytes()
        pruned = repo.prune("vol", blocksnap.Policy(keep_last=1))
        assert set(pruned.removed) == {first.id, second.id}
        for removed in pruned.removed:
            del expected[removed]
        # The kill lands just before the list that says the candidates are collected
        # is written: a fixed point, where the gc still has requests to make.
        advance = collection.advance

        def killed_before_done(
            backend: ObjectStore, lst: collection.CollectionList
        ) -> collection.CollectionList:
            if lst.state == collection.DONE and weed.proc is not None:
                weed.kill()
            return advance(backend, lst)

        monkeypatch.setattr(collection, "advance", killed_before_done)
        # A gc that finds a writer session it cannot yet tell dead publishes and waits
        # (legitimately, on a slow machine); the next run, past the ttl, carries it out.
        waited = []
        for _ in range(3):
            try:
                report = repo.gc()
            except BlocksnapError:
                break
            assert report.problems == [] and report.waiting_writers > 0, report
            waited.append(report)
            time.sleep(5)  # past BLOCKSNAP_SESSION_TTL
        assert weed.proc is None, f"the gc never reached its done list: {waited}"
        monkeypatch.setattr(collection, "advance", advance)
        weed.start()
    with blocksnap.Repository(url, s3=options) as repo:
        report = repo.gc()
        assert report.problems == [], report.problems
        _check_all(repo, expected, tmp_path)
    # A host with a fresh cache sees the same.
    shutil.rmtree(tmp_path / "cache")
    with blocksnap.Repository(url, s3=options) as repo:
        assert [s.id for s in repo.snapshots("vol")] == [third.id]
        _check_all(repo, expected, tmp_path)


@pytest.mark.slow
def test_slow_down_and_lost_answers_under_the_engine(
    s3_server: S3Server,
    s3_prefix: str,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """503 SlowDown on many requests and answers lost after the server acted: botocore
    retries them, and snapshots, a restore, prune, gc and verify all come out right."""
    use_server(monkeypatch, s3_server, endpoint=False)
    with fault_proxy(s3_server.endpoint) as proxy:
        options = S3Options(endpoint_url=proxy.endpoint, cache_dir=str(tmp_path / "cache"))
        url = f"s3://{S3_BUCKET}/{s3_prefix}"
        seen = itertools.count()
        # Every third request, so that botocore's five attempts always get through.
        slow = proxy.inject("slow-down", lambda method, path: next(seen) % 3 == 2, count=40)
        # Lost answers only where a repeat is harmless or settled by read-back: GETs and
        # plain part uploads (create-if-absent puts are settled by their own tests).
        lost_seen = itertools.count()
        lost = proxy.inject(
            "lose-answer",
            lambda method, path: (
                (method == "GET" or "partNumber=" in path) and next(lost_seen) % 4 == 3
            ),
            count=10,
        )
        expected: dict[str, bytes] = {}
        with blocksnap.Repository.init(url, s3=options, pack_target_size=PACK_TARGET_SIZE) as repo:
            first = repo.snapshot("vol", ext4_image)
            expected[first.id] = ext4_image.read_bytes()
            debugfs(ext4_image, "rm docs/note3.txt")
            second = repo.snapshot("vol", ext4_image)
            expected[second.id] = ext4_image.read_bytes()
            _check_all(repo, expected, tmp_path)
            repo.prune("vol", blocksnap.Policy(keep_last=1))
            del expected[first.id]
            assert repo.gc().problems == []
            _check_all(repo, expected, tmp_path)
        assert slow.hits == 40 and lost.hits > 0


READER: dict[str, object] = {
    "name": "reader",
    "credentials": [{"accessKey": "readeraccess", "secretKey": "readersecret"}],
    "actions": ["Read", "List"],
}


def test_read_only_credentials_restore_and_cannot_write(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials that may only read the bucket: every reading command works from a
    cache of their own; a snapshot, prune or gc is one clear error, and leaves nothing
    in the bucket."""
    with running_weed(tmp_path / "weed", identities=[READER]) as weed:
        server = weed.server
        client = server.client()
        client.create_bucket(Bucket=S3_BUCKET)
        use_server(monkeypatch, server)
        url = f"s3://{S3_BUCKET}/repo"
        writer = S3Options(cache_dir=str(tmp_path / "writer"))
        with blocksnap.Repository.init(url, s3=writer) as repo:
            snap = repo.snapshot("vol", ext4_image)
        before = sorted(o["Key"] for o in client.list_objects_v2(Bucket=S3_BUCKET)["Contents"])

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "readeraccess")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "readersecret")
        cache = str(tmp_path / "reader")
        target = tmp_path / "restored.img"
        run_cli("restore", url, "vol", "latest", str(target), "--cache-dir", cache, check=True)
        assert target.read_bytes() == ext4_image.read_bytes()
        listed = run_cli("list", url, "vol", "--cache-dir", cache, check=True)
        assert snap.id[:8] in listed.stdout
        for args in (
            ("snapshot", url, "vol", str(ext4_image)),
            ("prune", url, "--keep-last", "1"),
            ("gc", url),
        ):
            proc = run_cli(*args, "--cache-dir", cache)
            assert proc.returncode != 0, args
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert "denied" in proc.stderr.lower() or "forbidden" in proc.stderr.lower(), (
                proc.stderr
            )
        after = sorted(o["Key"] for o in client.list_objects_v2(Bucket=S3_BUCKET)["Contents"])
        assert after == before
        uploads = client.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", [])
        assert uploads == []
        client.close()
