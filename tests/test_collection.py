"""Collection lists and the node children beside them (store/collection.py): their
formats round-trip, each state is an object of its own that no late write replaces, the
format before is still read, and damage is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blocksnap.errors import (
    IntegrityError,
    MissingObjectError,
    ObjectExistsError,
    UnsupportedFormatError,
)
from blocksnap.store import collection, frames
from blocksnap.store.backend import LocalBackend
from blocksnap.store.entries import Location


def _done_list(seq: int) -> collection.CollectionList:
    ids = [os.urandom(32) for _ in range(3)]
    pack = os.urandom(16)
    return collection.CollectionList(
        seq=seq,
        state=collection.DONE,
        candidates=ids,
        waiting_for=[os.urandom(16)],
        orphans=[pack],
        unfinished=["packs/ab/" + pack.hex()],
        collected=[(ids[0], pack)],
        deleted_packs=[pack],
        relocated=[(ids[1], pack, Location(os.urandom(16), 40, 100, 200, 1, 1))],
        nodes=f"{collection.list_name(seq)}.{os.urandom(8).hex()}.nodes",
    )


def test_a_list_round_trips_with_orphans_and_unfinished_writes(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    lst = _done_list(7)
    collection.publish(backend, lst)
    assert collection.listed_seqs(backend) == [7]
    assert collection.read(backend, 7) == lst
    assert collection.read(backend, 8) is None


def test_each_state_is_created_once_and_the_furthest_is_read(tmp_path: Path) -> None:
    """A list advances through objects of its own, each created create-if-absent: the
    second gc to arm or finish a list gets the first one's, and a late arm never takes
    a done list back."""
    backend = LocalBackend(str(tmp_path))
    published = collection.CollectionList(seq=3, candidates=[os.urandom(32)])
    collection.publish(backend, published)
    with pytest.raises(ObjectExistsError):
        collection.publish(backend, collection.CollectionList(seq=3))
    assert collection.read(backend, 3) == published
    first = collection.CollectionList(
        seq=3, state=collection.ARMED, candidates=published.candidates, waiting_for=[b"a" * 16]
    )
    assert collection.advance(backend, first) is first
    late = collection.CollectionList(
        seq=3, state=collection.ARMED, candidates=published.candidates, waiting_for=[b"b" * 16]
    )
    assert collection.advance(backend, late) == first  # the first one's, as stored
    done = collection.CollectionList(
        seq=3, state=collection.DONE, candidates=published.candidates, collected=[]
    )
    assert collection.advance(backend, done) is done
    assert collection.advance(backend, late) == done  # a late arm: the list stays done
    assert collection.advance(backend, _done_list(3)) == done  # a late done: the first
    assert collection.read(backend, 3) == done
    assert collection.listed(backend) == {3: "gc/0000000000000003.done"}
    assert collection.listed(backend, after=3) == {}
    with pytest.raises(ValueError):
        collection.advance(backend, collection.CollectionList(seq=3))


def test_an_object_that_holds_another_state_or_list_is_damage(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    armed = collection.CollectionList(seq=4, state=collection.ARMED)
    backend.put("gc/0000000000000004.done", armed.encode())
    with pytest.raises(IntegrityError, match=r"gc/0000000000000004\.done is damaged"):
        collection.read(backend, 4)
    backend.put("gc/0000000000000005", armed.encode())  # list 4, under 5's name
    with pytest.raises(IntegrityError, match=r"gc/0000000000000005 is damaged"):
        collection.read(backend, 5)
    bad = _done_list(6)
    bad.nodes = "snapshots/elsewhere"
    backend.put("gc/0000000000000006", bad.encode())
    with pytest.raises(IntegrityError, match=r"gc/0000000000000006 is damaged"):
        collection.read(backend, 6)


def _format_1(lst: collection.CollectionList, nodes: bool) -> bytes:
    body = json.loads(frames.unframe(lst.encode(), collection.MAGIC, "list")[1])
    body["format"] = 1
    body["nodes"] = nodes
    return frames.frame(collection.MAGIC, 1, json.dumps(body).encode())


def test_a_list_of_format_1_is_read_and_advanced(tmp_path: Path) -> None:
    """A list of format 1 was replaced in place (its state in the body, its nodes in
    gc/<seq>.nodes); one under way advances through the objects of format 2."""
    backend = LocalBackend(str(tmp_path))
    old = _done_list(2)
    backend.put(collection.list_name(2), _format_1(old, nodes=True))
    read = collection.read(backend, 2)
    assert read is not None and read.state == collection.DONE
    assert read.nodes == "gc/0000000000000002.nodes" and read.collected == old.collected
    armed = collection.CollectionList(seq=9, state=collection.ARMED, candidates=[b"c" * 32])
    backend.put(collection.list_name(9), _format_1(armed, nodes=False))
    read = collection.read(backend, 9)
    assert read is not None and read.state == collection.ARMED and read.nodes is None
    read.state = collection.DONE
    assert collection.advance(backend, read) is read
    assert collection.listed(backend) == {2: "gc/0000000000000002", 9: "gc/0000000000000009.done"}


def test_a_list_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    body = json.loads(frames.unframe(_done_list(1).encode(), collection.MAGIC, "list")[1])
    backend.put(
        collection.list_name(1), frames.frame(collection.MAGIC, 3, json.dumps(body).encode())
    )
    with pytest.raises(UnsupportedFormatError, match="needs a newer blocksnap"):
        collection.read(backend, 1)


def test_node_children_round_trip_and_damage_is_named(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path))
    children = {os.urandom(32): [os.urandom(32) for _ in range(n)] for n in (0, 1, 256)}
    name = collection.write_nodes(backend, 3, children)
    assert name.startswith("gc/0000000000000003.") and name.endswith(".nodes")
    assert collection.read_nodes(backend, name) == children
    # Each write has a name of its own: a late one never replaces what a list names.
    assert collection.write_nodes(backend, 3, {}) != name
    assert collection.read_nodes(backend, name) == children
    # The side objects are not lists: the seqs are the lists' alone.
    assert collection.listed_seqs(backend) == []
    with pytest.raises(MissingObjectError):
        collection.read_nodes(backend, collection.nodes_name(4))
    data = bytearray(backend.get(name))
    data[-5] ^= 0xFF
    backend.put(name, bytes(data))
    with pytest.raises(IntegrityError, match=r"gc/0000000000000003\.[0-9a-f]{16}\.nodes"):
        collection.read_nodes(backend, name)
