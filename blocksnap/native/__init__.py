"""Backend policy for the block scanner: native C by default, the Python reference on request.

BLOCKSNAP_BACKEND selects it:
  auto    the native backend when it is built, else the Python reference (BACKEND says which);
  native  the native backend, and an error if it is not built: never a silent slowdown;
  python  the pure-Python reference (slow; for tests and for platforms without a compiler).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple, Protocol

from blocksnap.errors import NativeError
from blocksnap.native import _reference

if TYPE_CHECKING:
    from typing_extensions import Buffer

DIGEST_SIZE = 16
FLAG_ZERO = 1
FLAG_CHANGED = 2


class ScanFunction(Protocol):
    def __call__(
        self,
        buf: Buffer,
        block_size: int,
        seed: int,
        parent_digests: Buffer | None,
        flags_out: bytearray | memoryview,
        digests_out: bytearray | memoryview,
    ) -> None: ...


class ReadScanFunction(Protocol):
    def __call__(
        self,
        fd: int,
        offset: int,
        buf: Buffer,
        part_size: int,
        block_size: int,
        seed: int,
        parent_digests: Buffer | None,
        flags_out: bytearray | memoryview,
        digests_out: bytearray | memoryview,
    ) -> int: ...


class Backend(NamedTuple):
    name: str
    scan: ScanFunction
    read_scan: ReadScanFunction


def load(policy: str | None = None) -> Backend:
    """Return the backend for a policy; None reads BLOCKSNAP_BACKEND."""
    policy = (policy or os.environ.get("BLOCKSNAP_BACKEND") or "auto").lower()
    python = Backend("python", _reference.scan, _reference.read_scan)
    if policy == "python":
        return python
    if policy not in ("auto", "native"):
        raise NativeError(f"BLOCKSNAP_BACKEND={policy!r}: expected auto, native or python")
    try:
        from blocksnap.native import _cffi
    except ImportError as exc:
        if policy == "native":
            raise NativeError(f"native backend requested but not built: {exc}") from exc
        return python
    return Backend("native", _cffi.scan, _cffi.read_scan)


BACKEND, scan, read_scan = load()

__all__ = [
    "BACKEND",
    "DIGEST_SIZE",
    "FLAG_CHANGED",
    "FLAG_ZERO",
    "Backend",
    "load",
    "read_scan",
    "scan",
]
