"""A host's on-disk cache of the map nodes it fetched from object storage, kept under a
size limit: the least recently used go first.

Every snapshot's block map is a tree of nodes (blockmap.py).  On S3 each node read is a
GET, and an incremental reads its parent's map, a single-file restore the path to the
file's blocks, gc and sync the trees they count.  Nodes are content-addressed and never
change, so a copy is good for as long as it is readable; only its bytes can go bad.

Format, version 1 (the directory `nodes-v1` in the cache directory):
    nodes-v1/<first two hex digits of the id>/<id in hex>   the node's raw bytes
A file is written under a temporary name and renamed, so a reader sees whole files or
none.  Its modification time is its last use: a hit touches it.  Compatibility rule: a
reader checks every hit against its id (the repository's hash) and drops a file that
does not match, so a damaged or foreign file costs one GET and never returns wrong
bytes; another format takes another directory name, and this one is then left alone
(deleting a cache directory loses nothing).

The limit is kept by whoever adds: once the bytes it knows of pass the limit, it lists
the files, oldest use first, and deletes until they are under 3/4 of it.  Processes that
share the cache each keep it so; a file deleted under a reader is a miss.  Any OSError
makes the cache a miss, never an error: the objects are the truth.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable

DIRECTORY = "nodes-v1"
DEFAULT_LIMIT = 256 << 20  # bytes on disk, per repository cache
KEEP_AFTER_EVICTION = 0.75  # of the limit


class NodeCache:
    """Map nodes by id under root, at most limit bytes of them (see the module doc)."""

    def __init__(self, root: str, limit: int, hash: Callable[[bytes], bytes]) -> None:
        self.root = root
        self.limit = limit
        self._hash = hash
        self._lock = threading.Lock()
        self._size: int | None = None  # bytes on disk, learnt on the first add
        self.hits = 0
        self.misses = 0

    def _path(self, node_id: bytes) -> str:
        name = node_id.hex()
        return os.path.join(self.root, name[:2], name)

    def get(self, node_id: bytes) -> bytes | None:
        """The node's raw bytes, or None (not cached, unreadable, or damaged: dropped)."""
        path = self._path(node_id)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            self._count(hit=False)
            return None
        if self._hash(raw) != node_id:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self._count(hit=False)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # its last use, for eviction
        self._count(hit=True)
        return raw

    def _count(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, node_id: bytes, raw: bytes) -> None:
        """Keep a node fetched and checked by the caller; evict if over the limit."""
        if len(raw) > self.limit:
            return
        path = self._path(node_id)
        with contextlib.suppress(OSError):
            os.utime(path)  # held already (a damaged copy is dropped by get): its use
            return
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(raw)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        with self._lock:
            if self._size is None:
                self._size = self._scan_size()
            else:
                self._size += len(raw)
            if self._size > self.limit:
                self._size = self._evict()

    def _files(self) -> list[tuple[float, int, str]]:
        """(last use, size, path) of every cached node."""
        found = []
        with contextlib.suppress(OSError):
            for sub in os.scandir(self.root):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError):
                    for entry in os.scandir(sub.path):
                        with contextlib.suppress(OSError):
                            st = entry.stat(follow_symlinks=False)
                            found.append((st.st_mtime, st.st_size, entry.path))
        return found

    def _scan_size(self) -> int:
        return sum(size for _, size, _ in self._files())

    def _evict(self) -> int:
        """Delete the least recently used files until under KEEP_AFTER_EVICTION of the
        limit; return the bytes left."""
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        keep = int(self.limit * KEEP_AFTER_EVICTION)
        for _, size, path in files:
            if total <= keep:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= size
        return total

    def holds(self, nbytes: int) -> bool:
        """Whether nodes of nbytes in all are worth keeping: a map read in order that
        is more than half the limit would evict itself before it is read again."""
        return 2 * nbytes <= self.limit

    def size(self) -> int:
        """Bytes the cache holds on disk now."""
        return self._scan_size()
