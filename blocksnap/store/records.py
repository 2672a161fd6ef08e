"""The record codec: seal and open the records that packs hold; the only code that builds a
record from raw bytes or turns one back into them.

A record (its layout is owned by store/packs.py: a 56-byte header, then the payload) is
made by seal() and read back by open_record() or, for records whose header and check the
pack walk already validated, open_checked().  Nothing else in blocksnap compresses,
decompresses or frames a record: the engine hands raw blocks and nodes to a StoreWriter,
which seals them here; Store, verify, gc (through Store) and the index rebuild open them
here.  store/codec.py (zstd) is used by this module alone.

Sealing, in order:

1. compress: the payload is one zstd frame with its content size in the frame header,
   or the raw bytes when zstd does not shrink them (codec 0);
2. encrypt (not implemented yet; see below): the payload becomes nonce || ciphertext ||
   tag and flags bit 0 is set;
3. frame: the header (magic, kind, codec, flags, stored_size, raw_size, id) and its
   check, XXH3-64 of header bytes 0..47 followed by the payload.

Opening is the reverse, each step before the next: the header's structure
(packs.parse_header: magic, kind, flags, sizes within MAX_RAW_SIZE), the header's fields
against what the caller expects (the index's location or the pack's table of contents:
id, kind, codec, sizes, check), the record check over header and payload, then (later)
decryption, then bounded decompression (store/codec.py reads the frame's content size
before decoding, so no input makes it allocate more than raw_size, itself at most
MAX_RAW_SIZE), and last the strong hash of the raw bytes against the id.  Every failure is
an IntegrityError whose message names the record (where) and what failed.

Where encryption goes (packs.py's AEAD plan).  seal() gains the pack's key (id and key
material): after compressing, it draws a random 24-byte nonce, sets flags bit 0, and
computes stored_size = 24 + len(compressed) + 16 before encrypting, since the size is
part of the associated data.  The associated data is record header bytes 0..47 (magic,
kind, codec, flags, stored_size, raw_size, id) followed by the pack's 16-byte key id:
never the pack id or the offset, so gc's compaction copies a sealed record verbatim into
any pack of the same key id.  The check is then computed over header and the encrypted
payload, as now.  open_record() and open_checked() gain the key the same way; _open()
decrypts between the check and decompress (the tag authenticates; the check only finds
damage cheaply, before any key is used), and a record with flags bit 0 set in a pack
without a key is damage.  The id becomes a keyed hash then; the caller's hash function
already carries that choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blocksnap.errors import IntegrityError
from blocksnap.store import codec
from blocksnap.store.packs import HEADER_SIZE, Record, check_record, encode_record, parse_header

Hasher = Callable[[bytes | memoryview], bytes]


class Expected(Protocol):
    """What the caller knows of a record before reading it: an index Location or a TOC's
    packs.Record both qualify."""

    @property
    def kind(self) -> int: ...
    @property
    def codec(self) -> int: ...
    @property
    def stored_size(self) -> int: ...
    @property
    def raw_size(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Sealed:
    """A record ready for a pack: data is the whole record, header and payload."""

    kind: int
    id: bytes
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def seal(kind: int, raw: bytes | memoryview, object_id: bytes, level: int) -> Sealed:
    """Seal raw bytes (a block or a map node whose id, the strong hash of raw, the caller
    computed) into a record, compressed at the zstd level.

    Thread-safe and without shared state (codec keeps one compressor per thread), so the
    engine's workers seal in parallel.  The raw bytes are copied once, into the record."""
    codec_id, payload = codec.compress(raw, level)
    return Sealed(kind, object_id, encode_record(kind, codec_id, len(raw), object_id, payload))


def _split(
    record: bytes | memoryview | tuple[bytes | memoryview, bytes | memoryview],
) -> tuple[memoryview, memoryview]:
    if isinstance(record, tuple):
        return memoryview(record[0]), memoryview(record[1])
    view = memoryview(record)
    return view[:HEADER_SIZE], view[HEADER_SIZE:]


def check(
    record: bytes | memoryview | tuple[bytes | memoryview, bytes | memoryview],
    object_id: bytes,
    expected: Expected,
    where: str,
    *,
    listed_check: int | None = None,
    against: str = "the index",
) -> Record:
    """Validate a record without decoding it: its header's structure, its fields against
    expected (and the id, and the check a TOC entry lists when listed_check is given), and
    its record check over header and payload.  Return the header's fields.

    record is the header followed by the payload, or the two apart.  against names where
    the expected fields come from, in messages."""
    header, payload = _split(record)
    if len(header) < HEADER_SIZE or len(payload) != expected.stored_size:
        raise IntegrityError(f"{where}: pack is truncated")
    head = parse_header(header, where)
    found: list[tuple[str, bytes | int, bytes | int]] = [
        ("id", head.id, object_id),
        ("kind", head.kind, expected.kind),
        ("codec", head.codec, expected.codec),
        ("stored size", head.stored_size, expected.stored_size),
        ("raw size", head.raw_size, expected.raw_size),
    ]
    if listed_check is not None:
        found.append(("check", head.check, listed_check))
    for field, value, wanted in found:
        if value != wanted:
            raise IntegrityError(f"{where}: record header's {field} does not match {against}")
    check_record(header, payload, where)
    return head


def open_checked(rec: Record, payload: bytes | memoryview, hash: Hasher, where: str) -> bytes:
    """The raw bytes of a record whose header and check are already validated (by check(),
    or by packs.walk_pack): decode its payload, bounded by raw_size, and verify its id."""
    return _open(rec.codec, rec.raw_size, rec.id, payload, hash, where)


def open_record(
    record: bytes | memoryview | tuple[bytes | memoryview, bytes | memoryview],
    object_id: bytes,
    expected: Expected,
    hash: Hasher,
    where: str,
    *,
    listed_check: int | None = None,
    against: str = "the index",
) -> bytes:
    """The raw bytes of a record, once everything is checked (see the module doc): the
    header against expected and object_id, the record check, bounded decompression and
    the id against the hash of the result."""
    header, payload = _split(record)
    head = check(
        (header, payload), object_id, expected, where, listed_check=listed_check, against=against
    )
    return _open(head.codec, head.raw_size, head.id, payload, hash, where)


def _open(
    codec_id: int,
    raw_size: int,
    object_id: bytes,
    payload: bytes | memoryview,
    hash: Hasher,
    where: str,
) -> bytes:
    # Decryption goes here, before decompressing (see the module doc).
    raw = codec.decompress(codec_id, payload, raw_size, where)
    if hash(raw) != object_id:
        raise IntegrityError(f"{where}: content does not match its id")
    return raw
