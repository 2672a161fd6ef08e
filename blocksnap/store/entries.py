"""The index's keys and values as bytes: the checked location record of an object, the
reference-count value, timeline and settings keys, and JSON entries.  Pure data and
codecs: the layout they fill is documented in store/index.py.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from blocksnap.errors import IntegrityError

LOC = struct.Struct("<16sQIIBB")  # a location record's body ...
CRC = struct.Struct("<I")  # ... and its check, of key and body
# Keys in meta on a shared store (store/collection.py): + pack id, a pack a done list
# named deleted; + pack id + object id, a copy a done list named collected (value
# empty: never indexed again) or one that a list under way condemns (value its seq:
# weak, placed only where the object has no other copy).
GONE = b"gone/"
DEAD = b"dead/"
# + object id + pack id -> a location record: a copy of an object that another copy
# holds the place of (shared stores only), which takes the place when that copy goes.
SPARE = b"spare/"
SEQ = struct.Struct(">Q")  # epochs and seqs in keys: big-endian, so keys sort by them
REF = struct.Struct("<IQ")  # refs value: count, since
POLICY_PREFIX = b"policy\x00"
PROTECTED_PREFIX = b"protected\x00"
REMOVING_PREFIX = b"removing\x00"


@dataclass(frozen=True, slots=True)
class Location:
    """Where an object's record is: pack, header offset, sizes, kind and codec."""

    pack: bytes
    offset: int
    stored_size: int
    raw_size: int
    kind: int
    codec: int


def encode_location(key: bytes, loc: Location) -> bytes:
    body = LOC.pack(loc.pack, loc.offset, loc.stored_size, loc.raw_size, loc.kind, loc.codec)
    return body + CRC.pack(zlib.crc32(key + body))


def decode_location(key: bytes, value: bytes) -> Location:
    if len(value) != LOC.size + CRC.size:
        raise IntegrityError(f"index entry for object {key.hex()} is damaged (size)")
    body = value[: LOC.size]
    if CRC.unpack_from(value, LOC.size)[0] != zlib.crc32(key + body):
        raise IntegrityError(f"index entry for object {key.hex()} is damaged (checksum)")
    return Location(*LOC.unpack(body))


def timeline_key(volume: str, seq: int, snapshot_id: str) -> bytes:
    return volume.encode() + b"\x00" + SEQ.pack(seq) + snapshot_id.encode()


def json_entry(value: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"index entry for {what} is damaged") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"index entry for {what} is damaged")
    return obj


def pinned_roots(record: bytes, volume: bytes) -> list[bytes]:
    """The roots a checkpoint record holds references to."""
    try:
        return [bytes.fromhex(h) for h in json_entry(record, f"checkpoint of {volume!r}")["pinned"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"index entry for the checkpoint of {volume!r} is damaged") from exc


def not_indexed(object_id: bytes) -> IntegrityError:
    return IntegrityError(
        f"object {object_id.hex()} is referred to but not in the index; run verify"
    )


def refs_value(count: int, since: int) -> bytes:
    return REF.pack(count, since)
