"""blocksnap verify: check every snapshot, and with --read-data every stored byte."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blocksnap.cli.output import ProgressBar, emit_json, human_size, shown
from blocksnap.cli.repo import add_repository, open_repository
from blocksnap.errors import IntegrityError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check the repository",
        description="Check every snapshot's metadata and that every block it "
        "needs is stored; --read-data also reads and re-hashes all data.",
    )
    add_repository(p)
    p.add_argument(
        "--read-data", action="store_true", help="read, decompress and re-hash every block"
    )
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo, ProgressBar() as bar:
        report = repo.verify(read_data=args.read_data, progress=bar)
    if args.json:
        emit_json(
            {
                "ok": report.ok,
                "snapshots_checked": report.snapshots_checked,
                "blocks_referenced": report.blocks_referenced,
                "objects_indexed": report.objects_indexed,
                "packs_checked": report.packs_checked,
                "bytes_read": report.bytes_read,
                "unreferenced_objects": report.unreferenced_objects,
                "leftovers": report.leftovers,
                "problems": [
                    {"message": p.message, "snapshots": p.snapshots} for p in report.problems
                ],
                "damaged_snapshots": report.damaged_snapshots,
            }
        )
    else:
        for problem in report.problems:
            where = ", ".join(problem.snapshots) or "no snapshot affected"
            print(f"DAMAGE: {shown(problem.message)} [{where}]")
        for leftover in report.leftovers:
            print(f"leftover: {shown(str(leftover))}")
        read = f", {human_size(report.bytes_read)} read" if args.read_data else ""
        print(
            f"{report.snapshots_checked} snapshots, {report.blocks_referenced} block references, "
            f"{report.objects_indexed} objects{read}: "
            + ("ok" if report.ok else f"{len(report.damaged_snapshots)} snapshots damaged")
        )
    if not report.ok:
        if not args.json:
            sys.stderr.write(
                f"blocksnap: error: verify found damage in "
                f"{len(report.damaged_snapshots)} snapshots\n"
            )
        return IntegrityError.exit_code
    return 0
