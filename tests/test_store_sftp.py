"""The store over SFTP (a real sshd on 127.0.0.1): lifecycle, CLI, copy off-site."""
import os
from pathlib import Path

import pytest

from chunkvault import Repository
from chunkvault.errors import WrongPassword
from lifecycle_scenario import PASSWORD, count_snapshot_gets, run_lifecycle, run_rewritten_elsewhere
from servers_ssh import known_host_entry, sftp_repo, sshd  # noqa: F401
from treeutil import describe


def test_lifecycle_over_sftp(tmp_path, sftp_repo, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    run_lifecycle(sftp_repo.url, tmp_path, **sftp_repo.options)


def test_a_second_client_sees_snapshots_another_rewrote(tmp_path, sftp_repo, monkeypatch):
    """SFTP lists mtimes in whole seconds: every rewrite moves the object's mtime past the one it
    replaces, so a cache can still tell versions apart."""
    from chunkvault.remotes.sftp import SFTPRemote

    gets = count_snapshot_gets(monkeypatch, SFTPRemote)
    run_rewritten_elsewhere(sftp_repo.url, tmp_path, monkeypatch, gets, **sftp_repo.options)


def test_cli_backup_restore_check_over_sftp(tmp_path, sftp_repo, cli):
    env = {**sftp_repo.env, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 300_000)
    (src / "b").write_text("hello")
    cli("init", "-r", sftp_repo.url, "--kdf-time", "0", env=env)
    cli("backup", "-r", sftp_repo.url, str(src), env=env)
    (src / "b").write_text("changed")
    cli("backup", "-r", sftp_repo.url, str(src), env=env)
    cli("check", "-r", sftp_repo.url, "--read-data", env=env)
    cli("restore", "-r", sftp_repo.url, "latest", "--target", str(tmp_path / "out"), env=env)
    assert describe(tmp_path / "out") == describe(src)
    # without the host in known_hosts the command fails with one line and exit code 14
    bad = cli("snapshots", "-r", sftp_repo.url, env={**env, "CHUNKVAULT_SFTP_KNOWN_HOSTS": str(tmp_path / "none")},
              check=14)
    err = bad.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "unknown SSH host key" in err


def test_copy_to_an_off_site_repository(tmp_path, sftp_repo, new_repo, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    local = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 500_000)
    local.backup([str(src)])
    (src / "g").write_bytes(b"y" * 10)
    local.backup([str(src)])
    offsite = Repository.init(sftp_repo.url, "off-site password", kdf_seconds=0, copy_chunker_from=local,
                              **sftp_repo.options)
    assert len(local.copy_to(offsite).copied) == 2
    again = local.copy_to(offsite)
    assert not again.copied and again.blobs_sent == 0
    offsite.restore("latest", str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
    assert offsite.check(read_data=True).ok
    offsite.close()


def test_cli_remote_options_accept_a_new_host(tmp_path, sshd, sftp_repo, cli):
    known = tmp_path / "known_hosts"
    env = {"CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}
    opts = ["-o", f"sftp.key-file={sshd.user_key}", "-o", f"sftp.known-hosts={known}"]
    cli("init", "-r", sftp_repo.url, *opts, "--kdf-time", "0", env=env, check=14)
    assert not known.exists()
    cli("init", "-r", sftp_repo.url, *opts, "-o", "sftp.accept-new-host-key=yes", "--kdf-time", "0", env=env)
    assert sshd.host_pub.split()[1] in known_host_entry(str(known), sshd.port)
    out = cli("snapshots", "-r", sftp_repo.url, *opts, "--json", env=env)
    assert out.stdout.strip() == b"[]"


def test_cli_derives_the_key_while_connecting_and_a_wrong_password_still_fails(tmp_path, sftp_repo, cli):
    cache = tmp_path / "cache"
    env = {**sftp_repo.env, "CHUNKVAULT_CACHE_DIR": str(cache)}
    cli("init", "-r", sftp_repo.url, "--kdf-time", "0.05", env=env)
    cli("snapshots", "-r", sftp_repo.url, env=env)
    (kept,) = (cache / "key-ahead").iterdir()
    (key,) = (Path(sftp_repo.path) / "keys").iterdir()
    assert kept.read_bytes() == key.read_bytes()
    assert cli("snapshots", "-r", sftp_repo.url, "--json", env=env).stdout.strip() == b"[]"
    bad = cli("snapshots", "-r", sftp_repo.url, env=env, password="not it", check=11)
    assert len(bad.stderr.decode().strip().splitlines()) == 1
    assert kept.read_bytes() == key.read_bytes()


def test_api_derives_the_key_while_connecting_unless_told_to_keep_nothing(tmp_path, sftp_repo, monkeypatch,
                                                                         derivations):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(cache))
    Repository.init(sftp_repo.url, PASSWORD, kdf_seconds=0.05, **sftp_repo.options).close()
    assert not (cache / "key-ahead").exists() and len(derivations) == 1
    Repository.open(sftp_repo.url, PASSWORD, **sftp_repo.options).close()
    (kept,) = (cache / "key-ahead").iterdir()
    (key,) = (Path(sftp_repo.path) / "keys").iterdir()
    assert kept.read_bytes() == key.read_bytes() and len(derivations) == 2
    with Repository.open(sftp_repo.url, PASSWORD, **sftp_repo.options) as repo:  # derived ahead, used
        assert repo.snapshots() == []
    assert len(derivations) == 3
    with pytest.raises(WrongPassword):
        Repository.open(sftp_repo.url, "not it", **sftp_repo.options)
    assert kept.read_bytes() == key.read_bytes()
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "elsewhere"))
    Repository.open(sftp_repo.url, PASSWORD, cache=False, **sftp_repo.options).close()
    assert not (tmp_path / "elsewhere").exists()


def test_prune_removes_old_unfinished_uploads_through_the_retry_layer(tmp_path, sftp_repo, monkeypatch):
    """Prune's clean-up reaches the SFTP remote under the retry and cache layers: a temp file a killed
    upload left is removed once old, one in progress is not."""
    from chunkvault.remotes.sftp import TEMP_PREFIX

    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    repo = Repository.init(sftp_repo.url, PASSWORD, kdf_seconds=0, **sftp_repo.options)
    stale = Path(sftp_repo.path, "data", TEMP_PREFIX + "killed")
    fresh = Path(sftp_repo.path, "data", TEMP_PREFIX + "writing")
    for p in (stale, fresh):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half a pack")
    os.utime(stale, (0, 0))
    repo.prune()
    repo.close()
    assert not stale.exists() and fresh.exists()
