"""What the CLI prints: names that are not UTF-8 in human and JSON output, and image- or
user-chosen text escaped so that it cannot forge lines or drive the terminal."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blocksnap.cli.output import shown
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
