"""Keeps the pages of an LMDB map that a process has read out of its resident set.

LMDB reads its data file through a shared, read-only mapping: every page a command
touches stays counted in the process's RSS until the kernel needs the memory, although
it is the page cache's, clean and shared.  verify, which reads the whole index and its own
copy of it (store/indexcopy.py), showed an RSS that grew with the index, about 3.5 MiB
per GiB of volume: 111 MiB on an 8 GiB volume, 93 MiB with this.  So at most every
INTERVAL seconds, where its caller asks, the map of the data file is advised
MADV_DONTNEED: its pages leave this process's page tables and stay in the page cache,
and the next read of one maps it again with a minor fault.  For a shared file mapping
that is transparent, also to a transaction open in another thread, which reads the
same bytes.  Where madvise or /proc/self/maps is missing, nothing is done.

The map is found in /proc/self/maps by the data file's device and inode, so the caller
must make sure that the environment cannot unmap it (resize or close) while a trim runs:
an address range unmapped and then reused by an anonymous mapping would lose its bytes.
store/lmdbenv.py trims while holding its gate, which every resize waits for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable

INTERVAL = 0.25  # seconds between trims: what is resident is bounded by the read rate
_MADV_DONTNEED = 4  # linux/mman.h


def _find_madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _find_madvise() if os.path.exists("/proc/self/maps") else None


class Trimmer:
    """Trims the maps of one data file (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self._last = time.monotonic()
        try:
            st = os.stat(path)
        except OSError:
            self._key: tuple[int, int] | None = None
        else:
            self._key = (st.st_dev, st.st_ino)

    def maybe_trim(self, map_size: Callable[[], int]) -> None:
        """Trim, unless the last trim was less than INTERVAL seconds ago."""
        now = time.monotonic()
        if now - self._last >= INTERVAL:
            self._last = now
            self.trim(map_size())

    def trim(self, map_size: int) -> int:
        """Advise the file's map of map_size bytes away; the bytes of mapping advised.

        Only a read-only shared mapping of exactly that size, which is how LMDB maps the
        file without writemap, is touched: madvise on any other mapping of the file (one
        private, or writable) could discard bytes that are nowhere else."""
        if _MADVISE is None or self._key is None:
            return 0
        advised = 0
        with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) < 6 or fields[1] != "r--s":
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                if (os.makedev(major, minor), int(fields[4])) != self._key:
                    continue
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if high - low == map_size and _MADVISE(low, map_size, _MADV_DONTNEED) == 0:
                    advised += map_size
        return advised
