"""Repairs: rebuild the index from pack headers; drop files whose data is gone.

Both work from what is still readable and never delete data: ``index``
supersedes the old index objects with one built from every readable pack
header; ``snapshots`` rewrites (same ids) only the snapshots that reference
missing blobs, replacing each damaged file by a deletion, and lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from chunkvault.errors import ChunkvaultError

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

    def to_dict(self) -> dict:
        return {"packs": self.packs, "blobs": self.blobs, "unreadable_packs": self.unreadable_packs,
                "dropped": [{"snapshot": s, "path": p} for s, p in self.dropped], "rewritten": self.rewritten}


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
            loc = index.get(blob_id)
            return loc is None or repo.pack_ids[loc.pack_no] not in stored

        for snap in repo.snapshots():
            if any(gone(bytes.fromhex(h)) for h in snap.manifest):
                report.unreadable_packs.append(f"snapshot {snap.id}: its manifest is damaged; forget it")
                continue
            records: list[Record] = []
            damaged = False
            for rec in repo.manifest_records(snap):
                e = rec.entry
                if e is not None and e.chunks and any(gone(c) for c in e.chunk_ids()):
                    damaged = True
                    report.dropped.append((snap.id, rec.path.decode("utf-8", "backslashreplace")))
                    if snap.kind != KIND_FULL:
                        records.append(delete_record(rec.path))
                    continue
                records.append(rec)
            if not damaged or dry_run:
                continue
            ids, mw = store_manifest(repo, records)
            snap.manifest = [i.hex() for i in ids]
            snap.manifest_starts = mw.starts
            snap.stats = {**snap.stats, "repaired": True, "manifest_records": mw.records}
            repo.save_snapshot(snap, replace=True)
            report.rewritten.append(snap.id)
    return report


__all__ = ["RepairReport", "repair_index", "repair_snapshots"]
