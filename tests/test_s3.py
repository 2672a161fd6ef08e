"""The S3 backend (store/s3.py) under the engine, and its errors, on a real SeaweedFS.

The contract itself is held by tests/test_backend_conformance.py (kinds s3, retrying-s3,
faulty-s3); this file runs a repository whose objects are in a bucket through a whole
life (snapshots, restores, a single file, prune, gc, verify, an index rebuilt from the
bucket) and checks the one-line errors for a wrong bucket or key.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import (
    MissingObjectError,
    ObjectExistsError,
    StoreError,
    TransientStoreError,
)
from blocksnap.extract import extract
from blocksnap.retention import Policy
from blocksnap.store import s3
from blocksnap.store.s3 import S3Backend
from tests.conftest import debugfs
from tests.s3proxy import FaultProxy, request, until
from tests.s3server import S3_BUCKET, S3Server

PACK_TARGET_SIZE = 12 << 20  # bytes: packs of a full 8 MiB part and a shorter last one


class _ReadLog(S3Backend):
    """An S3Backend that notes every get (name, offset, length) before making it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gets: list[tuple[str, int, int | None]] = []

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.gets.append((name, offset, length))
        return super().get(name, offset, length)

    def get_into(self, name: str, buffer: memoryview) -> int:
        self.gets.append((name, 0, len(buffer)))
        return super().get_into(name, buffer)


def _backend(server: S3Server, prefix: str) -> _ReadLog:
    backend = server.backend(prefix, kind=_ReadLog)
    assert isinstance(backend, _ReadLog)
    return backend


def _open(path: Path, backend: S3Backend, *, init: bool = False) -> blocksnap.Repository:
    # The locks and writer sessions are the store's default for a backend that is not
    # local: objects in the bucket (store/objectlocks.py).
    if init:
        return blocksnap.Repository.init(path, backend=backend, pack_target_size=PACK_TARGET_SIZE)
    return blocksnap.Repository(path, backend=backend)


def test_s3_repository_life_and_rebuild_from_the_bucket(
    s3_server: S3Server, s3_prefix: str, ext4_image: Path, tmp_path: Path
) -> None:
    s3_repo_dir = tmp_path / "cache"  # the index and host-local state; objects on S3
    backend = _backend(s3_server, s3_prefix)
    v1 = ext4_image.read_bytes()
    with _open(s3_repo_dir, backend, init=True) as repo:
        first = repo.snapshot("vol", ext4_image)
        new_file = tmp_path / "new.bin"
        new_file.write_bytes(os.urandom(3 << 20))
        debugfs(ext4_image, f"write {new_file} new.bin", "rm docs/note3.txt")
        v2 = ext4_image.read_bytes()
        assert v2 != v1
        second = repo.snapshot("vol", ext4_image)
        assert second.parent == first.id
        for snap, expected in ((first, v1), (second, v2)):
            target = tmp_path / f"restored-{snap.id}.img"
            repo.restore("vol", snap.id, target)
            assert target.read_bytes() == expected
        with repo.open_filesystem("vol") as fs:
            report = extract(fs, ["/new.bin"], str(tmp_path / "out"))
        assert report.skipped == []
        assert (tmp_path / "out" / "new.bin").read_bytes() == new_file.read_bytes()
        third = repo.snapshot("vol", ext4_image, full=True)
        pruned = repo.prune("vol", Policy(keep_last=2))
        assert pruned.removed == [first.id]
        gc = repo.gc()
        assert gc.problems == []
        checked = repo.verify(read_data=True)
        assert checked.ok, checked.problems
        assert checked.leftovers == []
        before = [(s.id, s.parent, s.kind) for s in repo.snapshots("vol")]
        latest = repo.resolve("vol", "latest").id
        assert [s[0] for s in before] == [second.id, third.id]
    # Packs went up as multipart uploads; every pack is on the bucket, none on the cache
    # directory; no upload was left unfinished.
    assert backend.requests["UploadPart"] > backend.requests["CompleteMultipartUpload"] > 0
    assert not list((s3_repo_dir / "packs").rglob("*"))
    assert backend.leftovers() == []

    # A host's cache lost: the index comes back from the bucket alone.
    shutil.rmtree(s3_repo_dir / "index")
    packs = {o.name: o.size for o in backend.list("packs/")}
    backend.gets.clear()
    backend.requests.clear()
    with _open(s3_repo_dir, backend) as repo:
        rebuild_gets = dict(backend.requests)
        whole_reads = [name for name, offset, length in backend.gets if length is None]
        pack_reads = [g for g in backend.gets if g[0] in packs]
        assert [(s.id, s.parent, s.kind) for s in repo.snapshots("vol")] == before
        assert repo.resolve("vol", "latest").id == latest
        target = tmp_path / "again.img"
        repo.restore("vol", latest, target)
        assert target.read_bytes() == v2
        assert repo.verify(read_data=True).ok
    # Tables of contents come from the packs' tails: no pack is downloaded whole, and
    # the bytes read of packs are a small part of them (map nodes are read whole, being
    # in packs of their own).
    assert not [name for name in whole_reads if name in packs], whole_reads
    read_size = sum(length or 0 for _name, _offset, length in pack_reads)
    assert read_size < sum(packs.values()) // 10, (read_size, sum(packs.values()))
    # At most a few ranged reads per pack, plus the config, records and settings.
    assert rebuild_gets.get("GetObject", 0) <= 3 * len(packs) + 10, (rebuild_gets, len(packs))
    print(f"rebuild: {len(packs)} packs of {sum(packs.values())} bytes, {read_size} read")
    print(f"rebuild requests: {rebuild_gets}")


def test_s3_unknown_bucket_is_one_clear_error(s3_server: S3Server) -> None:
    with pytest.raises(StoreError, match="S3 bucket no-such-bucket does not exist"):
        s3_server.backend("p", bucket="no-such-bucket")


def test_s3_wrong_credentials_are_one_clear_error(s3_server: S3Server) -> None:
    with pytest.raises(StoreError, match=f"access denied to S3 bucket {S3_BUCKET}"):
        S3Backend(
            S3_BUCKET,
            "p",
            endpoint_url=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key="wrong-secret",
            region=s3_server.region,
        )


def test_s3_unreachable_endpoint_is_transient(s3_server: S3Server) -> None:
    """Nothing listens there: a connection refused is worth a retry, not a verdict."""
    with socket.socket() as bound:  # bound and not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(TransientStoreError, match="failed for now"):
            S3Backend(
                S3_BUCKET,
                "p",
                endpoint_url=f"http://127.0.0.1:{port}",
                access_key=s3_server.access_key,
                secret_key=s3_server.secret_key,
                region=s3_server.region,
                retry_attempts=1,  # botocore's backoff would only make the test slow
            )


def test_s3_credentials_from_the_environment(
    s3_server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)  # no profile of this host interferes
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    backend = S3Backend(S3_BUCKET, s3_prefix)
    try:
        backend.put("config", b"x")
        assert backend.get("config") == b"x"
    finally:
        backend.close()


# --- faults between the backend and the server ------------------------------------------


def _via(proxy: FaultProxy, server: S3Server, prefix: str, **kwargs: int) -> S3Backend:
    return server.backend(prefix, S3_BUCKET, kind=S3Backend, endpoint=proxy.endpoint, **kwargs)


def test_s3_slow_down_is_retried_then_transient(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str
) -> None:
    backend = _via(proxy, s3_server, s3_prefix)
    rule = proxy.inject("slow-down", request("PUT", "/config"), count=2)
    backend.put("config", b"data")  # botocore's own retries absorb two 503s
    assert rule.hits == 2 and backend.requests["PutObject"] == 3
    assert backend.get("config") == b"data"
    once = _via(proxy, s3_server, s3_prefix, retry_attempts=1)
    proxy.inject("slow-down", request("GET", "/config"))
    with pytest.raises(TransientStoreError, match="failed for now: SlowDown"):
        once.get("config")
    assert once.get("config") == b"data"


def test_s3_exclusive_put_whose_answer_was_lost_is_not_a_lost_race(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str
) -> None:
    """The first attempt stores the object and its answer is lost; botocore's retry
    then meets a 412 from our own object, which must not read as a race lost."""
    backend = _via(proxy, s3_server, s3_prefix)
    rule = proxy.inject("lose-answer", request("PUT", "/snapshots/s1"))
    backend.put("snapshots/s1", b"record", exclusive=True)
    assert rule.hits == 1 and backend.requests["PutObject"] == 2
    assert backend.get("snapshots/s1") == b"record"
    with pytest.raises(ObjectExistsError):  # another writer's bytes: a race lost
        backend.put("snapshots/s1", b"other", exclusive=True)
    proxy.inject("lose-answer", request("PUT", "/snapshots/s1"))
    with pytest.raises(ObjectExistsError):  # lost answer, but the object is not ours
        backend.put("snapshots/s1", b"other", exclusive=True)


def test_s3_exclusive_multipart_commit_whose_answer_was_lost_is_committed(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str
) -> None:
    backend = _via(proxy, s3_server, s3_prefix)
    data = os.urandom(backend.part_size + 1000)
    rule = proxy.inject("lose-answer", request("POST", "uploadId="))  # CompleteMultipartUpload
    out = backend.create("packs/ab/ab01", exclusive=True)
    out.write(data)
    out.commit()
    assert rule.hits == 1 and backend.requests["CompleteMultipartUpload"] >= 2
    assert backend.get("packs/ab/ab01") == data
    assert backend.leftovers() == []


def test_s3_abort_does_not_wait_for_a_stalled_part(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that holds a part (hung, or answering only after minutes of retries)
    holds neither the writer's abort beyond ABORT_WAIT nor the backend's close; when the
    part's answer comes at last, the upload is aborted once more, and nothing is left."""
    monkeypatch.setattr(s3, "ABORT_WAIT", 1.0)
    backend = _via(proxy, s3_server, s3_prefix)
    rule = proxy.inject("stall", request("PUT", "partNumber=2"))
    out = backend.create("packs/ef/ef01")
    out.write(os.urandom(backend.part_size * 2))  # part 1 goes up, part 2 stalls
    # Part 2 waits at the proxy, part 1 is through it (a stalled request is not counted
    # in flight): only part 2 can be late for the abort.
    assert until(lambda: rule.hits == 1 and proxy.in_flight == 0)
    # Without the bound, the abort would wait for this release.
    safety = threading.Timer(20, proxy.released.set)
    safety.start()
    try:
        started = time.monotonic()
        out.abort()
        aborted = time.monotonic() - started
        backend.close()
        closed = time.monotonic() - started
        assert aborted < 5 and closed < 5, (aborted, closed)
        assert not proxy.released.is_set()
        assert backend.requests["AbortMultipartUpload"] == 1
        proxy.released.set()  # the part is answered now: its writer aborts again
        assert until(lambda: backend.requests["AbortMultipartUpload"] == 2)
    finally:
        safety.cancel()
        proxy.released.set()
    assert backend.leftovers() == []
    with pytest.raises(MissingObjectError):
        backend.stat("packs/ef/ef01")


def test_s3_parts_go_up_together_and_a_failed_one_aborts_the_upload(
    proxy: FaultProxy, s3_server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts upload in the background, several at once, and land in order; a part that
    fails for good fails the writer's next call, and nothing is left: no object, no
    upload."""
    backend = _via(proxy, s3_server, s3_prefix, retry_attempts=1)
    size = backend.part_size
    data = os.urandom(size * 5 + 1234)
    out = backend.create("packs/cd/cd01")
    for offset in range(0, len(data), 1 << 20):  # as the pack writer hands it over
        out.write(data[offset : offset + (1 << 20)])
    out.commit()
    assert backend.get("packs/cd/cd01") == data
    assert backend.requests["UploadPart"] == 6
    proxy.latency = 0.2  # a far region: the parts are on their way together
    proxy.max_in_flight = 0
    out = backend.create("packs/cd/cd02")
    out.write(data)
    out.commit()
    proxy.latency = 0.0
    assert backend.get("packs/cd/cd02") == data
    assert proxy.max_in_flight >= 3

    rule = proxy.inject("slow-down", request("PUT", "partNumber=3"), count=100)
    out = backend.create("packs/cd/cd03")
    with pytest.raises(TransientStoreError, match="SlowDown"):
        for offset in range(0, len(data), 1 << 20):
            out.write(data[offset : offset + (1 << 20)])
        out.commit()
    assert rule.hits == 1
    with pytest.raises(StoreError, match="no longer being written"):
        out.write(b"more")
    out.abort()
    with pytest.raises(MissingObjectError):
        backend.stat("packs/cd/cd03")
    assert backend.leftovers() == []

    # A part that cannot even be handed to the threads (they were shut down) leaves no
    # gap in the parts: the upload is aborted at once.
    out = backend.create("packs/cd/cd04")
    out.write(data[:size])
    with monkeypatch.context() as patch:
        patch.setattr(backend, "_part_threads", lambda: (_ for _ in ()).throw(RuntimeError))
        with pytest.raises(RuntimeError):
            out.write(data[size : 2 * size])
    with pytest.raises(StoreError, match="no longer being written"):
        out.commit()
    with pytest.raises(MissingObjectError):
        backend.stat("packs/cd/cd04")
    assert backend.leftovers() == []
