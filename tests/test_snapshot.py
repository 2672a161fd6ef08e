"""Full and forever-incremental snapshots of real ext4 images: exact counts, exact restores."""

from __future__ import annotations

import filecmp
import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import UsageError
from blocksnap.store import backend
from blocksnap.store.backend import TMP_MARKER
from tests.conftest import changed_blocks, debugfs, interrupt_after

BS = 64 << 10


def restored_bytes(repo: blocksnap.Repository, volume: str, snap: str, tmp: Path) -> bytes:
    target = tmp / f"restore-{snap}.img"
    if target.exists():
        target.unlink()
    repo.restore(volume, snap, target)
    return target.read_bytes()


def test_chain_of_five_restores_byte_identical_with_exact_counts(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    versions: list[bytes] = []
    infos: list[blocksnap.SnapshotInfo] = []
    stored_contents: set[bytes] = set()
    edits = [
        [],
        ["write /etc/services services-copy"],
        ["rm docs/note3.txt", "write /usr/share/common-licenses/Apache-2.0 docs/apache"],
        ["mkdir newdir", "write /etc/passwd newdir/passwd", "rm data/blob1.bin"],
        ["write /usr/share/common-licenses/GPL-2 data/gpl2"],
    ]
    for step, commands in enumerate(edits):
        if commands:
            debugfs(ext4_image, *commands)
        data = ext4_image.read_bytes()
        info = repo.snapshot("vol", ext4_image)
        blocks = [data[i : i + BS] for i in range(0, len(data), BS)]
        if step == 0:
            expected_changed = [i for i, b in enumerate(blocks) if b.count(0) != len(b)]
            assert info.kind is blocksnap.SnapshotKind.FULL
        else:
            expected_changed = changed_blocks(versions[-1], data, BS)
            assert info.kind is blocksnap.SnapshotKind.INCREMENTAL
            assert info.parent == infos[-1].id
        nonzero_changed = [i for i in expected_changed if blocks[i].count(0) != len(blocks[i])]
        new_contents = {
            hashlib.sha256(blocks[i]).digest() for i in nonzero_changed
        } - stored_contents
        assert info.counts.read == len(blocks)
        assert info.counts.changed == len(expected_changed)
        assert info.counts.hashed == len(nonzero_changed)
        assert info.counts.stored == len(new_contents)
        assert info.counts.zero == sum(1 for b in blocks if b.count(0) == len(b))
        stored_contents |= {hashlib.sha256(b).digest() for b in blocks if b.count(0) != len(b)}
        versions.append(data)
        infos.append(info)
    assert [s.id for s in repo.snapshots("vol")] == [i.id for i in infos]
    for info, data in zip(infos, versions, strict=True):
        assert restored_bytes(repo, "vol", info.id, tmp_path) == data
    assert repo.verify(read_data=True).ok


def test_incremental_metadata_stays_small(repo: blocksnap.Repository, ext4_image: Path) -> None:
    full = repo.snapshot("vol", ext4_image)
    debugfs(ext4_image, "write /etc/hostname hostname")
    inc = repo.snapshot("vol", ext4_image)
    assert 0 < inc.counts.stored <= 8
    assert inc.metadata_size < full.metadata_size


def test_copy_of_volume_under_other_name_stores_nothing(
    repo: blocksnap.Repository, ext4_image: Path
) -> None:
    repo.snapshot("a", ext4_image)
    copy = repo.snapshot("b", ext4_image)
    assert copy.kind is blocksnap.SnapshotKind.FULL
    assert copy.counts.stored == 0
    assert copy.counts.hashed > 0
    assert copy.stored_size == 0


def test_full_flag_rehashes_everything_but_stores_nothing_new(
    repo: blocksnap.Repository, ext4_image: Path
) -> None:
    first = repo.snapshot("vol", ext4_image)
    again = repo.snapshot("vol", ext4_image, full=True)
    assert again.kind is blocksnap.SnapshotKind.FULL and again.parent is None
    assert again.counts.hashed == first.counts.hashed
    assert again.counts.stored == 0


@pytest.mark.parametrize("size", [0, 1, 4095, 65537, 3 * BS + 12345])
def test_odd_image_sizes_round_trip(repo: blocksnap.Repository, tmp_path: Path, size: int) -> None:
    image = tmp_path / "odd.img"
    data = bytearray(os.urandom(size))
    if size > 2 * BS:
        data[BS : 2 * BS] = bytes(BS)  # a zero region in the middle
    image.write_bytes(data)
    info = repo.snapshot("odd", image)
    assert info.image_size == size
    assert restored_bytes(repo, "odd", "latest", tmp_path) == bytes(data)


def test_grow_and_shrink_between_snapshots(repo: blocksnap.Repository, tmp_path: Path) -> None:
    image = tmp_path / "v.img"
    base = os.urandom(5 * BS + 100)
    sizes = []
    for data in (
        base,
        base + os.urandom(3 * BS),
        base[: 2 * BS + 7],
        base[: 2 * BS + 7] + bytes(BS),
    ):
        image.write_bytes(data)
        info = repo.snapshot("v", image)
        sizes.append((info.id, data))
    grown = repo.resolve("v", "latest~2")
    assert grown.counts.changed == 4  # the short last block became full, plus 3 new blocks
    assert grown.counts.stored == 4
    shrunk = repo.resolve("v", "latest~1")
    assert shrunk.counts.changed == 1 and shrunk.counts.stored == 1  # the new short block
    for snap_id, data in sizes:
        assert restored_bytes(repo, "v", snap_id, tmp_path) == data


def test_zero_regions_are_never_stored(repo: blocksnap.Repository, tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"data" * 1000)
    info = repo.snapshot("s", image)
    assert info.counts.zero == 1023 and info.counts.stored == 1
    out = tmp_path / "out.img"
    repo.restore("s", "latest", out)
    assert out.stat().st_blocks * 512 < 1 << 20  # zero blocks are holes
    assert out.read_bytes() == image.read_bytes()


def test_stream_source_without_size(repo: blocksnap.Repository, tmp_path: Path) -> None:
    data = os.urandom(3 * BS + 5)

    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
            n = min(len(b), len(data) - self.pos, 1000)  # short reads, like a pipe
            memoryview(b)[:n] = data[self.pos : self.pos + n]
            self.pos += n
            return n

    info = repo.snapshot("stream", Stream())
    assert info.image_size == len(data)
    assert restored_bytes(repo, "stream", "latest", tmp_path) == data


def test_source_that_grows_while_read_is_refused(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    image = tmp_path / "g.img"
    image.write_bytes(os.urandom(20 << 20))

    def grow(progress: blocksnap.Progress) -> None:
        if progress.phase == "read" and progress.done == 8 << 20:
            with open(image, "ab") as f:
                f.write(b"more")

    with pytest.raises(blocksnap.SourceError, match="grew"):
        repo.snapshot("g", image, progress=grow)
    assert repo.snapshots("g") == []


def test_source_that_shrinks_while_read_is_refused(
    repo: blocksnap.Repository, tmp_path: Path
) -> None:
    image = tmp_path / "s.img"
    image.write_bytes(os.urandom(20 << 20))

    def shrink(progress: blocksnap.Progress) -> None:
        if progress.phase == "read" and progress.done == 8 << 20:
            os.truncate(image, 10 << 20)

    with pytest.raises(blocksnap.SourceError, match="shrank"):
        repo.snapshot("s", image, progress=shrink)
    assert repo.snapshots("s") == []


def test_interrupted_run_deletes_the_pack_it_was_writing(
    repo: blocksnap.Repository, ext4_image: Path, tmp_path: Path
) -> None:
    """A pack is written while it fills; a run stopped mid-pack leaves none of it."""
    packs = tmp_path / "repo" / "packs"
    partial: list[Path] = []
    stop = interrupt_after(40 << 20)

    def look_then_stop(progress: blocksnap.Progress) -> None:
        partial[:] = packs.rglob(f"*{TMP_MARKER}*")
        stop(progress)

    with pytest.raises(blocksnap.Interrupted, match="nothing was committed"):
        repo.snapshot("vol", ext4_image, progress=look_then_stop)
    assert partial, "the open pack was not being written when the run stopped"
    assert not list((tmp_path / "repo").rglob(f"*{TMP_MARKER}*"))
    for pack in packs.rglob("*"):
        assert not pack.is_file() or repo.store.index.has_pack(bytes.fromhex(pack.name))
    assert repo.verify().ok
    info = repo.snapshot("vol", ext4_image)
    assert restored_bytes(repo, "vol", info.id, tmp_path) == ext4_image.read_bytes()


def test_a_pack_the_run_cannot_delete_is_left_to_gc(
    repo: blocksnap.Repository,
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When deleting its unfinished pack fails too, the writer leaves its intents, as a
    killed one does, and the next gc deletes the pack."""

    def cannot(self: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(backend._LocalWriter, "abort", cannot)
    with pytest.raises(blocksnap.Interrupted, match="nothing was committed"):
        repo.snapshot("vol", ext4_image, progress=interrupt_after(40 << 20))
    monkeypatch.undo()
    assert list((tmp_path / "repo").rglob(f"*{TMP_MARKER}*"))
    report = repo.gc()
    assert report.dead_writers == 1 and report.leftovers_deleted >= 1
    assert not list((tmp_path / "repo").rglob(f"*{TMP_MARKER}*"))
    assert repo.verify().ok


def test_block_size_is_fixed_per_volume(repo: blocksnap.Repository, ext4_image: Path) -> None:
    repo.snapshot("vol", ext4_image, block_size=4096)
    with pytest.raises(UsageError, match="block size"):
        repo.snapshot("vol", ext4_image, block_size=8192)
    assert repo.snapshot("vol", ext4_image).block_size == 4096
    with pytest.raises(UsageError):
        repo.snapshot("other", ext4_image, block_size=3000)


def test_snapshot_names(repo: blocksnap.Repository, tmp_path: Path) -> None:
    image = tmp_path / "n.img"
    ids = []
    for i in range(3):
        image.write_bytes(bytes([i + 1]) * 10000)
        ids.append(repo.snapshot("n", image).id)
    assert repo.resolve("n", "latest").id == ids[2]
    assert repo.resolve("n", "latest~2").id == ids[0]
    assert repo.resolve("n", ids[1][:10]).id == ids[1]
    with pytest.raises(blocksnap.NotFoundError):
        repo.resolve("n", "latest~3")
    with pytest.raises(blocksnap.NotFoundError):
        repo.resolve("nope", "latest")


def test_open_image_random_reads_fetch_only_needed_blocks(
    repo: blocksnap.Repository, ext4_image: Path
) -> None:
    repo.snapshot("vol", ext4_image)
    data = ext4_image.read_bytes()
    rng = __import__("random").Random(5)
    with repo.open_image("vol", "latest") as f:
        for _ in range(200):
            pos = rng.randrange(len(data))
            n = rng.randrange(1, 20000)
            f.seek(pos)
            assert f.read(n) == data[pos : pos + n]
        assert 0 < f.stats.blocks_fetched <= 400
        f.seek(0)
        assert f.read() == data
    with blocksnap.open_image(repo.path, "vol") as g:
        g.seek(1024)
        assert g.read(4096) == data[1024 : 1024 + 4096]
        assert g.stats.blocks_fetched == 1


# A snapshot whose read of the part at 24 MiB fails for real inside the native call
# (pread on a write-only descriptor: EBADF) while other parts are in flight.  Then every
# buffer its frames still hold is released: BufferError if a native call kept one, which
# is what crashed CPython when the garbage collector met it (run in a child for that).
_FAILING_READ = """
import gc, os, sys
import blocksnap
from blocksnap import native
from blocksnap.errors import SourceError

image, repo_path = sys.argv[1:]
real = native.read_scan
unreadable = os.open(image, os.O_WRONLY)

def failing(fd, offset, buf, *rest):
    return real(unreadable if offset == 24 << 20 else fd, offset, buf, *rest)

def frames(exc, seen):
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        yield from frames(exc.__cause__, seen)
        exc = exc.__context__

native.read_scan = failing
with blocksnap.Repository(repo_path) as repo:
    for _ in range(2):
        try:
            repo.snapshot("vol", image)
        except SourceError as exc:
            held = 0
            for frame in frames(exc, set()):
                for value in list(frame.f_locals.values()):
                    if isinstance(value, memoryview):
                        try:
                            value.release()
                        except BufferError:
                            held += 1
            print(f"{exc}; buffers held: {held}", flush=True)
        gc.collect()
"""


def _assert_consistent_then_usable(
    repo_path: Path, source: str | Path, image: Path, tmp: Path
) -> None:
    """The repository verifies, and a snapshot of the good source (holding image's bytes)
    works and restores them."""
    with blocksnap.Repository(repo_path) as repo:
        report = repo.verify(read_data=True)
        assert report.ok and not report.leftovers, (report.problems, report.leftovers)
        info = repo.snapshot("vol", source)
        assert repo.verify(read_data=True).ok
        target = tmp / "restored.img"
        repo.restore("vol", info.id, target)
    assert filecmp.cmp(target, image, shallow=False)


def test_snapshot_read_error_in_a_worker_fails_cleanly(tmp_path: Path) -> None:
    """Every native read has returned, and holds no buffer, before a failed snapshot's
    buffers are dropped: the failure is the SourceError, never a crash at exit."""
    image = tmp_path / "vol.img"
    image.write_bytes(os.urandom(64 << 20))
    repo_path = tmp_path / "repo"
    blocksnap.Repository.init(repo_path).close()
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_READ, str(image), str(repo_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == f"error reading {image}: Bad file descriptor; buffers held: 0\n" * 2
    _assert_consistent_then_usable(repo_path, image, image, tmp_path)


def _read_size(pid: int) -> int:
    """Bytes the process has read so far (pread included), from /proc."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


@pytest.fixture(scope="module")
def random_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of random bytes: a snapshot of it takes long enough to be cut short."""
    image = tmp_path_factory.mktemp("random") / "random.img"
    image.write_bytes(os.urandom(256 << 20))
    return image


@pytest.mark.parametrize("attempt", range(5))
def test_snapshot_of_loop_device_shrinking_mid_read_fails_with_one_line(
    attempt: int, random_image: Path, tmp_path: Path
) -> None:
    """A block device that shrinks (backing file truncated, losetup -c) while the workers
    read it: the one-line source error and exit 7, never a signal or an ignored exception;
    the repository stays consistent and takes a good snapshot afterwards."""
    pristine = random_image
    backing = tmp_path / "backing.img"
    backing.write_bytes(pristine.read_bytes())
    repo_path = tmp_path / "repo"
    blocksnap.Repository.init(repo_path).close()
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blocksnap", "snapshot", str(repo_path), "vol", device],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        # Shrink the device once the snapshot is reading it (8 MiB in, of 256).
        while proc.poll() is None and _read_size(proc.pid) < 8 << 20:
            time.sleep(0.001)
        os.truncate(backing, 8 << 20)
        subprocess.run(["losetup", "-c", device], check=True)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 7, (proc.returncode, err[-2000:])
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("blocksnap: error: "), err[-2000:]
        assert device in err
        # The good source again, on the same device.
        backing.write_bytes(pristine.read_bytes())
        subprocess.run(["losetup", "-c", device], check=True)
        _assert_consistent_then_usable(repo_path, device, pristine, tmp_path)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
