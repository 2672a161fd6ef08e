"""Collection lists: how gc on a store that hosts share publishes what it will delete, and
what it deleted, so that no host's writer refers to a deleted object.

Each host's cache counts references only from what it knows, and its writers only
register in its own index; gc on one host cannot see another host's writers through its
registry.  So on a shared store (S3) gc deletes in two phases, each a list object written
by the holder of the maintenance lease (store/objectlocks.py):

1. pending: gc/<seq> names the candidates, objects at count 0 in the collecting cache,
   and the copies (object, pack) where that cache places them (condemned).  From the
   moment it exists, every writer that starts (and syncs) treats the candidates as
   absent: it stores its own copy instead of referring to them, and resuming a
   checkpoint is refused.
2. armed: right after publishing, the sessions then alive (every writer that may have
   referred to a candidate before it could see the list) are listed into it.
3. done: once none of those sessions is alive, gc syncs the catalog (their snapshots now
   count), writes into the list the copies (object id, pack) of the candidates still at
   count 0 and placed where the list condemned them (or nowhere: one placed in another
   copy since, a pack it discovered or relocated into, may be a writer's that started
   after the list), and then deletes them from its index.  Every cache that syncs removes those
   copies from its index.

Packs in which the index then places nothing are named in a done list of their own
before they are deleted, with every copy they hold: collected, or relocated to where
the object lives on (two writers stored the same object).  A cache that placed a copy
there forgets it or moves it, live bytes and all.

A full reconciliation (gc --full) also reclaims what writers that never came back left
in storage: the packs no cache of theirs indexed for a snapshot (orphans: listed under
packs/, and unknown to the collecting cache after its sync) and the unfinished writes
(incomplete uploads) beside other names.  Both go into a list's orphans and unfinished
with the orphans' records among the candidates, so they wait like any candidate: a
writer alive at arming may be writing them and commit a snapshot that names them.  Once
it has gone, the sync indexes every pack a committed snapshot uses, so an orphan still
unknown is garbage (unless a writer of the collecting cache is writing it, or a record
stood unindexed at that sync: then it stays, for a later reconciliation).  The same list,
as it becomes done, names the orphan deleted with its copies, collected or relocated as
for an empty pack, so that its records are avoided until every cache forgets them; then
the orphan is deleted and the unfinished writes are discarded.

A cache remembers the packs done lists named deleted and the copies they named collected
(marks in its index), and never indexes them again: a gc killed before its deletes
leaves such packs in storage (gc --full deletes them), and a collected copy stays in a
pack that lives on.  Were such a copy indexed again (a sync that discovers packs, a
rebuild), it could take the place of the object's live copy stored since, which
following the list would then take away; so a sync marks the lists it has not applied
before it indexes any pack, and applies them after, and a rebuild marks every list.

A list under way matters to a cache that indexes packs too: it may meet both a condemned
copy and the copy a writer stored since, and must place the object in the latter, or
following the list once done would take its place away.  So the condemned copies are
marked as well (weak: placed only where no other copy is, and replaced by any other
copy whatever its count), each time after the listing that named the packs to index
and before the first is indexed; the marks of the copies a done list did not collect are
dropped as it is followed.

A cache may still place an object in another copy than the writer's that will need it
(an older duplicate, listed last).  So a cache of a shared store also remembers the
copies it does not place (spares, in its index): when a list collects or deletes the
placed copy, a spare takes the place, live bytes and all, and the object stays at
count 0 for a later list to condemn there.  No pack that holds the only copy a writer
of another host stored looks empty to any cache, so none is deleted under its commit.
The collecting cache does the same: a candidate with another copy is not dropped but
moves there.

A cache that forgets a map node at count 0 releases what the node names, as its own gc
would, so that its counts stay exact.  The node may be gone with its pack by then, so a
done list that names collected map nodes has their children in an object beside it
(gc/<seq>.<token>.nodes, see below), written before the list is done; a cache reads it
when it forgets one of them.

A writer that a list made wait stays safe while it runs; one that started after it never
refers to a candidate; and a snapshot that a waited-for writer committed is counted
before anything is deleted (a record the sync could not count, its packs unread, stops
the list).  A writer whose heartbeats were ever half the session ttl apart refuses to
commit, since gc elsewhere may have found it dead meanwhile and stopped waiting.

A gc's write can land late: held by a retry, a proxy or a busy server until after its
gc lost the maintenance lease and another host's gc took over.  So no list object is
ever overwritten: every state of a list is an object of its own, created
create-if-absent.  Of two gcs that advance a list, the first write to land wins: the
other gc stops if it lost the lease, else goes by what it finds (an armed list's
waiting_for, a done list's copies and packs, which it carries out), which the lost
holder computed while it held the lease.  And each gc run first takes the next seq with
an empty done list (a fence): a list the lost holder publishes late was numbered before
the fence, so it finds its seq taken, and one that landed before the fence is read by
the new holder like any list, before it reads or writes any.

A cache never moves the seq up to which it follows the lists past a gap in the seqs it
listed: a paged listing may miss a list that lands between its pages.

Format 2:
- gc/<seq>, seq 16 decimal digits from 1, one more than the highest existing: the list
  as published, "pending" (or "done" for a list published done: the empty packs, a
  fence).  Its creation takes the seq.
- gc/<seq>.armed and gc/<seq>.done: the list in that state, whole.
- gc/<seq>.<token>.nodes, token 16 hex digits: the children of the map nodes a done
  list collects, named by the list ("nodes"), written before it.
A list is in the furthest state stored (done, armed, as published).  Each is a frame
(store/frames.py) with magic b"BSGCLS", version 2, and a JSON body:

    {"format": 2, "seq": n, "state": "pending" | "armed" | "done",
     "candidates": [hex object id, ...], "waiting_for": [hex session id, ...],
     "condemned": [[hex object id, hex pack id], ...],
     "orphans": [hex pack id, ...], "unfinished": [object name, ...],
     "nodes": object name | null,
     "collected": [[hex object id, hex pack id], ...], "deleted_packs": [hex, ...],
     "relocated": [[hex object id, hex deleted pack id, hex pack id, offset, stored size,
                    raw size, kind, codec], ...]}

The nodes object: a frame with magic b"BSGCND", version 1, whose body is, for each node,
its 32-byte id, a u32 (little-endian) count n and n 32-byte ids of its children.

Format 1 (read, never written): the list was gc/<seq> alone, replaced in place as it
advanced (its state in the body), "nodes" a bool for gc/<seq>.nodes; one under way is
advanced through the objects of format 2.

Compatibility: unknown keys are ignored; a list of a newer version is refused
(UnsupportedFormatError) by every sync that reads it, so no writer or gc goes on
without what it may name.  A blocksnap that reads format 1 only sees neither the state
objects nor, until it meets a list published since, anything amiss: every host that
shares a store must run a blocksnap that reads format 2 (shared stores are not released
yet).  Lists are kept (see the notes of issue 17 on compacting them).
"""

from __future__ import annotations

import json
import re
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from blocksnap.errors import (
    IntegrityError,
    MissingObjectError,
    ObjectExistsError,
    UnsupportedFormatError,
)
from blocksnap.store import frames
from blocksnap.store.backend import ObjectStore
from blocksnap.store.entries import Location

PREFIX = "gc/"
MAGIC = b"BSGCLS"
NODES_MAGIC = b"BSGCND"
VERSION = 2
NODES_VERSION = 1
_ID = 32  # bytes of an object id
_COUNT = struct.Struct("<I")
PENDING, ARMED, DONE = "pending", "armed", "done"
_NAME = re.compile(r"gc/(\d{16})(?:\.(armed|done))?")
_NODES_NAME = re.compile(r"gc/\d{16}\.[0-9a-f]{16}\.nodes")
_FURTHER = {None: 0, ARMED: 1, DONE: 2}  # of the objects of one list
_STATES = {None: (PENDING, DONE), ARMED: (ARMED,), DONE: (DONE,)}  # each may hold


@dataclass(slots=True)
class CollectionList:
    seq: int
    state: str = PENDING
    candidates: list[bytes] = field(default_factory=list)
    waiting_for: list[bytes] = field(default_factory=list)
    # (object, pack): where the collecting cache placed candidates when publishing
    condemned: list[tuple[bytes, bytes]] = field(default_factory=list)
    names_condemned: bool = True  # False for a list from before lists named them
    orphans: list[bytes] = field(default_factory=list)  # packs unknown when published
    unfinished: list[str] = field(default_factory=list)  # names with unfinished writes
    nodes: str | None = None  # the object that holds the children of the nodes collected
    collected: list[tuple[bytes, bytes]] = field(default_factory=list)  # (object, pack)
    deleted_packs: list[bytes] = field(default_factory=list)
    # (object, deleted pack, its place kept): a copy in a deleted pack of an object that
    # lives on elsewhere
    relocated: list[tuple[bytes, bytes, Location]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return list_name(self.seq)

    def encode(self) -> bytes:
        body = {
            "format": VERSION,
            "seq": self.seq,
            "state": self.state,
            "candidates": [c.hex() for c in self.candidates],
            "waiting_for": [w.hex() for w in self.waiting_for],
            "condemned": [[o.hex(), p.hex()] for o, p in self.condemned],
            "orphans": [p.hex() for p in self.orphans],
            "unfinished": list(self.unfinished),
            "nodes": self.nodes,
            "collected": [[o.hex(), p.hex()] for o, p in self.collected],
            "deleted_packs": [p.hex() for p in self.deleted_packs],
            "relocated": [
                [
                    o.hex(),
                    p.hex(),
                    loc.pack.hex(),
                    loc.offset,
                    loc.stored_size,
                    loc.raw_size,
                    loc.kind,
                    loc.codec,
                ]
                for o, p, loc in self.relocated
            ],
        }
        return frames.frame(MAGIC, VERSION, json.dumps(body, sort_keys=True).encode())


def list_name(seq: int) -> str:
    return f"{PREFIX}{seq:016d}"


def decode(data: bytes, what: str) -> CollectionList:
    version, body = frames.unframe(data, MAGIC, what)
    if version not in (1, VERSION):
        raise UnsupportedFormatError(f"{what} has format {version}: needs a newer blocksnap")
    try:
        raw = json.loads(body)
        if raw.get("format") != version:
            raise UnsupportedFormatError(f"{what} has a newer format: needs a newer blocksnap")
        seq = int(raw["seq"])
        nodes = raw.get("nodes")
        if version == 1:
            nodes = nodes_name(seq) if nodes else None
        elif nodes is not None and not (
            isinstance(nodes, str)
            and _NODES_NAME.fullmatch(nodes)
            and nodes.startswith(list_name(seq) + ".")
        ):
            raise ValueError(f"nodes names {nodes!r}")
        lst = CollectionList(
            seq=seq,
            state=str(raw["state"]),
            candidates=[bytes.fromhex(c) for c in raw.get("candidates", [])],
            waiting_for=[bytes.fromhex(w) for w in raw.get("waiting_for", [])],
            condemned=[(bytes.fromhex(o), bytes.fromhex(p)) for o, p in raw.get("condemned", [])],
            names_condemned="condemned" in raw,
            orphans=[bytes.fromhex(p) for p in raw.get("orphans", [])],
            unfinished=[str(n) for n in raw.get("unfinished", [])],
            nodes=nodes,
            collected=[(bytes.fromhex(o), bytes.fromhex(p)) for o, p in raw.get("collected", [])],
            deleted_packs=[bytes.fromhex(p) for p in raw.get("deleted_packs", [])],
            relocated=[
                (
                    bytes.fromhex(o),
                    bytes.fromhex(p),
                    Location(bytes.fromhex(lp), int(at), int(st), int(rw), int(k), int(c)),
                )
                for o, p, lp, at, st, rw, k, c in raw.get("relocated", [])
            ],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{what} is damaged ({exc})") from None
    # An object holds its own list, in the state its name says (a list of format 1 was
    # replaced in place, its state in the body alone).
    named = _NAME.fullmatch(what)
    states = (PENDING, ARMED, DONE) if version == 1 else _STATES[named and named.group(2)]
    if named is None or int(named.group(1)) != lst.seq or lst.state not in states:
        raise IntegrityError(f"{what} is damaged (it holds list {lst.seq}, {lst.state})")
    return lst


def listed(backend: ObjectStore, after: int = 0) -> dict[int, str]:
    """Each list after seq `after` (ascending) -> the name of its furthest state stored:
    one listing."""
    return _furthest((o.name for o in backend.list(PREFIX)), after)


def listed_seqs(backend: ObjectStore) -> list[int]:
    """The seqs of every list, ascending."""
    return list(listed(backend))


def _furthest(names: Iterable[str], after: int = 0) -> dict[int, str]:
    found: dict[int, str | None] = {}
    for name in names:
        if (m := _NAME.fullmatch(name)) is None or (seq := int(m.group(1))) <= after:
            continue
        if seq not in found or _FURTHER[m.group(2)] > _FURTHER[found[seq]]:
            found[seq] = m.group(2)
    return {seq: _state_name(seq, found[seq]) for seq in sorted(found)}


def _state_name(seq: int, state: str | None) -> str:
    return list_name(seq) if state is None else f"{list_name(seq)}.{state}"


def read(backend: ObjectStore, seq: int, name: str | None = None) -> CollectionList | None:
    """The list seq in its furthest state stored, or None if it is gone; name: the object
    of that state, from a listing (else one listing of the list's objects finds it)."""
    if name is None:
        name = _furthest(o.name for o in backend.list(list_name(seq))).get(seq)
        if name is None:
            return None
    try:
        return decode(backend.get(name), name)
    except MissingObjectError:
        return None


def publish(backend: ObjectStore, lst: CollectionList) -> None:
    """Create the list at its seq, pending or done (ObjectExistsError if seq is taken)."""
    backend.put(lst.name, lst.encode(), exclusive=True)


def advance(backend: ObjectStore, lst: CollectionList) -> CollectionList:
    """Store the list in its new state (armed or done), create-if-absent: lst, or the
    list as another gc stored it first, in its furthest state (see the module doc)."""
    if lst.state not in (ARMED, DONE):
        raise ValueError(f"a list advances to armed or done, not {lst.state}")
    try:
        backend.put(_state_name(lst.seq, lst.state), lst.encode(), exclusive=True)
    except ObjectExistsError:
        stored = read(backend, lst.seq)
        if stored is None:
            raise IntegrityError(f"collection list {lst.seq} is gone while it advances") from None
        return stored
    return lst


def nodes_name(seq: int) -> str:
    """The children of list seq's collected nodes in format 1 (gc/<seq>.nodes)."""
    return f"{list_name(seq)}.nodes"


def write_nodes(backend: ObjectStore, seq: int, children: dict[bytes, list[bytes]]) -> str:
    """Store the children of the map nodes list seq collects, under a name of their own
    (a late write of another gc's never replaces them); returns the name."""
    parts: list[bytes] = []
    for node_id, kids in children.items():
        parts += [node_id, _COUNT.pack(len(kids)), *kids]
    name = f"{list_name(seq)}.{secrets.token_hex(8)}.nodes"
    backend.put(name, frames.frame(NODES_MAGIC, NODES_VERSION, b"".join(parts)), exclusive=True)
    return name


def read_nodes(backend: ObjectStore, what: str) -> dict[bytes, list[bytes]]:
    """The children of the map nodes a list collects, stored under what (its "nodes");
    MissingObjectError if gone, IntegrityError if damaged."""
    version, body = frames.unframe(backend.get(what), NODES_MAGIC, what)
    if version != NODES_VERSION:
        raise UnsupportedFormatError(f"{what} has format {version}: needs a newer blocksnap")
    out: dict[bytes, list[bytes]] = {}
    at = 0
    while at < len(body):
        if at + _ID + _COUNT.size > len(body):
            raise IntegrityError(f"{what} is damaged (truncated)")
        node_id = body[at : at + _ID]
        (count,) = _COUNT.unpack_from(body, at + _ID)
        at += _ID + _COUNT.size
        if at + count * _ID > len(body):
            raise IntegrityError(f"{what} is damaged (truncated)")
        out[node_id] = [body[i : i + _ID] for i in range(at, at + count * _ID, _ID)]
        at += count * _ID
    return out
