"""blocksnap snapshot: take a full, incremental or differential snapshot of a volume."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blocksnap.cli.output import (
    ProgressBar,
    emit_json,
    human_size,
    parse_labels,
    parse_size,
    parse_time,
    settling_at,
    snapshot_document,
)
from blocksnap.cli.repo import add_repository, open_repository
from blocksnap.errors import UsageError
from blocksnap.extents import read_extents
from blocksnap.model import CLOCK_SKEW
from blocksnap.snapshot import CHECKPOINT_SIZE


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="snapshot a volume image",
        description="Snapshot SOURCE (image file or block device) into VOLUME. "
        "Incremental against the volume's latest snapshot unless --full or --differential.",
    )
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    p.add_argument("source", metavar="SOURCE")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--full", action="store_true", help="compare with nothing: a new base")
    kind.add_argument(
        "--differential",
        action="store_true",
        help="compare with the latest full or synthetic full instead of the latest snapshot",
    )
    p.add_argument(
        "--time",
        type=parse_time,
        metavar="ISO8601",
        help="record this time instead of now (importing older images), e.g. 2026-01-31T06:00Z",
    )
    p.add_argument(
        "--allow-future-time",
        action="store_true",
        help=f"accept a --time more than {CLOCK_SKEW.seconds // 60} minutes ahead of this "
        "host's clock (prune keeps such a snapshot outside its rules until then)",
    )
    p.add_argument("--block-size", type=int, help="bytes per block for a new volume (4 KiB-4 MiB)")
    p.add_argument(
        "--changed-extents",
        metavar="FILE",
        help="read only these byte ranges, taking the rest from the snapshot compared with: "
        "one 'OFFSET LENGTH' pair per line, # comments; - reads standard input",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoint of an interrupted run of the same snapshot",
    )
    p.add_argument(
        "--source-id",
        metavar="ID",
        help="what the source is (e.g. the LVM snapshot's UUID), so that --resume can tell "
        "it is the same medium where the source cannot show it (a pipe, a device without "
        "diskseq)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=parse_size,
        default=CHECKPOINT_SIZE,
        metavar="SIZE",
        help="commit a checkpoint every SIZE of the volume (default 2G)",
    )
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def _changed_extents(name: str | None) -> list[tuple[int, int]] | None:
    if name is None:
        return None
    if name == "-":
        return read_extents(sys.stdin, "changed extents (stdin)")
    try:
        with open(name, encoding="utf-8") as f:
            return read_extents(f, f"changed extents {name}")
    except OSError as exc:
        raise UsageError(f"cannot read changed extents {name}: {exc.strerror or exc}") from exc


def run(args: argparse.Namespace) -> int:
    labels = parse_labels(args.label)
    extents = _changed_extents(args.changed_extents)
    with open_repository(args) as repo, ProgressBar() as bar:
        info = repo.snapshot(
            args.volume,
            args.source,
            full=args.full,
            differential=args.differential,
            taken_at=args.time,
            block_size=args.block_size,
            labels=labels,
            # Every block is in durable packs: what is left is the commit, then the report.
            progress=settling_at(lambda p: p.phase == "packs-written", bar),
            changed_extents=extents,
            resume=args.resume,
            checkpoint_size=args.checkpoint_every,
            allow_future_time=args.allow_future_time,
            source_id=args.source_id,
        )
    if args.json:
        emit_json(snapshot_document(info))
    else:
        c = info.counts
        resumed = f", resumed after {c.resumed} blocks" if c.resumed else ""
        print(
            f"snapshot {info.id[:12]} ({info.kind.value}) of {args.volume}: "
            f"{human_size(info.image_size)}, {c.read} blocks read in {info.duration:.1f}s"
            f"{resumed}, {c.changed} changed, "
            f"{c.stored} stored ({human_size(info.stored_size)}), {c.zero} zero"
        )
    return 0
