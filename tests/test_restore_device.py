"""Restore onto block devices (loop devices): the whole image and only the changed blocks,
written with O_DIRECT in aligned runs, with an image end that is not aligned and a
device larger than the image, whose bytes past the image stay as they were."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import blocksnap
from blocksnap.restore import DIRECT_RUN
from tests.conftest import debugfs


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def read_device(device: str, size: int) -> bytes:
    with open(device, "rb") as f:
        return f.read(size)


def test_restore_onto_a_device_whole_then_only_changed(ext4_base: Path, tmp_path: Path) -> None:
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
        # Back to the older snapshot, writing only the blocks that differ.
        result = repo.restore("vol", old.id, device, only_changed=True)
        assert 0 < result.blocks_written < old.block_count // 4
        assert result.blocks_unchanged > old.block_count // 2
        data = read_device(device, size + len(tail))
        assert data[:size] == ext4_base.read_bytes()
        assert data[size:] == tail


def test_restore_onto_a_device_of_an_image_whose_end_is_not_aligned(tmp_path: Path) -> None:
    # Runs longer than one direct write, zero blocks between them, and a last block of
    # 1000 bytes that the aligned writes cannot carry.
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
