"""The ledger's pure logic, in bulk: honest histories never look suspicious, replays and rollbacks always do."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Iterator

import pytest
from hypothesis import assume, given, settings, strategies as st

from chunkvault.store import ledger as L
from chunkvault.store.ledger import OLD_VERSION, REPLAYED, ROLLED_BACK, UNREADABLE, LedgerState, Mark

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

# One honest client's operations: back up, forget some (maybe killed before or after the
# deletion), list; and another honest client's retention, which keeps the newest snapshot.
op = st.one_of(
    st.tuples(st.just("backup"), st.integers(1, 3)),
    st.tuples(st.just("forget"), st.sets(st.integers(0, 30), max_size=4)),
    st.tuples(st.just("killed forget"), st.sets(st.integers(0, 30), max_size=3), st.booleans()),
    st.tuples(st.just("other client"), st.sets(st.integers(0, 30), max_size=3), st.booleans()),
    st.tuples(st.just("tag"), st.sets(st.integers(0, 30), min_size=1, max_size=3)),
    st.tuples(st.just("other client tags"), st.sets(st.integers(0, 30), min_size=1, max_size=3)),
    st.tuples(st.just("list"),),
)
forgets = st.one_of(
    st.tuples(st.just("forget"), st.sets(st.integers(0, 30), max_size=4)),
    st.tuples(st.just("killed forget"), st.sets(st.integers(0, 30), max_size=3), st.booleans()),
)


class Model:
    """A repository's snapshot set and one client's ledger, driven honestly."""

    def __init__(self) -> None:
        self.present: dict[str, datetime] = {}
        self.state = LedgerState()
        self.forgotten: dict[str, datetime] = {}  # everything this client removed, with the snapshot times
        self.objects: dict[str, str] = {}  # id -> digest of its stored object (each rewrite a new one)
        self.replaced: dict[str, list[str]] = {}  # id -> digests of its earlier objects
        self.seen: set[tuple[str, str]] = set()  # (id, digest) of each object this client listed or wrote
        self.n = 0
        self.now = T0

    def digests(self) -> dict[str, str]:
        """What a listing reads: the digest of each present snapshot's object."""
        return {sid: self.objects[sid] for sid in self.present}

    def listed(self) -> dict[str, str]:
        """``digests``, for a listing this client's ledger notes."""
        listed = self.digests()
        self.seen.update(listed.items())
        return listed

    def _rewrite(self, ids: list[str]) -> dict[str, str]:
        """New objects for these snapshots (a tag, a rebase): each sealed afresh, so a new digest."""
        for sid in ids:
            self.replaced.setdefault(sid, []).append(self.objects[sid])
            self.n += 1
            self.objects[sid] = f"v{self.n:03d}"
        return {sid: self.objects[sid] for sid in ids}

    def _tick(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now

    def _pick(self, picks: set[int]) -> list[str]:
        ids = sorted(self.present)
        return sorted({ids[i % len(ids)] for i in picks}) if ids else []

    def run(self, step: tuple) -> None:
        for _ in self.phases(step):
            pass

    def phases(self, step: tuple) -> Iterator[None]:
        """``step`` a change at a time: a listing by another command may fall between any two."""
        kind = step[0]
        if kind in ("backup", "forget", "killed forget", "tag"):  # a write lists the snapshots first
            self.state = L.observe(self.state, self.present, now=self.now, digests=self.listed())
            yield
        if kind == "backup":
            written = {}
            for _ in range(step[1]):
                self.n += 1
                written[f"s{self.n:03d}"] = self._tick()
                self.objects[f"s{self.n:03d}"] = f"v{self.n:03d}"
            self.present.update(written)
            yield
            new = {sid: self.objects[sid] for sid in written}
            self.seen.update(new.items())
            self.state = L.wrote(self.state, written, new, self.now)
        elif kind == "tag":
            ids = self._pick(step[1])
            old = {sid: self.objects[sid] for sid in ids}
            new = self._rewrite(ids)
            self.seen.update(new.items())
            yield
            self.state = L.wrote(self.state, {}, now=self._tick(), replaced={sid: [(old[sid], new[sid])] for sid in ids})
        elif kind == "other client tags":
            self._rewrite(self._pick(step[1]))
        elif kind == "forget":
            ids = self._pick(step[1])
            self.state = L.forgetting(self.state, ids, self._tick())
            yield
            self._delete(ids)
            yield
            self.state = L.forgot(self.state, ids, self.present, self._tick())
        elif kind == "killed forget":
            ids = self._pick(step[1])
            self.state = L.forgetting(self.state, ids, self._tick())
            yield
            if step[2]:  # killed after deleting, before the ledger heard of it
                self._delete(ids)
        elif kind == "other client":  # its retention never removes the newest snapshot
            newest = max(self.present.items(), key=lambda kv: (kv[1], kv[0]))[0] if self.present else None
            gone = [i for i in self._pick(step[1]) if i != newest]
            for sid in gone:
                del self.present[sid]
            yield
            if step[2] and self.present:
                self.n += 1
                self.present[f"s{self.n:03d}"] = self._tick()
                self.objects[f"s{self.n:03d}"] = f"v{self.n:03d}"
        else:
            self.state = L.observe(self.state, self.present, now=self.now, digests=self.listed())

    def _delete(self, ids: list[str]) -> None:
        for sid in ids:
            self.forgotten[sid] = self.present.pop(sid)


def _honest(steps: list[tuple]) -> Model:
    m = Model()
    _honest_from(m, steps)
    m.state = L.observe(m.state, m.present, now=m.now, digests=m.listed())
    assert L.findings(m.state, m.present, digests=m.digests()) == []
    return m


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=25))
def test_an_honest_history_is_never_suspicious(steps):
    _honest(steps)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=25), st.data())
def test_any_forgotten_snapshot_put_back_is_replayed(steps, data):
    m = _honest(steps + [("backup", 1), ("forget", {0})])
    replay = data.draw(st.sets(st.sampled_from(sorted(m.forgotten)), min_size=1))
    present = {**m.present, **{sid: m.forgotten[sid] for sid in replay}}
    found = L.findings(m.state, present)
    assert {f.snapshot_id for f in found if f.kind == REPLAYED} == replay
    assert L.blocking(found, forgetting=()) == found
    assert L.blocking(found, forgetting=replay) == []  # forgetting them again is allowed
    assert L.findings(L.accept(m.state, present), present) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=25), st.data())
def test_any_version_this_client_saw_replaced_put_back_is_found(steps, data):
    """Each object is sealed afresh (a new nonce), so no honest rewrite brings a version back: one this
    client listed or wrote, and saw replaced since, is an older copy put back (a tag undone, say)."""
    m = _honest(steps + [("backup", 1), ("tag", {0}), ("list",)])
    old = sorted({(sid, d) for sid, ds in m.replaced.items() for d in ds if sid in m.present and (sid, d) in m.seen})
    assume(old)
    replay = dict(data.draw(st.lists(st.sampled_from(old), min_size=1, max_size=4)))
    listed = {**m.digests(), **replay}
    found = L.findings(m.state, m.present, digests=listed)
    assert [(f.kind, f.snapshot_id) for f in found] == [(OLD_VERSION, sid) for sid in sorted(replay)]
    assert L.blocking(found) == found
    assert L.findings(L.observe(m.state, m.present, now=m.now, digests=listed), m.present, digests=listed) == found
    accepted = L.accept(m.state, m.present, listed)
    assert L.findings(accepted, m.present, digests=listed) == []
    assert L.from_json(L.to_json(m.state, "r1"), "r1") == m.state


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=25), st.integers(1, 5), st.data())
def test_deleting_the_newest_snapshots_is_a_rollback(steps, k, data):
    m = _honest(steps + [("backup", k)])
    by_age = sorted(m.present.items(), key=lambda kv: kv[1])
    cut = data.draw(st.integers(1, len(by_age)))
    kept = dict(by_age[:-cut])
    found = L.findings(m.state, kept)
    newest = by_age[-1][0]
    assert [(f.kind, f.snapshot_id) for f in found] == [(ROLLED_BACK, newest)]
    assert L.blocking(found, forgetting=[newest]) == found
    # the evidence stays while the repository is only listed, and goes when it is accepted
    assert L.findings(L.observe(m.state, kept), kept) == found
    accepted = L.accept(m.state, kept)
    assert L.findings(accepted, kept) == [] and L.findings(L.observe(accepted, kept), kept) == []


def _listed_meanwhile(m: Model, during: list[tuple], at: int) -> tuple[LedgerState, dict[str, datetime]]:
    """Another command reads the ledger, then lists the snapshots after ``at`` changes of ``during`` (steps
    of this client's other commands, run meanwhile); every step then ends.  Returns (before, listing)."""
    before, listing, made = m.state, None, 0
    for step in during:
        for _ in m.phases(step):
            made += 1
            if made == at:
                listing = dict(m.present), m.digests()
    return before, *((dict(m.present), m.digests()) if listing is None else listing)


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=15), st.lists(op, max_size=5), st.integers(0, 12), st.lists(op, max_size=10))
def test_a_listing_made_while_other_commands_of_this_client_run_is_never_suspicious(history, during, at, later):
    """Backups and forgets of this client's other commands (threads, cron jobs) store snapshots, delete them
    and note both in the ledger while a listing is made: judged by the ledger as it was when the listing
    began, nothing is suspicious, and what observing it leaves behind stays clean."""
    m = _honest(history)
    before, listing, digests = _listed_meanwhile(m, during, at)
    assert L.findings(m.state, listing, before, digests) == [], (before, m.state, listing)
    m.state = L.observe(m.state, listing, before, now=m.now, digests=digests)
    assert L.findings(m.state, m.present, digests=m.digests()) == []
    _honest_from(m, later)


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=12), st.lists(op, min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=3), st.lists(op, max_size=8))
def test_listings_that_overlap_this_clients_other_commands_and_each_other_are_never_suspicious(history, during,
                                                                                             listers, later):
    """Several commands of this client list (each reads the ledger, lists, and later judges and notes what
    it listed) while its other commands back up and forget, the newest snapshot too, some killed half-way."""
    m = _honest(history)
    starts = {p for p, _ in listers}
    taken: dict[int, tuple[LedgerState, dict[str, datetime], dict[str, str]]] = {}
    made = 0

    def at(phase: int) -> None:
        for k, (p, q) in enumerate(listers):
            if p == phase:
                taken[k] = (m.state, dict(m.present), m.digests())
            if max(p, q) == phase and k in taken:
                before, listing, digests = taken.pop(k)
                assert L.findings(m.state, listing, before, digests) == [], (k, before, m.state, listing)
                m.state = L.observe(m.state, listing, before, now=m.now, digests=digests)

    at(0)
    for step in during:
        for _ in m.phases(step):
            made += 1
            at(made)
    for k in sorted(taken):  # those that began or end past the last change
        before, listing, digests = taken.pop(k)
        assert L.findings(m.state, listing, before, digests) == []
        m.state = L.observe(m.state, listing, before, now=m.now, digests=digests)
    assert starts and L.findings(m.state, m.present, digests=m.digests()) == []
    _honest_from(m, later)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=15), st.integers(1, 4), st.data(), st.lists(forgets, max_size=4), st.integers(0, 12))
def test_a_rollback_is_found_while_this_client_forgets_meanwhile(history, k, data, during, at):
    """The newest snapshots deleted behind the client's back, then listed while its other commands forget
    older ones: the mark, which no honest step lowers while it is missing, is a rollback."""
    m = _honest(history + [("backup", k)])
    by_age = sorted(m.present.items(), key=lambda kv: kv[1])
    cut = data.draw(st.integers(1, len(by_age)))
    newest = by_age[-1][0]
    for sid, _ in by_age[-cut:]:
        del m.present[sid]
    before, listing, _ = _listed_meanwhile(m, during, at)
    assert (ROLLED_BACK, newest) in [(f.kind, f.snapshot_id) for f in L.findings(m.state, listing, before)]
    assert L.observe(m.state, listing, before).newest == before.newest  # the evidence stays


def test_a_mark_that_moved_during_the_listing_leaves_the_rollback_to_the_next_listing():
    """This client stored a newer snapshot while the listing was made: the old newest may have gone as
    honestly as it may once it is not the newest (another client's retention); the next listing judges."""
    x, y = Mark(T0, "x"), Mark(T0 + timedelta(1), "y")
    before = LedgerState(newest=x)
    after = L.wrote(before, {"y": y.time})
    assert L.findings(after, {}, before) == []
    assert L.observe(after, {}, before) == after
    assert [(f.kind, f.snapshot_id) for f in L.findings(after, {})] == [(ROLLED_BACK, "y")]


def _honest_from(m: Model, steps: list[tuple]) -> None:
    for s in steps:
        m.run(s)
        assert L.findings(m.state, m.present, digests=m.digests()) == [], (s, m.state, m.present)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=25))
def test_observe_is_idempotent_and_the_stored_form_round_trips(steps):
    m = Model()
    for s in steps:
        m.run(s)
    once = L.observe(m.state, m.present)
    assert L.observe(once, m.present) == once
    for state in (m.state, once):
        assert L.from_json(L.to_json(state, "r1"), "r1") == state


def test_a_snapshot_written_back_by_this_client_is_no_longer_forgotten():
    state = L.forgot(LedgerState(), ["a"], {}, T0)
    assert [f.kind for f in L.findings(state, {"a": T0})] == [REPLAYED]
    state = L.wrote(state, {"a": T0})
    assert L.findings(state, {"a": T0}) == [] and "a" not in state.forgotten


def test_a_present_snapshot_as_new_as_the_missing_one_is_no_rollback():
    state = L.wrote(LedgerState(), {"b": T0})
    assert L.findings(state, {"a": T0}) == []
    assert L.findings(state, {"a": T0 - timedelta(microseconds=1)})[0].kind == ROLLED_BACK
    # ... unless that present snapshot is itself a replay
    state = L.forgot(L.wrote(LedgerState(), {"a": T0 + timedelta(1), "b": T0}), ["a"], {"b": T0}, T0)
    assert [f.kind for f in L.findings(state, {"a": T0 + timedelta(1)})] == [ROLLED_BACK, REPLAYED]  # the rollback told first


def test_forgetting_the_newest_lowers_the_mark_so_a_later_rollback_still_shows():
    state = L.wrote(LedgerState(), {"a": T0, "b": T0 + timedelta(1), "c": T0 + timedelta(2)})
    state = L.forgot(state, ["c"], {"a": T0, "b": T0 + timedelta(1)}, T0)
    assert state.newest == Mark(T0 + timedelta(1), "b")
    assert [(f.kind, f.snapshot_id) for f in L.findings(state, {"a": T0})] == [(ROLLED_BACK, "b")]
    assert L.findings(state, {"a": T0, "b": L.NEWER_FORMAT}) == []  # rewritten by a newer chunkvault: no damage


def test_forgotten_ids_are_capped_to_the_most_recent(monkeypatch):
    monkeypatch.setattr(L, "MAX_FORGOTTEN", 3)
    state = LedgerState()
    for i in range(5):
        state = L.forgot(state, [f"s{i}"], {}, T0 + timedelta(minutes=i))
    assert sorted(state.forgotten) == ["s2", "s3", "s4"]


@pytest.mark.parametrize("doc", [None, [], {"version": 2}, {"version": 1, "repository": "other"},
                                 {"version": 1, "repository": "r1", "newest": "x"},
                                 {"version": 1, "repository": "r1", "forgotten": {"a": "yesterday"}},
                                 {"version": 1, "repository": "r1", "forgotten": {"a": "2026-01-01T00:00:00"}},
                                 {"version": 1, "repository": "r1", "pending": []}])
def test_malformed_documents_are_refused_with_a_reason(doc):
    with pytest.raises(ValueError):
        L.from_json(doc, "r1")


def test_a_newest_snapshot_that_does_not_load_keeps_the_mark_so_deleting_it_shows():
    """A listing gives an unreadable snapshot no time (``UNDATED``): damaging the newest first, then
    deleting it, must not roll the repository back unseen."""
    state = L.wrote(LedgerState(), {"a": T0, "b": T0 + timedelta(1)})
    state = L.observe(state, {"a": T0, "b": L.UNDATED})
    assert state.newest == Mark(T0 + timedelta(1), "b")
    assert [(f.kind, f.snapshot_id) for f in L.findings(state, {"a": T0, "b": L.UNDATED})] == [(UNREADABLE, "b")]
    assert [(f.kind, f.snapshot_id) for f in L.findings(state, {"a": T0})] == [(ROLLED_BACK, "b")]


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=25), st.integers(1, 5), st.data())
def test_damaging_the_newest_snapshot_is_found_as_deleting_it_is(steps, k, data):
    """Overwritten with garbage, the newest snapshot went unnoticed (present, with no time): `latest` and
    every backup's parent became an older one.  Damage to an older one is check's to report, no more."""
    m = _honest(steps + [("backup", k)])
    by_age = sorted(m.present.items(), key=lambda kv: kv[1])
    cut = data.draw(st.integers(1, len(by_age)))
    damaged = {sid: (L.UNDATED if i >= len(by_age) - cut else t) for i, (sid, t) in enumerate(by_age)}
    found = L.findings(m.state, damaged)
    newest = by_age[-1][0]
    assert [(f.kind, f.snapshot_id) for f in found] == [(UNREADABLE, newest)]
    assert L.blocking(found) == found and L.blocking(found, forgetting=[newest]) == []
    assert L.findings(L.observe(m.state, damaged), damaged) == found  # the mark stays while it is listed
    after = {sid: t for sid, t in damaged.items() if sid != newest}
    forgotten = L.forgot(L.forgetting(m.state, [newest], T0), [newest], after, T0)
    assert L.findings(forgotten, after) == []
    accepted = L.accept(m.state, damaged)
    assert L.findings(accepted, damaged) == [] and L.findings(L.observe(accepted, damaged), damaged) == []
    if len(by_age) > 1:
        older = {**m.present, by_age[0][0]: L.UNDATED}
        assert L.findings(m.state, older) == []


@pytest.mark.parametrize("order", ["as stored", "reversed"])
def test_rewrites_of_one_snapshot_noted_in_any_order_leave_the_one_stored_last_current(order):
    """Two commands rewrite one snapshot, one after the other under the lock (v1 -> v2 -> v3), and note it
    after the lock is gone, in either order: v3 must not be taken for an old version."""
    state = L.observe(LedgerState(), {"s": T0}, now=T0, digests={"s": "v1"})
    notes = [("v1", "v2"), ("v2", "v3")]
    for rewrite in notes if order == "as stored" else notes[::-1]:
        state = L.wrote(state, {}, now=T0, replaced={"s": [rewrite]})
    for _ in range(2):
        assert L.findings(state, {"s": T0}, digests={"s": "v3"}) == []
        state = L.observe(state, {"s": T0}, now=T0, digests={"s": "v3"})
    for old in ("v1", "v2"):
        assert [f.kind for f in L.findings(state, {"s": T0}, digests={"s": old})] == [OLD_VERSION]
