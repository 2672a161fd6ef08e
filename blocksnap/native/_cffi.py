"""The typed binding over blocksnap._native: the only module that touches ffi and lib."""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from blocksnap._native import ffi, lib
from blocksnap.errors import NativeError

ABI_VERSION: int = lib.BS_ABI_VERSION
DIGEST_SIZE: int = lib.BS_DIGEST_SIZE
FLAG_ZERO: int = lib.BS_FLAG_ZERO
FLAG_CHANGED: int = lib.BS_FLAG_CHANGED

# One table from C status to exception; grows with the ABI.
_STATUS_ERRORS: dict[int, str] = {
    lib.BS_EINVAL: "native scan rejected its arguments (block size, buffer or output sizes)",
}

if lib.bs_abi_version() != ABI_VERSION:  # header and compiled object disagree: stale build
    raise NativeError(
        f"blocksnap._native ABI {lib.bs_abi_version()} != header ABI {ABI_VERSION}; rebuild"
    )


def _check(status: int) -> None:
    if status != lib.BS_OK:
        raise NativeError(_STATUS_ERRORS.get(status, f"native status {status}"))


def _hold(held: ExitStack, obj: Any, writable: bool = False) -> Any:
    """A cdata pointer into obj's buffer, released when held closes.

    Every native call releases its buffers on the way out, error or not: a buffer still
    exported would stay pinned by the exception's traceback, which a future keeps in a
    reference cycle, and CPython before 3.12.7 crashes when its garbage collector clears
    a memoryview that is still exported (gh-77894; seen as a SIGSEGV at exit after a read
    error in a snapshot's worker thread)."""
    return held.enter_context(ffi.from_buffer(obj, require_writable=writable))


def _scan_args(
    held: ExitStack,
    parent_digests: Any,
    flags_out: bytearray | memoryview,
    digests_out: bytearray | memoryview,
) -> tuple[Any, int, Any, Any, int]:
    """The parent and output arguments that bs_scan and bs_read_scan share."""
    parent = _hold(held, parent_digests) if parent_digests is not None else ffi.NULL
    parent_count = len(parent_digests) // DIGEST_SIZE if parent_digests is not None else 0
    return (
        parent,
        parent_count,
        _hold(held, flags_out, writable=True),
        _hold(held, digests_out, writable=True),
        min(len(flags_out), len(digests_out) // DIGEST_SIZE),
    )


def scan(
    buf: Any,
    block_size: int,
    seed: int,
    parent_digests: Any,
    flags_out: bytearray | memoryview,
    digests_out: bytearray | memoryview,
) -> None:
    """Fill flags_out and digests_out for every block of buf; see bs_scan in bs_native.h."""
    with ExitStack() as held:
        src = _hold(held, buf)
        status = lib.bs_scan(
            src,
            len(src),
            block_size,
            seed,
            *_scan_args(held, parent_digests, flags_out, digests_out),
        )
    _check(status)


def read_scan(
    fd: int,
    offset: int,
    buf: Any,
    part_size: int,
    block_size: int,
    seed: int,
    parent_digests: Any,
    flags_out: bytearray | memoryview,
    digests_out: bytearray | memoryview,
) -> int:
    """pread len(buf) bytes at offset into buf, scanning as bs_scan does; return bytes read.

    Fewer than len(buf) means the file ended there; a read error raises OSError.
    """
    got = ffi.new("size_t *")
    err = ffi.new("int *")
    with ExitStack() as held:
        dst = _hold(held, buf, writable=True)
        status = lib.bs_read_scan(
            fd,
            offset,
            dst,
            len(dst),
            part_size,
            block_size,
            seed,
            *_scan_args(held, parent_digests, flags_out, digests_out),
            got,
            err,
        )
    if status == lib.BS_EIO:
        raise OSError(err[0], os.strerror(err[0]))
    if status != lib.BS_ESHORT:
        _check(status)
    return int(got[0])
