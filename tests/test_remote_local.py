"""LocalRemote: the shared contract plus what only local disk can show."""
from __future__ import annotations

import errno
import os

import pytest

from chunkvault.errors import PermissionDenied, StorageFull, UsageError
from chunkvault.remotes import open_remote
from chunkvault.remotes.local import TEMP_PREFIX, LocalRemote

from remote_contract import check_remote_contract


def _all_files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
    )


def test_contract(tmp_path):
    remote = LocalRemote(str(tmp_path / "repo"))
    check_remote_contract(remote)
    assert list(remote.temp_files()) == []


def test_contract_without_fsync(tmp_path):
    check_remote_contract(LocalRemote(str(tmp_path / "repo"), fsync=False), big_size=1 << 20)


def test_no_temp_files_left_after_puts(tmp_path):
    remote = LocalRemote(str(tmp_path))
    remote.put("data/ab/" + "a" * 64, b"x" * 1000)
    remote.put("config", b"c")
    remote.put("config", b"cc")
    remote.put("snapshots/s1", b"s", if_absent=True)
    with pytest.raises(Exception):
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
    with pytest.raises(StorageFull, match="no space left"):
        remote.put("data/ab/new", b"y" * 100_000, if_absent=if_absent)
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


def test_file_url_options(tmp_path):
    remote = open_remote("file://" + str(tmp_path), fsync=False)
    assert isinstance(remote, LocalRemote) and remote.fsync is False


def test_file_url_with_foreign_host_is_refused(tmp_path):
    with pytest.raises(UsageError, match="local path"):
        open_remote("file://otherhost" + str(tmp_path))


def test_bad_urls():
    with pytest.raises(UsageError):
        open_remote("")
    with pytest.raises(UsageError, match="unsupported"):
        open_remote("gopher://x/y")
