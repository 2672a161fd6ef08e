"""Extended attributes as blocksnap's own readers find them: what was read, what was not
and why, and POSIX ACLs turned into the form setxattr(2) takes.  (Also the one exact read
those readers share.)

That form (the kernel's posix_acl_xattr) is little-endian: a version, 2, as 4 bytes; then
one 8-byte entry per rule: tag (u16), permissions (u16), user or group id (u32; 0xFFFFFFFF
for the entries that name no one).  ext4 and XFS each keep ACLs in a form of their own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from blocksnap.errors import FilesystemError, XattrsIncompleteError

XATTR_SIZE_MAX = 64 << 10  # the kernel's limit for any one value
ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_TAGS = frozenset({ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER})
ACL_UNDEFINED_ID = 0xFFFFFFFF
_XATTR_ACL_VERSION = 2


class AclError(ValueError):
    """A stored ACL that cannot be read; the message says why."""


@dataclass(slots=True)
class InodeAttributes:
    """One inode's flags (as its filesystem stores them) and extended attributes: those
    read, and why each other one could not be (by name, or by where it is kept)."""

    flags: int
    found: dict[str, bytes] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)

    def complete(self, hidden: Iterable[str] = ()) -> dict[str, bytes]:
        """The attributes, all of them, less `hidden`; XattrsIncompleteError names any
        not read and carries the others."""
        readable = {k: v for k, v in self.found.items() if k not in hidden}
        if self.unreadable:
            raise XattrsIncompleteError(readable, dict(self.unreadable))
        return readable


def acl_xattr(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """(tag, permissions, id) rules in the form setxattr(2) takes; an unknown tag is an
    AclError.  The id of a rule that names no one is written as 0xFFFFFFFF."""
    out = bytearray(struct.pack("<I", _XATTR_ACL_VERSION))
    for tag, perm, ident in entries:
        if tag not in ACL_TAGS:
            raise AclError(f"its ACL has a rule of unknown tag {tag:#x}")
        if tag not in (ACL_USER, ACL_GROUP):
            ident = ACL_UNDEFINED_ID
        out += struct.pack("<HHI", tag, perm & 0xFFFF, ident & 0xFFFFFFFF)
    return bytes(out)


def read_exact(image: BinaryIO, offset: int, size: int, what: str) -> bytes:
    """`size` bytes at `offset`; a FilesystemError naming `what` if the image ends first."""
    image.seek(offset)
    data = image.read(size)
    if len(data) != size:
        raise FilesystemError(f"{what} lies past the end of the image")
    return data
