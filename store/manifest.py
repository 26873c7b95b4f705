"""Manifest records: the entries of a snapshot, as a sorted binary stream.

A full manifest holds one ENTRY record per path.  A differential holds only
changes against its parent: ENTRY (add or update, keep the parent's children),
FRESH (add or replace, dropping whatever the parent had under this path) and
DELETE (remove the path and everything under it).  Records are sorted by
``sort_key(path)`` — the path with "/" mapped to NUL — so a directory's
subtree is contiguous and follows it, and two manifests merge in one pass.
The stream is cut into blobs by the chunker, so no manifest has to fit in
memory (store/FORMAT.md, "Manifest").
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence, overload

from chunkvault.errors import CorruptObject

OP_ENTRY = 0
OP_FRESH = 1
OP_DELETE = 2

T_FILE = 0
T_DIR = 1
T_SYMLINK = 2
T_HARDLINK = 3
T_FIFO = 4
T_CHARDEV = 5
T_BLOCKDEV = 6
TYPE_NAMES = {T_FILE: "file", T_DIR: "dir", T_SYMLINK: "symlink", T_HARDLINK: "hardlink",
              T_FIFO: "fifo", T_CHARDEV: "chardev", T_BLOCKDEV: "blockdev"}

#: Entry flag: the file could not be read at backup time; it has no data.
F_UNREADABLE = 1
#: Entry flag: the file changed while it was read; its data is what was read.
F_CHANGED_DURING_READ = 2
#: Record flag on the wire only: extended attributes follow the chunk ids (``Entry.xattrs`` holds them;
#: an Entry's ``flags`` never carries this bit).
F_XATTRS = 4

_FIXED = struct.Struct("<BBIIIqQqQQQ")
_HEAD = struct.Struct("<BI")
_BODY = struct.Struct(_FIXED.format + "IB")  # the fixed fields, then target and digest lengths
_COUNT = struct.Struct("<I")


def sort_key(path: bytes) -> bytes:
    return path.replace(b"/", b"\x00")


class ChunkIds(Sequence[bytes]):
    """A file's chunk ids, each cut from the entry's concatenated ids when asked for.  A list of them took 73
    bytes a chunk beside the 32 the ids take (a 64 GiB file cut every 64 KiB: 75 MB more for each such list a
    restore, dump or export held), so memory grew with a file's size several times over."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes):
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw) // 32

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chunk index out of range")
        return self._raw[32 * i : 32 * i + 32]

    def __iter__(self) -> Iterator[bytes]:
        raw = self._raw
        return (raw[i : i + 32] for i in range(0, len(raw), 32))

    def __eq__(self, other: object) -> bool:
        """Equal to the same ids as another ChunkIds, a list or a tuple, as the list it stands for was."""
        if isinstance(other, ChunkIds):
            return self._raw == other._raw
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # as a list's

    def __repr__(self) -> str:
        return f"ChunkIds({list(self)!r})"


@dataclass(slots=True)
class Entry:
    path: bytes
    type: int
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    ctime_ns: int = 0
    ino: int = 0
    dev: int = 0
    rdev: int = 0
    target: bytes = b""
    digest: bytes = b""
    chunks: bytes = b""  # concatenated 32-byte blob ids
    flags: int = 0
    xattrs: bytes = b""  # extended attributes, encoded (store/xattrs.py); b"" when none

    def chunk_ids(self) -> "ChunkIds":
        return ChunkIds(self.chunks)

    def same_content(self, other: "Entry") -> bool:
        """Equal as a restore would produce them (ignores ctime/inode/device ids, and how the data is cut
        into chunks where both have a digest of it: cut at fixed offsets since, a file is the same)."""
        chunks = (self.chunks, other.chunks) if not (self.digest and other.digest) else (b"", b"")
        return (self.path, self.type, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
                self.rdev, self.target, self.digest, chunks[0], self.xattrs) == (
                other.path, other.type, other.mode, other.uid, other.gid, other.mtime_ns, other.size,
                other.rdev, other.target, other.digest, chunks[1], other.xattrs)


def what_changed(old: Entry | None, new: Entry | None) -> str | None:
    """Of a modified entry, what changed: its "type", its "content" (data, link target, device), or only
    its "metadata" (mode, owner, times, attributes); None for an added or removed one."""
    if old is None or new is None:
        return None
    if old.type != new.type:
        return "type"
    if (old.size, old.digest, old.target, old.rdev) != (new.size, new.digest, new.target, new.rdev):
        return "content"
    return "metadata"


def unread(e: Entry) -> bool:
    """A file no backup could read: the snapshot has no data for it (one an earlier backup read keeps that
    backup's data, and is restored with it)."""
    return bool(e.flags & F_UNREADABLE) and not e.digest


class Record(NamedTuple):
    op: int
    path: bytes
    entry: Entry | None

    @property
    def key(self) -> bytes:
        return sort_key(self.path)


def entry_record(entry: Entry, op: int = OP_ENTRY) -> Record:
    return Record(op, entry.path, entry)


def delete_record(path: bytes) -> Record:
    return Record(OP_DELETE, path, None)


NS_MIN, NS_MAX = -(1 << 63), (1 << 63) - 1


def held_ns(ns: int) -> int:
    """A time in nanoseconds as an entry holds it (int64: 1677 to 2262); beyond, the nearest end, as the
    native stat readers give it."""
    return NS_MIN if ns < NS_MIN else NS_MAX if ns > NS_MAX else ns


def encode_record(rec: Record) -> bytes:
    return b"".join(record_parts(rec))


def record_parts(rec: Record) -> tuple[bytes, ...]:
    """``encode_record``'s bytes in parts, to append to a buffer without joining them first (a file's chunk ids
    are most of a record: 32 MB for a million chunks)."""
    out = _HEAD.pack(rec.op, len(rec.path)) + rec.path
    if rec.op == OP_DELETE:
        return (out,)
    e = rec.entry
    assert e is not None
    flags = e.flags | F_XATTRS if e.xattrs else e.flags
    return (
        out,
        _FIXED.pack(e.type, flags, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ctime_ns, e.ino, e.dev, e.rdev),
        struct.pack("<IB", len(e.target), len(e.digest)), e.target, e.digest,
        struct.pack("<I", len(e.chunks) // 32), e.chunks,
        struct.pack("<I", len(e.xattrs)) + e.xattrs if e.xattrs else b"",
    )


def record_path(buf: bytes | bytearray, offset: int) -> bytes:
    """The path of the record that starts at ``offset`` in ``buf``, the rest left undecoded."""
    _, plen = _HEAD.unpack_from(buf, offset)
    start = offset + _HEAD.size
    return bytes(buf[start : start + plen])


def decode_records(buf: bytes | memoryview, what: str) -> tuple[list[Record], int]:
    """Decode every complete record in ``buf``; returns (records, bytes consumed)."""
    if _decode_c is None:
        return decode_records_reference(buf, what)
    try:
        return _decode_c(buf, Record, Entry, OP_DELETE, _MAX_TYPE)
    except ValueError as exc:
        raise CorruptObject(what, str(exc)) from None


def decode_records_reference(buf: bytes | memoryview, what: str) -> tuple[list[Record], int]:
    """``decode_records`` in Python: what the C decoder must match."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)  # slices of bytes are bytes: no copy per field
    out: list[Record] = []
    append = out.append
    head, body = _HEAD.unpack_from, _BODY.unpack_from
    head_size, body_size = _HEAD.size, _BODY.size
    pos = 0
    n = len(buf)
    while True:
        start = pos
        if pos + head_size > n:
            return out, start
        op, plen = head(buf, pos)
        if op > OP_DELETE:
            raise CorruptObject(what, f"unknown manifest record op {op}")
        pos += head_size
        if pos + plen > n:
            return out, start
        path = buf[pos : pos + plen]
        pos += plen
        if op == OP_DELETE:
            append(Record(op, path, None))
            continue
        if pos + body_size > n:
            return out, start
        (etype, flags, mode, uid, gid, mtime, size, ctime, ino, dev, rdev, tlen, dlen) = body(buf, pos)
        pos += body_size
        end = pos + tlen + dlen
        if end + 4 > n:
            return out, start
        target = buf[pos : pos + tlen]
        digest = buf[pos + tlen : end]
        (nchunks,) = _COUNT.unpack_from(buf, end)
        pos = end + 4
        end = pos + 32 * nchunks
        if end > n:
            return out, start
        chunks = buf[pos:end]
        pos = end
        xattrs = b""
        if flags & F_XATTRS:
            if pos + 4 > n:
                return out, start
            (xlen,) = _COUNT.unpack_from(buf, pos)
            pos += 4
            if pos + xlen > n:
                return out, start
            xattrs = buf[pos : pos + xlen]
            pos += xlen
            flags &= ~F_XATTRS
        if etype not in TYPE_NAMES:
            raise CorruptObject(what, f"unknown entry type {etype}")
        append(Record(op, path, Entry(path, etype, mode, uid, gid, mtime, size, ctime, ino, dev, rdev,
                                      target, digest, chunks, flags, xattrs)))


_MAX_TYPE = max(TYPE_NAMES)
# The C decoder checks bounds, not membership: ops 0..OP_DELETE, types 0.._MAX_TYPE.
assert OP_DELETE == max(OP_ENTRY, OP_FRESH, OP_DELETE) and set(TYPE_NAMES) == set(range(_MAX_TYPE + 1))

try:  # the same records, parsed in C in about half the Python loop's time
    from ._manifest import decode as _decode_c
    from ._manifest import locate as _locate_c
except ImportError:
    _decode_c = _locate_c = None


def locate_record(buf: bytes | memoryview, path: bytes, what: str) -> tuple[int, int, int]:
    """Where ``path``'s record lies in the records of ``buf``, read by their heads and lengths alone:
    ``(0, start, end)`` its bytes, ``(1, start, start)`` not there (a record sorting after it starts there),
    ``(2, start, start)`` ``buf`` ends first (inside the record starting there, or at its end).  Decoding
    every record before it cost a look-up of one path several milliseconds a blob."""
    if _locate_c is None:
        return locate_record_reference(buf, path, what)
    try:
        return _locate_c(buf, path, OP_DELETE)
    except ValueError as exc:
        raise CorruptObject(what, str(exc)) from None


def locate_record_reference(buf: bytes | memoryview, path: bytes, what: str) -> tuple[int, int, int]:
    """``locate_record`` in Python: what the C look-up must match."""
    buf = bytes(buf)
    key, n, pos = sort_key(path), len(buf), 0
    while True:
        start = pos
        if pos + _HEAD.size > n:
            return 2, start, start
        op, plen = _HEAD.unpack_from(buf, pos)
        if op > OP_DELETE:
            raise CorruptObject(what, f"unknown manifest record op {op}")
        pos += _HEAD.size
        if pos + plen > n:
            return 2, start, start
        k = sort_key(buf[pos : pos + plen])
        if k > key:
            return 1, start, start
        pos += plen
        if op != OP_DELETE:
            if pos + _BODY.size > n:
                return 2, start, start
            fixed = _BODY.unpack_from(buf, pos)
            pos += _BODY.size + fixed[-2] + fixed[-1]
            if pos + 4 > n:
                return 2, start, start
            pos += 4 + 32 * _COUNT.unpack_from(buf, pos)[0]
            if fixed[1] & F_XATTRS:
                if pos + 4 > n:
                    return 2, start, start
                pos += 4 + _COUNT.unpack_from(buf, pos)[0]
            if pos > n:
                return 2, start, start
        if k == key:
            return 0, start, pos


class RecordStream:
    """Records decoded from a byte stream of them fed in pieces (a manifest's blobs, an export file's sections).

    A record spanning many pieces (a file of a million chunks: 32 MB of ids) grows one buffer: joined anew to
    each piece, it was copied once a piece, the old and the new buffer held together beside the decoded record.
    The buffer is let go once decoded."""

    def __init__(self, what: str):
        self.what = what
        self.pending = bytearray()  # the start of a record the pieces so far hold

    def feed(self, piece: bytes, what: str | None = None) -> list[Record]:
        """The records ``piece`` ends; ``what`` names it in an error (default: the stream's name)."""
        if self.pending:
            self.pending += piece
            buf: bytes | memoryview | bytearray = self.pending
        else:
            buf = piece
        records, used = decode_records(buf, what or self.what)
        if buf is self.pending:
            del self.pending[:used]
        elif used < len(piece):
            self.pending = bytearray(memoryview(piece)[used:])
        return records

    def finish(self, message: str = "manifest ends inside a record") -> None:
        if self.pending:
            raise CorruptObject(self.what, message)


def iter_records(pieces: Iterable[bytes], what: str) -> Iterator[Record]:
    """Records from a manifest's byte stream delivered in pieces (blobs), gathered as ``RecordStream`` does.
    Each record is let go once handed on, so a caller that replaces one (a copy's mapped ids) does not hold
    both."""
    stream = RecordStream(what)
    for piece in pieces:
        records = stream.feed(piece)
        records.reverse()
        while records:
            yield records.pop()
    stream.finish()


@dataclass
class ManifestStats:
    """Counts a manifest carries into its snapshot's summary."""

    records: int = 0
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    deleted: int = 0
    unreadable: list[bytes] = field(default_factory=list)

    def count(self, rec: Record) -> None:
        if rec.op == OP_DELETE:
            self.records += 1
            self.deleted += 1
            return
        assert rec.entry is not None
        self.count_entry(rec.entry)

    def add_files(self, n: int, size: int) -> None:
        """``n`` readable regular files of ``size`` bytes in all."""
        self.records += n
        self.files += n
        self.bytes += size

    def add_entries(self, dirs: int, others: int) -> None:
        """``dirs`` directories that could be listed and ``others`` entries that are neither those nor
        regular files (counted among the files, as ``count_entry`` does)."""
        self.records += dirs + others
        self.dirs += dirs
        self.files += others

    def count_entry(self, e: Entry) -> None:
        self.records += 1
        if e.type == T_DIR:
            self.dirs += 1
        else:
            self.files += 1
            if e.type == T_FILE:
                self.bytes += e.size
        if e.flags & F_UNREADABLE:
            self.unreadable.append(e.path)
