"""The LMDB index as the CLI meets it: a damaged data file, map sizing and growth."""

from __future__ import annotations

import os
import random
import resource
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import blocksnap
from blocksnap.store import lmdbfile, mapsize
from tests.conftest import debugfs, run_cli

PAGE = 4096


@pytest.fixture
def two_snapshots(tmp_path: Path, ext4_image: Path) -> tuple[Path, Path]:
    """A repository holding two snapshots of volume "vol" (the image as of the second)."""
    repo = tmp_path / "repo"
    run_cli("init", str(repo), check=True)
    run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
    debugfs(ext4_image, "rm /docs/note3.txt", "mkdir /new")
    run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
    return repo, ext4_image


def _commands(repo: Path, image: Path, out: Path) -> list[list[str]]:
    r = str(repo)
    return [
        ["list", r],
        ["info", r, "vol", "latest"],
        ["ls", r, "vol", "latest", "/docs"],
        ["cat", r, "vol", "latest", "/docs/note0.txt"],
        ["diff", r, "vol", "latest~1", "latest"],
        ["stats", r],
        ["verify", r],
        ["verify", r, "--read-data"],
        ["restore", r, "vol", "latest", str(out / "restored.img")],
        ["snapshot", r, "vol", str(image)],
        ["prune", r, "vol", "--keep-last", "1"],
        ["gc", r],
        ["protect", r, "vol", "latest"],
        ["policy", r, "vol", "--keep-last", "3"],
    ]


@pytest.mark.parametrize("size", ["half", "page-less", "one-page", "empty"])
def test_index_truncated_data_file_is_one_line_integrity_error(
    two_snapshots: tuple[Path, Path], tmp_path: Path, size: str
) -> None:
    repo, image = two_snapshots
    data = repo / "index" / "data.mdb"
    full = data.stat().st_size
    new_size = {"half": full // 2, "page-less": full - PAGE, "one-page": PAGE, "empty": 0}[size]
    os.truncate(data, new_size)
    for args in _commands(repo, image, tmp_path):
        proc = run_cli(*args)
        assert proc.returncode == blocksnap.IntegrityError.exit_code, (args, proc)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "index" in proc.stderr and f"repair {repo} --rebuild-index" in proc.stderr
    run_cli("repair", str(repo), "--rebuild-index", check=True)
    run_cli("verify", str(repo), "--read-data", check=True)
    run_cli("restore", str(repo), "vol", "latest", str(tmp_path / "after.img"), check=True)
    assert (tmp_path / "after.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("seed", range(8))
def test_index_random_bytes_in_pages_never_kill_verify(
    two_snapshots: tuple[Path, Path], seed: int
) -> None:
    """verify checks every page before LMDB reads it, so it reports the damage (or finds
    none where the bytes fell on free space) instead of dying of it.  Other commands
    look up only what they need, where LMDB checks less: verify is the one to run."""
    repo, _image = two_snapshots
    rng = random.Random(seed)
    data = repo / "index" / "data.mdb"
    pages = data.stat().st_size // PAGE
    with open(data, "r+b") as f:
        for page in rng.sample(range(2, pages), min(4, pages - 2)):  # the meta pages stay
            f.seek(page * PAGE + rng.randrange(PAGE // 2))
            f.write(rng.randbytes(rng.randrange(16, PAGE // 2)))
    for args in (["verify", str(repo)], ["verify", str(repo), "--read-data"]):
        proc = run_cli(*args)
        assert proc.returncode in (0, blocksnap.IntegrityError.exit_code), (args, proc)
        assert proc.stderr.count("\n") <= 1, (args, proc.stderr)
    run_cli("repair", str(repo), "--rebuild-index", check=True)
    run_cli("verify", str(repo), "--read-data", check=True)


def _limited(limit: int) -> Callable[[], None]:
    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return set_limit


def _run_limited(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blocksnap", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        preexec_fn=_limited(limit),
    )


def _started_size() -> int:
    """Address space (VmSize) of a Python that has loaded blocksnap's CLI and libraries."""
    script = (
        "import re, blocksnap.cli, blocksnap.store.index; "
        "print(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    return int(out.stdout) * 1024


@pytest.mark.parametrize("limit_mib", [2048, 1024])
def test_index_commands_work_under_an_address_space_limit(
    tmp_path: Path, ext4_image: Path, limit_mib: int
) -> None:
    limit = limit_mib << 20
    repo = str(tmp_path / "repo")
    for args in (
        ["init", repo],
        ["snapshot", repo, "vol", str(ext4_image)],
        ["snapshot", repo, "vol", str(ext4_image)],
        ["list", repo],
        ["ls", repo, "vol", "latest", "/docs"],
        ["verify", repo, "--read-data"],
        ["prune", repo, "vol", "--keep-last", "1"],
        ["gc", repo],
        ["restore", repo, "vol", "latest", str(tmp_path / "restored.img")],
    ):
        proc = _run_limited(limit, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (tmp_path / "restored.img").read_bytes() == ext4_image.read_bytes()


def test_index_address_space_too_small_names_the_limit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    run_cli("init", str(repo), check=True)
    limit = _started_size() + (48 << 20)  # Python starts; the smallest map does not fit
    proc = _run_limited(limit, "list", str(repo))
    assert proc.returncode == blocksnap.StoreError.exit_code, proc
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "address-space limit (ulimit -v)" in proc.stderr
    assert f"{limit >> 20} MiB" in proc.stderr


@pytest.fixture
def small_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps that start at 1 MiB, so that a small repository makes them grow."""
    monkeypatch.setattr(mapsize, "MAP_INITIAL_SIZE", 1 << 20)
    monkeypatch.setattr(mapsize, "MAP_MIN_SIZE", 1 << 20)


def _grow(repo: blocksnap.Repository, image: Path, rounds: int, seed: int) -> None:
    """Snapshots of image in 4 KiB blocks, each after rewriting a tenth of it."""
    rng = random.Random(seed)
    size = image.stat().st_size
    for _ in range(rounds):
        with open(image, "r+b") as f:
            for _ in range(size // PAGE // 10):
                f.seek(rng.randrange(size // PAGE) * PAGE)
                f.write(rng.randbytes(PAGE))
        repo.snapshot("vol", image, block_size=PAGE)


def test_index_map_grows_past_its_initial_size(
    small_map: None, tmp_path: Path, ext4_image: Path
) -> None:
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=1 << 20) as repo:
        env = repo.store.index.env
        initial = env.info()["map_size"]
        _grow(repo, ext4_image, 4, seed=3)
        assert env.info()["map_size"] > initial
        assert (tmp_path / "repo" / "index" / "data.mdb").stat().st_size > initial
        assert repo.verify(read_data=True).ok
        repo.restore("vol", "latest", tmp_path / "restored.img")
    assert (tmp_path / "restored.img").read_bytes() == ext4_image.read_bytes()
    run_cli("verify", str(tmp_path / "repo"), check=True)


_READER = """
import sys
import blocksnap, blocksnap.store.mapsize as i
i.MAP_INITIAL_SIZE = i.MAP_MIN_SIZE = 1 << 20
with blocksnap.Repository(sys.argv[1]) as repo:
    print(len(repo.snapshots("vol")), repo.store.index.env.info()["map_size"], flush=True)
    sys.stdin.readline()
    print(len(repo.snapshots("vol")), repo.verify().ok, flush=True)
    repo.restore("vol", "latest", sys.argv[2])
"""


def test_index_reader_adopts_a_map_grown_by_another_process(
    small_map: None, tmp_path: Path, ext4_image: Path
) -> None:
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path, pack_target_size=1 << 20) as repo:
        _grow(repo, ext4_image, 1, seed=5)
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(repo_path), str(tmp_path / "restored.img")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert reader.stdin is not None and reader.stdout is not None
        count, reader_map = (int(x) for x in reader.stdout.readline().split())
        assert count == 1
        while (repo_path / "index" / "data.mdb").stat().st_size <= reader_map:
            _grow(repo, ext4_image, 1, seed=count)
            count += 1
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split() == [str(count), "True"]
        assert reader.wait(timeout=300) == 0
    assert (tmp_path / "restored.img").read_bytes() == ext4_image.read_bytes()


def _nodes(page: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(offset, lo | hi << 16, flags, key size, key) of every node of an LMDB page."""
    lower = struct.unpack_from("<H", page, 12)[0]
    out = []
    for k in range(16, lower, 2):
        (at,) = struct.unpack_from("<H", page, k)
        lo, hi, flags, key_size = struct.unpack_from("<HHHH", page, at)
        out.append((at, lo | hi << 16, flags, key_size, page[at + 8 : at + 8 + key_size]))
    return out


def _leaves(repo: Path) -> list[int]:
    """The page numbers of every leaf of every named database (see store/lmdbfile.py)."""
    raw = (repo / "index" / "data.mdb").read_bytes()
    _size, *metas = lmdbfile.read_metas(str(repo / "index"))
    main = raw[max(metas, key=lambda m: m.txnid).main_root * PAGE :][:PAGE]
    pending = [
        struct.unpack_from("<Q", main, at + 8 + key_size + 40)[0]  # the record's root
        for at, _size, flags, key_size, _key in _nodes(main)
        if flags & 0x02
    ]
    leaves = []
    while pending:
        pgno = pending.pop()
        if pgno == lmdbfile.P_INVALID:  # an empty database
            continue
        page = raw[pgno * PAGE : (pgno + 1) * PAGE]
        if struct.unpack_from("<H", page, 10)[0] & 0x02:
            leaves.append(int(pgno))
        else:
            pending += [child | flags << 32 for _at, child, flags, _k, _key in _nodes(page)]
    return leaves


def test_index_nodes_past_their_page_are_damage_for_verify(
    two_snapshots: tuple[Path, Path],
) -> None:
    """A leaf node placed past its page, which LMDB reads unchecked: past the end of the
    file, that is SIGBUS."""
    repo, _image = two_snapshots
    data = repo / "index" / "data.mdb"
    end = data.stat().st_size
    near_end = [pgno for pgno in _leaves(repo) if pgno * PAGE + 0xFFF8 >= end]
    assert near_end
    with open(data, "r+b") as f:
        f.seek(near_end[0] * PAGE + 16)  # the offset of its first node
        f.write(struct.pack("<H", 0xFFF8))
    for args in (["verify", str(repo)], ["verify", str(repo), "--read-data"]):
        proc = run_cli(*args)
        assert proc.returncode == blocksnap.IntegrityError.exit_code, proc
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "out of bounds" in proc.stderr and "--rebuild-index" in proc.stderr
    run_cli("repair", str(repo), "--rebuild-index", check=True)
    run_cli("verify", str(repo), "--read-data", check=True)


def test_an_index_growing_while_it_is_opened_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer in another process commits between the open's look at the data file's
    size and its read of the meta pages: the newer meta names pages past the size seen
    first, which is growth, not truncation."""
    path = tmp_path / "repo"
    blocksnap.Repository.init(path).close()
    image = tmp_path / "random.img"
    image.write_bytes(random.Random(5).randbytes(24 << 20))
    real = lmdbfile._parse_meta
    grown: list[int] = []

    def parse(data: bytes, which: int) -> lmdbfile.Meta | None:
        if not grown:  # between the first meta read and the rest: another process commits
            grown.append(os.path.getsize(path / "index" / "data.mdb"))
            run_cli("snapshot", str(path), "vol", str(image), check=True)
        return real(data, which)

    monkeypatch.setattr(lmdbfile, "_parse_meta", parse)
    lmdbfile.check_data_file(str(path / "index"))
    assert os.path.getsize(path / "index" / "data.mdb") > grown[0]


def test_an_index_of_format_3_is_taken_and_a_newer_one_refused(tmp_path: Path) -> None:
    """Format 4 only added keys: a format 3 index is used as it is and marked 4 when opened
    for writing; one of a format this blocksnap does not know is refused, with the fix."""
    from blocksnap.store.index import Index

    repo = tmp_path / "repo"
    blocksnap.Repository.init(repo).close()

    def set_format(value: bytes) -> None:
        index = Index(str(repo / "index"))
        index._write("test", lambda txn: txn.put(b"format", value, db=index.meta))
        index.close()

    def get_format() -> bytes | None:
        index = Index(str(repo / "index"))
        with index._begin() as txn:
            value = txn.get(b"format", db=index.meta)
        index.close()
        return None if value is None else bytes(value)

    set_format(b"3")
    blocksnap.Repository(repo).close()  # opened for writing: upgraded
    assert get_format() == b"4"
    set_format(b"5")
    proc = run_cli("list", str(repo))
    assert proc.returncode != 0
    assert "index format b'5' is not b'4'; run repair --rebuild-index" in proc.stderr
    assert "Traceback" not in proc.stderr
