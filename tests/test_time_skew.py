"""Clocks that disagree, time zones and summer time: hosts sharing a repository whose clocks run ahead or
behind, snapshots dated ahead of the clock, the hour repeated when summer time ends and the one skipped
when it begins (retention's buckets, times given without a zone, a policy's daily slots)."""
from __future__ import annotations

import os
import time as time_module
import warnings
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from chunkvault import Repository
from chunkvault.errors import RepositoryStateWarning
from chunkvault.schedule import decide, parse_cadence
from chunkvault.store.retention import DATED_AHEAD, RetentionPolicy, select
from chunkvault.store.snapshot import parse_time, parse_until, unknown_zone

PASSWORD = "test-password"
UTC = timezone.utc
BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")


@pytest.fixture
def clock(monkeypatch):
    """The time a backup dates its snapshot by: this host's clock, set ``offset`` away from the true one."""
    def set_offset(offset: timedelta) -> None:
        monkeypatch.setattr("chunkvault.store.backup.now_iso",
                            lambda: (datetime.now(UTC) + offset).isoformat(timespec="microseconds"))
    return set_offset


def _backup(repo, data, text: str):
    (data / "f").write_text(text)
    return repo.backup([str(data)]).snapshot


# --------------------------------------------------------------------------- snapshots dated ahead


def test_forget_keeps_snapshots_dated_ahead_and_counts_the_ones_made_since(tmp_path, clock):
    """Two backups made while the clock ran a year ahead filled `forget --keep-last 2`: the two made since
    the clock was set right, the newest data, were removed.  Dated ahead, they are kept and not counted."""
    data = tmp_path / "data"
    data.mkdir()
    with Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0) as repo:
        clock(timedelta(days=365))
        ahead = [_backup(repo, data, f"old {i}") for i in range(2)]
        clock(timedelta(0))
        since = [_backup(repo, data, f"new {i}") for i in range(2)]
        plan = repo.forget(policy=RetentionPolicy(keep_last=2))
        assert plan.remove == []
        why = {d.snapshot_id: d.reasons for d in plan.decisions}
        assert all(why[s.id] == (DATED_AHEAD,) for s in ahead)
        assert {why[s.id] for s in since} == {("last #1",), ("last #2",)}
        clock(timedelta(0))
        third = _backup(repo, data, "new 2")
        plan = repo.forget(policy=RetentionPolicy(keep_last=2))
        assert plan.remove == [since[0].id] and third.id not in plan.remove
        assert {s.id for s in repo.snapshots()} == {*(s.id for s in ahead), since[1].id, third.id}


def test_latest_dated_ahead_of_this_clock_is_warned_of(tmp_path, clock):
    """`latest` goes by the snapshots' times (as restic's and borg's): one dated a year ahead stays latest, and
    `restore latest` would silently bring back its older data; it says so."""
    data = tmp_path / "data"
    data.mkdir()
    with Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0) as repo:
        first = _backup(repo, data, "a")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert repo.snapshot("latest").id == first.id
        clock(timedelta(days=365))
        ahead = _backup(repo, data, "b")
        clock(timedelta(0))
        _backup(repo, data, "c")
        with pytest.warns(RepositoryStateWarning, match=f"snapshot {ahead.id[:8]}, the latest, is dated .* ahead"):
            assert repo.snapshot("latest").id == ahead.id


def test_a_backup_after_the_clock_was_set_right_builds_on_the_newest_snapshot_not_dated_ahead(tmp_path, clock):
    """The one dated ahead was every later backup's parent until the clock reached its date: each differential
    grew against it, and no full came due.  Where every snapshot is dated ahead, this clock may be the one
    behind: the newest stays the parent."""
    data = tmp_path / "data"
    data.mkdir()
    with Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0) as repo:
        first = _backup(repo, data, "a")
        clock(timedelta(days=365))
        ahead = _backup(repo, data, "b")
        clock(timedelta(0))
        after = _backup(repo, data, "c")
        (data / "f").write_text("d")
        again = repo.backup([str(data)], kind="diff").snapshot  # "auto" would make a full: small files
        assert (ahead.parent, after.parent, again.parent) == (first.id, first.id, after.id)
    with Repository.init(str(tmp_path / "behind"), PASSWORD, kdf_seconds=0) as repo:
        clock(timedelta(days=365))
        ahead = _backup(repo, data, "e")
        clock(timedelta(0))
        assert _backup(repo, data, "f").parent == ahead.id


def test_clients_whose_clocks_disagree_raise_no_rollback_alarm(tmp_path, clock):
    """Client A's clock runs a year ahead, then B's a year behind; each backs up, B applies retention: neither
    client's ledger takes the other's snapshots for a rollback or a replay (their times are compared with each
    other's, never with a clock), and every backup goes on."""
    data = tmp_path / "data"
    data.mkdir()
    url = str(tmp_path / "repo")
    Repository.init(url, PASSWORD, kdf_seconds=0).close()
    a = Repository.open(url, PASSWORD, ledger=str(tmp_path / "ledger-a"))
    b = Repository.open(url, PASSWORD, ledger=str(tmp_path / "ledger-b"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepositoryStateWarning)
        with a, b:
            clock(timedelta(0))
            _backup(b, data, "1")
            clock(timedelta(days=365))
            _backup(a, data, "2")
            clock(timedelta(days=-365))
            _backup(b, data, "3")
            b.forget(policy=RetentionPolicy(keep_last=1))
            clock(timedelta(0))
            _backup(a, data, "4")
            _backup(b, data, "5")
            assert a.check().ok and b.check().ok
            assert len(a.snapshots()) == 4  # keep-last 1 kept the one dated ahead and the newest of the rest


# --------------------------------------------------------------------------- time zones and summer time


def _hourly(start: datetime, n: int, step: timedelta = timedelta(hours=1)) -> list:
    return [SimpleNamespace(id=f"s{i:02d}", time=start + i * step, kind="full", parent=None, host="h",
                            paths=("/d",), tags=()) for i in range(n)]


@pytest.mark.parametrize("tz,start", [(BERLIN, datetime(2026, 10, 24, 22, tzinfo=UTC)),
                                      (NEW_YORK, datetime(2026, 11, 1, 3, tzinfo=UTC))])
def test_the_repeated_hour_is_one_hourly_bucket_as_restic_and_borg_count_it(tz, start):
    """keep-hourly counts wall-clock hours of the zone, as restic and borg do: the two 02:00 (Berlin) or
    01:00 (New York) hours of the autumn change are one bucket, whose newer snapshot is kept."""
    snaps = _hourly(start, 8)
    decisions = select(snaps, RetentionPolicy(keep_hourly=24), snaps[-1].time, tz=tz)
    removed = [s for s, d in zip(snaps, decisions) if not d.keep]
    assert len(removed) == 1
    wall = removed[0].time.astimezone(tz)
    assert wall.fold == 0 and wall.hour == (2 if tz is BERLIN else 1)
    assert wall.replace(fold=1).astimezone(UTC) == removed[0].time + timedelta(hours=1)


def test_daily_buckets_hold_the_days_of_23_and_25_hours_whole():
    """A snapshot every hour for three days around each change, keep-daily 3: one a day, the last of each."""
    for tz, start in ((BERLIN, datetime(2026, 3, 28, tzinfo=BERLIN)), (BERLIN, datetime(2026, 10, 24, tzinfo=BERLIN)),
                      (NEW_YORK, datetime(2026, 3, 7, tzinfo=NEW_YORK)),
                      (NEW_YORK, datetime(2026, 10, 31, tzinfo=NEW_YORK))):
        hours = int(((start + timedelta(days=3)).astimezone(UTC) - start.astimezone(UTC)).total_seconds()) // 3600
        assert hours in (71, 73)
        snaps = _hourly(start.astimezone(UTC), hours)
        kept = [s for s, d in zip(snaps, select(snaps, RetentionPolicy(keep_daily=3), snaps[-1].time, tz=tz))
                if d.keep]
        assert [s.time.astimezone(tz).hour for s in kept] == [23, 23, 23]


@pytest.fixture
def local_zone(monkeypatch):
    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time_module.tzset()
    yield set_zone
    monkeypatch.undo()
    time_module.tzset()


@pytest.mark.parametrize("zone,spring,autumn", [("Europe/Berlin", "2026-03-29T02:30", "2026-10-25T02:30"),
                                                ("America/New_York", "2026-03-08T02:30", "2026-11-01T01:30")])
def test_a_time_without_zone_in_the_changed_hours_is_read_as_the_earlier_instant(local_zone, zone, spring, autumn):
    """`--until`, `--time`, pg-recover `time=`: in the hour repeated in autumn, its first occurrence; in the one
    skipped in spring, an hour earlier (as read with the summer offset).  Both err towards the older snapshot, so
    none taken after the time as the wall clock read it is picked; an offset (`+01:00`) names the other."""
    local_zone(zone)
    tz = ZoneInfo(zone)
    first = datetime.fromisoformat(autumn).replace(tzinfo=tz, fold=0)
    assert parse_time(autumn) == first.astimezone(UTC)
    assert parse_until(autumn + ":00") == first.astimezone(UTC) + timedelta(seconds=1, microseconds=-1)
    later = datetime.fromisoformat(autumn).replace(tzinfo=tz, fold=1)
    assert parse_time(later.isoformat()) == first.astimezone(UTC) + timedelta(hours=1)
    skipped = datetime.fromisoformat(spring)
    assert parse_time(spring) == (skipped - timedelta(hours=1)).replace(tzinfo=tz).astimezone(UTC)


@pytest.mark.parametrize("tz,text,spring,autumn,at", [
    (BERLIN, "daily 02:30", (2026, 3, 29), (2026, 10, 25), (3, 30)),
    (NEW_YORK, "daily 01:30", (2026, 3, 8), (2026, 11, 1), (1, 30)),
    (NEW_YORK, "30 2 * * *", (2026, 3, 8), (2026, 11, 1), (3, 30))])
def test_a_daily_slot_in_a_changed_hour_fires_once_that_day(tz, text, spring, autumn, at):
    """As cron does: a slot in the hour the clocks skip fires as many minutes after the jump, one in the hour
    they repeat at its first occurrence only; a run at that first occurrence leaves nothing due at the second."""
    cadence = parse_cadence(text, tz)
    for day in (spring, autumn):
        begin = datetime(*day, tzinfo=tz).astimezone(UTC)
        end = (datetime(*day, tzinfo=tz) + timedelta(days=1)).astimezone(UTC)
        slots, t = [], begin
        while (t := cadence.next(t)) < end:
            slots.append(t)
        assert len(slots) == 1, slots
    slot = cadence.next(datetime(*autumn, tzinfo=tz).astimezone(UTC))
    assert decide(cadence, None, slot + timedelta(hours=1, minutes=15), [(slot, "full")]).kind is None
    jump = cadence.next(datetime(*spring, tzinfo=tz).astimezone(UTC)).astimezone(tz)
    assert (jump.hour, jump.minute) == at


def test_messages_name_a_time_in_the_zone_it_was_given_in(tmp_path, cli):
    """`restore --until 2020-01-01` in Berlin said "no snapshot at or before 2019-12-31T23:00:00+00:00" (a day
    that was not asked for), one given to the second ended in .999999, and a restore named the snapshot it
    picked by its UTC time with microseconds, unlike the listing: each now says the local time with its
    offset, which also tells which of the autumn's two 02:30 was meant and can be given back to --until."""
    repo, data, berlin = str(tmp_path / "repo"), tmp_path / "data", {"TZ": "Europe/Berlin"}
    data.mkdir()
    (data / "f").write_text("x")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(data), "--time", "2026-10-25T02:30+01:00", env=berlin)
    said = cli("restore", "-r", repo, "--until", "2026-10-25T02:45+01:00", "--target", str(tmp_path / "t"),
               env=berlin).stdout.decode()
    assert "(2026-10-25 02:30:00+01:00)" in said
    for until, named in (("2020-01-01", "2020-01-01 00:00:00+01:00"),
                         ("2026-10-25T02:30:00", "2026-10-25 02:30:00+02:00")):
        err = cli("restore", "-r", repo, "--until", until, "--target", str(tmp_path / "u"), env=berlin, check=12)
        assert err.stderr.decode().strip() == f"chunkvault: no snapshot at or before {named}"


def test_the_listing_keeps_its_columns_where_a_time_shows_its_offset(tmp_path, cli):
    """A snapshot in the hour repeated in autumn is listed with its offset, six characters more: its row's
    type, parent and host then stood six columns right of the others' and of the header's."""
    repo, data, berlin = str(tmp_path / "repo"), tmp_path / "data", {"TZ": "Europe/Berlin"}
    data.mkdir()
    (data / "f").write_text("x")
    cli("init", "-r", repo, "--kdf-time", "0")
    for t in ("2026-10-25T01:30", "2026-10-25T02:30+01:00"):
        cli("backup", "-r", repo, str(data), "--time", t, env=berlin)
    lines = cli("snapshots", "-r", repo, env=berlin).stdout.decode().splitlines()[:3]
    assert "2026-10-25 02:30:00+01:00" in lines[2]
    kinds = [next(line.index(f" {k} ") + 1 for k in ("full", "diff") if f" {k} " in line) for line in lines[1:]]
    assert kinds == [lines[0].index("type")] * 2


@pytest.mark.parametrize("value,unknown", [("Europe/Berlin", False), (":Australia/Lord_Howe", False), ("UTC", False),
                                           ("", False), ("CET-1CEST,M3.5.0,M10.5.0/3", False), ("EST5EDT", False),
                                           ("<+1030>-10:30", False), ("Europe/Berlinn", True), ("garbage", True),
                                           ("/no/such/zone", True)])
def test_a_tz_that_names_no_zone_is_told_apart(value, unknown, tmp_path):
    assert unknown_zone(value) is unknown
    if value in ("UTC", "Europe/Berlin"):  # a container without zone files: UTC is still UTC, Berlin is not
        assert unknown_zone(value, str(tmp_path)) is (value != "UTC")
        assert unknown_zone(f"Etc/{value}", str(tmp_path)) is (value != "UTC")


def test_a_tz_that_names_no_zone_is_said_once_where_local_time_counts(tmp_path, cli):
    """The C library takes an unknown TZ (a typo: Europe/Berlinn) for UTC without a word: listings, times
    given without a zone and retention's days were an hour or two off, and nothing said why."""
    repo, data, typo = str(tmp_path / "repo"), tmp_path / "data", {"TZ": "Europe/Berlinn"}
    data.mkdir()
    (data / "f").write_text("x")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(data), "--time", "2026-10-25T02:30+01:00")
    said = "warning: TZ='Europe/Berlinn' names no time zone known here: local time is taken as UTC"
    for args in (("snapshots",), ("ls", "latest"), ("forget", "--keep-daily", "1", "--dry-run"),
                 ("forget", "--keep-daily", "1", "--dry-run", "--json"),
                 ("dump", "--until", "2026-10-25T02:30", "f")):
        err = cli(*args, "-r", repo, env=typo).stderr.decode()
        assert err.count(said) == 1, (args, err)
    assert cli("snapshots", "-r", repo, env={"TZ": "Europe/Berlin"}).stderr == b""


def test_ls_and_find_show_a_file_time_in_the_repeated_hour_with_its_offset(tmp_path, cli):
    """Two files modified an hour apart in autumn's repeated hour were listed at the same time: file times
    carry the offset there, as snapshot times do."""
    repo, data, berlin = str(tmp_path / "repo"), tmp_path / "data", {"TZ": "Europe/Berlin"}
    data.mkdir()
    for name, utc in (("summer", "2026-10-25T00:30:00+00:00"), ("winter", "2026-10-25T01:30:00+00:00"),
                      ("plain", "2026-10-26T12:00:00+00:00")):
        (data / name).write_text(name)
        t = datetime.fromisoformat(utc).timestamp()
        os.utime(data / name, (t, t))
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(data), env=berlin)
    listed = cli("ls", "-r", repo, "latest", env=berlin).stdout.decode()
    assert "2026-10-25 02:30:00+02:00" in listed and "2026-10-25 02:30:00+01:00" in listed
    assert "2026-10-26 13:00:00 " in listed
    found = cli("find", "-r", repo, "winter", env=berlin).stdout.decode()
    assert "modified 2026-10-25 02:30:00+01:00" in found


def test_a_snapshot_is_named_in_messages_to_the_second_as_the_listing_shows_it(tmp_path, cli):
    """A snapshot's time has microseconds: restore, export and import named it with them
    ("2026-12-06 15:02:56.874569+01:00") where the listing says "2026-12-06 15:02:56".  To the second, the
    message's time still finds the snapshot when given back to --until (a time to the second is its whole
    second)."""
    repo, data, berlin = str(tmp_path / "repo"), tmp_path / "data", {"TZ": "Europe/Berlin"}
    data.mkdir()
    (data / "f").write_text("x")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(data), "--time", "2026-10-25T02:30:05.123456+01:00", env=berlin)
    listed = "2026-10-25 02:30:05+01:00"
    assert listed in cli("snapshots", "-r", repo, env=berlin).stdout.decode()
    said = cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "t"), env=berlin).stdout.decode()
    assert f"({listed})" in said, said
    backup_file = str(tmp_path / "s.backup")
    sealed = {**berlin, "CHUNKVAULT_EXPORT_PASSWORD": "export pw"}
    exported = cli("export", "-r", repo, "latest", "--output", backup_file, "--kdf-time", "0", env=sealed)
    assert f"({listed})" in exported.stdout.decode()
    other = str(tmp_path / "other")
    cli("init", "-r", other, "--kdf-time", "0")
    assert f"({listed}," in cli("import", "-r", other, backup_file, env=sealed).stdout.decode()
    again = cli("restore", "-r", repo, "--until", listed, "--target", str(tmp_path / "u"), env=berlin).stdout.decode()
    assert f"({listed})" in again


def test_a_zone_is_known_where_the_c_library_looks_for_it(tmp_path, cli):
    """Python's zoneinfo also finds a zone in the tzdata package, and ignores TZDIR; the C library, which
    shows and reads local time, looks in TZDIR (else the system's directory) only.  Europe/Berlin with no
    such file there was taken for UTC without a word; a zone only TZDIR holds was warned of though it held."""
    repo, data = str(tmp_path / "repo"), tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("x")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(data), "--time", "2026-10-25T12:00+00:00")
    empty, own = tmp_path / "empty", tmp_path / "own" / "Test"
    empty.mkdir()
    own.mkdir(parents=True)
    from zoneinfo import TZPATH

    berlin = next((os.path.join(d, "Europe", "Berlin") for d in TZPATH
                   if os.path.isfile(os.path.join(d, "Europe", "Berlin"))), None)
    if berlin is None:
        pytest.skip("no system zone files")
    (own / "Zone").write_bytes(open(berlin, "rb").read())
    said = "names no time zone known here"
    missing = cli("snapshots", "-r", repo, env={"TZ": "Europe/Berlin", "TZDIR": str(empty)})
    assert said in missing.stderr.decode() and "2026-10-25 12:00:00" in missing.stdout.decode()
    found = cli("snapshots", "-r", repo, env={"TZ": "Test/Zone", "TZDIR": str(tmp_path / "own")})
    assert found.stderr == b"" and "2026-10-25 13:00:00" in found.stdout.decode()
