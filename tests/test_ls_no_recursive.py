"""ls --no-recursive (Repository.tree(recursive=False)): a path and what lies directly in it."""
import json

import pytest

from chunkvault.errors import UsageError


@pytest.fixture
def tree(tmp_path, new_repo):
    src = tmp_path / "src"
    (src / "usr" / "lib" / "python3" / "site").mkdir(parents=True)
    (src / "usr" / "lib" / "python3" / "os.py").write_text("os")
    (src / "usr" / "lib" / "python3" / "site" / "x.py").write_text("x")
    (src / "usr" / "lib" / "libc.so").write_text("c")
    (src / "usr" / "bin").mkdir()
    (src / "top").write_text("top")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    return repo, snap, str(tmp_path / "repo")


def _paths(out: str) -> list[str]:
    return [line.split()[-1] for line in out.splitlines()]


@pytest.mark.parametrize("path, listed", [
    (None, [".", "top", "usr"]),
    ("usr/lib", ["usr/lib", "usr/lib/libc.so", "usr/lib/python3"]),
    ("/usr/lib/python3", ["usr/lib/python3", "usr/lib/python3/os.py", "usr/lib/python3/site"]),
    ("usr/lib/python3/os.py", ["usr/lib/python3/os.py"]),
    ("usr/bin", ["usr/bin"]),
])
def test_the_path_and_its_direct_entries(tree, cli, path, listed):
    repo, snap, r = tree
    assert [e.path.decode() or "." for e in repo.tree(snap, path, recursive=False)] == listed
    args = ["ls", "-r", r, snap.id, *([path] if path else []), "--no-recursive"]
    assert _paths(cli(*args).stdout.decode()) == listed
    assert [d["path"] or "." for d in json.loads(cli(*args, "--json").stdout)] == listed
    everything = _paths(cli(*args[:-1]).stdout.decode())  # the default lists the whole subtree, as before
    assert set(listed) <= set(everything) and (len(everything) > len(listed)) == (path not in (
        "usr/lib/python3/os.py", "usr/bin"))


def test_of_a_subtree(tree, cli):
    repo, snap, r = tree
    out = cli("ls", "-r", r, f"{snap.id}:usr/lib", "--no-recursive").stdout.decode()
    assert _paths(out) == [".", "libc.so", "python3"]
    out = cli("ls", "-r", r, f"{snap.id}:usr/lib", "python3", "--no-recursive").stdout.decode()
    assert _paths(out) == ["python3", "python3/os.py", "python3/site"]


def test_a_missing_path_is_a_usage_error(tree, cli):
    repo, snap, r = tree
    proc = cli("ls", "-r", r, snap.id, "usr/nothing", "--no-recursive", check=2)
    assert "no 'usr/nothing'" in proc.stderr.decode() and proc.stderr.decode().count("\n") == 1
    proc = cli("ls", "-r", r, snap.id, "usr/nothing", "--no-recursive", "--json", check=2)
    assert json.loads(proc.stdout)["error"]["message"] == f"no 'usr/nothing' in snapshot {snap.short_id}"


def test_api_refuses_a_recursive_that_is_not_a_bool(tree):
    repo, snap, _ = tree
    with pytest.raises(UsageError):
        list(repo.tree(snap, recursive="no"))
