"""Snapshot records: their on-disk format, in the index and as objects in storage.

A snapshot record is UTF-8 JSON with these keys (format 1):

    format         1
    id             32 lowercase hex digits, random
    volume         the volume name
    time           ISO 8601 UTC, when the snapshot started reading
    kind           "full", "incremental", "differential" or "synthetic-full"
    parent         the id of the snapshot it was compared with (for a synthetic full, the
                   one it was made from), or null
    base           differential: the id of the full or synthetic full it is relative to,
                   else null (optional; absent means null)
    changed_ranges differential: [[first block, count], ...], the ranges that differ
                   from the base, sorted and disjoint (optional; absent means [])
    image_size     bytes; any value, the last block may be short
    block_size     bytes, a power of two from 4 KiB to 4 MiB, fixed per volume
    map            {"root": hex id of the block map's root node, "height": levels}
    counts         {"read", "changed", "hashed", "stored", "zero", "resumed"}: blocks
                   ("resumed" optional; absent means 0)
    stored_size    bytes this snapshot added to the store, metadata included
    metadata_size  bytes of that which are new block-map nodes
    duration       seconds
    labels         {string: string}
    block_id, change_filter, compression: the algorithms in force (repository config)

The same bytes are kept twice: in the index's snapshots database (the commit point: a
snapshot exists once that transaction commits) and, written durably just before that
commit, as the object snapshots/<id>, framed as b"BSSNAP\\x00\\x01" + BLAKE3-256(body) +
body.  The object lets the index be rebuilt; one whose commit never happened is a
leftover of an interrupted run, reported by verify.

A checkpoint record (format 1), kept only in the index's checkpoints database, is UTF-8
JSON with the keys format, volume, kind, parent, block_size, image_size, counts,
stored_size, metadata_size, duration, time, labels, changed_ranges and map as above
(describing the blocks it covers), and:

    mode           what the run was asked for: "full", "incremental" or "differential"
    parent_map     {"root", "height", "image_size"} of the parent's map, or null
    source         {string: integer}: identity of the source (st_dev, st_ino, ...)
    hints          fingerprint of the changed-extent runs (extents.py), or null
    block_count    the map covers blocks 0 .. block_count
    pinned         [hex root, ...]: the map and the parent's map, each holding a reference
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

import blake3

from blocksnap.errors import IntegrityError
from blocksnap.model import Checkpoint, SnapshotCounts, SnapshotInfo, SnapshotKind

RECORD_FORMAT = 1
OBJECT_MAGIC = b"BSSNAP\x00\x01"
SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")


def object_name(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}"


def fields(info: SnapshotInfo) -> dict[str, Any]:
    """The record's fields that describe the snapshot itself (all but format, algorithms)."""
    return {
        "id": info.id,
        "volume": info.volume,
        "time": info.time,
        "kind": info.kind.value,
        "parent": info.parent,
        "image_size": info.image_size,
        "block_size": info.block_size,
        "map": {"root": info.map_root.hex(), "height": info.map_height},
        "counts": asdict(info.counts),
        "stored_size": info.stored_size,
        "metadata_size": info.metadata_size,
        "duration": info.duration,
        "labels": info.labels,
        "base": info.base,
        "changed_ranges": [list(r) for r in info.changed_ranges],
    }


def encode(info: SnapshotInfo, algorithms: dict[str, str]) -> bytes:
    record = {"format": RECORD_FORMAT, **fields(info), **algorithms}
    return json.dumps(record, sort_keys=True).encode()


def _load(data: bytes, what: str, noun: str) -> dict[str, Any]:
    """The JSON object of a record of this format (KeyError/ValueError when malformed)."""
    r = json.loads(data)
    if r["format"] != RECORD_FORMAT:
        raise IntegrityError(f"{what}: unsupported {noun} format {r['format']}")
    return dict(r)


def decode(data: bytes, what: str) -> SnapshotInfo:
    try:
        r = _load(data, what, "snapshot record")
        counts = r["counts"]
        info = SnapshotInfo(
            id=str(r["id"]),
            volume=str(r["volume"]),
            time=str(r["time"]),
            kind=SnapshotKind(r["kind"]),
            parent=r["parent"],
            image_size=int(r["image_size"]),
            block_size=int(r["block_size"]),
            counts=_counts(counts),
            stored_size=int(r["stored_size"]),
            metadata_size=int(r["metadata_size"]),
            duration=float(r["duration"]),
            labels={str(k): str(v) for k, v in r["labels"].items()},
            map_root=bytes.fromhex(r["map"]["root"]),
            map_height=int(r["map"]["height"]),
            base=None if r.get("base") is None else str(r["base"]),
            changed_ranges=tuple((int(a), int(n)) for a, n in r.get("changed_ranges", [])),
        )
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{what}: damaged snapshot record ({exc!r})") from exc
    if not SNAPSHOT_ID.fullmatch(info.id) or info.image_size < 0 or info.block_size <= 0:
        raise IntegrityError(f"{what}: damaged snapshot record (invalid fields)")
    return info


def _counts(counts: dict[str, Any]) -> SnapshotCounts:
    return SnapshotCounts(
        read=int(counts["read"]),
        changed=int(counts["changed"]),
        hashed=int(counts["hashed"]),
        stored=int(counts["stored"]),
        zero=int(counts["zero"]),
        resumed=int(counts.get("resumed", 0)),
    )


def encode_checkpoint(c: Checkpoint) -> bytes:
    record = {
        "format": RECORD_FORMAT,
        "volume": c.volume,
        "mode": c.mode,
        "kind": c.kind.value,
        "parent": c.parent,
        "parent_map": None
        if c.parent_map is None
        else {
            "root": c.parent_map[0].hex(),
            "height": c.parent_map[1],
            "image_size": c.parent_map[2],
        },
        "block_size": c.block_size,
        "image_size": c.image_size,
        "source": c.source,
        "hints": c.hints,
        "block_count": c.block_count,
        "map": {"root": c.map_root.hex(), "height": c.map_height},
        "counts": asdict(c.counts),
        "stored_size": c.stored_size,
        "metadata_size": c.metadata_size,
        "duration": c.duration,
        "time": c.time,
        "labels": c.labels,
        "changed_ranges": [list(r) for r in c.changed_ranges],
        "pinned": [root.hex() for root in c.pinned],
    }
    return json.dumps(record, sort_keys=True).encode()


def decode_checkpoint(data: bytes, what: str) -> Checkpoint:
    try:
        r = _load(data, what, "checkpoint")
        pm = r["parent_map"]
        return Checkpoint(
            volume=str(r["volume"]),
            mode=str(r["mode"]),
            kind=SnapshotKind(r["kind"]),
            parent=None if r["parent"] is None else str(r["parent"]),
            parent_map=None
            if pm is None
            else (bytes.fromhex(pm["root"]), int(pm["height"]), int(pm["image_size"])),
            block_size=int(r["block_size"]),
            image_size=int(r["image_size"]),
            source={str(k): v if isinstance(v, str) else int(v) for k, v in r["source"].items()},
            hints=None if r["hints"] is None else str(r["hints"]),
            block_count=int(r["block_count"]),
            map_root=bytes.fromhex(r["map"]["root"]),
            map_height=int(r["map"]["height"]),
            counts=_counts(r["counts"]),
            stored_size=int(r["stored_size"]),
            metadata_size=int(r["metadata_size"]),
            duration=float(r["duration"]),
            time=str(r["time"]),
            labels={str(k): str(v) for k, v in r["labels"].items()},
            changed_ranges=tuple((int(a), int(n)) for a, n in r["changed_ranges"]),
        )
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{what}: damaged checkpoint record ({exc!r})") from exc


def frame(body: bytes) -> bytes:
    return OBJECT_MAGIC + blake3.blake3(body).digest() + body


def unframe(data: bytes, what: str) -> bytes:
    head = len(OBJECT_MAGIC)
    if data[:head] != OBJECT_MAGIC or len(data) < head + 32:
        raise IntegrityError(f"{what}: not a snapshot object")
    body = data[head + 32 :]
    if blake3.blake3(body).digest() != data[head : head + 32]:
        raise IntegrityError(f"{what}: snapshot object checksum mismatch")
    return body
