"""Snapshot objects: the small sealed record that makes a backup exist.

A snapshot is written last, after every blob and index it references is
stored; it names its manifest's blobs and, for a differential, its parent.
"""
from __future__ import annotations

import bisect
import copy
import functools
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import zstandard

from chunkvault.errors import (AmbiguousSnapshot, ChunkvaultWarning, CorruptObject, NewerObject, SnapshotNotFound,
                               UsageError)

from .chronology import chronological_key
from .crypto import AuthenticationFailed, Sealer

SNAPSHOT_AD = b"chunkvault snapshot v1"
KIND_FULL = "full"
KIND_DIFF = "diff"
# 2: the manifest's records may carry extended attributes (store/FORMAT.md); a snapshot whose records
# have none stays 1, readable by every chunkvault.
SNAPSHOT_VERSION = 2
_HEX_ID = re.compile(r"[0-9a-f]{64}")
#: The ``stats`` a reader computes with (listings sum and print them, a backup compares its parent's times
#: and sizes): each must be a number, and ``unreadable`` a list of paths.
_STAT_COUNTS = ("bytes", "files", "added_stored_bytes", "absorbed_stored_bytes", "manifest_bytes")
_STAT_NUMBERS = ("started_ns", "finished_ns", "duration")


def seal_document(sealer: Sealer, body: dict, ad: bytes) -> bytes:
    """A small JSON document (a snapshot, an archived WAL file's object) compressed and sealed with ``ad``."""
    plain = json.dumps(body, sort_keys=True, ensure_ascii=True).encode()
    return sealer.seal(zstandard.ZstdCompressor(level=3).compress(plain), ad)


def open_document(sealer: Sealer, data: bytes, ad: bytes, what: str, max_size: int, kind: str,
                  newest: int) -> dict:
    """What ``seal_document`` sealed with ``ad``, its ``version`` (of ``kind``) one this reader knows;
    CorruptObject naming ``what`` for bytes that do not open (another object's, damaged) or decode, or no
    version; NewerObject for a version above ``newest``."""
    try:
        plain = zstandard.ZstdDecompressor().decompress(sealer.open(data, ad), max_output_size=max_size)
        body = json.loads(plain)
    except AuthenticationFailed:
        raise CorruptObject(what, "authentication failed (damaged, cut short, or another object, or another repository's, moved here)") from None
    except (zstandard.ZstdError, ValueError, UnicodeDecodeError, RecursionError):
        raise CorruptObject(what, "undecodable") from None
    version = body.get("version") if isinstance(body, dict) else None
    if version is True:  # FORMAT.md: a reader takes `true` as 1, as the config's `format`
        body["version"] = version = 1
    if type(version) is not int or version < 1:
        raise CorruptObject(what, f"unsupported {kind} version")
    if version > newest:
        raise NewerObject(what, f"written by a newer chunkvault ({kind} version {version}); upgrade chunkvault to "
                                "read it")
    return body


@dataclass
class Snapshot:
    time: str  # ISO 8601, UTC, microseconds
    kind: str
    parent: str | None
    host: str
    paths: list[str]  # absolute source paths (os.fsdecode form) or the stdin name
    tags: list[str] = field(default_factory=list)
    manifest: list[str] = field(default_factory=list)  # hex blob ids of the manifest stream
    # Per manifest blob, the offset of the first record beginning in it (-1: none); for seeking one path.
    manifest_starts: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    stdin_name: str | None = None
    version: int = 1  # of the snapshot object: what its manifest's records may hold (see SNAPSHOT_VERSION)
    id: str = ""  # random, stable for the snapshot's life (a rebase rewrites the object, not the id)

    @property
    def datetime(self) -> datetime:
        return datetime.fromisoformat(self.time)

    def check_fields(self) -> None:
        """ValueError unless each field holds what it should: strings where strings go, a time with its
        zone, a kind its parent agrees with.  What lists, sorts, prints or compares snapshots counts on it;
        one time without a zone among the others made every later listing fail."""
        def strings(v: object) -> bool:
            return isinstance(v, list) and all(isinstance(x, str) for x in v)

        if not (isinstance(self.time, str) and isinstance(self.kind, str) and isinstance(self.host, str)
                and isinstance(self.id, str) and strings(self.paths) and strings(self.tags)
                and strings(self.manifest) and isinstance(self.stats, dict)
                and all(x is None or isinstance(x, str) for x in (self.parent, self.stdin_name))):
            raise ValueError("a field holds the wrong type")
        if self.datetime.tzinfo is None:
            raise ValueError(f"time {self.time!r} has no zone")
        if self.kind not in (KIND_FULL, KIND_DIFF) or (self.kind == KIND_DIFF) != (self.parent is not None):
            raise ValueError("inconsistent kind/parent")
        if not all(_HEX_ID.fullmatch(m) for m in self.manifest):
            raise ValueError("a manifest blob id is not 64 hex digits")
        self._check_stats()

    def _check_stats(self) -> None:
        """ValueError for a stat a reader computes with that is not of its kind: a size that was a list
        made every listing of the repository an internal error, where it must name the snapshot.  Run for
        every snapshot decoded, so kept to plain type tests."""
        stats = self.stats
        for key in _STAT_COUNTS:
            v = stats.get(key, 0)
            if type(v) is not int or v < 0:
                raise ValueError(f"stats {key} is not a count")
        for key in _STAT_NUMBERS:
            v = stats.get(key, 0)
            if type(v) is not int and not (type(v) is float and math.isfinite(v)):
                raise ValueError(f"stats {key} is not a count")
        unreadable = stats.get("unreadable", [])
        if not (isinstance(unreadable, list) and all(isinstance(x, str) for x in unreadable)):
            raise ValueError("stats unreadable is not a list of paths")

    def copy(self) -> "Snapshot":
        """A copy whose lists and stats are its own: commands edit a snapshot in place before storing it
        (a rebase, a tag), and one that fails midway must leave a kept copy as it was stored."""
        twin = copy.copy(self)
        twin.paths, twin.tags, twin.manifest = list(self.paths), list(self.tags), list(self.manifest)
        twin.manifest_starts, twin.stats = list(self.manifest_starts), dict(self.stats)
        return twin

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def kind_full(self) -> bool:
        return self.kind == KIND_FULL

    def encode(self, sealer: Sealer) -> bytes:
        """Sealed with the id as associated data: bytes stored under another id do not open."""
        if not self.id:
            raise ValueError("a snapshot needs its id before it is encoded")
        body = asdict(self)
        body.pop("id")
        return seal_document(sealer, body, SNAPSHOT_AD + self.id.encode())

    @classmethod
    def decode(cls, sealer: Sealer, name: str, data: bytes) -> "Snapshot":
        what = f"snapshot {name}"
        body = open_document(sealer, data, SNAPSHOT_AD + name.encode(), what, 1 << 28, "snapshot", SNAPSHOT_VERSION)
        try:
            snap = cls(**body, id=name)
            snap.check_fields()
        except (TypeError, ValueError) as exc:
            raise CorruptObject(what, f"malformed snapshot ({exc})") from None
        starts = snap.manifest_starts
        if not isinstance(starts, list) or (starts and (
                len(starts) != len(snap.manifest)
                or not all(type(s) is int and s >= -1 for s in starts))):
            raise CorruptObject(what, "malformed manifest offsets")
        return snap


def iso(t: datetime) -> str:
    """A snapshot's time as it is stored: UTC, to the microsecond."""
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def now_iso() -> str:
    return iso(datetime.now(timezone.utc))


# A POSIX TZ rule (``CET-1CEST,M3.5.0,M10.5.0/3``, ``EST5EDT``, ``<+1030>-10:30``): the C library reads it
# without any zone file.
_NAME = r"(?:[A-Za-z]{3,}|<[A-Za-z0-9+-]{3,}>)"
_OFFSET = r"[+-]?\d{1,3}(?::\d{1,2}){0,2}"
_POSIX_TZ = re.compile(rf"{_NAME}{_OFFSET}(?:{_NAME}(?:{_OFFSET})?(?:,[^,]+,[^,]+)?)?")
_zone_warned: set[str] = set()
# Names of UTC itself: where no zone file holds them (a container without tzdata, TZ=UTC), the C library's
# fallback is UTC, which is what they mean.
_UTC_NAMES = frozenset({"UTC", "UCT", "GMT", "Zulu", "Universal", "Greenwich"})


@functools.lru_cache(maxsize=8)
def unknown_zone(value: str | None, tzdir: str | None = None) -> bool:
    """Whether the C library finds no time zone in ``value`` (``TZ``), which it then takes for UTC without
    a word: ``TZ=Europe/Berlinn`` read a time without zone, showed listings and counted retention's days an
    hour or two off, and nothing said so.  Unset or empty (UTC, as POSIX has it) is known.  A zone's file is
    looked for where the C library looks (``tzdir``, ``TZDIR``; else the system's directories), not as
    ``zoneinfo`` does: it also finds zones in Python's tzdata package, which the C library never reads."""
    if not value:
        return False
    name = value[1:] if value.startswith(":") else value
    if name.startswith("/"):
        return not os.path.isfile(name)
    if _POSIX_TZ.fullmatch(name) or name.removeprefix("Etc/") in _UTC_NAMES:
        return False
    from zoneinfo import TZPATH

    return not any(os.path.isfile(os.path.join(d, name)) for d in ([tzdir] if tzdir else TZPATH))


def check_local_zone() -> None:
    """Warn, once per process, where local time is read or shown while ``TZ`` names no zone (see
    ``unknown_zone``)."""
    value = os.environ.get("TZ")
    if value is None or value in _zone_warned or not unknown_zone(value, os.environ.get("TZDIR")):
        return
    _zone_warned.add(value)
    warnings.warn(f"TZ={value!r} names no time zone known here: local time is taken as UTC (set TZ to a "
                  "zone's name, such as Europe/Berlin, or unset it for the system's zone)", ChunkvaultWarning,
                  stacklevel=3)


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without zone is local time, as a user typing it means.  Text that is no time
    is a bad argument (UsageError), not a snapshot that was not found."""
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:  # a field out of range says which ("day is out of range for month")
        why = "" if isinstance(exc, TypeError) or str(exc).startswith("Invalid isoformat") else f": {exc}"
        raise UsageError(f"cannot parse time {text!r}{why} (use ISO 8601, e.g. 2026-11-28T14:00)") from None
    if t.tzinfo is None:
        check_local_zone()
    try:
        return (t if t.tzinfo is not None else t.astimezone()).astimezone(timezone.utc)
    except (OverflowError, ValueError):  # a zone's offset takes it past year 1 or 9999
        raise UsageError(f"time {text!r} is out of range (years 1 to 9999, in UTC too)") from None


def said_time(t: datetime) -> str:
    """A time as a message names it: in local time with its UTC offset (``2026-10-25 02:30:00+02:00``), so
    that it reads as the user's times do, says which zone a time given without one was read in (in the hour
    repeated in autumn, which of the two), and can be given back to ``--until`` as it is.  A time given to
    the second names its whole second: the microseconds ``parse_until`` adds are not shown."""
    check_local_zone()
    try:
        local = t.astimezone()
    except (ValueError, OverflowError, OSError):  # out of the C library's range
        local = t.astimezone(timezone.utc)
    fraction = "" if local.microsecond in (0, 999_999) else f".{local.microsecond:06d}"
    return f"{local.year:04d}-{local:%m-%d %H:%M:%S}{fraction}{_offset(local)}"


def said_second(t: datetime) -> str:
    """``said_time`` to the second, for a snapshot's time: a message that named it with its microseconds read
    unlike the listing's time of it; given back to ``--until``, a time to the second takes in its whole
    second, so it still finds the snapshot."""
    return said_time(t.replace(microsecond=0))


def listed_time(t: datetime) -> str:
    """A time as a listing shows it: local time to the second; in the hour the end of summer time repeats,
    with its UTC offset (two times an hour apart that read alike would have one copied from the listing
    taken for the other); out of the C library's range (an older release stored it), in UTC with ``Z``."""
    check_local_zone()
    try:
        local = t.astimezone()
        wall = local.replace(tzinfo=None)
        text = f"{wall.year:04d}-{wall:%m-%d %H:%M:%S}"
        if wall.replace(fold=0).timestamp() == wall.replace(fold=1).timestamp():
            return text
    except (ValueError, OverflowError, OSError):
        utc = t.astimezone(timezone.utc)
        return f"{utc.year:04d}-{utc:%m-%d %H:%M:%S}Z"
    return text + _offset(local)


def _offset(local: datetime) -> str:
    """``+01:00``: the UTC offset of an aware time."""
    offset = int(local.utcoffset().total_seconds()) // 60  # type: ignore[union-attr]
    return f"{'-' if offset < 0 else '+'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


_TO_THE_SECOND = re.compile(r".*[T ]\d{2}:?\d{2}:?\d{2}(?![.,\d]).*", re.DOTALL)


def parse_until(text: str) -> datetime:
    """A time as ``--until`` takes it: one given to the second (as listings show times) names the whole
    second, so that a time copied from a listing finds the snapshot it was copied from, whose time has
    microseconds.  A time to the minute stays its first instant: what was taken after it may hold what
    the restore is meant to go back before."""
    start = parse_time(text)
    if _TO_THE_SECOND.fullmatch(text.strip()):
        try:
            return start + timedelta(seconds=1) - timedelta(microseconds=1)
        except OverflowError:  # the last second there is: up to its end
            return datetime.max.replace(tzinfo=timezone.utc)
    return start


def select_snapshots(snapshots: Iterable[Snapshot], *, hosts: Iterable[str] = (), tags: Iterable[str] = (),
                     paths: Iterable[str] = ()) -> list[Snapshot]:
    """The snapshots of any of ``hosts``, having every tag of any one of ``tags`` (each a comma-separated
    group, as restic's ``--tag a,b --tag c``), and among whose paths is each of ``paths`` (as given, or
    made absolute)."""
    hosts, paths = set(hosts), list(paths)
    groups = [{t for t in g.split(",") if t} for g in tags]
    return [s for s in snapshots
            if (not hosts or s.host in hosts)
            and (not groups or any(g <= set(s.tags) for g in groups))
            and all(p in s.paths or os.path.abspath(p) in s.paths for p in paths)]


class SnapshotFinder:
    """``find_snapshot`` for many names among many snapshots: the ids sorted once and each name's prefix
    found by binary search (a forget's dry run names every snapshot it removes: for a year of hourly
    snapshots, scanning the list for each took minutes)."""

    def __init__(self, snapshots: Iterable[Snapshot]):
        self._snaps = list(snapshots)
        self._by_id = sorted(self._snaps, key=lambda s: s.id)
        self._ids = [s.id for s in self._by_id]

    def __call__(self, spec: str) -> Snapshot:
        if not isinstance(spec, str) or not spec.strip() or spec == "latest":
            return find_snapshot(self._snaps, spec)
        prefix = spec.lower()
        first = end = bisect.bisect_left(self._ids, prefix)
        while end < len(self._ids) and self._ids[end].startswith(prefix):
            end += 1
        return find_snapshot(self._by_id[first:end], spec)  # its answers: none, ambiguous, the one


def of_source(snapshots: Iterable[Snapshot], host: str | None = None,
              filter_paths: list[str] | None = None) -> list[Snapshot]:
    """The snapshots of ``host`` and of exactly ``filter_paths`` (or of the stream so named), where given:
    one source's series, which ``latest`` picks from."""
    snaps = list(snapshots)
    if host is not None:
        snaps = [s for s in snaps if s.host == host]
    if filter_paths:
        wanted = sorted(os.path.abspath(p) for p in filter_paths)
        snaps = [s for s in snaps if (filter_paths == [s.stdin_name] if s.stdin_name is not None
                                      else sorted(s.paths) == wanted)]
    return snaps


def _source_named(host: str | None, filter_paths: list[str] | None) -> str:
    """How an error names the source ``of_source`` chose (nothing when none was)."""
    said = ([f"host {host}"] if host is not None else []) + (
        [f"paths {', '.join(filter_paths)}"] if filter_paths else [])
    return f" of {' and '.join(said)}" if said else ""


def find_snapshot(snapshots: Iterable[Snapshot], spec: str, *, until: datetime | None = None,
                  filter_paths: list[str] | None = None, host: str | None = None) -> Snapshot:
    """Resolve an id, unique id prefix or ``latest`` (newest at or before ``until``), among the snapshots
    of ``host`` and of exactly ``filter_paths`` (or of the stream so named) when given.  An empty spec is a
    usage error, never ``latest``: it is what an unset shell variable gives, and ``forget "$ID"`` must not
    take the newest snapshot for it."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"a snapshot is named by an id, a unique prefix or latest, not {spec!r}")
    if ":" in spec:  # ids are hex: no snapshot is named so
        raise UsageError(f"{spec!r} is not a snapshot's name: SNAPSHOT:PATH (a path in a snapshot, as its root) is "
                         "taken by restore, ls, dump and diff (in the Python API, their subtree parameter), not here")
    snaps = of_source(snapshots, host, filter_paths)
    of = _source_named(host, filter_paths)
    if spec == "latest":
        candidates = [s for s in snaps if until is None or s.datetime <= until]
        if not candidates:
            raise SnapshotNotFound("no snapshot" + of + (f" at or before {said_time(until)}" if until else ""))
        return max(candidates, key=chronological_key(candidates))
    matches = [s for s in snaps if s.id.startswith(spec.lower())]
    if not matches:
        raise SnapshotNotFound(f"no snapshot {spec!r}{of}")
    if len(matches) > 1:
        raise AmbiguousSnapshot(f"snapshot prefix {spec!r} is ambiguous ({len(matches)} matches)")
    snap = matches[0]
    if until is not None and snap.datetime > until:
        raise SnapshotNotFound(f"snapshot {spec} is newer than {said_time(until)}")
    return snap
