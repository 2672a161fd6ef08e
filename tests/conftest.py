"""Shared fixtures: real ext4 images built with Debian's mkfs.ext4 -d, changed with debugfs."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from tests.fsimages import CAPS, KINDS, build, lvm_physical_volumes, make_files, partitioned
from tests.s3proxy import FaultProxy, fault_proxy
from tests.s3server import S3_BUCKET, S3Server, seaweed

MKFS = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
DEBUGFS = shutil.which("debugfs") or "/sbin/debugfs"

# The Debian package of every tool the tests run (.ci/setup installs them all).
TOOL_PACKAGES = {
    **dict.fromkeys(["mkfs.ext4", "debugfs", "e2fsck", MKFS, DEBUGFS], "e2fsprogs"),
    **dict.fromkeys(["mkfs.xfs", "xfs_db", "xfs_io"], "xfsprogs"),
    **dict.fromkeys(["mkntfs", "ntfs-3g"], "ntfs-3g"),
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mkfs.exfat": "exfatprogs",
    "mount.exfat-fuse": "exfat-fuse",
    "sgdisk": "gdisk",
    "sfdisk": "fdisk",
    **dict.fromkeys(["pvcreate", "vgcreate", "lvcreate", "lvextend", "lvs", "pvs"], "lvm2"),
    **dict.fromkeys(["mkfs.btrfs", "btrfs"], "btrfs-progs"),
    "setfacl": "acl",
    "zstd": "zstd",
    **dict.fromkeys(["mount", "umount", "losetup", "fallocate"], "mount or util-linux"),
}


def _missing_tool(exc: FileNotFoundError) -> str | None:
    tool = exc.filename if isinstance(exc.filename, str) else None
    package = TOOL_PACKAGES.get(tool or "") or TOOL_PACKAGES.get(os.path.basename(tool or ""))
    if package is None:
        return None
    return f"{tool} is not installed: apt-get install {package} (or run bash .ci/setup as root)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A test or fixture whose tool is missing says which package brings it."""
    try:
        return (yield)
    except FileNotFoundError as exc:
        message = _missing_tool(exc)
        if message is None:
            raise
    pytest.fail(message, pytrace=False)


pytest_runtest_call = pytest_runtest_setup


def make_tree(root: Path, seed: int, size_mb: int) -> None:
    """Mixed real-looking content: text, compressible binaries, random data, sparse zeros."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    words = Path("/usr/share/common-licenses/GPL-3").read_text().split()
    for i in range(40):
        (docs / f"note{i}.txt").write_text(" ".join(rng.choices(words, k=rng.randint(50, 4000))))
    bins = root / "bin"
    bins.mkdir(exist_ok=True)
    for name in ("python3", "ls", "cp", "tar"):
        src = shutil.which(name)
        if src:
            shutil.copyfile(os.path.realpath(src), bins / name)
    data = root / "data"
    data.mkdir(exist_ok=True)
    pool = _binary_pool()
    total, i = 0, 0
    while total < size_mb << 20:
        size = min(rng.randint(256 << 10, 3 << 20), (size_mb << 20) - total)
        if i % 3 == 0:  # text
            blob = " ".join(rng.choices(words, k=size // 6)).encode()[:size]
        elif i % 3 == 1:  # machine code and tables from the system's shared libraries
            start = rng.randrange(max(1, len(pool) - size))
            blob = pool[start : start + size]
        else:  # incompressible
            blob = rng.randbytes(size)
        (data / f"blob{i}.bin").write_bytes(blob)
        total += len(blob)
        i += 1


_POOL: list[bytes] = []


def _binary_pool() -> bytes:
    """About 32 MiB of real shared-library bytes, read once per process."""
    if not _POOL:
        parts, total = [], 0
        for lib in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("lib*.so*")):
            if lib.is_file() and not lib.is_symlink() and total < 32 << 20:
                data = lib.read_bytes()
                parts.append(data)
                total += len(data)
        _POOL.append(b"".join(parts) or bytes(range(256)) * 4096)
    return _POOL[0]


def mkfs_ext4(image: Path, tree: Path, size_mb: int) -> Path:
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(
        [MKFS, "-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )
    return image


def debugfs(image: Path, *commands: str) -> None:
    """Change files inside an ext4 image in place with debugfs -w."""
    script = "\n".join(commands) + "\n"
    subprocess.run(
        [DEBUGFS, "-w", "-f", "-", str(image)],
        input=script.encode(),
        check=True,
        capture_output=True,
    )


def flip(image: Path, offset: int) -> None:
    """Damage one byte of an image in place (one bit of it flipped)."""
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture(scope="session")
def ext4_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48 MiB ext4 image holding about 20 MiB of mixed files (built once per session)."""
    base = tmp_path_factory.mktemp("ext4")
    make_tree(base / "tree", seed=1, size_mb=16)
    return mkfs_ext4(base / "base.img", base / "tree", 48)


@pytest.fixture
def ext4_image(ext4_base: Path, tmp_path: Path) -> Path:
    """A private, changeable copy of the session's ext4 image."""
    image = tmp_path / "vol.img"
    shutil.copyfile(ext4_base, image)
    return image


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[blocksnap.Repository]:
    r = blocksnap.Repository.init(tmp_path / "repo")
    try:
        yield r
    finally:
        r.close()


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run python -m blocksnap as a user would, capturing both streams."""
    proc = subprocess.run(
        [sys.executable, "-m", "blocksnap", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"blocksnap {args} failed: {proc.stderr}")
    return proc


def interrupt_after(size: int) -> blocksnap.model.ProgressCallback:
    """A progress callback that presses Ctrl-C once size bytes have been put in the map."""

    def callback(p: blocksnap.Progress) -> None:
        if p.phase == "read" and p.done >= size:
            raise KeyboardInterrupt

    return callback


def changed_blocks(old: bytes, new: bytes, block_size: int) -> list[int]:
    """Indices of blocks whose bytes differ between two image versions."""
    count = -(-len(new) // block_size)
    out = []
    for i in range(count):
        a = old[i * block_size : (i + 1) * block_size]
        b = new[i * block_size : (i + 1) * block_size]
        if a != b:
            out.append(i)
    return out


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    base = tmp_path_factory.mktemp("trees")
    found = {}
    for links in (True, False):
        make_files(base / f"links-{links}", links=links)
        found[links] = base / f"links-{links}"
    return found


@pytest.fixture(scope="session")
def fs_images(tmp_path_factory: pytest.TempPathFactory, trees: dict[bool, Path]) -> dict[str, Path]:
    """One image per filesystem kind holding the same files, built once per session."""
    base = tmp_path_factory.mktemp("fsimages")
    images = {}
    for kind in KINDS:
        tree = trees[CAPS[kind].links]
        images[kind] = build(kind, tree, base / f"{kind}.img", 300 if kind == "xfs" else 64)
    return images


@pytest.fixture(scope="session")
def lvm_disk(tmp_path_factory: pytest.TempPathFactory, fs_images: dict[str, Path]) -> Path:
    """A GPT disk: partition 1 exFAT; partitions 2 and 3 the physical volumes of volume
    group "vgtest" (see fsimages.lvm_physical_volumes): "root" holds the ext4 image in two
    segments, "data" the FAT32 image striped, "zeros" and "broken" hold no filesystem."""
    base = tmp_path_factory.mktemp("lvm")
    pvs = lvm_physical_volumes(base, "vgtest", fs_images["ext4"], fs_images["fat32"])
    return partitioned(base / "disk.img", "gpt", [fs_images["exfat"], *pvs])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS `weed mini`) for the whole session, with one bucket."""
    with seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        client = server.client()
        client.create_bucket(Bucket=S3_BUCKET)
        client.close()
        yield server


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy on loopback in front of the session's S3 server (tests/s3proxy.py)."""
    with fault_proxy(s3_server.endpoint) as found:
        yield found


@pytest.fixture
def s3_prefix() -> str:
    """A fresh prefix in S3_BUCKET: every test sees an empty repository location (a bucket
    per test would cost SeaweedFS a volume collection each)."""
    return f"t-{uuid.uuid4().hex}"
