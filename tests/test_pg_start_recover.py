"""verify-restore --pg-start --pg-recover: a real PostgreSQL 15 archives its WAL into the repository, a
``backup --postgres`` snapshot of it is restored, recovered from the archive (served by verify-restore's own
relay: the server, another user, holds no password) to a restore point, a time or the end, promoted and
queried; a target the archive does not reach fails the snapshot, and nothing is left running."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import threading
import time
from datetime import datetime, timedelta

import pytest

import servers_pg
from chunkvault import Repository, pgstart
from chunkvault.verify import verify_restore
from conftest import PASSWORD

pytestmark = pytest.mark.slow

BATCH = 100


class Archived:
    """The cluster's story: 100 rows backed up, 100 more, the restore point ``mid`` (and a time just after
    it), 100 more, everything archived, the cluster stopped."""

    def __init__(self, url: str, shared: str, mid_time: str, last: str):
        self.url, self.shared, self.mid_time, self.last = url, shared, mid_time, last


@pytest.fixture(scope="module")
def archived():
    bindir = servers_pg.require_postgres()
    cluster = servers_pg.PgCluster(bindir)
    user = cluster.user
    direct = servers_pg.runnable_by(user)  # else PostgreSQL copies into a spool the test pushes from
    shared = servers_pg.shared_tempdir("chunkvault-pgrecover-")
    try:
        url = os.path.join(shared, "repo")
        password_file = servers_pg.password_file(shared, PASSWORD, user)
        spool = servers_pg.private_dir(os.path.join(shared, "spool"), user)
        servers_pg.give_to(shared, user)
        env = {**cluster.env(), "PATH": f"{bindir}:/usr/bin:/bin"}

        def cli(*args: str) -> str:
            argv = [sys.executable, "-m", "chunkvault.cli", *args, "-r", url, "--password-file", password_file]
            return servers_pg.run_as(user if direct else None, argv, env=env).stdout

        cli("init", "--kdf-time", "0")
        cluster.init()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n")
            push = servers_pg.command_line("archive-push", "-q", "-r", url, "--password-file", password_file) + " %p"
            f.write(servers_pg.conf_line("archive_command", push if direct else f"cp %p {shlex.quote(spool)}/%f"))
        cluster.start()
        c = cluster
        c.sql(f"create table t (id int primary key); insert into t select generate_series(1, {BATCH})")
        cli("backup", "--postgres", "--pg-connect", c.conninfo(), c.datadir)
        c.sql(f"insert into t select generate_series({BATCH + 1}, {2 * BATCH})")
        c.sql("select pg_create_restore_point('mid')")
        time.sleep(1.1)
        mid_time = c.sql("select clock_timestamp()::text")
        time.sleep(1.1)
        c.sql(f"insert into t select generate_series({2 * BATCH + 1}, {3 * BATCH})")
        last = servers_pg.switch_and_wait_archived(c)
        assert c.sql("select failed_count from pg_stat_archiver") == "0", c.log_tail()
        c.stop()
        if not direct:
            with Repository.open(url, PASSWORD) as repo:
                for name in sorted(os.listdir(spool)):  # in the order PostgreSQL archived them
                    repo.archive_push(os.path.join(spool, name))
        yield Archived(url, shared, mid_time, last)
    finally:
        cluster.destroy()
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture
def scratch():
    path = servers_pg.shared_tempdir("chunkvault-pgrecover-scratch-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def left_running(pid: int | None) -> list[str]:
    """What is left of the server that was ``pid`` (its group) and of any relay client whose run directory is
    gone (another test's, running beside this one, still has its own): their command lines."""
    return [cmd for p, group, cmd in servers_pg.live_processes()
            if pid is not None and pid in (p, group) or orphaned_client(cmd)]


def orphaned_client(cmdline: str) -> bool:
    """Whether a command line is the relay's client (``python -I RUNDIR/walfetch.py SOCKET ...``) and its run
    directory, removed once its verification ended, is gone."""
    words = cmdline.split()
    at = next((i for i, w in enumerate(words) if w.endswith("/walfetch.py")), None)
    return at is not None and not os.path.isdir(os.path.dirname(words[at]))


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "chunkvault-wal-relay"]


def test_recovery_to_a_restore_point_is_proven_with_the_rows_there(archived, cli, scratch):
    out = cli("verify-restore", "-r", archived.url, "--scratch", scratch, "--pg-start", "--pg-recover", "name=mid",
              "--pg-query", "select count(*) from t", "--pg-expect", str(2 * BATCH), "--json", password=PASSWORD)
    doc = json.loads(out.stdout)
    [report] = doc["snapshots"]
    [pg] = report["pg_start"]
    assert doc["ok"] and report["ok"], (pg["error"], pg["log_tail"])
    assert pg["answer"] == str(2 * BATCH) and pg["databases"] == ["postgres", "template1"]
    assert pg["recovery"]["target"] == "name" and pg["recovery"]["value"] == "mid"
    assert pg["recovery"]["action"] == "promote" and pg["recovery"]["signal"] == "recovery.signal"
    command = pg["recovery"]["settings"]["restore_command"]
    assert "walfetch.py" in command and PASSWORD not in command and "password" not in command
    served = pg["wal_served"]
    assert served["count"] >= 1 and served["first"] <= served["last"] <= archived.last and served["errors"] == []
    assert pg["replayed_until"]["lsn"] and pg["replayed_until"]["timestamp"].endswith("Z")
    assert pg["timeline"] == 2 and left_running(pg["pid"]) == [] and os.listdir(scratch) == []


def test_a_time_target_and_the_end_of_the_archive(archived, scratch):
    with Repository.open(archived.url, PASSWORD) as repo:
        at_time = verify_restore(repo, "latest", scratch=scratch, pg_start=True, pg_recover=f"time={archived.mid_time}",
                                 pg_query="select count(*) from t", pg_expect=str(2 * BATCH))
        [pg] = at_time.pg_start
        assert at_time.ok, (pg.error, pg.log_tail)
        assert pg.recovery["target"] == "time" and pg.timeline == 2
        target = datetime.strptime(pg.recovery["value"], "%Y-%m-%d %H:%M:%S.%f+00")
        assert datetime.strptime(pg.replayed_until["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ") <= target
        end = verify_restore(repo, "latest", scratch=scratch, pg_start=True, pg_recover="end",
                             pg_query="select count(*) from t", pg_expect=str(3 * BATCH))
        [pg] = end.pg_start
        assert end.ok, (pg.error, pg.log_tail)
        assert pg.recovery["action"] is None and pg.wal_served["last"] == archived.last
        assert left_running(pg.pid) == [] and not relay_threads() and os.listdir(scratch) == []


def test_a_time_target_before_the_named_snapshot_s_copy_fails_it(archived, scratch):
    """Started on it, PostgreSQL recovered to the first commit after the copy's consistent point and was
    promoted there: the snapshot passed as recovered to a time its rows postdate."""
    with Repository.open(archived.url, PASSWORD) as repo:
        snap = repo.snapshot("latest")
        before = (snap.datetime - timedelta(hours=1)).isoformat()
        report = verify_restore(repo, snap.id, scratch=scratch, pg_start=True, pg_recover=f"time={before}",
                                pg_query="select count(*) from t")
    [pg] = report.pg_start
    assert not report.ok and pg.answer is None, (pg.error, pg.answer)
    assert "cannot recover to time=" in pg.error and "global/pg_control" in pg.error, pg.error
    assert left_running(pg.pid) == [] and not relay_threads() and os.listdir(scratch) == []


def test_a_target_the_archive_does_not_reach_fails_with_the_log_tail(archived, cli, scratch):
    out = cli("verify-restore", "-r", archived.url, "--scratch", scratch, "--pg-start", "--pg-recover",
              "lsn=FF/0", "--pg-query", "select 1", password=PASSWORD, check=18)
    text, err = out.stdout.decode(), out.stderr.decode()
    assert "recovering to lsn=FF/0 from the archive" in text, text
    assert "recovery ended before configured recovery target was reached" in text and "FAILED" in text, text
    assert "log: " in err and "restored log file" in err, err
    assert left_running(None) == [] and os.listdir(scratch) == []

    js = cli("verify-restore", "-r", archived.url, "--scratch", scratch, "--pg-start", "--pg-recover",
             "name=never made", "--json", password=PASSWORD, check=18)
    [pg] = json.loads(js.stdout)["snapshots"][0]["pg_start"]
    assert pg["error"].startswith("PostgreSQL exited 1") and "recovery target was reached" in pg["error"]
    assert pg["log_tail"] and pg["wal_served"]["count"] >= 1 and pg["timeline"] is None
    assert left_running(pg["pid"]) == [] and os.listdir(scratch) == []


def test_standby_is_refused_in_one_line(archived, cli, scratch):
    out = cli("verify-restore", "-r", archived.url, "--scratch", scratch, "--pg-start", "--pg-recover", "standby",
              password=PASSWORD, check=2)
    assert out.stderr.decode().count("\n") == 1 and "promoted at" in out.stderr.decode()


def test_an_interrupt_during_the_recovery_stops_the_server_and_the_relay(archived, scratch, monkeypatch):
    seen = []

    def interrupted(self, deadline):
        seen.append(self.proc.pid)
        end = time.monotonic() + 60
        while "restored log file" not in self.log_tail() and time.monotonic() < end:
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(pgstart.Server, "wait_ready", interrupted)
    with Repository.open(archived.url, PASSWORD) as repo:
        with pytest.raises(KeyboardInterrupt):
            verify_restore(repo, "latest", scratch=scratch, pg_start=True, pg_recover="end")
    assert seen and left_running(seen[0]) == [] and not relay_threads() and os.listdir(scratch) == []


def test_a_recovery_to_the_end_that_stops_at_a_gap_in_the_archive_fails(archived, scratch, tmp_path):
    """A segment lost from the repository with later ones of its timeline archived: PostgreSQL, told it is not
    archived, takes that for the end and is promoted there, rows short; that is no proof of the archive."""
    url = str(tmp_path / "gapped")
    shutil.copytree(archived.url, url)
    wal = os.path.join(url, "wal")
    os.rename(os.path.join(wal, archived.last), os.path.join(wal, archived.last[:16] + "%08X"
                                                                 % (int(archived.last[16:], 16) + 1)))
    with Repository.open(url, PASSWORD) as repo:
        report = verify_restore(repo, "latest", scratch=scratch, pg_start=True, pg_recover="end",
                                pg_query="select count(*) from t")
    [pg] = report.pg_start
    assert not report.ok and pg.answer is None, (pg.error, pg.answer)
    assert f"the recovery ended at {archived.last}, which is not archived" in pg.error and "gap" in pg.error
    assert left_running(pg.pid) == [] and os.listdir(scratch) == []


def test_a_recovery_to_the_end_that_stops_at_an_archived_segment_that_does_not_continue_the_wal_fails(
        archived, scratch, tmp_path):
    """A segment archived with content that does not continue the WAL (its page header, zeros after it here:
    damaged before it was pushed): every file was delivered, PostgreSQL took it for the end of the WAL and
    was promoted short of the archive's end, rows short, and the recovery passed."""
    url = str(tmp_path / "garbled")
    shutil.copytree(archived.url, url)
    zeros = tmp_path / archived.last
    with Repository.open(url, PASSWORD) as repo:
        repo.archive_get(archived.last, str(zeros))
    head = zeros.read_bytes()[:40]  # the long page header: what archive-push checks
    zeros.write_bytes(head + bytes(zeros.stat().st_size - len(head)))
    os.unlink(os.path.join(url, "wal", archived.last))
    with Repository.open(url, PASSWORD) as repo:
        repo.archive_push(str(zeros))
        report = verify_restore(repo, "latest", scratch=scratch, pg_start=True, pg_recover="end",
                                pg_query="select count(*) from t")
    [pg] = report.pg_start
    assert not report.ok and pg.answer is None and pg.wal_served["errors"] == [], (pg.error, pg.answer)
    assert f"short of the archive's end ({archived.last} is archived): {archived.last}, archived after it, " \
           "does not continue the WAL" in pg.error, pg.error
    assert left_running(pg.pid) == [] and os.listdir(scratch) == []


def test_where_a_recovery_to_the_end_stopped_against_the_archive():
    seg = 16 << 20
    served = ["00000001000000000000000A", "00000001000000000000000B", "00000001000000000000000A"]
    archived = ["00000001000000000000000A", "00000001000000000000000B", "00000001000000000000000C",
                "00000001000000000000000C.00000028.backup", "00000002.history", "00000001000000000000000D.partial"]
    assert pgstart.short_of_archive(served, [], "0/B000000", seg, archived) == (
        "00000001000000000000000A", "00000001000000000000000B", "00000001000000000000000C")
    # a last record ending at a segment's very end: the replay ends where the next one starts
    assert pgstart.short_of_archive(served, [], "0/D000000", seg, archived) is None
    assert pgstart.short_of_archive(served, [], "0/C00A0B8", seg, archived) is None
    # the newest timeline served is the one followed: the old one's later segments are none of its own
    on_two = [*served, "00000002000000000000000B"]
    assert pgstart.short_of_archive(on_two, [], "0/B800000", seg, archived) is None
    assert pgstart.short_of_archive([], [], "0/B000000", seg, archived) is None
    assert pgstart.short_of_archive(served, [], None, seg, archived) is None
    assert pgstart.short_of_archive(served, [], "0/B000000", 0, archived) is None
    # told that B was not archived (a running server archived it since): the end of the archive as it was
    assert pgstart.short_of_archive(served[:1], ["00000001000000000000000B"], "0/A800000", seg, archived) is None
    # told that A itself was not archived yet (a standby's last segment): it replayed the copy's pg_wal/A
    assert pgstart.short_of_archive(served[:1], ["00000001000000000000000A"], "0/A800000", seg, archived) is None
    assert pgstart.short_of_archive(served[:1], ["00000002.history"], "0/A800000", seg, archived) == (
        "00000001000000000000000A", "00000001000000000000000B", "00000001000000000000000C")


def test_targets_on_a_later_timeline_after_a_promotion_and_the_segments_served(scratch):
    """A point-in-time recovery of the cluster went back to ``mid`` and was promoted (timeline 2), archiving
    on into the same repository: the snapshot, taken on timeline 1, recovers along timeline 2 to its end and
    to a time on it; the files served are named by the first and last segments, not by a history file
    PostgreSQL asks for again at its promotion."""
    bindir = servers_pg.require_postgres()
    cluster = servers_pg.PgCluster(bindir)
    user = cluster.user
    shared = servers_pg.shared_tempdir("chunkvault-pgtimeline-")
    promoted = None
    try:
        url = os.path.join(shared, "repo")
        password_file = servers_pg.password_file(shared, PASSWORD, user)
        spool = servers_pg.private_dir(os.path.join(shared, "spool"), user)
        servers_pg.give_to(shared, user)
        push = f"test ! -f {shlex.quote(spool)}/%f && cp %p {shlex.quote(spool)}/%f"

        def cli(*args: str) -> None:
            servers_pg.run_as(None, [sys.executable, "-m", "chunkvault.cli", *args, "-r", url, "--password-file",
                                     password_file], env={**cluster.env(), "PATH": f"{bindir}:/usr/bin:/bin"})

        def push_spooled() -> None:  # as PostgreSQL archived them: the history file before its segments
            with Repository.open(url, PASSWORD) as repo:
                for name in sorted(os.listdir(spool), key=lambda n: (not n.endswith(".history"), n)):
                    if not name.startswith("."):
                        repo.archive_push(os.path.join(spool, name))
                        os.rename(os.path.join(spool, name), os.path.join(spool, "." + name))

        cli("init", "--kdf-time", "0")
        cluster.init()
        with open(os.path.join(cluster.datadir, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n" + servers_pg.conf_line("archive_command", push))
        cluster.start()
        cluster.sql(f"create table t (id int primary key); insert into t select generate_series(1, {BATCH})")
        cli("backup", "--postgres", "--pg-connect", cluster.conninfo(), cluster.datadir)
        cluster.sql(f"insert into t select generate_series({BATCH + 1}, {2 * BATCH})")
        cluster.sql("select pg_create_restore_point('mid')")
        cluster.sql(f"insert into t select generate_series({2 * BATCH + 1}, {3 * BATCH})")
        servers_pg.switch_and_wait_archived(cluster)
        cluster.stop()
        push_spooled()
        again = os.path.join(shared, "again")
        cli("restore", "--target", again, "--pg-recover", "name=mid", "--pg-target-action", "promote",
            "--pg-restore-command", f"cp {shlex.quote(spool)}/.%f %p")
        with open(os.path.join(again, "postgresql.conf"), "a") as f:
            f.write("archive_mode = on\n" + servers_pg.conf_line("archive_command", push))
        promoted = servers_pg.start_restored(bindir, again)
        servers_pg.wait_promoted(promoted)
        promoted.sql(f"insert into t select generate_series(1001, {1000 + BATCH})")
        time.sleep(1.1)
        on_two = promoted.sql("select clock_timestamp()::text")
        time.sleep(1.1)
        promoted.sql(f"insert into t select generate_series(2001, {2000 + BATCH})")
        last = servers_pg.switch_and_wait_archived(promoted)
        assert last.startswith("00000002")
        promoted.stop()
        push_spooled()
        with Repository.open(url, PASSWORD) as repo:
            for target, rows in (("end", 4 * BATCH), (f"time={on_two}", 3 * BATCH)):
                report = verify_restore(repo, "latest", scratch=scratch, pg_start=True, pg_recover=target,
                                        pg_query="select count(*) from t", pg_expect=str(rows))
                [pg] = report.pg_start
                assert report.ok, (target, pg.error, pg.log_tail)
                assert pg.timeline == 3 and left_running(pg.pid) == []
                served = pg.wal_served
                assert served["first"].startswith("00000001") and len(served["first"]) == 24, served
                assert served["last"].startswith("00000002") and len(served["last"]) == 24, served
            assert served["last"] <= last and pg.wal_served is served
        report = verify_restore(repo_again := Repository.open(url, PASSWORD), "latest", scratch=scratch,
                                pg_start=True, pg_recover="end")
        repo_again.close()
        assert report.ok and report.pg_start[0].wal_served["last"] == last
        assert os.listdir(scratch) == []
    finally:
        if promoted is not None:
            promoted.discard()
        cluster.destroy()
        shutil.rmtree(shared, ignore_errors=True)
