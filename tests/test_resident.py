"""store/resident.py: the pages of an LMDB map leave the resident set, and nothing else."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from blocksnap.store import resident
from blocksnap.store.lmdbenv import ScratchEnv

if TYPE_CHECKING:
    from blocksnap.store.lmdbenv import Txn

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps"
)


def _rss_file_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile")


def _filled(path: Path) -> tuple[ScratchEnv, dict[bytes, bytes]]:
    env = ScratchEnv(str(path), [b"d"], "a test environment", 1 << 20)
    values = {i.to_bytes(4, "big"): os.urandom(200) for i in range(100_000)}  # ~24 MiB
    items = sorted(values.items())
    for at in range(0, len(items), 10_000):
        chunk = items[at : at + 10_000]

        def put(txn: Txn, chunk: list[tuple[bytes, bytes]] = chunk) -> None:
            txn.cursor(db=env.dbs[b"d"]).putmulti(chunk)

        env.write(put)
    return env, values


def test_a_trim_drops_the_map_from_the_resident_set_and_reads_stay_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resident, "INTERVAL", 1e9)  # only the trims made here
    env, values = _filled(tmp_path)
    try:
        before = _rss_file_mib()
        assert dict(env.scan(env.dbs[b"d"], b"", 5_000)) == values  # every page touched
        touched = _rss_file_mib()
        assert touched - before > 15
        map_size = int(env._env.info()["map_size"])
        assert env._trimmer.trim(map_size) == map_size
        assert _rss_file_mib() < touched - 15
        assert dict(env.scan(env.dbs[b"d"], b"", 5_000)) == values  # faulted back in
    finally:
        env.close()


def test_a_trim_leaves_other_mappings_of_the_file_alone(tmp_path: Path) -> None:
    """A private, writable mapping of the same file holds bytes of its own: advised away,
    they would revert to the file's."""
    env, _values = _filled(tmp_path)
    data = tmp_path / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "r+b") as f:
            private = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE)
            private[:5] = b"mine!"
        assert env._trimmer.trim(size) == 0  # of that size only the private one: left
        assert private[:5] == b"mine!"
        map_size = int(env._env.info()["map_size"])
        assert env._trimmer.trim(map_size) == map_size  # LMDB's map
        assert private[:5] == b"mine!"
        private.close()
    finally:
        env.close()
