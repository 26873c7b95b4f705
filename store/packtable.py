"""What prune holds of the index: every pack's entries as the index objects encode them, and the copy of each
blob it keeps, in a few dozen bytes per blob.

A prune held each entry as a ``PackEntry`` (its id a ``bytes``, its numbers ``int`` objects), each used id as
a ``bytes`` in a set, and dicts keyed by both: some 740 bytes per blob, 37 GB at 50 million.  Here a pack's
entries stay in the decoded index object they came in (45 bytes each, 77 for a delta), decoded a pack at a
time while it is looked at; the kept copies are the rows of the repository's own index, made in pack id order,
each pointing at its entry where it lies in those bytes (``store/_blobtable.c``, ``by_ref``: some 18 bytes a
row with its hash slot, where a copy of the id and fields took 55 and an entry number 4 more), the used ids a
byte per row of it, and a pack's live blobs are found there (``kept_in``) and held as entry numbers.
"""
from __future__ import annotations

import bisect
import itertools
from array import array
from typing import Collection, Iterable, Iterator, Mapping, Sequence

from .blob import ID_SIZE, KIND_DELTA
from .blobindex import BlobIndex
from .indexfile import IndexColumns
from .pack import _ENTRY, ENTRY_SIZE, DecodedOnRead, EncodedEntries, PackEntry

__all__ = ["KeptCopies", "LiveEntries", "PackTable", "UsedIds", "blob_set", "id_chunks"]

_ROWS = 1 << 16  # ids per step of ``id_chunks``


class LiveEntries(DecodedOnRead):
    """Some entries of a pack, by their numbers in it (``array("I")``), decoded when read: the live blobs of a
    pack to repack, which may be most of the repository's."""

    __slots__ = ("entries", "numbers")

    def __init__(self, entries: EncodedEntries, numbers: array) -> None:
        self.entries, self.numbers = entries, numbers

    def __len__(self) -> int:
        return len(self.numbers)

    def decode(self) -> list[PackEntry]:
        decoded = self.entries.decode()
        return [decoded[i] for i in self.numbers]


class PackTable(Mapping[bytes, EncodedEntries]):
    """Pack id -> its entries (``EncodedEntries``), in pack id order; a pack listed twice: the first listing."""

    def __init__(self, listings: Iterable[tuple[bytes, EncodedEntries]]) -> None:
        first: dict[bytes, EncodedEntries] = {}
        for pid, entries in listings:
            if pid not in first and type(entries._buf) is not bytes:  # a table points into bytes alone
                entries = EncodedEntries(bytes(entries.view), 0, len(entries), entries.encoded_size)
            first.setdefault(pid, entries)
        self.pack_ids = sorted(first)
        self.listed = [first[p] for p in self.pack_ids]
        self.numbers = {p: i for i, p in enumerate(self.pack_ids)}

    @classmethod
    def from_columns(cls, objects: Iterable[IndexColumns]) -> PackTable:
        """The packs decoded index objects list, their entries left in the objects' bytes."""
        return cls(itertools.chain.from_iterable(d.packs() for d in objects))

    @classmethod
    def from_entries(cls, packs: Mapping[bytes, Sequence[PackEntry]]) -> PackTable:
        """Packs given as PackEntry lists (tests, small callers)."""
        def listings() -> Iterator[tuple[bytes, EncodedEntries]]:
            for pid, entries in packs.items():
                yield pid, EncodedEntries.of(entries)
        return cls(listings())

    def __getitem__(self, pid: bytes) -> EncodedEntries:
        return self.listed[self.numbers[pid]]

    def __contains__(self, pid: object) -> bool:
        return pid in self.numbers

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.pack_ids)

    def __len__(self) -> int:
        return len(self.pack_ids)


class KeptCopies(Mapping[bytes, PackEntry]):
    """For each blob, the copy a prune keeps live (``prune.kept_copies``, whose rule this follows): the first
    stored whole in pack id order, else the first delta; a copy ``spurned`` ((pack id, offset)) only where the
    blob has no other.  Held as a blob table whose rows point at the entries kept where they lie in the index
    objects' bytes (``BlobIndex(by_ref=True)``: 12 bytes a row, and the entry itself tells the one kept where
    two of one pack name one blob at one offset).

    Unspurned, these are the rows ``BlobIndex.add_entries`` gives the packs in pack id order: the repository's
    index made so (``Repo.install_packs``) is given as ``table``, with each pack's number in it
    (``row_packs``), and a prune holds one table of the blobs, not two.  Copies found damaged later are
    spurned in that table (``spurn``), not in a second one."""

    def __init__(self, packs: PackTable, spurned: frozenset[tuple[bytes, int]] | set[tuple[bytes, int]] = frozenset(),
                 *, table: BlobIndex | None = None, row_packs: Sequence[int] | None = None) -> None:
        self.packs = packs
        self._positions: dict[int, array] = {}  # pack number -> where each entry starts (packs holding deltas)
        if table is not None:
            if spurned or row_packs is None or not table.by_ref:
                raise ValueError("a table given points at the entries, needs its pack numbers, and spurns nothing")
            self._t = table
            self._row_packs = array("I", row_packs)
        else:
            self._t = self._build(packs, spurned)
            self._row_packs = array("I", range(len(packs)))
        self._pack_at = {r: no for no, r in enumerate(self._row_packs)}

    @staticmethod
    def _build(packs: PackTable, spurned: frozenset[tuple[bytes, int]] | set[tuple[bytes, int]]) -> BlobIndex:
        """The table: each pack's entries in pack id order as ``add_entries`` takes them (a whole copy takes a
        delta's place, else the first stays), the spurned copies left out; then the spurned, of the blobs
        still absent, whole ones first."""
        t = BlobIndex(sum(len(e) for e in packs.listed), by_ref=True)
        spurned_in = sorted({packs.numbers[pid] for pid, _ in spurned if pid in packs.numbers})
        shunned = set(spurned_in)
        for no, entries in enumerate(packs.listed):
            if no not in shunned:
                t.add_entries(entries._buf, entries._start, len(entries), no)
                continue
            pid = packs.pack_ids[no]
            for e, pos in zip(entries.decode(), _entry_starts(entries)):
                if (pid, e.offset) not in spurned:
                    t.add_entries(entries._buf, pos, 1, no)
        for delta in (False, True):
            for no in spurned_in:
                pid, entries = packs.pack_ids[no], packs.listed[no]
                for e, pos in zip(entries.decode(), _entry_starts(entries)):
                    if (pid, e.offset) in spurned and (e.kind == KIND_DELTA) == delta and e.blob_id not in t:
                        t.add_entries(entries._buf, pos, 1, no)
        return t

    @property
    def table(self) -> BlobIndex:
        """The blob table holding the copies kept (``UsedIds`` marks its rows)."""
        return self._t

    def _kept_pos(self, blob_id: bytes) -> tuple[int, int] | None:
        """(pack number, where its entry lies in that pack's buffer) of the copy kept."""
        loc = self._t.get(blob_id)
        no = None if loc is None else self._pack_at.get(loc.pack_no)
        if no is None:
            return None
        pos = self._t.entry_pos(blob_id, self.packs.listed[no]._buf)
        return None if pos < 0 else (no, pos)

    def _kept(self, blob_id: bytes) -> tuple[int, int] | None:
        at = self._kept_pos(blob_id)
        if at is None:
            return None
        no, pos = at
        entries = self.packs.listed[no]
        if not entries.has_deltas:
            i, off = divmod(pos - entries._start, ENTRY_SIZE)
            return (no, i) if off == 0 and 0 <= i < len(entries) else None
        starts = self._starts(no)
        i = bisect.bisect_left(starts, pos)
        return (no, i) if i < len(starts) and starts[i] == pos else None

    def _starts(self, no: int) -> array:
        starts = self._positions.get(no)
        if starts is None:
            starts = self._positions[no] = array("Q", _entry_starts(self.packs.listed[no]))
        return starts

    def kept_at(self, blob_id: bytes) -> tuple[int, int] | None:
        """(pack number, entry number) of the copy kept, or None when no index lists the blob."""
        return self._kept(blob_id) if blob_id in self else None

    def pack_of(self, blob_id: bytes) -> bytes:
        """The id of the pack holding the copy kept."""
        return self.packs.pack_ids[self._kept_pos(blob_id)[0]]  # type: ignore[index]

    def __getitem__(self, blob_id: bytes) -> PackEntry:
        at = self._kept_pos(blob_id) if blob_id in self else None
        if at is None:
            raise KeyError(blob_id)
        return _entry_at(self.packs.listed[at[0]]._buf, at[1])

    def others_in(self, no: int) -> list[PackEntry]:
        """The entries of pack number ``no`` that are not the copy kept of their blob (``elsewhere``, C)."""
        entries = self.packs.listed[no]
        return [_entry_at(entries._buf, pos)
                for pos in array("q", self._t._t.elsewhere(entries._buf, entries._start, len(entries)))]

    def others_in_reference(self, no: int) -> list[PackEntry]:
        """``others_in`` in Python."""
        return [e for i, e in enumerate(self.packs.listed[no].decode()) if self.kept_at(e.blob_id) != (no, i)]

    def spurn(self, failed: Iterable[tuple[bytes, int]], spurned: Collection[tuple[bytes, int]]
              ) -> list[PackEntry]:
        """The blobs whose kept copy is one of ``failed`` ((pack id, offset): it did not verify) keep another
        copy, as ``kept_copies`` chooses it with ``spurned`` (every copy spurned so far, ``failed`` among them):
        their rows point at it in this table, which the used blobs stay marked in (a second table of the
        copies kept took another 60 bytes a blob).  Only the packs holding another copy are decoded.
        Returns the entries now kept of the blobs that moved."""
        failed = set(failed)
        moved = BlobIndex()
        for pid, offset in sorted(failed):
            no = self.packs.numbers.get(pid)
            if no is None:
                continue
            entries = self.packs.listed[no]
            for e, pos in zip(entries.decode(), _entry_starts(entries)):
                if e.offset == offset and self._t.entry_pos(e.blob_id, entries._buf) == pos:
                    moved.add(e.blob_id, 0, 0, 0, 0)
        if not len(moved):
            return []
        best: dict[bytes, tuple[tuple[bool, bool, int, int], int]] = {}
        for no, entries in enumerate(self.packs.listed):
            numbers = array("I", moved._t.among(entries._buf, entries._start, len(entries)))
            if not numbers:
                continue
            pid, decoded, starts = self.packs.pack_ids[no], entries.decode(), list(_entry_starts(entries))
            for i in numbers:
                e = decoded[i]
                rank = ((pid, e.offset) in spurned, e.kind == KIND_DELTA, no, i)
                if e.blob_id not in best or rank < best[e.blob_id][0]:
                    best[e.blob_id] = (rank, starts[i])
        for (_, _, no, _), pos in best.values():
            self._t.point(self.packs.listed[no]._buf, pos, self._row_packs[no])
        return [_entry_at(self.packs.listed[no]._buf, pos) for (_, _, no, _), pos in best.values()]

    def __contains__(self, blob_id: object) -> bool:
        return isinstance(blob_id, (bytes, bytearray, memoryview)) and len(blob_id) == ID_SIZE and blob_id in self._t

    def __iter__(self) -> Iterator[bytes]:
        return (b for b, _ in self._t.items())

    def __len__(self) -> int:
        return len(self._t)

    def contains_many(self, ids: bytes) -> bytes:
        return self._t.contains_many(ids)

    def live_in(self, no: int, used: Sequence[BlobIndex | UsedIds]) -> tuple[LiveEntries, int, int, int]:
        """Of pack number ``no``: the entries that are the copy kept of a blob one of ``used`` holds (a
        ``UsedIds`` over this table, or blob tables), the sum of all its entries' lengths, of those entries'
        lengths, and the bytes those entries take in a header."""
        entries = self.packs.listed[no]
        marks, tables = None, []
        for u in used:
            if isinstance(u, UsedIds):
                if u.table is not self._t:
                    raise ValueError("used ids marked in another table")
                marks = u.marks
            else:
                tables.append(u._t)
        numbers, total, live, live_entry_bytes = self._t._t.kept_in(
            entries._buf, entries._start, len(entries), self._row_packs[no], None, tuple(tables), marks)
        return LiveEntries(entries, array("I", numbers)), total, live, live_entry_bytes

    def live_in_reference(self, no: int, used: Sequence[BlobIndex]) -> tuple[LiveEntries, int, int, int]:
        """``live_in`` in Python: what the table's ``kept_in`` must give."""
        entries = self.packs.listed[no]
        decoded = entries.decode()
        numbers = array("I", [i for i, e in enumerate(decoded)
                              if self.kept_at(e.blob_id) == (no, i) and any(e.blob_id in u for u in used)])
        live = [decoded[i] for i in numbers]
        return (LiveEntries(entries, numbers), sum(e.length for e in decoded), sum(e.length for e in live),
                sum(ENTRY_SIZE + (ID_SIZE if e.kind == KIND_DELTA else 0) for e in live))

    def deltas(self) -> Iterator[tuple[bytes, bytes]]:
        """(id, base id) of every kept copy stored as a delta: the packs holding deltas are read, no other."""
        for no, entries in enumerate(self.packs.listed):
            if entries.has_deltas:
                for i, e in enumerate(entries.decode()):
                    if e.kind == KIND_DELTA and e.base_id is not None and self.kept_at(e.blob_id) == (no, i):
                        yield e.blob_id, e.base_id


def _entry_starts(entries: EncodedEntries) -> Iterator[int]:
    """Where each of a pack's entries starts in its buffer."""
    pos = entries._start
    if not entries.has_deltas:
        yield from range(pos, pos + ENTRY_SIZE * len(entries), ENTRY_SIZE)
        return
    buf = entries._buf
    for _ in range(len(entries)):
        yield pos
        pos += ENTRY_SIZE + (ID_SIZE if buf[pos] == KIND_DELTA else 0)


def _entry_at(buf: bytes, pos: int) -> PackEntry:
    kind, blob_id, offset, length, raw_length = _ENTRY.unpack_from(buf, pos)
    base = bytes(buf[pos + ENTRY_SIZE:pos + ENTRY_SIZE + ID_SIZE]) if kind == KIND_DELTA else None
    return PackEntry(blob_id, kind, offset, length, raw_length, base)


class UsedIds(Collection[bytes]):
    """Blob ids marked in the rows of a blob table (``marks``, a byte a row): prune's used blobs, marked in the
    table of the copies it keeps as the snapshots' manifests give them, where a table of their own took
    another 55 bytes a blob."""

    def __init__(self, table: BlobIndex) -> None:
        self.table, self.marks = table, bytearray(len(table))

    def mark(self, ids: bytes) -> bytes:
        """Mark ``ids`` (packed); returns those the table lacks, packed."""
        if len(self.marks) < len(self.table):  # rows added since
            self.marks += bytes(len(self.table) - len(self.marks))
        return self.table.mark(ids, self.marks)

    def onto(self, table: BlobIndex) -> UsedIds:
        """The same ids marked in another table holding them (the copies kept once some are spurned)."""
        out = UsedIds(table)
        for ids in id_chunks(self):
            out.mark(ids)
        return out

    def __contains__(self, blob_id: object) -> bool:
        if not isinstance(blob_id, (bytes, bytearray, memoryview)) or len(blob_id) != ID_SIZE:
            return False
        row = self.table.row(blob_id)  # type: ignore[arg-type]
        return 0 <= row < len(self.marks) and self.marks[row] == 1

    def packed(self) -> Iterator[bytes]:
        """The ids marked, packed, some thousands at a time, in row order."""
        t, marks = self.table._t, self.marks
        for a in range(0, min(len(t), len(marks)), _ROWS):
            ids = t.rows(a, min(len(t), len(marks), a + _ROWS))[0]
            yield b"".join([ids[32 * i:32 * i + 32] for i in range(len(ids) // 32) if marks[a + i]])

    def __iter__(self) -> Iterator[bytes]:
        for ids in self.packed():
            yield from (ids[i:i + ID_SIZE] for i in range(0, len(ids), ID_SIZE))

    def __len__(self) -> int:
        return self.marks.count(1)


def blob_set(ids: Iterable[bytes] = ()) -> BlobIndex:
    """A set of blob ids in a blob table (55 bytes each, where a set of ``bytes`` took some 110)."""
    out = BlobIndex()
    add_ids(out, ids)
    return out


def add_ids(table: BlobIndex, ids: Iterable[bytes] | bytes) -> None:
    """Add ids (packed 32-byte ids, or single ones) to a blob table used as a set."""
    packed = ids if isinstance(ids, (bytes, bytearray, memoryview)) else b"".join(ids)
    if len(packed):
        table.add_many(packed, 0, 0, 0, 0)


def id_chunks(ids: Collection[bytes]) -> Iterator[bytes]:
    """Every id of ``ids`` (a blob table, or any collection of ids), packed, some thousands at a time."""
    if isinstance(ids, UsedIds):
        yield from ids.packed()
        return
    t = getattr(ids, "_t", None)
    if t is not None:
        for a in range(0, len(t), _ROWS):
            yield t.rows(a, min(len(t), a + _ROWS))[0]
        return
    batch: list[bytes] = []
    for b in ids:
        batch.append(b)
        if len(batch) >= _ROWS:
            yield b"".join(batch)
            batch.clear()
    if batch:
        yield b"".join(batch)
