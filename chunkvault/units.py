"""Sizes as people write them (``256M``, ``1.5G``, ``512k``, ``64MiB``, ``1048576``), and as they are shown."""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from .errors import UsageError

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SIZE = (1 << 63) - 1


def parse_size(text: Any) -> int:
    """A number of bytes (binary units); UsageError for anything else or less than one byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        number = text
    else:
        match = _SIZE.match(str(text).strip())
        if not match or (match.group(2) == "" and "." in match.group(1)):
            raise UsageError(f"not a size: {text!r} (e.g. 256M, 1.5G, 1048576)")
        number = _bytes(match.group(1), _UNITS[match.group(2).lower()])
    if number < 1:
        raise UsageError(f"size must be at least 1 byte, not {text!r}")
    if number > MAX_SIZE:
        raise UsageError(f"size must be at most 8 EiB (what a file offset holds), not {text!r}")
    return number


def _bytes(digits: str, unit: int) -> int:
    """``digits`` (decimal, maybe with a fraction) units, rounded down, exactly: a float holds integers only
    up to 2^53, short of the largest file offset, and hundreds of digits make it infinite.  Digits past the
    40th after the point change no whole byte (one 2^-40 of a TiB has 40); an integer part longer than 40
    digits is past any size, and stands for one without being converted."""
    whole, _, fraction = digits.partition(".")
    whole = whole.lstrip("0") or "0"
    if len(whole) > 40:
        return MAX_SIZE + 1
    return int(Fraction(f"{whole}.{fraction[:40] or 0}") * unit)


def parse_share(value: Any) -> float:
    """A share from 0 to 1, as a fraction (0.05) or a percentage (``"5%"``); UsageError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        t = str(value).strip()
        try:
            v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise UsageError(f"not a share: {value!r} (e.g. 5% or 0.05)") from None
    if not 0 <= v <= 1:
        raise UsageError(f"share out of range (0 to 1, or 0% to 100%): {value!r}")
    return v or 0.0  # "-0" is no other share than 0: stored and shown as 0.0, not -0.0


def format_size(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
