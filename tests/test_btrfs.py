"""btrfs through the optional dissect.btrfs extra: what the kernel writes (compression,
inline, preallocated and shared extents, subvolumes and snapshots, ACLs), compared with
the kernel's own view; damage and hostile trees named, never read as data."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import blocksnap
from blocksnap.fs.btrfstree import SUPERBLOCK_OFFSET, checksum
from tests.fsimages import Caps
from tests.test_files import compare_tree
from tests.test_fs_fuzz import read_in_child
from tests.test_xattrs import ACCESS_ACL, DEFAULT_ACL

WORDS = Path("/usr/share/common-licenses/GPL-3").read_bytes()


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _mount(image: Path, point: Path, *options: str) -> None:
    _run("mount", "-o", ",".join(["loop", *options]), str(image), str(point))


def write_files(root: Path, rng: random.Random) -> None:
    """Files of every extent kind the kernel writes, under the current mount options."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "text.txt").write_bytes(WORDS * 12)  # ~420 KiB: several compressed extents
    (root / "random.bin").write_bytes(rng.randbytes(300_000))  # stays uncompressed
    (root / "tiny").write_bytes(b"inline, in the tree itself\n" * 20)
    with open(root / "sparse", "wb") as f:  # a hole: no extent at all (no-holes)
        f.write(WORDS[:5000])
        f.seek(3 << 20)
        f.write(rng.randbytes(70_000))
    with open(root / "prealloc", "wb") as f:  # preallocated, partly written
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
        f.seek(200_000)
        f.write(WORDS[:10_000])


@pytest.fixture(scope="module")
def kernel_btrfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A btrfs image written by the kernel, and a read-only mount of it to compare with."""
    base = tmp_path_factory.mktemp("btrfs")
    image, point = base / "btrfs.img", base / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    _run("mkfs.btrfs", "-q", "-f", str(image))
    rng = random.Random(5)
    for compression in ("zstd", "zlib", "lzo", "no"):
        _mount(image, point, f"compress-force={compression}" if compression != "no" else "")
        try:
            write_files(point / compression, rng)
            if compression == "zstd":
                _run("btrfs", "subvolume", "create", str(point / "sub"))
                write_files(point / "sub" / "data", rng)
                (point / "sub" / "dir").mkdir()
                os.setxattr(point / "sub" / "dir", "system.posix_acl_default", DEFAULT_ACL)
                for i in range(300):  # enough items for a tree above its leaves
                    path = point / "sub" / "dir" / f"f{i:03d}"
                    path.write_bytes(f"file {i}\n".encode() * (i % 50))
                    os.setxattr(path, "user.n", str(i).encode())
                    if i % 10 == 0:
                        os.setxattr(path, "system.posix_acl_access", ACCESS_ACL)
                        os.setxattr(path, "trusted.big", bytes([i % 251]) * 3000)
                os.link(point / "sub/data/tiny", point / "sub/dir/tiny-link")
                os.symlink("../data/text.txt", point / "sub/dir/to-text")
                os.chown(point / "sub/data/random.bin", 1234, 5678)
                os.chmod(point / "sub/data/random.bin", 0o4751)
        finally:
            _run("umount", str(point))
    _mount(image, point)
    try:
        # A shared extent rewritten in the middle: the copy's extents point into the
        # original's at an offset.
        _run("cp", "--reflink=always", str(point / "no/random.bin"), str(point / "shared"))
        with open(point / "shared", "r+b") as f:
            f.seek(100_000)
            f.write(b"changed in the copy " * 100)
        _run("btrfs", "subvolume", "snapshot", "-r", str(point / "sub"), str(point / "snap"))
        (point / "sub" / "data" / "tiny").write_bytes(b"after the snapshot\n")
    finally:
        _run("umount", str(point))
    _mount(image, point, "ro")
    try:
        yield image, point
    finally:
        _run("umount", str(point))


def test_extract_matches_the_kernel(
    kernel_btrfs: tuple[Path, Path], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    image, point = kernel_btrfs
    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        assert fs.kind == "btrfs"
        report = fs.extract(["/"], str(tmp_path / "out"))
        assert fs.open("/snap/data/tiny").read() == b"inline, in the tree itself\n" * 20
        assert fs.open("/sub/data/tiny").read() == b"after the snapshot\n"
        st_sub, st_snap = fs.stat("/sub/data/text.txt"), fs.stat("/snap/data/text.txt")
        assert st_sub.file_id != st_snap.file_id  # same inode number, other subvolume
    assert report.skipped == [] and report.warnings == [], report
    # Subvolume roots are directories the walk enters, not loops it refuses.
    assert compare_tree(point, tmp_path / "out", Caps(True, True, True, 1)) > 640
    out = tmp_path / "out"
    assert os.getxattr(out / "sub/dir", "system.posix_acl_default") == DEFAULT_ACL
    assert os.getxattr(out / "sub/dir/f010", "system.posix_acl_access") == ACCESS_ACL


def test_only_the_file_is_read(kernel_btrfs: tuple[Path, Path], repo: blocksnap.Repository) -> None:
    image, _point = kernel_btrfs
    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        with fs.open("/zstd/text.txt") as f:
            assert f.read() == WORDS * 12
        assert fs.stats.blocks_fetched <= 8  # of 2048 in the image


# Trees a read goes through: the root tree, the chunk tree, and the subvolumes'.
READ_TREES = {1, 3, 5}
FIRST_SUBVOLUME = 256


@dataclass(frozen=True)
class TreeNode:
    bytenr: int  # its logical address
    copies: list[int]  # image offsets: metadata is DUP, so two copies of each node
    owner: int
    level: int
    nritems: int


def tree_nodes(image: Path) -> dict[int, TreeNode]:
    """Every tree node of the image whose checksum checks out, by logical address, found
    by scanning for the filesystem id at 0x20 of each node-sized piece."""
    data = image.read_bytes()
    sb = data[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 4096]
    fsid, nodesize = sb[0x20:0x30], struct.unpack_from("<I", sb, 0x94)[0]
    nodes: dict[int, TreeNode] = {}
    for at in range(0, len(data), nodesize):
        node = data[at : at + nodesize]
        if node[0x20:0x30] == fsid and checksum(0, node[0x20:]) == node[:0x20]:
            (bytenr,) = struct.unpack_from("<Q", node, 0x30)
            (owner,) = struct.unpack_from("<Q", node, 0x58)
            nritems, level = struct.unpack_from("<IB", node, 0x60)
            found = nodes.setdefault(bytenr, TreeNode(bytenr, [], owner, level, nritems))
            found.copies.append(at)
    return nodes


def read_by_blocksnap(node: TreeNode) -> bool:
    return node.owner in READ_TREES or node.owner >= FIRST_SUBVOLUME


def _rewrite(image: Path, out: Path, node: TreeNode, change: dict[int, bytes]) -> None:
    """A copy of `image` with both copies of `node` changed and their checksum made
    right, so only blocksnap's structural checks stand between the change and dissect."""
    data = bytearray(image.read_bytes())
    nodesize = struct.unpack_from("<I", data, SUPERBLOCK_OFFSET + 0x94)[0]
    for at in node.copies:
        for offset, value in change.items():
            data[at + offset : at + offset + len(value)] = value
        data[at : at + 0x20] = checksum(0, bytes(data[at + 0x20 : at + nodesize]))
    out.write_bytes(bytes(data))


def test_a_damaged_node_is_named(
    kernel_btrfs: tuple[Path, Path], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    image, _point = kernel_btrfs
    data = bytearray(image.read_bytes())
    for node in tree_nodes(image).values():
        if node.level == 0 and read_by_blocksnap(node):
            for at in node.copies:
                data[at + 0x400] ^= 0xFF
    damaged = tmp_path / "damaged.img"
    damaged.write_bytes(bytes(data))
    repo.snapshot("vol", damaged)
    with (
        pytest.raises(blocksnap.FilesystemError, match="checksum does not match"),
        repo.open_filesystem("vol") as fs,
    ):
        for entry in fs.walk("/"):
            entry.xattrs()


def test_hostile_trees_end_in_a_named_error(
    kernel_btrfs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Nodes rewritten with valid checksums: pointing to themselves, to a leaf at the
    wrong level, with too many items, items outside the node, or random bytes.  Each read
    ends in a named error or a listing, within the fuzz test's limits on time and memory."""
    image, _point = kernel_btrfs
    rng = random.Random("btrfs-hostile")
    nodes = [n for n in tree_nodes(image).values() if read_by_blocksnap(n)]
    inner = [n for n in nodes if n.level > 0]
    leaves = [n for n in nodes if n.level == 0]
    assert inner, "no tree read here reaches above its leaves"
    first_child = 0x65 + 17
    variants: list[tuple[TreeNode, dict[int, bytes]]] = []
    for node in inner:
        variants.append((node, {first_child: struct.pack("<Q", node.bytenr)}))
        variants.append((node, {first_child: struct.pack("<Q", leaves[0].bytenr)}))
        variants.append((node, {0x60: struct.pack("<I", 5000)}))  # more than fit
    for node in rng.sample(leaves, min(6, len(leaves))):
        item = 0x65 + rng.randrange(node.nritems) * 25
        variants.append((node, {item + 17: struct.pack("<I", 1 << 20)}))  # data outside
        variants.append((node, {0x60: struct.pack("<I", 0)}))  # empty
        for _ in range(4):
            offset = rng.randrange(0x65, 16384 - 16)
            variants.append((node, {offset: rng.randbytes(rng.choice([1, 4, 8, 16]))}))
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path) as repo:
        for i, (node, change) in enumerate(variants):
            variant = tmp_path / f"hostile{i}.img"
            _rewrite(image, variant, node, change)
            repo.snapshot("vol", variant)
            variant.unlink()
    outcomes = read_in_child(repo_path, len(variants))
    assert set(outcomes) <= {"read", "FilesystemError"}, outcomes
    assert outcomes.get("FilesystemError", 0) >= 3 * len(inner), outcomes


def test_without_the_extra_the_error_names_it(
    kernel_btrfs: tuple[Path, Path], repo: blocksnap.Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, _point = kernel_btrfs
    repo.snapshot("vol", image)
    monkeypatch.setitem(sys.modules, "dissect.btrfs", None)
    monkeypatch.delitem(sys.modules, "blocksnap.fs.btrfstree", raising=False)
    with pytest.raises(blocksnap.FilesystemError, match=r"blocksnap\[btrfs\].*AGPL"):
        repo.open_filesystem("vol")


def test_reads_in_any_order_match_the_kernel(
    kernel_btrfs: tuple[Path, Path], repo: blocksnap.Repository
) -> None:
    """Reads back and forth across compressed, shared, preallocated and absent extents."""
    image, point = kernel_btrfs
    repo.snapshot("vol", image)
    rng = random.Random(11)
    with repo.open_filesystem("vol") as fs:
        for rel in ("zstd/text.txt", "lzo/sparse", "zlib/prealloc", "shared", "no/tiny"):
            want = (point / rel).read_bytes()
            entry = fs.lookup("/" + rel)
            for _ in range(60):
                offset = rng.randrange(len(want))
                size = rng.choice([1, 4096, 70_000, 300_000])
                assert entry.read(offset, size) == want[offset : offset + size], (rel, offset)


def test_a_filesystem_on_another_device_is_named(
    kernel_btrfs: tuple[Path, Path], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """A superblock, checksum right, whose system chunk lies on a device not given."""
    image, _point = kernel_btrfs
    data = bytearray(image.read_bytes())
    sb = SUPERBLOCK_OFFSET
    first_stripe_devid = sb + 0x32B + 17 + 48  # sys_chunk_array: key, chunk, stripe
    data[first_stripe_devid : first_stripe_devid + 8] = struct.pack("<Q", 7)
    data[sb : sb + 0x20] = checksum(0, bytes(data[sb + 0x20 : sb + 0x1000]))
    other = tmp_path / "other.img"
    other.write_bytes(bytes(data))
    repo.snapshot("vol", other)
    with pytest.raises(blocksnap.FilesystemError, match="Missing stripe disk"):
        repo.open_filesystem("vol")
