"""Bad input: wrong passwords, newer formats, hostile source trees, leaked secrets, hostile bytes.

Each case has one tested outcome.  Decoders that sit behind the AEAD are fed
random plaintexts sealed with a real key, so their parsers (not only the tag
check) see arbitrary bytes.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from typing import Callable

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

import crashkit
from chunkvault import Repository
from chunkvault.errors import ChunkvaultError, CorruptObject, UnsupportedFormat, UsageError, WrongPassword
from chunkvault.store.blob import KIND_DELTA, KIND_RAW, KIND_ZSTD, open_blob, seal_blob
from chunkvault.store.config import (FORMAT_VERSION, KEY_AD, KeyFile, RepoConfig, Settings, make_key_file,
                                     open_config)
from chunkvault.store.crypto import KeyMaterial, Sealer, content_name
from chunkvault.store.indexfile import INDEX_AD, IndexData, decode_index, encode_index
from chunkvault.store.manifest import (
    F_CHANGED_DURING_READ, F_UNREADABLE, OP_DELETE, OP_ENTRY, OP_FRESH, T_BLOCKDEV, T_CHARDEV, T_FIFO, Entry,
    Record, decode_records, encode_record, iter_records,
)
from chunkvault.store.pack import HEADER_AD, open_header
from chunkvault.store.snapshot import SNAPSHOT_AD, Snapshot
from conftest import PASSWORD
from treeutil import describe, refusing_open, threads, wait_for, walked_ahead

PASSWORD = crashkit.PASSWORD
KEY = bytes(range(32))
SEALER = Sealer(KEY)


def only_our_errors(fn, *args):
    """The call returns or raises chunkvault's own error; anything else fails the test."""
    try:
        return fn(*args)
    except ChunkvaultError:
        return None


@pytest.fixture
def repo_path(tmp_path):
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    return path


# --- passwords and formats ----------------------------------------------------------------


def test_wrong_and_empty_passwords(repo_path):
    with pytest.raises(WrongPassword):
        Repository.open(repo_path, PASSWORD + "x")
    with pytest.raises(WrongPassword):
        Repository.open(repo_path, "")
    with pytest.raises(UsageError):
        Repository.init(repo_path + "2", "", kdf_seconds=0)
    proc = crashkit.run_cli("snapshots", "-r", repo_path, env=crashkit.cli_env({"CHUNKVAULT_PASSWORD": "nope"}),
                            ok=(11,))
    assert len(proc.stderr.decode().strip().splitlines()) == 1 and "wrong password" in proc.stderr.decode()
    proc = crashkit.run_cli("snapshots", "-r", repo_path, env=crashkit.cli_env({"CHUNKVAULT_PASSWORD": ""}), ok=(2,))
    assert "the repository password in CHUNKVAULT_PASSWORD is empty" in proc.stderr.decode()


def _bump_format(repo_path: str, version: int = FORMAT_VERSION + 1) -> None:
    with open(os.path.join(repo_path, "config"), "rb") as f:
        cfg = json.load(f)
    cfg["format"] = version
    with open(os.path.join(repo_path, "config"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("written", [False, True])
def test_an_init_whose_config_write_fails_leaves_no_key_file_behind(tmp_path, written):
    """A key file alone made the location one "that lost its config": every later init refused it, and it
    pointed to a key export no one could have.  A config written after all (its reply lost) is a repository
    made, and keeps its key."""
    from chunkvault.errors import PermissionDenied, RemoteUnavailable
    from chunkvault.remotes.local import LocalRemote

    class ConfigRefused(LocalRemote):
        def put(self, key, data, *, if_absent=False):
            if key == "config":
                if written:
                    super().put(key, data, if_absent=if_absent)
                    raise RemoteUnavailable("the reply was lost")
                raise PermissionDenied("permission denied while writing config")
            return super().put(key, data, if_absent=if_absent)

    path = tmp_path / "repo"
    path.mkdir()
    if written:
        Repository.init(ConfigRefused(str(path)), PASSWORD, kdf_seconds=0).close()
        with Repository.open(str(path), PASSWORD) as repo:
            assert repo.snapshots() == []
        return
    with pytest.raises(PermissionDenied):
        Repository.init(ConfigRefused(str(path)), PASSWORD, kdf_seconds=0)
    assert os.listdir(path / "keys") == []
    stray_key = path / "keys" / "0123"  # as a kill between the two writes leaves it
    stray_key.write_bytes(b"a key file")
    for attempt in (lambda: Repository.init(str(path), PASSWORD, kdf_seconds=0),
                    lambda: Repository.open(str(path), PASSWORD)):
        with pytest.raises(ChunkvaultError, match="it holds no backup .* removing keys/ there lets init run again"):
            attempt()
    stray_key.unlink()
    Repository.init(str(path), PASSWORD, kdf_seconds=0).close()  # the cause mended, init runs again


def test_no_repository_is_made_inside_another(tmp_path):
    """Its objects were taken for the outer repository's own (`snapshots` there advised forgetting the
    inner config)."""
    from chunkvault.errors import RepositoryExists

    outer = tmp_path / "outer"
    Repository.init(str(outer), PASSWORD, kdf_seconds=0).close()
    for below in (outer / "snapshots" / "inner", outer / "sub"):
        with pytest.raises(RepositoryExists, match=f"lies inside the repository at {outer}"):
            Repository.init(str(below), PASSWORD, kdf_seconds=0)
    Repository.init(str(tmp_path / "beside"), PASSWORD, kdf_seconds=0).close()


@pytest.mark.parametrize("inner", ["keys", "data", "data/x", "data/ab/cd", "snapshots/a/b"])
def test_a_repository_in_a_directory_of_one_above_it_is_no_lost_config_there(tmp_path, inner):
    """A repository made at ``outer/keys`` made ``outer`` look like a repository that lost its config, whose
    hint said that removing keys/ there lets init run again: the inner repository with it.  Nothing is made at
    ``outer`` (it would take the inner one's objects for its own), and opening it names the inner one."""
    from chunkvault.errors import RepositoryExists, RepositoryNotFound

    outer = tmp_path / "outer"
    with Repository.init(str(outer / inner), PASSWORD, kdf_seconds=0) as repo:
        (tmp_path / "f").write_bytes(b"kept")
        repo.backup([str(tmp_path / "f")])
    with pytest.raises(RepositoryNotFound) as opened:
        Repository.open(str(outer), PASSWORD)
    assert str(opened.value) == f"no repository at {outer} (another lies below it, at {outer / inner})"
    with pytest.raises(RepositoryExists) as made:
        Repository.init(str(outer), PASSWORD, kdf_seconds=0)
    assert f"holds the repository at {outer / inner}, whose objects" in str(made.value)
    assert "keys/ there" not in str(made.value) and not (outer / "config").exists()
    with Repository.open(str(outer / inner), PASSWORD) as repo:
        assert len(repo.snapshots()) == 1


def test_an_init_or_open_that_fails_closes_the_connection_it_made(tmp_path, monkeypatch):
    """A refused init (a repository there already) left its connection open: over SFTP an ssh process, or
    a paramiko thread, that kept every later restore of the process from forking its workers."""
    from chunkvault import repository as repository_module
    from chunkvault.errors import RepositoryExists, WrongPassword
    from chunkvault.remotes.local import LocalRemote

    closed = []

    class Watched(LocalRemote):
        def close(self) -> None:
            closed.append(self.root)
            super().close()

    monkeypatch.setattr(repository_module, "connect",
                        lambda url, **options: url if isinstance(url, LocalRemote) else Watched(url))
    Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0).close()
    assert len(closed) == 1
    with pytest.raises(RepositoryExists):
        Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    with pytest.raises(WrongPassword):
        Repository.open(str(tmp_path / "repo"), "not it")
    assert len(closed) == 3
    given = Watched(str(tmp_path / "repo"))
    with pytest.raises(RepositoryExists):
        Repository.init(given, PASSWORD, kdf_seconds=0)
    assert len(closed) == 3  # a remote the caller gave stays the caller's


def test_a_repository_that_lost_its_config_is_named_and_not_overwritten(tmp_path, cli, new_repo):
    """Not "no repository": the objects are there (its key file too), and `init` must not build a second
    repository among them, whose warnings would then call every old snapshot unreadable."""
    repo = new_repo(str(tmp_path / "repo"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("data\n")
    repo.backup([str(tmp_path / "src")])
    os.unlink(tmp_path / "repo" / "config")
    keys = sorted(os.listdir(tmp_path / "repo" / "keys"))
    r = cli("snapshots", "-r", str(tmp_path / "repo"), check=13)
    assert r.stderr.decode().strip().endswith(
        "config: missing at " + str(tmp_path / "repo") + ", which holds repository objects (keys/, data/, index/, "
        "snapshots/); put back a copy of the config file; a key export of this repository puts it back "
        "(`key import FILE`)")
    r = cli("init", "-r", str(tmp_path / "repo"), check=10)
    assert "lost its config there; not creating one over it" in r.stderr.decode()
    assert sorted(os.listdir(tmp_path / "repo" / "keys")) == keys and not (tmp_path / "repo" / "config").exists()
    with pytest.raises(CorruptObject, match="config"):
        Repository.open(str(tmp_path / "repo"), PASSWORD)
    assert cli("snapshots", "-r", str(tmp_path / "nothing"), check=10).stderr.decode().strip().endswith(
        "no repository at " + str(tmp_path / "nothing"))


def test_repository_of_a_newer_format(repo_path):
    _bump_format(repo_path)
    with pytest.raises(UnsupportedFormat):
        Repository.open(repo_path, PASSWORD)
    with pytest.raises(UnsupportedFormat):  # refused before the password is even tried
        Repository.open(repo_path, "not the password")
    proc = crashkit.run_cli("backup", "-r", repo_path, "/etc/hostname", ok=(17,))
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "newer" in err


def test_newer_format_is_reported_before_a_password_is_asked(repo_path):
    _bump_format(repo_path)
    env = {k: v for k, v in crashkit.cli_env().items() if k != "CHUNKVAULT_PASSWORD"}
    crashkit.run_cli("snapshots", "-r", repo_path, env=env, ok=(17,))


# --- hostile source trees ------------------------------------------------------------------


def test_file_changing_while_read_is_recorded_and_reread_next_time(repo_path, tmp_path, monkeypatch, python_file_reads):
    src = tmp_path / "src"
    src.mkdir()
    (src / "steady").write_bytes(b"s" * 10_000)
    (src / "growing").write_bytes(os.urandom(300_000))
    real_open = os.open

    def open_then_append(path, flags, *args):
        fd = real_open(path, flags, *args)
        if os.path.basename(os.fsdecode(path)) == "growing":
            with open(path, "ab") as f:  # a writer appends while the backup reads
                f.write(b"appended during the backup")
        return fd

    with Repository.open(repo_path, PASSWORD) as repo:
        monkeypatch.setattr("chunkvault.store.backup.os.open", open_then_append)
        result = repo.backup([str(src)])
        monkeypatch.undo()
        assert not result.partial
        assert any("changed while being read" in w and "growing" in w for w in result.warnings)
        flags = {e.path: e.flags for e in repo.tree(result.snapshot.id)}
        assert flags[b"growing"] & F_CHANGED_DURING_READ and not flags[b"steady"]
        second = repo.backup([str(src)])  # flagged: read again, not trusted by metadata
        assert not second.warnings
        assert not {e.path: e.flags for e in repo.tree(second.snapshot.id)}[b"growing"]
        repo.restore(second.snapshot.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)


@pytest.mark.parametrize("change", ["grows", "shrinks"])
def test_small_file_changing_while_read_is_recorded(repo_path, tmp_path, monkeypatch, python_file_reads, change):
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(os.urandom(10_000))
    real_open = os.open

    def open_then_change(path, flags, *args):
        fd = real_open(path, flags, *args)
        if os.path.basename(os.fsdecode(path)) == "small":
            if change == "grows":
                with open(path, "ab") as f:
                    f.write(b"appended during the backup")
            else:
                os.truncate(path, 4_000)
        return fd

    with Repository.open(repo_path, PASSWORD) as repo:
        monkeypatch.setattr("chunkvault.store.backup.os.open", open_then_change)
        result = repo.backup([str(src)])
        monkeypatch.undo()
        entry = {e.path: e for e in repo.tree(result.snapshot.id)}[b"small"]
        assert entry.flags & F_CHANGED_DURING_READ
        repo.restore(result.snapshot.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "small").read_bytes() == (src / "small").read_bytes()  # stored as read


def test_short_reads_of_small_files_still_store_all_of_them(repo_path, tmp_path, monkeypatch, python_file_reads):
    """A file system may return less than asked before the end (FUSE, network mounts)."""
    src = tmp_path / "src"
    src.mkdir()
    for size in (0, 1, 777, 10_000, 64 << 10):
        (src / f"f{size}").write_bytes(os.urandom(size))
    real_read = os.read
    monkeypatch.setattr("chunkvault.store.backup.os.read", lambda fd, n: real_read(fd, max(1, n // 3)))
    with Repository.open(repo_path, PASSWORD) as repo:
        result = repo.backup([str(src)])
        monkeypatch.undo()
        assert not result.warnings
        repo.restore(result.snapshot.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)


def test_a_proc_file_is_stored_whole_and_said_to_hold_other_than_its_size_not_to_have_changed(repo_path, tmp_path):
    """/proc gives its files size 0 (/sys 4096) whatever they hold: the backup stores what it reads and reads
    them again next time, as their times say nothing; it said each of them changed while being read."""
    with Repository.open(repo_path, PASSWORD) as repo:
        first = repo.backup(["/proc/version"])
        want = open("/proc/version", "rb").read()
        assert first.warnings == [f"read {len(want)} bytes where its size says 0 (stored as read): /proc/version"]
        assert not first.partial
        second = repo.backup(["/proc/version"])
        assert second.snapshot.stats["read_bytes"] == len(want) and len(second.warnings) == 1  # read again
        repo.restore(second.snapshot.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "version").read_bytes() == want


# A FUSE file system whose files can only be read front to back (``nonseekable``, as file systems streaming
# generated or decrypted content open them), the second one also smaller by its stat than what it holds.
STREAM_FS = r"""
import errno, stat, sys
import mfusepy as fuse

DATA = bytes(range(256)) * 1200  # larger than a chunk's least size
SIZES = {"honest": len(DATA), "understated": 10}

class Streams(fuse.Operations):
    use_ns = True

    def getattr(self, path, fh=None):
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        if path[1:] not in SIZES:
            raise fuse.FuseOSError(errno.ENOENT)
        return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=SIZES[path[1:]], st_mtime=10**18)

    def readdir(self, path, fh):
        return [".", "..", *SIZES]

    def open(self, path, fi):
        fi.direct_io = fi.nonseekable = 1
        return 0

    def read(self, path, size, offset, fi):
        return DATA[offset:offset + size]

fuse.FUSE(Streams(), sys.argv[1], foreground=True, raw_fi=True, ro=True)
"""


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") and not
                    shutil.which("fusermount"), reason="no FUSE device or fusermount here")
def test_files_that_can_only_be_read_front_to_back_are_stored_whole(repo_path, tmp_path):
    """A file that refuses seeks and positioned reads was unreadable (\"Illegal seek\", exit 3, no data): the
    reader of a file whose blocks do not cover its size asked for its holes and read at offsets, and a file
    found larger than its stat said was read again from its start.  tar, cat and restic read such files."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", STREAM_FS, str(mnt)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or os.path.exists(mnt / "honest"), timeout=30)
        assert proc.poll() is None, proc.stderr.read().decode()
        data = bytes(range(256)) * 1200
        with Repository.open(repo_path, PASSWORD) as repo:
            result = repo.backup([str(mnt)])
            assert not result.partial, result.warnings
            assert result.warnings == [f"read {len(data)} bytes where its size says 10 (stored as read): "
                                       f"{mnt / 'understated'}"]
            repo.restore(result.snapshot.id, str(tmp_path / "out"))
        assert (tmp_path / "out" / "honest").read_bytes() == (tmp_path / "out" / "understated").read_bytes() == data
    finally:
        subprocess.run([shutil.which("fusermount3") or shutil.which("fusermount"), "-u", str(mnt)],
                       capture_output=True)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("gone", ["before its stat", "after its stat"])
def test_file_vanishing_during_backup_is_a_warning(repo_path, tmp_path, monkeypatch, gone):
    """A name listed whose stat fails, or whose stat worked but which is gone when opened."""
    from chunkvault.store import source

    src = tmp_path / "src"
    src.mkdir()
    (src / "here").write_bytes(b"here")
    real_scan = source.scan_dir

    def scan_with_a_ghost(path, seen=None):
        listing = real_scan(path, seen)
        if os.fsdecode(path) != str(src):
            return listing
        ghost = (b"gone-already", errno.ENOENT, None) if gone == "before its stat" else (b"gone-already", 0, listing[0][2])
        return sorted(listing + [ghost])

    with Repository.open(repo_path, PASSWORD) as repo:
        monkeypatch.setattr(source, "scan_dir", scan_with_a_ghost)
        monkeypatch.setattr(source, "Walker", None)  # the per-directory walk, whose listing is faked here
        result = repo.backup([str(src)])
        monkeypatch.undo()
        assert any("vanished" in w and "gone-already" in w for w in result.warnings)
        assert not result.partial
        assert [e.path for e in repo.tree(result.snapshot.id)] == [b"", b"here"]


def test_file_walked_ahead_and_gone_when_read_is_a_warning(repo_path, tmp_path):
    """The whole tree listed and stat'ed ahead (the C walk), a file removed before the backup reads it."""
    from chunkvault.store.source import SourceWalk

    src = tmp_path / "src"
    src.mkdir()
    for name in ("gone-already", "here"):
        (src / name).write_bytes(name.encode())
    before = threads()  # taken before the walk starts its C thread, so the wait below covers that thread
    walk = walked_ahead(SourceWalk.of_paths([str(src)]).start(), before)
    (src / "gone-already").unlink()
    with Repository.open(repo_path, PASSWORD) as repo:
        result = repo.backup([str(src)], walk=walk)
        assert any("vanished" in w and "gone-already" in w for w in result.warnings)
        assert not result.partial
        assert [e.path for e in repo.tree(result.snapshot.id)] == [b"", b"here"]


def test_unreadable_file_gives_exit_3_and_is_not_restored_with_a_warning(repo_path, tmp_path, monkeypatch, capsys,
                                                                         python_file_reads):
    from chunkvault import cli

    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"fine")
    (src / "locked").write_bytes(b"secret")
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open("locked"))
    assert cli.main(["backup", "-r", repo_path, str(src)]) == 3
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "cannot read" in err and "locked" in err and "could not be read" in err
    with Repository.open(repo_path, PASSWORD) as repo:
        snap = repo.snapshot("latest")
        assert snap.stats["unreadable"] == ["locked"]
        assert {e.path: e.flags for e in repo.tree(snap)}[b"locked"] & F_UNREADABLE
        result = repo.restore(snap, str(tmp_path / "out"), verify=True)
    # No backup read it: an empty file with its time would pass for its content (and was verified)
    assert not (tmp_path / "out" / "locked").exists()
    assert "locked was unreadable at backup time: not restored (no backup read its data)" in result.warnings
    import io
    import tarfile

    with Repository.open(repo_path, PASSWORD) as repo:
        out = io.BytesIO()
        said = repo.dump("latest", "/", out, archive="tar")
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(out.getvalue()))] == ["ok"]
    assert said == ["locked: unreadable at backup time, left out (no backup read it)"]
    from chunkvault.mount import SnapshotFS

    capsys.readouterr()
    with Repository.open(repo_path, PASSWORD) as repo:  # mounted, it read as an empty file, exit 0
        fs = SnapshotFS(repo)
        root = f"/snapshots/{fs._layout.names[snap.id]}"
        with pytest.raises(OSError) as info:
            fs.open(f"{root}/locked", os.O_RDONLY)
        assert info.value.errno == errno.EIO
        assert fs.read("", 10, 0, fs.open(f"{root}/ok", os.O_RDONLY)) == b"fine"
        fs.destroy("/")
    assert "/locked: no backup could read this file" in capsys.readouterr().err
    assert (tmp_path / "out" / "ok").read_bytes() == b"fine"
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    assert cli.main(["backup", "-r", repo_path, str(src)]) == 0  # readable again
    (src / "locked").write_bytes(b"secret, changed")
    os.utime(src / "locked", ns=(1, 1))
    from chunkvault.store import backup, source

    monkeypatch.setattr(backup, "read_small_files", source.read_small_files_reference)  # as python_file_reads
    monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open("locked"))
    assert cli.main(["backup", "-r", repo_path, str(src)]) == 3  # unreadable again: the earlier data stays
    monkeypatch.undo()
    with Repository.open(repo_path, PASSWORD) as repo:
        result = repo.restore("latest", str(tmp_path / "again"), verify=True)
    assert (tmp_path / "again" / "locked").read_bytes() == b"secret"  # and verified


@pytest.mark.skipif(os.geteuid() != 0, reason="device nodes need root")
def test_special_files_fifo_devices_and_sockets(repo_path, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo")
    os.mknod(src / "null-like", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(src / "block", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    try:
        with Repository.open(repo_path, PASSWORD) as repo:
            result = repo.backup([str(src)])
            assert any("socket" in w and "sock" in w for w in result.warnings)
            types = {e.path: e.type for e in repo.tree(result.snapshot.id)}
            assert types == {b"": 1, b"fifo": T_FIFO, b"null-like": T_CHARDEV, b"block": T_BLOCKDEV}
            repo.restore(result.snapshot.id, str(tmp_path / "out"))
    finally:
        sock.close()
    out = tmp_path / "out"
    assert stat.S_ISFIFO(os.lstat(out / "fifo").st_mode)
    for name, kind, dev in (("null-like", stat.S_ISCHR, os.makedev(1, 3)), ("block", stat.S_ISBLK, os.makedev(7, 200))):
        st_ = os.lstat(out / name)
        assert kind(st_.st_mode) and st_.st_rdev == dev
        assert stat.S_IMODE(st_.st_mode) == stat.S_IMODE(os.lstat(src / name).st_mode)
    assert not os.path.lexists(out / "sock")


def test_names_with_newlines_and_invalid_utf8_through_the_cli(repo_path, tmp_path):
    src = os.fsencode(str(tmp_path / "src"))
    os.makedirs(src + b"/dir\nwith newline/\xff\xfe-sub")
    odd = src + b"/dir\nwith newline/\xff\xfe-sub/caf\xe9 \x01\x7f.bin"
    with open(odd, "wb") as f:
        f.write(b"odd name content")
    with open(src + b"/-starts-with-dash", "wb") as f:
        f.write(b"dash")
    crashkit.run_cli("backup", "-r", repo_path, os.fsdecode(src), "-q")
    listing = json.loads(crashkit.run_cli("ls", "-r", repo_path, "latest", "--json").stdout)
    assert sorted(os.fsencode(e["path"]) for e in listing) == sorted(
        [b"", b"-starts-with-dash", b"dir\nwith newline", b"dir\nwith newline/\xff\xfe-sub",
         b"dir\nwith newline/\xff\xfe-sub/caf\xe9 \x01\x7f.bin"])
    dumped = subprocess.run(crashkit.cli_argv("dump", "-r", repo_path, "latest",
                                              os.fsdecode(b"dir\nwith newline/\xff\xfe-sub/caf\xe9 \x01\x7f.bin")),
                            env=crashkit.cli_env(), capture_output=True)
    assert dumped.returncode == 0 and dumped.stdout == b"odd name content"
    out = tmp_path / "out"
    crashkit.run_cli("restore", "-r", repo_path, "latest", "--target", str(out), "-q")
    assert describe(out) == describe(src)


def test_stdin_names_that_would_escape_are_refused(repo_path):
    with Repository.open(repo_path, PASSWORD) as repo:
        for name in ("../escape", "/abs", "a/../b", "", "a//b", "nul\x00byte"):
            with pytest.raises(UsageError):
                import io

                repo.backup_stream(io.BytesIO(b"x"), name)


# --- secrets -------------------------------------------------------------------------------


def _secrets(repo_path: str) -> list[bytes]:
    with Repository.open(repo_path, PASSWORD) as repo:
        m = repo.store.material
    out = [PASSWORD.encode()]
    for k in (m.enc_key, m.id_key, m.chunker_secret):
        out += [k, k.hex().encode(), k.hex().upper().encode(), base64.b64encode(k)]
    out.append(base64.b64encode(m.to_bytes()))
    return out


def test_keys_and_password_never_appear_in_output_or_errors(repo_path, tmp_path):
    src = tmp_path / "src"
    crashkit.SourceTree(str(src), __import__("random").Random(1), target_bytes=300_000)
    secrets = _secrets(repo_path)
    outputs = []
    for args in (["backup", "-r", repo_path, str(src), "--json"], ["backup", "-r", repo_path, str(src)],
                 ["snapshots", "-r", repo_path, "--json"], ["ls", "-r", repo_path, "latest", "--json"],
                 ["check", "-r", repo_path, "--read-data", "--json"], ["key", "list", "-r", repo_path, "--json"],
                 ["restore", "-r", repo_path, "latest", "--target", str(tmp_path / "o"), "--json"],
                 ["prune", "-r", repo_path, "--json"], ["check", "-r", repo_path, "--debug"]):
        proc = crashkit.run_cli(*args)
        outputs.append(proc.stdout + proc.stderr)
    for pw in ("wrong", PASSWORD[:-1]):
        proc = crashkit.run_cli("snapshots", "-r", repo_path, env=crashkit.cli_env({"CHUNKVAULT_PASSWORD": pw}),
                                ok=(11,))
        outputs.append(proc.stdout + proc.stderr)
    # an error path: a damaged index makes a corrupt-object error
    idx = os.path.join(repo_path, "index", sorted(os.listdir(os.path.join(repo_path, "index")))[0])
    with open(idx, "ab") as f:
        f.write(b"!")
    for args in (["restore", "-r", repo_path, "latest", "--target", str(tmp_path / "o2")], ["check", "-r", repo_path]):
        proc = crashkit.run_cli(*args, ok=(13, 18))
        outputs.append(proc.stdout + proc.stderr)
    blob = b"\n".join(outputs)
    assert b"snapshot" in blob  # the commands really talked
    for s in secrets:
        assert s not in blob
    # nor in the repository itself, in clear
    for dirpath, _, names in os.walk(repo_path):
        for n in names:
            data = open(os.path.join(dirpath, n), "rb").read()
            assert not any(s in data for s in secrets), n
    # nor in exception texts and reprs of the in-process objects
    with Repository.open(repo_path, PASSWORD) as repo:
        texts = [repr(repo.store.material), repr(repo.store.sealer)]
    try:
        Repository.open(repo_path, "wrong")
    except WrongPassword as exc:
        texts.append(str(exc) + repr(exc))
    assert not any(s.decode("latin-1") in t for s in secrets for t in texts)


@pytest.mark.parametrize("via", ["env", "file"])
def test_password_not_in_the_process_title(repo_path, tmp_path, via):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    env = crashkit.cli_env()
    args = ["backup", "-r", repo_path, str(src), "-q"]
    if via == "file":
        pw_file = tmp_path / "pw"
        pw_file.write_text(PASSWORD + "\n")
        env.pop("CHUNKVAULT_PASSWORD")
        args += ["--password-file", str(pw_file)]
    proc = subprocess.Popen(crashkit.cli_argv(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    titles = []
    while proc.poll() is None:
        for p in (f"/proc/{proc.pid}/cmdline", f"/proc/{proc.pid}/comm"):
            try:
                titles.append(open(p, "rb").read())
            except OSError:
                pass
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert titles and any(b"chunkvault" in t for t in titles)
    assert not any(PASSWORD.encode() in t for t in titles)


def test_no_plaintext_temp_files(repo_path, tmp_path):
    """During and after a backup and a restore, nothing new appears in TMPDIR, and the
    repository holds only its objects (and in-flight `.tmp-` objects), all encrypted."""
    marker = b"PLAINTEXT-MARKER-4c1d" * 50
    src = tmp_path / "src"
    src.mkdir()
    for i in range(15):
        (src / f"f{i}").write_bytes(marker + os.urandom(200_000) + marker)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = crashkit.cli_env({"TMPDIR": str(tmpdir), "TEMP": str(tmpdir), "TMP": str(tmpdir)})
    seen: set[str] = set()
    for args in (["backup", "-r", repo_path, str(src), "-q"],
                 ["restore", "-r", repo_path, "latest", "--target", str(tmp_path / "out"), "-q"]):
        proc = subprocess.Popen(crashkit.cli_argv(*args), env=env, stderr=subprocess.PIPE)
        while proc.poll() is None:
            seen |= {os.path.join(d, n) for d, _, ns in os.walk(tmpdir) for n in ns}
            for d, _, ns in os.walk(repo_path):
                for n in ns:
                    seen.add(os.path.join(d, n))
            time.sleep(0.002)
        assert proc.wait() == 0, proc.stderr.read().decode()
    assert not any(p.startswith(str(tmpdir)) for p in seen)
    allowed = ("config", "keys", "data", "index", "snapshots", "locks", ".reserve")  # and space for a full disk
    for p in seen:
        rel = os.path.relpath(p, repo_path)
        assert rel.split(os.sep)[0] in allowed or (os.sep not in rel and rel.startswith(".tmp-")), rel
    for d, _, ns in os.walk(repo_path):
        for n in ns:
            assert marker[:21] not in open(os.path.join(d, n), "rb").read()
    assert describe(tmp_path / "out") == describe(src)


# --- decoders behind the AEAD, fed random plaintexts -----------------------------------------

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=300))
def test_open_config_with_a_real_sealer(settings_json):
    cfg = RepoConfig("ab" * 16, "now", Settings(chunker={}))
    sealed = SEALER.seal(settings_json, cfg.ad())
    doc = json.dumps({"format": 1, "id": cfg.repo_id, "created": "x",
                      "sealed": base64.b64encode(sealed).decode()}).encode()
    result = only_our_errors(open_config, doc, SEALER)
    assert result is None or isinstance(result, RepoConfig)


@FAST
@given(st.dictionaries(st.sampled_from(["chunker", "compression_level", "pack_size", "full_every",
                                        "max_diff_share", "extra", "bogus"]),
                       st.one_of(st.integers(), st.text(max_size=5), st.none(), st.just({}))))
def test_open_config_with_wrong_shaped_settings(body):
    cfg = RepoConfig("cd" * 16, "now", Settings(chunker={}))
    sealed = SEALER.seal(json.dumps(body).encode(), cfg.ad())
    doc = json.dumps({"format": 1, "id": cfg.repo_id, "sealed": base64.b64encode(sealed).decode()}).encode()
    only_our_errors(open_config, doc, SEALER)


@FAST
@given(st.binary(max_size=400))
def test_index_parser_on_sealed_random_plaintext(plain):
    sealed = SEALER.seal(zstandard.ZstdCompressor().compress(plain), INDEX_AD)
    only_our_errors(decode_index, SEALER, sealed, "index/x")


@FAST
@given(st.integers(0, 4), st.lists(st.tuples(st.integers(0, 3), st.binary(min_size=32, max_size=32),
                                             st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                             st.integers(0, 2**32 - 1)), max_size=5), st.binary(max_size=40))
def test_pack_header_parser_on_sealed_entries(version, entries, tail):
    plain = struct.pack("<BI", version, len(entries))
    for kind, bid, off, length, raw in entries:
        plain += struct.pack("<B32sIII", kind, bid, off, length, raw) + (bid if kind == KIND_DELTA else b"")
    plain += tail
    result = only_our_errors(open_header, SEALER, SEALER.seal(plain, HEADER_AD), "data/x", 1 << 20)
    for e in result or []:
        assert e.offset + e.length <= 1 << 20


@FAST
@given(st.one_of(st.binary(max_size=200), st.dictionaries(st.text(max_size=8), st.integers(), max_size=5).map(
    lambda d: json.dumps({**d, "version": 1}).encode())))
def test_snapshot_parser_on_sealed_random_plaintext(plain):
    sid = "ab" * 32
    sealed = SEALER.seal(zstandard.ZstdCompressor().compress(plain), SNAPSHOT_AD + sid.encode())
    only_our_errors(Snapshot.decode, SEALER, sid, sealed)


@FAST
@given(st.sampled_from([KIND_RAW, KIND_ZSTD, KIND_DELTA]), st.binary(max_size=300), st.booleans(),
       st.integers(0, 400))
def test_blob_decoder_on_sealed_random_payloads(kind, payload, with_base, raw_length):
    bid = bytes(32)
    base_id = bytes([1]) * 32 if kind == KIND_DELTA else None
    env = seal_blob(SEALER, bid, kind, payload, base_id)
    base = b"base" * 10 if with_base or kind == KIND_DELTA else None  # a delta is always opened with its base
    result = only_our_errors(open_blob, SEALER, bid, env, raw_length, base)
    assert result is None or len(result) == raw_length


@FAST
@given(st.binary(max_size=200), st.sampled_from(["", "\x00", "pw"]))
def test_key_file_unwrap_on_random_wrapped_bytes(wrapped, password):
    kf = KeyFile("k", "", "", "", "scrypt", {"log_n": 10, "r": 8, "p": 1}, bytes(16), wrapped)
    with pytest.raises(ChunkvaultError):
        kf.unwrap(password.encode(), "ab" * 16)


@pytest.mark.parametrize("scrypt", [True, False])
def test_key_file_with_hostile_kdf_parameters(scrypt):
    material = KeyMaterial.generate()
    name, data = make_key_file(material, b"pw", "ab" * 16, **({"log_n": 10} if scrypt else {"kdf_seconds": 0}))
    doc = json.loads(data)
    assert doc["kdf"] == ("scrypt" if scrypt else "argon2id")
    hostile = (("log_n", 40), ("log_n", -1), ("r", 0), ("r", 10 ** 6), ("log_n", "x")) if scrypt else (
        ("t", 0), ("t", -1), ("m", 15), ("m", 1 << 30), ("t", 10 ** 9), ("m", "x"), ("t", None), ("p", 65))
    for field, value in hostile + (("p", 0), ("salt", "%%"), ("p", 10 ** 9), ("kdf", 7)):
        bad = json.dumps({**doc, field: value}).encode()
        kf = only_our_errors(KeyFile.decode, "", bad)
        if kf is not None:
            only_our_errors(kf.unwrap, b"pw", "ab" * 16)
    # a planted key file cannot make opening a repository compute for hours
    for planted in [{"p": 10 ** 9}] + ([] if scrypt else [{"t": 1 << 16, "m": 1 << 16}]):
        kf = KeyFile.decode("", json.dumps({**doc, **planted}).encode())
        with pytest.raises(CorruptObject, match="out of range|more than chunkvault writes"):
            kf.unwrap(b"pw", "ab" * 16)
    for field, value in (("p", True), ("p", 2.0), ("p", 2.5), ("p", "2")):  # JSON integers, nothing else
        with pytest.raises(CorruptObject, match="malformed"):
            KeyFile.decode("", json.dumps({**doc, field: value}).encode())
    # and the key file as made opens
    assert KeyFile.decode(name, data).unwrap(b"pw", "ab" * 16) == material


def test_argon2id_tuning_caps_memory_and_grows_passes_for_time():
    from chunkvault.store.crypto import ARGON2_LANES, ARGON2_MEMORY_KIB, tune_argon2id

    assert ARGON2_MEMORY_KIB << 10 == 32 << 20  # restic's bound
    t, m, p = tune_argon2id(0)
    assert t == 1 and m < ARGON2_MEMORY_KIB and p == ARGON2_LANES
    t, m, p = tune_argon2id(0.002)  # less than one pass over 32 MiB costs: less memory
    assert t == 1 and 8 * p <= m < ARGON2_MEMORY_KIB
    # more than one pass over 32 MiB takes: passes carry the rest; tuned in a fresh interpreter, where
    # the first derivation also loads the library (timing it once made keys use a sixth of the time)
    out = subprocess.run([sys.executable, "-c", "from chunkvault.store.crypto import tune_argon2id; "
                          "print(*tune_argon2id(0.3))"], capture_output=True, text=True, check=True).stdout
    t, m, p = map(int, out.split())
    assert m == ARGON2_MEMORY_KIB and t > 1 and p == ARGON2_LANES


def test_kdf_tuning_caps_memory_and_grows_p_for_time(monkeypatch):
    from chunkvault.store import crypto
    from chunkvault.store.crypto import MAX_P, MEMORY_LOG_N, SCRYPT_R, tune_scrypt

    assert 128 * SCRYPT_R << MEMORY_LOG_N == 32 << 20  # restic's bound
    log_n, p = tune_scrypt(0.01)
    assert log_n <= MEMORY_LOG_N and p == 1
    # A lane of 32 MiB taken to cost 1 s: measured here, a load spike between the test's measurement and the
    # tuner's own made 20 lanes' time look like more than 64 lanes', and N grew.
    monkeypatch.setattr(crypto, "_lane_seconds", lambda log_n: 2.0 ** (log_n - MEMORY_LOG_N))
    log_n, p = tune_scrypt(20.0)  # far more time than 32 MiB of scrypt takes: p carries the rest
    assert (log_n, p) == (MEMORY_LOG_N, 20)
    log_n, p = tune_scrypt(1000.0)  # more than 64 lanes would take: only then does N grow again
    assert log_n > MEMORY_LOG_N and 1 <= p <= MAX_P


_entries = st.builds(
    Entry, path=st.binary(min_size=1, max_size=20), type=st.integers(0, 6), mode=st.integers(0, 0o7777),
    uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1), mtime_ns=st.integers(-2**63, 2**63 - 1),
    size=st.integers(0, 2**64 - 1), target=st.binary(max_size=10), digest=st.binary(max_size=32),
    chunks=st.lists(st.binary(min_size=32, max_size=32), max_size=3).map(b"".join), flags=st.integers(0, 3))
_records = st.lists(st.one_of(_entries.map(lambda e: Record(OP_ENTRY, e.path, e)),
                              _entries.map(lambda e: Record(OP_FRESH, e.path, e)),
                              st.binary(min_size=1, max_size=20).map(lambda p: Record(OP_DELETE, p, None))),
                    max_size=8)


@FAST
@given(_records, st.lists(st.integers(0, 2000), max_size=6))
def test_manifest_records_survive_any_split_into_pieces(records, cuts):
    stream = b"".join(encode_record(r) for r in records)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)])]
    assert list(iter_records(pieces, "m")) == records


@FAST
@given(_records, st.integers(1, 400), st.binary(min_size=1, max_size=30))
def test_manifest_stream_cut_short_or_padded_is_an_error(records, cut, junk):
    stream = b"".join(encode_record(r) for r in records)
    if stream:
        short = stream[: cut % len(stream)] if cut % len(stream) else stream[:-1]
        out = only_our_errors(lambda: list(iter_records([short], "m")))
        assert out is None or out == records[: len(out)]
    only_our_errors(lambda: list(iter_records([stream, junk], "m")))
    only_our_errors(decode_records, stream + junk, "m")


def test_a_restore_target_that_cannot_be_made_or_listed_is_one_line(tmp_path):
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"f")
    crashkit.run_cli("backup", "-r", repo, str(tmp_path / "src"))
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "loop").symlink_to("loop")
    # a file or a link loop where the target's directory goes: not "File exists", which mkdir says of them
    for target, fragment in ((tmp_path / "file" / "below", ": Not a directory"),
                             (tmp_path / "loop" / "below", ": Too many levels of symbolic links"),
                             (tmp_path / "file", "restore target is not a directory")):
        proc = crashkit.run_cli("restore", "-r", repo, "latest", "--target", str(target), ok=(2,))
        err = proc.stderr.decode().strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and str(target) in err[0], err
    # a symbolic link the user names is followed to its directory, as links above the target are
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    crashkit.run_cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "link"))
    assert (tmp_path / "real" / "f").read_bytes() == b"f" and (tmp_path / "link").is_symlink()
    (tmp_path / "dangling").symlink_to("nowhere")
    proc = crashkit.run_cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "dangling"), ok=(2,))
    assert "restore target is not a directory" in proc.stderr.decode()


def test_the_api_refuses_arguments_of_the_wrong_kind_with_one_clear_error(tmp_path, new_repo):
    """A tag or host of another type was stored and broke every listing; a bytes path was read in full and
    then not saved; "a,b" was one tag no filter could select; "" restored into the current directory."""
    from chunkvault import Repository

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    repo = new_repo()
    for bad in ({"tags": [5]}, {"tags": ["a,b"]}, {"tags": [""]}, {"host": 5}, {"excludes": [None]}, {"tags": 5}):
        with pytest.raises(UsageError):
            repo.backup([str(src)], **bad)
    with pytest.raises(UsageError):
        repo.backup(5)
    snap = repo.backup([os.fsencode(src)]).snapshot  # bytes and path objects name paths too
    assert snap.paths == [str(src)] and repo.backup([src]).snapshot.parent == snap.id
    for bad in ({"add": [5]}, {"add": ["x,y"]}, {"set_to": [None]}):
        with pytest.raises(UsageError):
            repo.tag([snap.id], **bad)
    for target in ("", None, 5):
        with pytest.raises(UsageError):
            repo.restore(snap.id, target, force=True, delete=True)
    for url in (5, None, ""):
        with pytest.raises(UsageError):
            Repository.open(url, "pw")
    with Repository.open(tmp_path / "repo0", "correct horse battery staple") as again:  # a path object
        assert [s.id for s in again.snapshots()][0] == snap.id
    assert [s.tags for s in repo.snapshots()] == [[], []]


def _reseal_snapshot(repo_path: str, change: Callable[[dict], None]) -> str:
    """The repository's one snapshot sealed again with the real key after ``change`` edited its JSON: what a
    writer holding the key, or an older build's bug, leaves for the decoder past the AEAD."""
    with Repository.open(repo_path, PASSWORD) as repo:
        sealer = repo._repo.sealer
    (sid,) = os.listdir(os.path.join(repo_path, "snapshots"))
    path = os.path.join(repo_path, "snapshots", sid)
    body = json.loads(zstandard.ZstdDecompressor().decompress(
        sealer.open(open(path, "rb").read(), SNAPSHOT_AD + sid.encode())))
    change(body)
    with open(path, "wb") as f:
        f.write(sealer.seal(zstandard.ZstdCompressor().compress(json.dumps(body).encode()), SNAPSHOT_AD + sid.encode()))
    return sid


@pytest.mark.parametrize("change", [
    lambda b: b["stats"].update(bytes=[1]), lambda b: b["stats"].update(files={"a": 1}),
    lambda b: b["stats"].update(bytes=None), lambda b: b["stats"].update(unreadable=7),
    lambda b: b["stats"].update(started_ns="x"), lambda b: b.update(manifest=["x"]),
], ids=["bytes-list", "files-dict", "bytes-null", "unreadable-int", "started-str", "manifest-not-hex"])
def test_a_sealed_snapshot_with_fields_of_the_wrong_kind_is_named_as_malformed(tmp_path, repo_path, change):
    """A snapshot whose stats held a list for its size made every `snapshots` an internal error (abs() of a
    list), and a manifest id that was not hex made ls and restore one (fromhex): both are malformed
    snapshots, named as such, and the listing shows the others."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    crashkit.run_cli("backup", "-r", repo_path, str(src), "-q")
    sid = _reseal_snapshot(repo_path, change)
    listing = crashkit.run_cli("snapshots", "-r", repo_path, "--no-cache", ok=(0, 13))
    for args in (("ls", sid), ("restore", sid, "--target", str(tmp_path / "out"))):
        proc = crashkit.run_cli(*args, "-r", repo_path, "--no-cache", ok=(13,))
        err = proc.stderr.decode()
        assert "internal error" not in err and f"snapshot {sid}" in err and "malformed" in err, err
    assert "internal error" not in listing.stderr.decode() and f"snapshot {sid}" in listing.stderr.decode()


@pytest.mark.parametrize("chunker", [7, {}, {"min_size": 1, "avg_size": 0, "max_size": 1}, "x"])
def test_a_sealed_config_with_chunker_settings_no_chunker_takes_is_named_damaged(repo_path, chunker):
    """Chunker settings sealed with the real key but missing or out of range made every command that opens
    the repository an internal error (the chunker's own ValueError): the config is named as damaged."""
    with Repository.open(repo_path, PASSWORD) as repo:
        sealer = repo._repo.sealer
    path = os.path.join(repo_path, "config")
    doc = json.loads(open(path, "rb").read())
    cfg = RepoConfig(doc["id"], doc["created"], Settings(chunker={}), doc["format"])
    settings = json.loads(sealer.open(base64.b64decode(doc["sealed"]), cfg.ad()))
    doc["sealed"] = base64.b64encode(sealer.seal(json.dumps({**settings, "chunker": chunker}).encode(),
                                                 cfg.ad())).decode()
    with open(path, "w") as f:
        json.dump(doc, f)
    for args in (("snapshots",), ("key", "list"), ("check",)):
        proc = crashkit.run_cli(*args, "-r", repo_path, "--no-cache", ok=(13,))
        err = proc.stderr.decode().strip()
        assert "internal error" not in err and len(err.splitlines()) == 1 and "config" in err, err


@pytest.mark.parametrize("length", [1, 27])
def test_an_index_entry_too_short_for_its_delta_envelope_names_the_blob(tmp_path, repo_path, length):
    """An index entry whose length cut a delta's envelope inside its base id made restore an internal error
    (a 26-byte "blob id" looked up as the base): the blob is named as damaged, the rest restored."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(300_000))
    (src / "db").write_bytes(data)
    crashkit.run_cli("backup", "-r", repo_path, str(src), "--fixed-chunks", "db", "-q")
    data[1000:1100] = bytes(100)
    (src / "db").write_bytes(data)
    (src / "other").write_text("kept")
    crashkit.run_cli("backup", "-r", repo_path, str(src), "--fixed-chunks", "db", "-q")
    with Repository.open(repo_path, PASSWORD) as repo:
        sealer = repo._repo.sealer
    index_dir = os.path.join(repo_path, "index")
    for name in os.listdir(index_dir):
        index = decode_index(sealer, open(os.path.join(index_dir, name), "rb").read(), name)
        cut = {pack: [e._replace(length=length) if e.kind == KIND_DELTA else e for e in entries]
               for pack, entries in index.packs.items()}
        if cut != index.packs:
            sealed = encode_index(sealer, IndexData(cut, index.supersedes))
            os.unlink(os.path.join(index_dir, name))
            with open(os.path.join(index_dir, content_name(sealed)), "wb") as f:
                f.write(sealed)
            break
    else:
        pytest.fail("the differential stored no delta")
    proc = crashkit.run_cli("restore", "latest", "-r", repo_path, "--no-cache", "--target", str(tmp_path / "out"),
                            ok=(13,))
    err = proc.stderr.decode()
    assert "internal error" not in err and "corrupt object blob" in err and "db" in err, err
    assert (tmp_path / "out" / "other").read_text() == "kept"


def _forge_full_manifest(repo_path: str, change: Callable[[list[Record]], list[Record]]) -> str:
    """The repository's one (full) snapshot stored again with ``change`` applied to its records, written
    with the real key: a manifest a writer holding it, or an older build's bug, could leave."""
    from chunkvault.store.manifest_io import store_manifest

    with Repository.open(repo_path, PASSWORD) as repo:
        (snap,) = repo.snapshots()
        ids, mw = store_manifest(repo.store, change(list(repo.store.tree(snap))))
        repo.store.save_snapshot(dataclasses.replace(snap, manifest=[i.hex() for i in ids],
                                                     manifest_starts=mw.starts), replace=True)
    return snap.id


def test_a_delete_record_in_a_full_manifest_is_named_as_damage(tmp_path, repo_path):
    """A full manifest holds ENTRY records only: a DELETE there made restore an internal error (an
    assertion); it is the manifest's damage, named with its snapshot."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    (src / "b").write_text("b")
    crashkit.run_cli("backup", "-r", repo_path, str(src), "-q")
    sid = _forge_full_manifest(repo_path, lambda rs: [Record(OP_DELETE, r.path, None) if r.path == b"a" else r
                                                       for r in rs])
    for args in (("restore", "latest", "--target", str(tmp_path / "out")), ("ls", "latest")):
        proc = crashkit.run_cli(*args, "-r", repo_path, "--no-cache", ok=(13,))
        err = proc.stderr.decode().strip()
        assert "internal error" not in err and f"manifest of snapshot {sid}" in err and "'a'" in err, err


def test_a_mode_beyond_the_permission_bits_is_restored_as_its_permission_bits(tmp_path, repo_path):
    """A record holds ``st_mode & 0o7777``; a larger one (forged, damaged) made restoring a directory, a
    link's target or a device an internal error (chmod's C int overflowed), where a file got its low bits."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    crashkit.run_cli("backup", "-r", repo_path, str(src), "-q")
    _forge_full_manifest(repo_path, lambda rs: [
        r if r.path != b"d" else Record(r.op, r.path, dataclasses.replace(r.entry, mode=0xFFFF0000 | 0o750)) for r in rs])
    crashkit.run_cli("restore", "latest", "-r", repo_path, "--no-cache", "--target", str(tmp_path / "out"))
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "d").st_mode) == 0o750
    assert (tmp_path / "out" / "d" / "f").read_text() == "f"


@pytest.mark.parametrize("kind", ["zstd", "dictionary delta", "block delta"])
def test_a_blob_recording_a_huge_length_is_refused_before_it_is_allocated(kind):
    """A sealed payload whose header records 1 GiB (a zstd frame of zeros is a few kilobytes) was decoded
    before its length met the index's: a restore or `check --read-data` ran out of memory.  The length its
    header records is checked against the indexed one first."""
    import tracemalloc

    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 30))
    bid, base_id = bytes(32), bytes([1]) * 32
    payload, env_kind = {"zstd": (bomb, KIND_ZSTD), "dictionary delta": (b"\0" + bomb, KIND_DELTA),
                         "block delta": (b"\1" + struct.pack("<I", 1 << 31) + b"\xff" * (1 << 18) + bomb, KIND_DELTA)}[kind]
    env = seal_blob(SEALER, bid, env_kind, payload, base_id if env_kind == KIND_DELTA else None)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptObject, match="!= indexed 4096"):
            open_blob(SEALER, bid, env, 4096, b"b" * 4096 if env_kind == KIND_DELTA else None)
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


def test_a_key_file_sealing_key_material_of_the_wrong_length_is_named(repo_path):
    """Key material of another length than 96 bytes, sealed under the password's key (a writer holding the
    password, or a bug): opening made every command an internal error; the key file is named instead."""
    repo_id = json.load(open(os.path.join(repo_path, "config")))["id"]
    keys = os.path.join(repo_path, "keys")
    (name,) = os.listdir(keys)
    doc = json.loads(open(os.path.join(keys, name), "rb").read())
    kek = KeyFile.decode(name, open(os.path.join(keys, name), "rb").read()).kek(PASSWORD.encode())
    doc["data"] = base64.b64encode(Sealer(kek).seal(os.urandom(64), KEY_AD + repo_id.encode())).decode()
    forged = json.dumps(doc).encode()
    os.unlink(os.path.join(keys, name))
    with open(os.path.join(keys, content_name(forged)[:32]), "wb") as f:
        f.write(forged)
    for args in (("snapshots",), ("key", "list")):
        err = crashkit.run_cli(*args, "-r", repo_path, "--no-cache", ok=(13,)).stderr.decode().strip()
        assert "internal error" not in err and len(err.splitlines()) == 1 and "key material is 64 bytes" in err, err
