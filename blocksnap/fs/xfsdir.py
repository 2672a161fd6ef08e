"""XFS directory entries and symlink targets, read from the on-disk format: names as bytes.

libfsxfs 20260901 decodes every name and target as UTF-8 and fails on any other ("unable
to retrieve name size"), though a Linux name is any bytes but "/" and NUL.  So blocksnap
reads them itself, through `xfsattrs`' inode and block-map reader.  What it reads (all
integers big-endian; offsets in bytes):

Superblock: 0xC0 log2 of directory blocks per filesystem block (u8); 0xC8 features2 (u32;
0x200 the file type byte, on v4); 0xD8 incompat features (u32; 0x1 the file type byte,
on v5).

Inode: 0x05 data fork format (u8: 1 local, 2 extents, 3 B+tree); 0x18 data extents (u64,
with flags2 0x10, large extent counts) or 0x4C (u32); 0x38 size (u64); 0x52 attribute fork
offset (u8, 8-byte units; 0: no attribute fork).  The data fork runs from the end of the
core to the attribute fork, or to the end of the inode.

A local (short-form) directory: entry count (u8), count of 8-byte inode numbers (u8), the
parent's inode number (8 bytes if that count is not 0, else 4); then per entry: name
length (u8), offset (u16), the name, the file type (u8, with the feature), inode number (8
or 4 bytes).

Any other directory: its data blocks are the directory blocks (filesystem blocks << the
superblock's log) at logical offsets below 32 GiB.  Each begins with a header: magic
"XDB3" (a single-block directory) or "XDD3", CRC32C (little-endian, over the block with it
zeroed), block number, LSN, UUID, owner inode (u64 at 40), free-space table; 64 bytes in
all.  On v4 the magic is "XD2B" or "XD2D" and the header 16 bytes, with no CRC.  Then
entries: either unused space (0xFFFF, then its length, u16) or an entry: inode number
(u64), name length (u8), the name, the file type (u8, with the feature), padding to 8
bytes with the entry's offset (u16) its last two.  A single-block directory ends with its
hash table: 8-byte leaf entries, then their count and the stale count (u32 each), the
block's last 8 bytes; the entries stop where that table starts.

A symlink: local, the target is the data fork's first `size` bytes; else its blocks, in
order, each on v5 beginning with a 56-byte header ("XSLM", offset of its bytes in the
target, their count, CRC, UUID, owner, block, LSN).
"""

from __future__ import annotations

from collections.abc import Iterator

from blocksnap.fs.extdir import DirectoryDamage, decode_name
from blocksnap.fs.xfsattrs import Damaged, XfsAttributes

_LOCAL, _EXTENTS, _BTREE = 1, 2, 3
_NREXT64 = 0x10
_FTYPE_V4, _FTYPE_V5 = 0x200, 0x1
_LEAF_OFFSET = 32 << 30  # where a directory's data blocks end
_DATA_V5, _BLOCK_V5, _DATA_V4, _BLOCK_V4 = b"XDD3", b"XDB3", b"XD2D", b"XD2B"
_SYMLINK_V5 = b"XSLM"
_SYMLINK_HEADER = 56
_TARGET_MAX = 1024  # XFS's own limit on a symlink target


class XfsDirectories:
    """Reads directories' entries and symlinks' targets from an XFS filesystem image."""

    def __init__(self, attributes: XfsAttributes) -> None:
        self._a = attributes
        sb = attributes.superblock
        self.dir_blocks = 1 << sb[0xC0]  # filesystem blocks per directory block
        if attributes.crc:
            self.ftype = bool(int.from_bytes(sb[0xD8:0xDC], "big") & _FTYPE_V5)
        else:
            self.ftype = bool(int.from_bytes(sb[0xC8:0xCC], "big") & _FTYPE_V4)

    def _fork(self, raw: bytes) -> bytes:
        forkoff = raw[0x52]
        core = self._a.core
        return raw[core : core + forkoff * 8] if forkoff else raw[core:]

    def _extents(self, raw: bytes, number: int) -> list[tuple[int, int, int]]:
        form = raw[5]
        count = int.from_bytes(raw[0x4C:0x50], "big")
        if raw[4] >= 3 and int.from_bytes(raw[0x78:0x80], "big") & _NREXT64:
            count = int.from_bytes(raw[0x18:0x20], "big")
        if form not in (_EXTENTS, _BTREE):
            raise DirectoryDamage(f"inode {number}: its data fork has unknown format {form}")
        try:
            return sorted(self._a.block_map(self._fork(raw), form, count, number))
        except Damaged as exc:
            raise DirectoryDamage(f"inode {number}: {exc}") from None

    def _logical_block(self, extents: list[tuple[int, int, int]], logical: int) -> bytes:
        for start, fsblock, count in extents:
            if start <= logical < start + count:
                try:
                    return self._a.block(fsblock + logical - start, f"directory block {logical}")
                except Damaged as exc:
                    raise DirectoryDamage(str(exc)) from None
        raise DirectoryDamage(f"directory block {logical} is not mapped")

    # --- directories ---------------------------------------------------------------

    def entries(self, number: int) -> Iterator[tuple[str, int]]:
        """(name, inode) of a directory's entries, "." and ".." left out."""
        raw = self._a.inode(number)
        if raw[5] == _LOCAL:
            yield from self._short_form(self._fork(raw), number)
            return
        extents = self._extents(raw, number)
        for first in self._directory_blocks(extents):
            parts = [self._logical_block(extents, first + i) for i in range(self.dir_blocks)]
            yield from self._data_block(b"".join(parts), first, number)

    def _directory_blocks(self, extents: list[tuple[int, int, int]]) -> Iterator[int]:
        """The first logical block of each mapped data block, in order (extents sorted)."""
        limit = _LEAF_OFFSET // self._a.block_size
        last = -1
        for start, _, count in extents:
            first = start - start % self.dir_blocks
            for logical in range(max(first, last + 1), min(start + count, limit), self.dir_blocks):
                if logical % self.dir_blocks == 0:
                    last = logical
                    yield logical

    def _short_form(self, fork: bytes, number: int) -> Iterator[tuple[str, int]]:
        where = f"inode {number}'s short-form directory"
        if len(fork) < 2:
            raise DirectoryDamage(f"{where} has no header")
        count, wide = fork[0], fork[1]
        inode_size = 8 if wide else 4
        at = 2 + inode_size
        for _ in range(count):
            if at + 3 > len(fork):
                raise DirectoryDamage(f"{where} runs past its fork")
            name_len = fork[at]
            name_at = at + 3
            inode_at = name_at + name_len + (1 if self.ftype else 0)
            end = inode_at + inode_size
            if end > len(fork):
                raise DirectoryDamage(f"{where} runs past its fork")
            inode = int.from_bytes(fork[inode_at:end], "big")
            yield decode_name(bytes(fork[name_at : name_at + name_len])), inode
            at = end

    def _data_block(self, data: bytes, logical: int, number: int) -> Iterator[tuple[str, int]]:
        where = f"directory block {logical}"
        magic = data[:4]
        if self._a.crc:
            if magic not in (_DATA_V5, _BLOCK_V5):
                return  # a leaf or free-space block past a hole in the data range: none
            if not self._a.crc_ok(data, 4):
                raise DirectoryDamage(f"{where} is damaged: its checksum does not match")
            if int.from_bytes(data[40:48], "big") != number:
                raise DirectoryDamage(f"{where} belongs to another inode")
            at, single = 64, magic == _BLOCK_V5
        else:
            if magic not in (_DATA_V4, _BLOCK_V4):
                return
            at, single = 16, magic == _BLOCK_V4
        end = len(data)
        if single:
            leaves = int.from_bytes(data[end - 8 : end - 4], "big")
            end -= 8 + leaves * 8
            if end < at:
                raise DirectoryDamage(f"{where}: its hash table is larger than the block")
        while at < end:
            if at + 4 > end:
                raise DirectoryDamage(f"{where}: an entry runs past its end at byte {at}")
            if data[at : at + 2] == b"\xff\xff":
                length = int.from_bytes(data[at + 2 : at + 4], "big")
                if length < 8 or length % 8 or at + length > end:
                    raise DirectoryDamage(f"{where}: unused space at byte {at} is impossible")
                at += length
                continue
            if at + 9 > end:
                raise DirectoryDamage(f"{where}: an entry runs past its end at byte {at}")
            inode, name_len = int.from_bytes(data[at : at + 8], "big"), data[at + 8]
            size = (8 + 1 + name_len + (1 if self.ftype else 0) + 2 + 7) // 8 * 8
            if at + size > end:
                raise DirectoryDamage(f"{where}: the entry at byte {at} runs past its end")
            name = bytes(data[at + 9 : at + 9 + name_len])
            if name not in (b".", b".."):
                yield decode_name(name), inode
            at += size

    # --- symlinks --------------------------------------------------------------------

    def target(self, number: int) -> str:
        """A symlink's target, as stored."""
        raw = self._a.inode(number)
        size = int.from_bytes(raw[0x38:0x40], "big")
        if size > _TARGET_MAX:
            raise DirectoryDamage(f"inode {number}: a symlink target of {size} bytes")
        if raw[5] == _LOCAL:
            fork = self._fork(raw)
            if size > len(fork):
                raise DirectoryDamage(f"inode {number}: its symlink target runs past its fork")
            return decode_name(bytes(fork[:size]))
        extents = self._extents(raw, number)
        parts, got, logical = [], 0, 0
        while got < size:
            data = self._logical_block(extents, logical)
            if self._a.crc:
                offset, count = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:12], "big")
                if data[:4] != _SYMLINK_V5 or offset != got or not 0 < count <= size - got:
                    raise DirectoryDamage(f"inode {number}: symlink block {logical} is damaged")
                if not self._a.crc_ok(data, 12):
                    raise DirectoryDamage(
                        f"inode {number}: symlink block {logical}'s checksum does not match"
                    )
                parts.append(data[_SYMLINK_HEADER : _SYMLINK_HEADER + count])
                got += count
            else:
                take = min(len(data), size - got)
                parts.append(data[:take])
                got += take
            logical += 1
        return decode_name(b"".join(parts))
