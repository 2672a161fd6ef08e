"""The repository store: its objects, the index that caches them, and host-local state.

Layout of a repository directory REPO/ (format 2; the objects go through the storage
seam, store/backend.py, and live in REPO/ itself with the default local backend):

    config          the repository's identity, content parameters and compatibility
                    (store/config.py), written once by init and read first
    packs/XX/ID     packs of records: blocks or map nodes, never both (store/packs.py,
                    store/records.py); ID = 32 hex digits, XX its first two
    snapshots/ID    snapshot records (store/catalog.py), created create-if-absent
    tombstones/ID   removals of snapshots (store/catalog.py), created create-if-absent
    settings/NAME   retention policies and protections (store/catalog.py)
    index/          the LMDB index (store/index.py)
    index.rebuild/, index.old/
                    only while repair --rebuild-index runs (store/rebuild.py)
    lock, locks/    flock files (store/locks.py)

A repository on S3 (store/location.py) keeps the objects above in its bucket, with three
more kinds that exist only there: sessions/ID and locks/NAME/GEN, the writer sessions and
leases that hold across hosts (store/objectlocks.py), and gc/SEQ, the collection lists
through which gc deletes while other hosts write (store/collection.py).  REPO is then
this host's cache directory: the index and the host-local state.

Which state is what:

- Truth: the objects (config, packs, snapshot records, tombstones, settings).  They
  alone define the repository.  A snapshot exists from the moment its record object is
  created until a tombstone names it; a volume's snapshots are ordered by the records'
  (seq, id); a snapshot is protected while its protection object exists; a volume's
  policy is its policy object.  Every object is framed, versioned and checksummed, and
  each format's module states its compatibility rule.
- Cache: index/ (LMDB) holds where each object lives, reference counts, pack fill, the
  snapshot catalog (records, order, volumes) and the settings.  All of it is rebuilt
  from the objects by repair --rebuild-index, and automatically by the next command
  when index/ is gone (store/rebuild.py); the catalog is brought up to date with the
  objects (Store.sync_catalog) when a repository is opened for writing, by every
  writer before it chooses a parent, and by gc before it collects anything.
- Host-local: never in the objects and never rebuilt.  The locks and writer sessions
  (store/locks.py), and in the index the writer registry with its epochs and intents,
  the marks of removals under way, and the checkpoints of interrupted snapshot runs.
  Losing them costs only work in progress: a run that was interrupted starts again,
  and what a killed writer left is then found by gc from the objects alone.

Ordering keeps every state consistent at every instant (kill -9 included): a pack is
durable before the index refers to it; a snapshot's packs are durable and indexed
before its record is created; a tombstone is created before the index forgets the
snapshot and the record is deleted after.  An index step that fails after its object
was written leaves the writer's intents behind, so gc finishes it as for a writer that
was killed.

The modules, each opening with its job: repository.py (Store, the open repository),
init.py (creating one), writer.py (writers: their registration and packs), gc.py and
verify.py (collecting garbage, verifying), rebuild.py (repair --rebuild-index);
catalog.py, config.py, packs.py and records.py (with codec.py) own the object formats,
frames.py the frame they share with the config;
reads.py plans ranged reads, packindex.py reads a pack's contents for the index;
backend.py (with retrying.py, and s3.py, the backend on an S3 bucket) and locks.py (with
objectlocks.py, locks across hosts) are the seams, location.py turns an s3:// URL into
a backend and a cache directory, and collection.py owns the collection lists.
The index is index.py, which documents its LMDB layout and names its parts.
"""
