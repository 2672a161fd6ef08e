"""LVM2 logical volumes inside an image: physical-volume labels, text metadata, extent maps.

libvslvm (20240504 and 20260901) fails to open any logical volume of more than one
segment, which every `lvextend` makes ("invalid physical volume value already set"), and
reads one physical volume only.  So this module reads the LVM2 format itself.  It owns no
format of blocksnap's; the format it reads is LVM2's, summarised here (integers are
little-endian, sectors are 512 bytes):

* Label: one of sectors 0-3 of a physical volume (PV) starts with "LABELONE", then u64
  its own sector number, u32 CRC of bytes 20-511, u32 offset of the PV header in the
  sector, and the type "LVM2 001".
* PV header: the 32-character PV UUID, u64 device size, then the data areas as (u64
  offset, u64 size) pairs ending with a zero pair, then the metadata areas the same way.
* Metadata area: a 512-byte header of u32 CRC of bytes 4-511, the magic
  " LVM2 x[5A%r0N*>", u32 version (1), u64 start, u64 size, then (u64 offset, u64 size,
  u32 CRC, u32 flags) text locations ending with a zero one.  The first location holds the
  committed metadata text, at `start + offset`; text that reaches the end of the area goes
  on at `start + 512`.
* The CRCs are LVM's: the zlib CRC-32 polynomial started from 0xf597a6cf, not inverted.
* The text describes the volume group (VG) as nested `name { key = value }` sections
  with integer, string and list values.  `extent_size`, `pe_start` and `stripe_size` count
  sectors.  A logical volume (LV) is a list of segments, each `extent_count` extents from
  `start_extent`.  A "striped" segment lays its extents over `stripe_count` (PV name,
  first extent) pairs in chunks of `stripe_size`; one stripe is a linear segment.

Read here: linear, striped and "zero" segments, on the PVs found in this image (its
partitions, or the whole image when it has no partition table).  A VG's metadata is taken
from the PV holding the highest sequence number.  Other segment types (thin, raid, mirror,
cache, snapshot, error, ...) and LVs on PVs outside the image are listed with the reason
they cannot be opened.  All of it is untrusted input and is checked before use.
"""

from __future__ import annotations

import bisect
import re
import struct
import zlib
from dataclasses import dataclass

from blocksnap.errors import FilesystemError
from blocksnap.fs.image import Window
from blocksnap.fs.volumes import Partition, Place

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
INITIAL_CRC = 0xF597A6CF
MAX_TEXT = 16 << 20  # metadata text larger than this is refused (LVM's default area: 1 MiB)
MAX_DEPTH = 16  # nesting of metadata sections
MAX_SEGMENTS = 65536  # per volume group
MAX_SIZE = (1 << 63) - 1  # what the filesystem libraries' 64-bit offsets can address

Section = dict[str, "Value"]
Value = int | str | list[int | str] | Section


def lvm_crc(data: bytes) -> int:
    """LVM's CRC-32: zlib's polynomial, started from INITIAL_CRC, with no final inversion."""
    return ~zlib.crc32(data, INITIAL_CRC ^ 0xFFFFFFFF) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class _Run:
    """A stretch of an LV: `length` bytes from `start`, laid out over `stripes`."""

    start: int
    length: int
    stripes: tuple[int, ...]  # image byte offset where each stripe begins; () reads zeros
    chunk: int  # bytes per stripe chunk


class _ExtentMap:
    """LV offset -> image offset, run by run, through the whole image's window."""

    def __init__(self, image: Window, runs: list[_Run]) -> None:
        self._image = image
        self._runs = runs
        self._starts = [r.start for r in runs]

    def pread(self, offset: int, size: int) -> bytes:
        out = bytearray()
        at, end = offset, offset + size
        i = bisect.bisect_right(self._starts, at) - 1
        while at < end and 0 <= i < len(self._runs):
            run = self._runs[i]
            within = at - run.start
            n = min(end, run.start + run.length) - at
            if n <= 0:
                i += 1
                continue
            if not run.stripes:
                out += bytes(n)
            elif len(run.stripes) == 1:
                out += self._image.pread(run.stripes[0] + within, n)
            else:
                chunk_index, into = divmod(within, run.chunk)
                row, stripe = divmod(chunk_index, len(run.stripes))
                n = min(n, run.chunk - into)
                out += self._image.pread(run.stripes[stripe] + row * run.chunk + into, n)
            at += n
        return bytes(out)


# --- the label and metadata area ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PhysicalVolume:
    uuid: str  # without dashes
    offset: int  # in the image
    size: int  # of the window the PV was found in
    text: bytes | None  # committed metadata text, if this PV holds a readable copy
    problem: str | None  # why a copy it holds cannot be read


def _read_pv(window: Window, placed_at: int) -> _PhysicalVolume | None:
    """The PV whose label is in `window` (at `placed_at` in the image), or None if none is.

    A damaged label is a FilesystemError; a damaged metadata copy is the PV's `problem`,
    since another PV of the group may hold a good one."""
    head = window.pread(0, 4 * SECTOR)
    for sector in range(4):
        label = head[sector * SECTOR : (sector + 1) * SECTOR]
        if len(label) == SECTOR and label[:8] == LABEL_ID and label[24:32] == LABEL_TYPE:
            break
    else:
        return None
    own, crc, header_at = struct.unpack_from("<QII", label, 8)
    if own != sector or crc != lvm_crc(label[20:]) or not 32 <= header_at <= SECTOR - 56:
        raise FilesystemError(f"damaged LVM label in sector {sector}")
    header = head[sector * SECTOR + header_at :] + window.pread(4 * SECTOR, SECTOR)
    uuid = header[:32].decode("ascii", "replace")
    lists: list[list[tuple[int, int]]] = [[], []]
    at = 40
    for areas in lists:
        while True:
            if at + 16 > len(header):
                raise FilesystemError("damaged LVM physical volume header")
            area, size = struct.unpack_from("<QQ", header, at)
            at += 16
            if area == 0 and size == 0:
                break
            areas.append((area, size))
    text, problem = None, None
    for area, size in lists[1]:
        try:
            text = _metadata_text(window, area, size)
        except FilesystemError as exc:
            problem = str(exc)
            continue
        if text is not None:
            break
    return _PhysicalVolume(uuid, placed_at, window.size, text, problem)


def _metadata_text(window: Window, area: int, area_size: int) -> bytes | None:
    if area_size < 2 * SECTOR or area + area_size > window.size:
        raise FilesystemError("LVM metadata area lies outside the physical volume")
    header = window.pread(area, SECTOR)
    if header[4:20] != MDA_MAGIC or struct.unpack_from("<I", header, 0)[0] != lvm_crc(header[4:]):
        raise FilesystemError("damaged LVM metadata area header")
    offset, size, crc, flags = struct.unpack_from("<QQII", header, 40)
    if size == 0 or flags & 1:  # no text, or an area LVM is told to ignore
        return None
    if size > MAX_TEXT or not SECTOR <= offset < area_size:
        raise FilesystemError("LVM metadata text lies outside its area")
    first = min(size, area_size - offset)
    text = window.pread(area + offset, first)
    if first < size:  # the area is a ring: the text wraps past its header
        if size - first > area_size - SECTOR:
            raise FilesystemError("LVM metadata text lies outside its area")
        text += window.pread(area + SECTOR, size - first)
    if lvm_crc(text) != crc:
        raise FilesystemError("LVM metadata text fails its checksum")
    return text


# --- the metadata text ----------------------------------------------------------------------

_TOKEN = re.compile(
    rb"""\s*(?:\#[^\n]*\n?\s*)*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<num>-?[0-9]+(?:\.[0-9]+)?)(?![A-Za-z_.+-])
      | (?P<name>[A-Za-z0-9_.+\-]+)
      | (?P<punct>[{}\[\]=,])
      | (?P<end>\x00*\s*\Z)
    )""",
    re.X,
)


def parse_metadata(text: bytes) -> Section:
    """The sections and values of LVM2 metadata text; FilesystemError on anything else."""
    tokens: list[tuple[str, bytes]] = []
    at = 0
    while True:
        m = _TOKEN.match(text, at)
        if m is None:
            raise FilesystemError(f"LVM metadata text cannot be parsed at byte {at}")
        if m.lastgroup == "end":
            break
        tokens.append((m.lastgroup or "", m.group(m.lastgroup or 0)))
        at = m.end()
    parsed, pos = _section(tokens, 0, 0)
    if pos != len(tokens):
        raise FilesystemError("LVM metadata text has an unmatched '}'")
    return parsed


def _section(tokens: list[tuple[str, bytes]], pos: int, depth: int) -> tuple[Section, int]:
    if depth > MAX_DEPTH:
        raise FilesystemError("LVM metadata sections nest too deep")
    out: Section = {}
    while pos < len(tokens) and tokens[pos] != ("punct", b"}"):
        kind, key = tokens[pos]
        if kind not in ("name", "num") or pos + 1 >= len(tokens):
            raise FilesystemError("LVM metadata text has a value where a name belongs")
        after = tokens[pos + 1]
        if after == ("punct", b"{"):
            out[key.decode()], pos = _section(tokens, pos + 2, depth + 1)
            if pos >= len(tokens):
                raise FilesystemError("LVM metadata text ends inside a section")
            pos += 1
        elif after == ("punct", b"="):
            out[key.decode()], pos = _value(tokens, pos + 2)
        else:
            raise FilesystemError(f"LVM metadata text has no '=' after {key.decode()!r}")
    return out, pos


def _value(tokens: list[tuple[str, bytes]], pos: int) -> tuple[Value, int]:
    if pos < len(tokens) and tokens[pos] == ("punct", b"["):
        items: list[int | str] = []
        pos += 1
        while pos < len(tokens) and tokens[pos] != ("punct", b"]"):
            items.append(_scalar(tokens[pos]))
            pos += 1
            if pos < len(tokens) and tokens[pos] == ("punct", b","):
                pos += 1
        if pos >= len(tokens):
            raise FilesystemError("LVM metadata text ends inside a list")
        return items, pos + 1
    if pos >= len(tokens):
        raise FilesystemError("LVM metadata text ends before a value")
    return _scalar(tokens[pos]), pos + 1


def _scalar(token: tuple[str, bytes]) -> int | str:
    kind, raw = token
    if kind == "str":
        return re.sub(rb"\\(.)", rb"\1", raw[1:-1]).decode("utf-8", "replace")
    if kind == "num":
        if len(raw) > 40:
            raise FilesystemError("LVM metadata text has a number too long to be one")
        return int(raw.split(b".")[0])  # LVM writes no fractions where blocksnap looks
    raise FilesystemError(f"LVM metadata text has {raw.decode('ascii', 'replace')!r} as a value")


# --- volume groups --------------------------------------------------------------------------


def _int(section: Section, key: str, where: str, low: int = 0) -> int:
    value = section.get(key)
    if not isinstance(value, int) or value < low:
        raise FilesystemError(f"LVM metadata: {where} has no valid {key}")
    return value


def _sub(section: Section, key: str, where: str) -> Section:
    value = section.get(key, {})
    if not isinstance(value, dict):
        raise FilesystemError(f"LVM metadata: {where} has no valid {key}")
    return value


def _volume_group(text: bytes) -> tuple[str, Section]:
    """The one VG section of a metadata text, with its name."""
    groups = [(k, v) for k, v in parse_metadata(text).items() if isinstance(v, dict)]
    if len(groups) != 1:
        raise FilesystemError(f"LVM metadata describes {len(groups)} volume groups, not one")
    return groups[0]


def find_logical_volumes(
    image: Window, places: list[tuple[str, Window]]
) -> tuple[list[Place], list[str]]:
    """The visible LVs of every VG whose PVs lie in `places` ((where, window of `image`)
    pairs), and a message for each PV or VG that is too damaged to use."""
    pvs: dict[str, _PhysicalVolume] = {}
    groups: dict[str, tuple[int, str, Section]] = {}  # VG id -> (seqno, name, section)
    problems = []
    for where, place in places:
        try:
            pv = _read_pv(place, place.offset - image.offset)
            if pv is None:
                continue
            pvs.setdefault(pv.uuid, pv)
            if pv.problem is not None:
                problems.append(f"{where}: {pv.problem}")
            if pv.text is None:
                continue
            name, vg = _volume_group(pv.text)
            vg_id = str(vg.get("id", name))
            seqno = _int(vg, "seqno", f"volume group {name}")
        except FilesystemError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if vg_id not in groups or groups[vg_id][0] < seqno:
            groups[vg_id] = (seqno, name, vg)
    found = []
    for _seqno, name, vg in groups.values():
        try:
            found += _logical_volumes(image, name, vg, pvs)
        except FilesystemError as exc:
            problems.append(f"volume group {name}: {exc}")
    return found, problems


def _logical_volumes(
    image: Window, vg_name: str, vg: Section, pvs: dict[str, _PhysicalVolume]
) -> list[Place]:
    where = f"volume group {vg_name}"
    extent = _int(vg, "extent_size", where, 1) * SECTOR
    # PV name in this VG -> (image offset of its first extent, extent count), or its UUID
    # when the PV is not in the image
    placed: dict[str, tuple[int, int] | str] = {}
    for pv_name, pv in _sub(vg, "physical_volumes", where).items():
        if not isinstance(pv, dict):
            continue
        uuid = str(pv.get("id", pv_name))
        first = _int(pv, "pe_start", f"{where} {pv_name}") * SECTOR
        count = _int(pv, "pe_count", f"{where} {pv_name}")
        found = pvs.get(uuid.replace("-", ""))
        if found is None:
            placed[pv_name] = uuid
        elif first + count * extent > found.size:
            raise FilesystemError(f"LVM metadata: {where} {pv_name} is larger than its device")
        else:
            placed[pv_name] = (found.offset + first, count)
    lvs = _sub(vg, "logical_volumes", where)
    cow_of = {}  # old-style snapshots: the LV holding a snapshot's changes -> its origin
    for lv in lvs.values():
        for segment in lv.values() if isinstance(lv, dict) else []:
            if isinstance(segment, dict) and segment.get("type") == "snapshot":
                cow_of[str(segment.get("cow_store"))] = str(segment.get("origin"))
    out = []
    budget = MAX_SEGMENTS
    for lv_name, lv in lvs.items():
        status = lv.get("status") if isinstance(lv, dict) else None
        if not isinstance(lv, dict) or not isinstance(status, list) or "VISIBLE" not in status:
            continue  # the hidden parts of pools, mirrors and snapshots
        full = f"{vg_name}/{lv_name}"
        segments = [v for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)]
        budget -= len(segments)
        if budget < 0:
            raise FilesystemError(f"LVM metadata: {where} has too many segments")
        segments.sort(key=lambda s: _int(s, "start_extent", f"logical volume {full}"))
        types = sorted({_kind(s) for s in segments})
        size = 0
        for segment in segments:
            if _int(segment, "start_extent", full) * extent != size:
                raise FilesystemError(f"LVM metadata: {full} has a gap or overlap in its segments")
            size += _int(segment, "extent_count", full, 1) * extent
        if size > MAX_SIZE:
            raise FilesystemError(f"LVM metadata: {full} is larger than 8 EiB")
        problem = None
        if lv_name in cow_of:
            problem = f"holds the changes of a snapshot of {vg_name}/{cow_of[lv_name]}"
        elif unknown := [t for t in types if t not in READ_TYPES]:
            problem = (
                f"has segments of type {', '.join(unknown)}: blocksnap reads linear, striped "
                "and zero segments only"
            )
        else:
            missing = sorted(_missing(segments, placed))
            if missing:
                problem = f"lies partly on physical volume {missing[0]}, which is not in this image"
        if problem is not None:
            partition = Partition(full, "lvm", 0, size, "+".join(types))
            out.append(Place(partition, None, f"logical volume {full} {problem}"))
            continue
        runs = _runs(segments, extent, placed, full)
        offset = next((r.stripes[0] for r in runs if r.stripes), 0)
        partition = Partition(full, "lvm", offset, size, "+".join(types))
        window = Window(_ExtentMap(image, runs).pread, 0, size, image.latch)
        out.append(Place(partition, window))
    return out


READ_TYPES = ("linear", "striped", "zero")


def _kind(segment: Section) -> str:
    """The segment's type as lvs shows it: a striped segment of one stripe is "linear"."""
    kind = str(segment.get("type", "?"))
    return "linear" if kind == "striped" and segment.get("stripe_count") == 1 else kind


def _missing(segments: list[Section], placed: dict[str, tuple[int, int] | str]) -> set[str]:
    """The UUIDs of the PVs outside this image that the segments lie on."""
    names = [s.get("stripes") for s in segments]
    found = {
        placed.get(str(n)) for stripes in names if isinstance(stripes, list) for n in stripes[::2]
    }
    return {pv for pv in found if isinstance(pv, str)}


def _runs(
    segments: list[Section], extent: int, placed: dict[str, tuple[int, int] | str], full: str
) -> list[_Run]:
    """The runs of an LV whose segments are all readable and placed, in LV order."""
    runs = []
    at = 0
    for segment in segments:
        count = _int(segment, "extent_count", full, 1)
        length = count * extent
        if segment.get("type") == "zero":
            runs.append(_Run(at, length, (), length))
            at += length
            continue
        stripe_count = _int(segment, "stripe_count", full, 1)
        stripes = segment.get("stripes")
        if (
            not isinstance(stripes, list)
            or len(stripes) != 2 * stripe_count
            or count % stripe_count
        ):
            raise FilesystemError(f"LVM metadata: {full} has malformed stripes")
        chunk = length
        if stripe_count > 1:
            chunk = _int(segment, "stripe_size", full, 1) * SECTOR
            if extent % chunk:
                raise FilesystemError(f"LVM metadata: {full} has a stripe size that is not valid")
        starts = []
        for pv_name, first in zip(stripes[::2], stripes[1::2], strict=True):
            pv = placed.get(str(pv_name))
            if not isinstance(pv, tuple) or not isinstance(first, int) or first < 0:
                raise FilesystemError(f"LVM metadata: {full} names an unknown stripe {pv_name}")
            base, pe_count = pv
            if first + count // stripe_count > pe_count:
                raise FilesystemError(f"LVM metadata: {full} runs past the end of {pv_name}")
            starts.append(base + first * extent)
        runs.append(_Run(at, length, tuple(starts), chunk))
        at += length
    return runs
