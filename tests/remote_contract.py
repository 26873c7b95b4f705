"""The behaviour every Remote must show, as one reusable check.

Each backend's tests call ``check_remote_contract(remote)`` on a fresh, empty
remote that talks to a real server.  Keeping the contract in one place means the
store can rely on identical semantics whichever backend holds the repository.
The check removes what it wrote, so the remote ends empty again.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chunkvault.errors import ObjectExists, ObjectNotFound, UsageError
from chunkvault.remotes.base import ObjectInfo, Remote

INVALID_KEYS = ("../x", "/abs", "a//b", "", "a/../b", "a/", "./a", "a\\b", "a b", "snapshots/abc\n")


def _blob(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _hexkey(rng: random.Random) -> str:
    return rng.randbytes(32).hex()


def _keys(remote: Remote, prefix: str = "") -> dict[str, int]:
    """list() as {key: size}, asserting no key is reported twice."""
    found: dict[str, int] = {}
    for info in remote.list(prefix):
        assert isinstance(info, ObjectInfo), info
        assert info.key not in found, f"list({prefix!r}) reported {info.key} twice"
        found[info.key] = info.size
    return found


def check_remote_contract(
    remote: Remote,
    *,
    big_size: int = 3 * 1024 * 1024 + 4321,
    threads: int = 8,
    racing_creates: bool = True,
    seed: int = 1,
) -> None:
    """Exercise the whole Remote interface on an empty ``remote``.

    ``big_size`` is the size of the large object (a few MiB by default; backends
    with multipart uploads may pass a size above their threshold).
    ``racing_creates`` makes ``threads`` threads race ``put(if_absent=True)`` on one
    key and requires exactly one winner; disable it only for a test server that
    is known not to serialise conditional writes (say so where you do).
    """
    rng = random.Random(seed)
    assert isinstance(remote.display_url, str) and remote.display_url
    assert remote.display_url in repr(remote)
    assert _keys(remote) == {}, "the contract needs an empty remote"

    _check_roundtrip(remote, rng, big_size)
    _check_ranges(remote, rng)
    _check_overwrite_and_if_absent(remote, rng)
    _check_missing(remote)
    _check_list(remote, rng)
    _check_dates(remote, rng)
    _check_delete(remote, rng)
    _check_invalid_keys(remote)
    _check_concurrency(remote, rng, threads, racing_creates)

    for key in _keys(remote):
        remote.delete(key)
    assert _keys(remote) == {}


def _check_roundtrip(remote: Remote, rng: random.Random, big_size: int) -> None:
    cases = {
        "config": _blob(rng, 300),
        "index/" + _hexkey(rng): b"",
        "data/00/" + _hexkey(rng): _blob(rng, 1),
        "data/01/" + _hexkey(rng): _blob(rng, big_size),
    }
    for key, data in cases.items():
        assert remote.put(key, data) is None
    for key, data in cases.items():
        got = remote.get(key)
        assert isinstance(got, bytes), type(got)
        assert got == data, f"{key}: {len(got)} bytes back, {len(data)} stored"
        info = remote.stat(key)
        assert info == ObjectInfo(key, len(data)), info
        assert remote.exists(key)
    # bytes-like input (memoryview, bytearray) is stored the same way
    key = "index/" + _hexkey(rng)
    remote.put(key, memoryview(bytearray(b"view of bytes")))
    assert remote.get(key) == b"view of bytes"
    for key in [*cases, key]:
        remote.delete(key)


def _check_ranges(remote: Remote, rng: random.Random) -> None:
    data = _blob(rng, 100_000)
    key = "data/ab/" + _hexkey(rng)
    remote.put(key, data)
    n = len(data)
    for start, length in [
        (0, 10),
        (10, 1),
        (12_345, 54_321),
        (n - 1, 1),
        (0, n),
        (7, None),
        (None, 17),
        (None, None),
        (0, 0),
        (500, 0),
    ]:
        lo = start or 0
        hi = n if length is None else lo + length
        assert remote.get(key, start, length) == data[lo:hi], (start, length)
    # ranges reaching past the end return what exists, maybe nothing
    assert remote.get(key, n - 5, 100) == data[n - 5 :]
    assert remote.get(key, n, 10) == b""
    assert remote.get(key, n + 1000, 10) == b""
    assert remote.get(key, n + 1000) == b""
    empty = "data/ab/" + _hexkey(rng)
    remote.put(empty, b"")
    assert remote.get(empty, 0, 10) == b""
    for k in (key, empty):
        remote.delete(k)


def _check_overwrite_and_if_absent(remote: Remote, rng: random.Random) -> None:
    key = "locks/" + _hexkey(rng)
    remote.put(key, b"first")
    remote.put(key, b"second, longer")
    assert remote.get(key) == b"second, longer"
    remote.put(key, b"3")
    assert remote.get(key) == b"3"
    assert remote.stat(key) == ObjectInfo(key, 1)

    fresh = "snapshots/" + _hexkey(rng)
    remote.put(fresh, b"original", if_absent=True)
    assert remote.get(fresh) == b"original"
    with pytest.raises(ObjectExists) as info:
        remote.put(fresh, b"intruder", if_absent=True)
    assert info.value.key == fresh
    assert remote.get(fresh) == b"original"
    with pytest.raises(ObjectExists):
        remote.put(fresh, b"original", if_absent=True)
    # an if_absent put on an existing key leaves no stray objects behind
    assert set(_keys(remote)) == {key, fresh}
    _check_versions(remote, fresh)
    remote.delete(key)
    remote.delete(fresh)


def _check_versions(remote: Remote, key: str) -> None:
    """A listing that names versions names a new one when a rewrite changes the bytes, even to as many
    and twice in one second (caches trust their copy of a rewritable object by it)."""
    versions = []
    for body in (b"original", b"rewrote!", b"rewrite2"):
        remote.put(key, body)
        versions += [i.version for i in remote.list(key.rsplit("/", 1)[0] + "/") if i.key == key]
    if versions[0] is None:
        assert versions == [None] * 3, "a listing gives versions for every object or for none"
    else:
        assert all(isinstance(v, str) and v for v in versions) and len(set(versions)) == 3, versions


def _check_missing(remote: Remote) -> None:
    missing = "data/ff/" + "f" * 64
    with pytest.raises(ObjectNotFound) as info:
        remote.get(missing)
    assert info.value.key == missing
    with pytest.raises(ObjectNotFound):
        remote.get(missing, 0, 10)
    with pytest.raises(ObjectNotFound):
        remote.get(missing, 5)
    assert remote.stat(missing) is None
    assert not remote.exists(missing)
    assert _keys(remote, "data/ff/") == {}
    assert _keys(remote, "nowhere/") == {}


def _check_list(remote: Remote, rng: random.Random) -> None:
    written = {
        "config": 10,
        "data/ab/" + _hexkey(rng): 3,
        "data/ab/" + _hexkey(rng): 0,
        "data/ac/" + _hexkey(rng): 7,
        "data/cd/" + _hexkey(rng): 1,
        "index/" + _hexkey(rng): 5,
        "snapshots/" + _hexkey(rng): 2,
        "keys/" + _hexkey(rng): 4,
    }
    for key, size in written.items():
        remote.put(key, _blob(rng, size))

    def expect(prefix: str) -> dict[str, int]:
        return {k: s for k, s in written.items() if k.startswith(prefix)}

    for prefix in ("", "data/", "data/ab/", "data/a", "data/cd/", "index/", "snapshots/", "keys/", "conf"):
        assert _keys(remote, prefix) == expect(prefix), prefix
    assert len(expect("data/ab/")) == 2
    for key, size in written.items():
        assert _keys(remote, key) == {key: size}, key
    assert _keys(remote, "data/zz/") == {}
    assert _keys(remote, "data/ab/" + "0" * 64) == {}
    with pytest.raises(UsageError):
        _keys(remote, "../")
    for key in written:
        remote.delete(key)


def _check_dates(remote: Remote, rng: random.Random) -> None:
    """A listing dates each object by the storage's clock (locks go stale by it); in the tests the storage
    runs on this machine, so its clock is this one (give or take whole-second dates)."""
    key = "locks/" + _hexkey(rng)
    for _ in range(2):
        before = time.time()
        remote.put(key, b"{}")
        (info,) = [i for i in remote.list("locks/") if i.key == key]
        assert isinstance(info.modified, float), info.modified
        assert before - 2 <= info.modified <= time.time() + 2, (before, info.modified)
    remote.delete(key)


def _check_delete(remote: Remote, rng: random.Random) -> None:
    key = "data/ab/" + _hexkey(rng)
    sibling = "data/ab/" + _hexkey(rng)
    remote.put(key, b"gone soon")
    remote.put(sibling, b"stays")
    remote.delete(key)
    assert remote.stat(key) is None
    with pytest.raises(ObjectNotFound):
        remote.get(key)
    assert set(_keys(remote, "data/")) == {sibling}
    remote.delete(key)
    remote.delete("data/ee/" + _hexkey(rng))
    # a deleted key can be created again, also with if_absent
    remote.put(key, b"back", if_absent=True)
    assert remote.get(key) == b"back"
    remote.delete(key)
    remote.delete(sibling)


def _check_invalid_keys(remote: Remote) -> None:
    for bad in INVALID_KEYS:
        for call in (
            lambda: remote.put(bad, b"x"),
            lambda: remote.put(bad, b"x", if_absent=True),
            lambda: remote.get(bad),
            lambda: remote.get(bad, 0, 1),
            lambda: remote.stat(bad),
            lambda: remote.delete(bad),
        ):
            with pytest.raises(UsageError):
                call()
    assert _keys(remote) == {}


def _check_concurrency(remote: Remote, rng: random.Random, threads: int, racing_creates: bool) -> None:
    per_thread = 12
    plans = [
        {f"data/{t:02x}/{_hexkey(rng)}": _blob(rng, rng.choice([0, 1, 1000, 70_000, 300_000])) for _ in range(per_thread)}
        for t in range(threads)
    ]
    barrier = threading.Barrier(threads)

    def work(plan: dict[str, bytes]) -> int:
        barrier.wait()
        for key, data in plan.items():
            remote.put(key, data)
        checked = 0
        for key, data in plan.items():
            assert remote.get(key) == data, key
            assert remote.stat(key) == ObjectInfo(key, len(data))
            checked += 1
        return checked

    with ThreadPoolExecutor(threads) as pool:
        assert sum(pool.map(work, plans)) == threads * per_thread
    expected = {k: len(v) for plan in plans for k, v in plan.items()}
    assert _keys(remote, "data/") == expected

    # several threads read the same objects at once, with ranges
    shared = {k: v for plan in plans for k, v in plan.items() if len(v) > 1000}

    def read_all(offset: int) -> None:
        for key, data in shared.items():
            assert remote.get(key, offset, 500) == data[offset : offset + 500]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read_all, range(0, threads * 100, 100)))

    if racing_creates:
        key = "locks/" + _hexkey(rng)
        race = threading.Barrier(threads)

        def create(i: int) -> bool:
            race.wait()
            try:
                remote.put(key, b"owner %d" % i, if_absent=True)
                return True
            except ObjectExists:
                return False

        with ThreadPoolExecutor(threads) as pool:
            outcome = list(pool.map(create, range(threads)))
        assert outcome.count(True) == 1, outcome
        assert remote.get(key) == b"owner %d" % outcome.index(True)
        remote.delete(key)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(remote.delete, expected))
    assert _keys(remote) == {}
