"""RetryingBackend: transient failures are retried, boundedly; nothing else is."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocksnap.errors import ObjectExistsError, StoreError, TransientStoreError
from blocksnap.store.backend import LocalBackend
from blocksnap.store.retrying import RetryingBackend
from tests.faults import FaultyBackend, InjectedFault

Wrapped = tuple[RetryingBackend, FaultyBackend, list[float]]


def _wrapped(tmp_path: Path, **faults: object) -> Wrapped:
    faulty = FaultyBackend(LocalBackend(str(tmp_path)), **faults)  # type: ignore[arg-type]
    delays: list[float] = []
    return RetryingBackend(faulty, attempts=4, base_delay=0.5, sleep=delays.append), faulty, delays


@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("kind", ["put", "get", "stat", "list", "delete"])
def test_retrying_backend_absorbs_transient_failures(
    tmp_path: Path, kind: str, after: bool
) -> None:
    store, faulty, delays = _wrapped(
        tmp_path, fail_at=1, fail_count=2, kinds={kind}, transient=True, after=after
    )
    faulty.inner.put("packs/aa/x", b"data")
    if kind == "put":
        store.put("packs/aa/x", b"new")
        assert faulty.inner.get("packs/aa/x") == b"new"
    elif kind == "get":
        assert store.get("packs/aa/x", 1, 2) == b"at"
    elif kind == "stat":
        assert store.stat("packs/aa/x").size == 4
    elif kind == "list":
        assert [o.name for o in store.list("packs/")] == ["packs/aa/x"]
    else:
        store.delete("packs/aa/x")
        assert not list(faulty.inner.list(""))
    assert len(faulty.injected) == 2 and store.retries == 2
    assert delays == [0.5, 1.0]  # backoff doubles


def test_retrying_backend_gives_up_after_its_attempts(tmp_path: Path) -> None:
    store, faulty, delays = _wrapped(tmp_path, fail_at=1, fail_count=100, transient=True)
    with pytest.raises(TransientStoreError, match="injected"):
        store.put("packs/aa/x", b"data")
    assert len(faulty.injected) == 4 and len(delays) == 3


def test_retrying_backend_passes_other_errors_at_once(tmp_path: Path) -> None:
    store, faulty, delays = _wrapped(tmp_path, fail_at=1, fail_count=100)
    with pytest.raises(InjectedFault):
        store.put("packs/aa/x", b"data")
    assert len(faulty.injected) == 1 and delays == []
    with pytest.raises(StoreError, match="invalid object name"):
        store.get("../x")


def test_retrying_exclusive_put_whose_answer_was_lost_succeeds(tmp_path: Path) -> None:
    """The first attempt stored the object and its answer was lost: the retry finds the
    name taken by exactly these bytes, so the put succeeded."""
    store, faulty, _ = _wrapped(tmp_path, fail_at=1, kinds={"put"}, transient=True, after=True)
    store.put("snapshots/s", b"mine", exclusive=True)
    assert faulty.inner.get("snapshots/s") == b"mine" and store.retries == 1
    # Someone else's object under the name is still a lost race.
    with pytest.raises(ObjectExistsError):
        store.put("snapshots/s", b"other", exclusive=True)
