"""blocksnap on S3 (a real SeaweedFS on loopback) beside bare transfers of the same bytes
with the same client (boto3, 8 threads, 8 MiB requests) in the same run.

- A full snapshot to S3 against a bare parallel upload of the bytes it stores, and
  against the same snapshot into a local repository.
- A full restore from S3 (this host's cache holds the index, no data) against a bare
  parallel ranged download of the same packs, and against a restore from a local
  repository.
- One file of about 1 MiB out of the snapshot, page cache dropped, with the GETs counted
  (extra_info): on a host whose cache holds the index, and on a host with an empty cache.
- The requests of an incremental, by operation, next to the parts of new data it stores.

Every pair shares extra_info["bytes"], so the report's ratio of throughputs is the ratio
of times.  Client and server share this machine's two cores.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from benchmarks.bench_files import WANT_SIZE
from benchmarks.bench_lifecycle import drop_caches
from benchmarks.conftest import ImageFactory
from blocksnap.extract import extract
from blocksnap.store.location import S3Options
from blocksnap.store.s3 import DEFAULT_PARALLELISM, DEFAULT_PART_SIZE, S3Backend
from tests.s3server import S3_BUCKET, S3Server, seaweed

IMAGE_MB = int(
    os.environ.get("BLOCKSNAP_BENCH_S3_MB", os.environ.get("BLOCKSNAP_BENCH_IMAGE_MB", "64"))
)
CHUNK = DEFAULT_PART_SIZE  # bytes per request of the bare transfers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS of this module's own, its credentials in the environment."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    with seaweed(tmp_path_factory.mktemp("bench-s3")) as running:
        os.environ["AWS_ACCESS_KEY_ID"] = running.access_key
        os.environ["AWS_SECRET_ACCESS_KEY"] = running.secret_key
        client = running.client()
        client.create_bucket(Bucket=S3_BUCKET)
        client.close()
        try:
            yield running
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class Stored:
    """The benchmark image's full snapshot on S3, its packs, and the file nearest 1 MiB."""

    def __init__(self, server: S3Server, root: Path, image: Path) -> None:
        self.server, self.root, self.image = server, root, image
        self.url = f"s3://{S3_BUCKET}/full"
        with blocksnap.Repository.init(self.url, s3=self.options("host")) as repo:
            repo.snapshot("vol", image)
            with repo.open_filesystem("vol") as fs:
                best = min(fs.find("blob*.bin", "/data"), key=lambda s: abs(s.size - WANT_SIZE))
        self.file, self.file_size = best.path, best.size
        backend = server.backend("full")
        self.packs = [(i.name, i.size) for i in backend.list("packs/")]
        backend.close()
        self.packed = sum(size for _, size in self.packs)

    def options(self, host: str) -> S3Options:
        return S3Options(endpoint_url=self.server.endpoint, cache_dir=str(self.root / host))


@pytest.fixture(scope="module")
def stored(
    server: S3Server, images: ImageFactory, tmp_path_factory: pytest.TempPathFactory
) -> Stored:
    return Stored(server, tmp_path_factory.mktemp("s3-hosts"), images(IMAGE_MB)[0])


def _chunks(packs: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    return [
        (name, offset, min(CHUNK, size - offset))
        for name, size in packs
        for offset in range(0, size, CHUNK)
    ]


def test_baseline_s3_parallel_upload(benchmark: Any, server: S3Server, stored: Stored) -> None:
    """PutObject of the snapshot's packed bytes in 8 MiB objects, 8 at a time."""
    backend = server.backend("full")
    data = {name: backend.get(name) for name, _ in stored.packs}
    backend.close()
    client = server.client(max_pool_connections=DEFAULT_PARALLELISM + 4)
    rounds = itertools.count()

    def run() -> None:
        round_ = next(rounds)

        def put(chunk: tuple[str, int, int]) -> None:
            name, offset, length = chunk
            body = data[name][offset : offset + length]
            client.put_object(Bucket=S3_BUCKET, Key=f"bare{round_}/{name}/{offset}", Body=body)

        with ThreadPoolExecutor(DEFAULT_PARALLELISM) as pool:
            list(pool.map(put, _chunks(stored.packs)))

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["bytes"] = stored.packed
    client.close()


def _time_full_snapshots(
    benchmark: Any, stored: Stored, new_repository: Callable[[int], blocksnap.Repository]
) -> None:
    """The image's full snapshot into the fresh repository new_repository(round) makes,
    each of 3 rounds."""
    rounds = itertools.count()

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        return (new_repository(next(rounds)),), {}

    def run(repo: blocksnap.Repository) -> None:
        repo.snapshot("vol", stored.image)
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=3)
    benchmark.extra_info["bytes"] = stored.packed


def _time_full_restores(
    benchmark: Any,
    stored: Stored,
    target: Path,
    open_repository: Callable[[], blocksnap.Repository],
) -> None:
    """Restore of the whole image to a new file target from the repository that
    open_repository opens, 3 rounds, checked byte-identical."""

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        target.unlink(missing_ok=True)
        return (), {}

    def run() -> None:
        with open_repository() as repo:
            repo.restore("vol", "latest", target)

    benchmark.pedantic(run, setup=setup, rounds=3)
    benchmark.extra_info["bytes"] = stored.packed
    assert target.read_bytes() == stored.image.read_bytes()


def test_s3_full_snapshot(benchmark: Any, stored: Stored) -> None:
    """The same image's full snapshot into a fresh repository on S3, each round."""
    _time_full_snapshots(
        benchmark,
        stored,
        lambda n: blocksnap.Repository.init(
            f"s3://{S3_BUCKET}/snap{n}", s3=stored.options(f"snap{n}")
        ),
    )


def test_baseline_local_full_snapshot(benchmark: Any, stored: Stored, tmp_path: Path) -> None:
    """The same image's full snapshot into a fresh local repository, each round: what the
    snapshot costs without S3 (the same compression and hashing on the same cores)."""
    _time_full_snapshots(
        benchmark, stored, lambda n: blocksnap.Repository.init(tmp_path / f"local{n}")
    )


def test_baseline_local_full_restore(benchmark: Any, stored: Stored, tmp_path: Path) -> None:
    """Restore of the whole image from a local repository of it to a file: what the
    restore costs without S3 (decompression, checks and writes)."""
    with blocksnap.Repository.init(tmp_path / "local") as repo:
        repo.snapshot("vol", stored.image)
    _time_full_restores(
        benchmark,
        stored,
        tmp_path / "restored.img",
        lambda: blocksnap.Repository(tmp_path / "local"),
    )


def test_baseline_s3_ranged_download(benchmark: Any, server: S3Server, stored: Stored) -> None:
    """Ranged GETs of 8 MiB over every pack, 8 at a time."""
    client = server.client(max_pool_connections=DEFAULT_PARALLELISM + 4)

    def get(chunk: tuple[str, int, int]) -> int:
        name, offset, length = chunk
        answer = client.get_object(
            Bucket=S3_BUCKET, Key=f"full/{name}", Range=f"bytes={offset}-{offset + length - 1}"
        )
        return len(answer["Body"].read())

    def run() -> None:
        with ThreadPoolExecutor(DEFAULT_PARALLELISM) as pool:
            assert sum(pool.map(get, _chunks(stored.packs))) == stored.packed

    benchmark.pedantic(run, rounds=3)
    benchmark.extra_info["bytes"] = stored.packed
    client.close()


def test_s3_full_restore(benchmark: Any, stored: Stored, tmp_path: Path) -> None:
    """Restore of the whole image from S3 to a file; this host's cache holds the index."""
    _time_full_restores(
        benchmark,
        stored,
        tmp_path / "restored.img",
        lambda: blocksnap.Repository(stored.url, s3=stored.options("host")),
    )


@pytest.mark.parametrize("cache", ["index", "empty"])
def test_s3_one_file_cold(benchmark: Any, stored: Stored, tmp_path: Path, cache: str) -> None:
    """One file of about 1 MiB, page cache dropped; "index": this host's cache holds the
    index (as on any host that backs up or synced); "empty": a host that never opened the
    repository, which first indexes every pack from its table of contents."""
    rounds = itertools.count()
    requests: Counter[str] = Counter()

    def setup() -> tuple[tuple[Path, str], dict[str, Any]]:
        round_ = next(rounds)
        host = "host" if cache == "index" else f"empty{round_}"
        if cache == "empty":
            shutil.rmtree(stored.root / host, ignore_errors=True)
        drop_caches()
        return (tmp_path / f"out{round_}", host), {}

    def run(out: Path, host: str) -> None:
        with blocksnap.Repository(stored.url, s3=stored.options(host)) as repo:
            with repo.open_filesystem("vol") as fs:
                report = extract(fs, [stored.file], str(out))
            backend = repo.store.backend
            assert isinstance(backend, S3Backend)
            requests.clear()
            requests.update(backend.requests)
        assert report.files == 1

    benchmark.pedantic(run, setup=setup, rounds=3)
    benchmark.extra_info["bytes"] = stored.file_size
    benchmark.extra_info["requests"] = dict(requests)
    benchmark.extra_info["gets"] = requests["GetObject"]
    benchmark.extra_info["packs"] = len(stored.packs)


def test_s3_incremental_requests(
    benchmark: Any, server: S3Server, images: ImageFactory, stored: Stored
) -> None:
    """An incremental of the changed image: its requests by operation, and the parts of
    new data it stored; about one PUT per part plus a small constant is the target."""
    _, changed = images(IMAGE_MB)
    rounds = itertools.count()
    counted: dict[str, Any] = {}

    def setup() -> tuple[tuple[blocksnap.Repository], dict[str, Any]]:
        round_ = next(rounds)
        url = f"s3://{S3_BUCKET}/inc{round_}"
        repo = blocksnap.Repository.init(url, s3=stored.options(f"inc{round_}"))
        repo.snapshot("vol", stored.image)
        repo.close()
        return (blocksnap.Repository(url, s3=stored.options(f"inc{round_}")),), {}

    def run(repo: blocksnap.Repository) -> None:
        backend = repo.store.backend
        assert isinstance(backend, S3Backend)
        before = Counter(backend.requests)
        info = repo.snapshot("vol", changed)
        counted["requests"] = dict(Counter(backend.requests) - before)
        counted["stored_size"] = info.stored_size
        repo.close()

    benchmark.pedantic(run, setup=setup, rounds=3)
    requests = counted["requests"]
    parts = -(-counted["stored_size"] // DEFAULT_PART_SIZE)
    writes = requests.get("PutObject", 0) + requests.get("UploadPart", 0)
    benchmark.extra_info.update(
        bytes=changed.stat().st_size,
        requests=requests,
        parts_of_new_data=parts,
        writes=writes,
        total=sum(requests.values()),
    )
    # One write per part of new data, plus the record, the packs' last parts (block and
    # node pack) and the session's heartbeats: a constant, whatever the image's size.
    assert writes <= parts + 12, requests
