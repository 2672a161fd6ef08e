"""The repository on disk: a read-only filesystem, racing inits, injected backends."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.store.backend import Capabilities
from blocksnap.store.locks import LocalLocks, LocalSessions
from blocksnap.store.objectlocks import ObjectLocks, ObjectSessions
from blocksnap.store.repository import Store, local_backend
from tests.conftest import debugfs, run_cli
from tests.faults import FaultyBackend


@pytest.fixture
def read_only_repo(tmp_path: Path, ext4_image: Path) -> Iterator[tuple[Path, Path, str]]:
    """(repository on a read-only ext4 loop mount, image of its latest snapshot, the
    latest snapshot's /docs/note0.txt as cat printed it while the mount was writable)."""
    medium = tmp_path / "medium.img"
    with open(medium, "wb") as f:
        f.truncate(160 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(medium)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(medium), str(mnt)]).returncode != 0:
        pytest.skip("cannot loop-mount here (needs root)")
    try:
        repo = mnt / "repo"
        run_cli("init", str(repo), check=True)
        run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
        debugfs(ext4_image, "rm /docs/note3.txt", "mkdir /new")
        run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
        note = run_cli("cat", str(repo), "vol", "latest", "/docs/note0.txt", check=True).stdout
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["mount", "-o", "loop,ro", str(medium), str(mnt)], check=True)
    try:
        yield repo, ext4_image, note
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_repository_read_only_filesystem_serves_every_read(
    read_only_repo: tuple[Path, Path, str], tmp_path: Path
) -> None:
    repo, image, note = read_only_repo
    r = str(repo)
    for args in (
        ["list", r],
        ["list", r, "vol"],
        ["info", r, "vol", "latest~1"],
        ["ls", r, "vol", "latest", "/"],
        ["diff", r, "vol", "latest~1", "latest"],
        ["stats", r],
        ["verify", r],
        ["prune", r, "vol", "--keep-last", "1", "--dry-run"],
        ["policy", r, "vol"],
    ):
        run_cli(*args, check=True)
    assert run_cli("cat", r, "vol", "latest", "/docs/note0.txt", check=True).stdout == note
    assert "new/" in run_cli("ls", r, "vol", "latest", "/", check=True).stdout
    report = run_cli("verify", r, "--read-data", check=True).stdout
    assert report.rstrip().endswith("ok")
    run_cli("restore", r, "vol", "latest", str(tmp_path / "restored.img"), check=True)
    assert (tmp_path / "restored.img").read_bytes() == image.read_bytes()
    with blocksnap.Repository(repo) as opened:
        assert len(opened.snapshots("vol")) == 2
        assert opened.verify(read_data=True).ok


def test_repository_read_only_filesystem_refuses_writes_in_one_line(
    read_only_repo: tuple[Path, Path, str],
) -> None:
    repo, image, _note = read_only_repo
    r = str(repo)
    for args in (
        ["snapshot", r, "vol", str(image)],
        ["synthesize", r, "vol"],
        ["prune", r, "vol", "--keep-last", "1"],
        ["gc", r],
        ["repair", r, "--rebuild-index"],
        ["protect", r, "vol", "latest"],
        ["policy", r, "vol", "--keep-last", "3"],
    ):
        proc = run_cli(*args)
        assert proc.returncode == blocksnap.StoreError.exit_code, (args, proc)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "read-only filesystem" in proc.stderr, (args, proc.stderr)


def test_repository_racing_inits_have_one_winner(tmp_path: Path) -> None:
    """Eight processes init one path at once: one wins, each other one says why in one
    line and changes nothing, and the repository the winner made is whole."""
    for round_ in range(3):
        path = tmp_path / f"repo{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "blocksnap", "init", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        results = [
            (proc.wait(timeout=120), proc.stderr.read() if proc.stderr else "") for proc in procs
        ]
        assert [rc for rc, _ in results].count(0) == 1, results
        for rc, err in results:
            if rc != 0:
                assert rc in (blocksnap.UsageError.exit_code, blocksnap.LockedError.exit_code), err
                assert err.count("\n") == 1, err
        assert run_cli("verify", str(path)).returncode == 0
        with blocksnap.Repository(path) as repo:
            assert repo.volumes() == []


class _Remote(FaultyBackend):
    """The local backend, declared as not local (as an object store would be)."""

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.inner.capabilities, local=False)


def test_repository_backend_not_local_gets_locks_and_sessions_on_the_objects(
    repo: blocksnap.Repository,
) -> None:
    """flock and host-local writer sessions mean nothing to other hosts sharing an
    object store: a backend that declares itself not local gets the locks and sessions
    kept as objects in it (store/objectlocks.py), and injected locks without their
    sessions are refused instead of silently racing."""
    with Store(repo.path, backend=_Remote(local_backend(repo.path))) as store:
        assert isinstance(store.locks, ObjectLocks)
        assert isinstance(store.sessions, ObjectSessions)
        with store.register() as registration:  # a session object while it runs
            assert store.sessions.alive(registration.id)
            assert store.backend.stat(f"sessions/{registration.id.hex()}").size > 0
        assert not store.sessions.alive(registration.id)
    with pytest.raises(blocksnap.UsageError, match="go together"):
        Store(repo.path, backend=_Remote(local_backend(repo.path)), locks=LocalLocks(repo.path))
    remote = _Remote(local_backend(repo.path))
    with Store(
        repo.path, backend=remote, locks=LocalLocks(repo.path), sessions=LocalSessions(repo.path)
    ) as store:
        assert store.backend is remote and store.volumes() == []
