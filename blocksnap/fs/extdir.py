"""ext2/3/4 directory entries, parsed from a directory's content: names as the bytes stored.

libfsext decodes every name as UTF-8 and fails on any other ("unable to retrieve name
size"), though a Linux name is any bytes but "/" and NUL; it and TSK both also cut a name
at a NUL byte, which a hostile image can put in one.  So blocksnap parses the entries
itself, from the content TSK reads (or, for an inline directory, from the inode).  The
format (integers little-endian):

An entry is: inode (u32; 0 for an unused entry), record length (u16: the distance to the
next entry, a multiple of 4, at least 8 + the name's length), name length (u8), file type
(u8), then the name, not NUL-terminated.  Without the filetype feature (incompat 0x2) the
name length is a u16 over both bytes.  Entries fill a region exactly: in a directory kept
in blocks each block is a region, and no entry crosses a block.  An htree index hides in
what reads as unused space: the root's in the record length of "..", each inner node's
in an entry of inode 0 that spans its block; metadata_csum's tail is an entry of inode 0
and length 12.  So every entry with an inode, of every block, is the directory's whole
listing, whatever its form.

An inline directory (the inline_data feature) keeps its parent's inode number (u32) in
the first 4 bytes of the inode's 60-byte block area and entries in the other 56, then
more entries in the value of the "system.data" extended attribute; it has no "." and
"..", and each of the two parts is a region.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

_HEAD = struct.Struct("<IHBB")  # inode, record length, name length, file type
FILETYPE_FEATURE = 0x2  # incompat


class DirectoryDamage(ValueError):
    """An entry does not fit its region; the layer above names the directory's path."""


def decode_name(raw: bytes) -> str:
    """A name as blocksnap carries it: its bytes decoded as os.fsdecode does on Linux
    (UTF-8, any other byte kept as a lone surrogate), so os.fsencode gives them back."""
    return raw.decode("utf-8", "surrogateescape")


def region_entries(region: bytes, filetype: bool, where: str) -> Iterator[tuple[str, int]]:
    """(name, inode) of the used entries of one region, "." and ".." left out;
    DirectoryDamage naming `where` (the part of the directory) if an entry does not fit."""
    at = 0
    end = len(region)
    while at < end:
        if at + _HEAD.size > end:
            raise DirectoryDamage(f"{where}: an entry header runs past its end at byte {at}")
        inode, rec_len, name_len, high = _HEAD.unpack_from(region, at)
        if not filetype:
            name_len |= high << 8
        if rec_len < _HEAD.size + name_len or rec_len % 4 or at + rec_len > end:
            raise DirectoryDamage(f"{where}: the entry at byte {at} has an impossible length")
        if inode:
            name = region[at + _HEAD.size : at + _HEAD.size + name_len]
            if name not in (b".", b".."):
                yield decode_name(bytes(name)), inode
        at += rec_len
