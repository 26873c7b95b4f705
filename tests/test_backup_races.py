"""A source tree that changes under a running backup: each race is one warning, never a failed backup,
and never loses what did not change.  Races are made deterministic by running the change at the moment it
must happen (between the walk's lstat and the backup's next call on the path), on real files."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from chunkvault import Repository
from chunkvault.store import backup, source
from chunkvault.store.manifest import F_CHANGED_DURING_READ, F_UNREADABLE, T_DIR, T_FILE, T_HARDLINK, sort_key
from chunkvault.store.source import StatFailed, SourceWalk
from conftest import PASSWORD
from test_damaged_storage import damage_blob, pack_path
from treeutil import refusing_open


def tree_of(repo, snap) -> dict[bytes, object]:
    return {e.path: e for e in repo.tree(snap)}


def assert_links_name_earlier_files(repo, snap) -> None:
    """Manifest order as the format has it: a hard link names a file entry recorded before it."""
    seen: dict[bytes, int] = {}
    for e in repo.tree(snap):
        if e.type == T_HARDLINK:
            assert seen.get(e.target) == T_FILE, (e.path, e.target)
        seen[e.path] = e.type
    keys = [sort_key(p) for p in seen]
    assert keys == sorted(keys)


def before_call(monkeypatch, module, name: str, victim: str, change) -> list[str]:
    """Run ``change(path)`` once, right before ``module.name`` is first called on a path named ``victim``."""
    real = getattr(module, name)
    fired: list[str] = []

    def hooked(path, *args, **kwargs):
        if not fired and os.path.basename(os.fsdecode(path)) == victim:
            fired.append(os.fsdecode(path))
            change(os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, hooked)
    return fired


# --- symbolic links replaced between the walk's lstat and readlink ----------------------------------------

def to_file(path: str) -> None:
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(b"a file now")


def to_dir(path: str) -> None:
    os.unlink(path)
    os.mkdir(path)
    with open(os.path.join(path, "inside"), "wb") as f:
        f.write(b"inside")


def test_a_symlink_replaced_before_readlink_is_recorded_as_what_it_is_now(tmp_path, new_repo, monkeypatch):
    """Replaced by a file: the file; by a directory (not walked): left out until the next backup; removed:
    vanished.  Each a warning; the snapshot is saved and complete otherwise."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    for name in ("tofile", "todir", "gone", "kept"):
        os.symlink("a", src / name)
    repo = new_repo()
    changes = {"tofile": to_file, "todir": to_dir, "gone": os.unlink}
    real = os.readlink

    def racing_readlink(path, *args, **kwargs):
        change = changes.pop(os.path.basename(os.fsdecode(path)), None)
        if change is not None:
            change(os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(backup.os, "readlink", racing_readlink)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert not changes and not result.partial
    tree = tree_of(repo, result.snapshot)
    assert tree[b"tofile"].type == T_FILE and b"todir" not in tree and b"gone" not in tree
    assert tree[b"kept"].target == b"a"
    with repo.open_file(result.snapshot, "tofile") as f:
        assert f.read() == b"a file now"
    assert sum("changed type during backup" in w for w in result.warnings) == 2
    assert any(w.startswith("vanished during backup") and w.endswith("/gone") for w in result.warnings)
    after = repo.backup([str(src)])  # the directory is recorded once it is walked
    assert tree_of(repo, after.snapshot)[b"todir/inside"].type == T_FILE


def test_a_symlink_retargeted_in_a_differential_and_replaced_by_a_file_meanwhile(tmp_path, new_repo, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("old", src / "link")
    repo = new_repo()
    repo.backup([str(src)])
    os.unlink(src / "link")
    os.symlink("new", src / "link")
    before_call(monkeypatch, backup.os, "readlink", "link", to_file)
    diff = repo.backup([str(src)], kind="diff")
    monkeypatch.undo()
    assert diff.snapshot.kind == "diff"
    out = tmp_path / "out"
    repo.restore(diff.snapshot, str(out))
    assert (out / "link").read_bytes() == b"a file now" and not (out / "link").is_symlink()


def _readlink_of_link_fails(monkeypatch, code: int) -> None:
    """The backup's readlink of any path named ``link`` fails with ``code``."""
    real = os.readlink

    def failing_readlink(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == "link":
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(backup.os, "readlink", failing_readlink)


def test_a_symlink_that_cannot_be_read_keeps_the_parents_entry_and_is_listed_unreadable(
        tmp_path, new_repo, monkeypatch):
    """Any other error of readlink is a warning for that path, not an internal error ending the backup."""
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("target-1", src / "link")
    (src / "f").write_bytes(b"f")
    repo = new_repo()
    repo.backup([str(src)])
    os.unlink(src / "link")
    os.symlink("target-2", src / "link")
    _readlink_of_link_fails(monkeypatch, errno.EIO)
    diff = repo.backup([str(src)], kind="diff")
    monkeypatch.undo()
    assert diff.partial and diff.snapshot.stats["unreadable"] == ["link"]
    assert any(w.startswith("cannot read") and "Input/output error" in w for w in diff.warnings)
    assert tree_of(repo, diff.snapshot)[b"link"].target == b"target-1"


def test_a_path_that_cannot_be_read_for_want_of_memory_names_the_limit(tmp_path, new_repo, monkeypatch):
    """ENOMEM is the process's memory limit, not the file: the warning said 'Cannot allocate memory' alone."""
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("target", src / "link")
    _readlink_of_link_fails(monkeypatch, errno.ENOMEM)
    result = new_repo().backup([str(src)])
    monkeypatch.undo()
    assert result.partial
    assert any(w.startswith("cannot read") and "ulimit -v" in w for w in result.warnings), result.warnings


# --- hard links whose first path changes before it is read ---------------------------------------------

def unlink(path: str) -> None:
    os.unlink(path)


def to_symlink(path: str) -> None:
    os.unlink(path)
    os.symlink("elsewhere", path)


def to_other_file(path: str) -> None:
    with open(path + ".new", "wb") as f:
        f.write(b"another file")
    os.rename(path + ".new", path)


def race_reading(monkeypatch, victim: str, change) -> list[str]:
    """``change`` the file named ``victim`` right before the backup opens it (whichever way it reads it)."""
    fired = before_call(monkeypatch, backup, "open_source_file", victim, change)
    real = backup.read_small_files

    def hooked(paths, *args):
        for path in paths:
            if not fired and os.path.basename(os.fsdecode(path)) == victim:
                fired.append(os.fsdecode(path))
                change(os.fsdecode(path))
        return real(paths, *args)

    monkeypatch.setattr(backup, "read_small_files", hooked)
    return fired


def linked_tree(src, size: int) -> bytes:
    """a/victim with two more links, b/other and c/third; its data."""
    data = os.urandom(size)
    for d in "abc":
        (src / d).mkdir(parents=True)
    (src / "a" / "victim").write_bytes(data)
    os.link(src / "a" / "victim", src / "b" / "other")
    os.link(src / "a" / "victim", src / "c" / "third")
    return data


def assert_restored_links(repo, snap, out, data: bytes) -> None:
    repo.restore(snap, str(out))
    assert (out / "b" / "other").read_bytes() == data and (out / "c" / "third").read_bytes() == data
    assert os.stat(out / "b" / "other").st_ino == os.stat(out / "c" / "third").st_ino


@pytest.mark.parametrize("size", [5000, 300_000])
@pytest.mark.parametrize("change", [unlink, to_dir, to_symlink, to_other_file])
def test_hard_links_keep_their_data_when_the_first_link_changes_before_it_is_read(
        tmp_path, new_repo, monkeypatch, change, size):
    """The next link holds the file's data, the one after names it; a/victim is what it became."""
    src = tmp_path / "src"
    data = linked_tree(src, size)
    repo = new_repo()
    fired = race_reading(monkeypatch, "victim", change)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert fired
    tree = tree_of(repo, result.snapshot)
    assert tree[b"b/other"].type == T_FILE and tree[b"b/other"].size == size
    assert tree[b"c/third"].type == T_HARDLINK and tree[b"c/third"].target == b"b/other"
    assert_links_name_earlier_files(repo, result.snapshot)
    if change is unlink:
        assert b"a/victim" not in tree and not result.partial
    elif change is to_other_file:  # saved by a rename before it was opened: recorded as the file it is now
        assert tree[b"a/victim"].type == T_FILE and tree[b"a/victim"].flags & F_CHANGED_DURING_READ
        assert tree[b"a/victim"].ino == os.stat(src / "a" / "victim").st_ino
        assert any(w.startswith("replaced during backup (stored as it is now)") for w in result.warnings)
    else:  # a directory or a symlink in its place: left out until the next backup, as if it had vanished
        assert b"a/victim" not in tree and not result.partial
        assert any(w.startswith("changed type during backup") for w in result.warnings)
    out = tmp_path / "out"
    assert_restored_links(repo, result.snapshot, out, data)
    if change is to_other_file:
        assert (out / "a" / "victim").read_bytes() == b"another file"


def test_hard_links_keep_their_data_when_the_first_link_cannot_be_read(tmp_path, new_repo, monkeypatch,
                                                                     python_file_reads):
    src = tmp_path / "src"
    data = linked_tree(src, 5000)
    real_open = os.open

    def failing_open(path, flags, *args):
        if os.path.basename(os.fsdecode(path)) == "victim":  # root reads every file: the error is simulated
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    repo = new_repo()
    monkeypatch.setattr(backup.os, "open", failing_open)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert result.snapshot.stats["unreadable"] == ["a/victim"]
    tree = tree_of(repo, result.snapshot)
    assert tree[b"a/victim"].flags & F_UNREADABLE and tree[b"b/other"].type == T_FILE
    assert tree[b"c/third"].target == b"b/other"
    assert_restored_links(repo, result.snapshot, tmp_path / "out", data)


def test_the_last_link_holds_the_data_when_the_two_before_it_vanish(tmp_path, new_repo, monkeypatch):
    src = tmp_path / "src"
    data = linked_tree(src, 5000)
    repo = new_repo()

    def both_gone(path: str) -> None:
        os.unlink(path)
        os.unlink(src / "b" / "other")

    race_reading(monkeypatch, "victim", both_gone)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    tree = tree_of(repo, result.snapshot)
    assert b"a/victim" not in tree and b"b/other" not in tree
    assert tree[b"c/third"].type == T_FILE
    with repo.open_file(result.snapshot, "c/third") as f:
        assert f.read() == data
    assert sum(w.startswith("vanished during backup") for w in result.warnings) == 2


def test_a_differential_moves_the_data_to_the_next_link(tmp_path, new_repo, monkeypatch):
    """The parent recorded b/other and c/third as links to a/victim; the file changed, and a/victim
    vanishes before it is read: the differential records b/other as the file and c/third as its link."""
    src = tmp_path / "src"
    linked_tree(src, 5000)
    repo = new_repo()
    full = tree_of(repo, repo.backup([str(src)]).snapshot)  # no race: the links name the path walked first
    assert full[b"b/other"].target == full[b"c/third"].target == b"a/victim"
    data = os.urandom(7000)
    (src / "a" / "victim").write_bytes(data)
    race_reading(monkeypatch, "victim", unlink)
    diff = repo.backup([str(src)], kind="diff")
    monkeypatch.undo()
    assert diff.snapshot.kind == "diff"
    tree = tree_of(repo, diff.snapshot)
    assert b"a/victim" not in tree and tree[b"b/other"].type == T_FILE
    assert_links_name_earlier_files(repo, diff.snapshot)
    assert_restored_links(repo, diff.snapshot, tmp_path / "out", data)


# --- paths whose lstat fails ------------------------------------------------------------------------------

class walk_kind:
    """Within it, walks take the per-directory path (``c`` the C walker, ``dirs`` a C scan per directory,
    ``python`` the Python reference of that scan)."""

    def __init__(self, monkeypatch, kind: str):
        if kind != "c":
            monkeypatch.setattr(source, "Walker", None)
        if kind == "python":
            monkeypatch.setattr(source, "scan_dir", source.scan_dir_reference)


def failing_lstat(monkeypatch, name: str) -> None:
    """lstat of a path named ``name`` fails as in a directory that may be listed but not searched."""
    real = os.lstat

    def lstat(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == name:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(source.os, "lstat", lstat)


def test_an_entry_whose_lstat_fails_is_yielded_not_left_out(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    walk_kind(monkeypatch, "python")
    failing_lstat(monkeypatch, "a")
    walk = SourceWalk.of_paths([str(tmp_path)])
    items = [(rel, type(st), ok) for rel, _, st, ok in walk]
    assert items[1] == (b"a", StatFailed, False) and items[2][0] == b"b" and items[2][2]
    assert walk.warnings == [f"cannot stat {tmp_path}/a: Permission denied"]


def test_an_entry_whose_lstat_fails_is_unreadable_and_a_differential_keeps_it(tmp_path, new_repo, monkeypatch):
    """Listed unreadable (the backup is partial: exit 3); the parent's entry stays, data and all, and a
    directory's is flagged, as one that could not be listed."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x").write_bytes(b"x")
    (src / "file").write_bytes(b"old data")
    (src / "new").write_bytes(b"new")
    repo = new_repo()
    repo.backup([str(src)])
    (src / "file").write_bytes(b"new data")
    (src / "other").write_bytes(b"other")
    walk_kind(monkeypatch, "python")
    failing = {"file", "sub", "other"}
    real = os.lstat

    def lstat(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) in failing:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(source.os, "lstat", lstat)
    diff = repo.backup([str(src)], kind="diff")
    monkeypatch.undo()
    assert diff.partial and diff.snapshot.stats["unreadable"] == ["file", "other", "sub"]
    tree = tree_of(repo, diff.snapshot)
    assert b"other" not in tree and tree[b"new"].type == T_FILE
    assert tree[b"sub"].type == T_DIR and tree[b"sub"].flags & F_UNREADABLE and tree[b"sub/x"].type == T_FILE
    with repo.open_file(diff.snapshot, "file") as f:
        assert f.read() == b"old data"
    full = repo.backup([str(src)], kind="full")  # once it can be read again
    with repo.open_file(full.snapshot, "file") as f:
        assert f.read() == b"new data"


def unlistable(monkeypatch, name: bytes) -> None:
    """The directory ``name`` cannot be listed (the per-directory walk's scan fails on it)."""
    walk_kind(monkeypatch, "python")
    real = source.scan_dir

    def scan(path, seen=None):
        if os.path.basename(path) == name:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, seen)

    monkeypatch.setattr(source, "scan_dir", scan)


@pytest.mark.parametrize("kind", ["diff", "full"])
def test_a_directory_that_cannot_be_listed_keeps_what_the_parent_has_below_it(tmp_path, new_repo, monkeypatch, kind):
    """As an unreadable file keeps its parent entry: its contents are not recorded deleted, except a file
    whose data the index no longer has (nothing could restore it)."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "x").write_bytes(b"x" * 5000)
    (src / "sub" / "deeper" / "y").write_bytes(b"y" * 5000)
    (src / "sub" / "lost").write_bytes(os.urandom(5000))
    (src / "after").write_bytes(b"after")
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    lost = tree_of(repo, first)[b"sub/lost"].chunk_ids()[0]
    damage_blob(tmp_path / "repo0", repo, lost)  # and a repair drops it
    repo.repair_packs([pack_path(tmp_path / "repo0", repo, lost).name], dry_run=False)
    (src / "after").write_bytes(b"changed")
    unlistable(monkeypatch, b"sub")
    result = repo.backup([str(src)], kind=kind)
    monkeypatch.undo()
    assert result.partial and result.snapshot.stats["unreadable"] == ["sub"]
    assert "kept the 3 entries the parent snapshot has below sub" in result.warnings
    tree = tree_of(repo, result.snapshot)
    assert tree[b"sub"].flags & F_UNREADABLE and b"sub/lost" not in tree
    assert {p for p in tree if p.startswith(b"sub/")} == {b"sub/x", b"sub/deeper", b"sub/deeper/y"}
    with repo.open_file(result.snapshot, "sub/deeper/y") as f:
        assert f.read() == b"y" * 5000
    with repo.open_file(result.snapshot, "after") as f:
        assert f.read() == b"changed"
    assert result.snapshot.stats["files"] == 3 and result.snapshot.stats["dirs"] == 3
    # x and y kept, after changed, lost gone: the counts add up to the files
    st = result.snapshot.stats
    assert (st["new_files"], st["changed_files"], st["unchanged_files"], st["deleted"]) == (0, 1, 2, 1)


class _ListingFails:
    """The C walker, but the directory ``sub`` fails to be listed with ``err`` (as it does when it goes or
    becomes a file between the walker's lstat and its listing): its subtree is not given."""

    real = source.Walker
    err = 0

    def __init__(self, *args):
        self.inner = self.real(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batch(self, *args):
        while batch := self.inner.batch(*args):
            kept = [(rel, path, st, err, self.err if rel == b"sub" else list_err)
                    for rel, path, st, err, list_err in batch if not rel.startswith(b"sub/")]
            if kept:
                return kept
        return batch


@pytest.mark.parametrize("walk", ["c", "python"])
@pytest.mark.parametrize("becomes", ["nothing", "a file"])
def test_a_directory_gone_or_replaced_before_it_is_listed_is_left_out(tmp_path, new_repo, monkeypatch, walk, becomes):
    """Not kept as unreadable with what the parent had below it: it vanished, as a vanished file does."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "x").write_bytes(b"x")
    (src / "z").write_bytes(b"z")
    repo = new_repo()
    repo.backup([str(src)])

    def change(path: str) -> None:
        shutil.rmtree(path)
        if becomes == "a file":
            with open(path, "wb") as f:
                f.write(b"now a file")

    if walk == "python":
        walk_kind(monkeypatch, "python")
        before_call(monkeypatch, source, "scan_dir", "sub", change)
    else:
        (src / "sub" / "x").unlink()  # the walker's lstat sees a directory; its listing fails as the race would have it
        monkeypatch.setattr(_ListingFails, "err", errno.ENOENT if becomes == "nothing" else errno.ENOTDIR)
        monkeypatch.setattr(source, "Walker", _ListingFails)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert not result.partial
    warned = "vanished during backup" if becomes == "nothing" else "changed type during backup"
    assert any(warned in w and w.endswith("sub") for w in result.warnings), result.warnings
    assert set(tree_of(repo, result.snapshot)) == {b"", b"z"}


SETPRIV = shutil.which("setpriv")
needs_no_dac_override = pytest.mark.skipif(
    os.geteuid() == 0 and SETPRIV is None, reason="root reads every directory, and setpriv is not here to stop it")


def unprivileged(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``args`` run as this user, but without overriding file permissions (root included)."""
    prefix = [SETPRIV, "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, capture_output=True, timeout=300, **kwargs)


WALKS = """
import json, sys
from chunkvault.store import source
out = {}
for kind in ("c", "dirs", "python"):
    if kind != "c":
        source.Walker = None
    if kind == "python":
        source.scan_dir = source.scan_dir_reference
    walk = source.SourceWalk.of_paths([sys.argv[1]])
    items = [(rel.decode(), getattr(st, "error", 0), ok) for rel, _, st, ok in walk]
    out[kind] = [items, walk.warnings]
print(json.dumps(out))
"""


def searchable_not(src) -> None:
    """``src/listonly`` may be listed but not searched: lstat of what is in it fails (EACCES)."""
    (src / "listonly" / "sub").mkdir(parents=True)
    (src / "listonly" / "in").write_bytes(b"in")
    (src / "listonly" / "sub" / "deep").write_bytes(b"deep")
    (src / "z").write_bytes(b"z")
    os.chmod(src / "listonly", 0o444)


@needs_no_dac_override
def test_the_walks_agree_on_entries_whose_lstat_fails(tmp_path):
    """The C walker, the per-directory walk and its Python reference: the same items and warnings."""
    src = tmp_path / "src"
    searchable_not(src)
    try:
        proc = unprivileged([sys.executable, "-c", WALKS, str(src)], check=True)
    finally:
        os.chmod(src / "listonly", 0o755)
    walks = json.loads(proc.stdout)
    assert walks["c"] == walks["dirs"] == walks["python"]
    items, warnings = walks["c"]
    assert items == [["", 0, True], ["listonly", 0, True], ["listonly/in", errno.EACCES, False],
                     ["listonly/sub", errno.EACCES, False], ["z", 0, True]]
    assert warnings == [f"cannot stat {src}/listonly/{n}: Permission denied" for n in ("in", "sub")]


@needs_no_dac_override
def test_a_source_that_cannot_be_looked_at_is_not_called_missing(tmp_path, new_repo):
    """The only source lies in a directory this user may not search: its lstat fails with EACCES.  The backup
    refuses it by that reason; it said "source path does not exist", and its user looked for a typo."""
    src = tmp_path / "src"
    searchable_not(src)
    new_repo()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, CHUNKVAULT_REPOSITORY=str(tmp_path / "repo0"))
    try:
        proc = unprivileged([sys.executable, "-m", "chunkvault.cli", "backup", str(src / "listonly" / "in")], env=env)
        gone = unprivileged([sys.executable, "-m", "chunkvault.cli", "backup", str(src / "gone")], env=env)
    finally:
        os.chmod(src / "listonly", 0o755)
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines() == [
        f"chunkvault: cannot read source path {src}/listonly/in: Permission denied"]
    assert gone.returncode == 2 and gone.stderr.decode().startswith("chunkvault: source path does not exist")


@needs_no_dac_override
def test_a_backup_of_entries_whose_lstat_fails_exits_3_and_keeps_the_parents(tmp_path, new_repo):
    src = tmp_path / "src"
    searchable_not(src)
    os.chmod(src / "listonly", 0o755)
    repo = new_repo()
    repo.backup([str(src)])
    os.chmod(src / "listonly", 0o444)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, CHUNKVAULT_REPOSITORY=str(tmp_path / "repo0"))
    try:
        proc = unprivileged([sys.executable, "-m", "chunkvault.cli", "backup", str(src), "--type", "diff"], env=env)
    finally:
        os.chmod(src / "listonly", 0o755)
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"cannot stat" in proc.stderr
    again = Repository.open(str(tmp_path / "repo0"), PASSWORD)
    try:
        snap = again.snapshots()[-1]
        assert snap.kind == "diff" and snap.stats["unreadable"] == ["listonly/in", "listonly/sub"]
        tree = tree_of(again, snap)
        assert tree[b"listonly/in"].type == T_FILE and tree[b"listonly/sub"].flags & F_UNREADABLE
        with again.open_file(snap, "listonly/in") as f:
            assert f.read() == b"in"
        assert stat.S_ISREG(os.lstat(src / "z").st_mode) and tree[b"z"].type == T_FILE
    finally:
        again.close()


@needs_no_dac_override
def test_a_directory_that_cannot_be_listed_keeps_its_contents_in_a_real_backup(tmp_path, new_repo):
    """The same with the C walker and a real permission error, from the command line."""
    src = tmp_path / "src"
    (src / "closed" / "sub").mkdir(parents=True)
    (src / "closed" / "sub" / "f").write_bytes(b"kept")
    repo = new_repo()
    repo.backup([str(src)])
    os.chmod(src / "closed", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, CHUNKVAULT_REPOSITORY=str(tmp_path / "repo0"))
    try:
        proc = unprivileged([sys.executable, "-m", "chunkvault.cli", "backup", str(src)], env=env)
    finally:
        os.chmod(src / "closed", 0o755)
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"kept the 2 entries the parent snapshot has below closed" in proc.stderr
    with Repository.open(str(tmp_path / "repo0"), PASSWORD) as again:
        snap = again.snapshots()[-1]
        assert snap.stats["unreadable"] == ["closed"]
        with again.open_file(snap, "closed/sub/f") as f:
            assert f.read() == b"kept"


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["read with the small files", "read as a stream"])
def test_a_file_replaced_by_a_fifo_before_it_is_read_is_left_out(tmp_path, new_repo, monkeypatch, size):
    """Between the walk's lstat and the read, a FIFO takes the file's place: opening it waited for a writer
    for ever (SIGTERM too waited). It is left out as a file that changed type, and the backup ends."""
    import threading

    from chunkvault.store import backup as backup_module

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(size))
    (src / "g").write_bytes(b"stays")
    repo = new_repo()
    fifo = src / "f"

    def swap() -> None:
        if not stat.S_ISFIFO(os.lstat(fifo).st_mode):
            fifo.unlink()
            os.mkfifo(fifo)

    hooked = "read_small_files" if size < 4096 else "open_source_file"
    real = getattr(backup_module, hooked)
    monkeypatch.setattr(backup_module, hooked, lambda *a, **k: (swap(), real(*a, **k))[1])
    done: list = []
    worker = threading.Thread(target=lambda: done.append(repo.backup([str(src)])), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # blocked in the FIFO's open: a writer ends it, so the test run goes on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the backup waited on the FIFO")
    (result,) = done
    assert any("changed type during backup" in w and "src/f" in w for w in result.warnings)
    assert [e.path for e in repo.tree(result.snapshot) if e.path] == [b"g"]


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["read with the small files", "read as a stream"])
def test_a_file_a_symlink_stood_for_while_it_was_opened_is_read_as_it_is_now(tmp_path, new_repo, monkeypatch,
                                                                                size):
    """A symbolic link took the file's place for the moment of the open (O_NOFOLLOW: ELOOP), and another file
    took the link's (a tool's swap, ``ln -sf`` and back): that file is read, as one saved by a rename is.  The
    path was called unreadable ("Too many levels of symbolic links"), exit 3, and recorded without data."""
    from chunkvault.store import backup as backup_module

    src = tmp_path / "src"
    src.mkdir()
    victim = src / "f"
    victim.write_bytes(os.urandom(size))
    (src / "g").write_bytes(b"stays")
    repo = new_repo()

    def to_link() -> None:
        victim.rename(tmp_path / "held")  # kept: the file put back takes another inode
        victim.symlink_to("/etc/hostname")

    def to_file() -> None:
        (src / "new").write_bytes(b"the file now")
        (src / "new").rename(victim)

    hooked = "read_small_files" if size < 4096 else "open_source_file"
    real = getattr(backup_module, hooked)
    fired: list[bool] = []

    def swapping(*args, **kwargs):
        if fired:
            return real(*args, **kwargs)
        fired.append(True)
        to_link()
        try:
            return real(*args, **kwargs)
        finally:
            to_file()

    monkeypatch.setattr(backup_module, hooked, swapping)
    result = repo.backup([str(src)])
    assert not result.partial and not [w for w in result.warnings if "cannot read" in w], result.warnings
    assert any("replaced during backup (stored as it is now)" in w for w in result.warnings)
    with repo.open_file(result.snapshot, "f") as f:
        assert f.read() == b"the file now"


def test_files_of_a_directory_replaced_by_a_file_before_they_are_read_vanished(tmp_path, new_repo, monkeypatch):
    """Listed, then their directory became a file: they are gone (left out, as vanished), not unreadable
    (the run was partial, exit 3, and recorded five empty files)."""
    from chunkvault.store import backup as backup_module

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}").write_bytes(os.urandom(1000))
    (src / "keep").write_bytes(b"keep")
    repo = new_repo()
    real = backup_module.read_small_files

    def swapped_first(*args, **kwargs):
        if (src / "d").is_dir():
            shutil.rmtree(src / "d")
            (src / "d").write_bytes(b"now a file")
        return real(*args, **kwargs)

    monkeypatch.setattr(backup_module, "read_small_files", swapped_first)
    result = repo.backup([str(src)])
    assert not result.partial and result.snapshot.stats["unreadable"] == []
    assert sum("vanished during backup" in w for w in result.warnings) == 5
    assert not [e.path for e in repo.tree(result.snapshot) if e.path.startswith(b"d/")]


@pytest.mark.parametrize("size", [5000, 300_000])
def test_a_hard_link_records_the_file_as_it_was_read_not_as_the_link_was_walked(tmp_path, new_repo, monkeypatch,
                                                                               size):
    """The file grew between the walk and its read: its links kept the size their own walk saw, so `ls`
    disagreed with itself and a restore of the healthy snapshot failed its --verify."""
    src = tmp_path / "src"
    linked_tree(src, size)

    def grow(path: str) -> None:
        with open(path, "ab") as f:
            f.write(b"more" * 1000)
        os.chmod(path, 0o600)

    repo = new_repo()
    fired = race_reading(monkeypatch, "victim", grow)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert fired
    tree = tree_of(repo, result.snapshot)
    holder = tree[b"a/victim"]
    for link in (b"b/other", b"c/third"):
        assert tree[link].type == T_HARDLINK
        assert (tree[link].size, tree[link].mode, tree[link].mtime_ns) == (holder.size, holder.mode, holder.mtime_ns)
    repo.restore(result.snapshot, str(tmp_path / "out"), verify=True)


@pytest.mark.parametrize("kind", ["python", "dirs"])
def test_a_directory_swapped_for_a_symbolic_link_during_the_walk_is_never_walked_through(tmp_path, new_repo,
                                                                                      monkeypatch, kind):
    """By whoever can write the tree, to have a backup run as root store what lies outside it (/etc, say):
    z is swapped for a link to outside/ once the walk has seen it, before it lists it.  Listed by its path,
    z led there.  (The C walk lists with the same native code: test_source_walk holds it to the check.)"""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "a").mkdir(parents=True)
    (src / "z").mkdir()
    (src / "a" / "f").write_text("a\n")
    (src / "z" / "inside").write_text("inside\n")
    outside.mkdir()
    (outside / "secret").write_text("outside\n")
    walk_kind(monkeypatch, kind)
    real_scan = source.scan_dir

    def scan(path, seen=None):
        if os.path.basename(path) == b"z":
            shutil.rmtree(src / "z")
            os.symlink(outside, src / "z")
        return real_scan(path, seen)

    monkeypatch.setattr(source, "scan_dir", scan)
    repo = new_repo()
    result = repo.backup([str(src)])
    monkeypatch.undo()
    tree = tree_of(repo, result.snapshot)
    assert b"z/secret" not in tree and b"z" not in tree and tree[b"a/f"].size == 2
    assert any(w.startswith("changed type during backup") and w.endswith("/z") for w in result.warnings)
    again = repo.backup([str(src)]).snapshot  # the next backup records the link as a link
    assert tree_of(repo, again)[b"z"].type != T_DIR and b"z/secret" not in tree_of(repo, again)


@pytest.mark.parametrize("parent", [False, True])
def test_a_file_reached_through_a_directory_swapped_for_a_symbolic_link_is_not_read(tmp_path, new_repo,
                                                                                    monkeypatch, parent):
    """z/f was walked inside the tree; before it is read, z is swapped for a link to outside/, which holds an
    f of its own.  Read by its path, that one was stored (flagged as changed while read).  Now the parent's
    copy stays, or, without one, the file is left out until the next backup."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "z").mkdir(parents=True)
    (src / "z" / "f").write_text("inside\n")
    outside.mkdir()
    (outside / "f").write_text("outside\n")
    repo = new_repo()
    if parent:
        repo.backup([str(src)])
        (src / "z" / "f").write_text("inside, changed\n")

    def swap(path: str) -> None:
        os.rename(src / "z", src / "z-was")
        os.symlink(outside, src / "z")

    fired = race_reading(monkeypatch, "f", swap)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert fired
    tree = tree_of(repo, result.snapshot)
    out = tmp_path / "out"
    repo.restore(result.snapshot, str(out))
    if parent:
        assert (out / "z" / "f").read_text() == "inside\n"  # as the last backup found it
        assert any(w.startswith("replaced during backup (kept as the last backup found it)") for w in result.warnings)
    else:
        assert b"z/f" not in tree
        assert any(w.startswith("replaced during backup (left out until the next backup)") for w in result.warnings)
    assert "outside" not in "".join(p.read_text() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["diff", "full"])
@pytest.mark.parametrize("first", ["replaced", "removed"])
def test_a_directory_that_cannot_be_listed_keeps_no_hard_link_to_a_path_outside_it(tmp_path, new_repo,
                                                                                   monkeypatch, kind, first):
    """Its links name their first paths, and one outside it is recorded anew by this backup: kept, the link
    restored with the new file's data, or with none.  It goes, listed unreadable; a link to a path kept
    below it stays."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(b"X" * 5000)
    os.link(src / "a", src / "sub" / "y")
    (src / "sub" / "p").write_bytes(b"P" * 5000)
    os.link(src / "sub" / "p", src / "sub" / "q")
    repo = new_repo()
    repo.backup([str(src)])
    os.unlink(src / "a")
    if first == "replaced":
        (src / "a").write_bytes(b"Z" * 9000)
    unlistable(monkeypatch, b"sub")
    result = repo.backup([str(src)], kind=kind)
    monkeypatch.undo()
    assert result.partial and sorted(result.snapshot.stats["unreadable"]) == ["sub", "sub/y"]
    tree = tree_of(repo, result.snapshot)
    assert b"sub/y" not in tree and tree[b"sub/q"].type == T_HARDLINK and tree[b"sub/q"].target == b"sub/p"
    out = tmp_path / "out"
    repo.restore(result.snapshot, str(out))
    assert (out / "sub" / "q").read_bytes() == b"P" * 5000 and not (out / "sub" / "y").exists()
    assert repo.check(read_data=True).ok


def test_files_that_became_links_of_one_unreadable_file_keep_each_its_own_parent_entry(tmp_path, new_repo,
                                                                                      monkeypatch, python_file_reads):
    """a and b were two files; now they are two links of a file that cannot be read.  a keeps its parent
    entry; b named it, and so restored a's old data.  Each keeps its own now, both listed unreadable."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"X" * 4000)
    (src / "b").write_bytes(b"Y" * 4000)
    repo = new_repo()
    repo.backup([str(src)])
    os.unlink(src / "a")
    os.unlink(src / "b")
    (src / "a").write_bytes(b"Z" * 4000)
    os.link(src / "a", src / "b")
    real_open = os.open

    def failing_open(path, flags, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) in ("a", "b"):  # root reads every file: the error is simulated
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(backup.os, "open", failing_open)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert sorted(result.snapshot.stats["unreadable"]) == ["a", "b"]
    out = tmp_path / "out"
    repo.restore(result.snapshot, str(out))
    assert (out / "a").read_bytes() == b"X" * 4000 and (out / "b").read_bytes() == b"Y" * 4000


def test_a_file_given_as_a_source_and_saved_by_a_rename_before_it_is_read_is_read(tmp_path, new_repo,
                                                                                  monkeypatch):
    """A log rotated, a dump written to a temporary name then renamed: the path is the tree."""
    log = tmp_path / "app.log"
    log.write_text("old")
    repo = new_repo()
    fired = race_reading(monkeypatch, "app.log", to_other_file)
    result = repo.backup([str(log)])
    monkeypatch.undo()
    assert fired
    with repo.open_file(result.snapshot, "app.log") as f:
        assert f.read() == b"another file"


@pytest.mark.parametrize("kind", ["python", "dirs"])
def test_a_directory_replaced_by_another_keeps_what_the_parent_had_below_it(tmp_path, new_repo, monkeypatch,
                                                                           kind):
    """A deploy's `mv new current` between the walk's lstat and the listing: not the directory the walk
    saw, so not listed (it could be reached through a link); as one that cannot be listed, it keeps the
    parent's entries, listed unreadable, until the next backup."""
    src = tmp_path / "src"
    (src / "current").mkdir(parents=True)
    (src / "current" / "app.conf").write_text("v1")
    (src / "new").mkdir()
    (src / "new" / "app.conf").write_text("v2")
    repo = new_repo()
    repo.backup([str(src)])
    walk_kind(monkeypatch, kind)
    real_scan = source.scan_dir

    def scan(path, seen=None):
        if os.path.basename(path) == b"current" and (src / "new").exists():
            shutil.rmtree(src / "current")
            os.rename(src / "new", src / "current")
        return real_scan(path, seen)

    monkeypatch.setattr(source, "scan_dir", scan)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert any(w.startswith("replaced during backup (kept as the last backup found it") for w in result.warnings)
    assert result.partial and "current" in result.snapshot.stats["unreadable"]
    with repo.open_file(result.snapshot, "current/app.conf") as f:
        assert f.read() == b"v1"
    with repo.open_file(repo.backup([str(src)]).snapshot, "current/app.conf") as f:
        assert f.read() == b"v2"


@pytest.mark.parametrize("kind", ["python", "c"])
def test_a_late_stat_by_path_through_a_swapped_directory_is_not_taken(tmp_path, new_repo, monkeypatch, kind):
    """Entries reached long after their directory was listed are stat'ed again, by path: with a directory
    above swapped for a link since, that stat described the file outside, and the read's check against it
    passed.  Another file's stat is not taken: the read is refused."""
    import time

    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "z").mkdir(parents=True)
    (src / "a").write_text("a")
    (src / "z" / "f").write_text("inside")
    for i in range(40):  # the C walk's first batches hold z's first entries; f comes in a later one
        (src / "z" / f"e{i:02}").write_text("e")
    outside.mkdir()
    (outside / "f").write_text("SECRET FROM OUTSIDE")

    def swap() -> None:
        os.rename(src / "z", src / "z-was")
        os.symlink(outside, src / "z")

    walk_kind(monkeypatch, kind)
    monkeypatch.setattr(SourceWalk, "RESTAT_AFTER", 0.0)  # as for a walk running seconds ahead of the reads
    if kind == "python":
        real_scan = source.scan_dir

        def scan(path, seen=None):
            listed = real_scan(path, seen)
            if os.path.basename(path) == b"z":
                swap()  # listed as the walk saw it, swapped right after
            return listed

        monkeypatch.setattr(source, "scan_dir", scan)
    else:
        real_walker = source.Walker

        class Walker:  # the second batch waits for the walk's thread to have listed z, then z is swapped
            calls = 0

            def __init__(self, *args):
                self._walker = real_walker(*args)

            def __getattr__(self, name):
                return getattr(self._walker, name)

            def batch(self, n, restat_after=-1.0):
                Walker.calls += 1
                if Walker.calls == 2:
                    time.sleep(0.3)
                    swap()
                return self._walker.batch(n, restat_after)

        monkeypatch.setattr(source, "Walker", Walker)
    repo = new_repo()
    result = repo.backup([str(src)])
    monkeypatch.undo()
    out = tmp_path / "out"
    repo.restore(result.snapshot, str(out))
    assert not any("SECRET" in p.read_text() for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    assert any("z/f" in w and w.startswith("replaced during backup") for w in result.warnings)


@pytest.mark.parametrize("kind", ["diff", "full"])
def test_a_file_unreadable_now_keeps_the_earlier_data_flagged(tmp_path, new_repo, monkeypatch, python_file_reads,
                                                              kind):
    """The entry kept says so (flag 1 with a digest): a restore, fresh or in place, writes the earlier data and
    warns that it is an earlier backup's; the next backup reads the file again."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret").write_bytes(b"first version")
    (src / "plain").write_bytes(b"plain")
    repo = new_repo()
    repo.backup([str(src)])
    (src / "secret").write_bytes(b"second version, unreadable")
    monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open("secret"))
    result = repo.backup([str(src)], kind=kind)
    monkeypatch.undo()
    assert result.partial and result.snapshot.stats["unreadable"] == ["secret"]
    kept = tree_of(repo, result.snapshot)[b"secret"]
    assert kept.flags & F_UNREADABLE and kept.digest and kept.size == len(b"first version")
    fresh = repo.restore(result.snapshot, str(tmp_path / "fresh"))
    assert (tmp_path / "fresh" / "secret").read_bytes() == b"first version"
    assert "secret was unreadable at backup time: restored as an earlier backup read it" in fresh.warnings
    live = tmp_path / "live"
    shutil.copytree(src, live)
    in_place = repo.restore(result.snapshot, str(live), force=True, delta=True)
    assert (live / "secret").read_bytes() == b"first version"  # the snapshot's data, as a fresh restore
    assert "secret was unreadable at backup time: restored as an earlier backup read it" in in_place.warnings
    again = repo.backup([str(src)])
    assert not again.partial and again.snapshot.stats["changed_files"] == 1
    with repo.open_file(again.snapshot, "secret") as f:
        assert f.read() == b"second version, unreadable"
