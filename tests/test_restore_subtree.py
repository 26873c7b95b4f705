"""`restore SNAPSHOT:PATH`: a path of a snapshot restored as the target's root (and `ls`, `diff` of one)."""
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkvault.errors import UsageError
from chunkvault.store.manifest import OP_ENTRY, T_DIR, T_FILE, Entry, Record, sort_key


@pytest.fixture
def tree(tmp_path, new_repo):
    """etc/nginx with files, a subdirectory and a pair of hard links inside; a file (``a/data``) whose other
    links lie only in ``etc/nginx/links``, across the subtree's boundary."""
    src = tmp_path / "live"
    for d in ("a", "etc/nginx/sites", "etc/nginx/links", "etc/other"):
        (src / d).mkdir(parents=True)
    (src / "etc/nginx/nginx.conf").write_bytes(b"worker_processes 4;\n")
    (src / "etc/nginx/sites/default").write_bytes(b"server {}\n")
    (src / "etc/nginx/mime").write_bytes(b"types {}\n")
    os.link(src / "etc/nginx/mime", src / "etc/nginx/mime.link")
    (src / "a/data").write_bytes(b"shared data" * 1000)
    os.link(src / "a/data", src / "etc/nginx/links/one")
    os.link(src / "a/data", src / "etc/nginx/links/two")
    (src / "etc/other/x").write_bytes(b"x")
    os.chmod(src / "etc/nginx", 0o750)
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    return repo, snap, src


def listing(root):
    """Each path below ``root``: its content (files), or "dir"."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = fh.read()
    return out


def test_a_directory_s_contents_land_directly_in_the_target(tree, tmp_path):
    repo, snap, src = tree
    target = tmp_path / "t"
    repo.restore(snap, str(target), subtree="etc/nginx")
    assert listing(target) == {k: v for k, v in listing(src / "etc/nginx").items()}
    assert os.stat(target).st_mode & 0o777 == 0o750  # the directory's own metadata, on the target
    assert [e.path for e in repo.tree(snap, subtree="/etc/nginx/")][:3] == [b"", b"links", b"links/one"]


@pytest.mark.parametrize("processes", [1, 2])
def test_hard_links_inside_still_link_and_one_across_the_boundary_is_a_copy(tree, tmp_path, processes):
    repo, snap, src = tree
    target = tmp_path / "t"
    result = repo.restore(snap, str(target), subtree="etc/nginx", processes=processes, verify=True)
    assert not result.warnings and result.processes == processes
    inside = os.stat(target / "mime"), os.stat(target / "mime.link")
    assert inside[0].st_ino == inside[1].st_ino and inside[0].st_nlink == 2
    one, two = os.stat(target / "links/one"), os.stat(target / "links/two")
    assert one.st_ino == two.st_ino and one.st_nlink == 2  # the links within, to each other
    assert (target / "links/one").read_bytes() == b"shared data" * 1000  # the copy of a/data


def test_a_single_file_lands_under_its_name_and_a_missing_path_is_a_usage_error(tree, tmp_path):
    repo, snap, _ = tree
    repo.restore(snap, str(tmp_path / "t"), subtree="etc/nginx/links/two")  # a hard link to a file outside
    assert listing(tmp_path / "t") == {"two": b"shared data" * 1000}
    with pytest.raises(UsageError, match="no 'etc/nope' in snapshot"):
        repo.restore(snap, str(tmp_path / "t2"), subtree="etc/nope")
    assert not (tmp_path / "t2").exists()
    with pytest.raises(UsageError, match="single file"):
        repo.restore(snap, str(tmp_path / "t"), subtree="etc/nginx/mime", force=True, delete=True)
    with pytest.raises(UsageError, match="SNAPSHOT:PATH"):
        repo.restore("latest:etc", str(tmp_path / "t3"))
    with pytest.raises(UsageError, match="a path in a snapshot is a str or bytes"):
        repo.restore(snap, str(tmp_path / "t3"), subtree=5)
    assert not (tmp_path / "t3").exists()


def test_includes_and_excludes_are_relative_to_the_subtree(tree, tmp_path, monkeypatch):
    repo, snap, _ = tree
    from chunkvault.store.repository import Repo

    within = []
    real = Repo.tree_within
    monkeypatch.setattr(Repo, "tree_within", lambda self, s, d, *a: within.append(d) or real(self, s, d, *a))
    repo.restore(snap, str(tmp_path / "t"), subtree="etc/nginx", includes=["links/two", "sites"],
                 excludes=["default"])
    assert listing(tmp_path / "t") == {"links": "dir", "links/two": b"shared data" * 1000, "sites": "dir"}
    assert b"etc/nginx" in within  # only the subtree's part of the manifests was read
    repo.restore(snap, str(tmp_path / "t2"), subtree="etc", includes=["nginx/sites/*"])
    assert within[-1] == b"etc/nginx/sites"  # an include led by a directory narrows the read further
    assert listing(tmp_path / "t2") == {"nginx": "dir", "nginx/sites": "dir", "nginx/sites/default": b"server {}\n"}


def test_delta_delete_in_place_acts_on_the_target_as_the_subtree_s_root(tree, tmp_path, cli):
    repo, snap, src = tree
    target = src / "etc/nginx"  # the live directory, put back as the snapshot holds it
    (target / "nginx.conf").write_bytes(b"worker_processes 8;\n")
    (target / "new").write_bytes(b"not in the snapshot")
    os.remove(target / "sites/default")
    r = cli("restore", "-r", str(tmp_path / "repo"), f"{snap.id[:8]}:etc/nginx", "-t", str(target), "--delta",
            "--delete", "--confirm", "RESTORE", "--json")
    out = json.loads(r.stdout)
    assert out["subtree"] == "etc/nginx" and out["deleted"] == 1
    assert out["unchanged_files"] >= 2 and out["files"] >= 1
    assert not (target / "new").exists()
    assert (target / "nginx.conf").read_bytes() == b"worker_processes 4;\n"
    assert (target / "sites/default").read_bytes() == b"server {}\n"
    assert (src / "etc/other/x").exists() and (src / "a/data").exists()  # nothing above the target touched


def test_a_subtree_of_a_differential(tmp_path, new_repo):
    src = tmp_path / "live"
    (src / "d/e").mkdir(parents=True)
    (src / "d/e/f").write_bytes(b"one")
    (src / "d/g").write_bytes(b"g")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)], kind="full")
    (src / "d/e/f").write_bytes(b"two")
    (src / "d/e/h").write_bytes(b"new")
    os.remove(src / "d/g")
    diff = repo.backup([str(src)], kind="diff").snapshot
    assert diff.kind == "diff"
    repo.restore(diff, str(tmp_path / "t"), subtree="d")
    assert listing(tmp_path / "t") == {"e": "dir", "e/f": b"two", "e/h": b"new"}


def test_the_command_line(tree, tmp_path, cli):
    repo, snap, _ = tree
    r = str(tmp_path / "repo")
    out = cli("restore", "-r", r, "latest:etc/nginx/sites", "-t", str(tmp_path / "t")).stdout.decode()
    assert "restored etc/nginx/sites of snapshot" in out
    assert listing(tmp_path / "t") == {"default": b"server {}\n"}
    err = cli("restore", "-r", r, "latest:etc/nope", "-t", str(tmp_path / "t2"), check=2).stderr.decode()
    assert "no 'etc/nope' in snapshot" in err and "Traceback" not in err
    err = cli("restore", "-r", r, ":etc", "-t", str(tmp_path / "t2"), check=2).stderr.decode()
    assert "name the snapshot before the ':'" in err
    cli("restore", "-r", r, "latest:", "-t", str(tmp_path / "whole"))  # an empty PATH: the whole snapshot
    assert sorted(os.listdir(tmp_path / "whole")) == ["a", "etc"]
    listed = json.loads(cli("ls", "-r", r, "latest:etc/nginx", "links", "--json").stdout)
    assert [e["path"] for e in listed] == ["links", "links/one", "links/two"]
    assert listed[1]["type"] == "file"  # as the restore writes it: the copy of a file outside
    changes = cli("diff", "-r", r, "latest:etc/nginx", f"{snap.id}:etc/nginx").stdout.decode()
    assert changes.startswith("0 added, 0 removed, 0 modified")
    err = cli("verify-restore", "-r", r, "latest:etc", check=2).stderr.decode()
    assert "SNAPSHOT:PATH" in err and "Traceback" not in err


def test_dump_of_a_subtree_names_its_paths_relative_to_it(tree, tmp_path, cli):
    import io
    import tarfile

    repo, snap, _ = tree
    r = str(tmp_path / "repo")
    assert cli("dump", "-r", r, "latest:etc/nginx", "sites/default").stdout == b"server {}\n"
    names = tarfile.open(fileobj=io.BytesIO(cli("dump", "-r", r, "latest:etc/nginx", "/").stdout)).getnames()
    assert names[:3] == ["links", "links/one", "links/two"] and "sites/default" in names
    archive = tarfile.open(fileobj=io.BytesIO(cli("dump", "-r", r, "latest:etc/nginx", "links").stdout))
    assert archive.getnames() == ["links", "links/one", "links/two"]
    assert archive.extractfile("links/one").read() == b"shared data" * 1000  # the copy of a/data
    assert archive.getmember("links/two").islnk()
    assert cli("dump", "-r", r, "latest:etc/nginx/links/two", "two").stdout == b"shared data" * 1000
    single = tarfile.open(fileobj=io.BytesIO(cli("dump", "-r", r, "latest:etc/nginx/mime", "/").stdout))
    assert single.getnames() == ["mime"]
    err = cli("dump", "-r", r, "latest:etc/nginx/mime", "other", check=2).stderr.decode()
    assert "it is a single entry, named mime" in err
    err = cli("dump", "-r", r, "latest:etc/nginx/mime", check=2).stderr.decode()
    assert "dump latest etc/nginx/mime" in err and "Traceback" not in err
    out = io.BytesIO()
    repo.dump(snap, "nginx.conf", out, subtree="etc/nginx")
    assert out.getvalue() == b"worker_processes 4;\n"


def test_dump_refuses_a_path_that_leads_out_of_the_subtree_as_ls_does(tree, tmp_path, cli):
    """``..`` out of PATH names nothing there (a file or a directory, which gave an empty archive), and a
    path missing there is named relative to PATH, as ls names it."""
    import io

    repo, snap, _ = tree
    r = str(tmp_path / "repo")
    for args, named in [(("../other/x",), "../other/x"), (("../../a",), "../../a"), (("sites/../../other",),
                        "../other"), (("nope",), "nope"), (("sites/nope",), "sites/nope")]:
        ls = cli("ls", "-r", r, "latest:etc/nginx", *args, check=2)
        dump = cli("dump", "-r", r, "latest:etc/nginx", *args, check=2)
        assert dump.stdout == b"" and dump.stderr == ls.stderr
        assert f"no '{named}' in etc/nginx of snapshot {snap.short_id}" in dump.stderr.decode()
        with pytest.raises(UsageError, match="in etc/nginx of snapshot"):
            repo.dump(snap, args[0], io.BytesIO(), subtree="etc/nginx")
    assert cli("dump", "-r", r, "latest:etc/nginx", "sites/../nginx.conf").stdout == b"worker_processes 4;\n"


@pytest.mark.parametrize("processes", [1, 2])
def test_an_unmatched_include_of_a_subtree_is_told_relative_to_it_and_one_excluded_is_told_so(tree, tmp_path,
                                                                                              processes):
    repo, snap, _ = tree
    res = repo.restore(snap, str(tmp_path / "t"), subtree="etc/nginx", includes=["etc/nginx/nginx.conf"],
                       processes=processes)
    assert res.files == 0 and res.warnings == [
        "nothing matched the includes etc/nginx/nginx.conf: includes are paths as `ls SNAPSHOT:PATH` lists them, "
        "relative to PATH (etc/nginx)"]
    # the include was right: the excludes took what it matched, and the warning says that, not where paths lie
    res = repo.restore(snap, str(tmp_path / "t2"), subtree="etc/nginx", includes=["nginx.conf", "mime*"],
                       excludes=["*.conf", "mime*"], processes=processes)
    assert res.files == 0 and res.warnings == [
        "nothing restored: the excludes left out all that the includes nginx.conf, mime* matched"]
    res = repo.restore(snap, str(tmp_path / "t3"), includes=["etc/nginx/nginx.conf"], excludes=["*.conf"],
                       processes=processes)
    assert res.warnings == [
        "nothing restored: the excludes left out all that the includes etc/nginx/nginx.conf matched"]


def test_delete_with_a_single_file_is_refused_naming_the_option_the_caller_gave(tree, tmp_path, cli):
    repo, snap, _ = tree
    (tmp_path / "t").mkdir()
    err = cli("restore", "-r", str(tmp_path / "repo"), "latest:etc/nginx/mime", "-t", str(tmp_path / "t"),
              "--delete", "--delta", "--confirm", "RESTORE", check=2).stderr.decode()
    assert "(--delete) with a single file (etc/nginx/mime)" in err and "delete=True" not in err
    with pytest.raises(UsageError, match="^deleting what the snapshot lacks with a single file") as raised:
        repo.restore(snap, str(tmp_path / "t"), subtree="etc/nginx/mime", force=True, delete=True)
    assert "--" not in str(raised.value)
    assert os.listdir(tmp_path / "t") == []


paths = st.lists(st.text("ab/", min_size=1, max_size=6), max_size=12).map(
    lambda ps: sorted({p.strip("/") for p in ps if p.strip("/") and "//" not in p}, key=lambda p: sort_key(p.encode())))


@given(paths, st.sampled_from(["a", "a/b", "b", "ab"]))
def test_rerooting_strips_the_root_and_keeps_the_order(names, root):
    from chunkvault.store.subtree import Subtree

    records = [Record(OP_ENTRY, p.encode(), Entry(p.encode(), T_DIR)) for p in [""] + names]
    got = list(Subtree(root.encode(), True, lambda p: None).records(iter(records)))
    want = [b""] * (root in names) + [p.encode()[len(root) + 1:] for p in names if p.startswith(root + "/")]
    assert [r.path for r in got] == want == [r.entry.path for r in got]
    assert [sort_key(p) for p in want] == sorted(sort_key(p) for p in want)
    single = list(Subtree(root.encode(), False, lambda p: None).records(
        iter([Record(OP_ENTRY, root.encode(), Entry(root.encode(), T_FILE))])))
    assert [r.path for r in single] == [root.encode().rpartition(b"/")[2]]



def test_ls_of_a_subtree_names_the_snapshot_s_unreadable_list_relative_to_it():
    from chunkvault.cli import _under_subtree

    listed = {q for p in (b"d", b"d/f", b"d/e/g", b"dd/h", b"x") for q in _under_subtree(p, b"d")}
    assert listed == {b"", b"d", b"f", b"e/g"}  # the root as a directory's tree names it, and as a file's
