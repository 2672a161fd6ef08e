"""XFS inodes' extended attributes, read from the on-disk format by inode number.

libfsxfs 20260901 cannot read a value kept outside the attribute block ("unsupported
format version" on every remote value of a v5 filesystem), names the security namespace
"secure.", and hands ACLs over in XFS's own form under the names "trusted.SGI_ACL_FILE"
and "trusted.SGI_ACL_DEFAULT".  So blocksnap reads them itself.  What it reads (all
integers big-endian unless said; offsets in bytes):

Superblock, at byte 0: magic "XFSB"; 0x04 block size (u32); 0x54 blocks per allocation
group (u32); 0x58 group count; 0x64 version (low 4 bits; 5 has CRCs); 0x68 inode size
(u16); 0x78 log2 block size, 0x7B log2 inodes per block, 0x7C log2 blocks per group (u8).

An inode number is (group << (agblklog + inopblog)) | (block in group << inopblog) |
index in block; a filesystem block number is (group << agblklog) | block in group.

Inode: magic "IN"; 0x04 version (3 has CRCs); 0x4C data extents (u32); 0x50 attribute
extents (u16; with flags2 0x10, large extent counts, u32 at 0x4C instead); 0x52 attribute
fork offset from the end of the core, in 8-byte units (u8); 0x53 attribute fork format
(1 local, 2 extents, 3 B+tree); 0x64 CRC (little-endian, version 3); 0x78 flags2 (u64,
version 3); 0x98 inode number (version 3).  The core is 176 bytes in version 3, else 100.

Local attribute fork: total size (u16), count (u8), a pad byte; then entries of name
length (u8), value length (u8), flags (u8), name, value.  Flags: 0x02 "trusted.", 0x04
"security.", neither "user."; 0x08 (a parent pointer) and 0x80 (incomplete) are not
listed, as the kernel does not list them.

Extents: 16-byte records; of the 128 bits, from the top: 1 unwritten flag, 54 logical
block, 52 filesystem block, 21 block count.  A B+tree fork holds a root (level u16,
record count u16, then keys and, past the fork's room for keys, 8-byte child block
numbers); its blocks ("BMA3" with a 72-byte header, "BMAP" with 24) hold the same.

The attribute blocks, mapped through those extents, start at logical block 0: a leaf
(0x3BEE, 80-byte header; 0xFBEE, 32-byte header) or a node (0x3EBE, 64-byte header;
0xFEBE, 16) whose first entry leads down to the leftmost leaf; leaves are chained by
their first u32 (the next leaf's logical block, 0 at the end).  The header gives the
entry count (u16) after the 56-byte (v5) or 12-byte (v4) block info.  A leaf entry is:
hash (u32), offset of its name in the block (u16), flags (u8), pad.  At that offset a
local entry (flag 0x01) holds value length (u16), name length (u8), name, value; a remote
one holds the value's logical block (u32), value length (u32), name length (u8), name.
A remote value spans whole blocks; on v5 each starts with a 56-byte header ("XARM",
offset of its bytes in the value, their count, CRC, UUID, owner inode, block, LSN).

ACLs are kept under "trusted." as "SGI_ACL_FILE" and "SGI_ACL_DEFAULT": a rule count
(u32), then 12-byte rules of tag (u32), id (u32), permissions (u16), pad.  They are
returned as system.posix_acl_access and system.posix_acl_default in setxattr's form, and
only so: the kernel also lists them raw under their trusted. names to root, but set on
another filesystem those names mean nothing, and set on XFS the ACL names make them.

On v5 every inode, attribute leaf and node and remote block carries a CRC32C (the field
zeroed, little-endian) over the whole of it, and its owner inode: both are checked.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

from blocksnap.errors import FilesystemError
from blocksnap.fs.attrs import (
    ACL_ACCESS,
    ACL_DEFAULT,
    XATTR_SIZE_MAX,
    AclError,
    InodeAttributes,
    acl_xattr,
    read_exact,
)

_INODE_MAGIC = b"IN"
_LOCAL, _EXTENTS, _BTREE = 1, 2, 3
_ROOT, _SECURE, _PARENT, _INCOMPLETE = 0x02, 0x04, 0x08, 0x80
_LOCAL_VALUE = 0x01
_NREXT64 = 0x10  # inode flags2: large extent counts
_LEAF_V5, _LEAF_V4, _NODE_V5, _NODE_V4 = 0x3BEE, 0xFBEE, 0x3EBE, 0xFEBE
_BMAP_V5, _BMAP_V4 = b"BMA3", b"BMAP"
_RMT_MAGIC = 0x5841524D
_RMT_HEADER = 56
_ACLS = {b"SGI_ACL_FILE": ACL_ACCESS, b"SGI_ACL_DEFAULT": ACL_DEFAULT}
MAX_VALUE = XATTR_SIZE_MAX  # XFS's own limit too
MAX_DEPTH = 8
MAX_LEAVES = 1 << 16
MAX_MAP_BLOCKS = 1 << 12


class Damaged(Exception):
    """A structure of one inode (its attribute fork, a block map) cannot be read; the
    message says where."""


class XfsAttributes:
    """Reads inodes' extended attributes from an XFS filesystem image."""

    def __init__(self, image: BinaryIO) -> None:
        self._image = image
        sb = self._read(0, 512, "the superblock")
        self.superblock = sb
        if sb[:4] != b"XFSB":
            raise FilesystemError("the XFS superblock has no magic number")
        self.block_size = int.from_bytes(sb[4:8], "big")
        self.ag_blocks = int.from_bytes(sb[0x54:0x58], "big")
        self.crc = int.from_bytes(sb[0x64:0x66], "big") & 0xF == 5
        self.inode_size = int.from_bytes(sb[0x68:0x6A], "big")
        self.inopblog, self.agblklog = sb[0x7B], sb[0x7C]
        if (
            self.block_size != 1 << sb[0x78]
            or not 512 <= self.block_size <= 65536
            or not 256 <= self.inode_size <= self.block_size
            or self.inode_size << self.inopblog != self.block_size
            or not 0 < self.ag_blocks <= 1 << self.agblklog
        ):
            raise FilesystemError("the XFS superblock describes an impossible geometry")
        self.core = 176 if self.crc else 100
        self.leaf_header = 80 if self.crc else 32
        self.node_header = 64 if self.crc else 16
        self.bmap_header = 72 if self.crc else 24

    # --- reading -------------------------------------------------------------------

    def _read(self, offset: int, size: int, what: str) -> bytes:
        return read_exact(self._image, offset, size, what)

    def _block_offset(self, fsblock: int) -> int:
        group, block = fsblock >> self.agblklog, fsblock & ((1 << self.agblklog) - 1)
        return (group * self.ag_blocks + block) * self.block_size

    def _block(self, fsblock: int, what: str) -> bytes:
        try:
            return self._read(self._block_offset(fsblock), self.block_size, what)
        except FilesystemError as exc:
            raise Damaged(str(exc)) from None

    def _crc_ok(self, data: bytes, at: int) -> bool:
        zeroed = data[:at] + b"\0\0\0\0" + data[at + 4 :]
        return int(google_crc32c.value(zeroed)) == int.from_bytes(data[at : at + 4], "little")

    def _inode(self, number: int) -> bytes:
        mask = (1 << (self.agblklog + self.inopblog)) - 1
        group, agino = number >> (self.agblklog + self.inopblog), number & mask
        block, index = agino >> self.inopblog, agino & ((1 << self.inopblog) - 1)
        where = (group * self.ag_blocks + block) * self.block_size + index * self.inode_size
        raw = self._read(where, self.inode_size, f"inode {number}")
        if raw[:2] != _INODE_MAGIC:
            raise FilesystemError(f"inode {number} is damaged: it has no magic number")
        if raw[4] >= 3:
            if not self._crc_ok(raw, 0x64):
                raise FilesystemError(f"inode {number} is damaged: its checksum does not match")
            if int.from_bytes(raw[0x98:0xA0], "big") != number:
                raise FilesystemError(f"inode {number} is damaged: it names another inode")
        return raw

    # --- for `xfsdir`, which reads directories and symlinks with the same parts ---------

    def inode(self, number: int) -> bytes:
        """An inode's bytes, its CRC and number checked."""
        return self._inode(number)

    def block_map(
        self, fork: bytes, form: int, count: int, owner: int
    ) -> list[tuple[int, int, int]]:
        """(logical block, filesystem block, count) of a fork's written extents."""
        return self._extents(fork, form, count, owner)

    def block(self, fsblock: int, what: str) -> bytes:
        return self._block(fsblock, what)

    def crc_ok(self, data: bytes, at: int) -> bool:
        return self._crc_ok(data, at)

    # --- attributes ----------------------------------------------------------------

    def check(self, number: int) -> None:
        """Read an inode, checking its checksum (a FilesystemError if it is damaged)."""
        self._inode(number)

    def of(self, number: int) -> InodeAttributes:
        """An inode's attributes, as the kernel lists them."""
        raw = self._inode(number)
        out = InodeAttributes(flags=int.from_bytes(raw[0x5A:0x5C], "big"))
        forkoff, form = raw[0x52], raw[0x53]
        if forkoff == 0:
            return out
        fork = raw[self.core + forkoff * 8 :]
        try:
            if form == _LOCAL:
                self._local(fork, out)
            elif form in (_EXTENTS, _BTREE):
                count = int.from_bytes(raw[0x50:0x52], "big")
                if raw[4] >= 3 and int.from_bytes(raw[0x78:0x80], "big") & _NREXT64:
                    count = int.from_bytes(raw[0x4C:0x50], "big")
                if form == _EXTENTS and count == 0:
                    return out  # a fork left empty: no attributes, as the kernel sees it
                extents = self._extents(fork, form, count, number)
                self._blocks(extents, number, out)
            else:
                raise Damaged(f"the attribute fork has unknown format {form}")
        except Damaged as exc:
            out.unreadable["(the attribute fork)"] = f"inode {number}: {exc}"
        return out

    def _name(self, flags: int, name: bytes) -> str | None:
        """The name the kernel lists, or None for an entry it does not list."""
        if flags & (_PARENT | _INCOMPLETE):
            return None
        if flags & _ROOT and name in _ACLS:
            return _ACLS[name]
        prefix = "trusted." if flags & _ROOT else "security." if flags & _SECURE else "user."
        return prefix + name.decode("utf-8", "surrogateescape")

    def _add(self, out: InodeAttributes, name: str, value: bytes) -> None:
        if name in (ACL_ACCESS, ACL_DEFAULT):
            try:
                value = acl_xattr(_xfs_acl_rules(value))
            except AclError as exc:
                out.unreadable[name] = str(exc)
                return
        out.found[name] = value

    def _local(self, fork: bytes, out: InodeAttributes) -> None:
        if len(fork) < 4:
            raise Damaged("the local attribute list has no header")
        total, count = int.from_bytes(fork[0:2], "big"), fork[2]
        if total > len(fork):
            raise Damaged("the local attribute list is larger than its fork")
        at = 4
        for _ in range(count):
            if at + 3 > total:
                raise Damaged("the local attribute list runs past its end")
            name_len, value_len, flags = fork[at], fork[at + 1], fork[at + 2]
            end = at + 3 + name_len + value_len
            if end > total:
                raise Damaged("an attribute runs past the end of the local list")
            name = self._name(flags, bytes(fork[at + 3 : at + 3 + name_len]))
            if name is not None:
                self._add(out, name, bytes(fork[at + 3 + name_len : end]))
            at = end

    # --- the block map of the attribute fork ---------------------------------------

    def _extents(
        self, fork: bytes, form: int, count: int, owner: int
    ) -> list[tuple[int, int, int]]:
        """(logical block, filesystem block, count) of the fork's written extents."""
        if form == _EXTENTS:
            if count * 16 > len(fork):
                raise Damaged("its extent list is larger than its fork")
            return list(_records(fork, 0, count))
        if len(fork) < 4:
            raise Damaged("its B+tree root has no header")
        level, records = struct.unpack_from(">HH", fork, 0)
        room = (len(fork) - 4) // 16
        if not 0 < level <= MAX_DEPTH or records > room:
            raise Damaged("its B+tree root is damaged")
        at = 4 + room * 8
        found: list[tuple[int, int, int]] = []
        budget = [MAX_MAP_BLOCKS]
        for i in range(records):
            child = int.from_bytes(fork[at + i * 8 : at + i * 8 + 8], "big")
            self._bmap_block(child, level - 1, owner, found, budget)
        return found

    def _bmap_block(
        self,
        fsblock: int,
        level: int,
        owner: int,
        found: list[tuple[int, int, int]],
        budget: list[int],
    ) -> None:
        budget[0] -= 1
        if budget[0] < 0:  # a hostile map can name one block many times over
            raise Damaged(f"its block map has more than {MAX_MAP_BLOCKS} blocks")
        data = self._block(fsblock, "a block of a block map")
        magic = _BMAP_V5 if self.crc else _BMAP_V4
        if data[:4] != magic or int.from_bytes(data[4:6], "big") != level:
            raise Damaged(f"block map block {fsblock} is not one")
        if self.crc:
            if not self._crc_ok(data, 0x40):
                raise Damaged(f"block map block {fsblock} is damaged: its checksum does not match")
            if int.from_bytes(data[0x38:0x40], "big") != owner:
                raise Damaged(f"block map block {fsblock} belongs to another inode")
        records = int.from_bytes(data[6:8], "big")
        room = (self.block_size - self.bmap_header) // 16
        if records > room or len(found) + records > MAX_LEAVES:
            raise Damaged(f"block map block {fsblock} is damaged")
        if level == 0:
            found.extend(_records(data, self.bmap_header, records))
            return
        at = self.bmap_header + room * 8
        for i in range(records):
            child = int.from_bytes(data[at + i * 8 : at + i * 8 + 8], "big")
            self._bmap_block(child, level - 1, owner, found, budget)

    # --- attribute blocks -----------------------------------------------------------

    def _fork_block(
        self, extents: list[tuple[int, int, int]], owner: int, logical: int, remote: bool
    ) -> bytes:
        """Logical block `logical` of the attribute fork; on v5 its CRC and owner are
        checked (at 12 and 48 in a leaf or node, at 12 and 32 in a remote value block)."""
        mapped = [b + logical - s for s, b, n in extents if s <= logical < s + n]
        if not mapped:
            raise Damaged(f"its attribute block {logical} is not mapped")
        what = "remote value block" if remote else "attribute block"
        data = self._block(mapped[0], f"{what} {logical}")
        if self.crc:
            if not self._crc_ok(data, 12):
                raise Damaged(f"{what} {logical} is damaged: its checksum does not match")
            at = 32 if remote else 48
            if int.from_bytes(data[at : at + 8], "big") != owner:
                raise Damaged(f"{what} {logical} belongs to another inode")
        return data

    def _blocks(
        self, extents: list[tuple[int, int, int]], owner: int, out: InodeAttributes
    ) -> None:
        info = 56 if self.crc else 12  # the block info every leaf and node starts with
        logical = 0
        data = self._fork_block(extents, owner, logical, remote=False)
        for _ in range(MAX_DEPTH):  # down the first entries of the nodes to the first leaf
            if int.from_bytes(data[8:10], "big") != (_NODE_V5 if self.crc else _NODE_V4):
                break
            count = int.from_bytes(data[info : info + 2], "big")
            if count == 0 or self.node_header + count * 8 > len(data):
                raise Damaged(f"attribute node {logical} is damaged")
            logical = int.from_bytes(data[self.node_header + 4 : self.node_header + 8], "big")
            data = self._fork_block(extents, owner, logical, remote=False)
        seen = set()
        while True:
            if int.from_bytes(data[8:10], "big") != (_LEAF_V5 if self.crc else _LEAF_V4):
                raise Damaged(f"attribute block {logical} is neither a leaf nor a node")
            seen.add(logical)
            for name, value, remote in self._leaf(data, logical, info):
                if remote is not None:
                    try:
                        value = self._remote(extents, owner, *remote)
                    except Damaged as exc:
                        out.unreadable[name] = str(exc)
                        continue
                self._add(out, name, value)
            following = int.from_bytes(data[0:4], "big")
            if following == 0:
                return
            if following in seen or len(seen) >= MAX_LEAVES:
                raise Damaged("its attribute leaves form a loop")
            logical = following
            data = self._fork_block(extents, owner, logical, remote=False)

    def _leaf(
        self, data: bytes, logical: int, info: int
    ) -> Iterator[tuple[str, bytes, tuple[int, int] | None]]:
        """A leaf's listed entries: (name, value, None) for a value kept in the leaf,
        (name, b"", (first block, length)) for one kept in blocks of its own."""
        count = int.from_bytes(data[info : info + 2], "big")
        if self.leaf_header + count * 8 > len(data):
            raise Damaged(f"attribute leaf {logical} claims more entries than fit")
        past = f"attribute leaf {logical} has an entry past its end"
        for i in range(count):
            at = self.leaf_header + i * 8
            offset, flags = int.from_bytes(data[at + 4 : at + 6], "big"), data[at + 6]
            if flags & _LOCAL_VALUE:
                if offset + 3 > len(data):
                    raise Damaged(past)
                value_len = int.from_bytes(data[offset : offset + 2], "big")
                name_at = offset + 3
                value_at = name_at + data[offset + 2]
                if value_at + value_len > len(data):
                    raise Damaged(past)
                name = self._name(flags, bytes(data[name_at:value_at]))
                if name is not None:
                    yield name, bytes(data[value_at : value_at + value_len]), None
                continue
            if offset + 9 > len(data):
                raise Damaged(past)
            first, value_len = struct.unpack_from(">II", data, offset)
            name_end = offset + 9 + data[offset + 8]
            if name_end > len(data):
                raise Damaged(past)
            name = self._name(flags, bytes(data[offset + 9 : name_end]))
            if name is not None:
                yield name, b"", (first, value_len)

    def _remote(
        self, extents: list[tuple[int, int, int]], owner: int, first: int, size: int
    ) -> bytes:
        """A value kept in whole blocks of its own from logical block `first`."""
        if size > MAX_VALUE:
            raise Damaged(f"its value claims {size} bytes, more than {MAX_VALUE}")
        room = self.block_size - (_RMT_HEADER if self.crc else 0)
        parts, got, logical = [], 0, first
        while got < size:
            data = self._fork_block(extents, owner, logical, remote=True)
            take = min(room, size - got)
            if self.crc:
                offset, count = struct.unpack_from(">II", data, 4)
                if data[:4] != _RMT_MAGIC.to_bytes(4, "big") or (offset, count) != (got, take):
                    raise Damaged(f"remote value block {logical} is not the value's next part")
                parts.append(data[_RMT_HEADER : _RMT_HEADER + take])
            else:
                parts.append(data[:take])
            got += take
            logical += 1
        return b"".join(parts)


def _records(data: bytes, at: int, count: int) -> Iterator[tuple[int, int, int]]:
    """The written extents among `count` packed 16-byte block map records at `at`."""
    for i in range(count):
        high, low = struct.unpack_from(">QQ", data, at + i * 16)
        if high >> 63:
            continue  # unwritten: allocated, never written
        logical = (high & ((1 << 63) - 1)) >> 9
        fsblock = ((high & 0x1FF) << 43) | (low >> 21)
        yield logical, fsblock, low & ((1 << 21) - 1)


def _xfs_acl_rules(stored: bytes) -> Iterator[tuple[int, int, int]]:
    if len(stored) < 4:
        raise AclError("its ACL has no rule count")
    count = int.from_bytes(stored[:4], "big")
    if 4 + count * 12 > len(stored):
        raise AclError("its ACL claims more rules than it holds")
    for i in range(count):
        tag, ident, perm = struct.unpack_from(">IIH", stored, 4 + i * 12)
        yield tag, perm, ident
