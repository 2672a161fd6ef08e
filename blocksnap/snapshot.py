"""Taking snapshots: read a volume once, store what changed, commit a complete block map.

The pipeline: the calling thread reads the source in buffers of whole blocks; a pool of
worker threads scans each buffer natively (zero flags, XXH3-128 compared with the parent's
digests), strong-hashes only the blocks that changed, asks the index which of those are
new, and compresses just those; the calling thread takes results in order, appends new
records to packs and builds the new map's leaves.  Every stage that does real work
releases the GIL, so reading, hashing and compressing overlap on all cores, and at most
a few buffers are in flight, so memory does not grow with the image.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from blocksnap import native
from blocksnap.blockmap import LEAF_SPAN, BlockMap, MapBuilder, node_children
from blocksnap.errors import Interrupted, SourceError, UsageError
from blocksnap.model import (
    BLOCK_ID_SIZE,
    DEFAULT_BLOCK_SIZE,
    FILTER_DIGEST_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    Progress,
    ProgressCallback,
    SnapshotCounts,
    SnapshotInfo,
    SnapshotKind,
)
from blocksnap.store.codec import compress
from blocksnap.store.packs import KIND_BLOCK, KIND_NODE, encode_record
from blocksnap.store.repository import Store, StoreWriter

BUFFER_SIZE = 8 << 20
READ_PART = 1 << 20  # read and scan in parts that stay in a core's L2 cache
# Flags worth a look in Python: zero, changed, or both; most blocks of an incremental have 0.
_INTERESTING = re.compile(b"[\x01-\x03]")
# What a snapshot reads: a path (image file or block device) or a readable binary stream.
SourceArg = str | os.PathLike[str] | BinaryIO | io.RawIOBase | io.BufferedIOBase
MAX_VOLUME_NAME_SIZE = 200


def check_volume_name(name: str) -> None:
    if not name or len(name.encode()) > MAX_VOLUME_NAME_SIZE:
        raise UsageError(f"volume name must be 1 to {MAX_VOLUME_NAME_SIZE} bytes")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise UsageError("volume name must not contain control characters")


def check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """Labels as a dict, refusing empty keys, keys with "=" and values that are not text."""
    out = dict(labels or {})
    for key, value in out.items():
        if not key or "=" in key or not isinstance(value, str):
            raise UsageError(f"invalid label {key!r}")
    return out


def check_block_size(block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(
            f"block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} "
            f"to {MAX_BLOCK_SIZE}"
        )


@dataclass(slots=True)
class _Scanned:
    """A worker's result for one buffer: the map entries, the new records and the counts."""

    count: int
    digests: bytearray
    ids: bytearray
    new: list[tuple[bytes, bytes]]  # (id, encoded record) for blocks the index lacked
    zero: int
    changed: list[int]  # indices, within the buffer, of blocks that differ from the parent
    hashed: int


class _Source:
    """A readable volume: exact size when known, and detection of size changes."""

    def __init__(self, source: SourceArg) -> None:
        self._owned = False
        self.size: int | None = None
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise SourceError(f"source {path} does not exist") from None
            except PermissionError:
                raise SourceError(f"permission denied reading {path}") from None
            except OSError as exc:
                raise SourceError(f"cannot open {path}: {exc.strerror or exc}") from exc
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                os.close(fd)
                raise SourceError(f"source {path} is not a regular file or block device")
            self.size = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, 0, os.SEEK_SET)
            self.fd: int | None = fd
            self.file: BinaryIO | io.RawIOBase | io.BufferedIOBase = os.fdopen(
                fd, "rb", buffering=0
            )
            self.name = path
            self._owned = True
        else:
            self.fd = None
            self.file = source
            self.name = getattr(source, "name", "<stream>")
            try:
                if source.seekable():
                    here = source.tell()
                    self.size = source.seek(0, os.SEEK_END) - here
                    source.seek(here)
            except OSError:
                self.size = None
        self.done = 0

    def _read_into(self, view: memoryview) -> int:
        readinto = getattr(self.file, "readinto", None)
        try:
            if readinto is not None:
                got = readinto(view)
                return got or 0
            data = self.file.read(len(view))
        except OSError as exc:
            raise SourceError(f"error reading {self.name}: {exc.strerror or exc}") from exc
        view[: len(data)] = data
        return len(data)

    def read_into(self, buf: bytearray) -> int:
        """Fill buf with the next bytes; fewer only at the end of the volume, 0 after it."""
        want = len(buf) if self.size is None else min(len(buf), self.size - self.done)
        got = 0
        with memoryview(buf) as view:
            while got < want:
                n = self._read_into(view[got:want])
                if n == 0:
                    break
                got += n
        self.done += got
        if self.size is not None and got < want:
            raise SourceError(
                f"{self.name} shrank while being read ({self.size} bytes expected, "
                f"ended at {self.done})"
            )
        if (
            self.size is not None
            and self.done == self.size
            and got > 0
            and self._read_into(memoryview(bytearray(1)))
        ):
            raise SourceError(f"{self.name} grew while being read (past {self.size} bytes)")
        return got

    def check_end(self) -> None:
        """For a path source read by the workers: refuse it if it grew meanwhile."""
        assert self.fd is not None and self.size is not None
        try:
            grew = os.pread(self.fd, 1, self.size)
        except OSError as exc:
            raise SourceError(f"error reading {self.name}: {exc.strerror or exc}") from exc
        if grew:
            raise SourceError(f"{self.name} grew while being read (past {self.size} bytes)")

    def close(self) -> None:
        if self._owned:
            self.file.close()


class _Scanner:
    """The per-buffer work that runs on worker threads."""

    def __init__(self, store: Store, writer: StoreWriter, block_size: int, level: int) -> None:
        self.store = store
        self.writer = writer
        self.block_size = block_size
        self.level = level
        self.seed = store.config.filter_seed
        self.hash = store.hash

    def __call__(
        self,
        buf: memoryview,
        parent_digests: bytes | None,
        parent_ids: bytes,
        read_at: tuple[int, int, str] | None = None,
    ) -> _Scanned:
        """Scan buf against the parent's entries; with read_at=(fd, offset, name), first
        fill buf from that file (natively, each part scanned while still in cache)."""
        bs = self.block_size
        count = -(-len(buf) // bs)
        flags = bytearray(count)
        digests = bytearray(count * FILTER_DIGEST_SIZE)
        if read_at is None:
            native.scan(buf, bs, self.seed, parent_digests, flags, digests)
        else:
            fd, offset, name = read_at
            part = max(bs, READ_PART // bs * bs)
            try:
                got = native.read_scan(
                    fd, offset, buf, part, bs, self.seed, parent_digests, flags, digests
                )
            except OSError as exc:
                raise SourceError(f"error reading {name}: {exc.strerror or exc}") from exc
            if got < len(buf):
                raise SourceError(
                    f"{name} shrank while being read (ended at {offset + got}, "
                    f"{offset + len(buf)} bytes expected at least)"
                )
        ids = bytearray(parent_ids)
        zero = 0
        changed: list[int] = []
        hashed: list[tuple[int, bytes]] = []
        zero_id = bytes(BLOCK_ID_SIZE)
        for match in _INTERESTING.finditer(flags):
            i = match.start()
            f = flags[i]
            if f & native.FLAG_CHANGED:
                changed.append(i)
            if f & native.FLAG_ZERO:
                zero += 1
                ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE] = zero_id
            elif f & native.FLAG_CHANGED:
                block_id = self.hash(buf[i * bs : (i + 1) * bs])
                ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE] = block_id
                hashed.append((i, block_id))
        new: list[tuple[bytes, bytes]] = []
        if hashed:
            missing = self.writer.missing([block_id for _, block_id in hashed])
            for (i, block_id), absent in zip(hashed, missing, strict=True):
                if absent:
                    block = buf[i * bs : (i + 1) * bs]
                    codec, payload = compress(block, self.level)
                    new.append(
                        (block_id, encode_record(KIND_BLOCK, codec, len(block), block_id, payload))
                    )
        return _Scanned(count, digests, ids, new, zero, changed, len(hashed))


class _MapWriter:
    """Collects entries block by block and emits leaves to a MapBuilder."""

    def __init__(self, writer: StoreWriter, store: Store) -> None:
        self.writer = writer
        self.store = store
        self.metadata_size = 0
        self.builder = MapBuilder(self._put_node)
        self.digests = bytearray()
        self.ids = bytearray()

    def _put_node(self, node: bytes) -> bytes:
        node_id = self.store.hash(node)
        if not self.writer.has(node_id):
            codec, payload = compress(node, self.store.config.compression_level)
            record = encode_record(KIND_NODE, codec, len(node), node_id, payload)
            self.metadata_size += self.writer.add(
                record, node_id, checked=True, children=node_children(node)
            )
        return node_id

    def extend(self, digests: bytes | bytearray, ids: bytes | bytearray) -> None:
        self.digests += digests
        self.ids += ids
        leaf_digests = LEAF_SPAN * FILTER_DIGEST_SIZE
        while len(self.digests) >= leaf_digests:
            self.builder.add_leaf(
                self.digests[:leaf_digests], self.ids[: LEAF_SPAN * BLOCK_ID_SIZE]
            )
            del self.digests[:leaf_digests]
            del self.ids[: LEAF_SPAN * BLOCK_ID_SIZE]

    def finish(self, block_count: int) -> tuple[bytes, int]:
        if self.digests:
            self.builder.add_leaf(self.digests, self.ids)
            self.digests, self.ids = bytearray(), bytearray()
        return self.builder.finish(block_count)


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
) -> SnapshotInfo:
    """Snapshot source into volume.

    The default is incremental against the volume's latest snapshot; differential compares
    with its latest full or synthetic full instead (and is a full when it has none); full
    compares with nothing.  taken_at overrides the recorded time (when importing older
    images); it must carry a time zone.
    """
    check_volume_name(volume)
    if full and differential:
        raise UsageError("a snapshot cannot be both full and differential")
    if taken_at is not None and taken_at.tzinfo is None:
        raise UsageError("the snapshot time must include a time zone (or Z for UTC)")
    labels = check_labels(labels)
    with store.lock_volume(volume):
        fixed = store.volume_block_size(volume)
        if fixed is not None and block_size is not None and block_size != fixed:
            raise UsageError(f"volume {volume!r} has block size {fixed}, not {block_size}")
        bs = fixed or block_size or DEFAULT_BLOCK_SIZE
        check_block_size(bs)
        src = _Source(source)
        try:
            with store.writer() as writer:
                # The parent is chosen after registering: from then on gc keeps its map and
                # blocks even if it is pruned meanwhile, so unchanged entries stay valid.
                parent, kind = _parent(store, volume, full, differential)
                return _run(
                    store,
                    writer,
                    volume,
                    src,
                    bs,
                    parent,
                    kind,
                    labels,
                    progress,
                    workers,
                    taken_at,
                )
        except KeyboardInterrupt:
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


def _run(
    store: Store,
    writer: StoreWriter,
    volume: str,
    src: _Source,
    bs: int,
    parent: SnapshotInfo | None,
    kind: SnapshotKind,
    labels: dict[str, str],
    progress: ProgressCallback | None,
    workers: int | None,
    taken_at: datetime.datetime | None,
) -> SnapshotInfo:
    started = taken_at.timestamp() if taken_at is not None else time.time()
    clock = time.perf_counter()
    parent_map = (
        BlockMap(store.read_node, parent.map_root, parent.map_height, parent.block_count)
        if parent is not None
        else None
    )
    map_writer = _MapWriter(writer, store)
    scanner = _Scanner(store, writer, bs, store.config.compression_level)
    buffer_size = max(bs, BUFFER_SIZE // bs * bs)
    workers = workers or os.cpu_count() or 2
    # Buffers in flight: enough that one buffer full of changed blocks being compressed
    # does not stall the other workers, few enough that memory stays small and fixed.
    window = 4 * workers
    counts = {"read": 0, "changed": 0, "hashed": 0, "stored": 0, "zero": 0}
    block_index = 0
    ranges: list[tuple[int, int]] = []  # a differential's changed block runs
    report: Callable[[Progress], None] = progress or (lambda _p: None)

    def consume(item: tuple[Future[_Scanned], bytearray]) -> None:
        future, buf = item
        res = future.result()
        free.append(buf)
        first = counts["read"]  # buffers are consumed in order
        counts["read"] += res.count
        counts["zero"] += res.zero
        counts["changed"] += len(res.changed)
        if kind is SnapshotKind.DIFFERENTIAL:
            for i in res.changed:
                if ranges and ranges[-1][0] + ranges[-1][1] == first + i:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
                else:
                    ranges.append((first + i, 1))
        counts["hashed"] += res.hashed
        for block_id, record in res.new:
            if writer.add(record, block_id, checked=True):
                counts["stored"] += 1
        map_writer.extend(res.digests, res.ids)

    # A path source is read by the workers themselves (pread), so copying from the page
    # cache runs on every core; a stream is read here, in order.  Buffers are recycled:
    # at most window + 1 are in flight and one more is being filled.
    free: list[bytearray] = []
    in_flight: deque[tuple[Future[_Scanned], bytearray]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blocksnap-scan") as pool:
        try:
            while True:
                buf = free.pop() if free else bytearray(buffer_size)
                offset = src.done
                if src.fd is not None and src.size is not None:
                    got = min(buffer_size, src.size - offset)
                    src.done += got
                else:
                    got = src.read_into(buf)
                if not got:
                    break
                n = -(-got // bs)
                if parent_map is not None:
                    parent_digests, parent_ids = parent_map.entries(block_index, n)
                else:
                    parent_digests, parent_ids = None, bytes(n * BLOCK_ID_SIZE)
                view = memoryview(buf)[:got]
                if src.fd is not None:
                    read_at = (src.fd, offset, src.name)
                    task = pool.submit(scanner, view, parent_digests, parent_ids, read_at)
                else:
                    task = pool.submit(scanner, view, parent_digests, parent_ids)
                in_flight.append((task, buf))
                block_index += n
                if len(in_flight) > window:
                    consume(in_flight.popleft())
                report(Progress("read", src.done, src.size or 0))
            while in_flight:
                consume(in_flight.popleft())
            if src.fd is not None:
                src.check_end()
        except BaseException:
            for future, _ in in_flight:
                future.cancel()
            raise
    image_size = src.done
    root, height = map_writer.finish(block_index)
    writer.flush()
    report(Progress("packs-written", image_size, image_size))
    info = SnapshotInfo(
        id=secrets.token_hex(16),
        volume=volume,
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        kind=kind,
        parent=parent.id if parent is not None else None,
        image_size=image_size,
        block_size=bs,
        counts=SnapshotCounts(**counts),
        stored_size=writer.written_size,
        metadata_size=map_writer.metadata_size,
        duration=time.perf_counter() - clock,
        labels=labels,
        map_root=root,
        map_height=height,
        base=parent.id if kind is SnapshotKind.DIFFERENTIAL and parent is not None else None,
        changed_ranges=tuple(ranges),
    )
    store.commit_snapshot(info, writer)
    report(Progress("committed", image_size, image_size))
    return info
