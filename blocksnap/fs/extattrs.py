"""ext2/3/4 inodes' extended attributes, read from the on-disk format by inode number.

libfsext returns the first 60 bytes of a longer attribute value and then zeros, and
forgets an inode's attributes once it has cached the inode, so blocksnap reads them
itself.  What it reads (all integers little-endian; offsets in bytes):

Superblock, at byte 1024 of the filesystem:
    0x00 inodes count              0x04 blocks count (low 32 bits)
    0x14 first data block          0x18 log2(block size) - 10
    0x20 blocks per group          0x28 inodes per group
    0x38 magic 0xEF53 (u16)        0x48 creator OS (0 = Linux)
    0x4C revision (0: 128-byte inodes)
    0x58 inode size (u16)          0x5C/0x60/0x64 compat/incompat/ro-compat features
    0x68 UUID (16 bytes)           0xFE group descriptor size (u16, with 64bit)
    0x104 first meta_bg group      0x150 blocks count (high 32 bits)
    0x24C two backup groups (sparse_super2)
    0x270 checksum seed (with the csum_seed feature)

Group descriptors follow the superblock's block; with meta_bg, those from the first
meta_bg group on sit at the start of their own group of groups, after that group's
superblock backup.  Each is 32 bytes, or the superblock's size with 64bit; the inode
table's block is at 0x08 (low 32 bits) and 0x28 (high).

Inode n is number (n - 1) % inodes-per-group in group (n - 1) // inodes-per-group's table:
    0x1C blocks, in 512-byte units (low 32 bits)
    0x20 flags (0x200000 value of an xattr, 0x10000000 inline data)
    0x28 the block area (60 bytes: a fast symlink's target, the start of inline data)
    0x64 generation   0x68 xattr block (low 32 bits)   0x76 xattr block (high 16)
    0x7C checksum (low 16)   0x80 extra size past 128 (u16)   0x82 checksum (high 16)
In-inode attributes start at 128 + extra size: the magic 0xEA020000, then entries, whose
value offsets count from the first entry.  An xattr block starts with a 32-byte header
(magic 0xEA020000, reference count, block count 1, hash, checksum at 0x10), then entries,
whose value offsets count from the block's start.  An entry is: name length (u8), name
index (u8), value offset (u16), value inode (u32, the value's own inode with ea_inode),
value size (u32), hash (u32), the name; padded to 4 bytes.  Four zero bytes end the list.

Name indexes are the kernel's: 1 "user.", 2 "system.posix_acl_access", 3
"system.posix_acl_default", 4 "trusted.", 6 "security.", 7 "system.", 8 "system.richacl".
An entry of another index is not listed, as the kernel does not list it.  POSIX ACLs
are stored in ext4's own form (version 1; short entries for the owner, group, mask and
other) and are returned in the form setxattr(2) takes (version 2; 8-byte entries).

With metadata_csum every inode and xattr block is checked: CRC32C (Castagnoli, with no
inversion at either end) seeded with the CRC of the UUID or the superblock's seed, then
over the inode number and generation and the inode with its checksum zeroed, or over the
block number (u64) and the block with its checksum zeroed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import google_crc32c

from blocksnap.errors import FilesystemError
from blocksnap.fs.attrs import (
    ACL_ACCESS,
    ACL_DEFAULT,
    ACL_GROUP,
    ACL_USER,
    XATTR_SIZE_MAX,
    AclError,
    InodeAttributes,
    acl_xattr,
    read_exact,
)

SUPERBLOCK_AT = 1024
MAGIC = 0xEF53
XATTR_MAGIC = 0xEA020000
INLINE_DATA_FLAG = 0x10000000
EA_INODE_FLAG = 0x200000

_SPARSE_SUPER = 0x1  # ro-compat
_METADATA_CSUM = 0x400  # ro-compat
_SPARSE_SUPER2 = 0x200  # compat
_META_BG, _64BIT, _CSUM_SEED = 0x10, 0x80, 0x2000  # incompat
_GOOD_OLD_INODE_SIZE = 128
_ENTRY = struct.Struct("<BBHIII")
_BLOCK_HEADER = 32
_PREFIXES = {
    1: "user.",
    2: ACL_ACCESS,
    3: ACL_DEFAULT,
    4: "trusted.",
    6: "security.",
    7: "system.",
    8: "system.richacl",
}
_ACL_PREFIXES = {2, 3}
_EXT4_ACL_VERSION = 1
MAX_VALUE = XATTR_SIZE_MAX


def raw_crc32c(seed: int, data: bytes) -> int:
    """The kernel's crc32c(): no inversion on the way in or out."""
    return int(google_crc32c.extend(seed ^ 0xFFFFFFFF, data)) ^ 0xFFFFFFFF


class ExtAttributes:
    """Reads inodes' extended attributes from an ext filesystem image.

    `read_inode` returns the first `size` bytes of an inode's data: it reads a value kept
    in its own inode (the ea_inode feature).
    """

    def __init__(self, image: BinaryIO, read_inode: Callable[[int, int], bytes]) -> None:
        self._image = image
        self._read_inode = read_inode
        sb = self._read(SUPERBLOCK_AT, 1024, "the superblock")

        def u32(at: int) -> int:
            return int.from_bytes(sb[at : at + 4], "little")

        def u16(at: int) -> int:
            return int.from_bytes(sb[at : at + 2], "little")

        if u16(0x38) != MAGIC:
            raise FilesystemError("the ext superblock has no magic number")
        log = u32(0x18)
        compat, incompat, ro_compat = u32(0x5C), u32(0x60), u32(0x64)
        self.compat, self.incompat = compat, incompat
        self.block_size = 1024 << log if log <= 6 else 0
        self.inodes = u32(0x00)
        self.inodes_per_group = u32(0x28)
        self.blocks_per_group = u32(0x20)
        self.first_data_block = u32(0x14)
        self.inode_size = u16(0x58) if u32(0x4C) >= 1 else _GOOD_OLD_INODE_SIZE
        self.desc_size = u16(0xFE) if incompat & _64BIT else 32
        self.meta_bg = bool(incompat & _META_BG)
        self.first_meta_bg = u32(0x104)
        self.sparse_super = bool(ro_compat & _SPARSE_SUPER)
        self.backup_groups = (u32(0x24C), u32(0x250)) if compat & _SPARSE_SUPER2 else None
        if (
            not self.block_size
            or not self.inodes_per_group
            or not self.blocks_per_group
            or self.inode_size < _GOOD_OLD_INODE_SIZE
            or self.inode_size > self.block_size
            or self.inode_size & (self.inode_size - 1)
            or self.desc_size < 32
            or self.desc_size > self.block_size
            or self.desc_size & (self.desc_size - 1)
        ):
            raise FilesystemError("the ext superblock describes an impossible geometry")
        self._tables: dict[int, int] = {}  # group -> its inode table's block
        self.seed: int | None = None
        if ro_compat & _METADATA_CSUM and u32(0x48) == 0:
            self.seed = (
                u32(0x270)
                if incompat & _CSUM_SEED
                else raw_crc32c(0xFFFFFFFF, bytes(sb[0x68:0x78]))
            )

    # --- reading -------------------------------------------------------------------

    def _read(self, offset: int, size: int, what: str) -> bytes:
        return read_exact(self._image, offset, size, what)

    def _has_super(self, group: int) -> bool:
        """Whether a group starts with a superblock backup (the kernel's ext4_bg_has_super)."""
        if group == 0:
            return True
        if self.backup_groups is not None:
            return group in self.backup_groups
        if group <= 1 or not self.sparse_super:
            return True
        if not group & 1:
            return False
        for base in (3, 5, 7):
            power = base
            while power < group:
                power *= base
            if power == group:
                return True
        return False

    def _descriptor_block(self, group: int) -> int:
        per_block = self.block_size // self.desc_size
        index = group // per_block
        if not self.meta_bg or index < self.first_meta_bg:
            return self.first_data_block + 1 + index
        first = index * per_block
        skip = 1 if self._has_super(first) else 0
        if self.block_size == 1024 and index == 0 and self.first_data_block == 0:
            skip += 1
        return first * self.blocks_per_group + self.first_data_block + skip

    def _inode_bytes(self, number: int) -> bytes:
        if not 1 <= number <= self.inodes:
            raise FilesystemError(f"inode {number} is outside the filesystem")
        group, index = divmod(number - 1, self.inodes_per_group)
        table = self._tables.get(group)
        if table is None:
            per_block = self.block_size // self.desc_size
            at = self._descriptor_block(group) * self.block_size
            at += group % per_block * self.desc_size
            desc = self._read(at, self.desc_size, f"the group descriptor of inode {number}")
            table = int.from_bytes(desc[8:12], "little")
            if self.desc_size >= 64:
                table |= int.from_bytes(desc[0x28:0x2C], "little") << 32
            self._tables[group] = table
        where = table * self.block_size + index * self.inode_size
        raw = self._read(where, self.inode_size, f"inode {number}")
        if self.seed is not None and not self._inode_checksum_ok(number, raw):
            raise FilesystemError(f"inode {number} is damaged: its checksum does not match")
        return raw

    def _inode_checksum_ok(self, number: int, raw: bytes) -> bool:
        assert self.seed is not None
        extra = int.from_bytes(raw[0x80:0x82], "little") if len(raw) > 128 else 0
        has_high = len(raw) > 128 and extra >= 4
        zeroed = bytearray(raw)
        zeroed[0x7C:0x7E] = b"\0\0"
        if has_high:
            zeroed[0x82:0x84] = b"\0\0"
        crc = raw_crc32c(self.seed, number.to_bytes(4, "little"))
        crc = raw_crc32c(crc, raw[0x64:0x68])
        crc = raw_crc32c(crc, bytes(zeroed))
        stored = int.from_bytes(raw[0x7C:0x7E], "little")
        if has_high:
            stored |= int.from_bytes(raw[0x82:0x84], "little") << 16
            return stored == crc
        return stored == crc & 0xFFFF

    # --- attributes ----------------------------------------------------------------

    def inode(self, number: int) -> bytes:
        """The inode's bytes, its checksum checked (`ext` reads the block area at 0x28 and
        the block count at 0x1C from them)."""
        return self._inode_bytes(number)

    def flags(self, number: int) -> int:
        """An inode's flags (0x10000000: its data is inline)."""
        return int.from_bytes(self._inode_bytes(number)[0x20:0x24], "little")

    def of(self, number: int) -> InodeAttributes:
        """An inode's flags and attributes, as the kernel lists them."""
        raw = self._inode_bytes(number)
        out = InodeAttributes(flags=int.from_bytes(raw[0x20:0x24], "little"))
        if len(raw) > _GOOD_OLD_INODE_SIZE:
            extra = int.from_bytes(raw[0x80:0x82], "little")
            start = _GOOD_OLD_INODE_SIZE + extra
            if extra % 4 or start > len(raw):
                out.unreadable["(in the inode)"] = f"its extra size {extra} is impossible"
            elif raw[start : start + 4] == XATTR_MAGIC.to_bytes(4, "little"):
                region = raw[start + 4 :]
                self._entries(region, 0, region, out, "in the inode")
        block = int.from_bytes(raw[0x68:0x6C], "little")
        block |= int.from_bytes(raw[0x76:0x78], "little") << 32
        if block:
            self._block(block, out)
        return out

    def _block(self, block: int, out: InodeAttributes) -> None:
        what = f"in xattr block {block}"
        try:
            data = self._read(block * self.block_size, self.block_size, what)
        except FilesystemError as exc:
            out.unreadable[f"({what})"] = str(exc)
            return
        if int.from_bytes(data[0:4], "little") != XATTR_MAGIC:
            out.unreadable[f"({what})"] = "the block has no xattr magic number"
            return
        if int.from_bytes(data[8:12], "little") != 1:
            out.unreadable[f"({what})"] = "the block claims to span more than one block"
            return
        damaged = None
        if self.seed is not None:
            zeroed = bytearray(data)
            zeroed[0x10:0x14] = b"\0\0\0\0"
            crc = raw_crc32c(self.seed, block.to_bytes(8, "little"))
            if raw_crc32c(crc, bytes(zeroed)) != int.from_bytes(data[0x10:0x14], "little"):
                damaged = f"xattr block {block} is damaged: its checksum does not match"
        if damaged is not None:
            # The names may be wrong too; name what can be named, return nothing from it.
            listed = InodeAttributes(flags=0)
            self._entries(data, _BLOCK_HEADER, data, listed, what, values=False)
            for name in [*listed.found, *listed.unreadable] or [f"({what})"]:
                out.unreadable[name] = damaged
            return
        self._entries(data, _BLOCK_HEADER, data, out, what)

    def _entries(
        self,
        data: bytes,
        at: int,
        space: bytes,
        out: InodeAttributes,
        where: str,
        *,
        values: bool = True,
    ) -> None:
        """Parse the entries from `at` until four zero bytes; value offsets count from the
        start of `space` (the region after the in-inode magic, or the whole block).  With
        values=False only the names are wanted: each is listed with an empty value."""
        while True:
            if at + 4 > len(data):
                out.unreadable[f"({where})"] = "the entry list runs past its end"
                return
            if data[at : at + 4] == b"\0\0\0\0":
                return
            if at + _ENTRY.size > len(data):
                out.unreadable[f"({where})"] = "an entry runs past the end of the list"
                return
            name_len, index, value_at, value_inode, size, _ = _ENTRY.unpack_from(data, at)
            name_end = at + _ENTRY.size + name_len
            if name_end > len(data):
                out.unreadable[f"({where})"] = "an entry's name runs past the end of the list"
                return
            suffix = bytes(data[at + _ENTRY.size : name_end]).decode("utf-8", "surrogateescape")
            at = (name_end + 3) & ~3
            prefix = _PREFIXES.get(index)
            if prefix is None:
                continue  # the kernel does not list it either
            name = prefix + suffix if index not in _ACL_PREFIXES else prefix
            value: bytes | None
            if not values:
                out.found[name] = b""
                continue
            if value_inode:
                value, problem = self._value_inode(value_inode, size)
            elif value_at + size > len(space):
                value, problem = None, "its value runs past the end of the attribute space"
            else:
                value, problem = bytes(space[value_at : value_at + size]), None
            if value is not None and index in _ACL_PREFIXES:
                value, problem = _acl_to_xattr(value)
            if value is None:
                out.unreadable[name] = problem or "unreadable"
            else:
                out.found[name] = value

    def _value_inode(self, number: int, size: int) -> tuple[bytes | None, str | None]:
        """A value kept in its own inode (ea_inode), checked as the kernel checks it."""
        if size > MAX_VALUE:
            return None, f"its value claims {size} bytes, more than {MAX_VALUE}"
        try:
            raw = self._inode_bytes(number)
        except FilesystemError as exc:
            return None, str(exc)
        flags = int.from_bytes(raw[0x20:0x24], "little")
        length = int.from_bytes(raw[0x04:0x08], "little")
        length |= int.from_bytes(raw[0x6C:0x70], "little") << 32
        if not flags & EA_INODE_FLAG or length != size:
            return (
                None,
                f"inode {number}, said to hold its value, is not an xattr value of that size",
            )
        try:
            value = self._read_inode(number, size)
        except (OSError, FilesystemError) as exc:
            return None, f"inode {number}, which holds its value, cannot be read: {exc}"
        if len(value) != size:
            return None, f"inode {number}, which holds its value, reads short"
        return value, None


def _acl_to_xattr(stored: bytes) -> tuple[bytes | None, str | None]:
    """An ext4 on-disk POSIX ACL in the form setxattr(2) takes."""
    if len(stored) < 4 or int.from_bytes(stored[:4], "little") != _EXT4_ACL_VERSION:
        return None, "its ACL is not in ext4's version 1 form"
    try:
        return acl_xattr(_ext4_acl_rules(stored)), None
    except AclError as exc:
        return None, str(exc)


def _ext4_acl_rules(stored: bytes) -> Iterator[tuple[int, int, int]]:
    """The rules of an ext4 ACL: 4-byte (tag, perm) ones, 8-byte when they name an id."""
    at = 4
    while at < len(stored):
        if at + 4 > len(stored):
            raise AclError("its ACL ends inside a rule")
        tag, perm = struct.unpack_from("<HH", stored, at)
        if tag in (ACL_USER, ACL_GROUP):
            if at + 8 > len(stored):
                raise AclError("its ACL ends inside a rule")
            yield tag, perm, int.from_bytes(stored[at + 4 : at + 8], "little")
            at += 8
        else:
            yield tag, perm, 0
            at += 4
