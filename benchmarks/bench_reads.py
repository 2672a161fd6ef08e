"""Restore from a store whose every get costs a round trip: batched reads against one get
per block, in the same run.

The store's backend is wrapped to sleep LATENCY before each get, as a request to object
storage waits for its round trip; the restore's worker threads overlap those waits as
parallel connections would.  The per-block case forces a read batch of one block (the old
path); the ratio of the two throughputs is what batching buys on a remote store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from blocksnap.model import READ_BATCH_SIZE
from blocksnap.restore import restore_image

LATENCY = 0.002  # seconds per get: a near object store; real ones are slower still

Remote = tuple[blocksnap.Repository, blocksnap.SnapshotInfo, Path, list[int]]


@pytest.fixture(scope="module")
def remote(
    bench_images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Remote]:
    """A repository holding a snapshot of the benchmark image, its gets slowed down and
    counted (the list holds the count)."""
    image, _ = bench_images
    repo = blocksnap.Repository.init(tmp_path_factory.mktemp("remote") / "repo")
    info = repo.snapshot("vol", image)
    gets = [0]
    real = repo.store.backend.get

    def get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        time.sleep(LATENCY)
        gets[0] += 1
        return real(name, offset, length)

    repo.store.backend.get = get  # type: ignore[method-assign]
    yield repo, info, image, gets
    repo.close()


@pytest.mark.parametrize("reads", ["per-block", "batched"])
def test_remote_restore(benchmark: Any, remote: Remote, tmp_path: Path, reads: str) -> None:
    repo, info, image, gets = remote
    benchmark.extra_info["bytes"] = image.stat().st_size
    batch_size = info.block_size if reads == "per-block" else READ_BATCH_SIZE
    target = tmp_path / "restored.img"

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        target.unlink(missing_ok=True)
        gets[0] = 0
        return (), {}

    def run() -> None:
        restore_image(
            repo.store,
            info,
            str(target),
            filter_seed=repo.store.config.filter_seed,
            read_batch_size=batch_size,
        )

    benchmark.pedantic(run, setup=setup, rounds=3)
    benchmark.extra_info["gets"] = gets[0]
    assert target.read_bytes() == image.read_bytes()
