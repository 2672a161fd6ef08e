"""blocksnap synthesize: make a synthetic full from the repository alone."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import ProgressBar, emit_json, parse_labels, snapshot_document
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "synthesize",
        help="make a synthetic full snapshot without reading the source",
        description="Make a synthetic full of SNAPSHOT (default latest) from the blocks the "
        "repository holds: no source is read and no block is copied.  It becomes the base "
        "for later --differential snapshots.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("snapshot", metavar="SNAPSHOT", nargs="?", default="latest")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    labels = parse_labels(args.label)
    with open_repository(args) as repo, ProgressBar() as bar:
        info = repo.synthesize(args.volume, args.snapshot, labels=labels, progress=bar)
    if args.json:
        emit_json(snapshot_document(info))
    else:
        print(
            f"synthetic full {info.id[:12]} of {args.volume} from {info.parent}: "
            f"{info.block_count} blocks checked in {info.duration:.2f}s, nothing copied"
        )
    return 0
