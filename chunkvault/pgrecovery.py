"""``restore --pg-recover``: a restored PostgreSQL data directory set up to recover from the WAL archive.

Recovering by hand means appending ``restore_command`` and a recovery target to the configuration and
touching ``recovery.signal``, the steps a tired operator gets wrong (a target without zone read in the
server's time zone, settings of an earlier recovery left in ``postgresql.auto.conf``, a signal file owned by
root).  pgBackRest's restore writes them itself (``--type``, ``--target``); so does this module, after the
files are restored.  The settings go into ``postgresql.auto.conf``, which PostgreSQL reads last, with any
earlier recovery settings there commented out; the signal file is owned as ``global/pg_control`` is.
"""
from __future__ import annotations

import errno
import os
import re
import shlex
import stat
import struct
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .errors import ChunkvaultError, SnapshotNotFound, StorageFull, TargetUnwritable, UsageError
from .store.walnames import format_lsn, parse_lsn
from .store.snapshot import parse_time

if TYPE_CHECKING:
    from .repository import Repository
    from .store.snapshot import Snapshot

#: What ``--pg-recover`` takes: the kinds of target, those without a value first.
PLAIN_TARGETS = ("end", "immediate", "standby")
VALUED_TARGETS = ("time", "lsn", "xid", "name")
ACTIONS = ("pause", "promote", "shutdown")
#: The settings a recovery is made of: written anew, and commented out where an earlier recovery left them.
RECOVERY_SETTINGS = ("restore_command", "recovery_target", "recovery_target_time", "recovery_target_lsn",
                     "recovery_target_xid", "recovery_target_name", "recovery_target_action",
                     "recovery_target_inclusive", "recovery_target_timeline")
#: What the settings a recovery does not set are written as, before its own (PostgreSQL takes each setting's last
#: line, and refuses a second kind of target only as it is set): one left in postgresql.conf by an earlier
#: recovery by hand, as PostgreSQL's documentation has them, would otherwise still decide where this one stops.
DEFAULTS = (("recovery_target", ""), ("recovery_target_time", ""), ("recovery_target_lsn", ""),
            ("recovery_target_xid", ""), ("recovery_target_name", ""), ("recovery_target_action", "pause"),
            ("recovery_target_inclusive", "on"), ("recovery_target_timeline", "latest"))
SIGNALS = ("recovery.signal", "standby.signal")
AUTO_CONF = "postgresql.auto.conf"
#: PostgreSQL 12 replaced recovery.conf with these settings and signal files.
OLDEST_MAJOR = 12


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops: ``end`` of the archive, ``immediate`` (the copy's consistent point), a ``time``,
    ``lsn``, ``xid`` or restore point ``name``; or ``standby`` (follow the archive, never stop).
    ``action``: what the server does at the target (None: PostgreSQL's default, pause)."""

    kind: str
    value: str | None = None
    action: str | None = None

    def settings(self) -> list[tuple[str, str]]:
        """The settings besides ``restore_command``."""
        out: list[tuple[str, str]] = []
        if self.kind == "immediate":
            out.append(("recovery_target", "immediate"))
        elif self.kind in VALUED_TARGETS:
            assert self.value is not None
            out.append((f"recovery_target_{self.kind}", self.value))
        if self.action is not None:
            out.append(("recovery_target_action", self.action))
        return out

    @property
    def stops_at(self) -> datetime | None:
        """A time target as a time (None for the other kinds): the snapshot to restore must end before it."""
        return datetime.fromisoformat(self.value) if self.kind == "time" and self.value else None

    @property
    def picks_snapshot(self) -> bool:
        """Whether the target says which snapshot can reach it (``reached_from``): a time or a position."""
        return self.kind in ("time", "lsn")

    def reached_from(self, ended: datetime, stats: dict) -> bool | None:
        """Whether a base backup that ended at ``ended``, with these snapshot stats, can recover to this
        target, as pgBackRest picks a backup for one: it had ended by the time, its WAL stopped at or before
        the position (PostgreSQL refuses a stop before the copy is consistent).  None where it cannot be
        told: a position, and no stop position recorded (``backup --postgres`` records it)."""
        assert self.picks_snapshot and self.value is not None
        if self.kind == "time":
            return ended <= datetime.fromisoformat(self.value)
        pg = stats.get("postgres")
        stop = pg.get("stop_lsn") if isinstance(pg, dict) else None
        try:
            return parse_lsn(stop) <= parse_lsn(self.value) if isinstance(stop, str) else None
        except ValueError:
            return None

    @property
    def signal(self) -> str:
        return "standby.signal" if self.kind == "standby" else "recovery.signal"

    def to_dict(self) -> dict:
        return {"target": self.kind, "value": self.value, "action": self.action}


def on_timeline(stats: dict, newest: int, ends: dict[int, int]) -> bool:
    """Whether a base backup with these snapshot stats can recover along timeline ``newest`` (the one a
    recovery follows: ``recovery_target_timeline`` is latest; ``ends``: its history): taken on it, or on an
    ancestor and stopped by where that one ended.  One stopped past that lies on a branch abandoned there (a
    point-in-time recovery went back before it): PostgreSQL does not find its checkpoint on the new timeline.
    True where it cannot be told (no timeline or stop recorded, no history)."""
    pg = stats.get("postgres")
    tli, stop = (pg.get("timeline"), pg.get("stop_lsn")) if isinstance(pg, dict) else (None, None)
    if not isinstance(tli, int) or not isinstance(stop, str) or tli >= newest:
        return True
    try:
        return tli in ends and parse_lsn(stop) <= ends[tli]
    except ValueError:
        return True


def off_timeline(stats: dict, newest: int, ends: dict[int, int]) -> str | None:
    """Why a base backup with these snapshot stats cannot recover along timeline ``newest`` (``on_timeline``
    says it cannot), or None: PostgreSQL, started on it, fails with "could not locate required checkpoint
    record" and a hint to remove ``backup_label``, which would corrupt the copy."""
    if on_timeline(stats, newest, ends):
        return None
    pg = stats["postgres"]
    tli = pg["timeline"]
    where = (f"up to {pg['stop_lsn']}, after the line of timeline {newest} branched off it at "
             f"{format_lsn(ends[tli])}" if tli in ends else f"which timeline {newest} does not descend from")
    return (f"its copy was taken on timeline {tli}, {where} ({newest:08X}.history): a recovery follows timeline "
            f"{newest}, the newest archived, and PostgreSQL would not find the copy's checkpoint on it")


#: Where ``ControlFileData.time`` (the server's last write of ``global/pg_control``, seconds since the epoch)
#: lies: after the system identifier, two versions and the cluster state, 8-byte aligned (4-byte on 32-bit x86).
_CONTROL_TIME_OFFSETS = (24, 20)
#: The times a ``pg_control`` of a real server can hold (2000 to 2200): another layout's bytes fall outside.
_CONTROL_TIME_RANGE = (946_684_800, 7_258_118_400)


def control_time(control: bytes) -> datetime | None:
    """When the server last wrote the ``global/pg_control`` whose first bytes are ``control`` (a checkpoint, a
    state change: for a base backup's copy, at or after its start, before it was consistent), in UTC; None
    where it does not read as one."""
    for offset in _CONTROL_TIME_OFFSETS:
        if len(control) >= offset + 8:
            (stamp,) = struct.unpack_from("=q", control, offset)
            if _CONTROL_TIME_RANGE[0] <= stamp < _CONTROL_TIME_RANGE[1]:
                return datetime.fromtimestamp(stamp, timezone.utc)
    return None


def copied_after(target: RecoveryTarget, control: bytes) -> str | None:
    """Why a data directory with this ``global/pg_control`` cannot recover to a ``time`` target, or None: its
    server wrote the file after that time, so the copy is consistent only later.  PostgreSQL takes such a copy
    without complaint and stops at the first commit after the target, which the copy may hold already: a
    later state than the one asked for, promoted as if it were.  None for other targets, or where the time
    does not read."""
    written = control_time(control)
    if target.stops_at is None or written is None or written <= target.stops_at:
        return None
    return (f"its server wrote global/pg_control at {written.isoformat()}, after the recovery target "
            f"{target.stops_at.isoformat()}: a copy made after a time cannot recover to it (PostgreSQL would stop "
            "no earlier than where the copy is consistent, later than the target, and be promoted there)")


def parse_target(text: str, action: str | None = None) -> RecoveryTarget:
    """``--pg-recover``'s argument (``end``, ``immediate``, ``standby``, ``time=TIME``, ``lsn=LSN``,
    ``xid=XID``, ``name=NAME``) and ``--pg-target-action``, checked: PostgreSQL would otherwise refuse them
    only once started, in its log.  A time without zone is local time, written with its offset (PostgreSQL
    would read it in the server's zone)."""
    if action is not None and action not in ACTIONS:
        raise UsageError(f"the target action is one of {', '.join(ACTIONS)}, not {action!r}")
    kind, sep, value = text.partition("=")
    if not sep:
        if kind not in PLAIN_TARGETS:
            raise UsageError(f"--pg-recover takes {', '.join(PLAIN_TARGETS)}, or "
                             f"{', '.join(k + '=...' for k in VALUED_TARGETS)}, not {text!r}")
        if action is not None and kind != "immediate":
            why = "it promotes at the end of the archive" if kind == "end" else "a standby follows the archive"
            raise UsageError(f"--pg-recover {kind} has no target to act at ({why}): leave --pg-target-action out")
        return RecoveryTarget(kind, None, action)
    if kind not in VALUED_TARGETS:
        raise UsageError(f"--pg-recover takes {', '.join(k + '=...' for k in VALUED_TARGETS)} with a value, "
                         f"not {kind!r}")
    return RecoveryTarget(kind, _checked_value(kind, value), action)


def verification_target(text: str) -> RecoveryTarget:
    """``verify-restore --pg-recover``'s target: as ``restore``'s, promoted at the target (the checks that
    follow need the server out of recovery; ``end`` promotes at the end of the archive by itself); ``standby``,
    which never comes out of recovery, is refused."""
    target = parse_target(text)
    if target.kind == "standby":
        raise UsageError("verify-restore --pg-recover needs a target the server is promoted at (end, immediate, "
                         "time=, lsn=, xid=, name=): a standby never comes out of recovery to be checked")
    return target if target.kind == "end" else replace(target, action="promote")


def _checked_value(kind: str, value: str) -> str:
    if not value.strip() or "\n" in value or "\0" in value:
        raise UsageError(f"--pg-recover {kind}= needs a value on one line, not {value!r}")
    if kind == "time":
        return _postgres_time(parse_time(value.strip()))
    if kind == "lsn":
        try:
            return format_lsn(parse_lsn(value))
        except ValueError:
            raise UsageError(f"{value!r} is not a WAL position (such as 0/3000060)") from None
    if kind == "xid":
        if not re.fullmatch(r"[0-9]{1,20}", value.strip()):
            raise UsageError(f"{value!r} is not a transaction id (a number)")
        return value.strip()
    if len(value.encode()) > 63:  # NAMEDATALEN - 1: pg_create_restore_point refuses longer names
        raise UsageError(f"a restore point's name is at most 63 bytes, not {value!r}")
    return value


def _postgres_time(t: datetime) -> str:
    """A time as PostgreSQL reads it with no zone setting involved: UTC with its offset."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def conf_value(value: str) -> str:
    """A setting's value quoted for postgresql.conf (a quote doubled, a backslash doubled)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_SETTING = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?")


def rewrite_auto_conf(text: str, settings: list[tuple[str, str]], stamp: str) -> str:
    """``postgresql.auto.conf``'s text with the recovery settings it had commented out and ``settings``
    appended (PostgreSQL takes a setting's last line; one left from an earlier recovery would otherwise stay
    in force where the new recovery sets no such target)."""
    lines = text.splitlines()
    out = []
    for line in lines:
        m = _SETTING.match(line)
        if m and not line.lstrip().startswith("#") and m.group(1).lower() in RECOVERY_SETTINGS:
            out.append(f"# {line}  # replaced by chunkvault restore --pg-recover")
        else:
            out.append(line)
    out.append(f"# recovery settings written by chunkvault restore --pg-recover, {stamp}")
    out.extend(f"{name} = {conf_value(value)}" for name, value in settings)
    return "\n".join(out) + "\n"


def check_major(pg_version: bytes) -> int:
    """The major version in a data directory's ``PG_VERSION``; UsageError before 12 (recovery.conf)."""
    text = pg_version.decode("ascii", "replace").strip()
    try:
        major = int(text.split(".")[0])
    except ValueError:
        raise UsageError(f"PG_VERSION reads {text!r}: not a PostgreSQL data directory") from None
    if major < OLDEST_MAJOR:
        raise UsageError(f"PostgreSQL {text} recovers with a recovery.conf: --pg-recover writes the settings of "
                         f"PostgreSQL {OLDEST_MAJOR} and newer")
    return major


@dataclass
class RecoveryWritten:
    """What ``write_recovery`` did: the settings written and the signal file made."""

    settings: list[tuple[str, str]]
    signal: str
    target: RecoveryTarget

    def to_dict(self) -> dict:
        return {**self.target.to_dict(), "signal": self.signal, "settings": dict(self.settings)}


def write_recovery(datadir: str, target: RecoveryTarget, restore_command: str) -> RecoveryWritten:
    """Set up the data directory ``datadir`` (restored) to recover with ``restore_command`` to ``target``:
    the settings into ``postgresql.auto.conf`` (kept its owner and mode, or made as ``global/pg_control``'s
    owner's), after the other recovery settings at their defaults (``DEFAULTS``), any signal file of an
    earlier setup removed, the target's made.  UsageError when ``datadir`` is
    no data directory of PostgreSQL 12 or newer, or one copied after a time ``target`` (``copied_after``);
    TargetUnwritable (StorageFull) where it takes no settings: one of those names is no file (a FIFO, a
    directory: nothing written then), or a write fails.
    Written under the lock a restore holds on its target (store/target_lock.py): TargetBusy while another
    restore writes there; within ``holding``, under the one the restore of ``datadir`` took, kept since."""
    from .store.target_lock import target_held

    with target_held(datadir):
        return _write_recovery(datadir, target, restore_command)


def _write_recovery(datadir: str, target: RecoveryTarget, restore_command: str) -> RecoveryWritten:
    control = os.path.join(datadir, "global", "pg_control")
    try:
        owner = os.stat(control)
        with open(os.path.join(datadir, "PG_VERSION"), "rb") as f:
            check_major(f.read(64))
        with open(control, "rb") as f:
            why = copied_after(target, f.read(64))
    except FileNotFoundError:
        raise UsageError(f"{datadir} is no PostgreSQL data directory (no global/pg_control or PG_VERSION): "
                         "no recovery settings written") from None
    if why is not None:
        raise UsageError(f"{datadir} cannot recover to the target: {why}; no recovery settings written")
    settings = [("restore_command", restore_command), *target.settings()]
    chosen = {name for name, _ in settings}
    defaults = [(name, value) for name, value in DEFAULTS if name not in chosen]
    try:
        dir_fd = os.open(datadir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _unwritten(datadir, exc) from None
    try:
        for name in (AUTO_CONF, *SIGNALS):  # all looked at before anything is written
            _refuse_other_kind(datadir, dir_fd, name)
        text, old = _read_conf(datadir, dir_fd)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        new = rewrite_auto_conf(text or "", defaults + settings, stamp)
        _write_as(dir_fd, AUTO_CONF, new.encode("utf-8", "surrogateescape"), owner if old is None else old,
                  0o600 if old is None else stat.S_IMODE(old.st_mode))
        for name in SIGNALS:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        _write_as(dir_fd, target.signal, b"", owner, 0o600)
    except OSError as exc:
        raise _unwritten(datadir, exc) from None
    finally:
        os.close(dir_fd)
    return RecoveryWritten(settings, target.signal, target)


def _unwritten(datadir: str, exc: OSError) -> ChunkvaultError:
    """The one-line error for recovery settings the restored ``datadir`` did not take (no space, read-only,
    permission): exit 14, as a restore's target that takes no writes."""
    what = f" ({os.fsdecode(exc.filename)})" if isinstance(exc.filename, (str, bytes)) else ""
    message = (f"cannot write the recovery settings into {datadir}{what}: {exc.strerror or exc}; the restored "
               "files are left as restored")
    return StorageFull(message) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else TargetUnwritable(message)


def _refuse_other_kind(datadir: str, dir_fd: int, name: str) -> None:
    """TargetUnwritable where ``name`` in the data directory is neither a file nor a symbolic link (one the
    snapshot held so: a FIFO, a socket, a device, a directory): it is no file of settings to rewrite, nor one
    to remove unasked (a FIFO opened blocks; a directory holds what it holds)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "something else")
        raise TargetUnwritable(f"{os.path.join(datadir, name)} is {kind}, not a file: no recovery settings written "
                               "(the restored files are left as restored; put a file there, or set up the recovery "
                               "by hand)")


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _read_conf(datadir: str, dir_fd: int) -> tuple[str | None, os.stat_result | None]:
    """``postgresql.auto.conf``'s text and stat, (None, None) where there is none.  A symbolic link (restored
    as the snapshot has it) is not read, and is replaced by a file, as ALTER SYSTEM's rename replaces it:
    followed, a restore as root rewrote whatever file it named.  Opened without waiting: something other than
    a file put there since it was looked at is refused, never read from."""
    try:
        fd = os.open(AUTO_CONF, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return None, None
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            _refuse_other_kind(datadir, dir_fd, AUTO_CONF)
            raise OSError(errno.EINVAL, "not a file", AUTO_CONF)  # no longer what was opened: replaced again
        return f.read().decode("utf-8", "surrogateescape"), st


def _write_as(dir_fd: int, name: str, data: bytes, owner: os.stat_result, mode: int) -> None:
    """``data`` into ``name`` in the directory open at ``dir_fd``, durably: written whole beside it, given
    ``mode`` and ``owner``'s uid and gid (where this process may), and renamed over what is there (a file,
    a symbolic link), as a restore replaces a file.  Never written through: another hard link of the file
    (to ``postgresql.conf``, say) keeps its content, and a FIFO put in its place is never opened."""
    from .store.restore import _beside_name

    while True:
        tmp = os.fsdecode(_beside_name())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            try:
                os.fchown(fd, owner.st_uid, owner.st_gid)
            except PermissionError:  # not root: the file is this user's, as the restored files are
                pass
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    synced = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)  # the rename, durably
    try:
        os.fsync(synced)
    finally:
        os.close(synced)


def refuse_running_server(target: str | bytes) -> None:
    """A target holding the ``postmaster.pid`` of a server that runs in it is a live PostgreSQL data
    directory: files restored under that server corrupt it, and deleting what the snapshot lacks removes its
    pid file, so ``pg_ctl`` no longer finds it to stop it.  The server is the pid's process (negative: a
    single-user backend's) whose working directory is the target, as a postmaster's is its data directory;
    a pid file a crash left names no process, this one or its parent, or one working elsewhere (its pid
    reused after a reboot).  A process this user may not look at is taken for the server."""
    try:
        with open(os.path.join(os.fsdecode(target), "postmaster.pid"), "rb") as f:
            pid = abs(int(f.readline()))
        here = os.stat(target)
    except (OSError, ValueError):
        return
    if pid == 0 or pid in (os.getpid(), os.getppid()):
        return
    try:
        cwd = os.stat(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return  # no such process
    except OSError:
        pass  # another user's: it may be the server
    else:
        if (cwd.st_dev, cwd.st_ino) != (here.st_dev, here.st_ino):
            return
    raise UsageError(f"restore target {os.fsdecode(target)} is the data directory of a running PostgreSQL server "
                     f"(postmaster.pid: process {pid}): stop it first (pg_ctl stop), then restore; if no server "
                     "runs there, remove its postmaster.pid")


def restore_command(program: list[str], url: str, secret: tuple[str, str], options: list[str],
                    spool: str | None = None, *, fatal_errors: bool) -> str:
    """The ``restore_command`` that fetches from this repository: ``program`` (chunkvault as an absolute
    command line), ``url``, ``secret`` (``--password-file`` or ``--password-command`` and its value), the
    remote's ``-o`` options, and ``--spool`` when given.  The server runs it without our environment:
    everything is on the line.  ``fatal_errors`` (all but a standby's): ``--fatal-errors``, so that a
    repository out of reach stops the recovery rather than end it short of its target."""
    argv = [*program, "archive-get", "-q", "-r", url, *secret, *(["--fatal-errors"] if fatal_errors else [])]
    for option in options:
        argv += ["-o", option]
    if spool is not None:
        argv += ["--spool", spool]
    return " ".join(shlex.quote(a) for a in argv) + ' %f "%p"'


def at_root(subtree: bytes | None, name: bytes) -> bytes:
    """``name`` below ``subtree`` (the whole snapshot: None or empty), as the snapshot names it."""
    root = (subtree or b"").rstrip(b"/")
    return root + b"/" + name if root else name


def holds_data_directory(repo: "Repository", snap: "Snapshot", subtree: bytes | None) -> bool:
    """Whether the snapshot holds a PostgreSQL data directory at its root (or ``subtree``)."""
    try:
        repo.find_entry(snap, at_root(subtree, b"global/pg_control"))
    except UsageError:
        return False
    return True


def reaching(repo: "Repository", target: RecoveryTarget, *, host: str | None = None,
             paths: list[str] | None = None, subtree: bytes | None = None) -> "Snapshot":
    """The newest snapshot (of the source ``host`` and ``paths`` choose) holding a data directory (at
    ``subtree``) that can recover to a time or position target (``RecoveryTarget.reached_from``), as pgBackRest
    picks a backup for one: one taken later, still running then, or whose WAL stops past the position cannot
    (PostgreSQL stops at the copy's consistent point at the earliest); one of another source of the host (its
    /etc) is passed over, and so, for a position, is one that records no stop position, and one on a timeline
    the newest archived one left before it stopped (``on_timeline``).  ``restore`` and
    ``verify-restore`` with ``--pg-recover`` and ``latest`` pick with it."""
    until: datetime | None = target.stops_at
    unrecorded = branched = 0
    newest, ends = repo.wal_history()
    while True:
        try:
            snap = repo.snapshot("latest", until=until, host=host, paths=paths)
        except SnapshotNotFound:
            if target.kind == "time":
                assert target.stops_at is not None
                what, verb = f"had ended by the recovery target {target.stops_at.isoformat()}", "had"
            else:
                what, verb = f"had its WAL stop at or before the recovery target {target.value}", "did"
            unknown = (f"; {unrecorded} record no stop position (not taken by backup --postgres): name one to try it"
                       if unrecorded else "")
            if branched:
                unknown += (f"; {branched} lie on a timeline abandoned before timeline {newest}, which a recovery "
                            "follows, branched off")
            raise SnapshotNotFound(f"no snapshot of a data directory {what}: a recovery starts from one that {verb} "
                                   f"(--host and --path choose among sources{unknown})") from None
        if holds_data_directory(repo, snap, subtree):
            reached = target.reached_from(
                snap.datetime + timedelta(seconds=float(snap.stats.get("duration") or 0)), snap.stats)
            if reached and on_timeline(snap.stats, newest, ends):
                return snap
            unrecorded += reached is None
            branched += bool(reached)
        until = snap.datetime - timedelta(microseconds=1)
