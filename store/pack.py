"""Packs: many blob envelopes followed by a sealed header that lists them.

Layout (store/FORMAT.md, "Pack")::

    envelope* | sealed header | header_length u32 LE | b"CVP1"

A pack is named by the BLAKE3 of its bytes, so a pack stored under another
pack's name is detected.  Each envelope is independently decryptable: a
restore reads byte ranges, never whole packs.
"""
from __future__ import annotations

import mmap
import struct
import threading
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

from chunkvault.errors import CorruptObject, NewerObject

from .blob import ID_SIZE, KIND_DELTA, KINDS
from .crypto import NONCE_SIZE, TAG_SIZE, AuthenticationFailed, Sealer

PACK_MAGIC = b"CVP1"
TRAILER = struct.Struct("<I4s")
HEADER_AD = b"chunkvault pack header v1"
_ENTRY = struct.Struct("<B32sIII")
ENTRY_SIZE = _ENTRY.size
MAX_PACK_SIZE = (1 << 32) - 1
# What a finished pack holds besides its envelopes and its entries: the sealed header's version and count, its
# nonce and tag, and the trailer.
PACK_FIXED_OVERHEAD = 5 + NONCE_SIZE + TAG_SIZE + TRAILER.size


class PackEntry(NamedTuple):
    blob_id: bytes
    kind: int
    offset: int
    length: int
    raw_length: int
    base_id: bytes | None = None


def readable_ids(entries: Iterable[PackEntry]) -> set[bytes]:
    """Pure: the blob ids these entries can give back: a whole blob's, and a delta's whose base is one of
    them, down its chain.  A delta entry whose ``base_id`` is not in the set has lost its base (stored in
    a pack that is gone): indexed, it would let a backup deduplicate against data nothing can read."""
    readable: set[bytes] = set()
    waiting: dict[bytes, list[bytes]] = {}  # base id -> ids of deltas on it
    for e in entries:
        if e.kind != KIND_DELTA:
            readable.add(e.blob_id)
        else:
            waiting.setdefault(e.base_id, []).append(e.blob_id)  # type: ignore[arg-type]
    todo = list(readable)
    while todo:
        for blob_id in waiting.pop(todo.pop(), ()):
            if blob_id not in readable:
                readable.add(blob_id)
                todo.append(blob_id)
    return readable


def entry_bytes(kind: int) -> int:
    """The bytes one entry of ``kind`` takes in a pack's header (a delta's names its base too)."""
    return _ENTRY.size + (ID_SIZE if kind == KIND_DELTA else 0)


def encode_entries(entries: Iterable[PackEntry]) -> bytes:
    encoded = getattr(entries, "encoded", None)  # entries held as an index object encodes them (prune's)
    if encoded is not None:
        return encoded
    out = bytearray()
    for e in entries:
        out += _ENTRY.pack(e.kind, e.blob_id, e.offset, e.length, e.raw_length)
        if e.kind == KIND_DELTA:
            out += e.base_id  # type: ignore[operator]
    return bytes(out)


def decode_entries(buf: bytes | memoryview, count: int, pos: int, what: str) -> tuple[list[PackEntry], int]:
    """Decode ``count`` entries from ``buf`` at ``pos``; returns (entries, new pos)."""
    entries = []
    n = len(buf)
    for _ in range(count):
        if pos + _ENTRY.size > n:
            raise CorruptObject(what, "truncated entry list")
        kind, blob_id, offset, length, raw_length = _ENTRY.unpack_from(buf, pos)
        pos += _ENTRY.size
        if kind not in KINDS:  # read from an authenticated header or index: a kind added since
            raise NewerObject(what, f"blob kind {kind}, which a newer chunkvault writes: upgrade")
        base = None
        if kind == KIND_DELTA:
            if pos + ID_SIZE > n:
                raise CorruptObject(what, "truncated entry list")
            base = bytes(buf[pos : pos + ID_SIZE])
            pos += ID_SIZE
        entries.append(PackEntry(blob_id, kind, offset, length, raw_length, base))
    return entries, pos


class DecodedOnRead(Sequence[PackEntry]):
    """Pack entries held encoded, decoded (``decode``) each time they are read: read them whole, once."""

    __slots__ = ()

    def decode(self) -> list[PackEntry]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[PackEntry]:
        return iter(self.decode())

    def __getitem__(self, i):  # type: ignore[override]
        return self.decode()[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.decode()!r})"


class EncodedEntries(DecodedOnRead):
    """A pack's entries as an index object encodes them, decoded each time they are read: a prune keeps most
    packs as they are, and writes their entries into the new index as they came (``encoded``)."""

    __slots__ = ("_buf", "_start", "_count", "_end")

    def __init__(self, buf: bytes | memoryview, start: int, count: int, end: int) -> None:
        self._buf, self._start, self._count, self._end = buf, start, count, end

    @property
    def encoded(self) -> bytes:
        return bytes(self._buf[self._start:self._end])

    @property
    def view(self) -> memoryview:
        """``encoded`` without a copy."""
        return memoryview(self._buf)[self._start:self._end]

    @property
    def encoded_size(self) -> int:
        return self._end - self._start

    @property
    def has_deltas(self) -> bool:
        return self._end - self._start != self._count * ENTRY_SIZE

    def __len__(self) -> int:
        return self._count

    def decode(self) -> list[PackEntry]:
        return decode_entries(self._buf, self._count, self._start, "index")[0]

    @classmethod
    def of(cls, entries: Sequence[PackEntry]) -> EncodedEntries:
        """``entries`` encoded: 45 bytes each (77 a delta) where a PackEntry took some 250."""
        buf = encode_entries(entries)
        return cls(buf, 0, len(entries), len(buf))



def seal_header(sealer: Sealer, entries: Sequence[PackEntry]) -> bytes:
    plain = struct.pack("<BI", 1, len(entries)) + encode_entries(entries)
    return sealer.seal(plain, HEADER_AD)


def open_header(sealer: Sealer, sealed: bytes | memoryview, what: str, body_length: int) -> list[PackEntry]:
    return _opened_header(sealer, sealed, what, body_length)[0]


def _opened_header(sealer: Sealer, sealed: bytes | memoryview, what: str,
                   body_length: int) -> tuple[list[PackEntry], bytes]:
    """The header's entries, and the bytes that encode them."""
    try:
        plain = sealer.open(sealed, HEADER_AD)
    except AuthenticationFailed:
        raise CorruptObject(what, "pack header authentication failed") from None
    if len(plain) >= 5 and plain[0] > 1:
        raise NewerObject(what, f"pack header version {plain[0]}, which a newer chunkvault writes: upgrade")
    if len(plain) < 5 or plain[0] != 1:
        raise CorruptObject(what, "unsupported pack header version")
    (count,) = struct.unpack_from("<I", plain, 1)
    entries, pos = decode_entries(plain, count, 5, what)
    if pos != len(plain):
        raise CorruptObject(what, "trailing bytes in pack header")
    for e in entries:
        if e.offset + e.length > body_length:
            raise CorruptObject(what, f"entry for blob {e.blob_id.hex()} points past the data")
    return entries, plain[5:]


def parse_trailer(tail: bytes, pack_size: int, what: str) -> int:
    """Length of the sealed header, from the last 8 bytes of a pack."""
    if len(tail) != TRAILER.size:
        raise CorruptObject(what, "truncated pack")
    header_len, magic = TRAILER.unpack(tail)
    if magic != PACK_MAGIC:
        raise CorruptObject(what, "not a pack (bad magic)")
    if header_len + TRAILER.size > pack_size:
        raise CorruptObject(what, "header length exceeds pack size")
    return header_len


def read_windows(entries: list[PackEntry], body_length: int, limit: int) -> list[tuple[int, int, list[PackEntry]]]:
    """``[0, body_length)`` cut into consecutive (start, end, entries) ranges, each holding whole blobs and
    at most ``limit`` bytes unless one blob alone is larger: a pack read range by range, its every byte
    read once and in order (its name is the hash of them all), while no more than a range is in memory."""
    out: list[tuple[int, int, list[PackEntry]]] = []
    start = high = 0
    current: list[PackEntry] = []
    for e in sorted(entries, key=lambda e: e.offset):
        end = e.offset + e.length
        if current and e.offset >= high and max(high, end) - start > limit:
            out.append((start, e.offset, current))
            start, current = e.offset, []
        current.append(e)
        high = max(high, end)
    out.append((start, body_length, current))
    return out


class PackHeader(NamedTuple):
    entries: list[PackEntry]
    body_length: int  # the envelopes' bytes, before the sealed header
    sealed: bytes | memoryview  # the header as stored, and the trailer: a reader hashing the pack needs them
    trailer: bytes | memoryview
    encoded: bytes = b""  # the entries as the header encodes them: an index's bytes for them are compared


def fetch_header(sealer: Sealer, fetch: Callable[[int, int], bytes | memoryview], size: int,
                 what: str, *, expected: int = 0) -> PackHeader:
    """A pack's header read through ``fetch(offset, length)``: its trailer, then its sealed header.

    ``expected``: the bytes header and trailer should take (``PACK_FIXED_OVERHEAD`` and the entries the
    index has there, encoded), read in one go with the trailer where the header fits in them: off local disk
    each read waits a round trip, and a check waited two in a row per pack.  A header larger than that is
    read as before."""
    if TRAILER.size < expected <= size:
        end = memoryview(fetch(size - expected, expected))
        if len(end) == expected:
            trailer = end[expected - TRAILER.size:]
            header_len = parse_trailer(bytes(trailer), size, what)
            body_len = size - TRAILER.size - header_len
            if header_len + TRAILER.size <= expected:
                sealed = end[expected - TRAILER.size - header_len : expected - TRAILER.size]
                entries, encoded = _opened_header(sealer, sealed, what, body_len)
                return PackHeader(entries, body_len, sealed, trailer, encoded)
    trailer = fetch(size - TRAILER.size, TRAILER.size) if size >= TRAILER.size else b""
    header_len = parse_trailer(bytes(trailer), size, what)
    body_len = size - TRAILER.size - header_len
    sealed = fetch(body_len, header_len)
    entries, encoded = _opened_header(sealer, sealed, what, body_len)
    return PackHeader(entries, body_len, sealed, trailer, encoded)


def read_pack(sealer: Sealer, data: bytes, what: str) -> list[PackEntry]:
    """Entries of a whole pack held in memory (the format's reader in one call; check reads packs in windows)."""
    view = memoryview(data)
    return fetch_header(sealer, lambda offset, length: view[offset : offset + length], len(data), what).entries


class PackBuffers:
    """Page-aligned pack buffers, reused from one pack to the next.

    Each pack in a fresh buffer had the kernel allocate and fault in 16 MiB of
    new pages, and a buffer at a page boundary lets the local remote write the
    pack past the page cache (remotes/local.py); together they took an initial
    backup's system time from about 3.2 s to 1.5 s.  At most ``keep`` buffers
    wait for reuse: as many as there are packs in flight.
    """

    def __init__(self, capacity: int, keep: int):
        self.capacity = capacity
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, at_least: int = 0) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= at_least:
                    return self._free.pop(i)
        return mmap.mmap(-1, max(self.capacity, at_least))

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer nobody reads any more; beyond ``keep`` it is dropped (unmapped with its last view:
        never closed here, a lingering traceback may still hold one)."""
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


class PackBuilder:
    """Accumulates envelopes in one buffer until the pack is full, then yields its bytes."""

    def __init__(self, buffers: PackBuffers | None = None) -> None:
        self.buffers = buffers if buffers is not None else PackBuffers(1 << 20, 0)
        self.buf: mmap.mmap | None = None
        self.size = 0
        self._encoded = bytearray()  # the entries as the sealed header lists them
        self._count = 0
        self._entry_bytes = 0  # of the entries in the sealed header

    def _room(self, end: int) -> mmap.mmap:
        buf = self.buf
        if buf is None:
            buf = self.buf = self.buffers.take(end)
        elif end > len(buf):  # an envelope larger than the room left: move to a buffer twice the size
            bigger = mmap.mmap(-1, max(end, 2 * len(buf)))
            bigger[: self.size] = buf[: self.size]
            self.buffers.give(buf)
            buf = self.buf = bigger
        return buf

    @property
    def entries(self) -> EncodedEntries:
        """The entries added, encoded as the header lists them, decoded when read: a PackEntry each held a
        pack of a hundred thousand small blobs (a prune's repack of them) in some 20 MB while it filled."""
        return EncodedEntries(self._encoded, 0, self._count, len(self._encoded))

    def add(self, blob_id: bytes, kind: int, envelope: bytes, raw_length: int, base_id: bytes | None = None) -> None:
        try:
            self._encoded += _ENTRY.pack(kind, blob_id, self.size, len(envelope), raw_length)
        except struct.error:  # an offset or length past what a header can hold
            raise ValueError("pack too large") from None
        if kind == KIND_DELTA:
            self._encoded += base_id  # type: ignore[operator]
        self._count += 1
        self._entry_bytes += entry_bytes(kind)
        self._append(envelope)

    def finished_size(self, more: int = 0, kind: int | None = None) -> int:
        """The pack's size once finished, with one more envelope of ``more`` bytes and ``kind`` when given:
        what must fit under a remote's limit on the size of an object."""
        extra = 0 if kind is None else entry_bytes(kind)
        return self.size + more + self._entry_bytes + extra + PACK_FIXED_OVERHEAD

    def _append(self, data: bytes) -> None:
        end = self.size + len(data)
        self._room(end)[self.size : end] = data
        self.size = end

    def __len__(self) -> int:
        return self.size

    def finish(self, sealer: Sealer) -> memoryview:
        """The pack's bytes: a view of the builder's buffer, valid until ``release``."""
        header = seal_header(sealer, self.entries)
        self._append(header + TRAILER.pack(len(header), PACK_MAGIC))
        if self.size > MAX_PACK_SIZE:
            raise ValueError("pack too large")
        assert self.buf is not None
        return memoryview(self.buf)[: self.size]

    def release(self) -> None:
        """Hand the buffer back for the next pack; every view ``finish`` returned must be gone."""
        if self.buf is not None:
            self.buffers.give(self.buf)
            self.buf = None
