"""Restoring a snapshot's resolved tree into a directory.

Blobs are fetched ahead in parallel (a bounded window across files), written
with every 4096-byte block of zeros (aligned on file offsets) left a hole,
wherever it lies in a chunk (``writefiles.write_sparse``; files of one chunk
a run at a time, ``writefiles.write_small_files``), and every file's digest is checked, before a small file is
written and while a larger one is: a mismatch is an error naming the file.  A file cut
short (no space, an error, an interruption) is removed, never left
half-written under its name; an entry the target does not take is noted and
the rest restored, and the restore then fails naming them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import os
import re
import secrets
import stat
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator, Protocol, Sequence

import blake3

from chunkvault.errors import (
    ChunkvaultError, CorruptObject, MissingObject, StorageFull, TargetNotEmpty, TargetUnwritable, UsageError,
)

from .manifest import (
    F_UNREADABLE, T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK, TYPE_NAMES, Entry, Record,
    sort_key, unread,
)
from .blob import Plaintext
from .chain import ancestors
from .confinement import confined, safe_relpath
from .excludes import ExcludeRules
from .find import tree_glob
from .overwrite import check_overwrite, keeps_existing
from .source import TargetWalk
from .owners import OwnerMap
from .repository import Repo
from .target_dirs import TargetDirs, closed_to_owner, mount_points, proc_path, remove_tree
from .target_lock import another_restores, lock_target
from .posix_acl import ACL_KEYS
from .xattrs import decode_xattrs, read_xattrs, write_xattrs
from . import writefiles
from .holes import hash_file, hole_at, may_have_holes
from .writefiles import HOLE_MIN, NO_SPACE as _FULL, punch_hole, reserve, write_sparse

ACL_ACCESS = ACL_KEYS[0]


_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)  # the target will not take writes, whatever is written
# Files of one chunk are written a run at a time (writefiles): at most this many files and bytes per run.
RUN_FILES = 256
RUN_BYTES = 4 << 20
RUN_DIRS = 32  # and files of at most this many directories (and half of those held), whose descriptors it keeps open


class _TargetFull(Exception):
    """The target ran out of space (``RestoreResult.full`` names the file): the restore stops there."""


class BlobSource(Protocol):
    """Where a restore reads chunks from: a repository, or an export file (store/export.py)."""

    def read_blob(self, blob_id: bytes) -> Plaintext: ...

    def read_blobs(self, blob_ids: list[bytes]) -> Sequence[Plaintext]: ...


# --delta holds up to this much of a file's changed chunks until the whole file is read and checked, so damaged
# data leaves the file as it was (its prefetch window is idle: the chunks are read as each is compared).
DELTA_HOLD_BYTES = 16 << 20
# File systems stamp changes with a coarse clock (a tick behind ``time.time_ns``): a file changed this long
# before a restore began may have been changed after it, and is not taken for a leftover.
LEFTOVER_SLACK_NS = 2_000_000_000
# The name a file is written under beside the one it replaces (``Restorer._write_beside``).
BESIDE_PREFIX = b".chunkvault-restore-"
# The mode a target closed to 0700 while it fills gets back, noted on it until then (``Restorer._note_mode``)
MODE_NOTE = "user.chunkvault.restore-mode"
_BESIDE_NAME = re.compile(re.escape(BESIDE_PREFIX) + rb"[0-9a-f]{16}\Z")


def _beside_name() -> bytes:
    """A new name for what is written beside a target's entry and renamed over it (``_BESIDE_NAME`` finds
    those an interrupted restore left)."""
    return BESIDE_PREFIX + secrets.token_hex(8).encode()


@dataclass
class RestoreOptions:
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    iexcludes: list[str] = field(default_factory=list)  # as excludes, ignoring case
    force: bool = False  # restore into a non-empty directory (in place), replacing what is in the way
    delta: bool = False  # in place: rewrite only files, and chunk ranges of files, whose content differs
    delete: bool = False  # in place: remove what the snapshot does not have
    overwrite: str = "always"  # in place: which entries the target has are replaced (OVERWRITE_MODES)
    owners: bool | None = None  # restore uid/gid; default: when running as root
    owner_map: OwnerMap | None = None  # recorded owner ids -> this machine's ids for their names (store/owners.py)
    xattrs: bool = True  # restore extended attributes (ACLs, capabilities, labels, user.*)
    window_bytes: int = 16 << 20
    fetch_threads: int = 3  # threads reading and decoding chunks ahead of the writer
    progress: Callable[[int, int], None] | None = None  # (files, bytes) so far
    checkpoint: Callable[[], None] | None = None  # called between batches of chunks: may raise to stop mid-file
    wait: float = 0.0  # seconds to wait for another restore writing into the target (TargetBusy after)


@dataclass(frozen=True)
class Relocation:
    """A directory of a snapshot restored elsewhere than in the target's tree: ``subtree`` (a path as the
    snapshot names it) into the directory ``into``, left out of the target, whose entry ``link`` (``subtree``
    itself, or a symbolic link of the snapshot that led to it) becomes a symbolic link to ``into``.  What a
    database keeps on other disks (PostgreSQL's tablespaces, ``pgtablespace``) goes back to other disks so."""

    subtree: bytes
    into: str
    link: bytes


def link_relocated(target: str, r: Relocation, into: str) -> None:
    """Make ``r.link`` in the restored ``target`` a symbolic link to ``into`` (its entry's owner kept, as root;
    an empty directory there removed; its directory's times kept), through the descriptor of its directory
    reached within the target (``TargetDirs``), the link made under a name of its own and renamed into
    place: made by path, a directory above it swapped for a symbolic link while the restore ran (to /etc) had
    a restore as root remove what lay at the link's name there and link it.  TargetUnwritable, one line,
    where it cannot be made so (a link out of the target on the way, something else put in its place)."""
    rel = safe_relpath(r.link)
    dirs = TargetDirs(os.fsencode(target))
    try:
        pfd, name = dirs.at(rel)
        parent = os.fstat(pfd)
        old = _lstat(pfd, name)
        if old is not None and stat.S_ISDIR(old.st_mode):
            os.rmdir(name, dir_fd=pfd)
        beside = _beside_name()
        os.symlink(into, beside, dir_fd=pfd)
        try:
            if old is not None and os.geteuid() == 0:
                os.chown(beside, old.st_uid, old.st_gid, dir_fd=pfd, follow_symlinks=False)
            os.rename(beside, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(beside, dir_fd=pfd)
            raise
        os.utime(proc_path(pfd), ns=(parent.st_atime_ns, parent.st_mtime_ns))
    except OSError as exc:
        raise TargetUnwritable(f"cannot make {os.fsdecode(rel)} in {target} the link to {into}: "
                               f"{exc.strerror or exc}") from None
    finally:
        dirs.close()


def merged_results(results: Sequence[RestoreResult]) -> RestoreResult:
    """One result for restores made one after the other into several directories (``Relocation``)."""
    out = RestoreResult(processes=max((r.processes for r in results), default=1))
    for r in results:
        for name in ("files", "dirs", "links", "specials", "bytes", "unchanged_files", "rewritten_bytes", "deleted",
                     "skipped_existing"):
            setattr(out, name, getattr(out, name) + getattr(r, name))
        out.warnings += r.warnings
        out.damaged += r.damaged
        out.removed += r.removed
        out.unwritten += r.unwritten
        if r.full and not out.full:
            out.full, out.full_in_place = r.full, r.full_in_place
    return out


@dataclass
class RestoreResult:
    snapshot: str = ""  # the id of the snapshot restored (the one ``latest`` or ``until`` picked)
    files: int = 0
    dirs: int = 0
    links: int = 0
    specials: int = 0  # FIFOs and device nodes
    bytes: int = 0
    unchanged_files: int = 0  # --delta: files already right
    rewritten_bytes: int = 0  # --delta: bytes written into existing files
    deleted: int = 0  # --delete: paths removed
    skipped_existing: int = 0  # --overwrite never/if-newer: entries the target had, kept as they were
    processes: int = 1  # worker processes that wrote the files (store/restore_workers.py)
    warnings: list[str] = field(default_factory=list)
    # Files not restored because their data is damaged in the repository: (path, object, reason, missing).
    # Plain values, not the errors themselves: worker processes send their results back pickled.
    damaged: list[tuple[str, str, str, bool]] = field(default_factory=list)
    # Of those, the files --delta had begun to rewrite in place when the damage showed: removed from the target,
    # since they held neither their old content nor the snapshot's (the message must say so: "not restored"
    # alone reads as kept as the target had them).
    removed: list[str] = field(default_factory=list)
    # Entries the target would not take (permission, a read-only file system, a name too long): (path, reason).
    unwritten: list[tuple[str, str]] = field(default_factory=list)
    full: str = ""  # the file being written when the target ran out of space (removed); the restore stopped there
    full_in_place: bool = False  # that file was being updated in place (--delta): its old content is gone too
    # Entries whose extended attributes the target's file system keeps none of (ENOTSUP): how many, the first
    # of them and the attributes' names, for one warning (``unsupported_xattrs_warning``), not one per entry.
    xattrs_unsupported: int = 0
    xattrs_unsupported_paths: list[str] = field(default_factory=list)
    xattrs_unsupported_names: list[str] = field(default_factory=list)

    # Entries whose trusted.* or security.* attributes this user may not set or remove (EPERM, EACCES: a restore
    # as another user than root, or a security module's policy), summed up likewise: one warning per entry
    # buried the others under a line for each file of a tree with SELinux labels.
    xattrs_denied: int = 0
    xattrs_denied_paths: list[str] = field(default_factory=list)
    xattrs_denied_names: list[str] = field(default_factory=list)

    def note_unsupported_xattrs(self, paths: list[str], names: list[str], count: int = 1) -> None:
        """``count`` more entries (the first of them ``paths``) whose attributes ``names`` were not set."""
        self.xattrs_unsupported += count
        self.xattrs_unsupported_paths += paths[:_SHOWN_UNSUPPORTED - len(self.xattrs_unsupported_paths)]
        self.xattrs_unsupported_names += [n for n in names if n not in self.xattrs_unsupported_names]

    def note_denied_xattrs(self, paths: list[str], names: list[str], count: int = 1) -> None:
        """``count`` more entries (the first of them ``paths``) whose attributes ``names`` were not permitted."""
        self.xattrs_denied += count
        self.xattrs_denied_paths += paths[:_SHOWN_UNSUPPORTED - len(self.xattrs_denied_paths)]
        self.xattrs_denied_names += [n for n in names if n not in self.xattrs_denied_names]

    def unsupported_xattrs_warning(self) -> str | None:
        return _summed_xattrs(self.xattrs_unsupported, self.xattrs_unsupported_paths, self.xattrs_unsupported_names,
                              "not set", "the target's file system does not support them")

    def denied_xattrs_warning(self) -> str | None:
        return _summed_xattrs(self.xattrs_denied, self.xattrs_denied_paths, self.xattrs_denied_names,
                              "left as they were", "setting or removing them is not permitted to this user")

    def raise_for_problems(self) -> None:
        """After everything else was restored: the target's failures first (exit 14: it ran out of space, or
        would not take some entries), else the first damaged file's error; each names how many there are
        and carries this result as its ``partial``."""
        error = self._problem()
        if error is not None:
            error.partial = self
            raise error

    def _problem(self) -> ChunkvaultError | None:
        n = len(self.unwritten)
        unwritten = f"{n} entr{'y' if n == 1 else 'ies'} could not be written: " + _named(
            [f"{path} ({why})" for path, why in self.unwritten], 3)
        damaged = f"{len(self.damaged)} file(s) not restored: " + _named([d[0] for d in self.damaged])
        if self.removed:
            damaged += (f" ({len(self.removed)} of them removed from the target, updated in place before the "
                        "damage showed, so holding neither their old content nor the snapshot's: "
                        + _named(self.removed) + ")")
        also = ([unwritten] if self.unwritten else []) + ([damaged + " (damaged data)"] if self.damaged else [])
        rest = "everything else was restored" if self.files + self.dirs + self.links else "nothing was restored"
        if self.full_in_place:
            return StorageFull("; ".join([f"no space left on the restore target while updating {self.full} in "
                                          "place (removed: part of it was rewritten, so it held neither its old "
                                          "content nor the snapshot's; the restore stopped there)", *also]))
        if self.full:
            return StorageFull("; ".join([f"no space left on the restore target while writing {self.full} "
                                          "(not left half-written: what was written of it is removed, and a file "
                                          "it was to replace kept as it was; the restore stopped there)", *also]))
        if self.unwritten:
            return TargetUnwritable("; ".join(["restore incomplete: " + also[0], *also[1:]]) + f" ({rest})")
        if self.damaged:
            path, obj, reason, missing = self.damaged[0]
            cls = MissingObject if missing else CorruptObject
            return cls(obj, f"{reason}; {damaged} ({rest})")
        return None


_SHOWN_UNSUPPORTED = 5  # entries (and attribute names) the warning on extended attributes not supported names


def _summed_xattrs(n: int, paths: list[str], names: list[str], done: str, why: str) -> str | None:
    """One warning for ``n`` entries whose extended attributes were refused alike (the first ``paths``)."""
    if not n:
        return None
    more = f" and {n - len(paths)} more" if n > len(paths) else ""
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN_UNSUPPORTED]) + (", ..." if len(names) > _SHOWN_UNSUPPORTED else "")
    return (f"extended attributes {done} on {n} entr{'y' if n == 1 else 'ies'}: {why} ({shown}): "
            f"{', '.join(paths)}{more}")


def _named(names: list[str], shown: int = 5) -> str:
    """The first few of ``names``, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _reason(exc: OSError | ChunkvaultError) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _listed(pfd: int) -> set[bytes]:
    """The names the directory open at ``pfd`` (perhaps an O_PATH descriptor) lists."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
    try:
        return {os.fsencode(n) for n in os.listdir(fd)}
    finally:
        os.close(fd)


#: Times every common file system holds (FAT's from 1980, a 32-bit second's to 2038); others are looked at.
_COMMON_TIMES_NS = (315_532_800 * 10**9, (2**31 - 1) * 10**9)
FAR_TIMES_CHECKED = 1000  # entries with other times whose restored time is looked at, at most


def _iso_ns(ns: int) -> str:
    try:
        return datetime.fromtimestamp(ns // 10**9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):
        return f"{ns // 10**9} s from 1970"


#: A time set to this (an odd second and nine digits) comes back cut to the file system's step.
_PROBE_TIME_NS = 1_600_000_001_123_456_789
_TIME_STEPS_NS = (1, 1_000, 1_000_000, 10_000_000, 1_000_000_000, 2_000_000_000)


def time_step(directory: bytes) -> int:
    """The step (ns) in which the file system at ``directory`` keeps modification times: 1 for most, 10 ms
    for exFAT, 1 s for ext4 with small inodes, 2 s for FAT.  A restore there cannot keep finer times, and
    finer differences are not a restore's fault.  1 where no probe file can be made (made and removed, and the
    directory's times put back: they may be a restored directory's)."""
    probe = os.path.join(directory, b".chunkvault-time-" + os.urandom(6).hex().encode())
    try:
        before = os.stat(directory)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return 1
    try:
        os.utime(fd, ns=(_PROBE_TIME_NS, _PROBE_TIME_NS))
        lost = abs(_PROBE_TIME_NS - os.fstat(fd).st_mtime_ns)
    except OSError:
        return 1
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
            if os.stat(directory).st_mtime_ns != before.st_mtime_ns:  # untouched where it need not be (fusefat
                os.utime(directory, ns=(before.st_atime_ns, before.st_mtime_ns))  # died setting its root's)
    return next((step for step in _TIME_STEPS_NS if lost < step), _TIME_STEPS_NS[-1])


def folds_case(directory: bytes) -> bool:
    """Whether the file system ``directory`` is on takes names that differ in case alone for one (FAT, exFAT,
    a case-insensitive mount): a file made under one name is looked up under another.  False where the
    probe cannot be made (it is made and removed at once)."""
    probe = b".chunkvault-case-" + os.urandom(6).hex().encode() + b"-a"
    try:
        fd = os.open(os.path.join(directory, probe), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        return os.path.lexists(os.path.join(directory, probe.upper()))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, probe))


_ENTRY_KINDS = {T_FILE: "file", T_HARDLINK: "file", T_DIR: "directory", T_SYMLINK: "symbolic link", T_FIFO: "FIFO",
                T_CHARDEV: "character device", T_BLOCKDEV: "block device"}
_STAT_KINDS = [(stat.S_ISREG, T_FILE), (stat.S_ISDIR, T_DIR), (stat.S_ISLNK, T_SYMLINK), (stat.S_ISFIFO, T_FIFO),
               (stat.S_ISCHR, T_CHARDEV), (stat.S_ISBLK, T_BLOCKDEV)]


def _kind(st_mode: int) -> str:
    """What the target has at a path, named as a warning names an entry of the snapshot (``_ENTRY_KINDS``)."""
    return next((_ENTRY_KINDS[t] for test, t in _STAT_KINDS if test(st_mode)), "socket")


def _lstat(pfd: int, name: bytes) -> os.stat_result | None:
    """What is at ``name`` in the directory open at ``pfd``, not followed; None when nothing is."""
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def refuse_overlap(target: str | bytes, delete: bool, kept: Sequence[tuple[str | bytes, str]]) -> None:
    """UsageError, before anything is written, for a restore whose target holds what it reads from (``kept``:
    (path, what it is)) where ``delete`` would remove it (a restore with --delete into a directory holding
    its repository deleted the repository, pack by pack as it read them), or that would write into it."""
    real = os.path.realpath(os.fsencode(target)).rstrip(b"/") + b"/"
    for path, what in kept:
        inside = os.path.realpath(os.fsencode(path)).rstrip(b"/") + b"/"
        shown = os.fsdecode(path)
        if inside.startswith(real) and delete:
            raise UsageError(f"{what} {shown} lies inside the restore target {os.fsdecode(target)}: a restore "
                             "that deletes what the snapshot lacks would delete it; restore elsewhere")
        if real.startswith(inside):
            raise UsageError(f"the restore target {os.fsdecode(target)} lies inside {what} {shown}")


def check_content(e: Entry, size: int, digest: bytes) -> None:
    """A file's restored content against its entry: its size (the digest alone let a crafted entry claim
    any size, reported as restored), then its digest.  A file no backup could read has neither."""
    if unread(e):
        return
    if size != e.size:
        raise CorruptObject(f"file {os.fsdecode(e.path)}", f"its chunks hold {size} bytes, not the {e.size} "
                            "its entry records")
    if digest != e.digest:
        raise CorruptObject(f"file {os.fsdecode(e.path)}", "restored content does not match its digest")


MAX_FILE_OFFSET = (1 << 63) - 1
_ZEROS = bytes(HOLE_MIN)


def _shorten(fd: int, st: os.stat_result) -> None:
    """Give the file open at ``fd`` back the length and times ``st`` saw, freeing what was allocated past
    that length (a truncation frees it, also to the same length)."""
    os.ftruncate(fd, st.st_size)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _write_ranges(fd: int, ranges: list[tuple[int, Plaintext]], zeros_from: int) -> None:
    """Write chunks at their offsets into a file that reads as zeros, unallocated, from ``zeros_from`` (its
    length, or past what was allocated for it to grow into); their blocks of zeros stay holes (from there
    on ones already, before it ones punched: ``write_sparse``)."""
    for pos, data in ranges:
        write_sparse(fd, data, pos, zeros_from)


class _MeetingBlocks:
    """The blocks of zeros two chunks of a file updated in place meet inside, one of them rewritten, to punch
    once it is written.  ``write_sparse`` leaves a block of zeros a hole only where one chunk holds all of it,
    and writes each part of one two chunks share: a file grown by a run of zeros (cut every 2 MiB, rarely
    on a block boundary) kept one block of every 512 allocated, where a restore anew leaves them holes."""

    def __init__(self) -> None:
        self.end, self.zero_tail, self.rewritten = -1, False, False  # the chunk seen last
        self.blocks: list[int] = []

    def add(self, pos: int, data: Plaintext, rewritten: bool) -> None:
        """The next chunk, at ``pos``: rewritten, or kept as the file holds it."""
        view = memoryview(data).cast("B")
        head = -pos % HOLE_MIN  # its part of the block it begins inside
        if (self.zero_tail and pos == self.end and (rewritten or self.rewritten) and 0 < head <= len(view)
                and _ZEROS.startswith(view[:head])):
            self.blocks.append(pos + head - HOLE_MIN)
        self.end, self.rewritten = pos + len(view), rewritten
        tail = self.end % HOLE_MIN
        self.zero_tail = 0 < tail <= len(view) and _ZEROS.startswith(view[len(view) - tail:])

    def punch(self, fd: int) -> None:
        """Punch the blocks found so far: call once the chunks before them are written."""
        for at in self.blocks:
            punch_hole(fd, at, HOLE_MIN)
        self.blocks = []


def target_error(what: str, exc: OSError) -> ChunkvaultError:
    """A failure to make or read the target itself: a storage failure when the target takes no writes or
    space, a usage error when it names something else (a file, a path below one)."""
    message = f"{what}: {exc.strerror or exc}"
    if exc.errno in _FULL:
        return StorageFull(message)
    if exc.errno in _REFUSED:
        return TargetUnwritable(message)
    return UsageError(message)


def lookup_by_scan(tree: Callable[[], Iterator[Record]]) -> Callable[[bytes], Record | None]:
    """A path's record, found by reading ``tree`` again up to it: for a tree that cannot seek (an export
    file).  A restore asks only for the left-out first path of a hard-linked file it restores."""
    def lookup(path: bytes) -> Record | None:
        key = sort_key(path)
        for rec in tree():
            if rec.key >= key:
                return rec if rec.key == key else None
        return None
    return lookup


class _Globs:
    """Globs that match a path when one matches it, its base name, or any ancestor (so a directory
    selects its subtree).  The globs are one compiled pattern and each directory's answer is kept:
    a tree's paths come sorted, so a path costs two matches, not two per glob per ancestor (that was
    half of restoring one file from a snapshot of 58,000)."""

    _KEEP = 1 << 16  # directories remembered at most

    def __init__(self, globs: list[str]):
        self.pattern = re.compile("|".join(fnmatch.translate(g) for g in globs))
        self.dirs: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        parent, _, name = path.rpartition("/")
        if self.pattern.match(path) or self.pattern.match(name):
            return True
        if not parent:
            return False
        known = self.dirs.get(parent)
        if known is None:
            if len(self.dirs) >= self._KEEP:
                self.dirs.clear()
            known = self.dirs[parent] = self(parent)
        return known


_GLOB_MAGIC = re.compile(r"[*?[]")


def parse_include(glob: str) -> str:
    """An include glob: ``\\!NAME`` is the literal ``!NAME``; one starting with ``!`` is refused (an include
    re-includes nothing: ``!`` takes back an exclude), not taken as a name."""
    if glob.startswith("!"):
        raise UsageError(f"include pattern {glob!r}: '!' re-includes what an earlier exclude left out, so it "
                         "belongs among the excludes; '\\!NAME' matches a name starting with '!'")
    return glob[1:] if glob.startswith("\\!") else glob


def include_directory(includes: list[str]) -> bytes | None:
    """A directory below which lies every path that ``includes`` select, or None when they may select
    paths anywhere.

    A glob with a ``/`` before its first wildcard matches no base name, so the paths it selects (and
    those below them) begin with that literal part: they lie below its directory, or, for a glob
    without wildcards, are that path and the paths below it.  The directory of several globs is the
    deepest one they share.
    """
    common: list[bytes] | None = None
    for glob in includes:
        m = _GLOB_MAGIC.search(glob)
        literal = glob if m is None else glob[: m.start()]
        if "/" not in literal:
            return None
        parts = os.fsencode(literal).split(b"/")
        if m is not None:
            parts.pop()
        if common is not None:
            n = next((i for i, (a, b) in enumerate(zip(common, parts)) if a != b), min(len(common), len(parts)))
            parts = parts[:n]
        common = parts
    return b"/".join(common) if common and all(common) else None


class Selection:
    """Which paths a restore takes: ``includes`` (all when empty) less ``excludes`` and ``iexcludes`` (as a
    backup's, in order, ``!`` re-including: see store/excludes.py); the root always.  ``directory``: where
    the selected paths lie, when the includes say (``include_directory``)."""

    def __init__(self, includes: list[str], excludes: list[str], iexcludes: list[str] | None = None):
        includes = [tree_glob(parse_include(g)) for g in includes]
        rules = ExcludeRules(excludes, iexcludes or (), normalize=tree_glob)
        self.includes = _Globs(includes) if includes else None
        self.excludes = rules.excluded_tree if rules else None
        self.directory = include_directory(includes) if includes else None

    @property
    def everything(self) -> bool:
        return self.includes is None and self.excludes is None

    def included(self, path: bytes) -> bool:
        """Whether an include matches the path (below the root), excludes aside."""
        return bool(path) and self.includes is not None and self.includes(os.fsdecode(path))

    def __call__(self, path: bytes) -> bool:
        if path == b"" or (self.includes is None and self.excludes is None):
            return True
        s = os.fsdecode(path)
        if self.includes is not None and not self.includes(s):
            return False
        return self.excludes is None or not self.excludes(s)


class _Prefetcher:
    """Records in order, and their files' chunks fetched ahead across file boundaries.

    Chunks are fetched in batches (neighbours in a pack coalesced into one
    ranged read), a few batches in flight at once.  Batches and the window are
    counted in bytes, each chunk taken as its file's mean chunk size: files cut
    at fixed offsets have chunks four times the chunker's average.
    """

    BATCH_BLOBS = 64
    BATCH_BYTES = 4 << 20
    # Off local disk each batch is a request or a few (store.repository.READ_GAP_REMOTE): larger batches, fewer
    # requests.  A 500 MiB restore from S3 (moto) took 95 requests instead of 195, 1.7-2.0 s instead of 2.1-2.5.
    FAR_BATCH_BLOBS = 256
    FAR_BATCH_BYTES = 16 << 20

    def __init__(self, repo: BlobSource, records: Iterator[Record], window_bytes: int, workers: int = 3,
                 prefetch: bool = True, far: bool = False, checkpoint: Callable[[], None] | None = None,
                 wanted: Callable[[Entry], bool] | None = None):
        self.repo = repo
        self.wanted = wanted  # whether a file's chunks are fetched ahead (not those of a file to be kept)
        self.checkpoint = checkpoint
        self.batch_blobs, self.batch_bytes = ((self.FAR_BATCH_BLOBS, self.FAR_BATCH_BYTES) if far
                                              else (self.BATCH_BLOBS, self.BATCH_BYTES))
        self.prefetch = prefetch
        self.records = records
        self.ahead: deque[tuple[Record, bool]] = deque()  # and whether its chunks were queued
        # [a file's chunk ids, how many of them are taken, their expected size]: the ids are taken as batches
        # are made, not queued one by one (a tuple each: a file of a million chunks queued 130 MB of them)
        self.ids: deque[list] = deque()
        self.queued_ids = 0  # chunk ids in self.ids not taken yet
        self.queued = 0  # bytes expected of them
        self.batches: deque[tuple[Future[list[Plaintext]], int]] = deque()
        self.in_flight = 0  # bytes expected of self.batches
        self.current: deque[Plaintext] = deque()
        self.window = window_bytes
        self.pool = ThreadPoolExecutor(workers)
        self.done = False
        self._left = 0  # chunks of the current file (``chunks``) not yet taken
        self.queued_current = False  # the chunks of the record ``next_record`` gave are fetched ahead

    def _pull(self) -> bool:
        if self.done or len(self.ahead) > 10000:
            return False
        rec = next(self.records, None)
        if rec is None:
            self.done = True
            return False
        e = rec.entry
        queued = (self.prefetch and e is not None and e.type == T_FILE and bool(e.chunks)
                  and (self.wanted is None or self.wanted(e)))
        self.ahead.append((rec, queued))
        if queued:
            assert e is not None
            ids = e.chunk_ids()
            each = -(-e.size // len(ids))
            self.ids.append([ids, 0, each])
            self.queued_ids += len(ids)
            self.queued += each * len(ids)
        return True

    def _fill(self) -> None:
        while len(self.batches) < 2 or self.in_flight < self.window:
            while self.queued_ids < self.batch_blobs and self.queued < self.batch_bytes and self._pull():
                pass
            if not self.queued_ids:
                return
            take: list[bytes] = []
            size = 0
            while self.ids and len(take) < self.batch_blobs and (not take or size + self.ids[0][2] <= self.batch_bytes):
                run = self.ids[0]
                take.append(run[0][run[1]])
                run[1] += 1
                size += run[2]
                if run[1] == len(run[0]):
                    self.ids.popleft()
            self.queued_ids -= len(take)
            self.queued -= size
            self.in_flight += size
            self.batches.append((self.pool.submit(self._read_batch, take), size))

    def _read_batch(self, ids: list[bytes]) -> list[Plaintext | CorruptObject]:
        try:
            return list(self.repo.read_blobs(ids))
        except CorruptObject:  # one at a time: only the damaged chunks fail, each with its own error
            out: list[Plaintext | CorruptObject] = []
            for cid in ids:
                try:
                    out.append(self.repo.read_blob(cid))
                except CorruptObject as exc:
                    out.append(exc)
            return out

    def next_record(self) -> Record | None:
        if not self.ahead and not self._pull():
            return None
        rec, self.queued_current = self.ahead.popleft()
        return rec

    def next_chunk(self) -> Plaintext:
        """The next chunk in tree order; CorruptObject for a damaged one (taken all the same)."""
        if not self.current:
            if self.checkpoint is not None:
                self.checkpoint()
            self._fill()
            batch, size = self.batches.popleft()
            self.in_flight -= size
            self.current.extend(batch.result())
            self._fill()
        chunk = self.current.popleft()
        if isinstance(chunk, CorruptObject):
            raise chunk
        return chunk

    def begin(self, e: Entry) -> None:
        """``e`` is restored next: a file's chunks are the next ones fetched (``chunks`` gives them, and
        ``skip_rest`` takes those left when it is not written), so the next file gets its own."""
        self._left = len(e.chunks) // 32 if self.queued_current and e.type == T_FILE else 0

    def chunks(self) -> Iterator[Plaintext]:
        """The current file's chunks; one damaged raises, and ``skip_rest`` then takes the ones after it."""
        while self._left:
            self._left -= 1
            yield self.next_chunk()

    def skip_rest(self) -> None:
        """Take the rest of the chunks of a file not written (damaged, or refused by the target)."""
        left, self._left = self._left, 0
        for _ in range(left):
            try:
                self.next_chunk()
            except CorruptObject:
                pass

    def close(self) -> None:
        for f, _ in self.batches:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _opened_up(fd: int, shown: str = "") -> Iterator[None]:
    """The directory open at ``fd`` writable by its owner while inside, where it is this user's; its mode
    back after.  A failure to give it back names the directory as ``shown`` (else the descriptor's path
    under /proc, as bytes, reached the warning: "[Errno 30] ...: b'/proc/self/fd/7'")."""
    st = os.fstat(fd)
    opened = closed_to_owner(st)
    if opened:
        os.chmod(proc_path(fd), stat.S_IMODE(st.st_mode) | 0o700)
    try:
        yield
    finally:
        if opened:
            try:
                os.chmod(proc_path(fd), stat.S_IMODE(st.st_mode))
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, shown or None) from None


def setid_bits_for_others(e: Entry, uid: int, gid: int) -> int:
    """The set-user/group-ID bits of ``e`` that would grant another user's or group's rights to ``uid`` and
    ``gid``, who get the entry when its owner is not set.  A directory's set-group-ID bit grants nothing
    (new files there take the directory's group): it stays."""
    return ((stat.S_ISUID if e.uid != uid else 0)
            | (stat.S_ISGID if e.gid != gid and e.type != T_DIR else 0)) & e.mode


class Restorer:
    """Restores records into a target.  ``lookup`` finds a path's record in the tree being restored: a
    selection that leaves out the first path of a hard-linked file restores its data at a selected link."""

    def __init__(self, repo: Repo | BlobSource, target: str, options: RestoreOptions,
                 lookup: Callable[[bytes], Record | None] | None = None, tree_name: str = "manifest",
                 subtree: bytes = b""):
        check_overwrite(options.overwrite, options.delete)
        if options.overwrite == "if-changed" and not options.delta:
            options = dataclasses.replace(options, delta=True)
        if options.delta and not isinstance(repo, Repo):
            raise UsageError("a delta restore compares chunks by their repository ids: it needs a repository")
        self.repo = repo
        self.target = os.fsencode(os.path.abspath(target))
        self._mounts: set[bytes] | None = None
        self.opt = options
        self.owners = options.owners if options.owners is not None else (os.geteuid() == 0)
        self.result = RestoreResult()
        self.selected = Selection(options.includes, options.excludes, options.iexcludes)
        self.matched = 0  # entries below the root the selection took (``note_walked``)
        self.excluded_matches = False  # an include matched an entry that an exclude then left out
        self.subtree = subtree  # the path of the snapshot restored as the root (SNAPSHOT:PATH), b"": all of it
        self.setid_dropped = 0  # entries whose set-id bits were for other owners (``_setid_for_owner_only``)
        self.lookup = lookup
        self.tree_name = tree_name  # what a tree that would lead out of the target is called, refused
        self._dirs: list[Entry] = []  # the directories the walk is in, whose metadata waits for their children
        self._fresh = False  # the target was empty: nothing in it needs to be looked at or made room for
        # The mode of a target closed while it fills (``_close_while_filling``): the umask's, of one this restore
        # made; or the one an empty target others could write in had.  Given back where no root mode is recorded.
        self._made_mode: int | None = None
        self._mode_noted = False  # the target carries ``_note_mode``'s note, removed once all is in
        self.root_left = False  # the target is another user's: the snapshot root's metadata was not set there
        self._root_recorded = False  # the snapshot records its root directory (not several paths, a stream)
        self._far_times: dict[bytes, int] = {}  # entries with times some file systems cannot hold: path -> time
        self._far_count = 0
        self._target_dirs: TargetDirs | None = None
        self._lock_fd: int | None = None  # holds the target's lock (``_lock_target``) until ``close``
        self._deferred: list[Entry] | None = None  # left directories whose metadata waits
        # Entries that stand for one stretch of a larger file, by id(entry): (entry, offset in the file).
        self.parts: dict[int, tuple[Entry, int]] = {}
        self.parts_written: set[bytes] = set()  # the files (paths in the snapshot) this process wrote a part of
        # small files waiting to be written: (directory descriptor, name, data, entry)
        self._run: list[tuple[int, bytes, Plaintext, Entry]] = []
        self._run_bytes = 0
        self._kept_linked: set[tuple[int, int]] = set()  # --delta: files with other links kept as they were
        self._zero_ids: dict[int, bytes] = {}  # --delta: the id of zeros of each length a hole held a chunk of
        self._last_hashed: tuple[bytes, bytes] | None = None  # a chunk's id and the bytes found to hash to it
        # --overwrite never/if-newer: the files this restore wrote (a hard link to another is linked to a copy
        # of the snapshot's content, not to what the target kept), the directories kept with their metadata
        # as found (stat), the key of a directory entry kept as something else (what lies below is not
        # restored), and the path that took the data of a linked file kept (its other links link to it).
        self._written_files: set[bytes] = set()
        self._kept_dirs: dict[bytes, os.stat_result] = {}
        self._kept_below: bytes | None = None
        self._regrouped: dict[bytes, bytes] = {}
        # In place: the names written in each directory the walk is in, by their form without case and
        # trailing dots (``_restore_entry_once``)
        self._names_written: dict[bytes, dict[str, bytes]] = {}
        # Before anything is written: files in the target changed since then are this restore's own.
        self._began_ns = time.time_ns() - LEFTOVER_SLACK_NS

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the target's directory descriptors, and of its lock."""
        if self._target_dirs is not None:
            self._target_dirs.close()
            self._target_dirs = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # never LOCK_UN: a worker process closing its copy must not release it
            self._lock_fd = None

    def _lock_target(self) -> None:
        """Hold the target's lock (store/target_lock.py) from before the target is looked at until the restore
        is done: another restore writing into it is waited for (``wait``), else refused (TargetBusy)."""
        if self._lock_fd is None:
            self._lock_fd = lock_target(self.dirs.at(b"")[0], os.fsdecode(self.target), self.opt.wait)

    @property
    def dirs(self) -> TargetDirs:
        """The target's directories, opened from the target once it is made and final.  A link named as the
        target is followed as the target is checked (``_follow_target``), never by the open: one put in the
        target's place between the check and the open is whoever can write where it lies sending it
        elsewhere (of another user, the check would have refused it)."""
        if self._target_dirs is None:
            try:
                self._target_dirs = TargetDirs(self.target, follow=False)
            except OSError:
                if not os.path.islink(self.target):
                    raise
                raise TargetUnwritable(f"a symbolic link was put in the place of the restore target "
                                       f"{os.fsdecode(self.target)} while the restore began; nothing restored "
                                       "through it") from None
        return self._target_dirs

    def at(self, rel: bytes, make: bool = False) -> tuple[int, bytes]:
        """Where a path of the snapshot lies in the target: its directory's descriptor and its name."""
        return self.dirs.at(safe_relpath(rel), make)

    def remove_quietly(self, rel: bytes) -> None:
        """Remove a file that was not written whole: it must not keep its name.  Best effort: the error that
        cut it short is what the caller reports."""
        try:
            pfd, name = self.at(rel)
            os.unlink(name, dir_fd=pfd)
        except (OSError, ChunkvaultError):
            pass

    def _open(self, rel: bytes, flags: int, mode: int = 0o600) -> int:
        """Open ``rel`` in its directory, never through a link, and never waiting: a FIFO put in a file's
        place while the restore runs would hold an open for writing (or reading) for ever."""
        pfd, name = self.at(rel)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=pfd)

    @staticmethod
    def _regular(fd: int, rel: bytes, made_here: bool = False) -> os.stat_result:
        """TargetUnwritable unless ``fd`` is a regular file, and, ``made_here``, one this restore made: no
        other link, this user's (a file someone else put in its place and holds open must not receive the
        entry's data, owner and set-id bits)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (made_here and (st.st_nlink != 1 or st.st_uid != os.geteuid())):
            raise TargetUnwritable(f"something else was put in the place of {os.fsdecode(rel)} while the restore "
                                   "ran; not written")
        return st

    def _follow_target(self) -> None:
        """A target that is a symbolic link to a directory, named by the user, is followed, as a path
        through links above it is: once, before the target is opened (``dirs``), never again after, when a
        link there is one put in the target's place while the restore runs."""
        if self._target_dirs is None and os.path.islink(self.target) and os.path.isdir(self.target):
            owner = os.lstat(self.target).st_uid
            if owner not in (0, os.geteuid()):  # as the kernel's protected_symlinks: whoever can write beside the
                # target could put it there just before the restore looked, to send it (run as root) elsewhere
                leads_to = os.fsdecode(os.path.realpath(self.target))
                raise UsageError(f"restore target {os.fsdecode(self.target)} is a symbolic link of another user "
                                 f"(uid {owner}): name the directory it leads to ({leads_to}) if that is where "
                                 "the restore goes")
            self.target = os.path.realpath(self.target)

    @property
    def root(self) -> bytes:
        """The target as a path through its descriptor (``dirs``): what is done to the target by name once it
        is open (its mode given back, probe files, --delete's walk) stays in it, where ``target`` would follow
        a symbolic link out of it that whoever can write where it lies put in its place meanwhile."""
        return proc_path(self.dirs.at(b"")[0]) + b"/."

    def check_target(self) -> None:
        self._follow_target()
        t = self.target
        try:
            made = False
            if not os.path.lexists(t):
                parent = os.path.dirname(os.path.abspath(t))
                try:
                    os.makedirs(parent, exist_ok=True)
                except FileExistsError:  # there, but no directory: mkdir's "File exists" misled
                    os.stat(parent)  # a link loop or a dangling link says so itself
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
                try:
                    os.mkdir(t)
                    made = True
                except FileExistsError:  # made meanwhile (by another restore into it): looked at as found
                    pass
            if not made:
                if not os.path.isdir(t) or os.path.islink(t):
                    raise UsageError(f"restore target is not a directory: {os.fsdecode(t)}")
                self._lock_target()  # before it is found empty: another restore may be filling it
                closed = self._close_while_filling()  # before it is found empty: nothing put there after counts
                if os.listdir(t):
                    if closed is not None and not self.opt.force:  # refused: as it was
                        os.chmod(self.root, closed)
                    elif closed is not None:
                        # in place, closed while it fills as an empty one is: entries put there meanwhile (one in
                        # a directory the snapshot has, that then took its owner) outlived --delete's walk
                        self._made_mode = closed
                        self._note_mode(closed)
                    elif self._made_mode is None:
                        self._made_mode = self._noted_mode()  # one a restore killed meanwhile closed
                    if not self.opt.force:
                        raise TargetNotEmpty(f"restore target {os.fsdecode(t)} is not empty (a restore in place "
                                             "must be asked for)")
                else:
                    self._fresh = True
                    self._made_mode = closed if closed is not None else self._made_mode
                    if closed is not None:
                        self._note_mode(closed)
                    elif self._made_mode is None:  # one a restore stopped before it wrote anything closed
                        self._made_mode = self._noted_mode()
            else:
                self._lock_target()  # refused if another restore that found it made took it first
                # through its descriptor from here on, as every later step: not through a link put in its place
                self._made_mode = stat.S_IMODE(os.stat(self.root).st_mode)  # the umask's: given back once all is in
                os.chmod(self.root, 0o700)  # closed while it fills, as its directories are (``note_walked``)
                self._note_mode(self._made_mode)
                self._fresh = True
        except OSError as exc:
            raise target_error(f"cannot restore into {os.fsdecode(t)}", exc) from None
        self.dirs  # opened now, before any worker process is forked: they share it

    def _close_while_filling(self) -> int | None:
        """Close a target that others may write in (0777, 0775, 1777) to 0700 while the restore fills it (empty, or in
        place), as one it makes is, where this user may: whoever can write there could put a directory of their own
        where the snapshot has one (the restore then wrote into it, theirs to change until its end), or move what was
        restored aside and put their own in its place.  The mode it had, or None where it was not closed; the
        snapshot root's recorded mode, else that one, is the target's once all is in (``note_walked``).  Until then
        (a restore killed) it stays 0700, as one the restore made."""
        if self._made_mode is not None:  # closed already (--delete's walk checked the target first)
            return None
        st = os.fstat(self.dirs.at(b"")[0])
        if not st.st_mode & 0o022 or os.geteuid() not in (0, st.st_uid):
            return None
        try:
            os.chmod(self.root, 0o700)
        except PermissionError:  # root without CAP_FOWNER (a container's), in another's target: as before
            return None
        return stat.S_IMODE(st.st_mode)

    def _note_mode(self, mode: int) -> None:
        """Note on the target, closed to 0700 while it fills, the mode it gets back once all is in: a restore
        killed before then left it 0700, and a rerun in place (--delta) kept that.  Not noted where the file
        system takes no extended attribute (the rerun then leaves it 0700, as before)."""
        try:
            os.setxattr(self.root, MODE_NOTE, b"%o" % mode)
            self._mode_noted = True
        except OSError:
            pass

    def _noted_mode(self) -> int | None:
        """The mode ``_note_mode`` noted on the target, where it is still closed (0700) as the restore that
        noted it left it; None where none is."""
        try:
            noted = os.getxattr(self.root, MODE_NOTE)
            self._mode_noted = True
            if stat.S_IMODE(os.stat(self.root).st_mode) == 0o700 and re.fullmatch(rb"[0-7]{1,4}", noted):
                return int(noted, 8) & 0o7777
        except OSError:
            pass
        return None

    def run(self, records: Iterator[Record]) -> RestoreResult:
        """Restore into an empty target (or in place); what the target does not take and files whose data is
        damaged are left out, and then reported (``RestoreResult.raise_for_problems``)."""
        with self:
            self.check_target()
            self.restore_records(self.selected_records(records))
            self.note_walked()  # the target still open: its mode is given back through its descriptor
        self.result.raise_for_problems()
        return self.result

    def note_walked(self) -> None:
        """The warnings known once the whole tree has been walked (through ``selected_records``): the owner
        names this machine does not know, and includes that took nothing.  And a target this restore made,
        closed while it filled, opened as the umask has it where the snapshot records no root directory whose
        mode it takes (several paths, a stream): a dump restored for another user to read stayed 0700."""
        if self._made_mode is not None and not self._root_recorded:
            try:
                os.chmod(self.root, self._made_mode)
            except OSError as exc:
                self.result.warnings.append(f"{os.fsdecode(self.target)} left mode 0700: {_reason(exc)}")
        if self._mode_noted:  # its mode is given (or the snapshot root's): the note is done with
            try:
                os.removexattr(self.root, MODE_NOTE)
            except OSError:
                pass
        missed = self.opt.owner_map.missed() if self.opt.owner_map is not None and self.owners else None
        if missed is not None:
            self.result.warnings.append(missed)
        for summed in (self.result.unsupported_xattrs_warning(), self.result.denied_xattrs_warning()):
            if summed is not None:
                self.result.warnings.append(summed)
        self._note_far_times()
        if self.setid_dropped:
            n = self.setid_dropped
            self.result.warnings.append(f"{n} entr{'y' if n == 1 else 'ies'} restored without their set-user/group-ID "
                                        "bits: recorded for other owners, which only a restore as root sets")
        self._note_unmatched()

    def _note_unmatched(self) -> None:
        """Includes name paths as `ls` lists them, relative to the snapshot's root (or to PATH of
        SNAPSHOT:PATH): a path given as it was on the backed-up machine would restore nothing, silently.
        Includes that matched what the excludes then left out are told that instead: their paths were right."""
        if not self.opt.includes or self.matched:
            return
        given = ", ".join(self.opt.includes)
        if self.excluded_matches:
            self.result.warnings.append(f"nothing restored: the excludes left out all that the includes {given} "
                                        "matched")
            return
        hint = " (without the leading /)" if any(g.startswith("/") for g in self.opt.includes) else ""
        root = (f"`ls SNAPSHOT:PATH` lists them, relative to PATH ({os.fsdecode(self.subtree)})" if self.subtree
                else "`ls` lists them, relative to the snapshot's root")
        self.result.warnings.append(f"nothing matched the includes {given}: includes are paths as {root}{hint}")

    @property
    def fresh(self) -> bool:
        """The target was empty (``check_target`` has run): nothing in it needs making room for."""
        return self._fresh

    def selected_records(self, records: Iterator[Record]) -> Iterator[Record]:
        """The records a restore takes.  Narrowed by a selection, these are the selected ones, each after
        the directories above it that the selection leaves out (restored too, for their recorded metadata,
        as restic does), and hard links whose first path is left out stand in for it (``_linked``)."""
        safe = self._noting_root(confined(records, self.tree_name))
        chosen = self._noting_far_times(safe if self.selected.everything else self._narrowed(safe))
        if not self.owners:
            return self._setid_for_owner_only(chosen)
        mapped = self.opt.owner_map
        return mapped.records(chosen) if mapped else chosen

    def _noting_far_times(self, records: Iterator[Record]) -> Iterator[Record]:
        """``records``, noting those whose time lies out of what every common file system holds (FAT from 1980,
        ext4 with small inodes and XFS without bigtime to 2038): ``note_walked`` looks whether they kept it.
        Noted anew at each walk: a restore in worker processes walks the tree twice where includes narrow it
        (``selected_bytes``), and each such entry was counted twice."""
        self._far_times = {}
        self._far_count = 0
        for rec in records:
            e = rec.entry
            low, high = _COMMON_TIMES_NS
            if e is not None and e.type != T_HARDLINK and not low <= e.mtime_ns < high:
                self._far_count += 1
                if len(self._far_times) < FAR_TIMES_CHECKED:
                    self._far_times[rec.path] = e.mtime_ns
            yield rec

    def _note_far_times(self) -> None:
        """One warning for the entries whose time the target could not hold (set to the nearest it holds,
        silently: a restore onto FAT of files dated 1970 gave them 1980), with the first of them; none from a
        restore that stopped on a full target, whose later entries were never reached."""
        if not self._far_times or self.result.full:
            return
        root = self.root
        step = time_step(root)
        lost: list[tuple[bytes, int, int]] = []
        for path, want in self._far_times.items():
            try:
                got = os.lstat(os.path.join(root, path)).st_mtime_ns
            except (OSError, ValueError):
                continue
            if abs(got - want) >= step:
                lost.append((path, want, got))
        if not lost:
            return
        path, want, got = lost[0]
        unchecked = self._far_count - len(self._far_times)
        more = f", and {len(lost) - 1} more" if len(lost) > 1 else ""
        self.result.warnings.append(
            f"{len(lost)} entr{'y' if len(lost) == 1 else 'ies'} kept a time the target's file system cannot hold, "
            f"set to the nearest it holds: {os.fsdecode(path) or '.'} (recorded {_iso_ns(want)}, now "
            f"{_iso_ns(got)}){more}" + (f" (of {unchecked} more such times, none was looked at)" if unchecked else ""))

    def _unnote_far_time(self, path: bytes) -> None:
        """``path`` was not restored (kept as the target had it, or not written): the time found there is not
        the snapshot's, and no sign of what the target's file system holds."""
        if self._far_times.pop(path, None) is not None:
            self._far_count -= 1

    def _noting_root(self, records: Iterator[Record]) -> Iterator[Record]:
        """``records``, noting whether the snapshot records its root directory: its mode is then the target's."""
        for rec in records:
            if rec.path == b"" and rec.entry is not None and rec.entry.type == T_DIR:
                self._root_recorded = True
            yield rec

    def _setid_for_owner_only(self, records: Iterator[Record]) -> Iterator[Record]:
        """A restore that sets no owners leaves each entry to whoever restores it: set-user/group-ID bits
        recorded for another user or group would grant their rights to that one, so they are dropped (as
        GNU tar does for a user other than root), and counted (``note_walked``)."""
        uid, gid = os.geteuid(), os.getegid()
        for rec in records:
            e = rec.entry
            if e is not None and e.mode & 0o6000 and e.type != T_HARDLINK:
                mode = e.mode & ~setid_bits_for_others(e, uid, gid)
                if mode != e.mode:
                    self.setid_dropped += 1
                    rec = rec._replace(entry=dataclasses.replace(e, mode=mode))
            yield rec

    def _narrowed(self, records: Iterator[Record]) -> Iterator[Record]:
        above: list[Record] = []  # directories left out on the way down to the current record, not yet given
        moved: dict[bytes, bytes] = {}  # a left-out first path of a hard-linked file -> the link holding its data
        for rec in records:
            while above and not rec.path.startswith(above[-1].path + b"/"):
                above.pop()
            if not self.selected(rec.path):
                if rec.entry is not None and rec.entry.type == T_DIR:
                    above.append(rec)
                if not self.matched and not self.excluded_matches and self.selected.included(rec.path):
                    self.excluded_matches = True
                continue
            self.matched += bool(rec.path)
            yield from above
            above.clear()
            yield self._linked(rec, moved)

    def _linked(self, rec: Record, moved: dict[bytes, bytes]) -> Record:
        """A selected hard link whose target (the file's first path) is left out: the first such link becomes
        the file, with its data, and the others link to it.  Every process of a restore (store/restore_workers.py)
        walks the same records, so they agree on which path holds the data."""
        e = rec.entry
        if e is None or e.type != T_HARDLINK or self.selected(e.target):
            return rec
        if e.target in moved:
            return rec._replace(entry=dataclasses.replace(e, target=moved[e.target]))
        first = self.lookup(e.target) if self.lookup is not None else None
        if first is None or first.entry is None or first.entry.type != T_FILE:
            return rec  # restored as before: a warning that its target was not restored
        moved[e.target] = e.path
        return rec._replace(entry=dataclasses.replace(first.entry, path=e.path))

    def defer_directories(self) -> None:
        """Keep directories' metadata until ``finish_directories``: other processes still write into them."""
        self._deferred = []

    def finish_directories(self) -> None:
        for e in self._deferred or ():
            self._finish_directory(e)
        self._deferred = None

    def restore_records(self, records: Iterator[Record]) -> None:
        """Restore ``records`` (sorted, selected) into the checked target.  An entry the target does not take
        is noted (``RestoreResult.unwritten``, with what lies below a directory it would not make) and the
        rest is restored; when the target runs out of space the restore stops (``RestoreResult.full``)."""
        remote = getattr(self.repo, "remote", None)
        pf = _Prefetcher(self.repo, records, self.opt.window_bytes, self.opt.fetch_threads, prefetch=not self.opt.delta,
                         far=remote is not None and not remote.cheap_ranges, checkpoint=self.opt.checkpoint,
                         wanted=self._written if self._keeping else None)
        refused: bytes | None = None  # key of a directory that could not be made, and a separator: its subtree
        try:
            while True:
                rec = pf.next_record()
                if rec is None:
                    break
                e = rec.entry
                assert e is not None
                self.dirs.release()  # between entries: only a queued run of small files holds a directory
                pf.begin(e)
                small = self._small(e, pf)
                if not small:
                    self._write_run()
                self._close_dirs_until(rec.path)
                if refused is not None and rec.key.startswith(refused):
                    pf.skip_rest()
                    self._not_written(rec.path, "its directory could not be made")
                    continue
                if self._kept_below is not None:
                    if rec.key.startswith(self._kept_below):
                        pf.skip_rest()
                        continue
                    self._kept_below = None
                try:
                    if small:
                        self._add_to_run(e, pf)
                    else:
                        self._restore_entry_once(e, pf)
                except (OSError, TargetUnwritable) as exc:
                    pf.skip_rest()
                    if isinstance(exc, OSError) and exc.errno in _FULL:
                        self.result.full = os.fsdecode(rec.path) or "."
                        return
                    self._not_written(rec.path, _reason(exc))
                    if e.type == T_DIR:
                        refused = rec.key + b"\x00"
            self._write_run()
            self._close_dirs_until(None)
        except _TargetFull:
            return
        finally:
            self._run, self._run_bytes = [], 0  # left unwritten only when the restore fails
            pf.close()

    def _small(self, e: Entry, pf: _Prefetcher) -> bool:
        """Whether a file is written in a run with others (``_add_to_run``): a whole file of one chunk, fetched
        ahead, into a target that was empty, with nothing a run does not set (extended attributes) or could
        refuse where it is set alone (a set-id or sticky bit: ``_chmod``)."""
        return (e.type == T_FILE and len(e.chunks) == 32 and self._fresh and pf.queued_current
                and not e.flags & F_UNREADABLE and not (self.opt.xattrs and e.xattrs) and id(e) not in self.parts
                and not e.mode & 0o7000)

    def _add_to_run(self, e: Entry, pf: _Prefetcher) -> None:
        """Take a small file's chunk and check it against the file's digest; the run is written when full."""
        pfd, name = self._make_room(e.path, False)
        try:
            data = next(pf.chunks())
            check_content(e, len(data), blake3.blake3(data).digest())
        except CorruptObject as exc:
            self._damaged(e, exc)
            return
        self._run.append((pfd, name, data, e))
        self.dirs.pin(pfd)
        self._run_bytes += len(data)
        if (len(self._run) >= RUN_FILES or self._run_bytes >= RUN_BYTES
                or self.dirs.pinned >= min(RUN_DIRS, self.dirs.kept // 2)):
            self._write_run()

    def _write_run(self) -> None:
        """Write the small files waiting, in one call (``writefiles``); _TargetFull when one found no space."""
        run, self._run, self._run_bytes = self._run, [], 0
        if not run:
            return
        try:
            results = writefiles.write_small_files(
                [(pfd, name, data, e.mode, e.uid, e.gid, e.mtime_ns) for pfd, name, data, e in run], self.owners)
        finally:
            for pfd, _, _, _ in run:
                self.dirs.unpin(pfd)
        for (_, _, _, e), (error, owner_error) in zip(run, results):
            if error in _FULL:
                self.result.full = os.fsdecode(e.path)
                raise _TargetFull
            if error:
                self._not_written(e.path, os.strerror(error))
                continue
            if owner_error:
                self._owner_not_set(e, os.strerror(owner_error))
            self.result.files += 1
            self.result.bytes += e.size
        if self.opt.progress is not None:
            self.opt.progress(self.result.files, self.result.bytes)

    def _not_written(self, path: bytes, reason: str) -> None:
        self.result.unwritten.append((os.fsdecode(path) or ".", reason))
        self._unnote_far_time(path)

    def delete_extra(self, records: Iterator[Record]) -> None:
        """--delete: remove what lies in the target but not in the snapshot (a second, merged walk).  What
        lies below a directory whose listing failed at backup time is kept: the snapshot does not know it.  So
        is what a file system mounted in the target holds (another one, or a bind mount of this one: a
        backup with --one-file-system records a mount point as an empty directory, and put back in place,
        the whole of /home was deleted), with a warning; a directory with a mount point below it is not
        removed whole, but what it holds besides is, entry by entry.  A directory of this user's that the
        snapshot has and that its owner may not list (000, as restored) is opened up while it is walked and
        emptied of what the snapshot lacks, and gets its mode back after."""
        self._follow_target()  # else the walk would see a link and nothing below it
        self._lock_target()  # before anything is deleted
        mounts = self._mount_points()
        around = {p[:i] for p in mounts for i, c in enumerate(p) if c == ord("/")}  # the directories above them
        recs = confined(records, self.tree_name)
        want = next(recs, None)
        doomed: list[bytes] = []
        opened = contextlib.ExitStack()  # the directories opened up to be walked: closed, their modes back
        top = TargetWalk(self.root, self.root, self.result.warnings)
        walks = [(iter(top), top)]
        try:
            self._delete_walk(walks, recs, want, mounts, around, doomed, opened)
            for rel in doomed:
                try:
                    pfd, name = self.at(rel)
                    st = _lstat(pfd, name)
                    if st is not None:
                        self._remove(rel, pfd, name, st)
                        self.result.deleted += 1
                except (OSError, TargetUnwritable) as exc:  # a read-only target, say: named, and the restore goes on
                    self._not_written(rel, f"not deleted: {_reason(exc)}")
                finally:
                    self.dirs.release()
        finally:
            try:
                opened.close()
            except OSError as exc:
                self.result.warnings.append(f"cannot give {exc.filename or 'a directory'} its mode back: "
                                            f"{_reason(exc)}")

    def _opened_to_walk(self, rel: bytes, path: bytes, st: os.stat_result, opened: contextlib.ExitStack
                        ) -> tuple[Iterator[tuple[bytes, bytes, object, bool]], TargetWalk] | None:
        """The entries below ``rel``, this user's directory its owner may not list, opened up to be walked
        (``_opened_up`` in ``opened``, to be closed again), and their walk: None where it is not that
        directory, or cannot be opened."""
        try:
            pfd, name = self.at(rel)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        except (OSError, TargetUnwritable):
            return None
        finally:
            self.dirs.release()
        opened.callback(os.close, fd)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not closed_to_owner(now, 0o500):
            return None
        try:
            opened.enter_context(_opened_up(fd, os.fsdecode(path)))
        except OSError:
            return None
        walk = TargetWalk(self.root, path, self.result.warnings)
        return ((rel + b"/" + sub, p, s, ok) for sub, p, s, ok in walk if sub), walk

    def _delete_walk(self, walks: list[tuple[Iterator[tuple[bytes, bytes, object, bool]], TargetWalk]],
                     recs: Iterator[Record], want: Record | None, mounts: set[bytes],
                     around: set[bytes], doomed: list[bytes], opened: contextlib.ExitStack) -> None:
        """The merged walk of ``delete_extra``: ``doomed`` gets what the target has and the snapshot lacks."""
        skip: bytes | None = None
        kept: bytes | None = None  # key of the unlisted directory we are in, and a separator
        # Directories listed but not searchable (0600), each walked again opened up: by the walk it lies in, its
        # key and a separator; what that walk gives below it (each entry's lstat refused) is the other walk's.
        shadowed: dict[int, bytes] = {}
        while walks:
            item = next(walks[-1][0], None)
            walk = walks[-1][1]  # the walk that gave it: what it could not stat or list is told as it moves on
            if item is None:
                shadowed.pop(id(walks.pop()[1]), None)
                continue
            rel, _path, _st, _ok = item
            key = sort_key(rel)
            below = shadowed.get(id(walk))
            if below is not None:
                if key.startswith(below):
                    walk.pass_over(walk.STAT)  # it could, opened up
                    continue
                del shadowed[id(walk)]
            if rel == b"":
                continue
            if skip is not None and key.startswith(skip + b"\x00"):
                # removed whole, or not the target's: nothing to stat there, nor to list (a 000 directory in it)
                walk.pass_over(walk.STAT, walk.LIST)
                continue
            if kept is not None and key.startswith(kept):
                continue
            while want is not None and want.key < key:
                want = next(recs, None)
            if rel in mounts:  # what is mounted there is not the target's, in the snapshot or not
                if want is None or want.key != key:
                    self.result.warnings.append(f"{os.fsdecode(rel)}: a file system is mounted there; --delete "
                                                "left what it holds as it is")
                skip = key
                continue
            if want is not None and want.key == key:
                e = want.entry
                if e is not None and e.type == T_DIR and e.flags & F_UNREADABLE:
                    kept = key + b"\x00"
                elif self._keeping and e is not None and e.type != T_DIR and stat.S_ISDIR(getattr(_st, "st_mode", 0)):
                    kept = key + b"\x00"  # a directory the restore keeps in the file's place (``_kept``), whole
                elif (e is not None and e.type == T_DIR and stat.S_ISDIR(getattr(_st, "st_mode", 0))
                      and closed_to_owner(_st, 0o100 if _ok else 0o500)
                      and not (_ok and os.access(_path, os.X_OK, effective_ids=True))):  # listed: searchable?
                    opened_up = self._opened_to_walk(rel, _path, _st, opened)
                    if opened_up is not None:
                        walk.pass_over(walk.LIST)  # it can, opened up
                        if _ok:
                            shadowed[id(walk)] = key + b"\x00"
                        walks.append(opened_up)
                continue
            if not self.selected(rel) or rel in around:
                continue
            doomed.append(rel)
            skip = key
            if not _ok:
                walk.pass_over(walk.LIST)  # removed whole

    def _close_dirs_until(self, path: bytes | None) -> None:
        """Apply metadata to directories we have left (after their children are written)."""
        while self._dirs:
            e = self._dirs[-1]
            if path is not None and (e.path == b"" or path.startswith(e.path + b"/")):
                return
            self._write_run()  # children first
            self._dirs.pop()
            self._names_written.pop(e.path, None)
            if self._deferred is not None:
                self._deferred.append(e)
            else:
                self._finish_directory(e)

    def _finish_directory(self, e: Entry) -> None:
        """Through the directory itself, opened without following a link: one swapped for a symbolic link
        while the restore ran would otherwise give its destination the directory's owner, mode and times.
        Its callers hold no directory descriptor and have no run queued: those let go of are closed after."""
        kept = self._kept_dirs.pop(e.path, None)
        if kept is not None:
            self._put_back(e, kept)
            return
        if not e.path and self.root_left:
            return
        try:
            try:
                fd = self._open(e.path, os.O_RDONLY | os.O_DIRECTORY)
            except PermissionError:  # a directory its owner may not read, kept in place
                self._apply_meta(e)
                return
            try:
                self._apply_meta(e, fd)
            finally:
                os.close(fd)
        except (OSError, TargetUnwritable) as exc:
            if not e.path and isinstance(exc, PermissionError) and self._others_target():
                return
            self.result.dirs -= 1  # counted when made; not restored as recorded after all
            self._not_written(e.path, _reason(exc))
        finally:
            self.dirs.release()

    def _others_target(self) -> bool:
        """Whether the target, whose mode or times could not be set, is a directory of another user's, which
        this restore may write into but not give the snapshot root's metadata (a shared directory, 1777 or
        group-writable, as another user than root): they are left as they are, with a warning, where the
        restore, all else written, ended with ". could not be written" (exit 14)."""
        uid = os.fstat(self.dirs.at(b"")[0]).st_uid
        if uid == os.geteuid():
            return False
        self.result.dirs -= 1  # counted when made; not restored as recorded
        self.root_left = True
        self.result.warnings.append(f"restore target {os.fsdecode(self.target)} is another user's directory (uid "
                                    f"{uid}): its mode and times left as they are")
        return True

    def _update_file(self, e: Entry) -> None:
        """--delta: keep what is already right; rewrite only the chunk ranges that differ, then give it the
        entry's metadata.  Judged by the file the descriptor holds, never by a second lookup of its name: a
        hard link put there meanwhile (to a file out of the target) must get neither the snapshot's data nor
        its owner.  One with other links, one the update would grant an owner or set-id bits (``_grants``),
        one whose content changes and that grants others access the entry does not (``_more_open``), or one
        this process may not write (read-only, or a program running from it: ETXTBSY; a plain restore
        replaces either), or one bind-mounted there (the rename then fails, naming it), is written anew
        instead (``_replace_file``).  The ranges to rewrite are held until
        the whole file is read and checked, up to ``DELTA_HOLD_BYTES``: damaged data found before the first
        write leaves the file as it was.  A file cut short once written to (no space, damaged data past
        that) is removed: neither what it was nor what the snapshot holds; one a stop cut short is left for a
        rerun to finish."""
        try:
            fd = self._open(e.path, os.O_RDONLY)  # one that holds the content may not be writable, and need not be
        except PermissionError:  # nor readable by this user (mode 0200): written anew, as a plain restore does
            self._write_beside(e, (self.repo.read_blob(c) for c in e.chunk_ids()))
            return
        try:
            st = self._regular(fd, e.path)
            # a file bind-mounted there is another file's name, as a hard link is: never written into
            anew = st.st_nlink > 1 or self._grants(st, e) or e.path in self._mount_points()
            if not anew and (self._looks_right(st, e) or self._holds(fd, e)):
                self.result.unchanged_files += 1
                self._apply_meta(e, fd)
                return
            anew = anew or self._more_open(fd, st, e)
            wfd = -1
            if not anew:  # the same file for writing, reopened through its descriptor, not by its name
                try:
                    wfd = os.open(proc_path(fd), os.O_RDWR | os.O_CLOEXEC)
                except OSError as exc:
                    if not isinstance(exc, PermissionError) and exc.errno != errno.ETXTBSY:
                        raise
                    anew = True
        finally:
            os.close(fd)
        if anew:
            self._replace_file(e)
            return
        fd = wfd
        pending: list[tuple[int, Plaintext]] = []  # (offset, chunk) still to write
        held_back = 0
        written = grown = False
        st: os.stat_result | None = None
        try:
            st = os.fstat(fd)
            size = st.st_size
            # What the file grows by is allocated, and the file lengthened, before anything is written: a
            # disk without room for it then leaves the file as it was.  The chunks there are all written
            # (none is taken for held: it reads as zeros), their blocks of zeros punched again.
            grown = e.size > size and reserve(fd, size, e.size - size)
            if grown:
                os.ftruncate(fd, e.size)
            hasher = blake3.blake3()
            pos = 0
            zeros_from = e.size if grown else size
            meeting = _MeetingBlocks()
            for data, held in self._chunks_held_or_read(fd, e, size):
                meeting.add(pos, data, not held)
                if not held:
                    pending.append((pos, data))
                    held_back += len(data)
                    if held_back > DELTA_HOLD_BYTES:
                        written = True
                        _write_ranges(fd, pending, zeros_from)
                        pending, held_back = [], 0
                        meeting.punch(fd)
                hasher.update(data)
                pos += len(data)
            check_content(e, pos, hasher.digest())
            written = True
            _write_ranges(fd, pending, zeros_from)
            meeting.punch(fd)
            os.ftruncate(fd, pos)
            self._apply_meta(e, fd)
        except BaseException as exc:
            if not written and st is not None and e.size > st.st_size:  # kept as it was: its length, times,
                _shorten(fd, st)                                            # and nothing allocated past it
            os.close(fd)
            if written and not isinstance(exc, KeyboardInterrupt):
                self.remove_quietly(e.path)
                self.result.full_in_place = isinstance(exc, OSError) and exc.errno in _FULL
                if isinstance(exc, CorruptObject):
                    self.result.removed.append(os.fsdecode(e.path))
            raise
        os.close(fd)

    def _replace_file(self, e: Entry) -> None:
        """--delta over a file with other links (some perhaps out of the target), or one an update in place
        would grant an owner or set-id bits (``_grants``), or one more open than the entry (``_more_open``)
        or not writable by this process: a new file is written beside it and renamed over
        it, so no other link sees the snapshot's content or metadata (what it opens by name is only read,
        and each chunk taken from it is checked against its id).  Its chunks that the old file holds at
        their offsets are copied from it, not read from the repository.  A file right already, metadata and
        all, keeps its inode and its links, unless another path of this restore kept that inode: the
        snapshot has them as separate files (left linked, a write to one changed the other)."""
        fd = self._open(e.path, os.O_RDONLY)
        try:
            st = self._regular(fd, e.path)
            if ((st.st_dev, st.st_ino) not in self._kept_linked and (self._looks_right(st, e) or self._holds(fd, e))
                    and self._meta_matches(e)):
                self._kept_linked.add((st.st_dev, st.st_ino))
                self.result.unchanged_files += 1
                return
            self._write_beside(e, (data for data, _ in self._chunks_held_or_read(fd, e)))
        finally:
            os.close(fd)

    def _looks_right(self, st: os.stat_result, e: Entry) -> bool:
        """--overwrite if-changed: a file of the entry's size and mtime is taken as holding its content,
        unread (restic's); --delta reads every file."""
        return self.opt.overwrite == "if-changed" and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns

    def _holds(self, fd: int, e: Entry) -> bool:
        """Whether the file open at ``fd`` holds exactly the entry's content: its size, and each chunk at its
        offset (a chunk's id is its content's keyed hash), read up to the first that differs.  Hashed whole
        first, a changed file of the same size (a database's, written in place) was read twice: here to
        the end, then again for the chunks it holds."""
        if os.fstat(fd).st_size != e.size:
            return False
        assert isinstance(self.repo, Repo)
        holes = may_have_holes(os.fstat(fd))
        pos = 0
        for cid in e.chunk_ids():
            current = self._held_at(fd, cid, pos, e.size, holes)
            if current is None:  # differs, or of a length the index does not know: told by the digest
                return self.repo.locate(cid) is None and self._holds_digest(fd, e)
            pos += len(current)
        return pos == e.size and os.fstat(fd).st_size == e.size  # not written past its end meanwhile

    @staticmethod
    def _holds_digest(fd: int, e: Entry) -> bool:
        """Whether the file open at ``fd`` holds the entry's content by its digest: for an entry with a chunk the
        index lacks (a pack lost, the index repaired), whose offsets are not known; the file holding it is kept
        as it is, and nothing need be read from the repository."""
        hasher = blake3.blake3()
        return hash_file(fd, hasher) == e.size and hasher.digest() == e.digest

    def _meta_matches(self, e: Entry) -> bool:
        """Whether what a restore sets on the file (mode, time, owner, attributes) is already so."""
        pfd, name = self.at(e.path)
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        return (stat.S_IMODE(st.st_mode) == stat.S_IMODE(e.mode) and st.st_mtime_ns == e.mtime_ns
                and (not self.owners or (st.st_uid, st.st_gid) == (e.uid, e.gid))
                and (not self.opt.xattrs or read_xattrs(proc_path(pfd, name)) == e.xattrs))

    def _chunks_held_or_read(self, fd: int, e: Entry, size: int = MAX_FILE_OFFSET) -> Iterator[tuple[bytes, bool]]:
        """The entry's chunks in order, each with whether the file open at ``fd`` already holds it at its
        offset within its first ``size`` bytes (then read from there) or not (read from the repository, and
        counted as rewritten)."""
        holes = may_have_holes(os.fstat(fd))  # else no seek per chunk (a round trip on NFS)
        pos = 0
        for cid in e.chunk_ids():
            data = self._held_at(fd, cid, pos, size, holes)
            held = data is not None
            if data is None:
                data = self.repo.read_blob(cid)
                self.result.rewritten_bytes += len(data)
            yield data, held
            pos += len(data)

    def _held_at(self, fd: int, cid: bytes, pos: int, size: int, holes: bool) -> bytes | None:
        """Chunk ``cid`` as the file open at ``fd`` holds it at ``pos``, within its first ``size`` bytes; None
        where it does not.  ``holes``: the file may have some, and a chunk lying in one is compared as
        zeros, unread (the kernel would make them), by the id of zeros of its length, found once."""
        assert isinstance(self.repo, Repo)
        loc = self.repo.locate(cid)
        if loc is None or pos + loc.raw_length > size:
            return None
        length = loc.raw_length
        if holes and hole_at(fd, pos) >= length:
            if length not in self._zero_ids:
                self._zero_ids[length] = self.repo.blob_id(bytes(length))
            return bytes(length) if self._zero_ids[length] == cid else None
        current = os.pread(fd, length, pos)
        return current if len(current) == length and self.repo.blob_id(current) == cid else None

    def _make_room(self, rel: bytes, is_dir: bool, keep_file: bool = False) -> tuple[int, bytes]:
        """Make sure ``rel``'s directory exists and nothing else is in its place; where it lies (``at``).

        In a target that was empty, nothing is: a path lookup per file saved.  In one that was not, a
        directory the snapshot does not restore may be a symbolic link: followed inside the target,
        refused (TargetUnwritable) out of it."""
        pfd, name = self.at(rel, make=True)
        if self._fresh:
            return pfd, name
        st = _lstat(pfd, name)
        if st is None or (is_dir and stat.S_ISDIR(st.st_mode)) or (keep_file and stat.S_ISREG(st.st_mode)):
            return pfd, name
        self._remove(rel, pfd, name, st)
        return pfd, name

    def _remove(self, rel: bytes, pfd: int, name: bytes, st: os.stat_result) -> None:
        """Remove what ``st`` found at ``rel`` (a directory with all below it), never through a link.  Refused,
        it is tried again with this user's own read-only directories opened up (the one it lies in, 0555 as
        restored, and those it empties, 000 say), as a restore writing into them does; another user's stay
        as they are, and the error stands."""
        try:
            try:
                self._remove_now(rel, pfd, name, st, unlock=False)
            except PermissionError:
                with _opened_up(pfd):
                    self._remove_now(rel, pfd, name, st, unlock=True)
        finally:
            self.dirs.forget(rel)

    def _remove_now(self, rel: bytes, pfd: int, name: bytes, st: os.stat_result, unlock: bool) -> None:
        if stat.S_ISDIR(st.st_mode):
            mounted = [m for m in self._mount_points() if m == rel or m.startswith(rel + b"/")]
            if mounted:  # a bind mount: its device is this file system's
                raise OSError(errno.EXDEV, "a file system is mounted there", os.fsdecode(mounted[0]))
            remove_tree(pfd, name, unlock=unlock)
        else:
            os.unlink(name, dir_fd=pfd)

    def _mount_points(self) -> set[bytes]:
        """The mount points in the target (paths relative to it), read once: nothing is removed through one."""
        if self._mounts is None:
            self._mounts = mount_points(self.target)
        return self._mounts

    def _kept_in_place(self, e: Entry) -> bool:
        """In a target that was not empty, what is left as it is: a file that no backup could read (the
        snapshot has no data for it, so the live one is not emptied; one kept with an earlier backup's data is
        restored with that, as a fresh restore does), and a symbolic link where a
        directory the selection leaves out lies above selected paths (followed within the target, as it
        always was; one out of it is refused, ``TargetDirs``)."""
        if self._fresh:
            return False
        if e.type == T_FILE and unread(e):
            if _lstat(*self.at(e.path, make=True)) is None:
                return False
            self.result.warnings.append(f"{os.fsdecode(e.path)} was unreadable at backup time: "
                                        "what the target holds there was left as it is")
            return True
        if e.type == T_DIR and not self.selected(e.path):
            st = _lstat(*self.at(e.path, make=True))
            return st is not None and stat.S_ISLNK(st.st_mode)
        return False

    @property
    def _keeping(self) -> bool:
        """In place, the target's entries are kept unless the snapshot's are newer, or kept outright."""
        return not self._fresh and self.opt.overwrite in ("if-newer", "never")

    def _kept(self, e: Entry) -> bool:
        """--overwrite never/if-newer: whether what the target has at ``e``'s path is kept as it is (counted
        in ``skipped_existing``).  A directory kept is still walked into, and gets back the mode and times it
        had once what lies below is restored (``_put_back``); a directory entry the target has as something
        else keeps it, and nothing below it is restored (a warning says so).  Any entry kept as another type
        than the snapshot's is named (a symbolic link where it has a file, say): it was not brought back."""
        pfd, name = self.at(e.path, make=True)
        st = _lstat(pfd, name)
        if st is None or not keeps_existing(self.opt.overwrite, e.type, e.mtime_ns, st.st_mode, st.st_mtime_ns):
            return False
        if e.type == T_DIR and stat.S_ISDIR(st.st_mode):
            if self._left_to_another(e, pfd, name):
                return True
            self._kept_dirs[e.path] = st
            if closed_to_owner(st):  # ours, read-only: opened up to be written in, as ``_restore_entry`` does
                os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=pfd, follow_symlinks=False)
            self._sweep_beside(e.path)
            self._dirs.append(e)
            self._unnote_far_time(e.path)
            return True
        self.result.skipped_existing += 1
        self._unnote_far_time(e.path)
        if e.type == T_DIR:
            self._kept_below = sort_key(e.path) + b"\x00"
            self.result.warnings.append(f"{os.fsdecode(e.path)}: the target has another type of entry where the "
                                        "snapshot has a directory; kept as it is, and nothing below it restored")
        elif stat.S_ISDIR(st.st_mode):
            self.result.warnings.append(f"{os.fsdecode(e.path)}: the target has a directory where the snapshot has "
                                        f"a {TYPE_NAMES.get(e.type, 'file')}; kept as it is, with all it holds")
        elif _kind(st.st_mode) != _ENTRY_KINDS.get(e.type, "file"):
            self.result.warnings.append(f"{os.fsdecode(e.path)}: the target has a {_kind(st.st_mode)} where the "
                                        f"snapshot has a {_ENTRY_KINDS.get(e.type, 'file')}; kept as it is")
        return True

    def _written(self, e: Entry) -> bool:
        """Whether a file ahead is to be written, its chunks then fetched ahead: one that ``_kept`` will keep
        is not (a restore of a few files deleted from a large tree reads those files' data alone).  Asked
        before the file's turn: a file a guess here leaves out is read when written, chunk by chunk."""
        try:
            pfd, name = self.at(e.path)
            st = _lstat(pfd, name)
        except FileNotFoundError:  # its directory is still to be made
            return True
        except (OSError, ChunkvaultError):  # below something kept in a directory's place, say
            return False
        return st is None or not keeps_existing(self.opt.overwrite, e.type, e.mtime_ns, st.st_mode, st.st_mtime_ns)

    def _put_back(self, e: Entry, st: os.stat_result) -> None:
        """A directory kept as the target had it: its mode and times as ``st`` found them, through the
        directory itself (never a link put in its place), now that what was restored below it is in."""
        try:
            pfd, name = self.at(e.path)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            try:
                where = proc_path(fd)
                mode = stat.S_IMODE(st.st_mode) if e.path or self._made_mode is None else self._made_mode
                if stat.S_IMODE(os.fstat(fd).st_mode) != mode:  # the target, kept: as it was before it was closed
                    os.chmod(where, mode)
                os.utime(where, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
        except (OSError, ChunkvaultError) as exc:
            self.result.warnings.append(f"{os.fsdecode(e.path) or '.'}, kept, could not be given back its mode "
                                        f"and times: {_reason(exc)}")
        finally:
            self.dirs.release()

    def _restore_entry_once(self, e: Entry, pf: _Prefetcher) -> None:
        """``_restore_entry``; in place, an entry whose name the target's file system takes for one this
        restore wrote in the same directory (FAT and exFAT compare names without case: "Makefile" and
        "makefile"; FAT drops a trailing dot or space) is not written: it would replace that one, whose
        content was lost without a word.  Such a name is there without being listed under it.  A fresh
        restore finds a file's taken (EEXIST) by itself, but not a directory's: mkdir's EEXIST is a directory
        there, which "Doc" is for "doc", whose entries then went into "Doc" with exit 0."""
        if (self._fresh and e.type != T_DIR) or e.type == T_HARDLINK or not e.path:
            self._restore_entry(e, pf)
            return
        parent, name = os.path.split(e.path)
        written = self._names_written.setdefault(parent, {})
        key = name.decode("utf-8", "surrogateescape").casefold().rstrip(". ")
        other = written.get(key, name)
        if other != name:
            pfd, here = self.at(e.path)
            if _lstat(pfd, here) is not None and here not in _listed(pfd):
                pf.skip_rest()
                raise TargetUnwritable(f"the target's file system takes its name for "
                                       f"{os.fsdecode(os.path.join(parent, other))}'s, restored already: names "
                                       "that differ in case alone, or by a trailing dot")
        self._restore_entry(e, pf)
        written.setdefault(key, name)

    def _restore_entry(self, e: Entry, pf: _Prefetcher) -> None:
        t = e.type
        if self._kept_in_place(e):
            return
        if self._keeping and t != T_HARDLINK and self._kept(e):  # a hard link: ``_restore_link`` decides
            pf.skip_rest()
            return
        if t == T_FILE and unread(e):  # no backup read it: an empty file with its time passed for its content
            self.result.warnings.append(f"{os.fsdecode(e.path)} was unreadable at backup time: not restored "
                                        "(no backup read its data)")
            return
        if t == T_HARDLINK:
            self._restore_link(e)
            return
        pfd, name = self._make_room(e.path, t == T_DIR, keep_file=t == T_FILE)
        if t == T_DIR:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:  # in place, or a worker process made it as a file's parent
                st = _lstat(pfd, name)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    raise
                if self._left_to_another(e, pfd, name):
                    return
                if closed_to_owner(st):
                    # ours, read-only (0555, say): opened up to be written in, as a fresh restore makes its
                    # directories; the recorded mode is set once all is in (``_finish_directory``)
                    os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=pfd, follow_symlinks=False)
                elif e.path and self.owners and st.st_uid not in (os.geteuid(), e.uid):  # the target: its own
                    self._take(pfd, name, st)
                elif st.st_mode & 0o077 & ~e.mode and os.geteuid() in (0, st.st_uid):
                    # more open than recorded (0755 for 0700): closed now, not once all is in, since what it
                    # holds may be readable by others only for the directory's sake (a 0644 file in ~/.ssh)
                    try:
                        os.chmod(name, stat.S_IMODE(st.st_mode) & (e.mode | 0o700), dir_fd=pfd, follow_symlinks=False)
                    except PermissionError:  # root without CAP_FOWNER (a container's), in another's target
                        if e.path or not self._others_target():
                            raise
                self._sweep_beside(e.path)
            self._dirs.append(e)
            self.result.dirs += 1
            if e.flags & F_UNREADABLE:  # it came back empty, or with what an earlier backup listed, unsaid
                self.result.warnings.append(f"{os.fsdecode(e.path) or '.'} could not be listed at backup time: "
                                            "restored with what an earlier backup found in it, if any")
            return
        if t == T_FILE:
            self._restore_file(e, pf)
        elif t == T_SYMLINK:
            os.symlink(e.target, name, dir_fd=pfd)
            self._apply_meta(e)
            self.result.links += 1
        elif t == T_FIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self._apply_meta(e)
            self.result.specials += 1
        elif t in (T_CHARDEV, T_BLOCKDEV):
            if not self.owners:
                self.result.warnings.append(f"device {os.fsdecode(e.path)} not restored (needs root)")
                return
            os.mknod(name, (stat.S_IFCHR if t == T_CHARDEV else stat.S_IFBLK) | 0o600, e.rdev, dir_fd=pfd)
            self._apply_meta(e)
            self.result.specials += 1

    @staticmethod
    def _take(pfd: int, name: bytes, st: os.stat_result) -> None:
        """Make the directory ``name`` (``st``), another user's where the snapshot has it another owner's, this
        one's and 0700 before anything is written into it, as a fresh restore makes its directories: left its
        owner's until the end (when it gets the snapshot's owner and mode), they could replace what the restore
        wrote there, or plant files of theirs, that stayed in a tree all root's.  Its mode is closed before it
        changes hands, and again after (its owner may have opened it meanwhile, as it still could)."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise TargetUnwritable("another directory was put in its place while the restore ran")
            where = proc_path(fd)
            try:
                os.chmod(where, 0o700)
                os.chown(where, os.geteuid(), os.getegid())
            except PermissionError:  # root without CAP_FOWNER or CAP_CHOWN (a container's): as before
                return
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
                os.chmod(where, 0o700)
        finally:
            os.close(fd)

    def _left_to_another(self, e: Entry, pfd: int, name: bytes) -> bool:
        """Whether a directory the target has where the snapshot has one is another restore's target, which it
        is writing into: then it and all below it are left as they are, and it is named among the entries not
        written (exit 14), as --delete leaves it (``remove_tree``), rather than written into under the other's
        writes.  The target itself is this restore's."""
        busy = another_restores(pfd, name) if e.path else None
        if busy is None:
            return False
        self._not_written(e.path, f"{busy} is writing into it as its target: left as it is, with all below it")
        self._kept_below = sort_key(e.path) + b"\x00"
        return True

    def _sweep_beside(self, rel: bytes) -> None:
        """Remove from a directory the target had the files an earlier restore killed outright was writing
        beside the ones they were to replace (``_write_beside``), each a stray copy of a file's data: those
        unchanged since before this restore began, so one that another process of it is writing stays (named:
        it may as well be one a restore killed just before this one began left)."""
        if self._fresh:
            return
        try:
            fd = self.dirs.dir(safe_relpath(rel))
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)  # ``fd`` only finds
            try:
                names = [n for n in map(os.fsencode, os.listdir(listing)) if _BESIDE_NAME.match(n)]
            finally:
                os.close(listing)
        except (OSError, ChunkvaultError):  # what the directory's own entry and children then meet is reported
            return
        for n in names:
            st = _lstat(fd, n)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            path = os.fsdecode(os.path.join(rel, n))
            if st.st_ctime_ns >= self._began_ns:  # a rerun right after a kill -9 left it without a word
                self.result.warnings.append(f"{path}, a restore's file written beside the one it replaces, was "
                                            "kept: changed as this restore began, it may be another's running "
                                            "now; a rerun once none runs removes it")
                continue
            try:
                os.unlink(n, dir_fd=fd)
            except FileNotFoundError:  # another process of this restore removed it first
                continue
            except OSError as exc:
                self.result.warnings.append(f"{path}, left by an interrupted restore, could not be removed: "
                                            f"{_reason(exc)}")
            else:
                self.result.warnings.append(f"{path}, left by an interrupted restore, was removed")

    def _grants(self, st: os.stat_result, e: Entry) -> bool:
        """Whether updating the file ``st`` describes in place would give it another owner or set-id bits it
        lacks: then it is written anew and renamed over, so that whoever holds it open for writing (its
        owner, say, who may write the target) does not keep a descriptor on a file that is now root's, or
        set-uid."""
        return ((self.owners and (st.st_uid, st.st_gid) != (e.uid, e.gid))
                or bool(e.mode & 0o6000 & ~st.st_mode))

    def _more_open(self, fd: int, st: os.stat_result, e: Entry) -> bool:
        """Whether the file open at ``fd`` grants others access the entry does not (group or other
        permissions, or another access ACL): the snapshot's data written into it would be read through
        it, and through any descriptor opened meanwhile, after its mode is set (0644 then, 0600 in the
        snapshot: the secret went to whoever had it open).  Then it is written anew and renamed over."""
        if st.st_mode & 0o077 & ~e.mode:
            return True
        try:
            acl = os.getxattr(fd, ACL_ACCESS)
        except OSError:  # none, or a file system without them
            return False
        return not e.xattrs or decode_xattrs(e.xattrs).get(ACL_ACCESS) != acl

    def _regular_file_there(self, e: Entry) -> bool:
        """Whether a regular file is at the entry's path (--delta then updates it, else a new one replaces
        it once whole)."""
        st = _lstat(*self.at(e.path))
        return st is not None and stat.S_ISREG(st.st_mode)

    def _restore_link(self, e: Entry) -> None:
        """A hard link to the file this restore put at its target path.  None to a file it did not write there
        (damaged data, or a path the target would not take): in place, linked to what the target held, it
        would pass stale data for restored; the link's path keeps what it holds.  Nor is what is there
        removed before the link is made: in place, a file is linked beside it and renamed over, so a link
        that cannot be made leaves it as it was."""
        if self._damage_of(e.target) is not None:
            self._link_not_restored(e)
            return
        target = os.fsdecode(e.target)
        if any(path == target for path, _ in self.result.unwritten):
            self._not_written(e.path, f"its target {target} could not be written; left as it was")
            return
        if self._keeping:
            if self._kept(e):
                return
            if e.target not in self._written_files:  # the file is the target's, kept: not linked to
                self._regroup(e)
                return
        with contextlib.ExitStack() as searchable:
            try:
                try:
                    spfd, sname = self.at(e.target)
                    source = _lstat(spfd, sname)
                except PermissionError:  # a directory on its way that its owner, this user, may not search
                    spfd, sname = self._searchable(e.target, searchable)
                    source = _lstat(spfd, sname)
            except (FileNotFoundError, NotADirectoryError):
                source = None
            except TargetUnwritable:
                raise TargetUnwritable(f"a symbolic link in the target leads the directory of its target "
                                       f"{target} out of the target; not linked to through it") from None
            if source is None:
                self._link_not_restored(e)
                return
            self._link_to(e, spfd, sname, source)

    def _searchable(self, path: bytes, stack: contextlib.ExitStack) -> tuple[int, bytes]:
        """``at(path)``, with each directory above it that is this user's and denies its owner search (mode
        000 or 0600, restored already) opened up in ``stack``, which gives their modes back: a hard link to a
        file in such a directory was refused (Permission denied, exit 14) by a restore as another user than
        root in one process, which sets each directory's mode once it is left."""
        for rel in ancestors(path):
            fd = self.dirs.dir(safe_relpath(rel))
            if closed_to_owner(os.fstat(fd), 0o100):
                stack.enter_context(_opened_up(fd, os.fsdecode(rel)))
        return self.at(path)

    def _link_to(self, e: Entry, spfd: int, sname: bytes, source: os.stat_result) -> None:
        """Link ``e``'s path to the file at ``sname`` in the directory open at ``spfd`` (``source``)."""
        pfd, name = self.at(e.path, make=True)
        st = None if self._fresh else _lstat(pfd, name)
        if st is not None and (st.st_dev, st.st_ino) == (source.st_dev, source.st_ino):
            pass  # linked already (a rerun in place)
        elif st is None or stat.S_ISDIR(st.st_mode):
            if st is not None:
                self._remove(e.path, pfd, name, st)
            os.link(sname, name, src_dir_fd=spfd, dst_dir_fd=pfd, follow_symlinks=False)
        else:
            tmp = _beside_name()
            os.link(sname, tmp, src_dir_fd=spfd, dst_dir_fd=pfd, follow_symlinks=False)
            try:
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)
                raise
        self.result.links += 1

    def _regroup(self, e: Entry) -> None:
        """--overwrite never/if-newer: a hard link to be written whose file the target had and kept.  Linked
        to that, it would hold whatever the target's file holds: the first such link gets the snapshot's
        content (its file's data, its own recorded metadata), and the group's other links written link to
        it, a link group of their own."""
        first = self._regrouped.get(e.target)
        if first is not None:
            self._restore_link(dataclasses.replace(e, target=first))
            return
        rec = self.lookup(e.target) if self.lookup is not None else None
        f = rec.entry if rec is not None else None
        if f is None or f.type != T_FILE or unread(f):
            self.result.warnings.append(f"hard link {os.fsdecode(e.path)}: its file {os.fsdecode(e.target)} was kept "
                                        "as the target had it, and the snapshot's data for it is not at hand: not "
                                        "restored")
            return
        f = dataclasses.replace(e, type=T_FILE, target=b"", size=f.size, digest=f.digest, chunks=f.chunks,
                                flags=f.flags, xattrs=f.xattrs)
        pfd, name = self._make_room(e.path, False, keep_file=True)
        st = _lstat(pfd, name)
        content = (self.repo.read_blob(c) for c in f.chunk_ids())
        try:
            if st is not None:
                self._write_beside(f, content)
            else:
                self._write_file(f.path, f, content)
        except CorruptObject as exc:
            self._damaged(f, exc)
            if st is None:
                self.remove_quietly(f.path)
            return
        self._regrouped[e.target] = e.path
        self._written_files.add(e.path)
        self.result.files += 1
        self.result.bytes += f.size

    def _link_not_restored(self, e: Entry) -> None:
        """A hard link whose target is not there, or whose data is damaged: damage takes the link down with
        it (it is named among the files not restored; in place, linked to the old file the target keeps, it
        would pass for restored); otherwise a warning."""
        damage = self._damage_of(e.target)
        if damage is not None:
            self.result.damaged.append((os.fsdecode(e.path), *damage[1:]))
        else:
            self.result.warnings.append(f"hard link {os.fsdecode(e.path)}: its target {os.fsdecode(e.target)} "
                                        "was not restored")

    def _damage_of(self, path: bytes) -> tuple[str, str, str, bool] | None:
        """The entry of ``result.damaged`` naming ``path``, if its data was found damaged."""
        name = os.fsdecode(path)
        return next((d for d in self.result.damaged if d[0] == name), None)

    def _restore_file(self, e: Entry, pf: _Prefetcher) -> None:
        part = self.parts.pop(id(e), None)
        there = part is None and not self._fresh and self._regular_file_there(e)
        def content() -> Iterator[Plaintext]:
            return pf.chunks() if pf.queued_current else (self.repo.read_blob(c) for c in e.chunk_ids())

        try:
            if there and self.opt.delta:
                self._update_file(e)
            elif there:
                self._write_beside(e, content())
            elif part is not None:
                self._write_part(e, part[1], pf.chunks())
            else:
                self._write_file(e.path, e, content())
        except CorruptObject as exc:  # this file's data is damaged: the others are still restored
            pf.skip_rest()
            self._damaged(e, exc)
            # A part's file goes once every part is in; one written beside, or updated in place (which
            # removes it itself once written to), leaves the target's as it was.
            if part is None and not there:
                self.remove_quietly(e.path)
            return
        self.result.files += int(part is None or part[1] == 0)  # a file written in parts counts once
        if self._keeping:
            self._written_files.add(e.path)
        self.result.bytes += e.size
        if self.opt.progress is not None:
            self.opt.progress(self.result.files, self.result.bytes)
        if e.flags & F_UNREADABLE:
            self.result.warnings.append(f"{os.fsdecode(e.path)} was unreadable at backup time: restored as an "
                                        "earlier backup read it")

    def _write_beside(self, e: Entry, chunks: Iterator[Plaintext]) -> None:
        """In place, over a file the target has: the new one is written under a temporary name beside it
        and renamed over it once whole, so a file whose data turns out damaged (or a full disk) leaves the
        target's file as it was, not removed."""
        pfd, name = self.at(e.path)
        tmp = os.path.join(os.path.dirname(e.path), _beside_name())
        try:
            self._write_file(tmp, e, chunks)
            os.rename(os.path.basename(tmp), name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            self.remove_quietly(tmp)
            raise

    def _write_file(self, rel: bytes, e: Entry, chunks: Iterator[Plaintext]) -> None:
        """Write a new file at ``rel``; one cut short (no space, an error, an interruption) is removed,
        never left half-written under its name."""
        fd = -1
        try:
            # a new file, made here: whatever is at its name was removed (``_make_room``) or never was, so one
            # that appeared meanwhile (a hard link to a file out of the target, a FIFO) is refused, not written
            fd = self._open(rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            hasher = blake3.blake3()
            pos = 0
            hole = False
            for data in chunks:
                hasher.update(data)
                hole = bool(write_sparse(fd, data, pos, 0)) or hole  # its blocks of zeros left holes
                pos += len(data)
            if hole or pos != e.size:
                os.ftruncate(fd, pos)
            self._apply_meta(e, fd)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            # an open refused (something at the name) leaves what is there; a stop that came while the file
            # was being made (a worker told to stop), or anything after, takes it away
            if fd >= 0 or not isinstance(exc, OSError):
                self.remove_quietly(rel)
            raise
        os.close(fd)
        check_content(e, pos, hasher.digest())

    def _damaged(self, e: Entry, exc: CorruptObject) -> None:
        self.result.damaged.append((os.fsdecode(e.path), exc.object_name, exc.reason, isinstance(exc, MissingObject)))

    def _write_part(self, e: Entry, offset: int, chunks: Iterator[Plaintext]) -> None:
        """One stretch of a file that several processes write: no process sees the whole file to check
        its digest, so each chunk is checked against its id.  ``finish_parts`` completes the file, or the
        process that shared them out removes it when a part was not written."""
        assert isinstance(self.repo, Repo)
        fd = self._open(e.path, os.O_WRONLY | os.O_CREAT)  # the first of the processes to get here makes it
        self.parts_written.add(e.path)
        try:
            self._regular(fd, e.path, made_here=True)
            pos = offset
            for cid, data in zip(e.chunk_ids(), chunks):
                if not self._hashes_to(cid, data):
                    raise CorruptObject(f"blob {cid.hex()}", f"its content in {os.fsdecode(e.path)} does not match its id")
                write_sparse(fd, data, pos, 0)  # a file this restore made: its blocks of zeros left holes
                pos += len(data)
        finally:
            os.close(fd)

    def _hashes_to(self, cid: bytes, data: Plaintext) -> bool:
        """Whether ``data`` hashes to ``cid``.  Bytes equal to those just found to (the same chunk again: a
        sparse file's zeros, a million times in a 64 GiB file cut every 64 KiB) are compared, not hashed again:
        the same object (read once for its repeats in a batch) at once, another one byte for byte."""
        last = self._last_hashed
        if last is not None and last[0] == cid and (last[1] is data or (type(data) is bytes and last[1] == data)):
            return True
        if self.repo.blob_id(data) != cid:
            return False
        self._last_hashed = (cid, data) if type(data) is bytes else None
        return True

    def finish_parts(self, e: Entry) -> None:
        """A file written in parts by other processes: its length (a hole at its end) and metadata."""
        try:
            fd = self._open(e.path, os.O_WRONLY)
            try:
                self._regular(fd, e.path, made_here=True)
                os.ftruncate(fd, e.size)
                self._apply_meta(e, fd)
            finally:
                os.close(fd)
        except (OSError, TargetUnwritable) as exc:
            self.remove_quietly(e.path)
            self._not_written(e.path, _reason(exc))

    def _apply_meta(self, e: Entry, fd: int | None = None) -> None:
        """Owner, extended attributes, mode and mtime, in that order (a chown clears set-id bits and file
        capabilities); through ``fd`` when the file is still open, which saves path lookups.  In a target
        that was not empty, attributes the entry lacks are removed.  Without ``fd``, the entry is reached
        through its directory's descriptor and never followed if a link: one put in its place while the
        restore ran must not pass the entry's owner or mode on to where it leads."""
        if fd is None:
            pfd, name = self.at(e.path)
            if e.type == T_SYMLINK:
                self._set_meta(e, proc_path(pfd, name), link=True)
                return
            # the entry itself, opened without following: a mode is set through its descriptor's path
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise TargetUnwritable("a symbolic link took its place while the restore ran")
                self._set_meta(e, proc_path(fd), link=False)
            finally:
                os.close(fd)
            return
        self._set_meta(e, fd, link=False)

    def _set_meta(self, e: Entry, where: bytes | int, link: bool) -> None:
        """``_apply_meta`` on an open descriptor, or on a path that reaches the entry without walking a
        directory by name (``proc_path``), a link's own (not followed) or an object's."""
        mode = e.mode & 0o7777  # the bits the format holds, as a file written whole gets (a forged record: more)
        if self.owners:
            try:
                if isinstance(where, int):
                    os.fchown(where, e.uid, e.gid)
                else:
                    os.chown(where, e.uid, e.gid, follow_symlinks=not link)
            except OSError as exc:
                if exc.errno == errno.EROFS:  # nothing else will be set either: the entry is not written
                    raise
                # set-id bits for their owner only, never for whoever the entry is left to
                mode &= ~self._owner_not_set(e, exc.strerror)
        if self.opt.xattrs and (e.xattrs or not self._fresh):
            unsupported: list[str] = []
            denied: list[str] = []
            failed = write_xattrs(where, e.xattrs, replace=not self._fresh, follow=not link, unsupported=unsupported,
                                  denied=denied)
            if unsupported:  # the file system's: said once for all the entries (``note_walked``)
                self.result.note_unsupported_xattrs([os.fsdecode(e.path) or "."], unsupported)
            if denied:  # likewise
                self.result.note_denied_xattrs([os.fsdecode(e.path) or "."], denied)
            if failed:
                self.result.warnings.append(f"cannot set extended attributes of {os.fsdecode(e.path)}: "
                                            + "; ".join(failed))
        if not link:
            self._chmod(e, where, mode)
        os.utime(where, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=not link)

    def _chmod(self, e: Entry, where: bytes | int, mode: int) -> None:
        """Give ``e`` its mode.  FAT and exFAT (a USB disk) hold no set-user-ID, set-group-ID or sticky bit and
        refuse a mode with one (EPERM, to root too): the entry, written, gets the rest of its mode, with a
        warning, rather than being left out, its data with it.  One refused without them is refused."""
        try:
            os.chmod(where, mode)
        except PermissionError as exc:
            special = mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
            if not special:
                raise
            os.chmod(where, mode & ~special)
            self.result.warnings.append(f"{os.fsdecode(e.path) or '.'}: the target's file system refused mode "
                                        f"{mode:04o} ({exc.strerror}): restored as {mode & ~special:04o}, without "
                                        "its set-user-ID, set-group-ID and sticky bits")

    def _owner_not_set(self, e: Entry, reason: str) -> int:
        """Warn that ``e``'s owner was not set; the set-id bits it loses for that (``setid_bits_for_others``:
        whoever restores holds it now)."""
        dropped = setid_bits_for_others(e, -1, -1)
        self.result.warnings.append(f"cannot set owner of {os.fsdecode(e.path) or '.'}: {reason}"
                                    + ("; restored without its set-user/group-ID bits" if dropped else ""))
        return dropped
