"""The in-memory blob index: blob id -> where the blob lives, in under 64 bytes per blob.

A dict of 32-byte keys costs ~200 bytes per entry; at 50 million chunks that
is 10 GB.  Here entries live in flat numpy columns (49 bytes each: the id,
four uint32 fields, one flag byte), appended in insertion order, and an
open-addressing hash table of uint32 entry numbers (linear probing, load at
most 0.7) finds them: about 5-8 bytes more per entry.  Columns grow in place
by 1/8 at a time (``ndarray.resize`` reallocates, which for large blocks moves
pages instead of copying them), so there is no moment where two copies of the
index are alive.

The table is addressed by the first 8 bytes of the id, mixed by a
multiplicative hash (ids are keyed hashes, so this only guards against
non-random test ids); every hit is confirmed against the full 32-byte id.

Single lookups cost a few hundred nanoseconds of Python; ``contains_many`` and
``add_many`` work on numpy arrays of ids, in batches, for loading index files
and for checking a whole pack's worth of chunks at once.
"""
from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

__all__ = ["BlobIndex", "BlobLocation", "ID_SIZE"]

ID_SIZE = 32
U32_MAX = 0xFFFFFFFF
MAX_ENTRIES = U32_MAX - 1  # entry numbers are stored +1 in a uint32 table (0 = empty slot)

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads structured prefixes over the table
_MIX_NP = np.uint64(_MIX)
_M64 = (1 << 64) - 1
_MAX_LOAD = 0.7  # rebuild the table above this load...
_TARGET_LOAD = 0.56  # ...to this one (x1.25 slots), keeping table bytes per entry in [5.7, 7.2]
_MIN_SLOTS = 16
_BATCH = 1 << 18  # rows per vectorised step: bounds temporary memory on huge inputs


class BlobLocation(NamedTuple):
    pack_no: int  # number into the caller's list of pack ids
    offset: int
    length: int  # stored (compressed, sealed) length
    raw_length: int  # plaintext length
    flags: int


def _slots_for(entries: int, load: float) -> int:
    slots = max(_MIN_SLOTS, int(entries / load) + 1)
    if slots > U32_MAX:
        raise OverflowError(f"a blob index holds at most {int(U32_MAX * _MAX_LOAD)} entries")
    return slots


def _as_id(blob_id: bytes) -> bytes:
    if type(blob_id) is not bytes:
        if not isinstance(blob_id, (bytes, bytearray, memoryview)):
            raise TypeError(f"blob id must be bytes, got {type(blob_id).__name__}")
        blob_id = bytes(blob_id)
    if len(blob_id) != ID_SIZE:
        raise ValueError(f"blob id must be {ID_SIZE} bytes, got {len(blob_id)}")
    return blob_id


def _as_ids(ids: bytes | bytearray | memoryview | np.ndarray | Sequence[bytes]) -> np.ndarray:
    """Any accepted form of many ids as a C-contiguous (n, 32) uint8 array."""
    if isinstance(ids, np.ndarray):
        if ids.dtype != np.uint8 or ids.ndim != 2 or ids.shape[1] != ID_SIZE:
            raise ValueError(f"id array must be uint8 of shape (n, {ID_SIZE}), got {ids.dtype} {ids.shape}")
        return np.ascontiguousarray(ids)
    if isinstance(ids, (bytes, bytearray, memoryview)):
        raw = memoryview(ids).cast("B")
        if len(raw) % ID_SIZE:
            raise ValueError(f"packed ids must be a multiple of {ID_SIZE} bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(-1, ID_SIZE)
    parts = [_as_id(b) for b in ids]
    return np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(-1, ID_SIZE)


def _column(values: object, n: int, name: str, maximum: int) -> np.ndarray:
    """A scalar or length-n sequence of ints, range-checked, as an array broadcast to n."""
    try:
        arr = np.asarray(values)
    except OverflowError:
        raise ValueError(f"{name} out of range 0..{maximum}") from None
    if arr.dtype.kind == "O" and arr.size and all(isinstance(v, int) for v in arr.flat):
        raise ValueError(f"{name} out of range 0..{maximum}")
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name} must be integers, got {arr.dtype}")
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D sequence")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > maximum):
        raise ValueError(f"{name} out of range 0..{maximum}")
    try:
        return np.broadcast_to(arr, (n,))
    except ValueError:
        raise ValueError(f"{name} has {arr.shape[0]} values for {n} ids") from None


def _check_u32(name: str, v: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    if not 0 <= v <= U32_MAX:
        raise ValueError(f"{name} out of range 0..{U32_MAX}: {v}")
    return v


def _home(k0: np.ndarray, slots: int) -> np.ndarray:
    """Home slot of each id prefix: the top 32 bits of the mixed prefix, scaled to the table size."""
    h = (k0 * _MIX_NP) >> np.uint64(32)
    return ((h * np.uint64(slots)) >> np.uint64(32)).astype(np.int64)


def _copy_resized(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=arr.dtype)
    keep = min(shape[0], arr.shape[0])
    out[:keep] = arr[:keep]
    return out


class BlobIndex:
    """Blob id (32 bytes) -> BlobLocation, compact enough for 50 million blobs in ~3 GB."""

    def __init__(self, capacity_hint: int = 0) -> None:
        if capacity_hint < 0:
            raise ValueError("capacity_hint must not be negative")
        self._n = 0
        self._version = 0
        cap = max(int(capacity_hint), 16)  # never empty: memoryviews cannot cast zero-size arrays
        self._ids = np.zeros((cap, ID_SIZE), dtype=np.uint8)
        self._loc = np.zeros((cap, 4), dtype=np.uint32)  # pack_no, offset, length, raw_length
        self._flags = np.zeros(cap, dtype=np.uint8)
        self._table = np.zeros(_slots_for(cap, 0.68), dtype=np.uint32)
        self._set_views()

    # ------------------------------------------------------------------ storage helpers

    def _set_views(self) -> None:
        # memoryviews give plain-int element access several times faster than numpy scalars
        self._tv = memoryview(self._table)
        self._iv = memoryview(self._ids).cast("B")
        self._lv = memoryview(self._loc).cast("B").cast("I")
        self._fv = memoryview(self._flags)
        self._slots = len(self._table)
        self._max_fill = int(self._slots * _MAX_LOAD)

    def _drop_views(self) -> None:
        for name in ("_tv", "_iv", "_lv", "_fv"):
            getattr(self, name).release()

    def _set_capacity(self, cap: int) -> None:
        # In-place resize (realloc) when numpy sees no other reference to the array,
        # else a copy.  Called on the attribute directly so the refcount check can pass.
        self._drop_views()
        try:
            self._ids.resize((cap, ID_SIZE), refcheck=True)
        except ValueError:
            self._ids = _copy_resized(self._ids, (cap, ID_SIZE))
        try:
            self._loc.resize((cap, 4), refcheck=True)
        except ValueError:
            self._loc = _copy_resized(self._loc, (cap, 4))
        try:
            self._flags.resize((cap,), refcheck=True)
        except ValueError:
            self._flags = _copy_resized(self._flags, (cap,))
        self._set_views()

    def _reserve(self, needed: int) -> None:
        if needed > MAX_ENTRIES:
            raise OverflowError(f"a blob index holds at most {MAX_ENTRIES} entries")
        cap = len(self._flags)
        if needed > cap:
            self._set_capacity(max(needed, cap + cap // 8, 256))

    def _rebuild(self, slots: int) -> None:
        """A fresh table of ``slots`` slots holding every entry."""
        self._drop_views()
        self._table = np.zeros(0, dtype=np.uint32)  # free the old table before allocating the new
        self._table = np.zeros(slots, dtype=np.uint32)
        self._set_views()
        self._insert_range(0, self._n)

    def _insert_range(self, lo: int, hi: int) -> None:
        """Put entries lo..hi-1 (distinct ids, not yet in the table) into the table."""
        table, slots = self._table, self._slots
        ids64 = self._ids.view("<u8")
        for a in range(lo, hi, _BATCH):
            b = min(hi, a + _BATCH)
            pos = _home(ids64[a:b, 0], slots)
            vals = np.arange(a + 1, b + 1, dtype=np.uint32)
            pending = np.arange(b - a)
            while pending.size:
                s = pos[pending]
                free = np.nonzero(table[s] == 0)[0]
                if free.size:
                    fs = s[free]
                    table[fs] = vals[pending[free]]  # several may target one slot: one of them wins
                    won = free[table[fs] == vals[pending[free]]]
                    left = np.ones(pending.size, dtype=bool)
                    left[won] = False
                    pending = pending[left]
                nxt = pos[pending] + 1
                nxt[nxt == slots] = 0
                pos[pending] = nxt

    def _probe(self, blob_id: bytes) -> tuple[int, int]:
        """(entry number, -1) when present, else (-1, the empty slot where it would go)."""
        slots = self._slots
        s = ((((int.from_bytes(blob_id[:8], "little") * _MIX) & _M64) >> 32) * slots) >> 32
        tv, iv = self._tv, self._iv
        while True:
            e = tv[s]
            if not e:
                return -1, s
            o = (e - 1) * ID_SIZE
            if iv[o:o + ID_SIZE] == blob_id:
                return e - 1, -1
            s += 1
            if s == slots:
                s = 0

    def _find_many(self, q: np.ndarray) -> np.ndarray:
        """Entry number of each id of ``q`` ((m, 32) uint8, contiguous), -1 where absent."""
        m = len(q)
        out = np.full(m, -1, dtype=np.int64)
        if not self._n or not m:
            return out
        table, slots = self._table, self._slots
        ids64 = self._ids.view("<u8")
        q64 = q.view("<u8")
        for a in range(0, m, _BATCH):
            b = min(m, a + _BATCH)
            k0 = q64[a:b, 0]
            active = np.arange(b - a)
            pos = _home(k0, slots)
            while active.size:
                e = table[pos].astype(np.int64) - 1
                occupied = e >= 0
                if not occupied.all():
                    active, pos, e = active[occupied], pos[occupied], e[occupied]
                    if not active.size:
                        break
                hit = np.nonzero(ids64[e, 0] == k0[active])[0]
                if hit.size:
                    same = (ids64[e[hit], 1:] == q64[a + active[hit], 1:]).all(axis=1)
                    found = hit[same]
                    if found.size:
                        out[a + active[found]] = e[found]
                        left = np.ones(active.size, dtype=bool)
                        left[found] = False
                        active, pos = active[left], pos[left]
                pos += 1
                pos[pos == slots] = 0
        return out

    # ------------------------------------------------------------------ public API

    def __len__(self) -> int:
        return self._n

    def __contains__(self, blob_id: bytes) -> bool:
        return self._probe(_as_id(blob_id))[0] >= 0

    def get(self, blob_id: bytes) -> BlobLocation | None:
        """Where the blob is stored, or None."""
        e = self._probe(_as_id(blob_id))[0]
        if e < 0:
            return None
        lv, o = self._lv, e * 4
        return BlobLocation(lv[o], lv[o + 1], lv[o + 2], lv[o + 3], self._fv[e])

    def add(self, blob_id: bytes, pack_no: int, offset: int, length: int, raw_length: int,
            flags: int = 0) -> bool:
        """Record a blob; False (and no change) when the id is already present."""
        blob_id = _as_id(blob_id)
        values = (_check_u32("pack_no", pack_no), _check_u32("offset", offset),
                  _check_u32("length", length), _check_u32("raw_length", raw_length))
        if isinstance(flags, bool) or not isinstance(flags, (int, np.integer)) or not 0 <= flags <= 255:
            raise ValueError(f"flags must be an integer 0..255, got {flags!r}")
        e, slot = self._probe(blob_id)
        if e >= 0:
            return False
        n = self._n
        self._reserve(n + 1)
        self._iv[n * ID_SIZE:(n + 1) * ID_SIZE] = blob_id
        lv, o = self._lv, n * 4
        lv[o], lv[o + 1], lv[o + 2], lv[o + 3] = values
        self._fv[n] = int(flags)
        self._n = n + 1
        self._version += 1
        if n + 1 > self._max_fill:
            self._rebuild(_slots_for(n + 1, _TARGET_LOAD))
        else:
            self._tv[slot] = n + 1
        return True

    def add_many(self, ids: bytes | np.ndarray | Sequence[bytes], pack_no: int | Sequence[int] | np.ndarray,
                 offsets: Sequence[int] | np.ndarray, lengths: Sequence[int] | np.ndarray,
                 raw_lengths: Sequence[int] | np.ndarray, flags: int | Sequence[int] | np.ndarray = 0) -> int:
        """Record many blobs at once (each field a scalar or one value per id); returns how many were new.

        Ids already present, and repeats within ``ids``, are skipped: the first
        occurrence wins, exactly as a loop of ``add`` calls would do.
        """
        q = _as_ids(ids)
        m = len(q)
        cols = [_column(pack_no, m, "pack_no", U32_MAX), _column(offsets, m, "offsets", U32_MAX),
                _column(lengths, m, "lengths", U32_MAX), _column(raw_lengths, m, "raw_lengths", U32_MAX)]
        fcol = _column(flags, m, "flags", 255)
        added = 0
        for a in range(0, m, _BATCH):
            b = min(m, a + _BATCH)
            added += self._add_batch(q[a:b], [c[a:b] for c in cols], fcol[a:b])
        return added

    def _add_batch(self, q: np.ndarray, cols: list[np.ndarray], fcol: np.ndarray) -> int:
        new = np.nonzero(self._find_many(q) < 0)[0]
        new = _first_occurrences(q, new)
        k = len(new)
        if not k:
            return 0
        n = self._n
        self._reserve(n + k)
        everything = k == len(q)
        self._ids[n:n + k] = q if everything else q[new]
        for j, c in enumerate(cols):
            self._loc[n:n + k, j] = c if everything else c[new]
        self._flags[n:n + k] = fcol if everything else fcol[new]
        self._n = n + k
        self._version += 1
        if n + k > self._max_fill:
            self._rebuild(_slots_for(n + k, _TARGET_LOAD))
        else:
            self._insert_range(n, n + k)
        return k

    def contains_many(self, ids: bytes | np.ndarray | Sequence[bytes]) -> np.ndarray:
        """A bool array: which of ``ids`` are present."""
        return self._find_many(_as_ids(ids)) >= 0

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Every (id, location), in insertion order; changing the index meanwhile raises RuntimeError."""
        version = self._version
        step = 8192
        for a in range(0, self._n, step):
            if self._version != version:
                raise RuntimeError("BlobIndex changed during iteration")
            b = min(self._n, a + step)
            raw = self._ids[a:b].tobytes()
            locs = self._loc[a:b].tolist()
            flags = self._flags[a:b].tolist()
            for i, (p, o, ln, rl) in enumerate(locs):
                yield raw[i * ID_SIZE:(i + 1) * ID_SIZE], BlobLocation(p, o, ln, rl, flags[i])
                if self._version != version:
                    raise RuntimeError("BlobIndex changed during iteration")

    def remove_packs(self, pack_nos: Iterable[int]) -> int:
        """Drop every entry stored in one of ``pack_nos`` (after prune deleted them); returns how many."""
        packs = np.fromiter((int(p) for p in pack_nos), dtype=np.int64)
        n = self._n
        if not packs.size or not n:
            return 0
        w = 0
        for a in range(0, n, _BATCH):  # compact in place: the write position never passes the read one
            b = min(n, a + _BATCH)
            keep = ~np.isin(self._loc[a:b, 0], packs)
            c = int(keep.sum())
            if c != b - a or w != a:
                self._ids[w:w + c] = self._ids[a:b][keep]
                self._loc[w:w + c] = self._loc[a:b][keep]
                self._flags[w:w + c] = self._flags[a:b][keep]
            w += c
        removed = n - w
        if not removed:
            return 0
        self._n = w
        self._version += 1
        if len(self._flags) > w + w // 8 + 256:
            self._set_capacity(max(w + w // 16, 16))
        self._rebuild(_slots_for(w, _TARGET_LOAD))
        return removed

    def memory_bytes(self) -> int:
        """Bytes held by the index's arrays (capacity included, fixed overhead excluded)."""
        return self._ids.nbytes + self._loc.nbytes + self._flags.nbytes + self._table.nbytes


def _first_occurrences(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows`` (ascending) without those whose id equals an earlier one's."""
    if rows.size < 2:
        return rows
    k0 = q.view("<u8")[rows, 0]
    s = np.sort(k0)
    dup = s[1:] == s[:-1]
    if not dup.any():
        return rows
    suspects = np.nonzero(np.isin(k0, s[1:][dup]))[0]  # rare: only real repeats (or 64-bit prefix collisions)
    seen: set[bytes] = set()
    keep = np.ones(rows.size, dtype=bool)
    for j in suspects.tolist():
        key = q[rows[j]].tobytes()
        if key in seen:
            keep[j] = False
        else:
            seen.add(key)
    return rows[keep]
