"""Retention policies: which of a volume's snapshots a policy keeps, and by which rule.

The rules have their usual meaning (as in restic and borg):

    keep_last N      the N newest snapshots
    keep_hourly N    the newest snapshot of each of the N newest hours that have one;
                     likewise daily, weekly (ISO weeks), monthly and yearly
    keep_within D    every snapshot less than D older than the newest snapshot, where D
                     is a duration such as "14d", "36h", "2w" or "1y6m" (y, m for calendar
                     years and months, w, d, h)

Periods are taken in UTC, the time in which snapshot records keep their time.  keep_within
counts back from the volume's newest snapshot, not from now, so a volume whose backups
stopped keeps its last restore points instead of losing them all.  A snapshot is kept
when any rule keeps it; a protected snapshot is always kept.  A saved policy is the JSON
object of the non-zero fields of Policy, e.g. {"keep_within": "14d"}.

Times are not trusted to push restore points out, because a host with a wrong clock (or an
attacker with backup credentials) can record any time:

- A snapshot dated more than CLOCK_SKEW after the pruning host's clock is "future-dated":
  it is kept, and it takes no part in the rules, so it neither fills a keep_last or period
  slot nor becomes the newest snapshot that keep_within counts back from.  Once its time
  has come it is an ordinary snapshot.
- The volume's latest snapshot in commit order (the one `latest` names and the next
  incremental builds on) is always kept, whatever its time, so a clock that jumped back
  cannot make the newest backup look old enough to go.

A pruning host whose own clock is far ahead sees no snapshot as future-dated; snapshot
records the clock of the host that took them, and `snapshot --time` refuses times beyond
CLOCK_SKEW from now unless asked to import one (see snapshot.py).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from blocksnap.errors import IntegrityError, UsageError
from blocksnap.model import CLOCK_SKEW, SnapshotInfo

_DURATION = re.compile(r"(?:(\d+)y)?(?:(\d+)m)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?")
_PERIODS: dict[str, Callable[[datetime.datetime], object]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


def parse_duration(text: str) -> tuple[int, int, int, int, int]:
    """(years, months, weeks, days, hours) of a duration such as "14d" or "1y6m"."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise UsageError(f"{text!r} is not a duration like 14d, 36h, 2w, 6m or 1y")
    return tuple(int(g or 0) for g in match.groups())  # type: ignore[return-value]


def subtract(moment: datetime.datetime, duration: str) -> datetime.datetime:
    """moment minus the duration, calendar-aware (a month back from 31 March is 28/29 Feb)."""
    years, months, weeks, days, hours = parse_duration(duration)
    month_index = moment.year * 12 + moment.month - 1 - years * 12 - months
    year, month = divmod(month_index, 12)
    month += 1
    if year < 1:
        return datetime.datetime.min.replace(tzinfo=datetime.UTC)
    next_month = datetime.date(year + (month == 12), month % 12 + 1, 1)
    last_day = (next_month - datetime.timedelta(days=1)).day
    shifted = moment.replace(year=year, month=month, day=min(moment.day, last_day))
    return shifted - datetime.timedelta(weeks=weeks, days=days, hours=hours)


@dataclass(frozen=True, slots=True)
class Policy:
    """A retention policy; every field 0 (or None) means "this rule keeps nothing"."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "keep_within":
                if value is not None:
                    parse_duration(value)
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{f.name.replace('_', '-')} must be a whole number >= 0")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise IntegrityError(f"saved policy has unknown rules {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        return ", ".join(
            f"{name.replace('_', '-')} {value}" for name, value in self.to_dict().items()
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a snapshot stays, and every rule that keeps it (empty when it goes)."""

    snapshot: SnapshotInfo
    reasons: tuple[str, ...]

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def snapshot_time(info: SnapshotInfo) -> datetime.datetime:
    try:
        moment = datetime.datetime.strptime(info.time, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise IntegrityError(f"snapshot {info.id} has an unreadable time {info.time!r}") from exc
    return moment.replace(tzinfo=datetime.UTC)


def decide(
    snapshots: Iterable[SnapshotInfo],
    policy: Policy,
    protected: set[str] | None = None,
    *,
    now: datetime.datetime | None = None,
) -> list[Decision]:
    """Apply a policy to one volume's snapshots, given in commit order (oldest first).

    The decisions come newest first.  now is the pruning host's clock (default: the current
    time); snapshots dated beyond now + CLOCK_SKEW are kept as future-dated, outside the rules.
    """
    if policy.empty:
        raise UsageError("the retention policy is empty: it would remove every snapshot")
    protected = protected or set()
    committed = list(snapshots)
    horizon = (now or datetime.datetime.now(datetime.UTC)) + CLOCK_SKEW
    # Newest first; among equal times (a synthetic full has its source's time), the one
    # committed later counts as newer.
    ordered = [
        s
        for _, s in sorted(
            enumerate(committed), key=lambda p: (snapshot_time(p[1]), p[0]), reverse=True
        )
    ]
    reasons: dict[str, list[str]] = {s.id: [] for s in ordered}
    ruled = []
    for s in ordered:
        if snapshot_time(s) > horizon:
            reasons[s.id].append("future-dated")
        else:
            ruled.append(s)
    for s in ruled[: policy.keep_last]:
        reasons[s.id].append("last")
    for period, bucket_of in _PERIODS.items():
        wanted = int(getattr(policy, f"keep_{period}"))
        last_bucket: object = None
        kept = 0
        for s in ruled:
            if kept >= wanted:
                break
            bucket = bucket_of(snapshot_time(s))
            if bucket != last_bucket:
                reasons[s.id].append(period)
                kept += 1
                last_bucket = bucket
    if policy.keep_within and ruled:
        cutoff = subtract(snapshot_time(ruled[0]), policy.keep_within)
        for s in ruled:
            if snapshot_time(s) > cutoff:
                reasons[s.id].append(f"within {policy.keep_within}")
    if committed:
        reasons[committed[-1].id].append("latest")
    for s in ordered:
        if s.id in protected:
            reasons[s.id].append("protected")
    return [Decision(s, tuple(reasons[s.id])) for s in ordered]
