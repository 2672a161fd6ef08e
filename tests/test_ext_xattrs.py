"""ext extended attributes read by blocksnap's own reader: every layout the format has,
POSIX ACLs, values in their own inode, and damage named rather than returned."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

import blocksnap
from tests.fsimages import CAPS
from tests.test_files import compare_tree

FILES = 300


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the form setxattr(2) takes: version 2, (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


NO_ID = 0xFFFFFFFF
ACCESS_ACL = acl(
    (0x01, 6, NO_ID),
    (0x02, 4, 1234),
    (0x04, 4, NO_ID),
    (0x08, 6, 99),
    (0x10, 6, NO_ID),
    (0x20, 0, NO_ID),
)
DEFAULT_ACL = acl((0x01, 7, NO_ID), (0x04, 5, NO_ID), (0x20, 5, NO_ID))


def make_tree(root: Path) -> Path:
    """Files with attributes of every namespace and size, in directories with ACLs."""
    (root / "d").mkdir(parents=True)
    os.setxattr(root / "d", "system.posix_acl_default", DEFAULT_ACL)
    os.setxattr(root / "d", "system.posix_acl_access", ACCESS_ACL)
    for i in range(FILES):
        path = root / "d" / f"f{i:03d}"
        path.write_bytes(f"file {i}\n".encode())
        os.setxattr(path, "user.n", str(i).encode())
        if i % 7 == 0:
            os.setxattr(path, "user.long", bytes([i % 251]) * (100 + i))
        if i % 11 == 0:
            os.setxattr(path, "trusted.t", b"trusted value " * 10)
            os.setxattr(path, "security.s", b"s" * 61)
        if i % 13 == 0:
            os.setxattr(path, "system.posix_acl_access", ACCESS_ACL)
    return root


# Each layout the reader must find inodes and attributes in.
LAYOUTS = {
    # 1 KiB blocks, 64-byte descriptors in meta_bg groups: with 16 inodes a group, the
    # later files' inodes sit in groups whose descriptors are past the first meta group.
    "meta_bg-1k": (["-b", "1024", "-O", "meta_bg,^resize_inode", "-N", "512"], 256),
    # no metadata_csum, no extents, 256-byte inodes: ext3 as mkfs.ext3 makes it
    "ext3": (["-t", "ext3"], 64),
    # 128-byte inodes: no room in the inode, every attribute in an xattr block
    "inode-128": (["-I", "128"], 64),
    # values too long for a block are kept in inodes of their own (written by the kernel)
    "ea_inode": (["-O", "ea_inode", "-b", "1024"], 64),
}


def build(tree: Path, image: Path, args: list[str], size_mb: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", *args, "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )


BIG_VALUES = {"user.k20000": os.urandom(20000), "user.s3000": b"x" * 3000}


def ea_inode_values(image: Path, point: Path) -> None:
    """/big, with values of 3,000 and 20,000 bytes the kernel keeps in inodes of their
    own (too long for the host's filesystem: they are compared as read, not restored)."""
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        (point / "big").write_bytes(b"big\n")
        for name, value in BIG_VALUES.items():
            os.setxattr(point / "big", name, value)
    finally:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_attribute_restores_in_every_layout(
    layout: str, repo: blocksnap.Repository, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    image = tmp_path / "vol.img"
    args, size_mb = LAYOUTS[layout]
    build(tree, image, args, size_mb)
    if layout == "ea_inode":
        ea_inode_values(image, tmp_path / "mnt")
        # in 1 KiB blocks, only an inode of its own holds 20,000 bytes
        assert "user.k20000 (20000)" in stat_of(image, "/big")
    shown = subprocess.run(
        ["debugfs", "-R", f"stat /d/f{FILES - 1:03d}", str(image)], capture_output=True, text=True
    ).stdout
    inode = int(re.search(r"Inode: (\d+)", shown).group(1))  # type: ignore[union-attr]
    if layout == "meta_bg-1k":
        assert inode > 16 * 16  # in the second meta group (16 groups of 16 inodes)

    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        assert fs.xattrs("/d")["system.posix_acl_default"] == DEFAULT_ACL
        assert fs.xattrs("/d/f013")["system.posix_acl_access"] == ACCESS_ACL
        last = f"d/f{FILES - 1:03d}"
        assert fs.xattrs(f"/{last}") == {
            n: os.getxattr(tree / last, n) for n in os.listxattr(tree / last)
        }
        if layout == "ea_inode":
            assert fs.xattrs("/big") == BIG_VALUES
        report = fs.extract(["/d"], str(tmp_path / "out"))
    assert report.skipped == [] and report.warnings == []
    assert compare_tree(tree, tmp_path / "out", CAPS["ext4"]) == FILES + 1


def stat_of(image: Path, path: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout


def flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_damaged_attributes_are_named_not_returned(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """A flipped byte in a value in an xattr block, or in an inode's times: the checksums
    of metadata_csum find it, and blocksnap names it."""
    tree = make_tree(tmp_path / "tree")
    image = tmp_path / "vol.img"
    block_size = 4096
    build(tree, image, ["-b", str(block_size)], 64)
    acl_block = int(re.search(r"File ACL: (\d+)", stat_of(image, "/d/f014")).group(1))  # type: ignore[union-attr]
    assert acl_block
    with open(image, "rb") as f:
        f.seek(acl_block * block_size)
        data = f.read(block_size)
    flip(image, acl_block * block_size + data.index(bytes([14]) * 100))  # user.long's value
    where = subprocess.run(
        ["debugfs", "-R", "imap /d/f005", str(image)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"block (\d+), offset (0x[0-9a-f]+)", where)
    assert found is not None
    flip(image, int(found.group(1)) * block_size + int(found.group(2), 16) + 0x10)  # mtime

    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        with pytest.raises(blocksnap.XattrsIncompleteError) as err:
            fs.xattrs("/d/f014")
        why = f"xattr block {acl_block} is damaged: its checksum does not match"
        assert err.value.unreadable == {"user.long": why}
        assert err.value.readable == {"user.n": b"14"}  # kept in the inode
        report = fs.extract(["/d/f014"], str(tmp_path / "out"))
        assert report.warnings == [("/d/f014", f"xattr user.long not restored: {why}")]
        assert (tmp_path / "out" / "f014").read_bytes() == b"file 14\n"
        # libfsext would return the wrong time without a word
        with pytest.raises(blocksnap.FilesystemError, match=r"inode \d+ is damaged: its checksum"):
            fs.stat("/d/f005")
