"""backup --force (read every file), --parent (choose the snapshot to compare with), --skip-if-unchanged,
--time (the time the data was taken)."""
import io
import json
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from chunkvault.errors import SnapshotNotFound, UsageError
from treeutil import settle


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(3_000 + f * 100))
    (src / "big").write_bytes(os.urandom(2_000_000))
    os.symlink("big", src / "link")
    settle()
    return src


def test_reread_reads_every_file_and_stores_only_what_differs(new_repo, tree):
    repo = new_repo()
    first = repo.backup([str(tree)]).snapshot.stats
    total = first["bytes"]
    again = repo.backup([str(tree)]).snapshot.stats
    assert again["read_bytes"] == 0 and again["unchanged_files"] == 62  # 61 files and a symbolic link
    forced = repo.backup([str(tree)], reread=True).snapshot
    st = forced.stats
    assert st["read_bytes"] == total  # every byte read again...
    assert st["unchanged_files"] == 62 and st["added_blobs"] == 0  # ...found the same, stored nothing
    assert st["manifest_records"] == 0 and forced.kind == "diff"
    full = repo.backup([str(tree)], reread=True, kind="full").snapshot
    assert full.stats["read_bytes"] == total and full.stats["files"] == first["files"]


def test_ignore_inode_and_ctime_keep_files_copied_with_their_times_unchanged(new_repo, tree, tmp_path):
    """A tree restored or copied anew with its times (a file system snapshot mounted again, rsync -a):
    every inode and change time differs, nothing else. Only with both ignored is nothing read."""
    repo = new_repo()
    repo.backup([str(tree)])
    for d in range(3):
        for f in range(20):
            p = tree / f"d{d}" / f"f{f}"
            shutil.copy2(p, str(p) + ".tmp")
            os.replace(str(p) + ".tmp", p)
    (tree / "d0" / "f0").write_bytes(b"really changed")
    settle()
    assert repo.backup([str(tree)], ignore_inode=True, dry_run=True).snapshot.stats["read_bytes"] > 0  # ctime
    st = repo.backup([str(tree)], ignore_inode=True, ignore_ctime=True).snapshot.stats
    assert st["read_bytes"] == len(b"really changed") and st["changed_files"] == 1
    again = repo.backup([str(tree)], ignore_inode=True, ignore_ctime=True).snapshot.stats
    assert again["read_bytes"] == 0 and again["manifest_records"] == 0
    plain = repo.backup([str(tree)]).snapshot.stats  # compared in full again: the new inodes are read
    assert plain["read_bytes"] > 0


def test_parent_chooses_what_a_differential_builds_on(new_repo, tree):
    repo = new_repo()
    first = repo.backup([str(tree)]).snapshot
    (tree / "d0" / "f0").write_bytes(b"changed")
    second = repo.backup([str(tree)]).snapshot
    (tree / "d1" / "f1").write_bytes(b"changed too")
    third = repo.backup([str(tree)], parent=first.id[:8]).snapshot
    assert (second.parent, third.parent) == (first.id, first.id)
    assert third.stats["changed_files"] == 2  # both changes, counted against the older parent
    with pytest.raises(SnapshotNotFound):
        repo.backup([str(tree)], parent="ffffffff")


def _repeated_on_the_wall(t: datetime) -> bool:
    """Whether ``t``'s local time without its zone is in the hour the end of summer time repeats."""
    wall = t.astimezone().replace(tzinfo=None)
    return wall.replace(fold=0).timestamp() != wall.replace(fold=1).timestamp()


def test_time_dates_the_snapshot_and_backfills_on_the_snapshot_before_it(new_repo, tree, tmp_path):
    """A backup of a file system snapshot taken earlier is dated when its data was taken: a restore of a
    point in time finds it, and it builds on the snapshot before that time, not on a newer one."""
    repo = new_repo()
    now = datetime.now(timezone.utc)
    while _repeated_on_the_wall(now - timedelta(hours=2)):  # the local time given below would name two times
        now -= timedelta(hours=1)
    first = repo.backup([str(tree)], time=now - timedelta(hours=3)).snapshot
    (tree / "d0" / "f0").write_bytes(b"at two hours ago")
    backfill_state = (tree / "d0" / "f0").read_bytes()
    (tree / "d1" / "f1").write_bytes(b"changed later")
    newest = repo.backup([str(tree)]).snapshot
    (tree / "d1" / "f1").unlink()
    earlier = repo.backup([str(tree)], time=(now - timedelta(hours=2)).astimezone().strftime("%Y-%m-%dT%H:%M:%S"))
    snap = earlier.snapshot
    assert snap.parent == first.id and newest.parent == first.id
    assert abs(snap.datetime - (now - timedelta(hours=2))) < timedelta(seconds=1)  # local time without a zone
    assert first.datetime == now - timedelta(hours=3)
    assert [s.id for s in repo.snapshots()] == [first.id, snap.id, newest.id]  # in the order of their times
    assert repo.snapshot("latest", until=now - timedelta(minutes=90)).id == snap.id
    out = tmp_path / "out"
    repo.restore("latest", str(out), until=now - timedelta(minutes=90))
    assert (out / "d0" / "f0").read_bytes() == backfill_state and not (out / "d1" / "f1").exists()
    with pytest.raises(UsageError, match="in the future"):
        repo.backup([str(tree)], time=datetime.now(timezone.utc) + timedelta(hours=1))
    with pytest.raises(UsageError, match="cannot parse time"):
        repo.backup([str(tree)], time="yesterday")
    assert len(repo.snapshots()) == 3
    dump = repo.backup_stream(io.BytesIO(b"dump"), "app.sql", time=now - timedelta(days=1)).snapshot
    assert dump.datetime == now - timedelta(days=1)


def test_skip_if_unchanged_saves_no_empty_differential(new_repo, tree):
    repo = new_repo()
    first = repo.backup([str(tree)]).snapshot
    skipped = repo.backup([str(tree)], skip_if_unchanged=True)
    assert skipped.skipped and skipped.snapshot.id == first.id
    assert [s.id for s in repo.snapshots()] == [first.id]
    os.utime(tree / "d2" / "f3", ns=(1, 1))  # metadata alone is a change
    changed = repo.backup([str(tree)], skip_if_unchanged=True)
    assert not changed.skipped and changed.snapshot.parent == first.id
    full = repo.backup([str(tree)], skip_if_unchanged=True, kind="full")  # a full asked for starts a chain: saved
    assert not full.skipped and full.snapshot.kind == "full"
    assert len(repo.snapshots()) == 3
    assert repo.check(read_data=True).ok


@pytest.mark.parametrize("walk", ["whole subtrees in C", "directory by directory"])
def test_the_local_repository_written_to_is_left_out_of_the_tree_it_lies_in(new_repo, tree, cli, walk):
    """`backup /` with the repository on that disk (/srv/backup/repo): each backup stored the packs the one
    before it wrote, so an unchanged tree grew the repository by its last backup's data every run, without
    end, and --skip-if-unchanged never skipped.  It is left out (as borg leaves its own out); a directory of
    the same name elsewhere in the tree is not."""
    (tree / "d1" / "repo").mkdir()
    (tree / "d1" / "repo" / "kept").write_bytes(b"not a repository")
    url = str(tree / "d0" / "repo")
    repo = new_repo(url)
    excludes = ["x?z"] if walk == "directory by directory" else []  # a "?" needs Python at each directory
    settle()
    first = repo.backup([str(tree)], excludes=excludes).snapshot
    paths = {e.path for e in repo.tree(first)}
    assert b"d0/f0" in paths and b"d1/repo/kept" in paths and not any(p.startswith(b"d0/repo") for p in paths)
    again = repo.backup([str(tree)], excludes=excludes, skip_if_unchanged=True)
    assert again.skipped
    args = ["backup", "-r", url, str(tree), "--skip-if-unchanged", *(f"--exclude={g}" for g in excludes)]
    assert "nothing changed since snapshot" in cli(*args).stdout.decode()


@pytest.mark.parametrize("bind", ["of the tree, outside it", "of a directory above it, in the tree"])
def test_the_local_repository_is_left_out_where_a_bind_mount_puts_it_in_the_tree(new_repo, tree, tmp_path, bind):
    """The repository's directory reached by two paths (a bind mount): given by the path that does not lie in the
    tree, or lying in the tree twice, it was backed up, and each backup stored the packs the one before it
    wrote; its path alone does not say where the tree holds it, the mount table does."""
    import subprocess

    if bind == "of the tree, outside it":
        what, where, url = tree, tmp_path / "other", tmp_path / "other" / "d0" / "repo"
    else:
        what, where, url = tree / "d0", tree / "mirror", tree / "d0" / "repo"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(what), str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        repo = new_repo(str(url))
        settle()
        first = repo.backup([str(tree)]).snapshot
        paths = {e.path for e in repo.tree(first)}
        assert b"d0/f0" in paths and not any(p.startswith(b"d0/repo") or b"/repo" in p for p in paths), paths
        assert repo.backup([str(tree)], skip_if_unchanged=True).skipped
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_walk_given_to_the_backup_must_leave_out_the_repository_in_its_tree(new_repo, tree):
    """``Repository.backup(walk=SourceWalk.of_paths(...).start())``, as documented: the walk, made without the
    repository, backed it up into itself at every run; it is refused, and one made with it leaves it out."""
    from chunkvault.repository import SourceWalk

    url = str(tree / "d0" / "repo")
    repo = new_repo(url)
    with pytest.raises(UsageError, match="does not leave out the repository"):
        repo.backup([str(tree)], walk=SourceWalk.of_paths([str(tree)]).start())
    walk = SourceWalk.of_paths([str(tree)], repositories=[url]).start()
    paths = {e.path for e in repo.tree(repo.backup([str(tree)], walk=walk).snapshot)}
    assert b"d0/f0" in paths and not any(p.startswith(b"d0/repo") for p in paths)
    elsewhere = new_repo()  # not in the tree: any walk will do
    assert elsewhere.backup([str(tree)], walk=SourceWalk.of_paths([str(tree)]).start()).snapshot


def test_a_dry_runs_listing_names_the_local_repository_it_leaves_out(new_repo, tree, cli):
    """`backup --dry-run --list` says what the backup would leave out: the repository in the tree too, which it
    left out unsaid (the listing looked like a backup of all of it)."""
    url = str(tree / "d0" / "repo")
    new_repo(url)
    out = cli("backup", "-r", url, str(tree), "--dry-run", "--list", "--json").stdout
    listed = json.loads(out)["list"]
    assert {"change": "excluded", "path": "d0/repo", "type": None, "what": None, "rule": "repository"} in listed
    assert not any(e["path"].startswith("d0/repo/") for e in listed)


@pytest.mark.parametrize("change", [None, "touch", "remove", "add", "rmdir"])
def test_skip_if_unchanged_saves_no_full_that_policy_made_due_when_nothing_changed(new_repo, tree, change):
    """With a full due after every differential, `auto` would save a full listing the parent's entries.
    An empty directory removed is a change too, though the counts of files leave directories out."""
    if change == "rmdir":
        (tree / "d1" / "empty").mkdir()
    repo = new_repo(full_every=1)
    first = repo.backup([str(tree)]).snapshot
    (tree / "new").write_bytes(b"new")
    settle()
    diff = repo.backup([str(tree)]).snapshot
    assert diff.kind == "diff"
    if change == "touch":
        os.utime(tree / "d2" / "f3", ns=(1, 1))
    elif change == "remove":  # seen by what is gone, not by its directory's times
        st = os.stat(tree)
        os.remove(tree / "new")
        os.utime(tree, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "add":
        (tree / "d2" / "another").write_bytes(b"x")
    elif change == "rmdir":
        st = os.stat(tree / "d1")
        (tree / "d1" / "empty").rmdir()
        os.utime(tree / "d1", ns=(st.st_atime_ns, st.st_mtime_ns))
    result = repo.backup([str(tree)], skip_if_unchanged=True, ignore_ctime=True)
    if change is None:
        assert result.skipped and result.snapshot.id == diff.id
        assert [s.id for s in repo.snapshots()] == [first.id, diff.id]
    else:
        assert not result.skipped and result.snapshot.kind == "full"


def test_cli_options(cli, tmp_path, tree):
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    first = json.loads(cli("backup", "-r", repo, str(tree), "--json").stdout)
    out = json.loads(cli("backup", "-r", repo, str(tree), "--skip-if-unchanged", "--json").stdout)
    assert out == {"skipped": True, "id": None, "parent": first["id"], "warnings": [], "dry_run": False}
    plain = cli("backup", "-r", repo, str(tree), "--skip-if-unchanged").stdout.decode()
    assert plain.strip() == f"nothing changed since snapshot {first['short_id']}: no snapshot saved"
    forced = json.loads(cli("backup", "-r", repo, str(tree), "--force", "--json").stdout)
    assert forced["stats"]["read_bytes"] == first["size"] and forced["parent"] == first["id"]
    chosen = json.loads(cli("backup", "-r", repo, str(tree), "--parent", first["id"][:8], "--json").stdout)
    assert chosen["parent"] == first["id"]
    assert len(json.loads(cli("snapshots", "-r", repo, "--json").stdout)) == 3
    proc = cli("backup", "-r", repo, "--stdin", "--stdin-name", "x", "--force", input=b"x", check=2)
    assert "apply to paths" in proc.stderr.decode()
    dated = json.loads(cli("backup", "-r", repo, str(tree), "--time", "2026-01-02T03:04:05.5+01:00", "--json").stdout)
    assert dated["time"] == "2026-01-02T02:04:05.500000+00:00" and dated["parent"] is None and dated["type"] == "full"
    piped = json.loads(cli("backup", "-r", repo, "--stdin", "--stdin-name", "x", "--time", "2026-01-02T03:00Z",
                           "--json", input=b"x").stdout)
    assert piped["time"] == "2026-01-02T03:00:00.000000+00:00"
    proc = cli("backup", "-r", repo, str(tree), "--time", "2999-01-01", check=2)
    assert proc.stderr.decode().count("\n") == 1 and "in the future" in proc.stderr.decode()


def test_skip_if_unchanged_skips_nothing_it_could_not_read(new_repo, tree, tmp_path):
    """A source path missing (or a file unreadable) is no sign that nothing changed: the run saves its
    snapshot and is partial (exit 3), as without the option; skipped, it exited 0."""
    repo = new_repo()
    gone = str(tmp_path / "unmounted")
    first = repo.backup([str(tree), gone])
    assert first.snapshot.stats["unreadable"]
    again = repo.backup([str(tree), gone], skip_if_unchanged=True)
    assert not again.skipped and again.snapshot.id != first.snapshot.id
    assert again.snapshot.stats["unreadable"] == first.snapshot.stats["unreadable"]


def test_progress_goes_on_while_the_stored_chunks_are_waited_for(tmp_path, new_repo, monkeypatch):
    """Behind a slow link the uploads outlast the reading, and the counts went silent until the end."""
    import time as time_module

    from chunkvault.store.backup import Backup

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    repo = new_repo(str(tmp_path / "repo"))
    real = Backup._store_chunks

    def slow(self, batch):
        time_module.sleep(1.6)
        real(self, batch)

    monkeypatch.setattr(Backup, "_store_chunks", slow)
    calls = []
    repo.backup([str(src)], progress=calls.append)
    assert len(calls) >= 3  # while waiting, twice a second; and the final counts


def test_progress_counts_the_tree_beside_the_backup_for_a_total(tmp_path, new_repo, monkeypatch):
    """A backup that reports progress counts the files and bytes its walk will take (its rules applied: an
    excluded file and one over --exclude-larger-than are not in the total) on a second walk, so the progress
    line has a percentage and an ETA; the bytes done are those read and those of files found unchanged."""
    import time as time_module

    from chunkvault.store.backup import Backup

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    sizes = {"a": 300_000, "d/b": 200_000, "d/c": 1000}
    for name, size in sizes.items():
        (src / name).write_bytes(os.urandom(size))
    (src / "skip.tmp").write_bytes(os.urandom(5000))
    (src / "huge").write_bytes(os.urandom(400_000))
    for f in src.rglob("*"):  # not so new that the next backup reads them again (racy)
        os.utime(f, (time_module.time() - 3600,) * 2)
    repo = new_repo(str(tmp_path / "repo"))
    real = Backup._store_chunks

    def slow(self, batch):  # time for reports while the backup runs, after the count has ended
        time_module.sleep(0.6)
        real(self, batch)

    monkeypatch.setattr(Backup, "_store_chunks", slow)
    calls = []
    rules = {"excludes": ["*.tmp"], "exclude_larger_than": 350_000, "ignore_ctime": True}  # ctime: just now
    repo.backup([str(src)], progress=calls.append, **rules)
    totals = {(c["total_files"], c["total_bytes"]) for c in calls} - {(None, None)}
    assert totals == {(3, sum(sizes.values()))}
    assert calls[-1]["read_bytes"] == sum(sizes.values()) and calls[-1]["unchanged_bytes"] == 0
    monkeypatch.undo()
    calls.clear()
    repo.backup([str(src)], progress=calls.append, **rules)
    assert calls[-1]["unchanged_bytes"] == sum(sizes.values()) and calls[-1]["read_bytes"] == 0
    assert all(c["total_bytes"] in (None, sum(sizes.values())) for c in calls)


def test_a_slow_progress_callback_is_not_called_for_every_file(tmp_path, new_repo):
    """The half second between reports ran from before the callback: one taking 0.6 s made a backup of 100
    small files take a minute."""
    import time as time_module

    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"f{i}").write_bytes(os.urandom(100))
    repo = new_repo(str(tmp_path / "repo"))
    calls = []

    def slow(counts):
        calls.append(counts)
        time_module.sleep(0.6)

    repo.backup([str(src)], progress=slow)
    assert len(calls) <= 5


def test_a_source_below_another_that_is_a_symbolic_link_is_refused(tmp_path, new_repo):
    """`backup LINK LINK/file`: LINK is backed up as the link, and LINK/file was left to it, so nobody backed
    it up (exit 0, no warning, though the snapshot's paths listed it)."""
    from chunkvault.errors import UsageError

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "file").write_text("important")
    os.symlink("real", tmp_path / "link")
    repo = new_repo()
    with pytest.raises(UsageError, match="lies below .*/link, a symbolic link"):
        repo.backup([str(tmp_path / "link"), str(tmp_path / "link" / "file")])
    assert repo.snapshots() == []
    (tmp_path / "top").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "top" / "inner")  # a link between the two sources, not one of them
    with pytest.raises(UsageError, match="lies below .*/top/inner, a symbolic link"):
        repo.backup([str(tmp_path / "top"), str(tmp_path / "top" / "inner" / "file")])
    kept = repo.backup([str(tmp_path / "link"), str(tmp_path / "real" / "file")]).snapshot  # what it leads to
    assert repo.find_entry(kept, os.path.relpath(tmp_path / "real" / "file", "/")).size == 9


def test_one_symbolic_link_to_a_directory_backed_up_alone_is_stored_and_restored_as_the_link(tmp_path, new_repo):
    """`backup LINK` stores the link under its name, as any other symbolic link source: taking the directory
    it leads to as the snapshot's root made a snapshot whose root is a link, which no restore accepts (and
    the backup had exited 0)."""
    from chunkvault.store.manifest import T_SYMLINK

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("data")
    os.symlink("real", tmp_path / "link")
    repo = new_repo()
    snap = repo.backup([str(tmp_path / "link")]).snapshot
    assert [(e.path, e.type, e.target) for e in repo.tree(snap)] == [(b"link", T_SYMLINK, b"real")]
    repo.restore(snap, str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == ["link"] and os.readlink(tmp_path / "out" / "link") == "real"


def test_a_backup_s_own_compression_level_applies_to_its_new_data(tmp_path, new_repo, cli):
    """``--compression LEVEL`` per backup (restic's ``--compression``): 0 stores the data as it is, a high
    level smaller than the repository's default; every snapshot restores, and a bad level is one usage
    error before anything is read."""
    from chunkvault.errors import UsageError

    src = tmp_path / "src"
    src.mkdir()
    def text(seed: int) -> bytes:  # new data each time: nothing deduplicates against the last
        return b"".join(b"line %d of a log that compresses well, %x\n" % (i, i * seed) for i in range(40_000))

    repo = new_repo(str(tmp_path / "repo"))
    stored = {}
    for level, seed in ((0, 7919), (1, 7907), (19, 7901)):
        (src / "log").write_bytes(text(seed))
        result = repo.backup([str(src)], kind="full", compression_level=level)
        stored[level] = result.snapshot.stats["added_stored_bytes"]
        out = tmp_path / f"out{level}"
        repo.restore(result.snapshot.id, str(out))
        assert (out / "log").read_bytes() == text(seed)
    assert stored[0] > len(text(1)) > stored[1] > stored[19], stored
    assert repo.check(read_data=True).ok
    for bad in (-1, 23, 3.5, True, "3"):
        with pytest.raises(UsageError, match="compression level must be 0 .off. to 22"):
            repo.backup([str(src)], compression_level=bad)
    proc = cli("backup", "-r", str(tmp_path / "repo"), str(src), "--compression", "23", check=2)
    assert proc.stderr.decode().strip() == "chunkvault: argument --compression: not a zstd level: 23 (0 = off, 1 to 22)"
    (src / "log").write_bytes(text(7883))
    cli("backup", "-r", str(tmp_path / "repo"), str(src), "--compression", "0", "--no-delta")  # a delta: zstd
    assert repo.snapshots()[-1].stats["added_stored_bytes"] > len(text(1))
