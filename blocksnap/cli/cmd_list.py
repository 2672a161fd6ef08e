"""blocksnap list: the volumes of a repository, or the snapshots of one volume."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import emit_json, human_size, labels_text, shown, snapshot_document
from blocksnap.cli.repo import add_repository, open_repository
from blocksnap.errors import NotFoundError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "list",
        help="list volumes or snapshots",
        description="List every volume with its snapshots, or one volume's snapshots.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME", nargs="?")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        volumes = [args.volume] if args.volume else repo.volumes()
        listing = {v: repo.snapshots(v) for v in volumes}
        protected = repo.protected()
    if args.volume and not listing[args.volume]:
        raise NotFoundError(f"volume {args.volume!r} does not exist")
    if args.json:
        emit_json(
            {
                v: [{**snapshot_document(s), "protected": s.id in protected} for s in snaps]
                for v, snaps in listing.items()
            }
        )
        return 0
    for volume, snaps in listing.items():
        print(f"{shown(volume)}:")
        for s in snaps:
            labels = labels_text(s.labels)
            if s.id in protected:
                labels = f"[protected] {labels}"
            against = s.base or s.parent
            relation = f"{'base' if s.base else 'from'} {against[:12]}" if against else ""
            print(
                f"  {s.id[:12]}  {s.time}  {s.kind.value:14s}  {relation:17s}  "
                f"{human_size(s.image_size):>10s}  +{human_size(s.stored_size):>10s}  "
                f"{labels}".rstrip()
            )
    return 0
