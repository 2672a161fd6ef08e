"""Peak memory (RSS) of every command a backup cycle runs: it must not grow with image size.

Each operation runs as `python -m blocksnap` in a child process, which reports its own
peak RSS (VmHWM) on exit.  The sizes come from BLOCKSNAP_BENCH_MEMORY_MB; every command
must stay under 100 MiB (issue #18's target).

The child also samples its RssAnon and RssFile every 10 ms, and the peaks of the two are
recorded apart: the private memory (heap, buffers, caches) and the file pages mapped,
which are the libraries' code and the pages of the LMDB index that the command read.
Those are the page cache's, clean or being written back, shared and given back by the
kernel without swapping; they follow the size of the index, not what blocksnap holds.
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
import os, runpy, sys, threading, time
peaks = {"RssAnon": 0, "RssFile": 0}
def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                if k in ("VmHWM", "RssAnon", "RssFile")}
def sample():
    while True:
        now = status()
        for key in peaks:
            peaks[key] = max(peaks[key], now[key])
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
def report():
    now = status()
    anon, file = (max(peaks[k], now[k]) for k in ("RssAnon", "RssFile"))
    sys.stderr.write(f"\\nVmHWM {now['VmHWM']} {anon} {file}\\n")
    sys.stderr.flush()
exit_now = os._exit
def reported_exit(code):
    report()
    exit_now(code)
os._exit = reported_exit
runpy.run_module("blocksnap", run_name="__main__", alter_sys=True)
"""


def peak_rss_mib(*args: str) -> tuple[float, float, float]:
    """Run blocksnap with args; its peak resident set size in MiB, and the sampled peaks
    of its private (anonymous) and file-mapped parts."""
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
    hwm, anon, file = (int(v) / 1024 for v in last[1:4])
    return hwm, anon, file


@pytest.mark.parametrize("size_mb", MEMORY_MB)
def test_peak_memory(benchmark: Any, images: ImageFactory, tmp_path: Path, size_mb: int) -> None:
    image, changed = images(size_mb)
    repo = str(tmp_path / "repo")
    peaks: dict[str, tuple[float, float, float]] = {}

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
    benchmark.extra_info["peak_rss_mib"] = {k: round(v[0], 1) for k, v in peaks.items()}
    benchmark.extra_info["peak_anon_mib"] = {k: round(v[1], 1) for k, v in peaks.items()}
    benchmark.extra_info["peak_file_mib"] = {k: round(v[2], 1) for k, v in peaks.items()}
    for operation, (peak, _anon, _file) in peaks.items():
        assert peak < LIMIT_MIB, f"{operation} of a {size_mb} MiB image peaked at {peak:.0f} MiB"
