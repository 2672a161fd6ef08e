"""Peak memory (RSS) of every command a backup cycle runs: it must not grow with image size.

Each operation runs as `python -m blocksnap` in a child process, which reports its own
peak RSS (VmHWM) on exit.  The sizes come from BLOCKSNAP_BENCH_MEMORY_MB; every command
must stay under 100 MiB (issue #18's target).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conftest import MEMORY_MB, ImageFactory

LIMIT_MIB = 100


# Runs the CLI, then prints the process's high-water RSS (VmHWM, reset by exec, so the
# parent's size does not leak in as it does with wait4's ru_maxrss) as the last stderr line.
# The CLI ends with os._exit (no atexit), so the report runs just before it.
_WRAPPER = """
import os, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\\nVmHWM " + line.split()[1] + "\\n")
            sys.stderr.flush()
exit_now = os._exit
def reported_exit(status):
    report()
    exit_now(status)
os._exit = reported_exit
runpy.run_module("blocksnap", run_name="__main__", alter_sys=True)
"""


def peak_rss_mib(*args: str) -> float:
    """Run blocksnap with args and return its peak resident set size in MiB."""
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.strip().splitlines()[-1].split()
    assert last[0] == "VmHWM", proc.stderr
    return int(last[1]) / 1024


@pytest.mark.parametrize("size_mb", MEMORY_MB)
def test_peak_memory(benchmark: Any, images: ImageFactory, tmp_path: Path, size_mb: int) -> None:
    image, changed = images(size_mb)
    repo = str(tmp_path / "repo")
    peaks: dict[str, float] = {}

    def run() -> None:
        subprocess.run(
            [sys.executable, "-m", "blocksnap", "init", repo], check=True, capture_output=True
        )
        peaks["full snapshot"] = peak_rss_mib("snapshot", repo, "vol", str(image))
        peaks["incremental"] = peak_rss_mib("snapshot", repo, "vol", str(changed))
        peaks["restore"] = peak_rss_mib("restore", repo, "vol", "latest", str(tmp_path / "r"))
        peaks["verify --read-data"] = peak_rss_mib("verify", repo, "--read-data")
        peaks["ls -l"] = peak_rss_mib("ls", repo, "vol", "latest", "/data", "-l")
        files = str(tmp_path / "files")
        peaks["extract a tree"] = peak_rss_mib(
            "extract", repo, "vol", "latest", "/data", "--to", files
        )
        peaks["prune"] = peak_rss_mib("prune", repo, "--keep-last", "1")
        peaks["gc"] = peak_rss_mib("gc", repo)

    benchmark.pedantic(run, rounds=1)
    benchmark.extra_info["image_mb"] = size_mb
    benchmark.extra_info["peak_rss_mib"] = {k: round(v, 1) for k, v in peaks.items()}
    for operation, peak in peaks.items():
        assert peak < LIMIT_MIB, f"{operation} of a {size_mb} MiB image peaked at {peak:.0f} MiB"
