"""The layer above every remote: retries, the metadata cache, the transfer pool."""
from __future__ import annotations

import hashlib
import os
import random
import warnings
import re
import struct
import threading
import time

import pytest

from chunkvault.errors import (
    CorruptObject,
    ObjectExists,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    RemoteRetryWarning,
    RemoteUnavailable,
    StorageFull,
    UsageError,
)
from chunkvault.remotes.base import ObjectInfo, Remote
from chunkvault.remotes.layer import (
    CachingRemote,
    RetryingRemote,
    StopRequest,
    backoff_delay,
    decode_cache_entry,
    encode_cache_entry,
    parallel_map,
    wrap_remote,
)
from chunkvault.remotes.local import LocalRemote

from faults import FaultyRemote
from remote_contract import check_remote_contract


class RecordingSleep:
    """Stands in for time.sleep: records the delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def _local(tmp_path, name="repo") -> LocalRemote:
    return LocalRemote(str(tmp_path / name), fsync=False)


def _retrying(inner: Remote, **kw) -> RetryingRemote:
    kw.setdefault("sleep", RecordingSleep())
    kw.setdefault("rng", random.Random(7))
    return RetryingRemote(inner, **kw)


def _workload(remote: Remote, seed: int) -> dict:
    """A deterministic mix of every operation; returns everything it observed."""
    rng = random.Random(seed)
    seen: dict = {"get": [], "stat": [], "exists": []}
    blobs = {f"data/{i % 7:02x}/{rng.randbytes(8).hex()}": rng.randbytes(rng.choice([0, 10, 5000, 70_000])) for i in range(60)}
    for key, data in blobs.items():
        remote.put(key, data, if_absent=True)
    for i in range(10):
        remote.put(f"snapshots/s{i}", b"snap %d" % i, if_absent=True)
        remote.put("locks/l", b"lock %d" % i)
    for key, data in blobs.items():
        seen["get"].append(remote.get(key))
        if data:
            start = rng.randrange(len(data))
            seen["get"].append(remote.get(key, start, rng.randrange(1, 9000)))
            seen["get"].append(remote.get(key, start))
        seen["stat"].append(remote.stat(key))
    for key in list(blobs)[::3]:
        remote.delete(key)
        seen["exists"].append(remote.exists(key))
    seen["list"] = sorted((i.key, i.size) for i in remote.list(""))
    seen["list_data"] = sorted((i.key, i.size) for i in remote.list("data/"))
    return seen


# -- retries ---------------------------------------------------------------


def test_retry_layer_passes_the_contract(tmp_path):
    faulty = FaultyRemote(_local(tmp_path), seed=3, error_rate=0.2, truncate_rate=0.1)
    check_remote_contract(_retrying(faulty, attempts=15), big_size=1 << 20)
    assert faulty.faults["error"] and faulty.faults["error_after"] and faulty.faults["truncated"]


@pytest.mark.parametrize("rate,seed", [(0.1, 1), (0.2, 2), (0.3, 3)])
def test_retry_survives_transient_faults_with_identical_results(tmp_path, rate, seed):
    expected = _workload(_local(tmp_path, "clean"), seed)
    faulty = FaultyRemote(_local(tmp_path, "faulty"), seed=seed, error_rate=rate, truncate_rate=rate / 2)
    sleep = RecordingSleep()
    remote = _retrying(faulty, attempts=15, sleep=sleep)
    assert _workload(remote, seed) == expected
    injected = faulty.faults["error"] + faulty.faults["error_after"] + faulty.faults["truncated"]
    assert injected > 20, faulty.faults
    assert faulty.faults["truncated"] > 0 and faulty.faults["error_after"] > 0
    assert remote.retries == len(sleep.delays) >= injected - faulty.faults["truncated"]


def test_retry_with_faults_from_many_threads(tmp_path):
    faulty = FaultyRemote(_local(tmp_path), seed=11, error_rate=0.25, truncate_rate=0.1)
    remote = _retrying(faulty, attempts=20)
    blobs = {f"data/ab/{i:064x}": os.urandom(i * 37 % 20000) for i in range(120)}

    def roundtrip(item):
        key, data = item
        remote.put(key, data, if_absent=True)
        return remote.get(key) == data and remote.get(key, 3, 100) == data[3:103]

    assert all(parallel_map(roundtrip, blobs.items(), workers=8))
    assert {i.key: i.size for i in remote.list("data/")} == {k: len(v) for k, v in blobs.items()}
    assert faulty.faults["error"] > 0


def test_permanently_down_gives_one_clear_error_after_bounded_attempts(tmp_path):
    faulty = FaultyRemote(_local(tmp_path), seed=1, down=True)
    sleep = RecordingSleep()
    remote = _retrying(faulty, attempts=6, base_delay=0.5, max_delay=4.0, sleep=sleep)
    with pytest.raises(RemoteUnavailable) as info:
        remote.put("data/ab/cafe", b"x")
    message = str(info.value)
    assert faulty.display_url in message and "data/ab/cafe" in message and "6 time" in message
    assert "\n" not in message
    assert faulty.calls["put"] == 6
    assert len(sleep.delays) == 5
    for attempt, delay in enumerate(sleep.delays):
        assert 0 <= delay <= min(4.0, 0.5 * 2**attempt)
    # every operation gives up the same way
    for call in (lambda: remote.get("config"), lambda: remote.stat("config"), lambda: list(remote.list("data/")), lambda: remote.delete("x")):
        with pytest.raises(RemoteUnavailable, match="giving up"):
            call()
    assert faulty.calls["get"] == faulty.calls["stat"] == faulty.calls["list"] == faulty.calls["delete"] == 6


def test_timeout_bounds_total_retry_time(tmp_path):
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    faulty = FaultyRemote(_local(tmp_path), seed=1, down=True)
    remote = RetryingRemote(faulty, attempts=100, base_delay=1.0, max_delay=8.0, timeout=30.0, sleep=sleep, rng=random.Random(1), clock=lambda: now[0])
    with pytest.raises(RemoteUnavailable):
        remote.get("config")
    assert now[0] <= 30.0
    assert 1 < faulty.calls["get"] < 100


class Outage:
    """A fake clock, and a remote that is down from ``at`` for ``lasting`` seconds of it (None: for good)."""

    def __init__(self, tmp_path, at: float = 0.0, lasting: float | None = None):
        self.now = 0.0
        self.at, self.lasting = at, lasting
        self.faulty = FaultyRemote(_local(tmp_path), seed=1)

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.faulty.down = self.at <= self.now and (self.lasting is None or self.now < self.at + self.lasting)

    def remote(self, **kw) -> RetryingRemote:
        kw.setdefault("rng", random.Random(1))
        return RetryingRemote(self.faulty, sleep=self.sleep, clock=lambda: self.now, **kw)

    def answered_then_down(self, **kw) -> RetryingRemote:
        """A remote that has answered once, and is down from now on."""
        remote = self.remote(**kw)
        remote.put("data/ab/cafe", b"x")
        self.faulty.down = True
        return remote


def test_a_remote_that_never_answered_is_given_up_after_its_attempts(tmp_path):
    """A wrong URL or a server that is down says so within about half a minute, however long an outage of
    a remote that answered before is waited for."""
    outage = Outage(tmp_path)
    outage.faulty.down = True
    remote = outage.remote(outage=900.0)
    with pytest.raises(RemoteUnavailable, match="failed 8 time"):
        remote.get("config")
    assert outage.now < 30.0


@pytest.mark.parametrize("lasting", [60.0, 600.0, 890.0])
def test_a_remote_that_answered_is_waited_for_through_an_outage(tmp_path, lasting):
    outage = Outage(tmp_path, lasting=lasting)
    remote = outage.answered_then_down(outage=900.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert remote.get("data/ab/cafe") == b"x"
    assert lasting <= outage.now <= lasting + 15.0  # back within one wait of the remote's return
    assert outage.faulty.calls["get"] > 8
    assert "(attempt 2; giving up after at least 15 min and 8 attempts)" in str(said[0].message)


def test_an_outage_longer_than_the_window_is_given_up_at_its_end(tmp_path):
    outage = Outage(tmp_path)
    remote = outage.answered_then_down(outage=900.0)
    with pytest.raises(RemoteUnavailable, match="giving up"):
        remote.get("data/ab/cafe")
    assert 885.0 <= outage.now <= 900.0


def test_a_short_outage_window_says_the_attempts_still_count(tmp_path):
    """Both must be spent: "giving up in 5 s" was said where the 8 attempts' waits went on for longer."""
    outage = Outage(tmp_path)
    remote = outage.answered_then_down(outage=5.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(RemoteUnavailable, match="failed 8 time"):
            remote.get("data/ab/cafe")
    assert "(attempt 2; giving up after at least 5 s and 8 attempts)" in str(said[0].message)


def test_without_an_outage_window_an_answered_remote_gets_its_attempts_only(tmp_path):
    outage = Outage(tmp_path)
    remote = outage.answered_then_down(outage=0.0)
    with pytest.raises(RemoteUnavailable, match="failed 8 time"):
        remote.get("data/ab/cafe")


def test_an_unbounded_outage_window_retries_until_the_remote_is_back(tmp_path):
    outage = Outage(tmp_path, lasting=7200.0)
    remote = outage.answered_then_down(outage=None)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert remote.get("data/ab/cafe") == b"x"
    assert outage.now >= 7200.0
    assert "without end" in str(said[0].message)


def test_a_stop_request_ends_retrying_after_its_grace(tmp_path):
    """Told to stop, an upload against a stalled remote gives up within the grace, not the timeout."""
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    stop = StopRequest(grace=10.0, clock=clock)

    def sleep(seconds: float) -> None:
        now[0] += seconds

    faulty = FaultyRemote(_local(tmp_path), seed=1, down=True, sleep=sleep, delay=2.0)  # each attempt takes 2 s
    remote = RetryingRemote(faulty, attempts=1000, base_delay=1.0, max_delay=15.0, timeout=300.0, sleep=sleep,
                            rng=random.Random(1), clock=clock, stop=stop)
    real_sleep = faulty._sleep

    def stop_at_50(seconds: float) -> None:
        real_sleep(seconds)
        if now[0] >= 50.0:
            stop.request()

    faulty._sleep = stop_at_50
    with pytest.raises(RemoteUnavailable, match="told to stop"):
        remote.put("data/ab/cafe", b"x")
    stopped_at = stop._at
    assert stopped_at >= 50.0
    assert now[0] <= stopped_at + 10.0 + 2.0  # the grace, and the attempt under way when it ran out
    stop.clear()
    faulty._sleep = real_sleep
    with pytest.raises(RemoteUnavailable, match="giving up"):
        remote.put("data/ab/cafe", b"x")
    assert now[0] - stopped_at > 250.0  # cleared: the whole timeout again


def test_a_stop_request_of_the_process_is_every_repositorys_and_not_the_reverse():
    """Ctrl-C stops every repository's retries; one repository's operations told to stop leave the others
    retrying; and a repository's stop withdrawn while the process's stands leaves its retries stopped
    (threads a stopped command left behind)."""
    process = StopRequest()
    one, other = StopRequest(parent=process), StopRequest(parent=process)
    one.request()
    assert one.left() is not None and other.left() is None and process.left() is None
    one.clear()
    assert one.left() is None
    process.request()
    late = StopRequest(parent=process)
    assert all(s.left() is not None for s in (one, other, late))
    one.clear()
    assert one.left() is not None
    process.clear()
    assert all(s.left() is None for s in (process, one, other, late))


def test_a_remote_that_still_answers_after_a_stop_keeps_getting_attempts(tmp_path):
    """Uploads that take longer than the grace to finish on a slow link must not leave the index of what
    they stored, nor the lock's removal, unattempted: each answer starts the grace again."""
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    stop = StopRequest(grace=10.0, clock=clock)
    remote = RetryingRemote(_local(tmp_path), sleep=RecordingSleep(), clock=clock, stop=stop)
    stop.request()
    for _ in range(5):  # slow uploads, each answered 8 s after the last: 40 s past the request
        now[0] += 8.0
        remote.put("data/ab/" + os.urandom(32).hex(), b"pack")
    now[0] += 8.0
    remote.put("index/" + "1" * 64, b"index")
    remote.delete("locks/" + "2" * 32)
    now[0] += 10.5  # then nothing answered for longer than the grace: no new attempt
    with pytest.raises(RemoteUnavailable, match="told to stop"):
        remote.put("locks/" + "3" * 32, b"lock")
    assert remote.inner.stat("locks/" + "3" * 32) is None


def test_a_stop_request_cuts_a_wait_between_attempts_short(tmp_path):
    class Longest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    stop = StopRequest(grace=0.0)
    faulty = FaultyRemote(_local(tmp_path), seed=1, down=True)
    remote = RetryingRemote(faulty, attempts=5, base_delay=600.0, max_delay=600.0, timeout=None, rng=Longest(), stop=stop)
    failed: list[BaseException] = []

    def put() -> None:
        try:
            remote.put("data/ab/cafe", b"x")
        except RemoteUnavailable as exc:
            failed.append(exc)

    worker = threading.Thread(target=put)
    worker.start()
    while not remote.retries:  # waiting its first 600 s
        time.sleep(0.01)
    stop.request()
    worker.join(60)  # a hang guard, far below the 600 s it would wait
    assert not worker.is_alive() and "told to stop" in str(failed[0])
    assert faulty.calls["put"] == 1  # the grace is 0: no attempt is started after the stop


def test_remote_going_away_mid_upload(tmp_path):
    faulty = FaultyRemote(_local(tmp_path), seed=1, fail_after=5)
    remote = _retrying(faulty, attempts=4)
    for i in range(5):
        remote.put(f"data/ab/{i:064x}", b"ok")
    with pytest.raises(RemoteUnavailable, match="giving up"):
        remote.put(f"data/ab/{5:064x}", b"lost")
    faulty.fail_after = None
    assert sorted(i.key for i in remote.list("")) == [f"data/ab/{i:064x}" for i in range(5)]


class RaisingRemote(Remote):
    """Fails every call with one error and counts the calls."""

    display_url = "test://raising"

    def __init__(self, exc: Exception):
        self.exc = exc
        self.calls = 0

    def _fail(self, *args, **kwargs):
        self.calls += 1
        raise self.exc

    put = get = delete = stat = _fail

    def list(self, prefix=""):
        self._fail()


@pytest.mark.parametrize(
    "exc",
    [
        ObjectNotFound("k"),
        ObjectExists("k"),
        PermissionDenied("no"),
        StorageFull("full"),
        UsageError("bad"),
        RemoteError("odd"),
        CorruptObject("k", "bad"),
        ValueError("bug"),
    ],
)
def test_permanent_errors_are_not_retried(exc):
    inner = RaisingRemote(exc)
    sleep = RecordingSleep()
    remote = _retrying(inner, attempts=5, sleep=sleep)
    for call in (lambda: remote.put("k", b"x"), lambda: remote.get("k"), lambda: remote.stat("k"), lambda: list(remote.list())):
        with pytest.raises(type(exc)):
            call()
    assert inner.calls == 4 and sleep.delays == []


@pytest.mark.parametrize("exc", [ConnectionResetError("reset"), TimeoutError("slow"), RemoteUnavailable("503")])
def test_transient_errors_are_retried(exc):
    inner = RaisingRemote(exc)
    remote = _retrying(inner, attempts=3)
    with pytest.raises(RemoteUnavailable, match="test://raising"):
        remote.get("k")
    assert inner.calls == 3


def test_retries_are_said_at_most_once_per_interval_with_a_count_of_the_others():
    """A stalled remote kept a command silent for the minutes of its retries; every thread failing at
    once must not flood stderr either."""
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    inner = RaisingRemote(RemoteUnavailable("connection refused"))
    remote = RetryingRemote(inner, attempts=8, base_delay=2.0, max_delay=2.0, timeout=None, sleep=sleep,
                            rng=random.Random(3), clock=lambda: now[0])
    with pytest.warns(RemoteRetryWarning) as seen, pytest.raises(RemoteUnavailable, match="giving up"):
        remote.get("index/ab")
    lines = [str(w.message) for w in seen]
    assert len(lines) < remote.retries == 7
    first = lines[0]
    assert first.startswith("test://raising: get index/ab failed (connection refused); retrying in ")
    assert first.endswith("(attempt 2 of 8)")
    assert all(int(re.search(r"; (\d+) other retr", line).group(1)) > 0 for line in lines[1:])
    reported = len(lines) + sum(int(re.search(r"; (\d+) other", line).group(1)) for line in lines[1:])
    assert reported <= remote.retries


def test_a_failure_that_names_the_remote_is_not_prefixed_with_it_again(tmp_path):
    inner = RaisingRemote(RemoteUnavailable("test://raising is down"))
    with pytest.warns(RemoteRetryWarning, match=r"^stat k failed \(test://raising is down\)"):
        with pytest.raises(RemoteUnavailable):
            _retrying(inner, attempts=2).stat("k")


def test_ambiguous_if_absent_put_that_landed_is_success(tmp_path):
    faulty = FaultyRemote(_local(tmp_path), seed=1)
    remote = _retrying(faulty)
    faulty.inject("put", after=True)  # the write lands, its reply is lost
    remote.put("snapshots/s1", b"mine", if_absent=True)
    assert remote.get("snapshots/s1") == b"mine"
    assert faulty.calls["put"] == 2 and faulty.faults["scripted"] == 1


def test_ambiguous_if_absent_put_finding_other_bytes_raises(tmp_path):
    inner = _local(tmp_path)
    inner.put("snapshots/s1", b"theirs")
    faulty = FaultyRemote(inner, seed=1)
    remote = _retrying(faulty)
    faulty.inject("put")  # fails before anything is written
    with pytest.raises(ObjectExists):
        remote.put("snapshots/s1", b"mine", if_absent=True)
    assert inner.get("snapshots/s1") == b"theirs"


def test_plain_if_absent_conflict_does_not_read_back(tmp_path):
    inner = _local(tmp_path)
    inner.put("snapshots/s1", b"mine")
    faulty = FaultyRemote(inner, seed=1)
    with pytest.raises(ObjectExists):
        _retrying(faulty).put("snapshots/s1", b"mine", if_absent=True)
    assert faulty.calls["get"] == 0  # no earlier attempt, so nothing was ambiguous


def test_short_reads_are_retried_but_real_ends_are_not(tmp_path):
    inner = _local(tmp_path)
    inner.put("data/ab/x", bytes(range(200)))
    faulty = FaultyRemote(inner, seed=5, truncate_rate=1.0)
    remote = _retrying(faulty, attempts=3)
    with pytest.raises(RemoteUnavailable, match="cut short"):
        remote.get("data/ab/x")
    faulty.truncate_rate = 0.0
    assert remote.get("data/ab/x", 150, 100) == bytes(range(150, 200))
    assert remote.get("data/ab/x", 300, 10) == b""


def test_backoff_delay_grows_and_is_capped():
    rng = random.Random(0)
    caps = [min(10.0, 0.1 * 2**a) for a in range(12)]
    for attempt, cap in enumerate(caps):
        delays = [backoff_delay(attempt, 0.1, 10.0, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # full jitter spreads over the whole range


# -- cache -----------------------------------------------------------------


def _cached(tmp_path, **kw):
    faulty = FaultyRemote(_local(tmp_path), seed=1)  # counts inner calls, injects nothing
    return CachingRemote(faulty, tmp_path / "cache", **kw), faulty


def test_cache_hit_and_miss(tmp_path):
    remote, inner = _cached(tmp_path)
    inner.inner.put("index/i1", b"index bytes")
    assert remote.get("index/i1") == b"index bytes"
    assert (remote.misses, remote.hits, inner.calls["get"]) == (1, 0, 1)
    assert remote.get("index/i1") == b"index bytes"
    assert remote.get("index/i1", 6, 3) == b"byt"
    assert remote.get("index/i1", 6) == b"bytes"
    assert remote.get("index/i1", 100, 3) == b""
    assert (remote.misses, remote.hits, inner.calls["get"]) == (1, 4, 1)


def test_a_cache_open_for_weeks_marks_its_directory_used_once_a_day(tmp_path, monkeypatch):
    """A process that keeps its cache open (a mount, an embedding service) marks the directory used as it
    lists or reads, at most once a day: the next command to start removes a directory unused for a month."""
    from chunkvault.remotes import layer

    remote, inner = _cached(tmp_path)
    inner.inner.put("index/i1", b"index bytes")
    remote.get("index/i1")
    month_ago = time.time() - 31 * 86400
    os.utime(remote.cache_dir, (month_ago, month_ago))
    list(remote.list("index/"))
    assert os.stat(remote.cache_dir).st_mtime == month_ago  # marked when opened, not again within the day
    now = [time.monotonic()]
    monkeypatch.setattr(layer.time, "monotonic", lambda: now[0])
    now[0] += layer.CACHE_MARK_EVERY + 1  # past the day whatever the rounding of a large clock value
    list(remote.list("index/"))
    assert os.stat(remote.cache_dir).st_mtime > time.time() - 60
    os.utime(remote.cache_dir, (month_ago, month_ago))
    now[0] += layer.CACHE_MARK_EVERY + 1
    assert remote.get("index/i1") == b"index bytes"  # a mount that no longer lists still reads
    assert os.stat(remote.cache_dir).st_mtime > time.time() - 60


def test_cache_is_write_through_for_metadata_only(tmp_path):
    remote, inner = _cached(tmp_path)
    remote.put("index/i1", b"index")
    remote.put("data/ab/p1", b"pack")
    remote.put("config", b"cfg")
    assert remote.get("index/i1") == b"index"
    assert inner.calls["get"] == 0
    assert remote.get("data/ab/p1") == b"pack" and remote.get("config") == b"cfg"
    assert remote.get("data/ab/p1", 1, 2) == b"ac"
    assert inner.calls["get"] == 3
    assert not (tmp_path / "cache" / "data").exists() and not (tmp_path / "cache" / "config").exists()


class UnversionedLocal(LocalRemote):
    """Local disk whose listing names no versions, as some S3-compatible stores' listings give no ETag."""

    def list(self, prefix: str = ""):
        for info in super().list(prefix):
            yield ObjectInfo(info.key, info.size)


def test_a_rewritable_object_is_cached_by_the_version_its_listing_gives(tmp_path):
    """Snapshots are rewritten in place by other clients: a cached copy is served only for the version the
    latest listing names; without versions in the listing they are always fetched."""
    other = LocalRemote(str(tmp_path / "repo"))  # its listing names each file's identity
    faulty = FaultyRemote(other, seed=1)
    remote = CachingRemote(faulty, tmp_path / "cache")
    other.put("snapshots/s1", b"first")
    assert remote.get("snapshots/s1") == b"first" and inner_gets(faulty) == 1  # no listing yet: fetched
    [info] = list(remote.list("snapshots/"))
    assert remote.get("snapshots/s1") == b"first" and inner_gets(faulty) == 2  # now cached under its version
    assert remote.get("snapshots/s1") == b"first" and remote.get("snapshots/s1", 1, 3) == b"irs"
    assert inner_gets(faulty) == 2
    other.put("snapshots/s1", b"rewritten")  # another client's tag or rebase
    list(remote.list(""))
    assert remote.get("snapshots/s1") == b"rewritten" and inner_gets(faulty) == 3
    assert remote.get("snapshots/s1") == b"rewritten" and inner_gets(faulty) == 3
    assert len(os.listdir(tmp_path / "cache" / "snapshots")) == 1  # the old version's entry is gone
    remote.put("snapshots/s1", b"mine")  # its own write: the next listing tells the version
    assert remote.get("snapshots/s1") == b"mine" and inner_gets(faulty) == 4
    remote.delete("snapshots/s1")
    assert not os.listdir(tmp_path / "cache" / "snapshots")

    counted = FaultyRemote(UnversionedLocal(str(tmp_path / "plain")), seed=1)
    unversioned = CachingRemote(counted, tmp_path / "plain-cache")
    counted.inner.put("snapshots/s2", b"x")
    list(unversioned.list("snapshots/"))
    assert [unversioned.get("snapshots/s2") for _ in range(2)] == [b"x", b"x"] and inner_gets(counted) == 2


def _entry_before_versions(raw: bytes) -> bytes | None:
    """How a chunkvault from before versioned entries read any cache entry at a snapshot's path: magic
    ``CVCACHE1``, the content's size (8 bytes, big-endian) and blake2b-128, then the content it served as
    the snapshot object itself."""
    magic, size, digest = struct.unpack_from(">8sQ16s", raw)
    data = raw[32:]
    if magic != b"CVCACHE1" or size != len(data) or hashlib.blake2b(data, digest_size=16).digest() != digest:
        return None
    return data


def test_a_versioned_entry_is_no_entry_to_a_build_that_knows_no_versions(tmp_path):
    """After a downgrade to a chunkvault from before versioned entries, the same cache directory's snapshot
    entries (their version, then the object) were served whole as the snapshot: its authentication failed,
    so the repository's newest snapshot was reported unreadable, left out of restore and check, and
    ``forget ID`` advised.  Such a build discards an entry whose magic it does not know, and fetches."""
    other = LocalRemote(str(tmp_path / "repo"))
    remote = CachingRemote(other, tmp_path / "cache")
    other.put("snapshots/s1", b"the snapshot")
    list(remote.list("snapshots/"))
    assert remote.get("snapshots/s1") == b"the snapshot"
    entry = (tmp_path / "cache" / "snapshots" / "s1").read_bytes()
    assert _entry_before_versions(entry) is None
    assert remote.get("snapshots/s1") == b"the snapshot" and remote.hits == 1  # still served here
    path = tmp_path / "cache" / "snapshots" / "s1"
    path.write_bytes(encode_cache_entry(entry[32:]))  # the same entry as written before: fetched, rewritten
    assert remote.get("snapshots/s1") == b"the snapshot" and remote.misses == 2
    assert _entry_before_versions(path.read_bytes()) is None
    other.put("index/i1", b"an index")
    remote.get("index/i1")  # immutable entries keep the format every build reads
    assert _entry_before_versions((tmp_path / "cache" / "index" / "i1").read_bytes()) == b"an index"


def test_a_listing_that_stops_giving_versions_ends_the_cached_copy(tmp_path):
    """A store whose listing once named a version and now names none (an S3-compatible store dropping the
    ETag, an SFTP server omitting the mtime): the copy cached under the old version was served still, after
    another client had rewritten the object."""
    class Sometimes(LocalRemote):
        versions = True

        def list(self, prefix: str = ""):
            for info in super().list(prefix):
                yield info if self.versions else ObjectInfo(info.key, info.size)

    inner = Sometimes(str(tmp_path / "repo"))
    remote = CachingRemote(inner, tmp_path / "cache")
    inner.put("snapshots/s1", b"first")
    list(remote.list("snapshots/"))
    assert remote.get("snapshots/s1") == b"first"
    inner.put("snapshots/s1", b"rewritten")  # another client's tag or rebase
    inner.versions = False
    list(remote.list("snapshots/"))
    assert remote.get("snapshots/s1") == b"rewritten"


def test_a_complete_listing_drops_entries_of_objects_gone_from_the_remote(tmp_path):
    """Another machine's prune replaces the index and a forget removes snapshots: once this machine lists
    them, their cache entries go, so the cache does not grow with every prune done elsewhere."""
    other = LocalRemote(str(tmp_path / "repo"))  # its listing names each file's identity
    remote = CachingRemote(other, tmp_path / "cache")
    for key in ("index/i1", "index/i2", "snapshots/s1", "snapshots/s2"):
        other.put(key, key.encode())
    list(remote.list())
    for key in ("index/i1", "index/i2", "snapshots/s1", "snapshots/s2"):
        remote.get(key)
    cached = lambda: sorted(  # noqa: E731
        f"{os.path.basename(d)}/{n.partition('@')[0]}" for d, _, ns in os.walk(tmp_path / "cache") for n in ns)
    assert cached() == ["index/i1", "index/i2", "snapshots/s1", "snapshots/s2"]
    other.delete("index/i1")
    other.delete("snapshots/s2")
    next(iter(remote.list("index/")))  # a listing not read to its end proves nothing
    list(remote.list("index/i"))  # nor one of part of a prefix
    assert len(cached()) == 4
    list(remote.list("index/"))
    assert cached() == ["index/i2", "snapshots/s1", "snapshots/s2"]
    list(remote.list())
    assert cached() == ["index/i2", "snapshots/s1"]
    assert remote.get("index/i2") == b"index/i2" and remote.get("snapshots/s1") == b"snapshots/s1"


def inner_gets(faulty: FaultyRemote) -> int:
    return faulty.calls["get"]


def test_cache_does_not_keep_refused_if_absent_writes(tmp_path):
    remote, inner = _cached(tmp_path)
    inner.inner.put("snapshots/s1", b"first")
    with pytest.raises(ObjectExists):
        remote.put("snapshots/s1", b"second", if_absent=True)
    assert remote.get("snapshots/s1") == b"first"


def test_cache_delete_invalidates_and_list_stat_go_inner(tmp_path):
    remote, inner = _cached(tmp_path)
    remote.put("index/i1", b"x")
    remote.put("index/i2", b"yy")
    remote.delete("index/i1")
    with pytest.raises(ObjectNotFound):
        remote.get("index/i1")
    inner.inner.delete("index/i2")  # removed behind the cache's back
    assert [i.key for i in remote.list("index/")] == []
    assert remote.stat("index/i2") is None
    assert inner.calls["list"] == 1 and inner.calls["stat"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # truncated
        lambda raw: raw[:10],  # truncated inside the header
        lambda raw: raw + b"!",  # trailing garbage
        lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]),  # flipped bit
        lambda raw: b"",  # empty file
    ],
)
def test_corrupt_cache_entry_is_discarded_and_refetched(tmp_path, damage):
    remote, inner = _cached(tmp_path)
    remote.put("index/i1", b"the real index " * 10)
    path = tmp_path / "cache" / "index" / "i1"
    path.write_bytes(damage(path.read_bytes()))
    assert remote.get("index/i1") == b"the real index " * 10
    assert remote.discarded == 1 and inner.calls["get"] == 1
    assert decode_cache_entry(path.read_bytes()) == b"the real index " * 10  # repaired
    assert remote.get("index/i1") == b"the real index " * 10
    assert inner.calls["get"] == 1


def test_a_fifo_in_a_cache_entrys_place_is_a_miss_not_a_hang(tmp_path):
    remote, inner = _cached(tmp_path)
    remote.put("index/i1", b"the real index")
    path = tmp_path / "cache" / "index" / "i1"
    path.unlink()
    os.mkfifo(path)
    assert remote.get("index/i1") == b"the real index" and inner.calls["get"] == 1


def test_cache_entries_are_written_atomically(tmp_path, monkeypatch):
    remote, inner = _cached(tmp_path)

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    inner.inner.put("index/i1", b"data")
    monkeypatch.setattr(os, "replace", no_rename)
    assert remote.get("index/i1") == b"data"  # the cache failing never fails the read
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "cache" / "index").iterdir()] == []
    assert remote.get("index/i1") == b"data"
    assert remote.misses == 2 and remote.hits == 0
    assert remote.get("index/i1") == b"data" and remote.hits == 1


def test_cache_writes_killed_half_way_are_removed_once_stale(tmp_path):
    """A command killed while it wrote an entry left its temp file for good: listings passed over them all."""
    remote, inner = _cached(tmp_path)
    inner.inner.put("snapshots/" + "ab" * 32, b"snapshot")
    directory = tmp_path / "cache" / "snapshots"
    directory.mkdir(parents=True)
    stale, fresh = directory / ".tmp-0123456789abcdef", directory / ".tmp-fedcba9876543210"
    for path in (stale, fresh):
        path.write_bytes(b"half an entry")
    os.utime(stale, (0, os.stat(stale).st_mtime - 7200))
    list(remote.list("snapshots/"))
    assert [p.name for p in directory.iterdir()] == [fresh.name]  # another process's, perhaps under way


def test_cache_entry_format():
    for data in (b"", b"x", os.urandom(5000)):
        assert decode_cache_entry(encode_cache_entry(data)) == data
    assert decode_cache_entry(b"garbage") is None


def test_cache_passes_the_contract(tmp_path):
    remote = CachingRemote(_local(tmp_path), tmp_path / "cache", prefixes=("index/", "snapshots/", "data/"))
    check_remote_contract(remote, big_size=1 << 20)


def test_wrap_remote_stacks_cache_over_retries(tmp_path):
    faulty = FaultyRemote(_local(tmp_path), seed=4, error_rate=0.3)
    remote = wrap_remote(faulty, cache_dir=tmp_path / "cache", base_delay=0.0, attempts=20)
    assert isinstance(remote, CachingRemote) and isinstance(remote.inner, RetryingRemote)
    assert remote.display_url == faulty.display_url
    for i in range(20):
        remote.put(f"index/{i:064x}", b"i%d" % i, if_absent=True)
    for i in range(20):
        assert remote.get(f"index/{i:064x}") == b"i%d" % i
    assert faulty.faults["error"] > 0 and remote.hits == 20
    assert isinstance(wrap_remote(faulty), RetryingRemote)


def test_the_retry_time_is_an_option_or_the_environment(tmp_path, monkeypatch, cli):
    from chunkvault.connection import connect
    from chunkvault.errors import UsageError

    def outage(**options):
        remote = connect("http://127.0.0.1:9/", cache=False, **options)
        assert isinstance(remote, RetryingRemote)
        return remote.outage

    monkeypatch.delenv("CHUNKVAULT_RETRY_TIME", raising=False)
    assert outage() == 900.0
    assert outage(retry_time=60) == 60.0
    monkeypatch.setenv("CHUNKVAULT_RETRY_TIME", "0")
    assert outage() == 0.0
    assert outage(retry_time=30.5) == 30.5  # the option before the environment
    for bad in ("-1", "soon", "inf", "nan", "1e300"):
        monkeypatch.setenv("CHUNKVAULT_RETRY_TIME", bad)
        with pytest.raises(UsageError, match="CHUNKVAULT_RETRY_TIME takes seconds"):
            outage()
    monkeypatch.delenv("CHUNKVAULT_RETRY_TIME")
    for bad in (True, "x", -5):
        with pytest.raises(UsageError, match="retry-time takes seconds"):
            outage(retry_time=bad)
    with pytest.raises(UsageError, match="off-site"):
        connect(str(tmp_path / "repo"), retry_time=5)
    said = cli("snapshots", "-r", "http://127.0.0.1:9/", "-o", "http.retry-time=soon", check=2).stderr.decode()
    assert said.strip() == "chunkvault: retry-time takes seconds (0 to 1000000000), not 'soon'"


# -- transfer pool ---------------------------------------------------------


def test_parallel_map_keeps_order():
    rng = random.Random(1)
    pauses = [rng.random() / 500 for _ in range(100)]

    def work(i: int) -> int:
        time.sleep(pauses[i])  # finish out of order
        return i * i

    assert list(parallel_map(work, range(100), workers=6)) == [i * i for i in range(100)]
    assert list(parallel_map(work, [], workers=3)) == []


def test_parallel_map_bounds_items_in_flight():
    release = threading.Event()
    taken = []

    def items():
        for i in range(50):
            taken.append(i)
            yield i

    def work(i: int) -> int:
        if i == 0:
            release.wait()
        return i

    results = parallel_map(work, items(), workers=2, max_in_flight=5)
    first = []
    consumer = threading.Thread(target=lambda: first.append(next(results)))
    consumer.start()
    deadline = time.monotonic() + 10
    while len(taken) < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)  # give an unbounded pool the chance to take more
    assert len(taken) == 5  # item 0 blocks; no more than 5 items were pulled
    release.set()
    consumer.join()
    assert first == [0] and list(results) == list(range(1, 50))


def test_parallel_map_propagates_first_error_and_stops():
    started = []
    active = [0]
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
            active[0] += 1
        try:
            if i == 7:
                raise StorageFull("disk full at item 7")
            time.sleep(0.001)
            return i
        finally:
            with lock:
                active[0] -= 1

    results = []
    with pytest.raises(StorageFull, match="item 7"):
        for r in parallel_map(work, range(1000), workers=4, max_in_flight=8):
            results.append(r)
    assert active[0] == 0  # nothing still running once the error is raised
    assert results == list(range(len(results))) and len(results) <= 7
    assert len(started) < 30  # the rest was never started


def test_parallel_map_error_while_head_is_slow():
    gate = threading.Event()

    def work(i: int) -> int:
        if i == 0:
            gate.wait()
            return 0
        if i == 3:
            gate.set()  # let the head finish only after this failure is on its way
            raise PermissionDenied("item 3")
        return i

    with pytest.raises(PermissionDenied, match="item 3"):
        list(parallel_map(work, range(10), workers=4))


def test_parallel_map_early_close_cleans_up():
    started = []

    def work(i: int) -> int:
        started.append(i)
        return i

    gen = parallel_map(work, range(10_000), workers=2, max_in_flight=4)
    assert next(gen) == 0
    gen.close()
    assert len(started) <= 6
    with pytest.raises(ValueError):
        parallel_map(work, [1], workers=0)


def test_wrapped_objects_behave_like_remotes(tmp_path):
    remote = wrap_remote(_local(tmp_path), cache_dir=tmp_path / "c")
    remote.put("index/a", b"1")
    assert remote.stat("index/a") == ObjectInfo("index/a", 1)
    with remote:
        pass


# -- the fault injector itself ---------------------------------------------


def test_faults_are_deterministic_from_the_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        faulty = FaultyRemote(_local(tmp_path, name), seed=42, error_rate=0.3, truncate_rate=0.2)
        _workload(_retrying(faulty, attempts=20), seed=9)
        runs.append((dict(faulty.faults), dict(faulty.calls)))
    assert runs[0] == runs[1] and runs[0][0]
    other = FaultyRemote(_local(tmp_path, "c"), seed=43, error_rate=0.3, truncate_rate=0.2)
    _workload(_retrying(other, attempts=20), seed=9)
    assert (dict(other.faults), dict(other.calls)) != runs[0]


def test_slow_responses_and_fail_ops(tmp_path):
    sleep = RecordingSleep()
    faulty = FaultyRemote(_local(tmp_path), seed=1, delay=1.5, sleep=sleep, error_rate=1.0, fail_ops=["stat"])
    faulty.put("config", b"c")
    assert faulty.get("config") == b"c"
    with pytest.raises(RemoteUnavailable):
        faulty.stat("config")
    assert sleep.delays == [1.5, 1.5, 1.5] and faulty.faults["delayed"] == 3
    with pytest.raises(ValueError):
        FaultyRemote(_local(tmp_path), seed=1, fail_ops=["teleport"])


def test_layers_keep_what_the_inner_remote_says_of_its_reads(tmp_path):
    """Whether ranged reads are cheap, and whether a forked child may read on, is the backend's."""
    local = _local(tmp_path)
    for layer in (_retrying(local), CachingRemote(local, tmp_path / "cache"), _retrying(CachingRemote(local, tmp_path / "c2"))):
        assert (layer.cheap_ranges, layer.fork_safe) == (True, True)
    far = RaisingRemote(OSError("unused"))
    assert (_retrying(far).cheap_ranges, _retrying(far).fork_safe) == (False, False)


def test_a_retry_with_no_wait_to_speak_of_says_now_not_in_0_0_s():
    inner = RaisingRemote(RemoteUnavailable("connection refused"))
    remote = RetryingRemote(inner, attempts=2, base_delay=0.001, max_delay=0.001, timeout=None,
                            sleep=lambda s: None, rng=random.Random(3))
    with pytest.warns(RemoteRetryWarning) as seen, pytest.raises(RemoteUnavailable):
        remote.get("index/ab")
    assert "; retrying now (attempt 2 of 2)" in str(seen[0].message), str(seen[0].message)
