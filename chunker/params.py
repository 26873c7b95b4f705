"""Chunk-size parameters and the values derived from them (masks, normal size).

The derived values are part of the repository format (see FORMAT.md): both
implementations read them from here, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: The gear hash forgets a byte after this many steps (64-bit state, shift by one).
GEAR_WINDOW = 64
#: Bits added to / removed from log2(avg_size) for the masks before / after the normal size.
NORMALIZATION_LEVEL = 2

MIN_SIZE_LOWER = GEAR_WINDOW
MAX_SIZE_UPPER = 64 << 20
AVG_SIZE_LOWER = 256
AVG_SIZE_UPPER = 32 << 20

_KEYS = ("min_size", "avg_size", "max_size")


def _top_bits_mask(bits: int) -> int:
    """A mask of the `bits` most significant bits of a 64-bit word.

    The top bits of a gear hash depend on the most bytes (bit k on the last
    k+1), so testing them makes every cut depend on a full 64-byte window.
    """
    return ((1 << bits) - 1) << (64 - bits)


@dataclass(frozen=True)
class ChunkerParams:
    """Minimum, average and maximum chunk size in bytes (fixed per repository).

    ``avg_size`` is a power of two; the mean chunk length on random data is
    within a few percent of it (see FORMAT.md for why ``normal_size`` is not
    simply ``avg_size``).
    """

    min_size: int = 64 << 10
    avg_size: int = 256 << 10
    max_size: int = 2 << 20

    def __post_init__(self) -> None:
        for key in _KEYS:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"chunker {key} must be an int, not {type(value).__name__}")
        lo, avg, hi = self.min_size, self.avg_size, self.max_size
        if avg < AVG_SIZE_LOWER or avg > AVG_SIZE_UPPER or avg & (avg - 1):
            raise ValueError(
                f"chunker avg_size must be a power of two in [{AVG_SIZE_LOWER}, {AVG_SIZE_UPPER}], got {avg}")
        if lo < MIN_SIZE_LOWER:
            raise ValueError(f"chunker min_size must be at least {MIN_SIZE_LOWER}, got {lo}")
        if hi > MAX_SIZE_UPPER:
            raise ValueError(f"chunker max_size must be at most {MAX_SIZE_UPPER}, got {hi}")
        if not lo < avg < hi:
            raise ValueError(f"chunker sizes must satisfy min_size < avg_size < max_size, got {lo}, {avg}, {hi}")

    @property
    def avg_bits(self) -> int:
        return self.avg_size.bit_length() - 1

    @property
    def mask_s(self) -> int:
        """Stricter mask, tested for chunk lengths up to ``normal_size``."""
        return _top_bits_mask(self.avg_bits + NORMALIZATION_LEVEL)

    @property
    def mask_l(self) -> int:
        """Looser mask, tested for chunk lengths above ``normal_size``."""
        return _top_bits_mask(self.avg_bits - NORMALIZATION_LEVEL)

    @property
    def normal_size(self) -> int:
        """Last chunk length tested with ``mask_s``: avg_size - min_size // 2."""
        return self.avg_size - self.min_size // 2

    def to_dict(self) -> dict[str, int]:
        """The three sizes, for the repository config."""
        return {key: getattr(self, key) for key in _KEYS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChunkerParams":
        """Inverse of :meth:`to_dict`; rejects missing or unknown keys."""
        if not isinstance(d, Mapping):
            raise TypeError(f"chunker parameters must be a mapping, not {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        unknown = sorted(str(k) for k in d if k not in _KEYS)
        if missing or unknown:
            raise ValueError(f"bad chunker parameters: missing {missing}, unknown {unknown}")
        return cls(**{k: d[k] for k in _KEYS})


DEFAULT_PARAMS = ChunkerParams()
