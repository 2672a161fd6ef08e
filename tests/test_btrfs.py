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
from blocksnap.extract import extract
from blocksnap.fs import FileKind
from blocksnap.fs.btrfstree import SUPERBLOCK_OFFSET, CheckedBtrfs, checksum
from tests.fsimages import Caps
from tests.fuzz_reader import READ_LIMIT
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
        report = extract(fs, ["/"], str(tmp_path / "out"))
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


FIRST_SUBVOLUME = 256  # /sub; /snap, its snapshot, is the next
POINTERS = 0x65  # a node's entries start after its header; an inner node's are pointers
POINTER_SIZE = 33  # key[17], child address u64, generation u64


@dataclass(frozen=True)
class TreeNode:
    """A tree node as blocksnap read it, and where its copies lie in the image."""

    bytenr: int  # its logical address
    copies: list[int]  # image offsets: metadata is DUP, so two copies of each node
    raw: bytes

    @property
    def owner(self) -> int:
        return int(struct.unpack_from("<Q", self.raw, 0x58)[0])

    @property
    def nritems(self) -> int:
        return int(struct.unpack_from("<I", self.raw, 0x60)[0])

    @property
    def level(self) -> int:
        return self.raw[0x64]

    def child(self, slot: int) -> int:
        return int(struct.unpack_from("<Q", self.raw, POINTERS + slot * POINTER_SIZE + 17)[0])


def nodes_read(image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[int, TreeNode]:
    """The tree nodes blocksnap reads in a read of everything, as tests.fuzz_reader reads,
    by logical address.  Which nodes these are depends on the image's layout; the image
    holds more whose checksum checks out, which no read reaches: stale copies of nodes
    rewritten since, and the trees of extents, checksums and free space."""
    read: dict[int, bytes] = {}
    original = CheckedBtrfs._read_node

    def recording(fs: CheckedBtrfs, address: int) -> bytes:
        node: bytes = original(fs, address)
        read[address] = node
        return node

    with monkeypatch.context() as patch, blocksnap.Repository.init(tmp_path / "clean") as repo:
        patch.setattr(CheckedBtrfs, "_read_node", recording)
        repo.snapshot("vol", image)
        with repo.open_filesystem("vol") as fs:
            for entry in fs.walk("/"):
                if entry.stat.kind is FileKind.FILE:
                    entry.read(0, min(entry.stat.size, READ_LIMIT))
                elif entry.stat.kind is FileKind.SYMLINK:
                    fs.readlink(entry.path)
                entry.xattrs()
    data = image.read_bytes()
    nodesize = struct.unpack_from("<I", data, SUPERBLOCK_OFFSET + 0x94)[0]
    address_of = {node: address for address, node in read.items()}
    copies: dict[int, list[int]] = {address: [] for address in read}
    for at in range(0, len(data), nodesize):
        address = address_of.get(data[at : at + nodesize])
        if address is not None:
            copies[address].append(at)
    assert all(copies.values()), "a node read is in no node-sized piece of the image"
    return {address: TreeNode(address, copies[address], read[address]) for address in read}


def _rewrite(image: Path, out: Path, node: TreeNode, change: dict[int, bytes]) -> None:
    """A copy of `image` with both copies of `node` changed and their checksum made
    right, so only blocksnap's structural checks stand between the change and dissect."""
    data = bytearray(image.read_bytes())
    nodesize = len(node.raw)
    for at in node.copies:
        for offset, value in change.items():
            data[at + offset : at + offset + len(value)] = value
        data[at : at + 0x20] = checksum(0, bytes(data[at + 0x20 : at + nodesize]))
    out.write_bytes(bytes(data))


def test_a_damaged_node_is_named(
    kernel_btrfs: tuple[Path, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image, _point = kernel_btrfs
    data = bytearray(image.read_bytes())
    for node in nodes_read(image, tmp_path, monkeypatch).values():
        if node.level == 0:
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


def inner_variants(node: TreeNode, nodes: dict[int, TreeNode]) -> dict[str, dict[int, bytes]]:
    """Changes to an inner node that no read may take for a tree: each is named by a
    check in blocksnap.fs.btrfstree."""
    first_child = POINTERS + 17
    last = node.nritems - 1
    last_child = POINTERS + last * POINTER_SIZE + 17
    (generation,) = struct.unpack_from("<Q", node.raw, first_child + 8)
    other_level = [n for n in nodes.values() if n.level != node.level - 1 and n is not node]
    assert other_level, f"no node read at a level other than {node.level - 1}"
    assert last > 0, "an inner node of one pointer"
    return {
        "first pointer to itself": {first_child: struct.pack("<Q", node.bytenr)},
        f"first pointer to a node at level {other_level[0].level}": {
            first_child: struct.pack("<Q", other_level[0].bytenr)
        },
        "5000 pointers, more than fit": {0x60: struct.pack("<I", 5000)},
        # At the right level, but not the child the pointer's key and generation describe.
        "first pointer to the second's child": {first_child: struct.pack("<Q", node.child(1))},
        "last pointer to the one before's child": {
            last_child: struct.pack("<Q", node.child(last - 1))
        },
        "first pointer a generation ahead of its child": {
            first_child + 8: struct.pack("<Q", generation + 1)
        },
    }


def test_hostile_trees_end_in_a_named_error(
    kernel_btrfs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes the read reaches, rewritten with valid checksums: every change to an inner
    node ends in a named error; a leaf with items outside the node, no items or random
    bytes ends in a named error or a listing.  Each read stays within the fuzz test's
    limits on time and memory."""
    image, _point = kernel_btrfs
    rng = random.Random("btrfs-hostile")
    nodes = nodes_read(image, tmp_path, monkeypatch)
    inner = [n for n in nodes.values() if n.level > 0]
    leaves = [n for n in nodes.values() if n.level == 0]
    assert inner, "no tree read here reaches above its leaves"
    repo_path = tmp_path / "repo"
    variant = tmp_path / "hostile.img"
    names: dict[str, str] = {}
    with blocksnap.Repository.init(repo_path) as repo:
        for node in inner:
            for name, change in inner_variants(node, nodes).items():
                volume = f"inner{len(names)}"
                where = f"node {node.bytenr:#x}, owner {node.owner}, level {node.level}"
                names[volume] = f"{name}: {where}"
                _rewrite(image, variant, node, change)
                repo.snapshot(volume, variant)
        for node in rng.sample(leaves, min(6, len(leaves))):
            item = POINTERS + rng.randrange(node.nritems) * 25
            changes = [
                {item + 17: struct.pack("<I", 1 << 20)},  # data outside the node
                {0x60: struct.pack("<I", 0)},  # empty
            ]
            for _ in range(4):
                offset = rng.randrange(POINTERS, len(node.raw) - 16)
                changes.append({offset: rng.randbytes(rng.choice([1, 4, 8, 16]))})
            for change in changes:
                _rewrite(image, variant, node, change)
                repo.snapshot("leaves", variant)
        variant.unlink()
    read = [names[v] for v in names if read_in_child(repo_path, 1, v) != {"FilesystemError": 1}]
    assert read == [], f"{len(read)} of {len(names)} hostile inner nodes did not end in an error"
    outcomes = read_in_child(repo_path, 6 * min(6, len(leaves)), "leaves")
    assert set(outcomes) <= {"read", "FilesystemError"}, outcomes


def test_a_pointer_to_an_older_copy_is_named(
    kernel_btrfs: tuple[Path, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/sub's root pointing, where /sub/data/tiny was rewritten after the snapshot, to the
    leaf the snapshot keeps: a node read anyway, at the right level and with the same
    first key, but older than the pointer says.  Read, it gives the old bytes."""
    image, _point = kernel_btrfs
    nodes = nodes_read(image, tmp_path, monkeypatch)

    def root(owner: int) -> TreeNode:
        return max((n for n in nodes.values() if n.owner == owner), key=lambda n: n.level)

    def pointers(node: TreeNode) -> dict[bytes, tuple[int, int]]:
        """key -> (slot, child address)"""
        at = [POINTERS + slot * POINTER_SIZE for slot in range(node.nritems)]
        return {node.raw[a : a + 17]: (slot, node.child(slot)) for slot, a in enumerate(at)}

    sub, snap = pointers(root(FIRST_SUBVOLUME)), pointers(root(FIRST_SUBVOLUME + 1))
    moved = [key for key in sub if key in snap and sub[key][1] != snap[key][1]]
    assert moved, "the write after the snapshot left /sub's tree as the snapshot's"
    slot, _child = sub[moved[0]]
    older = tmp_path / "older.img"
    at = POINTERS + slot * POINTER_SIZE + 17
    _rewrite(image, older, root(FIRST_SUBVOLUME), {at: struct.pack("<Q", snap[moved[0]][1])})
    repo.snapshot("vol", older)
    with (
        pytest.raises(blocksnap.FilesystemError, match="generation"),
        repo.open_filesystem("vol") as fs,
    ):
        fs.open("/sub/data/tiny").read()


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
