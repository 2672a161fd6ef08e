"""Value types, constants and the narrow protocols that every layer of blocksnap shares."""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 4 << 20
DEFAULT_BLOCK_SIZE = 64 << 10
FILTER_DIGEST_SIZE = 16  # XXH3-128, the change filter
BLOCK_ID_SIZE = 32  # the strong, store-wide block identity
# How far ahead of this host's clock a snapshot's time may be before it counts as forged
# (a wrong clock or a hostile writer): snapshot --time refuses it, prune keeps it aside.
CLOCK_SKEW = datetime.timedelta(minutes=15)
# The most block bytes a reader or restorer asks of BlockSource.read_blocks at once: what
# one batch holds in memory, raw, and enough for a remote store to be read at its
# bandwidth rather than at one round trip per block.
READ_BATCH_SIZE = 8 << 20


class SnapshotKind(enum.Enum):
    FULL = "full"  # every block read and compared with nothing
    INCREMENTAL = "incremental"  # compared with the volume's latest snapshot
    DIFFERENTIAL = "differential"  # compared with the latest full or synthetic full
    SYNTHETIC = "synthetic-full"  # made from the repository alone; a base for differentials

    @property
    def is_base(self) -> bool:
        """Whether differentials may be taken against a snapshot of this kind."""
        return self in (SnapshotKind.FULL, SnapshotKind.SYNTHETIC)


@dataclass(frozen=True, slots=True)
class SnapshotCounts:
    """What one snapshot run did, block by block."""

    read: int = 0  # blocks read from the source
    changed: int = 0  # blocks whose content differs from the parent's at the same index
    hashed: int = 0  # changed non-zero blocks that were strong-hashed
    stored: int = 0  # blocks whose content was new to the repository and was written
    zero: int = 0  # all-zero blocks, holes included (never hashed, never stored)
    resumed: int = 0  # blocks taken from an interrupted run's checkpoint, not read again


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A committed snapshot, as recorded in the repository."""

    id: str
    volume: str
    time: str  # ISO 8601, UTC
    kind: SnapshotKind
    parent: str | None
    image_size: int
    block_size: int
    counts: SnapshotCounts
    stored_size: int  # bytes this snapshot added to the store (compressed, with metadata)
    metadata_size: int  # of that, bytes of new block-map nodes
    duration: float  # seconds
    labels: dict[str, str] = field(default_factory=dict)
    map_root: bytes = b""
    map_height: int = 0
    base: str | None = None  # differential: the full or synthetic full it is relative to
    # differential: the block ranges (first block, count) that differ from the base
    changed_ranges: tuple[tuple[int, int], ...] = ()

    @property
    def block_count(self) -> int:
        return -(-self.image_size // self.block_size)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What an interrupted snapshot run committed: a complete map of its first blocks.

    Counts, sizes and changed ranges cover those blocks only.  A resumed run must see the
    same source, block size, image size, mode and hints, and compares with the same
    parent, whose map the checkpoint keeps alive even if that snapshot is pruned.
    """

    volume: str
    mode: str  # what was asked: "full", "incremental" or "differential"
    kind: SnapshotKind  # what the run is making
    parent: str | None
    parent_map: tuple[bytes, int, int] | None  # the parent map's root, height, image size
    block_size: int
    image_size: int
    source: dict[str, int | str]  # identity of the source (inode, ctime, diskseq...)
    hints: str | None  # fingerprint of the changed-extent runs, None without hints
    block_count: int  # blocks the map covers: 0 .. block_count
    map_root: bytes
    map_height: int
    counts: SnapshotCounts
    stored_size: int
    metadata_size: int
    duration: float
    time: str
    labels: dict[str, str]
    changed_ranges: tuple[tuple[int, int], ...]

    @property
    def pinned(self) -> list[bytes]:
        """The map roots the checkpoint holds references to."""
        return [self.map_root] + ([self.parent_map[0]] if self.parent_map else [])


@dataclass(frozen=True, slots=True)
class SnapshotDiff:
    """The blocks that differ between two snapshots of a volume."""

    a: str
    b: str
    block_size: int
    image_size: int  # the larger of the two images: where the ranges end
    ranges: tuple[tuple[int, int], ...]  # (first block, count), sorted, disjoint

    @property
    def changed_blocks(self) -> int:
        return sum(count for _, count in self.ranges)

    def byte_ranges(self, image_size: int | None = None) -> list[tuple[int, int]]:
        """The ranges as (offset, length) in bytes, cut at image_size when given."""
        out = []
        for first, count in self.ranges:
            offset = first * self.block_size
            end = (first + count) * self.block_size
            if image_size is not None:
                end = min(end, image_size)
            if end > offset:
                out.append((offset, end - offset))
        return out


class ProgressUnit(enum.Enum):
    """What a phase of progress counts."""

    BYTES = "bytes"
    OBJECTS = "objects"
    PACKS = "packs"
    SNAPSHOTS = "snapshots"
    BLOCKS = "blocks"


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress report: how much of a phase is done, of what total (0 when unknown),
    in the phase's unit.  Within a phase, done never decreases and the unit stays."""

    phase: str
    done: int
    total: int
    unit: ProgressUnit


ProgressCallback = Callable[[Progress], None]


class BlockSource(Protocol):
    """Where readers and restorers get block contents: verified bytes by block ID."""

    def read_block(self, block_id: bytes) -> bytes:
        """Return the block's content, checked against its ID, or raise IntegrityError."""
        ...

    def read_blocks(self, block_ids: Sequence[bytes]) -> list[bytes]:
        """The contents of many blocks, in the order asked, each checked as by read_block
        and failing with the same errors.  Ids may repeat.  A zero block (blockmap.ZERO_ID,
        never stored) yields b"": its zeros are the caller's to supply, as around
        read_block.  The whole result is held at once, so callers bound a batch's size
        (READ_BATCH_SIZE)."""
        ...

    def read_node(self, node_id: bytes) -> bytes:
        """Return a block-map node's bytes, checked against its ID."""
        ...
