"""Restores into one target at once: the one that comes second is refused at once, one line, exit 15
(``TargetBusy``), or waits with --wait; a restore killed leaves no lock behind."""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from chunkvault import Repository
from chunkvault.errors import Locked, TargetBusy, TargetNotEmpty
from treeutil import backed_up, describe, wait_for

PASSWORD = "correct horse battery staple"


def _tree(src) -> None:
    rnd = random.Random(5)
    for d in range(4):
        (src / f"d{d}").mkdir()
        for i in range(30):
            (src / f"d{d}" / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 40_000)))


@pytest.fixture
def backup(tmp_path, new_repo):
    repo, url, src = backed_up(tmp_path, new_repo, _tree)
    return repo, url, src


@contextlib.contextmanager
def _held_as_targets(dirs):
    """Each of ``dirs`` locked as another restore locks its target, until the block ends."""
    fds = []
    try:
        for d in dirs:
            fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
            fcntl.flock(fds[-1], fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def held(tmp_path):
    """The lock a restore holds on its target, taken here on ``tmp_path/target`` (made), as another restore
    writing into it holds it; ``release()`` lets go of it."""
    target = tmp_path / "target"
    target.mkdir()
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = []

    def release() -> None:
        if not released:
            released.append(True)
            os.close(fd)

    release.target = target
    yield release
    release()


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    return env


def _cli(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chunkvault.cli", *args, "-r", url], env=_cli_env(),
                          capture_output=True, text=True, timeout=300)


def _cli_started(*args: str, url: str, **popen: object) -> subprocess.Popen:
    """The command started, not waited for (stdout discarded)."""
    return subprocess.Popen([sys.executable, "-m", "chunkvault.cli", *args, "-r", url], env=_cli_env(),
                            stdout=subprocess.DEVNULL, **popen)


@pytest.mark.parametrize("in_place", [[], ["--confirm", "RESTORE", "--delta", "--delete"]])
def test_a_restore_into_a_target_another_restore_holds_is_refused_at_once(backup, held, in_place):
    """Two restores into one empty target both failed on each other's files ("File exists", exit 14); in
    place both wrote, each replacing what the other had."""
    _, url, _ = backup
    began = time.monotonic()
    proc = _cli("restore", "latest", "-t", str(held.target), *in_place, url=url)
    assert proc.returncode == 15, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"another restore (process {os.getpid()}) is writing into {held.target}" in lines[0]
    assert "--wait" in lines[0]
    assert time.monotonic() - began < 60
    assert os.listdir(held.target) == []


def test_a_restore_given_wait_waits_for_the_other_and_then_restores(backup, held):
    _, url, src = backup
    proc = _cli_started("restore", "latest", "-t", str(held.target), "--wait", "60", url=url, stderr=subprocess.PIPE,
                        text=True)
    try:
        said = proc.stderr.readline()  # told before it waits, not after
        assert re.search(rf"waiting up to \d+ s: another restore \(process {os.getpid()}\) is writing into", said)
        held()
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert describe(held.target) == describe(src)


def test_a_restore_from_an_export_file_is_refused_too(backup, held, tmp_path):
    _, url, _ = backup
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_EXPORT_PASSWORD"] = env["CHUNKVAULT_PASSWORD"] = PASSWORD
    cv = [sys.executable, "-m", "chunkvault.cli"]
    subprocess.run([*cv, "export", "latest", "-r", url, "--output", str(tmp_path / "x.backup"), "--kdf-time", "0"],
                   env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([*cv, "restore", "--from-file", str(tmp_path / "x.backup"), "-t", str(held.target)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 15, proc.stderr
    assert "another restore" in proc.stderr


def test_the_api_refuses_a_second_restore_while_the_first_writes(backup, tmp_path):
    """The second found the target not empty (TargetNotEmpty), or with force wrote into it beside the first."""
    repo, url, src = backup
    target = tmp_path / "target"
    target.mkdir()
    writing, go_on = threading.Event(), threading.Event()

    def paused(files, nbytes):
        writing.set()
        go_on.wait(30)

    first: list = []
    t = threading.Thread(target=lambda: first.append(repo.restore("latest", str(target), progress=paused,
                                                                   processes=1)))
    t.start()
    try:
        assert writing.wait(30)
        with Repository.open(url, PASSWORD) as other:
            for force in (False, True):
                with pytest.raises(TargetBusy, match="another restore .* is writing into") as caught:
                    other.restore("latest", str(target), force=force, delta=force)
                assert isinstance(caught.value, Locked) and caught.value.exit_code == 15
            threading.Timer(0.5, go_on.set).start()
            with pytest.raises(TargetNotEmpty):  # waited for, then found as the first left it
                other.restore("latest", str(target), target_wait=30)
            result = other.restore("latest", str(target), force=True, delta=True, target_wait=30)
    finally:
        go_on.set()
        t.join(60)
    assert first and first[0].files == 120
    assert result.unchanged_files == 120
    assert describe(target) == describe(src)


def _holds_lock(pid: int) -> bool:
    with open("/proc/locks") as f:
        return any(line.split()[1:2] == ["FLOCK"] and line.split()[4] == str(pid) for line in f)


def test_a_killed_restore_leaves_no_lock_and_a_rerun_with_delta_completes(backup, tmp_path):
    _, url, src = backup
    (src / "big").write_bytes(random.Random(3).randbytes(64 << 20))  # long enough to be killed mid-way
    _cli("backup", str(src), url=url).check_returncode()
    target = tmp_path / "target"
    proc = _cli_started("restore", "latest", "-t", str(target), "--processes", "1", url=url, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _holds_lock(proc.pid) or proc.poll() is not None, 60)
        proc.kill()  # mid-way: it holds the target's lock, which it takes before it writes anything
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = _cli("restore", "latest", "-t", str(target), "--confirm", "RESTORE", "--delta", url=url)
    assert again.returncode == 0, again.stderr
    assert describe(target) == describe(src)


def test_a_target_on_a_file_system_without_locks_is_restored_unguarded(backup, tmp_path, no_flock):
    repo, _, src = backup
    result = repo.restore("latest", str(tmp_path / "target"), processes=1)
    assert result.files == 120
    assert describe(tmp_path / "target") == describe(src)


def test_a_bad_wait_is_a_usage_error(backup, tmp_path):
    from chunkvault.errors import UsageError

    repo, _, _ = backup
    for bad in (-1, float("nan"), "5", True):
        with pytest.raises(UsageError, match="target_wait"):
            repo.restore("latest", str(tmp_path / "target"), target_wait=bad)


def _locked_by_another(path) -> bool:
    """Whether a restore holds the lock on directory ``path``: a lock of our own there is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_relocated_restore_holds_the_targets_lock_until_its_links_are_made(backup, tmp_path):
    """The target's lock was released once its own part was in, while the relocated directories were restored
    and the links made: another restore could begin there, and --delete what the first went on to write."""
    from chunkvault.store.restore import Relocation

    repo, _, src = backup
    target, into = tmp_path / "target", tmp_path / "d1"
    seen = []

    def step(files, nbytes):
        if files > 90 and not seen:  # the relocated directory's part, the target's done
            seen.append((_locked_by_another(target), _locked_by_another(into)))

    repo.restore("latest", str(target), relocate=[Relocation(b"d1", str(into), b"d1")], progress=step,
                 processes=1)
    assert seen == [(True, True)]
    assert os.readlink(target / "d1") == str(into)
    assert not _locked_by_another(target) and not _locked_by_another(into)  # released once all is done
    from chunkvault.store.target_lock import holding

    with holding():  # as restore --pg-tablespace --pg-recover holds them, to write the recovery settings
        repo.restore("latest", str(target), relocate=[Relocation(b"d1", str(into), b"d1")], force=True,
                     delta=True, processes=1)
        assert _locked_by_another(target) and _locked_by_another(into)
    assert not _locked_by_another(target) and not _locked_by_another(into)


def test_recovery_settings_are_written_under_the_targets_lock(tmp_path, monkeypatch, capsys):
    """--pg-recover wrote its settings and signal file once the restore had released the target's lock: a
    second restore could begin there in between.  Now they are written under the lock the restore took, and
    the API's write_recovery takes it too."""
    from chunkvault import cli, pgrecovery

    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    data = tmp_path / "data"
    (data / "global").mkdir(parents=True)
    (data / "global" / "pg_control").write_bytes(b"\0" * 64)
    (data / "PG_VERSION").write_text("15\n")
    url = str(tmp_path / "repo")
    with Repository.init(url, PASSWORD, kdf_seconds=0) as repo:
        repo.backup([str(data)])
    target = tmp_path / "target"
    seen = []
    write = pgrecovery.write_recovery

    def checked(datadir, *args):
        seen.append(_locked_by_another(datadir))
        return write(datadir, *args)

    monkeypatch.setattr(pgrecovery, "write_recovery", checked)
    monkeypatch.delenv("CHUNKVAULT_PASSWORD", raising=False)
    code = cli.main(["restore", "latest", "-r", url, "--password-file", str(pw), "-t", str(target),
                     "--pg-recover", "immediate", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert seen == [True] and (target / "recovery.signal").exists()
    assert not _locked_by_another(target)
    os.unlink(target / "recovery.signal")
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # another restore writing there
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(TargetBusy):
            write(str(target), pgrecovery.RecoveryTarget("end"), "x")
    finally:
        os.close(fd)
    assert not (target / "recovery.signal").exists()


def test_one_wait_bounds_every_wait_of_a_restore(backup, tmp_path, monkeypatch):
    """A restore given target_wait waited for the target before reading the repository, then for the whole of
    it again for the lock it writes under, where another restore took the target in between: twice what it was
    given (three times from the command line, and --wait's wait for the repository's lock besides)."""
    from chunkvault.store import target_lock

    repo, _, _ = backup
    target = tmp_path / "target"
    target.mkdir()
    first = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # a restore writing there, done in a second
    fcntl.flock(first, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, [first]).start()
    then = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # one that begins there once it is done
    real = target_lock._wait_for

    def wait_for(fd, shown, wait):
        done = real(fd, shown, wait)
        if not getattr(wait_for, "taken", False):
            fcntl.flock(fd, fcntl.LOCK_UN)
            fcntl.flock(then, fcntl.LOCK_EX)
            wait_for.taken = True
        return done

    monkeypatch.setattr(target_lock, "_wait_for", wait_for)
    began = time.monotonic()
    try:
        with pytest.raises(TargetBusy, match="waited"):
            repo.restore("latest", str(target), target_wait=3, processes=1)
    finally:
        os.close(then)
    assert 2.9 < time.monotonic() - began < 3.6
    assert os.listdir(target) == []


def test_delete_leaves_a_directory_inside_the_target_that_another_restore_writes_into(backup, tmp_path):
    """The lock is the target's alone: a restore --delete into the directory above removed another restore's
    target, at any depth, from under the writes it was making."""
    from chunkvault.errors import TargetUnwritable

    repo, _, src = backup
    target = tmp_path / "target"
    repo.restore("latest", str(target), processes=1)
    theirs = [target / "other", target / "d1" / "extra" / "deeper"]
    for d in theirs:
        d.mkdir(parents=True)
        (d / "written").write_text("by the other restore")
    (target / "d1" / "extra" / "stray").write_text("the snapshot lacks it")
    (target / "gone").mkdir()
    with _held_as_targets(theirs), pytest.raises(TargetUnwritable) as caught:
        repo.restore("latest", str(target), force=True, delta=True, delete=True, processes=1)
    said = str(caught.value)
    assert f"other (not deleted: another restore (process {os.getpid()}) is writing into it)" in said
    assert f"d1/extra (not deleted: another restore (process {os.getpid()}) is writing into deeper in it)" in said
    for d in theirs:
        assert (d / "written").read_text() == "by the other restore"
    assert not (target / "gone").exists()
    assert caught.value.partial.deleted == 1
    repo.restore("latest", str(target), force=True, delta=True, delete=True, processes=1)  # once they are done
    assert describe(target) == describe(src)


def test_the_command_line_waits_for_the_repository_and_the_target_within_one_wait(backup, held):
    """--wait waited its whole for the repository's lock (a prune running), then its whole again for the
    target: a restore given --wait 5 behind a prune of 3 s waited 5 s more for the target."""
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo, url, _ = backup
    prune = RepoLock(repo._repo.remote, EXCLUSIVE, "prune")
    prune.acquire()
    proc = _cli_started("restore", "latest", "-t", str(held.target), "--wait", "5", url=url, stderr=subprocess.PIPE,
                        text=True)
    try:
        said = proc.stderr.readline()
        assert "waiting up to 5 s: repository is locked" in said
        time.sleep(3)
        prune.release()
        assert proc.wait(120) == 15
        rest = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    waited = [float(w) for w in re.findall(r"(?:waiting up to|waited) ([\d.]+) s", rest)]
    assert "another restore" in rest and all(w < 2.5 for w in waited), rest  # what the prune's wait left of 5 s
    assert os.listdir(held.target) == []


def test_a_refusal_after_the_waits_before_used_all_of_wait_says_so(backup, held, monkeypatch, capsys):
    """Where the wait for the repository's lock took all of --wait, the target's refusal came at once, hinting
    "(or use --wait SECONDS)": --wait was given, and waited.  It now says what the waits before took."""
    from chunkvault import cli
    from chunkvault.repository import Repository as Repo

    _, url, _ = backup
    reading = Repo.reading

    def slow(self, purpose, wait=0.0):  # a prune held the repository until --wait was up
        time.sleep(wait)
        return reading(self, purpose, wait=wait)

    monkeypatch.setattr(Repo, "reading", slow)
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    code = cli.main(["restore", "latest", "-r", url, "-t", str(held.target), "--wait", "1"])
    err = capsys.readouterr().err
    assert code == 15, err
    assert "another restore" in err and "SECONDS" not in err, err
    assert "--wait 1 went on the waits before" in err, err
    assert cli.main(["restore", "latest", "-r", url, "-t", str(held.target), "--wait", "0"]) == 15
    assert "(or use --wait SECONDS)" in capsys.readouterr().err  # none was waited: more may be asked for


def test_delete_leaves_a_directory_that_another_restore_took_while_it_emptied_one_below(tmp_path, monkeypatch):
    """remove_tree locked each directory while its descriptor was open, and it keeps one open: the lock on a
    directory ended as the walk went down into the one below, and nothing checked it again on the way back
    up, so a restore that began writing there meanwhile had what it wrote removed, and its target with it."""
    import errno

    from chunkvault.store import target_dirs

    top = tmp_path / "target" / "junk"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "f").write_bytes(b"the snapshot lacks it")
    theirs = []
    real = target_dirs._not_a_target

    def then_another_begins(fd, names):
        real(fd, names)
        if names == [b"junk", b"sub"] and not theirs:  # a restore into junk begins while sub is emptied
            theirs.append(os.open(top, os.O_RDONLY | os.O_DIRECTORY))
            fcntl.flock(theirs[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            (top / "written").write_text("by the other restore")

    monkeypatch.setattr(target_dirs, "_not_a_target", then_another_begins)
    parent = os.open(tmp_path / "target", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            target_dirs.remove_tree(parent, "junk")
    finally:
        os.close(parent)
        for fd in theirs:
            os.close(fd)
    assert info.value.errno == errno.EBUSY
    assert (top / "written").read_text() == "by the other restore"


def test_a_directory_another_restore_holds_is_left_with_no_descriptor_kept(tmp_path):
    """The refusal of the directory removed itself came before the descriptor it had opened was in the
    block that closes it: each refusal left one open in the process (a library user's, a mount's)."""
    import errno

    from chunkvault.store.target_dirs import remove_tree

    (tmp_path / "target" / "junk").mkdir(parents=True)
    theirs = os.open(tmp_path / "target" / "junk", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(theirs, fcntl.LOCK_EX)
    parent = os.open(tmp_path / "target", os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with pytest.raises(OSError) as info:
                remove_tree(parent, "junk")
            assert info.value.errno == errno.EBUSY
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(parent)
        os.close(theirs)
    assert (tmp_path / "target" / "junk").is_dir()


@pytest.mark.parametrize("how", [dict(), dict(delta=True), dict(overwrite="if-newer")])
def test_a_restore_in_place_leaves_a_directory_of_the_snapshot_that_another_restore_writes_into(backup, tmp_path,
                                                                                                 how):
    """A directory the snapshot has that another restore holds as its target (at any depth) was written into by
    a restore in place of the directory above, under the other's writes, as --delete no longer removes one.  Now
    it is left as it is with all below it, and named (exit 14), as --delete leaves it."""
    from chunkvault.errors import TargetUnwritable

    repo, _, src = backup
    target = tmp_path / "target"
    repo.restore("latest", str(target), processes=1)
    theirs = [target / "d1", target / "d2"]
    for d in theirs:
        for f in d.iterdir():
            f.write_bytes(b"by the other restore")
            os.utime(f, (0, 0))  # older than the snapshot's: if-newer would replace it
    (target / "d3" / "f0").write_bytes(b"changed")
    os.utime(target / "d3" / "f0", (0, 0))
    with _held_as_targets(theirs), pytest.raises(TargetUnwritable) as caught:
        repo.restore("latest", str(target), force=True, processes=1, **how)
    said = str(caught.value)
    assert "\n" not in said and f"d1 (another restore (process {os.getpid()}) is writing into it" in said, said
    assert "d1/f0" not in said  # the directory is named, not each entry below it
    for d in theirs:
        assert {f.read_bytes() for f in d.iterdir()} == {b"by the other restore"}
    assert (target / "d3" / "f0").read_bytes() == (src / "d3" / "f0").read_bytes()  # the rest restored
    repo.restore("latest", str(target), force=True, processes=1, **how)  # once they are done
    if not how:
        assert describe(target) == describe(src)
