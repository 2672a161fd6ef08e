"""LVM logical volumes inside a snapshot: listed, chosen by VG/LV, read across segments,
stripes and physical volumes; damaged or hostile metadata gives a named error."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import blocksnap
from blocksnap.extract import extract
from blocksnap.fs.lvm import lvm_crc
from tests.conftest import run_cli
from tests.fsimages import CAPS
from tests.test_files import compare_tree

MDA_AT = 512 + 32 + 32 + 8 + 16 + 16  # PV label sector 1, header at 32: uuid, size, one
# data area and its terminator, then the first metadata area's (offset, size)


def pv_offsets(repo: blocksnap.Repository, volume: str) -> list[int]:
    return [p.offset for p, _kind in repo.partitions(volume) if p.name in ("2", "3")]


def metadata_text(image: Path, pv: int) -> tuple[int, int, bytes]:
    """(offset of the metadata area in the image, its size, the committed text) of the
    physical volume at byte `pv` of the image."""
    with open(image, "rb") as f:
        f.seek(pv + MDA_AT)
        area, area_size = struct.unpack("<QQ", f.read(16))
        f.seek(pv + area)
        header = f.read(512)
        offset, size = struct.unpack_from("<QQ", header, 40)
        assert offset + size <= area_size  # lvcreate's text has not wrapped yet
        f.seek(pv + area + offset)
        return pv + area, offset, f.read(size)


def write_metadata_text(image: Path, area: int, offset: int, text: bytes) -> None:
    """Put `text` as the committed metadata with a valid checksum, as LVM would."""
    with open(image, "r+b") as f:
        f.seek(area)
        header = bytearray(f.read(512))
        struct.pack_into("<QQI", header, 40, offset, len(text), lvm_crc(text))
        struct.pack_into("<I", header, 0, lvm_crc(bytes(header[4:])))
        f.seek(area)
        f.write(header)
        f.seek(area + offset)
        f.write(text)


def test_logical_volumes_are_listed_and_read(
    lvm_disk: Path, trees: dict[bool, Path], repo: blocksnap.Repository, tmp_path: Path
) -> None:
    repo.snapshot("disk", lvm_disk)
    listed = [(p.name, p.scheme, p.size >> 20, p.type, kind) for p, kind in repo.partitions("disk")]
    assert [entry[:2] + entry[4:] for entry in listed[:3]] == [
        ("1", "gpt", "FAT and exFAT"),
        ("2", "gpt", None),  # the physical volumes
        ("3", "gpt", None),
    ]
    assert listed[3:] == [
        ("vgtest/root", "lvm", 64, "linear", "ext2/3/4"),
        ("vgtest/data", "lvm", 64, "striped", "FAT and exFAT"),
        ("vgtest/zeros", "lvm", 4, "zero", None),
        ("vgtest/broken", "lvm", 4, "error", None),
    ]
    # root: two linear segments, on the two physical volumes
    with repo.open_filesystem("disk", partition="vgtest/root") as fs:
        assert fs.kind == "ext4" and fs.partition is not None
        assert fs.partition.number is None and fs.partition.scheme == "lvm"
        extract(fs, ["/"], str(tmp_path / "root"))
    assert compare_tree(trees[True], tmp_path / "root", CAPS["ext4"]) >= 15
    # data: striped over both physical volumes in 64 KiB chunks
    with repo.open_filesystem("disk", partition="vgtest/data") as fs:
        assert fs.kind == "fat32"
        extract(fs, ["/"], str(tmp_path / "data"))
    assert compare_tree(trees[False], tmp_path / "data", CAPS["fat32"]) >= 10
    with repo.open_filesystem("disk", partition=1) as fs:
        assert fs.kind == "exfat"


def test_logical_volume_errors_name_the_problem(lvm_disk: Path, repo: blocksnap.Repository) -> None:
    repo.snapshot("disk", lvm_disk)
    for partition, message in [
        (None, r"3 filesystems, on 1 \(FAT and exFAT\), vgtest/root \(ext2/3/4\), vgtest/data"),
        ("vgtest/zeros", "no known filesystem on partition vgtest/zeros"),
        ("vgtest/broken", "vgtest/broken has segments of type error: blocksnap reads linear"),
        ("vgtest/nope", r"no partition vgtest/nope \(the image has: 1, 2, 3, vgtest/root, "),
        ("2", "no known filesystem on partition 2"),
    ]:
        with pytest.raises(blocksnap.FilesystemError, match=message):
            repo.open_filesystem("disk", partition=partition)
    # One physical volume alone, as a whole-disk image: its LVs lie partly elsewhere.
    repo.snapshot("pv1", lvm_disk.parent / "vgtest-pv1.img")
    listed = {p.name: kind for p, kind in repo.partitions("pv1")}
    assert listed == {
        "vgtest/root": None,
        "vgtest/data": None,
        "vgtest/zeros": None,
        "vgtest/broken": None,
    }
    with pytest.raises(blocksnap.FilesystemError, match="lies partly on physical volume"):
        repo.open_filesystem("pv1", partition="vgtest/root")


def test_cli_reads_a_logical_volume(lvm_disk: Path, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "disk", str(lvm_disk), check=True)
    out = run_cli("ls", repo, "disk", "latest", "/etc", "--partition", "vgtest/root", "--json")
    doc = json.loads(out.stdout)
    assert doc["partition"] == "vgtest/root" and doc["filesystem"] == "ext4"
    assert [e["name"] for e in doc["entries"]] == ["app.conf", "hostname"]
    cat = run_cli("cat", repo, "disk", "latest", "/etc/hostname", "--partition", "vgtest/data")
    assert cat.stdout == "web01\n"
    proc = run_cli("ls", repo, "disk", "latest", "/")
    assert proc.returncode == 10 and proc.stderr.count("\n") == 1
    assert "--partition N or --partition VG/LV" in proc.stderr


def test_damaged_metadata_falls_back_to_the_other_copy(
    lvm_disk: Path, repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """Every physical volume holds a copy of the VG's metadata: one damaged copy is
    survived, two are named, and the plain partition stays readable."""
    repo.snapshot("disk", lvm_disk)
    offsets = pv_offsets(repo, "disk")
    disk = tmp_path / "disk.img"
    shutil.copyfile(lvm_disk, disk)
    for count, pv in enumerate(offsets, 1):
        area, offset, text = metadata_text(disk, pv)
        with open(disk, "r+b") as f:  # one flipped byte in the text, checksum left alone
            f.seek(area + offset + len(text) // 2)
            f.write(bytes([text[len(text) // 2] ^ 0x20]))
        repo.snapshot(f"damaged{count}", disk)
    with repo.open_filesystem("damaged1", partition="vgtest/root") as fs:
        assert fs.open("/etc/hostname").read() == b"web01\n"
    with pytest.raises(blocksnap.FilesystemError) as err:
        repo.open_filesystem("damaged2", partition="vgtest/root")
    assert str(err.value) == (
        "no partition vgtest/root (the image has: 1, 2, 3); "
        "partition 2: LVM metadata text fails its checksum; "
        "partition 3: LVM metadata text fails its checksum"
    )
    with repo.open_filesystem("damaged2", partition=1) as fs:
        assert fs.kind == "exfat"


HOSTILE = 24


def mutate(text: bytes, rng: random.Random) -> bytes:
    """Metadata text changed the way a hostile or broken writer might."""
    body = text.rstrip(b"\0")
    at = rng.randrange(len(body))
    n = rng.randint(1, 40)
    choice = rng.randrange(6)
    if choice == 0:  # a number made huge, negative or zero
        numbers = [m for m in range(len(body)) if body[m : m + 1].isdigit()]
        at = rng.choice(numbers)
        body = body[:at] + rng.choice([b"9" * 30, b"-1", b"0", b"18446744073709551615"]) + body[at:]
    elif choice == 1:  # a span deleted
        body = body[:at] + body[at + n :]
    elif choice == 2:  # a span repeated
        body = body[:at] + body[at : at + n] * 3 + body[at:]
    elif choice == 3:  # random bytes
        body = body[:at] + rng.randbytes(n) + body[at + n :]
    elif choice == 4:  # sections nested far too deep
        body = body[:at] + b"x {" * 5000 + body[at:]
    else:  # cut short
        body = body[:at]
    return body + b"\0"


def test_hostile_metadata_gives_named_errors(
    lvm_disk: Path, repo: blocksnap.Repository, tmp_path: Path
) -> None:
    """Metadata texts mutated and checksummed again, the same on both physical volumes,
    read in a child process with the fuzz test's memory and time limits: every one is read
    or refused with a FilesystemError."""
    from tests.test_fs_fuzz import MEMORY_MIB, SECONDS_PER_SNAPSHOT

    repo.snapshot("disk", lvm_disk)
    offsets = pv_offsets(repo, "disk")
    rng = random.Random("lvm-metadata")
    for _ in range(HOSTILE):
        disk = tmp_path / "hostile.img"
        shutil.copyfile(lvm_disk, disk)
        hostile = mutate(metadata_text(disk, offsets[0])[2], rng)
        for pv in offsets:
            area, offset, _text = metadata_text(disk, pv)
            write_metadata_text(disk, area, offset, hostile)
        repo.snapshot("hostile", disk)
    limits = [str(MEMORY_MIB), str(SECONDS_PER_SNAPSHOT)]
    repo.close()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_reader", repo.path, "hostile", *limits, "vgtest/root"],
        capture_output=True,
        text=True,
        timeout=SECONDS_PER_SNAPSHOT * HOSTILE,
    )
    assert proc.returncode == 0, f"status {proc.returncode}: {proc.stderr[-3000:]}"
    outcomes = json.loads(proc.stdout)
    assert set(outcomes) <= {"read", "FilesystemError"}, outcomes
    assert sum(outcomes.values()) == HOSTILE and outcomes.get("FilesystemError", 0) >= 6
