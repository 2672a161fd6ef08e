"""Pack objects: append-only runs of self-describing records; this module owns their format.

Pack layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"BSPACK\\x00\\x01" (the last byte is the pack format version, 1)
    8       ...   records, back to back, until the end of the object

Record layout::

    0       4     magic b"BSRC"
    4       1     kind: 1 = data block, 2 = block-map node
    5       1     codec: 0 = raw, 1 = zstd (one frame, content size in its header)
    6       2     flags: 0; bit 0 is reserved for encrypted payloads (AEAD), which will
                  replace the check below with a MAC and key the ID
    8       4     stored_size: payload bytes that follow the header
    12      4     raw_size: bytes after decoding (never more than the kind's maximum)
    16      32    id: the strong hash (the repository's block ID algorithm) of the raw bytes
    48      8     check: XXH3-64 of header bytes 0..47 followed by the payload
    56      ...   payload

Invariants: a pack appears under its name only whole (it is written under a temporary
name while it fills, then fsynced and renamed) and is never modified after; every record
can be found and validated from the pack alone, so the LMDB index can be rebuilt from
packs; the check detects damage before decoding, and the id detects it after.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from blocksnap.errors import IntegrityError

PACK_MAGIC = b"BSPACK\x00\x01"
RECORD_MAGIC = b"BSRC"
KIND_BLOCK = 1
KIND_NODE = 2
KINDS = (KIND_BLOCK, KIND_NODE)

_HEAD = struct.Struct("<4sBBHII32s")
_CHECK = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _CHECK.size  # 56
MAX_RAW_SIZE = 4 << 20  # no record decodes to more than the largest block size


@dataclass(frozen=True, slots=True)
class Record:
    """A record located in a pack: where its payload is and what it decodes to."""

    offset: int  # of the record header within the pack
    kind: int
    codec: int
    stored_size: int
    raw_size: int
    id: bytes


def encode_record(
    kind: int, codec: int, raw_size: int, object_id: bytes, payload: bytes | memoryview
) -> bytes:
    """Return a whole record: its header (with the check) followed by the payload."""
    head = _HEAD.pack(RECORD_MAGIC, kind, codec, 0, len(payload), raw_size, object_id)
    hasher = xxhash.xxh3_64(head)
    hasher.update(payload)
    return b"".join((head, _CHECK.pack(hasher.intdigest()), payload))


def parse_header(header: bytes, where: str) -> Record:
    """Validate a record header's structure (not its payload) and return its fields."""
    if len(header) < HEADER_SIZE:
        raise IntegrityError(f"{where}: truncated record header")
    magic, kind, codec, flags, stored_size, raw_size, block_id = _HEAD.unpack_from(header)
    if magic != RECORD_MAGIC:
        raise IntegrityError(f"{where}: bad record magic")
    if kind not in KINDS or flags != 0 or raw_size > MAX_RAW_SIZE:
        raise IntegrityError(f"{where}: invalid record header")
    if stored_size > raw_size + 1024:  # zstd never expands a block by more than this
        raise IntegrityError(f"{where}: invalid record header")
    return Record(0, kind, codec, stored_size, raw_size, block_id)


def check_record(header: bytes, payload: bytes | memoryview, where: str) -> None:
    """Raise IntegrityError unless the record's check matches header and payload."""
    expected = _CHECK.unpack_from(header, _HEAD.size)[0]
    hasher = xxhash.xxh3_64(header[: _HEAD.size])
    hasher.update(payload)
    if hasher.intdigest() != expected:
        raise IntegrityError(f"{where}: record checksum mismatch (damaged data)")


class PackBuilder:
    """Lays out a pack's records; buffer holds its bytes not yet handed out by take()."""

    def __init__(self) -> None:
        self.buffer = bytearray(PACK_MAGIC)
        self.taken = 0  # bytes of the pack handed out by take()
        self.records: list[Record] = []

    def add(self, record: bytes) -> Record:
        """Append a record made by encode_record and return where it sits."""
        offset = self.size
        _magic, kind, codec, _flags, stored_size, raw_size, object_id = _HEAD.unpack_from(record)
        self.buffer += record
        rec = Record(offset, kind, codec, stored_size, raw_size, object_id)
        self.records.append(rec)
        return rec

    def take(self) -> bytearray:
        """The bytes added since the last take, for writing while the pack fills."""
        data, self.buffer = self.buffer, bytearray()
        self.taken += len(data)
        return data

    @property
    def size(self) -> int:
        return self.taken + len(self.buffer)


def iter_records(
    data: bytes | memoryview, name: str
) -> Iterator[tuple[Record | None, IntegrityError | None]]:
    """Walk a whole pack, yielding (record, None) for each valid record and errors as found.

    A damaged payload whose header is intact yields (record, error) and the walk goes on;
    a damaged or truncated header yields (None, error) and ends the walk, because the next
    record's position is no longer known.
    """
    view = memoryview(data)
    if bytes(view[: len(PACK_MAGIC)]) != PACK_MAGIC:
        yield None, IntegrityError(f"pack {name}: not a blocksnap pack (bad magic)")
        return
    offset = len(PACK_MAGIC)
    while offset < len(view):
        where = f"pack {name} at offset {offset}"
        header = bytes(view[offset : offset + HEADER_SIZE])
        try:
            head = parse_header(header, where)
        except IntegrityError as exc:
            yield None, exc
            return
        rec = Record(offset, head.kind, head.codec, head.stored_size, head.raw_size, head.id)
        end = offset + HEADER_SIZE + rec.stored_size
        if end > len(view):
            yield rec, IntegrityError(f"{where}: record runs past the end of the pack (truncated)")
            return
        try:
            check_record(header, view[offset + HEADER_SIZE : end], where)
        except IntegrityError as exc:
            yield rec, exc
        else:
            yield rec, None
        offset = end
