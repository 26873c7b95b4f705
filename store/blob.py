"""Blob envelopes: one chunk (or manifest piece), compressed and sealed.

Layout (store/FORMAT.md, "Blob envelope")::

    kind u8 | base_id[32] (delta only) | nonce[12] | ciphertext | tag[16]

The AEAD's associated data binds the envelope to its blob id, its kind and, for
a delta, its base id: bytes moved under another id, or a delta pointed at
another base, fail to open.  A delta's payload starts with its method
(store/FORMAT.md, "Delta payload"): the changed 1 KiB blocks only, compressed
with the base's counterparts of those blocks as dictionary, or a zstd frame
with the whole base as dictionary.
"""
from __future__ import annotations

import struct
import threading
from typing import Any

import zstandard

from chunkvault.errors import CorruptObject, address_space_limited

from .crypto import NONCE_SIZE, TAG_SIZE, AuthenticationFailed, Sealer
from .zstdbuf import can_match, compress_against, compress_matched, decompress_into, empty_buffer, frame_size

try:  # block maps and gathers in C (store/_deltamatch.c); the pure Python *_reference functions otherwise
    from . import _deltamatch as _blocks
except ImportError:
    _blocks = None

KIND_RAW = 0
KIND_ZSTD = 1
KIND_DELTA = 2
KINDS = (KIND_RAW, KIND_ZSTD, KIND_DELTA)
ID_SIZE = 32
BLOB_AD = b"chunkvault blob v1"
ENVELOPE_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

DELTA_DICT = 0  # zstd frame, the base's plaintext as raw-content dictionary
DELTA_BLOCKS = 1  # changed blocks only, the base's counterparts as dictionary
DELTA_METHODS = (DELTA_DICT, DELTA_BLOCKS)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a frame's first bytes: no method byte is one of them
BLOCK_SIZE = 1024
# At most this many deltas in a row: reading any blob reads at most MAX_DELTA_DEPTH + 1
# envelopes, and refuses longer chains.  Backups write shorter ones: chunks cut at fixed
# offsets up to FIXED_DELTA_DEPTH, chunks cut by content up to CONTENT_DEFINED_DELTA_DEPTH
# (their deltas more often take a whole-base dictionary, slower to decode).  Each chosen by
# measurement, bytes stored against restore and backup time (bench/RESULTS.md, "Database differentials").
MAX_DELTA_DEPTH = 16
FIXED_DELTA_DEPTH = 12
CONTENT_DEFINED_DELTA_DEPTH = 8
# With more than this share of its blocks changed, a delta uses the whole base as dictionary
# instead (measured: as small as the better of the two methods within 1 %, at less cost).
BLOCKS_FALLBACK_SHARE = 0.5
# A whole-base delta whose words are mostly equal at the same offset (every page of a database file touched
# in place) has its matches found by chunkvault's finder too; one whose content moved (an insertion shifts
# everything after it) by zstd's, which also finds matches far from the same offset.
IN_PLACE_SHARE = 0.5
_LENGTH = struct.Struct("<I")
# sampled_size's sample: this many evenly spaced stripes of this many bytes.
SAMPLE_STRIPES = 8
SAMPLE_WIDTH = 16 << 10
# A blob's plaintext: bytes, or for a blob rebuilt up a delta chain a read-only view of the buffer it was
# rebuilt in (copying each rebuilt chunk out once more cost a delta-heavy restore a tenth of its time).
Plaintext = bytes | memoryview

_local = threading.local()


# zstd sizes the match tables of its double-fast levels (3 and 4) for streams (level 3: 2**17 hash and
# 2**16 chain entries, 768 KiB, and a 2 MiB window), but a blob is one chunk of at most a few hundred KiB
# (1 MiB cut at fixed offsets), compressed on its own.  A quarter of that (192 KiB at level 3) stays in
# the core's cache: on the bench's 2,000 MiB tree of system files level 3 took 7 % less CPU in an initial
# backup and stored 0.8 % more; on chunks of larger binaries 1.4 % more; 1 MiB chunks of PostgreSQL files
# compressed 11 % faster and no larger (bench/RESULTS.md, "Where the time goes").  Sizing the tables by half, or
# leaving the window and zstd's choice by chunk size as they were, stored less and saved about nothing.
# The fast levels' tables are small already; the slower strategies (levels 5 and up) are what a user asks
# for to store less, and stay zstd's own.
TABLE_LOG_CUT = 2
MAX_WINDOW_LOG = 19


def compression_parameters(level: int) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters of ``level``; at the double-fast levels, tables sized for one chunk (see above)."""
    p = zstandard.ZstdCompressionParameters.from_level(level)
    if p.strategy != zstandard.STRATEGY_DFAST:
        return zstandard.ZstdCompressionParameters(compression_level=level, write_content_size=True)
    return zstandard.ZstdCompressionParameters.from_level(
        level, window_log=min(p.window_log, MAX_WINDOW_LOG), hash_log=p.hash_log - TABLE_LOG_CUT,
        chain_log=p.chain_log - TABLE_LOG_CUT, write_content_size=True)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard's (de)compressor objects are not thread-safe: one per thread.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(compression_params=compression_parameters(level))
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


_KIND_BYTES = [bytes((kind,)) for kind in range(256)]


def blob_ad(kind: int, blob_id: bytes, base_id: bytes | None) -> bytes:
    return BLOB_AD + _KIND_BYTES[kind] + blob_id + (base_id or b"")


Payload = Any  # what is sealed, any bytes-like object: the data itself when raw, or a view of a zstd frame


def _kept(data: bytes | memoryview, out: Payload) -> tuple[int, Payload]:
    """zstd when it saves at least 1/32 of the size, else raw (the data itself, not a copy)."""
    if len(out) + (len(data) >> 5) < len(data):
        return KIND_ZSTD, out
    return KIND_RAW, data


def compress(data: bytes | memoryview, level: int) -> tuple[int, Payload]:
    """(kind, payload): zstd when it saves at least 1/32 of the size, else raw."""
    if level <= 0 or len(data) < 64:
        return KIND_RAW, data
    return _kept(data, _compressor(level).compress(data))


def sampled_size(data: bytes | memoryview, level: int) -> int | None:
    """About what ``compress`` would store for ``data``, from an eighth of it: eight evenly spaced 16 KiB
    stripes compressed as one frame, scaled up (None below 256 KiB, where sampling saves too little).

    On 313 changed 1 MiB chunks of PostgreSQL copies it came within 0.99-1.2 times the real size for 95 % of
    them (the largest, 3.5 times: content the stripes lacked repeated theirs), at an eighth of the time.
    """
    n = len(data)
    if n < SAMPLE_STRIPES * SAMPLE_WIDTH * 2 or level <= 0:
        return None
    mv = memoryview(data)
    step = n // SAMPLE_STRIPES
    sample = b"".join(mv[i * step : i * step + SAMPLE_WIDTH] for i in range(SAMPLE_STRIPES))
    return len(_compressor(level).compress(sample)) * n // len(sample)


def compress_many(datas: list[bytes | memoryview], level: int) -> list[tuple[int, Payload]]:
    """``compress`` of each, the same frames, in one native call.

    A tree of small files is tens of thousands of chunks, and compressing each
    released the interpreter lock once: on two cores each release handed it to
    another thread: three quarters of an initial backup's context switches.
    Under an address-space limit (ulimit -v), where malloc fails rather than the kernel overcommitting, each
    is compressed by itself: python-zstandard's batch call mishandles a failed allocation with two threads at
    work (a backup under a tight limit crashed, SIGSEGV or glibc's heap-corruption abort, in about one run in
    five), where compressing chunk by chunk raises MemoryError.
    """
    todo = [i for i, d in enumerate(datas) if len(d) >= 64] if level > 0 else []
    c = _compressor(level) if todo else None
    if len(todo) < 2 or not hasattr(c, "multi_compress_to_buffer") or address_space_limited():
        return [compress(d, level) for d in datas]
    out: list[tuple[int, Payload]] = [(KIND_RAW, d) for d in datas]
    frames = c.multi_compress_to_buffer([datas[i] for i in todo])
    for k, i in enumerate(todo):
        out[i] = _kept(datas[i], frames[k])  # a view of the frame in zstd's buffer: sealing reads it there
    return out


# Delta frames reference their dictionary as a prefix.  The matches of a delta changed in place are found
# by chunkvault's own finder (zstdbuf.compress_matched); the others by zstd, with long-distance matching
# (matches of at least DELTA_LDM_MIN_MATCH bytes, found from one position in 2**DELTA_LDM_HASH_RATE_LOG).
# Against a dictionary loaded in full (every position indexed by zstd's regular match finder, about half of
# a delta's encoding time), measured on database versions and edited files: PostgreSQL page deltas 9 %
# smaller, encoded 7 % faster, their zstd part decoded about a fifth faster; SQLite's 2 % larger and encoded
# 16 % faster; whole-base deltas of files with insertions 17 % smaller and encoded 43 % faster
# (bench/RESULTS.md, "Database differentials").
DELTA_LDM_MIN_MATCH = 128
DELTA_LDM_HASH_RATE_LOG = 7


def _dict_compress(data: bytes | memoryview, content: Plaintext, level: int) -> bytes:
    """One zstd frame (content size recorded); ``content`` is its raw dictionary when not empty."""
    if not len(content):
        return _compressor(level).compress(data)
    return compress_against(data, content, level, DELTA_LDM_MIN_MATCH, DELTA_LDM_HASH_RATE_LOG)


def _against(data: bytes | memoryview, content: Plaintext, level: int, in_place: bool) -> bytes:
    """A zstd frame of ``data`` with ``content`` as raw dictionary; for data laid out against its dictionary
    byte for byte (``in_place``), the matches found by chunkvault's finder (bench/RESULTS.md, "Deltas of
    pages changed in place find their own matches")."""
    if in_place and len(content) and can_match():
        return compress_matched(data, content, level)
    return _dict_compress(data, content, level)


# Block maps are bytes: one byte per block, 1 where the block is selected.
_BITS = bytes.maketrans(b"\x00\x01", b"01")
_FROM_BITS = bytes.maketrans(b"01", b"\x00\x01")


def _inside(length: int, base_length: int, nblocks: int) -> bytes:
    """Per block of a ``length``-byte plaintext: does its range lie inside the base?"""
    if length <= base_length:
        return b"\x01" * nblocks
    whole = min(base_length // BLOCK_SIZE, nblocks - 1)  # the last block ends at ``length``, past the base
    return b"\x01" * whole + bytes(nblocks - whole)


def _both(a: bytes, b: bytes) -> bytes:
    """The blocks selected in both maps."""
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _pack_bits(mask: bytes) -> bytes:
    """A block map as bits, first block in the high bit of the first byte, padded with zeros."""
    if not mask:
        return b""
    pad = -len(mask) % 8
    return (int(mask.translate(_BITS), 2) << pad).to_bytes((len(mask) + pad) // 8, "big")


def _unpack_bits(bitmap: bytes | memoryview, nblocks: int) -> bytes:
    if not nblocks:
        return b""
    bits = int.from_bytes(bitmap, "big") >> (len(bitmap) * 8 - nblocks)
    return format(bits, f"0{nblocks}b").encode().translate(_FROM_BITS)


def _changed_reference(data: bytes | memoryview, base: bytes | memoryview, nblocks: int) -> bytes:
    """Per block of ``data``: must it be stored (it differs from the base's bytes over its range, or lies
    past the base's end)?"""
    n, data, base = len(data), memoryview(data), memoryview(base)
    out = bytearray(b"\x01" * nblocks)
    for i in range(nblocks):
        end = min((i + 1) * BLOCK_SIZE, n)
        if end <= len(base) and data[i * BLOCK_SIZE : end] == base[i * BLOCK_SIZE : end]:
            out[i] = 0
    return bytes(out)


def _equal_share_reference(data: bytes | memoryview, base: bytes | memoryview) -> float:
    """The share of the 8-byte words of the whole blocks present in both that are equal at the same offset."""
    length = min(len(data), len(base)) // BLOCK_SIZE * BLOCK_SIZE
    if not length:
        return 0.0
    new, old = memoryview(data)[:length].cast("Q"), memoryview(base)[:length].cast("Q")
    return sum(a == b for a, b in zip(new, old)) / (length // 8)


def _gather_reference(buf: bytes | memoryview, length: int, mask: bytes) -> bytes:
    """The bytes of the selected blocks of ``buf[:length]``, in order (all must lie inside ``buf``)."""
    mv = memoryview(buf)
    return b"".join(mv[i * BLOCK_SIZE : min((i + 1) * BLOCK_SIZE, length)] for i, on in enumerate(mask) if on)


def _changed(data: bytes | memoryview, base: bytes | memoryview, nblocks: int) -> bytes:
    if _blocks is None:
        return _changed_reference(data, base, nblocks)
    return _blocks.changed_blocks(data, base, BLOCK_SIZE)


def _equal_share(data: bytes | memoryview, base: bytes | memoryview) -> float:
    if _blocks is None:
        return _equal_share_reference(data, base)
    length = min(len(data), len(base)) // BLOCK_SIZE * BLOCK_SIZE
    return _blocks.equal_words(data, base, length) / (length // 8) if length else 0.0


def _gather(buf: bytes | memoryview, length: int, mask: bytes) -> bytes:
    if _blocks is None:
        return _gather_reference(buf, length, mask)
    return _blocks.gather_blocks(buf, length, mask, BLOCK_SIZE)


def delta_compress(data: bytes | memoryview, base_plain: Plaintext, level: int) -> bytes:
    """A delta payload of ``data`` against ``base_plain``.

    The changed blocks only (method 1), which costs time in proportion to what
    changed, so in-place updates (database pages) are cheap; when more than
    half of the blocks differ, the whole base serves as dictionary (method 0).
    """
    n = len(data)
    nb = -(-n // BLOCK_SIZE)
    stored = _changed(data, base_plain, nb)
    if nb and stored.count(1) > nb * BLOCKS_FALLBACK_SHARE:
        in_place = _equal_share(data, base_plain) > IN_PLACE_SHARE
        return bytes((DELTA_DICT,)) + _against(data, base_plain, level, in_place)
    taken = stored if n <= len(base_plain) else _both(stored, _inside(n, len(base_plain), nb))
    frame = _against(_gather(data, n, stored), _gather(base_plain, n, taken), level, True)
    return bytes((DELTA_BLOCKS,)) + _LENGTH.pack(n) + _pack_bits(stored) + frame


def _trim(mask: bytes, length: int) -> int:
    """Bytes past ``length`` in the selected blocks: the unused end of a selected partial last block."""
    tail = length % BLOCK_SIZE
    return BLOCK_SIZE - tail if tail and len(mask) and mask[-1] else 0


def _block_buffer(length: int) -> bytearray:
    """Room for ``length`` bytes rounded up to whole blocks, the bytes past ``length`` zero."""
    size = -(-length // BLOCK_SIZE) * BLOCK_SIZE
    buf = empty_buffer(size)
    buf[length:] = bytes(size - length)
    return buf


class _Plain:
    """A plaintext being rebuilt up a delta chain: the bytes of a whole blob, or one buffer of whole blocks
    (zeros past the end) that block deltas rewrite in place, so a chain costs about what changed along it
    rather than its length times the chunk."""

    __slots__ = ("data", "buf", "length")

    def __init__(self, data: Plaintext | None, buf: bytearray | None = None, length: int = 0):
        self.data = data
        self.buf = buf
        self.length = len(data) if data is not None else length

    @classmethod
    def decompressed(cls, frame: bytes | memoryview, prefix: memoryview | bytes = b"") -> "_Plain":
        """A zstd frame decompressed straight into a block buffer (``prefix``: its raw-content dictionary)."""
        size = frame_size(frame)
        buf = _block_buffer(size)
        decompress_into(frame, buf, size, prefix)
        return cls(None, buf, size)

    def view(self) -> Plaintext:
        return self.data if self.data is not None else memoryview(self.buf)[: self.length]

    def result(self) -> Plaintext:
        return self.data if self.data is not None else memoryview(self.buf)[: self.length].toreadonly()

    def blocks_for(self, length: int, nblocks: int) -> bytearray:
        """The buffer resized to ``nblocks`` blocks and zero past ``length``, ready to be updated in place."""
        old = self.buf
        if old is None or len(old) != nblocks * BLOCK_SIZE:
            keep = min(length, self.length)
            self.buf = bytearray(nblocks * BLOCK_SIZE)
            self.buf[:keep] = memoryview(old if old is not None else self.data)[:keep]
        elif length < self.length:
            old[length:] = bytes(len(old) - length)
        self.data = None
        return self.buf


def _apply_blocks(payload: memoryview, plain: _Plain) -> None:
    if _blocks is None:
        _apply_blocks_reference(payload, plain)
        return
    n, pos, stored, taken, size = _blocks.block_map(payload, plain.length, BLOCK_SIZE)
    buf = plain.blocks_for(n, len(stored))
    dictionary = _blocks.gather_blocks(buf, n, taken, BLOCK_SIZE)
    new = empty_buffer(size)
    decompress_into(payload[pos:], new, size, dictionary)
    _blocks.scatter_blocks(buf, new, stored, n, BLOCK_SIZE)
    plain.length = n


def _apply_blocks_reference(payload: memoryview, plain: _Plain) -> None:
    if len(payload) < 1 + _LENGTH.size:
        raise ValueError("truncated block delta")
    (n,) = _LENGTH.unpack_from(payload, 1)
    nb = -(-n // BLOCK_SIZE)
    pos = 1 + _LENGTH.size + -(-nb // 8)
    if len(payload) < pos:
        raise ValueError("truncated block map")
    bitmap = payload[1 + _LENGTH.size : pos]
    if nb % 8 and payload[pos - 1] & (0xFF >> nb % 8):
        raise ValueError("block map has bits past its last block")
    stored = _unpack_bits(bitmap, nb)
    if n <= plain.length:  # every block lies inside the base
        taken = stored
    else:
        inside = _inside(n, plain.length, nb)
        if any(not (s or i) for s, i in zip(stored, inside)):
            raise ValueError("a block taken from the base lies outside it")
        taken = _both(stored, inside)
    count = stored.count(1)
    size = count * BLOCK_SIZE - _trim(stored, n)
    buf = plain.blocks_for(n, nb)
    dictionary = _gather(buf, n, taken)
    new = bytearray(count * BLOCK_SIZE)
    decompress_into(payload[pos:], new, size, dictionary)
    at = 0
    for i, on in enumerate(stored):
        if on:
            buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = new[at : at + BLOCK_SIZE]
            at += BLOCK_SIZE
    plain.length = n


def _apply_delta(payload: bytes | memoryview, plain: _Plain) -> _Plain:
    """The delta's plaintext, made from the base's (updated in place or replaced); ValueError when malformed."""
    payload = memoryview(payload)
    if payload[:4] == ZSTD_MAGIC:  # the first releases' method 0, without its method byte (store/FORMAT.md)
        return _Plain.decompressed(payload, plain.view())
    if not payload or payload[0] not in DELTA_METHODS:
        raise ValueError("unknown delta method")
    if payload[0] == DELTA_BLOCKS:
        _apply_blocks(payload, plain)
        return plain
    return _Plain.decompressed(payload[1:], plain.view())


def delta_decompress(payload: bytes | memoryview, base_plain: Plaintext) -> Plaintext:
    """Plaintext of a delta payload, given its base's plaintext; ValueError or ZstdError when malformed."""
    return _apply_delta(payload, _Plain(base_plain)).result()


def seal_blob(sealer: Sealer, blob_id: bytes, kind: int, payload: bytes | memoryview,
              base_id: bytes | None = None) -> bytes | bytearray:
    if (kind == KIND_DELTA) != (base_id is not None):
        raise ValueError("a delta blob needs a base id, and only a delta blob")
    return sealer.seal_after(bytes((kind,)) + (base_id or b""), payload, blob_ad(kind, blob_id, base_id))


def seal_whole_blobs(sealer: Sealer, blobs: list[tuple[bytes, int, bytes | memoryview]]) -> list[bytes | bytearray]:
    """``seal_blob`` of each (blob id, kind, payload) of blobs stored whole, sealed in one loop."""
    if any(kind == KIND_DELTA for _, kind, _ in blobs):
        raise ValueError("a delta blob needs a base id, and only a delta blob")
    return sealer.seal_many_after([(_KIND_BYTES[kind], payload, blob_ad(kind, blob_id, None))
                                   for blob_id, kind, payload in blobs])


def envelope_base(envelope: bytes | memoryview) -> bytes | None:
    """The base id a delta envelope names (None for whole blobs, and for an envelope too short to name one:
    an index entry's length cut it, and opening it names the blob); no key needed."""
    if not envelope or envelope[0] not in KINDS or (envelope[0] == KIND_DELTA and len(envelope) < 1 + ID_SIZE):
        return None
    if envelope[0] == KIND_DELTA:
        return bytes(envelope[1 : 1 + ID_SIZE])
    return None


def open_envelope(sealer: Sealer, blob_id: bytes, envelope: bytes | memoryview) -> tuple[int, bytes]:
    """(kind, payload) of an envelope, authenticated; CorruptObject naming the blob otherwise."""
    name = "blob " + blob_id.hex()
    env = memoryview(envelope)
    if len(env) < ENVELOPE_OVERHEAD or env[0] not in KINDS:
        raise CorruptObject(name, "not a blob envelope")
    kind = env[0]
    base_id = None
    body = env[1:]
    if kind == KIND_DELTA:
        if len(env) < ENVELOPE_OVERHEAD + ID_SIZE:
            raise CorruptObject(name, "truncated delta envelope")
        base_id = bytes(env[1 : 1 + ID_SIZE])
        body = env[1 + ID_SIZE :]
    try:
        return kind, sealer.open(body, blob_ad(kind, blob_id, base_id))
    except AuthenticationFailed:
        raise CorruptObject(name, "authentication failed (tampered, truncated or stored under the wrong id)") from None


def _declared_length(kind: int, payload: bytes | memoryview) -> int | None:
    """The plaintext length a payload says it decodes to, read from its header alone (None where it says
    none, or its header is malformed: decoding it names that).  Checked against the indexed length before
    decoding allocates it: a frame recording 1 GiB in a blob of a few kilobytes ran a restore out of memory."""
    try:
        if kind == KIND_RAW:
            return len(payload)
        if kind == KIND_ZSTD:
            size = zstandard.frame_content_size(payload)
        elif payload[:4] == ZSTD_MAGIC:
            size = zstandard.frame_content_size(payload)
        elif payload[:1] == bytes((DELTA_BLOCKS,)) and len(payload) >= 1 + _LENGTH.size:
            size = _LENGTH.unpack_from(payload, 1)[0]
        elif payload[:1] == bytes((DELTA_DICT,)):
            size = zstandard.frame_content_size(payload[1:])
        else:
            return None
    except zstandard.ZstdError:
        return None
    return size if size >= 0 else None


def open_chain(sealer: Sealer, chain: list[tuple[bytes, bytes | memoryview, int | None]],
               base_plain: Plaintext | None = None) -> Plaintext:
    """Plaintext of ``chain[0]``.

    ``chain`` lists (blob id, envelope, raw length or None) of a blob and then
    its bases in order, down to a whole blob, or down to the blob whose
    plaintext ``base_plain`` is.  Raises CorruptObject naming the blob that
    does not verify.
    """
    plain = None if base_plain is None else _Plain(base_plain)
    for above, (blob_id, envelope, raw_length) in enumerate(reversed(chain), 1 - len(chain)):
        name = "blob " + blob_id.hex()
        kind, payload = open_envelope(sealer, blob_id, envelope)
        if kind == KIND_DELTA and plain is None:
            raise ValueError("delta blob opened without its base")
        declared = _declared_length(kind, payload)
        if raw_length is not None and declared is not None and declared != raw_length:
            raise CorruptObject(name, f"length {declared} != indexed {raw_length}")
        try:
            if kind == KIND_DELTA:
                assert plain is not None
                plain = _apply_delta(payload, plain)
            elif kind == KIND_RAW:
                plain = _Plain(payload)
            elif above and zstandard.frame_content_size(payload) >= 0:  # deltas follow: into a block buffer
                plain = _Plain.decompressed(payload)
            else:
                plain = _Plain(_decompressor().decompress(payload))
        except (zstandard.ZstdError, ValueError) as exc:
            raise CorruptObject(name, f"bad compressed data: {exc}") from None
        if raw_length is not None and plain.length != raw_length:
            raise CorruptObject(name, f"length {plain.length} != indexed {raw_length}")
    if plain is None:
        raise ValueError("an empty chain")
    return plain.result()


def open_blob(
    sealer: Sealer,
    blob_id: bytes,
    envelope: bytes | memoryview,
    raw_length: int | None = None,
    base_plain: Plaintext | None = None,
) -> Plaintext:
    """Decrypt and decompress one envelope; a delta needs its base's plaintext.

    Raises CorruptObject naming the blob for anything that does not verify.
    """
    return open_chain(sealer, [(blob_id, envelope, raw_length)], base_plain)
