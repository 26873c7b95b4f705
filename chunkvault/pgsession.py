"""A PostgreSQL session that holds a non-exclusive base backup open, through ``psql``.

A copy of a running cluster's data directory is consistent only as a base
backup: ``pg_backup_start`` before the first file is read, ``pg_backup_stop``
after the last, in the same session (the session's end aborts the backup),
then the label file ``pg_backup_stop`` returns written as ``backup_label``
beside the files, and the WAL from the start position to the stop position
at hand when the copy is started.  A temporary physical replication slot,
made in the same session before the start, keeps the server from recycling
that WAL while the files are read, whatever ``wal_keep_size`` says; it goes
with the session.

On a streaming standby (hot_standby on) the same functions work, with the
differences PostgreSQL makes there: the start's checkpoint is a restartpoint
(at the last checkpoint record replayed), no WAL can be written or switched,
and the stop position is the standby's minimum recovery point, where a copy
whose ``global/pg_control`` was read last becomes consistent (the label says
``BACKUP FROM: standby``).  The slot, made on the standby, holds the WAL there
too: restartpoints keep what slots still need.  The WAL is read from the
standby's ``pg_wal``, where its WAL receiver wrote (and flushed) it before
anything was replayed; archiving is the primary's unless ``archive_mode`` is
``always``, so nothing waits for an archive.  What the session waits for
instead, each wait bounded: a WAL receiver streaming from the primary before
the start, and, before the stop, the replay of everything received while the
files were read, so the copy holds what the primary had sent by then.

``psql`` runs as a coprocess (it ships with every PostgreSQL install, reads
the usual ``PG*`` variables and ``~/.pgpass``, and needs no driver here);
each query's answer is read up to a marker line echoed after it.
"""
from __future__ import annotations

import base64
import os
import secrets
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from chunkvault.errors import SourceCommandFailed, UsageError, process_end
from chunkvault.processes import without_secrets
from chunkvault.store.walnames import format_lsn, parse_lsn

#: Oldest server this session drives: non-exclusive backups, and temporary replication slots (10).
OLDEST_VERSION = 100000
#: The first server version whose functions are ``pg_backup_start``/``pg_backup_stop``.
RENAMED_IN = 150000
#: How long a standby's waits last by default (its WAL receiver to stream, its replay to catch up), in seconds.
STANDBY_WAIT = 60.0
#: How long psql may take to cancel a statement that did not answer in time (``answer_wait``) and end: a server
#: that answers at all cancels at once; one frozen whole is not waited for (it cancels once it runs again).
CANCEL_WAIT = 2.0
_FIELD = "\x1f"


def wal_segment_name(timeline: int, lsn: int, segment_size: int) -> str:
    """The name of the WAL segment file holding byte ``lsn`` on ``timeline`` (as ``pg_walfile_name``)."""
    if segment_size <= 0 or segment_size & (segment_size - 1) or not 0 < timeline <= 0xFFFFFFFF:
        raise ValueError(f"no WAL segment for timeline {timeline} and segment size {segment_size}")
    segment = lsn // segment_size
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{segment // per_id:08X}{segment % per_id:08X}"


def wal_segments_between(timeline: int, start: int, stop: int, segment_size: int) -> list[str]:
    """The segment files a backup started at ``start`` and stopped at ``stop`` needs, in order.  A stop
    position at the very start of a segment needs nothing of that segment (the backup-end record lies
    before it: the server switched to a new segment after writing it)."""
    if stop < start:
        raise ValueError(f"a backup cannot stop ({format_lsn(stop)}) before it starts ({format_lsn(start)})")
    last = max(start, stop - 1) if stop % segment_size == 0 else stop
    first_seg, last_seg = start // segment_size, last // segment_size
    return [wal_segment_name(timeline, s * segment_size, segment_size) for s in range(first_seg, last_seg + 1)]


def label_field(label_file: str, name: str) -> str | None:
    """A field of a ``backup_label`` file (``START TIMELINE``, ``LABEL``, ...), or None."""
    prefix = f"{name}: "
    for line in label_file.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):]
    return None


#: The server's WAL segment size in bytes, whatever unit its version reports ``wal_segment_size`` in.
SEGMENT_SIZE_QUERY = ("SELECT setting::bigint * (CASE unit WHEN '8kB' THEN 8192 WHEN 'B' THEN 1 ELSE 1048576 END) "
                      "FROM pg_settings WHERE name = 'wal_segment_size'")


@dataclass(frozen=True)
class Tablespace:
    """A tablespace of the cluster (not ``pg_default`` or ``pg_global``): its ``location`` as
    ``pg_tablespace_location`` gives it, an absolute path (where ``pg_tblspc/<oid>`` leads), or for one made
    in place (``allow_in_place_tablespaces``) a path inside the data directory."""

    oid: int
    name: str
    location: str

    @property
    def outside(self) -> bool:
        """Whether its files lie outside the data directory (behind the link ``pg_tblspc/<oid>``)."""
        return os.path.isabs(self.location)


@dataclass
class BackupStart:
    """What the server said when the backup started."""

    start_lsn: int
    data_directory: str
    version: int  # server_version_num
    segment_size: int
    #: The cluster's tablespaces (``pg_default`` and ``pg_global`` aside), by oid, as they were just before the start.
    tablespaces: list[Tablespace] = field(default_factory=list)
    #: Whether the server is a standby (in recovery): the backup is one taken from a standby.
    standby: bool = False


@dataclass
class BackupStop:
    """What the server said when the backup stopped: the files to write beside the copy, and the WAL range."""

    stop_lsn: int
    label_file: str
    tablespace_map: str
    start_lsn: int
    timeline: int
    #: On a standby: the replay position once stopped, at or past ``stop_lsn``; the WAL up to it is
    #: flushed in ``pg_wal``, and taking it too makes the copy recover to it (what had been replayed).
    replay_lsn: int | None = None

    @property
    def wal_end(self) -> int:
        """Where the WAL the copy needs, and gets, ends."""
        return max(self.stop_lsn, self.replay_lsn or 0)

    def wal_segments(self, segment_size: int) -> list[str]:
        return wal_segments_between(self.timeline, self.start_lsn, self.wal_end, segment_size)


def password_aside(conninfo: str) -> tuple[str, str | None]:
    """``conninfo`` (a database name, ``key=value`` pairs or a ``postgresql://`` URI) without its password,
    and the password (None: none there).  psql gets the rest on its command line and the password as
    ``PGPASSWORD``: every user's process listing shows a command line, a process's environment only its own
    user and root see.  ``key=value`` pairs that do not parse, or that name the password in other letters,
    are refused (SourceCommandFailed): libpq refuses them too, but psql would have shown them whole."""
    if conninfo.startswith(("postgresql://", "postgres://")):
        return _uri_password_aside(conninfo)
    if "=" not in conninfo:
        return conninfo, None
    pairs = _conninfo_pairs(conninfo)
    if pairs is None:  # psql would refuse it, but only once every user's process listing had shown it whole
        raise SourceCommandFailed("PostgreSQL: the connection string does not parse (key=value settings, a value "
                                  "with spaces in single quotes): not shown, as it may hold a password")
    for k, _ in pairs:
        if k.lower() == "password" and k != "password":
            raise SourceCommandFailed(f'PostgreSQL: invalid connection option "{k}" (the password is "password")')
    if not any(k == "password" for k, _ in pairs):
        return conninfo, None
    password = [v for k, v in pairs if k == "password"][-1]
    rest = " ".join(f"{k}='{_quoted(v)}'" for k, v in pairs if k != "password")
    return rest, password


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _conninfo_pairs(text: str) -> list[tuple[str, str]] | None:
    """The ``key=value`` pairs of a libpq connection string, values unquoted; None when it does not parse."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and text[i] != "=" and not text[i].isspace():
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i == n or text[i] != "=":
            return None
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        quoted = i < n and text[i] == "'"
        i += quoted
        while i < n and (quoted or not text[i].isspace()):
            if text[i] == "\\":  # escapes the next character; one at the very end escapes nothing
                i += 1
                if i == n:
                    break
            elif quoted and text[i] == "'":
                break
            value.append(text[i])
            i += 1
        if quoted:
            if i == n:
                return None
            i += 1
        pairs.append((key, "".join(value)))


def _uri_password_aside(uri: str) -> tuple[str, str | None]:
    """A ``postgresql://`` URI without the password of its user part or its ``password=`` parameter."""
    from urllib.parse import unquote

    scheme, _, rest = uri.partition("://")
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    password = None
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        user, _, secret = userinfo.partition(":")
        password, authority = unquote(secret), f"{user}@{hosts}"
    params = query.split("&") if query else []  # the others as written: decoded and encoded again, some change
    given = [p.partition("=")[2] for p in params if p.partition("=")[0] == "password"]
    if given:
        password = unquote(given[-1])
        query = "&".join(p for p in params if p.partition("=")[0] != "password")
        qmark = "?" if query else ""
    return f"{scheme}://{authority}{slash}{path}{qmark}{query}{hash_}{fragment}", password


class PgBackupSession:
    """``psql`` holding one base backup open: ``start``, read the files, ``stop``; ``close`` (or leaving the
    ``with`` block) ends the session, which aborts a backup not stopped.

    ``dbname`` is a database name or a connection string (``host=... port=...`` or a ``postgresql://`` URI);
    the other connection settings come from ``env`` (``PGHOST``, ``PGPORT``, ``PGUSER``, ...) as psql reads
    them.  The role needs the right to run the backup functions and to make a replication slot (a
    superuser, or a role with REPLICATION granted EXECUTE on them).  ``standby_wait``: how many seconds
    each of a standby's waits may last before the backup fails (``SourceCommandFailed``)."""

    def __init__(self, dbname: str | None = None, *, psql: str = "psql", env: Mapping[str, str] | None = None,
                 standby_wait: float = STANDBY_WAIT):
        if not standby_wait > 0:
            raise UsageError(f"the standby wait is a number of seconds above 0, not {standby_wait!r}")
        self.standby_wait = standby_wait
        self._argv: list[str] = [psql, "-X", "-q", "-A", "-t", "-F", _FIELD, "-v", "ON_ERROR_STOP=1"]
        self._env = without_secrets(os.environ if env is None else env)  # psql needs none of our credentials
        if dbname:
            dbname, password = password_aside(dbname)
            self._argv += ["-d", dbname] if dbname else []
            if password is not None:
                self._env["PGPASSWORD"] = password
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._asked = False  # a statement sent whose answer was not read (a signal ended the wait)
        self._started: BackupStart | None = None
        #: How long one statement's answer may take (None: as long as it takes, as a backup's start waits for
        #: a checkpoint); past it the statement is cancelled, psql ended and SourceCommandFailed raised (killed,
        #: psql would leave the statement running on the server: one that waits for a lock holds it on).
        self.answer_wait: float | None = None

    def open(self) -> None:
        if self._proc is not None:
            return
        self._asked = False
        try:
            self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=self._env)
        except OSError as exc:
            raise SourceCommandFailed(f"cannot run `{self._argv[0]}` to reach PostgreSQL: "
                                      f"{exc.strerror or exc}") from None

    def query(self, sql: str) -> list[list[str]]:
        """The rows of one statement's answer, each a list of its columns' text."""
        self.open()
        assert self._proc is not None and self._proc.stdin is not None
        marker = f"--chunkvault-{secrets.token_hex(8)}--"
        try:
            self._proc.stdin.write(f"{sql.rstrip().rstrip(';')};\n\\echo {marker}\n".encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._failed()
        self._asked = True
        lines = self._read_until(marker.encode())
        self._asked = False
        return [line.split(_FIELD) for line in lines]

    def _read_until(self, marker: bytes) -> list[str]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = None if self.answer_wait is None else time.monotonic() + self.answer_wait
        while True:
            end = self._buffer.find(marker + b"\n")
            if end >= 0 and (end == 0 or self._buffer[end - 1:end] == b"\n"):
                out, self._buffer = self._buffer[:end], self._buffer[end + len(marker) + 1:]
                return [line for line in out.decode("utf-8", "replace").split("\n") if line]
            while not select.select([fd], [], [], 0.5)[0]:  # in slices: a signal gets handled meanwhile
                if deadline is not None and time.monotonic() > deadline:  # psql cancels the statement as it ends
                    self.close(CANCEL_WAIT)
                    raise SourceCommandFailed(f"PostgreSQL did not answer within {self.answer_wait:g} s (a server "
                                              "that hangs, or a lock the statement waits for)")
            data = os.read(fd, 65536)
            if not data:
                self._failed()
            self._buffer += data

    def _failed(self) -> None:
        """psql ended: the connection failed or the statement did (ON_ERROR_STOP); raise what it said."""
        assert self._proc is not None and self._proc.stderr is not None
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        said = self._proc.stderr.read().decode("utf-8", "replace")
        lines = [ln.strip() for ln in said.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "ERROR:" in ln or "FATAL:" in ln or "error:" in ln]
        reason = (errors or lines or [f"psql {process_end(self._proc.returncode)}"])[0]
        self._proc = None
        raise SourceCommandFailed(f"PostgreSQL: {reason}")

    def value(self, sql: str) -> str:
        """The one value of a one-row, one-column answer."""
        rows = self.query(sql)
        if len(rows) != 1 or len(rows[0]) != 1:
            raise SourceCommandFailed(f"PostgreSQL answered {sql!r} with {len(rows)} rows, not one value")
        return rows[0][0]

    def start(self, label: str, *, fast: bool = True, slot: bool = True,
              accept: Callable[[str], None] | None = None) -> BackupStart:
        """Start the backup (``fast``: an immediate checkpoint, not a spread one) after taking a temporary
        replication slot that keeps the WAL from here on (``slot``).  ``accept`` is called with the server's
        data directory before either, and may refuse it (raise): refused after the start, the server would
        have made its checkpoint (an immediate one, or a wait for a spread one) for nothing."""
        if self._started is not None:
            raise UsageError("this session has started a backup already")
        if "\n" in label or len(label) > 1023:
            raise UsageError("a backup label is one line of at most 1023 characters")
        version = int(self.value("SELECT current_setting('server_version_num')"))
        if version < OLDEST_VERSION:
            raise SourceCommandFailed(f"PostgreSQL {version // 10000}.{version // 100 % 100} is too old for a "
                                      "base backup by chunkvault (10 or newer)")
        try:
            data_directory = self.value("SELECT current_setting('data_directory')")
        except SourceCommandFailed as exc:  # a role with REPLICATION and EXECUTE but no settings to read
            if "pg_read_all_settings" not in str(exc):
                raise
            raise SourceCommandFailed(f"{exc} (the backup checks the server's data directory is the one it reads: "
                                      "GRANT pg_read_all_settings TO the role)") from None
        if accept is not None:
            accept(data_directory)
        standby = self.value("SELECT pg_is_in_recovery()") == "t"
        if standby:
            self._standby_ready()
        segment_size = int(self.value(SEGMENT_SIZE_QUERY))
        tablespaces = self.tablespaces()
        if slot:
            name = f"chunkvault_{os.getpid()}_{secrets.token_hex(4)}"
            self.query(f"SELECT pg_create_physical_replication_slot('{name}', true, true)")
        quoted = label.replace("'", "''")
        fast_sql = "true" if fast else "false"
        if version >= RENAMED_IN:
            lsn = self.value(f"SELECT pg_backup_start('{quoted}', {fast_sql})")
        else:
            lsn = self.value(f"SELECT pg_start_backup('{quoted}', {fast_sql}, false)")
        self._started = BackupStart(parse_lsn(lsn), data_directory, version, segment_size, tablespaces, standby)
        return self._started

    def tablespaces(self) -> list[Tablespace]:
        """The cluster's tablespaces now, by oid (names and locations travel in base64: either may hold
        a line break)."""
        def text(column: str) -> str:
            return f"translate(encode(convert_to({column}, 'UTF8'), 'base64'), E'\\n', '')"

        rows = self.query(f"SELECT oid, {text('spcname::text')}, {text('pg_tablespace_location(oid)')} "
                          "FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY oid")
        try:
            return [Tablespace(int(oid), base64.b64decode(name).decode(), base64.b64decode(loc).decode())
                    for oid, name, loc in rows]
        except ValueError:
            raise SourceCommandFailed(f"PostgreSQL answered the list of tablespaces with {rows!r}") from None

    def _standby_ready(self) -> None:
        """Refuse a standby whose replay is paused (its copy would stop at the pause, however long the backup),
        and wait, up to ``standby_wait``, for its WAL receiver to stream from the primary: one that does not
        (the primary gone, or WAL only from an archive, which never lands in ``pg_wal``) is refused."""
        self._refuse_paused()
        deadline = time.monotonic() + self.standby_wait
        while True:
            # status is NULL for a role without pg_read_all_stats: a receiver running is then all there is
            rows = self.query("SELECT coalesce(status, 'running') FROM pg_stat_wal_receiver WHERE pid IS NOT NULL")
            if rows and rows[0][0] in ("streaming", "running"):
                return
            if time.monotonic() >= deadline:
                raise SourceCommandFailed(f"PostgreSQL is a standby that has not streamed from a primary for "
                                          f"{self.standby_wait:g} s (no WAL receiver streaming: the primary gone, or "
                                          "primary_conninfo unset): its copy would miss what the primary wrote")
            time.sleep(min(0.2, self.standby_wait / 10))

    def _refuse_paused(self) -> None:
        if self.value("SELECT pg_is_wal_replay_paused()") == "t":
            raise SourceCommandFailed("PostgreSQL is a standby whose replay is paused (pg_wal_replay_pause): "
                                      "resume it with SELECT pg_wal_replay_resume() to back it up")

    def _catch_up(self) -> None:
        """Wait, up to ``standby_wait``, for the standby to replay what it has received (from the primary,
        while the files were read), so the copy, which recovers to the replay position, holds it."""
        received = self.value("SELECT coalesce(pg_last_wal_receive_lsn()::text, '')")
        if not received:
            return
        target = parse_lsn(received)
        deadline = time.monotonic() + self.standby_wait
        while parse_lsn(self.value("SELECT pg_last_wal_replay_lsn()")) < target:
            self._refuse_paused()
            if time.monotonic() >= deadline:
                delay = self.value("SELECT current_setting('recovery_min_apply_delay')")
                why = (f" (it applies WAL {delay} late: recovery_min_apply_delay; --pg-standby-wait longer than "
                       "that, or a standby without the delay)" if delay not in ("0", "0ms", "") else "")
                raise SourceCommandFailed(f"PostgreSQL is a standby that did not replay up to {format_lsn(target)}, "
                                          f"the WAL it had received, within {self.standby_wait:g} s{why}")
            time.sleep(min(0.1, self.standby_wait / 10))

    def stop(self) -> BackupStop:
        """Stop the backup; a primary switches to a new WAL segment, so the last one needed is complete; a
        standby first replays what it received (a bounded wait), then stops at its minimum recovery point.
        Archived WAL is not waited for: the needed segments are read from ``pg_wal``, which the slot kept."""
        if self._started is None:
            raise UsageError("no backup was started in this session")
        standby = self._started.standby
        if standby:
            self._catch_up()
        function = "pg_backup_stop(false)" if self._started.version >= RENAMED_IN else "pg_stop_backup(false, false)"
        rows = self.query("SELECT lsn, translate(encode(convert_to(labelfile, 'UTF8'), 'base64'), E'\\n', ''), "
                          "translate(encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'base64'), E'\\n', '') "
                          f"FROM {function}")
        if len(rows) != 1 or len(rows[0]) != 3:
            raise SourceCommandFailed(f"PostgreSQL answered {function} with {rows!r}")
        lsn, label_b64, map_b64 = rows[0]
        label_file = base64.b64decode(label_b64).decode()
        timeline = label_field(label_file, "START TIMELINE")
        start = label_field(label_file, "START WAL LOCATION")
        if timeline is None or start is None:
            raise SourceCommandFailed("PostgreSQL's backup label lacks its start timeline or WAL location")
        replay = None
        if standby:
            # The stop is the minimum recovery point on the stop's timeline: one other than the start's means
            # the standby followed a promoted primary meanwhile, and the WAL would span two timelines.
            replay_text, stop_timeline = self.query(
                "SELECT pg_last_wal_replay_lsn(), min_recovery_end_timeline FROM pg_control_recovery()")[0]
            if int(stop_timeline) not in (0, int(timeline)):  # 0: no minimum recovery point recorded
                raise SourceCommandFailed(f"PostgreSQL's standby moved from timeline {timeline} to {stop_timeline} "
                                          "during the backup: take it again")
            replay = parse_lsn(replay_text)
        self._started = None
        return BackupStop(parse_lsn(lsn), label_file, base64.b64decode(map_b64).decode(),
                          parse_lsn(start.split()[0]), int(timeline), replay)

    def close(self, wait: float = 10.0) -> None:
        """End the session: a backup not stopped is aborted by the server, the slot dropped.  psql is given
        ``wait`` seconds to end on its own (having cancelled a statement that runs) before it is terminated."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        if self._asked:  # psql reads no more input until it has the answer: have it cancel the statement
            self._asked = False
            try:
                proc.send_signal(signal.SIGINT)
            except OSError:
                pass
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._started = None

    def __enter__(self) -> "PgBackupSession":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__: Sequence[str] = ("PgBackupSession", "STANDBY_WAIT", "BackupStart", "BackupStop", "Tablespace", "parse_lsn",
                          "format_lsn", "wal_segment_name", "wal_segments_between", "label_field")
