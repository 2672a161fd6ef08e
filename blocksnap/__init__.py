"""blocksnap: block-level snapshots of volume images, deduplicated into a content store.

The public API.  Importing it does no I/O.
"""

from __future__ import annotations

from blocksnap.check import Problem, VerifyReport
from blocksnap.errors import (
    BlocksnapError,
    IntegrityError,
    Interrupted,
    LockedError,
    MissingObjectError,
    NativeError,
    NotFoundError,
    RestoreError,
    SourceError,
    StoreError,
    UsageError,
)
from blocksnap.model import Progress, SnapshotCounts, SnapshotInfo, SnapshotKind
from blocksnap.native import BACKEND
from blocksnap.reader import ImageReader, ReadStats
from blocksnap.repository import Repository, RepositoryStats, open_image, repair_index
from blocksnap.restore import RestoreResult
from blocksnap.store.rebuild import RebuildReport

__version__ = "0.1.0"

__all__ = [
    "BACKEND",
    "BlocksnapError",
    "ImageReader",
    "IntegrityError",
    "Interrupted",
    "LockedError",
    "MissingObjectError",
    "NativeError",
    "NotFoundError",
    "Problem",
    "Progress",
    "ReadStats",
    "RebuildReport",
    "Repository",
    "RepositoryStats",
    "RestoreError",
    "RestoreResult",
    "SnapshotCounts",
    "SnapshotInfo",
    "SnapshotKind",
    "SourceError",
    "StoreError",
    "UsageError",
    "VerifyReport",
    "open_image",
    "repair_index",
]
