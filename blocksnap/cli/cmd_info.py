"""blocksnap info: everything recorded about one snapshot."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import emit_json, labels_text, shown, snapshot_document
from blocksnap.cli.repo import add_repository, open_repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="show one snapshot",
        description="Show one snapshot (ID, unique prefix, latest or latest~N).",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        doc = snapshot_document(repo.resolve(args.volume, args.snapshot))
    if args.json:
        emit_json(doc)
    else:
        for key, value in doc.items():
            text = labels_text(value) if key == "labels" else shown(str(value))
            print(f"{key:14s} {text}")
    return 0
