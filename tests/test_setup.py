"""The test set-up on a fresh machine: every tool the tests run is named with its package."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import TOOL_PACKAGES, _missing_tool

ROOT = Path(__file__).resolve().parent.parent


def test_every_tool_the_tests_run_names_its_package_and_setup_installs_it() -> None:
    setup = (ROOT / ".ci" / "setup").read_text()
    installed = set(re.search(r"packages=\(([^)]*)\)", setup).group(1).split())  # type: ignore[union-attr]
    for tool, package in TOOL_PACKAGES.items():
        assert package in installed or package == "mount or util-linux", (tool, package)
    # Each tool the image builders call by name (tests/fsimages.py, tests/conftest.py).
    builders = (ROOT / "tests" / "fsimages.py").read_text() + (
        ROOT / "tests" / "conftest.py"
    ).read_text()
    for tool in re.findall(r'"(mkfs\.[a-z0-9]+|mkntfs|mcopy|sgdisk|sfdisk|pvcreate)"', builders):
        assert tool in TOOL_PACKAGES, tool


def test_a_missing_tool_names_its_package() -> None:
    message = _missing_tool(FileNotFoundError(2, "No such file or directory", "mkfs.exfat"))
    assert message == (
        "mkfs.exfat is not installed: apt-get install exfatprogs (or run bash .ci/setup as root)"
    )
    assert _missing_tool(FileNotFoundError(2, "No such file or directory", "/tmp/x.img")) is None
