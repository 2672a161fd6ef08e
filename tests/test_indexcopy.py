"""verify's copy of the index on disk: read in batches, tallied in batches, removed after."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import blocksnap
from blocksnap.blockmap import ZERO_ID, BlockMap
from blocksnap.model import BLOCK_ID_SIZE
from blocksnap.store import indexcopy, verify
from blocksnap.store.packs import HEADER_SIZE
from tests.conftest import debugfs, flip


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


def test_a_damaged_block_that_snapshots_share_names_every_one_of_them(
    tmp_path: Path, ext4_image: Path, small_batches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk checks each distinct leaf once and keeps its findings on disk as notes
    (one leaf at a time here): a block in a leaf that four snapshots share is still
    named with all four, and each snapshot's blocks are still counted."""
    monkeypatch.setattr(verify, "_LEAF_BOUND", 1)
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path) as repo:
        snaps = [repo.snapshot("vol", ext4_image, block_size=4096)]  # 48 leaves
        for n in range(3):
            debugfs(ext4_image, f"mkdir /round{n}")
            snaps.append(repo.snapshot("vol", ext4_image))
        store = repo.store
        maps = [BlockMap(store.read_node, s.map_root, s.map_height, s.block_count) for s in snaps]
        shared = [  # leaves all four snapshots share that name a block (not zero)
            leaf
            for leaf in range(maps[0].leaf_count())
            if len({m.leaf_id(leaf) for m in maps}) == 1
            and any(
                maps[0].leaf(leaf)[1][k : k + BLOCK_ID_SIZE] != ZERO_ID
                for k in range(0, len(maps[0].leaf(leaf)[1]), BLOCK_ID_SIZE)
            )
        ]
        assert shared
        _digests, ids = maps[0].leaf(shared[0])
        victim = next(
            ids[k : k + BLOCK_ID_SIZE]
            for k in range(0, len(ids), BLOCK_ID_SIZE)
            if ids[k : k + BLOCK_ID_SIZE] != ZERO_ID
        )
        referenced = sum(
            1
            for m in maps
            for leaf in range(m.leaf_count())
            for k in range(0, len(m.leaf(leaf)[1]), BLOCK_ID_SIZE)
            if m.leaf(leaf)[1][k : k + BLOCK_ID_SIZE] != ZERO_ID
        )
        loc = repo.store.index.location(victim)
        assert loc is not None
    flip(repo_path / "packs" / loc.pack.hex()[:2] / loc.pack.hex(), loc.offset + HEADER_SIZE)
    with blocksnap.Repository(repo_path) as repo:
        report = repo.verify(read_data=True)
    named = [p for p in report.problems if p.message.startswith(f"block {victim.hex()}:")]
    assert len(named) == 1, report.problems
    assert named[0].snapshots == sorted(f"vol@{s.id[:12]}" for s in snaps)
    assert report.blocks_referenced == referenced
