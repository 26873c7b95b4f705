"""`run` and `daemon` under faults: a clock set back, a full log disk, a lock-file directory gone, a closed
report pipe, a stop while a backup waits or retries, and the log lines that say what happened."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from chunkvault import Repository
from chunkvault.errors import Locked, RemoteRetryWarning, RemoteUnavailable
from chunkvault.remotes.layer import RetryingRemote, stop_request
from chunkvault.scheduler import (Daemon, RunReport, Runner, SourceResult, _Log, _quiet, _warnings_logged,
                                  load_policy, policy_lock)
from chunkvault.store.retention import policy_from_dict
from test_scheduler import (DAEMON, PASSWORD, FakeClock, cli_main, fake_time, q, repo_url, snapshots,  # noqa: F401
                            start_daemon, tree, wait_for, write_policy)

UTC = timezone.utc
HOURLY = 'full = "daily 02:00"\ndiff = "hourly"\n'


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    return env


def _posted(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


# --------------------------------------------------------------------------- 1. a clock set back


def test_only_snapshots_dated_more_than_ahead_are_left_out_of_retention():
    from chunkvault.schedule import AHEAD, dated_ahead, retention_scope

    now = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    snap = lambda sid, t: SimpleNamespace(id=sid, datetime=t, time=t, kind="full", parent=None,  # noqa: E731
                                          host="h", paths=["/d"], tags=[])
    edge, beyond, past = snap("a", now + AHEAD), snap("b", now + AHEAD + timedelta(seconds=1)), snap("c", now)
    assert not dated_ahead(edge.datetime, now) and dated_ahead(beyond.datetime, now)
    scope = retention_scope([beyond, edge, past], policy_from_dict({"keep-last": 1}), now, saved="c")
    assert [s.id for s in scope.weighed] == ["a"] and [s.id for s in scope.ahead] == ["b"]
    assert scope.spared == "c"  # keep-last 1 keeps the one dated 5 min ahead: the run's own is kept aside


def test_snapshots_dated_ahead_do_not_crowd_out_the_backups_made_after_the_clock_is_set_back(
        tmp_path, repo_url, tree, fake_time):
    """Two snapshots made while the clock ran a month ahead filled keep-last 2: every backup made after NTP
    corrected the clock was removed by the retention of its own run, for a month."""
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top=HOURLY + "retention = { keep-last = 2 }\n")))
    right = datetime(2026, 12, 4, 10, 31, tzinfo=UTC)
    clock = fake_time(FakeClock(right + timedelta(days=30)))
    log: list[str] = []
    runner = Runner(policy, PASSWORD.encode(), clock=clock, log=log.append, lock_file=str(tmp_path / "l"))
    ahead = [runner.run().sources[0].snapshot_id]
    clock.t += timedelta(hours=1)
    (tree / "notes.txt").write_text("ahead\n")
    ahead.append(runner.run().sources[0].snapshot_id)
    clock.t = right
    made = []
    for i in range(3):
        clock.t += timedelta(hours=1)
        (tree / "notes.txt").write_text(f"real {i}\n")
        log.clear()
        result = runner.run().sources[0]
        made.append(result.snapshot_id)
        assert result.status == "ok" and result.snapshot_id not in result.retention.removed
        newest = (right + timedelta(days=30, hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        warned = [line for line in log if "dated ahead of this clock" in line]
        assert len(warned) == 1 and f"2 snapshot(s) dated ahead of this clock (newest {newest})" in warned[0]
    assert {s.id for s in snapshots(repo_url)} == set(ahead) | set(made[1:])  # kept; keep-last 2 of the rest


def test_a_run_never_forgets_the_snapshot_it_saved(tmp_path, repo_url, tree, fake_time):
    """Rules that keep no differential (only keep-full-within) removed each differential in the run that
    made it; the run keeps its own, says so, and the next run applies the rules to it."""
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top=HOURLY + 'retention = { keep-full-within = "2d" }\n')))
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    log: list[str] = []
    runner = Runner(policy, PASSWORD.encode(), clock=clock, log=log.append, lock_file=str(tmp_path / "l"))
    full = runner.run().sources[0].snapshot_id
    made = []
    for i in range(2):
        clock.t += timedelta(hours=1)
        (tree / "notes.txt").write_text(f"v{i}\n")
        result = runner.run().sources[0]
        assert result.kind == "diff" and result.retention.removed == made[-1:]
        made.append(result.snapshot_id)
        assert f"db: warning: retention keeps the snapshot {made[-1][:8]} this run saved" in " ".join(log)
    assert [s.id for s in snapshots(repo_url)] == [full, made[-1]]


# --------------------------------------------------------------------------- 2. the log file's disk full


def test_a_log_file_that_cannot_be_written_is_given_up_for_stderr(capsys):
    clock = lambda: datetime(2026, 3, 1, 2, 0, tzinfo=UTC)  # noqa: E731
    log = _Log("/dev/full", clock)
    log("db: full snapshot 1234 saved")
    log("run: 1 backup(s)")
    log.close()
    assert capsys.readouterr().err.splitlines() == [
        "2026-03-01T02:00:00Z log file /dev/full could not be written (No space left on device): "
        "logging to stderr from now on",
        "2026-03-01T02:00:00Z db: full snapshot 1234 saved",
        "2026-03-01T02:00:00Z run: 1 backup(s)"]


def _stderr_of_a_first_run(tmp_path, args: list[str], stdout) -> str:
    """What a daemon started with ``args`` wrote to stderr until its first run ended and SIGTERM stopped it."""
    err = tmp_path / "stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", DAEMON, "daemon", *args], env=_env(), stdout=stdout,
                                stderr=stderr)
    try:
        wait_for(lambda: "next run at" in err.read_text(), proc, "the first run")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    return err.read_text()


def test_a_daemon_whose_log_disk_is_full_keeps_running(tmp_path, repo_url, tree):
    """It died with "internal error: OSError" at the first line it could not write."""
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "0 0 1 1 *"\n')
    text = _stderr_of_a_first_run(tmp_path, ["--config", str(policy), "--log", "/dev/full"], subprocess.DEVNULL)
    assert text.count("log file /dev/full could not be written (No space left on device)") == 1, text
    assert "db: full snapshot" in text and "daemon stopped" in text and "internal error" not in text
    assert [s.kind for s in snapshots(repo_url)] == ["full"]


def test_a_report_line_that_cannot_be_written_is_logged_without_saying_the_daemon_stopped(tmp_path, repo_url, tree):
    """``daemon --json`` onto a full disk logged that the command "stopped there", and went on to its next run."""
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "0 0 1 1 *"\n')
    with open("/dev/full", "w") as full:
        text = _stderr_of_a_first_run(tmp_path, ["--json", "--config", str(policy)], full)
    assert "the run's report was not written: no space left on device while writing to standard output\n" in text
    assert "next run at" in text.split("report was not written")[1], text


# --------------------------------------------------------------------------- 3. -q


def test_quiet_drops_routine_lines_only():
    kept: list[str] = []
    quiet = _quiet(kept.append)
    for line in ("db: nothing due (next slot 2026-03-01T03:00:00Z)",
                 "db: retention removed 1 snapshot(s), rebased 0, kept 2",
                 "db: retention failed: refused put locks/x: append-only",
                 "db: retention skipped, the backup failed",
                 "db: full snapshot 1234abcd saved (slot 2026-03-01T02:00:00Z, 0.1 s)"):
        quiet(line)
    assert kept == ["db: retention failed: refused put locks/x: append-only",
                    "db: retention skipped, the backup failed",
                    "db: full snapshot 1234abcd saved (slot 2026-03-01T02:00:00Z, 0.1 s)"]


# --------------------------------------------------------------------------- 4. a stop while the backup waits


def test_a_stop_while_the_backup_waits_for_the_repository_lock_is_stopped_not_failed(tmp_path, repo_url, tree):
    """It was a failed backup: "ok": false, and the post hook told CHUNKVAULT_RESULT=failed."""
    from chunkvault.store import locks
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    env_out = tmp_path / "post.env"
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "post": f"env | grep ^CHUNKVAULT_ > {q(str(env_out))}"}],
        top='full = "daily 02:00"\n')))
    stop, log = threading.Event(), []
    held, done = threading.Event(), threading.Event()

    def prune_for_a_while() -> None:
        with Repository.open(repo_url, PASSWORD) as r, RepoLock(r.store.remote, EXCLUSIVE, "prune"):
            held.set()
            done.wait(60)

    def stop_soon(*_) -> None:
        stop.set()
        locks.stop_waiting.set()

    holder = threading.Thread(target=prune_for_a_while)
    holder.start()
    held.wait(30)
    previous, locks.announce_wait = locks.announce_wait, stop_soon
    try:
        report = Runner(policy, PASSWORD.encode(), stop=stop, log=log.append, lock_file=str(tmp_path / "l")).run()
    finally:
        locks.announce_wait = previous
        locks.stop_waiting.clear()
        done.set()
        holder.join()
    db = report.sources[0]
    assert report.stopped and report.ok and (db.status, db.error) == ("skipped", None)
    assert db.reason.startswith("stopping (repository is locked by")
    assert _posted(env_out)["CHUNKVAULT_RESULT"] == "skipped"
    assert any(line.startswith("db: full backup skipped, stopping (") for line in log), log
    assert "0 failed" in report.summary() and report.summary().endswith("(stopped early)")


# --------------------------------------------------------------------------- 5. run --log


def test_run_logs_a_run_that_ended_before_any_source(tmp_path, repo_url, tree, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "daily 02:00"\n')
    log = tmp_path / "run.log"
    with policy_lock(str(policy) + ".lock"):
        assert cli_main(["run", "--config", str(policy), "--log", str(log)]) == Locked.exit_code
    assert re.search(r"^\S+Z run skipped: another run of this policy is in progress", log.read_text(), re.M)
    gone = write_policy(tmp_path / "gone.toml", str(tmp_path / "no-repo"), [{"name": "db", "paths": [str(tree)]}],
                        top='full = "daily 02:00"\n')
    assert cli_main(["run", "--config", str(gone), "--log", str(log)]) == 10
    last = log.read_text().splitlines()[-1]
    assert " run failed: " in last and "no-repo" in last


def test_run_logs_its_summary(tmp_path, repo_url, tree, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "daily 02:00"\n')
    assert cli_main(["run", "--config", str(policy), "--log", str(tmp_path / "run.log"), "-q"]) == 0
    last = (tmp_path / "run.log").read_text().splitlines()[-1]
    assert last.endswith(" run: 1 backup(s), 0 failed, 0 partial; retention removed 0")


# --------------------------------------------------------------------------- 6. the lock file's directory


def test_a_daemon_goes_on_when_its_lock_file_s_directory_disappears(tmp_path, repo_url, tree, fake_time):
    """It exited 2 at the next slot ("cannot open lock file"): /run/chunkvault cleaned under it."""
    base = tmp_path / "base"
    lock = base / "run" / "p.lock"
    lock.parent.mkdir(parents=True)
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top=HOURLY)))
    stop = threading.Event()
    clock = fake_time(FakeClock(datetime(2026, 3, 1, 3, 10, tzinfo=UTC), stop))
    world = iter([lambda: shutil.rmtree(lock.parent),  # its own directory: made again
                  lambda: shutil.rmtree(base),  # the one above too: that run fails, the daemon goes on
                  lambda: base.mkdir(),
                  stop.set])
    hour = [clock.t.hour]

    def during_sleep(c: FakeClock) -> None:
        if c.t.hour != hour[0]:
            hour[0] = c.t.hour
            next(world)()

    clock.during_sleep = during_sleep
    log: list[str] = []
    reports: list[RunReport] = []
    runner = Runner(policy, PASSWORD.encode(), clock=clock, stop=stop, log=log.append, lock_file=str(lock))
    assert Daemon(runner, clock=clock, sleep=clock.sleep, log=log.append, on_report=reports.append).serve() == 0
    assert [r.error is None for r in reports] == [True, True, False, True]
    assert f"cannot open lock file {lock}: No such file or directory" in reports[2].error
    assert [s.kind for s in snapshots(repo_url)] == ["full", "diff", "diff"]


# --------------------------------------------------------------------------- 7. the JSON reader gone


def test_a_daemon_whose_json_reader_went_away_stops_saying_why(tmp_path, repo_url, tree):
    """`daemon --json | head -n 1`: the run that saved a snapshot was logged as "run failed: internal error:
    BrokenPipeError", and the daemon ended without a word."""
    log = tmp_path / "d.log"
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "0 0 1 1 *"\n')
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        proc = subprocess.Popen([sys.executable, "-c", DAEMON, "daemon", "--config", str(policy), "--json",
                                 "--log", str(log)], env=_env(), stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err.decode() == ""
    lines = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert lines[1].startswith("db: full snapshot ") and lines[2].startswith("run: 1 backup(s), 0 failed")
    assert lines[3:] == ["daemon stopping: standard output was closed by its reader: no more report lines "
                         "can be written", "daemon stopped"]


# --------------------------------------------------------------------------- 8. the first stop signal


def test_a_stop_during_the_pre_hook_skips_the_backup(tmp_path, repo_url, tree, monkeypatch):
    """The whole backup still ran after the hook, minutes past "stopping after the step in progress"."""
    from chunkvault import scheduler

    env_out = tmp_path / "post.env"
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": "true",
         "post": f"env | grep ^CHUNKVAULT_ > {q(str(env_out))}"}], top='full = "daily 02:00"\n')))
    stop = threading.Event()
    real = scheduler.run_hook

    def hook_then_stop(*args, **kwargs):
        done = real(*args, **kwargs)
        stop.set()  # SIGTERM while the hook ran
        return done

    monkeypatch.setattr(scheduler, "run_hook", hook_then_stop)
    report = Runner(policy, PASSWORD.encode(), stop=stop, lock_file=str(tmp_path / "l")).run()
    assert report.stopped and report.ok and report.sources[0].status == "skipped"
    assert snapshots(repo_url) == [] and _posted(env_out)["CHUNKVAULT_RESULT"] == "skipped"


class _Down:
    """A remote that refuses every connection."""

    display_url, fork_safe, cheap_ranges = "stub://down", True, False

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        raise RemoteUnavailable("connection refused")


def test_a_daemon_s_first_stop_signal_ends_the_retries_of_a_remote_that_is_down(tmp_path, repo_url, tree,
                                                                               monkeypatch, capsys):
    """Only a second signal did: a first SIGTERM left it retrying for retry-time (15 min), past a service
    manager's stop timeout (SIGKILL: no post hook, a lock left behind)."""
    retried: list[float] = []

    def backup_while_the_remote_is_down(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        RetryingRemote(_Down(), attempts=20, timeout=None, sleep=retried.append).get("data/ab")

    monkeypatch.setattr(Repository, "backup", backup_while_the_remote_is_down)
    monkeypatch.setattr(stop_request, "grace", 0.0)
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "daily 02:00"\n')
    try:
        code = cli_main(["daemon", "--config", str(policy), "--json", "--log", str(tmp_path / "d.log")])
    finally:
        stop_request.clear()
    assert code == 0 and retried == []
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    db = line["sources"][0]
    assert line["ok"] and line["stopped"] and db["status"] == "skipped" and "told to stop" in db["reason"]
    assert "stopped by SIGTERM" in (tmp_path / "d.log").read_text()


# --------------------------------------------------------------------------- the small ones


def test_the_next_run_logged_after_a_long_run_is_still_ahead(tmp_path, repo_url, tree, fake_time):
    """A run longer than the interval logged "next run at" a time already past, then ran again at once."""
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top=HOURLY)))
    stop = threading.Event()
    clock = fake_time(FakeClock(datetime(2026, 3, 1, 10, 0, tzinfo=UTC), stop, datetime(2026, 3, 1, 16, 0, tzinfo=UTC)))
    runner = Runner(policy, PASSWORD.encode(), clock=clock, stop=stop, lock_file=str(tmp_path / "l"))
    real = runner.run

    def long_run(**kwargs) -> RunReport:
        report = real(**kwargs)
        clock.t += timedelta(minutes=70)
        return report

    runner.run = long_run
    logged: list[tuple[datetime, str]] = []
    daemon = Daemon(runner, clock=clock, sleep=clock.sleep, log=lambda line: logged.append((clock.t, line)))
    assert daemon.serve() == 0
    wakes = [(at, datetime.fromisoformat(line.split()[-1].replace("Z", "+00:00")))
             for at, line in logged if line.startswith("next run at")]
    assert wakes and all(wake > at for at, wake in wakes), wakes
    assert daemon.runs == 3  # 10:00, 12:00, 14:00: one run per slot still ahead when the last one ended


def test_a_source_whose_retention_alone_failed_is_not_a_failed_backup_too():
    report = RunReport(datetime(2026, 3, 1, tzinfo=UTC), False,
                       [SourceResult("db", "ok", retention_error="retention: refused: append-only")])
    assert report.summary() == "run: 1 backup(s), 0 failed, 0 partial; retention removed 0, failed 1"
    assert not report.ok


def test_a_daemon_s_warnings_on_stderr_are_timestamped(capsys):
    log = _Log(None, lambda: datetime(2026, 3, 1, 2, 0, tzinfo=UTC))
    with warnings.catch_warnings(), _warnings_logged(log):
        warnings.simplefilter("always")
        warnings.warn("stub://down: get data/ab failed; retrying in 1.0 s", RemoteRetryWarning)
    assert capsys.readouterr().err.splitlines() == [
        "2026-03-01T02:00:00Z warning: stub://down: get data/ab failed; retrying in 1.0 s"]


def test_with_a_log_file_a_run_s_warnings_go_there_alone(tmp_path, capsys):
    """`--log FILE` logs instead of stderr: a remote retried or a lock waited for was written to both, and a
    service manager's journal kept a second copy of each."""
    log = _Log(str(tmp_path / "daemon.log"), lambda: datetime(2026, 3, 1, 2, 0, tzinfo=UTC))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest: sys.stderr.write(f"{message}\n")  # as the command's
        with _warnings_logged(log):
            warnings.warn("stub://down: get data/ab failed; retrying in 1.0 s", RemoteRetryWarning)
    log.close()
    assert capsys.readouterr().err == ""
    assert (tmp_path / "daemon.log").read_text().splitlines() == [
        "2026-03-01T02:00:00Z warning: stub://down: get data/ab failed; retrying in 1.0 s"]


# --------------------------------------------------------------------------- 9. stops, log rotation, hooks, -q


def test_a_stop_sent_to_the_process_group_skips_a_command_source_not_fails_it(tmp_path, repo_url, tree):
    """Ctrl-C in a terminal, and systemd's stop, signal the whole process group: the dump was killed with the
    daemon and its source reported failed (post hook: result=failed), not stopped."""
    started = tmp_path / "started"
    posted = tmp_path / "posted"
    policy = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "dump", "command": f"touch {q(str(started))}; echo part1; sleep 30; echo part2",
         "stdin-name": "dump.sql", "post": f"echo CHUNKVAULT_RESULT=$CHUNKVAULT_RESULT > {q(str(posted))}"}],
        top='full = "daily 02:00"\n')
    log = tmp_path / "d.log"
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, "daemon", "--config", str(policy), "--log", str(log),
                             "--json"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for(started.exists, proc, "the command")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode()
    (run,) = [json.loads(line) for line in out.decode().splitlines()]
    (source,) = run["sources"]
    assert source["status"] == "skipped" and run["stopped"], run
    assert _posted(posted)["CHUNKVAULT_RESULT"] == "skipped"
    assert snapshots(repo_url) == []


def test_sighup_opens_the_daemon_s_log_file_again_after_rotation(tmp_path, repo_url, tree):
    """logrotate moves the file, then sends SIGHUP: every later line went into the rotated file."""
    log, rotated = tmp_path / "d.log", tmp_path / "d.log.1"
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "0 0 1 1 *"\n')
    proc = start_daemon(policy, log)
    try:
        wait_for(lambda: log.exists() and "next run at" in log.read_text(), proc, "first run")
        log.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "next run at" in log.read_text(), proc, "the run after the reload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "daemon stopped" in log.read_text() and "daemon stopped" not in rotated.read_text()


def test_a_failed_post_hook_after_a_saved_snapshot_still_applies_retention(tmp_path, repo_url, tree, fake_time):
    """Retention was skipped as after a failed backup, though the snapshot was saved: while a notification
    hook was broken, snapshots piled up past every rule, and the summary said 0 backups."""
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "post": "exit 1", "retention": {"keep-last": 1}}],
        top='full = "every 1h"\n')))
    log: list[str] = []
    clock = fake_time(FakeClock(datetime(2026, 3, 2, 10, 0, 30, tzinfo=UTC)))
    for hour in range(3):
        clock.t = datetime(2026, 3, 2, 10 + hour, 0, 30, tzinfo=UTC)
        report = Runner(policy, PASSWORD.encode(), log=log.append, lock_file=str(tmp_path / "l"),
                        clock=clock).run()
        (db,) = report.sources
        assert db.status == "failed" and db.snapshot_id and db.retention is not None
    assert [s.id for s in snapshots(repo_url)] == [db.snapshot_id]
    assert report.summary().startswith("run: 1 backup(s), 0 failed, 0 partial, 1 post hook(s) failed; retention "
                                       "removed 1")
    assert not any("retention skipped" in line for line in log)


def test_run_quiet_or_json_shows_what_a_failing_command_said(tmp_path, repo_url, tree, monkeypatch, capsys):
    """Without --log, -q and --json dropped every line: a dump's own error (pg_dump: role does not exist) was
    nowhere.  A run that fails shows its lines on stderr; one that succeeds stays quiet."""
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    failing = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "command": "echo 'pg_dump: error: role app does not exist' >&2; exit 1",
         "stdin-name": "db.sql"}], top='full = "daily 02:00"\n')
    for flag in ("-q", "--json"):
        assert cli_main(["run", "--config", str(failing), flag]) == 1
        err = capsys.readouterr().err
        assert "db: command: pg_dump: error: role app does not exist" in err
        assert err.strip().splitlines()[-1].startswith("chunkvault: scheduled run failed: db (")
    fine = write_policy(tmp_path / "q.toml", repo_url, [{"name": "files", "paths": [str(tree)]}],
                        top='full = "daily 02:00"\n')
    assert cli_main(["run", "--config", str(fine), "-q"]) == 0
    assert capsys.readouterr().err == ""
