"""Checks of an LMDB data file (data.mdb) with plain reads, before LMDB maps what is damaged.

LMDB maps the file and trusts it: a page past the end of a truncated file, or a node
whose sizes point past its page, is read through the map, and the process dies of SIGBUS
or SIGSEGV instead of getting an error.  So the index checks, with pread:

- at every open, both meta pages, and that the file holds every page the newest one says
  is in use (check_data_file);
- in verify, every page reachable from the meta of a read transaction it holds, so that
  no writer can reuse them meanwhile (check_pages): page numbers, bounds of every node
  and key, child and overflow page numbers, and each named database's root.

The layout read here is LMDB's on-disk format (version 1) of 64-bit builds, native byte
order (little-endian on the machines blocksnap runs on):

    page header, 16 bytes: pgno u64, pad u16, flags u16, then lower u16 and upper u16
        (an overflow page: its page count u32 instead)
    meta (pages 0 and 1, after the header): magic u32 0xBEEFC0DE, version u32, address
        u64, mapsize u64, the free and main database records, last_pg u64 (the last page
        in use), txnid u64
    database record, 48 bytes: pad u32 (in the free one, the page size), flags u16,
        depth u16, branch, leaf and overflow page counts u64, entries u64, root u64
    branch and leaf pages: u16 offsets of their nodes from byte 16 up to lower; a node is
        lo u16, hi u16, flags u16, key size u16, the key, then (in a leaf) the data:
        lo | hi << 16 bytes, or with flag BIGDATA the u64 number of its first overflow
        page, or with flag SUBDATA a database record.  In a branch node lo | hi << 16 |
        flags << 32 is the child's page number.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from blocksnap.errors import IntegrityError, StoreError

_PAGE_HEADER = struct.Struct("<QHHHH")
_META = struct.Struct("<IIQQ IHH5Q IHH5Q QQ".replace(" ", ""))
_DB = struct.Struct("<IHH5Q")
_NODE = struct.Struct("<HHHH")
_PGNO = struct.Struct("<Q")
_OVERFLOW_PAGES = struct.Struct("<I")
_MAGIC = 0xBEEFC0DE
_VERSION = 1
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
P_INVALID = (1 << 64) - 1
_MAX_DEPTH = 32  # LMDB's cursor stack


@dataclass(frozen=True, slots=True)
class Meta:
    """What one intact meta page says."""

    page_size: int
    last_pg: int
    txnid: int
    free_root: int
    main_root: int


def damaged(path: str, why: str) -> IntegrityError:
    """The error for a damaged index at path (REPO/index), naming the repair."""
    repo = os.path.dirname(os.path.abspath(path))
    return IntegrityError(
        f"index {path} is damaged ({why}); run `blocksnap repair {repo} --rebuild-index`"
    )


def _parse_meta(page: bytes, pgno: int) -> Meta | None:
    if len(page) < _PAGE_HEADER.size + _META.size:
        return None
    number, _pad, flags, _lower, _upper = _PAGE_HEADER.unpack_from(page)
    fields = _META.unpack_from(page, _PAGE_HEADER.size)
    magic, version, page_size = fields[0], fields[1], fields[4]
    free_root, main_root, last_pg, txnid = fields[11], fields[19], fields[20], fields[21]
    if number != pgno or not flags & _P_META or magic != _MAGIC or version != _VERSION:
        return None
    if page_size < 512 or page_size & (page_size - 1) or last_pg < 1:
        return None
    if any(r != P_INVALID and not 1 < r <= last_pg for r in (main_root, free_root)):
        return None
    return Meta(page_size, last_pg, txnid, free_root, main_root)


def read_metas(path: str) -> tuple[int, Meta, Meta]:
    """(file size, meta 0, meta 1) of REPO/index's data file; IntegrityError unless both
    are intact and agree on the page size."""
    data_path = os.path.join(path, "data.mdb")
    length = _PAGE_HEADER.size + _META.size
    try:
        with open(data_path, "rb") as f:
            meta0 = _parse_meta(f.read(length), 0)
            page_size = meta0.page_size if meta0 is not None else os.sysconf("SC_PAGE_SIZE")
            meta1 = _parse_meta(os.pread(f.fileno(), length, page_size), 1)
            # The size after the metas: a writer committing meanwhile has written the pages
            # a newer meta names before that meta, and LMDB never shrinks the file, so the
            # size then covers what the metas read say is in use.
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise damaged(path, "data.mdb is missing") from None
    except OSError as exc:
        raise StoreError(f"cannot read index {data_path}: {exc.strerror or exc}") from exc
    if meta0 is None or meta1 is None:
        which = "0" if meta0 is None else "1"
        raise damaged(path, f"data.mdb is {size} bytes and its meta page {which} is not intact")
    if meta0.page_size != meta1.page_size:
        raise damaged(path, "the meta pages of data.mdb disagree on the page size")
    return size, meta0, meta1


def check_data_file(path: str) -> None:
    """Refuse (IntegrityError) a data file LMDB must not map: a meta page damaged, or the
    file shorter than the pages the newest meta says are in use."""
    size, meta0, meta1 = read_metas(path)
    newest = max(meta0, meta1, key=lambda m: m.txnid)
    needed = (newest.last_pg + 1) * newest.page_size
    if size < needed:
        raise damaged(path, f"data.mdb is {size} bytes, shorter than the {needed} in use")


def check_pages(path: str, txnid: int) -> bool:
    """Check every page reachable from the meta of transaction txnid, which the caller
    holds open (so writers reuse none of them); IntegrityError on damage.

    False when neither meta page is txnid's any more (two commits since it began): the
    caller begins a newer transaction and asks again."""
    _size, meta0, meta1 = read_metas(path)
    meta = next((m for m in (meta0, meta1) if m.txnid == txnid), None)
    if meta is None:
        return False
    _Walk(path, meta).run()
    return True


class _Walk:
    """One walk over the trees of a meta: the free database, the main one, and every
    named database whose record the main one holds."""

    def __init__(self, path: str, meta: Meta) -> None:
        self.path = path
        self.meta = meta
        self.seen: set[int] = set()
        self.fd = -1

    def run(self) -> None:
        try:
            self.fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"cannot read index {self.path}: {exc.strerror or exc}") from exc
        try:
            self._tree(self.meta.free_root, "free pages", named=False)
            self._tree(self.meta.main_root, "main database", named=True)
        finally:
            os.close(self.fd)

    def _fail(self, pgno: int, why: str) -> IntegrityError:
        return damaged(self.path, f"page {pgno}: {why}")

    def _page(self, pgno: int, what: str) -> bytes:
        if not 1 < pgno <= self.meta.last_pg:
            raise damaged(self.path, f"{what} names page {pgno}, beyond the pages in use")
        if pgno in self.seen:
            raise self._fail(pgno, f"reached twice (from {what})")
        self.seen.add(pgno)
        size = self.meta.page_size
        try:
            page = os.pread(self.fd, size, pgno * size)
        except OSError as exc:
            raise StoreError(f"cannot read index {self.path}: {exc.strerror or exc}") from exc
        if len(page) != size:
            raise self._fail(pgno, "beyond the end of data.mdb")
        if _PAGE_HEADER.unpack_from(page)[0] != pgno:
            raise self._fail(pgno, "its header names another page")
        return page

    def _tree(self, root: int, what: str, *, named: bool) -> None:
        if root == P_INVALID:
            return
        pending = [(root, 0)]
        while pending:
            pgno, depth = pending.pop()
            if depth >= _MAX_DEPTH:
                raise self._fail(pgno, f"the tree of the {what} is too deep")
            page = self._page(pgno, f"the {what}")
            flags = _PAGE_HEADER.unpack_from(page)[2]
            for node_flags, key_size, body, offset in self._nodes(pgno, page, flags):
                if flags & _P_BRANCH:
                    child = body | node_flags << 32
                    pending.append((child, depth + 1))
                else:
                    self._leaf_data(pgno, page, node_flags, key_size, body, offset, named)

    def _nodes(self, pgno: int, page: bytes, flags: int) -> list[tuple[int, int, int, int]]:
        """(node flags, key size, lo | hi << 16, offset of the key) of every node."""
        size = len(page)
        if flags & (_P_OVERFLOW | _P_META | _P_LEAF2) or not flags & (_P_BRANCH | _P_LEAF):
            raise self._fail(pgno, f"not a branch or leaf page (flags {flags:#x})")
        lower, upper = _PAGE_HEADER.unpack_from(page)[3:5]
        if not _PAGE_HEADER.size <= lower <= upper <= size or lower % 2:
            raise self._fail(pgno, "its free-space bounds are impossible")
        out = []
        for k in range(_PAGE_HEADER.size, lower, 2):
            (at,) = struct.unpack_from("<H", page, k)
            if not upper <= at <= size - _NODE.size:
                raise self._fail(pgno, f"node {(k - _PAGE_HEADER.size) // 2} is out of bounds")
            lo, hi, node_flags, key_size = _NODE.unpack_from(page, at)
            key_at = at + _NODE.size
            if key_at + key_size > size:
                raise self._fail(pgno, "a key runs past the page")
            out.append((node_flags, key_size, lo | hi << 16, key_at))
        return out

    def _leaf_data(
        self,
        pgno: int,
        page: bytes,
        node_flags: int,
        key_size: int,
        data_size: int,
        key_at: int,
        named: bool,
    ) -> None:
        data_at = key_at + key_size
        if node_flags & _F_DUPDATA:
            raise self._fail(pgno, "a duplicate-sorted node, which blocksnap never writes")
        if node_flags & _F_BIGDATA:
            if data_at + _PGNO.size > len(page):
                raise self._fail(pgno, "an overflow reference runs past the page")
            (first,) = _PGNO.unpack_from(page, data_at)
            overflow = self._page(first, f"page {pgno}")
            if not _PAGE_HEADER.unpack_from(overflow)[2] & _P_OVERFLOW:
                raise self._fail(first, "expected an overflow page")
            (count,) = _OVERFLOW_PAGES.unpack_from(overflow, 12)
            if count < 1 or first + count - 1 > self.meta.last_pg:
                raise self._fail(first, "its overflow run goes beyond the pages in use")
            if data_size > count * self.meta.page_size - _PAGE_HEADER.size:
                raise self._fail(first, "a value is longer than its overflow pages")
            self.seen.update(range(first + 1, first + count))
            return
        if data_at + data_size > len(page):
            raise self._fail(pgno, "a value runs past the page")
        if node_flags & _F_SUBDATA:
            if not named or data_size != _DB.size:
                raise self._fail(pgno, "a database record where none can be")
            root = _DB.unpack_from(page, data_at)[-1]
            name = page[key_at:data_at].decode(errors="replace")
            self._tree(root, f"database {name!r}", named=False)
