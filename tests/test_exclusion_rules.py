"""What a backup leaves out: exclude files, marked (cache) directories, and other file systems."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

import crashkit
from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.store import source
from treeutil import mounted_tmpfs

PASSWORD = crashkit.PASSWORD
SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def listed(repo: str, snap: str = "latest") -> list[str]:
    out = crashkit.run_cli("ls", "-r", repo, snap, "--json").stdout
    return sorted(e["path"] for e in json.loads(out))


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    crashkit.init_repo(path)
    return path


def test_cli_rules_leave_out_what_they_name(tmp_path, repo):
    src = tmp_path / "src"
    for d in ("keep", "cache/sub", "fake-cache", "marked/deep"):
        (src / d).mkdir(parents=True)
    (src / "keep" / "a").write_bytes(b"a")
    (src / "keep" / "scratch.tmp").write_bytes(b"t")
    (src / "cache" / "CACHEDIR.TAG").write_bytes(SIGNATURE + b"\n# a cache\n")
    (src / "cache" / "sub" / "x").write_bytes(b"x")
    (src / "fake-cache" / "CACHEDIR.TAG").write_bytes(b"Signature: not the tag's")
    (src / "fake-cache" / "y").write_bytes(b"y")
    (src / "marked" / ".nobackup").write_bytes(b"")
    (src / "marked" / "deep" / "z").write_bytes(b"z")
    (tmp_path / "excludes").write_text("# scratch files\n\n   *.tmp   \n")
    crashkit.run_cli("backup", "-r", repo, str(src), "--exclude-file", str(tmp_path / "excludes"),
                     "--exclude-caches", "--exclude-if-present", ".nobackup")
    assert listed(repo) == ["", "cache", "cache/CACHEDIR.TAG", "fake-cache", "fake-cache/CACHEDIR.TAG",
                            "fake-cache/y", "keep", "keep/a", "marked", "marked/.nobackup"]
    crashkit.run_cli("backup", "-r", repo, str(src))  # without the rules: a differential adds it all back
    assert len(listed(repo)) == 15


@pytest.mark.parametrize("args, fragment", [
    (["--exclude-file", "/nonexistent/excludes"], "cannot read exclude file /nonexistent/excludes"),
    (["--exclude-if-present", "a/b"], "not a file name to exclude directories by: 'a/b'"),
    (["--stdin", "--stdin-name", "x", "--exclude", "*.tmp"], "--stdin takes no exclusion rules"),
    (["--stdin", "--stdin-name", "x", "-x"], "--stdin takes no exclusion rules"),
    (["--stdin", "--stdin-name", "x", "--exclude-larger-than", "1M"], "--stdin takes no exclusion rules"),
    (["--exclude-larger-than", "lots"], "not a size: 'lots'"),
])
def test_bad_rules_are_usage_errors(tmp_path, repo, args, fragment):
    paths = [] if "--stdin" in args else [str(tmp_path)]
    proc = crashkit.run_cli("backup", "-r", repo, *paths, *args, ok=(2,))
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert crashkit.snapshot_ids(repo) == set()


def test_a_walk_begun_with_other_rules_is_refused(tmp_path, repo):
    (tmp_path / "f").write_bytes(b"f")
    with Repository.open(repo, PASSWORD) as r:
        for rules in ({"one_file_system": True}, {"exclude_caches": True}, {"exclude_larger_than": 10}):
            walk = source.SourceWalk.of_paths([str(tmp_path)])
            with pytest.raises(UsageError, match="other paths or exclusion rules"):
                r.backup([str(tmp_path)], walk=walk, **rules)
        walk = source.SourceWalk.of_paths([str(tmp_path)], one_file_system=True, markers=[source.CACHEDIR_TAG],
                                          repositories=[str(repo)])  # the tree holds the repository
        r.backup([str(tmp_path)], walk=walk, one_file_system=True, exclude_caches=True)


@pytest.fixture(params=["c", "per directory"])
def walker(request, monkeypatch) -> str:
    """Each test of a rule runs with the C walk and with the walk directory by directory."""
    if request.param != "c":
        monkeypatch.setattr(source, "Walker", None)
    return request.param


def test_one_file_system_keeps_mount_points_empty(tmp_path, repo, walker):
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "own").write_bytes(b"own")
    with mounted_tmpfs(str(src / "mnt")):
        (src / "mnt" / "d").mkdir()
        (src / "mnt" / "d" / "f").write_bytes(b"on another file system")
        with Repository.open(repo, PASSWORD) as r:
            whole = r.backup([str(src)]).snapshot
            one = r.backup([str(src)], one_file_system=True).snapshot
            assert one.kind == "diff" and one.stats["deleted"] == 1  # mnt/d/f (mnt/d, a directory, is not counted)
            assert sorted(e.path for e in r.tree(one.id)) == [b"", b"mnt", b"own"]
            r.restore(one.id, str(tmp_path / "one"))
            r.restore(whole.id, str(tmp_path / "whole"))
            # a source that is itself the other file system's root is walked whole
            inner = r.backup([str(src / "mnt")], one_file_system=True).snapshot
            assert sorted(e.path for e in r.tree(inner.id)) == [b"", b"d", b"d/f"]
    assert os.listdir(tmp_path / "one" / "mnt") == []
    assert (tmp_path / "whole" / "mnt" / "d" / "f").read_bytes() == b"on another file system"


def test_larger_files_are_left_out_but_not_a_source_named(tmp_path, repo, walker):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "small").write_bytes(b"s" * 1024)
    (src / "d" / "big").write_bytes(b"b" * 1025)
    os.symlink("d/big", src / "link")  # a link is not a regular file: kept
    (tmp_path / "huge").write_bytes(b"h" * 4096)
    with Repository.open(repo, PASSWORD) as r:  # in this process: the walk monkeypatched above
        first = r.backup([str(src), str(tmp_path / "huge")], exclude_larger_than=1024).snapshot
        top = os.fsencode(str(tmp_path).lstrip("/"))
        assert sorted(e.path for e in r.tree(first.id) if e.path.startswith(top + b"/")) == [top + p for p in (
            b"/huge", b"/src", b"/src/d", b"/src/link", b"/src/small")]
        again = r.backup([str(src), str(tmp_path / "huge")], exclude_larger_than=1025).snapshot
        assert again.kind == "diff" and again.stats["new_files"] == 1
        assert top + b"/src/d/big" in {e.path for e in r.tree(again.id)}
    crashkit.run_cli("backup", "-r", repo, str(src), "--exclude-larger-than", "1k")
    assert listed(repo) == ["", "d", "link", "small"]


def test_paths_from_list_files(tmp_path, repo):
    src = tmp_path / "src"
    (src / "a b").mkdir(parents=True)
    (src / "a b" / "one").write_bytes(b"1")
    (src / "two\nlines").write_bytes(b"2")
    (src / "three").write_bytes(b"3")
    (src / "left").write_bytes(b"out")
    (tmp_path / "list").write_text(f"# what the job saves\n\n  {src / 'a b'}  \n{src / 'three'}\n")
    (tmp_path / "raw").write_bytes(os.fsencode(src / "two\nlines") + b"\0")
    crashkit.run_cli("backup", "-r", repo, "--files-from", str(tmp_path / "list"), "--files-from-raw",
                     str(tmp_path / "raw"))
    top = str(src).lstrip("/")
    assert [p for p in listed(repo) if p.startswith(f"{top}/")] == [
        f"{top}/a b", f"{top}/a b/one", f"{top}/three", f"{top}/two\nlines"]
    assert listed(repo)[listed(repo).index(top) - 1] == os.path.dirname(top)  # the directories above
    proc = crashkit.run_cli("backup", "-r", repo, "--files-from", str(tmp_path / "missing"), ok=(2,))
    assert proc.stderr.decode().strip() == f"chunkvault: cannot read list of files {tmp_path / 'missing'}: " \
                                           "No such file or directory"


def test_a_list_read_from_a_device_that_never_ends_is_refused_and_an_empty_one_is_empty(tmp_path, repo):
    """/dev/zero as --files-from (or an exclude file) was read until memory ran out; /dev/null is an empty
    list, as for any tool reading a file."""
    proc = crashkit.run_cli("backup", "-r", repo, "--files-from-raw", "/dev/zero", ok=(2,))
    assert proc.stderr.decode().strip() == "chunkvault: list of files /dev/zero is a device that gave more " \
                                           "than 1 MiB: give a file or a pipe"
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run(crashkit.cli_argv("backup", "-r", repo, "--files-from", "-"), stdin=zero,
                              env=crashkit.cli_env(), capture_output=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.decode().strip() == (
        "chunkvault: list of files - (standard input) is a device that gave more than 1 MiB: give a file or a pipe")
    proc = crashkit.run_cli("backup", "-r", repo, str(tmp_path), "--exclude-file", "/dev/urandom", ok=(2,))
    assert "exclude file /dev/urandom is a device" in proc.stderr.decode()
    proc = crashkit.run_cli("backup", "-r", repo, "--files-from", "/dev/null", ok=(2,))
    assert proc.stderr.decode().strip() == "chunkvault: nothing to back up: give at least one path (or --stdin)"
    assert source.read_list_file("/dev/null", "exclude file") == []


def test_a_list_from_a_closed_standard_input_is_one_line(tmp_path, repo):
    """``--files-from -`` with standard input closed (``<&-``) ended in "internal error: AttributeError"."""
    proc = subprocess.run(crashkit.cli_argv("backup", "-r", repo, "--files-from", "-"), env=crashkit.cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=300, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2 and proc.stderr.decode().strip() == (
        "chunkvault: cannot read list of files - (standard input): it is closed")


def test_a_list_file_line_ends_at_a_line_feed_alone(tmp_path, repo):
    """A name holding a carriage return, a form feed, NEL or a line separator was split there into two paths
    (neither the one listed: "source path does not exist"); a CRLF file's lines still read."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["cr\rname", "ff\x0cname", "nel\x85name", "ls\u2028name", "crlf"]
    for name in names:
        (src / name).write_bytes(b"x")
    (tmp_path / "list").write_bytes(b"".join(os.fsencode(src / n) + b"\r\n" for n in names))
    proc = crashkit.run_cli("backup", "-r", repo, "--files-from", str(tmp_path / "list"))
    assert b"does not exist" not in proc.stderr
    top = str(src).lstrip("/")
    assert [p for p in listed(repo) if p.startswith(f"{top}/")] == sorted(f"{top}/{n}" for n in names)


def test_a_list_file_line_loses_only_ascii_blanks_around_it(tmp_path, repo):
    """A name that ends in a no-break space, an ideographic space, a line separator or a unit separator
    (whitespace to Python's str.strip) lost it: a path that was not the one listed ("none exists")."""
    src = tmp_path / "src"
    src.mkdir()
    names = ["nbsp\xa0", "ideographic\u3000", "ls\u2028", "us\x1f", "\xa0leading"]
    for name in names:
        (src / name).write_bytes(b"x")
    (tmp_path / "list").write_bytes(b"".join(b" \t" + os.fsencode(src / n) + b" \r\n" for n in names))
    crashkit.run_cli("backup", "-r", repo, "--files-from", str(tmp_path / "list"))
    top = str(src).lstrip("/")
    assert [p for p in listed(repo) if p.startswith(f"{top}/")] == sorted(f"{top}/{n}" for n in names)


def test_files_from_raw_takes_find_print0_output_on_standard_input(tmp_path, new_repo, cli):
    """`find ... -print0 | chunkvault backup --files-from-raw -`: find ends every name with a NUL, the last
    one too, and that end is no empty name to refuse."""
    from chunkvault.store.manifest import T_FILE

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "one").write_bytes(b"1")
    (src / "two\nlines").write_bytes(b"2")
    (tmp_path / "not-listed").write_bytes(b"secret")
    found = subprocess.run(["find", str(src), "-type", "f", "-print0"], capture_output=True, check=True).stdout
    assert found.endswith(b"\0")
    repo = new_repo(str(tmp_path / "repo"))
    cli("backup", "-r", str(tmp_path / "repo"), "-q", "--files-from-raw", "-", input=found)
    top = str(src).lstrip("/")
    files = sorted(e.path.decode() for e in repo.tree("latest") if e.type == T_FILE)
    assert files == [f"{top}/d/one", f"{top}/two\nlines"]
    (tmp_path / "raw").write_bytes(b"\0" + found.replace(b"\0", b"\0\0"))
    assert sorted(source.read_list_file(str(tmp_path / "raw"), "list", raw=True)) == [
        str(src / "d" / "one"), str(src / "two\nlines")]


def test_an_exclude_pattern_that_can_never_match_is_said(tmp_path, new_repo):
    """An absolute path, "./x" or "dir/" (restic and gitignore habits) matches no path below a source nor any
    name: the backup says so instead of quietly keeping what the user meant to leave out."""
    src = tmp_path / "src"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "f").write_bytes(b"x")
    repo = new_repo()
    result = repo.backup([str(src)], excludes=[str(src / "cache"), "./cache", "cache/", "*.tmp"])
    said = [w for w in result.warnings if "matches nothing" in w]
    assert len(said) == 3 and not any("*.tmp" in w for w in said)
    assert [e.path for e in repo.tree(result.snapshot) if e.path] == [b"cache", b"cache/f"]
