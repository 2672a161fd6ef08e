"""Coalesced reads: records of one pack that lie close together, fetched by one ranged get.

On object storage a ranged get costs a round trip (tens of milliseconds) however few bytes
it returns, so reading a gap between two wanted records is cheaper than a second get, up
to MAX_GAP_SIZE: a few records (one incompressible 64 KiB block is a little more than
64 KiB), which take a stream of 100 MB/s less than 3 ms.  MAX_READ_SIZE bounds what one
get returns, and so the memory a batch holds for it: a group never spans more than that,
unless one record alone is larger (a record is at most a 4 MiB block and its header, so
that never happens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from blocksnap.store.entries import Location
from blocksnap.store.packs import HEADER_SIZE

MAX_GAP_SIZE = 256 << 10
MAX_READ_SIZE = 8 << 20


@dataclass(frozen=True, slots=True)
class Extent:
    """One ranged get: a span of a pack and the records (id, location) inside it."""

    pack: bytes
    offset: int
    length: int
    records: tuple[tuple[bytes, Location], ...]

    def record(self, data: memoryview, loc: Location) -> memoryview:
        """The bytes of one of this extent's records, cut out of what the get returned
        (short when the pack was shorter than the index says)."""
        start = loc.offset - self.offset
        return data[start : start + HEADER_SIZE + loc.stored_size]


def record_end(loc: Location) -> int:
    return loc.offset + HEADER_SIZE + loc.stored_size


def plan(
    located: Iterable[tuple[bytes, Location]],
    *,
    max_gap_size: int = MAX_GAP_SIZE,
    max_read_size: int = MAX_READ_SIZE,
) -> Iterator[Extent]:
    """Group records by pack and offset into extents: each next record joins the current
    extent when it starts at most max_gap_size after its end and the extent stays within
    max_read_size.  Ids must be distinct; the extents come in pack and offset order."""
    ordered = sorted(located, key=lambda item: (item[1].pack, item[1].offset))
    i = 0
    while i < len(ordered):
        first = ordered[i][1]
        end = record_end(first)
        j = i + 1
        while j < len(ordered):
            loc = ordered[j][1]
            if loc.pack != first.pack or loc.offset > end + max_gap_size:
                break
            if max(end, record_end(loc)) - first.offset > max_read_size:
                break
            end = max(end, record_end(loc))
            j += 1
        yield Extent(first.pack, first.offset, end - first.offset, tuple(ordered[i:j]))
        i = j
