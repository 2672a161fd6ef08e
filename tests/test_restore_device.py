"""Restore onto block devices (loop devices): the whole image and only the changed blocks,
written with O_DIRECT in aligned runs, with an image end that is not aligned and a
device larger than the image, whose bytes past the image stay as they were."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

import blocksnap
from blocksnap.restore import DIRECT_RUN
from tests.conftest import debugfs
from tests.fsimages import loop_device

_real_pwrite = os.pwrite


def _direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Bytes the process writes with pwrite, counted as "direct" or "buffered"."""
    counts: Counter[str] = Counter()

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        done = _real_pwrite(fd, data, offset)
        counts["direct" if _direct(fd) else "buffered"] += done
        return done

    monkeypatch.setattr(os, "pwrite", pwrite)
    return counts


def read_device(device: str, size: int) -> bytes:
    with open(device, "rb") as f:
        return f.read(size)


def test_restore_onto_a_device_whole_then_only_changed(
    ext4_base: Path, tmp_path: Path, written: Counter[str]
) -> None:
    changed = tmp_path / "changed.img"
    shutil.copyfile(ext4_base, changed)
    (tmp_path / "note.txt").write_bytes(os.urandom(300_000))
    debugfs(changed, f"write {tmp_path / 'note.txt'} note.txt")
    size = ext4_base.stat().st_size
    # The device is 1 MiB larger than the image and full of other bytes.
    backing = tmp_path / "device.img"
    tail = os.urandom(1 << 20)
    backing.write_bytes(os.urandom(size) + tail)
    with blocksnap.Repository.init(tmp_path / "repo") as repo, loop_device(backing) as device:
        old = repo.snapshot("vol", ext4_base)
        repo.snapshot("vol", changed)
        result = repo.restore("vol", "latest", device)
        assert result.bytes_written == size and result.blocks_unchanged == 0
        assert read_device(device, size) == changed.read_bytes()
        # Written with O_DIRECT, all of it (the image ends on a 4 KiB boundary).
        assert written == {"direct": size}
        # Back to the older snapshot, writing only the blocks that differ.
        result = repo.restore("vol", old.id, device, only_changed=True)
        assert 0 < result.blocks_written < old.block_count // 4
        assert result.blocks_unchanged > old.block_count // 2
        data = read_device(device, size + len(tail))
        assert data[:size] == ext4_base.read_bytes()
        assert data[size:] == tail


def test_restore_onto_a_device_of_an_image_whose_end_is_not_aligned(
    tmp_path: Path, written: Counter[str]
) -> None:
    # Data longer than one direct write, zero blocks, and a last block of 1000 bytes, of
    # which the aligned writes cannot carry the last 1000 % 4096 bytes.
    rng = random.Random(7)
    image = tmp_path / "odd.img"
    parts = [rng.randbytes(DIRECT_RUN + (192 << 10)), bytes(3 << 16), rng.randbytes(5 << 16)]
    image.write_bytes(b"".join(parts) + rng.randbytes(1000))
    size = image.stat().st_size
    backing = tmp_path / "device.img"
    beyond = rng.randbytes((1 << 20) - size % (1 << 20))
    backing.write_bytes(rng.randbytes(size) + beyond)
    with blocksnap.Repository.init(tmp_path / "repo") as repo, loop_device(backing) as device:
        repo.snapshot("vol", image, block_size=64 << 10)
        result = repo.restore("vol", "latest", device)
        assert result.zero_blocks == 3 and result.bytes_written == size
        data = read_device(device, size + len(beyond))
        assert data[:size] == image.read_bytes()
        assert data[size:] == beyond
        assert written == {"direct": size - 1000, "buffered": 1000}


def test_a_device_that_refuses_direct_writes_midway_is_written_buffered(
    ext4_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first direct write stops short, the next ones fail with EINVAL (as a device
    with a logical block larger than 4 KiB answers): every byte still lands right."""
    size = ext4_base.stat().st_size
    backing = tmp_path / "device.img"
    backing.write_bytes(os.urandom(size))
    calls: Counter[str] = Counter()

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if _direct(fd):
            calls["direct"] += 1
            if calls["direct"] > 1:
                raise OSError(errno.EINVAL, "Invalid argument")
            return _real_pwrite(fd, memoryview(data)[: len(data) // 2 // 4096 * 4096], offset)
        calls["buffered"] += 1
        return _real_pwrite(fd, data, offset)

    with blocksnap.Repository.init(tmp_path / "repo") as repo, loop_device(backing) as device:
        repo.snapshot("vol", ext4_base)
        monkeypatch.setattr(os, "pwrite", pwrite)
        repo.restore("vol", "latest", device)
        monkeypatch.undo()
        assert read_device(device, size) == ext4_base.read_bytes()
    # Each worker gives direct writes up at its first refusal.
    assert 2 <= calls["direct"] <= 1 + (os.cpu_count() or 2)
    assert calls["buffered"] > 0
