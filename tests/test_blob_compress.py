"""Compressing a batch of chunks in one call stores exactly what compressing each would; what the
compressor's parameters change and keep."""
from __future__ import annotations

import random

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from chunkvault.store.blob import KIND_RAW, KIND_ZSTD, compress, compress_many, compression_parameters

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


@pytest.mark.parametrize("level", [3, 4])
def test_double_fast_levels_take_tables_sized_for_one_chunk(level):
    ours, zstds = compression_parameters(level), zstandard.ZstdCompressionParameters.from_level(level)
    assert ours.strategy == zstds.strategy == zstandard.STRATEGY_DFAST
    assert (ours.hash_log, ours.chain_log) == (zstds.hash_log - 2, zstds.chain_log - 2)
    assert ours.window_log == 19 < zstds.window_log
    assert (ours.min_match, ours.search_log) == (zstds.min_match, zstds.search_log)


@pytest.mark.parametrize("level", [-5, 1, 2, 5, 9, 19])
def test_other_levels_are_zstds_own(level):
    ours = compression_parameters(level)
    assert ours.compression_level == level
    fields = ("window_log", "hash_log", "chain_log", "search_log", "min_match", "target_length", "strategy")
    assert [getattr(ours, f) for f in fields] == [0] * len(fields)  # all left to zstd for the level
    data = bytes(range(256)) * 1000
    assert zstandard.ZstdCompressor(compression_params=ours).compress(data) == zstandard.ZstdCompressor(
        level=level, write_content_size=True).compress(data)


@pytest.mark.parametrize("level", [1, 3, 4, 9])
def test_frames_are_plain_zstd_with_their_size_recorded(level):
    rng = random.Random(level)
    words = [bytes(rng.randrange(97, 123) for _ in range(rng.randrange(3, 9))) for _ in range(300)]
    data = b" ".join(rng.choice(words) for _ in range(200_000))[: 1 << 20]  # text, matches far apart too
    kind, payload = compress(data, level)
    assert kind == KIND_ZSTD and len(payload) < len(data) // 2
    assert zstandard.get_frame_parameters(bytes(payload)).content_size == len(data)
    assert zstandard.ZstdDecompressor().decompress(bytes(payload)) == data
