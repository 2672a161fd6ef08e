"""blocksnap versions: which snapshots hold a path, and where its content changed."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.files import add_partition_option, add_volume_arguments, stat_document
from blocksnap.cli.output import emit_json, shown
from blocksnap.cli.repo import open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "versions",
        help="the versions of a path across snapshots",
        description="For every snapshot of VOLUME, oldest first: whether it holds PATH, "
        "and whether the content differs from the snapshot before (added, changed, "
        "unchanged, removed, absent).",
    )
    add_volume_arguments(p, snapshot=False)
    p.add_argument("path", metavar="PATH")
    add_partition_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        found = repo.versions(args.volume, args.path, partition=args.partition)
    if args.json:
        emit_json(
            [
                {
                    "snapshot": v.snapshot.id,
                    "time": v.snapshot.time,
                    "state": v.state.value,
                    "digest": v.digest,
                    "stat": stat_document(v.stat) if v.stat else None,
                    "error": v.error,
                }
                for v in found
            ]
        )
        return 0
    for v in found:
        size = f"{v.stat.size:>12d}" if v.stat else " " * 12
        note = f"  {shown(v.error)}" if v.error else ""
        print(f"{v.snapshot.id[:12]}  {v.snapshot.time}  {v.state.value:10s} {size}{note}")
    return 0
