"""Object frames: the magic, version and checksum that every persisted store object starts with.

Frame (40 bytes, then the body), the same for every kind of object and every version:

    magic     6 bytes naming the kind: b"BSCONF" config (store/config.py), b"BSSNAP"
              snapshot record, b"BSTOMB" tombstone, b"BSSETT" setting (store/catalog.py)
    version   u16 big-endian: the format of the frame and body, per kind
    checksum  BLAKE3-256 of magic + version + body
    body      the kind's encoding (JSON for all of these)

Compatibility rule: these 40 bytes never change meaning, so any reader tells damage from
a newer format.  A flipped byte anywhere, the version included, fails the checksum
(damage, IntegrityError); an intact frame of a version the reader does not know is a
newer (or retired) format, which the kind's module refuses with UnsupportedFormatError.
Packs and their records have frames of their own (store/packs.py): they are read in
ranges, so one checksum over the whole object would not do.
"""

from __future__ import annotations

import struct

import blake3

from blocksnap.errors import IntegrityError

_HEAD = struct.Struct(">6sH")
HEADER_SIZE = _HEAD.size + 32


def frame(magic: bytes, version: int, body: bytes) -> bytes:
    head = _HEAD.pack(magic, version)
    return head + blake3.blake3(head + body).digest() + body


def is_framed(data: bytes, magic: bytes) -> bool:
    """Whether data starts like a frame of this kind (intact or not)."""
    return data[: len(magic)] == magic


def unframe(data: bytes, magic: bytes, what: str) -> tuple[int, bytes]:
    """(version, body) of an intact frame of this kind; IntegrityError naming what if the
    magic is not there or the checksum fails."""
    if not is_framed(data, magic):
        raise IntegrityError(f"{what} is damaged (no {magic.decode()} magic)")
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"{what} is damaged (truncated)")
    head, body = data[: _HEAD.size], data[HEADER_SIZE:]
    if blake3.blake3(head + body).digest() != data[_HEAD.size : HEADER_SIZE]:
        raise IntegrityError(f"{what} is damaged (checksum mismatch)")
    return int(_HEAD.unpack(head)[1]), body
