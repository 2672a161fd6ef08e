"""The exception tree: one root, a shallow set of kinds, each carrying its CLI exit code."""

from __future__ import annotations


class BlocksnapError(Exception):
    """Root of every error blocksnap raises on purpose."""

    exit_code = 1


class UsageError(BlocksnapError):
    """The caller asked for something malformed (bad name, bad size, bad option)."""

    exit_code = 2


class ProtectedError(UsageError):
    """The snapshot is protected, so it cannot be removed (unprotect it first)."""


class NotFoundError(BlocksnapError):
    """A repository, volume or snapshot that was named does not exist."""

    exit_code = 3


class LockedError(BlocksnapError):
    """Another process holds what this operation needs exclusively."""

    exit_code = 4


class IntegrityError(BlocksnapError):
    """Stored data or metadata is damaged: a checksum, hash or structure does not match."""

    exit_code = 5


class StoreError(BlocksnapError):
    """The repository could not be read or written (I/O error, disk full, permissions)."""

    exit_code = 6


class UnsupportedFormatError(StoreError):
    """A stored object is intact but of a format (version, feature) this blocksnap does not
    know: a newer blocksnap wrote it.  It is refused, never read as damage or guessed at."""


class ObjectExistsError(StoreError):
    """A create-if-absent put found an object under the name already (someone won the race)."""


class TransientStoreError(StoreError):
    """A storage failure that may pass if the same call is repeated (a timeout, a throttled
    or interrupted request): RetryingBackend retries these, and only these."""


class SourceError(BlocksnapError):
    """The volume being snapshotted could not be read, or changed size while being read."""

    exit_code = 7


class RestoreError(BlocksnapError):
    """The restore target cannot take the image (too small, not writable, wrong kind)."""

    exit_code = 8


class FilesystemError(BlocksnapError):
    """The filesystem inside a snapshot's image is unknown, damaged, or has no such path."""

    exit_code = 10


class PathNotFoundError(FilesystemError):
    """The path names nothing in the snapshot's filesystem (a part of it is missing, or is
    not a directory)."""


class XattrsIncompleteError(FilesystemError):
    """Some extended attributes of a file cannot be read right: `unreadable` maps each
    (its name, or where it is kept when even the name cannot be trusted) to why, and
    `readable` holds the others."""

    def __init__(self, readable: dict[str, bytes], unreadable: dict[str, str]) -> None:
        said = "; ".join(f"{name}: {why}" for name, why in unreadable.items())
        super().__init__(f"extended attributes not read: {said}")
        self.readable = readable
        self.unreadable = unreadable


class NativeError(BlocksnapError):
    """The native backend is missing when it was required, or refused its arguments."""

    exit_code = 9


class Interrupted(BlocksnapError):
    """The operation was interrupted (Ctrl-C); nothing it had not committed was kept."""

    exit_code = 130


class MissingObjectError(IntegrityError):
    """An object the repository refers to (a pack, a snapshot record) is not in storage."""
