"""Compressing a batch of chunks in one call stores exactly what compressing each would."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from chunkvault.store.blob import KIND_RAW, KIND_ZSTD, compress, compress_many

chunks = st.one_of(
    st.binary(max_size=300),  # tiny (stored raw below 64 bytes) and incompressible
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=40), st.integers(1, 400)),  # repetitive
    st.builds(memoryview, st.binary(min_size=64, max_size=200)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(chunks, max_size=20), st.sampled_from([0, 1, 3, 9]))
def test_compress_many_equals_compress_of_each(datas, level):
    got = [(kind, bytes(payload)) for kind, payload in compress_many(datas, level)]  # payloads are bytes-like
    assert got == [(kind, bytes(payload)) for kind, payload in (compress(d, level) for d in datas)]
    for (kind, payload), d in zip(got, datas):
        assert kind in (KIND_RAW, KIND_ZSTD) and (kind == KIND_ZSTD or payload == bytes(d))


def test_a_batch_of_repetitive_chunks_is_compressed():
    datas = [bytes([i]) * 5000 for i in range(10)] + [b"short"]
    got = compress_many(datas, 3)
    assert [k for k, _ in got] == [KIND_ZSTD] * 10 + [KIND_RAW]
    assert all(len(p) < 100 for _, p in got[:10])
