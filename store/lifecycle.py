"""Forgetting snapshots safely: retention decisions, then rebases, then deletions.

Order matters for crash safety: every kept differential whose parent goes is
first rewritten (same id) against its nearest kept ancestor, with the removed
ancestors' changes merged in; only then are snapshots deleted.  Killed at any
point, every kept snapshot still restores exactly as before.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone, tzinfo
from functools import reduce
from typing import Callable, Iterable, Iterator, NamedTuple

from chunkvault.errors import CorruptObject

from . import chain
from .chronology import HEALS
from .manifest import Record
from .manifest_io import store_manifest
from .owners import OWNERS_KEY, chain_owners
from .repository import BlobWriter, Repo
from .retention import Decision, RebaseStep, RetentionPolicy, rebase_plan, select
from .snapshot import KIND_DIFF, KIND_FULL, Snapshot


class RetentionView(NamedTuple):
    """A snapshot as retention selection sees it."""

    id: str
    time: datetime
    kind: str
    parent: str | None
    host: str
    paths: tuple[str, ...]
    tags: tuple[str, ...]
    follows: str | None = None  # the snapshot it was made on, where its parent no longer says (aggregate)
    former_chain: tuple[str, ...] = ()  # and that one's chain back to its full (``chronology.built_on``)
    heals: str | None = None  # an import's: the copy of the same snapshot it brought back whole
    taken_as: str | None = None  # the kind it was taken as, where that is not ``kind`` (see ``view``)


def view(s: Snapshot) -> RetentionView:
    """A full that a forget's rebase made of a differential (``rebased``, not ``aggregated`` on purpose)
    was taken as a differential: retention's tiers keep it for a differential's term."""
    follows, former, heals = s.stats.get("follows"), s.stats.get("former_chain"), s.stats.get(HEALS)
    promoted = s.kind == KIND_FULL and s.stats.get("rebased") is True and not s.stats.get("aggregated")
    return RetentionView(s.id, s.datetime, s.kind, s.parent, s.host, tuple(s.paths), tuple(s.tags),
                         follows if isinstance(follows, str) else None,
                         tuple(f for f in former if isinstance(f, str)) if isinstance(former, list) else (),
                         heals if isinstance(heals, str) else None, KIND_DIFF if promoted else None)


@dataclass
class ForgetPlan:
    decisions: list[Decision]
    remove: list[str]
    rebases: list[RebaseStep] = field(default_factory=list)
    listed: dict[str, Snapshot] = field(default_factory=dict)  # the snapshots decided on, by id: their times


@dataclass
class Aggregated:
    """What ``aggregate`` did: the snapshot, now a full, and, with ``retire``, the former chain's
    snapshots it forgot and the differentials that still needed part of that chain, rebased; ``warnings``
    name the tagged snapshots it forgot (a tag such as ``pinned`` keeps a snapshot from forget's policy, not
    from a retire that names the chain)."""

    snapshot: Snapshot
    retired: list[str] = field(default_factory=list)
    rebases: list[RebaseStep] = field(default_factory=list)
    made_full: bool = True  # False: it was a full already (this call at most retired what was left of its chain)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False  # planned only: ``snapshot`` as it would be, nothing written or forgotten


NOT_SELECTED = "not selected by the host, tag and path filters"


def plan_forget(snapshots: list[Snapshot], *, policy: RetentionPolicy | None = None,
                ids: Iterable[str] = (), now: datetime | None = None,
                selected: set[str] | None = None, allow_remove_all: bool = False,
                tz: tzinfo | None = timezone.utc) -> ForgetPlan:
    """What forget would do: by policy (applied to the ``selected`` snapshots only, when given; the
    others are kept; one that keeps nothing of a group needs ``allow_remove_all``; its days those of
    ``tz``, None for local time), or the explicit ``ids`` (already resolved).  Rebases consider every
    snapshot."""
    views = [view(s) for s in snapshots]
    if policy is not None:
        pool = [v for v in views if selected is None or v.id in selected]
        others = [v for v in views if selected is not None and v.id not in selected]
        decided = {d.snapshot_id: d for d in select(pool, policy, now or datetime.now(timezone.utc),
                                                    allow_remove_all=allow_remove_all, tz=tz, outside=others)}
        decisions = [decided.get(v.id) or Decision(v.id, True, (NOT_SELECTED,)) for v in views]
    else:
        chosen = set(ids)
        decisions = [Decision(v.id, v.id not in chosen, ("named on the command line",) if v.id in chosen else ())
                     for v in views]
    remove = [d.snapshot_id for d in decisions if not d.keep]
    return ForgetPlan(decisions, remove, rebase_plan(views, remove), {s.id: s for s in snapshots})


def _composed(repo: Repo, by_id: dict[str, Snapshot], step: RebaseStep) -> tuple[str, Iterator[Record]]:
    diff = by_id[step.diff_id]
    merged = [repo.manifest_records(by_id[i], diff) for i in step.merge_ids]
    own = repo.manifest_records(diff)
    if step.new_parent is None:
        # The chain's full goes too: the differential absorbs it and becomes a full.
        return KIND_FULL, chain.resolve(merged[0], merged[1:] + [own])
    return KIND_DIFF, reduce(chain.compose, merged + [own])


def rebase(repo: Repo, snapshots: list[Snapshot], step: RebaseStep,
           ensure_held: Callable[[], None] = lambda: None, writer: BlobWriter | None = None) -> Snapshot:
    """Rewrite one kept differential against its new parent; returns the rewritten snapshot.  ``ensure_held``:
    before its manifest's index and before it is rewritten (a forget that took this lock for stale may
    have removed it meanwhile, a prune the packs of its new manifest).  ``writer``: the one a forget stores
    every rebased manifest with (``store_manifest``)."""
    by_id = {s.id: s for s in snapshots}
    snap = by_id[step.diff_id]
    kind, records = _composed(repo, by_id, step)
    ids, mw = store_manifest(repo, records, ensure_held, writer)
    snap.kind = kind
    snap.parent = step.new_parent
    snap.manifest = [i.hex() for i in ids]
    snap.manifest_starts = mw.starts
    snap.version = mw.version
    # Its manifest is the new one; the data the merged differentials added is its chain's now, which
    # ``--type auto`` weighs against the full (``absorbed_stored_bytes``).
    absorbed = sum(int(by_id[i].stats.get("added_stored_bytes", 0)) + int(by_id[i].stats.get("absorbed_stored_bytes", 0))
                   for i in step.merge_ids if by_id[i].kind != KIND_FULL)
    snap.stats = {**snap.stats, "manifest_records": mw.records, "rebased": True, "manifest_bytes": _stored(repo, ids),
                  "absorbed_stored_bytes": int(snap.stats.get("absorbed_stored_bytes", 0)) + absorbed,
                  OWNERS_KEY: chain_owners([by_id[i].stats for i in step.merge_ids] + [snap.stats])}
    ensure_held()
    return repo.save_snapshot(snap, replace=True)


def _stored(repo: Repo, blob_ids: list[bytes]) -> int:
    """What a manifest takes in the repository, blobs it shares with another manifest included."""
    return sum(loc.length for b in blob_ids if (loc := repo.locate(b)) is not None)


def apply_forget(repo: Repo, snapshots: list[Snapshot], plan: ForgetPlan,
                 ensure_held: Callable[[], None] = lambda: None) -> list[Snapshot]:
    """Rebase, then delete. Returns the rebased snapshots.  The caller holds the exclusive lock and made
    ``plan`` under it, from ``snapshots`` read under it; ``ensure_held`` raises when that lock may have gone
    stale, before each rewrite and deletion (a backup may have started on a snapshot about to go)."""
    if plan.remove:
        repo.require_deletes(f"snapshots/{bytes(32).hex()}", "forget")
    rebased = []
    # one writer for them all: each of its own listed every pack (``store_manifest``)
    with repo.writer() if plan.rebases else contextlib.nullcontext() as writer:
        if writer is not None:
            writer.guard = ensure_held
        for step in plan.rebases:
            try:
                rebased.append(rebase(repo, snapshots, step, ensure_held, writer))
            except CorruptObject as exc:
                raise exc.explained(f"; so {step.diff_id[:8]} cannot be rebased: forget it too (`repair "
                                    "snapshots` lists every snapshot a damaged manifest takes down)") from None
    for sid in chain.children_first(plan.remove, {s.id: s.parent for s in snapshots}):
        ensure_held()
        repo.delete_snapshot(sid)
    return rebased


def replaced_chain(repo: Repo, snap: Snapshot, snapshots: list[Snapshot]) -> list[str]:
    """The ids an aggregate of ``snap`` retires: its chain below it, or, once it is a full (an aggregate run
    before, or stopped before it retired), what is left of the chain it replaced (``former_chain``)."""
    if snap.kind != KIND_FULL:
        return [s.id for s in repo.chain_of(snap, snapshots)[:-1]]
    former = snap.stats.get("former_chain")
    present = {s.id for s in snapshots}
    return [i for i in former if i in present] if isinstance(former, list) else []


def aggregate(repo: Repo, snap: Snapshot, snapshots: list[Snapshot], *, retire: bool = False,
              ensure_held: Callable[[], None] = lambda: None) -> Aggregated:
    """Make ``snap`` a synthetic full: its resolved tree as a full manifest, under the same id.

    No source is read and no data moves: only a manifest is written.  Snapshots
    that build on ``snap`` keep restoring as before (its id and tree are
    unchanged).  With ``retire`` the chain it replaced is forgotten, rebasing
    any other snapshot that still needed part of it.  The caller holds the
    exclusive lock, and read ``snapshots`` under it.
    """
    chain_ids = replaced_chain(repo, snap, snapshots)
    made_full = snap.kind != KIND_FULL
    if made_full:
        its_chain = repo.chain_of(snap, snapshots)
        records = repo.tree(snap, snapshots)
        ids, mw = store_manifest(repo, records, ensure_held)
        _make_full(snap, chain_ids)
        # a run stopped before it retired the chain it replaced leaves the chain's ids for the next to retire
        snap.stats = {**snap.stats, OWNERS_KEY: chain_owners(s.stats for s in its_chain)}
        snap.manifest = [i.hex() for i in ids]
        snap.manifest_starts = mw.starts
        snap.version = mw.version
        snap.stats = {**snap.stats, "manifest_records": mw.records, "manifest_bytes": _stored(repo, ids)}
        ensure_held()
        repo.save_snapshot(snap, replace=True)
    if not (retire and chain_ids):
        return Aggregated(snap, made_full=made_full)
    plan = _retire_plan(snapshots, chain_ids)
    apply_forget(repo, snapshots, plan, ensure_held)
    return Aggregated(snap, plan.remove, plan.rebases, made_full, _tagged_retired(snapshots, plan.remove))


def plan_aggregate(repo: Repo, snap: Snapshot, snapshots: list[Snapshot], *, retire: bool = False) -> Aggregated:
    """What ``aggregate`` would do, written nowhere: ``snap`` as it would be saved (but its manifest), and
    with ``retire`` what would be forgotten and rebased."""
    chain_ids = replaced_chain(repo, snap, snapshots)
    made_full = snap.kind != KIND_FULL
    if made_full:
        snap = replace(snap)
        _make_full(snap, chain_ids)
        snapshots = [snap if s.id == snap.id else s for s in snapshots]
    if not (retire and chain_ids):
        return Aggregated(snap, made_full=made_full, dry_run=True)
    plan = _retire_plan(snapshots, chain_ids)
    return Aggregated(snap, plan.remove, plan.rebases, made_full,
                      _tagged_retired(snapshots, plan.remove, "would be"), True)


def _make_full(snap: Snapshot, chain_ids: list[str]) -> None:
    """Mark ``snap`` a full of its own; dated as its parent, it still sorts after it."""
    snap.stats = {**snap.stats, "follows": snap.parent, "former_chain": chain_ids, "aggregated": True,
                  "chain_length": 1}
    snap.kind = KIND_FULL
    snap.parent = None


def _retire_plan(snapshots: list[Snapshot], chain_ids: list[str]) -> ForgetPlan:
    """The forget of an aggregate's former chain, ``snapshots`` holding the aggregate as a full already.  A
    differential built on an unreadable snapshot is nothing a rebase can take, nor restores: planned with it,
    the retire failed on it, every run again as well.  One of the chain goes by id, as forget's do."""
    broken = chain.broken_chains({s.id: s.parent for s in snapshots})
    plan = plan_forget([s for s in snapshots if s.id not in broken], ids=chain_ids)
    plan.remove += [i for i in chain_ids if i in broken]
    return plan


def _tagged_retired(snapshots: list[Snapshot], removed: list[str], verb: str = "was") -> list[str]:
    gone = set(removed)
    return [f"snapshot {s.id[:8]} of the former chain, tagged {', '.join(s.tags)}, {verb} forgotten with it"
            for s in snapshots if s.id in gone and s.tags]
