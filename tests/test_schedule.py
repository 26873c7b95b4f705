"""The pure scheduling logic: cron matching, cadences, the due rule, policy parsing."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chunkvault.errors import UsageError
from chunkvault.schedule import (Cron, Interval, decide, next_wakeup, parse_cadence, parse_cron_field,
                                 parse_policy, source_history, zone)

UTC = timezone.utc
MIN = timedelta(minutes=1)
BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]

times = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 12, 31),
                     timezones=st.just(UTC))


# --------------------------------------------------------------------------- cron fields


@st.composite
def cron_item(draw, lo: int, hi: int) -> tuple[str, set[int]]:
    """One list item of a field, with the set it selects computed the slow, obvious way."""
    form = draw(st.sampled_from(["*", "*/s", "a", "a-b", "a-b/s", "a/s"]))
    a = draw(st.integers(lo, hi))
    b = draw(st.integers(a, hi))
    s = draw(st.integers(1, hi - lo + 2))
    if form == "*":
        return "*", set(range(lo, hi + 1))
    if form == "*/s":
        return f"*/{s}", {v for v in range(lo, hi + 1) if (v - lo) % s == 0}
    if form == "a":
        return str(a), {a}
    if form == "a-b":
        return f"{a}-{b}", {v for v in range(lo, hi + 1) if a <= v <= b}
    if form == "a-b/s":
        return f"{a}-{b}/{s}", {v for v in range(lo, hi + 1) if a <= v <= b and (v - a) % s == 0}
    return f"{a}/{s}", {v for v in range(lo, hi + 1) if v >= a and (v - a) % s == 0}


@st.composite
def cron_field(draw, index: int) -> tuple[str, set[int]]:
    lo, hi = BOUNDS[index]
    items = draw(st.lists(cron_item(lo, hi), min_size=1, max_size=3))
    expected = set().union(*(s for _, s in items))
    if index == 4 and 7 in expected:
        expected = (expected - {7}) | {0}
    return ",".join(t for t, _ in items), expected


@given(st.data())
def test_cron_field_selects_what_the_model_says(data):
    index = data.draw(st.integers(0, 4))
    text, expected = data.draw(cron_field(index))
    assert parse_cron_field(text, index) == expected


def test_cron_names_and_sunday_seven():
    assert parse_cron_field("jan,MAR-may", 3) == {1, 3, 4, 5}
    assert parse_cron_field("mon-fri", 4) == {1, 2, 3, 4, 5}
    assert parse_cron_field("5-7", 4) == {5, 6, 0}
    assert parse_cron_field("sun", 4) == parse_cron_field("7", 4) == {0}


@pytest.mark.parametrize("text, fragment", [
    ("0 2 * *", "5 fields"),
    ("60 * * * *", "outside 0-59"),
    ("* 24 * * *", "outside 0-23"),
    ("* * 0 * *", "outside 1-31"),
    ("* * * 13 *", "outside 1-12"),
    ("* * * * 8", "outside 0-7"),
    ("5-1 * * * *", "backwards"),
    ("*/0 * * * *", "positive"),
    ("1,,2 * * * *", "empty"),
    ("x * * * *", "not a number"),
    ("0 0 30 2 *", "never fires"),
    ("0 0 31 4,6 *", "never fires"),
    ("@fortnightly", "unknown alias"),
    ("daily 25:00", "time of day"),
    ("weekly sun 03:00 extra", "expected"),
    ("weekly sunburn", "weekly takes a day (sun or sunday"),  # was Sunday, by its first three letters
    ("weekly monkey 03:00", "weekly takes a day (sun or sunday"),
    ("every 30s", "every 15m"),
    ("every 0m", "at least one minute"),
    ("every", "every 15m"),
    ("sometimes", "expected a cron expression"),
    ("", "expected a cron expression"),
])
def test_bad_cadences_say_why(text, fragment):
    with pytest.raises(UsageError) as e:
        parse_cadence(text)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- prev / next against a scan


@st.composite
def cron_text(draw, dense_days: bool = True) -> str:
    """A random expression; with dense_days the day fields fire often, so a 2-day scan sees gaps whole."""
    fields = [draw(cron_field(0))[0], draw(cron_field(1))[0]]
    if dense_days:
        fields += [draw(st.sampled_from(["*", "*/2", "1-28", "*/3"])), "*",
                   draw(st.sampled_from(["*", "1-5", "0,6", "*/2"]))]
    else:
        fields += [draw(cron_field(2))[0], draw(cron_field(3))[0], draw(cron_field(4))[0]]
    text = " ".join(fields)
    try:
        Cron.parse(text)
    except ValueError:
        assume(False)
    return text


def _minute(t: datetime) -> datetime:
    return t.replace(second=0, microsecond=0)


WINDOW = 2 * 24 * 60  # minutes scanned by brute force


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cron_text(dense_days=True), times)
def test_utc_prev_and_next_match_a_minute_scan(text, at):
    cron = Cron.parse(text)
    p, n = cron.prev(at), cron.next(at)
    assert p is not None and n is not None
    assert p <= at < n
    assert cron.matches(p) and cron.matches(n)
    assert p.second == p.microsecond == 0 and n.second == n.microsecond == 0
    # no matching minute strictly between p and at, nor between at and n (within the scanned window)
    t = _minute(at)
    for _ in range(WINDOW):
        if t <= p:
            break
        assert not cron.matches(t), f"{t} matches but prev({at}) gave {p}"
        t -= MIN
    t = _minute(at) + MIN
    for _ in range(WINDOW):
        if t >= n:
            break
        assert not cron.matches(t), f"{t} matches but next({at}) gave {n}"
        t += MIN
    assert cron.next(p) == n
    assert cron.prev(n) == n


@settings(max_examples=60, deadline=None)
@given(cron_text(dense_days=False), times)
def test_sparse_expressions_are_consistent(text, at):
    cron = Cron.parse(text)
    p, n = cron.prev(at), cron.next(at)
    assert p is not None and n is not None
    assert p <= at < n and cron.matches(p) and cron.matches(n)
    assert cron.next(p) == n and cron.prev(n - timedelta(microseconds=1)) == p


DST_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo"]
dst_times = st.datetimes(min_value=datetime(2005, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC))


@st.composite
def near_transition(draw) -> tuple[str, datetime]:
    """A zone and a time within a day of one of its offset changes (where cron gets hard)."""
    name = draw(st.sampled_from(DST_ZONES))
    tz = zone(name)
    t = draw(dst_times)
    # walk to the next offset change, then jitter around it
    step = timedelta(hours=6)
    off = t.astimezone(tz).utcoffset()
    for _ in range(4 * 370):
        if (t + step).astimezone(tz).utcoffset() != off:
            break
        t += step
    return name, t + timedelta(minutes=draw(st.integers(-1500, 1500)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cron_text(dense_days=True), near_transition())
def test_local_time_cron_across_dst(text, zone_and_time):
    name, at = zone_and_time
    tz = zone(name)
    cron = Cron.parse(text, tz)
    p, n = cron.prev(at), cron.next(at)
    assert p is not None and n is not None
    assert p <= at < n
    assert cron.next(p) == n and cron.prev(n) == n

    def fires_here(slot: datetime) -> bool:
        wall = slot.astimezone(tz)
        if cron.matches(wall) and not wall.fold:
            return True
        gap = wall.utcoffset() - (slot - timedelta(hours=6)).astimezone(tz).utcoffset()
        return gap > timedelta(0) and cron.matches(wall - gap)  # a skipped wall time, fired after the jump

    assert fires_here(p) and fires_here(n)
    # every first occurrence of a matching wall-clock minute between them would have been a slot
    t = _minute(p) + MIN
    for _ in range(WINDOW):
        if t >= n:
            break
        wall = t.astimezone(tz)
        assert not (cron.matches(wall) and not wall.fold), f"{wall} matches but lies between {p} and {n}"
        t += MIN


def test_dst_examples_europe_berlin():
    tz = zone("Europe/Berlin")
    spring = Cron.parse("30 2 * * *", tz)  # 2026-03-29: 02:00 CET -> 03:00 CEST, 02:30 does not exist
    assert spring.next(datetime(2026, 3, 28, 12, tzinfo=UTC)) == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    autumn = spring.next(datetime(2026, 10, 24, 12, tzinfo=UTC))  # 2026-10-25: 02:30 happens twice
    assert autumn == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # the first one, CEST
    assert spring.next(autumn) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)  # once only
    daily = parse_cadence("daily 02:00", tz)
    assert daily.prev(datetime(2026, 7, 1, 10, tzinfo=UTC)) == datetime(2026, 7, 1, 0, tzinfo=UTC)
    assert daily.prev(datetime(2026, 1, 1, 10, tzinfo=UTC)) == datetime(2026, 1, 1, 1, tzinfo=UTC)


def test_feb_29_is_years_away():
    leap = Cron.parse("0 0 29 2 *")
    assert leap.next(datetime(2097, 3, 1, tzinfo=UTC)) == datetime(2104, 2, 29, tzinfo=UTC)
    assert leap.prev(datetime(2103, 1, 1, tzinfo=UTC)) == datetime(2096, 2, 29, tzinfo=UTC)


def test_day_of_month_or_day_of_week_as_in_cron():
    both = Cron.parse("0 0 13 * fri")  # the 13th, or any Friday
    t = datetime(2026, 4, 1, tzinfo=UTC)
    days = []
    for _ in range(5):
        t = both.next(t)
        days.append((t.day, t.isoweekday()))
    assert days == [(3, 5), (10, 5), (13, 1), (17, 5), (24, 5)]
    star_step = Cron.parse("0 0 */10 * fri")  # day field starts with "*": both must hold
    assert star_step.next(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(2026, 5, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- intervals and short forms


@given(st.sampled_from(["every 15m", "every 1h", "every 1h30m", "every 7h", "every 2d", "every 1w"]), times)
def test_intervals_sit_on_an_epoch_grid(text, at):
    iv = parse_cadence(text)
    assert isinstance(iv, Interval)
    p, n = iv.prev(at), iv.next(at)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert p <= at < n == p + timedelta(seconds=iv.seconds)
    assert (p - epoch).total_seconds() % iv.seconds == 0


def test_interval_units():
    assert parse_cadence("every 1h30m").seconds == 5400
    assert parse_cadence("Every 2d").seconds == 2 * 86400
    assert parse_cadence("every 1w2d").seconds == 9 * 86400
    assert parse_cadence("every 15m").prev(datetime(2026, 1, 1, 10, 44, tzinfo=UTC)) == datetime(
        2026, 1, 1, 10, 30, tzinfo=UTC)


@given(st.sampled_from([("hourly", "0 * * * *"), ("daily", "0 0 * * *"), ("daily 02:00", "0 2 * * *"),
                        ("daily 7:05", "5 7 * * *"), ("weekly", "0 0 * * mon"),
                        ("weekly sunday 03:30", "30 3 * * 0"), ("weekly fri", "0 0 * * 5"),
                        ("monthly", "0 0 1 * *"), ("monthly 04:15", "15 4 1 * *"), ("@daily", "0 0 * * *"),
                        ("@weekly", "0 0 * * 0"), ("@yearly", "0 0 1 1 *")]), times)
def test_short_forms_equal_their_cron(pair, at):
    short, cron = parse_cadence(pair[0]), parse_cadence(pair[1])
    assert short.prev(at) == cron.prev(at) and short.next(at) == cron.next(at)


def test_next_wakeup_is_the_earliest_slot():
    at = datetime(2026, 5, 5, 10, 7, tzinfo=UTC)
    cads = [parse_cadence("daily 02:00"), parse_cadence("*/20 * * * *")]
    assert next_wakeup(cads, at) == datetime(2026, 5, 5, 10, 20, tzinfo=UTC)
    assert next_wakeup([], at) is None


# --------------------------------------------------------------------------- the due rule

FULLS = ["daily 02:00", "0 */6 * * *", "every 1d", "weekly sun 03:00", "30 1 * * 1-5"]
DIFFS = [None, "hourly", "*/15 * * * *", "every 2h", "45 * * * *"]


def scan_last_slot(cadence, now: datetime, limit_days: int = 9) -> datetime | None:
    """Latest slot at or before now, found minute by minute (UTC cadences only)."""
    t = _minute(now)
    for _ in range(limit_days * 24 * 60):
        if isinstance(cadence, Interval):
            if (t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() % cadence.seconds == 0:
                return t
        elif cadence.matches(t):
            return t
        t -= MIN
    return None


@st.composite
def histories(draw, now: datetime) -> list[tuple[datetime, str]]:
    offsets = draw(st.lists(st.tuples(st.integers(-60, 9 * 24 * 60), st.sampled_from(["full", "diff"])),
                            max_size=12))
    return [(now - timedelta(minutes=m, seconds=draw(st.integers(0, 59))), k) for m, k in offsets]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FULLS), st.sampled_from(DIFFS), times, st.data())
def test_decide_matches_the_model(full_text, diff_text, now, data):
    full = parse_cadence(full_text)
    diff = parse_cadence(diff_text) if diff_text else None
    history = data.draw(histories(now))
    got = decide(full, diff, now, history)

    full_slot = scan_last_slot(full, now)
    history = [(t, k) for t, k in history if t <= now + timedelta(minutes=5)]  # further ahead serves no slot
    fulls = [t for t, k in history if k == "full"]
    if not fulls or max(fulls) < full_slot:
        assert (got.kind, got.slot) == ("full", full_slot)
        return
    if diff is not None:
        diff_slot = scan_last_slot(diff, now)
        if max(t for t, _ in history) < diff_slot:
            assert (got.kind, got.slot) == ("diff", diff_slot)
            return
    assert got.kind is None and got.slot is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FULLS), st.sampled_from(DIFFS), times,
       st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 300)), min_size=1, max_size=40))
def test_simulated_clock_catches_up_once(full_text, diff_text, start, steps):
    """Drive decide with an injected clock: a run at each step performs what is due, taking a while."""
    full = parse_cadence(full_text)
    diff = parse_cadence(diff_text) if diff_text else None
    history: list[tuple[datetime, str]] = []
    served: dict[str, list[datetime]] = {"full": [], "diff": []}
    now = start
    for gap_minutes, duration_s in steps:
        now += timedelta(minutes=gap_minutes)
        due = decide(full, diff, now, history)
        if due.kind is not None:
            history.append((now + timedelta(seconds=duration_s), due.kind))
            if due.slot is not None:
                served[due.kind].append(due.slot)
        # one run brings the source up to date: at most one backup per run, however long the machine was off
        again = decide(full, diff, now, history)
        assert again.kind is None, (now, history, again)
        last_full = max(t for t, k in history if k == "full")
        assert last_full >= full.prev(now)
        if diff is not None:
            assert max(t for t, _ in history) >= diff.prev(now)
    # no slot is served twice, and a full is made at most once per full slot that passed
    for kind in served:
        assert len(served[kind]) == len(set(served[kind]))
    fulls = sum(1 for _, k in history if k == "full")
    passed = 0
    t = full.prev(start)
    while t is not None and t <= now:
        passed += 1
        t = full.next(t)
    assert fulls <= passed


def test_decide_examples():
    full, diff = parse_cadence("daily 02:00"), parse_cadence("hourly")
    d = lambda h, m=0: datetime(2026, 6, 1, h, m, tzinfo=UTC)  # noqa: E731
    assert decide(full, diff, d(1, 30), []).kind == "full"
    assert decide(full, diff, d(1, 30), [(d(0, 10), "full")]).kind == "diff"
    assert decide(full, diff, d(1, 30), [(d(0, 10), "full"), (d(1, 0), "diff")]).kind is None
    day_before = d(1) - timedelta(days=1)
    # off for a day and a half: one full for the latest slot, not one per missed slot
    due = decide(full, diff, d(13, 20), [(day_before, "full")])
    assert (due.kind, due.slot) == ("full", d(2))
    assert decide(full, diff, d(13, 20), [(day_before, "full"), (d(13, 21), "full")]).kind is None
    # one dated months ahead (the clock was wrong when it was taken) must not hold every backup off until then
    assert decide(full, diff, d(13, 20), [(day_before, "full"), (d(13) + timedelta(days=90), "full")]).kind == "full"
    assert decide(full, diff, d(13, 20), [(d(2, 5), "full"), (d(13) + timedelta(days=90), "diff")]).kind == "diff"
    with pytest.raises(UsageError):
        decide(full, diff, datetime(2026, 1, 1), [])


# --------------------------------------------------------------------------- policy parsing


BASE = {
    "repository": {"url": "/srv/repo", "password-file": "pw"},
    "timezone": "Europe/Berlin",
    "full": "daily 02:00",
    "diff": "hourly",
    "retention": "business",
    "presets": {"business": {"keep-full-within": "30d", "keep-diff-within": "7d"}},
    "source": [
        {"name": "db", "paths": ["data/db"], "pre": "pg_ctl checkpoint", "post": ["rm", "-f", "x"],
         "fixed-chunks": ["base/*"], "ignore-inode": True},
        {"name": "etc", "paths": "/etc", "host": "h1", "tags": ["cfg"], "full": "0 3 * * sun", "diff": "every 6h",
         "retention": {"keep-last": 3}, "timezone": "UTC", "hook-timeout": 30, "excludes": ["*.tmp"]},
    ],
}


def test_policy_parses_with_defaults_and_overrides():
    p = parse_policy(BASE, "/etc/chunkvault")
    assert p.repository == "/srv/repo" and p.password_file == "/etc/chunkvault/pw"
    db, etc = p.sources
    assert db.paths == ("/etc/chunkvault/data/db",)
    assert db.full.text == "daily 02:00" and db.diff.text == "hourly"
    assert db.full.prev(datetime(2026, 7, 1, 10, tzinfo=UTC)) == datetime(2026, 7, 1, 0, tzinfo=UTC)  # Berlin
    assert db.retention.keep_full_within is not None and db.retention.keep_last is None
    assert db.pre == "pg_ctl checkpoint" and db.post == ("rm", "-f", "x")
    assert db.fixed_chunks == ("base/*",) and etc.fixed_chunks == ()
    assert (db.ignore_inode, db.ignore_ctime, etc.ignore_inode) == (True, False, False)
    assert etc.paths == ("/etc",) and etc.host == "h1" and etc.tags == ("cfg",) and etc.excludes == ("*.tmp",)
    assert etc.retention.keep_last == 3 and etc.hook_timeout == 30.0
    assert etc.full.prev(datetime(2026, 7, 1, 10, tzinfo=UTC)) == datetime(2026, 6, 28, 3, tzinfo=UTC)
    assert isinstance(etc.diff, Interval)
    assert parse_policy(_with(repository="backups/repo"), "/srv").repository == "/srv/backups/repo"
    assert parse_policy(_with(repository="s3://bucket/x"), "/srv").repository == "s3://bucket/x"
    by_command = parse_policy(_with(repository={"url": "/r", "password-command": "pass show db"}), "/srv")
    assert by_command.password_command == "pass show db" and by_command.password_file is None
    assert p.max_repack_size is None and parse_policy(_with(**{"max-repack-size": "2M"}), "/srv").max_repack_size == 2 << 20


def _with(**changes):
    cfg = {**BASE, "source": [dict(s) for s in BASE["source"]]}
    for key, value in changes.items():
        if key.startswith("src_"):
            if value is None:
                cfg["source"][0].pop(key[4:], None)
            else:
                cfg["source"][0][key[4:]] = value
        elif value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("changes, fragment", [
    ({"colour": "blue"}, "unknown setting 'colour'"),
    ({"src_colour": "blue"}, "unknown setting 'colour' in source 'db'"),
    ({"source": None}, "no sources"),
    ({"source": []}, "no sources"),
    ({"source": {"name": "x"}}, "[[source]]"),
    ({"src_name": "bad name"}, "needs a name"),
    ({"src_paths": None}, "no paths"),
    ({"src_paths": []}, "paths must be"),
    ({"full": None}, "no full cadence"),
    ({"src_full": "fortnightly"}, "invalid schedule 'fortnightly'"),
    ({"diff": "61 * * * *"}, "invalid schedule"),
    ({"timezone": "Mars/Olympus"}, "unknown time zone"),
    ({"retention": "gold"}, "no retention preset 'gold'"),
    ({"retention": {"keep-forever": 1}}, "unknown retention setting"),
    ({"retention": {}}, "no keep rule"),
    ({"retention": 5}, "preset name or a table"),
    ({"src_pre": 5}, "shell command"),
    ({"src_hook-timeout": -1}, "positive number"),
    ({"prune": "yes"}, "true or false"),
    ({"max-unused": "lots"}, "share"),
    ({"max-repack-size": "lots"}, "max-repack-size: not a size"),
    ({"max-repack-size": True}, "max-repack-size: not a size"),
    ({"repository": 7}, "URL string"),
    ({"password-command": "pass show db"}, "password-file and password-command both given"),
    ({"repository": {"url": "/r", "password-command": ""}}, "password-command must be a command line"),
    ({"repository": {"url": "/r", "password-file": 3}}, "password-file must be a path"),
    ({"repository": "/r", "password-file": "a", "password_command": "b"}, "both given"),
    ({"src_ignore-inode": "yes"}, "true or false"),
])
def test_bad_policies_say_what_and_where(changes, fragment):
    with pytest.raises(UsageError) as e:
        parse_policy(_with(**changes), "/etc")
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_duplicate_source_names_are_refused():
    cfg = _with()
    cfg["source"][1]["name"] = "db"
    with pytest.raises(UsageError, match="two sources are named 'db'"):
        parse_policy(cfg, "/etc")


def test_source_history_is_host_and_paths():
    class S:
        def __init__(self, host, paths, stdin_name=None):
            self.host, self.paths, self.stdin_name = host, paths, stdin_name

    snaps = [S("h", ["/a", "/b"]), S("h", ["/b", "/a"]), S("x", ["/a", "/b"]), S("h", ["/a"]),
             S("h", ["/a", "/b"], "dump.sql")]
    assert source_history(snaps, "h", ["/a", "/b"]) == snaps[:2]


@pytest.mark.parametrize("retention", [{"keep-last": 1, "group-by": 5}, {"keep-last": 1, "group-by": [5]},
                                       {"keep-tags": [5]}, {"keep-tags": [{"a": 1}]}])
def test_retention_values_of_the_wrong_kind_are_one_usage_error(retention):
    """They crashed with a TypeError (and {a=1} was read as the tag "a")."""
    from chunkvault.store.retention import policy_from_dict

    with pytest.raises(UsageError):
        policy_from_dict(retention)


def test_an_interval_past_what_dates_can_hold_is_refused():
    with pytest.raises(UsageError, match="at most 100 years"):
        parse_cadence("every 99999999999999999999w")


@pytest.mark.parametrize("source, top", [({"command": "echo", "stdin-name": "../evil"}, {}),
                                         ({"paths": ["/x"], "pre": [""]}, {}),
                                         ({"paths": ["/x"]}, {"max-unused": True}),
                                         ({"paths": ["/x"], "tags": "nightly,pg"}, {}),
                                         ({"paths": ["/x"]}, {"tags": ["nightly,pg"]}),
                                         ({"paths": ["/x"], "tags": ["red\x1b[31m"]}, {}),
                                         ({"paths": ["/x"]}, {"tags": ["nel\x85"]}),
                                         ({"paths": ["/x"], "host": "db1\nroot"}, {}),
                                         ({"paths": ["/x"]}, {"host": "\x1b]0;title\x07"})])
def test_a_policy_value_that_would_fail_every_run_is_refused_when_it_loads(source, top):
    """They loaded, then failed at every run (or true was read as 100 %; a host or tag holding a control
    character: `run --dry-run` said a backup was due)."""
    from chunkvault.schedule import parse_policy

    with pytest.raises(UsageError):
        parse_policy({"repository": "/r", "full": "daily 02:00", **top, "source": [{"name": "s", **source}]})


def test_a_postgres_source_reads_one_data_directory():
    assert parse_policy(_with(src_postgres=True), "/srv").sources[0].postgres == ""
    conn = "host=/run/postgresql user=postgres"
    assert parse_policy(_with(src_postgres=conn), "/srv").sources[0].postgres == conn
    assert parse_policy(_with(src_postgres=False), "/srv").sources[0].postgres is None
    assert parse_policy(BASE, "/srv").sources[0].postgres is None
    with pytest.raises(UsageError, match="source 'db': postgres reads one data directory"):
        parse_policy(_with(src_paths=["/a", "/b"], src_postgres=True), "/srv")
    with pytest.raises(UsageError, match="postgres is true or psql's connection string"):
        parse_policy(_with(src_postgres=5), "/srv")
