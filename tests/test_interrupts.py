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
