"""A crash, concurrency, corruption and hostile-image campaign against the real CLI.

    python -m tests.campaign DIR [--kills N] [--concurrent-seconds S] [--corruptions N]
                                 [--hostile N] [--seed N]

Every command runs as `python -m blocksnap` in a child process, on real ext4 images made
with mkfs.ext4 -d and changed with debugfs, into a real repository.  The rules checked are
format 2's (store/__init__.py): the objects are the truth, the index a cache of them.

- kills: a random command (snapshot, full snapshot, --time import, prune, gc with
  compaction, synthesize, restore, verify, protect, unprotect, policy, repair
  --rebuild-index) killed with SIGKILL at a random moment.  After each: every snapshot
  whose record object exists and no tombstone names is listed (and nothing else is), a
  snapshot is listed as protected exactly when its protection object exists, a new
  incremental's parent is the volume's previous latest, each volume's policy is its
  policy object's, no snapshot that was removed
  comes back, and verify passes.  Every few trials every snapshot is restored and
  compared with the image it was taken of, and the rebuild equivalence is checked: a
  copy with index/ deleted and the repository after repair --rebuild-index answer list,
  latest, latest~1 and policy exactly as before, and gc and verify then pass.  A
  snapshot that disappears without a prune that could remove it is lost.
- concurrent: three snapshot loops (one volume each), a prune + gc loop, a verify loop,
  a verify --read-data loop and a restore loop run at once for S seconds.  A verify that
  reports damage which a verify afterwards does not find is a false damage report.  The
  same object and rebuild checks as above follow.
- corruptions: one byte flipped in a copy of a repository that holds every kind of
  object (packs, snapshot records, tombstones, settings, the config, the index);
  verify --read-data and a restore of every snapshot must name the damage or return the
  right bytes: wrong bytes with success are the one outcome not allowed.  Then repair
  --rebuild-index: every snapshot that restored right before it must still be listed
  and restore right, in the same order with the same parents, protection and policy;
  the pruned snapshot must not come back; gc and verify must then pass.
- hostile: damaged copies of an ext4 image snapshotted and then listed and extracted;
  each command ends with a status, never a signal or a traceback, and nothing is
  written outside its target.

It prints one JSON document of counts; "lost", "wrong_bytes", "crashes", "false_damage",
"resurrected", "invented", "drift", "rebuild_mismatch", "repair_lost" and "failures"
must all be 0,
and the exit status is 1 if any is not.
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

from blocksnap.errors import IntegrityError
from blocksnap.store import catalog
from blocksnap.store.backend import TMP_MARKER
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
        return self.listing(repo) or {}

    def listing(self, repo: Path) -> dict[str, dict[str, Any]] | None:
        """The listed snapshots, each volume's in commit order (list syncs the index);
        None when list fails."""
        proc = self.cli("list", str(repo), "--json")
        if proc.returncode != 0:
            self.fail(f"list failed: {proc.stderr.strip()}")
            return None
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

    # --- format 2's rules, read from the objects -------------------------------------

    def check_objects(
        self, repo: Path, present: dict[str, dict[str, Any]], gone: set[str], where: str
    ) -> None:
        """The listing is what the objects say: the snapshots whose record object exists
        and no tombstone names, protected exactly when their protection object exists;
        and nothing removed before (gone) is listed again."""
        records = snapshot_ids(repo / "snapshots")
        tombstones = snapshot_ids(repo / "tombstones")
        live = records - tombstones
        listed = set(present)
        for sid in sorted(live - listed):
            self.count("lost")
            self.failures.append(f"{where}: snapshots/{sid} exists, no tombstone, not listed")
        for sid in sorted(listed - live):
            self.count("resurrected" if sid in tombstones else "invented")
            why = "a tombstone names it" if sid in tombstones else "no record object"
            self.failures.append(f"{where}: {sid} is listed, but {why}")
        for sid in sorted(listed & gone - (listed - live)):
            self.count("resurrected")
            self.failures.append(f"{where}: {sid} was removed and is listed again")
        protection = {
            name.removeprefix("protected-")
            for name in object_names(repo / "settings")
            if name.startswith("protected-")
        }
        flagged = {sid for sid, s in present.items() if s.get("protected")}
        if flagged != protection & listed:
            self.count("drift")
            self.failures.append(
                f"{where}: listed as protected {sorted(flagged)}, protection objects "
                f"{sorted(protection & listed)}"
            )
        gone |= tombstones

    def check_policies(self, repo: Path, volumes: list[str], where: str) -> None:
        """Each volume's policy, as the policy command shows it, is its policy object's."""
        saved: dict[str, object] = {}
        for name in object_names(repo / "settings"):
            if name.startswith("policy-"):
                data = (repo / "settings" / name).read_bytes()
                try:
                    setting = catalog.decode_setting(data, f"settings/{name}")
                except IntegrityError as exc:  # the kills damage nothing
                    self.fail(f"{where}: {exc}")
                    continue
                saved[str(setting.volume)] = setting.policy
        for volume in volumes:
            proc = self.cli("policy", str(repo), volume, "--json")
            shown = json.loads(proc.stdout)["policy"] if proc.returncode == 0 else "failed"
            if shown != saved.get(volume):
                self.count("drift")
                self.failures.append(
                    f"{where}: policy of {volume} shows {shown}, its object {saved.get(volume)}"
                )

    def state(self, repo: Path) -> dict[str, Any] | None:
        """What list, info latest / latest~1 and policy answer, per volume (None when
        list fails)."""
        proc = self.cli("list", str(repo), "--json")
        if proc.returncode != 0:
            self.fail(f"list failed: {proc.stderr.strip()}")
            return None
        answers: dict[str, Any] = {}
        for volume, snaps in sorted(json.loads(proc.stdout).items()):
            keys = ("id", "kind", "parent", "base", "time", "protected", "map")
            entry: dict[str, Any] = {"list": [{k: s.get(k) for k in keys} for s in snaps]}
            for name in ("latest", "latest~1"):
                info = self.cli("info", str(repo), volume, name, "--json")
                entry[name] = json.loads(info.stdout)["id"] if info.returncode == 0 else None
            policy = self.cli("policy", str(repo), volume, "--json")
            entry["policy"] = json.loads(policy.stdout) if policy.returncode == 0 else None
            answers[volume] = entry
        return answers

    def check_rebuilds(self, repo: Path, where: str) -> None:
        """A copy with index/ deleted, and the repository after repair --rebuild-index,
        answer exactly as the repository did; gc and verify pass after the repair."""
        want = self.state(repo)
        if want is None:
            return
        copy = self.root / "rebuild-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(repo, copy, ignore=lambda d, names: [n for n in names if
                                                             d == str(repo) and
                                                             n.startswith("index")])  # fmt: skip
        self.compare(want, self.state(copy), f"{where}: index/ deleted")
        shutil.rmtree(copy, ignore_errors=True)
        repair = self.cli("repair", str(repo), "--rebuild-index", "--json")
        self.count("repairs")
        if repair.returncode != 0:
            self.fail(f"{where}: repair --rebuild-index failed: {repair.stderr.strip()}")
            return
        report = json.loads(repair.stdout)
        if report.get("damaged"):
            self.fail(f"{where}: repair of an undamaged repository left out {report['damaged']}")
        self.compare(want, self.state(repo), f"{where}: repair --rebuild-index")
        for args in (["gc", str(repo)], ["verify", str(repo)], ["gc", str(repo)]):
            proc = self.cli(*args)
            if proc.returncode != 0:
                self.count("rebuild_mismatch")
                self.failures.append(
                    f"{where}: {args[0]} after repair exited {proc.returncode}: "
                    f"{(proc.stdout[-400:] + proc.stderr[-400:]).strip()}"
                )

    def compare(self, want: dict[str, Any], got: dict[str, Any] | None, where: str) -> None:
        if got == want:
            return
        self.count("rebuild_mismatch")
        if got is None:
            self.failures.append(f"{where}: list failed")
            return
        for volume in sorted(set(want) | set(got)):
            w, g = want.get(volume), got.get(volume)
            if w != g:
                diff = {
                    k: (w.get(k) if w else None, g.get(k) if g else None)
                    for k in ("list", "latest", "latest~1", "policy")
                    if (w or {}).get(k) != (g or {}).get(k)
                }
                self.failures.append(f"{where}: volume {volume} answers otherwise: {diff}"[:1500])

    # --- kill -9 ---------------------------------------------------------------------

    def kills(self, trials: int) -> None:
        repo = self.root / "kill-repo"
        self.cli("init", str(repo))
        images = {f"vol{i}": self.image(f"kill{i}") for i in range(2)}
        digests: dict[str, str] = {}
        allowed_gone: set[str] = set()
        gone: set[str] = set()  # removed once: must never be listed again
        for volume, image in images.items():
            proc = self.cli("snapshot", str(repo), volume, str(image), "--json")
            digests[json.loads(proc.stdout)["id"]] = digest(image)
        ops = ["snapshot", "snapshot", "snapshot", "full", "import", "prune", "gc",
               "synthesize", "restore", "verify", "protect", "unprotect", "policy",
               "repair"]  # fmt: skip
        for trial in range(trials):
            op = self.rng.choice(ops)
            volume = self.rng.choice(sorted(images))
            image = images[volume]
            listed = self.listing(repo)
            if listed is None:
                continue
            before = listed
            mine = [s for s in before.values() if s["volume"] == volume]  # commit order
            if op in ("snapshot", "full", "import"):
                state = self.change(image)
                args = ["snapshot", str(repo), volume, str(image), *(["--full"] * (op == "full"))]
                if op == "import":  # an older image: its time is not its place in the order
                    day = self.rng.randrange(1, 28)
                    args += ["--time", f"2025-0{self.rng.randrange(1, 10)}-{day:02d}T06:00Z"]
            elif op == "prune" and mine:
                # keep-last 3 keeps the 3 newest by time (ties: the later committed) and
                # the latest in commit order; it may remove any other.
                ranked = sorted(enumerate(mine), key=lambda p: (p[1]["time"], p[0]))
                allowed_gone |= {s["id"] for _, s in ranked[:-3]} - {mine[-1]["id"]}
                args = ["prune", str(repo), volume, "--keep-last", "3"]
            elif op in ("gc", "prune"):
                args = ["gc", str(repo), "--compact-below", "0.95"]
            elif op == "synthesize":
                args = ["synthesize", str(repo), volume]
            elif op == "restore":
                args = ["restore", str(repo), volume, "latest", str(self.root / "kr.img")]
            elif op in ("protect", "unprotect"):
                if not mine:
                    continue
                args = [op, str(repo), volume, self.rng.choice(mine)["id"]]
            elif op == "policy":
                keep = ["--keep-last", str(self.rng.randrange(2, 6))]
                args = ["policy", str(repo), volume, *(keep if self.rng.random() < 0.7
                                                      else ["--clear"])]  # fmt: skip
            elif op == "repair":
                args = ["repair", str(repo), "--rebuild-index"]
            else:
                args = ["verify", str(repo)]
            # Killed anywhere from start-up to just past its usual end; half of the
            # trials past start-up (the interpreter's start is most of a short command).
            usual = self.durations.get(f"{args[0]}-{op}", self.durations.get(args[0], 1.0))
            earliest = 0.02 if trial % 2 else 0.4 * usual
            started = time.monotonic()
            proc = self.cli(*args, kill_after=self.rng.uniform(earliest, 1.1 * usual))
            if proc.returncode >= 0:
                self.durations[f"{args[0]}-{op}"] = time.monotonic() - started
            self.count("kill_trials")
            self.count(f"kill_trials_{op}")
            listed = self.listing(repo)
            if listed is None:
                continue
            after = listed
            self.check_objects(repo, after, gone, f"after killed {op}")
            self.check_policies(repo, sorted(images), f"after killed {op}")
            gone |= set(before) - set(after)
            # A synthetic full holds what the volume's latest snapshot held.
            source = mine[-1]["id"] if mine else None
            for sid in after:
                if sid not in before and sid not in digests:
                    if op in ("snapshot", "full", "import"):
                        digests[sid] = state
                        parent = after[sid]["parent"]
                        if op != "full" and parent != source:
                            self.fail(f"wrong parent: {op} {sid} has parent {parent}, the "
                                      f"volume's latest was {source}")  # fmt: skip
                    elif op == "synthesize" and source in digests:
                        digests[sid] = digests[source]
                    else:
                        self.count("invented")
                        self.failures.append(f"{sid} appeared after a killed {op}")
            (self.root / "kr.img").unlink(missing_ok=True)
            verify = self.cli("verify", str(repo))
            if verify.returncode != 0:
                self.count("false_damage")
                self.failures.append(
                    f"verify after killed {op}: {verify.stdout[-800:]} {verify.stderr[-400:]}"
                )
            if trial % 25 == 24:
                self.check_restores(repo, digests, allowed_gone)
                self.check_rebuilds(repo, f"kill trial {trial}")
        self.cli("gc", str(repo))
        self.check_restores(repo, digests, allowed_gone)
        self.check_objects(repo, self.snapshots(repo), gone, "end of kills")
        self.check_rebuilds(repo, "end of kills")
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
                    self.count("concurrent_snapshots")
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
                    self.failures.append(
                        f"concurrent verify {' '.join(extra)} exited {proc.returncode}: "
                        f"{proc.stdout[-800:]} {proc.stderr[-800:]}"
                    )

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
        self.check_objects(repo, self.snapshots(repo), set(), "after the concurrent run")
        self.check_rebuilds(repo, "after the concurrent run")

    # --- corruption ------------------------------------------------------------------

    def corruptions(self, trials: int) -> None:
        clean = self.root / "clean-repo"
        self.cli("init", str(clean))
        image = self.image("corrupt", 32)
        digests: dict[str, tuple[str, str]] = {}
        # Every kind of object: packs of blocks and of nodes, records (one of an import
        # dated before its parent), a tombstone, a protection and a policy.
        for volume, count in (("a", 3), ("b", 2)):
            for i in range(count):
                state = self.change(image)
                when = ["--time", "2025-01-01T00:00Z"] * (volume == "b" and i == 1)
                proc = self.cli("snapshot", str(clean), volume, str(image), "--json", *when)
                digests[json.loads(proc.stdout)["id"]] = (volume, state)
        before = set(self.snapshots(clean))
        self.cli("prune", str(clean), "a", "--keep-last", "2")
        present = self.snapshots(clean)
        pruned = before - set(present)
        for sid in pruned:
            del digests[sid]
        self.cli("protect", str(clean), "b", sorted(s for s in digests if digests[s][0] == "b")[0])
        self.cli("policy", str(clean), "a", "--keep-last", "4")
        self.cli("gc", str(clean), "--compact-below", "0.95")
        if len(pruned) != 1 or self.cli("verify", str(clean), "--read-data").returncode != 0:
            self.fail(f"corruption setup: pruned {sorted(pruned)}, or verify failed")
        want = self.state(clean)
        files = [
            p
            for p in clean.rglob("*")
            if p.is_file() and p.parent.name != "locks" and p.name != "lock" and p.stat().st_size
        ]
        self.count("corruption_files", len(files))
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
            where = f"flipped byte {at} of {victim.relative_to(repo)}"
            kind = victim.relative_to(repo).parts[0]
            self.count("corruption_trials")
            self.count(f"corruption_trials_{kind}")
            verify = self.cli("verify", str(repo), "--read-data")
            detected = verify.returncode != 0
            wrong = False
            good = set()
            for sid, (volume, digest_want) in digests.items():
                target = self.root / "corrupt-restore.img"
                target.unlink(missing_ok=True)
                proc = self.cli("restore", str(repo), volume, sid, str(target))
                if proc.returncode == 0:
                    if digest(target) != digest_want:
                        wrong = True
                    else:
                        good.add(sid)
                detected |= proc.returncode != 0
            if wrong:
                self.count("wrong_bytes")
                self.failures.append(f"{where}: wrong bytes")
            self.count("corruption_detected" if detected else "corruption_harmless")
            self.repair_after_corruption(repo, where, digests, good, pruned, want)

    def repair_after_corruption(
        self,
        repo: Path,
        where: str,
        digests: dict[str, tuple[str, str]],
        good: set[str],
        pruned: set[str],
        want: dict[str, Any] | None,
    ) -> None:
        """repair --rebuild-index keeps every snapshot that restored right, in its order
        with its parents, protection and policy; brings back no pruned one; and leaves a
        repository on which gc and verify pass."""
        repair = self.cli("repair", str(repo), "--rebuild-index", "--json")
        self.count("corruption_repairs")
        if repair.returncode != 0:
            # Refusing (a damaged config, say) leaves the repository as it was.
            self.count("corruption_repair_refused")
            if good and "\n" in repair.stderr.strip():
                self.fail(f"{where}: repair refused with more than one line: {repair.stderr}")
            return
        report = json.loads(repair.stdout)
        present = self.listing(repo)
        if present is None:
            self.count("repair_lost")
            self.failures.append(f"{where}: list fails after repair")
            return
        for sid in sorted(set(present) & pruned):
            self.count("resurrected")
            self.failures.append(f"{where}: pruned snapshot {sid} is back after repair")
        for sid in sorted(set(present) - set(digests) - pruned):
            self.count("invented")
            self.failures.append(f"{where}: repair invented snapshot {sid}")
        for sid, (volume, digest_want) in sorted(digests.items()):
            if sid not in present:
                if sid in good:
                    self.count("repair_lost")
                    said = [d for d in report["damaged"] if sid in d]
                    self.failures.append(
                        f"{where}: repair dropped {sid}, which restored right before "
                        f"({'reported: ' + said[0] if said else 'not reported'})"
                    )
                continue
            target = self.root / "corrupt-restore.img"
            target.unlink(missing_ok=True)
            proc = self.cli("restore", str(repo), volume, sid, str(target))
            if proc.returncode == 0 and digest(target) != digest_want:
                self.count("wrong_bytes")
                self.failures.append(f"{where}: after repair, {sid} restores other bytes")
            elif proc.returncode != 0 and sid in good:
                self.count("repair_lost")
                self.failures.append(
                    f"{where}: after repair, {sid} no longer restores: {proc.stderr.strip()}"
                )
        if want is not None and good == set(digests):
            # Nothing was lost: every answer is the undamaged repository's.
            got = self.state(repo)
            # A damaged setting may be left out, but only if the repair says so.
            named = " ".join(report["damaged"])
            if got is not None and got != want and "settings" in where and "settings/" in named:
                self.count("corruption_setting_reported")
                got = want
            self.compare(want, got, f"{where}, repaired")
        for args in (["gc", str(repo)], ["verify", str(repo)]):
            proc = self.cli(*args)
            if proc.returncode != 0 and good == set(digests):
                self.count("rebuild_mismatch")
                self.failures.append(
                    f"{where}: {args[0]} after repair exited {proc.returncode}: "
                    f"{(proc.stdout[-400:] + proc.stderr[-400:]).strip()}"
                )

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


def object_names(directory: Path) -> set[str]:
    """The names of the objects in one directory of a local repository (no temporaries)."""
    if not directory.is_dir():
        return set()
    return {p.name for p in directory.iterdir() if p.is_file() and TMP_MARKER not in p.name}


def snapshot_ids(directory: Path) -> set[str]:
    """The snapshot ids that name objects under snapshots/ or tombstones/."""
    return {name for name in object_names(directory) if catalog.SNAPSHOT_ID.fullmatch(name)}


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
    verdicts = ("lost", "wrong_bytes", "crashes", "false_damage", "resurrected", "invented",
                "drift", "rebuild_mismatch", "repair_lost", "failures")  # fmt: skip
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
