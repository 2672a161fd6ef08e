"""Batched reads: many blocks by few ranged gets, each block still checked, bounded in size."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import blocksnap
from blocksnap.blockmap import ZERO_ID, BlockMap
from blocksnap.errors import IntegrityError, MissingObjectError
from blocksnap.restore import CHUNK_SIZE, READ_BUDGET, restore_image
from blocksnap.retention import Policy
from blocksnap.store.entries import Location
from blocksnap.store.packs import HEADER_SIZE, pack_name
from blocksnap.store.reads import MAX_READ_SIZE
from blocksnap.store.repository import Store
from tests.conftest import debugfs, flip


@dataclass
class Gets:
    """What a store's backend was asked to read, counted by a wrapper around its get."""

    calls: int = 0
    size: int = 0
    largest: int = 0
    before: list[Callable[[], None]] = field(default_factory=list)  # run before the next get

    def reset(self) -> None:
        self.calls = self.size = self.largest = 0


def count_gets(store: Store, monkeypatch: pytest.MonkeyPatch) -> Gets:
    gets = Gets()
    real = store.backend.get

    def get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        while gets.before:
            gets.before.pop()()
        data = real(name, offset, length)
        gets.calls += 1
        gets.size += len(data)
        gets.largest = max(gets.largest, len(data))
        return data

    monkeypatch.setattr(store.backend, "get", get)
    return gets


def block_ids(store: Store, info: blocksnap.SnapshotInfo) -> list[bytes]:
    """The snapshot's block ids in image order, zero blocks included."""
    block_map = BlockMap(store.read_node, info.map_root, info.map_height, info.block_count)
    _digests, ids = block_map.entries(0, info.block_count)
    return [ids[i : i + 32] for i in range(0, len(ids), 32)]


def map_node_count(info: blocksnap.SnapshotInfo) -> int:
    leaves = -(-info.block_count // 256)
    return leaves + (-(-leaves // 256) if leaves > 1 else 0) + (1 if leaves > 256 else 0)


@pytest.fixture
def snapped(
    tmp_path: Path, ext4_image: Path
) -> Iterator[tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path]]:
    """A snapshot of the ext4 image in a repository of 1 MiB packs: about ten of them."""
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=1 << 20) as repo:
        yield repo, repo.snapshot("vol", ext4_image), ext4_image


def test_restore_makes_one_get_per_run_of_a_pack_not_one_per_block(
    snapped: tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, info, image = snapped
    ids = [i for i in block_ids(repo.store, info) if i != ZERO_ID]
    locations = repo.store.index.locations(ids)
    packs = {loc.pack for loc in locations if loc is not None}
    assert len(packs) >= 8 and len(ids) > 250
    gets = count_gets(repo.store, monkeypatch)
    repo.restore("vol", "latest", tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()
    # One get per pack within each worker's chunk (a pack can straddle two), plus the map.
    chunks = -(-info.image_size // CHUNK_SIZE)
    assert gets.calls <= len(packs) + chunks + map_node_count(info) + 2
    assert gets.calls * 10 < len(ids)
    assert gets.largest <= MAX_READ_SIZE


@pytest.mark.parametrize("read_size", [4096, 64 << 10, 1 << 20])
@pytest.mark.parametrize("cache_size", [32 << 20, 256 << 10])
def test_a_sequential_read_of_the_image_reads_ahead_in_batches(
    snapped: tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path],
    monkeypatch: pytest.MonkeyPatch,
    read_size: int,
    cache_size: int,
) -> None:
    repo, info, image = snapped
    ids = [i for i in block_ids(repo.store, info) if i != ZERO_ID]
    packs = {loc.pack for loc in repo.store.index.locations(ids) if loc is not None}
    stored_size = sum(len(repo.store.read_block(i)) for i in set(ids))
    gets = count_gets(repo.store, monkeypatch)
    with repo.open_image("vol", "latest", cache_size=cache_size) as f:
        parts = []
        while part := f.read(read_size):
            parts.append(part)
        assert b"".join(parts) == image.read_bytes()
        # Every stored block fetched exactly once, most of them read ahead.
        assert f.stats.blocks_fetched == len(set(ids))
        assert f.stats.bytes_fetched == stored_size
        if cache_size >= 16 << 20:
            assert f.stats.blocks_read_ahead > len(ids) // 2
    if cache_size >= 16 << 20:
        # The read-ahead window grows to 8 MiB: a few gets to grow, then one per run.
        assert gets.calls <= 2 * len(packs) + map_node_count(info) + 12
        assert gets.calls * 8 < len(ids)
    else:  # half of a 4-block cache: batches of two blocks
        assert gets.calls <= len(ids) // 2 + len(packs) + map_node_count(info) + 2
    assert gets.largest <= MAX_READ_SIZE


def test_random_reads_fetch_no_more_than_they_touch(
    snapped: tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path],
) -> None:
    repo, info, image = snapped
    data = image.read_bytes()
    rng = random.Random(7)
    with repo.open_image("vol", "latest") as f:
        touched: set[int] = set()
        for _ in range(100):
            pos = rng.randrange(len(data))
            n = rng.randrange(1, 200_000)
            f.seek(pos)
            assert f.read(n) == data[pos : pos + n]
            touched.update(range(pos // info.block_size, (pos + n - 1) // info.block_size + 1))
        assert f.stats.blocks_read_ahead == 0
        assert f.stats.blocks_fetched <= len(touched)


def test_a_batch_returns_each_block_in_the_order_asked(
    snapped: tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, info, _image = snapped
    store = repo.store
    ids = [i for i in block_ids(store, info) if i != ZERO_ID]
    by_pack: dict[bytes, list[bytes]] = {}
    for object_id, loc in zip(ids, store.index.locations(ids), strict=True):
        assert loc is not None
        by_pack.setdefault(loc.pack, []).append(object_id)
    picked = [object_id for members in list(by_pack.values())[:4] for object_id in members[:6]]
    asked = picked + picked[::3] + [ZERO_ID, ZERO_ID]  # duplicates, zero blocks
    random.Random(3).shuffle(asked)  # interleaved: packs and offsets out of order
    expected = {object_id: store.read_block(object_id) for object_id in picked}
    gets = count_gets(store, monkeypatch)
    got = store.read_blocks(asked)
    assert got == [b"" if i == ZERO_ID else expected[i] for i in asked]
    assert gets.calls < len(set(picked)) // 2  # about one per pack
    assert store.read_blocks([]) == []


def test_a_missing_block_raises_as_read_block_does(
    snapped: tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path],
) -> None:
    repo, info, _image = snapped
    known = next(i for i in block_ids(repo.store, info) if i != ZERO_ID)
    unknown = bytes(range(32))
    with pytest.raises(MissingObjectError, match=f"object {unknown.hex()} is not in the index"):
        repo.store.read_blocks([known, unknown])
    with pytest.raises(MissingObjectError, match=f"object {unknown.hex()} is not in the index"):
        repo.store.read_block(unknown)


def adjacent_records(store: Store, ids: list[bytes]) -> list[tuple[bytes, Location]]:
    """Three records that follow each other in one pack."""
    located = sorted(
        ((i, loc) for i, loc in zip(ids, store.index.locations(ids), strict=True) if loc),
        key=lambda item: (item[1].pack, item[1].offset),
    )
    for a, b, c in zip(located, located[1:], located[2:], strict=False):
        if a[1].pack == b[1].pack == c[1].pack and all(
            x[1].offset + HEADER_SIZE + x[1].stored_size == y[1].offset for x, y in ((a, b), (b, c))
        ):
            return [a, b, c]
    raise AssertionError("no three adjacent records")


def test_a_damaged_record_in_a_coalesced_read_is_named(
    snapped: tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, info, _image = snapped
    store = repo.store
    ids = list(dict.fromkeys(i for i in block_ids(store, info) if i != ZERO_ID))
    (a, _), (b, loc), (c, _) = adjacent_records(store, ids)
    good = {i: store.read_block(i) for i in (a, c)}
    flip(Path(repo.path) / pack_name(loc.pack), loc.offset + HEADER_SIZE + loc.stored_size // 2)
    gets = count_gets(store, monkeypatch)
    with pytest.raises(IntegrityError, match=f"object {b.hex()} in pack {loc.pack.hex()}"):
        store.read_blocks([a, b, c])
    assert gets.calls == 1  # the three came in one get, and the damage was still found
    # The damaged record lies in the gap between the other two: they read right.
    assert store.read_blocks([c, a]) == [good[c], good[a]]
    assert gets.calls == 2


def test_one_batch_is_cut_at_the_largest_read(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=64 << 20) as repo:
        info = repo.snapshot("vol", ext4_image)
        store = repo.store
        ids = list(dict.fromkeys(i for i in block_ids(store, info) if i != ZERO_ID))
        locations = [loc for loc in store.index.locations(ids) if loc is not None]
        assert len({loc.pack for loc in locations}) == 1
        stored = sum(HEADER_SIZE + loc.stored_size for loc in locations)
        assert stored > MAX_READ_SIZE
        gets = count_gets(store, monkeypatch)
        contents = store.read_blocks(ids)  # the whole image in one batch, for the test
        assert gets.largest <= MAX_READ_SIZE
        assert 2 <= gets.calls <= stored // MAX_READ_SIZE + 3
        assert [len(c) for c in contents] == [loc.raw_size for loc in locations]


def test_a_batch_whose_pack_is_compacted_away_looks_it_up_again(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=1 << 20) as repo:
        repo.snapshot("vol", ext4_image)
        debugfs(ext4_image, "rm data/blob0.bin", "rm data/blob1.bin", "rm data/blob2.bin")
        latest = repo.snapshot("vol", ext4_image)
        data = ext4_image.read_bytes()
        store = repo.store
        ids = [i for i in block_ids(store, latest) if i != ZERO_ID]
        expected = [store.read_block(i) for i in ids]
        before = store.index.locations(ids)
        repo.prune(policy=Policy(keep_last=1))
        gets = count_gets(store, monkeypatch)
        compacted = []
        # Between the batch's lookup and its first get, gc rewrites every pack holding
        # garbage and deletes the old ones.
        gets.before.append(lambda: compacted.append(repo.gc(compact_below=1.0)))
        lookups = []
        real = store.index.locations

        def locations(object_ids: list[bytes], *, strict: bool = False) -> list[Location | None]:
            lookups.append(len(object_ids))
            return real(object_ids, strict=strict)

        monkeypatch.setattr(store.index, "locations", locations)
        assert store.read_blocks(ids) == expected
        assert compacted and compacted[0].packs_compacted > 0
        after = real(ids)
        assert sum(b != a for b, a in zip(before, after, strict=True)) > 0
        assert len(lookups) > 1  # the batch's lookup, then the moved records' again
        target = tmp_path / "out.img"
        repo.restore("vol", latest.id, target)
        assert target.read_bytes() == data


def test_restore_with_many_workers_shares_one_read_budget(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=64 << 20) as repo:
        info = repo.snapshot("vol", ext4_image)
        gets = count_gets(repo.store, monkeypatch)
        target = tmp_path / "out.img"
        seed = repo.store.config.filter_seed
        restore_image(repo.store, info, str(target), filter_seed=seed, workers=32)
        assert target.read_bytes() == ext4_image.read_bytes()
        # 2 MiB of blocks per worker; the gaps between a batch's records can add a little.
        assert gets.largest <= READ_BUDGET // 32 + (1 << 20)
        target.unlink()
        restore_image(repo.store, info, str(target), filter_seed=seed, workers=2)
        assert gets.largest > READ_BUDGET // 32 + (1 << 20)  # the bound above means something
