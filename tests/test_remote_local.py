"""LocalRemote: the shared contract plus what only local disk can show."""
from __future__ import annotations

import errno
import mmap
import os
import re

import pytest

from chunkvault.errors import ObjectExists, PermissionDenied, StorageFull, UsageError
from chunkvault.remotes import open_remote
from chunkvault.remotes import local as local_module
from chunkvault.remotes.local import TEMP_PREFIX, LocalRemote

from remote_contract import check_remote_contract
from treeutil import mounted_fat


def _all_files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
    )


def test_contract(tmp_path):
    remote = LocalRemote(str(tmp_path / "repo"))
    check_remote_contract(remote)
    assert list(remote.temp_files()) == []


@pytest.mark.parametrize("name, said", [
    ("a" * 300, "the name aaaaaaaaaaaaaaaaaaaaaaaa... in it is longer than the file system takes (255 bytes)"),
    ("abcdefgh/" * 460, "is too long: its objects' paths would pass the 4096 bytes a path may have"),
    ("a\0b", "a local repository's path holds no NUL character"),
])
def test_a_path_no_file_system_holds_is_the_callers_mistake(tmp_path, name, said):
    """A name longer than the file system takes failed at the first object as the storage's failure (exit
    14, as for a disk gone), and a NUL in the path as Python's ValueError: both are a mistyped path."""
    with pytest.raises(UsageError, match=re.escape(said)):
        open_remote(str(tmp_path / name))
    assert os.listdir(tmp_path) == []


def test_contract_without_fsync(tmp_path):
    check_remote_contract(LocalRemote(str(tmp_path / "repo"), fsync=False), big_size=1 << 20)


def test_contract_with_python_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(local_module, "read_range", local_module.read_range_reference)
    check_remote_contract(LocalRemote(str(tmp_path / "repo")))


def test_ranges_read_in_c_as_in_python(tmp_path):
    """``read_range`` (one C call) against its Python reference: ranges inside, across and past the end,
    the whole file, empty files; the same error class for a missing file and a directory."""
    from chunkvault.remotes._fileio import read_range

    ref = local_module.read_range_reference
    for size in (0, 1, 100_000):
        p = str(tmp_path / f"f{size}")
        with open(p, "wb") as f:
            f.write(os.urandom(size))
        for start, length in ((0, -1), (0, 0), (0, 10), (size // 2, -1), (size - 1 if size else 0, 5),
                              (size + 10, 5), (size + 10, -1), (0, size), (3, size)):
            assert read_range(p, start, length) == ref(p, start, length), (size, start, length)
    for path, error in ((tmp_path / "missing", FileNotFoundError), (tmp_path, IsADirectoryError)):
        for length in (-1, 10):
            with pytest.raises(error):
                read_range(str(path), 0, length)
            with pytest.raises(error):
                ref(str(path), 0, length)


def test_no_temp_files_left_after_puts(tmp_path):
    remote = LocalRemote(str(tmp_path))
    remote.put("data/ab/" + "a" * 64, b"x" * 1000)
    remote.put("config", b"c")
    remote.put("config", b"cc")
    remote.put("snapshots/s1", b"s", if_absent=True)
    with pytest.raises(ObjectExists):
        remote.put("snapshots/s1", b"t", if_absent=True)
    assert _all_files(tmp_path) == sorted(
        [os.path.join("data", "ab", "a" * 64), "config", os.path.join("snapshots", "s1")]
    )
    assert list(remote.temp_files()) == []


@pytest.mark.parametrize("if_absent", [False, True])
def test_enospc_midway_leaves_nothing(tmp_path, monkeypatch, if_absent):
    remote = LocalRemote(str(tmp_path))
    remote.put("data/ab/keep", b"old")
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data) -> int:
        # The first write goes through partly; the next one finds the disk full.
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(StorageFull, match=f"no space left on device while writing data/ab/new in {tmp_path}$"):
        remote.put("data/ab/new", b"y" * 100_000, if_absent=if_absent)  # which repository: a copy has two
    with pytest.raises(StorageFull):
        remote.put("data/ab/keep", b"z" * 10)
    monkeypatch.undo()
    assert calls["n"] >= 2
    assert remote.stat("data/ab/new") is None
    assert remote.get("data/ab/keep") == b"old"
    assert list(remote.temp_files()) == []
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(tmp_path / "data" / "ab"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_permission_denied(tmp_path):
    remote = LocalRemote(str(tmp_path))
    remote.put("data/ab/x", b"1")
    os.chmod(tmp_path / "data" / "ab", 0o500)
    try:
        with pytest.raises(PermissionDenied):
            remote.put("data/ab/y", b"2")
    finally:
        os.chmod(tmp_path / "data" / "ab", 0o700)


def test_temp_files_are_not_listed(tmp_path):
    remote = LocalRemote(str(tmp_path))
    remote.put("data/ab/x", b"1")
    (tmp_path / "data" / "ab" / (TEMP_PREFIX + "deadbeef")).write_bytes(b"partial")
    assert [i.key for i in remote.list("")] == ["data/ab/x"]
    assert len(list(remote.temp_files())) == 1


@pytest.mark.parametrize(
    "url_of",
    [
        lambda p: str(p),
        lambda p: "file://" + str(p),
        lambda p: "file://localhost" + str(p),
        lambda p: "FILE://" + str(p),
    ],
)
def test_url_parsing(tmp_path, url_of):
    remote = open_remote(url_of(tmp_path))
    assert isinstance(remote, LocalRemote)
    assert remote.root == str(tmp_path)
    assert remote.display_url == str(tmp_path)


def test_file_url_percent_decoding(tmp_path):
    remote = open_remote("file://" + str(tmp_path) + "/with%20space")
    assert remote.root == str(tmp_path / "with space")
    remote.put("config", b"c")
    assert (tmp_path / "with space" / "config").read_bytes() == b"c"


@pytest.mark.parametrize("url", ["file://", "file://localhost", "FILE://"])
def test_a_file_url_without_a_path_is_refused_not_the_working_directory(url):
    with pytest.raises(UsageError, match="names no path"):
        open_remote(url)


def test_file_url_options(tmp_path):
    remote = open_remote("file://" + str(tmp_path), fsync=False)
    assert isinstance(remote, LocalRemote) and remote.fsync is False
    # the words -o takes, from the API too: "no" was refused with "takes yes or no, not 'no'"
    assert open_remote(str(tmp_path), fsync="no").fsync is False
    assert open_remote(str(tmp_path), direct_io="yes").direct_io is True


@pytest.mark.parametrize("tail", ["?x", "#frag", "?", "/sub?fsync=no"])
def test_a_file_url_with_a_query_or_fragment_is_refused_not_dropped(tmp_path, tail):
    """file:///srv/repo?x opened /srv/repo, the rest of the URL silently dropped, where s3:// and http://
    URLs refuse it; a directory whose name holds '?' is reached percent-encoded or as a plain path."""
    with pytest.raises(UsageError, match=r"file:// URL takes no query or fragment"):
        open_remote("file://" + str(tmp_path) + tail)
    assert open_remote("file://" + str(tmp_path) + "/a%3Fb").root == str(tmp_path / "a?b")
    assert open_remote(str(tmp_path) + "/a?b").root == str(tmp_path / "a?b")


def test_file_url_with_foreign_host_is_refused(tmp_path):
    with pytest.raises(UsageError, match="local path"):
        open_remote("file://otherhost" + str(tmp_path))


def test_bad_urls():
    with pytest.raises(UsageError):
        open_remote("")
    with pytest.raises(UsageError, match="unsupported"):
        open_remote("gopher://x/y")


def test_a_file_where_the_repository_should_be(tmp_path, cli):
    """Reads find nothing there (no repository), writes say which path lies below a file."""
    from chunkvault.errors import ObjectNotFound, RemoteError

    (tmp_path / "f").write_text("not a directory")
    remote = LocalRemote(str(tmp_path / "f"))
    with pytest.raises(ObjectNotFound):
        remote.get("config")
    assert remote.stat("config") is None
    remote.delete("keys/x")
    with pytest.raises(RemoteError, match=f"{tmp_path}/f/keys lies below a file"):
        remote.put("keys/x", b"data")
    said = cli("snapshots", "-r", str(tmp_path / "f"), check=10).stderr.decode().strip()
    assert said == f"chunkvault: no repository at {tmp_path}/f"
    assert b"lies below a file" in cli("init", "-r", str(tmp_path / "f"), "--kdf-time", "0", check=14).stderr


def test_file_url_option_errors(tmp_path):
    assert open_remote(str(tmp_path), direct_io=False).direct_io is False
    with pytest.raises(UsageError, match="unknown option 'speed'"):
        open_remote(str(tmp_path), speed=True)
    with pytest.raises(UsageError, match="yes or no"):
        open_remote(str(tmp_path), fsync="sometimes")


# --- large objects past the page cache (O_DIRECT) -----------------------------------------

LARGE_SIZES = [1 << 20, (1 << 20) + 1, (3 << 20) + 4095, (2 << 20) + 4096]


def _aligned(data: bytes) -> memoryview:
    """``data`` in a page-aligned buffer, as the backup's pack buffers are."""
    buf = mmap.mmap(-1, len(data) + 4096)
    buf[: len(data)] = data
    return memoryview(buf)[: len(data)]


def _direct_on(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & local_module._O_DIRECT)


def _direct_switches(monkeypatch) -> list[bool]:
    """Record each time a put turns O_DIRECT on or off (the real switch still runs)."""
    seen: list[bool] = []
    real = local_module._set_direct

    def spy(fd: int, on: bool) -> None:
        seen.append(on)
        real(fd, on)

    monkeypatch.setattr(local_module, "_set_direct", spy)
    return seen


@pytest.mark.skipif(not local_module._O_DIRECT, reason="O_DIRECT is used on Linux only")
@pytest.mark.parametrize("size", LARGE_SIZES)
def test_large_aligned_objects_written_directly_round_trip(tmp_path, monkeypatch, size):
    seen = _direct_switches(monkeypatch)
    remote = LocalRemote(str(tmp_path))
    data = os.urandom(size)
    remote.put("data/p" + str(size), _aligned(data), if_absent=True)
    assert remote.get("data/p" + str(size)) == data
    assert seen == [True, False]  # on for the aligned head, off before the tail and for later writes
    assert list(remote.temp_files()) == []


@pytest.mark.parametrize("size", LARGE_SIZES)
def test_unaligned_buffers_small_objects_and_disabled_direct_io_still_write(tmp_path, monkeypatch, size):
    seen = _direct_switches(monkeypatch)
    data = os.urandom(size + 1)
    unaligned = memoryview(data)[1:]  # a bytes object's data never starts at a page boundary
    LocalRemote(str(tmp_path)).put("a", unaligned)
    LocalRemote(str(tmp_path), direct_io=False).put("b", _aligned(data[1:]))
    LocalRemote(str(tmp_path)).put("c", data[: 1 << 19])
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == data[1:]
    assert (tmp_path / "c").read_bytes() == data[: 1 << 19]
    assert seen in ([True, False], [])  # only "a" tries it, and gets the ordinary write


@pytest.mark.skipif(not local_module._O_DIRECT, reason="O_DIRECT is used on Linux only")
def test_file_system_refusing_direct_writes_gets_ordinary_ones(tmp_path, monkeypatch):
    """A file system without O_DIRECT (EINVAL from fcntl or from the first write): the whole object is
    written through the page cache instead, nothing lost or doubled."""
    real_write = os.write
    state = {"refused": 0}

    def refusing_write(fd, data):
        if _direct_on(fd):
            state["refused"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(local_module.os, "write", refusing_write)
    remote = LocalRemote(str(tmp_path))
    data = os.urandom((2 << 20) + 100)
    remote.put("data/x", _aligned(data))
    assert state["refused"] == 1
    assert remote.get("data/x") == data

    def refusing_switch(fd, on):
        if on:
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(local_module, "_set_direct", refusing_switch)
    remote.put("data/y", _aligned(data))
    assert remote.get("data/y") == data


@pytest.mark.skipif(not local_module._O_DIRECT, reason="O_DIRECT is used on Linux only")
def test_disk_full_during_a_direct_write_is_reported_and_leaves_no_temp_file(tmp_path, monkeypatch):
    real_write = os.write

    def full_write(fd, data):
        if _direct_on(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(local_module.os, "write", full_write)
    remote = LocalRemote(str(tmp_path))
    with pytest.raises(StorageFull):
        remote.put("data/x", _aligned(os.urandom(2 << 20)))
    assert list(remote.temp_files()) == [] and remote.stat("data/x") is None


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
def test_large_aligned_object_on_tmpfs(monkeypatch):
    """tmpfs took no O_DIRECT before Linux 6.6: either way the object arrives whole."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        remote = LocalRemote(d)
        data = os.urandom((1 << 20) + 12345)
        remote.put("data/t", _aligned(data))
        assert remote.get("data/t") == data


def test_an_exclusive_lock_takes_the_reserve_on_a_full_disk_and_nothing_else_does(tmp_path, monkeypatch):
    """The reserve is what lets forget and prune lock a full repository: a pack must not eat it, nor a
    backup's shared lock (the backup then filled the freed space with data)."""
    remote = LocalRemote(str(tmp_path))
    remote.put("locks/a", b"lock")
    remote.delete("locks/a")  # a command ends: the reserve is made
    reserve = tmp_path / local_module.RESERVE_NAME
    assert reserve.stat().st_size == local_module.RESERVE_SIZE
    assert [i.key for i in remote.list()] == []  # no object: its name is no key
    real_write_all = local_module._write_all

    def full_while_reserved(fd, view):  # the disk: full until the reserve is gone
        if reserve.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, view)

    monkeypatch.setattr(local_module, "_write_all", full_while_reserved)
    with pytest.raises(StorageFull):
        remote.put("data/ab/pack", b"p" * 5000)
    with pytest.raises(StorageFull):
        remote.put("snapshots/s", b"s")
    with pytest.raises(StorageFull):
        remote.put("locks/" + "c" * 32, b"a shared lock")
    assert reserve.exists()
    remote.put("locks/x-b", b"lock")
    assert not reserve.exists() and remote.get("locks/x-b") == b"lock"
    monkeypatch.undo()
    remote.delete("locks/x-b")
    assert reserve.stat().st_size == local_module.RESERVE_SIZE  # put back once there is room
    assert list(remote.temp_files()) == []


def test_under_an_exclusive_lock_what_a_full_disk_refuses_takes_the_reserve(tmp_path, monkeypatch):
    """A prune on a nearly full disk locked it with room to spare, then failed writing its index, every
    time: the reserve went only to the lock.  Under its lock, the index takes the reserve; a stream (the
    service's large uploads), which cannot be sent again, takes it first where the disk lacks room."""
    remote = LocalRemote(str(tmp_path))
    remote.put("locks/a", b"lock")
    remote.delete("locks/a")
    reserve = tmp_path / local_module.RESERVE_NAME
    real_write_all = local_module._write_all
    full = {"on": False}

    def full_while_reserved(fd, view):  # the disk: full once the lock is in, until the reserve is gone
        if full["on"] and reserve.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, view)

    monkeypatch.setattr(local_module, "_write_all", full_while_reserved)
    remote.put("locks/x-prune", b"lock")
    assert reserve.exists()
    full["on"] = True
    remote.put("index/" + "1" * 64, b"the new index")
    assert not reserve.exists() and remote.get("index/" + "1" * 64) == b"the new index"
    remote.delete("locks/x-prune")
    assert reserve.exists()  # put back when the command ends (the fake disk has room again now)
    with pytest.raises(StorageFull):  # no exclusive lock held: a backup's index does not take it
        remote.put("index/" + "2" * 64, b"a backup's index")
    assert reserve.exists()
    remote.put("locks/x-prune2", b"lock")
    monkeypatch.setattr(remote, "_free_bytes", lambda: 4096)
    pieces = iter([b"s" * 1000, b""])
    assert remote.put_stream("index/" + "3" * 64, lambda n: next(pieces), 1000)
    assert not reserve.exists()


def test_a_disk_too_full_for_the_reserve_is_no_error(tmp_path, monkeypatch):
    remote = LocalRemote(str(tmp_path))
    remote.put("locks/a", b"lock")

    def full(fd, view):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(local_module, "_write_all", full)
    remote.delete("locks/a")
    monkeypatch.undo()
    assert not (tmp_path / local_module.RESERVE_NAME).exists() and list(remote.temp_files()) == []
    remote.put("locks/b", b"lock")
    remote.delete("locks/b")  # tried again by the next command's end
    assert (tmp_path / local_module.RESERVE_NAME).exists()


def test_objects_below_a_directory_that_is_a_link_are_listed(tmp_path):
    """data/ab moved to another disk and linked: writes went there, listings skipped it, and check then
    called every pack in it missing (its advice, `repair index`, would have dropped them)."""
    remote = LocalRemote(str(tmp_path / "repo"))
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "ab").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(tmp_path / "repo" / "data")  # a loop is walked once
    keys = ["data/ab/" + "ab" * 32, "data/cd/" + "cd" * 32]
    for key in keys:
        remote.put(key, b"pack")
    assert (elsewhere / ("ab" * 32)).read_bytes() == b"pack"
    assert sorted(o.key for o in remote.list("data/")) == keys
    assert [o.key for o in remote.list("data/ab/")] == keys[:1]
    # so are the temp files of uploads cut short there: never swept, they stayed on the other disk for good
    left = elsewhere / (local_module.TEMP_PREFIX + "0123456789abcdef")
    left.write_bytes(b"half a pack")
    assert list(remote.temp_files()) == [str(tmp_path / "repo" / "data" / "ab" / left.name)]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_repository_directory_that_cannot_be_made_is_named():
    """`init -r /proc/x` said only "writing keys/...: No such file or directory"."""
    from chunkvault.errors import RemoteError

    with pytest.raises(RemoteError, match="^writing config: No such file or directory: /proc/chunkvault-test$"):
        LocalRemote("/proc/chunkvault-test").put("config", b"x")


def test_a_stream_that_stops_short_stores_nothing_and_one_under_way_survives_a_cleanup(tmp_path):
    """`serve` hands an upload over as it arrives: a client that stopped mid-PUT must leave no object (a
    truncated pack indexed by nobody, read by a later import), and a prune's sweep of old temp files must
    not take the file an upload is writing."""
    remote = LocalRemote(str(tmp_path))
    key = "data/ab/" + "ab" * 32
    pieces = [b"x" * 1000]
    assert remote.put_stream(key, lambda n: pieces.pop() if pieces else b"", 5000) is False
    assert remote.stat(key) is None and list(remote.temp_files()) == []
    swept = []
    pieces = [b"a" * 10, b"b" * 10]

    def read(n: int) -> bytes:
        if len(pieces) == 1:
            swept.append(remote.cleanup_temp(older_than=0))  # a prune meanwhile, every temp file "old"
        return pieces.pop(0)

    assert remote.put_stream(key, read, 20) is True
    assert swept == [0] and remote.get(key) == b"a" * 10 + b"b" * 10


def test_an_object_s_bytes_are_synced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """What a crash right after the rename must not leave: the name pointing at bytes never written out."""
    remote = LocalRemote(str(tmp_path))
    events = []
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", lambda a, b, **k: (events.append(("rename", a)), real_rename(a, b, **k))[1])
    monkeypatch.setattr(os, "replace", lambda a, b, **k: (events.append(("rename", a)), real_rename(a, b, **k))[1])
    monkeypatch.setattr(os, "link", lambda a, b, **k: (events.append(("rename", a)), real_link(a, b, **k))[1])
    for if_absent in (False, True):
        events.clear()
        remote.put(f"data/cd/{'cd' * 31}{if_absent:02}", b"y" * 100, if_absent=if_absent)
        (moved,) = [path for what, path in events if what == "rename"]
        synced = [path for what, path in events if what == "fsync"]
        assert synced[0] == moved and events.index(("fsync", moved)) < events.index(("rename", moved))
        assert os.path.dirname(moved) in synced[1:]  # and the directory after


@pytest.mark.parametrize("kind", ["vfat", "exfat"])
def test_a_repository_on_a_file_system_without_hard_links(tmp_path, cli, kind):
    """A repository on a USB disk (FAT, exFAT): link(), which stores an object only where none is, is
    refused there (EPERM), and `init` failed with 'permission denied while writing keys/...'.  Such an
    object is now renamed into place without replacing one; backups, a check and a prune run there, and
    an object already stored is still refused."""
    mnt = tmp_path / "usb"
    mnt.mkdir()
    with mounted_fat(str(mnt), kind):
        remote = LocalRemote(str(mnt / "bare"))
        remote.put("keys/k1", b"first", if_absent=True)
        with pytest.raises(ObjectExists):
            remote.put("keys/k1", b"second", if_absent=True)
        assert remote.get("keys/k1") == b"first" and list(remote.temp_files()) == []
        repo = str(mnt / "repo")
        src = tmp_path / "src"
        src.mkdir()
        (src / "a").write_bytes(os.urandom(50_000))
        cli("init", "-r", repo, "--kdf-time", "0")
        cli("backup", "-r", repo, str(src))
        (src / "b").write_bytes(b"more")
        cli("backup", "-r", repo, str(src))
        cli("forget", "-r", repo, "--keep-last", "1", "--prune")
        assert b"no problems" in cli("check", "-r", repo, "--read-data").stdout
        cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "back"))
        assert (tmp_path / "back" / "a").read_bytes() == (src / "a").read_bytes()
