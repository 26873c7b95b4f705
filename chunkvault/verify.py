"""Restore-verification runs: prove that a snapshot restores, byte for byte, and that what it holds works.

``verify_restore`` restores a snapshot into a fresh scratch directory, then
walks the restored tree beside the snapshot's manifest and compares every
entry: type, mode, size, mtime, symlink target, hard links, owner (when run
as root, as the restore then sets owners) and, for files, a BLAKE3 digest
computed here from the bytes on disk — independently of the digest check the
restore does while writing.  It then optionally runs a command (start the
restored database and query it) with the restored path in
``CHUNKVAULT_RESTORE_DIR``, and removes the scratch directory.  With
``pg_start`` it starts each PostgreSQL data directory of the copy itself
first, and proves it opens (``pgstart``); with ``pg_recover`` too, that it
recovers from the repository's WAL archive to a target (``walrelay``).

The comparison is a merge of two streams sorted the same way (the manifest's
order, and a depth-first walk with names sorted), so memory stays bounded for
trees of millions of files.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import blake3

from . import interrupts
from .display import one_line, warn
from .localfiles import abandoned, no_room_after
from .errors import (ChunkvaultError, CorruptObject, MissingObject, NewerObject, SnapshotNotFound, StorageFull,
                     TargetUnwritable, UsageError, VerificationFailed)
from .pgstart import PG_START_TIMEOUT, PgStartResult, prove_data_directories
from .processes import (become_subreaper, carries, children, kill_group, pin_carrying, signal_pinned,
                        stop_being_subreaper, without_secrets)
from .store.manifest import (
    T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK, TYPE_NAMES, Entry, sort_key, unread,
)
from .store.holes import hash_file
from .store.chronology import chronological_key
from .store.snapshot import Snapshot, of_source, parse_time
from .store.restore import setid_bits_for_others, time_step
from .store.target_dirs import LongPaths, closed_to_owner, proc_path
from .store.posix_acl import ACL_KEYS, acl_ids
from .store.xattrs import decode_xattrs, read_xattrs

if TYPE_CHECKING:
    from .pgrecovery import RecoveryTarget
    from .repository import Repository
    from .store.restore import RestoreResult

__all__ = ["Mismatch", "VerifyReport", "verify_restore", "compare_tree", "snapshots_since", "add_commands",
           "cmd_verify_restore"]

#: How many mismatches a report lists (all are counted); a wholly wrong tree of millions of files must not
#: turn into a report of millions of lines.
MAX_LISTED = 1000
#: How much of the command's combined output a report keeps (its tail).
OUTPUT_TAIL = 16 << 10
LEFTOVER_GRACE = 5.0  # seconds what a command left running gets to end after SIGTERM
_READ_BLOCK = 4 << 20
#: Modification times (ns) every file system a restore writes holds (1980 to 2038: FAT's first year, ext4's last
#: with small inodes): a time that differs inside them is no limit of the target's, and is not tried there.
_EVERY_TARGET_HOLDS = (315_532_800 * 10**9, (1 << 31) * 10**9)


@dataclass
class Mismatch:
    """One difference between the snapshot's manifest and the restored tree."""

    path: str
    kind: str  # missing | extra | type | content | size | mode | mtime | owner | target | hardlink | device | xattrs
    # | unreadable
    expected: str | None = None
    actual: str | None = None
    # Why the target's file system cannot hold what was expected (tried on a file of its own there): a limit of
    # where it was restored, not a difference in the backup's data (None: it can, or it was not tried).
    limit: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind} {self.path or '.'}"
        if self.expected is not None or self.actual is not None:
            text += f": expected {self.expected}, restored {self.actual}"
        if self.limit is not None:
            text += f" (the target's file system {self.limit})"
        return text


@dataclass
class CompareResult:
    files: int = 0
    dirs: int = 0
    links: int = 0
    other: int = 0
    bytes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    mismatch_count: int = 0
    limited: int = 0  # of the mismatches, those the target's file system cannot hold (``Mismatch.limit``)
    warnings: list[str] = field(default_factory=list)


@dataclass
class CommandResult:
    command: str
    exit_code: int | None  # None: killed after the timeout
    timed_out: bool
    seconds: float
    output: str  # the tail of stdout and stderr, interleaved
    leftovers: bool = False  # it left processes running, in its group or detached from it (they were stopped)
    # its output file, in the temp directory, took not one byte more when it ended: what it wrote was cut short
    # there, and a command that checks its writes failed for the full disk, not for what it checked
    output_full: bool = False


@dataclass
class VerifyReport:
    """What one verification run of one snapshot found."""

    snapshot_id: str
    snapshot_time: str
    snapshot_kind: str
    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    restore_seconds: float = 0.0
    compare_seconds: float = 0.0
    duration: float = 0.0
    mismatches: list[Mismatch] = field(default_factory=list)
    mismatch_count: int = 0
    # of them, what the scratch directory's file system cannot hold (``Mismatch.limit``): said apart, for
    # nothing of the backup's is known wrong there, yet the copy is not what the snapshot holds
    mismatches_limited: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None  # the restore itself failed (corrupt or missing data, or no space to restore)
    # "damaged": the snapshot's data is; "no_space": the scratch directory ran out, nothing is known of the data
    error_kind: str | None = None
    command: CommandResult | None = None
    kept_at: str | None = None  # the scratch directory, when kept
    # PostgreSQL data directories in the copy (relative to it) whose archiving was turned off before the command
    archive_off: list[str] = field(default_factory=list)
    # with pg_start: what starting each data directory of the copy showed (None: not asked)
    pg_start: list[PgStartResult] | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.mismatch_count == 0
                and (self.command is None or self.command.exit_code == 0)
                and all(p.ok for p in self.pg_start or ()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


# --- comparing (pure) ------------------------------------------------------------------------


def _kind_of(mode: int) -> int | None:
    if stat.S_ISREG(mode):
        return T_FILE
    if stat.S_ISDIR(mode):
        return T_DIR
    if stat.S_ISLNK(mode):
        return T_SYMLINK
    if stat.S_ISFIFO(mode):
        return T_FIFO
    if stat.S_ISCHR(mode):
        return T_CHARDEV
    if stat.S_ISBLK(mode):
        return T_BLOCKDEV
    return None


def _type_name(mode: int) -> str:
    t = _kind_of(mode)
    return TYPE_NAMES[t] if t is not None else "socket or unknown"


def _ns(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def compare_meta(e: Entry, st: os.stat_result, *, owners: bool, time_step: int = 1) -> list[Mismatch]:
    """Metadata differences between a manifest entry and what was restored (content aside); ``time_step``:
    the target file system's (``time_step``), within which times count as equal."""
    path = os.fsdecode(e.path)
    want_type = T_FILE if e.type == T_HARDLINK else e.type
    got_type = _kind_of(st.st_mode)
    if got_type != want_type:
        return [Mismatch(path, "type", TYPE_NAMES[e.type], _type_name(st.st_mode))]
    out: list[Mismatch] = []
    if e.type == T_HARDLINK:  # it shares the inode (and so the metadata) of its target, checked there
        if st.st_size != e.size:
            out.append(Mismatch(path, "size", str(e.size), str(st.st_size)))
        return out
    if e.type == T_FILE and st.st_size != e.size:
        out.append(Mismatch(path, "size", str(e.size), str(st.st_size)))
    got = stat.S_IMODE(st.st_mode)
    # Without owners, a set-user/group-ID bit recorded for another owner may be missing: a restore that
    # does not set owners (as another user than root, or in a user namespace) drops it.  Never one extra.
    missing_ok = 0 if owners else setid_bits_for_others(e, os.geteuid(), os.getegid())
    if e.type != T_SYMLINK and got | (e.mode & missing_ok) != e.mode:
        out.append(Mismatch(path, "mode", oct(e.mode), oct(got)))
    if abs(st.st_mtime_ns - e.mtime_ns) >= time_step:
        out.append(Mismatch(path, "mtime", _ns(e.mtime_ns), _ns(st.st_mtime_ns)))
    if owners and (st.st_uid, st.st_gid) != (e.uid, e.gid):
        out.append(Mismatch(path, "owner", f"{e.uid}:{e.gid}", f"{st.st_uid}:{st.st_gid}"))
    if e.type in (T_CHARDEV, T_BLOCKDEV) and st.st_rdev != e.rdev:
        out.append(Mismatch(path, "device", hex(e.rdev), hex(st.st_rdev)))
    return out


def _unsettable_without_owners(name: bytes, wanted: dict[bytes, bytes], found: dict[bytes, bytes]) -> bool:
    """An attribute that a restore setting no owners may not set: one of the root-only namespaces, or an
    ACL that is not there and names a user or group outside this user namespace (which no one in it can
    name: the restore could not set it)."""
    if name.startswith((b"security.", b"trusted.")):
        return True
    if name not in ACL_KEYS or name not in wanted or name in found:
        return False
    uids, gids = acl_ids(wanted[name])
    return any(not _mapped(i, "uid") for i in uids) or any(not _mapped(i, "gid") for i in gids)


@functools.lru_cache(maxsize=2)
def _id_ranges(kind: str) -> tuple[tuple[int, int], ...]:
    """The ids this process's user namespace maps (``/proc/self/uid_map``, ``gid_map``): all of them
    outside a user namespace."""
    try:
        with open(f"/proc/self/{kind}_map") as f:
            return tuple((int(inside), int(inside) + int(count)) for inside, _, count in map(str.split, f))
    except (OSError, ValueError):
        return ((0, 1 << 32),)


def _mapped(i: int, kind: str) -> bool:
    return any(start <= i < end for start, end in _id_ranges(kind))


def merge_by_path(expected: Iterable[Entry], observed: Iterable[tuple[bytes, os.stat_result]]
                  ) -> Iterator[tuple[Entry | None, tuple[bytes, os.stat_result] | None]]:
    """Pair manifest entries with restored paths; both streams sorted by ``sort_key``."""
    exp = iter(expected)
    obs = iter(observed)
    e = next(exp, None)
    o = next(obs, None)
    while e is not None or o is not None:
        ek = sort_key(e.path) if e is not None else None
        ok = sort_key(o[0]) if o is not None else None
        if ok is None or (ek is not None and ek < ok):
            yield e, None
            e = next(exp, None)
        elif ek is None or ok < ek:
            yield None, o
            o = next(obs, None)
        else:
            yield e, o
            e, o = next(exp, None), next(obs, None)


def snapshots_since(snapshots: Iterable[Snapshot], since: datetime) -> list[Snapshot]:
    """Every snapshot taken at or after ``since``, oldest first."""
    snapshots = list(snapshots)
    return sorted((s for s in snapshots if s.datetime >= since), key=chronological_key(snapshots))


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time, or a span back from now such as ``7d`` or ``12h``."""
    from .store.retention import parse_duration

    try:
        span = parse_duration(text)
    except UsageError:
        return parse_time(text)
    return span.before(now or datetime.now(timezone.utc))


# --- comparing (I/O) ---------------------------------------------------------------------------


def _closed_to_reader(st: os.stat_result, need: int) -> bool:
    """A file or directory of this user's whose mode denies its owner ``need`` (read; a directory's search)."""
    return closed_to_owner(st, need) and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))


def _set_mode(path: bytes, st: os.stat_result, mode: int) -> None:
    """``mode`` on the entry at ``path`` if it is still the one ``st`` describes: never through a link."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.path.samestat(os.fstat(fd), st):
            os.chmod(proc_path(fd), mode)
    finally:
        os.close(fd)


class OpenedForReading:
    """This user's own entries that deny their owner reading (mode 000, a directory without read or search
    permission), opened while they are compared, as a restore opens its own directories to write in them:
    a restore that is not root writes such trees, and their comparison found them unreadable.  A file's mode
    is put back once it is read; a directory's at ``close``, as what lies below it is compared meanwhile.
    A run killed before then leaves them readable by their owner."""

    def __init__(self, root: bytes):
        self.path_of = LongPaths(root)
        self.dirs: list[tuple[bytes, os.stat_result]] = []

    def directory(self, rel: bytes, st: os.stat_result) -> None:
        if _closed_to_reader(st, 0o500):
            try:
                _set_mode(self.path_of(rel), st, stat.S_IMODE(st.st_mode) | 0o500)
                self.dirs.append((rel, st))
            except (OSError, ChunkvaultError):
                pass  # listed as it is, and reported unreadable
            finally:
                self.path_of.release()

    @contextlib.contextmanager
    def reading(self, path: bytes, st: os.stat_result) -> Iterator[None]:
        """The entry at ``path`` (found as ``st``) readable by its owner while inside."""
        opened = _closed_to_reader(st, 0o400)
        if opened:
            with contextlib.suppress(OSError):
                _set_mode(path, st, stat.S_IMODE(st.st_mode) | 0o400)
        try:
            yield
        finally:
            if opened:
                with contextlib.suppress(OSError):
                    _set_mode(path, st, stat.S_IMODE(st.st_mode))

    def close(self) -> list[str]:
        """Put the directories' modes back, deepest first; what could not be is returned, said."""
        failed = []
        for rel, st in reversed(self.dirs):
            try:
                _set_mode(self.path_of(rel), st, stat.S_IMODE(st.st_mode))
            except (OSError, ChunkvaultError) as exc:
                failed.append(f"{os.fsdecode(rel) or '.'}: its mode {stat.S_IMODE(st.st_mode):04o} could not be "
                              f"put back after it was compared: {getattr(exc, 'strerror', None) or exc}")
            finally:
                self.path_of.release()
        self.dirs.clear()
        self.path_of.close()
        return failed


def walk_sorted(root: bytes, errors: list[tuple[bytes, str]], opener: OpenedForReading | None = None
                ) -> Iterator[tuple[bytes, os.stat_result]]:
    """(relative path, lstat) of ``root`` and everything under it, in manifest order.

    Depth first, names sorted as bytes: the order ``sort_key`` gives.  Directories that
    cannot be listed are noted in ``errors``; ``opener`` opens this user's own that deny it.
    A directory is listed once its own entry has been taken.
    """
    st = os.lstat(root)
    yield b"", st
    if not stat.S_ISDIR(st.st_mode):
        return
    stack: list[tuple[bytes, Iterator[bytes]]] = []
    path_of = LongPaths(root)  # a restore writes paths longer than the system takes: they are read back

    def push(rel: bytes, st: os.stat_result) -> None:
        if opener is not None:
            opener.directory(rel, st)
        try:
            names = sorted(os.listdir(path_of(rel)))
        except (OSError, ChunkvaultError) as exc:
            errors.append((rel, getattr(exc, "strerror", None) or str(exc)))
            return
        stack.append((rel, iter(names)))

    try:
        push(b"", st)
        while stack:
            rel, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child_rel = rel + b"/" + name if rel else name
            try:
                cst = os.lstat(path_of(child_rel))
            except FileNotFoundError:
                continue
            except (OSError, ChunkvaultError) as exc:  # listed, but not searched: what is in it goes unread
                errors.append((rel, getattr(exc, "strerror", None) or str(exc)))
                stack.pop()
                continue
            finally:
                path_of.release()
            yield child_rel, cst
            if stat.S_ISDIR(cst.st_mode):
                push(child_rel, cst)
    finally:
        path_of.close()


def file_digest(path: bytes) -> bytes:
    """BLAKE3 of a file's bytes, read here (not taken from the restore); its holes hashed as zeros, unread.
    Opened without waiting, and refused (OSError) unless a regular file: a FIFO someone who may write the
    target put in the file's place since its lstat held the open for ever."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "no longer a regular file")
        hash_file(fd, hasher, _READ_BLOCK)
    finally:
        os.close(fd)
    return hasher.digest()


def _ns_step(ns: int) -> str:
    return f"{ns // 1_000_000_000} s" if ns >= 1_000_000_000 else f"{ns // 1_000_000} ms" if ns >= 1_000_000 \
        else f"{ns // 1_000} µs"


class _Comparer:
    def __init__(self, root: bytes, owners: bool, max_listed: int, extras: bool = True, xattrs: bool = True):
        self.root = root
        self.owners = owners
        self.xattrs = xattrs
        self.max_listed = max_listed
        self.extras = extras
        self.result = CompareResult()
        self.inodes: dict[tuple[int, int], bytes] = {}  # files with several links: inode -> first path
        self.xattr_limits: dict[tuple[bytes, int], str | None] = {}  # (name, value's size) -> ``_xattr_limit``
        self.path_of = LongPaths(self.root)
        self.opener = OpenedForReading(self.root)
        self.time_step = time_step(root)
        if self.time_step > 1:
            self.result.warnings.append(f"{os.fsdecode(root)} keeps times to {_ns_step(self.time_step)}: "
                                        "finer differences are not counted")

    def _probe(self, attempt: Callable[[int], str | None]) -> str | None:
        """``attempt`` on a file made for it in the root (removed, the root's times put back): what the file
        system refuses, said; None where it holds it or no probe file can be made."""
        probe = os.path.join(self.root, b".chunkvault-probe-" + os.urandom(6).hex().encode())
        try:
            before = os.stat(self.root)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            return attempt(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
                os.utime(self.root, ns=(before.st_atime_ns, before.st_mtime_ns))

    def _time_limit(self, ns: int, restored: int) -> str | None:
        """Why the target cannot hold modification time ``ns`` (before 1901 or after 2038 on ext4 with small
        inodes, before 1980 on FAT), if it cannot and the copy has the nearest it holds (``restored``): a copy
        with another time was restored wrong, wherever it was."""
        if _EVERY_TARGET_HOLDS[0] <= ns < _EVERY_TARGET_HOLDS[1]:
            return None

        def attempt(fd: int) -> str | None:
            os.utime(fd, ns=(ns, ns))
            got = os.fstat(fd).st_mtime_ns
            if abs(got - ns) < self.time_step or abs(got - restored) >= self.time_step:
                return None
            return f"holds no such time: it keeps {_ns(got)} instead"
        try:
            return self._probe(attempt)
        except (OSError, OverflowError, ValueError):
            return None

    def _xattr_limit(self, name: bytes, value: bytes) -> str | None:
        """Why the target refuses extended attribute ``name`` of this size (none in that namespace, values
        larger than a block on ext4), if it does; asked once per name and size.  Only what says so is: no
        space for a value smaller than a block is a full (or over quota) target, and another error (EIO,
        EPERM) no limit of the file system's; either read as one hid an attribute the restore left out."""
        key = (name, len(value))
        if key not in self.xattr_limits:
            def attempt(fd: int) -> str | None:
                try:
                    os.setxattr(fd, name, value)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        limit = len(value) >= os.fstatvfs(fd).f_bsize
                    else:
                        limit = exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ERANGE)
                    if limit:
                        return f"refuses {os.fsdecode(name)} of {len(value)} bytes: {exc.strerror or exc}"
                return None
            self.xattr_limits[key] = self._probe(attempt)
        return self.xattr_limits[key]

    def add(self, m: Mismatch, limit: Callable[[], str | None] | None = None) -> None:
        """Count ``m``, listed among the first ``max_listed``; ``limit`` says (for those listed: a probe each
        at most) whether the target's file system cannot hold what it lacks."""
        self.result.mismatch_count += 1
        if limit is not None and len(self.result.mismatches) < self.max_listed:
            m.limit = limit()
        if m.limit is not None:
            self.result.limited += 1
        if len(self.result.mismatches) < self.max_listed:
            self.result.mismatches.append(m)

    def run(self, entries: Iterable[Entry]) -> CompareResult:
        try:
            return self._run(entries)
        finally:
            self.result.warnings += self.opener.close()
            self.path_of.close()

    def _run(self, entries: Iterable[Entry]) -> CompareResult:
        list_errors: list[tuple[bytes, str]] = []
        observed = walk_sorted(self.root, list_errors, self.opener)
        reported_errors = 0
        # A directory the manifest lacks above entries it has (``--stdin-name dumps/app.sql``) is made by the
        # restore to hold them: extra only if no entry lies below it.
        directories: set[bytes] = set()
        above_entries: set[bytes] = set()
        extra_directories: list[tuple[bytes, os.stat_result]] = []
        for e, o in merge_by_path(entries, observed):
            while reported_errors < len(list_errors):
                rel, why = list_errors[reported_errors]
                self.add(Mismatch(os.fsdecode(rel), "unreadable", "a listable directory", why))
                reported_errors += 1
            if e is not None:
                if e.type == T_DIR:
                    directories.add(e.path)
                parent = os.path.dirname(e.path)
                while parent and parent not in directories and parent not in above_entries:
                    above_entries.add(parent)
                    parent = os.path.dirname(parent)
            if e is None:
                assert o is not None
                if not self.extras or o[0] == b"":  # the root is compared only if the snapshot has a root entry
                    continue
                if stat.S_ISDIR(o[1].st_mode):
                    extra_directories.append(o)
                else:
                    self.add(Mismatch(os.fsdecode(o[0]), "extra", None, _type_name(o[1].st_mode)))
            elif o is None:
                if e.type in (T_CHARDEV, T_BLOCKDEV) and not self.owners:
                    self.result.warnings.append(f"device {os.fsdecode(e.path)} not restored (needs root)")
                elif e.type == T_FILE and unread(e):
                    self.result.warnings.append(f"{os.fsdecode(e.path)} was unreadable at backup time: no backup "
                                                "read its data")
                else:
                    self.add(Mismatch(os.fsdecode(e.path), "missing", TYPE_NAMES[e.type], None))
            else:
                self.entry(e, o[1])
        for rel, why in list_errors[reported_errors:]:
            self.add(Mismatch(os.fsdecode(rel), "unreadable", "a listable directory", why))
        for rel, st in extra_directories:
            if rel not in above_entries:
                self.add(Mismatch(os.fsdecode(rel), "extra", None, _type_name(st.st_mode)))
        return self.result

    def entry(self, e: Entry, st: os.stat_result) -> None:
        try:
            self._entry(e, st)
        except ChunkvaultError as exc:  # a directory on its way that leads out of the tree
            self.add(Mismatch(os.fsdecode(e.path), "unreadable", "readable", str(exc)))
        finally:
            self.path_of.release()

    def _entry(self, e: Entry, st: os.stat_result) -> None:
        found = compare_meta(e, st, owners=self.owners, time_step=self.time_step)
        for m in found:
            self.add(m, functools.partial(self._time_limit, e.mtime_ns, st.st_mtime_ns) if m.kind == "mtime"
                     else None)
        if found and found[0].kind == "type":
            return
        path = self.path_of(e.path)
        with self.opener.reading(path, st):
            self._read(e, st, path)

    def _read(self, e: Entry, st: os.stat_result, path: bytes) -> None:
        r = self.result
        if self.xattrs and e.type != T_HARDLINK:
            self.extended_attributes(e, path)
        if e.type == T_DIR:
            r.dirs += 1
        elif e.type == T_HARDLINK:
            r.links += 1
            self.hardlink(e, st)
        elif e.type == T_SYMLINK:
            r.links += 1
            actual = os.readlink(path)
            if actual != e.target:
                self.add(Mismatch(os.fsdecode(e.path), "target", os.fsdecode(e.target), os.fsdecode(actual)))
        elif e.type == T_FILE:
            r.files += 1
            r.bytes += e.size
            if st.st_nlink > 1:
                self.separate_file(e, st)
            self.content(e, path)
        else:
            r.other += 1

    def content(self, e: Entry, path: bytes) -> None:
        if unread(e):
            self.result.warnings.append(f"{os.fsdecode(e.path)} was unreadable at backup time: it has no data")
            return
        try:
            got = file_digest(path)
        except OSError as exc:
            self.add(Mismatch(os.fsdecode(e.path), "unreadable", "readable", exc.strerror or str(exc)))
            return
        if got != e.digest:
            self.add(Mismatch(os.fsdecode(e.path), "content", e.digest.hex(), got.hex()))

    def extended_attributes(self, e: Entry, path: bytes) -> None:
        """The names whose values differ, each with how; without owners, those a restore could not set are
        left out (``_unsettable_without_owners``)."""
        try:
            found = decode_xattrs(read_xattrs(path))
            wanted = decode_xattrs(e.xattrs)
        except (OSError, ValueError) as exc:
            self.add(Mismatch(os.fsdecode(e.path), "xattrs", "readable", getattr(exc, "strerror", None) or str(exc)))
            return
        names = {n for n in found.keys() | wanted.keys() if found.get(n) != wanted.get(n)}
        if not self.owners:
            names = {n for n in names if not _unsettable_without_owners(n, wanted, found)}
        if names:
            said = {n: "missing" if n not in found else "not in the snapshot" if n not in wanted else "another value"
                    for n in names}
            # attributes the restore could not set there: each one the target refuses (all of them: a limit)
            def limit() -> str | None:
                refused = [self._xattr_limit(n, wanted[n]) if n in wanted and n not in found else None
                           for n in sorted(names)]
                reasons = [r for r in refused if r is not None]
                return "; ".join(reasons) if len(reasons) == len(refused) else None

            self.add(Mismatch(os.fsdecode(e.path), "xattrs", ", ".join(sorted(os.fsdecode(n) for n in names
                                                                           if n in wanted)) or "none",
                              ", ".join(f"{os.fsdecode(n)}: {said[n]}" for n in sorted(names))), limit)

    def separate_file(self, e: Entry, st: os.stat_result) -> None:
        """A file the snapshot holds on its own must not share its inode with another path."""
        key = (st.st_dev, st.st_ino)
        first = self.inodes.setdefault(key, e.path)
        if first != e.path:
            self.add(Mismatch(os.fsdecode(e.path), "hardlink", "a separate file", f"a link to {os.fsdecode(first)}"))

    def hardlink(self, e: Entry, st: os.stat_result) -> None:
        try:
            tst = os.lstat(self.path_of(e.target))
        except (OSError, ChunkvaultError):
            tst = None
        if tst is None or not os.path.samestat(st, tst):
            self.add(Mismatch(os.fsdecode(e.path), "hardlink", f"a link to {os.fsdecode(e.target)}",
                              "a separate file"))
            return
        first = self.inodes.setdefault((st.st_dev, st.st_ino), e.target)
        if first != e.target:
            self.add(Mismatch(os.fsdecode(e.path), "hardlink", f"a link to {os.fsdecode(e.target)}",
                              f"a link to {os.fsdecode(first)}"))


def compare_tree(entries: Iterable[Entry], root: str | bytes, *, owners: bool | None = None,
                 max_listed: int = MAX_LISTED, extras: bool = True, xattrs: bool = True) -> CompareResult:
    """Compare a restored tree with a snapshot's entries (in manifest order): what differs, is missing or
    (with ``extras``) there besides them; ``xattrs``: extended attributes too."""
    if owners is None:
        owners = os.geteuid() == 0
    root = os.fsencode(root)  # an absolute one as it is: ``/proc/self/fd/N/.`` is the directory, without ``/.`` the link
    return _Comparer(root if os.path.isabs(root) else os.path.abspath(root), owners, max_listed, extras,
                     xattrs).run(entries)


# --- the run -----------------------------------------------------------------------------------


PG_CONTROL = b"global/pg_control"
#: What a copy being proven gets before its command, so that a server started on it archives nothing into the
#: WAL archive of the server it was copied from (its segments' names are that server's next ones).
ARCHIVE_OFF = b"\n# verify-restore: a copy being proven archives nothing\narchive_mode = 'off'\n"


def noting_data_directories(entries: Iterable[Entry], found: list[bytes]) -> Iterator[Entry]:
    """``entries`` as they are, each PostgreSQL data directory among them (the one above ``global/pg_control``)
    added to ``found``: told on the way through the comparison's one pass over the tree."""
    for e in entries:
        if e.path == PG_CONTROL or e.path.endswith(b"/" + PG_CONTROL):
            found.append(e.path[:-len(PG_CONTROL)].rstrip(b"/"))
        yield e


def turn_archiving_off(target: str, data_dirs: Iterable[bytes]) -> list[str]:
    """Append ``archive_mode = 'off'`` to each data directory's ``postgresql.auto.conf`` (read last, so it wins
    over postgresql.conf); returns the directories, relative to ``target``.  Only the copy is written: a
    symbolic link there (to the live server's file, say) becomes a file of the copy's own, holding only that
    line (``_replace_link``); a file made anew is the data directory owner's, as the server must read it."""
    done = []
    for d in data_dirs:
        directory = os.path.join(os.fsencode(target), d)
        path = os.path.join(directory, b"postgresql.auto.conf")
        if os.path.islink(path):
            _replace_link(path, directory)
        # never waiting: a FIFO there (as the snapshot held it) held the open, and the verification, for ever
        if os.path.lexists(path) and not os.path.isfile(path):
            raise OSError(errno.EINVAL, f"{os.fsdecode(path)} is no file (a FIFO, a socket, a device, a directory)")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "ab") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{os.fsdecode(path)} is no file (a FIFO, a socket, a device, a directory)")
            _owned_as(f.fileno(), directory)
            f.write(ARCHIVE_OFF)
        done.append(os.fsdecode(d) or ".")
    return done


def _replace_link(path: bytes, directory: bytes) -> None:
    """Replace the symbolic link at ``path`` by an empty file (the caller appends to it), not read: a snapshot
    may hold one to any file (/etc/shadow, say), whose content copied into the data directory owner's file
    was theirs to read, where the run is root's.  As ``--pg-recover`` replaces one (pgrecovery)."""
    tmp = path + b".chunkvault-tmp"
    try:
        os.unlink(tmp)  # one the snapshot holds (a link, a hard link to another file of the copy): not written
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _owned_as(fd, directory)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _owned_as(fd: int, directory: bytes) -> None:
    st = os.stat(directory)
    if os.geteuid() == 0 and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != (st.st_uid, st.st_gid):
        os.fchown(fd, st.st_uid, st.st_gid)


def _restore(repo: "Repository", snap: Snapshot, target: str, numeric_owner: bool = False) -> RestoreResult:
    """The restore step of a verification run (one place, so it can be observed or replaced)."""
    return repo.restore(snap, target, numeric_owner=numeric_owner)


def _signal(send: Callable[[int, int], None], target: int, sig: int) -> bool:
    try:
        send(target, sig)
        return True
    except OSError:
        return False


def _end_leftovers(group: int, before: Iterable[int], marker: bytes, grace: float = LEFTOVER_GRACE) -> bool:
    """Stop what a command left running once its shell exited: the rest of its process group, and the
    processes that left the group (a daemon in a session of its own) and came to us when their parent
    exited (``become_subreaper``): our children that were not before it ran and carry the command's
    ``marker`` in their environment (a child another thread of ours started meanwhile does not).  SIGTERM,
    then SIGKILL after ``grace`` s; whether anything was left."""
    found = False
    before = set(before)
    ours: set[int] = set()  # the command's processes that came to us: of its group, or carrying its marker
    sent: dict[int, int] = {}  # process (or -group) -> the last signal sent to it
    deadline = time.monotonic() + grace
    while True:
        now = time.monotonic()
        if now > deadline + LEFTOVER_GRACE:  # even SIGKILL did not end them (not ours to signal, say)
            return found
        sig = signal.SIGKILL if now >= deadline else signal.SIGTERM
        new = {pid: v for pid, v in children().items() if pid not in before}
        ours.update(pid for pid, (_, pgrp) in new.items() if pgrp == group or pid in ours or carries(pid, marker))
        orphans = []
        for pid in ours & new.keys():
            if new[pid][0] == b"Z":  # ended: reaped, not left a zombie (one keeps its group alive, too)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            else:
                orphans.append(pid)
        group_alive = _signal(os.killpg, group, 0)
        if not orphans and not group_alive:
            return found
        found = True
        if group_alive and sent.get(-group) != sig:
            sent[-group] = sig
            _signal(os.killpg, group, sig)
        for pid in orphans:
            if sent.get(pid) != sig:
                sent[pid] = sig
                _signal(os.kill, pid, sig)
        time.sleep(0.05)


def _stop_interrupted(proc: subprocess.Popen, before: Iterable[int], marker: bytes, end_leftovers: bool) -> None:
    """The command and what it started, when we are interrupted: SIGTERM first, as when it ends on its own (a
    database server SIGKILL ends leaves its shared memory behind, for good once the scratch directory is
    removed), SIGKILL after the grace; a second interrupt ends the wait."""
    try:
        if end_leftovers:
            _end_leftovers(proc.pid, before, marker)  # the command's group with the rest
    except BaseException:
        pass
    kill_group(proc)
    if end_leftovers:
        _end_leftovers(proc.pid, before, marker, grace=0)


def run_command(command: str, env: dict[str, str], *, timeout: float | None = None,
                end_leftovers: bool = True, marker_to: int | None = None) -> CommandResult:
    """Run ``command`` through the shell in its own process group; the group is killed after ``timeout``,
    and, with ``end_leftovers``, what the command left running once it exits (a database it started
    must not go on in a scratch directory about to be removed).  ``marker_to``: a file (the scratch
    directory's marker) the mark its processes carry is written into, for a later run to stop them by
    should this one be killed outright (``_remove_abandoned``).

    Output goes to a temporary file, not a pipe: a command that leaves a daemon
    behind (``pg_ctl start``) must not keep us waiting for the pipe's end.
    """
    started = time.monotonic()
    before = children()
    reaping = end_leftovers and become_subreaper()
    marker = b"CHUNKVAULT_COMMAND_RUN=" + os.urandom(8).hex().encode()
    env = {**env, "CHUNKVAULT_COMMAND_RUN": marker.split(b"=", 1)[1].decode()}
    if marker_to is not None:
        with contextlib.suppress(OSError):
            os.pwrite(marker_to, marker, 0)
    try:
        with tempfile.TemporaryFile() as out:
            proc: subprocess.Popen | None = None
            timed_out = False
            try:
                with interrupts.held():  # a stop as it starts is raised here, where the command is known
                    proc = subprocess.Popen(command, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
                code = None
            except BaseException:  # interrupted: the command must not go on in a scratch directory about to go
                if proc is not None:
                    _stop_interrupted(proc, before, marker, end_leftovers)
                raise
            seconds = time.monotonic() - started
            left = end_leftovers and _end_leftovers(proc.pid, before, marker) and not timed_out
            size = out.seek(0, os.SEEK_END)
            full = code not in (0, None) and no_room_after(out.fileno(), size)  # a timeout is its own reason
            out.seek(max(0, size - OUTPUT_TAIL))
            tail = out.read().decode(errors="replace")
    finally:
        if reaping:
            stop_being_subreaper()
    if code is not None and code < 0:  # killed by a signal: report it the way a shell would
        code = 128 - code
    return CommandResult(command, code, timed_out, round(seconds, 3), tail, left, full)


SCRATCH_PREFIX = "chunkvault-verify-"
IN_USE = ".in-use"  # in a scratch directory: locked while its run lasts; removed from one kept on purpose


def check_scratch(parent: str) -> None:
    """UsageError unless ``parent`` is a directory, saying which way it is not: a file there was said not to
    exist, and the user looked for a typo in a path that was there."""
    if os.path.isdir(parent):
        return
    if os.path.lexists(parent):
        raise UsageError(f"scratch directory {parent} is not a directory")
    raise UsageError(f"scratch directory does not exist: {parent}")


def _make_scratch(parent: str | None, warnings: list[str]) -> tuple[str, int]:
    """A fresh directory others may traverse but not list, and the descriptor of its marker, locked while
    this run lasts.  Scratch directories of runs that were killed (SIGKILL, the OOM killer), as large as
    their restores got, are removed first, with a warning each: they stayed for good.

    The restored tree keeps the snapshot's owners and modes; a database server
    running as its own user must be able to reach its restored data directory.
    """
    if parent is not None:
        check_scratch(parent)
    where = os.path.abspath(parent or tempfile.gettempdir())
    _remove_abandoned(where, warnings)
    try:  # absolute: the command's CHUNKVAULT_RESTORE_DIR must hold wherever it changes directory to
        path = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=where)
        os.chmod(path, 0o711)
        fd = os.open(os.path.join(path, IN_USE), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot make a scratch directory in {where}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without locks: its leftovers are not taken for abandoned either
    return path, fd


def _remove_abandoned(where: str, warnings: list[str]) -> None:
    """Remove this user's scratch directories in ``where`` whose run is gone: a marker no process holds a
    lock on.  One kept (``keep``) has no marker; one on a file system without locks is never taken."""
    try:
        names = [n for n in os.listdir(where) if n.startswith(SCRATCH_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(where, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            fd = os.open(os.path.join(path, IN_USE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if abandoned(fd):
                if _end_marked(os.pread(fd, 64, 0)):
                    warnings.append(f"stopped what the command of a verify-restore that was killed left running "
                                    f"in {path}")
                remove_tree(path)
                warnings.append(f"removed the scratch directory {path} of a verify-restore that was killed")
        except OSError:  # it could not be removed: left as it is
            continue
        finally:
            os.close(fd)


def _end_marked(marker: bytes, grace: float = LEFTOVER_GRACE) -> bool:
    """Stop this user's processes that carry ``marker`` (a killed run's command, and what it started: they
    outlived it, a database server too, and its scratch directory was removed under them): SIGTERM, then
    SIGKILL after ``grace`` s.  Whether any was found."""
    if not marker.startswith(b"CHUNKVAULT_COMMAND_RUN="):
        return False

    def marked() -> dict[int, int]:
        """The live processes that carry the marker (a zombie's environment no longer reads), each pinned
        (``pin_carrying``): a signal never reaches another process their pid passed to since the listing."""
        try:
            names = os.listdir("/proc")
        except OSError:
            return {}
        me = os.getpid()
        pinned = ((int(n), pin_carrying(int(n), marker)) for n in names if n.isdigit() and int(n) != me)
        return {pid: fd for pid, fd in pinned if fd is not None}

    left = marked()
    found = bool(left)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline + LEFTOVER_GRACE:
        sig = signal.SIGKILL if time.monotonic() >= deadline else signal.SIGTERM
        for pid, fd in left.items():
            signal_pinned(pid, fd, sig)
        time.sleep(0.05)
        left = marked()
    for fd in left.values():  # even SIGKILL did not end them
        if fd >= 0:
            os.close(fd)
    return found


def remove_tree(path: str) -> None:
    """Remove a scratch tree, even one whose restored modes forbid us to list or write it, at any depth (by
    descriptors: a path longer than the system takes failed to be made writable, and the tree stayed)."""
    from .store.target_dirs import remove_tree as remove_below

    parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_below(parent, os.path.basename(os.path.abspath(path)), unlock=True)
    finally:
        os.close(parent)


def check_pg_options(pg_start: bool, query: str | None, expect: str | None, bindir: str | None,
                     dbname: str, recover: str | None = None) -> "RecoveryTarget | None":
    """The --pg-* options make sense together: each of them only with --pg-start, an expected answer only
    with its query, nothing empty (a `--pg-query "$Q"` with the variable unset must not pass unasked), a
    recovery target one the server is promoted at; that target, checked (None without --pg-recover)."""
    from .pgrecovery import verification_target

    given = [n for n, v in (("--pg-query", query), ("--pg-expect", expect), ("--pg-bindir", bindir),
                            ("--pg-dbname", None if dbname == "postgres" else dbname),
                            ("--pg-recover", recover)) if v is not None]
    if given and not pg_start:
        raise UsageError(f"{given[0]} starts PostgreSQL on the copy: give --pg-start too")
    if expect is not None and query is None:
        raise UsageError("--pg-expect is the answer of --pg-query: give the query too")
    for name, value in (("--pg-query", query), ("--pg-bindir", bindir), ("--pg-dbname", dbname)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UsageError(f"{name} must not be empty")
    if bindir is not None and not os.path.isdir(bindir):
        raise UsageError(f"--pg-bindir is not a directory: {bindir}")
    if recover is not None and (not isinstance(recover, str) or not recover.strip()):
        raise UsageError("--pg-recover must not be empty")
    return verification_target(recover) if recover is not None else None


#: strerror(ENOSPC) as the server (run with LC_ALL=C) and the relay (Python's OSError) spell it.
NO_SPACE_TEXT = os.strerror(errno.ENOSPC)


def _out_of_room(copy: str, results: Iterable[PgStartResult]) -> PgStartResult | None:
    """The first data directory whose server failed while the copy's file system ran out of room: the server
    or the WAL relay said so, or, for a server that never came out of recovery and logged no reason of its
    own, less is left there than one WAL segment of the copy takes (the server makes one to come out of
    recovery, and removes what it had written of it when that fails).  A full scratch directory says nothing
    of the backup: it must not pass for a damaged one, nor a finding (a gap in the archive, a query's
    error) pass for a full directory."""
    from .pgstart import fatal_line
    from .store.walnames import segment_size

    for p in results:
        if p.ok or p.answer is not None or p.data_directory is None:
            continue
        if NO_SPACE_TEXT in (p.error or "") or NO_SPACE_TEXT in (p.log_tail or ""):
            return p
        if p.pid is None or p.ready_seconds is not None or fatal_line(p.log_tail or "") is not None:
            continue
        datadir = os.path.join(copy, p.data_directory)
        try:
            st = os.statvfs(datadir)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < segment_size(_wal_files(datadir)):
            return p
    return None


def _wal_files(datadir: str) -> list[tuple[str, int]]:
    """(name, size) of the files in the copy's ``pg_wal`` (``pg_xlog`` before 10)."""
    for wal in ("pg_wal", "pg_xlog"):
        try:
            with os.scandir(os.path.join(datadir, wal)) as it:
                return [(e.name, e.stat(follow_symlinks=False).st_size) for e in it]
        except OSError:
            continue
    return []


def wal_fetch(repo: "Repository") -> Callable[[str, int], int | None]:
    """What the WAL relay serves a recovering copy with: the archived file written into the descriptor the
    server's user passed, read here (the repository is opened, its password known, by this process alone)."""
    from .store import walarchive

    def fetch(name: str, fd: int) -> int | None:
        try:
            wal = walarchive.deliver(repo.store, name, fd)
        except MissingObject:  # archived after this run read the index: a live server archives on meanwhile
            repo.store.refresh_index()
            wal = walarchive.deliver(repo.store, name, fd)
        return None if wal is None else wal.size

    return fetch


def wal_names(repo: "Repository") -> Callable[[], list[str]]:
    """The names archived in the repository's WAL archive as they are when asked (listed again: a live server
    archives on meanwhile)."""
    from .store import walarchive

    def names() -> list[str]:
        return walarchive.names(repo.store, cache=False)

    return names


def verify_restore(repo: "Repository", snapshot: str | Snapshot = "latest", *, then: str | None = None,
                   timeout: float | None = None, scratch: str | None = None, keep: bool = False,
                   owners: bool | None = None, max_listed: int = MAX_LISTED,
                   env: dict[str, str] | None = None, numeric_owner: bool = False, pg_start: bool = False,
                   pg_query: str | None = None, pg_expect: str | None = None, pg_bindir: str | None = None,
                   pg_dbname: str = "postgres", pg_recover: str | None = None) -> VerifyReport:
    """Restore ``snapshot`` into a scratch directory, compare it with the manifest, start its PostgreSQL
    data directories (``pg_start``), run ``then``.

    ``then`` runs through the shell with ``CHUNKVAULT_RESTORE_DIR``,
    ``CHUNKVAULT_SNAPSHOT_ID``, ``CHUNKVAULT_SNAPSHOT_TIME`` and
    ``CHUNKVAULT_SNAPSHOT_KIND`` set (on top of ``env``, default this process's
    environment), and only when the comparison found nothing wrong.  Corrupt or
    missing data is reported in ``error``; other failures (an unreachable
    remote) propagate.  The scratch directory is removed unless ``keep``.
    Owners are restored and compared as ``Repository.restore`` sets them (``numeric_owner``).

    ``pg_start``: once the comparison found nothing wrong, each PostgreSQL data directory of the copy is
    started (binaries from ``pg_bindir``, else found for its version), each of its databases opened,
    ``pg_query`` asked in ``pg_dbname`` and its answer compared with ``pg_expect``, within ``timeout``
    (default ``PG_START_TIMEOUT``) each; then it is stopped, before ``then`` runs.

    ``pg_recover`` (with ``pg_start``; ``restore --pg-recover``'s TARGET but ``standby``): instead of
    starting on its own WAL, the copy recovers from this repository's WAL archive to the target and is
    promoted there, then checked; the WAL is served by this process (``walrelay``), so the server's user
    needs no password.  With ``snapshot`` ``latest`` and a ``time=`` or ``lsn=`` target, the snapshot is
    the one ``restore --pg-recover`` picks (``pgrecovery.reaching``).
    """
    if then is not None and (not isinstance(then, str) or not then.strip()):
        # `--then "$CHECK"` with the variable unset passed as a database proven to start
        raise UsageError(f"then is a shell command, not {then!r}: nothing would prove the restore")
    recovery = check_pg_options(pg_start, pg_query, pg_expect, pg_bindir, pg_dbname, pg_recover)
    with repo.reading("verify-restore"):
        if recovery is not None and recovery.picks_snapshot and snapshot == "latest":
            from .pgrecovery import reaching

            snapshot = reaching(repo, recovery)
        snap = repo.snapshot(snapshot)  # a Snapshot object as it is now (see Repository.snapshot)
        refused = None
        if recovery is not None and pg_start:
            from .pgrecovery import off_timeline

            refused = off_timeline(snap.stats, *repo.wal_history())
        if owners is None:
            owners = os.geteuid() == 0
        report = VerifyReport(snap.id, snap.time, snap.kind)
        started = time.monotonic()
        base, in_use = _make_scratch(scratch, report.warnings)
        target = os.path.join(base, "restore")
        restore_warnings: list[str] = []
        data_dirs: list[bytes] = []
        try:
            try:
                restore_warnings = _restore(repo, snap, target, numeric_owner).warnings
            except NewerObject:  # not damage: an upgrade reads it, and the run stops (exit 17)
                raise
            except (CorruptObject, StorageFull) as exc:  # this snapshot fails; a run over several goes on
                report.error = f"restore failed: {exc}"
                report.error_kind = "no_space" if isinstance(exc, StorageFull) else "damaged"
                partial = getattr(exc, "partial", None)  # what it did restore, for the report's counts
                if partial is not None:
                    report.files, report.dirs, report.links = partial.files, partial.dirs, partial.links
                    report.bytes = partial.bytes
            report.restore_seconds = round(time.monotonic() - started, 3)
            if report.error is None:
                t = time.monotonic()
                tree = noting_data_directories(repo.tree(snap), data_dirs)
                if os.geteuid() == 0 and not numeric_owner:  # as the restore set owners and ACLs: by name
                    tree = repo.owner_map(snap).entries(tree)  # where known here, compared or not
                result = compare_tree(tree, target, owners=owners, max_listed=max_listed)
                report.compare_seconds = round(time.monotonic() - t, 3)
                report.files, report.dirs, report.links = result.files, result.dirs, result.links
                report.bytes = result.bytes
                report.mismatches, report.mismatch_count = result.mismatches, result.mismatch_count
                report.mismatches_limited = result.limited
                report.warnings += restore_warnings + result.warnings  # what the restore left out, said
            if (then is not None or pg_start) and report.ok:
                try:
                    report.archive_off = turn_archiving_off(target, data_dirs)
                except OSError as exc:  # a server started on it could archive into the live archive
                    raise TargetUnwritable(f"cannot turn archiving off in the restored copy before starting it: "
                                           f"{exc.strerror or exc}") from None
            if pg_start and report.ok and refused is not None:  # PostgreSQL's own failure would say it less well
                report.pg_start = [PgStartResult(None, error="not started, as it cannot recover from the archive: "
                                                             + refused)]
            elif pg_start and report.ok:
                report.pg_start = prove_data_directories(
                    target, data_dirs, bindir=pg_bindir, query=pg_query, expect=pg_expect, dbname=pg_dbname,
                    timeout=PG_START_TIMEOUT if timeout is None else timeout, recovery=recovery,
                    fetch=wal_fetch(repo) if recovery is not None else None,
                    archived=wal_names(repo) if recovery is not None else None)
                full = _out_of_room(target, report.pg_start)
                if full is not None:  # its failure may be the full disk's: nothing is known of the data
                    where = "" if full.data_directory == "." else f" in {full.data_directory}"
                    report.error = (f"no space left in the scratch directory {base} for PostgreSQL to start the "
                                    f"copy{where}")
                    report.error_kind = "no_space"
            elif pg_start:
                report.warnings.append("PostgreSQL was not started: " + (
                    "the restore failed" if report.error else "the restored tree is not what the snapshot holds"))
            if then is not None and report.ok:
                cmd_env = without_secrets(os.environ if env is None else env)  # a server it starts keeps them
                cmd_env.update(CHUNKVAULT_RESTORE_DIR=target, CHUNKVAULT_SNAPSHOT_ID=snap.id,
                               CHUNKVAULT_SNAPSHOT_TIME=snap.time, CHUNKVAULT_SNAPSHOT_KIND=snap.kind)
                report.command = run_command(then, cmd_env, timeout=timeout, end_leftovers=not keep,
                                             marker_to=None if keep else in_use)
                if report.command.leftovers:
                    report.warnings.append("the command left processes running: they were stopped")
                if report.command.output_full:  # its failure may be the full disk's: nothing is known of the data
                    report.error = (f"no space left in the temp directory {tempfile.gettempdir()} for the command's "
                                    f"output: it was cut short there, and the command (exit "
                                    f"{report.command.exit_code}) may have failed for that")
                    report.error_kind = "no_space"
            elif then is not None:
                report.warnings.append("the command was not run: " + (
                    "the restore failed" if report.error and report.pg_start is None
                    else "the restored tree is not what the snapshot holds"
                    if report.mismatch_count else "PostgreSQL did not start (--pg-start)"))
        finally:
            if keep:
                report.kept_at = target
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(base, IN_USE))
            elif os.path.lexists(base):
                try:
                    remove_tree(base)
                except OSError as exc:  # the verdict stands; what is left is said
                    report.warnings.append(f"the scratch directory {base} could not be removed: "
                                           f"{exc.strerror or exc}")
            os.close(in_use)
            report.duration = round(time.monotonic() - started, 3)
        return report


# --- command line ------------------------------------------------------------------------------


def _print_report(r: VerifyReport, limit: int = 50) -> None:
    from .units import format_size

    print(f"snapshot {r.snapshot_id[:8]} ({r.snapshot_time}, {r.snapshot_kind}): {r.files} files, {r.dirs} dirs, "
          f"{r.links} links, {format_size(r.bytes)}; restored in {r.restore_seconds:.2f} s, "
          f"compared in {r.compare_seconds:.2f} s")
    for w in r.warnings:
        warn(w, prefix="  warning: ")
    if r.error:
        print(f"  error: {one_line(r.error)}")
    for m in r.mismatches[:limit]:
        print(f"  mismatch: {one_line(m)}")
    if r.mismatch_count > min(limit, len(r.mismatches)):
        print(f"  ... {r.mismatch_count - min(limit, len(r.mismatches))} more (--json lists up to {MAX_LISTED})")
    for d in r.archive_off:
        users = [w for w, used in (("the server started on it", r.pg_start is not None),
                                   ("the command", r.command is not None)) if used] or ["the command"]
        print(f"  archive_mode set to off in {one_line(d)}/postgresql.auto.conf for {' and '.join(users)}")
    for p in r.pg_start or ():
        _print_pg_start(p)
    c = r.command
    if c is not None:
        status = f"killed after the timeout ({c.seconds:.1f} s)" if c.timed_out else f"exited {c.exit_code}"
        print(f"  command {status} in {c.seconds:.2f} s")
        if c.exit_code != 0 and c.output:
            for line in c.output.rstrip("\n").split("\n"):  # each line made printable, as hook output is logged
                sys.stderr.write(f"  {one_line(line)}\n")
    if r.kept_at:
        print(f"  kept at {one_line(r.kept_at)}")
    verdict = "OK" if r.ok else "FAILED"
    limited = (f", {'all' if r.mismatches_limited == r.mismatch_count else r.mismatches_limited} of them what the "
               "scratch directory's file system cannot hold" if r.mismatches_limited else "")
    print(f"  {verdict} in {r.duration:.2f} s" + (f" ({r.mismatch_count} mismatch(es){limited})"
                                                 if r.mismatch_count else ""))


def _print_pg_start(p: PgStartResult) -> None:
    """What starting one data directory showed: a line of how, the answer, the error with the log's tail."""
    where = one_line(p.data_directory) if p.data_directory is not None else "the copy"
    if p.signals_removed or p.written:
        changed = [f"{one_line(n)} removed" for n in p.signals_removed] + [f"{one_line(n)} written (empty)"
                                                                            for n in p.written]
        print(f"  PostgreSQL {p.version} in {where}: " + ", ".join(changed) + " before the start")
    if p.recovery is not None:
        _print_recovery(p, where)
    if p.ok:
        print(f"  PostgreSQL {p.version} in {where} started as {one_line(p.user)} and was ready in "
              f"{p.ready_seconds:.2f} s; {len(p.databases)} database(s) opened: "
              + ", ".join(one_line(d) for d in p.databases))
        if p.answer is not None:
            print(f"  query answered: {one_line(p.answer)}")
        return
    print(f"  PostgreSQL in {where} failed: {one_line(p.error)}")
    if p.log_tail and p.answer is None:  # the server's own words on why (not for an answer that differs)
        for line in p.log_tail.rstrip("\n").split("\n")[-20:]:
            sys.stderr.write(f"  log: {one_line(line)}\n")


def _print_recovery(p: PgStartResult, where: str) -> None:
    """How a copy recovered from the archive: its target, the WAL served, where the replay ended."""
    assert p.recovery is not None
    target = p.recovery["target"] + (f"={p.recovery['value']}" if p.recovery.get("value") is not None else "")
    served = p.wal_served or {}
    files = (f"{served.get('count', 0)} WAL file(s) served" + (f" ({served['first']} .. {served['last']})"
                                                             if served.get("count") else ""))
    line = f"  PostgreSQL in {where} recovered to {one_line(target)} from the archive: {files}"
    if p.replayed_until is not None:
        line += (f"; replayed until {p.replayed_until.get('lsn') or '?'}"
                 + (f" ({p.replayed_until['timestamp']})" if p.replayed_until.get("timestamp") else ""))
    if p.timeline is not None:
        line += f", promoted to timeline {p.timeline}"
    print(line if p.ok or p.replayed_until is not None else line.replace(" recovered to ", " recovering to ", 1))


def _report_json(r: VerifyReport) -> dict[str, Any]:
    """A report for --json, names as every command gives them: a mismatch's path that is not UTF-8 with its
    bytes (``path_b64``), the warnings' with ``warnings_b64``.  Its lone surrogates alone, a parser in another
    language read such a path as U+FFFD: a program could not tell which file differed."""
    from .cli import _name_json, _names_json

    d = r.to_dict()
    d["mismatches"] = [{**m, **_name_json("path", m["path"])} for m in d["mismatches"]]
    d.update(_names_json("warnings", d["warnings"]))
    return d


def cmd_verify_restore(args: argparse.Namespace) -> int:
    """``chunkvault verify-restore``: exit 0 only if every chosen snapshot verified and its command passed."""
    from .cli import _emit_json, _open, chosen_snapshot, source_host
    from .memory import RESTORE_TRIM_THRESHOLD, tune_allocator

    tune_allocator(trim_threshold=RESTORE_TRIM_THRESHOLD)
    if args.timeout is not None and not 0 < args.timeout < float("inf"):  # nan too: no timeout at all
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    if args.all_since is not None and (args.snapshot is not None or args.until is not None):
        raise UsageError(f"give {'--until' if args.until is not None else 'a snapshot'} or --all-since, not both")
    if args.scratch is not None:
        check_scratch(args.scratch)
    recovery = check_pg_options(args.pg_start, args.pg_query, args.pg_expect, args.pg_bindir, args.pg_dbname,
                                args.pg_recover)
    if recovery is not None and recovery.picks_snapshot and args.all_since is not None:
        raise UsageError(f"--pg-recover {recovery.kind}= picks the snapshot that reaches it: give no --all-since")
    repo = _open(args)
    reports: list[VerifyReport] = []
    # one source's, with --host/--path (CHUNKVAULT_HOST where no id is named)
    listed = of_source(repo.snapshots(), source_host(args, args.snapshot or "latest"), args.snapshot_paths)
    # A snapshot object that does not load cannot be dated, nor restored: it fails a run over a span, and
    # one for the latest (it may be the newest: a nightly check must not go green past it).  One a newer
    # chunkvault wrote is no failure of the repository's: such a run stops, asking for the upgrade.
    newer = [(name, exc) for name, exc in repo.store.unreadable_snapshots.items() if isinstance(exc, NewerObject)]
    for name, exc in newer:
        if args.snapshot in (None, "latest") or args.all_since is not None or name.startswith(args.snapshot.lower()):
            raise exc.explained("; this chunkvault cannot verify it")
    unreadable = [VerifyReport(name, "time unknown", "unreadable",
                               error=f"the snapshot object is unreadable: {exc.object_name}: {exc.reason}")
                  for name, exc in repo.store.unreadable_snapshots.items()]
    if args.all_since is not None:
        since = parse_since(args.all_since)
        snaps = snapshots_since(listed, since)
        reports += unreadable
        if not snaps and not reports:
            raise SnapshotNotFound(f"no snapshot at or after {since.isoformat()}")
    elif args.snapshot in (None, "latest"):
        reports += unreadable
        if recovery is not None and recovery.picks_snapshot and args.until is None and (listed or not reports):
            from .pgrecovery import reaching  # as restore --pg-recover picks it

            with repo.reading("verify-restore"):
                snaps = [reaching(repo, recovery, host=source_host(args, "latest"),
                                  paths=args.snapshot_paths or None)]
        else:
            snaps = [chosen_snapshot(repo, args, "latest")] if listed or not reports else []
    else:
        named = [r for r in unreadable if args.snapshot and r.snapshot_id.startswith(args.snapshot.lower())]
        if len(named) == 1 and not [s for s in listed if s.id.startswith(args.snapshot.lower())]:
            raise CorruptObject(f"snapshots/{named[0].snapshot_id}", named[0].error or "unreadable")
        snaps = [chosen_snapshot(repo, args, args.snapshot)]
    for r in reports:
        if not args.json:
            _print_report(r)
    for snap in snaps:
        r = verify_restore(repo, snap, then=args.then, timeout=args.timeout, scratch=args.scratch, keep=args.keep,
                           numeric_owner=args.numeric_owner, owners=False if args.ignore_owners else None,
                           pg_start=args.pg_start, pg_query=args.pg_query, pg_expect=args.pg_expect,
                           pg_bindir=args.pg_bindir, pg_dbname=args.pg_dbname, pg_recover=args.pg_recover)
        reports.append(r)
        if not args.json and not (args.quiet and r.ok):
            _print_report(r)
    failed = [r for r in reports if not r.ok]
    if args.json:
        _emit_json({"ok": not failed, "snapshots": [_report_json(r) for r in reports]})
    elif not args.quiet:
        print(f"verified {len(reports)} snapshot(s): " + ("all OK" if not failed else f"{len(failed)} failed"))
    if failed and all(r.error_kind == "no_space" for r in failed):  # nothing found wrong with the backups
        where = ("the scratch directory to restore" if all(r.command is None and r.pg_start is None for r in failed)
                 else "the scratch directory to verify" if all(r.command is None for r in failed)
                 else "the scratch or temp directory to verify")
        raise StorageFull(f"verify-restore: no space left in {where} {len(failed)} of "
                          f"{len(reports)} snapshot(s): " + " ".join(r.snapshot_id[:8] for r in failed))
    if failed:
        raise VerificationFailed(f"verify-restore: {len(failed)} of {len(reports)} snapshot(s) failed: "
                                 + " ".join(r.snapshot_id[:8] for r in failed))
    return 0


def add_commands(subparsers: Any, common: argparse.ArgumentParser, reading: argparse.ArgumentParser) -> None:
    """Register ``verify-restore``."""
    from .cli import add_snapshot_choice

    s = subparsers.add_parser(
        "verify-restore", parents=[common, reading],
        help="restore snapshots into a scratch directory, compare them with their manifests, run a check")
    s.add_argument("snapshot", nargs="?", default=None, help="id, unique prefix, or latest (the default)")
    s.add_argument("--all-since", metavar="TIME",
                   help="verify every snapshot at or after TIME (ISO 8601, or a span back from now: 7d, 12h), "
                        "oldest first")
    s.add_argument("--then", metavar="CMD",
                   help="shell command run on each restore that matched its manifest (non-zero exit: failed); "
                        "it gets CHUNKVAULT_RESTORE_DIR, CHUNKVAULT_SNAPSHOT_ID, CHUNKVAULT_SNAPSHOT_TIME, "
                        "CHUNKVAULT_SNAPSHOT_KIND; what it leaves running (a database it started, even in a "
                        "session of its own) is stopped when it exits, unless --keep; its output is shown when it fails (with --json: "
                        "always, as output)")
    s.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="kill CMD (and its children) after this long; with --pg-start, the time each data "
                        "directory gets to start and answer (default 600)")
    s.add_argument("--pg-start", action="store_true",
                   help="start each PostgreSQL data directory of the copy (as its owner, no TCP, a private "
                        "socket, archiving off, recovery signals removed), open each database, stop it; a "
                        "failure fails the snapshot (before --then)")
    s.add_argument("--pg-query", metavar="SQL", help="with --pg-start: run SQL and report its answer")
    s.add_argument("--pg-expect", metavar="TEXT",
                   help="with --pg-query: fail unless the answer is TEXT (psql's unaligned rows, fields "
                        "joined by |, rows by newlines)")
    s.add_argument("--pg-dbname", metavar="NAME", default="postgres",
                   help="the database --pg-query runs in (default postgres)")
    s.add_argument("--pg-bindir", metavar="DIR",
                   help="the PostgreSQL server binaries (default /usr/lib/postgresql/<the copy's "
                        "version>/bin, else pg_ctl's on PATH if of that version)")
    s.add_argument("--pg-recover", metavar="TARGET",
                   help="with --pg-start: recover the copy from this repository's WAL archive to TARGET (end, "
                        "immediate, time=TIME, lsn=LSN, xid=XID, name=POINT), served by this process (the server "
                        "needs no password), promote it there, then check it; with latest and time= or lsn=, "
                        "the snapshot restore --pg-recover would pick")
    s.add_argument("--scratch", metavar="DIR", help="make the scratch directory under DIR (default: the temp dir)")
    s.add_argument("--keep", action="store_true", help="keep the restored tree (its path is reported)")
    s.add_argument("--numeric-owner", action="store_true",
                   help="as root, set and compare owners by their recorded ids, not by the recorded names")
    s.add_argument("--ignore-owners", action="store_true",
                   help="compare no owners (as root in a user namespace, which cannot give files to ids outside it)")
    add_snapshot_choice(s)
    s.set_defaults(func=cmd_verify_restore, read_lock="verify-restore")
