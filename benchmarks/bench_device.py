"""Block devices as real backups see them: snapshots read from, and restores write onto,
loop devices over the benchmark images, each beside a plain read or write of the same
device in the same run.

A device has no holes to skip: every byte is read, so the baselines read every byte too
(`dd bs=16M` for the incremental, `zstd -1 -T2` of the device for the full snapshot, and
`dd bs=16M oflag=direct` of the image onto the device for a restore).  "cold" drops the
page cache (the loop devices' and their backing files') before every round, as a backup
of a volume that was not just read sees it; "warm" reads it again as it is.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blocksnap

CACHES = ["cold", "warm"]
ROUNDS = 3


def _losetup(path: Path, *, read_only: bool) -> str:
    args = ["losetup", "-f", "--show", *(["-r"] if read_only else []), str(path)]
    try:
        done = subprocess.run(args, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device for the device benchmarks ({exc}); they need root")
    return done.stdout.strip()


def _detach(device: str) -> None:
    subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


def drop_caches() -> None:
    """Write dirty pages back, then drop the page cache (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError as exc:
        pytest.skip(f"cannot drop the page cache ({exc}): the cold benchmarks need root")


def _prepare(cache: str, *devices: str) -> None:
    """Drop the page cache (cold), or read the devices a round reads (warm)."""
    if cache == "cold":
        drop_caches()
        return
    for device in devices:
        _run("dd", f"if={device}", "of=/dev/null", "bs=16M")


@pytest.fixture(scope="module")
def devices(bench_images: tuple[Path, Path]) -> Iterator[tuple[str, str]]:
    """Read-only loop devices over the image and its changed copy."""
    image, changed = bench_images
    first = _losetup(image, read_only=True)
    try:
        second = _losetup(changed, read_only=True)
        try:
            yield first, second
        finally:
            _detach(second)
    finally:
        _detach(first)


@pytest.fixture(scope="module")
def target_device(
    bench_images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A writable loop device the size of the image, over a sparse file."""
    image, _ = bench_images
    backing = tmp_path_factory.mktemp("device") / "target.img"
    with open(backing, "wb") as f:
        f.truncate(image.stat().st_size)
    device = _losetup(backing, read_only=False)
    try:
        yield device
    finally:
        _detach(device)
        backing.unlink()


def _record(benchmark: Any, size: int, cache: str) -> None:
    benchmark.extra_info["bytes"] = size
    benchmark.extra_info["page_cache"] = cache


def _run(*args: str) -> None:
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


@pytest.mark.parametrize("cache", CACHES)
def test_device_baseline_dd(
    benchmark: Any, devices: tuple[str, str], bench_images: tuple[Path, Path], cache: str
) -> None:
    _, changed = devices
    _record(benchmark, bench_images[1].stat().st_size, cache)
    benchmark.pedantic(
        _run,
        args=("dd", f"if={changed}", "of=/dev/null", "bs=16M"),
        setup=lambda: _prepare(cache, changed),
        rounds=ROUNDS,
    )


@pytest.mark.parametrize("cache", CACHES)
def test_device_baseline_zstd_T2(
    benchmark: Any, devices: tuple[str, str], bench_images: tuple[Path, Path], cache: str
) -> None:
    device, _ = devices
    _record(benchmark, bench_images[0].stat().st_size, cache)
    benchmark.pedantic(
        _run,
        args=("zstd", "-1", "-T2", "-q", "-f", "-c", device),
        setup=lambda: _prepare(cache, device),
        rounds=ROUNDS,
    )


def _snapshot_rounds(
    benchmark: Any, tmp_path: Path, cache: str, source: str, parent: str | None
) -> None:
    """Rounds of a snapshot of source into a new repository, after one of parent."""
    counter = iter(range(1000))

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        repo = blocksnap.Repository.init(tmp_path / f"repo{next(counter)}")
        if parent is not None:
            repo.snapshot("vol", parent)
            os.sync()  # the full snapshot's packs written back, as hours later in service
        _prepare(cache, source)
        return (repo,), {}

    def run(repo: blocksnap.Repository) -> None:
        info = repo.snapshot("vol", source)
        benchmark.extra_info["stored_size"] = info.stored_size
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)


@pytest.mark.parametrize("cache", CACHES)
def test_device_full_snapshot(
    benchmark: Any,
    devices: tuple[str, str],
    bench_images: tuple[Path, Path],
    tmp_path: Path,
    cache: str,
) -> None:
    device, _ = devices
    _record(benchmark, bench_images[0].stat().st_size, cache)
    _snapshot_rounds(benchmark, tmp_path, cache, device, None)


@pytest.mark.parametrize("cache", CACHES)
def test_device_incremental_snapshot(
    benchmark: Any,
    devices: tuple[str, str],
    bench_images: tuple[Path, Path],
    tmp_path: Path,
    cache: str,
) -> None:
    device, changed = devices
    _record(benchmark, bench_images[1].stat().st_size, cache)
    _snapshot_rounds(benchmark, tmp_path, cache, changed, device)


@pytest.fixture(scope="module")
def restore_repo(
    bench_images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[blocksnap.Repository]:
    """A repository holding the image (as latest~1) and its changed copy (latest)."""
    image, changed = bench_images
    repo = blocksnap.Repository.init(tmp_path_factory.mktemp("restore") / "repo")
    repo.snapshot("vol", image)
    repo.snapshot("vol", changed)
    yield repo
    repo.close()


def test_device_baseline_dd_direct_write(
    benchmark: Any, bench_images: tuple[Path, Path], target_device: str
) -> None:
    image, _ = bench_images
    _record(benchmark, image.stat().st_size, "warm")
    benchmark.pedantic(
        _run,
        args=("dd", f"if={image}", f"of={target_device}", "bs=16M", "oflag=direct"),
        rounds=ROUNDS,
    )


def _same_bytes(first: str | Path, second: str | Path, size: int) -> bool:
    """Whether the first size bytes of two files or devices are equal, read in parts."""
    with open(first, "rb") as a, open(second, "rb") as b:
        done = 0
        while done < size:
            want = min(16 << 20, size - done)
            if a.read(want) != b.read(want):
                return False
            done += want
    return True


@pytest.mark.parametrize("only_changed", [False, True], ids=["whole", "only-changed"])
def test_device_restore(
    benchmark: Any,
    bench_images: tuple[Path, Path],
    restore_repo: blocksnap.Repository,
    target_device: str,
    only_changed: bool,
) -> None:
    """Restore the older snapshot onto the device; with only_changed the device holds the
    newer one first, so only the blocks that differ are written."""
    image, _ = bench_images
    size = image.stat().st_size
    _record(benchmark, size, "warm")

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        if only_changed:
            restore_repo.restore("vol", "latest", target_device)
        os.sync()
        return (), {}

    def run() -> None:
        result = restore_repo.restore("vol", "latest~1", target_device, only_changed=only_changed)
        benchmark.extra_info["blocks_unchanged"] = result.blocks_unchanged

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    assert _same_bytes(target_device, image, size)
