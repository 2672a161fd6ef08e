"""A repository on disk: its config (the format header), locks, verified reads and writes.

Layout of a repository directory REPO/:

    config        JSON format header, written once by init (see RepositoryConfig)
    lock          flock: shared by every operation, exclusive for repair --rebuild-index
    locks/        one flock file per volume being snapshotted (named by a hash of the name)
    index/        the LMDB index (store/index.py)
    packs/XX/ID   pack objects (store/packs.py), ID = 32 hex digits, XX = its first two
    snapshots/ID  snapshot record objects (store/catalog.py)

Crash safety comes from ordering: a pack is durable (fsync of file and directory) before
the index transaction that refers to it commits, and a snapshot's record object is durable
before the transaction that makes the snapshot visible commits.  Anything a killed writer
leaves (temporary files, packs or records that no committed snapshot refers to) is
ignored by readers and reported by verify.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import blake3

from blocksnap import blockid
from blocksnap.errors import (
    IntegrityError,
    LockedError,
    MissingObjectError,
    NotFoundError,
    StoreError,
    UsageError,
)
from blocksnap.model import SnapshotInfo
from blocksnap.store import catalog
from blocksnap.store import index as index_module
from blocksnap.store.backend import LocalBackend, ObjectStore
from blocksnap.store.codec import decompress
from blocksnap.store.index import Index, lmdb_errors
from blocksnap.store.packs import (
    HEADER_SIZE,
    KIND_BLOCK,
    KIND_NODE,
    PackBuilder,
    check_record,
    parse_header,
)

CONFIG_NAME = "config"
REPOSITORY_FORMAT = "blocksnap-repository"
REPOSITORY_VERSION = 1
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_PACK_TARGET_SIZE = 16 << 20
_SNAPSHOT_NAME = re.compile(r"latest(?:~(\d+))?")


@dataclass(frozen=True, slots=True)
class RepositoryConfig:
    """The format header.  Fields are fixed at init; readers refuse versions they lack."""

    format: str
    version: int
    id: str
    created: str
    block_id: str  # strong block identity, see blockid.py
    change_filter: str  # always "xxh3-128" in version 1
    filter_seed: int  # secret per repository: nobody outside it can precompute collisions
    compression: str  # "zstd"
    compression_level: int
    encryption: str  # "none"; room for keyed IDs and authenticated records later
    pack_target_size: int

    def algorithms(self) -> dict[str, str]:
        return {
            "block_id": self.block_id,
            "change_filter": self.change_filter,
            "compression": self.compression,
        }


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def _write_file_durably(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def init_repository(
    path: str,
    *,
    block_id: str = blockid.DEFAULT_ALGORITHM,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    pack_target_size: int = DEFAULT_PACK_TARGET_SIZE,
) -> RepositoryConfig:
    """Create an empty repository at path (absent, or an empty directory)."""
    blockid.hasher(block_id)
    if not 1 <= compression_level <= 19:
        raise UsageError(f"compression level {compression_level} is not in 1..19")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"{path} exists and is not an empty directory")
    config = RepositoryConfig(
        format=REPOSITORY_FORMAT,
        version=REPOSITORY_VERSION,
        id=secrets.token_hex(16),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        block_id=block_id,
        change_filter="xxh3-128",
        filter_seed=secrets.randbits(64),
        compression="zstd",
        compression_level=compression_level,
        encryption="none",
        pack_target_size=pack_target_size,
    )
    try:
        os.makedirs(path, exist_ok=True)
        for sub in ("locks", "packs", "snapshots"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        open(os.path.join(path, "lock"), "ab").close()
        index = Index(os.path.join(path, "index"), create=True)
        try:
            index.initialize(config.id)
        finally:
            index.close()
        # The config is written last: a directory without one is not a repository.
        _write_file_durably(
            os.path.join(path, CONFIG_NAME), json.dumps(asdict(config), indent=2).encode()
        )
    except OSError as exc:
        raise StoreError(f"cannot create repository at {path}: {exc.strerror or exc}") from exc
    return config


def read_config(path: str) -> RepositoryConfig:
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(config_path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        if not os.path.exists(path):
            raise NotFoundError(f"repository {path} does not exist") from None
        raise NotFoundError(f"{path} is not a blocksnap repository (no config)") from None
    except (NotADirectoryError, IsADirectoryError):
        raise NotFoundError(f"{path} is not a blocksnap repository") from None
    except PermissionError:
        raise StoreError(f"permission denied reading {config_path}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{config_path} is damaged") from exc
    if not isinstance(raw, dict) or raw.get("format") != REPOSITORY_FORMAT:
        raise NotFoundError(f"{path} is not a blocksnap repository")
    if raw.get("version") != REPOSITORY_VERSION:
        raise StoreError(f"repository format version {raw.get('version')} is not supported")
    try:
        config = RepositoryConfig(**raw)
    except TypeError as exc:
        raise IntegrityError(f"{config_path} is damaged ({exc})") from exc
    blockid.hasher(config.block_id)
    return config


@contextlib.contextmanager
def _flock(path: str, mode: int, busy: str) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open lock {path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(busy) from None
        yield
    finally:
        os.close(fd)  # releases the lock; so does the death of the process


def _finish_rebuild_swap(path: str) -> None:
    """If a rebuild was killed between its two renames, complete it (see store/rebuild.py)."""
    index = os.path.join(path, "index")
    rebuilt = os.path.join(path, "index.rebuild")
    if not os.path.exists(index) and os.path.exists(os.path.join(rebuilt, "COMPLETE")):
        with contextlib.suppress(FileNotFoundError):  # another process finished it first
            os.rename(rebuilt, index)


class Store:
    """An open repository: the BlockSource for readers and the target of writers."""

    def __init__(self, path: str, *, exclusive: bool = False) -> None:
        self.path = path
        self.config = read_config(path)
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(
                _flock(
                    os.path.join(path, "lock"),
                    fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
                    "repository is in use by another process"
                    if exclusive
                    else "repository is locked by a repair in progress",
                )
            )
            self.backend: ObjectStore = LocalBackend(path)
            self._index: Index | None = None
            if not exclusive:
                _finish_rebuild_swap(path)
                self._index = index_module.acquire(os.path.join(path, "index"))
                try:
                    self._index.check_identity(self.config.id)
                except BaseException:
                    index_module.release(self._index)
                    self._index = None
                    raise
        except BaseException:
            self._stack.close()
            raise
        self.hash: Callable[[bytes | memoryview], bytes] = blockid.hasher(self.config.block_id)

    @property
    def index(self) -> Index:
        if self._index is None:
            raise StoreError("repository is closed")
        return self._index

    def close(self) -> None:
        if self._index is not None:
            index_module.release(self._index)
            self._index = None
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self._stack.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading -----------------------------------------------------------------------

    def read_object(self, object_id: bytes, kind: int = KIND_BLOCK) -> bytes:
        """Return an object's raw bytes, checked against its record checksum and its id."""
        what = f"object {object_id.hex()}"
        loc = self.index.location(object_id)
        if loc is None:
            raise MissingObjectError(f"{what} is not in the index")
        name = pack_name(loc.pack)
        data = self.backend.get(name, loc.offset, HEADER_SIZE + loc.stored_size)
        where = f"{what} in pack {loc.pack.hex()} at offset {loc.offset}"
        if len(data) != HEADER_SIZE + loc.stored_size:
            raise IntegrityError(f"{where}: pack is truncated")
        head = parse_header(data[:HEADER_SIZE], where)
        if (head.id, head.kind, head.stored_size, head.raw_size, head.codec) != (
            object_id,
            kind,
            loc.stored_size,
            loc.raw_size,
            loc.codec,
        ):
            raise IntegrityError(f"{where}: record does not match the index")
        payload = memoryview(data)[HEADER_SIZE:]
        check_record(data[:HEADER_SIZE], payload, where)
        raw = decompress(loc.codec, payload, loc.raw_size, where)
        if self.hash(raw) != object_id:
            raise IntegrityError(f"{where}: content does not match its id")
        return raw

    def read_block(self, block_id: bytes) -> bytes:
        return self.read_object(block_id, KIND_BLOCK)

    def read_node(self, node_id: bytes) -> bytes:
        return self.read_object(node_id, KIND_NODE)

    def snapshot(self, snapshot_id: str) -> SnapshotInfo:
        record = self.index.snapshot_record(snapshot_id)
        if record is None:
            raise NotFoundError(f"snapshot {snapshot_id} does not exist")
        return catalog.decode(record, f"snapshot {snapshot_id}")

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's committed snapshots, oldest first."""
        return [self.snapshot(i) for i in self.index.snapshot_ids(volume)]

    def volumes(self) -> list[str]:
        return self.index.volume_names()

    def volume_block_size(self, volume: str) -> int | None:
        vol = self.index.volume(volume)
        return int(vol["block_size"]) if vol is not None else None

    def resolve(self, volume: str, name: str) -> SnapshotInfo:
        """A snapshot by id, unique id prefix, "latest" or "latest~N"."""
        ids = self.index.snapshot_ids(volume)
        if not ids:
            if self.index.volume(volume) is None:
                raise NotFoundError(f"volume {volume!r} does not exist")
            raise NotFoundError(f"volume {volume!r} has no snapshots")
        match = _SNAPSHOT_NAME.fullmatch(name)
        if match:
            back = int(match.group(1) or 0)
            if back >= len(ids):
                raise NotFoundError(f"{name}: volume {volume!r} has only {len(ids)} snapshots")
            return self.snapshot(ids[-1 - back])
        if not re.fullmatch(r"[0-9a-f]{1,32}", name):
            raise UsageError(f"{name!r} is not a snapshot id, prefix, latest or latest~N")
        found = [i for i in ids if i.startswith(name)]
        if not found:
            raise NotFoundError(f"snapshot {name} not found in volume {volume!r}")
        if len(found) > 1:
            raise UsageError(f"snapshot prefix {name} is ambiguous ({len(found)} matches)")
        return self.snapshot(found[0])

    # --- writing -----------------------------------------------------------------------

    def lock_volume(self, volume: str) -> contextlib.AbstractContextManager[None]:
        key = blake3.blake3(volume.encode()).hexdigest()[:32]
        return _flock(
            os.path.join(self.path, "locks", f"volume-{key}.lock"),
            fcntl.LOCK_EX,
            f"a snapshot of volume {volume!r} is already running",
        )

    def writer(self) -> StoreWriter:
        return StoreWriter(self)

    def commit_snapshot(self, info: SnapshotInfo, writer: StoreWriter) -> None:
        """Make every written object durable, then the snapshot visible, in that order."""
        writer.flush()
        body = catalog.encode(info, self.config.algorithms())
        self.backend.put(catalog.object_name(info.id), catalog.frame(body))
        self.index.commit_snapshot(info.volume, info.block_size, info.id, body)


class StoreWriter:
    """Packs new records; each full pack is stored and indexed on a background thread.

    At most one sealed pack is in flight while the next one fills, so writing and fsync
    overlap with reading and compressing.  flush() returns once everything added is durable
    and indexed; a failure in the background is raised by the next add() or flush().
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.builder = PackBuilder()
        self.pending: set[bytes] = set()  # ids in the open pack
        self.sealing: set[bytes] = set()  # ids in the pack being stored
        self.written_size = 0  # bytes of stored packs, this session
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blocksnap-pack")
        self._in_flight: Future[int] | None = None

    def has(self, object_id: bytes) -> bool:
        """Whether the object is stored already or queued in this writer."""
        return (
            object_id in self.pending
            or object_id in self.sealing
            or self.store.index.location(object_id) is not None
        )

    def add(self, record: bytes, object_id: bytes, *, checked: bool = False) -> int:
        """Queue a record (from encode_record) unless the object exists; return bytes added.

        checked=True means the caller asked the index moments ago and the object was absent;
        only this writer's own queue is consulted then.  Should another writer store the
        same object meanwhile, the index keeps the first copy and this one is garbage.
        """
        if object_id in self.pending or object_id in self.sealing:
            return 0
        if not checked and self.store.index.location(object_id) is not None:
            return 0
        self.builder.add(record)
        self.pending.add(object_id)
        if self.builder.size >= self.store.config.pack_target_size:
            self._seal()
        return len(record)

    def _store(self, builder: PackBuilder) -> int:
        pack_id = secrets.token_bytes(16)
        self.store.backend.put(pack_name(pack_id), builder.buffer)
        with lmdb_errors("indexing pack"):
            self.store.index.add_pack(pack_id, builder.size, builder.records)
        return builder.size

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            self.written_size += future.result()
            self.sealing.clear()

    def _seal(self) -> None:
        self._wait()
        if self.builder.records:
            builder, self.builder = self.builder, PackBuilder()
            self.sealing, self.pending = self.pending, set()
            self._in_flight = self._pool.submit(self._store, builder)

    def flush(self) -> None:
        """Store and index everything added so far; return when it is durable."""
        self._seal()
        self._wait()

    def close(self) -> None:
        """Wait for the background thread; what it did not finish stays unreferenced."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
