"""The store's plaintext blob cache: bounded in bytes and in blobs, and blobs read ahead leave once the readers
promised them have had them."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault.store.repository import CACHE_BLOBS, CACHE_BYTES, _LRU


def test_a_blob_read_ahead_leaves_at_the_last_promised_hit():
    cache = _LRU(1 << 20)
    cache.put(b"m", b"manifest", once=True)
    assert cache.expect([b"m", b"other"]) == [b"other"]  # a second walk: one more hit, and what to read
    assert cache.peek(b"m") == b"manifest"  # a delta's base looked up on the way is no reader's hit
    assert cache.get(b"m") == b"manifest" and cache.get(b"m") == b"manifest"
    assert cache.get(b"m") is None and cache.size == 0


def test_a_blob_kept_for_every_reader_stays_so():
    cache = _LRU(1 << 20)
    cache.put(b"b", b"base")
    cache.put(b"b", b"base", once=True)
    assert cache.expect([b"b"]) == []
    for _ in range(3):
        assert cache.get(b"b") == b"base"


def test_a_cache_given_many_tiny_blobs_holds_at_most_its_count_of_them():
    """Bounded in bytes alone, the cache held 256 MiB of blobs of 256 bytes as a million entries, each some 200
    bytes beside its plaintext (a copy of such chunks read ahead into it): it holds the most recent
    CACHE_BLOBS at most, whatever room its bytes leave."""
    cache = _LRU(CACHE_BYTES)
    ids = [n.to_bytes(32, "big") for n in range(CACHE_BLOBS + 1000)]
    for i in ids:
        cache.put(i, bytes(256))
    assert len(cache.items) == CACHE_BLOBS and cache.size == 256 * CACHE_BLOBS < CACHE_BYTES
    assert list(cache.items) == ids[1000:]
    cache.put(ids[0], bytes(256), once=True)  # read ahead: pushed out by count as by size, promise and all
    assert cache.once == {ids[0]: 1}
    for n in range(CACHE_BLOBS):
        cache.put((n + len(ids)).to_bytes(32, "big"), bytes(256))
    assert ids[0] not in cache.items and cache.once == {} and len(cache.items) == CACHE_BLOBS


ops = st.lists(st.tuples(st.sampled_from(["put", "once", "expect", "get", "peek", "drop"]),
                         st.integers(0, 5), st.integers(1, 40)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_cache_counts_its_bytes_and_its_promises(sequence):
    """Against a model: what the cache holds is within its bound and counted right, a blob read ahead is
    served as often as promised unless pushed out by size or count or dropped, and one put plainly stays."""
    cache = _LRU(100, 4)
    promised: dict[bytes, int] = {}  # the model: hits left of each blob read ahead, while the cache holds it
    for op, k, n in sequence:
        key = bytes([k])
        held = key in cache.items
        if op in ("put", "once"):
            cache.put(key, b"x" * n, once=op == "once")
            if op == "once" and key in cache.items:
                if not held:
                    promised[key] = 1
                elif key in promised:
                    promised[key] += 1
        elif op == "expect":
            assert cache.expect([key]) == ([] if held else [key])
            if held and key in promised:
                promised[key] += 1
        elif op == "get":
            got = cache.get(key)
            assert (got is not None) == held
            if held and key in promised:
                promised[key] -= 1
                assert (key in cache.items) == (promised[key] > 0)
                if not promised[key]:
                    del promised[key]
            elif held:
                assert key in cache.items
        elif op == "peek":
            assert (cache.peek(key) is not None) == held
        else:
            cache.drop([key])
        promised = {k: v for k, v in promised.items() if k in cache.items}  # pushed out, or dropped
        assert cache.size == sum(map(len, cache.items.values())) <= cache.max_bytes
        assert len(cache.items) <= cache.max_blobs
        assert cache.once == promised
