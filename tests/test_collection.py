"""Collection lists and the node children beside them (store/collection.py): their
formats round-trip, and damage is named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocksnap.errors import IntegrityError, MissingObjectError
from blocksnap.store import collection
from blocksnap.store.backend import LocalBackend
from blocksnap.store.entries import Location


def test_a_list_round_trips_with_orphans_and_unfinished_writes(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    ids = [os.urandom(32) for _ in range(3)]
    pack = os.urandom(16)
    lst = collection.CollectionList(
        seq=7,
        state=collection.DONE,
        candidates=ids,
        waiting_for=[os.urandom(16)],
        orphans=[pack],
        unfinished=["packs/ab/" + pack.hex()],
        collected=[(ids[0], pack)],
        deleted_packs=[pack],
        relocated=[(ids[1], pack, Location(os.urandom(16), 40, 100, 200, 1, 1))],
        nodes=True,
    )
    collection.write(backend, lst, new=True)
    assert collection.listed_seqs(backend) == [7]
    assert collection.read(backend, 7) == lst
    assert collection.read(backend, 8) is None


def test_node_children_round_trip_and_damage_is_named(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    children = {os.urandom(32): [os.urandom(32) for _ in range(n)] for n in (0, 1, 256)}
    collection.write_nodes(backend, 3, children)
    assert collection.read_nodes(backend, 3) == children
    # The side object is not a list: the seqs are the lists' alone.
    assert collection.listed_seqs(backend) == []
    with pytest.raises(MissingObjectError):
        collection.read_nodes(backend, 4)
    name = collection.nodes_name(3)
    data = bytearray(backend.get(name))
    data[-5] ^= 0xFF
    backend.put(name, bytes(data))
    with pytest.raises(IntegrityError, match=r"gc/0000000000000003\.nodes"):
        collection.read_nodes(backend, 3)
