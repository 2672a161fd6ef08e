"""How the CLI talks to people and machines: JSON documents, tables, progress on stderr."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from blocksnap import interrupts
from blocksnap.errors import UsageError
from blocksnap.model import Progress, ProgressCallback, SnapshotInfo
from blocksnap.retention import Policy
from blocksnap.store import catalog


def emit_json(document: Any) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def add_policy_options(p: argparse.ArgumentParser) -> None:
    """The --keep-* options of a retention policy (see retention.py)."""
    for period in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(
            f"--keep-{period}",
            type=int,
            default=0,
            metavar="N",
            help="keep the N newest snapshots"
            if period == "last"
            else f"keep the newest snapshot of each of the N newest {period} periods",
        )
    p.add_argument(
        "--keep-within",
        metavar="DURATION",
        help="keep every snapshot younger than DURATION (e.g. 14d, 36h, 2w, 6m, 1y) "
        "counted back from the volume's newest snapshot",
    )


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    """The policy the --keep-* options give, or None when none was given."""
    policy = Policy(
        keep_last=args.keep_last,
        keep_hourly=args.keep_hourly,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        keep_monthly=args.keep_monthly,
        keep_yearly=args.keep_yearly,
        keep_within=args.keep_within,
    )
    return None if policy.empty else policy


def snapshot_document(info: SnapshotInfo) -> dict[str, Any]:
    """The snapshot's record as the CLI prints it (duration rounded to milliseconds)."""
    return {**catalog.fields(info), "duration": round(info.duration, 3)}


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 time with a zone (Z or +HH:MM); for argparse's type=."""
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone (add Z for UTC)")
    return value


class ProgressBar:
    """A one-line bar on stderr (bytes, rate, ETA), shown only when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and p.done_size != p.total_size:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = p.done_size / elapsed
        if p.total_size:
            frac = min(1.0, p.done_size / p.total_size)
            bar = "#" * int(frac * 30)
            eta = (p.total_size - p.done_size) / rate if rate > 0 else 0.0
            line = (
                f"\r{p.phase:10s} [{bar:30s}] {human_size(p.done_size)} / "
                f"{human_size(p.total_size)}  {human_size(rate)}/s  ETA {eta:4.0f}s"
            )
        else:
            line = f"\r{p.phase:10s} {human_size(p.done_size)}  {human_size(rate)}/s"
        sys.stderr.write(line)
        sys.stderr.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        """Clear the bar's line, however the command ended."""
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count for argparse: "4096", "512M", "2G", "1T" (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 4096, 512M, 2G)")
    return int(number) * _SIZE_UNITS[unit]


def parse_labels(items: list[str]) -> dict[str, str]:
    """KEY=VALUE arguments as a dict."""
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def settling_at(final: Callable[[Progress], bool], progress: ProgressCallback) -> ProgressCallback:
    """progress, except that from the first report for which final holds (the work is
    done and is being committed) Ctrl-C no longer interrupts: stopping there would throw
    the finished work away, or leave it committed but reported as interrupted."""

    def report(p: Progress) -> None:
        if final(p):
            interrupts.settle()
        progress(p)

    return report
