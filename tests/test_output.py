"""What the CLI prints: names that are not UTF-8 in human and JSON output, image- or
user-chosen text escaped so that it cannot forge lines or drive the terminal, and progress
on a terminal in each phase's unit, leaving nothing behind."""

from __future__ import annotations

import base64
import errno
import fcntl
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import blocksnap
from blocksnap.cli.output import ProgressBar, shown
from blocksnap.model import Progress, ProgressUnit
from tests.conftest import run_cli
from tests.fsimages import build

LATIN1 = b"caf\xe9.txt"  # Latin-1, not UTF-8
ODD_DIR = b"dir\xff\xfe"  # bytes that start no UTF-8 character
LINK = b"link\xe9"


def make_byte_names(root: Path) -> None:
    """A tree whose names are bytes that are not UTF-8: a file, a directory holding a
    file, and a symlink whose target is such a name; and a UTF-8 name beside them."""
    top = os.fsencode(root) + b"/d"
    os.makedirs(top + b"/" + ODD_DIR)
    for name, data in (
        (LATIN1, b"latin-1 name\n"),
        (ODD_DIR + b"/inside.txt", b"inside\n"),
        (b"utf8.txt", b"beside them\n"),
    ):
        fd = os.open(top + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    os.symlink(LATIN1, top + b"/" + LINK)
    (root / "plain.txt").write_text("plain\n")


def _cli_bytes(*args: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """python -m blocksnap with arguments given as the host's bytes, output as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "blocksnap", *args],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


@pytest.fixture(scope="module")
def byte_name_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tree of make_byte_names in ext4 (mkfs.ext4 -d), XFS (a loop mount and cp -a)
    and btrfs (mkfs.btrfs --rootdir)."""
    base = tmp_path_factory.mktemp("bytenames")
    make_byte_names(base / "tree")
    return {
        kind: build(kind, base / "tree", base / f"{kind}.img", 300 if kind == "xfs" else 64)
        for kind in ("ext4", "xfs", "btrfs")
    }


@pytest.mark.parametrize("kind", ["ext4", "xfs", "btrfs"])
def test_names_not_utf8_list_find_and_extract_byte_exact(
    kind: str, byte_name_images: dict[str, Path], tmp_path: Path
) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "vol", str(byte_name_images[kind]), check=True)

    # Human output: the bytes escaped, never raw (run_cli decodes strictly).
    listing = run_cli("ls", repo, "vol", "latest", "/d", "-l", check=True).stdout
    assert "caf\\xe9.txt\n" in listing
    assert "dir\\xff\\xfe\n" in listing
    assert "link\\xe9 -> caf\\xe9.txt\n" in listing
    # A UTF-8 name in a directory of names the libraries cannot decode is found.
    beside = run_cli("cat", repo, "vol", "latest", "/d/utf8.txt", check=True)
    assert beside.stdout == "beside them\n"
    inside = run_cli("ls", repo, "vol", "latest", os.fsdecode(b"/d/" + ODD_DIR), check=True)
    assert inside.stdout == "inside.txt\n"
    found = run_cli("find", repo, "vol", "latest", check=True).stdout.splitlines()
    assert "/d/dir\\xff\\xfe/inside.txt" in found and "/d/caf\\xe9.txt" in found
    # A glob with the byte in it, from argv, matches the name.
    pattern = run_cli("find", repo, "vol", "latest", os.fsdecode(b"caf\xe9*"), check=True)
    assert pattern.stdout == "/d/caf\\xe9.txt\n"

    # JSON: valid UTF-8 strings, and the exact bytes beside them.
    proc = _cli_bytes("ls", repo, "vol", "latest", "/d", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.decode("utf-8"))  # strict: valid UTF-8
    entries = {base64.b64decode(e.get("name_bytes", "")) or e["name"]: e for e in doc["entries"]}
    assert set(entries) == {LATIN1, ODD_DIR, LINK, "utf8.txt"}
    assert "name_bytes" not in entries["utf8.txt"]
    assert entries[LATIN1]["name"] == "caf\ufffd.txt"
    assert base64.b64decode(entries[LATIN1]["path_bytes"]) == b"/d/" + LATIN1
    assert base64.b64decode(entries[LINK]["target_bytes"]) == LATIN1
    proc = _cli_bytes("find", repo, "vol", "latest", "--json")
    doc = json.loads(proc.stdout.decode("utf-8"))
    paths = [
        base64.b64decode(m["path_bytes"]) if "path_bytes" in m else m["path"].encode()
        for m in doc["matches"]
    ]
    assert b"/d/" + ODD_DIR + b"/inside.txt" in paths and b"/plain.txt" in paths
    plain = next(m for m in doc["matches"] if m["path"] == "/plain.txt")
    assert "path_bytes" not in plain and "name_bytes" not in plain

    # Extract: the host names are the exact bytes, the content right.
    out = tmp_path / "out"
    proc = _cli_bytes("extract", repo, "vol", "latest", "/d", "--to", str(out))
    assert proc.returncode == 0, proc.stderr
    top = os.fsencode(out) + b"/d"
    assert sorted(os.listdir(top)) == sorted([LATIN1, ODD_DIR, LINK, b"utf8.txt"])
    with open(top + b"/" + LATIN1, "rb") as f:
        assert f.read() == b"latin-1 name\n"
    with open(top + b"/" + ODD_DIR + b"/inside.txt", "rb") as f:
        assert f.read() == b"inside\n"
    assert os.readlink(top + b"/" + LINK) == LATIN1
    # One file by its path in argv, bytes and all; the JSON report names it exactly.
    one = tmp_path / "one"
    proc = _cli_bytes("extract", repo, "vol", "latest", b"/d/" + LATIN1, "--to", str(one), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.decode("utf-8"))["files"] == 1
    with open(os.fsencode(one) + b"/" + LATIN1, "rb") as f:
        assert f.read() == b"latin-1 name\n"


def test_shown_escapes_controls_and_bytes() -> None:
    assert shown("plain r\u00e9sum\u00e9 \u6f22\u5b57") == "plain r\u00e9sum\u00e9 \u6f22\u5b57"
    assert shown("a\nb\tc\x1b[2J\x7f") == "a\\x0ab\\x09c\\x1b[2J\\x7f"
    assert shown("\x85\x9b\u202e\u2028") == "\\u0085\\u009b\\u202e\\u2028"  # C1, bidi, line
    assert shown(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # a byte that is not UTF-8
    assert shown("\ud800") == "\\ud800"  # an unpaired UTF-16 surrogate (NTFS)
    assert shown("NUL\0") == "NUL\\x00"


def test_labels_with_controls_are_escaped_in_list_and_info(
    tmp_path: Path, ext4_image: Path
) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    label = "line\nforged 2026-01-01 full\x1b[2J\x9b31m"
    run_cli("snapshot", repo, "vol", str(ext4_image), "--label", f"note={label}", check=True)
    for args in (("list", repo), ("list", repo, "vol"), ("info", repo, "vol", "latest")):
        out = run_cli(*args, check=True).stdout
        assert "note=line\\x0aforged 2026-01-01 full\\x1b[2J\\u009b31m" in out
        controls = [c for c in out if c != "\n" and not c.isprintable()]
        assert controls == [], args
        assert "forged" not in "".join(line for line in out.splitlines() if "note=" not in line)
    doc = json.loads(run_cli("info", repo, "vol", "latest", "--json", check=True).stdout)
    assert doc["labels"] == {"note": label}
    doc = json.loads(run_cli("list", repo, "vol", "--json", check=True).stdout)
    assert doc["vol"][0]["labels"] == {"note": label}


def test_error_lines_escape_what_they_quote(tmp_path: Path, ext4_image: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    run_cli("snapshot", repo, "vol", str(ext4_image), check=True)
    proc = run_cli("ls", repo, "vol", "latest", "/no\nsuch\x1b[2J")
    assert proc.returncode != 0
    assert proc.stderr == ("blocksnap: error: /no\\x0asuch\\x1b[2J: no such file or directory\n")
    raw = _cli_bytes("cat", repo, "vol", "latest", b"/caf\xe9")
    assert raw.stderr == b"blocksnap: error: /caf\\xe9: no such file or directory\n"


# Progress on a terminal (cli/output.py ProgressBar): one bar per phase in its unit, and
# nothing of a bar left on the screen.


def _screen(output: str, cols: int = 100) -> list[str]:
    """The lines a terminal shows after `output`: carriage return, newline, backspace,
    cursor up (ESC [ n A) and erase in line (ESC [ n K) are applied, as tqdm and the old
    bar use them; any other escape sequence fails the test."""
    lines: list[list[str]] = [[]]
    row = col = 0
    at = 0
    while at < len(output):
        char = output[at]
        at += 1
        if char == "\x1b":
            match = re.match(r"\[(\d*)([AK])", output[at:])
            assert match, f"unexpected escape sequence {output[at - 1 : at + 8]!r}"
            at += match.end()
            if match.group(2) == "A":
                row = max(0, row - int(match.group(1) or 1))
            else:
                line = lines[row]
                mode = int(match.group(1) or 0)
                if mode == 0:
                    del line[col:]
                else:
                    line[:] = [" "] * len(line) if mode == 2 else [" "] * col + line[col:]
            continue
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            col = 0
            while len(lines) <= row:
                lines.append([])
        elif char == "\b":
            col = max(0, col - 1)
        else:
            line = lines[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = char
            col = min(col + 1, cols - 1)
    return ["".join(line).rstrip() for line in lines]


def _showing(shown_lines: list[str]) -> list[str]:
    return [line for line in shown_lines if line]


def test_progress_bar_one_bar_per_phase_in_its_unit_nothing_stale() -> None:
    out = io.StringIO()
    with ProgressBar(enabled=True, file=out) as bar:
        bar(Progress("read-data", 15 << 20, 30 << 20, ProgressUnit.BYTES))
        [line] = _showing(_screen(out.getvalue()))
        assert line.startswith("read-data:") and "15.0M/30.0M" in line and "B/s" in line
        bar(Progress("read-data", 30 << 20, 30 << 20, ProgressUnit.BYTES))
        bar(Progress("collect", 1234, 0, ProgressUnit.OBJECTS))
        [line] = _showing(_screen(out.getvalue()))  # the previous, longer line is gone
        assert line.startswith("collect: 1234 ") and " objects/s" in line, line
        assert "B/s" not in line and "read" not in line and "1.23k" not in line
        bar(Progress("compact", 2, 3, ProgressUnit.PACKS))
        [line] = _showing(_screen(out.getvalue()))
        assert line.startswith("compact:") and " 2/3 " in line and " packs/s" in line, line
        bar(Progress("snapshots", 1, 7, ProgressUnit.SNAPSHOTS))
        [line] = _showing(_screen(out.getvalue()))
        assert line.startswith("snapshots:") and " 1/7 " in line and " snapshots/s" in line
        assert "packs" not in line and "B/s" not in line
    assert _showing(_screen(out.getvalue())) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, blocksnap.IntegrityError])
def test_progress_bar_cleared_when_the_command_fails(error: type[BaseException]) -> None:
    out = io.StringIO()
    with pytest.raises(error), ProgressBar(enabled=True, file=out) as bar:
        bar(Progress("restore", 5 << 20, 1 << 30, ProgressUnit.BYTES))
        assert _showing(_screen(out.getvalue())) != []
        raise error("stopped")
    assert _showing(_screen(out.getvalue())) == []


class _DeadTerminal(io.StringIO):
    """A terminal that fails every write after the first `good` ones, and then every flush
    (as one that hung up fails with EIO)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def write(self, text: str) -> int:
        if self.good <= 0:
            raise OSError(errno.EIO, "Input/output error")
        self.good -= 1
        return super().write(text)

    def flush(self) -> None:
        if self.good <= 0:
            raise OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("good", [0, 1, 3])
def test_progress_bar_a_failing_terminal_never_stops_the_work(good: int) -> None:
    out = _DeadTerminal(good)
    with ProgressBar(enabled=True, file=out) as bar:
        for phase, unit in (("read", ProgressUnit.BYTES), ("collect", ProgressUnit.OBJECTS)):
            for done in range(0, 5 << 20, 1 << 20):
                bar(Progress(phase, done, 5 << 20, unit))


def test_progress_bar_silent_without_a_terminal() -> None:
    out = io.StringIO()  # not a terminal
    with ProgressBar(file=out) as bar:
        bar(Progress("read", 1 << 20, 2 << 20, ProgressUnit.BYTES))
    assert out.getvalue() == ""


def _cli_on_terminal(*args: str, script: str | None = None) -> tuple[int, str, str]:
    """python -m blocksnap (or `script`, given args as sys.argv[1:]) with stderr a
    pseudo-terminal 100 columns wide: (status, stdout, what the terminal received)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    command = ["-c", script] if script else ["-m", "blocksnap"]
    proc = subprocess.Popen(
        [sys.executable, *command, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    received = bytearray()
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: every holder of the terminal's other side closed it
            break
        if not data:
            break
        received += data
    os.close(master)
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode()
    status = proc.wait(timeout=300)
    return status, stdout, received.decode()


def _phase_shown(terminal: str, phase: str) -> list[str]:
    """Every state of the bar of `phase` that reached the terminal."""
    return [part.strip() for part in terminal.split("\r") if part.startswith(f"{phase}:")]


def test_cli_gc_and_verify_progress_show_counts_not_bytes(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    for seed in (1, 2):
        image = tmp_path / f"v{seed}.img"
        image.write_bytes(random.Random(seed).randbytes(4 << 20))
        run_cli("snapshot", repo, "vol", str(image), check=True)
    run_cli("prune", repo, "vol", "--keep-last", "1", check=True)

    status, stdout, terminal = _cli_on_terminal("gc", repo)
    assert status == 0, terminal
    assert "objects deleted" in stdout
    collect = _phase_shown(terminal, "collect")
    counted = r": \d+ objects \[.*, [?\d.]+ objects/s\]$"
    assert collect and all(re.search(counted, s) for s in collect), collect
    assert all("B/s" not in s for s in collect)
    assert _showing(_screen(terminal)) == []

    status, stdout, terminal = _cli_on_terminal("verify", repo, "--read-data")
    assert status == 0, terminal
    snapshots = _phase_shown(terminal, "snapshots")
    assert snapshots and all(re.search(r" [01]/1 \[.*snapshots/s\]$", s) for s in snapshots)
    read = _phase_shown(terminal, "read-data")
    assert read and all("/4.0" in s and "B/s" in s for s in read), read  # bytes, scaled
    assert _showing(_screen(terminal)) == []


# The CLI with a real Ctrl-C (SIGINT to itself) at the first progress report of `read`.
INTERRUPT_AT_READ = """
import os, signal, sys
from blocksnap.cli import output
shown = output.ProgressBar.__call__
def call(self, p):
    shown(self, p)
    if p.phase == "read":
        os.kill(os.getpid(), signal.SIGINT)
output.ProgressBar.__call__ = call
from blocksnap.__main__ import entry
entry(sys.argv[1:])
"""


def test_cli_progress_leaves_no_bar_after_ctrl_c(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    image = tmp_path / "v.img"
    image.write_bytes(random.Random(3).randbytes(16 << 20))
    status, _, terminal = _cli_on_terminal(
        "snapshot", repo, "vol", str(image), script=INTERRUPT_AT_READ
    )
    assert status == 130, terminal
    assert _phase_shown(terminal, "read"), terminal  # the bar was on the screen
    assert _showing(_screen(terminal)) == [
        "blocksnap: error: snapshot interrupted; nothing was committed"
    ]
