"""Pack objects: a header, self-describing records, a table of contents and a trailer; this
module owns their format and is the only code that parses one.

All integers are little-endian.  Pack layout::

    offset      size  part
    0           32    header
    32          ...   records, back to back
    toc_offset  ...   table of contents (TOC): one entry per record, in pack order
    size - 64   64    trailer

Header::

    0       6     magic b"BSPACK"
    6       2     format version: 2 (PACK_VERSION)
    8       16    key id: all zero = records not encrypted
    24      8     check: XXH3-64 of bytes 0..23

Record (the unit gc's compaction copies verbatim into another pack: nothing in it names
its pack or its offset)::

    0       4     magic b"BSRC"
    4       1     kind: 1 = data block, 2 = block-map node
    5       1     codec: 0 = raw, 1 = zstd (one frame, content size in its header)
    6       2     flags: 0; bit 0 is reserved for encrypted payloads (below)
    8       4     stored_size: payload bytes that follow the header
    12      4     raw_size: bytes after decoding (never more than the kind's maximum)
    16      32    id: the strong hash (the repository's block ID algorithm) of the raw bytes
    48      8     check: XXH3-64 of header bytes 0..47 followed by the payload
    56      ...   payload

TOC entry (64 bytes; the TOC of a pack in clear text is record_count entries, so
toc_size = 64 * record_count)::

    0       32    id
    32      8     offset of the record header in the pack
    40      4     stored_size
    44      4     raw_size
    48      8     check: the record's own check field (so entry and record must agree)
    56      1     kind
    57      1     codec
    58      2     flags (the record's)
    60      4     reserved: 0

Trailer (the last 64 bytes, so a reader finds it from the object's size alone)::

    0       8     toc_offset: where the TOC starts (the end of the last record)
    8       4     toc_size: bytes of the TOC
    12      4     record_count
    16      8     toc_check: XXH3-64 of the TOC bytes
    24      2     format version: 2, as in the header
    26      2     flags: 0
    28      4     reserved: 0
    32      16    key id, as in the header
    48      8     check: XXH3-64 of trailer bytes 0..47
    56      8     magic b"BSPACKTC"

Reading.  Indexing a pack needs only its tail: read the last TAIL_GUESS bytes (the whole
pack when it is smaller), take the trailer from their end and the TOC from the same bytes
when it starts within them, else with one more ranged read (read_toc).  The TOC is
trusted only when the trailer's and the TOC's checks pass and its entries tile the space
between header and TOC exactly.  Otherwise (walk_pack) the records are found by scanning:
from the end of the header (whose size is fixed, so a damaged header costs nothing), each
record's header and check are validated, and after damage the scan resynchronises on the
next record magic whose record passes its check.  Damage thus costs only the records it
really hit.

Compatibility rule.  A reader accepts exactly the format versions it knows (2).  A pack
whose header or trailer is intact (its check passes) and names another version, a key id
(an encrypted pack), or non-zero flags or reserved fields, was written by a newer
blocksnap: it is refused with UnsupportedFormatError, never read as damage, scanned
around or guessed at.  Any change to these layouts bumps the version.  In a pack of
version 2 without a key id, a record or TOC entry with non-zero flags is damage.  Format 1 packs
(magic b"BSPACK\\x00\\x01", no TOC) are not read (there were no users).

Encryption (not implemented yet; its place is reserved so that it needs no version bump).
The AEAD is XChaCha20-Poly1305 with a random 24-byte nonce per sealed item: many hosts
write one repository with no shared nonce counter, and random 192-bit nonces do not
collide at any volume a repository reaches (the birthday bound is near 2^96 items per
key; AES-GCM's random 96-bit nonces would limit a key to about 2^32 items, and
AES-GCM-SIV is the fallback where AES hardware matters more).  The pack's key id (in
header and trailer, so that a reader of either end finds it) names the key (a tenant's,
later); all zero means clear text.  An
encrypted record sets flags bit 0; its payload is nonce (24) || ciphertext || tag (16),
and stored_size counts all of it.  Its associated data is record header bytes 0..47
(magic, kind, codec, flags, sizes, id) followed by the pack's key id: never the pack id
or the offset, so compaction copies an encrypted record verbatim into any pack of the
same key id.  The check stays an XXH3-64 over header and payload (cheap damage detection
before decrypting); the tag is what authenticates.  With encryption the id becomes a keyed
hash, so ids reveal nothing about contents.  An encrypted TOC is stored as nonce (24) ||
ciphertext || tag (16) with the trailer's version and key id as associated data;
toc_size then counts those bytes, and toc_check covers them.  The header and the trailer
stay in clear text: they say which key opens the rest.

Invariants: a pack appears under its name only whole (it is written under a temporary
name while it fills, then fsynced and renamed) and is never modified after; every record
can be found and validated from the pack alone, so the LMDB index can be rebuilt from
packs; the check detects damage before decoding, and the id detects it after.  A pack
written by StoreWriter or gc holds records of one kind only (map nodes apart from data
blocks, so metadata stays small and hot); readers do not depend on it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import xxhash

from blocksnap.errors import IntegrityError, UnsupportedFormatError

PACK_VERSION = 2
PACK_MAGIC = b"BSPACK"
TRAILER_MAGIC = b"BSPACKTC"
RECORD_MAGIC = b"BSRC"
NO_KEY = bytes(16)  # the key id of a pack whose records are not encrypted
KIND_BLOCK = 1
KIND_NODE = 2
KINDS = (KIND_BLOCK, KIND_NODE)
TAIL_GUESS = 64 << 10  # one read of this much usually holds trailer and TOC (1000 records)

_HEAD = struct.Struct("<4sBBHII32s")
_CHECK = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _CHECK.size  # 56: of a record
MAX_RAW_SIZE = 4 << 20  # no record decodes to more than the largest block size

_PACK_HEAD = struct.Struct("<6sH16s")
PACK_HEADER_SIZE = _PACK_HEAD.size + _CHECK.size  # 32
_ENTRY = struct.Struct("<32sQIIQBBHI")
TOC_ENTRY_SIZE = _ENTRY.size  # 64
_TRAILER = struct.Struct("<QIIQHHI16s")
TRAILER_SIZE = _TRAILER.size + _CHECK.size + len(TRAILER_MAGIC)  # 64


def pack_name(pack_id: bytes) -> str:
    """The object name of the pack with this id: packs/XX/ID (see store/__init__.py)."""
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def _xxh3(*parts: bytes | bytearray | memoryview) -> int:
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return hasher.intdigest()


@dataclass(frozen=True, slots=True)
class Record:
    """A record located in a pack: where its payload is and what it decodes to."""

    offset: int  # of the record header within the pack
    kind: int
    codec: int
    stored_size: int
    raw_size: int
    id: bytes
    check: int  # the record's check field

    @property
    def end(self) -> int:
        return self.offset + HEADER_SIZE + self.stored_size


@dataclass(frozen=True, slots=True)
class Trailer:
    toc_offset: int
    toc_size: int
    record_count: int
    toc_check: int
    key_id: bytes


def overhead_size(record_count: int) -> int:
    """Bytes of a pack of record_count records that are not records (header, TOC, trailer)."""
    return PACK_HEADER_SIZE + record_count * TOC_ENTRY_SIZE + TRAILER_SIZE


# --- records -------------------------------------------------------------------------------


def encode_record(
    kind: int, codec: int, raw_size: int, object_id: bytes, payload: bytes | memoryview
) -> bytes:
    """Return a whole record: its header (with the check) followed by the payload (which
    store/records.py, the only caller that makes records, has compressed)."""
    head = _HEAD.pack(RECORD_MAGIC, kind, codec, 0, len(payload), raw_size, object_id)
    return b"".join((head, _CHECK.pack(_xxh3(head, payload)), payload))


def parse_header(header: bytes | memoryview, where: str) -> Record:
    """Validate a record header's structure (not its payload) and return its fields
    (offset 0: the caller knows where it read it)."""
    if len(header) < HEADER_SIZE:
        raise IntegrityError(f"{where}: truncated record header")
    magic, kind, codec, flags, stored_size, raw_size, block_id = _HEAD.unpack_from(header)
    if magic != RECORD_MAGIC:
        raise IntegrityError(f"{where}: bad record magic")
    _check_fields(kind, flags, stored_size, raw_size, where)
    check = _CHECK.unpack_from(header, _HEAD.size)[0]
    return Record(0, kind, codec, stored_size, raw_size, block_id, check)


def _check_fields(kind: int, flags: int, stored_size: int, raw_size: int, where: str) -> None:
    # Each message names the field, so that a report says what was damaged.
    if kind not in KINDS:
        raise IntegrityError(f"{where}: invalid record header (kind {kind})")
    if flags != 0:
        raise IntegrityError(f"{where}: invalid record header (flags {flags:#x})")
    if raw_size > MAX_RAW_SIZE:
        raise IntegrityError(f"{where}: invalid record header (raw size {raw_size} > maximum)")
    if stored_size > raw_size + 1024:  # zstd never expands a block by more than this
        raise IntegrityError(
            f"{where}: invalid record header (stored size {stored_size} for raw size {raw_size})"
        )


def check_record(header: bytes | memoryview, payload: bytes | memoryview, where: str) -> None:
    """Raise IntegrityError unless the record's check matches header and payload."""
    expected = _CHECK.unpack_from(header, _HEAD.size)[0]
    if _xxh3(header[: _HEAD.size], payload) != expected:
        raise IntegrityError(f"{where}: record checksum mismatch (damaged data)")


# --- header, TOC, trailer ------------------------------------------------------------------


def encode_header(key_id: bytes = NO_KEY) -> bytes:
    head = _PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, key_id)
    return head + _CHECK.pack(_xxh3(head))


def _refuse_newer(what: str, version: int, key_id: bytes, extra: int = 0) -> None:
    if version != PACK_VERSION:
        raise UnsupportedFormatError(
            f"{what}: pack format version {version} is not supported (this blocksnap reads "
            f"version {PACK_VERSION}); it needs a newer blocksnap"
        )
    if key_id != NO_KEY:
        raise UnsupportedFormatError(
            f"{what}: encrypted pack (key id {key_id.hex()}); this blocksnap cannot read it"
        )
    if extra:
        raise UnsupportedFormatError(f"{what}: pack uses fields this blocksnap does not know")


def decode_header(data: bytes | memoryview, where: str) -> bytes:
    """Validate a pack header; return its key id.  IntegrityError when it is damaged,
    UnsupportedFormatError when it is intact and names what this reader does not know."""
    if len(data) < PACK_HEADER_SIZE:
        raise IntegrityError(f"{where}: truncated pack header")
    magic, version, key_id = _PACK_HEAD.unpack_from(data)
    if (
        magic != PACK_MAGIC
        or _xxh3(data[: _PACK_HEAD.size]) != _CHECK.unpack_from(data, _PACK_HEAD.size)[0]
    ):
        raise IntegrityError(f"{where}: damaged pack header")
    _refuse_newer(where, version, bytes(key_id))
    return bytes(key_id)


def encode_toc(records: list[Record]) -> bytes:
    return b"".join(
        _ENTRY.pack(r.id, r.offset, r.stored_size, r.raw_size, r.check, r.kind, r.codec, 0, 0)
        for r in records
    )


def encode_trailer(toc_offset: int, toc: bytes, record_count: int, key_id: bytes = NO_KEY) -> bytes:
    body = _TRAILER.pack(toc_offset, len(toc), record_count, _xxh3(toc), PACK_VERSION, 0, 0, key_id)
    return body + _CHECK.pack(_xxh3(body)) + TRAILER_MAGIC


def decode_trailer(data: bytes | memoryview, size: int, where: str) -> Trailer:
    """Validate the trailer, the last TRAILER_SIZE bytes of a pack of size bytes."""
    if len(data) != TRAILER_SIZE or size < PACK_HEADER_SIZE + TRAILER_SIZE:
        raise IntegrityError(f"{where}: pack too short for a trailer (truncated)")
    if bytes(data[-len(TRAILER_MAGIC) :]) != TRAILER_MAGIC:
        raise IntegrityError(f"{where}: no pack trailer (damaged or truncated)")
    if _xxh3(data[: _TRAILER.size]) != _CHECK.unpack_from(data, _TRAILER.size)[0]:
        raise IntegrityError(f"{where}: damaged pack trailer")
    toc_offset, toc_size, count, toc_check, version, flags, reserved, key_id = _TRAILER.unpack_from(
        data
    )
    _refuse_newer(where, version, bytes(key_id), flags | reserved)
    if toc_offset < PACK_HEADER_SIZE or toc_offset + toc_size + TRAILER_SIZE != size:
        raise IntegrityError(f"{where}: pack trailer does not fit the pack")
    if toc_size != count * TOC_ENTRY_SIZE:
        raise IntegrityError(f"{where}: pack trailer's record count does not fit its TOC")
    return Trailer(toc_offset, toc_size, count, toc_check, bytes(key_id))


def decode_toc(toc: bytes | memoryview, trailer: Trailer, where: str) -> list[Record]:
    """The records a TOC lists, once its check passes and its entries tile the records'
    space (from the header to the TOC) exactly."""
    if len(toc) != trailer.toc_size or _xxh3(toc) != trailer.toc_check:
        raise IntegrityError(f"{where}: damaged table of contents")
    records: list[Record] = []
    end = PACK_HEADER_SIZE
    for k in range(trailer.record_count):
        object_id, offset, stored, raw, check, kind, codec, flags, reserved = _ENTRY.unpack_from(
            toc, k * TOC_ENTRY_SIZE
        )
        entry = f"{where}: table of contents entry {k}"
        if reserved:
            raise UnsupportedFormatError(f"{entry} uses fields this blocksnap does not know")
        _check_fields(kind, flags, stored, raw, entry)
        if offset != end:
            raise IntegrityError(f"{entry} does not follow the record before it")
        rec = Record(offset, kind, codec, stored, raw, bytes(object_id), check)
        records.append(rec)
        end = rec.end
    if end != trailer.toc_offset:
        raise IntegrityError(f"{where}: table of contents does not cover the pack's records")
    return records


def read_toc(get: Callable[[int, int], bytes], size: int, where: str) -> list[Record]:
    """A pack's records from its tail alone, by get(offset, length) (one ranged read when
    the TOC lies within TAIL_GUESS of the end, two otherwise).  IntegrityError when the
    trailer or TOC is damaged: the caller then scans the whole pack (walk_pack)."""
    start = max(0, size - TAIL_GUESS)
    tail = get(start, size - start)
    if len(tail) != size - start:
        raise IntegrityError(f"{where}: pack is shorter than listed (truncated)")
    trailer = decode_trailer(memoryview(tail)[-TRAILER_SIZE:], size, where)
    if trailer.toc_offset >= start:
        at = trailer.toc_offset - start
        return decode_toc(memoryview(tail)[at : at + trailer.toc_size], trailer, where)
    return decode_toc(get(trailer.toc_offset, trailer.toc_size), trailer, where)


# --- writing -------------------------------------------------------------------------------


class PackBuilder:
    """Lays out a pack's records; buffer holds its bytes not yet handed out by take().
    seal() appends the TOC and trailer; nothing can be added after."""

    def __init__(self, key_id: bytes = NO_KEY) -> None:
        self.key_id = key_id
        self.buffer = bytearray(encode_header(key_id))
        self.taken = 0  # bytes of the pack handed out by take()
        self.records: list[Record] = []
        self.records_size = 0  # bytes of the records, headers included
        self.sealed = False

    def add(self, record: bytes) -> Record:
        """Append a whole record (sealed by store/records.py, or copied verbatim from
        another pack) and return where it sits."""
        if self.sealed:
            raise ValueError("pack is sealed")
        head = parse_header(record, "new record")
        rec = Record(
            self.size, head.kind, head.codec, head.stored_size, head.raw_size, head.id, head.check
        )
        self.buffer += record
        self.records.append(rec)
        self.records_size += len(record)
        return rec

    def seal(self) -> None:
        """Append the TOC and trailer: the pack is complete once buffer is written."""
        if self.sealed:
            return
        toc = encode_toc(self.records)
        toc_offset = self.size
        self.buffer += toc
        self.buffer += encode_trailer(toc_offset, toc, len(self.records), self.key_id)
        self.sealed = True

    def take(self) -> bytearray:
        """The bytes added since the last take, for writing while the pack fills."""
        data, self.buffer = self.buffer, bytearray()
        self.taken += len(data)
        return data

    @property
    def size(self) -> int:
        return self.taken + len(self.buffer)


# --- reading a whole pack ------------------------------------------------------------------


@dataclass(slots=True)
class PackWalk:
    """What a whole pack holds: each record with its error (None when its header, TOC
    entry and check agree), and damage to the pack's structure.  complete: every record
    is known for certain (the TOC was intact), so no unknown record can hide in it."""

    records: list[tuple[Record, IntegrityError | None]] = field(default_factory=list)
    problems: list[IntegrityError] = field(default_factory=list)
    complete: bool = False


def check_listed(
    data: bytes | memoryview, rec: Record, where: str, base: int = 0
) -> IntegrityError | None:
    """Whether the bytes at a TOC entry's place are the record it lists, intact; data
    holds the pack from offset base on."""
    where = f"{where} at offset {rec.offset}"
    view = memoryview(data)[rec.offset - base : rec.end - base]
    try:
        if len(view) != HEADER_SIZE + rec.stored_size:
            raise IntegrityError(f"{where}: pack is truncated")
        header = view[:HEADER_SIZE]
        head = parse_header(header, where)
        if (head.kind, head.codec, head.stored_size, head.raw_size, head.id, head.check) != (
            rec.kind,
            rec.codec,
            rec.stored_size,
            rec.raw_size,
            rec.id,
            rec.check,
        ):
            raise IntegrityError(f"{where}: record header does not match the table of contents")
        check_record(header, view[HEADER_SIZE:], where)
    except IntegrityError as exc:
        return exc
    return None


def _scan(
    data: bytes, start: int, end: int, where: str
) -> Iterator[tuple[Record, IntegrityError | None] | IntegrityError]:
    """Records between start and end found by their own headers; after damage, the next
    record magic whose record passes its check.  Yields (record, error) for a record whose
    header is sound, and an error alone for bytes that are no record."""
    offset = start
    while offset < end:
        at = f"{where} at offset {offset}"
        rec = _intact_at(data, offset, end, at)
        if isinstance(rec, Record):
            yield rec, None
            offset = rec.end
            continue
        # Resynchronise: the damaged record's own sizes cannot be trusted.
        found = data.find(RECORD_MAGIC, offset + 1, end)
        while found >= 0 and not isinstance(_intact_at(data, found, end, at), Record):
            found = data.find(RECORD_MAGIC, found + 1, end)
        found = end if found < 0 else found
        head, error = rec
        if head is not None:
            yield head, error
        else:
            yield IntegrityError(f"{at}: {found - offset} bytes that are no intact record")
        offset = found


def _intact_at(
    data: bytes, offset: int, end: int, where: str
) -> Record | tuple[Record | None, IntegrityError]:
    """The intact record at offset, or (its header if that is sound, the error)."""
    view = memoryview(data)
    header = view[offset : offset + HEADER_SIZE]
    try:
        head = parse_header(header, where)
    except IntegrityError as exc:
        return None, exc
    rec = Record(
        offset, head.kind, head.codec, head.stored_size, head.raw_size, head.id, head.check
    )
    try:
        if rec.end > end:
            raise IntegrityError(f"{where}: record runs past the end of the pack (truncated)")
        check_record(header, view[offset + HEADER_SIZE : rec.end], where)
    except IntegrityError as exc:
        return rec, exc
    return rec


def walk_pack(data: bytes | memoryview, name: str) -> PackWalk:
    """Every record of a whole pack, each checked against its header, TOC entry and check.

    The TOC says where records are when it is intact; otherwise the pack is scanned (see
    the module doc), and walk.complete is False.  A damaged header is a problem of the
    pack, not of its records.  UnsupportedFormatError when the pack is of a newer format.
    """
    where = f"pack {name}"
    view = memoryview(data)
    walk = PackWalk()
    try:
        decode_header(view[:PACK_HEADER_SIZE], where)
    except IntegrityError as exc:
        walk.problems.append(exc)
    scan_end = len(view)
    try:
        trailer = decode_trailer(view[-TRAILER_SIZE:], len(view), where)
        scan_end = trailer.toc_offset
        toc = decode_toc(view[trailer.toc_offset : scan_end + trailer.toc_size], trailer, where)
    except IntegrityError as exc:
        walk.problems.append(exc)
        whole = data if isinstance(data, bytes) else bytes(data)  # _scan searches it
        for item in _scan(whole, PACK_HEADER_SIZE, scan_end, where):
            if isinstance(item, IntegrityError):
                walk.problems.append(item)
            else:
                walk.records.append(item)
        return walk
    walk.records = [(rec, check_listed(view, rec, where)) for rec in toc]
    walk.complete = True
    return walk
