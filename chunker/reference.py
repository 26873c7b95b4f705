"""The chunking algorithm in plain Python: slow, obvious, and the tests' yardstick."""
from __future__ import annotations

from typing import Iterator, Sequence

MASK64 = (1 << 64) - 1


class ReferenceKernel:
    def __init__(self, gear: Sequence[int], min_size: int, normal: int, max_size: int, mask_s: int, mask_l: int):
        self.gear = list(gear)
        self.min, self.normal, self.max = min_size, normal, max_size
        self.mask_s, self.mask_l = mask_s, mask_l

    def find_cut(self, data: memoryview, start: int, final: bool) -> int:
        """Length of the chunk starting at ``start``, or 0 when it is not decided yet."""
        n = len(data) - start
        if n <= self.min:
            return n if final else 0
        limit = min(n, self.max)
        mid = min(self.normal, limit)
        h = 0
        gear = self.gear
        for i in range(self.min, limit):
            h = ((h << 1) + gear[data[start + i]]) & MASK64
            if not h & (self.mask_s if i < mid else self.mask_l):
                return i + 1
        return limit if (limit == self.max or final) else 0

    def cut_points(self, data: memoryview, final: bool) -> Iterator[int]:
        pos = 0
        while pos < len(data):
            c = self.find_cut(data, pos, final)
            if c == 0:
                return
            pos += c
            yield pos
