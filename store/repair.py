"""Repairs: rebuild the index from pack headers; drop files whose data is gone.

Both work from what is still readable and never delete data: ``index``
supersedes the old index objects with one built from every readable pack
header; ``snapshots`` rewrites (same ids) only the snapshots that reference
missing blobs, replacing each damaged file by a deletion, and lists them,
with the snapshots no rewrite can save (a manifest unreadable, or a
differential whose chain needs one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from chunkvault.errors import ChunkvaultError, CorruptObject

from .indexfile import IndexData
from .locks import EXCLUSIVE, RepoLock
from .manifest import Record, delete_record
from .manifest_io import store_manifest
from .pack import TRAILER, open_header, parse_trailer
from .repository import Repo
from .snapshot import KIND_FULL


@dataclass
class RepairReport:
    packs: int = 0
    blobs: int = 0
    unreadable_packs: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, path)
    rewritten: list[str] = field(default_factory=list)
    unrestorable: list[tuple[str, str]] = field(default_factory=list)  # (snapshot id, why): forget them

    def to_dict(self) -> dict:
        return {"packs": self.packs, "blobs": self.blobs, "unreadable_packs": self.unreadable_packs,
                "dropped": [{"snapshot": s, "path": p} for s, p in self.dropped], "rewritten": self.rewritten,
                "unrestorable": [{"snapshot": s, "reason": r} for s, r in self.unrestorable]}


def repair_index(repo: Repo, *, wait: float = 0.0) -> RepairReport:
    report = RepairReport()
    with RepoLock(repo.remote, EXCLUSIVE, "repair index", wait=wait):
        old = repo.index_names()
        index = IndexData()
        for o in repo.remote.list("data/"):
            try:
                pid = bytes.fromhex(o.key.rsplit("/", 1)[1])
                tail = repo.remote.get(o.key, o.size - TRAILER.size, TRAILER.size)
                hlen = parse_trailer(tail, o.size, o.key)
                body = o.size - TRAILER.size - hlen
                index.packs[pid] = open_header(repo.sealer, repo.remote.get(o.key, body, hlen), o.key, body)
            except (ChunkvaultError, ValueError) as exc:
                report.unreadable_packs.append(f"{o.key}: {exc}")
                continue
            report.packs += 1
            report.blobs += len(index.packs[pid])
        index.supersedes = [bytes.fromhex(n) for n in old]
        repo.write_index(index)
        for name in old:
            repo.remote.delete(f"index/{name}")
        repo.load_index()
    return report


def repair_snapshots(repo: Repo, *, dry_run: bool = True, wait: float = 3600.0) -> RepairReport:
    """Drop the files whose data is gone; list the snapshots nothing can repair.

    A chunk is gone when it, or a base its delta chain needs, is not in the index or its pack is
    missing.  A snapshot whose manifest cannot be read is beyond repair, and so is every
    differential built on it (its chain needs that manifest): those are listed, to be forgotten.
    """
    report = RepairReport()
    with RepoLock(repo.remote, EXCLUSIVE, "repair snapshots", wait=wait):
        repo.load_index()
        index = repo.index
        stored = set()
        for o in repo.remote.list("data/"):
            try:
                stored.add(bytes.fromhex(o.key.rsplit("/", 1)[1]))
            except ValueError:
                continue

        def gone(blob_id: bytes) -> bool:
            for b in (blob_id, *repo.delta_chain(blob_id)):
                loc = index.get(b)
                if loc is None or repo.pack_ids[loc.pack_no] not in stored:
                    return True
            return False

        def damaged(rec: Record) -> bool:
            e = rec.entry
            return e is not None and bool(e.chunks) and any(gone(c) for c in e.chunk_ids())

        snapshots = repo.snapshots()
        unreadable: dict[str, str] = {}
        damaged_paths: dict[str, list[bytes]] = {}
        for snap in snapshots:
            try:
                paths = [rec.path for rec in repo.manifest_records(snap) if damaged(rec)]
            except CorruptObject as exc:
                unreadable[snap.id] = f"{exc.object_name}: {exc.reason}"
                continue
            if paths:
                damaged_paths[snap.id] = paths
        for snap in snapshots:
            reason = unreadable.get(snap.id)
            if reason is None:
                try:
                    below = [m.id for m in repo.chain_of(snap, snapshots) if m.id in unreadable]
                    if below:
                        reason = f"it is a differential on {below[0][:8]}, whose manifest is unreadable"
                except ChunkvaultError as exc:
                    reason = str(exc)
            if reason is not None:
                report.unrestorable.append((snap.id, reason))
                continue
            paths = damaged_paths.get(snap.id, [])
            report.dropped += [(snap.id, path.decode("utf-8", "backslashreplace")) for path in paths]
            if not paths or dry_run:
                continue
            records: list[Record] = []
            for rec in repo.manifest_records(snap):
                if not damaged(rec):
                    records.append(rec)
                elif snap.kind != KIND_FULL:  # the parent's version of the file must not show through
                    records.append(delete_record(rec.path))
            ids, mw = store_manifest(repo, records)
            snap.manifest = [i.hex() for i in ids]
            snap.manifest_starts = mw.starts
            snap.stats = {**snap.stats, "repaired": True, "manifest_records": mw.records}
            repo.save_snapshot(snap, replace=True)
            report.rewritten.append(snap.id)
    return report
