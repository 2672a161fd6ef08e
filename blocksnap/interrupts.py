"""Ctrl-C for a process that runs one command: it interrupts once, and never after the
command's outcome is settled.

Python's own SIGINT handler raises KeyboardInterrupt at whatever bytecode runs when the
signal comes: inside the except clause handling an earlier one, in a finally block that
is cleaning up, between a commit and its report, or in interpreter shutdown, where it
ends the process by the signal with nothing said.  The command line installs this
handler instead:

- the first Ctrl-C raises KeyboardInterrupt, as before, so the command stops at once and
  its cleanup (waiting for workers, deleting the unfinished pack) runs;
- a later one is only remembered: the cleanup the first started is not cut short;
- once the outcome is settled (the command's work is committed, or its result is being
  reported), none raises; the command reports what really happened.

The library never installs it; it only sees KeyboardInterrupt, as with Python's handler.
"""

from __future__ import annotations

import signal
from types import FrameType

_state = {"pressed": False, "raised": False, "settled": False}


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    first = not _state["pressed"]
    _state["pressed"] = True
    if first and not _state["settled"]:
        _state["raised"] = True
        raise KeyboardInterrupt


def install() -> None:
    """Answer Ctrl-C as described above, from now on (main thread only)."""
    signal.signal(signal.SIGINT, _on_sigint)


def settle() -> None:
    """From now on Ctrl-C does not interrupt: the outcome no longer depends on it."""
    _state["settled"] = True


def came_too_late() -> bool:
    """Whether Ctrl-C was pressed only once the outcome was settled, so it stopped nothing."""
    return _state["pressed"] and not _state["raised"]
