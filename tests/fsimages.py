"""Real filesystem images for the file-level tests, built with Debian's tools.

ext4 with mkfs.ext4 -d; XFS by a loop mount and cp -a; NTFS with mkntfs and ntfs-3g;
FAT32 with mkfs.vfat and mcopy; exFAT with mkfs.exfat and exfat-fuse; btrfs with
mkfs.btrfs --rootdir; GPT and MBR disks
with sgdisk and sfdisk; LVM physical volumes with pvcreate, vgcreate and lvcreate.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
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


KINDS = ["ext4", "xfs", "ntfs", "fat32", "exfat", "btrfs"]

CAPS = {
    # ext4 keeps nanoseconds, but mkfs.ext4 -d (e2fsprogs 1.47.0) copies whole seconds.
    "ext4": Caps(True, True, True, 1_000_000_000),
    "xfs": Caps(True, True, True, 1),
    "ntfs": Caps(False, True, True, 100),  # xattrs: user.* as alternate data streams
    "fat32": Caps(False, False, False, 2_000_000_000),
    "exfat": Caps(False, False, False, 1_000_000_000),  # exfat-fuse writes whole seconds
    # btrfs keeps nanoseconds, but mkfs.btrfs --rootdir (btrfs-progs 6.2) copies seconds.
    "btrfs": Caps(True, True, True, 1_000_000_000),
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
def loop_device(image: Path) -> Iterator[str]:
    """A loop device over image (read-write), detached on leaving."""
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
            if kind in ("xfs", "ext4", "btrfs"):
                _run("mount", "-o", "loop", str(image), str(point))
            elif kind == "ntfs":
                _run("ntfs-3g", str(image), str(point))
            else:
                _run("mount.exfat-fuse", stack.enter_context(loop_device(image)), str(point))
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
    elif kind == "btrfs":
        _run("mkfs.btrfs", "-q", "-f", "--rootdir", str(tree), str(image))
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


# mkfs without discarding, so the blocks it leaves alone keep the fill byte.
_MKFS_KEEPING = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
    "ntfs": ["mkntfs", "-q", "-F", "-f"],
}


def build_by_kernel(kind: str, image: Path, size_mb: int, populate: Callable[[Path], None]) -> Path:
    """A `kind` image whose files `populate` writes on a mount of it (the kernel's, or
    ntfs-3g's), for what only a live filesystem makes: preallocated extents, holes that
    mkfs.btrfs --rootdir would read through.  The image is filled with 0xAA before mkfs,
    so a block allocated but never written is not zero on the disk."""
    with open(image, "wb") as f:
        fill = b"\xaa" * (1 << 20)
        for _ in range(size_mb):
            f.write(fill)
    _run(*_MKFS_KEEPING[kind], str(image))
    with _mounted(image, kind) as point:
        populate(point)
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


LVM_EXTENT = 1 << 20
LVM_CHUNK = 64 << 10


def lvm_physical_volumes(workdir: Path, vg: str, root: Path, data: Path) -> list[Path]:
    """Two LVM physical volumes, as image files, of volume group `vg` (extents of 1 MiB):

    * LV "root" holds the image `root` in two segments, one on each PV: half made by
      lvcreate on the first PV, half added by lvextend on the second;
    * LV "data" holds the image `data`, striped over both PVs in 64 KiB chunks;
    * LV "zeros" is a "zero" LV and LV "broken" an "error" LV.

    The tools run on loop devices, restricted to them with --devices and without metadata
    backups, so nothing of this reaches the host's LVM.  The test kernel has no
    device-mapper, so they run with --driverloaded n, and the images are copied to the
    extents that `lvs` reports, chunk by chunk across the stripes, as device-mapper would.
    """
    half = root.stat().st_size // 2
    size = half + data.stat().st_size // 2 + 4 * LVM_EXTENT
    pvs = [workdir / f"{vg}-pv{i}.img" for i in (1, 2)]
    for pv in pvs:
        _blank(pv, size >> 20)
    with loop_device(pvs[0]) as first, loop_device(pvs[1]) as second:
        files = {first: pvs[0], second: pvs[1]}

        def lvm(*args: str) -> list[list[str]]:
            config = "--config=backup{backup=0 archive=0}"
            out = subprocess.run(
                ["lvm", args[0], f"--devices={first},{second}", config, *args[1:]],
                check=True,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"},
            ).stdout
            return [line.strip().split(";") for line in out.splitlines()]

        report = ["--noheadings", "--separator=;", "--units=b", "--nosuffix", "-o"]
        create = ["--driverloaded=n", "-an", "-Zn", "-y"]
        lvm("pvcreate", "-y", first, second)
        lvm("vgcreate", "-s", "1M", vg, first, second)
        lvm("lvcreate", *create, "-L", f"{half}b", "-n", "root", vg, first)
        stripes = ["-i", "2", "-I", f"{LVM_CHUNK}b"]
        lvm("lvcreate", *create, *stripes, "-L", f"{data.stat().st_size}b", "-n", "data", vg)
        lvm("lvextend", "--driverloaded=n", "-L", f"+{half}b", f"{vg}/root", second)
        for kind, name in (("zero", "zeros"), ("error", "broken")):
            lvm("lvcreate", *create[:3], "--type", kind, "-L", "4m", "-n", name, vg)
        pe_start = {name: int(start) for name, start in lvm("pvs", *report, "pv_name,pe_start")}
        fields = "lv_name,seg_start_pe,seg_size_pe,seg_pe_ranges,stripes,stripe_size"
        for name, start, count, ranges, n, chunk in lvm("lvs", "--segments", *report, fields, vg):
            if name not in ("root", "data"):
                continue
            places = []  # (PV file, byte offset of the stripe's first extent there)
            for item in ranges.split():
                device, extents = item.rsplit(":", 1)
                first_extent = int(extents.split("-")[0])
                places.append((files[device], pe_start[device] + first_extent * LVM_EXTENT))
            length = int(count) * LVM_EXTENT
            _copy_segment(
                root if name == "root" else data,
                int(start) * LVM_EXTENT,
                length,
                places,
                int(chunk) if int(n) > 1 else length,
            )
    return pvs


def _copy_segment(
    source: Path, start: int, length: int, places: list[tuple[Path, int]], chunk: int
) -> None:
    """Copy bytes [start, start + length) of `source` into a segment's stripes, chunk i
    going to stripe i mod n, row i div n."""
    with open(source, "rb") as src:
        for i in range(length // chunk):
            row, stripe = divmod(i, len(places))
            pv, at = places[stripe]
            src.seek(start + i * chunk)
            with open(pv, "r+b") as out:
                out.seek(at + row * chunk)
                out.write(src.read(chunk))
