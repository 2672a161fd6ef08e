"""Worker pools that stop whole: when the block leaves, no task of the pool is still running.

Tasks of the snapshot and restore pipelines fill and read buffers inside native calls with
the GIL released; the caller may only drop those buffers, close the source or the store
writer, or exit, once every such call has returned.  A pool left by an exception therefore
cancels the tasks that have not started and waits for the running ones, and a second
Ctrl-C during that wait (the first one is what is stopping it) does not cut it short.

The wait is on the tasks' futures, not on the threads: Python 3.11's Thread.join, when
Ctrl-C interrupts it, marks a thread that is still running as stopped, so a second join
would return at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import ParamSpec, TypeVar, cast

P = ParamSpec("P")
T = TypeVar("T")


class WorkerPool:
    """A thread pool that knows which of its tasks have not finished yet."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)
        # Only unfinished tasks: a finished one's result is its caller's to keep or drop.
        self._unfinished: set[Future[object]] = set()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future = self._pool.submit(fn, *args, **kwargs)
        held = cast("Future[object]", future)  # the set holds futures of any result
        self._unfinished.add(held)
        held.add_done_callback(self._unfinished.discard)
        return future

    def stop(self) -> None:
        """Cancel the tasks that have not started and wait for the running ones, however
        often Ctrl-C is pressed meanwhile."""
        for future in list(self._unfinished):
            future.cancel()
        self._wait()
        self._pool.shutdown(wait=False)  # its threads are idle and leave by themselves

    def close(self) -> None:
        """Wait for the tasks (normally all finished already) and let the idle threads go;
        Ctrl-C during the wait is raised after it."""
        interrupted = self._wait()
        self._pool.shutdown(wait=True)
        if interrupted:
            raise KeyboardInterrupt

    def _wait(self) -> bool:
        """Wait for every unfinished task; True if Ctrl-C was pressed meanwhile."""
        interrupted = False
        while True:
            try:
                wait(list(self._unfinished))
                return interrupted
            except KeyboardInterrupt:
                interrupted = True  # returning now would leave tasks running


@contextmanager
def worker_pool(max_workers: int, name: str) -> Iterator[WorkerPool]:
    """A worker pool that, however the block ends, has no running task when it is left."""
    pool = WorkerPool(max_workers, name)
    try:
        yield pool
    except BaseException:
        pool.stop()
        raise
    pool.close()
