"""What prune holds of the index: every pack's entries as the index objects encode them, and the copy of each
blob it keeps, in a few dozen bytes per blob.

A prune held each entry as a ``PackEntry`` (its id a ``bytes``, its numbers ``int`` objects), each used id as
a ``bytes`` in a set, and dicts keyed by both: some 740 bytes per blob, 37 GB at 50 million.  Here a pack's
entries stay in the decoded index object they came in (45 bytes each, 77 for a delta), decoded a pack at a
time while it is looked at; the kept copies and the used ids live in blob tables (``store/_blobtable.c``: 55
bytes per id), and a pack's live blobs are found there (``kept_in``) and held as entry numbers.
"""
from __future__ import annotations

from array import array
from typing import Collection, Iterable, Iterator, Mapping, Sequence

from .blob import ID_SIZE, KIND_DELTA
from .blobindex import BlobIndex
from .indexfile import IndexColumns
from .pack import _ENTRY, ENTRY_SIZE, DecodedOnRead, EncodedEntries, PackEntry

__all__ = ["KeptCopies", "LiveEntries", "PackTable", "blob_set", "id_chunks"]

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
        def listings() -> Iterator[tuple[bytes, EncodedEntries]]:
            for d in objects:
                ends = [s - 36 for s in d.starts[1:]] + [len(d.plain)]  # each pack's id and count follow the last
                for pid, count, start, end in zip(d.pack_ids, d.counts, d.starts, ends):
                    yield pid, EncodedEntries(d.plain, start, count, end)
        return cls(listings())

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


def _ordinals(count: int) -> array:
    return array("I", range(count))


class KeptCopies(Mapping[bytes, PackEntry]):
    """For each blob, the copy a prune keeps live (``prune.kept_copies``, whose rule this follows): the first
    stored whole in pack id order, else the first delta; a copy ``spurned`` ((pack id, offset)) only where the
    blob has no other.  Held as blob id -> (pack number, entry number) in a blob table; ``kept`` tells
    whether an entry is the one kept."""

    def __init__(self, packs: PackTable, spurned: frozenset[tuple[bytes, int]] | set[tuple[bytes, int]] = frozenset()
                 ) -> None:
        self.packs = packs
        total = sum(len(e) for e in packs.listed)
        self._t = BlobIndex(total)
        self._positions: dict[int, array] = {}  # pack number -> where each entry starts (packs holding deltas)
        spurned_in = {packs.numbers[pid] for pid, _ in spurned if pid in packs.numbers}
        # In rank order: whole then delta, each unspurned then spurned; within a rank, pack id order.  A blob
        # table adds only ids it lacks, so each blob keeps the first copy of the best rank.
        ranks = [(False, False), (False, True)] + ([(True, False), (True, True)] if spurned_in else [])
        for shunned, delta in ranks:
            for no, entries in enumerate(packs.listed):
                if not entries.has_deltas and no not in spurned_in:
                    if not delta and not shunned:
                        self._add_plain(no, entries)
                    continue
                pid = packs.pack_ids[no]
                picked = [(i, e) for i, e in enumerate(entries.decode())
                          if (e.kind == KIND_DELTA) == delta and ((pid, e.offset) in spurned) == shunned]
                if picked:
                    self._t.add_many(b"".join(e.blob_id for _, e in picked), no, array("I", [i for i, _ in picked]),
                                     0, 0, bytes(e.kind for _, e in picked))

    def _add_plain(self, no: int, entries: EncodedEntries) -> None:
        """A pack of whole blobs alone: its ids and kinds read at their fixed places."""
        buf, start, end = entries._buf, entries._start, entries._end
        ids = b"".join([buf[p:p + ID_SIZE] for p in range(start + 1, end, ENTRY_SIZE)])
        self._t.add_many(ids, no, _ordinals(len(entries)), 0, 0, bytes(buf[start:end:ENTRY_SIZE]))

    def kept_at(self, blob_id: bytes) -> tuple[int, int] | None:
        """(pack number, entry number) of the copy kept, or None when no index lists the blob."""
        loc = self._t.get(blob_id)
        return None if loc is None else (loc.pack_no, loc.offset)

    def pack_of(self, blob_id: bytes) -> bytes:
        """The id of the pack holding the copy kept."""
        return self.packs.pack_ids[self._t.get(blob_id).pack_no]  # type: ignore[union-attr]

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
        loc = self._t.get(blob_id)
        if loc is None:
            raise KeyError(blob_id)
        return self._entry_at(loc.pack_no, loc.offset)

    def __contains__(self, blob_id: object) -> bool:
        return isinstance(blob_id, (bytes, bytearray, memoryview)) and len(blob_id) == ID_SIZE and blob_id in self._t

    def __iter__(self) -> Iterator[bytes]:
        return (b for b, _ in self._t.items())

    def __len__(self) -> int:
        return len(self._t)

    def contains_many(self, ids: bytes) -> bytes:
        return self._t.contains_many(ids)

    def live_in(self, no: int, used: Sequence[BlobIndex]) -> tuple[LiveEntries, int, int, int]:
        """Of pack number ``no``: the entries that are the copy kept of a blob one of ``used`` holds, the sum of
        all its entries' lengths, of those entries' lengths, and the bytes those entries take in a header."""
        entries = self.packs.listed[no]
        numbers, total, live, live_entry_bytes = self._t._t.kept_in(
            entries._buf, entries._start, len(entries), no, tuple(u._t for u in used))
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
