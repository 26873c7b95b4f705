"""A backup of a running PostgreSQL cluster's data directory, read in place (``backup --postgres``).

The walk reads the live directory between ``pg_backup_start`` and
``pg_backup_stop`` (``pgsession``), leaving out what PostgreSQL's own base
backups leave out; then the label the stop returns is added as
``backup_label``, with the WAL segments from the start to the stop position
into ``pg_wal/``.  The snapshot then restores to a data directory that starts
on its own and recovers to the moment of the stop, as a ``pg_basebackup -X
fetch`` copy does, without that copy's second pass over the data and its room
on disk.

Tablespaces outside the data directory are read in the same walk, into the
data directory's tree: each one's current version directory
(``PG_<major>_<catversion>``, not those pg_upgrade left beside it) under
``chunkvault_tblspc/<oid>/``, and its link ``pg_tblspc/<oid>`` recorded as
the relative link ``../chunkvault_tblspc/<oid>``.  A plain restore is then one
self-contained data directory that starts; a restore may put each tablespace
elsewhere instead, with the link leading there (``pgtablespace``).  A
directory in place of the link would be simpler, but recovery from a base
backup refuses one (PostgreSQL 15 stops, once consistent, on any
``pg_tblspc`` entry that is not a link, unless ``allow_in_place_tablespaces``
is set).  A tablespace whose location lies inside the data directory is read
where it lies, its link made relative likewise.  The ``tablespace_map``
``pg_backup_stop`` returns is not stored: a server that finds one beside
``backup_label`` removes each ``pg_tblspc/<oid>`` and links it to the
location the live cluster had (a restored copy would write into the live
cluster's tablespaces).  A tablespace created or dropped while the backup
runs fails it: its record lies in the WAL the copy replays, and replaying a
creation links (and writes) the live location.
"""
from __future__ import annotations

import functools
import io
import os
import re
import socket
import stat
import struct
import time

from chunkvault.errors import SourceCommandFailed, UsageError

from .pgpages import FilePages, PageChecks
from .pgpaths import RELATION, TABLESPACES, TEMPORARY, is_database_directory
from .pgsession import STANDBY_WAIT, BackupStart, PgBackupSession, Tablespace, format_lsn
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

def unlogged_and_temporary(names: list[bytes]) -> set[bytes]:
    """The files of a database directory a base backup leaves out, as ``pg_basebackup`` does: every fork of
    an unlogged relation but its init fork (a relation ``N`` beside an ``N_init``: its main fork ``N``,
    segments ``N.1``..., ``N_fsm``, ``N_vm``), which the server, recovered, copies over the main fork; and
    temporary relations' files, which it removes at its start."""
    relations = [(name, m.group(1), m.group(2)) for name in names if (m := RELATION.fullmatch(name))]
    unlogged = {oid for _, oid, fork in relations if fork == b"init"}
    out = {name for name, oid, fork in relations if oid in unlogged and fork != b"init"}
    return out | {name for name in names if TEMPORARY.fullmatch(name)}


#: A tablespace's directory in the tree, ``chunkvault_tblspc/<oid>``.
_GRAFTED = re.compile(re.escape(TABLESPACES) + rb"/(\d+)")


def version_directory(version: int, catalog_version: int) -> bytes:
    """The directory of a tablespace's location that a server of ``version`` (``server_version_num``, 10 or
    newer) and catalog version uses (``TABLESPACE_VERSION_DIRECTORY``); pg_upgrade leaves the old one beside."""
    return b"PG_%d_%d" % (version // 10000, catalog_version)


def catalog_version(datadir: str) -> int:
    """The catalog version ``global/pg_control`` records (after the system identifier and the control
    file's version, in the machine's byte order, as the server writes it)."""
    path = os.path.join(datadir, CONTROL_FILE.decode())
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise SourceCommandFailed(f"cannot read {path}: {exc.strerror or exc}: no snapshot saved") from None
    if len(head) < 16:
        raise SourceCommandFailed(f"{path} is cut short: no snapshot saved")
    return struct.unpack("=QII", head)[2]


def tablespaces_json(tablespaces: list[Tablespace]) -> list[dict]:
    """``stats.postgres.tablespaces``: each tablespace's oid, name and location at backup time."""
    return [{"oid": t.oid, "name": t.name, "location": t.location} for t in tablespaces]


def changed_tablespaces(before: list[Tablespace], after: list[Tablespace]) -> str | None:
    """What differs between the tablespaces at the start and at the stop, in words (None: nothing)."""
    old, new = {t.oid: t for t in before}, {t.oid: t for t in after}
    parts = [*(f"{t.name} created" for oid, t in new.items() if oid not in old),
             *(f"{t.name} dropped" for oid, t in old.items() if oid not in new),
             *(f"{t.name} moved" for oid, t in new.items() if oid in old and old[oid].location != t.location)]
    return ", ".join(parts) or None


def _missing_directory(path: str) -> bool:
    """Whether no directory is at ``path``: nothing there, or something else; one that cannot be looked at
    is not missing (the walk then fails the backup for it, as for any path it cannot read)."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False


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
        self._grafts: dict[bytes, bytes] = {}  # oid -> the location of a tablespace outside, resolved
        self._links: dict[bytes, bytes] = {}  # oid -> the target its link pg_tblspc/<oid> is recorded with
        self._inside: dict[bytes, bytes] = {}  # a tablespace's directory inside the data directory -> pg_tblspc/<oid>
        self._in_tree = False  # whether the data directory has a chunkvault_tblspc of its own (a restored copy's)
        self._version_dir = b""
        self._pages: PageChecks | None = None
        self.notes: list[str] = []
        #: Files that change while being read are the norm on a busy cluster, and the WAL from the backup's start
        #: repairs them: counted in one warning (``SourceSession.repairs_changes``), not each named.
        self.repairs_changes = "the WAL the snapshot holds, replayed from the backup's start, repairs them"

    def _accept(self, data_directory: str) -> None:
        """Refuse a server whose data directory is not the one to read, before its backup starts."""
        try:
            same = os.path.samefile(data_directory, self.datadir)
        except OSError:
            same = False
        if not same:
            raise UsageError(f"the PostgreSQL server reached has its data directory at {data_directory}, "
                             f"not {self.datadir}: back up that directory, on that server's machine")

    def begin(self) -> None:
        started = self._session.start(self.label, fast=self.fast, accept=self._accept)
        self._started = started
        self._version_dir = version_directory(started.version, catalog_version(self.datadir))
        self._in_tree = os.path.lexists(os.path.join(self.datadir, TABLESPACES.decode()))
        inside = os.path.realpath(self.datadir)
        for t in started.tablespaces:
            if not t.outside:  # made in place: a directory in pg_tblspc, read as any other
                continue
            oid, real = b"%d" % t.oid, os.path.realpath(t.location)
            missing = _missing_directory(real)
            if missing:  # the walk would say "vanished during backup" of what never was there
                self.notes.append(f"tablespace {t.name} (oid {t.oid}) has no directory at its location "
                                  f"{t.location} (never made there, or removed since): nothing of it stored")
            if real.startswith(inside.rstrip("/") + "/"):  # read where it lies; the link leads there
                self._links[oid] = os.fsencode(os.path.relpath(real, os.path.join(inside, "pg_tblspc")))
                self._inside[os.fsencode(os.path.relpath(real, inside))] = b"pg_tblspc/" + oid
            else:
                if not missing:
                    self._grafts[oid] = os.fsencode(real)
                self._links[oid] = b"../" + TABLESPACES + b"/" + oid
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
        return PageChecks(self._path_of, int(block_size), int(segment_blocks), started.start_lsn)

    def _path_of(self, rel: bytes) -> bytes:
        """Where the file at ``rel`` in the tree lies: a tablespace grafted from outside, through its link."""
        if self._grafts and not self._in_tree and rel.startswith(TABLESPACES + b"/"):
            rel = b"pg_tblspc" + rel[len(TABLESPACES):]
        return os.path.join(os.fsencode(self.datadir), rel)

    def _through_link(self, rel: bytes) -> bytes:
        """``rel`` as PostgreSQL names it, where it lies in a tablespace inside the data directory: through
        ``pg_tblspc/<oid>`` (a relation's file, a database directory of it); else ``rel``."""
        for at, link in self._inside.items():
            if rel == at or rel.startswith(at + b"/"):
                return link + rel[len(at):]
        return rel

    def inspector(self, rel: bytes) -> FilePages | None:
        """The page checking of a relation's file (``SourceSession.inspector``)."""
        return self._pages.for_file(rel, self._through_link(rel)) if self._pages is not None else None

    def graft(self, below: bytes) -> dict[bytes, bytes]:
        """The directories of the tree that lie elsewhere (``SourceWalk``'s ``graft``): in the data directory,
        ``chunkvault_tblspc`` (a view of ``pg_tblspc``, unless the directory has one of its own); in that, each
        tablespace outside the data directory under its oid, read at its location."""
        if not self._grafts:
            return {}
        if below == b"" and not self._in_tree:
            return {TABLESPACES: os.fsencode(os.path.join(self.datadir, "pg_tblspc"))}
        return dict(self._grafts) if below == TABLESPACES else {}

    def leave_out(self, below: bytes, names: list[bytes]) -> set[bytes]:
        """What the walk leaves out of the directory at ``below`` (``SourceWalk``'s ``leave_out``): unlogged
        and temporary relations' files, in a database directory; the control file, which ``appendix`` reads;
        the links to tablespaces outside, which ``appendix`` records anew; in a tablespace's location, what is
        not this server's version directory (an older server's, left by pg_upgrade, or anything else)."""
        if below == os.path.dirname(CONTROL_FILE):
            return {os.path.basename(CONTROL_FILE)}
        if below == b"pg_tblspc":
            return {name for name in names if name in self._links}
        if below == TABLESPACES and not self._in_tree:  # pg_tblspc's links: the grafts alone are its entries
            return set(names)
        if (m := _GRAFTED.fullmatch(below)) and m.group(1) in self._grafts:
            return {name for name in names if name != self._version_dir}
        return unlogged_and_temporary(names) if is_database_directory(self._through_link(below)) else set()

    def walked(self, unreadable: list[str], warnings: list[str]) -> None:
        """Fail the backup, before the stop, for a path the walk could not read (``SourceSession.walked``): a
        relation's file kept from the parent snapshot, older than the backup's start, is not one the WAL
        repairs, and one left out loses its table; pg_basebackup fails likewise on any file it cannot read.
        Extended attributes that could not be read are no such path (PostgreSQL needs none to start)."""
        if not unreadable:
            return
        why = next((w for w in warnings if w.startswith("cannot read")
                    and not w.startswith("cannot read extended attributes")), unreadable[0])
        count = f"{len(unreadable)} paths, first " if len(unreadable) > 1 else ""
        raise SourceCommandFailed(f"the data directory could not be read whole ({count}{why}): a base backup "
                                  "needs every file: no snapshot saved")

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
        # After the stop: a tablespace created or dropped up to then has its record in the WAL the copy replays.
        changed = changed_tablespaces(self._started.tablespaces, self._session.tablespaces())
        if changed:
            raise SourceCommandFailed(f"PostgreSQL's tablespaces changed during the backup ({changed}): no snapshot "
                                      "saved; take it again")
        # No tablespace_map: the tablespaces are in the tree (see the module's docstring).
        added = [control, AddedFile(b"backup_label", functools.partial(io.BytesIO, stopped.label_file.encode()), 0o600,
                           st.st_uid, st.st_gid, now)]
        for oid, target in self._links.items():
            try:
                link = os.lstat(os.path.join(os.fsencode(self.datadir), b"pg_tblspc", oid))
            except OSError as exc:
                raise SourceCommandFailed(f"cannot read the link of tablespace {oid.decode()} in pg_tblspc: "
                                          f"{exc.strerror or exc}: no snapshot saved") from None
            added.append(AddedFile(b"pg_tblspc/" + oid, None, 0o777, link.st_uid, link.st_gid, link.st_mtime_ns,
                                   link=target))
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
                why = (" (a standby keeps in pg_wal only the WAL it streamed: one that caught up through its "
                       "restore_command has the rest in its archive; take the backup once it streams)"
                       if self._started.standby else "")
                raise SourceCommandFailed(f"WAL segment {name}, which the backup needs, is gone from {wal}{why}: "
                                          "no snapshot saved") from None
            if not stat.S_ISREG(seg.st_mode):
                raise SourceCommandFailed(f"{path} is not a regular file: no snapshot saved")
            added.append(AddedFile(f"pg_wal/{name}".encode(), functools.partial(open, path, "rb"),
                                   stat.S_IMODE(seg.st_mode), seg.st_uid, seg.st_gid, seg.st_mtime_ns))
        info = {"label": self.label, "start_lsn": format_lsn(stopped.start_lsn),
                "stop_lsn": format_lsn(stopped.wal_end), "timeline": stopped.timeline, "start_wal": segments[0],
                "wal": segments, "server_version": self._started.version, "standby": self._started.standby,
                "tablespaces": tablespaces_json(self._started.tablespaces),
                "page_checksums": self._pages.to_dict() if self._pages is not None else None}
        if self._pages is not None:
            self.notes += self._pages.warnings()
        return added, {"postgres": info}

    def close(self) -> None:
        self._session.close()
