"""Naming snapshots: SnapshotFinder answers as find_snapshot does, for any listing and any name."""
from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings, strategies as st

from chunkvault.errors import ChunkvaultError, MissingObject, SnapshotNotFound, UsageError
from chunkvault.store.snapshot import Snapshot, SnapshotFinder, find_snapshot

HEX = "0123456789abcdef"


def snap(sid: str, hour: int) -> Snapshot:
    return Snapshot(time=f"2026-01-01T{hour % 24:02}:00:00+00:00", kind="full", parent=None, host="h",
                    paths=["/a"], id=sid)


def answer(find, snaps, spec):
    try:
        return find(snaps, spec).id
    except ChunkvaultError as exc:
        return type(exc).__name__, str(exc)


# Ids sharing prefixes (a small alphabet at the start), names that are prefixes of them, their upper case,
# others, "latest", empty and blank.
ids = st.lists(st.text("01", min_size=1, max_size=3).flatmap(
    lambda head: st.text(HEX, min_size=4, max_size=4).map(lambda tail: head + tail)), unique=True, max_size=30)


@settings(max_examples=300, deadline=None)
@given(ids=ids, data=st.data())
def test_the_finder_answers_as_find_snapshot_does(ids, data):
    snaps = [snap(sid, i) for i, sid in enumerate(ids)]
    finder = SnapshotFinder(snaps)
    prefixes = [sid[:n] for sid in ids for n in range(1, len(sid) + 1)]
    specs = data.draw(st.lists(st.one_of(
        st.sampled_from(prefixes) if prefixes else st.nothing(),
        st.sampled_from(prefixes).map(str.upper) if prefixes else st.nothing(),
        st.text("01ab\u00ff\U0010ffff", max_size=6),
        st.sampled_from(["latest", "", "  "])), max_size=10))
    for spec in specs:
        assert answer(lambda _snaps, s: finder(s), snaps, spec) == answer(find_snapshot, snaps, spec), spec


def test_chains_take_the_snapshot_as_given_and_name_a_missing_parent(new_repo):
    """``Repo.chains`` indexes one listing for many snapshots; the snapshot asked about counts as given (a
    rebased one, a new one not yet listed), the listing for the rest."""
    chains = new_repo().store.chains
    a = snap("a" * 8, 0)
    b = dataclasses.replace(snap("b" * 8, 1), kind="diff", parent=a.id)
    c = dataclasses.replace(snap("c" * 8, 2), kind="diff", parent=b.id)
    of = chains([a, b])
    assert of(b) == [a, b] and of(c) == [a, b, c]
    assert of(dataclasses.replace(b, kind="full", parent=None)) == [dataclasses.replace(b, kind="full", parent=None)]
    with pytest.raises(MissingObject, match="bbbbbbbb"):
        chains([a])(c)


def test_a_snapshot_named_whose_object_does_not_load_is_damaged_not_unknown(tmp_path, new_repo, cli, password):
    """`restore ID` of a snapshot whose object is damaged said "no snapshot" (exit 12): it is there, and
    corrupt (13), as `check` says."""
    from chunkvault import Repository
    from chunkvault.errors import CorruptObject

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    obj = tmp_path / "repo" / "snapshots" / snap.id
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.raises(CorruptObject, match=f"snapshot {snap.id}"), pytest.warns(Warning, match="unreadable"):
        Repository.open(str(tmp_path / "repo"), password, ledger=False).snapshot(snap.id[:8])
    proc = cli("restore", "-r", str(tmp_path / "repo"), snap.id[:8], "--target", str(tmp_path / "out"), check=13)
    assert "authentication failed" in proc.stderr.decode()
    cli("restore", "-r", str(tmp_path / "repo"), "feedbeef", "--target", str(tmp_path / "out"), check=12)


def test_until_to_the_second_finds_the_snapshot_whose_listed_time_it_is(tmp_path, new_repo):
    """Listings show times to the second and snapshot times have microseconds: a time copied from
    `snapshots` into --until found the snapshot before the one it was copied from."""
    from datetime import timezone

    from chunkvault.store.snapshot import parse_until

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("one")
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)], time="2026-11-28T14:00:05.250+00:00").snapshot
    (src / "f").write_text("two")
    second = repo.backup([str(src)], time="2026-11-28T14:00:07.750+00:00").snapshot
    for until, found in [("2026-11-28T14:00:07+00:00", second), ("2026-11-28 14:00:06Z", first),
                         ("2026-11-28T14:00:05+00:00", first), ("2026-11-28T14:00:07.5+00:00", first),
                         ("20261128T140007Z", second)]:
        assert repo.snapshot(until=until).id == found.id, until
    with pytest.raises(SnapshotNotFound):
        repo.snapshot(until="2026-11-28T14:00+00:00")  # to the minute: its first instant, before both
    from datetime import datetime

    seven = int(datetime(2026, 11, 28, 14, 0, 7, tzinfo=timezone.utc).timestamp())
    assert repo.snapshot(until=seven).id == second.id  # whole seconds since the epoch: that second, as text
    assert repo.snapshot(until=float(seven)).id == first.id  # a float is an instant
    assert parse_until("2026-11-28T14:00:05+01:00").astimezone(timezone.utc).isoformat() == \
        "2026-11-28T13:00:05.999999+00:00"


def test_times_at_the_ends_of_the_calendar_are_a_usage_error_or_the_last_instant(tmp_path, new_repo, monkeypatch):
    """A zone's offset took them past year 1 or 9999: an internal error (exit 1), where `0000-01-01` got
    "cannot parse time"."""
    import time

    from chunkvault.errors import UsageError

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    made = repo.backup([str(src)]).snapshot
    assert repo.snapshot(until="9999-12-31T23:59:59Z").id == made.id  # to the end of the last second
    for until in ("0001-01-01", "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00"):
        with pytest.raises(UsageError, match=re.escape(f"time {until!r} is out of range")):
            repo.snapshot(until=until)
    with pytest.raises(UsageError, match="out of range"):
        repo.backup([str(src)], time="0001-01-01T00:00:00+14:00")
    monkeypatch.undo()
    time.tzset()


def test_a_time_copied_from_the_listing_in_the_hour_summer_time_repeats_finds_its_snapshot(tmp_path, cli):
    """Two snapshots an hour apart, in the hour the end of summer time repeats, listed alike (02:30:15 in
    Berlin): --until with the copied time restored the first.  The listing gives those times their offset."""
    src = tmp_path / "src"
    src.mkdir()
    repo = str(tmp_path / "repo")
    berlin = {"TZ": "Europe/Berlin"}
    cli("init", "-r", repo, "--kdf-time", "0", env=berlin)
    for content, when in (("first", "2026-10-25T00:30:15Z"), ("second", "2026-10-25T01:30:15Z")):
        (src / "f").write_text(content)
        cli("backup", "-r", repo, str(src), "--time", when, "-q", env=berlin)
    cli("backup", "-r", repo, str(src), "--time", "2026-10-25T03:30:15Z", "-q", env=berlin)
    listing = cli("snapshots", "-r", repo, env=berlin).stdout.decode()
    shown = [line.split()[1] + " " + line.split()[2] for line in listing.splitlines() if line[:8].isalnum()
             and len(line.split()) > 2 and line.split()[1].startswith("2026")]
    assert shown == ["2026-10-25 02:30:15+02:00", "2026-10-25 02:30:15+01:00", "2026-10-25 04:30:15"]
    for time, content in zip(shown, ("first", "second")):
        out = tmp_path / content
        cli("restore", "-r", repo, "--until", time, "--target", str(out), "-q", env=berlin)
        assert (out / "f").read_text() == content


def test_the_earliest_snapshot_time_is_named_as_it_is_enforced(tmp_path, cli):
    """A time on 1970-01-01 was refused as "before 1970", which it is not: the earliest time taken is
    1970-01-02 (a day's slack, so that every zone's local time of it is after the epoch), and the
    refusal and the help name that day."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    refused = cli("backup", "-r", repo, str(src), "--time", "1970-01-01T12:00Z", check=2)
    assert b"is before 1970-01-02" in refused.stderr, refused.stderr
    cli("backup", "-r", repo, str(src), "--time", "1970-01-02T00:00Z")
    assert b"1970-01-02 to 5" in b" ".join(cli("backup", "--help").stdout.split())


def test_a_snapshot_time_before_1970_is_refused_and_one_stored_already_still_lists(tmp_path, cli):
    """`backup --time 0001-01-01T00:00Z` was saved; then `snapshots` and `restore` ended in an internal error
    (year 0 is out of range) for the whole repository."""
    import dataclasses
    import json
    import os
    import time

    from chunkvault.store.snapshot import listed_time

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    refused = cli("backup", "-r", repo, str(src), "--time", "0001-01-01T00:00Z", check=2)
    assert b"is before 1970" in refused.stderr
    listed = json.loads(cli("backup", "-r", repo, str(src), "--json").stdout)
    from chunkvault import Repository
    from conftest import PASSWORD

    with Repository.open(repo, PASSWORD) as r:
        snap = r.snapshot(listed["id"])
    ancient = dataclasses.replace(snap, time="0001-01-01T00:30:00+00:00")  # as an older release stored it
    zone = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "America/New_York"  # local time there is in year 0
        time.tzset()
        assert listed_time(ancient.datetime) == "0001-01-01 00:30:00Z"
    finally:
        if zone is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = zone
        time.tzset()
    assert listed_time(dataclasses.replace(snap, time="0999-03-04T05:06:07+00:00").datetime).startswith("0999-")


@pytest.mark.parametrize("text, why", [("2026-02-29", "day is out of range for month"),
                                       ("2026-10-24T24:00", "hour must be in 0..23"), ("yesterday", None)])
def test_a_time_with_a_field_out_of_range_says_which(text, why):
    """"cannot parse time '2026-02-29'" did not say that the day is the one wrong."""
    from chunkvault.store.snapshot import parse_time

    with pytest.raises(UsageError) as e:
        parse_time(text)
    said = str(e.value)
    assert said.startswith(f"cannot parse time {text!r}") and "ISO 8601" in said
    assert (why in said) if why else "Invalid" not in said
