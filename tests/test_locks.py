"""Lock staleness: a killed holder never wedges the repository, and a reused pid does not revive its lock."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from chunkvault.errors import Locked, RemoteUnavailable
from chunkvault.remotes.local import LocalRemote
from chunkvault.store.locks import EXCLUSIVE, SHARED, RepoLock, boot_id, list_locks, process_start
from faults import FaultyRemote

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
    body = {"kind": EXCLUSIVE, "host": socket.gethostname(), "pid": pid, "purpose": "prune", "time": time.time(),
            **extra}
    remote.put(f"locks/{name}", json.dumps(body).encode())
    return f"locks/{name}"


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
    expired = {"kind": EXCLUSIVE, "host": socket.gethostname(), "pid": sleeper.pid, "purpose": "prune",
               "time": time.time() - 3600, "boot": "another-boot", "start": 1}
    remote.put("locks/" + "e" * 32, json.dumps(expired).encode())
    with RepoLock(remote, SHARED, "backup"):
        pass


def test_locks_name_their_process(remote):
    with RepoLock(remote, SHARED, "backup") as lock:
        (info,) = list_locks(remote)
        assert info.key == lock.key and info.pid == os.getpid()
        assert info.boot == boot_id() and info.start == process_start(os.getpid())
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
