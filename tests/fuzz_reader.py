"""Read every snapshot of a volume through the filesystem layer, with limits: the child
process of the fuzz test.  A crash, a hang (SIGALRM) or an error other than a blocksnap
error ends it with a non-zero status.

usage: python -m tests.fuzz_reader REPO VOLUME MEMORY_MIB SECONDS_PER_SNAPSHOT [PARTITION]
"""

from __future__ import annotations

import json
import resource
import signal
import sys

import blocksnap
from blocksnap.fs import Entry, FileKind

READ_LIMIT = 4 << 20  # bytes read per file, enough to go through its mapping


def check_data_ranges(entry: Entry) -> None:
    """What extract reads of a file: ranges in order, apart, inside the size; an
    AssertionError (not a blocksnap error) fails the test."""
    end = -1
    for start, stop in entry.data_ranges():
        assert end < start < stop <= entry.stat.size, (entry.path, end, start, stop)
        end = stop


def main() -> int:
    repo_path, volume, memory_mib, seconds = sys.argv[1:5]
    partition = sys.argv[5] if len(sys.argv) > 5 else None
    limit = int(memory_mib) << 20
    # RLIMIT_DATA, not RLIMIT_AS: the LMDB index reserves a large shared mapping up front.
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    outcomes: dict[str, int] = {}
    with blocksnap.Repository(repo_path) as repo:
        for info in repo.snapshots(volume):
            signal.alarm(int(seconds))  # no handler: a hang kills the process
            try:
                with repo.open_filesystem(volume, info, partition=partition) as fs:
                    for entry in fs.walk("/"):
                        if entry.stat.kind is FileKind.FILE:
                            entry.read(0, min(entry.stat.size, READ_LIMIT))
                            check_data_ranges(entry)
                        elif entry.stat.kind is FileKind.SYMLINK:
                            fs.readlink(entry.path)
                        entry.xattrs()
                outcome = "read"
            except blocksnap.FilesystemError:
                outcome = "FilesystemError"
            except blocksnap.BlocksnapError as exc:
                outcome = type(exc).__name__
            signal.alarm(0)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    json.dump(outcomes, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
