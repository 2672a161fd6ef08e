"""blocksnap stats: what the repository holds and what dedup and compression saved."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from blocksnap.cli.output import emit_json, human_size
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "stats", help="repository statistics", description="Show repository statistics."
    )
    add_repository(p)
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        stats = repo.stats()
    if args.json:
        emit_json({**asdict(stats), "ratio": round(stats.ratio, 3)})
    else:
        print(
            f"volumes      {stats.volumes}\nsnapshots    {stats.snapshots}\n"
            f"objects      {stats.objects} in {stats.packs} packs\n"
            f"stored       {human_size(stats.stored_size)}\n"
            f"logical      {human_size(stats.logical_size)}\n"
            f"ratio        {stats.ratio:.1f}x"
        )
    return 0
