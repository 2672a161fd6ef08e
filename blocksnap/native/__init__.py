"""Backend policy for the block scanner: native C by default, the Python reference on request.

BLOCKSNAP_BACKEND selects it:
  auto    the native backend when it is built, else the Python reference (BACKEND says which);
  native  the native backend, and an error if it is not built: never a silent slowdown;
  python  the pure-Python reference (slow; for tests and for platforms without a compiler).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

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
        flags_out: bytearray,
        digests_out: bytearray,
    ) -> None: ...


def load(policy: str | None = None) -> tuple[str, ScanFunction]:
    """Return (backend name, scan function) for a policy; None reads BLOCKSNAP_BACKEND."""
    policy = (policy or os.environ.get("BLOCKSNAP_BACKEND") or "auto").lower()
    if policy == "python":
        return "python", _reference.scan
    if policy not in ("auto", "native"):
        raise NativeError(f"BLOCKSNAP_BACKEND={policy!r}: expected auto, native or python")
    try:
        from blocksnap.native import _cffi
    except ImportError as exc:
        if policy == "native":
            raise NativeError(f"native backend requested but not built: {exc}") from exc
        return "python", _reference.scan
    return "native", _cffi.scan


BACKEND, scan = load()

__all__ = ["BACKEND", "DIGEST_SIZE", "FLAG_CHANGED", "FLAG_ZERO", "load", "scan"]
