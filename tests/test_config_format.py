"""The repository config of format 2 (store/config.py): its frame, its compatibility rule,
and what the command line says about a config it cannot or must not use."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

import blocksnap
from blocksnap.errors import IntegrityError, NotFoundError, UnsupportedFormatError
from blocksnap.store import config
from tests.conftest import flip, run_cli

# A config as init writes it, with fixed identity and content parameters.
GOLDEN = bytes.fromhex(
    "4253434f4e460001"  # b"BSCONF", frame version 1
    "4954ec5970e8a2a3e8808795d30bbb2d5fadd1bbba240b6491f6ff2808faf234"  # BLAKE3-256
) + (
    b"{\n"
    b'  "format": "blocksnap-repository",\n'
    b'  "version": 2,\n'
    b'  "min_reader_version": 2,\n'
    b'  "min_reader_release": "0.2.0",\n'
    b'  "min_writer_release": "0.2.0",\n'
    b'  "features": [],\n'
    b'  "write_features": [],\n'
    b'  "repository": {\n'
    b'    "id": "00112233445566778899aabbccddeeff",\n'
    b'    "created": "2026-01-02T03:04:05Z"\n'
    b"  },\n"
    b'  "content": {\n'
    b'    "id": "ffeeddccbbaa99887766554433221100",\n'
    b'    "block_id": "blake3-256",\n'
    b'    "change_filter": "xxh3-128",\n'
    b'    "filter_seed": 1234567890123456789,\n'
    b'    "compression": "zstd"\n'
    b"  },\n"
    b'  "writer": {\n'
    b'    "compression_level": 3,\n'
    b'    "pack_target_size": 8388608\n'
    b"  },\n"
    b'  "encryption": "none"\n'
    b"}\n"
)

# What format 1's init wrote: unframed JSON.
FORMAT_1 = json.dumps(
    {
        "format": "blocksnap-repository",
        "version": 1,
        "id": "00112233445566778899aabbccddeeff",
        "created": "2026-01-02T03:04:05Z",
        "block_id": "blake3-256",
        "change_filter": "xxh3-128",
        "filter_seed": 1234567890123456789,
        "compression": "zstd",
        "compression_level": 1,
        "encryption": "none",
        "pack_target_size": 16777216,
    },
    indent=2,
).encode()


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert words in proc.stderr
    assert proc.stderr.startswith("blocksnap: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def _edit_body(repo: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the repository's config with its body changed by edit, framed intact."""
    path = repo / config.CONFIG_NAME
    body = json.loads(path.read_bytes()[config.HEADER_SIZE :])
    edit(body)
    path.write_bytes(config.frame(json.dumps(body, indent=2).encode()))


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    run_cli("init", str(path), check=True)
    return path


def test_config_golden_vector_decodes_and_reencodes() -> None:
    decoded = config.decode(GOLDEN, "golden")
    assert decoded.version == 2 and decoded.compatibility.min_reader_version == 2
    assert decoded.compatibility.features == () == decoded.compatibility.write_features
    assert (decoded.id, decoded.created) == (
        "00112233445566778899aabbccddeeff",
        "2026-01-02T03:04:05Z",
    )
    assert decoded.content_id == "ffeeddccbbaa99887766554433221100"
    assert decoded.algorithms() == {
        "block_id": "blake3-256",
        "change_filter": "xxh3-128",
        "compression": "zstd",
    }
    assert decoded.filter_seed == 1234567890123456789
    assert (decoded.compression_level, decoded.pack_target_size) == (3, 8 << 20)
    assert decoded.encryption == "none"
    assert blake3.blake3(GOLDEN[:8] + GOLDEN[40:]).digest() == GOLDEN[8:40]
    assert config.encode(decoded) == GOLDEN


def test_config_init_separates_identity_from_content(repo_path: Path) -> None:
    data = (repo_path / "config").read_bytes()
    assert data.startswith(config.MAGIC)
    written = config.decode(data, str(repo_path))
    assert config.encode(written) == data
    assert written.content_id != written.id
    with blocksnap.Repository(repo_path) as repo:
        assert repo.store.config == written
    doc = json.loads(run_cli("init", str(repo_path.parent / "two"), "--json", check=True).stdout)
    assert doc["format"] == 2 and doc["content_id"] not in (doc["id"], written.content_id)


@pytest.mark.parametrize(
    ("offset", "why"),
    [
        (0, "no BSCONF magic"),
        (5, "no BSCONF magic"),
        (7, "checksum mismatch"),  # the frame version is covered by the checksum
        (20, "checksum mismatch"),
        (60, "checksum mismatch"),
        (-3, "checksum mismatch"),
    ],
)
def test_config_damaged_frame_is_integrity_error(repo_path: Path, offset: int, why: str) -> None:
    path = repo_path / "config"
    flip(path, offset % path.stat().st_size)
    with pytest.raises(IntegrityError, match=f"config of .* is damaged \\({why}\\)"):
        blocksnap.Repository(repo_path)
    _one_line_error(run_cli("list", str(repo_path)), 5, f"config of {repo_path} is damaged")


def test_config_truncated_is_integrity_error(repo_path: Path) -> None:
    path = repo_path / "config"
    path.write_bytes(path.read_bytes()[:20])
    _one_line_error(run_cli("list", str(repo_path)), 5, "damaged (truncated)")


def _newer_format(body: dict[str, Any]) -> None:
    body.update(version=3, min_reader_version=3, min_reader_release="0.3.0")
    # A newer format may change anything but the reader's compatibility fields.
    for key in ("min_writer_release", "write_features", "content", "writer"):
        del body[key]


def _unknown_feature(body: dict[str, Any]) -> None:
    body.update(features=["sharded-index"], min_reader_release="0.4.0")


def _unknown_block_id(body: dict[str, Any]) -> None:
    body["content"]["block_id"] = "sha3-256"
    body["min_reader_release"] = "0.5.0"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_newer_format, "needs blocksnap >= 0.3.0 (it is format 3"),
        (_unknown_feature, "needs blocksnap >= 0.4.0 (features unknown here: sharded-index)"),
        (_unknown_block_id, "needs blocksnap >= 0.5.0 (block ID algorithm 'sha3-256'"),
    ],
    ids=["min_reader_version", "feature", "content parameter"],
)
def test_config_newer_reader_needed_is_refused(
    repo_path: Path, edit: Callable[[dict[str, Any]], None], words: str
) -> None:
    _edit_body(repo_path, edit)
    with pytest.raises(UnsupportedFormatError, match="needs blocksnap >="):
        blocksnap.Repository(repo_path)
    for command in (["list"], ["verify"]):
        proc = run_cli(command[0], str(repo_path), *command[1:])
        _one_line_error(proc, 6, f"repository {repo_path} {words}")
        assert "damaged" not in proc.stderr


def test_config_unknown_write_feature_reads_but_refuses_writes(
    repo_path: Path, ext4_image: Path
) -> None:
    run_cli("snapshot", str(repo_path), "vol", str(ext4_image), check=True)
    _edit_body(
        repo_path, lambda b: b.update(write_features=["tombstones"], min_writer_release="0.3.0")
    )
    before = sorted(p.relative_to(repo_path) for p in (repo_path / "packs").rglob("*"))
    listing = json.loads(run_cli("list", str(repo_path), "--json", check=True).stdout)
    assert len(listing["vol"]) == 1
    run_cli("verify", str(repo_path), check=True)
    run_cli("info", str(repo_path), "vol", "latest", check=True)
    words = f"repository {repo_path} needs blocksnap >= 0.3.0 to be written"
    with blocksnap.Repository(repo_path) as repo:
        assert [s.volume for s in repo.store.snapshots("vol")] == ["vol"]
        with pytest.raises(UnsupportedFormatError, match=words):
            repo.snapshot("vol", str(ext4_image))
    for command in (
        ["snapshot", str(repo_path), "vol", str(ext4_image)],
        ["synthesize", str(repo_path), "vol"],
        ["gc", str(repo_path)],
        ["protect", str(repo_path), "vol", "latest"],
        ["repair", str(repo_path), "--rebuild-index"],
    ):
        proc = run_cli(*command)
        _one_line_error(proc, 6, words)
        assert "tombstones" in proc.stderr
    assert sorted(p.relative_to(repo_path) for p in (repo_path / "packs").rglob("*")) == before
    listing = json.loads(run_cli("list", str(repo_path), "--json", check=True).stdout)
    assert len(listing["vol"]) == 1


def _extra_fields(body: dict[str, Any]) -> None:
    body["retention_hint"] = {"days": 30}
    body["repository"]["tenant"] = "acme"
    body["content"]["note"] = "a newer writer's"
    body["writer"]["threads"] = 8


def _newer_compatible_writer(body: dict[str, Any]) -> None:
    body.update(version=3, min_reader_version=2)


@pytest.mark.parametrize("edit", [_extra_fields, _newer_compatible_writer])
def test_config_unknown_fields_are_ignored(
    repo_path: Path, ext4_image: Path, edit: Callable[[dict[str, Any]], None]
) -> None:
    _edit_body(repo_path, edit)
    run_cli("snapshot", str(repo_path), "vol", str(ext4_image), check=True)
    run_cli("verify", str(repo_path), check=True)
    listing = json.loads(run_cli("list", str(repo_path), "--json", check=True).stdout)
    assert len(listing["vol"]) == 1


def test_config_format_1_is_refused_with_the_way_forward(repo_path: Path) -> None:
    (repo_path / "config").write_bytes(FORMAT_1)
    with pytest.raises(UnsupportedFormatError, match="format 1"):
        blocksnap.Repository(repo_path)
    for command in ("list", "verify", "gc"):
        proc = run_cli(command, str(repo_path))
        _one_line_error(
            proc,
            6,
            f"repository {repo_path} is format 1, which this blocksnap no longer reads: "
            "re-create it with blocksnap init and take new snapshots",
        )


@pytest.mark.parametrize(
    "data",
    [
        config.frame(b'{"format": "someone-else", "version": 2}'),
        b'{"name": "an unrelated config file"}',
    ],
    ids=["framed", "plain JSON"],
)
def test_config_of_something_else_is_not_a_repository(repo_path: Path, data: bytes) -> None:
    (repo_path / "config").write_bytes(data)
    with pytest.raises(NotFoundError):
        blocksnap.Repository(repo_path)
    _one_line_error(run_cli("list", str(repo_path)), 3, "is not a blocksnap repository")


def _seed_as_text(body: dict[str, Any]) -> None:
    body["content"]["filter_seed"] = "12345"


def _no_content(body: dict[str, Any]) -> None:
    del body["content"]


def _framed_version_1(body: dict[str, Any]) -> None:
    body["version"] = 1  # format 1 was never framed


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_seed_as_text, "content.filter_seed is not an integer"),
        (_no_content, "content missing"),
        (_framed_version_1, "version is not an integer in 2..65536"),
    ],
)
def test_config_malformed_body_is_integrity_error(
    repo_path: Path, edit: Callable[[dict[str, Any]], None], words: str
) -> None:
    _edit_body(repo_path, edit)
    with pytest.raises(IntegrityError, match="malformed"):
        blocksnap.Repository(repo_path)
    _one_line_error(run_cli("list", str(repo_path)), 5, words)


def test_config_newer_frame_version_is_refused_not_damaged(repo_path: Path) -> None:
    path = repo_path / "config"
    body = path.read_bytes()[config.HEADER_SIZE :]
    head = config.MAGIC + (2).to_bytes(2, "big")
    path.write_bytes(head + blake3.blake3(head + body).digest() + body)
    _one_line_error(run_cli("list", str(repo_path)), 6, "needs a newer blocksnap")
