"""Bandwidth limits: a remote whose uploads and downloads keep to a rate.

An off-site job must not fill the office's uplink.  Each direction has a
schedule shared by every thread: a transfer of ``n`` bytes is given the next
``n / rate`` seconds of it, starts at its turn and returns no earlier than
its turn ends (a download's size is known once it arrived: it is booked from
when it started).  So a command moving ``B`` bytes takes at least ``B / rate``
seconds, and transfers never overlap more than their turns allow; within one
object (a 16 MiB pack) the backend goes as fast as the link lets it, as the
remote interface hands over whole objects.  A pause earns no credit: the
rate is never exceeded to catch up.

A command told to stop (Ctrl-C, SIGTERM) waits for no more turns: an upload of a pack whose turn had not
come is refused (it is left to the next run, as a pack not yet handed over is), and what a stopping command
still writes (an index object, its lock's removal) goes at once.  Otherwise the stop waited out every turn
booked, minutes at a low rate, past a service manager's stop timeout.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from chunkvault.errors import Stopped

from .base import ObjectInfo, Remote

if TYPE_CHECKING:
    from .layer import StopRequest

T = TypeVar("T")

#: An upload of a pack (a key under this prefix) whose turn had not come when the stop was requested is
#: refused; anything else (an index object, a megabyte and more for tens of thousands of small files, a
#: lock) goes at once, whatever its size: without its index object, the packs a backup stored are orphans.
STOP_REFUSES_PREFIX = "data/"


class RateSchedule:
    """Turns on a link of ``rate`` bytes per second, handed out in order to the threads that ask."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, stop: "StopRequest | None" = None):
        if not rate > 0:
            raise ValueError(f"a rate must be positive, got {rate!r}")
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._stop = stop
        self._lock = threading.Lock()
        self._free_at = float("-inf")  # when the link's schedule is next free

    def book(self, n: int, since: float | None = None) -> tuple[float, float]:
        """Book ``n`` bytes from ``since`` (default now), or from when the link is next free if later;
        the turn's start and end on the clock."""
        with self._lock:
            start = max(self._free_at, self._clock() if since is None else since)
            self._free_at = end = start + n / self.rate
        return start, end

    def sleep_until(self, t: float) -> bool:
        """Wait for ``t`` on the clock; False when a stop request cut the wait short (or came before a
        wait), True once ``t`` has come."""
        delay = t - self._clock()
        if delay <= 0:
            return True
        if self._stop is None:
            self._sleep(delay)
            return True
        return not (self._stop.requested() or self._stop.wait(delay))

    def send(self, n: int, transfer: Callable[[], T], *, refusable: bool = False) -> T:
        """``transfer()`` of ``n`` bytes, started at its turn and returning no earlier than the turn ends;
        ``refusable`` (a pack): Stopped where a stop request came before its turn."""
        start, end = self.book(n)
        if not self.sleep_until(start) and refusable:
            raise Stopped("told to stop before this upload's turn under the rate limit: left to the next run")
        result = transfer()
        self.sleep_until(end)
        return result

    def receive(self, transfer: Callable[[], bytes]) -> bytes:
        """``transfer()`` of a size known once it is done: started when the link is free, booked from then,
        returning no earlier than that turn ends."""
        with self._lock:
            free_at = self._free_at
        self.sleep_until(free_at)
        since = self._clock()
        data = transfer()
        self.sleep_until(self.book(len(data), since)[1])
        return data


class ThrottledRemote(Remote):
    """``inner`` with uploads held to ``upload`` and downloads to ``download`` bytes per second (None: no limit).

    Not fork-safe: forked workers would each keep their own schedule and together exceed it."""

    def __init__(self, inner: Remote, *, upload: float | None = None, download: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 stop: "StopRequest | None" = None):
        self.inner = inner
        self.display_url = inner.display_url
        self.checks_read_length = inner.checks_read_length
        self.cheap_ranges = inner.cheap_ranges
        self.fork_safe = False
        self.upload = RateSchedule(upload, clock=clock, sleep=sleep, stop=stop) if upload else None
        self.download = RateSchedule(download, clock=clock, sleep=sleep, stop=stop) if download else None

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if self.upload is None:
            return self.inner.put(key, data, if_absent=if_absent)
        self.upload.send(len(data), lambda: self.inner.put(key, data, if_absent=if_absent),
                         refusable=key.startswith(STOP_REFUSES_PREFIX))

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        if self.download is None:
            return self.inner.get(key, start, length)
        return self.download.receive(lambda: self.inner.get(key, start, length))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    @property
    def max_object_size(self) -> int | None:
        return self.inner.max_object_size

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        return self.inner.cleanup_temp(older_than)

    def enclosing_repository(self) -> str | None:
        return self.inner.enclosing_repository()

    def close(self) -> None:
        self.inner.close()
