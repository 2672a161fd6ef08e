"""The LMDB index as the CLI meets it: a damaged data file, map sizing and growth."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import blocksnap
from tests.conftest import debugfs, run_cli

PAGE = 4096


@pytest.fixture
def two_snapshots(tmp_path: Path, ext4_image: Path) -> tuple[Path, Path]:
    """A repository holding two snapshots of volume "vol" (the image as of the second)."""
    repo = tmp_path / "repo"
    run_cli("init", str(repo), check=True)
    run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
    debugfs(ext4_image, "rm /docs/note3.txt", "mkdir /new")
    run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
    return repo, ext4_image


def _commands(repo: Path, image: Path, out: Path) -> list[list[str]]:
    r = str(repo)
    return [
        ["list", r],
        ["info", r, "vol", "latest"],
        ["ls", r, "vol", "latest", "/docs"],
        ["cat", r, "vol", "latest", "/docs/note0.txt"],
        ["diff", r, "vol", "latest~1", "latest"],
        ["stats", r],
        ["verify", r],
        ["verify", r, "--read-data"],
        ["restore", r, "vol", "latest", str(out / "restored.img")],
        ["snapshot", r, "vol", str(image)],
        ["prune", r, "vol", "--keep-last", "1"],
        ["gc", r],
        ["protect", r, "vol", "latest"],
        ["policy", r, "vol", "--keep-last", "3"],
    ]


@pytest.mark.parametrize("size", ["half", "page-less", "one-page", "empty"])
def test_index_truncated_data_file_is_one_line_integrity_error(
    two_snapshots: tuple[Path, Path], tmp_path: Path, size: str
) -> None:
    repo, image = two_snapshots
    data = repo / "index" / "data.mdb"
    full = data.stat().st_size
    new_size = {"half": full // 2, "page-less": full - PAGE, "one-page": PAGE, "empty": 0}[size]
    os.truncate(data, new_size)
    for args in _commands(repo, image, tmp_path):
        proc = run_cli(*args)
        assert proc.returncode == blocksnap.IntegrityError.exit_code, (args, proc)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "index" in proc.stderr and f"repair {repo} --rebuild-index" in proc.stderr
    run_cli("repair", str(repo), "--rebuild-index", check=True)
    run_cli("verify", str(repo), "--read-data", check=True)
    run_cli("restore", str(repo), "vol", "latest", str(tmp_path / "after.img"), check=True)
    assert (tmp_path / "after.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("seed", range(4))
def test_index_random_bytes_in_pages_never_kill_the_process(
    two_snapshots: tuple[Path, Path], tmp_path: Path, seed: int
) -> None:
    repo, image = two_snapshots
    rng = random.Random(seed)
    data = repo / "index" / "data.mdb"
    pages = data.stat().st_size // PAGE
    with open(data, "r+b") as f:
        for page in rng.sample(range(2, pages), min(4, pages - 2)):  # the meta pages stay
            f.seek(page * PAGE + rng.randrange(PAGE // 2))
            f.write(rng.randbytes(rng.randrange(16, PAGE // 2)))
    for args in _commands(repo, image, tmp_path):
        proc = run_cli(*args)
        assert proc.returncode >= 0, (args, proc)  # not killed by a signal
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
