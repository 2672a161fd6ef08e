"""verify's copy of the index on disk: read in batches, tallied in batches, removed after."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import blocksnap
from blocksnap.store import indexcopy, verify
from tests.conftest import debugfs


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Batches of 7 entries, a tally flushed every 5 objects and a map of 16 pages at
    first, so that every path across a batch's end and every growth of the map is taken;
    the copies go to a directory of their own."""
    monkeypatch.setattr(indexcopy, "_BATCH", 7)
    monkeypatch.setattr(indexcopy, "_INITIAL_MAP", 16 * 4096)
    monkeypatch.setattr(verify, "_TALLY_BOUND", 5)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_verify_through_batches_finds_no_damage_and_then_the_drift(
    tmp_path: Path, ext4_image: Path, small_batches: Path
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        repo.snapshot("vol", ext4_image)
        debugfs(ext4_image, "rm /docs/note3.txt", "mkdir /new")
        second = repo.snapshot("vol", ext4_image)
        index = repo.store.index
        with index.copy(by_pack=True) as view:
            ids = [key for key, _loc in view.locations()]
            assert len(ids) == view.objects > 3 * indexcopy._BATCH
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert [s for _v, s, _r in view.snapshots()][-1] == second.id
            entries = [key for pack in view.packs for _off, key in view.in_pack(pack)]
            assert sorted(entries) == ids
            grown = view._scratch._env.info()["map_size"]  # the private map had to grow
            assert grown > indexcopy._INITIAL_MAP
        report = repo.verify(read_data=True)
        assert report.ok, report.problems
        assert report.counts_checked == len(ids)
        with index.env.begin(write=True) as txn:  # a lost increment, mid-way in key order
            victim = ids[len(ids) // 2]
            value = txn.get(victim, db=index.refs)
            assert value is not None
            count = int.from_bytes(value[:4], "little")
            txn.put(victim, (count + 1).to_bytes(4, "little") + value[4:], db=index.refs)
        report = repo.verify()
        assert [p.message for p in report.problems] == [
            f"reference count drift: object {victim.hex()} has {count + 1}, recount gives {count}"
        ]
    assert list(small_batches.iterdir()) == []  # every copy removed
