"""Snapshot retention: which snapshots a policy keeps, and how to rebase what remains.

Everything here is pure (no I/O, no clock): ``select`` takes the snapshot list,
a ``RetentionPolicy`` and the current time, and says for every snapshot whether
it is kept and which rules kept it.  ``rebase_plan`` then says, for a set of
snapshots to remove, which kept differentials must absorb removed ancestors so
that every kept snapshot still restores exactly as before.

Rule semantics follow restic's ``forget``:

* Snapshots are split into groups (by default host + paths); every rule is
  applied to each group on its own, newest first (ties broken by id).
* ``keep_last N`` keeps the N newest.  ``keep_hourly/daily/weekly/monthly/yearly
  N``: walking newest first, the newest snapshot of each distinct calendar
  bucket (in the zone ``select`` is given: UTC unless told, local time for
  None, as the CLI asks; weeks are ISO weeks, Monday to Sunday) is kept
  until N buckets have been used.  If a rule still has buckets left when it
  reaches the oldest snapshot of the group, that oldest snapshot is kept too
  ("oldest daily"), so a young repository keeps its whole history span.  ``-1`` means unlimited.
* ``keep_within D`` keeps snapshots strictly newer than (latest - D), where
  latest is the newest snapshot of the group that is not in the future;
  ``keep_within_daily D`` etc. keep the newest snapshot of each bucket inside
  that window.  Anchoring on the latest snapshot (not on the clock) means a
  host that stopped backing up does not lose its last backups.
* ``keep_tags``: a snapshot that carries every tag of one of the sets is kept;
  an empty set matches untagged snapshots only.
* Tiered rules, as managed database services offer them: ``keep_full_within``
  keeps full snapshots newer than (now - D), ``keep_diff_within`` keeps
  differential ones newer than (now - D).  These are anchored on ``now``, and go
  by the kind a snapshot was taken as (``taken_as``): a differential a forget
  rebased into a full, its full gone, keeps a differential's term, so the same
  rules run again remove nothing.
* A snapshot is kept if any rule keeps it (union).  An empty policy is refused.
* Unlike restic's, a snapshot dated more than 5 minutes after ``now`` (taken while a clock ran ahead) is
  kept and counted by no rule until ``now`` reaches it: counted, it would fill ``keep_last`` and the
  newest buckets, and the snapshots taken since, the newest data, would go.

Durations are restic-style strings (``"1y6m"``, ``"2w3d"``, ``"12h"``).  Years
and months are calendar units: ``t - 1m`` is the same day-of-month one month
earlier, clamped to the month's last day (31 March - 1m = 28/29 February);
then weeks, days and hours are subtracted as exact 24 h / 1 h steps (UTC).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence

from chunkvault.errors import CorruptObject, MissingObject, SnapshotNotFound, UsageError

from .chain import lineage
from .chronology import chronological_key

__all__ = [
    "Decision",
    "Duration",
    "RebaseStep",
    "RetentionPolicy",
    "chain_dependencies",
    "load_preset",
    "parse_duration",
    "policy_from_dict",
    "presets_from_dict",
    "rebase_plan",
    "select",
]

KIND_FULL = "full"
KIND_DIFF = "diff"
GROUP_KEYS = frozenset({"host", "paths", "tags"})
UNLIMITED = -1


class SnapshotLike(Protocol):
    id: str
    time: datetime
    kind: str
    parent: str | None
    host: str
    paths: Sequence[str]
    tags: Sequence[str]
    # optional ``taken_as``: the kind it was taken as, where a rebase made a differential a full


# --------------------------------------------------------------------------- durations

EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_DURATION_RE = re.compile(r"(\d+)([ymwdh])")
_UNIT_ORDER = "ymwdh"


@dataclass(frozen=True)
class Duration:
    """A calendar-aware span: years and months move along the calendar, days and hours are exact."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UsageError(f"duration {f.name} must be a non-negative integer, got {v!r}")

    def __bool__(self) -> bool:
        return bool(self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        text = "".join(f"{n}{u}" for n, u in parts if n)
        return text or "0h"

    def before(self, t: datetime, tz: tzinfo | None = timezone.utc) -> datetime:
        """The instant (in UTC) this duration before ``t``: years and months back along the calendar of
        ``tz`` (None: this machine's local time), the day clamped to the month's end, then days and hours
        as elapsed time, whatever the clocks did meanwhile (in a zone with summer time, wall-clock
        arithmetic makes a day 23 or 25 hours)."""
        wall = t.astimezone(tz)
        if tz is None:  # a naive local time takes the offset in force at the shifted date
            wall = wall.replace(tzinfo=None)
        month_index = wall.year * 12 + (wall.month - 1) - (self.years * 12 + self.months)
        year, month = divmod(month_index, 12)
        month += 1
        if year < 1:
            return EARLIEST
        import calendar  # here, not at start-up: every command that loads the store loads this module

        day = min(wall.day, calendar.monthrange(year, month)[1])
        try:
            shifted = wall.replace(year=year, month=month, day=day).astimezone(timezone.utc)
            return shifted - timedelta(days=self.days, hours=self.hours)
        except (OverflowError, OSError, ValueError):  # before year 1, or before what the C library converts
            return EARLIEST

    def to_timedelta(self, reference: datetime) -> timedelta:
        """The exact length of this duration when counted back from ``reference``."""
        return reference - self.before(reference)


def parse_duration(text: str) -> Duration:
    """Parse ``"1y6m"``, ``"2w3d"``, ``"12h"``: units y, m (months), w, d, h, each once, in that order."""
    if not isinstance(text, str):
        raise UsageError(f"duration must be a string like '7d', got {text!r}")
    s = text.strip().lower()
    if not s:
        raise UsageError("empty duration")
    values = dict.fromkeys(_UNIT_ORDER, 0)
    pos = 0
    last_unit = -1
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        unit = _UNIT_ORDER.index(m.group(2))
        if unit <= last_unit:
            raise UsageError(f"invalid duration {text!r}: units must appear once each, in the order y m w d h")
        last_unit = unit
        values[m.group(2)] = int(m.group(1))
        pos = m.end()
    if pos != len(s):
        raise UsageError(f"invalid duration {text!r}: expected e.g. '30d', '2w3d', '1y6m', '12h'")
    return Duration(years=values["y"], months=values["m"], days=values["w"] * 7 + values["d"], hours=values["h"])


DurationLike = Duration | timedelta


def _cutoff(ref: datetime, d: DurationLike, tz: tzinfo | None) -> datetime:
    """The instant ``d`` before the instant ``ref`` (months and years along ``tz``'s calendar)."""
    if isinstance(d, Duration):
        return d.before(ref, tz)
    try:
        return ref.astimezone(timezone.utc) - d
    except OverflowError:
        return EARLIEST


def _fmt_duration(d: DurationLike) -> str:
    if isinstance(d, Duration):
        return str(d)
    secs = int(d.total_seconds())
    if secs % 86400 == 0:
        return f"{secs // 86400}d"
    if secs % 3600 == 0:
        return f"{secs // 3600}h"
    return str(d)


# --------------------------------------------------------------------------- policy

_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_WITHIN_BUCKET_RULES = ("hourly", "daily", "weekly", "monthly", "yearly")
_KIND_COUNT_RULES = (KIND_FULL, KIND_DIFF)  # keep_full, keep_diff: the newest N snapshots of that type


def _bucket(rule: str, t: datetime) -> tuple[int, ...]:
    if rule == "hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "daily":
        return (t.year, t.month, t.day)
    if rule == "weekly":
        iso = t.isocalendar()
        return (iso[0], iso[1])
    if rule == "monthly":
        return (t.year, t.month)
    return (t.year,)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which snapshots ``forget`` keeps.  Counts: None/0 = rule off, -1 = unlimited."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: DurationLike | None = None
    keep_within_hourly: DurationLike | None = None
    keep_within_daily: DurationLike | None = None
    keep_within_weekly: DurationLike | None = None
    keep_within_monthly: DurationLike | None = None
    keep_within_yearly: DurationLike | None = None
    keep_tags: tuple[frozenset[str], ...] = ()
    keep_full_within: DurationLike | None = None
    keep_diff_within: DurationLike | None = None
    keep_full: int | None = None  # the newest N full snapshots (pgBackRest's retention-full)
    keep_diff: int | None = None  # the newest N differentials
    group_by: frozenset[str] = field(default=frozenset({"host", "paths"}))

    def __post_init__(self) -> None:
        for rule in _COUNT_RULES + _KIND_COUNT_RULES:
            v = getattr(self, f"keep_{rule}")
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < UNLIMITED:
                raise UsageError(f"keep-{rule} (keep_{rule}) must be a non-negative integer or -1 (unlimited), "
                                 f"got {v!r}")
        for name in self._duration_fields():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, str):
                object.__setattr__(self, name, parse_duration(v))
            elif isinstance(v, timedelta):
                if v < timedelta(0):
                    raise UsageError(f"{name} must not be negative, got {v}")
            elif not isinstance(v, Duration):
                raise UsageError(f"{name} must be a duration, got {v!r}")
        tag_sets = []
        tags_in = self.keep_tags
        if isinstance(tags_in, (str, bytes)):
            raise UsageError("keep_tags must be a sequence of tag sets, e.g. (('prod',), ('db', 'daily'))")
        for ts in tags_in:
            if isinstance(ts, str):
                ts = [t for t in ts.split(",") if t]
            if not isinstance(ts, (list, tuple, set, frozenset)):
                raise UsageError(f"a tag set must be \"a,b\" or a list of tags, got {ts!r}")
            ts = frozenset(ts)
            if not all(isinstance(t, str) and t for t in ts):
                raise UsageError(f"tags must be non-empty strings, got {sorted(ts, key=repr)!r}")
            tag_sets.append(ts)
        object.__setattr__(self, "keep_tags", tuple(tag_sets))
        object.__setattr__(self, "group_by", parse_group_by(self.group_by))

    @staticmethod
    def _duration_fields() -> tuple[str, ...]:
        return ("keep_within",) + tuple(f"keep_within_{r}" for r in _WITHIN_BUCKET_RULES) + (
            "keep_full_within", "keep_diff_within")

    def is_empty(self) -> bool:
        """True when no rule is set; such a policy would remove everything, so ``select`` refuses it."""
        if any(getattr(self, f"keep_{r}") for r in _COUNT_RULES + _KIND_COUNT_RULES):
            return False
        if any(getattr(self, n) for n in self._duration_fields()):
            return False
        return not self.keep_tags

    def describe(self) -> str:
        """One line saying what the policy keeps, for dry-run output."""
        parts = []
        for rule in _COUNT_RULES:
            v = getattr(self, f"keep_{rule}")
            if v:
                parts.append(f"{'all' if v == UNLIMITED else v} {'latest' if rule == 'last' else rule}")
        if self.keep_within:
            parts.append(f"all within {_fmt_duration(self.keep_within)} of the latest")
        for rule in _WITHIN_BUCKET_RULES:
            v = getattr(self, f"keep_within_{rule}")
            if v:
                parts.append(f"{rule} within {_fmt_duration(v)} of the latest")
        for ts in self.keep_tags:
            parts.append(f"tagged {','.join(sorted(ts))}" if ts else "untagged")
        for rule in _KIND_COUNT_RULES:
            v = getattr(self, f"keep_{rule}")
            if v:
                parts.append(f"{'all' if v == UNLIMITED else v} latest {rule}")
        if self.keep_full_within:
            parts.append(f"fulls within {_fmt_duration(self.keep_full_within)}")
        if self.keep_diff_within:
            parts.append(f"diffs within {_fmt_duration(self.keep_diff_within)}")
        if not parts:
            return "keep nothing (empty policy)"
        return "keep " + ", ".join(parts) + f"; grouped by {','.join(sorted(self.group_by)) or 'nothing'}"


_POLICY_KEYS = {f.name for f in fields(RetentionPolicy)}


def policy_from_dict(d: Mapping[str, Any]) -> RetentionPolicy:
    """A policy from a config table: keys as the field names (``keep-daily`` or ``keep_daily``).

    Counts are integers or ``"unlimited"``; durations are strings like ``"30d"``;
    ``keep-tags`` is a list of ``"a,b"`` strings or lists; ``group-by`` a list or ``"host,paths"``.
    """
    if not isinstance(d, Mapping):
        raise UsageError(f"a retention policy must be a table, got {type(d).__name__}")
    kwargs: dict[str, Any] = {}
    for raw_key, value in d.items():
        key = str(raw_key).replace("-", "_")
        if key not in _POLICY_KEYS:
            import difflib  # for a typo's hint alone

            close = difflib.get_close_matches(key, _POLICY_KEYS, n=1)
            hint = (f" (did you mean {close[0].replace('_', '-')}?)" if close else
                    "; the settings are " + ", ".join(sorted(k.replace("_", "-") for k in _POLICY_KEYS)))
            raise UsageError(f"unknown retention setting {raw_key!r}{hint}")
        if key in kwargs:  # keep-daily and keep_daily: TOML's two keys, one rule
            first = next(k for k in d if str(k).replace("-", "_") == key)
            raise UsageError(f"retention setting {raw_key!r} given twice (as {first!r} too)")
        if key in {f"keep_{r}" for r in _COUNT_RULES + _KIND_COUNT_RULES}:
            if isinstance(value, str) and value.strip().lower() == "unlimited":
                value = UNLIMITED
        elif key == "keep_tags":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise UsageError(f"keep-tags must be a list, got {value!r}")
            if not all(isinstance(v, (str, list, tuple)) for v in value):  # {a=1} was read as the tag "a"
                raise UsageError(f"keep-tags must list tag sets (\"a,b\" or [\"a\", \"b\"]), got {value!r}")
            value = tuple(v if isinstance(v, str) else tuple(v) for v in value)
        elif key != "group_by" and not isinstance(value, (str, Duration, timedelta)):
            raise UsageError(f"{raw_key} must be a duration string like '30d', got {value!r}")
        kwargs[key] = value
    return RetentionPolicy(**kwargs)


def presets_from_dict(config: Mapping[str, Any]) -> dict[str, RetentionPolicy]:
    """All ``[presets.<name>]`` tables of a parsed TOML config, as policies."""
    presets = config.get("presets", {})
    if not isinstance(presets, Mapping):
        raise UsageError("'presets' must be a table of tables")
    out = {}
    for name, table in presets.items():
        try:
            out[name] = policy_from_dict(table)
        except UsageError as e:
            raise UsageError(f"preset {name!r}: {e}") from None
    return out


def load_preset(config: Mapping[str, Any], name: str) -> RetentionPolicy:
    """The policy of preset ``name`` (``--preset NAME``) from a parsed TOML config."""
    presets = config.get("presets", {})
    if not isinstance(presets, Mapping) or name not in presets:
        known = ", ".join(sorted(presets)) if isinstance(presets, Mapping) and presets else "none defined"
        raise UsageError(f"no retention preset {name!r} (known: {known})")
    try:
        return policy_from_dict(presets[name])
    except UsageError as e:
        raise UsageError(f"preset {name!r}: {e}") from None


# --------------------------------------------------------------------------- selection


class Decision(NamedTuple):
    snapshot_id: str
    keep: bool
    reasons: tuple[str, ...]


NO_RULE = "no rule matched"
#: How far ahead of ``now`` a snapshot's time may be and still count for the rules: another machine's clock.
AHEAD = timedelta(minutes=5)
#: The reason a snapshot dated further ahead is kept: taken while a clock ran ahead (a year, before NTP set
#: it back), it would fill the count rules (``keep_last 3`` keeping it and removing the newest data) until
#: the clock reached its date.  Kept, it is weighed once the clock is past it.
DATED_AHEAD = "dated ahead"


def _utc(t: Any, sid: str) -> datetime:
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise UsageError(f"snapshot {sid}: time must be a timezone-aware datetime, got {t!r}")
    return t.astimezone(timezone.utc)


def parse_group_by(value: str | Iterable[str]) -> frozenset[str]:
    """``host,paths`` (or a list of those words) as a set; UsageError naming an unknown word."""
    if isinstance(value, str):
        words = [g.strip() for g in value.split(",") if g.strip()]
    elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(w, str) for w in value):
        words = list(value)
    else:
        raise UsageError(f"group-by must be words such as \"host,paths\", got {value!r}")
    gb = frozenset(words)
    unknown = gb - GROUP_KEYS
    if unknown:
        raise UsageError(f"cannot group by {', '.join(sorted(unknown))}; choose from host, paths, tags")
    return gb


def group_key(s: SnapshotLike, group_by: frozenset[str]) -> tuple:
    """What ``s`` is grouped by: its host, paths and tags, each only where ``group_by`` names it."""
    return (
        s.host if "host" in group_by else None,
        tuple(sorted(s.paths)) if "paths" in group_by else None,
        tuple(sorted(set(s.tags))) if "tags" in group_by else None,
    )


def _describe_group(s: SnapshotLike, group_by: frozenset[str]) -> str:
    parts = [f"host {s.host}" if "host" in group_by else "",
             f"paths {', '.join(sorted(s.paths)) or '-'}" if "paths" in group_by else "",
             f"tags {', '.join(sorted(set(s.tags))) or '-'}" if "tags" in group_by else ""]
    return "; ".join(p for p in parts if p) or "the repository"


def newest_of_groups(snapshots: Iterable[SnapshotLike], n: int, group_by: frozenset[str]) -> list[SnapshotLike]:
    """The ``n`` newest snapshots of each group (restic's ``snapshots --latest``), in the order given."""
    if n < 1:
        raise UsageError(f"the number of newest snapshots per group must be at least 1, got {n}").hinting(" (--latest)")
    snaps = list(snapshots)
    groups: dict[tuple, list[SnapshotLike]] = {}
    for s in snaps:
        groups.setdefault(group_key(s, group_by), []).append(s)
    kept = {s.id for members in groups.values()
            for s in sorted(members, key=chronological_key(snaps, lambda s: _utc(s.time, s.id)), reverse=True)[:n]}
    return [s for s in snaps if s.id in kept]


def _check_ids(snapshots: Sequence[SnapshotLike]) -> None:
    seen: set[str] = set()
    for s in snapshots:
        if s.id in seen:
            raise UsageError(f"snapshot {s.id} listed twice")
        seen.add(s.id)
        if s.kind not in (KIND_FULL, KIND_DIFF):
            raise UsageError(f"snapshot {s.id}: kind must be 'full' or 'diff', got {s.kind!r}")


def select(snapshots: Iterable[SnapshotLike], policy: RetentionPolicy, now: datetime, *,
           allow_remove_all: bool = False, tz: tzinfo | None = timezone.utc,
           outside: Iterable[SnapshotLike] = ()) -> list[Decision]:
    """Apply ``policy`` to every group of ``snapshots``; one Decision per snapshot, in input order.

    A policy that keeps no snapshot of a group (``keep-tag`` alone, a tag misspelt) is refused unless
    ``allow_remove_all``: a retention rule should thin a history, not end it.  Days, weeks, months and
    years are those of ``tz`` (None: this machine's local time, as restic counts them); snapshots are
    ordered and durations counted by the instants they were taken (in the hour a summer time's end
    repeats, wall clocks would put a newer snapshot before an older one).  ``outside``: the repository's
    other snapshots, which a filter leaves out: they stay, so a differential whose chain goes through one
    of them has a full that stays (``keep_diff``).  A snapshot dated more than ``AHEAD`` after ``now`` is
    kept (``DATED_AHEAD``) and counted by no rule, as a policy run's are.

    ``keep_full`` counts the fulls as the forget leaves them: a differential another rule keeps, whose
    chain keeps nothing before it, becomes a full when it absorbs the removed ones (``rebase_plan``), so it
    counts as one; the same rules run again then remove nothing."""
    snaps = list(snapshots)
    if policy.is_empty():
        raise UsageError("refusing to forget with an empty retention policy (no keep rule, or each at 0): it would "
                         "remove every snapshot; set at least one keep rule above 0")
    _check_ids(snaps)
    now = _utc(now, "now")
    times = {s.id: _utc(s.time, s.id) for s in snaps}
    order = chronological_key(snaps, lambda s: times[s.id])
    groups: dict[tuple, list[SnapshotLike]] = {}
    base: dict[str, list[str]] = {}
    for s in snaps:
        if times[s.id] > now + AHEAD:
            base[s.id] = [DATED_AHEAD]
        else:
            groups.setdefault(group_key(s, policy.group_by), []).append(s)
    for members in groups.values():
        members.sort(key=order, reverse=True)
        _apply_group(members, times, policy, now, tz, base)
    every = {s.id: s for s in [*outside, *snaps]}
    stays = {sid for sid in every if sid not in times}  # outside the selection
    parents = {s.id: None if s.kind == KIND_FULL else s.parent for s in every.values()}  # a chain ends at its full
    reasons, promoted = base, frozenset[str]()
    for _ in range(len(snaps) + 1):  # the fulls kept only shrink as promoted ones grow: this ends
        reasons = {sid: list(rs) for sid, rs in base.items()}
        for members in groups.values() if policy.keep_full else ():
            fulls = [s for s in members if s.kind == KIND_FULL or s.id in promoted]
            for nr, s in enumerate(fulls if policy.keep_full == UNLIMITED else fulls[:policy.keep_full]):
                reasons.setdefault(s.id, []).append(f"full #{nr + 1}")
        for members in groups.values() if policy.keep_diff else ():  # after every group's fulls
            _keep_diffs(members, every, parents, policy.keep_diff, reasons, stays)
        if not (policy.keep_full or policy.keep_diff):
            break
        now_promoted = frozenset(s.id for s in snaps if s.kind == KIND_DIFF and s.id in reasons
                                 and not _kept_before(s.id, parents, reasons, stays))
        if now_promoted == promoted:
            break
        promoted = now_promoted
    for members in groups.values():
        if not allow_remove_all and not any(s.id in reasons for s in members):
            raise UsageError(f"the retention policy keeps none of the {len(members)} snapshot(s) of "
                             f"{_describe_group(members[0], policy.group_by)}: refusing to remove them all "
                             "(leave that group out with a host, tag or path filter, or allow it: "
                             "`--unsafe-allow-remove-all`, API: `allow_remove_all=True`)")
    out = []
    for s in snaps:
        rs = reasons.get(s.id)
        out.append(Decision(s.id, True, tuple(rs)) if rs else Decision(s.id, False, (NO_RULE,)))
    return out


def _kept_before(sid: str, parents: dict[str, str | None], reasons: Mapping[str, list[str]],
                 stays: set[str]) -> bool:
    """Whether a snapshot of ``sid``'s chain before it stays: else ``sid``, kept, becomes the chain's full."""
    return any(a in reasons or a in stays for a in lineage(sid, parents)[1:])


def _apply_group(members: list[SnapshotLike], times: dict[str, datetime], policy: RetentionPolicy,
                 now: datetime, tz: tzinfo | None, reasons: dict[str, list[str]]) -> None:
    """Keep ``members`` (newest first; ``times`` and ``now`` in UTC) by the rules of ``policy``, hours,
    days, weeks, months and years being those of ``tz``."""
    def bucket(rule: str, s: SnapshotLike) -> tuple[int, ...]:
        return _bucket(rule, times[s.id].astimezone(tz))

    past = [times[s.id] for s in members if times[s.id] <= now]
    latest = max(past) if past else now

    def keep(s: SnapshotLike, why: str) -> None:
        reasons.setdefault(s.id, []).append(why)

    for ts in policy.keep_tags:
        label = f"tag {','.join(sorted(ts))}" if ts else "untagged"
        for s in members:
            if (ts <= set(s.tags)) if ts else not s.tags:
                keep(s, label)

    if policy.keep_within:
        cut = _cutoff(latest, policy.keep_within, tz)
        label = f"within {_fmt_duration(policy.keep_within)}"
        for s in members:
            if times[s.id] > cut:
                keep(s, label)

    for rule in _COUNT_RULES:
        count = getattr(policy, f"keep_{rule}")
        if not count:
            continue
        left = count
        last_bucket: tuple | None = None
        used = 0
        for nr, s in enumerate(members):
            if left == 0:
                break
            b = (nr,) if rule == "last" else bucket(rule, s)
            if b != last_bucket:
                last_bucket = b
                used += 1
                left -= 1 if left > 0 else 0
                keep(s, f"{rule} #{used}")
            elif nr == len(members) - 1:
                keep(s, f"oldest {rule}")

    for rule in _WITHIN_BUCKET_RULES:
        d = getattr(policy, f"keep_within_{rule}")
        if not d:
            continue
        cut = _cutoff(latest, d, tz)
        label = f"{rule} within {_fmt_duration(d)}"
        last_bucket = None
        for s in members:
            if times[s.id] <= cut:
                break
            b = bucket(rule, s)
            if b != last_bucket:
                last_bucket = b
                keep(s, label)

    for kind, d in ((KIND_FULL, policy.keep_full_within), (KIND_DIFF, policy.keep_diff_within)):
        if not d:
            continue
        cut = _cutoff(now, d, tz)
        label = f"{kind} within {_fmt_duration(d)}"
        for s in members:
            if (getattr(s, "taken_as", None) or s.kind) == kind and times[s.id] > cut:
                keep(s, label)



def _keep_diffs(members: list[SnapshotLike], every: Mapping[str, SnapshotLike], parents: dict[str, str | None],
                count: int, reasons: dict[str, list[str]], stays: set[str]) -> None:
    """``keep_diff``: the newest ``count`` differentials of ``members`` (newest first) of a whole chain in
    which a snapshot before them stays (by the other rules, or outside the selection), as pgBackRest's
    retention-diff.  A differential kept with nothing before it staying would become a full, and the same
    rules run again would count it as one.  A chain with a link missing has no full to stay."""
    kept = 0
    for s in members:
        if kept == count:
            break
        if s.kind != KIND_DIFF:
            continue
        chain = lineage(s.id, parents)
        if every[chain[-1]].kind == KIND_FULL and _kept_before(s.id, parents, reasons, stays):
            kept += 1
            reasons.setdefault(s.id, []).append(f"diff #{kept}")


# --------------------------------------------------------------------------- chains and rebasing


def chain_dependencies(snapshots: Iterable[SnapshotLike]) -> dict[str, list[str]]:
    """For each snapshot, the snapshots it needs to restore: its full base first, its parent last.

    A full maps to ``[]``.  Raises MissingObject for a parent that is not in
    the list and CorruptObject for a parentless differential or a cycle.
    """
    snaps = list(snapshots)
    _check_ids(snaps)
    by_id = {s.id: s for s in snaps}
    deps: dict[str, list[str]] = {}
    for s in snaps:
        path: list[str] = []
        on_path: set[str] = set()
        cur = s
        while cur.id not in deps:
            if cur.kind == KIND_FULL:
                deps[cur.id] = []
                break
            if cur.parent is None:
                raise CorruptObject(f"snapshot {cur.id}", "differential without a parent")
            if cur.id in on_path:
                raise CorruptObject(f"snapshot {cur.id}", "differential chain loops back on itself")
            on_path.add(cur.id)
            path.append(cur.id)
            parent = by_id.get(cur.parent)
            if parent is None:
                raise MissingObject(f"snapshot {cur.parent}", f"missing: parent of differential {cur.id}")
            cur = parent
        base = deps[cur.id] + [cur.id]
        for sid in reversed(path):
            deps[sid] = list(base)
            base.append(sid)
    return {s.id: deps[s.id] for s in snaps}


class RebaseStep(NamedTuple):
    """Merge ``merge_ids`` (oldest first) into kept differential ``diff_id``; its parent becomes ``new_parent``.

    ``new_parent`` None means the chain reached a removed full: ``diff_id``
    absorbs it and becomes a full snapshot itself.
    """

    diff_id: str
    merge_ids: list[str]
    new_parent: str | None


def rebase_plan(snapshots: Iterable[SnapshotLike], remove_ids: Iterable[str]) -> list[RebaseStep]:
    """The rebases that make removing ``remove_ids`` safe for every kept snapshot.

    One step per kept differential whose parent is removed, ordered so that a
    snapshot's ancestors are rebased before it (shorter chains first).  Steps
    are independent: a rebase never changes what the rebased snapshot restores.
    """
    snaps = list(snapshots)
    deps = chain_dependencies(snaps)
    removed = set(remove_ids)
    unknown = removed - deps.keys()
    if unknown:
        raise SnapshotNotFound(f"no snapshot {sorted(unknown)[0]} to remove")
    steps: list[tuple[int, str, RebaseStep]] = []
    for s in snaps:
        if s.id in removed or s.kind == KIND_FULL or s.parent not in removed:
            continue
        chain = deps[s.id]
        merge: list[str] = []
        new_parent: str | None = None
        for anc in reversed(chain):
            if anc not in removed:
                new_parent = anc
                break
            merge.append(anc)
        merge.reverse()
        steps.append((len(chain), s.id, RebaseStep(s.id, merge, new_parent)))
    steps.sort(key=lambda x: (x[0], x[1]))
    return [step for _, _, step in steps]
