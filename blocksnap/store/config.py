"""The repository config: its framed, versioned format and the rule for who may read or write.

The object `config` is written once, create-if-absent, by init (store/init.py) and
read first, through the storage seam, by everything that opens the repository.

Frame (store/frames.py, whose 40 bytes every frame version keeps, so any reader can
tell damage from a newer format): magic b"BSCONF", frame version 1, BLAKE3-256 of magic
+ version + body, then the body, a UTF-8 JSON object.

Body (repository format 2), in this key order:

    format              "blocksnap-repository"
    version             the repository format the writer wrote: 2
    min_reader_version  the lowest format a reader must support to read it (2)
    min_reader_release  the first blocksnap release that reads it: its format and
                        every name in features ("0.2.0")
    min_writer_release  the first blocksnap release that may write it: the above and
                        every name in write_features ("0.2.0")
    features            [names]: what a reader must understand to read (none yet)
    write_features      [names]: what a writer must understand to write (none yet);
                        a reader that lacks one still reads
    repository          the identity: {"id": 32 hex digits, random;
                        "created": ISO 8601 UTC}
    content             the content parameters, which a replica must share to dedup
                        against this repository: {"id": 32 hex digits, random, the
                        same in every repository that shares them; "block_id": the
                        strong block identity (blockid.py); "change_filter":
                        "xxh3-128"; "filter_seed": u64, secret, so that nobody outside
                        can precompute filter collisions; "compression": "zstd"}
    writer              tuning a writer uses, not needed to read:
                        {"compression_level": 1..19, "pack_target_size": bytes}
    encryption          "none"

Compatibility, as ext4's feature sets: a reader refuses (UnsupportedFormatError, "needs
blocksnap >= min_reader_release") a config whose min_reader_version is above the format
it reads, or whose features name one it does not know; it checks those before any
other field, since a newer format may change them.  Unknown write_features leave reading
alone and make writing refuse the same way (RepositoryConfig.check_writable).  Fields it
does not know, at any level, are ignored, so a newer writer can add some without
locking older readers out.  version may exceed what a reader knows as long as
min_reader_version does not.  A content parameter of a value this blocksnap does not
implement is refused the same way, never guessed at.

Format 1 (plain JSON, "version": 1, no frame) is refused with the way forward: there
were no users to migrate.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from blocksnap import blockid
from blocksnap.errors import (
    IntegrityError,
    MissingObjectError,
    NotFoundError,
    UnsupportedFormatError,
    UsageError,
)
from blocksnap.store import frames
from blocksnap.store.backend import ObjectStore

CONFIG_NAME = "config"
REPOSITORY_FORMAT = "blocksnap-repository"
REPOSITORY_VERSION = 2  # the format this blocksnap writes, and the highest it reads
# The first release that reads each format this blocksnap knows.
FORMAT_RELEASES = {2: "0.2.0"}
# The names this blocksnap understands in features and write_features.
KNOWN_FEATURES: frozenset[str] = frozenset()
KNOWN_WRITE_FEATURES: frozenset[str] = frozenset()
MAGIC = b"BSCONF"
FRAME_VERSION = 1
HEADER_SIZE = frames.HEADER_SIZE

DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_PACK_TARGET_SIZE = 16 << 20
CHANGE_FILTERS = ("xxh3-128",)
COMPRESSIONS = ("zstd",)
ENCRYPTIONS = ("none",)


@dataclass(frozen=True, slots=True)
class Compatibility:
    """What a reader and a writer must know to use the repository."""

    version: int
    min_reader_version: int
    min_reader_release: str
    min_writer_release: str
    features: tuple[str, ...]
    write_features: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Identity:
    """Which repository this is: never shared, not even by a replica."""

    id: str
    created: str


@dataclass(frozen=True, slots=True)
class ContentParameters:
    """What decides block ids and stored bytes: a replica shares all of it to dedup."""

    id: str
    block_id: str
    change_filter: str
    filter_seed: int
    compression: str


@dataclass(frozen=True, slots=True)
class WriterTuning:
    """How writers write: changing it changes no id, so readers never need it."""

    compression_level: int
    pack_target_size: int


@dataclass(frozen=True, slots=True)
class RepositoryConfig:
    """The decoded config.  The flat properties are what the rest of blocksnap reads."""

    compatibility: Compatibility
    identity: Identity
    content: ContentParameters
    writer: WriterTuning
    encryption: str

    @property
    def version(self) -> int:
        return self.compatibility.version

    @property
    def id(self) -> str:
        return self.identity.id

    @property
    def created(self) -> str:
        return self.identity.created

    @property
    def content_id(self) -> str:
        return self.content.id

    @property
    def block_id(self) -> str:
        return self.content.block_id

    @property
    def change_filter(self) -> str:
        return self.content.change_filter

    @property
    def filter_seed(self) -> int:
        return self.content.filter_seed

    @property
    def compression(self) -> str:
        return self.content.compression

    @property
    def compression_level(self) -> int:
        return self.writer.compression_level

    @property
    def pack_target_size(self) -> int:
        return self.writer.pack_target_size

    def algorithms(self) -> dict[str, str]:
        return {
            "block_id": self.block_id,
            "change_filter": self.change_filter,
            "compression": self.compression,
        }

    def check_writable(self, where: str) -> None:
        """Raise UnsupportedFormatError unless this blocksnap may write the repository."""
        unknown = sorted(set(self.compatibility.write_features) - KNOWN_WRITE_FEATURES)
        if unknown:
            raise UnsupportedFormatError(
                f"repository {where} needs blocksnap >= "
                f"{self.compatibility.min_writer_release} to be written (write features "
                f"unknown here: {', '.join(unknown)}); reading commands still work"
            )


def new_config(
    *,
    block_id: str = blockid.DEFAULT_ALGORITHM,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    pack_target_size: int = DEFAULT_PACK_TARGET_SIZE,
) -> RepositoryConfig:
    """A config for a new repository: fresh identity, fresh content parameters."""
    blockid.hasher(block_id)
    if not 1 <= compression_level <= 19:
        raise UsageError(f"compression level {compression_level} is not in 1..19")
    if pack_target_size < 1:
        raise UsageError(f"pack target size {pack_target_size} is not positive")
    release = FORMAT_RELEASES[REPOSITORY_VERSION]
    return RepositoryConfig(
        compatibility=Compatibility(
            version=REPOSITORY_VERSION,
            min_reader_version=REPOSITORY_VERSION,
            min_reader_release=release,
            min_writer_release=release,
            features=(),
            write_features=(),
        ),
        identity=Identity(
            id=secrets.token_hex(16),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        ),
        content=ContentParameters(
            id=secrets.token_hex(16),
            block_id=block_id,
            change_filter=CHANGE_FILTERS[0],
            filter_seed=secrets.randbits(64),
            compression=COMPRESSIONS[0],
        ),
        writer=WriterTuning(compression_level=compression_level, pack_target_size=pack_target_size),
        encryption=ENCRYPTIONS[0],
    )


def encode(config: RepositoryConfig) -> bytes:
    """The framed object: the same config always gives the same bytes."""
    c = config.compatibility
    doc = {
        "format": REPOSITORY_FORMAT,
        "version": c.version,
        "min_reader_version": c.min_reader_version,
        "min_reader_release": c.min_reader_release,
        "min_writer_release": c.min_writer_release,
        "features": list(c.features),
        "write_features": list(c.write_features),
        "repository": {"id": config.id, "created": config.created},
        "content": {
            "id": config.content.id,
            "block_id": config.block_id,
            "change_filter": config.change_filter,
            "filter_seed": config.filter_seed,
            "compression": config.compression,
        },
        "writer": {
            "compression_level": config.compression_level,
            "pack_target_size": config.pack_target_size,
        },
        "encryption": config.encryption,
    }
    return frame(json.dumps(doc, indent=2).encode() + b"\n")


def frame(body: bytes) -> bytes:
    return frames.frame(MAGIC, FRAME_VERSION, body)


def read_config(backend: ObjectStore, where: str) -> RepositoryConfig:
    """The repository's config, read through the seam; where names it in messages."""
    try:
        data = backend.get(CONFIG_NAME)
    except MissingObjectError:
        raise NotFoundError(f"{where} is not a blocksnap repository (no config)") from None
    return decode(data, where)


def decode(data: bytes, where: str) -> RepositoryConfig:
    """The config in data, checked: IntegrityError if damaged, UnsupportedFormatError if
    this blocksnap cannot read it, NotFoundError if it is not a blocksnap config."""
    raw = _unframe(data, where)
    if raw.get("format") != REPOSITORY_FORMAT:
        raise NotFoundError(f"{where} is not a blocksnap repository")
    body = _Body(raw, where)
    compatibility = _compatibility(body, where)
    repository = body.section("repository")
    content = body.section("content")
    writer = body.section("writer")
    config = RepositoryConfig(
        compatibility=compatibility,
        identity=Identity(id=repository.hex_id("id"), created=repository.text("created")),
        content=ContentParameters(
            id=content.hex_id("id"),
            block_id=content.text("block_id"),
            change_filter=content.text("change_filter"),
            filter_seed=content.integer("filter_seed", 0, (1 << 64) - 1),
            compression=content.text("compression"),
        ),
        writer=WriterTuning(
            compression_level=writer.integer("compression_level", 1, 19),
            pack_target_size=writer.integer("pack_target_size", 1, 1 << 40),
        ),
        encryption=body.text("encryption"),
    )
    _check_implemented(config, where)
    return config


def _unframe(data: bytes, where: str) -> dict[str, Any]:
    if not data.startswith(MAGIC):
        _refuse_format_1(data, where)
        raise IntegrityError(f"config of {where} is damaged (no {MAGIC.decode()} magic)")
    frame_version, body = frames.unframe(data, MAGIC, f"config of {where}")
    if frame_version != FRAME_VERSION:
        raise UnsupportedFormatError(
            f"repository {where} needs a newer blocksnap (config frame version "
            f"{frame_version}; this one reads {FRAME_VERSION})"
        )
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"config of {where} is malformed (not JSON)") from exc
    if not isinstance(raw, dict):
        raise IntegrityError(f"config of {where} is malformed (not a JSON object)")
    return raw


def _refuse_format_1(data: bytes, where: str) -> None:
    """Raise the refusal of a format 1 config (unframed JSON); return if data is not one."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return
    if isinstance(raw, dict) and raw.get("format") == REPOSITORY_FORMAT:
        raise UnsupportedFormatError(
            f"repository {where} is format {raw.get('version')}, which this blocksnap no "
            f"longer reads: re-create it with blocksnap init and take new snapshots"
        )
    raise NotFoundError(f"{where} is not a blocksnap repository")


def _compatibility(body: _Body, where: str) -> Compatibility:
    """The compatibility fields, the reader's checked before anything else: a newer format
    may change every other field, and must only keep version, min_reader_version,
    min_reader_release and features."""
    version = body.integer("version", 2, 1 << 16)
    min_reader_version = body.integer("min_reader_version", 2, 1 << 16)
    min_reader_release = body.text("min_reader_release")
    if min_reader_version > REPOSITORY_VERSION:
        raise UnsupportedFormatError(
            f"repository {where} needs blocksnap >= {min_reader_release} (it is format "
            f"{min_reader_version}; this blocksnap reads format {REPOSITORY_VERSION})"
        )
    features = body.names("features")
    unknown = sorted(set(features) - KNOWN_FEATURES)
    if unknown:
        raise UnsupportedFormatError(
            f"repository {where} needs blocksnap >= {min_reader_release} (features "
            f"unknown here: {', '.join(unknown)})"
        )
    return Compatibility(
        version=version,
        min_reader_version=min_reader_version,
        min_reader_release=min_reader_release,
        min_writer_release=body.text("min_writer_release"),
        features=features,
        write_features=body.names("write_features"),
    )


def _check_implemented(config: RepositoryConfig, where: str) -> None:
    """Refuse content parameters this blocksnap does not implement, as a newer format."""
    known = {
        "block ID algorithm": (config.block_id, tuple(blockid.ALGORITHMS)),
        "change filter": (config.change_filter, CHANGE_FILTERS),
        "compression": (config.compression, COMPRESSIONS),
        "encryption": (config.encryption, ENCRYPTIONS),
    }
    for what, (value, values) in known.items():
        if value not in values:
            raise UnsupportedFormatError(
                f"repository {where} needs blocksnap >= "
                f"{config.compatibility.min_reader_release} ({what} {value!r} unknown here)"
            )


class _Body:
    """One JSON object of the body, read field by field: a missing field or one of the
    wrong type is IntegrityError (the frame was intact, so its writer was wrong)."""

    def __init__(self, raw: dict[str, Any], where: str, path: str = "") -> None:
        self.raw = raw
        self.where = where
        self.path = path

    def _get(self, key: str) -> Any:
        if key not in self.raw:
            self._malformed(key, "missing")
        return self.raw[key]

    def _malformed(self, key: str, why: str) -> NoReturn:
        raise IntegrityError(f"config of {self.where} is malformed ({self.path}{key} {why})")

    def section(self, key: str) -> _Body:
        value = self._get(key)
        if not isinstance(value, dict):
            self._malformed(key, "is not an object")
        return _Body(value, self.where, f"{self.path}{key}.")

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            self._malformed(key, "is not a string")
        return str(value)

    def hex_id(self, key: str) -> str:
        value = self.text(key)
        if len(value) != 32 or value.strip("0123456789abcdef"):
            self._malformed(key, "is not 32 lowercase hex digits")
        return value

    def integer(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if type(value) is not int or not low <= value <= high:
            self._malformed(key, f"is not an integer in {low}..{high}")
        return int(value)

    def names(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._malformed(key, "is not a list of strings")
        return tuple(value)
