"""backup --postgres from a streaming standby: the primary writes, the standby is read.

Rows are written on the primary before the backup, once it has started and once every file is read; the
test waits only for the standby to have received the last ones, so the backup's own wait for their replay
is what brings them into the copy.  Restored, the copy starts as a primary and holds them all.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator

import pytest

from chunkvault.errors import SourceCommandFailed, UsageError
from chunkvault.pgbackup import PostgresOnline
from chunkvault.pgsession import label_field
from servers_pg import PgCluster, require_postgres, start_restored
from test_pgsession import cluster  # noqa: F401  (the primary, with table t)

slow = pytest.mark.slow  # real clusters


@pytest.fixture(scope="module")
def standby(cluster):  # noqa: F811
    replica = cluster.standby()
    try:
        yield replica
    finally:
        replica.destroy()
        cluster.sql("SELECT pg_drop_replication_slot('standby')")


@pytest.fixture
def psql_on_path(cluster, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PATH", f"{cluster.bindir}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("PGHOST", "/nonexistent")  # the connection string says where the standby is


@pytest.fixture
def during(monkeypatch):
    """Calls made inside the backup: ``during["start"]`` once it has begun, ``during["read"]`` once every
    file is read, before the stop."""
    calls: dict = {}
    begin, appendix = PostgresOnline.begin, PostgresOnline.appendix

    def begun(self):
        begin(self)
        if calls.get("start"):
            calls["start"]()

    def read(self):
        if calls.get("read"):
            calls["read"]()
        return appendix(self)

    monkeypatch.setattr(PostgresOnline, "begin", begun)
    monkeypatch.setattr(PostgresOnline, "appendix", read)
    return calls


@contextlib.contextmanager
def primary_and_standby() -> Iterator[tuple[PgCluster, PgCluster]]:
    """A primary and a streaming standby of their own, for a test that stops or reconfigures one of them."""
    with PgCluster(require_postgres()) as primary:
        primary.init()
        primary.start()
        replica = primary.standby()
        try:
            yield primary, replica
        finally:
            replica.destroy()


def _restored_rows(base: str, bindir: str, repo, snap, where: str) -> str:
    target = os.path.join(base, where)  # the server user reaches it
    repo.restore(snap.id, target)
    assert not os.path.exists(os.path.join(target, "standby.signal"))
    server = start_restored(bindir, target)
    try:
        assert server.sql("SELECT pg_is_in_recovery()") == "f"  # a primary of its own
        return server.sql("SELECT count(*), count(*) FILTER (WHERE pad = 'c'), max(id) FROM t")
    finally:
        server.discard()
        shutil.rmtree(target, ignore_errors=True)


@slow
def test_a_full_then_a_differential_from_the_standby_hold_every_row_the_primary_committed_before_their_stops(
        cluster, standby, new_repo, psql_on_path, during):  # noqa: F811
    repo = new_repo()
    cluster.sql("TRUNCATE t; INSERT INTO t SELECT g, repeat('a', 200) FROM generate_series(1, 5000) g")
    standby.received(cluster, replayed=True)

    def on_start():
        cluster.sql("INSERT INTO t SELECT g, repeat('b', 2000) FROM generate_series(5001, 10000) g; CHECKPOINT")

    def on_read():
        cluster.sql("INSERT INTO t SELECT g, repeat('c', 2000) FROM generate_series(10001, 20000) g; "
                    "UPDATE t SET pad = 'c' WHERE id <= 3000; CHECKPOINT")
        standby.received(cluster)  # received, maybe not replayed: the backup waits for that

    during.update(start=on_start, read=on_read)
    full = repo.backup([standby.datadir], postgres=standby.conninfo()).snapshot
    cluster.sql("INSERT INTO t SELECT g, 'after' FROM generate_series(20001, 20500) g")
    pg = full.stats["postgres"]
    assert full.kind == "full" and pg["standby"] is True and len(pg["wal"]) >= 2
    assert pg["timeline"] == int(standby.sql("SELECT timeline_id FROM pg_control_checkpoint()"))
    names = {e.path for e in repo.tree(full.id)}
    assert {b"backup_label", b"global/pg_control"} <= names and {f"pg_wal/{w}".encode() for w in pg["wal"]} <= names
    assert b"standby.signal" not in names and b"postmaster.pid" not in names
    with repo.open_file(full, "backup_label") as f:
        label = f.read().decode()
    assert label_field(label, "BACKUP FROM") == "standby"
    assert _restored_rows(cluster.base, cluster.bindir, repo, full, "r1") == "20000|3000|20000"
    assert standby.sql("SELECT count(*) FROM pg_replication_slots") == "0"  # the backup's slot went with it

    during.update(start=lambda: cluster.sql("DELETE FROM t WHERE id > 20400"),
                  read=lambda: (cluster.sql("UPDATE t SET pad = 'd' WHERE id <= 100; CHECKPOINT"),
                                standby.received(cluster)))
    diff = repo.backup([standby.datadir], postgres=standby.conninfo()).snapshot
    assert diff.kind == "diff" and diff.parent == full.id and diff.stats["postgres"]["standby"] is True
    assert _restored_rows(cluster.base, cluster.bindir, repo, diff, "r2") == "20400|2900|20400"
    assert standby.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert cluster.sql("SELECT string_agg(slot_name, ',') FROM pg_replication_slots") == "standby"


@slow
def test_the_slot_on_the_standby_keeps_the_wal_from_the_start_through_its_restartpoints(
        cluster, standby, new_repo, psql_on_path, during):  # noqa: F811
    """Segments past the start are written, replayed and checkpointed over while the files are read (the
    standby keeps no WAL of its own for them: wal_keep_size is 0); the copy still gets them all."""
    assert standby.sql("SHOW wal_keep_size") == "0"
    repo = new_repo()

    def on_read():
        for _ in range(3):
            cluster.sql("INSERT INTO t SELECT g, repeat('w', 2000) FROM generate_series(30001, 36000) g; "
                        "DELETE FROM t WHERE id > 30000; SELECT pg_switch_wal(); CHECKPOINT")
        standby.received(cluster, replayed=True)
        standby.sql("CHECKPOINT")  # a restartpoint: what no slot holds goes

    during.update(read=on_read)
    snap = repo.backup([standby.datadir], postgres=standby.conninfo()).snapshot
    assert len(snap.stats["postgres"]["wal"]) >= 4
    expected = cluster.sql("SELECT count(*), count(*) FILTER (WHERE pad = 'c'), max(id) FROM t")
    assert _restored_rows(cluster.base, cluster.bindir, repo, snap, "r3") == expected


@slow
def test_a_paused_standby_is_refused_at_the_start_and_at_the_stop(cluster, standby, new_repo, cli, tmp_path,
                                                                   psql_on_path, during):  # noqa: F811
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    standby.sql("SELECT pg_wal_replay_pause()")
    try:
        out = cli("backup", "-r", url, "--postgres", "--pg-connect", standby.conninfo(), standby.datadir, check=20)
        err = out.stderr.decode()
        assert err.startswith("chunkvault: PostgreSQL is a standby whose replay is paused") and err.count("\n") == 1
    finally:
        standby.sql("SELECT pg_wal_replay_resume()")

    def pause_then_write():  # paused with WAL received and not replayed: the stop's wait cannot end
        standby.sql("SELECT pg_wal_replay_pause()")
        cluster.sql("INSERT INTO t VALUES (99999, 'x')")
        standby.received(cluster)

    during.update(read=pause_then_write)
    try:
        with pytest.raises(SourceCommandFailed, match="replay is paused"):
            repo.backup([standby.datadir], postgres=standby.conninfo())
    finally:
        standby.sql("SELECT pg_wal_replay_resume()")
        cluster.sql("DELETE FROM t WHERE id = 99999")
    assert repo.snapshots() == []
    assert standby.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    during.clear()  # the backup mode was aborted: another starts
    assert repo.backup([standby.datadir], postgres=standby.conninfo()).snapshot.stats["postgres"]["standby"]


@slow
def test_a_standby_whose_primary_went_away_fails_once_its_wait_is_over(new_repo, cli, tmp_path, psql_on_path):
    with primary_and_standby() as (primary, replica):
        primary.stop()
        url = str(tmp_path / "repo")
        repo = new_repo(url)
        with pytest.raises(SourceCommandFailed, match=r"has not streamed from a primary for 1\.5 s"):
            repo.backup([replica.datadir], postgres=replica.conninfo(), pg_standby_wait=1.5)
        out = cli("backup", "-r", url, "--postgres", "--pg-connect", replica.conninfo(), "--pg-standby-wait", "1",
                  replica.datadir, check=20)
        assert "has not streamed from a primary for 1 s" in out.stderr.decode()
        assert out.stderr.decode().count("\n") == 1
        policy = tmp_path / "policy.toml"
        policy.write_text(f"""repository = "{url}"
full = "daily 02:00"
[[source]]
name = "standby"
paths = ["{replica.datadir}"]
postgres = "{replica.conninfo()}"
pg-standby-wait = 0.5
""")
        run = cli("run", "--config", str(policy), check=False)
        assert run.returncode != 0 and "for 0.5 s" in run.stderr.decode() + run.stdout.decode()
        assert repo.snapshots() == []
        assert replica.sql("SELECT count(*) FROM pg_replication_slots") == "0"


def test_the_standby_wait_is_checked(new_repo, cli, tmp_path):
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    with pytest.raises(UsageError, match="give postgres too"):
        repo.backup([str(tmp_path)], pg_standby_wait=5)
    for bad in (0, -1, "5", True):
        with pytest.raises(UsageError, match="pg_standby_wait is a number of seconds above 0"):
            repo.backup([str(tmp_path)], postgres="", pg_standby_wait=bad)
    assert "give --postgres too" in cli("backup", "-r", url, "--pg-standby-wait", "5", str(tmp_path),
                                        check=2).stderr.decode()
    assert "above 0" in cli("backup", "-r", url, "--postgres", "--pg-standby-wait", "0", str(tmp_path),
                            check=2).stderr.decode()
    from chunkvault.schedule import parse_policy

    source = {"name": "db", "paths": [str(tmp_path)], "full": "daily 02:00"}
    with pytest.raises(UsageError, match="set postgres too"):
        parse_policy({"repository": url, "source": [{**source, "pg-standby-wait": 5}]})
    with pytest.raises(UsageError, match="pg-standby-wait must be a positive number of seconds"):
        parse_policy({"repository": url, "source": [{**source, "postgres": True, "pg-standby-wait": 0}]})
    assert parse_policy({"repository": url, "source": [{**source, "postgres": True, "pg-standby-wait": 5}]}
                        ).sources[0].pg_standby_wait == 5
    assert repo.snapshots() == []


@slow
def test_the_json_of_a_standby_backup_says_so(cluster, standby, tmp_path, new_repo, cli, psql_on_path):  # noqa: F811
    url = str(tmp_path / "repo")
    new_repo(url)
    out = cli("backup", "-r", url, "--postgres", "--pg-connect", standby.conninfo(), standby.datadir, "--json")
    pg = json.loads(out.stdout)["stats"]["postgres"]
    assert pg["standby"] is True and pg["wal"] and pg["start_wal"] == pg["wal"][0]


def test_the_control_file_is_read_last_after_every_other_file_and_before_the_stop(tmp_path):
    """A standby's copy becomes consistent at the minimum recovery point its ``pg_control`` records: the walk
    leaves the file out and the appendix reads it once every other file is read, before the stop (which the
    server may follow with a newer control file at once)."""
    from chunkvault.pgsession import BackupStart, BackupStop

    datadir = tmp_path / "data"
    (datadir / "global").mkdir(parents=True)
    (datadir / "pg_wal").mkdir()
    (datadir / "global" / "pg_control").write_bytes(b"read last")
    (datadir / "pg_wal" / "000000010000000000000002").write_bytes(b"wal")

    class Session:
        def tablespaces(self):
            return []

        def stop(self):
            (datadir / "global" / "pg_control").write_bytes(b"after the stop")
            return BackupStop(0x2000100, "START TIMELINE: 1\n", "", 0x2000028, 1, 0x2000200)

    online = PostgresOnline(str(datadir))
    online._session = Session()
    online._started = BackupStart(0x2000028, str(datadir), 150000, 16 << 20, standby=True)
    assert online.leave_out(b"global", [b"1260", b"pg_control", b"pg_filenode.map"]) == {b"pg_control"}
    assert online.leave_out(b"base/1", [b"pg_control"]) == set()
    added, stats = online.appendix()
    [control] = [a for a in added if a.path == b"global/pg_control"]
    with control.open() as f:
        assert f.read() == b"read last"
    assert stats["postgres"]["standby"] is True and stats["postgres"]["stop_lsn"] == "0/2000200"
    assert stats["postgres"]["wal"] == ["000000010000000000000002"]


@pytest.mark.parametrize("standby", [True, False])
def test_a_segment_gone_from_pg_wal_says_where_a_standby_has_it(tmp_path, standby):
    """A standby that caught up through its restore_command has that WAL in its archive, never in pg_wal: the
    refusal says so, rather than read as WAL recycled under the backup."""
    from chunkvault.pgsession import BackupStart, BackupStop

    datadir = tmp_path / "data"
    (datadir / "global").mkdir(parents=True)
    (datadir / "pg_wal").mkdir()
    (datadir / "global" / "pg_control").write_bytes(b"control")

    class Session:
        def tablespaces(self):
            return []

        def stop(self):
            return BackupStop(0x2000100, "START TIMELINE: 1\n", "", 0x2000028, 1, 0x2000200)

    online = PostgresOnline(str(datadir))
    online._session = Session()
    online._started = BackupStart(0x2000028, str(datadir), 150000, 16 << 20, standby=standby)
    with pytest.raises(SourceCommandFailed, match="WAL segment 000000010000000000000002, which the backup needs, "
                                                  "is gone from") as caught:
        online.appendix()
    assert ("caught up through its restore_command" in str(caught.value)) == standby


@slow
def test_a_delayed_standby_that_does_not_replay_in_time_is_told_apart(new_repo, tmp_path, psql_on_path):
    """``recovery_min_apply_delay`` holds each commit back: the wait for the replay ends saying so, not as
    though the standby were stuck."""
    with primary_and_standby() as (primary, replica):
        replica.stop()
        replica.settings = (*replica.settings, "recovery_min_apply_delay=10min")
        replica.start()
        primary.sql("CREATE TABLE d (x int); INSERT INTO d VALUES (1)")
        replica.received(primary)
        repo = new_repo(str(tmp_path / "repo"))
        with pytest.raises(SourceCommandFailed, match=r"within 1 s \(it applies WAL 10min late: "
                                                      r"recovery_min_apply_delay"):
            repo.backup([replica.datadir], postgres=replica.conninfo(), pg_standby_wait=1)
