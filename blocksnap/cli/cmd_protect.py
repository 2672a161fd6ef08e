"""blocksnap protect / unprotect: keep a snapshot whatever the retention policy says."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    for name, protect in (("protect", True), ("unprotect", False)):
        p = sub.add_parser(
            name,
            help="protect a snapshot from prune" if protect else "lift a snapshot's protection",
            description="A protected snapshot is never pruned, whatever the policy."
            if protect
            else "Let prune remove the snapshot again when its policy says so.",
        )
        add_repository(p)
        p.add_argument("volume", metavar="VOLUME")
        p.add_argument("snapshot", metavar="SNAPSHOT")
        p.set_defaults(run=run, protect=protect)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        info = repo.protect(args.volume, args.snapshot, args.protect)
    state = "protected" if args.protect else "no longer protected"
    print(f"snapshot {info.id[:12]} of {args.volume} is {state}")
    return 0
