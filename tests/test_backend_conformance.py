"""The backend contract (store/backend.py), held against every backend and wrapper.

Every test takes the `backend` fixture: a fresh, empty backend of each kind in
BACKEND_KINDS.  Tests that need other processes hand them the `backend_spec`, from which
open_backend() builds the same backend there.  A new backend (S3) joins by adding its
kind to BACKEND_KINDS and a branch to open_backend(); the tests stay as they are.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blocksnap.errors import (
    MissingObjectError,
    ObjectExistsError,
    StoreError,
    UsageError,
)
from blocksnap.store.backend import Capabilities, LocalBackend, ObjectInfo, ObjectStore
from blocksnap.store.retrying import RetryingBackend
from blocksnap.store.s3 import S3Backend
from tests.faults import FaultyBackend
from tests.s3server import ACCESS_KEY, REGION, S3_BUCKET, SECRET_KEY, S3Server

BACKEND_KINDS = [
    "local",
    "retrying-local",
    "faulty-local",
    "s3",
    "retrying-s3",
    "faulty-s3",
]
RACERS = 8


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Enough to open the same backend in another process (picklable)."""

    kind: str
    root: str  # a directory, or for S3 the prefix in S3_BUCKET
    endpoint: str = ""  # of the S3 server


def open_backend(spec: BackendSpec) -> ObjectStore:
    if spec.kind == "local":
        return LocalBackend(spec.root)
    if spec.kind == "retrying-local":
        return RetryingBackend(LocalBackend(spec.root), sleep=lambda _s: None)
    if spec.kind == "faulty-local":
        return FaultyBackend(LocalBackend(spec.root))  # no faults configured: faithful
    if spec.kind.endswith("s3"):
        s3 = S3Backend(
            S3_BUCKET,
            spec.root,
            endpoint_url=spec.endpoint,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
        )
        if spec.kind == "retrying-s3":
            return RetryingBackend(s3, sleep=lambda _s: None)
        if spec.kind == "faulty-s3":
            return FaultyBackend(s3)
        return s3
    raise AssertionError(f"unknown backend kind {spec.kind}")


@pytest.fixture(params=BACKEND_KINDS)
def backend_spec(request: pytest.FixtureRequest, tmp_path: Path) -> BackendSpec:
    if request.param.endswith("s3"):  # the server starts only when an S3 kind runs
        server: S3Server = request.getfixturevalue("s3_server")
        return BackendSpec(request.param, request.getfixturevalue("s3_prefix"), server.endpoint)
    root = tmp_path / "objects"
    root.mkdir()
    return BackendSpec(request.param, str(root))


@pytest.fixture
def backend(backend_spec: BackendSpec) -> Iterator[ObjectStore]:
    store = open_backend(backend_spec)
    try:
        yield store
    finally:
        store.close()


def _payload(tag: int, size: int) -> bytes:
    return bytes([tag % 251 + 1]) * size


# --- whole objects ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 3 << 20])
def test_backend_put_then_get_returns_the_object(backend: ObjectStore, size: int) -> None:
    data = _payload(7, size)
    backend.put("packs/ab/ab01", data)
    assert backend.get("packs/ab/ab01") == data
    assert backend.stat("packs/ab/ab01").size == size


def test_backend_put_replaces_an_object_whole(backend: ObjectStore) -> None:
    backend.put("config", b"old" * 1000)
    backend.put("config", b"new")
    assert backend.get("config") == b"new"
    assert backend.stat("config").size == 3


def test_backend_missing_object_is_a_missing_object_error(backend: ObjectStore) -> None:
    with pytest.raises(MissingObjectError):
        backend.get("snapshots/none")
    with pytest.raises(MissingObjectError):
        backend.get("snapshots/none", 10, 10)
    with pytest.raises(MissingObjectError):
        backend.stat("snapshots/none")
    backend.put("snapshots/file", b"x")
    with pytest.raises(MissingObjectError):  # a name below an object is no object
        backend.get("snapshots/file/below")
    with pytest.raises(MissingObjectError):  # nor is a "directory" of names
        backend.stat("snapshots")


@pytest.mark.parametrize("name", ["", "/abs", "a//b", "a/../b", "./a", "a/", "x.tmp-1"])
def test_backend_refuses_names_outside_the_contract(backend: ObjectStore, name: str) -> None:
    with pytest.raises(StoreError, match="invalid object name"):
        backend.put(name, b"x")


# --- create-if-absent -------------------------------------------------------------------


def test_backend_exclusive_put_keeps_what_exists(backend: ObjectStore) -> None:
    backend.put("snapshots/a", b"first", exclusive=True)
    with pytest.raises(ObjectExistsError):
        backend.put("snapshots/a", b"second", exclusive=True)
    assert backend.get("snapshots/a") == b"first"
    assert [o.name for o in backend.list("snapshots/")] == ["snapshots/a"]
    assert not backend.leftovers()  # the loser left no temporary behind
    backend.delete("snapshots/a")
    backend.put("snapshots/a", b"third", exclusive=True)
    assert backend.get("snapshots/a") == b"third"


def test_backend_exclusive_create_loses_to_a_put_made_meanwhile(backend: ObjectStore) -> None:
    out = backend.create("snapshots/b", exclusive=True)
    out.write(b"mine")
    backend.put("snapshots/b", b"theirs")
    with pytest.raises(ObjectExistsError):
        out.commit()
    out.abort()
    assert backend.get("snapshots/b") == b"theirs"


def _race(spec: BackendSpec, name: str, me: int, barrier: object, results: object) -> None:
    store = open_backend(spec)
    try:
        barrier.wait()  # type: ignore[attr-defined]
        try:
            store.put(name, _payload(me, 64 << 10) + me.to_bytes(4, "big"), exclusive=True)
            outcome = "won"
        except ObjectExistsError:
            outcome = "exists"
        except BaseException as exc:  # any other answer fails the test
            outcome = f"{type(exc).__name__}: {exc}"
        results.put((me, outcome))  # type: ignore[attr-defined]
    finally:
        store.close()


@pytest.mark.parametrize("round_", range(3))
def test_backend_exclusive_put_race_between_processes_has_one_winner(
    backend: ObjectStore, backend_spec: BackendSpec, round_: int
) -> None:
    if not backend.capabilities.atomic_exclusive_create:
        pytest.skip("the backend declares exclusive create as not atomic")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RACERS)
    results = ctx.Queue()
    name = f"locks/race-{round_}"
    procs = [
        ctx.Process(target=_race, args=(backend_spec, name, i, barrier, results))
        for i in range(RACERS)
    ]
    for proc in procs:
        proc.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    winners = [me for me, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert all(o in ("won", "exists") for o in outcomes.values()), outcomes
    data = backend.get(name)
    assert data == _payload(winners[0], 64 << 10) + winners[0].to_bytes(4, "big")
    assert not backend.leftovers()


# --- atomic visibility -------------------------------------------------------------------


def test_backend_object_is_invisible_until_commit(backend: ObjectStore) -> None:
    backend.put("packs/cd/old", b"old version")
    out = backend.create("packs/cd/new")
    out.write(b"a" * 1000)
    out.sync()
    out.write(b"b" * 1000)
    again = backend.create("packs/cd/old")  # a replacement, half written
    again.write(b"partial")
    with pytest.raises(MissingObjectError):
        backend.get("packs/cd/new")
    with pytest.raises(MissingObjectError):
        backend.stat("packs/cd/new")
    assert [o.name for o in backend.list("packs/")] == ["packs/cd/old"]
    assert backend.get("packs/cd/old") == b"old version"
    out.commit()
    assert backend.get("packs/cd/new") == b"a" * 1000 + b"b" * 1000
    again.abort()
    assert backend.get("packs/cd/old") == b"old version"
    assert sorted(o.name for o in backend.list("packs/")) == ["packs/cd/new", "packs/cd/old"]
    assert not backend.leftovers()


def test_backend_aborted_object_leaves_nothing(backend: ObjectStore) -> None:
    out = backend.create("packs/ef/gone")
    out.write(b"x" * 5000)
    # An unfinished write is seen as one, by the name it writes, never as an object.
    assert backend.leftovers() == backend.leftovers("packs/e") == ["packs/ef/gone"]
    assert backend.leftovers("packs/ab") == backend.leftovers("tombstones/") == []
    out.abort()
    out.abort()  # idempotent
    assert list(backend.list("")) == []
    assert not backend.leftovers()


_VERSIONS = 40


def _replace_repeatedly(spec: BackendSpec, name: str) -> None:
    """Replace name _VERSIONS times, each version of another size and fill byte, written
    in three parts with a sync between them."""
    store = open_backend(spec)
    try:
        for version in range(1, _VERSIONS + 1):
            size = (version % 7 + 1) * (256 << 10)
            data = _payload(version, size)
            if version % 2:
                store.put(name, data)
            else:
                out = store.create(name)
                third = size // 3
                out.write(data[:third])
                out.sync()
                out.write(data[third : 2 * third])
                out.sync()
                out.write(data[2 * third :])
                out.commit()
    finally:
        store.close()


def _sizes() -> set[int]:
    return {256 << 10} | {(v % 7 + 1) * (256 << 10) for v in range(1, _VERSIONS + 1)}


def test_backend_reader_never_sees_a_partial_object(
    backend: ObjectStore, backend_spec: BackendSpec
) -> None:
    """A reader here while another process replaces the object over and over: every
    read is one whole version (one fill byte, that version's size), never a mix or a
    prefix.  Each read opens the backend afresh, as a new process would (a backend may
    keep an object it read open; see the contract)."""
    name = "snapshots/moving"
    backend.put(name, _payload(0, 256 << 10))
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=_replace_repeatedly, args=(backend_spec, name))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        reader = open_backend(backend_spec)
        try:
            data = reader.get(name)
            size = reader.stat(name).size
        finally:
            reader.close()
        reads += 1
        assert data, "an empty read"
        assert data == bytes([data[0]]) * len(data), "a mix of versions"
        version = next(v for v in range(_VERSIONS + 1) if _payload(v, 1)[0] == data[0])
        assert len(data) == (256 << 10 if version == 0 else (version % 7 + 1) * (256 << 10))
        assert size in _sizes()
    writer.join(timeout=60)
    assert writer.exitcode == 0
    last = _payload(_VERSIONS, (_VERSIONS % 7 + 1) * (256 << 10))
    reader = open_backend(backend_spec)
    try:
        assert reader.get(name) == last  # read-after-write, from another process
    finally:
        reader.close()


def test_backend_read_after_write_in_one_process(backend: ObjectStore) -> None:
    for version in range(5):
        data = _payload(version, 1000 + version)
        backend.put("settings/x", data)
        assert backend.get("settings/x") == data
        assert backend.get("settings/x", 10, 5) == data[10:15]
        out = backend.create("settings/x")
        out.write(data[::-1] + b"!")
        out.commit()
        assert backend.get("settings/x") == data[::-1] + b"!"
    backend.delete("settings/x")
    with pytest.raises(MissingObjectError):
        backend.get("settings/x")


# --- ranged reads ----------------------------------------------------------------------

_SIZE = 10_000


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, None, (0, _SIZE)),
        (0, 0, (0, 0)),
        (123, 456, (123, 579)),
        (_SIZE - 10, 10, (_SIZE - 10, _SIZE)),
        (_SIZE - 10, 100, (_SIZE - 10, _SIZE)),  # past the end: fewer bytes
        (_SIZE - 10, None, (_SIZE - 10, _SIZE)),
        (_SIZE, 5, (0, 0)),  # at the end: nothing
        (_SIZE + 100, 5, (0, 0)),  # beyond it: nothing
        (_SIZE + 100, None, (0, 0)),
    ],
)
def test_backend_ranged_read(
    backend: ObjectStore, offset: int, length: int | None, expected: tuple[int, int]
) -> None:
    data = bytes(i % 253 for i in range(_SIZE))
    backend.put("packs/00/ranged", data)
    assert backend.get("packs/00/ranged", offset, length) == data[expected[0] : expected[1]]


@pytest.mark.parametrize("size", [0, 1, 4096, 3 << 20])
def test_backend_get_into_fills_a_buffer_from_the_start(backend: ObjectStore, size: int) -> None:
    """Into a buffer of the object's size, one larger, one shorter, and an empty one;
    the bytes past what was read are left as they were."""
    data = bytes(i % 253 for i in range(size))
    backend.put("packs/00/into", data)
    for room in {size, size + 100, size // 2, 0}:
        buffer = bytearray(b"\xee") * room
        read = backend.get_into("packs/00/into", memoryview(buffer))
        assert read == min(size, room)
        assert buffer[:read] == data[:read]
        assert buffer[read:] == b"\xee" * (room - read)
    with pytest.raises(MissingObjectError):
        backend.get_into("packs/00/none", memoryview(bytearray(10)))
    with pytest.raises(MissingObjectError):
        backend.get_into("packs/00/none", memoryview(bytearray(0)))


@pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, -1)])
def test_backend_negative_range_is_a_usage_error(
    backend: ObjectStore, offset: int, length: int
) -> None:
    backend.put("packs/00/ranged", b"x" * 100)
    with pytest.raises(UsageError):
        backend.get("packs/00/ranged", offset, length)


# --- listing, stat and deletes ------------------------------------------------------------


def test_backend_list_names_sizes_and_times(backend: ObjectStore) -> None:
    before = time.time()
    names = {
        "config": 10,
        "packs/ab/ab11": 100,
        "packs/ab/ab22": 200,
        "packs/cd/cd33": 300,
        "snapshots/s1": 40,
        "settings/policy-x": 50,
    }
    for name, size in names.items():
        backend.put(name, b"z" * size)
    out = backend.create("packs/ab/ab44")  # unfinished: never listed
    out.write(b"z" * 10)
    after = time.time()
    everything = {o.name: o for o in backend.list("")}
    assert {n: o.size for n, o in everything.items()} == names
    for info in everything.values():
        assert isinstance(info, ObjectInfo)
        # Filesystem clocks are coarser than time.time(): allow a little either way.
        assert before - 2 <= info.mtime <= after + 2
        assert backend.stat(info.name) == info
    assert {o.name for o in backend.list("packs/")} == {
        "packs/ab/ab11",
        "packs/ab/ab22",
        "packs/cd/cd33",
    }
    # A prefix is a plain string prefix, not a directory.
    assert {o.name for o in backend.list("packs/a")} == {"packs/ab/ab11", "packs/ab/ab22"}
    assert {o.name for o in backend.list("packs/ab/ab1")} == {"packs/ab/ab11"}
    assert {o.name for o in backend.list("s")} == {"snapshots/s1", "settings/policy-x"}
    assert list(backend.list("nothing/")) == []
    assert list(backend.list("config/")) == []
    out.abort()


def test_backend_list_after_write_and_delete(backend: ObjectStore) -> None:
    for i in range(20):
        backend.put(f"packs/{i:02x}/p{i}", b"x")
        assert f"packs/{i:02x}/p{i}" in {o.name for o in backend.list("packs/")}
    for i in range(0, 20, 2):
        backend.delete(f"packs/{i:02x}/p{i}")
        assert f"packs/{i:02x}/p{i}" not in {o.name for o in backend.list("packs/")}
    assert len(list(backend.list("packs/"))) == 10


def test_backend_delete_single_and_many_missing_ok(backend: ObjectStore) -> None:
    for i in range(6):
        backend.put(f"snapshots/d{i}", b"x")
    backend.delete("snapshots/d0")
    backend.delete("snapshots/d0")  # missing: fine
    backend.delete("snapshots/never")
    with pytest.raises(MissingObjectError):
        backend.get("snapshots/d0")
    backend.delete_many(["snapshots/d1", "snapshots/never", "snapshots/d2", "snapshots/d1"])
    backend.delete_many([])
    backend.delete_many(iter(["snapshots/d3"]))
    assert sorted(o.name for o in backend.list("snapshots/")) == ["snapshots/d4", "snapshots/d5"]


def test_backend_stat_follows_a_replacement(backend: ObjectStore) -> None:
    backend.put("settings/s", b"12345")
    first = backend.stat("settings/s")
    assert (first.name, first.size) == ("settings/s", 5)
    backend.put("settings/s", b"1")
    assert backend.stat("settings/s").size == 1
    backend.delete("settings/s")
    with pytest.raises(MissingObjectError):
        backend.stat("settings/s")


# --- capabilities and close ----------------------------------------------------------------


def test_backend_declares_capabilities(backend: ObjectStore) -> None:
    caps = backend.capabilities
    assert isinstance(caps, Capabilities)
    assert caps.min_part_size >= 1 and caps.max_parallelism >= 1
    assert isinstance(caps.atomic_exclusive_create, bool) and isinstance(caps.local, bool)


def test_backend_close_is_idempotent(backend_spec: BackendSpec) -> None:
    store = open_backend(backend_spec)
    store.put("packs/11/x", b"data")
    assert store.get("packs/11/x") == b"data"
    store.close()
    store.close()


def test_backend_discard_partial_keeps_the_object(backend: ObjectStore) -> None:
    """What a killed write of a name left beside it goes; the object stays."""
    out = backend.create("tombstones/t1")
    out.write(b"never finished")
    backend.put("tombstones/t1", b"the object")
    assert backend.leftovers("tombstones/") == ["tombstones/t1"]
    backend.discard_partial("tombstones/t1")
    backend.discard_partial("tombstones/none")  # nothing there: no error
    assert backend.leftovers() == []
    assert backend.get("tombstones/t1") == b"the object"


def test_local_reads_in_threads_never_see_another_objects_bytes(tmp_path: Path) -> None:
    """With one descriptor kept open, every read evicts another thread's: a descriptor
    closed under a read could be reused for another file and give its bytes."""
    backend = LocalBackend(str(tmp_path), fd_cache_size=1)
    names = [f"packs/{i:02x}/{i:02x}" for i in range(16)]
    for i, name in enumerate(names):
        backend.put(name, bytes([i]) * 65536)
    wrong: list[str] = []

    def read(worker: int) -> None:
        for round_ in range(300):
            i = (worker * 7 + round_) % len(names)
            try:
                if backend.get(names[i]) != bytes([i]) * 65536:
                    wrong.append(f"{names[i]}: another object's bytes")
            except Exception as exc:  # a descriptor closed under the read
                wrong.append(f"{names[i]}: {exc}")

    threads = [threading.Thread(target=read, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.close()
    assert wrong == []
