"""The index steps that following another host's gc takes (store/gcindex.py) and the
indexing of a pack seen twice (store/objectindex.py), on a real LMDB index."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.store.index import Index
from blocksnap.store.packs import HEADER_SIZE, KIND_BLOCK, KIND_NODE, Record


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    """The index of a new local repository (no pack of it is read here)."""
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        yield repo.store.index


def _record(offset: int, kind: int = KIND_BLOCK, size: int = 100) -> Record:
    return Record(offset, kind, 0, size, size, os.urandom(32), 0)


def _counts(index: Index, *ids: bytes) -> list[int | None]:
    counts = index.view().counts
    return [counts.get(i) for i in ids]


def test_a_pack_indexed_twice_keeps_its_live_bytes_and_takes_its_replacements(
    index: Index,
) -> None:
    """A discovery indexes a writer's pack before the writer does: the writer's own add
    still moves what its replace names, and the pack's live bytes stay right."""
    shared, own = _record(0), _record(200)
    node = _record(0, KIND_NODE)
    old_pack, node_pack, new_pack = os.urandom(16), os.urandom(16), os.urandom(16)
    index.add_pack(old_pack, 1000, [shared])
    index.add_pack(node_pack, 1000, [node], {node.id: [shared.id]})  # shared counted 1
    moved = Record(0, KIND_BLOCK, 0, 100, 100, shared.id, 0)
    index.add_pack(new_pack, 1000, [moved, own])  # the discovery: shared stays put
    assert index.location(shared.id).pack == old_pack  # type: ignore[union-attr]
    live = 2 * (HEADER_SIZE + 100)
    index.add_pack(new_pack, 1000, [moved, own], replace=frozenset({shared.id}))
    assert index.location(shared.id).pack == new_pack  # type: ignore[union-attr]
    assert index.location(own.id).pack == new_pack  # type: ignore[union-attr]
    infos = index.pack_infos()
    assert infos[new_pack]["live"] == live
    assert infos[old_pack]["live"] == 0
    assert _counts(index, shared.id, own.id) == [1, 0]
    index.add_pack(new_pack, 1000, [moved, own])  # a third time: nothing changes
    assert index.pack_infos()[new_pack]["live"] == live


def test_forgetting_a_tree_releases_it_whatever_the_order(index: Index) -> None:
    """A done list names a root, the node under it and a block under that, the child
    before its parent: all go, the block's other reference stays, and nothing is left
    counted without a place."""
    block, other = _record(0), _record(200)
    pack = os.urandom(16)
    node = _record(0, KIND_NODE)
    root = _record(200, KIND_NODE)
    index.add_pack(pack, 1000, [block, other])
    node_pack = os.urandom(16)
    index.add_pack(
        node_pack,
        1000,
        [node, root],
        {node.id: [block.id, other.id], root.id: [node.id]},
    )
    keeper = os.urandom(16)
    keep = _record(0, KIND_NODE)
    index.add_pack(keeper, 1000, [keep], {keep.id: [other.id]})
    assert _counts(index, root.id, node.id, block.id, other.id) == [0, 1, 1, 2]
    children = {root.id: [node.id], node.id: [block.id, other.id]}
    copies = [(block.id, pack), (node.id, node_pack), (root.id, node_pack)]
    counted = index.forget_copies(copies, children)
    assert not counted  # every one fell to 0 and left: no checkpoint needs dropping
    assert index.location(root.id) is None and index.location(node.id) is None
    assert index.location(block.id) is None
    assert _counts(index, root.id, node.id, block.id, other.id) == [None, None, None, 1]


def test_a_copy_still_counted_keeps_its_count_without_a_place(index: Index) -> None:
    block = _record(0)
    pack, node_pack = os.urandom(16), os.urandom(16)
    node = _record(0, KIND_NODE)
    index.add_pack(pack, 1000, [block])
    index.add_pack(node_pack, 1000, [node], {node.id: [block.id]})
    assert index.forget_copies([(block.id, pack)], {}) is True
    assert index.location(block.id) is None
    assert _counts(index, block.id) == [1]


def test_a_pack_named_deleted_is_gone_for_good(index: Index) -> None:
    pack = os.urandom(16)
    index.add_pack(pack, 1000, [_record(0)])
    assert not index.is_gone(pack)
    index.forget_packs([pack])
    assert index.is_gone(pack) and not index.has_pack(pack)
    assert not index.is_gone(os.urandom(16))


def test_copies_and_packs_a_list_named_are_never_indexed_again(index: Index) -> None:
    """An object stored twice, its first copy collected in a pack that lives on: indexed
    again in any order (a rebuild, a discovery, a second add racing a follow), only the
    live copy is placed."""
    block, other = _record(0), _record(200)
    dead_pack, live_pack, gone_pack = os.urandom(16), os.urandom(16), os.urandom(16)
    again = Record(0, KIND_BLOCK, 0, 100, 100, block.id, 0)
    index.note_collections([(block.id, dead_pack)], [gone_pack])
    index.add_pack(live_pack, 1000, [again])
    index.add_pack(dead_pack, 1000, [block, other])  # last: its copy would replace
    assert index.location(block.id).pack == live_pack  # type: ignore[union-attr]
    assert index.location(other.id).pack == dead_pack  # type: ignore[union-attr]
    assert index.add_pack(gone_pack, 1000, [_record(0)]) == []
    assert not index.has_pack(gone_pack)
    # Once the pack itself is named deleted, its copies' marks give way to the pack's.
    index.forget_packs([dead_pack])
    assert index.is_gone(dead_pack)
    assert index.add_pack(dead_pack, 1000, [block, other]) == []


def test_a_pack_added_again_after_its_copy_was_marked_keeps_its_live_bytes(
    index: Index,
) -> None:
    block, other = _record(0), _record(200)
    pack = os.urandom(16)
    index.add_pack(pack, 1000, [block, other])
    live = index.pack_infos()[pack]["live"]
    index.note_collections([(block.id, pack)], [])  # a sync, before it follows the list
    index.add_pack(pack, 1000, [block, other])  # a racing discovery of the same pack
    assert index.pack_infos()[pack]["live"] == live
    index.forget_copies([(block.id, pack)], {})
    assert index.pack_infos()[pack]["live"] == live - (HEADER_SIZE + 100)


def test_a_node_naming_a_copy_left_out_is_left_out_too(index: Index) -> None:
    """A pack holds a node and the only copy of its child, which a list named collected:
    neither is indexed, and indexing the pack does not fail."""
    child, node, kept = _record(0), _record(200, KIND_NODE), _record(400)
    pack = os.urandom(16)
    index.note_collections([(child.id, pack)], [])
    index.add_pack(pack, 1000, [child, node, kept], {node.id: [child.id]})
    assert index.location(child.id) is None and index.location(node.id) is None
    assert index.location(kept.id).pack == pack  # type: ignore[union-attr]
