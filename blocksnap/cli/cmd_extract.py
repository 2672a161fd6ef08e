"""blocksnap extract: restore files and directory trees from inside a snapshot."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blocksnap.cli.files import add_partition_option, add_volume_arguments, opened
from blocksnap.cli.output import emit_json, human_size, shown, with_bytes


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="restore files or directories from inside a snapshot",
        description="Restore PATHs (files, symlinks or whole trees) from the filesystem "
        "inside SNAPSHOT, fetching only their blocks.  Nothing is ever written outside "
        "the target: names, links and devices that would lead out are refused and listed.",
    )
    add_volume_arguments(p)
    p.add_argument("paths", metavar="PATH", nargs="+")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", help="put each PATH in DIR under its own name")
    where.add_argument(
        "--in-place",
        metavar="ROOT",
        help="put each PATH back where it was, below ROOT (where the filesystem is mounted)",
    )
    rule = p.add_mutually_exclusive_group()
    for name, text in (
        ("skip", "leave existing files as they are (the default)"),
        ("overwrite", "replace existing files; directories are merged into"),
        ("rename", "keep both: the restored copy is named NAME.restored[.N]"),
    ):
        rule.add_argument(f"--{name}", dest="conflict", action="store_const", const=name, help=text)
    add_partition_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run, conflict="skip")


def run(args: argparse.Namespace) -> int:
    # Imported when run, as opening the filesystem is: it loads the partition-table
    # libraries, which every other command would otherwise load at start-up.
    from blocksnap.extract import extract

    in_place = args.in_place is not None
    target = args.in_place if in_place else args.to
    with opened(args) as fs:
        report = extract(fs, args.paths, target, in_place=in_place, conflict=args.conflict)
        fetched = fs.stats.blocks_fetched  # the whole request: finding the filesystem too
    refused = [(path, why) for path, why in report.skipped if why != "exists"]
    if args.json:
        emit_json(
            {
                "target": report.target,
                "files": report.files,
                "directories": report.directories,
                "symlinks": report.symlinks,
                "hardlinks": report.hardlinks,
                "bytes_written": report.bytes_written,
                "blocks_fetched": fetched,
                "skipped": [
                    with_bytes({"path": p, "reason": r}, "path") for p, r in report.skipped
                ],
                "renamed": [
                    with_bytes({"path": p, "name": n}, "path", "name") for p, n in report.renamed
                ],
                "warnings": [
                    with_bytes({"path": p, "warning": w}, "path") for p, w in report.warnings
                ],
                "cleaned": report.cleaned,
            }
        )
    else:
        for path, why in report.skipped:
            sys.stderr.write(f"blocksnap: skipped {shown(path)}: {shown(why)}\n")
        for path, warning in report.warnings:
            sys.stderr.write(f"blocksnap: warning: {shown(path)}: {shown(warning)}\n")
        for name in report.cleaned:
            sys.stderr.write(
                f"blocksnap: removed {shown(name)}, left by an extraction that was killed\n"
            )
        print(
            f"extracted {report.files} files, {report.directories} directories, "
            f"{report.symlinks} symlinks, {report.hardlinks} hard links "
            f"({human_size(report.bytes_written)}) to {shown(report.target)}; "
            f"{fetched} blocks fetched" + (f"; {len(refused)} refused" if refused else "")
        )
    return 1 if refused else 0
