"""The host's cache of map nodes fetched from S3 (store/nodecache.py): fewer GETs, a size
limit kept with the least recently used out first, damaged copies never returned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blocksnap
from blocksnap import blockid
from blocksnap.store import nodecache
from blocksnap.store.location import S3Options
from blocksnap.store.nodecache import NodeCache
from blocksnap.store.s3 import S3Backend
from tests.conftest import debugfs, run_cli
from tests.s3server import S3_BUCKET, S3Server, use_server

HASH = blockid.hasher(blockid.DEFAULT_ALGORITHM)


def _node(n: int, size: int = 1000) -> tuple[bytes, bytes]:
    raw = bytes([n]) * size
    return HASH(raw), raw


def test_least_recently_used_go_first(tmp_path: Path) -> None:
    cache = NodeCache(str(tmp_path / "nodes"), 3500, HASH)
    nodes = [_node(n) for n in range(4)]
    for age, (node_id, raw) in enumerate(nodes[:3]):
        cache.put(node_id, raw)
        path = cache._path(node_id)
        os.utime(path, (1000 + age, 1000 + age))  # used in the order 0, 1, 2
    assert cache.get(nodes[0][0]) == nodes[0][1]  # 0 is now the most recent
    cache.put(*nodes[3])  # 4000 bytes > 3500: evicted down to 3/4 of the limit
    assert cache.size() <= 3500 * 3 // 4
    assert cache.get(nodes[1][0]) is None and cache.get(nodes[2][0]) is None
    assert cache.get(nodes[0][0]) == nodes[0][1]
    assert cache.get(nodes[3][0]) == nodes[3][1]


def test_a_node_put_again_is_counted_once(tmp_path: Path) -> None:
    """Putting a node the cache holds only marks its use: its size estimate would
    otherwise run high and evict early."""
    cache = NodeCache(str(tmp_path / "nodes"), 3500, HASH)
    nodes = [_node(n) for n in range(3)]
    for node_id, raw in nodes:
        cache.put(node_id, raw)
    for _ in range(5):
        cache.put(*nodes[0])  # 3000 bytes held: nothing to evict
    assert all(cache.get(node_id) == raw for node_id, raw in nodes)
    assert cache.size() == 3000


def test_a_damaged_or_foreign_copy_is_dropped(tmp_path: Path) -> None:
    cache = NodeCache(str(tmp_path / "nodes"), 1 << 20, HASH)
    node_id, raw = _node(7)
    cache.put(node_id, raw)
    path = Path(cache._path(node_id))
    path.write_bytes(raw[:-1] + b"x")
    assert cache.get(node_id) is None
    assert not path.exists()
    other_id, _ = _node(8)
    os.makedirs(os.path.dirname(cache._path(other_id)), exist_ok=True)
    Path(cache._path(other_id)).write_bytes(raw)  # bytes of another node
    assert cache.get(other_id) is None


@pytest.fixture
def s3_url(s3_server: S3Server, s3_prefix: str, monkeypatch: pytest.MonkeyPatch) -> str:
    use_server(monkeypatch, s3_server)
    return f"s3://{S3_BUCKET}/{s3_prefix}"


def _restore_gets(url: str, options: S3Options, target: Path) -> tuple[int, NodeCache | None]:
    with blocksnap.Repository(url, s3=options) as repo:
        backend = repo.store.backend
        assert isinstance(backend, S3Backend)
        before = backend.requests["GetObject"]
        repo.restore("vol", "latest", target)
        target.unlink()
        with repo.open_filesystem("vol") as fs, fs.open("/new.bin") as f:
            f.read()
        return backend.requests["GetObject"] - before, repo.store.node_cache


def test_nodes_come_from_the_cache_under_its_limit(
    s3_url: str, ext4_image: Path, tmp_path: Path
) -> None:
    limit = 80 << 10  # the 48 MiB image's map is 768 x 48 bytes: kept, at half the limit
    options = S3Options(cache_dir=str(tmp_path / "host"), cache_limit=limit)
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(1 << 20))
    with blocksnap.Repository.init(s3_url, s3=options) as repo:
        repo.snapshot("vol", ext4_image)
        debugfs(ext4_image, f"write {new} new.bin")
        repo.snapshot("vol", ext4_image)
    # A host with an empty cache, then again with the nodes it fetched.
    fresh = S3Options(cache_dir=str(tmp_path / "other"), cache_limit=1 << 20)
    cold, _ = _restore_gets(s3_url, fresh, tmp_path / "a.img")
    warm, cache = _restore_gets(s3_url, fresh, tmp_path / "b.img")
    assert cache is not None and cache.hits > 0
    assert warm < cold, (warm, cold)
    # The small limit of the first host holds, whatever it read.
    _restore_gets(s3_url, options, tmp_path / "c.img")
    with blocksnap.Repository(s3_url, s3=options) as repo:
        assert repo.store.node_cache is not None
        assert repo.store.node_cache.size() <= limit
    # Every cached node damaged: the restore still comes out right, from the bucket.
    nodes_dir = tmp_path / "other"
    damaged = 0
    for path in nodes_dir.rglob("*"):
        if path.is_file() and path.parent.parent.name == nodecache.DIRECTORY:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
            damaged += 1
    assert damaged > 0
    with blocksnap.Repository(s3_url, s3=fresh) as repo:
        repo.restore("vol", "latest", tmp_path / "d.img")
        assert repo.store.node_cache is not None
        assert repo.store.node_cache.hits == 0 and repo.store.node_cache.misses > 0
    assert (tmp_path / "d.img").read_bytes() == ext4_image.read_bytes()
    # A map larger than half the limit would evict itself as it is read: not kept at all.
    small = S3Options(cache_dir=str(tmp_path / "small"), cache_limit=48 << 10)
    debugfs(ext4_image, "rm new.bin")
    with blocksnap.Repository(s3_url, s3=small) as repo:
        repo.snapshot("vol", ext4_image)
        repo.restore("vol", "latest~1", tmp_path / "s.img")
        assert repo.store.node_cache is not None and repo.store.node_cache.size() == 0
    assert (tmp_path / "s.img").read_bytes() == (tmp_path / "d.img").read_bytes()
    # --cache-limit 0 keeps none.
    proc = run_cli(
        "restore", s3_url, "vol", "latest", str(tmp_path / "e.img"),
        "--cache-dir", str(tmp_path / "none"), "--cache-limit", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "none").rglob(nodecache.DIRECTORY))
    # ... and empties a cache that held some.
    proc = run_cli("ls", s3_url, "vol", "latest", "/", "--cache-dir", str(tmp_path / "other"),
                   "--cache-limit", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "other").rglob(nodecache.DIRECTORY))
