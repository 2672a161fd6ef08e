"""Ctrl-C for a process that runs one command: it interrupts once, and never after the
command's outcome is settled.

Python's own SIGINT handler raises KeyboardInterrupt at whatever bytecode runs when the
signal comes: inside the except clause handling an earlier one, in a finally block that
is cleaning up, between a commit and its report, or in interpreter shutdown, where it
ends the process by the signal with nothing said.  The command line installs this
handler instead:

- the first Ctrl-C raises KeyboardInterrupt, as before, so the command stops at once and
  its cleanup (waiting for workers, deleting the unfinished pack) runs; during an import
  (the filesystem libraries load on first use) it is raised as soon as the import is
  done, since one raised inside the import machinery can be swallowed; inside the
  threading module's own code, but for its blocking waits, it is raised as soon as that
  code returns, since one raised between a lock's acquire and the with statement that
  would release it (a Condition's __enter__, as every Future.done() and result() takes)
  leaves the lock held for good, and the worker finishing that future waits forever, and
  the command with it, in its cleanup;
- a later one is only remembered: the cleanup the first started is not cut short;
- once the outcome is settled (the command's work is committed, or its result is being
  reported), none raises; the command reports what really happened.

The library never installs it; it only sees KeyboardInterrupt, as with Python's handler.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_state = {"pressed": False, "raised": False, "settled": False, "pending": False}
_RETRY_SECONDS = 0.01


def _in_import(frame: FrameType | None) -> bool:
    """Whether the import machinery is on the stack: a KeyboardInterrupt raised there can
    land in one of its callbacks (a module lock's weakref callback), where Python prints
    "Exception ignored" and drops it."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


_THREADING = threading.__file__
# threading's blocking points, where a KeyboardInterrupt is raised safely (its own code
# releases what it holds): a Condition's wait (Event.wait, Future.result) and a join.
_BLOCKING = frozenset({"wait", "_wait_for_tstate_lock"})


def _in_lock_code(frame: FrameType | None) -> bool:
    """Whether the signal came inside threading's own code other than a blocking wait."""
    return (
        frame is not None
        and frame.f_code.co_filename == _THREADING
        and frame.f_code.co_name not in _BLOCKING
    )


def _interrupt(frame: FrameType | None) -> None:
    # Raised once the import or the lock code is done, checked every _RETRY_SECONDS.
    if _in_import(frame) or _in_lock_code(frame):
        _state["pending"] = True
        signal.setitimer(signal.ITIMER_REAL, _RETRY_SECONDS)
        return
    _state["pending"] = False
    _state["raised"] = True
    raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    first = not _state["pressed"]
    _state["pressed"] = True
    if first and not _state["settled"]:
        _interrupt(frame)


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    if _state["pending"] and not _state["settled"]:
        _interrupt(frame)


def install() -> None:
    """Answer Ctrl-C as described above, from now on (main thread only)."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGINT, _on_sigint)


def settle() -> None:
    """From now on Ctrl-C does not interrupt: the outcome no longer depends on it."""
    _state["settled"] = True


def came_too_late() -> bool:
    """Whether Ctrl-C was pressed only once the outcome was settled, so it stopped nothing."""
    return _state["pressed"] and not _state["raised"]
