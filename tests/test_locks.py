"""Locks and writer sessions: the local flock implementation of their protocols."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blocksnap.errors import LockedError
from blocksnap.store.locks import REPOSITORY_LOCK, LocalLocks, LocalSessions


@pytest.fixture
def root(tmp_path: Path) -> str:
    (tmp_path / "locks").mkdir()
    return str(tmp_path)


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [(False, False, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_locks_shared_and_exclusive(root: str, first: bool, second: bool, conflict: bool) -> None:
    with LocalLocks(root).hold(REPOSITORY_LOCK, busy="one", shared=first):
        other = LocalLocks(root).hold(REPOSITORY_LOCK, busy="held elsewhere", shared=second)
        if conflict:
            with pytest.raises(LockedError, match=r"^held elsewhere$"), other:
                pass
        else:
            with other:
                pass
    with LocalLocks(root).hold(REPOSITORY_LOCK, busy="free again"):
        pass


def test_locks_named_locks_are_independent(root: str) -> None:
    locks = LocalLocks(root)
    with locks.hold("volume-ab12", busy="a"), locks.hold("gc", busy="b"):
        with pytest.raises(LockedError, match="a"), locks.hold("volume-ab12", busy="a"):
            pass
        assert os.path.exists(os.path.join(root, "locks", "volume-ab12.lock"))


def test_locks_read_only_shared_lock_needs_no_file(tmp_path: Path) -> None:
    with LocalLocks(str(tmp_path), read_only=True).hold(REPOSITORY_LOCK, busy="x", shared=True):
        assert not (tmp_path / "lock").exists()  # nothing created on a read-only filesystem


KILLED_SESSION = """
import os, signal, sys
from blocksnap.store.locks import LocalSessions
session = LocalSessions(sys.argv[1]).start()
print(session.id.hex(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sessions_alive_until_ended_or_killed(root: str) -> None:
    sessions = LocalSessions(root)
    mine = sessions.start()
    assert sessions.alive(mine.id)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SESSION, root], capture_output=True, text=True
    )
    killed = bytes.fromhex(proc.stdout.strip())
    assert not sessions.alive(killed)  # its lock file is there, and nobody holds it
    assert sessions.sweep(lambda session_id: session_id == killed) == 0  # registered: kept
    assert sessions.sweep(lambda session_id: False) == 1  # orphan: removed; mine is held
    assert not os.path.exists(os.path.join(root, "locks", f"writer-{killed.hex()}.lock"))
    assert sessions.alive(mine.id)
    mine.end()
    mine.end()
    assert not sessions.alive(mine.id)
