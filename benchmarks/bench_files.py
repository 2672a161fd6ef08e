"""Single-file restore: one file of about 1 MiB out of an ext4 snapshot, with caches dropped,
next to the full restore of the same snapshot in the same run; and the same extraction
from an image four times larger, to show the cost does not grow with the image.

BLOCKSNAP_BENCH_FILES_MB names the two image sizes: "64,256" in the quick pass CI runs,
"2048,8192" in the README's full run.  extra_info records the blocks fetched for the whole
request, finding and mounting the filesystem included, and their share of the image's
blocks; blocks_fetched_file counts those of the extraction alone.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from benchmarks.bench_lifecycle import drop_caches
from benchmarks.conftest import ImageFactory
from blocksnap.extract import extract

SIZES = [int(v) for v in os.environ.get("BLOCKSNAP_BENCH_FILES_MB", "64,256").split(",")]
WANT_SIZE = 1 << 20


class Volume:
    def __init__(self, repo: Path, path: str, size: int, blocks: int, image: Path) -> None:
        self.repo, self.path, self.size, self.blocks, self.image = repo, path, size, blocks, image


@pytest.fixture(scope="module")
def volumes(images: ImageFactory, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Volume]:
    """A repository per size holding one full snapshot of that image, and the file in it
    whose size is nearest to 1 MiB."""
    found = {}
    for size_mb in SIZES:
        image = images(size_mb)[0]
        repo_path = tmp_path_factory.mktemp(f"files{size_mb}") / "repo"
        with blocksnap.Repository.init(repo_path) as repo:
            info = repo.snapshot("vol", image)
            with repo.open_filesystem("vol") as fs:
                best = min(fs.find("blob*.bin", "/data"), key=lambda s: abs(s.size - WANT_SIZE))
        found[size_mb] = Volume(repo_path, best.path, best.size, info.block_count, image)
    return found


@pytest.mark.parametrize("size_mb", SIZES)
def test_extract_one_file_cold(
    benchmark: Any, volumes: dict[int, Volume], tmp_path: Path, size_mb: int
) -> None:
    volume = volumes[size_mb]
    counter = itertools.count()

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        out = tmp_path / f"out{next(counter)}"
        drop_caches()
        return (out,), {}

    def run(out: Path) -> None:
        with blocksnap.Repository(volume.repo) as repo, repo.open_filesystem("vol") as fs:
            report = extract(fs, [volume.path], str(out))
            fetched = fs.stats.blocks_fetched  # probing and mounting included
        assert report.files == 1
        benchmark.extra_info["blocks_fetched"] = fetched
        benchmark.extra_info["blocks_fetched_file"] = report.blocks_fetched
        benchmark.extra_info["blocks_fetched_share"] = fetched / volume.blocks

    benchmark.pedantic(run, setup=setup, rounds=5)
    benchmark.extra_info["bytes"] = volume.size
    benchmark.extra_info["image_size"] = volume.image.stat().st_size


def test_full_restore_cold_of_the_same_snapshot(
    benchmark: Any, volumes: dict[int, Volume], tmp_path: Path
) -> None:
    volume = volumes[SIZES[0]]
    target = tmp_path / "restored.img"

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        if target.exists():
            target.unlink()
        drop_caches()
        return (), {}

    def run() -> None:
        with blocksnap.Repository(volume.repo) as repo:
            repo.restore("vol", "latest", target)

    benchmark.pedantic(run, setup=setup, rounds=3)
    benchmark.extra_info["bytes"] = volume.image.stat().st_size
    shutil.rmtree(tmp_path, ignore_errors=True)
