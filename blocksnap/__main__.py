"""Entry point for python -m blocksnap (and the blocksnap script): one command, and one
answer to Ctrl-C from the first line run here to the process's exit."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from blocksnap import interrupts

interrupts.install()  # before the command line's imports, which take a while


def _finish(status: int) -> NoReturn:
    """Flush what the command printed and exit with status, without the interpreter's
    shutdown: nothing is left to tidy by then (every command closes what it opened), and
    Ctrl-C or Python's own memory of one must not change the status or add a traceback."""
    interrupts.settle()
    if interrupts.came_too_late():
        sys.stderr.write("blocksnap: Ctrl-C came too late to stop the command; it had finished\n")
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = status or 141  # as the command line reports a closed output
    except OSError:
        status = status or 1
    with contextlib.suppress(OSError):  # nowhere left to say it
        sys.stderr.flush()
    os._exit(status)


def entry(argv: list[str] | None = None) -> NoReturn:
    """Run one command; exit 130 with one line for a Ctrl-C that stopped it."""
    status: int | None = None
    try:
        try:
            from blocksnap.cli import main

            status = main(argv)
        except SystemExit as exc:  # argparse: --help, or a usage error it already reported
            if isinstance(exc.code, str):
                sys.stderr.write(f"{exc.code}\n")
            status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        finally:
            interrupts.settle()  # the outcome is decided: report it, whatever is pressed now
    except KeyboardInterrupt:
        # Ctrl-C outside the command's own handling: while importing, or while main was
        # already reporting an error; main had not returned, so nothing of it was kept.
        if status is None:
            sys.stderr.write("blocksnap: error: interrupted; nothing uncommitted was kept\n")
    _finish(130 if status is None else status)


if __name__ == "__main__":
    entry()
