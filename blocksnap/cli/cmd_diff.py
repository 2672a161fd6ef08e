"""blocksnap diff: the byte ranges that differ between two snapshots of a volume."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import emit_json, human_size
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "diff",
        help="list the ranges that differ between two snapshots",
        description="List the block ranges that differ between snapshots A and B of VOLUME, "
        "from their block maps alone (no block data is read).  The plain output is one "
        "'OFFSET LENGTH' line per range in bytes, the format snapshot --changed-extents reads.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        diff = repo.diff(args.volume, args.a, args.b)
    byte_ranges = diff.byte_ranges(diff.image_size)
    changed_bytes = sum(length for _, length in byte_ranges)
    if args.json:
        emit_json(
            {
                "a": diff.a,
                "b": diff.b,
                "block_size": diff.block_size,
                "changed_blocks": diff.changed_blocks,
                "changed_bytes": changed_bytes,
                "ranges": [
                    {"first_block": first, "blocks": count, "offset": off, "length": length}
                    for (first, count), (off, length) in zip(diff.ranges, byte_ranges, strict=True)
                ],
            }
        )
    else:
        print(f"# {diff.a} -> {diff.b}: {diff.changed_blocks} blocks, {human_size(changed_bytes)}")
        for offset, length in byte_ranges:
            print(f"{offset} {length}")
    return 0
