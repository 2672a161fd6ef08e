"""blocksnap policy: show, save or clear a volume's retention policy."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import add_policy_options, emit_json, policy_from_args
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="show, save or clear a volume's retention policy",
        description="With --keep options, save them as the volume's policy, which prune "
        "applies when run without options; with --clear, remove it; else show it.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    add_policy_options(p)
    p.add_argument("--clear", action="store_true", help="remove the saved policy")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    with open_repository(args) as repo:
        if args.clear:
            repo.set_policy(args.volume, None)
        elif policy is not None:
            repo.set_policy(args.volume, policy)
        saved = repo.policy(args.volume)
    if args.json:
        emit_json({"volume": args.volume, "policy": saved.to_dict() if saved else None})
    else:
        print(f"{args.volume}: {saved.describe() if saved else 'no policy saved'}")
    return 0
