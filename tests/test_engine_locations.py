"""The engine through the CLI, the same on a local repository and on S3: snapshot chains
(incremental, differential, synthetic full, given extents), restore and restore
--only-changed, single-file restore on all six filesystems, protect, policy, prune, gc,
verify --read-data, a rebuilt index, and a damaged pack found and named.

Each step runs as a user would run it; on S3 the repository is an s3:// URL on a real
SeaweedFS, through a cache directory of this host's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import debugfs, run_cli
from tests.fsimages import CAPS, KINDS
from tests.s3server import S3_BUCKET, S3Server, use_server
from tests.test_files import compare_tree


@dataclass
class Location:
    """Where the test's repository is, and how to reach its objects."""

    repo: str
    options: list[str]
    s3: S3Server | None = None
    prefix: str = ""

    def cli(self, *args: str, check: bool = True) -> str:
        command, *rest = args
        return run_cli(command, self.repo, *rest, *self.options, check=check).stdout

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json"))

    def ids(self, volume: str) -> set[str]:
        doc = self.json("list", volume)
        assert isinstance(doc, dict)
        return {str(s["id"]) for s in doc[volume]}

    def packs(self) -> dict[str, int]:
        if self.s3 is None:
            root = Path(self.repo) / "packs"
            return {
                str(p.relative_to(self.repo)): p.stat().st_size
                for p in root.rglob("*")
                if p.is_file()
            }
        backend = self.s3.backend(self.prefix)
        try:
            return {info.name: info.size for info in backend.list("packs/")}
        finally:
            backend.close()

    def flip(self, name: str, offset: int) -> None:
        """Damage one byte of a stored object, as bit rot or a bad disk would."""
        if self.s3 is None:
            with open(Path(self.repo) / name, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 0x40]))
            return
        backend = self.s3.backend(self.prefix)
        try:
            data = bytearray(backend.get(name))
            data[offset] ^= 0x40
            backend.put(name, bytes(data))
        finally:
            backend.close()


@pytest.fixture(params=["local", "s3"])
def location(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Location]:
    if request.param == "local":
        yield Location(str(tmp_path / "repo"), [])
        return
    server: S3Server = request.getfixturevalue("s3_server")
    use_server(monkeypatch, server)
    yield Location(
        f"s3://{S3_BUCKET}/{s3_prefix}",
        ["--cache-dir", str(tmp_path / "cache")],
        server,
        s3_prefix,
    )


def _id(doc: object) -> str:
    assert isinstance(doc, dict)
    return str(doc["id"])


def test_engine_on_each_location(
    location: Location,
    ext4_image: Path,
    fs_images: dict[str, Path],
    trees: dict[bool, Path],
    tmp_path: Path,
) -> None:
    loc = location
    loc.cli("init")
    images: dict[str, bytes] = {}

    def snapshot(*extra: str, source: Path = ext4_image) -> str:
        snap = _id(loc.json("snapshot", "vol", str(source), *extra))
        images[snap] = source.read_bytes()
        return snap

    # A chain: full, incremental, differential, synthetic full, one given the extents.
    full = snapshot()
    assert images[full] == ext4_image.read_bytes()
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(3 << 20))
    debugfs(ext4_image, f"write {new} new.bin", "rm docs/note3.txt")
    incremental = snapshot()
    debugfs(ext4_image, "rm docs/note4.txt")
    differential = snapshot("--differential")
    info = loc.json("info", "vol", differential)
    assert isinstance(info, dict) and info["kind"] == "differential" and info["base"] == full
    synthetic = _id(loc.json("synthesize", "vol", differential))
    images[synthetic] = images[differential]
    # Given the changed extents (as a hypervisor's dirty bitmap would), only those are read.
    previous = ext4_image.read_bytes()
    debugfs(ext4_image, "rm docs/note5.txt")
    current = ext4_image.read_bytes()
    step = 64 << 10
    changed = [
        o for o in range(0, len(current), step) if current[o : o + step] != previous[o : o + step]
    ]
    assert changed
    extents = tmp_path / "extents"
    extents.write_text("".join(f"{offset} {step}\n" for offset in changed))
    hinted = snapshot("--changed-extents", str(extents))
    assert loc.ids("vol") == set(images)

    # Every snapshot restores byte-identical; --only-changed turns one into another.
    for snap, image in images.items():
        target = tmp_path / f"{snap}.img"
        loc.cli("restore", "vol", snap, str(target))
        assert target.read_bytes() == image, snap
    target = tmp_path / f"{full}.img"
    loc.cli("restore", "vol", hinted, str(target), "--only-changed")
    assert target.read_bytes() == images[hinted]

    # Single files out of each filesystem kind, and ls / cat inside the ext4 volume.
    cat = subprocess.run(
        [
            sys.executable,
            "-m",
            "blocksnap",
            "cat",
            loc.repo,
            "vol",
            incremental,
            "/new.bin",
            *loc.options,
        ],
        capture_output=True,
        check=True,
    )
    assert cat.stdout == new.read_bytes()
    assert "new.bin" in loc.cli("ls", "vol", incremental, "/")
    for kind in KINDS:
        loc.cli("snapshot", f"fs-{kind}", str(fs_images[kind]))
        out = tmp_path / f"out-{kind}"
        loc.cli("extract", f"fs-{kind}", "latest", "/", "--to", str(out))
        assert compare_tree(trees[CAPS[kind].links], out, CAPS[kind]) > 10, kind

    # Lifecycle: protect, a policy, prune, gc; the protected snapshot and the kept stay.
    loc.cli("protect", "vol", full)
    loc.cli("policy", "vol", "--keep-last", "2")
    loc.cli("prune", "vol")
    kept = loc.ids("vol")
    assert kept == {full, hinted, synthetic}
    gc = loc.json("gc")
    assert isinstance(gc, dict) and gc["problems"] == []
    # A full reconciliation finds nothing more: no writer left anything.
    full_gc = loc.json("gc", "--full")
    assert isinstance(full_gc, dict) and full_gc["problems"] == [], full_gc
    assert full_gc["orphan_packs"] == full_gc["unfinished_discarded"] == 0
    verified = loc.json("verify", "--read-data")
    assert isinstance(verified, dict) and verified["ok"], verified
    for snap in kept:
        target = tmp_path / f"kept-{snap}.img"
        loc.cli("restore", "vol", snap, str(target))
        assert target.read_bytes() == images[snap]

    # The index rebuilt from the stored objects: the same snapshots.
    loc.cli("repair", "--rebuild-index")
    assert loc.ids("vol") == kept

    # One byte of the largest pack damaged: verify names it, and no restore returns
    # wrong bytes: each is byte-identical or one line of error.
    packs = loc.packs()
    damaged = max(packs, key=lambda name: packs[name])
    loc.flip(damaged, packs[damaged] // 2)
    proc = run_cli("verify", loc.repo, "--read-data", *loc.options)
    assert proc.returncode != 0
    assert damaged.rsplit("/", 1)[-1] in proc.stdout + proc.stderr
    failed = 0
    for snap in kept:
        target = tmp_path / f"damaged-{snap}.img"
        proc = run_cli("restore", loc.repo, "vol", snap, str(target), *loc.options)
        if proc.returncode == 0:
            assert target.read_bytes() == images[snap]
        else:
            failed += 1
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
            assert not target.exists()
    assert failed >= 1
