"""The chunker: format vectors, C vs. reference, CDC properties, bad input, threads."""
from __future__ import annotations

import io
import json
import mmap
import os
import re
import threading
from array import array
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chunkvault.chunker as chunker_pkg
from chunkvault.chunker import (
    DEFAULT_PARAMS,
    UNKEYED_SECRET,
    Chunker,
    ChunkerParams,
    fixed_chunks,
    gear_table,
    gear_table_bytes,
)
from chunkvault.chunker import _fastcdc

FORMAT_MD = Path(chunker_pkg.__file__).with_name("FORMAT.md")
SMALL = ChunkerParams(min_size=256, avg_size=1024, max_size=8192)
# Edge shapes: hashing from the first byte; max close to avg (many max cuts);
# min above normal_size (only the loose mask is used).
PARAM_SETS = [
    SMALL,
    ChunkerParams(min_size=64, avg_size=256, max_size=1024),
    ChunkerParams(min_size=100, avg_size=512, max_size=700),
    ChunkerParams(min_size=900, avg_size=1024, max_size=4096),
]
SECRET = bytes(range(100, 132))


def xof(seed: str, length: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=length)


def lengths_of(cuts: array) -> list[int]:
    prev, out = 0, []
    for c in cuts:
        out.append(c - prev)
        prev = c
    return out


def stream_lengths(c: Chunker, data: bytes, splits: list[int]) -> list[int]:
    s = c.stream()
    out: list[int] = []
    prev = 0
    for at in sorted(splits) + [len(data)]:
        out += s.feed(data[prev:at])
        prev = at
    out += s.finish()
    return out


# ---- format vectors -----------------------------------------------------------

def format_vectors() -> list[dict]:
    text = FORMAT_MD.read_text()
    m = re.search(r"<!-- test-vectors -->\s*```json\n(.*?)```", text, re.S)
    assert m, "FORMAT.md lost its test-vector block"
    return json.loads(m.group(1))


def vector_data(spec: dict) -> bytes:
    if "zeros" in spec:
        return bytes(spec["zeros"])
    return xof(spec["xof_seed"], spec["length"])


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("vec", format_vectors(), ids=lambda v: v["name"])
def test_format_vectors(vec, impl):
    params = ChunkerParams(vec["min_size"], vec["avg_size"], vec["max_size"])
    c = Chunker(bytes.fromhex(vec["secret"]), params, implementation=impl)
    assert list(c.cut_points(vector_data(vec["data"]))) == vec["cuts"]


def test_unkeyed_gear_table_as_documented():
    table = gear_table(UNKEYED_SECRET)
    assert len(table) == 256 and all(0 <= g < 2**64 for g in table)
    assert table[:4] == (0x9FCD1F867B205308, 0x20827651F703A677, 0xEE626F5959DFE923, 0x6B517B8C68C3A8FC)
    raw = gear_table_bytes(UNKEYED_SECRET)
    assert blake3.blake3(raw).hexdigest() == "10bffff172e1ccd2fcbbfc25e2ae33559f86b8e739d97fca1c247088e0d9c981"
    assert raw == b"".join(g.to_bytes(8, "little") for g in table)


def test_params_derivation_as_documented():
    p = ChunkerParams(min_size=64 << 10, avg_size=256 << 10, max_size=2 << 20)
    assert p.mask_s == ((1 << 20) - 1) << 44
    assert p.mask_l == ((1 << 16) - 1) << 48
    assert p.normal_size == (256 << 10) - (32 << 10)


# ---- C against the reference --------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(min_size=0, max_size=30_000), which=st.sampled_from(range(len(PARAM_SETS))))
def test_c_matches_reference_random(data, which):
    p = PARAM_SETS[which]
    assert Chunker(SECRET, p).cut_points(data) == Chunker(SECRET, p, implementation="python").cut_points(data)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), length=st.integers(0, 60_000), which=st.sampled_from(range(len(PARAM_SETS))),
       period=st.sampled_from([1, 3, 64, 200, 0]))
def test_c_matches_reference_structured(seed, length, which, period):
    # Low-entropy inputs (repeats) reach max_size cuts and repeated hash values.
    p = PARAM_SETS[which]
    if period:
        data = (xof(str(seed), period) * (length // period + 1))[:length]
    else:
        data = xof(str(seed), length)
    assert Chunker(SECRET, p).cut_points(data) == Chunker(SECRET, p, implementation="python").cut_points(data)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), which=st.sampled_from(range(len(PARAM_SETS))), impl=st.sampled_from(["c", "python"]))
def test_streams_split_anywhere_match_whole(data, which, impl):
    p = PARAM_SETS[which]
    blob = xof(str(data.draw(st.integers(0, 1000))), data.draw(st.integers(0, 40_000)))
    splits = data.draw(st.lists(st.integers(0, len(blob)), max_size=12))
    c = Chunker(SECRET, p, implementation=impl)
    whole = lengths_of(Chunker(SECRET, p).cut_points(blob))
    assert stream_lengths(c, blob, splits) == whole


def test_stream_byte_by_byte():
    blob = xof("bytewise", 20_000)
    c = Chunker(SECRET, SMALL)
    assert stream_lengths(c, blob, list(range(len(blob)))) == lengths_of(c.cut_points(blob))


def test_stream_pending_and_restart():
    c = Chunker(SECRET, SMALL)
    blob = xof("pending", 50_000)
    s = c.stream()
    done = sum(s.feed(blob))
    assert s.pending == len(blob) - done and 0 < s.pending < SMALL.max_size
    assert list(s.finish()) == [len(blob) - done]
    assert s.pending == 0 and list(s.finish()) == []
    # After finish the stream starts a new one.
    assert list(s.feed(blob)) + list(s.finish()) == lengths_of(c.cut_points(blob))


@pytest.mark.parametrize("bufsize", [1, 777, 8192, 1 << 20])
def test_chunks_from_file_equal_whole(tmp_path, bufsize):
    blob = xof("file", 300_000) + bytes(20_000) + xof("tail", 5_000)
    path = tmp_path / "f.bin"
    path.write_bytes(blob)
    c = Chunker(SECRET, SMALL)
    with open(path, "rb") as f:
        pieces = list(c.chunks(f, bufsize=bufsize))
    assert b"".join(pieces) == blob
    assert [len(x) for x in pieces] == lengths_of(c.cut_points(blob))


def test_chunks_with_size_hint_and_unbuffered_reads(tmp_path):
    blob = xof("hint", 2_000_000)
    path = tmp_path / "f.bin"
    path.write_bytes(blob)
    c = Chunker(SECRET, ChunkerParams(min_size=4096, avg_size=16384, max_size=65536))
    with open(path, "rb", buffering=0) as f:
        # A wrong (too small) hint must not change the result.
        pieces = list(c.chunks(f, size_hint=10))
    assert [len(x) for x in pieces] == lengths_of(c.cut_points(blob))
    assert list(c.chunks(io.BytesIO(b""))) == []
    assert list(c.chunks(io.BytesIO(b"abc"))) == [b"abc"]


def test_chunks_reuse_a_given_buffer():
    """A buffer given for the reads serves stream after stream, whatever it held; one too small for the
    reads is left alone."""
    c = Chunker(SECRET, SMALL)
    buffer = bytearray(b"\xff" * 70_000)
    for i, length in enumerate([300_000, 5_000, 0, 123_457, 64 << 10]):
        blob = xof(f"reuse{i}", length)
        pieces = list(c.chunks(io.BytesIO(blob), bufsize=65_536, buffer=buffer))
        assert [len(x) for x in pieces] == lengths_of(c.cut_points(blob)) and b"".join(pieces) == blob
    assert buffer[65_536:] == b"\xff" * (70_000 - 65_536)  # reads go to the first bufsize bytes only
    small = bytearray(100)
    blob = xof("small", 200_000)
    assert b"".join(c.chunks(io.BytesIO(blob), bufsize=4096, buffer=small)) == blob
    assert small == bytes(100)


class Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read, as a pipe may."""

    def __init__(self, data: bytes, step: int):
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.step, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("length", [0, 1, 4095, 4096, 4097, 3 * 4096, 50_000])
@pytest.mark.parametrize("step", [1000, 1 << 20])
def test_fixed_chunks_cut_at_fixed_offsets(length, step):
    blob = xof("fixed", length)
    pieces = list(fixed_chunks(Trickle(blob, step), 4096))
    assert b"".join(pieces) == blob
    assert all(len(p) == 4096 for p in pieces[:-1]) and all(0 < len(p) <= 4096 for p in pieces)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_fixed_chunks_bad_size(bad):
    with pytest.raises(ValueError):
        list(fixed_chunks(io.BytesIO(b"abc"), bad))


def test_interleaved_streams_on_one_chunker(tmp_path):
    """Streams of one chunker alive at once do not disturb each other."""
    c = Chunker(SECRET, SMALL)
    blobs = [xof(f"interleave{i}", 200_000 + i * 7919) for i in range(3)]
    gens = [c.chunks(io.BytesIO(b), bufsize=4096) for b in blobs]
    got: list[list[bytes]] = [[] for _ in blobs]
    live = set(range(len(gens)))
    while live:
        for i in sorted(live):
            piece = next(gens[i], None)
            if piece is None:
                live.discard(i)
            else:
                got[i].append(piece)
    for blob, pieces in zip(blobs, got):
        assert [len(p) for p in pieces] == lengths_of(c.cut_points(blob)) and b"".join(pieces) == blob


# ---- properties of content-defined chunking -----------------------------------

@pytest.mark.parametrize("params", PARAM_SETS + [DEFAULT_PARAMS], ids=str)
def test_chunk_sizes_within_bounds(params):
    blob = xof("bounds", 64 * params.avg_size) + bytes(3 * params.max_size) + xof("x", params.avg_size)
    sizes = lengths_of(Chunker(SECRET, params).cut_points(blob))
    assert sum(sizes) == len(blob)
    assert all(params.min_size <= s <= params.max_size for s in sizes[:-1])
    assert sizes.count(params.max_size) >= 3  # the zero run is cut at max_size


@pytest.mark.parametrize("params", PARAM_SETS[:2] + [ChunkerParams(16384, 65536, 262144), DEFAULT_PARAMS], ids=str)
def test_mean_chunk_size_near_avg(params):
    n_chunks_expected = 2000 if params.avg_size < DEFAULT_PARAMS.avg_size else 256
    blob = xof("mean", n_chunks_expected * params.avg_size)
    cuts = Chunker(SECRET, params).cut_points(blob)
    mean = len(blob) / len(cuts)
    assert abs(mean - params.avg_size) <= 0.15 * params.avg_size, mean


def _kept_share(old: bytes, new: bytes, c: Chunker) -> float:
    def pieces(b: bytes) -> list[bytes]:
        mv, prev, out = memoryview(b), 0, []
        for end in c.cut_points(b):
            out.append(bytes(mv[prev:end]))
            prev = end
        return out

    old_set = {blake3.blake3(p).digest() for p in pieces(old)}
    return sum(len(p) for p in pieces(new) if blake3.blake3(p).digest() in old_set) / len(new)


@pytest.mark.parametrize("edit", ["insert", "delete", "overwrite"])
def test_small_edit_near_start_keeps_chunks(edit):
    old = xof("edit", 64 << 20)
    at = 1000
    if edit == "insert":
        new = old[:at] + b"hello" + old[at:]
    elif edit == "delete":
        new = old[:at] + old[at + 7:]
    else:
        new = old[:at] + b"\xff" * 3 + old[at + 3:]
    c = Chunker(SECRET, DEFAULT_PARAMS)
    assert _kept_share(old, new, c) >= 0.95


def test_secrets_change_boundaries():
    blob = xof("secrets", 1 << 20)
    a = Chunker(bytes(32), SMALL).cut_points(blob)
    b = Chunker(b"\x01" + bytes(31), SMALL).cut_points(blob)
    assert a != b
    assert len(set(a) & set(b)) < len(a) // 4
    assert gear_table(bytes(32)) != gear_table(b"\x01" + bytes(31))


# ---- API and bad input ---------------------------------------------------------

def test_buffers_of_any_kind():
    blob = xof("kinds", 100_000)
    c = Chunker(SECRET, SMALL)
    want = c.cut_points(blob)
    assert isinstance(want, array) and want.typecode == "Q" and want[-1] == len(blob)
    assert c.cut_points(bytearray(blob)) == want
    assert c.cut_points(memoryview(blob)) == want
    words = array("Q")
    words.frombytes(blob[:99_992])
    assert c.cut_points(words) == c.cut_points(blob[:99_992])
    assert c.cut_points(memoryview(blob[:100_000]).cast("B", (100, 1000))) == want
    mm = mmap.mmap(-1, len(blob))
    mm.write(blob)
    assert c.cut_points(mm) == want
    s = c.stream()
    assert list(s.feed(mm)) + list(s.finish()) == lengths_of(want)
    mm.close()


@pytest.mark.parametrize("impl", ["c", "python"])
def test_empty_input(impl):
    c = Chunker(SECRET, SMALL, implementation=impl)
    assert list(c.cut_points(b"")) == []
    s = c.stream()
    assert list(s.feed(b"")) == [] and list(s.finish()) == []


@pytest.mark.parametrize("impl", ["c", "python"])
@pytest.mark.parametrize("bad", ["text", 123, None, [1, 2, 3], 1.5, object()])
def test_non_buffer_rejected(bad, impl):
    c = Chunker(SECRET, SMALL, implementation=impl)
    with pytest.raises(TypeError, match="bytes-like"):
        c.cut_points(bad)
    with pytest.raises(TypeError, match="bytes-like"):
        c.stream().feed(bad)


@pytest.mark.parametrize("impl", ["c", "python"])
def test_non_contiguous_rejected(impl):
    c = Chunker(SECRET, SMALL, implementation=impl)
    strided = memoryview(bytes(1000))[::2]
    with pytest.raises(ValueError, match="contiguous"):
        c.cut_points(strided)
    with pytest.raises(ValueError, match="contiguous"):
        c.stream().feed(strided)


@pytest.mark.parametrize("secret,exc", [
    (bytes(31), ValueError), (bytes(33), ValueError), (b"", ValueError),
    ("0" * 32, TypeError), (None, TypeError), (12345, TypeError), (list(bytes(32)), TypeError),
])
def test_bad_secret(secret, exc):
    with pytest.raises(exc, match="secret"):
        Chunker(secret)
    with pytest.raises(exc, match="secret"):
        gear_table(secret)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(min_size=256, avg_size=1000, max_size=8192), ValueError),   # not a power of two
    (dict(min_size=1024, avg_size=1024, max_size=8192), ValueError),  # min == avg
    (dict(min_size=256, avg_size=1024, max_size=1024), ValueError),   # avg == max
    (dict(min_size=32, avg_size=1024, max_size=8192), ValueError),    # min below 64
    (dict(min_size=64, avg_size=128, max_size=8192), ValueError),     # avg below 256
    (dict(min_size=1 << 20, avg_size=1 << 24, max_size=(64 << 20) + 1), ValueError),
    (dict(min_size=256, avg_size=1 << 26, max_size=1 << 27), ValueError),
    (dict(min_size=-5, avg_size=1024, max_size=8192), ValueError),
    (dict(min_size=256.0, avg_size=1024, max_size=8192), TypeError),
    (dict(min_size=256, avg_size=True, max_size=8192), TypeError),
    (dict(min_size="256", avg_size=1024, max_size=8192), TypeError),
])
def test_bad_params(kwargs, exc):
    with pytest.raises(exc, match="chunker"):
        ChunkerParams(**kwargs)


def test_params_dict_round_trip():
    assert ChunkerParams() == DEFAULT_PARAMS
    for p in PARAM_SETS + [DEFAULT_PARAMS]:
        assert ChunkerParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="missing"):
        ChunkerParams.from_dict({"min_size": 256, "avg_size": 1024})
    with pytest.raises(ValueError, match="unknown"):
        ChunkerParams.from_dict({**SMALL.to_dict(), "level": 3})
    with pytest.raises(TypeError):
        ChunkerParams.from_dict([("min_size", 256)])  # type: ignore[arg-type]
    with pytest.raises(Exception):
        SMALL.min_size = 5  # type: ignore[misc]  # frozen


def test_bad_chunker_arguments():
    with pytest.raises(TypeError, match="ChunkerParams"):
        Chunker(SECRET, SMALL.to_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="implementation"):
        Chunker(SECRET, SMALL, implementation="rust")
    c = Chunker(SECRET, SMALL)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="bufsize"):
            list(c.chunks(io.BytesIO(b"x"), bufsize=bad))
    with pytest.raises(TypeError, match="readinto"):
        list(c.chunks(b"not a stream"))  # type: ignore[arg-type]


def test_kernel_rejects_bad_construction():
    gear = gear_table_bytes(SECRET)
    with pytest.raises(ValueError, match="2048"):
        _fastcdc.Cutter(gear[:-1], 256, 8192, 896, 1, 1)
    with pytest.raises(ValueError, match="min_size"):
        _fastcdc.Cutter(gear, 10, 8192, 896, 1, 1)
    with pytest.raises(ValueError, match="min_size"):
        _fastcdc.Cutter(gear, 256, 256, 896, 1, 1)
    with pytest.raises(ValueError):
        _fastcdc.Cutter(gear, 256, 8192, 896, -1, 1)
    with pytest.raises(TypeError):
        _fastcdc.Cutter(gear, 256, 8192, 896, "x", 1)
    with pytest.raises(TypeError):
        _fastcdc.Stream()
    # Any masks are safe: all-zero masks cut at min_size, all-one masks at max_size.
    assert set(lengths_of(array("Q", _fastcdc.Cutter(gear, 256, 8192, 896, 0, 0).cut_points(bytes(5000)))[:-1])) == {256}
    assert set(lengths_of(array("Q", _fastcdc.Cutter(gear, 256, 512, 300, 2**64 - 1, 2**64 - 1)
                                .cut_points(xof("m", 5000))))[:-1]) == {512}


# ---- threads ------------------------------------------------------------------

def test_two_threads_same_results():
    c = Chunker(SECRET, ChunkerParams(min_size=16384, avg_size=65536, max_size=262144))
    blobs = [xof(f"thread{i}", 32 << 20) for i in range(2)]
    want = [c.cut_points(b) for b in blobs]
    got: dict[int, list[array]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(4):
                got[i].append(c.cut_points(blobs[i]))
                s = c.stream()
                lens = list(s.feed(blobs[i][: 10 << 20])) + list(s.feed(blobs[i][10 << 20:])) + list(s.finish())
                got[i].append(array("Q", [sum(lens[: k + 1]) for k in range(len(lens))]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        assert got[i] and all(g == want[i] for g in got[i])


def test_random_os_data_matches_reference_with_default_sized_params():
    # One larger, unseeded case: a fresh random buffer, realistic sizes.
    blob = os.urandom(3 << 20)
    p = ChunkerParams(min_size=32768, avg_size=131072, max_size=1 << 20)
    assert Chunker(SECRET, p).cut_points(blob) == Chunker(SECRET, p, implementation="python").cut_points(blob)


class Holes(io.RawIOBase):
    """A stream that knows which of its bytes are holes (zeros told, not read), as a sparse file's reader does;
    it counts the hole bytes it was asked to read."""

    def __init__(self, data: bytes, holes: list[tuple[int, int]]):
        self.data, self.holes, self.pos, self.read_in_holes = data, holes, 0, 0

    def readable(self) -> bool:
        return True

    def zeros_ahead(self) -> int:
        return next((end - self.pos for start, end in self.holes if start <= self.pos < end), 0)

    def skip(self, n: int) -> None:
        assert 0 < n <= self.zeros_ahead()
        self.pos += n

    def readinto(self, buf) -> int:
        hole = self.zeros_ahead()
        if hole:
            n = min(len(buf), hole)
            self.read_in_holes += n
        else:
            nxt = min((s for s, _ in self.holes if s > self.pos), default=len(self.data))
            n = min(len(buf), nxt - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def zero_chunk_shorter_than_max(params: ChunkerParams) -> bytes:
    """A secret whose gear hash over zeros meets a mask: a run of zeros is then cut short of max_size."""
    for i in range(100_000):
        secret = blake3.blake3(i.to_bytes(4, "little")).digest()
        if len(Chunker(secret, params).zero_chunk) < params.max_size:
            return secret
    raise AssertionError("no such secret")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.lists(st.tuples(st.booleans(), st.integers(1, 40_000)), min_size=1, max_size=8),
       params=st.sampled_from(PARAM_SETS), implementation=st.sampled_from(["c", "python"]),
       bufsize=st.sampled_from([4096, 50_000, 1 << 20]), shorter=st.booleans())
def test_holes_told_not_read_give_the_chunks_of_reading_them(layout, params, implementation, bufsize, shorter):
    """Whole zero chunks of a hole are given without being read or scanned, and the cuts stay those of the
    bytes read whole, wherever holes start and end (also for a secret that cuts zeros short of max_size)."""
    secret = zero_chunk_shorter_than_max(params) if shorter and implementation == "c" else SECRET
    data, holes = bytearray(), []
    for i, (hole, length) in enumerate(layout):
        if hole:
            holes.append((len(data), len(data) + length))
            data += bytes(length)
        else:
            data += xof(f"data{i}", length)
    c = Chunker(secret, params, implementation=implementation)
    stream = Holes(bytes(data), holes)
    pieces = list(c.chunks(stream, bufsize=bufsize))
    assert [len(x) for x in pieces] == lengths_of(c.cut_points(bytes(data))) and b"".join(pieces) == data
    longest = max((end - start for start, end in holes), default=0)
    if longest >= 2 * len(c.zero_chunk) + bufsize:
        assert stream.read_in_holes < sum(end - start for start, end in holes)


def test_a_run_of_zeros_is_cut_into_one_zero_chunk_again_and_again():
    """From the first cut inside a run of zeros on, every chunk but the run's last is ``zero_chunk``."""
    shorter = Chunker(zero_chunk_shorter_than_max(SMALL), SMALL)
    for c in (Chunker(SECRET, SMALL), shorter):
        z = c.zero_chunk
        assert z == bytes(len(z)) and c.zero_chunk is z
        cuts = list(c.cut_points(xof("before", 5000) + bytes(20 * SMALL.max_size)))
        inside = [b - a for a, b in zip(cuts, cuts[1:]) if a >= 5000]
        assert len(inside) >= 19 and set(inside[:-1]) == {len(z)}
    assert len(Chunker(SECRET, SMALL).zero_chunk) == SMALL.max_size and len(shorter.zero_chunk) < SMALL.max_size


def test_fixed_chunks_give_a_hole_s_whole_chunks_unread():
    data = xof("a", 5000) + bytes(50_000) + xof("b", 3000)
    stream = Holes(data, [(5000, 55_000)])
    pieces = list(fixed_chunks(stream, 4096))
    assert b"".join(pieces) == data and all(len(p) == 4096 for p in pieces[:-1])
    assert stream.read_in_holes < 4096 * 2
