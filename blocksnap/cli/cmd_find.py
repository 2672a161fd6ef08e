"""blocksnap find: the paths inside a snapshot whose name matches a pattern."""

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
from blocksnap.cli.output import emit_json, shown


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "find",
        help="find files inside a snapshot by name",
        description="Print the paths under --under (default /) whose name matches PATTERN, "
        "a shell glob such as '*.conf' (a pattern with / is matched against the whole "
        "path).  Symlinks are not followed.",
    )
    add_volume_arguments(p)
    p.add_argument("pattern", metavar="PATTERN", nargs="?", default="*")
    p.add_argument("--under", metavar="PATH", default="/", help="search below PATH only")
    p.add_argument("-l", "--long", action="store_true", help="long form, like ls -l")
    add_partition_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args) as fs:
        if args.json:
            found = [stat_document(st) for st in fs.find(args.pattern, args.under)]
            emit_json({"matches": found, "blocks_fetched": fs.stats.blocks_fetched})
            return 0
        for st in fs.find(args.pattern, args.under):
            print(long_line(st) if args.long else shown(st.path))
    return 0
