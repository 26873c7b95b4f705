"""Blob envelopes: one chunk (or manifest piece), compressed and sealed.

Layout (store/FORMAT.md, "Blob envelope")::

    kind u8 | base_id[32] (delta only) | nonce[12] | ciphertext | tag[16]

The AEAD's associated data binds the envelope to its blob id, its kind and, for
a delta, its base id: bytes moved under another id, or a delta pointed at
another base, fail to open.
"""
from __future__ import annotations

import threading

import zstandard

from chunkvault.errors import CorruptObject

from .crypto import NONCE_SIZE, TAG_SIZE, AuthenticationFailed, Sealer

KIND_RAW = 0
KIND_ZSTD = 1
KIND_DELTA = 2
KINDS = (KIND_RAW, KIND_ZSTD, KIND_DELTA)
ID_SIZE = 32
BLOB_AD = b"chunkvault blob v1"
ENVELOPE_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard's (de)compressor objects are not thread-safe: one per thread.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def blob_ad(kind: int, blob_id: bytes, base_id: bytes | None) -> bytes:
    return BLOB_AD + bytes((kind,)) + blob_id + (base_id or b"")


def compress(data: bytes | memoryview, level: int) -> tuple[int, bytes]:
    """(kind, payload): zstd when it saves at least 1/32 of the size, else raw."""
    if level <= 0 or len(data) < 64:
        return KIND_RAW, bytes(data)
    out = _compressor(level).compress(data)
    if len(out) + (len(data) >> 5) < len(data):
        return KIND_ZSTD, out
    return KIND_RAW, bytes(data)


def delta_compress(data: bytes | memoryview, base_plain: bytes, level: int) -> bytes:
    """zstd frame of ``data`` using ``base_plain`` as a raw-content dictionary."""
    d = zstandard.ZstdCompressionDict(base_plain, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=level, dict_data=d, write_content_size=True).compress(data)


def seal_blob(sealer: Sealer, blob_id: bytes, kind: int, payload: bytes, base_id: bytes | None = None) -> bytes:
    if (kind == KIND_DELTA) != (base_id is not None):
        raise ValueError("a delta blob needs a base id, and only a delta blob")
    head = bytes((kind,)) + (base_id or b"")
    return head + sealer.seal(payload, blob_ad(kind, blob_id, base_id))


def envelope_base(envelope: bytes | memoryview) -> bytes | None:
    """The base id a delta envelope names (None for whole blobs); no key needed."""
    if not envelope or envelope[0] not in KINDS:
        return None
    if envelope[0] == KIND_DELTA:
        return bytes(envelope[1 : 1 + ID_SIZE])
    return None


def open_blob(
    sealer: Sealer,
    blob_id: bytes,
    envelope: bytes | memoryview,
    raw_length: int | None = None,
    base_plain: bytes | None = None,
) -> bytes:
    """Decrypt and decompress one envelope; a delta needs its base's plaintext.

    Raises CorruptObject naming the blob for anything that does not verify.
    """
    name = "blob " + blob_id.hex()
    env = memoryview(envelope)
    if len(env) < ENVELOPE_OVERHEAD or env[0] not in KINDS:
        raise CorruptObject(name, "not a blob envelope")
    kind = env[0]
    base_id = None
    body = env[1:]
    if kind == KIND_DELTA:
        if len(env) < ENVELOPE_OVERHEAD + ID_SIZE:
            raise CorruptObject(name, "truncated delta envelope")
        base_id = bytes(env[1 : 1 + ID_SIZE])
        body = env[1 + ID_SIZE :]
    try:
        payload = sealer.open(body, blob_ad(kind, blob_id, base_id))
    except AuthenticationFailed:
        raise CorruptObject(name, "authentication failed (tampered, truncated or stored under the wrong id)") from None
    if kind == KIND_RAW:
        data = payload
    else:
        try:
            if kind == KIND_ZSTD:
                data = _decompressor().decompress(payload)
            else:
                if base_plain is None:
                    raise ValueError("delta blob opened without its base")
                d = zstandard.ZstdCompressionDict(base_plain, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
                data = zstandard.ZstdDecompressor(dict_data=d).decompress(payload)
        except zstandard.ZstdError as exc:
            raise CorruptObject(name, f"bad compressed data: {exc}") from None
    if raw_length is not None and len(data) != raw_length:
        raise CorruptObject(name, f"length {len(data)} != indexed {raw_length}")
    return data
