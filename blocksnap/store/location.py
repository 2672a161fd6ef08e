"""Where a repository is: a local directory, or s3://BUCKET/PREFIX with a cache on this host.

A repository is named by a path or by a URL `s3://BUCKET/PREFIX` (the prefix may be
empty).  The URL names nothing else: the endpoint, region and credentials come from
S3Options, or else the usual AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE and the shared config files, as boto3
reads them), so that no secret ever appears in a command line or a log.

A repository on S3 keeps its objects in the bucket and, on each host, a cache directory:
the LMDB index (a cache of the objects, rebuilt from the bucket when it is missing or
belongs to another repository) and the host-local state (store/__init__.py).  The cache
directory is CACHE_ROOT/<key>, key the first 32 hex digits of BLAKE3 over the endpoint,
bucket and prefix, and CACHE_ROOT is S3Options.cache_dir, else BLOCKSNAP_CACHE_DIR, else
$XDG_CACHE_HOME/blocksnap, else ~/.cache/blocksnap.  Deleting a cache directory loses
nothing but this host's work in progress.  A cache holds a file named repository with
the id of the repository it caches; one that caches another repository (the URL was
re-initialised) is emptied and rebuilt.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from blocksnap.errors import StoreError, UsageError
from blocksnap.store.backend import ObjectStore, check_name
from blocksnap.store.config import read_config

if TYPE_CHECKING:
    from blocksnap.store.s3 import S3Backend

SCHEME = "s3://"
CACHE_MARKER = "repository"  # in a cache directory: the id of the repository it caches


@dataclass(frozen=True, slots=True)
class S3Options:
    """How to reach a bucket; None falls back to the AWS environment (see the module doc)."""

    endpoint_url: str | None = None
    region: str | None = None
    cache_dir: str | None = None  # the root of this host's cache directories
    cache_limit: int | None = None  # bytes of fetched map nodes kept (store/nodecache.py)


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


def is_url(name: str) -> bool:
    return name.startswith(SCHEME)


def parse(url: str) -> S3Location:
    """The bucket and prefix of s3://BUCKET[/PREFIX] (UsageError if it is not one)."""
    if not is_url(url):
        raise UsageError(f"{url!r} is not an s3:// URL")
    rest = url[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or "@" in bucket or ":" in bucket:
        raise UsageError(
            f"{url!r} does not name a bucket as s3://BUCKET/PREFIX (credentials and "
            "endpoints go in options or the environment, never in the URL)"
        )
    if prefix:
        try:
            check_name(prefix)
        except Exception:
            raise UsageError(f"{url!r}: the prefix {prefix!r} is not a valid object name") from None
    return S3Location(bucket, prefix)


def cache_root(options: S3Options) -> str:
    if options.cache_dir:
        return options.cache_dir
    if env := os.environ.get("BLOCKSNAP_CACHE_DIR"):
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blocksnap")


def endpoint(options: S3Options) -> str | None:
    return options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def cache_path(location: S3Location, options: S3Options) -> str:
    """This host's cache directory for the repository at location."""
    key = blake3.blake3(
        "\0".join((endpoint(options) or "", location.bucket, location.prefix)).encode()
    ).hexdigest()[:32]
    return os.path.join(cache_root(options), key)


def discard_cache(path: str) -> None:
    """Remove a cache directory that belongs to no repository (or another one)."""
    shutil.rmtree(path, ignore_errors=True)


def s3_backend(location: S3Location, options: S3Options) -> S3Backend:
    # Imported here: boto3 costs a local repository's commands about 20 MiB of memory
    # and most of their start-up time.
    from blocksnap.store.s3 import S3Backend

    return S3Backend(
        location.bucket, location.prefix, endpoint_url=endpoint(options), region=options.region
    )


def prepare_cache(path: str, backend: ObjectStore, where: str) -> None:
    """Make path this host's cache of the repository in backend: created if absent, and
    emptied if it caches another repository (one re-created under the same URL), so that
    its index is rebuilt from the bucket.  NotFoundError if there is no repository."""
    config = read_config(backend, where)
    marker = os.path.join(path, CACHE_MARKER)
    try:
        with open(marker, encoding="ascii") as f:
            cached = f.read().strip()
    except FileNotFoundError:
        cached = None
    except OSError as exc:
        raise StoreError(f"cannot read the cache {path}: {exc.strerror or exc}") from exc
    if cached is not None and cached != config.id:
        discard_cache(path)
        cached = None
    if cached is None:
        try:
            if os.path.exists(path) and not os.path.isfile(marker):
                discard_cache(path)  # an init or a first open that did not finish
            os.makedirs(os.path.join(path, "locks"), exist_ok=True)
            with open(marker + ".tmp", "w", encoding="ascii") as f:
                f.write(config.id + "\n")
            os.replace(marker + ".tmp", marker)
        except OSError as exc:
            raise StoreError(f"cannot create the cache {path}: {exc.strerror or exc}") from exc
