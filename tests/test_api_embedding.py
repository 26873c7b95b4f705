"""The Python API as a backup tool embeds it: one Repository kept open while other commands change the
repository, arguments in the forms a caller has at hand, and every failure a ChunkvaultError."""
import datetime
import errno
import io
import os
import shutil
import threading

import pytest

from chunkvault import Repository
from chunkvault.errors import (CorruptObject, OutputClosed, StorageFull, Stopped, TargetUnwritable, UsageError,
                              WrongPassword)
from chunkvault.store.manifest import T_FILE
from conftest import PASSWORD
from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import describe


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(200_000))
    (src / "b").write_text("b\n")
    return src


def test_an_object_kept_open_reads_what_another_command_stored_since(tmp_path, tree, new_repo, cli):
    path = str(tmp_path / "repo")
    new_repo(path).backup([str(tree)])
    for lock_reads in (False, True):
        kept = Repository.open(path, PASSWORD, lock_reads=lock_reads)
        kept.restore("latest", str(tmp_path / f"first-{lock_reads}"))
        first = kept.snapshot("latest")
        (tree / "a").write_bytes(os.urandom(200_000))
        cli("backup", "-r", path, str(tree))
        out = tmp_path / f"second-{lock_reads}"
        kept.restore("latest", str(out))
        assert describe(out) == describe(tree)
        latest = kept.snapshot("latest")
        with kept.open_file(latest, "a") as f:  # the lazy readers, outside reading()
            assert f.read() == (tree / "a").read_bytes()
        assert [e.path for e in kept.tree(latest)] == [e.path for e in kept.tree(first)]
        assert [change for change, _, _ in kept.diff(first, latest)] == ["modified"]
        kept.close()


def test_a_backup_finishing_between_the_read_lock_and_the_listing_is_read_with_its_index(tmp_path, tree, new_repo):
    """An object kept open loaded the index earlier; the read lock is taken (the index found current), then
    another backup stores its index and snapshot before the listing: restoring that snapshot must find its
    blobs, not call them missing from the index."""
    path = str(tmp_path / "repo")
    new_repo(path).backup([str(tree)])
    with Repository.open(path, PASSWORD) as kept, Repository.open(path, PASSWORD) as job:
        kept.restore("latest", str(tmp_path / "first"))  # index loaded
        real = kept.store.snapshots

        def a_backup_lands_first():
            if not (tree / "new").exists():
                (tree / "new").write_bytes(os.urandom(100_000))
                job.backup([str(tree)])
            return real()

        kept.store.snapshots = a_backup_lands_first  # type: ignore[method-assign]
        kept.restore("latest", str(tmp_path / "second"))
        kept.store.snapshots = real  # type: ignore[method-assign]
        assert describe(tmp_path / "second") == describe(tree)
        assert [e.path for e in kept.find("new")] and not kept.check().problems


def test_an_object_kept_open_reads_only_the_index_objects_other_backups_added(tmp_path, tree, new_repo, cli):
    """A service open for months must not read the whole index again after every backup another command
    makes; after a prune (objects replaced) it reads it again, and finds what the prune moved."""
    path = str(tmp_path / "repo")
    new_repo(path).backup([str(tree)])
    with Repository.open(path, PASSWORD) as kept:
        kept.restore("latest", str(tmp_path / "first"))
        real, read = kept.store.read_index_objects, []

        def counted(names, **kw):
            read.append(list(names))
            return real(names, **kw)

        kept.store.read_index_objects = counted  # type: ignore[method-assign]
        before = set(kept.store.index_names())
        for i in range(3):
            (tree / f"n{i}").write_bytes(os.urandom(50_000))
            cli("backup", "-r", path, str(tree))
            kept.restore("latest", str(tmp_path / f"then{i}"))
            assert describe(tmp_path / f"then{i}") == describe(tree)
        added = set(kept.store.index_names()) - before
        assert sorted(n for names in read for n in names) == sorted(added)
        cli("forget", "-r", path, "--keep-last", "1", "--prune")
        read.clear()
        kept.restore("latest", str(tmp_path / "after-prune"))
        assert describe(tmp_path / "after-prune") == describe(tree)
        assert sorted(n for names in read for n in names) == sorted(kept.store.index_names())


def _hold_backup_at(read_bytes: int, until: threading.Event, started: threading.Event, wait: float = 60):
    """A progress callback that holds its backup, part-way, until ``until`` is set (or ``wait`` passed)."""
    def progress(counts):
        if not started.is_set() and counts.get("read_bytes", 0) > read_bytes:
            started.set()
            assert until.wait(wait) or wait < 60
    return progress


@pytest.mark.parametrize("meanwhile", ["listing after another command's backup", "second backup"])
def test_a_backup_in_one_thread_keeps_its_blobs_indexed_whatever_another_thread_does(tmp_path, new_repo, cli,
                                                                                    meanwhile):
    """One object, two threads: a backup part-way (blobs stored, not yet in an index object), while the other
    thread lists snapshots after another command stored an index object, or makes a backup of its own (which
    waits for the first's writer).  The object must still read what both stored."""
    path = str(tmp_path / "repo")
    new_repo(path).close()
    dirs = {}
    for name, files in (("a", 120), ("b", 3), ("c", 3)):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        for i in range(files):
            (dirs[name] / f"f{i:03}").write_bytes(os.urandom(64 << 10))
    with Repository.open(path, PASSWORD) as repo:
        repo.backup([str(dirs["b"])])  # the index is loaded
        started, done = threading.Event(), threading.Event()

        def other_thread():
            assert started.wait(60)
            try:
                if meanwhile == "second backup":
                    repo.backup([str(dirs["c"])])
                else:
                    cli("backup", "-r", path, str(dirs["c"]))
                    repo.snapshots()
            finally:
                done.set()

        thread = threading.Thread(target=other_thread)
        thread.start()
        hold = 1.0 if meanwhile == "second backup" else 60  # that one waits for this backup to end
        snap = repo.backup([str(dirs["a"])], progress=_hold_backup_at(2 << 20, done, started, hold)).snapshot
        thread.join(60)
        assert not thread.is_alive()
        repo.restore(snap.id, str(tmp_path / "out"))
        assert describe(tmp_path / "out") == describe(dirs["a"])
        if meanwhile == "second backup":
            repo.restore("latest", str(tmp_path / "out-c"))
            assert describe(tmp_path / "out-c") == describe(dirs["c"])
        assert not repo.check().problems


def test_a_chunk_another_object_stored_again_whole_reads_in_an_object_kept_open(tmp_path, new_repo, password):
    """The kept object stored a changed chunk as a delta; another object, unaware of it, stored the same
    chunk whole.  The index prefers the whole copy: the kept object, adding the other's index object, must
    read the chunk as that copy, not as a delta (its base then named by the index, not by the envelope)."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(1 << 20))
    (src / "db").write_bytes(data)
    path = str(tmp_path / "repo")
    new_repo(path).close()
    cut = {"fixed_chunks": ["db"], "fixed_chunk_size": 64 << 10}
    with Repository.open(path, password) as kept, Repository.open(path, password) as other:
        kept.backup([str(src)], kind="full", **cut)
        other.store.load_index()  # read before the kept object's differential stores its deltas
        for at in range(0, len(data), 64 << 10):
            data[at + 100:at + 200] = os.urandom(100)
        (src / "db").write_bytes(data)
        diff = kept.backup([str(src)], kind="diff", **cut).snapshot
        assert diff.stats.get("delta_blobs", 1)
        real = other.store.refresh_index
        other.store.refresh_index = lambda: None  # type: ignore[method-assign]  # as a backup begun before
        whole = other.backup([str(src)], kind="full", delta=False, host="other", **cut).snapshot
        other.store.refresh_index = real  # type: ignore[method-assign]
        for snap in (diff, whole):
            out = tmp_path / f"out-{snap.id[:8]}"
            kept.restore(snap.id, str(out))
            assert describe(out) == describe(src)
        assert not kept.check(read_data=True).problems


def test_a_snapshot_object_kept_from_before_another_command_rebased_it_reads_as_it_is_now(tmp_path, tree, new_repo,
                                                                                           cli):
    """A differential read, then its parent forgotten and pruned by another command (which rebased it): the
    object names manifests that are gone, and was taken for damage (MissingObject, `repair index`)."""
    from chunkvault.errors import SnapshotNotFound

    path = str(tmp_path / "repo")
    kept = new_repo(path)
    first = kept.backup([str(tree)]).snapshot
    (tree / "a").write_bytes(os.urandom(200_000))
    second = kept.backup([str(tree)]).snapshot
    assert second.parent == first.id
    state = describe(tree)
    cli("forget", "-r", path, first.id)
    cli("prune", "-r", path)
    out = tmp_path / "restored"
    kept.restore(second, str(out))
    assert describe(out) == state
    assert [e.path for e in kept.tree(second)] == [e.path for e in kept.tree(second.id)]
    with kept.open_file(second, "a") as f:
        assert f.read() == (tree / "a").read_bytes()
    with pytest.raises(SnapshotNotFound):  # forgotten: as its id says
        kept.restore(first, str(tmp_path / "gone"))


def test_a_snapshot_object_another_command_forgot_since_is_named_as_forgotten(tmp_path, tree, new_repo, cli):
    """A restore looks its snapshot up, then restores it under the lock: a forget between the two gave
    "no snapshot '<64 hex digits>'" to one who had asked for ``latest``, as if it had never been there."""
    from chunkvault.errors import SnapshotNotFound

    path = str(tmp_path / "repo")
    kept = new_repo(path)
    kept.backup([str(tree)])
    newest = kept.snapshot("latest")
    cli("forget", "-r", path, newest.id)
    with pytest.raises(SnapshotNotFound) as err:
        kept.restore(newest, str(tmp_path / "gone"))
    said = str(err.value)
    assert newest.short_id in said and newest.id not in said
    assert "another command forgot it" in said
    assert not (tmp_path / "gone").exists() or not os.listdir(tmp_path / "gone")


def test_stats_of_an_object_kept_open_count_what_another_command_stored(tmp_path, tree, new_repo, cli):
    path = str(tmp_path / "repo")
    kept = new_repo(path)
    kept.backup([str(tree)])
    before = kept.stats()
    (tree / "c").write_bytes(os.urandom(300_000))
    cli("backup", "-r", path, str(tree))
    after = kept.stats()
    assert after.snapshots == 2 and after.blob_raw_bytes >= before.blob_raw_bytes + 300_000


@pytest.mark.parametrize("ledger", [False, True])
def test_an_object_kept_open_stores_nothing_into_a_repository_made_anew_at_its_place(tmp_path, tree, new_repo,
                                                                                      ledger):
    """With its ledger too: the snapshots it saw are gone, and the error says why instead of 'rolled back'."""
    path = tmp_path / "repo"
    kept = new_repo(str(path), ledger=str(tmp_path / "ledger") if ledger else False)
    kept.backup([str(tree)])
    shutil.rmtree(path)
    new_repo(str(path))
    with pytest.raises(CorruptObject, match="another repository was made"):
        kept.backup([str(tree)])
    assert [p.problem for p in kept.check().problems if p.object == "config"] != []
    assert Repository.open(str(path), PASSWORD).snapshots() == []


def test_an_object_kept_open_sees_tags_another_command_set(tmp_path, tree, new_repo, cli):
    path = str(tmp_path / "repo")
    kept = new_repo(path)
    snap = kept.backup([str(tree)], tags=["aaaa"]).snapshot
    for old, new in [("aaaa", "bbbb"), ("bbbb", "cccc"), ("cccc", "dddd")]:
        assert [s.id for s in kept.snapshots(tags=old)] == [snap.id]
        cli("tag", "-r", path, "--set", new, snap.id)
        assert [s.id for s in kept.snapshots(tags=new)] == [snap.id]
        assert kept.snapshot(snap.id).tags == [new]


@pytest.mark.parametrize("lost", ["config", "keys"])
def test_an_object_kept_open_finds_its_repository_unopenable_and_stores_nothing_more(tmp_path, tree, new_repo,
                                                                                     lost):
    path = tmp_path / "repo"
    kept = new_repo(str(path))
    kept.backup([str(tree)])
    if lost == "config":
        (path / "config").unlink()
    else:
        for key in (path / "keys").iterdir():
            key.unlink()
    problems = kept.check().problems
    assert [p.object for p in problems] == [lost] and "key import" in problems[0].problem
    packs = sorted((path / "data").rglob("*"))
    (tree / "a").write_bytes(os.urandom(200_000))
    with pytest.raises(CorruptObject, match="key import"):
        kept.backup([str(tree)])
    with pytest.raises(CorruptObject):
        kept.backup_stream(io.BytesIO(b"x" * 1000), "s")
    assert sorted((path / "data").rglob("*")) == packs and len(kept.snapshots()) == 1


def test_check_names_a_damaged_config(tmp_path, tree, new_repo):
    path = tmp_path / "repo"
    kept = new_repo(str(path))
    kept.backup([str(tree)])
    (path / "config").write_bytes((path / "config").read_bytes().replace(b'"sealed": "', b'"sealed": "AAAA'))
    assert [p.object for p in kept.check().problems] == ["config"]


class _Trickle(io.RawIOBase):
    """A raw writer that takes at most ``step`` bytes a call (a socket, a pipe), or fails as told."""

    def __init__(self, step: int = 1000, fail: BaseException | None = None, none: bool = False):
        self.data = bytearray()
        self.step, self.fail, self.none = step, fail, none

    def writable(self) -> bool:
        return True

    def write(self, b):
        if self.fail is not None and len(self.data) >= 3000:
            raise self.fail
        if self.none:
            return None
        n = min(len(b), self.step)
        self.data += bytes(b[:n])
        return n


def test_dump_writes_everything_into_a_writer_that_takes_part_of_each_write(tmp_path, tree, new_repo):
    repo = new_repo()
    snap = repo.backup([str(tree)]).snapshot
    out = _Trickle()
    assert repo.dump(snap, "a", out) == []
    assert bytes(out.data) == (tree / "a").read_bytes()
    for archive in ("tar", "zip"):
        out = _Trickle(step=777)
        repo.dump(snap, "/", out, archive=archive)
        assert len(out.data) > 200_000
    for fail, error in [(BrokenPipeError(), OutputClosed), (OSError(errno.ENOSPC, "full"), StorageFull),
                        (OSError(errno.EIO, "io"), TargetUnwritable)]:
        with pytest.raises(error):
            repo.dump(snap, "a", _Trickle(fail=fail))
    with pytest.raises(TargetUnwritable):
        repo.dump(snap, "a", _Trickle(none=True))

    class Quiet:  # a writer that returns nothing, as paramiko's files and many response objects do
        def __init__(self):
            self.data = bytearray()

        def write(self, b):
            self.data += b

    quiet = Quiet()
    repo.dump(snap, "a", quiet)
    assert bytes(quiet.data) == (tree / "a").read_bytes()
    with pytest.raises(UsageError, match="binary"):
        repo.dump(snap, "a", io.StringIO())
    closed = io.BytesIO()
    closed.close()
    with pytest.raises(UsageError, match="closed"):
        repo.dump(snap, "a", closed)


class _ReadOnly:
    """A source with read() alone, giving short reads."""

    def __init__(self, data: bytes, text: bool = False):
        self.data, self.text = data, text

    def read(self, n: int = -1):
        part, self.data = self.data[:min(n, 5000)], self.data[min(n, 5000):]
        return part.decode("latin-1") if self.text else part


def test_backup_stream_takes_any_binary_reader_and_refuses_others_before_storing(tmp_path, new_repo):
    repo = new_repo(str(tmp_path / "repo"))
    payload = os.urandom(300_000)
    snap = repo.backup_stream(_ReadOnly(payload), b"dump.sql").snapshot
    with repo.open_file(snap, "dump.sql") as f:
        assert f.read() == payload
    packs = sorted((tmp_path / "repo" / "data").rglob("*"))
    for source, name, match in [(io.StringIO("text"), "x", "binary mode"), (iter([b"a"]), "x", "binary stream"),
                                (None, "x", "binary stream"), (io.BytesIO(b"x"), 5, "stream's name"),
                                (io.BytesIO(b"x"), "../up", "relative path")]:
        with pytest.raises(UsageError, match=match):
            repo.backup_stream(source, name)
    closed = io.BytesIO(b"x")
    closed.close()
    with pytest.raises(UsageError, match="closed"):
        repo.backup_stream(closed, "x")
    with pytest.raises(UsageError, match="returned str"):
        repo.backup_stream(_ReadOnly(b"abc" * 1000, text=True), "x")
    nonblocking = io.BufferedReader(io.BytesIO(b""))
    nonblocking.readinto = lambda b: None
    with pytest.raises(UsageError, match="blocking"):
        repo.backup_stream(nonblocking, "x")
    for count in (lambda b: len(b) + 5, lambda b: -1, lambda b: 2.0):  # else the buffer's old bytes were stored
        lying = io.BufferedReader(io.BytesIO(b""))
        lying.readinto = count
        with pytest.raises(UsageError, match="readinto returned"):
            repo.backup_stream(lying, "x")
    assert sorted((tmp_path / "repo" / "data").rglob("*")) == packs and len(repo.snapshots()) == 1


def test_a_stream_that_fails_part_way_raises_its_own_error_and_saves_nothing(tmp_path, new_repo):
    """The caller's error is the caller's to handle (a dropped connection, say): it comes out as it was
    raised, with no snapshot saved and no lock left, and the next backup of that stream goes ahead."""
    repo = new_repo(str(tmp_path / "repo"))

    class Dropping(io.RawIOBase):
        def __init__(self):
            self.reads = 0

        def readable(self):
            return True

        def readinto(self, b):
            self.reads += 1
            if self.reads > 40:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            b[:65536] = os.urandom(65536)
            return 65536

    with pytest.raises(ConnectionResetError):
        repo.backup_stream(Dropping(), "db.sql")
    assert repo.snapshots() == [] and os.listdir(tmp_path / "repo" / "locks") == []
    assert repo.backup_stream(io.BytesIO(b"select 1;"), "db.sql").snapshot.kind == "full"
    assert repo.check().ok


def test_paths_and_globs_as_bytes_select_and_exclude_as_str_do(tmp_path, tree, new_repo):
    """A bytes path as a filter selected nothing (and a retention policy then kept everything); bytes globs
    were refused, or failed part-way through a later backup."""
    repo = new_repo()
    snap = repo.backup([bytes(tree)], excludes=[b"b"], fixed_chunks=[b"a"], no_delta=[b"x*"],
                       exclude_if_present=[b".nobackup"]).snapshot
    assert sorted(e.path for e in repo.tree(snap)) == [b"", b"a"]
    for paths in ([bytes(tree)], [tree], str(tree)):
        assert [s.id for s in repo.snapshots(paths=paths)] == [snap.id]
        assert repo.snapshot("latest", paths=paths).id == snap.id
    from chunkvault.store.retention import RetentionPolicy

    plan = repo.forget(policy=RetentionPolicy(keep_last=1), paths=[bytes(tree)], dry_run=True)
    assert [d.snapshot_id for d in plan.decisions if d.keep] == [snap.id]
    for call in (lambda: repo.snapshots(tags=[5]), lambda: repo.snapshots(hosts=[5]),
                 lambda: repo.snapshots(paths=[5]), lambda: repo.snapshot("latest", paths=[5]),
                 lambda: repo.backup([str(tree)], fixed_chunks=[5])):
        with pytest.raises(UsageError):
            call()


def test_each_bad_argument_is_a_usage_error_before_any_work(tmp_path, tree, new_repo):
    """Each was a bare TypeError, AttributeError or ValueError from deep inside, some mid-backup."""
    repo = new_repo()
    snap = repo.backup([str(tree)]).snapshot
    for call in (lambda: repo.snapshots(latest="x"), lambda: repo.check(subset=5), lambda: repo.forget(policy=5),
                 lambda: repo.export(snap, None, "pw"), lambda: repo.import_backup(None, "pw"),
                 lambda: repo.remove_key(5), lambda: repo.remove_key(""), lambda: repo.copy_to(5),
                 lambda: Repository.init(str(tmp_path / "r2"), "pw", kdf_seconds=0, copy_chunker_from=5),
                 lambda: Repository.init(str(tmp_path / "r3"), "pw", kdf_seconds=0, ledger=5),
                 lambda: repo.restore(snap, str(tmp_path / "o"), processes="2"),
                 lambda: repo.restore(snap, str(tmp_path / "o"), processes=2.5),
                 lambda: repo.restore(snap, str(tmp_path / "o"), processes=10**6),
                 lambda: repo.restore(snap, str(tmp_path / "o"), progress=5),
                 lambda: repo.backup([str(tree)], progress=5), lambda: repo.backup([str(tree)], exclude_if_present=[5])):
        with pytest.raises(UsageError):
            call()
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists() and not (tmp_path / "o").exists()
    assert [s.id for s in repo.snapshots()] == [snap.id]


def test_a_chunker_secret_of_the_wrong_size_or_unkeyed_is_refused_before_anything_is_written(tmp_path):
    for secret in (b"short", "x" * 32, bytes(33)):
        with pytest.raises(UsageError, match="chunker_secret must be 32 bytes"):
            Repository.init(str(tmp_path / "r"), "pw", kdf_seconds=0, chunker_secret=secret)
        assert not (tmp_path / "r" / "config").exists() and not (tmp_path / "r" / "keys").exists()
    with pytest.raises(UsageError, match="not the unkeyed test secret"):  # its boundaries are public
        Repository.init(str(tmp_path / "r"), "pw", kdf_seconds=0, chunker_secret=bytes(32))
    assert not (tmp_path / "r" / "config").exists()


def test_arguments_in_the_forms_a_caller_has_at_hand(tmp_path, tree, new_repo):
    repo = new_repo()
    first = repo.backup([str(tree)], exclude_larger_than="1M", fixed_chunk_size="1M", fixed_chunks=["a"]).snapshot
    taken = datetime.datetime.fromisoformat(first.time).timestamp()
    second = repo.backup([str(tree)], parent=first, time=taken + 1).snapshot
    assert second.parent == first.id
    assert repo.snapshot(first) == first
    assert repo.snapshot("latest", until=taken + 0.5).id == first.id
    assert repo.snapshot("latest", until=taken + 0.9).id == first.id
    out = tmp_path / "out"
    repo.restore(second, str(out), includes=b"b")
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["b"]
    assert [f.path for f in repo.find([b"b"])] == [b"b"]
    repo.prune(max_unused="5%")
    for call in [lambda: repo.snapshot("latest", until=datetime.date.today()),
                 lambda: repo.snapshot("latest", until=[1]),
                 lambda: repo.prune(max_unused=-1), lambda: repo.prune(max_unused="lots"),
                 lambda: repo.backup([str(tree)], fixed_chunk_size="huge"),
                 lambda: list(repo.tree(first, 5)), lambda: repo.reading(wait="x").__enter__(),
                 lambda: repo.forget([first], wait=-1), lambda: repo.restore(first, str(tmp_path / "o"), includes=[5])]:
        with pytest.raises(UsageError):
            call()
    plan = repo.forget([second])
    assert plan.remove == [second.id] and [s.id for s in repo.snapshots()] == [first.id]
    repo.forget(first)
    assert repo.snapshots() == []


def test_open_file_seeks_to_any_offset(tmp_path, new_repo):
    import random

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 << 20)
    (src / "big").write_bytes(data)
    os.link(src / "big", src / "link")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    rnd = random.Random(5)
    with repo.open_file(snap, "big") as f:
        assert f.seekable() and f.name == "big" and f.tell() == 0
        assert f.read(10) == data[:10] and f.tell() == 10
        for _ in range(40):
            where = rnd.randrange(len(data) + 10)
            n = rnd.randrange(1, 300_000)
            assert f.seek(where) == where
            got = f.read(n)
            assert got == data[where:where + n] and f.tell() == where + len(got)
        assert f.seek(-100, io.SEEK_END) == len(data) - 100 and f.read() == data[-100:]
        f.seek(1000)
        assert f.seek(500, io.SEEK_CUR) == 1500 and f.read(7) == data[1500:1507]
        with pytest.raises((ValueError, OSError)):
            f.seek(-1)
    with repo.open_file(snap, "link") as f:
        assert f.name == "link" and f.read() == data


def test_change_password_replaces_the_opening_key(tmp_path, new_repo):
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    new, old = repo.change_password("another one", kdf_seconds=0)
    assert [(k["id"], k["current"]) for k in repo.keys()] == [(new, True)] and new != old
    assert repo.change_password("a third", kdf_seconds=0)[1] == new  # the object opens with the new key now
    Repository.import_key(path, repo.export_key(), "a third")
    Repository.open(path, "a third").close()
    with pytest.raises(WrongPassword):
        Repository.open(path, PASSWORD)


def test_a_password_change_run_again_after_a_stop_keeps_the_key_the_first_run_stored(tmp_path, new_repo):
    """Stopped between storing the new key and removing the old one, then run again with the old password:
    the rerun added a second key for the new password."""
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    left = repo.add_key("the new one", kdf_seconds=0)  # what the stopped change stored
    colleague = repo.add_key("a colleague's", kdf_seconds=0)
    new, old = repo.change_password("the new one", kdf_seconds=0)
    assert new == left and {k["id"] for k in repo.keys()} == {left, colleague}
    Repository.open(path, "the new one").close()
    with pytest.raises(WrongPassword):
        Repository.open(path, PASSWORD)


def test_a_read_without_a_lock_that_a_prune_overtook_says_so_instead_of_calling_for_repairs(tmp_path, tree,
                                                                                             new_repo):
    """A read-only token cannot store a lock: a prune ran meanwhile, and the restore ended in "corrupt object
    ... `repair index`" on a whole repository."""
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    first = repo.backup([str(tree)]).snapshot
    (tree / "a").write_bytes(os.urandom(200_000))
    repo.backup([str(tree)])
    unlocked = Repository.open(path, PASSWORD, lock_reads=False)
    with pytest.raises(CorruptObject) as untouched:
        with unlocked.reading("restore"):
            raise CorruptObject("data/ab/x", "pack is missing")
    assert "read without a lock" not in str(untouched.value)
    with pytest.raises(CorruptObject, match="the index changed while this restore read without a lock") as info:
        with unlocked.reading("restore"):
            unlocked.store.index  # the read follows the index as it was
            repo.forget([first])
            repo.prune(max_unused=0)
            error = CorruptObject("data/ab/x", "pack is missing")
            error.partial = "what was restored"
            raise error
    assert info.value.partial == "what was restored"
    unlocked.close()


@pytest.mark.parametrize("storage", ["local", "http"])
def test_a_closed_repository_refuses_every_call_on_any_storage(tmp_path, tree, request, storage):
    """With a UsageError: over HTTP, tree, diff and find_entry went to the closed remote first, whose
    refusal (RemoteError, exit 14) read as a storage failure."""
    if storage == "http":
        server = request.getfixturevalue("http_server")
        repo = Repository.init(server.url, PASSWORD, kdf_seconds=0, token=FULL_TOKEN, cache=False)
        stored = server.path
    else:
        stored = tmp_path / "repo"
        repo = Repository.init(str(stored), PASSWORD, kdf_seconds=0)
    with repo:
        repo.backup([str(tree)])
        # made before the close, used after it: they fetched from the closed remote (RemoteError over HTTP)
        name = next(e.path for e in repo.tree("latest") if e.type == T_FILE and e.size)
        stream = repo.open_file("latest", name)
        entries, changes = repo.tree("latest"), repo.diff("latest", "latest")
    repo.close()  # again: idempotent
    for call in (lambda: repo.backup([str(tree)]), lambda: repo.restore("latest", str(tmp_path / "o")),
                 repo.snapshots, repo.check, repo.accept_state, lambda: repo.reading().__enter__(),
                 lambda: list(repo.tree("latest")), lambda: list(repo.diff("latest", "latest")),
                 lambda: repo.find_entry("latest", "x"), lambda: repo.open_file("latest", "x"),
                 stream.read, lambda: list(entries), lambda: list(changes)):
        with pytest.raises(UsageError, match="was closed"):
            call()
    assert len(os.listdir(os.path.join(stored, "snapshots"))) == 1 and not (tmp_path / "o").exists()


def test_a_stream_begun_before_close_refuses_even_what_it_had_buffered(tmp_path, tree, new_repo):
    """A stream reads ahead a MiB: the rest of a small file (all of it, a line at a time too) came from that
    buffer after close, while a read that fetched was refused."""
    repo = new_repo()
    repo.backup([str(tree)])
    stream, lines = repo.open_file("latest", "a"), repo.open_file("latest", "b")
    assert len(stream.read(10)) == 10 and stream.tell() == 10
    assert lines.peek(1)
    repo.close()
    for call in (stream.read, lambda: stream.read1(5), lambda: stream.readinto(bytearray(5)),
                 lambda: stream.peek(1), stream.readline, lambda: next(lines), lines.readlines):
        with pytest.raises(UsageError, match="was closed"):
            call()


@pytest.mark.parametrize("storage", ["local", "http"])
def test_a_close_inside_a_reading_block_or_beside_one_leaves_no_lock(tmp_path, tree, request, storage):
    """Over HTTP the block's lock was removed after the remote had closed, so it stayed, and a prune waited
    for it to go stale (5 minutes); a close from another thread did not wait for the block, whose reads then
    failed as a storage error."""
    if storage == "http":
        server = request.getfixturevalue("http_server")
        url, stored, options = server.url, server.path, {"token": FULL_TOKEN, "cache": False}
    else:
        stored = tmp_path / "repo"
        url, options = str(stored), {}
    Repository.init(url, PASSWORD, kdf_seconds=0, **options).backup([str(tree)])
    repo = Repository.open(url, PASSWORD, **options)
    with repo.reading("restore"):
        assert len(os.listdir(os.path.join(stored, "locks"))) == 1
        repo.close()
    assert os.listdir(os.path.join(stored, "locks")) == []

    repo = Repository.open(url, PASSWORD, **options)
    name = next(e.path for e in repo.tree("latest") if e.type == T_FILE and e.size)
    inside, go_on, ended = threading.Event(), threading.Event(), []

    def reader() -> None:
        try:
            with repo.reading("restore"):
                inside.set()
                go_on.wait(30)
                with repo.open_file("latest", name) as f:
                    f.read()
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            ended.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(30)
    repo.close()  # the block's lock released before the connection closes: nothing waits for the block
    assert os.listdir(os.path.join(stored, "locks")) == []
    go_on.set()
    thread.join(30)
    assert not thread.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], UsageError) and "was closed" in str(ended[0]), ended
    assert os.listdir(os.path.join(stored, "locks")) == []


def test_a_stop_leaves_the_calls_of_a_reading_block_made_after_it_alone(tmp_path, tree):
    """A reading block is no call: after a ``stop`` with nothing running, what runs inside the block runs
    as usual, and the caller's own error comes out as it was raised."""
    path = str(tmp_path / "repo")
    with Repository.init(path, PASSWORD, kdf_seconds=0) as repo:
        snap = repo.backup([str(tree)]).snapshot
        with pytest.raises(ValueError, match="the caller's own"):
            with repo.reading("browse"):
                repo.stop()
                repo.restore(snap.id, str(tmp_path / "out"))
                assert list(repo.tree(snap.id))
                raise ValueError("the caller's own error")
        assert describe(tmp_path / "out") == describe(tree)


def test_values_in_the_forms_the_readme_names_and_out_of_range_ones(tmp_path, tree):
    path = str(tmp_path / "repo")
    with Repository.init(path, PASSWORD, kdf_seconds=0, pack_size="4M") as repo:
        assert repo.store.config.settings.pack_size == 4 << 20
    with Repository.open(os.fsencode(path), PASSWORD) as repo:  # a path as bytes, as paths elsewhere
        for bad in ({"exclude_larger_than": 10**30}, {"host": "db\nfake row"}, {"tags": ["a\tb"]},
                    {"tags": ["a\u2028b"]}, {"host": "db\udcff"}, {"tags": ["caf\udce9"]}):
            with pytest.raises(UsageError):
                repo.backup([str(tree)], **bad)
        assert repo.snapshots() == []
        snap = repo.backup([str(tree)], host="nuit\xa0blanche", tags=["été", "👨\u200d👩\u200d👧"]).snapshot
        assert [s.id for s in repo.snapshots(hosts=["nuit\xa0blanche"], tags=["été"])] == [snap.id]
        with pytest.raises(UsageError):
            repo.tag(add=["x\ny"])
        with pytest.raises(UsageError):  # bytes of a command line that are not UTF-8
            repo.tag(add=["caf\udce9"])
        assert repo.snapshots(hosts=["db\n1"]) == []  # a filter may name what was stored before the check


def test_a_reading_block_taking_its_lock_as_close_runs_leaves_no_lock(tmp_path, tree, http_server):  # noqa: F811
    """A thread entering ``reading()`` had passed the closed check, and took its lock after ``close`` had
    looked for locks to release: the lock stayed on the server, holding prune off until stale."""
    from chunkvault.store import locks as locks_module

    url, stored = http_server.url, http_server.path
    options = {"token": FULL_TOKEN, "cache": False}
    Repository.init(url, PASSWORD, kdf_seconds=0, **options).backup([str(tree)])
    repo = Repository.open(url, PASSWORD, **options)
    taking, go_on, ended = threading.Event(), threading.Event(), []
    real = locks_module.RepoLock.acquire

    def slow_acquire(self):
        real(self)
        taking.set()
        go_on.wait(30)  # the lock is on the server; its block has not noted it yet

    def reader() -> None:
        try:
            with repo.reading("restore"):
                ended.append("inside")
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            ended.append(exc)

    locks_module.RepoLock.acquire = slow_acquire
    try:
        thread = threading.Thread(target=reader)
        thread.start()
        assert taking.wait(30)
        closing = threading.Thread(target=repo.close)
        closing.start()
        closing.join(0.5)
        assert closing.is_alive()  # waits for a lock being taken
        go_on.set()
        closing.join(30)
        thread.join(30)
    finally:
        locks_module.RepoLock.acquire = real
    assert not closing.is_alive() and not thread.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], UsageError), ended
    assert os.listdir(os.path.join(stored, "locks")) == []
