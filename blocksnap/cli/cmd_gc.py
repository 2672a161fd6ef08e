"""blocksnap gc: free the space of blocks that no snapshot refers to any more."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from blocksnap.cli.output import ProgressBar, emit_json, human_size
from blocksnap.cli.repo import add_repository, open_repository
from blocksnap.store.gc import DEFAULT_COMPACT_BELOW


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "gc",
        help="free the space of blocks no snapshot refers to",
        description="Delete every object no snapshot refers to any more, compact packs whose "
        "live fraction fell below a threshold, and clean up after writers that were killed. "
        "Safe while snapshots, restores and verifies run.",
    )
    add_repository(p)
    p.add_argument(
        "--compact-below",
        type=float,
        default=DEFAULT_COMPACT_BELOW,
        metavar="FRACTION",
        help="rewrite packs whose live fraction is below this (default %(default)s); "
        "0 only deletes packs that are wholly garbage",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="reconcile with a listing of the whole repository as well: reclaims the packs "
        "and unfinished uploads of writers on hosts that never came back (a shared "
        "repository), or packs the index lacks (a local one); steady gc never lists them",
    )
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo, ProgressBar() as bar:
        report = repo.gc(compact_below=args.compact_below, full=args.full, progress=bar)
    if args.json:
        emit_json(asdict(report))
    else:
        print(
            f"gc: {report.objects_deleted} objects deleted, {human_size(report.bytes_freed)} "
            f"freed ({report.packs_deleted} packs deleted, {report.packs_compacted} compacted "
            f"into {report.packs_written}, {human_size(report.bytes_copied)} copied)"
        )
        if report.dead_writers:
            print(
                f"cleaned up after {report.dead_writers} interrupted writers "
                f"({report.leftovers_deleted} objects)"
            )
        if report.orphan_packs or report.unfinished_discarded:
            print(
                f"reclaimed {report.orphan_packs} packs no snapshot uses and "
                f"{report.unfinished_discarded} unfinished writes"
            )
        if report.waiting_writers:
            print(
                f"waiting for {report.waiting_writers} running writers (other hosts or processes); "
                "a later gc deletes what they do not use"
            )
        if report.unreferenced_left:
            print(
                f"{report.unreferenced_left} unreferenced objects kept for "
                f"{report.live_writers} running writers; a later gc frees them"
            )
        for problem in report.problems:
            print(f"problem: {problem}")
    return 5 if report.problems else 0
