"""Real filesystem images for the file-level tests, built with Debian's tools.

ext4 with mkfs.ext4 -d; XFS by a loop mount and cp -a; NTFS with mkntfs and ntfs-3g;
FAT32 with mkfs.vfat and mcopy; exFAT with mkfs.exfat and exfat-fuse; GPT and MBR disks
with sgdisk and sfdisk.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BASE_NS = 1_700_000_000_123_456_789


@dataclass(frozen=True)
class Caps:
    """What a filesystem records, for comparing an extraction with its source."""

    posix: bool  # mode and owner
    links: bool  # symlinks and hard links
    xattrs: bool
    time_step_ns: int  # mtime granularity


KINDS = ["ext4", "xfs", "ntfs", "fat32", "exfat"]

CAPS = {
    # ext4 keeps nanoseconds, but mkfs.ext4 -d (e2fsprogs 1.47.0) copies whole seconds.
    "ext4": Caps(True, True, True, 1_000_000_000),
    "xfs": Caps(True, True, True, 1),
    "ntfs": Caps(False, True, False, 100),
    "fat32": Caps(False, False, False, 2_000_000_000),
    "exfat": Caps(False, False, False, 1_000_000_000),  # exfat-fuse writes whole seconds
}


def make_files(root: Path, *, links: bool, seed: int = 7) -> None:
    """A small tree of the kinds a customer has: config, home, sparse and deep files."""
    rng = random.Random(seed)
    files = {
        "etc/hostname": b"web01\n",
        "etc/app.conf": b"listen 8080\nworkers 4\n" * 50,
        "home/ann/notes.txt": b"remember the milk\n" * 300,
        "home/ann/photo.bin": rng.randbytes(1 << 20),
        "home/ann/r\u00e9sum\u00e9 2026.txt": "caf\u00e9\n".encode() * 10,
        "var/empty": b"",
        "var/deep/a/b/c/d/e/file.txt": b"deep\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with open(root / "var/sparse.img", "wb") as f:
        f.write(rng.randbytes(64 << 10))
        f.seek(5 << 20)
        f.write(rng.randbytes(64 << 10))
        f.truncate(8 << 20)
    os.chmod(root / "etc/app.conf", 0o640)
    os.chmod(root / "home/ann", 0o750)
    if links:
        os.symlink("notes.txt", root / "home/ann/link")
        os.symlink("../../etc/hostname", root / "home/ann/host")
        os.link(root / "home/ann/notes.txt", root / "home/ann/hard")
        os.setxattr(root / "home/ann/notes.txt", "user.comment", b"from the test")
        os.chown(root / "etc/app.conf", 1000, 1001)
        os.chown(root / "home/ann", 1000, 1000, follow_symlinks=False)
    paths = sorted(root.rglob("*"), key=lambda p: -len(p.parts))  # children first
    for i, path in enumerate([*paths, root]):
        ns = BASE_NS + i * 3_000_000_000
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _blank(image: Path, size_mb: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)


@contextlib.contextmanager
def _loop(image: Path) -> Iterator[str]:
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        _run("losetup", "-d", device)


@contextlib.contextmanager
def _mounted(image: Path, kind: str) -> Iterator[Path]:
    point = Path(tempfile.mkdtemp(prefix="bs-mnt-"))
    try:
        with contextlib.ExitStack() as stack:
            if kind == "xfs":
                _run("mount", "-o", "loop", str(image), str(point))
            elif kind == "ntfs":
                _run("ntfs-3g", str(image), str(point))
            else:
                _run("mount.exfat-fuse", stack.enter_context(_loop(image)), str(point))
            try:
                yield point
            finally:
                _run("umount", str(point))
    finally:
        point.rmdir()


def _copy_in(tree: Path, point: Path) -> None:
    # cp -a keeps modes, owners, times, links and xattrs where the filesystem can.
    subprocess.run(
        ["cp", "-a", "--sparse=always", f"{tree}/.", str(point)],
        check=False,
        capture_output=True,
    )
    for path in sorted(tree.rglob("*"), key=lambda p: -len(p.parts)):
        st = path.lstat()
        os.utime(
            point / path.relative_to(tree),
            ns=(st.st_atime_ns, st.st_mtime_ns),
            follow_symlinks=False,
        )


def build(kind: str, tree: Path, image: Path, size_mb: int = 64) -> Path:
    """A `kind` filesystem image holding `tree`."""
    _blank(image, size_mb)
    if kind == "ext4":
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-d", str(tree), str(image))
    elif kind == "xfs":
        _run("mkfs.xfs", "-q", "-f", str(image))
    elif kind == "ntfs":
        _run("mkntfs", "-q", "-F", "-f", str(image))
    elif kind == "exfat":
        _run("mkfs.exfat", str(image))
    elif kind == "fat32":
        _run("mkfs.vfat", "-F", "32", str(image))
        entries = [str(p) for p in sorted(tree.iterdir())]
        _run("mcopy", "-s", "-m", "-i", str(image), *entries, "::/")
    else:
        raise ValueError(kind)
    if kind in ("xfs", "ntfs", "exfat"):
        with _mounted(image, kind) as point:
            _copy_in(tree, point)
    return image


def partitioned(disk: Path, scheme: str, parts: list[Path]) -> Path:
    """A disk with a `scheme` ("gpt" or "mbr") table and `parts` copied into partitions
    from 1 MiB on; an MBR's last part goes in a logical partition."""
    sizes = [-(-p.stat().st_size // (1 << 20)) for p in parts]
    _blank(disk, sum(sizes) + 2 + len(parts))
    starts, at = [], 1
    for size in sizes:
        starts.append(at)
        at += size + 1
    if scheme == "gpt":
        args = ["sgdisk", "-o"]
        for i, (start, size) in enumerate(zip(starts, sizes, strict=True), 1):
            args += [f"-n{i}:{start * 2048}:+{size}M"]
        _run(*args, str(disk))
    else:
        lines = ["label: dos"]
        for start, size in zip(starts[:-1], sizes[:-1], strict=True):
            lines.append(f"start={start * 2048},size={size * 2048},type=83")
        ext_start = starts[-1] * 2048 - 2048
        lines.append(f"start={ext_start},size={(sizes[-1] + 1) * 2048},type=5")
        lines.append(f"start={starts[-1] * 2048},size={sizes[-1] * 2048},type=83")
        subprocess.run(
            ["sfdisk", "-q", str(disk)],
            input="\n".join(lines) + "\n",
            text=True,
            check=True,
            capture_output=True,
        )
    with open(disk, "r+b") as out:
        for part, start in zip(parts, starts, strict=True):
            out.seek(start << 20)
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
    return disk
