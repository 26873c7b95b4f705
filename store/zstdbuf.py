"""zstd decompression straight into a caller's buffer, against a raw-content prefix read where it lies.

Rebuilding a chunk up a delta chain decompresses one frame per delta, each
with part of the plaintext below as its dictionary.  python-zstandard's
object API copies each dictionary, builds a new decompression context for it
and returns a new bytes object, all with the GIL held for the copies.
libzstd's ``ZSTD_DCtx_refPrefix`` reads the dictionary in place and
``ZSTD_decompressDCtx`` writes into the caller's buffer; the cffi binding
python-zstandard ships (cffi comes with ``cryptography``) exposes both and
releases the GIL for every call.  Where that binding cannot be imported, the
object API does the same work with the copies.

Delta frames are compressed the same way (``compress_against``): one context
per thread, reused, the base's bytes referenced as a prefix, long-distance
matching on (see ``store/blob.py`` for why).  The matches of a delta whose
pages changed in place are found by chunkvault's own finder instead
(``compress_matched``, ``store/_deltamatch.c``) and only entropy-coded by zstd:
the same frame format, in a quarter of the time.
"""
from __future__ import annotations

import threading
from typing import Any

import zstandard

try:
    from zstandard._cffi import ffi, lib
except ImportError:  # a python-zstandard built without its cffi backend
    ffi = lib = None
try:
    from . import _deltamatch
except ImportError:  # built without its C extensions
    _deltamatch = None

_local = threading.local()
# ZSTD_decompress_usingDict takes content that starts with this for a structured dictionary.
_DICTIONARY_MAGIC = b"\x37\xa4\x30\xec"
# libzstd's error codes are the largest size_t values; testing for them here, not through ZSTD_isError, saves
# a GIL release and reacquire per call (the binding releases it for every call).
_ERRORS_ABOVE = (1 << 8 * ffi.sizeof("size_t")) - lib.ZSTD_error_maxCode if lib is not None else 0


def frame_size(frame: bytes | memoryview) -> int:
    """The content size a frame's header records; ValueError when it records none."""
    size = zstandard.frame_content_size(frame)
    if size < 0:
        raise ValueError("zstd frame without content size")
    return size


def _created(context: Any, free: Any) -> Any:
    """A context libzstd just created, freed with the object; MemoryError when the allocation failed: libzstd
    answers NULL, which every call then dereferences (a process under ulimit -v died of SIGSEGV)."""
    if context == ffi.NULL:
        raise MemoryError("zstd could not allocate a context")
    return ffi.gc(context, free)


def _dctx() -> Any:
    # A decompression context is not thread-safe: one per thread, reused for every frame.
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = _created(lib.ZSTD_createDCtx(), lib.ZSTD_freeDCtx)
    return d


def _check(code: int) -> int:
    if code > _ERRORS_ABOVE:
        raise ValueError(ffi.string(lib.ZSTD_getErrorName(code)).decode())
    return code


def _cctx(key: tuple[Any, ...]) -> Any:
    """One compression context per thread and ``key``, set up once; a frame's window is set per call.

    ("ldm", level, ldm min match, ldm hash rate log): zstd finds the matches, long-distance matching on.
    ("sequences", level): for ZSTD_compressSequences, the level's literal and sequence coding, match tables at
    their minimum (unused)."""
    cache = getattr(_local, "cctxs", None)
    if cache is None:
        cache = _local.cctxs = {}
    c = cache.get(key)
    if c is None:
        level = key[1]
        if key[0] == "ldm":
            params = ((lib.ZSTD_c_enableLongDistanceMatching, 1), (lib.ZSTD_c_ldmMinMatch, key[2]),
                      (lib.ZSTD_c_ldmHashRateLog, key[3]))
        else:
            params = ((lib.ZSTD_c_blockDelimiters, lib.ZSTD_sf_noBlockDelimiters),
                      (lib.ZSTD_c_hashLog, lib.ZSTD_HASHLOG_MIN), (lib.ZSTD_c_chainLog, lib.ZSTD_CHAINLOG_MIN))
        c = _created(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        for param, value in ((lib.ZSTD_c_compressionLevel, level), (lib.ZSTD_c_contentSizeFlag, 1), *params):
            _check(lib.ZSTD_CCtx_setParameter(c, param, value))
        cache[key] = c
    return c


def empty_buffer(size: int) -> bytearray:
    """``size`` bytes to be overwritten: left uninitialized, so only the pages written become resident (zeroed
    when the C helpers are not built)."""
    return _deltamatch.uninitialized(size) if _deltamatch is not None else bytearray(size)


def _sequence_buffer(size: int) -> bytearray:
    # Room for the most sequences ``size`` bytes can hold (four uint32 each).
    need = _deltamatch.max_sequences(size) * 16
    buf = getattr(_local, "seqs", None)
    if buf is None or len(buf) < need:
        buf = _local.seqs = empty_buffer(need)
    return buf


def _out_buffer(size: int) -> bytearray:
    buf = getattr(_local, "out", None)
    if buf is None or len(buf) < size:
        buf = _local.out = bytearray(size)
    return buf


def _window_log(prefix_size: int, size: int) -> int:
    """The smallest window that reaches from the end of the data back to the start of its prefix."""
    return max(10, (prefix_size + size - 1).bit_length())


def compress_against(data: bytes | memoryview, prefix: Any, level: int, ldm_min_match: int,
                     ldm_hash_rate_log: int) -> bytes:
    """One zstd frame of ``data`` (content size recorded), ``prefix`` its raw-content dictionary, with
    long-distance matching; ``decompress_into`` with the same prefix reads it."""
    wlog = _window_log(len(prefix), len(data))
    if lib is None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=wlog, enable_ldm=True, ldm_min_match=ldm_min_match,
            ldm_hash_rate_log=ldm_hash_rate_log, write_content_size=True)
        raw = zstandard.ZstdCompressionDict(bytes(prefix), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdCompressor(compression_params=params, dict_data=raw).compress(data)
    key = ("ldm", level, ldm_min_match, ldm_hash_rate_log)
    c = _cctx(key)
    try:
        _check(lib.ZSTD_CCtx_setParameter(c, lib.ZSTD_c_windowLog, wlog))
        if len(prefix):
            _check(lib.ZSTD_CCtx_refPrefix_advanced(c, ffi.from_buffer(prefix), len(prefix),
                                                    lib.ZSTD_dct_rawContent))
        cap = lib.ZSTD_compressBound(len(data))
        out = _out_buffer(cap)
        n = _check(lib.ZSTD_compress2(c, ffi.from_buffer(out), cap, ffi.from_buffer(data), len(data)))
    except BaseException:
        _local.cctxs.pop(key, None)  # it may still reference the prefix: never reuse it
        raise
    return bytes(memoryview(out)[:n])


def can_match() -> bool:
    """Is ``compress_matched`` available (the finder built, libzstd's calls reachable through cffi)?"""
    return lib is not None and _deltamatch is not None


def compress_matched(data: bytes | memoryview, prefix: Any, level: int) -> bytes:
    """One zstd frame of ``data`` (content size recorded) with ``prefix`` as raw-content dictionary, for data laid
    out against its prefix byte for byte (a delta of pages changed in place): chunkvault's finder picks the
    matches, zstd codes them.  Needs ``can_match()``.

    zstd's own check of external sequences stays off: it does not count a referenced prefix as reachable and
    refuses every match into it.  The finder's sequences are held to zstd's rules by the tests instead, which
    rebuild the data from them independently."""
    seqs = _sequence_buffer(len(data))
    count = _deltamatch.find(prefix, data, seqs)
    key = ("sequences", level)
    c = _cctx(key)
    try:
        _check(lib.ZSTD_CCtx_reset(c, lib.ZSTD_reset_session_only))  # ZSTD_compressSequences leaves it mid-frame
        _check(lib.ZSTD_CCtx_setParameter(c, lib.ZSTD_c_windowLog, _window_log(len(prefix), len(data))))
        _check(lib.ZSTD_CCtx_refPrefix_advanced(c, ffi.from_buffer(prefix), len(prefix), lib.ZSTD_dct_rawContent))
        cap = lib.ZSTD_compressBound(len(data))
        out = _out_buffer(cap)
        n = _check(lib.ZSTD_compressSequences(c, ffi.from_buffer(out), cap,
                                              ffi.cast("ZSTD_Sequence *", ffi.from_buffer(seqs)), count,
                                              ffi.from_buffer(data), len(data)))
    except BaseException:
        _local.cctxs.pop(key, None)  # it may still reference the prefix: never reuse it
        raise
    return bytes(memoryview(out)[:n])


def decompress_into(frame: bytes | memoryview, out: Any, size: int, prefix: Any = b"") -> None:
    """Decompress ``frame`` into the first ``size`` bytes of the writable buffer ``out``, with ``prefix`` (a
    buffer) as raw-content dictionary when not empty.  ValueError unless the frame holds exactly ``size`` bytes."""
    if lib is None:
        _decompress_into_copying(frame, out, size, prefix)
        return
    dst = ffi.from_buffer(out, require_writable=True)
    if len(dst) < size:
        raise ValueError(f"a buffer of {len(dst)} bytes cannot hold {size}")
    d = _dctx()
    src = ffi.from_buffer(frame)
    if len(prefix) and bytes(prefix[:4]) != _DICTIONARY_MAGIC:  # one call where a plain dictionary would do
        dictionary = ffi.from_buffer(prefix)
        n = _check(lib.ZSTD_decompress_usingDict(d, dst, size, src, len(src), dictionary, len(dictionary)))
    else:
        if len(prefix):  # content that looks like a structured dictionary: declared raw
            dictionary = ffi.from_buffer(prefix)
            _check(lib.ZSTD_DCtx_refPrefix_advanced(d, dictionary, len(dictionary), lib.ZSTD_dct_rawContent))
        n = _check(lib.ZSTD_decompressDCtx(d, dst, size, src, len(src)))
    if n != size:
        raise ValueError(f"frame holds {n} bytes, expected {size}")


def _decompress_into_copying(frame: bytes | memoryview, out: Any, size: int, prefix: Any) -> None:
    declared = frame_size(frame)
    if declared != size:
        raise ValueError(f"frame holds {declared} bytes, expected {size}")
    if len(prefix):
        raw = zstandard.ZstdCompressionDict(bytes(prefix), dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        d = zstandard.ZstdDecompressor(dict_data=raw)
    else:
        d = zstandard.ZstdDecompressor()
    data = d.decompress(frame, max_output_size=size)
    if len(data) != size:
        raise ValueError(f"frame holds {len(data)} bytes, expected {size}")
    memoryview(out).cast("B")[:size] = data
