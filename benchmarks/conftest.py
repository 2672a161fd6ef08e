"""Benchmark fixtures: real ext4 images and changed copies, sized by environment knobs.

BLOCKSNAP_BENCH_IMAGE_MB sizes the throughput benchmarks' image: the default (64) is the
quick pass CI runs; the README's full run sets 2048, a 2 GiB image holding about 1.2 GiB
of mixed files.  BLOCKSNAP_BENCH_MEMORY_MB lists the image sizes whose peak memory is
measured: "48,96" in the quick pass, "1024,4096" in the full run.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from tests.conftest import debugfs, make_tree, mkfs_ext4

IMAGE_MB = int(os.environ.get("BLOCKSNAP_BENCH_IMAGE_MB", "64"))


MEMORY_MB = [int(v) for v in os.environ.get("BLOCKSNAP_BENCH_MEMORY_MB", "48,96").split(",")]

ImagePair = tuple[Path, Path]


class ImageFactory:
    """Builds (image, changed image) pairs by size, once per session each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[int, ImagePair] = {}

    def __call__(self, size_mb: int) -> ImagePair:
        if size_mb not in self.made:
            self.made[size_mb] = make_pair(self.root / f"{size_mb}M", size_mb)
        return self.made[size_mb]


def make_pair(root: Path, size_mb: int, seed: int = 2) -> ImagePair:
    """A size_mb ext4 image about 60% full of mixed files, and a copy with 2% rewritten."""
    make_tree(root / "tree", seed=seed, size_mb=size_mb * 6 // 10)
    image = mkfs_ext4(root / "image.img", root / "tree", size_mb)
    changed = root / "changed.img"
    shutil.copyfile(image, changed)
    debugfs(changed, *change_files(root / "tree", root / "edits", percent=2))
    shutil.rmtree(root / "tree")
    shutil.rmtree(root / "edits")
    return image, changed


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    return ImageFactory(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="session")
def bench_images(images: ImageFactory) -> ImagePair:
    """(image, changed image) of BLOCKSNAP_BENCH_IMAGE_MB: 2% of its files rewritten."""
    return images(IMAGE_MB)


def change_files(tree: Path, edits: Path, percent: int) -> list[str]:
    """debugfs commands that rewrite about percent% of the data files with edited content.

    Each chosen file gets 8 new bytes in every 4 KiB, so its blocks really differ while it
    compresses as before; debugfs writes it to freshly allocated blocks, as an application
    saving a file does.
    """
    rng = random.Random(percent)
    edits.mkdir(exist_ok=True)
    blobs = sorted((tree / "data").iterdir())
    count = max(1, len(blobs) * percent // 100)
    commands = []
    for blob in blobs[:: max(1, len(blobs) // count)][:count]:
        data = bytearray(blob.read_bytes())
        for off in range(0, len(data), 4096):
            data[off : off + 8] = rng.randbytes(8)
        (edits / blob.name).write_bytes(data)
        commands += [f"rm data/{blob.name}", f"write {edits / blob.name} data/{blob.name}"]
    return commands
