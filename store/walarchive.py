"""The PostgreSQL WAL archive: ``wal/<NAME>`` objects, what ``archive-push`` and ``archive-get`` exchange
with PostgreSQL's ``archive_command`` and ``restore_command``.

A file's data is stored as a backup stores a file (chunked, deduplicated, compressed, sealed into packs,
indexed; ``Backup.store_stream``); its ``wal/`` object, a small sealed document naming those blobs, is
written last, once, and never rewritten: what PostgreSQL archived under a name stays what it gets back.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from chunkvault.errors import (ArchiveConflict, ChunkvaultError, CorruptObject, LockLost, NewerObject, ObjectExists,
                               ObjectNotFound, RemoteError, RemoteUnavailable, TargetUnwritable, UsageError,
                               WalNotArchived)
from chunkvault.localfiles import fsync_directory
from chunkvault.remotes.layer import parallel_map

from . import walheader
from .backup import Backup, BackupOptions
from .blob import Plaintext
from .config import FORMAT_WAL
from .crypto import Sealer
from .locks import EXCLUSIVE, SHARED, RepoLock
from .repository import NOT_INDEXED, OBJECT_READERS, Repo
from .snapshot import now_iso, open_document, seal_document
from .unlock import require_openable
from .walnames import WAL_PREFIX, check_wal_name, expired, fetch_ahead, is_history, is_wal_name, timeline_ends

WAL_AD = b"chunkvault wal v1"
WAL_VERSION = 1
#: Blobs read at once by ``archive-get`` (a segment is some 64 chunks at the default chunk size).
READ_BATCH = 16
#: Batches read at once (a segment's, at the default chunk size), so many held in memory at most.
READ_BATCHES = 4

_HEX_ID = re.compile(r"[0-9a-f]{64}")


@dataclass
class WalFile:
    """One archived file: its name, size and the ids of its chunks in order; when and where it was pushed."""

    name: str
    size: int
    blobs: list[str]  # hex blob ids, in order
    time: str  # ISO 8601 UTC, when it was archived
    host: str
    version: int = WAL_VERSION

    def blob_ids(self) -> list[bytes]:
        return [bytes.fromhex(b) for b in self.blobs]

    def same_content(self, other: "WalFile") -> bool:
        return self.size == other.size and self.blobs == other.blobs

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "time": self.time, "host": self.host,
                "blobs": len(self.blobs)}

    def encode(self, sealer: Sealer) -> bytes:
        """Sealed with the kind and name as associated data: an object's bytes under another name do not open."""
        check_wal_name(self.name)
        return seal_document(sealer, asdict(self), WAL_AD + self.name.encode())

    @classmethod
    def decode(cls, sealer: Sealer, name: str, data: bytes) -> "WalFile":
        what = f"{WAL_PREFIX}{name}"
        body = open_document(sealer, data, WAL_AD + name.encode(), what, 1 << 26, "wal", WAL_VERSION)
        try:
            wal = cls(**body)
            if wal.name != name:
                raise ValueError(f"it names {wal.name!r}")
            if type(wal.size) is not int or wal.size < 0:
                raise ValueError("size is not a count of bytes")
            if not isinstance(wal.blobs, list) or not all(isinstance(b, str) and _HEX_ID.fullmatch(b)
                                                          for b in wal.blobs):
                raise ValueError("blobs are not 64 hex digits each")
            if not isinstance(wal.host, str) or not isinstance(wal.time, str) or \
                    datetime.fromisoformat(wal.time).tzinfo is None:
                raise ValueError("host or time is not as written")
        except (TypeError, ValueError) as exc:
            raise CorruptObject(what, f"malformed ({exc})") from None
        return wal


@dataclass
class PushResult:
    wal: WalFile
    already: bool  # archived before with the same content: nothing stored
    new_blobs: int = 0
    stored_bytes: int = 0
    ahead: list["PushResult"] = field(default_factory=list)  # the files pushed ahead with it (``push``)
    ahead_error: str | None = None  # why the next one ahead was not

    def to_dict(self) -> dict:
        return {**self.wal.to_dict(), "already_archived": self.already, "new_blobs": self.new_blobs,
                "stored_bytes": self.stored_bytes, "ahead": [r.to_dict() for r in self.ahead],
                "ahead_error": self.ahead_error}


def load(repo: Repo, name: str, *, fresh: bool = False) -> WalFile | None:
    """The archived file ``name``, or None when not archived.  ``fresh``: the stored object, not a copy cached
    (``check``: damage done to it since, which no listing's version shows, would stay hidden)."""
    try:
        return repo.read_sealed(WAL_PREFIX + name, lambda d: WalFile.decode(repo.sealer, name, d), fresh=fresh)[0]
    except ObjectNotFound:
        return None


def names(repo: Repo, start: str = "", *, cache: bool = True) -> list[str]:
    """Every name under ``wal/`` that PostgreSQL could have archived (anything else is no object of ours);
    ``start``: only those that start with it.  ``cache=False``: the objects are to be read once (a
    recovery's), so the listing does not vouch for keeping them in the local cache."""
    remote = repo.remote if cache else repo.remote.uncached()
    return sorted(n for o in remote.list(WAL_PREFIX + start) if is_wal_name(n := o.key[len(WAL_PREFIX):]))


def following(repo: Repo, after: str, limit: int) -> list[str]:
    """``fetch_ahead`` of the archived names, listing only the log files (the 16 hex digits of timeline and
    log id that segment names share) from ``after``'s on, up to one of which nothing is archived: a listing of
    the whole archive, taken at each call of a recovery, grows with the server's life.  A recovery reads each
    object once: they are not kept in the local cache."""
    if is_history(after):
        return []
    tli, log = after[:8], int(after[8:16], 16)
    listed: list[str] = []
    while log <= 0xFFFFFFFF:
        more = names(repo, f"{tli}{log:08X}", cache=False)
        listed += more
        ahead = fetch_ahead(listed, after, limit)
        if not more or len(ahead) >= limit:
            return ahead
        log += 1
    return fetch_ahead(listed, after, limit)


def newest_history(repo: Repo) -> tuple[int, dict[int, int]]:
    """The newest timeline whose history file the archive holds (a recovery with ``recovery_target_timeline``
    latest follows it) and where each of its ancestors ended (``timeline_ends``); (0, {}) without one (a single
    timeline), or where it does not read."""
    histories = [n for n in names(repo) if is_history(n)]
    if not histories:
        return 0, {}
    newest = max(histories)
    try:
        ends = _history_ends(repo, newest)
    except ChunkvaultError:
        return 0, {}
    return (0, {}) if ends is None else (int(newest[:8], 16), ends)


def _history_ends(repo: Repo, name: str) -> dict[int, int] | None:
    """``timeline_ends`` of the archived timeline history file ``name``, or None when it is not archived."""
    wal = load(repo, name)
    if wal is None:
        return None
    return timeline_ends(b"".join(bytes(p) for p in plaintexts(repo, wal)).decode("utf-8", "replace"))


def load_all(repo: Repo, listed: Sequence[str] | None = None, *,
             fresh: bool = False) -> tuple[list[WalFile], dict[str, CorruptObject]]:
    """Every archived file that loads (of ``listed``, default all), by name, and the errors of those that do
    not (damaged, or newer); one gone since it was listed is left out.  ``fresh``: as ``load``."""
    listed = names(repo) if listed is None else listed

    def one(name: str) -> WalFile | CorruptObject | None:
        try:
            return load(repo, name, fresh=fresh)
        except CorruptObject as exc:
            return exc

    with ThreadPoolExecutor(OBJECT_READERS) as pool:
        loaded = list(pool.map(one, listed))
    bad = {n: x for n, x in zip(listed, loaded) if isinstance(x, CorruptObject)}
    return [x for x in loaded if isinstance(x, WalFile)], bad


def used_blobs(repo: Repo) -> set[bytes]:
    """The blobs every archived file needs (for prune): one that does not load stops it, as a snapshot does."""
    files, bad = load_all(repo)
    for name, exc in sorted(bad.items()):
        if isinstance(exc, NewerObject):
            raise exc.explained("; prune needs every wal object")
        raise exc.explained("; prune needs every wal object: `repair wal --confirm REPAIR` removes those that do "
                            "not load (their data is lost either way)")
    return {b for w in files for b in w.blob_ids()}


def damaged(repo: Repo, *, dry_run: bool = True, wait: float = 3600.0) -> list[tuple[str, str]]:
    """The ``wal/`` objects that do not load, as stored (damaged, or bytes no key of this repository sealed:
    planted by a client that may only add), each with why; without ``dry_run`` removed, under the exclusive
    lock.  Prune needs every wal object, and such a file's data cannot be found whatever else is done: its
    segment is lost either way (``check`` then names the gap).  Objects a newer chunkvault wrote stay."""

    def found() -> list[tuple[str, str]]:
        bad = load_all(repo, fresh=True)[1]
        return [(name, exc.reason) for name, exc in sorted(bad.items()) if not isinstance(exc, NewerObject)]

    if dry_run:
        return found()
    with RepoLock(repo.remote, EXCLUSIVE, "repair wal", wait=wait) as lock:
        gone = found()
        if gone:
            repo.require_deletes(f"{WAL_PREFIX}{'0' * 24}", "repair wal")
        for name, _ in gone:
            lock.ensure_held()
            repo.remote.delete(WAL_PREFIX + name)
    return gone


def push(repo: Repo, path: str, *, host: str | None = None, wait: float = 3600.0,
         compression_level: int | None = None, progress: Callable[[dict], None] | None = None,
         ahead: Sequence[str] = (), on_ahead: Callable[[PushResult], None] = lambda r: None) -> PushResult:
    """Archive the file at ``path`` under its base name, as PostgreSQL's ``archive_command`` asks: idempotent
    for the same content, refused (ArchiveConflict) for other content under a name already archived.
    ``progress``: called with a backup's counts as it reads (where a stop is noticed).

    ``ahead``: files PostgreSQL has ready to archive next, pushed under the same lock once ``path`` is (one
    process, one repository opened, for several files).  ``on_ahead`` is called with each one archived; the
    first that fails, or whose ``on_ahead`` raises a ChunkvaultError, ends the batch, recorded in the result
    (``ahead_error``): PostgreSQL asks for it again."""
    name = check_wal_name(os.path.basename(path))
    host = host or socket.gethostname()
    f = _open_wal(path)
    with f:
        with RepoLock(repo.remote, SHARED, "archive-push", wait=wait) as lock:
            if lock.waited:
                repo.drop_stale(index=False)
            repo.follow_settings(require_openable(repo.remote, repo.config.repo_id))
            repo.fresh_index()
            systems: dict[str, int] = {}
            result = _push_one(repo, lock, f, name, host, compression_level, progress, systems)
            for other in ahead:
                try:
                    with _open_wal(other) as g:
                        done = _push_one(repo, lock, g, check_wal_name(os.path.basename(other)), host,
                                         compression_level, progress, systems)
                    result.ahead.append(done)
                    on_ahead(done)
                except ChunkvaultError as exc:  # the lock lost, a conflict, a remote gone: its own turn tells
                    result.ahead_error = f"{os.path.basename(other)}: {exc}"
                    break
            return result


def _open_wal(path: str) -> BinaryIO:
    """The file at ``path``, which must be a regular one, as PostgreSQL keeps what it archives (opened without
    blocking: a FIFO is refused, not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file: archive-push takes a file as PostgreSQL keeps it in "
                         "pg_wal")
    return _WalReader(io.FileIO(fd, "rb"), path)


class _WalReader(io.BufferedReader):
    """The file pushed: a read that fails (EIO, a mount gone) is an error naming it, not an internal error."""

    def __init__(self, raw: io.FileIO, path: str) -> None:
        super().__init__(raw)
        self.path = path

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(size)
        except OSError as exc:
            raise self._failed(exc) from None

    def readinto(self, buffer: Any) -> int:
        try:
            return super().readinto(buffer)
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> UsageError:
        return UsageError(f"cannot read {self.path}: {exc.strerror or exc}")


def _push_one(repo: Repo, lock: RepoLock, f: BinaryIO, name: str, host: str, compression_level: int | None,
              progress: Callable[[dict], None] | None, systems: dict[str, int]) -> PushResult:
    """Store ``f`` as ``wal/name`` under the shared ``lock``: its blobs first, the object last.  A segment
    must start with its own page header, of the database system of the segment archived before it, and
    hold the branch point its timeline's archived history file names when its first page is of an earlier
    timeline (``walheader``); ``systems``: the system of each segment checked so far in this process."""
    if not walheader.is_checked(name):
        return _store_one(repo, lock, f, name, host, compression_level, progress, load(repo, name))
    header = walheader.check_segment(name, f.read(walheader.HEADER_SIZE), os.fstat(f.fileno()).st_size)
    f.seek(0)
    # The "archived already?" lookup goes beside the check of the segment before (its object, then its
    # first blob): one after the other, they were three round trips in a row at every push.
    with ThreadPoolExecutor(1) as pool:
        archived = pool.submit(load, repo, name)
        _check_system(repo, name, header, systems)
        existing = archived.result()
    if header.timeline < int(name[:8], 16):
        with contextlib.suppress(CorruptObject):  # a damaged history file is check's to report
            walheader.check_branch(name, header, _history_ends(repo, f"{name[:8]}.history") or {})
    try:
        return _store_one(repo, lock, f, name, host, compression_level, progress, existing)
    except ArchiveConflict as exc:  # a second server archiving here: each system named, where that is why
        theirs = _archived_system(repo, name)
        if theirs is None or theirs == header.system:
            raise
        raise exc.explained(f"; the archived one is WAL of database system {theirs}, this one of "
                            f"{header.system}") from None


def _store_one(repo: Repo, lock: RepoLock, f: BinaryIO, name: str, host: str, compression_level: int | None,
               progress: Callable[[dict], None] | None, existing: WalFile | None) -> PushResult:
    """Store ``f`` as ``wal/name``, checked as ``_push_one`` says; ``existing``: what is archived under the
    name (``load``), looked up by the caller."""
    if existing is not None and all(b in repo.index for b in existing.blob_ids()):
        # a push again after a crash: same ids, or a conflict; nothing stored
        counting = _backup(repo, compression_level, progress, dry_run=True)
        _, ids, size = counting.store_stream(f, name.encode(), None)
        return _again(existing, ids, size, stored=False)
    backup = _backup(repo, compression_level, progress, dry_run=False)
    _, ids, size = backup.store_stream(f, name.encode(), lock)
    assert backup.writer is not None
    if existing is not None:  # its data was lost (a pack gone, the index repaired): stored again, it heals
        healed = _again(existing, ids, size, stored=True)  # the same ids: the object names them as it was
        lock.confirm()
        return PushResult(healed.wal, False, backup.writer.new_blobs, backup.writer.stored_bytes)
    wal = WalFile(name=name, size=size, blobs=[b.hex() for b in ids], time=now_iso(), host=host)
    lock.confirm()
    repo.raise_format(FORMAT_WAL)
    try:
        repo.remote.put(WAL_PREFIX + name, wal.encode(repo.sealer), if_absent=True)
    except ObjectExists:  # another push of the same name meanwhile: its blobs are now ours too
        other = load(repo, name)
        if other is None:
            raise
        return _again(other, ids, size, stored=True)
    try:
        lock.confirm()
    except LockLost:  # a prune may have taken its blobs: taken back, PostgreSQL pushes it again
        with contextlib.suppress(RemoteError):  # an append-only token cannot: the lock's error stands
            repo.remote.delete(WAL_PREFIX + name)
        raise
    except RemoteUnavailable:
        pass
    return PushResult(wal, False, backup.writer.new_blobs, backup.writer.stored_bytes)


def _check_system(repo: Repo, name: str, header: walheader.SegmentHeader, systems: dict[str, int]) -> None:
    """``walheader.check_same_system`` against the segment before ``name``, when it is archived; ``systems``
    holds those known in this process (a batch pushed ahead checks each against the one before it)."""
    earlier = walheader.previous_segment(name, header.segment_size)
    if earlier is not None:
        known = systems[earlier] if earlier in systems else _archived_system(repo, earlier)
        walheader.check_same_system(name, header, earlier, known)
    systems[name[:24]] = header.system


def _archived_system(repo: Repo, name: str) -> int | None:
    """The database system of the archived segment ``name`` (its first blob read), or None: not archived, or
    damaged (``check``'s to report; no reason to refuse PostgreSQL's next file)."""
    try:
        wal = load(repo, name)
        if wal is None or not wal.blobs:
            return None
        first = wal.blob_ids()[0]
        [plain] = repo.read_blobs([first])
        repo.check_id(first, plain)
    except CorruptObject:
        return None
    return walheader.system_of(bytes(plain[:walheader.HEADER_SIZE]))


def _backup(repo: Repo, compression_level: int | None, progress: Callable[[dict], None] | None, *,
            dry_run: bool) -> Backup:
    """WAL has no parent version: stored whole, never as a delta."""
    return Backup(repo, BackupOptions(delta=False, dry_run=dry_run, compression_level=compression_level,
                                      progress=progress))


def _again(existing: WalFile, ids: list[bytes], size: int, *, stored: bool) -> PushResult:
    """The push of a name archived already: the same content (``already``), or an ArchiveConflict.  ``stored``:
    this push wrote its data before it knew (a lost race, a heal), which stays until a prune frees it."""
    pushed = WalFile(existing.name, size, [b.hex() for b in ids], existing.time, existing.host)
    if not existing.same_content(pushed):
        left = "its data is left for prune to free" if stored else "nothing was stored"
        raise ArchiveConflict(f"{existing.name} is archived already ({existing.size} bytes, {existing.time} from "
                              f"{existing.host}) with other content than the {size} bytes pushed now; {left} "
                              "(another server archiving into this repository? give each its own)")
    return PushResult(existing, True)


def get(repo: Repo, name: str, dest: str) -> WalFile:
    """Write the archived file ``name`` to ``dest`` atomically (a temporary file beside it, synced, renamed),
    every blob checked against its id: damage is an error naming the object, never wrong bytes."""
    check_wal_name(name)
    wal = load(repo, name)
    if wal is None:
        raise WalNotArchived(f"{name} is not in the WAL archive")
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".chunkvault-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise TargetUnwritable(f"cannot write into {directory}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            _write_blobs(repo, wal, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
        tmp = ""
        fsync_directory(directory)
    except OSError as exc:
        raise TargetUnwritable(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return wal


def deliver(repo: Repo, name: str, fd: int) -> WalFile | None:
    """Write the archived file ``name`` into the open descriptor ``fd`` (emptied first), every blob checked
    against its id; None when it is not archived.  For a reader that opened the file itself, as the WAL relay
    of ``verify-restore --pg-recover`` is handed one by the server's user: nothing is opened here by path.
    Damage is a CorruptObject naming the object; what was written then is not to be used (the reader is told)."""
    check_wal_name(name)
    wal = load(repo, name)
    if wal is None:
        return None
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "wb") as out:
            _write_blobs(repo, wal, out)
    except OSError as exc:
        raise TargetUnwritable(f"cannot write {name} for the server: {exc.strerror or exc}") from None
    return wal


def prefetch(repo: Repo, after: str, directory: str, limit: int) -> tuple[list[WalFile], str | None]:
    """Write the ``limit`` archived segments a recovery asks for after ``after`` into ``directory`` (one
    there already is left as it is): what was fetched, and why the next one was not (the first failure ends
    it; the recovery's own call for that file then reports it)."""
    fetched: list[WalFile] = []
    for name in following(repo, after, limit):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            continue
        try:
            fetched.append(get(repo, name, path))
        except ChunkvaultError as exc:
            return fetched, f"{name}: {exc}"
    return fetched, None


def _write_blobs(repo: Repo, wal: WalFile, out: BinaryIO) -> None:
    """The archived file's data into ``out``; a CorruptObject when its blobs do not hold the size it records
    (what was written then is not to be used)."""
    written = 0
    for plain in plaintexts(repo, wal):
        out.write(plain)
        written += len(plain)
    if written != wal.size:
        raise CorruptObject(WAL_PREFIX + wal.name, f"its blobs hold {written} bytes, and it records {wal.size}")


def plaintexts(repo: Repo, wal: WalFile) -> Iterator[Plaintext]:
    """The archived file's data, blob by blob in order, each checked against its id (read ``READ_BATCH`` at a
    time, ``READ_BATCHES`` of them together: one after the other, a segment's four cost a recovery four
    round trips in a row at each file it asked for); damage is a CorruptObject naming the ``wal/`` object."""
    ids = wal.blob_ids()
    batches = [ids[i : i + READ_BATCH] for i in range(0, len(ids), READ_BATCH)]
    for plains in parallel_map(lambda batch: _read_checked(repo, wal, batch), batches, workers=READ_BATCHES,
                               max_in_flight=READ_BATCHES):
        yield from plains


def _read_checked(repo: Repo, wal: WalFile, batch: list[bytes]) -> list[Plaintext]:
    try:
        plains = repo.read_blobs(batch)
        for bid, plain in zip(batch, plains):
            repo.check_id(bid, plain)
    except CorruptObject as exc:
        raise _needed_by(exc, wal) from None
    return plains


# What heals a blob no pack holds, for an archived file: `repair snapshots`, which NOT_INDEXED names for a
# snapshot's files, leaves every ``wal/`` object as it is.
#: What stores an archived file's lost data again (no repair can): its bytes pushed again.
PUSH_AGAIN = "`archive-push` the file again while PostgreSQL still has it, which stores its data again"
WAL_NOT_INDEXED = f"not in the index (`repair index` finds it if a pack still holds it; if none does, {PUSH_AGAIN})"


def _needed_by(exc: CorruptObject, wal: WalFile) -> CorruptObject:
    """``exc`` naming the archived file that needed the object, with the remedy that serves it."""
    if NOT_INDEXED in exc.reason:
        exc = type(exc)(exc.object_name, exc.reason.replace(NOT_INDEXED, WAL_NOT_INDEXED))
    return exc.explained(f" (needed by {WAL_PREFIX}{wal.name})")


def expire(repo: Repo, before: str | Callable[[], str], *, dry_run: bool = False, wait: float = 0.0,
           earlier_timelines: bool = False) -> list[str]:
    """Remove the ``wal/`` objects ``expired`` names, under the exclusive lock (a prune then frees their data);
    with ``dry_run``, only say which.  ``before`` may be a function, called under the lock: what it decides
    from (the snapshots) cannot change before the deletes."""
    if not callable(before):
        check_wal_name(before)
    if dry_run:
        assert isinstance(before, str)
        return expired(names(repo), before, earlier_timelines=earlier_timelines)
    with RepoLock(repo.remote, EXCLUSIVE, "archive-expire", wait=wait) as lock:
        if callable(before):
            before = check_wal_name(before())
        gone = expired(names(repo), before, earlier_timelines=earlier_timelines)
        if gone:
            repo.require_deletes(f"{WAL_PREFIX}{'0' * 24}", "archive-expire")
        for name in gone:
            lock.ensure_held()
            repo.remote.delete(WAL_PREFIX + name)
    return gone

