"""ext directory entries as stored: a NUL inside a name is seen, not cut, and refused by
extract; damaged entries are named, not read past."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import blocksnap
from blocksnap.fs.extattrs import ExtAttributes, raw_crc32c
from blocksnap.fs.extdir import DirectoryDamage, region_entries
from tests.conftest import run_cli

MARK = b"NULNAMEX"  # a name written by mkfs, then one of its bytes made NUL in the image
WITH_NUL = "NUL\0AMEX"


def _stat_field(image: Path, path: str, field: str) -> int:
    shown = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return int(re.search(rf"{field}:\s*(\d+)", shown).group(1))  # type: ignore[union-attr]


def _image_with_nul_name(tmp_path: Path, features: str) -> Path:
    """An ext4 image whose directory /d holds "ok.txt" and an entry named "NUL\\0AMEX".
    With metadata_csum the directory block's checksum is made right again, as a hostile
    image's would be."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "ok.txt").write_bytes(b"ok\n")
    (tree / "d" / MARK.decode()).write_bytes(b"behind a NUL\n")
    image = tmp_path / "nul.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", features, "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )
    if "inline_data" in features:
        shown = subprocess.run(
            ["debugfs", "-R", "stat /d", str(image)], capture_output=True, text=True, check=True
        ).stdout
        assert "Size of inline data" in shown  # its entries are in the inode
    data = bytearray(image.read_bytes())
    at = data.find(MARK)
    assert at > 0 and data.find(MARK, at + 1) < 0
    data[at + 3] = 0
    if "^metadata_csum" not in features:
        start = at - at % 4096
        block = data[start : start + 4096]
        assert block[-12:-4] == b"\0\0\0\0\x0c\x00\x00\xde"  # the checksum tail
        with open(image, "rb") as f:
            seed = ExtAttributes(f, lambda n, s: b"").seed
        assert seed is not None
        inode = _stat_field(image, "/d", "Inode")
        generation = _stat_field(image, "/d", "Generation")
        crc = raw_crc32c(seed, inode.to_bytes(4, "little"))
        crc = raw_crc32c(crc, generation.to_bytes(4, "little"))
        crc = raw_crc32c(crc, bytes(block[:-12]))
        data[start + 4092 : start + 4096] = crc.to_bytes(4, "little")
    image.write_bytes(data)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert "illegal characters in its name" in fsck.stdout
    assert "checksum" not in fsck.stdout, fsck.stdout
    return image


@pytest.mark.parametrize(
    "features",
    ["metadata_csum", "^metadata_csum,inline_data"],  # a directory block; one in the inode
)
def test_nul_in_a_name_is_seen_and_extract_refuses_it(
    features: str, tmp_path: Path, repo: blocksnap.Repository
) -> None:
    image = _image_with_nul_name(tmp_path, features)
    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        assert sorted(st.name for st in fs.listdir("/d")) == [WITH_NUL, "ok.txt"]
    root = str(tmp_path / "repo")
    assert run_cli("ls", root, "vol", "latest", "/d", check=True).stdout == (
        "NUL\\x00AMEX\nok.txt\n"
    )
    doc = json.loads(run_cli("ls", root, "vol", "latest", "/d", "--json", check=True).stdout)
    assert sorted(e["name"] for e in doc["entries"]) == [WITH_NUL, "ok.txt"]
    out = tmp_path / "out"
    proc = run_cli("extract", root, "vol", "latest", "/d", "--to", str(out))
    assert proc.returncode == 1
    assert "blocksnap: skipped /d/NUL\\x00AMEX: invalid name" in proc.stderr
    assert "1 refused" in proc.stdout
    assert os.listdir(out / "d") == ["ok.txt"]  # and no "NUL", cut at the NUL


@pytest.mark.parametrize(
    ("region", "why"),
    [
        (b"\x02\0\0\0\x0c\0\x01\x02.\0\0\0" + bytes(4), "runs past its end"),  # a half header
        (b"\x02\0\0\0\x08\0\x05\x01abcde\0\0\0", "impossible length"),  # name past record
        (b"\x02\0\0\0\0\0\0\0", "impossible length"),  # a zero record length: no loop
        (b"\x02\0\0\0\x0a\0\x01\x01a\0", "impossible length"),  # not a multiple of 4
        (b"\x02\0\0\0\x10\0\x01\x01a\0\0\0", "impossible length"),  # past the region
    ],
)
def test_region_entries_names_damage(region: bytes, why: str) -> None:
    with pytest.raises(DirectoryDamage, match=why):
        list(region_entries(region, filetype=True, where="block 0"))


def test_region_entries_reads_every_used_entry() -> None:
    entries = (
        b"\x0c\0\0\0\x0c\0\x01\x02.\0\0\0"  # "." of inode 12
        + b"\0\0\0\0\x0c\0\x03\x01old\0"  # unused (inode 0)
        + b"\x0d\0\0\0\x10\0\x04\x01caf\xe9\0\0\0\0"  # 16 bytes, Latin-1
        + b"\x0e\0\0\0\x0c\0\x03\x01a\0b\0"  # a NUL inside
    )
    assert list(region_entries(entries, filetype=True, where="block 0")) == [
        ("caf\udce9", 13),
        ("a\0b", 14),
    ]
