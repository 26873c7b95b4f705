"""find: every version of matching paths across snapshots; and the snapshot filters of snapshots/find."""
from __future__ import annotations

import json
import os
import random
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashkit
from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.ledger import RepositoryStateWarning
from chunkvault.store.find import chain_order, path_matcher
from chunkvault.store.manifest import T_HARDLINK, what_changed
from chunkvault.store.snapshot import Snapshot, select_snapshots
from chunkvault.store.subtree import Subtree
from treeutil import change_small_tree, refusing_open

PASSWORD = crashkit.PASSWORD


def snap(sid: str, parent: str | None = None, t: int = 0, host: str = "h", tags=(), paths=("/src",)) -> Snapshot:
    return Snapshot(time=f"2026-01-01T00:00:{t:02d}+00:00", kind="diff" if parent else "full", parent=parent,
                    host=host, paths=list(paths), tags=list(tags), id=sid)


def test_chain_order_puts_parents_first_and_leaves_out_broken_chains():
    snaps = [snap("d2", "d1", 3), snap("d1", "f", 2), snap("f", None, 1), snap("g", None, 9),
             snap("orphan", "gone", 4), snap("child-of-orphan", "orphan", 5),
             snap("x", "y", 6), snap("y", "x", 7)]
    assert [s.id for s in chain_order(snaps)] == ["f", "g", "d1", "d2"]
    assert [s.id for s in chain_order(reversed(snaps))] == ["f", "g", "d1", "d2"]


def test_select_snapshots_by_host_tag_groups_and_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    snaps = [snap("a", tags=["x", "y"]), snap("b", tags=["y"], host="other"), snap("c", tags=["z"]),
             snap("d", paths=["/src", str(tmp_path / "rel")]), snap("e", paths=["app.sql"])]
    ids = lambda **kw: [s.id for s in select_snapshots(snaps, **kw)]  # noqa: E731
    assert ids() == ["a", "b", "c", "d", "e"]
    assert ids(hosts=["other"]) == ["b"]
    assert ids(hosts=["h", "other"], tags=["y"]) == ["a", "b"]
    assert ids(tags=["x,y"]) == ["a"]
    assert ids(tags=["x,z"]) == []
    assert ids(tags=["x,y", "z"]) == ["a", "c"]
    assert ids(paths=["/src"]) == ["a", "b", "c", "d"]
    assert ids(paths=["rel", "/src"]) == ["d"]
    assert ids(paths=["app.sql"]) == ["e"]


def test_patterns_match_the_path_or_the_name():
    m = path_matcher(["*.log", "etc/*.conf"])
    assert m(b"a.log") and m(b"x/y/a.log") and m(b"etc/app.conf") and m(b"etc/sub/app.conf")
    assert not m(b"a.log.1") and not m(b"app.conf") and not m(b"other/etc/app.conf")
    assert path_matcher(["README*"], ignore_case=True)(b"docs/readme.md")
    assert not path_matcher(["README*"])(b"docs/readme.md")
    assert path_matcher(["*"])(b"\xff\xfe")
    assert not path_matcher(["*"])(b"")  # the root: no path below it, no name


def brute_force(repo: Repository, snaps: list[Snapshot], match) -> list[tuple]:
    """What find must say, from each snapshot's whole resolved tree: (path, [(state, [snapshot ids])])."""
    state = lambda e: (e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.rdev, e.target, e.digest,  # noqa: E731
                       e.xattrs)
    out: dict[bytes, list] = {}
    last: dict[bytes, str | None] = {}
    prev = None
    for s in sorted(snaps, key=lambda s: (s.time, s.id)):
        for e in repo.tree(s):
            if not match(e.path):
                continue
            versions = out.setdefault(e.path, [])
            if versions and last[e.path] == prev and versions[-1][0] == state(e):
                versions[-1][1].append(s.id)
            else:
                versions.append((state(e), [s.id]))
            last[e.path] = s.id
        prev = s.id
    return sorted(out.items())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), patterns=st.sampled_from([["*"], ["*.a"], ["d*"], ["d0/*"], ["f1*", "*.b"], ["d1/d0/*"],
                                                                  ["d0/f1.a", "d0/x*"], ["d1/y"]]))
def test_find_equals_the_versions_read_from_every_whole_tree(tmp_path_factory, seed, patterns):
    """Random trees over a series of fulls and differentials (some aggregated, some forgotten): find
    reads each full once and each differential's own records, yet says what every resolved tree says."""
    rng = random.Random(seed)
    base = tmp_path_factory.mktemp("find")
    src = base / "src"
    src.mkdir()
    with Repository.init(str(base / "repo"), PASSWORD, kdf_seconds=0) as repo:
        for step in range(8):
            change_small_tree(src, rng, step)
            kind = rng.choice(["diff", "diff", "diff", "full"])
            repo.backup([str(src)], kind=kind, host="h")
            if step == 5:
                diffs = [s for s in repo.snapshots() if s.kind == "diff"]
                if diffs:
                    repo.aggregate(rng.choice(diffs).id)
                repo.forget([rng.choice(repo.snapshots()).id])
        snaps = repo.snapshots()
        found = repo.find(patterns)
        got = sorted((f.path, [((v.entry.type, v.entry.mode, v.entry.uid, v.entry.gid, v.entry.size,
                                 v.entry.mtime_ns, v.entry.rdev, v.entry.target, v.entry.digest, v.entry.xattrs),
                                [s.id for s in v.snapshots]) for v in f.versions]) for f in found)
        assert got == brute_force(repo, snaps, path_matcher(patterns))
        one = rng.choice(snaps)
        only = repo.find(patterns, snapshots=[one.id[:10]])
        assert sorted((f.path, [s.id for v in f.versions for s in v.snapshots]) for f in only) == sorted(
            (p, [i for _, ids in vs for i in ids]) for p, vs in brute_force(repo, [one], path_matcher(patterns)))


@pytest.mark.skipif(os.geteuid() != 0, reason="changes a file's owner")
def test_a_change_of_owner_or_attributes_alone_is_a_new_version(tmp_path, new_repo, cli):
    """Versions split only on type, mode, size, time and content: one merged over an owner's change gave
    every snapshot of it the newest owner."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"same")
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)], host="h").snapshot
    mtime = f.stat().st_mtime_ns
    os.chown(f, 12345, 12346)
    second = repo.backup([str(src)], host="h").snapshot
    os.setxattr(f, "user.note", b"x")
    os.utime(f, ns=(mtime, mtime))
    third = repo.backup([str(src)], host="h").snapshot  # the change of ctime has it read again
    (found,) = repo.find(["f"])
    assert [([s.id for s in v.snapshots], v.entry.uid, v.entry.gid) for v in found.versions] == [
        ([first.id], 0, 0), ([second.id], 12345, 12346), ([third.id], 12345, 12346)]
    listed = cli("find", "-r", str(tmp_path / "repo"), "f").stdout.decode().splitlines()
    assert [line.split()[2] for line in listed[1:4]] == ["root/root", "12345/12346", "12345/12346"]


def test_find_lists_the_snapshots_a_bounded_number_of_times_whatever_the_versions(tmp_path, new_repo, monkeypatch,
                                                                                    password):
    """Each version's owner names listed every snapshot object (twice): `find '*'` over 2,000 snapshots took
    107 s, each version costing more as snapshots were added."""
    from chunkvault import cli
    from chunkvault.store.repository import Repo

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    for i in range(12):
        (src / "f").write_text(f"version {i}")
        repo.backup([str(src)], kind="full" if i % 4 == 0 else "diff")
    listings = []
    real = Repo.snapshots
    monkeypatch.setattr(Repo, "snapshots", lambda self: listings.append(1) or real(self))
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", password)
    indexed = []
    chains = Repo.chains
    monkeypatch.setattr(Repo, "chains", lambda self, snaps=None: indexed.append(snaps is not None) or chains(self, snaps))
    for json_flag in ([], ["--json"]):
        listings.clear()
        indexed.clear()
        assert cli.main(["find", "-r", str(tmp_path / "repo"), "f", *json_flag]) == 0
        assert len(listings) <= 4, len(listings)
        # nor is the listing indexed again for each version's owners: 2,000 versions among 17,000 snapshots
        # took 33 s
        assert indexed.count(True) <= 2, indexed


def test_find_works_out_each_snapshots_time_once_whatever_the_paths(tmp_path, new_repo, monkeypatch, password):
    """Each version's first and last snapshot had its local time worked out again: `find '*'` over two
    snapshots of 300,000 files spent 11 of its 28 s on 600,000 times of two snapshots."""
    from chunkvault import cli

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_text(f"file {i}")
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)]).snapshot
    (src / "f0").write_text("changed")
    second = repo.backup([str(src)]).snapshot
    times = []
    real = cli.listed_time
    monkeypatch.setattr(cli, "listed_time", lambda t: times.append(t) or real(t))
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", password)
    assert cli.main(["find", "-r", str(tmp_path / "repo"), "f*"]) == 0
    of_snapshots = [t for t in times if t in (first.datetime, second.datetime)]  # the rest: files' mtimes
    assert len(of_snapshots) == 2, len(of_snapshots)


def test_find_and_snapshot_filters_on_the_command_line(tmp_path):
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    src = tmp_path / "src"
    (src / "conf").mkdir(parents=True)
    (src / "conf" / "App.conf").write_text("v1")
    crashkit.run_cli("backup", "-r", repo, str(src), "--tag", "nightly,db", "--host", "alpha")
    (src / "conf" / "App.conf").write_text("version 2")
    os.utime(src / "conf" / "App.conf", ns=(2 * 10**18, 2 * 10**18))
    crashkit.run_cli("backup", "-r", repo, str(src), "--tag", "hourly", "--host", "alpha")
    crashkit.run_cli("backup", "-r", repo, str(src), "--host", "beta")

    def ids(*args: str) -> list[str]:
        out = crashkit.run_cli("snapshots", "-r", repo, "--json", *args).stdout
        return [s["tags"] for s in json.loads(out)]

    assert ids("--tag", "db,nightly") == [["nightly", "db"]]
    assert ids("--tag", "db,hourly") == []
    assert ids("--tag", "hourly", "--tag", "nightly") == [["nightly", "db"], ["hourly"]]
    assert ids("--host", "beta", "--path", str(src)) == [[]]
    assert ids("--path", str(tmp_path / "elsewhere")) == []
    assert ids("--latest", "1") == [["hourly"], []]  # the newest of each host's series
    assert ids("--latest", "1", "--group-by", "paths") == [[]]
    assert ids("--latest", "2", "--group-by", "tags", "--host", "alpha") == [["nightly", "db"], ["hourly"]]
    bad = crashkit.run_cli("snapshots", "-r", repo, "--latest", "1", "--group-by", "hostname", ok=(2,))
    assert b"cannot group by hostname" in bad.stderr

    out = json.loads(crashkit.run_cli("find", "-r", repo, "app.CONF", "-i", "--host", "alpha", "--json").stdout)
    assert [(f["path"], [v["size"] for v in f["versions"]], [len(v["snapshots"]) for v in f["versions"]])
            for f in out] == [("conf/App.conf", [2, 9], [1, 1])]
    text = crashkit.run_cli("find", "-r", repo, "conf/*").stdout.decode().splitlines()
    assert text[0].startswith("conf/App.conf  (alpha: ") and text[3].startswith("conf/App.conf  (beta: ")
    assert [line.split()[3:5] for line in text if line.startswith("  ")] == [["2", "B"], ["9", "B"], ["9", "B"]]
    assert ", 2 snapshots" not in text[2] and text[-1] == "2 paths, 3 versions"  # beta's source is another
    one = crashkit.run_cli("find", "-r", repo, "app.CONF", "-i", "--host", "beta").stdout.decode()
    assert one.splitlines()[-1] == "1 path, 1 version"
    proc = crashkit.run_cli("find", "-r", repo, ok=(2,))
    assert b"PATTERN" in proc.stderr
    lost = crashkit.run_cli("find", "-r", repo, "/conf/*")  # a path as on the machine: said, not silent
    assert b"relative to the snapshot's root (without a leading /)" in lost.stderr
    assert lost.stdout.decode().splitlines() == ["0 paths, 0 versions"]
    for completed in ("./conf/App.conf", "conf/", "./conf/"):  # as a shell completes names: they found nothing
        found = json.loads(crashkit.run_cli("find", "-r", repo, completed, "--json").stdout)
        assert {f["path"] for f in found} == {"conf/App.conf" if "App" in completed else "conf"}, completed


def test_find_skips_a_differential_whose_chain_is_broken_with_a_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    with Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0, ledger=False) as repo:
        full = repo.backup([str(src)]).snapshot
        (src / "a").write_text("b")
        diff = repo.backup([str(src)]).snapshot
        assert diff.parent == full.id
        other = repo.backup([str(src)], kind="full").snapshot
    os.unlink(tmp_path / "repo" / "snapshots" / full.id)
    with Repository.open(str(tmp_path / "repo"), PASSWORD, ledger=False) as repo:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = repo.find(["a"])
        assert [[s.id for s in v.snapshots] for f in found for v in f.versions] == [[other.id]]
        assert any(issubclass(w.category, RepositoryStateWarning) and diff.id[:8] in str(w.message)
                   for w in caught)
        with pytest.raises(UsageError, match="at least one pattern"):
            repo.find([])


def test_a_damaged_manifest_leaves_out_its_chain_and_the_rest_is_searched(tmp_path, new_repo, cli, password):
    """One snapshot's manifest damaged: find failed with nothing for any snapshot; now the others are
    searched, and the ones not searched are named."""
    from test_damaged_storage import damage_blob

    src = tmp_path / "src"
    src.mkdir()
    (src / "f1.txt").write_text("one")
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)], kind="full").snapshot
    (src / "f1.txt").write_text("two")
    second = repo.backup([str(src)], kind="full").snapshot
    (src / "f1.txt").write_text("three")
    third = repo.backup([str(src)], kind="diff").snapshot
    assert third.parent == second.id
    damage_blob(tmp_path / "repo", repo, bytes.fromhex(second.manifest[0]))
    repo = Repository.open(str(tmp_path / "repo"), password)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = repo.find(["f1.txt"])
    assert [[s.id for s in v.snapshots] for f in found for v in f.versions] == [[first.id]]
    named = " ".join(str(w.message) for w in seen if issubclass(w.category, RepositoryStateWarning))
    assert f"snapshot {second.short_id} is not searched" in named and f"snapshot {third.short_id}" in named
    result = cli("find", "-r", str(tmp_path / "repo"), "f1.txt", "--json", password=password)
    assert [v["snapshots"] for f in json.loads(result.stdout) for v in f["versions"]] == [[first.id]]
    assert "a manifest of its chain is damaged" in result.stderr.decode()


def test_a_file_that_only_got_another_link_is_one_version(tmp_path, new_repo):
    """A new link sorting first makes the unchanged file a hard link to it: find listed a second version
    (a file, then a hard link), where diff sees no change."""
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a").mkdir()
    (src / "b" / "data").write_bytes(b"unchanged")
    repo = new_repo()
    repo.backup([str(src)])
    os.link(src / "b" / "data", src / "a" / "data")
    repo.backup([str(src)])
    found = {f.path: f for f in repo.find(["b/data"])}
    assert len(found[b"b/data"].versions) == 1 and len(found[b"b/data"].versions[0].snapshots) == 2
    (src / "b" / "data").write_bytes(b"changed")  # both paths: the linked file changes
    repo.backup([str(src)])
    versions = repo.find(["b/data"])[0].versions
    assert [len(v.snapshots) for v in versions] == [2, 1]


@pytest.mark.parametrize("change", ["xattr", "same size and mtime"])
def test_a_linked_files_change_its_links_entry_does_not_carry_is_seen_at_every_link(tmp_path, new_repo, change,
                                                                                     monkeypatch):
    """A hard link's entry holds the file's size, mode, owner and mtime, not its attributes nor content: a link
    of a file whose attributes alone changed, or whose content changed keeping its size and mtime, had the
    same entry in both snapshots, and diff left the link out, find kept it one version."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello")
    os.link(src / "a", src / "b")
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    if change == "xattr":
        os.setxattr(src / "a", "user.note", b"reviewed")
    else:
        st = os.stat(src / "a")
        (src / "a").write_bytes(b"jello")
        os.utime(src / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    second = repo.backup([str(src)]).snapshot
    tree = {e.path: e for e in repo.tree(second)}
    assert tree[b"b"].type == T_HARDLINK and tree[b"b"].target == b"a"
    what = "metadata" if change == "xattr" else "content"
    assert [(c, n.path, what_changed(o, n)) for c, o, n in repo.diff(first, second)] == [
        ("modified", b"a", what), ("modified", b"b", what)]
    assert list(repo.diff(second, second)) == []
    found = {f.path: [[s.id for s in v.snapshots] for v in f.versions] for f in repo.find(["*"])}
    assert found == {b"a": [[first.id], [second.id]], b"b": [[first.id], [second.id]]}
    third = repo.backup([str(src)], kind="full").snapshot  # unchanged: one version on, nothing looked up
    looked_up = []
    monkeypatch.setattr(Subtree, "lookup", lambda self, path: looked_up.append(path))
    assert list(repo.diff(second, third)) == []
    assert looked_up == []
    monkeypatch.undo()
    found = {f.path: [[s.id for s in v.snapshots] for v in f.versions] for f in repo.find(["b"])}
    assert found == {b"b": [[first.id], [second.id, third.id]]}
    assert [v.entry.type for v in repo.find(["b"])[0].versions] == [T_HARDLINK, T_HARDLINK]


def test_a_version_no_backup_could_read_is_marked_as_ls_marks_it(tmp_path, new_repo, monkeypatch, python_file_reads,
                                                                 cli):
    """find showed a file no backup could read as an empty file of 0 B, where ls marks it and dump refuses it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret").write_bytes(b"never read")
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open("secret"))
    repo.backup([str(src)])
    monkeypatch.undo()
    (found,) = json.loads(cli("find", "-r", url, "secret", "--json").stdout)
    assert [v["unreadable"] for v in found["versions"]] == ["no data"]
    lines = cli("find", "-r", url, "secret").stdout.decode().splitlines()
    assert lines[1].endswith("  (unreadable at backup time: no data)"), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="makes device nodes")
def test_a_device_nodes_numbers_are_listed(tmp_path, new_repo, cli):
    """Two versions of a device node that differ in its numbers alone were listed alike by find, and diff
    called it modified with nothing ls or find showed to say how; a restore makes the node with them."""
    src = tmp_path / "src"
    src.mkdir()
    node = src / "n"
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    for minor in (3, 5):
        if node.exists():
            node.unlink()
        os.mknod(node, 0o600 | 0o020000, os.makedev(1, minor))
        os.utime(node, ns=(0, 1_700_000_000_000_000_000))
        repo.backup([str(src)])
    (found,) = json.loads(cli("find", "-r", url, "n", "--json").stdout)
    assert [v["device"] for v in found["versions"]] == [[1, 3], [1, 5]]
    lines = cli("find", "-r", url, "n").stdout.decode().splitlines()
    assert [line.split()[3] for line in lines[1:3]] == ["1,3", "1,5"]
    listed = {e["path"]: e for e in json.loads(cli("ls", "-r", url, "latest", "--json").stdout)}
    assert (listed["n"]["device"], listed[""]["device"]) == ([1, 5], None)
    (line,) = [x for x in cli("ls", "-r", url, "latest").stdout.decode().splitlines() if x.endswith(" n")]
    assert line.split()[3] == "1,5"


def test_a_version_that_was_a_hard_link_then_the_file_itself_lists_the_file(tmp_path, new_repo, cli):
    """The link's first name went: the path holds the same file, one version, which find listed as the hard
    link (no digest, `-> a`) also for the snapshots where there is no `a` to name."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"same")
    os.link(src / "a", src / "b")
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    repo.backup([str(src)])
    os.unlink(src / "a")
    last = repo.backup([str(src)]).snapshot
    (held,) = [e for e in repo.tree(last) if e.path == b"b"]
    (found,) = json.loads(cli("find", "-r", url, "b", "--json").stdout)
    (version,) = found["versions"]
    assert (version["type"], version["target"], version["digest"], len(version["snapshots"])) == (
        "file", None, held.digest.hex(), 2)
    line = cli("find", "-r", url, "b").stdout.decode().splitlines()[1]
    assert line.split()[0] == "file" and "->" not in line, line
    os.link(src / "b", src / "c")  # a version that is a link throughout is listed as the link
    repo.backup([str(src)])
    (found,) = json.loads(cli("find", "-r", url, "c", "--json").stdout)
    assert [(v["type"], v["target"]) for v in found["versions"]] == [("hardlink", "b")]


def test_find_lists_each_sources_paths_by_name_where_the_manifests_order_them_otherwise(tmp_path, new_repo, cli):
    """A manifest sorts ``a/x`` before ``a-c`` and ``a.b`` ("/" read as the lowest byte); find lists each
    source's paths by name, as it did when it held them all: its trees are now read side by side, path by path,
    and the paths listed after.  A directory deleted in a differential and its path back in the next is two
    versions; a changed file, two; the rest one over all three snapshots."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a-c").mkdir()
    (src / "a/x").write_text("x")
    (src / "a-c/y").write_text("y")
    (src / "a.b").write_text("ab")
    (src / "a0").write_text("0")
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)], host="h").snapshot
    (src / "a-c/y").unlink()
    (src / "a-c").rmdir()
    (src / "a/x").write_text("longer")
    second = repo.backup([str(src)], host="h", kind="diff").snapshot
    (src / "a-c").mkdir()
    (src / "a-c/y").write_text("y")
    third = repo.backup([str(src)], host="h", kind="diff").snapshot
    other = repo.backup([str(src)], host="g").snapshot  # another source: listed before, by host
    assert second.kind == third.kind == "diff"
    found = [(f.host, f.path, [[s.id for s in v.snapshots] for v in f.versions]) for f in repo.iter_find(["*"])]
    every = [first.id, second.id, third.id]
    assert found == [("g", p, [[other.id]]) for p in [b"a", b"a-c", b"a-c/y", b"a.b", b"a/x", b"a0"]] + [
        ("h", b"a", [every]), ("h", b"a-c", [[first.id], [third.id]]), ("h", b"a-c/y", [[first.id], [third.id]]),
        ("h", b"a.b", [every]), ("h", b"a/x", [[first.id], [second.id, third.id]]), ("h", b"a0", [every])]
    assert [(f.host, f.path, [[s.id for s in v.snapshots] for v in f.versions]) for f in repo.find(["*"])] == found
    assert [v.entry.size for f in repo.find(["a/x"]) for v in f.versions] == [6, 1, 6]  # g, then h
    listed = json.loads(cli("find", "-r", str(tmp_path / "repo"), "--json", "*").stdout)
    assert [(f["host"], f["path"], [v["snapshots"] for v in f["versions"]]) for f in listed] == [
        (h, p.decode(), v) for h, p, v in found]
    text = cli("find", "-r", str(tmp_path / "repo"), "*").stdout.decode()
    assert [line.split("  ")[0] for line in text.splitlines() if not line.startswith(" ")][:-1] == [
        p.decode() for _, p, _ in found]
    assert text.splitlines()[-1] == "12 paths, 15 versions"


def test_find_holds_what_it_found_encoded_not_an_entry_per_path(tmp_path, new_repo, monkeypatch):
    """Every match of every snapshot was held as a record and an entry, then every path as a Found with its
    versions: ``find '*'`` over two snapshots of 300,000 files peaked at 510 MB.  The matches are held
    encoded and the paths made one at a time as they are taken."""
    import gc

    from chunkvault.store import find as finding
    from chunkvault.store.manifest import Entry

    src = tmp_path / "src"
    for d in range(10):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d}" / f"f{f}").write_text(f"{d} {f}")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    (src / "d0" / "f0").write_text("changed")
    repo.backup([str(src)])
    made = []
    real = finding.Found
    monkeypatch.setattr(finding, "Found", lambda *args: made.append(1) or real(*args))
    found = repo.iter_find(["*"])
    first = next(found)
    gc.collect()
    entries = sum(isinstance(o, Entry) for o in gc.get_objects())
    assert len(made) == 1 and entries < 300, (len(made), entries)
    assert first.path == b"d0" and sum(1 for _ in found) == 1010 - 1


def test_find_reads_the_manifests_once_where_it_compares_hard_links_by_their_files(tmp_path, new_repo):
    """A hard link whose file changed is compared by the file it names, looked up in its snapshot's manifests.
    The search's manifests left the blob cache before those look-ups: each one read and decoded its blobs
    again (300 changed links over two snapshots: 602 blob reads, where the search itself read 2).  The blobs
    a look-up reads are kept until the search is done."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i}").write_text(str(i))
        os.link(src / f"f{i}", src / f"f{i}.lnk")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    for i in range(300):
        with open(src / f"f{i}", "a") as fh:
            fh.write("x")
    repo.backup([str(src)], kind="diff")
    store = repo._repo
    decoded = []
    real = store._decode
    store._decode = lambda blob_id: decoded.append(blob_id) or real(blob_id)
    store._cache.drop([bytes.fromhex(h) for s in repo.snapshots() for h in s.manifest])
    found = repo.find(["*.lnk"])
    assert len(found) == 300 and [len(f.versions) for f in found] == [2] * 300
    manifest_blobs = sum(len(s.manifest) for s in repo.snapshots())
    assert len(decoded) <= 2 * manifest_blobs, (len(decoded), manifest_blobs)
    assert not any(store._cache.peek(bytes.fromhex(h)) for s in repo.snapshots() for h in s.manifest)
