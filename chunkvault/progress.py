"""One status line on a terminal: files, bytes, rate, ETA. Silent elsewhere."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Call with cumulative counts; prints at most a few times a second, only on a TTY."""

    def __init__(self, what: str, total_bytes: int | None = None, stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.25, unit: str = "files"):
        self.what = what
        self.unit = unit
        self.total = total_bytes or None
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def line(self, files: int, nbytes: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = nbytes / elapsed
        text = f"{self.what}: {files} {self.unit}, {_human(nbytes)}"
        if self.total:
            text += f" of {_human(self.total)} ({min(100.0, 100.0 * nbytes / self.total):.0f}%)"
        text += f", {_human(rate)}/s"
        if self.total and rate > 0 and nbytes < self.total:
            eta = (self.total - nbytes) / rate
            text += f", ETA {int(eta // 60)}:{int(eta % 60):02d}"
        return text

    def __call__(self, files: int, nbytes: int, total_bytes: int | None = None) -> None:
        """``total_bytes`` lets a caller that learns the total only once started set it."""
        if total_bytes is not None:
            self.total = total_bytes or None
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self.stream.write("\r\x1b[K" + self.line(files, nbytes, now))
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
