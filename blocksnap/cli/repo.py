"""The REPO argument every command takes, with its object-storage options, and opening it."""

from __future__ import annotations

import argparse
import functools

from blocksnap.cli.output import parse_size
from blocksnap.repository import Repository
from blocksnap.store.location import S3Options


def add_repository(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="REPO", help="a directory, or s3://BUCKET/PREFIX")
    s3 = p.add_argument_group("object storage (an s3:// REPO)")
    s3.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="the S3 endpoint (default: AWS_ENDPOINT_URL, else AWS); credentials come "
        "from the AWS environment or profile, never from the command line",
    )
    s3.add_argument("--s3-region", metavar="NAME", help="the region (default: AWS_REGION)")
    s3.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where this host keeps its caches of S3 repositories (default: "
        "BLOCKSNAP_CACHE_DIR, else ~/.cache/blocksnap)",
    )
    s3.add_argument(
        "--cache-limit",
        metavar="SIZE",
        type=functools.partial(parse_size, allow_zero=True),
        help="the map nodes fetched that this host's cache of the repository keeps, at "
        "most (default 256M; 0 keeps none)",
    )


def s3_options(args: argparse.Namespace) -> S3Options:
    return S3Options(
        endpoint_url=args.s3_endpoint,
        region=args.s3_region,
        cache_dir=args.cache_dir,
        cache_limit=args.cache_limit,
    )


def open_repository(args: argparse.Namespace) -> Repository:
    return Repository(args.repo, s3=s3_options(args))
