"""Block maps: each snapshot's block index -> content table, as a tree of shared nodes.

A snapshot's map is complete by itself (no chain to replay), so opening the 60th snapshot
of a volume costs what opening the 1st does; yet an incremental writes only the nodes
whose content changed, because nodes are content-addressed and stored once.

Node format (this module owns it).  Nodes are stored as pack records of kind 2 under
the repository's block ID of their bytes; integers little-endian:

    0   4   magic b"BSMN"
    4   1   version 1
    5   1   level: 0 = leaf, n > 0 = interior
    6   2   reserved, 0
    8   4   count: entries in this node
    12  ..  leaf: count XXH3-128 filter digests (16 bytes each), then count block IDs
            (32 bytes each); an all-zero digest and ID mean an all-zero block
            interior: count child node IDs (32 bytes each)

Compatibility: readers accept version 1 only and refuse any other as damage ("not a
block map node"); reserved is written 0 and not read.  Any change to this layout bumps
the version, and with it the repository format.
tests/test_records.py holds golden bytes of a leaf and an interior node.

Shape: a leaf covers LEAF_SPAN consecutive blocks; an interior node has up to FANOUT
children.  For B blocks there are max(1, ceil(B / LEAF_SPAN)) leaves, and every level is
filled from the left, so the path to block i follows from i alone.  The root's level is
the smallest L with LEAF_SPAN * FANOUT**L >= B; height = L + 1.  Digests and IDs are kept
in two runs so that a range of parent digests, which the native scanner compares against,
is one slice.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable

from blocksnap.errors import IntegrityError
from blocksnap.model import BLOCK_ID_SIZE, FILTER_DIGEST_SIZE

LEAF_SPAN = 256
FANOUT = 256
NODE_MAGIC = b"BSMN"
NODE_VERSION = 1
_HEAD = struct.Struct("<4sBBHI")
MAX_NODE_SIZE = _HEAD.size + LEAF_SPAN * (FILTER_DIGEST_SIZE + BLOCK_ID_SIZE)
ZERO_DIGEST = bytes(FILTER_DIGEST_SIZE)
ZERO_ID = bytes(BLOCK_ID_SIZE)


def root_level(block_count: int) -> int:
    level = 0
    while LEAF_SPAN * FANOUT**level < block_count:
        level += 1
    return level


def nodes_at_level(block_count: int, level: int) -> int:
    count = max(1, -(-block_count // LEAF_SPAN))
    for _ in range(level):
        count = -(-count // FANOUT)
    return count


def encode_leaf(digests: bytes | bytearray, ids: bytes | bytearray) -> bytes:
    count = len(digests) // FILTER_DIGEST_SIZE
    return _HEAD.pack(NODE_MAGIC, NODE_VERSION, 0, 0, count) + bytes(digests) + bytes(ids)


def encode_interior(level: int, children: list[bytes]) -> bytes:
    return _HEAD.pack(NODE_MAGIC, NODE_VERSION, level, 0, len(children)) + b"".join(children)


def node_children(raw: bytes) -> list[bytes]:
    """The ids a node's entries name, one per entry (zero blocks left out): what the node
    holds references to."""
    if len(raw) < _HEAD.size:
        raise IntegrityError("block map node is truncated")
    magic, version, level, _reserved, count = _HEAD.unpack_from(raw)
    if magic != NODE_MAGIC or version != NODE_VERSION:
        raise IntegrityError("not a block map node")
    if level == 0:
        start = _HEAD.size + count * FILTER_DIGEST_SIZE
        size = FILTER_DIGEST_SIZE + BLOCK_ID_SIZE
    else:
        start = _HEAD.size
        size = BLOCK_ID_SIZE
    if len(raw) != _HEAD.size + count * size:
        raise IntegrityError(f"block map node holds {len(raw)} bytes for {count} entries")
    ids = [raw[i : i + BLOCK_ID_SIZE] for i in range(start, len(raw), BLOCK_ID_SIZE)]
    return [i for i in ids if i != ZERO_ID] if level == 0 else ids


class MapBuilder:
    """Builds a map from leaves given in order; put_node stores a node and returns its id."""

    def __init__(self, put_node: Callable[[bytes], bytes]) -> None:
        self._put = put_node
        self._levels: list[list[bytes]] = [[]]

    def add_leaf(self, digests: bytes | bytearray, ids: bytes | bytearray) -> None:
        self._push(0, self._put(encode_leaf(digests, ids)))

    def add_leaf_id(self, node_id: bytes) -> None:
        """Add a leaf that is stored already (taken whole from another map)."""
        self._push(0, node_id)

    def close_copy(
        self, block_count: int, digests: bytes | bytearray, ids: bytes | bytearray
    ) -> tuple[bytes, int]:
        """(root, height) of the map so far plus a last partial leaf, leaving this builder
        as it was: a checkpoint's map, while the real one goes on growing."""
        saved = [list(level) for level in self._levels]
        try:
            if digests:
                self.add_leaf(digests, ids)
            return self.finish(block_count)
        finally:
            self._levels = saved

    def _push(self, level: int, node_id: bytes) -> None:
        if len(self._levels) <= level:
            self._levels.append([])
        self._levels[level].append(node_id)
        if len(self._levels[level]) == FANOUT:
            children, self._levels[level] = self._levels[level], []
            self._push(level + 1, self._put(encode_interior(level + 1, children)))

    def finish(self, block_count: int) -> tuple[bytes, int]:
        """Close the tree for block_count blocks; return (root id, height)."""
        top = root_level(block_count)
        if block_count == 0:
            self.add_leaf(b"", b"")
        for level in range(top):
            if len(self._levels) > level and self._levels[level]:
                children, self._levels[level] = self._levels[level], []
                self._push(level + 1, self._put(encode_interior(level + 1, children)))
        roots = self._levels[top] if len(self._levels) > top else []
        if len(roots) != 1 or any(self._levels[:top]):
            raise IntegrityError(f"block map does not close for {block_count} blocks")
        return roots[0], top + 1


class BlockMap:
    """Read access to one snapshot's map, with a small LRU cache of decoded nodes."""

    def __init__(
        self,
        load_node: Callable[[bytes], bytes],
        root: bytes,
        height: int,
        block_count: int,
        cache_nodes: int = 256,
    ) -> None:
        if height != root_level(block_count) + 1:
            raise IntegrityError(f"block map height {height} does not fit {block_count} blocks")
        self._load = load_node
        self.root = root
        self.height = height
        self.block_count = block_count
        self._cache: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()
        self._cache_nodes = cache_nodes
        self.nodes_loaded = 0

    def _shape(self, level: int, index: int) -> tuple[int, int]:
        """(entry count, entry size) that the node at (level, index) must have."""
        if level == 0:
            count = max(0, min(LEAF_SPAN, self.block_count - index * LEAF_SPAN))
            return count, FILTER_DIGEST_SIZE + BLOCK_ID_SIZE
        below = nodes_at_level(self.block_count, level - 1)
        return min(FANOUT, below - index * FANOUT), BLOCK_ID_SIZE

    def _node(self, node_id: bytes, level: int, index: int) -> bytes:
        """The entry bytes of the node at (level, index), validated against the shape."""
        expected, size = self._shape(level, index)
        what = f"block map node {node_id.hex()}"
        hit = self._cache.get(node_id)
        if hit is not None:
            self._cache.move_to_end(node_id)
            body = hit[1]
            if hit[0] != level or len(body) != expected * size:
                raise IntegrityError(f"{what}: does not fit level {level} position {index}")
            return body
        raw = self._load(node_id)
        self.nodes_loaded += 1
        if len(raw) < _HEAD.size:
            raise IntegrityError(f"{what}: truncated")
        magic, version, node_level, _reserved, count = _HEAD.unpack_from(raw)
        if magic != NODE_MAGIC or version != NODE_VERSION or node_level != level:
            raise IntegrityError(f"{what}: not a level-{level} map node")
        if count != expected or len(raw) != _HEAD.size + count * size:
            raise IntegrityError(f"{what}: holds {count} entries where {expected} belong")
        body = raw[_HEAD.size :]
        self._cache[node_id] = (level, body)
        if len(self._cache) > self._cache_nodes:
            self._cache.popitem(last=False)
        return body

    def leaf_count(self) -> int:
        return nodes_at_level(self.block_count, 0)

    def leaf_size(self, leaf_index: int) -> int:
        """Entries in one leaf: LEAF_SPAN, or fewer for the last."""
        return min(LEAF_SPAN, self.block_count - leaf_index * LEAF_SPAN)

    def leaf_id(self, leaf_index: int) -> bytes:
        """The node id of one leaf, read from the interior nodes above it."""
        if not 0 <= leaf_index < self.leaf_count():
            raise IndexError(leaf_index)
        node_id = self.root
        level = self.height - 1
        while level > 0:
            span = FANOUT ** (level - 1)  # leaves under each child at this level
            index = leaf_index // (span * FANOUT)
            body = self._node(node_id, level, index)
            child = (leaf_index // span) % FANOUT
            node_id = body[child * BLOCK_ID_SIZE : (child + 1) * BLOCK_ID_SIZE]
            level -= 1
        return node_id

    def leaf(self, leaf_index: int) -> tuple[bytes, bytes]:
        """(digests, ids) of one leaf: LEAF_SPAN entries or fewer for the last leaf."""
        body = self._node(self.leaf_id(leaf_index), 0, leaf_index)
        count = len(body) // (FILTER_DIGEST_SIZE + BLOCK_ID_SIZE)
        split = count * FILTER_DIGEST_SIZE
        return body[:split], body[split:]

    def entry(self, block_index: int) -> tuple[bytes, bytes]:
        """(filter digest, block id) of one block; both all-zero for a zero block."""
        if not 0 <= block_index < self.block_count:
            raise IndexError(block_index)
        digests, ids = self.leaf(block_index // LEAF_SPAN)
        i = block_index % LEAF_SPAN
        return (
            digests[i * FILTER_DIGEST_SIZE : (i + 1) * FILTER_DIGEST_SIZE],
            ids[i * BLOCK_ID_SIZE : (i + 1) * BLOCK_ID_SIZE],
        )

    def entries(self, start: int, count: int) -> tuple[bytes, bytes]:
        """(digests, ids) for blocks start..start+count, zero-filled past the map's end."""
        digests, ids = bytearray(), bytearray()
        block = start
        end = start + count
        while block < min(end, self.block_count):
            leaf_digests, leaf_ids = self.leaf(block // LEAF_SPAN)
            lo = block % LEAF_SPAN
            hi = min(len(leaf_digests) // FILTER_DIGEST_SIZE, lo + end - block)
            digests += leaf_digests[lo * FILTER_DIGEST_SIZE : hi * FILTER_DIGEST_SIZE]
            ids += leaf_ids[lo * BLOCK_ID_SIZE : hi * BLOCK_ID_SIZE]
            block += hi - lo
        missing = end - max(block, start)
        digests += bytes(missing * FILTER_DIGEST_SIZE)
        ids += bytes(missing * BLOCK_ID_SIZE)
        return bytes(digests), bytes(ids)

    def leaf_ids(self) -> list[bytes]:
        """The ids of every leaf, in order, read from the interior nodes alone."""
        level_ids = [self.root]
        for level in range(self.height - 1, 0, -1):
            below: list[bytes] = []
            for index, node_id in enumerate(level_ids):
                body = self._node(node_id, level, index)
                below.extend(
                    body[i : i + BLOCK_ID_SIZE] for i in range(0, len(body), BLOCK_ID_SIZE)
                )
            level_ids = below
        return level_ids


def diff(a: BlockMap, b: BlockMap) -> list[tuple[int, int]]:
    """The block ranges (first, count) whose content differs between two maps.

    Leaves with the same id are equal without being read, so the cost follows the change;
    blocks present in only one map (the image grew or shrank) count as different.
    """
    ids_a, ids_b = a.leaf_ids(), b.leaf_ids()
    ranges: list[tuple[int, int]] = []

    def add(first: int, count: int) -> None:
        if ranges and ranges[-1][0] + ranges[-1][1] == first:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + count)
        elif count:
            ranges.append((first, count))

    common = min(a.block_count, b.block_count)
    for leaf in range(-(-common // LEAF_SPAN)):
        if ids_a[leaf] == ids_b[leaf]:  # same content-addressed leaf: same entries
            continue
        _, entries_a = a.leaf(leaf)
        _, entries_b = b.leaf(leaf)
        first = leaf * LEAF_SPAN
        for i in range(min(LEAF_SPAN, common - first)):
            cell = slice(i * BLOCK_ID_SIZE, (i + 1) * BLOCK_ID_SIZE)
            if entries_a[cell] != entries_b[cell]:
                add(first + i, 1)
    add(common, max(a.block_count, b.block_count) - common)
    return ranges
