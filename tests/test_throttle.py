"""Bandwidth limits: the schedule's arithmetic on a fake clock, and real commands held to a rate."""
from __future__ import annotations

import argparse
import os
import threading
import time

import pytest

from chunkvault.cli import _rate
from chunkvault.remotes.local import LocalRemote
from chunkvault.remotes.throttle import RateSchedule, ThrottledRemote
from treeutil import describe


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_turns_follow_each_other_at_the_rate():
    clock = FakeClock()
    s = RateSchedule(1000, clock=clock, sleep=clock.sleep)
    assert [s.book(500), s.book(1000), s.book(10, since=90)] == [(100, 100.5), (100.5, 101.5),
                                                                 (101.5, pytest.approx(101.51))]
    clock.now += 10  # an idle link earns no credit: the next turn starts now, not in the past
    assert s.book(2000) == (110, 112) and s.book(1) == (112, pytest.approx(112.001))
    with pytest.raises(ValueError):
        RateSchedule(0)


def test_threads_share_one_schedule():
    s = RateSchedule(1 << 20)
    ends: list[float] = []
    lock = threading.Lock()
    first = time.monotonic()

    def book():
        for _ in range(50):
            _, end = s.book(1024)
            with lock:
                ends.append(end)

    threads = [threading.Thread(target=book) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 200 KiB booked at 1 MiB/s: the last turn ends 0.2 s after the first began, whatever the interleaving
    assert len(set(ends)) == 200
    assert max(ends) - first >= 200 * 1024 / (1 << 20)


def test_transfers_take_their_turns(tmp_path):
    clock = FakeClock()
    remote = ThrottledRemote(LocalRemote(str(tmp_path / "r")), upload=1000, download=500,
                             clock=clock, sleep=clock.sleep)
    for i in range(3):
        remote.put(f"data/{i}", b"x" * 1000)
    assert clock.slept == [1.0, 1.0, 1.0]  # each returns at the end of its second
    clock.slept.clear()
    assert remote.get("data/0") == b"x" * 1000
    assert remote.get("data/1", 0, 250) == b"x" * 250
    remote.stat("data/2")
    list(remote.list("data/"))
    assert clock.slept == [2.0, 0.5]  # 1000 and 250 bytes at 500 B/s; listing and stat are not metered
    assert remote.fork_safe is False


def test_a_download_begun_during_another_s_turn_starts_when_that_turn_ends(tmp_path):
    """Its size is known only once it is done, so it is booked after: but it must not start before the link
    is free, or downloads from several threads went out together, a burst above the rate."""
    clock = FakeClock()
    inner = LocalRemote(str(tmp_path / "r"))
    for i in range(2):
        inner.put(f"data/{i}", b"x" * 500)
    started: list[float] = []
    real_get = inner.get

    def get(key, start=None, length=None):
        started.append(clock.now)
        return real_get(key, start, length)

    inner.get = get
    remote = ThrottledRemote(inner, download=1000, clock=clock, sleep=clock.sleep)
    remote.get("data/0")  # its turn: 100.0 to 100.5
    clock.now = 100.05  # another thread's download begins 0.05 s into that turn
    remote.get("data/1")
    assert started == [100.0, 100.5] and clock.slept == [0.5, 0.45, 0.5]


@pytest.mark.parametrize("text, rate", [("512", 512 * 1024), ("2M", 2 << 20), ("500K/s", 500 * 1024),
                                        ("1.5", 1536), ("3MiB", 3 << 20)])
def test_rates_on_the_command_line(text, rate):
    assert _rate(text) == rate


@pytest.mark.parametrize("text", ["0", "-5", "fast", ""])
def test_bad_rates_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _rate(text)


def test_limited_backup_and_restore_keep_to_the_rate(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(400 << 10))  # incompressible: the packs carry about 400 KiB
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    started = time.monotonic()
    cli("backup", "-r", repo, str(src), "--limit-upload", "200")
    assert time.monotonic() - started > 1.5  # 400 KiB at 200 KiB/s: at least 2 s less the first object
    started = time.monotonic()
    cli("restore", "-r", repo, "latest", "-t", str(tmp_path / "out"), "--limit-download", "200K")
    assert time.monotonic() - started > 1.5
    assert describe(tmp_path / "out") == describe(src)


def test_a_stop_ends_the_waits_and_refuses_the_uploads_whose_turn_had_not_come(tmp_path):
    """A backup told to stop under --limit-upload stored packs that had not begun and waited out every turn
    booked (a minute and more at a low rate, past a service manager's stop timeout)."""
    from chunkvault.errors import Stopped
    from chunkvault.remotes.layer import StopRequest

    stop = StopRequest()
    remote = ThrottledRemote(LocalRemote(str(tmp_path / "r")), upload=1 << 20, stop=stop)
    outcome: dict[str, object] = {}

    def put(key: str, size: int) -> None:
        try:
            remote.put(key, os.urandom(size))
            outcome[key] = "stored"
        except Stopped:
            outcome[key] = "refused"

    first = threading.Thread(target=put, args=("data/first", 3 << 20))  # its turn: 3 s from now
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=put, args=("data/second", 2 << 20))  # its turn begins in about 3 s
    second.start()
    time.sleep(0.2)
    stop.request()
    first.join()
    second.join()
    remote.put("index/small", b"an index object goes at once")  # not after the 5 s the turns booked
    remote.put("index/large", os.urandom(2 << 20))  # tens of thousands of small files' index: it goes too
    assert remote.upload is not None and remote.upload._clock() < remote.upload._free_at
    assert outcome == {"data/first": "stored", "data/second": "refused"}
    assert remote.stat("data/second") is None and remote.get("index/small") and remote.stat("index/large")
    idle = ThrottledRemote(LocalRemote(str(tmp_path / "idle")), upload=1 << 20, stop=stop)
    idle.put("data/due", os.urandom(2 << 20))  # its turn had come (an idle link): stored, stop or not
    assert idle.stat("data/due") is not None
