"""Start a restored PostgreSQL data directory and prove it opens (``verify-restore --pg-start``).

A copy that matched its manifest byte for byte may still not start: WAL missing after the backup's start, a
control file from the wrong moment, a configuration that names what this host lacks.  Here the copy is
started the way a restore would be, but fenced off from everything live: the server runs as the data
directory's owner with no TCP listener, its socket, ``pg_hba.conf`` and ``pg_ident.conf`` in a private run
directory, archiving off, the log on its standard error in a file of ours.  Recovery signals are removed
from the copy, so that it comes up on the WAL it holds (crash recovery from its backup label) instead of
waiting for a primary or an archive; or, with ``--pg-recover TARGET``, recovery settings are written instead
and the server recovers from the repository's WAL archive, served by the verifying process itself over a
socket in the run directory (``walrelay``; the server's restore_command, ``walfetch``, holds no password), up
to the target, where it is promoted.  Once it accepts connections and is out of recovery, every database
that takes connections is opened, one query may be asked, and the server is stopped: a fast shutdown
(``pg_ctl stop -m fast``: SIGINT), then an immediate one (SIGQUIT), then SIGKILL to its process group, also
when we are interrupted.  Killed outright (SIGKILL, the OOM killer), we cannot stop it, so the kernel is asked
to: the server gets SIGQUIT when its parent ends, and the run directory such a run leaves behind is removed by
a later one.

The pure parts (which binaries, which settings, which files, how a connection is named) are apart from the
I/O, as the rest of chunkvault keeps them.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from .errors import PgStartFailed
from .pgsession import SEGMENT_SIZE_QUERY, wal_segment_name
from .store.walnames import is_segment, parse_lsn
from .walrelay import CLIENT_FILE, RELAY_SOCKET

if TYPE_CHECKING:
    from .pgrecovery import RecoveryTarget
    from .walrelay import Fetch, WalRelay

__all__ = ["PgStartResult", "PG_START_TIMEOUT", "pick_bindir", "server_settings", "postgres_argv",
           "recovery_files", "conninfo", "searchable", "prove_data_directories", "prove_data_directory",
           "parse_replay", "fatal_line", "python_candidates", "tablespaces_outside", "archive_gap"]

#: How long a copy gets to finish its recovery and answer, when no ``timeout`` is given: a large one replays
#: all the WAL written while its backup ran.
PG_START_TIMEOUT = 600.0
#: Seconds a fast shutdown, then an immediate one, gets before the next step.
FAST_STOP_WAIT = 60.0
IMMEDIATE_STOP_WAIT = 10.0
#: The oldest major version handled: from 10 on, ``postmaster.pid`` says when the server is ready.
MIN_MAJOR = 10
#: The oldest a recovery is set up for (signal files; pgrecovery.OLDEST_MAJOR).
RECOVERY_MIN_MAJOR = 12
LOG_TAIL = 4 << 10
#: Seconds a server gets to be seen exiting (a failure of its own, then) after a statement failed with an
#: error of its, and after a connection failed or was cut: a recovery that fails short of its target refuses
#: connections while it shuts down, which on a busy machine takes seconds.
EXIT_GRACE = 1.0
SHUTDOWN_GRACE = 15.0
#: Where Debian installs each major version's server binaries.
DEBIAN_BINDIR = "/usr/lib/postgresql/{major}/bin"
#: What the server reads as its client authentication: its unix socket alone, in a directory only its user
#: (and root) can enter.
HBA = "local all all trust\n"
#: A unix socket's path must fit in ``sun_path`` (108 bytes with its NUL).
SOCKET_PATH_MAX = 107
#: Where the WAL relay's client is looked for besides our own interpreter (one installed under a home the
#: server's user cannot enter, pyenv's under /root, does not run for it).
PYTHON_PATH = "/usr/bin:/bin:/usr/local/bin"
#: What naming the bootstrap superuser from the copy's files takes: pg_authid's oid and the relation map's
#: magic (pg_authid is a mapped catalog), the page layout (the block sizes a build may have, read from the
#: first page's header; item pointers past the page header; a normal item, a tuple's header), the
#: superuser's oid and a name's fixed width.
AUTHID_OID = 1260
RELMAP_MAGIC = 0x592717
BLOCK_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)
AUTHID_PAGES = 64
PAGE_HEADER = 24
LP_NORMAL = 1
TUPLE_HEADER = 23
HEAP_XMAX_INVALID = 0x0800
BOOTSTRAP_SUPERUSER = 10
NAMEDATALEN = 64
#: prctl's option that has the kernel signal a process when the thread that started it ends (Linux).
PR_SET_PDEATHSIG = 1
#: The prefix of a run directory's name, the files it may hold (besides the server's socket and its lock,
#: ``.s.PGSQL.*``), and the age past which one with no server running in it is taken for a killed
#: verification's and removed.
RUN_DIRECTORY_PREFIX = "chunkvault-pg-"
RUN_DIRECTORY_FILES = frozenset({"pg_hba.conf", "pg_ident.conf", "server.log", CLIENT_FILE, RELAY_SOCKET})
STALE_RUN_DIRECTORY = 3600.0
#: Seconds the relay's client gets to answer a ping as the server's user.
PING_WAIT = 60.0
#: Asked once a recovered copy is promoted: how far its recovery replayed (PostgreSQL keeps both values once
#: recovery is over) and the timeline it went on with; fields joined by |.
REPLAY_QUERY = ("SELECT coalesce(to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', "
                "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ''), coalesce(pg_last_wal_replay_lsn()::text, ''), "
                "pg_walfile_name(pg_current_wal_lsn())")


@dataclass
class PgStartResult:
    """What starting one PostgreSQL data directory of a restored copy showed."""

    data_directory: str | None  # relative to the copy ("." for the copy itself); None: the copy holds none
    version: str | None = None  # its PG_VERSION
    bindir: str | None = None
    user: str | None = None  # whom the server ran as
    pid: int | None = None  # the postmaster's, ended by the time this is reported
    ready_seconds: float | None = None  # from its start until it accepted connections, out of recovery
    databases: list[str] = field(default_factory=list)  # each one opened (SELECT 1)
    answer: str | None = None  # the query's
    signals_removed: list[str] = field(default_factory=list)  # recovery signal files removed from the copy
    written: list[str] = field(default_factory=list)  # files made in the copy (a missing postgresql.conf)
    # with --pg-recover: the target and the settings written (pgrecovery.RecoveryWritten.to_dict)
    recovery: dict | None = None
    wal_served: dict | None = None  # with --pg-recover: walrelay.Served.to_dict (count, first, last, ...)
    replayed_until: dict | None = None  # with --pg-recover: timestamp (UTC) and lsn of the last replayed
    timeline: int | None = None  # with --pg-recover: the one the server went on with after its promotion
    error: str | None = None
    log_tail: str | None = None  # the server's log, on a failure

    @property
    def ok(self) -> bool:
        return self.error is None


# --- pure ---------------------------------------------------------------------------------------


def parse_pg_version(text: str) -> str:
    """The major version a data directory's ``PG_VERSION`` names ("15", "9.6")."""
    version = text.strip()
    if not re.fullmatch(r"\d+(?:\.\d+)?", version):
        raise PgStartFailed(f"PG_VERSION holds {version[:40]!r}, not a PostgreSQL version")
    return version


def major_number(version: str) -> int:
    """A major version as a number to compare: "15" -> 15, "9.6" -> 9."""
    return int(version.split(".")[0])


def binaries_major(version_output: str) -> str | None:
    """The major version ``postgres --version`` names ("postgres (PostgreSQL) 15.18 (Debian ...)"), as
    PG_VERSION spells it: "15", or "9.6" before 10."""
    m = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", version_output)
    if m is None:
        return None
    return m.group(1) if int(m.group(1)) >= 10 or m.group(2) is None else f"{m.group(1)}.{m.group(2)}"


def pick_bindir(major: str, given: tuple[str, str | None] | None, debian: str | None,
                on_path: tuple[str, str | None] | None) -> str:
    """The directory whose ``postgres`` starts a data directory of version ``major``: ``given`` (the
    ``--pg-bindir`` asked for, with the major its binaries are), else Debian's for that major (``debian``:
    the directory when it holds the server), else the one of ``pg_ctl`` on PATH (with its major) if it is
    that version.  A server of another major version refuses the files, so the choice says so rather than
    leave it to a log line."""
    if given is not None:
        directory, its = given
        if its is None:
            raise PgStartFailed(f"--pg-bindir {directory} holds no PostgreSQL server binaries (postgres, psql)")
        if its != major:
            raise PgStartFailed(f"--pg-bindir {directory} holds PostgreSQL {its}, the copy is of {major}")
        return directory
    if debian is not None:
        return debian
    if on_path is not None and on_path[1] == major:
        return on_path[0]
    found = f" (pg_ctl on PATH is PostgreSQL {on_path[1]}, in {on_path[0]})" if on_path is not None else ""
    raise PgStartFailed(f"no PostgreSQL {major} server binaries: not in {DEBIAN_BINDIR.format(major=major)}, "
                        f"nor on PATH{found}; give --pg-bindir")


def recovery_files(major: int) -> tuple[str, ...]:
    """The files that put a starting server into archive recovery or standby mode: from 12 on the signal
    files, before that ``recovery.conf``."""
    return ("standby.signal", "recovery.signal") if major >= 12 else ("recovery.conf",)


def server_settings(major: int, datadir: str, rundir: str, port: int) -> list[tuple[str, str]]:
    """The settings given on the server's command line (they win over every configuration file) so that a
    copy started beside the live server touches nothing of it: no TCP, a socket and authentication files
    in ``rundir`` (its own), no pid file elsewhere, no archiving, no SSL files, no log collector (the log
    goes to its standard error, which we keep), no wait for a synchronous standby, and the copy as its data
    directory whatever its ``postgresql.conf`` names.  The copy is scratch, removed afterwards: it needs no
    fsync, and a backend crash ends the run rather than restarting it."""
    settings = [
        ("data_directory", datadir),
        ("port", str(port)),
        ("listen_addresses", ""),
        ("unix_socket_directories", rundir),
        ("hba_file", os.path.join(rundir, "pg_hba.conf")),
        ("ident_file", os.path.join(rundir, "pg_ident.conf")),
        ("external_pid_file", ""),
        ("ssl", "off"),
        ("archive_mode", "off"),
        ("logging_collector", "off"),
        ("log_destination", "stderr"),
        ("synchronous_standby_names", ""),
        ("huge_pages", "try"),
        ("fsync", "off"),
        ("restart_after_crash", "off"),
    ]
    if major < 15:  # its default is below the data directory; a setting of the live server's points elsewhere
        settings.append(("stats_temp_directory", "pg_stat_tmp"))
    return settings


def postgres_argv(bindir: str, datadir: str, settings: Iterable[tuple[str, str]]) -> list[str]:
    """The server's command line (no shell: a value is passed as it is, spaces and quotes too)."""
    argv = [os.path.join(bindir, "postgres"), "-D", datadir]
    for name, value in settings:
        argv += ["-c", f"{name}={value}"]
    return argv


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(rundir: str, port: int, user: str, dbname: str) -> str:
    """A libpq connection string to the copy's socket (any database name: quoted as libpq reads it)."""
    return " ".join(f"{k}={_conninfo_value(v)}" for k, v in
                    (("host", rundir), ("port", str(port)), ("user", user), ("dbname", dbname)))


def searchable(mode: int, owner: int, group: int, uid: int, gids: Iterable[int]) -> bool:
    """Whether user ``uid`` (in groups ``gids``) may pass through a directory of this mode and owners: the
    owner's bits for its owner, the group's for a member, the others' for everyone else."""
    if uid == 0:
        return True
    if uid == owner:
        return bool(mode & stat.S_IXUSR)
    if group in set(gids):
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def pid_file_ready(text: str) -> bool:
    """Whether ``postmaster.pid`` says the server accepts connections (its 8th line, from 10 on)."""
    lines = text.split("\n")
    return len(lines) > 7 and lines[7].strip() == "ready"


def split_records(out: bytes) -> list[str]:
    """Records psql printed separated by zero bytes (``-A -t -0``): a database name may hold any character."""
    text = out.decode(errors="replace").rstrip("\n")
    return [r for r in text.split("\0") if r]


def role_candidates(pguser: str | None, owner_name: str | None, catalog: Iterable[str] = ()) -> list[str]:
    """Whom to connect as at first: ``PGUSER`` where it is set, the owner's name (initdb's default superuser),
    the names the copy's ``pg_authid`` gives the bootstrap superuser (``initdb -U``, a container's
    ``POSTGRES_USER``), then ``postgres``."""
    return list(dict.fromkeys([n for n in (pguser, owner_name, *catalog, "postgres") if n]))


def mapped_filenode(map_file: bytes, oid: int) -> int | None:
    """The file a mapped catalog (``pg_authid``) is stored in, as ``global/pg_filenode.map`` says: its magic,
    a count, then (oid, filenode) pairs; None when it does not read."""
    if len(map_file) < 8 or struct.unpack_from("=i", map_file)[0] != RELMAP_MAGIC:
        return None
    count = struct.unpack_from("=i", map_file, 4)[0]
    if not 0 <= count <= (len(map_file) - 8) // 8:
        return None
    for i in range(count):
        mapped, filenode = struct.unpack_from("=II", map_file, 8 + 8 * i)
        if mapped == oid:
            return filenode
    return None


def bootstrap_names(heap: bytes) -> list[str]:
    """The names the bootstrap superuser (oid 10) has in ``pg_authid``'s heap pages, one not deleted first:
    only candidates to connect as (the server says which exists), so a tuple's visibility is not judged.  The
    block size is the first page's (its header's ``pd_pagesize_version``): a build's may not be the default."""
    if len(heap) < PAGE_HEADER:
        return []
    block = struct.unpack_from("=H", heap, 18)[0] & 0xFF00  # the size in the high byte, the layout's version below
    if block not in BLOCK_SIZES:
        return []
    live, gone = [], []
    for start in range(0, len(heap) - block + 1, block):
        page = heap[start:start + block]
        lower = struct.unpack_from("=H", page, 12)[0]
        for at in range(PAGE_HEADER, min(lower, block) - 3, 4):
            item = struct.unpack_from("=I", page, at)[0]
            off, flags, length = item & 0x7FFF, (item >> 15) & 3, item >> 17
            if flags != LP_NORMAL or off + length > block or length < TUPLE_HEADER:
                continue
            tup = page[off:off + length]
            xmax, infomask, hoff = struct.unpack_from("=I", tup, 4)[0], struct.unpack_from("=H", tup, 20)[0], tup[22]
            if hoff + 4 + NAMEDATALEN > length or struct.unpack_from("=I", tup, hoff)[0] != BOOTSTRAP_SUPERUSER:
                continue
            name = tup[hoff + 4:hoff + 4 + NAMEDATALEN].split(b"\0")[0].decode("utf-8", "replace")
            (live if xmax == 0 or infomask & HEAP_XMAX_INVALID else gone).append(name)
    return list(dict.fromkeys(n for n in live + gone if n))


def psql_missing(stderr: str) -> str | None:
    """What a failed connection lacked: "role" or "database" (it does not exist), else None."""
    m = re.search(r'(role|database) ".*" does not exist', stderr)
    return m.group(1) if m else None


def parse_replay(text: str) -> tuple[dict, int | None]:
    """``REPLAY_QUERY``'s answer: the last transaction's replay time and the last replayed position (None where
    nothing was), and the timeline of the WAL file being written."""
    fields = text.strip().split("|")
    if len(fields) != 3:
        raise PgStartFailed(f"unexpected answer about the replay: {text[:80]!r}")
    stamp, lsn, walfile = fields
    timeline = int(walfile[:8], 16) if re.fullmatch(r"[0-9A-F]{24}", walfile) else None
    return {"timestamp": stamp or None, "lsn": lsn or None}, timeline


#: FATAL lines of a connection the server turned away ("the database system is in recovery mode"): logged
#: for a psql of ours that came as the server was failing, after the line that says why it failed.
_TURNED_AWAY = re.compile(r"the database system is (?:in recovery mode|starting up|shutting down|not (?:yet )?"
                          r"accepting connections)")


def fatal_line(log: str) -> str | None:
    """The last FATAL or PANIC message of a server's log (why it exited: "recovery ended before configured
    recovery target was reached") but a connection turned away, unless there is no other; else None."""
    found = turned_away = None
    for line in log.splitlines():
        m = re.search(r"\b(?:FATAL|PANIC):\s+(.*)", line)
        if m and _TURNED_AWAY.match(m.group(1)):
            turned_away = m.group(1).strip()
        elif m:
            found = m.group(1).strip()
    return found or turned_away


def archive_gap(missing: Iterable[str], archived: Iterable[str]) -> tuple[str, str] | None:
    """A segment the recovery asked for and was told is not archived while a later one of its timeline, or of
    a later timeline, is (the first such, with the last of its timeline, else of the later ones), or None: a
    recovery to ``end`` stops at the first segment missing and is promoted there, short of the archive's end,
    as if the archive ended there.  PostgreSQL asks for a segment of an earlier timeline only where no later
    one it follows holds it (before that one branched off, or missing there too): a timeline a promotion
    started goes on after the gap (the old primary's last segments never archived, its standby promoted)."""
    archived = set(archived)
    for name in missing:
        if len(name) != 24 or name in archived:
            continue
        later = [a for a in archived if len(a) == 24 and a[:8] >= name[:8] and a[8:] > name[8:]]
        if later:
            return name, max([a for a in later if a[:8] == name[:8]] or later)
    return None


def short_of_archive(served: Iterable[str], missing: Iterable[str], replayed_lsn: str | None, segment_size: int,
                     archived: Iterable[str]) -> tuple[str, str, str] | None:
    """The segment a recovery to ``end`` ended in, the first and the last archived segments of its timeline
    after it, when there are any (else None): the archive held a segment that does not continue the WAL
    (damaged before it was archived, cut short, another server's), PostgreSQL took it for the end and was
    promoted there, short of the archive's end, though every file was delivered.  The timeline is the newest
    of the segments served (the one the recovery followed last); ``replayed_lsn`` is where its replay ended,
    at the end of its last record, which may be the very start of the next segment.  A recovery told that a
    later segment of its timeline was not archived (``missing``) reached the archive's end as it then was:
    what a running server archived since is no sign of damage."""
    timelines = [int(n[:8], 16) for n in served if is_segment(n)]
    if not timelines or not replayed_lsn or segment_size <= 0 or segment_size & (segment_size - 1):
        return None
    lsn = parse_lsn(replayed_lsn)
    ended = wal_segment_name(max(timelines), max(lsn - 1, 0), segment_size)
    # (the segment it ended in among them: told it was not archived, it read the copy's own pg_wal/ and ended
    # there, a standby's or a backup's last segment, archived since)
    if any(is_segment(m) and m[:8] == ended[:8] and m[8:] >= ended[8:] for m in missing):
        return None
    later = [a for a in archived if is_segment(a) and a[:8] == ended[:8] and a[8:] > ended[8:]]
    return (ended, min(later), max(later)) if later else None


def python_candidates(ours: str, *others: str | None) -> list[str]:
    """The interpreters to try the relay's client with, ours first, each once."""
    seen, out = set(), []
    for path in (ours, *others):
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append(path)
    return out


# --- I/O -----------------------------------------------------------------------------------------


@dataclass
class Identity:
    """Whom the server runs as: the data directory's owner."""

    uid: int
    gid: int
    groups: list[int]
    name: str | None


def server_identity(datadir: str) -> Identity:
    """The data directory's owner, whom PostgreSQL runs as (it refuses root, and any user but the owner)."""
    st = os.stat(datadir)
    if os.geteuid() == 0:
        if st.st_uid == 0:
            raise PgStartFailed("the copy's data directory is owned by root (its owner could not be set, as in "
                                "a user namespace with --ignore-owners, or it is root's in the snapshot): "
                                "PostgreSQL refuses to run as root, so it cannot be started")
    elif st.st_uid != os.geteuid():
        raise PgStartFailed(f"the copy's data directory is owned by uid {st.st_uid}, not by this user: PostgreSQL "
                            "runs only as its data directory's owner (verify as root, or as that user)")
    try:
        pw = pwd.getpwuid(st.st_uid)
        name, gid = pw.pw_name, pw.pw_gid
        groups = os.getgrouplist(name, gid)
    except KeyError:  # an owner this host does not name: its id alone
        name, gid, groups = None, st.st_gid, [st.st_gid]
    return Identity(st.st_uid, gid, groups, name)


def catalog_superuser(datadir: str) -> list[str]:
    """``bootstrap_names`` of the copy's ``pg_authid`` file (none when it does not read)."""
    try:
        with open(os.path.join(datadir, "global", "pg_filenode.map"), "rb") as f:
            filenode = mapped_filenode(f.read(), AUTHID_OID)
        if filenode is None:
            return []
        with open(os.path.join(datadir, "global", str(filenode)), "rb") as f:
            return bootstrap_names(f.read(AUTHID_PAGES * max(BLOCK_SIZES)))
    except (OSError, struct.error):
        return []


def closed_ancestor(path: str, who: Identity) -> str | None:
    """The first directory above ``path`` that ``who`` may not pass through, or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(1, len(parts)):
        directory = os.sep.join(parts[:i]) or os.sep
        st = os.stat(directory)
        if not searchable(st.st_mode, st.st_uid, st.st_gid, who.uid, who.groups):
            return directory
    return None


def find_bindir(major: str, given: str | None) -> str:
    """``pick_bindir`` with what this host has: the versions of the binaries asked about."""
    debian = DEBIAN_BINDIR.format(major=major)
    pg_ctl = shutil.which("pg_ctl")
    on_path = None
    if pg_ctl is not None:
        directory = os.path.dirname(os.path.realpath(pg_ctl))
        on_path = (directory, _binaries_version(directory))
    return pick_bindir(major, (given, _binaries_version(given)) if given is not None else None,
                       debian if _binaries_version(debian) == major else None, on_path)


def _binaries_version(directory: str) -> str | None:
    """The major version of the server in ``directory``, or None without one (and psql) there."""
    postgres = os.path.join(directory, "postgres")
    if not all(os.access(os.path.join(directory, t), os.X_OK) for t in ("postgres", "psql")):
        return None
    try:
        out = subprocess.run([postgres, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return binaries_major(out.stdout)


def tablespaces_outside(datadir: str, copy: str) -> list[tuple[str, str]]:
    """Each ``pg_tblspc`` entry of the copy that leads out of it (``pg_tblspc/<oid>``, where it leads): a data
    directory backed up as files (a pg_basebackup copy, a stopped cluster) keeps the link to the tablespace's
    location, the live server's, and a server started on the copy would recover into that tablespace and reset
    its unlogged relations, writing where the live server keeps its files."""
    root = os.path.realpath(copy).rstrip(os.sep) + os.sep
    found = []
    tblspc = os.path.join(datadir, "pg_tblspc")
    try:
        names = sorted(os.listdir(tblspc))
    except FileNotFoundError:
        return []
    for name in names:
        path = os.path.join(tblspc, name)
        if not os.path.islink(path):
            continue
        if not (os.path.realpath(path) + os.sep).startswith(root):
            found.append((f"pg_tblspc/{name}", os.readlink(path)))
    return found


def _write_owned(path: str, text: str, who: Identity) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        if os.geteuid() == 0:
            os.fchown(f.fileno(), who.uid, who.gid)
        f.write(text)


def prepare_copy(datadir: str, major: int, who: Identity) -> tuple[list[str], list[str]]:
    """Make the copy startable on its own: its recovery signals removed (it must come up on its own WAL,
    not wait for a primary or an archive), an empty ``postgresql.conf`` where it has none (Debian keeps it
    under /etc, outside the data directory), a ``postmaster.pid`` a copied server left removed (its pid may
    be a live process's here).  The signals removed and the files written, by name."""
    removed = []
    for name in recovery_files(major):
        path = os.path.join(datadir, name)
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(datadir, "postmaster.pid"))
    written = []
    conf = os.path.join(datadir, "postgresql.conf")
    if not os.path.exists(conf):
        if os.path.lexists(conf):  # a link to what this host lacks: the copy's own file instead
            os.unlink(conf)
        _write_owned(conf, "", who)
        written.append("postgresql.conf")
    return removed, written


def _run_directory(who: Identity) -> str:
    """A private directory for the socket and the authentication files: the server user's alone, and
    short enough for a socket path."""
    parent = tempfile.gettempdir()
    if len(os.path.join(parent, RUN_DIRECTORY_PREFIX + "XXXXXXXX", ".s.PGSQL.65535.lock")) > SOCKET_PATH_MAX:
        parent = "/tmp"
    sweep_run_directories(parent, {os.geteuid(), who.uid})
    path = tempfile.mkdtemp(prefix=RUN_DIRECTORY_PREFIX, dir=parent)
    if os.geteuid() == 0:
        os.chown(path, who.uid, who.gid)
    os.chmod(path, 0o700)
    return path


def sweep_run_directories(parent: str, owners: set[int], now: float | None = None) -> list[str]:
    """Remove the run directories in ``parent`` that verifications killed outright left behind (their
    server's log, socket lock and authentication files): those of ``owners`` untouched for an hour, holding
    nothing else, with no server alive in them.  The ones removed."""
    now = time.time() if now is None else now
    removed = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if (entry.name.startswith(RUN_DIRECTORY_PREFIX) and stat.S_ISDIR(st.st_mode)
                        and st.st_uid in owners and now - st.st_mtime > STALE_RUN_DIRECTORY
                        and _abandoned(entry.path)):
                    shutil.rmtree(entry.path)
                    removed.append(entry.path)
    return removed


def _abandoned(rundir: str) -> bool:
    """Whether ``rundir`` holds only what a run directory does, and no process named by a socket lock file
    there (a postmaster's pid, its first line) still runs; a lock file that does not read counts as alive."""
    with os.scandir(rundir) as entries:
        held = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    if any(is_dir or not (name in RUN_DIRECTORY_FILES or name.startswith(".s.PGSQL.")) for name, is_dir in held):
        return False
    for name, _ in held:
        if name.startswith(".s.PGSQL.") and name.endswith(".lock"):
            try:
                with open(os.path.join(rundir, name), "rb") as f:
                    os.kill(int(f.readline()), 0)
            except ProcessLookupError:
                continue
            except (OSError, ValueError):
                pass
            return False
    return True


def _ended_with_us() -> Callable[[], None] | None:
    """What the server's process runs before it becomes PostgreSQL: the kernel is to send it SIGQUIT (an
    immediate shutdown, its backends with it) when the thread starting it ends, so that no copy's server
    outlives a verification killed outright.  That thread waits in ``prove_data_directory`` until the server
    is stopped.  None where there is no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_up() -> None:
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGQUIT), ctypes.c_ulong(0),
              ctypes.c_ulong(0), ctypes.c_ulong(0))
        if os.getppid() != parent:  # ended before that was asked: no signal would come
            os._exit(1)

    return set_up


def _free_port() -> int:
    """A port no one listens on (the server listens on none: the number names its socket file, in a
    directory of its own, so any would do; a free one keeps its lock file from misleading anyone)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One postmaster on a copy, our child, leading a process group of its own; ``stop`` ends it all."""

    def __init__(self, bindir: str, datadir: str, major: int, who: Identity, timeout: float):
        self.bindir, self.datadir, self.major, self.who, self.timeout = bindir, datadir, major, who, timeout
        self.rundir = _run_directory(who)
        self.port = _free_port()
        self.log = os.path.join(self.rundir, "server.log")
        self.proc: subprocess.Popen | None = None
        self.role: str | None = None
        self.home = "template1"  # a database that role opened: where the catalog-wide questions are asked

    def env(self) -> dict[str, str]:
        """The server's whole environment (and its restore_command's): nothing of ours, no secret."""
        return {"PATH": f"{self.bindir}:/usr/bin:/bin", "LC_ALL": "C", "HOME": self.rundir}

    def ids(self) -> dict:
        """Whom a process of the server's runs as: its user, when we are root."""
        if os.geteuid() == 0:
            return {"user": self.who.uid, "group": self.who.gid, "extra_groups": self.who.groups}
        return {}

    def start(self) -> None:
        _write_owned(os.path.join(self.rundir, "pg_hba.conf"), HBA, self.who)
        _write_owned(os.path.join(self.rundir, "pg_ident.conf"), "", self.who)
        argv = postgres_argv(self.bindir, self.datadir,
                             server_settings(self.major, self.datadir, self.rundir, self.port))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=self.env(), cwd=self.rundir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_ended_with_us(), **self.ids())

    def exited(self) -> int | None:
        """Its exit code once it has ended, without reaping it (its pid, and so its group's id, stay
        ours until ``stop``)."""
        assert self.proc is not None
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.returncode if self.proc.returncode is not None else -1
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else 128 + info.si_status

    def wait_ready(self, deadline: float) -> None:
        """Until ``postmaster.pid`` says it accepts connections (after the crash recovery its backup label
        asks for), or it exits, or the deadline passes."""
        pid_file = os.path.join(self.datadir, "postmaster.pid")
        pause = 0.02
        while True:
            code = self.exited()
            if code is not None:
                raise PgStartFailed(f"PostgreSQL exited {code} before it accepted connections")
            with contextlib.suppress(OSError):
                with open(pid_file) as f:
                    if pid_file_ready(f.read()):
                        return
            if time.monotonic() > deadline:
                raise PgStartFailed(f"PostgreSQL did not accept connections within {self.timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def psql(self, sql: str, dbname: str, deadline: float, role: str | None = None,
             records: bool = False) -> subprocess.CompletedProcess:
        """One query through psql (no ``.psqlrc``, no password file), unaligned, tuples only."""
        argv = [os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                *(["-0"] if records else []), "-d", conninfo(self.rundir, self.port, role or self.role or "", dbname),
                "-c", sql]
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "LC_ALL": "C", "PGPASSFILE": os.devnull,
               "PGCONNECT_TIMEOUT": "30", "PGAPPNAME": "chunkvault verify-restore"}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PgStartFailed(f"the {self.timeout:g} s given (--timeout) ran out before the queries were done")
        try:
            return subprocess.run(argv, env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=remaining)
        except subprocess.TimeoutExpired:
            raise PgStartFailed(f"psql did not answer in time: {sql[:60]!r} in {dbname}") from None

    def find_role(self, dbname: str, deadline: float) -> None:
        """Whom to connect as: the bootstrap superuser (oid 10, who may open every database), named by
        asking as ``PGUSER``, the owner's name or ``postgres``, in ``dbname``, ``template1`` or ``postgres``."""
        tried = []
        for role in role_candidates(os.environ.get("PGUSER"), self.who.name, catalog_superuser(self.datadir)):
            for db in dict.fromkeys((dbname, "template1", "postgres")):
                proc = self.psql("SELECT rolname FROM pg_roles WHERE oid = 10", db, deadline, role=role)
                if proc.returncode == 0:
                    self.role = proc.stdout.decode(errors="replace").strip() or role
                    self.home = db
                    return
                missing = psql_missing(proc.stderr.decode(errors="replace"))
                if missing is None:
                    raise self.failure(f"cannot connect: {_first_line(proc.stderr)}", proc.stderr, "before it could be asked")
                tried.append(f"{role}@{db}")
                if missing == "role":
                    break
        raise PgStartFailed("cannot connect: no role and database found among " + ", ".join(tried)
                            + " (set PGUSER to a superuser of the copy's)")

    def query(self, sql: str, dbname: str, deadline: float, records: bool = False) -> bytes:
        proc = self.psql(sql, dbname, deadline, records=records)
        if proc.returncode != 0:
            raise self.failure(f"{sql[:80]!r} in database {dbname!r} failed: {_first_line(proc.stderr)}", proc.stderr)
        return proc.stdout

    def failure(self, message: str, stderr: bytes, when: str = "while it was asked") -> PgStartFailed:
        """``message``, unless the server exits meanwhile (a recovery that failed short of its target ends it
        as a hot standby is being asked): then that, which the log explains.  psql's ``stderr`` says how long
        to wait for that: briefly after an error of a statement, longer after a connection's failure."""
        end = time.monotonic() + (EXIT_GRACE if statement_error(_first_line(stderr)) else SHUTDOWN_GRACE)
        while (code := self.exited()) is None and time.monotonic() < end:
            time.sleep(0.05)
        return PgStartFailed(message if code is None else f"PostgreSQL exited {code} {when}")

    def wait_consistent(self, deadline: float) -> None:
        """Until it is out of recovery: it is by the time it accepts connections with no recovery signal; a
        recovery from the archive accepts them as a hot standby, before its target."""
        while True:
            code = self.exited()
            if code is not None:
                raise PgStartFailed(f"PostgreSQL exited {code} before it was out of recovery")
            proc = self.psql("SELECT pg_is_in_recovery()", self.home, deadline)
            if proc.returncode != 0:
                raise self.failure(f"'SELECT pg_is_in_recovery()' failed: {_first_line(proc.stderr)}", proc.stderr,
                                   "before it was out of recovery")
            if proc.stdout.strip() == b"f":
                return
            if time.monotonic() > deadline:
                raise PgStartFailed(f"PostgreSQL was still in recovery after {self.timeout:g} s")
            time.sleep(0.2)

    def log_tail(self) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """A fast shutdown, an immediate one, then SIGKILL to its process group: nothing of it goes on, even
        when we are interrupted meanwhile (a second interrupt skips to the kill)."""
        proc = self.proc
        if proc is None:
            return
        try:
            for sig, wait in ((signal.SIGINT, FAST_STOP_WAIT), (signal.SIGQUIT, IMMEDIATE_STOP_WAIT)):
                if self.exited() is not None:
                    break
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, sig)
                end = time.monotonic() + wait
                while self.exited() is None and time.monotonic() < end:
                    time.sleep(0.05)
        finally:
            with contextlib.suppress(OSError):  # its children, and itself if still running; the pid is not
                os.killpg(proc.pid, signal.SIGKILL)  # reaped yet, so the group is still its
            proc.wait()

    def remove_run_directory(self) -> None:
        shutil.rmtree(self.rundir, ignore_errors=True)

    def relay_client(self, socket_path: str, deadline: float) -> str:
        """The restore_command fetching through the relay at ``socket_path``: ``walfetch``'s file copied into
        the run directory, run by the first interpreter that answers a ping as the server's user, with its
        environment, in the copy (ours, else the system's python3): a client that cannot reach the relay
        must fail before the recovery, not be taken by PostgreSQL for the end of the archive."""
        from . import walfetch
        from .walrelay import relay_command

        client = os.path.join(self.rundir, CLIENT_FILE)
        with open(walfetch.__file__, encoding="utf-8") as f:
            _write_owned(client, f.read(), self.who)
        tried = []
        for python in python_candidates(sys.executable, shutil.which("python3", path=PYTHON_PATH)):
            wait = min(PING_WAIT, deadline - time.monotonic())
            if wait <= 0:
                raise PgStartFailed(f"the {self.timeout:g} s given (--timeout) ran out before the relay answered")
            try:
                proc = subprocess.run([python, "-I", client, socket_path, "--ping"], env=self.env(),
                                      cwd=self.datadir, capture_output=True, stdin=subprocess.DEVNULL,
                                      timeout=wait, **self.ids())
            except (OSError, subprocess.SubprocessError) as exc:
                tried.append(f"{python}: {getattr(exc, 'strerror', None) or exc}")
                continue
            if proc.returncode == 0:
                return relay_command(python, client, socket_path)
            tried.append(f"{python}: {_first_line(proc.stderr) if proc.stderr.strip() else f'exit {proc.returncode}'}")
        raise PgStartFailed(f"the server's user {self.who.name or self.who.uid} cannot run the WAL relay's client "
                            f"with any Python 3 found ({'; '.join(tried)}): install python3 for it")


def statement_error(message: str) -> bool:
    """Whether psql's first line is an error the server answered a statement with (the connection held), not
    a connection that failed or was cut."""
    return message.startswith("ERROR:")


def _first_line(stderr: bytes) -> str:
    """psql's message, past the warning that the password file we give it (none) is no file."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    said = [ln for ln in lines if not re.match(r"WARNING:\s+password file .* is not a plain file", ln)]
    return (said or lines or ["no message"])[0]


def prove_data_directory(copy: str, rel: bytes, *, bindir: str | None = None, query: str | None = None,
                         expect: str | None = None, dbname: str = "postgres",
                         timeout: float = PG_START_TIMEOUT, recovery: "RecoveryTarget | None" = None,
                         fetch: "Fetch | None" = None,
                         archived: Callable[[], Iterable[str]] | None = None) -> PgStartResult:
    """Start the data directory at ``rel`` in the restored ``copy``, open each database, ask ``query``
    in ``dbname`` (its answer compared with ``expect``), stop it.  With ``recovery`` (a target promoting at
    it), the copy first recovers from the WAL archive ``fetch`` writes files of (``walrelay``), to the target;
    ``archived`` lists that archive's names once it is promoted (a recovery to ``end`` must not stop at a gap).
    A failure is the result's ``error`` (with the log's tail when the server ran), never raised; an interrupt
    stops the server and the relay and propagates."""
    datadir = os.path.join(copy, os.fsdecode(rel))
    result = PgStartResult(os.fsdecode(rel) or ".")
    server: Server | None = None
    relay: "WalRelay | None" = None
    started = time.monotonic()
    deadline = started + timeout
    try:
        with open(os.path.join(datadir, "PG_VERSION")) as f:
            result.version = parse_pg_version(f.read())
        major = major_number(result.version)
        if major < MIN_MAJOR:
            raise PgStartFailed(f"PostgreSQL {result.version} is older than --pg-start handles ({MIN_MAJOR} on)")
        if recovery is not None and major < RECOVERY_MIN_MAJOR:
            raise PgStartFailed(f"PostgreSQL {result.version} recovers with a recovery.conf: --pg-recover writes "
                                f"the settings of PostgreSQL {RECOVERY_MIN_MAJOR} and newer")
        result.bindir = find_bindir(result.version, bindir)
        who = server_identity(datadir)
        result.user = who.name or str(who.uid)
        closed = closed_ancestor(datadir, who)
        if closed is not None:
            raise PgStartFailed(f"the server's user {result.user} cannot reach the copy: {closed} is closed to it "
                                "(give --scratch a directory it may pass through)")
        outside = tablespaces_outside(datadir, copy)
        if outside:
            raise PgStartFailed("the copy's tablespace links lead out of it (" + ", ".join(
                f"{link} -> {where}" for link, where in outside) + "): started, it would write there, into the "
                "tablespace of the server it was copied from; back the cluster up with --postgres, which keeps "
                "each tablespace in the snapshot")
        result.signals_removed, result.written = prepare_copy(datadir, major, who)
        server = Server(result.bindir, datadir, major, who, timeout)
        if recovery is not None:
            relay = _recover(server, recovery, fetch, result, deadline)
        server.start()
        assert server.proc is not None
        result.pid = server.proc.pid
        server.wait_ready(deadline)
        server.find_role(dbname, deadline)
        server.wait_consistent(deadline)
        result.ready_seconds = round(time.monotonic() - started, 3)
        if relay is not None:
            result.replayed_until, result.timeline = parse_replay(
                server.query(REPLAY_QUERY, server.home, deadline).decode(errors="replace"))
            if relay.served.errors:  # a failed delivery PostgreSQL went past must not pass
                raise PgStartFailed(f"the WAL relay failed: {relay.served.errors[0]}")
            if recovery.kind == "end" and archived:
                names = list(archived())
                gap = archive_gap(relay.served.missing, names)
                if gap is not None:
                    raise PgStartFailed(f"the recovery ended at {gap[0]}, which is not archived, and was promoted "
                                        f"there, short of the archive's end ({gap[1]} is archived): the archive "
                                        "has a gap")
                size = server.query(SEGMENT_SIZE_QUERY, server.home, deadline).decode(errors="replace").strip()
                size = int(size) if size.isdigit() else 0
                short = short_of_archive(relay.served.names, relay.served.missing,
                                         result.replayed_until.get("lsn"), size, names)
                if short is not None:
                    raise PgStartFailed(f"the recovery ended in {short[0]} (replayed until "
                                        f"{result.replayed_until['lsn']}) and was promoted there, short of the "
                                        f"archive's end ({short[2]} is archived): {short[1]}, archived after it, "
                                        "does not continue the WAL (damaged before it was archived, cut short, or "
                                        "another server's)")
        names = split_records(server.query("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1",
                                           server.home, deadline, records=True))
        for name in names:
            if server.query("SELECT 1", name, deadline).strip() != b"1":
                raise PgStartFailed(f"database {name!r} did not answer SELECT 1")
            result.databases.append(name)
        if query is not None:
            result.answer = server.query(query, dbname, deadline).decode(errors="replace").rstrip("\n")
            if expect is not None and result.answer != expect:
                raise PgStartFailed(f"the query answered {result.answer!r}, expected {expect!r}")
    except PgStartFailed as exc:
        result.error = str(exc)
    except OSError as exc:
        result.error = f"{exc.filename or datadir}: {exc.strerror or exc}"
    finally:
        try:
            if server is not None:
                server.stop()
        finally:
            if relay is not None:  # after the server: its restore_command may be waiting for an answer
                relay.close()
                result.wal_served = relay.served.to_dict()
            if server is not None:
                if result.error is not None:
                    result.log_tail = server.log_tail() or None
                    result.error = _explained(result.error, result.log_tail, relay)
                server.remove_run_directory()
    return result


def _recover(server: Server, target: "RecoveryTarget", fetch: "Fetch | None", result: PgStartResult,
             deadline: float) -> "WalRelay":
    """Set the copy up to recover to ``target`` from the archive, through a relay started here (the
    caller closes it)."""
    from .pgrecovery import copied_after, write_recovery
    from .walrelay import WalRelay

    assert fetch is not None, "a recovery needs the archive's fetch"
    with open(os.path.join(server.datadir, "global", "pg_control"), "rb") as f:
        why = copied_after(target, f.read(64))
    if why is not None:
        raise PgStartFailed(f"the copy cannot recover to {target.kind}={target.value}: {why}")
    path = os.path.join(server.rundir, RELAY_SOCKET)
    relay = WalRelay(path, fetch, server.datadir,
                     (server.who.uid, server.who.gid) if os.geteuid() == 0 else None)
    try:
        command = server.relay_client(path, deadline)
        result.recovery = write_recovery(server.datadir, target, command).to_dict()
    except BaseException:
        relay.close()
        raise
    return relay


def _explained(error: str, log_tail: str | None, relay: "WalRelay | None") -> str:
    """A failure with what the server's log and the relay say of it, once each."""
    fatal = fatal_line(log_tail or "")
    if fatal and error.startswith("PostgreSQL exited") and fatal not in error:
        error += f": {fatal}"
    if relay is not None and relay.served.errors and "WAL relay" not in error:
        error += f"; the WAL relay: {relay.served.errors[0]}"
    return error


def prove_data_directories(copy: str, data_dirs: Iterable[bytes], **options: object) -> list[PgStartResult]:
    """``prove_data_directory`` for each data directory of the copy, one after the other; a copy that holds
    none fails: nothing of it was started.  A recovery takes one: the archive is one server's."""
    data_dirs = list(data_dirs)
    if options.get("recovery") is not None and len(data_dirs) > 1:
        return [PgStartResult(None, error=f"--pg-recover recovers one data directory from the repository's WAL "
                                          f"archive, and the snapshot holds {len(data_dirs)}: "
                                          + ", ".join(os.fsdecode(d) or "." for d in data_dirs))]
    results = [prove_data_directory(copy, rel, **options) for rel in data_dirs]  # type: ignore[arg-type]
    if not results:
        results.append(PgStartResult(None, error="the snapshot holds no PostgreSQL data directory (no "
                                                 "global/pg_control): nothing to start"))
    return results
