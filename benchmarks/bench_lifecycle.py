"""Lifecycle costs: a synthetic full beside a full snapshot, an incremental given the
changed extents beside one that reads everything, gc in 1 volume beside 10.

test_synthesize is compared by time with test_full_snapshot (bench_engine.py) of the same
image in the same run: the target is at most 1% of it.  test_gc_after_pruning_one_snapshot
runs the same churn on one volume of a repository holding 1 or 10 volumes of distinct
content (BLOCKSNAP_BENCH_GC_MB each, default 32): each round writes new files (2% of the
image), snapshots, prunes the volume's oldest snapshot and times the gc that follows.  The
target is that 10 volumes cost at most 1.5x what 1 does.

test_verify_restore_points[1|56] verifies (metadata, no --read-data) a repository holding
one snapshot of the image beside one holding 56 restore points of it (4 a day for 14
days), each after a 256 KiB file was written into the image: the walk checks each
distinct map leaf once, so the 56 should cost a small multiple of the 1, not 56 times.

test_hinted_incremental_snapshot takes the same incremental as test_incremental_snapshot
(bench_engine.py: 2% of the files rewritten) but is told the exact changed extents, the
4 KiB pages a hypervisor's dirty bitmap would list; the target is at least 20x faster.
Both read the image from the page cache.  test_cold_incremental[hinted|unhinted] run the
pair again with the kernel's caches dropped before each round, as when a backup reads a
volume from its device (needs root; skipped otherwise).  test_baseline_zstd_T2_of_the_change
compresses and syncs just the changed blocks: the floor that a hinted incremental is
proportional to.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from benchmarks.conftest import make_pair
from blocksnap.extents import hint_runs
from blocksnap.retention import Policy
from tests.conftest import debugfs

GC_MB = int(os.environ.get("BLOCKSNAP_BENCH_GC_MB", "32"))


def test_synthesize(benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = bench_images
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        repo.snapshot("vol", image)
        before = sum(f.stat().st_size for f in (tmp_path / "repo").rglob("*") if f.is_file())
        info = benchmark.pedantic(repo.synthesize, args=("vol", "latest"), rounds=5)
        after = sum(f.stat().st_size for f in (tmp_path / "repo").rglob("*") if f.is_file())
    benchmark.extra_info["bytes"] = image.stat().st_size
    benchmark.extra_info["new_metadata"] = info.metadata_size
    benchmark.extra_info["repository_growth_per_round"] = (after - before) // 5


def dirty_pages(old: Path, new: Path, page: int = 4096) -> list[tuple[int, int]]:
    """The extents of the pages that differ between two images, as a dirty bitmap has."""
    extents: list[tuple[int, int]] = []
    chunk = 8 << 20
    with open(old, "rb") as a, open(new, "rb") as b:
        base = 0
        while block := b.read(chunk):
            other = a.read(chunk)
            if block != other:
                for off in range(0, len(block), page):
                    if block[off : off + page] != other[off : off + page]:
                        at = base + off
                        length = min(page, len(block) - off)
                        if extents and sum(extents[-1]) == at:
                            extents[-1] = (extents[-1][0], extents[-1][1] + length)
                        else:
                            extents.append((at, length))
            base += len(block)
    return extents


def test_hinted_incremental_snapshot(
    benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, changed = bench_images
    extents = dirty_pages(image, changed)
    counter = itertools.count()

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        repo = blocksnap.Repository.init(tmp_path / f"repo{next(counter)}")
        repo.snapshot("vol", image)
        os.sync()  # as in test_incremental_snapshot: the full's writeback is long done
        return (repo,), {}

    def run(repo: blocksnap.Repository) -> None:
        info = repo.snapshot("vol", changed, changed_extents=extents)
        benchmark.extra_info["blocks_read"] = info.counts.read
        benchmark.extra_info["stored_size"] = info.stored_size
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=5)
    benchmark.extra_info["bytes"] = changed.stat().st_size
    benchmark.extra_info["changed_bytes"] = sum(length for _, length in extents)


def test_baseline_zstd_T2_of_the_change(
    benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path
) -> None:
    """`zstd -1 -T2` of just the 64 KiB blocks the changed extents touch, written durably:
    the least any incremental must spend on this change."""
    image, changed = bench_images
    blocks = tmp_path / "changed-blocks"
    bs = 64 << 10
    with open(changed, "rb") as src, open(blocks, "wb") as out:
        for first, end in hint_runs(dirty_pages(image, changed), changed.stat().st_size, bs):
            src.seek(first * bs)
            out.write(src.read((end - first) * bs))
    target = tmp_path / "out.zst"
    benchmark.pedantic(
        subprocess.run,
        args=(["sh", "-c", f"zstd -1 -T2 -q -f -c {blocks} > {target} && sync {target}"],),
        kwargs={"check": True},
        rounds=5,
    )
    benchmark.extra_info["bytes"] = blocks.stat().st_size


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        pytest.skip(f"cannot drop the page cache: {exc.strerror}")


@pytest.mark.parametrize("hinted", [True, False], ids=["hinted", "unhinted"])
def test_cold_incremental(
    benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path, hinted: bool
) -> None:
    image, changed = bench_images
    extents = dirty_pages(image, changed) if hinted else None
    counter = itertools.count()

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        repo = blocksnap.Repository.init(tmp_path / f"repo{next(counter)}")
        repo.snapshot("vol", image)
        drop_caches()
        return (repo,), {}

    def run(repo: blocksnap.Repository) -> None:
        info = repo.snapshot("vol", changed, changed_extents=extents)
        benchmark.extra_info["blocks_read"] = info.counts.read
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=5)
    benchmark.extra_info["bytes"] = changed.stat().st_size


@pytest.fixture(scope="module")
def gc_volumes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("gcvol")
    return [make_pair(root / f"v{k}", GC_MB, seed=10 + k)[0] for k in range(10)]


@pytest.mark.parametrize("volumes", [1, 10])
def test_gc_after_pruning_one_snapshot(
    benchmark: Any, gc_volumes: list[Path], tmp_path: Path, volumes: int
) -> None:
    repo_path = tmp_path / "repo"
    work = tmp_path / "work.img"
    work.write_bytes(gc_volumes[0].read_bytes())
    with blocksnap.Repository.init(repo_path) as repo:
        for k in range(1, volumes):
            repo.snapshot(f"v{k}", gc_volumes[k])
        rounds = itertools.count()

        def churn() -> tuple[tuple[()], dict[str, Any]]:
            i = next(rounds)
            blob = tmp_path / "churn.bin"
            blob.write_bytes(os.urandom(GC_MB * (1 << 20) // 50))
            debugfs(work, f"rm churn{i - 2}", f"write {blob} churn{i}")
            repo.snapshot("v0", work)
            repo.prune("v0", Policy(keep_last=2))
            return (), {}

        for _ in range(3):  # reach the steady state: every round prunes one snapshot
            churn()
            repo.gc()
        report = benchmark.pedantic(repo.gc, setup=churn, rounds=5)
        benchmark.extra_info["volumes"] = volumes
        benchmark.extra_info["objects_deleted"] = report.objects_deleted
        benchmark.extra_info["bytes_freed"] = report.bytes_freed
        benchmark.extra_info["repository_bytes"] = sum(
            f.stat().st_size for f in (repo_path / "packs").rglob("*") if f.is_file()
        )


@pytest.fixture(scope="module")
def restore_points(
    bench_images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[int, Path]:
    """Repositories holding 1 and 56 snapshots of the image, changed a little each time."""
    image, _ = bench_images
    root = tmp_path_factory.mktemp("points")
    work = root / "work.img"
    work.write_bytes(image.read_bytes())
    blob = root / "blob.bin"
    repos = {1: root / "repo1", 56: root / "repo56"}
    with blocksnap.Repository.init(repos[1]) as repo:
        repo.snapshot("vol", work)
    with blocksnap.Repository.init(repos[56]) as repo:
        for k in range(56):
            if k:
                blob.write_bytes(os.urandom(256 << 10))
                debugfs(work, f"write {blob} point{k}")
            repo.snapshot("vol", work)
    return repos


@pytest.mark.parametrize("points", [1, 56])
def test_verify_restore_points(
    benchmark: Any, restore_points: dict[int, Path], points: int
) -> None:
    with blocksnap.Repository(restore_points[points]) as repo:
        report = benchmark.pedantic(repo.verify, rounds=3)
    assert report.ok, report.problems
    assert report.snapshots_checked == points
    benchmark.extra_info["blocks_referenced"] = report.blocks_referenced
