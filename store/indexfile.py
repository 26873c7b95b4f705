"""Index objects: which pack holds each blob, written by every backup.

An index object lists packs and, for each, its entries (the same records as
the pack header).  Compaction writes one index that names the index objects it
supersedes; readers ignore superseded ones, so the swap is atomic.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import zstandard

from chunkvault.errors import CorruptObject

from .crypto import AuthenticationFailed, Sealer
from .pack import PackEntry, decode_entries, encode_entries

INDEX_AD = b"chunkvault index v1"
MAX_INDEX_PLAIN = 1 << 31


@dataclass
class IndexData:
    packs: dict[bytes, list[PackEntry]] = field(default_factory=dict)
    supersedes: list[bytes] = field(default_factory=list)


def encode_index(sealer: Sealer, index: IndexData) -> bytes:
    out = bytearray(struct.pack("<BI", 1, len(index.supersedes)))
    for s in index.supersedes:
        out += s
    out += struct.pack("<I", len(index.packs))
    for pack_id, entries in index.packs.items():
        out += pack_id + struct.pack("<I", len(entries)) + encode_entries(entries)
    return sealer.seal(zstandard.ZstdCompressor(level=3).compress(bytes(out)), INDEX_AD)


def decode_index(sealer: Sealer, data: bytes, what: str) -> IndexData:
    try:
        compressed = sealer.open(data, INDEX_AD)
    except AuthenticationFailed:
        raise CorruptObject(what, "authentication failed") from None
    try:
        plain = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=MAX_INDEX_PLAIN)
    except zstandard.ZstdError as exc:
        raise CorruptObject(what, f"bad compressed data: {exc}") from None
    try:
        if plain[0] != 1:
            raise CorruptObject(what, "unsupported index version")
        (n_super,) = struct.unpack_from("<I", plain, 1)
        pos = 5
        if pos + 32 * n_super > len(plain):  # counts are checked before anything is allocated for them
            raise CorruptObject(what, "truncated index")
        supersedes = [plain[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n_super)]
        pos += 32 * n_super
        (n_packs,) = struct.unpack_from("<I", plain, pos)
        pos += 4
        packs: dict[bytes, list[PackEntry]] = {}
        for _ in range(n_packs):
            pack_id = plain[pos : pos + 32]
            (count,) = struct.unpack_from("<I", plain, pos + 32)
            entries, pos = decode_entries(plain, count, pos + 36, what)
            packs[pack_id] = entries
    except (IndexError, struct.error):
        raise CorruptObject(what, "truncated index") from None
    if pos != len(plain) or any(len(s) != 32 for s in supersedes):
        raise CorruptObject(what, "malformed index")
    return IndexData(packs, supersedes)
