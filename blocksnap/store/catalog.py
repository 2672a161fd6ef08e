"""The catalog's objects: snapshot records, tombstones and settings, and their formats.

These objects, with the packs, are the truth about a repository (see store/__init__.py):
a snapshot exists from the moment its record object exists until a tombstone names it,
and everything the index keeps about snapshots, their order and their settings is
rebuilt from them.

Every object here is framed as store/frames.py describes, with magic b"BSSNAP"
(snapshot record), b"BSTOMB" (tombstone) or b"BSSETT" (setting), frame version 2, and a
body of UTF-8 JSON: an object with "format": 2 and the keys below.

Compatibility rule: a reader refuses (UnsupportedFormatError, never "damaged") an
intact frame or a body of a format above the one it knows; keys it does not know are
ignored, so adding an optional key needs no new format.  A frame of version 1 is format
1's and is refused the same way.  The namespace key (a tenant's name, "" for the
repository's own) is carried by every object now and scopes volumes once tenants land;
a reader that does not know a namespace other than "" refuses the object.

A snapshot record, snapshots/<id>, written create-if-absent (the commit point):

    format         2
    id             32 lowercase hex digits, random
    namespace      ""
    volume         the volume name
    seq            its place in the volume's commit order: 1 + the highest seq among the
                   volume's snapshots when it was committed (one writer per volume at a
                   time); a volume's snapshots are ordered by (seq, id), so latest~N
                   comes from the records alone
    time           ISO 8601 UTC, when the snapshot started reading
    kind           "full", "incremental", "differential" or "synthetic-full"
    parent         the id of the snapshot it was compared with (for a synthetic full, the
                   one it was made from), or null
    base           differential: the id of the full or synthetic full it is relative to,
                   else null
    changed_ranges differential: [[first block, count], ...], the ranges that differ
                   from the base, sorted and disjoint ([] otherwise)
    image_size     bytes; any value, the last block may be short
    block_size     bytes, a power of two from 4 KiB to 4 MiB, fixed per volume
    map            {"root": hex id of the block map's root node, "height": levels}
    counts         {"read", "changed", "hashed", "stored", "zero", "resumed"}: blocks
    stored_size    bytes this snapshot added to the store, metadata included
    metadata_size  bytes of that which are new block-map nodes
    duration       seconds
    labels         {string: string}
    block_id, change_filter, compression: the algorithms in force (repository config)
    packs          optional: on a store that hosts share, the ids (32 hex digits) of the
                   packs the run wrote, so that another host's cache indexes just those
                   (store/sync.py); a reader that finds the map root elsewhere ignores it
    commit_by      optional: on a store that hosts share, the server's time (whole
                   seconds since the epoch) by which the record had to land for its
                   writer's session, and its volume's lease, to be valid then
                   (store/objectlocks.py).  A record whose object's modification time
                   (in whole seconds) is later is no snapshot: every reader leaves it
                   out (as it does an absent one), and the gc of its writer's host
                   deletes it.  (A reader older than the key counts such a record: every
                   host sharing a store must know it.  A copy of the store made object
                   by object has new modification times: it needs its records written
                   again without the key.)

The index keeps the body as a cache (store/index.py).

A tombstone, tombstones/<id>, written create-if-absent before the index forgets the
snapshot (the removal's commit point): {"format", "id", "namespace", "volume", "removed"
(ISO 8601 UTC)}.  Tombstones stay; the record object is deleted after them.

A setting, settings/<name>:

    settings/policy-<first 32 hex digits of BLAKE3(volume)>
                   {"format", "namespace", "kind": "policy", "volume", "policy": {...}}
                   (the policy as retention.py writes it)
    settings/protected-<snapshot id>
                   {"format", "namespace", "kind": "protected", "snapshot": id}

A checkpoint record (format 2), kept only in the index's checkpoints database (host-local
state, not an object), is UTF-8 JSON with the keys format, volume, kind, parent,
block_size, image_size, counts, stored_size, metadata_size, duration, time, labels,
changed_ranges and map as above (describing the blocks it covers), and:

    mode           what the run was asked for: "full", "incremental" or "differential"
    parent_map     {"root", "height", "image_size"} of the parent's map, or null
    source         {string: integer or string}: identity of the source
    hints          fingerprint of the changed-extent runs (extents.py), or null
    block_count    the map covers blocks 0 .. block_count
    pinned         [hex root, ...]: the map and the parent's map, each holding a reference
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import blake3

from blocksnap.errors import IntegrityError, UnsupportedFormatError
from blocksnap.model import Checkpoint, SnapshotCounts, SnapshotInfo, SnapshotKind
from blocksnap.store import frames

RECORD_FORMAT = 2
FRAME_VERSION = 2
SNAPSHOT_MAGIC = b"BSSNAP"
TOMBSTONE_MAGIC = b"BSTOMB"
SETTING_MAGIC = b"BSSETT"
NAMESPACE = ""  # the repository's own; tenants get their own names later
SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
_NOUNS = {
    SNAPSHOT_MAGIC: "snapshot record",
    TOMBSTONE_MAGIC: "tombstone",
    SETTING_MAGIC: "setting",
}
SNAPSHOTS = "snapshots/"
TOMBSTONES = "tombstones/"
SETTINGS = "settings/"


def object_name(snapshot_id: str) -> str:
    return f"{SNAPSHOTS}{snapshot_id}"


def tombstone_name(snapshot_id: str) -> str:
    return f"{TOMBSTONES}{snapshot_id}"


def id_of(name: str) -> str | None:
    """The snapshot id an object name under snapshots/ or tombstones/ ends in, or None."""
    base = name.rsplit("/", 1)[-1]
    return base if SNAPSHOT_ID.fullmatch(base) else None


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


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded snapshot record: the snapshot, and its place in the volume's order."""

    info: SnapshotInfo
    seq: int
    packs: tuple[bytes, ...] = ()  # the packs its run wrote, when the record names them
    commit_by: int | None = None  # when the record had to land, when it says so

    @property
    def order(self) -> tuple[int, str]:
        return self.seq, self.info.id

    def late(self, mtime: float) -> bool:
        """Whether a record object of modification time mtime landed after its deadline,
        and so is no snapshot (see the module doc and landed_late)."""
        return self.commit_by is not None and landed_late(self.commit_by, mtime)


def landed_late(commit_by: int, mtime: float) -> bool:
    """Whether an object of modification time mtime landed after commit_by: in whole
    seconds, as S3 gives them (a listing may give fractions where a HEAD does not)."""
    return mtime >= commit_by + 1


def encode(
    info: SnapshotInfo,
    algorithms: dict[str, str],
    seq: int,
    packs: list[bytes] | None = None,
    commit_by: int | None = None,
) -> bytes:
    """The record body (see the module doc); packs: the packs the run wrote, and
    commit_by: when the record must land, both on a store that hosts share."""
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "namespace": NAMESPACE,
        "seq": seq,
        **fields(info),
        **algorithms,
    }
    if packs:
        record["packs"] = [p.hex() for p in packs]
    if commit_by is not None:
        record["commit_by"] = commit_by
    return json.dumps(record, sort_keys=True).encode()


def _load(data: bytes | memoryview, what: str, noun: str) -> dict[str, Any]:
    """The JSON object of a body of this format (KeyError/ValueError when malformed)."""
    r = json.loads(bytes(data))
    if not isinstance(r, dict):
        raise ValueError(f"{noun} is not a JSON object")
    fmt = r["format"]
    if not isinstance(fmt, int) or fmt < 1:
        raise ValueError(f"format {fmt!r}")
    if fmt != RECORD_FORMAT:
        raise UnsupportedFormatError(
            f"{what}: {noun} format {fmt} is not supported (this blocksnap reads format "
            f"{RECORD_FORMAT}){_NEWER if fmt > RECORD_FORMAT else _OLDER}"
        )
    namespace = r.get("namespace", NAMESPACE)
    if namespace != NAMESPACE:
        raise UnsupportedFormatError(
            f"{what}: {noun} of namespace {namespace!r}, which this blocksnap cannot read{_NEWER}"
        )
    return dict(r)


_NEWER = "; a newer blocksnap wrote it"
_OLDER = "; re-create the repository with this blocksnap"


def decode_entry(data: bytes | memoryview, what: str) -> Entry:
    """A record body, checked: IntegrityError when damaged."""
    try:
        r = _load(data, what, "snapshot record")
        counts = r["counts"]
        info = SnapshotInfo(
            id=str(r["id"]),
            volume=str(r["volume"]),
            time=str(r["time"]),
            kind=SnapshotKind(r["kind"]),
            parent=None if r["parent"] is None else str(r["parent"]),
            image_size=int(r["image_size"]),
            block_size=int(r["block_size"]),
            counts=_counts(counts),
            stored_size=int(r["stored_size"]),
            metadata_size=int(r["metadata_size"]),
            duration=float(r["duration"]),
            labels={str(k): str(v) for k, v in r["labels"].items()},
            map_root=bytes.fromhex(r["map"]["root"]),
            map_height=int(r["map"]["height"]),
            base=None if r["base"] is None else str(r["base"]),
            changed_ranges=tuple((int(a), int(n)) for a, n in r["changed_ranges"]),
        )
        seq = int(r["seq"])
        packs = tuple(bytes.fromhex(p) for p in r.get("packs", []))
        commit_by = r.get("commit_by")
        if commit_by is not None and (
            isinstance(commit_by, bool) or not isinstance(commit_by, int)
        ):
            raise ValueError(f"commit_by {commit_by!r}")
    except (IntegrityError, UnsupportedFormatError):
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{what}: damaged snapshot record ({exc!r})") from exc
    if (
        not SNAPSHOT_ID.fullmatch(info.id)
        or info.image_size < 0
        or info.block_size <= 0
        or seq < 1
        or len(info.map_root) != 32
        or any(len(p) != 16 for p in packs)
    ):
        raise IntegrityError(f"{what}: damaged snapshot record (invalid fields)")
    return Entry(info, seq, packs, commit_by)


def without_deadline(body: bytes) -> bytes:
    """A record body as written again, once judged in time (repair from an index's copy):
    without commit_by, since its new object's modification time is not the commit's."""
    record = json.loads(body)
    record.pop("commit_by", None)
    return json.dumps(record, sort_keys=True).encode()


def decode(data: bytes | memoryview, what: str) -> SnapshotInfo:
    return decode_entry(data, what).info


def read_record(get: Callable[[str], bytes], snapshot_id: str) -> tuple[Entry, bytes]:
    """A snapshot's record object, fetched with get and checked (frame, body, and that
    it is the record of that snapshot): its entry and body."""
    name = object_name(snapshot_id)
    body = bytes(unframe(SNAPSHOT_MAGIC, get(name), name))
    entry = decode_entry(body, name)
    if entry.info.id != snapshot_id:
        raise IntegrityError(f"{name}: holds the record of snapshot {entry.info.id}")
    return entry, body


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


def frame(magic: bytes, body: bytes) -> bytes:
    """A catalog object (store/frames.py), of frame version 2."""
    return frames.frame(magic, FRAME_VERSION, body)


def unframe(magic: bytes, data: bytes, what: str) -> bytes:
    """The body of an intact catalog object of this kind and version."""
    noun = _NOUNS[magic]
    version, body = frames.unframe(data, magic, f"{what} ({noun} object)")
    if version != FRAME_VERSION:
        raise UnsupportedFormatError(
            f"{what}: {noun} object of format {version} is not supported (this blocksnap "
            f"reads format {FRAME_VERSION}){_NEWER if version > FRAME_VERSION else _OLDER}"
        )
    return body


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A removal: which snapshot, of which volume, and when."""

    id: str
    volume: str
    removed: str  # ISO 8601 UTC

    def encode(self) -> bytes:
        body = {
            "format": RECORD_FORMAT,
            "namespace": NAMESPACE,
            "id": self.id,
            "volume": self.volume,
            "removed": self.removed,
        }
        return frame(TOMBSTONE_MAGIC, json.dumps(body, sort_keys=True).encode())


def encode_tombstone(info: SnapshotInfo) -> bytes:
    """The tombstone of a snapshot removed now."""
    return Tombstone(
        info.id, info.volume, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ).encode()


def decode_tombstone(data: bytes, what: str) -> Tombstone:
    try:
        r = _load(unframe(TOMBSTONE_MAGIC, data, what), what, "tombstone")
        tombstone = Tombstone(str(r["id"]), str(r["volume"]), str(r["removed"]))
    except (IntegrityError, UnsupportedFormatError):
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{what}: damaged tombstone ({exc!r})") from exc
    if not SNAPSHOT_ID.fullmatch(tombstone.id) or not what.endswith(tombstone.id):
        raise IntegrityError(f"{what}: damaged tombstone (names another snapshot)")
    return tombstone


def policy_name(volume: str) -> str:
    return f"{SETTINGS}policy-{blake3.blake3(volume.encode()).hexdigest()[:32]}"


def protected_name(snapshot_id: str) -> str:
    return f"{SETTINGS}protected-{snapshot_id}"


def encode_policy(volume: str, policy: dict[str, object]) -> bytes:
    body = {
        "format": RECORD_FORMAT,
        "namespace": NAMESPACE,
        "kind": "policy",
        "volume": volume,
        "policy": policy,
    }
    return frame(SETTING_MAGIC, json.dumps(body, sort_keys=True).encode())


def encode_protected(snapshot_id: str) -> bytes:
    body = {
        "format": RECORD_FORMAT,
        "namespace": NAMESPACE,
        "kind": "protected",
        "snapshot": snapshot_id,
    }
    return frame(SETTING_MAGIC, json.dumps(body, sort_keys=True).encode())


@dataclass(frozen=True, slots=True)
class Setting:
    """A decoded setting: a volume's policy, or a snapshot's protection."""

    kind: str  # "policy" or "protected"
    volume: str | None = None
    policy: dict[str, object] | None = None
    snapshot: str | None = None


def decode_setting(data: bytes, what: str) -> Setting:
    try:
        r = _load(unframe(SETTING_MAGIC, data, what), what, "setting")
        kind = r["kind"]
        if kind == "policy":
            policy = r["policy"]
            if not isinstance(policy, dict):
                raise TypeError("policy is not an object")
            setting = Setting(kind, volume=str(r["volume"]), policy=policy)
            expected = policy_name(str(r["volume"]))
        elif kind == "protected":
            snapshot_id = str(r["snapshot"])
            if not SNAPSHOT_ID.fullmatch(snapshot_id):
                raise ValueError("invalid snapshot id")
            setting = Setting(kind, snapshot=snapshot_id)
            expected = protected_name(snapshot_id)
        else:
            raise UnsupportedFormatError(f"{what}: setting of unknown kind {kind!r}{_NEWER}")
    except (IntegrityError, UnsupportedFormatError):
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{what}: damaged setting ({exc!r})") from exc
    if not what.endswith(expected):
        raise IntegrityError(f"{what}: setting object names another setting ({expected})")
    return setting
