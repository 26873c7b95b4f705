"""What a repository holds, from its snapshot objects, its index and its pack listing (no manifest read)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from .blob import KIND_DELTA
from .blobindex import BlobLocation
from .chronology import chronological_key
from .snapshot import KIND_FULL, Snapshot
from .walarchive import WalFile


@dataclass
class RepositoryStats:
    snapshots: int = 0
    full_snapshots: int = 0
    sources: int = 0  # host and paths (or stdin name) pairs
    newest_bytes: int = 0  # the files of each source's newest snapshot
    all_bytes: int = 0  # the files of every snapshot, each counted in every snapshot holding it
    blobs: int = 0  # the distinct chunks of files (and blobs no snapshot uses any more, until a prune)
    blob_raw_bytes: int = 0  # their plaintext
    blob_stored_bytes: int = 0  # their envelopes: compressed, or delta-encoded, and sealed
    delta_blobs: int = 0
    delta_raw_bytes: int = 0
    delta_stored_bytes: int = 0
    manifest_blobs: int = 0  # the snapshots' lists of entries
    manifest_stored_bytes: int = 0
    packs: int = 0
    pack_bytes: int = 0
    wal_files: int = 0  # the archived WAL (archive-push), apart: it is no snapshot's, and outweighs them
    wal_bytes: int = 0  # its files' sizes
    wal_blobs: int = 0  # the distinct chunks only the WAL archive names (one a snapshot's file shares too: those)
    wal_raw_bytes: int = 0
    wal_stored_bytes: int = 0

    @property
    def dedup_ratio(self) -> float:
        """The files of every snapshot against the distinct chunks they are made of."""
        return self.all_bytes / self.blob_raw_bytes if self.blob_raw_bytes else 0.0

    @property
    def compression_ratio(self) -> float:
        """The distinct chunks' plaintext against what their blobs take (compression and deltas)."""
        return self.blob_raw_bytes / self.blob_stored_bytes if self.blob_stored_bytes else 0.0

    @property
    def overall_ratio(self) -> float:
        """The files of every snapshot against the packs holding them (less the archived WAL's blobs)."""
        packed = self.pack_bytes - self.wal_stored_bytes
        return self.all_bytes / packed if packed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dedup_ratio": round(self.dedup_ratio, 3),
                "compression_ratio": round(self.compression_ratio, 3), "overall_ratio": round(self.overall_ratio, 3)}


def summarize(snapshots: Iterable[Snapshot], blobs: Iterable[tuple[bytes, BlobLocation]],
              pack_sizes: Iterable[int], wal: Iterable[WalFile] = ()) -> RepositoryStats:
    """``blobs``: the index's (id, location) pairs; ``pack_sizes``: the stored packs' sizes; ``wal``: the
    archived WAL files.  A blob a snapshot names as part of its manifest counts as a manifest's, one an
    archived file names as the WAL's (a snapshot's ``pg_wal/`` copy of it deduplicated there too: no
    manifest is read to tell), every other as a file chunk."""
    out = RepositoryStats()
    wal_ids: set[bytes] = set()
    for w in wal:
        out.wal_files += 1
        out.wal_bytes += w.size
        wal_ids.update(w.blob_ids())
    newest: dict[tuple, Snapshot] = {}
    snapshots = list(snapshots)
    manifest_ids = {bytes.fromhex(h) for s in snapshots for h in s.manifest}
    later = chronological_key(snapshots)
    for s in snapshots:
        out.snapshots += 1
        out.full_snapshots += s.kind == KIND_FULL
        out.all_bytes += s.stats.get("bytes", 0)
        key = (s.host, tuple(sorted(s.paths)), s.stdin_name)
        if key not in newest or later(s) > later(newest[key]):
            newest[key] = s
    out.sources = len(newest)
    out.newest_bytes = sum(s.stats.get("bytes", 0) for s in newest.values())
    for blob_id, loc in blobs:
        if blob_id in manifest_ids:
            out.manifest_blobs += 1
            out.manifest_stored_bytes += loc.length
            continue
        if blob_id in wal_ids:
            out.wal_blobs += 1
            out.wal_raw_bytes += loc.raw_length
            out.wal_stored_bytes += loc.length
            continue
        out.blobs += 1
        out.blob_raw_bytes += loc.raw_length
        out.blob_stored_bytes += loc.length
        if loc.flags == KIND_DELTA:
            out.delta_blobs += 1
            out.delta_raw_bytes += loc.raw_length
            out.delta_stored_bytes += loc.length
    for size in pack_sizes:
        out.packs += 1
        out.pack_bytes += size
    return out
