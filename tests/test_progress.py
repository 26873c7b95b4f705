import io

from chunkvault.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_line_has_rate_and_eta():
    p = Progress("restore", 1000, stream=io.StringIO(), enabled=True)
    assert p.line(3, 500, p.start + 2) == "restore: 3 files, 500 B of 1000 B (50%), 250 B/s, ETA 0:02"


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


def test_unit_and_late_total():
    p = Progress("check", stream=io.StringIO(), enabled=True, unit="packs")
    p(2, 100, 400)
    assert p.line(2, 100, p.start + 1) == "check: 2 packs, 100 B of 400 B (25%), 100 B/s, ETA 0:03"


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
    assert report.ok and len(calls) == report.packs
    assert [c[0] for c in calls] == list(range(1, report.packs + 1))
    assert calls[-1][1] == calls[-1][2] == report.bytes_read > 0
    assert all(a[1] <= b[1] for a, b in zip(calls, calls[1:]))

    other = new_repo(copy_chunker_from=repo)
    sent = []
    result = repo.copy_to(other, progress=lambda *a: sent.append(a))
    assert sent and sent[-1] == (result.blobs_sent, result.bytes_sent)

    repo.forget([repo.snapshots()[0].id])
    steps = []
    plan = repo.prune(max_unused=0.0, progress=lambda *a: steps.append(a))
    assert len(steps) == 2 * len(plan.repack) + len(plan.delete) + len(plan.orphans) > 0
    assert steps[-1][1] == steps[-1][2] == plan.repacked_bytes


def test_cli_shows_progress_on_a_terminal_only(tmp_path, new_repo):
    """check on a pseudo-terminal prints the status line; piped output stays clean."""
    import os
    import pty
    import subprocess
    import sys

    repo = new_repo(pack_size=100_000)
    _history(tmp_path, repo)
    url = repo.store.remote.display_url
    env = {**os.environ, "CHUNKVAULT_PASSWORD": "correct horse battery staple"}
    for cmd in (["check", "--read-data"], ["prune", "--max-unused", "0"]):
        master, slave = pty.openpty()
        proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", *cmd, "-r", url], env=env,
                              stdout=subprocess.PIPE, stderr=slave, timeout=120)
        os.close(slave)
        out = b""
        try:
            while chunk := os.read(master, 65536):
                out += chunk
        except OSError:
            pass
        os.close(master)
        assert proc.returncode == 0
        assert b"\r\x1b[K" not in proc.stdout
        if cmd[0] == "check":
            assert b"check: " in out and b" packs, " in out, out
        piped = subprocess.run([sys.executable, "-m", "chunkvault.cli", *cmd, "-r", url], env=env,
                               capture_output=True, timeout=120)
        assert b"\x1b[K" not in piped.stderr + piped.stdout
