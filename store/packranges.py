"""Byte ranges of packs read lately, kept for the reads that follow.

Off local disk every ranged read is a request: a round trip, and on S3 a
billed one.  So a batch of blobs is read with the gaps between its blobs
(up to ``store.repository.READ_GAP_REMOTE``) in one request, and the blobs
in those gaps are mostly the ones the next batches want: a backup's readers
interleave files' chunks in its packs, and a restore takes them back file by
file.  Keeping what was read answers those batches without asking again.

A pack's key is the hash of its bytes, so a kept range never goes stale.
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class RecentRanges:
    """Ranges of immutable objects, the oldest dropped past ``max_bytes``; safe to share between threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._order: OrderedDict[tuple[str, int], int] = OrderedDict()  # (key, start) -> length, oldest first
        self._by_key: dict[str, dict[int, bytes]] = {}
        self._lock = threading.Lock()

    def find(self, key: str, start: int, length: int) -> bytes | None:
        """``length`` bytes of ``key`` from ``start``, when one kept range holds all of them."""
        with self._lock:
            for at, data in self._by_key.get(key, {}).items():
                if at <= start and start + length <= at + len(data):
                    return data[start - at : start - at + length]
        return None

    def add(self, key: str, start: int, data: bytes) -> None:
        if not data or len(data) > self.max_bytes:
            return
        with self._lock:
            ranges = self._by_key.setdefault(key, {})
            old = ranges.get(start)
            if old is not None:
                if len(old) >= len(data):
                    return
                del self._order[(key, start)]
                self.size -= len(old)
            ranges[start] = data
            self._order[(key, start)] = len(data)
            self.size += len(data)
            while self.size > self.max_bytes:
                (old_key, old_start), n = self._order.popitem(last=False)
                del self._by_key[old_key][old_start]
                if not self._by_key[old_key]:
                    del self._by_key[old_key]
                self.size -= n
