"""Catalog objects of format 2 (store/catalog.py): golden bytes for the snapshot record, the
tombstone and both settings, decoded and re-encoded identically; damage and newer formats
are told apart."""

from __future__ import annotations

import blake3
import pytest

from blocksnap.errors import IntegrityError, UnsupportedFormatError
from blocksnap.model import SnapshotKind
from blocksnap.store import catalog, frames

SNAPSHOT = "0123456789abcdef0123456789abcdef"
ALGORITHMS = {"block_id": "blake3", "change_filter": "xxh3-128", "compression": "zstd"}

GOLDEN_RECORD = bytes.fromhex(
    "4253534e41500002"  # magic, frame version 2
    "6963811ce7438fe604970f584758949722c5841c1e6ad00b028e3de484cd0d53"  # checksum
) + (
    b'{"base": "fedcba9876543210fedcba9876543210", "block_id": "blake3", "block_si'
    b'ze": 65536, "change_filter": "xxh3-128", "changed_ranges": [[5, 2], [90, 1]]'
    b', "compression": "zstd", "counts": {"changed": 3, "hashed": 160, "read": 160'
    b', "resumed": 0, "stored": 2, "zero": 40}, "duration": 0.25, "format": 2, "id'
    b'": "0123456789abcdef0123456789abcdef", "image_size": 10485760, "kind": "diff'
    b'erential", "labels": {"site": "b"}, "map": {"height": 1, "root": "0001020304'
    b'05060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}, "metadata_size": 8'
    b'268, "namespace": "", "parent": "fedcba9876543210fedcba9876543210", "seq": 7'
    b', "stored_size": 131072, "time": "2026-11-30T06:00:00Z", "volume": "web-01"}'
)

GOLDEN_TOMBSTONE = bytes.fromhex(
    "4253544f4d420002"  # magic, frame version 2
    "7258901b0f8b81a491319f3bfb86fd8ef2b40c49fbad238e6bda455153b356b6"  # checksum
) + (
    b'{"format": 2, "id": "0123456789abcdef0123456789abcdef", "namespace": "", "re'
    b'moved": "2026-12-01T06:00:00Z", "volume": "web-01"}'
)

GOLDEN_POLICY = bytes.fromhex(
    "4253534554540002"  # magic, frame version 2
    "7f4c1212a904d382ffbf879841e22413c3042cc89ce68042014ee070d0060906"  # checksum
) + (
    b'{"format": 2, "kind": "policy", "namespace": "", "policy": {"keep_last": 4, '
    b'"keep_within": "14d"}, "volume": "web-01"}'
)

GOLDEN_PROTECTED = bytes.fromhex(
    "4253534554540002"  # magic, frame version 2
    "e1719f2744e1df8c4a6af1d5b66db214c076ef4369bacdf6c3a8db8b2424214d"  # checksum
) + (
    b'{"format": 2, "kind": "protected", "namespace": "", "snapshot": "0123456789a'
    b'bcdef0123456789abcdef"}'
)


def _check_frame(golden: bytes, magic: bytes) -> bytes:
    assert golden[:6] == magic and golden[6:8] == b"\x00\x02"
    assert golden[8:40] == blake3.blake3(golden[:8] + golden[40:]).digest()
    return golden[40:]


def test_snapshot_record_golden_vector() -> None:
    body = catalog.unframe(catalog.SNAPSHOT_MAGIC, GOLDEN_RECORD, "golden")
    assert body == _check_frame(GOLDEN_RECORD, b"BSSNAP")
    entry = catalog.decode_entry(body, "golden")
    info = entry.info
    assert (entry.seq, entry.order) == (7, (7, SNAPSHOT))
    assert (info.id, info.volume, info.kind, info.time) == (
        SNAPSHOT,
        "web-01",
        SnapshotKind.DIFFERENTIAL,
        "2026-11-30T06:00:00Z",
    )
    assert info.parent == info.base == "fedcba9876543210fedcba9876543210"
    assert info.changed_ranges == ((5, 2), (90, 1))
    assert (info.map_root, info.map_height, info.block_count) == (bytes(range(32)), 1, 160)
    assert (info.counts.read, info.counts.zero, info.labels) == (160, 40, {"site": "b"})
    again = catalog.frame(catalog.SNAPSHOT_MAGIC, catalog.encode(info, ALGORITHMS, entry.seq))
    assert again == GOLDEN_RECORD


def test_tombstone_golden_vector() -> None:
    _check_frame(GOLDEN_TOMBSTONE, b"BSTOMB")
    tombstone = catalog.decode_tombstone(GOLDEN_TOMBSTONE, f"tombstones/{SNAPSHOT}")
    assert tombstone == catalog.Tombstone(SNAPSHOT, "web-01", "2026-12-01T06:00:00Z")
    assert tombstone.encode() == GOLDEN_TOMBSTONE


def test_settings_golden_vectors() -> None:
    _check_frame(GOLDEN_POLICY, b"BSSETT")
    _check_frame(GOLDEN_PROTECTED, b"BSSETT")
    name = catalog.policy_name("web-01")
    assert name == "settings/policy-b96ea1e8e18e58571b1fd56959e55389"
    policy = catalog.decode_setting(GOLDEN_POLICY, name)
    assert (policy.kind, policy.volume) == ("policy", "web-01")
    assert policy.policy == {"keep_last": 4, "keep_within": "14d"}
    assert catalog.encode_policy("web-01", policy.policy) == GOLDEN_POLICY
    protected = catalog.decode_setting(GOLDEN_PROTECTED, catalog.protected_name(SNAPSHOT))
    assert (protected.kind, protected.snapshot) == ("protected", SNAPSHOT)
    assert catalog.encode_protected(SNAPSHOT) == GOLDEN_PROTECTED


def test_a_setting_under_another_name_is_damage() -> None:
    with pytest.raises(IntegrityError, match="names another setting"):
        catalog.decode_setting(GOLDEN_POLICY, catalog.policy_name("web-02"))
    with pytest.raises(IntegrityError, match="names another snapshot"):
        catalog.decode_tombstone(GOLDEN_TOMBSTONE, "tombstones/" + "f" * 32)


@pytest.mark.parametrize(
    ("golden", "magic"),
    [
        (GOLDEN_RECORD, catalog.SNAPSHOT_MAGIC),
        (GOLDEN_TOMBSTONE, catalog.TOMBSTONE_MAGIC),
        (GOLDEN_POLICY, catalog.SETTING_MAGIC),
    ],
)
@pytest.mark.parametrize("where", [0, 5, 7, 8, 39, 40, 60, -2])
def test_every_flipped_byte_is_damage_the_version_included(
    golden: bytes, magic: bytes, where: int
) -> None:
    damaged = bytearray(golden)
    damaged[where] ^= 0x40
    with pytest.raises(IntegrityError):
        catalog.unframe(magic, bytes(damaged), "damaged")


def _reframed(golden: bytes, magic: bytes, old: str, new: str) -> bytes:
    body = golden[40:].replace(old.encode(), new.encode())
    return catalog.frame(magic, body)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"format": 2', '"format": 3', "format 3 is not supported.*newer blocksnap"),
        ('"format": 2', '"format": 1', "format 1 is not supported.*re-create"),
        ('"namespace": ""', '"namespace": "tenant-7"', "namespace 'tenant-7'"),
    ],
)
def test_a_newer_or_older_record_is_unsupported_not_damaged(
    old: str, new: str, message: str
) -> None:
    data = _reframed(GOLDEN_RECORD, catalog.SNAPSHOT_MAGIC, old, new)
    body = catalog.unframe(catalog.SNAPSHOT_MAGIC, data, "golden")
    with pytest.raises(UnsupportedFormatError, match=message):
        catalog.decode_entry(body, "golden")


def test_a_newer_frame_is_unsupported_and_unknown_keys_are_ignored() -> None:
    newer = frames.frame(catalog.SNAPSHOT_MAGIC, 3, GOLDEN_RECORD[40:])
    with pytest.raises(UnsupportedFormatError, match="newer blocksnap"):
        catalog.unframe(catalog.SNAPSHOT_MAGIC, newer, "golden")
    extended = _reframed(GOLDEN_RECORD, catalog.SNAPSHOT_MAGIC, '"seq": 7', '"seq": 7, "zz": [1]')
    body = catalog.unframe(catalog.SNAPSHOT_MAGIC, extended, "golden")
    assert catalog.decode_entry(body, "golden").info.id == SNAPSHOT


def test_a_record_counts_only_if_it_landed_by_its_commit_by() -> None:
    """commit_by is whole seconds of the server's time: a modification time within that
    second is in time (a listing may give fractions where a HEAD gives whole seconds),
    one a second later is not; a record without the key is never late."""
    body = catalog.unframe(catalog.SNAPSHOT_MAGIC, GOLDEN_RECORD, "golden")
    entry = catalog.decode_entry(body, "golden")
    assert entry.commit_by is None and not entry.late(4.0e9)
    data = catalog.encode(entry.info, ALGORITHMS, entry.seq, commit_by=1_796_400_000)
    entry = catalog.decode_entry(data, "golden")
    assert entry.commit_by == 1_796_400_000
    assert not entry.late(1_796_400_000.0) and not entry.late(1_796_400_000.999)
    assert entry.late(1_796_400_001.0)


@pytest.mark.parametrize("bad", ['"1796400000"', "true", "1.5", "[1]"])
def test_a_commit_by_that_is_not_whole_seconds_is_damage(bad: str) -> None:
    data = _reframed(
        GOLDEN_RECORD, catalog.SNAPSHOT_MAGIC, '"seq": 7', f'"commit_by": {bad}, "seq": 7'
    )
    body = catalog.unframe(catalog.SNAPSHOT_MAGIC, data, "golden")
    with pytest.raises(IntegrityError, match="damaged snapshot record"):
        catalog.decode_entry(body, "golden")
