"""The size of the index's LMDB map, under an address-space limit (ulimit -v) when there is one.

The map is address space, not memory, but under an address-space limit (on batch
systems) it counts: it starts at MAP_INITIAL_SIZE or twice the data file, capped to what
the limit leaves (less a reserve for the rest of the process), and grows when a write
fills it (store/lmdbenv.py).  It is never below MAP_MIN_SIZE and the data file plus that.
"""

from __future__ import annotations

import resource

from blocksnap.errors import StoreError

MAP_INITIAL_SIZE = 1 << 30
MAP_MIN_SIZE = 64 << 20
MIB = 1 << 20


def address_space_limit() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _address_space_used() -> int:
    """Bytes of address space this process has mapped (VmSize)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reserve(limit: int) -> int:
    """Address space left for the rest of the process: threads' stacks and malloc arenas,
    pack buffers, whole packs read by verify."""
    return min(512 * MIB, limit // 4)


def limit_error(size: int, limit: int) -> StoreError:
    return StoreError(
        f"cannot map the index ({size // MIB} MiB): the address-space limit (ulimit -v) "
        f"is {limit // MIB} MiB, and this process uses {_address_space_used() // MIB} MiB "
        "of it already; raise the limit"
    )


def map_size_for(data_size: int, wanted: int, mapped: int = 0) -> int:
    """The map size to use: wanted, capped by the address-space limit (counting the map of
    mapped bytes this process holds now as free), but never below what the data needs.

    Raises StoreError naming the limit when even that does not fit."""
    needed = max(MAP_MIN_SIZE, data_size + MAP_MIN_SIZE)
    size = max(wanted, needed)
    limit = address_space_limit()
    if limit is not None:
        room = limit - (_address_space_used() - mapped) - _reserve(limit)
        if room < needed:
            raise limit_error(needed, limit)
        size = min(size, room)
    return size // MIB * MIB
