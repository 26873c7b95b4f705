"""Backing up a tree or a stream into a snapshot.

The source is walked in manifest order (depth first, names sorted), in
lockstep with the parent snapshot's resolved tree, so unchanged files are
recognised by metadata without a lookup table and memory stays bounded.
Files to read go to reader threads (read, chunk, hash, route new chunks) and
new chunks to a compressing and sealing pool; the records wait in walk order
for their files, so the manifest comes out as a serial walk would write it.
Per-byte work is native; Python only routes chunks.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import itertools
import os
import socket
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Mapping, NamedTuple, Protocol

import blake3

from chunkvault.chunker import FIXED_CHUNK_SIZE, FIXED_CHUNK_SIZES, READ_BYTES, fixed_chunks
from chunkvault.errors import CorruptObject, MissingObject, UsageError, resource_exhausted

from .chain import apply, broken_chains, compose
from .manifest import (
    F_CHANGED_DURING_READ, F_UNREADABLE, OP_DELETE, OP_ENTRY, OP_FRESH,
    T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK,
    NS_MAX, NS_MIN, Entry, ManifestStats, Record, delete_record, held_ns, sort_key, unread, what_changed,
)
from .blob import CONTENT_DEFINED_DELTA_DEPTH, FIXED_DELTA_DEPTH, Plaintext
from .deltabase import restart_phase, restart_turns
from .locks import SHARED, RepoLock
from .manifest_io import ManifestWriter
from .owners import OWNERS_KEY, names_of, note_ids
from .repository import WORKERS, BlobWriter, CountingWriter, Repo
from .snapshot import KIND_DIFF, KIND_FULL, Snapshot, find_snapshot, iso, now_iso
from .unlock import require_openable
from .source import (NOT_REGULAR_ERRNOS, Excluded, Replaced, SmallRead, SourceWalk, StatFailed, TreeTotal,
                     open_beneath, open_source_file, read_small_files)
from .holes import HoleSkippingReader, may_have_holes, seekable
from .xattrs import read_xattrs
from .zstdbuf import empty_buffer

if TYPE_CHECKING:  # import-tar's alone (its tarimport loads it when run): a backup of files needs neither
    import tarfile

BATCH_BYTES = 1 << 20  # new chunks go to the compression pool in batches of about this size...
BATCH_CHUNKS = 64  # ...or this many, so a tree of small files does not cost a task per file
# ...or, once a batch holds a chunk with a delta base, this size: the bases' envelopes are fetched level by
# level down their chains, neighbours in a pack with one read, and the neighbouring chunks of a database file
# have their bases side by side in the packs of each earlier backup (bench/RESULTS.md, "Database differentials").
DELTA_BATCH_BYTES = 4 << 20
# Reader threads: files are read, chunked and hashed there, in runs.  The main thread walks, merges the walk
# with the parent and keeps the records in order: reading, chunking and both hashes are a core's worth of
# work, and the compressing workers waited for it when the main thread did it too.
READERS = 2
SLOT_POLL_SECONDS = 0.5  # how often a reader waiting for the compression pool looks whether the backup failed
EARLIEST_TIME = datetime(1970, 1, 2, tzinfo=timezone.utc)  # as times are kept (Unix time), a day's slack
FUTURE_SLACK = timedelta(minutes=5)  # a snapshot time given may be this far ahead (another machine's clock)
WINDOW = 1024  # entries waiting for their place in the manifest behind a file still being read: 16 runs of
# small files; with 4 the readers sat idle a third of a backup of small files, the main thread waiting for the
# oldest run while the window was full
# Files go to a reader in runs of up to this many, or until they hold this many bytes: a job per small file
# (a future, a queue round, a wake-up) cost more of the interpreter's time than reading the file.
READ_RUN_FILES = 64
READ_RUN_BYTES = 1 << 20
DELTA_MARGIN = 0.1  # a delta is kept when it is smaller than the chunk stored whole by this share


class Listed(NamedTuple):
    """An entry as ``BackupOptions.listing`` hears of it (``backup --list``), in manifest order."""

    change: str  # "added", "modified", "removed", "unchanged" or (a dry run's) "excluded"
    path: bytes  # as in the snapshot: below the root (b"" the root itself), or the source's absolute path less "/"
    entry: Entry | None  # the entry stored (a removed one: the parent's); None for an excluded path
    what: str | None = None  # modified: "content", "type" or "metadata" (``what_changed``); excluded: its rule


class AddedFile(NamedTuple):
    """A file a ``SourceSession`` adds to the tree once the walk is done, under ``path`` (relative to the
    snapshot's root); ``open`` gives its content (None: a directory, recorded in the place of what the walk
    found there, such as a symbolic link the added files are to lie in; or, with ``link``, a symbolic link to
    that target, such as one that leads to a directory the walk recorded elsewhere in the tree)."""

    path: bytes
    open: Callable[[], BinaryIO] | None
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    link: bytes | None = None


class TarSource(NamedTuple):
    """A tar read as a backup's tree (``import-tar``): ``tarfile`` opened as a stream (``open_tar``), its
    members' names less ``strip`` leading components."""

    tarfile: tarfile.TarFile
    strip: int = 0


class FileInspector(Protocol):
    """What looks at a file's bytes as the backup reads them (``SourceSession.inspector``): each chunk in
    order, then ``finish`` once the whole file was read (not after a read that failed)."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


class SourceSession(Protocol):
    """What holds a source consistent around a backup's walk, such as a database's base backup mode.

    ``begin`` runs once the repository agreed to the backup (its lock held, the parent found) and before
    the walk looks at a single entry; ``inspector`` gives, for a file about to be read (its path below the
    walk's root), what looks at its bytes, or None (called on reader threads); ``appendix``, once every file
    of the walk is read, gives the files to add to the tree (whose content is known only then) and what to
    record in the snapshot's stats, and ``notes`` then holds the warnings it adds to the backup's; ``close``
    runs in every case, last.  Before ``appendix``, ``walked`` is told the paths the walk could not read and
    its warnings, and may fail the backup for them (raising): a source that holds together only whole.  A
    path whose extended attributes alone could not be read is not among them (its data was read; it is
    listed unreadable in the snapshot all the same, its attributes the parent's)."""

    notes: list[str]
    #: What repairs a file that changed while being read (a database's WAL, replayed from before the walk, in
    #: what ``appendix`` adds), or None: such files are then counted in one warning that says it, not each
    #: named, and still flagged to be read again by the next backup.
    repairs_changes: str | None

    def begin(self) -> None: ...

    def inspector(self, rel: bytes) -> FileInspector | None: ...

    def walked(self, unreadable: list[str], warnings: list[str]) -> None: ...

    def appendix(self) -> tuple[list[AddedFile], dict]: ...

    def close(self) -> None: ...


@dataclass
class BackupOptions:
    kind: str = "auto"  # auto | full | diff
    tags: list[str] = field(default_factory=list)
    host: str | None = None
    parent: str | None = None  # an id, a unique prefix or latest; default: newest snapshot of the same host and paths
    # The listing made under the lock, before anything is stored, is handed to this, and what it gives back is
    # the listing the backup goes on with: the client's ledger judges it for a rollback (the API's guard).  One
    # listing serves both: each read every snapshot object's name, a year of hourly ones on S3 nine pages.
    judge: Callable[[list[Snapshot]], list[Snapshot]] | None = None
    excludes: list[str] = field(default_factory=list)
    delta: bool = True
    no_delta: list[str] = field(default_factory=list)  # globs of paths never stored as deltas
    fixed_chunks: list[str] = field(default_factory=list)  # globs of paths cut at fixed offsets
    fixed_chunk_size: int = FIXED_CHUNK_SIZE
    delta_margin: float = DELTA_MARGIN
    compression_level: int | None = None  # zstd's for this backup's data (None: the repository's)
    lock_wait: float = 3600.0  # how long to wait for a running prune
    progress: Callable[[dict], None] | None = None
    # Count the tree on a second walk, for the progress's total (``TreeTotal``): only where it is shown.
    count_total: bool = False
    # Each entry stored as new or changed, and each of the parent's entries gone, as the backup settles it (on
    # its main thread, in manifest order); unchanged ones too with ``list_unchanged``, and the paths a rule
    # left out from a walk that reports them (``SourceWalk(report_excluded=True)``).
    listing: Callable[[Listed], None] | None = None
    list_unchanged: bool = False
    dry_run: bool = False  # read, chunk and compress as a backup would; write nothing (no lock either)
    reread: bool = False  # read every file, even one whose stat fields match the parent's entry
    ignore_inode: bool = False  # inode and device numbers change on every mount (snapshots, network file systems)
    ignore_ctime: bool = False  # likewise the change time (file systems that do not keep it)
    # A differential, or a full that policy made due (not one asked for), with no change since its parent is not
    # saved (the result: the parent).
    skip_if_unchanged: bool = False
    xattrs: bool = True  # record extended attributes (ACLs, capabilities, SELinux labels, user.*)
    # The snapshot's time (default: when it is saved): when the data it reads was taken, e.g. a file system
    # snapshot's time, so that a restore of a point in time finds it.  The default parent is then the newest
    # snapshot at or before it.
    time: datetime | None = None
    session: SourceSession | None = None  # begun before the walk, its files added after it (``SourceSession``)

    def __post_init__(self) -> None:
        low, high = FIXED_CHUNK_SIZES
        if not low <= self.fixed_chunk_size <= high:
            raise UsageError(f"fixed chunk size must be between {low >> 10} KiB and {high >> 20} MiB")
        if self.time is not None and self.time > datetime.now(timezone.utc) + FUTURE_SLACK:
            raise UsageError(f"snapshot time {self.time.isoformat()} is in the future")
        if self.time is not None and self.time < EARLIEST_TIME:  # a listing in local time cannot show it
            raise UsageError(f"snapshot time {self.time.isoformat()} is before {EARLIEST_TIME.date().isoformat()}, "
                              "the earliest a snapshot takes")


@dataclass
class BackupResult:
    snapshot: Snapshot  # when ``skipped``, the parent: nothing changed since it
    warnings: list[str]
    skipped: bool = False

    @property
    def partial(self) -> bool:
        return bool(self.snapshot.stats.get("unreadable"))


def choose_kind(requested: str, chain: list[Snapshot], full_every: int, max_diff_share: float) -> str:
    """Full or differential for ``--type``; ``chain`` is the parent's chain (empty when none)."""
    if requested not in ("auto", "full", "diff"):
        raise UsageError(f"unknown backup type {requested!r} (auto, full or diff)")
    if requested == "full" or not chain:
        return KIND_FULL
    if requested == "diff":
        return KIND_DIFF
    diffs = chain[1:]
    if len(diffs) >= full_every:
        return KIND_FULL
    full_size = max(int(chain[0].stats.get("bytes", 0)), 1)
    added = sum(int(s.stats.get("added_stored_bytes", 0)) + int(s.stats.get("absorbed_stored_bytes", 0))
                + int(s.stats.get("manifest_bytes", 0)) for s in diffs)
    return KIND_FULL if added > max_diff_share * full_size else KIND_DIFF


def _matches(rel: bytes, globs: list[str]) -> bool:
    """Whether a path (relative to its backup root), or its last component, matches one of ``globs``."""
    if not globs:
        return False
    s = os.fsdecode(rel)
    name = s.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(s, g) or fnmatch.fnmatchcase(name, g) for g in globs)


#: The warning of a file that changed while being read, before its path.
CHANGED_WHILE_READ = "changed while being read (stored as read): "


def _cannot_read(path: bytes, exc: OSError) -> str:
    """A path's read failure; one for want of memory (ENOMEM) names the limit, not the file, as at fault."""
    return f"cannot read {os.fsdecode(path)}: {resource_exhausted(exc) or exc.strerror or exc}"


def _regular_now(path: bytes) -> bool:
    """Whether ``path`` is a regular file now (not following a symbolic link)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _vanished(path: bytes) -> str:
    return f"vanished during backup: {os.fsdecode(path)}"


class _FileRead(NamedTuple):
    """What reading a file gave: its entry (None: it vanished), its warnings, and whether the file read is
    the one the walk stat'ed, not one put in its place since: only then may its other links name it."""

    entry: Entry | None
    notes: list[str]
    same_file: bool = True


class _Link:
    """The paths of one multiply-linked file: ``first``, the one walked first, which the later ones name
    while they wait, and ``holder``, the path whose file entry holds the data once one has settled."""

    __slots__ = ("first", "holder", "held")

    def __init__(self, first: bytes):
        self.first = first
        self.holder: bytes | None = None
        self.held: Entry | None = None  # the holder's entry: the file as it was read


class _ReadRun:
    """Files one reader reads in a row (``Backup._read_run``); ``future`` is set once a reader has it.  The
    reader also leaves its reads here and sets ``ended`` (failed or not): the main thread asks whether each
    entry's run is over, and a future's ``done()`` (a lock taken and given back) cost it a sixth of its time
    in a backup of small files."""

    __slots__ = ("files", "size", "future", "reads", "ended")

    def __init__(self) -> None:
        self.files: list[tuple[Entry, bytes, os.stat_result, Entry | None]] = []
        self.size = 0
        self.future: Future[list[_FileRead]] | None = None
        self.reads: list[_FileRead] | None = None
        self.ended = False


class _Waiting:
    """A walked entry on its way into the manifest: its entry (or the run of files to read it is in, and
    its place there), then the record it adds and the warnings it brings."""

    __slots__ = ("rel", "path", "prev", "notes", "run", "index", "entry", "same", "record")

    def __init__(self, rel: bytes, path: bytes, prev: Entry | None):
        self.rel, self.path, self.prev = rel, path, prev
        self.notes: list[str] = []
        self.run: _ReadRun | None = None
        self.index = 0
        self.entry: Entry | None = None
        self.same = False
        self.record: Record | None = None

    def settle(self, e: Entry | None, diff: bool) -> None:
        """What ``e`` (None: the path is skipped) adds to a full or differential manifest."""
        prev, rel = self.prev, self.rel
        self.entry = e
        if e is None:
            self.record = delete_record(rel) if prev is not None and diff else None
            return
        # Flags too (entries compare without them): a file kept unreadable is recorded so in a differential.
        self.same = prev is not None and prev == e and prev.flags == e.flags
        if not diff:
            self.record = Record(OP_ENTRY, rel, e)
        elif self.same:
            self.record = None
        elif prev is None or prev.type != e.type or e.type != T_DIR:
            self.record = Record(OP_FRESH, rel, e)
        else:
            self.record = Record(OP_ENTRY, rel, e)


def _ready(item: Record | Listed | _Waiting) -> bool:
    return not isinstance(item, _Waiting) or item.run is None or item.run.ended


class _Stopped(Exception):
    """The backup failed elsewhere: a reader gives up the file it is in."""


class _FdReader:
    """The reads a backup makes on an open file, straight on the descriptor.

    A file object per source file costs an extra fstat and allocation; over
    tens of thousands of small files that is a measurable share of a backup.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n)

    def readinto(self, buf: memoryview) -> int:
        return os.readv(self.fd, [buf])

    def seek(self, offset: int) -> int:
        return os.lseek(self.fd, offset, os.SEEK_SET)


class _Prefixed:
    """A stream whose first bytes were read already: those, then the rest from where the read stopped.

    A file read past the size its stat gave goes on from there, never from its start again: a stream that
    only reads front to back (a FUSE file opened nonseekable) cannot be sought back to it.
    """

    __slots__ = ("head", "rest")

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head = memoryview(head)
        self.rest = rest

    def readinto(self, buf: memoryview) -> int:
        if not self.head:
            return self.rest.readinto(buf)
        n = min(len(buf), len(self.head))
        buf[:n] = self.head[:n]
        self.head = self.head[n:]
        return n


IGNORE_INODE = 1  # the fields a backup may be told not to compare (SourceWalk.skip_unchanged's ``ignore``)
IGNORE_CTIME = 2
# A change made in the same clock tick as the one a backup saw leaves a file's times as they were: an entry
# whose times lie within the parent's walk, widened by this margin, is read again, not taken on its times (a
# time past that was not stamped while the parent read, and no later change stamps it again).  Times with
# sub-second digits come from a file system keeping fine times, stamped from the kernel's coarse clock
# (milliseconds behind); whole seconds from one that keeps no finer (FAT: 2 s).
RACY_FINE_NS = 100_000_000
RACY_COARSE_NS = 2_000_000_000
Window = tuple[int, int, int, int]  # (from, to) for times with sub-second digits, then for whole seconds
NEVER_RACY: Window = (1, 0, 1, 0)


UNTIMED_WALK_NS = 86_400 * 10**9  # how long a parent that recorded neither its walk's times nor its duration took


def _not_dated_ahead(same: list[Snapshot]) -> list[Snapshot]:
    """A source's snapshots without those dated ahead of the clock (taken while it ran ahead), when any is
    left: one such would be every later backup's parent until the clock reached its date, each differential
    growing against it and no full due.  Where all are ahead, this clock is the one behind: they stay."""
    from .retention import AHEAD  # forget's module: every command loads this one, few of them forget's

    now = datetime.now(timezone.utc)
    fresh = [s for s in same if s.datetime <= now + AHEAD]
    return fresh or same


def racy_window(parent: Snapshot | None) -> Window:
    """The times within which the parent's entries are not taken on their times (from its start on, for
    one that did not record its end).  A parent from before walks were timed has the window from its time
    (when it was saved) less its duration on: with none, a file it read in the tick it was changed in was
    taken unchanged by every backup after it.  None for a parent whose times are malformed."""
    if parent is None:
        return NEVER_RACY
    began = parent.stats.get("started_ns")
    ended = parent.stats.get("finished_ns", NS_MAX)
    if "started_ns" not in parent.stats:
        began, ended = _untimed_walk(parent)
    if type(began) is not int or type(ended) is not int:
        return NEVER_RACY
    return (began - RACY_FINE_NS, min(ended + RACY_FINE_NS, NS_MAX),
            began - RACY_COARSE_NS, min(ended + RACY_COARSE_NS, NS_MAX))


def _untimed_walk(parent: Snapshot) -> tuple[int | None, int]:
    """(start, end) of the walk of a parent that did not record them: from its time less its duration on."""
    try:
        saved = parent.datetime
    except (AttributeError, TypeError, ValueError):
        return None, NS_MAX
    duration = parent.stats.get("duration")
    took = duration * 1e9 if isinstance(duration, (int, float)) and 0 <= duration < 1e9 else UNTIMED_WALK_NS
    return int(saved.timestamp() * 1e9 - took) - 10**9, NS_MAX  # a second's slack for the float


def _settled(st: os.stat_result, ignore: int, window: Window) -> bool:
    """Whether a stat's times lie out of the window, so they vouch for an unchanged entry (C: ``racy`` in
    _scandir.c)."""
    return not _racy(st.st_mtime_ns, window) and bool(ignore & IGNORE_CTIME or not _racy(st.st_ctime_ns, window))


def _racy(ns: int, window: Window) -> bool:
    lo, hi = window[:2] if ns % 1_000_000_000 else window[2:]
    return lo <= ns <= hi


def _unchanged_file(prev: Entry, st: os.stat_result, ignore: int, window: Window) -> bool:
    """A single-link regular file whose every recorded field (but those ``ignore`` names) matches ``prev``,
    with times out of the racy ``window``: ``prev`` is its entry.

    The common case of a repeated backup, decided without building an entry.
    """
    return (prev.type == T_FILE and not prev.flags and st.st_nlink == 1 and st.st_mtime_ns == prev.mtime_ns
            and (st.st_ctime_ns == prev.ctime_ns or ignore & IGNORE_CTIME) and st.st_size == prev.size
            and (st.st_ino == prev.ino and st.st_dev == prev.dev or ignore & IGNORE_INODE)
            and st.st_mode == stat.S_IFREG | prev.mode and st.st_uid == prev.uid and st.st_gid == prev.gid
            and _settled(st, ignore, window))


NAME_MAX = 255  # bytes of one part of a path a file system takes (Linux's, and most others')


def check_stdin_name(name: str) -> bytes:
    """A stream's name as a path below the snapshot's root; UsageError for one that leaves it or is empty, or
    with a part no file system takes as a name: its snapshots would dump, but no restore could write them."""
    rel = os.fsencode(name)
    parts = rel.split(b"/")
    if not rel or rel.startswith(b"/") or b"\x00" in rel or any(p in (b"", b".", b"..") for p in parts):
        raise UsageError(f"invalid stream name {name!r}: a relative path without . or .. in it").hinting(
            " (--stdin-name)")
    if any(len(p) > NAME_MAX for p in parts):
        raise UsageError(f"invalid stream name {name!r}: a part of it is longer than {NAME_MAX} bytes, which no "
                         "file system takes as a file's name").hinting(" (--stdin-name)")
    return rel


def series(snapshots: list[Snapshot], host: str, paths: list[str], stdin_name: str | None,
           time: datetime | None) -> list[Snapshot]:
    """The snapshots of a backup's series, oldest first: of its host and paths (or stream name), and at or
    before ``time`` when given (else not dated ahead of the clock, ``_not_dated_ahead``).  The newest that
    reads is the parent (``usable_parent``); their count numbers the backup in its series (``DeltaPolicy``)."""
    same = [s for s in snapshots if s.host == host and sorted(s.paths) == sorted(paths)
            and s.stdin_name == stdin_name and (time is None or s.datetime <= time)]
    return _not_dated_ahead(same) if time is None else same


def usable_parent(repo: Repo, same: list[Snapshot], snapshots: list[Snapshot], damaged: set[bytes]
                  ) -> tuple[Snapshot | None, Iterator[Record]]:
    """The newest of ``same`` whose chain can be read, and its tree: every snapshot of the chain loads,
    every manifest blob is indexed (`repair index` drops those of a lost pack) and the head of each
    manifest reads (the tree's first record needs them all: the read the backup makes first anyway).
    Backups go on from there, or as a full, until the damaged snapshots are forgotten.  A pack the
    index lists but that is gone stops the backup: until `repair index`, it would deduplicate against
    blobs that are not there.  The manifest blobs of a chain passed over that do not read are added to
    ``damaged``."""
    broken = broken_chains({s.id: s.parent for s in snapshots})
    index = repo.index
    for snap in reversed(same):
        if snap.id in broken or not all(
                bytes.fromhex(h) in index for m in repo.chain_of(snap, snapshots) for h in m.manifest):
            continue
        tree = repo.tree(snap, snapshots)
        try:
            head = next(tree, None)
        except MissingObject:  # an indexed pack is gone: dedup against that index would reference it
            raise
        except CorruptObject:
            damaged |= {b for m in repo.chain_of(snap, snapshots) for b in map(bytes.fromhex, m.manifest)
                        if not _reads(repo, b)}
            continue
        return snap, itertools.chain(() if head is None else (head,), tree)
    return None, iter(())


def _reads(repo: Repo, blob_id: bytes) -> bool:
    try:
        repo.read_blob(blob_id, verify=True)
    except CorruptObject:
        return False
    return True


@dataclass
class DeltaPolicy:
    """Which new chunks are stored as deltas, and against what: one policy for a backup and an import.

    A new chunk of a file the parent has too (same path) is a delta against the parent's chunk that covers
    its middle byte, or at that chunk's turn to restart (or at the depth bound) the whole blob its chain
    starts from (``Repo.base_for``, store/deltabase.py); kept when smaller by ``margin`` (``prepare_blob``).
    ``sequence``: the backup's number in its series (``series``), which sets whose turn it is.
    """

    repo: Repo
    sequence: int = 0
    delta: bool = True
    no_delta: list[str] = field(default_factory=list)  # globs of paths never stored as deltas
    fixed_chunks: list[str] = field(default_factory=list)  # globs of paths cut at fixed offsets: deeper chains
    margin: float = DELTA_MARGIN
    lost: set[bytes] = field(default_factory=set)  # deltas a lost base left unreadable: stored again whole

    def file_bases(self, rel: bytes, prev: Entry | None) -> list[tuple[int, int, bytes]] | None:
        """(start, end, base id) of the parent version's chunks of the file at ``rel`` (``prev``, its
        entry in the parent), or None when none of its new chunks is to be a delta."""
        if prev is None or not self.delta or prev.type != T_FILE or not prev.chunks:
            return None
        if _matches(rel, self.no_delta):
            return None
        bound = FIXED_DELTA_DEPTH if _matches(rel, self.fixed_chunks) else CONTENT_DEFINED_DELTA_DEPTH
        turns = restart_turns(self.sequence, restart_phase(self.repo.blob_id, rel), bound)
        out = []
        pos = 0
        for i, cid in enumerate(prev.chunk_ids()):
            loc = self.repo.locate(cid)
            if loc is None:
                return None
            out.append((pos, pos + loc.raw_length, self.repo.base_for(cid, bound, i in turns)))
            pos += loc.raw_length
        return out

    def base_at(self, bases: list[tuple[int, int, bytes]], bi: int, pos: int, n: int) -> tuple[bytes | None, int]:
        """(base id or None, cursor) for the new chunk of ``n`` bytes at ``pos`` of a file, from its
        ``file_bases``: the one that covers the chunk's middle byte.  ``bi``: the cursor from the call for the
        chunk before (0 for the first), as chunks come in order."""
        mid = pos + n // 2
        while bi < len(bases) and bases[bi][1] <= mid:
            bi += 1
        if bi < len(bases) and bases[bi][0] <= mid:
            return bases[bi][2], bi
        return None, bi

    def usable(self, blob_id: bytes, base_id: bytes | None) -> bytes | None:
        """``base_id`` for the new chunk ``blob_id``, or None: not itself, nor for a chunk stored again whole
        because its delta lost its base (``Repo.withhold_unreadable_deltas``)."""
        if base_id is None or base_id == blob_id or blob_id in self.lost:
            return None
        return base_id

    def store(self, writer: BlobWriter | CountingWriter, batch: list[tuple[bytes, bytes, bytes | None]],
              level: int | None, warnings: list[str]) -> None:
        """Compress and store a batch of (id, data, base id or None); its delta bases are read together
        (neighbours in a pack coalesced).  A damaged base's chunks are stored whole, with a warning: the
        chunk is at hand, and a delta was only to make it smaller.  A base whose pack the index lists but
        that is gone is MissingObject: `repair index` first, as for a parent."""
        base_ids = [b for _, _, b in batch if b is not None]
        try:
            bases = dict(zip(base_ids, self.repo.read_blobs(base_ids))) if base_ids else {}
        except MissingObject:
            raise
        except CorruptObject:
            bases = self._readable_bases(base_ids, warnings)
        writer.store_many(self.repo.prepare_blobs(batch, bases, self.margin, level))

    def _readable_bases(self, base_ids: list[bytes], warnings: list[str]) -> dict[bytes, Plaintext]:
        bases: dict[bytes, Plaintext] = {}
        for b in dict.fromkeys(base_ids):
            try:
                bases[b] = self.repo.read_blob(b)
            except MissingObject:
                raise
            except CorruptObject as exc:
                warnings.append(f"delta base {b.hex()} is damaged ({exc.reason}): the chunk that would have "
                                "been stored against it is stored whole; `chunkvault check --read-data` "
                                "names what the damage takes down")
        return bases


class Backup:
    def __init__(self, repo: Repo, options: BackupOptions):
        self.repo = repo
        self.opt = options
        self._ignore = (IGNORE_INODE if options.ignore_inode else 0) | (IGNORE_CTIME if options.ignore_ctime else 0)
        self._xattrs_known = True  # the parent's entries hold the attributes this backup records (set by _run)
        self._racy = NEVER_RACY  # the times within which the parent's entries are not taken on them (by _run)
        self.racy_reads = 0  # files read again only for their racy times
        self.warnings: list[str] = []
        self.unreadable: list[str] = []
        self._lock: RepoLock | None = None
        self._damaged: set[bytes] = set()  # manifest blobs of a parent's chain that do not read
        self.changed = False  # an entry differs from the parent's, is new or is gone: a full then holds a change
        self.writer: BlobWriter | None = None
        self._pool = ThreadPoolExecutor(WORKERS)
        self._readers = ThreadPoolExecutor(READERS)
        self._run_filling: _ReadRun | None = None
        self._abort = threading.Event()  # set when the backup fails: a reader stops inside a long file
        self._read_buffers = threading.local()  # each reading thread's chunker buffer, reused file after file
        self._inflight: deque[Future[None]] = deque()
        self._slots = threading.Semaphore(2 * WORKERS + 2)
        self._slots_lock = threading.Lock()
        self._batch: list[tuple[bytes, bytes, bytes | None]] = []
        self._batch_bytes = 0
        self._batch_limit = BATCH_BYTES
        self._batch_lock = threading.Lock()  # readers add chunks to one batch
        self._count_lock = threading.Lock()  # readers add to read_bytes
        self.counts = {"new_files": 0, "changed_files": 0, "unchanged_files": 0, "deleted": 0,
                       "read_bytes": 0}
        self._unchanged_bytes = 0  # of the unchanged files matched by the walk: progress only
        self._total: TreeTotal | None = None  # the tree's files and bytes counted beside the walk: progress only
        self._hardlinks: dict[tuple[int, int], _Link] = {}  # (device, inode) of each multiply-linked file walked
        self._links_waiting: dict[bytes, tuple[_Link, os.stat_result]] = {}  # its paths not settled yet, their lstat
        self._unread: set[bytes] = set()  # paths not read, kept from the parent, to list unreadable when settled
        self._attrs_unread: set[bytes] = set()  # paths read but for their extended attributes, likewise
        #: Of ``unreadable``, the paths whose extended attributes alone could not be read (their data is this backup's).
        self.unreadable_attrs: set[str] = set()
        self._changed_unnamed = 0  # files that changed while being read, when the session repairs them
        self._roots: list[bytes] = []  # the source roots on disk, longest first (``records``)
        self._listing = options.listing
        self._uid_ok = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        self._last_progress = float("-inf")
        # which new chunks are deltas: the series' number and the lost deltas are set once known (``_run``)
        self.deltas = DeltaPolicy(repo, 0, options.delta, list(options.no_delta), list(options.fixed_chunks),
                                  options.delta_margin)
        self._started = time.monotonic()
        self._owner_names: dict[str, Callable[[int], str | None]] = {}  # names_of's lookups (a tar's own names)

    # --- parallel chunk storage ---------------------------------------------------

    def _store_chunks(self, batch: list[tuple[bytes, bytes, bytes | None]]) -> None:
        assert self.writer is not None
        self.deltas.store(self.writer, batch, self.opt.compression_level, self.warnings)

    def _submit(self, blob_id: bytes, data: bytes, base_id: bytes | None) -> None:
        """Queue a new chunk for compression and sealing; small chunks travel in batches."""
        with self._batch_lock:
            self._batch.append((blob_id, data, base_id))
            self._batch_bytes += len(data)
            if base_id is not None:
                self._batch_limit = DELTA_BATCH_BYTES
            if self._batch_bytes < self._batch_limit and len(self._batch) < BATCH_CHUNKS:
                return
            batch, self._batch, self._batch_bytes, self._batch_limit = self._batch, [], 0, BATCH_BYTES
        self._send(batch)

    def _flush_batch(self) -> None:
        with self._batch_lock:
            batch, self._batch, self._batch_bytes, self._batch_limit = self._batch, [], 0, BATCH_BYTES
        if batch:
            self._send(batch)

    def _send(self, batch: list[tuple[bytes, bytes, bytes | None]]) -> None:
        # A batch of delta chunks is up to four times the bytes, its bases as many again: it takes two slots.
        slots = 2 if any(b is not None for _, _, b in batch) else 1
        with self._slots_lock:  # two readers taking slots one at a time could each hold half of what they need
            for taken in range(slots):
                self._take_slot(taken)
        try:
            fut = self._pool.submit(self._store_chunks, batch)
        except BaseException:  # no thread to run it (the process or thread limit), or the pool shut down
            self._slots.release(slots)
            raise
        fut.add_done_callback(lambda _f: self._slots.release(slots))
        with self._batch_lock:
            self._inflight.append(fut)
            while self._inflight and self._inflight[0].done():
                self._inflight.popleft().result()

    def _take_slot(self, taken: int) -> None:
        """Wait for a slot of the compression pool (``taken`` already held by this batch), or give up with
        _Stopped once the backup has failed: a batch queued before the pool failed to start a thread (the
        process or thread limit, ``ulimit -u``) never ran to free its slot, and the reader waiting here kept
        the backup from ending, SIGTERM or not."""
        while not self._slots.acquire(timeout=SLOT_POLL_SECONDS):
            if self._abort.is_set():
                if taken:
                    self._slots.release(taken)
                raise _Stopped

    def _drain(self) -> None:
        """Wait for every chunk sent to be stored (from the main thread), reporting progress meanwhile: the
        uploads behind a slow link outlast the reading, and the counts went silent until the end."""
        self._flush_batch()
        while self._inflight:
            try:
                self._inflight[0].result(timeout=0.5)
            except FutureTimeout:
                self._maybe_progress()
                continue
            self._inflight.popleft()

    # --- file data -----------------------------------------------------------------

    def _with_data_indexed(self, records: Iterator[Record]) -> Iterator[Record]:
        """The parent's records, an entry whose chunks are not all in the index (a repair dropped a damaged
        blob) marked as read while changing, so that its file is read again: a backup never records a
        file by reference to data that is gone."""
        indexed = self.repo.index.has_all
        records = iter(records)
        while batch := list(itertools.islice(records, 1024)):  # one native call for a thousand records
            if not indexed(b"".join(r.entry.chunks for r in batch if r.entry is not None)):
                batch = [Record(r.op, r.path, replace(r.entry, flags=r.entry.flags | F_CHANGED_DURING_READ))
                         if r.entry is not None and r.entry.chunks and not indexed(r.entry.chunks) else r
                         for r in batch]
            yield from batch

    def _read_stream(self, f: BinaryIO, rel: bytes, prev: Entry | None, size_hint: int | None = None,
                     report: bool = True) -> tuple[bytes, bytes, int]:
        """(digest, chunk ids, size) of a stream, storing its new chunks; ``report``: progress from this thread."""
        return self._take_chunks(self._chunks(f, rel, size_hint), rel, prev, report)

    def _take_chunks(self, chunks: Iterable[bytes], rel: bytes, prev: Entry | None, report: bool
                     ) -> tuple[bytes, bytes, int]:
        """(digest, chunk ids, size) of a file's chunks, storing the new ones."""
        assert self.writer is not None
        deltas = self.deltas
        bases = deltas.file_bases(rel, prev)
        inspector = self.opt.session.inspector(rel) if self.opt.session is not None else None
        bi = 0
        hasher = blake3.blake3()
        ids = bytearray()
        pos = 0
        last: bytes | None = None  # a chunk given again as the same object (a hole's zeros): its id known
        bid = b""
        for chunk in chunks:
            n = len(chunk)
            hasher.update(chunk)
            if inspector is not None:
                inspector.feed(chunk)
            if chunk is not last:
                bid, last = self.repo.blob_id(chunk), chunk
            ids += bid
            if self.writer.claim(bid):
                base_id = None
                if bases:
                    base_id, bi = deltas.base_at(bases, bi, pos, n)
                    base_id = deltas.usable(bid, base_id)
                self._submit(bid, chunk, base_id)
            pos += n
            with self._count_lock:
                self.counts["read_bytes"] += n
            if report:
                self._maybe_progress()
            elif self._abort.is_set():
                raise _Stopped
        if inspector is not None:
            inspector.finish()
        return hasher.digest(), bytes(ids), pos

    def _chunks(self, f: BinaryIO, rel: bytes, size_hint: int | None) -> Iterator[bytes]:
        """The chunks of a file: at fixed offsets for ``fixed_chunks`` paths, else by content.

        A small file is one chunk: read it in one call instead of through the chunker's buffers.
        The call asks for one byte more than the size the walk saw; when exactly that size comes back,
        the end is found without a second read (the fstat after reading catches a file that grew; one read past
        that size goes on from the bytes read).
        """
        if _matches(rel, self.opt.fixed_chunks):
            yield from fixed_chunks(f, self.opt.fixed_chunk_size)
            return
        if size_hint is not None and size_hint <= self.repo.chunker_params.min_size:
            data = f.read(size_hint + 1)
            while len(data) < size_hint:  # short: read on until the end, or past the size seen
                part = f.read(size_hint + 1 - len(data))
                if not part:
                    break
                data += part
            if len(data) <= size_hint:  # all of it: it did not grow while we looked
                if data:
                    yield data
                return
            f = _Prefixed(data, f)  # type: ignore[assignment]
        buffer = getattr(self._read_buffers, "buffer", None)
        if buffer is None:
            buffer = self._read_buffers.buffer = empty_buffer(READ_BYTES)  # pages resident as used
        yield from self.repo.chunker.chunks(f, READ_BYTES, size_hint, buffer)

    def _file_entry(self, rel: bytes, path: bytes, st: os.stat_result, prev: Entry | None, notes: list[str]
                    ) -> Entry | _ReadRun:
        """The entry of a regular file: the parent's data when its stat fields say so, else the run of files
        to read it joins (the last of its files)."""
        e = self._base_entry(rel, st, T_FILE, prev)
        if self._kept_file(e, path, st, prev, notes):
            return e
        run = self._run_filling
        if run is None:
            run = self._run_filling = _ReadRun()
        run.files.append((e, path, st, prev))
        run.size += st.st_size
        if len(run.files) >= READ_RUN_FILES or run.size >= READ_RUN_BYTES:
            self._start_run()
        return run

    def _kept_file(self, e: Entry, path: bytes, st: os.stat_result, prev: Entry | None, notes: list[str]) -> bool:
        """Whether the file's stat fields say its data is the parent's: then ``e`` takes it, unread."""
        if (prev is None or self.opt.reread or prev.type != T_FILE
                or prev.flags & (F_UNREADABLE | F_CHANGED_DURING_READ)
                or prev.size != st.st_size or prev.mtime_ns != st.st_mtime_ns
                or prev.ctime_ns != e.ctime_ns or prev.ino != e.ino):
            return False
        if not _settled(st, self._ignore, self._racy):
            self.racy_reads += 1
            return False
        e.digest, e.chunks, e.size = prev.digest, prev.chunks, prev.size
        self._xattrs(e, path, path, st, prev, notes)
        return True

    def _start_run(self) -> None:
        """Hand the run being filled to a reader."""
        run, self._run_filling = self._run_filling, None
        if run is not None:
            run.future = self._readers.submit(self._read_run, run)

    def _read_run(self, run: _ReadRun) -> list[_FileRead]:
        """Read a run: its files of at most one chunk in one native call first (a system call each that gave
        up the interpreter lock waited to get it back behind the busy threads), then each file's entry."""
        try:
            run.reads = self._read_files(run.files)
            return run.reads
        finally:
            run.ended = True

    def _read_files(self, files: list[tuple[Entry, bytes, os.stat_result, Entry | None]]) -> list[_FileRead]:
        small = [i for i, (e, _, st, _) in enumerate(files) if self._small(e, st)]
        reads: dict[int, SmallRead] = {}
        if small:
            got = read_small_files([files[i][1] for i in small], [files[i][2].st_size + 1 for i in small],
                                   self.opt.xattrs)
            reads = dict(zip(small, got))
        out = []
        for i, (e, path, st, prev) in enumerate(files):
            if self._abort.is_set():
                raise _Stopped
            out.append(self._read_file(e, path, st, prev, reads.get(i)))
        return out

    def _small(self, e: Entry, st: os.stat_result) -> bool:
        """Whether a file is read whole, as one chunk: at most the least chunk size, one link (a multiply-linked
        file is read through a descriptor whose fstat tells whether it is the file the walk saw)."""
        return (st.st_nlink == 1 and st.st_size <= self.repo.chunker_params.min_size
                and not _matches(e.path, self.opt.fixed_chunks))

    def _read_file(self, e: Entry, path: bytes, st: os.stat_result, prev: Entry | None,
                   small: SmallRead | None = None) -> _FileRead:
        """On a reader thread: fill in ``e`` from the file's bytes (``small``: read already, whole).  Its
        warnings are returned, to be reported when the entry takes its place in the manifest."""
        notes: list[str] = []
        if isinstance(small, OSError) and not isinstance(small, FileNotFoundError) and small.errno != errno.ELOOP:
            return self._unreadable_file(e, path, prev, notes, small)
        if small is not None:
            whole = self._read_small(e, path, st, prev, notes, small)
            if whole is not None:
                return _FileRead(whole, notes)
        replaced = False
        try:
            fd = open_source_file(path, (st.st_dev, st.st_ino))
        except FileNotFoundError:
            return _FileRead(None, [_vanished(path)])
        except OSError as exc:
            # ELOOP: a symbolic link was at the path (not followed), and another file may have taken its place
            # since: that one is read as a file saved by a rename is, rather than the path called unreadable
            if not isinstance(exc, Replaced) and not (exc.errno == errno.ELOOP and _regular_now(path)):
                return self._unreadable_file(e, path, prev, notes, exc)
            beneath = self._open_beneath_root(path)
            if beneath is None:
                return self._replaced(path, prev, notes)
            fd, replaced = beneath, True
        try:
            self._xattrs(e, fd, path, st, prev, notes)
            try:
                reader = HoleSkippingReader(fd) if may_have_holes(st) and seekable(fd) else _FdReader(fd)
                e.digest, e.chunks, e.size = self._read_stream(reader, e.path, prev, st.st_size, report=False)
            except OSError as exc:
                return self._unreadable_file(e, path, prev, notes, exc)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino):
            if replaced:  # before it was opened (saved by a rename): recorded as the file it is now
                e = replace(self._base_entry(e.path, after, T_FILE, prev), size=e.size, digest=e.digest,
                            chunks=e.chunks, xattrs=e.xattrs, flags=e.flags)
                notes.append(f"replaced during backup (stored as it is now): {os.fsdecode(path)}")
            else:
                notes.append(f"replaced while being read (stored as read): {os.fsdecode(path)}")
            e.flags |= F_CHANGED_DURING_READ
            return _FileRead(e, notes, same_file=False)
        self._check_unchanged(e, path, st, (after.st_size, after.st_mtime_ns, after.st_ctime_ns), notes)
        return _FileRead(e, notes)

    def _read_small(self, e: Entry, path: bytes, st: os.stat_result, prev: Entry | None, notes: list[str],
                    small: SmallRead) -> Entry | None:
        """A file of at most one chunk from what ``read_small_files`` gave; None when it is gone, or grew past
        the size the walk saw (then read as a stream, like any other file)."""
        if isinstance(small, OSError):
            return None
        data, size, mtime_ns, ctime_ns, xattrs, dev, ino = small
        if len(data) > st.st_size or (dev, ino) != (st.st_dev, st.st_ino):  # read again to tell which
            return None
        try:
            if xattrs == 0:
                e.xattrs = b""
            else:
                self._xattrs(e, path, path, st, prev, notes)
        except FileNotFoundError:
            return None
        e.digest, e.chunks, e.size = self._take_chunks((data,) if data else (), e.path, prev, report=False)
        self._check_unchanged(e, path, st, (size, mtime_ns, ctime_ns), notes)
        return e

    def _open_beneath_root(self, path: bytes) -> int | None:
        """The file now at ``path``, which is not the one the walk saw there (saved by a rename since, say),
        opened from its source root down without following a symbolic link; None where a directory between
        is one now (swapped for one since: the path leads out of the tree) or it cannot be opened so."""
        try:
            if path in self._roots:  # a file given as a source: its path is the tree
                return open_source_file(path)
            root = next((r for r in self._roots if path.startswith(r.rstrip(b"/") + b"/")), None)
            return None if root is None else open_beneath(root, path)
        except OSError:
            return None

    def _replaced(self, path: bytes, prev: Entry | None, notes: list[str]) -> _FileRead:
        """The path holds another file than the one the walk saw, and leads out of the tree now (or cannot be
        opened from its root down): not read.  The parent's copy stays, as the last backup found the file,
        else it is left out; the next backup reads it, whatever it is then."""
        if prev is not None and prev.type == T_FILE and not unread(prev):
            return _FileRead(prev, [*notes, f"replaced during backup (kept as the last backup found it): "
                                            f"{os.fsdecode(path)}"], same_file=False)
        return _FileRead(None, [*notes, f"replaced during backup (left out until the next backup): "
                                        f"{os.fsdecode(path)}"])

    def _unreadable_file(self, e: Entry, path: bytes, prev: Entry | None, notes: list[str], exc: OSError
                         ) -> _FileRead:
        """A file that could not be opened or read to the end: the parent's entry when it had one, flagged
        unreadable with the parent's data (as ``_kept_entry``: an error that may pass is no reason to lose the
        last good copy), else an empty entry flagged unreadable.  A path that is no longer a regular file
        changed type since the walk saw it: left out until the next backup, as a replaced symbolic link is."""
        try:
            now = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):  # gone, or its directory replaced by a file
            return _FileRead(None, [*notes, _vanished(path)])
        except OSError:
            now = None
        if exc.errno in NOT_REGULAR_ERRNOS or now is not None and not stat.S_ISREG(now.st_mode):
            return _FileRead(None, [*notes, f"changed type during backup (left out until the next backup): "
                                           f"{os.fsdecode(path)}"])
        notes.append(_cannot_read(path, exc))
        if prev is not None and prev.type == T_FILE:  # the parent's data, not the file walked: no link names it
            return _FileRead(replace(prev, flags=prev.flags | F_UNREADABLE), notes, same_file=False)
        e.flags |= F_UNREADABLE
        e.digest, e.chunks, e.size = b"", b"", 0
        return _FileRead(e, notes)

    @staticmethod
    def _check_unchanged(e: Entry, path: bytes, st: os.stat_result, after: tuple[int, int, int],
                         notes: list[str]) -> None:
        """Flag a file whose (size, mtime, ctime) after reading differ from the walk's, or whose length read
        does: it changed while being read, or its size is not what it holds (/proc and /sys files, some
        FUSE files: their times do not tell a change either), which the warning says as it is.  Flagged, it
        is read again by the next backup."""
        if after != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            notes.append(f"{CHANGED_WHILE_READ}{os.fsdecode(path)}")
        elif e.size != st.st_size:
            notes.append(f"read {e.size} bytes where its size says {st.st_size} (stored as read): "
                         f"{os.fsdecode(path)}")
        else:
            return
        e.flags |= F_CHANGED_DURING_READ

    def _xattrs(self, e: Entry, target: bytes | int, path: bytes, st: os.stat_result, prev: Entry | None,
                notes: list[str]) -> None:
        """Set the extended attributes of ``e`` (``target``: its path or open fd): the parent's when the change
        time, which every change of them moves, says they are the same.  Attributes that cannot be read keep
        the parent's, as data that cannot be read does (an error that may pass is no reason to drop an ACL),
        and flag the entry, which the next backup then reads again; the path is listed unreadable."""
        if not self.opt.xattrs:
            e.xattrs = b""
            return
        same_type = prev is not None and prev.type == e.type and self._xattrs_known
        if (same_type and prev.ctime_ns == st.st_ctime_ns and not prev.flags & F_CHANGED_DURING_READ
                and not self._ignore & IGNORE_CTIME and not _racy(st.st_ctime_ns, self._racy)):
            e.xattrs = prev.xattrs
            return
        try:
            e.xattrs = read_xattrs(target)
        except FileNotFoundError:
            raise
        except OSError as exc:
            notes.append(f"cannot read extended attributes of {os.fsdecode(path)}: {exc.strerror}")
            e.xattrs = prev.xattrs if same_type else b""
            e.flags |= F_CHANGED_DURING_READ
            self._attrs_unread.add(e.path)

    def _base_entry(self, rel: bytes, st: os.stat_result, etype: int, prev: Entry | None = None) -> Entry:
        """The entry's stat fields; those the backup ignores are kept from ``prev`` (of the same type), so
        an entry they alone would change compares equal to it."""
        e = Entry(rel, etype, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, held_ns(st.st_mtime_ns),
                  0, held_ns(st.st_ctime_ns), st.st_ino, st.st_dev, 0)
        if self._ignore and prev is not None and prev.type == etype:
            if self._ignore & IGNORE_INODE:
                e.ino, e.dev = prev.ino, prev.dev
            if self._ignore & IGNORE_CTIME:
                e.ctime_ns = prev.ctime_ns
        return e

    def _entry(self, rel: bytes, path: bytes, st: os.stat_result, ok: bool, prev: Entry | None,
               notes: list[str]) -> Entry | _ReadRun | None:
        """The entry for a walked path (None: skipped, with a note why); a file to read joins a run.  A path
        that cannot be read now, its lstat or another call on it failing, is one warning, never the end of
        the backup; FileNotFoundError when it vanished."""
        if isinstance(st, StatFailed):  # the walk warned
            return self._kept_entry(rel, prev)
        if not NS_MIN < st.st_mtime_ns < NS_MAX:
            notes.append(f"modification time before 1677 or after 2262, stored as the nearest of those ends: "
                         f"{os.fsdecode(path)}")
        try:
            return self._typed_entry(rel, path, st, ok, prev, notes)
        except FileNotFoundError:
            raise
        except OSError as exc:
            notes.append(_cannot_read(path, exc))
            return self._kept_entry(rel, prev)

    def _kept_entry(self, rel: bytes, prev: Entry | None) -> Entry | None:
        """What a path that cannot be read now keeps: the parent's entry, since an error that may pass is no
        reason to record it deleted, the path listed unreadable.  A directory's is flagged unreadable (what
        is below it was not walked), and a file's (its data is an earlier backup's).  A hard link is not kept:
        the path it names may be gone."""
        self._unread.add(rel)
        if prev is None or prev.type == T_HARDLINK:
            return None
        if prev.type in (T_DIR, T_FILE):
            return replace(prev, flags=prev.flags | F_UNREADABLE)
        return prev

    def _typed_entry(self, rel: bytes, path: bytes, st: os.stat_result, ok: bool, prev: Entry | None,
                     notes: list[str]) -> Entry | _ReadRun | None:
        """``_entry`` by the file type the walk's lstat gave."""
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            e = self._base_entry(rel, st, T_DIR, prev)
            self._xattrs(e, path, path, st, prev, notes)
            if not ok:
                e.flags |= F_UNREADABLE
            return e
        if stat.S_ISREG(mode):
            if st.st_nlink > 1:
                return self._linked_entry(rel, path, st, prev, notes)
            return self._file_entry(rel, path, st, prev, notes)
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                return self._replaced_symlink(rel, path, prev, notes)
            e = self._base_entry(rel, st, T_SYMLINK, prev)
            e.target = target
            e.size = len(target)
        elif stat.S_ISFIFO(mode):
            e = self._base_entry(rel, st, T_FIFO)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e = self._base_entry(rel, st, T_CHARDEV if stat.S_ISCHR(mode) else T_BLOCKDEV)
            e.rdev = st.st_rdev
        else:
            notes.append(f"skipped socket or unknown file type: {os.fsdecode(path)}")
            return None
        self._xattrs(e, path, path, st, prev, notes)
        return e

    def _replaced_symlink(self, rel: bytes, path: bytes, prev: Entry | None, notes: list[str]
                          ) -> Entry | _ReadRun | None:
        """The entry of a symlink replaced since the walk's lstat: what the path is now, or nothing (as if it
        had vanished) when that is a directory, whose contents were not walked, or a symlink again."""
        now = os.lstat(path)
        if stat.S_ISDIR(now.st_mode) or stat.S_ISLNK(now.st_mode):
            notes.append(f"changed type during backup (left out until the next backup): {os.fsdecode(path)}")
            return None
        notes.append(f"changed type during backup (recorded as it is now): {os.fsdecode(path)}")
        return self._typed_entry(rel, path, now, True, prev, notes)

    def _linked_entry(self, rel: bytes, path: bytes, st: os.stat_result, prev: Entry | None, notes: list[str]
                      ) -> Entry | _ReadRun:
        """A path of a multiply-linked file: the first walked is read as the file, the later ones are hard
        links to it until their turn in the manifest (``_settle_link``) tells which path holds the data."""
        key = (st.st_dev, st.st_ino)
        link = self._hardlinks.get(key)
        if link is None:
            link = self._hardlinks[key] = _Link(rel)
            self._links_waiting[rel] = (link, st)
            return self._file_entry(rel, path, st, prev, notes)
        self._links_waiting[rel] = (link, st)
        e = self._base_entry(rel, st, T_HARDLINK)
        e.target = link.first
        e.size = st.st_size
        return e

    def _settle_link(self, item: _Waiting, diff: bool, same_file: bool) -> None:
        """Settle a path of a multiply-linked file in manifest order.  The first whose entry holds the file's
        data (its file entry read, or kept from the parent) is what the later ones name.  When the path
        walked first vanished, was replaced or could not be read, the next link is read as the file."""
        link, st = self._links_waiting.pop(item.rel)
        e = item.entry
        if e is not None and e.type == T_HARDLINK:
            if link.holder is not None:
                # the file as it was read, not as this path was walked (it may have grown in between):
                # a link restores the holder's data, and is verified against it
                held = link.held
                assert held is not None
                like = (link.holder, held.size, held.mode, held.uid, held.gid, held.mtime_ns)
                if (e.target, e.size, e.mode, e.uid, e.gid, e.mtime_ns) != like:
                    e.target, e.size, e.mode, e.uid, e.gid, e.mtime_ns = like
                    item.settle(e, diff)
                return
            read = self._read_link(item, st)
            item.notes += read.notes
            item.settle(read.entry, diff)
            e, same_file = read.entry, read.same_file
        if e is not None and e.type == T_FILE and not e.flags & F_UNREADABLE and same_file:
            link.holder, link.held = item.rel, e

    def _read_link(self, item: _Waiting, st: os.stat_result) -> _FileRead:
        """A later link read as the file itself, on this thread: a race that leaves no reader to wait for."""
        e = self._base_entry(item.rel, st, T_FILE, item.prev)
        notes: list[str] = []
        try:
            if self._kept_file(e, item.path, st, item.prev, notes):
                return _FileRead(e, notes)
        except FileNotFoundError:
            return _FileRead(None, [_vanished(item.path)])
        return self._read_file(e, item.path, st, item.prev)

    def _maybe_progress(self, unchanged: int = 0, unchanged_bytes: int = 0) -> None:
        """Report the counts at most twice a second (from the main thread only); ``unchanged`` and
        ``unchanged_bytes``: files not yet in them."""
        if self.opt.progress is None:
            return
        if time.monotonic() - self._last_progress >= 0.5:
            self.opt.progress(self._progress_counts(unchanged, unchanged_bytes))
            # From the callback's return: one that takes 0.5 s or more was called again for every file.
            self._last_progress = time.monotonic()

    def _progress_counts(self, unchanged: int = 0, unchanged_bytes: int = 0, final: bool = False) -> dict:
        """The counts, with the files and bytes of the tree once ``TreeTotal`` has counted them all
        (``total_files``, ``total_bytes``: None until then; at the end, what was walked, where a backup
        quicker than its count ended with no total on its last report)."""
        counts = dict(self.counts)
        counts["unchanged_files"] += unchanged
        counts["unchanged_bytes"] = self._unchanged_bytes + unchanged_bytes
        total = self._total
        counts["total_files"] = total.files if total is not None and total.done else None
        counts["total_bytes"] = total.bytes if total is not None and total.done else None
        if final and counts["total_bytes"] is None:
            counts["total_files"] = counts["new_files"] + counts["changed_files"] + counts["unchanged_files"]
            counts["total_bytes"] = counts["read_bytes"] + counts["unchanged_bytes"]
        return counts

    # --- the walk -------------------------------------------------------------------

    def records(self, source: SourceWalk, parent_tree: Iterator[Record], kind: str,
                stats: ManifestStats) -> Iterator[Record]:
        """Manifest records of this backup: every entry (full) or the changes (diff).

        The walk and the parent's tree are merged in path order.  Most entries of a
        repeated backup are unchanged files, directories and symlinks under the same
        path as the parent's next entry: runs of them are matched in C as the walk
        queued them (``SourceWalk.skip_unchanged``), others one at a time here, unchanged
        files decided on the path and the stat fields alone (no sort key, no new
        entry); both are counted in locals until the next other entry.  Files to
        read go to the reader threads; every record then waits in ``pending`` until
        those before it are settled, so the manifest keeps its order."""
        diff = kind == KIND_DIFF
        counts = self.counts
        progress = self.opt.progress is not None
        listing = self._listing is not None
        list_same = listing and self.opt.list_unchanged
        reporting = getattr(source, "report_excluded", False)
        # Entries taken from the parent unseen: only when its attributes are this backup's.
        take_unseen = not self.opt.reread and self._xattrs_known
        ignore, racy = self._ignore, self._racy
        p = next(parent_tree, None)
        cut: bytes | None = None
        same_files = same_bytes = 0
        pending: deque[Record | Listed | _Waiting] = deque()
        # A full manifest lists the unchanged entries too; so does a listing of them.
        taken: list[Record] | None = None if diff and not list_same else []
        # Longest first: a file is opened again from the root it lies below (``_open_beneath_root``).
        self._roots = sorted((path for _, path in getattr(source, "roots", ())), key=len, reverse=True)
        walk = iter(source)
        while True:
            if p is not None and take_unseen and (diff or not pending):  # a full's records wait for none before them
                files, dirs, links, size, p = source.skip_unchanged(p, parent_tree, taken, OP_ENTRY, T_FILE,
                                                                    T_DIR, T_SYMLINK, ignore, racy)
                if files or dirs or links:
                    same_files += files
                    same_bytes += size
                    counts["unchanged_files"] += links
                    stats.add_entries(dirs, links)
                    if taken:
                        if list_same:
                            self._list_unchanged(taken, pending)
                        if not diff:
                            yield from taken
                        taken.clear()
                    if progress:
                        self._maybe_progress(same_files, same_bytes)
                    continue
            walked = next(walk, None)
            if walked is None:
                break
            rel, path, st, ok = walked
            prev = key = None
            if p is not None and p.path != rel:  # the parent's entries before this one are gone
                key = sort_key(rel)
                while p is not None and (pkey := p.key) < key:
                    self._count_removed(p.entry)
                    if listing:
                        pending.append(Listed("removed", p.path, p.entry))
                    if diff and not (cut is not None and (pkey == cut or pkey.startswith(cut + b"\x00"))):
                        cut = pkey
                        pending.append(delete_record(p.path))
                    p = next(parent_tree, None)
            if reporting and type(st) is Excluded:  # left out: the parent's entry there, if any, goes as removed
                pending.append(Listed("excluded", rel, None, st.rule))
                continue
            if p is not None and p.path == rel:  # same path, same sort key
                prev = p.entry
                p = next(parent_tree, None)
            if prev is not None and take_unseen and _unchanged_file(prev, st, ignore, racy):
                same_files += 1
                same_bytes += prev.size
                if progress:
                    self._maybe_progress(same_files, same_bytes)
                if list_same:
                    self._list_unchanged([Record(OP_ENTRY, rel, prev)], pending)
                if not diff:
                    if not pending:  # nothing waits before it: no round through the queue
                        yield Record(OP_ENTRY, rel, prev)
                        continue
                    pending.append(Record(OP_ENTRY, rel, prev))
            else:
                if same_files:
                    counts["unchanged_files"] += same_files
                    self._unchanged_bytes += same_bytes
                    stats.add_files(same_files, same_bytes)
                    same_files = same_bytes = 0
                item = _Waiting(rel, path, prev)
                try:
                    e = self._entry(rel, path, st, ok, prev, item.notes)
                except FileNotFoundError:
                    item.notes.append(f"vanished during backup: {os.fsdecode(path)}")
                    e = None
                if isinstance(e, _ReadRun):
                    item.run, item.index = e, len(e.files) - 1
                    # Whatever the reader finds, a file that replaces a parent's directory drops its subtree.
                    if diff and prev is not None and prev.type != T_FILE:
                        cut = key or sort_key(rel)
                else:
                    item.settle(e, diff)
                    if item.record is not None and item.record.op != OP_ENTRY:
                        cut = key or sort_key(rel)
                pending.append(item)
                if not ok and e is not None and e.type == T_DIR and p is not None:
                    p = self._keep_unlisted(item, p, parent_tree, pending, stats, diff)
            while pending and (len(pending) > WINDOW or _ready(pending[0])):
                rec = self._settle(pending.popleft(), diff, stats, same_files)
                if rec is not None:
                    yield rec
        counts["unchanged_files"] += same_files
        self._unchanged_bytes += same_bytes
        stats.add_files(same_files, same_bytes)
        while pending:
            rec = self._settle(pending.popleft(), diff, stats, 0)
            if rec is not None:
                yield rec
        while p is not None:
            self._count_removed(p.entry)
            if listing:
                self._list("removed", p.path, p.entry)
            pkey = p.key
            if diff and not (cut is not None and (pkey == cut or pkey.startswith(cut + b"\x00"))):
                cut = pkey
                yield delete_record(p.path)
            p = next(parent_tree, None)

    def _list(self, change: str, path: bytes, entry: Entry | None, what: str | None = None) -> None:
        assert self._listing is not None
        self._listing(Listed(change, path, entry, what))

    def _list_unchanged(self, records: list[Record], pending: deque[Record | Listed | _Waiting]) -> None:
        """List the entries of ``records`` unchanged: now, or after the entries waiting before them."""
        if pending:
            pending.extend(Listed("unchanged", r.path, r.entry) for r in records)
        else:
            for r in records:
                self._list("unchanged", r.path, r.entry)

    def _list_settled(self, item: _Waiting) -> None:
        e, prev = item.entry, item.prev
        if e is None:
            if prev is not None:
                self._list("removed", item.rel, prev)
        elif not item.same:
            self._list("added" if prev is None else "modified", item.rel, e, what_changed(prev, e))
        elif self.opt.list_unchanged:
            self._list("unchanged", item.rel, e)

    def _keep_unlisted(self, item: _Waiting, p: Record | None, parent_tree: Iterator[Record],
                       pending: deque[Record | Listed | _Waiting], stats: ManifestStats, diff: bool
                       ) -> Record | None:
        """A directory that cannot be listed now keeps what the parent recorded below it, as an unreadable
        file keeps its parent entry: an error that may pass is no reason to record its contents deleted.
        A file whose data is no longer indexed is the exception (recorded deleted: nothing could restore
        it).  Returns the parent's next record after them."""
        prefix = item.rel + b"/" if item.rel else b""
        kept: set[bytes] = set()
        while p is not None and p.path.startswith(prefix):
            e = p.entry
            # A hard link kept names its first path, and one outside this directory is recorded anew by this
            # backup (another file there, or none): it would restore with that.  It goes, listed unreadable.
            lost = e is not None and e.type == T_HARDLINK and e.target not in kept
            if e is not None and (lost or e.chunks and not self.repo.index.has_all(e.chunks)):
                self._count_removed(e)
                if lost:
                    self.unreadable.append(os.fsdecode(p.path))
                if self._listing is not None:
                    pending.append(Listed("removed", p.path, e))
                if diff:
                    pending.append(delete_record(p.path))
            elif e is not None:
                kept.add(p.path)
                if self._listing is not None and self.opt.list_unchanged:
                    pending.append(Listed("unchanged", p.path, e))
                stats.count_entry(e)
                if e.type != T_DIR:
                    self.counts["unchanged_files"] += 1
                if not diff:
                    pending.append(Record(OP_ENTRY, p.path, e))
            p = next(parent_tree, None)
        if kept:
            item.notes.append(f"kept the {len(kept)} entries the parent snapshot has below "
                              f"{os.fsdecode(item.rel) or '.'}")
        return p

    def _settle(self, item: Record | Listed | _Waiting, diff: bool, stats: ManifestStats, unchanged: int
                ) -> Record | None:
        """The record ``item`` adds to the manifest, once it is its turn (waiting for its reader if need
        be), with its counts and warnings; ``unchanged``: the unchanged files not yet counted, for progress.
        A ``Listed`` (an entry a listing hears of in its turn) adds none."""
        if not isinstance(item, _Waiting):
            if isinstance(item, Listed):
                assert self._listing is not None
                self._listing(item)
                return None
            return item
        same_file = True  # the file read is the one walked (see _FileRead)
        if item.run is not None:
            run = item.run
            if run.future is None:  # the run still filling: a reader takes it now
                self._start_run()
            assert run.future is not None
            while run.reads is None:  # not read yet, or failed: the future then raises its error
                try:
                    run.future.result(timeout=0.5)
                except FutureTimeout:
                    self._maybe_progress(unchanged)
            read = run.reads[item.index]
            item.notes += read.notes
            item.settle(read.entry, diff)
            same_file = read.same_file
        if self._links_waiting and item.rel in self._links_waiting:
            self._settle_link(item, diff, same_file)
        if not item.same and (item.entry is not None or item.prev is not None):
            self.changed = True
        if self._listing is not None:
            self._list_settled(item)
        if self.opt.session is not None and self.opt.session.repairs_changes is not None and item.notes:
            named = [n for n in item.notes if not n.startswith(CHANGED_WHILE_READ)]
            self._changed_unnamed += len(item.notes) - len(named)
            self.warnings += named
        else:
            self.warnings += item.notes
        e = item.entry
        kept_unread = bool(self._unread) and item.rel in self._unread
        attrs_unread = bool(self._attrs_unread) and item.rel in self._attrs_unread
        not_read = kept_unread or e is not None and e.flags & F_UNREADABLE
        if not_read or attrs_unread:
            self._unread.discard(item.rel)
            self._attrs_unread.discard(item.rel)
            self.unreadable.append(os.fsdecode(item.rel) or ".")
            if not not_read:
                self.unreadable_attrs.add(self.unreadable[-1])
        prev = item.prev
        was_file = prev is not None and prev.type != T_DIR
        if e is None or e.type == T_DIR:
            if was_file:  # gone, or a directory now
                self._count_removed(prev)
            if e is None:
                return item.record
        else:
            self.counts["unchanged_files" if item.same else "changed_files" if was_file else "new_files"] += 1
        stats.count_entry(e)
        self._maybe_progress(unchanged)
        return item.record

    def _count_removed(self, e: Entry | None) -> None:
        """A parent's entry this backup does not have.  The file counts take in every entry but a directory
        (symbolic and hard links, FIFOs and devices too, as restic counts them), so the four add up."""
        self.changed = True
        if e is None or e.type != T_DIR:
            self.counts["deleted"] += 1

    def run(self, source: SourceWalk | None, paths: list[str], *,
            stream: BinaryIO | None = None, stdin_name: str | None = None, tar: "TarSource | None" = None
            ) -> BackupResult:
        # named for what the user ran: a forget refused beside an import-tar said "locked by backup"
        lock = (contextlib.nullcontext() if self.opt.dry_run
                else RepoLock(self.repo.remote, SHARED, "import-tar" if tar is not None else "backup",
                              wait=self.opt.lock_wait))
        self._lock = lock if isinstance(lock, RepoLock) else None
        try:
            with lock:
                self._started = time.monotonic()  # the duration recorded: from here (a wait for the lock left out)
                # Read the index only under the lock: a prune cannot drop what this backup dedups against.
                # Snapshot objects read before a wait for another command's lock (a forget rebasing, a
                # rewrite) are read again: a parent as it was would leave out of this snapshot what a
                # rewrite removed from the parent's.
                if self._lock is not None and self._lock.waited:
                    self.repo.drop_stale(index=False)
                if not self.opt.dry_run:  # and the settings as `config set` left them
                    self.repo.follow_settings(require_openable(self.repo.remote, self.repo.config.repo_id))
                snapshots = self.repo.snapshots()  # before the index: it then holds every listed snapshot's blobs
                if self.opt.judge is not None:
                    snapshots = self.opt.judge(snapshots)
                parent = find_snapshot(snapshots, self.opt.parent) if self.opt.parent is not None else None
                self.repo.fresh_index()
                return self._run(snapshots, parent, source, paths, stream=stream, stdin_name=stdin_name, tar=tar)
        finally:
            if source is not None:
                source.close()
            if self.opt.session is not None:
                self.opt.session.close()

    def _with_appendix(self, records: list[Record], kind: str, stats: ManifestStats, walk_warnings: list[str]
                       ) -> tuple[Iterator[Record], dict]:
        """The walk's records (all taken, so every file is read) with the session's files added in their
        places: stored as new files (nothing to build a delta on), each replacing what the walk or the
        parent had at its path; the session first told what the walk could not read."""
        assert self.opt.session is not None
        self.opt.session.walked([p for p in self.unreadable if p not in self.unreadable_attrs],
                                [*walk_warnings, *self.warnings])
        added, session_stats = self.opt.session.appendix()
        if self._changed_unnamed:
            self.warnings.append(f"{self._changed_unnamed} file(s) changed while being read (stored as read: "
                                 f"{self.opt.session.repairs_changes}; the next backup reads them again)")
        self.warnings += self.opt.session.notes
        extra = []
        for a in sorted(added, key=lambda a: sort_key(a.path)):
            kind = T_FILE if a.open is not None else T_DIR if a.link is None else T_SYMLINK
            e = Entry(a.path, kind, a.mode, a.uid, a.gid, a.mtime_ns, 0, a.mtime_ns)
            if kind == T_SYMLINK:
                assert a.link is not None
                e.target, e.size = a.link, len(a.link)
            elif a.open is not None:
                with a.open() as f:
                    e.digest, e.chunks, e.size = self._read_stream(f, a.path, None)
                self.counts["new_files"] += 1
            stats.count_entry(e)
            if self._listing is not None:
                self._list("added", a.path, e)
            extra.append(Record(OP_ENTRY, a.path, e))
        merged = apply(records, extra) if kind == KIND_FULL else compose(records, extra)
        return merged, session_stats

    def store_stream(self, stream: BinaryIO, rel: bytes, lock: RepoLock | None) -> tuple[bytes, list[bytes], int]:
        """(digest, chunk ids, size) of ``stream``, cut, deduplicated, compressed, packed and indexed as a
        backup stores a file, with no snapshot: for objects that name their chunks themselves (``wal/``,
        store/walarchive.py).  The caller holds ``lock`` (shared) from before the index was read until it has
        written what names the chunks, and confirms it first.  A dry run (``dry_run``) stores nothing and
        takes no lock: the ids alone, to compare with what is stored."""
        self._lock = lock
        writer = self._open_writer()
        try:
            digest, ids, size = self._read_stream(stream, rel, None)
            self._finish_writes()
        except BaseException as exc:
            writer.abandon(exc)
            raise
        finally:
            self._wind_down()
        return digest, [ids[i : i + 32] for i in range(0, len(ids), 32)], size

    def _open_writer(self) -> BlobWriter | CountingWriter:
        """The writer of this backup's blobs (a dry run's only counts them), guarded by the lock.  Chunks of
        deltas a lost base left unreadable are stored again whole, which readers prefer."""
        self.writer = CountingWriter(self.repo) if self.opt.dry_run else self.repo.writer()
        self.deltas.lost = self.repo.withhold_unreadable_deltas()
        if self._lock is not None:
            self.writer.guard = self._ensure_lock_held
        return self.writer

    def _finish_writes(self) -> None:
        """Every chunk sent stored, the writer's last pack and index written.  The lock is not looked at here:
        the index object's write asks for it (the writer's guard), then the snapshot's, and the last pack
        refers to nothing until then; looked at here too, it was a round trip more in a row."""
        assert self.writer is not None
        self._drain()
        self.writer.flush()

    def _wind_down(self) -> None:
        """Readers and compressors stopped (a no-op when all went well: they are idle by then), the writer
        closed."""
        self._abort.set()
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.writer is not None:
            self.writer.close()

    def _unindexed_note(self) -> str:
        """Where the parent cannot be read: stored packs in no index (their index objects lost?) are named,
        with what finds their blobs again; this backup stores what it reads of them once more."""
        unindexed = len(self.repo.unindexed_packs())
        if not unindexed:
            return ""
        return (f"; {unindexed} stored pack(s) are in no index (another backup's in flight, or their index "
                "objects lost: `repair index` finds what they hold, and this backup stores it again meanwhile)")

    def _owner_ids_inherited(self, parent: Snapshot | None, snapshots: list[Snapshot], uids: set[int],
                             gids: set[int]) -> dict | None:
        """The stats whose owner table a differential takes over for the entries it does not read again:
        its parent's, which covers the parent's chain.  A parent made before owner tables were kept has
        none: the ids of its whole tree are added to ``uids`` and ``gids`` instead, read once (the
        differentials after this one inherit them)."""
        if parent is None:
            return None
        if isinstance(parent.stats.get(OWNERS_KEY), Mapping):
            return parent.stats
        for rec in self.repo.tree(parent, snapshots):
            if rec.entry is not None:
                note_ids(rec.entry, uids, gids)
        return None

    def _run(self, snapshots: list[Snapshot], parent: Snapshot | None, source: SourceWalk | None, paths: list[str],
             *, stream: BinaryIO | None, stdin_name: str | None, tar: "TarSource | None" = None) -> BackupResult:
        """``snapshots``: the listing made under the lock; ``parent``: the one asked for, found in it."""
        repo = self.repo
        host = self.opt.host or socket.gethostname()
        same = series(snapshots, host, paths, stdin_name, self.opt.time)
        self.deltas.sequence = len(same)  # this backup's number in its series: sets whose turn it is to restart
        if parent is not None and self.opt.time is not None and parent.datetime > self.opt.time:
            self.warnings.append(f"the parent snapshot {parent.id[:8]} ({parent.time}) is newer than this "
                                 f"one's time ({iso(self.opt.time)}): a restore --until between the two "
                                 "finds this one")
        parent_tree: Iterator[Record] | None = None
        if parent is None and same:
            parent, parent_tree = usable_parent(repo, same, snapshots, self._damaged)
            if parent is not same[-1]:
                self.warnings.append(f"snapshot {same[-1].id[:8]} cannot be read in full (a snapshot or manifest "
                                     f"of its chain is damaged: see `check`): the parent is "
                                     f"{parent.id[:8] if parent else 'none (a full snapshot is made)'}"
                                     + self._unindexed_note())
        chain = repo.chain_of(parent, snapshots) if parent is not None else []
        s = repo.config.settings
        kind = choose_kind(self.opt.kind, chain, s.full_every, s.max_diff_share)
        if self.opt.kind == "diff" and parent is None:
            self.warnings.append("no parent snapshot: made a full snapshot")
        if parent_tree is None:
            parent_tree = repo.tree(parent, snapshots) if parent is not None else iter(())
        parent_tree = self._with_data_indexed(parent_tree)
        # A parent taken without extended attributes (or, for --no-xattrs, with them) has entries whose
        # attributes say nothing about the files': none is taken from it unseen (each is read once).
        self._xattrs_known = parent is None or parent.stats.get("xattrs", False) == self.opt.xattrs
        self._racy = racy_window(parent)
        stats = ManifestStats()
        writer = self._open_writer()
        # A manifest the search for a parent found damaged: the same records make the same blob, which must
        # not refer to the damaged copy.
        writer.damaged = self._damaged
        writer.damaged_packs = {loc.pack_no: b for b in self._damaged if (loc := repo.locate(b)) is not None}
        session_stats: dict = {}
        try:
            if tar is not None:
                stats_iter = self._tar_records(tar, parent_tree, kind, stats)
            elif stream is not None:
                assert stdin_name is not None
                stats_iter = self._count(self._stream_source(stream, stdin_name, parent_tree, kind), stats)
            else:
                assert source is not None
                if self.opt.session is not None:
                    self.opt.session.begin()
                if self.opt.count_total:
                    self._total = TreeTotal(source)
                stats_iter = self.records(source, parent_tree, kind, stats)
                if self.opt.session is not None:
                    stats_iter, session_stats = self._with_appendix(list(stats_iter), kind, stats, source.warnings)
            mw = ManifestWriter(repo, self.writer)
            uids: set[int] = set()
            gids: set[int] = set()
            for rec in stats_iter:
                mw.add(rec)
                if rec.entry is not None:
                    note_ids(rec.entry, uids, gids)
            self._drain()
            walked_ns = time.time_ns()  # every file read: the end of the window the next backup reads again
            if self.opt.progress is not None:  # the final counts (reports in between are rate-limited)
                self.opt.progress(self._progress_counts(final=True))
            # What could not be read (or a source path missing) is no sign of nothing changed: such a run
            # saves its snapshot and says so (exit 3), as without the option.  Nor is a file read again for its
            # racy times: skipped, the run would leave the window as it was, and the next read it again too.
            seen_whole = not self.unreadable and not self.racy_reads and not (source is not None and source.missing)
            if self.opt.skip_if_unchanged and parent is not None and seen_whole and (
                    not mw.records if kind == KIND_DIFF
                    else self.opt.kind == "auto" and stream is None and tar is None and not self.changed):
                return BackupResult(parent, self.warnings + (source.warnings if source is not None else []),
                                    skipped=True)
            manifest_ids = mw.finish()
            self._finish_writes()
        except BaseException as exc:
            writer.abandon(exc)
            raise
        finally:
            if self._total is not None:
                self._total.close()
            self._wind_down()
        if source is not None:
            self.warnings[:0] = source.warnings
            self.unreadable += [os.fsdecode(rel) or "." for rel in source.missing]
        w = self.writer
        snap = Snapshot(
            time=now_iso() if self.opt.time is None else iso(self.opt.time), kind=kind,
            parent=parent.id if kind == KIND_DIFF and parent else None, host=host,
            paths=paths, tags=list(self.opt.tags), manifest=[i.hex() for i in manifest_ids],
            manifest_starts=mw.starts, version=mw.version,
            stdin_name=stdin_name,
            stats={
                "files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes,
                **self.counts,
                "added_blobs": w.new_blobs - mw.new_blobs, "added_raw_bytes": w.new_raw_bytes - mw.new_raw_bytes,
                "added_stored_bytes": w.stored_bytes - mw.stored_bytes,
                "delta_blobs": w.delta_blobs, "delta_stored_bytes": w.delta_bytes,
                "whole_stored_bytes": w.stored_bytes - w.delta_bytes - mw.stored_bytes,
                "manifest_bytes": mw.stored_bytes, "manifest_records": mw.records,
                "chain_length": len(chain) + 1 if kind == KIND_DIFF else 1,
                "unreadable": self.unreadable, "warnings": len(self.warnings), "xattrs": self.opt.xattrs,
                "duration": round(time.monotonic() - self._started, 3),
                OWNERS_KEY: names_of(uids, gids, self._owner_ids_inherited(parent if kind == KIND_DIFF else None,
                                                                           snapshots, uids, gids),
                                     **self._owner_names),
                **({"started_ns": source.began_ns, "finished_ns": walked_ns} if source is not None else {}),
                **session_stats,
            },
        )
        if not self.opt.dry_run:
            assert self._lock is not None
            repo.save_snapshot_held(snap, self._lock)
        return BackupResult(snap, self.warnings)

    def _ensure_lock_held(self) -> None:
        """A backup whose lock went stale (paused, cut off) may dedup against data a prune has deleted since:
        it saves no snapshot (its packs are left for the next prune)."""
        if self._lock is not None:
            self._lock.confirm()

    def _count(self, records: Iterator[Record], stats: ManifestStats) -> Iterator[Record]:
        for rec in records:
            if rec.op != OP_DELETE:
                stats.count(rec)
            yield rec

    def _tar_records(self, tar: TarSource, parent_tree: Iterator[Record], kind: str, stats: ManifestStats
                     ) -> Iterator[Record]:
        """The records of a tar's tree (store/tarimport.py): every member read and its content stored first
        (a regular file against the parent's file at its path, for deltas), then the entries merged with the
        parent's as a walk's are.  An entry whose content and metadata match the parent's is the parent's
        (unchanged: a tar has no inode or change time to tell otherwise)."""
        diff = kind == KIND_DIFF
        parent = list(parent_tree)
        files = {r.path: r.entry for r in parent if r.entry is not None and r.entry.type == T_FILE}

        def store(f: BinaryIO, rel: bytes, size: int) -> tuple[bytes, bytes, int]:
            return self._read_stream(f, rel, files.get(rel), size)

        from .tarimport import read_tree  # import-tar's alone: tarfile and its decompressors

        tree = read_tree(tar.tarfile, store, tar.strip)
        files.clear()
        self.warnings += tree.warnings
        self.unreadable += tree.unreadable
        self._owner_names = {"user": tree.users.get, "group": tree.groups.get}
        entries = tree.entries()
        del tree
        counts = self.counts
        cut: bytes | None = None
        pi = 0
        for e in entries:
            key = sort_key(e.path)
            while pi < len(parent) and (p := parent[pi]).key < key:
                pi += 1
                self._count_removed(p.entry)
                if diff and not (cut is not None and (p.key == cut or p.key.startswith(cut + b"\x00"))):
                    cut = p.key
                    yield delete_record(p.path)
            prev = None
            if pi < len(parent) and parent[pi].path == e.path:
                prev = parent[pi].entry
                pi += 1
            same = prev is not None and prev.flags == e.flags and prev.same_content(e)
            if same:
                e = prev
            else:
                self.changed = True
            stats.count_entry(e)
            was_file = prev is not None and prev.type != T_DIR
            if e.type == T_DIR:
                if was_file:
                    self._count_removed(prev)
            else:
                counts["unchanged_files" if same else "changed_files" if was_file else "new_files"] += 1
            if not diff:
                yield Record(OP_ENTRY, e.path, e)
            elif same:
                continue
            elif prev is None or prev.type != e.type or e.type != T_DIR:
                cut = key
                yield Record(OP_FRESH, e.path, e)
            else:
                yield Record(OP_ENTRY, e.path, e)
        for p in parent[pi:]:
            self._count_removed(p.entry)
            if diff and not (cut is not None and (p.key == cut or p.key.startswith(cut + b"\x00"))):
                cut = p.key
                yield delete_record(p.path)

    def _stream_source(self, stream: BinaryIO, name: str, parent_tree: Iterator[Record], kind: str) -> Iterator[Record]:
        rel = check_stdin_name(name)
        prev = next((r.entry for r in parent_tree if r.path == rel), None)
        now = time.time_ns()
        e = Entry(rel, T_FILE, 0o600, os.getuid(), os.getgid(), now, 0, now)
        e.digest, e.chunks, e.size = self._read_stream(stream, rel, prev)
        self.counts["new_files" if prev is None else "changed_files"] += 1
        # A stream snapshot always holds its one entry, changed or not.
        yield Record(OP_FRESH if kind == KIND_DIFF else OP_ENTRY, rel, e)
