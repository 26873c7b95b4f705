"""Restoring with worker processes: the same tree as one process restores, errors carried back whole.

Forking needs a process with no other thread, which a test session is not
sure to be: each restore here runs in a fresh interpreter (``_restore_in_child``).
"""
import dataclasses
import io
import itertools
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault.errors import CorruptObject, TargetUnwritable
from chunkvault.store.manifest import T_DIR, T_FILE, T_HARDLINK, T_SYMLINK, Entry, entry_record
from chunkvault.store import restore_workers
from chunkvault.store.restore_workers import (STRIPE_BYTES, StripeClaims, _share, auto_processes, every_nth,
                                              split, split_above)
from test_backup_restore import make_rich_tree
from treeutil import assert_holes_kept, backed_up, describe, make_holes_inside_chunks, makes_holes

PASSWORD = "correct horse battery staple"


def _restore_in_child(repo: str, target: str, *, processes: int, stripe: int = 64 << 10, before: str = "",
                      progress: bool = False) -> dict:
    """Restore ``latest`` in a fresh interpreter; its result (or error) as a dict."""
    script = textwrap.dedent(f"""
        import json, sys
        import chunkvault.store.restore_workers as workers
        from chunkvault import Repository
        workers.STRIPE_BYTES = {stripe}
        workers.SPLIT_SHARE = 1 << 40  # every file over a stripe in parts
        {before}
        calls = []
        repo = Repository.open({repo!r}, {PASSWORD!r}, ledger=False)
        try:
            r = repo.restore("latest", {target!r}, processes={processes},
                             progress=(lambda f, b: calls.append((f, b))) if {progress} else None)
        except Exception as exc:
            print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
            sys.exit(0)
        print(json.dumps({{"files": r.files, "bytes": r.bytes, "dirs": r.dirs, "links": r.links,
                           "processes": r.processes, "warnings": r.warnings, "progress": calls[-1:]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _many_files(root) -> None:
    """Directories of files of many sizes (several stripes of 64 KiB), a read-only directory, links across stripes."""
    make_rich_tree(root)
    for d in range(6):
        sub = root / f"d{d}"
        sub.mkdir()
        for i in range(25):
            (sub / f"f{i}").write_bytes(os.urandom((i * 7919 + d * 104729) % 50000))
    os.link(root / "d5" / "f24", root / "a-link-to-a-late-file")
    ro = root / "d3"
    os.chmod(ro, 0o555)
    os.utime(ro, ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))


def _counting_trees(counter: str, shared_entries: int) -> str:
    """Code for ``before``: every resolution of a snapshot's tree, in any process, appends to ``counter``."""
    return (f"import chunkvault.store.repository as R\n"
            f"        tree = R.Repo.tree\n"
            f"        R.Repo.tree = lambda *a, **k: (open({counter!r}, 'a').write('x'), tree(*a, **k))[1]\n"
            f"        workers.SHARED_TREE_ENTRIES = {shared_entries}")


@pytest.mark.parametrize("shared", [True, False], ids=["tree shared", "tree walked by each process"])
def test_workers_restore_the_same_tree(tmp_path, new_repo, shared):
    _, url, src = backed_up(tmp_path, new_repo, _many_files)
    counter = str(tmp_path / "trees")
    try:
        out = tmp_path / "out"
        r = _restore_in_child(url, str(out), processes=3, progress=True,
                              before=_counting_trees(counter, 10**6 if shared else 0))
        assert r["processes"] == 3
        with open(counter) as f:
            assert len(f.read()) == (1 if shared else 4)  # resolved once, or by the parent and each worker
        assert describe(out) == describe(src)
        assert r["files"] == sum(1 for v in describe(src).values() if v[0] == "file") - 2  # two are hard links
        assert r["progress"] == [[r["files"], r["bytes"]]]
        assert os.stat(out / "sparse").st_blocks * 512 < 1024 * 1024
        assert os.stat(out / "a-link-to-a-late-file").st_ino == os.stat(out / "d5" / "f24").st_ino
        one = tmp_path / "one"
        single = _restore_in_child(url, str(one), processes=1)
        assert single["processes"] == 1
        assert {k: v for k, v in single.items() if k not in ("processes", "progress")} == \
            {k: v for k, v in r.items() if k not in ("processes", "progress")}
    finally:
        os.chmod(src / "d3", 0o755)
        for d in ("out", "one"):
            if (tmp_path / d / "d3").exists():
                os.chmod(tmp_path / d / "d3", 0o755)


def test_workers_that_cannot_start_leave_the_restore_to_this_process(tmp_path, new_repo):
    """Under a low limit (open files, processes) the workers do not start: the restore is done in one
    process, with a warning naming the limit, where it ended with that error and restored nothing."""
    _, url, src = backed_up(tmp_path, new_repo, _many_files)
    try:
        cannot_start = textwrap.dedent("""
            from chunkvault.store import forked
            def cannot_start(self, n, work):
                raise forked.WorkersNotStarted("could not start worker process 2 of 3 (Too many open files); none "
                                               "is left running: raise the limit (ulimit -n, LimitNOFILE=)")
            forked.Workers.__init__ = cannot_start
        """).replace("\n", "\n        ")
        r = _restore_in_child(url, str(tmp_path / "out"), processes=3, before=cannot_start)
        assert r["processes"] == 1 and describe(tmp_path / "out") == describe(src)
        assert r["warnings"] == ["could not start worker process 2 of 3 (Too many open files); none is left "
                                 "running: raise the limit (ulimit -n, LimitNOFILE=); restored in this process "
                                 "instead"]
    finally:
        os.chmod(src / "d3", 0o755)
        if (tmp_path / "out" / "d3").exists():
            os.chmod(tmp_path / "out" / "d3", 0o755)


def test_workers_started_before_one_that_cannot_start_write_nothing(tmp_path, new_repo):
    """The third worker's fork fails (EMFILE) once the first two had every chance to begin: they wait for all
    to start, so the restore done in this process instead finds an empty target.  They wrote their stripes,
    and the restore then failed on each of those files ('File exists', exit 14), one left cut short."""
    _, url, src = backed_up(tmp_path, new_repo, _many_files)
    out = tmp_path / "out"
    try:
        third_fails = textwrap.dedent(f"""
            import errno, os, time
            from chunkvault.store import forked
            fork = forked.Workers._fork
            def failing(self, k, work):
                if k < 2:
                    return fork(self, k, work)
                for _ in range(300):  # until a worker wrote a file, or long enough for one to have
                    if any(len(files) for _, _, files in os.walk({str(out)!r})):
                        break
                    time.sleep(0.01)
                raise OSError(errno.EMFILE, "Too many open files")
            forked.Workers._fork = failing
        """).replace("\n", "\n        ")
        r = _restore_in_child(url, str(out), processes=3, before=third_fails)
        assert "error" not in r, r
        assert r["processes"] == 1 and describe(out) == describe(src)
        assert r["warnings"] == ["could not start worker process 3 of 3 (Too many open files); none is left "
                                 "running: raise the limit (ulimit -n, LimitNOFILE=); restored in this process "
                                 "instead"]
    finally:
        os.chmod(src / "d3", 0o755)
        if (out / "d3").exists():
            os.chmod(out / "d3", 0o755)


@pytest.mark.parametrize("stripe", [1 << 20, 256 << 20], ids=["files written in parts", "files written whole"])
def test_workers_leave_blocks_of_zeros_inside_chunks_holes(tmp_path, new_repo, stripe):
    """Worker processes keep holes at block granularity as one process does: in a file whose stripes several
    processes write, and in one a worker writes whole."""
    _, url, src = backed_up(tmp_path, new_repo, make_holes_inside_chunks)
    if not makes_holes(tmp_path):
        pytest.skip("this file system makes no holes")
    out = tmp_path / "out"
    assert _restore_in_child(url, str(out), processes=2, stripe=stripe)["processes"] == 2
    assert_holes_kept(out, src, slack=4 * 4096)


def _corrupt_largest_pack(url: str) -> None:
    packs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(url, "data")) for f in fs]
    victim = max(packs, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_workers_error_comes_back_as_itself(tmp_path, new_repo):
    _, url, src = backed_up(tmp_path, new_repo, lambda root: [
        (root / f"f{i}").write_bytes(os.urandom(200_000)) for i in range(20)])
    _corrupt_largest_pack(url)
    r = _restore_in_child(url, str(tmp_path / "out"), processes=2)
    assert r["error"] == "CorruptObject"
    assert "corrupt object" in r["message"]


def test_a_worker_that_dies_is_an_error_not_a_partial_success(tmp_path, new_repo):
    _, url, _ = backed_up(tmp_path, new_repo, lambda root: [
        (root / f"f{i}").write_bytes(os.urandom(100_000)) for i in range(20)])
    die = ("import os\n        from chunkvault.store.restore import Restorer\n"
           "        Restorer._write_file = Restorer._write_part = lambda *a: os._exit(3)")
    r = _restore_in_child(url, str(tmp_path / "out"), processes=2, before=die)
    assert r["error"] == "ChunkvaultError"
    assert "a worker process exited 3 before it was done" in r["message"]


def test_one_process_where_forking_is_not_safe(tmp_path, new_repo):
    _, url, src = backed_up(tmp_path, new_repo, lambda root: (root / "f").write_bytes(os.urandom(300_000)))
    other_thread = ("import threading\n        threading.Thread(target=threading.Event().wait, daemon=True).start()")
    r = _restore_in_child(url, str(tmp_path / "out"), processes=2, before=other_thread)
    assert r["processes"] == 1
    assert describe(tmp_path / "out") == describe(src)


def test_cli_restores_with_processes(tmp_path, new_repo, cli):
    _, url, src = backed_up(tmp_path, new_repo, _many_files)
    try:
        out = tmp_path / "out"
        r = json.loads(cli("restore", "-r", url, "--target", str(out), "--processes", "2", "--json").stdout)
        assert r["processes"] == 2
        assert describe(out) == describe(src)
        assert cli("restore", "-r", url, "--target", str(tmp_path / "x"), "--processes", "0", check=2).returncode == 2
    finally:
        os.chmod(src / "d3", 0o755)
        if (tmp_path / "out" / "d3").exists():
            os.chmod(tmp_path / "out" / "d3", 0o755)


def test_without_a_shared_counter_each_worker_takes_every_nth_stripe(tmp_path, new_repo):
    """Where no semaphore can be made for the stripe counter (no /dev/shm), the restore is the same."""
    _, url, src = backed_up(tmp_path, new_repo, _many_files)
    out = tmp_path / "out"
    try:
        r = _restore_in_child(url, str(out), processes=2, before="workers._SharedCounter = lambda: (_ for _ in ())"
                                                                 ".throw(OSError(38, 'no semaphores'))")
        assert r["processes"] == 2, r
        assert describe(out) == describe(src)
    finally:
        for d in (src / "d3", out / "d3"):
            if d.exists():
                os.chmod(d, 0o755)


def test_small_restores_stay_in_one_process():
    assert auto_processes(1 << 20) == 1
    assert auto_processes(None) == auto_processes(1 << 40) == min(4, len(os.sched_getaffinity(0)))


def _file(path: bytes, lengths: list[int], known: dict[bytes, int]) -> Entry:
    ids = [os.urandom(32) for _ in lengths]
    known.update(zip(ids, lengths))
    return Entry(path=path, type=T_FILE, size=sum(lengths), chunks=b"".join(ids))


def _tree(files: list[list[int] | None], known: dict[bytes, int]) -> list:
    """Records of a root directory and, per item, a file of chunks of those lengths (or a symbolic link)."""
    records = [entry_record(Entry(path=b"", type=T_DIR))]
    return records + [entry_record(Entry(path=b"p%04d" % i, type=T_SYMLINK) if lengths is None
                                    else _file(b"p%04d" % i, lengths, known)) for i, lengths in enumerate(files)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.lists(st.integers(0, 3 * STRIPE_BYTES), max_size=8), st.none()), max_size=40),
       st.integers(1, 5), st.randoms(use_true_random=False), st.integers(1, 6))
def test_shares_cover_every_byte_once_by_stripe(files, n, rnd, stripes_whole):
    """However the workers' walks interleave, every byte is written once, and everything beginning in a
    stripe by the one worker that took it; chunks up to three stripes long leave stripes in which nothing
    begins.  Files up to ``stripes_whole`` stripes long are written whole, by one worker."""
    known: dict[bytes, int] = {}
    records = _tree(files, known)
    above = stripes_whole * STRIPE_BYTES
    take = restore_workers._SharedCounter()  # the counter the workers share
    walks = {k: _share(iter(records), StripeClaims(take), known.get, above) for k in range(n)}
    got: dict[bytes, list[tuple[int, int, int]]] = {}  # path -> (offset, size, worker)
    while walks:
        k = rnd.choice(sorted(walks))
        piece = next(walks[k], None)
        if piece is None:
            del walks[k]
            continue
        e, offset = piece
        got.setdefault(e.path, []).append((offset or 0, e.size, k, offset is None))
    taker: dict[int, int] = {}  # stripe -> worker
    before = 0
    for r in records:
        e = r.entry
        if e.type != T_FILE:
            assert e.path not in got
            continue
        pieces = sorted(got.pop(e.path))
        assert [p[3] for p in pieces] == ([True] if e.size <= above or not e.chunks else [False] * len(pieces))
        assert [p[0] for p in pieces] == [0] + [p[0] + p[1] for p in pieces[:-1]]  # contiguous, in order
        assert sum(p[1] for p in pieces) == e.size
        for offset, _, k, _ in pieces:
            assert taker.setdefault((before + offset) // STRIPE_BYTES, k) == k
        before += e.size
    assert not got


def test_a_worker_that_gets_ahead_takes_the_stripes_the_others_have_not_reached():
    known: dict[bytes, int] = {}
    records = _tree([[STRIPE_BYTES // 2]] * 8, known)  # two files per stripe, four stripes
    take = restore_workers._SharedCounter()
    fast, slow = (_share(iter(records), StripeClaims(take), known.get) for _ in range(2))
    assert [e.path for e, _ in itertools.islice(slow, 2)] == [b"p0000", b"p0001"]  # stripe 0
    assert [e.path for e, _ in fast] == [b"p0002", b"p0003", b"p0004", b"p0005", b"p0006", b"p0007"]
    assert list(slow) == []


def test_a_worker_asking_about_a_far_stripe_takes_it_in_one_step():
    counter = restore_workers._SharedCounter()
    claims = StripeClaims(counter)
    assert claims.mine(1 << 40) and counter() == (1 << 40) + 1  # a crafted size: no count to 2**40
    assert [every_nth(1, 3)(s) for s in range(7)] == [1, 1, 4, 4, 4, 7, 7]


def test_the_stripe_counter_is_shared_by_forked_processes():
    counter = restore_workers._SharedCounter()
    rfd, wfd = os.pipe()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(wfd, json.dumps([counter() for _ in range(500)]).encode() + b"\n")
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        taken = [n for line in f for n in json.loads(line)]
    for pid in pids:
        os.waitpid(pid, 0)
    assert sorted(taken) == list(range(1000))
    assert counter() == 1000


def test_only_a_file_that_is_a_large_share_of_the_restore_is_written_in_parts():
    """Two workers in one file take turns on its lock: a file is split only when it is over a stripe and
    over 1/SPLIT_SHARE of the restore."""
    known: dict[bytes, int] = {}
    e = _file(b"big", [STRIPE_BYTES, STRIPE_BYTES, 5], known)
    assert split_above(None) == STRIPE_BYTES  # the restore's size unknown
    assert split_above(e.size) == split_above(2 * e.size) == STRIPE_BYTES
    assert split(e, 0, known.get, split_above(8 * e.size)) is None
    assert len(split(e, 0, known.get, split_above(8 * e.size - 8)) or []) == 3


def test_a_restore_splits_files_by_the_share_of_the_snapshots_bytes(tmp_path, new_repo, monkeypatch):
    repo, _, _ = backed_up(tmp_path, new_repo, _many_files)
    snap = repo.snapshot("latest")
    monkeypatch.setattr(restore_workers, "STRIPE_BYTES", 64 << 10)  # so that an eighth of the snapshot is more
    share = split_above(snap.stats["bytes"])
    assert share == snap.stats["bytes"] // 8 > 64 << 10
    seen = set()
    monkeypatch.setattr(restore_workers, "split",
                        lambda e, start, length, above=STRIPE_BYTES: seen.add(above))  # in this process
    assert repo.restore("latest", str(tmp_path / "out"), processes=2).processes == 2
    assert seen == {share}


def test_a_narrowed_restore_splits_files_by_the_share_of_the_selections_bytes(tmp_path, new_repo, monkeypatch):
    """A file that is most of what --include selects is written in parts, though a small share of the snapshot."""
    repo, _, src = backed_up(tmp_path, new_repo, _many_files)
    monkeypatch.setattr(restore_workers, "STRIPE_BYTES", 8 << 10)
    chosen = sum(f.stat().st_size for f in (src / "d1").iterdir())
    assert chosen // 8 > 8 << 10 and chosen < repo.snapshot("latest").stats["bytes"] // 4
    seen = set()
    monkeypatch.setattr(restore_workers, "split",
                        lambda e, start, length, above=STRIPE_BYTES: seen.add(above))
    assert repo.restore("latest", str(tmp_path / "out"), includes=["d1"], processes=2).processes == 2
    assert seen == {chosen // 8}


def test_a_file_whose_chunks_are_unknown_is_restored_whole():
    known: dict[bytes, int] = {}
    e = _file(b"big", [STRIPE_BYTES, STRIPE_BYTES, 5], known)
    assert [p.size for p, _ in split(e, 0, known.get)] == [STRIPE_BYTES, STRIPE_BYTES, 5]
    assert split(e, 0, lambda cid: None) is None
    assert split(e, 0, lambda cid: 7) is None  # lengths that do not add up to the file's size


# --- crafted trees that would lead a restore out of its target ------------------------------------------


def _crafted(repo, entries: list[Entry]) -> None:
    """A full snapshot whose manifest holds ``entries`` as given (order included), their content stored."""
    import blake3

    from chunkvault.store.manifest_io import ManifestWriter
    from chunkvault.store.snapshot import Snapshot, now_iso

    st = repo.store
    writer = st.writer()
    try:
        mw = ManifestWriter(st, writer)
        for e in entries:
            if e.type == T_FILE:
                data = e.chunks  # the content, replaced by its one chunk's id
                bid = st.blob_id(data)
                if writer.claim(bid):
                    writer.store(st.prepare_blob(bid, data))
                e = dataclasses.replace(e, chunks=bid, size=e.size or len(data),
                                        digest=e.digest or blake3.blake3(data).digest())
            mw.add(entry_record(e))
        ids = mw.finish()
        writer.flush()
    finally:
        writer.close()
    st.save_snapshot(Snapshot(time=now_iso(), kind="full", parent=None, host="crafted", paths=["/crafted"], tags=[],
                              manifest=[i.hex() for i in ids], manifest_starts=mw.starts, stdin_name=None, stats={}))


def _root() -> Entry:
    return Entry(path=b"", type=T_DIR, mode=0o755)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_file_below_a_restored_symbolic_link_is_refused(tmp_path, new_repo, processes):
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=b"a", type=T_SYMLINK, target=os.fsencode(outside)),
                    Entry(path=b"a/evil", type=T_FILE, mode=0o644, chunks=b"written through the link")])
    with pytest.raises(CorruptObject, match="below a symbolic link"):
        repo.restore("latest", str(tmp_path / "out"), processes=processes)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("archive", ["tar", "zip"])
@pytest.mark.parametrize("crafted, refused", [
    ([Entry(path=b"../escape", type=T_FILE, mode=0o644, chunks=b"out")], "unsafe path"),
    ([Entry(path=b"/abs/escape", type=T_FILE, mode=0o644, chunks=b"out")], "unsafe path"),
    ([Entry(path=b"a", type=T_SYMLINK, target=b"/tmp"), Entry(path=b"a/escape", type=T_FILE, chunks=b"out")],
     "below a symbolic link"),
    ([Entry(path=b"link", type=T_HARDLINK, target=b"/etc/passwd")], "points out of the tree"),
], ids=["dot-dot", "absolute", "below a symlink", "hard link out"])
def test_dump_refuses_what_restore_refuses(tmp_path, new_repo, crafted, refused, archive):
    """An archive whose names lead out of where it is extracted: Python's tarfile wrote them there."""
    repo = new_repo()
    _crafted(repo, [_root()] + crafted)
    with pytest.raises(CorruptObject, match=refused):
        repo.dump("latest", "/", io.BytesIO(), archive=archive)


def test_records_out_of_order_are_refused(tmp_path, new_repo):
    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=b"b", type=T_FILE, chunks=b"b"), Entry(path=b"a", type=T_FILE, chunks=b"a")])
    with pytest.raises(CorruptObject, match="out of order"):
        repo.restore("latest", str(tmp_path / "out"))


def test_a_hard_link_to_a_file_below_a_symbolic_link_is_refused(tmp_path, new_repo):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not for the restore")
    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=b"a", type=T_SYMLINK, target=os.fsencode(outside)),
                    Entry(path=b"b", type=T_HARDLINK, target=b"a/secret")])
    with pytest.raises(CorruptObject, match="hard link"):
        repo.restore("latest", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "b").exists()


@settings(max_examples=500)
@given(st.lists(st.sampled_from([b"a", b".", b"..", b"", b"...", b".a", b"a.", b"\x00", b"b\x00", b"/"]),
                min_size=1, max_size=6).map(b"/".join))
def test_a_path_is_safe_exactly_when_every_component_is_a_name(path):
    from chunkvault.store.confinement import safe_relpath

    parts = path.split(b"/")
    unsafe = path.startswith(b"/") or any(p in (b"", b".", b"..") or b"\x00" in p for p in parts)
    if path == b"" or not unsafe:
        assert safe_relpath(path) == path
    else:
        with pytest.raises(CorruptObject, match="unsafe path"):
            safe_relpath(path)


@pytest.mark.parametrize("path", [b"../escape", b"a/../../escape", b"/abs", b"a//b", b"a/./b"])
def test_a_crafted_path_out_of_the_target_is_refused(tmp_path, new_repo, path):
    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=path, type=T_FILE, mode=0o644, chunks=b"escaping")])
    with pytest.raises(CorruptObject, match="unsafe path"):
        repo.restore("latest", str(tmp_path / "out" / "deep"))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out" / "escape").exists()


@pytest.mark.parametrize("mode", ["empty target", "in place", "in place, --delta", "workers"])
def test_a_file_whose_chunks_do_not_hold_its_recorded_size_is_not_restored(tmp_path, new_repo, mode):
    """A crafted entry that claims 2**62 bytes over one chunk of 11 whose digest it gives: restore reported
    the 4 EiB restored."""
    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=b"big", type=T_FILE, mode=0o644, size=1 << 62, chunks=b"eleven byte"),
                    Entry(path=b"ok", type=T_FILE, mode=0o644, chunks=b"fine")])
    target = tmp_path / "out"
    if mode.startswith("in place"):
        target.mkdir()
        (target / "big").write_bytes(b"the target's own")
    with pytest.raises(CorruptObject, match=r"file big: its chunks hold 11 bytes, not the 4611686018427387904 its "
                                            r"entry records; 1 file\(s\) not restored: big"):
        repo.restore("latest", str(target), force=mode.startswith("in place"), delta=mode.endswith("--delta"),
                     processes=2 if mode == "workers" else 1)
    assert (target / "ok").read_bytes() == b"fine"
    assert not (target / "big").exists() or (target / "big").read_bytes() == b"the target's own"


@pytest.mark.parametrize("archive", ["tar", "zip", "file"])
@pytest.mark.parametrize("size, digest_of", [(5, b"eleven byte"), (100, b"eleven byte"), (11, b"ELEVEN BYTE")],
                         ids=["shorter", "longer", "another digest"])
def test_dump_checks_a_files_size_and_digest_as_restore_does(tmp_path, new_repo, archive, size, digest_of):
    """A tar of the first bytes of a file that holds more, or of a file whose digest is another's, exited 0."""
    import blake3

    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=b"f", type=T_FILE, mode=0o644, size=size, chunks=b"eleven byte",
                                   digest=blake3.blake3(digest_of).digest())])
    with pytest.raises(CorruptObject, match="its chunks hold|does not match its digest"):
        repo.dump("latest", "f" if archive == "file" else "/", io.BytesIO(),
                  archive="tar" if archive == "file" else archive)
    good = new_repo()
    _crafted(good, [_root(), Entry(path=b"f", type=T_FILE, mode=0o644, chunks=b"eleven byte")])
    out = io.BytesIO()
    good.dump("latest", "f", out)
    assert out.getvalue() == b"eleven byte"


@pytest.mark.parametrize("root", [Entry(path=b"", type=T_FILE, mode=0o644, chunks=b"i am the root\n"),
                                  Entry(path=b"", type=T_SYMLINK, target=b"/etc")])
def test_a_root_that_is_not_a_directory_is_refused_and_the_target_kept(tmp_path, new_repo, root):
    """A crafted root record in place of the target's directory: an in-place restore removed the whole target
    to put a file (or a link to /etc, which the next restore into it would follow) there."""
    from chunkvault.store.export import export, restore_from_file

    repo = new_repo()
    _crafted(repo, [root])
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    (target / "precious").write_bytes(b"keep")
    with pytest.raises(CorruptObject, match="root is not a directory"):
        repo.restore("latest", str(target), force=True, delete=True)
    export(repo.store, repo.snapshot("latest"), str(tmp_path / "x.backup"), b"pw", kdf_log_n=10)
    with pytest.raises(CorruptObject, match="root is not a directory"):
        restore_from_file(str(tmp_path / "x.backup"), b"pw", str(target), force=True, delete=True)
    assert target.is_dir() and not target.is_symlink() and (target / "precious").read_bytes() == b"keep"


def test_a_hard_link_is_not_made_to_a_file_through_a_link_out_of_the_target(tmp_path, new_repo):
    """In place, with a selection: the target's d1 is a symbolic link out of it, so d1/a is refused, and its
    hard link d2/c must not be made to the file outside (writing to it would change that file)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a").write_bytes(b"outside secret")
    repo = new_repo()
    _crafted(repo, [_root(), Entry(path=b"d1", type=T_DIR, mode=0o755),
                    Entry(path=b"d1/a", type=T_FILE, mode=0o644, chunks=b"snapshot data"),
                    Entry(path=b"d2", type=T_DIR, mode=0o755), Entry(path=b"d2/c", type=T_HARDLINK, target=b"d1/a")])
    target = tmp_path / "target"
    target.mkdir()
    (target / "d1").symlink_to(outside)
    with pytest.raises(TargetUnwritable) as raised:
        repo.restore("latest", str(target), force=True, includes=["d1/a", "d2"])
    assert "d2/c" in str(raised.value)
    assert not (target / "d2" / "c").exists() or not os.path.samefile(target / "d2" / "c", outside / "a")
    assert (outside / "a").read_bytes() == b"outside secret"


def test_delete_through_a_target_that_is_a_symbolic_link(tmp_path, new_repo):
    """A target named through a link to a directory is followed for --delete as for the restore."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    repo = new_repo()
    repo.backup([str(src)])
    real = tmp_path / "real"
    real.mkdir()
    (real / "stale").write_bytes(b"not in the snapshot")
    (tmp_path / "link").symlink_to(real)
    result = repo.restore("latest", str(tmp_path / "link"), force=True, delete=True)
    assert result.deleted == 1 and sorted(os.listdir(real)) == ["f"]


@pytest.mark.parametrize("stripe", [1 << 20, 64 << 20], ids=["files written in parts", "files written whole"])
def test_an_interrupted_restore_with_workers_leaves_no_file_cut_short(tmp_path, new_repo, stripe):
    """Ctrl-C in the middle: the workers are asked to stop (not killed outright), each removing the file it
    was writing and every file it wrote a part of; the parent removes the files written in parts. What is
    left under a name is that file, whole."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(4)
    for i in range(6):
        (src / f"big{i}").write_bytes(rnd.randbytes(3 << 20))
        (src / f"mid{i}").write_bytes(rnd.randbytes(200_000))
    new_repo(str(tmp_path / "repo")).backup([str(src)])
    target = tmp_path / "out"
    script = textwrap.dedent(f"""
        import json, time
        import chunkvault.store.restore as R
        import chunkvault.store.restore_workers as workers
        from chunkvault import Repository
        workers.STRIPE_BYTES = {stripe}
        workers.SPLIT_SHARE = 1 << 40  # every file over a stripe in parts
        chunk = R._Prefetcher.next_chunk
        R._Prefetcher.next_chunk = lambda self: (time.sleep(0.02), chunk(self))[1]  # slow enough to stop midway

        def interrupt(files, nbytes):  # in the parent, as Ctrl-C, once the workers are well under way
            if nbytes > 4 << 20:
                raise KeyboardInterrupt

        repo = Repository.open({str(tmp_path / "repo")!r}, {PASSWORD!r}, ledger=False)
        try:
            repo.restore("latest", {str(target)!r}, processes=2, progress=interrupt)
            print(json.dumps("finished"))
        except KeyboardInterrupt:
            print(json.dumps("interrupted"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "interrupted"
    for path in target.iterdir():
        assert path.read_bytes() == (src / path.name).read_bytes(), path.name


@pytest.mark.parametrize("crafted, refused", [
    ([_root(), Entry(path=b"b", type=T_FILE, chunks=b"b"), Entry(path=b"a", type=T_FILE, chunks=b"a")], "out of order"),
    ([_root(), Entry(path=b"a", type=T_FILE, chunks=b"a"), Entry(path=b"a", type=T_FILE, chunks=b"b")], "out of order"),
    ([_root(), Entry(path=b"../escape", type=T_FILE, mode=0o644, chunks=b"out")], "unsafe path"),
    ([_root(), Entry(path=b"a", type=T_SYMLINK, target=b"/tmp"), Entry(path=b"a/x", type=T_FILE, chunks=b"x")],
     "below a symbolic link"),
    ([Entry(path=b"", type=T_FILE, mode=0o644, chunks=b"root")], "root is not a directory"),
], ids=["order", "twice", "dot-dot", "below a symlink", "root"])
def test_check_finds_a_tree_every_restore_refuses(tmp_path, new_repo, crafted, refused):
    """check --read-data said "no problems" of snapshots whose every restore failed (exit 13); the
    restore's error named no snapshot."""
    repo = new_repo()
    _crafted(repo, crafted)
    snap = repo.snapshot()
    for read_data in (False, True):
        (problem,) = repo.check(read_data=read_data).problems
        assert problem.object == f"snapshots/{snap.id}" and problem.snapshots == [snap.id]
        assert "every restore refuses its manifest: " in problem.problem and refused in problem.problem
    with pytest.raises(CorruptObject, match=f"tree of snapshot {snap.id}: .*{refused}"):
        repo.restore("latest", str(tmp_path / "out"))


def test_a_damaged_chunk_that_several_parts_of_a_file_hold_names_the_file_once(tmp_path, new_repo, password,
                                                                              monkeypatch):
    """A file written in parts by two workers, whose one damaged chunk every part holds: it was named once
    per part among the files not restored."""
    from chunkvault import Repository
    from chunkvault.errors import CorruptObject
    from chunkvault.store import restore_workers
    from test_damaged_storage import damage_blob

    monkeypatch.setattr(restore_workers, "STRIPE_BYTES", 1 << 20)
    monkeypatch.setattr(restore_workers, "SPLIT_SHARE", 1 << 40)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(1).randbytes(256 << 10) * 16)  # one chunk's content, 16 times
    repo = new_repo(str(tmp_path / "repo"), pack_size=256 << 10)
    snap = repo.backup([str(src)], fixed_chunks=["big"], fixed_chunk_size=256 << 10).snapshot
    (entry,) = [e for e in repo.tree(snap) if e.path.endswith(b"big")]
    damage_blob(tmp_path / "repo", repo, entry.chunk_ids()[0])
    repo = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(CorruptObject, match=r"1 file\(s\) not restored: big \("):
        repo.restore(snap.id, str(tmp_path / "out"), processes=2)


def test_workers_writing_a_sparse_file_in_parts_hash_its_chunk_of_zeros_once_not_each_time(tmp_path, new_repo):
    """A file written in parts has each chunk checked against its id: a sparse file's chunk of zeros, which
    comes again and again, was hashed each time (a 64 GiB file cut every 64 KiB: a million times, its restore
    17 s; 9 s now).  Bytes equal to those just found to hash to the same id are compared instead."""
    if not makes_holes(tmp_path):
        pytest.skip("the file system here fills holes in")

    def sparse(root):
        with open(root / "img", "wb") as f:
            f.truncate(256 << 20)
            f.seek(100 << 20)
            f.write(os.urandom(5000))

    _, url, src = backed_up(tmp_path, new_repo, sparse)
    counter = tmp_path / "hashed"
    count = ("import chunkvault.store.crypto as C\n"
             "        hash = C.BlobHasher.__call__\n"
             f"        C.BlobHasher.__call__ = lambda *a: (open({str(counter)!r}, 'a').write('x'), hash(*a))[1]")
    r = _restore_in_child(url, str(tmp_path / "out"), processes=2, before=count)
    assert r["processes"] == 2
    assert describe(tmp_path / "out") == describe(src)
    assert len(counter.read_text()) < 20  # the file's chunks: 128 of zeros (2 MiB each), and those around the data


def test_a_chunk_is_compared_with_the_bytes_just_hashed_to_its_id_only_when_the_ids_are_the_same():
    from types import SimpleNamespace

    from chunkvault.store.restore import Restorer

    hashed = []

    def blob_id(data):
        hashed.append(bytes(data))
        return b"Z" * 32 if not any(data) else b"D" * 32

    r = SimpleNamespace(_last_hashed=None, repo=SimpleNamespace(blob_id=blob_id))
    zeros = bytes(100)
    assert Restorer._hashes_to(r, b"Z" * 32, zeros) and len(hashed) == 1
    assert Restorer._hashes_to(r, b"Z" * 32, zeros) and len(hashed) == 1  # the same object
    assert Restorer._hashes_to(r, b"Z" * 32, bytes(100)) and len(hashed) == 1  # equal bytes
    assert not Restorer._hashes_to(r, b"Z" * 32, b"\0" * 99 + b"x") and len(hashed) == 2  # others: hashed
    assert not Restorer._hashes_to(r, b"Z" * 32, memoryview(b"\0" * 99 + b"x")) and len(hashed) == 3
    assert not Restorer._hashes_to(r, b"Q" * 32, zeros) and len(hashed) == 4  # another id: hashed
