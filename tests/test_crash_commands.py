"""Kill drills for the commands that change a repository besides backup, prune and copy, and two writers at once.

Each drill SIGKILLs the real CLI at random moments or right after its k-th object write (crashkit.run_and_kill)
on a fresh copy of a prepared repository (tests/crashdrills.py), then checks: `check --read-data` clean, every
snapshot not meant to go restores byte for byte, a key change leaves the old or the new password working, the
command run again finishes with the intended result, and the temporary files a kill leaves go with the next
prune.  CHUNKVAULT_CRASH_RUNS sets how many kills each drill makes (default 3); bench/reliability.py runs more.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

import crashdrills
import crashkit
from crashkit import PASSWORD, cli_argv, run_cli

RUNS = int(os.environ.get("CHUNKVAULT_CRASH_RUNS", "3"))
SEED = int(os.environ.get("CHUNKVAULT_CRASH_SEED", "20261205"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Two chains (f1 <- d1 <- d2, f2 <- d3), four archived WAL segments, and a .backup, a tar and a segment
    to bring in."""
    root = tmp_path_factory.mktemp("drill-base")
    made = crashdrills.build_base(str(root / "base"), SEED, wal=True)
    crashdrills.add_inputs(made, SEED + 1)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(crashdrills.drills()))
def test_command_survives_sigkill(base, tmp_path, name):
    fig = crashdrills.drill_series(crashdrills.drills()[name], base, str(tmp_path), RUNS, SEED + len(name))
    print(fig.summary())
    assert fig.runs == RUNS and fig.recoveries == RUNS
    assert fig.kills >= 1, "every run finished before its kill moment"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["forget-full", "key-passwd", "tag"])
def test_command_survives_sigkill_through_serve(base, tmp_path, name):
    fig = crashdrills.drill_series(crashdrills.drills()[name], base, str(tmp_path), 2, SEED + 7, http=True)
    print(fig.summary())
    assert fig.runs == 2 and fig.recoveries == 2


# --- two writers at once ----------------------------------------------------------------------------------------


def _run(base, tmp_path, extra=None):
    return crashdrills.fresh_run(base, str(tmp_path / "run"), extra)


def test_two_tag_commands_at_once_both_land(base, tmp_path):
    run = _run(base, tmp_path)
    raced = crashdrills.race(run, ["tag", "-r", run.repo, "--add", "one"], ["tag", "-r", run.repo, "--add", "two"])
    assert raced.codes == [0, 0], raced.errors
    assert all({"one", "two"} <= set(s.tags) for s in crashdrills.snapshot_map(run).values())
    crashdrills.cli_check(run, run.fig)


def test_two_password_changes_at_once_leave_exactly_one_new_password(base, tmp_path):
    """One changes the password; the other is refused with a line saying why, and changes nothing (exit 11 when
    it opens the repository only after the first removed the old key)."""
    run = _run(base, tmp_path)
    envs = [dict(run.env, CHUNKVAULT_NEW_PASSWORD=pw) for pw in (crashdrills.NEW_PASSWORD, crashdrills.OTHER_PASSWORD)]
    raced = crashdrills.race(run, *[["key", "passwd", "-r", run.repo, "--kdf-time", "0"]] * 2, envs=envs)
    assert sorted(raced.codes) in ([0, 2], [0, 11], [0, 15]), raced.errors
    loser = raced.codes.index(0) ^ 1
    said = [line for line in raced.errors[loser].splitlines() if not line.startswith("warning: waiting")]
    assert len(said) == 1 and "password" in said[0], raced.errors[loser]
    opens = [crashdrills._opens(run, pw) for pw in (PASSWORD, crashdrills.NEW_PASSWORD, crashdrills.OTHER_PASSWORD)]
    assert opens == [False, raced.codes[0] == 0, raced.codes[1] == 0]
    assert len(os.listdir(os.path.join(run.repo, "keys"))) == 1


def test_forget_and_aggregate_beside_a_backup_lose_nothing(base, tmp_path):
    """Started while a backup runs: each waits for it (or, with --wait 0, is refused saying so); the backup's
    snapshot and every kept one restore."""
    run = _run(base, tmp_path)
    ids = base.ids
    raced = crashdrills.race(run, ["backup", "-r", run.repo, base.src, "--json"],
                             ["forget", "-r", run.repo, ids["f1"], "--prune", "--wait", "60"],
                             ["aggregate", "-r", run.repo, ids["d3"], "--retire"], stagger=0.2)
    assert raced.codes[:2] == [0, 0], raced.errors
    assert raced.codes[2] == 0 or crashdrills.refused_clearly(raced.codes[2], raced.errors[2]), raced.errors[2]
    crashdrills._require(run, ["d1", "d2", "d3"])
    crashdrills.restore_all(run, lambda sid, got: got == base.trees.get(sid, got), str(tmp_path / "scratch"),
                            run.fig)
    crashdrills.cli_check(run, run.fig)


def test_two_repairs_of_the_index_at_once(base, tmp_path):
    run = _run(base, tmp_path)
    refused = crashdrills.race(run, *[["repair", "-r", run.repo, "index", "--wait", "0"]] * 2)
    # without a wait, each may see the other's lock and step back: both refused is a clear outcome too
    assert all(c == 0 or crashdrills.refused_clearly(c, e) for c, e in zip(refused.codes, refused.errors)), \
        refused.errors
    waited = crashdrills.race(run, *[["repair", "-r", run.repo, "index", "--wait", "120"]] * 2)
    assert waited.codes == [0, 0], waited.errors  # with one, they take turns
    crashdrills._all_there(run)
    crashdrills.cli_check(run, run.fig)


def test_the_same_backup_file_imported_twice_at_once_is_there_once(base, tmp_path):
    run = _run(base, tmp_path, {"CHUNKVAULT_EXPORT_PASSWORD": crashdrills.EXPORT_PASSWORD})
    raced = crashdrills.race(run, *[["import", "-r", run.repo, base.files["backup"]]] * 2)
    assert raced.codes == [0, 0], raced.errors
    crashdrills._imported(run)


def test_archive_push_beside_archive_expire(base, tmp_path):
    run = _run(base, tmp_path)
    raced = crashdrills.race(run, ["archive-push", "-r", run.repo, base.files["segment"]],
                             ["archive-expire", "-r", run.repo, "--before", crashdrills.SEGMENTS[2], "--wait", "60"])
    assert raced.codes == [0, 0], raced.errors
    assert crashdrills._wal_names(run) == crashdrills.SEGMENTS[2:] + [crashdrills.NEW_SEGMENT]
    crashdrills._pushed(run)


def test_a_writer_refused_beside_import_tar_is_told_it_is_import_tar(base, tmp_path):
    """The lock an import-tar holds was named "backup": the forget refused beside it said "locked by backup"."""
    run = _run(base, tmp_path)
    with open(base.files["tar"], "rb") as f:
        tar = f.read()
    proc = subprocess.Popen(cli_argv("import-tar", "-r", run.repo, "-", "--path", "/imported", "-q"), env=run.env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(tar[: len(tar) // 2])
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not os.listdir(os.path.join(run.repo, "locks")):
            assert time.monotonic() < deadline and proc.poll() is None, "import-tar took no lock"
            time.sleep(0.02)
        refused = run_cli("forget", "-r", run.repo, base.ids["f1"], env=run.env, ok=(15,))
        assert "locked by import-tar on" in refused.stderr.decode(), refused.stderr.decode()
        proc.stdin.write(tar[len(tar) // 2:])
        proc.stdin.close()
        assert proc.wait(60) == 0, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    crashdrills._tar_imported(run)


# --- what the drills found -----------------------------------------------------------------------------------


def _stray_pack(repo) -> None:
    """A pack stored and never indexed: what a backup, forget or repair killed between the two leaves."""
    store = repo.store
    store.load_index()
    with store.writer() as writer:
        blob = random.Random(3).randbytes(50_000)
        writer.add(store.blob_id(blob), blob)
        writer.flush(write_index=False)
        writer.take_index()  # ...and killed: its index never written


def test_repair_snapshots_goes_on_beside_a_pack_a_killed_command_left(base, tmp_path):
    """A pack of a backup (or of `repair snapshots` itself) killed before its index holds nothing a snapshot
    names, yet `repair snapshots` refused ("run `repair index` first") until a repair of the index or a
    prune: run again after it was killed, it never finished.  Such a pack no longer stops it; one holding
    what a snapshot needs still does."""
    run = _run(base, tmp_path)
    crashdrills._drop_pack(run)  # d3 lost some files; the index no longer lists their pack
    with run.open() as repo:
        _stray_pack(repo)
    with run.open() as repo:
        repo.store.load_index()
        assert repo.store.unindexed_packs()
        report = repo.repair_snapshots(dry_run=False)
    assert report.dropped and {sid for sid, _ in report.dropped} <= {base.ids["d3"]}
    crashdrills._snapshots_repaired(run)


def test_repair_packs_run_again_after_it_was_killed_before_its_index(base, tmp_path, monkeypatch):
    """Killed after it stored its salvage (the blobs of the damaged pack that verify) and before the index that
    lists it, `repair packs` run again refused ("run `repair index` first"): the salvage, in no index, holds
    nothing found nowhere else.  It goes on; a pack in no index holding a blob found nowhere else still stops
    it (tests/test_damaged_storage.py)."""
    import chunkvault.store.repair as repair

    run = _run(base, tmp_path)
    crashdrills._damage_pack(run)
    pid = run.memo["pack"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill, right after the salvage was stored

    with monkeypatch.context() as m:
        m.setattr(repair, "replace_index", killed)
        m.setattr(repair, "take_back", lambda *args, **kwargs: None)  # a SIGKILL takes nothing back
        with run.open() as repo, pytest.raises(KeyboardInterrupt):
            repo.repair_packs([pid], dry_run=False)
    with run.open() as repo:
        repo.store.load_index()
        assert repo.store.unindexed_packs(), "the killed repair stored no salvage"
    run_cli("repair", "-r", run.repo, "packs", pid, "--confirm", "REPAIR", env=run.env)
    crashdrills._salvaged(run)
