"""gc on a repository that several hosts write at once (store/collection.py), on SeaweedFS.

Each host is a cache directory of its own.  The cases that would lose data without the
two phases: a writer on another host that refers to blocks while a prune makes them
garbage, and one that starts after gc published them as candidates.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from blocksnap.errors import StoreError
from blocksnap.model import Progress, SnapshotInfo
from blocksnap.store import collection
from blocksnap.store.backend import ObjectInfo
from blocksnap.store.entries import Location
from blocksnap.store.location import S3Options
from blocksnap.store.objectlocks import ObjectSession, ObjectSessions
from blocksnap.store.s3 import S3Backend
from tests.conftest import debugfs
from tests.s3server import S3_BUCKET, S3Server, SnapshotThread, assert_restores, use_server


@pytest.fixture
def hosts(
    s3_server: S3Server, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, S3Options, S3Options]]:
    use_server(monkeypatch, s3_server, BLOCKSNAP_SESSION_TTL="4")
    url = f"s3://{S3_BUCKET}/{s3_prefix}"
    yield url, S3Options(cache_dir=str(tmp_path / "a")), S3Options(cache_dir=str(tmp_path / "b"))


def _two_versions(repo: blocksnap.Repository, image: Path, tmp_path: Path) -> bytes:
    """vol1: a first snapshot of image with a 6 MiB file only it holds, then one without;
    returns the first version's bytes."""
    unique = tmp_path / "unique.bin"
    unique.write_bytes(os.urandom(6 << 20))
    debugfs(image, f"write {unique} unique.bin")
    first = image.read_bytes()
    repo.snapshot("vol1", image)
    debugfs(image, "rm unique.bin")
    repo.snapshot("vol1", image)
    return first


def _pruned_version(
    url: str, options: S3Options, image: Path, tmp_path: Path
) -> tuple[bytes, bytes, Location, Path]:
    """A new repository with _two_versions of image in vol1, the first pruned: (its
    bytes, its map root, where the root is, an image file of it)."""
    with blocksnap.Repository.init(url, s3=options) as repo:
        first = _two_versions(repo, image, tmp_path)
        pruned_root = repo.resolve("vol1", "latest~1").map_root
        old_copy = repo.store.index.location(pruned_root)
        assert old_copy is not None
        repo.prune("vol1", blocksnap.Policy(keep_last=1))
    image_x = tmp_path / "x.img"
    image_x.write_bytes(first)
    return first, pruned_root, old_copy, image_x


def test_gc_waits_for_a_writer_of_another_host_that_refers_to_pruned_blocks(
    hosts: tuple[str, S3Options, S3Options], ext4_image: Path, tmp_path: Path
) -> None:
    url, a, b = hosts
    with blocksnap.Repository.init(url, s3=a) as repo:
        first = _two_versions(repo, ext4_image, tmp_path)
    image_x = tmp_path / "x.img"
    image_x.write_bytes(first)

    # Host B snapshots the first version's content into vol2, deduplicating against vol1's
    # first snapshot, and pauses just before it commits.
    host_b = SnapshotThread(url, b, "vol2", image_x, pause_at="packs-written")
    host_b.start()
    try:
        assert host_b.paused.wait(120)
        # Host A prunes the snapshot B took its blocks from, and collects: the blocks are
        # candidates, and B's session is waited for.
        with blocksnap.Repository(url, s3=a) as repo:
            pruned = repo.prune("vol1", blocksnap.Policy(keep_last=1))
            assert len(pruned.removed) == 1
            waiting = repo.gc()
            assert waiting.problems == []
            assert waiting.waiting_writers >= 1 and waiting.lists_published >= 1
            assert waiting.objects_deleted == 0 and waiting.packs_deleted == 0
    finally:
        snap = host_b.result()
    assert snap.counts.stored < snap.counts.changed // 4  # it did refer to vol1's blocks
    with blocksnap.Repository(url, s3=a) as repo:
        done = repo.gc()  # B has ended: the list is carried out, B's snapshot counted
        assert done.problems == [] and done.waiting_writers == 0
    for options, name in ((a, "a.img"), (b, "b.img")):
        assert_restores(url, options, snap, first, tmp_path / name)


def test_a_writer_that_starts_after_the_list_stores_candidates_again(
    hosts: tuple[str, S3Options, S3Options], ext4_image: Path, tmp_path: Path, s3_server: S3Server
) -> None:
    url, a, b = hosts
    first, pruned_root, old_copy, image_x = _pruned_version(url, a, ext4_image, tmp_path)
    # A writer on a third host is running (its session alive): gc publishes and waits.
    other = ObjectSessions(s3_server.backend(url.split("/", 3)[3]), ttl=4.0, host="c")
    running: ObjectSession = other.start()
    try:
        with blocksnap.Repository(url, s3=a) as repo:
            first_gc = repo.gc()
            assert first_gc.waiting_writers == 1 and first_gc.objects_deleted == 0
        backend = s3_server.backend(url.split("/", 3)[3])
        waited_seq = collection.listed_seqs(backend)[-1]
        waiting = collection.read(backend, waited_seq)
        assert waiting is not None and waiting.state == collection.ARMED
        # Host B starts now: the candidates (the pruned snapshot's map root, which B's
        # identical image has too) are absent to it, so it stores its own copy.
        with blocksnap.Repository(url, s3=b) as repo:
            assert repo.store.avoid == {pruned_root}
            snap = repo.snapshot("vol2", image_x)
            assert snap.map_root == pruned_root
            new_copy = repo.store.index.location(pruned_root)
            assert new_copy is not None and new_copy.pack != old_copy.pack
    finally:
        running.end()
        other.close()
    with blocksnap.Repository(url, s3=a) as repo:
        report = repo.gc()
        assert report.problems == [] and report.waiting_writers == 0
    waited = collection.read(backend, waited_seq)  # the list carried out now
    assert waited is not None and waited.state == collection.DONE
    for options, name in ((a, "a.img"), (b, "b.img")):
        assert_restores(url, options, snap, first, tmp_path / name)
    # Both caches agree with a cache built from the bucket alone.
    fresh = S3Options(cache_dir=str(tmp_path / "fresh"))
    assert_restores(url, fresh, snap, first, tmp_path / "fresh.img")


def test_a_writer_whose_session_lapsed_does_not_commit(
    hosts: tuple[str, S3Options, S3Options],
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, a, _b = hosts
    with blocksnap.Repository.init(url, s3=a) as repo:
        kept = repo.snapshot("vol", ext4_image)
        with monkeypatch.context() as patched, pytest.raises(StoreError, match="session lapsed"):
            patched.setattr(ObjectSession, "valid", lambda self: False)
            repo.snapshot("vol", ext4_image, full=True)
        assert [s.id for s in repo.snapshots("vol")] == [kept.id]
    assert_restores(url, a, kept, ext4_image.read_bytes(), tmp_path / "kept.img")


def test_steady_state_gc_never_lists_the_packs(
    hosts: tuple[str, S3Options, S3Options],
    ext4_image: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host B's snapshots reach host A's cache through the packs their records name, so
    neither A's open nor its gc lists packs/: the cost follows what changed."""
    url, a, b = hosts
    with blocksnap.Repository.init(url, s3=a) as repo:
        _two_versions(repo, ext4_image, tmp_path)
    other = tmp_path / "other.img"
    other.write_bytes(ext4_image.read_bytes())
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(3 << 20))
    debugfs(other, f"write {new} new.bin")
    with blocksnap.Repository(url, s3=b) as repo:
        theirs = repo.snapshot("vol2", other)
    listed: list[str] = []
    original = S3Backend.list

    def spy(self: S3Backend, prefix: str) -> Iterator[ObjectInfo]:
        listed.append(prefix)
        return original(self, prefix)

    monkeypatch.setattr(S3Backend, "list", spy)
    with blocksnap.Repository(url, s3=a) as repo:
        assert repo.sync_problems == []
        assert theirs.id in {s.id for s in repo.snapshots("vol2")}
        repo.prune("vol1", blocksnap.Policy(keep_last=1))
        report = repo.gc()
        assert report.problems == [] and report.objects_deleted > 0
    assert "packs/" not in listed, listed
    assert_restores(url, a, theirs, other.read_bytes(), tmp_path / "theirs.img")


def test_two_hosts_storing_the_same_blocks_at_once_then_each_collecting(
    hosts: tuple[str, S3Options, S3Options], ext4_image: Path, tmp_path: Path
) -> None:
    """Two hosts snapshot the same image at the same moment, so every block has two
    copies, and each cache calls the other's packs dead weight.  gc on one deletes the
    other's packs and relocates; the other cache then moves its places (and their live
    bytes) and must not take the surviving packs for empty in its own gc."""
    url, a, b = hosts
    with blocksnap.Repository.init(url, s3=a):
        pass
    image = ext4_image.read_bytes()
    # Host B's image: the same with its first block zeroed, so that its map differs (its
    # packs are indexed by A) while every block it stores is one A stores too.
    image_b = tmp_path / "b.img"
    image_b.write_bytes(bytes(65536) + image[65536:])
    images = {"vol-a": (ext4_image, image), "vol-b": (image_b, image_b.read_bytes())}
    barrier = threading.Barrier(2)

    def pause(p: Progress) -> None:
        if p.phase == "packs-written":
            barrier.wait(120)  # neither commits before both stored everything

    threads = [
        SnapshotThread(url, options, volume, images[volume][0], progress=pause)
        for options, volume in ((a, "vol-a"), (b, "vol-b"))
    ]
    for t in threads:
        t.start()
    snaps = {t.volume: t.result() for t in threads}
    assert all(s.counts.stored > 0 for s in snaps.values())  # both stored their copies
    deleted = 0
    for options in (a, b, a, b):  # each collects twice, taking turns
        with blocksnap.Repository(url, s3=options) as repo:
            report = repo.gc()
            assert report.problems == [], report.problems
            deleted += report.packs_deleted
    assert deleted > 0  # the duplicate packs went
    fresh = S3Options(cache_dir=str(tmp_path / "fresh"))
    for options, name in ((a, "a"), (b, "b"), (fresh, "fresh")):
        for volume, snap in snaps.items():
            at = tmp_path / f"{name}-{volume}.img"
            assert_restores(url, options, snap, images[volume][1], at)


def test_a_cache_that_follows_another_hosts_gc_keeps_exact_counts(
    hosts: tuple[str, S3Options, S3Options], ext4_image: Path, tmp_path: Path
) -> None:
    """Host B indexed host A's snapshots; A prunes and collects two whole trees: vol1's
    first snapshot shares most of its map and packs with the second, vol2's first shares
    nothing, so its packs go too.  B, following the lists, releases what every map node
    it forgets named, read from the list's gc/<seq>.nodes when the node's pack is gone:
    its counts stay exact (verify recounts them), and its own gc has nothing to do."""
    url, a, b = hosts
    noise = tmp_path / "noise.img"
    with blocksnap.Repository.init(url, s3=a) as repo:
        _two_versions(repo, ext4_image, tmp_path)
        for _ in range(2):
            noise.write_bytes(os.urandom(8 << 20))
            repo.snapshot("vol2", noise)
    with blocksnap.Repository(url, s3=b) as repo:
        assert len(repo.snapshots("vol1")) == len(repo.snapshots("vol2")) == 2
        assert repo.verify().ok
    with blocksnap.Repository(url, s3=a) as repo:
        for volume in ("vol1", "vol2"):
            repo.prune(volume, blocksnap.Policy(keep_last=1))
        report = repo.gc()
        assert report.problems == [] and report.objects_deleted > 0
        assert report.packs_deleted >= 2  # vol2's first snapshot's block and node packs
    backend = S3Backend(S3_BUCKET, url.split("/", 3)[3])
    assert [o for o in backend.list(collection.PREFIX) if o.name.endswith(".nodes")]
    with blocksnap.Repository(url, s3=b) as repo:
        checked = repo.verify()
        assert checked.ok, checked.problems
        again = repo.gc()
        assert again.problems == [] and again.objects_deleted == 0, again
        latest = {v: repo.snapshots(v)[0] for v in ("vol1", "vol2")}
    assert_restores(url, b, latest["vol2"], noise.read_bytes(), tmp_path / "b2.img")
    assert_restores(url, b, latest["vol1"], ext4_image.read_bytes(), tmp_path / "b1.img")


def test_a_cache_built_afresh_never_places_an_object_in_a_copy_gc_collected(
    hosts: tuple[str, S3Options, S3Options], ext4_image: Path, tmp_path: Path
) -> None:
    """A region's blocks are collected in a pack that lives on (it holds the volume's
    other blocks), then stored again in a new pack.  A cache rebuilt from the bucket, or built
    by syncing, indexes both packs in an order of its own: it must place the blocks in
    the new pack (the old copies are named collected), or following the list would take
    their place away.  Three volumes, for three independent pack orders."""
    url, a, _b = hosts
    snaps: dict[str, tuple[SnapshotInfo, bytes]] = {}
    region = slice(4 << 20, 6 << 20)
    with blocksnap.Repository.init(url, s3=a) as repo:
        for i in range(3):
            volume, image = f"vol{i}", tmp_path / f"vol{i}.img"
            data = bytearray(os.urandom(8 << 20))
            unique = data[region]
            image.write_bytes(data)
            repo.snapshot(volume, image)  # one pack: every block, the region's too
            data[region] = os.urandom(2 << 20)
            image.write_bytes(data)
            repo.snapshot(volume, image)
            repo.prune(volume, blocksnap.Policy(keep_last=1))
            report = repo.gc()
            assert report.problems == [] and report.objects_deleted >= 32
            data[region] = unique
            image.write_bytes(data)
            snap = repo.snapshot(volume, image)
            assert snap.counts.stored >= 32  # the region's first blocks, stored again
            snaps[volume] = (snap, bytes(data))
    backend = S3Backend(S3_BUCKET, url.split("/", 3)[3])
    lists = [collection.read(backend, seq) for seq in collection.listed_seqs(backend)]
    collected = {c for lst in lists if lst is not None for c in lst.collected}
    rebuilt = S3Options(cache_dir=str(tmp_path / "rebuilt"))
    blocksnap.repair_index(url, s3=rebuilt)
    for options in (rebuilt, S3Options(cache_dir=str(tmp_path / "synced"))):
        with blocksnap.Repository(url, s3=options) as repo:
            index = repo.store.index
            ids = [object_id for object_id, _ in collected]
            placed = {
                (object_id, loc.pack)
                for object_id, loc in zip(ids, index.locations(ids), strict=True)
                if loc is not None
            }
            assert not placed & collected, "an object is placed in a copy gc collected"
        for volume, (snap, expected) in snaps.items():
            assert_restores(url, options, snap, expected, tmp_path / f"{volume}.out")


@pytest.mark.parametrize("executor", ["publisher", "rebuilt"])
def test_a_cache_rebuilt_while_a_list_is_under_way_and_another_host_writes(
    hosts: tuple[str, S3Options, S3Options],
    ext4_image: Path,
    tmp_path: Path,
    s3_server: S3Server,
    executor: str,
) -> None:
    """Host C rebuilds its cache while a list is under way and host B has stored a
    candidate (a pruned map root) again and not committed yet.  C indexes both copies:
    it must place the root in B's new one (the list condemns the old), and keep B's
    objects although no snapshot counts them yet, or its gc would take B's pack for
    empty and delete it under B's commit.  The list is carried out by the host that
    published it, or by C, which must not collect the root from B's copy."""
    url, a, b = hosts
    c = S3Options(cache_dir=str(tmp_path / "c"))
    first, pruned_root, old_copy, image_x = _pruned_version(url, a, ext4_image, tmp_path)
    backend = s3_server.backend(url.split("/", 3)[3])
    other = ObjectSessions(backend, ttl=4.0, host="d")
    running: ObjectSession = other.start()
    host_b = SnapshotThread(url, b, "vol2", image_x, pause_at="packs-written")
    try:
        with blocksnap.Repository(url, s3=a) as repo:
            assert repo.gc().waiting_writers == 1
        lst = collection.read(backend, collection.listed_seqs(backend)[-1])
        assert lst is not None and (pruned_root, old_copy.pack) in lst.condemned
        host_b.start()
        assert host_b.paused.wait(120)
        blocksnap.repair_index(url, s3=c)
        with blocksnap.Repository(url, s3=c) as repo:
            new_copy = repo.store.index.location(pruned_root)
            assert new_copy is not None and new_copy.pack != old_copy.pack
        running.end()
        with blocksnap.Repository(url, s3=a if executor == "publisher" else c) as repo:
            done = repo.gc()  # the list is carried out
            assert done.problems == [], done
        lst = collection.read(backend, lst.seq)
        assert lst is not None and lst.state == collection.DONE
        assert (pruned_root, new_copy.pack) not in lst.collected
        if executor == "publisher":
            assert (pruned_root, old_copy.pack) in lst.collected
        with blocksnap.Repository(url, s3=c) as repo:
            # C follows it and collects on its own: B's objects wait for B.
            report = repo.gc()
            assert report.waiting_writers >= 1 and report.packs_deleted == 0, report
            placed = repo.store.index.location(pruned_root)
            assert placed is not None and placed.pack == new_copy.pack
    finally:
        snap = host_b.result()
        running.end()
        other.close()
    for options, name in ((c, "c.img"), (a, "a.img"), (b, "b.img")):
        assert_restores(url, options, snap, first, tmp_path / name)


def test_a_follow_from_an_older_read_keeps_the_candidates_a_newer_one_saw(
    hosts: tuple[str, S3Options, S3Options],
) -> None:
    """Several threads share one Store: a sync that read the lists before a list was
    published must not take its candidates out of avoid once a later follow put them in
    (a writer that started after the list would refer to them unwaited)."""
    url, a, _b = hosts
    with blocksnap.Repository.init(url, s3=a):
        pass
    with blocksnap.Repository(url, s3=a) as repo:
        store = repo.store
        stale = store._unapplied_lists()  # read before the list exists
        candidate = os.urandom(32)
        lst = collection.CollectionList(seq=1, candidates=[candidate])
        collection.publish(store.backend, lst)
        store.follow_collections()
        assert candidate in store.avoid
        store.follow_collections(stale)
        assert candidate in store.avoid
        lst.state = collection.DONE
        collection.advance(store.backend, lst)
        store.follow_collections()
        assert store.avoid == frozenset()


def test_the_seq_applied_never_passes_a_list_a_listing_missed(
    hosts: tuple[str, S3Options, S3Options],
) -> None:
    """A paged listing can miss a list that lands between its pages (a late one, just
    before a fence): the cache applies what it found but keeps the seq it follows from
    below the gap, so that the missing list is read when it shows."""
    url, a, _b = hosts
    with blocksnap.Repository.init(url, s3=a):
        pass
    with blocksnap.Repository(url, s3=a) as repo:
        store = repo.store
        first, late, fence = (
            collection.CollectionList(seq=n, state=collection.DONE) for n in (1, 2, 3)
        )
        late.collected = [(os.urandom(32), os.urandom(16))]
        for lst in (first, fence):
            collection.publish(store.backend, lst)
        store.follow_collections()
        assert store.index.collections_applied() == 1
        collection.publish(store.backend, late)
        store.follow_collections()
        assert store.index.collections_applied() == 3


def test_a_cache_of_the_format_before_is_rebuilt(
    hosts: tuple[str, S3Options, S3Options], tmp_path: Path
) -> None:
    """A cache of index format 3 lacks the spares every cache of a shared store must
    have alike: it is rebuilt from the bucket as it is opened, with the same snapshots."""
    from blocksnap.store.index import Index

    url, a, _b = hosts
    image = tmp_path / "vol.img"
    image.write_bytes(os.urandom(2 << 20))
    with blocksnap.Repository.init(url, s3=a) as repo:
        snap = repo.snapshot("vol", image)
        cache = Path(repo.store.path) / "index"
    old = Index(str(cache))

    def outdate(txn: Any) -> None:
        txn.put(b"format", b"3", db=old.meta)
        txn.put(b"left by the old index", b"", db=old.meta)

    old._write("test", outdate)
    old.close()
    with blocksnap.Repository(url, s3=a) as repo:
        index = repo.store.index
        assert index.format() == b"4"
        with index._begin() as txn:  # a new index, not the old one upgraded
            assert txn.get(b"left by the old index", db=index.meta) is None
        assert [s.id for s in repo.snapshots("vol")] == [snap.id]
    assert_restores(url, a, snap, image.read_bytes(), tmp_path / "out.img")
