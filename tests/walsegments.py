"""WAL segments for tests that archive without a PostgreSQL: random pages behind the long page header a
server writes, so that ``archive-push`` takes them as the segment their name says."""
from __future__ import annotations

import random
import struct
from pathlib import Path

SYSTEM = 7_300_000_000_000_000_001


def segment_bytes(name: str, size: int = 16 << 20, seed: int = 1, *, filled: float = 0.25,
                  system: int = SYSTEM) -> bytes:
    """The segment ``name`` (24 hex digits, ``.partial`` allowed) of ``size`` bytes, a power of two of at
    least 1 MiB: its page header, then random bytes for ``filled`` of it and zeros after (as in a segment
    switched early)."""
    tli, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, tli, (log << 32) + seg * size, 0, system, size, 8192)
    body = random.Random(seed).randbytes(int(size * filled) - len(header)) if filled else b""
    return header + body + bytes(size - len(header) - len(body))


def write_segment(directory: Path, name: str, seed: int = 1, size: int = 16 << 20, **kwargs) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(segment_bytes(name, size, seed, **kwargs))
    return path
