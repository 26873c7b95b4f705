"""In-place restores: confirmation, --delta rewriting only what differs, --delete, resuming."""
import fnmatch
import json
import os
import shutil
import textwrap
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault.store.forksafe import loud_threads
from chunkvault.errors import ChunkvaultError
from chunkvault.store.restore import Selection
from treeutil import HOLE_FILES, assert_holes_kept, counting_reads, describe, make_holes_inside_chunks, makes_holes


@pytest.fixture
def snapshot_of_tree(tmp_path, new_repo):
    rnd = random.Random(11)
    src = tmp_path / "live"
    (src / "base").mkdir(parents=True)
    for i in range(6):
        (src / "base" / f"rel{i}").write_bytes(rnd.randbytes(400_000))
    (src / "small").write_bytes(b"small")
    # chunks of 128 KiB at most: each file is several (the keyed cut points left one about once in eight
    # repositories, and a change anywhere in it then rewrote it whole)
    repo = new_repo(str(tmp_path / "repo"), chunker={"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 128 << 10})
    snap = repo.backup([str(src)]).snapshot
    return repo, snap, src, describe(src)


def damage(src, rnd):
    with open(src / "base" / "rel2", "r+b") as f:  # a few bytes in one file
        f.seek(123_456)
        f.write(b"XXXX")
    (src / "base" / "rel4").write_bytes(b"truncated")
    os.remove(src / "small")
    (src / "extra").write_bytes(b"not in the snapshot")


def test_delta_rewrites_only_what_differs(snapshot_of_tree):
    repo, snap, src, expected = snapshot_of_tree
    damage(src, random.Random(1))
    result = repo.restore(snap, str(src), force=True, delta=True)
    assert result.unchanged_files == 4  # rel0, rel1, rel3, rel5: only read, never written
    total = sum(os.path.getsize(src / "base" / f"rel{i}") for i in range(6))
    assert result.rewritten_bytes < 0.4 * total  # the damaged chunk of rel2 and rel4
    assert (src / "extra").exists()  # kept without --delete
    os.remove(src / "extra")
    got = describe(src)
    assert got.pop(b".")[:2] == expected[b"."][:2]  # removing "extra" just now touched the root's mtime
    assert got == {k: v for k, v in expected.items() if k != b"."}


@pytest.mark.parametrize("change", ["grown", "written in place"])
def test_delta_reads_a_changed_file_once(snapshot_of_tree, monkeypatch, change):
    """A file whose size is not the entry's cannot hold its content, and one of its size is told changed at
    its first chunk that differs: it is read once, for the chunks it holds, not first whole to tell it
    unchanged (a log that grew, a database file written in place, was read twice)."""
    repo, snap, src, expected = snapshot_of_tree
    with open(src / "base" / "rel2", "ab" if change == "grown" else "r+b") as f:
        f.write(b"grown")
    read = counting_reads(monkeypatch, str(src / "base" / "rel2"))
    result = repo.restore(snap, str(src), force=True, delta=True, includes=["base/rel2"])
    monkeypatch.undo()
    assert result.unchanged_files == 0 and 0 < result.rewritten_bytes + (change == "grown") < 400_000
    assert sum(read) <= 400_000 + result.rewritten_bytes
    assert describe(src)[b"base/rel2"] == expected[b"base/rel2"]


def test_delta_keeps_a_file_holding_its_content_whose_chunk_the_index_lacks(tmp_path, new_repo):
    """A file is told unchanged chunk by chunk, by each chunk's length the index gives: one whose chunk the
    index lacks (its pack lost, the index repaired) was taken as changed and its restore failed, where the
    target already held its content; its digest tells it, and it is kept, nothing read."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(random.Random(3).randbytes(300_000))
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    first_pack, = (tmp_path / "repo" / "data").glob("*/*")
    (src / "new").write_bytes(random.Random(4).randbytes(100_000))
    snap = repo.backup([str(src)], kind="full").snapshot
    out = tmp_path / "out"
    repo.restore(snap, str(out))
    first_pack.unlink()  # "old"'s chunks: its pack lost
    repo.repair_index()
    result = repo.restore(snap, str(out), force=True, delta=True)
    assert result.unchanged_files == 2 and result.rewritten_bytes == 0
    assert describe(out) == describe(src)
    (out / "old").write_bytes(b"changed")
    with pytest.raises(ChunkvaultError, match="not in the index"):
        repo.restore(snap, str(out), force=True, delta=True)


def test_delta_tells_a_file_grown_while_compared_changed(snapshot_of_tree, monkeypatch):
    """A file is compared chunk by chunk at the entry's size: one written past it meanwhile (a log appended to)
    held every chunk, was taken as unchanged, and kept its new tail; read whole, as before, the tail showed."""
    from chunkvault.store.restore import Restorer

    repo, snap, src, expected = snapshot_of_tree
    held_at, grown = Restorer._held_at, []

    def growing(self, fd, *args):
        if not grown:
            grown.append(True)
            with open(src / "base" / "rel2", "ab") as f:
                f.write(b"appended meanwhile")
        return held_at(self, fd, *args)

    monkeypatch.setattr(Restorer, "_held_at", growing)
    result = repo.restore(snap, str(src), force=True, delta=True, includes=["base/rel2"])
    assert grown and result.unchanged_files == 0
    assert describe(src)[b"base/rel2"] == expected[b"base/rel2"]


def test_delete_removes_what_the_snapshot_lacks(snapshot_of_tree):
    repo, snap, src, expected = snapshot_of_tree
    damage(src, random.Random(2))
    (src / "newdir" / "deep").mkdir(parents=True)
    (src / "newdir" / "deep" / "f").write_bytes(b"x")
    result = repo.restore(snap, str(src), force=True, delta=True, delete=True)
    assert result.deleted == 2  # extra, newdir (with its subtree)
    assert describe(src) == expected


def _interrupted_at_file(monkeypatch, n: int) -> None:
    """A restore's ``n``-th file written raises KeyboardInterrupt (as Ctrl-C would, mid-way)."""
    from chunkvault.store import restore as restore_mod

    calls = {"n": 0}
    real = restore_mod.Restorer._write_file

    def dying(self, dst, e, chunks):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, dst, e, chunks)

    monkeypatch.setattr(restore_mod.Restorer, "_write_file", dying)


def test_interrupted_restore_resumes_with_delta(snapshot_of_tree, tmp_path, monkeypatch):
    repo, snap, src, expected = snapshot_of_tree
    target = tmp_path / "target"
    _interrupted_at_file(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        repo.restore(snap, str(target))
    monkeypatch.undo()
    result = repo.restore(snap, str(target), force=True, delta=True)
    assert result.unchanged_files >= 2
    assert describe(target) == expected


@pytest.mark.parametrize("given", [None, 0o777, 0o1777])
def test_a_rerun_gives_a_target_an_interrupted_restore_closed_its_mode_back(tmp_path, new_repo, monkeypatch, given):
    """A target closed to 0700 while it fills (made, or an empty one others may write in) whose snapshot records
    no root directory (several paths) gets its own mode back once all is in; interrupted, the rerun in place
    found it 0700 and left it so: a shared directory closed to all but its owner."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"f{i}").write_bytes(os.urandom((3 << 20) + i))  # of several chunks: not in a run
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(tmp_path / "a"), str(tmp_path / "b")]).snapshot
    target = tmp_path / "target"
    if given is not None:
        target.mkdir()
        os.chmod(target, given)
    os.umask(umask := os.umask(0o022))
    expected = given if given is not None else 0o777 & ~umask
    _interrupted_at_file(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        repo.restore(snap, str(target), processes=1)
    monkeypatch.undo()
    assert os.stat(target).st_mode & 0o7777 == 0o700  # as a restore killed outright leaves it
    repo.restore(snap, str(target), force=True, delta=True, processes=1)
    assert os.stat(target).st_mode & 0o7777 == expected
    assert "user.chunkvault.restore-mode" not in os.listxattr(target)
    restored = target / str(tmp_path).lstrip("/")  # several paths: each under its whole path
    assert describe(restored / "b") == describe(tmp_path / "b")


def test_a_rerun_into_a_target_left_empty_and_closed_gives_its_mode_back(tmp_path, new_repo, monkeypatch):
    """Interrupted before it wrote anything (Ctrl-C while the first manifest was read off a slow remote), a
    restore left the shared directory it was given empty, 0700, its mode noted; the rerun, into an empty
    target, so not in place, took it as it found it: it ended 0700, the note left on it."""
    from chunkvault.store import restore as restore_mod

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"data of " + name.encode())
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(tmp_path / "a"), str(tmp_path / "b")]).snapshot  # no root: the target keeps its mode
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o1777)

    def stopped(self, records):
        raise KeyboardInterrupt

    monkeypatch.setattr(restore_mod.Restorer, "restore_records", stopped)
    with pytest.raises(KeyboardInterrupt):
        repo.restore(snap, str(target), processes=1)
    monkeypatch.undo()
    assert os.listdir(target) == [] and os.stat(target).st_mode & 0o7777 == 0o700
    repo.restore(snap, str(target), processes=1)
    assert os.stat(target).st_mode & 0o7777 == 0o1777
    assert "user.chunkvault.restore-mode" not in os.listxattr(target)


def test_cli_in_place_needs_confirmation(snapshot_of_tree, cli, tmp_path):
    repo, snap, src, expected = snapshot_of_tree
    damage(src, random.Random(3))
    r = str(tmp_path / "repo")
    err = cli("restore", "-r", r, snap.id, "--target", str(src), "--delta", check=16).stderr.decode()
    assert "--confirm RESTORE" in err
    assert cli("restore", "-r", r, snap.id, "--target", str(src), "--confirm", "yes", check=2).returncode == 2
    out = json.loads(cli("restore", "-r", r, snap.id, "--target", str(src), "--confirm", "RESTORE", "--delta",
                         "--delete", "--json").stdout)
    assert out["deleted"] == 1 and out["unchanged_files"] >= 4
    assert describe(src) == expected


def test_read_ahead_is_counted_in_bytes_whatever_the_chunk_size():
    """1 MiB chunks (files cut at fixed offsets) and 64 KiB ones keep the same bytes in flight."""
    import threading

    from chunkvault.store.manifest import T_FILE, Entry, entry_record
    from chunkvault.store.restore import _Prefetcher

    class Source:
        def __init__(self):
            self.lock = threading.Lock()
            self.calls: list[int] = []
            self.pending = 0  # blobs requested and not yet consumed
            self.most = 0

        def read_blobs(self, ids):
            with self.lock:
                self.calls.append(len(ids))
                self.pending += len(ids)
                self.most = max(self.most, self.pending)
            return [b"x"] * len(ids)

    for chunk, count in ((1 << 20, 96), (64 << 10, 1536)):
        src = Source()
        records = [entry_record(Entry(path=b"f%d" % i, type=T_FILE, size=chunk * 8,
                                      chunks=bytes(256))) for i in range(count // 8)]
        pf = _Prefetcher(src, iter(records), window_bytes=16 << 20)
        got = 0
        while pf.next_record() is not None:
            pass
        while got < count:
            pf.next_chunk()
            with src.lock:
                src.pending -= 1
            got += 1
        pf.close()
        assert sum(src.calls) == count
        assert max(src.calls) * chunk <= _Prefetcher.BATCH_BYTES
        assert src.most * chunk <= (16 << 20) + 2 * _Prefetcher.BATCH_BYTES


@pytest.mark.parametrize("processes", [1, 2])
def test_files_of_one_chunk_are_written_a_run_at_a_time(tmp_path, new_repo, monkeypatch, processes):
    """Small files across directories go through ``write_small_files`` in runs of several, bounded by
    RUN_FILES; larger files, links and directories do not; the tree restores exactly (directories'
    times set after their files)."""
    from chunkvault.store import restore as restore_module, writefiles

    rnd = random.Random(5)
    src = tmp_path / "src"
    for d in range(3):
        for i in range(150):
            path = src / f"d{d}" / f"sub{i % 4}" / f"f{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rnd.randbytes(rnd.randrange(0, 5000)))
    (src / "d1" / "large").write_bytes(rnd.randbytes(3 << 20))
    (src / "d1" / "zeros").write_bytes(bytes(100_000))
    (src / "d2" / "link").symlink_to("sub0/f0")
    os.link(src / "d0" / "sub1" / "f1", src / "d2" / "hard")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    log = tmp_path / "runs"  # worker processes write here too
    real = writefiles.write_small_files

    def counted(files, owners):
        with open(log, "a") as f:
            f.write(" ".join(os.fsdecode(file[1]) for file in files) + "\n")
        return real(files, owners)
    monkeypatch.setattr(writefiles, "write_small_files", counted)
    monkeypatch.setattr(restore_module, "RUN_FILES", 100)
    for thread in loud_threads():  # one an earlier test left ending: a restore forks beside none
        thread.join(10)
    assert repo.restore("latest", str(tmp_path / "out"), processes=processes).processes == processes, \
        f"not forked: other threads run ({loud_threads()}; a connection an earlier test left open?)"
    assert describe(tmp_path / "out") == describe(src)
    runs = [line.split() for line in log.read_text().splitlines()]
    written = [name for run in runs for name in run]
    assert sorted(written) == sorted([f"f{i}" for i in range(150)] * 3 + ["zeros"])
    # One process writes a directory's files in a run (its time is set when it is left: 37 or 38 each); workers make
    # no directories, so their runs span them.
    assert max(map(len, runs)) == (38 if processes == 1 else 100)


def _selected_model(path: bytes, includes: list[str], excludes: list[str]) -> bool:
    """The selection rule spelled out: a glob matches the path, its base name, or any ancestor; a glob led
    by ``./`` or ending in ``/`` is the glob without them."""
    def plain(g: str) -> str:
        while g.startswith("./"):
            g = g[2:].lstrip("/")
        return g.rstrip("/") or g

    includes, excludes = [plain(g) for g in includes], [plain(g) for g in excludes]

    def matches(p: str, globs: list[str]) -> bool:
        parts = p.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[:i]), g) or fnmatch.fnmatchcase(parts[i - 1], g)
                   for i in range(len(parts), 0, -1) for g in globs)

    s = os.fsdecode(path)
    if includes and not (path == b"" or matches(s, includes)):
        return False
    return not (excludes and path != b"" and matches(s, excludes))


_segment = st.text("ab.", min_size=1, max_size=3)
_glob = st.lists(st.sampled_from(["a", "b", ".", "*", "?", "[ab]", "/", "**"]), min_size=1, max_size=5).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_segment, min_size=1, max_size=4).map("/".join), max_size=30),
       st.lists(_glob, max_size=3), st.lists(_glob, max_size=3))
def test_selection_matches_the_rule(paths, includes, excludes):
    sel = Selection(includes, excludes)
    for p in sorted(set(paths)) + [""]:
        path = p.encode()
        assert sel(path) == _selected_model(path, includes, excludes), (p, includes, excludes)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_segment, min_size=1, max_size=4).map("/".join), max_size=30),
       st.lists(_glob, min_size=1, max_size=3), st.sampled_from(["a/", "a/b/", "b/.", ""]))
def test_a_selection_s_directory_holds_every_path_it_selects(paths, includes, lead):
    """A restore reads only the part of the tree below ``Selection.directory``: nothing selected may lie
    elsewhere (globs led by a literal directory, as `--include base/16384/*` is, give one)."""
    includes = [lead + g for g in includes]
    sel = Selection(includes, [])
    if sel.directory is None:
        return
    below = sel.directory + b"/"
    for p in set(paths) | {lead + p for p in paths}:
        path = p.encode()
        if sel(path):
            assert path == sel.directory or path.startswith(below), (p, includes, sel.directory)


def test_an_include_that_matches_nothing_is_a_warning(snapshot_of_tree, tmp_path):
    repo, snap, src, _ = snapshot_of_tree
    for n, processes in enumerate([1, 2]):
        res = repo.restore(snap, str(tmp_path / f"none{n}"), includes=[str(src / "small")], processes=processes)
        assert res.files == 0 and res.warnings == [
            f"nothing matched the includes {src / 'small'}: includes are paths as `ls` lists them, relative to the "
            "snapshot's root (without the leading /)"]
    res = repo.restore(snap, str(tmp_path / "some"), includes=["small", "nothing"], processes=2)
    assert res.files == 1 and res.warnings == []
    res = repo.restore(snap, str(tmp_path / "dir"), includes=["base"], excludes=["rel*"])
    assert (res.files, res.dirs, res.warnings) == (0, 2, [])  # the root and base: a directory matched
    res = repo.restore(snap, str(tmp_path / "completed"), includes=["./small/"])  # as a shell completes it
    assert res.files == 1 and res.warnings == []


def test_selection_directories():
    def directory(*includes):
        return Selection(list(includes), []).directory

    assert directory("base/16384/2619") == b"base/16384/2619"
    assert directory("base/16384/*") == directory("base/16384/[0-9]*") == b"base/16384"
    assert directory("base/163*") == directory("base/16384/1", "base/1/2") == b"base"
    assert directory("pg_hba.conf") is directory("*/x") is directory("a/b", "c/d") is directory("/abs") is None


def test_in_place_restore_does_not_write_through_a_symbolic_link_out_of_the_target(tmp_path, new_repo):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x").write_bytes(b"restored")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    os.symlink(outside, target / "a")  # planted where the snapshot has a directory it is not asked to restore
    with pytest.raises(ChunkvaultError, match="symbolic link in the target"):
        repo.restore("latest", str(target), includes=["a/x"], force=True)
    assert list(outside.iterdir()) == []
    inside = tmp_path / "target2"
    (inside / "b").mkdir(parents=True)
    os.symlink("b", inside / "a")  # a link that stays inside the target is followed, as before
    repo.restore("latest", str(inside), includes=["a/x"], force=True)
    assert (inside / "b" / "x").read_bytes() == b"restored"


def test_restore_verify_reads_back_what_it_wrote(tmp_path, new_repo, monkeypatch):
    """--verify compares every restored file and entry with the snapshot; something that changes the
    target under the restore (a second writer, a disk that lies) is named, with exit code 18 on the CLI."""
    from chunkvault.errors import VerificationFailed
    from chunkvault.store import restore_workers

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}").write_bytes(os.urandom(3000 + i))
    (src / "skipped.tmp").write_bytes(b"not restored")
    repo = new_repo()
    repo.backup([str(src)])
    result = repo.restore("latest", str(tmp_path / "a"), excludes=["*.tmp"], verify=True)
    assert result.files == 5
    (tmp_path / "a" / "d" / "mine").write_bytes(b"the target's own")  # in place: not the restore's business
    repo.restore("latest", str(tmp_path / "a"), force=True, verify=True)
    real = restore_workers.restore

    def meddled(restorer, tree, processes, *counts):
        done = real(restorer, tree, processes, *counts)
        victim = os.path.join(restorer.target, b"d", b"f3")
        with open(victim, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        os.utime(victim, ns=(0, 0))
        return done

    monkeypatch.setattr(restore_workers, "restore", meddled)
    with pytest.raises(VerificationFailed, match=r"2 difference\(s\) from snapshot .*(content|mtime) d/f3") as info:
        repo.restore("latest", str(tmp_path / "b"), verify=True)
    assert "skipped.tmp" not in str(info.value)
    repo.restore("latest", str(tmp_path / "c"))  # without --verify nothing is read back


def test_restore_verify_onto_a_file_system_of_whole_seconds_counts_no_finer_difference(tmp_path, new_repo):
    """A target that keeps times in whole seconds (ext4 with small inodes) cuts every restored time's
    fraction: not a difference --verify may count (it failed every such restore), while a time it truly
    could not keep (past 2038 there) still is one, and a restore says so (it clamped it silently)."""
    from chunkvault.errors import VerificationFailed
    from chunkvault.verify import compare_tree, time_step
    from treeutil import mounted_ext4_whole_seconds

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(100 + i))
        os.utime(src / f"f{i}", ns=(1_700_000_000_123_456_789 + i, 1_700_000_000_987_654_321 + i))
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    target.mkdir()
    with mounted_ext4_whole_seconds(str(target)):
        assert time_step(os.fsencode(target)) == 1_000_000_000
        assert repo.restore("latest", str(target / "a"), verify=True).files == 3
        tree = repo.tree("latest")
        compared = compare_tree(tree, str(target / "a"))
        assert compared.mismatch_count == 0 and any("keeps times to 1 s" in w for w in compared.warnings)
        os.utime(src / "f1", ns=(1_700_000_000, 4_102_444_800_000_000_000))  # 2100: past what it keeps
        repo.backup([str(src)])
        with pytest.raises(VerificationFailed, match=r"1 difference\(s\) .*mtime f1"):
            repo.restore("latest", str(target / "b"), verify=True)
        said = repo.restore("latest", str(target / "c")).warnings
        assert [w for w in said if "kept a time" in w] == [
            "1 entry kept a time the target's file system cannot hold, set to the nearest it holds: f1 (recorded "
            "2100-01-01 00:00:00 UTC, now 2038-01-19 03:14:07 UTC)"]
    assert not [w for w in repo.restore("latest", str(tmp_path / "d")).warnings if "kept a time" in w]
    assert time_step(os.fsencode(tmp_path)) == 1


def test_far_times_restored_by_worker_processes_narrowed_by_includes_are_counted_once(tmp_path, new_repo):
    """Worker processes walk a tree narrowed by includes twice (for the bytes it selects, then to restore it):
    each time the target could not hold was counted at both walks ("2 entries" for one)."""
    from treeutil import mounted_ext4_whole_seconds

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(3):
        (src / "a" / f"f{i}").write_bytes(os.urandom(1000 + i))
    os.utime(src / "a" / "f1", ns=(1_700_000_000, 4_102_444_800_000_000_000))  # 2100: past 2038
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    target.mkdir()
    with mounted_ext4_whole_seconds(str(target)):
        result = repo.restore("latest", str(target / "t"), includes=["a"], processes=2)
    assert result.processes == 2
    assert [w for w in result.warnings if "kept a time" in w] == [
        "1 entry kept a time the target's file system cannot hold, set to the nearest it holds: a/f1 (recorded "
        "2100-01-01 00:00:00 UTC, now 2038-01-19 03:14:07 UTC)"]


def test_a_far_time_the_restore_did_not_write_is_not_said_to_be_lost(tmp_path, new_repo):
    """An entry --overwrite never kept as the target had it was looked at for the time it was to get: its own
    (the target's file's) was taken for the file system's clamp, on a file system that holds every time."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"recorded")
    os.utime(src / "f", ns=(1_700_000_000, 4_102_444_800_000_000_000))  # 2100
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    repo.restore("latest", str(target))
    (target / "f").write_bytes(b"changed here")
    for overwrite in ("never", "if-newer"):
        os.utime(target / "f", ns=(1_700_000_000, 4_133_980_800_000_000_000))  # 2101: newer, kept
        result = repo.restore("latest", str(target), force=True, overwrite=overwrite)
        assert result.skipped_existing == 1
        assert not [w for w in result.warnings if "kept a time" in w], overwrite
    assert (target / "f").read_bytes() == b"changed here"


def test_restore_verify_on_the_command_line(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(src))
    out = cli("restore", "-r", repo, "latest", "-t", str(tmp_path / "out"), "--verify").stdout.decode()
    assert "read back and verified" in out
    said = cli("restore", "-t", str(tmp_path / "x"), "--from-file", str(tmp_path / "none.backup"), "--verify",
               check=2).stderr.decode()
    assert "--verify needs a repository" in said
    said = cli("restore", "-r", repo, "-t", str(tmp_path / "x"), "--from-file", str(tmp_path / "none.backup"),
               check=2).stderr.decode()
    assert "give no -r/--repo" in said
    said = cli("restore", "-t", str(tmp_path / "x"), "--from-file", str(tmp_path / "none.backup"), "--processes",
               "2", check=2).stderr.decode()
    assert "runs in one" in said and not (tmp_path / "x").exists()


def test_delta_keeps_a_sparse_file_sparse(tmp_path, new_repo):
    """--delta over a partial copy of a sparse image (as it finishes an interrupted restore): the zero
    chunks it lacks become holes, inside the old length (punched) and past it, not written zeros."""
    src = tmp_path / "src"
    src.mkdir()
    image = src / "image"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
        for at in (0, 40 << 20):
            f.seek(at)
            f.write(os.urandom(100_000))
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    target = tmp_path / "target"
    target.mkdir()
    with open(target / "image", "wb") as f:  # what a restore cut short may leave: data in place of a hole
        f.write(random.Random(3).randbytes(24 << 20))
    repo.restore(snap, str(target), force=True, delta=True)
    assert (target / "image").read_bytes() == image.read_bytes()
    repo.restore(snap, str(tmp_path / "fresh"))
    fresh = os.stat(tmp_path / "fresh" / "image").st_blocks
    assert fresh < 16384 and os.stat(target / "image").st_blocks <= fresh + 256  # as sparse as a fresh restore


@pytest.mark.parametrize("mode", ["into an empty target", "--delta over data"])
def test_blocks_of_zeros_inside_chunks_are_holes(tmp_path, new_repo, mode):
    """Every 4096-byte block of zeros is left a hole, not only a chunk all zeros: restored into an empty
    target (one process), or with --delta over files holding data where the holes go (punched)."""
    src = tmp_path / "src"
    src.mkdir()
    make_holes_inside_chunks(src)
    if not makes_holes(tmp_path):
        pytest.skip("this file system makes no holes")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    target = tmp_path / "target"
    target.mkdir()
    if mode == "--delta over data":
        rnd = random.Random(4)
        for name in HOLE_FILES:
            (target / name).write_bytes(rnd.randbytes(os.path.getsize(src / name)))
        result = repo.restore(snap, str(target), force=True, delta=True)
        assert result.unchanged_files == 0
        # a block of zeros two chunks meet inside is punched too, as a restore anew leaves it a hole
        assert_holes_kept(target, src, slack=4 * 4096)
    else:
        repo.restore(snap, str(target), processes=1)
        assert_holes_kept(target, src, slack=4 * 4096)


def test_an_in_place_delta_restore_separates_files_the_target_has_linked(tmp_path, new_repo):
    """The target holds two names of one file, the snapshot two separate files with the same content and
    metadata: the restore left them linked (exit 0), so a write to one changed the other."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello\n")
    os.link(src / "a", src / "b")
    repo = new_repo()
    linked = repo.backup([str(src)]).snapshot
    shutil.copy2(src / "a", src / "b.tmp")  # the link broken: same content and times
    os.replace(src / "b.tmp", src / "b")
    separate = repo.backup([str(src)]).snapshot
    target = tmp_path / "target"
    repo.restore(linked.id, str(target))
    assert os.stat(target / "a").st_ino == os.stat(target / "b").st_ino
    repo.restore(separate.id, str(target), force=True, delta=True, delete=True, verify=True)
    assert os.stat(target / "a").st_ino != os.stat(target / "b").st_ino
    repo.restore(linked.id, str(target), force=True, delta=True, delete=True, verify=True)  # and back
    assert os.stat(target / "a").st_ino == os.stat(target / "b").st_ino


def test_an_in_place_restore_leaves_a_file_as_it_was_when_the_snapshot_s_copy_is_damaged(tmp_path, new_repo,
                                                                                         password):
    """Over a target's file, the snapshot's version is written beside it and renamed over it once whole:
    damaged data (or a full disk) no longer costs the target the file it had."""
    from chunkvault import Repository
    from chunkvault.errors import CorruptObject
    from test_damaged_storage import damage_blob

    src = tmp_path / "src"
    src.mkdir()
    old = os.urandom(300_000)
    (src / "db").write_bytes(old)
    (src / "other").write_text("v1")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    live = tmp_path / "live"
    shutil.copytree(src, live)
    (src / "db").write_bytes(os.urandom(300_000))
    (src / "other").write_text("v2")
    snap = repo.backup([str(src)]).snapshot
    (entry,) = [e for e in repo.tree(snap) if e.path == b"db"]
    damage_blob(tmp_path / "repo", repo, entry.chunk_ids()[0])
    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(CorruptObject, match="db"):
        repo.restore(snap.id, str(live), force=True)
    assert (live / "db").read_bytes() == old and (live / "other").read_text() == "v2"
    assert sorted(p.name for p in live.iterdir()) == ["db", "other"]  # no temporary file left


@pytest.mark.parametrize("window", [None, 1])  # bytes held back: as set, or none
def test_a_delta_restore_leaves_a_file_as_it_was_when_damage_shows_before_its_first_write(
        tmp_path, new_repo, password, monkeypatch, window):
    """--delta holds a file's changed ranges until every one is read and the whole checked: a damaged
    chunk found among them leaves the target's file as it was (it was removed).  Changes larger than what
    is held back are written as they come: such a file, half-updated, is still removed."""
    from chunkvault import Repository
    from chunkvault.errors import CorruptObject
    from chunkvault.store import restore
    from test_damaged_storage import damage_blob

    if window is not None:
        monkeypatch.setattr(restore, "DELTA_HOLD_BYTES", window)
    rnd = random.Random(3)
    src = tmp_path / "src"
    src.mkdir()
    old = bytearray(rnd.randbytes(8 * 65536))
    (src / "db").write_bytes(old)
    (src / "other").write_text("v1")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)], fixed_chunks=["db"], fixed_chunk_size=65536)
    live = tmp_path / "live"
    shutil.copytree(src, live)
    new = bytearray(old)
    for chunk in (1, 4, 6):  # the damaged one comes after a changed one
        new[chunk * 65536 + 100 : chunk * 65536 + 164] = rnd.randbytes(64)
    (src / "db").write_bytes(new)
    (src / "other").write_text("v2")
    snap = repo.backup([str(src)], fixed_chunks=["db"], fixed_chunk_size=65536).snapshot
    (entry,) = [e for e in repo.tree(snap) if e.path == b"db"]
    damage_blob(tmp_path / "repo", repo, entry.chunk_ids()[4])
    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(CorruptObject, match="db"):
        repo.restore(snap.id, str(live), force=True, delta=True, processes=1)
    assert (live / "other").read_text() == "v2"
    if window is None:
        assert (live / "db").read_bytes() == old
    else:
        assert not (live / "db").exists()
    assert sorted(p.name for p in live.iterdir()) == (["db", "other"] if window is None else ["other"])


@pytest.mark.parametrize("processes", [1, 2])
def test_a_delta_restore_that_removes_a_half_updated_file_says_so(tmp_path, new_repo, password, monkeypatch,
                                                                  processes):
    """A file --delta had begun to rewrite when damaged data showed (a delta whose base is damaged) is removed
    from the target: the error and the JSON say so, where "not restored" alone read as kept as it was."""
    from chunkvault import Repository
    from chunkvault.cli import _restore_json
    from chunkvault.errors import CorruptObject
    from chunkvault.store import restore
    from test_damaged_storage import damage_blob

    monkeypatch.setattr(restore, "DELTA_HOLD_BYTES", 1)  # every changed chunk written as it comes
    rnd = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    old = bytearray(rnd.randbytes(8 * 65536))
    (src / "db").write_bytes(old)
    (src / "kept").write_text("v1")
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)], fixed_chunks=["db"], fixed_chunk_size=65536).snapshot
    live = tmp_path / "live"
    shutil.copytree(src, live)
    (live / "kept").write_text("mine")
    new = bytearray(old)
    for chunk in (1, 4, 6):
        new[chunk * 65536 + 100 : chunk * 65536 + 164] = rnd.randbytes(64)
    (src / "db").write_bytes(new)
    snap = repo.backup([str(src)], fixed_chunks=["db"], fixed_chunk_size=65536).snapshot
    (entry,) = [e for e in repo.tree(snap) if e.path == b"db"]
    delta = entry.chunk_ids()[6]
    base = repo.store.delta_base(delta)
    assert base == [e for e in repo.tree(first) if e.path == b"db"][0].chunk_ids()[6]
    damage_blob(tmp_path / "repo", repo, base)
    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(CorruptObject) as caught:
        repo.restore(snap.id, str(live), force=True, delta=True, processes=processes)
    said = str(caught.value)
    assert delta.hex() in said and base.hex() in said
    assert ("1 file(s) not restored: db (1 of them removed from the target, updated in place before the damage "
            "showed, so holding neither their old content nor the snapshot's: db)") in said
    assert sorted(p.name for p in live.iterdir()) == ["kept"] and (live / "kept").read_text() == "v1"
    (out,) = _restore_json(snap, caught.value.partial, str(live), False)["not_restored"]
    assert out["path"] == "db" and out["removed"] is True


def test_the_restore_prompt_declined_is_a_target_not_empty(tmp_path, new_repo):
    """On a terminal, a restore into a non-empty target asks for RESTORE: any other answer is refused as
    without a terminal (exit 16, the target as it was), not as a usage error."""
    from conftest import PASSWORD
    from treeutil import on_terminal

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("snapshot")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("mine")
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    for answer, code, content in ((b"no\n", 16, "mine"), (b"RESTORE\n", 0, "snapshot")):
        proc, said = on_terminal(["restore", "latest", "-r", repo.store.remote.display_url, "--target", str(target)],
                                 env, typed=answer)
        assert proc.returncode == code, said
        assert b"Type RESTORE to continue" in said and (target / "f").read_text() == content
        assert f"restoring snapshot {snap.short_id} of {snap.host}:{src} (".encode() in said  # which one overwrites it


def test_a_delta_restore_stopped_mid_file_leaves_it_for_the_rerun(tmp_path, new_repo, monkeypatch):
    """Ctrl-C or SIGTERM after a file's changes began to be written (more than is held back) leaves that
    file as it is, not removed: a rerun with --delta finishes it, rewriting only what still differs."""
    from chunkvault.store import restore
    from chunkvault.store.repository import Repo

    rnd = random.Random(4)
    src = tmp_path / "src"
    src.mkdir()
    old = bytearray(rnd.randbytes(8 * 65536))
    (src / "db").write_bytes(old)
    repo = new_repo()
    repo.backup([str(src)], fixed_chunks=["db"], fixed_chunk_size=65536)
    live = tmp_path / "live"
    shutil.copytree(src, live)
    new = bytearray(old)
    for chunk in range(8):
        new[chunk * 65536 + 10 : chunk * 65536 + 20] = rnd.randbytes(10)
    (src / "db").write_bytes(new)
    snap = repo.backup([str(src)], fixed_chunks=["db"], fixed_chunk_size=65536).snapshot
    monkeypatch.setattr(restore, "DELTA_HOLD_BYTES", 1)  # every changed chunk written as it comes
    real = Repo.read_blob
    reads = []

    def stop_at_the_fourth(self, blob_id, **kw):
        reads.append(blob_id)
        if len(reads) == 4:
            raise KeyboardInterrupt
        return real(self, blob_id, **kw)

    monkeypatch.setattr(Repo, "read_blob", stop_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        repo.restore(snap.id, str(live), force=True, delta=True, processes=1)
    monkeypatch.setattr(Repo, "read_blob", real)
    half = (live / "db").read_bytes()
    done = sum(half[k : k + 65536] == new[k : k + 65536] for k in range(0, len(new), 65536))
    assert 0 < done < 8 and all(half[k : k + 65536] in (old[k : k + 65536], new[k : k + 65536])
                                for k in range(0, len(new), 65536))
    result = repo.restore(snap.id, str(live), force=True, delta=True, processes=1)
    assert (live / "db").read_bytes() == new and result.rewritten_bytes == (8 - done) * 65536


@pytest.mark.parametrize("delta", [False, True])
def test_a_rerun_removes_what_a_restore_killed_outright_was_writing_beside_a_file(tmp_path, new_repo, password,
                                                                               monkeypatch, delta):
    """A restore killed (kill -9, power loss) between writing a file's replacement and renaming it over
    the file leaves the replacement under a temporary name: a rerun in place removes it, with a warning.
    One changed since the rerun began (another restore's, being written, or one killed just before) stays,
    named, and so do other names, unnamed."""
    import subprocess
    import sys
    import time
    from chunkvault.store import restore

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"snapshot's content " * 1000)
    (src / "g").write_bytes(b"another file")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    live = tmp_path / "live"
    shutil.copytree(src, live)
    (live / "d" / "f").write_bytes(b"changed since")
    killed = textwrap.dedent(f"""
        import os
        from chunkvault.store import restore
        from chunkvault.repository import Repository
        real = restore.Restorer._write_file
        def whole_then_killed(self, rel, e, chunks):
            real(self, rel, e, chunks)
            if b".chunkvault-restore-" in rel:
                os._exit(9)
        restore.Restorer._write_file = whole_then_killed
        Repository.open({str(tmp_path / "repo")!r}, {password!r}).restore({snap.id!r}, {str(live)!r}, force=True)
    """)
    assert subprocess.run([sys.executable, "-c", killed]).returncode == 9
    left = [n for n in os.listdir(live / "d") if n.startswith(".chunkvault-restore-")]
    assert len(left) == 1 and (live / "d" / left[0]).read_bytes() == b"snapshot's content " * 1000
    assert (live / "d" / "f").read_bytes() == b"changed since"
    (live / "d" / ".chunkvault-restore-notours").write_bytes(b"not a name a restore writes")
    (live / ".chunkvault-restore-0123456789abcdef").mkdir()
    time.sleep(0.5)  # the leftovers above are older than the slack; one written after the restore began is not
    monkeypatch.setattr(restore, "LEFTOVER_SLACK_NS", 250_000_000)
    fresh = live / ".chunkvault-restore-fedcba9876543210"
    real_init = restore.Restorer.__init__

    def another_restore_writing(self, *args, **kwargs):  # one changed after this restore began
        real_init(self, *args, **kwargs)
        fresh.write_bytes(b"being written by a restore running beside")

    monkeypatch.setattr(restore.Restorer, "__init__", another_restore_writing)
    result = repo.restore(snap.id, str(live), force=True, delta=delta)
    assert sorted(os.listdir(live / "d")) == [".chunkvault-restore-notours", "f"]
    assert (live / "d" / "f").read_bytes() == b"snapshot's content " * 1000
    assert fresh.read_bytes() == b"being written by a restore running beside"
    assert (live / ".chunkvault-restore-0123456789abcdef").is_dir()
    assert result.warnings == [f"{fresh.name}, a restore's file written beside the one it replaces, was kept: "
                               "changed as this restore began, it may be another's running now; a rerun once "
                               "none runs removes it",
                               f"d/{left[0]}, left by an interrupted restore, was removed"]


def test_set_id_and_sticky_bits_a_fat_disk_refuses_leave_the_entries_restored(tmp_path, new_repo):
    """exFAT and FAT refuse a chmod to a mode with a set-user-ID, set-group-ID or sticky bit (EPERM, to root
    too): a restore onto a USB disk left such a file out, its data with it ('could not be written: Operation
    not permitted'), and its hard links, and counted such a directory not restored.  They are restored, with
    the rest of their mode and a warning each."""
    from treeutil import mounted_fat

    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    (src / "tmp").mkdir()
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.link(src / "tool", src / "tool-link")
    (src / "shared" / "f").write_bytes(b"data")
    (src / "plain").write_bytes(b"plain")
    os.chmod(src / "tool", 0o4755)
    os.chmod(src / "shared", 0o2775)
    os.chmod(src / "tmp", 0o1777)
    repo = new_repo()
    repo.backup([str(src)])
    mnt = tmp_path / "usb"
    mnt.mkdir()
    with mounted_fat(str(mnt), "exfat"):
        from chunkvault.errors import TargetUnwritable

        with pytest.raises(TargetUnwritable) as info:  # the hard link alone: exFAT has none
            repo.restore("latest", str(mnt / "t"))
        result = info.value.partial
        assert [path for path, _ in result.unwritten] == ["tool-link"], (result.unwritten, result.warnings)
        assert (mnt / "t" / "tool").read_bytes() == b"#!/bin/sh\n"
        assert (mnt / "t" / "shared" / "f").read_bytes() == b"data" and (mnt / "t" / "tmp").is_dir()
        refused = sorted(w.split(":")[0] for w in result.warnings if "refused mode" in w)
        assert refused == ["shared", "tmp", "tool"]
        assert "restored as 0755, without its set-user-ID" in " ".join(result.warnings)
        assert result.files == 3 and result.dirs == 3


@pytest.mark.parametrize("processes", [1, 2])
def test_extended_attributes_a_file_system_lacks_are_one_warning_not_one_per_entry(tmp_path, new_repo, processes):
    """A restore onto exFAT (or a mount without user attributes or ACLs) warned 'cannot set extended
    attributes of PATH: user.k: Operation not supported' once per entry: a line per file of a large tree.
    It is one warning, with how many entries, the attributes' names and the first few paths; an attribute
    refused for another reason is still named with its entry."""
    from treeutil import mounted_fat

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02}").write_bytes(os.urandom(100))
        try:
            os.setxattr(src / f"f{i:02}", "user.k", b"v")
        except OSError as exc:
            pytest.skip(f"no user extended attributes here: {exc}")
    repo = new_repo()
    repo.backup([str(src)])
    mnt = tmp_path / "usb"
    mnt.mkdir()
    with mounted_fat(str(mnt), "exfat"):
        result = repo.restore("latest", str(mnt / "t"), processes=processes)
        assert result.files == 40 and (mnt / "t" / "f39").read_bytes() == (src / "f39").read_bytes()
        said = [w for w in result.warnings if "extended attributes" in w]
        assert len(said) == 1 and re.fullmatch(r"extended attributes not set on 40 entries: the target's file "
                                               r"system does not support them \(user\.k\): (f\d\d, ){4}f\d\d and "
                                               r"35 more", said[0]), said


def test_in_place_names_a_file_system_takes_for_one_another_do_not_replace_each_other(tmp_path, new_repo):
    """exFAT and FAT compare names without case: restored in place, "makefile" replaced the "Makefile" just
    restored, whose content was lost with exit 0 ('2 files' restored, one left).  The second is not
    written, and named; where names keep their case both are restored, fresh or in place."""
    from chunkvault.errors import TargetUnwritable
    from treeutil import mounted_fat

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "Makefile").write_bytes(b"UPPER")
    (src / "d" / "makefile").write_bytes(b"lower")
    repo = new_repo()
    repo.backup([str(src)])
    for how in ({}, {"force": True}, {"force": True, "delta": True}):
        repo.restore("latest", str(tmp_path / "ext"), **how)
        assert sorted(os.listdir(tmp_path / "ext" / "d")) == ["Makefile", "makefile"]
        assert (tmp_path / "ext" / "d" / "makefile").read_bytes() == b"lower"
    mnt = tmp_path / "usb"
    mnt.mkdir()
    with mounted_fat(str(mnt), "exfat"):
        for how in ({}, {"force": True}, {"force": True, "delta": True}):
            with pytest.raises(TargetUnwritable, match="d/makefile") as info:
                repo.restore("latest", str(mnt / "t"), **how)
            assert [p for p, _ in info.value.partial.unwritten] == ["d/makefile"], how
            assert os.listdir(mnt / "t" / "d") == ["Makefile"]
            assert (mnt / "t" / "d" / "Makefile").read_bytes() == b"UPPER", how


@pytest.mark.parametrize("processes", [1, 2])
def test_directories_whose_names_differ_in_case_alone_are_not_merged_into_a_fresh_target(tmp_path, new_repo,
                                                                                       processes):
    """Into an empty exFAT target, mkdir of "doc" after "Doc" found a directory there and took it for its
    own: the entries of "doc" went into "Doc", and the restore ended with exit 0.  "doc" is named, not
    restored (exit 14), and no worker process writes its files into "Doc" either."""
    from chunkvault.errors import TargetUnwritable
    from treeutil import mounted_fat

    src = tmp_path / "src"
    (src / "Doc").mkdir(parents=True)
    (src / "Doc" / "a").write_bytes(b"A")
    (src / "doc").mkdir()
    (src / "doc" / "b").write_bytes(b"B")
    repo = new_repo()
    repo.backup([str(src)])
    mnt = tmp_path / "usb"
    mnt.mkdir()
    with mounted_fat(str(mnt), "exfat"):
        with pytest.raises(TargetUnwritable, match="doc") as info:
            repo.restore("latest", str(mnt / "t"), processes=processes)
        assert "doc" in [p for p, _ in info.value.partial.unwritten]
        assert os.listdir(mnt / "t") == ["Doc"]
        assert (mnt / "t" / "Doc" / "a").read_bytes() == b"A"
        # a worker writing doc/b made its directory by name and found "Doc" there: such a target is one process's
        assert os.listdir(mnt / "t" / "Doc") == ["a"]
        assert info.value.partial.processes == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_a_restore_that_fails_part_way_names_the_snapshot_in_its_partial_result(tmp_path, new_repo, processes):
    """The result an error carries (``partial``, what was restored) names the snapshot ``latest`` or
    ``until`` picked, as the result of a restore that succeeds does: it was left blank, and a caller that
    restored by time could not say which snapshot the target partly holds."""
    from chunkvault.errors import TargetUnwritable
    from treeutil import mounted_fat

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one")
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    os.link(src / "f", src / "f-link")
    repo.backup([str(src)])
    mnt = tmp_path / "usb"
    mnt.mkdir()
    with mounted_fat(str(mnt), "exfat"):
        assert repo.restore("latest", str(mnt / "then"), until=first.time, processes=processes).snapshot == first.id
        with pytest.raises(TargetUnwritable) as info:  # the hard link: exFAT has none
            repo.restore("latest", str(mnt / "now"), processes=processes)
        assert info.value.partial.snapshot == repo.snapshot("latest").id


def test_a_restore_by_workers_that_fails_part_way_names_the_snapshot_in_its_partial_result(tmp_path, new_repo):
    """As above, where worker processes restore: a target that folds case runs in one process, so the test
    above takes the one-process path with ``processes=2`` too.  Here a damaged blob fails one file."""
    from chunkvault.errors import ChunkvaultError

    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    for i in range(4):
        (src / f"f{i}").write_bytes(rnd.randbytes(50_000))
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    (pack,) = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "repo" / "data") for n in names]
    with open(pack, "r+b") as f:  # the first envelope's ciphertext
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ChunkvaultError) as info:
        repo.restore("latest", str(tmp_path / "out"), processes=2)
    assert info.value.partial.processes == 2
    assert info.value.partial.snapshot == snap.id
    assert len(info.value.partial.damaged) == 1
