"""Reads hold a shared lock: prune, forget and the repairs never pull data from under a restore, a check or
a copy, and a read started while one of them runs waits for it and then sees what it left."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from chunkvault import Repository
from chunkvault.errors import Locked
from chunkvault.store import restore_workers
from chunkvault.store.locks import EXCLUSIVE, RepoLock, boot_id, list_locks, process_start
from servers_http import FULL_TOKEN, READ_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import describe

PW = "correct horse battery staple"


def _history(tmp_path, versions: int = 3) -> tuple[str, object, list]:
    """A repository with ``versions`` full snapshots of a changing tree, in small packs (prune repacks)."""
    src = tmp_path / "src"
    src.mkdir()
    path = str(tmp_path / "repo")
    snaps = []
    with Repository.init(path, PW, kdf_seconds=0, pack_size=64 << 10, ledger=False) as repo:
        for v in range(versions):
            for i in range(8):
                (src / f"f{i}").write_bytes(os.urandom(20_000) if i <= v else b"same %d" % i)
            snaps.append(repo.backup([str(src)], kind="full").snapshot)
    return path, src, snaps


def test_prune_refuses_while_a_restore_reads(tmp_path, monkeypatch):
    path, src, snaps = _history(tmp_path)
    real, reading, go = restore_workers.restore, threading.Event(), threading.Event()

    def paused(*args, **kwargs):
        reading.set()
        assert go.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(restore_workers, "restore", paused)
    done = {}

    def restore():
        with Repository.open(path, PW, ledger=False) as repo:
            done["result"] = repo.restore(snaps[-1].id, str(tmp_path / "out"))

    worker = threading.Thread(target=restore)
    worker.start()
    try:
        assert reading.wait(30)
        with Repository.open(path, PW, ledger=False) as other:
            with pytest.raises(Locked, match="locked by restore"):
                other.forget([s.id for s in snaps[:-1]], wait=0)
            with pytest.raises(Locked, match="locked by restore"):
                other.prune(max_unused=0)
    finally:
        go.set()
        worker.join(60)
    assert done["result"].files == 8
    assert describe(tmp_path / "out") == describe(src)
    with Repository.open(path, PW, ledger=False) as repo:
        assert list_locks(repo.store.remote) == []  # the restore removed its lock
        repo.forget([s.id for s in snaps[:-1]], wait=0)
        repo.prune(max_unused=0)
        assert repo.check(read_data=True).ok


def test_a_read_waits_for_a_prune_that_holds_the_repository(tmp_path):
    path, src, snaps = _history(tmp_path)
    done = {}
    with Repository.open(path, PW, ledger=False) as repo:
        with RepoLock(repo.store.remote, EXCLUSIVE, "prune"):
            worker = threading.Thread(
                target=lambda: done.setdefault("files", repo.restore(snaps[-1].id, str(tmp_path / "out")).files))
            worker.start()
            time.sleep(0.5)
            assert worker.is_alive() and not (tmp_path / "out").exists()
        worker.join(60)
    assert done["files"] == 8
    assert describe(tmp_path / "out") == describe(src)


def test_a_read_after_a_prune_follows_the_new_index(tmp_path):
    """Snapshots listed and the index loaded before another client forgot and pruned: the restore takes its
    lock, sees that the index objects changed, and reads the index (and the snapshots) again."""
    path, src, snaps = _history(tmp_path)
    reader = Repository.open(path, PW, ledger=False)
    assert len(reader.snapshots()) == 3
    assert len(reader.store.index) > 0
    with Repository.open(path, PW, ledger=False) as other:
        other.forget([s.id for s in snaps[:-1]])
        plan = other.prune(max_unused=0)
        assert plan.repack or plan.delete
    result = reader.restore("latest", str(tmp_path / "out"))
    reader.close()
    assert result.files == 8
    assert describe(tmp_path / "out") == describe(src)


@pytest.fixture
def exclusive_holder(tmp_path):
    """A live process whose exclusive lock is planted in a repository: ``plant(path)``."""
    if boot_id() is None:
        pytest.skip("no /proc boot id here")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def plant(path: str) -> None:
        body = {"kind": EXCLUSIVE, "host": socket.gethostname(), "pid": proc.pid, "purpose": "prune",
                "time": time.time(), "boot": boot_id(), "start": process_start(proc.pid)}
        os.makedirs(os.path.join(path, "locks"), exist_ok=True)
        with open(os.path.join(path, "locks", "e" * 32), "w") as f:
            json.dump(body, f)

    yield plant
    proc.kill()
    proc.wait()


def test_cli_read_refused_or_unlocked_while_a_prune_runs(tmp_path, cli, exclusive_holder):
    path, src, snaps = _history(tmp_path)
    exclusive_holder(path)
    refused = cli("restore", "-r", path, "latest", "-t", str(tmp_path / "out"), "--wait", "0", check=15)
    err = refused.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "locked by prune" in err and "--wait" in err, err
    assert not (tmp_path / "out").exists()
    cli("check", "-r", path, "--wait", "0", check=15)
    cli("restore", "-r", path, "latest", "-t", str(tmp_path / "out"), "--no-lock")
    assert describe(tmp_path / "out") == describe(src)
    assert len(os.listdir(os.path.join(path, "locks"))) == 1  # only the holder's: --no-lock wrote none


def test_cli_read_waits_and_says_for_whom(tmp_path):
    """The prune's lock is released only once the restore said it waits (a timer raced the command's
    start on a loaded machine)."""
    path, src, snaps = _history(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")} | {"CHUNKVAULT_PASSWORD": PW}
    with Repository.open(path, PW, ledger=False) as repo:
        with RepoLock(repo.store.remote, EXCLUSIVE, "prune"):
            proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "restore", "-r", path, "latest", "-t",
                                     str(tmp_path / "out"), "--wait", "60"], env=env, stderr=subprocess.PIPE)
            said = proc.stderr.readline().decode()
        assert proc.wait(120) == 0
    assert said.startswith("warning: waiting up to 60 s: repository is locked by prune"), said
    assert describe(tmp_path / "out") == describe(src)


def test_read_only_token_reads_without_a_lock(tmp_path, http_server, cli):  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    url = http_server.url
    full = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache-full")}
    read = {"CHUNKVAULT_HTTP_TOKEN": READ_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache-read")}
    cli("init", "-r", url, "--kdf-time", "0", env=full)
    cli("backup", "-r", url, str(src), env=full)
    warned = cli("restore", "-r", url, "latest", "-t", str(tmp_path / "a"), env=read).stderr.decode()
    assert "warning: reading without a lock" in warned and "--no-lock" in warned, warned
    assert describe(tmp_path / "a") == describe(src)
    quiet = cli("check", "-r", url, "--read-data", "--no-lock", env=read).stderr.decode()
    assert "warning" not in quiet, quiet
    assert not list((http_server.path / "locks").glob("*"))
