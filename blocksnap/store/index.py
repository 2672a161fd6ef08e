"""The LMDB index: where each object lives, who refers to it, and the snapshot catalog.

The environment is the directory REPO/index (data.mdb, lock.mdb).  Named databases:

    meta       b"format" -> b"4"; b"repository" -> the repository id (ASCII hex);
               b"epoch" -> u64 big-endian, the logical clock of the writer registry;
               b"collections" -> u64 big-endian, on a shared store the seq up to which
               the collection lists are followed (store/collection.py);
               b"gone/" + pack id -> b"": packs a done list named deleted, and
               b"dead/" + pack id + object id -> b"": copies one named collected, each
               never indexed again (GcIndex.forget_packs, forget_copies), or -> seq u64
               big-endian: copies list seq, under way, condemns (weak: see add_pack);
               b"spare/" + object id + pack id -> location: a copy of an object placed
               elsewhere, which takes the place when that copy goes (shared stores)
    objects    object id (32 bytes) -> location, 38 bytes little-endian:
                 pack id (16 bytes), offset u64 (of the record header), stored_size u32,
                 raw_size u32, kind u8, codec u8, crc32 u32 (of key and the 34 bytes before)
    refs       object id -> count u32 + since u64, little-endian: how many indexed map
               nodes, committed snapshots and checkpoints refer to the object (a node
               counts every entry that names the object); since is the epoch at which
               the count last became 0 (meaningful only when it is 0)
    unref      since (u64 big-endian) + object id -> b"": every object whose count is 0,
               oldest first; garbage collection walks only this
    packs      pack id (16 bytes) -> JSON {"size", "records", "time", "live"}; live is the
               bytes of records (header included) that index entries point at
    sparse     pack id -> b"": packs that lost live bytes since gc last looked at them
    writers    writer id (16 bytes) -> JSON {"epoch", "pid", "started"}: the registry of
               processes that may be about to refer to objects (see below)
    intents    writer id + object name (UTF-8) -> b"": objects a writer is about to put
               or delete; the transaction that indexes (or unindexes) the object clears
               the entry, so what a killed writer left is known exactly
    volumes    volume name (UTF-8) -> JSON {"block_size"}, for every volume with snapshots
    snapshots  snapshot id (32 ASCII hex digits) -> snapshot record body (store/catalog.py)
    timeline   volume name (UTF-8) + b"\\x00" + seq u64 big-endian + snapshot id -> id:
               the volume's snapshots in the order of their records' (seq, id)
    settings   b"policy\\x00" + volume -> JSON retention policy (see retention.py);
               b"protected\\x00" + snapshot id -> b"" for a protected snapshot;
               b"removing\\x00" + snapshot id -> writer id, while a prune removes it
               (host-local: protecting it is refused meanwhile)
    checkpoints volume name (UTF-8) -> checkpoint record of the volume's interrupted
               snapshot run (see store/catalog.py); each root in its "pinned" list holds
               one reference, so gc keeps what a resumed run will take from it.  The next
               snapshot committed to the volume drops it.  A rebuilt index has none.

The Index class is assembled from parts, one module each: store/lmdbenv.py (the
environment, its transactions and its map, sized by store/mapsize.py), store/entries.py
(the keys and values above as bytes), store/objectindex.py (objects, refs, unref, packs,
sparse), store/writerindex.py (the writer registry), store/catalogindex.py (volumes,
snapshots, timeline, settings, checkpoints), store/gcindex.py and store/rebuildindex.py
(the steps of gc and of a rebuild).

Reference counts are exact: a new map node increments its children in the transaction
that indexes its pack, a snapshot commit increments its root, and removing a snapshot
decrements it.  Garbage collection deletes an object whose count is 0 and decrements its
children in the same transaction.

The writer registry keeps that safe while snapshots run.  A writer registers (the epoch
is incremented and becomes the writer's start epoch) before it looks anything up; from
then on it may refer to any object it finds whose count is positive or became 0 at or
after its start epoch.  An object that became 0 before its start it revives first (see
claim): its since moves to the current epoch, or, if gc took it meanwhile, the writer
stores it again.  Garbage collection therefore deletes only objects that became 0 before
the start of every live writer, re-checking since in its own transaction.  A writer
holds an flock on locks/writer-<id>.lock for its lifetime, so one that was killed is
found; gc then deletes the objects named by its intents that never became part of the
index, and removes it from the registry.

Before LMDB maps data.mdb, its two meta pages are read with plain reads and the file is
refused (IntegrityError) unless both are intact and it holds every page up to the newest
one's last page: LMDB would map a truncated file and the first access past its end would
kill the process with SIGBUS.  verify also checks the structure of every page in use
(check_pages), since LMDB follows damaged node sizes and page numbers unchecked.  A file
truncated while a process has it mapped cannot be caught that way; one damaged before
the open is (store/lmdbfile.py).

Everything here but the writer registry, its intents, the removing marks and the
checkpoints (host-local state) is a cache of the objects: it can be rebuilt from the
packs, the snapshot records, the tombstones and the settings objects (store/rebuild.py),
and Store.sync_catalog brings its catalog up to date with them.  Every value that the
engine trusts carries its own check, so a damaged entry is reported as damage rather
than followed.  Write transactions are
short: one per sealed pack, per committed or removed snapshot, and per batch of gc.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from blocksnap.errors import IntegrityError, StoreError
from blocksnap.store import lmdbfile
from blocksnap.store.catalogindex import CatalogIndex
from blocksnap.store.entries import SEQ
from blocksnap.store.gcindex import GcIndex
from blocksnap.store.indexcopy import IndexCopy
from blocksnap.store.lmdbenv import lmdb_errors
from blocksnap.store.rebuildindex import RebuildIndex
from blocksnap.store.writerindex import WriterIndex

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn

# Format 4 added the meta keys of a shared store's condemned copies (a seq as the value
# of a dead/ key) and spares.  A local repository's index has neither, so this blocksnap
# takes a format 3 one as it is and marks it 4 as it opens it for writing; a shared
# store's cache of format 3 lacks the spares of the packs it indexed, which every cache
# must have alike (store/collection.py), so it is rebuilt (Repository does so as it opens
# it; Store refuses it).  A blocksnap that reads only format 3 refuses a format 4 index
# (it would take a condemned copy for a collected one): its repair --rebuild-index
# builds one of its own.
INDEX_FORMAT = b"4"
_UPGRADABLE = b"3"


class Index(WriterIndex, CatalogIndex, GcIndex, RebuildIndex):
    """An open LMDB index environment with its named databases: the parts of the index
    (objects and counts, writer registry, catalog, gc, rebuild) on one environment."""

    def initialize(self, repository_id: str) -> None:
        def body(txn: Txn) -> None:
            txn.put(b"format", INDEX_FORMAT, db=self.meta)
            txn.put(b"repository", repository_id.encode(), db=self.meta)
            txn.put(b"epoch", SEQ.pack(0), db=self.meta)

        self._write("initialising index", body)

    def format(self) -> bytes | None:
        with lmdb_errors("reading index"), self._begin() as txn:
            fmt = txn.get(b"format", db=self.meta)
        return None if fmt is None else bytes(fmt)

    def check_identity(self, repository_id: str, *, upgrade: bool = True) -> None:
        """Refuse an index of another repository or format; upgrade: take one of the
        format before (see INDEX_FORMAT)."""
        with lmdb_errors("reading index"), self._begin() as txn:
            fmt = txn.get(b"format", db=self.meta)
            rid = txn.get(b"repository", db=self.meta)
        if fmt not in ((INDEX_FORMAT, _UPGRADABLE) if upgrade else (INDEX_FORMAT,)):
            raise IntegrityError(
                f"index format {fmt!r} is not {INDEX_FORMAT!r}; run repair --rebuild-index"
            )
        if rid != repository_id.encode():
            raise IntegrityError("index belongs to another repository; run repair")
        if fmt == _UPGRADABLE and not self._readonly:
            self._write(
                "upgrading index", lambda txn: txn.put(b"format", INDEX_FORMAT, db=self.meta)
            )

    def copy(self, *, check_pages: bool = False, by_pack: bool = False) -> IndexCopy:
        """Everything verify checks, copied out of one read transaction into a private
        environment on disk, so that verify sees one consistent state however long it then
        takes, in memory flat in the index's size (store/indexcopy.py).  check_pages:
        first check the structure of every page of that state (store/lmdbfile.py), which
        LMDB would read unchecked; by_pack: copy the entries by pack as well."""
        for _attempt in range(8):
            with lmdb_errors("reading index"), self._begin() as txn:
                if check_pages and not lmdbfile.check_pages(self.path, txn.id()):
                    continue  # two commits since it began: its pages may be reused
                return IndexCopy(self, txn, by_pack=by_pack)
        raise StoreError("the index changed too often to check its pages; try again")


# LMDB forbids opening one environment twice in a process, yet a service may hold several
# Repository objects on the same path; they share one Index, counted here.
_shared: dict[str, tuple[Index, int]] = {}
_shared_lock = threading.Lock()


def outdated(path: str) -> bool:
    """Whether the index at path (REPO/index) exists and has the format before this one
    (see INDEX_FORMAT): a shared store's cache of it is rebuilt."""
    if not os.path.exists(os.path.join(path, "data.mdb")) or not os.access(path, os.W_OK):
        return False  # (read-only: nothing is written, nor gc run, with it)
    index = acquire(path)
    try:
        return index.format() == _UPGRADABLE
    finally:
        release(index)


def acquire(path: str, *, read_only: bool = False) -> Index:
    """The process-wide Index for path, opened on first use; read_only for a repository
    on a read-only filesystem (see Index)."""
    key = os.path.realpath(path)
    with _shared_lock:
        index, users = _shared.get(key, (None, 0))
        if index is None:
            index = Index(key, readonly=read_only, lock=not read_only)
        _shared[key] = (index, users + 1)
        return index


def release(index: Index) -> None:
    """Give back an Index from acquire; the last user closes it."""
    with _shared_lock:
        for key, (shared, users) in list(_shared.items()):
            if shared is index:
                if users > 1:
                    _shared[key] = (shared, users - 1)
                else:
                    del _shared[key]
                    index.close()
                return
