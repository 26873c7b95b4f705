"""A policy's verify (the newest snapshot of each source restored and compared on a schedule, as
verify-restore does): its settings, its due-ness and the state file, the runs against a local repository, a
damaged pack, and a real PostgreSQL 15 copy started and queried."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from chunkvault import Repository
from chunkvault.errors import ChunkvaultError, Stopped, UsageError, VerificationFailed
from chunkvault.schedule import (parse_cadence, parse_policy, state_document, state_sections, verification_passed,
                                 verified_times, verify_due)
from chunkvault.scheduler import Daemon, Runner, RunReport, load_policy
from test_policy_steps import RunTime, snapshot_time, tree  # noqa: F401 (fixtures: the run's time, a source)
from test_scheduler import FakeClock, cli_main, q, repo_url, write_policy  # noqa: F401 (repo_url: a fixture)

UTC = timezone.utc
PASSWORD = "scheduled secret"
SUNDAY = datetime(2026, 3, 1, 5, 30, tzinfo=UTC)  # just after the slot of "weekly sun 05:00"


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def run(policy_path: Path, tmp_path: Path, log: list[str], when: datetime, **kw) -> RunReport:
    RunTime.at = when
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=lambda: when, log=log.append,
                    lock_file=str(tmp_path / "p.lock"), state_file=str(tmp_path / "p.state"))
    return runner.run(**kw)


def state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "p.state").read_text())


def flip_a_bit_in_a_data_pack(url: str) -> None:
    pack = next(p for p in sorted((Path(url) / "data").rglob("*")) if p.is_file())
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))


# --------------------------------------------------------------------------- the pure part


SRC = {"name": "db", "paths": ["/d"]}


def policy(top: dict | None = None, **source):
    return parse_policy({"repository": "/r", "full": "daily", **(top or {}), "source": [{**SRC, **source}]})


@pytest.mark.parametrize("top, source, fragment", [
    ({"verify": "fortnightly"}, {}, "verify: invalid schedule 'fortnightly'"),
    ({"verify": True}, {}, "verify at the top is a schedule like"),
    ({"verify-timeout": 60}, {}, "verify-timeout needs verify (a schedule"),
    ({"verify-scratch": "/s"}, {}, "verify-scratch needs verify"),
    ({"verify": "weekly", "verify-timeout": 0}, {}, "verify-timeout must be a positive number of seconds"),
    ({"verify": "weekly", "verify-timeout": "1h"}, {}, "verify-timeout must be a positive number"),
    ({"verify": "weekly", "verify-timeout": float("nan")}, {}, "verify-timeout must be a positive number"),
    ({"verify": "weekly", "verify-timeout": float("inf")}, {}, "verify-timeout must be a positive number"),
    ({"verify": "weekly", "verify-scratch": ""}, {}, "verify-scratch must be a directory's path"),
    ({"verify": "weekly", "verify-wat": 1}, {}, "unknown setting 'verify-wat'"),
    ({}, {"verify-then": "true"}, "source 'db': verify-then needs verify at the top"),
    ({}, {"verify": False}, "source 'db': verify needs verify at the top"),
    ({"verify": "weekly"}, {"verify": "daily"}, "verify in a source is true or false"),
    ({"verify": "weekly"}, {"verify": False, "verify-then": "x"}, "verify-then is for a verified source"),
    ({"verify": "weekly"}, {"verify-then": ""}, "verify-then must be a non-empty string"),
    ({"verify": "weekly"}, {"verify-then": ["psql", "-c", "select 1"]}, "verify-then must be a non-empty string"),
    ({"verify": "weekly"}, {"verify-pg-start": "yes"}, "verify-pg-start must be true or false"),
    ({"verify": "weekly"}, {"verify-pg-query": "select 1"}, "verify-pg-query asks the restored PostgreSQL copy: "
                                                            "set verify-pg-start = true too"),
    ({"verify": "weekly"}, {"verify-pg-dbname": "app"}, "verify-pg-dbname asks"),
    ({"verify": "weekly"}, {"verify-pg-start": True, "verify-pg-expect": "1"}, "give the query too"),
    ({"verify": "weekly"}, {"verify-pg-start": True, "verify-pg-query": " "}, "verify-pg-query must be a non-empty"),
    ({"verify": "weekly"}, {"postgres": True, "verify-pg-start": False, "verify-pg-query": "select 1"},
     "set verify-pg-start = true too"),
    ({"verify": "weekly"}, {"paths": None, "command": "pg_dump", "stdin-name": "a.sql", "verify-pg-start": True},
     "a command source's holds its output"),
    ({"verify": "weekly"}, {"verify-timeout": -1}, "source 'db': verify-timeout must be a positive number"),
    ({"verify": "weekly"}, {"verify-pg-bindir": "/usr/lib/postgresql/15/bin"}, "verify-pg-bindir asks"),
    ({"verify": "weekly"}, {"verify-pg-recover": True}, "verify-pg-recover asks the restored PostgreSQL copy"),
    ({"verify": "weekly"}, {"postgres": True, "verify-pg-recover": "end"}, "verify-pg-recover must be true or false"),
    ({"verify": "weekly"}, {"postgres": True, "verify-pg-bindir": ""}, "verify-pg-bindir must be a non-empty"),
    ({"verify": "weekly"}, {"verify-numeric-owner": 1}, "verify-numeric-owner must be true or false"),
])
def test_a_bad_verify_setting_is_one_usage_error(top, source, fragment):
    source = {k: v for k, v in source.items() if v is not None}
    if "command" in source:
        source = {"name": "db", **source}
        config = {"repository": "/r", "full": "daily", **top, "source": [source]}
    else:
        config = {"repository": "/r", "full": "daily", **top, "source": [{**SRC, **source}]}
    with pytest.raises(UsageError) as e:
        parse_policy(config)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_verify_settings_default_from_the_top_and_the_source(tmp_path):
    top = {"verify": "weekly sun 05:00", "verify-timeout": 300, "verify-scratch": "scratch"}
    config = {"repository": "/r", "full": "daily", **top, "source": [
        {"name": "files", "paths": ["/f"]},
        {"name": "db", "paths": ["/var/lib/postgresql/15/main"], "postgres": True,
         "verify-pg-query": "select count(*) from t", "verify-pg-expect": "", "verify-timeout": 900,
         "verify-pg-bindir": "pg/bin", "verify-pg-recover": True, "verify-numeric-owner": True},
        {"name": "dump", "command": "pg_dump", "stdin-name": "a.sql", "verify-then": "test -s \"$D\"",
         "verify-scratch": "/big"},
        {"name": "off", "paths": ["/o"], "verify": False},
    ]}
    p = parse_policy(config, str(tmp_path))
    files, db, dump, off = p.sources
    assert p.verify.text == "weekly sun 05:00"
    assert not files.verify.pg_start and files.verify.timeout == 300.0
    assert files.verify.scratch == str(tmp_path / "scratch")
    assert db.verify.pg_start and db.verify.pg_query == "select count(*) from t" and db.verify.pg_expect == ""
    assert db.verify.timeout == 900.0 and db.verify.pg_dbname is None
    assert db.verify.pg_bindir == str(tmp_path / "pg" / "bin") and db.verify.pg_recover and db.verify.numeric_owner
    assert files.verify.pg_bindir is None and not files.verify.pg_recover and not files.verify.numeric_owner
    assert dump.verify.then == "test -s \"$D\"" and dump.verify.scratch == "/big" and not dump.verify.pg_start
    assert off.verify is None
    assert policy().verify is None and policy().sources[0].verify is None  # no verify at the top: none at all
    assert not policy({"verify": "daily"}, postgres=True, **{"verify-pg-start": False}).sources[0].verify.pg_start


def test_a_verification_is_due_at_first_then_once_per_slot_until_one_passes():
    weekly = parse_cadence("weekly sun 05:00")
    slot = datetime(2026, 3, 1, 5, 0, tzinfo=UTC)
    due = verify_due(weekly, slot, None)
    assert (due.kind, due.slot, due.reason) == ("verify", slot, "no verification yet")
    passed = slot + timedelta(minutes=20)
    assert verify_due(weekly, slot + timedelta(days=6), passed).kind is None
    due = verify_due(weekly, slot + timedelta(days=7, minutes=1), passed)  # one that failed left the slot unserved
    assert (due.kind, due.slot) == ("verify", slot + timedelta(days=7))
    assert due.reason == "verification slot 2026-03-08T05:00Z not served"
    ahead = verify_due(weekly, slot, slot + timedelta(days=2))  # remembered while the clock ran ahead
    assert ahead.kind == "verify" and ahead.reason == "the last verification is dated ahead"


def test_the_state_file_keeps_checks_as_they_were_and_verifications_beside_them():
    old = {"version": 1, "checks": {"/r": {"time": "2026-03-01T04:30:00Z", "slice": 2}}}
    sections = state_sections(old)  # written by the code before verify
    assert sections == {"checks": old["checks"], "verifications": {}, "copies": {}}
    sections["verifications"]["/r"] = {"time": "2026-03-01T05:30:00Z", "snapshots": {"db": "ab"}}
    doc = json.loads(json.dumps(state_document(sections)))
    assert doc["version"] == 1 and doc["checks"] == old["checks"]  # what the code before reads, unchanged
    assert state_sections(doc) == sections
    assert state_sections("garbage") == state_sections(None) == {"checks": {}, "verifications": {}, "copies": {}}
    assert state_sections({"checks": [], "verifications": {"/r": "x", "/s": {"time": "t"}}}) == \
        {"checks": {}, "verifications": {"/s": {"time": "t"}}, "copies": {}}


def test_each_source_is_remembered_on_its_own_and_an_older_state_file_for_all_at_once():
    t1, t2 = datetime(2026, 3, 1, 5, 30, tzinfo=UTC), datetime(2026, 3, 8, 5, 40, tzinfo=UTC)
    older = {"time": "2026-03-01T05:30:00Z", "snapshots": {"a": "aa", "b": "bb"}}  # every source had passed
    assert verified_times(older, ["a", "b", "new"]) == {"a": t1, "b": t1, "new": None}
    entry = verification_passed(older, ["a", "b", "new"], "a", "a2", t2)
    assert entry == {"snapshots": {"a": "a2", "b": "bb"},
                     "passed": {"a": "2026-03-08T05:40:00Z", "b": "2026-03-01T05:30:00Z"}}  # no time: new has none
    assert verified_times(entry, ["a", "b", "new"]) == {"a": t2, "b": t1, "new": None}
    entry = verification_passed(entry, ["a", "b", "new"], "new", "nn", t2)
    assert entry["time"] == "2026-03-01T05:30:00Z"  # the oldest pass: what an older chunkvault reads for all
    entry = verification_passed(entry, ["b", "new"], "b", "b2", t2)  # a left the policy (or has verify = false)
    assert entry == {"snapshots": {"b": "b2", "new": "nn"}, "time": "2026-03-08T05:40:00Z",
                     "passed": {"b": "2026-03-08T05:40:00Z", "new": "2026-03-08T05:40:00Z"}}
    assert verified_times({"passed": {"a": "not a time"}, "time": 5}, ["a"]) == {"a": None}
    assert verified_times({"passed": [], "snapshots": "x"}, ["a"]) == {"a": None}


def test_a_run_report_s_exit_code_for_a_verification():
    found = RunReport(SUNDAY, False, verify_error="verify failed for 1 of 1 snapshot(s) (db)", verify_problems=1)
    with pytest.raises(VerificationFailed) as e:
        found.raise_for_status()
    assert str(e.value) == "scheduled run failed: verify failed for 1 of 1 snapshot(s) (db)"
    not_run = RunReport(SUNDAY, False, verify_error="verify could not run for db")
    with pytest.raises(ChunkvaultError) as e:
        not_run.raise_for_status()
    assert type(e.value) is ChunkvaultError
    both = RunReport(SUNDAY, False, check_error="check failed: gone", verify_error="verify failed for 1 of 1 "
                     "snapshot(s) (db)", verify_problems=1)
    with pytest.raises(ChunkvaultError) as e:  # a check that could not run is exit 1, whatever verify found
        both.raise_for_status()
    assert type(e.value) is ChunkvaultError
    checked = RunReport(SUNDAY, False, check_error="check found 2 problem(s)", check_problems=2,
                        verify_error="verify failed for 1 of 1 snapshot(s) (db)", verify_problems=1)
    with pytest.raises(VerificationFailed):
        checked.raise_for_status()


# --------------------------------------------------------------------------- runs


def test_a_due_verification_runs_passes_is_remembered_and_is_not_due_again(tmp_path, repo_url, tree, scratch):
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)], "verify-then": "test \"$(cat \"$CHUNKVAULT_RESTORE_DIR/notes.txt\")\" = "
                                                           "hello && test \"$CHUNKVAULT_SOURCE\" = db"}],
        top=f'full = "daily 02:00"\ncheck = "weekly sun 04:00"\nverify = "weekly sun 05:00"\n'
            f'verify-scratch = {q(str(scratch))}\nverify-timeout = 60\n')
    log: list[str] = []
    report = run(policy_path, tmp_path, log, SUNDAY)
    assert report.ok, (report.to_dict(), log)
    v = report.to_dict()["verify"]
    [snap] = [r.snapshot_id for r in report.sources]
    assert v["ok"] and v["reason"] == "no verification yet" and v["slot"] == "2026-03-01T05:00:00Z"
    [entry] = v["sources"]
    assert entry["source"] == "db" and entry["snapshot"] == snap and entry["ok"] and entry["mismatches"] == 0
    assert entry["error"] is None and entry["command_exit"] == 0 and entry["pg_start"] is None
    assert report.to_dict()["verify_error"] is None and "; check passed; verify passed" in report.summary()
    # after the backup and the check, as the brief of the run says
    order = [i for i, line in enumerate(log) if line.startswith(("db: full snapshot", "check: no problems",
                                                                 "verify: db: snapshot"))]
    assert len(order) == 3 and order == sorted(order)
    assert f"verify: db: restoring snapshot {snap[:8]}, then run its verify-then" in log
    assert any(line.startswith(f"verify: db: snapshot {snap[:8]} restored as saved (2 files") for line in log)
    st = state(tmp_path)
    assert st["checks"][repo_url]["time"] == "2026-03-01T05:30:00Z"  # the check's, as before
    assert st["verifications"][repo_url] == {"time": "2026-03-01T05:30:00Z", "snapshots": {"db": snap},
                                             "passed": {"db": "2026-03-01T05:30:00Z"}}
    assert os.listdir(scratch) == []

    log.clear()
    report = run(policy_path, tmp_path, log, SUNDAY + timedelta(days=1))
    assert report.ok and report.verify is None and "verify: not due (next slot 2026-03-08T05:00:00Z)" in log
    report = run(policy_path, tmp_path, log, SUNDAY + timedelta(days=7))  # the next slot: the newest snapshot
    assert report.verify["ok"] and report.verify["sources"][0]["snapshot"] == report.sources[0].snapshot_id
    # --source names what to back up: no verification in such a run
    assert run(policy_path, tmp_path, log, SUNDAY + timedelta(days=14), only=["db"]).verify is None


def test_a_damaged_pack_fails_the_run_with_the_line_is_not_remembered_and_runs_again(tmp_path, repo_url, tree,
                                                                                    scratch, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "monthly 02:00"\nverify = "daily 05:00"\n'
                                   f'verify-scratch = {q(str(scratch))}\nstate-file = {q(str(tmp_path / "p.state"))}\n')
    assert cli_main(["run", "--config", str(policy_path)]) == 0
    assert "verify passed" in capsys.readouterr().out
    before = state(tmp_path)
    snap = before["verifications"][repo_url]["snapshots"]["db"]
    flip_a_bit_in_a_data_pack(repo_url)
    long_ago = "2000-01-01T00:00:00Z"  # as if the last one were long ago
    before["verifications"][repo_url].update(time=long_ago, passed={"db": long_ago})
    (tmp_path / "p.state").write_text(json.dumps(before))

    for _ in range(2):  # not remembered: the next run verifies again
        code = cli_main(["run", "--config", str(policy_path), "--json"])
        captured = capsys.readouterr()
        assert code == VerificationFailed.exit_code == 18
        doc = json.loads(captured.out)
        assert not doc["ok"] and doc["verify_error"] == "verify failed for 1 of 1 snapshot(s) (db)"
        [entry] = doc["verify"]["sources"]
        assert entry["snapshot"] == snap and not entry["ok"] and entry["error"].startswith("restore failed: corrupt")
        assert doc["verify"]["ok"] is False
        lines = [line for line in captured.err.splitlines() if line.startswith(f"verify: db: snapshot {snap[:8]} ")]
        assert len(lines) == 1 and lines[0].startswith(f"verify: db: snapshot {snap[:8]} failed: restore failed: "
                                                       "corrupt object"), captured.err
        assert captured.err.strip().splitlines()[-1] == ("chunkvault: scheduled run failed: "
                                                         "verify failed for 1 of 1 snapshot(s) (db)")
    assert state(tmp_path)["verifications"][repo_url]["passed"] == {"db": long_ago}
    assert os.listdir(scratch) == []


def test_a_failing_verify_then_fails_the_snapshot_and_a_source_with_verify_false_is_left_out(
        tmp_path, repo_url, tree, scratch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "f").write_text("x")
    third = tmp_path / "third"
    shutil.copytree(other, third)
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "a", "paths": [str(tree)], "verify-then": "echo no such table >&2; exit 3"},
        {"name": "b", "paths": [str(other)], "verify": False},
        {"name": "c", "paths": [str(third)]}],
        top=f'full = "daily 02:00"\nverify = "weekly sun 05:00"\nverify-scratch = {q(str(scratch))}\n')
    log: list[str] = []
    report = run(policy_path, tmp_path, log, SUNDAY)
    assert [e["source"] for e in report.verify["sources"]] == ["a", "c"]
    a, c = report.verify["sources"]
    assert not a["ok"] and a["command_exit"] == 3 and a["error"] == "verify-then exited 3" and c["ok"]
    assert report.verify_error == "verify failed for 1 of 2 snapshot(s) (a)" and report.verify_problems == 1
    assert f"verify: a: snapshot {a['snapshot'][:8]} failed: verify-then exited 3" in log
    assert not any(line.startswith("verify: b:") for line in log)
    with pytest.raises(VerificationFailed):
        report.raise_for_status()
    mine = state(tmp_path)["verifications"][repo_url]  # c's pass is remembered, and only that
    assert mine == {"snapshots": {"c": c["snapshot"]}, "passed": {"c": "2026-03-01T05:30:00Z"}}

    log.clear()  # the next run verifies a alone: c is not due again until the next slot
    report = run(policy_path, tmp_path, log, SUNDAY + timedelta(hours=1))
    assert [e["source"] for e in report.verify["sources"]] == ["a"] and report.verify_problems == 1
    assert report.verify["sources"][0]["reason"] == "no verification yet"
    assert "verify: c: not due (passed 2026-03-01T05:30:00Z)" in log
    assert not any(line.startswith("verify: c: restoring") for line in log)
    assert "verify: verify failed for 1 of 1 snapshot(s) (a); it runs again at the next run" in log


def test_a_source_without_snapshots_is_skipped_with_a_line(tmp_path, repo_url, tree, scratch):
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)]}, {"name": "gone", "paths": [str(tmp_path / "missing")],
                                               "full": "monthly 02:00"}],
        top=f'full = "daily 02:00"\nverify = "weekly sun 05:00"\nverify-scratch = {q(str(scratch))}\n')
    log: list[str] = []
    report = run(policy_path, tmp_path, log, SUNDAY)  # gone's backup fails: it has no snapshot
    assert "verify: gone: no snapshot to verify" in log
    assert [e["source"] for e in report.verify["sources"]] == ["db"] and report.verify["ok"]


def test_a_dry_run_says_what_it_would_verify_and_does_not(tmp_path, repo_url, tree, scratch, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily"\nverify = "weekly"\nverify-scratch = {q(str(scratch))}\n')
    called = []
    monkeypatch.setattr("chunkvault.verify.verify_restore", lambda **kw: called.append(kw))
    assert cli_main(["run", "--config", str(policy_path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "verify: would restore and compare db's newest snapshot (the one this run makes) " \
           "(no verification yet)" in out
    monkeypatch.undo()
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    assert cli_main(["run", "--config", str(policy_path), "--source", "db"]) == 0  # a snapshot, no verification
    capsys.readouterr()
    assert not (tmp_path / "p.toml.state").exists()
    monkeypatch.setattr("chunkvault.verify.verify_restore", lambda **kw: called.append(kw))
    assert cli_main(["run", "--config", str(policy_path), "-n", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [snap] = [s for s in Repository.open(repo_url, PASSWORD).snapshots()]
    assert doc["verify"]["sources"] == [{"source": "db", "snapshot": snap.id}] and "ok" not in doc["verify"]
    assert called == [] and not (tmp_path / "p.toml.state").exists() and os.listdir(scratch) == []


def test_a_verification_a_stop_skipped_or_cut_short_is_neither_passed_nor_remembered(tmp_path, repo_url, tree,
                                                                                   scratch, monkeypatch):
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\nverify = "daily 05:00"\n'
                                   f'verify-scratch = {q(str(scratch))}\n')
    log: list[str] = []
    assert run(policy_path, tmp_path, log, SUNDAY, only=["db"]).ok  # a snapshot, nothing verified
    stop = threading.Event()
    stop.set()
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=lambda: SUNDAY, log=log.append,
                    state_file=str(tmp_path / "p.state"), stop=stop)
    report = runner.run()
    assert report.stopped and "verify: skipped, stopping" in log
    assert report.verify["ok"] is None and report.verify["stopped"] == "skipped"
    assert "verify passed" not in report.summary() and "; verify skipped (stopped early)" in report.summary()
    assert not (tmp_path / "p.state").exists()

    import chunkvault.repository as repository

    stop = threading.Event()
    stopped_by = []

    def interrupted(self, *a, **kw):
        stop.set()
        stopped_by.append(1)
        raise Stopped("stopping")

    monkeypatch.setattr(repository.Repository, "restore", interrupted)
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=lambda: SUNDAY, log=log.append,
                    state_file=str(tmp_path / "p.state"), stop=stop)
    report = runner.run()
    assert stopped_by and report.stopped and report.verify["ok"] is None and report.verify["stopped"] == "stopped"
    assert report.verify_error is None and "; verify stopped (stopped early)" in report.summary()
    assert "verify: db: stopped" in log and "stopped (stop" not in log
    assert not (tmp_path / "p.state").exists() and os.listdir(scratch) == []


def test_a_run_s_stop_stops_the_restore_in_progress(tmp_path, repo_url, tree, scratch, monkeypatch):
    """The restore of a large snapshot must not hold a SIGTERM for as long as it takes: the run's stop
    reaches the repository's operation, which raises Stopped at its next progress point."""
    import chunkvault.repository as repository

    policy_path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\nverify = "daily 05:00"\n'
                                   f'verify-scratch = {q(str(scratch))}\n')
    log: list[str] = []
    assert run(policy_path, tmp_path, log, SUNDAY, only=["db"]).ok
    stop = threading.Event()
    asked = threading.Event()

    def stop_asked(self):
        asked.set()

    def long_restore(self, *a, **kw):
        stop.set()  # SIGTERM arrives during the restore
        if not asked.wait(10):
            raise AssertionError("the run's stop did not reach the repository")
        raise Stopped("stopped")

    monkeypatch.setattr(repository.Repository, "restore", long_restore)
    monkeypatch.setattr(repository.Repository, "stop", stop_asked)
    runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=lambda: SUNDAY, log=log.append,
                    state_file=str(tmp_path / "p.state"), stop=stop)
    report = runner.run()
    assert asked.is_set() and report.verify["stopped"] == "stopped" and not (tmp_path / "p.state").exists()


def test_a_daemon_wakes_for_a_verify_slot_and_a_policy_with_verify_needs_a_state_file(tmp_path, repo_url, tree):
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top='full = "monthly 02:00"\ncheck = "weekly sun 04:00"\nverify = "daily 05:00"\n')
    now = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
    clock = FakeClock(now)
    policy = load_policy(str(policy_path))
    runner = Runner(policy, PASSWORD.encode(), clock=clock, state_file=str(tmp_path / "p.state"))
    assert Daemon(runner, clock=clock)._next_slot(now) == datetime(2026, 3, 2, 5, 0, tzinfo=UTC)
    without_check = load_policy(str(write_policy(tmp_path / "q.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                                                 top='full = "daily"\nverify = "daily"\n')))
    with pytest.raises(UsageError, match="verify needs a state file"):
        Runner(without_check, PASSWORD.encode())


def test_a_bad_verify_setting_is_one_line_from_the_command_line(tmp_path, tree, monkeypatch, capsys):
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    path = write_policy(tmp_path / "bad.toml", "repo", [{"name": "db", "paths": [str(tree)],
                                                         "verify-pg-expect": "1"}],
                        top='full = "daily"\nverify = "weekly sun 05:00"\n')
    for command in ("run", "daemon"):
        assert cli_main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"chunkvault: policy {path}: source 'db': verify-pg-expect asks the restored PostgreSQL "
                       "copy: set verify-pg-start = true too"], err


def test_the_readme_s_policy_example_loads_with_its_verify(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("### Scheduled snapshots", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "policy.toml").write_text(example)
    p = load_policy(str(tmp_path / "policy.toml"))
    db, dump = p.sources
    assert p.verify.text == "weekly sun 05:00" and db.verify.scratch == "/var/tmp/chunkvault-verify"
    assert db.verify.timeout == 1800.0 and not db.verify.pg_start and dump.verify.then.startswith("grep -q")


# --------------------------------------------------------------------------- a real PostgreSQL 15 copy


@contextlib.contextmanager
def postgres_policy(tmp_path, monkeypatch, rows: int, top: str):
    """A running cluster with a table ``t`` of ``rows`` rows, reached through the PG* variables, and a policy
    backing it up as a ``postgres`` source verified with ``select count(*) from t`` answering ``rows`` (``top``:
    the verify keys), with its shared scratch directory: (cluster, policy path, scratch)."""
    from servers_pg import PgCluster, require_postgres, shared_tempdir

    bindir = require_postgres()
    with PgCluster(bindir, settings=("fsync=off",)) as c:
        c.init()
        c.start()
        c.sql(f"CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, {rows})")
        for k, v in {"PGHOST": c.rundir, "PGPORT": str(c.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
                     "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}.items():
            monkeypatch.setenv(k, v)
        url = str(tmp_path / "repo")
        Repository.init(url, PASSWORD, kdf_seconds=0).close()
        scratch = shared_tempdir("chunkvault-policy-verify-")
        try:
            policy_path = tmp_path / "p.toml"
            policy_path.write_text(f'repository = {q(url)}\nfull = "daily 02:00"\n{top}\n'
                                   f'verify-scratch = {q(scratch)}\n[[source]]\nname = "pg"\n'
                                   f'paths = [{q(c.datadir)}]\npostgres = true\n'
                                   f'verify-pg-query = "select count(*) from t"\nverify-pg-expect = "{rows}"\n')
            yield c, policy_path, scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.slow
def test_a_postgres_source_s_copy_is_started_and_queried(tmp_path, monkeypatch):
    with postgres_policy(tmp_path, monkeypatch, 321, 'verify = "weekly sun 05:00"\nverify-timeout = 120') as (
            c, policy_path, scratch):
        log: list[str] = []
        report = run(policy_path, tmp_path, log, SUNDAY)
        assert report.ok, (report.to_dict(), log)
        [entry] = report.to_dict()["verify"]["sources"]
        [pg] = entry["pg_start"]
        assert entry["ok"] and pg["ok"] and pg["version"] == "15" and pg["answer"] == "321", entry
        assert "postgres" in pg["databases"] and pg["data_directory"] == "."
        assert any(line.startswith(f"verify: pg: snapshot {entry['snapshot'][:8]} restored as saved")
                   and "PostgreSQL 15 in . started, the query answered '321'" in line for line in log), log
        assert f"verify: pg: restoring snapshot {entry['snapshot'][:8]}, then start its PostgreSQL" in log
        assert os.listdir(scratch) == []

        policy_path.write_text(policy_path.read_text().replace('"321"', '"322"'))
        log.clear()
        report = run(policy_path, tmp_path, log, SUNDAY + timedelta(days=7))
        [entry] = report.to_dict()["verify"]["sources"]
        assert not entry["ok"] and report.verify_problems == 1 and not report.failed
        assert entry["error"] == "PostgreSQL in . failed: the query answered '321', expected '322'", entry
        assert f"verify: pg: snapshot {entry['snapshot'][:8]} failed: {entry['error']}" in log
        with pytest.raises(VerificationFailed):
            report.raise_for_status()
        assert os.listdir(scratch) == []


@pytest.mark.slow
def test_a_postgres_source_s_copy_is_recovered_to_the_end_of_the_wal_archive(tmp_path, monkeypatch):
    """verify-pg-recover: the copy replays what the repository's WAL archive holds past the snapshot, so the
    rows written since are there; verify-pg-bindir names the server's binaries."""
    with postgres_policy(tmp_path, monkeypatch, 100, 'verify = "hourly"\nverify-timeout = 120') as (
            c, policy_path, scratch):
        text = policy_path.read_text() + f"verify-pg-recover = true\nverify-pg-bindir = {q(c.bindir)}\n"
        policy_path.write_text(text)
        log: list[str] = []
        report = run(policy_path, tmp_path, log, SUNDAY)  # nothing archived yet: the copy's own WAL, to its end
        assert report.ok, (report.to_dict(), log)
        c.sql("insert into t select generate_series(101, 150)")
        closed = c.sql("select pg_walfile_name(pg_switch_wal())")
        pg_wal = os.path.join(c.datadir, "pg_wal")
        with Repository.open(str(tmp_path / "repo"), PASSWORD) as repo:
            for name in sorted(os.listdir(pg_wal)):
                if len(name) == 24 and name <= closed:
                    repo.archive_push(os.path.join(pg_wal, name))
        policy_path.write_text(text.replace('verify-pg-expect = "100"', 'verify-pg-expect = "150"'))
        log.clear()
        report = run(policy_path, tmp_path, log, SUNDAY + timedelta(hours=1))  # no backup due, the verify is
        assert report.ok and not any(r.snapshot_id for r in report.sources), (report.to_dict(), log)
        [entry] = report.to_dict()["verify"]["sources"]
        assert entry["ok"] and entry["pg_start"][0]["answer"] == "150", entry
        assert f"verify: pg: restoring snapshot {entry['snapshot'][:8]}, then recover its PostgreSQL to the " \
               "archive's end" in log
        assert os.listdir(scratch) == []


@pytest.mark.slow
def test_a_stop_that_reaches_the_copy_s_server_stops_the_verification_and_fails_nothing(tmp_path, monkeypatch):
    """systemd's stop (and Ctrl-C's) reaches every process of the service, the copy's server too, which then
    refuses the queries: the snapshot was not found broken, the run was stopped."""
    import signal

    from chunkvault import pgstart
    from servers_pg import left_of

    with postgres_policy(tmp_path, monkeypatch, 5, 'verify = "daily 05:00"') as (c, policy_path, scratch):
        log: list[str] = []
        assert run(policy_path, tmp_path, log, SUNDAY, only=["pg"]).ok  # a snapshot, nothing verified
        stop = threading.Event()
        servers: list[int] = []
        ready = pgstart.Server.wait_ready

        def stopped_while_ready(self, deadline):
            ready(self, deadline)
            servers.append(self.proc.pid)
            stop.set()  # SIGTERM to the service: the daemon's stop, and the copy's server's
            os.killpg(self.proc.pid, signal.SIGTERM)
            while self.exited() is None:
                pass

        monkeypatch.setattr(pgstart.Server, "wait_ready", stopped_while_ready)
        runner = Runner(load_policy(str(policy_path)), PASSWORD.encode(), clock=lambda: SUNDAY, log=log.append,
                        state_file=str(tmp_path / "p.state"), stop=stop)
        report = runner.run()
        assert servers and left_of(servers[0]) == []
        assert report.verify_error is None and report.verify_problems == 0, (report.verify, log)
        assert report.stopped and report.verify["ok"] is None and report.verify["stopped"] == "stopped"
        report.raise_for_status()
        assert not (tmp_path / "p.state").exists() and os.listdir(scratch) == []


def test_a_verification_that_could_not_run_reports_every_key_of_a_source_s_entry(tmp_path, repo_url, tree, scratch):
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [
        {"name": "db", "paths": [str(tree)]},
        {"name": "gone", "paths": [str(tree)], "host": "other", "verify-scratch": str(tmp_path / "no" / "such")}],
        top=f'full = "daily 02:00"\nverify = "weekly sun 05:00"\nverify-scratch = {q(str(scratch))}\n')
    log: list[str] = []
    report = run(policy_path, tmp_path, log, SUNDAY)
    ran, not_run = json.loads(json.dumps(report.to_dict()))["verify"]["sources"]
    assert ran["ok"] and not_run["not_run"] and not_run["error"], (not_run, log)
    assert sorted(not_run) == sorted(ran), "the README names the same keys for each source"


def test_a_newest_snapshot_whose_object_does_not_load_fails_the_verification(tmp_path, repo_url, tree, scratch):
    """A snapshot object that does not load cannot be dated nor said whose it is: it may be a source's newest.
    The run verified the newest of those that load instead, an older one, passed and remembered it (as
    verify-restore of the latest does not)."""
    policy_path = write_policy(tmp_path / "p.toml", repo_url, [{"name": "db", "paths": [str(tree)]}],
                               top=f'full = "daily 02:00"\nverify = "daily 05:00"\n'
                                   f'verify-scratch = {q(str(scratch))}\n')
    log: list[str] = []
    assert run(policy_path, tmp_path, log, SUNDAY).ok
    (tree / "notes.txt").write_text("changed\n")
    day_after = SUNDAY + timedelta(days=1)
    report = run(policy_path, tmp_path, log, day_after.replace(hour=2, minute=30))  # a backup, no verification
    assert report.ok and report.verify is None
    newest = report.sources[0].snapshot_id
    path = Path(repo_url) / "snapshots" / newest
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    log.clear()
    report = run(policy_path, tmp_path, log, day_after)  # the slot's backup is refused; the verification runs
    assert not report.ok and report.verify["ok"] is False, (report.to_dict(), log)
    [entry] = report.verify["sources"]
    assert not entry["ok"] and not entry["not_run"]
    assert f"the snapshot object {newest[:8]} is unreadable" in entry["error"]
    assert report.verify_error == "verify failed for 1 of 1 snapshot(s) (db)"
    assert state(tmp_path)["verifications"][repo_url]["passed"] == {"db": "2026-03-01T05:30:00Z"}
    assert os.listdir(scratch) == []
