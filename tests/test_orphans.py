"""A record object whose next step fails is committed or left to gc, never orphaned: no
pruned snapshot comes back, and none that committed goes missing, after a rebuild."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import blocksnap
from blocksnap.errors import StoreError
from blocksnap.store.backend import LocalBackend
from blocksnap.store.index import Index


def records(repo: blocksnap.Repository) -> set[str]:
    return {o.name for o in repo.store.backend.list("snapshots/")}


def rebuilt_ids(path: Path) -> set[str]:
    blocksnap.repair_index(path)
    with blocksnap.Repository(path) as repo:
        report = repo.verify()
        assert report.ok and not report.leftovers, (report.problems, report.leftovers)
        return {s.id for v in repo.volumes() for s in repo.snapshots(v)}


def failing_delete(monkeypatch: pytest.MonkeyPatch) -> None:
    real = LocalBackend.delete

    def delete(self: LocalBackend, name: str) -> None:
        if name.startswith("snapshots/"):
            raise StoreError(f"I/O error while deleting {name}: Input/output error")
        real(self, name)

    monkeypatch.setattr(LocalBackend, "delete", delete)


def test_a_commit_whose_index_transaction_fails_is_committed_and_indexed_by_gc(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record object is the commit point: a snapshot whose index step fails exists,
    the error says so, and gc (or the next writer) indexes it; a rebuild agrees."""
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        first = repo.snapshot("vol", ext4_image)
        with monkeypatch.context() as m:

            def map_full(self: Index, *args: Any, **kwargs: Any) -> None:
                raise StoreError("the index is full (MDB_MAP_FULL)")

            m.setattr(Index, "commit_snapshot", map_full)
            with pytest.raises(StoreError, match="is committed, but the index could not"):
                repo.snapshot("vol", ext4_image, full=True)
        (second,) = {name.split("/")[1] for name in records(repo)} - {first.id}
        assert [s.id for s in repo.snapshots("vol")] == [first.id]
        report = repo.gc()
        assert report.dead_writers == 1  # the writer kept its intents, for gc
        assert [s.id for s in repo.snapshots("vol")] == [first.id, second]
        assert not repo.verify().leftovers
    assert rebuilt_ids(path) == {first.id, second}


def test_a_prune_whose_record_delete_fails_leaves_it_to_gc(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "repo"
    with blocksnap.Repository.init(path) as repo:
        old = repo.snapshot("vol", ext4_image)
        new = repo.snapshot("vol", ext4_image, full=True)
        with monkeypatch.context() as m:
            failing_delete(m)
            with pytest.raises(StoreError, match="Input/output"):
                repo.prune(policy=blocksnap.Policy(keep_last=1))
        assert [s.id for s in repo.snapshots("vol")] == [new.id]
        assert f"snapshots/{old.id}" in records(repo)
        repo.gc()
        assert records(repo) == {f"snapshots/{new.id}"}
    assert rebuilt_ids(path) == {new.id}
