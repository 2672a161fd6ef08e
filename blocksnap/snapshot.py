"""Taking snapshots: read a volume once, store what changed, commit a complete block map.

The pipeline: the calling thread reads the source in buffers of whole blocks; a pool of
worker threads scans each buffer natively (zero flags, XXH3-128 compared with the parent's
digests), strong-hashes only the blocks that changed, asks the index which of those are
new, and has the store writer seal (compress) just those; the calling thread takes
results in order, hands the sealed records to the writer and builds the new map's
leaves.  Every stage that does real work releases the GIL, so reading, hashing and
compressing overlap on all cores, and at most a few buffers are in flight, so memory does
not grow with the image.  The workers' scan and the map writer are in scanner.py, the
source and its identity in source.py; here are the run that drives them, its resume and
checkpoints, and the commit.
"""

from __future__ import annotations

import datetime
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, fields

from blocksnap.blockmap import LEAF_SPAN, ZERO_ID, BlockMap
from blocksnap.errors import Interrupted, UsageError
from blocksnap.extents import DataRuns, hint_runs, runs_fingerprint
from blocksnap.model import (
    BLOCK_ID_SIZE,
    CLOCK_SKEW,
    DEFAULT_BLOCK_SIZE,
    FILTER_DIGEST_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    Checkpoint,
    Progress,
    ProgressCallback,
    ProgressUnit,
    SnapshotCounts,
    SnapshotInfo,
    SnapshotKind,
)
from blocksnap.scanner import READ_PART, MapWriter, Scanned, Scanner
from blocksnap.source import Source, SourceArg
from blocksnap.store.repository import Store
from blocksnap.store.writer import StoreWriter
from blocksnap.workers import worker_pool

# Memory: at most WINDOW_PER_WORKER * workers + 1 buffers of BUFFER_SIZE are filled or in
# flight, each with its sealed (compressed) new blocks, so 2 cores hold about 10 MiB of
# image and as much of packs-to-be (a buffer holds one block at least: 4 MiB blocks take
# 4 MiB buffers).  Larger buffers or a deeper window measured no faster.
BUFFER_SIZE = 2 << 20
WINDOW_PER_WORKER = 2
CHECKPOINT_SIZE = 2 << 30  # bytes of the volume between checkpoints, by default
RESUME_SAMPLE_COUNT = 30  # checkpointed blocks read again to check a resume's source
MAX_VOLUME_NAME_SIZE = 200


def _describe_ahead(ahead: datetime.timedelta) -> str:
    if ahead.days:
        return f"{ahead.days} days"
    return f"{ahead.seconds // 3600} h {ahead.seconds // 60 % 60} min"


def check_volume_name(name: str) -> None:
    try:
        encoded = name.encode()
    except UnicodeEncodeError:
        raise UsageError(f"volume name {name!r} is not valid UTF-8") from None
    if not name or len(encoded) > MAX_VOLUME_NAME_SIZE:
        raise UsageError(f"volume name must be 1 to {MAX_VOLUME_NAME_SIZE} bytes")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise UsageError("volume name must not contain control characters")


def check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Labels as a dict, refusing empty keys, keys with "=" and values that are not text."""
    out = dict(labels or {})
    for key, value in out.items():
        if not key or "=" in key or not isinstance(value, str):
            raise UsageError(f"invalid label {key!r}")
        try:
            key.encode()
            value.encode()
        except UnicodeEncodeError:
            raise UsageError(f"label {key!r} is not valid UTF-8") from None
    return out


def check_block_size(block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(
            f"block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} "
            f"to {MAX_BLOCK_SIZE}"
        )


def take_snapshot(
    store: Store,
    volume: str,
    source: SourceArg,
    *,
    full: bool = False,
    differential: bool = False,
    block_size: int | None = None,
    labels: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    taken_at: datetime.datetime | None = None,
    changed_extents: Iterable[tuple[int, int]] | None = None,
    resume: bool = False,
    checkpoint_size: int = CHECKPOINT_SIZE,
    allow_future_time: bool = False,
    source_id: str | None = None,
) -> SnapshotInfo:
    """Snapshot source into volume.

    The default is incremental against the volume's latest snapshot; differential compares
    with its latest full or synthetic full instead (and is a full when it has none); full
    compares with nothing.  taken_at overrides the recorded time (when importing older
    images); it must carry a time zone, and a time more than model.CLOCK_SKEW ahead of
    this host's clock is refused unless allow_future_time (prune keeps such a snapshot
    outside its rules until its time comes, so it cannot push real restore points out).

    changed_extents: (offset, length) byte ranges outside which the source is known to
    equal the snapshot it is compared with; only blocks they touch are read (all of them
    when there is nothing to compare with).  Holes of a sparse file are never read.

    Every checkpoint_size bytes of the volume, what is done so far is committed as the
    volume's checkpoint; resume=True continues from it (same source, size, block size,
    kind and extents), neither reading nor storing again what it covers.  Without a
    checkpoint, resume=True starts from the beginning.  A resume must find the same
    medium: a regular file by its inode and ctime, a block device by its diskseq, anything
    else (a stream, a device without diskseq) only by a source_id the caller gives both
    runs; and a sample of the checkpointed blocks is read again and compared.
    """
    check_volume_name(volume)
    if full and differential:
        raise UsageError("a snapshot cannot be both full and differential")
    if full and changed_extents is not None:
        raise UsageError("a full snapshot reads everything; changed extents need a parent")
    if taken_at is not None and taken_at.tzinfo is None:
        raise UsageError("the snapshot time must include a time zone (or Z for UTC)")
    if taken_at is not None and not allow_future_time:
        ahead = taken_at - datetime.datetime.now(datetime.UTC)
        if ahead > CLOCK_SKEW:
            raise UsageError(
                f"the snapshot time {taken_at.isoformat()} is {_describe_ahead(ahead)} ahead of "
                "this host's clock; pass --allow-future-time (allow_future_time=True) to "
                "record it anyway"
            )
    if checkpoint_size <= 0:
        raise UsageError("the checkpoint interval must be positive")
    labels = check_labels(labels)
    mode = "full" if full else "differential" if differential else "incremental"
    with store.lock_volume(volume):
        fixed = store.volume_block_size(volume)
        if fixed is not None and block_size is not None and block_size != fixed:
            raise UsageError(f"volume {volume!r} has block size {fixed}, not {block_size}")
        bs = fixed or block_size or DEFAULT_BLOCK_SIZE
        check_block_size(bs)
        src = Source(source, source_id)
        run: _Run | None = None
        try:
            hints = None
            if (changed_extents is not None or resume) and src.size is None:
                what = "changed extents" if changed_extents is not None else "--resume"
                raise UsageError(f"{what} need a source of known size, not a pipe")
            if changed_extents is not None:
                assert src.size is not None
                hints = hint_runs(changed_extents, src.size, bs)
            with store.writer() as writer:
                # The parent is chosen after registering: from then on gc keeps its map and
                # blocks even if it is pruned meanwhile, so unchanged entries stay valid.
                run = _Run(store, writer, volume, src, bs, mode, hints, checkpoint_size)
                if resume and (ck := store.checkpoint(volume)) is not None:
                    run.resume_from(ck)
                else:
                    parent, kind = _parent(store, volume, full, differential)
                    run.start(parent, kind, taken_at)
                run.labels = {**run.labels, **labels}
                return run.execute(progress, workers)
        except KeyboardInterrupt:
            done = 0 if run is None else run.checkpointed
            if done:
                raise Interrupted(
                    f"snapshot interrupted; the first {done * bs} bytes are checkpointed: "
                    "run it again with --resume to go on from there"
                ) from None
            raise Interrupted("snapshot interrupted; nothing was committed") from None
        finally:
            src.close()


def _parent(
    store: Store, volume: str, full: bool, differential: bool
) -> tuple[SnapshotInfo | None, SnapshotKind]:
    """The snapshot to compare with, and the kind the new snapshot will be."""
    if full:
        return None, SnapshotKind.FULL
    snapshots = store.snapshots(volume)  # one consistent view, whatever prune does meanwhile
    if not differential:
        if snapshots:
            return snapshots[-1], SnapshotKind.INCREMENTAL
        return None, SnapshotKind.FULL
    for info in reversed(snapshots):
        if info.kind.is_base:
            return info, SnapshotKind.DIFFERENTIAL
    return None, SnapshotKind.FULL


@dataclass(slots=True)
class _Item:
    """One step of the run, consumed in block order: a buffer being scanned, or a run of
    blocks taken from the parent, the checkpoint or a hole."""

    kind: int
    first: int
    end: int
    future: Future[Scanned] | None = None
    buf: bytearray | None = None


_READ, _ZERO, _PARENT, _RESUMED = range(4)


class _Run:
    """One snapshot run: what it compares with, where it starts, and the pipeline."""

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        volume: str,
        src: Source,
        bs: int,
        mode: str,
        hints: list[tuple[int, int]] | None,
        checkpoint_size: int,
    ) -> None:
        self.store = store
        self.writer = writer
        self.volume = volume
        self.src = src
        self.bs = bs
        self.mode = mode
        self.hints = hints
        self.checkpoint_size = checkpoint_size
        self.block_count = None if src.size is None else -(-src.size // bs)
        # A pipe's size is unknown: its nodes are kept, as a small image's would be.
        writer.keep_nodes = self.block_count is None or store.keeps_map(self.block_count)
        self.parent_id: str | None = None
        self.parent_map: BlockMap | None = None
        self.parent_size = 0
        self.kind = SnapshotKind.FULL
        self.time = ""
        self.labels: dict[str, str] = {}
        self.counts = {f.name: 0 for f in fields(SnapshotCounts)}
        self.ranges: list[tuple[int, int]] = []  # a differential's changed block runs
        self.resumed: Checkpoint | None = None
        self.resume_map: BlockMap | None = None
        self.checkpointed = 0  # blocks covered by this run's last checkpoint
        self.map_writer = MapWriter(writer, store)
        self._clock = time.perf_counter()

    def _open_parent(self, root: bytes, height: int, image_size: int) -> None:
        count = -(-image_size // self.bs)
        keep = self.store.keeps_map(count)  # a map too large for the node cache stays out
        self.parent_map = BlockMap(
            lambda node_id: self.store.read_node(node_id, keep=keep), root, height, count
        )
        self.parent_size = image_size

    def start(
        self,
        parent: SnapshotInfo | None,
        kind: SnapshotKind,
        taken_at: datetime.datetime | None,
    ) -> None:
        started = taken_at.timestamp() if taken_at is not None else time.time()
        self.time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
        self.kind = kind
        if parent is not None:
            self.parent_id = parent.id
            self._open_parent(parent.map_root, parent.map_height, parent.image_size)

    def resume_from(self, ck: Checkpoint) -> None:
        """Continue an interrupted run; UsageError when this one is not the same run."""

        def refuse(why: str) -> UsageError:
            return UsageError(
                f"cannot resume the interrupted snapshot of {self.volume}: {why}; "
                "run without --resume to start over"
            )

        if ck.mode != self.mode:
            raise refuse(f"it was {ck.mode}, this one is {self.mode}")
        if ck.block_size != self.bs or ck.image_size != self.src.size:
            raise refuse(f"it read {ck.image_size} bytes, the source has {self.src.size}")
        if not self.src.identified:
            raise refuse(
                f"nothing shows that {self.src.name} is the medium it read (a stream, or a "
                "block device whose kernel gives no diskseq); give both runs the same "
                "--source-id naming the medium (e.g. the LVM snapshot's UUID)"
            )
        if ck.source != self.src.identity:
            raise refuse(f"{self.src.name} is not the source it read (or has changed since)")
        if ck.hints != runs_fingerprint(self.hints):
            raise refuse("the changed extents are not the ones it was given")
        resume_map = BlockMap(self.store.read_node, ck.map_root, ck.map_height, ck.block_count)
        if (block := self._first_mismatch(resume_map, ck.block_count)) is not None:
            raise refuse(
                f"block {block} of {self.src.name} differs from what it read there, so the "
                "source changed or is another one"
            )
        self.resumed = ck
        self.kind = ck.kind
        self.time = ck.time
        self.labels = dict(ck.labels)
        self.parent_id = ck.parent
        if ck.parent_map is not None:
            self._open_parent(*ck.parent_map)
        self.resume_map = resume_map
        self.counts.update(asdict(ck.counts))
        self.counts["resumed"] = ck.block_count
        self.checkpointed = ck.block_count  # still committed, should this run stop too
        self.ranges = [(first, count) for first, count in ck.changed_ranges]

    def _first_mismatch(self, done: BlockMap, block_count: int) -> int | None:
        """The first of a sample of the checkpointed blocks (its first and last, and up to
        RESUME_SAMPLE_COUNT more spread over it) whose content the source no longer has."""
        whole = min(block_count, (self.src.size or 0) // self.bs)  # a short last block aside
        if whole == 0:
            return None
        rng = random.Random(done.root)
        sample = {0, whole - 1, *(rng.randrange(whole) for _ in range(RESUME_SAMPLE_COUNT))}
        for block in sorted(sample):
            data = self.src.read_at(block * self.bs, self.bs)
            _, want = done.entry(block)
            got = ZERO_ID if data == bytes(len(data)) else self.store.hash(data)
            if len(data) != self.bs or got != want:
                return block
        return None

    # --- what to read --------------------------------------------------------------------

    def _hinted(self, block_count: int) -> list[tuple[int, int]] | None:
        """The runs to look at, None for all: the hints, plus whatever the parent's map
        cannot supply because the image changed size."""
        if self.hints is None or self.parent_map is None:
            return None
        assert self.src.size is not None
        if self.src.size == self.parent_size:
            reuse_end = block_count
        else:
            reuse_end = min(self.parent_size, self.src.size) // self.bs
        # Hints below reuse_end, clipped, then one run for everything past it: disjoint.
        runs = [(first, min(end, reuse_end)) for first, end in self.hints if first < reuse_end]
        if reuse_end < block_count:
            runs.append((reuse_end, block_count))
        return runs

    def plan(self) -> Iterator[tuple[int, int, int | None]]:
        """(kind, first block, end block) steps covering the volume in order; the end is
        None for a stream of unknown size (read to its end)."""
        if self.block_count is None:
            yield (_READ, 0, None)
            return
        total = self.block_count
        start = 0
        if self.resumed is not None:
            start = self.resumed.block_count
            if start:
                yield (_RESUMED, 0, start)
        data = None
        if self.src.fd is not None and self.src.regular and self.src.size:
            data = DataRuns(self.src.fd, self.src.size, self.bs)

        def by_data(first: int, end: int) -> Iterator[tuple[int, int, int | None]]:
            if data is None:
                yield (_READ, first, end)
                return
            for a, b, has_data in data.split(first, end):
                yield (_READ if has_data else _ZERO, a, b)

        hinted = self._hinted(total)
        if hinted is None:
            yield from by_data(start, total)
            return
        pos = start
        for first, end in hinted:
            if end <= pos:
                continue
            first = max(first, pos)
            if first > pos:
                yield (_PARENT, pos, first)
            yield from by_data(first, end)
            pos = end
        if pos < total:
            yield (_PARENT, pos, total)

    # --- the pipeline --------------------------------------------------------------------

    def _changed(self, block: int) -> None:
        self.counts["changed"] += 1
        if self.kind is SnapshotKind.DIFFERENTIAL:
            r = self.ranges
            if r and r[-1][0] + r[-1][1] == block:
                r[-1] = (r[-1][0], r[-1][1] + 1)
            else:
                r.append((block, 1))

    def _zeros(self, first: int, end: int) -> None:
        """A hole: zero entries, changed where the parent had data."""
        pos = first
        while pos < end:
            stop = min(end, (pos // LEAF_SPAN + 1) * LEAF_SPAN)
            n = stop - pos
            if self.parent_map is not None:
                _, ids = self.parent_map.entries(pos, n)
                if ids.count(0) != len(ids):
                    for i in range(n):
                        if ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE] != ZERO_ID:
                            self._changed(pos + i)
            self.counts["zero"] += n
            self.map_writer.extend(bytes(n * FILTER_DIGEST_SIZE), bytes(n * BLOCK_ID_SIZE))
            pos = stop

    def _consume(self, item: _Item, free: list[bytearray], report: ProgressCallback) -> None:
        """Put one step's entries in the map, in block order; checkpoint when it is time."""
        total = self.block_count or 0
        if item.kind == _READ:
            assert item.future is not None and item.buf is not None
            res = item.future.result()
            free.append(item.buf)
            self.counts["read"] += res.count
            self.counts["zero"] += res.zero
            for i in res.changed:
                self._changed(item.first + i)
            self.counts["hashed"] += res.hashed
            for sealed in res.new:
                if self.writer.add(sealed, checked=True):
                    self.counts["stored"] += 1
            self.map_writer.extend(res.digests, res.ids)
        elif item.kind == _ZERO:
            self._zeros(item.first, item.end)
        elif item.kind == _PARENT:
            assert self.parent_map is not None
            self.map_writer.copy(self.parent_map, item.end, total)
        else:
            assert self.resume_map is not None
            self.map_writer.copy(self.resume_map, item.end, total)
        done = self.map_writer.block_count
        if (done - self.checkpointed) * self.bs >= self.checkpoint_size and done < total:
            self._checkpoint(done)
        size = self.src.size
        done_size = done * self.bs if size is None else min(done * self.bs, size)
        report(Progress("read", done_size, size or 0, ProgressUnit.BYTES))

    def _checkpoint(self, done: int) -> None:
        """Commit the map of blocks 0..done as the volume's checkpoint."""
        root, height = self.map_writer.close_copy()
        self.writer.flush()
        assert self.src.size is not None
        parent_map = None
        if self.parent_map is not None:
            parent_map = (self.parent_map.root, self.parent_map.height, self.parent_size)
        self.store.save_checkpoint(
            Checkpoint(
                volume=self.volume,
                mode=self.mode,
                kind=self.kind,
                parent=self.parent_id,
                parent_map=parent_map,
                block_size=self.bs,
                image_size=self.src.size,
                source=self.src.identity,
                hints=runs_fingerprint(self.hints),
                block_count=done,
                map_root=root,
                map_height=height,
                counts=SnapshotCounts(**self.counts),
                stored_size=self._stored_size(),
                metadata_size=self._metadata_size(),
                duration=self._duration(),
                time=self.time,
                labels=self.labels,
                changed_ranges=tuple(self.ranges),
            ),
            self.writer,
        )
        self.checkpointed = done

    def _stored_size(self) -> int:
        return self.writer.written_size + (self.resumed.stored_size if self.resumed else 0)

    def _metadata_size(self) -> int:
        prior = self.resumed.metadata_size if self.resumed else 0
        return self.map_writer.metadata_size + prior

    def _duration(self) -> float:
        prior = self.resumed.duration if self.resumed else 0.0
        return time.perf_counter() - self._clock + prior

    def execute(self, progress: ProgressCallback | None, workers: int | None) -> SnapshotInfo:
        self._clock = time.perf_counter()
        src, bs = self.src, self.bs
        scanner = Scanner(self.store, self.writer, bs)
        # Hinted runs read little and compress most of it: smaller steps spread that work
        # over every worker instead of leaving one extent's buffer to a single thread.
        step_size = BUFFER_SIZE if self.hints is None else READ_PART
        buffer_blocks = max(1, step_size // bs)
        workers = workers or os.cpu_count() or 2
        # Steps in flight: enough that one buffer full of changed blocks being compressed
        # does not stall the other workers, few enough that memory stays small and fixed.
        window = WINDOW_PER_WORKER * workers
        report: ProgressCallback = progress or (lambda _p: None)
        size = src.size

        # A path source is read by the workers themselves (pread), so copying from the page
        # cache runs on every core; a stream is read here, in order.  Buffers are recycled:
        # at most window + 1 are in flight and one more is being filled.
        free: list[bytearray] = []
        in_flight: deque[_Item] = deque()
        # On any error the pool cancels what has not started and joins what runs before
        # the buffers, the source and the writer go: workers write into them natively.
        with worker_pool(workers, "blocksnap-scan") as pool:
            for kind, first, end in self.plan():
                if kind != _READ:
                    assert end is not None
                    in_flight.append(_Item(kind, first, end))
                pos = first
                while kind == _READ and (end is None or pos < end):
                    n = buffer_blocks if end is None else min(buffer_blocks, end - pos)
                    offset = pos * bs
                    length = n * bs if size is None else min(n * bs, size - offset)
                    # A short step (a changed extent) gets a buffer its size, not a whole one.
                    buf = free.pop() if free else None
                    if buf is None or len(buf) < length:
                        buf = bytearray(max(length, bs))
                    view = memoryview(buf)[:length]
                    read_at = None
                    if src.fd is not None:
                        read_at = (src.fd, offset, src.name)
                    else:
                        got = src.read_into(view, offset)
                        if not got:
                            free.append(buf)
                            break
                        if got < length:  # the end of a stream of unknown size
                            end = pos + -(-got // bs)
                        view = view[:got]
                        n = -(-got // bs)
                    if self.parent_map is not None:
                        parent_digests, parent_ids = self.parent_map.entries(pos, n)
                    else:
                        parent_digests, parent_ids = None, bytes(n * BLOCK_ID_SIZE)
                    task = pool.submit(scanner, view, parent_digests, parent_ids, read_at)
                    in_flight.append(_Item(_READ, pos, pos + n, task, buf))
                    pos += n
                    while len(in_flight) > window:
                        self._consume(in_flight.popleft(), free, report)
                while len(in_flight) > window:
                    self._consume(in_flight.popleft(), free, report)
            while in_flight:
                self._consume(in_flight.popleft(), free, report)
            if src.fd is not None:
                src.check_end()
        image_size = src.size if src.size is not None else src.done
        root, height = self.map_writer.finish()
        self.writer.flush()
        report(Progress("packs-written", image_size, image_size, ProgressUnit.BYTES))
        parent_id = self.parent_id
        info = SnapshotInfo(
            id=secrets.token_hex(16),
            volume=self.volume,
            time=self.time,
            kind=self.kind,
            parent=parent_id,
            image_size=image_size,
            block_size=bs,
            counts=SnapshotCounts(**self.counts),
            stored_size=self._stored_size(),
            metadata_size=self._metadata_size(),
            duration=self._duration(),
            labels=self.labels,
            map_root=root,
            map_height=height,
            base=parent_id if self.kind is SnapshotKind.DIFFERENTIAL else None,
            changed_ranges=tuple(self.ranges),
        )
        self.store.commit_snapshot(info, self.writer, drop_checkpoint=True)
        report(Progress("committed", image_size, image_size, ProgressUnit.BYTES))
        return info
