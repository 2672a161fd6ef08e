"""Garbage collection: exact reference counts, compaction, the writer registry, recovery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

import blocksnap
from blocksnap.blockmap import BlockMap
from blocksnap.retention import Policy
from blocksnap.store import catalog
from blocksnap.store.backend import LocalBackend
from tests.conftest import debugfs, run_cli

EDITS = [
    ["write /usr/share/common-licenses/GPL-3 gpl", "rm data/blob0.bin"],
    ["rm data/blob2.bin", "write /etc/services docs/services"],
    ["rm data/blob3.bin", "rm data/blob4.bin", "write /etc/passwd passwd"],
]


def chain(repo: blocksnap.Repository, image: Path) -> list[tuple[blocksnap.SnapshotInfo, bytes]]:
    out = [(repo.snapshot("vol", image), image.read_bytes())]
    for commands in EDITS:
        debugfs(image, *commands)
        out.append((repo.snapshot("vol", image), image.read_bytes()))
    return out


def restores(repo: blocksnap.Repository, snapshot: str, data: bytes, tmp: Path) -> bool:
    target = tmp / "check.img"
    target.unlink(missing_ok=True)
    repo.restore("vol", snapshot, target)
    return target.read_bytes() == data


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "packs").rglob("*") if f.is_file())


def assert_clean(repo: blocksnap.Repository) -> None:
    report = repo.verify(read_data=True)
    assert report.ok, report.problems
    assert report.unreferenced_objects == 0
    assert repo.store.index.unreferenced_count() == 0
    on_disk = {o.name for o in repo.store.backend.list("packs/")}
    assert len(on_disk) == len(repo.store.index.pack_infos())


def test_gc_frees_what_pruned_snapshots_alone_held(tmp_path: Path, ext4_image: Path) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=1 << 20) as repo:
        versions = chain(repo, ext4_image)
        before = stored_bytes(tmp_path / "repo")
        assert repo.gc().objects_deleted == 0  # nothing is garbage yet
        repo.prune(policy=Policy(keep_last=1))
        report = repo.gc(compact_below=0.9)
        assert report.objects_deleted > 0 and report.bytes_freed > 0
        assert report.packs_deleted > 0
        assert stored_bytes(tmp_path / "repo") == before - report.bytes_freed
        info, data = versions[-1]
        assert restores(repo, info.id, data, tmp_path)
        assert_clean(repo)
        # A second run finds nothing more to do.
        again = repo.gc(compact_below=0.9)
        assert (again.objects_deleted, again.packs_deleted, again.bytes_freed) == (0, 0, 0)


def test_compaction_moves_live_records_and_readers_follow(tmp_path: Path, ext4_image: Path) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=4 << 20) as repo:
        versions = chain(repo, ext4_image)
        latest, data = versions[-1]
        reader = repo.open_image("vol", latest.id)
        reader.read(1 << 20)  # warm: locations are looked up again for each block
        repo.prune(policy=Policy(keep_last=1))
        report = repo.gc(compact_below=1.0)  # every pack with any garbage is rewritten
        assert report.packs_compacted > 0 and report.bytes_copied > 0
        reader.seek(0)
        assert reader.read() == data
        reader.close()
        assert restores(repo, latest.id, data, tmp_path)
        assert_clean(repo)


def test_a_reader_retries_once_when_the_pack_moved_under_it(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=1 << 20) as repo:
        versions = chain(repo, ext4_image)
        latest, data = versions[-1]
        store = repo.store
        block_map = BlockMap(
            store.read_node, latest.map_root, latest.map_height, latest.block_count
        )
        ids = b"".join(block_map.leaf(i)[1] for i in range(block_map.leaf_count()))
        before = {
            ids[i : i + 32]: store.index.location(ids[i : i + 32]) for i in range(0, len(ids), 32)
        }
        repo.prune(policy=Policy(keep_last=1))
        assert repo.gc(compact_below=1.0).packs_compacted > 0
        first_id = next(i for i, loc in before.items() if loc and store.index.location(i) != loc)
        stale = {first_id: before[first_id]}
        real = store.index.locations
        calls = []

        def lookup(object_ids: list[bytes], *, strict: bool = False) -> object:
            calls.append(object_ids)
            if len(calls) == 1:
                return [stale[i] for i in object_ids]
            return real(object_ids, strict=strict)

        assert isinstance(store.backend, LocalBackend)
        store.backend.close()  # no cached descriptor keeps the deleted pack readable
        monkeypatch.setattr(store.index, "locations", lookup)
        assert store.read_block(first_id)
        assert calls == [[first_id]] * 2  # looked up, found the pack gone, looked up again
        monkeypatch.setattr(store.index, "locations", real)
        assert restores(repo, latest.id, data, tmp_path)


def test_a_synthetic_full_outlives_every_older_snapshot(tmp_path: Path, ext4_image: Path) -> None:
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        versions = chain(repo, ext4_image)
        # A synthetic full carries its source's time, so it is made from the newest
        # snapshot: it ties on time and wins as the later commit, whichever second the
        # chain's snapshots fell in.
        synthetic = repo.synthesize("vol", versions[-1][0].id)
        repo.prune(policy=Policy(keep_last=1))
        assert [s.id for s in repo.snapshots("vol")] == [synthetic.id]
        assert repo.gc().objects_deleted > 0
        assert restores(repo, synthetic.id, versions[-1][1], tmp_path)
        assert_clean(repo)


def test_a_running_writer_keeps_what_it_may_refer_to(tmp_path: Path, ext4_image: Path) -> None:
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        store = repo.store
        chain(repo, ext4_image)
        block = os.urandom(64 << 10)
        block_id = store.hash(block)
        old = repo.snapshots("vol")[0]
        old_root = old.map_root

        with store.writer() as writer:
            writer.add(writer.seal_block(block, block_id))
            writer.flush()  # stored and indexed, not referred to by any snapshot
            repo.prune(policy=Policy(keep_last=1))  # the old root's count falls to 0 now
            report = repo.gc()
            assert report.live_writers == 1 and report.unreferenced_left > 0
            # Both survive: the writer may refer to them.
            assert store.index.location(block_id) is not None
            assert store.index.location(old_root) is not None
            assert writer.missing([block_id, old_root]) == [False, False]
        with store.writer() as later:
            # Both were unreferenced before this writer started, so gc may take them at
            # any moment; asking for them revives them (their epoch moves to now), after
            # which gc keeps them for this writer too.
            assert later.missing([block_id, old_root]) == [False, False]
            live_root = repo.snapshots("vol")[-1].map_root
            assert later.missing([live_root]) == [False]
            assert repo.gc().unreferenced_left > 0
            assert store.index.location(block_id) is not None
            assert store.index.location(old_root) is not None
        # Once no writer may refer to them, gc takes them ...
        report = repo.gc()
        assert store.index.location(block_id) is None
        assert store.index.location(old_root) is None
        assert report.live_writers == 0
        assert_clean(repo)
        # ... and a writer that asks after that must store them again.
        with store.writer() as last:
            assert last.missing([block_id, old_root]) == [True, True]


def test_gc_cleans_up_after_a_killed_snapshot(tmp_path: Path, ext4_image: Path) -> None:
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path, pack_target_size=1 << 20) as repo:
        repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, *EDITS[0])
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    proc = subprocess.Popen(
        [sys.executable, "-m", "blocksnap", "snapshot", str(repo_path), "big", str(big)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill it once it has stored some packs, well before it could commit.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((repo_path / "packs").rglob("*"))) < 40:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with blocksnap.Repository(repo_path) as repo:
        assert repo.volumes() == ["vol"]
        report = repo.gc()
        assert report.dead_writers == 1
        assert report.objects_deleted > 0
        assert not list((repo_path / "locks").glob("writer-*"))
        assert not [p for p in (repo_path / "packs").rglob("*") if ".tmp-" in p.name]
        assert_clean(repo)


def test_gc_full_indexes_and_frees_packs_no_writer_or_snapshot_has(
    tmp_path: Path, ext4_image: Path
) -> None:
    """A copy of a repository taken while a snapshot was being written holds its packs
    but neither its record nor its writer: steady gc never sees them, gc --full does."""
    source, copy = tmp_path / "source", tmp_path / "copy"
    with blocksnap.Repository.init(source) as repo:
        kept = repo.snapshot("vol", ext4_image)
    shutil.copytree(source, copy)
    before = {p.relative_to(source) for p in (source / "packs").rglob("*") if p.is_file()}
    noise = tmp_path / "noise.img"
    noise.write_bytes(os.urandom(8 << 20))
    with blocksnap.Repository(source) as repo:
        repo.snapshot("other", noise)
    strays = {p.relative_to(source) for p in (source / "packs").rglob("*") if p.is_file()} - before
    assert strays
    for rel in strays:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, copy / rel)
    # A record that cannot be read might name them: nothing is reconciled while it stands.
    damaged = copy / "snapshots" / ("ab" * 16)
    damaged.write_bytes(b"not a record")
    with blocksnap.Repository(copy) as repo:
        steady = repo.gc()
        assert steady.packs_deleted == 0
        assert all((copy / rel).exists() for rel in strays)
        skipped = repo.gc(full=True)
        assert any("reconciliation was skipped" in p for p in skipped.problems), skipped
        assert skipped.orphan_packs == 0
        assert all((copy / rel).exists() for rel in strays)
    damaged.unlink()
    # A damaged policy names no packs: it is reported, and holds nothing back.
    policy = copy / catalog.policy_name("ghost")
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_bytes(b"not a policy")
    with blocksnap.Repository(copy) as repo:
        report = repo.gc(full=True)
        assert len(report.problems) == 1 and "policy" in report.problems[0], report.problems
        assert report.orphan_packs == len(strays) and report.objects_deleted > 0
        assert not any((copy / rel).exists() for rel in strays)
        assert repo.volumes() == ["vol"]
        policy.unlink()  # verify names it too
        assert_clean(repo)
        target = tmp_path / "restored.img"
        repo.restore("vol", kept.id, target)
        assert target.read_bytes() == ext4_image.read_bytes()


def test_verify_reports_count_drift_and_rebuild_recounts(tmp_path: Path, ext4_image: Path) -> None:
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path) as repo:
        versions = chain(repo, ext4_image)
        repo.set_policy("vol", Policy(keep_daily=3))
        repo.protect("vol", versions[0][0].id)
        root = versions[-1][0].map_root
        index = repo.store.index
        with index.env.begin(write=True) as txn:  # simulate a lost increment
            value = txn.get(root, db=index.refs)
            assert value is not None
            txn.put(root, (int.from_bytes(value[:4], "little") + 1).to_bytes(4, "little")
                    + value[4:], db=index.refs)  # fmt: skip
        report = repo.verify()
        assert not report.ok
        assert any("reference count drift" in p.message for p in report.problems)
    blocksnap.repair_index(repo_path)
    with blocksnap.Repository(repo_path) as repo:
        assert repo.verify().ok
        assert repo.policy("vol") == Policy(keep_daily=3)
        assert repo.protected() == {versions[0][0].id}
        for info, data in versions:
            assert restores(repo, info.id, data, tmp_path)


def test_an_old_index_format_is_refused_with_a_way_out(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    blocksnap.Repository.init(repo_path).close()
    env = lmdb.open(str(repo_path / "index"), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"1", db=env.open_db(b"meta", txn=txn))
    env.close()
    proc = run_cli("list", str(repo_path))
    assert proc.returncode == 5 and "rebuild-index" in proc.stderr
    assert run_cli("repair", str(repo_path), "--rebuild-index").returncode == 0
    assert run_cli("list", str(repo_path)).returncode == 0
