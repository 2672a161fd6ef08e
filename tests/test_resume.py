"""--resume never mixes sources: another medium under the same name is refused."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import UsageError
from tests.conftest import interrupt_after

SIZE = 32 << 20
CHECKPOINT = 8 << 20


def noise(path: Path, seed: int) -> Path:
    """An image of compressible but distinct blocks (no two images alike)."""
    rng = random.Random(seed)
    words = [rng.randbytes(8) for _ in range(512)]
    with open(path, "wb") as f:
        for _ in range(SIZE // 8):
            f.write(rng.choice(words))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("resume")
    return noise(base / "a.img", 1), noise(base / "b.img", 2)


@pytest.fixture
def loop(images: tuple[Path, Path]) -> Iterator[str]:
    """A read-only loop device over image a, detached afterwards."""
    device = subprocess.run(
        ["losetup", "-f", "--show", "-r", str(images[0])],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def reattach(device: str, image: Path) -> None:
    subprocess.run(["losetup", "-d", device], check=True)
    subprocess.run(["losetup", "-r", device, str(image)], check=True)


def interrupted(repo: blocksnap.Repository, source: object, **kwargs: object) -> None:
    with pytest.raises(blocksnap.Interrupted):
        repo.snapshot(
            "vol",
            source,  # type: ignore[arg-type]
            checkpoint_size=CHECKPOINT,
            progress=interrupt_after(SIZE // 2),
            **kwargs,  # type: ignore[arg-type]
        )
    checkpoint = repo.checkpoint("vol")
    assert checkpoint is not None and checkpoint.block_count > 0


def restored(repo: blocksnap.Repository, info: blocksnap.SnapshotInfo, tmp_path: Path) -> str:
    target = tmp_path / "restored.img"
    target.unlink(missing_ok=True)
    repo.restore("vol", info.id, target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_loop_device_attached_to_another_image_is_refused(
    repo: blocksnap.Repository, images: tuple[Path, Path], loop: str, tmp_path: Path
) -> None:
    a, b = images
    interrupted(repo, loop)
    reattach(loop, b)  # same device, same size, another image
    with pytest.raises(UsageError, match="is not the source it read"):
        repo.snapshot("vol", loop, resume=True)
    # Even the same image attached again is another medium to the kernel: refused too.
    reattach(loop, a)
    with pytest.raises(UsageError, match="is not the source it read"):
        repo.snapshot("vol", loop, resume=True)
    # A run without --resume is whole and right.
    info = repo.snapshot("vol", loop)
    assert restored(repo, info, tmp_path) == digest(a)
    assert repo.verify(read_data=True).ok


def test_a_source_id_vouches_for_the_medium_and_the_content_is_still_compared(
    repo: blocksnap.Repository, images: tuple[Path, Path], loop: str, tmp_path: Path
) -> None:
    a, b = images
    interrupted(repo, loop, source_id="lv-snap-0001")
    reattach(loop, b)
    with pytest.raises(UsageError, match="differs from what it read there"):
        repo.snapshot("vol", loop, resume=True, source_id="lv-snap-0001")
    reattach(loop, a)
    with pytest.raises(UsageError, match="is not the source it read"):
        repo.snapshot("vol", loop, resume=True, source_id="lv-snap-0002")
    info = repo.snapshot("vol", loop, resume=True, source_id="lv-snap-0001")
    assert info.counts.resumed > 0
    assert restored(repo, info, tmp_path) == digest(a)


def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_refused(
    repo: blocksnap.Repository, images: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = images
    source = tmp_path / "vol.img"
    shutil.copyfile(a, source)
    interrupted(repo, source)
    before = source.stat()
    shutil.copyfile(b, source)  # in place: the same inode
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = source.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    with pytest.raises(UsageError, match="is not the source it read"):
        repo.snapshot("vol", source, resume=True)
    info = repo.snapshot("vol", source)
    assert restored(repo, info, tmp_path) == digest(b)


def test_a_stream_resumes_only_with_a_source_id(
    repo: blocksnap.Repository, images: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = images
    with open(a, "rb") as stream:
        interrupted(repo, stream)
    with open(a, "rb") as stream, pytest.raises(UsageError, match="--source-id"):
        repo.snapshot("vol", stream, resume=True)
    with open(a, "rb") as stream:
        interrupted(repo, stream, source_id="export-17")
    with open(b, "rb") as stream, pytest.raises(UsageError, match="differs from what it read"):
        repo.snapshot("vol", stream, resume=True, source_id="export-17")
    with open(a, "rb") as stream:
        info = repo.snapshot("vol", stream, resume=True, source_id="export-17")
    assert info.counts.resumed > 0
    assert restored(repo, info, tmp_path) == digest(a)
    assert repo.verify(read_data=True).ok
