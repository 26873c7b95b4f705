"""Ranges of packs kept after a remote read: pure logic, checked against a model."""
from __future__ import annotations

import threading

from hypothesis import given, settings, strategies as st

from chunkvault.store.packranges import RecentRanges

OBJECTS = {key: bytes((i * 7 + len(key)) % 251 for i in range(4096)) for key in ("data/a", "data/b", "data/c")}

ops = st.lists(st.tuples(st.sampled_from(["add", "find"]), st.sampled_from(sorted(OBJECTS)),
                         st.integers(0, 4095), st.integers(0, 1500)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(1, 6000))
def test_finds_only_bytes_that_were_read_and_stays_within_its_bound(script, bound):
    kept = RecentRanges(bound)
    for op, key, start, length in script:
        obj = OBJECTS[key]
        if op == "add":
            kept.add(key, start, obj[start : start + length])
            if 0 < len(obj[start : start + length]) <= bound:  # the newest range is always kept
                assert kept.find(key, start, len(obj[start : start + length])) == obj[start : start + length]
        else:
            got = kept.find(key, start, length)
            assert got is None or got == obj[start : start + length] and len(got) == length
        assert kept.size <= bound


def test_the_oldest_range_goes_first():
    kept = RecentRanges(300)
    kept.add("p", 0, b"a" * 100)
    kept.add("p", 1000, b"b" * 100)
    kept.add("q", 0, b"c" * 100)
    kept.add("q", 500, b"d" * 100)
    assert kept.find("p", 0, 10) is None
    assert kept.find("p", 1050, 50) == b"b" * 50 and kept.find("q", 520, 80) == b"d" * 80
    assert kept.find("p", 1050, 51) is None  # past the end of the range kept
    assert kept.size == 300


def test_threads_share_it():
    kept = RecentRanges(1 << 16)
    data = bytes(range(256)) * 16

    def work(i):
        for j in range(200):
            kept.add(f"k{i}", j * 64, data[j * 64 % 4096 :][:64])
            got = kept.find(f"k{(i + 1) % 4}", j * 64, 32)
            assert got is None or len(got) == 32

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kept.size <= 1 << 16
