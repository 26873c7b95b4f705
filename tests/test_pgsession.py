"""The psql session that holds a base backup open: WAL arithmetic, and a live cluster copied while it runs."""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkvault.errors import SourceCommandFailed, UsageError
from chunkvault.pgsession import (PgBackupSession, format_lsn, label_field, parse_lsn, wal_segment_name,
                                  wal_segments_between)
from servers_pg import PgCluster, give_to, require_postgres, start_restored

MIB16 = 16 << 20


@given(st.integers(0, 2**64 - 1))
def test_lsn_text_round_trips(lsn):
    assert parse_lsn(format_lsn(lsn)) == lsn


@pytest.mark.parametrize("text", ["", "16", "16/", "/1", "G/0", "1/2/3", "123456789/0", "0/123456789"])
def test_malformed_lsn_is_refused(text):
    with pytest.raises(ValueError):
        parse_lsn(text)


def test_segment_names_as_postgresql_spells_them():
    assert wal_segment_name(1, 0, MIB16) == "000000010000000000000000"
    assert wal_segment_name(1, parse_lsn("0/1FFFFFF"), MIB16) == "000000010000000000000001"
    assert wal_segment_name(2, parse_lsn("16/B374D848"), MIB16) == "0000000200000016000000B3"
    assert wal_segment_name(1, parse_lsn("1/0"), 1 << 20) == "000000010000000100000000"
    assert wal_segment_name(0xFF, parse_lsn("0/3FFFFFFF"), 1 << 30) == "000000FF0000000000000000"
    with pytest.raises(ValueError):
        wal_segment_name(1, 0, 3 << 20)
    with pytest.raises(ValueError):
        wal_segment_name(0, 0, MIB16)


@given(st.integers(0, 2**40), st.integers(0, 2**30), st.sampled_from([1 << 20, MIB16, 1 << 30]))
def test_segments_between_cover_the_range_once_each(start, length, size):
    names = wal_segments_between(1, start, start + length, size)
    assert names[0] == wal_segment_name(1, start, size)
    assert len(names) == len(set(names)) and names == sorted(names)
    end = start + length
    last = end - 1 if end % size == 0 and length else end
    assert names[-1] == wal_segment_name(1, last, size)
    assert len(names) == last // size - start // size + 1


def test_a_stop_before_the_start_is_refused():
    with pytest.raises(ValueError, match="before it starts"):
        wal_segments_between(1, MIB16, 5, MIB16)


def test_label_fields():
    label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIMELINE: 1\nLABEL: x: y\n"
    assert label_field(label, "START TIMELINE") == "1"
    assert label_field(label, "LABEL") == "x: y"
    assert label_field(label, "BACKUP FROM") is None


@pytest.fixture(scope="module")
def cluster():
    bindir = require_postgres()
    with PgCluster(bindir, settings=("fsync=off", "max_wal_size=64MB", "min_wal_size=32MB")) as c:
        c.init()
        c.start()
        c.sql("CREATE TABLE t (id int primary key, pad text)")
        yield c


def session_of(cluster) -> PgBackupSession:
    env = {**cluster.env(), "PGUSER": "postgres"}
    return PgBackupSession(psql=cluster.tool("psql"), env=env)


def _copy_running(cluster, dest: str, *, tables: bool) -> None:
    """What a backup of the running data directory reads: all but the WAL and the server's run files; the
    tables' files (``base``), or the rest (``global``, with ``pg_control``, among them)."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        if os.path.samefile(directory, cluster.datadir):
            return [n for n in names if n in ("postmaster.pid", "postmaster.opts") or (n == "base") != tables]
        if os.path.basename(directory) in ("pg_wal", "pg_replslot", "pg_stat_tmp"):
            return [n for n in names if n != "archive_status"]
        return []
    shutil.copytree(cluster.datadir, dest, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def test_a_running_cluster_copied_inside_a_backup_starts_with_the_rows_committed_before_its_stop(cluster):
    cluster.sql("TRUNCATE t; INSERT INTO t SELECT g, repeat('a', 200) FROM generate_series(1, 5000) g")
    copy = os.path.join(cluster.base, "copy")  # the server user reaches it
    with session_of(cluster) as session:
        started = session.start("chunkvault test", fast=True)
        assert os.path.samefile(started.data_directory, cluster.datadir)
        assert started.segment_size == MIB16 and started.version >= 100000 and started.tablespaces == []
        cluster.sql("INSERT INTO t SELECT g, repeat('b', 2000) FROM generate_series(5001, 10000) g")
        _copy_running(cluster, copy, tables=True)
        # Changes the tables' copy lacks, then a checkpoint past them before pg_control is read: only the
        # label's start position replays them, and only the slot keeps their WAL.
        cluster.sql("INSERT INTO t SELECT g, repeat('c', 2000) FROM generate_series(10001, 20000) g")
        cluster.sql("UPDATE t SET pad = 'c' WHERE id <= 3000")
        cluster.sql("CHECKPOINT")
        _copy_running(cluster, copy, tables=False)
        stopped = session.stop()
        cluster.sql("INSERT INTO t SELECT g, 'after' FROM generate_series(20001, 20100) g")
        cluster.sql("SELECT pg_switch_wal()")
        assert stopped.start_lsn == started.start_lsn < stopped.stop_lsn
        assert label_field(stopped.label_file, "LABEL") == "chunkvault test"
        segments = stopped.wal_segments(started.segment_size)
        assert segments[0] == cluster.sql(f"SELECT pg_walfile_name('{format_lsn(stopped.start_lsn)}')")
        assert len(segments) >= 2
        for name in segments:
            shutil.copy2(os.path.join(cluster.datadir, "pg_wal", name), os.path.join(copy, "pg_wal", name))
        with open(os.path.join(copy, "backup_label"), "w") as f:
            f.write(stopped.label_file)
    give_to(copy, cluster.user, recursive=True)
    restored = start_restored(cluster.bindir, copy)
    try:
        assert restored.sql("SELECT count(*), count(*) FILTER (WHERE pad = 'c') FROM t") == "20000|3000"
    finally:
        restored.discard()
        shutil.rmtree(copy, ignore_errors=True)


def test_closing_the_session_aborts_the_backup_and_drops_its_slot(cluster):
    with session_of(cluster) as session:
        session.start("left open")
        assert cluster.sql("SELECT count(*) FROM pg_replication_slots WHERE temporary") == "1"
    assert cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    with session_of(cluster) as session:  # a new backup can start: the first one is gone
        session.start("second")
        assert session.stop().label_file


def test_misuse_is_refused(cluster):
    with session_of(cluster) as session:
        with pytest.raises(UsageError, match="no backup was started"):
            session.stop()
        with pytest.raises(UsageError, match="one line"):
            session.start("two\nlines")
        session.start("it's quoted")
        with pytest.raises(UsageError, match="started a backup already"):
            session.start("again")
        assert label_field(session.stop().label_file, "LABEL") == "it's quoted"


def test_an_answer_that_does_not_come_in_time_ends_the_session_and_the_statement(cluster):
    """``answer_wait`` (archive-check's timeout): a statement that hangs, as on a frozen server, is given up,
    and cancelled: psql was killed, which left it running on the server (a lock waited for, held on)."""
    with session_of(cluster) as session:
        pid = session.value("SELECT pg_backend_pid()")
        session.answer_wait = 0.5
        began = time.monotonic()
        with pytest.raises(SourceCommandFailed, match=r"did not answer within 0\.5 s"):
            session.query("SELECT pg_sleep(60)")
        assert time.monotonic() - began < 5
        assert session._proc is None  # psql ended; the next statement starts another
        assert session.query("SELECT 1") == [["1"]]
    deadline = time.monotonic() + 10
    while cluster.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != "0":
        assert time.monotonic() < deadline, "the statement still runs on the server"
        time.sleep(0.1)



def test_a_statement_a_signal_interrupted_is_cancelled_when_the_session_closes(cluster):
    """A stop signal while a statement runs (``pg_backup_start`` waiting for a spread checkpoint, say): psql
    reads no input until the answer, so closing its input alone neither ends it nor the statement; it is made
    to cancel it, and the session ends at once, not after psql was waited for and then terminated."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    session = session_of(cluster)
    pid = session.value("SELECT pg_backend_pid()")
    previous = signal.signal(signal.SIGALRM, interrupted)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            session.query("SELECT pg_sleep(60)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    began = time.monotonic()
    session.close()
    assert time.monotonic() - began < 5
    deadline = time.monotonic() + 10
    while cluster.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") != "0":
        assert time.monotonic() < deadline, "the statement still runs on the server"
        time.sleep(0.1)

def test_a_role_without_the_rights_gets_postgresqls_reason(cluster):
    cluster.sql("DROP ROLE IF EXISTS weak; CREATE ROLE weak LOGIN")
    env = {**cluster.env(), "PGUSER": "weak"}
    with PgBackupSession(psql=cluster.tool("psql"), env=env) as session:
        with pytest.raises(SourceCommandFailed, match=r"^PostgreSQL: .*(permission denied|must be superuser)"):
            session.start("weak")


def test_a_role_that_may_back_up_but_not_read_settings_is_told_the_grant(cluster):
    cluster.sql("DROP ROLE IF EXISTS backer; CREATE ROLE backer LOGIN REPLICATION; "
                "GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO backer; "
                "GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO backer")
    env = {**cluster.env(), "PGUSER": "backer"}
    with PgBackupSession(psql=cluster.tool("psql"), env=env) as session:
        with pytest.raises(SourceCommandFailed, match="GRANT pg_read_all_settings TO the role"):
            session.start("backer")
    cluster.sql("GRANT pg_read_all_settings TO backer")
    with PgBackupSession(psql=cluster.tool("psql"), env=env) as session:
        session.start("backer")
        assert session.stop().label_file


def test_no_server_is_one_clear_error(cluster, tmp_path):
    env = {**cluster.env(), "PGHOST": str(tmp_path), "PGUSER": "postgres"}
    with PgBackupSession(psql=cluster.tool("psql"), env=env) as session:
        with pytest.raises(SourceCommandFailed, match=r"^PostgreSQL: .*(connection|No such file)"):
            session.start("nobody there")


def test_a_missing_psql_is_one_clear_error(tmp_path):
    with pytest.raises(SourceCommandFailed, match="cannot run"):
        PgBackupSession(psql=str(tmp_path / "psql")).open()


def test_a_psql_killed_by_a_signal_is_said_so(tmp_path):
    """A psql the OOM killer ended failed the backup with "PostgreSQL: psql exited -9"."""
    psql = tmp_path / "psql"
    psql.write_text("#!/bin/sh\nkill -9 $$\n")
    psql.chmod(0o755)
    with pytest.raises(SourceCommandFailed) as e, PgBackupSession(psql=str(psql)) as session:
        session.start("nightly")
    assert str(e.value) == "PostgreSQL: psql was killed by signal 9 (SIGKILL)"
