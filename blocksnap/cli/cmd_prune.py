"""blocksnap prune: remove the snapshots a retention policy does not keep."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import add_policy_options, emit_json, policy_from_args
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="remove the snapshots a retention policy does not keep",
        description="Apply a retention policy to one volume or every volume: the newest "
        "snapshot in each period is kept, protected snapshots always.  Without --keep "
        "options each volume's saved policy applies (see policy).  Space is freed by gc.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME", nargs="?")
    add_policy_options(p)
    p.add_argument("--dry-run", action="store_true", help="only print what would be kept and why")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    with open_repository(args) as repo:
        report = repo.prune(args.volume, policy, dry_run=args.dry_run)
    if args.json:
        emit_json(
            {
                "dry_run": report.dry_run,
                "removed": report.removed,
                "skipped_volumes": report.skipped,
                "volumes": {
                    volume: {
                        "policy": report.policies[volume].to_dict(),
                        "snapshots": [
                            {
                                "id": d.snapshot.id,
                                "time": d.snapshot.time,
                                "kind": d.snapshot.kind.value,
                                "keep": d.keep,
                                "reasons": list(d.reasons),
                            }
                            for d in decisions
                        ],
                    }
                    for volume, decisions in report.decisions.items()
                },
            }
        )
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for volume, decisions in report.decisions.items():
        print(f"{volume}: {report.policies[volume].describe()}")
        for d in decisions:
            action = "keep  " if d.keep else ("remove" if report.dry_run else "gone  ")
            why = ", ".join(d.reasons)
            print(
                f"  {action}  {d.snapshot.id[:12]}  {d.snapshot.time}  "
                f"{d.snapshot.kind.value:14s}  {why}".rstrip()
            )
    for volume in report.skipped:
        print(f"{volume}: skipped, no policy saved")
    removed = sum(not d.keep for ds in report.decisions.values() for d in ds)
    tail = "" if report.dry_run else "; run gc to free their space"
    print(f"{verb} {removed} snapshots{tail}")
    return 0
