"""Retention: policy rules, protection, saved policies, and a 60-day simulation on ext4."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

import pytest

import blocksnap
from blocksnap.errors import UsageError
from blocksnap.retention import Policy, decide, subtract
from tests.conftest import debugfs, make_tree, mkfs_ext4, run_cli

UTC = datetime.UTC
START = datetime.datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def one_snapshot(
    tmp_path_factory: pytest.TempPathFactory, ext4_base: Path
) -> blocksnap.SnapshotInfo:
    """A real snapshot record, whose copies with other times feed the pure policy tests."""
    path = tmp_path_factory.mktemp("ret")
    with blocksnap.Repository.init(path / "repo") as repo:
        return repo.snapshot("vol", ext4_base)


def at_times(info: blocksnap.SnapshotInfo, times: list[datetime.datetime]) -> list:  # type: ignore[type-arg]
    return [
        dataclasses.replace(info, id=f"{i:032x}", time=t.strftime("%Y-%m-%dT%H:%M:%SZ"))
        for i, t in enumerate(times)
    ]


def four_a_day(days: int) -> list[datetime.datetime]:
    return [START + datetime.timedelta(hours=6 * i) for i in range(4 * days)]


def kept(decisions: list) -> list[str]:  # type: ignore[type-arg]
    return [d.snapshot.time for d in decisions if d.keep]


def test_period_rules_keep_the_newest_snapshot_of_each_period(
    one_snapshot: blocksnap.SnapshotInfo,
) -> None:
    snaps = at_times(one_snapshot, four_a_day(10))
    assert kept(decide(snaps, Policy(keep_daily=3))) == [
        "2026-01-10T18:00:00Z",
        "2026-01-09T18:00:00Z",
        "2026-01-08T18:00:00Z",
    ]
    assert kept(decide(snaps, Policy(keep_last=2))) == [
        "2026-01-10T18:00:00Z",
        "2026-01-10T12:00:00Z",
    ]
    # 2026-01-05 is a Monday: ISO weeks end on the 4th and the 11th.
    assert kept(decide(snaps, Policy(keep_weekly=5))) == [
        "2026-01-10T18:00:00Z",
        "2026-01-04T18:00:00Z",
    ]
    assert kept(decide(snaps, Policy(keep_monthly=2, keep_yearly=1))) == ["2026-01-10T18:00:00Z"]
    assert len(kept(decide(snaps, Policy(keep_hourly=7)))) == 7
    rules = decide(snaps, Policy(keep_last=1, keep_daily=1, keep_within="1d"))
    assert rules[0].reasons == ("last", "daily", "within 1d", "latest")
    assert not rules[-1].keep and rules[-1].reasons == ()


def test_keep_within_counts_back_from_the_newest_snapshot(
    one_snapshot: blocksnap.SnapshotInfo,
) -> None:
    snaps = at_times(one_snapshot, four_a_day(60))
    assert len(kept(decide(snaps, Policy(keep_within="14d")))) == 56  # exclusive boundary
    assert len(kept(decide(snaps, Policy(keep_within="2w")))) == 56
    assert len(kept(decide(snaps, Policy(keep_within="36h")))) == 6
    assert subtract(datetime.datetime(2026, 3, 31, tzinfo=UTC), "1m").day == 28
    assert subtract(datetime.datetime(2028, 3, 31, tzinfo=UTC), "1m").day == 29
    assert subtract(datetime.datetime(2026, 3, 31, tzinfo=UTC), "1y2m").month == 1


def test_future_dated_snapshots_push_no_restore_point_out(
    one_snapshot: blocksnap.SnapshotInfo,
) -> None:
    """Four days of snapshots and one stamped 2036 (a jumped clock or a hostile writer)."""
    now = START + datetime.timedelta(days=4)
    times = [START + datetime.timedelta(days=d) for d in range(4)]
    forged = datetime.datetime(2036, 1, 1, tzinfo=UTC)
    snaps = at_times(one_snapshot, [*times, forged])
    for policy in (Policy(keep_within="14d"), Policy(keep_last=4), Policy(keep_daily=4)):
        decisions = decide(snaps, policy, now=now)
        assert [d.keep for d in decisions] == [True] * 5, policy
        assert decisions[0].reasons == ("future-dated", "latest")
    # The forged snapshot takes no slot: keep_last 1 keeps the newest real one besides it.
    assert kept(decide(snaps, Policy(keep_last=1), now=now)) == [
        "2036-01-01T00:00:00Z",
        "2026-01-04T00:00:00Z",
    ]
    # Within the allowed skew a snapshot is an ordinary one; once its time has come, too.
    early = at_times(one_snapshot, [*times, now + datetime.timedelta(minutes=10)])
    assert decide(early, Policy(keep_last=1), now=now)[0].reasons == ("last", "latest")
    assert decide(snaps, Policy(keep_last=1), now=forged)[0].reasons == ("last", "latest")


def test_the_latest_committed_snapshot_is_kept_whatever_its_time(
    one_snapshot: blocksnap.SnapshotInfo,
) -> None:
    """A clock that jumped back makes the newest backup look old: it is kept all the same."""
    times = [*four_a_day(20), START - datetime.timedelta(days=365)]
    decisions = decide(at_times(one_snapshot, times), Policy(keep_within="14d"))
    assert decisions[-1].snapshot.time == "2025-01-01T00:00:00Z"
    assert decisions[-1].reasons == ("latest",)
    assert sum(d.keep for d in decisions) == 56 + 1


def test_protected_snapshots_are_kept_and_bad_policies_refused(
    one_snapshot: blocksnap.SnapshotInfo,
) -> None:
    snaps = at_times(one_snapshot, four_a_day(3))
    decisions = decide(snaps, Policy(keep_last=1), protected={snaps[0].id})
    assert [d.reasons for d in decisions if d.keep] == [("last", "latest"), ("protected",)]
    with pytest.raises(UsageError, match="empty"):
        decide(snaps, Policy())
    for bad in ({"keep_daily": -1}, {"keep_within": "14x"}, {"keep_within": ""}):
        with pytest.raises(UsageError):
            Policy(**bad)


def test_prune_protect_and_policy_through_the_cli(ext4_image: Path, tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    for day in range(1, 5):
        debugfs(ext4_image, f"write /etc/hostname day{day}")
        run_cli("snapshot", repo, "vol", str(ext4_image), "--time", f"2026-01-0{day}T00:00:00Z",
                check=True)  # fmt: skip
    assert run_cli("protect", repo, "vol", "latest~3", check=True).returncode == 0
    dry = run_cli("prune", repo, "vol", "--keep-last", "1", "--dry-run", check=True).stdout
    lines = [line.split() for line in dry.splitlines() if line.startswith("  ")]
    assert [line[0] for line in lines] == ["keep", "remove", "remove", "keep"]
    assert lines[0][-2:] == ["last,", "latest"] and lines[-1][-1] == "protected"
    assert len(json.loads(run_cli("list", repo, "vol", "--json").stdout)["vol"]) == 4

    # No policy given and none saved: refused, nothing removed.
    proc = run_cli("prune", repo)
    assert proc.returncode == 2 and "no retention policy" in proc.stderr
    assert proc.stderr.count("\n") == 1
    run_cli("policy", repo, "vol", "--keep-last", "1", check=True)
    assert json.loads(run_cli("policy", repo, "vol", "--json").stdout)["policy"] == {"keep_last": 1}
    out = json.loads(run_cli("prune", repo, "--json", check=True).stdout)
    assert len(out["removed"]) == 2
    listing = json.loads(run_cli("list", repo, "vol", "--json").stdout)["vol"]
    assert [s["protected"] for s in listing] == [True, False]
    run_cli("unprotect", repo, "vol", listing[0]["id"], check=True)
    run_cli("prune", repo, check=True)
    assert len(json.loads(run_cli("list", repo, "vol", "--json").stdout)["vol"]) == 1
    gc = json.loads(run_cli("gc", repo, "--json", check=True).stdout)
    assert gc["objects_deleted"] > 0 and gc["bytes_freed"] > 0
    assert run_cli("verify", repo, "--read-data").returncode == 0
    for args, code, words in [
        (["prune", repo, "vol", "--keep-within", "fortnight"], 2, "not a duration"),
        (["protect", repo, "vol", "ffffffff"], 3, "not found"),
        (["policy", repo, "nosuch", "--keep-last", "2"], 3, "does not exist"),
        (["gc", repo, "--compact-below", "2"], 2, "between 0 and 1"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == code and words in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_future_time_is_refused_and_an_imported_one_pushes_nothing_out(
    ext4_image: Path, tmp_path: Path
) -> None:
    """As the campaign tried it: four snapshots on four days, then one stamped 2036."""
    repo = str(tmp_path / "repo")
    run_cli("init", repo, check=True)
    now = datetime.datetime.now(UTC).replace(microsecond=0)
    for day in range(4):
        debugfs(ext4_image, f"write /etc/hostname day{day}")
        when = (now - datetime.timedelta(days=3 - day, minutes=30)).isoformat()
        run_cli("snapshot", repo, "vol", str(ext4_image), "--time", when, check=True)
    soon = (now + datetime.timedelta(minutes=5)).isoformat()  # within the allowed skew
    run_cli("snapshot", repo, "vol", str(ext4_image), "--time", soon, check=True)
    proc = run_cli("snapshot", repo, "vol", str(ext4_image), "--time", "2036-01-01T00:00:00Z")
    assert proc.returncode == 2 and "ahead of this host's clock" in proc.stderr, proc.stderr
    assert "--allow-future-time" in proc.stderr and proc.stderr.count("\n") == 1
    assert len(json.loads(run_cli("list", repo, "vol", "--json").stdout)["vol"]) == 5
    run_cli("snapshot", repo, "vol", str(ext4_image), "--time", "2036-01-01T00:00:00Z",
            "--allow-future-time", check=True)  # fmt: skip
    dry = run_cli("prune", repo, "vol", "--keep-within", "14d", "--dry-run", check=True).stdout
    assert "future-dated" in dry and "would remove 0 snapshots" in dry
    for rules in (["--keep-within", "14d"], ["--keep-last", "5"]):
        run_cli("prune", repo, "vol", *rules, check=True)
        listing = json.loads(run_cli("list", repo, "vol", "--json").stdout)["vol"]
        assert len(listing) == 6, rules
    assert listing[-1]["time"] == "2036-01-01T00:00:00Z"


def test_sixty_days_of_four_snapshots_a_day_keep_exactly_fourteen_days(
    tmp_path: Path,
) -> None:
    """Prune after every snapshot with the saved policy "keep 14 days", gc once a day.

    On days 20 and 45 a writer with a wrong clock adds snapshots stamped 2036 and 2031: they
    are kept aside, and the 56 genuine restore points stay all the same."""
    make_tree(tmp_path / "tree", seed=7, size_mb=3)
    image = mkfs_ext4(tmp_path / "vol.img", tmp_path / "tree", 12)
    digests: dict[str, str] = {}
    forged: set[str] = set()
    with blocksnap.Repository.init(tmp_path / "repo") as repo:
        for i in range(60 * 4):
            debugfs(
                image, f"write /etc/services data/day-{i // 4}-{i % 4}", f"rm data/blob{i % 5}.bin"
            )
            when = START + datetime.timedelta(hours=6 * i)
            if i in (80, 180):
                when = datetime.datetime(2036 if i == 80 else 2031, 1, 1, tzinfo=UTC)
            info = repo.snapshot("vol", image, taken_at=when, allow_future_time=i in (80, 180))
            if i in (80, 180):
                forged.add(info.id)
            digests[info.id] = hashlib.sha256(image.read_bytes()).hexdigest()
            if i == 0:
                repo.set_policy("vol", Policy(keep_within="14d"))
            repo.prune()
            if i % 4 == 3:
                repo.gc()
        report = repo.gc()
        remaining = repo.snapshots("vol")
        genuine = [s for s in remaining if s.id not in forged]
        assert {s.id for s in remaining} >= forged
        assert len(genuine) == 56
        assert genuine[0].time == "2026-02-16T00:00:00Z"  # 1 March 18:00 less 14 days, exclusive
        for info in remaining:
            target = tmp_path / "restored.img"
            target.unlink(missing_ok=True)
            repo.restore("vol", info.id, target)
            assert hashlib.sha256(target.read_bytes()).hexdigest() == digests[info.id]
        verified = repo.verify(read_data=True)
        assert verified.ok, verified.problems
        assert verified.counts_checked > 0
        # Nothing but the 56 restore points stays referenced or stored.
        assert verified.unreferenced_objects == 0 and report.unreferenced_left == 0
        assert repo.store.index.unreferenced_count() == 0
        packs = {o.name for o in repo.store.backend.list("packs/")}
        assert len(packs) == len(repo.store.index.pack_infos())
