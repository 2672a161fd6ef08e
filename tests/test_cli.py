"""The command line: JSON output, one-line errors, exit codes, no partial state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import blocksnap
from blocksnap.store.backend import TMP_MARKER
from blocksnap.store.index import Index
from tests.conftest import debugfs, run_cli


def test_cli_round_trip_with_json(tmp_path: Path, ext4_image: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    first = json.loads(
        run_cli(
            "snapshot", repo, "vol", str(ext4_image), "--json", "--label", "k=v", check=True
        ).stdout
    )
    debugfs(ext4_image, "write /etc/services services")
    second = json.loads(
        run_cli("snapshot", repo, "vol", str(ext4_image), "--json", check=True).stdout
    )
    assert second["parent"] == first["id"] and second["kind"] == "incremental"
    assert 0 < second["counts"]["stored"] < first["counts"]["stored"]
    listing = json.loads(run_cli("list", repo, "--json", check=True).stdout)
    assert [s["id"] for s in listing["vol"]] == [first["id"], second["id"]]
    info = json.loads(run_cli("info", repo, "vol", first["id"][:8], "--json", check=True).stdout)
    assert info["labels"] == {"k": "v"}
    out = tmp_path / "out.img"
    restored = json.loads(
        run_cli("restore", repo, "vol", "latest", str(out), "--json", check=True).stdout
    )
    assert out.read_bytes() == ext4_image.read_bytes()
    assert restored["blocks_written"] > 0
    # Onto the existing file, only what differs from the older snapshot is written.
    again = json.loads(
        run_cli(
            "restore", repo, "vol", "latest~1", str(out), "--only-changed", "--json", check=True
        ).stdout
    )
    assert 0 < again["blocks_written"] <= second["counts"]["changed"]
    assert again["blocks_unchanged"] > 0
    verify = json.loads(run_cli("verify", repo, "--read-data", "--json", check=True).stdout)
    assert verify["ok"] and verify["snapshots_checked"] == 2
    stats = json.loads(run_cli("stats", repo, "--json", check=True).stdout)
    assert stats["snapshots"] == 2 and stats["ratio"] > 1
    assert "snapshot" in run_cli("--help", check=True).stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["list", "{tmp}/missing"], 3, "does not exist"),
        (["list", "{tmp}"], 3, "not a blocksnap repository"),
        (["info", "{repo}", "novol", "latest"], 3, "does not exist"),
        (["info", "{repo}", "vol", "ffffffff"], 3, "not found"),
        (["info", "{repo}", "vol", "latest~9"], 3, "only 1"),
        (["snapshot", "{repo}", "vol", "{tmp}/nope.img"], 7, "does not exist"),
        (["snapshot", "{repo}", "vol", "{tmp}"], 7, "not a regular file"),
        (["snapshot", "{repo}", "vol", "{img}", "--label", "novalue"], 2, "KEY=VALUE"),
        (["snapshot", "{repo}", "", "{img}"], 2, "volume name"),
        (["restore", "{repo}", "vol", "latest", "{tmp}"], 8, "not a regular file"),
        (["init", "{repo}"], 2, "not an empty directory"),
        (["repair", "{repo}"], 2, "--rebuild-index"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line(
    tmp_path: Path, ext4_image: Path, args: list[str], code: int, words: str
) -> None:
    repo = tmp_path / "repo"
    run_cli("init", str(repo), check=True)
    run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
    before = sorted(p.name for p in (repo / "packs").rglob("*"))
    proc = run_cli(*[a.format(tmp=tmp_path, repo=repo, img=ext4_image) for a in args])
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert words in proc.stderr
    assert sorted(p.name for p in (repo / "packs").rglob("*")) == before


def test_ctrl_c_leaves_repository_unchanged(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    run_cli("init", str(repo), check=True)
    image = tmp_path / "big.img"
    image.write_bytes(os.urandom(384 << 20))
    interrupted = completed = 0
    for delay in (0.3, 0.15, 0.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "blocksnap", "snapshot", str(repo), "vol", str(image)],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Once its writer session exists, blocksnap handles Ctrl-C (before that, on a
        # loaded machine, the signal can land while Python itself is still starting).
        deadline = time.monotonic() + 60
        while not list((repo / "locks").glob("writer-*.lock")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the snapshot never registered its writer"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
        if proc.returncode == 130:
            interrupted += 1
            assert err.count("\n") == 1 and "interrupted" in err
        else:
            assert proc.returncode == 0, err
            completed += 1
    assert interrupted > 0
    with blocksnap.Repository(repo) as r:
        assert len(r.snapshots("vol")) == completed
        assert r.verify().ok


def test_disk_full_is_one_line_and_commits_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        repo = mnt / "repo"
        run_cli("init", str(repo), check=True)
        image = tmp_path / "rand.img"
        image.write_bytes(os.urandom(16 << 20))
        proc = run_cli("snapshot", str(repo), "vol", str(image))
        assert proc.returncode == blocksnap.StoreError.exit_code
        assert proc.stderr.count("\n") == 1 and "disk full" in proc.stderr
        with blocksnap.Repository(repo) as r:
            assert r.snapshots("vol") == []
            assert r.verify().ok
        assert not list(repo.rglob(f"*{TMP_MARKER}*"))  # the pack being written is gone
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_init_completes_or_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed init leaves the path as it found it; one killed at any moment is retried."""

    def disk_full(self: object, repository_id: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Index, "initialize", disk_full)
        with pytest.raises(blocksnap.StoreError, match="No space left"):
            blocksnap.Repository.init(tmp_path / "absent")
        (tmp_path / "empty").mkdir()
        with pytest.raises(blocksnap.StoreError):
            blocksnap.Repository.init(tmp_path / "empty")
    assert not (tmp_path / "absent").exists() and os.listdir(tmp_path / "empty") == []
    for i, delay in enumerate([0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6]):
        repo = str(tmp_path / f"killed{i}")
        child = subprocess.Popen(
            [sys.executable, "-m", "blocksnap", "init", repo],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if not os.path.exists(os.path.join(repo, "config")):
            run_cli("init", repo, check=True)
        assert run_cli("verify", repo).returncode == 0
    # A directory that holds anything else is never taken over.
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    proc = run_cli("init", str(tmp_path / "used"))
    assert proc.returncode == 2 and "not an empty directory" in proc.stderr


def _command_line_started(pid: int) -> bool:
    """Whether blocksnap's own code runs in pid (its native module is being loaded, after
    its Ctrl-C handler was installed); before that only Python itself is starting."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "_native.abi3.so" in f.read()
    except FileNotFoundError:
        return True  # gone already


def _run_interrupted(args: list[str], delay: float | None) -> tuple[int, str, str, float]:
    """Run python -m blocksnap args, pressing Ctrl-C delay seconds after its own code
    started (never, for None); (status, stdout, stderr, seconds from start to exit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "blocksnap", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    while proc.poll() is None and not _command_line_started(proc.pid):
        time.sleep(0.0005)
    started = time.monotonic()
    if delay is not None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err, time.monotonic() - started


# Moments to press Ctrl-C, as fractions of the command's undisturbed run: across it, and
# closely around its end, where the interpreter finishes the command and shuts down.
_MOMENTS = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.88, 0.93, 0.96, 0.98, 1.0, 1.02, 1.05, 1.1)


@pytest.mark.parametrize("command", ["list", "snapshot", "restore"])
def test_ctrl_c_at_any_moment_exits_0_or_130_with_one_line(
    command: str, ext4_image: Path, tmp_path: Path
) -> None:
    """Ctrl-C from the start of blocksnap's code to the process's end: exit 0 with the
    command's whole result (it came too late to stop it), or 130 with one line and
    nothing of the command kept; never death by the signal, never a traceback."""
    repo = tmp_path / "repo"
    run_cli("init", str(repo), check=True)
    run_cli("snapshot", str(repo), "vol", str(ext4_image), check=True)
    targets = tmp_path / "targets"
    targets.mkdir()

    def args(run: int) -> list[str]:
        if command == "list":
            return ["list", str(repo), "vol"]
        if command == "snapshot":
            return ["snapshot", str(repo), "vol", str(ext4_image), "--full"]
        return ["restore", str(repo), "vol", "latest", str(targets / f"{run}.img")]

    status, _out, err, duration = _run_interrupted(args(-1), None)
    assert status == 0, err
    completed = 0
    for run, moment in enumerate(_MOMENTS):
        status, out, err, _ = _run_interrupted(args(run), moment * duration)
        assert status in (0, 130), (moment, status, err)
        assert "Traceback" not in err and "Exception ignored" not in err, (moment, err)
        if status == 130:
            assert err.count("\n") == 1, (moment, err)
            assert err.startswith("blocksnap: error: ") and "interrupted" in err, (moment, err)
        else:
            completed += 1
            assert out.strip(), moment  # the whole result was printed
            assert err in (
                "",
                "blocksnap: Ctrl-C came too late to stop the command; it had finished\n",
            ), (moment, err)
        if command == "restore":
            target = targets / f"{run}.img"
            if status == 0:
                assert target.read_bytes() == ext4_image.read_bytes(), moment
            else:
                assert not target.exists(), moment
            assert [p.name for p in targets.iterdir() if "blocksnap" in p.name] == [], moment
    with blocksnap.Repository(repo) as r:
        if command == "snapshot":
            assert len(r.snapshots("vol")) == 1 + 1 + completed  # and the undisturbed run
        report = r.verify(read_data=True)
        assert report.ok and not report.leftovers, (report.problems, report.leftovers)


def test_non_utf8_repository_paths_work_and_non_utf8_names_are_refused(
    tmp_path: Path, ext4_image: Path
) -> None:
    """Linux paths are bytes: a Latin-1 repository path works end to end; volume names and
    labels are text in the records, so bytes that are not UTF-8 are a one-line refusal."""
    repo = os.fsdecode(bytes(tmp_path) + b"/d\xe9p\xf4t")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "vol", str(ext4_image), check=True)
    out = tmp_path / "out.img"
    run_cli("restore", repo, "vol", "latest", str(out), check=True)
    assert out.read_bytes() == ext4_image.read_bytes()
    assert run_cli("verify", repo, "--read-data").returncode == 0
    for args, words in [
        (["snapshot", repo, os.fsdecode(b"vol\xe9"), str(ext4_image)], "volume name"),
        (["snapshot", repo, "vol", str(ext4_image), "--label", os.fsdecode(b"k=\xff")], "label"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert len(json.loads(run_cli("list", repo, "--json", check=True).stdout)["vol"]) == 1
