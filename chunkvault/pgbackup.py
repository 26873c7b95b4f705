"""A backup of a running PostgreSQL cluster's data directory, read in place (``backup --postgres``).

The walk reads the live directory between ``pg_backup_start`` and
``pg_backup_stop`` (``pgsession``), leaving out what PostgreSQL's own base
backups leave out; then the label the stop returns is added as
``backup_label`` (and ``tablespace_map``), with the WAL segments from the
start to the stop position into ``pg_wal/``.  The snapshot then restores to a
data directory that starts on its own and recovers to the moment of the stop,
as a ``pg_basebackup -X fetch`` copy does, without that copy's second pass
over the data and its room on disk.
"""
from __future__ import annotations

import functools
import io
import os
import re
import socket
import stat
import time

from chunkvault.errors import SourceCommandFailed, UsageError

from .pgpages import FilePages, PageChecks
from .pgsession import STANDBY_WAIT, BackupStart, PgBackupSession, format_lsn
from .store.backup import AddedFile

#: Directories whose contents a base backup leaves out (rebuilt at startup; ``pg_wal`` gets what it needs).
EMPTIED = ("pg_wal", "pg_dynshmem", "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots", "pg_stat_tmp",
           "pg_subtrans")
#: What a base backup leaves out, as PostgreSQL's own (``pg_basebackup``) does: the server's run files, a
#: label or map from an earlier backup, and what lies in those directories.
EXCLUDES = [
    "postmaster.pid", "postmaster.opts", "backup_label", "backup_label.old", "tablespace_map", "backup_manifest",
    "standby.signal", "recovery.signal", "postgresql.auto.conf.tmp", "current_logfiles.tmp", "pg_internal.init",
    "pgsql_tmp*", *(f"{d}/*" for d in EMPTIED),
]


#: The control file, read last (after every other file, before the stop), as ``pg_basebackup`` sends it: a copy
#: taken from a standby becomes consistent at the minimum recovery point it records, which must then be past
#: every page read.
CONTROL_FILE = b"global/pg_control"

#: A relation's file in a database directory: its OID, its fork (none: the main fork), its segment.
_RELATION = re.compile(rb"(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?")
#: A temporary relation's file (``t<backend>_<oid>``, a fork, a segment): gone at the server's next start.
_TEMPORARY = re.compile(rb"t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?")


def is_database_directory(below: bytes) -> bool:
    """Whether the directory at ``below`` (under the data directory) holds a database's relations:
    ``base/OID``, or ``pg_tblspc/OID/PG_.../OID`` (a tablespace's)."""
    parts = below.split(b"/")
    if len(parts) == 2:
        return parts[0] == b"base" and parts[1].isdigit()
    return (len(parts) == 4 and parts[0] == b"pg_tblspc" and parts[1].isdigit() and parts[2].startswith(b"PG_")
            and parts[3].isdigit())


def unlogged_and_temporary(names: list[bytes]) -> set[bytes]:
    """The files of a database directory a base backup leaves out, as ``pg_basebackup`` does: every fork of
    an unlogged relation but its init fork (a relation ``N`` beside an ``N_init``: its main fork ``N``,
    segments ``N.1``..., ``N_fsm``, ``N_vm``), which the server, recovered, copies over the main fork; and
    temporary relations' files, which it removes at its start."""
    relations = [(name, m.group(1), m.group(2)) for name in names if (m := _RELATION.fullmatch(name))]
    unlogged = {oid for _, oid, fork in relations if fork == b"init"}
    out = {name for name, oid, fork in relations if oid in unlogged and fork != b"init"}
    return out | {name for name in names if _TEMPORARY.fullmatch(name)}


#: ``backup --pg-checkpoint``: the checkpoint ``pg_backup_start`` waits for, as ``pg_basebackup -c`` takes it.
CHECKPOINTS = ("fast", "spread")


def checkpoint_fast(value: object) -> bool:
    """Whether the ``pg_checkpoint`` option asks for an immediate checkpoint (None: the default, fast)."""
    if value is None:
        return True
    if value not in CHECKPOINTS:
        raise UsageError(f"pg_checkpoint is 'fast' or 'spread', not {value!r}")
    return value == "fast"


class PostgresOnline:
    """The ``SourceSession`` of a backup of the data directory ``datadir`` of the cluster that ``dbname``
    (a database name or connection string; else the ``PG*`` variables) reaches through ``psql``."""

    def __init__(self, datadir: str, dbname: str | None = None, *, psql: str = "psql", fast: bool = True,
                 label: str | None = None, standby_wait: float = STANDBY_WAIT):
        self.datadir = os.path.abspath(datadir)
        self.fast = fast
        self.label = label or f"chunkvault {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        self._session = PgBackupSession(dbname, psql=psql, standby_wait=standby_wait)
        self._started: BackupStart | None = None
        self._pages: PageChecks | None = None
        self.notes: list[str] = []

    def begin(self) -> None:
        started = self._session.start(self.label, fast=self.fast)
        self._started = started
        try:
            same = os.path.samefile(started.data_directory, self.datadir)
        except OSError:
            same = False
        if not same:
            raise UsageError(f"the PostgreSQL server reached has its data directory at {started.data_directory}, "
                             f"not {self.datadir}: back up that directory, on that server's machine")
        if started.tablespaces:
            where = ", ".join(loc for _, loc in started.tablespaces)
            raise UsageError(f"the cluster has tablespaces outside its data directory ({where}): --postgres "
                             "reads the data directory alone; use pg_basebackup for such a cluster")
        self._pages = self._page_checks(started)

    def _page_checks(self, started: BackupStart) -> PageChecks | None:
        """The checking of this backup's pages, where the cluster has data checksums (``initdb -k``)."""
        row = self._session.query("SELECT current_setting('data_checksums'), current_setting('block_size'), "
                                  "(SELECT setting FROM pg_settings WHERE name = 'segment_size')")
        if len(row) != 1 or len(row[0]) != 3 or not row[0][1].isdigit() or not row[0][2].isdigit():
            raise SourceCommandFailed(f"PostgreSQL answered its page settings with {row!r}")
        enabled, block_size, segment_blocks = row[0]
        if enabled != "on":
            return None
        return PageChecks(self.datadir, int(block_size), int(segment_blocks), started.start_lsn)

    def inspector(self, rel: bytes) -> FilePages | None:
        """The page checking of a relation's file (``SourceSession.inspector``)."""
        return self._pages.for_file(rel) if self._pages is not None else None

    def leave_out(self, below: bytes, names: list[bytes]) -> set[bytes]:
        """What the walk leaves out of the directory at ``below`` (``SourceWalk``'s ``leave_out``): unlogged
        and temporary relations' files, in a database directory; the control file, which ``appendix`` reads."""
        if below == os.path.dirname(CONTROL_FILE):
            return {os.path.basename(CONTROL_FILE)}
        return unlogged_and_temporary(names) if is_database_directory(below) else set()

    def _control_file(self) -> AddedFile:
        path = os.path.join(self.datadir, CONTROL_FILE.decode())
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                content = f.read()
        except OSError as exc:
            raise SourceCommandFailed(f"cannot read {path}: {exc.strerror or exc}: no snapshot saved") from None
        return AddedFile(CONTROL_FILE, functools.partial(io.BytesIO, content), stat.S_IMODE(st.st_mode), st.st_uid,
                         st.st_gid, st.st_mtime_ns)

    def appendix(self) -> tuple[list[AddedFile], dict]:
        assert self._started is not None
        control = self._control_file()
        stopped = self._session.stop()
        st = os.stat(self.datadir)
        now = time.time_ns()
        added = [control, AddedFile(b"backup_label", functools.partial(io.BytesIO, stopped.label_file.encode()), 0o600,
                           st.st_uid, st.st_gid, now)]
        if stopped.tablespace_map:
            added.append(AddedFile(b"tablespace_map", functools.partial(io.BytesIO, stopped.tablespace_map.encode()),
                                   0o600, st.st_uid, st.st_gid, now))
        for name in EMPTIED:  # one on another disk (initdb --waldir): a directory here, as pg_basebackup makes it
            path = os.path.join(self.datadir, name)
            if os.path.islink(path):
                d = os.stat(path)
                added.append(AddedFile(name.encode(), None, stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid,
                                       d.st_mtime_ns))
        wal = os.path.join(self.datadir, "pg_wal")
        # On a standby the last segment may be the one its WAL receiver is writing: what the copy needs of it
        # ends at the replay position, replayed hence flushed; what follows is cut off mid-record or is an
        # older segment's content, either of which recovery takes as the end of the WAL.
        segments = stopped.wal_segments(self._started.segment_size)
        histories = sorted(n for n in os.listdir(wal) if n.endswith(".history"))
        for name in histories + segments:
            path = os.path.join(wal, name)
            try:
                seg = os.stat(path)
            except FileNotFoundError:
                raise SourceCommandFailed(f"WAL segment {name}, which the backup needs, is gone from {wal}: "
                                          "no snapshot saved") from None
            if not stat.S_ISREG(seg.st_mode):
                raise SourceCommandFailed(f"{path} is not a regular file: no snapshot saved")
            added.append(AddedFile(f"pg_wal/{name}".encode(), functools.partial(open, path, "rb"),
                                   stat.S_IMODE(seg.st_mode), seg.st_uid, seg.st_gid, seg.st_mtime_ns))
        info = {"label": self.label, "start_lsn": format_lsn(stopped.start_lsn),
                "stop_lsn": format_lsn(stopped.wal_end), "timeline": stopped.timeline, "start_wal": segments[0],
                "wal": segments, "server_version": self._started.version, "standby": self._started.standby,
                "page_checksums": self._pages.to_dict() if self._pages is not None else None}
        if self._pages is not None:
            self.notes += self._pages.warnings()
        return added, {"postgres": info}

    def close(self) -> None:
        self._session.close()
