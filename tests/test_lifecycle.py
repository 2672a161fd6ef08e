"""Differential and synthetic-full snapshots, diff between any two snapshots, --time."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import IntegrityError, UsageError
from tests.conftest import changed_blocks, debugfs, run_cli

BS = 64 << 10
EDITS = [
    ["write /etc/services services-copy"],
    ["rm docs/note3.txt", "write /usr/share/common-licenses/Apache-2.0 docs/apache"],
    ["mkdir newdir", "write /etc/passwd newdir/passwd", "rm data/blob1.bin"],
]


def restored(repo: blocksnap.Repository, snapshot: str, tmp: Path) -> bytes:
    target = tmp / f"r-{snapshot}.img"
    target.unlink(missing_ok=True)
    repo.restore("vol", snapshot, target)
    return target.read_bytes()


def test_differentials_compare_with_the_base_and_list_what_changed(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    base_data = ext4_image.read_bytes()
    base = repo.snapshot("vol", ext4_image)
    versions = []
    for commands in EDITS:
        debugfs(ext4_image, *commands)
        data = ext4_image.read_bytes()
        info = repo.snapshot("vol", ext4_image, differential=True)
        expected = changed_blocks(base_data, data, BS)
        assert info.kind is blocksnap.SnapshotKind.DIFFERENTIAL
        assert info.base == base.id and info.parent == base.id
        assert info.counts.changed == len(expected)
        listed = [first + k for first, count in info.changed_ranges for k in range(count)]
        assert listed == expected
        versions.append((info, data))
    # Each differential grows: it holds every change since the base, not since the last one.
    assert [i.counts.changed for i, _ in versions] == sorted(i.counts.changed for i, _ in versions)
    for info, data in versions:
        assert restored(repo, info.id, tmp_path) == data
    assert repo.verify(read_data=True).ok


def test_differential_without_a_base_is_a_full(
    repo: blocksnap.Repository, ext4_image: Path
) -> None:
    info = repo.snapshot("vol", ext4_image, differential=True)
    assert info.kind is blocksnap.SnapshotKind.FULL and info.base is None
    with pytest.raises(UsageError):
        repo.snapshot("vol", ext4_image, full=True, differential=True)


def test_synthetic_full_shares_the_map_and_becomes_the_base(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, *EDITS[0])
    incremental = repo.snapshot("vol", ext4_image)
    stored_before = repo.stats().stored_size
    synthetic = repo.synthesize("vol")
    assert synthetic.kind is blocksnap.SnapshotKind.SYNTHETIC
    assert synthetic.parent == incremental.id
    assert (synthetic.map_root, synthetic.image_size) == (
        incremental.map_root,
        incremental.image_size,
    )
    assert synthetic.counts.read == 0 and synthetic.stored_size == 0
    assert repo.stats().stored_size == stored_before  # no block data copied
    assert restored(repo, synthetic.id, tmp_path) == ext4_image.read_bytes()
    synced = ext4_image.read_bytes()
    debugfs(ext4_image, *EDITS[1])
    diff = repo.snapshot("vol", ext4_image, differential=True)
    assert diff.base == synthetic.id
    assert diff.counts.changed == len(changed_blocks(synced, ext4_image.read_bytes(), BS))


def test_synthesize_refuses_a_snapshot_with_a_missing_block(
    repo: blocksnap.Repository, ext4_image: Path
) -> None:
    info = repo.snapshot("vol", ext4_image)
    some_block = next(
        key
        for key, loc in repo.store.index.iter_objects()
        if not isinstance(loc, Exception) and loc.kind == 1
    )
    with repo.store.index.env.begin(write=True) as txn:
        txn.delete(some_block, db=repo.store.index.objects)
    with pytest.raises(IntegrityError, match="missing"):
        repo.synthesize("vol", info.id)
    assert len(repo.snapshots("vol")) == 1


def test_diff_between_any_two_snapshots_matches_the_bytes(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    versions = [ext4_image.read_bytes()]
    infos = [repo.snapshot("vol", ext4_image)]
    for commands in EDITS:
        debugfs(ext4_image, *commands)
        versions.append(ext4_image.read_bytes())
        infos.append(repo.snapshot("vol", ext4_image))
    for a in range(len(infos)):
        for b in range(len(infos)):
            diff = repo.diff("vol", infos[a].id, infos[b].id)
            got = [first + k for first, count in diff.ranges for k in range(count)]
            assert got == changed_blocks(versions[a], versions[b], BS)
    # Grown image: the new tail differs.
    with open(ext4_image, "ab") as f:
        f.write(b"\x01" * (3 * BS + 5))
    grown = repo.snapshot("vol", ext4_image)
    diff = repo.diff("vol", infos[-1].id, grown.id)
    assert diff.ranges[-1] == (len(versions[-1]) // BS, 4)
    # The CLI prints OFFSET LENGTH lines, and --json the same ranges.
    out = run_cli("diff", str(repo.path), "vol", infos[0].id, infos[1].id, check=True).stdout
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    expected = repo.diff("vol", infos[0].id, infos[1].id).byte_ranges(len(versions[1]))
    assert [tuple(map(int, line.split())) for line in lines] == expected
    doc = json.loads(
        run_cli("diff", str(repo.path), "vol", "latest~1", "latest", "--json", check=True).stdout
    )
    assert doc["changed_blocks"] == 4


def test_time_override_and_cli_kinds(ext4_image: Path, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "vol", str(ext4_image), "--time", "2026-01-31T06:00Z", check=True)
    debugfs(ext4_image, *EDITS[0])
    out = run_cli("snapshot", repo, "vol", str(ext4_image), "--differential", "--json", check=True)
    doc = json.loads(out.stdout)
    assert doc["kind"] == "differential" and doc["base"] and doc["changed_ranges"]
    synth = json.loads(run_cli("synthesize", repo, "vol", "--json", check=True).stdout)
    assert synth["kind"] == "synthetic-full" and synth["parent"] == doc["id"]
    listing = run_cli("list", repo, "vol", check=True).stdout
    assert "2026-01-31T06:00:00Z" in listing and "synthetic-full" in listing
    bad = run_cli("snapshot", repo, "vol", str(ext4_image), "--time", "yesterday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    both = run_cli("snapshot", repo, "vol", str(ext4_image), "--full", "--differential")
    assert both.returncode == 2 and both.stderr.count("\n") == 1
    with blocksnap.Repository(repo) as r:
        first = r.snapshots("vol")[0]
        when = datetime.datetime.fromisoformat(first.time.replace("Z", "+00:00"))
        assert when == datetime.datetime(2026, 1, 31, 6, tzinfo=datetime.UTC)
        assert len(r.snapshots("vol")) == 3
