"""The names of the files PostgreSQL archives, and what follows from them alone: which to push or fetch
ahead, which an expiry removes, where a base backup's WAL starts, the span of each timeline.  Pure (no I/O),
and light: ``archive-push`` and ``archive-get`` answer from a spool with it before anything else loads."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable

from chunkvault.errors import NoBaseBackup, UsageError

WAL_PREFIX = "wal/"  # the folder of the archive's objects
_SEGMENT = "[0-9A-F]{24}"
#: What PostgreSQL archives: a segment, a segment cut short at a promotion (``.partial``), a backup history
#: file (the segment, the start offset) and a timeline history file.
_NAME = re.compile(rf"({_SEGMENT})(\.partial|\.[0-9A-F]{{8}}\.backup)?|[0-9A-F]{{8}}\.history")
_SEGMENT_NAME = re.compile(_SEGMENT)


def is_wal_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def check_wal_name(name: object) -> str:
    """``name`` when it is a file PostgreSQL archives (the form ``%f`` takes); else a UsageError: anything
    else under ``wal/`` could not be told from what a restore asks for."""
    if not isinstance(name, str) or not is_wal_name(name):
        raise UsageError(f"{name!r} is not the name of a file PostgreSQL archives (a WAL segment such as "
                         "000000010000000000000003, or that with .partial, a backup history file "
                         "000000010000000000000003.00000028.backup, or a timeline history file 00000002.history)")
    return name


def is_segment(name: str) -> bool:
    """A whole segment's name (no ``.partial``, no backup or timeline history file)."""
    return bool(_SEGMENT_NAME.fullmatch(name))


def is_history(name: str) -> bool:
    return name.endswith(".history")


def ready_ahead(ready: Iterable[str], name: str, limit: int) -> list[str]:
    """Which of the files PostgreSQL has ready to archive (``archive_status/*.ready``, by name) to push ahead
    with ``name``: at most ``limit``, in the order PostgreSQL archives them (timeline history files first,
    then by name); a name that is not one PostgreSQL archives is left out."""
    names = {n for n in ready if n != name and is_wal_name(n)}
    return sorted(names, key=lambda n: (not is_history(n), n))[:max(limit, 0)]


def fetch_ahead(archived: Iterable[str], name: str, limit: int) -> list[str]:
    """Which archived segments a recovery asking for ``name`` will ask for next: those of its timeline after
    it, by name, at most ``limit`` (none after a history file, which a recovery asks for on its own)."""
    if is_history(name):
        return []
    return sorted(n for n in archived if is_segment(n) and n[:8] == name[:8] and n > name[:24])[
        :max(limit, 0)]


def expired(names: Iterable[str], before: str, *, earlier_timelines: bool = False) -> list[str]:
    """The names ``archive-expire --before`` removes: those whose segment is on ``before``'s timeline and sorts
    before its segment (segments, partial segments, backup history files); timeline history files are
    kept, as every later recovery may need them.  ``before``: a segment name, or any name with one.
    ``earlier_timelines``: those of the earlier timelines before its position too (``oldest-snapshot``, the
    earliest timeline any snapshot starts on: a recovery from a later one never reads them)."""
    check_wal_name(before)
    if is_history(before):
        raise UsageError(f"--before takes a WAL segment's name (e.g. 000000010000000000000003), not a timeline "
                         f"history file's ({before})")
    limit = before[:24]
    return sorted(n for n in names if not is_history(n) and n[8:24] < limit[8:]
                  and (n[:8] == limit[:8] or earlier_timelines and n[:8] < limit[:8]))


#: ``archive-expire --before oldest-snapshot``: before the segment the oldest snapshot's base backup starts in.
OLDEST_SNAPSHOT = "oldest-snapshot"
_LABEL_START = re.compile(r"^START WAL LOCATION: \S+ \(file (" + _SEGMENT + r")\)$", re.M)


def label_start_segment(label: str) -> str | None:
    """The segment a base backup's ``backup_label`` says its WAL starts in, or None for another text."""
    m = _LABEL_START.search(label)
    return m.group(1) if m else None


def stats_start_segment(stats: dict) -> str | None:
    """The segment a snapshot's stats say its base backup starts in (``postgres.start_wal``, which
    ``backup --postgres`` records), or None: a snapshot without it has its ``backup_label`` read instead."""
    pg = stats.get("postgres")
    start = pg.get("start_wal") if isinstance(pg, dict) else None
    return start if isinstance(start, str) and is_segment(start) else None


#: The smallest WAL segment PostgreSQL makes (``initdb --wal-segsize 1``): a smaller file says nothing of the size.
SMALLEST_SEGMENT_SIZE = 1 << 20
#: The largest WAL segment PostgreSQL makes (``initdb --wal-segsize``): a position named with it names the
#: earliest segment of any smaller size that holds it, so a start read without the segment size errs early.
LARGEST_SEGMENT_SIZE = 1 << 30


def manifest_start_segment(manifest: str) -> str | None:
    """The segment a base backup's ``backup_manifest`` (PostgreSQL 13 and later) says its WAL starts in, or
    None for another text: the first WAL range's start, named as with the largest segment size (the manifest
    does not give the size; the name errs towards keeping more).  For a copy whose ``backup_label`` cannot be
    read (inside a compressed ``base.tar``)."""
    try:
        doc = json.loads(manifest)
        first = doc["WAL-Ranges"][0]
        timeline, (high, low) = int(first["Timeline"]), (int(x, 16) for x in first["Start-LSN"].split("/"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    if not (0 < timeline < 1 << 32 and 0 <= high < 1 << 32 and 0 <= low < 1 << 32):
        return None
    return f"{timeline:08X}{high:08X}{low // LARGEST_SEGMENT_SIZE:08X}"


def oldest_needed(starts: Iterable[str]) -> str:
    """``archive-expire --before oldest-snapshot``: the earliest segment a kept base backup starts in (by
    timeline, then position); a UsageError when no snapshot holds a base backup's label."""
    found = sorted(starts)
    if not found:
        raise NoBaseBackup("no snapshot holds a base backup's label (backup_label, as pg_basebackup and backup "
                         "--postgres write it): nothing says which WAL the snapshots need; give --before SEGMENT")
    return found[0]


#: The segment size PostgreSQL uses unless initdb was told otherwise (``--wal-segsize``).
DEFAULT_SEGMENT_SIZE = 16 << 20


@dataclass
class TimelineSpan:
    """The archived segments of one timeline: the first and last, how many, and those missing in between (a
    recovery through a missing one stops there)."""

    timeline: int
    first: str
    last: str
    segments: int
    missing: list[str]

    def to_dict(self) -> dict:
        return {"timeline": self.timeline, "first": self.first, "last": self.last, "segments": self.segments,
                "missing": self.missing}


def segment_size(files: Iterable[tuple[str, int]]) -> int:
    """The size the segments among (name, size) pairs were archived with: the most common size a segment
    can have (``.partial`` ones are of the whole size too, zero-padded); 16 MiB where none says."""
    sizes = [size for name, size in files
             if (len(name) == 24 or name.endswith(".partial")) and SMALLEST_SEGMENT_SIZE <= size <= LARGEST_SEGMENT_SIZE
             and (1 << 32) % size == 0]
    return max(set(sizes), key=sizes.count) if sizes else DEFAULT_SEGMENT_SIZE


def segment_number(name: str, size: int) -> int:
    """The position of the segment ``name`` (its first 24 characters) on its timeline, counted in segments of
    ``size`` across the 32-bit log boundaries."""
    return int(name[8:16], 16) * ((1 << 32) // size) + int(name[16:24], 16)


def segment_name(timeline: int, number: int, size: int) -> str:
    """The name of segment ``number`` (``segment_number``) of ``timeline``."""
    per_log = (1 << 32) // size
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def timelines(files: Iterable[tuple[str, int]]) -> list[TimelineSpan]:
    """Per timeline, the span of the archived segments (``.partial`` ones count for their segment) among
    (name, size) pairs.  Segment numbers run on across the 32-bit log boundary as the segment size makes them
    (``segment_size``)."""
    files = list(files)
    size = segment_size(files)
    present: dict[int, set[int]] = {}
    for name, _ in files:
        if is_history(name) or name.endswith(".backup"):
            continue
        present.setdefault(int(name[:8], 16), set()).add(segment_number(name, size))

    def named(tli: int, segno: int) -> str:
        return segment_name(tli, segno, size)

    spans = []
    for tli, segnos in sorted(present.items()):
        low, high = min(segnos), max(segnos)
        spans.append(TimelineSpan(tli, named(tli, low), named(tli, high), len(segnos),
                                  [named(tli, n) for n in range(low, high + 1) if n not in segnos]))
    return spans


def recovery_gaps(files: Iterable[tuple[str, int]], starts: Iterable[str],
                  ends: dict[int, int] | None = None) -> list[TimelineSpan]:
    """The ``timelines`` of the archive (name, size) pairs that lack segments a recovery would replay: those
    at or past the earliest position a base backup starts at (``starts``: segment names; none known: every
    one missing counts), and on a timeline a recovery left (``ends``: where each ended, ``timeline_ends``)
    not past the segment it ended in; there, also those after its last archived one, up to the segment the
    next timeline starts in (a promoted standby's: the old primary's last segments, never archived, are read
    by every recovery from an earlier copy).  No recovery reads the others."""
    files = list(files)
    size = segment_size(files)
    floor = min((s[8:24] for s in starts), default="")
    out = []
    for span in timelines(files):
        end = (ends or {}).get(span.timeline)
        missing = [m for m in span.missing if m[8:24] >= floor
                   and (end is None or (int(m[8:16], 16) << 32) + int(m[16:24], 16) * size <= end)]
        if end is not None:  # after its last archived segment, those before the one the next timeline starts in
            missing += [m for n in range(segment_number(span.last, size) + 1, end // size)
                        if (m := segment_name(span.timeline, n, size))[8:24] >= floor]
        if missing:
            out.append(TimelineSpan(span.timeline, span.first, span.last, span.segments, missing))
    return out


_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> int:
    """A WAL position as PostgreSQL prints it (``16/B374D848``), as a byte offset."""
    m = _LSN.match(text.strip())
    if m is None:
        raise ValueError(f"not a WAL position: {text!r}")
    return int(m.group(1), 16) << 32 | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def timeline_ends(history: str) -> dict[int, int]:
    """Where each ancestor timeline named in a timeline history file (``NNNNNNNN.history``: a line of timeline,
    switch position and reason each) ended: the next one branched off there."""
    ends = {}
    for line in history.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isdigit():
            try:
                ends[int(words[0])] = parse_lsn(words[1])
            except ValueError:
                continue
    return ends
