"""Backup then restore gives back the same tree: bytes and metadata."""
import os
import shutil
import stat

import pytest

from chunkvault.errors import TargetNotEmpty, UsageError
from chunkvault.store.manifest import T_DIR
from treeutil import describe, settle


def make_rich_tree(root):
    os.makedirs(root / "dir" / "sub")
    os.makedirs(root / "empty-dir")
    (root / "empty-file").write_bytes(b"")
    (root / "small.txt").write_text("hello\n")
    (root / "dir" / "random.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "dir" / "sub" / "same.bin").write_bytes((root / "dir" / "random.bin").read_bytes())
    os.symlink("dir/random.bin", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "small.txt", root / "dir" / "hardlink.txt")
    os.mkfifo(root / "fifo")
    odd = os.fsencode(str(root)) + b"/bad-\xff\xfe-name\nwith newline"
    with open(odd, "wb") as f:
        f.write(b"non-utf8 name")
    with open(root / "sparse", "wb") as f:
        f.seek(40 * 1024 * 1024)
        f.write(b"end")
    os.chmod(root / "small.txt", 0o640)
    os.chmod(root / "dir" / "sub", 0o750)
    os.utime(root / "dir", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def make_numbered_files(root, rnd, dirs, per_dir, least, most):
    """Directories d0, d1, ... of files f00, f01, ... (as wide as ``per_dir`` needs) of random bytes,
    ``least`` to ``most`` - 1 of them each."""
    width = len(str(per_dir - 1))
    for d in range(dirs):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(per_dir):
            (root / f"d{d}" / f"f{i:0{width}}").write_bytes(rnd.randbytes(rnd.randrange(least, most)))


def test_roundtrip_all_entry_types(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    make_rich_tree(src)
    os.utime(src / "dir", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    repo = new_repo()
    result = repo.backup([str(src)])
    assert result.snapshot.kind == "full"
    assert not result.partial
    out = tmp_path / "out"
    restored = repo.restore("latest", str(out))
    assert describe(out) == describe(src)
    assert (restored.links, restored.specials) == (3, 1)  # two symbolic links and a hard link; the FIFO
    # sparse file came back sparse
    assert os.stat(out / "sparse").st_blocks * 512 < 1024 * 1024
    # hardlink came back as a hardlink
    assert os.stat(out / "small.txt").st_ino == os.stat(out / "dir" / "hardlink.txt").st_ino


def test_several_paths_land_under_their_full_paths(tmp_path, new_repo):
    """As restic and borg keep them: files that share a name fit (a list from find), a path given twice
    counts once, and a source inside another is left to it."""
    a, b = tmp_path / "alpha", tmp_path / "beta.txt"
    (a / "x").mkdir(parents=True)
    (a / "y").mkdir()
    (a / "f").write_bytes(b"x" * 1000)
    (a / "x" / "app.conf").write_text("x\n")
    (a / "y" / "app.conf").write_text("y\n")
    b.write_bytes(b"beta")
    repo = new_repo()
    snap = repo.backup([str(b), str(a), str(a / "f"), str(b)]).snapshot
    assert snap.paths == sorted([str(a), str(a / "f"), str(b)])
    rel = os.fsencode(str(tmp_path).lstrip("/"))
    paths = [e.path for e in repo.tree(snap)]
    assert paths == sorted(paths, key=lambda p: p.replace(b"/", b"\0")) and len(set(paths)) == len(paths)
    assert {rel + b"/beta.txt", rel + b"/alpha/f", rel + b"/alpha/x/app.conf"} <= set(paths)
    out = tmp_path / "out"
    repo.restore("latest", str(out))
    assert (out / str(a).lstrip("/") / "f").read_bytes() == b"x" * 1000
    assert (out / str(b).lstrip("/")).read_bytes() == b"beta"
    files = repo.backup([str(a / "x" / "app.conf"), str(a / "y" / "app.conf")]).snapshot
    parts = (rel + b"/alpha/x").split(b"/")
    ancestors = [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)] + [rel + b"/alpha/y"]
    assert [e.path for e in repo.tree(files)] == sorted(
        ancestors + [rel + b"/alpha/x/app.conf", rel + b"/alpha/y/app.conf"], key=lambda p: p.replace(b"/", b"\0"))
    assert all(e.type == T_DIR for e in repo.tree(files) if e.path in ancestors)


def test_the_directories_above_several_sources_are_restored_with_their_metadata(tmp_path, new_repo):
    """As restic records them: a restore gives them their recorded modes and times, not 0755 and now."""
    top = tmp_path / "top"
    (top / "mid" / "a").mkdir(parents=True)
    (top / "mid" / "b").mkdir()
    os.chmod(top / "mid", 0o710)
    os.utime(top / "mid", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    repo = new_repo()
    repo.backup([str(top / "mid" / "a"), str(top / "mid" / "b")])
    out = tmp_path / "out"
    repo.restore("latest", str(out))
    got = os.stat(out / str(top / "mid").lstrip("/"))
    assert (stat.S_IMODE(got.st_mode), got.st_mtime_ns) == (0o710, 1_500_000_000 * 10**9)


def test_a_source_that_is_a_symbolic_link_to_a_directory_is_stored_as_the_link_with_a_warning(tmp_path, new_repo):
    """A data directory moved to another disk and linked back (``/var/lib/db -> /data/db``) is saved as the
    link, as restic and borg keep it, trailing '/' or not: the backup says so, naming the directory to give
    instead, since the snapshot holds nothing of its tree.  A link to a file, or to nothing, is no surprise."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "table").write_bytes(b"rows")
    os.symlink("data", tmp_path / "db")
    os.symlink("data/table", tmp_path / "file-link")
    os.symlink("nowhere", tmp_path / "dangling")
    repo = new_repo()
    result = repo.backup([str(tmp_path / "db") + "/"])
    assert [(e.path, e.target) for e in repo.tree(result.snapshot)] == [(b"db", b"data")]
    assert result.warnings == [f"source path {tmp_path / 'db'} is a symbolic link to a directory (data): backed "
                               f"up as the link, not what the directory holds; name {tmp_path / 'data'} to back "
                               f"that up"]
    assert not result.partial
    quiet = repo.backup([str(tmp_path / "file-link"), str(tmp_path / "dangling")])
    assert not [w for w in quiet.warnings if "symbolic link" in w]


def test_a_source_that_does_not_exist_is_skipped_with_a_warning(tmp_path, new_repo):
    """As restic does: the others are saved and the backup is partial; the layout stays that of all the
    sources, so the next backup, with the path back, is laid out the same way."""
    a, b = tmp_path / "alpha", tmp_path / "beta"
    a.mkdir()
    (a / "f").write_bytes(b"alpha")
    b.mkdir()
    (b / "g").write_bytes(b"beta")
    repo = new_repo()
    rel = str(tmp_path).lstrip("/")
    first = repo.backup([str(a), str(b)]).snapshot
    shutil.rmtree(b)
    result = repo.backup([str(a), str(b)])
    assert result.partial and result.snapshot.kind == "diff"
    assert f"source path does not exist, skipped: {b}" in result.warnings
    assert result.snapshot.stats["unreadable"] == [f"{rel}/beta"]
    assert [e.path for e in repo.tree(result.snapshot)][-2:] == [os.fsencode(f"{rel}/alpha"), os.fsencode(f"{rel}/alpha/f")]
    assert result.snapshot.stats["deleted"] == 1  # beta/g (a directory is not counted)
    b.mkdir()
    (b / "g").write_bytes(b"beta")
    back = repo.backup([str(a), str(b)]).snapshot
    assert {e.path for e in repo.tree(back)} == {e.path for e in repo.tree(first)}
    with pytest.raises(UsageError, match="source path does not exist"):
        repo.backup([str(tmp_path / "nope")])
    with pytest.raises(UsageError, match="none of the 2 source paths exists"):
        repo.backup([str(tmp_path / "nope"), str(tmp_path / "nope2")])


def test_target_not_empty_refused_without_force(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo = new_repo()
    repo.backup([str(src)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "other").write_bytes(b"keep?")
    with pytest.raises(TargetNotEmpty):
        repo.restore("latest", str(out))
    repo.restore("latest", str(out), force=True)
    assert (out / "f").read_bytes() == b"data"


def test_unchanged_tree_writes_empty_differential(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    make_rich_tree(src)
    settle()
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    second = repo.backup([str(src)]).snapshot
    assert second.kind == "diff" and second.parent == first.id
    assert second.stats["manifest_records"] == 0
    assert second.stats["added_blobs"] == 0
    assert second.stats["read_bytes"] == 0  # nothing was read: skipped by metadata
    out = tmp_path / "out"
    repo.restore(second.id, str(out))
    assert describe(out) == describe(src)


def test_added_data_counts_the_files_not_the_manifest(tmp_path, new_repo):
    """The new manifest blobs are the snapshot's own bookkeeping (``manifest_bytes``), not new data: a
    differential that adds one 3-byte file reports 3 bytes added, in one blob."""
    src = tmp_path / "src"
    src.mkdir()
    make_rich_tree(src)
    repo = new_repo()
    repo.backup([str(src)])
    (src / "new.txt").write_bytes(b"abc")
    st = repo.backup([str(src)]).snapshot.stats
    assert (st["added_blobs"], st["added_raw_bytes"], st["manifest_records"]) == (1, 3, 2)  # the file, its dir
    assert st["manifest_bytes"] > 0 and st["added_stored_bytes"] < 200


def test_known_chunks_are_not_stored_twice(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(5 * 1024 * 1024)
    (src / "a").write_bytes(blob)
    repo = new_repo()
    s1 = repo.backup([str(src)], kind="full").snapshot
    (src / "b").write_bytes(blob)  # same content, new file
    s2 = repo.backup([str(src)], kind="full").snapshot
    assert s2.stats["added_raw_bytes"] < s1.stats["added_raw_bytes"] / 10


def test_include_exclude(tmp_path, new_repo):
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "drop").mkdir()
    (src / "keep" / "a.txt").write_bytes(b"a")
    (src / "keep" / "b.log").write_bytes(b"b")
    (src / "drop" / "c.txt").write_bytes(b"c")
    repo = new_repo()
    repo.backup([str(src)])
    out = tmp_path / "out"
    repo.restore("latest", str(out), includes=["keep"], excludes=["*.log"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["keep", "keep/a.txt"]


def test_stream_backup_and_open_file(tmp_path, new_repo):
    import io

    repo = new_repo()
    data = os.urandom(2 * 1024 * 1024) + b"tail"
    snap = repo.backup_stream(io.BytesIO(data), "db.sql").snapshot
    assert snap.stdin_name == "db.sql"
    with repo.open_file(snap, "db.sql") as f:
        assert f.read() == data
    data2 = data[:1000] + b"changed" + data[1007:]
    snap2 = repo.backup_stream(io.BytesIO(data2), "db.sql").snapshot
    assert snap2.parent == snap.id
    with repo.open_file(snap2, "db.sql") as f:
        assert f.read() == data2
    with pytest.raises(UsageError):
        repo.open_file(snap2, "nope")


def test_unreadable_file_is_recorded_and_backup_goes_on(tmp_path, new_repo, monkeypatch, python_file_reads):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"ok")
    (src / "secret").write_bytes(b"no")
    (src / "gone").write_bytes(b"vanishes")
    real_open = os.open

    def failing_open(path, flags, *args):
        name = os.path.basename(os.fsdecode(path))
        if name == "secret":  # root reads every file, so the permission error is simulated
            raise PermissionError(13, "Permission denied")
        if name == "gone":
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(path, flags, *args)

    repo = new_repo()
    monkeypatch.setattr("chunkvault.store.backup.os.open", failing_open)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert result.partial
    assert result.snapshot.stats["unreadable"] == ["secret"]
    assert any("vanished" in w for w in result.warnings)
    names = {e.path for e in repo.tree(result.snapshot)}
    assert b"ok" in names and b"secret" in names and b"gone" not in names
    # the next backup reads it again rather than trusting the empty record
    second = repo.backup([str(src)])
    assert not second.partial
    with repo.open_file(second.snapshot, "secret") as f:
        assert f.read() == b"no"


def test_a_file_that_cannot_be_opened_or_read_now_keeps_its_parents_data(tmp_path, new_repo, monkeypatch,
                                                                        python_file_reads):
    """Neither a refused open (small file or large) nor a read failing part-way records the file empty: the
    snapshot keeps the last good copy, lists the path unreadable, and the next backup reads it again."""
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 << 20)
    (src / "small").write_bytes(b"first small")
    (src / "big").write_bytes(big)
    (src / "torn").write_bytes(big[::-1])
    repo = new_repo()
    repo.backup([str(src)])
    (src / "small").write_bytes(b"second small")
    (src / "big").write_bytes(big[:-5] + b"later")
    (src / "torn").write_bytes(big)
    real_open, real_readv = os.open, os.readv
    torn_fds: set[int] = set()

    def failing_open(path, flags, *args):
        name = os.path.basename(os.fsdecode(path))
        if name in ("small", "big"):
            raise PermissionError(13, "Permission denied")
        fd = real_open(path, flags, *args)
        if name == "torn":
            torn_fds.add(fd)
        return fd

    def failing_readv(fd, buffers):
        if fd in torn_fds and os.lseek(fd, 0, os.SEEK_CUR) >= 1 << 20:
            raise OSError(5, "Input/output error")
        return real_readv(fd, buffers)

    monkeypatch.setattr("chunkvault.store.backup.os.open", failing_open)
    monkeypatch.setattr("chunkvault.store.backup.os.readv", failing_readv)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert result.partial
    assert sorted(result.snapshot.stats["unreadable"]) == ["big", "small", "torn"]
    out = tmp_path / "out"
    repo.restore(result.snapshot, str(out))
    assert (out / "small").read_bytes() == b"first small"
    assert (out / "big").read_bytes() == big
    assert (out / "torn").read_bytes() == big[::-1]
    again = repo.backup([str(src)])
    assert not again.partial
    with repo.open_file(again.snapshot, "big") as f:
        assert f.read() == big[:-5] + b"later"
    with repo.open_file(again.snapshot, "small") as f:
        assert f.read() == b"second small"


def test_a_file_that_became_a_directory_before_it_was_read_is_left_out_until_the_next_backup(
        tmp_path, new_repo, monkeypatch, python_file_reads):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"a file")
    real_open = os.open

    def swap_then_open(path, flags, *args):
        if os.path.basename(os.fsdecode(path)) == "f" and (src / "f").is_file():
            (src / "f").unlink()
            (src / "f").mkdir()
            (src / "f" / "inside").write_bytes(b"x")
        return real_open(path, flags, *args)

    repo = new_repo()
    monkeypatch.setattr("chunkvault.store.backup.os.open", swap_then_open)
    result = repo.backup([str(src)])
    monkeypatch.undo()
    assert any("changed type" in w and "f" in w for w in result.warnings)
    assert b"f" not in {e.path for e in repo.tree(result.snapshot)}
    assert not result.partial
    later = {e.path: e.type for e in repo.tree(repo.backup([str(src)]).snapshot)}
    assert later[b"f"] == T_DIR and b"f/inside" in later


def test_special_and_odd_entries_modes(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ro").write_bytes(b"r")
    os.chmod(src / "ro", 0o400)
    (src / "rodir").mkdir()
    (src / "rodir" / "inside").write_bytes(b"i")
    os.chmod(src / "rodir", 0o500)
    try:
        repo = new_repo()
        repo.backup([str(src)])
        out = tmp_path / "out"
        repo.restore("latest", str(out))
        assert stat.S_IMODE(os.stat(out / "ro").st_mode) == 0o400
        assert stat.S_IMODE(os.stat(out / "rodir").st_mode) == 0o500
        assert (out / "rodir" / "inside").read_bytes() == b"i"
    finally:
        os.chmod(src / "rodir", 0o700)
        if (tmp_path / "out" / "rodir").exists():
            os.chmod(tmp_path / "out" / "rodir", 0o700)


def test_differential_counts_match_a_full_of_the_same_tree(tmp_path, new_repo, monkeypatch):
    """Unchanged files between changed, new, deleted and hard-linked ones: the differential's counts, and its
    snapshot's files and bytes equal a full backup's of the same tree; progress never counts backwards."""
    import itertools
    import random
    import types

    from chunkvault.store import backup

    rnd = random.Random(3)
    src = tmp_path / "src"
    make_numbered_files(src, rnd, 4, 30, 1, 3000)
    repo = new_repo()
    repo.backup([str(src)])
    (src / "d1" / "f05").write_bytes(b"changed")
    (src / "d1" / "f06").unlink()
    (src / "d2" / "new").write_bytes(b"new file")
    os.link(src / "d3" / "f00", src / "d3" / "link")
    stamp = os.stat(src / "d0" / "f10").st_mtime_ns
    os.utime(src / "d0" / "f10", ns=(stamp, stamp + 1))
    seen = []
    clock = itertools.count()  # a second per look at the clock: every chance to report progress is taken
    monkeypatch.setattr(backup, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock)),
                                                               time_ns=backup.time.time_ns))
    diff = repo.backup([str(src)], kind="diff", progress=lambda counts: seen.append(counts["unchanged_files"]))
    monkeypatch.undo()
    full = repo.backup([str(src)], kind="full")
    d, f = diff.snapshot.stats, full.snapshot.stats
    # changed: d1/f05, d0/f10 and d3/f00 (two links now); new: d2/new and d3/link (a hard link counts as a file)
    assert (d["changed_files"], d["new_files"], d["deleted"]) == (3, 2, 1)
    assert (d["unchanged_files"], f["unchanged_files"]) == (120 - 4, 120 + 1)  # the full: d3/link too
    assert (d["files"], d["dirs"], d["bytes"]) == (f["files"], f["dirs"], f["bytes"])
    # (a run of unchanged entries matched at once reports once)
    assert len(seen) > 20 and seen == sorted(seen) and seen[-1] <= d["unchanged_files"]


def test_files_read_in_parallel_land_in_manifest_order(tmp_path, new_repo, monkeypatch, python_file_reads):
    """Readers finish in any order (delays injected) and far more entries than the window wait behind slow
    ones: records, warnings and unreadable paths still come in manifest order, and a directory replaced by a
    file still drops its old subtree."""
    import random
    import shutil
    import time

    from chunkvault.store import backup
    from chunkvault.store.manifest import OP_DELETE, OP_FRESH, sort_key

    rnd = random.Random(5)
    src = tmp_path / "src"
    make_numbered_files(src, rnd, 3, 150, 0, 5000)
    (src / "d1" / "big").write_bytes(rnd.randbytes(3 << 20))  # several chunks
    (src / "swap" / "inner").mkdir(parents=True)
    (src / "swap" / "inner" / "x").write_bytes(b"x")
    repo = new_repo()
    repo.backup([str(src)])
    for p in sorted(src.rglob("*")):
        if p.is_file():
            p.write_bytes(p.read_bytes() + b"+")
    shutil.rmtree(src / "swap")
    (src / "swap").write_bytes(b"a file now")
    unreadable = ["d0/f007", "d1/f100", "d2/f149"]
    vanished = ["d1/f050", "d2/f000"]
    real_open, real_read = os.open, backup.Backup._read_file

    def failing_open(path, flags, *args):
        rel = os.path.relpath(os.fsdecode(path), src)
        if rel in unreadable:
            raise PermissionError(13, "Permission denied")
        if rel in vanished:
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(path, flags, *args)

    def slow_read(self, *args):
        time.sleep(rnd.choice((0, 0, 0, 0.001, 0.005)))
        return real_read(self, *args)

    monkeypatch.setattr("chunkvault.store.backup.os.open", failing_open)
    monkeypatch.setattr(backup.Backup, "_read_file", slow_read)
    diff = repo.backup([str(src)], kind="diff")
    monkeypatch.undo()

    assert diff.snapshot.stats["unreadable"] == unreadable
    named = [w.split(f"{src}/", 1)[1].split(":")[0] for w in diff.warnings if w.startswith(("cannot read", "vanished"))]
    assert named == sorted(unreadable + vanished)
    records = list(repo.store.manifest_records(diff.snapshot))
    keys = [sort_key(r.path) for r in records]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert {r.path for r in records if r.op == OP_DELETE} == {os.fsencode(p) for p in vanished}
    assert not [r.path for r in records if r.op == OP_FRESH and r.entry.size == 0]  # kept, not recorded empty
    tree = {e.path: e for e in repo.tree(diff.snapshot)}
    assert b"swap/inner" not in tree and b"swap/inner/x" not in tree and tree[b"swap"].size == len(b"a file now")
    expected = sorted((p for p in src.rglob("*") if p.relative_to(src).as_posix() not in vanished),
                      key=lambda p: sort_key(os.fsencode(p.relative_to(src).as_posix())))
    assert list(tree) == [b""] + [os.fsencode(p.relative_to(src).as_posix()) for p in expected]
    out = tmp_path / "out"
    repo.restore(diff.snapshot, str(out))
    for p in expected:
        rel = p.relative_to(src).as_posix()
        if p.is_file():
            assert (out / rel).read_bytes() == (p.read_bytes()[:-1] if rel in unreadable else p.read_bytes()), rel


def test_a_failed_backup_stops_its_readers_inside_a_long_file(tmp_path, new_repo, monkeypatch):
    """When the backup fails elsewhere (here: its walk, once a long file went to a reader), the reader
    stops at its next chunk instead of reading the file to its end; the error is the backup's."""
    import time

    from chunkvault.store import backup

    src = tmp_path / "src"
    src.mkdir()
    (src / "long").write_bytes(os.urandom(4 << 20))
    (src / "next").write_bytes(b"n")
    chunks_read = []
    real_chunks, real_records = backup.Backup._chunks, backup.Backup.records

    def slow_chunks(self, f, rel, size_hint):
        for chunk in real_chunks(self, f, rel, size_hint):
            chunks_read.append(len(chunk))
            time.sleep(0.05)
            yield chunk

    def failing_walk(self, source, *args):
        def walk():
            for item in source:
                yield item
                if item[0] == b"long":
                    raise OSError(5, "Input/output error")
        return real_records(self, walk(), *args)

    repo = new_repo()
    monkeypatch.setattr(backup.Backup, "_chunks", slow_chunks)
    monkeypatch.setattr(backup.Backup, "records", failing_walk)
    with pytest.raises(OSError, match="Input/output"):
        repo.backup([str(src)])
    assert sum(chunks_read) < 4 << 20


def test_progress_moves_while_a_reader_is_inside_one_long_file(tmp_path, new_repo, monkeypatch):
    """The main thread waits for the reader of a long file, and reports the bytes read so far meanwhile."""
    import time

    from chunkvault.store import backup

    src = tmp_path / "src"
    src.mkdir()
    size = 4 << 20
    (src / "long").write_bytes(os.urandom(size))
    real_chunks = backup.Backup._chunks

    def slow_chunks(self, f, rel, size_hint):
        for chunk in real_chunks(self, f, rel, size_hint):
            time.sleep(0.15)
            yield chunk

    seen = []
    repo = new_repo()
    monkeypatch.setattr(backup.Backup, "_chunks", slow_chunks)
    result = repo.backup([str(src)], progress=lambda counts: seen.append(counts["read_bytes"]))
    assert result.snapshot.stats["read_bytes"] == size
    assert any(0 < n < size for n in seen) and seen == sorted(seen)


def test_times_beyond_what_the_format_holds_are_held_at_its_end_not_wrapped(tmp_path, new_repo):
    """int64 nanoseconds end in 2262: a file dated 2300 came back dated 1715 (then 1901 on disk)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    (src / "small").write_bytes(b"y")
    far = 10_500_000_000 * 10**9  # the year 2302
    for p in (src / "d" / "f", src / "small", src / "d"):
        os.utime(p, ns=(far, far))
    repo = new_repo()
    result = repo.backup([str(src)])
    snap = result.snapshot
    with repo.reading():
        times = {e.path: e.mtime_ns for e in repo.tree(snap) if e.path}
    assert set(times.values()) == {(1 << 63) - 1}, times
    held = sorted(w.rsplit(": ", 1)[1] for w in result.warnings if w.startswith("modification time"))
    assert held == sorted(str(p) for p in (src / "d" / "f", src / "small", src / "d"))  # said, not silent
    repo.restore(snap.id, str(tmp_path / "out"))
    assert os.stat(tmp_path / "out" / "d" / "f").st_mtime_ns // 10**9 == ((1 << 63) - 1) // 10**9


def test_a_restore_and_a_diff_list_the_snapshots_once_under_their_lock(tmp_path, new_repo, monkeypatch, password):
    """A restore listed every snapshot object eight times (the snapshot chosen, then looked up again by id and its
    chain found for its subtree, its owners and each walk of its tree), a diff six: over HTTP a year of hourly
    snapshots is 14 listings of 17,000 objects for one restore.  Under the shared lock no forget, tag or rebase
    changes a snapshot listed, so the chains are read from the one listing."""
    from chunkvault import cli
    from chunkvault.store.repository import Repo

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    repo = new_repo(str(tmp_path / "repo"))
    for i in range(6):
        (src / "sub" / "f").write_text(f"version {i}")
        repo.backup([str(src)], kind="full" if i == 0 else "diff")
    first, last = repo.snapshots()[0], repo.snapshots()[-1]
    listings = []
    real = Repo.snapshots
    monkeypatch.setattr(Repo, "snapshots", lambda self: listings.append(1) or real(self))
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", password)
    repo_path = str(tmp_path / "repo")
    for n, spec in enumerate(["latest", "latest:sub", last.id[:8]]):
        listings.clear()
        assert cli.main(["restore", "-r", repo_path, spec, "--target", str(tmp_path / f"t{n}")]) == 0
        assert len(listings) == 1, (spec, len(listings))  # the choice, made under the command's lock
    assert (tmp_path / "t1" / "f").read_text() == "version 5"
    listings.clear()
    assert cli.main(["diff", "-r", repo_path, first.id[:8], last.id[:8]]) == 0
    assert len(listings) == 2, len(listings)  # one for each snapshot named
    listings.clear()
    with repo.reading():
        assert ("modified", b"sub/f") in [(c, (new or old).path) for c, old, new in repo.diff(first, last)]
        repo.restore(last, str(tmp_path / "t3"), subtree="sub")
    assert len(listings) == 1, len(listings)


def test_a_listing_begun_before_a_lock_was_taken_is_not_kept_under_it(tmp_path, new_repo, monkeypatch):
    """Another thread's listing, begun unlocked before this one's ``reading`` block took its lock (and dropped
    what was read before it), ended after: it was kept as the lock's listing, though a forget or rewrite may
    have run before the lock."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    repo = new_repo()
    repo.backup([str(src)])
    store = repo.store
    real = store._named_objects

    def listed_while_a_lock_is_taken(prefix, *args):
        out = list(real(prefix, *args))
        if prefix == "snapshots/":
            store.drop_stale(index=False)  # the other thread's lock, taken now
        return iter(out)

    with repo.reading():
        monkeypatch.setattr(store, "_named_objects", listed_while_a_lock_is_taken)
        store.snapshots()  # begun before the lock's drop, ended under the lock
        monkeypatch.undo()
        assert store.kept_listing() is None
        store.snapshots()  # listed under the lock: kept
        assert store.kept_listing() is not None


def test_a_read_whose_lock_was_lost_follows_the_snapshots_as_they_are_now(tmp_path, new_repo, password):
    """A listing made under a ``reading`` block's lock is kept for its chains while the lock keeps forget, tag and
    rebase off; once another command removed that lock (it took it for stale) nothing does, and a forget and prune
    there left the listing naming manifests that are gone: a restore read them, and failed as damaged."""
    from chunkvault import Repository

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    for i in range(3):
        (src / "f").write_text(f"version {i}")
        repo.backup([str(src)], kind="full" if i == 0 else "diff")
    full, middle, last = repo.snapshots()
    with repo.reading():
        assert repo.snapshot(last).parent == middle.id  # listed under the lock
        for lock in os.listdir(tmp_path / "repo" / "locks"):  # another command took it for stale
            os.remove(tmp_path / "repo" / "locks" / lock)
        assert not repo._read_locks[0].refresh()  # the block's lock finds it is gone
        other = Repository.open(str(tmp_path / "repo"), password)
        other.forget([middle.id])
        other.prune(max_unused=0)
        other.close()
        repo.restore(last, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_text() == "version 2"
