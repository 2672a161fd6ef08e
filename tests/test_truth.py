"""The objects are the truth: a snapshot exists from its record object's creation until its
tombstone, whatever the index says or misses, and a rebuilt index answers as the old one."""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from blocksnap.errors import TransientStoreError
from blocksnap.model import SnapshotInfo
from blocksnap.store import catalog
from blocksnap.store.backend import LocalBackend
from blocksnap.store.index import Index
from blocksnap.store.repository import local_backend
from tests.faults import FaultyBackend

from .conftest import debugfs, flip, run_cli

PAST = (
    datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
    datetime.datetime(2019, 6, 1, tzinfo=datetime.UTC),
)


def _die(*_args: Any, **_kwargs: Any) -> None:
    os._exit(137)  # as kill -9 would: no cleanup, no unwinding


def _child(path: str, image: str, action: str) -> None:
    patch = pytest.MonkeyPatch()
    if action == "commit-after-record":
        patch.setattr(Index, "commit_snapshot", _die)
    elif action == "commit-before-record":
        real_put = LocalBackend.put

        def put(self: LocalBackend, name: str, data: bytes, **kw: Any) -> None:
            if name.startswith("snapshots/"):
                _die()
            real_put(self, name, data, **kw)

        patch.setattr(LocalBackend, "put", put)
    elif action == "prune-after-tombstone":
        patch.setattr(Index, "remove_snapshot", _die)
    elif action == "prune-before-record-delete":
        real_delete = LocalBackend.delete

        def delete(self: LocalBackend, name: str) -> None:
            if name.startswith("snapshots/"):
                _die()
            real_delete(self, name)

        patch.setattr(LocalBackend, "delete", delete)
    with blocksnap.Repository(path) as repo:
        if action.startswith("commit"):
            repo.snapshot("vol", image, checkpoint_size=8 << 20)
        else:
            repo.prune(policy=blocksnap.Policy(keep_last=1))
    os._exit(0)


def killed(path: Path, image: Path, action: str) -> None:
    """Run one operation in a child process that dies at the named moment."""
    proc = multiprocessing.get_context("fork").Process(
        target=_child, args=(str(path), str(image), action)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == 137


def ids(repo: blocksnap.Repository) -> list[str]:
    return [s.id for s in repo.snapshots("vol")]


def records(path: Path) -> set[str]:
    return {p.name for p in (path / "snapshots").iterdir()}


def two_snapshots(tmp_path: Path, image: Path) -> tuple[Path, SnapshotInfo, SnapshotInfo]:
    """A repository holding an incremental and a full of the image, oldest first."""
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        return path, repo.snapshot("vol", image), repo.snapshot("vol", image, full=True)


def rebuilt(path: Path) -> list[str]:
    shutil.rmtree(path / "index")
    with blocksnap.Repository(path) as repo:  # rebuilt automatically
        report = repo.verify()
        assert report.ok, report.problems
        return ids(repo)


def test_a_snapshot_killed_after_its_record_is_committed(tmp_path: Path, ext4_image: Path) -> None:
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, "mkdir killed-after-record")
    killed(path, ext4_image, "commit-after-record")
    (second,) = records(path) - {first.id}
    index = Index(str(path / "index"), readonly=True)
    try:
        assert index.cached_snapshot_ids() == {first.id}  # the cache lags behind ...
    finally:
        index.close()
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [first.id, second]  # ... until the repository is opened
        third = repo.snapshot("vol", ext4_image)
        assert ids(repo) == [first.id, second, third.id]
        assert third.parent == second  # the next incremental compares with it
        assert repo.gc().dead_writers == 1
        report = repo.verify(read_data=True)
        assert report.ok and not report.leftovers, (report.problems, report.leftovers)
        latest = repo.resolve("vol", "latest~1").id
    assert latest == second
    assert rebuilt(path) == [first.id, second, third.id]


def test_a_snapshot_killed_before_its_record_never_appears(
    tmp_path: Path, ext4_image: Path
) -> None:
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
    killed(path, ext4_image, "commit-before-record")
    assert records(path) == {first.id}
    with blocksnap.Repository(path) as repo:
        assert repo.gc().dead_writers == 1
    blocksnap.repair_index(path)
    assert rebuilt(path) == [first.id]


def test_a_prune_killed_after_its_tombstone_never_comes_back(
    tmp_path: Path, ext4_image: Path
) -> None:
    path, old, new = two_snapshots(tmp_path, ext4_image)
    killed(path, ext4_image, "prune-after-tombstone")
    assert (path / "tombstones" / old.id).exists()
    # A rebuild straight away (the index still names the snapshot) leaves it out.
    blocksnap.repair_index(path)
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [new.id]
        repo.gc()
        assert records(path) == {new.id}
        report = repo.verify()
        assert report.ok and not report.leftovers, (report.problems, report.leftovers)
    assert rebuilt(path) == [new.id]


def test_a_prune_killed_after_its_tombstone_is_finished_by_gc(
    tmp_path: Path, ext4_image: Path
) -> None:
    path, old, new = two_snapshots(tmp_path, ext4_image)
    killed(path, ext4_image, "prune-after-tombstone")
    with blocksnap.Repository(path) as repo:
        with pytest.raises(blocksnap.errors.NotFoundError):
            repo.protect("vol", old.id)  # removed, though the index did not hear of it
        report = repo.gc()
        assert report.dead_writers == 1
        assert ids(repo) == [new.id]
        assert records(path) == {new.id}
        assert repo.verify().ok
    assert rebuilt(path) == [new.id]


def test_a_listing_that_lags_behind_a_removal_brings_nothing_back(
    tmp_path: Path, ext4_image: Path
) -> None:
    """The prune died after uncaching the snapshot, before deleting its record; the
    listing the next sync sees does not show the tombstone yet."""
    path, old, new = two_snapshots(tmp_path, ext4_image)
    killed(path, ext4_image, "prune-before-record-delete")
    assert records(path) == {old.id, new.id}
    lagging = FaultyBackend(local_backend(str(path)), stale_list=1)  # hides the tombstone
    assert [o.name for o in lagging.list("tombstones/")] == []
    with blocksnap.Repository(path, backend=lagging) as repo:
        assert ids(repo) == [new.id]
        repo.store.sync_catalog()
        assert ids(repo) == [new.id]
    blocksnap.repair_index(path)
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [new.id]
        repo.gc()
    assert records(path) == {new.id}


def test_a_protection_whose_index_step_was_lost_still_protects(
    tmp_path: Path, ext4_image: Path
) -> None:
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        old = repo.snapshot("vol", ext4_image)
        repo.snapshot("vol", ext4_image, full=True)
        # protect killed between its object and its index step
        repo.store.backend.put(catalog.protected_name(old.id), catalog.encode_protected(old.id))
        assert old.id not in repo.protected()
        report = repo.prune(policy=blocksnap.Policy(keep_last=1))
        assert report.removed == []
        assert old.id in ids(repo)
    blocksnap.repair_index(path)
    with blocksnap.Repository(path) as repo:
        assert old.id in repo.protected()


def test_snapshot_order_comes_from_the_records(tmp_path: Path, ext4_image: Path) -> None:
    """An import stamped in the past is still the latest: order is commit order, kept in
    the records, not start time."""
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        a = repo.snapshot("vol", ext4_image)
        debugfs(ext4_image, "mkdir b")
        b = repo.snapshot("vol", ext4_image, taken_at=PAST[0])
        debugfs(ext4_image, "mkdir c")
        c = repo.snapshot("vol", ext4_image, taken_at=PAST[1])
        assert ids(repo) == [a.id, b.id, c.id]
        seqs = [
            json.loads(
                catalog.unframe(catalog.SNAPSHOT_MAGIC, (path / "snapshots" / s).read_bytes(), s)
            )["seq"]
            for s in ids(repo)
        ]
        assert seqs == [1, 2, 3]
    assert rebuilt(path) == [a.id, b.id, c.id]
    with blocksnap.Repository(path) as repo:
        assert repo.resolve("vol", "latest").id == c.id
        d = repo.snapshot("vol", ext4_image)
        assert d.parent == c.id


def _flip_record(path: Path, snapshot_id: str) -> None:
    flip(path / "snapshots" / snapshot_id, 60)


def _delete_record(path: Path, snapshot_id: str) -> None:
    (path / "snapshots" / snapshot_id).unlink()


@pytest.mark.parametrize("damage", [_flip_record, _delete_record], ids=["flipped", "deleted"])
def test_a_damaged_record_object_is_reported_and_written_again_by_repair(
    tmp_path: Path, ext4_image: Path, damage: Callable[[Path, str], None]
) -> None:
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
        second = repo.snapshot("vol", ext4_image)
    original = (path / "snapshots" / first.id).read_bytes()
    damage(path, first.id)
    proc = run_cli("verify", str(path), "--read-data")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert f"snapshots/{first.id}" in proc.stdout + proc.stderr
    proc = run_cli("repair", str(path), "--rebuild-index")
    assert proc.returncode == 0, proc.stderr
    assert "restored:" in proc.stdout
    assert (path / "snapshots" / first.id).read_bytes() == original
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [first.id, second.id]
        assert repo.verify(read_data=True).ok


def test_a_damaged_record_with_no_other_copy_is_reported_by_repair(
    tmp_path: Path, ext4_image: Path
) -> None:
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
        second = repo.snapshot("vol", ext4_image)
    _flip_record(path, first.id)
    shutil.rmtree(path / "index")
    proc = run_cli("repair", str(path), "--rebuild-index")
    assert proc.returncode == 0, proc.stderr
    assert f"left out: snapshots/{first.id}" in proc.stdout
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [second.id]


def test_gc_and_verify_work_after_a_repair_that_follows_prune_and_gc(tmp_path: Path) -> None:
    """A map node gc collected stays in its pack until compaction; a rebuild must not
    index it again, or count the children gc took with it."""
    path = tmp_path / "repo"
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(64 << 20))  # four leaves under one interior node
    with blocksnap.Repository.init(path) as repo:
        repo.snapshot("vol", image)
        with open(image, "r+b") as f:
            f.write(os.urandom(48 << 20))  # new first three leaves, and root
        keep = repo.snapshot("vol", image)
        repo.prune(policy=blocksnap.Policy(keep_last=1))
        # The packs of the old blocks empty and go; the old nodes stay, dead, in the
        # node pack that the fourth leaf keeps (nothing is compacted).
        collected = repo.gc(compact_below=0.0)
        assert collected.objects_deleted > 700 and collected.packs_deleted >= 2
    blocksnap.repair_index(path)
    with blocksnap.Repository(path) as repo:
        report = repo.verify(read_data=True)
        assert report.ok, report.problems
        repo.gc()
        repo.gc(compact_below=1.0)
        report = repo.verify(read_data=True)
        assert report.ok, report.problems
        assert ids(repo) == [keep.id]
    blocksnap.repair_index(path)
    with blocksnap.Repository(path) as repo:
        assert repo.verify(read_data=True).ok
        assert repo.restore("vol", "latest", tmp_path / "out.img").image_size == 64 << 20
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("left", ["index.rebuild", "index.old"])
def test_verify_reports_what_an_interrupted_repair_left(tmp_path: Path, left: str) -> None:
    path = tmp_path / "repo"
    blocksnap.Repository.init(path).close()
    (path / left).mkdir()
    (path / left / "data.mdb").write_bytes(b"")
    with blocksnap.Repository(path) as repo:
        report = repo.verify()
    assert report.ok
    assert any(item.startswith(left) for item in report.leftovers), report.leftovers
    blocksnap.repair_index(path)
    assert not (path / left).exists()


def _answers(path: Path) -> dict[str, Any]:
    """What the reading commands say about a repository, as a user sees it."""

    def cli(*args: str) -> Any:
        proc = run_cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        return json.loads(proc.stdout) if "--json" in args else proc.stdout

    out: dict[str, Any] = {}
    repo = str(path)
    for volume in ("vol", "other"):
        out[f"list {volume}"] = cli("list", "--json", repo, volume)
        count = len(out[f"list {volume}"][volume])
        for back in range(count):
            out[f"info {volume} latest~{back}"] = cli(
                "info", "--json", repo, volume, f"latest~{back}"
            )
        out[f"policy {volume}"] = cli("policy", "--json", repo, volume)
    out["stats"] = cli("stats", "--json", repo)
    verify = cli("verify", "--json", "--read-data", repo)
    verify.pop("bytes_read", None)
    out["verify"] = verify
    return out


def test_a_rebuilt_index_answers_as_the_one_it_replaces(tmp_path: Path, ext4_image: Path) -> None:
    """Snapshots, imports stamped in the past, differentials, a synthetic full, prunes,
    protections, policies and gc; then the index is deleted (rebuilt automatically by
    the next command) and rebuilt explicitly: every answer is the same."""
    path = tmp_path / "repo"
    repo = str(path)

    def cli(*args: str) -> None:
        proc = run_cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)

    cli("init", repo)
    cli("snapshot", repo, "vol", str(ext4_image))
    for day in range(1, 7):
        debugfs(ext4_image, f"mkdir day{day}")
        when = ["--time", f"2026-0{1 + day % 3}-1{day}T06:00:00Z"] if day % 2 else []
        kind = ["--differential"] if day == 3 else ["--full"] if day == 5 else []
        cli("snapshot", repo, "vol", str(ext4_image), *when, *kind)
    cli("synthesize", repo, "vol", "latest~2")
    cli("snapshot", repo, "other", str(ext4_image), "--label", "site=b")
    cli("snapshot", repo, "other", str(ext4_image), "--time", "2025-12-24T00:00:00Z")
    cli("protect", repo, "vol", "latest~6")
    cli("policy", repo, "vol", "--keep-last", "4")
    cli("policy", repo, "other", "--keep-within", "14d")
    cli("prune", repo)
    cli("gc", repo)
    cli("snapshot", repo, "vol", str(ext4_image))
    before = _answers(path)
    assert len(before["list vol"]["vol"]) == 6  # 4 kept, 1 protected, 1 new
    shutil.rmtree(path / "index")
    assert _answers(path) == before
    cli("repair", repo, "--rebuild-index")
    assert _answers(path) == before
    cli("gc", repo)
    cli("snapshot", repo, "vol", str(ext4_image))
    cli("verify", repo, "--read-data")


def test_a_damaged_record_the_index_lacks_is_damage(tmp_path: Path, ext4_image: Path) -> None:
    """A record that commits a snapshot no index knows, damaged before any sync read it:
    the snapshot cannot be listed, and verify says so (exit 5) rather than nothing."""
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
    killed(path, ext4_image, "commit-after-record")
    (second,) = records(path) - {first.id}
    _flip_record(path, second)
    proc = run_cli("verify", str(path))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert f"snapshots/{second}" in proc.stdout
    proc = run_cli("gc", str(path))
    assert proc.returncode == 5 and f"snapshot {second} cannot be indexed" in proc.stdout


def test_a_removal_whose_writer_left_without_its_intents_is_ended(
    tmp_path: Path, ext4_image: Path
) -> None:
    """A removal mark that outlived its writer (its tombstone never written, its intents
    gone) would make the snapshot unprotectable for ever: gc calls it off, and so does a
    protect that finds the writer's session dead."""
    path, old, new = two_snapshots(tmp_path, ext4_image)
    gone = bytes(16)  # a writer that is not registered, and not alive
    with blocksnap.Repository(path) as repo:
        index = repo.store.index
        assert index.mark_removing(old.id, gone, gone + b"tombstones/" + old.id.encode())
        repo.gc()
        assert index.removing() == {}
        assert index.mark_removing(old.id, gone, gone + b"tombstones/" + old.id.encode())
        repo.protect("vol", old.id)
        assert index.removing() == {}
        assert ids(repo) == [old.id, new.id] and old.id in repo.protected()
        with repo.store.register() as prune:  # a live prune's mark is left alone
            assert index.mark_removing(new.id, prune.id, prune.intent("tombstones/x"))
            with pytest.raises(blocksnap.errors.LockedError, match="being removed"):
                repo.protect("vol", new.id)
            repo.gc()
            assert index.removing() == {new.id: prune.id}


def test_a_commit_killed_after_its_record_drops_its_runs_checkpoint(
    tmp_path: Path, ext4_image: Path
) -> None:
    """The run checkpointed, committed and died before its index step: once its snapshot
    is taken in, its checkpoint is gone too, so --resume cannot commit the run twice."""
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, "mkdir again")
    killed(path, ext4_image, "commit-after-record")
    index = Index(str(path / "index"), readonly=True)
    try:
        assert index.checkpoint("vol") is not None  # the run's, left by the kill
    finally:
        index.close()
    with blocksnap.Repository(path) as repo:
        (second,) = set(ids(repo)) - {first.id}
        assert repo.checkpoint("vol") is None
        again = repo.snapshot("vol", ext4_image, resume=True)
        assert again.parent == second and again.counts.resumed == 0


def test_gc_collects_nothing_while_a_committed_snapshot_cannot_be_indexed(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer died after its record; storage fails each read of that record for a
    while.  Its blocks are at count 0 in the index meanwhile: gc must keep them (and the
    dead writer, whose epoch protects them) until the snapshot is indexed."""
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, "mkdir changed")
    image = ext4_image.read_bytes()
    killed(path, ext4_image, "commit-after-record")
    (second,) = records(path) - {first.id}
    real_get = LocalBackend.get

    def failing_get(self: LocalBackend, name: str, *args: Any) -> bytes:
        if name == f"snapshots/{second}":
            raise TransientStoreError(f"{name}: connection reset")
        return real_get(self, name, *args)

    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "get", failing_get)
        with blocksnap.Repository(path) as repo:
            assert ids(repo) == [first.id]
            report = repo.gc()
            assert report.objects_deleted == 0
            assert any("nothing was collected" in p for p in report.problems), report.problems
            assert repo.gc().dead_writers == 1  # still registered
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [first.id, second]
        report = repo.gc()
        assert not report.problems and report.dead_writers == 1
        repo.restore("vol", second, tmp_path / "out.img")
        assert repo.verify(read_data=True).ok
    assert (tmp_path / "out.img").read_bytes() == image


def test_repair_takes_nothing_from_another_repositorys_index(
    tmp_path: Path, ext4_image: Path
) -> None:
    path, _old, _new = two_snapshots(tmp_path, ext4_image)
    other = tmp_path / "other"
    with blocksnap.Repository.init(other) as repo:
        foreign = repo.snapshot("vol", ext4_image)
    shutil.rmtree(path / "index")
    shutil.copytree(other / "index", path / "index")
    proc = run_cli("list", str(path))
    assert proc.returncode == 5 and "another repository" in proc.stderr
    report = blocksnap.repair_index(path)
    assert not report.restored
    assert foreign.id not in records(path)
    with blocksnap.Repository(path) as repo:
        assert foreign.id not in ids(repo) and len(ids(repo)) == 2
        assert repo.verify().ok


def test_repair_with_a_listing_that_misses_a_record_keeps_the_snapshot(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, old, new = two_snapshots(tmp_path, ext4_image)
    real_list = LocalBackend.list

    def lagging(self: LocalBackend, prefix: str = "") -> Any:
        return [o for o in real_list(self, prefix) if not o.name.endswith(new.id)]

    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "list", lagging)
        report = blocksnap.repair_index(path)
    assert report.snapshots == 2 and not report.restored, report
    with blocksnap.Repository(path) as repo:
        assert ids(repo) == [old.id, new.id]
        repo.gc()
        assert repo.verify(read_data=True).ok


def test_settings_follow_their_objects(tmp_path: Path, ext4_image: Path) -> None:
    """A policy or protection change killed between its object and its index step: the
    object wins when the repository is next opened, and after a rebuild the same."""
    path, old, _new = two_snapshots(tmp_path, ext4_image)
    backend = local_backend(str(path))
    policy: dict[str, object] = {"keep_last": 9}
    backend.put(catalog.policy_name("vol"), catalog.encode_policy("vol", policy))
    backend.put(catalog.protected_name(old.id), catalog.encode_protected(old.id))
    with blocksnap.Repository(path) as repo:
        saved = repo.policy("vol")
        assert saved is not None and saved.to_dict() == blocksnap.Policy(keep_last=9).to_dict()
        assert old.id in repo.protected()
    backend.delete(catalog.policy_name("vol"))
    backend.delete(catalog.protected_name(old.id))
    with blocksnap.Repository(path) as repo:
        assert repo.policy("vol") is None and not repo.protected()
    shutil.rmtree(path / "index")
    with blocksnap.Repository(path) as repo:
        assert repo.policy("vol") is None and not repo.protected()


def test_damaged_settings_are_reported_and_written_again(tmp_path: Path, ext4_image: Path) -> None:
    path, old, _new = two_snapshots(tmp_path, ext4_image)
    assert run_cli("policy", str(path), "vol", "--keep-last", "3").returncode == 0
    assert run_cli("protect", str(path), "vol", old.id).returncode == 0
    settings = sorted((path / "settings").iterdir())
    originals = {p: p.read_bytes() for p in settings}
    for p in settings:
        flip(p, p.stat().st_size - 3)
    proc = run_cli("verify", str(path))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert proc.stdout.count("setting object) is damaged") == 2, proc.stdout
    proc = run_cli("repair", str(path), "--rebuild-index")
    assert proc.returncode == 0 and proc.stdout.count("restored:") == 2, proc.stdout
    assert {p: p.read_bytes() for p in settings} == originals
    with blocksnap.Repository(path) as repo:
        saved = repo.policy("vol")
        assert saved is not None and saved.to_dict() == blocksnap.Policy(keep_last=3).to_dict()
        assert repo.protected() == {old.id}
        assert repo.verify().ok


def test_a_record_whose_root_is_gone_is_reported_and_does_not_stop_gc(
    tmp_path: Path, ext4_image: Path
) -> None:
    """Keeping every block would not mend a record that names a map root no pack holds:
    gc says so and collects as usual (a transient fault, by contrast, stops it)."""
    path, old, _new = two_snapshots(tmp_path, ext4_image)
    debugfs(ext4_image, "rm /docs/note1.txt", "mkdir gone")
    with blocksnap.Repository(path) as repo:
        new = repo.snapshot("vol", ext4_image)
        repo.prune(policy=blocksnap.Policy(keep_last=1))
        stray = dataclasses.replace(old, id="ab" * 16, map_root=bytes(32))
        body = catalog.encode(stray, repo.store.config.algorithms(), 9)
        repo.store.backend.put(
            catalog.object_name(stray.id), catalog.frame(catalog.SNAPSHOT_MAGIC, body)
        )
        report = repo.gc()
        assert any(f"snapshot {stray.id} cannot be indexed" in p for p in report.problems)
        assert not any("nothing was collected" in p for p in report.problems), report.problems
        assert report.objects_deleted > 0
        assert ids(repo) == [new.id]
        assert not repo.verify().ok  # and verify names it
