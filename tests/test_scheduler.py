"""The scheduler against real repositories: simulated days, hooks, the CLI, and a real daemon process."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from chunkvault import Repository
from chunkvault.errors import ChunkvaultError, Locked, PartialBackup, UsageError
from chunkvault.scheduler import (Daemon, Runner, RunReport, SourceResult, load_policy,
                                  policy_lock)
from chunkvault.store.retention import RetentionPolicy
from faults import stopped_inside_popen
from treeutil import settle
from walsegments import write_segment

UTC = timezone.utc
PASSWORD = "scheduled secret"
HERE = os.path.dirname(os.path.abspath(__file__))


def cli_main(argv: list[str]) -> int:
    from chunkvault import cli

    return cli.main(argv)


class FakeClock:
    """An injected clock; ``sleep`` advances it and can run a callback (the world changing meanwhile)."""

    def __init__(self, start: datetime, stop: threading.Event | None = None, end: datetime | None = None):
        self.t = start
        self.stop = stop
        self.end = end
        self.sleeps: list[float] = []
        self.during_sleep = None

    def __call__(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=seconds)
        if self.during_sleep is not None:
            self.during_sleep(self)
        if self.end is not None and self.t >= self.end:
            self.stop.set()


def q(s: str) -> str:
    """A TOML string literal."""
    return json.dumps(s)


def write_policy(path: Path, repo: str, sources: list[dict], *, top: str = "") -> Path:
    lines = [f"repository = {q(repo)}", top]
    for s in sources:
        lines.append("[[source]]")
        for k, v in s.items():
            if isinstance(v, list):
                lines.append(f"{k} = [{', '.join(q(x) for x in v)}]")
            elif isinstance(v, dict):
                lines.append(f"{k} = {{ {', '.join(f'{kk} = {q(vv)}' for kk, vv in v.items())} }}")
            else:
                lines.append(f"{k} = {q(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def repo_url(tmp_path):
    url = str(tmp_path / "repo")
    Repository.init(url, PASSWORD, kdf_seconds=0).close()
    return url


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "base.bin").write_bytes(os.urandom(50_000))
    (src / "notes.txt").write_text("hello\n")
    return src


@pytest.fixture
def fake_time(monkeypatch):
    """Snapshots take their time from the injected clock (the API has no time parameter yet)."""
    holder: dict[str, FakeClock] = {}

    def install(clock: FakeClock) -> FakeClock:
        holder["clock"] = clock
        monkeypatch.setattr("chunkvault.store.backup.now_iso",
                            lambda: holder["clock"]().isoformat(timespec="microseconds"))
        return clock

    return install


def snapshots(url: str):
    with Repository.open(url, PASSWORD) as r:
        return sorted(r.snapshots(), key=lambda s: s.time)


def restore_text(url: str, snap_id: str, target: Path, name: str) -> str:
    with Repository.open(url, PASSWORD) as r:
        r.restore(snap_id, str(target))
    return (target / name).read_text()


# --------------------------------------------------------------------------- simulated days


def test_three_days_daily_fulls_hourly_diffs_with_retention(tmp_path, repo_url, tree, fake_time):
    start = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    end = datetime(2026, 3, 4, 0, 0, tzinfo=UTC)
    # The pre hook stands in for a database dump: it records the slot being served in the tree.
    pre = 'echo "$CHUNKVAULT_SLOT" > slot.txt && echo "$CHUNKVAULT_SLOT $CHUNKVAULT_KIND" >> history.txt'
    policy_path = write_policy(tmp_path / "policy.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "host": "dbhost", "pre": ["sh", "-c", f"cd {q(str(tree))} && {pre}"]},
    ], top='full = "daily 02:00"\ndiff = "hourly"\n'
           '[retention]\nkeep-full-within = "2d"\nkeep-diff-within = "1d"\n')
    policy = load_policy(str(policy_path))
    stop = threading.Event()
    clock = fake_time(FakeClock(start, stop, end))
    log: list[str] = []
    reports: list[RunReport] = []
    runner = Runner(policy, PASSWORD.encode(), clock=clock, stop=stop, log=log.append,
                    lock_file=str(tmp_path / "policy.lock"))
    daemon = Daemon(runner, clock=clock, sleep=clock.sleep, log=log.append, on_report=reports.append)
    assert daemon.serve() == 0

    # one run per hour, each exactly at its slot, sleeping in steps of at most a minute
    assert [r.started for r in reports] == [start + timedelta(hours=h) for h in range(72)]
    assert max(clock.sleeps) <= 60
    made = [(r.started, r.sources[0].kind) for r in reports]
    assert all(r.ok for r in reports)
    assert [t for t, k in made if k == "full"] == [start, start + timedelta(hours=2), start + timedelta(hours=26),
                                                  start + timedelta(hours=50)]

    # retention at the last run (Mar 3 23:00): fulls newer than Mar 1 23:00, diffs newer than Mar 2 23:00
    final = snapshots(repo_url)
    got = [(s.datetime, s.kind) for s in final]
    mar = lambda d, h: datetime(2026, 3, d, h, tzinfo=UTC)  # noqa: E731
    expected = sorted([(mar(2, 2), "full"), (mar(3, 2), "full")]
                      + [(mar(3, h), "diff") for h in range(24) if h != 2])
    assert got == expected
    by_time = {s.datetime: s for s in final}
    # the kept diffs of Mar 3 00:00 and 01:00 lost their parents (Mar 2 03:00..23:00) and were rebased
    assert by_time[mar(3, 0)].parent == by_time[mar(2, 2)].id
    assert by_time[mar(3, 1)].parent == by_time[mar(3, 0)].id
    assert by_time[mar(3, 3)].parent == by_time[mar(3, 2)].id
    # ... and still restore exactly what was backed up then
    history = restore_text(repo_url, by_time[mar(3, 1)].id, tmp_path / "r1", "history.txt").splitlines()
    assert history[-1] == "2026-03-03T01:00:00Z diff" and len(history) == 50
    assert restore_text(repo_url, by_time[mar(3, 23)].id, tmp_path / "r2", "history.txt") == (
        tree / "history.txt").read_text()
    assert any("retention removed" in line for line in log)


def test_daemon_catches_up_once_after_a_suspend_and_survives_failed_runs(tmp_path, tree, fake_time):
    url = str(tmp_path / "later-repo")  # does not exist yet: the first run fails
    flag = tmp_path / "ready"
    policy_path = write_policy(tmp_path / "p.toml", url, [
        {"name": "db", "paths": [str(tree)], "pre": f"test -e {q(str(flag))} || exit 7"}],
        top='full = "daily 02:00"\ndiff = "hourly"\n')
    policy = load_policy(str(policy_path))
    stop = threading.Event()
    start = datetime(2026, 3, 1, 3, 10, tzinfo=UTC)
    clock = fake_time(FakeClock(start, stop))
    log: list[str] = []
    reports: list[RunReport] = []
    world = iter([
        lambda: Repository.init(url, PASSWORD, kdf_seconds=0).close(),  # before the 04:00 run
        lambda: flag.touch(),  # before the 05:00 run
        lambda: setattr(clock, "t", clock.t + timedelta(hours=5, minutes=30)),  # suspended from 05:xx to 11:xx
        lambda: stop.set(),
    ])
    last_hour = [start.hour]

    def during_sleep(c: FakeClock) -> None:
        if c.t.hour != last_hour[0]:
            last_hour[0] = c.t.hour
            next(world)()

    clock.during_sleep = during_sleep
    runner = Runner(policy, PASSWORD.encode(), clock=clock, stop=stop, log=log.append,
                    lock_file=str(tmp_path / "p.lock"))
    assert Daemon(runner, clock=clock, sleep=clock.sleep, log=log.append, on_report=reports.append).serve() == 0

    assert any(line.startswith("run failed:") and "later-repo" in line for line in log)  # no repository yet
    assert not reports[0].ok and "later-repo" in reports[0].to_dict()["run_error"] and not reports[0].sources
    reports = reports[1:]  # a JSON line for it too, as for every run
    statuses = [(r.started.strftime("%H:%M"), r.sources[0].status, r.sources[0].kind) for r in reports]
    assert statuses[0] == ("04:00", "failed", "full")  # pre hook exited 7: still due at the next slot
    assert statuses[1] == ("05:00", "ok", "full")
    # the clock jumped from 05:xx to 11:xx: the 06..11 diff slots are served by one backup, once
    assert statuses[2][1:] == ("ok", "diff") and statuses[2][0].startswith("11:")
    assert [s.kind for s in snapshots(url)] == ["full", "diff"]
    assert any("pre hook exited 7" in line for line in log)


def test_a_daemon_whose_clock_is_set_back_counts_its_slots_from_the_corrected_time(tmp_path, repo_url, tree,
                                                                                  fake_time):
    """Started with the clock a month ahead (before NTP corrected it, or a VM restored), the daemon made its
    full; stepped back, it slept towards the slot after that run, a month off, and made no backup."""
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top='full = "daily 02:00"\ndiff = "hourly"\n')))
    stop = threading.Event()
    right = datetime(2026, 12, 4, 10, 31, tzinfo=UTC)
    clock = fake_time(FakeClock(right + timedelta(days=30), stop))

    def ntp(c: FakeClock) -> None:
        if c.t > right + timedelta(days=30):
            c.t = right + timedelta(minutes=1)  # a minute after the daemon's first run
        elif c.t > right + timedelta(hours=3, minutes=5):
            stop.set()

    clock.during_sleep = ntp
    log: list[str] = []
    reports: list[RunReport] = []
    runner = Runner(policy, PASSWORD.encode(), clock=clock, stop=stop, log=log.append,
                    lock_file=str(tmp_path / "p.lock"))
    Daemon(runner, clock=clock, sleep=clock.sleep, log=log.append, on_report=reports.append).serve()
    assert any("the clock went back" in line for line in log)
    made = [(r.started, r.sources[0].kind) for r in reports if r.sources and r.sources[0].status == "ok"]
    assert made[0] == (right + timedelta(days=30), "full")
    # the corrected clock's slots: 11:00 (the full dated a month ahead does not count), 12:00, 13:00
    assert [(t.strftime("%d %H:%M"), kind) for t, kind in made[1:]] == [
        ("04 11:00", "full"), ("04 12:00", "diff"), ("04 13:00", "diff")]


def test_sleep_is_computed_not_polled(tmp_path, repo_url, tree, fake_time):
    """Nothing due for hours: the daemon sleeps towards the next slot in capped steps, without running.  The
    clock is set months from the yearly slot (taken from this machine's, the three hours before New Year's
    midnight ran the slot's full)."""
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top='full = "0 0 1 1 *"\n')))
    stop = threading.Event()
    now = datetime(2026, 6, 15, 10, 0, tzinfo=UTC)
    clock = fake_time(FakeClock(now, stop, now + timedelta(hours=3)))
    runner = Runner(policy, PASSWORD.encode(), clock=clock, stop=stop, lock_file=str(tmp_path / "l"))
    daemon = Daemon(runner, clock=clock, sleep=clock.sleep, max_sleep=600)
    assert daemon.serve() == 0
    assert daemon.runs == 1  # the initial run (a full), then only sleeping
    assert len(clock.sleeps) == 18 and all(s == 600 for s in clock.sleeps)


def test_a_policys_repack_limit_reaches_the_prune_of_a_run(tmp_path, repo_url, tree, fake_time, monkeypatch):
    asked: dict = {}
    real = Repository.prune

    def prune(self, **options):
        asked.update(options)
        return real(self, **options)

    monkeypatch.setattr(Repository, "prune", prune)
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top='full = "daily 02:00"\ndiff = "hourly"\nprune = true\n'
                                              'max-repack-size = "2M"\n[retention]\nkeep-last = 1\n')))
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    runner = Runner(policy, PASSWORD.encode(), clock=clock, lock_file=str(tmp_path / "l"))
    runner.run()
    clock.t += timedelta(hours=1)
    assert runner.run().prune is not None
    assert asked["max_repack_size"] == 2 << 20


def test_retention_then_prune_frees_what_the_forgotten_full_held(tmp_path, repo_url, tree, fake_time):
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top='full = "daily 02:00"\ndiff = "hourly"\nprune = true\n'
                                              'max-unused = "0%"\n[retention]\nkeep-last = 1\n')))
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    runner = Runner(policy, PASSWORD.encode(), clock=clock, lock_file=str(tmp_path / "l"))
    first = runner.run()
    assert first.sources[0].kind == "full" and first.prune is None  # nothing removed, nothing to prune
    (tree / "base.bin").write_bytes(os.urandom(50_000))  # the old content is now only in the full
    clock.t += timedelta(hours=1)
    second = runner.run()
    assert second.sources[0].kind == "diff"
    assert second.sources[0].retention.removed == [first.sources[0].snapshot_id]
    assert second.prune is not None and second.prune["freed_bytes"] >= 50_000
    (only,) = snapshots(repo_url)
    assert only.id == second.sources[0].snapshot_id and only.kind == "full"  # rebased: it absorbed its parent
    with Repository.open(repo_url, PASSWORD) as r:
        assert r.check(read_data=True).ok
        r.restore(only.id, str(tmp_path / "r"))
    assert (tmp_path / "r" / "base.bin").read_bytes() == (tree / "base.bin").read_bytes()


def test_wal_expire_removes_the_wal_no_kept_snapshot_needs_then_prune_frees_it(tmp_path, repo_url, tree, fake_time):
    """As pgBackRest expires WAL with its backups: after retention, the archived segments before the oldest
    kept base backup's start go (archive-expire --before oldest-snapshot), and prune frees their data."""
    wal = tmp_path / "wal"
    wal.mkdir()
    with Repository.open(repo_url, PASSWORD) as r:
        for i in range(1, 6):
            seg = write_segment(wal, f"00000001000000000000000{i}", i, 1 << 20)
            r.archive_push(str(seg))

    def label(seg: int) -> None:
        (tree / "backup_label").write_text(f"START WAL LOCATION: 0/{seg}000028 (file 00000001000000000000000{seg})\n")

    policy_file = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "hourly"\nprune = true\nmax-unused = "0%"\nwal-expire = true\n'
                                   '[retention]\nkeep-last = 1\n')
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    runner = Runner(load_policy(str(policy_file)), PASSWORD.encode(), clock=clock, lock_file=str(tmp_path / "l"))
    label(2)
    first = runner.run()
    assert first.ok and first.wal_expired == ["000000010000000000000001"] and first.prune is not None
    label(4)
    clock.t += timedelta(hours=1)
    dry = runner.run(dry_run=True)
    assert dry.wal_expired == [] and "wal-expire" not in dry.summary()  # the dry run's snapshot is not saved
    second = runner.run()
    assert second.sources[0].retention.removed == [first.sources[0].snapshot_id]
    assert second.wal_expired == ["000000010000000000000002", "000000010000000000000003"]
    assert "; wal-expire removed 2" in second.summary() and second.to_dict()["wal_expired"] == second.wal_expired
    with Repository.open(repo_url, PASSWORD) as r:
        assert [w.name for w in r.archive_list()] == ["000000010000000000000004", "000000010000000000000005"]
        assert r.check(read_data=True).ok


def test_wal_expire_without_a_base_backup_expires_nothing_and_the_run_goes_on(tmp_path, repo_url, tree, fake_time):
    policy_file = write_policy(tmp_path / "p.toml", repo_url, [{"name": "files", "paths": [str(tree)]}],
                               top='full = "hourly"\nwal-expire = true\n[retention]\nkeep-last = 1\n')
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    logged: list[str] = []
    runner = Runner(load_policy(str(policy_file)), PASSWORD.encode(), clock=clock, lock_file=str(tmp_path / "l"),
                    log=logged.append)
    report = runner.run()
    assert report.ok and report.wal_expired is None
    assert any("wal-expire: no snapshot holds a base backup" in line for line in logged)


# --------------------------------------------------------------------------- hooks


def test_pre_hook_failure_skips_the_backup_and_post_hook_sees_it(tmp_path, repo_url, tree):
    env_out = tmp_path / "post.env"
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": "echo dumping; exit 3",
         "post": f"env | grep ^CHUNKVAULT_ | sort > {q(str(env_out))}"},
        {"name": "other", "paths": [str(tmp_path / "p.toml")]},
    ], top='full = "daily 02:00"\n')))
    log: list[str] = []
    report = Runner(policy, PASSWORD.encode(), log=log.append, lock_file=str(tmp_path / "l")).run()
    db, other = report.sources
    assert (db.status, db.pre_exit, db.snapshot_id, db.error) == ("failed", 3, None, "pre hook exited 3")
    assert other.status == "ok"
    assert [s.paths for s in snapshots(repo_url)] == [[str(tmp_path / "p.toml")]]
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    assert env["CHUNKVAULT_RESULT"] == "failed" and env["CHUNKVAULT_SNAPSHOT_ID"] == ""
    assert env["CHUNKVAULT_ERROR"] == "pre hook exited 3" and env["CHUNKVAULT_KIND"] == "full"
    assert "db: pre: dumping" in log
    with pytest.raises(ChunkvaultError) as e:
        report.raise_for_status()
    assert e.value.exit_code == 1 and "db (pre hook exited 3)" in str(e.value)


def test_a_hook_killed_by_a_signal_is_said_so_not_as_a_negative_exit(tmp_path):
    """A pre hook the OOM killer ended was reported as "pre hook exited -9"."""
    from chunkvault.scheduler import run_hook

    rc, error = run_hook("kill -9 $$", dict(os.environ), str(tmp_path), 30, [].append, "pre")
    assert (rc, error) == (-9, "pre hook was killed by signal 9 (SIGKILL)")
    assert run_hook("exit 4", dict(os.environ), str(tmp_path), 30, [].append, "post") == (4, "post hook exited 4")


def test_a_hook_that_prints_much_logs_its_end_without_holding_all_it_printed(tmp_path):
    """The output of a hook or a command source was read whole, then cut to its end: a pre hook that printed
    400 MB (a dump sent to stdout by mistake, a verbose tool) took the daemon to 830 MB of memory."""
    import tracemalloc

    from chunkvault.scheduler import HOOK_OUTPUT_LIMIT, run_hook

    log: list[str] = []
    tracemalloc.start()
    try:
        rc, error = run_hook("head -c 30000000 /dev/zero | tr '\\0' x; echo; printf 'last words \\303\\251\\n'",
                             dict(os.environ), str(tmp_path), 30, log.append, "pre")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (rc, error) == (0, None)
    assert peak < 1 << 20, peak
    assert log[-1] == "pre: last words \u00e9" and log[0].startswith("pre: ...x")
    assert sum(len(line) for line in log) <= HOOK_OUTPUT_LIMIT + 3 + len("pre: ") * len(log)


def test_a_stop_while_a_hook_starts_ends_the_hook_and_logs_what_it_said(tmp_path, monkeypatch):
    """A stop handled inside ``subprocess.Popen``, the hook running already (a loaded machine), left the hook's
    process group running on its own (a database left in backup mode) and what it had said unlogged."""
    from chunkvault.scheduler import run_hook

    started = tmp_path / "started"
    log: list[str] = []
    with stopped_inside_popen(monkeypatch, started) as pids:
        with pytest.raises(KeyboardInterrupt):
            run_hook(f"echo entering backup mode; touch {q(str(started))}; exec sleep 60", dict(os.environ),
                     str(tmp_path), 30, log.append, "pre")
        assert log == ["pre: entering backup mode"]
        with pytest.raises(ProcessLookupError):
            os.killpg(pids[0], 0)  # its group is gone, and reaped


def test_a_failed_source_s_retention_is_skipped_and_a_partial_one_is_partial(tmp_path, repo_url, tree):
    """A pre hook that failed saved nothing new: retention then would thin out what is there with nothing to
    replace it (keep-full-within 7d removed every older full).  A backup that could not read a source path
    is `partial` for the run, its exit code and its post hook, not `ok`."""
    with Repository.open(repo_url, PASSWORD) as r:
        for day in ("2026-11-01", "2026-11-10", "2026-11-20"):
            r.backup([str(tree)], kind="full", host="h1", time=f"{day}T00:00:00Z")
    before = [s.id for s in snapshots(repo_url)]
    env_out = tmp_path / "post.env"
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "host": "h1", "paths": [str(tree)], "pre": "exit 1"},
        {"name": "odd", "host": "h2", "paths": [str(tree), str(tmp_path / "missing")],
         "post": f"env | grep ^CHUNKVAULT_RESULT > {q(str(env_out))}"},
    ], top='full = "daily 02:00"\n[retention]\nkeep-full-within = "7d"\n')))
    log: list[str] = []
    report = Runner(policy, PASSWORD.encode(), log=log.append, lock_file=str(tmp_path / "l")).run()
    db, odd = report.sources
    assert db.status == "failed" and "db: retention skipped, the backup failed" in log
    assert set(before) <= {s.id for s in snapshots(repo_url)}
    assert odd.status == "partial" and odd.snapshot_id is not None
    assert env_out.read_text().strip() == "CHUNKVAULT_RESULT=partial"
    with pytest.raises(ChunkvaultError) as e:
        report.raise_for_status()
    assert e.value.exit_code == 1  # the failed source outweighs the partial one
    report.sources.remove(db)
    with pytest.raises(ChunkvaultError) as e:
        report.raise_for_status()
    assert e.value.exit_code == 3


def test_post_hook_gets_the_snapshot_and_its_failure_counts(tmp_path, repo_url, tree, monkeypatch):
    env_out = tmp_path / "post.env"
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": "test -z \"$CHUNKVAULT_PASSWORD\"",
         "post": f"env | grep ^CHUNKVAULT_ > {q(str(env_out))}; exit 4"}],
        top='full = "daily 02:00"\n')))
    log: list[str] = []
    report = Runner(policy, PASSWORD.encode(), lock_file=str(tmp_path / "l"), log=log.append).run()
    (snap,) = snapshots(repo_url)
    assert any(line.startswith(f"db: full snapshot {snap.id[:8]} saved (") and
               line.endswith("), but the source failed: post hook exited 4") for line in log), log
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    assert env["CHUNKVAULT_SNAPSHOT_ID"] == snap.id and env["CHUNKVAULT_RESULT"] == "ok"
    assert env["CHUNKVAULT_SOURCE"] == "db" and env["CHUNKVAULT_PATHS"] == str(tree)
    db = report.sources[0]
    assert env["CHUNKVAULT_SLOT"] == db.slot.strftime("%Y-%m-%dT%H:%M:%SZ") and env["CHUNKVAULT_KIND"] == "full"
    assert "CHUNKVAULT_PASSWORD" not in env  # the pre hook's test -z passed, too
    assert (db.pre_exit, db.post_exit, db.status, db.snapshot_id) == (0, 4, "failed", snap.id)
    with pytest.raises(ChunkvaultError, match="post hook exited 4"):
        report.raise_for_status()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_run_stopped_during_its_backup_still_runs_the_post_hook(tmp_path, repo_url, tree, monkeypatch, stop):
    """The pre hook may have put a database into backup mode or mounted a snapshot: a run stopped by Ctrl-C
    or SIGTERM (a second one to the daemon) had left it so.  The post hook runs, told the run failed, and
    the stop goes on."""
    from chunkvault import scheduler

    mounted, env_out = tmp_path / "snapshot-mounted", tmp_path / "post.env"
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": f"touch {q(str(mounted))}",
         "post": f"rm {q(str(mounted))}; env | grep ^CHUNKVAULT_ | sort > {q(str(env_out))}"}],
        top='full = "daily 02:00"\n')))

    def stopped(*args, **kwargs):
        assert mounted.exists()
        raise stop

    monkeypatch.setattr(scheduler.Runner, "_backup", stopped)
    with pytest.raises(stop):
        Runner(policy, PASSWORD.encode(), lock_file=str(tmp_path / "l")).run()
    assert not mounted.exists()
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    word = {KeyboardInterrupt: "interrupted", SystemExit: "SystemExit"}[stop]
    assert env["CHUNKVAULT_RESULT"] == "failed" and env["CHUNKVAULT_ERROR"] == f"stopped ({word})"


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_run_whose_terminal_closes_stops_as_on_sigterm(tmp_path, repo_url, tree, signum):
    """SIGHUP (the ssh session or terminal a run was started from closed) killed it outright: no post hook
    (a database left in backup mode), the pre hook's process group left running, nothing said."""
    started, env_out = tmp_path / "pre-started", tmp_path / "post.env"
    policy = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": f"echo entering backup mode; touch {q(str(started))}; exec sleep 120.{os.getpid()}{signum}",
         "post": f"env | grep ^CHUNKVAULT_ | sort > {q(str(env_out))}"}], top='full = "daily 02:00"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    # a hangup the tests' own runner ignores (started under nohup) would be ignored by the run too, by design
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "run", "--config", str(policy)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        wait_for(started.exists, proc, "the pre hook")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    word = {signal.SIGHUP: "hung up", signal.SIGTERM: "terminated"}[signum]
    assert proc.returncode == 128 + signum and err.decode().strip().endswith(f"chunkvault: {word}"), err
    assert "db: pre: entering backup mode" in (out + err).decode()  # what the stopped hook said is kept
    posted = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    assert posted["CHUNKVAULT_RESULT"] == "failed" and posted["CHUNKVAULT_ERROR"] == f"stopped ({word})"
    assert subprocess.run(["pgrep", "-f", f"sleep 120.{os.getpid()}{signum}"]).returncode == 1  # its group killed


def test_a_run_s_wait_for_the_lock_is_in_its_log_file(tmp_path, repo_url, tree, monkeypatch):
    """The warning went to stderr only: a scheduled run could wait an hour with nothing in its log."""
    from chunkvault import cli
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "daily 02:00"\n')
    held, done = threading.Event(), threading.Event()

    def prune_for_a_while() -> None:
        with Repository.open(repo_url, PASSWORD) as r, RepoLock(r.store.remote, EXCLUSIVE, "prune"):
            held.set()
            done.wait(60)

    holder = threading.Thread(target=prune_for_a_while)
    holder.start()
    held.wait(30)
    threading.Timer(2.0, done.set).start()
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    log = tmp_path / "run.log"
    try:
        assert cli.main(["run", "--config", str(policy), "--log", str(log), "-q"]) == 0
    finally:
        done.set()
        holder.join()
    text = log.read_text()
    assert re.search(r"^\S+ warning: waiting up to 3600 s: repository is locked by prune", text, re.M), text
    assert "db: full snapshot" in text


def test_a_source_named_twice_runs_once(tmp_path, repo_url, tree):
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                          top='full = "daily 02:00"\n')))
    report = Runner(policy, PASSWORD.encode(), lock_file=str(tmp_path / "l")).run(only=["db", "db"])
    assert [r.name for r in report.sources] == ["db"] and len(snapshots(repo_url)) == 1


def test_a_hook_whose_program_is_missing_names_it(tmp_path, repo_url, tree):
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": ["no-such-program-here", "--flag"]}],
        top='full = "daily 02:00"\n')))
    report = Runner(policy, PASSWORD.encode(), lock_file=str(tmp_path / "l")).run()
    assert report.sources[0].error == "pre hook could not start 'no-such-program-here': No such file or directory"
    assert snapshots(repo_url) == []


def test_hook_timeout_kills_the_hook(tmp_path, repo_url, tree):
    policy = load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": "sleep 30"}],
        top='full = "daily 02:00"\nhook-timeout = 0.2\n')))
    report = Runner(policy, PASSWORD.encode(), lock_file=str(tmp_path / "l")).run()
    assert report.sources[0].error == "pre hook timed out after 0.2 s"
    assert snapshots(repo_url) == []


def test_exit_codes_of_a_report():
    now = datetime.now(UTC)
    RunReport(now, False, [SourceResult("a", "ok"), SourceResult("b", "idle")]).raise_for_status()
    with pytest.raises(PartialBackup):
        RunReport(now, False, [SourceResult("a", "partial", error="1 path(s) could not be read")]).raise_for_status()
    with pytest.raises(ChunkvaultError) as e:
        RunReport(now, False, [SourceResult("a", "partial"), SourceResult("b", "ok", retention_error="retention: x")]
                  ).raise_for_status()
    assert type(e.value) is ChunkvaultError and e.value.exit_code == 1


# --------------------------------------------------------------------------- the command line


def test_run_command_dry_run_then_run_then_nothing_due(tmp_path, repo_url, tree, fake_time, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    # the runs at one time: on the clock, an hour's slot could pass between the first and the third
    clock = fake_time(FakeClock(datetime(2026, 3, 2, 10, 30, tzinfo=UTC)))
    monkeypatch.setattr("chunkvault.scheduler.Runner", functools.partial(Runner, clock=clock))
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "daily 02:00"\ndiff = "every 1h"\nretention = "short"\n'
                              '[presets.short]\nkeep-last = 1\n')
    assert cli_main(["run", "--config", str(policy), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "db: would make a full backup" in out and snapshots(repo_url) == []

    assert cli_main(["run", "--config", str(policy)]) == 0
    out = capsys.readouterr().out
    (snap,) = snapshots(repo_url)
    assert f"db: full snapshot {snap.short_id} saved" in out
    assert "db: retention removed 0 snapshot(s), rebased 0, kept 1" in out

    assert cli_main(["run", "--config", str(policy), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["sources"][0]["status"] == "idle"
    assert summary["sources"][0]["retention"] == {"removed": [], "rebased": [], "kept": 1}
    assert len(snapshots(repo_url)) == 1
    assert os.path.exists(str(policy) + ".lock")
    assert cli_main(["run", "--config", str(policy), "--source", "nope"]) == 2
    assert "no source 'nope' in the policy (known: db)" in capsys.readouterr().err


def test_run_command_failure_exit_code_and_log_file(tmp_path, repo_url, tree, monkeypatch, capsys):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    monkeypatch.delenv("CHUNKVAULT_PASSWORD", raising=False)
    monkeypatch.delenv("CHUNKVAULT_PASSWORD_FILE", raising=False)
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)], "pre": "exit 9"}],
                          top='password-file = "pw"\nfull = "daily 02:00"\n')
    code = cli_main(["run", "--config", str(policy), "--log", str(tmp_path / "run.log"), "--json"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == ["chunkvault: scheduled run failed: db (pre hook exited 9)"]
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert any("db: full backup failed (slot " in line and line.endswith("): pre hook exited 9") for line in logged)
    assert all(line[:4].isdigit() and "Z " in line for line in logged)  # timestamped


def test_a_source_s_exclusion_rules_apply_to_its_backups(tmp_path, repo_url, tree, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    (tree / "cache").mkdir()
    (tree / "cache" / "CACHEDIR.TAG").write_bytes(b"Signature: 8a477f597d28d172789f06886806bc55")
    (tree / "cache" / "blob").write_bytes(b"cached")
    (tree / "tmp").mkdir()
    (tree / "tmp" / ".skip").write_bytes(b"")
    (tree / "tmp" / "t").write_bytes(b"t")
    (tree / "x.log").write_text("log")
    (tree / "core.dump").write_bytes(b"\0" * 60_000)
    source = {"name": "db", "paths": [str(tree)], "exclude-files": ["excludes"], "exclude-if-present": [".skip"],
              "exclude-caches": True, "one-file-system": True, "exclude-larger-than": "55k"}
    policy = write_policy(tmp_path / "p.toml", repo_url, [source], top='full = "daily 02:00"\n')
    assert cli_main(["run", "--config", str(policy)]) == 1  # exclude files are read at each run: none yet
    assert "cannot read exclude file" in capsys.readouterr().err and snapshots(repo_url) == []
    (tmp_path / "excludes").write_text("*.log\n")
    assert cli_main(["run", "--config", str(policy)]) == 0
    (snap,) = snapshots(repo_url)
    with Repository.open(repo_url, PASSWORD) as r:
        assert sorted(e.path for e in r.tree(snap.id)) == [
            b"", b"base.bin", b"cache", b"cache/CACHEDIR.TAG", b"notes.txt", b"tmp", b"tmp/.skip"]


def test_a_source_s_excludes_take_back_and_ignore_case(tmp_path, repo_url, tree, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    (tree / "cache").mkdir()
    for name in ("keep.conf", "blob", "IMG.JPG"):
        (tree / "cache" / name).write_bytes(b"c")
    (tmp_path / "iexcludes").write_text("*.jpg\n")
    source = {"name": "db", "paths": [str(tree)], "excludes": ["cache/*", "!cache/*.*"],
              "iexclude-files": ["iexcludes"], "iexcludes": ["NOTES.TXT"]}
    policy = write_policy(tmp_path / "p.toml", repo_url, [source], top='full = "daily 02:00"\n')
    assert cli_main(["run", "--config", str(policy)]) == 0
    (snap,) = snapshots(repo_url)
    with Repository.open(repo_url, PASSWORD) as r:
        assert sorted(e.path for e in r.tree(snap.id)) == [b"", b"base.bin", b"cache", b"cache/keep.conf"]


def test_a_source_of_several_paths_matches_its_excludes_below_each_path(tmp_path, repo_url, tree, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    other = tmp_path / "other"
    (other / "cache").mkdir(parents=True)
    for name in ("keep.conf", "blob"):
        (other / "cache" / name).write_bytes(b"c")
    source = {"name": "db", "paths": [str(tree), str(other)], "excludes": ["cache/*", "!cache/*.conf", "notes.txt"]}
    policy = write_policy(tmp_path / "p.toml", repo_url, [source], top='full = "daily 02:00"\n')
    assert cli_main(["run", "--config", str(policy)]) == 0
    (snap,) = snapshots(repo_url)
    with Repository.open(repo_url, PASSWORD) as r:
        below = [os.fsdecode(e.path).partition(str(tmp_path).lstrip("/") + "/")[2] for e in r.tree(snap.id)]
    assert sorted(p for p in below if p) == ["data", "data/base.bin", "other", "other/cache", "other/cache/keep.conf"]


def test_overlapping_runs_are_refused(tmp_path, repo_url, tree, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "daily 02:00"\n')
    with policy_lock(str(policy) + ".lock"):
        assert cli_main(["run", "--config", str(policy)]) == Locked.exit_code
        assert "another run of this policy is in progress" in capsys.readouterr().err
        assert cli_main(["run", "--config", str(policy), "--dry-run"]) == 0  # a dry run changes nothing
    assert snapshots(repo_url) == []


@pytest.mark.parametrize("body, fragment", [
    ('repository = "/x"\nfull = "daily 02:00"\n[[source]]\nname = "db"\npaths = ["/"]\npre = 5\n',
     "source 'db': pre must be a shell command"),
    ('repository = "/x"\nfull = "every day"\n[[source]]\nname = "db"\npaths = ["/"]\n', "invalid schedule 'every day'"),
    ('repository = "/x"\nfull = "daily"\nretention = "gold"\n[[source]]\nname = "db"\npaths = ["/"]\n',
     "no retention preset 'gold'"),
    ('repository = "/x"\nfull = "daily"\n', "no sources"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\nexclude-caches = "yes"\n',
     "source 'db': exclude-caches must be true or false, got 'yes'"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\nexclude-if-present = ["a/b"]\n',
     "source 'db': not a file name to exclude directories by: 'a/b'"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\nexclude-larger-than = "big"\n',
     "source 'db': exclude-larger-than: not a size: 'big'"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\nexcludes = ["a", "!"]\n',
     "source 'db': exclude pattern '!' names nothing"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\niexcludes = ["!"]\n',
     "source 'db': iexclude pattern '!' names nothing"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\ncommand = "x"\nstdin-name = "x"\n'
     'iexcludes = ["a"]\n', "source 'db': iexcludes applies to paths"),
    ('repository = "/x\nfull = 3', "is not valid TOML"),
    (b'repository = "/x"\nfull = "daily\xff"\n', "is not UTF-8 text (line 2)"),
    # TOML's \u0000: an internal error ("embedded null byte") at the run that used it, or never
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\npre = ["true", "a\\u0000"]\n',
     "source[0].pre[1] holds a NUL character"),
    ('repository = "/x"\nfull = "daily"\nstate-file = "s\\u0000"\n[[source]]\nname = "db"\npaths = ["/"]\n',
     "state-file holds a NUL character"),
    ('repository = "/x"\nfull = "daily"\n[[source]]\nname = "db"\npaths = ["/"]\nexcludes = ["*.tmp\\u0000"]\n',
     "source[0].excludes[0] holds a NUL character"),
])
def test_bad_policy_file_is_one_clear_line(tmp_path, monkeypatch, capsys, body, fragment):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    path = tmp_path / "bad.toml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    for command in ("run", "daemon"):
        assert cli_main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"chunkvault: policy {path}") and fragment in err[0], err


def test_a_policy_or_config_file_that_never_ends_is_refused_not_read_until_memory_runs_out(capsys):
    """`run -c /dev/zero`, `daemon -c`, `forget --config` and `serve --config` of a device hung, reading until
    memory ran out."""
    for args in (["run", "-c", "/dev/zero"], ["daemon", "-c", "/dev/zero"],
                 ["forget", "-r", "/nowhere", "--preset", "x", "--config", "/dev/zero"],
                 ["serve", "--config", "/dev/zero"]):
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.endswith(" /dev/zero holds more than 16 MiB: no "
                                                      f"{'policy' if args[0] in ('run', 'daemon') else 'config'} file\n")


def test_a_nul_in_a_retention_or_service_config_file_is_refused_naming_its_key(tmp_path, capsys):
    """A NUL in `forget --config`'s presets or `serve --config`'s settings is refused as a policy's is."""
    path = tmp_path / "config.toml"
    path.write_text('[presets.daily]\nkeep-tags = ["a\\u0000"]\nkeep-daily = 7\n')
    assert cli_main(["forget", "-r", str(tmp_path / "none"), "--preset", "daily", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (f"chunkvault: config {path}: presets.daily.keep-tags[0] holds a NUL character "
                                       "(\\u0000), which no setting can hold\n")
    path.write_text('listen = "127.0.0.1:0"\npath = "/srv/\\u0000"\n')
    assert cli_main(["serve", "--config", str(path)]) == 2
    assert "path holds a NUL character" in capsys.readouterr().err


def test_missing_policy_file(tmp_path, capsys):
    assert cli_main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read policy" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real daemon process

DAEMON = ("import sys; sys.path.insert(0, {here!r}); from test_scheduler import cli_main; "
          "sys.exit(cli_main(sys.argv[1:]))").format(here=HERE)


def start_daemon(policy: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    return subprocess.Popen([sys.executable, "-c", DAEMON, "daemon", "--config", str(policy), "--log", str(log)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, proc: subprocess.Popen, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited {proc.returncode} before {what}: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {limit} s")
        time.sleep(0.05)


def test_daemon_process_stops_on_sigterm_while_sleeping(tmp_path, repo_url, tree):
    log = tmp_path / "daemon.log"
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "0 0 1 1 *"\n')
    proc = start_daemon(policy, log)
    wait_for(lambda: log.exists() and "next run at" in log.read_text(), proc, "first run")
    second = start_daemon(policy, tmp_path / "second.log")  # would skip every slot the first runs, for ever
    assert second.wait(timeout=60) == 15
    assert "a daemon of this policy is running already" in second.stderr.read().decode()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "daemon stopped" in text and "stopped by SIGTERM" in text
    assert [s.kind for s in snapshots(repo_url)] == ["full"]


def test_daemon_process_finishes_the_current_backup_on_sigterm(tmp_path, repo_url, tree):
    """The backup itself (here a dump command's) is finished; a stop during a pre hook skips it instead."""
    log = tmp_path / "daemon.log"
    started, go = tmp_path / "started", tmp_path / "go"
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    wait_go = f"touch {q(str(started))}; i=0; while [ ! -e {q(str(go))} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"
    policy = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "command": f"{wait_go}; echo hello", "stdin-name": "db.txt"},
        {"name": "other", "paths": [str(other)]}], top='full = "daily 02:00"\n')
    proc = start_daemon(policy, log)
    wait_for(started.exists, proc, "the pre hook")
    proc.send_signal(signal.SIGTERM)
    go.touch()
    assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert "other: skipped, stopping" in text and "daemon stopped" in text
    # said when it came: a backup may take hours, and a service manager's stop timeout is shorter
    said = text.index("SIGTERM received: stopping after the step in progress (the same signal again stops at once)")
    assert said < text.index("other: skipped, stopping")
    (snap,) = snapshots(repo_url)  # db's backup completed, other's never started
    assert snap.stdin_name == "db.txt"
    assert restore_text(repo_url, snap.id, tmp_path / "r", "db.txt") == "hello\n"


def test_a_source_may_back_up_a_command_s_output(tmp_path, repo_url, tree, fake_time, monkeypatch):
    """A dump source keeps its own chain beside a paths source; its command runs in the policy's folder
    with the hook variables and without the repository password; a failing dump saves nothing, and
    what it printed to stderr is logged."""
    (tmp_path / "dump.sh").write_text('test -e broken && { echo "server closed the connection" >&2; exit 3; }\n'
                                      'echo "-- $CHUNKVAULT_SOURCE $CHUNKVAULT_KIND ${CHUNKVAULT_PASSWORD:-no password}"\n'
                                      'cat rows.sql\n')
    (tmp_path / "rows.sql").write_text("".join(f"insert {i};\n" for i in range(20_000)))
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy_path = write_policy(tmp_path / "policy.toml", repo_url, [
        {"name": "files", "paths": [str(tree)]},
        {"name": "dump", "command": "sh dump.sh", "stdin-name": "app.sql"},
    ], top='full = "daily 02:00"\ndiff = "hourly"\n[retention]\nkeep-last = 2\n')
    clock = fake_time(FakeClock(datetime(2026, 3, 1, 2, 0, tzinfo=UTC)))
    log: list[str] = []
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=clock, log=log.append,
                    lock_file=str(tmp_path / "policy.lock"))

    def run() -> dict[str, SourceResult]:
        report = runner.run()
        clock.t += timedelta(hours=1)
        return {r.name: r for r in report.sources}

    first, second = run(), run()
    assert [first[n].status for n in ("files", "dump")] == ["ok", "ok"]
    assert (second["dump"].status, second["dump"].kind) == ("ok", "diff")
    by_id = {s.id: s for s in snapshots(repo_url)}
    dump_full, dump_diff = by_id[first["dump"].snapshot_id], by_id[second["dump"].snapshot_id]
    assert dump_diff.parent == dump_full.id and dump_full.stdin_name == "app.sql"
    assert by_id[second["files"].snapshot_id].parent == first["files"].snapshot_id
    with Repository.open(repo_url, PASSWORD) as r, r.open_file(dump_diff, "app.sql") as f:
        assert f.read().split(b"\n", 1)[0] == b"-- dump diff no password"

    (tmp_path / "broken").touch()
    third = run()
    assert third["dump"].status == "failed"
    assert third["dump"].error == "`/bin/sh -c 'sh dump.sh'` exited 3: no snapshot saved"
    assert "dump: command: server closed the connection" in log  # why, in the scheduler's log
    assert third["files"].status == "ok"
    assert sum(s.stdin_name == "app.sql" for s in snapshots(repo_url)) == 2


@pytest.mark.parametrize("source, fragment", [
    ({"name": "d", "command": "pg_dump", "paths": ["/x"]}, "paths and command both given"),
    ({"name": "d", "command": "pg_dump"}, "command needs stdin-name"),
    ({"name": "d", "paths": ["/x"], "stdin-name": "a.sql"}, "stdin-name needs command"),
    ({"name": "d", "command": ["pg_dump"], "stdin-name": "a.sql", "excludes": ["*"]}, "excludes applies to paths"),
    ({"name": "d", "command": [], "stdin-name": "a.sql"}, "command must be a shell command string"),
    ({"name": "d", "command": ["pg_dump"], "stdin-name": "a.sql", "list": True}, "list applies to paths"),
])
def test_command_sources_that_make_no_sense_are_refused(tmp_path, repo_url, source, fragment):
    policy_path = write_policy(tmp_path / "policy.toml", repo_url, [source], top='full = "daily 02:00"\n')
    with pytest.raises(ChunkvaultError) as e:
        load_policy(str(policy_path))
    assert fragment in str(e.value)


def test_a_source_compares_as_its_policy_says(tmp_path, repo_url, tree, fake_time):
    """ignore-inode and ignore-ctime reach the backup: a tree copied anew with its times is not read again."""
    policy_path = write_policy(tmp_path / "policy.toml", repo_url, [
        {"name": "snap", "paths": [str(tree)], "ignore-inode": True, "ignore-ctime": True},
    ], top='full = "daily 02:00"\ndiff = "hourly"\n')
    clock = fake_time(FakeClock(datetime(2026, 3, 1, 2, 0, tzinfo=UTC)))
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=clock, log=lambda line: None,
                    lock_file=str(tmp_path / "policy.lock"))
    settle()
    assert runner.run().sources[0].status == "ok"
    for p in tree.iterdir():
        shutil.copy2(p, str(p) + ".tmp")
        os.replace(str(p) + ".tmp", p)
    clock.t += timedelta(hours=1)
    result = runner.run().sources[0]
    assert (result.status, result.kind) == ("ok", "diff")
    (diff,) = [s for s in snapshots(repo_url) if s.id == result.snapshot_id]
    assert diff.stats["read_bytes"] == 0 and diff.stats["unchanged_files"] == 2


def test_a_source_with_list_logs_what_each_backup_added_changed_and_removed(tmp_path, repo_url, tree, fake_time):
    policy_path = write_policy(tmp_path / "policy.toml", repo_url, [
        {"name": "docs", "paths": [str(tree)], "list": True}, {"name": "quiet", "paths": [str(tmp_path / "q")]},
    ], top='full = "daily 02:00"\ndiff = "hourly"\n')
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "f").write_bytes(b"f")
    clock = fake_time(FakeClock(datetime(2026, 3, 1, 2, 0, tzinfo=UTC)))
    log: list[str] = []
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=clock, log=log.append,
                    lock_file=str(tmp_path / "policy.lock"))
    assert runner.run().ok
    assert [line for line in log if ": A " in line] == ["docs: A .", "docs: A base.bin", "docs: A notes.txt"]
    (tree / "notes.txt").write_text("changed\n")
    (tree / "base.bin").unlink()
    (tree / "new\nline").write_bytes(b"n")
    clock.t += timedelta(hours=1)
    log.clear()
    assert runner.run().ok
    assert [line for line in log if line.startswith("docs: ") and line[6:8] in ("A ", "M ", "D ")] == [
        "docs: M .", "docs: D base.bin", "docs: A new\\nline", "docs: M notes.txt"]


def test_log_lines_stay_one_line(tmp_path):
    """A hook's output or a file name with a line break or a terminal escape is one escaped log line."""
    from chunkvault.scheduler import _Log

    path = tmp_path / "run.log"
    log = _Log(str(path), lambda: datetime(2026, 3, 1, 2, 0, tzinfo=UTC))
    log("db: warning: cannot read caf" + os.fsdecode(b"\xe9") + "\nnext\x1b[2J")
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and lines[0].endswith("db: warning: cannot read caf\\xe9\\nnext\\x1b[2J")


def test_daemon_process_reads_its_policy_again_on_sighup(tmp_path, repo_url, tree):
    """As a service manager's reload does; a policy that does not load leaves the one in use."""
    log = tmp_path / "daemon.log"
    sources = [{"name": "db", "paths": [str(tree)]}]
    policy = write_policy(tmp_path / "p.toml", repo_url, sources, top='full = "0 0 1 1 *"\n')
    proc = start_daemon(policy, log)
    try:
        wait_for(lambda: log.exists() and "next run at" in log.read_text(), proc, "first run")
        write_policy(policy, repo_url, sources, top='full = "0 0 1 6 *"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy reloaded: 1 source(s)" in log.read_text(), proc, "the reload")
        wait_for(lambda: re.search(r"policy reloaded[^\n]*\n(.*\n)*.*next run at \d{4}-06-01", log.read_text()),
                 proc, "the new slot")
        write_policy(policy, repo_url, sources, top=f'full = "0 0 1 7 *"\nlock-file = "{tmp_path / "other.lock"}"\n')
        proc.send_signal(signal.SIGHUP)  # a second daemon would take the new lock file's: refused
        wait_for(lambda: "its lock file changed" in log.read_text(), proc, "the lock file's refusal")
        policy.write_text("full = [\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("policy not reloaded, the one loaded before stays in use") == 2,
                 proc, "the refusal")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "stopped by SIGTERM" in log.read_text()
    assert [s.kind for s in snapshots(repo_url)] == ["full"]  # a reload is no run


def test_a_daemon_aborted_by_a_second_signal_says_so_in_its_json_lines(tmp_path, repo_url, tree):
    """Its standard output stayed empty: a reader of the run lines had no record of how it ended."""
    started = tmp_path / "pre-started"
    policy = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": f"touch {q(str(started))}; sleep 60"}],
        top='full = "daily 02:00"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    proc = subprocess.Popen([sys.executable, "-c", DAEMON, "daemon", "--config", str(policy), "--json",
                             "--log", str(tmp_path / "d.log")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(started.exists, proc, "the pre hook")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in (tmp_path / "d.log").read_text(), proc, "the first signal's line")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert json.loads(out.decode().splitlines()[-1]) == {
        "error": {"type": "Interrupted", "exit_code": 130, "message": "aborted by a second signal"}}


def test_a_signal_sent_on_reading_that_the_first_came_is_a_second_one(tmp_path, repo_url, tree, monkeypatch):
    """The line saying that SIGTERM came was written before the daemon took it as its stop: a second SIGTERM
    sent on reading it could be handled in between, as a first one, and the daemon went on to the hook's end."""
    from chunkvault import scheduler

    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    started, log = tmp_path / "pre-started", tmp_path / "d.log"
    policy = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "pre": f"touch {q(str(started))}; exec sleep 30"}],
        top='full = "daily 02:00"\n')
    said = scheduler._Log.from_signal

    def said_then_signalled_again(self, line: str) -> None:
        said(self, line)
        if not again:
            again.append(line)
            os.kill(os.getpid(), signal.SIGTERM)  # the reader of the line, at once

    again: list[str] = []

    def first_signal() -> None:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(scheduler._Log, "from_signal", said_then_signalled_again)
    sender = threading.Thread(target=first_signal)
    sender.start()
    began = time.monotonic()
    try:
        assert cli_main(["daemon", "--config", str(policy), "--log", str(log)]) == 130
    finally:
        sender.join()
    assert time.monotonic() - began < 25  # not at the hook's end
    assert "aborted by a second signal" in log.read_text()
    assert [s.kind for s in snapshots(repo_url)] == []


def test_a_source_a_reload_adds_is_backed_up_at_once(tmp_path, repo_url, tree):
    """The daemon slept on to the next slot of the policy it had: with weekly fulls, days without a backup
    of the new source, which `run --dry-run` said was due."""
    log = tmp_path / "daemon.log"
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    policy = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                          top='full = "weekly sun 03:00"\n')
    proc = start_daemon(policy, log)
    try:
        wait_for(lambda: log.exists() and "next run at" in log.read_text(), proc, "first run")
        write_policy(policy, repo_url, [{"name": "db", "paths": [str(tree)]}, {"name": "etc", "paths": [str(other)]}],
                     top='full = "weekly sun 03:00"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "etc: full snapshot" in log.read_text(), proc, "the new source's backup")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert sorted(s.paths[0] for s in snapshots(repo_url)) == sorted([str(tree), str(other)])


def _ten_minutes_of_one_source(tmp_path, repo_url, tree):
    """A policy of one source, a fake clock running ten minutes, a log, and a maker of the policy's runner."""
    path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                        top='full = "0 0 1 1 *"\n')
    stop = threading.Event()
    now = datetime.now(UTC)
    clock = FakeClock(now, stop, now + timedelta(minutes=10))
    log: list[str] = []

    def runner() -> Runner:
        return Runner(load_policy(str(path)), PASSWORD.encode(), clock=clock, stop=stop, log=log.append,
                      lock_file=str(tmp_path / "p.lock"))

    return path, clock, log, runner


def test_a_reload_of_a_source_s_numeric_time_zone_keeps_the_policy_in_use(tmp_path, repo_url, tree):
    """`timezone = +1` in a source (an offset, which TOML reads as a number) ended the daemon at its reload
    with an internal error; `run` said internal error (exit 1), not a usage error."""
    path, clock, log, runner = _ten_minutes_of_one_source(tmp_path, repo_url, tree)
    daemon = Daemon(runner(), clock=clock, sleep=clock.sleep, log=log.append, reload=runner)

    def edit(c: FakeClock) -> None:
        if not daemon.reload_asked and not any("not reloaded" in line for line in log):
            path.write_text(path.read_text() + "timezone = +1\n")  # in the last [[source]] table
            daemon.ask_reload()

    clock.during_sleep = edit
    assert daemon.serve() == 0
    assert any("policy not reloaded, the one loaded before stays in use" in line
               and "source 'db': time zone must be an IANA name" in line for line in log)
    assert cli_main(["run", "--config", str(path), "--password-file", str(tmp_path / "none")]) == 2


def test_a_reload_that_fails_with_an_internal_error_keeps_the_daemon_and_its_policy(tmp_path, repo_url, tree):
    """A reload's unexpected exception ended the daemon, where a run's is logged and survived."""
    _, clock, log, runner = _ten_minutes_of_one_source(tmp_path, repo_url, tree)

    def broken() -> Runner:
        raise TypeError("a bug")  # fault injection: what a reload of some file could meet

    first = runner()
    daemon = Daemon(first, clock=clock, sleep=clock.sleep, log=log.append, reload=broken)
    clock.during_sleep = lambda c: daemon.ask_reload() if len(c.sleeps) == 1 else None
    started = clock.t
    assert daemon.serve() == 0
    assert "policy not reloaded, the one loaded before stays in use: internal error: TypeError: a bug" in log
    assert daemon.runner is first and clock.t >= started + timedelta(minutes=10)


def _retention_policy(tmp_path, repo_url, tree, extra: str = ""):
    return load_policy(str(write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                        top='full = "daily 02:00"\ndiff = "hourly"\nprune = true\n'
                                            f'max-unused = "0%"\n{extra}[retention]\nkeep-last = 1\n')))


def test_a_retention_whose_wait_for_the_lock_a_stop_ends_is_stopped_not_failed(tmp_path, repo_url, tree, fake_time):
    """A daemon stopped while its retention waited behind a manual backup said "retention failed" and
    reported the run as failed, not stopped."""
    from chunkvault.store import locks

    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    stop, log = threading.Event(), []
    runner = Runner(_retention_policy(tmp_path, repo_url, tree), PASSWORD.encode(), clock=clock, stop=stop,
                    log=log.append, lock_file=str(tmp_path / "l"))
    held, done = threading.Event(), threading.Event()

    def manual_backup() -> None:  # another command's shared lock, in another thread
        with Repository.open(repo_url, PASSWORD) as r, r.reading("a manual backup"):
            held.set()
            done.wait(60)

    def stop_soon(*_):
        stop.set()
        locks.stop_waiting.set()

    holder = threading.Thread(target=manual_backup)
    holder.start()
    held.wait(30)
    previous, locks.announce_wait = locks.announce_wait, stop_soon  # stopped once it starts waiting
    try:
        report = runner.run()
    finally:
        locks.announce_wait = previous
        locks.stop_waiting.clear()
        done.set()
        holder.join()
    assert report.stopped and report.sources[0].retention_error is None
    assert any("retention skipped, stopping (the repository was locked)" in line for line in log), log


def test_a_dry_run_removes_nothing_and_prunes_nothing(tmp_path, repo_url, tree, fake_time):
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    with Repository.open(repo_url, PASSWORD) as r:
        ids = []
        for _ in range(3):
            (tree / "base.bin").write_bytes(os.urandom(50_000))
            ids.append(r.backup([str(tree)]).snapshot.id)
            clock.t += timedelta(minutes=10)
        r.forget([ids[1]])  # its data is unused now: a prune would delete it
    packs = sorted(os.listdir(os.path.join(repo_url, "data")))
    runner = Runner(_retention_policy(tmp_path, repo_url, tree), PASSWORD.encode(), clock=clock,
                    lock_file=str(tmp_path / "l"))
    report = runner.run(dry_run=True)
    assert report.sources[0].retention.removed == [ids[0]] and report.prune is None
    assert sorted(os.listdir(os.path.join(repo_url, "data"))) == packs
    assert [s.id for s in snapshots(repo_url)] == [ids[0], ids[2]]


def test_a_dry_run_names_the_differentials_retention_would_rebase(tmp_path, repo_url, tree, fake_time):
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    with Repository.open(repo_url, PASSWORD) as r:
        ids = []
        for i in range(3):
            (tree / "small.txt").write_text(str(i))  # differentials: each stores little
            ids.append(r.backup([str(tree)]).snapshot.id)
            clock.t += timedelta(minutes=10)
    lines: list[str] = []
    runner = Runner(_retention_policy(tmp_path, repo_url, tree), PASSWORD.encode(), clock=clock,
                    lock_file=str(tmp_path / "l"), log=lines.append)
    retention = runner.run(dry_run=True).sources[0].retention
    assert retention.removed == ids[:2] and retention.rebased == [ids[2]]
    assert f"db: would rebase {ids[2][:8]} (its parent goes)" in lines  # named, as forget --dry-run does


def test_a_dry_run_counts_the_backup_it_would_make_in_its_retention(tmp_path, repo_url, tree, fake_time):
    """A dry run predicted retention from the snapshots there are, without the backup due first: with count
    rules the run then removed one more than it had announced.  It counts a stand-in for that backup now."""
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 2, 30, tzinfo=UTC)))
    lines: list[str] = []
    runner = Runner(_retention_policy(tmp_path, repo_url, tree), PASSWORD.encode(), clock=clock,
                    lock_file=str(tmp_path / "l"), log=lines.append)
    first = runner.run().sources[0].snapshot_id
    clock.t += timedelta(hours=1)
    (tree / "small.txt").write_text("changed")
    dry = runner.run(dry_run=True).sources[0]
    assert dry.status == "would-run" and dry.kind == "diff"
    assert dry.retention.removed == [first] and dry.retention.rebased == ["(backup due now)"]
    assert "db: would rebase the backup it would make (its parent goes)" in lines
    assert [s.id for s in snapshots(repo_url)] == [first]  # nothing saved, nothing removed
    real = runner.run().sources[0]
    assert real.retention.removed == [first] and real.retention.rebased == [real.snapshot_id]
    with pytest.raises(UsageError, match="counted by a dry run only"):
        with Repository.open(repo_url, PASSWORD) as r:
            r.forget(policy=RetentionPolicy(keep_last=1), planned=r.snapshots())


def test_retention_refuses_a_replayed_snapshot_as_forget_does(tmp_path, repo_url, tree, fake_time):
    """Removing it again by itself would bury the evidence: forget with a policy refuses, and so does a run."""
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    runner = Runner(_retention_policy(tmp_path, repo_url, tree), PASSWORD.encode(), clock=clock,
                    lock_file=str(tmp_path / "l"))
    first = runner.run().sources[0].snapshot_id
    saved = Path(repo_url, "snapshots", first).read_bytes()
    clock.t += timedelta(hours=1)
    assert runner.run().sources[0].retention.removed == [first]
    Path(repo_url, "snapshots", first).write_bytes(saved)  # an attacker puts the old snapshot back
    result = runner.run().sources[0]  # nothing due (a backup would refuse): retention only
    assert result.status == "idle" and "replayed" in result.retention_error and first in [s.id for s in snapshots(repo_url)]


def test_retention_of_a_differential_on_another_source_s_snapshot(tmp_path, repo_url, tree, fake_time):
    """Made with backup --parent: its chain leaves the source's history, which retention must follow."""
    clock = fake_time(FakeClock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC)))
    other = tmp_path / "other"
    shutil.copytree(tree, other)
    with Repository.open(repo_url, PASSWORD) as r:
        base = r.backup([str(other)]).snapshot
        clock.t += timedelta(minutes=10)
        mine = r.backup([str(tree)], kind="diff", parent=base.id).snapshot
    clock.t += timedelta(hours=1)
    runner = Runner(_retention_policy(tmp_path, repo_url, tree), PASSWORD.encode(), clock=clock,
                    lock_file=str(tmp_path / "l"))
    result = runner.run().sources[0]
    assert result.retention_error is None and result.retention.removed == [mine.id]
    assert {s.id for s in snapshots(repo_url)} == {base.id, result.snapshot_id}


def test_a_policy_whose_sources_could_not_be_told_apart_is_refused(tmp_path, repo_url, tree):
    path = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "hourly", "paths": [str(tree)], "tags": ["hourly"]},
        {"name": "archive", "paths": [str(tree) + "/"], "tags": ["archive"]}], top='full = "daily 02:00"\n')
    with pytest.raises(ChunkvaultError, match="sources 'hourly' and 'archive' back up the same paths"):
        load_policy(str(path))
    named = write_policy(tmp_path / "n.toml", repo_url, [  # this machine's name given to one, left out of the other
        {"name": "short", "paths": [str(tree)]},
        {"name": "archive", "paths": [str(tree)], "host": socket.gethostname()}], top='full = "daily 02:00"\n')
    with pytest.raises(ChunkvaultError, match="sources 'short' and 'archive' back up the same paths"):
        load_policy(str(named))
    once = load_policy(str(write_policy(tmp_path / "q.toml", repo_url, [
        {"name": "db", "paths": [str(tree), str(tree) + "/"]}], top='full = "daily 02:00"\n')))
    assert once.sources[0].paths == (str(tree),)  # else no snapshot's paths ever matched: a full every run
