"""Real databases through a full and a differential snapshot, each restored, verified and started.

PostgreSQL: ``pg_basebackup`` copies of a live cluster, taken into one fixed
path, backed up by chunkvault; ``verify-restore`` then starts a server on each
restored copy and checks the row count that version had.  SQLite: copies made
with its online backup API, checked with ``PRAGMA integrity_check``.
"""
import json
import os
import random
import shlex
import shutil
import sqlite3
import sys

import pytest

from chunkvault import cli
from chunkvault.verify import verify_restore

import servers_pg

PASSWORD = "correct horse battery staple"


@pytest.fixture
def verify_cli(monkeypatch, capsys):
    """``chunkvault verify-restore ... --json`` through the real command line, in this process."""
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    monkeypatch.delenv("CHUNKVAULT_PASSWORD_FILE", raising=False)

    def run(*argv: str) -> tuple[int, dict]:
        capsys.readouterr()
        code = cli.main(["verify-restore", "--json", *argv])
        return code, json.loads(capsys.readouterr().out)

    return run


@pytest.fixture
def pg_bindir() -> str:
    return servers_pg.require_postgres()


@pytest.fixture
def pg_cluster(pg_bindir):
    cluster = servers_pg.PgCluster(pg_bindir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def take_basebackup(cluster: servers_pg.PgCluster, path: str) -> None:
    """Always into the same path, as a nightly job would: the old copy removed, a new one made."""
    shutil.rmtree(path, ignore_errors=True)
    cluster.basebackup(path)


def test_postgresql_basebackups_restore_and_start_with_their_row_counts(pg_cluster, pg_bindir, new_repo,
                                                                         tmp_path, verify_cli):
    c = pg_cluster
    c.sql("create table t (id int primary key, v text not null);"
          "insert into t select i, repeat(md5(i::text), 4) from generate_series(1, 60000) i")
    copy = os.path.join(c.backups, "A")
    repo = new_repo(str(tmp_path / "repo"))
    counts = []
    snaps = []

    changes = [
        "",
        "delete from t where id % 7 = 0; update t set v = upper(v) where id % 5 = 0;"
        "insert into t select i, md5(i::text) from generate_series(60001, 75000) i",
        "delete from t where id % 11 = 0; update t set v = v || 'x' where id % 3 = 0",
    ]
    for i, change in enumerate(changes):
        if change:
            c.sql(change)
        take_basebackup(c, copy)
        counts.append(c.sql("select count(*) from t"))
        # The last version is cut at fixed offsets: its deltas start from content-defined chunks.
        snaps.append(repo.backup([copy], fixed_chunks=["base/*"] if i == 2 else None).snapshot)

    assert counts[0] == "60000" and len(set(counts)) == 3
    assert [s.kind for s in snaps] == ["full", "diff", "diff"]
    assert snaps[2].parent == snaps[1].id and snaps[1].parent == snaps[0].id
    for diff in snaps[1:]:
        # Updates rewrite tuples all over the table's pages: its changed chunks differ from the old ones
        # by a little on every page, which is what delta blobs are for.
        assert diff.stats["delta_blobs"] > 0
        assert diff.stats["added_stored_bytes"] < snaps[0].stats["added_stored_bytes"]

    for snap, count in zip(snaps, counts):
        check = servers_pg.check_restore_command(pg_bindir, "select count(*) from t", count)
        code, doc = verify_cli("-r", str(tmp_path / "repo"), snap.id, "--then", check, "--timeout", "300")
        [report] = doc["snapshots"]
        assert report["mismatches"] == [] and report["error"] is None, report
        assert report["command"]["exit_code"] == 0, report["command"]["output"]
        assert "as expected" in report["command"]["output"]
        assert code == 0

    # The check is real: another version's count is not the first's.
    wrong = servers_pg.check_restore_command(pg_bindir, "select count(*) from t", counts[1])
    report = verify_restore(repo, snaps[0], then=wrong, timeout=300)
    assert not report.ok and report.command.exit_code == 1
    assert f"answered '{counts[0]}'" in report.command.output


def test_missing_postgresql_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(servers_pg, "find_pg_bindir", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="postgresql"):
        servers_pg.require_postgres()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="postgresql"):
        servers_pg.require_postgres()


def make_sqlite(path: str, rows: int, rnd: random.Random) -> None:
    db = sqlite3.connect(path)
    db.execute("create table t (id integer primary key, v blob not null)")
    db.executemany("insert into t values (?, ?)", ((i, rnd.randbytes(rnd.randrange(80, 240))) for i in range(rows)))
    db.commit()
    db.close()


def change_sqlite(path: str, rnd: random.Random) -> None:
    db = sqlite3.connect(path)
    (top,) = db.execute("select max(id) from t").fetchone()
    ids = rnd.sample(range(top + 1), 3000)
    db.executemany("update t set v = ? where id = ?", ((rnd.randbytes(rnd.randrange(80, 240)), i) for i in ids[:2000]))
    db.executemany("delete from t where id = ?", ((i,) for i in ids[2000:]))
    db.executemany("insert into t values (?, ?)", ((top + 1 + i, rnd.randbytes(150)) for i in range(400)))
    db.commit()
    db.close()


def online_copy(live: str, copy: str) -> int:
    """SQLite's online backup API into the fixed path; returns the copy's row count."""
    src = sqlite3.connect(live)
    dst = sqlite3.connect(copy)
    with dst:
        src.backup(dst)
    (n,) = dst.execute("select count(*) from t").fetchone()
    src.close()
    dst.close()
    return n


def sqlite_check(expect: int) -> str:
    code = ("import os, sqlite3, sys; "
            "db = sqlite3.connect('file:' + os.path.join(os.environ['CHUNKVAULT_RESTORE_DIR'], 'app.db') "
            "+ '?mode=ro', uri=True); "
            "ok = db.execute('PRAGMA integrity_check').fetchone()[0]; "
            "n = db.execute('select count(*) from t').fetchone()[0]; "
            "print(ok, n); "
            f"sys.exit(0 if ok == 'ok' and n == {expect} else 1)")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def test_sqlite_online_backups_restore_intact(tmp_path, new_repo, verify_cli):
    rnd = random.Random(7)
    live = str(tmp_path / "live.db")
    copies = tmp_path / "copies"
    copies.mkdir()
    copy = str(copies / "app.db")
    make_sqlite(live, 40000, rnd)
    repo = new_repo(str(tmp_path / "repo"))
    fixed = {"fixed_chunks": ["*.db"], "fixed_chunk_size": 64 << 10}  # SQLite pages stay in place
    counts = [online_copy(live, copy)]
    snaps = [repo.backup([str(copies)], **fixed).snapshot]
    for _ in range(2):
        change_sqlite(live, rnd)
        counts.append(online_copy(live, copy))
        snaps.append(repo.backup([str(copies)], **fixed).snapshot)
    assert len(set(counts)) == 3
    assert [s.kind for s in snaps] == ["full", "diff", "diff"]
    assert all(s.stats["delta_blobs"] > 0 for s in snaps[1:])

    for snap, count in zip(snaps, counts):
        code, doc = verify_cli("-r", str(tmp_path / "repo"), snap.id, "--then", sqlite_check(count))
        [report] = doc["snapshots"]
        assert code == 0, report
        assert report["files"] == 1 and report["command"]["output"] == f"ok {count}\n"

    report = verify_restore(repo, snaps[0], then=sqlite_check(counts[2]))
    assert not report.ok and report.command.exit_code == 1
