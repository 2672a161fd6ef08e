"""blocksnap init: create an empty repository."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap import blockid
from blocksnap.cli.output import emit_json, shown
from blocksnap.cli.repo import add_repository, s3_options
from blocksnap.repository import init_location
from blocksnap.store.config import DEFAULT_COMPRESSION_LEVEL


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "init", help="create a repository", description="Create an empty repository."
    )
    add_repository(p)
    p.add_argument(
        "--block-id",
        choices=sorted(blockid.ALGORITHMS),
        default=blockid.DEFAULT_ALGORITHM,
        help="strong block identity hash (default %(default)s)",
    )
    p.add_argument(
        "--compression-level",
        type=int,
        default=DEFAULT_COMPRESSION_LEVEL,
        help="zstd level 1-19 (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = init_location(
        args.repo,
        block_id=args.block_id,
        compression_level=args.compression_level,
        s3=s3_options(args),
    )
    if args.json:
        emit_json(
            {
                "repository": args.repo,
                "id": config.id,
                "content_id": config.content_id,
                "format": config.version,
                "block_id": config.block_id,
                "compression_level": config.compression_level,
            }
        )
    else:
        level = config.compression_level
        print(f"created repository {shown(args.repo)} ({config.block_id}, zstd level {level})")
    return 0
