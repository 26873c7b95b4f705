"""``archive-check``: prove that a running PostgreSQL's WAL reaches the repository, as pgBackRest's ``check``.

An ``archive_command`` that fails (a wrong path, a password file the server's user cannot read, a full
disk) is otherwise found at the restore that needs its WAL.  The check reads the server's archiving
settings and archiver statistics, refuses a server that does not archive, writes a restore point (so the
switch that follows always has WAL to close: ``pg_switch_wal`` on a server that wrote nothing since its
last switch does nothing, and names the segment switched before), switches to a new segment, and waits
until the segment closed is archived in the repository and its object opens.  What it waits for is told
apart from what it does (``wait_archived`` takes the two probes as functions), so the waiting and the
messages are tested without a server.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

from chunkvault.errors import ArchiveCheckFailed, ChunkvaultWarning, SourceCommandFailed, UsageError

from .pgsession import PgBackupSession

#: How long ``archive-check`` waits for the segment by default, in seconds.
DEFAULT_TIMEOUT = 60.0
#: The restore point written before the switch (its name is in the server's WAL, as pgBackRest's is).
RESTORE_POINT = "chunkvault archive-check"
#: The first pause between two looks at the repository, and the longest (each look is one small read).
FIRST_POLL, LONGEST_POLL = 0.2, 2.0


class ArchiveCommandWarning(ChunkvaultWarning):
    """The server archives, but its ``archive_command`` does not look like chunkvault's ``archive-push``."""


class ArchiverGoneWarning(ChunkvaultWarning):
    """The segment reached the repository, but the server (stopped or restarted meanwhile) could not be asked
    for its archiver's statistics again: those of the result are from before the switch."""


def _iso(column: str) -> str:
    """A timestamp column as ISO 8601 in UTC, or '' for NULL."""
    return f"coalesce(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), '')"


#: The settings and the archiver's statistics, one row.  ``failing``: a failure since the last success.
#: ``archive_library`` (PostgreSQL 15 and later; '' before) archives in place of ``archive_command`` when set.
STATUS_SQL = (
    "SELECT current_setting('archive_mode'), current_setting('archive_command'), pg_is_in_recovery(), "
    "coalesce(last_archived_wal, ''), " + _iso("last_archived_time") + ", coalesce(last_failed_wal, ''), "
    + _iso("last_failed_time") + ", archived_count, failed_count, "
    "coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false), "
    "coalesce(current_setting('archive_library', true), '') FROM pg_stat_archiver")


#: A setting in a shell command that may carry a secret: an environment assignment or an option whose name
#: says password, secret, token or key, and its value (quoted or not).
_SECRET_SETTING = re.compile(r"(?i)\b([\w.-]*(?:passw(?:or)?d|secret|token|key)[\w.-]*)(=|\s+)('[^']*'|\"[^\"]*\"|\S+)")


def redacted(command: str) -> str:
    """``command`` as messages and ``--json`` show it: the values of settings that may be secrets (an inline
    ``PGPASSWORD=...``, ``AWS_SECRET_ACCESS_KEY=...``) replaced; files and commands that hold them shown."""
    def hide(m: re.Match[str]) -> str:
        if m.group(1).lower().endswith(("file", "command", "path")):
            return m.group(0)
        return f"{m.group(1)}{m.group(2)}***"

    return _SECRET_SETTING.sub(hide, command)


@dataclass
class ArchiverStatus:
    """What the server says of its archiving: its settings and ``pg_stat_archiver`` (None where it has nothing)."""

    archive_mode: str
    archive_command: str
    standby: bool
    last_archived_wal: str | None = None
    last_archived_time: str | None = None
    last_failed_wal: str | None = None
    last_failed_time: str | None = None
    archived_count: int = 0
    failed_count: int = 0
    #: The last attempt failed: no file was archived since the last failure.
    failing: bool = False
    #: The archive library PostgreSQL 15 and later archive through instead of ``archive_command`` ('' for none).
    archive_library: str = ""

    @classmethod
    def from_row(cls, row: list[str]) -> "ArchiverStatus":
        if len(row) != 11:
            raise SourceCommandFailed(f"PostgreSQL answered the archiver's status with {row!r}")
        mode, command, standby, last_wal, last_time, failed_wal, failed_time, archived, failed, failing, lib = row
        return cls(mode, redacted(command), standby == "t", last_wal or None, last_time or None, failed_wal or None,
                   failed_time or None, int(archived), int(failed), failing == "t", lib.strip())

    @property
    def archiver_setting(self) -> str:
        """What archives, as the server's setting says it: its ``archive_library`` where one is set (the
        ``archive_command`` is then not run), else its ``archive_command``."""
        if self.archive_library:
            return f"archive_library ({self.archive_library})"
        return f"archive_command ({self.archive_command})"

    def archiver(self) -> dict:
        return {"last_archived_wal": self.last_archived_wal, "last_archived_time": self.last_archived_time,
                "last_failed_wal": self.last_failed_wal, "last_failed_time": self.last_failed_time,
                "archived_count": self.archived_count, "failed_count": self.failed_count, "failing": self.failing}


@dataclass
class ArchiveCheck:
    """The outcome: the segment switched to and waited for, how long it took to reach the repository, and the
    server's settings and archiver statistics as last read.  ``error``: why the check failed (else None)."""

    segment: str | None
    waited: float
    status: ArchiverStatus | None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        s = self.status
        return {"ok": self.ok, "segment": self.segment, "waited": round(self.waited, 3),
                "archive_mode": s.archive_mode if s else None, "archive_command": s.archive_command if s else None,
                "archive_library": s.archive_library if s else None,
                "standby": s.standby if s else None, "archiver": s.archiver() if s else None,
                "warnings": list(self.warnings), "error": self.error}


def refusal(status: ArchiverStatus) -> str | None:
    """Why a server with these settings cannot archive anything a check could wait for (None: it can)."""
    if status.archive_mode == "off":
        return ("PostgreSQL does not archive its WAL (archive_mode = off): set archive_mode = on and "
                "archive_command to chunkvault's archive-push, then restart it")
    if status.archive_library:
        return None
    if not status.archive_command.strip() or status.archive_command.strip() == "(disabled)":
        return (f"PostgreSQL archives nothing: archive_mode = {status.archive_mode} but archive_command is empty "
                "(it keeps its WAL until one is set: set it to chunkvault's archive-push and reload it)")
    return None


def command_warnings(status: ArchiverStatus) -> list[str]:
    """What looks wrong in settings that do archive: a command that is not chunkvault's push, or an archive
    library, which archives in the command's place."""
    if status.archive_library:
        return [f"PostgreSQL archives through archive_library = {status.archive_library}, not its archive_command "
                "(it runs no command while a library is set): the check passes only if what the library does "
                "reaches this repository; to archive with chunkvault archive-push, set archive_library = ''"]
    if "archive-push" in status.archive_command:
        return []
    return [f"PostgreSQL's archive_command ({status.archive_command}) does not run chunkvault archive-push: "
            "the check passes only if what it does reaches this repository"]


def standby_refusal(status: ArchiverStatus) -> str | None:
    """A standby cannot switch WAL; one that does not archive (``archive_mode`` other than ``always``) has
    nothing to wait for either."""
    if not status.standby:
        return None
    if status.archive_mode != "always":
        return ("PostgreSQL is a standby, which archives nothing unless archive_mode = always: run archive-check "
                "against the primary")
    return ("PostgreSQL is a standby (archive_mode = always), where no WAL segment can be switched to: run "
            "archive-check against the primary, whose switch this standby receives and archives too")


def timeout_message(segment: str, timeout: float, status: ArchiverStatus) -> str:
    """Why ``segment`` is not in the repository after ``timeout`` seconds, as the server's statistics tell it."""
    head = f"{segment} did not reach the repository within {timeout:g} s"
    if status.failing:
        since = (f"since its last success at {status.last_archived_time} ({status.last_archived_wal})"
                 if status.last_archived_time else "with no success since its statistics were reset")
        setting = "archive_library" if status.archive_library else "archive_command"
        return (f"{head}: PostgreSQL's {setting} has been failing {since}, {status.failed_count} failures, "
                f"the last at {status.last_failed_time} for {status.last_failed_wal}: see its log")
    if status.last_archived_wal is not None and _same_timeline_at_or_after(status.last_archived_wal, segment):
        return (f"{head}, though PostgreSQL archived it at {status.last_archived_time}: its "
                f"{status.archiver_setting} stores the WAL elsewhere (another repository?)")
    last = (f"last archived {status.last_archived_wal} at {status.last_archived_time}"
            if status.last_archived_wal else "has archived nothing since its statistics were reset")
    return (f"{head}: PostgreSQL's archiver reports no failure and {last} (behind on its WAL? an archive_command "
            "that hangs? see its log)")


def _same_timeline_at_or_after(name: str, segment: str) -> bool:
    """``name`` (a file the server archived) is ``segment`` or a later segment of its timeline."""
    return len(name) >= 24 and name[:8] == segment[:8] and name[:24] >= segment


def wait_archived(segment: str, timeout: float, archived: Callable[[str], bool], *,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> tuple[bool, float]:
    """Look for ``segment`` in the repository (``archived``), each pause longer up to ``LONGEST_POLL``, until it
    is there or ``timeout`` seconds pass: whether it came, and after how long.  The whole timeout is waited
    even when the server reports failures meanwhile: PostgreSQL tries a failed file again, and one that
    succeeds on a later try is what an operator wants to know has happened."""
    start = clock()
    pause = FIRST_POLL
    while True:
        if archived(segment):
            return True, clock() - start
        left = timeout - (clock() - start)
        if left <= 0:
            return False, clock() - start
        sleep(min(pause, left))
        pause = min(pause * 1.5, LONGEST_POLL)


def switched_segment(session: PgBackupSession) -> str:
    """Write a restore point, switch to a new WAL segment, and name the one closed (the restore point's)."""
    try:
        session.query(f"SELECT pg_create_restore_point('{RESTORE_POINT}')")
        return session.value("SELECT pg_walfile_name(pg_switch_wal())")
    except SourceCommandFailed as exc:
        if "permission denied" not in str(exc):
            raise
        raise exc.explained(" (archive-check writes a restore point and switches the WAL: connect as a superuser, "
                            "or GRANT EXECUTE ON FUNCTION pg_create_restore_point, pg_switch_wal TO the role)")


def archive_check(session: PgBackupSession, archived: Callable[[str], bool], timeout: float = DEFAULT_TIMEOUT,
                  *, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> ArchiveCheck:
    """Run the check through ``session``, looking for the segment with ``archived``; ArchiveCheckFailed (its
    ``partial`` the ArchiveCheck) when the server does not archive or the segment does not come in time."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e9:
        raise UsageError(f"the timeout is a number of seconds above 0, not {timeout!r}")
    session.answer_wait = float(timeout)  # a server that hangs ends the check too

    def read() -> ArchiverStatus:
        rows = session.query(STATUS_SQL)
        if len(rows) != 1:
            raise SourceCommandFailed(f"PostgreSQL answered the archiver's status with {len(rows)} rows")
        return ArchiverStatus.from_row(rows[0])

    status = read()
    refused = standby_refusal(status)
    if refused is not None:
        raise UsageError(refused)
    why = refusal(status)
    result = ArchiveCheck(None, 0.0, status)
    if why is not None:
        result.error = why
        raise _failed(why, result)
    for w in command_warnings(status):
        warnings.warn(w, ArchiveCommandWarning, stacklevel=3)
        result.warnings.append(w)
    result.segment = switched_segment(session)
    came, result.waited = wait_archived(result.segment, float(timeout), archived, clock=clock, sleep=sleep)
    try:
        result.status = read()
    except SourceCommandFailed as exc:  # stopped or restarted meanwhile: whether the segment came is the answer
        gone = f"PostgreSQL's archiver statistics could not be read again ({exc})"
        if not came:
            result.error = f"{result.segment} did not reach the repository within {float(timeout):g} s, and {gone}"
            raise _failed(result.error, result) from None
        w = f"{gone}: those shown are from before the switch"
        warnings.warn(w, ArchiverGoneWarning, stacklevel=3)
        result.warnings.append(w)
    if not came:
        result.error = timeout_message(result.segment, float(timeout), result.status)
        raise _failed(result.error, result)
    return result


def _failed(message: str, result: ArchiveCheck) -> ArchiveCheckFailed:
    error = ArchiveCheckFailed(message)
    error.partial = result
    return error


def session_for(pg_connect: str | None, env: Mapping[str, str] | None = None, psql: str = "psql") -> PgBackupSession:
    """The psql session a check runs in (``pg_connect``: a connection string or database name; None or "": the
    ``PG*`` variables)."""
    if pg_connect is not None and (not isinstance(pg_connect, str) or "\n" in pg_connect):
        raise UsageError(f"pg_connect is a connection string or database name, not {pg_connect!r}")
    return PgBackupSession(pg_connect or None, psql=psql, env=env)
