"""blocksnap ls: list a directory inside a snapshot, reading only what the listing needs."""

from __future__ import annotations

import argparse
from typing import Any

from blocksnap.cli.files import (
    add_partition_option,
    add_volume_arguments,
    long_line,
    opened,
    stat_document,
)
from blocksnap.cli.output import emit_json, shown, with_bytes
from blocksnap.fs.node import FileKind


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ls",
        help="list a directory inside a snapshot",
        description="List PATH (default /) of the filesystem inside SNAPSHOT: name, type, "
        "size, mode, owner and mtime.  No restore and no mount: only the blocks that hold "
        "the directory and the metadata leading to it are fetched.",
    )
    add_volume_arguments(p)
    p.add_argument("path", metavar="PATH", nargs="?", default="/")
    p.add_argument("-l", "--long", action="store_true", help="long form, like ls -l")
    add_partition_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args) as fs:
        target = fs.stat(args.path, follow_symlinks=True)
        entries = fs.listdir(args.path) if target.kind is FileKind.DIRECTORY else [target]
        if args.json:
            document = {
                "filesystem": fs.kind,
                "partition": fs.partition.name if fs.partition else None,
                "path": target.path,
                "entries": [stat_document(st) for st in entries],
                "blocks_fetched": fs.stats.blocks_fetched,
            }
            emit_json(with_bytes(document, "path"))
            return 0
    for st in entries:
        if args.long:
            print(long_line(st))
        else:
            print(shown(st.name) + ("/" if st.kind is FileKind.DIRECTORY else ""))
    return 0
