"""Lock staleness: a killed holder never wedges the repository, and a reused pid does not revive its lock."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest

from chunkvault.errors import Locked, RemoteError, RemoteUnavailable
from chunkvault.remotes.local import LocalRemote
from chunkvault.store.locks import EXCLUSIVE, SHARED, RepoLock, boot_id, list_locks, pid_namespace, process_start
from faults import FailingWrite, FaultyRemote

needs_proc = pytest.mark.skipif(boot_id() is None or process_start(os.getpid()) is None,
                                reason="no /proc boot id and process start times here")


@pytest.fixture
def remote(tmp_path):
    return LocalRemote(str(tmp_path / "repo"))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def plant(remote: LocalRemote, name: str, pid: int, **extra: object) -> str:
    """A lock object as its holder wrote it; one dated in the past was last written then, by the storage's
    clock too (its file's mtime), and one dated ahead was written now by a host whose clock runs ahead."""
    body = {"kind": EXCLUSIVE, "host": socket.gethostname(), "pid": pid, "purpose": "prune", "time": time.time(),
            **extra}
    remote.put(f"locks/{name}", json.dumps(body).encode())
    written = min(float(body["time"]), time.time())  # type: ignore[arg-type]
    os.utime(os.path.join(remote.root, "locks", name), (written, written))
    return f"locks/{name}"


class Undated(LocalRemote):
    """A remote whose listing dates nothing (a service older than dates): locks go by the hosts' clocks."""

    def list(self, prefix: str = ""):
        return (dataclasses.replace(o, modified=None) for o in super().list(prefix))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@needs_proc
def test_a_lock_of_a_live_process_holds(remote, sleeper):
    plant(remote, "a" * 32, sleeper.pid, boot=boot_id(), start=process_start(sleeper.pid))
    with pytest.raises(Locked, match=f"pid {sleeper.pid}"):
        RepoLock(remote, SHARED, "backup").acquire()
    assert len(list_locks(remote)) == 1


@needs_proc
def test_a_reused_pid_does_not_revive_a_dead_holders_lock(remote, sleeper):
    # The lock names the sleeper's pid, but a process that started at another moment: the holder
    # was killed and the pid now belongs to someone else.
    key = plant(remote, "b" * 32, sleeper.pid, boot=boot_id(), start=process_start(sleeper.pid) - 1)
    with RepoLock(remote, SHARED, "backup"):
        pass
    assert remote.stat(key) is None  # removed, not just ignored


@needs_proc
def test_a_lock_of_a_killed_process_its_parent_has_yet_to_reap_is_stale(remote):
    """A killed command is a zombie until its parent waits for it (a job runner busy with another command, a
    container's init that reaps nothing): its pid and start time are still there, but it holds nothing.
    Taken for live, its lock refused a prune ("locked by backup ... try again later") and held a backup off
    until it went stale by age, five minutes later."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start(holder.pid)
        key = plant(remote, "9" * 32, holder.pid, boot=boot_id(), start=start)
        holder.kill()
        deadline = time.monotonic() + 10
        while process_start(holder.pid, running=True) is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # killed, not reaped: a zombie
        assert process_start(holder.pid) == start
        with RepoLock(remote, EXCLUSIVE, "prune"):
            assert remote.stat(key) is None
    finally:
        holder.wait()


def test_a_lock_of_a_process_that_is_gone_is_removed(remote):
    key = plant(remote, "c" * 32, dead_pid(), boot=boot_id(), start=12345)
    old = plant(remote, "d" * 32, dead_pid())  # written before locks carried boot and start
    with RepoLock(remote, EXCLUSIVE, "prune") as lock:
        assert [lk.key for lk in list_locks(remote)] == [lock.key]
    assert remote.stat(key) is None and remote.stat(old) is None


@needs_proc
def test_a_lock_from_another_boot_is_judged_by_its_age_only(remote, sleeper):
    plant(remote, "e" * 32, sleeper.pid, boot="another-boot", start=1)
    with pytest.raises(Locked):
        RepoLock(remote, SHARED, "backup").acquire()
    plant(remote, "e" * 32, sleeper.pid, boot="another-boot", start=1, time=time.time() - 3600)
    with RepoLock(remote, SHARED, "backup"):
        pass


@needs_proc
def test_a_lock_from_another_pid_namespace_is_judged_by_its_age_only(remote):
    """A container sharing the host's name and boot: its backup's pid names no process here, or another one;
    taken for stale, its lock was removed and a prune deleted the packs the backup was writing."""
    if pid_namespace() is None:
        pytest.skip("no pid namespace in /proc here")
    gone = dead_pid()
    plant(remote, "f" * 32, gone, boot=boot_id(), start=12345, pidns="pid:[1]")
    with pytest.raises(Locked, match=f"pid {gone}"):
        RepoLock(remote, EXCLUSIVE, "prune").acquire()
    key = plant(remote, "f" * 32, gone, boot=boot_id(), start=12345, pidns=pid_namespace())
    with RepoLock(remote, EXCLUSIVE, "prune"):  # the same namespace: the pid says the holder is gone
        assert remote.stat(key) is None


def test_a_refresh_does_not_write_back_a_lock_another_command_removed(remote):
    from chunkvault.errors import LockLost

    with RepoLock(remote, SHARED, "backup") as lock:
        assert lock.refresh()
        remote.delete(lock.key)
        assert not lock.refresh()
        assert remote.stat(lock.key) is None
        with pytest.raises(LockLost, match="removed or replaced by another command"):
            lock.ensure_held()


def test_a_lock_another_client_replaced_with_one_marked_released_is_lost_not_held(remote):
    """An append-only client may write locks; one marked released is stale to every command, so a prune
    would go on while this backup still relied on its lock, which it only looked for by name."""
    from chunkvault.errors import LockLost
    from chunkvault.store.locks import _lock_body

    with RepoLock(remote, SHARED, "backup") as lock:
        lock.confirm()
        assert lock.refresh()  # written again by itself: still its own
        lock.confirm()
        remote.put(lock.key, _lock_body(SHARED, "backup", released=True))
        assert [lk.stale(time.time()) for lk in list_locks(remote)] == [True]
        with pytest.raises(LockLost, match="removed or replaced by another command"):
            lock.confirm()
        assert not lock.refresh()  # not written back over it: the loss stays found


class CutShort(FaultyRemote):
    """Reads of lock objects cut short, the first ``times`` of them."""

    def __init__(self, inner, times):
        super().__init__(inner, seed=0)
        self.times = times

    def get(self, key, start=None, length=None):
        data = super().get(key, start, length)
        if key.startswith("locks/") and self.times > 0:
            self.times -= 1
            return data[:len(data) // 2]
        return data


@pytest.mark.parametrize("times", [1, 2])
def test_a_lock_read_back_cut_short_is_no_other_commands_replacement(remote, times):
    """A read of the lock cut short was taken for another command's replacement: LockLost, "removed or
    replaced by another command", and the command stopped.  It is read once more; cut short again, it is the
    storage's failure, and the lock is removed at the end (it was left to go stale, as where the storage does
    not answer)."""
    cut = CutShort(remote, 0)
    with RepoLock(cut, SHARED, "backup") as lock:
        cut.times = times
        if times == 1:
            lock.confirm()
            assert lock.refresh()
        else:
            with pytest.raises(RemoteError, match="read back cut short"):
                lock.confirm()
    assert list_locks(remote) == []  # the storage answered: removed at the end, not left to go stale


def test_a_command_the_remote_stopped_answering_leaves_its_lock_to_go_stale(remote):
    """Removing it would retry for another whole window (11 minutes against a frozen service); a later
    command on this host removes it at once, its process being gone."""
    from chunkvault.errors import RemoteUnavailable

    with pytest.raises(RemoteUnavailable):
        with RepoLock(remote, SHARED, "backup") as lock:
            raise RemoteUnavailable("no answer")
    assert [lk.key for lk in list_locks(remote)] == [lock.key]
    with pytest.raises(ValueError):
        with RepoLock(remote, SHARED, "backup") as other:
            raise ValueError("any other failure")
    assert remote.stat(other.key) is None


def test_locks_name_their_process(remote):
    with RepoLock(remote, SHARED, "backup") as lock:
        (info,) = list_locks(remote)
        assert info.key == lock.key and info.pid == os.getpid()
        assert info.boot == boot_id() and info.start == process_start(os.getpid())
        assert info.pidns == pid_namespace()
        assert not info.stale(time.time())


@pytest.mark.parametrize("op, after", [("put", True), ("list", False)])
def test_a_lock_that_could_not_be_taken_is_not_left_behind(remote, op, after):
    """A write whose reply was lost landed, or the listing after it failed: the lock is removed on the way
    out, not left to hold off other hosts' commands until it goes stale."""
    faulty = FaultyRemote(remote, seed=0)
    faulty.inject(op, 1, after=after)
    with pytest.raises(RemoteUnavailable):
        RepoLock(faulty, EXCLUSIVE, "prune").acquire()
    assert list_locks(remote) == []
    with RepoLock(faulty, EXCLUSIVE, "prune"):  # and the next one is taken
        assert len(list_locks(remote)) == 1


def test_where_the_listing_dates_nothing_a_lock_dated_far_ahead_is_stale(tmp_path, monkeypatch):
    """A clock far ahead, or a lock object written by hand: otherwise it would hold every command off forever."""
    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.store import locks

    monkeypatch.setattr(locks, "_skew_told", set())
    remote = Undated(str(tmp_path / "repo"))
    body = {"kind": EXCLUSIVE, "host": "elsewhere", "pid": 1, "purpose": "prune", "time": time.time() + 3600}
    remote.put("locks/" + "f" * 32, json.dumps(body).encode())
    with pytest.warns(RepositoryStateWarning, match="a lock of elsewhere is dated 3[56].. s ahead"):
        with RepoLock(remote, SHARED, "backup"):
            pass
    assert remote.stat("locks/" + "f" * 32) is None


class _Clock:
    """time.time() of the lock module, moved on at will (a process paused, then continued)."""

    def __init__(self, monkeypatch):
        from chunkvault.store import locks

        self.offset = 0.0
        monkeypatch.setattr(locks.time, "time", lambda: time.monotonic() + 1.7e9 + self.offset)


@pytest.mark.parametrize("refreshed_after", [False, True])
def test_a_lock_not_refreshed_for_longer_than_others_trust_it_is_lost_for_good(remote, monkeypatch, refreshed_after):
    from chunkvault.errors import LockLost
    from chunkvault.store.locks import LOST_AFTER

    clock = _Clock(monkeypatch)
    with RepoLock(remote, SHARED, "backup") as lock:
        lock.ensure_held()
        clock.offset += LOST_AFTER / 2
        lock._write()  # a refresh in time
        clock.offset += LOST_AFTER / 2
        lock.ensure_held()
        clock.offset += LOST_AFTER + 1  # paused past what other commands wait before taking it for stale
        if refreshed_after:
            lock._write()  # the refresh thread woke first and wrote it again: that undoes nothing
        with pytest.raises(LockLost, match=f"went {LOST_AFTER * 1.5 + 1:.0f} s without a refresh .* run the backup"):
            lock.ensure_held()  # the gap that lost it, not the one since the refresh that came after


def test_a_lock_another_command_removed_is_lost(remote):
    from chunkvault.errors import LockLost

    with RepoLock(remote, EXCLUSIVE, "prune") as lock:
        lock.ensure_held()
        remote.delete(lock.key)
        lock._looked = 0.0  # as a second after the last look
        with pytest.raises(LockLost, match="removed or replaced by another command"):
            lock.ensure_held()
        with pytest.raises(LockLost):  # for good
            lock.ensure_held()


def _lose_the_lock_after(monkeypatch, owner, name: str, remote, paused: bool = True) -> None:
    """``owner.name`` runs, then the process is paused past the lock's staleness and every lock is removed,
    as another command does on finding one stale (not ``paused``: at once, as another host whose clock runs
    minutes ahead removes a fresh one)."""
    from chunkvault.store.locks import STALE_AFTER

    real = getattr(owner, name)
    clock = _Clock(monkeypatch)

    def then_lose_it(*args, **kwargs):
        out = real(*args, **kwargs)
        clock.offset += (STALE_AFTER + 10) * paused
        for lk in list_locks(remote):
            remote.delete(lk.key)
        return out

    monkeypatch.setattr(owner, name, then_lose_it)


def test_a_backup_whose_lock_was_taken_for_stale_saves_no_snapshot(tmp_path, new_repo, monkeypatch):
    """Meanwhile a prune may have deleted what it deduplicated against: its snapshot would name lost data."""
    from chunkvault.errors import LockLost
    from chunkvault.store import backup

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    repo = new_repo(pack_size=1)  # a pack per blob: the backup's packs are stored before its end
    first = repo.backup([str(src)]).snapshot
    (src / "g").write_bytes(os.urandom(100_000))
    _lose_the_lock_after(monkeypatch, backup.Backup, "_drain", repo.store.remote)
    indexes = sorted(o.key for o in repo.store.remote.list("index/"))
    with pytest.raises(LockLost):
        repo.backup([str(src)])
    monkeypatch.undo()
    assert [s.id for s in repo.snapshots()] == [first.id]
    # nor an index of its packs: a prune may have deleted them as unindexed, and later backups would dedup
    # against them
    assert sorted(o.key for o in repo.store.remote.list("index/")) == indexes
    assert list_locks(repo.store.remote) == []
    again = repo.backup([str(src)])
    assert repo.check(read_data=True).ok and again.snapshot.parent == first.id


def test_a_prune_whose_lock_was_taken_for_stale_deletes_nothing(tmp_path, new_repo, monkeypatch):
    """Meanwhile a backup may have started and deduplicated against what the plan deletes."""
    from chunkvault.errors import LockLost
    from chunkvault.store import prune

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    (src / "f").write_bytes(os.urandom(100_000))
    repo.backup([str(src)])
    repo.forget([first.id])
    _lose_the_lock_after(monkeypatch, prune, "plan_prune", repo.store.remote)
    packs = sorted(o.key for o in repo.store.remote.list("data/"))
    with pytest.raises(LockLost):
        repo.prune(max_unused=0)
    assert sorted(o.key for o in repo.store.remote.list("data/")) == packs
    monkeypatch.undo()
    assert repo.prune(max_unused=0).delete
    assert repo.check(read_data=True).ok


@pytest.mark.parametrize("command, holder", [("backup", {"kind": EXCLUSIVE, "purpose": "prune"}),
                                             ("tag", {"kind": SHARED, "purpose": "mount"})])
def test_a_command_waiting_for_a_lock_says_whom_it_waits_for(tmp_path, new_repo, sleeper, command, holder):
    """As the reads do: a backup behind a prune, or a tag behind a mount, is not silent for up to an hour."""
    from conftest import PASSWORD

    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo.backup([str(src)])
    repo.close()
    remote = LocalRemote(str(tmp_path / "repo0"))
    key = plant(remote, "a" * 32, sleeper.pid, boot=boot_id(), start=process_start(sleeper.pid), **holder)
    args = [str(src)] if command == "backup" else ["latest", "--add", "t"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}, "CHUNKVAULT_PASSWORD": PASSWORD}
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", command, "-r", str(tmp_path / "repo0"), *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        line = proc.stderr.readline().decode() if ready else ""
        assert (f"waiting up to 3600 s: repository is locked by {holder['purpose']}" in line
                and f"pid {sleeper.pid}" in line), line
        remote.delete(key)
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_command_waiting_for_another_hosts_lock_says_when_it_goes_stale_and_how_to_remove_it(tmp_path, new_repo):
    """A prune killed on another host holds a backup here off until its lock goes stale: "waiting up to 3600 s"
    alone left the user to guess whether it would ever end, and how to end it, as a refusal tells."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    key = plant(repo.store.remote, "a" * 32, 4242, host="another-host", boot="another-boot", start=1,
                time=time.time() - 296)
    with pytest.warns(Warning, match=r"waiting up to 60 s: repository is locked by prune on another-host \(pid 4242.*"
                                     r"goes stale 5 minutes after its last refresh \(in \d+ s\) and this command goes "
                                     r"on, or `chunkvault unlock --remove-all`"):
        repo.backup([str(src)], wait=60)
    assert repo.store.remote.stat(key) is None


def test_a_forget_whose_lock_was_taken_for_stale_deletes_no_snapshot(tmp_path, new_repo, monkeypatch):
    """Meanwhile a backup may have started on the snapshot about to go: its differential would lose its parent."""
    from chunkvault.errors import LockLost
    from chunkvault.store import lifecycle

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    ids = []
    for i in range(3):
        (src / "f").write_bytes(os.urandom(10_000))
        ids.append(repo.backup([str(src)]).snapshot.id)
    _lose_the_lock_after(monkeypatch, lifecycle, "rebase", repo.store.remote)
    with pytest.raises(LockLost):
        repo.forget([ids[0]])
    monkeypatch.undo()
    assert sorted(s.id for s in repo.snapshots()) == sorted(ids)
    assert repo.check(read_data=True).ok
    repo.forget([ids[0]])
    assert sorted(s.id for s in repo.snapshots()) == sorted(ids[1:]) and repo.check(read_data=True).ok


@pytest.mark.parametrize("body", [b"null", b"[]", b'"text"', b'{"kind": "exclusive", "host": "x", "pid": 1, "time": NaN}',
                                  b'{"kind": "exclusive", "host": "x", "pid": 1, "time": Infinity}',
                                  b'{"kind": "exclusive", "host": "x", "pid": 99999999999, "time": 1e9}',
                                  b'{"kind": "exclusive", "host": "x", "pid": -4, "time": 1e9}'])
def test_a_lock_object_that_is_no_lock_blocks_nothing_and_breaks_nothing(remote, body):
    remote.put("locks/" + "9" * 32, body)
    assert list_locks(remote) == []
    with RepoLock(remote, EXCLUSIVE, "prune"):
        pass


def test_a_prune_paused_between_two_deletions_deletes_nothing_more(tmp_path, new_repo, monkeypatch):
    """A pause may fall anywhere in the deletions: each one checks the lock."""
    from chunkvault.errors import LockLost
    from chunkvault.store import locks

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(pack_size=1)
    ids = []
    for i in range(3):
        (src / "f").write_bytes(os.urandom(50_000))
        ids.append(repo.backup([str(src)]).snapshot.id)
    repo.forget(ids[:2])
    remote = repo.store.remote
    real_delete = remote.delete
    deleted: list[str] = []
    clock = _Clock(monkeypatch)

    def delete_then_pause(key):
        real_delete(key)
        if not key.startswith("locks/") and "0" * 64 not in key:  # not the lock, nor a probe of the permission
            deleted.append(key)
            clock.offset += locks.STALE_AFTER + 10  # stopped (SIGSTOP, a suspend) right after the first one

    monkeypatch.setattr(remote, "delete", delete_then_pause)
    with pytest.raises(LockLost, match="went 3.. s without a refresh"):
        repo.prune(max_unused=0)
    assert len(deleted) == 1


@pytest.mark.parametrize("paused", [True, False])
def test_a_backup_paused_while_it_saves_its_snapshot_takes_it_back(tmp_path, new_repo, monkeypatch, paused):
    """Not paused: the lock removed at once, however recently the backup last looked at it."""
    from chunkvault.errors import LockLost

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(10_000))
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    (src / "g").write_bytes(os.urandom(10_000))
    _lose_the_lock_after(monkeypatch, repo.store, "save_snapshot", repo.store.remote, paused)
    with pytest.raises(LockLost):
        repo.backup([str(src)])
    monkeypatch.undo()
    assert [o.key for o in repo.store.remote.list("snapshots/")] == [f"snapshots/{first.id}"]
    assert repo.backup([str(src)]).snapshot.parent == first.id


def _damage_one_file(repo, src) -> None:
    """Delete the pack holding ``src/b``'s data, so ``repair snapshots`` has a manifest to rewrite."""
    from chunkvault.store.prune import pack_key

    store = repo.store
    store.load_index()
    snap = store.load_snapshot(repo.snapshots()[-1].id)
    rec = next(r for r in store.manifest_records(snap) if r.path == b"b")
    store.remote.delete(pack_key(store.pack_ids[store.index.get(rec.entry.chunk_ids()[0]).pack_no]))


@pytest.mark.parametrize("command", ["aggregate", "forget", "rewrite", "repair snapshots"])
def test_a_command_paused_while_it_writes_a_manifest_indexes_nothing_and_rewrites_nothing(
        tmp_path, new_repo, monkeypatch, command):
    """A prune that took the lock for stale meanwhile may have deleted the new manifest's packs as unindexed:
    an index naming them, or a snapshot naming that manifest, would be data that is gone."""
    from chunkvault.errors import LockLost
    from chunkvault.store.manifest_io import ManifestWriter

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(pack_size=1)
    ids = []
    for i in range(3):
        (src / "a").write_bytes(os.urandom(10_000))
        (src / "b").write_bytes(os.urandom(10_000))
        ids.append(repo.backup([str(src)], kind="full" if i == 0 else "diff").snapshot.id)
    if command == "repair snapshots":
        _damage_one_file(repo, src)
    remote = repo.store.remote
    before = {o.key: remote.get(o.key) for prefix in ("index/", "snapshots/") for o in remote.list(prefix)}
    _lose_the_lock_after(monkeypatch, ManifestWriter, "finish", remote)
    run = {"aggregate": lambda: repo.aggregate(ids[2]),
           "forget": lambda: repo.forget([ids[1]]),
           "rewrite": lambda: repo.rewrite(["a"], dry_run=False),
           "repair snapshots": lambda: repo.repair_snapshots(dry_run=False)}[command]
    with pytest.raises(LockLost):
        run()
    monkeypatch.undo()
    assert {o.key: remote.get(o.key) for prefix in ("index/", "snapshots/") for o in remote.list(prefix)} == before
    run()
    assert command == "repair snapshots" or repo.check(read_data=True).ok


def test_each_thread_reading_holds_its_own_lock(tmp_path, new_repo):
    """One thread's read ending must not leave another's read unlocked: a prune could delete what it reads."""
    import threading

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo = new_repo()
    repo.backup([str(src)])
    remote = repo.store.remote
    inside, first_done, checked = threading.Event(), threading.Event(), []

    def long_read():
        with repo.reading("long"):
            inside.set()
            first_done.wait(30)
            checked.append([lk.purpose for lk in list_locks(remote)])

    t = threading.Thread(target=long_read)
    t.start()
    inside.wait(30)
    with repo.reading("short"):
        assert sorted(lk.purpose for lk in list_locks(remote)) == ["long", "short"]
    first_done.set()
    t.join()
    assert checked == [["long"]] and list_locks(remote) == []


def test_an_exclusive_command_inside_a_read_of_the_same_thread_fails_at_once(tmp_path, new_repo):
    """It would wait an hour for its own thread's lock."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    started = time.monotonic()
    with repo.reading("mine"):
        with pytest.raises(Locked, match=r"this thread holds the repository's shared lock \(mine\): this forget"):
            repo.forget([snap.id])
    assert time.monotonic() - started < 30
    assert [s.id for s in repo.snapshots()] == [snap.id]


def test_a_child_forked_while_a_lock_is_held_leaves_it_to_the_parent(remote):
    with RepoLock(remote, SHARED, "parent") as lock:
        pid = os.fork()
        if pid == 0:
            try:
                lock.release()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert [lk.key for lk in list_locks(remote)] == [lock.key]
    assert list_locks(remote) == []


def test_a_wait_for_a_lock_ends_at_once_when_told_to_stop(remote, sleeper):
    """A daemon's SIGTERM: its retention must not wait an hour behind a long restore."""
    from chunkvault.store import locks

    plant(remote, "b" * 32, sleeper.pid, boot=boot_id(), start=process_start(sleeper.pid))
    locks.stop_waiting.set()
    try:
        started = time.monotonic()
        with pytest.raises(Locked, match="stopped waiting"):
            RepoLock(remote, EXCLUSIVE, "forget", wait=3600).acquire()
        assert time.monotonic() - started < 30
    finally:
        locks.stop_waiting.clear()


def test_a_lock_of_a_kind_this_version_does_not_know_holds_off_everyone(tmp_path):
    """A newer chunkvault's kind of lock is taken as exclusive by every command (a shared one went ahead),
    until it goes stale as any lock does."""
    remote = LocalRemote(str(tmp_path))
    remote.put("locks/" + "ab" * 16, json.dumps({"kind": "migrate", "host": "elsewhere", "pid": 4242,
                                                 "purpose": "migrate", "time": time.time()}).encode())
    for kind in (SHARED, EXCLUSIVE):
        with pytest.raises(Locked, match="locked by migrate on elsewhere"):
            RepoLock(remote, kind, "backup").acquire()
    plant(remote, "ab" * 16, 4242, kind="migrate", host="elsewhere", purpose="migrate", time=time.time() - 400)
    with RepoLock(remote, SHARED, "backup"):
        pass


@needs_proc
def test_unlock_removes_the_stale_locks_and_tells_who_holds_the_others(remote, sleeper):
    from chunkvault.store.locks import remove_locks

    with RepoLock(remote, SHARED, "restore") as own:
        dead = plant(remote, "d" * 32, dead_pid())
        old = plant(remote, "e" * 32, 42, host="another-host", time=time.time() - 1000)
        live = plant(remote, "f" * 32, sleeper.pid, boot=boot_id(), start=process_start(sleeper.pid))
        elsewhere = plant(remote, "a" * 32, 42, host="another-host", kind=SHARED, purpose="backup")
        done = remove_locks(remote)
        assert sorted(lk.key for lk in done.removed) == sorted([dead, old])
        assert sorted(lk.key for lk in done.kept) == sorted([live, elsewhere, own.key])
        assert sorted(o.key for o in remote.list("locks/")) == sorted([live, elsewhere, own.key])
        doc = done.to_dict()
        assert {d["id"] for d in doc["kept"]} == {k.split("/")[1] for k in (live, elsewhere, own.key)}
        assert all(not d["stale"] for d in doc["kept"]) and all(d["stale"] for d in doc["removed"])
        everything = remove_locks(remote, remove_all=True)  # the live ones too, never this process's own
        assert sorted(lk.key for lk in everything.removed) == sorted([live, elsewhere])
        assert [lk.key for lk in everything.kept] == [own.key]
        assert [o.key for o in remote.list("locks/")] == [own.key]
        own.ensure_held()
    assert list_locks(remote) == []


def test_unlock_from_the_command_line(tmp_path, new_repo, cli):
    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    remote = repo.store.remote
    plant(remote, "e" * 32, 42, host="another-host", time=time.time() - 1000)
    plant(remote, "a" * 32, 43, host="another-host", kind=SHARED, purpose="backup")
    said = cli("unlock", "-r", r).stdout.decode().splitlines()
    assert re.match(r"removed exclusive lock of prune on another-host \(pid 42, refreshed 100[0-9] s ago", said[0])
    assert said[1].startswith("held: shared lock of backup on another-host (pid 43, refreshed ")
    assert said[2].startswith("1 lock(s) removed, 1 held; --remove-all removes live ones too")
    with pytest.raises(Locked, match="locked by backup on another-host"):
        repo.prune(wait=0)
    doc = json.loads(cli("unlock", "-r", r, "--remove-all", "--json").stdout)
    assert [(d["purpose"], d["pid"], d["stale"]) for d in doc["removed"]] == [("backup", 43, False)]
    assert doc["kept"] == [] and list_locks(remote) == []
    repo.prune()


def test_a_lock_of_another_host_refuses_saying_when_it_goes_stale_and_how_to_remove_it(tmp_path, new_repo, cli,
                                                                                        sleeper):
    """A command killed on another host leaves a lock this one cannot tell from a live one's; the refusal says
    how long until it goes stale and what removes it now, where "try again later" left that to guess."""
    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    plant(repo.store.remote, "e" * 32, 42, host="another-host", purpose="forget", time=time.time() - 100)
    refused = cli("prune", "-r", r, check=15).stderr.decode()
    assert re.search(r"locked by forget on another-host \(pid 42, refreshed \d+ s ago\); try again later or use "
                     r"--wait; if that command is dead .*goes stale 5 minutes after its last refresh \(in \d+ s\)"
                     r".*`chunkvault unlock --remove-all` \(API: `unlock\(remove_all=True\)`\) removes it now",
                     refused), refused
    cli("unlock", "-r", r, "--remove-all", "-q")
    if boot_id() is not None and process_start(sleeper.pid) is not None:  # a live command here: no such advice
        plant(repo.store.remote, "a" * 32, sleeper.pid, boot=boot_id(), start=process_start(sleeper.pid))
        refused = cli("prune", "-r", r, check=15).stderr.decode()
        assert "try again later or use --wait" in refused and "stale" not in refused


def test_ensure_held_asks_the_remote_at_most_every_second_unless_told_to(remote, monkeypatch):
    from chunkvault.store import locks

    with RepoLock(remote, EXCLUSIVE, "prune") as lock:
        asked = []
        real = remote.get
        monkeypatch.setattr(remote, "get", lambda key, *a: asked.append(key) or real(key, *a))
        lock.ensure_held()
        lock._looked = time.time() + 5  # as just looked (and a slow machine takes no second to come back)
        lock.ensure_held()
        assert len(asked) == 1  # a prune calls it before every deletion: one look serves a second of them
        lock.confirm()
        lock.confirm()
        assert len(asked) == 3
        monkeypatch.setattr(locks, "ASK_EVERY", 0.0)
        before = len(asked)
        lock.ensure_held()
        assert len(asked) == before + 1


def test_a_lock_of_a_host_whose_clock_runs_ahead_is_warned_of_once(remote, monkeypatch):
    import warnings

    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.store import locks

    monkeypatch.setattr(locks, "_skew_told", set())
    remote = Undated(remote.root)  # with dates, the hosts' clocks decide nothing (the test below)
    plant(remote, "a" * 32, 42, host="fast-host", kind=SHARED, purpose="backup", time=time.time() + 200)
    plant(remote, "b" * 32, 43, host="fast-host", kind=SHARED, purpose="backup", time=time.time() + 200)
    plant(remote, "c" * 32, 44, host="steady-host", kind=SHARED, purpose="backup", time=time.time() + 5)
    with pytest.warns(RepositoryStateWarning, match="a lock of fast-host is dated 2.. s ahead") as told:
        found = list_locks(remote)
    assert all(re.fullmatch(r"backup on fast-host \(pid 4[23], dated (199|200) s ahead\)", lk.describe())
               for lk in found if lk.host == "fast-host")
    assert len([w for w in told if "ahead" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list_locks(remote)  # once per host
    old = plant(remote, "d" * 32, 45, host="slow-host", time=time.time() - 400)
    with pytest.warns(RepositoryStateWarning, match="removed the stale exclusive lock of prune on slow-host "
                                                    r"\(pid 45, refreshed 4.. s ago\): its command was killed"):
        with RepoLock(remote, SHARED, "backup"):
            pass
    assert remote.stat(old) is None


def test_locks_are_aged_by_the_storages_clock_not_their_hosts(remote, monkeypatch):
    """A host whose clock runs an hour ahead or behind holds its lock as long as it refreshes it (by the hosts'
    clocks one of the two took the other's fresh lock for stale, and its prune deleted what the other's
    backup used); a lock that names a fresh time but was last written long ago is stale."""
    import warnings

    from chunkvault.store import locks

    monkeypatch.setattr(locks, "_skew_told", set())
    for offset in (3600, -3600):
        written = plant(remote, "a" * 32, 42, host="skewed-host", time=time.time() + offset)
        os.utime(os.path.join(remote.root, written), None)  # written just now, by a clock that is off
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no skew warning either: the hosts' clocks decide nothing
            with pytest.raises(Locked, match=r"locked by prune on skewed-host \(pid 42, refreshed [01] s ago\)"):
                RepoLock(remote, SHARED, "backup").acquire()
            assert [lk.key for lk in locks.remove_locks(remote).kept] == [written]
    frozen = plant(remote, "a" * 32, 42, host="frozen-host")
    old = time.time() - locks.STALE_AFTER - 30
    os.utime(os.path.join(remote.root, frozen), (old, old))
    assert "refreshed 33" in locks.remove_locks(remote).removed[0].describe()
    plant(remote, "b" * 32, 43, host="frozen-host")
    os.utime(os.path.join(remote.root, "locks", "b" * 32), (old, old))
    with RepoLock(remote, SHARED, "backup"):
        assert [lk.host for lk in list_locks(remote)] == [socket.gethostname()]


def test_unlock_where_the_remote_refuses_its_own_lock_goes_by_the_hosts_clocks(remote):
    """A read-only remote takes no lock of unlock's own to date the others by: the times inside them do."""
    from chunkvault.errors import PermissionDenied
    from chunkvault.store.locks import remove_locks

    class ReadOnly(LocalRemote):
        def put(self, key, data, *, if_absent=False):
            raise PermissionDenied("read-only")

    old = plant(remote, "e" * 32, 42, host="another-host", time=time.time() - 1000)
    os.utime(os.path.join(remote.root, old), None)
    live = plant(remote, "a" * 32, 43, host="another-host", kind=SHARED, purpose="backup")
    done = remove_locks(ReadOnly(remote.root))
    assert [lk.key for lk in done.removed] == [old] and [lk.key for lk in done.kept] == [live]
    assert done.removed[0].stored_ago is None and "refreshed 1000 s ago" in done.removed[0].describe()


@pytest.mark.parametrize("command", ["copy", "import"])
def test_a_copy_or_import_whose_lock_is_removed_while_it_saves_its_snapshot_takes_it_back(tmp_path, new_repo,
                                                                                         monkeypatch, command):
    """As a backup does: a prune on a host that took the lock for stale may delete what it reuses."""
    from chunkvault.errors import LockLost

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(10_000))
    source_repo = new_repo(str(tmp_path / "from"))
    snap = source_repo.backup([str(src)]).snapshot
    target = new_repo(str(tmp_path / "to"))
    if command == "import":
        source_repo.export(snap, str(tmp_path / "s.backup"), "export pw", kdf_seconds=0)
    _lose_the_lock_after(monkeypatch, target.store, "save_snapshot", target.store.remote, paused=False)
    with pytest.raises(LockLost):
        if command == "copy":
            source_repo.copy_to(target)
        else:
            target.import_backup(str(tmp_path / "s.backup"), "export pw")
    monkeypatch.undo()
    assert target.snapshots() == []


@pytest.mark.parametrize("after", [False, True])
def test_a_lock_left_in_an_outage_does_not_hold_off_the_next_command_of_its_own_process(tmp_path, after):
    """A backup that failed with the storage out of reach leaves its lock to go stale (removing it would wait
    out another retry window); once the storage answers again, the same process's prune and forget are not
    refused for five minutes by that lock, which is its own and guards nothing."""
    from chunkvault import Repository

    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(200_000))
    path = str(tmp_path / "repo")
    with Repository.init(path, "pw", kdf_seconds=0, ledger=False) as repo:
        first = repo.backup([str(src)]).snapshot
    (src / "b").write_bytes(os.urandom(200_000))
    failing = FailingWrite(LocalRemote(path), at=1, error=lambda: RemoteUnavailable("storage out of reach"),
                           prefixes=("data/",), landed=after)  # the new data's pack
    with Repository.open(failing, "pw", ledger=False) as repo:
        with pytest.raises(RemoteUnavailable):
            repo.backup([str(src)])
        assert [lk.purpose for lk in list_locks(failing.inner)] == ["backup"]  # left, as after an outage
        if after:  # `unlock` removes it as the stale locks, which any command removes
            assert [lk.purpose for lk in repo.unlock().removed] == ["backup"]
        repo.prune(wait=0)
        repo.forget([first.id], wait=0)
        assert list_locks(failing.inner) == []


def test_a_refresh_that_lands_after_its_lock_was_left_does_not_bring_the_lock_back(tmp_path, monkeypatch):
    """A lock left to go stale (its remote stopped answering) is not waited for: a refresh's write still under
    way may land after the next command of this process removed it, and the lock written again by a live
    process held every other command off; one that lands late is removed again."""
    import threading

    from chunkvault.store import locks

    class Frozen(LocalRemote):
        """Writes of a lock hang while ``frozen`` is set (a server that stopped answering, then came back)."""

        frozen = threading.Event()
        entered = threading.Event()
        thawed = threading.Event()

        def put(self, key, data, *args, **kwargs):
            if key.startswith("locks/") and self.frozen.is_set():
                self.entered.set()
                self.thawed.wait(30)
            return super().put(key, data, *args, **kwargs)

    monkeypatch.setattr(locks, "REFRESH_EVERY", 0.05)
    remote = Frozen(str(tmp_path / "repo"))
    lock = RepoLock(remote, EXCLUSIVE, "prune")
    lock.acquire()
    Frozen.frozen.set()
    assert Frozen.entered.wait(10)  # the refresh is writing the lock when the command gives up
    lock.release(remove=False)
    Frozen.frozen.clear()
    with RepoLock(remote, SHARED, "backup"):  # the next command here removes the lock left behind
        pass
    Frozen.thawed.set()
    lock._thread.join(10)
    assert list_locks(remote) == []
    with RepoLock(remote, EXCLUSIVE, "prune", wait=0):
        pass


def test_the_locks_of_many_commands_are_read_several_at_once(remote):
    """A fleet's backups running together leave a shared lock each: a command taking a lock reads them all,
    and one after another that cost it a round trip apiece (1,100 locks: 78 s on S3 served on 127.0.0.1)."""
    import threading

    body = json.dumps({"kind": SHARED, "host": "elsewhere", "pid": 4242, "purpose": "backup",
                       "time": time.time()}).encode()
    for i in range(40):
        remote.put(f"locks/{i:032x}", body)
    lock = threading.Lock()
    reading = [0, 0]  # now, at most

    class Distant(FaultyRemote):
        def get(self, key, start=None, length=None):
            with lock:
                reading[0] += 1
                reading[1] = max(reading)
            time.sleep(0.05)  # a round trip
            with lock:
                reading[0] -= 1
            return self.inner.get(key, start, length)

    started = time.monotonic()
    with RepoLock(Distant(remote, seed=0), SHARED, "backup"):
        pass
    assert reading[1] > 1 and time.monotonic() - started < 40 * 0.05


class _LockReads(LocalRemote):
    """The most bytes a read of a lock object returned."""

    most = 0

    def get(self, key, start=None, length=None):
        data = super().get(key, start, length)
        if key.startswith("locks/"):
            _LockReads.most = max(_LockReads.most, len(data))
        return data


def test_a_lock_object_of_gigabytes_is_no_lock_and_not_read_whole(tmp_path):
    """Every command that locks reads every lock object, and an append-only client may store shared ones:
    one of gigabytes was read whole by each (a backup beside a 512 MiB one peaked at 700 MB).  None is read
    past the limit; such an object holds nothing off, and `cat lock` calls it no lock."""
    from chunkvault.errors import CorruptObject
    from chunkvault.store.locks import LOCK_OBJECT_LIMIT, read_lock

    remote = _LockReads(str(tmp_path / "repo"))
    os.makedirs(os.path.join(remote.root, "locks"))
    with open(os.path.join(remote.root, "locks", "planted"), "wb") as f:
        f.truncate(64 << 20)  # sparse: what matters is what is read of it
    with RepoLock(remote, EXCLUSIVE, "prune"):
        assert "locks/planted" not in [lock.key for lock in list_locks(remote)]
    with pytest.raises(CorruptObject, match="not a lock object"):
        read_lock(remote, "locks/planted")
    assert 0 < _LockReads.most <= LOCK_OBJECT_LIMIT + 1
