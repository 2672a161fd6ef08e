"""Prune and gc under fire: kill -9 at many moments, and a minute of concurrent processes."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.retention import Policy
from tests.conftest import debugfs, make_tree, mkfs_ext4

KILL_MOMENTS = 22
START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
# Imports first, then says "ready", so a kill lands in the command's work, not start-up.
RUNNER = (
    "import sys, blocksnap.cli as c; print('ready', flush=True); sys.exit(c.main(sys.argv[1:]))"
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A repository with 24 snapshots of a changing ext4 image, and each one's digest."""
    base = tmp_path_factory.mktemp("history")
    make_tree(base / "tree", seed=3, size_mb=4)
    image = mkfs_ext4(base / "vol.img", base / "tree", 16)
    digests = {}
    with blocksnap.Repository.init(base / "repo", pack_target_size=256 << 10) as repo:
        for i in range(24):
            debugfs(image, f"write /etc/services s{i}", f"rm data/blob{i % 6}.bin")
            info = repo.snapshot("vol", image, taken_at=START + datetime.timedelta(hours=i))
            digests[info.id] = digest(image)
    return base / "repo", digests


def run_killed(args: list[str], delay: float) -> int:
    """Run a CLI command, SIGKILL it delay seconds into its work; its exit status or -9."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def work_time(args: list[str]) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    began = time.perf_counter()
    proc.communicate()
    assert proc.returncode == 0
    return time.perf_counter() - began


def check_after_crash(repo_path: Path, digests: dict[str, str], tmp: Path) -> None:
    """No committed snapshot lost a block, verify passes, and the next gc reclaims all."""
    with blocksnap.Repository(repo_path) as repo:
        remaining = repo.snapshots("vol")
        report = repo.verify()
        assert report.ok, report.problems
        for info in remaining:
            target = tmp / "r.img"
            target.unlink(missing_ok=True)
            repo.restore("vol", info.id, target)
            assert digest(target) == digests[info.id]
        gc = repo.gc(compact_below=0.9)
        assert gc.unreferenced_left == 0 and not gc.problems
        final = repo.verify(read_data=True)
        assert final.ok and final.unreferenced_objects == 0, final.problems
        on_disk = {o.name for o in repo.store.backend.list("packs/")}
        assert on_disk == {f"packs/{p.hex()[:2]}/{p.hex()}" for p in repo.store.index.pack_infos()}
        assert not list((repo_path / "locks").glob("writer-*"))
        assert not list(repo_path.rglob("*.tmp-*"))


def kill_sweep(
    source: Path, args: list[str], digests: dict[str, str], tmp: Path
) -> set[tuple[int, int, int]]:
    """Run the command on copies of source, killed at KILL_MOMENTS points spread over its
    uninterrupted duration; check each copy; return the distinct states the kills left
    (snapshots, indexed objects, packs)."""
    probe = tmp / "probe"
    shutil.copytree(source, probe)
    duration = work_time([a.format(repo=probe) for a in args])
    states = set()
    for i in range(KILL_MOMENTS):
        trial = tmp / f"t{i}"
        shutil.copytree(source, trial)
        run_killed([a.format(repo=trial) for a in args], duration * i / (KILL_MOMENTS - 2))
        with blocksnap.Repository(trial) as repo:
            index = repo.store.index
            states.add((len(repo.snapshots("vol")), index.object_count(), len(index.pack_infos())))
        check_after_crash(trial, digests, tmp)
        shutil.rmtree(trial)
    return states


@pytest.mark.slow
def test_kill_during_prune_at_many_moments(
    history: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    source, digests = history
    states = kill_sweep(source, ["prune", "{repo}", "vol", "--keep-last", "2"], digests, tmp_path)
    # The kills landed at different stages: before, during and after the removals.
    assert len({snapshots for snapshots, _, _ in states}) >= 3, states


def test_kill_during_gc_at_many_moments(
    history: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    source, digests = history
    pruned = tmp_path / "pruned"
    shutil.copytree(source, pruned)
    with blocksnap.Repository(pruned) as repo:
        repo.prune(policy=Policy(keep_last=2))
    states = kill_sweep(pruned, ["gc", "{repo}", "--compact-below", "1"], digests, tmp_path)
    assert len(states) >= 3, states


LOOPS = textwrap.dedent(
    """
    import hashlib, json, os, random, subprocess, sys, time
    import blocksnap
    from blocksnap.retention import Policy

    role, repo_path, work, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    end = time.monotonic() + seconds
    log = os.path.join(work, "digests.jsonl")
    rng = random.Random(role)
    count = 0
    while time.monotonic() < end:
        with blocksnap.Repository(repo_path) as repo:
            if role == "snapshot":
                image = os.path.join(work, "vol.img")
                blob = f"data/blob{count % 5}.bin"
                script = f"write /etc/services n{count}\\nrm {blob}\\nwrite /etc/passwd {blob}\\n"
                subprocess.run(["debugfs", "-w", "-f", "-", image], check=True,
                               capture_output=True, input=script.encode())
                data = open(image, "rb").read()
                made = [repo.snapshot("vol", image, full=count % 7 == 6)]
                if count % 5 == 4:
                    made.append(repo.synthesize("vol", made[0].id))
                with open(log, "a") as f:
                    for info in made:
                        f.write(json.dumps({"id": info.id,
                                            "sha": hashlib.sha256(data).hexdigest()}) + "\\n")
            elif role == "restore":
                known = {}
                if os.path.exists(log):
                    for line in open(log):
                        entry = json.loads(line)
                        known[entry["id"]] = entry["sha"]
                listed = [s.id for s in repo.snapshots("vol") if s.id in known]
                if listed:
                    pick = rng.choice(listed)
                    target = os.path.join(work, "restore.img")
                    try:
                        repo.restore("vol", pick, target)
                        ok = hashlib.sha256(open(target, "rb").read()).hexdigest() == known[pick]
                        outcome = "ok" if ok else "WRONG BYTES"
                    except blocksnap.BlocksnapError as exc:
                        outcome = f"error: {type(exc).__name__}: {exc}"
                    with open(os.path.join(work, "restores.jsonl"), "a") as f:
                        f.write(json.dumps({"id": pick, "outcome": outcome}) + "\\n")
            else:
                repo.prune("vol", Policy(keep_last=3))
                repo.gc(compact_below=0.9)
        count += 1
    print(count)
    """
)


@pytest.mark.slow
def test_snapshots_restores_and_prune_gc_run_at_once(tmp_path: Path) -> None:
    seconds = float(os.environ.get("BLOCKSNAP_CONCURRENCY_SECONDS", "60"))
    make_tree(tmp_path / "tree", seed=5, size_mb=6)
    image = mkfs_ext4(tmp_path / "vol.img", tmp_path / "tree", 24)
    repo_path = tmp_path / "repo"
    with blocksnap.Repository.init(repo_path, pack_target_size=1 << 20) as repo:
        first = repo.snapshot("vol", image)
    entry = {"id": first.id, "sha": digest(image)}
    (tmp_path / "digests.jsonl").write_text(json.dumps(entry) + "\n")
    script = tmp_path / "loops.py"
    script.write_text(LOOPS)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/sbin:/usr/sbin"}
    procs = {
        role: subprocess.Popen(
            [sys.executable, str(script), role, str(repo_path), str(tmp_path), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for role in ("snapshot", "restore", "prune")
    }
    rounds = {}
    for role, proc in procs.items():
        out, err = proc.communicate(timeout=seconds + 300)
        assert proc.returncode == 0, f"{role} loop failed: {err}"
        rounds[role] = int(out)
    assert min(rounds.values()) >= 3, rounds

    digests = {
        e["id"]: e["sha"]
        for e in map(json.loads, (tmp_path / "digests.jsonl").read_text().splitlines())
    }
    restores = [json.loads(line) for line in (tmp_path / "restores.jsonl").read_text().splitlines()]
    assert not [r for r in restores if r["outcome"] == "WRONG BYTES"]
    with blocksnap.Repository(repo_path) as repo:
        remaining = {s.id for s in repo.snapshots("vol")}
        # A restore may fail only because its snapshot was pruned meanwhile.
        failed = [r for r in restores if r["outcome"] != "ok"]
        assert all(r["id"] not in remaining for r in failed), failed
        assert sum(r["outcome"] == "ok" for r in restores) >= 3
        for info in repo.snapshots("vol"):
            target = tmp_path / "final.img"
            target.unlink(missing_ok=True)
            repo.restore("vol", info.id, target)
            assert digest(target) == digests[info.id]
        report = repo.verify(read_data=True)
        assert report.ok, report.problems
        assert repo.gc().unreferenced_left == 0
        assert repo.verify().unreferenced_objects == 0
