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
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from .store.manifest import (T_DIR, T_HARDLINK, Entry, decode_records, encode_record, entry_record, record_path,
                             sort_key)
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
    # The names a mount showed before (snapshot id -> name): each keeps its own, and none is given to another.
    given: dict[str, str] = field(default_factory=dict)
    by_name: dict[str, Snapshot] = field(init=False)
    names: dict[str, str] = field(init=False)  # snapshot id -> its name under snapshots/
    ids: dict[str, Snapshot] = field(init=False)
    groups: dict[str, dict[str, list[Snapshot]]] = field(init=False)  # "hosts"/"tags" -> key -> snapshots

    def __post_init__(self) -> None:
        snaps = sorted(self.snapshots, key=chronological_key(self.snapshots))
        self.snapshots = snaps
        # The first of a second keeps its name when another joins it; once shown, a name stays its snapshot's:
        # one dated earlier in that second but listed later took it over, and the kernel, which keeps file
        # contents by path, gave the first one's bytes under the other's name.
        taken = set(self.given.values())
        self.names = {}
        for s in snaps:
            name = self.given.get(s.id)
            if name is None:
                name = snapshot_name(s)
                if name in taken:
                    name = f"{name}-{s.id[:8]}"
                taken.add(name)
            self.names[s.id] = name
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


_RECENT_ENTRIES = 1024


class SnapshotTree:
    """One snapshot's resolved tree, looked up by path.

    Its entries are held as their manifest records, in manifest order, in one buffer (about 150 bytes plus
    the path each): decoded entries in a dict, with a list of names per directory, took about 850 bytes
    each, and a mount of a snapshot of a million files a gigabyte.  A path is found through an
    open-addressing table of record numbers keyed by the path's hash; a directory's children are the
    names in its range of the order, where whatever lies below it comes next."""

    def __init__(self, entries: Iterable[Entry]):
        buf = bytearray()
        offsets = array("Q")
        hashes = array("q")
        links: dict[bytes, int] = defaultdict(int)  # a file's path -> how many hard links name it
        for e in entries:
            offsets.append(len(buf))
            hashes.append(hash(e.path))
            buf += encode_record(entry_record(e))
            if e.type == T_HARDLINK:
                links[e.target] += 1
        offsets.append(len(buf))
        self._buf = buf
        self._offsets = offsets
        self._links = dict(links)
        self._count = len(hashes)
        size = 1 << max(3, (2 * self._count).bit_length())  # at most half full
        slots = array("q", [-1]) * size
        mask = size - 1
        for i, h in enumerate(hashes):
            h &= mask
            while slots[h] >= 0:
                h = (h + 1) & mask
            slots[h] = i
        self._slots, self._mask = slots, mask
        self._recent: dict[bytes, Entry] = {}  # the entries last decoded: a lookup, getattr, getxattr in turn

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """What the tree holds in memory, about."""
        return len(self._buf) + self._offsets.itemsize * len(self._offsets) + self._slots.itemsize * len(self._slots)

    def _path(self, i: int) -> bytes:
        return record_path(self._buf, self._offsets[i])

    def _index(self, rel: bytes) -> int | None:
        h = hash(rel) & self._mask
        while True:
            i = self._slots[h]
            if i < 0:
                return None
            if self._path(i) == rel:
                return i
            h = (h + 1) & self._mask

    def _entry_at(self, i: int) -> Entry:
        records, _ = decode_records(memoryview(self._buf)[self._offsets[i] : self._offsets[i + 1]], "a mounted tree")
        entry = records[0].entry
        assert entry is not None
        return entry

    def _after(self, key: bytes, lo: int = 0) -> int:
        """The first record (from ``lo``) whose path sorts at or after ``key`` (a ``sort_key``)."""
        hi = self._count
        while lo < hi:
            mid = (lo + hi) // 2
            if sort_key(self._path(mid)) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _below(self, rel: bytes) -> int:
        """The first record below directory ``rel``, if any lies below it (else where one would)."""
        i = self._index(rel)
        return i + 1 if i is not None else self._after(sort_key(rel) + b"\0" if rel else b"\0")

    def is_dir(self, rel: bytes) -> bool:
        """A directory entry, the root, or a path that entries lie below (a snapshot of several paths has no
        root entry; a differential can keep a path whose directory a rewrite removed from its parent)."""
        if not rel:
            return True
        i = self._index(rel)
        if i is not None and self._entry_at(i).type == T_DIR:
            return True
        j = self._below(rel)
        return j < self._count and self._path(j).startswith(rel + b"/")

    def children(self, rel: bytes) -> list[bytes]:
        """The names in directory ``rel``, sorted."""
        prefix = rel + b"/" if rel else b""
        names: list[bytes] = []
        j = self._below(rel)
        while j < self._count:
            path = self._path(j)
            if not path.startswith(prefix):
                break
            name, _, _ = path[len(prefix):].partition(b"/")
            names.append(name)
            j += 1
            if j < self._count and self._path(j).startswith(prefix + name + b"/"):  # what lies below it
                j = self._after(sort_key(prefix + name) + b"\1", j)
        return names

    def entry(self, rel: bytes) -> Entry | None:
        e = self._recent.get(rel)
        if e is None:
            i = self._index(rel)
            if i is None:
                return None
            e = self._entry_at(i)
            if len(self._recent) >= _RECENT_ENTRIES:
                self._recent.clear()  # one call, as each step here is: FUSE's threads share the tree
            self._recent[rel] = e
        return e

    def linked(self, rel: bytes) -> tuple[bytes, int]:
        """The path that holds ``rel``'s data (a hard link's target, else ``rel``) and how many names the
        file has: one inode and link count for all of them, so that ``cp -a`` and ``rsync -H`` keep them."""
        e = self.entry(rel) if self._links else None  # no hard links, no target to look up
        first = e.target if e is not None and e.type == T_HARDLINK else rel
        return first, 1 + self._links.get(first, 0)

    def content_entry(self, rel: bytes) -> Entry | None:
        """The entry whose data ``rel`` reads: a hard link's target (hard links are shown as the file)."""
        e = self.entry(rel)
        if e is not None and e.type == T_HARDLINK:
            return self.entry(e.target)
        return e


def seek_data_or_hole(holes: list[tuple[int, int]], size: int, offset: int, hole: bool) -> int | None:
    """Pure: where ``lseek(SEEK_HOLE)`` (``hole``) or ``lseek(SEEK_DATA)`` from ``offset`` lands in a file of
    ``size`` bytes whose holes are ``holes`` ((offset, length), in order, apart); None for ENXIO (``offset``
    at or past the end, or no data after it).  The end of the file counts as a hole, as lseek(2) has it."""
    if not 0 <= offset < size:
        return None
    i = bisect.bisect_right(holes, (offset, size)) - 1  # the last hole starting at or before offset
    inside = i >= 0 and offset < holes[i][0] + holes[i][1]
    if hole:
        if inside:
            return offset
        return holes[i + 1][0] if i + 1 < len(holes) else size
    if not inside:
        return offset
    data = holes[i][0] + holes[i][1]
    return data if data < size else None
