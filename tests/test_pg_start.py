"""verify-restore --pg-start: the restored PostgreSQL copy started by chunkvault itself, its databases opened, a
query answered, the server stopped whatever happens.  The pure parts (binaries, settings, names) first, then a
real PostgreSQL 15 cluster backed up and proven."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest

from chunkvault import pgstart
from chunkvault.errors import PgStartFailed, UsageError
from chunkvault.pgstart import (conninfo, pick_bindir, pid_file_ready, postgres_argv, recovery_files, searchable,
                                server_settings, split_records, statement_error, bootstrap_names)
from chunkvault.verify import check_pg_options, verify_restore
from conftest import PASSWORD
from servers_pg import (PgCluster, give_to, left_of, live_processes, private_dir, require_postgres, run_as,
                        shared_tempdir)

ROWS = 1234


# --- pure ------------------------------------------------------------------------------------------


def test_the_bindir_asked_for_wins_if_it_is_the_copys_version():
    assert pick_bindir("15", ("/opt/pg15", "15"), "/usr/lib/postgresql/15/bin", None) == "/opt/pg15"
    with pytest.raises(PgStartFailed, match="holds PostgreSQL 14, the copy is of 15"):
        pick_bindir("15", ("/opt/pg14", "14"), "/usr/lib/postgresql/15/bin", None)
    with pytest.raises(PgStartFailed, match="holds no PostgreSQL server binaries"):
        pick_bindir("15", ("/nothing", None), None, None)


def test_debians_bindir_for_the_version_then_pg_ctl_on_path_if_it_matches():
    assert pick_bindir("15", None, "/usr/lib/postgresql/15/bin", ("/usr/bin", "16")) == "/usr/lib/postgresql/15/bin"
    assert pick_bindir("15", None, None, ("/usr/local/pgsql/bin", "15")) == "/usr/local/pgsql/bin"
    with pytest.raises(PgStartFailed) as e:
        pick_bindir("13", None, None, ("/usr/local/pgsql/bin", "15"))
    assert "no PostgreSQL 13 server binaries" in str(e.value) and "pg_ctl on PATH is PostgreSQL 15" in str(e.value)
    assert "--pg-bindir" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PgStartFailed, match="/usr/lib/postgresql/12/bin"):
        pick_bindir("12", None, None, None)


def test_binaries_major_reads_the_version_as_pg_version_spells_it():
    assert pgstart.binaries_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n") == "15"
    assert pgstart.binaries_major("postgres (PostgreSQL) 9.6.24\n") == "9.6"
    assert pgstart.binaries_major("postgres (PostgreSQL) 17devel\n") == "17"
    assert pgstart.binaries_major("something else") is None
    assert pgstart.parse_pg_version("15\n") == "15" and pgstart.major_number("9.6") == 9
    with pytest.raises(PgStartFailed, match="not a PostgreSQL version"):
        pgstart.parse_pg_version("garbage")


def test_the_settings_fence_the_copy_off_from_the_live_server():
    got = dict(server_settings(15, "/s/restore", "/tmp/run", 5433))
    assert got["data_directory"] == "/s/restore" and got["port"] == "5433"
    assert got["listen_addresses"] == "" and got["unix_socket_directories"] == "/tmp/run"
    assert got["hba_file"] == "/tmp/run/pg_hba.conf" and got["ident_file"] == "/tmp/run/pg_ident.conf"
    assert got["external_pid_file"] == "" and got["ssl"] == "off" and got["archive_mode"] == "off"
    assert got["logging_collector"] == "off" and got["log_destination"] == "stderr"
    assert "stats_temp_directory" not in got  # gone in 15
    assert dict(server_settings(14, "/d", "/r", 1))["stats_temp_directory"] == "pg_stat_tmp"


def test_the_command_line_passes_values_as_they_are():
    argv = postgres_argv("/b", "/d ir", [("data_directory", "/d ir"), ("listen_addresses", ""),
                                         ("x", "it's")])
    assert argv == ["/b/postgres", "-D", "/d ir", "-c", "data_directory=/d ir", "-c", "listen_addresses=",
                    "-c", "x=it's"]


def test_recovery_files_by_version():
    assert recovery_files(15) == ("standby.signal", "recovery.signal") == recovery_files(12)
    assert recovery_files(11) == ("recovery.conf",)


def test_conninfo_quotes_any_database_name():
    assert conninfo("/tmp/r", 5432, "postgres", "it's a \\ db") == \
        "host='/tmp/r' port='5432' user='postgres' dbname='it\\'s a \\\\ db'"


def test_searchable_goes_by_the_bits_that_apply():
    assert searchable(0o711, 0, 0, 101, [104])
    assert not searchable(0o700, 0, 0, 101, [104])
    assert searchable(0o710, 0, 104, 101, [104]) and not searchable(0o701, 0, 104, 101, [104])
    assert not searchable(0o077, 101, 0, 101, [0])  # the owner's bits alone count for the owner
    assert searchable(0o700, 5, 5, 0, [])


def test_a_statement_error_is_told_from_a_connection_that_failed_or_was_cut():
    """A server shutting down (a recovery that failed short of its target) refuses or cuts connections: those
    wait longer for its exit than a statement the server answered with an error."""
    assert statement_error('ERROR:  relation "nope" does not exist')
    assert not statement_error('psql: error: connection to server on socket "/run/x/.s.PGSQL.5432" failed: '
                               'FATAL:  the database system is in recovery mode')
    assert not statement_error("FATAL:  terminating connection due to administrator command")
    assert not statement_error("server closed the connection unexpectedly")


def authid_page(block: int, tuples: list[tuple[int, str, int]]) -> bytes:
    """A heap page of ``block`` bytes holding pg_authid-like tuples (oid, rolname, xmax), as PostgreSQL lays
    them out: item pointers after the page header, tuples from the end, the size in the header."""
    page = bytearray(block)
    upper, items = block, []
    for oid, name, xmax in tuples:
        tup = bytearray(24 + 4 + 64)
        struct.pack_into("=I", tup, 4, xmax)
        struct.pack_into("=H", tup, 20, 0 if xmax else 0x0800)
        tup[22] = 24
        struct.pack_into("=I", tup, 24, oid)
        tup[28:28 + len(name)] = name.encode()
        upper -= len(tup)
        page[upper:upper + len(tup)] = tup
        items.append(upper | 1 << 15 | len(tup) << 17)
    struct.pack_into("=HHHH", page, 12, 24 + 4 * len(items), upper, block, block | 4)
    for i, item in enumerate(items):
        struct.pack_into("=I", page, 24 + 4 * i, item)
    return bytes(page)


@pytest.mark.parametrize("block", [4096, 8192, 16384, 32768])
def test_the_bootstrap_superuser_is_named_from_pages_of_any_block_size(block):
    first = authid_page(block, [(3373, "pg_monitor", 0), (10, "renamed_away", 77)])
    second = authid_page(block, [(10, "boss", 0), (16384, "app", 0)])
    assert bootstrap_names(first + second) == ["boss", "renamed_away"]  # the one not deleted first
    assert bootstrap_names(first[:block // 2]) == []  # a page cut short is not read
    assert bootstrap_names(b"\0" * block) == [] and bootstrap_names(b"") == []


def test_pid_file_status_and_records():
    lines = ["123", "/d", "1700000000", "5432", "/tmp/r", "", "  0  1", "starting"]
    assert not pid_file_ready("\n".join(lines) + "\n")
    lines[7] = "ready   "
    assert pid_file_ready("\n".join(lines) + "\n") and not pid_file_ready("123\n/d\n")
    assert split_records(b"postgres\0template1\0a\nb\0\n") == ["postgres", "template1", "a\nb"]
    assert pgstart.psql_missing('FATAL:  role "x" does not exist') == "role"
    assert pgstart.psql_missing('FATAL:  database "a b" does not exist') == "database"
    assert pgstart.psql_missing("could not connect") is None
    assert pgstart.role_candidates(None, "postgres") == ["postgres"]
    assert pgstart.role_candidates("", "db") == ["db", "postgres"]
    assert pgstart.role_candidates("app", None) == ["app", "postgres"]


@pytest.mark.parametrize("args, message", [
    ((False, "select 1", None, None, "postgres"), "give --pg-start too"),
    ((False, None, None, None, "other"), "--pg-dbname starts PostgreSQL"),
    ((True, None, "1", None, "postgres"), "give the query too"),
    ((True, " ", None, None, "postgres"), "--pg-query must not be empty"),
    ((True, None, None, "/nonexistent/bin", "postgres"), "not a directory"),
])
def test_pg_options_that_do_not_go_together_are_usage_errors(args, message):
    with pytest.raises(UsageError, match=message):
        check_pg_options(*args)


# --- a real cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    bindir = require_postgres()
    with PgCluster(bindir) as c:
        c.init()
        c.start()
        c.sql(f"CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, {ROWS})")
        c.sql("CREATE DATABASE \"other db\"")
        yield c


@pytest.fixture
def scratch():
    """A scratch parent the server's user may pass through (pytest's own directories are private)."""
    path = shared_tempdir("chunkvault-pgstart-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def base_backup(cluster: PgCluster, name: str) -> str:
    path = os.path.join(cluster.backups, name)
    cluster.basebackup(path)
    return path


def test_a_postgres_snapshot_starts_answers_and_is_stopped(cluster, new_repo, tmp_path, cli, scratch):
    url = str(tmp_path / "repo")
    new_repo(url)
    env = {"PATH": f"{cluster.bindir}:{os.environ['PATH']}"}
    cli("backup", "-r", url, "--postgres", "--pg-connect", cluster.conninfo(), cluster.datadir, env=env)
    out = cli("verify-restore", "-r", url, "--scratch", scratch, "--pg-start", "--pg-query",
              "select count(*) from t", "--pg-expect", str(ROWS), "--json")
    doc = json.loads(out.stdout)
    [report] = doc["snapshots"]
    assert doc["ok"] and report["ok"] and report["archive_off"] == ["."]
    [pg] = report["pg_start"]
    assert pg["error"] is None and pg["answer"] == str(ROWS) and pg["version"] == "15"
    assert pg["data_directory"] == "." and pg["user"] == "postgres" and pg["ready_seconds"] > 0
    assert pg["databases"] == ["other db", "postgres", "template1"]
    assert pg["signals_removed"] == [] and pg["written"] == [] and pg["log_tail"] is None
    assert left_of(pg["pid"]) == []
    assert os.listdir(scratch) == []

    wrong = cli("verify-restore", "-r", url, "--scratch", scratch, "--pg-start", "--pg-query",
                "select count(*) from t", "--pg-expect", str(ROWS + 1), check=18)
    text = wrong.stdout.decode()
    assert f"failed: the query answered '{ROWS}', expected '{ROWS + 1}'" in text and "FAILED" in text
    assert "log: " not in wrong.stderr.decode()  # the server's log says nothing of an answer
    both = cli("verify-restore", "-r", url, "--scratch", scratch, "--pg-start", "--then", "exit 0",
               "--pg-dbname", "other db", "--pg-query", "select current_database()", "--json")
    [report] = json.loads(both.stdout)["snapshots"]
    assert report["pg_start"][0]["answer"] == "other db" and report["command"]["exit_code"] == 0
    assert left_of(report["pg_start"][0]["pid"]) == []


def test_a_copy_without_configuration_files_comes_up_on_its_own_wal(cluster, new_repo, scratch):
    """As Debian's data directories are (postgresql.conf and pg_hba.conf under /etc), and with a standby
    signal that would have it wait for a primary."""
    copy = base_backup(cluster, "debian")
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        os.unlink(os.path.join(copy, name))
    with open(os.path.join(copy, "standby.signal"), "w"):
        pass
    give_to(os.path.join(copy, "standby.signal"), cluster.user)
    repo = new_repo()
    snap = repo.backup([copy]).snapshot
    report = verify_restore(repo, snap, scratch=scratch, pg_start=True, pg_query="select count(*) from t",
                            pg_expect=str(ROWS), keep=True)
    [pg] = report.pg_start
    assert report.ok, (pg.error, pg.log_tail)
    assert pg.signals_removed == ["standby.signal"] and pg.written == ["postgresql.conf"]
    kept = report.kept_at
    assert not os.path.exists(os.path.join(kept, "standby.signal"))
    assert os.stat(os.path.join(kept, "postgresql.conf")).st_uid == os.stat(kept).st_uid
    assert not os.path.exists(os.path.join(kept, "postmaster.pid")) and left_of(pg.pid) == []  # kept, but stopped


def test_an_invalid_setting_fails_with_the_log_tail_and_leaves_nothing_running(cluster, new_repo, scratch):
    copy = base_backup(cluster, "invalid")
    with open(os.path.join(copy, "postgresql.conf"), "a") as f:
        f.write("shared_buffers = 'plenty'\n")
    repo = new_repo()
    report = verify_restore(repo, repo.backup([copy]).snapshot, scratch=scratch, pg_start=True)
    [pg] = report.pg_start
    assert not report.ok and pg.error.startswith("PostgreSQL exited 1 before it accepted connections")
    assert "shared_buffers" in pg.log_tail and left_of(pg.pid) == []
    assert os.listdir(scratch) == []


def test_a_copy_owned_by_root_is_refused_with_the_reason(cluster, new_repo, scratch, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: a copy owned by root")
    copy = base_backup(cluster, "rooted")
    give_to(copy, "root", recursive=True)
    repo = new_repo()
    snap = repo.backup([copy]).snapshot
    report = verify_restore(repo, snap, scratch=scratch, pg_start=True)
    [pg] = report.pg_start
    assert not report.ok and pg.pid is None and pg.log_tail is None
    assert "owned by root" in pg.error and "refuses to run as root" in pg.error and "\n" not in pg.error

    give_to(copy, cluster.user, recursive=True)  # its own user's again, but behind a directory closed to it
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    report = verify_restore(repo, repo.backup([copy]).snapshot, scratch=str(private), pg_start=True)
    error = report.pg_start[0].error
    closed = error.split("cannot reach the copy: ", 1)[1].split(" is closed to it")[0]
    assert str(private).startswith(closed + "/") and os.stat(closed).st_mode & 0o001 == 0, error


def test_an_interrupt_while_it_runs_stops_the_server(cluster, new_repo, scratch, monkeypatch):
    copy = base_backup(cluster, "interrupted")
    repo = new_repo()
    snap = repo.backup([copy]).snapshot
    seen = []

    def interrupted(self, dbname, deadline):
        seen.append(self.proc.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(pgstart.Server, "find_role", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify_restore(repo, snap, scratch=scratch, pg_start=True)
    assert seen and left_of(seen[0]) == [] and os.listdir(scratch) == []

    monkeypatch.undo()  # the time given runs out before it is ready: a failure, and stopped as well
    report = verify_restore(repo, snap, scratch=scratch, pg_start=True, timeout=0.05)
    [pg] = report.pg_start
    assert not report.ok and "0.05 s" in pg.error and pg.pid and left_of(pg.pid) == [], pg.error


def test_a_verification_killed_outright_takes_its_server_along(cluster, new_repo, tmp_path, scratch):
    """SIGKILL leaves chunkvault no chance to stop the copy's server: the kernel ends it (SIGQUIT, an
    immediate shutdown) when its parent is gone, and a later run removes the run directory left behind."""
    copy = base_backup(cluster, "killed")
    url = str(tmp_path / "repo")
    new_repo(url).backup([copy])
    temp = shared_tempdir("chunkvault-temp-")  # the server's run directory goes here, swept alone below
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, TMPDIR=temp)
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "verify-restore", "-r", url, "--scratch",
                             scratch, "--pg-start", "--pg-query", "select pg_sleep(300)"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        postmaster = os.path.join(cluster.bindir, "postgres") + " -D " + scratch
        # one process: a child the server just forked has its command line until it names itself
        while len(servers := [(pid, cmd) for pid, _, cmd in live_processes() if cmd.startswith(postmaster)]) != 1:
            assert proc.poll() is None and time.monotonic() < deadline, f"no server started alone: {servers}"
            time.sleep(0.1)
        [(postmaster, cmdline)] = servers
        while not any("pg_sleep" in cmd for _, _, cmd in live_processes()):  # the query is under way
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while left_of(postmaster):
        assert time.monotonic() < deadline, f"the server outlived its verification: {left_of(postmaster)}"
        time.sleep(0.1)
    rundir = cmdline.split("unix_socket_directories=", 1)[1].split()[0]
    assert os.path.dirname(rundir) == temp and os.path.isdir(rundir)
    owners = {os.geteuid(), os.stat(rundir).st_uid}
    assert pgstart.sweep_run_directories(temp, owners) == []  # too recent to be taken
    later = time.time() + pgstart.STALE_RUN_DIRECTORY + 1
    assert pgstart.sweep_run_directories(temp, owners, now=later) == [rundir]
    shutil.rmtree(temp)


def test_a_run_directory_with_a_live_server_or_of_another_user_is_kept(tmp_path):
    def run_directory(name: str, lock_pid: int | None) -> str:
        path = tmp_path / (pgstart.RUN_DIRECTORY_PREFIX + name)
        path.mkdir()
        (path / "server.log").write_text("log")
        if lock_pid is not None:
            (path / ".s.PGSQL.5432.lock").write_text(f"{lock_pid}\n{path}\n")
        os.utime(path, (0, 0))
        return str(path)

    gone = subprocess.Popen(["true"])
    gone.wait()
    live = run_directory("live", os.getpid())
    dead = run_directory("dead", gone.pid)
    unlocked = run_directory("unlocked", None)
    unreadable = run_directory("unreadable", None)
    (tmp_path / (pgstart.RUN_DIRECTORY_PREFIX + "unreadable") / ".s.PGSQL.1.lock").write_text("not a pid")
    os.utime(unreadable, (0, 0))
    for name, extra in (("cluster", "data/"), ("notes", "notes.txt")):  # not what a run directory holds
        path = run_directory(name, None)
        os.mkdir(os.path.join(path, extra)) if extra.endswith("/") else open(os.path.join(path, extra), "w").close()
        os.utime(path, (0, 0))
    other = tmp_path / "other-dir"
    other.mkdir()
    os.utime(other, (0, 0))
    assert pgstart.sweep_run_directories(str(tmp_path), {os.geteuid() + 1}) == []  # another user's
    assert sorted(pgstart.sweep_run_directories(str(tmp_path), {os.geteuid()})) == sorted([dead, unlocked])
    assert sorted(os.listdir(tmp_path)) == ["chunkvault-pg-cluster", "chunkvault-pg-live", "chunkvault-pg-notes",
                                            "chunkvault-pg-unreadable", "other-dir"]
    assert os.path.isdir(live)


def test_a_snapshot_without_a_data_directory_fails_pg_start(new_repo, tmp_path, scratch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("not a database")
    repo = new_repo()
    report = verify_restore(repo, repo.backup([str(tmp_path / "src")]).snapshot, scratch=scratch, pg_start=True)
    assert not report.ok and "no PostgreSQL data directory" in report.pg_start[0].error
    assert stat.S_ISDIR(os.stat(scratch).st_mode)


def test_a_copy_whose_tablespace_links_out_of_it_is_not_started(cluster, new_repo, scratch):
    """A pg_basebackup copy backed up as files keeps pg_tblspc/<oid> linked to a location outside it (the live
    server's, for a data directory backed up as it lies): started, the copy recovered into that tablespace and
    reset its unlogged relations there."""
    location = os.path.join(cluster.base, "ts_out")
    mapped = os.path.join(cluster.backups, "ts_mapped")
    cluster.create_tablespace("ts_out", location)
    try:
        cluster.sql("CREATE UNLOGGED TABLE ts_u (id int) TABLESPACE ts_out; INSERT INTO ts_u VALUES (1)")
        private_dir(mapped, cluster.user)
        copy = os.path.join(cluster.backups, "linked")
        run_as(cluster.user, [cluster.tool("pg_basebackup"), "-h", cluster.rundir, "-p", str(cluster.port), "-U",
                              "postgres", "-D", copy, "-Fp", "-Xs", "-c", "fast", "--no-sync",
                              f"--tablespace-mapping={location}={mapped}"], env=cluster.env())
    finally:
        cluster.sql("DROP TABLE IF EXISTS ts_u")
        cluster.sql("DROP TABLESPACE ts_out")
    held = sorted(os.path.relpath(os.path.join(d, n), mapped) for d, _, files in os.walk(mapped) for n in files)
    repo = new_repo()
    report = verify_restore(repo, repo.backup([copy]).snapshot, scratch=scratch, pg_start=True)
    [pg] = report.pg_start
    assert not report.ok and pg.pid is None, pg.error
    assert "tablespace links lead out of it" in pg.error and mapped in pg.error and "\n" not in pg.error
    assert sorted(os.path.relpath(os.path.join(d, n), mapped) for d, _, files in os.walk(mapped)
                  for n in files) == held  # nothing written where the link led
    assert os.listdir(scratch) == []


def test_a_bootstrap_superuser_named_otherwise_is_found_in_the_copy(new_repo, scratch, monkeypatch):
    """initdb -U (a container's POSTGRES_USER), renamed since: no role postgres, none named as the owner, no
    PGUSER; the copy's pg_authid names the superuser to connect as."""
    bindir = require_postgres()
    monkeypatch.delenv("PGUSER", raising=False)
    with PgCluster(bindir) as c:
        run_as(c.user, [c.tool("initdb"), "-D", c.datadir, "--auth=trust", "--no-sync", "-U", "admin"], env=c.env())
        c.start()
        psql = [c.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", c.rundir, "-p", str(c.port), "-d",
                "postgres", "-c"]
        run_as(c.user, [*psql[:-1], "-U", "admin", "-c", "CREATE ROLE helper SUPERUSER LOGIN"], env=c.env())
        run_as(c.user, [*psql[:-1], "-U", "helper", "-c", "ALTER ROLE admin RENAME TO boss"], env=c.env())
        run_as(c.user, [*psql[:-1], "-U", "boss", "-c", "DROP ROLE helper; CHECKPOINT"], env=c.env())
        copy = os.path.join(c.backups, "renamed")
        run_as(c.user, [c.tool("pg_basebackup"), "-h", c.rundir, "-p", str(c.port), "-U", "boss", "-D", copy,
                        "-Fp", "-Xs", "-c", "fast", "--no-sync"], env=c.env())
        repo = new_repo()
        report = verify_restore(repo, repo.backup([copy]).snapshot, scratch=scratch, pg_start=True,
                                pg_query="select current_user")
    [pg] = report.pg_start
    assert report.ok, (pg.error, pg.log_tail)
    assert pg.answer == "boss" and pg.databases == ["postgres", "template1"]


def test_a_scratch_directory_the_copy_s_server_finds_full_is_exit_14_not_a_damaged_snapshot(cluster, new_repo,
                                                                                           tmp_path, cli, scratch):
    """The restore fits, but the server has no room to come out of recovery (a WAL segment to make): that
    failed the snapshot (exit 18) as if the backup were damaged; nothing is known of the data, as when the
    restore itself finds no room (exit 14)."""
    from treeutil import mounted_tmpfs

    url = str(tmp_path / "repo")
    repo = new_repo(url)
    env = {"PATH": f"{cluster.bindir}:{os.environ['PATH']}"}
    cli("backup", "-r", url, "--postgres", "--pg-connect", cluster.conninfo(), cluster.datadir, env=env)
    kept = verify_restore(repo, "latest", scratch=scratch, keep=True).kept_at
    used = sum(os.lstat(os.path.join(d, n)).st_blocks * 512 for d, dirs, files in os.walk(kept)
               for n in dirs + files)
    shutil.rmtree(os.path.dirname(kept))
    small = os.path.join(scratch, "small")
    os.mkdir(small, 0o755)
    with mounted_tmpfs(small, size=f"{used // 1024 + 4096}k"):  # the copy, and less than a WAL segment more
        out = cli("verify-restore", "-r", url, "--scratch", small, "--pg-start", "--then", "true", "--json",
                  check=14)
        [report] = json.loads(out.stdout)["snapshots"]
        [pg] = report["pg_start"]
        assert report["error_kind"] == "no_space" and not report["ok"] and pg["error"], report
        assert "the command was not run: PostgreSQL did not start (--pg-start)" in report["warnings"]
        assert report["error"].startswith("no space left in the scratch directory ") and "to start the copy" in \
            report["error"]
        assert "no space left in the scratch directory to verify 1 of 1 snapshot(s)" in out.stderr.decode()
        assert left_of(pg["pid"]) == [] and os.listdir(small) == []
