"""Faults: a flaky remote, a remote that goes away, a full disk, and writers racing each other.

Transient and permanent remote failures come from FaultyRemote (tests/faults.py)
under the real retry layer; full disks from a small tmpfs mounted for the test;
concurrency from real CLI processes on one repository.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import crashkit
from chunkvault import Repository
from chunkvault.errors import PermissionDenied, RemoteUnavailable, StorageFull
from chunkvault.remotes.layer import RetryingRemote
from chunkvault.remotes.local import LocalRemote
from faults import FaultyRemote
from servers_http import FULL_TOKEN, serve_factory, write_tokens  # noqa: F401
from servers_ssh import sshd  # noqa: F401
from treeutil import describe, mounted_tmpfs

PASSWORD = crashkit.PASSWORD
SMALL = {"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 512 << 10}


def no_sleep(_seconds: float) -> None:
    """Retries wait for nothing: the faults are injected, not real."""


def flaky(path: str, seed: int, **faults) -> tuple[FaultyRemote, RetryingRemote]:
    faulty = FaultyRemote(LocalRemote(path), seed=seed, **faults)
    return faulty, RetryingRemote(faulty, attempts=10, sleep=no_sleep, rng=random.Random(-seed))


def tree_records(repo: Repository, snap_id: str) -> list[tuple]:
    """A snapshot's resolved tree as comparable tuples (ids included)."""
    return [(e.path, e.type, e.mode, e.size, e.mtime_ns, e.digest, e.chunks, e.target) for e in repo.tree(snap_id)]


# --- transient faults ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ten_percent_transient_faults_change_nothing(tmp_path, seed):
    path = str(tmp_path / "repo")
    faulty, remote = flaky(path, seed, error_rate=0.10, truncate_rate=0.05)
    tree = crashkit.SourceTree(str(tmp_path / "src"), random.Random(seed), target_bytes=2 << 20)
    states = {}
    with Repository.init(remote, PASSWORD, kdf_seconds=0, chunker=SMALL, pack_size=64 << 10) as repo:
        for _ in range(3):
            faulty.inject("put", 2, after=True)  # each kind surely happens, whatever the threads' order
            states[repo.backup([tree.root]).snapshot.id] = tree.state()
            tree.mutate()
        repo.forget([next(iter(states))])
        states.pop(next(iter(states)))
        faulty.inject("delete", 1, after=True)
        repo.prune(max_unused=0)
        faulty.inject_truncation()  # one at a time: a run of them on one object would spend its retries
        faulty_check = repo.check(read_data=True)
        for sid, state in states.items():
            faulty.inject_truncation()
            out = tmp_path / f"faulty-{sid[:8]}"
            repo.restore(sid, str(out))
            assert describe(out) == state
        faulty_trees = {sid: tree_records(repo, sid) for sid in states}
    # the same repository read without faults: identical snapshots, trees and check report
    with Repository.open(path, PASSWORD) as clean:
        assert {s.id for s in clean.snapshots()} == set(states)
        assert {sid: tree_records(clean, sid) for sid in states} == faulty_trees
        clean_check = clean.check(read_data=True)
    assert faulty_check.ok and clean_check.ok and not clean_check.warnings
    assert (faulty_check.snapshots, faulty_check.packs, faulty_check.blobs) == (
        clean_check.snapshots, clean_check.packs, clean_check.blobs)
    assert crashkit.temp_leftovers(path) == []
    injected = sum(faulty.faults.values())
    print(f"seed {seed}: {sum(faulty.calls.values())} calls, {injected} faults injected "
          f"({dict(faulty.faults)}), {remote.retries} retries, all survived")
    # the scripted faults all struck; the random ones (~15 % of calls: their order, so their count,
    # depends on the threads' scheduling) on top of them
    assert faulty.faults["scripted"] == 7 and faulty.faults["scripted_cut"] == 3
    assert injected >= 20 and faulty.faults["error"] > 0


class PackReads(FaultyRemote):
    """A remote without cheap ranges that records the length of every pack read."""

    def __init__(self, inner, reads: list[int]):
        super().__init__(inner, seed=0)
        self.reads = reads

    def get(self, key, start=None, length=None):
        data = super().get(key, start, length)
        if key.startswith("data/"):
            self.reads.append(len(data))
        return data


def test_off_local_disk_neighbours_come_in_one_request_and_the_gaps_are_kept(tmp_path):
    """A remote without cheap ranges (all but local disk) gets a pack's wanted blobs with the bytes between
    them in one request, and answers the next reads of the blobs in those gaps from what it read."""
    path = str(tmp_path / "repo")
    Repository.init(path, PASSWORD, kdf_seconds=0, chunker=SMALL).close()
    blobs = [os.urandom(100_000) for _ in range(12)]  # incompressible: gaps of 100 kB between every other
    with crashkit.open_repo(path) as repo, repo.store.writer() as writer:
        for b in blobs:
            writer.add(repo.store.blob_id(b), b)
        writer.flush()
    gets: list[int] = []
    with Repository.open(PackReads(LocalRemote(path), gets), PASSWORD) as repo:
        store = repo.store
        ids = [store.blob_id(b) for b in blobs]
        assert [bytes(p) for p in store.read_blobs(ids[0::2])] == blobs[0::2]
        assert len(gets) == 1 and sum(gets) < 1.1 * sum(map(len, blobs))
        assert [bytes(p) for p in store.read_blobs(ids[1:11:2])] == blobs[1:11:2]
        assert len(gets) == 1  # every blob in the gaps came with the first read
        assert [bytes(p) for p in store.read_blobs(ids[11:])] == blobs[11:] and len(gets) == 2  # past its end
    with Repository.open(path, PASSWORD) as local:  # local disk: only what is wanted, one read per blob
        store = local.store
        reads = []
        get = store.remote.get
        store.remote.get = lambda key, start=None, length=None: reads.append(key) or get(key, start, length)
        assert [bytes(p) for p in store.read_blobs(ids[0::2])] == blobs[0::2]
        assert len([k for k in reads if k.startswith("data/")]) == 6


def test_a_restore_off_local_disk_asks_for_many_small_files_at_once(tmp_path):
    path = str(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):
        (src / f"f{i:03}").write_bytes(os.urandom(2000))
    with Repository.init(path, PASSWORD, kdf_seconds=0, chunker=SMALL) as repo:
        sid = repo.backup([str(src)]).snapshot.id
    gets: list[int] = []
    with Repository.open(PackReads(LocalRemote(path), gets), PASSWORD) as repo:
        repo.restore(sid, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
    assert len(gets) <= 6  # the manifest, then batches of 256 blobs (local disk's 64 took 12 reads in all)


# --- permanent failure ------------------------------------------------------------------


@pytest.fixture
def one_snapshot(tmp_path):
    path = str(tmp_path / "repo")
    src = tmp_path / "src"
    tree = crashkit.SourceTree(str(src), random.Random(11), target_bytes=1 << 20)
    with Repository.init(path, PASSWORD, kdf_seconds=0, chunker=SMALL, pack_size=64 << 10) as repo:
        sid = repo.backup([str(src)]).snapshot.id
    state = tree.state()
    tree.mutate()
    for i in range(6):  # plenty of new data: many packs to upload
        (src / f"new{i}").write_bytes(os.urandom(150_000))
    return path, src, {sid: state}


def puts_of_a_backup(path: str, src, tmp_path) -> int:
    """How many uploads the pending backup makes (measured on a copy of the repository)."""
    twin = str(tmp_path / "twin")
    shutil.copytree(path, twin)
    faulty, remote = flaky(twin, 0)
    Repository.open(remote, PASSWORD, ledger=False).backup([str(src)])  # the twin shares the id: not this client's
    shutil.rmtree(twin)
    return faulty.successful_puts


def down_around_snapshot_upload(faulty: FaultyRemote, *, before: bool) -> None:
    """Take the remote down just before (or just after) the snapshot object is uploaded."""
    real_put = faulty.inner.put

    def put(key, data, *, if_absent=False):
        if key.startswith("snapshots/") and before:
            faulty.down = True
            raise RemoteUnavailable("link dropped")
        real_put(key, data, if_absent=if_absent)
        if key.startswith("snapshots/"):
            faulty.down = True

    faulty.inner.put = put  # type: ignore[method-assign]


@pytest.mark.parametrize("share", [0.0, 0.05, 0.3, 0.7, "snapshot"])
def test_remote_gone_for_good_gives_one_clear_error_and_no_snapshot(one_snapshot, tmp_path, share):
    path, src, states = one_snapshot
    faulty, remote = flaky(path, 7)
    repo = Repository.open(remote, PASSWORD)  # opening only reads
    if share == "snapshot":  # everything stored but the snapshot itself
        down_around_snapshot_upload(faulty, before=True)
    else:  # after that share of the backup's uploads, the remote is gone
        faulty.fail_after = int(share * puts_of_a_backup(path, src, tmp_path))
    with pytest.raises(RemoteUnavailable) as info:
        repo.backup([str(src)])
    assert "unavailable" in str(info.value) and "\n" not in str(info.value)
    assert faulty.faults["down"] > 0
    assert crashkit.snapshot_ids(path) == set(states)
    _still_valid(path, src, states, tmp_path)


def test_backup_stored_then_lock_release_fails_is_still_a_success(one_snapshot):
    path, src, states = one_snapshot
    faulty, remote = flaky(path, 7)
    repo = Repository.open(remote, PASSWORD)
    down_around_snapshot_upload(faulty, before=False)  # every upload lands; only the lock removal fails
    try:
        result = repo.backup([str(src)])
    finally:
        written = crashkit.snapshot_ids(path) - set(states)
        assert len(written) == 1  # the snapshot is stored either way
    assert result.snapshot.id in written


def test_remote_going_down_mid_backup(one_snapshot, tmp_path):
    path, src, states = one_snapshot
    faulty, remote = flaky(path, 5)
    repo = Repository.open(remote, PASSWORD)
    real_get = faulty.inner.get

    def get_then_fail(key, start=None, length=None):
        data = real_get(key, start, length)
        if key.startswith("index/"):  # the backup has its lock and index: now the link drops
            faulty.down = True
        return data

    faulty.inner.get = get_then_fail  # type: ignore[method-assign]
    with pytest.raises(RemoteUnavailable):
        repo.backup([str(src)])
    assert crashkit.snapshot_ids(path) == set(states)
    _still_valid(path, src, states, tmp_path)


def stored_packs(path: str) -> set[bytes]:
    return {bytes.fromhex(n) for _, _, names in os.walk(os.path.join(path, "data")) for n in names
            if not n.startswith(".")}


def eight_files(tmp_path) -> tuple[str, object]:
    """A repository, and a source of eight files of random bytes: several packs to upload."""
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    return path, src


def test_a_failed_backup_indexes_the_packs_it_stored(tmp_path):
    """Whatever stops a backup, the packs it stored whole are indexed on the way out: `check` finds none in
    no index, and running it again stores none of their blobs a second time."""
    path, src = eight_files(tmp_path)
    faulty, remote = flaky(path, 3)
    real_put = faulty.inner.put
    packs_put = []

    def put(key, data, *, if_absent=False):
        if key.startswith("data/"):
            packs_put.append(key)
            if len(packs_put) == 6:
                raise PermissionDenied("the sixth pack is refused")
        real_put(key, data, if_absent=if_absent)

    faulty.inner.put = put  # type: ignore[method-assign]
    with pytest.raises(PermissionDenied):
        Repository.open(remote, PASSWORD).backup([str(src)])
    with Repository.open(path, PASSWORD) as repo:
        assert len(stored_packs(path)) >= 5
        assert {p for packs in crashkit.indexed_blobs(repo.store).values() for p, _ in packs} == stored_packs(path)
        assert not any("in no index" in w for w in repo.check().warnings)
        before = crashkit.indexed_blobs(repo.store)
        added = repo.backup([str(src)]).snapshot.stats["added_blobs"]
        after = crashkit.indexed_blobs(repo.store)
        assert set(before) <= set(after) and 0 < added <= len(set(after) - set(before))  # (added counts data blobs)
        assert all(len(packs) == 1 for packs in after.values())  # none stored twice
        assert repo.check(read_data=True).ok


def test_a_backup_that_gave_up_on_the_remote_leaves_its_packs_unindexed_at_once(tmp_path):
    """Once the retries of an upload are spent, the packs stored before it are not indexed on the way out:
    the index object (and the look at the lock before it) would wait out the whole retry time again, and a
    command bounded by ``retry-time`` took twice as long to fail."""
    path, src = eight_files(tmp_path)
    faulty, remote = flaky(path, 3)
    real_put = faulty.inner.put
    packs_put = []
    after_down: list[tuple[str, str]] = []

    def put(key, data, *, if_absent=False):
        if key.startswith("data/"):
            packs_put.append(key)
            if len(packs_put) == 6:
                faulty.down = True
                raise RemoteUnavailable("the link dropped")
        real_put(key, data, if_absent=if_absent)

    def recorded(op, method):
        def call(key, *args, **kwargs):
            if faulty.down:
                after_down.append((op, key))
            return method(key, *args, **kwargs)
        return call

    faulty.inner.put = put  # type: ignore[method-assign]
    for op in ("get", "put", "stat", "delete"):
        setattr(faulty, op, recorded(op, getattr(faulty, op)))
    with pytest.raises(RemoteUnavailable, match="unavailable"):
        Repository.open(remote, PASSWORD).backup([str(src)])
    assert after_down and all(op == "put" and key.startswith("data/") for op, key in after_down), after_down
    faulty.down = False
    with Repository.open(path, PASSWORD) as repo:  # the packs stored are prune's to clear; a rerun stores all
        assert any("in no index" in w for w in repo.check().warnings)
        repo.backup([str(src)])
        assert repo.check(read_data=True).ok


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread of another process (the kernel otherwise picks any thread)."""
    number = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)
    if number is None:
        pytest.skip("tgkill's system call number is not known for this machine")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, pid, tid, sig) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def signal_a_worker_thread(pid: int, sig: int) -> None:
    """``sig`` to one of the process's threads other than the main one (the newest still alive)."""
    for tid in sorted((int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid), reverse=True):
        try:
            tgkill(pid, tid, sig)
            return
        except ProcessLookupError:
            continue  # that thread ended meanwhile
    raise AssertionError("no worker thread to signal")


@pytest.mark.parametrize("to_worker", [False, True], ids=["process", "worker-thread"])
@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGQUIT, 131, "quit")])
def test_a_stopped_backup_releases_its_lock_and_indexes_what_it_stored(sig, code, said, to_worker, tmp_path):
    """SIGTERM (a service manager, a timeout) stops a backup as Ctrl-C does: one line, 128 + the signal,
    its lock gone, its packs indexed, no snapshot; also when the signal lands on a worker thread while the
    main thread waits for a silent stream."""
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    proc = subprocess.Popen(crashkit.cli_argv("backup", "-r", path, "--stdin", "--stdin-name", "db"),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=crashkit.cli_env())
    try:
        proc.stdin.write(os.urandom(12 << 20))  # the stream stays open: the backup waits for more
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while len(stored_packs(path)) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stored_packs(path)) >= 8
        if to_worker:
            signal_a_worker_thread(proc.pid, sig)
        else:
            proc.send_signal(sig)
        assert proc.wait(60) == code
    finally:
        proc.kill()
        proc.stdin.close()
    assert proc.stderr.read().decode().strip() == f"chunkvault: {said}"
    assert os.listdir(os.path.join(path, "locks")) == [] and crashkit.snapshot_ids(path) == set()
    with Repository.open(path, PASSWORD) as repo:
        assert {p for packs in crashkit.indexed_blobs(repo.store).values() for p, _ in packs} == stored_packs(path)
        assert repo.check(read_data=True).ok


def _still_valid(path: str, src, states: dict, tmp_path) -> None:
    """check is clean, earlier snapshots restore, and the next backup succeeds."""
    with Repository.open(path, PASSWORD) as repo:
        report = repo.check(read_data=True)
        assert report.ok, report.to_dict()
        for sid, state in states.items():
            out = tmp_path / f"after-{sid[:8]}-{time.monotonic_ns()}"
            repo.restore(sid, str(out))
            assert describe(out) == state
        snap = repo.backup([str(src)]).snapshot
        out = tmp_path / f"next-{time.monotonic_ns()}"
        repo.restore(snap.id, str(out))
        assert describe(out) == describe(src)


# --- full disks ---------------------------------------------------------------------------


@pytest.fixture
def tmpfs():
    d = tempfile.mkdtemp(prefix="cv-tmpfs-")
    try:
        with mounted_tmpfs(d):
            yield d
    finally:
        os.rmdir(d)


def fill_up(directory, leave):
    """Fill the file system of ``directory`` to ``leave`` bytes; returns the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = b"x" * (1 << 16)
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return path


def test_full_repository_disk(tmpfs, tmp_path):
    path = os.path.join(tmpfs, "repo")
    crashkit.init_repo(path, compression=3)
    src = tmp_path / "src"
    tree = crashkit.SourceTree(str(src), random.Random(3), target_bytes=1 << 20)
    with Repository.open(path, PASSWORD) as repo:
        states = {repo.backup([str(src)]).snapshot.id: tree.state()}
    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):
        (big / f"r{i}").write_bytes(os.urandom(1 << 20))
    proc = crashkit.run_cli("backup", "-r", path, str(big), ok=(14,))
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "no space" in err, err
    with Repository.open(path, PASSWORD) as repo:
        with pytest.raises(StorageFull):
            repo.backup([str(big)])
    assert crashkit.snapshot_ids(path) == set(states)
    with Repository.open(path, PASSWORD) as repo:
        report = repo.check(read_data=True)
        assert report.ok, report.to_dict()
        # What the failed backups uploaded after their last index object (nothing, when the disk filled up
        # right after one): check reports it, and prune frees exactly that.
        reported = any("in no index" in w for w in report.warnings)
        # The disk full to the last page but one (the lock's): prune deletes before it writes.
        filler = fill_up(tmpfs, leave=4096)
        plan = repo.prune()
        os.unlink(filler)
        assert bool(plan.orphans) == reported
        assert plan.orphans or plan.dead_indexes
        assert not any("in no index" in w for w in repo.check().warnings)
        tree.mutate()
        snap = repo.backup([str(src)]).snapshot
        states[snap.id] = tree.state()
        assert repo.check(read_data=True).ok
    crashkit.verify_restores(path, states, str(tmp_path), crashkit.Figures("enospc"))


def _a_small_and_a_big_snapshot(tmpfs, tmp_path, seed, big_mib):
    """A repository on the tmpfs with a snapshot of a 1 MiB tree (``states``: its state) and one of
    ``big_mib`` MiB of random files (``gone``: its id, for a forget to free)."""
    path = os.path.join(tmpfs, "repo")
    crashkit.init_repo(path, compression=3)
    src = tmp_path / "src"
    tree = crashkit.SourceTree(str(src), random.Random(seed), target_bytes=1 << 20)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(big_mib):
        (big / f"r{i}").write_bytes(os.urandom(1 << 20))
    with Repository.open(path, PASSWORD) as repo:
        states = {repo.backup([str(src)]).snapshot.id: tree.state()}
        gone = repo.backup([str(big)]).snapshot.id
    return path, src, tree, big, states, gone


def test_prune_after_forget_on_a_full_disk(tmpfs, tmp_path):
    """No pack of failed backups to delete first, the disk full: the forgotten snapshot's own index object
    and packs go before the new index is written (restic needs free space or an unsafe flag here)."""
    path, src, tree, big, states, gone = _a_small_and_a_big_snapshot(tmpfs, tmp_path, 5, 4)
    with Repository.open(path, PASSWORD) as repo:
        repo.forget([gone])
    filler = fill_up(tmpfs, leave=4096)
    with Repository.open(path, PASSWORD) as repo:
        with pytest.raises(StorageFull):
            repo.backup([str(big)])
    out = json.loads(crashkit.run_cli("prune", "-r", path, "--json").stdout)
    assert out["freed_bytes"] >= 4 << 20 and out["orphan_packs"] == 0, out
    os.unlink(filler)
    with Repository.open(path, PASSWORD) as repo:
        assert repo.check(read_data=True).ok
        tree.mutate()
        states[repo.backup([str(src)]).snapshot.id] = tree.state()
    crashkit.verify_restores(path, states, str(tmp_path), crashkit.Figures("enospc-prune"))


def test_forget_and_prune_on_a_disk_full_to_the_last_byte(tmpfs, tmp_path):
    """Not even a lock fits: the space a command keeps back at the repository's root takes it, so the
    commands that free space can run; it is put back once there is room."""
    from chunkvault.remotes.local import RESERVE_NAME

    path, src, tree, _big, states, gone = _a_small_and_a_big_snapshot(tmpfs, tmp_path, 9, 3)
    reserve = os.path.join(path, RESERVE_NAME)
    assert os.path.getsize(reserve) == 1 << 20
    filler = fill_up(tmpfs, leave=0)
    assert os.statvfs(tmpfs).f_bavail == 0
    (src / "new").write_bytes(os.urandom(200_000))  # a backup's shared lock leaves the reserve alone
    crashkit.run_cli("backup", "-r", path, str(src), ok=(14,))
    assert os.path.getsize(reserve) == 1 << 20
    crashkit.run_cli("forget", "-r", path, gone)
    out = json.loads(crashkit.run_cli("prune", "-r", path, "--json").stdout)
    assert out["freed_bytes"] >= 3 << 20, out
    assert os.path.getsize(reserve) == 1 << 20  # kept back again, from what prune freed
    os.unlink(filler)
    with Repository.open(path, PASSWORD) as repo:
        assert [s.id for s in repo.snapshots()] == list(states)
        assert repo.check(read_data=True).ok
    crashkit.verify_restores(path, states, str(tmp_path), crashkit.Figures("enospc-reserve"))


@pytest.mark.parametrize("kind", ["sftp", "sftp-paramiko", "http"])
def test_full_remote_disk(kind, tmpfs, tmp_path, request):
    """The off-site server's disk fills up: one clear line and exit 14, the repository as it was, and the
    space back once prune has run.  (Over paramiko, uploads failing together each removed its part before
    asking for the free space, and the disk looked to have room: "failed: Failure".)"""
    path = os.path.join(tmpfs, "repo")
    env = {"CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}
    if kind.startswith("sftp"):
        server = request.getfixturevalue("sshd")
        url = server.url(path)
        env.update(server.env)
        if kind == "sftp-paramiko":
            env["CHUNKVAULT_SFTP_TRANSPORT"] = "paramiko"
    else:
        os.mkdir(path)
        served = request.getfixturevalue("serve_factory")("--tokens", str(write_tokens(tmp_path)), path=path)
        url = served.url
        env["CHUNKVAULT_HTTP_TOKEN"] = FULL_TOKEN
    env = crashkit.cli_env(env)
    crashkit.run_cli("init", "-r", url, "--kdf-time", "0", "--pack-size", "1m", env=env)
    src = tmp_path / "src"
    tree = crashkit.SourceTree(str(src), random.Random(7), target_bytes=1 << 20)
    crashkit.run_cli("backup", "-r", url, str(src), env=env)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):
        (big / f"r{i}").write_bytes(os.urandom(1 << 20))
    err = crashkit.run_cli("backup", "-r", url, str(big), env=env, ok=(14,)).stderr.decode().strip()
    assert len(err.splitlines()) == 1 and ("no space left on the SFTP server" in err if kind.startswith("sftp")
                                           else "is out of space" in err), err
    assert len(json.loads(crashkit.run_cli("snapshots", "-r", url, "--json", env=env).stdout)) == 1
    crashkit.run_cli("check", "-r", url, "--read-data", env=env)
    # The server keeps space back for a lock, as a local repository does: prune runs on a disk full to the
    # last byte.  (An SFTP server answers a full disk with a bare failure: no such reserve there.)
    filler = fill_up(tmpfs, leave=0) if kind == "http" else None
    crashkit.run_cli("prune", "-r", url, env=env)
    if filler is not None:
        os.unlink(filler)
    tree.mutate()
    crashkit.run_cli("backup", "-r", url, str(src), env=env)
    crashkit.run_cli("restore", "-r", url, "latest", "--target", str(tmp_path / "out"), env=env)
    assert describe(tmp_path / "out") == describe(src)


def test_a_read_only_sftp_repository_is_read_with_a_warning_and_refuses_writes_clearly(tmpfs, tmp_path, sshd):
    """The server's file system mounted read-only answers a write with a bare "Failure": the reads go ahead
    unlocked (as with a read-only token), a backup fails with one line that says why."""
    path = os.path.join(tmpfs, "repo")
    env = crashkit.cli_env({"CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache"), **sshd.env})
    url = sshd.url(path)
    crashkit.run_cli("init", "-r", url, "--kdf-time", "0", env=env)
    src = tmp_path / "src"
    tree = crashkit.SourceTree(str(src), random.Random(3), target_bytes=256 << 10)
    crashkit.run_cli("backup", "-r", url, str(src), env=env)
    subprocess.run(["mount", "-o", "remount,ro", tmpfs], check=True)
    try:
        done = crashkit.run_cli("restore", "-r", url, "latest", "--target", str(tmp_path / "out"), env=env)
        assert "reading without a lock" in done.stderr.decode() and "read-only" in done.stderr.decode()
        assert describe(tmp_path / "out") == describe(src)
        tree.mutate()
        err = crashkit.run_cli("backup", "-r", url, str(src), env=env, ok=(14,)).stderr.decode().strip()
        assert len(err.splitlines()) == 1 and "the SFTP server's file system is read-only" in err, err
        # a new repository below: its directory is not there to ask (it said only "Failure")
        err = crashkit.run_cli("init", "-r", sshd.url(os.path.join(tmpfs, "new", "repo")), "--kdf-time", "0",
                               env=env, ok=(14,)).stderr.decode().strip()
        assert "the SFTP server's file system is read-only" in err, err
    finally:
        subprocess.run(["mount", "-o", "remount,rw", tmpfs], check=True)


def test_a_prune_that_must_repack_on_a_full_disk_says_how_to_free_space_first(tmpfs, tmp_path):
    path = os.path.join(tmpfs, "repo")
    # packs large enough for both files: with small ones, how the reading threads interleaved decided
    # whether any pack held both (one in five runs under load, none did: nothing to repack)
    crashkit.run_cli("init", "-r", path, "--pack-size", "16M", "--kdf-time", "0", "-q", "--compression", "3")
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept").write_bytes(os.urandom(1 << 20))
    (src / "dropped").write_bytes(os.urandom(1 << 20))
    with Repository.open(path, PASSWORD) as repo:
        first = repo.backup([str(src)]).snapshot.id  # one pack: both files
        (src / "dropped").unlink()
        repo.backup([str(src)])
        repo.forget([first])
    filler = fill_up(tmpfs, leave=4096)
    err = crashkit.run_cli("prune", "-r", path, ok=(14,)).stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "`prune --max-unused 100%`" in err, err
    os.unlink(filler)
    with Repository.open(path, PASSWORD) as repo:
        assert repo.check(read_data=True).ok


def test_export_and_dump_onto_a_full_disk(tmpfs, tmp_path):
    """The output, not the repository, runs out of space (an export file, standard output): one line,
    exit 14, no partial export left."""
    path = str(tmp_path / "repo")
    crashkit.init_repo(path)
    big = tmp_path / "big"
    big.mkdir()
    (big / "r").write_bytes(os.urandom(12 << 20))
    crashkit.run_cli("backup", "-r", path, str(big))
    (tmp_path / "pw").write_text("export password\n")
    export = ["export", "-r", path, "latest", "--export-password-file", str(tmp_path / "pw"), "--kdf-time", "0",
              "--output"]
    err = crashkit.run_cli(*export, os.path.join(tmpfs, "x.backup"), ok=(14,)).stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "no space left" in err and "x.backup" in err, err
    assert os.listdir(tmpfs) == []
    subprocess.run(["mount", "-o", "remount,ro", tmpfs], check=True)
    err = crashkit.run_cli(*export, os.path.join(tmpfs, "x.backup"), ok=(14,)).stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err and tmpfs in err, err
    for command in (["dump", "latest", "/r"], ["snapshots", "--json"], ["ls", "latest"]):
        with open("/dev/full", "wb") as full:
            proc = subprocess.run(crashkit.cli_argv(command[0], "-r", path, *command[1:]), env=crashkit.cli_env(),
                                  stdout=full, stderr=subprocess.PIPE, timeout=300)
        err = proc.stderr.decode().strip()
        assert proc.returncode == 14 and len(err.splitlines()) == 1, err
        assert err.startswith("chunkvault: no space left on device while writing to standard output"), err


def test_full_restore_target(tmpfs, tmp_path):
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    big = tmp_path / "big"
    big.mkdir()
    for i in range(12):
        (big / f"r{i:02d}").write_bytes(os.urandom(1 << 20))
    with Repository.open(path, PASSWORD) as repo:
        repo.backup([str(big)])
    proc = crashkit.run_cli("restore", "-r", path, "latest", "--target", os.path.join(tmpfs, "out"), ok=(14,))
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "no space" in err and "restore target" in err, err
    shutil.rmtree(os.path.join(tmpfs, "out"))
    with Repository.open(path, PASSWORD) as repo:
        with pytest.raises(StorageFull) as info:
            repo.restore("latest", os.path.join(tmpfs, "out2"))
        assert "r0" in str(info.value)  # names the file it was writing
        assert repo.check(read_data=True).ok
        repo.restore("latest", str(tmp_path / "fine"))
    assert describe(tmp_path / "fine") == describe(big)


# --- concurrency ---------------------------------------------------------------------------


def test_two_backups_and_a_prune_at_once(tmp_path):
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    rng = random.Random(8)
    trees = [crashkit.SourceTree(str(tmp_path / f"src{i}"), random.Random(20 + i), target_bytes=1 << 20)
             for i in range(2)]
    env = crashkit.cli_env()
    written: dict[str, dict] = {}
    prune_outcomes = {"finished": 0, "locked": 0}
    for round_no in range(4):
        for t in trees:
            t.mutate()
        states = [t.state() for t in trees]
        procs = []
        order = rng.sample(range(3), 3)
        for who in order:
            argv = (crashkit.cli_argv("prune", "-r", path, "--max-unused", "0", "-q") if who == 2
                    else crashkit.cli_argv("backup", "-r", path, trees[who].root, "--json", "-q"))
            procs.append((who, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
            time.sleep(rng.uniform(0, 0.15))
        for who, p in procs:
            out, err = p.communicate(timeout=300)
            if who == 2:
                assert p.returncode in (0, 15), err.decode()
                if p.returncode == 15:
                    assert len(err.decode().strip().splitlines()) == 1 and "locked" in err.decode()
                prune_outcomes["finished" if p.returncode == 0 else "locked"] += 1
            else:
                assert p.returncode == 0, err.decode()
                written[json.loads(out)["id"]] = states[who]
        with Repository.open(path, PASSWORD) as repo:  # forget the oldest so prune has work next round
            snaps = repo.snapshots()
            if len(snaps) > 4:
                old = snaps[0].id
                repo.forget([old])
                written.pop(old)
    print(f"concurrency: {len(written)} snapshots kept and verified, prune {prune_outcomes}")
    crashkit.check_clean(path, crashkit.Figures("concurrency"), read_data=True)
    crashkit.verify_restores(path, written, str(tmp_path), crashkit.Figures("concurrency"))


def test_once_an_upload_failed_for_good_the_packs_queued_behind_it_are_not_tried(tmp_path):
    """Each would spend its whole retry time first: with small packs a backup took 5-10 minutes to fail."""
    path = str(tmp_path / "repo")
    Repository.init(path, PASSWORD, kdf_seconds=0, pack_size=64 * 1024, chunker={
        "min_size": 4096, "avg_size": 16384, "max_size": 65536}).close()
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 << 20))  # about 128 packs
    faulty, remote = flaky(path, 3)
    faulty.fail_after = 6  # the lock, then a few packs: then down for good
    repo = Repository.open(remote, PASSWORD)
    with pytest.raises(RemoteUnavailable):
        repo.backup([str(src)])
    # the retries of the uploads already running when the first gave up, not of every pack queued
    assert faulty.calls["put"] < 10 * 12, faulty.calls


@pytest.mark.parametrize("gone", ["data/", "config", "keys/", "snapshots/"])
def test_a_remote_gone_during_check_read_data_is_a_remote_failure_not_damage(tmp_path, gone):
    """Objects the remote stopped delivering are not damaged objects: the check stops with the remote's
    error (exit 14) at once, instead of listing each as a problem (exit 18), after retrying each blob."""
    path = str(tmp_path / "repo")
    faulty, remote = flaky(path, 5)
    tree = crashkit.SourceTree(str(tmp_path / "src"), random.Random(5), target_bytes=2 << 20)
    with Repository.init(remote, PASSWORD, kdf_seconds=0, chunker=SMALL, pack_size=64 << 10) as repo:
        repo.backup([tree.root])
        tree.mutate()
        repo.backup([tree.root])
        real_get, data_gets = faulty.get, []

        def get(key, *args, **kwargs):  # the packs stop coming; everything else still answers
            if key.startswith(gone):
                data_gets.append(key)
                raise RemoteUnavailable("connection reset")
            return real_get(key, *args, **kwargs)

        faulty.get = get
        with pytest.raises(RemoteUnavailable):
            repo.check(read_data=True)
        assert len(data_gets) <= 10 * 8  # a retry cycle (10 attempts) per pack worker at most, not one per blob
        faulty.get = real_get
        assert repo.check(read_data=True).ok


_NO_THREADS = r"""
import json, os, sys
from concurrent.futures import Future, ThreadPoolExecutor
import chunkvault.store.backup as B
from chunkvault import Repository


class NoThreads(ThreadPoolExecutor):
    '''A pool under the process limit: its first batches are queued but no thread ever runs them; then
    starting one fails, as ``submit`` does when the kernel refuses a thread (RuntimeError).'''

    def __init__(self):
        super().__init__(1)
        self.queued = []

    def submit(self, fn, *args, **kwargs):
        if len(self.queued) >= 5:
            raise RuntimeError("can't start new thread")
        self.queued.append(Future())
        return self.queued[-1]

    def shutdown(self, wait=True, *, cancel_futures=False):
        for f in self.queued:
            f.cancel()
        super().shutdown(wait)


init = B.Backup.__init__


def no_threads(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self._pool.shutdown()
    self._pool = NoThreads()


B.Backup.__init__ = no_threads
with Repository.open(sys.argv[1], sys.argv[2], ledger=False) as repo:
    try:
        repo.backup([sys.argv[3]])
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


def test_a_backup_whose_compression_threads_cannot_start_fails_instead_of_hanging(tmp_path):
    """Under the process limit (``ulimit -u``, a unit's TasksMax=) the compression pool queued batches no
    thread ran, then failed to start one: their slots were never given back, a reader waited for one for
    ever, and the backup hung at its end (SIGTERM too) instead of failing."""
    path, src = str(tmp_path / "repo"), tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"f{i}").write_bytes(os.urandom(400_000))
    Repository.init(path, PASSWORD, kdf_seconds=0).close()
    proc = subprocess.run([sys.executable, "-c", _NO_THREADS, path, PASSWORD, str(src)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["message"] == "can't start new thread"
    with Repository.open(path, PASSWORD, ledger=False) as repo:
        assert repo.snapshots() == [] and repo.check(read_data=True).ok
