"""Index objects: which pack holds each blob, written by every backup.

An index object lists packs and, for each, its entries (the same records as
the pack header).  Compaction writes one index that names the index objects it
supersedes; readers ignore superseded ones, so the swap is atomic.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator

import zstandard

from chunkvault.errors import CorruptObject, NewerObject

from .crypto import AuthenticationFailed, Sealer
from .blob import ID_SIZE
from . import _blobtable
from .pack import ENTRY_SIZE, EncodedEntries, PackEntry, decode_entries, encode_entries, entry_bytes

INDEX_AD = b"chunkvault index v1"
MAX_INDEX_PLAIN = 1 << 31


@dataclass
class IndexData:
    packs: dict[bytes, list[PackEntry]] = field(default_factory=dict)
    supersedes: list[bytes] = field(default_factory=list)


#: An index object's bytes beyond its packs' plaintext: the header, zstd's frame (its worst case for bytes
#: that do not compress, as pack and blob ids do not, is well under this), the nonce and the tag.
INDEX_SLACK = 4096
#: Packs per index object: a prune or repair writes the index it makes in such parts.
PACKS_PER_INDEX = 4096


def pack_index_bytes(entries: list[PackEntry]) -> int:
    """What one pack takes in an index object's plaintext."""
    size = getattr(entries, "encoded_size", None)  # entries held as an index object encodes them (prune's)
    return 32 + 4 + (sum(entry_bytes(e.kind) for e in entries) if size is None else size)


def split_index(index: IndexData, max_bytes: int | None = None) -> list[IndexData]:
    """``index`` as parts of at most PACKS_PER_INDEX packs each and, with ``max_bytes`` (a remote's limit on
    an object's size), each small enough to store; the first part carries ``index.supersedes``, with room
    for them (a prune or repair replacing many index objects names them all)."""
    parts = [IndexData(supersedes=list(index.supersedes))]
    budget = None if max_bytes is None else max(1, max_bytes - INDEX_SLACK)
    size = 32 * len(index.supersedes)
    for pack_id, entries in index.packs.items():
        need = pack_index_bytes(entries)
        if parts[-1].packs and (len(parts[-1].packs) >= PACKS_PER_INDEX
                                or (budget is not None and size + need > budget)):
            parts.append(IndexData())
            size = 0
        parts[-1].packs[pack_id] = entries
        size += need
    return parts


def encode_index(sealer: Sealer, index: IndexData) -> bytes | bytearray:
    # Pieces joined once, each stage let go of once the next holds it, the result sealed into one buffer: the
    # plaintext (a prune's index, a million entries: 45 MB) stayed while it was compressed, sealed and the
    # nonce put before it, the index held some four times over at once.  Encoded entries go in without a copy.
    pieces: list[bytes | memoryview] = [struct.pack("<BI", 1, len(index.supersedes)), *index.supersedes,
                                        struct.pack("<I", len(index.packs))]
    for pack_id, entries in index.packs.items():
        pieces += (pack_id, struct.pack("<I", len(entries)),
                   entries.view if isinstance(entries, EncodedEntries) else encode_entries(entries))
    plain = b"".join(pieces)
    del pieces
    compressed = zstandard.ZstdCompressor(level=3).compress(plain)
    del plain
    return sealer.seal_after(b"", compressed, INDEX_AD)


@dataclass
class IndexColumns:
    """An index object as its decoded bytes and where each pack's entries lie in them: loading millions of
    entries without a Python object each (``BlobIndex.add_entries`` reads them in place)."""

    supersedes: list[bytes]
    pack_ids: list[bytes]
    counts: list[int]  # entries per pack, in pack order
    starts: list[int]  # where each pack's entries start in ``plain``
    plain: bytes

    @property
    def entry_count(self) -> int:
        return sum(self.counts)

    @property
    def has_deltas(self) -> bool:
        """Whether some pack's entries hold a delta (are longer than whole entries)."""
        ends = [s - 36 for s in self.starts[1:]] + [len(self.plain)]
        return any(end - start != count * ENTRY_SIZE for start, end, count in zip(self.starts, ends, self.counts))

    def delta_bases(self) -> Iterator[tuple[bytes, bytes]]:
        """(delta id, base id) of each delta entry, read from where the entries lie, pack by pack: no dict of
        them is kept (one took some 230 bytes a delta, for every index object of a repository)."""
        for _, entries in self.packs():
            if entries.has_deltas:
                pairs = _blobtable.scan_entries(self.plain, entries._start, len(entries))[1]
                for i in range(0, len(pairs), 2 * ID_SIZE):
                    yield pairs[i : i + ID_SIZE], pairs[i + ID_SIZE : i + 2 * ID_SIZE]

    def packs(self) -> Iterator[tuple[bytes, EncodedEntries]]:
        """Each pack's id and entries, left in ``plain``; a pack's id and count follow its last entry."""
        ends = [s - 36 for s in self.starts[1:]] + [len(self.plain)]
        for pid, count, start, end in zip(self.pack_ids, self.counts, self.starts, ends):
            yield pid, EncodedEntries(self.plain, start, count, end)

    def pack_entries(self) -> IndexData:
        """The same index as PackEntry lists (for check, prune and repair)."""
        packs = {pack_id: decode_entries(self.plain, count, start, "index")[0]
                 for pack_id, count, start in zip(self.pack_ids, self.counts, self.starts)}
        return IndexData(packs, list(self.supersedes))


def _open_plain(sealer: Sealer, data: bytes, what: str) -> bytes:
    try:
        compressed = sealer.open(data, INDEX_AD)
    except AuthenticationFailed:
        raise CorruptObject(what, "authentication failed (damaged, cut short, or another repository's)") from None
    try:
        return zstandard.ZstdDecompressor().decompress(compressed, max_output_size=MAX_INDEX_PLAIN)
    except zstandard.ZstdError as exc:
        raise CorruptObject(what, f"bad compressed data: {exc}") from None


def decode_index_columns(sealer: Sealer, data: bytes, what: str) -> IndexColumns:
    """Decode an index object: its structure and every entry's kind checked, the entries left in place (each
    delta's base among them: ``BlobIndex.add_entries`` keeps it with the delta's row)."""
    plain = _open_plain(sealer, data, what)
    n = len(plain)
    try:
        if plain[0] != 1:  # authentic (the AEAD held): a format after this one, or none ever written
            if plain[0] > 1:
                raise NewerObject(what, f"index version {plain[0]}, which a newer chunkvault writes: upgrade")
            raise CorruptObject(what, "unsupported index version")
        (n_super,) = struct.unpack_from("<I", plain, 1)
        pos = 5
        if pos + 32 * n_super > n:  # counts are checked before anything is allocated for them
            raise CorruptObject(what, "truncated index")
        supersedes = [plain[pos + 32 * i : pos + 32 * (i + 1)] for i in range(n_super)]
        pos += 32 * n_super
        (n_packs,) = struct.unpack_from("<I", plain, pos)
        pos += 4
        pack_ids: list[bytes] = []
        counts: list[int] = []
        starts: list[int] = []
        for _ in range(n_packs):
            if pos + 36 > n:
                raise CorruptObject(what, "truncated index")
            pack_id = plain[pos : pos + 32]
            (count,) = struct.unpack_from("<I", plain, pos + 32)
            pos += 36
            try:
                end = _blobtable.scan_entries(plain, pos, count, False)[0]
            except ValueError as exc:
                raise CorruptObject(what, str(exc)) from None
            pack_ids.append(pack_id)
            counts.append(count)
            starts.append(pos)
            pos = end
    except (IndexError, struct.error):
        raise CorruptObject(what, "truncated index") from None
    if pos != n or any(len(x) != 32 for x in supersedes):
        raise CorruptObject(what, "malformed index")
    return IndexColumns(supersedes, pack_ids, counts, starts, plain)


def decode_index(sealer: Sealer, data: bytes, what: str) -> IndexData:
    return decode_index_columns(sealer, data, what).pack_entries()
