"""Reading less: changed-extent hints, holes of sparse sources, and interrupted runs resumed."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import UsageError
from blocksnap.extents import DataRuns, hint_runs, parse_extents
from blocksnap.snapshot import BUFFER_SIZE, RESUME_SAMPLE_COUNT
from blocksnap.store.packs import overhead_size
from tests.conftest import debugfs, interrupt_after, run_cli
from tests.test_gc_safety import run_killed

BS = 64 << 10
PAGE = 4096
CLI = [sys.executable, "-m", "blocksnap"]
EDITS = [
    ["write /etc/services services-copy", "rm data/blob4.bin"],
    ["write /usr/share/common-licenses/Apache-2.0 docs/apache", "rm docs/note7.txt"],
]


@pytest.fixture
def sparse_image(ext4_base: Path, tmp_path: Path) -> Path:
    """A private copy of the session's ext4 image that keeps mkfs's holes."""
    image = tmp_path / "sparse.img"
    subprocess.run(["cp", "--sparse=always", str(ext4_base), str(image)], check=True)
    return image


def dirty_extents(old: bytes, new: bytes) -> list[tuple[int, int]]:
    """What a hypervisor's dirty bitmap would report: the 4 KiB pages that were written,
    merged into extents, newest first (the order a bitmap walk need not keep)."""
    extents: list[tuple[int, int]] = []
    for offset in range(0, max(len(old), len(new)), PAGE):
        if old[offset : offset + PAGE] != new[offset : offset + PAGE]:
            length = min(PAGE, len(new) - offset)
            if extents and sum(extents[-1]) == offset:
                extents[-1] = (extents[-1][0], extents[-1][1] + length)
            else:
                extents.append((offset, length))
    return extents[::-1]


def restored_digest(repo: blocksnap.Repository, info: blocksnap.SnapshotInfo, tmp: Path) -> str:
    target = tmp / "restored.img"
    target.unlink(missing_ok=True)
    repo.restore(info.volume, info.id, target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bytes_read_by_process() -> int:
    """Bytes this process has read with read/pread so far (page cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def dead_bytes(repo: blocksnap.Repository) -> int:
    """Bytes in packs that no index entry points at: copies stored twice, or garbage."""
    packs = repo.store.index.pack_infos().values()
    return sum(p["size"] - overhead_size(p["records"]) - p["live"] for p in packs)


# --- parsing and validation ----------------------------------------------------------------


def test_parse_extents_reads_pairs_comments_and_blank_lines() -> None:
    text = ["# from thin_delta\n", "\n", "4096 8192\n", "  0 1   # first byte\n", "70 0\n"]
    assert parse_extents(text) == [(4096, 8192), (0, 1), (70, 0)]


@pytest.mark.parametrize(
    "line", ["4096", "1 2 3", "-5 10", "0x10 4", "1e3 5", "ten 4", "4096,8192", "٣ 4"]
)
def test_parse_extents_names_the_bad_line(line: str) -> None:
    with pytest.raises(UsageError, match="line 2: expected OFFSET LENGTH"):
        parse_extents(["0 1\n", line + "\n"])


def test_hint_runs_sorts_merges_and_validates() -> None:
    size = 10 * BS + 100
    extents = [(5 * BS, 1), (0, 10), (BS - 1, 2), (10 * BS, 100), (3 * BS, 0), (5 * BS, BS + 1)]
    assert hint_runs(extents, size, BS) == [(0, 2), (5, 7), (10, 11)]
    assert hint_runs([], size, BS) == []
    with pytest.raises(UsageError, match="past the end"):
        hint_runs([(size - 1, 2)], size, BS)
    with pytest.raises(UsageError, match="past the end"):
        hint_runs([(2**64 - 1, 2**64 - 1)], size, BS)
    with pytest.raises(UsageError, match="negative"):
        hint_runs([(-1, 5)], size, BS)
    with pytest.raises(UsageError, match="not a pair of integers"):
        hint_runs([(1.5, 2)], size, BS)  # type: ignore[list-item]
    with pytest.raises(UsageError, match="not an"):
        hint_runs([(1, 2, 3)], size, BS)  # type: ignore[list-item]


def test_data_runs_find_every_block_with_data(sparse_image: Path) -> None:
    data = sparse_image.read_bytes()
    count = -(-len(data) // BS)
    with open(sparse_image, "rb") as f:
        runs = list(DataRuns(f.fileno(), len(data), BS).split(0, count))
    assert runs[0][0] == 0 and runs[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    holes = [i for a, b, has in runs if not has for i in range(a, b)]
    assert holes, "mkfs.ext4 leaves most of a fresh image unallocated"
    assert all(data[i * BS : (i + 1) * BS].count(0) == BS for i in holes)
    # Asked again from the middle, it agrees.
    with open(sparse_image, "rb") as f:
        again = DataRuns(f.fileno(), len(data), BS)
        mid = count // 2
        tail = [i for a, b, has in again.split(mid, count) if not has for i in range(a, b)]
    assert tail == [i for i in holes if i >= mid]


# --- changed extents -----------------------------------------------------------------------


def test_hinted_incremental_reads_only_the_hints_and_equals_a_full_read(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    repo.snapshot("vol", ext4_image)
    for commands in EDITS:
        old = ext4_image.read_bytes()
        debugfs(ext4_image, *commands)
        new = ext4_image.read_bytes()
        extents = dirty_extents(old, new)
        runs = hint_runs(extents, len(new), BS)
        before = bytes_read_by_process()
        hinted = repo.snapshot("vol", ext4_image, changed_extents=extents)
        read = bytes_read_by_process() - before
        assert hinted.counts.read <= sum(b - a for a, b in runs)
        assert read <= sum(b - a for a, b in runs) * BS + (64 << 10)
        assert read < len(new) // 4
        # The same content as a snapshot that reads everything: the same map.
        unhinted = repo.snapshot("vol", ext4_image)
        assert unhinted.map_root == hinted.map_root
        assert restored_digest(repo, hinted, tmp_path) == digest(ext4_image)
    assert repo.verify(read_data=True).ok


def test_hints_cover_a_grown_image_and_a_differential(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    base = repo.snapshot("vol", ext4_image)
    old = ext4_image.read_bytes()
    debugfs(ext4_image, *EDITS[0])
    with open(ext4_image, "ab") as f:  # the volume grew by a block and a half
        f.write(os.urandom(BS + BS // 2))
    new = ext4_image.read_bytes()
    extents = [e for e in dirty_extents(old, new) if e[0] < len(old)]  # growth not hinted
    diff = repo.snapshot("vol", ext4_image, differential=True, changed_extents=extents)
    assert diff.kind is blocksnap.SnapshotKind.DIFFERENTIAL and diff.base == base.id
    assert restored_digest(repo, diff, tmp_path) == digest(ext4_image)
    assert diff.changed_ranges == repo.diff("vol", base.id, diff.id).ranges
    # The first snapshot of a volume has nothing to take the rest from: it reads all.
    first = repo.snapshot("other", ext4_image, changed_extents=[(0, 1)])
    assert first.kind is blocksnap.SnapshotKind.FULL
    assert first.map_root == repo.snapshot("other", ext4_image, full=True).map_root


def test_bad_changed_extents_are_one_line_errors_and_no_snapshot(
    ext4_image: Path, tmp_path: Path
) -> None:
    repo_path = str(tmp_path / "repo")
    run_cli("init", repo_path, check=True)
    run_cli("snapshot", repo_path, "vol", str(ext4_image), check=True)
    size = ext4_image.stat().st_size
    cases = {
        "garbage": ("12 abc\n", "line 1: expected OFFSET LENGTH"),
        "past-end": (f"# dirty\n{size - 10} 11\n", "past the end"),
        "overflow": (f"{2**64} {2**64}\n", "past the end"),
        "binary": (None, "not text"),
    }
    for name, (text, message) in cases.items():
        hints = tmp_path / name
        if text is None:
            hints.write_bytes(b"\xff\xfe\x00garbage")
        else:
            hints.write_text(text)
        proc = run_cli(
            "snapshot", repo_path, "vol", str(ext4_image), "--changed-extents", str(hints)
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    missing = run_cli("snapshot", repo_path, "vol", str(ext4_image), "--changed-extents", "nope")
    assert missing.returncode == 2 and "cannot read changed extents nope" in missing.stderr
    full = run_cli(
        "snapshot", repo_path, "vol", str(ext4_image), "--full", "--changed-extents", "-"
    )
    assert full.returncode == 2 and "full snapshot reads everything" in full.stderr
    with blocksnap.Repository(repo_path) as repo:
        assert len(repo.snapshots("vol")) == 1
        assert repo.verify().ok


def test_changed_extents_from_stdin_and_a_seekable_stream(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    repo.snapshot("vol", ext4_image)
    old = ext4_image.read_bytes()
    debugfs(ext4_image, *EDITS[1])
    new = ext4_image.read_bytes()
    extents = dirty_extents(old, new)
    # The API takes a seekable stream too: it seeks to the hinted ranges.
    stream = repo.snapshot("vol", io.BytesIO(new), changed_extents=extents)
    assert restored_digest(repo, stream, tmp_path) == digest(ext4_image)
    text = "".join(f"{offset} {length}\n" for offset, length in extents)
    args = ["snapshot", str(tmp_path / "repo"), "vol", str(ext4_image), "--changed-extents", "-"]
    proc = subprocess.run(
        [*CLI, *args, "--json"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"read":' in proc.stdout
    with blocksnap.Repository(tmp_path / "repo") as again:
        latest = again.snapshots("vol")[-1]
        assert latest.map_root == stream.map_root


# --- sparse sources ------------------------------------------------------------------------


def test_holes_are_zero_blocks_that_are_never_read(
    repo: blocksnap.Repository, sparse_image: Path, tmp_path: Path
) -> None:
    size = sparse_image.stat().st_size
    count = -(-size // BS)
    with open(sparse_image, "rb") as f:
        data_blocks = sum(
            b - a for a, b, has in DataRuns(f.fileno(), size, BS).split(0, count) if has
        )
    assert data_blocks * BS < size // 2, "the test needs a sparse image"
    before = bytes_read_by_process()
    info = repo.snapshot("vol", sparse_image)
    read = bytes_read_by_process() - before
    assert info.counts.read == data_blocks
    assert read <= data_blocks * BS + (64 << 10)
    assert restored_digest(repo, info, tmp_path) == digest(sparse_image)
    # A copy with its holes filled in reads every block, and stores the same map.
    dense = tmp_path / "dense.img"
    dense.write_bytes(sparse_image.read_bytes())
    full = repo.snapshot("dense", dense)
    assert full.counts.read == full.block_count
    assert full.map_root == info.map_root
    # A hole punched where the parent had data is a change, found without reading it.
    raw = dense.read_bytes()
    block = next(i for i in range(count - 1, 0, -1) if raw[i * BS : (i + 1) * BS].count(0) < BS)
    subprocess.run(
        ["fallocate", "--punch-hole", "-o", str(block * BS), "-l", str(BS), str(dense)],
        check=True,
    )
    punched = repo.snapshot("dense", dense)
    assert punched.counts.changed == 1 and punched.counts.read == count - 1
    assert restored_digest(repo, punched, tmp_path) == digest(dense)


# --- resume --------------------------------------------------------------------------------


@pytest.fixture
def busy_image(ext4_image: Path) -> Path:
    """The ext4 image with its holes filled by new files: every block holds data."""
    debugfs(ext4_image, *[f"write /usr/lib/x86_64-linux-gnu/libc.so.6 libc{i}" for i in range(8)])
    with open(ext4_image, "r+b") as f:
        data = bytearray(f.read())
        for offset in range(0, len(data), 1 << 20):
            if not any(data[offset : offset + 4096]):
                data[offset : offset + 4096] = os.urandom(4096)
        f.seek(0)
        f.write(data)
    return ext4_image


# A run with checkpoints every 12 MiB, interrupted after 20 MiB, has checkpointed once, at
# the first step (of BUFFER_SIZE) that ends at or after 12 MiB.
CHECKPOINTED = -(-(12 << 20) // BUFFER_SIZE) * BUFFER_SIZE
assert CHECKPOINTED < 20 << 20


def test_resume_reads_and_stores_nothing_twice(busy_image: Path, tmp_path: Path) -> None:
    size = busy_image.stat().st_size
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=256 << 10) as repo:
        with pytest.raises(blocksnap.Interrupted, match="checkpointed: run it again with --resume"):
            repo.snapshot(
                "vol", busy_image, checkpoint_size=12 << 20, progress=interrupt_after(20 << 20)
            )
        ck = repo.checkpoint("vol")
        assert ck is not None and ck.block_count * BS == CHECKPOINTED
        # What was stored after the checkpoint is in the index, unreferenced.
        assert repo.store.index.unreferenced_count() > 0
        # The checkpoint's references are counted: verify finds no drift, even mid-way.
        assert repo.verify().ok
        # A resumed run stopped before its own first checkpoint leaves the old one.
        with pytest.raises(
            blocksnap.Interrupted, match=f"first {CHECKPOINTED} bytes are checkpointed"
        ):
            repo.snapshot("vol", busy_image, resume=True, progress=interrupt_after(0))
        assert repo.checkpoint("vol") == ck
        before = bytes_read_by_process()
        info = repo.snapshot("vol", busy_image, resume=True, checkpoint_size=12 << 20)
        read = bytes_read_by_process() - before
        assert info.counts.resumed == ck.block_count
        # Only a sample of what the checkpoint covers is read again, to check the source.
        assert read <= size - CHECKPOINTED + (RESUME_SAMPLE_COUNT + 3) * BS
        assert dead_bytes(repo) == 0  # no block stored twice
        assert repo.checkpoint("vol") is None
        assert restored_digest(repo, info, tmp_path) == digest(busy_image)
        # Counts cover the whole snapshot, as if it had never stopped.
        assert info.counts.read == info.block_count
        assert info.counts.changed == info.block_count - info.counts.zero
        gc = repo.gc()
        assert gc.unreferenced_left == 0
        report = repo.verify(read_data=True)
        assert report.ok and report.unreferenced_objects == 0, report.problems


def test_resume_after_its_parent_is_pruned_and_gc_runs(
    busy_image: Path, ext4_base: Path, tmp_path: Path
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=256 << 10) as repo:
        parent = repo.snapshot("vol", ext4_base)
        with pytest.raises(blocksnap.Interrupted):
            repo.snapshot(
                "vol", busy_image, checkpoint_size=12 << 20, progress=interrupt_after(20 << 20)
            )
        # While it waits, its parent is removed and gc runs: the checkpoint keeps the
        # parent's map (and so its blocks), which the resumed run takes the rest from.
        with repo.store.register() as registration:
            assert repo.store.remove_snapshot(parent, registration)
        assert repo.snapshots("vol") == []
        repo.gc()
        assert repo.store.index.location(parent.map_root) is not None
        assert repo.verify().ok
        info = repo.snapshot("vol", busy_image, resume=True)
        assert info.parent == parent.id and info.counts.resumed * BS == CHECKPOINTED
        assert restored_digest(repo, info, tmp_path) == digest(busy_image)
        repo.gc()
        report = repo.verify(read_data=True)
        assert report.ok and report.unreferenced_objects == 0, report.problems


def test_resume_refuses_a_different_run_and_a_new_run_replaces_it(
    repo: blocksnap.Repository, busy_image: Path, tmp_path: Path
) -> None:
    repo.snapshot("vol", busy_image)
    debugfs(busy_image, *EDITS[0])
    stop = interrupt_after(20 << 20)
    with pytest.raises(blocksnap.Interrupted):
        repo.snapshot("vol", busy_image, checkpoint_size=4 << 20, progress=stop)
    assert repo.checkpoint("vol") is not None
    with pytest.raises(UsageError, match="it was incremental, this one is full"):
        repo.snapshot("vol", busy_image, full=True, resume=True)
    with pytest.raises(UsageError, match="changed extents are not the ones"):
        repo.snapshot("vol", busy_image, resume=True, changed_extents=[(0, 1)])
    copy = tmp_path / "copy.img"
    shutil.copyfile(busy_image, copy)
    with pytest.raises(UsageError, match="is not the source it read"):
        repo.snapshot("vol", copy, resume=True)
    debugfs(busy_image, *EDITS[1])  # the source changed since: its mtime tells
    with pytest.raises(UsageError, match="is not the source it read"):
        repo.snapshot("vol", busy_image, resume=True)
    # A run without --resume starts over, and its commit drops the old checkpoint.
    fresh = repo.snapshot("vol", busy_image)
    assert fresh.counts.resumed == 0 and repo.checkpoint("vol") is None
    # --resume with nothing to resume is an ordinary run.
    again = repo.snapshot("vol", busy_image, resume=True)
    assert again.counts.resumed == 0 and again.map_root == fresh.map_root
    repo.gc()
    report = repo.verify(read_data=True)
    assert report.ok and report.unreferenced_objects == 0, report.problems


def test_a_snapshot_killed_again_and_again_completes_with_resume(
    busy_image: Path, tmp_path: Path
) -> None:
    repo_path = tmp_path / "repo"
    blocksnap.Repository.init(repo_path, pack_target_size=256 << 10).close()
    args = ["snapshot", str(repo_path), "vol", str(busy_image), "--resume"]
    args += ["--checkpoint-every", "4M"]
    covered: list[int] = []  # blocks the checkpoint covered after each kill
    delay = 0.05
    for _ in range(80):
        status = run_killed(args, delay)
        with blocksnap.Repository(repo_path) as repo:
            committed = repo.snapshots("vol")
            ck = repo.checkpoint("vol")
        if committed:
            break
        assert status == -signal.SIGKILL
        covered.append(0 if ck is None else ck.block_count)
        delay *= 1.15
    assert len(committed) == 1 and ck is None
    assert covered == sorted(covered)  # each run went on from where the last one got
    assert len({c for c in covered if c}) >= 2, covered
    with blocksnap.Repository(repo_path) as repo:
        info = committed[0]
        assert 0 < info.counts.resumed < info.block_count
        assert restored_digest(repo, info, tmp_path) == digest(busy_image)
        assert repo.verify(read_data=True).ok
        assert repo.gc().unreferenced_left == 0
        report = repo.verify(read_data=True)
        assert report.ok and report.unreferenced_objects == 0, report.problems
