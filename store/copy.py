"""Copying snapshots to another repository (off-site), chains intact.

Only chunks the destination lacks are sent.  Blob ids are keyed per
repository, so every copied chunk is read from the source (verified against
its source id), re-hashed with the destination's key, and stored there; a
delta stays a delta, against the nearest blob below it in its source chain
that the destination holds (within the depth bound), else it is stored
whole.  A copy interrupted and run again skips snapshots already copied
(each records its source id) and blobs already stored, so nothing is sent
twice.
"""
from __future__ import annotations

import contextlib
import threading
import time
from array import array
from concurrent.futures import Future, ThreadPoolExecutor

import blake3
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Callable, Iterable, Iterator

from chunkvault.errors import CorruptObject, NewerObject, ObjectExists
from chunkvault.remotes.layer import parallel_map

from .locks import COPY_INTO, SHARED, RepoLock

from .manifest import Record
from .manifest_io import ManifestWriter
from .blob import Plaintext
from .blobindex import ID_SIZE, BlobIndex, IdMap
from .repository import BlobWriter, Repo, SavesAfterIndex, new_snapshot_id
from .chronology import chronological_key
from .config import FORMAT_WAL
from . import walarchive
from .snapshot import KIND_DIFF, KIND_FULL, Snapshot
from .walarchive import WalFile

COPIED_FROM = "copied_from"
#: How a ``wal_failed`` reason starts when the destination has other content under the name (not damage).
CONFLICT_THERE = "the destination archived other content under this name"
IMPORTED_FROM = "imported_from"


def origins(snap: Snapshot) -> set[str]:
    """The ids a snapshot is known by: its own, and the one it was first copied or imported from.  Two snapshots
    that share one hold the same tree: a repository seeded by `export`/`import` and then kept by `copy`
    must not receive the seeded snapshot a second time."""
    return {i for i in (snap.id, snap.stats.get(COPIED_FROM), snap.stats.get(IMPORTED_FROM)) if i}


@dataclass
class CopyResult:
    copied: list[tuple[str, str]] = field(default_factory=list)  # (source id, destination id)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (source id, why): damaged in the source
    # Skipped, but the destination's copy has another host (one side renamed by `rewrite --new-host` since):
    # (source id, destination id, the destination's host).  Not renamed here: that takes the destination's
    # exclusive lock, and its owner's say.
    other_host: list[tuple[str, str, str]] = field(default_factory=list)
    blobs_sent: int = 0
    bytes_sent: int = 0
    # ``wal``: the archived WAL files copied, those the destination had, and those not copied (name, why).
    wal_copied: list[str] = field(default_factory=list)
    wal_skipped: int = 0
    wal_failed: list[tuple[str, str]] = field(default_factory=list)
    # Those the destination lacks but none of its base backups can use (before the oldest one's start).
    wal_unneeded: int = 0


def copy_order(snapshots: Iterable[Snapshot], wanted: set[str], held: AbstractSet[str] = frozenset()) -> list[Snapshot]:
    """Pure: the wanted snapshots plus every ancestor they need (that is there), oldest first but every
    parent before its children (``backup --time --parent`` may date a differential before its parent).
    ``held``: snapshots the destination has a copy of; the walk down a chain stops at one, since its
    children build on that copy (a rebased one too: a rebase keeps what it restores), so the ancestors
    below it that the destination's retention forgot are not sent again."""
    by_id = {s.id: s for s in snapshots}
    need: set[str] = set()
    for sid in wanted:
        cur: str | None = sid
        while cur is not None and cur in by_id and cur not in need:
            need.add(cur)
            cur = by_id[cur].parent if cur not in held else None
    out: list[Snapshot] = []
    placed: set[str] = set()
    for snap in sorted((by_id[i] for i in need), key=chronological_key(by_id.values())):
        line: list[Snapshot] = []  # snap and its ancestors not placed yet, newest first
        cur: Snapshot | None = snap
        while cur is not None and cur.id not in placed:
            line.append(cur)
            placed.add(cur.id)
            cur = by_id.get(cur.parent) if cur.parent in need else None
        out += reversed(line)
    return out


class _AtDestination(Exception):
    """An integrity error the destination raised while this copy stored there (a pack its index lists that is
    gone, a blob found damaged there), carried past the handling of a snapshot damaged in the source: it is
    no damage of that snapshot, and each one after it would meet it too."""

    def __init__(self, error: CorruptObject):
        super().__init__(str(error))
        self.error = error


class _Storing:
    """Around what stores in (and deduplicates against) the destination: its integrity errors as _AtDestination.
    A plain context manager, not a generator's: it surrounds each manifest record a copy writes."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, CorruptObject):
            raise _AtDestination(exc) from None
        return False


_STORING = _Storing()


#: Plaintext one worker reads with one call: the blobs in pack order, so that neighbours come with one ranged
#: get (one request per blob cost a copy from S3 a request per chunk).  And at most so many blobs: 4 MiB of
#: chunks of 256 bytes was 16,000, and the eight batches in flight held 128,000 plaintexts and ids.
BATCH_RAW_BYTES = 4 << 20
BATCH_BLOBS = 2048
COPY_WORKERS = 4
#: Plaintext of the next snapshot's chunks read ahead into the source's blob cache at most, and blobs: a
#: quarter of each of the cache's bounds (``repository.CACHE_BYTES``, ``CACHE_BLOBS``).
READ_AHEAD_BYTES = 64 << 20
READ_AHEAD_BLOBS = 1 << 14
#: Distinct chunk ids of a snapshot that a copy orders and sends at a time: the ids not copied yet of a whole
#: snapshot, with their order and rounds, took ~200 bytes a chunk held while it was copied (a snapshot of a
#: million new chunks: 200 MB).
WINDOW_BLOBS = 1 << 16
#: Seconds between two notes of the snapshots copied to the client's ledger (``Repo.saves_noted_together``):
#: noted one by one, each rewrote the whole ledger; left to the end, a copy cut short would note none.
NOTE_SAVES_EVERY = 10.0


class _BlobMapper:
    """Source blob id -> destination blob id, copying the blob when the destination lacks it.  The map is held
    to the copy's end, an entry for each chunk copied: an ``IdMap`` (~90 bytes an entry, where a dict took ~170:
    1.7 GB for a repository of ten million chunks).  Nothing else is held per chunk: a snapshot's chunks are
    taken a window at a time (``WINDOW_BLOBS``), and the deltas put off till their bases are copied are held
    as packed ids."""

    def __init__(self, src: Repo, dst: Repo, writer: BlobWriter, progress: Callable[[int, int], None] | None):
        self.src, self.dst, self.writer = src, dst, writer
        self.progress = progress
        self.map = IdMap()
        self.sent = 0
        self.sent_bytes = 0
        self._counting = threading.Lock()  # the workers count what they send
        self._ahead = ThreadPoolExecutor(1)
        self._reading: Future[None] | None = None
        self._read_ahead_of: str | None = None

    def read_ahead(self, snap: Snapshot | None) -> None:
        """Read ``snap``'s manifest, and the chunks it holds that are not copied yet (with the bases their
        deltas may be stored against), into the source's blob cache on a thread of their own: started while
        the snapshot before is written to the destination (its data, index and snapshot, the lock confirmed
        around each), these reads no longer wait for those writes, nor they for these; one after the other,
        each differential of a chain waited out some ten round trips in a row.  ``ensure`` waits for it."""
        if snap is None or self._read_ahead_of == snap.id:
            return
        self.wait_ahead()
        self._read_ahead_of = snap.id
        self._reading = self._ahead.submit(self._read, snap)

    def wait_ahead(self) -> None:
        """Until the read ahead is done.  Damage it met is left to the reads in order, which name whose it is;
        any other failure (the source out of reach after its retries, a stop) is raised: read again, it would
        wait out the retry time a second time."""
        reading, self._reading = self._reading, None
        if reading is not None and not isinstance(exc := reading.exception(), (CorruptObject, type(None))):
            raise exc

    def close(self) -> None:
        """Once the read ahead is done: the error that stopped the copy, if any, is the one that counts."""
        with contextlib.suppress(Exception):
            self.wait_ahead()
        self._ahead.shutdown(wait=True)

    def _read(self, snap: Snapshot) -> None:
        """The first of ``snap``'s manifest blobs and of its chunks not copied yet, within READ_AHEAD_BYTES and
        READ_AHEAD_BLOBS each: more would push the first out of the cache before the copy reads them.  The ids
        are taken from the manifest as it is read: all of them at once held ~110 bytes a chunk, beside those
        of the snapshot being copied."""
        src = self.src
        manifest: list[bytes] = []
        size = 0
        for h in snap.manifest[:READ_AHEAD_BLOBS]:
            manifest.append(bytes.fromhex(h))
            loc = src.locate(manifest[-1])
            size += loc.raw_length if loc is not None else 0
            if size >= READ_AHEAD_BYTES:
                break
        for _ in parallel_map(lambda batch: src.read_blobs(batch, cache=True), self._batches(manifest),
                              workers=COPY_WORKERS):
            pass  # read twice by the copy (its chunks, then its records): once off the storage
        wanted: dict[bytes, None] = {}
        size = 0
        for sid in _chunk_ids(src.manifest_records(snap, batched=True)):
            if sid in wanted or sid in self.map:
                continue
            for bid in (sid, *src.delta_chain(sid)[:1]):
                loc = src.locate(bid)
                wanted[bid] = None
                size += loc.raw_length if loc is not None else 0
            if size >= READ_AHEAD_BYTES or len(wanted) >= READ_AHEAD_BLOBS:
                break
        for _ in parallel_map(lambda batch: src.read_blobs(batch, cache=True), self._batches(list(wanted)),
                              workers=COPY_WORKERS):
            pass

    def _batches(self, ids: list[bytes]) -> Iterator[list[bytes]]:
        """``ids`` in the order their blobs lie in the source's packs, in runs of about BATCH_RAW_BYTES (and at
        most BATCH_BLOBS).  Each is sorted as one int (pack, offset, its place in ``ids``): as tuples, a
        snapshot of a million chunks new to the destination held 200 MB of them while its chunks were copied."""
        keys: list[int] = []
        raws = array("Q")
        for n, sid in enumerate(ids):
            loc = self.src.locate(sid)
            keys.append(n if loc is None else (loc.pack_no + 1) << 64 | loc.offset << 32 | n)  # (unindexed first)
            raws.append(loc.raw_length if loc is not None else 0)
        keys.sort()
        batch: list[bytes] = []
        size = 0
        for key in keys:
            n = key & 0xFFFFFFFF
            batch.append(ids[n])
            size += raws[n]
            if size >= BATCH_RAW_BYTES or len(batch) >= BATCH_BLOBS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _copy_batch(self, batch: list[bytes]) -> list[tuple[bytes, bytes]]:
        """Read a run of blobs, with the bases their deltas may be stored against here, in one call; store
        those the destination lacks."""
        bases = {chain[0] for sid in batch if (chain := self.src.delta_chain(sid))}.difference(batch)
        wanted = batch + sorted(bases)
        known = dict(zip(wanted, self.src.read_blobs(wanted)))
        self.src.uncache(batch)  # read ahead (``read_ahead``), and copied now: the map answers for them next
        done: dict[bytes, bytes] = {}
        for sid in batch:
            data = known[sid]
            self.src.check_id(sid, data)
            did = self.dst.blob_id(data)
            with _STORING:
                claimed = self.writer.claim(did)
            if claimed:
                base_id, base_plain = self._base_at_destination(sid, known, done)
                blob = self.dst.prepare_blob(did, data, base_id=base_id, base_plain=base_plain)
                with _STORING:
                    self.writer.store(blob)
                with self._counting:
                    self.sent += 1
                    self.sent_bytes += len(blob.envelope)
            done[sid] = did
        return list(done.items())

    def _base_at_destination(self, sid: bytes, known: dict[bytes, Plaintext], done: dict[bytes, bytes]
                             ) -> tuple[bytes | None, Plaintext | None]:
        """(destination id, plaintext) of the nearest blob below ``sid`` in its source chain that the
        destination already holds with room for one more delta; (None, None) stores the blob whole.
        ``known``: plaintexts read already; ``done``: this batch's blobs copied so far."""
        for n, base in enumerate(self.src.delta_chain(sid)):
            did = self.map.get(base) or done.get(base)
            plain = known.get(base)
            if did is None and n == 0:  # e.g. copied by an earlier, interrupted run
                if plain is None:
                    plain = self.src.read_blob(base)
                did = self.dst.blob_id(plain)
                if self.dst.locate(did) is None:
                    continue
            if did is not None and self.dst.delta_depth(did) < self.dst.max_delta_depth:
                return did, plain if plain is not None else self.src.read_blob(base)
        return None, None

    def ensure(self, ids: Iterable[bytes]) -> None:
        """Copy what the destination lacks.  Snapshots come parents first, so a chunk's base (the
        parent version's chunk) is usually there already and its delta stays a delta.  A delta whose chain
        holds a blob not copied yet waits (a snapshot holding a file and an old copy of it: in pack order the
        base may come later, and the delta was stored whole); it is copied in a later round, once each blob
        below it that this copy sends is there, a round for each delta level."""
        self.wait_ahead()  # what it read is in the cache; and the map is not to change under it
        later = bytearray()
        self._send(self._windows(ids, later, None))
        for _ in range(self.src.max_delta_depth + 1):
            if not later:
                return
            waiting, later = later, bytearray()
            pending = BlobIndex(len(waiting) // ID_SIZE)  # the deltas of this round, to tell their bases by
            pending.add_many(waiting, 0, 0, 0, 0)
            self._send(self._windows(_split(waiting), later, pending))
        self._send(self._windows(_split(later), None, None))  # (past the depth bound: none is left)

    def _windows(self, ids: Iterable[bytes], later: bytearray | None, pending: BlobIndex | None
                 ) -> Iterator[list[bytes]]:
        """``ids`` not copied yet, each once, WINDOW_BLOBS at a time.  A delta with a blob in its chain that is
        not copied yet (and, given ``pending``, is to be sent in this round) is put on ``later`` instead.  The
        window before is left out too: its last batches may still be in flight, not in the map yet."""
        before: dict[bytes, None] = {}
        window: dict[bytes, None] = {}
        for i in ids:
            if i in window or i in before or i in self.map:
                continue
            if later is not None and any(b not in self.map and (pending is None or b in pending)
                                         for b in self.src.delta_chain(i)):
                later += i
                continue
            window[i] = None
            if len(window) >= WINDOW_BLOBS:
                yield list(window)
                before, window = window, {}
        if window:
            yield list(window)

    def _send(self, windows: Iterator[list[bytes]]) -> None:
        """Copy each window's blobs in batches, the map told of each batch as it is done."""
        batches = (batch for window in windows for batch in self._batches(window))
        for pairs in parallel_map(self._copy_batch, batches, workers=COPY_WORKERS):
            self.map.update(pairs)
            if self.progress is not None:
                self.progress(self.sent, self.sent_bytes)


def _split(packed: bytes | bytearray) -> Iterator[bytes]:
    """The ids packed in ``packed``, one by one."""
    return (bytes(packed[at:at + ID_SIZE]) for at in range(0, len(packed), ID_SIZE))


def _chunk_ids(records: Iterable[Record]) -> Iterator[bytes]:
    for rec in records:
        if rec.entry is not None and rec.entry.chunks:
            yield from rec.entry.chunk_ids()


def _mapped(rec: Record, ids: IdMap) -> Record:
    """``rec`` naming its chunks by the destination's ids, looked up in one native call (a million chunks:
    32 MB of ids, and nothing besides).  Nothing of the source's record is kept past the call."""
    e = rec.entry
    assert e is not None
    return Record(rec.op, rec.path, replace(e, chunks=ids.lookup(e.chunks)))


def _copy_manifest(dst: Repo, writer: BlobWriter, mapper: _BlobMapper,
                   records: Callable[[], Iterable[Record]], then: Callable[[], None] = lambda: None
                   ) -> tuple[list[bytes], ManifestWriter]:
    """The chunks and manifest of ``records()`` (read twice) handed to the destination's writer (not flushed:
    the snapshot is saved once they are indexed, ``SavesAfterIndex``); the manifest's blob ids and writer.
    ``then`` is called once the chunks are sent (to read the next snapshot ahead while this one is written)."""
    mapper.ensure(_chunk_ids(records()))
    then()
    mw = ManifestWriter(dst, writer)
    for rec in records():
        if rec.entry is not None and rec.entry.chunks:
            rec = _mapped(rec, mapper.map)  # the source's record let go before the writer encodes this one
        with _STORING:
            mw.add(rec)
    with _STORING:
        manifest = mw.finish()
    return manifest, mw


def _flushed(writer: BlobWriter) -> None:
    with _STORING:
        writer.flush()


def _same_tree(source: Snapshot, copied: Snapshot) -> bool:
    """Whether a snapshot copied earlier still has its source's tree, as far as their objects tell: a
    rewrite or a repair of either since changed the counts or left its mark."""
    return all(source.stats.get(k) == copied.stats.get(k) for k in ("files", "dirs", "bytes", "rewritten", "repaired"))


def copy_snapshots(src: Repo, dst: Repo, spec_ids: list[str] | None = None,
                   progress: Callable[[int, int], None] | None = None, wait: float = 3600.0,
                   wal: bool = False, unneeded_wal: Callable[[list[str]], set[str]] | None = None) -> CopyResult:
    """Copy snapshots with their chains; ``progress(blobs sent, bytes sent)`` as it goes.  ``wal``: the
    archived WAL files the destination lacks too (``_send_wal``), but those of the names given to
    ``unneeded_wal`` that it returns (called once the snapshots are there).  The destination's own damage
    ends the copy, named as the destination's: the commands it names are to be run there."""
    try:
        return _copy_snapshots(src, dst, spec_ids, progress, wait, wal, unneeded_wal)
    except _AtDestination as exc:
        raise _as_destinations(exc.error, dst.remote.display_url) from None


#: The remedies a writer's integrity errors name for a backup, and what they are for a copy into that repository.
_BACKUP_REMEDIES = (("the next backup stores that data again", "the next copy stores that data again"),
                    ("and back up again", "and copy again"))


def _as_destinations(error: CorruptObject, url: str) -> CorruptObject:
    """``error``, met while storing in the destination, named as the destination's: its commands are to be
    run there, and what stores the data again there is a copy, not a backup."""
    reason = error.reason
    for backup, copy in _BACKUP_REMEDIES:
        reason = reason.replace(backup, copy)
    then = "" if reason != error.reason else ", then copy again"  # (said already where a backup was)
    return type(error)(error.object_name, reason).explained(
        f" (in the destination repository: those commands with `-r {url}`{then})")


def _copy_snapshots(src: Repo, dst: Repo, spec_ids: list[str] | None,
                    progress: Callable[[int, int], None] | None, wait: float,
                    wal: bool, unneeded_wal: Callable[[list[str]], set[str]] | None) -> CopyResult:
    result = CopyResult()
    kept = src.kept_listing()  # the caller's, made under the lock it holds: listing again cost two more lists
    src_snaps = list(kept.values()) if kept is not None else src.snapshots()
    wanted = set(spec_ids) if spec_ids is not None else {s.id for s in src_snaps}
    if spec_ids is None:  # every snapshot: one that does not load is one not copied (it was left out unsaid)
        result.failed += [(name, f"snapshots/{name} does not load: {exc.reason}")
                          for name, exc in sorted(src.unreadable_snapshots.items())]
    with RepoLock(dst.remote, SHARED, COPY_INTO, wait=wait, wait_option=True,
                  label="the destination repository", alone=True) as lock:
        dst.fresh_index()
        done: dict[str, str] = {}  # an id a source snapshot may be known by -> the destination's snapshot
        for have in dst.snapshots():
            for known in origins(have):
                done.setdefault(known, have.id)
        with dst.writer() as writer, dst.saves_noted_together(lock.confirm) as note_saves, \
                contextlib.closing(_BlobMapper(src, dst, writer, progress)) as mapper:
            writer.guard = lock.confirm
            saves = SavesAfterIndex(writer, flush=lambda: _flushed(writer))
            unsaved: dict[str, Snapshot] = {}  # the copies made whose saves wait for their data's index

            def loaded(sid: str) -> Snapshot:
                return unsaved.get(sid) or dst.load_snapshot(sid)

            def save(copy: Snapshot, source: str) -> None:
                del unsaved[copy.id]
                # a prune that took the lock for stale may have deleted what it reuses
                dst.save_snapshot_held(copy, lock, named=True)
                result.copied.append((source, copy.id))
            held = {s.id for s in src_snaps if not origins(s).isdisjoint(done)}
            noted = time.monotonic()
            order = copy_order(src_snaps, wanted, held)
            for n, snap in enumerate(order):
                if time.monotonic() - noted >= NOTE_SAVES_EVERY:
                    note_saves()
                    noted = time.monotonic()
                there = next((done[i] for i in sorted(origins(snap)) if i in done), None)
                if there is not None:
                    done[snap.id] = there  # its differentials build on that one
                    result.skipped.append(snap.id)
                    theirs = loaded(there)
                    if theirs.host != snap.host:
                        result.other_host.append((snap.id, there, theirs.host))
                    continue
                parent = done.get(snap.parent) if snap.kind == KIND_DIFF else None
                if snap.kind == KIND_DIFF and parent is None:
                    failed = snap.parent in {f for f, _ in result.failed}
                    result.failed.append((snap.id, f"its parent {snap.parent} " + (
                        "was not copied" if failed else "is not in the source (unreadable or gone)")))
                    continue
                kind = snap.kind
                if parent is not None and not _same_tree(src.load_snapshot(snap.parent), loaded(parent)):
                    kind, parent = KIND_FULL, None  # its copied parent was rewritten since: resolved, as a full
                if kind == snap.kind:
                    mapper.read_ahead(snap)  # (done already, unless the one before was not copied)
                after = next((s for s in order[n + 1:] if origins(s).isdisjoint(done)), None)
                try:
                    records = ((lambda s=snap: src.manifest_records(s, batched=True)) if kind == snap.kind
                               else (lambda s=snap: src.tree(s, src_snaps)))
                    manifest, mw = _copy_manifest(dst, writer, mapper, records,
                                                  then=lambda a=after: mapper.read_ahead(a))
                except NewerObject:  # not damage: an upgrade reads it
                    raise
                except CorruptObject as exc:  # damaged in the source: the other snapshots still go
                    result.failed.append((snap.id, f"{exc.object_name}: {exc.reason}"))
                    continue
                copy = Snapshot(time=snap.time, kind=kind, parent=parent, host=snap.host, paths=list(snap.paths),
                                tags=list(snap.tags), manifest=[i.hex() for i in manifest],
                                manifest_starts=mw.starts, version=mw.version,
                                # the first origin, kept through every hop: A to B to C, then A to C, must
                                # find A's snapshot in C (it was copied again, C's back to A too)
                                stats={**snap.stats, COPIED_FROM: snap.stats.get(COPIED_FROM) or snap.id},
                                stdin_name=snap.stdin_name, id=new_snapshot_id())
                done[snap.id] = copy.id  # its differentials name it as their parent before it is saved
                unsaved[copy.id] = copy
                saves.then(lambda c=copy, s=snap.id: save(c, s))
            saves.flush()
            pending = _send_wal(src, dst, mapper, result, unneeded_wal) if wal else []
            _flushed(writer)
        for w in pending:  # their data indexed first, as a push writes its object last
            lock.confirm()
            _place_wal(dst, w, result)
        result.blobs_sent = mapper.sent
        result.bytes_sent = mapper.sent_bytes
    return result


def _send_wal(src: Repo, dst: Repo, mapper: _BlobMapper, result: CopyResult,
              unneeded: Callable[[list[str]], set[str]] | None) -> list[WalFile]:
    """The data of each archived WAL file the destination lacks (by name) and needs, sent; their objects as
    the destination names their blobs (ids are keyed per repository), to write once that data is indexed.
    Files it lacks but does not need are not even read: an ``archive-expire`` there removed them, and they
    would go there again at every copy."""
    there = set(walarchive.names(dst))
    listed = walarchive.names(src)
    lacking = [n for n in listed if n not in there]
    skip = unneeded(lacking) if unneeded is not None and lacking else set()
    result.wal_unneeded = len(skip)
    files, bad = walarchive.load_all(src, [n for n in listed if n not in skip])
    # A push writes its index before its object: one listed now names blobs of an index this copy may not
    # have read yet (archive_command runs on while a copy does), which are not missing.
    src.refresh_index()
    result.wal_failed += [(name, f"{walarchive.WAL_PREFIX}{name} does not load: {exc.reason}")
                          for name, exc in sorted(bad.items())]
    out = []
    for w in files:
        if w.name in there:
            try:
                theirs = walarchive.load(dst, w.name)
                differs = None if theirs is None else _other_content(src, w, dst, theirs)
            except NewerObject:
                raise
            except CorruptObject as exc:  # either side's damage: named, the other files still go
                result.wal_failed.append((w.name, f"not compared: {exc.object_name}: {exc.reason}"))
                continue
            if differs is not None:
                result.wal_failed.append((w.name, differs))
                continue
            if theirs is not None:
                result.wal_skipped += 1
                continue
        try:
            mapper.ensure(w.blob_ids())
        except NewerObject:
            raise
        except CorruptObject as exc:  # damaged in the source: the other files still go
            result.wal_failed.append((w.name, f"{exc.object_name}: {exc.reason}"))
            continue
        out.append(replace(w, blobs=[mapper.map[b].hex() for b in w.blob_ids()]))
    return out


def _place_wal(dst: Repo, w: WalFile, result: CopyResult) -> None:
    dst.raise_format(FORMAT_WAL)
    try:
        dst.remote.put(walarchive.WAL_PREFIX + w.name, w.encode(dst.sealer), if_absent=True)
    except ObjectExists:  # pushed there meanwhile: the same file, or a conflict to name
        try:
            theirs = walarchive.load(dst, w.name)
            differs = None if theirs is None else _other_content(dst, w, dst, theirs)
        except CorruptObject as exc:
            differs = f"not compared: {exc.object_name}: {exc.reason}"
        if differs is not None:
            result.wal_failed.append((w.name, differs))
        else:
            result.wal_skipped += 1
        return
    result.wal_copied.append(w.name)


def _other_content(src: Repo, mine: WalFile, dst: Repo, theirs: WalFile) -> str | None:
    """Why the destination's ``theirs`` is not the file ``mine`` (of ``src``) is, or None when it is the same:
    PostgreSQL's file under one name is one content, and a copy must not leave two archives that disagree.

    Blob ids are keyed per repository (each has its own id key), so ids never compare across two; a copy
    keeps when and where a file was pushed, so an object an earlier copy wrote is known without reading
    (size, time and host the same).  Another (pushed there on its own, by a second ``archive_command``)
    is read: with the same chunking (one repository made with the other's chunker parameters and secret)
    the source's chunks hashed with the destination's key must be its ids; else the bytes are compared."""
    other = CONFLICT_THERE
    if theirs.size != mine.size:
        return f"{other} ({theirs.size} bytes there, {mine.size} here)"
    if (theirs.time, theirs.host) == (mine.time, mine.host) or (src is dst and theirs.same_content(mine)):
        return None
    if src is not dst and src.chunker_params == dst.chunker_params and \
            src.material.chunker_secret == dst.material.chunker_secret:
        same = [dst.blob_id(p).hex() for p in walarchive.plaintexts(src, mine)] == theirs.blobs
    else:
        same = _digest(src, mine) == _digest(dst, theirs)
    return None if same else f"{other} (as many bytes, other ones)"


def _digest(repo: Repo, wal: WalFile) -> bytes:
    hasher = blake3.blake3()
    for plain in walarchive.plaintexts(repo, wal):
        hasher.update(plain)
    return hasher.digest()
