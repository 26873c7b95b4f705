"""Deriving a password's key while the remote connects (store/keyahead.py): one derivation, never a wrong key."""
from __future__ import annotations

import json
import os

import pytest

from chunkvault import Repository
from chunkvault.errors import WrongPassword
from chunkvault.remotes import open_remote
from chunkvault.store.config import KEY_FILE_LIMIT
from chunkvault.store.crypto import content_name
from chunkvault.store.keyahead import KeyAhead, forget
from chunkvault.store.unlock import unlock
from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401

PASSWORD = b"correct horse"


@pytest.fixture
def repo_dir(tmp_path):
    path = str(tmp_path / "repo")
    Repository.init(path, PASSWORD, kdf_seconds=0.01).close()
    return path


def key_file_bytes(path: str) -> bytes:
    (name,) = os.listdir(os.path.join(path, "keys"))
    with open(os.path.join(path, "keys", name), "rb") as f:
        return f.read()


def test_the_key_file_that_opened_is_remembered_and_derived_from_once_next_time(repo_dir, tmp_path, derivations):
    kept = str(tmp_path / "cache" / "key-ahead" / "x")
    remote = open_remote(repo_dir)
    first = unlock(remote, PASSWORD, KeyAhead.start(kept, PASSWORD))
    with open(kept, "rb") as f:
        assert f.read() == key_file_bytes(repo_dir)
    assert os.stat(kept).st_mode & 0o077 == 0
    assert len(derivations) == 1

    ahead = KeyAhead.start(kept, PASSWORD)
    second = unlock(remote, PASSWORD, ahead)
    assert len(derivations) == 2  # one more: the one made ahead, used by unlock
    assert second.material == first.material and second.key_name == first.key_name


def test_a_wrong_password_is_refused_without_deriving_twice(repo_dir, tmp_path, derivations):
    kept = str(tmp_path / "kept")
    remote = open_remote(repo_dir)
    unlock(remote, PASSWORD, KeyAhead.start(kept, PASSWORD))
    derivations.clear()
    with pytest.raises(WrongPassword):
        unlock(remote, b"wrong", KeyAhead.start(kept, b"wrong"))
    assert len(derivations) == 1


@pytest.mark.parametrize("planted", [b"", b"not a key file", b"{" * (KEY_FILE_LIMIT + 1), None])
def test_a_stale_or_planted_cache_costs_a_derivation_never_a_wrong_key(repo_dir, tmp_path, planted, derivations):
    kept = tmp_path / "kept"
    if planted is None:  # another repository's key file, valid but not this one's
        other = str(tmp_path / "other")
        Repository.init(other, PASSWORD, kdf_seconds=0.01).close()
        planted = key_file_bytes(other)
    kept.write_bytes(planted)
    derivations.clear()
    unlocked = unlock(open_remote(repo_dir), PASSWORD, KeyAhead.start(str(kept), PASSWORD))
    assert unlocked.material == unlock(open_remote(repo_dir), PASSWORD).material
    assert kept.read_bytes() == key_file_bytes(repo_dir)  # replaced by the one that opened


def test_an_unwritable_cache_only_loses_the_head_start(repo_dir, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    kept = str(tmp_path / "file" / "key-ahead" / "x")  # below a file: cannot be created
    unlock(open_remote(repo_dir), PASSWORD, KeyAhead.start(kept, PASSWORD))
    assert not os.path.exists(kept)


def test_a_fifo_in_the_kept_key_files_place_costs_the_head_start_not_a_hang(repo_dir, tmp_path):
    kept = tmp_path / "kept"
    os.mkfifo(kept)
    unlocked = unlock(open_remote(repo_dir), PASSWORD, KeyAhead.start(str(kept), PASSWORD))
    assert unlocked.material == unlock(open_remote(repo_dir), PASSWORD).material


def test_a_key_file_that_could_not_be_kept_leaves_no_temporary_file(repo_dir, tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()  # the rename onto it fails, after the temporary file was written
    unlock(open_remote(repo_dir), PASSWORD, KeyAhead.start(str(kept), PASSWORD))
    assert sorted(os.listdir(tmp_path)) == ["kept", "repo"]


def test_a_key_secret_is_not_kept(tmp_path):
    from chunkvault.store.crypto import new_secret

    secret = new_secret()
    path = str(tmp_path / "repo")
    Repository.init(path, secret).close()
    kept = str(tmp_path / "kept")
    unlock(open_remote(path), secret, KeyAhead.start(kept, secret))
    assert not os.path.exists(kept)


def kept_key_files(cache) -> list[bytes]:
    directory = cache / "key-ahead"
    return sorted(p.read_bytes() for p in directory.iterdir()) if directory.is_dir() else []


def test_key_passwd_and_key_remove_leave_no_copy_of_the_retired_key_on_this_machine(tmp_path, http_server, cli):
    """The key file that opened a repository off local disk is kept in the cache; after `key passwd` it
    was still there, opening the repository's key with the old password (perhaps leaked, which is why it
    was changed) until the next command replaced it.  `key remove` of a key kept so left it the same way."""
    cache = tmp_path / "cache"
    env = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(cache)}
    url = http_server.url
    keys = http_server.path / "keys"
    cli("init", "-r", url, "--kdf-time", "0", env=env)
    cli("snapshots", "-r", url, env=env)
    (old,) = [p.read_bytes() for p in keys.iterdir()]
    assert kept_key_files(cache) == [old]
    cli("key", "passwd", "-r", url, "--kdf-time", "0", env={**env, "CHUNKVAULT_NEW_PASSWORD": "new one"})
    assert old not in kept_key_files(cache)
    cli("snapshots", "-r", url, env=env, password="new one")
    (new,) = [p.read_bytes() for p in keys.iterdir()]
    assert kept_key_files(cache) == [new]

    second = json.loads(cli("key", "add", "-r", url, "--kdf-time", "0", "--json", password="new one",
                            env={**env, "CHUNKVAULT_NEW_PASSWORD": "second"}).stdout)["id"]
    other_url = url.rstrip("/")  # the same repository, kept under another location
    cli("snapshots", "-r", other_url, env=env, password="second")
    assert kept_key_files(cache) == sorted([new, (keys / second).read_bytes()])
    cli("key", "remove", "-r", url, second[:12], env=env, password="new one")
    assert kept_key_files(cache) == [new]


def test_forgetting_a_key_file_removes_every_copy_of_it_and_nothing_else(tmp_path):
    """A repository reached by two locations (URLs) is kept under each; other repositories' keys stay."""
    directory = tmp_path / "key-ahead"
    directory.mkdir()
    (directory / "a").write_bytes(b"retired")
    (directory / "b").write_bytes(b"retired")
    (directory / "c").write_bytes(b"another key")
    (directory / "d").mkdir()
    forget(str(directory), [content_name(b"retired")[:32]])
    assert sorted(os.listdir(directory)) == ["c", "d"]
    forget(str(tmp_path / "none"), [content_name(b"another key")[:32]])  # no cache: nothing to do
    forget(None, [content_name(b"another key")[:32]])
    assert (directory / "c").read_bytes() == b"another key"


def test_a_key_retired_by_another_machine_is_dropped_at_the_next_open(tmp_path, http_server, cli):
    """The machine that ran `key passwd` dropped its copy; every other machine kept the retired key file,
    opening the key with the old password, as long as no other key opened there since."""
    url = http_server.url
    machine_a = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "a")}
    machine_b = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "b")}
    cli("init", "-r", url, "--kdf-time", "0", env=machine_a)
    cli("snapshots", "-r", url, env=machine_a)
    (old,) = [p.read_bytes() for p in (http_server.path / "keys").iterdir()]
    assert kept_key_files(tmp_path / "a") == [old]
    cli("key", "passwd", "-r", url, "--kdf-time", "0", env={**machine_b, "CHUNKVAULT_NEW_PASSWORD": "new one"})
    cli("snapshots", "-r", url, env=machine_a, check=11)  # the old password, which opens nothing now
    assert kept_key_files(tmp_path / "a") == []


def test_writes_of_the_kept_key_file_killed_half_way_are_swept_once_stale(repo_dir, tmp_path):
    directory = tmp_path / "key-ahead"
    directory.mkdir()
    stale, fresh = directory / "x.123.tmp", directory / "x.456.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half a key file")
    os.utime(stale, (0, os.stat(stale).st_mtime - 7200))
    unlock(open_remote(repo_dir), PASSWORD, KeyAhead.start(str(directory / "x"), PASSWORD))
    assert sorted(os.listdir(directory)) == ["x", "x.456.tmp"]


def test_a_key_replaced_while_the_password_was_asked_for_still_opens_with_the_new_password(repo_dir):
    """The key files are listed with the config, before the prompt: a `key passwd` run meanwhile replaced
    the listed key under a new name, and the new password was refused as wrong."""
    from chunkvault.store.unlock import read_config_and_keys

    remote = open_remote(repo_dir)
    config, listed = read_config_and_keys(remote)
    with Repository.open(repo_dir, PASSWORD) as repo:
        repo.change_password("new password", kdf_seconds=0)
    assert listed != read_config_and_keys(remote)[1]
    assert unlock(remote, b"new password", config=config, key_names=listed).key_name not in listed
    with pytest.raises(WrongPassword):
        unlock(remote, PASSWORD, config=config, key_names=listed)


def test_the_key_derived_ahead_is_tried_before_cheaper_key_files_added_since(repo_dir, tmp_path, derivations):
    """Key files are tried cheapest first, and anyone who may add keys (an append-only client may) can add
    key files cheaper than the password's: each cost every opening a derivation before the key that opens
    (ten of them: 13 s a command).  The key derived ahead, which opened last time, is tried first."""
    from chunkvault.store.config import make_key_file

    kept = str(tmp_path / "kept")
    remote = open_remote(repo_dir)
    first = unlock(remote, PASSWORD, KeyAhead.start(kept, PASSWORD))
    own = json.loads(key_file_bytes(repo_dir))
    for i in range(3):
        _, data = make_key_file(first.material, b"added %d" % i, first.config.repo_id, kdf_seconds=0)
        data = json.dumps({**json.loads(data), "t": 1, "m": own["m"] // 2}).encode()
        remote.put(f"keys/{content_name(data)[:32]}", data)
    derivations.clear()
    second = unlock(remote, PASSWORD, KeyAhead.start(kept, PASSWORD))
    assert second.key_name == first.key_name
    assert len(derivations) == 1  # the one made ahead
