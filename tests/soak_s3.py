"""A multi-host soak on a real SeaweedFS: many writer hosts, prune + gc, restores, and kills.

    python -m tests.soak_s3 DIR [--writers 8] [--seconds 300] [--kill-every 1.5] [--seed N]

Each "host" is a process with a cache directory of its own, as separate machines would
have, all on one bucket through `python -m blocksnap` with an s3:// URL:

- writers: one volume each, a real ext4 image (mkfs.ext4 -d; the volumes share a common
  base of files, so blocks deduplicate across them), changed with debugfs before every
  snapshot.  Before a snapshot the image's SHA-256 is journalled as pending; after the
  command succeeds, as committed.
- maintenance: prune (keep the last 3 of every volume) and gc, in a loop; every third gc
  is a full one (gc --full), which takes what killed writers left for orphans while the
  other writers run; every fourth round first rebuilds the maintenance cache from the
  bucket (repair --rebuild-index) while the writers write.  The final check runs gc
  --full twice, then finds no unfinished write, no pack the final cache does not index
  or holds nothing live in, and nothing unreferenced.
- readers: restore a random committed snapshot and compare its SHA-256 (a snapshot
  pruned meanwhile may be gone: that is not a failure).
- a killer sends SIGKILL to a random running command every --kill-every seconds (on
  average), and the loop starts the next one.

At the end, from a cache built from the bucket alone: every listed snapshot restores to
an image hash journalled for its volume (committed, or pending when the kill came after
the commit point), every snapshot journalled as committed and not pruned is listed,
and verify --read-data passes.  One JSON document of counts is printed; "lost",
"wrong_bytes" and "failures" must be 0 (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import blocksnap
from blocksnap.store.location import S3Options
from blocksnap.store.packs import pack_name
from tests.conftest import debugfs, mkfs_ext4
from tests.s3server import S3_BUCKET, running_weed


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Soak:
    def __init__(self, root: Path, url: str, env: dict[str, str], seed: int) -> None:
        self.root = root
        self.url = url
        self.env = env
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.running: dict[int, subprocess.Popen[str]] = {}
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.errors: list[str] = []  # the first command errors, for the record
        self.hashes: dict[str, set[str]] = {}  # volume -> every hash journalled
        self.committed: dict[str, str] = {}  # snapshot id -> hash
        self.stop = threading.Event()

    def run(self, host: str, *args: str, check_kill: bool = True) -> tuple[int, str, str]:
        cache = self.root / "caches" / host
        proc = subprocess.Popen(
            [sys.executable, "-m", "blocksnap", *args, "--cache-dir", str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        with self.lock:
            self.running[proc.pid] = proc
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            with self.lock:
                self.running.pop(proc.pid, None)
        if proc.returncode < 0:
            self.counts["killed_" + args[0]] += 1
        elif proc.returncode != 0:
            self.counts["error_" + args[0]] += 1
            reported = err.count("\n") == 1 or (args[0] == "gc" and proc.returncode == 5)
            if "Traceback" in err or not reported:
                self.failures.append(f"{host} {args[0]}: {err[-500:]}")
            with self.lock:
                if len(self.errors) < 40:
                    self.errors.append(f"{args[0]}: {err.strip()[-300:]}")
        return proc.returncode, out, err

    def writer(self, index: int, image: Path) -> None:
        volume = f"vol{index}"
        host = f"writer{index}"
        n = 0
        while not self.stop.is_set():
            n += 1
            change = self.root / f"change-{index}.bin"
            change.write_bytes(self.rng.randbytes(self.rng.choice([64 << 10, 1 << 20, 3 << 20])))
            debugfs(image, f"rm c{n % 4}.bin", f"write {change} c{n % 4}.bin")
            digest = _sha(image)
            with self.lock:
                self.hashes.setdefault(volume, set()).add(digest)
            rc, out, _err = self.run(host, "snapshot", self.url, volume, str(image), "--json")
            if rc == 0:
                snap = json.loads(out)
                with self.lock:
                    self.committed[snap["id"]] = digest
                self.counts["snapshots"] += 1

    def maintenance(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            if n % 4 == 2:
                # The maintenance cache rebuilt from the bucket while the writers write:
                # its gc must still never take a running writer's pack for empty.
                rc, _out, _err = self.run("maint", "repair", self.url, "--rebuild-index")
                self.counts["rebuilds" if rc == 0 else "rebuild_not_done"] += 1
            rc, _out, _err = self.run("maint", "prune", self.url, "--keep-last", "3")
            self.counts["prunes" if rc == 0 else "prune_not_done"] += 1
            # Every third gc a full one, which takes what killed writers left for orphans
            # while the others still write.
            full = ["--full"] if n % 3 == 0 else []
            rc, out, _err = self.run("maint", "gc", self.url, "--json", *full)
            if rc in (0, 5) and out:
                report = json.loads(out)
                for problem in report["problems"]:
                    with self.lock:
                        if len(self.errors) < 40:
                            self.errors.append(f"gc: {problem[:300]}")
                self.counts["gc_runs"] += 1
                self.counts["gc_objects_deleted"] += report["objects_deleted"]
                self.counts["gc_packs_deleted"] += report["packs_deleted"]
                self.counts["gc_waited"] += 1 if report["waiting_writers"] else 0
                self.counts["gc_full_runs"] += 1 if full else 0
                self.counts["gc_orphan_packs"] += report["orphan_packs"]
                self.counts["gc_unfinished_discarded"] += report["unfinished_discarded"]
            time.sleep(1)

    def reader(self, k: int) -> None:
        while not self.stop.is_set():
            with self.lock:
                items = list(self.committed.items())
            if not items:
                time.sleep(1)
                continue
            snapshot_id, digest = self.rng.choice(items)
            target = self.root / f"restore-{k}.img"
            target.unlink(missing_ok=True)
            volume = None
            for vol, seen in self.hashes.items():
                if digest in seen:
                    volume = vol
            assert volume is not None
            rc, _out, err = self.run(
                f"reader{k}", "restore", self.url, volume, snapshot_id, str(target)
            )
            if rc == 0:
                self.counts["restores"] += 1
                if _sha(target) != digest:
                    self.failures.append(f"restore of {snapshot_id} returned wrong bytes")
                    self.counts["wrong_bytes"] += 1
            elif rc > 0 and "not found" not in err and "does not exist" not in err:
                self.counts["restore_errors"] += 1

    def killer(self, every: float) -> None:
        while not self.stop.is_set():
            time.sleep(self.rng.expovariate(1 / every))
            with self.lock:
                victims = list(self.running.values())
            if victims:
                victim = self.rng.choice(victims)
                try:
                    victim.kill()
                    self.counts["kills"] += 1
                except ProcessLookupError:
                    pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--kill-every", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    root: Path = args.dir
    shutil.rmtree(root, ignore_errors=True)
    (root / "caches").mkdir(parents=True)
    rng = random.Random(args.seed)
    base = root / "base"
    base.mkdir()
    for i in range(6):
        (base / f"common{i}.bin").write_bytes(rng.randbytes(1 << 20))
    images = []
    for i in range(args.writers):
        tree = root / f"tree{i}"
        shutil.copytree(base, tree)
        (tree / "own.bin").write_bytes(rng.randbytes(2 << 20))
        images.append(mkfs_ext4(root / f"vol{i}.img", tree, 24))
    with running_weed(root / "weed") as weed:
        server = weed.server
        client = server.client()
        client.create_bucket(Bucket=S3_BUCKET)
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": server.endpoint,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_REGION": server.region,
            "BLOCKSNAP_SESSION_TTL": "6",
        }
        url = f"s3://{S3_BUCKET}/soak"
        soak = Soak(root, url, env, args.seed)
        rc, _out, err = soak.run("writer0", "init", url)
        if rc != 0:
            print(err, file=sys.stderr)
            return 1
        threads = [
            threading.Thread(target=soak.writer, args=(i, image), daemon=True)
            for i, image in enumerate(images)
        ]
        threads += [threading.Thread(target=soak.maintenance, daemon=True)]
        threads += [threading.Thread(target=soak.reader, args=(k,), daemon=True) for k in (0, 1)]
        threads += [threading.Thread(target=soak.killer, args=(args.kill_every,), daemon=True)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        soak.stop.set()
        for t in threads:
            t.join(timeout=700)

        # The final check, from a cache built from the bucket alone.
        time.sleep(7)  # every killed session has run out
        final = "final"
        for _ in range(2):  # the second carries out a list the first may have waited on
            rc, out, err = soak.run(final, "gc", url, "--full", "--json")
            if rc in (0, 5) and out:
                report = json.loads(out)
                soak.counts["final_orphan_packs"] += report["orphan_packs"]
                soak.failures += [f"final gc: {p}" for p in report["problems"]]
        rc, out, err = soak.run(final, "list", url, "--json")
        listed: dict[str, list[dict[str, object]]] = json.loads(out) if rc == 0 else {}
        if rc != 0:
            soak.failures.append(f"final list: {err}")
        snapshots = {str(s["id"]): volume for volume, snaps in listed.items() for s in snaps}
        soak.counts["final_snapshots"] = len(snapshots)
        # A snapshot journalled as committed and not listed must have a tombstone (a
        # prune removed it); otherwise it was lost.
        for snapshot_id in soak.committed:
            if snapshot_id in snapshots:
                continue
            try:
                client.head_object(Bucket=S3_BUCKET, Key=f"soak/tombstones/{snapshot_id}")
                soak.counts["pruned"] += 1
            except Exception:
                soak.counts["lost"] += 1
                soak.failures.append(f"committed snapshot {snapshot_id} is gone, not pruned")
        for snapshot_id, volume in sorted(snapshots.items()):
            target = root / "final.img"
            target.unlink(missing_ok=True)
            rc, _out, err = soak.run(final, "restore", url, volume, snapshot_id, str(target))
            if rc != 0:
                soak.counts["lost"] += 1
                soak.failures.append(f"final restore of {snapshot_id}: {err}")
                continue
            digest = _sha(target)
            if digest not in soak.hashes.get(volume, set()):
                soak.counts["wrong_bytes"] += 1
                soak.failures.append(f"{snapshot_id} restored to bytes never snapshotted")
            soak.counts["final_restored"] += 1
        rc, out, err = soak.run(final, "verify", url, "--read-data", "--json")
        soak.counts["final_verify_ok"] = int(rc == 0)
        if rc != 0:
            soak.failures.append(f"final verify: {out[-2000:]} {err}")
        elif unfinished := [x for x in json.loads(out)["leftovers"] if "unfinished" in x]:
            soak.failures.append(f"left after gc --full: {unfinished[:5]}")
        # Nothing leaked: every pack in the bucket is one the final cache indexed, with
        # something live in it, and nothing unreferenced stayed.
        os.environ.update(env)
        options = S3Options(cache_dir=str(root / "caches" / final))
        with blocksnap.Repository(url, s3=options) as repo:
            in_bucket = {o.name for o in repo.store.backend.list("packs/")}
            infos = repo.store.index.pack_infos()
            unindexed = in_bucket - {pack_name(p) for p in infos}
            empty = [p for p, info in infos.items() if int(info.get("live", 0)) <= 0]
            soak.counts["final_packs"] = len(in_bucket)
            soak.counts["final_unreferenced"] = repo.store.index.unreferenced_count()
        if unindexed or empty or soak.counts["final_unreferenced"]:
            soak.failures.append(
                f"leaked after gc --full: {len(unindexed)} packs unindexed, {len(empty)} "
                f"empty, {soak.counts['final_unreferenced']} objects unreferenced"
            )
    result = {**soak.counts, "failures": soak.failures, "errors": soak.errors}
    result.setdefault("lost", 0)
    result.setdefault("wrong_bytes", 0)
    print(json.dumps(result, indent=2, sort_keys=True))
    bad = result["lost"] or result["wrong_bytes"] or soak.failures
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
