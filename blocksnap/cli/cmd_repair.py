"""blocksnap repair: rebuild the index from the packs and snapshot records."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from blocksnap.cli.output import ProgressBar, emit_json, shown
from blocksnap.cli.repo import add_repository, s3_options
from blocksnap.errors import UsageError
from blocksnap.repository import repair_index


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "repair",
        help="rebuild the index",
        description="Rebuild the LMDB index from the packs and snapshot records. "
        "Needs the repository to itself.",
    )
    add_repository(p)
    p.add_argument("--rebuild-index", action="store_true", help="rebuild the index (required)")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.rebuild_index:
        raise UsageError("repair needs --rebuild-index (the only repair so far)")
    with ProgressBar() as bar:
        report = repair_index(args.repo, progress=bar, s3=s3_options(args))
    if args.json:
        emit_json(asdict(report))
    else:
        for item in report.restored:
            print(f"restored: {shown(str(item))}")
        for item in report.damaged:
            print(f"left out: {shown(str(item))}")
        print(
            f"index rebuilt: {report.packs} packs, {report.objects} objects, "
            f"{report.snapshots} snapshots"
        )
    return 0
