"""backup --list: which entries a backup (or a dry run) stored as added or modified, which of the parent's
it found gone, which it found unchanged (--list-all), and which an exclusion rule left out (dry runs)."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

import chunkvault.cli as cvcli
from chunkvault import Repository
from chunkvault.errors import StorageFull, UsageError
from chunkvault.store import backup as backup_module
from chunkvault.store import source
from chunkvault.store.manifest import T_DIR, what_changed

from conftest import PASSWORD
from treeutil import mounted_tmpfs, settle

SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def changes(listed: list) -> list[tuple[str, bytes]]:
    return [(item.change, item.path) for item in listed]


@pytest.fixture
def repo_url(tmp_path) -> str:
    url = str(tmp_path / "repo")
    Repository.init(url, PASSWORD, kdf_seconds=0, ledger=False).close()
    return url


def run(monkeypatch, *argv: str, code: int = 0) -> str:
    """``chunkvault ARGV`` in this process: its standard output."""
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert cvcli.main(list(argv)) == code
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["diff", "full"])
def test_the_listing_is_what_diff_then_finds_between_the_parent_and_the_snapshot(tmp_path, repo_url, kind):
    src = tmp_path / "src"
    write(src, {"keep/a": b"a", "keep/b": b"b", "edit": b"old", "meta": b"m", "gone": b"g", "gonedir/x": b"x",
                "gonedir/sub/y": b"y", "typed": b"a file, then a directory", "flat/z": b"a directory, then a file"})
    with Repository.open(repo_url, PASSWORD, ledger=False) as repo:
        first_listed: list = []
        first = repo.backup([str(src)], listing=first_listed.append).snapshot
        assert changes(first_listed) == [("added", e.path) for e in repo.tree(first)]
        (src / "edit").write_bytes(b"new content")
        os.chmod(src / "meta", 0o600)
        (src / "gone").unlink()
        for p in ("gonedir/sub/y", "gonedir/x", "flat/z"):
            (src / p).unlink()
        for p in ("gonedir/sub", "gonedir", "flat"):
            (src / p).rmdir()
        (src / "flat").write_bytes(b"now a file")
        (src / "typed").unlink()
        write(src, {"typed/in": b"i", "new/deep/n": b"n"})
        listed: list = []
        second = repo.backup([str(src)], kind=kind, listing=listed.append).snapshot
        assert second.kind == kind
        with repo.reading("diff"):
            expected = list(repo.diff(first, second))
    assert changes(listed) == [(c, (new or old).path) for c, old, new in expected]
    assert {(b"edit", "content"), (b"meta", "metadata"), (b"typed", "type"), (b"flat", "type")} <= {
        (item.path, item.what) for item in listed if item.change == "modified"}
    for item, (_, old, new) in zip(listed, expected):
        assert item.entry == (new or old) and item.what == what_changed(old, new)
    # The counts take in every entry but a directory: a directory become a file is new, a file become one gone.
    was, now = {}, {}
    for _, old, new in expected:
        was[(old or new).path], now[(old or new).path] = old and old.type != T_DIR, new and new.type != T_DIR
    stats = second.stats
    assert stats["new_files"] == sum(1 for p in now if now[p] and not was[p]) == 3
    assert stats["changed_files"] == sum(1 for p in now if now[p] and was[p]) == 2
    assert stats["deleted"] == sum(1 for p in now if was[p] and not now[p]) == 5


@pytest.mark.parametrize("kind", ["diff", "full"])
def test_list_unchanged_names_every_entry_once_in_order_also_those_taken_in_runs(tmp_path, repo_url, kind,
                                                                                monkeypatch):
    src = tmp_path / "src"
    write(src, {f"d{i % 7}/f{i:03}": b"%d" % i for i in range(300)})
    settle()  # for the next backup to take them unread, in runs matched by the C walk
    runs = []
    real_skip = source.SourceWalk.skip_unchanged

    def skip(self, *args, **kwargs):
        got = real_skip(self, *args, **kwargs)
        runs.append(got[0])
        return got

    monkeypatch.setattr(source.SourceWalk, "skip_unchanged", skip)
    with Repository.open(repo_url, PASSWORD, ledger=False) as repo:
        repo.backup([str(src)])
        (src / "d3" / "f150").write_bytes(b"changed")
        runs.clear()
        listed: list = []
        snap = repo.backup([str(src)], kind=kind, listing=listed.append, list_unchanged=True).snapshot
        tree = [e.path for e in repo.tree(snap)]
    assert sum(runs) > 100, "the unchanged files were not taken in runs"
    assert [item.path for item in listed] == tree
    assert [item for item in listed if item.change != "unchanged"] == [
        backup_module.Listed("modified", b"d3/f150", listed[tree.index(b"d3/f150")].entry, "content")]
    assert all(item.entry is not None and item.entry.path == item.path for item in listed)


def test_a_dry_run_lists_what_each_rule_leaves_out_and_the_backup_then_lists_the_rest(tmp_path, repo_url,
                                                                                      monkeypatch):
    src = tmp_path / "src"
    write(src, {"a.tmp": b"t", "keep/b": b"b", "keep/c.tmp": b"t", "keep/log1": b"l", "big": b"x" * 5000,
                "cache/CACHEDIR.TAG": SIGNATURE, "cache/sub/x": b"x", "cache/y": b"y",
                "marked/.nobackup": b"", "marked/deep/z": b"z", "scratch/s": b"s"})
    rules = ["--exclude", "*.tmp", "--exclude", "keep/log?", "--exclude", "scratch", "--exclude-larger-than", "1K",
             "--exclude-caches", "--exclude-if-present", ".nobackup"]
    dry = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "--dry-run", "-q", *rules)
    assert dry.splitlines() == [
        "A .", "x a.tmp", "x big", "A cache", "A cache/CACHEDIR.TAG", "x cache/sub", "x cache/y", "A keep",
        "A keep/b", "x keep/c.tmp", "x keep/log1", "A marked", "A marked/.nobackup", "x marked/deep", "x scratch"]
    real = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-q", *rules)
    assert real.splitlines() == [line for line in dry.splitlines() if not line.startswith("x ")]
    # With the rules again, what they leave out is all there is to list; without them, it is added back.
    again = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "-q", *rules).splitlines()
    assert again == [line for line in dry.splitlines() if line.startswith("x ")]
    without = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "-q").splitlines()
    assert {"A cache/sub/x", "A big", "A keep/log1", "A scratch/s", "A marked/deep/z"} <= set(without)


def test_a_dry_run_lists_a_path_newly_excluded_as_left_out_and_removed(tmp_path, repo_url, monkeypatch):
    src = tmp_path / "src"
    write(src, {"logs/1": b"1", "logs/2": b"2", "z": b"z"})
    run(monkeypatch, "backup", "-r", repo_url, str(src), "-q")
    out = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "--exclude", "logs")
    assert out.splitlines()[:4] == ["x logs", "D logs", "D logs/1", "D logs/2"]
    assert "  files: 0 new, 0 changed, 1 unchanged, 2 removed;" in out


def test_a_dry_run_lists_a_mount_point_left_empty_by_one_file_system(tmp_path, repo_url, monkeypatch):
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "own").write_bytes(b"own")
    with mounted_tmpfs(str(src / "mnt")):
        (src / "mnt" / "f").write_bytes(b"on another file system")
        out = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "-q", "-x")
        whole = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "-q")
    assert out.splitlines() == ["A .", "A mnt", "x mnt", "A own"]
    assert whole.splitlines() == ["A .", "A mnt", "A mnt/f", "A own"]


def test_names_that_would_forge_a_line_are_escaped_and_json_gives_them_exactly(tmp_path, repo_url, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    names = [b"new\nD forged", b"esc\x1b[2J", b"latin\xe9", b"back\\slash"]
    for name in names:
        (src / os.fsdecode(name)).write_bytes(b"x")
    text = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "-q")
    assert text.splitlines() == ["A .", "A back\\\\slash", "A esc\\x1b[2J", "A latin\\xe9", "A new\\nD forged"]
    doc = json.loads(run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "-n", "--json"))
    assert [os.fsencode(item["path"]) for item in doc["list"]] == [b""] + sorted(names)
    latin = next(item for item in doc["list"] if item["path"].startswith("latin"))
    assert latin["path_b64"] == "bGF0aW7p" and all("path_b64" not in item for item in doc["list"] if item is not latin)


def test_json_gives_the_list_first_one_entry_a_line_then_the_backup_document(tmp_path, repo_url, monkeypatch):
    src = tmp_path / "src"
    write(src, {"a": b"a", "b.tmp": b"b", "d/c": b"c"})
    run(monkeypatch, "backup", "-r", repo_url, str(src), "-q")
    (src / "a").write_bytes(b"changed")
    (src / "d" / "c").unlink()
    out = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list-all", "-n", "--json", "--exclude", "*.tmp")
    doc = json.loads(out)
    plain = json.loads(run(monkeypatch, "backup", "-r", repo_url, str(src), "-n", "--json", "--exclude", "*.tmp"))
    assert set(doc) - {"list"} == set(plain) and doc["stats"]["changed_files"] == 1
    lines = out.splitlines()
    assert lines[0] == '{"list": [' and lines[len(doc["list"]) + 1] == "],"
    items = [json.loads(line.rstrip(",")) for line in lines[1:len(doc["list"]) + 1]]
    assert items == doc["list"] == [
        {"change": "unchanged", "path": "", "type": "dir", "what": None, "rule": None},
        {"change": "modified", "path": "a", "type": "file", "what": "content", "rule": None},
        {"change": "excluded", "path": "b.tmp", "type": None, "what": None, "rule": "exclude"},
        {"change": "removed", "path": "b.tmp", "type": "file", "what": None, "rule": None},
        {"change": "modified", "path": "d", "type": "dir", "what": "metadata", "rule": None},
        {"change": "removed", "path": "d/c", "type": "file", "what": None, "rule": None}]
    # nothing to list: the list is empty, and the document whole
    settle()
    run(monkeypatch, "backup", "-r", repo_url, str(src), "-q")
    doc = json.loads(run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "--json", "--skip-if-unchanged"))
    assert doc["list"] == [] and doc["skipped"] is True


def test_a_failure_after_the_list_began_ends_the_json_document_with_its_error(tmp_path, repo_url, monkeypatch):
    src = tmp_path / "src"
    write(src, {"a": b"a", "b": b"b"})

    def full(*args, **kwargs):
        raise StorageFull("the disk is full")

    monkeypatch.setattr(backup_module.ManifestWriter, "finish", full)
    out = run(monkeypatch, "backup", "-r", repo_url, str(src), "--list", "--json", code=StorageFull.exit_code)
    doc = json.loads(out)
    assert [item["path"] for item in doc["list"]] == ["", "a", "b"]
    assert doc["error"]["type"] == "StorageFull" and doc["error"]["exit_code"] == StorageFull.exit_code
    assert set(doc) == {"list", "error"}
    with Repository.open(repo_url, PASSWORD, ledger=False) as repo:
        assert repo.snapshots() == []


@pytest.mark.parametrize("args, fragment", [
    (["--stdin", "--stdin-name", "x", "--list"], "--list lists the entries of a backup of paths; --stdin stores"),
    (["--stdin-from-command", "--stdin-name", "x", "--list-all", "--", "true"], "--stdin-from-command stores one"),
])
def test_list_of_a_stream_is_a_usage_error(repo_url, args, fragment, cli):
    proc = cli("backup", "-r", repo_url, *args, check=2)
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_the_api_refuses_what_it_cannot_list_to(tmp_path, repo_url):
    (tmp_path / "f").write_bytes(b"f")
    with Repository.open(repo_url, PASSWORD, ledger=False) as repo:
        with pytest.raises(UsageError, match="listing is a function"):
            repo.backup([str(tmp_path)], listing=["not", "callable"])
        with pytest.raises(UsageError, match="give listing= too"):
            repo.backup([str(tmp_path)], list_unchanged=True)
        walk = source.SourceWalk.of_paths([str(tmp_path)])  # made without report_excluded
        with pytest.raises(UsageError, match="other paths or exclusion rules"):
            repo.backup([str(tmp_path)], walk=walk, dry_run=True, listing=print)
        assert repo.snapshots() == []


def test_a_listing_that_raises_stops_the_backup_with_no_snapshot_saved(tmp_path, repo_url):
    write(tmp_path, {"a": b"a", "b": b"b"})

    def refuse(listed):
        if listed.path.endswith(b"/b"):
            raise RuntimeError("the reader went away")

    with Repository.open(repo_url, PASSWORD, ledger=False) as repo:
        with pytest.raises(RuntimeError, match="the reader went away"):
            repo.backup([str(tmp_path / "a"), str(tmp_path / "b")], listing=refuse)
        assert repo.snapshots() == []
        assert repo.backup([str(tmp_path / "a")], listing=refuse).snapshot.stats["new_files"] == 1


def test_a_directory_that_cannot_be_listed_lists_what_it_keeps_and_what_it_cannot(tmp_path, repo_url, monkeypatch):
    """It keeps the parent's entries below it (unchanged), but for a hard link to a path outside it (removed)."""
    src = tmp_path / "src"
    write(src, {"a": b"linked", "sub/x": b"x"})
    os.link(src / "a", src / "sub" / "h")
    settle()
    with Repository.open(repo_url, PASSWORD, ledger=False) as repo:
        repo.backup([str(src)])
        monkeypatch.setattr(source, "Walker", None)
        real = source.scan_dir

        def scan(path, seen=None):
            if os.path.basename(path) == b"sub":
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return real(path, seen)

        monkeypatch.setattr(source, "scan_dir", scan)
        listed: list = []
        result = repo.backup([str(src)], listing=listed.append, list_unchanged=True)
    assert result.snapshot.stats["unreadable"] == ["sub/h", "sub"]
    assert changes(listed) == [("unchanged", b""), ("unchanged", b"a"), ("modified", b"sub"), ("removed", b"sub/h"),
                               ("unchanged", b"sub/x")]
