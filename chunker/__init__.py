"""Content-defined chunking: bytes in, cut points out. Knows nothing of storage.

A FastCDC-style gear hash with normalized chunking, keyed by a 32-byte secret
so that chunk boundaries do not fingerprint content.  The C kernel
(``_fastcdc``) does every per-byte step with the GIL released; ``reference``
is the same algorithm in plain Python, for tests.  The algorithm is specified
in FORMAT.md beside this file: boundaries are part of the repository format
and never change silently.
"""
from __future__ import annotations

from array import array
from typing import Any, BinaryIO, Iterator, Union

import blake3

from . import _fastcdc
from .params import DEFAULT_PARAMS, ChunkerParams
from .reference import ReferenceStream, reference_cut_points

__all__ = [
    "Chunker",
    "ChunkerParams",
    "DEFAULT_PARAMS",
    "GEAR_CONTEXT",
    "READ_BYTES",
    "TOLD_HOLE_BYTES",
    "Stream",
    "StreamChunker",
    "UNKEYED_SECRET",
    "gear_table",
    "gear_table_bytes",
]

#: The secret of the documented "unkeyed" gear table: for test vectors only,
#: never for a repository (its boundaries would be the same for everyone).
UNKEYED_SECRET = bytes(32)
#: Input of the keyed BLAKE3 XOF that yields the gear table.
GEAR_CONTEXT = b"chunkvault chunker gear table v1"

Buffer = Union[bytes, bytearray, memoryview, Any]


def _check_secret(secret: Any) -> bytes:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"chunker secret must be bytes, not {type(secret).__name__}")
    if len(secret) != 32:
        raise ValueError(f"chunker secret must be 32 bytes, got {len(secret)}")
    return bytes(secret)


def gear_table_bytes(secret: bytes) -> bytes:
    """The 2048-byte table: BLAKE3 keyed with `secret`, XOF output over GEAR_CONTEXT."""
    return blake3.blake3(GEAR_CONTEXT, key=_check_secret(secret)).digest(length=2048)


def gear_table(secret: bytes) -> tuple[int, ...]:
    """The 256 gear values: the table bytes read as little-endian u64."""
    raw = gear_table_bytes(secret)
    return tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(0, 2048, 8))


def _u64_array(raw: bytes) -> array:
    out = array("Q")
    out.frombytes(raw)
    return out


def _byte_view(data: Any) -> memoryview:
    """A flat byte view, with the same errors as the C kernel gives."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("data must be a C-contiguous buffer")
    return view.cast("B") if (view.format, view.ndim) != ("B", 1) else view


class Stream:
    """Chunking state of one stream: feed buffers of any size, in order.

    ``feed`` returns the LENGTHS of the chunks that end inside the buffer just
    fed (the first may have started in earlier buffers); ``finish`` returns the
    length of the last, partial chunk, if any.  Concatenated, these lengths are
    exactly the chunks of ``cut_points`` over the whole stream, wherever the
    buffer boundaries fall.  The state is two integers, so feeding costs no
    copy and no re-scan.
    """

    def __init__(self, impl: Any, python: bool):
        self._impl = impl
        self._python = python

    @property
    def pending(self) -> int:
        """Bytes of the current, unfinished chunk (at most max_size - 1)."""
        return int(self._impl.pending)

    def feed(self, data: Buffer) -> array:
        if self._python:
            return self._impl.feed(_byte_view(data))
        return _u64_array(self._impl.feed(data))

    def finish(self) -> array:
        """The last chunk's length (empty if the stream ended on a cut); the stream starts afresh."""
        if self._python:
            return self._impl.finish()
        return _u64_array(self._impl.finish())


#: Older name of :class:`Stream`.
StreamChunker = Stream


# Default and bounds of ``fixed_chunks``' size: chosen by measurement (bench/RESULTS.md, "Database differentials").
FIXED_CHUNK_SIZE = 1 << 20
READ_BYTES = 8 << 20  # what ``Chunker.chunks`` reads at a time, at most
# A stream tells its holes this long (``zeros_ahead``); shorter ones it gives as data, in long reads.
TOLD_HOLE_BYTES = 1 << 20
FIXED_CHUNK_SIZES = (4 << 10, 16 << 20)


def fixed_chunks(fileobj: BinaryIO, size: int) -> Iterator[bytes]:
    """Each ``size`` bytes of a binary stream (the last chunk shorter): cut at fixed offsets.

    For files updated in place (database pages): a changed chunk then covers
    exactly the bytes its predecessor covered, whatever changed inside it.
    Fixed cuts depend on no content, so they leak nothing either.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    zeros_ahead = getattr(fileobj, "zeros_ahead", None)  # as ``Chunker.chunks`` takes it: a hole given, not read
    zeros = bytes(size) if zeros_ahead is not None else b""
    while True:
        if zeros_ahead is not None and zeros_ahead() >= size:
            fileobj.skip(size)  # type: ignore[attr-defined]
            yield zeros
            continue
        data = fileobj.read(size)
        if not data:
            return
        while len(data) < size:  # a pipe may return less than asked before its end
            more = fileobj.read(size - len(data))
            if not more:
                break
            data += more
        yield data
        if len(data) < size:
            return


class Chunker:
    """Cuts data into content-defined chunks for one secret and one parameter set.

    Immutable and thread-safe: threads may share one Chunker (each stream
    belongs to one thread at a time).
    """

    def __init__(self, secret: bytes, params: ChunkerParams = DEFAULT_PARAMS, *, implementation: str = "c"):
        if not isinstance(params, ChunkerParams):
            raise TypeError(f"params must be a ChunkerParams, not {type(params).__name__}")
        if implementation not in ("c", "python"):
            raise ValueError(f"implementation must be 'c' or 'python', not {implementation!r}")
        raw = gear_table_bytes(secret)
        self.params = params
        self.implementation = implementation
        self._gear = tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(0, 2048, 8))
        self._cutter = _fastcdc.Cutter(raw, params.min_size, params.max_size, params.normal_size,
                                       params.mask_s, params.mask_l)
        self._zero_chunk: bytes | None = None

    @property
    def zero_chunk(self) -> bytes:
        """The chunk a run of zeros is cut into from a cut point on, again and again: the state after a cut is
        fresh, so where a run starts does not matter (one object, computed once)."""
        if self._zero_chunk is None:
            self._zero_chunk = bytes(int(self.cut_points(bytes(self.params.max_size))[0]))
        return self._zero_chunk

    def cut_points(self, data: Buffer) -> array:
        """End offsets of every chunk of `data` taken as a complete stream (last == len(data))."""
        if self.implementation == "python":
            return reference_cut_points(_byte_view(data), self._gear, self.params)
        return _u64_array(self._cutter.cut_points(data))

    def stream(self) -> Stream:
        """Fresh incremental state for one stream (see :class:`Stream`)."""
        if self.implementation == "python":
            return Stream(ReferenceStream(self._gear, self.params), True)
        return Stream(self._cutter.stream(), False)

    def chunks(self, fileobj: BinaryIO, bufsize: int = READ_BYTES, size_hint: int | None = None,
               buffer: bytearray | None = None) -> Iterator[bytes]:
        """Each chunk of a binary stream, read in bounded memory (about bufsize + max_size).

        Cuts equal ``cut_points`` of the whole stream.  ``size_hint`` (e.g. a
        file's size) shrinks the read buffer for small files.  ``buffer``: the
        read buffer to use when it holds that many bytes (its contents are
        overwritten), so that a thread cutting file after file does not
        allocate and zero one per file, with the interpreter lock held; only
        one stream at a time may use it.

        A stream that knows where it holds zeros without reading them (a
        sparse file's holes) has ``zeros_ahead()``, the zero bytes from its
        position on, and ``skip(n)`` past n of them: each whole
        ``zero_chunk`` a hole holds from a cut point on is then given as
        that one object, neither read nor scanned.  The unfinished chunk is
        checked to be zeros before any is skipped, so whatever the reads
        return the cuts are those of reading every byte.
        """
        if not isinstance(bufsize, int) or isinstance(bufsize, bool) or bufsize <= 0:
            raise ValueError(f"bufsize must be a positive int, got {bufsize!r}")
        if size_hint is not None:
            bufsize = min(bufsize, max(int(size_hint) + 1, 64 << 10))
        readinto = getattr(fileobj, "readinto", None)
        if readinto is None:
            raise TypeError(f"chunks() needs a binary stream with readinto(), not {type(fileobj).__name__}")
        stream = self.stream()
        view = memoryview(buffer)[:bufsize] if buffer is not None and len(buffer) >= bufsize else memoryview(
            bytearray(bufsize))
        carry = bytearray()  # the unfinished chunk's bytes from earlier buffers
        zeros_ahead = getattr(fileobj, "zeros_ahead", None)
        while True:
            n = readinto(view)
            if n is None:
                raise BlockingIOError("chunks() needs a blocking stream: readinto() returned None")
            if n == 0:
                break
            data = view[:n]
            start = 0
            for length in stream.feed(data):
                end = start + length - len(carry)
                if carry:
                    carry += data[start:end]
                    yield bytes(carry)
                    carry = bytearray()
                else:
                    yield bytes(data[start:end])
                start = end
            carry += data[start:]
            if zeros_ahead is not None:
                whole = self._zero_chunks_ahead(carry, zeros_ahead())
                if whole:
                    fileobj.skip(whole * len(self.zero_chunk) - len(carry))  # type: ignore[attr-defined]
                    stream.finish()
                    carry = bytearray()
                    for _ in range(whole):
                        yield self.zero_chunk
        if stream.finish():
            yield bytes(carry)

    def _zero_chunks_ahead(self, carry: bytearray, zeros: int) -> int:
        """How many whole ``zero_chunk`` follow the last cut, when the unfinished chunk ``carry`` is zeros
        and ``zeros`` more come: that many cuts, one ``zero_chunk`` apart, are certain without a scan."""
        size = len(self.zero_chunk)
        if zeros < size or (carry and carry != self.zero_chunk[:len(carry)]):
            return 0
        return (len(carry) + zeros) // size
