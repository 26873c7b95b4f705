"""Exclude patterns that take back (``!GLOB``), case-insensitive excludes, and a literal ``\\!``: the pure
rules against a simple model, the walk (C and per directory) against the rules, and the commands."""
from __future__ import annotations

import fnmatch
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashkit
from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.store import source
from chunkvault.store.excludes import ExcludeRules

PASSWORD = crashkit.PASSWORD


# --- the pure rules against a model ---------------------------------------------------------------------

def model_excluded(path: str, excludes: list[str], iexcludes: list[str]) -> bool:
    """The path alone (its ancestors kept): in each list the last pattern matching the path or its name
    decides, written as plainly as it can be."""
    name = path.split("/")[-1]
    for patterns, fold in ((excludes, False), (iexcludes, True)):
        verdict = False
        for text in patterns:
            negated = text[0] == "!"
            glob = text[1:] if negated or text[:2] == "\\!" else text
            p, n = (path.lower(), name.lower()) if fold else (path, name)
            g = glob.lower() if fold else glob
            if fnmatch.fnmatchcase(p, g) or fnmatch.fnmatchcase(n, g):
                verdict = not negated
        if verdict:
            return True
    return False


def model_tree_excluded(path: str, excludes: list[str], iexcludes: list[str]) -> bool:
    """A walk never enters a directory left out: a path goes when it or an ancestor is left out alone."""
    parts = path.split("/")
    return any(model_excluded("/".join(parts[:i]), excludes, iexcludes) for i in range(1, len(parts) + 1))


names = st.text(alphabet="aAb!", min_size=1, max_size=3)
paths = st.lists(names, min_size=1, max_size=4).map("/".join)
globs = st.text(alphabet="aAb*?/", min_size=1, max_size=5)
patterns = st.tuples(st.sampled_from(["", "", "!", "\\!"]), globs).map("".join)


@settings(max_examples=400)
@given(st.lists(patterns, max_size=5), st.lists(patterns, max_size=3), st.lists(paths, min_size=1, max_size=12))
def test_rules_agree_with_the_model(excludes, iexcludes, some):
    rules = ExcludeRules(excludes, iexcludes)
    for path in sorted(set(some)):  # sorted, as a tree comes: the directories' answers kept are reused
        assert rules.excluded(path) == model_excluded(path, excludes, iexcludes), path
        assert rules.excluded_tree(path) == model_tree_excluded(path, excludes, iexcludes), path


@given(st.lists(globs, min_size=1, max_size=5), paths)
def test_plain_globs_exclude_as_before(excludes, path):
    """Without '!' nor case folding the rules are what the excludes always were: any glob matching."""
    name = path.rsplit("/", 1)[-1]
    old = any(fnmatch.fnmatchcase(path, g) or fnmatch.fnmatchcase(name, g) for g in excludes)
    assert ExcludeRules(excludes).excluded(path) == old


def test_a_later_pattern_decides():
    rules = ExcludeRules(["sub/*", "!sub/keep*", "sub/keep.tmp"])
    assert [rules.excluded(p) for p in ("sub", "sub/a", "sub/keep", "sub/keep.tmp")] == [False, True, False, True]
    assert ExcludeRules(["\\!x"]).excluded("d/!x") and not ExcludeRules(["\\!x"]).excluded("d/\\!x")
    assert ExcludeRules([], ["*.JPG"]).excluded("a/IMG.jpg") and not ExcludeRules(["*.JPG"]).excluded("a/IMG.jpg")
    # the lists decide each on its own: a '!' of one does not take back what the other left out
    assert ExcludeRules(["*.jpg"], ["!keep.jpg"]).excluded("keep.jpg")


def test_only_the_plain_go_to_the_c_walk():
    assert ExcludeRules(["a*", "\\!b"]).plain_globs() == ["a*", "!b"]
    for rules in (ExcludeRules(["a", "!b"]), ExcludeRules([], ["a"]), ExcludeRules(["a?"])):
        assert rules.plain_globs() is None


@pytest.mark.parametrize("excludes, iexcludes", [(["!"], []), (["a", "!"], []), ([], ["!"])])
def test_a_bang_naming_nothing_is_refused(excludes, iexcludes):
    with pytest.raises(UsageError, match="pattern '!' names nothing"):
        ExcludeRules(excludes, iexcludes)


def test_a_pattern_that_takes_back_nothing_is_said():
    said = ExcludeRules(["!a", "sub", "!sub/b.txt", "!sub/*.txt", "d/*", "!d/keep", "!x"], ["!y"]).warnings()
    assert len(said) == 3, said
    assert "'!a' re-includes nothing: no pattern before it excludes anything" in said[0]
    assert "'!sub/b.txt' re-includes nothing: 'sub' is excluded" in said[1] and "'sub/*'" in said[1]
    assert said[2].startswith("iexclude pattern '!y' re-includes nothing: no pattern before it")


# --- the walk ------------------------------------------------------------------------------------------

TREE = ["a", "A", "b", "a/a", "a/b", "a/B", "a/!a", "a/a/b", "a/a/A", "b/a", "b/b", "b/b/a", "!a", "!a/b"]
FILES = {"a/b", "a/B", "a/!a", "a/a/b", "a/a/A", "b/a", "b/b/a", "!a/b", "A"}


@pytest.fixture(scope="module")
def disk_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("walked")
    for p in sorted(TREE, key=len):
        if p in FILES:
            (root / p).write_bytes(p.encode())
        else:
            (root / p).mkdir()
    return str(root)


def walked(root: str, excludes: list[str], iexcludes: list[str]) -> list[str]:
    walk = source.SourceWalk.of_paths([root], excludes, iexcludes=iexcludes)
    return sorted(os.fsdecode(item[0]) for item in walk if item is not None and item[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(patterns, max_size=4), st.lists(patterns, max_size=2))
def test_the_walk_leaves_out_what_the_model_says(disk_tree, monkeypatch, excludes, iexcludes):
    """The per-directory walk (Python judging each entry) and, for plain globs, the C walk both keep
    exactly the paths no prefix of which the model leaves out."""
    expected = sorted(p for p in TREE if not model_tree_excluded(p, excludes, iexcludes))
    assert walked(disk_tree, excludes, iexcludes) == expected
    with monkeypatch.context() as m:
        m.setattr(source, "Walker", None)
        assert walked(disk_tree, excludes, iexcludes) == expected


@pytest.fixture
def two_sources(tmp_path):
    """srvA/app/{important,debug}.log, srvA/cache/junk and srvB/b: two sources, so that each keeps its
    absolute path in the snapshot."""
    for name in ("srvA/app/important.log", "srvA/app/debug.log", "srvA/cache/junk", "srvB/b"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    return [str(tmp_path / "srvA"), str(tmp_path / "srvB")]


MULTI_RULES = {"plain": ["*.log", "cache/*"], "bang": ["*.log", "!app/important.log", "cache/*"]}


@pytest.mark.parametrize("rules", ["plain", "bang"])
@pytest.mark.parametrize("c_walk", [True, False])
@pytest.mark.parametrize("report", [False, True])
def test_with_several_sources_a_pattern_names_a_path_below_its_source(two_sources, monkeypatch, rules, c_walk,
                                                                      report):
    """As with one source: the C walk, the per-directory walk and a walk reporting what it leaves out (a
    dry run's ``x`` lines) match each pattern against the path below the source, and against the path
    the snapshot records."""
    if not c_walk:
        monkeypatch.setattr(source, "Walker", None)
    walk = source.SourceWalk.of_paths(two_sources, MULTI_RULES[rules], report_excluded=report)
    top = os.fsencode(two_sources[0].lstrip("/").rpartition("/")[0]) + b"/"
    kept, left = [], []
    for rel, _, st, _ in walk:
        if rel.startswith(top):
            (left if isinstance(st, source.Excluded) else kept).append(os.fsdecode(rel[len(top):]))
    want = ["srvA", "srvA/app"] + (["srvA/app/important.log"] if rules == "bang" else []) + ["srvA/cache",
                                                                                           "srvB", "srvB/b"]
    assert kept == want
    gone = ["srvA/app/debug.log"] + (["srvA/app/important.log"] if rules == "plain" else []) + ["srvA/cache/junk"]
    assert left == (gone if report else [])
    assert (walk._c_excludes is not None) == (rules == "plain")  # plain globs stay on the C walk
    # the path the snapshot records (as ls lists it) names the entry too
    walk = source.SourceWalk.of_paths(two_sources, MULTI_RULES[rules] + [two_sources[1].lstrip("/") + "/b"])
    assert [rel for rel, *_ in walk if rel.endswith(b"/srvB/b")] == []


# --- the commands ---------------------------------------------------------------------------------------

def listed(repo: str, snap: str = "latest") -> list[str]:
    out = crashkit.run_cli("ls", "-r", repo, snap, "--json").stdout
    return sorted(e["path"] for e in json.loads(out) if e["path"])


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    crashkit.init_repo(path)
    return path


@pytest.fixture
def src(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "Photos").mkdir()
    for name in ("a.txt", "!bang", "sub/b.txt", "sub/c.txt", "Photos/IMG.JPG", "Photos/b.jpg", "Photos/n.txt"):
        (src / name).write_text(name)
    return src


def test_a_file_is_kept_from_a_directory_whose_contents_are_excluded(tmp_path, repo, src):
    proc = crashkit.run_cli("backup", "-r", repo, str(src), "--exclude", "sub/*", "--exclude", "!sub/b.txt")
    assert b"warning" not in proc.stderr
    assert [p for p in listed(repo) if p.startswith("sub")] == ["sub", "sub/b.txt"]
    # the directory itself left out is not walked into: nothing comes back, and the backup says why
    proc = crashkit.run_cli("backup", "-r", repo, str(src), "--exclude", "sub", "--exclude", "!sub/b.txt")
    assert "'!sub/b.txt' re-includes nothing: 'sub' is excluded" in proc.stderr.decode()
    assert not [p for p in listed(repo) if p.startswith("sub")]


def test_a_dry_run_of_several_sources_lists_what_the_patterns_below_a_source_leave_out(tmp_path, repo,
                                                                                       two_sources):
    args = ["--exclude", "*.log", "--exclude", "!app/important.log", "--exclude", "cache/*"]
    out = crashkit.run_cli("backup", "-r", repo, *two_sources, "-n", "--list", *args).stdout.decode()
    lines = {line.rpartition("/srvA/")[2]: line[0] for line in out.splitlines() if "/srvA/" in line}
    assert lines == {"app": "A", "app/important.log": "A", "app/debug.log": "x", "cache": "A", "cache/junk": "x"}
    crashkit.run_cli("backup", "-r", repo, *two_sources, *args)
    assert sorted(p.rpartition("/srv")[2] for p in listed(repo) if "/srv" in p) == [
        "A", "A/app", "A/app/important.log", "A/cache", "B", "B/b"]


def test_exclude_files_take_bang_lines_and_keep_their_place(tmp_path, repo, src):
    (tmp_path / "ex").write_text("# leave out the text, keep one\n*.txt\n!a.txt\n")
    crashkit.run_cli("backup", "-r", repo, str(src), "--exclude-file", str(tmp_path / "ex"), "--exclude", "!c.txt")
    assert [p for p in listed(repo) if p.endswith(".txt")] == ["a.txt", "sub/c.txt"]
    # the order given is the order applied: the file after the '!' leaves c.txt out again
    proc = crashkit.run_cli("backup", "-r", repo, str(src), "--exclude", "!c.txt", "--exclude-file",
                            str(tmp_path / "ex"))
    assert "'!c.txt' re-includes nothing: no pattern before it" in proc.stderr.decode()
    assert [p for p in listed(repo) if p.endswith(".txt")] == ["a.txt"]


def test_iexclude_ignores_case(tmp_path, repo, src):
    (tmp_path / "iex").write_text("photos/N.TXT\n")
    crashkit.run_cli("backup", "-r", repo, str(src), "--iexclude", "*.jpg", "--iexclude-file", str(tmp_path / "iex"))
    assert not [p for p in listed(repo) if p.startswith("Photos/")]
    crashkit.run_cli("backup", "-r", repo, str(src), "--exclude", "*.jpg")  # case-sensitive: IMG.JPG stays
    assert [p for p in listed(repo) if p.startswith("Photos/")] == ["Photos/IMG.JPG", "Photos/n.txt"]


def test_an_escaped_bang_is_a_literal_name(tmp_path, repo, src):
    crashkit.run_cli("backup", "-r", repo, str(src), "--exclude", "\\!bang")
    assert "!bang" not in listed(repo) and "a.txt" in listed(repo)


@pytest.mark.parametrize("args", [["--exclude", "!"], ["--iexclude", "!"], ["--exclude", "*.txt", "--exclude", "!"]])
def test_a_bare_bang_is_a_usage_error(tmp_path, repo, src, args):
    proc = crashkit.run_cli("backup", "-r", repo, str(src), *args, ok=(2,))
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "pattern '!' names nothing" in err[0], err
    assert crashkit.snapshot_ids(repo) == set()
    with Repository.open(repo, PASSWORD) as r, pytest.raises(UsageError, match="names nothing"):
        r.backup([str(src)], excludes=["!"])


def test_a_differential_follows_a_changed_rule(tmp_path, repo, src):
    """Each differential records what a changed rule leaves out as deleted, and what it takes back as new."""
    def sub(snap) -> list[bytes]:
        return [e.path for e in r.tree(snap.id) if e.path.startswith(b"sub")]

    with Repository.open(repo, PASSWORD) as r:
        r.backup([str(src)], kind="full")
        keep = r.backup([str(src)], kind="diff", excludes=["sub/*", "!sub/b.txt"]).snapshot
        assert keep.stats["deleted"] == 1 and sub(keep) == [b"sub", b"sub/b.txt"]
        left = r.backup([str(src)], kind="diff", excludes=["sub/*"]).snapshot
        assert left.stats["deleted"] == 1 and sub(left) == [b"sub"]
        back = r.backup([str(src)], kind="diff", excludes=["sub/*", "!sub/*.txt"]).snapshot
        assert back.stats["new_files"] == 2 and sub(back) == [b"sub", b"sub/b.txt", b"sub/c.txt"]
        ignoring_case = r.backup([str(src)], kind="diff", iexcludes=["SUB/C.TXT"]).snapshot
        assert ignoring_case.stats["deleted"] == 1 and sub(ignoring_case) == [b"sub", b"sub/b.txt"]


def test_a_dry_run_counts_what_the_rules_keep(tmp_path, repo, src):
    args = ["backup", "-r", repo, str(src), "--dry-run", "--json", "--exclude", "*.txt", "--exclude", "!b.txt",
            "--iexclude", "*.JPG"]
    out = json.loads(crashkit.run_cli(*args).stdout)
    assert out["dry_run"] and out["files"] == 2 and out["stats"]["new_files"] == 2  # !bang, sub/b.txt
    assert crashkit.snapshot_ids(repo) == set()
    crashkit.run_cli(*[a for a in args if a not in ("--dry-run", "--json")])
    assert [p for p in listed(repo) if "." in p or "!" in p] == ["!bang", "sub/b.txt"]


def test_restore_and_rewrite_take_the_same_rules(tmp_path, repo, src):
    crashkit.run_cli("backup", "-r", repo, str(src))
    target = tmp_path / "t"
    crashkit.run_cli("restore", "-r", repo, "latest", "-t", str(target), "--exclude", "sub/*", "--exclude",
                     "!sub/c.txt", "--iexclude", "photos")
    got = sorted(os.path.relpath(os.path.join(d, n), target) for d, ds, fs in os.walk(target) for n in ds + fs)
    assert got == ["!bang", "a.txt", "sub", "sub/c.txt"]
    proc = crashkit.run_cli("restore", "-r", repo, "latest", "-t", str(tmp_path / "u"), "--include", "!bang",
                            ok=(2,))
    assert "include pattern '!bang'" in proc.stderr.decode() and not (tmp_path / "u").exists()
    crashkit.run_cli("restore", "-r", repo, "latest", "-t", str(tmp_path / "u"), "--include", "\\!bang")
    assert os.listdir(tmp_path / "u") == ["!bang"]

    proc = crashkit.run_cli("rewrite", "-r", repo, "--exclude", "!sub", ok=(2,))
    assert "rewrite's patterns all start with '!'" in proc.stderr.decode()
    crashkit.run_cli("rewrite", "-r", repo, "--exclude", "sub/*", "--exclude", "!sub/b.txt", "--iexclude", "*.jpg",
                     "--confirm", "REWRITE")
    assert listed(repo) == ["!bang", "Photos", "Photos/n.txt", "a.txt", "sub", "sub/b.txt"]


def test_a_walk_begun_with_other_case_rules_is_refused(tmp_path, repo, src):
    with Repository.open(repo, PASSWORD) as r:
        walk = source.SourceWalk.of_paths([str(src)], ["*.txt"])
        with pytest.raises(UsageError, match="other paths or exclusion rules"):
            r.backup([str(src)], walk=walk, excludes=["*.txt"], iexcludes=["*.jpg"])
        walk = source.SourceWalk.of_paths([str(src)], ["*.txt"], iexcludes=["*.jpg"])
        snap = r.backup([str(src)], walk=walk, excludes=["*.txt"], iexcludes=["*.jpg"]).snapshot
        assert sorted(e.path for e in r.tree(snap.id)) == [b"", b"!bang", b"Photos", b"sub"]
