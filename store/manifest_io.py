"""Writing a manifest's record stream as content-defined blobs.

Cutting the stream with the repository's chunker makes consecutive manifests
of a slowly changing tree share most of their blobs, and no manifest is ever
held whole in memory.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable

from .manifest import Record, record_parts
from .snapshot import SNAPSHOT_VERSION

if TYPE_CHECKING:
    from .repository import BlobWriter, Repo


class ManifestWriter:
    def __init__(self, repo: "Repo", writer: "BlobWriter"):
        self.repo = repo
        self.writer = writer
        self.buf = bytearray()
        self.ids: list[bytes] = []
        # Per blob, the offset of the first record that begins in it (-1: none), for seeking.
        self.starts: list[int] = []
        self._buf_offset = 0  # stream offset of buf[0]
        self._record_starts: deque[int] = deque()  # stream offsets of the records still in buf
        self.stored_bytes = 0  # envelopes of the new blobs it stored
        self.new_blobs = self.new_raw_bytes = 0  # those blobs and their plaintext: not the backup's new data
        self.records = 0
        self.version = 1  # the snapshot version its records need (SNAPSHOT_VERSION once one has xattrs)
        self._flush_at = 2 * repo.chunker_params.max_size

    def add(self, rec: Record) -> None:
        self._record_starts.append(self._buf_offset + len(self.buf))
        for part in record_parts(rec):
            self.buf += part
        self.records += 1
        if rec.entry is not None and rec.entry.xattrs:
            self.version = SNAPSHOT_VERSION
        if len(self.buf) >= self._flush_at:
            self._emit(final=False)

    def _store(self, piece: bytes) -> None:
        bid = self.repo.blob_id(piece)
        self.ids.append(bid)
        if self.writer.claim(bid):
            blob = self.repo.prepare_blob(bid, piece)
            self.stored_bytes += len(blob.envelope)
            self.new_blobs += 1
            self.new_raw_bytes += len(piece)
            self.writer.store(blob)

    def _emit(self, final: bool) -> None:
        cuts = self.repo.chunker.cut_points(self.buf)
        # The last cut of a non-final buffer is only where the buffer ends: keep that tail.
        usable = cuts if final else cuts[:-1]
        start = 0
        view = memoryview(self.buf)
        starts = self._record_starts
        for end in usable:
            lo, hi = self._buf_offset + start, self._buf_offset + end
            self.starts.append(starts[0] - lo if starts and starts[0] < hi else -1)
            while starts and starts[0] < hi:
                starts.popleft()
            self._store(bytes(view[start:end]))
            start = end
        view.release()
        del self.buf[:start]
        self._buf_offset += start

    def finish(self) -> list[bytes]:
        if self.buf:
            self._emit(final=True)
        return self.ids


def store_manifest(repo: "Repo", records: Iterable[Record], ensure_held: Callable[[], None] = lambda: None,
                   writer: "BlobWriter | None" = None) -> tuple[list[bytes], "ManifestWriter"]:
    """Write a record stream as manifest blobs, durably: (blob ids, the writer with its counts).
    ``ensure_held`` guards each index object (``BlobWriter.guard``): a command paused past its lock's
    staleness must not index packs a prune may have deleted meanwhile.  ``writer``: one the caller keeps
    for several manifests (guarded by the caller), flushed here: a writer that finds a blob stored already
    lists every pack once, to see that the one it refers to is still there."""
    if writer is None:
        with repo.writer() as writer:
            writer.guard = ensure_held
            return store_manifest(repo, records, writer=writer)
    ids, mw = write_manifest(repo, writer, records)
    writer.flush()
    return ids, mw


def write_manifest(repo: "Repo", writer: "BlobWriter", records: Iterable[Record]
                   ) -> tuple[list[bytes], "ManifestWriter"]:
    """A record stream handed to ``writer`` as manifest blobs, not flushed (the caller indexes them: at once in
    ``store_manifest``, with other snapshots' in ``SavesAfterIndex``): (blob ids, the writer with its counts)."""
    mw = ManifestWriter(repo, writer)
    for rec in records:
        mw.add(rec)
    return mw.finish(), mw
