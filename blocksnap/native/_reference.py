"""The executable specification of the native scanner, in pure Python.

It gives byte-identical results to bs_scan in csrc/ and is what the property tests hold the
C code to.  It is also the fallback backend where the extension is not built.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import xxhash

from blocksnap.errors import NativeError

if TYPE_CHECKING:
    from typing_extensions import Buffer

DIGEST_SIZE = 16
FLAG_ZERO = 1
FLAG_CHANGED = 2
_ZERO_DIGEST = bytes(DIGEST_SIZE)


def scan(
    buf: Buffer,
    block_size: int,
    seed: int,
    parent_digests: Buffer | None,
    flags_out: bytearray | memoryview,
    digests_out: bytearray | memoryview,
) -> None:
    """Fill flags_out and digests_out for every block of buf; see bs_scan in bs_native.h."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise NativeError("native scan rejected its arguments (block size, buffer or output sizes)")
    data = memoryview(buf).cast("B")
    parent = memoryview(parent_digests).cast("B") if parent_digests is not None else None
    parent_count = len(parent) // DIGEST_SIZE if parent is not None else 0
    count = -(-len(data) // block_size)
    if count > min(len(flags_out), len(digests_out) // DIGEST_SIZE):
        raise NativeError("native scan rejected its arguments (block size, buffer or output sizes)")
    for i in range(count):
        block = data[i * block_size : (i + 1) * block_size]
        raw = bytes(block)
        if raw.count(0) == len(raw):
            flags, digest = FLAG_ZERO, _ZERO_DIGEST
        else:
            flags, digest = 0, xxhash.xxh3_128_digest(raw, seed)
        if parent is not None and i < parent_count:
            old = bytes(parent[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
        else:
            old = _ZERO_DIGEST
        if digest != old:
            flags |= FLAG_CHANGED
        flags_out[i] = flags
        digests_out[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest


def read_scan(
    fd: int,
    offset: int,
    buf: Buffer,
    part_size: int,
    block_size: int,
    seed: int,
    parent_digests: Buffer | None,
    flags_out: bytearray | memoryview,
    digests_out: bytearray | memoryview,
) -> int:
    """pread len(buf) bytes at offset into buf, scanning as scan does; return bytes read."""
    if part_size <= 0 or block_size <= 0 or part_size % block_size:
        raise NativeError("native scan rejected its arguments (block size, buffer or output sizes)")
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    if got == len(view):
        scan(view, block_size, seed, parent_digests, flags_out, digests_out)
        return got
    # Scanned are only the whole parts before the end, as the native code does.
    whole = got // part_size * part_size
    scan(view[:whole], block_size, seed, parent_digests, flags_out, digests_out)
    return got
