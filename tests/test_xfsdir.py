"""XFS directory entries and symlink targets as stored, in every form: a NUL inside a
name is seen and refused by extract, and a target kept in blocks of its own is read whole."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import google_crc32c
import pyfsxfs
import pytest

import blocksnap
from blocksnap.extract import extract
from tests.fsimages import build

MARK = b"NULNAMEX"
WITH_NUL = "NUL\0AMEX"


def _inode_place(image: Path, number: int) -> tuple[int, int]:
    """Where inode `number` is in the image, and its size (see xfsattrs for the
    geometry)."""
    with open(image, "rb") as f:
        sb = f.read(512)
    block_size = int.from_bytes(sb[4:8], "big")
    ag_blocks = int.from_bytes(sb[0x54:0x58], "big")
    inode_size = int.from_bytes(sb[0x68:0x6A], "big")
    inopblog, agblklog = sb[0x7B], sb[0x7C]
    group, agino = number >> (agblklog + inopblog), number & ((1 << (agblklog + inopblog)) - 1)
    block, index = agino >> inopblog, agino & ((1 << inopblog) - 1)
    return (group * ag_blocks + block) * block_size + index * inode_size, inode_size


def test_xfs_nul_in_a_name_is_seen_and_long_target_read_whole(
    tmp_path: Path, repo: blocksnap.Repository
) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "ok.txt").write_bytes(b"ok\n")
    (tree / "d" / MARK.decode()).write_bytes(b"behind a NUL\n")
    long_target = "t" * 900  # too long for the inode: kept in a block of its own
    os.symlink(long_target, tree / "long")
    image = build("xfs", tree, tmp_path / "xfs.img", 300)
    volume = pyfsxfs.volume()
    volume.open(str(image))
    try:
        number = int(volume.get_file_entry_by_path("/d").inode_number)
        assert volume.get_file_entry_by_path("/long").symbolic_link_target == "XSLM"
    finally:
        volume.close()
    # The short-form directory is in /d's inode: make one byte of the name NUL, and the
    # inode's CRC right again, as a hostile image's would be.
    at, size = _inode_place(image, number)
    with open(image, "r+b") as f:
        f.seek(at)
        raw = bytearray(f.read(size))
        assert raw[:2] == b"IN" and raw.count(MARK) == 1
        raw[raw.find(MARK) + 3] = 0
        raw[0x64:0x68] = bytes(4)
        raw[0x64:0x68] = int(google_crc32c.value(bytes(raw))).to_bytes(4, "little")
        f.seek(at)
        f.write(raw)

    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        assert sorted(st.name for st in fs.listdir("/d")) == [WITH_NUL, "ok.txt"]
        assert fs.readlink("/long") == long_target
        report = extract(fs, ["/d", "/long"], str(tmp_path / "out"))
    assert report.skipped == [(f"/d/{WITH_NUL}", f"invalid name {WITH_NUL!r}")]
    assert os.listdir(tmp_path / "out" / "d") == ["ok.txt"]
    assert os.readlink(tmp_path / "out" / "long") == long_target


SIZES = (3, 100, 2000)  # a short-form, a leaf and a node directory with 4 KiB blocks


def _entry_name(i: int) -> str:
    return f"name-{i:06d}-" + "x" * (i % 40)


@pytest.mark.parametrize(
    "options",
    [
        ("-m", "crc=1"),
        ("-m", "crc=1", "-n", "size=16384"),  # directory blocks of 4 filesystem blocks
        ("-m", "crc=0"),  # v4, which this kernel no longer mounts
        ("-m", "crc=0", "-n", "ftype=0"),  # entries without the file type byte
    ],
)
def test_xfs_directory_forms_and_targets(
    options: tuple[str, ...], tmp_path: Path, repo: blocksnap.Repository
) -> None:
    """Every directory form and both symlink forms, on v5 and v4, written by mkfs.xfs
    from a prototype file (bytes names and all)."""
    source = tmp_path / "content"
    source.write_bytes(b"content\n")
    lines = [b"/dev/null", b"0 0", b"d--755 0 0"]
    for size in SIZES:
        lines.append(b"d%d d--755 0 0" % size)
        lines += [_entry_name(i).encode() + b" ---644 0 0 " + bytes(source) for i in range(size)]
        lines.append(b"$")
    # mkfs.xfs 6.1 writes a v5 symlink kept in blocks without their header, which the
    # kernel refuses as corrupt: that form on v5 is read in the test above.
    v4 = "crc=0" in options
    lines += [
        b"caf\xe9.txt ---644 0 0 " + bytes(source),
        b"short l--777 0 0 caf\xe9.txt",
        *([b"long l--777 0 0 " + b"t" * 900] if v4 else []),
        b"$",
    ]
    proto = tmp_path / "proto"
    proto.write_bytes(b"\n".join(lines) + b"\n")
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(300 << 20)
    subprocess.run(
        ["mkfs.xfs", "-q", "-f", *options, "-p", str(proto), str(image)],
        check=True,
        capture_output=True,
    )
    repo.snapshot("vol", image)
    latin1 = os.fsdecode(b"caf\xe9.txt")
    with repo.open_filesystem("vol") as fs:
        for size in SIZES:
            names = [st.name for st in fs.listdir(f"/d{size}")]
            assert names == sorted(_entry_name(i) for i in range(size)), size
        assert fs.stat(f"/d2000/{_entry_name(1234)}").size == 8
        assert {st.name for st in fs.listdir("/")} == {
            "d3",
            "d100",
            "d2000",
            latin1,
            "short",
            *(["long"] if v4 else []),
        }
        assert fs.open(f"/{latin1}").read() == b"content\n"
        assert fs.readlink("/short") == latin1
        if v4:
            assert fs.readlink("/long") == "t" * 900
