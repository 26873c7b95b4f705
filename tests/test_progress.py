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
