"""Repository.stop: an operation running on another thread ends with Stopped, leaves what Ctrl-C leaves, and
the next operation runs as usual; a remote that stopped answering is retried no longer."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from chunkvault import Repository
from chunkvault.errors import Stopped
from conftest import PASSWORD
from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import describe


class EndlessStream:
    """A dump that never ends (a database too big to wait for), counting what was read."""

    def __init__(self) -> None:
        self.read_bytes = 0
        self.enough = threading.Event()  # 2 MiB read: the backup is under way

    def read(self, n: int = -1) -> bytes:
        n = 64 << 10 if n is None or n < 0 else min(n, 64 << 10)
        self.read_bytes += n
        if self.read_bytes >= 2 << 20:
            self.enough.set()
        return os.urandom(n)


def _in_thread(call) -> tuple[threading.Thread, list[BaseException | object]]:
    out: list[BaseException | object] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _endless_backup(repo: Repository) -> tuple[threading.Thread, list]:
    """A backup of an endless stream on another thread, under way (2 MiB read) when this returns."""
    stream = EndlessStream()
    started = _in_thread(lambda: repo.backup_stream(stream, "db.dump"))
    assert stream.enough.wait(60)
    return started


def _ends_stopped(thread: threading.Thread, out: list, timeout: float = 120) -> None:
    """The call ``_in_thread`` runs ends, within ``timeout`` (a dead remote is retried 10 s more), stopped."""
    thread.join(timeout)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], Stopped), out


def _locks(path: str) -> list[str]:
    return os.listdir(os.path.join(path, "locks")) if os.path.isdir(os.path.join(path, "locks")) else []


def test_a_backup_on_another_thread_stops_without_a_progress_callback(tmp_path, new_repo):
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    thread, out = _endless_backup(repo)
    repo.stop()
    _ends_stopped(thread, out, 60)
    assert isinstance(out[0], KeyboardInterrupt)
    assert repo.snapshots() == [] and _locks(path) == []
    # the stop is withdrawn: the next backup runs, and reuses nothing it should not
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    repo.backup([str(src)])
    repo.restore("latest", str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
    assert not repo.check(read_data=True).problems


def test_a_stop_with_nothing_running_stops_nothing_later(tmp_path, new_repo):
    repo = new_repo(str(tmp_path / "repo"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo.stop()
    assert repo.backup([str(src)]).snapshot is not None


@pytest.mark.parametrize("processes", [1, 2])
def test_a_restore_and_a_check_stop_at_their_next_progress_point(tmp_path, new_repo, processes, monkeypatch):
    from chunkvault.store import forked

    path = str(tmp_path / "repo")
    repo = new_repo(path, pack_size=64 << 10)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):  # small files are written 256 at a time, each run a progress point
        (src / f"f{i:03}").write_bytes(os.urandom(4 << 10))
    repo.backup([str(src)])
    calls = []

    def stop_at_first(*counts):  # as a cancel button would, from the operation's own thread
        calls.append(counts)
        repo.stop()

    sent = forked.Reporter.progress

    def sent_then_held(self, state):  # until the parent, stopped, ends it: on a loaded machine a worker
        sent(self, state)              # finished every file before the parent read its first progress
        time.sleep(60)

    monkeypatch.setattr(forked.Reporter, "progress", sent_then_held)
    with pytest.raises(Stopped):
        repo.restore("latest", str(tmp_path / "out"), progress=stop_at_first, processes=processes)
    monkeypatch.undo()
    assert len(calls) == 1 and _locks(path) == []
    restored = sum(len(files) for _, _, files in os.walk(tmp_path / "out"))
    assert restored < 600
    calls.clear()
    with pytest.raises(Stopped):
        repo.check(read_data=True, progress=stop_at_first)
    assert len(calls) == 1 and _locks(path) == []
    repo.restore("latest", str(tmp_path / "again"), processes=processes)
    assert describe(tmp_path / "again") == describe(src)


@pytest.mark.slow
def test_a_backup_waiting_on_a_remote_that_went_away_ends_once_stopped(tmp_path, http_server):  # noqa: F811
    """Without the stop it would retry the dead service for 15 minutes; stopped, it starts no attempt past
    the 10 s grace, and ends."""
    repo = Repository.init(http_server.url, PASSWORD, kdf_seconds=0, token=FULL_TOKEN, cache=False)
    thread, out = _endless_backup(repo)
    http_server.stop(signal.SIGKILL)
    repo.stop()
    _ends_stopped(thread, out)
    repo.close()


def test_a_stop_leaves_calls_started_after_it_alone_while_others_still_run(tmp_path, new_repo):
    """Calls made after a backup is stopped run as usual (a forget waiting for a lock another program holds,
    a backup, a lookup), and their errors stay what they are.  The forget is started after the stop: one
    running when it comes is an operation the stop ends, and started before it, the forget raced the
    backup into its wait."""
    from chunkvault.errors import SnapshotNotFound

    path = str(tmp_path / "repo")
    repo = new_repo(path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(10_000))
    repo.backup([str(src)])
    with Repository.open(path, PASSWORD) as reader, reader.reading("hold"):  # another program reads
        stream = EndlessStream()
        backing_up, backed_up = _in_thread(lambda: repo.backup_stream(stream, "db.dump"))
        assert stream.enough.wait(60)
        repo.stop()
        backing_up.join(60)
        assert isinstance(backed_up[0], Stopped)
        forgetting, forgot = _in_thread(lambda: repo.forget(["latest"], wait=60))
        time.sleep(0.5)
        assert forgetting.is_alive()  # waiting for the lock
        (src / "g").write_bytes(b"later")
        assert repo.backup([str(src)]).snapshot is not None
        with pytest.raises(SnapshotNotFound):
            repo.snapshot("ffffffff")
    forgetting.join(60)
    assert not forgetting.is_alive() and not isinstance(forgot[0], BaseException), forgot


@pytest.mark.slow
def test_a_copy_to_a_destination_that_went_away_ends_once_either_side_is_stopped(tmp_path, new_repo,
                                                                                 http_server):  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(256 << 10))
    source = new_repo(str(tmp_path / "repo"), pack_size=256 << 10)
    source.backup([str(src)])
    destination = Repository.init(http_server.url, PASSWORD, kdf_seconds=0, token=FULL_TOKEN, cache=False)
    first = threading.Event()

    def kill_at_first(*counts):
        if not first.is_set():
            first.set()
            http_server.stop(signal.SIGKILL)

    copying, out = _in_thread(lambda: source.copy_to(destination, progress=kill_at_first))
    assert first.wait(60)
    source.stop()
    _ends_stopped(copying, out)
    destination.close()


def test_a_backup_stopped_beside_another_leaves_it_nothing_it_refers_to_and_lacks(tmp_path, new_repo):
    """Thread A's backup is stopped part-way, its last packs never stored; thread B backs up the same data
    meanwhile.  B must not refer to A's blobs that no index object lists: its snapshot restores whole."""
    import random

    data = random.Random(7).randbytes(6 << 20)

    class SameData(EndlessStream):
        def read(self, n: int = -1) -> bytes:
            at = self.read_bytes % len(data)
            out = data[at:at + min(64 << 10, len(data) - at)]
            self.read_bytes += len(out)
            if self.read_bytes >= 3 << 20:
                self.enough.set()
            return out

    path = str(tmp_path / "repo")
    repo = new_repo(path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "db.dump").write_bytes(data)
    stream = SameData()
    a, a_out = _in_thread(lambda: repo.backup_stream(stream, "db.dump"))
    assert stream.enough.wait(60)
    repo.stop()
    b, b_out = _in_thread(lambda: repo.backup([str(src)]))  # while A unwinds, or just after
    a.join(60)
    b.join(120)
    assert isinstance(a_out[0], Stopped)
    snap = b_out[0].snapshot
    repo.restore(snap.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
    with Repository.open(path, PASSWORD) as fresh:
        assert not fresh.check(read_data=True).problems


def _running_commands(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_a_silent_command_and_a_wait_for_a_lock_end_when_stopped(tmp_path, new_repo, monkeypatch):
    from chunkvault.store import locks
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    path = str(tmp_path / "repo")
    repo = new_repo(path)
    marker = f"sleep 300 # {tmp_path.name}"
    command, out = _in_thread(lambda: repo.backup_command(["sh", "-c", marker], "dump.sql"))
    while not _running_commands(marker):
        command.join(0.05)
    repo.stop()
    command.join(60)
    assert not command.is_alive() and isinstance(out[0], Stopped), out
    assert _running_commands(marker) == [] and repo.snapshots() == []
    waits = threading.Event()
    monkeypatch.setattr(locks, "announce_wait", lambda *_: waits.set())
    with RepoLock(repo.store.remote, EXCLUSIVE, "prune"):  # another command's prune, for as long as it takes
        src = tmp_path / "src"
        src.mkdir()
        waiting, out = _in_thread(lambda: repo.backup([str(src)], wait=600))
        # begun: a stop before the call would leave it to run as usual (a second passed for it, under load)
        assert waits.wait(60)
        repo.stop()
        waiting.join(60)
        assert not waiting.is_alive() and isinstance(out[0], Stopped), out


def test_closing_from_another_thread_stops_what_runs_and_leaves_no_lock(tmp_path, new_repo):
    path = str(tmp_path / "repo")
    repo = new_repo(path)
    thread, out = _endless_backup(repo)
    repo.close()  # returns once the backup has ended
    assert not thread.is_alive() and isinstance(out[0], Stopped), out
    snapshots = os.path.join(path, "snapshots")
    assert _locks(path) == [] and (not os.path.isdir(snapshots) or os.listdir(snapshots) == [])


def test_a_restore_stops_inside_a_large_file(tmp_path, new_repo):
    """A database's one large file, read at 4 MiB/s: the stop is seen between batches of its chunks, not at
    its end (seconds later)."""
    path = str(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    (src / "base.db").write_bytes(os.urandom(24 << 20))
    new_repo(path).backup([str(src)])
    with Repository.open(path, PASSWORD, limit_download=4 << 20) as slow:
        target = tmp_path / "out"
        thread, out = _in_thread(lambda: slow.restore("latest", str(target), processes=1))
        while not (target / "base.db").exists() and thread.is_alive():
            thread.join(0.05)
        slow.stop()
        _ends_stopped(thread, out, 60)
    written = (target / "base.db").stat().st_size if (target / "base.db").exists() else 0
    assert written < 24 << 20  # six seconds of reading were left when it stopped


def test_an_export_a_dump_and_an_import_stop_at_their_next_section(tmp_path, new_repo, monkeypatch):
    """They had no progress point: a program that routes Ctrl-C to ``stop`` waited for a large export,
    dump or import to finish, and the import saved its snapshot."""
    import io

    from chunkvault.store import export as export_module

    path = str(tmp_path / "repo")
    repo = new_repo(path)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # more than one batch of an export's chunks (8 MiB)
        (src / f"f{i}").write_bytes(os.urandom(4 << 20))
    snap = repo.backup([str(src)]).snapshot
    real_add = export_module.ExportWriter.add_encoded_blob

    def stop_at_first_blob(self, payload):
        repo.stop()
        return real_add(self, payload)

    with monkeypatch.context() as patch:
        patch.setattr(export_module.ExportWriter, "add_encoded_blob", stop_at_first_blob)
        with pytest.raises(Stopped):
            repo.export(snap, str(tmp_path / "x.backup"), "pw", kdf_seconds=0)
    assert os.listdir(tmp_path) == [p for p in os.listdir(tmp_path) if "backup" not in p]
    assert _locks(path) == []

    class StoppingSink(io.RawIOBase):
        writes = 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.writes += 1
            repo.stop()
            return len(data)

    sink = StoppingSink()
    with pytest.raises(Stopped):
        repo.dump(snap, "/", sink)
    assert sink.writes == 1 and _locks(path) == []

    repo.export(snap, str(tmp_path / "x.backup"), "pw", kdf_seconds=0)
    other_path = str(tmp_path / "other")
    other = new_repo(other_path)
    for stage in ("verify", "store"):
        real_open = export_module.ExportFile._open_section
        opened = []

        def stop_once(self, stype, index, sealed, offset):
            opened.append(stype)
            if stage == "verify" or opened.count(export_module.S_META) == 2:  # the second pass begun
                other.stop()
            return real_open(self, stype, index, sealed, offset)

        with monkeypatch.context() as patch:
            patch.setattr(export_module.ExportFile, "_open_section", stop_once)
            with pytest.raises(Stopped):
                other.import_backup(str(tmp_path / "x.backup"), "pw")
        assert other.snapshots() == [] and _locks(other_path) == []
    imported = other.import_backup(str(tmp_path / "x.backup"), "pw").snapshot
    other.restore(imported.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
