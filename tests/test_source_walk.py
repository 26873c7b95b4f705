"""The source walk: manifest order, excludes, errors as warnings, and walking ahead on a thread."""
from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.store import source
from chunkvault.store.manifest import sort_key
from chunkvault.store.source import FileStat, SourceWalk
from treeutil import threads, wait_for, walked_ahead

NAMES = st.sampled_from([b"a", b"a.b", b"a-b", b"b", b"ab", b"z", b"\xff", b"A", b"a b"])


def build(root: bytes, spec: dict) -> None:
    """``spec``: name -> None (a file) or a dict (a directory)."""
    for name, sub in spec.items():
        path = os.path.join(root, name)
        if sub is None:
            with open(path, "wb") as f:
                f.write(name)
        else:
            os.mkdir(path)
            build(path, sub)


def os_walk_rels(root: bytes) -> list[bytes]:
    out = [b""]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return out


trees = st.recursive(st.none(), lambda kids: st.dictionaries(NAMES, kids, max_size=4), max_leaves=25)


class per_directory_walk:
    """Within it, walks take the per-directory path (as with excludes, or without the C walker)."""

    def __enter__(self):
        self.saved, source.Walker = source.Walker, None

    def __exit__(self, *exc):
        source.Walker = self.saved


def fields(st_) -> tuple:
    return tuple(getattr(st_, f) for f in FileStat.__slots__)


@settings(max_examples=60, deadline=None)
@given(spec=st.dictionaries(NAMES, trees, max_size=5), ahead=st.sampled_from([1, 3, 1 << 16]), start=st.booleans(),
       batch=st.sampled_from([1, 2, 1024]), c_walk=st.booleans())
def test_walk_yields_every_entry_in_manifest_order(tmp_path_factory, spec, ahead, start, batch, c_walk):
    root = os.fsencode(tmp_path_factory.mktemp("src"))
    build(root, spec)
    walk = SourceWalk([(b"", root)], ahead=ahead)
    walk.BATCH = batch
    with contextlib.nullcontext() if c_walk else per_directory_walk():
        if start:
            walk.start()
        items = list(walk)
    rels = [rel for rel, *_ in items]
    assert rels == sorted(os_walk_rels(root), key=sort_key)
    for rel, path, stat_, ok in items:
        assert path == os.path.join(root, rel) if rel else path == root
        assert ok and stat_.st_ino == os.lstat(path).st_ino
    assert walk.warnings == []


def test_walked_ahead_entries_carry_what_a_backup_records(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10)
    before = threads()  # taken before the walk starts its C thread, so the wait below covers that thread
    walk = walked_ahead(SourceWalk.of_paths([str(src)]).start(), before)
    items = {rel: s for rel, _, s, _ in walk}
    assert fields(items[b"f"]) == fields(os.lstat(src / "f"))


def test_several_roots_keep_their_absolute_paths_in_manifest_order(tmp_path):
    for d in ("one", "two", "one-b"):
        (tmp_path / d / "sub").mkdir(parents=True)
        (tmp_path / d / "sub" / "f").write_bytes(b"1")
    walk = SourceWalk.of_paths([str(tmp_path / "two"), str(tmp_path / "one-b"), str(tmp_path / "one")])
    top = os.fsencode(str(tmp_path).lstrip("/")) + b"/"
    parts = top.rstrip(b"/").split(b"/")
    ancestors = [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    items = {rel: st for rel, _, st, _ in walk}
    assert list(items) == ancestors + [top + p for p in (
        b"one", b"one/sub", b"one/sub/f", b"one-b", b"one-b/sub", b"one-b/sub/f", b"two", b"two/sub", b"two/sub/f")]
    assert walk.paths == [str(tmp_path / d) for d in ("one", "one-b", "two")]
    assert items[ancestors[-1]].st_ino == os.stat(tmp_path).st_ino  # its own metadata, not listed


def test_an_ancestor_that_is_a_symbolic_link_stands_for_the_directory_it_leads_to(tmp_path):
    (tmp_path / "real" / "a").mkdir(parents=True)
    (tmp_path / "real" / "b").mkdir()
    os.symlink("real", tmp_path / "link")
    walk = SourceWalk.of_paths([str(tmp_path / "link" / "a"), str(tmp_path / "link" / "b")])
    top = os.fsencode(str(tmp_path).lstrip("/"))
    items = {rel: st for rel, _, st, _ in walk}
    assert stat.S_ISDIR(items[top + b"/link"].st_mode) and items[top + b"/link"].st_ino == os.stat(tmp_path / "real").st_ino
    assert list(items)[-2:] == [top + b"/link/a", top + b"/link/b"]


def test_excludes_prune_whole_directories(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.log").write_bytes(b"1")
    (tmp_path / "keep" / "b").write_bytes(b"1")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "big").write_bytes(b"1")
    walk = SourceWalk.of_paths([str(tmp_path)], ["cache", "*.log"]).start()
    assert [rel for rel, *_ in walk] == [b"", b"keep", b"keep/b"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_unreadable_directory_is_a_warning_not_an_abort(tmp_path):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "f").write_bytes(b"1")
    (tmp_path / "z").write_bytes(b"1")
    os.chmod(tmp_path / "locked", 0)
    try:
        walk = SourceWalk.of_paths([str(tmp_path)]).start()
        items = [(rel, ok) for rel, _, _, ok in walk]
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert items == [(b"", True), (b"locked", False), (b"z", True)]
    assert any("cannot read directory" in w for w in walk.warnings)


def test_entries_vanishing_after_a_late_restat_are_warnings(tmp_path, monkeypatch):
    """An entry reached long after its directory was scanned is stat'ed again: gone by then, it is a warning."""
    for i in range(50):
        (tmp_path / f"f{i:02}").write_bytes(b"1")
    monkeypatch.setattr(SourceWalk, "RESTAT_AFTER", 0.0)
    monkeypatch.setattr(SourceWalk, "BATCH", 1)  # a batch is stat'ed again when it is taken
    walk = SourceWalk.of_paths([str(tmp_path)])
    it = iter(walk)
    assert next(it)[0] == b""  # the root is scanned; now its files vanish
    for i in range(10, 50):
        os.remove(tmp_path / f"f{i:02}")
    rest = [rel for rel, *_ in it]
    assert rest == [b"f%02d" % i for i in range(10)]
    assert sum("vanished during backup" in w for w in walk.warnings) == 40


def test_the_c_walk_yields_what_the_per_directory_walk_does(tmp_path):
    """Every kind of entry, odd names, a directory whose path is too long to open (a listing error even
    for root), several roots and a root given with a trailing slash: the same items and warnings."""
    names = [b"a", b"B", b"a.b", b"a-", b"\xff\xfe", b"\x01x", b"\xc3\xa9t\xc3\xa9"]
    for n in names:
        (tmp_path / os.fsdecode(n)).write_bytes(n)
    os.symlink("dangling", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    os.link(tmp_path / "a", tmp_path / "hard")
    deep = os.fsencode(tmp_path / "deep")
    os.mkdir(deep)
    fd = os.open(deep, os.O_RDONLY)
    try:  # 20 levels of 250-byte names: the innermost directories' paths exceed PATH_MAX
        for _ in range(20):
            os.mkdir(b"d" * 250, dir_fd=fd)
            sub = os.open(b"d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
        with open(os.open(b"f", os.O_CREAT | os.O_WRONLY, dir_fd=fd), "wb") as f:
            f.write(b"deep")
    finally:
        os.close(fd)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_bytes(b"x")

    def walk(roots):
        w = SourceWalk(roots)
        return [(rel, path, fields(st_), ok) for rel, path, st_, ok in w], w.warnings

    for roots in ([(b"", os.fsencode(tmp_path))], [(b"", os.fsencode(tmp_path) + b"/")],
                  [(b"one", os.fsencode(tmp_path / "other")), (b"two", os.fsencode(tmp_path / "a"))]):
        items, warnings = walk(roots)
        with per_directory_walk():
            assert (items, warnings) == walk(roots)
    items, warnings = walk([(b"", os.fsencode(tmp_path))])
    assert [ok for _, _, _, ok in items].count(False) >= 1
    assert any("cannot read directory" in w and "too long" in w for w in warnings)


GLOBS = st.lists(st.sampled_from(["a", "b", "*", "/", ".", "a*", "\xff", "\udcff", "*b", "z*", "a/*"]),
                 min_size=1, max_size=4).map("".join)


@settings(max_examples=80, deadline=None)
@given(spec=st.dictionaries(NAMES, trees, max_size=5), excludes=st.lists(GLOBS, max_size=3), start=st.booleans())
def test_the_c_walk_excludes_what_the_per_directory_walk_does(tmp_path_factory, spec, excludes, start):
    """Globs of literals and "*" are matched in C, on bytes; Python's fnmatch, on the decoded path
    and name, is the reference (names that are not UTF-8 included)."""
    root = os.fsencode(tmp_path_factory.mktemp("src"))
    build(root, spec)

    def walk():
        w = SourceWalk([(b"", root)], excludes)
        if start:
            w.start()
        return [rel for rel, *_ in w], w.warnings

    assert SourceWalk([(b"", root)], excludes)._c_excludes is not None
    items = walk()
    with per_directory_walk():
        assert items == walk()


def test_globs_matching_characters_take_the_per_directory_walk(tmp_path):
    (tmp_path / "ab").write_bytes(b"1")
    (tmp_path / "\u00e9b").write_bytes(b"1")  # one character, two bytes: "?" matches it, not one byte
    (tmp_path / "zz").write_bytes(b"1")
    walk = SourceWalk.of_paths([str(tmp_path)], ["?b"])
    assert walk._c_excludes is None
    assert [rel for rel, *_ in walk] == [b"", b"zz"]


def test_a_directory_replaced_before_it_is_reached_is_given_as_the_walk_listed_it(tmp_path, monkeypatch):
    """The C walk lists a directory's subtree ahead; stat'ed again late by its path, the directory is now a
    symlink to where it went.  That stat describes another file (the link): it is not taken, else a link
    to outside the tree would pass the checks of the reads below it.  The directory and its subtree are
    given as the walk listed them (reads through the link then find the same files, or refuse others)."""
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for i in range(40):  # a subtree over several batches, some of them all below "a"
        (tmp_path / "a" / f"x{i:02}").write_bytes(b"1")
        (tmp_path / "a" / "sub" / f"y{i:02}").write_bytes(b"1")
    (tmp_path / "b").write_bytes(b"2")
    monkeypatch.setattr(SourceWalk, "RESTAT_AFTER", 0.0)
    monkeypatch.setattr(SourceWalk, "BATCH", 1)  # each batch is stat'ed again when it is taken
    walk = SourceWalk.of_paths([str(tmp_path)])
    it = iter(walk)
    assert next(it)[0] == b""  # the whole tree is walked: "a" was a directory
    (tmp_path / "a").rename(tmp_path / "moved")
    (tmp_path / "a").symlink_to("moved")
    rest = [(rel, stat.S_IFMT(st_.st_mode)) for rel, _, st_, _ in it]
    assert rest[0] == (b"a", stat.S_IFDIR) and rest[-1] == (b"b", stat.S_IFREG) and len(rest) == 2 + 81
    assert walk.warnings == []


@pytest.mark.skipif(source.Walker is None, reason="the C walker is not built")
def test_the_c_walkers_thread_queues_ahead_then_keeps_pace_and_hands_over_in_order(tmp_path):
    for d in range(3):
        (tmp_path / f"d{d}").mkdir()
        for f in range(40):
            (tmp_path / f"d{d}" / f"f{f:02}").write_bytes(b"x")
    root = os.fsencode(tmp_path)
    everything = [t[:2] for t in source.Walker(b"r", root).batch(1000)]  # no thread: batch() walks
    assert len(everything) == 1 + 3 * 41 and everything[0] == (b"r", root)
    w = source.Walker(b"r", root)
    assert w.start(10, 7) is True
    wait_for(lambda: w.queued == 10)
    time.sleep(0.05)
    assert w.queued == 10  # the walk ahead waits for the first batch...
    got = w.batch(4)
    assert w.age >= 0.05  # the batch's oldest entry was stat'ed before the wait
    wait_for(lambda: w.queued == 6 + 7)
    time.sleep(0.05)
    assert w.queued == 6 + 7  # ...then keeps at most `steady` more queued
    while batch := w.batch(5):
        got += batch
        assert 0 <= w.age < 5
    assert [t[:2] for t in got] == everything
    assert w.batch(5) == []
    with pytest.raises(RuntimeError):
        w.start(1, 1)  # once
    with pytest.raises(ValueError):
        w.batch(0)


@pytest.mark.skipif(source.Walker is None, reason="the C walker is not built")
@pytest.mark.parametrize("threaded", [True, False])
def test_a_stopped_c_walk_is_an_error_once_drained_never_a_short_walk(tmp_path, threaded):
    """A walk cut short must not pass for a whole one: a differential would record what it did not reach
    as deleted."""
    for f in range(100):
        (tmp_path / f"f{f:03}").write_bytes(b"x")
    w = source.Walker(b"", os.fsencode(tmp_path))
    if threaded:
        w.start(20, 20)
        wait_for(lambda: w.queued == 20)
    else:
        w.batch(20)
    w.stop()
    got = []
    with pytest.raises(RuntimeError, match="stopped before its end"):
        while True:
            got += w.batch(8)
    assert len(got) == (20 if threaded else 0)


@pytest.mark.skipif(source.Walker is None or not os.path.isdir("/proc/self/task"),
                    reason="the C walker is not built, or no /proc to count threads")
def test_a_c_walker_dropped_mid_walk_ends_its_thread(tmp_path):
    for d in range(50):
        (tmp_path / f"d{d:02}").mkdir()
        for f in range(20):
            (tmp_path / f"d{d:02}" / f"f{f:02}").write_bytes(b"x")
    before = threads()
    for _ in range(20):
        w = source.Walker(b"", os.fsencode(tmp_path))
        w.start(30, 5)
        wait_for(lambda: w.queued == 30)
        w.batch(3)
        del w  # its thread waits for room: deallocating stops and joins it
    walk = SourceWalk.of_paths([str(tmp_path)]).start()
    it = iter(walk)
    next(it)
    walk.close()  # abandoned mid-walk: the generator's walker stops
    with pytest.raises(StopIteration):
        next(it)
    wait_for(lambda: threads() <= before)


def test_entries_queued_longer_than_restat_after_are_stated_again(tmp_path, monkeypatch):
    """The C walk lists ahead of the backup; a file changed between its listing and its turn is seen
    as it is at its turn."""
    for f in range(50):
        (tmp_path / f"f{f:02}").write_bytes(b"x")
    monkeypatch.setattr(SourceWalk, "RESTAT_AFTER", 0.2)
    walk = SourceWalk.of_paths([str(tmp_path)]).start()
    time.sleep(0.3)  # the whole directory is listed and stat'ed by now
    (tmp_path / "f40").write_bytes(b"grown")
    sizes = {rel: st_.st_size for rel, _, st_, _ in walk}
    assert sizes[b"f40"] == 5 and sizes[b"f39"] == 1


def test_a_walk_ahead_stopped_early_still_yields_everything(tmp_path):
    for d in range(20):
        (tmp_path / f"d{d:02}").mkdir()
        for f in range(100):
            (tmp_path / f"d{d:02}" / f"f{f:02}").write_bytes(b"x")
    with per_directory_walk():
        expected = [rel for rel, *_ in SourceWalk.of_paths([str(tmp_path)])]
    for ahead in (5, 1000, 1 << 16):
        walk = SourceWalk.of_paths([str(tmp_path)])
        walk._ahead = ahead
        walk.start()
        assert [rel for rel, *_ in walk] == expected  # iteration stops the walk ahead wherever it is
    abandoned = SourceWalk.of_paths([str(tmp_path)]).start()
    abandoned.close()
    assert not abandoned._thread.is_alive()


def test_the_scanner_lists_and_stats_as_python_does(tmp_path):
    """The C scanner against its Python reference: names sorted as bytes (any byte but / and NUL), every
    kind of entry, its lstat fields; a missing or non-directory path is the same OSError."""
    from chunkvault.store.source import scan_dir, scan_dir_reference

    names = [b"a", b"B", b"a.b", b"a-", b"\xff\xfe", b"\x01x", b"long" * 60, b"\xc3\xa9t\xc3\xa9", b"z" * 3]
    for n in names:
        (tmp_path / os.fsdecode(n)).write_bytes(n)
    os.mkdir(tmp_path / "dir")
    os.symlink("dangling", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    os.link(tmp_path / "a", tmp_path / "hard")
    assert scan_dir(os.fsencode(tmp_path)) == scan_dir_reference(os.fsencode(tmp_path))
    assert scan_dir(str(tmp_path / "dir")) == [] == scan_dir_reference(os.fsencode(tmp_path / "dir"))
    for bad, error in ((tmp_path / "missing", FileNotFoundError), (tmp_path / "a", NotADirectoryError)):
        with pytest.raises(error):
            scan_dir(os.fsencode(bad))
        with pytest.raises(error):
            scan_dir_reference(os.fsencode(bad))



def test_a_directory_swapped_since_the_walk_saw_it_is_not_listed(tmp_path):
    """By whoever can write the tree: a directory replaced by a symbolic link, or reached through a directory
    above replaced so, would have the walk list what lies outside the tree.  Both scanners refuse it as a
    directory that changed type (ENOTDIR), and list it as before when it is the one the walk saw."""
    from chunkvault.store.source import scan_dir, scan_dir_reference

    (tmp_path / "tree" / "d" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "sub").mkdir(parents=True)
    (tmp_path / "outside" / "sub" / "secret").write_text("x")
    d, sub = tmp_path / "tree" / "d", tmp_path / "tree" / "d" / "sub"
    seen_d, seen_sub = ((st.st_dev, st.st_ino) for st in (os.lstat(d), os.lstat(sub)))
    for scan in (scan_dir, scan_dir_reference):
        assert scan(os.fsencode(d), seen_d) == scan(os.fsencode(d)) != []
    os.rename(d, tmp_path / "tree" / "d-was")
    os.symlink(tmp_path / "outside", d)
    for scan in (scan_dir, scan_dir_reference):
        with pytest.raises(NotADirectoryError):
            scan(os.fsencode(d), seen_d)  # the directory itself swapped
        with pytest.raises(OSError) as swapped:
            scan(os.fsencode(sub), seen_sub)  # one above it swapped: sub is outside/sub
        assert swapped.value.errno == errno.ESTALE
        assert [n for n, _, _ in scan(os.fsencode(sub))] == [b"secret"]  # what an unchecked listing gave


def _outcome(r):
    """A read's result, its OSError as (type, errno, filename) so that the C and the Python ones compare."""
    return (type(r), r.errno, r.filename) if isinstance(r, OSError) else r


def test_small_files_are_read_as_python_reads_them(tmp_path):
    """``read_small_files`` (C) against its Python reference, in one call over many files: the first ``limit``
    bytes or all of a shorter file, the fstat fields after reading, whether it has extended attributes; the
    same OSError, naming the path, for a missing file, a directory, a symlink (never followed) and, where it
    applies, a file without read permission, each in its place among files read."""
    from chunkvault.store.source import read_small_files, read_small_files_reference

    paths, limits, expected = [], [], []
    for size in (0, 1, 4095, 4096, 70_000):
        p = tmp_path / f"f{size}"
        p.write_bytes(os.urandom(size))
        os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
        for limit in (0, 1, size, size + 1, size + 4096):
            paths.append(os.fsencode(p))
            limits.append(limit)
            expected.append((p.read_bytes()[:limit], size, 1_600_000_000_987_654_321, os.stat(p).st_ctime_ns))
    os.symlink(tmp_path / "f1", tmp_path / "link")
    os.mkdir(tmp_path / "dir")
    cases = [(tmp_path / "missing", FileNotFoundError), (tmp_path / "dir", IsADirectoryError),
             (tmp_path / "link", OSError)]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(b"x")
        locked.chmod(0)
        cases.append((locked, PermissionError))
    for i, (path, error) in enumerate(cases):
        at = 3 * i + 1
        paths.insert(at, os.fsencode(path))
        limits.insert(at, 10)
        expected.insert(at, error)
    for probe in (False, True):
        got = read_small_files(paths, limits, probe)
        assert list(map(_outcome, got)) == list(map(_outcome, read_small_files_reference(paths, limits, probe)))
        for path, r, want in zip(paths, got, expected):
            if isinstance(want, type):
                assert isinstance(r, want) and r.filename == path
            else:
                assert r[:4] == want and r[4] == (-1 if not probe else _has_xattrs(path))
    assert read_small_files([], [], True) == []
    with pytest.raises(ValueError):
        read_small_files(paths[:2], limits[:1], True)


def _has_xattrs(path: bytes) -> int:
    try:
        return 1 if os.listxattr(path) else 0
    except OSError:
        return 0


def test_the_extended_attribute_probe_sees_attributes(tmp_path):
    from chunkvault.store.source import read_small_files, read_small_files_reference

    p = tmp_path / "tagged"
    p.write_bytes(b"data")
    try:
        os.setxattr(p, "user.origin", b"camera")
    except OSError:
        pytest.skip("no user extended attributes on this file system")
    for read in (read_small_files, read_small_files_reference):
        assert read([os.fsencode(p)], [5], True)[0][4] == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sets(st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n
                                                          and n not in (b".", b"..")), max_size=40))
def test_the_scanner_sorts_any_names_as_python_does(tmp_path_factory, names):
    from chunkvault.store.source import scan_dir

    d = tmp_path_factory.mktemp("names")
    for n in names:
        with open(os.path.join(os.fsencode(d), n), "wb"):
            pass
    assert [name for name, _, _ in scan_dir(os.fsencode(d))] == sorted(names)


def test_a_walk_is_iterated_once_and_can_be_abandoned(tmp_path):
    walk = SourceWalk.of_paths([str(tmp_path)])
    list(walk)
    with pytest.raises(RuntimeError):
        list(walk)
    abandoned = SourceWalk.of_paths([str(tmp_path)]).start()
    abandoned.close()
    assert not abandoned._thread.is_alive()


def test_a_walk_ahead_that_went_stale_starts_again(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    before = threads()
    fresh = SourceWalk.of_paths([str(tmp_path)]).start()
    stale = walked_ahead(SourceWalk.of_paths([str(tmp_path)]).start(), before)
    walked_ahead(fresh, before)
    (tmp_path / "a").write_bytes(b"longer")
    (tmp_path / "b").write_bytes(b"2")
    stale.STALE_AFTER = 0.0  # as if the backup had waited for a lock
    assert [rel for rel, *_ in fresh] == [b"", b"a"]  # walked ahead: the old listing and metadata
    items = {rel: st for rel, _, st, _ in stale}
    assert list(items) == [b"", b"a", b"b"] and items[b"a"].st_size == 6


def test_missing_source_path_is_a_usage_error_only_when_none_exists(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        SourceWalk.of_paths([str(tmp_path / "nope")])
    (tmp_path / "here").write_bytes(b"x")
    walk = SourceWalk.of_paths([str(tmp_path / "nope"), str(tmp_path / "here")])
    rel = os.fsencode(str(tmp_path).lstrip("/"))
    assert [r for r, *_ in walk][-2:] == [rel, rel + b"/here"]
    assert walk.missing == [rel + b"/nope"]
    assert walk.warnings == [f"source path does not exist, skipped: {tmp_path / 'nope'}"]


def test_backup_with_a_walk_started_before_open_equals_a_plain_backup(tmp_path):
    src = tmp_path / "src"
    rng = random.Random(3)
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (src / f"d{d}" / f"f{f}").write_bytes(rng.randbytes(rng.randrange(1, 5000)))
    Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0).close()
    walk = SourceWalk.of_paths([str(src)], ["f3"]).start()
    with Repository.open(str(tmp_path / "repo"), "pw") as repo:
        a = repo.backup([str(src)], excludes=["f3"], walk=walk).snapshot
        b = repo.backup([str(src)], excludes=["f3"], kind="full").snapshot
        assert [(e.path, e.digest) for e in repo.tree(a)] == [(e.path, e.digest) for e in repo.tree(b)]
        assert a.stats["files"] == 95
        other = SourceWalk.of_paths([str(src / "d0")]).start()
        with pytest.raises(UsageError, match="other paths"):
            repo.backup([str(src)], walk=other)
        assert not other._thread.is_alive()


MARKERS = st.lists(st.tuples(st.sampled_from([b"a", b"b", b"a.b", b"\xff"]), st.sampled_from([b"", b"a", b"b", b"ab"])),
                   max_size=3, unique_by=lambda m: m[0])


def marked_rels(spec: dict, markers: list, prefix: bytes = b"") -> list[bytes]:
    """What a walk with ``markers`` yields below a directory built from ``spec`` by ``build`` (a file holds
    its own name): a directory holding a marker file whose content starts with the header keeps only those."""
    kept = {name for name, header in markers if spec.get(name, {}) is None and name.startswith(header)}
    out = []
    for name in sorted(spec):
        if kept and name not in kept:
            continue
        rel = prefix + name
        out.append(rel)
        if spec[name] is not None:
            out += marked_rels(spec[name], markers, rel + b"/")
    return sorted(out, key=sort_key)


@settings(max_examples=80, deadline=None)
@given(spec=st.dictionaries(NAMES, trees, max_size=5), markers=MARKERS, start=st.booleans())
def test_marked_directories_keep_only_their_marker_files_in_both_walks(tmp_path_factory, spec, markers, start):
    """The root too; a marker is a regular file whose first bytes are the header (a directory of that
    name marks nothing)."""
    root = os.fsencode(tmp_path_factory.mktemp("src"))
    build(root, spec)

    def walk():
        w = SourceWalk([(b"", root)], markers=markers)
        if start:
            w.start()
        return [rel for rel, *_ in w], w.warnings

    items = walk()
    assert items == ([b""] + marked_rels(spec, markers), [])
    with per_directory_walk():
        assert items == walk()


def test_marker_files_that_are_not_regular_files_or_cannot_be_read_mark_nothing(tmp_path):
    for d in ("dir", "link", "unreadable", "short"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x").write_bytes(b"x")
    (tmp_path / "dir" / "M").mkdir()
    os.symlink(tmp_path / "short" / "M", tmp_path / "link" / "M")
    (tmp_path / "unreadable" / "M").write_bytes(b"HEADER")
    os.chmod(tmp_path / "unreadable" / "M", 0)
    (tmp_path / "short" / "M").write_bytes(b"HEAD")
    markers = source.markers_of(["M:HEADER"])
    try:
        items = [rel for rel, *_ in SourceWalk([(b"", os.fsencode(tmp_path))], markers=markers)]
        with per_directory_walk():
            assert items == [rel for rel, *_ in SourceWalk([(b"", os.fsencode(tmp_path))], markers=markers)]
    finally:
        os.chmod(tmp_path / "unreadable" / "M", 0o600)
    expected = [b"", b"dir", b"dir/M", b"dir/x", b"link", b"link/M", b"link/x", b"short", b"short/M", b"short/x",
                b"unreadable", b"unreadable/M"]
    if os.geteuid() != 0:  # root reads the file whatever its mode
        expected[-1:] = [b"unreadable/M", b"unreadable/x"]
    assert items == expected


def test_marker_specs_are_file_names_with_an_optional_header():
    assert source.markers_of(["x", "y:Sig: 1", "x"], exclude_caches=True) == [
        source.CACHEDIR_TAG, (b"x", b""), (b"y", b"Sig: 1")]
    for bad in ("", ":h", "a/b", ".", ".."):
        with pytest.raises(UsageError, match="not a file name"):
            source.markers_of([bad])


def test_the_c_walker_lists_only_directories_of_its_device(tmp_path):
    """What --one-file-system asks of it: another device's directory is an entry, not listed; the root
    is always listed."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"f")
    (tmp_path / "g").write_bytes(b"g")
    dev = os.stat(tmp_path).st_dev

    def walk(device):
        w = source.Walker(b"", os.fsencode(tmp_path), None, device)
        out = []
        while batch := w.batch(64):
            out += [(rel, err, list_err) for rel, _, _, err, list_err in batch]
        return out

    assert walk(dev) == walk(None) == [(b"", 0, 0), (b"d", 0, 0), (b"d/f", 0, 0), (b"g", 0, 0)]
    assert walk(dev + 1) == [(b"", 0, 0), (b"d", 0, 0), (b"g", 0, 0)]


def test_exclude_files_hold_one_glob_a_line(tmp_path):
    (tmp_path / "x").write_text("# caches\n\n  *.tmp  \n\tbuild/*\n#not\\n\n")
    assert source.read_exclude_file(str(tmp_path / "x")) == ["*.tmp", "build/*"]
    with pytest.raises(UsageError, match="cannot read exclude file .*missing"):
        source.read_exclude_file(str(tmp_path / "missing"))


def test_a_leave_out_rule_judges_each_directory_on_its_whole_listing(tmp_path):
    """``leave_out`` sees a directory's path below the source and all its names: a file left out because of
    another beside it, a directory left out with its subtree; the walk of a progress total obeys it too."""
    root = bytes(tmp_path)
    build(root, {b"keep": None, b"drop": {b"x": None}, b"d": {b"a": None, b"a.flag": None, b"b": None,
                                                          b"e": {b"c": None, b"c.flag": None}}})
    asked = []

    def leave_out(below: bytes, names: list[bytes]) -> set[bytes]:
        asked.append((below, names))
        flagged = {n[:-5] for n in names if n.endswith(b".flag")}
        return {n for n in names if n in flagged} | ({b"drop"} if below == b"" else set())

    walk = SourceWalk([(b"", root)], leave_out=leave_out)
    assert [rel for rel, *_ in walk] == [b"", b"d", b"d/a.flag", b"d/b", b"d/e", b"d/e/c.flag", b"keep"]
    assert (b"d", [b"a", b"a.flag", b"b", b"e"]) in asked and b"drop" not in {below for below, _ in asked}
    reported = [(rel, st.rule) for rel, _, st, _ in SourceWalk([(b"", root)], leave_out=leave_out,
                                                                report_excluded=True)
                if isinstance(st, source.Excluded)]
    assert reported == [(b"d/a", "exclude"), (b"d/e/c", "exclude"), (b"drop", "exclude")]
    total = source.TreeTotal(SourceWalk([(b"", root)], leave_out=leave_out))
    wait_for(lambda: total.done)
    assert total.files == 4
    several = SourceWalk.of_paths([str(tmp_path / "d"), str(tmp_path / "keep")], leave_out=leave_out)
    rels = [rel for rel, *_ in several]
    prefix = bytes(tmp_path / "d").lstrip(b"/")
    assert prefix + b"/a.flag" in rels and prefix + b"/a" not in rels  # judged below its own source


def test_a_graft_adds_directories_that_lie_elsewhere_to_the_tree(tmp_path):
    """``graft`` is asked at each directory (by its path below the source) for the entries it is to hold that
    lie elsewhere: each directory named is walked and recorded there, its files read from where they lie, in
    place of an entry of that name (a link, here); one gone is left out with a warning, and one on another
    device is read even with ``one_file_system``.  The walk of a progress total grafts too."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    build(bytes(tmp_path), {b"root": {b"a": None, b"links": {}}, b"elsewhere": {b"V1": {b"f": None},
                                                                                b"V2": {b"g": None}}})
    os.symlink(elsewhere, root / "links" / "1")
    os.symlink(elsewhere, root / "links" / "2")
    asked = []

    def graft(below: bytes) -> dict[bytes, bytes]:
        asked.append(below)
        return {b"": {b"extra": bytes(elsewhere / "V2")},
                b"links": {b"1": bytes(elsewhere), b"3": bytes(tmp_path / "gone")}}.get(below, {})

    def leave_out(below: bytes, names: list[bytes]) -> set[bytes]:
        return {b"V1"} if below == b"links/1" else set()

    walk = SourceWalk([(b"", bytes(root))], graft=graft, leave_out=leave_out)
    got = {rel: (path, st) for rel, path, st, _ in walk}
    assert list(got) == [b"", b"a", b"extra", b"extra/g", b"links", b"links/1", b"links/1/V2", b"links/1/V2/g",
                         b"links/2"]
    assert b"links/1" in asked and b"links/2" not in asked  # a link is not a directory: not asked
    assert got[b"links/1"][0] == bytes(elsewhere) and stat.S_ISDIR(got[b"links/1"][1].st_mode)
    assert got[b"links/1/V2/g"][0] == got[b"extra/g"][0] == bytes(elsewhere / "V2" / "g")
    assert stat.S_ISLNK(got[b"links/2"][1].st_mode)
    assert any("vanished during backup" in w and "gone" in w for w in walk.warnings)
    total = source.TreeTotal(SourceWalk([(b"", bytes(root))], graft=graft))
    wait_for(lambda: total.done)
    assert total.files == 4  # a, extra/g, links/1/V1/f, links/1/V2/g
    real_lstat, there = os.lstat, bytes(elsewhere)

    def lstat(path, *args, **kwargs):  # the grafted tree lies on a disk of its own
        st = real_lstat(path, *args, **kwargs)
        if os.fsencode(path).startswith(there):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *tuple(st)[3:]))
        return st

    def scan(path, dev_ino=None):
        if not path.startswith(there):
            return source.scan_dir_reference(path, dev_ino)
        listing = source.scan_dir_reference(path, dev_ino and (dev_ino[0] - 1, dev_ino[1]))
        return [(n, e, f and (*f[:2], f[2] + 1, *f[3:])) for n, e, f in listing]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(source.os, "lstat", lstat)
        mp.setattr(source, "scan_dir", scan)
        one_fs = {rel: st for rel, _, st, _ in SourceWalk([(b"", bytes(root))], graft=graft, one_file_system=True)}
    assert b"links/1/V2/g" in one_fs and one_fs[b"links/1"].st_dev == one_fs[b""].st_dev + 1
