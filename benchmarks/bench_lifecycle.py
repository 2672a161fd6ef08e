"""Lifecycle costs: a synthetic full beside a full snapshot, gc in 1 volume beside 10.

test_synthesize is compared by time with test_full_snapshot (bench_engine.py) of the same
image in the same run: the target is at most 1% of it.  test_gc_after_pruning_one_snapshot
runs the same churn on one volume of a repository holding 1 or 10 volumes of distinct
content (BLOCKSNAP_BENCH_GC_MB each, default 32): each round writes new files (2% of the
image), snapshots, prunes the volume's oldest snapshot and times the gc that follows.  The
target is that 10 volumes cost at most 1.5x what 1 does.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from benchmarks.conftest import make_pair
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
