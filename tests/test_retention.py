"""Retention selection and rebase planning against a brute-force model written independently."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import assume, example, given, settings, strategies as st

from chunkvault.errors import CorruptObject, MissingObject, SnapshotNotFound, UsageError
from chunkvault.store.chronology import chronological_key
from chunkvault.store.retention import (
    Decision, Duration, RetentionPolicy, chain_dependencies, load_preset, newest_of_groups, parse_duration,
    parse_group_by, policy_from_dict, presets_from_dict, rebase_plan, select,
)

UTC = timezone.utc
EPOCH = datetime(2021, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Snap:
    id: str
    time: datetime
    kind: str = "full"
    parent: str | None = None
    host: str = "h"
    paths: tuple[str, ...] = ("/db",)
    tags: tuple[str, ...] = ()
    taken_as: str | None = None


# ----------------------------------------------------------------------------- brute-force model


def model_minus(t: datetime, d) -> datetime:
    """t - d, months stepped one at a time and the day walked back until it exists."""
    if isinstance(d, timedelta):
        return t - d
    y, m = t.year, t.month
    for _ in range(d.years * 12 + d.months):
        y, m = (y - 1, 12) if m == 1 else (y, m - 1)
    day = t.day
    while True:
        try:
            shifted = t.replace(year=y, month=m, day=day)
            break
        except ValueError:
            day -= 1
    return shifted - timedelta(hours=24 * d.days + d.hours)


def model_bucket(rule, t):
    return {
        "hourly": t.strftime("%Y-%m-%d %H"),
        "daily": t.strftime("%Y-%m-%d"),
        "weekly": "%d-W%02d" % t.isocalendar()[:2],
        "monthly": t.strftime("%Y-%m"),
        "yearly": t.strftime("%Y"),
    }[rule]


def model_age(s, by_id):
    """How many ancestors of ``s`` have its very time (a chain dated one instant): they come before it."""
    n, cur, seen = 0, s, set()
    while cur.parent in by_id and by_id[cur.parent].time == cur.time and cur.parent not in seen:
        seen.add(cur.parent)
        cur = by_id[cur.parent]
        n += 1
    return n


def model(snaps, policy, now):
    """id -> set of rule categories that keep it (empty set: removed)."""
    why = {s.id: set() for s in snaps}
    by_id = {s.id: s for s in snaps}
    groups = {}
    for s in snaps:
        if s.time > now + timedelta(minutes=5):  # dated ahead: kept, counted by no rule
            why[s.id].add("ahead")
            continue
        key = tuple(
            (s.host if g == "host" else tuple(sorted(s.paths)) if g == "paths" else tuple(sorted(set(s.tags))))
            for g in sorted(policy.group_by))
        groups.setdefault(key, []).append(s)
    for members in groups.values():
        order = sorted(members, key=lambda s: (s.time, model_age(s, by_id), s.id))  # oldest first
        newest_first = order[::-1]
        not_future = [s.time for s in members if s.time <= now]
        latest = max(not_future) if not_future else now
        for ts in policy.keep_tags:
            for s in members:
                if (ts and ts.issubset(s.tags)) or (not ts and not s.tags):
                    why[s.id].add("tag")
        if policy.keep_within:
            for s in members:
                if s.time > model_minus(latest, policy.keep_within):
                    why[s.id].add("within")
        if policy.keep_last:
            n = len(members) if policy.keep_last == -1 else policy.keep_last
            for s in newest_first[:n]:
                why[s.id].add("last")
        for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
            n = getattr(policy, f"keep_{rule}")
            if not n:
                continue
            newest_in_bucket = {}
            for s in order:  # later ones overwrite: ends with the newest of each bucket
                newest_in_bucket[model_bucket(rule, s.time)] = s
            ranked = sorted(newest_in_bucket.values(), key=lambda s: (s.time, model_age(s, by_id), s.id), reverse=True)
            for s in (ranked if n == -1 else ranked[:n]):
                why[s.id].add(rule)
            buckets_before_oldest = {model_bucket(rule, s.time) for s in order[1:]}
            if n == -1 or len(buckets_before_oldest) < n:
                why[order[0].id].add(rule)
        for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
            d = getattr(policy, f"keep_within_{rule}")
            if not d:
                continue
            cut = model_minus(latest, d)
            inside = [s for s in order if s.time > cut]
            newest_in_bucket = {}
            for s in inside:
                newest_in_bucket[model_bucket(rule, s.time)] = s
            for s in newest_in_bucket.values():
                why[s.id].add(f"{rule} within")
        for kind, d in (("full", policy.keep_full_within), ("diff", policy.keep_diff_within)):
            if d:
                for s in members:
                    if (s.taken_as or s.kind) == kind and s.time > model_minus(now, d):
                        why[s.id].add(f"{kind} within")
    # keep_full and keep_diff: a kept differential with nothing kept before it in its chain becomes a full
    # (rebased), and counts as one; repeat until the fulls counted so are the same.
    base = {sid: set(r) for sid, r in why.items()}

    def ancestors(s):
        out = []
        while s.kind == "diff" and s.parent in by_id and s.parent not in out:
            out.append(s.parent)
            s = by_id[s.parent]
        return out

    def whole(s):
        a = ancestors(s)
        return by_id[a[-1]].kind == "full" if a else s.kind == "full"

    promoted: set = set()
    while policy.keep_full or policy.keep_diff:
        why = {sid: set(r) for sid, r in base.items()}
        ordered = {k: sorted(m, key=lambda s: (s.time, model_age(s, by_id), s.id), reverse=True)
                   for k, m in groups.items()}
        if policy.keep_full:
            for newest_first in ordered.values():
                fulls = [s for s in newest_first if s.kind == "full" or s.id in promoted]
                for s in fulls if policy.keep_full == -1 else fulls[:policy.keep_full]:
                    why[s.id].add("full")
        if policy.keep_diff:
            for newest_first in ordered.values():
                diffs = [s for s in newest_first if s.kind == "diff" and whole(s)
                         and any(why.get(a) for a in ancestors(s))]
                for s in diffs if policy.keep_diff == -1 else diffs[:policy.keep_diff]:
                    why[s.id].add("diff")
        now_promoted = {s.id for s in snaps if s.kind == "diff" and why[s.id]
                        and not any(why.get(a) for a in ancestors(s))}
        if now_promoted == promoted:
            break
        promoted = now_promoted
    return why


def category(reason: str) -> str:
    """Map select()'s reason text to the model's rule categories."""
    if reason == "dated ahead":
        return "ahead"
    if reason.startswith("tag ") or reason == "untagged":
        return "tag"
    if reason.startswith("oldest "):
        return reason.split()[1]
    for prefix in ("full within", "diff within"):
        if reason.startswith(prefix):
            return prefix
    words = reason.split()
    if words[0] == "within":
        return "within"
    if len(words) >= 2 and words[1] == "within":
        return f"{words[0]} within"
    return words[0]


# ----------------------------------------------------------------------------- strategies

SPANS = [timedelta(hours=3), timedelta(days=2), timedelta(days=20), timedelta(days=400), timedelta(days=2000)]
durations = st.one_of(
    st.sampled_from([timedelta(hours=1), timedelta(hours=5), timedelta(days=1), timedelta(days=3, hours=2)]),
    st.builds(Duration, years=st.integers(0, 2), months=st.integers(0, 14), days=st.integers(0, 40),
              hours=st.integers(0, 30)),
)
counts = st.one_of(st.none(), st.integers(-1, 6))
TAGS = ["prod", "db", "x"]


@st.composite
def histories(draw, min_size=0, max_size=30):
    span = draw(st.sampled_from(SPANS))
    grid = draw(st.sampled_from([1, 60, 3600]))  # coarse grids produce equal timestamps
    n = draw(st.integers(min_size, max_size))
    secs = int(span.total_seconds()) // grid
    snaps = []
    for i in range(n):
        t = EPOCH + timedelta(seconds=draw(st.integers(0, secs)) * grid)
        kind = draw(st.sampled_from(["full", "diff"])) if snaps else "full"
        parent = draw(st.sampled_from([s.id for s in snaps])) if kind == "diff" else None
        snaps.append(Snap(
            id=f"{draw(st.integers(0, 2**32)):08x}{i:04x}", time=t, kind=kind, parent=parent,
            host=draw(st.sampled_from(["a", "b"])),
            paths=tuple(draw(st.sets(st.sampled_from(["/db", "/etc", "/var"]), min_size=1, max_size=2))),
            tags=tuple(draw(st.sets(st.sampled_from(TAGS), max_size=2))),
        ))
    now = EPOCH + span + draw(st.sampled_from([timedelta(0), timedelta(hours=-2), timedelta(days=9)]))
    return snaps, now


@st.composite
def policies(draw):
    kw = {}
    for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                 "keep_full", "keep_diff"):
        kw[name] = draw(counts)
    for name in ("keep_within", "keep_within_hourly", "keep_within_daily", "keep_within_weekly",
                 "keep_within_monthly", "keep_within_yearly", "keep_full_within", "keep_diff_within"):
        kw[name] = draw(st.one_of(st.none(), st.none(), durations))
    kw["keep_tags"] = tuple(draw(st.lists(st.frozensets(st.sampled_from(TAGS), max_size=2), max_size=2)))
    kw["group_by"] = draw(st.frozensets(st.sampled_from(["host", "paths", "tags"])))
    p = RetentionPolicy(**kw)
    assume(not p.is_empty())
    return p


def kept(decisions):
    return {d.snapshot_id for d in decisions if d.keep}


# ----------------------------------------------------------------------------- selection vs model


@settings(max_examples=400, deadline=None)
@given(histories(), policies())
@example(([Snap("a1", EPOCH, host="a", tags=("prod",)), Snap("b1", EPOCH, host="b")], EPOCH + timedelta(days=2)),
         RetentionPolicy(keep_tags=(frozenset({"prod"}),), group_by=frozenset({"host"})))  # b's group emptied:
def test_select_matches_brute_force_model(history, policy):  # drawn in about one example of a hundred
    snaps, now = history
    decisions = select(snaps, policy, now, allow_remove_all=True)
    assert [d.snapshot_id for d in decisions] == [s.id for s in snaps]
    expected = model(snaps, policy, now)
    for d in decisions:
        assert d.keep == bool(expected[d.snapshot_id]), (d, expected[d.snapshot_id])
        if d.keep:
            assert {category(r) for r in d.reasons} == expected[d.snapshot_id]
        else:
            assert d.reasons == ("no rule matched",)
    # Unless told to, select refuses a policy that would leave a group with no snapshot.
    groups: dict = {}
    for s in snaps:
        key = (s.host if "host" in policy.group_by else "", sorted(s.paths) if "paths" in policy.group_by else "",
               sorted(s.tags) if "tags" in policy.group_by else "")
        groups.setdefault(repr(key), []).append(s.id)
    emptied = any(not any(expected[i] for i in ids) for ids in groups.values())
    if emptied:
        with pytest.raises(UsageError, match="refusing to remove them all"):
            select(snaps, policy, now)
    else:
        assert select(snaps, policy, now) == decisions


@settings(max_examples=150, deadline=None)
@given(histories(), st.integers(1, 8), st.frozensets(st.sampled_from(["host", "paths", "tags"])))
def test_keep_last_keeps_exactly_the_newest_per_group(history, n, group_by):
    snaps, now = history
    decisions = select(snaps, RetentionPolicy(keep_last=n, group_by=group_by), now)
    groups = {}
    for s in snaps:
        key = (s.host if "host" in group_by else "", sorted(s.paths) if "paths" in group_by else "",
               sorted(s.tags) if "tags" in group_by else "")
        groups.setdefault(repr(key), []).append(s)
    ahead = {s.id for s in snaps if s.time > now + timedelta(minutes=5)}  # kept, and not counted
    want = set(ahead)
    newest_first = chronological_key(snaps)  # by time; at one instant a differential after its parent, then id
    for members in groups.values():
        members = sorted((s for s in members if s.id not in ahead), key=newest_first, reverse=True)
        want |= {s.id for s in members[:n]}
    assert kept(decisions) == want


def test_keep_last_at_one_instant_keeps_the_differential_not_its_parent():
    """A full and its differential dated one instant: the differential is the newer (the model sorted by id)."""
    t = datetime(2021, 1, 1, tzinfo=timezone.utc)
    full = Snap("000000010000", t)
    diff = Snap("000000000001", t, kind="diff", parent=full.id)
    assert kept(select([full, diff], RetentionPolicy(keep_last=1), t + timedelta(hours=3))) == {diff.id}


@settings(max_examples=150, deadline=None)
@given(histories(), st.integers(1, 8), st.frozensets(st.sampled_from(["host", "paths", "tags"])))
def test_latest_lists_what_keep_last_keeps_in_the_order_given(history, n, group_by):
    """``snapshots --latest N`` shows what ``forget --keep-last N`` would keep, grouped the same way (where no
    snapshot is dated ahead of the clock: ``forget`` keeps those without counting them)."""
    snaps, now = history
    now = max([now, *(s.time for s in snaps)])
    shown = newest_of_groups(snaps, n, group_by)
    assert [s.id for s in shown] == [s.id for s in snaps if s.id in kept(select(
        snaps, RetentionPolicy(keep_last=n, group_by=group_by), now))]


def test_group_by_words():
    assert parse_group_by("host, paths") == {"host", "paths"}
    assert parse_group_by("") == frozenset() and parse_group_by(["tags"]) == {"tags"}
    with pytest.raises(UsageError, match="cannot group by hostname"):
        parse_group_by("hostname,paths")
    with pytest.raises(UsageError, match="at least 1"):
        newest_of_groups([], 0, frozenset())

@settings(max_examples=150, deadline=None)
@given(histories(), policies(), st.data())
def test_rules_combine_as_a_union(history, policy, data):
    """Splitting a policy's rules between two policies: the whole keeps the union of what the parts keep
    (``keep_diff`` and ``keep_full`` aside: the one keeps the differentials of what the other rules keep, the
    other counts as fulls the differentials the other rules keep past their full)."""
    snaps, now = history
    assume(not policy.keep_diff and not policy.keep_full)
    parts = [{"group_by": policy.group_by, "keep_tags": ()}, {"group_by": policy.group_by, "keep_tags": ()}]
    for f in RetentionPolicy.__dataclass_fields__:
        if f == "group_by":
            continue
        if f == "keep_tags":
            for ts in policy.keep_tags:
                side = parts[data.draw(st.integers(0, 1))]
                side["keep_tags"] += (ts,)
        else:
            parts[data.draw(st.integers(0, 1))][f] = getattr(policy, f)
    union = set()
    for kw in parts:
        p = RetentionPolicy(**kw)
        if not p.is_empty():
            union |= kept(select(snaps, p, now, allow_remove_all=True))
    assert kept(select(snaps, policy, now, allow_remove_all=True)) == union


@settings(max_examples=150, deadline=None)
@given(histories(), st.one_of(st.none(), durations), st.one_of(st.none(), durations))
def test_tiered_rules_keep_fulls_and_diffs_for_their_own_durations(history, full_d, diff_d):
    assume(full_d or diff_d)
    snaps, now = history
    decisions = select(snaps, RetentionPolicy(keep_full_within=full_d, keep_diff_within=diff_d), now,
                       allow_remove_all=True)
    want = {s.id for s in snaps
            if (s.kind == "full" and full_d and s.time > model_minus(now, full_d))
            or (s.kind == "diff" and diff_d and s.time > model_minus(now, diff_d))
            or s.time > now + timedelta(minutes=5)}  # dated ahead: kept
    assert kept(decisions) == want


def test_tiered_example_30d_fulls_7d_diffs():
    now = EPOCH + timedelta(days=60)
    snaps = []
    for day in range(60):
        t = EPOCH + timedelta(days=day)
        snaps.append(Snap(f"f{day:03d}", t, "full"))
        snaps.append(Snap(f"d{day:03d}", t + timedelta(hours=12), "diff", parent=f"f{day:03d}"))
    policy = policy_from_dict({"keep-full-within": "30d", "keep-diff-within": "1w"})
    decisions = {d.snapshot_id: d for d in select(snaps, policy, now)}
    assert sorted(k for k, d in decisions.items() if d.keep and k.startswith("f")) == [
        f"f{d:03d}" for d in range(31, 60)]
    assert sorted(k for k, d in decisions.items() if d.keep and k.startswith("d")) == [
        f"d{d:03d}" for d in range(53, 60)]
    assert decisions["d059"].reasons == ("diff within 7d",)
    assert decisions["f040"].reasons == ("full within 30d",)
    assert decisions["f001"] == Decision("f001", False, ("no rule matched",))


def test_counted_fulls_and_the_differentials_of_the_fulls_kept():
    """pgBackRest's retention-full and retention-diff: a differential counts only while its full stays, so
    none is kept past its full (to be rebased into one, which the same rules would then remove)."""
    t = EPOCH
    snaps = [Snap("f1", t, "full"), Snap("d1", t + timedelta(hours=1), "diff", parent="f1"),
             Snap("d2", t + timedelta(hours=2), "diff", parent="d1"), Snap("f2", t + timedelta(hours=3), "full"),
             Snap("d3", t + timedelta(hours=4), "diff", parent="f2")]
    now = t + timedelta(days=1)

    def keeps(**kw):
        return {d.snapshot_id: d.reasons for d in select(snaps, RetentionPolicy(**kw), now) if d.keep}

    assert keeps(keep_full=1, keep_diff=2) == {"f2": ("full #1",), "d3": ("diff #1",)}
    assert keeps(keep_full=2, keep_diff=2) == {"f2": ("full #1",), "f1": ("full #2",), "d3": ("diff #1",),
                                               "d2": ("diff #2",)}
    assert keeps(keep_full=-1) == {"f2": ("full #1",), "f1": ("full #2",)}
    assert keeps(keep_last=3, keep_diff=-1) == {"d3": ("last #1", "diff #1"), "f2": ("last #2",),
                                                "d2": ("last #3",)}  # d2's full goes: it is rebased
    assert policy_from_dict({"keep-full": "unlimited", "keep-diff": 6}) == RetentionPolicy(keep_full=-1,
                                                                                            keep_diff=6)
    assert RetentionPolicy(keep_full=2, keep_diff=6).describe().startswith("keep 2 latest full, 6 latest diff")
    with pytest.raises(UsageError, match="refusing to remove them all"):
        select(snaps, RetentionPolicy(keep_diff=3), now)  # no full stays: no differential either
    with pytest.raises(UsageError, match="keep-full"):
        RetentionPolicy(keep_full=-2)


def after_forget(snaps, decisions):
    """The snapshots a forget leaves, rebased as ``rebase_plan`` does: a kept differential's parent is the
    nearest kept snapshot before it in its chain; with none, it absorbs the removed ones and is a full, one
    taken as a differential."""
    keep = kept(decisions)
    by_id = {s.id: s for s in snaps}
    out = []
    for s in snaps:
        if s.id not in keep:
            continue
        cur, parent = s, None
        while cur.kind == "diff" and cur.parent in by_id:
            cur = by_id[cur.parent]
            if cur.id in keep:
                parent = cur.id
                break
        kind = "diff" if parent else "full"
        out.append(dataclasses.replace(s, kind=kind, parent=parent,
                                       taken_as=s.taken_as or (s.kind if kind != s.kind else None)))
    return out


@settings(max_examples=400, deadline=None)
@given(histories(), policies())
def test_the_same_rules_run_again_remove_nothing(history, policy):
    # Times made distinct: snapshots of one instant are ordered by their place in their chain, which a rebase
    # changes.
    snaps, now = history
    snaps = [dataclasses.replace(s, time=s.time + timedelta(microseconds=i)) for i, s in enumerate(snaps)]
    left = after_forget(snaps, select(snaps, policy, now, allow_remove_all=True))
    assert kept(select(left, policy, now, allow_remove_all=True)) == {s.id for s in left}


def test_counted_fulls_count_the_differentials_that_become_fulls():
    """Two sources in one group: the newest differential, kept by keep-last, loses its full and becomes a
    full; counted as one, it is the full keep-full 1 keeps, and the second run keeps all the first kept
    (it used to count the older source's full first, and remove that source's history the second time)."""
    t = datetime(2026, 11, 1, tzinfo=timezone.utc)
    snaps = [Snap("a1", t, host="h", paths=("/a",)), Snap("b1", t + timedelta(hours=1), paths=("/b",)),
             Snap("b2", t + timedelta(hours=2), "diff", "b1", paths=("/b",)),
             Snap("a2", t + timedelta(hours=3), "diff", "a1", paths=("/a",))]
    policy = RetentionPolicy(keep_last=1, keep_full=1, keep_diff=1, group_by=frozenset({"host"}))
    first = select(snaps, policy, t + timedelta(days=1))
    assert kept(first) == {"a2"}
    left = after_forget(snaps, first)
    assert [(s.id, s.kind) for s in left] == [("a2", "full")]
    assert kept(select(left, policy, t + timedelta(days=1))) == {"a2"}


def test_differentials_counted_on_a_full_outside_the_selection():
    """``forget --tag hourly --keep-diff 2``: the full, tagged otherwise, stays; the two newest
    differentials on it are kept (none were: their full was not among the snapshots weighed)."""
    t = datetime(2026, 11, 1, tzinfo=timezone.utc)
    full = Snap("f", t, tags=("daily",))
    diffs = [Snap(f"d{i}", t + timedelta(hours=i), "diff", "f", tags=("hourly",)) for i in range(1, 5)]
    now = t + timedelta(days=1)
    decisions = select(diffs, RetentionPolicy(keep_diff=2), now, outside=[full])
    assert kept(decisions) == {"d3", "d4"}
    with pytest.raises(UsageError, match="keeps none"):
        select(diffs, RetentionPolicy(keep_diff=2), now)  # with the full out of sight, nothing counts


def test_restic_documentation_example_sundays():
    snaps = [Snap(f"s{i:02d}", datetime(2019, 9, 1, 11, tzinfo=UTC) + timedelta(weeks=i)) for i in range(12)]
    decisions = select(snaps, RetentionPolicy(keep_daily=4), datetime(2019, 12, 1, tzinfo=UTC))
    assert kept(decisions) == {"s08", "s09", "s10", "s11"}
    by_id = {d.snapshot_id: d for d in decisions}
    assert by_id["s11"].reasons == ("daily #1",)
    assert by_id["s08"].reasons == ("daily #4",)


def test_oldest_snapshot_kept_while_buckets_remain():
    snaps = [Snap(f"s{i}", EPOCH + timedelta(hours=6 * i)) for i in range(8)]  # two days, four per day
    by_id = {d.snapshot_id: d for d in select(snaps, RetentionPolicy(keep_daily=5), EPOCH + timedelta(days=3))}
    assert kept(by_id.values()) == {"s7", "s3", "s0"}
    assert by_id["s0"].reasons == ("oldest daily",)
    by_id = {d.snapshot_id: d for d in select(snaps, RetentionPolicy(keep_daily=2), EPOCH + timedelta(days=3))}
    assert kept(by_id.values()) == {"s7", "s3"}


def test_keep_within_is_relative_to_latest_and_keeps_future_snapshots():
    now = EPOCH + timedelta(days=100)
    snaps = [Snap("old", EPOCH), Snap("older", EPOCH - timedelta(days=2)), Snap("older2", EPOCH - timedelta(days=5)),
             Snap("future", now + timedelta(days=1))]
    assert kept(select(snaps, RetentionPolicy(keep_within="3d"), now)) == {"old", "older", "future"}


@pytest.mark.parametrize("rule,duration,latest,edge", [
    ("keep_within", "2d", datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC)),
    ("keep_within_hourly", "2h", datetime(2026, 3, 10, 10, tzinfo=UTC), datetime(2026, 3, 10, 8, tzinfo=UTC)),
    ("keep_within_daily", "2d", datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC)),
    ("keep_within_weekly", "2w", datetime(2026, 3, 9, tzinfo=UTC), datetime(2026, 2, 23, tzinfo=UTC)),
    ("keep_within_monthly", "2m", datetime(2026, 3, 15, tzinfo=UTC), datetime(2026, 1, 15, tzinfo=UTC)),
    ("keep_within_yearly", "2y", datetime(2026, 3, 15, tzinfo=UTC), datetime(2024, 3, 15, tzinfo=UTC)),
])
def test_a_snapshot_exactly_the_duration_before_the_latest_is_outside_the_window(rule, duration, latest, edge):
    """"Strictly newer than (latest - D)": on the edge, out; a second after it, in.  Each alone in its
    bucket, so a bucket rule keeps it exactly when the window takes it (the model test finds an error
    here only by chance)."""
    now = latest + timedelta(days=1)
    policy = RetentionPolicy(**{rule: duration})
    on_edge = [Snap("latest", latest), Snap("edge", edge)]
    assert kept(select(on_edge, policy, now)) == {"latest"}
    inside = [Snap("latest", latest), Snap("inside", edge + timedelta(seconds=1))]
    assert kept(select(inside, policy, now)) == {"latest", "inside"}


def test_tags_and_untagged():
    snaps = [Snap("a", EPOCH, tags=("prod", "db")), Snap("b", EPOCH + timedelta(hours=1), tags=("prod",)),
             Snap("c", EPOCH + timedelta(hours=2))]
    now = EPOCH + timedelta(days=1)
    by_id = {d.snapshot_id: d for d in select(snaps, RetentionPolicy(keep_tags=(("prod", "db"), ())), now)}
    assert kept(by_id.values()) == {"a", "c"}
    assert by_id["a"].reasons == ("tag db,prod",) and by_id["c"].reasons == ("untagged",)
    p = policy_from_dict({"keep-tags": ["prod"], "group-by": ""})
    assert kept(select(snaps, p, now)) == {"a", "b"}


def test_a_policy_that_keeps_nothing_of_a_group_is_refused_unless_allowed():
    snaps = [Snap("a", EPOCH, tags=("prod",)), Snap("b", EPOCH, host="h2")]
    typo = RetentionPolicy(keep_tags=(("prdo",),))
    with pytest.raises(UsageError) as e:
        select(snaps, typo, EPOCH)
    assert "keeps none of the 1 snapshot(s) of host " in str(e.value) and "--unsafe-allow-remove-all" in str(e.value)
    assert "leave that group out with a host, tag or path filter" in str(e.value)
    assert kept(select(snaps, typo, EPOCH, allow_remove_all=True)) == set()
    assert kept(select(snaps, RetentionPolicy(keep_tags=(("prod",),), group_by=frozenset()), EPOCH)) == {"a"}


def test_empty_policy_and_bad_input_are_refused():
    snaps = [Snap("a", EPOCH)]
    for p in (RetentionPolicy(), RetentionPolicy(keep_last=0, keep_daily=0, keep_within=timedelta(0))):
        with pytest.raises(UsageError, match="empty"):
            select(snaps, p, EPOCH)
    with pytest.raises(UsageError, match="timezone"):
        select([Snap("a", datetime(2021, 1, 1))], RetentionPolicy(keep_last=1), EPOCH)
    with pytest.raises(UsageError, match="twice"):
        select([Snap("a", EPOCH), Snap("a", EPOCH)], RetentionPolicy(keep_last=1), EPOCH)
    with pytest.raises(UsageError, match="kind"):
        select([Snap("a", EPOCH, kind="incremental")], RetentionPolicy(keep_last=1), EPOCH)
    with pytest.raises(UsageError):
        RetentionPolicy(keep_last=-2)
    with pytest.raises(UsageError):
        RetentionPolicy(keep_daily=True)
    with pytest.raises(UsageError, match="group"):
        RetentionPolicy(keep_last=1, group_by={"hostname"})
    assert select([], RetentionPolicy(keep_last=1), EPOCH) == []


def test_weeks_are_iso_weeks_across_new_year():
    # 2024-12-30 (Monday) .. 2025-01-05 (Sunday) is ISO week 2025-W01; 2024-12-29 is a Sunday of 2024-W52.
    snaps = [Snap("sun", datetime(2024, 12, 29, 12, tzinfo=UTC)), Snap("tue", datetime(2024, 12, 31, 12, tzinfo=UTC)),
             Snap("wed", datetime(2025, 1, 1, 12, tzinfo=UTC))]
    now = datetime(2025, 1, 10, tzinfo=UTC)
    assert kept(select(snaps, RetentionPolicy(keep_weekly=2), now)) == {"wed", "sun"}
    assert kept(select(snaps, RetentionPolicy(keep_yearly=2), now)) == {"wed", "tue"}


def test_non_utc_times_bucket_in_utc():
    cet = timezone(timedelta(hours=1))
    # 00:30 CET on the 2nd is 23:30 UTC on the 1st: same UTC day as the 10:00 UTC snapshot.
    snaps = [Snap("a", datetime(2021, 1, 1, 10, tzinfo=UTC)), Snap("b", datetime(2021, 1, 2, 0, 30, tzinfo=cet))]
    assert kept(select(snaps, RetentionPolicy(keep_daily=1), EPOCH + timedelta(days=5))) == {"b"}


# ----------------------------------------------------------------------------- durations


@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 10), st.integers(0, 30), st.integers(0, 48))
def test_parse_duration_units(y, m, w, d, h):
    parts = [(y, "y"), (m, "m"), (w, "w"), (d, "d"), (h, "h")]
    text = "".join(f"{n}{u}" for n, u in parts if n)
    assume(text)
    got = parse_duration(text)
    assert got == Duration(years=y, months=m, days=7 * w + d, hours=h)
    assert parse_duration(str(got)) == got


@pytest.mark.parametrize("text", ["", "7", "d", "3x", "1d2y", "1d1d", "-1d", "1.5d", "7 d", "1w1w"])
def test_parse_duration_rejects(text):
    assert parse_duration(" 7D ") == Duration(days=7)
    with pytest.raises(UsageError):
        parse_duration(text)


def test_calendar_months_clamp_to_month_end():
    t = datetime(2024, 3, 31, 15, tzinfo=UTC)
    assert parse_duration("1m").before(t) == datetime(2024, 2, 29, 15, tzinfo=UTC)
    assert parse_duration("1y1m").before(t) == datetime(2023, 2, 28, 15, tzinfo=UTC)
    assert parse_duration("2w3d12h").before(t) == datetime(2024, 3, 14, 3, tzinfo=UTC)
    assert parse_duration("1y").to_timedelta(t) == timedelta(days=366)
    assert parse_duration("5000y").before(t).year == 1


@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       durations)
def test_duration_before_matches_model(t, d):
    if isinstance(d, Duration):
        assert d.before(t) == model_minus(t, d)


# ----------------------------------------------------------------------------- presets

CONFIG = """
[presets.database]
keep-full-within = "30d"
keep-diff-within = "7d"
keep-daily = 14
keep-monthly = "unlimited"
group-by = ["host"]

[presets.laptop]
keep_last = 5
keep_within = "1y6m"
keep_tags = ["prod,db", ["pinned"]]
"""


def test_presets_from_toml():
    config = tomllib.loads(CONFIG)
    db = load_preset(config, "database")
    assert db == RetentionPolicy(keep_full_within=Duration(days=30), keep_diff_within=Duration(days=7),
                                 keep_daily=14, keep_monthly=-1, group_by=frozenset({"host"}))
    laptop = presets_from_dict(config)["laptop"]
    assert laptop.keep_within == Duration(years=1, months=6)
    assert laptop.keep_tags == (frozenset({"prod", "db"}), frozenset({"pinned"}))
    assert laptop.group_by == frozenset({"host", "paths"})
    with pytest.raises(UsageError, match="database, laptop"):
        load_preset(config, "nightly")
    with pytest.raises(UsageError, match="keep-dialy"):
        policy_from_dict({"keep-dialy": 3})
    with pytest.raises(UsageError, match="preset 'bad'"):
        presets_from_dict({"presets": {"bad": {"keep-within": 7}}})
    with pytest.raises(UsageError, match="duration"):
        policy_from_dict({"keep-within": "7 days"})
    assert "14 daily" in db.describe() and "diffs within 7d" in db.describe()


# ----------------------------------------------------------------------------- chains and rebasing


@st.composite
def chains(draw):
    """A forest of fulls and diffs (parents earlier), per snapshot a random change set, and a removal set."""
    n = draw(st.integers(1, 25))
    snaps, changes = [], {}
    for i in range(n):
        kind = "full" if i == 0 else draw(st.sampled_from(["full", "diff", "diff", "diff"]))
        parent = f"s{draw(st.integers(0, i - 1)):02d}" if kind == "diff" else None
        sid = f"s{i:02d}"
        snaps.append(Snap(sid, EPOCH + timedelta(hours=i), kind, parent))
        paths = draw(st.dictionaries(st.sampled_from("abcdef"), st.one_of(st.none(), st.integers(0, 3)), max_size=4))
        if kind == "full":
            paths = {p: v for p, v in paths.items() if v is not None}
        changes[sid] = paths  # value None: deleted in this diff
    removed = draw(st.sets(st.sampled_from([s.id for s in snaps])))
    return snaps, changes, removed


def restore(sid, parents, kinds, changes):
    """Brute force: walk to the base, then apply each change set in order."""
    path = []
    cur = sid
    while True:
        path.append(cur)
        if kinds[cur] == "full":
            break
        cur = parents[cur]
    tree = {}
    for s in reversed(path):
        if kinds[s] == "full":
            tree = {}
        for p, v in changes[s].items():
            if v is None:
                tree.pop(p, None)
            else:
                tree[p] = v
    return tree


@settings(max_examples=300, deadline=None)
@given(chains())
def test_rebase_plan_preserves_every_kept_snapshot(case):
    snaps, changes, removed = case
    parents = {s.id: s.parent for s in snaps}
    kinds = {s.id: s.kind for s in snaps}
    before = {s.id: restore(s.id, parents, kinds, changes) for s in snaps if s.id not in removed}

    plan = rebase_plan(snaps, removed)
    kept_ids = {s.id for s in snaps} - removed
    needs = {s.id for s in snaps if s.id in kept_ids and s.kind == "diff" and s.parent in removed}
    assert sorted(step.diff_id for step in plan) == sorted(needs)

    new_changes = dict(changes)
    new_parents, new_kinds = dict(parents), dict(kinds)
    position = {step.diff_id: i for i, step in enumerate(plan)}
    for step in plan:
        # model of "removed ancestors up to the nearest kept one", walked directly
        expect, cur = [], parents[step.diff_id]
        while cur is not None and cur in removed:
            expect.append(cur)
            cur = parents[cur] if kinds[cur] == "diff" else None
        assert step.merge_ids == expect[::-1]
        assert step.new_parent == cur
        if cur is not None:
            assert cur in kept_ids and position.get(cur, -1) < position[step.diff_id]
        # apply: compose the merged change sets (oldest first) with the diff's own
        merged = {}
        for anc in step.merge_ids + [step.diff_id]:
            if kinds[anc] == "full":
                merged = dict(changes[anc])
                for p in "abcdef":
                    merged.setdefault(p, None)  # a full replaces the whole tree
            else:
                merged.update(changes[anc])
        new_changes[step.diff_id] = merged
        new_parents[step.diff_id] = step.new_parent
        if step.new_parent is None:
            new_kinds[step.diff_id] = "full"
            new_changes[step.diff_id] = {p: v for p, v in merged.items() if v is not None}

    survivors = [Snap(s, EPOCH, new_kinds[s], new_parents[s] if new_kinds[s] == "diff" else None)
                 for s in sorted(kept_ids)]
    deps = chain_dependencies(survivors)
    for sid in kept_ids:
        assert set(deps[sid]) <= kept_ids
        assert restore(sid, new_parents, new_kinds, new_changes) == before[sid]


def test_chain_dependencies_and_broken_chains():
    snaps = [Snap("f", EPOCH), Snap("d1", EPOCH, "diff", "f"), Snap("d2", EPOCH, "diff", "d1"),
             Snap("d3", EPOCH, "diff", "f")]
    assert chain_dependencies(snaps) == {"f": [], "d1": ["f"], "d2": ["f", "d1"], "d3": ["f"]}
    with pytest.raises(MissingObject, match="nope"):
        chain_dependencies([Snap("d", EPOCH, "diff", "nope")])
    with pytest.raises(CorruptObject, match="loops"):
        chain_dependencies([Snap("a", EPOCH, "diff", "b"), Snap("b", EPOCH, "diff", "a")])
    with pytest.raises(CorruptObject, match="without a parent"):
        chain_dependencies([Snap("a", EPOCH, "diff", None)])
    with pytest.raises(SnapshotNotFound):
        rebase_plan(snaps, {"zzz"})
    plan = rebase_plan(snaps, {"f", "d1"})
    assert plan == [("d3", ["f"], None), ("d2", ["f", "d1"], None)]


def test_long_chain_is_not_recursive():
    snaps = [Snap("s0", EPOCH)] + [Snap(f"s{i}", EPOCH, "diff", f"s{i - 1}") for i in range(1, 2000)]
    deps = chain_dependencies(snaps)
    assert len(deps["s1999"]) == 1999 and deps["s1999"][0] == "s0"
    plan = rebase_plan(snaps, {f"s{i}" for i in range(0, 1999)})
    assert plan == [("s1999", [f"s{i}" for i in range(1999)], None)]


def test_an_unknown_setting_names_the_one_meant_or_lists_them():
    with pytest.raises(UsageError, match=r"'keep-tag' \(did you mean keep-tags\?\)"):
        policy_from_dict({"keep-daily": 7, "keep-tag": ["pinned"]})
    with pytest.raises(UsageError, match=r"the settings are group-by, keep-daily, .*keep-yearly$"):
        policy_from_dict({"forever": True})


def test_a_setting_given_twice_in_both_spellings_is_refused_not_the_last_taken():
    """keep-daily = 7 and keep_daily = 1 in one table (TOML sees two keys) kept one daily, silently."""
    config = tomllib.loads('[presets.p]\nkeep-daily = 7\nkeep_daily = 1\n')
    with pytest.raises(UsageError, match=r"preset 'p': retention setting 'keep_daily' given twice \(as 'keep-daily' "
                                         r"too\)"):
        presets_from_dict(config)


def test_days_and_months_are_those_of_the_time_zone_given():
    """Always UTC, unlike restic (local time) and the listing: in Berlin the 00:30 snapshot of the 1st of
    December was taken for November's, and November's last one went."""
    from zoneinfo import ZoneInfo

    snaps = [Snap("a", datetime(2026, 11, 30, 22, 0, tzinfo=UTC)),   # Berlin: 23:00 on 30 November
             Snap("b", datetime(2026, 11, 30, 23, 30, tzinfo=UTC))]  # Berlin: 00:30 on 1 December
    now = datetime(2026, 12, 2, tzinfo=UTC)
    policy = RetentionPolicy(keep_monthly=2)
    berlin = {d.snapshot_id: d.keep for d in select(snaps, policy, now, tz=ZoneInfo("Europe/Berlin"))}
    utc = {d.snapshot_id: d.keep for d in select(snaps, policy, now)}
    assert berlin == {"a": True, "b": True} and utc == {"a": True, "b": True}  # utc: the oldest is kept too
    daily = RetentionPolicy(keep_daily=1)
    assert [d.keep for d in select(snaps, daily, now, tz=ZoneInfo("Europe/Berlin"))] == [False, True]
    assert [d.keep for d in select(snaps, daily, now, tz=ZoneInfo("America/New_York"))] == [False, True]
    three = snaps + [Snap("c", datetime(2026, 11, 30, 21, 0, tzinfo=UTC))]  # Berlin 22:00 on the 30th
    two_days = RetentionPolicy(keep_daily=2)
    in_berlin = {d.snapshot_id for d in select(three, two_days, now, tz=ZoneInfo("Europe/Berlin")) if d.keep}
    assert in_berlin == {"b", "a"}  # 1 December's, then 30 November's newest
    assert {d.snapshot_id for d in select(three, two_days, now) if d.keep} == {"b", "c"}  # one UTC day: its newest
    # and, the rules' days left over, its oldest


def test_snapshots_are_ordered_and_durations_counted_by_instants_whatever_the_time_zones_clocks_do():
    """In the hour the end of summer time repeats, a snapshot 40 minutes newer reads 20 minutes earlier on
    the wall clock: keep-last kept the older one in Berlin (and retention removed the newest backup), and a
    day back from the latest counted 25 hours across the change."""
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    older = Snap("older", datetime(2026, 10, 25, 0, 30, tzinfo=UTC))  # 02:30 summer time
    newer = Snap("newer", datetime(2026, 10, 25, 1, 10, tzinfo=UTC))  # 02:10 winter time
    now = datetime(2026, 10, 26, tzinfo=UTC)
    for tz in (berlin, UTC, None):
        kept = {d.snapshot_id for d in select([older, newer], RetentionPolicy(keep_last=1), now, tz=tz) if d.keep}
        assert kept == {"newer"}, tz
    # 24.5 hours before the latest (25 October, 23:40 in Berlin), across the change: not within a day
    day_before = Snap("day-before", datetime(2026, 10, 24, 0, 40, tzinfo=UTC))
    latest = Snap("latest", datetime(2026, 10, 25, 1, 10, tzinfo=UTC))
    for within in (RetentionPolicy(keep_within=parse_duration("24h")), RetentionPolicy(keep_within=parse_duration("1d"))):
        for tz in (berlin, UTC):
            kept = {d.snapshot_id for d in select([day_before, latest], within, now, tz=tz) if d.keep}
            assert kept == {"latest"}, (within, tz)
    # months still go along the zone's calendar: a month before 1 December 00:30 in Berlin is 1 November
    # 00:30 there (31 October 23:30 UTC); in UTC a month before 30 November 23:30 is 30 October 23:30
    november = Snap("nov", datetime(2026, 10, 31, 23, 20, tzinfo=UTC))  # 00:20 on 1 November in Berlin
    december = Snap("dec", datetime(2026, 11, 30, 23, 30, tzinfo=UTC))  # 00:30 on 1 December in Berlin
    month = RetentionPolicy(keep_within=parse_duration("1m"))
    later = now + timedelta(days=40)
    assert {d.snapshot_id for d in select([november, december], month, later, tz=berlin) if d.keep} == {"dec"}
    assert {d.snapshot_id for d in select([november, december], month, later) if d.keep} == {"nov", "dec"}


@given(st.lists(st.integers(0, 3 * 8760 * 60), min_size=1, max_size=12, unique=True), st.integers(1, 4),
       st.sampled_from(["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "UTC"]))
@settings(max_examples=200, deadline=None)
def test_keep_last_and_hours_within_do_not_depend_on_the_time_zone(minutes, n, zone):
    from zoneinfo import ZoneInfo

    snaps = [Snap(f"s{i}", EPOCH + timedelta(minutes=m)) for i, m in enumerate(minutes)]
    now = EPOCH + timedelta(days=3 * 365 + 10)
    for policy in (RetentionPolicy(keep_last=n), RetentionPolicy(keep_within=parse_duration(f"{n * 7}h"))):
        assert select(snaps, policy, now, tz=ZoneInfo(zone)) == select(snaps, policy, now)
