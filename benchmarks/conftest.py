"""Benchmark fixtures: a real ext4 image and a changed copy, sized by BLOCKSNAP_BENCH_IMAGE_MB.

The default (64 MiB) is the quick pass CI runs; the README's full run sets 2048, which
builds a 2 GiB image holding about 1.2 GiB of mixed files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import debugfs, make_tree, mkfs_ext4

IMAGE_MB = int(os.environ.get("BLOCKSNAP_BENCH_IMAGE_MB", "64"))


@pytest.fixture(scope="session")
def bench_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(image, changed image): the second has about 2% of its files rewritten."""
    root = tmp_path_factory.mktemp("bench")
    make_tree(root / "tree", seed=2, size_mb=IMAGE_MB * 6 // 10)
    image = mkfs_ext4(root / "image.img", root / "tree", IMAGE_MB)
    changed = root / "changed.img"
    shutil.copyfile(image, changed)
    blobs = sorted((root / "tree" / "data").iterdir())
    victims = blobs[:: max(1, len(blobs) // max(1, len(blobs) // 50))][: max(1, len(blobs) // 50)]
    debugfs(
        changed,
        *[f"rm data/{v.name}" for v in victims],
        *[f"write {v} data/{v.name}.new" for v in victims],
    )
    return image, changed
