"""Progress of a long command: one status line on a terminal (silent elsewhere), or JSON lines on stderr
for a program driving chunkvault (``--progress json``)."""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO

from .units import format_size


class Progress:
    """Call with cumulative counts; prints at most a few times a second, only on a TTY."""

    def __init__(self, what: str, total_bytes: int | None = None, stream: TextIO | None = None,
                 enabled: bool | None = None, interval: float = 0.25, unit: str = "files"):
        self.what = what
        self.unit = unit
        self.total = total_bytes  # 0 is a total (an empty tree): only None is one not known yet
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.start = time.monotonic()
        # Whence the rate is measured: the last report of nothing done yet.  The time before it went to
        # waiting for a lock or planning (a prune's marking: a minute on a repository of millions of blobs),
        # and counted as work it put the ETA of a prune's repack at forty times the time left.
        self.origin = self.start
        self.last = float("-inf")  # the first report is shown whatever the monotonic clock's origin
        self.shown = False

    def rate(self, nbytes: int, now: float) -> float:
        return nbytes / max(now - self.origin, 1e-6)

    def begun(self, files: int, nbytes: int) -> None:
        """Note a report of nothing done yet: the work starts from here."""
        if not files and not nbytes:
            self.origin = time.monotonic()

    def line(self, files: int, nbytes: int, now: float) -> str:
        rate = self.rate(nbytes, now)
        text = f"{self.what}: {files} {self.unit}, {format_size(nbytes)}"
        if self.total:
            text += f" of {format_size(self.total)} ({min(100.0, 100.0 * nbytes / self.total):.0f}%)"
        text += f", {format_size(rate)}/s"
        if self.total and rate > 0 and nbytes < self.total:
            # rounded up: a bar at 2.9 s to go showing 0:02 ran past its own ETA; less a float's error, but
            # never to 0:00 while work is left (the last few bytes at a fast rate)
            eta = max(1, math.ceil((self.total - nbytes) / rate - 1e-6))
            text += f", ETA {eta // 60}:{eta % 60:02d}"
        return text

    def __call__(self, files: int, nbytes: int, total_bytes: int | None = None) -> None:
        """``total_bytes`` lets a caller that learns the total only once started set it."""
        if total_bytes is not None:
            self.total = total_bytes
        self.begun(files, nbytes)
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

    def clear(self) -> None:
        """Take the status line away, for a line of output (``backup --list``); the next report shows it again."""
        if self.shown:
            self.done()
            self.shown = False


class JsonProgress(Progress):
    """One JSON object per line on stderr, about once a second and once at the end (``"final": true``),
    whatever stderr is: a program that runs chunkvault reads them while stdout carries the result.  Every
    line has the same keys, null where there is no value yet (``total_bytes`` before the total is counted,
    ``eta_seconds`` without a total or a rate, and at the end), as every --json document gives them: a
    program that reads a key from each line failed on the lines that left it out."""

    def __init__(self, what: str, total_bytes: int | None = None, stream: TextIO | None = None,
                 interval: float = 1.0, unit: str = "files"):
        super().__init__(what, total_bytes, stream, enabled=True, interval=interval, unit=unit)
        self.count = self.nbytes = 0

    def record(self, files: int, nbytes: int, now: float, final: bool = False) -> dict[str, Any]:
        elapsed = max(now - self.start, 1e-6)
        rate = self.rate(nbytes, now)
        eta = None
        if self.total and rate > 0 and nbytes < self.total and not final:
            eta = round((self.total - nbytes) / rate, 1)
        return {"progress": self.what, self.unit: files, "bytes": nbytes, "total_bytes": self.total,
                "seconds": round(elapsed, 3), "bytes_per_second": round(rate), "eta_seconds": eta, "final": final}

    def __call__(self, files: int, nbytes: int, total_bytes: int | None = None) -> None:
        if total_bytes is not None:
            self.total = total_bytes
        self.begun(files, nbytes)
        self.count, self.nbytes = files, nbytes
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self._write(self.record(files, nbytes, now))

    def done(self) -> None:
        self._write(self.record(self.count, self.nbytes, time.monotonic(), final=True))

    def _write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, sort_keys=True) + "\n")
        self.stream.flush()
