"""Creating a repository: init_repository, and clearing what an init killed before it
wrote the config left, so that init can be tried again on the same path.

An init writes, under the repository lock, the directories of the host-local state and
an empty index, and the config object last (create-if-absent): a directory without a
config is not a repository (see the package doc, store/__init__.py).  Before a
repository that hosts share is made (on S3), probe_create_if_absent checks that the
storage really keeps create-if-absent, which everything there relies on.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

from blocksnap import blockid
from blocksnap.errors import LockedError, ObjectExistsError, StoreError, UsageError
from blocksnap.store.backend import TMP_MARKER, ObjectStore
from blocksnap.store.config import (
    CONFIG_NAME,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_PACK_TARGET_SIZE,
    RepositoryConfig,
    new_config,
)
from blocksnap.store.config import encode as encode_config
from blocksnap.store.index import Index
from blocksnap.store.locks import REPOSITORY_LOCK, LocalLocks
from blocksnap.store.repository import local_backend


def init_repository(
    path: str,
    *,
    block_id: str = blockid.DEFAULT_ALGORITHM,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    pack_target_size: int = DEFAULT_PACK_TARGET_SIZE,
    backend: ObjectStore | None = None,
) -> RepositoryConfig:
    """Create an empty repository at path (absent, or an empty directory), its objects in
    backend (by default, the directory itself).

    Two inits racing for one path cannot both win: the directory is set up under its
    repository lock, and the config is put create-if-absent, so a loser changes nothing.
    """
    config = new_config(
        block_id=block_id, compression_level=compression_level, pack_target_size=pack_target_size
    )
    created = not os.path.exists(path)
    if not created and not _is_unfinished_init(path):
        raise UsageError(f"{path} exists and is not an empty directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create repository at {path}: {exc.strerror or exc}") from exc
    try:
        lock = LocalLocks(path).hold(
            REPOSITORY_LOCK, busy=f"{path} is being initialised by another process"
        )
        with lock:
            # Another init may have finished between the look above and the lock.
            if not _is_unfinished_init(path):
                raise UsageError(f"{path} exists and is not an empty directory")
            _set_up(path, config, backend)
    except (LockedError, UsageError):
        raise  # another init's: its files stay
    except BaseException as exc:
        # Leave the directory as it was (absent or empty), so that init can be tried again.
        with contextlib.suppress(OSError):
            _remove_unfinished_init(path)
            if created:
                os.rmdir(path)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot create repository at {path}: {exc.strerror or exc}") from exc
        raise
    return config


def _set_up(path: str, config: RepositoryConfig, backend: ObjectStore | None) -> None:
    """Everything init writes, under the repository lock, the config last."""
    _remove_unfinished_init(path, keep_lock=True)
    for sub in _INIT_DIRS:
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    index = Index(os.path.join(path, "index"), create=True)
    try:
        index.initialize(config.id)
    finally:
        index.close()
    # The config is written last: a directory without one is not a repository.
    objects = backend if backend is not None else local_backend(path)
    try:
        objects.put(CONFIG_NAME, encode_config(config), exclusive=True)
    except ObjectExistsError:
        raise UsageError(f"{path} holds a repository already") from None
    finally:
        if backend is None:
            objects.close()


_INIT_DIRS = ("locks", "packs", "snapshots")
_INIT_FILES = ("index/data.mdb", "index/lock.mdb")


def _is_unfinished_init(path: str) -> bool:
    """Whether path is an empty directory, or holds only what an init killed before it wrote
    the config leaves (its empty directories, the lock file, a fresh index and the
    temporary file of the config)."""
    try:
        names = set(os.listdir(path))
        names = {n for n in names if not n.startswith(CONFIG_NAME + TMP_MARKER)}
        if not names <= {*_INIT_DIRS, "lock", "index"}:
            return False
        if any(os.listdir(os.path.join(path, d)) for d in _INIT_DIRS if d in names):
            return False
        return "index" not in names or set(os.listdir(os.path.join(path, "index"))) <= {
            "data.mdb",
            "lock.mdb",
        }
    except OSError:
        return False


def _remove_unfinished_init(path: str, *, keep_lock: bool = False) -> None:
    temporary = [n for n in os.listdir(path) if n.startswith(CONFIG_NAME + TMP_MARKER)]
    for name in [*_INIT_FILES, *temporary, *([] if keep_lock else ["lock"])]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    for name in (*_INIT_DIRS, "index"):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.join(path, name))


PROBE_RACERS = 8


def probe_create_if_absent(backend: ObjectStore, where: str) -> None:
    """Check, before a shared repository is made there, that the storage keeps
    create-if-absent (the commit point of every snapshot and removal, and every lease):
    racing exclusive puts of one name, exactly one must win, and a later one must lose.
    StoreError names what failed; nothing stays behind."""
    name = f"probe/{secrets.token_hex(16)}"
    bodies = [secrets.token_bytes(16) for _ in range(PROBE_RACERS)]
    start = threading.Barrier(PROBE_RACERS)

    def race(body: bytes) -> bool:
        start.wait()
        try:
            backend.put(name, body, exclusive=True)
        except ObjectExistsError:
            return False
        return True

    refused = f"{where} does not keep create-if-absent (a conditional PUT with If-None-Match: *)"
    try:
        with ThreadPoolExecutor(PROBE_RACERS) as pool:
            won = list(pool.map(race, bodies))
        if won.count(True) != 1:
            raise StoreError(
                f"{refused}: {won.count(True)} of {PROBE_RACERS} racing writes won; "
                "blocksnap will not share a repository there"
            )
        if backend.get(name) != bodies[won.index(True)]:
            raise StoreError(f"{refused}: the object is not the winner's; will not share it")
        try:
            backend.put(name, b"late", exclusive=True)
        except ObjectExistsError:
            pass
        else:
            raise StoreError(f"{refused}: an existing object was replaced; will not share it")
    finally:
        with contextlib.suppress(StoreError):
            backend.delete(name)
