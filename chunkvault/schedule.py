"""Scheduled snapshots, the pure part: cadences, policies and what is due when.

Nothing here reads a file, a clock or a repository.  ``decide`` takes a
source's cadences, the current time and the (time, kind) of that source's
existing snapshots and says whether a full, a differential or nothing is due;
the runner in ``chunkvault.scheduler`` does the I/O around it.

A cadence is a cron expression (5 fields: minute hour day-of-month month
day-of-week, with ``*``, lists, ranges and steps, month and day names, and the
``@hourly``/``@daily``/``@weekly``/``@monthly``/``@yearly`` aliases), a short
form (``hourly``, ``daily 02:00``, ``weekly sun 03:30``, ``monthly 04:00``) or an
interval (``every 15m``, ``every 1h30m``, ``every 2d``).

Cron fields are wall-clock times in the policy's time zone (UTC unless the
policy names an IANA zone).  A wall-clock time that does not exist because
the clock jumps forward fires that many minutes after the jump (02:30 on the
spring-forward day in Europe/Berlin fires at 03:30 CEST); a wall-clock time
that occurs twice fires once, at its first occurrence.  Intervals are exact
elapsed time on a grid anchored at 1970-01-01T00:00 UTC, whatever the zone
(``every 1h`` fires on the hour, ``every 15m`` at :00, :15, :30, :45).

The due rule: a full is due when the most recent full slot at or before now
has no full snapshot at or after it; otherwise a differential is due when the
most recent differential slot has no snapshot of either kind at or after it.
Only the most recent slot counts, so slots missed while the machine was off
are caught up once, not replayed one by one.  A policy's ``check`` follows the
same rule, against the time of the last check that passed (``check_due``), and
so does its ``verify``, against the last restore verification that passed
(``verify_due``).  The state file that remembers both is read and written by
the runner; ``state_sections`` and ``state_document`` say its layout.
"""
from __future__ import annotations

import calendar
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Mapping, Protocol, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import UsageError
from .pgbackup import CHECKPOINTS
from .remotes import check_url
from .store.check import parse_subset
from .store.retention import AHEAD, RetentionPolicy, load_preset, policy_from_dict, select
from .store.excludes import ExcludeRules
from .store.source import markers_of
from .units import parse_size

__all__ = [
    "Cadence",
    "CopyTarget",
    "Cron",
    "Due",
    "Interval",
    "Policy",
    "RetentionScope",
    "Source",
    "SourceVerify",
    "check_due",
    "check_slice",
    "dated_ahead",
    "decide",
    "iso_time",
    "next_wakeup",
    "parse_cadence",
    "parse_iso_time",
    "parse_policy",
    "retention_scope",
    "source_verify",
    "state_document",
    "state_sections",
    "verify_due",
    "verified_times",
    "verification_passed",
    "zone",
]

UTC = timezone.utc
KIND_FULL = "full"
KIND_DIFF = "diff"
KIND_CHECK = "check"
KIND_VERIFY = "verify"

# How far prev/next look for a matching day: Feb 29 can be 8 years away (2096 -> 2104).
_MAX_DAYS = 366 * 29  # the Gregorian weekday calendar repeats within 28 years (outside century gaps)


class Cadence(Protocol):
    """When a job fires: ``prev`` is the latest slot at or before a time, ``next`` the first after it."""

    text: str

    def prev(self, at: datetime) -> datetime | None: ...

    def next(self, after: datetime) -> datetime | None: ...


def zone(name: str | None) -> ZoneInfo | timezone:
    """An IANA zone by name; None or "UTC" is UTC."""
    if name is None:
        return UTC
    if not isinstance(name, str) or not name.strip():  # a source's `timezone = +1` (an offset, read as a number)
        raise UsageError(f"time zone must be an IANA name like 'Europe/Berlin', got {name!r}")
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {name!r} (an IANA name like 'Europe/Berlin')") from None


def _aware(t: datetime, what: str = "time") -> datetime:
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise UsageError(f"{what} must be a timezone-aware datetime, got {t!r}")
    return t.astimezone(UTC)


# --------------------------------------------------------------------------- cron


_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_DAY_NAMES = {**{d: d for d in _DAYS}, **{full: full[:3] for full in (
    "sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")}}

# name, low, high, names
_FIELDS: tuple[tuple[str, int, int, Mapping[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)

_ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


def _cron_value(text: str, lo: int, hi: int, names: Mapping[str, int], fname: str) -> int:
    t = text.lower()
    if t in names:
        return names[t]
    if not t.isdigit():
        raise ValueError(f"{fname}: {text!r} is not a number" + (" or a name" if names else ""))
    v = int(t)
    if not lo <= v <= hi:
        raise ValueError(f"{fname}: {v} is outside {lo}-{hi}")
    return v


def parse_cron_field(text: str, index: int) -> frozenset[int]:
    """The values one cron field selects (day of week 7 folds onto 0, Sunday)."""
    fname, lo, hi, names = _FIELDS[index]
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"{fname}: empty list item in {text!r}")
        rng, _, step_text = item.partition("/")
        step = 1
        if _:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"{fname}: step must be a positive number in {item!r}")
            step = int(step_text)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a_text, b_text = rng.split("-", 1)
            a = _cron_value(a_text, lo, hi, names, fname)
            b = _cron_value(b_text, lo, hi, names, fname)
            if a > b:
                raise ValueError(f"{fname}: range {rng!r} runs backwards")
        else:
            a = _cron_value(rng, lo, hi, names, fname)
            b = hi if _ else a
        values.update(range(a, b + 1, step))
    if index == 4 and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A 5-field cron expression evaluated on the wall clock of ``tz``."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]
    dom_star: bool
    dow_star: bool
    tz: Any = UTC

    @classmethod
    def parse(cls, text: str, tz: Any = UTC) -> "Cron":
        expr = _ALIASES.get(text.strip().lower(), text)
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(f"a cron expression has 5 fields (minute hour day month weekday), got {len(parts)}")
        sets = [parse_cron_field(p, i) for i, p in enumerate(parts)]
        cron = cls(text.strip(), tuple(sorted(sets[0])), tuple(sorted(sets[1])), sets[2], sets[3], sets[4],
                   parts[2].startswith("*"), parts[4].startswith("*"), tz)
        if cron.dow_star and not any(d <= _month_days(m) for m in cron.months for d in cron.doms):
            raise ValueError("it never fires (no such day in the chosen months)")
        return cron

    def day_matches(self, d: date) -> bool:
        """Month and day fields; as in cron, a restricted day-of-month OR day-of-week matches."""
        if d.month not in self.months:
            return False
        dom_ok = d.day in self.doms
        dow_ok = d.isoweekday() % 7 in self.dows
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok

    def matches(self, wall: datetime) -> bool:
        """Does this wall-clock minute (naive, or read in its own zone) match every field?"""
        return wall.minute in self.minutes and wall.hour in self.hours and self.day_matches(wall.date())

    def slots_on(self, d: date) -> list[datetime]:
        """The instants (UTC, ascending, distinct) this expression fires on local day ``d``."""
        if not self.day_matches(d):
            return []
        out = set()
        for h in self.hours:
            for m in self.minutes:
                try:
                    out.add(datetime(d.year, d.month, d.day, h, m, tzinfo=self.tz).astimezone(UTC))
                except OverflowError:  # at the very ends of the datetime range
                    continue
        return sorted(out)

    def prev(self, at: datetime) -> datetime | None:
        at = _aware(at)
        start = at.astimezone(self.tz).date() + timedelta(days=1)
        best: datetime | None = None
        extra = 1  # after the first day with a slot, look at one more: DST shifts can reorder neighbours
        for i in range(_MAX_DAYS):
            try:
                d = start - timedelta(days=i)
            except OverflowError:
                break
            cands = [s for s in self.slots_on(d) if s <= at]
            if cands:
                best = max(best, cands[-1]) if best else cands[-1]
            if best is not None:
                if extra == 0:
                    break
                extra -= 1
        return best

    def next(self, after: datetime) -> datetime | None:
        after = _aware(after)
        start = after.astimezone(self.tz).date() - timedelta(days=1)
        best: datetime | None = None
        extra = 1
        for i in range(_MAX_DAYS):
            try:
                d = start + timedelta(days=i)
            except OverflowError:
                break
            cands = [s for s in self.slots_on(d) if s > after]
            if cands:
                best = min(best, cands[0]) if best else cands[0]
            if best is not None:
                if extra == 0:
                    break
                extra -= 1
        return best


def _month_days(month: int) -> int:
    return 29 if month == 2 else calendar.monthrange(2001, month)[1]


# --------------------------------------------------------------------------- intervals

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INTERVAL_RE = re.compile(r"(\d+)([wdhm])")
_INTERVAL_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60}


@dataclass(frozen=True)
class Interval:
    """Every ``seconds`` of elapsed time, on a grid anchored at the Unix epoch."""

    text: str
    seconds: int

    @classmethod
    def parse(cls, text: str) -> "Interval":
        body = text.strip().lower()[len("every"):].replace(" ", "")
        pos, total, seen = 0, 0, ""
        for m in _INTERVAL_RE.finditer(body):
            if m.start() != pos or m.group(2) in seen:
                break
            seen += m.group(2)
            total += int(m.group(1)) * _INTERVAL_UNITS[m.group(2)]
            pos = m.end()
        if not body or pos != len(body):
            raise ValueError("an interval looks like 'every 15m', 'every 1h30m', 'every 2d' (units w, d, h, m = minutes)")
        if total < 60:
            raise ValueError("an interval must be at least one minute")
        if total > 100 * 366 * 86400:  # datetime arithmetic ends in the year 9999
            raise ValueError("an interval must be at most 100 years")
        return cls(text.strip(), total)

    def prev(self, at: datetime) -> datetime | None:
        at = _aware(at)
        n = (at - _EPOCH) // timedelta(seconds=self.seconds)
        return _EPOCH + timedelta(seconds=n * self.seconds)

    def next(self, after: datetime) -> datetime | None:
        after = _aware(after)
        n = (after - _EPOCH) // timedelta(seconds=self.seconds)
        return _EPOCH + timedelta(seconds=(n + 1) * self.seconds)


# --------------------------------------------------------------------------- cadence parsing

_HHMM_RE = re.compile(r"^(\d{1,2}):(\d{2})\Z")
_CADENCE_HELP = ("expected a cron expression like '0 2 * * *', 'hourly', 'daily [HH:MM]', "
                 "'weekly [DAY] [HH:MM]', 'monthly [HH:MM]' or an interval like 'every 15m'")


def _hhmm(text: str) -> tuple[int, int]:
    m = _HHMM_RE.match(text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f"{text!r} is not a time of day HH:MM")
    return int(m.group(1)), int(m.group(2))


def _short_form(words: list[str]) -> str | None:
    """The cron equivalent of ``hourly`` / ``daily 02:00`` / ``weekly sun 03:00`` / ``monthly``."""
    head, rest = words[0], words[1:]
    if head == "hourly" and not rest:
        return "0 * * * *"
    if head == "daily" and len(rest) <= 1:
        h, m = _hhmm(rest[0]) if rest else (0, 0)
        return f"{m} {h} * * *"
    if head == "weekly" and len(rest) <= 2:
        day = "mon"
        if rest and rest[0] in _DAY_NAMES:  # "sun" or "sunday"; "sunburn" was taken for Sunday
            day = _DAY_NAMES[rest.pop(0)]
        if len(rest) > 1 or (rest and ":" not in rest[0]):
            raise ValueError("weekly takes a day (sun or sunday; mon when left out) and a time, e.g. "
                             "'weekly sun 03:00'")
        h, m = _hhmm(rest[0]) if rest else (0, 0)
        return f"{m} {h} * * {_DAYS[day]}"
    if head == "monthly" and len(rest) <= 1:
        h, m = _hhmm(rest[0]) if rest else (0, 0)
        return f"{m} {h} 1 * *"
    return None


def parse_cadence(text: str, tz: Any = UTC) -> Cadence:
    """A cadence from its policy-file text; UsageError with the accepted forms when it is not one."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"invalid schedule {text!r}: {_CADENCE_HELP}")
    words = text.strip().lower().split()
    try:
        if words[0] == "every":
            return Interval.parse(text)
        cron_text = _short_form(words)
        if cron_text is not None:
            c = Cron.parse(cron_text, tz)
            return Cron(text.strip(), c.minutes, c.hours, c.doms, c.months, c.dows, c.dom_star, c.dow_star, tz)
        if len(words) == 5 or words[0][0] in "@*0123456789":
            if words[0].startswith("@") and words[0] not in _ALIASES:
                raise ValueError(f"unknown alias {words[0]!r} (use one of {', '.join(_ALIASES)})")
            return Cron.parse(text, tz)
    except ValueError as exc:
        raise UsageError(f"invalid schedule {text!r}: {exc}") from None
    raise UsageError(f"invalid schedule {text!r}: {_CADENCE_HELP}")


# --------------------------------------------------------------------------- due logic


@dataclass(frozen=True)
class Due:
    """What a source needs now: ``kind`` "full", "diff" or None, for the slot ``slot``."""

    kind: str | None
    slot: datetime | None
    reason: str


def dated_ahead(t: datetime, now: datetime) -> bool:
    """Whether a snapshot dated ``t`` was taken while the clock ran ahead (more than ``AHEAD`` after ``now``):
    such a snapshot serves no slot and fills no keep rule, or it would hold off every backup, and have
    retention remove each new one, until the clock reaches its date."""
    return _aware(t, "snapshot time") > _aware(now, "now") + AHEAD


def decide(full: Cadence, diff: Cadence | None, now: datetime,
           history: Iterable[tuple[datetime, str]]) -> Due:
    """Apply the due rule (module docstring) to one source's snapshot history.  A snapshot ``dated_ahead``
    of ``now`` serves no slot."""
    now = _aware(now, "now")
    snaps = [(_aware(t, "snapshot time"), k) for t, k in history if not dated_ahead(t, now)]
    full_slot = full.prev(now)
    last_full = max((t for t, k in snaps if k == KIND_FULL), default=None)
    if last_full is None:
        return Due(KIND_FULL, full_slot, "no full snapshot yet")
    if full_slot is not None and last_full < full_slot:
        return Due(KIND_FULL, full_slot, f"full slot {_fmt(full_slot)} not served")
    if diff is not None:
        diff_slot = diff.prev(now)
        last_any = max(t for t, _ in snaps)
        if diff_slot is not None and last_any < diff_slot:
            return Due(KIND_DIFF, diff_slot, f"differential slot {_fmt(diff_slot)} not served")
    return Due(None, None, "up to date")


def _slot_due(cadence: Cadence, now: datetime, last: datetime | None, kind: str, noun: str) -> Due:
    """The rule of ``check_due`` and ``verify_due``, for a job called ``noun`` in its reasons."""
    now = _aware(now, "now")
    slot = cadence.prev(now)
    if last is None or dated_ahead(last, now):
        return Due(kind, slot, f"no {noun} yet" if last is None else f"the last {noun} is dated ahead")
    if slot is not None and _aware(last, f"{noun} time") < slot:
        return Due(kind, slot, f"{noun} slot {_fmt(slot)} not served")
    return Due(None, None, "up to date")


def check_due(cadence: Cadence, now: datetime, last: datetime | None) -> Due:
    """Whether the policy's check is due: as a full, when its most recent slot has no check that passed at
    or after it (``last``; one dated ahead of ``now`` serves no slot)."""
    return _slot_due(cadence, now, last, KIND_CHECK, "check")


def verify_due(cadence: Cadence, now: datetime, last: datetime | None) -> Due:
    """Whether the policy's restore verification is due: as a check, against the last one that passed
    (``last``): a verification that failed, or that a stop cut short, leaves the slot unserved."""
    return _slot_due(cadence, now, last, KIND_VERIFY, "verification")


def verified_times(entry: Mapping[str, Any], names: Iterable[str]) -> dict[str, datetime | None]:
    """When each source of ``names`` last passed a verification, from a repository's ``verifications`` entry:
    its own time under ``passed``; else, for a source among ``snapshots`` (an older state file's, remembered
    only once every source had passed), the entry's ``time``; else none yet."""
    passed = entry.get("passed") if isinstance(entry.get("passed"), dict) else {}
    proved = entry.get("snapshots") if isinstance(entry.get("snapshots"), dict) else {}
    out: dict[str, datetime | None] = {}
    for name in names:
        text = passed.get(name) if name in passed else entry.get("time") if name in proved else None
        out[name] = parse_iso_time(text)
    return out


def verification_passed(entry: Mapping[str, Any], names: Sequence[str], source: str, snapshot: str,
                        now: datetime) -> dict[str, Any]:
    """A repository's ``verifications`` entry once ``source`` passed with ``snapshot`` at ``now``, the policy's
    verified sources being ``names`` (a source no longer among them is dropped).  ``time``, which older
    chunkvaults read as every source's, is the oldest of their passes, and absent until each has one."""
    times = verified_times(entry, names)
    times[source] = now
    proved = entry.get("snapshots") if isinstance(entry.get("snapshots"), dict) else {}
    snapshots = {n: proved[n] for n in names if n in proved and times[n] is not None}
    snapshots[source] = snapshot
    out: dict[str, Any] = {"snapshots": snapshots, "passed": {n: iso_time(t) for n, t in times.items() if t is not None}}
    if all(t is not None for t in times.values()):
        out["time"] = iso_time(min(t for t in times.values() if t is not None))
    return out


def parse_iso_time(text: Any) -> datetime | None:
    """A time a state file holds (ISO 8601 with its zone), or None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def iso_time(t: datetime | None) -> str | None:
    """``t`` as a state file and the run's JSON hold times: UTC, to the second."""
    return t.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if t else None


STATE_VERSION = 1
_STATE_SECTIONS = ("checks", "verifications", "copies")


def state_sections(doc: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """A state file's parsed JSON as its sections (``checks``, ``verifications``, ``copies``), each by repository
    URL; what is not a table reads as nothing remembered (a check or verification too many, never one too few)."""
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in _STATE_SECTIONS}
    if not isinstance(doc, dict):
        return out
    for name in _STATE_SECTIONS:
        section = doc.get(name)
        if isinstance(section, dict):
            out[name] = {k: v for k, v in section.items() if isinstance(v, dict)}
    return out


def state_document(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON a state file holds: ``checks`` as before (older chunkvaults read it, the key they ignore
    aside), ``verifications`` beside it."""
    return {"version": STATE_VERSION, **{name: dict(sections.get(name, {})) for name in _STATE_SECTIONS}}


_SLICE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*\Z")


def check_slice(subset: str | None, last: int | None) -> tuple[str | None, int | None]:
    """The subset one scheduled check reads, and its slice number to remember.  ``n/m`` starts at slice n
    and moves on by one at each check (``last``: the slice the previous one read), so that m checks read
    every pack once; a share or a size is drawn afresh each time.  A ``last`` that is no whole number (a
    state file edited by hand) is none remembered: the check starts again at slice n."""
    m = _SLICE_RE.match(subset or "")
    if m is None:
        return subset, None
    first, count = int(m.group(1)), int(m.group(2))
    if not isinstance(last, int) or isinstance(last, bool):
        last = None
    n = first if last is None else last % count + 1
    return f"{n}/{count}", n


@dataclass(frozen=True)
class RetentionScope:
    """What a source's retention rules weigh in one run (``weighed``), and what they leave out: the
    snapshots ``dated_ahead`` (kept, not counted), those its copy-to has not received yet (``unsent``: kept
    until a copy sends them) and the one the run saved when the rules would remove it (``spared``: a run
    never undoes its own backup)."""

    weighed: list[Any]
    ahead: list[Any]
    spared: str | None = None
    unsent: list[Any] = field(default_factory=list)


def retention_scope(history: Sequence[Any], policy: RetentionPolicy, now: datetime, saved: str | None = None,
                    tz: Any = UTC, sent_through: datetime | None = None) -> RetentionScope:
    """The part of a source's ``history`` (snapshots with ``id`` and ``datetime``) that ``policy`` applies to
    at ``now``.  ``saved``: the snapshot this run made; left out of the rules (so kept) only when they
    would remove it, so that it counts towards them otherwise.  ``sent_through``: the date of the newest of
    the source's snapshots its copy-to holds; those dated after it are left out (kept): the next copy sends
    them, and forgotten first they would never reach it."""
    ahead = [s for s in history if dated_ahead(s.datetime, now)]
    unsent = [s for s in history if not dated_ahead(s.datetime, now)
              and sent_through is not None and s.datetime > sent_through]
    weighed = [s for s in history if not dated_ahead(s.datetime, now)
               and (sent_through is None or s.datetime <= sent_through)]
    if saved is None or not any(s.id == saved for s in weighed):
        return RetentionScope(weighed, ahead, unsent=unsent)
    decisions = select(weighed, policy, now, allow_remove_all=True, tz=tz)
    if any(d.snapshot_id == saved and not d.keep for d in decisions):
        return RetentionScope([s for s in weighed if s.id != saved], ahead, saved, unsent)
    return RetentionScope(weighed, ahead, unsent=unsent)


def next_wakeup(cadences: Iterable[Cadence], after: datetime) -> datetime | None:
    """The earliest slot of any cadence strictly after ``after``."""
    times = [t for c in cadences if (t := c.next(after)) is not None]
    return min(times) if times else None


def _fmt(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class CopyTarget:
    """A second repository each new snapshot of a source is copied to (off-site), with its own password
    and, optionally, its own retention of the source's copies there."""

    url: str
    password_file: str | None = None
    password_command: str | None = None
    retention: RetentionPolicy | None = None
    wal: bool = False  # copy-wal: the archived WAL files it lacks go too (copy --wal)


@dataclass(frozen=True)
class SourceVerify:
    """How a policy's ``verify`` proves a source's newest snapshot restorable: ``verify_restore``'s options
    for it (``timeout`` and ``scratch``: the source's own, else the top's)."""

    then: str | None = None
    pg_start: bool = False
    pg_query: str | None = None
    pg_expect: str | None = None
    pg_dbname: str | None = None  # None: verify_restore's default (postgres)
    pg_bindir: str | None = None  # None: the binaries of the copy's version found as verify-restore finds them
    pg_recover: bool = False  # recover from the repository's WAL archive to its end, and be promoted there
    numeric_owner: bool = False
    timeout: float | None = None
    scratch: str | None = None


@dataclass(frozen=True)
class Source:
    """One thing the policy backs up, with its own cadences, hooks and retention."""

    name: str
    paths: tuple[str, ...]
    full: Cadence
    diff: Cadence | None = None
    host: str | None = None
    tags: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    exclude_files: tuple[str, ...] = ()  # files of globs, read at each run (as backup --exclude-file)
    iexcludes: tuple[str, ...] = ()  # as excludes, ignoring case (backup --iexclude)
    iexclude_files: tuple[str, ...] = ()
    exclude_if_present: tuple[str, ...] = ()  # NAME[:HEADER], as backup --exclude-if-present
    exclude_caches: bool = False
    exclude_larger_than: int | None = None  # bytes, as backup --exclude-larger-than
    one_file_system: bool = False
    ignore_inode: bool = False  # as backup --ignore-inode (a file system snapshot mounted for each backup)
    ignore_ctime: bool = False
    fixed_chunks: tuple[str, ...] = ()  # globs of files cut at fixed offsets (database files)
    postgres: str | None = None  # the one path is a running cluster's data directory (backup --postgres): psql's
    # connection string ("" for the PG* variables)
    pg_checkpoint: str | None = None  # with postgres: "fast" or "spread" (backup --pg-checkpoint)
    pg_standby_wait: float | None = None  # with postgres on a standby: seconds (backup --pg-standby-wait)
    list_entries: bool = False  # list = true: log what each backup stores as added or modified, or finds gone
    command: str | tuple[str, ...] | None = None  # instead of paths: back up its output (a dump) as stdin_name
    stdin_name: str | None = None
    pre: str | tuple[str, ...] | None = None
    post: str | tuple[str, ...] | None = None
    retention: RetentionPolicy | None = None
    hook_timeout: float | None = None
    tz: Any = UTC  # its time zone: its cadences' wall clock, and its retention's days
    copy_to: CopyTarget | None = None
    verify: SourceVerify | None = None  # None: the policy has no verify, or this source has verify = false

    def argv(self) -> list[str]:
        """The command as run: a string through the shell, as hooks are; a list as it is."""
        assert self.command is not None
        return ["/bin/sh", "-c", self.command] if isinstance(self.command, str) else list(self.command)

    def history(self, snapshots: Sequence[Any], host: str) -> list[Any]:
        return source_history(snapshots, host, self.paths, self.stdin_name)

    def cadences(self) -> list[Cadence]:
        return [self.full] + ([self.diff] if self.diff is not None else [])


@dataclass(frozen=True)
class Policy:
    """A parsed policy file."""

    sources: tuple[Source, ...]
    repository: str | None = None
    password_file: str | None = None
    password_command: str | None = None
    timezone: str = "UTC"
    prune: bool = False
    #: After retention: archive-expire --before oldest-snapshot (WAL no kept snapshot's recovery needs).
    wal_expire: bool = False
    max_unused: float = 0.05
    max_repack_size: int | None = None
    lock_file: str | None = None
    base_dir: str = "."
    check: Cadence | None = None  # when the repository is checked
    check_subset: str | None = None  # the data a check reads: None reads none, as check without --read-data
    state_file: str | None = None  # where the last check and the last verification are remembered
    verify: Cadence | None = None  # when the newest snapshot of each source is restore-verified

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise UsageError(f"no source {name!r} in the policy (known: {', '.join(s.name for s in self.sources)})")


_VERIFY_TOP_KEYS = ("verify", "verify_scratch", "verify_timeout")
_TOP_KEYS = {"repository", "password_file", "password_command", "timezone", "full", "diff", "retention", "presets",
             "prune", "wal_expire", "max_unused", "max_repack_size", "lock_file", "hook_timeout", "source", "tags",
             "host",
             "copy_to", "copy_to_password_file", "copy_to_password_command", "copy_retention", "copy_wal", "check",
             "check_read_data_subset", "state_file", *_VERIFY_TOP_KEYS}
_VERIFY_KEYS = ("verify", "verify_then", "verify_pg_start", "verify_pg_query", "verify_pg_expect",
                "verify_pg_dbname", "verify_pg_bindir", "verify_pg_recover", "verify_numeric_owner", "verify_timeout",
                "verify_scratch")
_COPY_KEYS = ("copy_to", "copy_to_password_file", "copy_to_password_command", "copy_retention", "copy_wal")
_SOURCE_KEYS = {"name", "paths", "host", "tags", "excludes", "exclude_files", "iexcludes", "iexclude_files",
                "exclude_if_present", "exclude_caches",
                "exclude_larger_than", "one_file_system", "ignore_inode", "ignore_ctime", "fixed_chunks", "command",
                "stdin_name", "postgres", "pg_checkpoint", "pg_standby_wait", "pre", "post", "full", "diff",
                "retention", "timezone", "hook_timeout", "list",
                *_COPY_KEYS, *_VERIFY_KEYS}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def _postgres(value: Any, paths: tuple[str, ...]) -> str | None:
    """``postgres = true`` (the PG* variables say how psql reaches the server) or a connection string: the
    source's one path is the running cluster's data directory, read in place (backup --postgres)."""
    if value is None or value is False:
        return None
    if value is True:
        value = ""
    if not isinstance(value, str) or "\n" in value:
        raise UsageError(f"postgres is true or psql's connection string, not {value!r}")
    if len(paths) != 1:
        raise UsageError("postgres reads one data directory: give it as the source's only path (no command)")
    return value


def _norm_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = str(k).replace("-", "_")
        if key not in allowed:
            raise UsageError(f"unknown setting {k!r}{where} (known: {', '.join(sorted(a.replace('_', '-') for a in allowed))})")
        if key in out:
            raise UsageError(f"setting {k!r}{where} given twice")
        out[key] = v
    return out


def _str_list(value: Any, what: str, *, required: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)
            or (required and not value)):
        raise UsageError(f"{what} must be a string or a list of non-empty strings, got {value!r}")
    return tuple(value)


def _hook(value: Any, what: str) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and value[0]:
        return tuple(value)
    raise UsageError(f"{what} must be a shell command string or a non-empty argument list, got {value!r}")


def _seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    # TOML's nan and inf too: nan compared as no limit at all
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UsageError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def _repack_size(value: Any) -> int | None:
    try:
        return None if value is None else parse_size(value)
    except UsageError as exc:
        raise UsageError(f"max-repack-size: {exc}") from None


def _share(value: Any) -> float:
    if isinstance(value, bool):  # true read as 100 %
        raise UsageError(f"max-unused must be a share like 0.05 or '5%', got {value!r}")
    try:
        v = float(value[:-1]) / 100 if isinstance(value, str) and value.endswith("%") else float(value)
    except (TypeError, ValueError):
        raise UsageError(f"max-unused must be a share like 0.05 or '5%', got {value!r}") from None
    if not 0 <= v <= 1:
        raise UsageError(f"max-unused must be between 0 and 1, got {value!r}")
    return v


def _retention(value: Any, config: Mapping[str, Any], what: str) -> RetentionPolicy | None:
    if value is None:
        return None
    if isinstance(value, str):
        policy = load_preset(config, value)
        what = f"preset {value!r}"
    elif isinstance(value, Mapping):
        try:
            policy = policy_from_dict(value)
        except UsageError as exc:
            raise UsageError(f"{what}: {exc}") from None
    else:
        raise UsageError(f"{what} must be a preset name or a table of keep rules, got {value!r}")
    if policy.is_empty():
        raise UsageError(f"{what} sets no keep rule: it would remove every snapshot")
    return policy


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be true or false, got {value!r}")
    return value


def _path(base_dir: str, p: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))


def _repository_url(url: str, base_dir: str) -> str:
    """A URL as given, or a local path taken from the policy file's folder."""
    return url if "://" in url else _path(base_dir, url)


def _copy_target(s: Mapping[str, Any], top: Mapping[str, Any], config: Mapping[str, Any], base_dir: str,
                 repo: str | None) -> CopyTarget | None:
    """A source's copy-to settings, each the source's own or else the top's; the password pair is taken
    whole from where either of its keys is set (a source's file does not meet the top's command)."""
    url = s.get("copy_to", top.get("copy_to"))
    if url is None or url is False:  # false: this source is not copied, whatever the top says
        for k in _COPY_KEYS[1:]:
            if k in s:
                raise UsageError(f"{k.replace('_', '-')} needs copy-to")
        return None
    if not isinstance(url, str) or not url:
        raise UsageError(f"copy-to must be a repository URL or path (or false), got {url!r}")
    try:
        check_url(url)
    except UsageError as exc:
        raise UsageError(f"copy-to: {exc}") from None
    url = _repository_url(url, base_dir)
    if repo is not None and url == repo:
        raise UsageError("copy-to names the policy's own repository: copy to a second one")
    pw_keys = ("copy_to_password_file", "copy_to_password_command")
    holder = s if any(k in s for k in pw_keys) else top
    file, command = (holder.get(k) for k in pw_keys)
    if file is not None and command is not None:
        raise UsageError("copy-to-password-file and copy-to-password-command both given: use one")
    for k, v in zip(pw_keys, (file, command)):
        if v is not None and (not isinstance(v, str) or not v):
            raise UsageError(f"{k.replace('_', '-')} must be a {'path' if k.endswith('file') else 'command line'}, "
                             f"got {v!r}")
    retention = _retention(s.get("copy_retention", top.get("copy_retention")), config, "copy-retention")
    wal = _flag(s.get("copy_wal", top.get("copy_wal", False)), "copy-wal")
    return CopyTarget(url, None if file is None else _path(base_dir, file), command, retention, wal)


def _check_settings(top: Mapping[str, Any], tz: Any) -> tuple[Cadence | None, str | None]:
    text, subset = top.get("check"), top.get("check_read_data_subset")
    check = None
    if text is not None:
        try:
            check = parse_cadence(text, tz)
        except UsageError as exc:
            raise UsageError(f"check: {exc}") from None
    if subset is None:
        return check, None
    if check is None:
        raise UsageError("check-read-data-subset needs check (a schedule, e.g. check = \"weekly sun 04:00\")")
    if not isinstance(subset, str):
        raise UsageError(f"check-read-data-subset must be text like \"1/7\", \"5%\" or \"500M\", got {subset!r}")
    try:
        parse_subset(subset)
    except UsageError as exc:
        raise UsageError(f"check-read-data-subset: {exc}") from None
    return check, subset.strip()


def _verify_settings(top: Mapping[str, Any], tz: Any, base_dir: str) -> tuple[Cadence | None, SourceVerify]:
    """The top's verify cadence, and the defaults its ``verify-timeout`` and ``verify-scratch`` give each
    source."""
    text = top.get("verify")
    cadence = None
    if text is not None:
        if isinstance(text, bool):
            raise UsageError(f"verify at the top is a schedule like \"weekly sun 05:00\" (a source's verify = "
                             f"false leaves that one out), got {text!r}")
        try:
            cadence = parse_cadence(text, tz)
        except UsageError as exc:
            raise UsageError(f"verify: {exc}") from None
    for k in _VERIFY_TOP_KEYS[1:]:
        if k in top and cadence is None:
            raise UsageError(f"{k.replace('_', '-')} needs verify (a schedule, e.g. verify = \"weekly sun 05:00\")")
    return cadence, SourceVerify(timeout=_seconds(top.get("verify_timeout"), "verify-timeout"),
                                 scratch=_scratch(top.get("verify_scratch"), base_dir))


def _scratch(value: Any, base_dir: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise UsageError(f"verify-scratch must be a directory's path, got {value!r}")
    return _path(base_dir, value)


def _text(value: Any, what: str, *, empty: bool = False) -> str | None:
    """An optional string setting; an empty one is refused unless ``empty`` (an expected answer may be
    empty, a command or a query may not: \"$CHECK\" left unset must not pass as proven)."""
    if value is None:
        return None
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise UsageError(f"{what} must be {'a string' if empty else 'a non-empty string'}, got {value!r}")
    return value


def source_verify(s: Mapping[str, Any], cadence: Cadence | None, defaults: SourceVerify, *, postgres: bool,
                  command: bool, base_dir: str = ".") -> SourceVerify | None:
    """A source's verify settings (keys as in the policy file, snake_case), or None when it is not verified:
    no verify at the top, or ``verify = false`` here.  ``verify-pg-start`` defaults to whether the source is
    a ``postgres`` one; each pg setting needs it, an expected answer needs its query."""
    given = [k for k in _VERIFY_KEYS if k in s]
    enabled = s.get("verify", True)
    if not isinstance(enabled, bool):
        raise UsageError(f"verify in a source is true or false (the schedule is the top's verify), got {enabled!r}")
    if cadence is None:
        if given:
            raise UsageError(f"{given[0].replace('_', '-')} needs verify at the top (a schedule, e.g. "
                             "verify = \"weekly sun 05:00\")")
        return None
    if not enabled:
        others = [k for k in given if k != "verify"]
        if others:
            raise UsageError(f"{others[0].replace('_', '-')} is for a verified source: verify = false leaves "
                             "this one out")
        return None
    then = _text(s.get("verify_then"), "verify-then")
    pg_start = _flag(s.get("verify_pg_start", postgres), "verify-pg-start")
    query = _text(s.get("verify_pg_query"), "verify-pg-query")
    expect = _text(s.get("verify_pg_expect"), "verify-pg-expect", empty=True)
    dbname = _text(s.get("verify_pg_dbname"), "verify-pg-dbname")
    bindir = _text(s.get("verify_pg_bindir"), "verify-pg-bindir")
    recover = _flag(s.get("verify_pg_recover", False), "verify-pg-recover")
    numeric_owner = _flag(s.get("verify_numeric_owner", False), "verify-numeric-owner")
    if pg_start and command:
        raise UsageError("verify-pg-start starts the data directory a snapshot holds: a command source's holds "
                         "its output")
    pg_given = [n for n, v in (("verify-pg-query", query), ("verify-pg-expect", expect), ("verify-pg-dbname", dbname),
                               ("verify-pg-bindir", bindir), ("verify-pg-recover", recover or None)) if v is not None]
    if pg_given and not pg_start:
        raise UsageError(f"{pg_given[0]} asks the restored PostgreSQL copy: set verify-pg-start = true too")
    if expect is not None and query is None:
        raise UsageError("verify-pg-expect is the answer of verify-pg-query: give the query too")
    timeout = _seconds(s.get("verify_timeout"), "verify-timeout")
    scratch = _scratch(s.get("verify_scratch"), base_dir)
    return SourceVerify(then=then, pg_start=pg_start, pg_query=query, pg_expect=expect, pg_dbname=dbname,
                        pg_bindir=None if bindir is None else _path(base_dir, bindir), pg_recover=recover,
                        numeric_owner=numeric_owner, timeout=defaults.timeout if timeout is None else timeout,
                        scratch=defaults.scratch if scratch is None else scratch)


def parse_policy(config: Mapping[str, Any], base_dir: str = ".") -> Policy:
    """Validate a parsed policy file; relative paths are taken from ``base_dir`` (the file's folder)."""
    top = _norm_keys(config, _TOP_KEYS, "")
    tz_name = top.get("timezone", "UTC")
    if not isinstance(tz_name, str):
        raise UsageError(f"timezone must be a string, got {tz_name!r}")
    tz = zone(tz_name)
    repo = top.get("repository")
    secret = {k: top[k] for k in ("password_file", "password_command") if k in top}
    if isinstance(repo, Mapping):
        r = _norm_keys(repo, {"url", "password_file", "password_command"}, " in [repository]")
        for k in ("password_file", "password_command"):
            if k in r:
                if k in secret:
                    raise UsageError(f"{k.replace('_', '-')} given both at the top and in [repository]")
                secret[k] = r[k]
        repo = r.get("url")
    if len(secret) > 1:
        raise UsageError("password-file and password-command both given: use one")
    for k, v in secret.items():
        if not isinstance(v, str) or not v:
            raise UsageError(f"{k.replace('_', '-')} must be a {'path' if k == 'password_file' else 'command line'}, "
                             f"got {v!r}")
    password_file, password_command = secret.get("password_file"), secret.get("password_command")
    if repo is not None and (not isinstance(repo, str) or not repo):
        raise UsageError(f"repository must be a URL string, got {repo!r}")
    if repo is not None:
        repo = _repository_url(repo, base_dir)  # a local repository, like every path here, is relative to the file
    if password_file is not None:
        password_file = _path(base_dir, password_file)
    prune = _flag(top.get("prune", False), "prune")
    wal_expire = _flag(top.get("wal_expire", False), "wal-expire")
    lock_file = top.get("lock_file")
    if lock_file is not None:
        if not isinstance(lock_file, str) or not lock_file:
            raise UsageError(f"lock-file must be a path, got {lock_file!r}")
        lock_file = _path(base_dir, lock_file)
    state_file = top.get("state_file")
    if state_file is not None:
        if not isinstance(state_file, str) or not state_file:
            raise UsageError(f"state-file must be a path, got {state_file!r}")
        state_file = _path(base_dir, state_file)
    check, check_subset = _check_settings(top, tz)
    verify, verify_defaults = _verify_settings(top, tz, base_dir)

    raw_sources = top.get("source")
    if raw_sources is None:
        raise UsageError("no sources: add at least one [[source]] table with a name and paths")
    if not isinstance(raw_sources, list) or not all(isinstance(s, Mapping) for s in raw_sources):
        raise UsageError("source must be an array of tables: write each as [[source]]")
    if not raw_sources:
        raise UsageError("no sources: add at least one [[source]] table with a name and paths")
    sources: list[Source] = []
    for i, raw in enumerate(raw_sources):
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UsageError(f"source #{i + 1} needs a name (letters, digits, '.', '_', '-'), got {name!r}")
        where = f" in source {name!r}"
        s = _norm_keys(raw, _SOURCE_KEYS, where)
        if any(o.name == name for o in sources):
            raise UsageError(f"two sources are named {name!r}")
        try:
            s_tz = zone(s["timezone"]) if "timezone" in s else tz
            full_text = s.get("full", top.get("full"))
            if full_text is None:
                raise UsageError("no full cadence: set full = \"daily 02:00\" (or a cron expression) here or at the top")
            full = parse_cadence(full_text, s_tz)
            diff_text = s.get("diff", top.get("diff"))
            diff = parse_cadence(diff_text, s_tz) if diff_text is not None else None
            command, stdin_name = _hook(s.get("command"), "command"), s.get("stdin_name")
            if command is not None:
                if "paths" in s:
                    raise UsageError("paths and command both given: a source backs up files or a command's output")
                if not isinstance(stdin_name, str) or not stdin_name:
                    raise UsageError("command needs stdin-name, the file name its output is stored under")
                from .store.backup import check_stdin_name

                check_stdin_name(stdin_name)  # now, not at every run
                ruled = [k for k in ("excludes", "exclude_files", "iexcludes", "iexclude_files",
                                     "exclude_if_present", "exclude_caches", "exclude_larger_than",
                                     "one_file_system", "ignore_inode", "ignore_ctime", "list") if k in s]
                if ruled:
                    raise UsageError(f"{ruled[0].replace('_', '-')} applies to paths, not to a command's output")
                paths: tuple[str, ...] = ()
            elif stdin_name is not None:
                raise UsageError("stdin-name needs command")
            elif "paths" not in s:
                raise UsageError("no paths: set paths = [\"/var/lib/db\"] (or command and stdin-name)")
            else:
                paths = tuple(dict.fromkeys(_path(base_dir, p) for p in _str_list(s["paths"], "paths", required=True)))
            host = s.get("host", top.get("host"))
            if host is not None and (not isinstance(host, str) or not host):
                raise UsageError(f"host must be a non-empty string, got {host!r}")
            tags = _str_list(s.get("tags", top.get("tags", [])), "tags")
            for tag in tags:  # every backup would refuse it
                if "," in tag:
                    raise UsageError(f"tags: a tag cannot hold a comma ({tag!r}); for two tags write "
                                     "tags = [\"a\", \"b\"]")
            from .repository import check_one_line

            check_one_line(tags, host)  # a control character: every backup would refuse it, now not at each run
            excludes = _str_list(s.get("excludes", []), "excludes")
            exclude_files = tuple(_path(base_dir, p) for p in _str_list(s.get("exclude_files", []), "exclude-files"))
            iexcludes = _str_list(s.get("iexcludes", []), "iexcludes")
            iexclude_files = tuple(_path(base_dir, p)
                                   for p in _str_list(s.get("iexclude_files", []), "iexclude-files"))
            ExcludeRules(excludes, iexcludes)  # a bad pattern ('!' alone) is reported when the policy loads
            exclude_if_present = _str_list(s.get("exclude_if_present", []), "exclude-if-present")
            exclude_caches = _flag(s.get("exclude_caches", False), "exclude-caches")
            markers_of(list(exclude_if_present), exclude_caches)  # a bad NAME is reported when the policy loads
            one_file_system = _flag(s.get("one_file_system", False), "one-file-system")
            ignore_inode = _flag(s.get("ignore_inode", False), "ignore-inode")
            ignore_ctime = _flag(s.get("ignore_ctime", False), "ignore-ctime")
            listed = _flag(s.get("list", False), "list")
            larger = s.get("exclude_larger_than")
            try:
                exclude_larger_than = None if larger is None else parse_size(larger)
            except UsageError as exc:
                raise UsageError(f"exclude-larger-than: {exc}") from None
            fixed_chunks = _str_list(s.get("fixed_chunks", []), "fixed_chunks")
            postgres = _postgres(s.get("postgres"), paths)
            pg_checkpoint = s.get("pg_checkpoint")
            if pg_checkpoint is not None:
                if postgres is None:
                    raise UsageError("pg-checkpoint is the checkpoint a postgres source starts with: set postgres too")
                if pg_checkpoint not in CHECKPOINTS:
                    raise UsageError(f"pg-checkpoint is 'fast' or 'spread', not {pg_checkpoint!r}")
            pg_standby_wait = _seconds(s.get("pg_standby_wait"), "pg-standby-wait")
            if pg_standby_wait is not None and postgres is None:
                raise UsageError("pg-standby-wait bounds the waits of a postgres source on a standby: "
                                 "set postgres too")
            ret_value = s.get("retention", top.get("retention"))
            retention = _retention(ret_value, config, "retention")
            hook_timeout = _seconds(s.get("hook_timeout", top.get("hook_timeout")), "hook-timeout")
            source = Source(name=name, paths=paths, full=full, diff=diff, host=host, tags=tags,
                            excludes=excludes, exclude_files=exclude_files, iexcludes=iexcludes,
                            iexclude_files=iexclude_files, exclude_if_present=exclude_if_present,
                            exclude_caches=exclude_caches, exclude_larger_than=exclude_larger_than,
                            one_file_system=one_file_system, ignore_inode=ignore_inode, ignore_ctime=ignore_ctime,
                            fixed_chunks=fixed_chunks, command=command, stdin_name=stdin_name, list_entries=listed,
                            postgres=postgres, pg_checkpoint=pg_checkpoint, pg_standby_wait=pg_standby_wait,
                            pre=_hook(s.get("pre"), "pre"),
                            post=_hook(s.get("post"), "post"),
                            retention=retention, hook_timeout=hook_timeout, tz=s_tz,
                            copy_to=_copy_target(s, top, config, base_dir, repo),
                            verify=source_verify(s, verify, verify_defaults, postgres=postgres is not None,
                                                 command=command is not None, base_dir=base_dir))
        except UsageError as exc:
            raise UsageError(f"source {name!r}: {exc}") from None
        here = socket.gethostname()  # a host left out is this machine's, as a run names it
        twin = next((t for t in sources if ((t.host or here), sorted(t.paths), t.stdin_name)
                     == ((host or here), sorted(paths), stdin_name)), None)
        if twin is not None:
            raise UsageError(f"sources {twin.name!r} and {name!r} back up the same {'paths' if paths else 'stdin-name'} "
                             "on the same host: their snapshots could not be told apart (each would take the "
                             "other's for its own, and its retention remove them); give one another host")
        sources.append(source)
    unused = [k for k in _COPY_KEYS[1:] if k in top]  # a source's own are refused without copy-to above
    if unused and not any(s.copy_to is not None for s in sources):  # else taken silently, whatever they held
        raise UsageError(f"{unused[0].replace('_', '-')} is for copy-to, and no source is copied: set copy-to (at "
                         "the top or in a source), or leave it out")
    return Policy(sources=tuple(sources), repository=repo, password_file=password_file,
                  password_command=password_command, timezone=tz_name,
                  prune=prune, wal_expire=wal_expire, max_unused=_share(top.get("max_unused", 0.05)),
                  max_repack_size=_repack_size(top.get("max_repack_size")), lock_file=lock_file,
                  base_dir=base_dir, check=check, check_subset=check_subset, state_file=state_file,
                  verify=verify)


def source_history(snapshots: Sequence[Any], host: str, paths: Sequence[str], stdin_name: str | None = None
                   ) -> list[Any]:
    """The snapshots that belong to a source: same host and the same set of paths (not stdin backups), or
    for a command's output, the same host and ``stdin_name``."""
    if stdin_name is not None:
        return [s for s in snapshots if s.host == host and getattr(s, "stdin_name", None) == stdin_name]
    want = sorted(paths)
    return [s for s in snapshots
            if s.host == host and sorted(s.paths) == want and getattr(s, "stdin_name", None) is None]
