"""Finding one path in a manifest without reading the whole manifest.

A manifest is a sorted record stream cut into content-defined blobs, so a
record may begin in one blob and end in the next.  The snapshot keeps, per
blob, the offset of the first record that begins in it (-1 when none does);
with that, a binary search over the blobs' first records finds the blob that
holds a path, and only a handful of blobs are read: restoring or dumping one
file from a snapshot of millions costs milliseconds, not a full scan.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple

from chunkvault.errors import CorruptObject

from .chain import ancestors, in_listing
from .manifest import _HEAD, Record, decode_records, iter_records, locate_record, sort_key

#: Blobs kept as read: the binary search keeps each blob's first key apart, so these serve only the next look-ups
#: near the last (a diff's, in path order); sixteen per seeker, kept for a whole diff across a chain of 24, held
#: some 100 MiB.
_CACHED_BLOBS = 4
#: Blobs a shallow walk reads at once: those of the segments after the one it reads, or the probes of a seek.  One
#: after another, a listing over a remote waited a round trip per blob, where a walk of the whole tree reads 4 at once.
_AHEAD = 8
#: Blobs kept decoded: a blob's records as objects take some five times its bytes, and a chain's seekers each
#: kept sixteen (a diff of a chain of 24 looking up hard links across a large tree: gigabytes).
_DECODED_BLOBS = 2


class ManifestSeeker:
    """Exact-path lookups in one snapshot's own manifest."""

    def __init__(self, read_blob: Callable[[bytes], bytes], ids: list[bytes], starts: list[int], what: str):
        self._read = read_blob
        self.ids = ids
        self.what = what
        # Without starts (or with starts that do not fit) every lookup scans from the beginning.
        self._seekable = [i for i, s in enumerate(starts) if s >= 0] if len(starts) == len(ids) else []
        self._starts = starts
        self._first_keys: dict[int, bytes] = {}
        self._blobs: OrderedDict[int, bytes] = OrderedDict()
        # A blob's records from its first record start, decoded, and the bytes of the record it ends inside
        self._decoded: OrderedDict[int, tuple[list[Record], bytes]] = OrderedDict()
        self._ahead: dict[int, Future[bytes]] = {}  # blobs a shallow walk reads ahead

    def _blob(self, i: int) -> bytes:
        fetched = self._ahead.get(i)
        if fetched is not None:  # read ahead by a shallow walk, kept until it passes it
            return fetched.result()
        data = self._blobs.get(i)
        if data is None:
            data = self._read(self.ids[i])
            self._keep(i, data)
        else:
            self._blobs.move_to_end(i)
        return data

    def _keep(self, i: int, data: bytes) -> None:
        self._blobs[i] = data
        if len(self._blobs) > _CACHED_BLOBS:
            self._blobs.popitem(last=False)

    def _pieces(self, i: int, offset: int) -> Iterator[bytes]:
        yield self._blob(i)[offset:]
        for j in range(i + 1, len(self.ids)):
            yield self._blob(j)

    def _first_key(self, i: int) -> bytes:
        key = self._first_keys.get(i)
        if key is None:
            buf = b""
            for piece in self._pieces(i, self._starts[i]):
                buf += piece
                if len(buf) >= _HEAD.size:
                    _, plen = _HEAD.unpack_from(buf, 0)
                    if len(buf) >= _HEAD.size + plen:
                        key = sort_key(buf[_HEAD.size : _HEAD.size + plen])
                        break
            if key is None:
                raise CorruptObject(self.what, "manifest ends inside a record")
            self._first_keys[i] = key
        return key

    def _records_from(self, key: bytes) -> Iterator[Record]:
        """Records from the last blob whose first record sorts at or before ``key``."""
        i = self._blob_of(key)
        if i is None:
            return iter_records(self._pieces(0, 0), self.what) if self.ids else iter(())
        return self._decoded_from(i)

    def _blob_of(self, key: bytes) -> int | None:
        """The last seekable blob whose first record sorts at or before ``key`` (None: none is, or none can be
        sought: read from the first)."""
        lo, hi = 0, len(self._seekable)
        # The blobs the search ends between, as their probes read them: probed early, they were pushed out of
        # the few blobs kept by the probes after (in a manifest of more than 16 blobs) and read again for their
        # records, a round trip more per look-up in each manifest of a chain.
        bounds: dict[bool, tuple[int, bytes | None]] = {}  # above ``key``, and at or before it: the last probed
        while lo < hi:  # first seekable blob whose first key is above ``key``
            mid = (lo + hi) // 2
            at_or_before = self._first_key(self._seekable[mid]) <= key
            if at_or_before:
                lo = mid + 1
            else:
                hi = mid
            bounds[at_or_before] = (self._seekable[mid], self._blobs.get(self._seekable[mid]))
        for i, data in [bounds[side] for side in (False, True) if side in bounds]:  # where the records begin, last
            if data is not None and i not in self._blobs:
                self._keep(i, data)
        return None if lo == 0 else self._seekable[lo - 1]

    def _decoded_from(self, i: int) -> Iterator[Record]:
        """The records from blob ``i``'s first record start on, that blob's decoded once while it is among the
        last ``_DECODED_BLOBS`` asked for: decoded for each path, a diff's look-ups of hard-linked files (a few
        in one blob) decoded the blob again each time."""
        cached = self._decoded.get(i)
        if cached is None:
            buf = self._blob(i)[self._starts[i]:]
            records, used = decode_records(buf, self.what)
            cached = self._decoded[i] = (records, bytes(buf[used:]))
            if len(self._decoded) > _DECODED_BLOBS:
                self._decoded.popitem(last=False)
        else:
            self._decoded.move_to_end(i)
        records, rest = cached
        later = (self._blob(j) for j in range(i + 1, len(self.ids)))
        return itertools.chain(records, iter_records(itertools.chain([rest], later), self.what))

    def find(self, path: bytes) -> Record | None:
        """``path``'s record, found by the records' heads (``locate_record``) and decoded alone."""
        if not self.ids:
            return None
        i = self._blob_of(sort_key(path))
        pending = b""
        for piece in self._pieces(0, 0) if i is None else self._pieces(i, self._starts[i]):
            buf = pending + piece if pending else piece
            found, start, end = locate_record(buf, path, self.what)
            if found == 0:
                return decode_records(buf[start:end], self.what)[0][0]
            if found == 1:
                return None
            pending = bytes(buf[start:])
        if pending:
            raise CorruptObject(self.what, "manifest ends inside a record")
        return None

    def shallow(self, directory: bytes) -> Iterator[Record]:
        """This manifest's own records of ``directory``, of the paths directly in it and of the directories above
        it, in order.  The manifest is read segment by segment (from one record start to the next), the blobs of
        the next few segments fetched meanwhile (up to ``_AHEAD``, more as it reads on in turn); a subtree of a
        path in the directory that reaches past the first few of them is passed over, the segment where the next
        path lies found by probing several at once (``_segment_after``): a listing of the root of a tree of
        millions reads the segments that hold its entries and a few probes past each long subtree, not the whole
        manifest, in about as many round trips as a walk of the whole tree where it must read most of it."""
        segs = segments(len(self.ids), self._starts)
        if segs is None:  # nothing to seek by: every record read
            yield from (r for r in iter_records(self._pieces(0, 0), self.what) if in_listing(r.path, directory))
            return
        for above in [b"", *ancestors(directory)] if directory else []:
            rec = self.find(above)
            if rec is not None:
                yield rec
        key = sort_key(directory)
        below = key + b"\x00" if directory else b""
        target = key  # the records before it are passed over
        at = self._segment_of(segs, key, 0) if directory else 0  # the root's record comes first
        pool = ThreadPoolExecutor(_AHEAD)
        ahead = 1  # segments read ahead: twice as many after each read in turn, one after a seek
        try:
            while at < len(segs):
                window = segs[at : at + max(ahead, 2) + 1]
                self._fetch(pool, [i for seg in window for i in range(seg.first, seg.last + 1)],
                            keep_from=segs[at].first)
                records = self._segment_records(segs, at)
                after, ahead = at + 1, min(2 * ahead, _AHEAD)
                for rec in records:
                    k = sort_key(rec.path)
                    if k < target:
                        continue
                    if k == key:
                        yield rec
                        continue
                    if not k.startswith(below):
                        return  # past the directory's subtree
                    sep = k.find(b"\x00", len(below))
                    if sep < 0:
                        yield rec
                        continue
                    target = k[:sep] + b"\x01"  # just past the subtree of the path in the directory that holds it
                    if sort_key(records[-1].path) < target:  # it reaches past this segment
                        far = at + max(2, ahead // 2)  # fetched with the segments before: no wait of its own
                        if far < len(segs) and self._first_key(segs[far].first) <= target:
                            after, ahead = self._segment_after(segs, target, far, pool), 1  # and past it: sought
                        break
                at = after
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._ahead.clear()

    def _fetch(self, pool: ThreadPoolExecutor, blobs: list[int], keep_from: int | None = None) -> None:
        """Read these blobs on ``pool`` (those not read or under way); ``keep_from``: drop those fetched before it."""
        if keep_from is not None:
            for i in [i for i in self._ahead if i < keep_from]:
                self._ahead.pop(i).cancel()
        for i in blobs:
            if i not in self._ahead and i not in self._blobs:
                self._ahead[i] = pool.submit(self._read, self.ids[i])

    def _segment_after(self, segs: list[Segment], key: bytes, lo: int, pool: ThreadPoolExecutor) -> int:
        """The segment after ``lo`` (whose first key is at or before ``key``) where the first record at or after
        ``key`` lies: ``lo + 1``, ``lo + 2``, ``lo + 4``, ``lo + 8`` probed at once (then the next four powers of
        two), then up to ``_AHEAD`` points evenly between the last at or before it and the first after, at once,
        until they meet.  One probe at a time, a walk over a remote waited a round trip per probe."""
        good, high = lo, len(segs)
        reach = 1  # the next power of two to probe from ``lo``, while no probe has gone past ``key``
        while high - good > 1:
            probes = [lo + (reach << b) for b in range(4) if lo + (reach << b) < high] if reach else []
            reach = reach << 4 if probes else 0
            if not probes:
                count = min(_AHEAD, high - good - 1)
                probes = sorted({good + (high - good) * n // (count + 1) for n in range(1, count + 1)})
            self._fetch(pool, [segs[p].first for p in probes])
            for p in probes:
                if self._first_key(segs[p].first) <= key:
                    good = p
                else:
                    high, reach = p, 0
                    break
        return good

    def _segment_of(self, segs: list[Segment], key: bytes, lo: int) -> int:
        """The segment from ``lo`` on where the first record at or after ``key`` lies (the last whose first key
        is at or before it, else ``lo``), by halving, as ``find`` looks a path up."""
        if lo >= len(segs) or self._first_key(segs[lo].first) > key:
            return lo
        good, high = lo, len(segs)
        while high - good > 1:
            mid = (good + high) // 2
            if self._first_key(segs[mid].first) <= key:
                good = mid
            else:
                high = mid
        return good

    def _segment_records(self, segs: list[Segment], at: int) -> list[Record]:
        seg = segs[at]
        buf = seg.join([self._blob(i) for i in range(seg.first, seg.last + 1)])
        records, used = decode_records(buf, self.what)
        if used != len(buf):
            raise CorruptObject(self.what, "manifest ends inside a record")
        return records

    def within(self, directory: bytes) -> Iterator[Record]:
        """This manifest's own records of the paths ``chain.on_way_to(path, directory)`` holds, in order:
        those of the directories above it found one by one, then the run of it and its subtree."""
        for above in [b"", *ancestors(directory)]:
            rec = self.find(above)
            if rec is not None:
                yield rec
        key = sort_key(directory)
        below = key + b"\x00"
        for rec in self._records_from(key):
            k = sort_key(rec.path)
            if k == key or k.startswith(below):
                yield rec
            elif k > key:
                return


class Segment(NamedTuple):
    """Manifest bytes from a record start to the next blob's first record start.

    ``first``..``last`` are blob indexes; the bytes are blob ``first`` from
    ``start``, the blobs between, and blob ``last`` up to ``end`` (-1: to its
    end).  The bytes are whole records and depend only on those blobs' ids and
    the two offsets, so a segment two snapshots share is decoded once (``key``).
    """

    first: int
    start: int
    last: int
    end: int

    def key(self, ids: list[bytes]) -> tuple:
        return (*ids[self.first : self.last + 1], self.start, self.end)

    def join(self, blobs: list[bytes]) -> bytes:
        """The segment's bytes, from the plaintexts of blobs ``first``..``last``."""
        parts = list(blobs)
        if self.end >= 0:
            parts[-1] = parts[-1][: self.end]
        parts[0] = parts[0][self.start :]
        return b"".join(parts)


def segments(count: int, starts: list[int]) -> list[Segment] | None:
    """A manifest of ``count`` blobs cut at record starts; None when ``starts`` cannot be used."""
    if count == 0:
        return []
    if len(starts) != count or starts[0] != 0:
        return None
    seekable = [i for i, s in enumerate(starts) if s >= 0]
    out = []
    for a, b in zip(seekable, seekable[1:] + [count]):
        if b < count and starts[b] > 0:
            out.append(Segment(a, starts[a], b, starts[b]))
        else:
            out.append(Segment(a, starts[a], b - 1, -1))
    return out
