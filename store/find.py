"""Finding files across snapshots: each distinct version of each matching path, and the snapshots holding it.

A differential's tree is its parent's tree with its own records applied, so matches are carried down
each chain: every full manifest is read once and every differential's own records once.  Applying a
differential (``chain.apply``) to only the matching records of its parent's tree gives exactly the
matching records of its own tree: whether a path's record survives depends only on the records of
that path and of its ancestors, and the differential's side of the merge holds all of its own.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

from chunkvault.errors import CorruptObject, NewerObject

from . import chain
from .chain import fold_chains
from .manifest import T_FILE, T_HARDLINK, Entry, Record
from .chronology import chronological_key
from .snapshot import Snapshot


def tree_glob(glob: str) -> str:
    """A glob as the tree names paths: ``./dir`` and ``dir/`` (as a shell completes them) are ``dir``; they
    selected nothing (a restore wrote an empty tree, find found nothing)."""
    while glob.startswith("./"):
        glob = glob[2:].lstrip("/")
    return glob.rstrip("/") or glob


def path_matcher(patterns: list[str], ignore_case: bool = False) -> Callable[[bytes], bool]:
    """A test of a path below a snapshot's root: a glob matches the whole path or its last name
    (as ``backup --exclude`` matches).  The root itself has neither: ``*`` does not list it."""
    globs = [tree_glob(p.lower() if ignore_case else p) for p in patterns]

    def match(path: bytes) -> bool:
        if not path:
            return False
        s = os.fsdecode(path)
        if ignore_case:
            s = s.lower()
        name = s.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(s, g) or fnmatch.fnmatchcase(name, g) for g in globs)

    return match


def chain_order(snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    """``snapshots`` with every parent before its children (by depth in the chain, then time); a
    differential whose chain does not reach a full among them is left out."""
    by_id = {s.id: s for s in snapshots}
    parents = {sid: s.parent for sid, s in by_id.items()}
    # None: not reaching a full (cut off at a missing parent, or a loop)
    depths = fold_chains(parents, lambda sid: 0 if parents[sid] is None else None,
                         lambda sid, d: None if d is None else d + 1)
    depth = {sid: d for sid, d in depths.items() if d is not None}
    return sorted((by_id[sid] for sid in depth), key=lambda s: (depth[s.id], s.time, s.id))


def matches_by_snapshot(snapshots: Iterable[Snapshot], own_records: Callable[[Snapshot], Iterable[Record]],
                        match: Callable[[bytes], bool], damaged: dict[str, CorruptObject] | None = None
                        ) -> dict[str, list[Record]]:
    """Snapshot id -> the records of its resolved tree whose path ``match`` accepts (sorted), for every
    snapshot of ``chain_order(snapshots)``; ``own_records(s)``: the records of s's own manifest.  With
    ``damaged``, a snapshot whose manifest does not read is left out with its differentials, and its error
    noted there, instead of failing the search of every other snapshot."""
    out: dict[str, list[Record]] = {}
    for s in chain_order(snapshots):
        try:
            if s.parent is None:
                out[s.id] = [r for r in own_records(s) if match(r.path)]
            elif s.parent in out:
                out[s.id] = [r for r in chain.apply(out[s.parent], own_records(s)) if match(r.path)]
            elif damaged is not None and s.parent in damaged:
                damaged[s.id] = damaged[s.parent]
        except CorruptObject as exc:
            if damaged is None or isinstance(exc, NewerObject):  # newer: not damage, an upgrade reads it
                raise
            damaged[s.id] = exc
    return out


@dataclass
class Version:
    """One state of a path: its entry, and the snapshots (oldest first) whose trees hold it."""

    entry: Entry
    snapshots: list[Snapshot] = field(default_factory=list)


@dataclass
class Found:
    """A path of one source (host and backed-up paths) and its versions, oldest first."""

    host: str
    paths: list[str]
    path: bytes
    versions: list[Version] = field(default_factory=list)


def _state(e: Entry) -> tuple:
    """What a restore of the entry gives back (its owner and attributes too: a version lists one owner)."""
    return (e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.rdev, e.target, e.digest, e.xattrs)


def as_file(e: Entry, holder: Callable[[bytes], Entry | None] | None) -> Entry:
    """A hard link as the file it names (``holder`` finds it by path), under its own path; itself when that
    is not found, or not a file.  ``diff`` and ``find`` compare a multiply-linked file's paths so."""
    if e.type != T_HARDLINK or holder is None:
        return e
    held = holder(e.target)
    return e if held is None or held.type != T_FILE else dataclasses.replace(held, path=e.path)


def _in(e: Entry, snap: Snapshot, holder: Callable[[Snapshot, bytes], Entry | None] | None) -> Entry:
    """``as_file`` of an entry of ``snap``."""
    return as_file(e, None if holder is None else lambda path: holder(snap, path))


def versions(snapshots: Iterable[Snapshot], matches: dict[str, list[Record]],
             holder: Callable[[Snapshot, bytes], Entry | None] | None = None) -> list[Found]:
    """Group the matches of each source's snapshots (taken oldest first) into versions: a path's entry
    starts a new version where its type, mode, owner, size, mtime, device, link target, content or
    extended attributes differ from the one before (or it reappears after an absence).  A path of a
    multiply-linked file is compared by the file it names (``holder`` finds it by path in a snapshot), as
    ``diff`` compares it: which of its paths holds the data follows their order, so a new link sorting
    first made the file a hard link, a new version of nothing."""
    firsts: dict[tuple, tuple[Version, tuple]] = {}  # a path's last version -> the state of the file it names

    def first_state(key: tuple, v: Version) -> tuple:
        got = firsts.get(key)
        if got is None or got[0] is not v:
            got = firsts[key] = (v, _state(_in(v.entry, v.snapshots[0], holder)))
        return got[1]

    found: dict[tuple, Found] = {}
    last_seen: dict[tuple, str] = {}
    last_ctime: dict[tuple, int] = {}  # a link's change time in the snapshot before
    previous: dict[tuple[str, tuple[str, ...]], str] = {}
    snapshots = list(snapshots)
    for s in sorted((s for s in snapshots if s.id in matches), key=chronological_key(snapshots)):
        source = (s.host, tuple(sorted(s.paths)))
        before = previous.get(source)
        previous[source] = s.id
        for rec in matches[s.id]:
            assert rec.entry is not None
            key = (source, rec.path)
            f = found.get(key)
            if f is None:
                f = found[key] = Found(s.host, sorted(s.paths), rec.path)
            v = f.versions[-1] if f.versions else None
            if v is None or last_seen[key] != before:
                v = Version(rec.entry)
                f.versions.append(v)
            elif _state(v.entry) != _state(rec.entry) or (
                    rec.entry.type == T_HARDLINK and rec.entry.ctime_ns != last_ctime.get(key)):
                # an equal link too, its file changed since (its change time): a link's entry carries neither the
                # file's attributes nor, when size and mtime stayed, its content
                if first_state(key, v) != _state(_in(rec.entry, s, holder)):
                    v = Version(rec.entry)
                    f.versions.append(v)
                elif v.entry.type == T_HARDLINK and _state(v.entry) != _state(rec.entry):
                    # the same file, a link in some of the version's snapshots and not in others (or to
                    # another name): listed as the file, whose name a link gives is not in them all
                    v.entry = _in(v.entry, v.snapshots[0], holder)
            v.snapshots.append(s)
            last_seen[key] = s.id
            if rec.entry.type == T_HARDLINK:
                last_ctime[key] = rec.entry.ctime_ns
    return sorted(found.values(), key=lambda f: (f.host, f.paths, f.path))
