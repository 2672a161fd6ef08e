"""The native scanner against its pure-Python reference, and the backend policy."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap import native
from blocksnap.errors import NativeError
from blocksnap.native import _cffi, _reference

BLOCK_SIZES = st.sampled_from([1, 2, 64, 512, 4096, 65536])


def both(buf: object, block_size: int, seed: int, parent: bytes | None) -> tuple[bytes, bytes]:
    n = -(-len(memoryview(buf)) // block_size)  # type: ignore[arg-type]
    results = []
    for scan in (_cffi.scan, _reference.scan):
        flags, digests = bytearray(n), bytearray(16 * n)
        scan(buf, block_size, seed, parent, flags, digests)  # type: ignore[arg-type]
        results.append((bytes(flags), bytes(digests)))
    assert results[0] == results[1]
    return results[0]


@st.composite
def buffers(draw: st.DrawFn) -> tuple[bytes, int]:
    block_size = draw(BLOCK_SIZES)
    blocks = draw(st.integers(0, 6))
    parts = []
    for _ in range(blocks):
        kind = draw(st.sampled_from(["zero", "random", "last-byte", "first-byte"]))
        if kind == "zero":
            parts.append(bytes(block_size))
        elif kind == "random":
            parts.append(
                draw(st.binary(min_size=block_size, max_size=block_size))
                if block_size <= 512
                else bytes([draw(st.integers(1, 255))]) * block_size
            )
        elif kind == "last-byte":
            parts.append(bytes(block_size - 1) + b"\x01")
        else:
            parts.append(b"\x01" + bytes(block_size - 1))
    tail = draw(st.binary(max_size=block_size - 1)) if block_size > 1 else b""
    return b"".join(parts) + tail, block_size


@settings(max_examples=300, deadline=None)
@given(buffers(), st.integers(0, 2**64 - 1), st.integers(0, 7))
def test_scan_native_matches_reference(case: tuple[bytes, int], seed: int, misalign: int) -> None:
    data, block_size = case
    padded = bytearray(misalign) + bytearray(data)
    view = memoryview(padded)[misalign:]  # a misaligned view into a bytearray
    flags, digests = both(view, block_size, seed, None)
    # As its own parent, nothing changed; a zero block never hashes.
    flags2, _ = both(bytes(data), block_size, seed, digests)
    assert all(not f & native.FLAG_CHANGED for f in flags2)
    for i, f in enumerate(flags):
        block = data[i * block_size : (i + 1) * block_size]
        assert bool(f & native.FLAG_ZERO) == (block.count(0) == len(block))
        if f & native.FLAG_ZERO:
            assert digests[16 * i : 16 * i + 16] == bytes(16)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=4096), st.integers(0, 4095), st.integers(0, 2**64 - 1))
def test_scan_single_byte_change_is_flagged(data: bytes, pos: int, seed: int) -> None:
    pos %= len(data)
    _, parent = both(data, 512, seed, None)
    changed = bytearray(data)
    changed[pos] ^= 0xFF
    flags, _ = both(bytes(changed), 512, seed, parent)
    assert [i for i, f in enumerate(flags) if f & native.FLAG_CHANGED] == [pos // 512]


def test_scan_accepts_mmap(tmp_path: object) -> None:
    m = mmap.mmap(-1, 3 * 4096 + 100)
    m[5000:5001] = b"x"
    flags, _ = both(m, 4096, 7, None)
    assert flags == bytes([1, 2, 1, 1])


def test_scan_parent_longer_and_shorter_than_buffer() -> None:
    data = b"a" * 8192
    _, digests = both(data, 4096, 1, None)
    flags, _ = both(data + b"b" * 4096, 4096, 1, digests)  # grew: new block vs no parent
    assert flags == bytes([0, 0, 2])
    flags, _ = both(data[:4096], 4096, 1, digests)  # shrank
    assert flags == bytes([0])


@pytest.mark.parametrize("scan", [_cffi.scan, _reference.scan])
@pytest.mark.parametrize("block_size", [0, 3, 4097])
def test_scan_rejects_bad_block_size(scan: native.ScanFunction, block_size: int) -> None:
    with pytest.raises(NativeError):
        scan(b"abc", block_size, 0, None, bytearray(8), bytearray(128))


@pytest.mark.parametrize("scan", [_cffi.scan, _reference.scan])
def test_scan_rejects_short_output(scan: native.ScanFunction) -> None:
    with pytest.raises(NativeError):
        scan(b"x" * 8192, 4096, 0, None, bytearray(1), bytearray(16))


def test_backend_policy_explicit() -> None:
    assert native.load("native") == ("native", _cffi.scan, _cffi.read_scan)
    assert native.load("python") == ("python", _reference.scan, _reference.read_scan)
    with pytest.raises(NativeError):
        native.load("fast")


def test_backend_native_required_but_missing_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "blocksnap.native._cffi", None)
    monkeypatch.delattr(native, "_cffi")
    with pytest.raises(NativeError, match="not built"):
        native.load("native")
    assert native.load("auto")[0] == "python"


@settings(max_examples=60, deadline=None)
@given(buffers(), st.integers(0, 2**64 - 1), st.integers(0, 3), st.integers(1, 4))
def test_read_scan_native_matches_reference(
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[bytes, int],
    seed: int,
    offset_blocks: int,
    part_blocks: int,
) -> None:
    """pread plus scan, part by part, gives what one scan of the same bytes gives."""
    data, block_size = case
    path = tmp_path_factory.mktemp("rs") / "vol"
    lead = bytes([7]) * (offset_blocks * block_size)
    path.write_bytes(lead + data)
    n = -(-len(data) // block_size)
    expected = both(data, block_size, seed, None)
    with open(path, "rb") as f:
        for read_scan in (_cffi.read_scan, _reference.read_scan):
            buf, flags, digests = bytearray(len(data)), bytearray(n), bytearray(16 * n)
            got = read_scan(
                f.fileno(),
                len(lead),
                buf,
                part_blocks * block_size,
                block_size,
                seed,
                None,
                flags,
                digests,
            )
            assert got == len(data)
            assert bytes(buf) == data
            assert (bytes(flags), bytes(digests)) == expected


@pytest.mark.parametrize("read_scan", [_cffi.read_scan, _reference.read_scan])
def test_read_scan_reports_short_file_and_errors(
    read_scan: native.ReadScanFunction, tmp_path: object
) -> None:
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "short"
    path.write_bytes(b"x" * 10000)
    with open(path, "rb") as f:
        buf, flags, digests = bytearray(16384), bytearray(4), bytearray(64)
        # The file ends inside the second 8 KiB part: 10000 bytes read, and only the
        # first part (two whole blocks) scanned.
        assert read_scan(f.fileno(), 0, buf, 8192, 4096, 0, None, flags, digests) == 10000
        assert bytes(flags[:2]) == bytes([2, 2]) and bytes(flags[2:]) == bytes(2)
        with pytest.raises(NativeError):  # a part that is not whole blocks
            read_scan(f.fileno(), 0, buf, 1000, 4096, 0, None, flags, digests)
    fd = os.open(path, os.O_WRONLY)  # not readable: pread fails with EBADF
    try:
        with pytest.raises(OSError):
            read_scan(fd, 0, bytearray(4096), 4096, 4096, 0, None, bytearray(1), bytearray(16))
    finally:
        os.close(fd)


def _held_views() -> list[memoryview]:
    """A buffer, a parent, flags and digests for two 4 KiB blocks, each a memoryview that
    refuses release() while anything holds an export of it."""
    return [memoryview(bytearray(n)) for n in (8192, 32, 2, 32)]


@pytest.mark.parametrize("failure", ["read-error", "rejected"])
def test_read_scan_failing_keeps_no_hold_on_buffers(failure: str, tmp_path: object) -> None:
    """A failed call leaves no export of its buffers behind in its exception's traceback.

    A future keeps that traceback in a reference cycle; when the garbage collector cleared
    a memoryview still exported to cffi, CPython crashed at exit (seen as a SIGSEGV after
    a read error on a block device during a snapshot)."""
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "vol"
    path.write_bytes(b"x" * 8192)
    buf, parent, flags, digests = _held_views()
    fd = os.open(path, os.O_WRONLY if failure == "read-error" else os.O_RDONLY)
    part = 4096 if failure == "read-error" else 1000  # 1000: not whole blocks, rejected
    try:
        with pytest.raises(OSError if failure == "read-error" else NativeError) as caught:
            _cffi.read_scan(fd, 0, buf, part, 4096, 0, parent, flags, digests)
    finally:
        os.close(fd)
    assert caught.value.__traceback__ is not None  # the frames are still alive here
    for view in (buf, parent, flags, digests):
        view.release()  # BufferError if the native call still held it


def test_scan_failing_keeps_no_hold_on_buffers() -> None:
    buf, parent, flags, digests = _held_views()
    with pytest.raises(NativeError) as caught:
        _cffi.scan(buf, 3, 0, parent, flags, digests)  # 3: not a power of two
    assert caught.value.__traceback__ is not None
    for view in (buf, parent, flags, digests):
        view.release()


@pytest.mark.parametrize("read_scan", [_cffi.read_scan, _reference.read_scan])
@pytest.mark.parametrize("file_size", [0, 1, 4095, 4096, 8193, 16384, 20000])
def test_read_scan_writes_nothing_past_what_it_read(
    read_scan: native.ReadScanFunction, file_size: int, tmp_path: object
) -> None:
    """Whatever the file holds (empty, short, ending mid-part, longer than the buffer),
    bytes past those read, past the buffer, and outputs past its blocks are untouched."""
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "vol"
    path.write_bytes(b"\x01" * file_size)
    backing = bytearray(b"\xee" * (16384 + 4096))
    flags, digests = bytearray(b"\xee" * 6), bytearray(b"\xee" * (16 * 6))
    fd = os.open(path, os.O_RDONLY)
    try:
        got = read_scan(fd, 0, memoryview(backing)[:16384], 8192, 4096, 0, None, flags, digests)
    finally:
        os.close(fd)
    assert got == min(file_size, 16384)
    assert backing[:got] == b"\x01" * got
    assert backing[got:] == b"\xee" * (len(backing) - got)
    assert flags[4:] == b"\xee" * 2 and digests[64:] == b"\xee" * 32
