"""The public Python API: a Repository with snapshot, list, restore, prune, gc, verify, stats."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blocksnap import blockid, blockmap
from blocksnap.blockmap import BlockMap
from blocksnap.errors import BlocksnapError, NotFoundError, ProtectedError, UsageError
from blocksnap.model import BlockSource, Checkpoint, ProgressCallback, SnapshotDiff, SnapshotInfo
from blocksnap.reader import DEFAULT_CACHE_SIZE, ImageReader
from blocksnap.restore import RestoreResult, restore_image
from blocksnap.retention import Decision, Policy, decide
from blocksnap.snapshot import CHECKPOINT_SIZE, check_labels, take_snapshot
from blocksnap.source import SourceArg
from blocksnap.store import index as index_module
from blocksnap.store import location, nodecache, sync
from blocksnap.store.backend import ObjectStore
from blocksnap.store.config import (
    CONFIG_NAME,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_PACK_TARGET_SIZE,
    RepositoryConfig,
)
from blocksnap.store.gc import DEFAULT_COMPACT_BELOW, GcReport, collect_garbage
from blocksnap.store.init import init_repository, probe_create_if_absent
from blocksnap.store.location import S3Options
from blocksnap.store.locks import Locks, WriterSessions
from blocksnap.store.rebuild import RebuildReport, index_missing, rebuild_index
from blocksnap.store.repository import Store
from blocksnap.store.verify import VerifyReport, verify
from blocksnap.synthesize import synthesize

if TYPE_CHECKING:
    from blocksnap.fs import FileSystem, Partition
    from blocksnap.history import Version


@dataclass(frozen=True, slots=True)
class RepositoryStats:
    volumes: int
    snapshots: int
    objects: int
    packs: int
    stored_size: int  # bytes of packs in storage
    logical_size: int  # sum of the image sizes of every snapshot

    @property
    def ratio(self) -> float:
        """Logical bytes per stored byte: what dedup, zero elision and compression gave."""
        return self.logical_size / self.stored_size if self.stored_size else 0.0


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What prune decided for every snapshot it looked at, and what it removed."""

    decisions: dict[str, list[Decision]]  # volume -> decisions, newest first
    policies: dict[str, Policy]  # volume -> the policy applied
    removed: list[str]  # snapshot ids
    skipped: list[str]  # volumes with no policy given or saved
    dry_run: bool


class Repository:
    """An open blocksnap repository.  Use as a context manager, or call close()."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        backend: ObjectStore | None = None,
        locks: Locks | None = None,
        sessions: WriterSessions | None = None,
        s3: S3Options | None = None,
    ) -> None:
        """Open the repository at path, a directory or s3://BUCKET/PREFIX (store/location.py:
        s3 says how to reach the bucket and where this host's cache is).  backend: where
        its objects are, when not in the directory itself (path then holds the index and
        host-local state); wrappers such as RetryingBackend go here too.  locks and
        sessions: as for Store."""
        name = os.fspath(path)
        self.url: str | None = None
        if location.is_url(name):
            if backend is not None:
                raise UsageError("an s3:// repository brings its own backend")
            self.url = name
            name, backend = _s3_cache(name, s3 or S3Options())
        self.path = name
        shared = backend is not None and not backend.capabilities.local
        if index_missing(self.path, objects_elsewhere=backend is not None) or (
            shared and index_module.outdated(os.path.join(self.path, "index"))
        ):
            # The index is a cache of the objects: one that is gone, or a shared store's
            # of the format before, is rebuilt from them.
            rebuild_index(self.path, backend=backend, locks=locks, sessions=sessions)
        limit = s3.cache_limit if s3 is not None else None
        self._store = Store(
            self.path,
            backend=backend,
            locks=locks,
            sessions=sessions,
            node_cache_limit=nodecache.DEFAULT_LIMIT if limit is None else limit,
        )
        # What writers elsewhere committed or removed without caching it (they died, or
        # their index step failed) is what every command then sees.  A sync that fails
        # (storage unreachable, the index damaged) leaves the cache as it was: reading
        # commands answer from it, and writers, which sync again, report the failure.
        self.sync_problems: list[str] = []
        if not self._store.read_only:
            try:
                self.sync_problems = self._store.sync_catalog().problems
            except BlocksnapError as exc:
                self.sync_problems = [f"the index could not be brought up to date: {exc}"]
            except BaseException:
                self._store.close()
                raise

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        block_id: str = blockid.DEFAULT_ALGORITHM,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        pack_target_size: int = DEFAULT_PACK_TARGET_SIZE,
        backend: ObjectStore | None = None,
        locks: Locks | None = None,
        sessions: WriterSessions | None = None,
        s3: S3Options | None = None,
    ) -> Repository:
        """Create a repository at path and open it (backend, locks, sessions and s3: as
        for Repository())."""
        init_location(
            path,
            block_id=block_id,
            compression_level=compression_level,
            pack_target_size=pack_target_size,
            backend=backend,
            s3=s3,
        )
        return cls(path, backend=backend, locks=locks, sessions=sessions, s3=s3)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> Store:
        """The underlying store: a BlockSource for readers, and the index."""
        return self._store

    def snapshot(
        self,
        volume: str,
        source: SourceArg,
        *,
        full: bool = False,
        differential: bool = False,
        block_size: int | None = None,
        labels: dict[str, str] | None = None,
        progress: ProgressCallback | None = None,
        taken_at: datetime.datetime | None = None,
        changed_extents: Iterable[tuple[int, int]] | None = None,
        resume: bool = False,
        checkpoint_size: int = CHECKPOINT_SIZE,
        allow_future_time: bool = False,
        source_id: str | None = None,
    ) -> SnapshotInfo:
        """Snapshot a file, block device or readable binary file object into volume.

        Incremental against the latest snapshot by default; differential against the
        latest full or synthetic full; full against nothing.  changed_extents are the
        (offset, length) byte ranges that may differ from the snapshot compared with:
        only those are read.  A run commits a checkpoint every checkpoint_size bytes;
        resume=True continues an interrupted run from its checkpoint.  taken_at records
        another time than now (importing older images); one more than CLOCK_SKEW ahead of
        this host's clock is refused unless allow_future_time.  source_id names the medium
        (e.g. an LVM snapshot's UUID) where the source itself cannot show a resume that it
        is the same one: a stream, or a block device without a kernel diskseq.
        """
        return take_snapshot(
            self._store,
            volume,
            source,
            full=full,
            differential=differential,
            block_size=block_size,
            labels=labels,
            progress=progress,
            taken_at=taken_at,
            changed_extents=changed_extents,
            resume=resume,
            checkpoint_size=checkpoint_size,
            allow_future_time=allow_future_time,
            source_id=source_id,
        )

    def checkpoint(self, volume: str) -> Checkpoint | None:
        """The checkpoint of the volume's interrupted snapshot run, if one is waiting."""
        return self._store.checkpoint(volume)

    def synthesize(
        self,
        volume: str,
        snapshot: str = "latest",
        *,
        labels: dict[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> SnapshotInfo:
        """Make a synthetic full of a snapshot from the repository alone (no source read)."""
        checked_labels = check_labels(labels)
        store = self._store
        with store.lock_volume(volume), store.writer() as writer:
            # Registered first: the source's map and blocks then outlive a concurrent prune.
            source = store.resolve(volume, snapshot)
            info = synthesize(
                source, store, store.index.first_missing, labels=checked_labels, progress=progress
            )
            store.commit_snapshot(info, writer)
            return info

    def diff(self, volume: str, a: str, b: str) -> SnapshotDiff:
        """The block ranges that differ between two snapshots, from their maps alone."""
        info_a, info_b = self.resolve(volume, a), self.resolve(volume, b)
        return SnapshotDiff(
            a=info_a.id,
            b=info_b.id,
            block_size=info_b.block_size,
            image_size=max(info_a.image_size, info_b.image_size),
            ranges=tuple(self._changed_blocks(info_a, info_b)),
        )

    def volumes(self) -> list[str]:
        return self._store.volumes()

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first (empty for an unknown volume)."""
        return self._store.snapshots(volume)

    def resolve(self, volume: str, snapshot: str) -> SnapshotInfo:
        """A snapshot by id, unique prefix, "latest" or "latest~N"."""
        return self._store.resolve(volume, snapshot)

    def open_image(
        self, volume: str, snapshot: str = "latest", cache_size: int = DEFAULT_CACHE_SIZE
    ) -> ImageReader:
        """A lazy, seekable, read-only file object over the snapshot's image."""
        return ImageReader(self._store, self.resolve(volume, snapshot), cache_size)

    # --- files inside snapshots --------------------------------------------------------

    def open_filesystem(
        self,
        volume: str,
        snapshot: str | SnapshotInfo = "latest",
        *,
        partition: int | str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> FileSystem:
        """The filesystem inside a snapshot, read lazily: only the blocks that the files
        and metadata asked for live in are fetched (see FileSystem.stats).

        `partition` chooses where on a disk: a partition number (from 1) or an LVM logical
        volume as "VG/LV"; it is needed only when the disk holds several filesystems."""
        info = snapshot if isinstance(snapshot, SnapshotInfo) else self.resolve(volume, snapshot)
        return self._open_filesystem(info, partition, cache_size)

    def _open_filesystem(
        self,
        info: SnapshotInfo,
        partition: int | str | None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        touched: set[int] | None = None,
    ) -> FileSystem:
        """The same, for a resolved snapshot; `touched` collects the image blocks read."""
        from blocksnap.fs.probe import open_filesystem  # loads the filesystem libraries

        reader = ImageReader(self._store, info, cache_size, touched)
        try:
            return open_filesystem(reader, partition)
        except BaseException:
            reader.close()
            raise

    def partitions(
        self, volume: str, snapshot: str = "latest"
    ) -> list[tuple[Partition, str | None]]:
        """The snapshot image's partitions and LVM logical volumes, each with the filesystem
        found on it (or None)."""
        from blocksnap.fs.probe import list_partitions

        with self.open_image(volume, snapshot) as reader:
            return list_partitions(reader)

    def versions(
        self, volume: str, path: str, *, partition: int | str | None = None
    ) -> list[Version]:
        """Which of the volume's snapshots hold `path`, and where its content changed."""
        from blocksnap.history import versions

        self._require_volume(volume)
        return versions(
            self.snapshots(volume),
            path,
            lambda info, touched: self._open_filesystem(info, partition, touched=touched),
            self._changed_blocks,
        )

    def _changed_blocks(self, a: SnapshotInfo, b: SnapshotInfo) -> list[tuple[int, int]]:
        maps = [
            BlockMap(self._store.read_node, i.map_root, i.map_height, i.block_count) for i in (a, b)
        ]
        return blockmap.diff(maps[0], maps[1])

    def restore(
        self,
        volume: str,
        snapshot: str,
        target: str | os.PathLike[str],
        *,
        only_changed: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreResult:
        info = self.resolve(volume, snapshot)
        source: BlockSource = self._store
        if not self._store.keeps_map(info.block_count):
            source = _NodesNotKept(self._store)
        return restore_image(
            source,
            info,
            os.fspath(target),
            filter_seed=self._store.config.filter_seed,
            only_changed=only_changed,
            progress=progress,
        )

    def verify(
        self, *, read_data: bool = False, progress: ProgressCallback | None = None
    ) -> VerifyReport:
        return verify(self._store, read_data=read_data, progress=progress)

    # --- retention ---------------------------------------------------------------------

    def _require_volume(self, volume: str) -> None:
        if self._store.index.volume(volume) is None:
            raise NotFoundError(f"volume {volume!r} does not exist")

    def policy(self, volume: str) -> Policy | None:
        """The volume's saved retention policy, if any."""
        saved = self._store.policy(volume)
        return None if saved is None else Policy.from_dict(saved)

    def set_policy(self, volume: str, policy: Policy | None) -> None:
        """Save the policy prune applies to the volume when given none (None clears it)."""
        self._require_volume(volume)
        if policy is not None and policy.empty:
            raise UsageError("refusing to save an empty policy: it would remove every snapshot")
        self._store.save_policy(volume, None if policy is None else policy.to_dict())

    def protect(self, volume: str, snapshot: str, protected: bool = True) -> SnapshotInfo:
        """Protect a snapshot from every prune (or, with protected=False, lift that)."""
        info = self.resolve(volume, snapshot)
        self._store.set_protected(info.id, protected)
        return info

    def protected(self) -> set[str]:
        """The ids of every protected snapshot."""
        return self._store.protected()

    def prune(
        self, volume: str | None = None, policy: Policy | None = None, *, dry_run: bool = False
    ) -> PruneReport:
        """Remove the snapshots a policy does not keep, per volume.

        With no policy, each volume's saved policy applies and volumes without one are
        skipped.  Blocks are freed by gc, not here.
        """
        if volume is not None:
            self._require_volume(volume)
        volumes = [volume] if volume is not None else self.volumes()
        if policy is not None and policy.empty:
            raise UsageError("the retention policy is empty: give at least one --keep rule")
        chosen: dict[str, Policy] = {}
        skipped = []
        for name in volumes:
            found = policy or self.policy(name)
            if found is None:
                skipped.append(name)
            else:
                chosen[name] = found
        if not chosen and volumes:
            raise UsageError("no retention policy given and none saved for these volumes")
        decisions: dict[str, list[Decision]] = {}
        removed: list[str] = []
        with contextlib.ExitStack() as stack:
            if not dry_run:
                stack.enter_context(self._store.lock_prune())
                self._store.sync_catalog()  # decide on what the objects say
            protected = self._store.protected()
            registration = None if dry_run else stack.enter_context(self._store.register())
            for name, rules in chosen.items():
                found_decisions = decide(self._store.snapshots(name), rules, protected)
                if registration is not None:
                    for i, d in enumerate(found_decisions):
                        if d.keep:
                            continue
                        try:
                            if self._store.remove_snapshot(d.snapshot, registration):
                                removed.append(d.snapshot.id)
                        except ProtectedError:  # protected after the decision was made
                            found_decisions[i] = Decision(d.snapshot, ("protected",))
                decisions[name] = found_decisions
        return PruneReport(decisions, chosen, removed, skipped, dry_run)

    def gc(
        self,
        *,
        compact_below: float = DEFAULT_COMPACT_BELOW,
        full: bool = False,
        progress: ProgressCallback | None = None,
    ) -> GcReport:
        """Free the space of objects no snapshot refers to; safe while others work.
        full: reconcile with a listing of the whole store too, reclaiming what writers
        that never came back left (packs no snapshot uses, unfinished uploads)."""
        return collect_garbage(
            self._store, compact_below=compact_below, full=full, progress=progress
        )

    def stats(self) -> RepositoryStats:
        volumes = self._store.volumes()
        snapshots = [s for v in volumes for s in self._store.snapshots(v)]
        packs = list(self._store.backend.list("packs/"))
        return RepositoryStats(
            volumes=len(volumes),
            snapshots=len(snapshots),
            objects=self._store.index.object_count(),
            packs=len(packs),
            stored_size=sum(p.size for p in packs),
            logical_size=sum(s.image_size for s in snapshots),
        )


class _OwningImageReader(ImageReader):
    """An ImageReader that closes the repository it opened when it is closed."""

    def __init__(self, repo: Repository, info: SnapshotInfo, cache_size: int) -> None:
        super().__init__(repo.store, info, cache_size)
        self._repo = repo

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._repo.close()


def open_image(
    repository: str | os.PathLike[str],
    volume: str,
    snapshot: str = "latest",
    *,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> ImageReader:
    """Open a snapshot's image for reading; closing the reader closes the repository."""
    repo = Repository(repository)
    try:
        return _OwningImageReader(repo, repo.resolve(volume, snapshot), cache_size)
    except BaseException:
        repo.close()
        raise


class _NodesNotKept:
    """A store's blocks and nodes for a restore whose map is too large for the node
    cache (store/nodecache.py): read in order, it would only evict what is there."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def read_block(self, block_id: bytes) -> bytes:
        return self._store.read_block(block_id)

    def read_blocks(self, block_ids: Sequence[bytes]) -> list[bytes]:
        return self._store.read_blocks(block_ids)

    def read_node(self, node_id: bytes) -> bytes:
        return self._store.read_node(node_id, keep=False)


def repair_index(
    repository: str | os.PathLike[str],
    progress: ProgressCallback | None = None,
    *,
    s3: S3Options | None = None,
) -> RebuildReport:
    """Rebuild the index from packs and snapshot objects (needs the repository to itself;
    for an s3:// one, this host's cache of it)."""
    name = os.fspath(repository)
    if location.is_url(name):
        path, backend = _s3_cache(name, s3 or S3Options())
        return rebuild_index(path, progress, backend=backend)
    return rebuild_index(name, progress)


def init_location(
    path: str | os.PathLike[str],
    *,
    block_id: str = blockid.DEFAULT_ALGORITHM,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    pack_target_size: int = DEFAULT_PACK_TARGET_SIZE,
    backend: ObjectStore | None = None,
    s3: S3Options | None = None,
) -> RepositoryConfig:
    """Create an empty repository at path, a directory or s3://BUCKET/PREFIX.  On S3 the
    bucket's create-if-absent is probed first (store/init.py): many hosts write one
    repository only where it holds."""
    name = os.fspath(path)
    if not location.is_url(name):
        return init_repository(
            name,
            block_id=block_id,
            compression_level=compression_level,
            pack_target_size=pack_target_size,
            backend=backend,
        )
    options = s3 or S3Options()
    where = location.parse(name)
    objects = location.s3_backend(where, options)
    try:
        if sync.exists(objects, CONFIG_NAME):
            raise UsageError(f"{name} holds a repository already")
        probe_create_if_absent(objects, name)
        cache = location.cache_path(where, options)
        location.discard_cache(cache)  # a cache of nothing: no repository was there
        config = init_repository(
            cache,
            block_id=block_id,
            compression_level=compression_level,
            pack_target_size=pack_target_size,
            backend=objects,
        )
        location.prepare_cache(cache, objects, name)
        return config
    finally:
        objects.close()


def _s3_cache(url: str, options: S3Options) -> tuple[str, ObjectStore]:
    """This host's cache directory for the repository at url, ready, and its backend."""
    where = location.parse(url)
    objects = location.s3_backend(where, options)
    try:
        cache = location.cache_path(where, options)
        location.prepare_cache(cache, objects, url)
    except BaseException:
        objects.close()
        raise
    return cache, objects
