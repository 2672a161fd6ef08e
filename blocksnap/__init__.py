"""blocksnap: block-level snapshots of volume images, deduplicated into a content store.

The public API.  Importing it does no I/O.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from blocksnap.errors import (
    BlocksnapError,
    FilesystemError,
    IntegrityError,
    Interrupted,
    LockedError,
    MissingObjectError,
    NativeError,
    NotFoundError,
    PathNotFoundError,
    ProtectedError,
    RestoreError,
    SourceError,
    StoreError,
    UnsupportedFormatError,
    UsageError,
    XattrsIncompleteError,
)

if TYPE_CHECKING:
    from blocksnap.extract import Conflict, ExtractReport
    from blocksnap.fs import Entry, FileKind, FileStat, FileSystem, Partition
    from blocksnap.history import Version, VersionState
    from blocksnap.model import (
        Checkpoint,
        Progress,
        ProgressUnit,
        SnapshotCounts,
        SnapshotDiff,
        SnapshotInfo,
        SnapshotKind,
    )
    from blocksnap.native import BACKEND
    from blocksnap.reader import ImageReader, ReadStats
    from blocksnap.repository import (
        PruneReport,
        Repository,
        RepositoryStats,
        open_image,
        repair_index,
    )
    from blocksnap.restore import RestoreResult
    from blocksnap.retention import Decision, Policy
    from blocksnap.store.gc import GcReport
    from blocksnap.store.rebuild import RebuildReport
    from blocksnap.store.verify import Problem, VerifyReport

# The rest of the API is imported on first use (PEP 562), so that `python -m blocksnap`
# starts fast and a Ctrl-C during start-up meets the CLI's handler, not a traceback.
_LAZY = {
    "Conflict": "blocksnap.extract",
    "ExtractReport": "blocksnap.extract",
    "Entry": "blocksnap.fs",
    "FileKind": "blocksnap.fs",
    "FileStat": "blocksnap.fs",
    "FileSystem": "blocksnap.fs",
    "Partition": "blocksnap.fs",
    "Version": "blocksnap.history",
    "VersionState": "blocksnap.history",
    "Checkpoint": "blocksnap.model",
    "Progress": "blocksnap.model",
    "ProgressUnit": "blocksnap.model",
    "SnapshotCounts": "blocksnap.model",
    "SnapshotDiff": "blocksnap.model",
    "SnapshotInfo": "blocksnap.model",
    "SnapshotKind": "blocksnap.model",
    "BACKEND": "blocksnap.native",
    "ImageReader": "blocksnap.reader",
    "ReadStats": "blocksnap.reader",
    "PruneReport": "blocksnap.repository",
    "Repository": "blocksnap.repository",
    "RepositoryStats": "blocksnap.repository",
    "open_image": "blocksnap.repository",
    "repair_index": "blocksnap.repository",
    "RestoreResult": "blocksnap.restore",
    "Decision": "blocksnap.retention",
    "Policy": "blocksnap.retention",
    "GcReport": "blocksnap.store.gc",
    "RebuildReport": "blocksnap.store.rebuild",
    "Problem": "blocksnap.store.verify",
    "VerifyReport": "blocksnap.store.verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blocksnap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.2.0"

__all__ = [
    "BACKEND",
    "BlocksnapError",
    "Checkpoint",
    "Conflict",
    "Decision",
    "Entry",
    "ExtractReport",
    "FileKind",
    "FileStat",
    "FileSystem",
    "FilesystemError",
    "GcReport",
    "ImageReader",
    "IntegrityError",
    "Interrupted",
    "LockedError",
    "MissingObjectError",
    "NativeError",
    "NotFoundError",
    "Partition",
    "PathNotFoundError",
    "Policy",
    "Problem",
    "Progress",
    "ProgressUnit",
    "ProtectedError",
    "PruneReport",
    "ReadStats",
    "RebuildReport",
    "Repository",
    "RepositoryStats",
    "RestoreError",
    "RestoreResult",
    "SnapshotCounts",
    "SnapshotDiff",
    "SnapshotInfo",
    "SnapshotKind",
    "SourceError",
    "StoreError",
    "UnsupportedFormatError",
    "UsageError",
    "VerifyReport",
    "Version",
    "VersionState",
    "XattrsIncompleteError",
    "open_image",
    "repair_index",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
