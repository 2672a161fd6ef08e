"""Worker pools stop whole: no task still runs once the pool's block is left."""

from __future__ import annotations

import signal
import sys
import threading

import pytest

from blocksnap.workers import worker_pool


def _main_is_joining() -> bool:
    """Whether the main thread is waiting for the pool (in whatever way it waits)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if frame.f_code.co_name in ("_wait", "join", "shutdown"):
            return True
        frame = frame.f_back
    return False


def test_worker_pool_waits_for_running_tasks_through_a_second_ctrl_c() -> None:
    """An error leaves the block while a task runs; Ctrl-C during the wait for it does not
    end that wait early, and the error, not the Ctrl-C, is what comes out."""
    started, finished = threading.Event(), threading.Event()
    never = threading.Event()

    def task() -> None:
        started.set()
        while not _main_is_joining():
            pass
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        # Long enough for a wait the Ctrl-C cut short to be seen leaving before this ends.
        never.wait(0.5)
        finished.set()

    with pytest.raises(RuntimeError, match="source failed"), worker_pool(2, "test") as pool:
        pool.submit(task)
        started.wait()
        raise RuntimeError("source failed")
    assert finished.is_set()


def test_worker_pool_reports_ctrl_c_during_the_final_wait() -> None:
    """On the normal way out, a Ctrl-C during the wait still interrupts, after it."""
    finished = threading.Event()

    def task() -> None:
        while not _main_is_joining():
            pass
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        threading.Event().wait(0.5)
        finished.set()

    with pytest.raises(KeyboardInterrupt), worker_pool(2, "test") as pool:
        pool.submit(task)
    assert finished.is_set()
