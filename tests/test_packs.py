"""Pack format 2: golden bytes, damage recovered by scanning, tail-only indexing, one kind
per pack, and packs of an unknown version refused."""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

import blocksnap
from blocksnap.errors import IntegrityError, MissingObjectError, UnsupportedFormatError
from blocksnap.store.backend import LocalBackend
from blocksnap.store.codec import decompress
from blocksnap.store.packs import (
    HEADER_SIZE,
    KIND_BLOCK,
    KIND_NODE,
    NO_KEY,
    PACK_HEADER_SIZE,
    TRAILER_SIZE,
    PackBuilder,
    decode_header,
    decode_trailer,
    encode_record,
    pack_name,
    read_toc,
    walk_pack,
)
from tests.conftest import debugfs, run_cli

# A pack of two data blocks (raw, then zstd) and one of two map nodes (raw, then zstd), as
# PackBuilder writes them.  Their ids are BLAKE3-256 of the raw bytes.
BLOCK_PACK = bytes.fromhex(
    "42535041434b0200000000000000000000000000000000008368571f991f8bc2"
    "42535243010000000c0000000c000000453b2a567524e26655a1dc20dd58a71c"
    "c190eeccca6c1070e4b6507a79ee395eba7ab0c0d369c2f572617720626c6f63"
    "6b0001024253524301010000110000004000000099dbab7730feb9a818a88e3d"
    "659e0aee23ba3c970e70575b0c6a4651c391e88d5f54b87d1d03336d28b52ffd"
    "2040450000107a7a0100930016453b2a567524e26655a1dc20dd58a71cc190ee"
    "ccca6c1070e4b6507a79ee395e20000000000000000c0000000c000000ba7ab0"
    "c0d369c2f5010000000000000099dbab7730feb9a818a88e3d659e0aee23ba3c"
    "970e70575b0c6a4651c391e88d640000000000000011000000400000005f54b8"
    "7d1d03336d0101000000000000ad000000000000008000000002000000313222"
    "6234b7f291020000000000000000000000000000000000000000000000634578"
    "d3e55d3c3542535041434b5443"
)
BLOCKS = [(KIND_BLOCK, 0, b"raw block\x00\x01\x02"), (KIND_BLOCK, 1, b"z" * 64)]
NODE_PACK = bytes.fromhex(
    "42535041434b0200000000000000000000000000000000008368571f991f8bc2"
    "425352430200000008000000080000006a09cf73ea6160ac2ef671e361fe8ff6"
    "9fb7d09a07787ce9882bd98c7d794d3bdd9426c6105a262a726177206e6f6465"
    "4253524302010000150000005000000048960f904ab1dcd788d0761c94367b95"
    "3b3f0013022ae36d2c5460114b91a7b82f32d7e6fdb0ae1528b52ffd20506500"
    "00286e6f646520010008b468016a09cf73ea6160ac2ef671e361fe8ff69fb7d0"
    "9a07787ce9882bd98c7d794d3b20000000000000000800000008000000dd9426"
    "c6105a262a020000000000000048960f904ab1dcd788d0761c94367b953b3f00"
    "13022ae36d2c5460114b91a7b8600000000000000015000000500000002f32d7"
    "e6fdb0ae150201000000000000ad000000000000008000000002000000ce87bc"
    "5bf8240bf202000000000000000000000000000000000000000000000022738a"
    "85cc21f73c42535041434b5443"
)
NODES = [(KIND_NODE, 0, b"raw node"), (KIND_NODE, 1, b"node " * 16)]
# The layouts as the module doc states them, spelled out here independently.
_DOC_HEADER = struct.Struct("<6sH16sQ")
_DOC_ENTRY = struct.Struct("<32sQIIQBBHI")
_DOC_TRAILER = struct.Struct("<QIIQHHI16sQ8s")


def _getter(data: bytes, calls: list[int] | None = None) -> Callable[[int, int], bytes]:
    def get(offset: int, length: int) -> bytes:
        if calls is not None:
            calls.append(length)
        return data[offset : offset + length]

    return get


@pytest.mark.parametrize(("golden", "contents"), [(BLOCK_PACK, BLOCKS), (NODE_PACK, NODES)])
def test_pack_golden_vector_decodes_and_reencodes(
    golden: bytes, contents: list[tuple[int, int, bytes]]
) -> None:
    # Header, by the documented layout.
    magic, version, key_id, check = _DOC_HEADER.unpack_from(golden)
    assert (magic, version, key_id) == (b"BSPACK", 2, NO_KEY)
    assert check == xxhash.xxh3_64_intdigest(golden[:24])
    assert decode_header(golden, "golden") == NO_KEY
    # Trailer.
    toc_offset, toc_size, count, toc_check, t_version, flags, reserved, t_key, t_check, t_magic = (
        _DOC_TRAILER.unpack_from(golden, len(golden) - 64)
    )
    assert (count, toc_size, t_version, flags, reserved, t_key) == (2, 128, 2, 0, 0, NO_KEY)
    assert (t_magic, toc_offset + toc_size + 64) == (b"BSPACKTC", len(golden))
    assert toc_check == xxhash.xxh3_64_intdigest(golden[toc_offset : toc_offset + toc_size])
    assert t_check == xxhash.xxh3_64_intdigest(golden[-64:-16])
    assert decode_trailer(golden[-TRAILER_SIZE:], len(golden), "golden").toc_offset == toc_offset
    # TOC entries and the records they point at.
    calls: list[int] = []
    records = read_toc(_getter(golden, calls), len(golden), "golden")
    assert calls == [len(golden)]  # a small pack: its tail is all of it, one read
    rebuilt = PackBuilder()
    offset = PACK_HEADER_SIZE
    for k, (rec, (kind, codec, raw)) in enumerate(zip(records, contents, strict=True)):
        object_id, e_offset, stored, raw_size, e_check, e_kind, e_codec, e_flags, e_res = (
            _DOC_ENTRY.unpack_from(golden, toc_offset + 64 * k)
        )
        assert (e_offset, e_kind, e_codec, e_flags, e_res, raw_size) == (
            offset,
            kind,
            codec,
            0,
            0,
            len(raw),
        )
        assert (rec.offset, rec.kind, rec.codec, rec.stored_size, rec.id, rec.check) == (
            e_offset,
            e_kind,
            e_codec,
            stored,
            object_id,
            e_check,
        )
        head = golden[offset : offset + HEADER_SIZE]
        assert head[:4] == b"BSRC" and head[4:6] == bytes([kind, codec]) and head[16:48] == rec.id
        assert struct.unpack_from("<Q", head, 48)[0] == e_check
        payload = golden[offset + HEADER_SIZE : rec.end]
        assert decompress(codec, payload, len(raw), "golden") == raw
        rebuilt.add(encode_record(kind, codec, len(raw), object_id, payload))
        offset = rec.end
    assert offset == toc_offset
    walk = walk_pack(golden, "golden")
    assert walk.complete and not walk.problems
    assert [(r, e) for r, e in walk.records] == [(r, None) for r in records]
    rebuilt.seal()
    assert bytes(rebuilt.take()) == golden


def _flip(data: bytes, *offsets: int) -> bytes:
    damaged = bytearray(data)
    for offset in offsets:
        damaged[offset] ^= 0x40
    return bytes(damaged)


_REC0 = PACK_HEADER_SIZE
_REC1 = PACK_HEADER_SIZE + HEADER_SIZE + 12  # after the raw 12-byte block
_TOC = len(BLOCK_PACK) - TRAILER_SIZE - 128


@pytest.mark.parametrize(
    ("offsets", "complete", "intact", "lost"),
    [
        ((3,), True, 2, 0),  # the header: costs nothing
        ((_TOC + 40,), False, 2, 0),  # an entry's size: scanned, every record found
        ((len(BLOCK_PACK) - 30,), False, 2, 0),  # the trailer
        ((len(BLOCK_PACK) - 1,), False, 2, 0),  # the trailer magic
        ((_REC0 + HEADER_SIZE + 2,), True, 1, 0),  # a payload, TOC intact: that record
        ((_REC0 + 1,), True, 1, 0),  # a record's magic, TOC intact: that record
        ((_TOC + 3, _REC0 + 1), False, 1, 1),  # TOC and a record's magic: resynchronised
        ((_TOC + 3, _REC1 + 5), False, 1, 0),  # TOC and a record's codec: that record
    ],
)
def test_walk_pack_damage_costs_only_the_records_it_hit(
    offsets: tuple[int, ...], complete: bool, intact: int, lost: int
) -> None:
    walk = walk_pack(_flip(BLOCK_PACK, *offsets), "damaged")
    assert walk.complete == complete
    assert walk.problems or intact < 2
    good = {rec.id for rec, error in walk.records if error is None}
    assert len(good) == intact
    assert len({rec.offset for rec, _ in walk.records}) == 2 - lost
    expected = {r.id for r in read_toc(_getter(BLOCK_PACK), len(BLOCK_PACK), "golden")}
    assert good <= expected


def test_walk_pack_truncated_finds_what_is_whole() -> None:
    walk = walk_pack(BLOCK_PACK[:-10], "truncated")
    assert not walk.complete
    assert [error for _, error in walk.records] == [None, None]
    with pytest.raises(IntegrityError):
        read_toc(_getter(BLOCK_PACK[:-10]), len(BLOCK_PACK) - 10, "truncated")


def _rewrite(data: bytes, *, version: int = 2, key_id: bytes = NO_KEY) -> bytes:
    """The pack with another version or key id in header and trailer, checks recomputed
    (as a newer blocksnap would write it)."""
    out = bytearray(data)
    head = struct.pack("<6sH16s", b"BSPACK", version, key_id)
    out[:32] = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    at = len(out) - TRAILER_SIZE
    out[at + 24 : at + 26] = struct.pack("<H", version)
    out[at + 32 : at + 48] = key_id
    out[at + 48 : at + 56] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(out[at : at + 48])))
    return bytes(out)


@pytest.mark.parametrize(
    ("version", "key_id", "message"),
    [(3, NO_KEY, "version 3"), (1, NO_KEY, "version 1"), (2, b"\x01" * 16, "encrypted")],
)
def test_pack_of_unknown_format_is_refused(version: int, key_id: bytes, message: str) -> None:
    newer = _rewrite(BLOCK_PACK, version=version, key_id=key_id)
    with pytest.raises(UnsupportedFormatError, match=message):
        decode_header(newer, "newer")
    with pytest.raises(UnsupportedFormatError, match=message):
        read_toc(_getter(newer), len(newer), "newer")
    with pytest.raises(UnsupportedFormatError, match=message):
        walk_pack(newer, "newer")
    # Only the trailer readable: still refused, not scanned around.
    with pytest.raises(UnsupportedFormatError, match=message):
        walk_pack(_flip(newer, 3), "newer")


def test_pack_reader_reads_the_toc_apart_when_the_tail_does_not_hold_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("blocksnap.store.packs.TAIL_GUESS", TRAILER_SIZE + 10)
    calls: list[int] = []
    records = read_toc(_getter(BLOCK_PACK, calls), len(BLOCK_PACK), "golden")
    assert len(records) == 2 and calls == [TRAILER_SIZE + 10, 128]


# --- real repositories ---------------------------------------------------------------------


def _two_snapshots(repo_path: Path, image: Path) -> dict[str, bytes]:
    """A repository of small packs holding two snapshots; their images by id."""
    images: dict[str, bytes] = {}
    with blocksnap.Repository.init(repo_path, pack_target_size=1 << 20) as repo:
        images[repo.snapshot("vol", image).id] = image.read_bytes()
        debugfs(image, "write /usr/share/common-licenses/GPL-3 gpl")
        images[repo.snapshot("vol", image).id] = image.read_bytes()
    return images


def _packs_by_kind(repo: blocksnap.Repository) -> dict[bytes, set[int]]:
    kinds: dict[bytes, set[int]] = defaultdict(set)
    with repo.store.index.copy() as view:
        for _object_id, loc in view.locations():
            kinds[loc.pack].add(loc.kind)
    return kinds


def _restores(repo: blocksnap.Repository, images: dict[str, bytes], out: Path) -> None:
    for snapshot_id, image in images.items():
        repo.restore("vol", snapshot_id, out)
        assert out.read_bytes() == image, snapshot_id
        out.unlink()


def test_snapshot_and_gc_write_packs_of_one_kind(tmp_path: Path, ext4_image: Path) -> None:
    images = _two_snapshots(tmp_path / "repo", ext4_image)
    with blocksnap.Repository(tmp_path / "repo") as repo:
        kinds = _packs_by_kind(repo)
        assert all(len(k) == 1 for k in kinds.values()), kinds
        assert {KIND_NODE, KIND_BLOCK} == set().union(*kinds.values())
        repo.prune(policy=blocksnap.Policy(keep_last=1))
        assert repo.gc(compact_below=1.0).packs_compacted > 0
        kinds = _packs_by_kind(repo)
        assert all(len(k) == 1 for k in kinds.values()), kinds
        for name in (o.name for o in repo.store.backend.list("packs/")):
            walk = walk_pack(repo.store.backend.get(name), name)
            assert walk.complete and not walk.problems
            assert len({rec.kind for rec, _ in walk.records}) == 1
        latest = repo.snapshots("vol")[-1].id
        _restores(repo, {latest: images[latest]}, tmp_path / "out.img")
        assert repo.verify(read_data=True).ok


def test_rebuild_reads_only_the_tails_of_data_packs(
    tmp_path: Path, ext4_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_path = tmp_path / "repo"
    images = _two_snapshots(repo_path, ext4_image)
    with blocksnap.Repository(repo_path) as repo:
        kinds = _packs_by_kind(repo)
        sizes = {o.name: o.size for o in repo.store.backend.list("packs/")}
    reads: dict[str, list[int]] = defaultdict(list)
    real_get = LocalBackend.get

    def counting_get(
        self: LocalBackend, name: str, offset: int = 0, length: int | None = None
    ) -> bytes:
        data = real_get(self, name, offset, length)
        if name.startswith("packs/"):
            reads[name].append(len(data))
        return data

    monkeypatch.setattr(LocalBackend, "get", counting_get)
    blocksnap.repair_index(repo_path)
    monkeypatch.undo()
    block_packs = [pack_name(p) for p, k in kinds.items() if k == {KIND_BLOCK}]
    assert len(block_packs) >= 5
    for name in block_packs:
        assert len(reads[name]) <= 2 and sum(reads[name]) <= 64 << 10, name
    read_size = sum(sum(r) for r in reads.values())
    total = sum(sizes.values())
    assert read_size < total / 8, (read_size, total)
    with blocksnap.Repository(repo_path) as repo:
        assert repo.verify(read_data=True).ok
        _restores(repo, images, tmp_path / "out.img")


def _pack_of(repo_path: Path, kind: int) -> Path:
    """The largest pack holding objects of a kind."""
    with blocksnap.Repository(repo_path) as repo:
        sizes = {o.name: o.size for o in repo.store.backend.list("packs/")}
        packs = [pack_name(p) for p, k in _packs_by_kind(repo).items() if k == {kind}]
    return repo_path / max(packs, key=lambda n: sizes[n])


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        (KIND_BLOCK, "magic"),
        (KIND_NODE, "magic"),
        (KIND_BLOCK, "toc"),
        (KIND_BLOCK, "trailer"),
        (KIND_NODE, "trailer"),
    ],
)
def test_repair_after_damage_to_a_pack_structure_keeps_every_record(
    tmp_path: Path, ext4_image: Path, kind: int, where: str
) -> None:
    repo_path = tmp_path / "repo"
    images = _two_snapshots(repo_path, ext4_image)
    with blocksnap.Repository(repo_path) as repo:
        objects = repo.store.index.object_count()
    pack = _pack_of(repo_path, kind)
    size = pack.stat().st_size
    offset = {"magic": 0, "toc": size - TRAILER_SIZE - 100, "trailer": size - 20}[where]
    pack.write_bytes(_flip(pack.read_bytes(), offset))
    proc = run_cli("repair", str(repo_path), "--rebuild-index")
    assert proc.returncode == 0, proc.stderr
    with blocksnap.Repository(repo_path) as repo:
        assert repo.store.index.object_count() == objects
        _restores(repo, images, tmp_path / "out.img")
        report = repo.verify(read_data=True)
        assert report.damaged_snapshots == []  # the pack's structure is named, not snapshots
        assert [p.message for p in report.problems if pack.name in p.message]


def test_repair_after_damage_to_toc_and_a_record_loses_only_that_record(
    tmp_path: Path, ext4_image: Path
) -> None:
    repo_path = tmp_path / "repo"
    images = _two_snapshots(repo_path, ext4_image)
    with blocksnap.Repository(repo_path) as repo:
        objects = repo.store.index.object_count()
    pack = _pack_of(repo_path, KIND_BLOCK)
    data = pack.read_bytes()
    victim = walk_pack(data, pack.name).records[3][0]
    pack.write_bytes(_flip(data, len(data) - TRAILER_SIZE - 3, victim.offset + HEADER_SIZE + 7))
    run_cli("repair", str(repo_path), "--rebuild-index", check=True)
    with blocksnap.Repository(repo_path) as repo:
        assert repo.store.index.object_count() == objects - 1
        assert repo.store.index.location(victim.id) is None
        for snapshot_id, image in images.items():
            out = tmp_path / "out.img"
            try:
                repo.restore("vol", snapshot_id, out)
            except (IntegrityError, MissingObjectError):
                assert not out.exists()
            else:
                assert out.read_bytes() == image  # never wrong bytes
                out.unlink()


def test_repair_refuses_a_pack_of_a_newer_format(tmp_path: Path, ext4_image: Path) -> None:
    repo_path = tmp_path / "repo"
    images = _two_snapshots(repo_path, ext4_image)
    pack = _pack_of(repo_path, KIND_BLOCK)
    pack.write_bytes(_rewrite(pack.read_bytes(), version=3))
    proc = run_cli("repair", str(repo_path), "--rebuild-index")
    assert proc.returncode == UnsupportedFormatError.exit_code
    assert proc.stderr.count("\n") == 1 and "newer blocksnap" in proc.stderr, proc.stderr
    with blocksnap.Repository(repo_path) as repo:  # the old index is still in force
        assert [s.id for s in repo.snapshots("vol")] == list(images)


def test_a_node_pack_that_fills_first_waits_for_the_blocks_it_names(
    tmp_path: Path, ext4_image: Path
) -> None:
    """Small packs and 4 KiB blocks: node packs fill while a block pack holding their
    children is still open, which is then sealed and indexed first."""
    with blocksnap.Repository.init(tmp_path / "repo", pack_target_size=64 << 10) as repo:
        snap = repo.snapshot("vol", ext4_image, block_size=4096)
        kinds = _packs_by_kind(repo)
        assert sum(1 for k in kinds.values() if k == {KIND_NODE}) > 1
        assert all(len(k) == 1 for k in kinds.values())
        assert repo.verify(read_data=True).ok
        _restores(repo, {snap.id: ext4_image.read_bytes()}, tmp_path / "out.img")
