"""ls --no-recursive (Repository.tree(recursive=False)): a path and what lies directly in it."""
import json

import pytest

from chunkvault.errors import UsageError
from chunkvault.store.manifest import T_DIR


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


#: Small manifest blobs: a few thousand entries make a manifest of hundreds of them.
SMALL = {"min_size": 256, "avg_size": 1024, "max_size": 4096}


def _listing(entries, directory: bytes) -> list:
    return [e for e in entries if e.path == directory or (e.path and e.path.rpartition(b"/")[0] == directory)]


def test_it_lists_what_the_whole_tree_holds_there_through_a_chain(tmp_path, new_repo):
    """The shallow walk merges only each manifest's records of the directory, of what is directly in it and of
    the directories above it: through differentials that delete a directory, turn one into a file, and change
    subtrees, every directory lists what the resolved tree holds directly in it, entry for entry."""
    import shutil

    src = tmp_path / "src"
    for a in range(6):
        for b in range(5):
            d = src / f"d{a}" / f"s{b}"
            d.mkdir(parents=True)
            for c in range(40):
                (d / f"f{c}").write_text(f"{a} {b} {c}")
        (src / f"d{a}.txt").write_text("beside")
    repo = new_repo(str(tmp_path / "repo"), chunker=SMALL)
    repo.backup([str(src)], kind="full")
    shutil.rmtree(src / "d1")
    shutil.rmtree(src / "d2")
    (src / "d2").write_text("a file where a directory was")
    (src / "d3" / "s9").mkdir()
    (src / "d3" / "s9" / "new").write_text("new")
    repo.backup([str(src)], kind="diff")
    shutil.rmtree(src / "d4" / "s0")
    (src / "d5" / "s1" / "f3").unlink()
    (src / "d1").mkdir()
    (src / "d1" / "back").write_text("back")
    snap = repo.backup([str(src)], kind="diff").snapshot
    chain = repo.store.chain_of(snap)
    assert len(chain) == 3 and len(chain[0].manifest) > 20
    whole = list(repo.tree(snap))
    dirs = sorted({e.path for e in whole if e.type == T_DIR} | {b"d2", b"d3/s9/new", b"nothing", b"d4/s0"})
    for directory in dirs:
        shallow = list(repo.tree(snap, directory or None, recursive=False))
        assert shallow == _listing(whole, directory), directory
    assert [e.path for e in repo.tree(snap, recursive=False)] == [
        b"", b"d0", b"d0.txt", b"d1", b"d1.txt", b"d2", b"d2.txt", b"d3", b"d3.txt", b"d4", b"d4.txt", b"d5",
        b"d5.txt"]


def test_a_listing_of_the_root_reads_the_manifest_where_its_entries_lie(tmp_path, new_repo):
    """``ls --no-recursive`` of the root read and resolved the whole tree (2 s for one of 302,000 files) to list
    a dozen entries: it seeks past each subtree, reading the manifest blobs around each entry listed and a few
    probes to find the next."""
    src = tmp_path / "src"
    for a in range(3):
        for b in range(10):
            d = src / f"d{a}" / f"s{b}"
            d.mkdir(parents=True)
            for c in range(60):
                (d / f"f{c}").write_text("x")
    (src / "top").write_text("top")
    repo = new_repo(str(tmp_path / "repo"), chunker=SMALL)
    snap = repo.backup([str(src)]).snapshot
    store = repo.store
    manifest = set(snap.manifest)
    reads = []
    real = store.read_blob

    def read_blob(blob_id, **kwargs):
        if blob_id.hex() in manifest:
            reads.append(blob_id)
        return real(blob_id, **kwargs)

    store.read_blob = read_blob
    assert [e.path for e in repo.tree(snap, recursive=False)] == [b"", b"d0", b"d1", b"d2", b"top"]
    assert len(manifest) > 150 and len(reads) < len(manifest) / 3, (len(reads), len(manifest))
    reads.clear()
    assert len(list(repo.tree(snap, "d1"))) == 611
    whole = len(reads)
    reads.clear()
    assert [e.path for e in repo.tree(snap, "d1", recursive=False)][:3] == [b"d1", b"d1/s0", b"d1/s1"]
    assert len(reads) <= whole, (len(reads), whole)  # what it probes past each subtree, at most
