"""gc --full on a shared repository (store/collection.py): what a host that never came
back left is reclaimed, and what a live host is still writing is not, on SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.model import SnapshotInfo
from blocksnap.store import catalog, collection
from blocksnap.store.location import S3Options
from blocksnap.store.packs import pack_name
from blocksnap.store.s3 import S3Backend
from tests.conftest import debugfs
from tests.s3server import S3_BUCKET, S3Server, SnapshotThread, assert_restores, use_server

ROOT = Path(__file__).resolve().parent.parent

# Host B: a snapshot of vol2 that stores its packs, starts one more upload (as a second
# pack under way would be), and is killed before it commits.
_DIES_BEFORE_COMMIT = """
import os, signal, sys
import blocksnap
from blocksnap.store.location import S3Options
from blocksnap.store.packs import pack_name
from blocksnap.store.s3 import S3Backend

url, cache, image = sys.argv[1:]
bucket, prefix = url[len("s3://"):].split("/", 1)

def die(p):
    if p.phase == "packs-written":
        S3Backend(bucket, prefix).create(pack_name(os.urandom(16))).write(b"x" * 4096)
        os.kill(os.getpid(), signal.SIGKILL)

with blocksnap.Repository(url, s3=S3Options(cache_dir=cache)) as repo:
    repo.snapshot("vol2", image, progress=die)
"""


@pytest.fixture
def setup(
    s3_server: S3Server,
    s3_prefix: str,
    tmp_path: Path,
    ext4_image: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, S3Backend, S3Options, S3Options, SnapshotInfo, Path]:
    """A repository with host A's snapshot of vol1, and vol2's image for host B: the same
    with 3 MiB of new data."""
    use_server(monkeypatch, s3_server, BLOCKSNAP_SESSION_TTL="4")
    url = f"s3://{S3_BUCKET}/{s3_prefix}"
    a = S3Options(cache_dir=str(tmp_path / "a"))
    b = S3Options(cache_dir=str(tmp_path / "b"))
    with blocksnap.Repository.init(url, s3=a) as repo:
        kept = repo.snapshot("vol1", ext4_image)
    other = tmp_path / "other.img"
    other.write_bytes(ext4_image.read_bytes())
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(3 << 20))
    debugfs(other, f"write {new} new.bin")
    return url, S3Backend(S3_BUCKET, s3_prefix), a, b, kept, other


def _packs(backend: S3Backend) -> set[str]:
    return {o.name for o in backend.list("packs/")}


def test_gc_full_reclaims_what_a_host_that_never_came_back_left(
    setup: tuple[str, S3Backend, S3Options, S3Options, SnapshotInfo, Path],
    ext4_image: Path,
    tmp_path: Path,
) -> None:
    url, backend, a, b, kept, other = setup
    before = _packs(backend)
    died = subprocess.run(
        [sys.executable, "-c", _DIES_BEFORE_COMMIT, url, b.cache_dir or "", str(other)],
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert died.returncode == -9, died.stderr.decode()
    left = _packs(backend) - before
    assert left, "host B stored no pack before it died"
    assert backend.leftovers() != []

    with blocksnap.Repository(url, s3=a) as repo:
        assert [s.id for s in repo.snapshots("vol1")] == [kept.id]
        assert "vol2" not in repo.volumes()
        steady = repo.gc()  # never lists packs/: what B left stays
        assert steady.problems == [] and steady.orphan_packs == 0
        assert _packs(backend) >= left
        # A damaged policy names no packs: it is reported, and holds nothing back.
        policy = catalog.policy_name("ghost")
        backend.put(policy, b"not a policy")
        report = repo.gc(full=True)
        # B's session may look alive for up to its ttl after the kill: the list waits,
        # and a later gc (this one plain) carries it out.
        for _ in range(3):
            if report.waiting_writers == 0:
                break
            time.sleep(2.5)
            report = repo.gc()
        assert [p for p in report.problems if "policy" not in p] == [], report.problems
        assert report.orphan_packs == len(left), report
        assert report.unfinished_discarded == 1
        backend.delete(policy)
    assert _packs(backend) == before
    assert backend.leftovers() == []
    # The list that made the orphans' records candidates names them deleted itself: no
    # other list comes between, in which a cache would no longer avoid them.
    lists = [collection.read(backend, seq) for seq in collection.listed_seqs(backend)]
    (named,) = [lst for lst in lists if lst is not None and lst.orphans]
    assert named.state == collection.DONE
    assert {pack_name(p) for p in named.deleted_packs} >= left
    assert {pack_name(p) for p in named.orphans} == left
    assert {pack_name(p) for _, p in named.collected} >= left
    with blocksnap.Repository(url, s3=a) as repo:
        again = repo.gc(full=True)
        assert again.problems == [] and again.orphan_packs == 0 and again.packs_deleted == 0

    # Host B comes back: its cache forgets what went, and its snapshot of vol2 works.
    with blocksnap.Repository(url, s3=b) as repo:
        assert repo.sync_problems == []
        theirs = repo.snapshot("vol2", other)
        assert theirs.counts.stored > 0
    fresh = S3Options(cache_dir=str(tmp_path / "fresh"))
    for options, name in ((a, "a"), (b, "b"), (fresh, "fresh")):
        assert_restores(url, options, theirs, other.read_bytes(), tmp_path / f"{name}-2.img")
        assert_restores(url, options, kept, ext4_image.read_bytes(), tmp_path / f"{name}-1.img")


def test_gc_full_waits_for_a_host_still_writing(
    setup: tuple[str, S3Backend, S3Options, S3Options, SnapshotInfo, Path],
    tmp_path: Path,
) -> None:
    """Host B's packs are stored and its snapshot not yet committed: to host A they look
    like orphans, and deleting them would lose B's snapshot."""
    url, backend, a, b, _kept, other = setup
    before = _packs(backend)
    host_b = SnapshotThread(url, b, "vol2", other, pause_at="packs-written")
    host_b.start()
    try:
        assert host_b.paused.wait(120)
        stored = _packs(backend) - before
        assert stored
        with blocksnap.Repository(url, s3=a) as repo:
            waiting = repo.gc(full=True)
            assert waiting.problems == [] and waiting.waiting_writers >= 1
            assert waiting.lists_published >= 1 and waiting.packs_deleted == 0
        assert _packs(backend) >= stored
    finally:
        snap = host_b.result()
    with blocksnap.Repository(url, s3=a) as repo:
        done = repo.gc(full=True)  # B has ended: its packs are a snapshot's now
        assert done.problems == [] and done.waiting_writers == 0
        assert done.orphan_packs == 0
    assert _packs(backend) >= stored
    fresh = S3Options(cache_dir=str(tmp_path / "fresh"))
    for options, name in ((a, "a"), (b, "b"), (fresh, "fresh")):
        assert_restores(url, options, snap, other.read_bytes(), tmp_path / f"{name}.img")
