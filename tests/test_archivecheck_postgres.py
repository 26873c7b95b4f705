"""``archive-check`` against a real PostgreSQL: refused while it does not archive, passing once its WAL reaches
the repository, failing with the archiver's own account when its ``archive_command`` fails."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

import servers_pg
from conftest import PASSWORD

pytestmark = pytest.mark.slow


def pushing_from(spool: str, push: Callable[[str], bool], stop: threading.Event, pause: float) -> threading.Thread:
    """A thread that pushes what reaches ``spool`` into the repository, as a second machine would, until
    ``stop``: each file ``push`` took is removed."""
    def run() -> None:
        while not stop.wait(pause):
            for name in sorted(os.listdir(spool)):
                path = os.path.join(spool, name)
                if push(path):
                    os.unlink(path)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread

def test_archive_check_follows_what_the_server_archives():
    """Where the server's user cannot run chunkvault, its command copies into a spool that a thread pushes
    from with archive-push, as a second machine would: the check waits for the repository either way."""
    bindir = servers_pg.require_postgres()
    cluster = servers_pg.PgCluster(bindir)
    user = cluster.user
    direct = servers_pg.runnable_by(user)
    shared = servers_pg.shared_tempdir("chunkvault-archive-check-")
    pushing = threading.Event()
    pusher = None
    try:
        repo = os.path.join(shared, "repo")
        password_file = servers_pg.password_file(shared, PASSWORD, user)
        spool = servers_pg.private_dir(os.path.join(shared, "spool"), user)
        servers_pg.give_to(shared, user)

        def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess:
            argv = [sys.executable, "-m", "chunkvault.cli", *args, "-r", repo, "--password-file", password_file]
            proc = servers_pg.run_as(user if direct else None, argv, env={**cluster.env(), "PGUSER": "postgres"},
                                     check=False)
            assert proc.returncode == code, proc.stdout + proc.stderr
            return proc

        cli("init", "--kdf-time", "0")
        cluster.init()
        cluster.start()
        connect = cluster.conninfo()

        off = cli("archive-check", "--pg-connect", connect, "--json", code=23)
        assert "archive_mode = off" in off.stderr and len(off.stderr.strip().splitlines()) == 1
        doc = json.loads(off.stdout)
        assert doc["ok"] is False and doc["segment"] is None and doc["archive_mode"] == "off"

        cluster.stop()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n")
            push = servers_pg.command_line("archive-push", "-q", "-r", repo, "--password-file", password_file) + " %p"
            f.write(servers_pg.conf_line("archive_command", push if direct else f"cp %p {shlex.quote(spool)}/%f"))
        cluster.start()
        connect = cluster.conninfo()
        if not direct:
            pusher = pushing_from(spool, lambda path: cli("archive-push", path).returncode == 0, pushing, 0.3)

        passed = cli("archive-check", "--pg-connect", connect, "--json", "--timeout", "120")
        doc = json.loads(passed.stdout)
        assert doc["ok"] is True and doc["error"] is None and doc["archive_mode"] == "on", passed.stdout
        assert doc["segment"] in cli("archive-list").stdout
        assert doc["archiver"]["failed_count"] == 0 and doc["archiver"]["archived_count"] >= 1
        assert ("does not run chunkvault archive-push" in passed.stderr) == (not direct), passed.stderr
        again = cli("archive-check", "--pg-connect", connect, "--timeout", "120")  # nothing written since
        assert "reached the repository" in again.stdout and doc["segment"] not in again.stdout

        cluster.sql("alter system set archive_command = 'false'")
        cluster.sql("select pg_reload_conf()")
        failing = cli("archive-check", "--pg-connect", connect, "--timeout", "5", code=23)
        warned, message = failing.stderr.strip().splitlines()  # archive_command 'false' is warned of, then the error
        assert "archive_command (false) does not run chunkvault archive-push" in warned
        assert message.startswith("chunkvault: 0000000100000000000000") and "within 5 s" in message, message
        assert "archive_command has been failing since its last success" in message and "see its log" in message
    finally:
        pushing.set()
        if pusher is not None:
            pusher.join(60)
        cluster.destroy()
        shutil.rmtree(shared, ignore_errors=True)


def test_a_server_archiving_through_an_archive_library_is_told_so(tmp_path):
    """PostgreSQL 15 and later run no archive_command while archive_library is set: the check said of such a
    server that its command (chunkvault's push, never run) stored the WAL elsewhere, and refused one whose
    command was empty as archiving nothing."""
    bindir = servers_pg.require_postgres()
    if not os.path.exists(os.path.join(os.path.dirname(bindir), "lib", "basic_archive.so")):
        pytest.skip("this PostgreSQL has no basic_archive module (15 and later ship it in contrib)")
    cluster = servers_pg.PgCluster(bindir)
    try:
        repo = str(tmp_path / "repo")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHUNKVAULT_", "PG"))}
        env["CHUNKVAULT_PASSWORD"] = PASSWORD

        def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess:
            proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", *args, "-r", repo], env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == code, proc.stdout + proc.stderr
            return proc

        cli("init", "--kdf-time", "0")
        cluster.init()
        archive = servers_pg.private_dir(os.path.join(cluster.base, "basic-archive"), cluster.user)
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\narchive_library = 'basic_archive'\n")
            f.write(servers_pg.conf_line("basic_archive.archive_directory", archive))
            push = servers_pg.command_line("archive-push", "-r", repo) + " %p"  # never run: the library archives
            f.write(servers_pg.conf_line("archive_command", push))
        cluster.start()
        connect = cluster.conninfo()
        failed = cli("archive-check", "--pg-connect", connect, "--timeout", "3", "--json", code=23)
        doc = json.loads(failed.stdout)
        assert doc["archive_library"] == "basic_archive" and doc["segment"] in os.listdir(archive)
        assert "archives through archive_library = basic_archive, not its archive_command" in failed.stderr
        assert "its archive_library (basic_archive) stores the WAL elsewhere" in doc["error"]
        assert "its archive_command" not in doc["error"]

        cluster.sql("alter system set archive_command = ''")
        cluster.sql("select pg_reload_conf()")
        empty = cli("archive-check", "--pg-connect", connect, "--timeout", "3", code=23)
        assert "archives nothing" not in empty.stderr and "stores the WAL elsewhere" in empty.stderr
    finally:
        cluster.destroy()


def test_a_server_stopped_while_the_check_waits_passes_once_its_segment_arrives(tmp_path):
    """A server stopped (fast) archives what it has ready before it exits: the check, whose psql session the
    stop ended, failed with psql's error (exit 20) and never said that the segment had reached the repository."""
    bindir = servers_pg.require_postgres()
    cluster = servers_pg.PgCluster(bindir)
    spool = servers_pg.shared_tempdir("chunkvault-archive-check-")
    servers_pg.give_to(spool, cluster.user)
    stop = threading.Event()
    pusher = None
    try:
        repo = str(tmp_path / "repo")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHUNKVAULT_", "PG"))}
        env["CHUNKVAULT_PASSWORD"] = PASSWORD

        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "chunkvault.cli", *args, "-r", repo], env=env,
                                  capture_output=True, text=True, timeout=300)

        assert cli("init", "--kdf-time", "0").returncode == 0
        cluster.init()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n")  # slow: the stop comes while the check waits
            f.write(servers_pg.conf_line("archive_command", f"sleep 3 && cp %p {shlex.quote(spool)}/%f"))
            f.write("log_statement = 'all'\n")  # the switch logged: the stop comes once the check waits for it
        cluster.start()

        pusher = pushing_from(spool, lambda path: cli("archive-push", path).returncode == 0, stop, 0.2)
        connect = cluster.conninfo()
        check = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "archive-check", "-r", repo, "--pg-connect",
                                  connect, "--timeout", "60", "--json"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        # Past the restore point, the switch: stopped before it answered, the server ended the session while
        # the check was still asking, not waiting for the segment (exit 20, the test's race, not the check's).
        while "pg_switch_wal()" not in cluster.log_tail(100000):
            assert time.monotonic() < deadline and check.poll() is None, cluster.log_tail()
            time.sleep(0.05)
        time.sleep(0.5)  # its answer is immediate; the archiver's copy takes 3 s
        assert 'restore point "chunkvault archive-check"' in cluster.log_tail(100000)
        cluster.stop()
        out, err = check.communicate(timeout=120)
        assert check.returncode == 0, out + err
        doc = json.loads(out)
        assert doc["ok"] is True and doc["segment"] in cli("archive-list").stdout
        gone = doc["warnings"][-1]
        assert gone.startswith("PostgreSQL's archiver statistics could not be read again (PostgreSQL: ") and gone in err
    finally:
        stop.set()
        if pusher is not None:
            pusher.join(60)
        cluster.destroy()
        shutil.rmtree(spool, ignore_errors=True)
