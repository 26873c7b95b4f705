"""The block-delta match finder: its sequences rebuild the data exactly, obey zstd's rules, and find the matches
a database page's in-place update leaves; its frames are ordinary zstd frames against the prefix."""
import random

import pytest
from hypothesis import given, settings, strategies as st

from chunkvault.store import zstdbuf

_deltamatch = pytest.importorskip("chunkvault.store._deltamatch")
pytestmark = pytest.mark.skipif(not zstdbuf.can_match(), reason="python-zstandard without its cffi backend")


def sequences(prefix: bytes, data: bytes) -> list[tuple[int, int, int]]:
    out = bytearray(_deltamatch.max_sequences(len(data)) * 16)
    count = _deltamatch.find(prefix, data, out)
    words = memoryview(out).cast("I")[: 4 * count].tolist()
    rows = [words[i : i + 4] for i in range(0, len(words), 4)]
    assert all(rep == 0 for *_, rep in rows)
    return [(off, lit, ml) for off, lit, ml, _ in rows]


def rebuild(prefix: bytes, data: bytes, seqs: list[tuple[int, int, int]]) -> bytes:
    """The data the sequences describe (literals taken from ``data``, as zstd takes them), checking every match
    against zstd's rules and the finder's own: at least 4 bytes, inside the window, and a match from the prefix
    ends inside the prefix."""
    window = bytearray(prefix)
    p = len(prefix)
    for off, lit, ml in seqs:
        at = len(window) - p
        assert at + lit + ml <= len(data)
        window += data[at : at + lit]
        assert ml >= 4 and 1 <= off <= len(window)
        src = len(window) - off
        assert src >= p or src + ml <= p
        if off >= ml:
            window += window[src : src + ml]
        else:
            for _ in range(ml):
                window.append(window[len(window) - off])
    window += data[len(window) - p :]
    return bytes(window[p:])


@st.composite
def prefix_and_data(draw):
    """A prefix (random, or from a small alphabet so hashes collide) and data made from it by in-place patches,
    copies of other stretches, insertions and a new length; or unrelated data."""
    alphabet = draw(st.sampled_from([256, 4, 1]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    prefix = bytes(rnd.randrange(alphabet) for _ in range(draw(st.integers(0, 6000))))
    if draw(st.booleans()) and prefix:
        data = bytearray(prefix)
        for op, at, size in draw(st.lists(st.tuples(st.sampled_from("pci"), st.integers(0, 6000),
                                                    st.integers(1, 300)), max_size=8)):
            at %= len(data) + 1
            if op == "p":
                data[at : at + size] = rnd.randbytes(size)
            elif op == "c":
                src = rnd.randrange(len(prefix))
                data[at : at + size] = prefix[src : src + size]
            else:
                data[at:at] = rnd.randbytes(size)
        data = bytes(data[: draw(st.integers(0, len(data) + 100))])
    else:
        data = rnd.randbytes(draw(st.integers(0, 3000)))
    return prefix, data


@settings(max_examples=300, deadline=None)
@given(prefix_and_data())
def test_sequences_rebuild_the_data_exactly(case):
    prefix, data = case
    assert rebuild(prefix, data, sequences(prefix, data)) == data


@settings(max_examples=100, deadline=None)
@given(prefix_and_data())
def test_frames_decode_against_the_prefix(case):
    prefix, data = case
    if not prefix:
        return
    frame = zstdbuf.compress_matched(data, prefix, 3)
    out = bytearray(len(data))
    zstdbuf.decompress_into(frame, out, len(data), prefix)
    assert out == data


@pytest.mark.parametrize("seed", range(8))
def test_large_inputs_rebuild_past_the_lookahead_and_a_full_hash_table(seed):
    """Prefixes far longer than the finder's lookahead and its hash table, with edits in place, rows copied from
    elsewhere, a shift by an insertion, and data longer or shorter than the prefix."""
    rnd = random.Random(seed)
    pages = [bytes(rnd.randrange(4) for _ in range(256)) * 16 if i % 3 == 0 else rnd.randbytes(4096)
             for i in range(rnd.randrange(20, 120))]
    prefix = b"".join(pages)
    data = bytearray(prefix)
    for _ in range(rnd.randrange(50, 400)):
        at, size = rnd.randrange(len(data)), rnd.randrange(1, 200)
        if rnd.random() < 0.5:
            data[at : at + size] = rnd.randbytes(size)
        else:
            src = rnd.randrange(len(prefix))
            data[at : at + size] = prefix[src : src + size]
    if seed % 2:
        at = rnd.randrange(len(data))
        data[at:at] = rnd.randbytes(rnd.randrange(1, 3000))
    data = bytes(data[: rnd.randrange(len(data) // 2, len(data))] if seed % 3 == 0 else data + rnd.randbytes(5000))
    assert rebuild(prefix, data, sequences(prefix, data)) == data
    frame = zstdbuf.compress_matched(data, prefix, 3)
    out = bytearray(len(data))
    zstdbuf.decompress_into(frame, out, len(data), prefix)
    assert out == data


def test_a_page_updated_in_place_costs_only_what_changed():
    """Pages whose rows change a few bytes in place, and whose updated row is written again to the page's free
    space (copied from further on in the prefix): both are found, the literals are the changed bytes."""
    rnd = random.Random(3)
    rows = [rnd.randbytes(120) for _ in range(48)]
    page = bytes(2048) + b"".join(rows)
    pages = [page for _ in range(16)]
    new = []
    for _ in range(16):
        p = bytearray(page)
        victim = rnd.randrange(48)
        row = bytearray(rows[victim])
        row[8:12] = rnd.randbytes(4)  # the changed column
        p[2048 - 120 : 2048] = row  # the new version in free space
        p[2048 + victim * 120 + 20] ^= 0xFF  # the old version's header marked
        new.append(bytes(p))
    prefix, data = b"".join(pages), b"".join(new)
    seqs = sequences(prefix, data)
    assert rebuild(prefix, data, seqs) == data
    literals = sum(lit for _, lit, _ in seqs) + len(data) - sum(lit + ml for _, lit, ml in seqs)
    assert literals <= 16 * (4 + 2 + 8)
    assert any(off != len(prefix) for off, _, _ in seqs)  # rows taken from elsewhere than the same offset


def test_short_data_and_a_small_sequence_buffer():
    prefix = bytes(range(256)) * 4
    for n in range(10):
        assert rebuild(prefix, prefix[:n], sequences(prefix, prefix[:n])) == prefix[:n]
    with pytest.raises(ValueError, match="too small"):
        _deltamatch.find(prefix, prefix, bytearray(16))


def test_the_finder_serves_in_place_deltas_and_zstd_moved_content(monkeypatch):
    """A whole-base delta of a chunk changed in place everywhere takes the finder; one whose content moved takes
    zstd's own match finder, which also looks far from the same offset."""
    from chunkvault.store import blob

    rnd = random.Random(8)
    base = rnd.randbytes(64 * 1024)
    everywhere = bytearray(base)
    for at in range(0, len(base), 512):
        everywhere[at + 7] ^= 1
    moved = base[40_000:] + base[:40_000]
    used = []
    monkeypatch.setattr(blob, "compress_matched", lambda *a: used.append("finder") or zstdbuf.compress_matched(*a))
    monkeypatch.setattr(blob, "compress_against", lambda *a: used.append("zstd") or zstdbuf.compress_against(*a))
    for data, expect in ((bytes(everywhere), "finder"), (moved, "zstd")):
        used.clear()
        payload = blob.delta_compress(data, base, 3)
        assert payload[0] == blob.DELTA_DICT and used == [expect]
        assert blob.delta_decompress(payload, base) == data
        assert len(payload) < len(base) // 8


@st.composite
def data_and_base(draw):
    rnd = random.Random(draw(st.integers(0, 2**32)))
    base = rnd.randbytes(draw(st.integers(0, 9000)))
    data = bytearray(base[: draw(st.integers(0, len(base)))] + rnd.randbytes(draw(st.integers(0, 3000))))
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
    return bytes(data), base


@settings(max_examples=300, deadline=None)
@given(data_and_base(), st.integers(0, 2**32))
def test_block_maps_and_gathers_equal_their_reference(case, seed):
    from chunkvault.store import blob

    data, base = case
    n, nb = len(data), -(-len(data) // blob.BLOCK_SIZE)
    stored = blob._changed(data, base, nb)
    assert stored == blob._changed_reference(data, base, nb)
    assert blob._equal_share(data, base) == pytest.approx(blob._equal_share_reference(data, base))
    rnd = random.Random(seed)
    picked = blob._both(stored, bytes(rnd.random() < 0.5 for _ in range(nb)))
    taken = blob._both(picked, blob._inside(n, len(base), nb))
    assert blob._gather(data, n, picked) == blob._gather_reference(data, n, picked)
    assert blob._gather(base, n, taken) == blob._gather_reference(base, n, taken)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=40))
def test_block_map_bits(flags):
    """A block map's bits: block i is bit 7 - i % 8 of byte i // 8, the last byte padded with zeros."""
    from chunkvault.store import blob

    mask = bytes(flags)
    packed = blob._pack_bits(mask)
    assert len(packed) == -(-len(flags) // 8)
    assert [bool(packed[i // 8] >> (7 - i % 8) & 1) for i in range(len(flags))] == flags
    if len(flags) % 8:
        assert not packed[-1] & (0xFF >> len(flags) % 8)
    assert blob._unpack_bits(packed, len(flags)) == mask


def _apply_outcome(apply, payload: bytes, base: bytes):
    """What applying a block delta to ``base`` gives: its plaintext, or the kind of error (one buffer, as a chain
    applies it)."""
    import zstandard
    from chunkvault.store import blob

    plain = blob._Plain(base)
    try:
        apply(memoryview(payload), plain)
    except (ValueError, zstandard.ZstdError) as exc:
        return type(exc), str(exc) if isinstance(exc, ValueError) and "frame" not in str(exc) else ""
    return bytes(plain.result())


@settings(max_examples=300, deadline=None)
@given(data_and_base(), st.integers(0, 2**32))
def test_block_deltas_apply_as_their_reference_does(case, seed):
    """The C block map and scatter against the pure Python reference: the same plaintext from a valid delta, the same
    error from one with a damaged header, map or frame, or cut short."""
    from chunkvault.store import blob

    data, base = case
    saved, blob.BLOCKS_FALLBACK_SHARE = blob.BLOCKS_FALLBACK_SHARE, 1.0  # a block delta, however much changed
    try:
        payload = blob.delta_compress(data, base, 3)
    finally:
        blob.BLOCKS_FALLBACK_SHARE = saved
    assert payload[0] == blob.DELTA_BLOCKS
    assert _apply_outcome(blob._apply_blocks, payload, base) == data
    assert _apply_outcome(blob._apply_blocks_reference, payload, base) == data
    rnd = random.Random(seed)
    head = 5 + (-(-len(data) // blob.BLOCK_SIZE) + 7) // 8
    for _ in range(4):
        bad = bytearray(payload)
        at = rnd.randrange(1, min(len(bad), head + 8))
        bad[at] ^= 1 << rnd.randrange(8)
        for damaged in (bytes(bad), payload[: rnd.randrange(len(payload))]):
            assert _apply_outcome(blob._apply_blocks, damaged, base) == \
                _apply_outcome(blob._apply_blocks_reference, damaged, base)


def test_a_scatter_that_does_not_fill_the_stored_blocks_is_refused():
    buf = bytearray(3072)
    with pytest.raises(ValueError, match="fill"):
        _deltamatch.scatter_blocks(buf, bytes(1000), bytes([1, 0, 1]), 3000, 1024)
    with pytest.raises(ValueError, match="buffer"):
        _deltamatch.scatter_blocks(bytearray(2048), bytes(1976), bytes([1, 0, 1]), 3000, 1024)
    _deltamatch.scatter_blocks(buf, b"\x01" * 1976, bytes([1, 0, 1]), 3000, 1024)
    assert buf == b"\x01" * 1024 + bytes(1024) + b"\x01" * 952 + bytes(72)


def test_a_gather_of_a_block_outside_the_buffer_is_refused():
    with pytest.raises(ValueError, match="outside"):
        _deltamatch.gather_blocks(bytes(1500), 3000, bytes([0, 0, 1]), 1024)
    with pytest.raises(ValueError, match="flags"):
        _deltamatch.gather_blocks(bytes(3000), 3000, bytes([1]), 1024)
