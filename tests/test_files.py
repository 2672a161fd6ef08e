"""Single-file restore: ls, cat, find, versions and extract on real filesystem images."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.extract import extract
from blocksnap.fs import FileKind
from blocksnap.fs.filesystem import Entry
from blocksnap.fs.libyal import PosixEntryNode
from tests.conftest import debugfs, flip, mkfs_ext4, run_cli
from tests.fsimages import BASE_NS, CAPS, KINDS, Caps, build_by_kernel, partitioned


def snapshot(repo: blocksnap.Repository, volume: str, image: Path) -> blocksnap.SnapshotInfo:
    return repo.snapshot(volume, image)


def compare_tree(source: Path, restored: Path, caps: Caps) -> int:
    """Assert `restored` holds what `source` holds, byte for byte and attribute by
    attribute as far as the filesystem records them; the number of entries compared."""
    count = 0
    inodes: dict[tuple[int, int], int] = {}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        src, out = path.lstat(), (restored / rel).lstat()
        assert stat.S_IFMT(src.st_mode) == stat.S_IFMT(out.st_mode), rel
        if stat.S_ISLNK(src.st_mode):
            assert os.readlink(path) == os.readlink(restored / rel), rel
        elif stat.S_ISREG(src.st_mode):
            assert (restored / rel).read_bytes() == path.read_bytes(), rel
            if src.st_size > 4 << 20:  # the sparse file keeps its holes
                assert out.st_blocks * 512 < src.st_size // 2, rel
        if caps.posix:
            assert stat.S_IMODE(src.st_mode) == stat.S_IMODE(out.st_mode), rel
            assert (src.st_uid, src.st_gid) == (out.st_uid, out.st_gid), rel
        if not stat.S_ISDIR(src.st_mode) or caps.posix:
            step = caps.time_step_ns
            assert abs(out.st_mtime_ns - src.st_mtime_ns) < step, (rel, src, out)
        if caps.xattrs and not stat.S_ISLNK(src.st_mode):
            for name in os.listxattr(path):
                assert os.getxattr(restored / rel, name) == os.getxattr(path, name), rel
        if caps.links and stat.S_ISREG(src.st_mode) and src.st_nlink > 1:
            # st_dev too: btrfs subvolumes repeat inode numbers, each on a device of its own
            seen = inodes.setdefault((src.st_dev, src.st_ino), out.st_ino)
            assert seen == out.st_ino, f"{rel} is not hard-linked as in the source"
        count += 1
    return count


@pytest.mark.parametrize("kind", KINDS)
def test_extract_whole_tree_matches_source(
    kind: str,
    fs_images: dict[str, Path],
    trees: dict[bool, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
) -> None:
    snapshot(repo, "vol", fs_images[kind])
    with repo.open_filesystem("vol") as fs:
        assert fs.kind == kind
        report = extract(fs, ["/"], str(tmp_path / "out"))
    assert report.skipped == [] and report.warnings == []
    tree = trees[CAPS[kind].links]
    assert compare_tree(tree, tmp_path / "out", CAPS[kind]) >= 15
    if CAPS[kind].links:
        assert report.hardlinks == 1 and report.symlinks == 2


@pytest.mark.parametrize("kind", KINDS)
def test_listdir_stat_and_read(
    kind: str, fs_images: dict[str, Path], trees: dict[bool, Path], repo: blocksnap.Repository
) -> None:
    snapshot(repo, "vol", fs_images[kind])
    tree = trees[CAPS[kind].links]
    with repo.open_filesystem("vol") as fs:
        names = [st.name for st in fs.listdir("/home/ann")]
        assert names == sorted(p.name for p in (tree / "home/ann").iterdir())
        st = fs.stat("/home/ann/photo.bin")
        assert st.kind is FileKind.FILE and st.size == 1 << 20
        with fs.open("/home/ann/photo.bin") as f:
            f.seek(123_456)
            assert f.read(1000) == (tree / "home/ann/photo.bin").read_bytes()[123_456:124_456]
        # Case-insensitive filesystems find a name in any case; the others do not.
        if kind in ("ntfs", "fat32", "exfat"):
            assert fs.stat("/ETC/HOSTNAME").size == 6
        else:
            with pytest.raises(blocksnap.FilesystemError, match="no such file"):
                fs.stat("/ETC/HOSTNAME")
        if CAPS[kind].links:
            assert fs.readlink("/home/ann/host") == "../../etc/hostname"
            with fs.open("/home/ann/host") as f:  # followed inside the image
                assert f.read() == b"web01\n"
        assert fs.stats.blocks_fetched > 0


def test_cli_ls_cat_find(fs_images: dict[str, Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "web", str(fs_images["ext4"]), check=True)
    out = run_cli("ls", repo, "web", "latest", "/home/ann", "-l", check=True).stdout
    assert "-rw-r--r--   2     0     0         5400" in out and "link -> notes.txt" in out
    assert "r\u00e9sum\u00e9 2026.txt" in out
    doc = json.loads(run_cli("ls", repo, "web", "latest", "/etc", "--json", check=True).stdout)
    assert {e["name"]: e["mode"] for e in doc["entries"]} == {
        "app.conf": "0640",
        "hostname": "0644",
    }
    assert doc["filesystem"] == "ext4" and doc["blocks_fetched"] > 0
    cat = subprocess.run(
        ["python", "-m", "blocksnap", "cat", repo, "web", "latest", "/home/ann/photo.bin"],
        capture_output=True,
        check=True,
    )
    assert len(cat.stdout) == 1 << 20
    found = run_cli("find", repo, "web", "latest", "*.txt", check=True).stdout.split("\n")
    assert "/var/deep/a/b/c/d/e/file.txt" in found and "/home/ann/notes.txt" in found
    for args, message in [
        (("ls", repo, "web", "latest", "/nope"), "/nope: no such file or directory"),
        (("cat", repo, "web", "latest", "/etc"), "/etc: not a regular file (dir)"),
        (("ls", repo, "web", "latest", "/etc/hostname/x"), "not a directory"),
        (("ls", repo, "web", "nosuch"), "snapshot"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_partitioned_disks(
    fs_images: dict[str, Path], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    gpt = partitioned(tmp_path / "gpt.img", "gpt", [fs_images["ext4"], fs_images["fat32"]])
    mbr = partitioned(tmp_path / "mbr.img", "mbr", [fs_images["fat32"], fs_images["ext4"]])
    snapshot(repo, "gpt", gpt)
    snapshot(repo, "mbr", mbr)
    with pytest.raises(blocksnap.FilesystemError, match=r"2 filesystems.*--partition"):
        repo.open_filesystem("gpt")
    with repo.open_filesystem("gpt", partition=1) as fs:
        assert fs.kind == "ext4" and fs.partition is not None and fs.partition.scheme == "gpt"
        assert fs.open("/etc/hostname").read() == b"web01\n"
    with repo.open_filesystem("gpt", partition=2) as fs:
        assert fs.kind == "fat32"
    with repo.open_filesystem("mbr", partition=5) as fs:  # the logical partition
        assert fs.kind == "ext4" and fs.partition is not None
        assert fs.partition.offset == 66 << 20
        assert fs.open("/home/ann/link").read() == b"remember the milk\n" * 300
    assert [(p.number, kind) for p, kind in repo.partitions("mbr")] == [
        (1, "FAT and exFAT"),
        (5, "ext2/3/4"),
    ]
    with pytest.raises(blocksnap.FilesystemError, match="no partition 9"):
        repo.open_filesystem("mbr", partition=9)


def test_unknown_image_names_what_was_tried(repo: blocksnap.Repository, tmp_path: Path) -> None:
    image = tmp_path / "noise.img"
    image.write_bytes(os.urandom(4 << 20))
    snapshot(repo, "noise", image)
    with pytest.raises(blocksnap.FilesystemError) as err:
        repo.open_filesystem("noise")
    assert "no known filesystem" in str(err.value)
    assert "ext2/3/4, XFS, NTFS, btrfs, FAT and exFAT" in str(err.value)


def test_versions_and_old_content(ext4_image: Path, repo: blocksnap.Repository) -> None:
    debugfs(ext4_image, "mkdir /srv")
    repo.snapshot("vol", ext4_image)
    repo.snapshot("vol", ext4_image)  # unchanged
    src = ext4_image.parent / "v2.txt"
    src.write_bytes(b"version two\n")
    debugfs(ext4_image, f"write {src} /srv/page.txt")
    repo.snapshot("vol", ext4_image)
    src.write_bytes(b"version three\n")
    debugfs(ext4_image, "rm /srv/page.txt", f"write {src} /srv/page.txt")
    repo.snapshot("vol", ext4_image)
    repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, "rm /srv/page.txt")
    repo.snapshot("vol", ext4_image)
    states = [v.state.value for v in repo.versions("vol", "/srv/page.txt")]
    assert states == ["absent", "absent", "added", "changed", "unchanged", "removed"]
    third = repo.snapshots("vol")[2].id
    with repo.open_filesystem("vol", third) as fs:
        assert fs.open("/srv/page.txt").read() == b"version two\n"
    doc = json.loads(
        run_cli(
            "versions", str(repo.store.path), "vol", "/srv/page.txt", "--json", check=True
        ).stdout
    )
    assert [d["state"] for d in doc] == states and doc[3]["stat"]["size"] == 14


def test_versions_reads_only_snapshots_where_the_path_could_differ(
    fs_images: dict[str, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A snapshot in which only the other partition changed is not read again; one in
    which the file's own partition changed is, and the change is found."""
    ext4, fat = tmp_path / "ext4.img", tmp_path / "fat.img"
    shutil.copyfile(fs_images["ext4"], ext4)
    shutil.copyfile(fs_images["fat32"], fat)
    disk = partitioned(tmp_path / "disk.img", "gpt", [ext4, fat])
    repo.snapshot("vm", disk)
    offsets = {p.name: p.offset for p, _kind in repo.partitions("vm")}

    def put(image: Path, partition: str) -> None:  # the disk keeps its table and GUIDs
        with open(disk, "r+b") as f:
            f.seek(offsets[partition])
            f.write(image.read_bytes())

    note = tmp_path / "note.txt"
    note.write_bytes(b"written on the other partition\n")
    subprocess.run(["mcopy", "-i", str(fat), str(note), "::/note.txt"], check=True)
    put(fat, "2")
    repo.snapshot("vm", disk)
    note.write_bytes(b"web02\n")
    debugfs(ext4, "rm /etc/hostname", f"write {note} /etc/hostname")
    put(ext4, "1")
    repo.snapshot("vm", disk)
    opened: list[str] = []
    real_open = repo._open_filesystem

    def counting(info: blocksnap.SnapshotInfo, *args: object, **kwargs: object) -> object:
        opened.append(info.id)
        return real_open(info, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "_open_filesystem", counting)
    found = repo.versions("vm", "/etc/hostname", partition=1)
    assert [v.state.value for v in found] == ["added", "unchanged", "changed"]
    assert found[1].digest == found[0].digest and found[1].stat == found[0].stat
    snaps = repo.snapshots("vm")
    assert opened == [snaps[0].id, snaps[2].id]
    # The FAT partition's file changed in the second snapshot: read there, and found.
    opened.clear()
    states = [v.state.value for v in repo.versions("vm", "/note.txt", partition=2)]
    assert states == ["absent", "added", "unchanged"]
    assert opened == [snaps[0].id, snaps[1].id]


@pytest.mark.parametrize("rule", ["skip", "overwrite", "rename"])
def test_conflict_rules_in_place(
    rule: str,
    fs_images: dict[str, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snapshot(repo, "vol", fs_images["ext4"])
    root = tmp_path / "live"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_bytes(b"changed by the customer\n")
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, os.rename

    def record_fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        fsync(fd)

    def record_rename(src: str, dst: str, **kwargs: int) -> None:
        events.append(("rename", dst))
        rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record_rename)
    with repo.open_filesystem("vol") as fs:
        report = extract(fs, ["/etc"], str(root), in_place=True, conflict=rule)
    monkeypatch.undo()
    # Only a file put in place of another is made durable: its content, then its name.
    durable = [("fsync", "file"), ("rename", "hostname"), ("fsync", "dir")]
    seen = [e for e in events if e[0] == "fsync" or e == ("rename", "hostname")]
    assert seen == (durable if rule == "overwrite" else []), events
    assert (root / "etc/app.conf").read_bytes().startswith(b"listen 8080")
    host = (root / "etc/hostname").read_bytes()
    if rule == "skip":
        assert host == b"changed by the customer\n" and report.skipped == [
            ("/etc/hostname", "exists")
        ]
    elif rule == "overwrite":
        assert host == b"web01\n" and report.skipped == []
    else:
        assert host == b"changed by the customer\n"
        assert (root / "etc/hostname.restored").read_bytes() == b"web01\n"
        assert report.renamed == [("/etc/hostname", "hostname.restored")]
    leftovers = [p for p in root.rglob("*") if "blocksnap-" in p.name]
    assert leftovers == []


def test_cli_extract_to_dir(fs_images: dict[str, Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "web", str(fs_images["xfs"]), check=True)
    out = tmp_path / "restored"
    proc = run_cli(
        "extract", repo, "web", "latest", "/home/ann", "/etc/hostname", "--to", str(out), "--json"
    )
    assert proc.returncode == 1  # something was refused
    doc = json.loads(proc.stdout)
    assert doc["files"] == 4 and doc["hardlinks"] == 1 and doc["symlinks"] == 1
    assert doc["skipped"] == [
        {
            "path": "/home/ann/host",
            "reason": "symlink to '../../etc/hostname' points outside the target",
        }
    ]
    assert (out / "ann/photo.bin").stat().st_size == 1 << 20
    assert (out / "hostname").read_bytes() == b"web01\n"
    again = run_cli("extract", repo, "web", "latest", "/etc/hostname", "--to", str(out))
    assert again.returncode == 0 and "skipped /etc/hostname: exists" in again.stderr
    missing = run_cli("extract", repo, "web", "latest", "/etc/nope", "--to", str(out))
    assert missing.returncode == 10 and missing.stderr.count("\n") == 1


def _entry_offset(image: Path, directory_block: int, name: bytes) -> int:
    with open(image, "rb") as f:
        f.seek(directory_block * 4096)
        block = f.read(4096)
    at = block.find(name)
    assert at > 0, name
    return at


@pytest.fixture(scope="session")
def hostile_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ext4 image crafted with debugfs to escape an extraction every way it can: an
    absolute and a climbing symlink, a symlink and a directory under one name, names with
    "/" and "..", device nodes, a FIFO and a directory linked into itself."""
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    tree = base / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d/xx").write_bytes(b"inside\n")
    (tree / "ab").write_bytes(b"x\n")
    image = base / "hostile.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image), "16M"],
        check=True,
        capture_output=True,
    )
    debugfs(
        image,
        f"symlink /abs {outside}/abs-victim",
        "symlink /esc ../../../../../../../../../../../../" + str(outside)[1:] + "/esc-victim",
        f"symlink /dup {outside}",
        "mkdir /dup2",
        "write /etc/hostname /dup2/pwned",
        "mknod /slash/name c 1 3",
        "mknod null c 1 3",
        "mknod disk b 8 0",
        "mknod pipe p",
        "ln /d /d/loop",
        "symlink /d/up ../../outside",
    )
    root_block = int(
        subprocess.run(
            ["debugfs", "-R", "bmap / 0", str(image)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    name_ab = _entry_offset(image, root_block, b"ab\x00")
    name_dup2 = _entry_offset(image, root_block, b"dup2")
    debugfs(
        image,
        f"zap_block -o {name_ab} -l 2 -p 0x2e {root_block}",  # "ab" becomes ".."
        f"zap_block -o {name_dup2 - 2} -l 1 -p 3 {root_block}",  # "dup2" becomes "dup"
    )
    return image, outside


def _inside(root: Path) -> None:
    """Every entry under root is a real path under it, and every symlink resolves under it."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            resolved = os.path.realpath(path)
            assert os.path.commonpath([real_root, resolved]) == real_root, (path, resolved)


@pytest.mark.parametrize("in_place", [False, True], ids=["to", "in-place"])
@pytest.mark.parametrize("rule", ["skip", "overwrite", "rename"])
def test_hostile_image_never_writes_outside(
    in_place: bool,
    rule: str,
    hostile_image: tuple[Path, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
) -> None:
    image, outside = hostile_image
    repo.snapshot("evil", image)
    target = tmp_path / "target"
    target.mkdir()
    with repo.open_filesystem("evil") as fs:
        names = {st.name for st in fs.listdir("/")}
        assert {"/slash/name", "dup"} <= names  # crafted names are listed as they are
        report = extract(fs, ["/"], str(target), in_place=in_place, conflict=rule)
        again = extract(fs, ["/"], str(target), in_place=in_place, conflict=rule)
    assert sorted(os.listdir(outside)) == []
    _inside(target)
    reasons = dict(report.skipped)
    assert reasons["//slash/name"] == "invalid name '/slash/name'"
    assert reasons["/null"] == "chardev not restored"
    assert reasons["/disk"] == "blockdev not restored"
    assert reasons["/pipe"] == "fifo not restored"
    assert reasons["/d/loop"] == "directory met twice (a loop in the image)"
    assert "points outside" in reasons["/esc"] and "points outside" in reasons["/d/up"]
    if in_place:  # absolute targets are made relative to ROOT, so they stay inside it
        assert os.readlink(target / "abs") == outside.as_posix()[1:] + "/abs-victim"
        # The symlink "dup" comes first; then its directory twin follows the rule.
        twin = {"skip": None, "overwrite": "dup", "rename": "dup.restored"}[rule]
    else:
        assert "points outside" in reasons["/abs"]
        twin = "dup"
    if twin:
        assert (target / twin).is_dir() and (target / twin / "pwned").is_file()
    assert (target / "d/xx").read_bytes() == b"inside\n"
    assert not [p for p in target.rglob("*") if "blocksnap-" in p.name]
    if rule == "rename":
        assert again.renamed and all(".restored" in new for _, new in again.renamed)


def test_in_place_refuses_symlinked_host_directory(
    hostile_image: tuple[Path, Path], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    image, _ = hostile_image
    repo.snapshot("evil", image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "d").symlink_to(elsewhere)  # the host path leads out through a symlink
    with repo.open_filesystem("evil") as fs:
        for rule in ("skip", "overwrite", "rename"):
            report = extract(fs, ["/d/xx"], str(root), in_place=True, conflict=rule)
            assert report.files == 0 and "not followed" in report.skipped[0][1]
            assert os.listdir(elsewhere) == []
        # The directory itself follows the rule: kept, replaced or renamed, never entered.
        for rule in ("skip", "rename", "overwrite"):
            extract(fs, ["/d"], str(root), in_place=True, conflict=rule)
            assert os.listdir(elsewhere) == []
    assert (root / "d.restored/xx").is_file() and (root / "d").is_dir()


HOLD_SNAPSHOT = """
import sys, time, pathlib, blocksnap
repo, image, started, release = sys.argv[1:5]
def progress(p):
    pathlib.Path(started).touch()
    while not pathlib.Path(release).exists():
        time.sleep(0.05)
with blocksnap.Repository(repo) as r:
    r.snapshot("vol", image, progress=progress)
"""


def test_extract_while_a_snapshot_of_the_volume_runs(
    fs_images: dict[str, Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    with blocksnap.Repository.init(repo) as r:
        r.snapshot("vol", fs_images["ext4"])
    started, release = tmp_path / "started", tmp_path / "release"
    writer = subprocess.Popen(
        [
            "python",
            "-c",
            HOLD_SNAPSHOT,
            str(repo),
            str(fs_images["ext4"]),
            str(started),
            str(release),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(600):
            if started.exists() or writer.poll() is not None:
                break
            time.sleep(0.05)
        assert started.exists(), "the snapshot did not start"
        # The snapshot holds its volume lock and writer registration, mid-run.
        proc = run_cli(
            "extract",
            str(repo),
            "vol",
            "latest",
            "/home/ann",
            "--to",
            str(tmp_path / "out"),
            "--json",
        )
        assert proc.returncode == 1 and json.loads(proc.stdout)["files"] == 3
        assert writer.poll() is None  # still running: the extraction did not wait for it
    finally:
        release.touch()
        _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    with blocksnap.Repository(repo) as r:
        assert len(r.snapshots("vol")) == 2


def test_ext4_inline_data_htree_symlinks_and_xattr_block(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """The ext4 features a real volume has: small files and symlinks kept inside the inode
    (inline_data), also past its first 60 bytes and in a directory the kernel wrote inline;
    a directory of 3,000 entries indexed by e2fsck -D (htree); a symlink target kept in the
    inode and one too long for it; xattrs in their own block, read more than once."""
    tree = tmp_path / "tree"
    (tree / "big").mkdir(parents=True)
    for i in range(3000):
        (tree / "big" / f"entry-{i:05d}.txt").write_text(f"entry {i}\n")
    (tree / "tiny.txt").write_text("inline me\n")
    (tree / "x").mkdir()
    (tree / "x" / "attrs.bin").write_bytes(b"a" * 5000)
    os.setxattr(tree / "x" / "attrs.bin", "user.small", b"in inode")
    os.symlink("tiny.txt", tree / "fast")
    os.symlink("x/" + "long-target-name-" * 6 + "end", tree / "slow")
    (tree / "medium.txt").write_text("inline, and longer than the inode's 60 bytes\n" * 2)
    image = tmp_path / "features.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "inline_data", "-I", "256", "-d", str(tree), str(image)],
        check=True,
        capture_output=True,
    )
    values = {}
    for size in (40, 56, 60, 200, 400):  # together too large for the inode: an xattr block
        value = tmp_path / f"v{size}"
        value.write_bytes(bytes([65 + size % 26]) * size)
        values[f"user.b{size}"] = value.read_bytes()
        debugfs(image, f"ea_set -f {value} /x/attrs.bin user.b{size}")
    subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True)  # index directories
    # The kernel keeps a small directory inline, its tail in the inode's xattr space.
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        (point / "kdir").mkdir()
        for name in ("a1234567890", "b1234567890", "c1234567890"):
            (point / "kdir" / name).write_text(name)
        (point / "kdir" / "f150").write_bytes(b"k" * 149 + b"\n")
        os.symlink("y" * 100, point / "kdir" / "lnk100")
    finally:
        subprocess.run(["umount", str(point)], check=True)
    shown = subprocess.run(
        ["debugfs", "-R", "stat /kdir", str(image)], capture_output=True, text=True
    ).stdout
    assert "Size of inline data: 1" in shown  # 100 bytes or more: past the first 60
    shown = subprocess.run(
        ["debugfs", "-R", "stat /tiny.txt", str(image)], capture_output=True, text=True
    ).stdout
    assert "Size of inline data" in shown
    shown = subprocess.run(
        ["debugfs", "-R", "stat /big", str(image)], capture_output=True, text=True
    ).stdout
    assert "Flags: 0x81000" in shown  # extents and htree index
    shown = subprocess.run(
        ["debugfs", "-R", "stat /x/attrs.bin", str(image)], capture_output=True, text=True
    ).stdout
    assert "File ACL: 0" not in shown  # the xattr block

    repo.snapshot("vol", image)
    with repo.open_filesystem("vol") as fs:
        assert fs.stat("/big/entry-02999.txt").size == len("entry 2999\n")
        assert fs.open("/big/entry-01234.txt").read() == b"entry 1234\n"
        assert len(fs.listdir("/big")) == 3000
        assert fs.readlink("/slow") == os.readlink(tree / "slow")
        assert fs.open("/medium.txt").read() == (tree / "medium.txt").read_bytes()
        assert sorted(st.name for st in fs.listdir("/kdir")) == [
            "a1234567890",
            "b1234567890",
            "c1234567890",
            "f150",
            "lnk100",
        ]
        assert fs.open("/kdir/f150").read() == b"k" * 149 + b"\n"
        assert fs.readlink("/kdir/lnk100") == "y" * 100
        for _ in range(2):  # libfsext drops the attributes of an inode it has cached
            # and reads a value over 60 bytes wrongly: blocksnap reads them itself
            assert fs.xattrs("/x/attrs.bin") == {"user.small": b"in inode", **values}
        report = extract(fs, ["/"], str(tmp_path / "out"))
    assert report.skipped == [] and report.warnings == []
    assert compare_tree(tree, tmp_path / "out", CAPS["ext4"]) == 3007
    assert (tmp_path / "out" / "kdir" / "f150").read_bytes() == b"k" * 149 + b"\n"
    restored = tmp_path / "out" / "x" / "attrs.bin"
    assert {name: os.getxattr(restored, name) for name in os.listxattr(restored)} == {
        "user.small": b"in inode",
        **values,
    }


def test_overwrite_syncs_every_replaced_file_hard_links_too(
    fs_images: dict[str, Path],
    repo: blocksnap.Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snapshot(repo, "vol", fs_images["ext4"])
    root = tmp_path / "live"
    root.mkdir()
    with repo.open_filesystem("vol") as fs:
        extract(fs, ["/home/ann"], str(root), in_place=True)
        synced: list[int] = []
        fsync = os.fsync

        def record(fd: int) -> None:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                synced.append(os.fstat(fd).st_ino)
            fsync(fd)

        monkeypatch.setattr(os, "fsync", record)
        report = extract(fs, ["/home/ann"], str(root), in_place=True, conflict="overwrite")
    assert report.hardlinks == 1
    assert len(synced) == report.files + report.hardlinks  # the second name of a link too


SPARSE_SIZE = 1 << 40  # apparent: a terabyte ...
SPARSE_DATA = {1 << 20: b"A" * 5000, SPARSE_SIZE - (1 << 30) - 3000: b"B" * 3000}  # ... of 8 KB
PREALLOC_SIZE = 4 << 20
PREALLOC_DATA = (300_000, b"C" * 100)


def _populate_sparse(point: Path) -> None:
    with open(point / "huge", "wb") as f:
        for offset, data in SPARSE_DATA.items():
            f.seek(offset)
            f.write(data)
        f.truncate(SPARSE_SIZE)
    fd = os.open(point / "prealloc", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # ntfs-3g cannot preallocate: a plain hole
            os.posix_fallocate(fd, 0, PREALLOC_SIZE)
        os.ftruncate(fd, PREALLOC_SIZE)
        os.pwrite(fd, PREALLOC_DATA[1], PREALLOC_DATA[0])
    finally:
        os.close(fd)


def _data_segments(path: Path) -> list[tuple[int, int]]:
    """The (start, end) data segments of a host file, by SEEK_DATA and SEEK_HOLE."""
    found = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            at = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, at))
    finally:
        os.close(fd)
    return found


def _assert_sparse_copy(path: Path, size: int, data: dict[int, bytes]) -> None:
    """`path` is `size` bytes holding `data` at its offsets, zeros elsewhere, and only a
    little of it is allocated."""
    assert path.stat().st_size == size
    assert path.stat().st_blocks * 512 <= 1 << 20
    segments = _data_segments(path)
    assert sum(end - start for start, end in segments) <= 1 << 20
    with open(path, "rb") as f:
        for offset, want in data.items():
            f.seek(offset)
            assert f.read(len(want)) == want
        for start, end in segments:  # what is allocated holds only the data
            f.seek(start)
            got = bytearray(f.read(end - start))
            for offset, want in data.items():
                lo, hi = max(start, offset), min(end, offset + len(want))
                if lo < hi:
                    assert got[lo - start : hi - start] == want[lo - offset : hi - offset]
                    got[lo - start : hi - start] = bytes(hi - lo)
            assert got.count(0) == len(got), (start, end)


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes asked of Entry.read, by path, from now on; reading through the holes of a
    terabyte stops at 16 MiB with a named failure, not after minutes."""
    asked: dict[str, int] = {}
    read = Entry.read

    def counted(entry: Entry, offset: int, size: int) -> bytes:
        asked[entry.path] = asked.get(entry.path, 0) + size
        assert asked[entry.path] <= 16 << 20, f"{entry.path}: read through its holes"
        return read(entry, offset, size)

    monkeypatch.setattr(Entry, "read", counted)
    return asked


@pytest.mark.parametrize("kind", ["ext4", "xfs", "btrfs", "ntfs"])
def test_extract_sparse_file_reads_only_its_data(
    kind: str, repo: blocksnap.Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = build_by_kernel(
        kind, tmp_path / "sparse.img", 300 if kind == "xfs" else 128, _populate_sparse
    )
    repo.snapshot("vol", image)
    asked = _count_reads(monkeypatch)
    out = tmp_path / "out"
    with repo.open_filesystem("vol") as fs:
        report = extract(fs, ["/huge", "/prealloc"], str(out))
    assert report.files == 2 and not report.skipped
    assert asked["/huge"] <= 1 << 20
    # NTFS has no unwritten extents: ntfs-3g allocates, and the clusters are read.
    assert asked.get("/prealloc", 0) <= (PREALLOC_SIZE if kind == "ntfs" else 1 << 20)
    _assert_sparse_copy(out / "huge", SPARSE_SIZE, SPARSE_DATA)
    # Extents allocated but never written read as zeros, not as the 0xAA on the disk.
    _assert_sparse_copy(out / "prealloc", PREALLOC_SIZE, dict([PREALLOC_DATA]))


def test_versions_of_a_sparse_file_read_only_its_data_and_ignore_its_layout(
    repo: blocksnap.Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """versions hashes what a file holds, not its apparent size, and not how it is laid
    out: the same bytes written densely (zeros and all) or sparsely are unchanged."""

    def populate(dense: bool, last: bytes) -> Callable[[Path], None]:
        def fill(point: Path) -> None:
            _populate_sparse(point)
            with open(point / "huge", "r+b") as f:
                f.seek(SPARSE_SIZE - 4096)
                f.write(last)
            with open(point / "small", "wb") as f:
                f.write(b"x" * 5000)
                if dense:
                    f.write(bytes(200_000))  # allocated zeros
                else:
                    f.seek(205_000)  # a hole
                f.write(b"y" * 3000)

        return fill

    for i, (dense, last) in enumerate([(False, b"1"), (True, b"1"), (True, b"2")]):
        image = build_by_kernel("ext4", tmp_path / f"v{i}.img", 128, populate(dense, last))
        repo.snapshot("vol", image)
        image.unlink()
    _count_reads(monkeypatch)
    states = [v.state.value for v in repo.versions("vol", "/huge")]
    assert states == ["added", "unchanged", "changed"]
    assert [v.state.value for v in repo.versions("vol", "/small")] == [
        "added",
        "unchanged",
        "unchanged",
    ]


def test_extract_hostile_extent_map_stays_inside_the_file(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(bytes(range(256)) * 256)  # 16 blocks, one extent
    image = mkfs_ext4(tmp_path / "vol.img", tree, 32)
    # A second extent over logical blocks 8-23, overlapping the first and mapping the
    # same disk blocks, and a size that ends inside it: libfsext takes extents one
    # after another, whatever their logical start says.
    first = _first_block(image, "/f")
    debugfs(
        image,
        "sif /f block[0] 0x0002f30a",
        "sif /f block[6] 8",
        "sif /f block[7] 16",
        f"sif /f block[8] {first}",
        "sif /f size 70000",
    )
    repo.snapshot("vol", image)
    out = tmp_path / "out"
    with repo.open_filesystem("vol") as fs:
        ranges = list(fs.lookup("/f").data_ranges())
        report = extract(fs, ["/f"], str(out))
        whole = fs.open("/f").read()
    assert ranges == [(0, 70000)]
    assert report.files == 1 and report.bytes_written == 70000
    assert (out / "f").stat().st_size == 70000
    assert (out / "f").read_bytes() == whole  # what cat reads, no more


def _first_block(image: Path, path: str) -> int:
    """The first disk block of a file of an ext4 image, as debugfs shows its extents."""
    shown = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return int(shown.split("EXTENTS:")[1].split(":")[1].split("-")[0])


PAUSED_EXTRACT = """
import runpy, signal, sys
from blocksnap.fs.filesystem import Entry
read = Entry.read
def paused(entry, offset, size):
    if offset > 0:  # the temporary file holds the first chunk: wait here to be killed
        sys.stdout.write("writing\\n")
        sys.stdout.flush()
        while True:
            signal.pause()
    return read(entry, offset, size)
Entry.read = paused
sys.argv = ["blocksnap", *sys.argv[1:]]
runpy.run_module("blocksnap", run_name="__main__")
"""


def _temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".blocksnap-" in p.name)


def test_extract_removes_what_a_killed_extract_left(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    content = os.urandom(3 << 20)
    (tree / "big.bin").write_bytes(content)
    repo.snapshot("vol", mkfs_ext4(tmp_path / "vol.img", tree, 32))
    out = tmp_path / "out"
    out.mkdir()
    (out / "big.bin").write_bytes(b"old")
    args = ["extract", str(repo.path), "vol", "latest", "/big.bin", "--to", str(out)]
    writer = subprocess.Popen(
        [sys.executable, "-c", PAUSED_EXTRACT, *args, "--overwrite"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
        (left,) = _temporaries(out)
        # An extraction into the same directory while that one writes leaves its file.
        beside = run_cli(*args, "--overwrite")
        assert beside.returncode == 0, beside.stderr
        assert _temporaries(out) == [left]
        (out / "big.bin").write_bytes(b"old")
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert _temporaries(out) == [left]  # what SIGKILL leaves
    assert (out / "big.bin").read_bytes() == b"old"
    # Names that are not a dead writer's of this host: the user's, a live process's, and
    # one from another host or pid namespace.
    kept = [".big.bin.blocksnap-1a2b3c4d", f".x.blocksnap-ffffffff-{writer.pid}-0badf00d"]
    space = left.rsplit(".blocksnap-", 1)[1].split("-")[0]  # this host's, as the writer named it
    kept.append(f".x.blocksnap-{space}-{os.getpid()}-0badf00d")
    for name in kept:
        (out / name).write_bytes(b"mine")
    again = run_cli(*args, "--overwrite", "--json")
    assert again.returncode == 0, again.stderr
    assert _temporaries(out) == sorted(kept)
    assert (out / "big.bin").read_bytes() == content
    assert json.loads(again.stdout)["cleaned"] == [left]


def test_extract_interrupted_removes_its_temporary_file(
    repo: blocksnap.Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(3 << 20))
    repo.snapshot("vol", mkfs_ext4(tmp_path / "vol.img", tree, 32))
    read = Entry.read

    def interrupted(entry: Entry, offset: int, size: int) -> bytes:
        if offset > 0:
            raise KeyboardInterrupt
        return read(entry, offset, size)

    monkeypatch.setattr(Entry, "read", interrupted)
    out = tmp_path / "out"
    with repo.open_filesystem("vol") as fs, pytest.raises(KeyboardInterrupt):
        extract(fs, ["/big.bin"], str(out))
    assert os.listdir(out) == []


def _damage_inode(image: Path, path: str) -> None:
    """Flip a bit of the mtime in `path`'s inode, so its checksum no longer matches."""
    where = subprocess.run(
        ["debugfs", "-R", f"imap {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"block (\d+), offset (0x[0-9a-f]+)", where)
    assert found is not None
    flip(image, int(found.group(1)) * 4096 + int(found.group(2), 16) + 0x10)


def _dir_tree(root: Path, files: dict[str, bytes], modes: dict[str, int]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    for rel, mode in modes.items():
        os.chmod(root / rel, mode)
    for i, rel in enumerate(sorted(modes, key=len, reverse=True)):  # children first
        os.utime(root / rel, ns=(BASE_NS + i, BASE_NS + i))


def test_extract_directory_keeps_its_metadata_when_an_entry_fails(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    modes = {"d": 0o750, "e": 0o705}
    _dir_tree(tree, {"d/good.txt": b"good\n", "d/bad.txt": b"bad\n", "e/bad.txt": b"x"}, modes)
    image = mkfs_ext4(tmp_path / "vol.img", tree, 32)
    for path in ("/d/bad.txt", "/e/bad.txt"):
        _damage_inode(image, path)
    repo.snapshot("vol", image)
    out = tmp_path / "out"
    with repo.open_filesystem("vol") as fs:
        report = extract(fs, ["/d", "/e"], str(out))
    reasons = dict(report.skipped)
    for path in ("/d/bad.txt", "/e/bad.txt"):
        assert reasons[path].startswith("failed: ") and "is damaged" in reasons[path]
    assert (out / "d/good.txt").read_bytes() == b"good\n"
    assert report.directories == 2 and os.listdir(out / "e") == []
    for rel, mode in modes.items():
        st = (out / rel).stat()
        assert stat.S_IMODE(st.st_mode) == mode, rel
        assert st.st_mtime_ns // 10**9 == (tree / rel).stat().st_mtime_ns // 10**9, rel


def test_extract_stopped_by_a_full_disk_leaves_directories_restored_or_gone(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    modes = {"top": 0o755, "top/sub": 0o750, "top/sub/deeper": 0o711}
    big = os.urandom(3 << 20)
    _dir_tree(tree, {"top/a.txt": b"a\n", "top/sub/deeper/big.bin": big}, modes)
    repo.snapshot("vol", mkfs_ext4(tmp_path / "vol.img", tree, 32))
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out)], check=True)
    try:
        with (
            repo.open_filesystem("vol") as fs,
            pytest.raises(blocksnap.RestoreError, match="No space left on device"),
        ):
            extract(fs, ["/top"], str(out))
        found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        kept_modes = {
            rel: stat.S_IMODE((out / rel).stat().st_mode) for rel in modes if rel in found
        }
    finally:
        subprocess.run(["umount", str(out)], check=True)
    # The directories that the failure left empty are gone; the others hold what was
    # written, with their own mode; no temporary file is left.
    assert "top/sub" not in found and "top/sub/deeper" not in found
    assert found in ([], ["top", "top/a.txt"])
    assert kept_modes == {rel: modes[rel] for rel in kept_modes}


def test_extract_renamed_directory_links_to_what_it_wrote(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d/a").write_bytes(b"restored\n")
    os.link(tree / "d/a", tree / "d/b")
    repo.snapshot("vol", mkfs_ext4(tmp_path / "vol.img", tree, 32))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a").write_bytes(b"decoy\n")
    target = tmp_path / "target"
    target.mkdir()
    (target / "d").symlink_to(elsewhere)  # so the directory is restored as d.restored
    with repo.open_filesystem("vol") as fs:
        report = extract(fs, ["/d"], str(target), conflict="rename")
    assert report.renamed == [("/d", "d.restored")]
    a, b = target / "d.restored/a", target / "d.restored/b"
    assert a.read_bytes() == b.read_bytes() == b"restored\n"
    assert a.stat().st_ino == b.stat().st_ino
    assert (elsewhere / "a").stat().st_nlink == 1  # never linked to from the target


@pytest.mark.parametrize(
    ("ranges", "expect"),
    [
        ([(-5, 100), (50, 8192), (4096, 1 << 40), (1 << 41, 1 << 42)], [(0, 12000)]),
        ([(0, 100), (100, 200), (8192, 8192), (9000, 9100)], [(0, 200), (9000, 9100)]),
        ([(8192, 12000), (0, 4096)], "the extent map is out of order (0 after 8192)"),
    ],
    ids=["overlapping-and-past-the-size", "touching-and-empty", "out-of-order"],
)
def test_extract_takes_an_extent_map_only_inside_the_file(
    ranges: list[tuple[int, int]],
    expect: list[tuple[int, int]] | str,
    repo: blocksnap.Repository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    content = os.urandom(12000)
    (tree / "f").write_bytes(content)
    (tree / "g").write_bytes(b"next\n")
    repo.snapshot("vol", mkfs_ext4(tmp_path / "vol.img", tree, 32))
    real = PosixEntryNode.data_ranges

    def hostile(node: PosixEntryNode, size: int) -> Iterator[tuple[int, int]]:
        if size == len(content):
            yield from ranges
        else:
            yield from real(node, size)

    monkeypatch.setattr(PosixEntryNode, "data_ranges", hostile)
    out = tmp_path / "out"
    with repo.open_filesystem("vol") as fs:
        if isinstance(expect, str):
            report = extract(fs, ["/"], str(out))
            assert dict(report.skipped) == {"/f": f"failed: /f: {expect}"}
            assert (out / "g").read_bytes() == b"next\n" and not (out / "f").exists()
            return
        assert list(fs.lookup("/f").data_ranges()) == expect
        extract(fs, ["/f"], str(out))
    # Read where the map says data, zeros elsewhere, and nothing past the size.
    want = bytearray(len(content))
    for start, end in expect:
        want[start:end] = content[start:end]
    assert (out / "f").read_bytes() == want
