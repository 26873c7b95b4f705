"""Point-in-time recovery end to end: a real PostgreSQL archives its WAL with ``archive-push``; a snapshot of a
``pg_basebackup`` copy, restored, recovers with ``archive-get`` to a moment between two inserts."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time

import pytest

import servers_pg
from conftest import PASSWORD

pytestmark = pytest.mark.slow


def test_recovery_to_a_time_between_snapshots_reads_the_archived_wal(tmp_path):
    """Where the server's user cannot run chunkvault, its commands copy into and out of spool directories
    that the test pushes from and fetches into with the same commands: recovery is the same test.  The
    restore sets the recovery up itself (``--pg-recover``)."""
    bindir = servers_pg.require_postgres()
    cluster = servers_pg.PgCluster(bindir)
    user = cluster.user
    direct = servers_pg.runnable_by(user)
    shared = servers_pg.shared_tempdir("chunkvault-pitr-")
    restored = None
    try:
        repo = os.path.join(shared, "repo")
        password_file = servers_pg.password_file(shared, PASSWORD, user)
        servers_pg.give_to(shared, user)
        env = cluster.env()

        spool, fetched = (servers_pg.private_dir(os.path.join(shared, d), user) for d in ("spool", "fetched"))

        def cli(*args: str) -> str:
            argv = [sys.executable, "-m", "chunkvault.cli", *args, "-r", repo, "--password-file", password_file]
            return servers_pg.run_as(user if direct else None, argv, env=env).stdout

        cli("init", "--kdf-time", "0")
        cluster.init()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n")
            push = servers_pg.command_line("archive-push", "-q", "-r", repo, "--password-file", password_file,
                                           "--spool", os.path.join(shared, "push-spool")) + " %p"
            f.write(servers_pg.conf_line("archive_command", push if direct else f"cp %p {shlex.quote(spool)}/%f"))
        cluster.start()
        c = cluster
        c.sql("create table t (id int primary key); insert into t select generate_series(1, 100)")
        copy = os.path.join(c.backups, "copy")
        c.basebackup(copy)
        cli("backup", copy, "--fixed-chunks", "base/*")
        c.sql("insert into t select generate_series(101, 200)")
        time.sleep(1.1)
        target = c.sql("select clock_timestamp()::text")
        time.sleep(1.1)
        c.sql("insert into t select generate_series(201, 300)")
        last = servers_pg.switch_and_wait_archived(c)
        assert c.sql("select failed_count from pg_stat_archiver") == "0", c.log_tail()
        c.stop()
        for name in sorted(os.listdir(spool)):  # in the order PostgreSQL archived them
            cli("archive-push", os.path.join(spool, name))
        archived = cli("archive-list")
        assert last in archived

        data = os.path.join(shared, "restored")
        how = (["--pg-spool", os.path.join(shared, "get-spool")] if direct else
               ["--pg-restore-command", f'cp {shlex.quote(fetched)}/%f "%p"'])
        said = json.loads(cli("restore", "latest", "--target", data, "--json", "--pg-recover", f"time={target}",
                              "--pg-target-action", "promote", *how))["pg_recovery"]
        assert said["signal"] == "recovery.signal" and said["settings"]["recovery_target_action"] == "promote"
        assert said["settings"]["recovery_target_time"].endswith("+00") and target[:19] in said["value"]
        assert ("archive-get" in said["settings"]["restore_command"]) == direct
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write("archive_mode = off\n")
        if not direct:
            for entry in json.loads(cli("archive-list", "--json"))["files"]:
                cli("archive-get", entry["name"], os.path.join(fetched, entry["name"]))
            servers_pg.give_to(fetched, user, recursive=True)
        shutil.rmtree(os.path.join(data, "pg_wal"))  # every segment must come from the archive
        os.mkdir(os.path.join(data, "pg_wal"), 0o700)
        restored = servers_pg.start_restored(bindir, data, user=user)
        servers_pg.wait_promoted(restored)
        assert restored.sql("select count(*) from t") == "200", restored.log_tail()
        log = restored.log_tail(100_000)
        assert "restored log file" in log and "recovery stopping before commit" in log, log
    finally:
        if restored is not None:
            restored.discard()
        cluster.destroy()
        shutil.rmtree(shared, ignore_errors=True)


def test_recovery_settings_left_in_postgresql_conf_do_not_steer_the_recovery(tmp_path):
    """PostgreSQL's documentation puts a recovery's settings in postgresql.conf, where they stay (unused) once
    the server is promoted, and come back with every copy.  ``--pg-recover end`` must replay the whole archive
    and promote, not stop at the restore point an earlier recovery by hand named there."""
    bindir = servers_pg.require_postgres()
    cluster = servers_pg.PgCluster(bindir)
    user = cluster.user
    shared = servers_pg.shared_tempdir("chunkvault-pitr-")
    restored = None
    try:
        servers_pg.give_to(shared, user)
        archive = servers_pg.private_dir(os.path.join(shared, "archive"), user)
        repo = os.path.join(shared, "repo")
        env = {"CHUNKVAULT_PASSWORD": PASSWORD}
        cluster.init()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n" + servers_pg.conf_line("archive_command", f"cp %p {shlex.quote(archive)}/%f"))
            f.write("recovery_target_name = 'stale'\nrecovery_target_action = 'shutdown'\n")  # left by hand
        cluster.start()
        c = cluster
        c.sql("create table t (id int primary key); insert into t select generate_series(1, 100)")
        copy = os.path.join(c.backups, "copy")
        c.basebackup(copy)
        c.sql("insert into t select generate_series(101, 200)")
        c.sql("select pg_create_restore_point('stale')")
        c.sql("insert into t select generate_series(201, 300)")
        last = servers_pg.switch_and_wait_archived(c)
        c.stop()
        run = [sys.executable, "-m", "chunkvault.cli"]
        servers_pg.run_as(None, [*run, "init", "-r", repo, "--kdf-time", "0"], env={**os.environ, **env})
        servers_pg.run_as(None, [*run, "backup", "-r", repo, copy], env={**os.environ, **env})
        data = os.path.join(shared, "restored")
        servers_pg.run_as(None, [*run, "restore", "-r", repo, "latest", "--target", data, "--pg-recover", "end",
                                 "--pg-restore-command", f'cp {shlex.quote(archive)}/%f "%p"'],
                          env={**os.environ, **env})
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write("archive_mode = off\n")
        shutil.rmtree(os.path.join(data, "pg_wal"))
        os.mkdir(os.path.join(data, "pg_wal"), 0o700)
        restored = servers_pg.start_restored(bindir, data, user=user)
        servers_pg.wait_promoted(restored)
        assert restored.sql("select count(*) from t") == "300", restored.log_tail()
    finally:
        if restored is not None:
            restored.discard()
        cluster.destroy()
        shutil.rmtree(shared, ignore_errors=True)
