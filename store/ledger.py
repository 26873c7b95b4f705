"""A client's memory of a repository's snapshot set, and what contradicts it.

Each snapshot object is authenticated, but nothing signs the *set* of
snapshots: whoever can write the storage, without the key, can put back a
snapshot that was forgotten (a replay) or delete the newest ones (a
rollback).  A client that remembers which snapshots it forgot and the newest
snapshot it has seen (the high-water mark) notices both, as borg's
client-side manifest timestamp does.  Nor does anything sign which version of
a rewritten snapshot (a tag, a rebase) is current: a client that remembers the
digests of the versions it saw replaced notices an older one put back.

Pure: no I/O and no clock.  Callers pass the present snapshots as
``{id: time}`` (and the digests of their objects) and the current time; every
function returns a new state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Collection, Mapping, Sequence

REPLAYED = "replayed"
ROLLED_BACK = "rolled back"
UNREADABLE = "unreadable"
OLD_VERSION = "old version"
#: The time a listing gives a snapshot object that does not decode: present, but never as new as another.
UNDATED = datetime.min.replace(tzinfo=timezone.utc)
#: So, for one a newer chunkvault wrote: not damage, so the newest snapshot seen, rewritten so, is no finding.
NEWER_FORMAT = UNDATED + timedelta(microseconds=1)
LEDGER_VERSION = 1
# Forgotten ids are remembered up to this many (the most recently forgotten): two years of
# hourly snapshots, a file of about 2 MB.
MAX_FORGOTTEN = 20_000
# A forget noted as begun whose snapshot is still listed is taken for one killed before it deleted only
# this long after it began: a forget rebasing a long chain over a slow link may still be under way.
PENDING_KEPT = timedelta(hours=24)
# Versions of one snapshot remembered as replaced: the most recently replaced (a snapshot tagged hourly
# for a year would otherwise grow the file without end).
MAX_SUPERSEDED = 64


@dataclass(frozen=True, order=True)
class Mark:
    """A snapshot as the high-water mark remembers it; ordered by (time, id) like snapshot lists."""

    time: datetime
    id: str


@dataclass(frozen=True)
class LedgerState:
    """``forgotten``: id -> when this client forgot it; ``pending``: forgets begun but not seen to
    finish (recorded before the deletion, so a forget killed half-way is not taken for a rollback).
    ``versions``: id -> digest of the stored object (its sealed bytes) last seen for each present snapshot;
    ``superseded``: id -> {digest: when this client saw it replaced} of versions rewritten since (a tag,
    a rebase, a rewrite).  Each seal draws a fresh nonce, so no honest rewrite brings a digest back."""

    forgotten: Mapping[str, datetime] = field(default_factory=dict)
    pending: Mapping[str, datetime] = field(default_factory=dict)
    newest: Mark | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    superseded: Mapping[str, Mapping[str, datetime]] = field(default_factory=dict)


@dataclass(frozen=True, order=True)
class Finding:
    """One contradiction between the ledger and the repository; ``when`` is the forget's time
    (replayed) or the missing snapshot's time (rolled back)."""

    kind: str
    snapshot_id: str
    when: datetime

    def message(self) -> str:
        at = self.when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        if self.kind == REPLAYED:
            return f"snapshot {self.snapshot_id} was forgotten by this client at {at} and is present again (replayed)"
        if self.kind == OLD_VERSION:
            return (f"snapshot {self.snapshot_id} is stored as it was before a change this client saw at {at} (a "
                    f"tag, a rebase or a rewrite since, undone: an older copy of its object put back)")
        if self.kind == UNREADABLE:
            return (f"snapshot {self.snapshot_id} ({at}), the newest this client has seen, does not open (damaged, "
                    f"or replaced by whoever holds the storage) and no readable snapshot is as new: `latest` would "
                    f"be an older one, and a backup's parent too")
        return (f"snapshot {self.snapshot_id} ({at}), the newest this client has seen, is gone and no snapshot "
                f"as new is present (rolled back, unless another client forgot the newest snapshot by hand)")


def findings(state: LedgerState, present: Mapping[str, datetime], before: LedgerState | None = None,
             digests: Mapping[str, str] | None = None) -> list[Finding]:
    """Replayed: a snapshot this client forgot is present.  Old version: a snapshot's object (``digests``:
    id -> digest of those listed) is one this client saw replaced: the storage's holder put an older copy
    back, which authenticates as well as the newer (tags removed, so a retention rule no longer keeps it).
    Rolled back: the high-water snapshot is gone, this client did not forget it, and no other present
    snapshot is at least as new.
    Unreadable: so, but it is listed and does not decode (``UNDATED``): overwritten with garbage, it hid
    the newest snapshot as well as deleting it, and went unnoticed.

    ``before``: the state as read before ``present`` was listed, ``state`` being read after it.  Other
    commands of this client may have stored snapshots, or forgotten some, while it was listed: the
    listing is held to what was known when it began, and a forget noted by its end explains a
    snapshot missing from it.  A mark that moved meanwhile (this client stored, saw or forgot newer
    snapshots) leaves the rollback to the next listing: the old mark may have gone as honestly as
    when it is no longer the newest, and the new one may be missing only because it came late."""
    if before is not None:
        ended = {sid: t for sid, t in state.forgotten.items() if sid not in before.forgotten}
        newest = before.newest if state.newest == before.newest else None
        state = LedgerState(before.forgotten, {**before.pending, **state.pending, **ended}, newest,
                            before.versions, before.superseded)
    out = [Finding(REPLAYED, sid, state.forgotten[sid]) for sid in present if sid in state.forgotten]
    for sid, digest in (digests or {}).items():
        replaced = state.superseded.get(sid, {}).get(digest)
        if replaced is not None and sid in present:
            out.append(Finding(OLD_VERSION, sid, replaced))
    hw = state.newest
    undated = hw is not None and present.get(hw.id) == UNDATED
    if hw is not None and (undated or hw.id not in present) and hw.id not in state.forgotten \
            and hw.id not in state.pending:
        honest = (t for sid, t in present.items() if sid not in state.forgotten)
        if not any(t >= hw.time for t in honest):
            out.append(Finding(UNREADABLE if undated else ROLLED_BACK, hw.id, hw.time))
    return sorted(out, key=_weight)


def blocking(found: Collection[Finding], forgetting: Collection[str] = ()) -> list[Finding]:
    """The findings that forbid a write.  Forgetting a replayed snapshot again, or an unreadable one, is
    the natural fix, so it is allowed when the write is a forget of every such snapshot and nothing was
    rolled back."""
    if all(f.kind != ROLLED_BACK and f.snapshot_id in forgetting for f in found):
        return []
    return sorted(found, key=_weight)


#: Findings in the order they are told: the first is the one a warning or a refusal names.
_FIRST = {ROLLED_BACK: 0, UNREADABLE: 1, REPLAYED: 2, OLD_VERSION: 3}


def _weight(f: Finding) -> tuple[int, Finding]:
    return _FIRST[f.kind], f


def observe(state: LedgerState, present: Mapping[str, datetime], before: LedgerState | None = None,
            now: datetime | None = None, digests: Mapping[str, str] | None = None) -> LedgerState:
    """After a listing: pending forgets resolve (gone: confirmed; present ``PENDING_KEPT`` after the forget
    began, or at once without ``now``: it never happened, killed before it deleted) and the high-water mark
    rises to the newest present snapshot not forgotten.  A forget still under way may delete after the
    listing: taken for one that never happened, the newest snapshot it then deletes would be a rollback.
    An unresolved rollback keeps its mark, so the evidence stays until it is accepted; and the
    mark never falls while its snapshot is present: one that does not load is listed with the
    earliest time, and deleting it afterwards must still show as a rollback.

    ``before`` (as for ``findings``): a forget begun while the listing was made stays pending (the
    listing may predate its deletions), and where the ledger changed at all meanwhile, the mark stays
    as it is (what the listing shows may be gone since, honestly: the next listing raises it), and so do
    the versions (``digests``): a snapshot this client rewrote meanwhile may be listed as it was before.
    A version found old stays so (the evidence stays until it is accepted)."""
    known = state if before is None else before
    quiet = state == known
    forgotten = dict(state.forgotten)
    pending = {}
    for sid, when in state.pending.items():
        if sid not in known.pending or (sid in present and now is not None and now - when < PENDING_KEPT):
            pending[sid] = when
        elif sid not in present:
            forgotten[sid] = when
    state = replace(state, forgotten=_capped(forgotten), pending=pending)
    if not quiet:
        return state
    if digests is not None:
        state = _seen_versions(state, present, digests, now)
    if any(f.kind == ROLLED_BACK for f in findings(state, present, before)):
        return state
    newest = _newest(present, state.forgotten)
    hw = state.newest
    if hw is not None and hw.id in present and hw.id not in state.forgotten and (newest is None or hw > newest):
        newest = hw
    return replace(state, newest=newest)


def forgetting(state: LedgerState, ids: Collection[str], now: datetime) -> LedgerState:
    """Before deleting: the snapshots about to be forgotten, as pending."""
    return replace(state, pending={**state.pending, **{sid: now for sid in ids}})


def forgot(state: LedgerState, ids: Collection[str], present: Mapping[str, datetime], now: datetime) -> LedgerState:
    """After deleting ``ids``; ``present`` is what remains."""
    pending = {sid: when for sid, when in state.pending.items() if sid not in ids}
    forgotten = {**state.forgotten, **{sid: now for sid in ids}}
    return observe(replace(state, forgotten=forgotten, pending=pending), present, now=now)


def wrote(state: LedgerState, written: Mapping[str, datetime], digests: Mapping[str, str] | None = None,
          now: datetime | None = None, replaced: Mapping[str, Sequence[tuple[str, str]]] | None = None
          ) -> LedgerState:
    """This client stored these snapshots (``digests``: of their objects): none of them is a replay, and the
    newest may rise.  ``replaced``: id -> (old, new) digests of each rewrite it made (a tag, a rebase), in
    order: the old versions are old ones from now on, and the new one current where the old one was.  Two
    rewrites of one snapshot noted in another order than they were stored must not leave the one stored
    last taken for an old one: a new version is never made old by a rewrite it did not replace."""
    forgotten = {sid: w for sid, w in state.forgotten.items() if sid not in written}
    pending = {sid: w for sid, w in state.pending.items() if sid not in written}
    marks = [Mark(t, sid) for sid, t in written.items()]
    if state.newest is not None:
        marks.append(state.newest)
    versions, superseded = _replaced(state, digests or {}, now)
    for sid, rewrites in (replaced or {}).items():
        for old, new in rewrites:
            superseded[sid] = _latest({**superseded.get(sid, {}), old: now or UNDATED})
            if versions.get(sid) == old:
                versions[sid] = new
    return LedgerState(forgotten, pending, max(marks) if marks else None, versions, superseded)


def _seen_versions(state: LedgerState, present: Mapping[str, datetime], digests: Mapping[str, str],
                   now: datetime | None) -> LedgerState:
    """A listing's versions noted: each changed one's old digest is superseded, an old one found again is
    left as it is (evidence), and what is no longer listed is dropped."""
    fresh = {sid: d for sid, d in digests.items() if d not in state.superseded.get(sid, {})}
    versions, superseded = _replaced(state, fresh, now)
    return replace(state, versions={sid: d for sid, d in versions.items() if sid in present},
                   superseded={sid: old for sid, old in superseded.items() if sid in present})


def _replaced(state: LedgerState, digests: Mapping[str, str], now: datetime | None
              ) -> tuple[dict[str, str], dict[str, Mapping[str, datetime]]]:
    """(versions, superseded) once the objects ``digests`` names are current: each one it replaces is
    superseded (at ``now``), keeping the ``MAX_SUPERSEDED`` latest per snapshot."""
    versions = dict(state.versions)
    superseded = dict(state.superseded)
    for sid, digest in digests.items():
        old = versions.get(sid)
        if old is not None and old != digest:
            superseded[sid] = _latest({**superseded.get(sid, {}), old: now or UNDATED})
        versions[sid] = digest
    return versions, superseded


def _latest(replaced: Mapping[str, datetime]) -> dict[str, datetime]:
    """The ``MAX_SUPERSEDED`` versions of one snapshot replaced last."""
    return dict(sorted(replaced.items(), key=lambda kv: (kv[1], kv[0]))[-MAX_SUPERSEDED:])


def accept(state: LedgerState, present: Mapping[str, datetime], digests: Mapping[str, str] | None = None
           ) -> LedgerState:
    """The user accepts the repository as it is: present snapshots are no longer forgotten, the
    high-water mark is the newest present, and each listed version (``digests``) is current; snapshots
    still absent stay forgotten."""
    forgotten = {**state.forgotten, **state.pending}
    forgotten = {sid: when for sid, when in forgotten.items() if sid not in present}
    versions = {sid: d for sid, d in {**state.versions, **(digests or {})}.items() if sid in present}
    superseded = {sid: {d: t for d, t in old.items() if d != versions.get(sid)}
                  for sid, old in state.superseded.items() if sid in present}
    return LedgerState(_capped(forgotten), {}, _newest(present, forgotten), versions,
                       {sid: old for sid, old in superseded.items() if old})


def _newest(present: Mapping[str, datetime], forgotten: Mapping[str, datetime]) -> Mark | None:
    marks = [Mark(t, sid) for sid, t in present.items() if sid not in forgotten]
    return max(marks) if marks else None


def _capped(forgotten: dict[str, datetime]) -> dict[str, datetime]:
    if len(forgotten) <= MAX_FORGOTTEN:
        return forgotten
    keep = sorted(forgotten.items(), key=lambda kv: (kv[1], kv[0]))[-MAX_FORGOTTEN:]
    return dict(keep)


# --- the stored form --------------------------------------------------------------------------


def to_json(state: LedgerState, repo_id: str) -> dict[str, Any]:
    return {"version": LEDGER_VERSION, "repository": repo_id,
            "newest": None if state.newest is None else {"id": state.newest.id, "time": state.newest.time.isoformat()},
            "forgotten": {sid: t.isoformat() for sid, t in sorted(state.forgotten.items())},
            "pending": {sid: t.isoformat() for sid, t in sorted(state.pending.items())},
            "versions": dict(sorted(state.versions.items())),
            "superseded": {sid: {d: t.isoformat() for d, t in sorted(old.items())}
                           for sid, old in sorted(state.superseded.items())}}


def from_json(doc: Any, repo_id: str) -> LedgerState:
    """The state a ledger document holds; ValueError names what is wrong with it."""
    if not isinstance(doc, dict) or doc.get("version") != LEDGER_VERSION:
        raise ValueError("not a version 1 ledger")
    if doc.get("repository") != repo_id:
        raise ValueError("it belongs to another repository")
    newest = doc.get("newest")
    mark = None
    if newest is not None:
        if not isinstance(newest, dict):
            raise ValueError("malformed high-water mark")
        mark = Mark(_time(newest.get("time")), _id(newest.get("id")))
    versions = doc.get("versions", {})  # absent from ledgers written before versions were kept
    if not isinstance(versions, dict) or not all(isinstance(v, str) and v for v in versions.values()):
        raise ValueError("malformed versions")
    superseded = doc.get("superseded", {})
    if not isinstance(superseded, dict):
        raise ValueError("malformed superseded versions")
    return LedgerState(_times(doc.get("forgotten", {})), _times(doc.get("pending", {})), mark,
                       {_id(sid): d for sid, d in versions.items()},
                       {_id(sid): _times(old) for sid, old in superseded.items()})


def _id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("malformed snapshot id")
    return value


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("malformed time")
    t = datetime.fromisoformat(value)  # ValueError on a bad time
    if t.tzinfo is None:
        raise ValueError("time without a zone")
    return t


def _times(value: Any) -> dict[str, datetime]:
    if not isinstance(value, dict):
        raise ValueError("malformed snapshot list")
    return {_id(k): _time(v) for k, v in value.items()}
