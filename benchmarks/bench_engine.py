"""Throughput of scan, full and incremental snapshot and restore, each beside its baseline.

Every figure is meant as a ratio to a baseline measured in the same run (these machines
are noisy): xxhash's own XXH3-128 for the scan, `zstd -1 -T2` for a full snapshot,
`cat IMAGE > /dev/null` for an incremental and `cp` for a restore.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import xxhash

import blocksnap
from blocksnap.native import _cffi

BUFFER = os.urandom(64 << 20)


def _record(benchmark: Any, size: int) -> None:
    benchmark.extra_info["bytes"] = size


def test_baseline_xxh3_128(benchmark: Any) -> None:
    _record(benchmark, len(BUFFER))
    benchmark(xxhash.xxh3_128_digest, BUFFER, 1)


@pytest.mark.parametrize("block_size", [4096, 65536])
def test_native_scan(benchmark: Any, block_size: int) -> None:
    n = len(BUFFER) // block_size
    flags, digests = bytearray(n), bytearray(16 * n)
    _record(benchmark, len(BUFFER))
    benchmark(_cffi.scan, BUFFER, block_size, 1, None, flags, digests)


def test_baseline_zstd_T2(benchmark: Any, bench_images: tuple[Path, Path]) -> None:
    image, _ = bench_images
    _record(benchmark, image.stat().st_size)
    benchmark.pedantic(
        subprocess.run,
        args=(["zstd", "-1", "-T2", "-q", "-f", "-c", str(image)],),
        kwargs={"stdout": subprocess.DEVNULL, "check": True},
        rounds=3,
    )


def test_full_snapshot(benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = bench_images
    _record(benchmark, image.stat().st_size)
    counter = iter(range(1000))

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        repo = blocksnap.Repository.init(tmp_path / f"repo{next(counter)}")
        return (repo,), {}

    def run(repo: blocksnap.Repository) -> None:
        repo.snapshot("vol", image)
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=3)


def test_baseline_cat(benchmark: Any, bench_images: tuple[Path, Path]) -> None:
    _, changed = bench_images
    _record(benchmark, changed.stat().st_size)
    benchmark.pedantic(
        subprocess.run,
        args=(["cat", str(changed)],),
        kwargs={"stdout": subprocess.DEVNULL, "check": True},
        rounds=5,
    )


def test_incremental_snapshot(
    benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path
) -> None:
    image, changed = bench_images
    _record(benchmark, changed.stat().st_size)
    counter = iter(range(1000))

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        repo = blocksnap.Repository.init(tmp_path / f"repo{next(counter)}")
        repo.snapshot("vol", image)
        # Let the kernel write the full snapshot's packs back first: in service, the next
        # snapshot comes hours later, and its own fsyncs should not queue behind them.
        os.sync()
        return (repo,), {}

    def run(repo: blocksnap.Repository) -> None:
        info = repo.snapshot("vol", changed)
        benchmark.extra_info["stored_size"] = info.stored_size
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=5)


def test_baseline_cp(benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = bench_images
    _record(benchmark, image.stat().st_size)
    target = tmp_path / "copy.img"
    benchmark.pedantic(shutil.copyfile, args=(image, target), rounds=3)


def test_full_restore(benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path) -> None:
    image, _ = bench_images
    _record(benchmark, image.stat().st_size)
    repo = blocksnap.Repository.init(tmp_path / "repo")
    repo.snapshot("vol", image)
    target = tmp_path / "restored.img"

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        if target.exists():
            target.unlink()
        return (), {}

    benchmark.pedantic(lambda: repo.restore("vol", "latest", target), setup=setup, rounds=3)
    repo.close()
    assert target.read_bytes() == image.read_bytes()
