"""Pure-Python reference of the cut-point algorithm, written as plainly as FORMAT.md.

Slow (a few MB/s); it exists so the C extension can be checked against an
independent, obviously-correct statement of the same rules.
"""
from __future__ import annotations

from array import array
from typing import Sequence

from .params import GEAR_WINDOW, ChunkerParams

_M64 = (1 << 64) - 1


class ReferenceStream:
    """Per-byte state machine: (hash, length of the current chunk)."""

    def __init__(self, gear: Sequence[int], params: ChunkerParams):
        if len(gear) != 256:
            raise ValueError("gear table must have 256 entries")
        self._gear = tuple(gear)
        self._min = params.min_size
        self._max = params.max_size
        self._normal = params.normal_size
        self._mask_s = params.mask_s
        self._mask_l = params.mask_l
        self._h = 0
        self._pos = 0

    @property
    def pending(self) -> int:
        """Bytes of the chunk not yet completed."""
        return self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> array:
        """Lengths of the chunks that end inside `data`."""
        mv = memoryview(data).cast("B")
        out = array("Q")
        gear, lo, hi, normal = self._gear, self._min, self._max, self._normal
        mask_s, mask_l = self._mask_s, self._mask_l
        h, pos = self._h, self._pos
        i, n = 0, len(mv)
        hash_from = lo - GEAR_WINDOW
        while i < n:
            if pos < hash_from:
                # Bytes before min_size - 64 never reach a tested hash; h stays 0.
                step = min(hash_from - pos, n - i)
                pos += step
                i += step
                continue
            h = ((h << 1) + gear[mv[i]]) & _M64
            pos += 1
            i += 1
            if pos == hi or (pos >= lo and h & (mask_s if pos <= normal else mask_l) == 0):
                out.append(pos)
                h = pos = 0
        self._h, self._pos = h, pos
        return out

    def finish(self) -> array:
        """The last, partial chunk's length (if any); the stream starts afresh."""
        out = array("Q", [self._pos] if self._pos else [])
        self._h = self._pos = 0
        return out


def reference_cut_points(data: bytes | bytearray | memoryview, gear: Sequence[int],
                         params: ChunkerParams) -> array:
    """End offsets of all chunks of `data` as one complete stream."""
    s = ReferenceStream(gear, params)
    out = array("Q")
    total = 0
    for length in list(s.feed(data)) + list(s.finish()):
        total += length
        out.append(total)
    return out
