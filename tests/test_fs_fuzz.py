"""Damaged and truncated filesystem images: a named error, never a crash, hang or blow-up."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import blocksnap
from tests.fsimages import KINDS

DAMAGED_PER_KIND = 24
MEMORY_MIB = 1536
SECONDS_PER_SNAPSHOT = 30


def used_pieces(image: Path) -> list[int]:
    """Offsets of the 4 KiB pieces of the image that are not all zero: its metadata and
    data, where damage matters."""
    data = image.read_bytes()
    zero = bytes(4096)
    return [at for at in range(0, len(data), 4096) if data[at : at + 4096] != zero]


def damage(image: Path, used: list[int], out: Path, rng: random.Random) -> None:
    """A copy with runs of random bytes in used pieces, or a truncated copy."""
    shutil.copyfile(image, out)
    size = out.stat().st_size
    with open(out, "r+b") as f:
        if rng.random() < 0.15:
            f.truncate(rng.randrange(4096, size // 2))
            return
        for _ in range(rng.randint(2, 24)):
            f.seek(rng.choice(used) + rng.randrange(4096))
            f.write(rng.randbytes(rng.choice([1, 2, 4, 16, 512])))


def read_in_child(repo_path: Path, snapshots: int, volume: str = "vol") -> dict[str, int]:
    """Read every snapshot of `volume` in tests.fuzz_reader, under its memory and time
    limits; how many ended in each outcome.  A crash, hang or stray exception fails."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz_reader",
            str(repo_path),
            volume,
            str(MEMORY_MIB),
            str(SECONDS_PER_SNAPSHOT),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_SNAPSHOT * snapshots,
    )
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-3000:]}"
    outcomes: dict[str, int] = json.loads(proc.stdout)
    assert sum(outcomes.values()) == snapshots
    return outcomes


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_images_give_named_errors(
    kind: str, fs_images: dict[str, Path], tmp_path: Path
) -> None:
    rng = random.Random(f"fuzz-{kind}")
    repo_path = tmp_path / "repo"
    used = used_pieces(fs_images[kind])
    with blocksnap.Repository.init(repo_path) as repo:
        for i in range(DAMAGED_PER_KIND):
            variant = tmp_path / f"damaged{i}.img"
            damage(fs_images[kind], used, variant, rng)
            repo.snapshot("vol", variant)
            variant.unlink()
    outcomes = read_in_child(repo_path, DAMAGED_PER_KIND)
    assert set(outcomes) <= {"read", "FilesystemError"}, outcomes
    assert outcomes.get("FilesystemError", 0) >= 1, outcomes  # the damage did reach metadata


def test_store_damage_under_a_library_keeps_its_name(
    fs_images: dict[str, Path], repo: blocksnap.Repository
) -> None:
    """A damaged pack read from inside libfsext is an IntegrityError, not a filesystem
    error: the library's own error does not hide what went wrong."""
    repo.snapshot("vol", fs_images["ext4"])
    packs = sorted((Path(repo.store.path) / "packs").rglob("*"), key=lambda p: p.stat().st_size)
    pack = [p for p in packs if p.is_file()][-1]
    data = bytearray(pack.read_bytes())
    for at in range(4096, len(data) - 4096, 4096):
        data[at] ^= 0xFF
    pack.write_bytes(bytes(data))
    with pytest.raises(blocksnap.IntegrityError), repo.open_filesystem("vol") as fs:
        for entry in fs.walk("/"):
            if entry.stat.kind.value == "file":
                entry.read(0, entry.stat.size)
