"""The index steps that following another host's gc takes (store/gcindex.py) and the
indexing of a pack seen twice (store/objectindex.py), on a real LMDB index."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import blocksnap
from blocksnap.store.entries import DEAD
from blocksnap.store.index import Index
from blocksnap.store.packs import HEADER_SIZE, KIND_BLOCK, KIND_NODE, Record


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    """The index of a new local repository (no pack of it is read here)."""
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        yield repo.store.index


def _record(offset: int, kind: int = KIND_BLOCK, size: int = 100) -> Record:
    return Record(offset, kind, 0, size, size, os.urandom(32), 0)


def _mark(index: Index, pack_id: bytes, object_id: bytes) -> bytes | None:
    """The index's mark on a copy (store/entries.py DEAD): b"" collected, a seq condemned."""
    with index._begin() as txn:
        value = txn.get(DEAD + pack_id + object_id, db=index.meta)
    return None if value is None else bytes(value)


def _counts(index: Index, *ids: bytes) -> list[int | None]:
    with index.copy() as view:
        counts = dict(view.counts())
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


@pytest.mark.parametrize("old_first", [True, False])
def test_a_copy_a_list_under_way_condemns_gives_way_to_any_other(
    index: Index, old_first: bool
) -> None:
    """A list under way condemns an object's copy in a pack that lives on, and a writer
    has stored the object again elsewhere: in whichever order the two packs are indexed,
    the new copy takes the place, so following the list once done leaves it placed."""
    old_pack, new_pack, other_pack = os.urandom(16), os.urandom(16), os.urandom(16)
    block, neighbour = _record(0), _record(200)
    again = Record(0, KIND_BLOCK, 0, 100, 100, block.id, 0)
    index.note_collections([], [], [(3, [(block.id, old_pack)])])
    packs = [(old_pack, [block, neighbour]), (new_pack, [again])]
    for pack_id, records in packs if old_first else packs[::-1]:
        index.add_pack(pack_id, 1000, records)
    assert index.location(block.id).pack == new_pack  # type: ignore[union-attr]
    infos = index.pack_infos()
    assert infos[new_pack]["live"] == HEADER_SIZE + 100
    assert infos[old_pack]["live"] == HEADER_SIZE + 100  # the neighbour only
    # Counted meanwhile (a node indexed): a condemned place still gives way.
    node = _record(0, KIND_NODE)
    index.add_pack(os.urandom(16), 1000, [node], {node.id: [neighbour.id]})
    third = Record(0, KIND_BLOCK, 0, 100, 100, neighbour.id, 0)
    index.note_collections([], [], [(4, [(neighbour.id, old_pack)])])
    index.add_pack(other_pack, 1000, [third])
    assert index.location(neighbour.id).pack == other_pack  # type: ignore[union-attr]
    assert _counts(index, neighbour.id) == [1]
    # The list is done: it collected the block's old copy and not the neighbour's.
    assert not index.forget_copies([(block.id, old_pack)])
    index.acquit(3, [(block.id, old_pack)])
    index.acquit(4, [(neighbour.id, old_pack)])
    assert _mark(index, old_pack, block.id) == b""  # collected, for good
    assert _mark(index, old_pack, neighbour.id) is None  # an ordinary copy again
    assert index.location(block.id).pack == new_pack  # type: ignore[union-attr]
    # The old pack indexed again (a later discovery): the collected copy stays out, the
    # acquitted one is an ordinary duplicate, dead weight at a positive count.
    index.add_pack(old_pack, 1000, [block, neighbour])
    assert index.location(block.id).pack == new_pack  # type: ignore[union-attr]
    assert index.location(neighbour.id).pack == other_pack  # type: ignore[union-attr]


def test_condemned_marks_never_undo_a_collection_or_a_later_list(index: Index) -> None:
    """A collected copy stays collected when a list under way condemns it too, and a
    list done drops only the marks it left, not a later list's."""
    pack = os.urandom(16)
    gone, twice = _record(0), _record(200)
    index.note_collections([(gone.id, pack)], [])
    index.note_collections([], [], [(5, [(gone.id, pack), (twice.id, pack)])])
    index.note_collections([], [], [(6, [(twice.id, pack)])])
    index.acquit(5, [(gone.id, pack), (twice.id, pack)])
    index.add_pack(pack, 1000, [gone, twice])
    assert index.location(gone.id) is None  # collected: never indexed again
    again = Record(0, KIND_BLOCK, 0, 100, 100, twice.id, 0)
    other = os.urandom(16)
    index.add_pack(other, 1000, [again])  # list 6 still condemns the first copy
    assert index.location(twice.id).pack == other  # type: ignore[union-attr]
    index.add_pack(pack, 1000, [gone, twice])  # and it never takes the place back
    assert index.location(twice.id).pack == other  # type: ignore[union-attr]


def test_a_spare_copy_takes_the_place_of_one_collected_or_deleted(index: Index) -> None:
    """A shared store's cache indexed a writer's new copy of an object and then an older
    duplicate, which took the place (both at count 0).  When a list collects or deletes
    the duplicate, the writer's copy takes the place, live bytes and all: its pack must
    never look empty while that writer may still commit."""
    index.keep_spares = True
    new_pack, duplicate, third = os.urandom(16), os.urandom(16), os.urandom(16)
    block = _record(0)
    copy = Record(0, KIND_BLOCK, 0, 100, 100, block.id, 0)
    index.add_pack(new_pack, 1000, [copy])
    index.add_pack(duplicate, 1000, [block])  # last wins at count 0
    assert index.location(block.id).pack == duplicate  # type: ignore[union-attr]
    assert index.pack_infos()[new_pack]["live"] == 0
    # Another host's gc deleted the duplicate's pack, naming the copy collected.
    assert not index.forget_copies([(block.id, duplicate)])
    index.forget_packs([duplicate])
    assert index.location(block.id).pack == new_pack  # type: ignore[union-attr]
    assert index.pack_infos()[new_pack]["live"] == HEADER_SIZE + 100
    assert _counts(index, block.id) == [0]
    # This cache's own gc collects it (a list named the placed copy) once the node above
    # it went: a spare again takes the place.
    index.add_pack(third, 1000, [Record(0, KIND_BLOCK, 0, 100, 100, block.id, 0)])
    node = _record(0, KIND_NODE)
    node_pack = os.urandom(16)
    index.add_pack(node_pack, 1000, [node], {node.id: [block.id]})
    [(key, loc)] = [item for item in index.unreferenced([node.id])]
    assert loc is not None and loc.pack == node_pack
    assert index.collect([(key, [block.id])], limit=1 << 40) == [(node.id, node_pack)]
    assert _counts(index, block.id) == [0]
    [(key, loc)] = index.unreferenced([block.id])
    assert loc is not None
    placed = loc.pack
    assert index.collect([(key, [])], limit=1 << 40) == []  # moved to its spare
    moved = index.location(block.id)
    assert moved is not None and moved.pack in {new_pack, third} - {placed}
    assert index.pack_infos()[moved.pack]["live"] == HEADER_SIZE + 100
    assert index.pack_infos()[placed]["live"] == 0
    # Its last copy collected: it leaves.
    [(key, _loc)] = index.unreferenced([block.id])
    assert index.collect([(key, [])], limit=1 << 40) == [(block.id, moved.pack)]
    assert index.location(block.id) is None


@pytest.mark.parametrize("how", ["forgotten", "marked gone"])
def test_a_spare_in_a_deleted_pack_never_takes_the_place(index: Index, how: str) -> None:
    """A spare in a pack the index forgot, or one a list read just now names deleted
    (marked before the list is applied), never serves."""
    index.keep_spares = True
    first, second = os.urandom(16), os.urandom(16)
    block = _record(0)
    index.add_pack(first, 1000, [block])
    index.add_pack(second, 1000, [Record(0, KIND_BLOCK, 0, 100, 100, block.id, 0)])
    assert index.location(block.id).pack == second  # type: ignore[union-attr]
    if how == "forgotten":
        index.forget_packs([first])  # gone with its copy (named relocated elsewhere)
    else:
        index.note_collections([], [first])
        assert index.pack_infos().get(first) is not None
    assert not index.forget_copies([(block.id, second)])
    assert index.location(block.id) is None


def test_a_local_index_keeps_no_spares(index: Index) -> None:
    first, second = os.urandom(16), os.urandom(16)
    block = _record(0)
    index.add_pack(first, 1000, [block])
    index.add_pack(second, 1000, [Record(0, KIND_BLOCK, 0, 100, 100, block.id, 0)])
    assert not index.forget_copies([(block.id, second)])
    assert index.location(block.id) is None


def test_a_node_moved_to_a_spare_keeps_its_children_counted(index: Index) -> None:
    """A map node placed in a copy another host's gc deletes moves to a spare, one that no
    list under way condemns first; its children stay counted (it is still indexed), so
    nothing drifts from a recount."""
    index.keep_spares = True
    block_pack, condemned, placed, other, root_pack = (os.urandom(16) for _ in range(5))
    block = _record(0)
    index.add_pack(block_pack, 1000, [block])
    node = _record(0, KIND_NODE)

    def copy_of(rec: Record) -> Record:
        return Record(0, rec.kind, 0, 100, 100, rec.id, 0)

    index.note_collections([], [], [(7, [(node.id, condemned)])])
    index.add_pack(condemned, 1000, [copy_of(node)], {node.id: [block.id]})
    index.add_pack(placed, 1000, [copy_of(node)], {node.id: [block.id]})  # takes the place
    root = _record(0, KIND_NODE)
    index.add_pack(root_pack, 1000, [root], {root.id: [node.id]})
    index.add_pack(other, 1000, [copy_of(node)], {node.id: [block.id]})  # dead weight
    assert index.location(node.id).pack == placed  # type: ignore[union-attr]
    assert _counts(index, root.id, node.id, block.id) == [0, 1, 1]
    assert not index.forget_copies([(node.id, placed)], {node.id: [block.id]})
    assert index.location(node.id).pack == other  # type: ignore[union-attr]
    assert _counts(index, root.id, node.id, block.id) == [0, 1, 1]
    infos = index.pack_infos()
    assert infos[other]["live"] == HEADER_SIZE + 100 and infos[placed]["live"] == 0
    # Its last spare is the condemned copy: it serves once the other goes too.
    assert not index.forget_copies([(node.id, other)], {node.id: [block.id]})
    assert index.location(node.id).pack == condemned  # type: ignore[union-attr]
    assert _counts(index, node.id, block.id) == [1, 1]
