"""dissect.btrfs's reader with the superblock and every B-tree node checked by blocksnap.

dissect.btrfs (AGPL-3, the optional extra `blocksnap[btrfs]`) verifies no checksum and
trusts every pointer: a flipped byte reads as wrong metadata, and a node that points to
itself sends its cursor down forever.  `CheckedBtrfs` checks, before dissect sees them:

Superblock (4 KiB at 64 KiB; little-endian):
    0x00 csum[32]       checksum of bytes 0x20..0x1000, by the type at 0xC4
    0x20 fsid[16]       0x40 magic "_BHRfS_M"      0x90 sectorsize u32  0x94 nodesize u32
    0xBC incompat u64   0xC4 csum_type u16: 0 crc32c, 1 xxhash64, 2 sha256, 3 blake2b-256
    0x23B metadata_uuid[16], the fsid of tree nodes when incompat bit 10 is set

Tree node (nodesize bytes at a logical address):
    0x00 csum[32] of bytes 0x20..nodesize      0x20 fsid[16]      0x30 bytenr u64 (its
    own logical address)      0x50 generation u64      0x60 nritems u32      0x64 level
    u8 (0 = leaf, below 8)    then nritems entries from 0x65: in a leaf, items of 25 bytes
    (key[17], data offset u32 and size u32, the data counted from 0x65); above, pointers
    of 33 bytes (key[17], child address u64, generation u64).

Every node read must carry its own address, the filesystem's id and a matching checksum,
and its entries must fit in it.  A pointer describes its child: one level below the
parent, of the pointer's generation, and starting at the pointer's key, as the kernel
checks too.  Each node's level, generation and first key are remembered, whether read or
expected by a pointer, and a node read or pointed to as anything else is refused.  So
every path down a tree shortens at each step, whatever the image holds, and a pointer
moved to another valid node (a sibling, a leaf of another tree, an older copy of its own
child still on disk) is named, not read as the child's items.  An empty node is refused:
dissect's search never ends on one, and the trees read here are never empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import google_crc32c
import xxhash
from dissect.btrfs import Btrfs
from dissect.btrfs.exceptions import Error as DissectError

from blocksnap.fs.btrfsdamage import BtrfsDamage

SUPERBLOCK_OFFSET = 0x10000
SUPERBLOCK_SIZE = 0x1000
MAGIC = b"_BHRfS_M"
MAX_LEVEL = 8
_HEADER_SIZE = 0x65
_KEY = struct.Struct("<QBQ")  # objectid, type, offset
_ITEM_SIZE = 25
_POINTER_SIZE = 33
_INCOMPAT_METADATA_UUID = 1 << 10
_MIN_NODE, _MAX_NODE = 4096, 65536


def checksum(kind: int, data: bytes | memoryview) -> bytes:
    """The checksum btrfs stores for `data`, padded to 32 bytes as on disk."""
    digest: bytes
    if kind == 0:
        digest = google_crc32c.value(bytes(data)).to_bytes(4, "little")
    elif kind == 1:
        digest = xxhash.xxh64_intdigest(data).to_bytes(8, "little")
    elif kind == 2:
        digest = hashlib.sha256(data).digest()
    elif kind == 3:
        digest = hashlib.blake2b(data, digest_size=32).digest()
    else:
        raise BtrfsDamage(f"unknown checksum type {kind}")
    return digest.ljust(32, b"\0")


def read_superblock(image: BinaryIO) -> bytes:
    """The primary superblock, checked: magic, checksum and node size."""
    image.seek(SUPERBLOCK_OFFSET)
    sb = image.read(SUPERBLOCK_SIZE)
    if len(sb) != SUPERBLOCK_SIZE or sb[0x40:0x48] != MAGIC:
        raise BtrfsDamage("no btrfs superblock at 64 KiB")
    (csum_type,) = struct.unpack_from("<H", sb, 0xC4)
    if checksum(csum_type, sb[0x20:]) != sb[:0x20]:
        raise BtrfsDamage("the superblock's checksum does not match")
    sectorsize, nodesize = struct.unpack_from("<II", sb, 0x90)
    if not _MIN_NODE <= nodesize <= _MAX_NODE or nodesize & (nodesize - 1):
        raise BtrfsDamage(f"node size {nodesize} is not a power of two from 4 KiB to 64 KiB")
    if not _MIN_NODE <= sectorsize <= nodesize or sectorsize & (sectorsize - 1):
        raise BtrfsDamage(f"sector size {sectorsize} is invalid")
    return sb


@contextlib.contextmanager
def dissect_errors() -> Iterator[None]:
    """dissect's own errors derive from Exception alone, and its structures raise EOFError
    or struct.error when cut short: each becomes a BtrfsDamage, the OSError that the layer
    above names."""
    try:
        yield
    except (DissectError, EOFError, struct.error, ArithmeticError) as exc:
        raise BtrfsDamage(str(exc) or type(exc).__name__) from exc


@dataclass(frozen=True, slots=True)
class _Identity:
    """What a node says of itself, and what every pointer to it must say of it."""

    level: int
    generation: int
    first_key: bytes

    def __str__(self) -> str:
        key = _KEY.unpack(self.first_key)
        return f"level {self.level}, generation {self.generation}, first key {key}"


class CheckedBtrfs(Btrfs):  # type: ignore[misc]
    """A dissect Btrfs whose every tree node is checked as the module docstring says."""

    def __init__(self, image: BinaryIO) -> None:
        sb = read_superblock(image)
        (incompat,) = struct.unpack_from("<Q", sb, 0xBC)
        (self._csum_type,) = struct.unpack_from("<H", sb, 0xC4)
        self._node_fsid = sb[0x23B:0x24B] if incompat & _INCOMPAT_METADATA_UUID else sb[0x20:0x30]
        # address -> the node as read, or as the first pointer to it describes it
        self._identities: dict[int, _Identity] = {}
        with dissect_errors():  # it reads the chunk tree, and finds the root tree's items
            super().__init__(image)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """dissect_errors(), for the adapter, which imports this module only to mount."""
        return dissect_errors()

    def read_logical(self, address: int, size: int) -> bytes:
        """`size` bytes at a logical address, which must lie inside one chunk: dissect
        reads a gap between chunks as zeros."""
        stream = self._logical_fh
        i = bisect_right(stream._chunk_offsets, address) - 1
        chunk = stream.chunks[i] if i >= 0 else None
        if chunk is None or address + size > chunk.offset + chunk.length:
            raise BtrfsDamage(f"data at {address:#x}+{size} lies outside every chunk")
        stream.seek(address)
        data: bytes = stream.read(size)
        if len(data) != size:
            raise BtrfsDamage(f"data at {address:#x}: read {len(data)} of {size} bytes")
        return data

    def _read_node(self, address: int) -> bytes:
        node: bytes = super()._read_node(address)
        where = f"B-tree node at {address:#x}"
        if len(node) != self.node_size:
            raise BtrfsDamage(f"{where}: outside the filesystem")
        if checksum(self._csum_type, memoryview(node)[0x20:]) != node[:0x20]:
            raise BtrfsDamage(f"{where}: checksum does not match")
        if node[0x20:0x30] != self._node_fsid:
            raise BtrfsDamage(f"{where}: belongs to another filesystem")
        (bytenr,) = struct.unpack_from("<Q", node, 0x30)
        (generation,) = struct.unpack_from("<Q", node, 0x50)
        nritems, level = struct.unpack_from("<IB", node, 0x60)
        if bytenr != address:
            raise BtrfsDamage(f"{where}: records address {bytenr:#x}")
        if level >= MAX_LEVEL or nritems == 0:
            raise BtrfsDamage(f"{where}: level {level} with {nritems} entries")
        found = _Identity(level, generation, node[_HEADER_SIZE : _HEADER_SIZE + _KEY.size])
        known = self._identities.setdefault(address, found)
        if known != found:
            raise BtrfsDamage(f"{where}: {found}, where its parent expects {known}")
        if level:
            self._check_pointers(node, nritems, level, where)
        else:
            self._check_items(node, nritems, where)
        return node

    def _check_pointers(self, node: bytes, nritems: int, level: int, where: str) -> None:
        if _HEADER_SIZE + nritems * _POINTER_SIZE > len(node):
            raise BtrfsDamage(f"{where}: {nritems} pointers do not fit")
        for i in range(nritems):
            at = _HEADER_SIZE + i * _POINTER_SIZE
            child, generation = struct.unpack_from("<QQ", node, at + _KEY.size)
            expected = _Identity(level - 1, generation, node[at : at + _KEY.size])
            known = self._identities.setdefault(child, expected)
            if known != expected:
                raise BtrfsDamage(f"{where}: points to {child:#x} as {expected}, not {known}")

    def _check_items(self, node: bytes, nritems: int, where: str) -> None:
        room = len(node) - _HEADER_SIZE
        if nritems * _ITEM_SIZE > room:
            raise BtrfsDamage(f"{where}: {nritems} items do not fit")
        for i in range(nritems):
            offset, size = struct.unpack_from("<II", node, _HEADER_SIZE + i * _ITEM_SIZE + 17)
            if offset + size > room or offset < nritems * _ITEM_SIZE:
                raise BtrfsDamage(f"{where}: item {i} lies outside its node")
