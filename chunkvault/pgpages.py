"""Data page checksums of a PostgreSQL cluster, checked while ``backup --postgres`` reads its relations.

A cluster made with data checksums stores a checksum in every page it writes; a page whose checksum no
longer matches was damaged after PostgreSQL wrote it (a disk, a controller, a file system), and a backup
that copies it faithfully keeps the damage for as long as the backup is kept.  As ``pg_basebackup`` and
pgBackRest do, the backup checks each page of the relation files it reads: new pages (never written) and
pages changed since the backup started (their LSN at or past its start: a read may catch one half-written,
and recovery rewrites it from the WAL) are left alone; a page that fails is read again on its own once the
file is read, and counts only if it fails again.  Failures are reported, not refused: the snapshot is still
the best copy there is, and the server's own copy of the page is just as damaged.

The checking is native (``_pgpages``); ``checksum`` below is its reference, which the tests compare it with.
"""
from __future__ import annotations

import array
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

from . import _pgpages
from .pgpaths import relation_segment

LANES = 32
FNV_PRIME = 16777619
SEEDS = (0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
         0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
         0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
         0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756)
#: Failed blocks named per file in a warning; the rest are counted.
NAMED_BLOCKS = 10


def checksum(page: bytes, block: int) -> int:
    """The checksum PostgreSQL stores in ``page`` as block ``block`` (the reference of ``_pgpages``)."""
    words = array.array("I", page[:8] + b"\0\0" + page[10:])
    lanes = list(SEEDS)
    for row in range(0, len(words), LANES):
        for j in range(LANES):
            t = lanes[j] ^ words[row + j]
            lanes[j] = (t * FNV_PRIME ^ (t >> 17)) & 0xFFFFFFFF
    for _ in range(2):
        for j in range(LANES):
            t = lanes[j]
            lanes[j] = (t * FNV_PRIME ^ (t >> 17)) & 0xFFFFFFFF
    folded = 0
    for lane in lanes:
        folded ^= lane
    return (folded ^ block) % 65535 + 1



@dataclass
class PageChecks:
    """The checking of one backup: where a file of the tree lies (``locate``, to read a page again), the
    cluster's block size and segment size (in blocks), the backup's start (pages at or past it are left
    alone), and what was found.  Shared by the backup's reader threads."""

    locate: Callable[[bytes], bytes]
    block_size: int
    segment_blocks: int
    start_lsn: int
    pages: int = 0
    failures: dict[str, list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def for_file(self, rel: bytes, named: bytes | None = None) -> "FilePages | None":
        """The checker of the file at ``rel`` (below the data directory), or None for a file that is no
        relation's; ``named``: its path through ``pg_tblspc`` where ``rel`` is a tablespace's that lies
        elsewhere in the data directory."""
        segment = relation_segment(named or rel)
        if segment is None:
            return None
        return FilePages(self, rel, segment * self.segment_blocks)

    def _record(self, rel: bytes, pages: int, bad: list[int]) -> None:
        with self._lock:
            self.pages += pages
            if bad:
                self.failures.setdefault(os.fsdecode(rel), []).extend(bad)

    def warnings(self) -> list[str]:
        """One line per file with pages that failed twice (blocks numbered within the file, as PostgreSQL's
        own tools name them)."""
        out = []
        for path, blocks in sorted(self.failures.items()):
            named = ", ".join(map(str, blocks[:NAMED_BLOCKS])) + (
                f" and {len(blocks) - NAMED_BLOCKS} more" if len(blocks) > NAMED_BLOCKS else "")
            out.append(f"invalid page checksum in {path}: block(s) {named} (the server's copy is damaged too: "
                       "see PostgreSQL's log and its storage)")
        return out

    def to_dict(self) -> dict:
        return {"pages": self.pages, "failures": [{"path": p, "blocks": b} for p, b in sorted(self.failures.items())]}


class FilePages:
    """The pages of one relation file as the backup reads it, chunk by chunk (chunks cut pages anywhere)."""

    def __init__(self, checks: PageChecks, rel: bytes, first_block: int):
        self.checks = checks
        self.rel = rel
        self.first_block = first_block
        self._pos = 0  # bytes of the file fed so far
        self._carry = bytearray()  # the start of a page the last chunk cut
        self._suspects: list[int] = []  # blocks (within the file) whose checksum differed

    def feed(self, chunk: bytes | memoryview) -> None:
        size = self.checks.block_size
        view = memoryview(chunk)
        if self._carry:
            take = min(size - len(self._carry), len(view))
            self._carry += view[:take]
            view = view[take:]
            if len(self._carry) == size:
                self._check(bytes(self._carry), self._pos // size)
                self._pos += size
                self._carry.clear()
        whole = len(view) - len(view) % size
        if whole:
            self._check(view[:whole], self._pos // size)
            self._pos += whole
        self._carry += view[whole:]

    def _check(self, data: bytes | memoryview, index: int) -> None:
        bad = _pgpages.bad_pages(data, self.checks.block_size, self.first_block + index, self.checks.start_lsn)
        self._suspects.extend(index + k for k in bad)

    def finish(self) -> None:
        """Read each page that failed again on its own (it may have been caught half-written) and record those
        that fail again; a partial last page (the file being extended) is not checked."""
        size = self.checks.block_size
        bad = []
        if self._suspects:
            try:
                fd = os.open(self.checks.locate(self.rel), os.O_RDONLY)
            except OSError:  # gone since (dropped): nothing of it to vouch for either way
                fd = -1
            try:
                for index in self._suspects:
                    again = os.pread(fd, size, index * size) if fd >= 0 else b""
                    if len(again) == size and _pgpages.bad_pages(again, size, self.first_block + index,
                                                                 self.checks.start_lsn):
                        bad.append(index)
            finally:
                if fd >= 0:
                    os.close(fd)
        self.checks._record(self.rel, self._pos // size, bad)

