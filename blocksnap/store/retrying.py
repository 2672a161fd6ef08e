"""Retries as a wrapper around a backend: bounded attempts with backoff, transient errors only.

A call that raises TransientStoreError is repeated, after a delay that doubles from
base_delay up to max_delay, at most attempts times in all; any other error, and the last
transient one, goes to the caller unchanged.  Callers never retry themselves.

Two calls need care, since the failed attempt may have taken effect:
- put(exclusive=True): a retry that finds the name taken reads the object back; if it
  holds exactly the bytes being put, the lost attempt was this one's and the put
  succeeded, else ObjectExistsError stands.
- list(): a listing that fails part-way starts again, and names already yielded are not
  yielded twice.
An object written in parts (create) is not retried part by part, since a failed part
leaves the writer in an unknown state: the backend retries its own requests inside a
part, and the caller's error handling aborts the object.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from blocksnap.errors import MissingObjectError, ObjectExistsError, TransientStoreError
from blocksnap.store.backend import Capabilities, ObjectInfo, ObjectStore, ObjectWriter

T = TypeVar("T")

DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_DELAY = 0.1  # seconds
DEFAULT_MAX_DELAY = 5.0  # seconds


class RetryingBackend:
    """An ObjectStore that retries the transient failures of the one it wraps."""

    def __init__(
        self,
        inner: ObjectStore,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._sleep = sleep
        self.retries = 0  # transient failures absorbed so far

    def _call(self, fn: Callable[[], T]) -> T:
        delay = self._base_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientStoreError:
                delay = self._back_off(attempt, delay)
        raise AssertionError("unreachable")

    def _back_off(self, attempt: int, delay: float) -> float:
        """After a transient failure: re-raise it on the last attempt, else wait delay and
        return the next one (called from inside the except clause)."""
        if attempt == self.attempts:
            raise  # the transient error being handled
        self.retries += 1
        self._sleep(delay)
        return min(delay * 2, self._max_delay)

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def create(self, name: str, *, exclusive: bool = False) -> ObjectWriter:
        return self._call(lambda: self.inner.create(name, exclusive=exclusive))

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False
    ) -> None:
        if not exclusive:
            self._call(lambda: self.inner.put(name, data))
            return
        failed = False

        def attempt() -> None:
            nonlocal failed
            try:
                self.inner.put(name, data, exclusive=True)
            except TransientStoreError:
                failed = True
                raise
            except ObjectExistsError:
                if failed and self._holds(name, data):
                    return  # an earlier attempt stored it and its answer was lost
                raise

        self._call(attempt)

    def _holds(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        try:
            return self._call(lambda: self.inner.get(name)) == bytes(data)
        except MissingObjectError:
            return False

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.get(name, offset, length))

    def get_into(self, name: str, buffer: memoryview) -> int:
        return self._call(lambda: self.inner.get_into(name, buffer))  # a retry starts over

    def stat(self, name: str) -> ObjectInfo:
        return self._call(lambda: self.inner.stat(name))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        seen: set[str] = set()
        delay = self._base_delay
        for attempt in range(1, self.attempts + 1):
            try:
                for info in self.inner.list(prefix):
                    if info.name not in seen:
                        seen.add(info.name)
                        yield info
                return
            except TransientStoreError:
                delay = self._back_off(attempt, delay)

    def delete(self, name: str) -> None:
        self._call(lambda: self.inner.delete(name))

    def delete_many(self, names: Iterable[str]) -> None:
        batch = list(names)
        self._call(lambda: self.inner.delete_many(batch))  # deleting twice is harmless

    def leftovers(self, prefix: str = "") -> builtins.list[str]:
        return self._call(lambda: self.inner.leftovers(prefix))

    def discard_partial(self, name: str) -> None:
        self._call(lambda: self.inner.discard_partial(name))

    def close(self) -> None:
        self.inner.close()
