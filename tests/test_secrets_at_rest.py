"""What chunkvault leaves outside the repository: the files and directories it makes on this machine (the
cache, the ledger, the key kept ahead) are this user's alone whatever the umask, and no secret is written
where another user reads it (PostgreSQL's restore_command)."""
import os
import stat
from contextlib import contextmanager

import pytest


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes_below(top) -> dict[str, int]:
    """Each path under ``top`` (itself too), relative to it, with its permission bits."""
    found = {".": stat.S_IMODE(os.lstat(top).st_mode)}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, top)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_private_dirs_made_0700_to_the_top(tmp_path, mask):
    from chunkvault.localfiles import make_private_dirs

    with umask(mask):
        make_private_dirs(str(tmp_path / "a" / "b" / "c"))
        make_private_dirs(str(tmp_path / "a" / "b" / "c"))  # there already: nothing to do
    assert modes_below(tmp_path / "a") == {".": 0o700, "b": 0o700, "b/c": 0o700}


def test_private_dirs_leave_existing_ones_and_refuse_a_file(tmp_path):
    from chunkvault.localfiles import make_private_dirs

    (tmp_path / "shared").mkdir(mode=0o755)
    os.chmod(tmp_path / "shared", 0o755)
    make_private_dirs(str(tmp_path / "shared" / "mine"))
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "shared" / "mine").st_mode) == 0o700
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError):
        make_private_dirs(str(tmp_path / "file" / "below"))


@pytest.mark.parametrize("mask", [0o000, 0o022])
def test_cache_entries_and_directories_are_private(tmp_path, mask):
    """The cache holds copies of index, snapshot and key objects, which the repository stores 0600: under a
    permissive umask they were 0666 in 0777 directories."""
    from chunkvault.remotes.layer import CachingRemote
    from chunkvault.remotes.local import LocalRemote

    inner = LocalRemote(str(tmp_path / "repo"))
    cache = tmp_path / "home" / "cache" / "chunkvault" / "abc"
    with umask(mask):
        remote = CachingRemote(inner, cache)
        remote.put("index/" + "ab" * 32, b"sealed index")
        inner.put("snapshots/" + "cd" * 32, b"sealed snapshot")
        list(remote.list("snapshots/"))
        assert remote.get("snapshots/" + "cd" * 32) == b"sealed snapshot"
        assert remote.get("index/" + "ab" * 32) == b"sealed index"
    made = modes_below(tmp_path / "home")
    assert "cache/chunkvault/abc/index/" + "ab" * 32 in made
    assert "cache/chunkvault/abc/snapshots/" + "cd" * 32 in made
    for path, mode in made.items():
        wanted = 0o700 if os.path.isdir(tmp_path / "home" / path) else 0o600
        assert mode == wanted, (path, oct(mode))


def test_cache_base_and_key_ahead_are_private(tmp_path, monkeypatch):
    """The default cache's directories ($XDG_CACHE_HOME made too, as the XDG rules ask: 0700) and the key
    file kept ahead; a world-writable directory above would let another user put their own cache in."""
    from chunkvault import Repository

    monkeypatch.delenv("CHUNKVAULT_CACHE_DIR", raising=False)
    monkeypatch.delenv("CHUNKVAULT_NO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg" / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg" / "state"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"plain")
    with umask(0):
        with Repository.init(f"file://{tmp_path / 'repo'}", "pw", kdf_seconds=0) as repo:
            repo.backup([str(src)])
        from chunkvault.connection import cache_base, key_ahead_path
        from chunkvault.store.keyahead import KeyAhead

        base = cache_base()
        KeyAhead(key_ahead_path("sftp://h/x"), b"pw").remember(b"wrapped key file")
    assert base == str(tmp_path / "xdg" / "cache" / "chunkvault")
    for path, mode in modes_below(tmp_path / "xdg").items():
        full = tmp_path / "xdg" / path
        if os.path.isdir(full):
            assert mode == 0o700, (path, oct(mode))
        elif path.endswith("CACHEDIR.TAG"):
            continue  # the tag says what the directory is, nothing of the repository
        else:
            assert mode == 0o600, (path, oct(mode))
    assert any("key-ahead" in p for p in modes_below(tmp_path / "xdg"))
    assert any("ledger" in p for p in modes_below(tmp_path / "xdg"))
