"""Packs: many blob envelopes followed by a sealed header that lists them.

Layout (store/FORMAT.md, "Pack")::

    envelope* | sealed header | header_length u32 LE | b"CVP1"

A pack is named by the BLAKE3 of its bytes, so a pack stored under another
pack's name is detected.  Each envelope is independently decryptable: a
restore reads byte ranges, never whole packs.
"""
from __future__ import annotations

import struct
from typing import Iterable, NamedTuple

from chunkvault.errors import CorruptObject

from .blob import ID_SIZE, KIND_DELTA, KINDS
from .crypto import AuthenticationFailed, Sealer

PACK_MAGIC = b"CVP1"
TRAILER = struct.Struct("<I4s")
HEADER_AD = b"chunkvault pack header v1"
_ENTRY = struct.Struct("<B32sIII")
ENTRY_SIZE = _ENTRY.size
MAX_PACK_SIZE = (1 << 32) - 1


class PackEntry(NamedTuple):
    blob_id: bytes
    kind: int
    offset: int
    length: int
    raw_length: int
    base_id: bytes | None = None


def encode_entries(entries: Iterable[PackEntry]) -> bytes:
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
        if kind not in KINDS:
            raise CorruptObject(what, f"unknown blob kind {kind}")
        base = None
        if kind == KIND_DELTA:
            if pos + ID_SIZE > n:
                raise CorruptObject(what, "truncated entry list")
            base = bytes(buf[pos : pos + ID_SIZE])
            pos += ID_SIZE
        entries.append(PackEntry(blob_id, kind, offset, length, raw_length, base))
    return entries, pos


def seal_header(sealer: Sealer, entries: list[PackEntry]) -> bytes:
    plain = struct.pack("<BI", 1, len(entries)) + encode_entries(entries)
    return sealer.seal(plain, HEADER_AD)


def open_header(sealer: Sealer, sealed: bytes | memoryview, what: str, body_length: int) -> list[PackEntry]:
    try:
        plain = sealer.open(sealed, HEADER_AD)
    except AuthenticationFailed:
        raise CorruptObject(what, "pack header authentication failed") from None
    if len(plain) < 5 or plain[0] != 1:
        raise CorruptObject(what, "unsupported pack header version")
    (count,) = struct.unpack_from("<I", plain, 1)
    entries, pos = decode_entries(plain, count, 5, what)
    if pos != len(plain):
        raise CorruptObject(what, "trailing bytes in pack header")
    for e in entries:
        if e.offset + e.length > body_length:
            raise CorruptObject(what, f"entry for blob {e.blob_id.hex()} points past the data")
    return entries


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


def read_pack(sealer: Sealer, data: bytes, what: str) -> list[PackEntry]:
    """Entries of a whole pack held in memory (used by check and repair)."""
    header_len = parse_trailer(data[-TRAILER.size :], len(data), what)
    body_len = len(data) - TRAILER.size - header_len
    return open_header(sealer, memoryview(data)[body_len : len(data) - TRAILER.size], what, body_len)


class PackBuilder:
    """Accumulates envelopes in memory until the pack is full, then yields its bytes."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.entries: list[PackEntry] = []

    def add(self, blob_id: bytes, kind: int, envelope: bytes, raw_length: int, base_id: bytes | None = None) -> None:
        self.entries.append(PackEntry(blob_id, kind, len(self.body), len(envelope), raw_length, base_id))
        self.body += envelope

    def __len__(self) -> int:
        return len(self.body)

    def finish(self, sealer: Sealer) -> bytearray:
        """The pack's bytes; the builder's buffer is extended in place (no second copy of a large pack)."""
        header = seal_header(sealer, self.entries)
        data = self.body
        data += header
        data += TRAILER.pack(len(header), PACK_MAGIC)
        if len(data) > MAX_PACK_SIZE:
            raise ValueError("pack too large")
        self.body = bytearray()
        return data
