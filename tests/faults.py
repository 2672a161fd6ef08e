"""Fault injection as a backend wrapper: the Nth operation fails, or listings are stale."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from blocksnap.errors import StoreError, TransientStoreError
from blocksnap.store.backend import Capabilities, ObjectInfo, ObjectStore, ObjectWriter

# What changes storage: the operations a fault is injected into by default.
MUTATIONS = frozenset({"create", "put", "write", "sync", "commit", "delete"})
READS = frozenset({"get", "stat", "list"})

T = TypeVar("T")


class InjectedFault(StoreError):
    """The failure FaultyBackend raises (a StoreError, as a real backend's would be)."""


class InjectedTransientFault(TransientStoreError):
    """The failure FaultyBackend raises with transient=True."""


class FaultyBackend:
    """An ObjectStore that passes every call to inner, except that:

    - the operations of the kinds watched (MUTATIONS by default; delete_many counts as
      one delete) are counted from 1, and those numbered fail_at up to fail_at +
      fail_count - 1 fail with InjectedFault (InjectedTransientFault when transient);
      with after=True the operation is carried out first, and its answer lost, as when
      a request succeeds and the connection drops;
    - with stale_list=K, every listing leaves out the K newest objects it would show
      (by mtime), as a store whose listings lag behind its writes does.

    With neither, it is a faithful backend, and the conformance suite holds it to the
    contract like any other.
    """

    def __init__(
        self,
        inner: ObjectStore,
        *,
        fail_at: int | None = None,
        fail_count: int = 1,
        kinds: Iterable[str] = MUTATIONS,
        after: bool = False,
        transient: bool = False,
        stale_list: int = 0,
    ) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.fail_count = fail_count
        self.kinds = frozenset(kinds)
        self.after = after
        self.transient = transient
        self.stale_list = stale_list
        self.count = 0  # operations of the watched kinds so far
        self.injected: list[str] = []  # the operations that were made to fail
        self.log: list[str] = []  # the kind of every operation counted, in order

    def _fails(self, kind: str, name: str) -> StoreError | None:
        """Count the operation; the error to raise if it is one that fails."""
        if kind not in self.kinds:
            return None
        self.count += 1
        self.log.append(kind)
        if self.fail_at is None or not self.fail_at <= self.count < self.fail_at + self.fail_count:
            return None
        what = f"injected fault: {kind} {name} (operation {self.count})"
        self.injected.append(what)
        return InjectedTransientFault(what) if self.transient else InjectedFault(what)

    def run(self, kind: str, name: str, fn: Callable[[], T]) -> T:
        error = self._fails(kind, name)
        if error is not None and not self.after:
            raise error
        result = fn()
        if error is not None:
            raise error
        return result

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def create(self, name: str, *, exclusive: bool = False) -> ObjectWriter:
        writer = self.run("create", name, lambda: self.inner.create(name, exclusive=exclusive))
        return _FaultyWriter(self, name, writer)

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False
    ) -> None:
        self.run("put", name, lambda: self.inner.put(name, data, exclusive=exclusive))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.run("get", name, lambda: self.inner.get(name, offset, length))

    def get_into(self, name: str, buffer: memoryview) -> int:
        return self.run("get", name, lambda: self.inner.get_into(name, buffer))

    def stat(self, name: str) -> ObjectInfo:
        return self.run("stat", name, lambda: self.inner.stat(name))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        found = self.run("list", prefix, lambda: builtins.list(self.inner.list(prefix)))
        if self.stale_list:
            newest = sorted(found, key=lambda o: o.mtime)[-self.stale_list :]
            hidden = {o.name for o in newest}
            found = [o for o in found if o.name not in hidden]
        return iter(found)

    def delete(self, name: str) -> None:
        self.run("delete", name, lambda: self.inner.delete(name))

    def delete_many(self, names: Iterable[str]) -> None:
        batch = builtins.list(names)
        self.run("delete", ",".join(batch), lambda: self.inner.delete_many(batch))

    def leftovers(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.leftovers(prefix)

    def discard_partial(self, name: str) -> None:
        self.run("delete", name, lambda: self.inner.discard_partial(name))

    def close(self) -> None:
        self.inner.close()


class _FaultyWriter:
    """A writer whose injected failure ends it, as the contract has every failed write,
    sync or commit do: the object is aborted and nothing appears under its name."""

    def __init__(self, backend: FaultyBackend, name: str, inner: ObjectWriter) -> None:
        self._backend = backend
        self._name = name
        self._inner = inner

    def _run(self, kind: str, fn: Callable[[], None]) -> None:
        try:
            self._backend.run(kind, self._name, fn)
        except (InjectedFault, InjectedTransientFault):
            if kind != "commit" or not self._backend.after:
                self._inner.abort()
            raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._run("write", lambda: self._inner.write(data))

    def sync(self) -> None:
        self._run("sync", self._inner.sync)

    def commit(self) -> None:
        self._run("commit", self._inner.commit)

    def abort(self) -> None:
        self._inner.abort()  # cleaning up never fails here: the failure before it did
