"""The record codec (store/records.py) and the map node format (blockmap.py): golden bytes,
damage to every field caught and named, one encoding whoever seals, bounded decoding."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import blake3
import pytest
import xxhash
import zstandard
from _pytest.mark import ParameterSet

import blocksnap
from blocksnap.blockmap import (
    NODE_MAGIC,
    NODE_VERSION,
    ZERO_ID,
    BlockMap,
    encode_interior,
    encode_leaf,
    node_children,
)
from blocksnap.errors import IntegrityError
from blocksnap.store.entries import Location
from blocksnap.store.packs import (
    HEADER_SIZE,
    KIND_BLOCK,
    KIND_NODE,
    MAX_RAW_SIZE,
    encode_record,
    pack_name,
    parse_header,
)
from blocksnap.store.records import check, open_checked, open_record, seal

# A leaf of three entries (the middle one an all-zero block) and an interior node over that
# leaf and one other, as blockmap.encode_leaf / encode_interior write them.
LEAF = bytes.fromhex(
    "42534d4e0100000003000000000102030405060708090a0b0c0d0e0f0000000000000000000000000000"
    "0000101112131415161718191a1b1c1d1e1fa1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1"
    "a1a1a1a1a1a1a1a10000000000000000000000000000000000000000000000000000000000000000b2b2"
    "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2"
)
LEAF_DIGESTS = [bytes(range(16)), bytes(16), bytes(range(16, 32))]
LEAF_IDS = [b"\xa1" * 32, ZERO_ID, b"\xb2" * 32]
LEAF_ID = bytes.fromhex("5eff2c5953997b214063f21324387801acf6279044ac0abe413e7f33c994db77")
INTERIOR = bytes.fromhex(
    "42534d4e01010000020000005eff2c5953997b214063f21324387801acf6279044ac0abe413e7f33c994"
    "db77c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3"
)
INTERIOR_CHILDREN = [LEAF_ID, b"\xc3" * 32]

# LEAF sealed as a map node record at zstd level 1 (codec 1), id BLAKE3-256 of LEAF.
RECORD = bytes.fromhex(
    "4253524302010000440000009c0000005eff2c5953997b214063f21324387801acf6279044ac0abe413e"
    "7f33c994db776163f5250ff927f028b52ffd209cdd0100040342534d4e0100000003000000000102030405"
    "060708090a0b0c0d0e0f00101112131415161718191a1b1c1d1e1fa100b20410008d3477b3ea9c"
)
# The record as the index locates it (pack and offset do not matter to the codec).
WHERE = Location(pack=bytes(16), offset=32, stored_size=0x44, raw_size=0x9C, kind=2, codec=1)

_DOC_NODE = struct.Struct("<4sBBHI")  # magic, version, level, reserved, count
_DOC_RECORD = struct.Struct("<4sBBHII32sQ")  # ..., id, check


def _blake3(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def test_node_golden_vectors_decode_and_reencode() -> None:
    magic, version, level, reserved, count = _DOC_NODE.unpack_from(LEAF)
    assert (magic, version, level, reserved, count) == (NODE_MAGIC, NODE_VERSION, 0, 0, 3)
    assert LEAF[12:60] == b"".join(LEAF_DIGESTS) and LEAF[60:] == b"".join(LEAF_IDS)
    assert node_children(LEAF) == [LEAF_IDS[0], LEAF_IDS[2]]  # the zero block names nothing
    block_map = BlockMap({LEAF_ID: LEAF}.__getitem__, LEAF_ID, 1, 3)
    assert [block_map.entry(i) for i in range(3)] == list(zip(LEAF_DIGESTS, LEAF_IDS, strict=True))
    assert encode_leaf(b"".join(LEAF_DIGESTS), b"".join(LEAF_IDS)) == LEAF
    assert _blake3(LEAF) == LEAF_ID

    assert _DOC_NODE.unpack_from(INTERIOR) == (NODE_MAGIC, NODE_VERSION, 1, 0, 2)
    assert node_children(INTERIOR) == INTERIOR_CHILDREN
    assert encode_interior(1, INTERIOR_CHILDREN) == INTERIOR


def test_record_golden_vector_decodes_and_reencodes() -> None:
    magic, kind, codec, flags, stored, raw_size, object_id, rec_check = _DOC_RECORD.unpack_from(
        RECORD
    )
    assert (magic, kind, codec, flags) == (b"BSRC", KIND_NODE, 1, 0)
    assert (stored, raw_size, object_id) == (len(RECORD) - HEADER_SIZE, len(LEAF), LEAF_ID)
    assert rec_check == xxhash.xxh3_64_intdigest(RECORD[:48] + RECORD[HEADER_SIZE:])
    payload = RECORD[HEADER_SIZE:]
    assert zstandard.frame_content_size(payload) == len(LEAF)  # one frame, its size inside
    assert open_record(RECORD, LEAF_ID, WHERE, _blake3, "golden") == LEAF
    assert open_record((RECORD[:HEADER_SIZE], payload), LEAF_ID, WHERE, _blake3, "golden") == LEAF
    assert encode_record(kind, codec, raw_size, object_id, payload) == RECORD
    assert seal(KIND_NODE, LEAF, LEAF_ID, 1).data == RECORD


def _patched(fmt: str, offset: int, value: int | bytes) -> bytes:
    damaged = bytearray(RECORD)
    struct.pack_into(fmt, damaged, offset, value)
    return bytes(damaged)


def _flipped(offset: int) -> bytes:
    damaged = bytearray(RECORD)
    damaged[offset] ^= 0x40
    return bytes(damaged)


DAMAGE = [
    pytest.param(_flipped(0), "bad record magic", id="magic"),
    pytest.param(_patched("<B", 4, 7), r"invalid record header \(kind 7\)", id="kind-unknown"),
    pytest.param(_patched("<B", 4, KIND_BLOCK), "header's kind does not match", id="kind"),
    pytest.param(_patched("<B", 5, 0), "header's codec does not match", id="codec"),
    pytest.param(_patched("<H", 6, 1), r"invalid record header \(flags 0x1\)", id="flags"),
    pytest.param(_patched("<I", 8, 0x45), "header's stored size does not match", id="stored"),
    pytest.param(_patched("<I", 12, 0x9B), "header's raw size does not match", id="raw"),
    pytest.param(_patched("<I", 12, MAX_RAW_SIZE + 1), r"raw size \d+ > maximum", id="raw-too-big"),
    pytest.param(_flipped(16), "header's id does not match", id="id"),
    pytest.param(_flipped(48), "record checksum mismatch", id="check"),
    pytest.param(_flipped(HEADER_SIZE + 20), "record checksum mismatch", id="payload"),
    pytest.param(RECORD[:-1], "truncated", id="truncated"),
]


@pytest.mark.parametrize(("record", "message"), DAMAGE)
def test_open_record_names_damage_to_each_field(record: bytes, message: str) -> None:
    with pytest.raises(IntegrityError, match=rf"^object x: .*{message}"):
        open_record(record, LEAF_ID, WHERE, _blake3, "object x")


def test_open_record_names_a_check_that_differs_from_the_table_of_contents() -> None:
    head = parse_header(RECORD, "golden")
    with pytest.raises(IntegrityError, match="check does not match the table of contents"):
        check(
            RECORD, LEAF_ID, head, "t", listed_check=head.check ^ 1, against="the table of contents"
        )


def test_open_record_catches_content_that_is_not_its_id() -> None:
    """A record whose header and check agree (written so, not damaged after) but whose
    content is not what its id names."""
    other = b"\x5a" * 32
    lying = encode_record(KIND_NODE, 1, len(LEAF), other, RECORD[HEADER_SIZE:])
    with pytest.raises(IntegrityError, match="content does not match its id"):
        open_record(lying, other, WHERE, _blake3, "x")
    with pytest.raises(IntegrityError, match="content does not match its id"):
        open_checked(parse_header(lying, "x"), lying[HEADER_SIZE:], _blake3, "x")


def _zstd(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(data)


def _hostile_frames() -> list[ParameterSet]:
    huge = bytes(64 << 20)  # compresses to about 2 KiB
    claims = _zstd(huge)  # the frame says 64 MiB
    # Its content size field (4 bytes after the descriptor bytes) rewritten to say 4 KiB.
    assert claims[4] == 0x80, "frame header layout assumed below"
    lies = claims[:6] + struct.pack("<I", 4096) + claims[10:]
    return [
        pytest.param(claims, "does not hold", id="frame-claims-64MiB"),
        pytest.param(lies, "damaged compressed data", id="frame-lies-about-its-size"),
        pytest.param(_zstd(huge, content_size=False), "does not hold", id="no-content-size"),
    ]


@pytest.mark.parametrize(("payload", "message"), _hostile_frames())
def test_hostile_frame_cannot_make_decoding_allocate_more_than_the_record_says(
    payload: bytes, message: str
) -> None:
    """A record whose check is right (a hostile writer computes it) and whose raw size is
    4 KiB, with a frame that decodes to 64 MiB: refused, having allocated about nothing."""
    object_id = _blake3(bytes(4096))
    record = encode_record(KIND_BLOCK, 1, 4096, object_id, payload)
    expected = Location(bytes(16), 32, len(payload), 4096, KIND_BLOCK, 1)
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError) as refused:
            open_record(record, object_id, expected, _blake3, "hostile")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_RAW_SIZE
    assert message in str(refused.value)


def test_a_raw_size_above_the_maximum_is_refused_before_decoding() -> None:
    raw_size = MAX_RAW_SIZE + 4096
    payload = _zstd(bytes(raw_size))
    record = encode_record(KIND_BLOCK, 1, raw_size, bytes(32), payload)
    expected = Location(bytes(16), 32, len(payload), raw_size, KIND_BLOCK, 1)
    with pytest.raises(IntegrityError, match=r"raw size .* > maximum"):
        open_record(record, bytes(32), expected, _blake3, "hostile")


BLOCKS = [
    pytest.param(b"compressible " * 5041, id="zstd"),
    pytest.param(bytes(range(256)) * 3 + blake3.blake3(b"x").digest(length=64 << 10), id="raw"),
]


@pytest.mark.parametrize("raw", BLOCKS)
def test_record_is_identical_sealed_by_the_writer_or_directly(tmp_path: Path, raw: bytes) -> None:
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        store = repo.store
        level = store.config.compression_level
        block_id = store.hash(raw)
        direct = seal(KIND_BLOCK, raw, block_id, level)
        with store.writer() as writer:
            sealed = writer.seal_block(memoryview(raw), block_id)
            assert sealed == direct
            assert writer.seal_node(LEAF, LEAF_ID) == seal(KIND_NODE, LEAF, LEAF_ID, level)
            assert writer.add(sealed) == len(direct.data)
            writer.flush()
        loc = store.index.location(block_id)
        assert loc is not None
        stored = store.backend.get(pack_name(loc.pack), loc.offset, HEADER_SIZE + loc.stored_size)
        assert stored == direct.data
        assert store.read_block(block_id) == raw


def test_snapshot_stores_the_records_seal_makes(tmp_path: Path, ext4_image: Path) -> None:
    """The engine's worker threads seal through the writer: every stored block of a
    snapshot is byte for byte what records.seal makes of it, and so is every map node."""
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        info = repo.snapshot("vol", ext4_image)
        store = repo.store
        level = store.config.compression_level
        image = ext4_image.read_bytes()
        block_map = BlockMap(store.read_node, info.map_root, info.map_height, info.block_count)
        checked = 0
        for i in range(info.block_count):
            block_id = block_map.entry(i)[1]
            if block_id == ZERO_ID:
                continue
            loc = store.index.location(block_id)
            assert loc is not None
            stored = store.backend.get(
                pack_name(loc.pack), loc.offset, HEADER_SIZE + loc.stored_size
            )
            block = image[i * info.block_size : (i + 1) * info.block_size]
            assert stored == seal(KIND_BLOCK, block, block_id, level).data
            checked += 1
        assert checked > 0
        root = store.index.location(info.map_root)
        assert root is not None
        stored = store.backend.get(
            pack_name(root.pack), root.offset, HEADER_SIZE + root.stored_size
        )
        node = store.read_node(info.map_root)
        assert stored == seal(KIND_NODE, node, info.map_root, level).data
