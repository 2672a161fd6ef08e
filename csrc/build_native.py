"""cffi builder for blocksnap._native (out-of-line API mode), named in setup.py."""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "bs_native.h"


def _cdef_section(header: str) -> str:
    # The header is the single source of the ABI; cffi gets only its marked section
    # because its parser does not understand include guards or #include.
    match = re.search(r"/\* BEGIN CDEF \*/(.*)/\* END CDEF \*/", header, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: no BEGIN CDEF / END CDEF section")
    return match.group(1)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_section(HEADER.read_text()))
ffibuilder.set_source(
    "blocksnap._native",
    '#include "bs_native.h"',
    # Paths relative to the project root, where setuptools runs the build; absolute
    # paths would leak the build machine's directories into the wheel's metadata.
    sources=["csrc/bs_read.c", "csrc/bs_scan.c", "csrc/bs_scan_avx2.c", "csrc/bs_scan_avx512.c"],
    include_dirs=["csrc"],
    # -O3 lets gcc unroll XXH3's inlined accumulate loop; warnings are errors-in-waiting.
    extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
