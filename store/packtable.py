"""What prune holds of the index: every pack's entries as the index objects encode them, and the copy of each
blob it keeps, in a few dozen bytes per blob.

A prune held each entry as a ``PackEntry`` (its id a ``bytes``, its numbers ``int`` objects), each used id as
a ``bytes`` in a set, and dicts keyed by both: some 740 bytes per blob, 37 GB at 50 million.  Here a pack's
entries stay in the decoded index object they came in (45 bytes each, 77 for a delta), decoded a pack at a
time while it is looked at; the kept copies are the rows of the repository's own index, made in pack id order
(``store/_blobtable.c``: 55 bytes per id, and 4 for the entry number of each), the used ids a byte per row of
it, and a pack's live blobs are found there (``kept_in``) and held as entry numbers.
"""
from __future__ import annotations

import itertools
import struct
from array import array
from typing import Collection, Iterable, Iterator, Mapping, Sequence

from .blob import ID_SIZE, KIND_DELTA
from .blobindex import BlobIndex, BlobLocation
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


_NUMBER = struct.Struct("=I")


class KeptCopies(Mapping[bytes, PackEntry]):
    """For each blob, the copy a prune keeps live (``prune.kept_copies``, whose rule this follows): the first
    stored whole in pack id order, else the first delta; a copy ``spurned`` ((pack id, offset)) only where the
    blob has no other.  Held as a blob table's rows (pack number, offset, lengths, kind: the rows the
    repository's index holds) and each row's entry number in its pack (``numbers``, a uint32 a row), which
    tells the entry kept where two of one pack name one blob at one offset.

    Unspurned, these are the rows ``BlobIndex.add_entries`` gives the packs in pack id order: the repository's
    index made so (``Repo.install_packs``) is given as ``table``, with its ``numbers`` and each pack's number in
    it (``row_packs``), and a prune holds one table of the blobs, not two."""

    def __init__(self, packs: PackTable, spurned: frozenset[tuple[bytes, int]] | set[tuple[bytes, int]] = frozenset(),
                 *, table: BlobIndex | None = None, numbers: bytearray | None = None,
                 row_packs: Sequence[int] | None = None) -> None:
        self.packs = packs
        self._positions: dict[int, array] = {}  # pack number -> where each entry starts (packs holding deltas)
        if table is not None:
            if spurned or numbers is None or row_packs is None:
                raise ValueError("a table given needs its numbers and pack numbers, and spurns nothing")
            self._t, self.numbers = table, numbers
            self._row_packs = array("I", row_packs)
        else:
            self._t, self.numbers = self._build(packs, spurned)
            self._row_packs = array("I", range(len(packs)))
        self._pack_at = {r: no for no, r in enumerate(self._row_packs)}

    @staticmethod
    def _build(packs: PackTable, spurned: frozenset[tuple[bytes, int]] | set[tuple[bytes, int]]
               ) -> tuple[BlobIndex, bytearray]:
        """The table and numbers: each pack's entries in pack id order as ``add_entries`` takes them (a whole
        copy takes a delta's place, else the first stays), the spurned copies left out; then the spurned, of
        the blobs still absent, whole ones first."""
        t, numbers = BlobIndex(sum(len(e) for e in packs.listed)), bytearray()
        spurned_in = sorted({packs.numbers[pid] for pid, _ in spurned if pid in packs.numbers})
        shunned = set(spurned_in)
        for no, entries in enumerate(packs.listed):
            if no not in shunned:
                t.add_entries(entries._buf, entries._start, len(entries), no, None, numbers)
                continue
            pid = packs.pack_ids[no]
            for i, e in enumerate(entries.decode()):
                if (pid, e.offset) in spurned:
                    continue
                row = t.row(e.blob_id)
                if row < 0:
                    t.add(e.blob_id, no, e.offset, e.length, e.raw_length, e.kind)
                    numbers += _NUMBER.pack(i)
                elif t.get(e.blob_id).flags == KIND_DELTA and e.kind != KIND_DELTA:  # type: ignore[union-attr]
                    t.replace(e.blob_id, BlobLocation(no, e.offset, e.length, e.raw_length, e.kind))
                    _NUMBER.pack_into(numbers, 4 * row, i)
        for delta in (False, True):
            for no in spurned_in:
                pid = packs.pack_ids[no]
                for i, e in enumerate(packs.listed[no].decode()):
                    if (pid, e.offset) in spurned and (e.kind == KIND_DELTA) == delta and e.blob_id not in t:
                        t.add(e.blob_id, no, e.offset, e.length, e.raw_length, e.kind)
                        numbers += _NUMBER.pack(i)
        return t, numbers

    @property
    def table(self) -> BlobIndex:
        """The blob table holding the copies kept (``UsedIds`` marks its rows)."""
        return self._t

    def _kept(self, blob_id: bytes) -> tuple[int, int] | None:
        loc, row = self._t.get(blob_id), self._t.row(blob_id)
        if loc is None or row < 0 or 4 * row >= len(self.numbers):
            return None
        no = self._pack_at.get(loc.pack_no)
        return None if no is None else (no, _NUMBER.unpack_from(self.numbers, 4 * row)[0])

    def kept_at(self, blob_id: bytes) -> tuple[int, int] | None:
        """(pack number, entry number) of the copy kept, or None when no index lists the blob."""
        return self._kept(blob_id) if blob_id in self else None

    def pack_of(self, blob_id: bytes) -> bytes:
        """The id of the pack holding the copy kept."""
        return self.packs.pack_ids[self._kept(blob_id)[0]]  # type: ignore[index]

    def _entry_at(self, no: int, i: int) -> PackEntry:
        entries = self.packs.listed[no]
        if not entries.has_deltas:
            pos = entries._start + i * ENTRY_SIZE
        else:
            positions = self._positions.get(no)
            if positions is None:
                positions = self._positions[no] = array("Q")
                pos = entries._start
                for e in entries.decode():
                    positions.append(pos)
                    pos += ENTRY_SIZE + (ID_SIZE if e.kind == KIND_DELTA else 0)
            pos = positions[i]
        kind, blob_id, offset, length, raw_length = _ENTRY.unpack_from(entries._buf, pos)
        base = bytes(entries._buf[pos + ENTRY_SIZE:pos + ENTRY_SIZE + ID_SIZE]) if kind == KIND_DELTA else None
        return PackEntry(blob_id, kind, offset, length, raw_length, base)

    def __getitem__(self, blob_id: bytes) -> PackEntry:
        at = self._kept(blob_id) if blob_id in self else None
        if at is None:
            raise KeyError(blob_id)
        return self._entry_at(*at)

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
            entries._buf, entries._start, len(entries), self._row_packs[no], self.numbers, tuple(tables), marks)
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
