"""Peers side by side: blocksnap, borg, restic and casync on the same ext4 images, in one run.

Every tool runs as its own command line, timed whole (start-up included), its peak RSS
taken by GNU time (`%M`: the command's own high-water mark, not its parent's).  The
operations are those of a backup cycle: a full snapshot of the benchmark image; an
incremental of the copy with 2% of its files rewritten; a full restore of that one,
checked byte-identical; and one file of about 1 MiB out of it, checked too.

Only blocksnap reads a file out of a snapshot without mounting anything: a peer restores
the whole image, mounts it read-only on a loop device and copies the file (borg, restic
and casync can also mount a backup through FUSE or serve it as a device, which this does
not measure).  A restore is timed until its output is on disk (fsync), as blocksnap's own
restore and extract wait for that before they end and the peers do not.  The page cache
is warm in the sense that the image is read before every round, after the previous
round's output is written back with sync; a restore reads the repository as the earlier
rounds left it in the page cache.  Outputs are checked and removed, and byte counts
taken, between rounds, outside the timing.

The images are sparse files: blocksnap skips their holes unread and restores them as
holes, as casync does; the peers read every zero byte of them, and borg (`extract
--stdout`) and restic (`dump`) also write every zero byte back, which weighs on their
full and restore times.

Settings, chosen so that the stored bytes compare: no encryption where a tool allows it
(restic always encrypts); zstd, at level 1 where the level can be chosen (borg; restic's
`auto` and casync use their default levels); borg's fixed chunker at 64 KiB (blocksnap's
default block size) and at 4 MiB, and its default buzhash chunker; casync's default
64 KiB average chunks.  BLOCKSNAP_BENCH_PEER_ROUNDS gives the rounds (1 in the quick pass,
3 in the README's full run).  A tool that is not installed is skipped, naming what
installs the peers: `bash .ci/setup --peers`.
"""

from __future__ import annotations

import filecmp
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from tests.conftest import DEBUGFS

ROUNDS = int(os.environ.get("BLOCKSNAP_BENCH_PEER_ROUNDS", "1"))
TIME = "/usr/bin/time"
WANT_SIZE = 1 << 20
INSTALL = "bash .ci/setup --peers installs them"


class Peer:
    """One tool at one setting: the commands that back an image up and bring it back."""

    name = ""
    program = ""
    settings = ""

    def env(self, repo: Path) -> dict[str, str]:
        return {}

    def version(self) -> str:
        raise NotImplementedError

    def init(self, repo: Path) -> list[str]:
        raise NotImplementedError

    def backup(self, repo: Path, image: Path, n: int) -> list[str]:
        raise NotImplementedError

    def restore(self, repo: Path, image: Path, n: int, out: Path) -> tuple[list[str], bool]:
        """The command that restores backup n of image into out, and whether it writes
        the image to its standard output (redirected to out) rather than itself."""
        raise NotImplementedError

    def extract(self, repo: Path, image: Path, n: int, path: str, to: Path) -> float:
        """Bring the file at path in backup n back into the directory to, and return the
        peak RSS in MiB of the restore command.  A peer's only way: restore the whole
        image, mount it read-only on a loop device, copy the file, unmount."""
        whole = to / "whole.img"
        argv, stdout = self.restore(repo, image, n, whole)
        mnt = to / "mnt"
        try:
            peak = run(argv, self.env(repo), whole if stdout else None)
            mnt.mkdir()
            subprocess.run(["mount", "-o", "ro,loop", str(whole), str(mnt)], check=True)
            try:
                shutil.copyfile(mnt / path.lstrip("/"), to / Path(path).name)
            finally:
                subprocess.run(["umount", str(mnt)], check=False)
        finally:
            whole.unlink(missing_ok=True)
        fsync(to / Path(path).name)
        return peak


class Blocksnap(Peer):
    name = "blocksnap"
    program = sys.executable
    settings = "64 KiB blocks, zstd 1, no encryption"
    last = 1  # the newest backup the tests make: full 0, incremental 1 ("latest")

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "blocksnap", *args]

    def version(self) -> str:
        return f"blocksnap {blocksnap.__version__}"

    def init(self, repo: Path) -> list[str]:
        return self._cli("init", str(repo))

    def backup(self, repo: Path, image: Path, n: int) -> list[str]:
        return self._cli("snapshot", str(repo), "vol", str(image))

    def restore(self, repo: Path, image: Path, n: int, out: Path) -> tuple[list[str], bool]:
        return self._cli("restore", str(repo), "vol", f"latest~{self.last - n}", str(out)), False

    def extract(self, repo: Path, image: Path, n: int, path: str, to: Path) -> float:
        snapshot = f"latest~{self.last - n}"
        return run(self._cli("extract", str(repo), "vol", snapshot, path, "--to", str(to)), {})


class Borg(Peer):
    program = "borg"

    def __init__(self, chunker: str | None, name: str, settings: str) -> None:
        self.chunker, self.name = chunker, name
        self.settings = f"{settings}, zstd 1, no encryption"

    def env(self, repo: Path) -> dict[str, str]:
        # Its cache and keys live beside the repository, so no round sees another's.
        return {
            "BORG_BASE_DIR": str(repo.parent / f"{repo.name}.borg-home"),
            "BORG_PASSPHRASE": "",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }

    def version(self) -> str:
        return _output(["borg", "--version"])

    def init(self, repo: Path) -> list[str]:
        return ["borg", "init", "-e", "none", str(repo)]

    def backup(self, repo: Path, image: Path, n: int) -> list[str]:
        chunker = ["--chunker-params", self.chunker] if self.chunker else []
        return ["borg", "create", "--compression", "zstd,1", *chunker, f"{repo}::v{n}", str(image)]

    def restore(self, repo: Path, image: Path, n: int, out: Path) -> tuple[list[str], bool]:
        return ["borg", "extract", "--stdout", f"{repo}::v{n}"], True


class Restic(Peer):
    name = "restic"
    program = "restic"
    settings = "content-defined chunks (about 1 MiB), compression auto, AES-256 always on"

    def env(self, repo: Path) -> dict[str, str]:
        return {
            "RESTIC_PASSWORD": "benchmark",
            "RESTIC_CACHE_DIR": str(repo.parent / f"{repo.name}.restic-cache"),
        }

    def version(self) -> str:
        return _output(["restic", "version"]).split(" compiled")[0]

    def init(self, repo: Path) -> list[str]:
        return ["restic", "-q", "-r", str(repo), "init"]

    def backup(self, repo: Path, image: Path, n: int) -> list[str]:
        return ["restic", "-q", "-r", str(repo), "backup", "--tag", f"v{n}", str(image)]

    def restore(self, repo: Path, image: Path, n: int, out: Path) -> tuple[list[str], bool]:
        argv = ["restic", "-q", "-r", str(repo), "dump", "--tag", f"v{n}", "latest", str(image)]
        return argv, True


class Casync(Peer):
    name = "casync"
    program = "casync"
    settings = "64 KiB average chunks, zstd, no encryption"

    def version(self) -> str:
        return _output(["casync", "--version"])

    def init(self, repo: Path) -> list[str]:
        return ["mkdir", "-p", str(repo / "store")]

    def backup(self, repo: Path, image: Path, n: int) -> list[str]:
        index = str(repo / f"v{n}.caibx")
        return [
            "casync",
            "make",
            f"--store={repo / 'store'}",
            "--compression=zstd",
            index,
            str(image),
        ]

    def restore(self, repo: Path, image: Path, n: int, out: Path) -> tuple[list[str], bool]:
        store = f"--store={repo / 'store'}"
        return ["casync", "extract", store, str(repo / f"v{n}.caibx"), str(out)], False


PEERS: list[Peer] = [
    Blocksnap(),
    Borg("fixed,65536", "borg-fixed-64K", "fixed 64 KiB chunks"),
    Borg("fixed,4194304", "borg-fixed-4M", "fixed 4 MiB chunks"),
    Borg(None, "borg-buzhash", "default buzhash chunks (about 2 MiB)"),
    Restic(),
    Casync(),
]


def run(argv: list[str], env: dict[str, str], stdout: Path | None = None) -> float:
    """Run argv to completion and return its peak RSS in MiB (GNU time's %M)."""
    sink = open(stdout if stdout else os.devnull, "wb")  # noqa: SIM115
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss, sink:
        done = subprocess.run(
            [TIME, "-f", "%M", "-o", rss.name, *argv],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.PIPE,
            check=False,
        )
        assert done.returncode == 0, f"{argv}: {done.stderr.decode(errors='replace')}"
        return int(rss.read().split()[-1]) / 1024


def fsync(path: Path) -> None:
    """Wait until path is on disk, as blocksnap's restore and extract do before they end:
    a restore is timed until the bytes are durable, whichever tool wrote them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _output(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def stored_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and not p.is_symlink())


def _warm(image: Path) -> None:
    """Write earlier rounds' output back, then read the image, so every round starts alike."""
    os.sync()
    with open(image, "rb") as f:
        while f.read(16 << 20):
            pass


def _usable(peer: Peer) -> None:
    missing = [p for p in (peer.program, TIME) if not shutil.which(p)]
    if missing:
        pytest.skip(f"{peer.name}: {', '.join(missing)} not installed ({INSTALL})")


def _record(benchmark: Any, peer: Peer, size: int, peaks: list[float]) -> None:
    benchmark.group = "peers"
    benchmark.extra_info.update(
        bytes=size, tool=peer.version(), settings=peer.settings, peak_rss_mib=round(max(peaks), 1)
    )


class Filled:
    """A repository per peer holding a full backup of the image and an incremental of the
    changed copy, made once per module; and the ~1 MiB file the one-file test brings back."""

    def __init__(self, root: Path, image: Path, changed: Path) -> None:
        self.root, self.image, self.changed = root, image, changed
        self.repos: dict[str, Path] = {}
        with blocksnap.Repository.init(root / "probe") as repo:
            repo.snapshot("vol", changed)
            with repo.open_filesystem("vol") as fs:
                best = min(fs.find("blob*.bin", "/data"), key=lambda s: abs(s.size - WANT_SIZE))
        self.path = best.path
        self.reference = root / "reference"
        subprocess.run(
            [DEBUGFS, "-R", f"dump {self.path} {self.reference}", str(changed)],
            check=True,
            capture_output=True,
        )

    def __call__(self, peer: Peer) -> Path:
        if peer.name not in self.repos:
            repo = self.root / peer.name
            run(peer.init(repo), peer.env(repo))
            run(peer.backup(repo, self.image, 0), peer.env(repo))
            run(peer.backup(repo, self.changed, 1), peer.env(repo))
            self.repos[peer.name] = repo
        return self.repos[peer.name]


@pytest.fixture(scope="module")
def filled(bench_images: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Filled:
    return Filled(tmp_path_factory.mktemp("peers"), *bench_images)


def _rounds(
    benchmark: Any,
    tmp_path: Path,
    image: Path,
    run_round: Callable[..., None],
    prepare: Callable[[Path], tuple[Any, ...]] = lambda where: (where,),
    finish: Callable[[Path], None] = lambda where: None,
) -> None:
    """ROUNDS rounds of run_round(*prepare(fresh directory)), each after _warm(image).
    finish(directory) runs after each round, untimed (in the next round's setup, and
    after the last), and then the directory is removed."""
    counter = itertools.count()
    done: list[Path] = []

    def settle() -> None:
        while done:
            where = done.pop()
            finish(where)
            shutil.rmtree(where)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        settle()
        where = tmp_path / f"round{next(counter)}"
        where.mkdir()
        done.append(where)
        args = prepare(where)
        _warm(image)
        return args, {}

    benchmark.pedantic(run_round, setup=setup, rounds=ROUNDS)
    settle()


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_peer_full(
    benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path, peer: Peer
) -> None:
    _usable(peer)
    image, _ = bench_images
    peaks: list[float] = []

    def setup(where: Path) -> tuple[Path]:
        repo = where / "repo"
        run(peer.init(repo), peer.env(repo))
        return (repo,)

    def full(repo: Path) -> None:
        peaks.append(run(peer.backup(repo, image, 0), peer.env(repo)))

    def finish(where: Path) -> None:
        benchmark.extra_info["stored_bytes"] = stored_bytes(where / "repo")

    _rounds(benchmark, tmp_path, image, full, setup, finish)
    _record(benchmark, peer, image.stat().st_size, peaks)


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_peer_incremental(
    benchmark: Any, bench_images: tuple[Path, Path], tmp_path: Path, peer: Peer
) -> None:
    _usable(peer)
    image, changed = bench_images
    peaks: list[float] = []
    before: dict[Path, int] = {}

    def setup(where: Path) -> tuple[Path]:
        repo = where / "repo"
        run(peer.init(repo), peer.env(repo))
        run(peer.backup(repo, image, 0), peer.env(repo))
        before[repo] = stored_bytes(repo)
        return (repo,)

    def incremental(repo: Path) -> None:
        peaks.append(run(peer.backup(repo, changed, 1), peer.env(repo)))

    def finish(where: Path) -> None:
        repo = where / "repo"
        benchmark.extra_info["stored_bytes"] = stored_bytes(repo) - before.pop(repo)

    _rounds(benchmark, tmp_path, changed, incremental, setup, finish)
    _record(benchmark, peer, changed.stat().st_size, peaks)


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_peer_restore(benchmark: Any, filled: Filled, tmp_path: Path, peer: Peer) -> None:
    _usable(peer)
    repo = filled(peer)
    peaks: list[float] = []

    def restore(where: Path) -> None:
        out = where / "restored.img"
        argv, stdout = peer.restore(repo, filled.changed, 1, out)
        peaks.append(run(argv, peer.env(repo), out if stdout else None))
        fsync(out)

    def finish(where: Path) -> None:
        out = where / "restored.img"
        assert filecmp.cmp(out, filled.changed, shallow=False), f"{peer.name} restored {out}"

    _rounds(benchmark, tmp_path, filled.changed, restore, finish=finish)
    _record(benchmark, peer, filled.changed.stat().st_size, peaks)


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_peer_one_file(benchmark: Any, filled: Filled, tmp_path: Path, peer: Peer) -> None:
    _usable(peer)
    if not isinstance(peer, Blocksnap) and os.geteuid() != 0:
        pytest.skip(f"{peer.name} brings one file back by mounting the image: needs root")
    repo = filled(peer)
    peaks: list[float] = []
    name = Path(filled.path).name

    def one_file(where: Path) -> None:
        peaks.append(peer.extract(repo, filled.changed, 1, filled.path, where))

    def finish(where: Path) -> None:
        got = where / name
        assert filecmp.cmp(got, filled.reference, shallow=False), f"{peer.name}: {got}"

    _rounds(benchmark, tmp_path, filled.changed, one_file, finish=finish)
    _record(benchmark, peer, filled.reference.stat().st_size, peaks)
