"""Record payload codecs: zstd compression with a raw fallback, and bounded decompression."""

from __future__ import annotations

import threading

import zstandard

from blocksnap.errors import IntegrityError

CODEC_RAW = 0
CODEC_ZSTD = 1

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level, reused across blocks.
    cache: dict[int, zstandard.ZstdCompressor] = getattr(_local, "compressors", None) or {}
    _local.compressors = cache
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def compress(raw: bytes | memoryview, level: int) -> tuple[int, bytes | memoryview]:
    """Return (codec, payload); data that zstd does not shrink is kept raw, and then the
    payload is raw itself (not a copy: the record that frames it copies it once)."""
    packed = _compressor(level).compress(raw)
    if len(packed) < len(raw):
        return CODEC_ZSTD, packed
    return CODEC_RAW, raw


def decompress(codec: int, payload: bytes | memoryview, raw_size: int, what: str) -> bytes:
    """Return the raw bytes; never produces more than raw_size bytes, whatever the input."""
    if codec == CODEC_RAW:
        if len(payload) != raw_size:
            raise IntegrityError(f"{what}: stored size {len(payload)} != recorded {raw_size}")
        return bytes(payload)
    if codec != CODEC_ZSTD:
        raise IntegrityError(f"{what}: unknown codec {codec}")
    try:
        # The frame header's content size is checked first, so a hostile frame cannot make
        # the decompressor allocate more than the record's recorded size.
        if zstandard.frame_content_size(payload) != raw_size:
            raise IntegrityError(f"{what}: compressed frame does not hold {raw_size} bytes")
        raw = _decompressor().decompress(payload, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what}: damaged compressed data ({exc})") from exc
    if len(raw) != raw_size:
        raise IntegrityError(f"{what}: decompressed to {len(raw)} bytes, expected {raw_size}")
    return raw
