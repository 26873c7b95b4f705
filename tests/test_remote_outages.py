"""Real remotes that go away, come back or stall while a CLI command runs against them.

The server processes are real (moto, sshd, ``chunkvault serve``) and so are the failures: the process is
killed (SIGKILL; moto keeps its objects in memory, so its death is played by the proxy in front of it dying),
started again on the same port, or the link to it stalls (``outage_proxy.Proxy`` forwards nothing while the
connections stay open).  What must hold: a command gives up within its retry budget with one line and exit 14,
no traceback; or rides the outage out and finishes; and what it leaves is checked clean, restores, and is
reused or cleared by the next run.  The drills of other commands (copy, check, export, verify-restore, forget
--prune, archive-push and -get, snapshots) run one or two per fault here; CHUNKVAULT_OUTAGE_DRILLS=all runs each
command on each kind of remote it was drilled on.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outage_proxy import Proxy
from servers_http import FULL_TOKEN, serve_factory, write_tokens  # noqa: F401
from servers_s3 import moto_s3, s3_bucket, s3_bucket_factory  # noqa: F401
from servers_ssh import SSHServer, require_sshd
from walsegments import write_segment

PASSWORD = "outage-pw"


def make_tree(root: Path, mib: int = 12, seed: int = 1) -> Path:
    """Files of random sizes, incompressible, with some small text ones."""
    rnd = random.Random(seed)
    root.mkdir()
    left = mib << 20
    i = 0
    while left > 0:
        size = min(left, rnd.randrange(1, 3 << 20))
        (root / f"r{i}.bin").write_bytes(rnd.randbytes(size))
        left -= size
        i += 1
    (root / "text").mkdir()
    for j in range(50):
        (root / "text" / f"t{j}.txt").write_text(" ".join(str(rnd.random()) for _ in range(200)))
    return root


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a server and its children (sshd serves each connection from a child of its own)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                        children.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    proc.kill()
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


class Target:
    """A repository on one kind of remote, reached through a ``Proxy``; ``kill``/``restart`` the server."""

    def __init__(self, kind: str, url: str, env: dict[str, str], proxy: Proxy, kill, restart):
        self.kind = kind
        self.url = url
        self.env = env
        self.proxy = proxy
        self._kill = kill
        self._restart = restart

    def kill(self) -> None:
        self._kill()

    def restart(self) -> None:
        self._restart()

    def options(self, retry_time: float | None = 5, read_timeout: float = 3) -> list[str]:
        """Short timeouts; ``retry_time`` None: $CHUNKVAULT_RETRY_TIME's, else the default."""
        opts = ["-o", f"{self.kind}.connect-timeout=3"]
        if retry_time is not None:
            opts += ["-o", f"{self.kind}.retry-time={retry_time}"]
        if self.kind != "sftp":
            opts += ["-o", f"{self.kind}.read-timeout={read_timeout}"]
        return opts

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "chunkvault.cli", *args]

    def run(self, *args: str, check: bool | int = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check is True and proc.returncode != 0 or check not in (True, False) and proc.returncode != check:
            raise AssertionError(f"chunkvault {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)


def _base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, CHUNKVAULT_TO_PASSWORD=PASSWORD,
               CHUNKVAULT_CACHE_DIR=str(tmp_path / "cache"))
    return env


@pytest.fixture(params=["s3", "sftp", "http"])
def target(request, tmp_path):
    yield from _target(request, tmp_path, request.param)


@pytest.fixture
def target_sftp(request, tmp_path):
    yield from _target(request, tmp_path, "sftp")


def _target(request, tmp_path, kind):
    env = _base_env(tmp_path)
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        proxy = Proxy(int(bucket.endpoint.rsplit(":", 1)[1]))
        env.update(bucket.env)
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        yield Target(kind, bucket.url, env, proxy, proxy.kill, proxy.start)
    elif kind == "sftp":
        require_sshd()
        (tmp_path / "sshd").mkdir()
        server = SSHServer(str(tmp_path / "sshd"))
        server.start()
        proxy = Proxy(server.port)

        def trust_proxy() -> None:  # a start writes known_hosts anew, for its own port
            with open(server.known_hosts, "a") as f:
                f.write(f"[127.0.0.1]:{proxy.port} {server.host_pub}\n")

        def kill() -> None:
            kill_process_tree(server.proc)
            proxy.kill()

        def restart() -> None:
            server.start(port=server.port)
            trust_proxy()
            proxy.start()

        trust_proxy()
        env.update(server.env)
        url = f"sftp://{server.user}@127.0.0.1:{proxy.port}{tmp_path / 'sftp-repo'}"
        try:
            yield Target(kind, url, env, proxy, kill, restart)
        finally:
            server.stop()
    else:
        server = request.getfixturevalue("serve_factory")("--tokens", str(write_tokens(tmp_path)), "--quiet")
        proxy = Proxy(server.port)
        env["CHUNKVAULT_HTTP_TOKEN"] = FULL_TOKEN

        def kill() -> None:
            server.stop(signal.SIGKILL)
            proxy.kill()

        def restart() -> None:
            server.start()
            proxy.start()

        yield Target(kind, f"http://127.0.0.1:{proxy.port}/", env, proxy, kill, restart)
    proxy.close()


def _wait_for(proc: subprocess.Popen, seconds: float) -> None:
    """Let a command run ``seconds``; it must still be running (else the fault would come too late)."""
    time.sleep(seconds)
    assert proc.poll() is None, f"the command ended before the fault:\n{proc.communicate()[1]}"


def _one_line_failure(proc: subprocess.Popen, err: str, code: int = 14) -> str:
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    final = [line for line in err.strip().splitlines() if "; retrying " not in line]
    assert len(final) == 1 and final[0].startswith("chunkvault: "), err
    return final[0]


def _snapshots(target: Target) -> list[dict]:
    return json.loads(target.run("snapshots", "-r", target.url, "--json").stdout)


def _restores_as(target: Target, snap: str, tree: Path, out: Path) -> None:
    target.run("restore", "-r", target.url, snap, "--target", str(out))
    for path in tree.rglob("*"):
        if path.is_file():
            rel = path.relative_to(tree).as_posix()
            [restored] = [p for p in out.rglob(path.name) if p.as_posix().endswith("/" + rel)]
            same = restored.read_bytes() == path.read_bytes()  # no repr of megabytes when they differ
            assert same, path


@pytest.mark.slow
def test_a_backup_whose_server_dies_gives_up_in_one_line_and_the_next_run_completes(target, tmp_path):
    """Killed mid-backup and left down: the backup gives up within its retry budget (8 attempts, about half
    a minute at most, with retry-time short), exit 14, one line naming the remote; back up, the repository
    checks clean save for packs no index names, a backup runs to the end, and prune clears the rest."""
    tree = make_tree(tmp_path / "src")
    target.run("init", "-r", target.url, "--kdf-time", "0", "--pack-size", "2M")
    backup = target.start("backup", "-r", target.url, *target.options(), str(tree), "--limit-upload", "3M")
    started = time.monotonic()
    _wait_for(backup, 1.5)
    target.kill()
    _, err = backup.communicate(timeout=120)
    took = time.monotonic() - started
    line = _one_line_failure(backup, err)
    assert "unavailable" in line and target.url.rstrip("/").split("://")[0] in line, line
    assert took < 90, f"{took:.0f} s"
    target.restart()
    checked = target.run("check", "-r", target.url, "--read-data")
    assert "no problems" in checked.stdout, checked.stdout
    target.run("backup", "-r", target.url, str(tree))
    [snap] = _snapshots(target)
    target.run("prune", "-r", target.url)
    checked = target.run("check", "-r", target.url, "--read-data")
    assert checked.stderr == "" and "no problems" in checked.stdout, checked.stderr
    _restores_as(target, snap["id"], tree, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("target, command", [("s3", "backup"), ("sftp", "restore"), ("http", "prune"),
                                             ("http", "backup")], indirect=["target"])
def test_a_server_restarted_mid_command_is_ridden_out(target, tmp_path, command):
    """Killed and started again three seconds later, on the same port: the command retries through it and
    finishes; the repository checks clean and every snapshot restores."""
    tree = make_tree(tmp_path / "src")
    target.run("init", "-r", target.url, "--kdf-time", "0", "--pack-size", "2M")
    if command != "backup":
        target.run("backup", "-r", target.url, str(tree))
        (tree / "r0.bin").write_bytes(random.Random(9).randbytes(3 << 20))
        target.run("backup", "-r", target.url, str(tree), "--type", "full")
        if command == "prune":
            target.run("forget", "-r", target.url, _snapshots(target)[0]["id"])
    argv = {
        "backup": ["backup", str(tree), "--limit-upload", "3M"],
        "restore": ["restore", "latest", "--target", str(tmp_path / "restored"), "--limit-download", "3M"],
        "prune": ["prune", "--max-unused", "0", "--limit-download", "3M", "--limit-upload", "3M"],
    }[command]
    proc = target.start(argv[0], "-r", target.url, *target.options(retry_time=60), *argv[1:])
    _wait_for(proc, 1.5)
    target.kill()
    time.sleep(3)
    target.restart()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    checked = target.run("check", "-r", target.url, "--read-data")
    assert checked.stderr == "" and "no problems" in checked.stdout, checked.stderr
    *earlier, latest = _snapshots(target)
    for snap in earlier:
        target.run("restore", "-r", target.url, snap["id"], "--target", str(tmp_path / f"out-{snap['id']}"))
    _restores_as(target, latest["id"], tree, tmp_path / "out")


@pytest.mark.parametrize("target", ["s3", "http"], indirect=True)
def test_a_stalled_link_times_out_and_the_command_finishes_once_it_moves_again(target, tmp_path):
    """Nothing moves for longer than the read timeout, the connections held open: the transfers under way
    time out and are tried again, and the backup completes once the link moves again."""
    tree = make_tree(tmp_path / "src", mib=8)
    target.run("init", "-r", target.url, "--kdf-time", "0", "--pack-size", "2M")
    backup = target.start("backup", "-r", target.url, *target.options(retry_time=60, read_timeout=1), str(tree),
                          "--limit-upload", "3M")
    _wait_for(backup, 1)
    target.proxy.pause()
    time.sleep(3)
    target.proxy.resume()
    _, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert "Traceback" not in err
    checked = target.run("check", "-r", target.url, "--read-data")
    assert checked.stderr == "" and "no problems" in checked.stdout, checked.stderr


@pytest.mark.slow
def test_an_sftp_link_that_stalls_is_given_up_after_its_read_timeout(target_sftp, tmp_path):
    """A link that stalls with its connections held open is found only by SSH keepalives, which went every
    30 s, three unanswered ending the session: 2 minutes, and no option changed it.  ``sftp.read-timeout``
    sets their pace: the stalled session is given up and connected again within it."""
    target = target_sftp
    tree = make_tree(tmp_path / "src", mib=8)
    target.run("init", "-r", target.url, "--kdf-time", "0", "--pack-size", "2M")
    backup = target.start("backup", "-r", target.url, *target.options(retry_time=60), "-o", "sftp.read-timeout=4",
                          str(tree), "--limit-upload", "3M")
    _wait_for(backup, 1)
    target.proxy.pause()
    time.sleep(12)
    target.proxy.resume()
    _, err = backup.communicate(timeout=120)
    assert backup.returncode == 0, err
    assert "; retrying " in err, "the stall was never noticed: " + err
    checked = target.run("check", "-r", target.url, "--read-data")
    assert checked.stderr == "" and "no problems" in checked.stdout, checked.stderr



def _wal_segment(folder: Path, name: str, seed: int, mib: int = 4) -> Path:
    """A WAL segment of random pages (4 MiB: a server's ``--wal-segsize 4``)."""
    return write_segment(folder, name, seed, mib << 20, filled=1.0)


def _seed(target: Target, tmp_path: Path) -> tuple[Path, Path]:
    """A repository of a full snapshot, a differential on it, and WAL segments 1 and 2 archived."""
    tree = make_tree(tmp_path / "src", mib=6)
    target.run("init", "-r", target.url, "--kdf-time", "0", "--pack-size", "2M")
    target.run("backup", "-r", target.url, str(tree))
    (tree / "r0.bin").write_bytes(random.Random(9).randbytes(3 << 20))
    target.run("backup", "-r", target.url, str(tree))
    wal = tmp_path / "pg_wal"
    for i in (1, 2):
        target.run("archive-push", "-r", target.url, str(_wal_segment(wal, f"00000001000000000000000{i}", i)))
    return tree, wal


#: Each command under its outage, as run: ``{r}`` the drilled repository with its options, ``{local}`` a local
#: one (the other side of a copy), ``{tmp}`` the test's directory.  The rates keep it running into the fault.
DRILLED = {
    "check": "check {r} --read-data --limit-download 2M",
    "copy-from": "copy {r} --to {local} --limit-download 2M",
    "copy-to": "copy -r {local} {opts} --to {url} --limit-upload 2M",
    "copy-wal": "copy -r {local} {opts} --to {url} --wal --limit-upload 2M",
    "export": "export {r} --output {tmp}/x.backup --limit-download 2M",
    "verify-restore": "verify-restore {r} --scratch {tmp}/scratch --limit-download 2M",
    "forget-prune": "forget {r} --keep-last 1 --prune --max-unused 0 --limit-download 2M --limit-upload 2M",
    "archive-push": "archive-push {r} {tmp}/pg_wal/000000010000000000000003 --limit-upload 2M",
    "archive-get": "archive-get {r} 000000010000000000000001 {tmp}/got/seg --limit-download 2M",
    "snapshots": "snapshots {r} --json",
}


def _drill(target: Target, tmp_path: Path, command: str, mode: str, **options: float) -> str:
    """Seed the repository, run ``command`` into the fault (``die``: the server killed and left down; ``restart``:
    killed and started again 3 s later; ``stall``: the link forwards nothing for 3 s), assert how it ended,
    then that the repositories check clean, every WAL file and snapshot restores byte for byte and a rerun
    completes.  Returns the command's stderr."""
    tree, wal = _seed(target, tmp_path)
    local = str(tmp_path / "local")
    (tmp_path / "got").mkdir()
    (tmp_path / "scratch").mkdir()
    target.env["CHUNKVAULT_EXPORT_PASSWORD"] = "export-pw"
    if command.startswith("copy"):
        target.run("init", "-r", local, "--kdf-time", "0")
    if command == "copy-to":
        target.run("backup", "-r", local, str(make_tree(tmp_path / "src2", mib=6, seed=5)))
    if command in ("copy-wal", "archive-push"):
        segment = _wal_segment(wal, "000000010000000000000003", 3, mib=8)
        if command == "copy-wal":
            target.run("archive-push", "-r", local, str(segment))
    opts = " ".join(target.options(**options))
    argv = DRILLED[command].format(r=f"-r {target.url} {opts}", url=target.url, opts=opts, local=local,
                                   tmp=tmp_path).split()
    if command == "snapshots" and mode == "die":
        target.kill()  # a remote that never answered this process: its 8 attempts
    proc = target.start(*argv)
    started = time.monotonic()
    if command != "snapshots":
        _wait_for(proc, 1.5)
        if mode == "stall":
            target.proxy.pause()
            time.sleep(3)
            target.proxy.resume()
        else:
            target.kill()
            if mode == "restart":
                time.sleep(3)
                target.restart()
    _, err = proc.communicate(timeout=180)
    took = time.monotonic() - started
    if mode == "die":
        line = _one_line_failure(proc, err)
        assert "unavailable" in line, line
        assert took < 60, f"given up after {took:.0f} s"
        if command.startswith("copy"):  # the other repository still answers: its lock is removed
            locks = Path(local) / "locks"  # (never made where the copy died before it took that lock)
            assert not locks.exists() or os.listdir(locks) == []
        target.restart()
    else:
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    if command == "archive-get":  # DEST whole or not there, no temp file beside it
        assert os.listdir(tmp_path / "got") == (["seg"] if mode != "die" else [])
    if command == "export" and mode == "die":
        assert not (tmp_path / "x.backup").exists()
    for url in [target.url] + ([local] if command.startswith("copy") else []):
        checked = target.run("check", "-r", url, "--read-data")
        # a killed upload leaves packs no index names, prune's to clear; nothing else
        stray = [line for line in checked.stderr.splitlines() if not (mode == "die" and "is in no index" in line)]
        assert stray == [] and "no problems" in checked.stdout, checked.stderr + checked.stdout
    rerun = target.run(*[a for a in argv if a not in ("--limit-download", "--limit-upload", "2M")]
                       + (["--force"] if command == "export" else []))
    if command == "archive-push":  # stored once: by the push that rode the outage out, else by the rerun
        assert ("already archived" in rerun.stdout) == (mode != "die"), rerun.stdout
        assert "already archived" in target.run(*argv).stdout
    for name in sorted(os.listdir(wal)):
        if command == "archive-push" or not name.endswith("3"):
            target.run("archive-get", "-r", target.url, name, str(tmp_path / "got" / name))
            assert (tmp_path / "got" / name).read_bytes() == (wal / name).read_bytes(), name
    shutil.rmtree(tmp_path / "got")
    shutil.rmtree(local, ignore_errors=True)
    snaps = _snapshots(target)
    latest = [snap for snap in snaps if snap["paths"] == [str(tree)]][-1]  # copy-to adds another tree's
    for snap in snaps:
        if snap is not latest:
            target.run("restore", "-r", target.url, snap["id"], "--target", str(tmp_path / f"out-{snap['id']}"))
    _restores_as(target, latest["id"], tree, tmp_path / "out")
    for path in tmp_path.iterdir():  # these tests' repositories are large; the machine's /tmp is shared
        if path.is_dir() and path.name not in ("sshd", "sftp-repo"):
            shutil.rmtree(path)
    return err


#: The drills CI runs, one or two per fault (each takes half a minute or more); CHUNKVAULT_OUTAGE_DRILLS=all runs
#: every one below, a command on each kind of remote.
ALL_DRILLS = os.environ.get("CHUNKVAULT_OUTAGE_DRILLS") == "all"


def _drills(every: list[tuple[str, str]], ci: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return every if ALL_DRILLS else ci


@pytest.mark.slow
@pytest.mark.parametrize("target, command", _drills(
    [("s3", "check"), ("sftp", "copy-from"), ("http", "copy-to"), ("http", "archive-push"), ("s3", "archive-get"),
     ("sftp", "snapshots")], [("sftp", "copy-from"), ("http", "archive-push")]), indirect=["target"])
def test_a_dead_remote_is_given_up_in_one_line_by_each_command(target, tmp_path, command):
    """Killed mid-command and left down, with ``retry-time`` short (archive-push: in the environment, as
    PostgreSQL's archive_command would have it): each command gives up within its 8 attempts, exit 14 (below
    126: PostgreSQL retries an archive or restore command that fails so), one line; ``copy`` whether the source
    or the destination died.  Nothing it left is damaged: archive-get wrote no DEST, archive-push's rerun
    stores the segment once, and each rerun completes."""
    if command == "archive-push":
        target.env["CHUNKVAULT_RETRY_TIME"] = "5"
        _drill(target, tmp_path, command, "die", retry_time=None)
    else:
        _drill(target, tmp_path, command, "die", retry_time=5)


@pytest.mark.slow
@pytest.mark.parametrize("target, command", _drills(
    [("sftp", "export"), ("http", "forget-prune"), ("s3", "copy-wal"), ("sftp", "archive-push")],
    [("s3", "copy-wal")]), indirect=["target"])
def test_a_server_restarted_under_another_command_is_ridden_out(target, tmp_path, command):
    """Killed and started again 3 s later: export, forget --prune, copy --wal (its destination restarted) and
    archive-push retry through it and finish, storing everything once."""
    _drill(target, tmp_path, command, "restart", retry_time=60)


@pytest.mark.slow
@pytest.mark.parametrize("target, command", _drills([("s3", "verify-restore"), ("http", "archive-get")],
                                                     [("http", "archive-get")]), indirect=["target"])
def test_a_stalled_link_under_a_read_is_waited_out(target, tmp_path, command):
    """Nothing moves for 3 s, past the read timeout: the reads time out, are tried again, and finish."""
    _drill(target, tmp_path, command, "stall", retry_time=60, read_timeout=1)
