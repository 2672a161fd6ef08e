"""Extended attributes read by blocksnap's own readers of ext and XFS: every layout each
format has, POSIX ACLs, values kept outside the inode, and damage named, never returned;
and NTFS alternate data streams as user.* attributes."""

from __future__ import annotations

import functools
import os
import random
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import google_crc32c
import pytest

import blocksnap
from blocksnap.extract import extract
from blocksnap.fs.extattrs import ExtAttributes, raw_crc32c
from blocksnap.fs.xfsattrs import XfsAttributes
from tests.conftest import flip
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
def test_ext_attributes_restore_in_every_layout(
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
        report = extract(fs, ["/d"], str(tmp_path / "out"))
    assert report.skipped == [] and report.warnings == []
    assert compare_tree(tree, tmp_path / "out", CAPS["ext4"]) == FILES + 1


def stat_of(image: Path, path: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout


def test_ext_damaged_attributes_are_named_not_returned(
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
        report = extract(fs, ["/d/f014"], str(tmp_path / "out"))
        assert report.warnings == [("/d/f014", f"xattr user.long not restored: {why}")]
        assert (tmp_path / "out" / "f014").read_bytes() == b"file 14\n"
        # libfsext would return the wrong time without a word
        with pytest.raises(blocksnap.FilesystemError, match=r"inode \d+ is damaged: its checksum"):
            fs.stat("/d/f005")


# --- XFS ---------------------------------------------------------------------------


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path)}


def blank_xfs(tmp_path: Path, *options: str) -> tuple[Path, Path]:
    """An empty 300 MiB XFS v5 image, and a directory to mount it on."""
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(300 << 20)
    subprocess.run(["mkfs.xfs", "-q", *options, str(image)], check=True, capture_output=True)
    point = tmp_path / "mnt"
    point.mkdir()
    return image, point


def xfs_every_form(
    tmp_path: Path, *options: str
) -> tuple[Path, dict[str, dict[str, bytes]], dict[str, int]]:
    """An XFS v5 image whose attributes the kernel wrote in each form it keeps them: in
    the inode, in a leaf, in a node's leaves, in blocks of their own through a B+tree
    block map; ACLs; the trusted and security namespaces.  Returns the image, what the
    kernel listed per path, and the inode numbers of /d/node and /d/remote."""
    image, point = blank_xfs(tmp_path, *options)
    seen: dict[str, dict[str, bytes]] = {}
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        (point / "d").mkdir()
        os.setxattr(point / "d", "system.posix_acl_default", DEFAULT_ACL)
        (point / "d" / "local").write_bytes(b"local\n")
        os.setxattr(point / "d" / "local", "user.a", b"short")
        os.setxattr(point / "d" / "local", "security.s", b"s" * 61)
        (point / "d" / "node").write_bytes(b"node\n")
        for i in range(300):  # more than a 4 KiB leaf holds: a node over leaves
            os.setxattr(point / "d" / "node", f"user.attribute-{i:04d}", b"v" * (20 + i % 40))
        os.setxattr(point / "d" / "node", "system.posix_acl_access", ACCESS_ACL)
        (point / "d" / "remote").write_bytes(b"remote\n")
        os.setxattr(point / "d" / "remote", "trusted.t", b"t" * 200)
        fd = os.open(point / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for i in range(80):  # values in blocks of their own, the file between them
                os.setxattr(point / "d" / "remote", f"user.r{i:03d}", os.urandom(5000 + i))
                os.write(fd, os.urandom(8192))
                os.fsync(fd)
                os.sync()
        finally:
            os.close(fd)
        for name in ("local", "node", "remote"):
            seen[f"/d/{name}"] = xattrs_of(point / "d" / name)
        seen["/d"] = xattrs_of(point / "d")
        inodes = {name: (point / "d" / name).stat().st_ino for name in ("node", "remote")}
    finally:
        subprocess.run(["umount", str(point)], check=True)
    return image, seen, inodes


def xfs_db(image: Path, *commands: str) -> str:
    args = [a for c in commands for a in ("-c", c)]
    return subprocess.run(
        ["xfs_db", "-r", *args, str(image)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("options", [(), ("-i", "nrext64=1")], ids=["v5", "nrext64"])
def test_xfs_attributes_in_every_form(
    options: tuple[str, ...], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """What the kernel lists is what blocksnap reads, in every form XFS v5 keeps it, also
    with large extent counts (nrext64, which moves the attribute extent count)."""
    image, seen, inodes = xfs_every_form(tmp_path, *options)
    remote, node = f"inode {inodes['remote']}", f"inode {inodes['node']}"
    assert "core.aformat = 3 (btree)" in xfs_db(image, remote, "print core.aformat")
    assert "0x3ebe" in xfs_db(image, node, "ablock 0", "print hdr.info.hdr.magic")  # a node
    assert seen["/d/local"] == {"user.a": b"short", "security.s": b"s" * 61}
    assert len(seen["/d/remote"]) == 81 and "system.posix_acl_access" in seen["/d/node"]

    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        for path, listed in seen.items():
            # The kernel lists an ACL twice, also as the raw trusted.SGI_ACL_* it is kept
            # in; blocksnap returns it once, in the form any filesystem takes.
            expected = {k: v for k, v in listed.items() if not k.startswith("trusted.SGI_ACL")}
            assert fs.xattrs(path) == expected, path
        # (the other files hold more than the test's own filesystem takes)
        report = extract(fs, ["/d/local"], str(tmp_path / "out"))
    assert report.warnings == []
    assert xattrs_of(tmp_path / "out" / "local") == seen["/d/local"]


def test_xfs_v4_attributes(repo: blocksnap.Repository, tmp_path: Path) -> None:
    """XFS v4 (no CRCs; this kernel no longer mounts it): attributes set by xfs_db, which
    fills a value of N bytes with "v", in the inode, in a leaf and in remote blocks."""
    image = tmp_path / "xfs4.img"
    with open(image, "wb") as f:
        f.truncate(300 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "crc=0", str(image)], check=True, capture_output=True)
    small = {"user.small": 10, "trusted.tr": 200, "security.se": 70}
    big = {**small, "user.big": 5000, "user.bigger": 20000}
    for inode, wanted in ((128, big), (129, small)):  # the root directory; two inodes past it
        commands = [f"inode {inode}"]
        for name, size in wanted.items():
            space, short = name.split(".", 1)
            flag = {"user": "", "trusted": "-r ", "security": "-s "}[space]
            commands.append(f"attr_set {flag}-n {short} -v {size}")
        args = [a for c in commands for a in ("-c", c)]
        subprocess.run(["xfs_db", "-x", *args, str(image)], check=True, capture_output=True)
    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        assert fs.xattrs("/") == {name: b"v" * size for name, size in big.items()}


def test_xfs_damaged_attributes_are_named_not_returned(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """A flipped byte in a value kept in blocks of its own, or in an inode's times: the
    CRCs of XFS v5 find it, and blocksnap names it."""
    image, point = blank_xfs(tmp_path)
    value = os.urandom(5000)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        for name in ("f", "g"):
            (point / name).write_bytes(b"data\n")
            os.setxattr(point / name, "user.small", b"kept in the leaf")
        os.setxattr(point / "f", "user.big", value)
        inode = (point / "g").stat().st_ino
    finally:
        subprocess.run(["umount", str(point)], check=True)
    flip(image, image.read_bytes().index(value[:64]) + 10)
    shown = subprocess.run(
        ["xfs_db", "-r", "-c", f"convert inode {inode} byte", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flip(image, int(shown.split()[0], 16) + 0x24)  # the low bits of its atime

    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        with pytest.raises(blocksnap.XattrsIncompleteError) as err:
            fs.xattrs("/f")
        assert err.value.readable == {"user.small": b"kept in the leaf"}
        assert list(err.value.unreadable) == ["user.big"]
        assert "is damaged: its checksum does not match" in err.value.unreadable["user.big"]
        with pytest.raises(blocksnap.FilesystemError, match=r"inode \d+ is damaged: its checksum"):
            fs.stat("/g")


def mutations(
    image: Path, where: int, size: int, crc_at: int, crc: Callable[[bytes], int], count: int
) -> Iterator[None]:
    """`count` times: random bytes written into the `size` bytes at `where`, the
    structure's checksum (at `crc_at` in it) recomputed so that the damage gets past it;
    then the original put back."""
    rng = random.Random(f"{where}")
    original = image.read_bytes()[where : where + size]
    try:
        for _ in range(count):
            data = bytearray(original)
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(size)
                data[at : at + 4] = rng.randbytes(rng.choice([1, 2, 4]))
            data = data[:size]
            data[crc_at : crc_at + 4] = b"\0\0\0\0"
            data[crc_at : crc_at + 4] = crc(bytes(data)).to_bytes(4, "little")
            with open(image, "r+b") as f:
                f.seek(where)
                f.write(data)
            yield
    finally:
        with open(image, "r+b") as f:
            f.seek(where)
            f.write(original)


def read_or_name(read: Callable[[], object]) -> str:
    try:
        read()
    except blocksnap.XattrsIncompleteError:
        return "incomplete"
    except blocksnap.FilesystemError:
        return "error"
    return "read"


def count(outcomes: dict[str, int], read: Callable[[], object]) -> None:
    """Read, and count how it ended: attributes, some named unreadable, or a named error."""
    try:
        read()
        outcome = "read"
    except blocksnap.XattrsIncompleteError:
        outcome = "incomplete"
    except blocksnap.FilesystemError:
        outcome = "error"
    outcomes[outcome] = outcomes.get(outcome, 0) + 1


def test_hostile_xfs_attribute_structures_are_read_or_named(tmp_path: Path) -> None:
    """XFS attribute structures changed at random with their CRCs made right again, as a
    hostile image would have them: each read gives attributes or a named error, never
    another exception or a hang."""
    image, _, inodes = xfs_every_form(tmp_path)

    def at(*commands: str) -> int:
        return int(xfs_db(image, *commands).split()[0], 16)

    def bno(*commands: str) -> int:
        return int(xfs_db(image, *commands, "print hdr.info.bno").split("=")[1]) * 512

    node, remote = inodes["node"], inodes["remote"]
    bmbt = int(xfs_db(image, f"inode {remote}", "print a.bmbt.ptrs").split("=")[-1])
    structures = [  # (offset, size, CRC offset, inode to read)
        (at(f"convert inode {remote} byte"), 512, 0x64, remote),  # the B+tree root
        (at(f"convert inode {node - 1} byte"), 512, 0x64, node - 1),  # /d/local's fork
        (bno(f"inode {node}", "ablock 0"), 4096, 12, node),  # node
        (bno(f"inode {node}", "ablock 1"), 4096, 12, node),  # leaf
        (at(f"convert fsb {bmbt} byte"), 4096, 0x40, remote),  # block map block
        (image.read_bytes().index(b"XARM"), 4096, 12, remote),  # a remote value's block
    ]
    outcomes: dict[str, int] = {}
    with open(image, "rb") as f:
        reader = XfsAttributes(f)
        for where, size, crc_at, inode in structures:
            for _ in mutations(image, where, size, crc_at, google_crc32c.value, 40):
                count(outcomes, functools.partial(lambda n: reader.of(n).complete(), inode))
    assert set(outcomes) <= {"read", "incomplete", "error"}, outcomes
    assert outcomes.get("incomplete", 0) >= 20, outcomes  # the damage reached the parsing


def test_hostile_ext_xattr_blocks_are_read_or_named(tmp_path: Path) -> None:
    """The same for an ext4 xattr block, its checksum made right again."""
    image = tmp_path / "ext.img"
    build(make_tree(tmp_path / "tree"), image, ["-b", "4096"], 64)
    shown = stat_of(image, "/d/f014")
    block = int(re.search(r"File ACL: (\d+)", shown).group(1))  # type: ignore[union-attr]
    inode = int(re.search(r"Inode: (\d+)", shown).group(1))  # type: ignore[union-attr]
    outcomes: dict[str, int] = {}
    with open(image, "rb") as f:
        reader = ExtAttributes(f, lambda number, size: b"")
        seed = reader.seed
        assert seed is not None

        def block_crc(data: bytes) -> int:
            return raw_crc32c(raw_crc32c(seed, block.to_bytes(8, "little")), data)

        for _ in mutations(image, block * 4096, 4096, 0x10, block_crc, 200):
            count(outcomes, lambda: reader.of(inode).complete())
    assert set(outcomes) <= {"read", "incomplete", "error"}, outcomes
    assert outcomes.get("incomplete", 0) >= 20, outcomes


def test_ntfs_streams_are_user_xattrs(repo: blocksnap.Repository, tmp_path: Path) -> None:
    """Alternate data streams come back as the user.* attributes ntfs-3g shows them as;
    one longer than an attribute can hold is named in a warning, the rest restored."""
    image, point = tmp_path / "ntfs.img", tmp_path / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkntfs", "-q", "-F", "-f", str(image)], check=True, capture_output=True)
    # The "windows" interface writes streams as "file:stream", of any size.
    subprocess.run(
        ["ntfs-3g", "-o", "streams_interface=windows", str(image), str(point)], check=True
    )
    try:
        (point / "f.txt").write_bytes(b"main stream\n")
        (point / "f.txt:Zone.Identifier").write_bytes(b"[ZoneTransfer]\r\nZoneId=3\r\n")
        (point / "f.txt:empty").write_bytes(b"")
        (point / "f.txt:big").write_bytes(bytes(range(256)) * 400)  # 100 KiB
    finally:
        subprocess.run(["umount", str(point)], check=True)
    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        report = extract(fs, ["/f.txt"], str(tmp_path / "out"))
    out = tmp_path / "out" / "f.txt"
    assert out.read_bytes() == b"main stream\n"
    assert os.getxattr(out, "user.Zone.Identifier") == b"[ZoneTransfer]\r\nZoneId=3\r\n"
    assert os.getxattr(out, "user.empty") == b""
    assert "user.big" not in os.listxattr(out)
    assert report.warnings == [
        (
            "/f.txt",
            "xattr user.big not restored: a stream of 102400 bytes, more than an xattr holds",
        )
    ]
