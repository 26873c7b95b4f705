"""A chain of full and differential snapshots restores every point in time exactly."""
import io
import json
import os
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault.errors import AmbiguousSnapshot, SnapshotNotFound
from treeutil import describe


def mutate(root, step):
    """A different kind of change at each step."""
    if step == 0:
        (root / "new.txt").write_bytes(b"added")
    elif step == 1:
        (root / "a" / "f1").write_bytes(b"modified content " * 100)
    elif step == 2:
        os.remove(root / "a" / "f2")
    elif step == 3:
        os.rename(root / "b", root / "b-renamed")
    elif step == 4:  # file -> dir
        os.remove(root / "new.txt")
        (root / "new.txt").mkdir()
        (root / "new.txt" / "inner").write_bytes(b"inner")
    elif step == 5:  # dir -> file
        shutil.rmtree(root / "b-renamed")
        (root / "b-renamed").write_bytes(b"now a file")
    elif step == 6:  # file -> symlink
        os.remove(root / "a" / "f1")
        os.symlink("../b-renamed", root / "a" / "f1")
    elif step == 7:  # symlink -> file, and a big append
        os.remove(root / "a" / "f1")
        (root / "a" / "f1").write_bytes(os.urandom(300_000))
        with open(root / "big", "ab") as f:
            f.write(os.urandom(100_000))
    elif step == 8:  # metadata only
        os.chmod(root / "big", 0o600)
        os.utime(root / "a", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    elif step == 9:  # delete a whole subtree
        shutil.rmtree(root / "a")


def initial(root):
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "f1").write_bytes(b"one")
    (root / "a" / "f2").write_bytes(b"two")
    (root / "a" / "deep" / "er" / "f3").write_bytes(os.urandom(200_000))
    (root / "b" / "g").write_bytes(b"gee")
    (root / "big").write_bytes(os.urandom(1_500_000))


def test_every_snapshot_and_until_point_restores(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    initial(src)
    repo = new_repo(full_every=4)
    expected = []
    for step in range(11):
        if step:
            mutate(src, step - 1)
        snap = repo.backup([str(src)]).snapshot
        expected.append((snap, describe(src)))
        time.sleep(0.002)
    kinds = [s.kind for s, _ in expected]
    assert kinds[0] == "full" and "diff" in kinds
    assert kinds.count("full") >= 2  # full_every=4 started a new chain
    for i, (snap, tree) in enumerate(expected):
        out = tmp_path / f"out{i}"
        repo.restore(snap.id, str(out))
        assert describe(out) == tree, f"snapshot {i} ({snap.kind})"
        out2 = tmp_path / f"until{i}"
        assert repo.restore("latest", str(out2), until=snap.datetime).snapshot == snap.id  # the one it picked
        assert describe(out2) == tree
    with pytest.raises(SnapshotNotFound):
        repo.snapshot("latest", until="2001-01-01T00:00:00+00:00")


def test_type_full_and_diff_are_honoured(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo = new_repo()
    s1 = repo.backup([str(src)], kind="diff").snapshot
    assert s1.kind == "full"  # nothing to be a differential of
    s2 = repo.backup([str(src)], kind="full").snapshot
    assert s2.kind == "full" and s2.parent is None
    s3 = repo.backup([str(src)], kind="diff").snapshot
    assert s3.kind == "diff" and s3.parent == s2.id


def test_auto_makes_a_full_when_differentials_outgrow_the_full(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    repo = new_repo(max_diff_share=0.5)
    assert repo.backup([str(src)]).snapshot.kind == "full"
    (src / "g").write_bytes(os.urandom(80_000))
    assert repo.backup([str(src)]).snapshot.kind == "diff"
    (src / "h").write_bytes(os.urandom(80_000))
    assert repo.backup([str(src)]).snapshot.kind == "full"  # 80k added > 0.5 x 100k full


def test_snapshot_prefixes(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    ids = []
    for i in range(20):
        (src / f"f{i}").write_bytes(b"%d" % i)
        ids.append(repo.backup([str(src)]).snapshot.id)
    assert repo.snapshot(ids[3][:12]).id == ids[3]
    firsts = [i[0] for i in ids]
    dup = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(AmbiguousSnapshot):
        repo.snapshot(dup)
    with pytest.raises(SnapshotNotFound):
        repo.snapshot("zz")


names = st.sampled_from(["a", "b", "c", "a.b", "d-", "new\nline", "\udcff\udcfe-not-utf8", "sp ace"])


@st.composite
def tree_specs(draw, depth=0):
    spec = {}
    for name in draw(st.sets(names, max_size=4)):
        kinds = ["file", "empty", "link", "fifo", "sparse", "hardlink"] + (["dir"] if depth < 2 else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "dir":
            spec[name] = draw(tree_specs(depth=depth + 1))
        elif kind == "link":
            spec[name] = ("link", draw(names))
        elif kind in ("fifo", "sparse", "hardlink"):
            spec[name] = (kind, draw(st.integers(1, 3_000_000)))
        else:
            spec[name] = b"" if kind == "empty" else draw(st.binary(min_size=1, max_size=3000))
    return spec


def build(root, spec, top=None):
    top = top or root
    for name, v in spec.items():
        p = root / name
        if isinstance(v, dict):
            p.mkdir()
            build(p, v, top)
        elif isinstance(v, tuple) and v[0] == "link":
            os.symlink(v[1], p)
        elif isinstance(v, tuple) and v[0] == "fifo":
            os.mkfifo(p)
        elif isinstance(v, tuple) and v[0] == "sparse":
            with open(p, "wb") as f:
                f.seek(v[1])
                f.write(b"x")
        elif isinstance(v, tuple):
            anchor = top / ".hardlink-anchor"
            if not anchor.exists():
                anchor.write_bytes(b"shared inode %d" % v[1])
            os.link(anchor, p)
        else:
            p.write_bytes(v)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(tree_specs(), min_size=1, max_size=4))
def test_random_tree_sequences(tmp_path_factory, specs):
    from chunkvault import Repository

    base = tmp_path_factory.mktemp("seq")
    repo = Repository.init(str(base / "repo"), "pw", kdf_seconds=0)
    src = base / "src"
    states = []
    for i, spec in enumerate(specs):
        if src.exists():
            shutil.rmtree(src)
        src.mkdir()
        build(src, spec)
        os.utime(src, ns=(10**18 + i, 10**18 + i))
        snap = repo.backup([str(src)]).snapshot
        states.append((snap, describe(src)))
    for i, (snap, tree) in enumerate(states):
        out = base / f"out{i}"
        repo.restore(snap.id, str(out))
        assert describe(out) == tree


def test_a_chain_dated_one_instant_has_its_last_differential_as_latest(tmp_path, new_repo):
    """``--time`` may give a full and its differentials the same time (a day of imported copies dated by
    their day): the newest is the last differential, whatever the random ids, for restore, retention,
    ``snapshots --latest`` and the next backup's parent."""
    from chunkvault.store.retention import RetentionPolicy

    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    made = []
    for version in range(6):
        (src / "f").write_bytes(b"version %d\n" % version)
        made.append(repo.backup([str(src)], kind="diff" if version else "full",
                                time="2026-01-02T03:00:00Z").snapshot.id)
    snaps = repo.snapshots()
    assert [s.id for s in snaps] == made  # each differential after its parent
    assert [s.parent for s in snaps[1:]] == made[:-1]
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == b"version 5\n"
    assert [s.id for s in repo.snapshots(latest=1)] == [made[-1]]
    plan = repo.forget(policy=RetentionPolicy(keep_last=1), dry_run=True)
    assert [d.snapshot_id for d in plan.decisions if d.keep] == [made[-1]]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1, 30)), min_size=1, max_size=30))
def test_chronological_order_puts_a_parent_before_its_differentials_of_the_same_time(specs):
    """Oldest first by time; at one time a parent precedes what is built on it (even through a cycle or a
    missing parent, the key is total and the order a permutation)."""
    from types import SimpleNamespace

    from chunkvault.store.chronology import chronological_key

    snaps = [SimpleNamespace(id=f"{i:02d}", time=t, parent=f"{p:02d}" if p >= 0 else None)
             for i, (t, p) in enumerate(specs)]
    ordered = sorted(snaps, key=chronological_key(snaps))
    assert sorted(s.id for s in ordered) == sorted(s.id for s in snaps)
    assert [s.time for s in ordered] == sorted(s.time for s in snaps)
    place = {s.id: n for n, s in enumerate(ordered)}
    by_id = {s.id: s for s in snaps}

    def in_a_cycle(s):
        seen, cur = set(), s
        while cur is not None and cur.id not in seen and cur.parent in by_id and by_id[cur.parent].time == s.time:
            seen.add(cur.id)
            cur = by_id[cur.parent]
        return cur is not None and cur.id in seen

    for s in snaps:
        p = by_id.get(s.parent)
        if p is not None and p.time == s.time and not in_a_cycle(s):
            assert place[p.id] < place[s.id]


def test_latest_and_until_pick_among_one_host_and_paths(tmp_path, new_repo, cli):
    """Two databases in one repository: `restore --until` alone takes the newest of either, so it is
    narrowed by --host and --path, as `latest` is (export too)."""
    repo = new_repo()
    url = str(repo.store.remote.display_url)
    pg, mysql = tmp_path / "pg", tmp_path / "mysql"
    pg.mkdir()
    mysql.mkdir()
    (pg / "base").write_text("pgdata")
    (mysql / "ibdata").write_text("mydata")
    repo.backup([str(pg)], host="db1", time="2026-01-01T00:00:00Z")
    repo.backup([str(mysql)], host="db2", time="2026-01-01T00:05:00Z")
    until = ("--until", "2026-01-01T00:30:00Z")
    cli("restore", "-r", url, *until, "--host", "db1", "--target", str(tmp_path / "by-host"))
    assert [p.name for p in (tmp_path / "by-host").iterdir()] == ["base"]
    cli("restore", "-r", url, "latest", "--path", str(pg), "--target", str(tmp_path / "by-path"))
    assert [p.name for p in (tmp_path / "by-path").iterdir()] == ["base"]
    missing = cli("restore", "-r", url, *until, "--host", "db3", "--target", str(tmp_path / "none"), check=False)
    assert missing.returncode != 0 and "no snapshot" in missing.stderr.decode()
    out = json.loads(cli("export", "-r", url, "--host", "db1", "--output", str(tmp_path / "pg.backup"), "--json",
                         env={"CHUNKVAULT_EXPORT_PASSWORD": "export pw"}).stdout)
    assert out["snapshot"] == repo.snapshot("latest", host="db1").id
    repo.restore("latest", str(tmp_path / "api"), until="2026-01-01T00:30:00Z", host="db1")
    assert [p.name for p in (tmp_path / "api").iterdir()] == ["base"]
    # a stream's snapshots go by its name, as `snapshots --path` lists them
    repo.backup_stream(io.BytesIO(b"-- dump"), "app.sql", host="db1", time="2026-01-01T00:10:00Z")
    cli("restore", "-r", url, *until, "--path", "app.sql", "--target", str(tmp_path / "dump"))
    assert [p.name for p in (tmp_path / "dump").iterdir()] == ["app.sql"]
    cli("restore", "-r", url, *until, "--host", "db1", "--path", str(pg), "--target", str(tmp_path / "files"))
    assert [p.name for p in (tmp_path / "files").iterdir()] == ["base"]
    # ls and dump take latest when no snapshot is named, as restore does: `--until T` alone is enough
    assert cli("dump", "-r", url, *until, "--path", "app.sql", "app.sql").stdout == b"-- dump"
    listed = cli("ls", "-r", url, *until, "--host", "db1", "--path", str(pg)).stdout.decode()
    assert listed.rstrip().endswith("  base")


def test_an_aggregated_differential_stays_after_the_snapshot_it_was_made_on(tmp_path, new_repo, cli):
    """A chain dated one instant: its latest is the differential, and stays so once aggregated (a full,
    with no parent to say so): `latest`, `--until`, `--keep-last` and the next backup's parent took the
    older full about half the time, as ids fell."""
    from types import SimpleNamespace

    from chunkvault.store.chronology import chronological_key
    from chunkvault.store.lifecycle import view

    when = "2026-01-01T00:00:00+00:00"
    full = SimpleNamespace(id="ff" * 32, time=when, parent=None, stats={})
    aggregated = SimpleNamespace(id="00" * 32, time=when, parent=None, stats={"follows": full.id})
    assert max([full, aggregated], key=chronological_key([full, aggregated])) is aggregated

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    for n in range(6):  # several chains, so that ids fall both ways
        (src / "x").write_text(f"v{n}a")
        f = repo.backup([str(src)], kind="full", time=f"2026-01-0{n + 1}T00:00:00Z").snapshot
        (src / "x").write_text(f"v{n}b")
        d = repo.backup([str(src)], kind="diff", time=f"2026-01-0{n + 1}T00:00:00Z").snapshot
        repo.aggregate(d.id)
        out = tmp_path / f"out{n}"
        repo.restore("latest", str(out))
        assert (out / "x").read_text() == f"v{n}b"
        (latest,) = [s for s in repo.snapshots() if s.id == d.id]
        assert latest.kind == "full" and latest.stats["follows"] == f.id
        views = [view(s) for s in repo.snapshots()]
        assert max(views, key=chronological_key(views)).id == d.id
    from chunkvault.store.retention import RetentionPolicy

    plan = repo.forget(policy=RetentionPolicy(keep_last=1), dry_run=True)
    assert [d.snapshot_id for d in plan.decisions if d.keep] == [d.id]


@pytest.mark.parametrize("retire", [True, False], ids=["aggregate --retire", "the middle one forgotten"])
def test_an_aggregate_whose_former_parent_was_forgotten_stays_after_its_chain_s_full(tmp_path, new_repo, retire):
    """A chain dated one second, full F, D1, D2: D2 aggregated follows D1, and once D1 was forgotten (by
    --retire, or by id) D2 tied with F, the tie went by id, and about half the time `latest` was F and
    `forget --keep-last 1` removed D2, the newest data.  The chain it replaced orders it still."""
    from types import SimpleNamespace

    from chunkvault.store.chronology import chronological_key
    from chunkvault.store.lifecycle import view
    from chunkvault.store.retention import RetentionPolicy

    when = "2026-01-01T00:00:00+00:00"
    full = SimpleNamespace(id="ff" * 32, time=when, parent=None, stats={})
    aggregated = SimpleNamespace(id="00" * 32, time=when, parent=None,
                                 stats={"follows": "77" * 32, "former_chain": [full.id, "77" * 32]})
    assert max([full, aggregated], key=chronological_key([full, aggregated])) is aggregated

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    for n in range(4):  # several chains, so that ids fall both ways
        at = f"2026-01-0{n + 1}T00:00:00Z"
        (src / "x").write_text(f"v{n}a")
        repo.backup([str(src)], kind="full", time=at)
        (src / "x").write_text(f"v{n}b")
        d1 = repo.backup([str(src)], kind="diff", time=at).snapshot
        (src / "x").write_text(f"v{n}c")
        d2 = repo.backup([str(src)], kind="diff", time=at).snapshot
        repo.aggregate(d2.id, retire=retire)
        if not retire:
            repo.forget([d1.id])
        views = [view(s) for s in repo.snapshots()]
        assert max(views, key=chronological_key(views)).id == d2.id
        out = tmp_path / f"out{n}"
        repo.restore("latest", str(out))
        assert (out / "x").read_text() == f"v{n}c"
        plan = repo.forget(policy=RetentionPolicy(keep_last=1), dry_run=True)
        assert [k.snapshot_id for k in plan.decisions if k.keep] == [d2.id]
