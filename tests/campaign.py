"""A crash, concurrency, corruption and hostile-image campaign against the real CLI.

    python -m tests.campaign DIR [--kills N] [--concurrent-seconds S] [--corruptions N]
                                 [--hostile N] [--seed N]

Every command runs as `python -m blocksnap` in a child process, on real ext4 images made
with mkfs.ext4 -d and changed with debugfs, into a real repository:

- kills: a random command (snapshot, full snapshot, prune, gc with compaction, synthesize,
  restore, verify) killed with SIGKILL at a random moment; after each, verify must pass,
  and every few trials every snapshot is restored and compared with the image it was
  taken of.  A snapshot that disappears without a prune that could remove it is lost.
- concurrent: three snapshot loops (one volume each), a prune + gc loop, a verify loop,
  a verify --read-data loop and a restore loop run at once for S seconds.  A verify that
  reports damage which a verify afterwards does not find is a false damage report.
- corruptions: one byte flipped in a copy of the repository (a pack, a snapshot record,
  the index, a setting); verify --read-data and a restore of every snapshot must name the
  damage or return the right bytes: wrong bytes with success are the one outcome not
  allowed.
- hostile: damaged copies of an ext4 image snapshotted and then listed and extracted;
  each command ends with a status, never a signal or a traceback, and nothing is
  written outside its target.

It prints one JSON document of counts; "lost", "wrong_bytes", "crashes" and
"false_damage" must all be 0, and the exit status is 1 if any is not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.conftest import debugfs, make_tree, mkfs_ext4

TIMEOUT = 300


class Campaign:
    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.durations: dict[str, float] = {}  # the last whole run of each command, seconds

    # --- running the CLI -------------------------------------------------------------

    def cli(self, *args: str, kill_after: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run one command; with kill_after, SIGKILL it after that many seconds."""
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "blocksnap", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        try:
            out, err = child.communicate(timeout=kill_after if kill_after else TIMEOUT)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate()
            if kill_after is None:
                self.fail(f"{args[0]} hung for {TIMEOUT} s")
            else:
                self.count("killed")
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
        if proc.returncode >= 0:
            with self.lock:
                self.durations[args[0]] = time.monotonic() - started
        if proc.returncode < 0 and proc.returncode != -signal.SIGKILL:
            self.fail(f"{args[0]} died by signal {-proc.returncode}: {err[-500:]}")
        elif "Traceback" in err:
            self.fail(f"{args[0]} printed a traceback: {err[-800:]}")
        return proc

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def fail(self, what: str) -> None:
        with self.lock:
            kind = what.split(":")[0]
            self.counts["crashes" if "signal" in kind or "traceback" in kind else "failures"] += 1
            self.failures.append(what)

    # --- images and digests ----------------------------------------------------------

    def image(self, name: str, size_mb: int = 48) -> Path:
        tree = self.root / f"tree-{name}"
        make_tree(tree, seed=self.rng.randrange(1 << 30), size_mb=size_mb // 3)
        return mkfs_ext4(self.root / f"{name}.img", tree, size_mb)

    def change(self, image: Path) -> str:
        """Rewrite a few files of the image with debugfs; the digest of the result."""
        n = self.rng.randrange(1 << 20)
        sources = ["/etc/services", "/etc/protocols", "/usr/share/common-licenses/GPL-3"]
        debugfs(image, *[f"write {self.rng.choice(sources)} f{n}-{i}" for i in range(3)])
        return digest(image)

    def snapshots(self, repo: Path) -> dict[str, dict[str, Any]]:
        proc = self.cli("list", str(repo), "--json")
        if proc.returncode != 0:
            self.fail(f"list failed: {proc.stderr.strip()}")
            return {}
        return {s["id"]: s for snaps in json.loads(proc.stdout).values() for s in snaps}

    def check_restores(self, repo: Path, digests: dict[str, str], allowed_gone: set[str]) -> None:
        """Every snapshot restores to its image's bytes; none vanished unless a prune could."""
        present = self.snapshots(repo)
        for sid, want in list(digests.items()):
            if sid not in present:
                if sid not in allowed_gone:
                    self.count("lost")
                    self.failures.append(f"snapshot {sid} is gone, no prune could remove it")
                del digests[sid]
                continue
            target = self.root / "restored.img"
            target.unlink(missing_ok=True)
            proc = self.cli("restore", str(repo), present[sid]["volume"], sid, str(target))
            self.count("restores")
            if proc.returncode != 0:
                self.count("lost")
                self.failures.append(f"restore of {sid} failed: {proc.stderr.strip()}")
            elif digest(target) != want:
                self.count("wrong_bytes")
                self.failures.append(f"restore of {sid} returned other bytes")
        verify = self.cli("verify", str(repo), "--read-data")
        if verify.returncode != 0:
            self.fail(f"verify --read-data failed: {verify.stdout[-500:]} {verify.stderr}")

    # --- kill -9 ---------------------------------------------------------------------

    def kills(self, trials: int) -> None:
        repo = self.root / "kill-repo"
        self.cli("init", str(repo))
        images = {f"vol{i}": self.image(f"kill{i}") for i in range(2)}
        digests: dict[str, str] = {}
        allowed_gone: set[str] = set()
        for volume, image in images.items():
            proc = self.cli("snapshot", str(repo), volume, str(image), "--json")
            digests[json.loads(proc.stdout)["id"]] = digest(image)
        ops = ["snapshot", "snapshot", "snapshot", "full", "prune", "gc", "synthesize",
               "restore", "verify"]  # fmt: skip
        for trial in range(trials):
            op = self.rng.choice(ops)
            volume = self.rng.choice(sorted(images))
            image = images[volume]
            before = self.snapshots(repo)
            if op in ("snapshot", "full"):
                state = self.change(image)
                args = ["snapshot", str(repo), volume, str(image), *(["--full"] * (op == "full"))]
            elif op == "prune":
                # keep-last 3 may remove any snapshot of the volume but its 3 newest.
                mine = [s for s in before.values() if s["volume"] == volume]
                mine.sort(key=lambda s: s["time"])
                allowed_gone |= {s["id"] for s in mine[:-3]}
                args = ["prune", str(repo), volume, "--keep-last", "3"]
            elif op == "gc":
                args = ["gc", str(repo), "--compact-below", "0.95"]
            elif op == "synthesize":
                args = ["synthesize", str(repo), volume]
            elif op == "restore":
                args = ["restore", str(repo), volume, "latest", str(self.root / "kr.img")]
            else:
                args = ["verify", str(repo)]
            # Killed anywhere from start-up to just past its usual end.
            usual = self.durations.get(args[0], 1.0)
            self.cli(*args, kill_after=self.rng.uniform(0.02, 1.1 * usual))
            self.count("kill_trials")
            after = self.snapshots(repo)
            # A synthetic full holds what the volume's latest snapshot held.
            source = [sid for sid, s in before.items() if s["volume"] == volume][-1:]
            for sid in after:
                if sid not in before and sid not in digests:
                    if op in ("snapshot", "full"):
                        digests[sid] = state
                    elif op == "synthesize" and source and source[0] in digests:
                        digests[sid] = digests[source[0]]
            (self.root / "kr.img").unlink(missing_ok=True)
            verify = self.cli("verify", str(repo))
            if verify.returncode != 0:
                self.count("false_damage")
                self.failures.append(f"verify after killed {op}: {verify.stdout[-800:]}")
            if trial % 25 == 24:
                self.check_restores(repo, digests, allowed_gone)
        self.cli("gc", str(repo))
        self.check_restores(repo, digests, allowed_gone)
        self.count("kill_snapshots_checked", len(digests))

    # --- concurrency -----------------------------------------------------------------

    def concurrent(self, seconds: float) -> None:
        repo = self.root / "conc-repo"
        self.cli("init", str(repo))
        digests: dict[str, str] = {}
        volumes: dict[str, str] = {}
        pruned_ok: set[str] = set()
        deadline = time.monotonic() + seconds

        def snapshot_loop(volume: str) -> None:
            image = self.image(f"conc-{volume}", 32)
            while time.monotonic() < deadline:
                state = self.change(image)
                proc = self.cli("snapshot", str(repo), volume, str(image), "--json")
                self.count("concurrent_ops")
                if proc.returncode == 0:
                    with self.lock:
                        sid = json.loads(proc.stdout)["id"]
                        digests[sid], volumes[sid] = state, volume
                elif proc.returncode != 4:  # 4: the volume is being snapshotted elsewhere
                    self.fail(f"snapshot failed: {proc.stderr.strip()}")

        def prune_gc_loop() -> None:
            while time.monotonic() < deadline:
                with self.lock:
                    pruned_ok.update(digests)  # any snapshot may go: keep-last 2 per volume
                for args in (["prune", str(repo), "--keep-last", "2"],
                             ["gc", str(repo), "--compact-below", "0.95"]):  # fmt: skip
                    proc = self.cli(*args)
                    self.count("concurrent_ops")
                    if proc.returncode not in (0, 2):  # 2: no volume has a snapshot yet
                        self.fail(f"{args[0]} failed: {proc.stderr.strip()}")
                time.sleep(0.2)

        def verify_loop(*extra: str) -> None:
            while time.monotonic() < deadline:
                proc = self.cli("verify", str(repo), *extra)
                self.count("concurrent_ops")
                self.count("concurrent_verifies")
                if proc.returncode != 0 and "does not exist" not in proc.stderr:
                    self.count("false_damage")
                    self.failures.append(f"concurrent verify: {proc.stdout[-800:]}")

        def restore_loop() -> None:
            target = self.root / "conc-restore.img"
            while time.monotonic() < deadline:
                with self.lock:
                    choices = sorted(digests)
                if not choices:
                    time.sleep(0.2)
                    continue
                sid = self.rng.choice(choices)
                target.unlink(missing_ok=True)
                proc = self.cli("restore", str(repo), volumes[sid], sid, str(target))
                self.count("concurrent_ops")
                if proc.returncode == 0:
                    self.count("concurrent_restores")
                    if digest(target) != digests[sid]:
                        self.count("wrong_bytes")
                        self.failures.append(f"concurrent restore of {sid} returned other bytes")
                elif proc.returncode != 3:  # 3: pruned meanwhile
                    self.fail(f"concurrent restore failed: {proc.stderr.strip()}")

        threads = [threading.Thread(target=snapshot_loop, args=(f"cvol{i}",)) for i in range(3)]
        threads += [
            threading.Thread(target=prune_gc_loop),
            threading.Thread(target=verify_loop),
            threading.Thread(target=verify_loop, args=("--read-data",)),
            threading.Thread(target=restore_loop),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.check_restores(repo, digests, pruned_ok)

    # --- corruption ------------------------------------------------------------------

    def corruptions(self, trials: int) -> None:
        clean = self.root / "clean-repo"
        self.cli("init", str(clean))
        image = self.image("corrupt", 32)
        digests: dict[str, tuple[str, str]] = {}
        for volume in ("a", "b"):
            for _ in range(2):
                state = self.change(image)
                proc = self.cli("snapshot", str(clean), volume, str(image), "--json")
                digests[json.loads(proc.stdout)["id"]] = (volume, state)
        files = [
            p
            for p in clean.rglob("*")
            if p.is_file() and p.parent.name != "locks" and p.stat().st_size
        ]
        for _ in range(trials):
            repo = self.root / "corrupt-repo"
            shutil.rmtree(repo, ignore_errors=True)
            shutil.copytree(clean, repo)
            victim = repo / self.rng.choice(files).relative_to(clean)
            size = victim.stat().st_size
            with open(victim, "r+b") as f:
                at = self.rng.randrange(size)
                f.seek(at)
                byte = f.read(1)[0]
                f.seek(at)
                f.write(bytes([byte ^ (1 << self.rng.randrange(8))]))
            self.count("corruption_trials")
            verify = self.cli("verify", str(repo), "--read-data")
            detected = verify.returncode != 0
            wrong = False
            for sid, (volume, want) in digests.items():
                target = self.root / "corrupt-restore.img"
                target.unlink(missing_ok=True)
                proc = self.cli("restore", str(repo), volume, sid, str(target))
                if proc.returncode == 0 and digest(target) != want:
                    wrong = True
                detected |= proc.returncode != 0
            if wrong:
                self.count("wrong_bytes")
                self.failures.append(
                    f"flipped byte {at} of {victim.relative_to(repo)}: wrong bytes"
                )
            self.count("corruption_detected" if detected else "corruption_harmless")

    # --- hostile images --------------------------------------------------------------

    def hostile(self, trials: int) -> None:
        repo = self.root / "hostile-repo"
        self.cli("init", str(repo))
        base = self.image("hostile-base", 16)
        data = base.read_bytes()
        used = [at for at in range(0, len(data), 4096) if data[at : at + 4096] != bytes(4096)]
        for trial in range(trials):
            variant = self.root / "hostile.img"
            shutil.copyfile(base, variant)
            with open(variant, "r+b") as f:
                for _ in range(self.rng.randint(2, 24)):
                    f.seek(self.rng.choice(used[:64]) + self.rng.randrange(4096))
                    f.write(self.rng.randbytes(self.rng.choice([1, 4, 16, 512])))
            volume = f"h{trial}"
            self.cli("snapshot", str(repo), volume, str(variant))
            sandbox = self.root / "sandbox"
            shutil.rmtree(sandbox, ignore_errors=True)
            (sandbox / "target").mkdir(parents=True)
            for args in (
                ["ls", str(repo), volume, "latest", "/", "-l"],
                ["find", str(repo), volume, "latest", "*"],
                ["extract", str(repo), volume, "latest", "/", "--to", str(sandbox / "target")],
            ):
                proc = self.cli(*args)
                self.count("hostile_commands")
                if proc.returncode not in (0, 1, 10):
                    self.fail(f"hostile {args[0]} ended with {proc.returncode}: {proc.stderr}")
            if sorted(os.listdir(sandbox)) != ["target"]:
                self.fail(f"hostile extract wrote outside its target: {os.listdir(sandbox)}")
            self.count("hostile_images")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaign")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--concurrent-seconds", type=float, default=60)
    parser.add_argument("--corruptions", type=int, default=50)
    parser.add_argument("--hostile", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(args.dir, args.seed)
    started = time.monotonic()
    campaign.kills(args.kills)
    campaign.concurrent(args.concurrent_seconds)
    campaign.corruptions(args.corruptions)
    campaign.hostile(args.hostile)
    verdicts = ("lost", "wrong_bytes", "crashes", "false_damage", "failures")
    counts = {**dict.fromkeys(verdicts, 0), **campaign.counts}
    result = {
        **counts,
        "seconds": round(time.monotonic() - started),
        "failure_messages": campaign.failures[:50],
    }
    print(json.dumps(result, indent=2))
    bad = sum(counts[k] for k in verdicts)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
