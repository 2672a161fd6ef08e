"""The S3 backend: the object-store contract (store/backend.py) kept on an S3 bucket.

Objects live under PREFIX/ in one bucket; the object name is the rest of the key.  What
the contract needs and where it comes from:

- Atomic visibility: S3 makes a PutObject or a CompleteMultipartUpload visible whole, or
  not at all; the parts of an unfinished multipart upload are never listed or read.
- Read-after-write and list-after-write: AWS S3 has been strongly consistent for every
  request since December 2020; SeaweedFS serves every request from its filer, which is
  consistent as well.  No cache in this module weakens that.
- Create-if-absent: a conditional write, `If-None-Match: *`, on PutObject and on
  CompleteMultipartUpload: the server answers 412 if the key exists and stores nothing.
  AWS S3 has honoured it since August 2024 (PutObject) and November 2024 (multipart);
  SeaweedFS 4.48 honours both, atomically, with exactly one winner under races (the
  conformance suite races eight processes).  A server that ignored the header would
  break create-if-absent; the capability probe of `init` (issue 17) is the guard.
- Durability: an object is durable when the server acknowledges it (AWS); SeaweedFS does
  not fsync unless its filer is configured to (`fs.configure -fsync`).  sync() of a
  writer sends the full parts it holds on their way and is otherwise a no-op: nothing of
  an object is durable before commit() (Capabilities.sync_durable says so).

A writer (create) uploads with a multipart upload started at once, so that a writer that
dies is seen by leftovers() (incomplete uploads under the prefix) and its parts are
reclaimed by a delete of its name; parts are part_size bytes (at least S3's 5 MiB
minimum) but the last.  An object that never filled one part goes up as one PutObject.
Full parts go up in the background, on a pool of max_parallelism threads that every
writer of the backend shares, at most PARTS_IN_FLIGHT per writer (what that holds in
memory is part_size each); commit() waits for them all before it completes the upload.

Errors: botocore retries throttling, 5xx and broken connections itself (standard mode,
RETRY_ATTEMPTS in all, or AWS_MAX_ATTEMPTS); what still fails is mapped once, here, to
the typed errors: absent -> MissingObjectError, 412 -> ObjectExistsError, 5xx /
SlowDown / timeouts / connection resets -> TransientStoreError, 403 / unknown bucket ->
StoreError naming the bucket.  One boto3 client is shared by every thread (boto3
clients are thread-safe).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

from blocksnap.errors import (
    BlocksnapError,
    MissingObjectError,
    ObjectExistsError,
    StoreError,
    TransientStoreError,
)
from blocksnap.store.backend import Capabilities, ObjectInfo, check_name, check_range, fill

T = TypeVar("T")

MIN_PART_SIZE = 5 << 20  # bytes: S3's smallest part but the last
DEFAULT_PART_SIZE = 8 << 20  # bytes
PARTS_IN_FLIGHT = 4  # per writer: parts uploading at once (benchmarks/bench_s3.py)
DELETE_BATCH_COUNT = 1000  # keys per DeleteObjects: S3's limit
DEFAULT_PARALLELISM = 8
RETRY_ATTEMPTS = 5  # botocore's attempts in all, first included (backoff up to 20 s)
CONNECT_TIMEOUT = 10.0  # seconds
READ_TIMEOUT = 60.0  # seconds: a 8 MiB part on a slow link still fits
ABORT_WAIT = 5.0  # seconds an aborting writer waits for its parts in flight, in all

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId"}
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
        "503",
        "500",
    }
)


class S3Backend:
    """Objects as keys PREFIX/NAME in an S3 bucket (see the module doc for the contract).

    endpoint_url, access_key, secret_key and region fall back to the AWS environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or
    AWS_DEFAULT_REGION, and the usual profile), as boto3 reads it.  Opening checks that
    the bucket exists and these credentials may use it, so that a wrong bucket or key is
    one clear error here rather than a "missing object" later.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_parallelism: int = DEFAULT_PARALLELISM,
        retry_attempts: int | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        prefix = prefix.strip("/")
        if prefix:
            check_name(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self._root = f"{prefix}/" if prefix else ""
        self.part_size = part_size
        self._max_parallelism = max_parallelism
        self._part_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._capabilities = Capabilities(
            min_part_size=MIN_PART_SIZE,
            max_parallelism=max_parallelism,
            atomic_exclusive_create=True,
            local=False,
            sync_durable=False,
        )
        region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1"
        )
        config = Config(
            region_name=region,
            retries={"mode": "standard", "total_max_attempts": _attempts(retry_attempts)},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            # Each worker thread holds a connection; a few more for list and delete.
            max_pool_connections=max_parallelism + 4,
        )
        try:
            # A session of its own: boto3's default session is not thread-safe.
            session = boto3.session.Session()
            self._client: Any = session.client(
                "s3",
                endpoint_url=endpoint_url,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise StoreError(f"cannot open S3 bucket {bucket}: {exc}") from exc
        # Operation name -> HTTP requests sent (botocore's retries included): what a
        # command costs on a metered store, and what tests count.
        self.requests: Counter[str] = Counter()
        self._requests_lock = threading.Lock()
        self._client.meta.events.register("before-send.s3", self._count)
        self._call("opening", "", lambda: self._client.head_bucket(Bucket=bucket))

    def _count(self, *, event_name: str, **_kwargs: object) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._requests_lock:
            self.requests[operation] += 1

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def key(self, name: str) -> str:
        """The bucket key of an object name."""
        check_name(name)
        return self._root + name

    def _call(self, action: str, name: str, fn: Callable[[], T]) -> T:
        """fn() with botocore's errors turned into the typed ones (see the module doc)."""
        try:
            return fn()
        except Exception as exc:
            raise self._error(action, name, exc) from exc

    def _error(self, action: str, name: str, exc: Exception) -> BlocksnapError:
        where = f"{name} in bucket {self.bucket}" if name else f"bucket {self.bucket}"
        if isinstance(exc, BlocksnapError):
            return exc
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code == "NoSuchBucket" or (not name and status == 404):
                return StoreError(f"S3 bucket {self.bucket} does not exist")
            if code in _MISSING_CODES or status == 404:
                return MissingObjectError(f"object {name} is missing from the repository")
            if code == "RequestTimeTooSkewed":  # a retry will not mend it
                return StoreError(
                    f"S3 bucket {self.bucket} refused the request: this host's clock is off"
                )
            if code == "PreconditionFailed" or status == 412:
                return ObjectExistsError(f"object {name} exists already")
            if code in _DENIED_CODES or status == 403:
                return StoreError(
                    f"access denied to S3 bucket {self.bucket} while {action} ({code})"
                )
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientStoreError(f"{action} {where} failed for now: {code}")
            message = error.get("Message") or code
            return StoreError(f"S3 error while {action} {where}: {message}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return StoreError(
                f"no S3 credentials for bucket {self.bucket}: "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
            )
        if isinstance(
            exc,
            (
                botocore.exceptions.ConnectionError,  # refused, reset, connect timeout
                botocore.exceptions.HTTPClientError,  # read timeout, broken stream
                botocore.exceptions.IncompleteReadError,  # a body cut short
                ConnectionError,
                TimeoutError,
            ),
        ):
            return TransientStoreError(f"{action} {where} failed for now: {exc}")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return StoreError(f"S3 error while {action} {where}: {exc}")
        raise exc  # a programming error, not storage: let it show

    # --- whole objects --------------------------------------------------------------------

    def create(self, name: str, *, exclusive: bool = False) -> _S3Writer:
        return _S3Writer(self, name, exclusive)

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False
    ) -> None:
        key = self.key(name)
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        body = bytes(data)
        try:
            self._call(
                "writing",
                name,
                lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra),
            )
        except ObjectExistsError as exc:
            # botocore retried: the 412 may answer our own earlier attempt, whose reply was
            # lost.  The object holding exactly these bytes means that attempt won.
            if _retried(exc) and self._holds(name, body):
                return
            raise

    def _holds(self, name: str, data: bytes) -> bool:
        try:
            return self.get(name) == data
        except MissingObjectError:
            return False

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        key = self.key(name)
        if length == 0:
            self.stat(name)  # nothing to read, but a missing object is still missing
            return b""
        end = "" if length is None else str(offset + length - 1)
        extra = {"Range": f"bytes={offset}-{end}"} if offset or length is not None else {}

        def read() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=key, **extra)
            data: bytes = response["Body"].read()
            return data

        return self._read(name, read, b"")

    def get_into(self, name: str, buffer: memoryview) -> int:
        if not len(buffer):
            self.stat(name)  # nothing to read, but a missing object is still missing
            return 0
        key = self.key(name)

        def read() -> int:
            response = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes=0-{len(buffer) - 1}"
            )
            body = response["Body"]
            return fill(buffer, lambda rest, _offset: int(body.readinto(rest) or 0))

        return self._read(name, read, 0)

    def _read(self, name: str, read: Callable[[], T], past_end: T) -> T:
        """read()'s result, or past_end when the range starts at or past the object's end
        (S3 answers InvalidRange: the object exists)."""
        try:
            return self._call("reading", name, read)
        except (StoreError, MissingObjectError) as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, botocore.exceptions.ClientError)
                and cause.response.get("Error", {}).get("Code") == "InvalidRange"
            ):
                return past_end
            raise

    def stat(self, name: str) -> ObjectInfo:
        key = self.key(name)
        head = self._call(
            "looking up", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key)
        )
        return ObjectInfo(name, int(head["ContentLength"]), head["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._root + prefix)
        skip = len(self._root)
        iterator = iter(pages)
        while True:
            page = self._call("listing", prefix or "the repository", lambda: next(iterator, None))
            if page is None:
                return
            for entry in page.get("Contents", ()):
                name = entry["Key"][skip:]
                if name.endswith("/"):
                    continue  # a "directory" marker some servers keep: no object
                yield ObjectInfo(name, int(entry["Size"]), entry["LastModified"].timestamp())

    # --- deletes ----------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        self.delete_many([name])

    def delete_many(self, names: Iterable[str]) -> None:
        keys = sorted({self.key(name) for name in names})
        if not keys:
            return
        # "Any unfinished write of it": a dead writer's upload of the name goes too.
        wanted = set(keys)
        for key, upload_id in self._uploads(keys[0] if len(keys) == 1 else ""):
            if key in wanted:
                self._abort(key, upload_id)
        for start in range(0, len(keys), DELETE_BATCH_COUNT):
            self._delete_batch(keys[start : start + DELETE_BATCH_COUNT])

    def _delete_batch(self, keys: builtins.list[str]) -> None:
        request = {"Objects": [{"Key": key} for key in keys], "Quiet": True}
        response = self._call(
            "deleting",
            keys[0][len(self._root) :],
            lambda: self._client.delete_objects(Bucket=self.bucket, Delete=request),
        )
        for error in response.get("Errors", ()):
            code = str(error.get("Code", ""))
            if code in _MISSING_CODES:
                continue  # a missing name is not an error
            victim = str(error.get("Key", ""))[len(self._root) :]
            if code in _TRANSIENT_CODES:
                raise TransientStoreError(f"deleting {victim} failed for now: {code}")
            raise StoreError(
                f"S3 error while deleting {victim} in bucket {self.bucket}: "
                f"{error.get('Message') or code}"
            )

    # --- unfinished uploads -----------------------------------------------------------------

    def _uploads(self, prefix_key: str) -> Iterator[tuple[str, str]]:
        """(key, upload id) of every incomplete multipart upload whose key starts with
        prefix_key (under this backend's root)."""
        paginator = self._client.get_paginator("list_multipart_uploads")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=prefix_key or self._root))
        while True:
            try:
                page = self._call("listing uploads", "uploads", lambda: next(pages, None))
            except MissingObjectError:
                # rclone serve s3 (1.75) answers NoSuchUpload (404) when there are none.
                return
            if page is None:
                return
            for upload in page.get("Uploads", ()):
                yield str(upload["Key"]), str(upload["UploadId"])

    def _abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(MissingObjectError):  # NoSuchUpload: finished or gone
            self._call(
                "aborting",
                key[len(self._root) :],
                lambda: self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                ),
            )

    def leftovers(self, prefix: str = "") -> builtins.list[str]:
        """The names of incomplete multipart uploads under the prefix (writers that died,
        or are still writing)."""
        return sorted({key[len(self._root) :] for key, _ in self._uploads(self._root + prefix)})

    def discard_partial(self, name: str) -> None:
        key = self.key(name)
        for found, upload_id in builtins.list(self._uploads(key)):
            if found == key:
                self._abort(found, upload_id)

    def _part_threads(self) -> ThreadPoolExecutor:
        """The threads that upload writers' parts, started on first use."""
        with self._pool_lock:
            if self._part_pool is None:
                self._part_pool = ThreadPoolExecutor(
                    self._max_parallelism, thread_name_prefix="blocksnap-s3-part"
                )
            return self._part_pool

    def close(self) -> None:
        """Release the pooled connections and part threads.  Idempotent; like the local
        backend, which reopens its files, a later call opens new connections and threads
        (a Repository hands one backend to the rebuild of its index and then to its own
        store).  A writer still uploading parts is the caller's to commit or abort first;
        the parts of an aborted one that are still on their way finish on their threads,
        which close does not wait for (see _S3Writer.abort)."""
        with self._pool_lock:
            pool, self._part_pool = self._part_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _attempts(given: int | None) -> int:
    """Attempts in all per request: given, else AWS_MAX_ATTEMPTS (as the AWS tools read
    it), else RETRY_ATTEMPTS."""
    if given is not None:
        return given
    raw = os.environ.get("AWS_MAX_ATTEMPTS")
    if raw is None:
        return RETRY_ATTEMPTS
    try:
        attempts = int(raw)
    except ValueError:
        raise StoreError(f"AWS_MAX_ATTEMPTS={raw!r} is not a number") from None
    if attempts < 1:
        raise StoreError(f"AWS_MAX_ATTEMPTS={raw!r} is below 1")
    return attempts


def _retried(exc: BlocksnapError) -> bool:
    """Whether botocore repeated the request that ended in exc."""
    cause = exc.__cause__
    if not isinstance(cause, botocore.exceptions.ClientError):
        return False
    return int(cause.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)) > 0


def _multipart_etag(parts: builtins.list[dict[str, Any]]) -> str:
    """The ETag S3 gives a completed multipart object: the MD5 of the parts' MD5s, "-N"."""
    digests = b"".join(bytes.fromhex(str(part["ETag"]).strip('"')) for part in parts)
    return f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'


class _S3Writer:
    """An object written as a multipart upload, completed by commit().  Full parts go up
    in the background as they fill (at most PARTS_IN_FLIGHT at once); what is left goes
    up as the last part on commit, or, if no part was ever sent, as one PutObject (and
    the upload is aborted).  A part that failed fails the next write, sync or commit."""

    def __init__(self, backend: S3Backend, name: str, exclusive: bool) -> None:
        self._backend = backend
        self.name = name
        self._key = backend.key(name)
        self._exclusive = exclusive
        self._buffer = bytearray()
        self._parts: list[dict[str, Any]] = []  # of the parts uploaded, in order
        self._in_flight: deque[Future[dict[str, Any]]] = deque()
        self._numbered = 0  # parts handed to the pool
        client = backend._client
        started = backend._call(
            "writing",
            name,
            lambda: client.create_multipart_upload(Bucket=backend.bucket, Key=self._key),
        )
        self._upload_id: str | None = str(started["UploadId"])

    def _check(self) -> str:
        if self._upload_id is None:
            raise StoreError(f"object {self.name} is no longer being written")
        return self._upload_id

    def _send_part(self, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        """On a pool thread: one part, with botocore's retries."""
        client = self._backend._client
        response = self._backend._call(
            "writing",
            self.name,
            lambda: client.upload_part(
                Bucket=self._backend.bucket,
                Key=self._key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
            ),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _upload(self, data: bytes) -> None:
        upload_id = self._check()
        try:
            pool = self._backend._part_threads()
            future = pool.submit(self._send_part, upload_id, self._numbered + 1, data)
        except BaseException:  # a part not on its way must never leave a gap: abort
            self.abort()
            raise
        self._numbered += 1
        self._in_flight.append(future)
        self._settle(PARTS_IN_FLIGHT - 1)

    def _settle(self, keep: int) -> None:
        """Wait until at most keep parts are in flight; a failed part aborts the upload.
        A part stays in flight until its answer is in, so that an abort waits for it."""
        while len(self._in_flight) > keep:
            future = self._in_flight[0]
            try:
                part = future.result()
            except BaseException:
                self.abort()
                raise
            self._in_flight.popleft()
            self._parts.append(part)

    def _send_full_parts(self) -> None:
        size = self._backend.part_size
        while len(self._buffer) >= size:
            part = bytes(self._buffer[:size])
            del self._buffer[:size]
            self._upload(part)
        # A part that failed meanwhile fails this call, not only the commit.
        while self._in_flight and self._in_flight[0].done():
            self._settle(len(self._in_flight) - 1)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        self._buffer += data
        self._send_full_parts()

    def sync(self) -> None:
        """Full parts are on their way already; less than a part waits for commit."""
        self._check()
        self._send_full_parts()

    def commit(self) -> None:
        upload_id = self._check()
        backend = self._backend
        if not self._numbered:
            data = bytes(self._buffer)
            try:
                backend.put(self.name, data, exclusive=self._exclusive)
            finally:
                self.abort()
            return
        if self._buffer:
            self._upload(bytes(self._buffer))
            self._buffer.clear()
        self._settle(0)
        if [int(part["PartNumber"]) for part in self._parts] != list(range(1, self._numbered + 1)):
            self.abort()  # never an object with a part missing
            raise StoreError(f"object {self.name}: a part of its upload is missing")
        extra = {"IfNoneMatch": "*"} if self._exclusive else {}
        parts = {"Parts": self._parts}
        try:
            backend._call(
                "writing",
                self.name,
                lambda: backend._client.complete_multipart_upload(
                    Bucket=backend.bucket,
                    Key=self._key,
                    UploadId=upload_id,
                    MultipartUpload=parts,
                    **extra,
                ),
            )
        except (StoreError, MissingObjectError) as exc:
            self.abort()  # a refused complete (412) leaves the upload open on the server
            # botocore retried: a 412 (or a vanished upload) may answer our own earlier
            # attempt whose reply was lost; the object's ETag says whether it is ours.
            if _retried(exc) and isinstance(exc, (ObjectExistsError, MissingObjectError)):
                with contextlib.suppress(StoreError):
                    head = backend._client.head_object(Bucket=backend.bucket, Key=self._key)
                    if head.get("ETag") == _multipart_etag(self._parts):
                        return
            raise
        self._upload_id = None

    def abort(self) -> None:
        """Give the upload up.  Parts still uploading would land after the abort and keep
        the upload alive, so it waits for them, but at most ABORT_WAIT seconds in all (a
        stalled server would hold a part for its retries and timeouts, minutes); a part
        still on its way then aborts the upload again when its answer is in."""
        upload_id, self._upload_id = self._upload_id, None
        self._buffer = bytearray()
        in_flight, self._in_flight = self._in_flight, deque()
        deadline = time.monotonic() + ABORT_WAIT
        late: list[Future[dict[str, Any]]] = []
        for future in in_flight:
            if future.cancel():
                continue
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                late.append(future)
            except BaseException:  # the part failed: moot, as the upload is given up
                continue
        if upload_id is None:
            return
        # An abort that fails leaves an upload that leftovers() reports and a delete of
        # the name (gc, for a dead writer's intent) reclaims: never an object.
        with contextlib.suppress(StoreError):
            self._backend._abort(self._key, upload_id)
        for future in late:
            future.add_done_callback(lambda _done: self._abort_late(upload_id))

    def _abort_late(self, upload_id: str) -> None:
        """The abort again, on the thread of a part that answered after the first: any
        failure stays here (concurrent.futures would print it with a traceback), and what
        it leaves is reclaimed as above."""
        with contextlib.suppress(Exception):
            self._backend._abort(self._key, upload_id)
