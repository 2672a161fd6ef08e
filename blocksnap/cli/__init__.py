"""The command line: parses arguments, runs one command, maps errors to one line and exit code.

This package is the only code in blocksnap that prints or exits.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from blocksnap.cli import (
    cmd_cat,
    cmd_diff,
    cmd_extract,
    cmd_find,
    cmd_gc,
    cmd_info,
    cmd_init,
    cmd_list,
    cmd_ls,
    cmd_policy,
    cmd_protect,
    cmd_prune,
    cmd_repair,
    cmd_restore,
    cmd_snapshot,
    cmd_stats,
    cmd_synthesize,
    cmd_verify,
    cmd_versions,
)
from blocksnap.cli.output import shown
from blocksnap.errors import BlocksnapError

COMMANDS = (
    cmd_init,
    cmd_snapshot,
    cmd_synthesize,
    cmd_list,
    cmd_info,
    cmd_diff,
    cmd_restore,
    cmd_ls,
    cmd_cat,
    cmd_find,
    cmd_versions,
    cmd_extract,
    cmd_prune,
    cmd_protect,
    cmd_policy,
    cmd_gc,
    cmd_verify,
    cmd_stats,
    cmd_repair,
)

EPILOG = """examples:
  blocksnap init /srv/backup
  blocksnap snapshot /srv/backup web01 /dev/vg0/web01 --label host=web01
  blocksnap list /srv/backup web01
  blocksnap info /srv/backup web01 latest
  blocksnap restore /srv/backup web01 latest~3 /tmp/web01.img
  blocksnap ls /srv/backup web01 latest /etc -l
  blocksnap cat /srv/backup web01 latest /etc/hostname
  blocksnap find /srv/backup web01 latest '*.conf' --under /etc
  blocksnap versions /srv/backup web01 /var/www/index.php
  blocksnap extract /srv/backup web01 latest~2 /var/www --to /tmp/www-restored
  blocksnap extract /srv/backup web01 latest /home/ann/notes.txt --in-place /mnt/web01 --rename
  blocksnap policy /srv/backup web01 --keep-within 14d --keep-monthly 6
  blocksnap prune /srv/backup --dry-run
  blocksnap gc /srv/backup
  blocksnap verify /srv/backup --read-data
  blocksnap stats /srv/backup
  blocksnap repair /srv/backup --rebuild-index
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {shown(message)}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="blocksnap",
        description="Block-level snapshots of volume images into a deduplicating store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        status: int = args.run(args)
        return status
    except BlocksnapError as exc:
        sys.stderr.write(f"blocksnap: error: {shown(str(exc))}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("blocksnap: error: interrupted; nothing uncommitted was kept\n")
        return 130
    except BrokenPipeError:
        return 141
