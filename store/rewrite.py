"""Rewriting snapshots without some paths (secrets or caches backed up by mistake), or under another host.

Each chosen snapshot's manifest is written again without the excluded paths and their subtrees, under
the same id (as a rebase does, so chains and children stay valid); ``prune`` then frees the data no
snapshot references any more.  A differential's tree is its parent's with its own records applied, so
a differential rewritten alone gets a deletion for each excluded path its tree holds: its parent's
version must not show through.  Every plan is made from the manifests as they were before anything is
written, so rewriting a parent and its differentials together gives the same trees in any order.

A new host (a machine renamed) changes only the snapshot objects, re-sealed under their ids as ``tag``
does: the manifests stay, and the next backup under the new name finds the renamed chain's newest
snapshot as its parent.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from chunkvault.errors import ChunkvaultError, UsageError

from .chain import chain_lengths, meets
from .excludes import ExcludeRules
from .find import tree_glob
from .locks import EXCLUSIVE, RepoLock
from .manifest import OP_DELETE, T_HARDLINK, ManifestStats, Record, delete_record, sort_key
from .manifest_io import ManifestWriter, write_manifest
from .repository import Repo, SavesAfterIndex
from .snapshot import KIND_FULL, Snapshot


def excluded_by(globs: list[str], iglobs: list[str] | None = None) -> Callable[[bytes], bool]:
    """A path is excluded when it or one of its ancestors is, as a backup's walk judges it: the last glob
    that matches the path or its name decides (``!`` re-including; ``iglobs`` ignoring case)."""
    rules = ExcludeRules(globs, iglobs or (), normalize=tree_glob)

    def excluded(path: bytes) -> bool:
        return rules.excluded_tree(os.fsdecode(path)) if path else False

    return excluded


@dataclass
class SnapshotRewrite:
    """What rewriting one snapshot changes: its new own records, its tree's new counts, and the paths
    removed from its tree (the topmost of each excluded subtree)."""

    records: list[Record]
    stats: ManifestStats
    removed: list[bytes] = field(default_factory=list)


def plan_rewrite(own: Iterable[Record], tree: Iterable[Record], full: bool,
                 excluded: Callable[[bytes], bool], name: str = "snapshot") -> SnapshotRewrite:
    """``own``: the snapshot's own records; ``tree``: its resolved tree (ENTRY records, sorted).

    A hard link left in the tree whose target would go is refused: it would restore to nothing.
    """
    stats = ManifestStats()
    removed: list[bytes] = []
    for rec in tree:
        assert rec.entry is not None
        if excluded(rec.path):
            parent = rec.path.rpartition(b"/")[0]
            if not parent or not excluded(parent):
                removed.append(rec.path)
            continue
        e = rec.entry
        if e.type == T_HARDLINK and excluded(e.target):
            raise UsageError(f"{name}: {os.fsdecode(e.path)} is a hard link to {os.fsdecode(e.target)}, "
                             "which would go: exclude both")
        stats.count_entry(e)
    # A deletion of the differential's own stays: it only removes, and without it the parent's version
    # of that path would show through.
    kept = {r.path: r for r in own if r.op == OP_DELETE or not excluded(r.path)}
    if not full:
        for path in removed:
            kept.setdefault(path, delete_record(path))
    return SnapshotRewrite(sorted(kept.values(), key=lambda r: sort_key(r.path)), stats, removed)


@dataclass
class RewriteReport:
    dry_run: bool
    removed: list[tuple[str, bytes]] = field(default_factory=list)  # (snapshot id, path)
    rewritten: list[str] = field(default_factory=list)
    # Differentials built on a rewritten snapshot whose own records hold nothing excluded: their trees
    # lose what it lost (their counts are brought up to date).  Those that do hold some are rewritten.
    inherited: list[str] = field(default_factory=list)
    # Differentials a rewrite stopped part-way left counting what it removed, counted again.
    recounted: list[str] = field(default_factory=list)
    new_host: str | None = None
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, the host it had)
    # Snapshots the new host had already of the same paths as a renamed one: one series with them from now
    # on, whose newest the next backup there builds on (two machines merged by mistake, say).
    joined: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "rewritten": self.rewritten, "inherited": self.inherited,
                "recounted": self.recounted,
                "removed": [{"snapshot": s, "path": os.fsdecode(p)} for s, p in self.removed],
                "new_host": self.new_host, "renamed": [{"snapshot": s, "host": h} for s, h in self.renamed],
                "joined": self.joined}


#: Which snapshots a command takes, chosen from every snapshot as read under its lock.
Selection = Callable[[list[Snapshot]], list[Snapshot]]


def _under_lock(repo: Repo, select: Selection) -> tuple[list[Snapshot], list[Snapshot]]:
    """(every snapshot, those ``select`` takes of them), read again now that the exclusive lock is held:
    a forget's rebase may have rewritten one since it was listed, and a backup that held the lock off
    may have saved one that the filters take."""
    every = repo.reload_snapshots()
    return every, select(every)


def rewrite_snapshots(repo: Repo, select: Selection, globs: list[str], *, dry_run: bool = True,
                      wait: float = 3600.0, iglobs: list[str] | None = None) -> RewriteReport:
    """Rewrite each snapshot ``select`` takes without the paths ``globs`` and ``iglobs`` exclude
    (``excluded_by``); a dry run plans and reports only, and takes no lock.  Under the exclusive lock: no
    backup may build on a manifest being replaced, no forget rebase one."""
    patterns = [*globs, *(iglobs or [])]
    if not patterns:
        raise UsageError("rewrite needs at least one exclude pattern, or a new host").hinting(
            " (--exclude, --new-host)")
    excluded = excluded_by(globs, iglobs)
    if all(g.startswith("!") for g in patterns):
        raise UsageError("rewrite's patterns all start with '!': they take back what an earlier pattern "
                         "excludes, and none does")
    report = RewriteReport(dry_run)
    with contextlib.nullcontext() if dry_run else RepoLock(repo.remote, EXCLUSIVE, "rewrite", wait=wait) as lock:
        repo.load_index()
        every, chosen = _under_lock(repo, select)
        # A differential built on a chosen snapshot loses the excluded paths with it, its own records of
        # them too: else its tree would keep a file whose directories went with the parent's records.
        picked = {s.id for s in chosen}
        parents = {s.id: s.parent for s in every}
        on_picked = meets(parents, picked)
        below = [s for s in every if s.id not in picked and on_picked[s.id]]
        plans = []
        counts: dict[str, ManifestStats] = {}  # what a snapshot left as it is counts once the rewrite is done
        for snap in chosen + below:
            own = list(repo.manifest_records(snap))
            # Every differential rewritten deletes the excluded paths itself, so that its new tree does not
            # wait for its parent's (see the writes below).  One below a chosen snapshot whose own records
            # hold nothing excluded is left as it is: its tree loses what its parent's loses, when it does.
            plan = plan_rewrite(own, repo.tree(snap, every), snap.kind == KIND_FULL, excluded,
                                f"snapshot {snap.short_id}")
            holds = snap.id in picked or any(r.op != OP_DELETE and excluded(r.path) for r in own)
            if holds and plan.records != own:
                plans.append((snap, plan))
            else:
                counts[snap.id] = plan.stats
            report.removed += [(snap.id, p) for p in plan.removed]
        report.rewritten = [s.id for s, _ in plans]
        done = set(report.rewritten)
        on_done = meets(parents, done)
        inherited = [s for s in every if s.id not in done and on_done[s.id]]
        report.inherited = [s.id for s in inherited]
        # A rewrite stopped before it recounted the differentials on what it rewrote left them counting
        # what it removed; run again, it has nothing left to rewrite, and counts those again here.
        on_rewritten = meets(parents, {s.id for s in every if s.stats.get("rewritten")})
        stale = [s for s in every if s.id in counts and not on_done[s.id] and on_rewritten[s.id]
                 and _counts_differ(s, counts[s.id])]
        report.recounted = [s.id for s in stale]
        if dry_run:
            return report
        # Children before their parents: killed at any point, a snapshot rewritten has its new tree, one
        # not yet has its old one (its whole chain is not rewritten yet either).  Parents first, a killed
        # rewrite left differentials whose own records of excluded files had lost their directories.
        # Each snapshot is saved once its manifest's blobs are indexed, several to an index object, in this order.
        depth = chain_lengths(parents)
        with _counted(len(plans), "rewritten") as saved, repo.writer() as writer:
            writer.guard = lock.ensure_held
            saves = SavesAfterIndex(writer)

            def save(snap: Snapshot, plan: SnapshotRewrite, blob_ids: list[bytes], mw: ManifestWriter) -> None:
                snap.manifest = [i.hex() for i in blob_ids]
                snap.manifest_starts = mw.starts
                snap.version = mw.version
                snap.stats = {**snap.stats, "rewritten": True, "manifest_records": mw.records}
                save_counts(repo, snap, plan.stats, lock)
                saved()

            for snap, plan in sorted(plans, key=lambda planned: -depth[planned[0].id]):
                blob_ids, mw = write_manifest(repo, writer, plan.records)
                saves.then(lambda s=snap, p=plan, b=blob_ids, m=mw: save(s, p, b, m))
            saves.flush()
        recounting = inherited + stale
        recounted = (lambda done: f" ({len(plans)} snapshot(s) rewritten, and the counts of {done} of the "
                     f"{len(recounting)} built on {'it' if len(plans) == 1 else 'them'} updated before it; the "
                     "same command again updates the others)")
        with _counted(len(recounting), "recounted", told=recounted if plans else None) as saved:
            for snap in recounting:
                save_counts(repo, snap, counts[snap.id], lock)
                saved()
    return report


def _counts_differ(snap: Snapshot, stats: ManifestStats) -> bool:
    return (snap.stats.get("files"), snap.stats.get("dirs"), snap.stats.get("bytes")) != (
        stats.files, stats.dirs, stats.bytes)


@contextlib.contextmanager
def _counted(total: int, done_what: str, *, told: Callable[[int], str] | None = None
             ) -> Iterator[Callable[[], None]]:
    """Around the writes of ``total`` snapshot objects, one call of what it yields after each: an error
    part-way says how many were written (it said nothing of them, as if none were), and that the same
    command run again finishes the others; or, with ``told``, what it says of the number written (also of
    none), where running again would not."""
    done = 0

    def saved() -> None:
        nonlocal done
        done += 1

    try:
        yield saved
    except ChunkvaultError as exc:
        if told is not None:
            raise exc.explained(told(done)) from exc
        if not done:
            raise
        raise exc.explained(f" ({done} of {total} snapshot(s) {done_what} before it; the same command "
                            "again does the others)") from exc


def count_tree(repo: Repo, snap: Snapshot, every: list[Snapshot]) -> ManifestStats:
    """The files, directories and bytes of ``snap``'s tree as its chain resolves now."""
    stats = ManifestStats()
    for rec in repo.tree(snap, every):
        assert rec.entry is not None
        stats.count_entry(rec.entry)
    return stats


def save_counts(repo: Repo, snap: Snapshot, stats: ManifestStats, lock: RepoLock) -> None:
    """Write ``snap`` again with the counts its listing and ``--type auto`` read from it."""
    snap.stats = {**snap.stats, "files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes}
    lock.ensure_held()  # a forget that took the lock for stale may have removed it meanwhile
    repo.save_snapshot(snap, replace=True)


def retag_snapshots(repo: Repo, select: Selection, *, add: list[str], remove: list[str],
                    set_to: list[str] | None, wait: float = 3600.0) -> list[Snapshot]:
    """Change the tags of the snapshots ``select`` takes: ``set_to`` replaces them, then ``remove`` and
    ``add`` apply; each changed object is written again under its id.  Returns those changed."""
    changed = []
    with RepoLock(repo.remote, EXCLUSIVE, "tag", wait=wait) as lock:
        retagged = []
        for snap in _under_lock(repo, select)[1]:
            new = list(snap.tags) if set_to is None else list(dict.fromkeys(set_to))
            new = [t for t in new if t not in remove] + [t for t in dict.fromkeys(add) if t not in new + remove]
            if new != snap.tags:
                retagged.append((snap, new))
        with _counted(len(retagged), "retagged") as saved:
            for snap, new in retagged:
                snap.tags = new
                lock.ensure_held()
                repo.save_snapshot(snap, replace=True)
                changed.append(snap)
                saved()
    return changed


#: In a renamed snapshot's stats: the hosts it had before, oldest first.
FORMER_HOSTS = "former_hosts"


def plan_rehost(every: list[Snapshot], chosen: list[Snapshot], new_host: str) -> list[Snapshot]:
    """Pure: of ``chosen``, those whose host becomes ``new_host`` (the others have it already).

    A chain keeps one host: a backup takes the newest snapshot of its host and paths as its parent, and
    retention groups by host, so a differential under one name whose parent is under another is a chain
    neither name sees whole.  A selection that would part a snapshot from its parent where they share a
    host now is refused (UsageError naming them); a chain whose hosts differ already may be mended piecewise.
    """
    picked = {s.id for s in chosen}
    by_id = {s.id: s for s in every}

    def after(s: Snapshot) -> str:
        return new_host if s.id in picked else s.host

    parted = [(s, p) for s in every if (p := by_id.get(s.parent or "")) is not None
              and s.host == p.host and after(s) != after(p)]
    if parted:
        child, parent = parted[0]
        left = parent if child.id in picked else child
        more = f" ({len(parted) - 1} more such pair(s))" if len(parted) > 1 else ""
        raise UsageError(f"snapshot {child.short_id} is built on {parent.short_id}, both of host {parent.host}, and "
                         f"{left.short_id} is not selected: a chain keeps one host, select all of it{more}"
                         ).hinting(f" (--host {parent.host}, or name each of its snapshots)")
    return [s for s in chosen if s.host != new_host]


def joined_by(every: list[Snapshot], changing: list[Snapshot], new_host: str) -> list[Snapshot]:
    """Pure: the snapshots of ``new_host`` that are of the same source (paths, or stream) as one of ``changing``:
    a backup's parent is the newest of its host's series, and these join the renamed in one."""
    def source(s: Snapshot) -> tuple:
        return tuple(sorted(s.paths)), s.stdin_name

    renamed = {s.id for s in changing}
    sources = {source(s) for s in changing}
    return [s for s in every if s.host == new_host and s.id not in renamed and source(s) in sources]


def rehost_snapshots(repo: Repo, select: Selection, new_host: str, *, dry_run: bool = True,
                     wait: float = 3600.0) -> RewriteReport:
    """Give each snapshot ``select`` takes the host ``new_host`` (``plan_rehost``); a dry run reports only,
    and takes no lock.  Under the exclusive lock, as ``tag``: no forget may rebase one meanwhile, and its
    object would be written back with the old host.  Killed part-way, a run again with the same selection
    finishes (a chain whose hosts differ is not refused)."""
    report = RewriteReport(dry_run, new_host=new_host)
    with contextlib.nullcontext() if dry_run else RepoLock(repo.remote, EXCLUSIVE, "rewrite", wait=wait) as lock:
        every, chosen = _under_lock(repo, select)
        changing = plan_rehost(every, chosen, new_host)
        report.rewritten = [s.id for s in changing]
        report.renamed = [(s.id, s.host) for s in changing]
        report.joined = [s.id for s in joined_by(every, changing, new_host)]
        if dry_run:
            return report
        with _counted(len(changing), "renamed") as saved:
            for snap in changing:
                former = snap.stats.get(FORMER_HOSTS)
                snap.stats = {**snap.stats,
                              FORMER_HOSTS: [*(former if isinstance(former, list) else []), snap.host]}
                snap.host = new_host
                lock.ensure_held()
                repo.save_snapshot(snap, replace=True)
                saved()
    return report
