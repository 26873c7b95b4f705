"""Repairs: rebuild the index from pack headers; salvage damaged packs; drop files whose data is gone.

All work from what is still readable and never delete data that can be read:
``index`` supersedes the old index objects with one built from every readable
pack header; ``packs`` copies every blob of the named packs that still
verifies into new packs and drops the named ones; ``snapshots`` rewrites
(same ids) only the snapshots that reference missing blobs, replacing each
damaged file by a deletion, and lists them, with the snapshots no rewrite can
save (a manifest unreadable, or a differential whose chain needs one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from typing import Callable, Iterable

from chunkvault.errors import NOT_DAMAGE, ChunkvaultError, CorruptObject, NewerObject, UsageError

from .blob import KIND_DELTA
from .crypto import content_name
from .indexfile import IndexData
from .locks import EXCLUSIVE, RepoLock
from .manifest import T_HARDLINK, Record, delete_record, sort_key
from .manifest_io import store_manifest
from .pack import PackEntry, readable_ids
from .prune import (RepackWrites, carried_forward, copy_intact, indexed_packs, packs_of, read_index_data,
                    replace_index, store_envelopes, take_back, verify_copies)
from .repository import NOT_INDEXED, PreparedBlob, Repo, pack_id_of, pack_key, superseded_names
from .rewrite import count_tree, save_counts
from .snapshot import KIND_FULL, Snapshot


@dataclass
class RepairReport:
    packs: int = 0
    blobs: int = 0
    unreadable_packs: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, path)
    rewritten: list[str] = field(default_factory=list)
    unrestorable: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, why): forget them
    newer: list[str] = field(default_factory=list)  # snapshots a newer chunkvault wrote: not looked at
    salvaged: list[PackSalvage] = field(default_factory=list)
    baseless_packs: list[str] = field(default_factory=list)  # packs holding deltas whose base is lost
    kept_packs: list[str] = field(default_factory=list)  # header unreadable: the old index's entries kept
    damaged_wal: list[tuple[str, str]] = field(default_factory=list)  # (name, why): wal objects that do not load
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "packs": self.packs, "blobs": self.blobs,
                "unreadable_packs": self.unreadable_packs,
                "kept_packs": self.kept_packs, "baseless_packs": self.baseless_packs,
                "dropped": [{"snapshot": s, "path": p} for s, p in self.dropped], "rewritten": self.rewritten,
                "unrestorable": [{"snapshot": s, "reason": r} for s, r in self.unrestorable], "newer": self.newer,
                "salvaged": [p.to_dict() for p in self.salvaged],
                "damaged_wal": [{"name": n, "reason": r} for n, r in self.damaged_wal]}


@dataclass
class PackSalvage:
    """One damaged pack: how many of its blobs still verify, and the ids of those lost with it (blobs
    that another pack also holds are not lost)."""

    pack: str
    salvaged: int = 0
    lost: list[bytes] = field(default_factory=list)
    problem: str = ""  # why nothing could be read, if so

    def to_dict(self) -> dict:
        return {"pack": self.pack, "salvaged": self.salvaged, "lost": [b.hex() for b in self.lost],
                "problem": self.problem}


def repair_index(repo: Repo, *, wait: float = 0.0) -> RepairReport:
    """A pack whose header cannot be read keeps the entries an old index object gives it (they are the only
    record of where its blobs sit: `repair packs` salvages them from there); one no old index lists is
    left out and reported."""
    report = RepairReport()
    with RepoLock(repo.remote, EXCLUSIVE, "repair index", wait=wait) as lock:
        old = repo.index_names()
        datas, failed = read_index_data(repo, old)
        superseded = superseded_names(datas.values())
        for name, exc in failed.items():
            if isinstance(exc, NewerObject) and name not in superseded:  # replaced, it would be lost to it
                raise exc.explained(" (`repair index` replaces no index object it cannot read)") from None
        listed = packs_of(datas)  # every pack's entries, as the objects that read give them
        index = IndexData()
        sizes = {}
        for o in repo.remote.list("data/"):
            pid = pack_id_of(o.key)
            if pid is None:
                report.unreadable_packs.append(f"{o.key}: not a pack (no pack is kept under that name)")
                continue
            sizes[pid] = o.size
            try:
                index.packs[pid] = repo.pack_header(o.key, o.size)
            except NOT_DAMAGE:  # not the pack's header: whoever may read it can rebuild the index
                raise
            except ChunkvaultError as exc:
                if not listed.get(pid):
                    report.unreadable_packs.append(f"{o.key}: {exc}")
                    continue
                index.packs[pid] = listed[pid]
                report.kept_packs.append(f"{o.key}: {exc}")
        for pid, bad in _unverified_unlisted(repo, {pid: e for pid, e in index.packs.items() if not listed.get(pid)}
                                             ).items():
            report.unreadable_packs.append(f"{pack_key(pid)}: in no index, and {len(bad)} of its blob(s) do not "
                                           "verify (damaged, or not sealed with this repository's key): left out "
                                           "of the index")
            index.packs[pid] = [e for e in index.packs[pid] if e not in bad]
            if not index.packs[pid]:
                del index.packs[pid]
        for pid in _misnamed_copies(repo, index.packs, sizes):
            report.unreadable_packs.append(f"{pack_key(pid)}: its content does not match its name (a copy of "
                                           "another pack under a new name?)")
            del index.packs[pid]
        for pid, bad in _unverified_copies(repo, index.packs).items():
            report.unreadable_packs.append(f"{pack_key(pid)}: {len(bad)} blob(s) that another pack also holds do "
                                           "not verify here (damaged, or not sealed with this repository's key): "
                                           "left out of the index")
            index.packs[pid] = [e for e in index.packs[pid] if e not in bad]
            if not index.packs[pid]:
                del index.packs[pid]  # then no index names it: the next prune deletes it
        report.packs = len(index.packs)
        report.blobs = sum(len(entries) for entries in index.packs.values())
        readable = readable_ids(e for entries in index.packs.values() for e in entries)
        report.baseless_packs = sorted(pid.hex() for pid, entries in index.packs.items()
                                       if any(e.kind == KIND_DELTA and e.base_id not in readable for e in entries))
        # In parts a remote takes (the one that supersedes the old objects last); before each part and each
        # deletion the lock is checked: a prune that took it for stale may have deleted packs listed here.
        replace_index(repo, index, old, lock.ensure_held, carried_forward(datas.values()))
        repo.load_index()
    return report


def _unverified_unlisted(repo: Repo, unlisted: dict[bytes, list[PackEntry]]) -> dict[bytes, set[PackEntry]]:
    """Of packs no index listed, the blobs that do not verify, by pack.  Such a pack is a backup's that ended
    before its index (its blobs whole), or one a `repair packs` stopped before deleting it had taken out of
    the index for its damage: indexed again unread, a damaged blob was deduplicated against by the next
    backup, which then did not restore.  Only these packs are read whole."""
    verified = verify_copies(repo, unlisted) if unlisted else {}
    bad: dict[bytes, set[PackEntry]] = {}
    for pid, entries in unlisted.items():
        for e in entries:
            if not verified[(pid, e.offset)]:
                bad.setdefault(pid, set()).add(e)
    return bad


def _misnamed_copies(repo: Repo, packs: dict[bytes, list[PackEntry]], sizes: dict[bytes, int]) -> list[bytes]:
    """Of packs whose headers list the very same blobs at the same places, those whose bytes do not hash to
    their name: a pack copied under another name (by hand, or a sync tool) reads as well as the pack itself,
    and indexed, it failed every `check --read-data` after.  Only such look-alikes are read whole."""
    alike: dict[tuple, list[bytes]] = {}
    for pid, entries in packs.items():
        alike.setdefault((sizes[pid], tuple(entries)), []).append(pid)
    return [pid for group in alike.values() if len(group) > 1 for pid in group
            if content_name(repo.remote.get(pack_key(pid))) != pid.hex()]


def _unverified_copies(repo: Repo, packs: dict[bytes, list[PackEntry]]) -> dict[bytes, set[PackEntry]]:
    """Of the blobs several packs hold, the copies that fail to verify where another copy verifies, by pack.
    A header is sealed with the key but says nothing of the bytes beside it: a look-alike pack (a real
    header over other bytes, named by their hash) lists the same blobs, and indexed, a prune kept its copies
    and deleted the real ones.  Only copies of blobs held twice are read."""
    first: dict[bytes, tuple[bytes, PackEntry]] = {}
    held: dict[bytes, list[tuple[bytes, PackEntry]]] = {}
    for pid, entries in packs.items():
        for e in entries:
            if e.blob_id in first:
                held.setdefault(e.blob_id, [first[e.blob_id]]).append((pid, e))
            else:
                first[e.blob_id] = (pid, e)
    todo: dict[bytes, list[PackEntry]] = {}
    for copies in held.values():
        for pid, e in copies:
            todo.setdefault(pid, []).append(e)
    verified = verify_copies(repo, todo)
    bad: dict[bytes, set[PackEntry]] = {}
    for copies in held.values():
        failing = [(pid, e) for pid, e in copies if not verified[(pid, e.offset)]]
        if len(failing) < len(copies):
            for pid, e in failing:
                bad.setdefault(pid, set()).add(e)
    return bad


def _damage_in_tree(tree: Iterable[Record], damaged: Callable[[Record], bool]) -> tuple[list[bytes], list[bytes]]:
    """Of a snapshot's resolved tree: the damaged files (a differential's own, and those it inherits from
    its chain), and the hard links whose target is one of them (left in, each would restore to nothing,
    and `verify-restore` would fail on it every time)."""
    gone: list[bytes] = []
    links: list[tuple[bytes, bytes]] = []
    for rec in tree:
        e = rec.entry
        if e is not None and e.type == T_HARDLINK:
            links.append((rec.path, e.target))
        elif damaged(rec):
            gone.append(rec.path)
    lost = set(gone)
    return gone, [path for path, target in links if target in lost]


def _resolve_packs(specs: list[str], known: Iterable[bytes], report: RepairReport) -> list[bytes]:
    """Pack ids from full ids, unique prefixes, or ``data/..`` keys.  One that names no pack at all, stored
    or indexed, is noted in ``report``: a repair killed after it deleted some or all of the packs it was
    given is run again as it was (``repair_packs`` says what is left to do when none is left)."""
    out = []
    gone = []
    for spec in specs:
        want = spec.rsplit("/", 1)[-1].lower()
        if len(want) < 4:
            raise UsageError(f"pack {spec!r}: give at least 4 hex digits of its id")
        found = [p for p in known if p.hex().startswith(want)]
        if len(found) > 1:
            raise UsageError(f"pack {spec!r}: matches {len(found)} packs")
        if found:
            out.append(found[0])
        else:
            gone.append(spec)
    report.unreadable_packs += [f"pack {spec!r}: no such pack, stored or indexed (a repair that was stopped "
                                "deleted it already?): left out" for spec in gone]
    return list(dict.fromkeys(out))


def repair_packs(repo: Repo, specs: list[str], *, dry_run: bool = True, wait: float = 3600.0) -> RepairReport:
    """Salvage the named packs (damaged, as `check --read-data` reports): every blob that still verifies is
    copied unchanged into a new pack, then one index replaces the old ones without the named packs, then
    those are deleted.  A pack already gone loses every blob it held.  A delta whose base is lost (with
    these packs or before) is lost too, and the packs that hold such deltas are salvaged the same way:
    indexed, a delta nothing can read would let a backup deduplicate against it, where without it the
    next backup of its data stores it again.  Killed at any point, every blob that could be read still
    is.  The files that needed a lost blob are then `repair snapshots`' to drop.
    """
    report = RepairReport(dry_run=dry_run)
    with RepoLock(repo.remote, EXCLUSIVE, "repair packs", wait=wait) as lock:
        names, packs, superseded = indexed_packs(repo)
        stored = repo.stored_packs()
        named = _resolve_packs(specs, packs.keys() | stored.keys(), report)
        # Unindexed packs may hold the bases of deltas this would drop as baseless; a repair stopped after it
        # deleted the named packs left those of deltas whose base they held so, for `repair index` to name.
        unlisted = {pid: size for pid, size in stored.items() if pid not in packs and pid not in named}
        if not named:
            _require_indexed(repo, unlisted, report)
            raise UsageError(f"pack {specs[0]!r}: no such pack, stored or indexed")
        unindexed = _unindexed_blobs(repo, unlisted, report)
        read: dict[bytes, tuple[PackSalvage, list[PackEntry], dict[PackEntry, bytes]]] = {}
        todo, why = named, {}
        while todo:
            for pid in todo:
                read[pid] = _read_intact(repo, pid, packs.get(pid), stored)
                if pid not in named and not read[pid][0].problem:
                    read[pid][0].problem = why[pid]
            # (an indexed pack that is not stored holds nothing: its blobs are no copies of these)
            readable = readable_ids([e for pid, entries in packs.items() if pid not in read and pid in stored
                                     for e in entries] + [e for _, _, intact in read.values() for e in intact])
            why = {pid: "holds deltas whose base is lost" for pid, entries in packs.items() if pid not in read
                   and any(e.kind == KIND_DELTA and e.base_id not in readable for e in entries)}
            # A blob found intact here that the index places in another pack counts as held there only if that
            # pack's own header says so: two packs' files swapped, each repaired alone, deleted the only copies.
            found_here = {e.blob_id for _, _, intact in read.values() for e in intact}
            for pid, entries in packs.items():
                if pid not in read and pid not in why and pid in stored and \
                        _header_disagrees(repo, pid, [e for e in entries if e.blob_id in found_here], stored[pid]):
                    why[pid] = "its header does not hold what the index places in it"
            todo = list(why)
        elsewhere = {e.blob_id for pid, entries in packs.items() if pid not in read and pid in stored
                     for e in entries}
        # A blob that verifies anywhere among these packs is kept, wherever it was meant to be: two packs'
        # files swapped hold each other's blobs, found through their own headers.
        pooled = {e.blob_id: (e, env) for _, _, intact in read.values() for e, env in intact.items()}
        # A pack no index lists is an obstacle only where it holds a blob found nowhere else: the salvage of a
        # repair killed before its index holds copies of what verifies here, and blocked the run again.
        held = sorted({pid for b, pid in unindexed.items() if b not in elsewhere and b not in pooled})
        if held:
            raise _index_first(held)
        salvage: list[PreparedBlob] = []
        for found, entries, intact in read.values():
            report.salvaged.append(found)
            listed = set(entries)
            # and what its own header lists beside them that verifies (a blob the index lost)
            for e in entries + [e for e in intact if e not in listed and e.blob_id not in elsewhere]:
                if e.blob_id in elsewhere:  # another pack holds it: nothing to copy, nothing lost
                    continue
                hit = pooled.get(e.blob_id)
                if hit is not None and (e.kind != KIND_DELTA or e.base_id in readable):
                    found.salvaged += 1
                    elsewhere.add(e.blob_id)  # once, if several of these packs hold it
                    kept, env = hit
                    salvage.append(PreparedBlob(kept.blob_id, kept.kind, env, kept.raw_length, kept.base_id))
                else:
                    found.lost.append(e.blob_id)
        if dry_run:
            return report
        new_index = IndexData({pid: entries for pid, entries in packs.items() if pid not in read})
        writes = RepackWrites()
        try:  # stopped short, the salvage is taken back: the damaged packs are all still there, as before
            new_index.packs.update(store_envelopes(repo, salvage, writes).packs)
            replace_index(repo, new_index, names, lock.ensure_held, superseded, writes)
        except BaseException:
            take_back(repo, writes, lock.ensure_held)
            raise
        for pid in read:
            if pid in stored:
                lock.ensure_held()
                repo.remote.delete(pack_key(pid))
        repo.load_index()
    return report


def _header_disagrees(repo: Repo, pid: bytes, claimed: list[PackEntry], size: int) -> bool:
    """Whether the stored pack's own header fails to hold ``claimed`` (its index entries), or does not read."""
    if not claimed:
        return False
    try:
        header = set(repo.pack_header(pack_key(pid), size))
    except NOT_DAMAGE:
        raise
    except (ChunkvaultError, ValueError):
        return True
    return not header.issuperset(claimed)


def _read_intact(repo: Repo, pid: bytes, entries: list[PackEntry] | None, stored: dict[bytes, int]
                 ) -> tuple[PackSalvage, list[PackEntry], dict[PackEntry, bytes]]:
    """A pack to salvage: what it holds (its index entries, else its own header) and the envelopes that still
    verify, where the index places them and where the file's own header does (the file may hold another
    pack's content: one whose header authenticates says where its blobs are).  A read the remote gave up on,
    or refused, stops the repair: that pack is not lost, and deleting it would lose it."""
    key = pack_key(pid)
    found = PackSalvage(key)
    own: list[PackEntry] = []
    try:
        if pid in stored:
            try:
                own = repo.pack_header(key, stored[pid])
            except NOT_DAMAGE:
                raise
            except (ChunkvaultError, ValueError):
                if entries is None:
                    raise
        if entries is None:  # in no index: its own header says what it holds
            entries = own
        data = repo.remote.get(key) if pid in stored else b""
    except NOT_DAMAGE:
        raise
    except (ChunkvaultError, ValueError) as exc:
        found.problem = str(exc)
        entries, data = entries or [], b""
    if pid not in stored:
        found.problem = "pack is missing"
    candidates = {e: data[e.offset : e.offset + e.length] for e in [*entries, *own]}
    return found, entries, {e: env for e, env in candidates.items() if copy_intact(repo, e, env)}


def _require_indexed(repo: Repo, unlisted: dict[bytes, int], report: RepairReport) -> None:
    """UsageError naming `repair index` when a stored pack no index lists (``unlisted``: id -> size) has a
    header that reads: what it holds counts as lost until then, and a repair would drop (or advise forgetting)
    what is only unindexed.  One whose header does not read is noted in ``report`` and left as it is."""
    unindexed = sorted(set(_unindexed_blobs(repo, unlisted, report).values()))
    if unindexed:
        raise _index_first(unindexed)


def _unindexed_blobs(repo: Repo, unlisted: dict[bytes, int], report: RepairReport) -> dict[bytes, bytes]:
    """Blob id -> pack id of what the stored packs no index lists (``unlisted``: id -> size) hold, by their
    headers.  One whose header does not read is noted in ``report`` and left as it is."""
    out: dict[bytes, bytes] = {}
    for pid in sorted(unlisted):
        try:
            entries = repo.pack_header(pack_key(pid), unlisted[pid])
        except NOT_DAMAGE:  # what it holds is unknown, not nothing
            raise
        except ChunkvaultError as exc:  # nothing in it can be found: no obstacle (name it to delete it)
            report.unreadable_packs.append(f"{pack_key(pid)}: in no index, and {exc}: left as it is")
            continue
        for e in entries:
            out.setdefault(e.blob_id, pid)
    return out


def _index_first(unindexed: list[bytes]) -> UsageError:
    return UsageError(f"{len(unindexed)} stored pack(s) are in no index ({pack_key(unindexed[0])}"
                      f"{', ...' if len(unindexed) > 1 else ''}): run `repair index` first, so that what "
                      "they hold counts as readable")


def repair_snapshots(repo: Repo, *, dry_run: bool = True, wait: float = 3600.0) -> RepairReport:
    """Drop the files whose data is gone; list the snapshots nothing can repair.

    A chunk is gone when it, or a base its delta chain needs, is not in the index or its pack is
    missing.  A snapshot whose manifest cannot be read is beyond repair, and so is every
    differential built on it (its chain needs that manifest): those are listed, to be forgotten.
    """
    report = RepairReport(dry_run=dry_run)
    with RepoLock(repo.remote, EXCLUSIVE, "repair snapshots", wait=wait) as lock:
        repo.load_index()
        index = repo.index
        stored = repo.stored_packs()
        # What the packs no index lists hold is an obstacle only where this repair would take it for lost: a
        # backup, forget or repair killed after it stored a pack and before its index left one that holds
        # nothing a snapshot names, and blocked every `repair snapshots` (its own run again too) until then.
        unindexed = _unindexed_blobs(repo, repo.unindexed_packs(stored), report)
        held_unindexed: set[bytes] = set()  # packs holding what a snapshot needs and the index lacks

        def gone(blob_id: bytes) -> bool:
            for b in (blob_id, *repo.delta_chain(blob_id)):
                loc = index.get(b)
                if loc is None or repo.pack_ids[loc.pack_no] not in stored:
                    if b in unindexed:
                        held_unindexed.add(unindexed[b])
                    return True
            return False

        def damaged(rec: Record) -> bool:
            e = rec.entry
            return e is not None and bool(e.chunks) and any(gone(c) for c in e.chunk_ids())

        snapshots = repo.reload_snapshots()  # what a forget's rebase wrote before the lock is read anew
        report.unrestorable += [(name, f"the snapshot itself is unreadable ({exc.object_name}: {exc.reason})")
                                for name, exc in repo.unreadable_snapshots.items() if not isinstance(exc, NewerObject)]
        report.newer += [name for name, exc in repo.unreadable_snapshots.items() if isinstance(exc, NewerObject)]
        unreadable: dict[str, str] = {}
        damaged_paths: dict[str, list[bytes]] = {}
        for snap in snapshots:
            try:
                paths = [rec.path for rec in repo.manifest_records(snap) if damaged(rec)]
            except CorruptObject as exc:
                # its manifest, not a file's data: what `repair snapshots` drops cannot mend it (the reason of
                # a blob not indexed names this very command)
                reason = exc.reason.replace(NOT_INDEXED, "not in the index")
                unreadable[snap.id] = f"manifest {exc.object_name}: {reason}"
                continue
            if paths:
                damaged_paths[snap.id] = paths
        held_unindexed.update(unindexed[b] for snap in snapshots if snap.id in unreadable
                              for b in map(bytes.fromhex, snap.manifest) if b in unindexed)
        if held_unindexed:
            raise _index_first(sorted(held_unindexed))
        chain_of = repo.chains(snapshots)
        # Every tree is read before any manifest is rewritten: a differential's files lost with its parent's
        # (inherited, not in its own manifest) are named too, and the same with --confirm as without.
        plans: list[tuple[Snapshot, list[bytes], list[bytes], list[bytes]]] = []
        for snap in snapshots:
            reason = unreadable.get(snap.id)
            if reason is None:
                try:
                    below = [m.id for m in chain_of(snap) if m.id in unreadable]
                    if below:
                        reason = f"it is a differential on {below[0][:8]}, whose manifest is unreadable"
                except ChunkvaultError as exc:
                    reason = str(exc)
            if reason is not None:
                report.unrestorable.append((snap.id, reason))
                continue
            paths = damaged_paths.get(snap.id, [])
            lost, links = _damage_in_tree(repo.tree(snap, snapshots), damaged) if damaged_paths else ([], [])
            own = set(paths)
            report.dropped += [(snap.id, path.decode("utf-8", "backslashreplace"))
                               for path in paths + [p for p in lost if p not in own] + links]
            plans.append((snap, paths, links, lost))
        if dry_run:
            return report
        for snap, paths, links, _ in plans:
            if not (paths or links):
                continue
            dropped = set(links)
            records: list[Record] = []
            for rec in repo.manifest_records(snap):
                if not (damaged(rec) or rec.path in dropped):
                    records.append(rec)
                elif snap.kind != KIND_FULL:  # the parent's version of the file must not show through
                    records.append(delete_record(rec.path))
                dropped.discard(rec.path)
            if snap.kind != KIND_FULL:  # links the parent holds, to a file this differential loses
                records = sorted(records + [delete_record(p) for p in dropped], key=lambda r: sort_key(r.path))
            ids, mw = store_manifest(repo, records, lock.ensure_held)
            snap.manifest = [i.hex() for i in ids]
            snap.manifest_starts = mw.starts
            snap.version = mw.version
            snap.stats = {**snap.stats, "repaired": True, "manifest_records": mw.records}
            report.rewritten.append(snap.id)
        # Saved once every manifest is rewritten, with the counts of the trees as they resolve now: a
        # differential that only inherits lost files loses them from its counts too.
        for snap, paths, links, lost in plans:
            if paths or links or lost:
                save_counts(repo, snap, count_tree(repo, snap, snapshots), lock)
    return report
