"""blocksnap snapshot: take a full or incremental snapshot of an image or block device."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.output import ProgressBar, emit_json, human_size, snapshot_document
from blocksnap.errors import UsageError
from blocksnap.repository import Repository


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="snapshot a volume image",
        description="Snapshot SOURCE (image file or block device) into VOLUME. "
        "Incremental against the volume's latest snapshot unless --full.",
    )
    p.add_argument("repo", metavar="REPO")
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--full", action="store_true", help="read and store every block, no parent")
    p.add_argument("--block-size", type=int, help="bytes per block for a new volume (4 KiB-4 MiB)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    with Repository(args.repo) as repo, ProgressBar() as bar:
        info = repo.snapshot(
            args.volume,
            args.source,
            full=args.full,
            block_size=args.block_size,
            labels=labels,
            progress=bar,
        )
    if args.json:
        emit_json(snapshot_document(info))
    else:
        c = info.counts
        print(
            f"snapshot {info.id[:12]} ({info.kind.value}) of {args.volume}: "
            f"{human_size(info.image_size)} read in {info.duration:.1f}s, "
            f"{c.changed} blocks changed, "
            f"{c.stored} stored ({human_size(info.stored_size)}), {c.zero} zero"
        )
    return 0
