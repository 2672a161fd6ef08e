"""How the CLI talks to people and machines: JSON documents, tables, progress on stderr.

Names inside an image are bytes on Linux filesystems (ext, XFS, btrfs) and need not be
UTF-8.  blocksnap carries a name as a str decoded as Python decodes a Linux path
(os.fsdecode: UTF-8, each byte that is not part of valid UTF-8 kept as a lone surrogate
U+DC80..U+DCFF), so os.fsencode gives back the exact bytes when extracting, and a path
typed on the command line (which Python decodes the same way) matches it.

Human output shows such text through `shown`: control characters and those bytes are
escaped (see there), so a name or label can neither forge lines nor drive the terminal.

JSON output (--json) is always valid UTF-8 (ASCII, in fact) and holds only valid Unicode
strings:

- A member "name", "path" or "target" whose value is not valid UTF-8 (an image's name
  holding bytes that are not UTF-8, or an NTFS name holding an unpaired UTF-16 surrogate)
  is written with each offending code point replaced by U+FFFD, for display, and the
  object gets a member "name_bytes" ("path_bytes", "target_bytes") beside it: the exact
  bytes, base64 (RFC 4648, standard alphabet, padded).  They are the bytes the name has
  on a Linux host, as extract writes it (os.fsencode); for an unpaired UTF-16 surrogate,
  which no such bytes spell (extract refuses the name), its generalized UTF-8 (WTF-8)
  form.  (An NTFS unit U+DC80..U+DCFF alone is taken, as os.fsencode takes it, for the
  byte it stands for under surrogateescape.)  A consumer uses "X_bytes" when present,
  else "X"; a name that is valid UTF-8 gets no "X_bytes", so nothing changes for it.
- Any other string that is not valid Unicode (a label given as such bytes, a message
  quoting a name) has each offending code point replaced by U+FFFD.

Not the JSON "\\udcXX" escape of the surrogate itself: RFC 8259 (section 8.2) leaves the
handling of a lone surrogate to the parser, and many replace it, reject the document or
emit invalid UTF-8 when they write it out again.  Base64 beside a readable string keeps
every consumer's strings valid and the bytes exact.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from blocksnap import interrupts
from blocksnap.errors import UsageError
from blocksnap.model import Progress, ProgressCallback, ProgressUnit, SnapshotInfo
from blocksnap.retention import Policy
from blocksnap.store import catalog

if TYPE_CHECKING:
    from tqdm import tqdm


def shown(text: str) -> str:
    """Text that an image or a user chose, as a terminal may show it: one line, nothing
    the terminal would act on, no bytes that are not text.

    Printable characters stay as they are.  A byte that was not UTF-8 (a name decoded with
    surrogateescape) is shown as \\xNN, the byte; so are C0 controls and DEL, which are
    their own byte in UTF-8.  Any other character that is not printable (C1 controls,
    format characters such as bidirectional overrides, separators other than space) is
    shown as \\uNNNN or \\UNNNNNNNN, so \\xNN always means one byte.  A backslash is
    shown as itself: the human form is for reading, --json gives the exact name.
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        code = ord(char)
        if char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


_SURROGATE = re.compile("[\ud800-\udfff]")  # the only code points UTF-8 cannot encode


def _is_text(value: str) -> bool:
    return _SURROGATE.search(value) is None


def exact_bytes(value: str) -> bytes:
    """The bytes a name carried as a str stands for (see the module's docstring)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def with_bytes(document: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`document` with "K_bytes" beside each of `keys` whose value is a str that is not
    valid UTF-8: the exact bytes, base64."""
    extra = {
        f"{key}_bytes": base64.b64encode(exact_bytes(value)).decode("ascii")
        for key in keys
        if isinstance(value := document.get(key), str) and not _is_text(value)
    }
    return {**document, **extra} if extra else document


def _sound(value: Any) -> Any:
    """A document whose strings are all valid Unicode: lone surrogates become U+FFFD."""
    if isinstance(value, str):
        return value if _is_text(value) else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_sound(k): _sound(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sound(v) for v in value]
    return value


def emit_json(document: Any) -> None:
    """Print a JSON document (see the module's docstring for strings that are not text)."""
    json.dump(_sound(document), sys.stdout, indent=2, sort_keys=True)
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
    """Progress for people on stderr, only when it is a terminal: one tqdm bar per phase.

    Each phase gets a bar of its own in its own unit (bytes scaled by 1024, counts of
    objects, packs or snapshots as counts), so its rate and ETA are measured within the
    phase.  A bar is cleared from its line when its phase ends, and the last one however
    the command ends (done, an error, Ctrl-C): nothing of a bar stays on the terminal.
    """

    def __init__(self, enabled: bool | None = None, file: TextIO | None = None) -> None:
        self.file = sys.stderr if file is None else file
        self.enabled = self.file.isatty() if enabled is None else enabled
        self._bar: tqdm[NoReturn] | None = None
        self._phase: tuple[str, ProgressUnit] | None = None

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        try:
            if self._bar is None or self._phase != (p.phase, p.unit):
                self.close()
                self._bar = self._open(p)
                self._phase = (p.phase, p.unit)
            bar = self._bar
            if p.total and p.total != bar.total:
                bar.total = p.total
            bar.update(p.done - bar.n)
        except OSError:  # the terminal went away: the work goes on without a display
            self.enabled = False
            self.close()

    def _open(self, p: Progress) -> tqdm[NoReturn]:
        # Imported here: a run without a terminal never loads it, and the CLI starts faster.
        from tqdm import tqdm

        in_bytes = p.unit is ProgressUnit.BYTES
        return tqdm(
            desc=p.phase,
            total=p.total or None,
            initial=p.done,  # shown at once; the rate counts only what is done from now
            unit="B" if in_bytes else f" {p.unit.value}",
            unit_scale=in_bytes,
            unit_divisor=1024 if in_bytes else 1000,
            file=self.file,
            leave=False,  # close() clears the line
            dynamic_ncols=True,
            mininterval=0.2,
        )

    def close(self) -> None:
        """Clear the current bar's line; idempotent."""
        bar, self._bar, self._phase = self._bar, None, None
        if bar is not None:
            # A display that cannot be cleared must not change the command's outcome.
            with contextlib.suppress(OSError):
                bar.close()
                self.file.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        """Clear the bar's line, however the command ended."""
        self.close()


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """A byte count for argparse: "4096", "512M", "2G", "1T" (binary units); 0 only if
    allow_zero."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit() or int(number) < (0 if allow_zero else 1):
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 4096, 512M, 2G)")
    return int(number) * _SIZE_UNITS[unit]


def labels_text(labels: dict[str, str]) -> str:
    """A snapshot's labels on one line for people: KEY=VALUE KEY=VALUE, each shown."""
    return " ".join(f"{shown(k)}={shown(v)}" for k, v in sorted(labels.items()))


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
