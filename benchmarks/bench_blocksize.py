"""The block-size table: stored bytes, map metadata and speed per block size.

For each size, a fresh repository takes a full snapshot of the benchmark image and then an
incremental of its changed copy (2% of the files rewritten).  The incremental is what is
timed; the full snapshot's figures go into extra_info.  benchmarks/report.py turns a
--benchmark-json file into the README's table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from benchmarks.conftest import ImagePair

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]


@pytest.mark.parametrize("block_size", SIZES, ids=[f"{s >> 10}K" for s in SIZES])
def test_block_size(
    benchmark: Any, bench_images: ImagePair, tmp_path: Path, block_size: int
) -> None:
    image, changed = bench_images
    counter = iter(range(1000))
    info: dict[str, Any] = {"bytes": changed.stat().st_size, "block_size": block_size}

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        repo = blocksnap.Repository.init(tmp_path / f"repo{next(counter)}")
        start = time.perf_counter()
        full = repo.snapshot("vol", image, block_size=block_size)
        info["full_seconds"] = time.perf_counter() - start
        info["full_stored"] = full.stored_size
        info["full_metadata"] = full.metadata_size
        os.sync()  # as in bench_engine: the incremental does not wait for the full's writeback
        return (repo,), {}

    def run(repo: blocksnap.Repository) -> None:
        inc = repo.snapshot("vol", changed)
        info["incremental_stored"] = inc.stored_size
        info["incremental_metadata"] = inc.metadata_size
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=2)
    benchmark.extra_info.update(info)
