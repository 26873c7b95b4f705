"""Content-defined chunking: bytes in, cut points out. Knows nothing of storage.

A FastCDC-style gear hash with normalized chunking, keyed by a 32-byte
secret so that chunk boundaries do not fingerprint content.  The C kernel
(`_fastcdc`) does every per-byte step with the GIL released; `reference`
is the same algorithm in plain Python, for tests.  The algorithm is
specified in FORMAT.md beside this file; boundaries are part of the
repository format and never change silently.
"""
from __future__ import annotations

import array
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Iterator

import blake3

from . import _fastcdc

__all__ = ["Chunker", "ChunkerParams", "DEFAULT_PARAMS", "UNKEYED_SECRET", "StreamChunker", "gear_table"]

#: The secret of the documented "unkeyed" gear table: for test vectors only.
UNKEYED_SECRET = bytes(32)
GEAR_CONTEXT = b"chunkvault gear table v1"
MIN_CHUNK = 64
MAX_CHUNK = 64 << 20


@dataclass(frozen=True)
class ChunkerParams:
    """Chunk sizes in bytes: ``avg_size`` a power of two, ``min_size < avg_size < max_size``."""

    min_size: int = 256 << 10
    avg_size: int = 1 << 20
    max_size: int = 8 << 20

    def __post_init__(self) -> None:
        for name in ("min_size", "avg_size", "max_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
            if not MIN_CHUNK <= v <= MAX_CHUNK:
                raise ValueError(f"{name}={v} out of range [{MIN_CHUNK}, {MAX_CHUNK}]")
        if self.avg_size & (self.avg_size - 1):
            raise ValueError(f"avg_size={self.avg_size} must be a power of two")
        if not self.min_size < self.avg_size < self.max_size:
            raise ValueError(f"need min_size < avg_size < max_size, got {self.min_size}, {self.avg_size}, {self.max_size}")
        if self.min_size > self.normal_size:
            raise ValueError(f"min_size={self.min_size} must be at most 13/16 of avg_size ({self.normal_size})")

    @property
    def bits(self) -> int:
        return self.avg_size.bit_length() - 1

    @property
    def normal_size(self) -> int:
        """Where the strict mask gives way to the loose one: 13/16 of avg, so the mean lands near avg."""
        return self.avg_size - (self.avg_size >> 3) - (self.avg_size >> 4)

    @property
    def mask_strict(self) -> int:
        return _top_bits(self.bits + 2)

    @property
    def mask_loose(self) -> int:
        return _top_bits(max(self.bits - 2, 1))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChunkerParams":
        try:
            return cls(int(d["min_size"]), int(d["avg_size"]), int(d["max_size"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad chunker parameters {d!r}") from exc


def _top_bits(n: int) -> int:
    """A mask of the ``n`` most significant bits of a 64-bit word (they depend on the last 64 bytes)."""
    return ((1 << n) - 1) << (64 - n)


DEFAULT_PARAMS = ChunkerParams()


def _check_secret(secret: Any) -> bytes:
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    secret = bytes(secret)
    if len(secret) != 32:
        raise ValueError(f"secret must be 32 bytes, got {len(secret)}")
    return secret


def gear_table_bytes(secret: bytes) -> bytes:
    """2048 bytes: BLAKE3 keyed with the secret, XOF over the context string."""
    return blake3.blake3(GEAR_CONTEXT, key=_check_secret(secret)).digest(length=2048)


def gear_table(secret: bytes) -> tuple[int, ...]:
    raw = gear_table_bytes(secret)
    return tuple(int.from_bytes(raw[i : i + 8], "little") for i in range(0, 2048, 8))


def _as_buffer(data: Any) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("data must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Chunker:
    """Cuts data into content-defined chunks for one secret and one parameter set."""

    def __init__(self, secret: bytes, params: ChunkerParams = DEFAULT_PARAMS, *, implementation: str = "c"):
        if not isinstance(params, ChunkerParams):
            raise TypeError("params must be a ChunkerParams")
        if implementation not in ("c", "python"):
            raise ValueError("implementation must be 'c' or 'python'")
        self.params = params
        self.implementation = implementation
        self._gear = gear_table_bytes(secret)
        p = params
        self._args = (p.min_size, p.normal_size, p.max_size, p.mask_strict, p.mask_loose)
        if implementation == "python":
            from .reference import ReferenceKernel

            self._ref = ReferenceKernel(gear_table(secret), *self._args)

    def _cuts(self, view: memoryview, final: bool) -> array.array:
        out = array.array("Q")
        if self.implementation == "c":
            out.frombytes(_fastcdc.cut_points(self._gear, view, *self._args, final))
        else:
            out.extend(self._ref.cut_points(view, final))
        return out

    def cut_points(self, data: Any) -> array.array:
        """End offsets of every chunk of ``data`` taken as a complete stream."""
        return self._cuts(_as_buffer(data), True)

    def stream(self) -> "StreamChunker":
        return StreamChunker(self)

    def chunks(self, fileobj: BinaryIO, bufsize: int = 8 << 20) -> Iterator[bytes]:
        """Each chunk of a binary stream, read in bounded memory; cuts equal ``cut_points`` of the whole."""
        size = max(int(bufsize), 2 * self.params.max_size)
        buf = bytearray(size)
        view = memoryview(buf)
        filled = 0
        eof = False
        while True:
            while not eof and filled < size:
                n = fileobj.readinto(view[filled:])
                if not n:
                    eof = True
                else:
                    filled += n
            if filled == 0:
                return
            start = 0
            for end in self._cuts(view[:filled], eof):
                yield bytes(view[start:end])
                start = end
            if eof:
                return
            buf[: filled - start] = view[start:filled]
            filled -= start


class StreamChunker:
    """Incremental chunking: feed buffers of any size, get the lengths of chunks completed so far."""

    def __init__(self, chunker: Chunker):
        self._chunker = chunker
        self._pending = bytearray()
        self._done = False

    def feed(self, data: Any) -> array.array:
        """Lengths of the chunks that ``data`` completes (cut decided), in order."""
        if self._done:
            raise ValueError("feed() after finish()")
        self._pending += _as_buffer(data)
        return self._take(False)

    def finish(self) -> array.array:
        """Lengths of the remaining chunks (at most one partial) at the end of the stream."""
        if self._done:
            raise ValueError("finish() called twice")
        self._done = True
        return self._take(True)

    def _take(self, final: bool) -> array.array:
        cuts = self._chunker._cuts(memoryview(self._pending), final)
        lengths = array.array("Q")
        prev = 0
        for c in cuts:
            lengths.append(c - prev)
            prev = c
        del self._pending[:prev]
        return lengths
