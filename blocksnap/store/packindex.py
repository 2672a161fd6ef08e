"""Reading a pack for the index: its intact records and the children of its map nodes.

A rebuild (store/rebuild.py) reads every pack this way, and a shared store's sync the
packs other hosts wrote (Store.sync_catalog), so neither downloads packs of data blocks.
many_pack_contents reads several packs at once (on S3 each read is a round trip) and
hands them back in the order asked; many_tocs reads only their tables of contents.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from blocksnap.blockmap import node_children
from blocksnap.errors import BlocksnapError, IntegrityError
from blocksnap.store.backend import ObjectStore
from blocksnap.store.packs import HEADER_SIZE, KIND_NODE, Record, pack_name, read_toc, walk_pack
from blocksnap.store.records import open_checked, open_record


def pack_contents(
    backend: ObjectStore,
    hash: Callable[[bytes | memoryview], bytes],
    name: str,
    size: int,
    damaged: list[str],
) -> tuple[list[Record], dict[bytes, list[bytes]]]:
    """The intact records of pack name (size bytes) and the children of its map nodes;
    what is damaged is added to damaged.

    The table of contents comes from the pack's tail (packs.read_toc), so a pack of data
    blocks costs one or two small reads; its blocks are checked when read (and by verify
    --read-data).  Map nodes are read and checked here, their children being needed for
    the counts; they sit in packs of their own, read in one range.  A pack whose trailer
    or TOC is damaged is read whole and scanned, and every record is checked.
    """
    pack = name.rsplit("/", 1)[1]
    where = f"pack {pack}"
    try:
        records = read_toc(lambda at, length: backend.get(name, at, length), size, where)
    except IntegrityError as exc:
        data = backend.get(name)
        walk = walk_pack(data, pack)
        damaged.append(f"{exc}; its records were found by scanning it")
        damaged += [str(e) for e in walk.problems if str(e) != str(exc)]
        candidates = walk.records
        check_all, base = True, 0
    else:
        nodes = [rec for rec in records if rec.kind == KIND_NODE]
        base = nodes[0].offset if nodes else 0
        data = backend.get(name, base, nodes[-1].end - base) if nodes else b""
        candidates = [(rec, None) for rec in records]
        check_all = False
    good: list[Record] = []
    children: dict[bytes, list[bytes]] = {}
    view = memoryview(data)
    for rec, error in candidates:
        if error is None and (check_all or rec.kind == KIND_NODE):
            at = f"{where} at offset {rec.offset}"
            record = view[rec.offset - base : rec.end - base]
            try:
                if check_all:  # walk_pack checked header and check already
                    raw = open_checked(rec, record[HEADER_SIZE:], hash, at)
                else:
                    raw = open_record(
                        record,
                        rec.id,
                        rec,
                        hash,
                        at,
                        listed_check=rec.check,
                        against="the table of contents",
                    )
                if rec.kind == KIND_NODE:
                    children[rec.id] = node_children(raw)
            except IntegrityError as exc:
                error = exc
        if error is None:
            good.append(rec)
        else:
            damaged.append(str(error))
    return good, children


Contents = tuple[int, list[Record], dict[bytes, list[bytes]], list[str]]
# size, good records, children of its nodes, what was found damaged


def many_pack_contents(
    backend: ObjectStore,
    hash: Callable[[bytes | memoryview], bytes],
    packs: Iterable[tuple[str, int | None]],
) -> Iterator[tuple[str, Future[Contents]]]:
    """pack_contents of each (name, size; None: ask the backend), read up to the
    backend's max_parallelism at once (at most 8: a node pack is read whole, so each
    read in flight holds up to a pack's size), yielded in the order given as finished
    futures, whose result() raises what the read raised."""
    parallel = max(1, min(8, backend.capabilities.max_parallelism))

    def read(name: str, size: int | None) -> Contents:
        if size is None:
            size = backend.stat(name).size
        damaged: list[str] = []
        good, children = pack_contents(backend, hash, name, size, damaged)
        return size, good, children, damaged

    pending: deque[tuple[str, Future[Contents]]] = deque()
    with ThreadPoolExecutor(parallel, thread_name_prefix="blocksnap-toc") as pool:
        try:
            for name, size in packs:
                pending.append((name, pool.submit(read, name, size)))
                if len(pending) >= parallel:
                    first, future = pending.popleft()
                    future.exception()  # waits
                    yield first, future
            while pending:
                first, future = pending.popleft()
                future.exception()
                yield first, future
        finally:
            for _name, future in pending:
                future.cancel()


def many_tocs(
    backend: ObjectStore, packs: dict[bytes, int]
) -> list[tuple[bytes, int, list[Record] | BlocksnapError]]:
    """The table of contents of each pack (id -> size), from its tail alone (read_toc),
    up to the backend's max_parallelism at once (at most 8), in the order given, each
    with the error reading it raised in its place (gc: packs it deletes or reclaims)."""
    parallel = max(1, min(8, backend.capabilities.max_parallelism))

    def read(pack_id: bytes, size: int) -> list[Record] | BlocksnapError:
        name = pack_name(pack_id)
        try:
            return read_toc(lambda at, n: backend.get(name, at, n), size, name)
        except BlocksnapError as exc:
            return exc

    with ThreadPoolExecutor(parallel, thread_name_prefix="blocksnap-toc") as pool:
        futures = [(p, size, pool.submit(read, p, size)) for p, size in packs.items()]
        return [(p, size, f.result()) for p, size, f in futures]
