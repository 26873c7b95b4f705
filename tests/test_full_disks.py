"""Full disks, made with a real small tmpfs, where chunkvault writes outside the repository's data: a generated
key secret, the key files a password change writes, a dump's standard output, the local cache, the client state (the snapshot ledger), the temp
directory a ``verify-restore --then`` command writes its output to, and a policy's lock file.  Each ends with one line naming what is full and the exit code the README gives,
loses nothing, and the next run once space is freed finishes.  Skipped where no tmpfs can be mounted."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import PASSWORD
from treeutil import mounted_tmpfs


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk."""
    path = tmp_path / "disk"
    path.mkdir()
    with mounted_tmpfs(str(path), "1m"):
        yield path


def fill(directory, leave: int = 0):
    """Fill the file system of ``directory`` up to ``leave`` bytes; returns the filler (remove it to free)."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for block in (1 << 16, 4096):
            try:
                while True:
                    os.write(fd, b"x" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)
    return path


def one_line(proc) -> str:
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def test_a_generated_secret_finding_no_room_is_a_storage_failure(tmp_path, cli, small_disk):
    """``init`` / ``key add --generate-secret`` into a full disk: exit 14 and a line naming the secret file, as a
    key export says (it was a usage error, exit 2, as for a mistyped path); no secret file left, no repository
    made, no key added."""
    repo = str(tmp_path / "repo")
    filler = fill(small_disk)
    secret = small_disk / "secret"
    err = one_line(cli("init", "-r", repo, "--kdf-time", "0", "--generate-secret", str(secret), password=None,
                       check=14))
    assert "no space left" in err and str(secret) in err
    assert not secret.exists() and not os.path.exists(repo)
    cli("init", "-r", repo, "--kdf-time", "0", "-q")
    err = one_line(cli("key", "add", "-r", repo, "--kdf-time", "0", "--generate-secret", str(secret), check=14))
    assert "no space left" in err and str(secret) in err and not secret.exists()
    assert len(json.loads(cli("key", "list", "-r", repo, "--json").stdout)) == 1
    filler.unlink()
    cli("key", "add", "-r", repo, "--kdf-time", "0", "--generate-secret", str(secret), "-q")
    cli("snapshots", "-r", repo, "--password-file", str(secret), "-q", password=None)


def test_a_password_change_on_a_full_repository_disk_leaves_one_password_that_opens(tmp_path, cli):
    """``key passwd`` where the repository's disk (its reserve used up) has room for the lock, or not even
    that: exit 14, the old password still opens; once freed, the change goes through and only the new one opens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    repo = disk / "repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(50_000))
    new = tmp_path / "new"
    new.write_text("the new password\n")
    with mounted_tmpfs(str(disk), "1m"):
        cli("init", "-r", str(repo), "--kdf-time", "0", "-q")
        cli("backup", "-r", str(repo), str(src), "-q")
        for leave in (0, 4096):
            (repo / ".reserve").unlink(missing_ok=True)
            filler = fill(disk, leave)
            err = one_line(cli("key", "passwd", "-r", str(repo), "--kdf-time", "0", "--new-password-file", str(new),
                               check=14))
            assert "no space left" in err and "the password is unchanged" in err
            cli("snapshots", "-r", str(repo), "-q")
            filler.unlink()
        cli("key", "passwd", "-r", str(repo), "--kdf-time", "0", "--new-password-file", str(new), "-q")
        cli("snapshots", "-r", str(repo), "-q", check=11)
        cli("check", "-r", str(repo), "--read-data", "-q", "--password-file", str(new), password=None)


def test_a_full_cache_or_state_directory_fails_no_backup_or_restore(tmp_path, cli, small_disk):
    """The cache is a copy: a full one is passed over in silence.  The ledger that cannot be written is said
    in one warning, and the next backup with room writes it."""
    repo = str(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    env = {"XDG_CACHE_HOME": str(small_disk / "cache"), "XDG_STATE_HOME": str(small_disk / "state")}
    cli("init", "-r", repo, "--kdf-time", "0", "-q", env=env)
    filler = fill(small_disk)
    proc = cli("backup", "-r", repo, str(src), "-q", env=env)
    assert "cannot write the ledger" in one_line(proc) and "No space left" in proc.stderr.decode()
    (src / "f0").write_bytes(os.urandom(1000))
    cli("backup", "-r", repo, str(src), "-q", env=env)
    cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "out"), "-q", env=env)
    assert all((tmp_path / "out" / n).read_bytes() == (src / n).read_bytes() for n in os.listdir(src))
    filler.unlink()
    assert cli("backup", "-r", repo, str(src), "-q", env=env).stderr == b""
    ledger = small_disk / "state" / "chunkvault" / "ledger"
    assert any(n.endswith(".json") and (ledger / n).stat().st_size > 0 for n in os.listdir(ledger))
    cli("check", "-r", repo, "--read-data", "-q", env=env)
    shutil.rmtree(tmp_path / "out")


def test_a_dump_cut_short_by_a_full_disk_says_it_is_incomplete(tmp_path, cli, small_disk):
    """What a dump wrote to standard output stays there: the line naming the full disk says the dump is
    incomplete, as a closed pipe's does (the words ``_stdout_errors("dump")`` gives were never reached: the
    write's own error came first)."""
    repo = str(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(200_000))
    cli("init", "-r", repo, "--kdf-time", "0", "-q")
    cli("backup", "-r", repo, str(src), "-q")
    filler = fill(small_disk, 100_000)
    for path, archive in (("a", ()), ("/", ("--archive", "tar")), ("/", ("--archive", "zip"))):
        with open(small_disk / "out", "wb") as out:
            proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "dump", "-r", repo, "latest", path,
                                   *archive], stdout=out, stderr=subprocess.PIPE, env={**os.environ,
                                   "CHUNKVAULT_PASSWORD": PASSWORD}, timeout=300)
        assert proc.returncode == 14, proc.stderr
        assert one_line(proc).endswith("no space left on device while writing to standard output "
                                       "(the dump written there is incomplete)")
    filler.unlink()
    with open(small_disk / "out", "wb") as out:
        subprocess.run([sys.executable, "-m", "chunkvault.cli", "dump", "-r", repo, "latest", "a"], stdout=out,
                       env={**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}, check=True, timeout=300)
    assert (small_disk / "out").read_bytes() == (src / "a").read_bytes()


def test_a_then_command_whose_output_fills_the_temp_directory_is_not_a_failed_verification(tmp_path, cli, small_disk):
    """``verify-restore --then``'s output goes to a file in the temp directory: a full one cuts it short, and a
    command that checks its writes (``cat``) fails for that.  Nothing is then known of the snapshot: exit 14
    naming the temp directory, as for a full scratch directory, not 18 (a verification that found problems);
    a command that failed on its own, with room for its output, still fails the verification."""
    repo = str(tmp_path / "repo")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    cli("init", "-r", repo, "--kdf-time", "0", "-q")
    cli("backup", "-r", repo, str(src), "-q")
    fill(small_disk, 8192)
    env = {"TMPDIR": str(small_disk)}
    scratch = ("--scratch", str(tmp_path))
    proc = cli("verify-restore", "-r", repo, "latest", *scratch, "--then", 'cat "$CHUNKVAULT_RESTORE_DIR/a"',
               "--json", env=env, check=14)
    report = json.loads(proc.stdout)["snapshots"][0]
    assert report["error_kind"] == "no_space" and report["command"]["output_full"], report
    assert str(small_disk) in report["error"] and "the command (exit 1)" in report["error"]
    assert "no space left in the scratch or temp directory" in proc.stderr.decode().splitlines()[-1]
    proc = cli("verify-restore", "-r", repo, "latest", *scratch, "--then", "echo checked; exit 3", "--json",
               env=env, check=18)
    report = json.loads(proc.stdout)["snapshots"][0]
    assert report["error_kind"] is None and not report["command"]["output_full"], report
    (small_disk / "filler").unlink()
    cli("verify-restore", "-r", repo, "latest", *scratch, "--then", 'cat "$CHUNKVAULT_RESTORE_DIR/a" >/dev/null',
        env=env)


def test_a_policy_lock_file_on_a_full_disk_still_locks_and_the_run_goes_on(tmp_path, cli, small_disk):
    """The pid written into a policy's lock file is for people; the flock is the lock: a full disk under it
    (an internal error before) leaves the file empty, and the run backs up all the same."""
    repo = tmp_path / "repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    cli("init", "-r", str(repo), "--kdf-time", "0", "-q")
    policy = tmp_path / "p.toml"
    policy.write_text(f'repository = "{repo}"\nfull = "@daily"\nlock-file = "{small_disk}/p.lock"\n'
                      f'state-file = "{tmp_path}/p.state"\n[[source]]\nname = "s"\npaths = ["{src}"]\n')
    (small_disk / "p.lock").touch()
    fill(small_disk)
    proc = cli("run", "-c", str(policy), "--json")
    assert json.loads(proc.stdout)["sources"][0]["snapshot"], proc.stdout
    assert (small_disk / "p.lock").read_bytes() == b""


def test_a_hook_whose_output_filled_the_temp_directory_says_so(tmp_path, small_disk, monkeypatch):
    """A pre hook's output goes to a file in the temp directory: a full one makes a hook that checks its
    writes fail for the disk, which its failure line now says instead of a bare exit code."""
    from chunkvault.scheduler import run_hook

    monkeypatch.setenv("TMPDIR", str(small_disk))
    monkeypatch.setattr("tempfile.tempdir", None)
    fill(small_disk, 4096)
    log: list[str] = []
    rc, error = run_hook("head -c 200000 /dev/zero | tr '\\0' x", dict(os.environ), str(tmp_path), 30, log.append,
                         "pre")
    assert rc != 0 and f"its output filled the temp directory {small_disk}" in error, error
    (small_disk / "filler").unlink()
    rc, error = run_hook("echo checked; exit 3", dict(os.environ), str(tmp_path), 30, log.append, "pre")
    assert (rc, error) == (3, "pre hook exited 3")
