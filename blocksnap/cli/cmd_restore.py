"""blocksnap restore: write a snapshot's whole image to a file or block device."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import ProgressBar, emit_json, human_size, settling_at, shown
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "restore",
        help="restore a whole image",
        description="Restore SNAPSHOT to TARGET: a new sparse file, an existing "
        "file or a block device. Every block is checked against its ID.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument("target", metavar="TARGET")
    p.add_argument(
        "--only-changed",
        action="store_true",
        help="read the existing target and write only blocks that differ",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo, ProgressBar() as bar:
        result = repo.restore(
            args.volume,
            args.snapshot,
            args.target,
            only_changed=args.only_changed,
            # Every block is written: what is left is the sync and the rename into place.
            progress=settling_at(lambda p: p.done == p.total, bar),
        )
    if args.json:
        emit_json(
            {
                "target": result.target,
                "image_size": result.image_size,
                "blocks_written": result.blocks_written,
                "blocks_unchanged": result.blocks_unchanged,
                "zero_blocks": result.zero_blocks,
                "bytes_written": result.bytes_written,
            }
        )
    else:
        print(
            f"restored {human_size(result.image_size)} to {shown(result.target)}: "
            f"{result.blocks_written} blocks written, {result.blocks_unchanged} unchanged, "
            f"{result.zero_blocks} zero"
        )
    return 0
