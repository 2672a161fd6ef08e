"""The engine's own operations over a backend that fails: after each injected fault, the
operation raised a typed error, nothing committed before is lost, and verify passes."""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import BlocksnapError
from blocksnap.store.repository import local_backend
from tests.conftest import debugfs
from tests.faults import MUTATIONS, FaultyBackend

SAMPLES = 30  # fault positions tried per mode, spread over a clean run's operations


@dataclass(slots=True)
class Template:
    """A repository with one committed snapshot, and the images of the steps after it."""

    repo: Path
    first: str
    images: dict[str, bytes]  # snapshot id (or "next", "last") -> image bytes
    changed: Path  # the image the incremental takes
    last: Path  # the image the full takes, changed again


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, ext4_base: Path) -> Template:
    base = tmp_path_factory.mktemp("faults")
    image = base / "vol.img"
    shutil.copyfile(ext4_base, image)
    repo = base / "repo"
    # Packs of a few parts, synced once: faults land between parts, syncs, pack commits,
    # index commits and the snapshot commit.
    with blocksnap.Repository.init(repo, pack_target_size=5 << 20) as r:
        first = r.snapshot("vol", image).id
    images = {first: image.read_bytes()}
    # Enough new data for several packs in each faulted snapshot.
    (base / "new1").write_bytes(random.Random(1).randbytes(5 << 20))
    (base / "new2").write_bytes(random.Random(2).randbytes(5 << 20))
    debugfs(image, f"write {base / 'new1'} new1", "rm /docs/note3.txt")
    images["next"] = image.read_bytes()
    last = base / "last.img"
    shutil.copyfile(image, last)
    debugfs(last, f"write {base / 'new2'} new2", "rm /docs/note4.txt")
    images["last"] = last.read_bytes()
    return Template(repo, first, images, image, last)


@dataclass(slots=True)
class Outcome:
    failed_step: str | None  # the step that raised, None when every step succeeded
    error: BaseException | None
    must_exist: set[str]  # snapshots committed and not meant to be removed at the fault
    starts: dict[str, int]  # step -> the backend's operation count when it began


def _steps(repo: blocksnap.Repository, template: Template, must_exist: set[str]) -> Iterator[str]:
    """Run the engine's operations one by one, yielding each one's name before it runs
    and keeping must_exist up to date as they commit."""
    yield "incremental"
    second = repo.snapshot("vol", template.changed).id
    template.images[second] = template.images["next"]
    must_exist.add(second)
    yield "protect"
    repo.protect("vol", second)
    yield "prune"
    must_exist.discard(template.first)  # may go from here on: prune removes it
    repo.prune(policy=blocksnap.Policy(keep_last=1))
    yield "gc"
    repo.gc(compact_below=1.0)
    yield "full"
    third = repo.snapshot("vol", template.last, full=True).id
    template.images[third] = template.images["last"]
    must_exist.add(third)
    yield "verify"
    report = repo.verify(read_data=True)
    assert report.ok, report.problems


def _run(path: Path, template: Template, backend: FaultyBackend) -> Outcome:
    must_exist = {template.first}
    starts: dict[str, int] = {}
    step: str | None = None
    try:
        with blocksnap.Repository(path, backend=backend) as repo:
            for name in _steps(repo, template, must_exist):
                step = name
                starts[name] = backend.count
    except BaseException as exc:  # anything but a BlocksnapError fails the caller's check
        return Outcome(step, exc, must_exist, starts)
    return Outcome(None, None, must_exist, starts)


def _check_intact(path: Path, template: Template, outcome: Outcome, tmp: Path) -> None:
    """Over a faithful backend: every snapshot there restores to its image, none that
    must exist is missing, and after a gc verify passes and finds no leftovers."""
    with blocksnap.Repository(path) as repo:
        present = {s.id for s in repo.snapshots("vol")}
        assert outcome.must_exist <= present, (outcome.failed_step, outcome.error)
        for snapshot_id in present:
            out = tmp / "restored.img"
            repo.restore("vol", snapshot_id, out)
            got = out.read_bytes()
            # A snapshot whose commit raised has an id nobody learnt: it is one of these.
            want = template.images.get(snapshot_id)
            assert (
                got == want if want else got in (template.images["next"], template.images["last"])
            )
            out.unlink()
        repo.gc()
        report = repo.verify(read_data=True)
        assert report.ok, (outcome.failed_step, outcome.error, report.problems)
        assert not report.leftovers, (outcome.failed_step, outcome.error, report.leftovers)
        # verify looks from the index at storage; this looks back: no pack nothing indexes.
        stray = [
            o.name
            for o in repo.store.backend.list("packs/")
            if not repo.store.index.has_pack(bytes.fromhex(o.name.rsplit("/", 1)[1]))
        ]
        assert not stray, (outcome.failed_step, outcome.error, stray)


def _fresh(template: Template, tmp: Path) -> Path:
    path = tmp / "repo"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(template.repo, path)
    return path


def _positions(log: list[str], starts: dict[str, int]) -> list[int]:
    """SAMPLES operations spread over a clean run whose operations were log, and the
    first and last of every step and of every kind of operation."""
    total = len(log)
    if total <= SAMPLES:
        return list(range(1, total + 1))
    ends = sorted({*starts.values(), total})
    edges = {start + 1 for start in ends[:-1]} | set(ends[1:])
    for kind in set(log):
        edges |= {log.index(kind) + 1, total - log[::-1].index(kind)}
    spread = {1 + (total - 1) * i // (SAMPLES - 1) for i in range(SAMPLES)}
    return sorted(n for n in edges | spread if 1 <= n <= total)


@pytest.mark.parametrize("after", [False, True], ids=["fails", "answer-lost"])
def test_engine_survives_a_fault_at_every_sampled_operation(
    template: Template, tmp_path: Path, after: bool
) -> None:
    clean = FaultyBackend(local_backend(str(_fresh(template, tmp_path))))
    outcome = _run(tmp_path / "repo", template, clean)
    assert outcome.error is None, outcome.error
    assert clean.count > 20 and set(clean.log) == MUTATIONS, clean.log
    failed_steps = set()
    failed_kinds = set()
    for n in _positions(clean.log, outcome.starts):
        path = _fresh(template, tmp_path)
        faulty = FaultyBackend(local_backend(str(path)), fail_at=n, after=after)
        outcome = _run(path, template, faulty)
        assert faulty.injected, n
        failed_kinds.add(faulty.log[n - 1])
        if outcome.error is not None:
            assert isinstance(outcome.error, BlocksnapError), (n, repr(outcome.error))
            failed_steps.add(outcome.failed_step)
        _check_intact(path, template, outcome, tmp_path)
    # The sample reached every step that writes.
    assert {"incremental", "prune", "gc", "full"} <= failed_steps, failed_steps
    assert failed_kinds == MUTATIONS, failed_kinds


def test_engine_with_stale_listings_loses_nothing(template: Template, tmp_path: Path) -> None:
    """Listings that leave out the newest objects: the operations work or fail with a
    typed error, and nothing committed is lost."""
    path = _fresh(template, tmp_path)
    outcome = _run(path, template, FaultyBackend(local_backend(str(path)), stale_list=3))
    assert outcome.error is None, (outcome.failed_step, repr(outcome.error))
    _check_intact(path, template, outcome, tmp_path)
