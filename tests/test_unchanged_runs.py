"""Runs of unchanged entries matched in C as the walk queued them (``SourceWalk.skip_unchanged``) decide
exactly what the entry-by-entry comparison decides: same manifest records, same counts."""
from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkvault import Repository
from chunkvault.store import source
from chunkvault.store.manifest import NS_MAX, OP_ENTRY, OP_FRESH, T_DIR, T_FILE, T_HARDLINK, T_SYMLINK
from chunkvault.store.backup import IGNORE_CTIME, IGNORE_INODE, NEVER_RACY
from chunkvault.store.source import SourceWalk
from treeutil import settle, wait_for

pytestmark = pytest.mark.skipif(source.Walker is None, reason="the C walker is not built")

COUNTED = ("files", "dirs", "bytes", "unchanged_files", "changed_files", "new_files", "deleted", "manifest_records")


def one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SourceWalk, "skip_unchanged", lambda self, record, *rest: (0, 0, 0, 0, record))


def build(root: str) -> None:
    for d in range(4):
        os.makedirs(os.path.join(root, f"d{d}", "sub"))
        for f in range(8):
            with open(os.path.join(root, f"d{d}", f"f{f}"), "wb") as fh:
                fh.write(f"{d}/{f}".encode() * (f + 1))
        with open(os.path.join(root, f"d{d}", "sub", "deep"), "wb") as fh:
            fh.write(b"deep")
    os.symlink("d0/f0", os.path.join(root, "link"))
    os.symlink("../f1", os.path.join(root, "d1", "sub", "up"))


def rewrite_same_size_and_mtime(path: str) -> None:
    st_ = os.stat(path)
    with open(path, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 1]))
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))  # only the ctime tells


def recreate_same_times(path: str) -> None:
    """The same bytes and times under a new inode (as a copy made by ``cp -p`` and moved in place)."""
    if os.path.isfile(path) and not os.path.islink(path):
        shutil.copy2(path, path + ".tmp")
        os.replace(path + ".tmp", path)


def retarget(path: str, target: str) -> None:
    os.unlink(path)
    os.symlink(target, path)


EDITS = {
    "rewrite": lambda p: open(p, "ab").write(b"more") and None,
    "touch": lambda p: os.utime(p, ns=(0, os.stat(p).st_mtime_ns + 1)),
    "chmod": lambda p: os.chmod(p, os.stat(p).st_mode & 0o7777 ^ 0o040),
    "same size and mtime": rewrite_same_size_and_mtime,
    "recreate, same times": recreate_same_times,
    "hard link": lambda p: os.link(p, p + ".link"),
    "remove": lambda p: shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p),
    "replace by a file": lambda p: (shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p),
                                    open(p, "wb").write(b"now a file")) and None,
    "add beside": lambda p: open(p + ".new", "wb").write(b"new") and None,
    "retarget": lambda p: retarget(p, "elsewhere"),
    "retarget, same length": lambda p: retarget(p, os.readlink(p)[::-1]),
    "touch, not following": lambda p: os.utime(p, ns=(0, os.lstat(p).st_mtime_ns + 1), follow_symlinks=False),
}
TARGETS = [f"d{d}/f{f}" for d in range(4) for f in range(8)] + [f"d{d}" for d in range(4)] + [
    f"d{d}/sub" for d in range(4)] + ["link", "d2/sub/deep", "d1/sub/up"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(EDITS)), st.sampled_from(TARGETS)), max_size=6),
       kind=st.sampled_from(["diff", "full"]), batch=st.sampled_from([1, 3, 32]),
       roots=st.sampled_from([["src"], ["src/d1", "src/d3"]]), excludes=st.sampled_from([[], ["f3"], ["*/sub"]]),
       ignore=st.sampled_from([{}, {"ignore_inode": True}, {"ignore_ctime": True},
                               {"ignore_inode": True, "ignore_ctime": True}]))
def test_runs_matched_in_c_decide_what_one_at_a_time_decides(tmp_path_factory, monkeypatch, edits, kind, batch,
                                                               roots, excludes, ignore):
    tmp = tmp_path_factory.mktemp("runs")
    src = str(tmp / "src")
    build(src)
    paths = [str(tmp / r) for r in roots]
    repo = Repository.init(str(tmp / "repo"), "pw", kdf_seconds=0)
    try:
        parent = repo.backup(paths, excludes=excludes).snapshot
        for what, target in edits:
            path = os.path.join(src, target)
            try:
                EDITS[what](path)
            except OSError:  # gone, or not for this kind of entry (a directory's hard link)
                pass
        paths = [p for p in paths if os.path.isdir(p)] or [src]  # a root may have gone
        with monkeypatch.context() as m:
            m.setattr(SourceWalk, "BATCH", batch)
            in_runs = repo.backup(paths, kind=kind, parent=parent.id, excludes=excludes, **ignore).snapshot
            one_at_a_time(m)
            singly = repo.backup(paths, kind=kind, parent=parent.id, excludes=excludes, **ignore).snapshot
        # The directories above several roots change as other tests make theirs: only the tree is compared.
        below = os.fsencode(src.lstrip("/"))

        def tree(snap):
            return [r for r in repo._repo.manifest_records(snap) if len(roots) == 1 or r.path.startswith(below)]
        assert tree(in_runs) == tree(singly)
        counted = COUNTED if len(roots) == 1 else COUNTED[:-1]  # manifest_records: the tree above is compared
        assert {k: in_runs.stats[k] for k in counted} == {k: singly.stats[k] for k in counted}
    finally:
        repo.close()


def test_an_unchanged_tree_is_taken_in_runs(tmp_path, monkeypatch):
    src = str(tmp_path / "src")
    build(src)  # the root, 8 directories, 36 files, 2 symlinks
    settle()
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0)
    with repo:
        repo.backup([src])
        taken = []
        real = SourceWalk.skip_unchanged

        def spy(self, *args):
            out = real(self, *args)
            taken.append(out[:4])
            return out

        monkeypatch.setattr(SourceWalk, "skip_unchanged", spy)
        monkeypatch.setattr(SourceWalk, "BATCH", 4)
        snap = repo.backup([src]).snapshot
    assert snap.stats["unchanged_files"] == 36 + 2 and snap.stats["manifest_records"] == 0  # the links too
    files, dirs, links = (sum(t[i] for t in taken) for i in range(3))
    assert files + dirs + links >= 36 + 8 + 2 - 4 and dirs >= 4 and links >= 1  # all but the first batch
    files_bytes = sum(os.path.getsize(os.path.join(dp, n)) for dp, _, ns in os.walk(src) for n in ns
                      if not os.path.islink(os.path.join(dp, n)))
    assert 0 < sum(t[3] for t in taken) <= files_bytes == snap.stats["bytes"]


def test_an_entry_queued_longer_than_restat_after_is_not_taken_on_its_old_stat(tmp_path, monkeypatch):
    """The walk lists ahead; a file changed after its lstat and before its turn is seen as changed."""
    src = tmp_path / "src"
    src.mkdir()
    for f in range(200):
        (src / f"f{f:03}").write_bytes(b"x")
    repo = Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0)
    with repo:
        repo.backup([str(src)])
        monkeypatch.setattr(SourceWalk, "RESTAT_AFTER", 0.2)
        walk = SourceWalk.of_paths([str(src)]).start()
        time.sleep(0.4)  # listed and stat'ed by now
        stamp = os.stat(src / "f150").st_mtime_ns
        (src / "f150").write_bytes(b"y")
        os.utime(src / "f150", ns=(stamp, stamp))  # same size and mtime: only the ctime tells
        snap = repo.backup([str(src)], walk=walk).snapshot
        assert (snap.stats["changed_files"], snap.stats["unchanged_files"]) == (1, 199)


def entry_of(rel: bytes, st_, etype: int, target: bytes = b""):
    from chunkvault.store.manifest import Entry

    return Entry(rel, etype, st_.st_mode & 0o7777, st_.st_uid, st_.st_gid, st_.st_mtime_ns,
                 st_.st_size if etype == T_FILE else len(target), st_.st_ctime_ns, st_.st_ino, st_.st_dev, 0,
                 target)


def taken_by_the_walker(root: bytes, records: list, ignore: int = 0, racy: tuple = NEVER_RACY) -> tuple:
    """What ``skip_unchanged`` takes of a walk of ``root`` (past its root entry) against ``records``."""
    w = source.Walker(b"", root)
    w.start(100, 100)
    assert w.batch(1)[0][0] == b""  # the root, never taken
    wait_for(lambda: w.queued == len(os.listdir(root)))  # skip_unchanged takes what is walked, never waits
    out = w.skip_unchanged(records[0], iter(records[1:]), 60.0, OP_ENTRY, T_FILE, T_DIR, T_SYMLINK, [], 100, ignore,
                           *racy)
    return out[:4]


@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_any_recorded_field_that_differs_ends_a_run(tmp_path, kind):
    """Each field the entry-by-entry comparison looks at, changed alone in the parent's record: not taken."""
    import dataclasses

    from chunkvault.store.manifest import F_CHANGED_DURING_READ, F_UNREADABLE, Record

    target = tmp_path / "x"
    if kind == "symlink":
        target.symlink_to("somewhere/else")
    else:
        target.mkdir() if kind == "dir" else target.write_bytes(b"12345")
    st_ = os.lstat(target)
    etype = {"file": T_FILE, "dir": T_DIR, "symlink": T_SYMLINK}[kind]
    good = entry_of(b"x", st_, etype, b"somewhere/else" if kind == "symlink" else b"")
    root = os.fsencode(tmp_path)
    assert taken_by_the_walker(root, [Record(OP_ENTRY, b"x", good)]) == {
        "file": (1, 0, 0, 5), "dir": (0, 1, 0, 0), "symlink": (0, 0, 1, 0)}[kind]
    changes = {"type": T_HARDLINK, "mode": good.mode ^ 0o1, "uid": good.uid + 1, "gid": good.gid + 1,
               "mtime_ns": good.mtime_ns + 1, "ctime_ns": good.ctime_ns - 1, "ino": good.ino + 1,
               "dev": good.dev + 1, "size": good.size + 1, "flags": F_UNREADABLE}
    if kind == "file":
        changes["flags"] = F_CHANGED_DURING_READ
    else:
        changes.update(rdev=1, target=b"t", digest=b"d" * 32, chunks=b"c" * 32)
    if kind == "symlink":
        changes["target"] = b"somewhere/elsf"  # the same length
    for field, value in changes.items():
        bad = dataclasses.replace(good, **{field: value})
        assert taken_by_the_walker(root, [Record(OP_ENTRY, b"x", bad)]) == (0, 0, 0, 0), field
        # told to ignore it (inode and device together, or the change time), the run goes on
        ignored = {"ino": IGNORE_INODE, "dev": IGNORE_INODE, "ctime_ns": IGNORE_CTIME}.get(field)
        if ignored:
            assert taken_by_the_walker(root, [Record(OP_ENTRY, b"x", bad)], ignored) != (0, 0, 0, 0), field
            other = IGNORE_INODE + IGNORE_CTIME - ignored
            assert taken_by_the_walker(root, [Record(OP_ENTRY, b"x", bad)], other) == (0, 0, 0, 0), field
    for rec in (Record(OP_ENTRY, b"y", dataclasses.replace(good, path=b"y")), Record(OP_FRESH, b"x", good)):
        assert taken_by_the_walker(root, [rec]) == (0, 0, 0, 0)
    # times within the racy window are not vouched for (the change time only when it is compared)
    rec = Record(OP_ENTRY, b"x", good)
    for t, ignore in ((good.mtime_ns, IGNORE_CTIME), (good.ctime_ns, 0)):
        assert taken_by_the_walker(root, [rec], ignore, (t, t, t, t)) == (0, 0, 0, 0)
        assert taken_by_the_walker(root, [rec], ignore, (t + 1, t + 2) * 2) != (0, 0, 0, 0)  # before it
        assert taken_by_the_walker(root, [rec], ignore, (t - 2, t - 1) * 2) != (0, 0, 0, 0)  # after it
    if good.mtime_ns % 10**9 and good.ctime_ns % 10**9:  # times with sub-second digits: the first pair is theirs
        assert taken_by_the_walker(root, [rec], 0, (0, NS_MAX, 1, 0)) == (0, 0, 0, 0)
        assert taken_by_the_walker(root, [rec], 0, (1, 0, 0, NS_MAX)) != (0, 0, 0, 0)
    if kind == "file":
        os.link(target, tmp_path / "x2")  # two links now: compared one at a time
        st_ = os.lstat(target)
        assert taken_by_the_walker(root, [Record(OP_ENTRY, b"x", entry_of(b"x", st_, T_FILE))]) == (0, 0, 0, 0)


def test_any_recorded_field_that_differs_makes_a_file_changed_one_at_a_time_too(tmp_path):
    """What the C walk's runs decide, the entry-by-entry test in Python decides alike: a file grown with its
    mtime put back, backed up with --ignore-ctime, was taken as unchanged there (the C walk had not)."""
    import dataclasses

    from chunkvault.store.backup import _unchanged_file
    from chunkvault.store.manifest import F_CHANGED_DURING_READ

    target = tmp_path / "x"
    target.write_bytes(b"12345")
    st_ = os.lstat(target)
    good = entry_of(b"x", st_, T_FILE)
    assert _unchanged_file(good, st_, 0, NEVER_RACY)
    changes = {"type": T_HARDLINK, "mode": good.mode ^ 0o1, "uid": good.uid + 1, "gid": good.gid + 1,
               "mtime_ns": good.mtime_ns + 1, "ctime_ns": good.ctime_ns - 1, "ino": good.ino + 1,
               "dev": good.dev + 1, "size": good.size + 1, "flags": F_CHANGED_DURING_READ}
    ignored = {"ino": IGNORE_INODE, "dev": IGNORE_INODE, "ctime_ns": IGNORE_CTIME}
    for field, value in changes.items():
        bad = dataclasses.replace(good, **{field: value})
        for ignore in (0, IGNORE_CTIME, IGNORE_INODE, IGNORE_CTIME | IGNORE_INODE):
            assert _unchanged_file(bad, st_, ignore, NEVER_RACY) == bool(ignore & ignored.get(field, 0)), \
                (field, ignore)


def test_a_file_grown_with_its_mtime_put_back_is_read_again_with_ignore_ctime(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello\n")
    (src / "b").write_bytes(b"x\n")
    for name in ("a", "b"):
        os.utime(src / name, ns=(10**18, 10**18))
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)], ignore_ctime=True)
    (src / "a").write_bytes(b"hello world, longer\n")
    os.utime(src / "a", ns=(10**18, 10**18))
    result = repo.backup([str(src)], ignore_ctime=True)
    assert result.snapshot.stats["changed_files"] == 1
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "a").read_bytes() == b"hello world, longer\n"


@pytest.mark.parametrize("way", ["in runs", "one at a time", "linked"])
def test_a_change_hidden_in_the_parent_s_clock_tick_is_read(tmp_path, monkeypatch, way):
    """A file changed again in the clock tick its times were stamped in, after the backup read it, keeps
    its times: an entry whose times lie within the parent backup's walk, widened by a margin, is read
    again, not taken on them, whichever way entries are compared (runs in C, one at a time, a file with
    other links).  Shown with --ignore-ctime, so that times set back with utime are all that compare, and a
    margin of an hour, so that a file written now is within it whatever the machine's speed; times an hour
    before or after the walk are out of it, and taken unread (--ignore-ctime's documented trade-off)."""
    from chunkvault.store import backup

    monkeypatch.setattr(backup, "RACY_FINE_NS", 3600 * 10**9)
    monkeypatch.setattr(backup, "RACY_COARSE_NS", 3600 * 10**9)
    if way == "one at a time":
        one_at_a_time(monkeypatch)
    taken = []
    real = SourceWalk.skip_unchanged
    monkeypatch.setattr(SourceWalk, "skip_unchanged", lambda self, *a: taken.append(r := real(self, *a)) or r)
    monkeypatch.setattr(SourceWalk, "BATCH", 1)
    src = tmp_path / "src"
    src.mkdir()
    now = time.time_ns()
    for name, when in (("after", now + 7200 * 10**9), ("before", now - 7200 * 10**9), ("now", None)):
        (src / name).write_bytes(b"A" * 5)
        if when is not None:
            os.utime(src / name, ns=(when, when))
        if way == "linked":
            os.link(src / name, src / f"{name}-link")
    with Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0) as repo:
        first = repo.backup([str(src)], ignore_ctime=True).snapshot
        assert first.stats["started_ns"] <= now + 10**9 and first.stats["finished_ns"] >= first.stats["started_ns"]
        for name in ("after", "before", "now"):
            st_ = os.stat(src / name)
            (src / name).write_bytes(b"B" * 5)
            os.utime(src / name, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        taken.clear()
        snap = repo.backup([str(src)], ignore_ctime=True).snapshot
        assert snap.stats["read_bytes"] == 5
        assert sum(t[0] for t in taken) == (2 if way == "in runs" else 0)  # after and before, unread
        repo.restore(snap, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if "link" not in p.name} == {
        "after": b"A" * 5, "before": b"A" * 5, "now": b"B" * 5}


def test_the_racy_window_is_the_parent_s_walk_widened_by_its_margin():
    from types import SimpleNamespace

    from chunkvault.store.backup import RACY_COARSE_NS, RACY_FINE_NS, _racy, racy_window

    def parent(**stats):
        return SimpleNamespace(stats=stats)

    w = racy_window(parent(started_ns=10**12, finished_ns=2 * 10**12))
    assert w == (10**12 - RACY_FINE_NS, 2 * 10**12 + RACY_FINE_NS, 10**12 - RACY_COARSE_NS, 2 * 10**12 + RACY_COARSE_NS)
    fine, whole = 10**12 - RACY_FINE_NS + 1, 10**12 - RACY_COARSE_NS  # a time of whole seconds gets the wider margin
    assert _racy(fine, w) and _racy(whole, w) and not _racy(whole - 1, w) and not _racy(fine - 2, w)
    assert _racy(2 * 10**12 + RACY_FINE_NS - 1, w) and not _racy(2 * 10**12 + RACY_FINE_NS + 1, w)
    for no_window in (parent(), parent(started_ns="x"), None, parent(started_ns=1, finished_ns=None)):  # no time
        assert not any(_racy(t, racy_window(no_window)) for t in (NS_MAX, 0, -1, 10**18, 10**18 + 1))
    assert racy_window(parent(started_ns=10**12))[1::2] == (NS_MAX, NS_MAX)  # no end recorded: from the start on
    assert racy_window(parent(started_ns=0, finished_ns=NS_MAX))[1::2] == (NS_MAX, NS_MAX)


def test_a_parent_from_before_walks_were_timed_gets_a_window_from_its_time_less_its_duration():
    """Its files changed in the tick it read them were taken unchanged by every backup after it."""
    from types import SimpleNamespace

    from chunkvault.store.backup import UNTIMED_WALK_NS, _racy, racy_window

    saved = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    at = int(saved.timestamp()) * 10**9
    timed = SimpleNamespace(stats={"duration": 30.0}, datetime=saved)
    w = racy_window(timed)
    assert _racy(at - 30 * 10**9, w) and _racy(at, w) and _racy(NS_MAX, w) and not _racy(at - 40 * 10**9, w)
    untimed = racy_window(SimpleNamespace(stats={}, datetime=saved))
    assert _racy(at - UNTIMED_WALK_NS + 5 * 10**9, untimed) and not _racy(at - UNTIMED_WALK_NS - 9 * 10**9, untimed)


def test_a_run_that_read_racy_files_again_is_saved_though_nothing_changed(tmp_path, monkeypatch):
    """--skip-if-unchanged: a run that read files again only for their racy times saves its (empty)
    differential, so that the window moves on and the next run takes them unread; skipped, every run
    read them again."""
    from chunkvault.store import backup

    src = tmp_path / "src"
    src.mkdir()
    (src / "db").write_bytes(os.urandom(50_000))
    st_ = os.stat(src / "db")
    times = iter([(st_.st_mtime_ns, st_.st_mtime_ns) * 2, backup.NEVER_RACY, backup.NEVER_RACY])
    with Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0) as repo:
        first = repo.backup([str(src)]).snapshot
        monkeypatch.setattr(backup, "racy_window", lambda parent: next(times))
        second = repo.backup([str(src)], skip_if_unchanged=True)
        assert not second.skipped and second.snapshot.stats["read_bytes"] == 50_000
        assert second.snapshot.parent == first.id and second.snapshot.stats["manifest_records"] == 0
        third = repo.backup([str(src)], skip_if_unchanged=True)
        assert third.skipped and third.snapshot.id == second.snapshot.id
