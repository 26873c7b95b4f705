"""Real PostgreSQL clusters for tests and benchmarks: initdb, a server on a free 127.0.0.1 port, pg_basebackup.

PostgreSQL refuses to run as root, so when we are root every server binary
runs as an unprivileged user (``postgres`` if it exists, else ``nobody``) that
owns the cluster's directories.  The unix socket lives in the cluster's own
directory; TCP listens on 127.0.0.1 only.

Also a command-line entry point, used as a ``verify-restore --then`` command::

    python servers_pg.py check-restore --bindir DIR --query 'select count(*) from t' --expect 1234

starts a server on ``$CHUNKVAULT_RESTORE_DIR`` (a restored data directory),
runs the query, stops the server and exits 0 only if the answer is the
expected one.  Nothing here imports pytest at module level, so the benchmarks
can use it too.
"""
from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from netutil import free_port

NEEDED = ("initdb", "pg_ctl", "postgres", "pg_basebackup", "psql")


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path))


def find_pg_bindir() -> str | None:
    """A directory holding the PostgreSQL server binaries (initdb on PATH, else Debian's newest)."""
    candidates = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for d in candidates:
        if all(os.access(os.path.join(d, t), os.X_OK) for t in NEEDED):
            return d
    return None


def require_postgres() -> str:
    """The bin directory, or a skip with the reason; under CI (CI=true) its absence fails the test."""
    import pytest

    bindir = find_pg_bindir()
    if bindir is not None:
        return bindir
    reason = ("PostgreSQL server binaries not found (initdb, pg_ctl, postgres, pg_basebackup, psql on PATH "
              "or under /usr/lib/postgresql/*/bin): install the Debian package 'postgresql'")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
    raise AssertionError("unreachable")


def server_user() -> str | None:
    """Whom the servers run as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, but there is no 'postgres' or 'nobody' user to run PostgreSQL as")


def give_to(path: str, user: str | None, *, recursive: bool = False) -> None:
    """Make ``user`` the owner of ``path`` (and everything under it)."""
    if user is None:
        return
    pw = pwd.getpwnam(user)
    paths: Iterator[str] = iter([path])
    if recursive:
        paths = (os.path.join(d, n) for d, dirs, files in os.walk(path) for n in [".", *dirs, *files])
    for p in paths:
        os.lchown(p, pw.pw_uid, pw.pw_gid)


def shared_tempdir(prefix: str, parent: str | None = None) -> str:
    """A temp directory the server user may traverse (pytest's own tmp dirs are private to us)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o711)
    return path


def run_as(user: str | None, argv: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True,
           timeout: float | None = 600, capture: bool = True) -> subprocess.CompletedProcess:
    """Run a program as ``user`` (no shell); failures raise with the program's output."""
    kwargs = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    proc = subprocess.run(list(argv), env=env, capture_output=capture, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout or ''}{proc.stderr or ''}")
    return proc



def password_file(directory: str, password: str, user: str | None) -> str:
    """A password file in ``directory`` that only ``user`` (the server's) can read, as archive_command needs."""
    path = os.path.join(directory, "password")
    with open(path, "w") as f:
        f.write(password + "\n")
    os.chmod(path, 0o600)
    give_to(path, user)
    return path

def command_line(*args: str) -> str:
    """A chunkvault command line as PostgreSQL runs it (it has none of our environment: everything is given)."""
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "chunkvault.cli", *args))


def conf_line(name: str, value: str) -> str:
    """A postgresql.conf line setting ``name`` to the string ``value``."""
    return f"{name} = '" + value.replace("'", "''") + "'\n"


def runnable_by(user: str | None) -> bool:
    """Whether PostgreSQL's user can run this Python with chunkvault: not one in a private home, as root."""
    if user is None:
        return True
    try:
        return run_as(user, [sys.executable, "-c", "import chunkvault.cli"], check=False).returncode == 0
    except OSError:
        return False

@dataclass
class PgServer:
    """A PostgreSQL server on a data directory; ``start``/``stop`` it, query it with ``sql``."""

    bindir: str
    datadir: str
    rundir: str  # socket and log; owned by the server user
    user: str | None
    port: int = 0
    settings: tuple[str, ...] = ()  # extra "name=value" server settings

    def tool(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    @property
    def logfile(self) -> str:
        return os.path.join(self.rundir, "server.log")

    def env(self) -> dict[str, str]:
        env = {"PATH": f"{self.bindir}:/usr/bin:/bin", "HOME": self.rundir, "LC_ALL": "C", "TZ": "UTC",
               "PGHOST": self.rundir, "PGDATABASE": "postgres"}
        if self.port:
            env["PGPORT"] = str(self.port)
        return env

    def start(self, attempts: int = 3) -> None:
        """Start on a free port (another one if that port was taken meanwhile) and wait until it accepts."""
        for attempt in range(attempts):
            self.port = free_port()
            opts = ["-p", str(self.port), "-k", self.rundir, "-c", "listen_addresses=127.0.0.1"]
            for s in self.settings:
                opts += ["-c", s]
            proc = run_as(self.user, [self.tool("pg_ctl"), "start", "-w", "-t", "120", "-D", self.datadir,
                                      "-l", self.logfile, "-o", " ".join(shlex.quote(o) for o in opts)],
                          env=self.env(), check=False)
            if proc.returncode == 0:
                return
            log = self.log_tail()
            if "could not bind" in log or "already in use" in log:
                continue
            raise RuntimeError(f"PostgreSQL did not start on {self.datadir}:\n{proc.stdout}{proc.stderr}\n{log}")
        raise RuntimeError(f"PostgreSQL found no free port in {attempts} attempts:\n{self.log_tail()}")

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            run_as(self.user, [self.tool("pg_ctl"), "stop", "-w", "-m", "fast", "-D", self.datadir],
                   env=self.env(), check=False)

    def discard(self) -> None:
        """Stop a server started on its own run directory (``start_restored``'s) and remove that directory."""
        self.stop()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def conninfo(self) -> str:
        """A connection string psql (and ``--pg-connect``) reaches this server with, whatever the environment."""
        return f"host={self.rundir} port={self.port} user=postgres dbname=postgres"

    def create_tablespace(self, name: str, location: str) -> None:
        """``CREATE TABLESPACE name LOCATION location``, the directory made first, owned by the server's user."""
        os.mkdir(location, 0o700)
        give_to(location, self.user)
        self.sql(f"CREATE TABLESPACE {name} LOCATION '{location}'")

    def sql(self, query: str, db: str = "postgres") -> str:
        """One SQL string (several statements allowed) through psql; its unaligned, tuples-only output."""
        proc = run_as(self.user, [self.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.rundir,
                                  "-p", str(self.port), "-d", db, "-tA", "-c", query], env=self.env())
        return proc.stdout.strip()


class PgCluster(PgServer):
    """A fresh cluster in its own temp directory: ``data/``, ``run/``, and room for base backups."""

    def __init__(self, bindir: str, *, user: str | None = None, parent: str | None = None,
                 settings: Sequence[str] = ("fsync=off",)):
        self.base = shared_tempdir("chunkvault-pgtest-", parent)
        user = server_user() if user is None and os.geteuid() == 0 else user
        super().__init__(bindir, os.path.join(self.base, "data"), os.path.join(self.base, "run"), user,
                         settings=tuple(settings))
        for d in (self.rundir, self.backups):
            os.makedirs(d, mode=0o700)
            give_to(d, user)
        give_to(self.base, user)

    @property
    def backups(self) -> str:
        """A directory the server user may create base backups in."""
        return os.path.join(self.base, "backups")

    def init(self, *, data_checksums: bool = False) -> None:
        run_as(self.user, [self.tool("initdb"), "-D", self.datadir, "--auth=trust", "--no-sync", "-E", "UTF8",
                           "--locale=C", "-U", "postgres", *(["--data-checksums"] if data_checksums else [])],
               env=self.env())

    def basebackup(self, dest: str) -> None:
        """``pg_basebackup -Fp -Xs`` into ``dest`` (which must not exist; its parent must be ours)."""
        run_as(self.user, [self.tool("pg_basebackup"), "-h", self.rundir, "-p", str(self.port), "-U", "postgres",
                           "-D", dest, "-Fp", "-Xs", "-c", "fast", "--no-sync"], env=self.env())

    def standby(self, slot: str = "standby") -> "PgCluster":
        """A streaming replica of this running cluster, started: ``pg_basebackup -R`` (``standby.signal`` and
        ``primary_conninfo``) into a cluster of its own, with this one's settings, streaming through the
        replication slot ``slot`` made here (so this cluster keeps the WAL the replica has not received); the
        caller destroys it, then drops the slot."""
        replica = PgCluster(self.bindir, user=self.user, settings=self.settings)
        try:
            run_as(self.user, [self.tool("pg_basebackup"), "-h", self.rundir, "-p", str(self.port), "-U", "postgres",
                               "-D", replica.datadir, "-Fp", "-Xs", "-c", "fast", "--no-sync", "-R", "-C", "-S",
                               slot], env=self.env())
            replica.start()
        except BaseException:
            replica.destroy()
            raise
        return replica

    def received(self, primary: "PgServer", *, replayed: bool = False, timeout: float = 60) -> None:
        """Wait until this standby has received (flushed; ``replayed``: replayed) the WAL ``primary`` has written."""
        lsn = primary.sql("SELECT pg_current_wal_lsn()")
        function = "pg_last_wal_replay_lsn()" if replayed else "pg_last_wal_receive_lsn()"
        deadline = time.monotonic() + timeout
        while self.sql(f"SELECT coalesce({function} >= '{lsn}'::pg_lsn, false)") != "t":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby did not reach {lsn} in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def pgbench(self, *args: str, timeout: float | None = 3600) -> str:
        pgbench = self.tool("pgbench")
        if not os.access(pgbench, os.X_OK):
            pgbench = shutil.which("pgbench") or pgbench
        return run_as(self.user, [pgbench, "-h", self.rundir, "-p", str(self.port), "-U", "postgres", *args,
                                  "postgres"], env=self.env(), timeout=timeout).stdout

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "PgCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def start_restored(bindir: str, datadir: str, *, user: str | None = None) -> PgServer:
    """Start a server on a restored data directory, as the server user, with the modes PostgreSQL demands."""
    user = server_user() if user is None and os.geteuid() == 0 else user
    give_to(datadir, user, recursive=True)
    os.chmod(datadir, 0o700)
    rundir = shared_tempdir("chunkvault-pgrun-")
    give_to(rundir, user)
    server = PgServer(bindir, datadir, rundir, user, settings=("fsync=off",))
    try:
        server.start()
    except BaseException:
        shutil.rmtree(rundir, ignore_errors=True)
        raise
    return server


def live_processes() -> Iterator[tuple[int, int, str]]:
    """Every process of the machine that is not a zombie: its pid, process group and command line."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != b"Z":
            yield int(name), int(fields[2]), cmdline


def left_of(pid: int) -> list[int]:
    """The processes left of a server that was ``pid`` (the leader of its own group): itself and its group."""
    return [p for p, group, _ in live_processes() if pid in (p, group)]


def private_dir(path: str, user: str | None) -> str:
    """A directory at ``path`` that only ``user`` (the server's) may enter: a spool its archive_command
    copies into, say."""
    os.mkdir(path, 0o700)
    give_to(path, user)
    return path


def switch_and_wait_archived(server: PgServer, timeout: float = 120) -> str:
    """Switch to a new WAL segment and wait until the server has archived the one closed; its name."""
    last = server.sql("select pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + timeout
    while server.sql("select coalesce(last_archived_wal, '') from pg_stat_archiver") < last:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{last} was not archived:\n{server.log_tail()}")
        time.sleep(0.5)
    return last

def wait_promoted(server: PgServer, timeout: float = 120) -> None:
    """Wait until a server recovering from an archive is out of recovery (promoted at its target)."""
    deadline = time.monotonic() + timeout
    while server.sql("select pg_is_in_recovery()") != "f":
        if time.monotonic() > deadline:
            raise RuntimeError(f"still recovering after {timeout:g} s:\n{server.log_tail()}")
        time.sleep(0.5)

def check_restore_command(bindir: str, query: str, expect: str) -> str:
    """A shell command for ``verify-restore --then``: start the restored cluster, compare a query's answer."""
    return " ".join(shlex.quote(a) for a in (sys.executable, os.path.abspath(__file__), "check-restore",
                                             "--bindir", bindir, "--query", query, "--expect", expect))


def _check_restore(args: argparse.Namespace) -> int:
    datadir = os.environ.get("CHUNKVAULT_RESTORE_DIR")
    if not datadir:
        print("CHUNKVAULT_RESTORE_DIR is not set", file=sys.stderr)
        return 2
    server = start_restored(args.bindir, datadir)
    try:
        got = server.sql(args.query)
    finally:
        server.stop()
        log = server.log_tail()
        shutil.rmtree(server.rundir, ignore_errors=True)
    if got != args.expect:
        print(f"{args.query!r} answered {got!r}, expected {args.expect!r}\n{log}", file=sys.stderr)
        return 1
    print(f"{args.query!r} answered {got!r} as expected")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="PostgreSQL helpers for chunkvault's tests")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check-restore", help="start PostgreSQL on $CHUNKVAULT_RESTORE_DIR and check a query")
    c.add_argument("--bindir", default=None)
    c.add_argument("--query", required=True)
    c.add_argument("--expect", required=True)
    args = ap.parse_args(argv)
    args.bindir = args.bindir or find_pg_bindir()
    if args.bindir is None:
        print("PostgreSQL binaries not found", file=sys.stderr)
        return 2
    return _check_restore(args)


if __name__ == "__main__":
    sys.exit(main())
