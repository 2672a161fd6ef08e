"""A scale-out SeaweedFS (master, two volume servers with every write on both, filer, S3
gateway: tests/s3server.py WeedCluster) with one volume server killed during a snapshot.

While it is down, another host restores every committed snapshot byte-identical from the
surviving replicas, and reads a single file; the snapshot under way either commits or
fails with one line. Once the volume server is back, snapshots go on, verify --read-data
passes, and a host with an empty cache sees the same.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import BlocksnapError
from blocksnap.model import Progress, SnapshotInfo
from blocksnap.store import s3
from blocksnap.store.location import S3Options
from tests.conftest import debugfs
from tests.s3server import S3_BUCKET, SnapshotThread, WeedCluster, use_server, weed_cluster

PACK_TARGET_SIZE = 4 << 20  # bytes: many packs, so that the kill lands between them
KILLED = "volume1"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WeedCluster]:
    with weed_cluster(tmp_path / "cluster") as running:
        use_server(monkeypatch, running.server, endpoint=False)
        # A write to a volume that has lost a replica hangs in the gateway until the
        # client gives up on it; 10 s instead of a minute keeps the test short.
        monkeypatch.setattr(s3, "READ_TIMEOUT", 10.0)
        client = running.server.client()
        client.create_bucket(Bucket=S3_BUCKET)
        client.close()
        yield running


def _check(repo: blocksnap.Repository, expected: dict[str, bytes], tmp_path: Path) -> None:
    for snapshot_id, image in expected.items():
        target = tmp_path / f"check-{snapshot_id}.img"
        repo.restore("vol", snapshot_id, target)
        assert target.read_bytes() == image, snapshot_id
        target.unlink()


@pytest.mark.slow
def test_volume_server_killed_during_a_snapshot(
    cluster: WeedCluster, ext4_image: Path, tmp_path: Path
) -> None:
    url = f"s3://{S3_BUCKET}/repo"
    endpoint = cluster.server.endpoint
    host_a = S3Options(endpoint_url=endpoint, cache_dir=str(tmp_path / "host-a"))
    host_b = S3Options(endpoint_url=endpoint, cache_dir=str(tmp_path / "host-b"))
    expected: dict[str, bytes] = {}
    first_file = os.urandom(6 << 20)
    (tmp_path / "first.bin").write_bytes(first_file)
    with blocksnap.Repository.init(url, s3=host_a, pack_target_size=PACK_TARGET_SIZE) as repo:
        expected[repo.snapshot("vol", ext4_image).id] = ext4_image.read_bytes()
        debugfs(ext4_image, f"write {tmp_path / 'first.bin'} first.bin")
        expected[repo.snapshot("vol", ext4_image).id] = ext4_image.read_bytes()

    (tmp_path / "second.bin").write_bytes(os.urandom(12 << 20))
    debugfs(ext4_image, f"write {tmp_path / 'second.bin'} second.bin")
    third_image = ext4_image.read_bytes()
    killed = threading.Event()

    def kill_midway(p: Progress) -> None:
        if p.phase == "read" and p.done >= 4 << 20 and not killed.is_set():
            cluster.kill(KILLED)
            killed.set()

    writer = SnapshotThread(url, host_a, "vol", ext4_image, progress=kill_midway)
    writer.start()
    try:
        assert killed.wait(120), "the snapshot never got under way"
        # One volume server down: host B reads everything committed from the replicas.
        with blocksnap.Repository(url, s3=host_b) as repo:
            assert len(repo.snapshots("vol")) == 2
            _check(repo, expected, tmp_path)
            with repo.open_filesystem("vol", "latest") as fs, fs.open("/first.bin") as f:
                assert f.read() == first_file
    finally:
        cluster.start(KILLED)
        cluster.wait_for(WeedCluster.VOLUMES)
        writer.join(600)
    assert not writer.is_alive()
    with blocksnap.Repository(url, s3=host_a) as repo:
        result = writer.outcome
        assert isinstance(result, (SnapshotInfo, BlocksnapError)), result
        if isinstance(result, BlocksnapError):
            assert "\n" not in str(result)
            result = repo.snapshot("vol", ext4_image)  # done again, once the server is back
        expected[result.id] = third_image
        debugfs(ext4_image, "rm first.bin")
        expected[repo.snapshot("vol", ext4_image).id] = ext4_image.read_bytes()
        report = repo.verify(read_data=True)
        assert report.ok, report.problems
        _check(repo, expected, tmp_path)
    with blocksnap.Repository(url, s3=S3Options(endpoint, cache_dir=str(tmp_path / "new"))) as repo:
        assert {s.id for s in repo.snapshots("vol")} == set(expected)
        _check(repo, expected, tmp_path)
