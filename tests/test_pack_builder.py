"""Packs built in reused, page-aligned buffers: every pack reads back exactly, whatever reuse came before."""
from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings, strategies as st

from chunkvault.errors import CorruptObject
from chunkvault.store.blob import KIND_DELTA, KIND_ZSTD
from chunkvault.store.crypto import Sealer
from chunkvault.store.pack import (PACK_MAGIC, TRAILER, PackBuffers, PackBuilder, PackEntry, read_pack, read_windows,
                                   readable_ids, seal_header)

SEALER = Sealer(bytes(range(32)))


def _build(buffers: PackBuffers, sizes: list[int]) -> tuple[bytes, list[bytes]]:
    b = PackBuilder(buffers)
    envelopes = [os.urandom(n) for n in sizes]
    for i, env in enumerate(envelopes):
        kind = KIND_DELTA if i % 3 == 2 else KIND_ZSTD
        b.add(i.to_bytes(32, "big"), kind, env, 2 * len(env), b"\x07" * 32 if kind == KIND_DELTA else None)
    view = b.finish(SEALER)
    assert len(b) == len(view)
    data = bytes(view)
    del view
    b.release()
    return data, envelopes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9000), min_size=1, max_size=12), min_size=1, max_size=6),
       st.integers(4096, 20_000), st.integers(0, 2))
def test_packs_read_back_exactly_through_reuse_and_growth(packs, capacity, keep):
    buffers = PackBuffers(capacity, keep)
    for sizes in packs:
        data, envelopes = _build(buffers, sizes)
        entries = read_pack(SEALER, data, "p")
        assert [e.blob_id for e in entries] == [i.to_bytes(32, "big") for i in range(len(sizes))]
        for e, env in zip(entries, envelopes):
            assert data[e.offset : e.offset + e.length] == env and e.raw_length == 2 * len(env)
            assert (e.base_id is not None) == (e.kind == KIND_DELTA)
        assert len(buffers._free) <= keep


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.booleans()), max_size=20))
def test_a_builder_holds_its_entries_as_the_header_encodes_them(specs):
    """What a builder holds of its entries (encoded, not a PackEntry each: a pack of a hundred thousand small
    blobs held 20 MB so) reads back as the entries added, and the sealed header lists them."""
    b = PackBuilder()
    added = []
    for i, (n, delta) in enumerate(specs):
        base = bytes([7]) * 32 if delta else None
        added.append(PackEntry(i.to_bytes(32, "big"), KIND_DELTA if delta else KIND_ZSTD, len(b), n, 2 * n, base))
        b.add(added[-1].blob_id, added[-1].kind, os.urandom(n), 2 * n, base)
    assert list(b.entries) == added and len(b.entries) == len(added) and bool(b.entries) == bool(added)
    assert b.entries.encoded_size == sum(45 + 32 * (e.kind == KIND_DELTA) for e in added)
    assert SEALER.open(seal_header(SEALER, b.entries), b"chunkvault pack header v1") == \
        SEALER.open(seal_header(SEALER, added), b"chunkvault pack header v1")
    assert read_pack(SEALER, bytes(b.finish(SEALER)), "p") == added
    b.release()


def test_an_entry_past_what_a_header_holds_is_refused():
    b = PackBuilder()
    with pytest.raises(ValueError, match="pack too large"):
        b.add(bytes(32), KIND_ZSTD, b"x", 1 << 32)
    assert len(b.entries) == 0


def test_a_released_buffer_serves_the_next_pack_and_is_page_aligned():
    buffers = PackBuffers(1 << 16, 1)
    first = PackBuilder(buffers)
    first.add(bytes(32), KIND_ZSTD, b"a" * 100, 100)
    view = first.finish(SEALER)
    import ctypes

    assert ctypes.addressof(ctypes.c_char.from_buffer(first.buf)) % 4096 == 0  # what O_DIRECT needs
    buf = first.buf
    del view
    first.release()
    second = PackBuilder(buffers)
    second.add(bytes(32), KIND_ZSTD, b"b" * 100, 100)
    assert second.buf is buf
    assert bytes(second.finish(SEALER))[:100] == b"b" * 100


def test_an_envelope_larger_than_the_buffer_moves_the_pack_to_a_larger_one():
    buffers = PackBuffers(4096, 2)
    data, envelopes = _build(buffers, [3000, 50_000, 10])
    entries = read_pack(SEALER, data, "p")
    assert [data[e.offset : e.offset + e.length] for e in entries] == envelopes


@settings(max_examples=200)
@given(st.lists(st.integers(1, 3000), max_size=30), st.integers(1, 10_000), st.integers(0, 500))
def test_read_windows_cover_a_pack_in_order_with_whole_blobs(lengths, limit, tail_gap):
    from chunkvault.store.pack import PackEntry, read_windows

    entries, pos = [], 0
    for i, n in enumerate(lengths):
        entries.append(PackEntry(bytes([i]) * 32, 0, pos, n, n))
        pos += n
    body = pos + tail_gap
    windows = read_windows(list(reversed(entries)), body, limit)
    assert windows[0][0] == 0 and windows[-1][1] == body
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # consecutive, no byte twice
    assert [e for _, _, w in windows for e in w] == entries  # every blob once, in pack order
    for start, end, w in windows:
        assert all(start <= e.offset and e.offset + e.length <= end for e in w)
        if len(w) > 1:
            assert w[-1].offset + w[-1].length - start <= limit


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 3000)), min_size=1, max_size=20),
       st.integers(1, 10_000))
@example([(0, 100), (50, 100)], 60)
def test_read_windows_keep_each_blob_whole_where_a_damaged_header_overlaps_entries(spans, limit):
    """Only a damaged header lists overlapping blobs; still no blob is cut between two windows (a window
    ends only where no blob before it runs on), and every byte is read once."""
    entries = [PackEntry(bytes([i]) * 32, 0, offset, n, n) for i, (offset, n) in enumerate(spans)]
    body = max(e.offset + e.length for e in entries)
    windows = read_windows(entries, body, limit)
    assert windows[0][0] == 0 and windows[-1][1] == body
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert sorted(e for _, _, w in windows for e in w) == sorted(entries)
    for start, end, w in windows:
        assert all(start <= e.offset and e.offset + e.length <= end for e in w)


@pytest.mark.parametrize("offset, length, refused", [(60, 40, False), (60, 41, True), (60, 90, True),
                                                     (100, 0, False), (101, 0, True)])
def test_an_authentic_header_whose_entry_runs_past_the_body_is_refused(offset, length, refused):
    """The seal proves who wrote the header, not that its entries fit: one running into the header would
    have its blob read from the header's bytes."""
    body = b"x" * 100
    header = seal_header(SEALER, [PackEntry(b"\1" * 32, KIND_ZSTD, offset, length, length)])
    pack = body + header + TRAILER.pack(len(header), PACK_MAGIC)
    if refused:
        with pytest.raises(CorruptObject, match="points past the data"):
            read_pack(SEALER, pack, "p")
    else:
        assert [(e.offset, e.length) for e in read_pack(SEALER, pack, "p")] == [(offset, length)]


def _entry(blob_id: int, base: int | None) -> PackEntry:
    i = blob_id.to_bytes(32, "big")
    if base is None:
        return PackEntry(i, KIND_ZSTD, 0, 1, 1)
    return PackEntry(i, KIND_DELTA, 0, 1, 1, base.to_bytes(32, "big"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.none() | st.integers(0, 40)), max_size=40))
def test_readable_ids_are_those_whose_chain_ends_in_a_whole_blob(specs):
    """Against a direct definition: an id is readable when some entry of it is whole, or a delta whose
    base is readable (checked by walking each chain, at most as deep as there are entries)."""
    entries = [_entry(b, base) for b, base in specs]
    bases: dict[int, set[int | None]] = {}
    for b, base in specs:
        bases.setdefault(b, set()).add(base)

    def readable(b: int, depth: int) -> bool:
        return depth >= 0 and b in bases and any(x is None or readable(x, depth - 1) for x in bases[b])

    want = {b.to_bytes(32, "big") for b in bases if readable(b, len(specs))}
    assert readable_ids(entries) == want


def test_a_delta_whose_base_is_lost_takes_the_deltas_on_it_along():
    entries = [_entry(1, None), _entry(2, 1), _entry(3, 2), _entry(5, 4), _entry(6, 5), _entry(6, 3)]
    assert readable_ids(entries) == {i.to_bytes(32, "big") for i in (1, 2, 3, 6)}
