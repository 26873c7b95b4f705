"""A policy's copy-to (each new snapshot copied to a second repository) and check (the repository checked on a
schedule): parsing, the runs against two local repositories, a failing destination, and the command line."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from chunkvault import Repository
from chunkvault.errors import ChunkvaultError, VerificationFailed
from chunkvault.schedule import check_due, check_slice, parse_cadence
from chunkvault.scheduler import Daemon, Runner, load_policy
from servers_http import APPEND_TOKEN, serve_factory, write_tokens  # noqa: F401
from test_scheduler import FakeClock, cli_main, q, snapshots, write_policy
from walsegments import write_segment

UTC = timezone.utc
PASSWORD = "scheduled secret"
OTHER = "off-site secret"


@pytest.fixture
def repos(tmp_path):
    """The policy's repository and a second one, each with its own password (in a file beside the policy)."""
    main, off = str(tmp_path / "repo"), str(tmp_path / "offsite")
    Repository.init(main, PASSWORD, kdf_seconds=0).close()
    Repository.init(off, OTHER, kdf_seconds=0).close()
    (tmp_path / "off.pw").write_text(OTHER + "\n")
    return main, off


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "base.bin").write_bytes(os.urandom(60_000))
    (src / "notes.txt").write_text("hello\n")
    return src


class RunTime:
    """The time the run under test takes for now: its clock's, and its snapshots' (the API takes none)."""

    at: datetime | None = None


@pytest.fixture(autouse=True)
def snapshot_time(monkeypatch):
    monkeypatch.setattr(RunTime, "at", None)
    monkeypatch.setattr("chunkvault.store.backup.now_iso",
                        lambda: (RunTime.at or datetime.now(UTC)).isoformat(timespec="microseconds"))


def offsite(url: str) -> list:
    with Repository.open(url, OTHER) as r:
        return sorted(r.snapshots(), key=lambda s: s.time)


def run(policy_path: Path, tmp_path: Path, log: list[str], when: datetime | None = None, **kw):
    policy = load_policy(str(policy_path))
    clock = (lambda: when) if when is not None else None
    RunTime.at = when
    runner = Runner(policy, PASSWORD.encode(), log=log.append, lock_file=str(tmp_path / "p.lock"),
                    state_file=str(tmp_path / "p.state"), **({"clock": clock} if clock else {}), **kw)
    return runner.run()


# --------------------------------------------------------------------------- the policy file


def test_copy_settings_of_the_top_apply_to_each_source_and_a_source_s_override_them(tmp_path, repos, tree):
    main, off = repos
    policy = load_policy(str(write_policy(tmp_path / "p.toml", main, [
        {"name": "a", "paths": [str(tree)]},
        {"name": "b", "paths": [str(tmp_path)], "copy-to": "elsewhere", "copy-to-password-command": "pass x"},
        {"name": "c", "paths": ["/c"]},
    ], top=f'full = "daily"\ncopy-to = {q(off)}\ncopy-to-password-file = "off.pw"\n'
           'copy-retention = { keep-last = 3 }\n')))
    a, b, c = policy.sources
    assert (a.copy_to.url, a.copy_to.password_file, a.copy_to.password_command) == (off, str(tmp_path / "off.pw"),
                                                                                   None)
    assert a.copy_to.retention.keep_last == 3
    # a relative path is the policy file's folder's; the password pair is the source's, whole
    assert (b.copy_to.url, b.copy_to.password_file, b.copy_to.password_command) == (
        str(tmp_path / "elsewhere"), None, "pass x")
    assert c.copy_to == a.copy_to
    text = (tmp_path / "p.toml").read_text().replace('name = "c"', 'name = "c"\ncopy-to = false')
    (tmp_path / "p.toml").write_text(text)
    assert load_policy(str(tmp_path / "p.toml")).sources[2].copy_to is None
    assert policy.check is None and policy.check_subset is None


@pytest.mark.parametrize("top, source, fragment", [
    ('copy-to = "rest://host/repo"\n', {}, "copy-to: unsupported repository URL scheme 'rest'"),
    ('copy-to = "sftp:host:/repo"\n', {}, "copy-to: the repository looks like a sftp: URL without '//'"),
    ('copy-to = 3\n', {}, "copy-to must be a repository URL or path (or false), got 3"),
    ('', {"copy-to-password-file": "x"}, "source 'db': copy-to-password-file needs copy-to"),
    ('', {"copy-retention": "x"}, "source 'db': copy-retention needs copy-to"),
    # at the top, with no copy-to anywhere, they were taken silently, whatever their value
    ('copy-wal = "yes"\n', {}, "copy-wal is for copy-to, and no source is copied"),
    ('copy-to-password-file = "off.pw"\n', {}, "copy-to-password-file is for copy-to, and no source is copied"),
    ('copy-retention = { keep-lst = 4 }\n', {}, "copy-retention is for copy-to, and no source is copied"),
    ('copy-to = "/off"\ncopy-wal = true\n', {"copy-to": False}, "copy-wal is for copy-to, and no source is copied"),
    ('copy-to = "/off"\ncopy-to-password-file = "a"\ncopy-to-password-command = "b"\n', {},
     "copy-to-password-file and copy-to-password-command both given: use one"),
    ('copy-to = "/off"\ncopy-retention = "nope"\n', {}, "'nope'"),
    ('copy-to = "/off"\n[copy-retention]\n', {}, "copy-retention sets no keep rule"),
    ('', {"copy-to": "repo"}, "copy-to names the policy's own repository"),
    ('check = "fortnightly"\n', {}, "policy {path}: check: invalid schedule 'fortnightly'"),
    ('check = "weekly"\ncheck-read-data-subset = "0/7"\n', {}, "check-read-data-subset: bad read-data subset '0/7'"),
    ('check = "weekly"\ncheck-read-data-subset = "7"\n', {}, "check-read-data-subset: bad read-data subset '7'"),
    ('check = "weekly"\ncheck-read-data-subset = 5\n', {}, "check-read-data-subset must be text like"),
    ('check-read-data-subset = "5%"\n', {}, "check-read-data-subset needs check"),
    ('check = "weekly"\nstate-file = ""\n', {}, "state-file must be a path"),
])
def test_a_bad_copy_or_check_setting_is_one_clear_line(tmp_path, tree, monkeypatch, capsys, top, source, fragment):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    path = write_policy(tmp_path / "bad.toml", "repo", [{"name": "db", "paths": [str(tree)], **source}],
                        top='full = "daily"\n' + top)
    for command in ("run", "daemon"):
        assert cli_main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"chunkvault: policy {path}: "), err
        assert fragment.format(path=path) in err[0], err
        assert "--read-data-subset" not in err[0]  # the command line's name of it is no help in a policy


# --------------------------------------------------------------------------- the pure part


def test_a_check_is_due_at_first_then_once_per_slot():
    weekly = parse_cadence("weekly sun 04:00")
    sun = datetime(2026, 3, 1, 4, 0, tzinfo=UTC)  # a Sunday
    assert check_due(weekly, sun, None).kind == "check"
    assert check_due(weekly, sun + timedelta(hours=1), sun + timedelta(minutes=5)).kind is None
    assert check_due(weekly, sun + timedelta(days=6), sun + timedelta(minutes=5)).kind is None
    due = check_due(weekly, sun + timedelta(days=7, minutes=1), sun + timedelta(minutes=5))
    assert (due.kind, due.slot) == ("check", sun + timedelta(days=7))
    # a check dated ahead of the clock (the clock was set back) serves no slot
    assert check_due(weekly, sun, sun + timedelta(days=2)).kind == "check"


@given(first=st.integers(1, 12), extra=st.integers(0, 11), runs=st.integers(1, 30))
def test_m_scheduled_checks_of_a_slice_subset_read_every_slice_once(first, extra, runs):
    m = first + extra
    last, seen = None, []
    for _ in range(runs):
        spec, last = check_slice(f"{first}/{m}", last)
        n, mm = (int(x) for x in spec.split("/"))
        assert mm == m and n == last and 1 <= n <= m
        seen.append(n)
    assert seen[0] == first
    for i in range(0, runs - m + 1):
        assert sorted(seen[i:i + m]) == list(range(1, m + 1))


def test_a_share_or_a_size_is_read_as_given():
    assert check_slice("5%", 3) == ("5%", None)
    assert check_slice("500M", None) == ("500M", None)
    assert check_slice(None, None) == (None, None)


# --------------------------------------------------------------------------- copy-to


def test_each_new_snapshot_is_copied_with_its_chain_and_copy_retention_applies_there(tmp_path, repos, tree):
    main, off = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "weekly sun 02:00"\ndiff = "daily 03:00"\ncopy-to = {q(off)}\n'
                                   'copy-to-password-file = "off.pw"\n'
                                   'copy-retention = { keep-full = 1 }\n')
    log: list[str] = []
    day = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    first = run(policy_path, tmp_path, log, day)
    (full,) = snapshots(main)
    assert first.ok and first.sources[0].status == "ok"
    (copy,) = offsite(off)
    assert (copy.kind, copy.time, copy.paths) == ("full", full.time, full.paths)
    assert first.sources[0].copy["copied"] == [{"source": full.id, "destination": copy.id}]
    assert any(line.startswith(f"db: copied 1 snapshot(s) to {off} (0 there already") for line in log), log

    (tree / "notes.txt").write_text("changed\n")
    second = run(policy_path, tmp_path, log, day + timedelta(days=1))
    assert second.ok and second.sources[0].kind == "diff"
    there = offsite(off)
    assert [s.kind for s in there] == ["full", "diff"] and there[1].parent == there[0].id
    with Repository.open(off, OTHER) as r:
        r.restore(there[1].id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "notes.txt").read_text() == "changed\n"

    # a week on: a new full, and keep-full = 1 there retires the old chain at the destination only
    third = run(policy_path, tmp_path, log, day + timedelta(days=7))
    assert third.ok and third.sources[0].kind == "full"
    assert len(snapshots(main)) == 3
    there = offsite(off)
    assert [s.kind for s in there] == ["full"] and there[0].time == snapshots(main)[-1].time
    assert third.sources[0].copy["retention"]["removed"] != []
    assert any(f"db at {off}: retention removed 2 snapshot(s)" in line for line in log), log


def test_copy_retention_s_forgotten_differentials_are_not_sent_again(tmp_path, repos, tree):
    """keep-full = 1, keep-diff = 1 there: each run's differential builds on the destination's rebased copy of
    its parent, so one snapshot travels per run (every differential the destination forgot went again, to be
    forgotten again), and the summary's `copied N` counts the snapshots sent."""
    main, off = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "weekly sun 02:00"\ndiff = "daily 03:00"\ncopy-to = {q(off)}\n'
                                   'copy-to-password-file = "off.pw"\nretention = { keep-last = 50 }\n'
                                   'copy-retention = { keep-full = 1, keep-diff = 1 }\n')
    day = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    log: list[str] = []
    for n in range(5):
        (tree / "notes.txt").write_text(f"day {n}\n")
        report = run(policy_path, tmp_path, log, day + timedelta(days=n))
        db = report.sources[0]
        assert report.ok and db.kind == ("full" if n == 0 else "diff")
        assert [c["source"] for c in db.copy["copied"]] == [db.snapshot_id], (n, db.copy)
        assert "; copied 1;" in report.summary()
        there = offsite(off)
        assert [s.kind for s in there] == (["full"] if n == 0 else ["full", "diff"])
        assert there[-1].stats["copied_from"] == db.snapshot_id
    with Repository.open(off, OTHER) as r:
        r.restore(there[-1].id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "notes.txt").read_text() == "day 4\n"


def test_a_failed_copy_fails_the_source_not_the_backup_and_the_next_copy_catches_up(tmp_path, repos, tree,
                                                                                    monkeypatch):
    """An unreachable destination: the snapshot stays, the post hook learns `failed`, retention of the source
    still applies, the run exits 1; the next run's copy sends the snapshot that missed its copy too."""
    from chunkvault.errors import StorageFull
    from chunkvault.remotes import open_remote
    from faults import FailingWrite

    main, off = repos
    env_out = tmp_path / "post.env"
    policy_path = write_policy(tmp_path / "p.toml", main, [
        {"name": "db", "paths": [str(tree)], "post": f"env | grep ^CHUNKVAULT_ | sort > {q(str(env_out))}"}],
        top=f'full = "weekly sun 02:00"\ndiff = "daily 03:00"\ncopy-to = {q(off)}\n'
            'copy-to-password-file = "off.pw"\nretention = { keep-last = 5 }\n')
    day = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    log: list[str] = []
    broken = []

    def opener(url: str, password: bytes) -> Repository:
        if url == off:  # the off-site disk is full: each write of data fails
            remote = FailingWrite(open_remote(url), at=1, stays=True,
                                  error=lambda: StorageFull("no space left on the off-site disk"))
            broken.append(remote)
            return Repository.open(remote, password)
        return Repository.open(url, password)

    report = run(policy_path, tmp_path, log, day, opener=opener)
    (saved,) = snapshots(main)
    db = report.sources[0]
    assert broken and broken[0].failed
    assert (db.status, db.snapshot_id) == ("failed", saved.id)
    assert db.copy_error == f"copy at {off}: no space left on the off-site disk" and db.copy is None
    assert db.retention is not None  # the backup was saved: the source's own retention still applies
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    assert env["CHUNKVAULT_RESULT"] == "failed" and env["CHUNKVAULT_SNAPSHOT_ID"] == saved.id
    assert env["CHUNKVAULT_ERROR"].startswith(f"copy at {off}: ")
    assert offsite(off) == []
    assert "copy failed 1" in report.summary() and "post hook" not in report.summary()
    assert any(line.startswith(f"db: full snapshot {saved.id[:8]} saved (") and "but the source failed: copy at"
               in line for line in log), log
    with pytest.raises(ChunkvaultError) as e:
        report.raise_for_status()
    assert e.value.exit_code == 1 and "db (copy at " in str(e.value)

    # the destination back: the next backup's copy sends the full that missed its copy, as its parent,
    # and one that missed it too while the destination had a copy of the source already
    (tree / "notes.txt").write_text("day 2\n")
    report = run(policy_path, tmp_path, log, day + timedelta(days=1))
    assert report.ok
    assert [s.kind for s in offsite(off)] == ["full", "diff"]
    (tree / "notes.txt").write_text("day 3\n")
    report = run(policy_path, tmp_path, log, day + timedelta(days=2), opener=opener)
    assert not report.ok and len(offsite(off)) == 2
    (tree / "notes.txt").write_text("day 4\n")
    report = run(policy_path, tmp_path, log, day + timedelta(days=3))
    assert report.ok and len(report.sources[0].copy["copied"]) == 2 and "; copied 2;" in report.summary()
    assert [s.time for s in offsite(off)] == [s.time for s in snapshots(main)]


def test_retention_keeps_what_a_destination_that_was_away_has_not_received(tmp_path, repos, tree):
    """A destination away for three days, retention keeping one differential: each day's retention forgot the
    differential of the day before, which no copy had sent, and the destination back missed them for good.
    Now they are kept until a copy sends them, then retention applies to them as before; a run with nothing
    due keeps them too."""
    main, off = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "weekly sun 02:00"\ndiff = "daily 03:00"\ncopy-to = {q(off)}\n'
                                   'copy-to-password-file = "off.pw"\nretention = { keep-full = 1, keep-diff = 1 }\n')
    day = datetime(2026, 3, 1, 3, 30, tzinfo=UTC)
    log: list[str] = []
    assert run(policy_path, tmp_path, log, day).ok
    for i in (1, 2, 3):
        (tree / "notes.txt").write_text(f"day {i}\n")
        os.rename(off, off + ".away")
        try:
            report = run(policy_path, tmp_path, log, day + timedelta(days=i))
        finally:
            os.rename(off + ".away", off)
        assert report.sources[0].copy_error is not None and report.sources[0].retention.removed == []
    assert f"db: retention keeps 3 snapshot(s) not copied to {off} yet (saved since 2026-03-02T03:30:00Z): " \
           "the next copy sends them" in log, log
    report = run(policy_path, tmp_path, log, day + timedelta(days=3, hours=12))  # nothing due, still kept
    assert report.sources[0].status == "idle" and report.sources[0].retention.removed == []
    (tree / "notes.txt").write_text("day 4\n")
    report = run(policy_path, tmp_path, log, day + timedelta(days=4))
    assert report.ok and len(report.sources[0].copy["copied"]) == 4
    assert len(report.sources[0].retention.removed) == 3  # sent: the rules apply to them again
    assert [s.time for s in offsite(off)] == [(day + timedelta(days=i)).isoformat(timespec="microseconds")
                                              for i in range(5)]
    assert [s.time for s in snapshots(main)] == [s.time for s in offsite(off)][::4]


def test_a_destination_that_is_not_there_or_has_no_password_fails_the_source(tmp_path, repos, tree, monkeypatch):
    main, off = repos
    for k in ("CHUNKVAULT_TO_PASSWORD", "CHUNKVAULT_TO_PASSWORD_FILE", "CHUNKVAULT_TO_PASSWORD_COMMAND"):
        monkeypatch.delenv(k, raising=False)
    policy_path = write_policy(tmp_path / "p.toml", main, [
        {"name": "gone", "paths": [str(tree)], "copy-to": str(tmp_path / "nowhere"),
         "copy-to-password-file": "off.pw"},
        {"name": "nopw", "paths": [str(tmp_path / "off.pw")], "copy-to": off},
        {"name": "wrong", "paths": [str(tmp_path / "p.toml")], "copy-to": off,
         "copy-to-password-command": "echo not-it"},
        {"name": "plain", "paths": [str(tmp_path / "data" / "notes.txt")]},
    ], top='full = "daily"\n')
    log: list[str] = []
    report = run(policy_path, tmp_path, log)
    gone, nopw, wrong, plain = report.sources
    assert gone.status == nopw.status == wrong.status == "failed" and plain.status == "ok"
    assert all(r.snapshot_id for r in report.sources) and len(snapshots(main)) == 4
    assert "no repository" in gone.copy_error.lower() or "not found" in gone.copy_error.lower(), gone.copy_error
    assert nopw.copy_error == (f"copy at {off}: no password for copy-to {off}: set copy-to-password-file or "
                               "copy-to-password-command, or CHUNKVAULT_TO_PASSWORD_FILE, "
                               "CHUNKVAULT_TO_PASSWORD_COMMAND or CHUNKVAULT_TO_PASSWORD")
    assert "password" in wrong.copy_error
    # the environment's destination password, as `copy --to` takes it
    monkeypatch.setenv("CHUNKVAULT_TO_PASSWORD", OTHER)
    for p in (tmp_path / "off.pw", tmp_path / "p.toml"):
        p.write_text(p.read_text() + "\n")
    report = run(policy_path, tmp_path, log, datetime.now(UTC) + timedelta(days=1))
    assert report.sources[1].status == "ok" and report.sources[2].status == "failed"
    assert [s.paths for s in offsite(off)] == [[str(tmp_path / "off.pw")]]


def test_an_unreachable_destination_fails_the_run_and_holds_no_lock_on_the_repository(tmp_path, repos, tree,
                                                                                      monkeypatch, capsys):
    """Through the command line, its retries and all: nothing listens at the destination's port."""
    main, _ = repos
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    env_out = tmp_path / "post.env"
    url = "sftp://me@127.0.0.1:8299/repo"
    policy_path = write_policy(tmp_path / "p.toml", main, [
        {"name": "db", "paths": [str(tree)], "post": f"env | grep ^CHUNKVAULT_RESULT > {q(str(env_out))}"}],
        top=f'full = "daily"\ncopy-to = {q(url)}\ncopy-to-password-file = "off.pw"\n')
    assert cli_main(["run", "--config", str(policy_path)]) == 1
    captured = capsys.readouterr()
    (saved,) = snapshots(main)
    assert captured.err.strip().splitlines()[-1].startswith(f"chunkvault: scheduled run failed: db (copy at {url}: ")
    assert "Connection refused" in captured.err.strip().splitlines()[-1]
    assert f"db: full snapshot {saved.short_id} saved" in captured.out and "copy failed 1" in captured.out
    assert env_out.read_text().strip() == "CHUNKVAULT_RESULT=failed"
    assert os.listdir(Path(main) / "locks") == []  # the copy's read lock went with it: a prune is not held off


def test_a_copy_a_stop_ends_is_stopped_not_failed(tmp_path, repos, tree):
    import threading

    from chunkvault.errors import RemoteUnavailable

    main, off = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily"\ncopy-to = {q(off)}\ncopy-to-password-file = "off.pw"\n')
    stop = threading.Event()

    def opener(url: str, password: bytes) -> Repository:
        if url == off:  # the stop came while the destination was retried: its retries were given up
            stop.set()
            raise RemoteUnavailable("gave up: stopping")
        return Repository.open(url, password)

    log: list[str] = []
    report = run(policy_path, tmp_path, log, opener=opener, stop=stop)
    db = report.sources[0]
    assert (db.status, db.copy_error, report.stopped) == ("ok", None, True)
    assert f"db: copy at {off} stopped (gave up: stopping)" in log
    assert "(stopped early)" in report.summary()


def test_a_password_in_the_destination_url_stays_out_of_the_log(tmp_path, repos, tree):
    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily"\ncopy-to = "sftp://me:hunter2@127.0.0.1:1/x"\n'
                                   'copy-to-password-file = "off.pw"\n')
    log: list[str] = []

    def opener(url: str, password: bytes) -> Repository:
        if url.startswith("sftp"):
            raise ChunkvaultError("unreachable")
        return Repository.open(url, password)

    report = run(policy_path, tmp_path, log, opener=opener)
    assert report.sources[0].copy_error == "copy at sftp://me:***@127.0.0.1:1/x: unreachable"
    assert not any("hunter2" in line for line in log)


# --------------------------------------------------------------------------- check


def test_a_check_runs_when_due_is_remembered_and_reads_the_next_slice_each_time(tmp_path, repos, tree):
    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily 02:00"\ncheck = "weekly sun 04:00"\n'
                                   'check-read-data-subset = "2/3"\n')
    sun = datetime(2026, 3, 1, 4, 30, tzinfo=UTC)
    log: list[str] = []
    report = run(policy_path, tmp_path, log, sun)
    assert report.ok and report.check["ok"] and report.check["subset"] == "2/3"
    assert "check: checking the repository, reading slice 2 of 3 (no check yet)" in log
    assert "; check passed" in report.summary()
    state = json.loads((tmp_path / "p.state").read_text())
    assert state["checks"][main] == {"time": "2026-03-01T04:30:00Z", "slice": 2}

    log.clear()
    report = run(policy_path, tmp_path, log, sun + timedelta(days=1))
    assert report.check is None and report.ok
    assert "check: not due (next slot 2026-03-08T04:00:00Z)" in log

    report = run(policy_path, tmp_path, log, sun + timedelta(days=7))
    assert report.check["subset"] == "3/3" and report.check["ok"]
    report = run(policy_path, tmp_path, log, sun + timedelta(days=14))
    assert report.check["subset"] == "1/3"
    # --source names what to back up: no check in such a run
    policy = load_policy(str(policy_path))
    runner = Runner(policy, PASSWORD.encode(), clock=lambda: sun + timedelta(days=21), log=log.append,
                    lock_file=str(tmp_path / "p.lock"), state_file=str(tmp_path / "p.state"))
    assert runner.run(only=["db"]).check is None


def test_a_check_a_stop_skipped_or_cut_short_is_not_reported_passed(tmp_path, repos, tree, monkeypatch):
    """The summary said `check passed` and the JSON `check` object had no `ok` when a stop came before the
    check began, or during it: now `check skipped` / `check stopped`, `ok` null, and nothing remembered."""
    import threading

    from chunkvault.errors import Stopped

    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily 02:00"\ncheck = "daily 04:00"\n')
    when = datetime(2026, 3, 1, 4, 30, tzinfo=UTC)
    stop = threading.Event()
    stop.set()
    log: list[str] = []
    report = run(policy_path, tmp_path, log, when, stop=stop)
    assert report.stopped and "check: skipped, stopping" in log
    assert report.check["ok"] is None and report.check["stopped"] == "skipped"
    assert report.to_dict()["check"]["ok"] is None
    assert "check passed" not in report.summary() and "; check skipped (stopped early)" in report.summary()
    assert not (tmp_path / "p.state").exists()

    stop = threading.Event()

    def cut_short(self, **kw):
        stop.set()
        raise Stopped("stopping")

    monkeypatch.setattr(Repository, "check", cut_short)
    report = run(policy_path, tmp_path, log, when, stop=stop)
    assert report.stopped and report.check["ok"] is None and report.check["stopped"] == "stopped"
    assert "check passed" not in report.summary() and "; check stopped (stopped early)" in report.summary()
    assert not (tmp_path / "p.state").exists()


def test_a_check_that_finds_damage_fails_the_run_names_it_and_runs_again(tmp_path, repos, tree, monkeypatch,
                                                                        capsys):
    main, _ = repos
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily 02:00"\ncheck = "daily 05:00"\n'
                                   'check-read-data-subset = "100%"\n')
    assert cli_main(["run", "--config", str(policy_path)]) == 0
    assert "check passed" in capsys.readouterr().out
    state_before = (tmp_path / "p.toml.state").read_text()
    pack = next(p for p in sorted((Path(main) / "data").rglob("*")) if p.is_file())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    state = json.loads(state_before)
    state["checks"][main]["time"] = "2000-01-01T00:00:00Z"  # as if the last check were long ago
    (tmp_path / "p.toml.state").write_text(json.dumps(state))

    for _ in range(2):  # not remembered: the next run checks again
        code = cli_main(["run", "--config", str(policy_path), "--json"])
        captured = capsys.readouterr()
        assert code == VerificationFailed.exit_code == 18
        doc = json.loads(captured.out)
        found = len(doc["check"]["problems"])
        assert not doc["ok"] and found and doc["check_error"] == f"check found {found} problem(s)"
        assert any(pack.name in p for p in doc["check"]["problems"])
        assert captured.err.strip().splitlines()[-1] == ("chunkvault: scheduled run failed: "
                                                         f"check found {found} problem(s)")
        assert any(line.startswith("check: error: ") and pack.name in line for line in captured.err.splitlines())
    assert json.loads((tmp_path / "p.toml.state").read_text())["checks"][main]["time"] == "2000-01-01T00:00:00Z"


def test_a_check_that_cannot_run_fails_the_run_with_exit_1(tmp_path, repos, tree):
    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily"\ncheck = "daily"\n')

    class Unreachable(Repository):
        def check(self, **kw):
            raise ChunkvaultError("the storage went away")

    log: list[str] = []
    report = run(policy_path, tmp_path, log, opener=lambda u, p: Unreachable.open(u, p))
    assert report.check_error == "check failed: the storage went away" and "check: failed: the storage went away" in log
    with pytest.raises(ChunkvaultError) as e:
        report.raise_for_status()
    assert type(e.value) is ChunkvaultError and e.value.exit_code == 1
    assert not (tmp_path / "p.state").exists()


def test_a_broken_state_file_is_said_and_the_check_runs(tmp_path, repos, tree):
    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily"\ncheck = "weekly"\n')
    (tmp_path / "p.state").write_text("{not json")
    log: list[str] = []
    report = run(policy_path, tmp_path, log)
    assert report.check["ok"]
    assert any(line.startswith(f"warning: state file {tmp_path / 'p.state'} does not read") for line in log)
    assert json.loads((tmp_path / "p.state").read_text())["checks"][main]["time"]


def test_a_state_file_whose_slice_is_no_number_starts_the_slices_again(tmp_path, repos, tree):
    """A slice the state file holds as text (edited by hand) failed every run with an internal error after its
    backups, the run's report lost: it is taken as none remembered, as a state file that does not read."""
    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "daily"\ncheck = "weekly"\ncheck-read-data-subset = "2/3"\n')
    for bad in ("3", 2.5, [1], True):
        (tmp_path / "p.state").write_text(json.dumps({"checks": {main: {"time": "2020-01-01T00:00:00Z",
                                                                        "slice": bad}}}))
        report = run(policy_path, tmp_path, [])
        assert report.ok and report.check["subset"] == "2/3" and report.check["ok"]
        assert json.loads((tmp_path / "p.state").read_text())["checks"][main]["slice"] == 2
    assert check_slice("1/4", "2") == ("1/4", 1) and check_slice("1/4", 2) == ("3/4", 3)


def test_a_state_file_s_own_directory_is_made_so_the_check_is_remembered(tmp_path, repos, tree):
    """Its directory missing, the state file was never written: each run checked again, a warning alone said so."""
    main, _ = repos
    state = tmp_path / "lib" / "db.state"
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily"\ncheck = "weekly"\nstate-file = {q(str(state))}\n')
    log: list[str] = []
    policy = load_policy(str(policy_path))
    for expected in (True, False):
        runner = Runner(policy, PASSWORD.encode(), log=log.append, lock_file=str(tmp_path / "p.lock"))
        report = runner.run()
        assert report.ok and (report.check is not None) == expected
    assert json.loads(state.read_text())["checks"][main]["time"]
    assert not any("could not be written" in line for line in log)


def test_a_daemon_wakes_for_a_check_slot(tmp_path, repos, tree):
    main, _ = repos
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "monthly 02:00"\ncheck = "weekly sun 04:00"\n')
    now = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)  # a Monday
    clock = FakeClock(now)
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=clock,
                    state_file=str(tmp_path / "p.state"))
    assert Daemon(runner, clock=clock)._next_slot(now) == datetime(2026, 3, 8, 4, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- dry run and the command line


def test_a_dry_run_says_what_it_would_copy_and_check_and_does_neither(tmp_path, repos, tree, monkeypatch, capsys):
    main, off = repos
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily"\ncopy-to = {q(off)}\ncopy-to-password-file = "off.pw"\n'
                                   'copy-retention = { keep-last = 2 }\ncheck = "weekly"\n'
                                   'check-read-data-subset = "1/7"\n')
    assert cli_main(["run", "--config", str(policy_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"db: would copy it to {off}, then apply copy-retention there" in out
    assert "check: would check the repository, reading slice 1 of 7 (no check yet)" in out
    assert snapshots(main) == [] and offsite(off) == []
    assert not (tmp_path / "p.toml.state").exists()

    assert cli_main(["run", "--config", str(policy_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["check"]["ok"] and doc["check_error"] is None
    (src,) = doc["sources"]
    assert src["copy_error"] is None and src["copy"]["destination"] == off
    assert [c["source"] for c in src["copy"]["copied"]] == [s.id for s in snapshots(main)]
    assert len(offsite(off)) == 1


def test_the_readme_s_policy_example_loads_with_its_copy_and_check(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("### Scheduled snapshots", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "policy.toml").write_text(example)
    policy = load_policy(str(tmp_path / "policy.toml"))
    db, dump = policy.sources
    assert db.copy_to.url == "sftp://backup@offsite.example/srv/repo" and db.copy_to.retention.keep_full == 4
    assert db.copy_to.retention.keep_diff == 24  # keep-full alone would forget every differential copied
    assert db.copy_to.password_file == str(tmp_path / "offsite.key")
    assert dump.copy_to.url == "s3://offsite-bucket/app" and dump.copy_to.password_file == db.copy_to.password_file
    assert policy.check.text == "weekly sun 04:00" and policy.check_subset == "1/4"


def test_copy_wal_sends_the_archived_wal_with_each_copy(tmp_path, repos, tree):
    main, off = repos
    seg = write_segment(tmp_path, "000000010000000000000001", size=1 << 20)
    with Repository.open(main, PASSWORD) as r:
        r.archive_push(seg)
    top = (f'full = "daily 02:00"\ncopy-to = {q(off)}\ncopy-to-password-file = "off.pw"\n')
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=top + "copy-wal = true\n")
    assert load_policy(str(policy_path)).sources[0].copy_to.wal
    log: list[str] = []
    assert run(policy_path, tmp_path, log, datetime(2026, 3, 1, 2, 30, tzinfo=UTC)).ok
    assert any("db: copied 1 snapshot(s), 1 archived WAL file(s) to" in line for line in log), log
    with Repository.open(off, OTHER) as r:
        r.archive_get(seg.name, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == seg.read_bytes()
    plain = write_policy(tmp_path / "q.toml", main, [{"name": "db", "paths": [str(tree)]}], top=top)
    assert not load_policy(str(plain)).sources[0].copy_to.wal


def _archived_unopenable(tmp_path: Path, main: str) -> Path:
    """A segment archived in ``main`` whose ``wal/`` object is then damaged: it no longer opens, so it cannot go."""
    seg = write_segment(tmp_path, "000000010000000000000001", size=1 << 20)
    with Repository.open(main, PASSWORD) as r:
        r.archive_push(seg)
    victim = Path(main) / "wal" / seg.name
    sealed = victim.read_bytes()
    victim.write_bytes(sealed[:-1] + bytes([sealed[-1] ^ 1]))
    return seg


def test_a_wal_file_not_copied_fails_the_run_after_the_snapshots_went_and_their_retention_ran(tmp_path, repos,
                                                                                              tree):
    """A WAL file that did not go raised before the copy was recorded: the summary said `copied 0` although
    the snapshot was at the destination, and copy-retention never ran."""
    main, off = repos
    seg = _archived_unopenable(tmp_path, main)
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\ncopy-to = {q(off)}\ncopy-to-password-file = "off.pw"\n'
                                   'copy-wal = true\ncopy-retention = { keep-last = 1 }\n')
    day = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    log: list[str] = []
    run(policy_path, tmp_path, log, day)
    (tree / "notes.txt").write_text("changed\n")
    report = run(policy_path, tmp_path, log, day + timedelta(days=1))
    db = report.sources[0]
    assert not report.ok and db.status == "failed" and f"wal/{seg.name} not copied" in db.copy_error
    assert [c["source"] for c in db.copy["copied"]] == [db.snapshot_id]
    assert db.copy["retention"]["removed"] != [] and len(offsite(off)) == 1


def test_a_wal_file_not_copied_is_still_named_when_copy_retention_then_fails(tmp_path, repos, tree, serve_factory,
                                                                            monkeypatch):
    """A WAL file that did not go was reported only after copy-retention: refused there (an append-only
    token), its refusal alone was the copy's error, and the summary counted a copy-retention failure, where
    archived WAL had not gone and wal-expire waited for it without the log saying why."""
    main, _ = repos
    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    monkeypatch.setenv("CHUNKVAULT_HTTP_TOKEN", APPEND_TOKEN)
    Repository.init(server.url, OTHER, kdf_seconds=0).close()
    seg = _archived_unopenable(tmp_path, main)
    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\ncopy-to = {q(server.url)}\n'
                                   'copy-to-password-file = "off.pw"\ncopy-wal = true\n'
                                   'copy-retention = { keep-last = 1 }\n')
    log: list[str] = []
    report = run(policy_path, tmp_path, log, datetime(2026, 3, 1, 2, 30, tzinfo=UTC))
    db = report.sources[0]
    assert [c["source"] for c in db.copy["copied"]] == [db.snapshot_id]
    assert f"wal/{seg.name} not copied" in db.copy_error and "copy-retention at " in db.copy_error, db.copy_error
    assert any(f"wal/{seg.name} not copied" in line for line in log), log
    assert "; copied 1, copy failed 1;" in report.summary()


def wal_steps(tmp_path: Path, main: str, tree: Path):
    """``push(i)``: archive segment i of timeline 1 in ``main``; ``label(i)``: make the tree a base backup
    that starts in segment i (its backup_label)."""

    def push(i: int) -> None:
        seg = write_segment(tmp_path, f"00000001000000000000000{i}", i, 1 << 20)
        with Repository.open(main, PASSWORD) as r:
            r.archive_push(seg)

    def label(seg: int) -> None:
        (tree / "backup_label").write_text(f"START WAL LOCATION: 0/{seg}000028 (file 00000001000000000000000{seg})\n")

    return push, label


def test_wal_expire_waits_for_the_copies_of_the_wal_to_have_gone(tmp_path, repos, tree):
    """With copy-wal, the archived WAL reaches the other repository only with a copy: expired after a copy that
    failed, the segments since the last one never got there, a gap in its recoveries for good."""
    main, off = repos

    push, label = wal_steps(tmp_path, main, tree)

    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\ncopy-to = {q(off)}\ncopy-to-password-file = "off.pw"\n'
                                   'copy-wal = true\ncopy-retention = { keep-last = 5 }\nwal-expire = true\n'
                                   '[retention]\nkeep-last = 1\n')
    day = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    log: list[str] = []
    push(1)
    label(2)
    assert run(policy_path, tmp_path, log, day).ok
    push(2)
    push(3)
    label(4)
    os.rename(off, off + ".away")  # out of reach for this run
    report = run(policy_path, tmp_path, log, day + timedelta(days=1))
    os.rename(off + ".away", off)
    # the copy failed: retention keeps the snapshot it did not send (and the one before, keep-last 1 of those sent)
    assert report.sources[0].copy_error is not None and report.sources[0].retention.removed == []
    assert report.wal_expired is None and any("wal-expire skipped" in line for line in log), log
    with Repository.open(main, PASSWORD) as r:
        assert [w.name for w in r.archive_list()] == [f"00000001000000000000000{i}" for i in (2, 3)]
    push(4)
    label(4)
    report = run(policy_path, tmp_path, log, day + timedelta(days=2))
    assert report.ok and report.wal_expired == ["000000010000000000000002", "000000010000000000000003"]
    with Repository.open(off, OTHER) as r:
        # segment 1 is before the start of every base backup there: never sent
        assert [w.name for w in r.archive_list()] == [f"00000001000000000000000{i}" for i in (2, 3, 4)]


def test_a_copy_retention_an_append_only_destination_refuses_keeps_neither_wal_expire_nor_its_reason_hidden(
        tmp_path, repos, tree, serve_factory, monkeypatch):
    """Copies to a backup service with an append-only token, copy-retention set as well: the copy went, WAL
    and all, and only the forget there was refused, yet wal-expire was skipped at every run as if no archived
    WAL had been copied, and the repository's WAL archive grew for good; the refusal did not say what to change."""
    main, _ = repos
    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    monkeypatch.setenv("CHUNKVAULT_HTTP_TOKEN", APPEND_TOKEN)
    Repository.init(server.url, OTHER, kdf_seconds=0).close()

    push, label = wal_steps(tmp_path, main, tree)

    policy_path = write_policy(tmp_path / "p.toml", main, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\ncopy-to = {q(server.url)}\n'
                                   'copy-to-password-file = "off.pw"\ncopy-wal = true\ncopy-retention = { keep-last = 1 }\nwal-expire = true\n'
                                   '[retention]\nkeep-last = 1\n')
    day = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)
    log: list[str] = []
    push(1)
    push(2)
    label(2)
    first = run(policy_path, tmp_path, log, day)
    db = first.sources[0]
    assert [c["source"] for c in db.copy["copied"]] == [db.snapshot_id]
    assert db.copy_error.startswith("copy-retention at ") and "leave copy-retention out" in db.copy_error
    assert "; copied 1, copy-retention failed 1;" in first.summary()  # the copy went: not a failed copy
    assert first.wal_expired == ["000000010000000000000001"], log
    assert not any("wal-expire skipped" in line for line in log), log
    push(3)
    label(3)
    second = run(policy_path, tmp_path, log, day + timedelta(days=1))
    assert second.sources[0].copy_error.startswith("copy-retention at ")
    assert second.wal_expired == ["000000010000000000000002"], log
    with Repository.open(server.url, OTHER) as r:
        assert [w.name for w in r.archive_list()] == ["000000010000000000000002", "000000010000000000000003"]
