import io
import json

import pytest

from chunkvault.progress import JsonProgress, Progress


@pytest.fixture
def booted_5_s_ago(monkeypatch):
    """The monotonic clock at 5 s, whose sums with whole seconds are exact: at most values (a machine booted
    a minute ago: 62.725) ``start + 2`` less ``start`` is a rounding short of 2 s, and the ETA shown one second
    short."""
    monkeypatch.setattr("chunkvault.progress.time.monotonic", lambda: 5.0)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_line_has_rate_and_eta(booted_5_s_ago):
    p = Progress("restore", 1000, stream=io.StringIO(), enabled=True)
    assert p.line(3, 500, p.start + 2) == "restore: 3 files, 500 B of 1000 B (50%), 250 B/s, ETA 0:02"


def test_the_eta_is_rounded_up_to_the_second(booted_5_s_ago):
    """1.5 s to go shows 0:02, not 0:01: a countdown that reaches 0:00 with work left looks stuck."""
    p = Progress("restore", 1000, stream=io.StringIO(), enabled=True)
    assert p.line(3, 400, p.start + 1).endswith("ETA 0:02")
    assert p.line(3, 250, p.start + 1).endswith("ETA 0:03")
    # the last 100 bytes of 10 GB at 1 GB/s: a microsecond to go is still a second, not 0:00
    p = Progress("restore", 10**10, stream=io.StringIO(), enabled=True)
    assert p.line(3, 10**10 - 100, p.start + 10).endswith("ETA 0:01")


def test_files_grown_since_the_walk_counted_them_show_100_percent_and_no_eta(booted_5_s_ago):
    """More bytes read than the walk counted (files growing during the backup) is still at most done."""
    p = Progress("backup", 1000, stream=io.StringIO(), enabled=True)
    assert p.line(3, 1500, p.start + 3) == "backup: 3 files, 1.5 KiB of 1000 B (100%), 500 B/s"


def test_silent_unless_a_terminal():
    quiet = io.StringIO()
    p = Progress("backup", stream=quiet, interval=0)
    p(1, 10)
    p.done()
    assert quiet.getvalue() == ""
    tty = FakeTTY()
    p = Progress("backup", stream=tty, interval=0)
    p(1, 10)
    p.done()
    assert "backup: 1 files" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")


def test_clear_takes_the_status_line_away_for_a_line_of_output_and_the_next_report_shows_it():
    out = io.StringIO()
    p = Progress("backup", stream=out, enabled=True, interval=0)
    p.clear()  # nothing shown: nothing to take away
    assert out.getvalue() == ""
    p(3, 100)
    p.clear()
    assert out.getvalue().endswith("\r\x1b[K") and not p.shown
    p.done()  # cleared already: the end writes nothing more
    assert out.getvalue().count("\r\x1b[K") == 2
    p(4, 200)
    assert p.shown and out.getvalue().rsplit("\r\x1b[K", 1)[1].startswith("backup: 4 files, 200 B")


def test_unit_and_late_total(booted_5_s_ago):
    p = Progress("check", stream=io.StringIO(), enabled=True, unit="packs")
    p(2, 100, 400)
    assert p.line(2, 100, p.start + 1) == "check: 2 packs, 100 B of 400 B (25%), 100 B/s, ETA 0:03"


def test_json_lines_at_most_once_an_interval_and_a_final_one(monkeypatch):
    monkeypatch.setattr("chunkvault.progress.time.monotonic", lambda: 5.0)  # a machine started 5 s ago
    out = io.StringIO()
    p = JsonProgress("restore", 1000, stream=out, interval=3600, unit="files")
    p(1, 100)  # the first report is written, the next within the interval are not
    p(2, 400)
    p(3, 900)
    p.done()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["files"], x["bytes"], x["final"]) for x in lines] == [(1, 100, False), (3, 900, True)]
    assert lines[0]["total_bytes"] == 1000 and lines[0]["eta_seconds"] is not None and lines[1]["eta_seconds"] is None


def test_every_json_line_has_the_same_keys_null_where_there_is_no_value_yet(monkeypatch):
    """``eta_seconds`` and ``final`` were left out of the lines without them (a backup's before its tree
    was counted, each but the last, the last's ETA), while ``total_bytes`` came as null: a program reading
    ``line["final"]`` or ``line["eta_seconds"]`` from each line failed on the first."""
    monkeypatch.setattr("chunkvault.progress.time.monotonic", lambda: 5.0)
    out = io.StringIO()
    p = JsonProgress("backup", stream=out, interval=0)
    p(0, 0)  # the total not counted yet
    p(1, 100, 400)
    p.done()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len({tuple(sorted(x)) for x in lines}) == 1
    assert [(x["total_bytes"], x["eta_seconds"] is None, x["final"]) for x in lines] == [
        (None, True, False), (400, False, False), (400, True, True)]


def test_a_total_of_no_bytes_is_a_total_not_a_null(monkeypatch, tmp_path, cli, new_repo):
    """A counted total of 0 bytes (an empty tree, a restore of a snapshot of empty files)
    came as ``total_bytes: null`` on every line, the final one too, as if it were never counted: a program
    could not tell a known empty total from one still unknown."""
    monkeypatch.setattr("chunkvault.progress.time.monotonic", lambda: 5.0)
    out = io.StringIO()
    p = JsonProgress("backup", stream=out, interval=0)
    p(0, 0, 0)
    p.done()
    assert [json.loads(line)["total_bytes"] for line in out.getvalue().splitlines()] == [0, 0]
    p = Progress("restore", 0, stream=io.StringIO(), enabled=True)
    assert p.line(0, 0, p.start + 1) == "restore: 0 files, 0 B, 0 B/s"

    repo = new_repo()
    (tmp_path / "empty").mkdir()
    repo.backup([str(tmp_path / "empty")])
    restore = cli("restore", "-r", repo.store.remote.display_url, "latest", "--target", str(tmp_path / "out"), "-q",
                  "--progress", "json")
    assert json.loads(restore.stderr.decode().splitlines()[-1])["total_bytes"] == 0
    empty = new_repo()
    check = cli("check", "-r", empty.store.remote.display_url, "--read-data", "-q", "--progress", "json")
    assert json.loads(check.stderr.decode().splitlines()[-1])["total_bytes"] == 0


def _history(tmp_path, repo, n=3):
    import random

    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    for i in range(n):
        (src / f"f{i}").write_bytes(rnd.randbytes(300_000))
        repo.backup([str(src)])
    return src


def test_check_copy_and_prune_report_progress(tmp_path, new_repo):
    repo = new_repo(pack_size=100_000)
    _history(tmp_path, repo)

    calls = []
    report = repo.check(read_data=True, progress=lambda *a: calls.append(a))
    assert report.ok and len(calls) == report.packs + 1  # the total first, then each pack
    assert calls[0] == (0, 0, report.bytes_read)
    assert [c[0] for c in calls] == list(range(0, report.packs + 1))
    assert calls[-1][1] == calls[-1][2] == report.bytes_read > 0
    assert all(a[1] <= b[1] for a, b in zip(calls, calls[1:]))

    other = new_repo(copy_chunker_from=repo)
    sent = []
    result = repo.copy_to(other, progress=lambda *a: sent.append(a))
    assert sent and sent[-1] == (result.blobs_sent, result.bytes_sent)

    repo.forget([repo.snapshots()[0].id])
    steps = []
    plan = repo.prune(max_unused=0.0, progress=lambda *a: steps.append(a))
    assert steps[0] == (0, 0, plan.repacked_bytes)  # the total first, as check's
    assert len(steps) == 1 + 2 * len(plan.repack) + len(plan.delete) + len(plan.orphans) > 1
    assert steps[-1][1] == steps[-1][2] == plan.repacked_bytes


def test_cli_shows_progress_on_a_terminal_only(tmp_path, new_repo):
    """check on a pseudo-terminal prints the status line; piped output stays clean."""
    import os
    import subprocess
    import sys

    from treeutil import on_terminal

    repo = new_repo(pack_size=100_000)
    _history(tmp_path, repo)
    url = repo.store.remote.display_url
    env = {**os.environ, "CHUNKVAULT_PASSWORD": "correct horse battery staple"}
    for cmd in (["check", "--read-data"], ["prune", "--max-unused", "0"]):
        proc, out = on_terminal([*cmd, "-r", url], env)
        assert proc.returncode == 0
        assert b"\r\x1b[K" not in proc.stdout
        if cmd[0] == "check":
            assert b"check: " in out and b" packs, " in out, out
        piped = subprocess.run([sys.executable, "-m", "chunkvault.cli", *cmd, "-r", url], env=env,
                               capture_output=True, timeout=120)
        assert b"\x1b[K" not in piped.stderr + piped.stdout


def test_cli_progress_json_on_stderr_with_the_result_on_stdout(tmp_path, cli, new_repo):
    repo = new_repo(pack_size=100_000)
    src = _history(tmp_path, repo)
    url = repo.store.remote.display_url

    def final(proc, what):
        lines = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.startswith("{")]
        assert lines and all(x["progress"] == what for x in lines)
        assert lines[-1]["final"] is True and not any(x["final"] for x in lines[:-1])
        return lines[-1]

    backup = cli("backup", "-r", url, str(src), "--force", "--json", "--progress", "json")
    done = final(backup, "backup")
    snap = json.loads(backup.stdout)
    assert (done["files"], done["bytes"]) == (3, snap["stats"]["read_bytes"]) == (3, 900_000)
    restore = cli("restore", "-r", url, "latest", "--target", str(tmp_path / "out"), "-q", "--progress", "json")
    assert final(restore, "restore")["bytes"] == 900_000
    check = cli("check", "-r", url, "--read-data", "-q", "--progress", "json")
    assert final(check, "check")["packs"] > 0
    quiet = cli("check", "-r", url, "--read-data", "--progress", "none")
    assert not [line for line in quiet.stderr.decode().splitlines() if line.startswith("{")]


def test_a_backup_s_last_report_carries_its_total_even_when_it_ended_before_its_count(tmp_path, new_repo,
                                                                                     monkeypatch):
    """The tree's total comes from a second walk; a backup that ended first gave its last report (the
    final --progress json line) no total, about one small backup in two."""
    from chunkvault.store import backup

    class NeverDone:
        def __init__(self, source):
            self.done, self.files, self.bytes = False, 0, 0

        def close(self):
            pass

    monkeypatch.setattr(backup, "TreeTotal", NeverDone)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 1000)
    (src / "b").write_bytes(b"b" * 500)
    repo = new_repo()
    calls = []
    repo.backup([str(src)], progress=calls.append)
    assert (calls[-1]["total_files"], calls[-1]["total_bytes"]) == (2, 1500)
    (src / "c").write_bytes(b"c" * 7)
    calls.clear()
    repo.backup([str(src)], progress=calls.append)
    assert (calls[-1]["total_files"], calls[-1]["total_bytes"]) == (3, 1507)
    assert all(c["total_bytes"] is None for c in calls[:-1])


def test_a_prune_measures_its_rate_from_its_work_not_from_its_plan(monkeypatch, tmp_path, new_repo):
    """A prune's marking takes a minute on a repository of millions of blobs (and ``--wait`` may wait out a
    backup first): counted as repacking, it put the rate at a fortieth of the real one and the ETA of the
    repack at forty times the time left.  The rate is of the work since the prune reported its total."""
    import chunkvault.store.prune as prune_module

    import os

    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    for name in "ab":
        (src / name).write_bytes(os.urandom(300_000))
    first = repo.backup([str(src)]).snapshot
    (src / "a").unlink()
    repo.backup([str(src)])
    repo.forget([first.id])  # half of the one pack unused: repacked
    clock = {"now": 5.0, "tick": 0.0}

    def monotonic():
        clock["now"] += clock["tick"]
        return clock["now"]

    monkeypatch.setattr("chunkvault.progress.time.monotonic", monotonic)
    planned = prune_module.plan_prune

    def slow_plan(*args, **kwargs):
        clock["now"] += 1000.0  # the marking: 1000 s
        clock["tick"] = 0.01  # then each look at the clock 10 ms on
        return planned(*args, **kwargs)

    monkeypatch.setattr(prune_module, "plan_prune", slow_plan)
    out = io.StringIO()
    bar = JsonProgress("prune", stream=out, interval=0, unit="packs")
    plan = repo.prune(max_unused=0.0, progress=bar)
    bar.done()
    last = json.loads(out.getvalue().splitlines()[-1])
    assert plan.repacked_bytes > 0 and last["bytes"] == plan.repacked_bytes
    assert last["seconds"] > 1000  # the whole command's time
    assert last["bytes_per_second"] > plan.repacked_bytes / 10  # the repack's: a few seconds, not 1000
