"""backup --postgres: a running cluster's data directory read in place inside pg_backup_start/stop.

The changes that matter are made while the backup runs: after the start (before the files are read) and
after the files are read (before the stop), each followed by a checkpoint.  The restored directory must
start on its own and hold every row committed before the stop: the ones the files were read without come
back only from the label's start position and the WAL the snapshot carries.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time

import pytest

from chunkvault.errors import SourceCommandFailed, UsageError
from chunkvault.pgbackup import PostgresOnline
from chunkvault.store.manifest import F_CHANGED_DURING_READ, F_UNREADABLE, T_DIR
from servers_pg import PgCluster, require_postgres, start_restored
from test_pgsession import cluster  # noqa: F401  (the running cluster with table t)
from walsegments import write_segment

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_env(cluster, monkeypatch):
    """How psql reaches the cluster: the PG* variables, and psql on PATH."""
    env = {"PGHOST": cluster.rundir, "PGPORT": str(cluster.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
           "PATH": f"{cluster.bindir}:{os.environ.get('PATH', '')}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def during(cluster, monkeypatch):
    """SQL run inside the backup: ``during["start"]`` once the base backup has begun, ``during["read"]``
    once every file is read, before the stop."""
    sql: dict[str, str] = {}
    begin, appendix = PostgresOnline.begin, PostgresOnline.appendix

    def begun(self):
        begin(self)
        if sql.get("start"):
            cluster.sql(sql["start"])

    def read(self):
        if sql.get("read"):
            cluster.sql(sql["read"])
        return appendix(self)

    monkeypatch.setattr(PostgresOnline, "begin", begun)
    monkeypatch.setattr(PostgresOnline, "appendix", read)
    return sql


def _restored_rows(cluster, repo, snap, where: str) -> str:
    target = os.path.join(cluster.base, where)  # the server user reaches it
    repo.restore(snap.id, target)
    server = start_restored(cluster.bindir, target)
    try:
        return server.sql("SELECT count(*), count(*) FILTER (WHERE pad = 'c'), max(id) FROM t")
    finally:
        server.discard()
        shutil.rmtree(target, ignore_errors=True)


def test_a_full_then_a_differential_restore_and_start_with_every_row_committed_before_their_stops(
        cluster, new_repo, pg_env, during):
    repo = new_repo()
    cluster.sql("TRUNCATE t; INSERT INTO t SELECT g, repeat('a', 200) FROM generate_series(1, 5000) g")
    during["start"] = "INSERT INTO t SELECT g, repeat('b', 2000) FROM generate_series(5001, 10000) g; CHECKPOINT"
    during["read"] = ("INSERT INTO t SELECT g, repeat('c', 2000) FROM generate_series(10001, 20000) g; "
                      "UPDATE t SET pad = 'c' WHERE id <= 3000; CHECKPOINT")
    full = repo.backup([cluster.datadir], postgres="").snapshot
    cluster.sql("INSERT INTO t SELECT g, 'after' FROM generate_series(20001, 20500) g")
    pg = full.stats["postgres"]
    assert full.kind == "full" and pg["timeline"] == 1 and len(pg["wal"]) >= 2
    names = {e.path for e in repo.tree(full.id)}
    assert b"backup_label" in names and {f"pg_wal/{w}".encode() for w in pg["wal"]} <= names
    assert not {b"postmaster.pid", b"postmaster.opts"} & names
    assert not any(n.startswith(b"pg_wal/") and n[7:].decode() not in pg["wal"] and not n.endswith(b".history")
                   for n in names)
    assert _restored_rows(cluster, repo, full, "r1") == "20000|3000|20000"

    during["start"] = "DELETE FROM t WHERE id > 20400"
    during["read"] = "UPDATE t SET pad = 'd' WHERE id <= 100; CHECKPOINT"
    diff = repo.backup([cluster.datadir], postgres="").snapshot
    assert diff.kind == "diff" and diff.parent == full.id
    names = {e.path for e in repo.tree(diff.id)}
    assert not any(f"pg_wal/{w}".encode() in names for w in pg["wal"])  # the full's segments are not this one's
    assert _restored_rows(cluster, repo, diff, "r2") == "20400|2900|20400"
    assert cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"  # the backup's slot went with it
    from chunkvault.store.walnames import label_start_segment

    with repo.open_file(full, "backup_label") as f:
        assert label_start_segment(f.read().decode()) == pg["wal"][0]
    assert repo.archive_expire("oldest-snapshot", dry_run=True) == []  # the label found: nothing archived here


def test_the_command_line_and_its_refusals(cluster, tmp_path, new_repo, cli, pg_env):
    url = str(tmp_path / "repo")
    new_repo(url)
    conn = cluster.conninfo()
    env = {"PGHOST": "/nonexistent"}  # --pg-connect says where the server is
    out = cli("backup", "-r", url, "--postgres", "--pg-connect", conn, cluster.datadir, "--json", env=env)
    snap = json.loads(out.stdout)
    assert snap["stats"]["postgres"]["wal"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    wrong = cli("backup", "-r", url, "--postgres", "--pg-connect", conn, str(other), check=2, env=env)
    assert "has its data directory at" in wrong.stderr.decode() and len(wrong.stderr.decode().splitlines()) == 1
    gone = cli("backup", "-r", url, "--postgres", cluster.datadir, check=20, env=env)
    assert gone.stderr.decode().startswith("chunkvault: PostgreSQL: ")
    assert "give --postgres too" in cli("backup", "-r", url, "--pg-connect", conn, cluster.datadir,
                                        check=2).stderr.decode()
    assert "one data directory" in cli("backup", "-r", url, "--postgres", cluster.datadir, str(other),
                                       check=2, env=env).stderr.decode()
    assert "stores a stream" in cli("backup", "-r", url, "--postgres", "--stdin", "--stdin-name", "x",
                                    check=2).stderr.decode()
    assert len(json.loads(cli("snapshots", "-r", url, "--json").stdout)) == 1  # none of them saved one
    assert cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert not os.listdir(os.path.join(url, "locks"))


def test_api_refusals(cluster, new_repo, pg_env, tmp_path):
    repo = new_repo()
    with pytest.raises(UsageError, match="one data directory"):
        repo.backup([cluster.datadir, str(tmp_path)], postgres="")
    with pytest.raises(UsageError, match="connection string"):
        repo.backup([cluster.datadir], postgres=True)
    from chunkvault.store.source import SourceWalk

    with pytest.raises(UsageError, match="give no walk"):
        repo.backup([cluster.datadir], postgres="", walk=SourceWalk.of_paths([cluster.datadir]))
    with pytest.raises(SourceCommandFailed, match="^PostgreSQL: "):
        repo.backup([cluster.datadir], postgres=f"host={tmp_path} user=postgres")
    assert repo.snapshots() == []


def test_a_policy_source_with_postgres_is_read_in_place(cluster, tmp_path, new_repo, cli, pg_env):
    url = str(tmp_path / "repo")
    new_repo(url)
    conn = cluster.conninfo()
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""repository = "{url}"
full = "daily 02:00"
[[source]]
name = "db"
paths = ["{cluster.datadir}"]
postgres = "{conn}"
""")
    cli("run", "--config", str(policy))
    [snap] = json.loads(cli("snapshots", "-r", url, "--json").stdout)
    assert snap["stats"]["postgres"]["wal"] and snap["type"] == "full"


def test_a_pg_wal_on_another_disk_is_a_directory_in_the_snapshot(tmp_path, new_repo, monkeypatch):
    """``initdb --waldir``: pg_wal is a symbolic link.  Recorded as such, the segments added below it made a
    snapshot that restored nothing below (and a link into the live cluster's WAL): it is a directory here, as
    pg_basebackup makes it."""
    from servers_pg import run_as

    bindir = require_postgres()
    with PgCluster(bindir) as c:
        waldir = os.path.join(c.base, "wal")
        run_as(c.user, [c.tool("initdb"), "-D", c.datadir, "--waldir", waldir, "--auth=trust", "--no-sync",
                        "-U", "postgres"], env=c.env())
        c.start()
        c.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS id")
        for k, v in {"PGHOST": c.rundir, "PGPORT": str(c.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
                     "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}.items():
            monkeypatch.setenv(k, v)
        assert os.path.islink(os.path.join(c.datadir, "pg_wal"))
        repo = new_repo()
        snap = repo.backup([c.datadir], postgres="").snapshot
        [wal_dir] = [e for e in repo.tree(snap.id) if e.path == b"pg_wal"]
        assert wal_dir.type == T_DIR
        target = os.path.join(c.base, "restored")
        repo.restore(snap.id, target)
        assert not os.path.islink(os.path.join(target, "pg_wal"))
        server = start_restored(bindir, target)
        try:
            assert server.sql("SELECT count(*) FROM t") == "1000"
        finally:
            server.discard()


def _checkpoints_since(cluster, offset: int) -> list[str]:
    """The forced checkpoints of the server log's "checkpoint starting: ..." lines written past ``offset``
    (log_checkpoints is on), "immediate" or "spread": the backup's.  One the server starts itself (its WAL
    volume, its timeout) is not forced; landing at the same moment, it adds its reason to the line."""
    with open(cluster.logfile, errors="replace") as f:
        f.seek(offset)
        flags = [line.split("checkpoint starting: ", 1)[1].split() for line in f if "checkpoint starting: " in line]
    return ["immediate" if "immediate" in fs else "spread" for fs in flags if "force" in fs]


def test_the_checkpoint_the_backup_starts_with_is_fast_unless_spread_is_asked_for(cluster, tmp_path, new_repo,
                                                                                  cli, pg_env):
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    cluster.sql("CHECKPOINT")
    at = os.path.getsize(cluster.logfile)
    repo.backup([cluster.datadir], postgres="")
    assert _checkpoints_since(cluster, at) == ["immediate"]
    at = os.path.getsize(cluster.logfile)
    snap = repo.backup([cluster.datadir], postgres="", pg_checkpoint="spread").snapshot
    assert _checkpoints_since(cluster, at) == ["spread"]  # not immediate: paced as the server's own
    assert snap.stats["postgres"]["wal"]
    at = os.path.getsize(cluster.logfile)
    cli("backup", "-r", url, "--postgres", "--pg-checkpoint", "spread", cluster.datadir)
    assert _checkpoints_since(cluster, at) == ["spread"]
    fresh = str(tmp_path / "fresh")  # no snapshot yet: the policy's full is due
    new_repo(fresh)
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""repository = "{fresh}"
full = "daily 02:00"
[[source]]
name = "db"
paths = ["{cluster.datadir}"]
postgres = true
pg-checkpoint = "spread"
""")
    at = os.path.getsize(cluster.logfile)
    cli("run", "--config", str(policy))
    assert _checkpoints_since(cluster, at) == ["spread"]
    assert len(json.loads(cli("snapshots", "-r", fresh, "--json").stdout)) == 1


def test_a_checkpoint_without_postgres_or_of_another_kind_is_refused(cluster, tmp_path, new_repo, cli, pg_env):
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    with pytest.raises(UsageError, match="give postgres too"):
        repo.backup([str(tmp_path)], pg_checkpoint="spread")
    with pytest.raises(UsageError, match="'fast' or 'spread', not 'slow'"):
        repo.backup([cluster.datadir], postgres="", pg_checkpoint="slow")
    assert "give --postgres too" in cli("backup", "-r", url, "--pg-checkpoint", "spread", str(tmp_path),
                                        check=2).stderr.decode()
    assert "invalid choice" in cli("backup", "-r", url, "--postgres", "--pg-checkpoint", "slow", cluster.datadir,
                                   check=2).stderr.decode()
    from chunkvault.schedule import parse_policy

    source = {"name": "db", "paths": [cluster.datadir], "full": "daily 02:00"}
    with pytest.raises(UsageError, match="set postgres too"):
        parse_policy({"repository": url, "source": [{**source, "pg-checkpoint": "spread"}]})
    with pytest.raises(UsageError, match="pg-checkpoint is 'fast' or 'spread', not 'slow'"):
        parse_policy({"repository": url, "source": [{**source, "postgres": True, "pg-checkpoint": "slow"}]})
    assert parse_policy({"repository": url, "source": [{**source, "postgres": True, "pg-checkpoint": "spread"}]}
                        ).sources[0].pg_checkpoint == "spread"
    assert repo.snapshots() == [] and cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"


def test_unlogged_and_temporary_relations_are_left_out_and_come_back_empty(cluster, new_repo, pg_env):
    """As pg_basebackup: of an unlogged relation only the init fork, from which the restored server makes
    the relation anew (empty) at its start; nothing of a temporary one."""
    import subprocess

    cluster.sql("DROP TABLE IF EXISTS u, l; CREATE UNLOGGED TABLE u (id int primary key, pad text); "
                "INSERT INTO u SELECT g, repeat('u', 100) FROM generate_series(1, 30000) g; "
                "CREATE TABLE l AS SELECT g AS id FROM generate_series(1, 1234) g")
    cluster.sql("VACUUM u")  # its free space and visibility maps: forks of its own
    cluster.sql("CHECKPOINT")
    files = {name: cluster.sql(f"SELECT pg_relation_filepath('{name}')") for name in ("u", "u_pkey", "l")}
    holder = subprocess.Popen([cluster.tool("psql"), "-X", "-q", "-tA", "-d", "postgres", "-U", "postgres"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **pg_env})
    try:
        holder.stdin.write(b"CREATE TEMP TABLE tt AS SELECT generate_series(1, 50000) AS id; CHECKPOINT;\n"
                           b"SELECT pg_relation_filepath('tt');\n")
        holder.stdin.flush()
        temp = holder.stdout.readline().strip().decode()
        assert os.path.basename(temp).startswith("t") and os.path.exists(os.path.join(cluster.datadir, temp))
        repo = new_repo()
        snap = repo.backup([cluster.datadir], postgres="").snapshot
    finally:
        holder.stdin.close()
        holder.wait(30)
    names = {e.path.decode() for e in repo.tree(snap.id)}
    for rel in ("u", "u_pkey"):
        path = files[rel]
        assert os.path.exists(os.path.join(cluster.datadir, path))
        assert f"{path}_init" in names and not {path, f"{path}_fsm", f"{path}_vm"} & names
    assert os.path.exists(os.path.join(cluster.datadir, files["u"] + "_vm"))  # there, and left out
    assert files["l"] in names and not any(os.path.basename(n).startswith("t") and "_" in os.path.basename(n)
                                           for n in names if n.startswith("base/"))
    target = os.path.join(cluster.base, "r-unlogged")
    repo.restore(snap.id, target)
    server = start_restored(cluster.bindir, target)
    try:
        assert server.sql("SELECT (SELECT count(*) FROM l), (SELECT count(*) FROM u)") == "1234|0"
        server.sql("INSERT INTO u VALUES (1, 'again')")  # the relation works, its index too
        assert server.sql("SELECT pad FROM u WHERE id = 1") == "again"
    finally:
        server.discard()
        shutil.rmtree(target, ignore_errors=True)
        cluster.sql("DROP TABLE u, l")


def test_oldest_snapshot_takes_the_start_segment_from_the_stats_and_reads_the_label_only_without_them(
        cluster, tmp_path, new_repo, pg_env, monkeypatch):
    """A ``backup --postgres`` snapshot records where its WAL starts: ``archive-expire --before oldest-snapshot``
    needs no ``backup_label`` for it (one rewritten away still resolves); a snapshot without the record (a
    ``pg_basebackup`` copy's, an older ``--postgres`` one) still resolves through its label."""
    from chunkvault import Repository
    from chunkvault.store.walnames import label_start_segment

    repo = new_repo()
    cluster.sql("SELECT pg_switch_wal()")
    snap = repo.backup([cluster.datadir], postgres="").snapshot
    pg = snap.stats["postgres"]
    with repo.open_file(snap, "backup_label") as f:
        assert pg["start_wal"] == pg["wal"][0] == label_start_segment(f.read().decode())
    assert pg["timeline"] == 1 and pg["start_wal"].startswith("00000001")
    repo.rewrite(["backup_label"], dry_run=False)
    assert b"backup_label" not in {e.path for e in repo.tree(snap.id)}
    start = int(pg["start_wal"], 16)
    wal = tmp_path / "wal"
    wal.mkdir()
    for n in (start - 2, start - 1, start):
        repo.archive_push(write_segment(wal, f"{n:024X}", n, 1 << 20))
    opened = []
    file_content = Repository._file_content

    def counted(self, snapshot, entry, *args, **kwargs):
        opened.append(entry.path.decode())
        return file_content(self, snapshot, entry, *args, **kwargs)

    monkeypatch.setattr(Repository, "_file_content", counted)
    assert repo.archive_expire("oldest-snapshot", dry_run=True) == [f"{start - 2:024X}", f"{start - 1:024X}"]
    assert opened == []  # the stats said it

    copy = tmp_path / "copy"  # a pg_basebackup copy's label: no stats say where its WAL starts
    copy.mkdir()
    (copy / "backup_label").write_text(f"START WAL LOCATION: 0/1000028 (file {start - 1:024X})\n"
                                       "START TIMELINE: 1\n")
    older = repo.backup([str(copy)]).snapshot
    assert "postgres" not in older.stats
    assert repo.archive_expire("oldest-snapshot", dry_run=True) == [f"{start - 2:024X}"]
    assert opened == ["backup_label"]  # that snapshot's alone


def test_a_file_of_the_data_directory_that_cannot_be_read_fails_the_backup_and_saves_nothing(
        cluster, new_repo, pg_env, monkeypatch, python_file_reads):
    """Kept from the parent snapshot (older than the backup's start, which the WAL does not repair) or left
    out (its table lost), an unreadable relation's file would make a snapshot that starts and lies: the backup
    fails before the stop, as pg_basebackup's does, and the session's end aborts the server's backup."""
    from treeutil import refusing_open

    cluster.sql("DROP TABLE IF EXISTS locked; CREATE TABLE locked AS SELECT g FROM generate_series(1, 1000) g; "
                "CHECKPOINT")
    name = os.path.basename(cluster.sql("SELECT pg_relation_filepath('locked')"))
    repo = new_repo()
    full = repo.backup([cluster.datadir], postgres="").snapshot
    cluster.sql("UPDATE locked SET g = -g; CHECKPOINT")
    with monkeypatch.context() as m, pytest.raises(
            SourceCommandFailed, match=rf"could not be read whole \(cannot read \S+/{name}: Permission denied\): "
                                       r".* no snapshot saved$"):
        m.setattr("chunkvault.store.backup.os.open", refusing_open(name))
        repo.backup([cluster.datadir], postgres="")
    assert [s.id for s in repo.snapshots()] == [full.id]
    assert cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"
    assert repo.backup([cluster.datadir], postgres="").snapshot.parent == full.id


def test_a_data_directory_not_the_servers_is_refused_before_the_backup_starts(cluster, new_repo, pg_env, tmp_path):
    """Refused once started, the server would have made the start's checkpoint for nothing: an immediate one
    on a busy server, or with ``pg_checkpoint="spread"`` minutes of waiting before the refusal."""
    newer = int(cluster.sql("SELECT current_setting('server_version_num')")) >= 170000
    requested = ("SELECT num_requested FROM pg_stat_checkpointer" if newer
                 else "SELECT checkpoints_req FROM pg_stat_bgwriter")
    before = cluster.sql(requested)
    repo = new_repo()
    with pytest.raises(UsageError, match="has its data directory at"):
        repo.backup([str(tmp_path)], postgres="")
    time.sleep(0.5)  # the checkpointer's counts reach the statistics once its checkpoint is done
    assert cluster.sql(requested) == before
    assert repo.snapshots() == [] and cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"


def test_extended_attributes_that_cannot_be_read_are_a_warning_not_a_failure(cluster, new_repo, pg_env, monkeypatch):
    """PostgreSQL needs no extended attributes to start: a relation's file read whole whose attributes could
    not be (a security.* one denied, an I/O error from a FUSE file system) failed the backup (exit 20), as a
    file whose data could not be read does; it is listed unreadable and the snapshot saved (exit 3), as in
    other backups, with the file's data the backup's own."""
    cluster.sql("DROP TABLE IF EXISTS labelled; CREATE TABLE labelled AS SELECT g FROM generate_series(1, 1000) g; "
                "CHECKPOINT")
    rel = cluster.sql("SELECT pg_relation_filepath('labelled')")
    try:
        os.setxattr(os.path.join(cluster.datadir, rel), "user.label", b"x")  # else its absence is all there is
    except OSError as exc:
        pytest.skip(f"no user.* extended attributes here: {exc.strerror}")
    listxattr = os.listxattr

    def failing(target, *args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else os.fsdecode(target)
        if path.endswith("/" + rel):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return listxattr(target, *args, **kwargs)

    repo = new_repo()
    with monkeypatch.context() as m:
        m.setattr("chunkvault.store.xattrs.os.listxattr", failing)
        result = repo.backup([cluster.datadir], postgres="")
    assert result.partial and result.snapshot.stats["unreadable"] == [rel]
    assert f"cannot read extended attributes of {os.path.join(cluster.datadir, rel)}: Input/output error" in (
        result.warnings)
    [e] = [e for e in repo.tree(result.snapshot) if e.path == rel.encode()]
    assert e.size == os.path.getsize(os.path.join(cluster.datadir, rel)) > 0 and not e.flags & F_UNREADABLE
    assert cluster.sql("SELECT count(*) FROM pg_replication_slots") == "0"


def test_files_that_changed_while_being_read_are_counted_in_one_warning_and_read_again(
        cluster, new_repo, pg_env, monkeypatch):
    """On a busy cluster relation files change while being read, every backup: the WAL the snapshot holds
    repairs them, so a warning naming each one was noise; one line counts them, and each is still flagged,
    so the next backup reads it again."""
    from chunkvault.store.backup import Backup

    check = Backup._check_unchanged
    changed = []

    def written_meanwhile(e, path, st, after, notes):  # as a checkpoint writing the file while it is read does
        if e.path.startswith(b"base/") and len(changed) < 3:
            changed.append(e.path)
            after = (after[0], after[1] + 1, after[2] + 1)
        return check(e, path, st, after, notes)

    repo = new_repo()
    with monkeypatch.context() as m:
        m.setattr(Backup, "_check_unchanged", staticmethod(written_meanwhile))
        result = repo.backup([cluster.datadir], postgres="")
    assert len(changed) == 3
    assert [w for w in result.warnings if "changed while being read" in w] == [
        "3 file(s) changed while being read (stored as read: the WAL the snapshot holds, replayed from the backup's "
        "start, repairs them; the next backup reads them again)"]
    assert not result.partial
    flagged = {e.path for e in repo.tree(result.snapshot) if e.flags & F_CHANGED_DURING_READ}
    assert flagged == set(changed)
    again = repo.backup([cluster.datadir], postgres="")
    assert not any("changed while being read" in w for w in again.warnings)
    assert not {e.path for e in repo.tree(again.snapshot) if e.flags & F_CHANGED_DURING_READ} & flagged

