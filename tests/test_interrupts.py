"""Ctrl-C in the command line: raised once, never inside the import machinery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from blocksnap import interrupts
interrupts.install()
try:
    import slowly_imported  # sends itself SIGINT half-way through its own import
    time.sleep(2)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted after the import:", slowly_imported.done)
"""

MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
for _ in range(20):
    time.sleep(0.005)
done = True
"""


def test_a_ctrl_c_during_an_import_is_raised_after_it(tmp_path: Path) -> None:
    (tmp_path / "slowly_imported.py").write_text(MODULE)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout == "interrupted after the import: True\n", (proc.stdout, proc.stderr)
    assert proc.stderr == ""


POLLER = r"""
import os, random, signal, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, sys.argv[1])
from blocksnap import interrupts
interrupts.install()
for trial in range(int(sys.argv[2])):
    interrupts._state.update(pressed=False, raised=False, settled=False, pending=False)
    pool = ThreadPoolExecutor(1)
    try:
        timer = threading.Timer(random.uniform(0.002, 0.006), os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        while True:  # as a writer polls its background work (StoreWriter._reap)
            task = pool.submit(time.sleep, 0.0002)
            while not task.done():
                pass
    except KeyboardInterrupt:
        pass
    timer.join()
    done = threading.Event()
    def watchdog():
        if not done.wait(10):
            print(f"deadlock in trial {trial}", flush=True)
            os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()
    pool.shutdown(wait=True)  # the worker sets its last result: the future's lock is free
    done.set()
print("ok", flush=True)
"""


def test_a_ctrl_c_never_leaves_a_futures_lock_held() -> None:
    """Python's handler raises KeyboardInterrupt inside a Condition's __enter__ right
    after its lock is taken (every Future.done() takes one), so the lock stays held and
    the worker that finishes the future waits forever, and shutdown with it: a snapshot
    once hung so after Ctrl-C.  Ours raises it once threading's code has returned."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-c", POLLER, root, "300"], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout == "ok\n", (proc.stdout, proc.stderr)
