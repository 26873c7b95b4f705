"""verify-restore --pg-recover's WAL relay without a server: the requests it takes and refuses, the replies the
client reads, the command and settings written, and a relay answering the real client over its socket."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import pytest

from chunkvault import pgstart, walfetch
from chunkvault.errors import UsageError, WalRelayRefused
from chunkvault.pgrecovery import parse_target, verification_target, write_recovery
from chunkvault.verify import check_pg_options
from chunkvault.walrelay import CLIENT_FILE, Request, WalRelay, inside, parse_request, relay_command, reply
from walsegments import write_segment

SEGMENT = "000000010000000000000003"


# --- pure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [SEGMENT, "00000002.history", SEGMENT + ".partial",
                                  SEGMENT + ".00000028.backup"])
def test_a_get_of_a_wal_name_with_one_descriptor_is_taken(name):
    assert parse_request(f"GET {name}".encode(), 1) == Request("GET", name)
    assert parse_request(b"PING", 0) == Request("PING")


@pytest.mark.parametrize("data, fds, why", [
    (b"GET ../../etc/passwd", 1, "not the name of a file PostgreSQL archives"),
    (b"GET 00000001000000000000000G", 1, "not the name"),
    (b"GET " + SEGMENT.encode() + b"\n", 1, "not the name"),
    (b"GET \xff\xfe", 1, "not the name"),
    (b"GET " + SEGMENT.encode(), 0, "needs one descriptor"),
    (b"GET " + SEGMENT.encode(), 2, "needs one descriptor"),
    (b"PING", 1, "carries no descriptor"),
    (b"PUT " + SEGMENT.encode(), 1, "not a request"),
    (b"GET", 1, "not a request"),
    (b"", 0, "not a request"),
    (b"GET " + b"0" * 200, 1, "longer than 128 bytes"),
])
def test_requests_that_are_not_the_relays_are_refused(data, fds, why):
    with pytest.raises(WalRelayRefused, match=why):
        parse_request(data, fds)


def test_a_truncated_message_is_refused_whatever_it_held():
    with pytest.raises(WalRelayRefused, match="longer than"):
        parse_request(b"GET " + SEGMENT.encode(), 1, truncated=True)


def test_replies_are_one_bounded_line_and_read_back():
    assert reply("OK", "16777216") == b"OK 16777216" and reply("MISSING") == b"MISSING"
    long = reply("ERROR", "damaged\nobject " + "x" * 5000)
    assert len(long) == walfetch.MAX_REPLY and b"\n" not in long
    assert walfetch.parse_reply(b"OK 16777216") == ("OK", "16777216")
    assert walfetch.parse_reply(b"OK") == ("OK", "")
    assert walfetch.parse_reply(b"MISSING") == ("MISSING", "")
    assert walfetch.parse_reply(b"ERROR wal/x: damaged") == ("ERROR", "wal/x: damaged")
    assert walfetch.parse_reply(b"OK twelve")[0] == "ERROR"  # a size is digits
    assert walfetch.parse_reply(b"MISSING but")[0] == "ERROR"
    assert walfetch.parse_reply(b"x" * 2000)[1].startswith("a reply of 2000 bytes")
    assert walfetch.encode_request(SEGMENT) == b"GET " + SEGMENT.encode() and walfetch.encode_request(None) == b"PING"


def test_inside_the_data_directory_only():
    assert inside("/s/restore/pg_wal/RECOVERYXLOG", "/s/restore")
    assert inside("/s/restore/pg_wal/RECOVERYXLOG", "/s/restore/")
    assert not inside("/s/restore2/pg_wal/x", "/s/restore") and not inside("/etc/passwd", "/s/restore")
    assert not inside("/s/restore/pg_wal/RECOVERYXLOG (deleted)", "/s/restore")


def test_the_restore_command_runs_the_client_isolated_with_the_names_postgresql_gives():
    cmd = relay_command("/usr/bin/python3", "/tmp/run dir/walfetch.py", "/tmp/run dir/wal-relay")
    assert cmd == "/usr/bin/python3 -I '/tmp/run dir/walfetch.py' '/tmp/run dir/wal-relay' %f \"%p\""
    assert shlex.split(cmd)[:4] == ["/usr/bin/python3", "-I", "/tmp/run dir/walfetch.py", "/tmp/run dir/wal-relay"]


def test_verification_targets_promote_and_standby_is_refused():
    assert verification_target("end").action is None  # it promotes at the end of the archive by itself
    for text in ("immediate", "time=2026-11-28T14:37:00Z", "lsn=0/3000060", "xid=734", "name=before"):
        assert verification_target(text).action == "promote"
        assert ("recovery_target_action", "promote") in verification_target(text).settings()
    with pytest.raises(UsageError) as e:
        verification_target("standby")
    assert "promoted at" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--pg-recover takes"):
        verification_target("later")


def test_pg_recover_goes_with_pg_start():
    with pytest.raises(UsageError, match="--pg-recover starts PostgreSQL on the copy: give --pg-start too"):
        check_pg_options(False, None, None, None, "postgres", "end")
    with pytest.raises(UsageError, match="must not be empty"):
        check_pg_options(True, None, None, None, "postgres", " ")
    assert check_pg_options(True, None, None, None, "postgres", "name=x").value == "x"
    assert check_pg_options(True, None, None, None, "postgres") is None


def test_the_settings_written_recover_through_the_relay_and_promote(tmp_path):
    datadir = tmp_path / "data"
    (datadir / "global").mkdir(parents=True)
    (datadir / "global" / "pg_control").write_bytes(b"\0" * 16)
    (datadir / "PG_VERSION").write_text("15\n")
    (datadir / "postgresql.auto.conf").write_text("archive_mode = 'off'\nrestore_command = 'old'\n")
    (datadir / "standby.signal").write_text("")
    command = relay_command("/usr/bin/python3", "/run/walfetch.py", "/run/wal-relay")
    written = write_recovery(str(datadir), verification_target("name=mid"), command)
    assert written.signal == "recovery.signal" and (datadir / "recovery.signal").exists()
    assert not (datadir / "standby.signal").exists()
    text = (datadir / "postgresql.auto.conf").read_text()
    assert "archive_mode = 'off'" in text and "# restore_command = 'old'" in text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines[-3:] == ["restore_command = '/usr/bin/python3 -I /run/walfetch.py /run/wal-relay %f \"%p\"'",
                          "recovery_target_name = 'mid'", "recovery_target_action = 'promote'"]
    assert written.to_dict()["target"] == "name" and written.to_dict()["value"] == "mid"


def test_replay_answers_and_log_lines():
    assert pgstart.parse_replay("2026-01-02T03:04:05.000006Z|0/3000148|000000020000000000000003\n") == (
        {"timestamp": "2026-01-02T03:04:05.000006Z", "lsn": "0/3000148"}, 2)
    assert pgstart.parse_replay("||0000000A0000000000000003") == ({"timestamp": None, "lsn": None}, 10)
    with pytest.raises(pgstart.PgStartFailed):
        pgstart.parse_replay("garbage")
    log = ("LOG:  restored log file \"000000010000000000000003\" from archive\n"
           "FATAL:  recovery ended before configured recovery target was reached\n"
           "LOG:  startup process (PID 12) exited with exit code 1\n")
    assert pgstart.fatal_line(log) == "recovery ended before configured recovery target was reached"
    assert pgstart.fatal_line("LOG:  all fine\n") is None
    # a psql that came as it failed is turned away, and logged after the reason
    turned = log + "FATAL:  the database system is in recovery mode\n"
    assert pgstart.fatal_line(turned) == "recovery ended before configured recovery target was reached"
    assert pgstart.fatal_line("FATAL:  the database system is shutting down\n") == "the database system is shutting down"
    assert pgstart.python_candidates("/venv/bin/python", None, "/venv/bin/python") == ["/venv/bin/python"]


def test_more_than_one_data_directory_is_refused_for_a_recovery(tmp_path):
    [r] = pgstart.prove_data_directories(str(tmp_path), [b"a", b"b"], recovery=parse_target("end"),
                                         fetch=lambda name, fd: None)
    assert not r.ok and "the snapshot holds 2: a, b" in r.error


# --- a relay and the real client -----------------------------------------------------------------


ARCHIVE = {SEGMENT: b"wal bytes " * 1000}


def fake_fetch(name: str, fd: int) -> int | None:
    if name == "000000010000000000000009":
        from chunkvault.errors import CorruptObject
        raise CorruptObject(f"wal/{name}", "damaged")
    data = ARCHIVE.get(name)
    if data is None:
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return len(data)


@pytest.fixture
def relay(tmp_path):
    datadir = tmp_path / "data"
    (datadir / "pg_wal").mkdir(parents=True)
    r = WalRelay(str(tmp_path / "wal-relay"), fake_fetch, str(datadir))
    yield r, datadir
    r.close()
    assert not r.running and not (tmp_path / "wal-relay").exists()


def client(relay_path: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", walfetch.__file__, relay_path, *args], cwd=cwd,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)


def test_the_client_gets_a_file_misses_one_and_fails_fatally_on_damage(relay):
    r, datadir = relay
    assert client(r.path, "--ping", cwd=str(datadir)).returncode == 0
    got = client(r.path, SEGMENT, "pg_wal/RECOVERYXLOG", cwd=str(datadir))
    assert got.returncode == 0, got.stderr
    assert (datadir / "pg_wal" / "RECOVERYXLOG").read_bytes() == ARCHIVE[SEGMENT]
    assert oct((datadir / "pg_wal" / "RECOVERYXLOG").stat().st_mode & 0o777) == "0o600"

    missing = client(r.path, "00000002.history", "pg_wal/RECOVERYHISTORY", cwd=str(datadir))
    assert missing.returncode == walfetch.NOT_ARCHIVED and missing.stderr == ""
    assert not (datadir / "pg_wal" / "RECOVERYHISTORY").exists()

    damaged = client(r.path, "000000010000000000000009", "pg_wal/RECOVERYXLOG", cwd=str(datadir))
    assert damaged.returncode == walfetch.FATAL_EXIT > 125  # PostgreSQL stops, rather than promote there
    assert "damaged" in damaged.stderr and not (datadir / "pg_wal" / "RECOVERYXLOG").exists()

    refused = client(r.path, "../../x", "pg_wal/RECOVERYXLOG", cwd=str(datadir))
    assert refused.returncode == walfetch.FATAL_EXIT and "not the name of a file" in refused.stderr

    outside = client(r.path, SEGMENT, str(datadir.parent / "elsewhere"), cwd=str(datadir))
    assert outside.returncode == walfetch.FATAL_EXIT and "not in the copy's data directory" in outside.stderr
    assert not (datadir.parent / "elsewhere").exists()  # the client removed what it made
    served = r.served.to_dict()
    assert served["count"] == 1 and served["first"] == served["last"] == SEGMENT and served["missing"] == 1
    assert len(served["errors"]) == 3


def test_what_was_served_is_named_by_its_segments_not_by_a_history_file_asked_for_again():
    from chunkvault.walrelay import Served

    history, one, two = "00000002.history", "000000010000000000000002", "000000020000000000000003"
    served = Served(names=[history, one, two, history], missing=["00000003.history"]).to_dict()
    assert (served["count"], served["first"], served["last"], served["missing"]) == (4, one, two, 1)
    assert Served(names=[history]).to_dict()["first"] == history
    assert Served().to_dict()["first"] is Served().to_dict()["last"] is None


def test_a_descriptor_not_open_for_writing_and_extra_descriptors_are_refused(relay):
    r, datadir = relay
    path = datadir / "pg_wal" / "RECOVERYXLOG"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert walfetch.ask(r.path, walfetch.encode_request(SEGMENT), [fd]).startswith(b"ERROR")
        answer = walfetch.ask(r.path, walfetch.encode_request(SEGMENT), [fd, fd, fd])
        assert answer.startswith(b"ERROR") and b"more than one descriptor" in answer
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


def test_a_client_gone_before_its_answer_is_an_error_said_without_an_errno(tmp_path):
    """It was recorded as "the relay: [Errno 32] Broken pipe", and the run failed with "the WAL relay
    failed: the relay: [Errno 32] Broken pipe"."""
    import threading

    gone = threading.Event()

    def fetch_once_gone(name: str, fd: int) -> int:
        gone.wait(10)
        return 0

    datadir = tmp_path / "data"
    (datadir / "pg_wal").mkdir(parents=True)
    r = WalRelay(str(tmp_path / "wal-relay"), fetch_once_gone, str(datadir))
    try:
        fd = os.open(datadir / "pg_wal" / "RECOVERYXLOG", os.O_WRONLY | os.O_CREAT, 0o600)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(r.path)
            socket.send_fds(sock, [walfetch.encode_request(SEGMENT)], [fd])
        os.close(fd)
        gone.set()
    finally:
        r.close()
    assert r.served.errors == ["a request was not answered (Broken pipe)"]


def test_an_unreachable_relay_is_fatal_not_the_end_of_the_archive(tmp_path):
    got = client(str(tmp_path / "nothing"), SEGMENT, "RECOVERYXLOG", cwd=str(tmp_path))
    assert got.returncode == walfetch.FATAL_EXIT and "did not answer" in got.stderr
    assert not (tmp_path / "RECOVERYXLOG").exists()
    assert client(str(tmp_path / "nothing"), "--ping", cwd=str(tmp_path)).returncode == walfetch.FATAL_EXIT
    assert client(str(tmp_path / "nothing"), cwd=str(tmp_path)).returncode == walfetch.FATAL_EXIT  # usage


def test_the_client_file_runs_alone_and_the_socket_is_private(relay):
    r, _ = relay
    assert os.stat(r.path).st_mode & 0o777 == 0o600
    with open(walfetch.__file__) as f:
        source = f.read()
    assert "from chunkvault" not in source and "import chunkvault" not in source  # a file copied anywhere runs
    assert CLIENT_FILE == "walfetch.py"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:  # one that hangs up at once
        s.connect(r.path)
    assert walfetch.ask(r.path, walfetch.encode_request(None), []) == b"OK"  # does not end the relay


def test_a_file_archived_after_the_run_read_the_index_is_served(new_repo, tmp_path):
    """A live server archives on while a copy is verified: its newest segments' blobs are in index objects
    written after this run loaded the index."""
    from chunkvault import Repository
    from chunkvault.verify import wal_fetch

    repo = new_repo()
    early = write_segment(tmp_path, SEGMENT, size=1 << 20)
    repo.archive_push(early)
    fetch = wal_fetch(repo)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        assert fetch(SEGMENT, f.fileno()) == 1 << 20  # the index is loaded now
    later = write_segment(tmp_path, "000000010000000000000004", size=1 << 20)
    with Repository.open(repo.store.remote.display_url, "correct horse battery staple") as other:
        other.archive_push(later)
    with open(out, "wb") as f:
        assert fetch(later.name, f.fileno()) == 1 << 20
    assert out.read_bytes() == later.read_bytes()
    with open(out, "wb") as f:
        assert fetch("000000010000000000000005", f.fileno()) is None


def test_a_segment_missing_before_a_later_one_of_its_timeline_is_a_gap():
    archived = ["000000010000000000000002", "000000010000000000000004", "000000020000000000000005",
                "00000002.history"]
    assert pgstart.archive_gap(["00000002.history", "000000010000000000000003"], archived) == \
        ("000000010000000000000003", "000000010000000000000004")
    assert pgstart.archive_gap(["000000010000000000000005", "000000020000000000000006"], archived) is None  # none later on theirs
    assert pgstart.archive_gap(["000000010000000000000004"], archived) is None  # archived meanwhile


def test_a_segment_missing_before_a_later_timeline_goes_on_is_a_gap():
    """The old primary's last segments were never archived; its standby, promoted, archived timeline 2: a
    recovery from an earlier copy stopped at the first one missing, and was promoted there (timeline 1 held no
    later segment), verified as recovered to the end of the archive."""
    archived = ["000000010000000000000002", "00000002.history", "000000020000000000000004",
                "000000020000000000000005"]
    assert pgstart.archive_gap(["00000003.history", "000000010000000000000003"], archived) == \
        ("000000010000000000000003", "000000020000000000000005")
    # the end of the newest timeline: nothing later, on it or on any timeline after it
    assert pgstart.archive_gap(["000000020000000000000006", "00000003.history"], archived) is None
