"""``archive-check`` without a server: what it refuses, what it warns of, how it waits, what its failures say."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkvault.archivecheck import (LONGEST_POLL, STATUS_SQL, ArchiveCommandWarning, ArchiverGoneWarning,
                                     ArchiverStatus, archive_check, session_for, timeout_message, wait_archived)
from chunkvault.errors import ArchiveCheckFailed, SourceCommandFailed, UsageError
from walsegments import write_segment

SEGMENT = "000000010000000000000007"
PUSH = "chunkvault archive-push -q -r /srv/backup/repo %p"


class FakeSession:
    """Answers the check's queries as a server with these settings would, and records them."""

    def __init__(self, mode="on", command=PUSH, standby=False, failing=False, switch_error=None, library=""):
        self.row = [mode, command, "t" if standby else "f", "000000010000000000000006",
                    "2026-12-05T08:00:00.000000+00:00", "000000010000000000000007" if failing else "",
                    "2026-12-05T08:01:00.000000+00:00" if failing else "", "6", "3" if failing else "0",
                    "t" if failing else "f", library]
        self.switch_error = switch_error
        self.asked: list[str] = []

    def query(self, sql):
        self.asked.append(sql)
        if sql == STATUS_SQL:
            return [list(self.row)]
        if "pg_create_restore_point" in sql and self.switch_error:
            raise SourceCommandFailed(self.switch_error)
        return [["0/7000090"]]

    def value(self, sql):
        self.asked.append(sql)
        return SEGMENT

    def switched(self) -> bool:
        return any("pg_switch_wal" in q for q in self.asked)


class Clock:
    def __init__(self):
        self.now = 0.0
        self.pauses: list[float] = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.pauses.append(seconds)
        self.now += seconds


def check(session, archived=lambda name: True, timeout=10.0):
    clock = Clock()
    return archive_check(session, archived, timeout, clock=clock, sleep=clock.sleep)


def test_a_segment_that_arrives_passes_naming_it_and_the_time_it_took():
    clock = Clock()
    arrives = lambda name: name == SEGMENT and clock.now >= 1.0
    session = FakeSession()
    result = archive_check(session, arrives, 10.0, clock=clock, sleep=clock.sleep)
    assert result.ok and result.segment == SEGMENT and 1.0 <= result.waited < 1.0 + LONGEST_POLL
    restore_point = next(i for i, q in enumerate(session.asked) if "pg_create_restore_point" in q)
    switch = next(i for i, q in enumerate(session.asked) if "pg_switch_wal" in q)
    assert restore_point < switch  # a server idle since its last switch still has WAL to switch away from
    doc = result.to_dict()
    assert doc["ok"] and doc["segment"] == SEGMENT and doc["error"] is None and doc["warnings"] == []
    assert doc["archiver"]["last_archived_wal"] == "000000010000000000000006" and doc["archive_mode"] == "on"


@pytest.mark.parametrize("mode, command, said", [
    ("off", PUSH, "archive_mode = off"),
    ("on", "", "archive_command is empty"),
    ("always", "   ", "archive_command is empty"),
    ("on", "(disabled)", "archive_command is empty"),
])
def test_a_server_that_does_not_archive_is_refused_before_any_switch(mode, command, said):
    session = FakeSession(mode=mode, command=command)
    with pytest.raises(ArchiveCheckFailed, match=said.replace("(", r"\(")) as caught:
        check(session)
    assert caught.value.exit_code == 23 and not session.switched()
    assert caught.value.partial.to_dict()["ok"] is False and caught.value.partial.segment is None


@pytest.mark.parametrize("mode", ["on", "always"])
def test_a_standby_is_sent_to_the_primary(mode):
    session = FakeSession(mode=mode, standby=True)
    with pytest.raises(UsageError, match="against the primary"):
        check(session)
    assert not session.switched()


def test_a_command_that_is_not_archive_push_is_warned_of_and_still_checked():
    with pytest.warns(ArchiveCommandWarning, match="does not run chunkvault archive-push"):
        result = check(FakeSession(command="cp %p /mnt/wal/%f"))
    assert result.ok and "cp %p /mnt/wal/%f" in result.warnings[0]


@pytest.mark.parametrize("command", ["", PUSH])
def test_an_archive_library_archives_in_place_of_the_command_and_is_warned_of(command):
    """PostgreSQL 15 and later archive through archive_library when one is set, and run no archive_command: a
    server archiving with basic_archive was refused as archiving nothing, and one whose unused command was
    chunkvault's was told its command stored the WAL elsewhere."""
    with pytest.warns(ArchiveCommandWarning, match="archive_library = basic_archive, not its archive_command"):
        result = check(FakeSession(command=command, library="basic_archive"))
    assert result.ok and result.to_dict()["archive_library"] == "basic_archive"
    session = FakeSession(command=command, library="basic_archive", failing=True)
    with pytest.raises(ArchiveCheckFailed, match="archive_library has been failing"), \
            pytest.warns(ArchiveCommandWarning):
        check(session, archived=lambda name: False, timeout=1.0)
    elsewhere = ArchiverStatus("on", PUSH, False, "000000010000000000000008", "T1", archive_library="basic_archive")
    assert "its archive_library (basic_archive) stores the WAL elsewhere" in timeout_message(SEGMENT, 3, elsewhere)
    assert check(FakeSession()).to_dict()["archive_library"] == ""


def test_a_segment_that_never_comes_fails_at_the_timeout_with_what_the_server_reports():
    session = FakeSession(failing=True)
    with pytest.raises(ArchiveCheckFailed) as caught:
        check(session, archived=lambda name: False, timeout=5.0)
    message = str(caught.value)
    assert caught.value.exit_code == 23
    assert message.startswith(f"{SEGMENT} did not reach the repository within 5 s")
    assert "archive_command has been failing since its last success at 2026-12-05T08:00:00" in message
    assert "3 failures" in message and "see its log" in message
    result = caught.value.partial
    assert result.segment == SEGMENT and result.waited == pytest.approx(5.0) and result.status.failing
    assert result.to_dict()["archiver"]["failed_count"] == 3 and result.to_dict()["error"] == message


class StoppedAfterTheSwitch(FakeSession):
    """A server that goes away (stopped, restarted) while the check waits: its status cannot be read again."""

    def query(self, sql):
        if sql == STATUS_SQL and self.switched():
            raise SourceCommandFailed("PostgreSQL: FATAL:  terminating connection due to administrator command")
        return super().query(sql)


def test_a_server_gone_while_the_check_waits_does_not_hide_whether_the_segment_came():
    """The check failed with psql's error (exit 20, no segment named) even when the segment had reached the
    repository, as it does when a server is stopped: its archiver archives what is ready before it exits."""
    with pytest.warns(ArchiverGoneWarning, match="could not be read again"):
        result = check(StoppedAfterTheSwitch())
    assert result.ok and result.segment == SEGMENT and result.status.archived_count == 6
    assert "terminating connection" in result.warnings[-1]
    with pytest.raises(ArchiveCheckFailed) as caught:
        check(StoppedAfterTheSwitch(), archived=lambda name: False, timeout=2.0)
    assert caught.value.exit_code == 23 and caught.value.partial.segment == SEGMENT
    assert str(caught.value).startswith(f"{SEGMENT} did not reach the repository within 2 s, and PostgreSQL's ")
    assert "could not be read again (PostgreSQL: FATAL:  terminating connection" in str(caught.value)


def test_the_timeout_message_tells_an_archive_elsewhere_from_a_slow_archiver():
    elsewhere = ArchiverStatus("on", "cp %p /elsewhere/%f", False, "000000010000000000000008", "T1")
    assert "stores the WAL elsewhere" in timeout_message(SEGMENT, 3, elsewhere)
    other_timeline = ArchiverStatus("on", PUSH, False, "000000020000000000000009", "T1")
    assert "reports no failure" in timeout_message(SEGMENT, 3, other_timeline)
    behind = ArchiverStatus("on", PUSH, False, "000000010000000000000005", "T0")
    assert "reports no failure and last archived 000000010000000000000005 at T0" in timeout_message(SEGMENT, 3, behind)
    never = ArchiverStatus("on", PUSH, False, None, None, SEGMENT, "T2", 0, 4, True)
    assert "failing with no success since its statistics were reset, 4 failures" in timeout_message(SEGMENT, 3, never)


def test_a_switch_the_role_may_not_run_says_what_to_grant():
    session = FakeSession(switch_error="PostgreSQL: ERROR:  permission denied for function pg_create_restore_point")
    with pytest.raises(SourceCommandFailed, match="GRANT EXECUTE") as caught:
        check(session)
    assert caught.value.exit_code == 20


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), True, "60"])
def test_a_timeout_that_is_no_positive_number_is_refused(timeout):
    with pytest.raises(UsageError, match="timeout"):
        check(FakeSession(), timeout=timeout)


def test_a_connection_string_of_several_lines_is_refused():
    with pytest.raises(UsageError, match="pg_connect"):
        session_for("host=a\nport=5")


@given(st.floats(0.01, 500), st.floats(0, 600))
def test_the_wait_ends_at_the_timeout_or_as_soon_as_a_look_finds_the_segment(timeout, arrival):
    clock = Clock()
    looks: list[float] = []

    def archived(name):
        looks.append(clock.now)
        return clock.now >= arrival

    came, waited = wait_archived(SEGMENT, timeout, archived, clock=clock, sleep=clock.sleep)
    assert waited == clock.now and waited <= max(timeout, 0) + 1e-9
    assert all(p <= LONGEST_POLL for p in clock.pauses)
    if came:
        assert waited >= arrival and (len(looks) == 1 or looks[-2] < arrival)
        assert waited - arrival <= LONGEST_POLL + 1e-9
    else:
        assert arrival > waited and waited == pytest.approx(timeout)


class SessionOf(FakeSession):
    """The fake as ``session_for`` hands it out: a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_the_repository_passes_a_pushed_segment_and_fails_one_whose_chunks_the_index_lost(new_repo, tmp_path,
                                                                                          monkeypatch):
    import chunkvault.archivecheck as archivecheck
    from chunkvault.errors import MissingObject

    repo = new_repo()
    monkeypatch.setattr(archivecheck, "session_for", lambda pg_connect: SessionOf())
    with pytest.raises(ArchiveCheckFailed, match=f"{SEGMENT} did not reach the repository within 0.5 s"):
        repo.archive_check("dbname=postgres", timeout=0.5)
    repo.archive_push(write_segment(tmp_path, SEGMENT, size=1 << 20))
    result = repo.archive_check("dbname=postgres", timeout=5)
    assert result.ok and result.segment == SEGMENT and result.waited < 5
    for entry in (tmp_path / "repo0" / "index").iterdir():  # the data stays, but no index names it
        entry.unlink()
    with pytest.raises(MissingObject, match=f"missing from the index, needed by wal/{SEGMENT}"):
        repo.archive_check("dbname=postgres", timeout=5)


def test_a_segment_held_up_by_a_prune_says_the_repository_is_locked(new_repo, monkeypatch):
    """A push waits for a running prune (up to its --wait, an hour): the check failed saying the archiver
    reported nothing wrong (behind? hanging?), with no word of the lock that held the segment back."""
    import chunkvault.archivecheck as archivecheck
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo = new_repo()
    monkeypatch.setattr(archivecheck, "session_for", lambda pg_connect: SessionOf())
    with RepoLock(repo.store.remote, EXCLUSIVE, "prune"), pytest.raises(ArchiveCheckFailed) as caught:
        repo.archive_check("dbname=postgres", timeout=0.5)
    message = str(caught.value)
    assert message.startswith(f"{SEGMENT} did not reach the repository within 0.5 s: PostgreSQL's archiver reports")
    assert "; meanwhile the repository is locked by prune on " in message and "archive-push waits" in message
    assert caught.value.exit_code == 23 and caught.value.partial.to_dict()["error"] == message
    with pytest.raises(ArchiveCheckFailed) as unlocked:
        repo.archive_check("dbname=postgres", timeout=0.5)
    assert "locked" not in str(unlocked.value)


def test_secrets_inline_in_the_archive_command_are_not_shown():
    """Its messages and --json go to logs and monitoring: an inline password or key is replaced there."""
    command = ("AWS_SECRET_ACCESS_KEY='s e c' PGPASSWORD=hunter2 chunkvault archive-push --password-file /etc/k "
               "--password-command 'pass show db' %p")
    with pytest.warns(ArchiveCommandWarning) as warned:
        result = check(FakeSession(command=command.replace("archive-push", "archive-put")))
    shown = json.dumps(result.to_dict()) + str(warned[0].message)
    assert "s e c" not in shown and "hunter2" not in shown
    assert "AWS_SECRET_ACCESS_KEY=***" in shown and "--password-file /etc/k" in shown and "pass show db" in shown
