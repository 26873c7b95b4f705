"""Finding files across snapshots: each distinct version of each matching path, and the snapshots holding it.

A differential's tree is its parent's tree with its own records applied, so matches are carried down
each chain: every full manifest is read once and every differential's own records once.  Applying a
differential (``chain.apply``) to only the matching records of its parent's tree gives exactly the
matching records of its own tree: whether a path's record survives depends only on the records of
that path and of its ancestors, and the differential's side of the merge holds all of its own that bear
on them (the matching ones, and each cut of a subtree: a DELETE or FRESH).  What each manifest gives is
kept encoded (``held_matches``); the trees are then resolved side by side and merged path by path, in
manifest order, so only one path's records are objects at a time (``versions``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import itertools
import os
import struct
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple

from chunkvault.errors import CorruptObject, NewerObject

from . import chain
from .chain import fold_chains
from .manifest import (OP_DELETE, OP_ENTRY, OP_FRESH, T_FILE, T_HARDLINK, Entry, Record, decode_records, delete_record,
                       encode_record, sort_key)
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


class Held(NamedTuple):
    """A snapshot's part of a search, its records encoded as a manifest's are (a full's matching records, a
    differential's own records that can change a matching path's), in pieces of whole records: held as
    objects, the matches of ``find '*'`` over two snapshots of 300,000 files took some 170 MB of the 510 it
    peaked at."""

    snapshot: Snapshot
    pieces: list[bytes]


_BATCH = 64  # records to a held piece: a listing out of manifest order decodes one for each version


def _packed(records: Iterable[Record]) -> list[bytes]:
    it = iter(records)
    return [b"".join(map(encode_record, part)) for part in iter(lambda: list(itertools.islice(it, _BATCH)), [])]


def _tagged(n: int, pieces: list[bytes]) -> Iterator[Record]:
    """The records of held ``pieces`` (decoded a piece at a time: a search's trees are read side by side),
    each entry as ``(entry, where)``: ``n`` and its place in them, by which a version keeps it."""
    for p, piece in enumerate(pieces):
        for i, rec in enumerate(decode_records(piece, "held records")[0]):
            yield rec if rec.entry is None else Record(rec.op, rec.path, (rec.entry, (n, p * _BATCH + i)))


def _cutting(records: Iterable[Record], match: Callable[[bytes], bool]) -> Iterator[Record]:
    """A differential's own records that bear on the matching paths of its tree: those of matching paths,
    and a DELETE for each other path's DELETE or FRESH, whose subtree may hold some (its ENTRY of a
    path that does not match changes no other)."""
    for rec in records:
        if match(rec.path):
            yield rec
        elif rec.op in (OP_DELETE, OP_FRESH):
            yield delete_record(rec.path)


def held_matches(snapshots: Iterable[Snapshot], own_records: Callable[[Snapshot], Iterable[Record]],
                 match: Callable[[bytes], bool], damaged: dict[str, CorruptObject] | None = None
                 ) -> dict[str, Held]:
    """Snapshot id -> what a search needs of it, for every snapshot of ``chain_order(snapshots)``: a full's
    matching records, a differential's own records that bear on them (``_trees`` resolves them).  Each
    manifest is read once, one after another.  With ``damaged``, a snapshot whose manifest does not read
    is left out with its differentials, and its error noted there, instead of failing the search of every
    other snapshot."""
    out: dict[str, Held] = {}
    for s in chain_order(snapshots):
        try:
            if s.parent is None:
                out[s.id] = Held(s, _packed(r for r in own_records(s) if match(r.path)))
            elif s.parent in out:
                out[s.id] = Held(s, _packed(_cutting(own_records(s), match)))
            elif damaged is not None and s.parent in damaged:
                damaged[s.id] = damaged[s.parent]
        except CorruptObject as exc:
            if damaged is None or isinstance(exc, NewerObject):  # newer: not damage, an upgrade reads it
                raise
            damaged[s.id] = exc
    return out


def _trees(held: dict[str, Held], order: list[Snapshot], wanted: set[str]) -> dict[str, Iterator[Record]]:
    """Snapshot id -> the matching records of its resolved tree, sorted, for each of ``wanted``: streams
    to be read side by side (a parent's tree goes to each of its differentials and to its own reader, as
    far as the one furthest behind).  ``order``: ``chain_order`` of the held; an entry comes as ``(entry,
    (index in order, record index))``."""
    readers: dict[str, int] = {sid: int(sid in wanted) for sid in held}
    for s in reversed(order):  # a tree no one reads is not made: an unread share would keep all it passed
        if readers[s.id] and s.parent is not None:
            readers[s.parent] += 1
    shares: dict[str, list[Iterator[Record]]] = {}
    out: dict[str, Iterator[Record]] = {}
    for n, s in enumerate(order):
        if not readers[s.id]:
            continue
        own = _tagged(n, held[s.id].pieces)
        # the parent's records match, and the differential's held ones that it keeps: those that match
        tree = own if s.parent is None else chain.apply(shares[s.parent].pop(), own)
        shares[s.id] = list(itertools.tee(tree, readers[s.id]))
        if s.id in wanted:
            out[s.id] = shares[s.id].pop()
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


_LEN = struct.Struct("<I")
_SPAN = struct.Struct("<IIB")  # a version's first snapshot (of its source's), how many, how its entry is kept
_HELD = struct.Struct("<IQ")  # as held: which snapshot's, its index there
_OWN = struct.Struct("<I")  # encoded here (a link listed as its file): its length


class _Listed:
    """A source's found paths as they are found (in manifest order), encoded into one buffer, a version's entry
    by where its snapshot's held records have it: as objects, ``find '*'`` over two snapshots of 300,000 files
    held some 240 MB of them (and the matches besides)."""

    def __init__(self, host: str, paths: list[str], held: list[list[bytes]]):
        self.host, self.paths = host, paths
        self.snapshots: list[Snapshot] = []  # the source's, oldest first
        self._held = held
        self._data = bytearray()
        self._starts = array("Q")
        self._last: bytes | None = None
        self._in_order = True  # listed in manifest order, as ``sorted`` would list them
        self._decoded: dict[int, tuple[int, list[Record]]] = {}  # per held snapshot: the last piece decoded

    def add(self, path: bytes, found: list[list]) -> None:
        """A path's versions: ``[entry, first snapshot, count, where held or None]``."""
        if self._last is not None and path < self._last:
            self._in_order = False
        self._last = path
        self._starts.append(len(self._data))
        self._data += _LEN.pack(len(path)) + path + _LEN.pack(len(found))
        for e, first, count, where in found:
            if where is not None:
                self._data += _SPAN.pack(first, count, 0) + _HELD.pack(*where)
            else:
                encoded = encode_record(Record(OP_ENTRY, b"", e))  # its path is the path's
                self._data += _SPAN.pack(first, count, 1) + _OWN.pack(len(encoded)) + encoded

    def _path(self, i: int) -> bytes:
        at = self._starts[i]
        (n,) = _LEN.unpack_from(self._data, at)
        return bytes(self._data[at + 4 : at + 4 + n])

    def _entry(self, n: int, index: int) -> Entry:
        piece, i = divmod(index, _BATCH)
        got = self._decoded.get(n)
        if got is None or got[0] != piece:
            got = self._decoded[n] = (piece, decode_records(self._held[n][piece], "held records")[0])
        e = got[1][i].entry
        assert e is not None
        return e

    def found(self) -> Iterator[Found]:
        """The paths by name (bytes), each as a ``Found``."""
        order = range(len(self._starts)) if self._in_order else sorted(range(len(self._starts)), key=self._path)
        data = self._data
        for i in order:
            at = self._starts[i]
            (n,) = _LEN.unpack_from(data, at)
            f = Found(self.host, list(self.paths), bytes(data[at + 4 : at + 4 + n]))
            at += 4 + n
            (count,) = _LEN.unpack_from(data, at)
            at += 4
            for _ in range(count):
                first, held, kept = _SPAN.unpack_from(data, at)
                at += _SPAN.size
                if kept == 0:
                    e = self._entry(*_HELD.unpack_from(data, at))
                    at += _HELD.size
                else:
                    (size,) = _OWN.unpack_from(data, at)
                    at += _OWN.size
                    ((_, _, e),), _ = decode_records(bytes(data[at : at + size]), "found entry")
                    at += size
                    e.path = f.path
                f.versions.append(Version(e, self.snapshots[first : first + held]))
            yield f


def _path_versions(runs: list[tuple[int, Snapshot, Record]], snapshots: list[Snapshot],
                   holder: Callable[[Snapshot, bytes], Entry | None] | None) -> list[list]:
    """One path's versions in a source's snapshots (``snapshots``, oldest first), from its records in those
    holding it (index, snapshot, record with its entry as ``_trees`` gives it; oldest first): ``[entry, first
    snapshot's index, count, where the entry is held (None: it is not)]`` each."""
    out: list[list] = []
    first: tuple | None = None  # the state of the file the version's first entry names, once needed
    last_ctime: int | None = None  # a link's change time in the snapshot before
    for idx, snap, rec in runs:
        e, where = rec.entry
        v = out[-1] if out else None
        if v is not None and v[1] + v[2] != idx:
            v = None
        elif v is not None and (_state(v[0]) != _state(e) or (e.type == T_HARDLINK and e.ctime_ns != last_ctime)):
            # an equal link too, its file changed since (its change time): a link's entry carries neither the
            # file's attributes nor, when size and mtime stayed, its content
            if first is None:
                first = _state(_in(v[0], snapshots[v[1]], holder))
            if first != _state(_in(e, snap, holder)):
                v = None
            elif v[0].type == T_HARDLINK and _state(v[0]) != _state(e):
                # the same file, a link in some of the version's snapshots and not in others (or to
                # another name): listed as the file, whose name a link gives is not in them all
                kept = v[0]
                v[0] = _in(kept, snapshots[v[1]], holder)
                if v[0] is not kept:
                    v[3] = None  # not as held
        if v is None:
            v = [e, idx, 0, where]
            out.append(v)
            first = None
        v[2] += 1
        if e.type == T_HARDLINK:
            last_ctime = e.ctime_ns
    return out


def _keyed(n: int, records: Iterator[Record]) -> Iterator[tuple[bytes, int, Record]]:
    for rec in records:
        yield sort_key(rec.path), n, rec


def versions(snapshots: Iterable[Snapshot], held: dict[str, Held],
             holder: Callable[[Snapshot, bytes], Entry | None] | None = None) -> Iterator[Found]:
    """Group the matches of each source's snapshots (taken oldest first) into versions: a path's entry
    starts a new version where its type, mode, owner, size, mtime, device, link target, content or
    extended attributes differ from the one before (or it reappears after an absence).  A path of a
    multiply-linked file is compared by the file it names (``holder`` finds it by path in a snapshot), as
    ``diff`` compares it: which of its paths holds the data follows their order, so a new link sorting
    first made the file a hard link, a new version of nothing.  ``held``: ``held_matches`` of the snapshots
    and their ancestors.  The snapshots' trees are read side by side, path by path, so only one path's
    records are held as objects; the paths come by source, then by name."""
    snapshots = list(snapshots)
    ordered = sorted((s for s in snapshots if s.id in held), key=chronological_key(snapshots))
    order = chain_order(h.snapshot for h in held.values())
    pieces = [held[s.id].pieces for s in order]
    sources: dict[tuple[str, tuple[str, ...]], _Listed] = {}
    where: list[tuple[_Listed, int]] = []
    for s in ordered:
        listed = sources.setdefault((s.host, tuple(sorted(s.paths))), _Listed(s.host, sorted(s.paths), pieces))
        where.append((listed, len(listed.snapshots)))
        listed.snapshots.append(s)
    _list_paths(_trees(held, order, {s.id for s in ordered}), ordered, where, holder)
    for listed in sorted(sources.values(), key=lambda listed: (listed.host, listed.paths)):
        yield from listed.found()


def _list_paths(trees: dict[str, Iterator[Record]], ordered: list[Snapshot], where: list[tuple[_Listed, int]],
                holder: Callable[[Snapshot, bytes], Entry | None] | None) -> None:
    """The trees merged path by path, each path's versions added to its source's ``_Listed``.  A function of
    its own, so that the last path's records go with its locals before the paths found are made: its
    decoded record was held beside the one ``_Listed`` decodes again (a 64 GiB file cut every 64 KiB: 32 MB
    of ids each)."""
    merged = heapq.merge(*(_keyed(n, trees[s.id]) for n, s in enumerate(ordered)))
    for _, same in itertools.groupby(merged, key=lambda item: item[0]):
        runs: dict[int, tuple[_Listed, list[tuple[int, Snapshot, Record]]]] = {}  # by source
        for _, n, rec in same:
            listed, idx = where[n]
            runs.setdefault(id(listed), (listed, []))[1].append((idx, ordered[n], rec))
        for listed, run in runs.values():
            listed.add(run[0][2].path, _path_versions(run, listed.snapshots, holder))
