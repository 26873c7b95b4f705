"""backup --postgres of a cluster with a tablespace outside its data directory, and its restores.

The tablespace holds a table, its index and an unlogged table; rows go in while the backup runs.  Restored
plainly, the tablespace is a directory in ``pg_tblspc`` and the data directory starts on its own; restored
with ``--pg-tablespace``, it lies where it is told, linked from ``pg_tblspc``.  Either way the server counts
every row committed before the stop, through the table and through its index.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from chunkvault.errors import SourceCommandFailed
from chunkvault.store.manifest import T_DIR, T_FILE, T_SYMLINK
from servers_pg import PgCluster, check_restore_command, give_to, private_dir, require_postgres, start_restored
from test_pg_online import during, pg_env  # noqa: F401  (over this module's cluster)

pytestmark = pytest.mark.slow

ROWS = "SELECT count(*), count(DISTINCT pad), max(id) FROM ts_t"
INDEXED = "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(*) FROM ts_t WHERE id BETWEEN 11 AND 20"


@pytest.fixture(scope="module")
def cluster():
    """A running cluster with the tablespace ``ts1`` (a table with an index, an unlogged table) and, in the
    tablespace's location, another server version's directory as pg_upgrade leaves it."""
    bindir = require_postgres()
    with PgCluster(bindir, settings=("fsync=off", "max_wal_size=64MB")) as c:
        c.init()
        c.start()
        c.location = os.path.join(c.base, "ts1")
        c.create_tablespace("ts1", c.location)
        c.sql("CREATE TABLE ts_t (id int PRIMARY KEY USING INDEX TABLESPACE ts1, pad text) TABLESPACE ts1; "
              "CREATE UNLOGGED TABLE ts_u (id int) TABLESPACE ts1; "
              "INSERT INTO ts_t SELECT g, 'a' FROM generate_series(1, 5000) g; "
              "INSERT INTO ts_u SELECT generate_series(1, 1000)")
        c.oid = int(c.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'"))
        old = os.path.join(c.location, "PG_9.6_201608131", "1")
        os.makedirs(old)
        with open(os.path.join(old, "1234"), "wb") as f:
            f.write(b"an older server's relation")
        give_to(c.location, c.user, recursive=True)
        yield c


def _counted(bindir: str, datadir: str) -> tuple[str, str, str]:
    """The rows of the tablespace's table (all, and through its index) and of its unlogged table, on a server
    started on ``datadir``."""
    server = start_restored(bindir, datadir)
    try:
        return server.sql(ROWS), server.sql(INDEXED), server.sql("SELECT count(*) FROM ts_u")
    finally:
        server.discard()


def test_a_tablespace_is_backed_up_in_the_data_directory_tree_and_restores_to_a_server_that_starts(
        cluster, new_repo, pg_env, during, tmp_path, cli):
    repo = new_repo(str(tmp_path / "repo"))
    during["start"] = "INSERT INTO ts_t SELECT g, 'b' FROM generate_series(5001, 8000) g; CHECKPOINT"
    during["read"] = "INSERT INTO ts_t SELECT g, 'c' FROM generate_series(8001, 9000) g; UPDATE ts_t SET pad = 'c' " \
                     "WHERE id <= 20; CHECKPOINT"
    snap = repo.backup([cluster.datadir], postgres="").snapshot
    cluster.sql("INSERT INTO ts_t VALUES (9001, 'after')")
    link, held = f"pg_tblspc/{cluster.oid}", f"chunkvault_tblspc/{cluster.oid}"
    version = [n for n in os.listdir(cluster.location) if n.startswith("PG_15_")]
    assert snap.stats["postgres"]["tablespaces"] == [{"oid": cluster.oid, "name": "ts1", "location": cluster.location}]
    tree = {e.path.decode(): e for e in repo.tree(snap.id)}
    assert tree[link].type == T_SYMLINK and tree[link].target == f"../{held}".encode()
    assert tree[held].type == T_DIR and len(version) == 1
    below = sorted(p for p in tree if p.startswith(held + "/"))
    assert below and all(p.startswith(f"{held}/{version[0]}") for p in below)  # not the older server's directory
    assert not any(p.startswith(link + "/") for p in tree) and "tablespace_map" not in tree
    table = cluster.sql("SELECT pg_relation_filepath('ts_t')")  # pg_tblspc/OID/PG_15_.../DB/REL
    unlogged = cluster.sql("SELECT pg_relation_filepath('ts_u')").replace(link, held, 1)
    assert table.startswith(link) and tree[table.replace(link, held, 1)].type == T_FILE
    assert f"{unlogged}_init" in tree and unlogged not in tree  # as in the data directory: the init fork alone

    target = os.path.join(cluster.base, "plain")  # a plain restore: one self-contained directory
    repo.restore(snap.id, target)
    assert os.path.realpath(os.path.join(target, link)) == os.path.realpath(os.path.join(target, held))
    assert _counted(cluster.bindir, target) == ("9000|3|9000", "10", "0")
    shutil.rmtree(target)

    check = check_restore_command(cluster.bindir, ROWS, "9000|3|9000")
    out = cli("verify-restore", "-r", str(tmp_path / "repo"), snap.id, "--then", check, "--timeout", "300", "--json")
    [report] = json.loads(out.stdout)["snapshots"]
    assert report["mismatches"] == [] and report["command"]["exit_code"] == 0, report

    mapped, elsewhere = os.path.join(cluster.base, "mapped"), os.path.join(cluster.base, "ts1-elsewhere")
    out = cli("restore", "-r", str(tmp_path / "repo"), snap.id, "--target", mapped, "--pg-tablespace",
              f"ts1={elsewhere}", "--json")
    restored = json.loads(out.stdout)
    assert restored["files"] + restored["links"] == snap.stats["files"]  # the tablespace's files counted too
    assert os.readlink(os.path.join(mapped, link)) == elsewhere
    assert os.listdir(elsewhere) == version and not os.listdir(os.path.join(mapped, "chunkvault_tblspc"))
    assert _counted(cluster.bindir, mapped) == ("9000|3|9000", "10", "0")
    server = start_restored(cluster.bindir, mapped)  # it writes where the tablespace now is, not at the live one
    try:
        assert server.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'") == elsewhere
        server.sql("INSERT INTO ts_t VALUES (100000, 'moved'); CHECKPOINT")
    finally:
        server.discard()
    assert cluster.sql("SELECT count(*) FROM ts_t WHERE id = 100000") == "0"
    fresh = os.path.join(cluster.base, "fresh")  # an empty target, but the tablespace's directory is not
    again = cli("restore", "-r", str(tmp_path / "repo"), snap.id, "--target", fresh, "--pg-tablespace",
                f"{cluster.oid}={elsewhere}", check=2).stderr.decode()
    assert f"{elsewhere} is not empty" in again and len(again.splitlines()) == 1 and not os.path.exists(fresh)
    cli("restore", "-r", str(tmp_path / "repo"), snap.id, "--target", mapped, "--pg-tablespace",
        f"{cluster.oid}={elsewhere}", "--confirm", "RESTORE", "--delta", "--delete", "--verify")
    assert os.readlink(os.path.join(mapped, link)) == elsewhere
    assert _counted(cluster.bindir, mapped)[0] == "9000|3|9000"  # back as the snapshot had it
    shutil.rmtree(mapped)
    shutil.rmtree(elsewhere)
    for spec, said in [("ts9=/x", "has no tablespace 'ts9' (its tablespaces: ts1 (oid"), ("ts1", "OID_OR_NAME=DIR")]:
        err = cli("restore", "-r", str(tmp_path / "repo"), snap.id, "--target", mapped, "--pg-tablespace", spec,
                  check=2).stderr.decode()
        assert said in err and len(err.splitlines()) == 1
    assert not os.path.exists(mapped)

    during.clear()
    diff = repo.backup([cluster.datadir], postgres="").snapshot  # the link is a directory in the parent too
    assert diff.kind == "diff" and diff.stats["postgres"]["tablespaces"][0]["oid"] == cluster.oid
    target = os.path.join(cluster.base, "plain-diff")
    repo.restore(diff.id, target)
    assert _counted(cluster.bindir, target)[0] == "9001|4|9001"
    shutil.rmtree(target)


@pytest.mark.parametrize("change", ["create", "drop"])
def test_a_tablespace_created_or_dropped_during_the_backup_fails_it(cluster, new_repo, pg_env, during, tmp_path,
                                                                    change):
    """Its record lies in the WAL the copy would replay: a creation would link (and write) the live location."""
    location = private_dir(os.path.join(cluster.base, f"ts-{change}"), cluster.user)
    if change == "drop":
        cluster.sql(f"CREATE TABLESPACE ts_{change} LOCATION '{location}'")
        during["read"] = f"DROP TABLESPACE ts_{change}"
    else:
        during["start"] = f"CREATE TABLESPACE ts_{change} LOCATION '{location}'"
    repo = new_repo()
    with pytest.raises(SourceCommandFailed, match=f"tablespaces changed during the backup \\(ts_{change} "
                                                  f"{change}[a-z]*\\).*take it again"):
        repo.backup([cluster.datadir], postgres="")
    assert repo.snapshots() == [] and cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    cluster.sql(f"DROP TABLESPACE IF EXISTS ts_{change}")


def test_a_tablespace_whose_location_is_missing_is_named_not_said_to_have_vanished(cluster, new_repo, pg_env):
    """Its directory gone before the backup began (or never made), the walk warned "vanished during backup"
    of the location: as if it went while read, and with nothing to say it is a tablespace, or which."""
    location = private_dir(os.path.join(cluster.base, "ts-missing"), cluster.user)
    cluster.sql(f"CREATE TABLESPACE ts_missing LOCATION '{location}'")
    oid = cluster.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts_missing'")
    shutil.rmtree(location)
    try:
        result = new_repo().backup([cluster.datadir], postgres="")
    finally:
        cluster.sql("DROP TABLESPACE ts_missing")
    assert not [w for w in result.warnings if "vanished" in w]
    assert [w for w in result.warnings if "tablespace" in w] == [
        f"tablespace ts_missing (oid {oid}) has no directory at its location {location} (never made there, or "
        "removed since): nothing of it stored"]
    assert not result.partial and result.snapshot.stats["postgres"]["tablespaces"][-1]["name"] == "ts_missing"
