"""blocksnap cat: write one file from inside a snapshot to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from blocksnap.cli.files import add_partition_option, add_volume_arguments, opened

_CHUNK_SIZE = 1 << 20


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cat",
        help="write a file from inside a snapshot to stdout",
        description="Write the content of PATH, a regular file (or a symlink to one) in the "
        "filesystem inside SNAPSHOT, to stdout.",
    )
    add_volume_arguments(p)
    p.add_argument("path", metavar="PATH")
    add_partition_option(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with opened(args) as fs, fs.open(args.path) as f:
        out = sys.stdout.buffer
        while chunk := f.read(_CHUNK_SIZE):
            out.write(chunk)
        out.flush()
    return 0
