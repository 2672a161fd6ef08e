"""What the file commands (ls, cat, extract, find, versions) share: arguments and output."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import stat as stat_mod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blocksnap.cli.output import shown, with_bytes
from blocksnap.cli.repo import add_repository, open_repository
from blocksnap.fs.node import FileKind, FileStat

if TYPE_CHECKING:
    from blocksnap.fs import FileSystem

_KIND_CHARS = {
    FileKind.FILE: "-",
    FileKind.DIRECTORY: "d",
    FileKind.SYMLINK: "l",
    FileKind.CHAR_DEVICE: "c",
    FileKind.BLOCK_DEVICE: "b",
    FileKind.FIFO: "p",
    FileKind.SOCKET: "s",
    FileKind.OTHER: "?",
}


def add_volume_arguments(p: argparse.ArgumentParser, snapshot: bool = True) -> None:
    add_repository(p)
    p.add_argument("volume", metavar="VOLUME")
    if snapshot:
        p.add_argument("snapshot", metavar="SNAPSHOT", help='id, prefix, "latest" or "latest~N"')


def add_partition_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--partition",
        metavar="N|VG/LV",
        help="the partition (from 1) or LVM logical volume to read, when the disk holds "
        "more than one filesystem",
    )


@contextlib.contextmanager
def opened(args: argparse.Namespace) -> Iterator[FileSystem]:
    """The filesystem of args.repo, args.volume, args.snapshot and args.partition."""
    with (
        open_repository(args) as repo,
        repo.open_filesystem(args.volume, args.snapshot, partition=args.partition) as fs,
    ):
        yield fs


def mode_string(st: FileStat) -> str:
    kind = _KIND_CHARS[st.kind]
    if st.mode is None:
        return kind + "?" * 9
    return kind + stat_mod.filemode(st.mode)[1:]


def time_string(ns: int | None) -> str:
    if ns is None:
        return "-"
    when = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S")


def long_line(st: FileStat) -> str:
    owner = "-" if st.uid is None else str(st.uid)
    group = "-" if st.gid is None else str(st.gid)
    links = "-" if st.nlink is None else str(st.nlink)
    name = shown(st.name)
    if st.kind is FileKind.SYMLINK and st.target is not None:
        name += f" -> {shown(st.target)}"
    return (
        f"{mode_string(st)} {links:>3s} {owner:>5s} {group:>5s} {st.size:>12d} "
        f"{time_string(st.mtime_ns)} {name}"
    )


def stat_document(st: FileStat) -> dict[str, Any]:
    """A file's metadata for --json; a name that is not UTF-8 also as bytes (see output)."""
    document = {
        "path": st.path,
        "name": st.name,
        "type": st.kind.value,
        "size": st.size,
        "mode": None if st.mode is None else f"{st.mode:04o}",
        "uid": st.uid,
        "gid": st.gid,
        "mtime_ns": st.mtime_ns,
        "atime_ns": st.atime_ns,
        "nlink": st.nlink,
        "file_id": st.file_id,
        "target": st.target,
    }
    return with_bytes(document, "path", "name", "target")
