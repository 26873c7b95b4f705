"""backup --stdin-from-command: a dump is saved only when its command succeeded, and never outlives a failed backup."""
import json
import os
import signal
import time

import pytest

from chunker.params import ChunkerParams
from chunkvault import Repository
from chunkvault.errors import RemoteUnavailable, SourceCommandFailed
from chunkvault.remotes.local import LocalRemote
from conftest import PASSWORD
from faults import FaultyRemote


def emit(lines: int, then: str = "") -> list[str]:
    """A command printing ``lines`` numbered lines, then running the shell code ``then``."""
    return ["sh", "-c", f"seq 1 {lines}; {then}"]


def numbered(lines: int) -> bytes:
    return b"".join(b"%d\n" % i for i in range(1, lines + 1))


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its new parent has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except FileNotFoundError:
        return True


def test_output_is_stored_and_each_run_is_a_differential_of_the_last(new_repo):
    repo = new_repo()
    first = repo.backup_command(emit(2_000_000), "app.sql").snapshot
    second = repo.backup_command(emit(2_000_001), "app.sql", tags=["hourly"]).snapshot
    assert (first.kind, second.kind, second.parent) == ("full", "diff", first.id)
    assert second.stdin_name == "app.sql" and second.tags == ["hourly"]
    with repo.open_file(second, "app.sql") as f:
        assert f.read() == numbered(2_000_001)
    # Only the last chunk (at most the default 2 MiB) is new; the 14 MiB before it deduplicated.
    assert second.stats["added_raw_bytes"] <= ChunkerParams().max_size


@pytest.mark.parametrize("command, message", [
    (emit(50_000, "exit 3"), "`sh -c 'seq 1 50000; exit 3'` exited 3: no snapshot saved"),
    (emit(50_000, "exec >&-; sleep 0.2; exit 4"), "exited 4: no snapshot saved"),  # output closed before the exit
    (emit(10, "kill -9 $$"), "was killed by signal 9 (SIGKILL): no snapshot saved"),
    (["/nonexistent/pg_dump", "app"], "cannot run `/nonexistent/pg_dump app`: No such file or directory"),
])
def test_a_failed_command_saves_no_snapshot(new_repo, command, message):
    repo = new_repo()
    kept = repo.backup_command(emit(100), "app.sql").snapshot
    with pytest.raises(SourceCommandFailed) as e:
        repo.backup_command(command, "app.sql")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert [s.id for s in repo.snapshots()] == [kept.id]
    assert repo.check(read_data=True).ok
    assert repo.backup_command(emit(100), "app.sql").snapshot.parent == kept.id


def test_a_command_that_cannot_be_run_as_given_says_why(new_repo, tmp_path):
    import io

    from chunkvault.errors import UsageError

    repo = new_repo()
    with pytest.raises(SourceCommandFailed, match=f"cannot run `true` in {tmp_path / 'gone'}: No such file"):
        repo.backup_command(["true"], "x", cwd=str(tmp_path / "gone"))  # the directory is what is missing
    for argv, kwargs, message in ((["true"], {"stderr": io.BytesIO()}, "stderr must be a file with a descriptor"),
                                  ([5], {}, "are strings"), ([], {}, "a list of its program"), (["true"], {"env": {"A": 5}}, "cannot run")):
        with pytest.raises(UsageError, match=message):
            repo.backup_command(argv, "x", **kwargs)
    assert repo.snapshots() == []


def test_a_backup_that_fails_stops_its_command(tmp_path):
    """The repository goes away while a dump streams: the dump is stopped, not left writing to a dead pipe."""
    path = str(tmp_path / "repo")
    Repository.init(path, PASSWORD, kdf_seconds=0, pack_size=64 * 1024).close()
    faulty = FaultyRemote(LocalRemote(path), seed=1)
    repo = Repository.open(faulty, PASSWORD, ledger=False)
    faulty.fail_after = 10  # the lock, then some packs
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(RemoteUnavailable):
        repo.backup_command(["sh", "-c", f"echo $$ > {pidfile}; exec head -c 100000000 /dev/urandom"], "big.bin")
    assert gone(int(pidfile.read_text()))
    assert time.monotonic() - started < 60  # stopped long before its 100 MB were read
    assert Repository.open(path, PASSWORD, ledger=False).snapshots() == []


def test_the_command_gets_the_environment_without_chunkvault_s_passwords(new_repo, monkeypatch, tmp_path):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", "repository secret")
    monkeypatch.setenv("CHUNKVAULT_TO_PASSWORD", "other secret")
    monkeypatch.setenv("PGPASSWORD", "the database's own")
    monkeypatch.setenv("CHUNKVAULT_HTTP_TOKEN", "the backup server's")  # it had been backed up with the output
    monkeypatch.setenv("CHUNKVAULT_HTTP_TOKEN_FILE", "/where/it/lies")
    repo = new_repo()
    shown = ('echo "${CHUNKVAULT_PASSWORD:-none} ${CHUNKVAULT_TO_PASSWORD:-none} ${CHUNKVAULT_HTTP_TOKEN:-none} '
             '${CHUNKVAULT_HTTP_TOKEN_FILE:-none} $PGPASSWORD $(pwd)"')
    snap = repo.backup_command(["sh", "-c", shown], "env.txt", cwd=str(tmp_path)).snapshot
    with repo.open_file(snap, "env.txt") as f:
        assert f.read() == f"none none none none the database's own {tmp_path}\n".encode()


def test_closing_early_terminates_the_command_and_reaps_it():
    from chunkvault.store.command_stream import CommandStream

    with CommandStream(["sh", "-c", "exec yes"]) as stream:
        assert stream.read(4) == b"y\ny\n"
    assert stream.returncode == -signal.SIGTERM


def test_closing_early_stops_what_a_shell_command_started(tmp_path):
    """A shell passes no SIGTERM on to its pipeline: a dump waiting on a database lock would run on."""
    from chunkvault.store.command_stream import CommandStream

    pidfile = tmp_path / "pid"
    with CommandStream(["sh", "-c", f"echo $$ > {pidfile}"]):
        pass
    assert not pidfile.exists()  # one closed before its first read never ran
    with CommandStream(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait; echo late"]) as stream:
        stream.start()
        while not pidfile.exists() or not pidfile.read_text().endswith("\n"):
            time.sleep(0.01)
        sleeper = int(pidfile.read_text())
        assert not gone(sleeper)
    assert gone(sleeper)


def test_closing_early_kills_what_a_shell_command_started_that_ignores_sigterm(tmp_path, monkeypatch):
    """A dump that ignores SIGTERM (or traps it to clean up, and hangs) must not outlive the backup: after
    the grace, what the command started is killed too."""
    from chunkvault.store import command_stream

    monkeypatch.setattr(command_stream, "STOP_GRACE", 0.3)
    pidfile = tmp_path / "pid"
    stubborn_sh = f'trap "" TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done'
    with command_stream.CommandStream(["sh", "-c", f"sh -c '{stubborn_sh}' & wait"]) as stream:
        stream.start()
        while not pidfile.exists() or not pidfile.read_text().endswith("\n"):
            time.sleep(0.01)
        stubborn = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 5  # SIGKILL is sent, not waited for
        while not gone(stubborn) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gone(stubborn)
    finally:
        if not gone(stubborn):
            os.kill(stubborn, signal.SIGKILL)


def test_a_command_interrupted_before_it_started_never_runs(tmp_path):
    """Ctrl-C while the backup still waits for its lock: the dump must not start afterwards (its side
    effects, a database's load, for a backup the user stopped), and the stream reads as interrupted."""
    from chunkvault.store.command_stream import CommandStream

    marker = tmp_path / "ran"
    with CommandStream(["sh", "-c", f"touch {marker}; echo dump"]) as stream:
        stream.interrupt()
        with pytest.raises(SourceCommandFailed, match="was killed by signal 15"):
            stream.read(100)
    assert stream.returncode == -signal.SIGTERM
    assert not marker.exists()


def test_dry_run_runs_the_command_and_writes_nothing(new_repo):
    repo = new_repo()
    result = repo.backup_command(emit(1000), "app.sql", dry_run=True)
    assert result.snapshot.stats["bytes"] == len(numbered(1000)) and result.snapshot.stats["added_blobs"]
    assert repo.snapshots() == []


def test_cli_stdin_from_command(cli, tmp_path):
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    out = json.loads(cli("backup", "-r", repo, "--stdin-from-command", "--stdin-name", "db.sql", "--json", "--",
                         *emit(1000)).stdout)
    assert out["type"] == "full" and out["stdin_name"] == "db.sql"
    assert cli("dump", "-r", repo, "latest", "db.sql").stdout == numbered(1000)
    failed = cli("backup", "-r", repo, "--stdin-from-command", "--stdin-name", "db.sql", "--",
                 *emit(10, "exit 7"), check=20)
    assert failed.stderr.decode().strip().splitlines() == [
        "chunkvault: `sh -c 'seq 1 10; exit 7'` exited 7: no snapshot saved"]
    assert len(json.loads(cli("snapshots", "-r", repo, "--json").stdout)) == 1
    for args, message in ((["--stdin-from-command", "--stdin-name", "x"], "needs the command after the options"),
                          (["--stdin-from-command", "--", "true"], "--stdin-from-command needs --stdin-name NAME"),
                          (["--stdin", "--stdin-from-command", "--stdin-name", "x", "--", "true"], "give one"),
                          (["--stdin-from-command", "--stdin-name", "x", "--exclude", "*", "--", "true"],
                           "takes no exclusion rules"),
                          (["--stdin-name", "x", str(tmp_path)], "give --stdin or --stdin-from-command with it")):
        proc = cli("backup", "-r", repo, *args, check=2)
        assert message in proc.stderr.decode()


def test_an_option_that_only_begins_as_stdin_from_command_is_not_taken_for_it(cli, tmp_path):
    """``--stdin-filename`` (restic's name for ``--stdin-name``) was refused as a ``--stdin-from-command``
    without its command, an option the line does not have; it is an unknown option, named as such."""
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    proc = cli("backup", "-r", repo, "--stdin", "--stdin-filename", "db.sql", check=2)
    assert proc.stderr.decode().strip() == "chunkvault: unrecognized arguments: --stdin-filename"
    for abbreviated in ("--stdin-f", "--stdin-from"):  # an abbreviation is still told where its command goes
        proc = cli("backup", "-r", repo, abbreviated, "--stdin-name", "x", "true", check=2)
        assert "needs the command after the options" in proc.stderr.decode()


def test_the_command_starts_only_once_the_backup_holds_its_lock(new_repo, tmp_path):
    """It ran at once: a pg_dump sat in its transaction, holding its locks on the database, for as long as
    the backup waited for a prune (an hour by default), and ran even when the backup gave up (exit 15) or
    refused the stream's name (exit 2)."""
    import threading

    from chunkvault.errors import Locked, UsageError
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo = new_repo()
    marker = tmp_path / "started"
    command = ["sh", "-c", f"date +%s.%N > {marker}; echo data"]
    holding, released = threading.Event(), []

    def prune() -> None:
        with RepoLock(repo.store.remote, EXCLUSIVE, "prune"):
            holding.set()
            time.sleep(1.5)
            released.append(time.time())

    held = threading.Thread(target=prune)
    held.start()
    holding.wait(10)
    with pytest.raises(Locked):
        repo.backup_command(command, "dump.sql", wait=0)
    with pytest.raises(UsageError, match="invalid stream name"):
        repo.backup_command(command, "../dump.sql")
    assert not marker.exists()
    repo.backup_command(command, "dump.sql", wait=30)
    held.join()
    assert float(marker.read_text()) >= released[0]


def test_stream_backups_report_progress(new_repo):
    """``--progress`` printed nothing for --stdin and --stdin-from-command: their calls took no callback."""
    import io

    repo = new_repo()
    seen: list[dict] = []
    repo.backup_stream(io.BytesIO(b"x" * 100_000), "a.bin", progress=seen.append)
    assert seen[-1]["read_bytes"] == 100_000 and seen[-1]["new_files"] == 1
    repo.backup_command(emit(1000), "b.txt", progress=seen.append)
    assert seen[-1]["read_bytes"] == len(numbered(1000))


def test_cli_stream_refusals_run_nothing(cli, tmp_path):
    """Without ``--`` the command's options were taken as ours (``printf -n``: a dry run; ``pg_dump
    --host=db``: a dump of the local server recorded as from host db), exit 0.  A closed or write-only
    standard input was an internal error."""
    import subprocess
    import sys

    repo = str(tmp_path / "repo")
    cli("init", "-r", repo)
    marker = tmp_path / "ran"
    proc = cli("backup", "-r", repo, "--stdin-from-command", "--stdin-name", "x.txt", "sh", "-c",
               f"touch {marker}", "-n", check=2)
    assert "-- COMMAND" in proc.stderr.decode() and not marker.exists()
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    argv = [sys.executable, "-m", "chunkvault.cli", "backup", "-r", repo, "--stdin", "--stdin-name", "a.sql"]
    closed = subprocess.run(["sh", "-c", '"$@" <&-', "sh", *argv], capture_output=True, text=True, env=env)
    with open(tmp_path / "wonly", "wb") as wonly:
        written = subprocess.run(argv, stdin=wonly, capture_output=True, text=True, env=env)
    for proc in (closed, written):
        assert proc.returncode == 2 and proc.stderr.startswith("chunkvault: standard input is closed or not readable")
    assert json.loads(cli("snapshots", "-r", repo, "--json").stdout) == []


def test_cli_stdin_that_cannot_be_read_saves_no_snapshot(cli, tmp_path):
    """A read of standard input that failed (a socket reset by its peer, a disk's EIO) was an internal
    error, exit 1, as if chunkvault had a bug; the stream is cut short: it is said so, exit 20, as for an
    import-tar of a tar that breaks off."""
    import socket
    import struct
    import subprocess
    import sys

    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as ours:
        theirs, _ = server.accept()
        theirs.sendall(b"x" * 100_000)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed: a reset
        theirs.close()
        env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
        proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "backup", "-r", repo, "--stdin",
                               "--stdin-name", "db.sql"], stdin=ours, capture_output=True, text=True, env=env)
    assert (proc.returncode, proc.stderr) == (
        20, "chunkvault: standard input could not be read (Connection reset by peer): no snapshot saved\n")
    assert json.loads(cli("snapshots", "-r", repo, "--json").stdout) == []
    assert cli("list", "-r", repo, "locks").stdout == b""


def test_a_stream_name_no_file_system_takes_is_refused_before_the_command_runs(new_repo, cli, tmp_path):
    """A --stdin-name with a part longer than 255 bytes was saved, every hour, as a snapshot no restore or
    verify-restore could write (File name too long, exit 14): refused now, exit 2, before the command runs."""
    import io

    from chunkvault.errors import UsageError

    repo = new_repo()
    marker = tmp_path / "ran"
    long_name = "dumps/" + "a" * 256 + ".sql"
    with pytest.raises(UsageError, match="longer than 255 bytes"):
        repo.backup_command(["sh", "-c", f"touch {marker}"], long_name)
    assert not marker.exists() and repo.snapshots() == []
    wide = "é" * 127 + ".sql"  # 127 characters of 2 bytes, 258 bytes in all
    with pytest.raises(UsageError, match="longer than 255 bytes"):
        repo.backup_stream(io.BytesIO(b"x"), wide)
    saved = repo.backup_stream(io.BytesIO(b"x"), "a" * 255).snapshot
    with repo.open_file(saved, "a" * 255) as f:
        assert f.read() == b"x"
    r = str(tmp_path / "cli-repo")
    cli("init", "-r", r, "--kdf-time", "0")
    said = cli("backup", "-r", r, "--stdin", "--stdin-name", long_name, input=b"x", check=2).stderr.decode()
    assert said.startswith("chunkvault: invalid stream name") and said.strip().endswith("(--stdin-name)")


def test_a_failed_command_is_told_at_once_though_what_it_started_holds_its_output(new_repo, tmp_path):
    """A command that failed (exit 3) while something it started in the background kept its stdout open was
    waited for until that ended (a ``sleep 3600 &``: an hour) before its failure was told."""
    repo = new_repo()
    pidfile = tmp_path / "holder"
    command = ["sh", "-c", f"seq 1 10; sleep 60 & echo $! > {pidfile}; exit 3"]
    with pytest.raises(SourceCommandFailed) as e:
        repo.backup_command(command, "app.sql")
    holder = int(pidfile.read_text())
    holding = not gone(holder)
    if holding:
        os.kill(holder, signal.SIGKILL)
    assert holding and str(e.value) == f"`sh -c '{command[2]}'` exited 3: no snapshot saved"
    assert repo.snapshots() == []
