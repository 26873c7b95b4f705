"""The in-memory blob index: blob id -> where the blob lives, in under 64 bytes per blob (a delta's base: 36 more).

A dict of 32-byte keys costs ~200 bytes per entry; at 50 million chunks that
is 10 GB.  Here entries live in flat columns (49 bytes each: the id, four
uint32 fields, one flag byte), appended in insertion order, and an
open-addressing hash table of uint32 entry numbers (linear probing, load at
most 0.7) finds them: about 5-8 bytes more per entry.  Columns grow in place
by 1/8 at a time (``realloc``, which for large blocks moves pages instead of
copying them), so there is no moment where two copies of the index are alive.

The table is addressed by the first 8 bytes of the id, mixed by a
multiplicative hash (ids are keyed hashes, so this only guards against
non-random test ids); every hit is confirmed against the full 32-byte id.

The columns and the table are C (``store/_blobtable.c``): a lookup costs
about what the Python call does, and loading an index object adds its
entries straight from the object's bytes, with no Python object per entry.
A delta's base id is kept with its row (a column of 32-byte bases and a
uint32 a row naming its own, made once some row has one): a dict of the
repository's deltas' bases took ~230 bytes each (11 GB at 50 million).
"""
from __future__ import annotations

import struct
from array import array
from operator import index as _as_int
from typing import Iterable, Iterator, NamedTuple, Sequence

from . import _blobtable
from .blob import KIND_DELTA

__all__ = ["BlobIndex", "BlobLocation", "ID_SIZE"]

ID_SIZE = 32
U32_MAX = 0xFFFFFFFF
_ROW = struct.Struct("=4IBB")  # a row ``add_entries`` reports replaced, after its id: fields, flag, whether a base follows
_ROWS = 8192  # entries per step of items()
_NONE = array("B", [0])  # each field of an IdMap's keys: one value for all


class BlobLocation(NamedTuple):
    pack_no: int  # number into the caller's list of pack ids
    offset: int
    length: int  # stored (compressed, sealed) length
    raw_length: int  # plaintext length
    flags: int


def _as_id(blob_id: bytes) -> bytes | bytearray | memoryview:
    if not isinstance(blob_id, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob id must be bytes, got {type(blob_id).__name__}")
    if len(blob_id) != ID_SIZE:
        raise ValueError(f"blob id must be {ID_SIZE} bytes, got {len(blob_id)}")
    return blob_id


def _as_ids(ids: object) -> object:
    """Many ids as one buffer of packed ids: a bytes-like (or C-contiguous array of bytes) as it is, else a
    sequence of single ids joined."""
    try:
        memoryview(ids)  # type: ignore[arg-type]
        return ids
    except TypeError:
        return b"".join(_as_id(b) for b in ids)  # type: ignore[attr-defined]


def _column(values: object, name: str, maximum: int) -> object:
    """A scalar or sequence of ints as a buffer the table reads (and range-checks)."""
    if isinstance(values, bool):
        raise TypeError(f"{name} must be integers, got bool")
    try:
        memoryview(values)  # type: ignore[arg-type]
        return values
    except TypeError:
        pass
    try:
        items = [_as_int(values)]  # type: ignore[arg-type]
    except TypeError:
        items = list(values)  # type: ignore[call-overload]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise TypeError(f"{name} must be integers") from None
    try:
        return array("q", items)
    except OverflowError:
        raise ValueError(f"{name} out of range 0..{maximum}") from None


def _check_u32(name: str, v: int) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        v = _as_int(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}") from None
    if not 0 <= v <= U32_MAX:
        raise ValueError(f"{name} out of range 0..{U32_MAX}: {v}")
    return v


class BlobIndex:
    """Blob id (32 bytes) -> BlobLocation, compact enough for 50 million blobs in ~3 GB."""

    def __init__(self, capacity_hint: int = 0, *, by_ref: bool = False) -> None:
        """``by_ref``: each row added from an index object's bytes (``add_entries``) points at its entry where
        it lies, the bytes kept alive (a ``bytes`` object, else a copy of the entries), rather than holding a
        copy of its id and fields: 12 bytes a row where they took 49, for the table of the copies a prune
        keeps beside the index objects it holds anyway; rows added otherwise take a record of their own."""
        self._t = _blobtable.Table(capacity_hint, by_ref)

    @property
    def by_ref(self) -> bool:
        return self._t.by_ref

    @property
    def _slots(self) -> int:
        return self._t.slots

    def __len__(self) -> int:
        return len(self._t)

    def __contains__(self, blob_id: bytes) -> bool:
        return self._t.find(_as_id(blob_id))

    def get(self, blob_id: bytes) -> BlobLocation | None:
        """Where the blob is stored, or None."""
        r = self._t.get(_as_id(blob_id))
        return None if r is None else BlobLocation._make(r)

    def add(self, blob_id: bytes, pack_no: int, offset: int, length: int, raw_length: int,
            flags: int = 0, base: bytes | None = None) -> bool:
        """Record a blob; False (and no change) when the id is already present.  ``base``: a delta's (flags
        KIND_DELTA) base id, kept with its row (``base_of``); ignored for another kind."""
        values = (_check_u32("pack_no", pack_no), _check_u32("offset", offset),
                  _check_u32("length", length), _check_u32("raw_length", raw_length))
        try:
            flag = -1 if isinstance(flags, bool) else _as_int(flags)
        except TypeError:
            flag = -1
        if not 0 <= flag <= 255:
            raise ValueError(f"flags must be an integer 0..255, got {flags!r}")
        return self._t.add(_as_id(blob_id), *values, flag, None if base is None else _as_id(base))

    def replace(self, blob_id: bytes, loc: BlobLocation, base: bytes | None = None) -> bool:
        """Point a blob present at another copy of it (a read of the one held failed), with that copy's base
        (a delta's; None for one stored whole); False (and no change) when the id is absent.  An iteration
        going on meanwhile goes on."""
        return self._t.replace(_as_id(blob_id), loc.pack_no, loc.offset, loc.length, loc.raw_length, loc.flags,
                               None if base is None else _as_id(base))

    def base_of(self, blob_id: bytes) -> bytes | None:
        """The base id of the copy the row holds, a delta's (read from its entry, or kept with its row); None
        for a blob stored whole, a delta recorded without one, or an id absent."""
        return self._t.base_of(_as_id(blob_id))

    def chain(self, blob_id: bytes, limit: int) -> list[bytes]:
        """The bases below a blob, nearest first: its row's base, that base's, ... down to a blob stored whole
        or absent (listed), at most ``limit`` of them; one native call (``check`` asks it of every delta)."""
        packed = self._t.chain(_as_id(blob_id), limit)
        return [packed[i:i + ID_SIZE] for i in range(0, len(packed), ID_SIZE)]

    def depth(self, blob_id: bytes, limit: int) -> int:
        """``len(chain(blob_id, limit))``, without an object a base."""
        return len(self._t.chain(_as_id(blob_id), limit)) // ID_SIZE

    def unreadable_deltas(self) -> set[bytes]:
        """The deltas (rows of flags KIND_DELTA) whose chain of bases does not reach a blob held whole: a base
        absent, a delta without a base, or a chain that loops back on itself (``deltabase.unreadable_deltas``,
        natively: one lookup a delta, no object a delta when none is missing)."""
        packed = self._t.unreadable_deltas()
        return {packed[i:i + ID_SIZE] for i in range(0, len(packed), ID_SIZE)}

    def delta_entries(self, buf: bytes | memoryview, pos: int, count: int, marks: bytearray | None = None,
                      limit: int = -1, depths: bytearray | None = None) -> list[int]:
        """Where those of ``count`` index-object entries at ``pos`` of ``buf`` lie that are deltas whose base is
        absent, whose base's row or own row is marked (a nonzero byte of ``marks``, a byte a row), or whose own
        row's chain of bases is longer than ``limit`` (when not negative): the deltas ``check`` looks at, found
        in one native pass, without an object a delta.  ``depths``: a byte a row, zeros at first, that keeps the
        chains' lengths found from one call to the next (for one ``limit``, below 254), so that the deltas of a
        chain walk it once.  Rows past the end of either (added since: a writer's) are unmarked."""
        packed = self._t.delta_entries(buf, pos, count, marks, limit, depths)
        return memoryview(packed).cast("q").tolist()

    def add_many(self, ids: bytes | Sequence[bytes], pack_no: int | Sequence[int], offsets: int | Sequence[int],
                 lengths: int | Sequence[int], raw_lengths: int | Sequence[int],
                 flags: int | Sequence[int] = 0, bases: bytes | Sequence[bytes | None] | None = None) -> int:
        """Record many blobs at once (each field a scalar or one value per id); returns how many were new.

        Ids already present, and repeats within ``ids``, are skipped: the first
        occurrence wins, exactly as a loop of ``add`` calls would do.  Nothing is
        added when any value is out of range.  ``bases``: one per id, kept for
        the deltas among them (packed, or a sequence: None for a blob stored
        whole; a delta without its base is refused).
        """
        q = _as_ids(ids)
        cols = [_column(pack_no, "pack_no", U32_MAX), _column(offsets, "offsets", U32_MAX),
                _column(lengths, "lengths", U32_MAX), _column(raw_lengths, "raw_lengths", U32_MAX),
                _column(flags, "flags", 255)]
        if bases is not None and not isinstance(bases, (bytes, bytearray, memoryview)):
            bases = list(bases)
            kinds = [flags] * len(bases) if isinstance(flags, int) else list(flags)  # type: ignore[arg-type]
            if any(b is None and k == KIND_DELTA for b, k in zip(bases, kinds)):
                raise ValueError("a delta is given without its base")
            bases = b"".join(bytes(ID_SIZE) if b is None else _as_id(b) for b in bases)
        return self._t.add_many(q, *cols, bases)

    def add_entries(self, buf: bytes, pos: int, count: int, pack_no: int,
                    replaced: list[tuple[bytes, BlobLocation, bytes | None]] | None = None,
                    numbers: bytearray | None = None) -> int:
        """Record ``count`` entries of an index object (``store/FORMAT.md``) starting at ``pos``, all in pack
        number ``pack_no``, their kind as flags; returns how many were new.  A blob stored whole replaces a
        delta of the same id already recorded, whatever the order the index objects come in: a delta whose
        base was lost, stored again whole by a later backup, is then read from the new copy.  The deltas
        replaced are appended to ``replaced``, when given, with where they lay and their bases.  ``numbers`` (a uint32 a row,
        native order): each row added or taken over gets its entry's number in the pack (prune tells the copy
        it keeps by it: two entries of one pack may name one blob at one offset)."""
        pack_no = _check_u32("pack_no", pack_no)
        if replaced is None:
            return self._t.add_entries(buf, pos, count, pack_no, None, numbers)
        rows = bytearray()
        added = self._t.add_entries(buf, pos, count, pack_no, rows, numbers)
        for at in range(0, len(rows), _ROW.size + 2 * ID_SIZE):
            *fields, has_base = _ROW.unpack_from(rows, at + ID_SIZE)
            base = bytes(rows[at + ID_SIZE + _ROW.size : at + 2 * ID_SIZE + _ROW.size]) if has_base else None
            replaced.append((bytes(rows[at : at + ID_SIZE]), BlobLocation._make(fields), base))
        return added

    def row(self, blob_id: bytes) -> int:
        """The id's row (its place in insertion order), or -1 when absent."""
        return self._t.row(_as_id(blob_id))

    def entry_pos(self, blob_id: bytes, buf: bytes) -> int:
        """Where in ``buf`` the entry the blob's row points at lies (a ``by_ref`` table), or -1 where the blob
        is absent or its row points elsewhere: tells one entry of a pack from another naming the same blob."""
        return self._t.entry_pos(_as_id(blob_id), buf)

    def point(self, buf: bytes, pos: int, pack_no: int) -> bool:
        """The row of the blob whose entry lies at ``pos`` of ``buf`` (index-object bytes) points at that entry,
        in pack number ``pack_no``: another copy of it (a ``by_ref`` table); False (no change) where absent."""
        return self._t.point(buf, pos, _check_u32("pack_no", pack_no))

    def mark(self, ids: bytes | Sequence[bytes], marks: bytearray) -> bytes:
        """Set ``marks[row]`` to 1 at the row of each of ``ids`` present (a used blob, for prune, without a
        table of its own); returns those absent, packed."""
        return self._t.mark(_as_ids(ids), marks)

    def contains_many(self, ids: bytes | Sequence[bytes]) -> bytes:
        """One byte per id: 1 where present, 0 where not."""
        return self._t.contains_many(_as_ids(ids))

    def has_all(self, ids: bytes) -> bool:
        """Whether every id of ``ids`` (packed 32-byte ids) is present: one native call, atomic under the
        GIL, so it needs no lock against a writer adding entries (a backup asks it for every file)."""
        return 0 not in self._t.contains_many(ids)

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every (id, location), in insertion order; changing the index meanwhile raises RuntimeError."""
        t = self._t
        version = t.version
        for a in range(0, len(t), _ROWS):
            if t.version != version:
                raise RuntimeError("BlobIndex changed during iteration")
            b = min(len(t), a + _ROWS)
            ids, fields, flags = t.rows(a, b)
            f = memoryview(fields).cast("I")
            for i in range(b - a):
                yield ids[i * ID_SIZE:(i + 1) * ID_SIZE], BlobLocation(f[4 * i], f[4 * i + 1], f[4 * i + 2],
                                                                      f[4 * i + 3], flags[i])
                if t.version != version:
                    raise RuntimeError("BlobIndex changed during iteration")

    def copy(self, without: bytes | Sequence[bytes] | None = None) -> BlobIndex:
        """Another index of the same rows, in the same order, their bases with them; of a ``by_ref`` one,
        pointing at the same entries (a read during a prune that goes over to another copy of a blob does so
        in a copy: one of every row's id and fields took 55 bytes a blob).  ``without``: ids whose rows are
        left out."""
        out = BlobIndex.__new__(BlobIndex)
        out._t = self._t.copy(None if without is None else _as_ids(without))
        return out

    def remove_packs(self, pack_nos: Iterable[int]) -> int:
        """Drop every entry stored in one of ``pack_nos`` (after prune deleted them); returns how many."""
        packs = sorted({_as_int(p) for p in pack_nos})
        return self._t.remove_packs(array("I", [p for p in packs if 0 <= p <= U32_MAX]))

    def memory_bytes(self) -> int:
        """Bytes held by the index's columns and table (capacity included, fixed overhead excluded)."""
        return self._t.memory_bytes()


class IdMap:
    """Blob id -> another blob id (a copy's source ids to the destination's), in ~90 bytes an entry: the keys
    in a blob table, the values in one column by the keys' rows.  A dict of bytes took ~170 (a copy of ten
    million chunks: 1.7 GB held to its end).  One thread writes; others may read meanwhile."""

    def __init__(self) -> None:
        self._t = _blobtable.Table(0)
        self._values = bytearray()

    def __len__(self) -> int:
        return len(self._t)

    def __contains__(self, key: bytes) -> bool:
        return self._t.find(_as_id(key))

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        r = self._t.row(_as_id(key))
        return default if r < 0 else bytes(self._values[r * ID_SIZE:(r + 1) * ID_SIZE])

    def __getitem__(self, key: bytes) -> bytes:
        r = self._t.row(_as_id(key))
        if r < 0:
            raise KeyError(key)
        return bytes(self._values[r * ID_SIZE:(r + 1) * ID_SIZE])

    def __setitem__(self, key: bytes, value: bytes) -> None:
        _as_id(value)
        self._values += value  # before its key: a reader that finds the key finds its value
        if not self._t.add(_as_id(key), 0, 0, 0, 0, 0):
            del self._values[-ID_SIZE:]
            r = self._t.row(key)
            self._values[r * ID_SIZE:(r + 1) * ID_SIZE] = value

    def update(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """As a dict's: a key given twice takes its last value."""
        items = dict(pairs)
        keys, values = b"".join(items), b"".join(items.values())
        if len(keys) != len(values) or len(keys) != ID_SIZE * len(items) or 1 in self._t.contains_many(keys):
            for k, v in items.items():  # (one by one: checked, and a key present takes its new value)
                self[k] = v
            return
        self._values += values  # before their keys, as in ``__setitem__``
        self._t.add_many(keys, *[_NONE] * 5)

    def lookup(self, keys: bytes | memoryview) -> bytes:
        """The values of ``keys`` (packed ids), packed; KeyError when one is absent."""
        return self._t.gather(_as_ids(keys), self._values, ID_SIZE)

    def memory_bytes(self) -> int:
        """Bytes held by the keys' table and the values' column (capacity included)."""
        return self._t.memory_bytes() + self._values.__alloc__()
