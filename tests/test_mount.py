"""chunkvault mount: the snapshots as a read-only file system."""
from __future__ import annotations

import contextlib
import ctypes.util
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault.mountview import TOP, InSnapshot, Layout, Link, SnapshotTree, VirtualDir, snapshot_name
from chunkvault.store.manifest import T_DIR, T_FILE, T_HARDLINK, Entry
from chunkvault.store.snapshot import Snapshot
from conftest import PASSWORD
from servers_http import FULL_TOKEN, serve_factory, write_tokens  # noqa: F401
from treeutil import describe, wait_for


def snap(sid: str, t: str, host: str = "h", tags: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(time=t, kind="full", parent=None, host=host, paths=["/a"], tags=list(tags), id=sid)


# --- the layout, without FUSE ---------------------------------------------------------------------


def test_tags_and_hosts_named_dot_or_dot_dot_are_directories_of_their_own():
    lay = Layout([snap("a" * 64, "2026-01-01T00:00:00+00:00", host="..", tags=(".", "..", "x/y"))])
    assert sorted(lay.resolve("/tags").names) == ["%2E", "%2E%2E", "x%2Fy"]
    assert list(lay.resolve("/hosts").names) == ["%2E%2E"]


def test_hosts_and_tags_that_differ_only_where_a_path_cannot_hold_them_stay_apart():
    """With / made _, hosts a/b and a_b were one directory, whose latest was the other host's snapshot."""
    names = ["a/b", "a_b", "a%2Fb", "%", "", ".", "..", "%2E"]
    lay = Layout([snap(f"{i:02x}" * 32, f"2026-01-0{i + 1}T00:00:00+00:00", host=h, tags=(h,))
                  for i, h in enumerate(names)])
    for top in ("/hosts", "/tags"):
        listed = list(lay.resolve(top).names)
        assert len(set(listed)) == len(names) and all(n and "/" not in n and n not in (".", "..") for n in listed)


def test_layout_names_snapshots_by_time_and_links_everything_else_to_them():
    a = snap("aa11" + "0" * 60, "2026-11-30T07:52:31.5+00:00", tags=("daily",))
    b = snap("bb22" + "0" * 60, "2026-11-30T08:52:31+01:00", host="db/1")  # the same second as a, in UTC
    c = snap("aa12" + "0" * 60, "2026-11-30T10:00:00+00:00", tags=("daily", "x"))
    lay = Layout([c, b, a])
    na, nb, nc = (lay.names[s.id] for s in (a, b, c))
    assert (na, nb) == ("2026-11-30T07:52:31Z", "2026-11-30T07:52:31Z-bb220000")  # the first keeps its name
    assert nc == snapshot_name(c) == "2026-11-30T10:00:00Z"
    assert lay.resolve("/") == VirtualDir(TOP)
    assert lay.resolve("/snapshots") == VirtualDir((na, nb, nc, "latest"))
    assert lay.resolve("/snapshots/latest") == Link(nc)
    assert lay.resolve(f"/snapshots/{nb}") == InSnapshot(b, b"")
    assert lay.resolve(f"/snapshots/{nb}/x/y") == InSnapshot(b, b"x/y")
    assert lay.resolve("/ids") == VirtualDir(("aa110000", "bb220000", "aa120000"))
    assert lay.resolve("/ids/bb220000") == Link(f"../snapshots/{nb}")
    assert lay.resolve(f"/ids/{b.id}") == lay.resolve("/ids/bb2200000") == Link(f"../snapshots/{nb}")  # as commands
    assert lay.resolve("/ids/aa1") is None and lay.resolve("/ids/bb22") is None  # shorter than the names listed
    assert lay.resolve("/hosts") == VirtualDir(("db%2F1", "h"))
    assert lay.resolve("/hosts/h") == VirtualDir((na, nc, "latest"))
    assert lay.resolve("/hosts/h/latest") == Link(nc)
    assert lay.resolve(f"/hosts/h/{na}") == Link(f"../../snapshots/{na}")
    assert lay.resolve(f"/hosts/h/{nb}") is None  # another host's
    assert lay.resolve("/tags") == VirtualDir(("daily", "x"))
    assert lay.resolve("/tags/x") == VirtualDir((nc, "latest"))
    for missing in ("/nope", "/snapshots/2020-01-01T00:00:00Z", "/ids/cc", "/hosts/h/latest/more", "/tags/none"):
        assert lay.resolve(missing) is None
    assert Layout([]).resolve("/snapshots") == VirtualDir(())


def test_ids_that_share_a_long_prefix_each_get_a_name_and_an_ambiguous_one_resolves_to_none():
    """Short names grow past the longest shared prefix (one of two ids sharing nine digits was missing from
    ids/), and a prefix two ids share leads nowhere, as every command refuses an ambiguous id."""
    a = snap("abcdef123" + "1" * 55, "2026-01-01T00:00:00+00:00")
    b = snap("abcdef123" + "2" * 55, "2026-01-02T00:00:00+00:00")
    lay = Layout([a, b])
    names = lay.resolve("/ids").names
    assert len(set(names)) == 2
    assert {lay.resolve(f"/ids/{n}") for n in names} == {Link(f"../snapshots/{lay.names[s.id]}") for s in (a, b)}
    assert lay.resolve("/ids/abcdef12") is None and lay.resolve("/ids/abcdef123") is None
    assert lay.resolve(f"/ids/{a.id}") == Link(f"../snapshots/{lay.names[a.id]}")


def test_snapshot_tree_lists_children_and_reads_hard_links_as_their_file():
    f = Entry(b"d/f", T_FILE, size=3)
    tree = SnapshotTree([Entry(b"", T_DIR), Entry(b"d", T_DIR), f, Entry(b"d/h", T_HARDLINK, target=b"d/f"),
                         Entry(b"e", T_DIR)])
    assert tree.children(b"") == [b"d", b"e"] and tree.children(b"d") == [b"f", b"h"] and tree.children(b"e") == []
    assert tree.content_entry(b"d/h") == f and tree.entry(b"d/h").type == T_HARDLINK
    assert tree.is_dir(b"e") and not tree.is_dir(b"d/f") and tree.content_entry(b"nope") is None
    assert tree.linked(b"d/h") == tree.linked(b"d/f") == (b"d/f", 2) and tree.linked(b"e") == (b"e", 1)
    several = SnapshotTree([Entry(b"a", T_DIR), Entry(b"b", T_DIR)])  # several paths: no root entry
    assert several.is_dir(b"") and several.children(b"") == [b"a", b"b"]
    # a differential can keep a path whose directories a rewrite removed from its parent: they are listed
    orphan = SnapshotTree([Entry(b"", T_DIR), Entry(b"a", T_DIR), Entry(b"c/d/f", T_FILE), Entry(b"z", T_FILE)])
    assert orphan.children(b"") == [b"a", b"c", b"z"] and orphan.children(b"c") == [b"d"]
    assert orphan.is_dir(b"c/d") and orphan.children(b"c/d") == [b"f"] and orphan.entry(b"c") is None


_names = st.sampled_from([b"a", b"a.b", b"a-", b"b", b"\xff", b"z z"])


@given(st.sets(st.lists(_names, min_size=1, max_size=4).map(b"/".join), max_size=40), st.randoms())
@settings(max_examples=300, deadline=None)
def test_snapshot_tree_answers_as_a_map_of_its_entries_would(paths, rnd):
    """The tree keeps records in one buffer, found by hash and by their order: every answer is checked
    against the entries themselves, with directories that only the paths below them hold (some dropped)."""
    from chunkvault.store.manifest import sort_key

    dirs = {p.rpartition(b"/")[0] for p in paths if b"/" in p}
    everything = sorted(paths | dirs | {b""}, key=sort_key)
    files = [p for p in everything if p not in dirs and p]
    entries = []
    for p in everything:
        if p in dirs or not p:
            if rnd.random() < 0.8:  # a directory without an entry of its own is listed all the same
                entries.append(Entry(p, T_DIR))
        elif files and p != files[0] and rnd.random() < 0.2:
            entries.append(Entry(p, T_HARDLINK, target=files[0]))
        else:
            entries.append(Entry(p, T_FILE, size=len(p), digest=bytes(32)))
    tree = SnapshotTree(entries)
    by_path = {e.path: e for e in entries}
    assert len(tree) == len(entries)
    for rel in everything + [b"nope", b"a/nope"]:
        below = [e.path for e in entries if e.path.startswith(rel + b"/" if rel else b"") and e.path != rel]
        expected_dir = not rel or (rel in by_path and by_path[rel].type == T_DIR) or bool(below)
        assert tree.is_dir(rel) == expected_dir
        assert tree.entry(rel) == by_path.get(rel)
        if expected_dir:
            start = len(rel) + 1 if rel else 0
            assert tree.children(rel) == sorted({p[start:].partition(b"/")[0] for p in below})
        e = by_path.get(rel)
        first = e.target if e is not None and e.type == T_HARDLINK else rel
        assert tree.linked(rel) == (first, 1 + sum(1 for x in entries if x.type == T_HARDLINK and x.target == first))


# --- the operations, called directly -------------------------------------------------------------


@pytest.fixture(autouse=True)
def listings_waited_for(monkeypatch):
    """A lookup that starts a listing of the snapshots waits for it to end here, however busy the machine:
    those tests look for a snapshot made just before (the one of a listing that hangs sets its own wait)."""
    from chunkvault import mount

    monkeypatch.setattr(mount, "LISTING_WAIT", 120.0)


def listing(fs, path: str) -> list[str]:
    """The names readdir gives, each with the inode number getattr gives it (a 0 would hide it)."""
    out = fs.readdir(path)
    for name, attrs, _ in out:
        child = path if name in (".", "..") else path.rstrip("/") + "/" + name
        assert attrs["st_ino"] > 0 and (name == ".." or attrs["st_ino"] == fs.getattr(child)["st_ino"]), (path, name)
    return [name for name, _, _ in out]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rnd = random.Random(4)
    src = tmp_path_factory.mktemp("mount-src") / "src"
    (src / "etc" / "deep").mkdir(parents=True)
    (src / "etc" / "app.conf").write_bytes(b"key = value\n")
    (src / "etc" / "deep" / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (src / "empty").write_bytes(b"")
    os.symlink("etc/app.conf", src / "link")
    os.link(src / "etc" / "app.conf", src / "hard")
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name\n")
    os.chmod(src / "etc" / "app.conf", 0o640)
    return src


@pytest.fixture(scope="module")
def repo_with(source, tmp_path_factory):
    from chunkvault import Repository

    url = str(tmp_path_factory.mktemp("mount-repo") / "repo")
    repo = Repository.init(url, PASSWORD, kdf_seconds=0,
                           chunker={"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 256 << 10})
    first = repo.backup([str(source)], tags=["daily"]).snapshot
    (source / "etc" / "app.conf").write_bytes(b"key = other\n")
    second = repo.backup([str(source)]).snapshot
    return repo, url, first, second


def test_operations_show_each_snapshot_as_it_was(repo_with, source):
    from chunkvault.mount import SnapshotFS

    repo, _, first, second = repo_with
    fs = SnapshotFS(repo)
    lay = Layout(repo.snapshots())
    root = f"/snapshots/{lay.names[second.id]}"
    assert listing(fs, "/") == [".", "..", *TOP]
    assert sorted(listing(fs, root)[2:]) == sorted(os.fsdecode(n) for n in os.listdir(os.fsencode(source)))
    st = fs.getattr(f"{root}/etc/app.conf")
    src = os.lstat(source / "etc" / "app.conf")
    assert (st["st_mode"], st["st_size"], st["st_mtime"], st["st_uid"]) == (
        src.st_mode, src.st_size, src.st_mtime_ns, src.st_uid)
    assert fs.readlink(f"{root}/link") == "etc/app.conf"
    assert fs.readlink("/snapshots/latest") == lay.names[second.id]
    big = (source / "etc" / "deep" / "big.bin").read_bytes()
    fh = fs.open(f"{root}/etc/deep/big.bin", os.O_RDONLY)
    rnd = random.Random(2)
    starts = fs._files[fh].starts
    assert len(starts) > 10  # many chunks
    for off in starts[:4] + [starts[5] - 1, len(big) - 1, len(big)] + [rnd.randrange(len(big) + 10) for _ in range(30)]:
        size = rnd.choice([1, 4096, 131072, 1 << 20])  # across chunk boundaries, at the end, past the end
        assert fs.read("", size, off, fh) == big[off : off + size]
    fs.release("", fh)
    fresh = SnapshotFS(repo)  # a sequential read has the next chunk decoded ahead, into the repository's cache
    fh = fresh.open(f"{root}/etc/deep/big.bin", os.O_RDONLY)
    ids = fresh._files[fh].ids
    repo.store._cache.items.clear()
    assert fresh.read("", 4096, 0, fh) == big[:4096]
    wait_for(lambda: ids[1] in repo.store._cache.items)
    assert ids[2] not in repo.store._cache.items
    fresh.destroy("/")
    old = fs.open(f"/snapshots/{lay.names[first.id]}/hard", os.O_RDONLY)  # a hard link reads as its file
    assert fs.read("", 100, 0, old) == b"key = value\n"
    name = os.fsdecode(b"caf\xe9")
    assert fs.getattr(f"{root}/{name}")["st_size"] == len(b"latin-1 name\n")

    def code(call):
        with pytest.raises(OSError) as info:
            call()
        return info.value.errno

    assert code(lambda: fs.getattr(f"{root}/nope")) == errno.ENOENT
    assert code(lambda: fs.getattr("/snapshots/nope")) == errno.ENOENT
    assert code(lambda: fs.open(f"{root}/empty", os.O_WRONLY)) == errno.EROFS
    assert code(lambda: fs.open(f"{root}/etc", os.O_RDONLY)) == errno.EISDIR
    assert code(lambda: listing(fs, f"{root}/empty")) == errno.ENOTDIR
    fs.destroy("/")


def test_new_snapshots_show_up_after_the_refresh_interval(repo_with, source):
    from chunkvault.mount import SnapshotFS

    repo, *_ = repo_with
    fs = SnapshotFS(repo, refresh=0.0)
    before = listing(fs, "/snapshots")
    new = repo.backup([str(source)], tags=["extra"]).snapshot
    assert Layout(repo.snapshots()).names[new.id] in listing(fs, "/snapshots")
    assert len(listing(fs, "/snapshots")) == len(before) + 1
    assert "extra" in listing(fs, "/tags")
    repo.forget([new.id])


def test_a_snapshot_another_command_made_reads_after_the_refresh(repo_with, source):
    """Its chunks are in index objects written after the mount read the index: they are read then too
    (the snapshot showed, and each of its files failed with EINVAL until a remount)."""
    from chunkvault import Repository
    from chunkvault.mount import SnapshotFS

    repo, url, *_ = repo_with
    fs = SnapshotFS(repo, refresh=0.0)
    listing(fs, "/snapshots")
    data = random.Random(9).randbytes(300_000)
    (source / "new.bin").write_bytes(data)
    try:
        with Repository.open(url, PASSWORD) as other:
            new = other.backup([str(source)]).snapshot
        path = f"/snapshots/{Layout(repo.snapshots()).names[new.id]}/new.bin"
        assert fs.getattr(path)["st_size"] == len(data)
        fh = fs.open(path, os.O_RDONLY)
        assert fs.read(path, len(data), 0, fh) == data
        fs.release(path, fh)
    finally:
        os.remove(source / "new.bin")
    repo.forget([new.id])




def test_a_snapshot_rewritten_meanwhile_shows_its_new_tree_after_the_refresh(repo_with, tmp_path):
    """A rewrite keeps the snapshot's id: its tree, kept by id, showed a path the rewrite removed (a secret
    backed up by mistake) until an unmount, its bytes readable until a prune, to a mount that reads without
    a lock (a read-only token).  Its differentials lose the path too."""
    from chunkvault import Repository
    from chunkvault.mount import SnapshotFS

    _, url, first, second = repo_with
    copy = tmp_path / "repo"
    shutil.copytree(url, copy)
    repo = Repository.open(str(copy), PASSWORD)
    fs = SnapshotFS(repo, refresh=0.0)
    names = Layout(repo.snapshots()).names
    roots = [f"/snapshots/{names[s.id]}" for s in (first, second)]
    assert all("empty" in listing(fs, root) for root in roots)
    with Repository.open(str(copy), PASSWORD) as other:
        other.rewrite(["empty"], [first.id], dry_run=False)
    for root in roots:
        assert "empty" not in listing(fs, root) and "etc" in listing(fs, root)
        with pytest.raises(OSError) as info:
            fs.getattr(f"{root}/empty")
        assert info.value.errno == errno.ENOENT
    fs.destroy("/")


def test_a_tree_read_while_the_listing_finds_its_snapshot_rewritten_is_not_kept(repo_with, tmp_path, monkeypatch):
    """The listing that finds a snapshot rewritten forgets the tree kept of it; one being read from the old
    manifest meanwhile was kept once read, after that, and showed the removed path until an unmount."""
    import threading

    from chunkvault import Repository
    from chunkvault.mount import SnapshotFS

    _, url, first, _ = repo_with
    copy = tmp_path / "repo"
    shutil.copytree(url, copy)
    repo = Repository.open(str(copy), PASSWORD)
    fs = SnapshotFS(repo, refresh=3600.0)
    root = f"/snapshots/{Layout(repo.snapshots()).names[first.id]}"
    read_tree = repo.tree

    def listed_meanwhile(snap, *args, **kwargs):
        records = list(read_tree(snap, *args, **kwargs))  # the old manifest, read
        monkeypatch.setattr(repo, "tree", read_tree)
        with Repository.open(str(copy), PASSWORD) as other:
            other.rewrite(["empty"], [first.id], dry_run=False)
        fs._list_again(threading.Event())  # the refresh, while this tree is being built
        return iter(records)

    monkeypatch.setattr(repo, "tree", listed_meanwhile)
    assert "empty" in [name for name, _, _ in fs.readdir(root)]  # as the operation found it, begun before
    assert "empty" not in listing(fs, root) and "etc" in listing(fs, root)
    fs.destroy("/")


def test_owners_that_could_not_be_read_are_asked_again(repo_with, monkeypatch, capsys):
    """A snapshot's owners that the remote did not deliver (it stopped answering) were kept as none, so its
    files showed their recorded ids until an unmount: they are asked again once the remote may answer."""
    from chunkvault import mount
    from chunkvault.errors import RemoteUnavailable

    repo, _, first, _ = repo_with
    monkeypatch.setattr(mount, "UNAVAILABLE_SECONDS", 0.0)
    fs = mount.SnapshotFS(repo)
    path = f"/snapshots/{Layout(repo.snapshots()).names[first.id]}/etc/app.conf"
    asked = []
    real = repo.owner_map

    def once_unavailable(*args, **kwargs):
        asked.append(args)
        if len(asked) == 1:
            raise RemoteUnavailable("the remote went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(repo, "owner_map", once_unavailable)
    for _ in range(3):
        fs.getattr(path)
    assert len(asked) == 2  # asked again once, then kept
    assert "the remote went away" in capsys.readouterr().err
    fs.destroy("/")


def test_a_listing_that_hangs_holds_no_lookup_up(repo_with, source, monkeypatch):
    """A remote that stops answering held the lookup that started a listing of the snapshots for the whole
    retry time (15 min by default), once every refresh: the listing runs in a thread of its own, the lookup
    goes on with the snapshots listed before, and the next one after it ends shows what it found."""
    import threading

    from chunkvault import mount
    from chunkvault.mount import SnapshotFS

    repo, _, _, _ = repo_with
    monkeypatch.setattr(mount, "LISTING_WAIT", 0.5)
    fs = SnapshotFS(repo, refresh=0.0)

    def listed() -> None:  # no listing running on (one slower than LISTING_WAIT on a loaded machine)
        deadline = time.monotonic() + 60
        while fs._listing is not None and time.monotonic() < deadline:
            time.sleep(0.01)

    listing(fs, "/snapshots")
    listed()
    before = listing(fs, "/snapshots")
    listed()
    new = repo.backup([str(source)], tags=["later"]).snapshot
    answer = threading.Event()
    real = repo.snapshots

    def hanging(*args, **kwargs):
        answer.wait(120)
        return real(*args, **kwargs)

    repo.snapshots = hanging
    try:
        assert listing(fs, "/snapshots") == before  # while the listing hangs
        assert not answer.is_set()
        assert listing(fs, "/snapshots") == before  # no second listing beside it
    finally:
        answer.set()
    listed()
    repo.snapshots = real
    try:
        assert Layout(repo.snapshots()).names[new.id] in listing(fs, "/snapshots")
    finally:
        repo.forget([new.id])
    fs.destroy("/")


def test_a_listing_that_fails_keeps_the_snapshots_shown_and_is_tried_again(repo_with, source, capsys):
    """When listing the snapshots again failed (the remote stopped answering), every lookup failed with
    EINVAL and a traceback on stderr, and each waited out the retry time anew: the snapshots listed before
    still show and read, the failure is said once, and the next refresh lists them again."""
    from chunkvault.errors import RemoteUnavailable
    from chunkvault.mount import SnapshotFS

    repo, _, first, _ = repo_with
    fs = SnapshotFS(repo, refresh=0.0)
    root = f"/snapshots/{Layout(repo.snapshots()).names[first.id]}"
    before = listing(fs, "/snapshots")
    asked = []

    def unavailable(*args, **kwargs):
        asked.append(args)
        raise RemoteUnavailable("the remote went away")

    real = repo.snapshots
    repo.snapshots = unavailable
    try:
        for _ in range(3):
            assert listing(fs, "/snapshots") == before
            assert fs.getattr(f"{root}/etc/app.conf")["st_size"] == len(b"key = value\n")
        fh = fs.open(f"{root}/etc/app.conf", os.O_RDONLY)
        assert fs.read("", 100, 0, fh) == b"key = value\n"
        fs.release("", fh)
    finally:
        repo.snapshots = real
    assert asked  # it was tried
    told = capsys.readouterr().err.splitlines()
    assert len(told) == 1 and "the remote went away" in told[0], told
    new = repo.backup([str(source)], tags=["after"]).snapshot
    try:
        assert Layout(repo.snapshots()).names[new.id] in listing(fs, "/snapshots")
    finally:
        repo.forget([new.id])
    fs.destroy("/")



def test_a_snapshot_keeps_its_name_while_mounted_when_another_of_its_second_comes(tmp_path):
    """The first of a second by time got the plain name: one backed up later but dated earlier in that second
    (backups of several sources dated one instant, or started a moment apart) took it over, and the kernel,
    which keeps file contents by path, went on giving the first snapshot's bytes under the other's name."""
    from chunkvault import Repository
    from chunkvault.mount import SnapshotFS

    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    made = {}
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(name.encode())
    made["b"] = repo.backup([str(tmp_path / "b")], time="2026-11-28T02:00:00.5+00:00").snapshot
    fs = SnapshotFS(repo, refresh=0.0)
    assert listing(fs, "/snapshots")[2:] == ["2026-11-28T02:00:00Z", "latest"]
    for name, t in (("a", "2026-11-28T02:00:00.1+00:00"), ("c", "2026-11-28T02:00:00.9+00:00")):
        made[name] = repo.backup([str(tmp_path / name)], time=t).snapshot
    shown = {made[n].id: f"2026-11-28T02:00:00Z-{made[n].id[:8]}" for n in ("a", "c")}
    shown[made["b"].id] = "2026-11-28T02:00:00Z"
    assert sorted(listing(fs, "/snapshots")[2:]) == sorted([*shown.values(), "latest"])
    for name, snap in made.items():
        fh = fs.open(f"/snapshots/{shown[snap.id]}/f", os.O_RDONLY)
        assert fs.read("", 10, 0, fh) == name.encode()
        fs.release("", fh)
        assert fs.readlink(f"/ids/{snap.id[:8]}") == f"../snapshots/{shown[snap.id]}"
    fs.destroy("/")
    assert Layout(repo.snapshots()).names[made["a"].id] == "2026-11-28T02:00:00Z"  # a mount of them now



def test_a_tree_entered_by_several_readers_at_once_is_read_once(repo_with, monkeypatch):
    """Each operation that found a snapshot's tree not yet read read it itself: readers entering a snapshot
    of a million files together decoded it as many times, each holding its copy (some 200 MB) meanwhile."""
    import sys
    import threading

    from chunkvault.mount import SnapshotFS

    repo, _, first, _ = repo_with
    fs = SnapshotFS(repo)
    release = threading.Event()
    calls = []
    real = repo.tree

    def slow_tree(snap, *args, **kwargs):
        calls.append(snap.id)
        assert release.wait(30)
        return real(snap, *args, **kwargs)

    monkeypatch.setattr(repo, "tree", slow_tree)
    got = []
    readers = [threading.Thread(target=lambda: got.append(fs._tree(first))) for _ in range(4)]

    def waiting(t: threading.Thread) -> bool:  # in _tree, reading the tree or waiting for it
        frame, names = sys._current_frames().get(t.ident), set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        return "_tree" in names and bool(names & {"slow_tree", "wait"})

    readers[0].start()
    wait_for(lambda: len(calls) == 1)
    for t in readers[1:]:
        t.start()
    wait_for(lambda: all(waiting(t) for t in readers))
    release.set()
    for t in readers:
        t.join(30)
    assert len(calls) == 1 and len(got) == 4 and all(tree is got[0] for tree in got)
    assert fs._tree(first) is got[0]
    fs.destroy("/")



def test_reads_ahead_are_bounded_by_the_threads_that_make_them(repo_with, source, monkeypatch):
    """Each read asked for the chunk after its own on two threads, with no bound: random reads (several
    readers, a backup tool's) queued hundreds, decoded for nothing, and a read of a chunk queued there waited
    for every one before it (from a remote that stopped answering, each for the retry time)."""
    import threading

    from chunkvault import mount

    repo, _, first, _ = repo_with
    fs = mount.SnapshotFS(repo)
    path = f"/snapshots/{Layout(repo.snapshots()).names[first.id]}/etc/deep/big.bin"
    fh = fs.open(path, os.O_RDONLY)
    f = fs._files[fh]
    release = threading.Event()
    read = fs._chunks._read

    def held_ahead(cid):
        if threading.current_thread().name.startswith("mount-ahead"):
            release.wait(60)
        return read(cid)

    monkeypatch.setattr(fs._chunks, "_read", held_ahead)
    want = (source / "etc" / "deep" / "big.bin").read_bytes()
    try:
        for i in range(0, len(f.ids) - 1, 2):  # every other chunk, each asking for the next one ahead
            assert fs.read(path, 100, f.starts[i], fh) == want[f.starts[i]:f.starts[i] + 100]
        assert len(f.ids) > 8 and len(fs._chunks.pending) <= 2
    finally:
        release.set()
    assert fs.read(path, 100, f.starts[1], fh) == want[f.starts[1]:f.starts[1] + 100]
    fs.destroy("/")


# --- a real mount ----------------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") and not
                                shutil.which("fusermount"), reason="no FUSE device or fusermount here")


def _unmount(path: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    subprocess.run([tool, "-u", path], capture_output=True)


@contextlib.contextmanager
def _cli_mount(url: str, mnt, **env: str) -> Iterator[subprocess.Popen]:
    """``chunkvault mount`` in a process of its own, once mounted; killed and unmounted at the end."""
    mnt.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")},
           "CHUNKVAULT_PASSWORD": PASSWORD, **env}
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "mount", "-r", url, str(mnt)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or os.path.isdir(mnt / "snapshots"), timeout=30)
        assert proc.poll() is None, proc.stderr.read().decode()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _unmount(str(mnt))


@needs_fuse
def test_a_mounted_repository_reads_like_the_source_and_unmounts_on_sigterm(repo_with, source, tmp_path):
    _, url, first, second = repo_with
    mnt = tmp_path / "mnt"
    with _cli_mount(url, mnt) as proc:
        assert sorted(os.listdir(mnt)) == sorted(TOP)
        latest = mnt / "snapshots" / "latest"
        assert os.path.islink(latest)
        want = {k: v[:5] for k, v in describe(source).items() if k != b"."}
        got = {k: v[:5] for k, v in describe(latest).items() if k != b"."}
        assert got == want
        # a hard-linked file's names share one inode and count each other, so cp -a keeps them linked
        hard, conf, other = (os.stat(latest / p) for p in ("hard", "etc/app.conf", "empty"))
        assert hard.st_ino == conf.st_ino != other.st_ino and hard.st_nlink == 2 and other.st_nlink == 1
        subprocess.run(["cp", "-a", str(latest) + "/.", str(tmp_path / "copied")], check=True)
        assert os.stat(tmp_path / "copied" / "hard").st_ino == os.stat(tmp_path / "copied" / "etc" / "app.conf").st_ino
        ids = os.listdir(mnt / "ids")
        assert first.id[:8] in ids and (mnt / "ids" / first.id[:8] / "etc" / "app.conf").read_bytes() == b"key = value\n"
        assert (mnt / "tags" / "daily" / "latest" / "etc" / "app.conf").read_bytes() == b"key = value\n"
        with pytest.raises(OSError) as info:
            (latest / "new-file").write_bytes(b"x")
        assert info.value.errno in (errno.EROFS, errno.EACCES)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert b"snapshots mounted at" in proc.stderr.read()
        assert not os.path.isdir(mnt / "snapshots")  # unmounted


@needs_fuse
def test_a_mount_says_one_line_and_nothing_of_libfuse_s_own(repo_with, tmp_path):
    """libfuse 3.14 (Debian 12's) took its own default of idle threads for an invalid value and said so on
    stderr at every mount ("Ignoring invalid max threads value 4294967295 > max (100000).")."""
    _, url, *_ = repo_with
    mnt = tmp_path / "mnt"
    with _cli_mount(url, mnt) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = proc.stderr.read().decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapshots mounted at"), lines


@needs_fuse
def test_a_mount_leaves_the_working_directory_where_it_was(repo_with, tmp_path):
    """libfuse 3 changes to / as it mounts, in the foreground too: a relative mount point's --json document
    named /mnt, and a program that mounted went on in /, its relative paths elsewhere."""
    _, url, *_ = repo_with
    (tmp_path / "mnt").mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")},
           "CHUNKVAULT_PASSWORD": PASSWORD}
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "mount", "-r", url, "mnt", "--json"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or os.path.isdir(tmp_path / "mnt" / "snapshots"), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        _unmount(str(tmp_path / "mnt"))
    assert json.loads(proc.stdout.read())["mountpoint"] == str(tmp_path / "mnt")
    program = ("import os, signal, sys\n"
               "from chunkvault import Repository\n"
               "from chunkvault.mount import mount\n"
               "def mounted():\n"
               "    print(os.getcwd(), flush=True)\n"
               "    os.kill(os.getpid(), signal.SIGTERM)\n"
               "mount(Repository.open(sys.argv[1], sys.argv[2]), 'mnt', on_mounted=mounted)\n"
               "print(os.getcwd())\n")
    done = subprocess.run([sys.executable, "-c", program, url, PASSWORD], cwd=tmp_path, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [str(tmp_path)] * 2


@needs_fuse
def test_sigquit_unmounts_as_sigterm_does(repo_with, tmp_path):
    """libfuse handles SIGTERM, SIGHUP and SIGINT, not SIGQUIT: its Python handler waited for libfuse's loop to
    end, and the mount stayed."""
    _, url, *_ = repo_with
    mnt = tmp_path / "mnt"
    with _cli_mount(url, mnt) as proc:
        assert os.path.isdir(mnt / "snapshots")
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(timeout=30) == 0
        assert not os.path.isdir(mnt / "snapshots")


def test_mount_refuses_a_mountpoint_that_is_not_an_empty_directory(repo_with, tmp_path, cli):
    _, url, *_ = repo_with
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"")
    (tmp_path / "file").write_bytes(b"")
    for where, says in ((full, "is not empty"), (tmp_path / "missing", "does not exist"),
                        (tmp_path / "file", "is not a directory")):
        out = cli("mount", "-r", url, str(where), check=2)
        assert says in out.stderr.decode() and len(out.stderr.decode().strip().splitlines()) == 1


def test_a_damaged_chunk_is_an_io_error_for_its_file_only(repo_with, tmp_path, capsys):
    """Reading a file whose chunk no longer verifies fails with EIO (never other bytes), said once on stderr
    with the object's name; the tree and the other files still read."""
    from chunkvault.mount import SnapshotFS
    from test_damaged_storage import damage_blob

    _, url, _, second = repo_with
    copy = tmp_path / "repo"
    shutil.copytree(url, copy)
    from chunkvault import Repository
    repo = Repository.open(str(copy), PASSWORD)
    lay = Layout(repo.snapshots())
    root = f"/snapshots/{lay.names[second.id]}"
    big = next(e for e in repo.tree(second) if e.path == b"etc/deep/big.bin")
    damage_blob(copy, repo, big.chunk_ids()[3])
    fs = SnapshotFS(repo)
    fh = fs.open(f"{root}/etc/deep/big.bin", os.O_RDONLY)
    start = fs._files[fh].starts[3]
    assert len(fs.read("", 4096, 0, fh)) == 4096  # chunks before it read
    with pytest.raises(OSError) as info:
        fs.read("", 4096, start + 10, fh)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError):
        fs.read("", 4096, start + 10, fh)
    told = capsys.readouterr().err.splitlines()
    assert len(told) == 1 and told[0].startswith(f"warning: {root}/etc/deep/big.bin: ")
    assert big.chunk_ids()[3].hex()[:12] in told[0] or "pack" in told[0]
    other = fs.open(f"{root}/etc/app.conf", os.O_RDONLY)
    assert fs.read("", 100, 0, other) == b"key = other\n"
    assert "etc" in listing(fs, root)
    fs.destroy("/")


def _brute_seek(holes, size, offset, hole):
    """lseek(2)'s SEEK_HOLE / SEEK_DATA answer, byte by byte."""
    zero = [any(s <= b < s + n for s, n in holes) for b in range(size)] + [True]  # the end counts as a hole
    at = next((b for b in range(offset, size + 1) if zero[b] == hole), None) if 0 <= offset < size else None
    return None if at == size and not hole else at


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6)), max_size=5), st.integers(0, 8),
       st.integers(-1, 40), st.booleans())
def test_seek_data_or_hole_lands_where_a_byte_by_byte_search_does(gaps, tail, offset, hole):
    from chunkvault.mountview import seek_data_or_hole

    holes, pos = [], 0
    for gap, n in gaps:
        pos += gap
        if holes and sum(holes[-1]) == pos:  # holes apart, as zero_runs gives them
            pos += 1
        holes.append((pos, n))
        pos += n
    size = pos + tail
    assert seek_data_or_hole(holes, size, offset, hole) == _brute_seek(holes, size, offset, hole)


@pytest.fixture(scope="module")
def sparse_repo(tmp_path_factory):
    """A snapshot of a file of 24 MiB holding 3 runs of data, with holes of 4 MiB or more between and at
    the end, and of one whose zeros are under 1 MiB each."""
    from chunkvault import Repository

    src = tmp_path_factory.mktemp("sparse-src")
    rnd = random.Random(7)
    with open(src / "sparse", "wb") as f:
        for at in (0, 8 << 20, 12 << 20):
            f.seek(at)
            f.write(rnd.randbytes(300_000))
        f.truncate(24 << 20)
    (src / "dense").write_bytes(rnd.randbytes(100_000) + bytes(900_000) + rnd.randbytes(100_000))
    url = str(tmp_path_factory.mktemp("sparse-repo") / "repo")
    repo = Repository.init(url, PASSWORD, kdf_seconds=0,
                           chunker={"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 256 << 10})
    snap = repo.backup([str(src)]).snapshot
    return repo, url, src, snap


def test_the_mount_tells_runs_of_zero_chunks_of_1_mib_or_more_as_holes(sparse_repo):
    from chunkvault.mount import SnapshotFS

    repo, _, _, snap = sparse_repo
    fs = SnapshotFS(repo)
    root = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}"
    fh = fs.open(f"{root}/sparse", os.O_RDONLY)
    cut = 256 << 10  # the chunker's longest chunk: what it cuts a run of zeros into
    assert 900_000 <= fs.getattr(f"{root}/sparse")["st_blocks"] * 512 <= 900_000 + 6 * cut  # its data alone
    assert fs.getattr(f"{root}/dense")["st_blocks"] * 512 == 1_100_000 + 512 - 1_100_000 % 512
    assert fs.lseek("", 0, os.SEEK_DATA, fh) == 0
    first_hole = fs.lseek("", 0, os.SEEK_HOLE, fh)  # where the chunks of zeros after the first run begin
    assert 300_000 <= first_hole <= 300_000 + cut
    assert (8 << 20) - cut <= fs.lseek("", first_hole, os.SEEK_DATA, fh) <= 8 << 20
    in_data = (8 << 20) + 1000
    assert fs.lseek("", in_data, os.SEEK_DATA, fh) == in_data
    assert (8 << 20) + 300_000 <= fs.lseek("", in_data, os.SEEK_HOLE, fh) <= (8 << 20) + 300_000 + cut
    assert fs.lseek("", 9 << 20, os.SEEK_HOLE, fh) == 9 << 20
    assert (12 << 20) - cut <= fs.lseek("", 9 << 20, os.SEEK_DATA, fh) <= 12 << 20
    with pytest.raises(OSError) as info:
        fs.lseek("", 20 << 20, os.SEEK_DATA, fh)  # only a hole to the end
    assert info.value.errno == errno.ENXIO
    assert fs.lseek("", 20 << 20, os.SEEK_HOLE, fh) == 20 << 20
    with pytest.raises(OSError) as info:
        fs.lseek("", 24 << 20, os.SEEK_HOLE, fh)
    assert info.value.errno == errno.ENXIO
    dense = fs.open(f"{root}/dense", os.O_RDONLY)  # its zeros are no hole: under 1 MiB
    assert fs.lseek("", 0, os.SEEK_HOLE, dense) == 1_100_000 and fs.lseek("", 200_000, os.SEEK_DATA, dense) == 200_000
    fs.destroy("/")


def test_small_files_do_not_push_a_large_file_s_holes_out_of_those_kept(tmp_path, monkeypatch):
    """A file under 1 MiB has no hole to find, yet each one getattr saw took a place among the files whose
    holes are kept: ``ls -l`` of a directory of small files pushed a large one's out, and its next getattr
    found them again, a locate of each of its chunks."""
    from chunkvault import Repository
    from chunkvault import mount as mount_module

    monkeypatch.setattr(mount_module, "HOLES_KEPT", 2)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as f:
        f.write(b"data")
        f.truncate(12 << 20)
    for n in range(4):
        (src / f"small{n}").write_bytes(b"x" * 100)
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    snap = repo.backup([str(src)]).snapshot
    found = []
    real = repo.holes
    monkeypatch.setattr(repo, "holes", lambda e: found.append(e.path) or real(e))
    fs = mount_module.SnapshotFS(repo)
    root = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}"
    blocks = fs.getattr(f"{root}/big")["st_blocks"]
    assert blocks * 512 < 4 << 20
    for n in range(4):
        assert fs.getattr(f"{root}/small{n}")["st_blocks"] == 1
    assert fs.getattr(f"{root}/big")["st_blocks"] == blocks
    assert len(found) == 1, found
    fs.destroy("/")


@needs_fuse
@pytest.mark.skipif(ctypes.util.find_library("fuse3") is None, reason="no libfuse 3 here (libfuse 2 has no lseek)")
def test_a_sparse_file_copied_out_of_the_mount_keeps_its_holes_unread(sparse_repo, tmp_path):
    """Without lseek passed on (mfusepy 3.1 has no wrapper for it), the kernel found no hole in a file of
    the mount: cp read a file of 20 GiB holding a few MiB whole, and wrote 20 GiB of zeros."""
    _, url, src, snap = sparse_repo
    mnt = tmp_path / "mnt"
    with _cli_mount(url, mnt):
        path = mnt / "ids" / snap.id[:8] / "sparse"
        fd = os.open(path, os.O_RDONLY)
        try:
            hole = os.lseek(fd, 0, os.SEEK_HOLE)
            assert hole < 1 << 20 and (8 << 20) - (256 << 10) <= os.lseek(fd, hole, os.SEEK_DATA) <= 8 << 20
            with pytest.raises(OSError) as info:
                os.lseek(fd, 20 << 20, os.SEEK_DATA)
            assert info.value.errno == errno.ENXIO
        finally:
            os.close(fd)
        subprocess.run(["cp", "--sparse=auto", str(path), str(tmp_path / "copy")], check=True)
    assert (tmp_path / "copy").read_bytes() == (src / "sparse").read_bytes()
    if os.stat(src / "sparse").st_blocks * 512 < 4 << 20:  # a file system that keeps holes
        assert os.stat(tmp_path / "copy").st_blocks * 512 < 4 << 20


def test_a_snapshot_of_several_paths_shows_the_directories_above_them(repo_with, source, tmp_path):
    """Several sources keep their absolute paths: the directories above them are recorded too, and the
    snapshot's root, which has no entry, reads as a plain directory."""
    from chunkvault import Repository
    from chunkvault.mount import SnapshotFS

    for name in ("other", "more"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_bytes(name.encode() + b"\n")
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    snap = repo.backup([str(tmp_path / "other"), str(tmp_path / "more")]).snapshot
    fs = SnapshotFS(repo)
    root = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}"
    top = str(tmp_path).lstrip("/")
    for d in (root, f"{root}/{top.split('/')[0]}", f"{root}/{top}"):
        assert fs.getattr(d)["st_mode"] & 0o170000 == 0o040000
    assert listing(fs, root) == [".", "..", top.split("/")[0]]
    assert listing(fs, f"{root}/{top}") == [".", "..", "more", "other"]
    assert fs.getattr(f"{root}/{top}")["st_mode"] == os.stat(tmp_path).st_mode
    fh = fs.open(f"{root}/{top}/other/x", os.O_RDONLY)
    assert fs.read("", 10, 0, fh) == b"other\n"
    fs.destroy("/")


def test_a_directory_kept_only_by_the_paths_below_it_reads_as_a_plain_directory(repo_with):
    """A differential can keep its own version of a path whose directory a rewrite removed from its
    parent; the mount still reaches the path."""
    from chunkvault.mount import SnapshotFS

    repo, _, _, second = repo_with
    fs = SnapshotFS(repo)
    fs._trees[second.id] = SnapshotTree([Entry(b"", T_DIR), Entry(b"gone/kept", T_FILE, mode=0o644)])
    root = f"/snapshots/{Layout(repo.snapshots()).names[second.id]}"
    assert listing(fs, root) == [".", "..", "gone"]
    assert fs.getattr(f"{root}/gone")["st_mode"] & 0o170000 == 0o040000
    assert listing(fs, f"{root}/gone") == [".", "..", "kept"]
    assert fs.getattr(f"{root}/gone/kept")["st_mode"] == 0o100644
    fs.destroy("/")


def test_an_error_the_mount_answers_looks_for_libfuse_no_more(repo_with, monkeypatch):
    """Each error a mount answers (ENODATA for each ACL ``ls -l`` asks of a file that has none, ENOENT)
    made its exception by looking for libfuse 3 again, running ``ldconfig -p`` each time."""
    import ctypes.util

    from chunkvault import mount

    repo, _, _, second = repo_with
    fs = mount.SnapshotFS(repo)
    root = f"/snapshots/{Layout(repo.snapshots()).names[second.id]}"
    mount._fuse()
    looked: list[str] = []
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: looked.append(name) or real(name))
    for path in (f"{root}/etc/app.conf", root, "/snapshots"):
        with pytest.raises(OSError) as info:
            fs.getxattr(path, "system.posix_acl_access")
        assert info.value.errno == errno.ENODATA
    with pytest.raises(OSError) as info:
        fs.getattr(f"{root}/nope")
    assert info.value.errno == errno.ENOENT
    assert looked == []
    fs.destroy("/")


def test_snapshots_listed_long_read_no_tree_and_list_the_repository_no_more(repo_with, monkeypatch):
    """``ls -l snapshots/`` (each snapshot's attributes and ACLs) read every snapshot's whole tree, each after
    listing the repository and its index again: quadratic in the snapshots (2,000 took over two minutes).
    The roots' attributes are those their trees give."""
    from chunkvault import mount

    repo, _, first, second = repo_with
    fs = mount.SnapshotFS(repo, refresh=3600)
    names = Layout(repo.snapshots()).names
    listed = []
    for name in ("snapshots", "refresh_index"):
        real = getattr(repo.store, name)
        monkeypatch.setattr(repo.store, name, lambda real=real, name=name: listed.append(name) or real())
    shown = {}
    for s in (first, second):
        path = f"/snapshots/{names[s.id]}"
        shown[s.id] = fs.getattr(path)
        assert fs.listxattr(path) == []
        assert fs.getattr(path) == shown[s.id]
    assert listed == [] and not fs._trees
    for s in (first, second):
        fs._roots.clear()
        fs._tree(s)
        assert fs.getattr(f"/snapshots/{names[s.id]}") == shown[s.id]
    assert shown[first.id]["st_mode"] & 0o170000 == 0o040000
    fs.destroy("/")


def test_the_trees_kept_are_bounded_by_their_size(repo_with, monkeypatch):
    """A count of trees alone let a mount of large snapshots grow to gigabytes.  The tree in use is kept
    whatever its size."""
    from chunkvault import mount

    repo, _, first, second = repo_with
    fs = mount.SnapshotFS(repo)
    size = fs._tree(first).nbytes
    monkeypatch.setattr(mount, "TREE_BYTES_KEPT", size)  # room for one tree
    fs._tree(second)
    assert list(fs._trees) == [second.id]
    monkeypatch.setattr(mount, "TREE_BYTES_KEPT", size + fs._tree(second).nbytes)
    fs._tree(first)
    assert list(fs._trees) == [second.id, first.id]


@needs_fuse
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_mount_whose_remote_went_away_ends_on_a_signal_within_seconds(serve_factory, tmp_path, how):
    """libfuse, told to end, waits for the reads under way: one retrying a remote that went away held the
    mount point hung, and the command, for the whole retry time (15 min), Ctrl-C and SIGTERM alike."""
    import threading

    from chunkvault import Repository

    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(3).randbytes(8 << 20))
    with Repository.init(server.url, PASSWORD, kdf_seconds=0, token=FULL_TOKEN) as repo:
        repo.backup([str(src)])
    mnt = tmp_path / "mnt"
    with _cli_mount(server.url, mnt, CHUNKVAULT_HTTP_TOKEN=FULL_TOKEN,
                    CHUNKVAULT_CACHE_DIR=str(tmp_path / "cache")) as proc:
        big = mnt / "snapshots" / "latest" / "big"
        assert big.stat().st_size == 8 << 20
        server.stop(signal.SIGKILL)
        failed: list[BaseException] = []

        def read() -> None:
            try:
                big.read_bytes()
            except OSError as exc:
                failed.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(2)  # the read retries the remote that went away
        assert reader.is_alive()
        proc.send_signal(how)
        assert proc.wait(timeout=120) == 0  # it waited 15 minutes
        reader.join(30)
        assert failed and not reader.is_alive()
        assert not os.path.isdir(mnt / "snapshots")  # unmounted


@needs_fuse
@pytest.mark.parametrize("how", ["SIGTERM", "unmount"])
def test_a_mount_whose_remote_went_away_ends_within_seconds_with_no_read_under_way(serve_factory, tmp_path, how):
    """Unmounted with no read under way, the mount went on removing its lock from the remote that went away
    for the whole outage time (15 min), past a service manager's stop timeout: it is left to go stale."""
    from chunkvault import Repository

    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    with Repository.init(server.url, PASSWORD, kdf_seconds=0, token=FULL_TOKEN) as repo:
        repo.backup([str(src)])
    mnt = tmp_path / "mnt"
    with _cli_mount(server.url, mnt, CHUNKVAULT_HTTP_TOKEN=FULL_TOKEN,
                    CHUNKVAULT_CACHE_DIR=str(tmp_path / "cache")) as proc:
        assert (mnt / "snapshots" / "latest" / "f").read_bytes() == b"data\n"
        server.stop(signal.SIGKILL)
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            _unmount(str(mnt))
        assert proc.wait(timeout=60) == 0  # it retried for 15 minutes
        lines = proc.stderr.read().decode().splitlines()
    assert len(lines) == 2 and "lock could not be removed" in lines[1] and "stale" in lines[1], lines
    assert not os.path.isdir(mnt / "snapshots")


def test_a_read_that_gave_up_on_the_remote_fails_the_next_reads_at_once(repo_with, monkeypatch):
    """The kernel asks again for a page whose read-ahead failed: each ask waited out the retry time anew,
    and a reader never saw the error.  For a minute after one read gives up, reads fail at once."""
    from chunkvault import mount
    from chunkvault.errors import RemoteUnavailable
    FuseOSError = fuse_os_error()

    repo, _, first, _ = repo_with
    fs = mount.SnapshotFS(repo)
    root = f"/snapshots/{Layout(repo.snapshots()).names[first.id]}"
    fh = fs.open(f"{root}/etc/app.conf", os.O_RDONLY)
    asked = []

    def unavailable(*args, **kwargs):
        asked.append(args)
        raise RemoteUnavailable("the remote went away")

    monkeypatch.setattr(repo.store, "read_blob", unavailable)
    for _ in range(3):
        with pytest.raises(FuseOSError) as info:
            fs.read(f"{root}/etc/app.conf", 4096, 0, fh)
        assert info.value.errno == errno.EIO
    assert len(asked) == 1
    monkeypatch.setattr(mount, "UNAVAILABLE_SECONDS", 0.0)
    fs._unavailable_until = float("-inf")
    with pytest.raises(FuseOSError):
        fs.read(f"{root}/etc/app.conf", 4096, 0, fh)
    assert len(asked) == 2
    fs.destroy("/")


def fuse_os_error() -> type:
    """mfusepy's FuseOSError, mfusepy loaded as a mount loads it (libfuse 3 where there is one): imported first
    by a test, it took libfuse 2 for the tests after it in the same process."""
    from chunkvault import mount

    return mount._fuse().FuseOSError


def held_listing(repo, monkeypatch):
    """The next listing of the snapshots starts and waits until the Event returned is set; the operation that
    starts it goes on at once with the snapshots listed before (as one does after ``LISTING_WAIT``)."""
    import threading

    from chunkvault import mount

    gate = threading.Event()
    list_snapshots = repo.snapshots
    monkeypatch.setattr(repo, "snapshots", lambda *a, **k: (gate.wait(60), list_snapshots(*a, **k))[1])
    monkeypatch.setattr(mount, "LISTING_WAIT", 0.0)
    return gate


def _two_files_of_small_chunks(tmp_path, seed: int, other: str):
    """A new repository of 64 KiB chunks at tmp_path/repo, and tmp_path/src holding kept.bin and ``other``
    (1 MiB of random bytes each): the repository, the source directory and kept.bin's bytes."""
    from chunkvault import Repository

    rnd = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    kept = rnd.randbytes(1 << 20)
    (src / "kept.bin").write_bytes(kept)
    (src / other).write_bytes(rnd.randbytes(1 << 20))
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0,
                           chunker={"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 256 << 10})
    return repo, src, kept


@pytest.fixture
def pruned_under(tmp_path):
    """A repository whose second snapshot's file shares a pack with a file only the first holds, and a
    ``prune()`` that forgets the first and repacks that pack (from another client, as another command
    would): a mount reading without the lock (``--no-lock``, a read-only token) has the data moved under it."""
    from chunkvault import Repository

    repo, src, kept = _two_files_of_small_chunks(tmp_path, 11, "gone.bin")
    url = str(tmp_path / "repo")
    first = repo.backup([str(src)]).snapshot
    (src / "gone.bin").unlink()
    second = repo.backup([str(src)]).snapshot
    packs = lambda: {p.name for p in (tmp_path / "repo" / "data").glob("*/*")}  # noqa: E731
    packs_before = packs()

    def prune(forget: list[str]) -> None:
        with Repository.open(url, PASSWORD) as other:
            other.forget(forget)
            other.prune()
        assert not packs_before & packs()  # the pack was repacked, or deleted
        repo.store._cache.items.clear()  # the chunks read so far are read again

    yield repo, kept, first, second, prune
    repo.close()


def test_a_file_read_on_across_a_prune_reads_its_data_where_the_prune_moved_it(pruned_under):
    """The mount read on with the index it had read: once a prune repacked a file's chunks, each read of the
    open file failed (EIO, a missing pack, "`repair index` drops it from the index") until a lookup listed
    the snapshots again.  A read that fails where the index was replaced since reads it again and retries."""
    from chunkvault.mount import SnapshotFS

    repo, kept, first, second, prune = pruned_under
    fs = SnapshotFS(repo, refresh=3600.0)
    path = f"/snapshots/{Layout(repo.snapshots()).names[second.id]}/kept.bin"
    fh = fs.open(path, os.O_RDONLY)
    assert fs.read(path, 4096, 0, fh) == kept[:4096]
    wait_for(lambda: not fs._chunks.pending)
    prune([first.id])
    assert fs.read(path, len(kept), 0, fh) == kept
    fs.release(path, fh)
    fs.destroy("/")
    fs._chunks.pool.shutdown(wait=True)  # its reads ahead ended: no thread left to later tests


def test_a_read_ahead_that_failed_before_the_index_was_read_again_is_read_again(pruned_under):
    """A chunk read ahead with the index from before a prune failed, and the read that wanted it took that
    failure for its own, though the index had been read again since."""
    from concurrent.futures import Future

    from chunkvault.errors import MissingObject
    from chunkvault.mount import SnapshotFS

    repo, kept, first, second, prune = pruned_under
    fs = SnapshotFS(repo, refresh=3600.0)
    path = f"/snapshots/{Layout(repo.snapshots()).names[second.id]}/kept.bin"
    fh = fs.open(path, os.O_RDONLY)
    prune([first.id])
    repo.store.refresh_index()
    f = fs._files[fh]
    failed: Future = Future()
    failed.set_exception(MissingObject("data/00/00", "pack holding blob 00 is missing"))
    fs._chunks.pending[f.ids[1]] = failed
    assert fs.read(path, len(kept), 0, fh) == kept
    fs.destroy("/")
    fs._chunks.pool.shutdown(wait=True)  # its reads ahead ended: no thread left to later tests


def test_a_read_of_data_a_prune_removed_meanwhile_says_so_once_not_repair(pruned_under, monkeypatch, capsys):
    """A snapshot forgotten and pruned while a file of it was open: each read is EIO, and one line says a
    prune ran meanwhile; each chunk's read said the repository needed `repair index`, in a line of its own.
    A snapshot entered first then, as listed before, is EIO too, said so; listed again, it is gone."""
    FuseOSError = fuse_os_error()

    from chunkvault.mount import SnapshotFS

    repo, kept, first, second, prune = pruned_under
    fs = SnapshotFS(repo, refresh=3600.0)
    names = Layout(repo.snapshots()).names
    path = f"/snapshots/{names[first.id]}/gone.bin"
    fh = fs.open(path, os.O_RDONLY)
    prune([first.id, second.id])
    for offset in (0, 1 << 19, 0):  # the index read again at the first, as the index now stored at the others
        with pytest.raises(FuseOSError) as info:
            fs.read(path, 4096, offset, fh)
        assert info.value.errno == errno.EIO
    gate = held_listing(repo, monkeypatch)  # the operation goes on with the snapshots listed before
    with pytest.raises(FuseOSError) as info:  # a snapshot entered first now, as listed before the prune
        fs.readdir(f"/snapshots/{names[second.id]}")
    assert info.value.errno == errno.EIO
    gate.set()
    wait_for(lambda: fs._listing is None)
    with pytest.raises(FuseOSError) as info:
        fs.readdir(f"/snapshots/{names[second.id]}")
    assert info.value.errno == errno.ENOENT
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("a prune ran meanwhile" in line and "`repair" not in line for line in err), err
    fs.destroy("/")
    fs._chunks.pool.shutdown(wait=True)  # its reads ahead ended: no thread left to later tests


def test_a_prune_a_read_found_lists_the_snapshots_again_at_the_next_lookup(tmp_path, monkeypatch, capsys):
    """Once a read found the index replaced (a prune ran), the snapshots as listed before still showed for up
    to the refresh interval: a path a rewrite removed and the prune freed was there, and opening it failed
    with an I/O error naming a chunk "in no index".  The next lookup lists them again; an open that goes on
    with the listing before (one under way) says a prune ran meanwhile."""
    FuseOSError = fuse_os_error()

    from chunkvault import Repository, mount

    repo, src, kept = _two_files_of_small_chunks(tmp_path, 12, "secret.bin")
    url = str(tmp_path / "repo")
    snap = repo.backup([str(src)]).snapshot
    fs = mount.SnapshotFS(repo, refresh=3600.0)
    root = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}"
    fh = fs.open(f"{root}/kept.bin", os.O_RDONLY)
    assert "secret.bin" in listing(fs, root)
    with Repository.open(url, PASSWORD) as other:
        other.rewrite(["secret.bin"], [snap.id], dry_run=False)
        other.prune()  # the pack of both repacked: kept.bin's chunks moved, secret.bin's gone
    repo.store._cache.items.clear()
    assert fs.read(f"{root}/kept.bin", len(kept), 0, fh) == kept  # the index read again: the prune is known
    gate = held_listing(repo, monkeypatch)  # the operation goes on with the snapshots listed before
    with pytest.raises(FuseOSError) as info:
        fs.open(f"{root}/secret.bin", os.O_RDONLY)
    gate.set()
    wait_for(lambda: fs._listing is None)
    assert info.value.errno == errno.EIO
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "a prune ran meanwhile" in err[0] and "in no index" not in err[0], err
    with pytest.raises(FuseOSError) as info:  # listed again: the path is gone
        fs.getattr(f"{root}/secret.bin")
    assert info.value.errno == errno.ENOENT
    fs.destroy("/")
    fs._chunks.pool.shutdown(wait=True)  # its reads ahead ended: no thread left to later tests
    repo.close()


def test_a_mount_whose_lock_another_command_removed_says_so_once_and_reads_on(tmp_path, capsys):
    """Its lock removed by another host that took it for stale (an outage longer than the stale time), the
    mount read on unlocked, prunes running under it, without a word."""
    from chunkvault import mount

    repo, src, kept = _two_files_of_small_chunks(tmp_path, 13, "other.bin")
    snap = repo.backup([str(src)]).snapshot
    with repo.reading("mount"):
        fs = mount.SnapshotFS(repo, refresh=0.0)
        root = f"/snapshots/{Layout(repo.snapshots()).names[snap.id]}"
        assert "kept.bin" in listing(fs, root)
        (lock,) = repo._read_locks
        assert lock.refresh() and repo.read_lock_removed() is None
        listing(fs, "/snapshots")
        assert capsys.readouterr().err == ""
        repo.store.remote.delete(lock.key)  # as another host's command removes a lock it takes for stale
        assert not lock.refresh()
        for _ in range(3):
            listing(fs, "/snapshots")
            wait_for(lambda: fs._listing is None)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "mount's lock was found removed by another command" in err[0], err
        fh = fs.open(f"{root}/kept.bin", os.O_RDONLY)
        assert fs.read(f"{root}/kept.bin", len(kept), 0, fh) == kept
        fs.destroy("/")
        fs._chunks.pool.shutdown(wait=True)
    repo.close()


def test_readdir_plus_gives_each_entry_getattr_s_attributes_once_per_refresh(repo_with):
    """readdirplus: a listing carries each entry's attributes, so the kernel looks none up (``find -ls`` of
    100,000 files made 100,000 round trips to getattr).  Sent again within the refresh interval (the kernel
    holds them as long), a listing carries inode numbers alone, as plain readdir's does."""
    from chunkvault.mount import SnapshotFS

    repo, _, first, second = repo_with
    fs = SnapshotFS(repo, refresh=3600.0)
    names = Layout(repo.snapshots()).names
    for path in ("/", "/snapshots", f"/snapshots/{names[second.id]}", f"/snapshots/{names[second.id]}/etc",
                 f"/snapshots/{names[first.id]}/etc/deep"):
        fh = fs.opendir(path)
        sent = list(fs.readdir_plus(path, fh, 0))
        assert [n for n, _ in sent] == [n for n, _, _ in fs.readdir(path)]
        for name, attrs in sent[2:]:
            child = path.rstrip("/") + "/" + name
            if isinstance(fs._node(child), InSnapshot) and not fs._node(child).rel:
                assert attrs == {"st_ino": fs.getattr(child)["st_ino"]}  # a snapshot's root: not read for a listing
            else:
                assert attrs == fs.getattr(child), child
        assert list(fs.readdir_plus(path, fh, 3)) == sent[3:]  # the rest of the listing, as the next call asks
        fs.releasedir(path, fh)
        fh = fs.opendir(path)
        again = list(fs.readdir_plus(path, fh, 0))
        fs.releasedir(path, fh)
        if path.startswith("/snapshots/"):  # sent with attributes just now
            assert again == [(n, {"st_ino": a["st_ino"]}) for n, a in sent] != sent
        else:  # above the snapshots, attributes cost nothing
            assert again == sent
    fs._chunks.pool.shutdown(wait=True)
    fs = SnapshotFS(repo, refresh=0.0)  # what the kernel held has expired: sent with attributes again
    assert list(fs.readdir_plus(path, 0, 0)) == list(fs.readdir_plus(path, 0, 0)) == sent
    fs._chunks.pool.shutdown(wait=True)


@needs_fuse
def test_a_mounted_tree_is_traversed_without_a_getattr_per_entry(tmp_path, monkeypatch):
    import threading

    from chunkvault import Repository, mount

    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(150):
            (src / f"d{d}" / f"f{f}").write_bytes(b"%d" % f)
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    repo.backup([str(src)])
    asked: list[str] = []
    getattr_ = mount.SnapshotFS.getattr
    monkeypatch.setattr(mount.SnapshotFS, "getattr", lambda fs, path, fh=None: (asked.append(path),
                                                                                  getattr_(fs, path, fh))[1])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = threading.Event()
    thread = threading.Thread(target=mount.mount, args=(repo, str(mnt)), kwargs={"on_mounted": mounted.set})
    thread.start()
    try:
        assert mounted.wait(30)
        latest = mnt / "snapshots" / "latest"
        seen = {os.path.relpath(os.path.join(d, n), latest): os.lstat(os.path.join(d, n))
                for d, dirs, files in os.walk(latest) for n in dirs + files}
    finally:
        _unmount(str(mnt))
        thread.join(30)
    want = {os.path.relpath(os.path.join(d, n), src): os.lstat(os.path.join(d, n))
            for d, dirs, files in os.walk(src) for n in dirs + files}
    shown = lambda stats: {p: (s.st_mode, s.st_mtime_ns, None if stat.S_ISDIR(s.st_mode) else s.st_size)  # noqa: E731
                           for p, s in stats.items()}
    assert shown(seen) == shown(want)
    assert len(seen) == 453 and len(asked) < 20, asked
    repo.close()
