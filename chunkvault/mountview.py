"""The directory layout ``chunkvault mount`` shows, as pure functions of the snapshot list and trees.

    snapshots/<time>/...        each snapshot's files (time in UTC; a second one in a second gets its id added)
    snapshots/latest            -> the newest snapshot
    ids/<short id>              -> ../snapshots/<time>  (the full id and longer prefixes resolve too)
    hosts/<host>/<time>, latest -> ../../snapshots/<time>
    tags/<tag>/<time>, latest   -> ../../snapshots/<time>

Everything outside a snapshot's files is a directory of names or a symbolic
link, so one snapshot's tree is resolved once however many ways it is reached.
"""
from __future__ import annotations

import bisect
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from .store.manifest import T_DIR, T_HARDLINK, Entry
from .store.chronology import chronological_key
from .store.snapshot import Snapshot

TOP = ("snapshots", "ids", "hosts", "tags")
LATEST = "latest"


@dataclass(frozen=True)
class VirtualDir:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Link:
    target: str


@dataclass(frozen=True)
class InSnapshot:
    snapshot: Snapshot
    rel: bytes  # the path below the snapshot's root (b"" for the root itself)


Node = VirtualDir | Link | InSnapshot


def snapshot_name(s: Snapshot) -> str:
    t = datetime.fromisoformat(s.time).astimezone(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _short_ids(snaps: list[Snapshot], ordered: list[str]) -> dict[str, Snapshot]:
    """Each snapshot under the shortest id prefix (8 hex digits or more) that no other snapshot shares: one
    digit past what it shares with its neighbours in id order (comparing every pair took 12 s at a year of
    hourly snapshots, and the mount stood still while it did).  ``ordered``: their ids, sorted."""
    shared = [_common(a, b) for a, b in zip(ordered, ordered[1:])]
    length = {sid: max(8, 1 + max(shared[i - 1] if i else 0, shared[i] if i < len(shared) else 0))
              for i, sid in enumerate(ordered)}
    return {s.id[:length[s.id]]: s for s in snaps}


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Layout:
    """The virtual tree above the snapshots' files, for one listing of the snapshots."""

    snapshots: list[Snapshot]
    by_name: dict[str, Snapshot] = field(init=False)
    names: dict[str, str] = field(init=False)  # snapshot id -> its name under snapshots/
    ids: dict[str, Snapshot] = field(init=False)
    groups: dict[str, dict[str, list[Snapshot]]] = field(init=False)  # "hosts"/"tags" -> key -> snapshots

    def __post_init__(self) -> None:
        snaps = sorted(self.snapshots, key=chronological_key(self.snapshots))
        self.snapshots = snaps
        first = defaultdict(list)
        for s in snaps:
            first[snapshot_name(s)].append(s)
        self.names = {}
        for name, same in first.items():  # the first of a second keeps its name when another joins it
            for i, s in enumerate(same):
                self.names[s.id] = name if i == 0 else f"{name}-{s.id[:8]}"
        self.by_name = {self.names[s.id]: s for s in snaps}
        self._sorted_ids = sorted(s.id for s in snaps)
        self.ids = _short_ids(snaps, self._sorted_ids)
        self._by_id = {s.id: s for s in snaps}
        hosts, tags = defaultdict(list), defaultdict(list)
        for s in snaps:
            hosts[_safe(s.host)].append(s)
            for t in s.tags:
                tags[_safe(t)].append(s)
        self.groups = {"hosts": dict(hosts), "tags": dict(tags)}

    def _listing(self, snaps: list[Snapshot]) -> VirtualDir:
        return VirtualDir(tuple(self.names[s.id] for s in snaps) + ((LATEST,) if snaps else ()))

    def resolve(self, path: str) -> Node | None:
        """The node at ``path`` (``/a/b``, as the kernel asks), or None when there is none."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return VirtualDir(TOP)
        top, rest = parts[0], parts[1:]
        if top == "snapshots":
            if not rest:
                return self._listing(self.snapshots)
            if rest[0] == LATEST and self.snapshots:
                return Link(self.names[self.snapshots[-1].id]) if len(rest) == 1 else None
            s = self.by_name.get(rest[0])
            if s is None:
                return None
            return InSnapshot(s, os.fsencode("/".join(rest[1:])))
        if top == "ids":
            if not rest:
                return VirtualDir(tuple(self.ids))
            s = self.ids.get(rest[0]) or self._by_prefix(rest[0])
            return Link(f"../snapshots/{self.names[s.id]}") if s is not None and len(rest) == 1 else None
        if top in self.groups:
            groups = self.groups[top]
            if not rest:
                return VirtualDir(tuple(sorted(groups)))
            snaps = groups.get(rest[0])
            if snaps is None or len(rest) > 2:
                return None
            if len(rest) == 1:
                return self._listing(snaps)
            if rest[1] == LATEST:
                return Link(self.names[snaps[-1].id])
            s = self.by_name.get(rest[1])
            return Link(f"../../snapshots/{rest[1]}") if s is not None and any(x.id == s.id for x in snaps) else None
        return None


    def _by_prefix(self, prefix: str) -> Snapshot | None:
        """The snapshot whose id ``prefix`` begins (the full id, or any unique prefix as long as the names
        ``ids/`` lists), as every command takes one."""
        if len(prefix) < 8:
            return None
        i = bisect.bisect_left(self._sorted_ids, prefix)
        found = self._sorted_ids[i:i + 2]
        if not found or not found[0].startswith(prefix) or (len(found) > 1 and found[1].startswith(prefix)):
            return None
        return self._by_id[found[0]]


def _safe(name: str) -> str:
    """A host or tag as one path component, each its own: ``%`` and ``/`` percent-encoded, and the names
    ``.`` and ``..`` (directories already there) and the empty one too.  With ``/`` made ``_``, hosts
    ``a/b`` and ``a_b`` were one directory, holding both hosts' snapshots."""
    name = name.replace("%", "%25").replace("/", "%2F")
    return name if name not in ("", ".", "..") else name.replace(".", "%2E") or "%"


class SnapshotTree:
    """One snapshot's resolved tree, looked up by path: entries, and each directory's children."""

    def __init__(self, entries: Iterable[Entry]):
        self.entries: dict[bytes, Entry] = {}
        self.children: dict[bytes, list[bytes]] = defaultdict(list)
        self.children[b""]  # the root lists its children even when the snapshot has no entry for it
        self._links: dict[bytes, int] = defaultdict(int)  # a file's path -> how many hard links name it
        for e in entries:
            self.entries[e.path] = e
            if e.type == T_HARDLINK:
                self._links[e.target] += 1
            if e.path:
                parent, _, name = e.path.rpartition(b"/")
                self.children[parent].append(name)
            if e.type == T_DIR:
                self.children[e.path]
        # A directory holding entries but none of its own (a snapshot of several paths has no root entry; a
        # differential can keep a path whose directory a rewrite removed from its parent) is listed too.
        for d in [d for d in self.children if d and d not in self.entries]:
            while d and d not in self.entries:
                parent, _, name = d.rpartition(b"/")
                if name in self.children[parent]:
                    break
                self.children[parent].append(name)
                d = parent
        for names in self.children.values():
            names.sort()

    def is_dir(self, rel: bytes) -> bool:
        return rel in self.children

    def entry(self, rel: bytes) -> Entry | None:
        return self.entries.get(rel)

    def linked(self, rel: bytes) -> tuple[bytes, int]:
        """The path that holds ``rel``'s data (a hard link's target, else ``rel``) and how many names the
        file has: one inode and link count for all of them, so that ``cp -a`` and ``rsync -H`` keep them."""
        e = self.entries.get(rel)
        first = e.target if e is not None and e.type == T_HARDLINK else rel
        return first, 1 + self._links.get(first, 0)

    def content_entry(self, rel: bytes) -> Entry | None:
        """The entry whose data ``rel`` reads: a hard link's target (hard links are shown as the file)."""
        e = self.entries.get(rel)
        if e is not None and e.type == T_HARDLINK:
            return self.entries.get(e.target)
        return e
