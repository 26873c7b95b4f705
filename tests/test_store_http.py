"""The store over ``chunkvault serve``: backup, restore, check; append-only clients cannot destroy backups."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from chunkvault import Repository
from lifecycle_scenario import count_snapshot_gets, run_rewritten_elsewhere
from servers_http import APPEND_TOKEN, FULL_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import describe


def make_tree(root, seed):
    root.mkdir()
    rnd = random.Random(seed)
    for i in range(5):
        (root / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 400_000)))
    (root / "shared").write_bytes(random.Random(0).randbytes(600_000))


def test_backup_restore_check_over_http(tmp_path, http_server, monkeypatch, password):
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    make_tree(src, 1)
    repo = Repository.init(http_server.url, password, kdf_seconds=0, pack_size=200_000, token=FULL_TOKEN)
    repo.backup([str(src)])
    (src / "f1").write_bytes(b"changed")
    repo.backup([str(src)])
    repo.close()
    repo = Repository.open(http_server.url, password, token=FULL_TOKEN)
    assert [s.kind for s in repo.snapshots()] == ["full", "diff"]
    out = tmp_path / "out"
    repo.restore("latest", str(out))
    assert describe(out) == describe(src)
    assert repo.check(read_data=True).ok
    repo.close()
    assert (http_server.path / "config").is_file()
    assert not list((http_server.path / "locks").glob("*"))


def _env(tmp_path, token: str) -> dict[str, str]:
    return {"CHUNKVAULT_HTTP_TOKEN": token, "CHUNKVAULT_CACHE_DIR": str(tmp_path / f"cache-{token[:6]}")}


def test_cli_over_http(tmp_path, http_server, cli):
    env = _env(tmp_path, FULL_TOKEN)
    src = tmp_path / "src"
    make_tree(src, 2)
    url = http_server.url
    cli("init", "-r", url, "--kdf-time", "0", "--pack-size", "200k", env=env)
    cli("backup", "-r", url, str(src), env=env)
    (src / "f0").write_bytes(b"new content")
    cli("backup", "-r", url, str(src), "--type", "diff", env=env)
    listing = json.loads(cli("snapshots", "-r", url, "--json", env=env).stdout)
    assert sorted(s["type"] for s in listing) == ["diff", "full"]
    cli("restore", "-r", url, "latest", "--target", str(tmp_path / "out"), env=env)
    assert describe(tmp_path / "out") == describe(src)
    cli("check", "-r", url, "--read-data", env=env)
    assert FULL_TOKEN not in http_server.log()


def test_append_only_token_backs_up_but_cannot_forget_or_prune(tmp_path, http_server, cli, password):
    url = http_server.url
    src = tmp_path / "src"
    make_tree(src, 3)
    cli("init", "-r", url, "--kdf-time", "0", "--pack-size", "200k", env=_env(tmp_path, FULL_TOKEN))
    cli("backup", "-r", url, str(src), env=_env(tmp_path, FULL_TOKEN))
    appender = _env(tmp_path, APPEND_TOKEN)
    (src / "f2").write_bytes(b"appended")
    cli("backup", "-r", url, str(src), env=appender)
    (src / "f3").write_bytes(b"appended again")
    cli("backup", "-r", url, str(src), "--type", "full", env=appender)
    assert not list((http_server.path / "locks").glob("*")), "a backup must remove its own lock"

    before = sorted(p.name for p in (http_server.path / "snapshots").iterdir())
    assert len(before) == 3

    def stored():
        return sorted(str(p.relative_to(http_server.path)) for p in http_server.path.rglob("*")
                      if p.is_file() and not p.name.startswith(".") and p.parts[-2] != "locks")

    # A full token forgets the first full: its packs, shared with the others, are now repacked by a prune.
    cli("forget", "-r", url, before[0], env=_env(tmp_path, FULL_TOKEN))
    before = sorted(p.name for p in (http_server.path / "snapshots").iterdir())
    objects = stored()
    for args in (("forget", "-r", url, "--keep-last", "1", "--prune"), ("forget", "-r", url, before[0]),
                 ("prune", "-r", url, "--max-unused", "0")):
        result = cli(*args, env=appender, check=14)
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "append-only" in lines[0], result.stderr
        assert APPEND_TOKEN not in lines[0]
        assert stored() == objects  # refused before anything was written: no repack, no rebased manifest
    keys = sorted(p.name for p in (http_server.path / "keys").iterdir())
    result = cli("key", "passwd", "-r", url, "--kdf-time", "0", env={**appender, "CHUNKVAULT_NEW_PASSWORD": "new one"},
                 check=14)  # it added the new key, then could not remove the old: both opened the repository
    assert "the password is unchanged" in result.stderr.decode()
    assert sorted(p.name for p in (http_server.path / "keys").iterdir()) == keys

    with Repository.open(url, password, token=FULL_TOKEN, cache=False) as repo:
        for snap in repo.snapshots():
            out = tmp_path / f"out-{snap.id}"
            repo.restore(snap.id, str(out))
            assert (out / "shared").read_bytes() == (src / "shared").read_bytes()
        assert repo.check(read_data=True).ok


def test_lifecycle_over_http(tmp_path, http_server, monkeypatch):
    from lifecycle_scenario import run_lifecycle

    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    run_lifecycle(http_server.url, tmp_path, token=FULL_TOKEN)


def test_a_second_client_sees_snapshots_another_rewrote(tmp_path, http_server, monkeypatch):  # noqa: F811
    from chunkvault.remotes.http import HTTPRemote

    gets = count_snapshot_gets(monkeypatch, HTTPRemote)
    run_rewritten_elsewhere(http_server.url, tmp_path, monkeypatch, gets, token=FULL_TOKEN)


def _cli_env(tmp_path) -> dict[str, str]:
    return {**os.environ, **_env(tmp_path, FULL_TOKEN), "CHUNKVAULT_PASSWORD": "pw"}


def _backup_started(tmp_path, http_server, cli, size: int, *flags: str) -> subprocess.Popen:
    """A new repository on the server and a backup of ``size`` random bytes into it, running (256k packs)."""
    cli("init", "-r", http_server.url, "--kdf-time", "0", "--pack-size", "256k", env=_cli_env(tmp_path), password="pw")
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(size).randbytes(size))
    return subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "backup", "-r", http_server.url, str(src),
                             *flags], env=_cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_backup_told_to_stop_while_the_server_stalls_exits_in_seconds(tmp_path, http_server, cli):
    """Ctrl-C waits for the uploads in flight; against a server that answers nothing they gave up only
    after 5 minutes of retries each, past any service manager's stop timeout."""
    backup = _backup_started(tmp_path, http_server, cli, 40_000_000, "-o", "http.read-timeout=2", "-o",
                             "http.connect-timeout=2", "--limit-upload", "2M")
    try:
        data = http_server.path / "data"
        while backup.poll() is None and not (data.is_dir() and any(data.rglob("*"))):
            time.sleep(0.05)
        http_server.proc.send_signal(signal.SIGSTOP)  # the kernel still accepts connections; nothing answers
        time.sleep(1.5)  # uploads under way, stalled
        backup.send_signal(signal.SIGINT)
        # Told to stop, attempts go on for 10 s (2 s each here): about 12 s.  Retrying as if not told,
        # 8 attempts per upload in flight, then the index and the lock: about 85 s.
        _, err = backup.communicate(timeout=60)
    finally:
        http_server.proc.send_signal(signal.SIGCONT)
        if backup.poll() is None:
            backup.kill()
            backup.wait()
    assert backup.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "chunkvault: interrupted"


@pytest.mark.slow
def test_a_backup_stopped_on_a_slow_link_still_indexes_what_it_stored_and_removes_its_lock(tmp_path, http_server,
                                                                                            cli):
    """The uploads under way take longer than the grace a stop leaves for retries: the remote answers all
    the while, so the index of the packs they stored and the lock's removal are still attempted, and the
    next backup sends none of those packs again."""
    chunks = ("--fixed-chunks", "big", "--fixed-chunk-size", "128k")
    backup = _backup_started(tmp_path, http_server, cli, 3_000_000, "--limit-upload", "24", *chunks)
    url, env, src = http_server.url, _cli_env(tmp_path), tmp_path / "src"
    time.sleep(3)  # two packs under way, about 20 s from done at 24 KiB/s
    backup.send_signal(signal.SIGINT)
    _, err = backup.communicate(timeout=120)
    assert backup.returncode == 130, err.decode()
    assert not list((http_server.path / "locks").glob("*")), "the lock was left"
    stored = [p for p in (http_server.path / "data").rglob("*") if p.is_file()]
    assert stored and list((http_server.path / "index").glob("*")), "the packs stored were not indexed"
    again = json.loads(cli("backup", "-r", url, str(src), *chunks, "--json", env=env, password="pw").stdout)
    assert again["stats"]["added_stored_bytes"] <= 3_000_000 - len(stored) * 200_000


@pytest.mark.slow
def test_a_backup_waits_out_a_restart_of_the_service(tmp_path, http_server, cli):
    """The service is away for longer than the retries of a remote that never answered (at most about 25 s of
    waits): the backup, which had reached it, waits for it to come back and completes."""
    backup = _backup_started(tmp_path, http_server, cli, 3_000_000, "--limit-upload", "200k",
                             "-o", "http.retry-time=120", "-o", "http.connect-timeout=2")
    url, env, src = http_server.url, _cli_env(tmp_path), tmp_path / "src"
    try:
        data = http_server.path / "data"
        while backup.poll() is None and not (data.is_dir() and any(p.is_file() for p in data.rglob("*"))):
            time.sleep(0.05)
        http_server.stop()
        time.sleep(35)
        http_server.start()  # on the same port
        _, err = backup.communicate(timeout=180)
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.wait()
    assert backup.returncode == 0, err.decode()
    assert "giving up after at least 2 min and 8 attempts" in err.decode()
    cli("restore", "-r", url, "latest", "--target", str(tmp_path / "out"), env=env, password="pw")
    [restored] = (tmp_path / "out").rglob("big")
    assert restored.read_bytes() == (src / "big").read_bytes()
    cli("check", "-r", url, "--read-data", env=env, password="pw")


def test_packs_fit_under_the_services_limit_on_object_size(tmp_path, serve_factory, monkeypatch, password):
    """A service with --max-object-size below the repository's 16 MiB packs: every backup of a large file
    failed at its first pack (exit 14); the packs are now made to fit."""
    from chunkvault.errors import RemoteError

    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    server = serve_factory("--max-object-size", "3M")
    assert "warning: --max-object-size of 3145728 bytes is below the 16 MiB packs" in server.log()
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(5).randbytes(12 << 20))
    with Repository.init(server.url, password, kdf_seconds=0) as repo:
        repo.backup([str(src)])
        assert repo.check(read_data=True).ok
        repo.restore("latest", str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
    packs = [p.stat().st_size for p in (server.path / "data").rglob("*") if p.is_file()]
    assert len(packs) >= 4 and max(packs) <= 3 << 20

    # a chunk that fits in no pack under the limit: said so, with the limit to raise
    small = serve_factory("--max-object-size", "1M")
    chunker = {"min_size": 1536 << 10, "avg_size": 2 << 20, "max_size": 4 << 20}
    with Repository.init(small.url, password, kdf_seconds=0, chunker=chunker) as repo:
        with pytest.raises(RemoteError, match="takes objects of at most 1048576 bytes, and a pack holding one "
                                              "chunk to store needs .*--max-object-size"):
            repo.backup([str(src)])


def _backed_up_with_a_cache(tmp_path, http_server, monkeypatch, password) -> None:
    """One backup through the service, a local cache in ``tmp_path``."""
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    make_tree(src, 3)
    with Repository.init(http_server.url, password, kdf_seconds=0, token=FULL_TOKEN) as repo:
        repo.backup([str(src)])


def test_the_local_cache_is_tagged_so_that_backups_leave_it_out(tmp_path, http_server, monkeypatch, password):
    """It holds the index, the snapshots and a key file: `backup --exclude-caches` of a home directory took
    them (restic and borg tag their caches)."""
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "a").write_text("a\n")
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(home / ".cache" / "chunkvault"))
    with Repository.init(http_server.url, password, kdf_seconds=0, token=FULL_TOKEN) as repo:
        repo.backup([str(home)], exclude_caches=True)
    with Repository.open(http_server.url, password, token=FULL_TOKEN) as repo:
        repo.backup([str(home)], exclude_caches=True)
        taken = [os.fsdecode(e.path) for e in repo.tree("latest")]
    assert list((home / ".cache" / "chunkvault").glob("*/snapshots/*"))  # the cache was there to take
    assert not [p for p in taken if p.startswith(".cache/chunkvault/") and p != ".cache/chunkvault/CACHEDIR.TAG"]
    assert "docs/a" in taken


def test_check_reads_the_stored_snapshot_objects_past_the_local_cache(tmp_path, http_server, monkeypatch, password):
    """A snapshot object is cached under its listed version (the file's mtime and inode): damage done in
    place (bit rot) changes neither, and check read the cached copy, or the one it had loaded, and said
    "no problems"."""
    _backed_up_with_a_cache(tmp_path, http_server, monkeypatch, password)
    with Repository.open(http_server.url, password, token=FULL_TOKEN) as repo:
        assert repo.check().ok  # the snapshot read, cached, and loaded
        (stored,) = (http_server.path / "snapshots").iterdir()
        st = stored.stat()
        with open(stored, "r+b") as f:
            f.seek(st.st_size // 2)
            byte = f.read(1)
            f.seek(st.st_size // 2)
            f.write(bytes([byte[0] ^ 1]))
        os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert f"snapshots/{stored.name}" in [p.object for p in repo.check().problems]
    with Repository.open(http_server.url, password, token=FULL_TOKEN) as repo:
        assert f"snapshots/{stored.name}" in [p.object for p in repo.check().problems]


def test_check_reads_the_stored_index_objects_past_the_local_cache(tmp_path, http_server, monkeypatch, password):
    """Index objects are named by their content and cached for good: check read the cached copy, and said
    "no problems" about a stored one damaged since."""
    _backed_up_with_a_cache(tmp_path, http_server, monkeypatch, password)
    with Repository.open(http_server.url, password, token=FULL_TOKEN) as repo:
        repo.restore("latest", str(tmp_path / "out"))  # the index objects read, and cached
        assert repo.check().ok
    (stored,) = (http_server.path / "index").iterdir()
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1
    stored.write_bytes(bytes(data))
    with Repository.open(http_server.url, password, token=FULL_TOKEN) as repo:
        assert f"index/{stored.name}" in [p.object for p in repo.check().problems]


def test_cache_dir_and_no_cache_on_the_command_line(tmp_path, http_server, cli):
    """``--cache-dir DIR`` keeps the cache there instead of CHUNKVAULT_CACHE_DIR's; ``--no-cache`` keeps none
    (each object read from the repository), with the same results; both at once is one usage error."""
    env = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "env-cache")}
    src = tmp_path / "src"
    make_tree(src, 2)
    url = http_server.url
    cli("init", "-r", url, "--kdf-time", "0", env=env)
    flag_cache = tmp_path / "flag-cache"
    cli("backup", "-r", url, str(src), "--cache-dir", str(flag_cache), env=env)
    assert any(p.is_file() for p in flag_cache.rglob("*"))
    before = sorted(str(p) for p in (tmp_path / "env-cache").rglob("*") if p.is_file())
    listed = cli("snapshots", "-r", url, "--json", "--no-cache", env=env).stdout
    assert len(json.loads(listed)) == 1
    cli("backup", "-r", url, str(src), "--no-cache", env=env)
    assert sorted(str(p) for p in (tmp_path / "env-cache").rglob("*") if p.is_file()) == before
    assert len(json.loads(cli("snapshots", "-r", url, "--json", env=env).stdout)) == 2
    said = cli("snapshots", "-r", url, "--cache-dir", "x", "--no-cache", env=env, check=2).stderr.decode().strip()
    assert said == "chunkvault: --cache-dir and --no-cache: give one"
    # the option wins over the environment: --cache-dir with CHUNKVAULT_NO_CACHE=1 set keeps a cache there
    flag_over_env = tmp_path / "flag-over-env"
    cli("snapshots", "-r", url, "--cache-dir", str(flag_over_env), env={**env, "CHUNKVAULT_NO_CACHE": "1"})
    assert any(p.is_file() for p in flag_over_env.rglob("*"))
    # a cache directory that cannot be one is said once, and the command goes on without a cache
    (tmp_path / "a-file").write_text("not a directory\n")
    for unusable in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        run = cli("snapshots", "-r", url, "--json", "--cache-dir", str(unusable), env=env)
        assert len(json.loads(run.stdout)) == 2
        said = run.stderr.decode()
        assert said.count(f"cache directory {unusable} is not a writable directory") == 1, said
