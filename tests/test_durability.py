"""Crashes, concurrency and corruption: nothing committed is ever lost or returned wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

import blocksnap
from blocksnap.store.packs import pack_name
from tests.conftest import debugfs, run_cli

CHILD = """
import os, signal, sys, blocksnap
repo, volume, source, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls = 0
def progress(p):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
with blocksnap.Repository(repo) as r:
    r.snapshot(volume, source, progress=progress)
"""


def _snapshot_child(
    repo: Path, volume: str, source: Path, kill_at: int = 0
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(repo), volume, str(source), str(kill_at)],
        stderr=subprocess.PIPE,
    )


def _assert_consistent(repo_path: Path, expected: dict[str, bytes], tmp: Path) -> None:
    with blocksnap.Repository(repo_path) as r:
        report = r.verify(read_data=True)
        assert report.ok, report.problems
        for snap_id, data in expected.items():
            out = tmp / f"check-{snap_id}"
            r.restore("vol", snap_id, out)
            assert out.read_bytes() == data
            out.unlink()


def test_kill_9_at_many_moments_loses_nothing(tmp_path: Path, ext4_image: Path) -> None:
    repo_path = tmp_path / "repo"
    # Small packs, so that kills land between pack writes, index commits and the snapshot commit.
    blocksnap.Repository.init(repo_path, pack_target_size=1 << 20).close()
    expected: dict[str, bytes] = {}
    with blocksnap.Repository(repo_path) as r:
        expected[r.snapshot("vol", ext4_image).id] = ext4_image.read_bytes()
    moments = 0
    for round_ in range(4):
        debugfs(ext4_image, f"write /usr/share/common-licenses/GPL-3 round{round_}")
        # Deterministic moments: the Nth progress report (each buffer read, packs written).
        for kill_at in range(1, 8):
            child = _snapshot_child(repo_path, "vol", ext4_image, kill_at)
            child.wait(timeout=120)
            moments += child.returncode == -signal.SIGKILL
        # Timed moments: anywhere, including inside pack writes and LMDB transactions.
        for delay in (0.05, 0.15, 0.3):
            child = _snapshot_child(repo_path, "vol", ext4_image)
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=120)
            moments += child.returncode == -signal.SIGKILL
        _assert_consistent(repo_path, expected, tmp_path)
        with blocksnap.Repository(repo_path) as r:  # the next snapshot succeeds
            expected[r.snapshot("vol", ext4_image).id] = ext4_image.read_bytes()
    assert moments >= 20
    _assert_consistent(repo_path, expected, tmp_path)


def test_concurrent_writers_on_two_volumes(tmp_path: Path, ext4_image: Path) -> None:
    repo_path = tmp_path / "repo"
    blocksnap.Repository.init(repo_path).close()
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(24 << 20))
    children = [_snapshot_child(repo_path, "a", ext4_image), _snapshot_child(repo_path, "b", other)]
    for child in children:
        assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
    with blocksnap.Repository(repo_path) as r:
        assert sorted(r.volumes()) == ["a", "b"]
        assert r.verify(read_data=True).ok
        r.restore("b", "latest", tmp_path / "b.out")
    assert (tmp_path / "b.out").read_bytes() == other.read_bytes()


def test_second_snapshot_of_same_volume_is_refused(
    repo: blocksnap.Repository, ext4_image: Path
) -> None:
    with repo.store.lock_volume("vol"):  # as if another process were snapshotting it
        with pytest.raises(blocksnap.LockedError, match="already running"):
            repo.snapshot("vol", ext4_image)
        proc = run_cli("snapshot", repo.path, "vol", str(ext4_image))
        assert proc.returncode == blocksnap.LockedError.exit_code
        assert proc.stderr.count("\n") == 1 and "already running" in proc.stderr
    assert repo.snapshots("vol") == []


def test_restore_while_same_volume_is_being_written(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    image = tmp_path / "big.img"
    first = os.urandom(96 << 20)
    image.write_bytes(first)
    with blocksnap.Repository.init(repo_path) as r:
        r.snapshot("vol", image)
    with open(image, "r+b") as f:
        f.write(os.urandom(64 << 20))
    child = _snapshot_child(repo_path, "vol", image)
    with blocksnap.Repository(repo_path) as r:
        reads = 0
        while child.poll() is None or reads == 0:
            with r.open_image("vol", r.snapshots("vol")[0].id) as img:
                img.seek(reads * 4096)
                assert img.read(1 << 20) == first[reads * 4096 : reads * 4096 + (1 << 20)]
            reads += 1
        assert child.wait() == 0
        r.restore("vol", "latest~1", tmp_path / "old.img")
    assert (tmp_path / "old.img").read_bytes() == first


@pytest.fixture
def damaged_setup(tmp_path: Path, ext4_image: Path) -> tuple[Path, list[str]]:
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path, pack_target_size=2 << 20) as r:
        ids = [r.snapshot("vol", ext4_image).id]
        debugfs(ext4_image, "write /etc/services s2")
        ids.append(r.snapshot("vol", ext4_image).id)
        assert r.verify(read_data=True).ok
    return repo_path, ids


def _data_pack(repo_path: Path) -> tuple[Path, bytes]:
    """A pack that holds data blocks of the first snapshot, and one block id in it: the
    fullest data pack (the second snapshot's few new blocks fill one small pack)."""
    env = lmdb.open(str(repo_path / "index"), max_dbs=8, readonly=True, lock=False)
    objects = env.open_db(b"objects", create=False)
    blocks: dict[bytes, list[bytes]] = {}
    with env.begin() as txn:
        for key, value in txn.cursor(db=objects):
            if value[32] == 1:  # kind byte: a data block
                blocks.setdefault(bytes(value[:16]), []).append(bytes(key))
    env.close()
    if not blocks:
        raise AssertionError("no data pack")
    pack = max(blocks, key=lambda p: len(blocks[p]))
    return repo_path / pack_name(pack), blocks[pack][0]


def _verify_cli(repo_path: Path, *extra: str) -> tuple[int, str]:
    proc = run_cli("verify", str(repo_path), *extra)
    return proc.returncode, proc.stdout + proc.stderr


def test_flipped_byte_in_pack_is_detected_and_named(damaged_setup: tuple[Path, list[str]]) -> None:
    repo_path, ids = damaged_setup
    pack, _ = _data_pack(repo_path)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(data)
    rc, out = _verify_cli(repo_path, "--read-data")
    assert rc == blocksnap.IntegrityError.exit_code and "DAMAGE" in out and ids[0][:12] in out
    # Reading the image never returns wrong bytes.
    with blocksnap.Repository(repo_path) as r, pytest.raises(blocksnap.IntegrityError):
        r.restore("vol", ids[0], repo_path.parent / "x.img")
    assert not (repo_path.parent / "x.img").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_deleted_pack_is_detected(
    damage: str, damaged_setup: tuple[Path, list[str]]
) -> None:
    repo_path, ids = damaged_setup
    pack, _ = _data_pack(repo_path)
    if damage == "truncate":
        os.truncate(pack, pack.stat().st_size // 2)
    else:
        pack.unlink()
    rc, out = _verify_cli(repo_path)  # metadata verify is enough to see it
    assert rc == blocksnap.IntegrityError.exit_code
    assert ("truncated" if damage == "truncate" else "missing") in out
    assert f"vol@{ids[0][:12]}" in out


def test_damaged_index_entry_is_detected_and_repaired(
    damaged_setup: tuple[Path, list[str]],
) -> None:
    repo_path, ids = damaged_setup
    _, block_id = _data_pack(repo_path)
    env = lmdb.open(str(repo_path / "index"), max_dbs=8)
    objects = env.open_db(b"objects")
    with env.begin(write=True) as txn:
        raw = txn.get(block_id, db=objects)
        assert raw is not None
        value = bytearray(raw)
        value[20] ^= 0xFF  # the offset field
        txn.put(block_id, bytes(value), db=objects)
        victim = next(k for k, _ in txn.cursor(db=objects) if k != block_id)
        txn.delete(victim, db=objects)
    env.close()
    rc, out = _verify_cli(repo_path)
    assert rc == blocksnap.IntegrityError.exit_code and "damaged" in out
    proc = run_cli("repair", str(repo_path), "--rebuild-index")
    assert proc.returncode == 0, proc.stderr
    rc, out = _verify_cli(repo_path, "--read-data")
    assert rc == 0, out
    with blocksnap.Repository(repo_path) as r:
        assert [s.id for s in r.snapshots("vol")] == ids


def test_index_lost_entirely_is_rebuilt_from_packs(
    damaged_setup: tuple[Path, list[str]], tmp_path: Path
) -> None:
    repo_path, ids = damaged_setup
    with blocksnap.Repository(repo_path) as r:
        r.restore("vol", ids[1], tmp_path / "before.img")
    for f in (repo_path / "index").iterdir():
        f.unlink()
    (repo_path / "index").rmdir()
    blocksnap.repair_index(repo_path)
    with blocksnap.Repository(repo_path) as r:
        assert [s.id for s in r.snapshots("vol")] == ids
        r.restore("vol", "latest", tmp_path / "after.img")
        assert r.verify(read_data=True).ok
    assert (tmp_path / "after.img").read_bytes() == (tmp_path / "before.img").read_bytes()
