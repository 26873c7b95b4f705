"""Reading a tar stream into a snapshot's entries (``import-tar``).

The tar is read once, front to back, never seeking, so a pipe works: each member's
content is stored as it passes (the caller's ``store``), its entry kept.  Tar order is
not the manifest's, and a member may be named again later (the last one wins, as
extraction does), so the entries are collected and sorted at the end: memory grows
with the number of members (an entry each), not with their data.
"""
from __future__ import annotations

import bisect
import bz2
import gzip
import lzma
import math
import os
import re
import tarfile
import zlib
from dataclasses import replace
from typing import BinaryIO, Callable, Iterator, NamedTuple

import zstandard

from chunkvault.chunker import TOLD_HOLE_BYTES
from chunkvault.errors import IncompleteSource, UsageError

from .manifest import (NS_MAX, NS_MIN, T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK, Entry,
                       held_ns, sort_key)
from .xattrs import encode_xattrs

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)  # a zstd frame of metadata (pzstd begins with one)
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
XZ_MAGIC = (b"\xfd7zXZ\x00", b"\x5d\x00\x00\x80")  # xz, and the old .lzma as tarfile tells it
IMPLIED_MODE = 0o755  # a directory the tar implies but does not list, with no listed directory below it
_XATTR = "SCHILY.xattr."
_ACL = {"SCHILY.acl.access": _XATTR + "system.posix_acl_access",  # an ACL as text -> as its attribute
        "SCHILY.acl.default": _XATTR + "system.posix_acl_default"}
GNUTYPE_DUMPDIR = b"D"  # GNU tar's incremental (``tar -g``) directory: the directory and a listing of its names
GNUTYPE_VOLHDR = b"V"  # GNU tar's volume label (``tar -V``): tar -x makes nothing of it
GNUTYPE_MULTIVOL = b"M"  # the rest of a file begun in the volume before (``tar -M``): tar -x refuses it alone
_KNOWN_TYPES = frozenset(tarfile.SUPPORTED_TYPES) | {GNUTYPE_DUMPDIR, GNUTYPE_VOLHDR, GNUTYPE_MULTIVOL}
_LONG_NAMES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_WHOLE_HEADERS = frozenset(_LONG_NAMES + (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE))
SPARSE_LIMIT = 1 << 20  # extents of a sparse member's map, which tarfile holds as a list of tuples
HEADER_LIMIT = 16 << 20  # a pax extended header's or GNU long name's size: tarfile reads each whole into memory
ID_LIMIT = 2**32  # owner and group ids, as a snapshot holds them
XATTR_NAME_MAX = 255  # an extended attribute's name: at least a byte, no NUL, at most this many (Linux's)
XATTR_SIZE_MAX = 65536  # an extended attribute's value, and a file's names each with its NUL, at most (Linux's)
XATTRS_LIMIT = 1 << 20  # a member's extended attributes, names and values together: each entry is kept to the end
DEVICE_LIMIT = 2**31  # device major and minor numbers: os.makedev takes a C int each (GNU tar's limit too)
Store = Callable[[BinaryIO, bytes, int], "tuple[bytes, bytes, int]"]  # (stream, path, size) -> digest, ids, size


def member_path(name: str, strip: int = 0, link_of: str | None = None) -> bytes | None:
    """A member's name as a path below the snapshot's root: leading ``/`` gone, then ``strip`` leading
    components (as GNU tar's ``--strip-components`` counts them, ``.`` included), then ``.`` parts; None
    for a member the stripping leaves nothing of.  A ``..`` part is refused: it would lead out of the tree.
    ``link_of``: the member ``name`` is the hard link target of (named first in the refusal)."""
    raw = os.fsencode(name)
    parts = [p for p in raw.split(b"/") if p]
    # names quoted as text, not repr(): the console shows a byte no UTF-8 holds as \xff
    what = f"tar member '{name}'" if link_of is None else f"tar member '{link_of}' is a hard link to '{name}', which"
    if b".." in parts:
        raise UsageError(f"{what} has a '..' component: refused (it leads out of the tree)")
    _refuse_nul(raw, what)
    if strip:
        if len(parts) <= strip:
            return None
        parts = parts[strip:]
    return b"/".join(p for p in parts if p != b".")


def _refuse_nul(raw: bytes, what: str) -> None:
    """A NUL in a pax path or link target (a ustar field ends at one) is refused: no file or link can hold one,
    and the snapshot it made failed ``check`` and every restore (a symbolic link's: an internal error)."""
    if b"\0" in raw:
        raise UsageError(f"{what} has a NUL byte: refused (no file name or link holds one)")


def pax_time_ns(text: str) -> int:
    """A pax time (decimal seconds, maybe signed and fractional) as exact nanoseconds (tarfile's float is
    off by up to a few hundred ns)."""
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("+-").partition(".")
    if not (whole or frac).isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    return sign * (int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9]))


class _File:
    """A regular file's content and metadata, shared by the paths hard-linked to it."""

    __slots__ = ("entry", "paths")

    def __init__(self, entry: Entry):
        self.entry = entry
        self.paths: set[bytes] = set()


class _Implied:
    """A directory no member lists: it takes the first listed directory below it, else the first member."""

    __slots__ = ("dir", "first")

    def __init__(self) -> None:
        self.dir: Entry | None = None
        self.first: Entry | None = None


class TarTree:
    """The tree a tar's members make, as extraction would leave it (pure: content is stored by the caller)."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, Entry | _File] = {}
        self.implied: dict[bytes, _Implied] = {}
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}
        self.warnings: list[str] = []
        self.unreadable: list[str] = []
        self._ensure_dir(b"")

    def _remove(self, rel: bytes, keep_children: bool = False) -> None:
        old = self.nodes.pop(rel, None)
        self.implied.pop(rel, None)
        if isinstance(old, _File):
            old.paths.discard(rel)
        elif old is not None and old.type == T_DIR and not keep_children:
            below = rel + b"/" if rel else b""
            for p in [p for p in self.nodes if p.startswith(below) and p != rel]:
                self._remove(p, True)

    def _ensure_dir(self, rel: bytes) -> None:
        node = self.nodes.get(rel)
        if isinstance(node, Entry) and node.type == T_DIR:
            return
        if node is not None:
            self._remove(rel)
        self.nodes[rel] = Entry(rel, T_DIR, IMPLIED_MODE)
        self.implied[rel] = _Implied()

    def _unsettled_ancestors(self, e: Entry) -> list[bytes]:
        """The directories above ``e`` that ``add`` must make, or tell of ``e`` (``_Implied``), top down.

        Walked from ``e`` up to the first one that is there and needs nothing, above which none does
        (whatever settled it passed them all), so a member costs the directories it adds, not its depth:
        from the root down, a tar of a tree thousands of directories deep took minutes (each member's
        every ancestor sliced and looked up)."""
        rel, out = e.path, []
        at = len(rel)
        while True:
            at = rel.rfind(b"/", 0, at)
            a = rel[:at] if at != -1 else b""
            if self._settled(a, e):
                break
            out.append(a)
            if at == -1:
                break
        out.reverse()
        return out

    def _settled(self, a: bytes, e: Entry) -> bool:
        """Whether the directory ``a``, above ``e``, is there and ``add(e)`` has nothing to tell it."""
        node = self.nodes.get(a)
        if not (isinstance(node, Entry) and node.type == T_DIR):
            return False
        imp = self.implied.get(a)
        return imp is None or not e.path or (imp.first is not None and (imp.dir is not None or e.type != T_DIR))

    def add(self, e: Entry, names: tuple[str, str] = ("", "")) -> None:
        """Put ``e`` at its path: what was there goes (a directory's children stay when ``e`` is one too),
        the directories above are made where missing."""
        rel = e.path
        for a in self._unsettled_ancestors(e):
            self._ensure_dir(a)
            if self.implied and (imp := self.implied.get(a)) is not None and rel:
                if imp.first is None:
                    imp.first = e
                if imp.dir is None and e.type == T_DIR:
                    imp.dir = e
        if rel:
            old = self.nodes.get(rel)
            self._remove(rel, keep_children=e.type == T_DIR and isinstance(old, Entry) and old.type == T_DIR)
        else:
            self.implied.pop(b"", None)
        self.nodes[rel] = e
        if names[0]:
            self.users.setdefault(e.uid, names[0])
        if names[1]:
            self.groups.setdefault(e.gid, names[1])

    def add_file(self, e: Entry, names: tuple[str, str] = ("", "")) -> None:
        """A regular file member whose content ``e`` holds."""
        self.add(e, names)
        f = _File(e)
        f.paths.add(e.path)
        self.nodes[e.path] = f

    def add_link(self, rel: bytes, target: bytes | None, member: str, target_name: str = "") -> None:
        """A hard link member: ``rel`` names what is now at ``target`` (one the tar listed before it; None:
        ``target_name``, stripped away).  A symlink, FIFO or device there is copied to ``rel``: a snapshot
        hard-links regular files only, and records two names of one such node as two, as a backup does."""
        node = None if target is None else self.nodes.get(target)
        shown = target_name or os.fsdecode(target or b"") or "."
        why = ""
        if target is None:
            why = "which --strip-components removes"
        elif node is None:
            why = "which is no member the tar lists before it"
        elif isinstance(node, Entry) and node.type == T_DIR:
            why = "a directory, which cannot be hard-linked"
        if why:
            self.warnings.append(f"hard link {member} names {shown}, {why}: left out")
            self.unreadable.append(os.fsdecode(rel))
            return
        if target == rel:
            return
        if isinstance(node, Entry):
            self.add(replace(node, path=rel))
            return
        assert isinstance(node, _File)
        self.add(Entry(rel, T_HARDLINK, node.entry.mode, node.entry.uid, node.entry.gid, node.entry.mtime_ns))
        node.paths.add(rel)
        self.nodes[rel] = node

    def entries(self) -> list[Entry]:
        """The tree's entries in manifest order; of each multiply-linked file the path first in that order
        holds the data, the others name it."""
        for rel, imp in self.implied.items():
            like = imp.dir or imp.first
            e = self.nodes[rel]
            assert isinstance(e, Entry)
            if like is not None:
                e.mode = like.mode if imp.dir is not None else IMPLIED_MODE
                e.uid, e.gid, e.mtime_ns, e.ctime_ns = like.uid, like.gid, like.mtime_ns, like.mtime_ns
        out: list[Entry] = []
        for rel in sorted(self.nodes, key=sort_key):
            node = self.nodes[rel]
            if isinstance(node, Entry):
                out.append(node)
                continue
            holder = min(node.paths, key=sort_key)
            d = node.entry
            if rel == holder:
                out.append(Entry(rel, T_FILE, d.mode, d.uid, d.gid, d.mtime_ns, d.size, d.mtime_ns,
                                 digest=d.digest, chunks=d.chunks, xattrs=d.xattrs))
            else:
                out.append(Entry(rel, T_HARDLINK, d.mode, d.uid, d.gid, d.mtime_ns, d.size, d.mtime_ns,
                                 target=holder))
        return out


class _Prefixed:
    """A stream with bytes already read from it put back in front (the magic looked at)."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self._head, self._raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(out):]
            return out
        return self._raw.read(n) if n >= 0 else self._raw.read()


class _Watched:
    """The tar's (decompressed) stream, remembering its last read: the header block ``TarFile.next``
    read last tells an archive's end (a zero block) from one cut short (tarfile ends quietly there)."""

    def __init__(self, inner: object):
        self._inner = inner
        self.last = b""

    def read(self, n: int) -> bytes:
        self.last = self._inner.read(n)  # type: ignore[attr-defined]
        return self.last

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def _too_many_extents(name: str, count: int | None = None) -> None:
    raise UsageError(f"tar member '{name}' has a sparse map of {count or 'more'} extents: refused (over "
                     f"{SPARSE_LIMIT}, each held in memory)")


class _Blocks:
    """A stream that gives at most ``left`` blocks (reads of a block or less), then refuses the member's
    sparse map as too long."""

    def __init__(self, inner: object, left: int, name: str):
        self._inner, self._left, self._name = inner, left, name

    def read(self, n: int) -> bytes:
        self._left -= 1
        if self._left < 0:
            _too_many_extents(self._name)
        return self._inner.read(n)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


class _TarInfo(tarfile.TarInfo):
    """A header read as GNU tar reads it: in a GNU-format header (magic ``ustar  \\0``) bytes 345 to 369
    are the atime and ctime (``tar -g`` fills them in), not the ustar name prefix that tarfile would put in
    front of every name; and a pax extended header or GNU long name over ``HEADER_LIMIT`` is refused."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        """tarfile reads such a header whole, and held about three times its size: a .tar.zst of 33 KB
        took 3 GB of memory to import (a header of 1 GiB of zeros), where bsdtar refuses the header."""
        if self.type in _WHOLE_HEADERS and self.size > HEADER_LIMIT:
            kind = "GNU long name" if self.type in _LONG_NAMES else "pax extended header"
            raise UsageError(f"the tar has a {kind} of {self.size} bytes (at byte {self.offset}): refused (no "
                             f"names or attributes need over {HEADER_LIMIT >> 20} MiB; it is read into memory whole)")
        return super()._proc_member(tf)  # type: ignore[misc]

    def _proc_sparse(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        """An old GNU sparse header (``S``) read as tarfile reads it, its extension blocks (21 extents each)
        refused past ``SPARSE_LIMIT`` extents: tarfile holds them all, about 200 bytes an extent."""
        inner = tf.fileobj
        tf.fileobj = _Blocks(inner, SPARSE_LIMIT // 21 + 1, self.name)  # type: ignore[assignment]
        try:
            return super()._proc_sparse(tf)  # type: ignore[misc]
        finally:
            tf.fileobj = inner

    def _proc_gnusparse_01(self, next: tarfile.TarInfo, pax_headers: dict[str, str]) -> None:
        """A GNU sparse 0.1 map (one pax record) of more than ``SPARSE_LIMIT`` extents refused before tarfile
        holds it."""
        if (count := pax_headers["GNU.sparse.map"].count(",") // 2 + 1) > SPARSE_LIMIT:
            _too_many_extents(pax_headers.get("GNU.sparse.name", next.name), count)
        super()._proc_gnusparse_01(next, pax_headers)  # type: ignore[misc]

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str], tf: tarfile.TarFile) -> None:
        """A GNU sparse 1.0 map read as tarfile reads it, a count past ``SPARSE_LIMIT`` refused first: a map of
        ten million extents (a .tar.zst of 3.5 KB) took 2 GB of memory and 23 s to import."""
        sparse: list[int] = []
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
        fields, buf = buf.split(b"\n", 1)
        count = int(fields)
        if count > SPARSE_LIMIT:
            _too_many_extents(pax_headers.get("GNU.sparse.name", next.name), count)
        while len(sparse) < count * 2:
            if b"\n" not in buf:
                buf += tf.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
            number, buf = buf.split(b"\n", 1)
            sparse.append(int(number))
        next.offset_data = tf.fileobj.tell()  # type: ignore[union-attr]
        next.sparse = list(zip(sparse[::2], sparse[1::2]))  # type: ignore[attr-defined]

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> "tarfile.TarInfo":  # type: ignore[override]
        obj = super().frombuf(buf, encoding, errors)
        if buf[257:265] == tarfile.GNU_MAGIC and obj.type not in tarfile.GNU_TYPES:
            obj.name = tarfile.nts(buf[0:100], encoding, errors)  # type: ignore[attr-defined]
            if obj.isdir():
                obj.name = obj.name.rstrip("/")
        return obj


def _read_exactly(raw: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = raw.read(n - len(out))
        if not part:
            break
        out += part
    return out


def open_tar(raw: BinaryIO) -> tarfile.TarFile:
    """A tar read as a stream: plain, or gzip, bzip2, xz or zstd compressed (told by its magic)."""
    # A block's worth, however a pipe delivers it: tarfile tells the compression by what its first read gives
    head = _read_exactly(raw, tarfile.BLOCKSIZE)
    if not head:
        raise UsageError("not a tar archive: the input is empty")
    stream: object = _Prefixed(head, raw)
    # Decompressed here, not by tarfile: its own readers stop quietly where the input does, so a stream cut
    # short past the tar's end (its end marker and check gone) passed for whole; these raise EOFError there
    if head.startswith(GZIP_MAGIC):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[call-overload]
    elif head.startswith(BZIP2_MAGIC):
        stream = bz2.BZ2File(stream)  # type: ignore[arg-type]
    elif head.startswith(XZ_MAGIC):
        stream = _XzReader(stream) if head.startswith(XZ_MAGIC[0]) else lzma.LZMAFile(stream)  # type: ignore[arg-type]
    elif head.startswith(ZSTD_MAGIC) or int.from_bytes(head[:4], "little") in ZSTD_SKIPPABLE:
        stream = _ZstdReader(stream)  # type: ignore[arg-type]
    first = b""
    try:
        first = _read_exactly(stream, tarfile.BLOCKSIZE)  # type: ignore[arg-type]
        return tarfile.open(fileobj=_Prefixed(first, stream), mode="r|*", encoding="utf-8",  # type: ignore[arg-type]
                            errors="surrogateescape", tarinfo=_TarInfo)
    except (EOFError, IndexError) as exc:  # compressed, and broken off before a whole block of the tar came out
        raise _damaged(exc, "before its first member") from None  # of it; or a sparse header's extension cut
    except _DAMAGE as exc:
        if _is_header(first):  # a tar, cut after a header that only leads a member (pax, GNU long name)
            raise _damaged(exc, "after the header leading its first member") from None
        raise UsageError(f"not a tar archive ({exc})") from None


def _is_header(block: bytes) -> bool:
    """Whether ``block`` is a tar header block (its checksum holds)."""
    return not _not_header(block)


def _not_header(block: bytes) -> str:
    """Why ``block`` is no tar header block, as tarfile says it ("bad checksum", "empty header"); "" if it is one."""
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return str(exc) or type(exc).__name__
    return ""


class _ZstdFrames:
    """A zstd stream's compressed bytes as read, its frames walked from their headers as they pass (nothing
    is decompressed): whether it ended between frames, or within one, cut short."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._walk = self._frames()
        self._need = next(self._walk)  # bytes the walk asks for next (negative: to be skipped, not looked at)
        self._got = bytearray()
        self._between = True  # the next bytes begin a frame

    @property
    def whole(self) -> bool:
        """Whether what passed ends where a frame does."""
        return self._between and not self._got

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._feed(data)
        return data

    def _feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._need < 0:
                n = min(-self._need, len(data) - at)
                self._need += n
                at += n
                done = not self._need
            else:
                n = min(self._need - len(self._got), len(data) - at)
                self._got += data[at:at + n]
                at += n
                done = len(self._got) == self._need
            if done:
                got, self._got = bytes(self._got), bytearray()
                self._need = self._walk.send(got)

    def _frames(self) -> Iterator[int]:
        """Yields how many bytes it needs next (negative: skipped), and is sent them (RFC 8878)."""
        while True:
            self._between = True
            magic = yield 4
            self._between = False
            if int.from_bytes(magic, "little") in ZSTD_SKIPPABLE:
                size = int.from_bytes((yield 4), "little")
                if size:
                    yield -size
                continue
            descriptor = (yield 1)[0]
            single, fcs, dict_id = descriptor >> 5 & 1, descriptor >> 6, descriptor & 3
            header = (0 if single else 1) + (0, 1, 2, 4)[dict_id] + ((1 if single else 0), 2, 4, 8)[fcs]
            if header:
                yield header
            last = False
            while not last:
                block = int.from_bytes((yield 3), "little")
                last, kind, size = bool(block & 1), block >> 1 & 3, block >> 3
                body = 1 if kind == 1 else size
                if body:
                    yield -body
            if descriptor & 4:  # the content checksum
                yield -4


class _XzReader:
    """An xz file decompressed as ``xz -d`` reads it: streams one after another, the zero bytes of stream
    padding between and after them skipped (lzma.LZMAFile took padding for a stream cut short: exit 20 for a
    file xz and GNU tar read); EOFError where the input ends within a stream, LZMAError where padding is not
    whole 4-byte words (the format's rule, which ``xz -t`` holds a file to)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._stream: lzma.LZMADecompressor | None = None  # None: between streams
        self._input = b""  # read, not yet decompressed
        self._padding = 0  # zero bytes skipped since the last stream ended

    def _padded(self) -> None:
        if self._padding % 4:
            raise lzma.LZMAError(f"xz stream padding of {self._padding} bytes is not a multiple of 4")

    def _more(self) -> bool:
        self._input = self._raw.read(1 << 16)
        return bool(self._input)

    def read(self, n: int = -1) -> bytes:
        while True:
            if self._stream is None:
                stripped = self._input.lstrip(b"\0")
                self._padding += len(self._input) - len(stripped)
                self._input = stripped
                if self._input:
                    self._padded()
                    self._stream = lzma.LZMADecompressor(lzma.FORMAT_XZ)
                elif not self._more():
                    self._padded()
                    return b""
                continue
            if self._stream.eof:
                self._input, self._stream, self._padding = self._stream.unused_data, None, 0
                continue
            if self._stream.needs_input and not self._input and not self._more():
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")  # as lzma says it
            data = self._stream.decompress(self._input, n)
            self._input = b""
            if data or not n:
                return data


class _ZstdReader:
    """A zstd stream decompressed, raising EOFError where it ends within a frame (python-zstandard's
    reader stops there quietly: a stream cut short in its last frame passed for whole)."""

    def __init__(self, raw: BinaryIO):
        self._frames = _ZstdFrames(raw)
        self._inner = zstandard.ZstdDecompressor().stream_reader(self._frames, read_across_frames=True)

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        if not data and n and not self._frames.whole:
            raise EOFError("zstd stream ended within a frame (cut short?)")
        return data


# What reading a damaged or cut archive raises: tarfile's errors, a decompressor's, a header's bad number
# IndexError: tarfile parses a GNU sparse header's extension block cut short (a block of fewer than 512 bytes)
_DAMAGE = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError, OSError, ValueError, IndexError)


class _MemberData:
    """A member's content as ``store`` reads it: what the archive's damage raises there is IncompleteSource,
    told apart from the errors of storing it.  A sparse member's long holes are told as zeros
    (``zeros_ahead``, as ``Chunker.chunks`` takes them): a 10 GiB member of holes took 18 s, its zeros made,
    scanned and hashed chunk by chunk."""

    def __init__(self, inner: BinaryIO, name: str, sparse: list[tuple[int, int]] | None = None,
                 size: int = 0):
        self._inner, self._name = inner, name
        self._holes = _holes(sparse, size) if sparse else []
        self._pos = 0
        if self._holes:  # positioned directly: the buffered reader over a tar read as a stream cannot seek
            self._inner = inner.raw  # type: ignore[attr-defined]

    def _failed(self, exc: BaseException) -> IncompleteSource:
        return _damaged(exc, f"inside member '{self._name}'")

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._inner.read(n)
        except _DAMAGE as exc:
            raise self._failed(exc) from None
        self._pos += len(data)
        return data

    def readinto(self, b: memoryview) -> int:
        try:
            n = self._inner.readinto(b)  # type: ignore[attr-defined]
        except _DAMAGE as exc:
            raise self._failed(exc) from None
        self._pos += n
        return n

    def zeros_ahead(self) -> int:
        at = bisect.bisect_right(self._holes, (self._pos, 1 << 63)) - 1
        if at >= 0 and self._holes[at][0] <= self._pos < self._holes[at][1]:
            return self._holes[at][1] - self._pos
        return 0

    def skip(self, n: int) -> None:
        self._pos += n
        self._inner.seek(self._pos)


def _holes(sparse: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (start, end) of each hole of at least ``TOLD_HOLE_BYTES`` in a member of ``size`` bytes whose data
    lies in the ``sparse`` (offset, length) blocks.  A block starting past ``size`` (a damaged or crafted map)
    ends no hole there: the member is ``size`` bytes, as tarfile reads it, and a hole told past it made it longer."""
    out, end = [], 0
    for offset, length in sorted(sparse) + [(size, 0)]:
        offset = min(offset, size)
        if offset - end >= TOLD_HOLE_BYTES:
            out.append((end, offset))
        end = max(end, offset + length)
    return out


def _damaged(exc: BaseException, where: str) -> IncompleteSource:
    if isinstance(exc, IndexError):
        text = "a header cut short"
    elif isinstance(exc, ValueError):  # tarfile parsing a sparse map's or pax record's numbers and lines
        text = "a header or sparse map cut short or garbled"
    else:
        text = str(exc) or type(exc).__name__
    return IncompleteSource(f"the tar ends or breaks off {where} ({text}): no snapshot saved")


class Member(NamedTuple):
    entry: Entry
    names: tuple[str, str]
    link: bytes | None  # a hard link's target path (None: stripped away, or no hard link)
    acl: bool = False  # the member has POSIX ACL records without their attribute's, which are not imported
    link_name: str | None = None  # a hard link's target as the tar names it (None: no hard link)
    not_held: int = 0  # a GNU dumpdir's: how many names it lists as not in this archive (an incremental dump's)
    odd_type: bytes = b""  # a typeflag no tar defines (the member stored as a regular file), or GNUTYPE_MULTIVOL


def _not_dumped(f: BinaryIO) -> int:
    """How many names a GNU dumpdir (``Y``/``N``/``D`` then the name, NUL-ended each) marks ``N``: in the
    dump's directory, not in this archive (unchanged since the dump an incremental one builds on)."""
    n, start = 0, True
    while chunk := f.read(1 << 16):
        n += (start and chunk[:1] == b"N") + chunk.count(b"\0N")
        start = chunk.endswith(b"\0")
    return n


def _check_ids(m: tarfile.TarInfo) -> None:
    """A member's ids beyond a snapshot's 32 bits, and device numbers beyond 31 (a pax or GNU header can hold
    any), are refused, naming it: GNU tar rejects such values too (exit 2), and any owner or device given
    instead would be made up.  So is a pax id or size that is no number, which GNU tar calls malformed, and a
    size below 0."""
    for key in ("uid", "gid", "size"):  # tarfile reads one that is no number as 0 (root, or an empty file)
        text = m.pax_headers.get(key)
        if text is not None and not re.fullmatch(r"-?[0-9]+", text):
            raise UsageError(f"tar member '{m.name}' has {key} {text}, which is no number: refused")
    if m.size < 0:  # tarfile takes it (the member's data then read as the next header); GNU tar refuses it
        raise UsageError(f"tar member '{m.name}' has size {m.size}, which is no size: refused")
    named = [("uid", m.uid, ID_LIMIT), ("gid", m.gid, ID_LIMIT)]
    if m.ischr() or m.isblk():
        named += [("device major", m.devmajor, DEVICE_LIMIT), ("device minor", m.devminor, DEVICE_LIMIT)]
    for what, value, limit in named:
        if not 0 <= value < limit:
            raise UsageError(f"tar member '{m.name}' has {what} {value}, outside what a snapshot holds "
                             f"(0 to {limit - 1}): refused")


def _mtime_ns(m: tarfile.TarInfo) -> int:
    """``m``'s modification time in nanoseconds, one beyond what an entry holds at the nearest end.  A pax
    time tarfile reads as a float but that is no number ("inf", "nan") was an internal error (exit 1): it is
    refused, naming the member, as GNU tar calls such a header malformed; so is one that is no number at all
    ("abc", "1.2.3"), which tarfile reads as 0 and was stored as 1970."""
    text = m.pax_headers.get("mtime")
    try:
        return held_ns(pax_time_ns(text) if text is not None else int(m.mtime) * 1_000_000_000)
    except ValueError:  # a notation pax_time_ns does not take ("1e30", "inf"), or no number
        try:
            seconds = float(text)  # type: ignore[arg-type]
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise UsageError(f"tar member '{m.name}' has modification time {text}, which is no time: "
                             "refused") from None
        return held_ns(int(seconds * 1_000_000_000))


def _entry(m: tarfile.TarInfo, rel: bytes) -> Entry:
    _check_ids(m)
    ns = _mtime_ns(m)
    e = Entry(rel, T_FILE, m.mode & 0o7777, m.uid, m.gid, ns, 0, ns)
    xattrs = {os.fsencode(k[len(_XATTR):].replace("%3D", "=").replace("%25", "%")):
              v.encode("utf-8", "surrogateescape") for k, v in m.pax_headers.items() if k.startswith(_XATTR)}
    for name in xattrs:  # encode_xattrs raised (exit 1) on some, a restore on the others
        if not 0 < len(name) <= XATTR_NAME_MAX or b"\0" in name:
            raise UsageError(f"tar member '{m.name}' has an extended attribute named '{os.fsdecode(name)}', "
                             "which no file can have: refused")
        if len(xattrs[name]) > XATTR_SIZE_MAX:
            raise UsageError(f"tar member '{m.name}' has an extended attribute '{os.fsdecode(name)}' of "
                             f"{len(xattrs[name])} bytes, more than a file can hold ({XATTR_SIZE_MAX}): refused")
    if (listed := sum(len(name) + 1 for name in xattrs)) > XATTR_SIZE_MAX:
        raise UsageError(f"tar member '{m.name}' has {len(xattrs)} extended attributes whose names take {listed} "
                         f"bytes, more than a file can hold ({XATTR_SIZE_MAX}): refused")
    if (held := sum(len(name) + len(value) for name, value in xattrs.items())) > XATTRS_LIMIT:
        # Linux bounds each value, not their sum; a member's entry is held until the end, and a global pax
        # header's attributes are every member's: 16 MiB of them took 16 MiB of memory a member
        raise UsageError(f"tar member '{m.name}' has {len(xattrs)} extended attributes of {held} bytes together, "
                         f"more than an import keeps for one file ({XATTRS_LIMIT}): refused")
    if xattrs:
        e.xattrs = encode_xattrs(xattrs)
    return e


def read_members(tf: tarfile.TarFile, store: Store, strip: int = 0) -> Iterator[Member]:
    """Each member of ``tf`` as an entry, a regular file's content stored through ``store`` (given the
    member's own stream) as it passes; IncompleteSource when the tar breaks off or ends before its end
    marker, UsageError for a ``..`` name or an id a snapshot cannot hold."""
    watched = _Watched(tf.fileobj)
    tf.fileobj = watched  # type: ignore[assignment]
    count = 0
    while True:
        try:
            m = tf.next()
        except _DAMAGE as exc:
            raise _damaged(exc, f"after member {count}") from None
        if m is None:
            break
        tf.members.clear()  # a stream's members are not looked up again: memory stays an entry each
        count += 1
        rel = member_path(m.name, strip)
        if rel is None:
            continue
        e = _entry(m, rel)
        names = (m.uname, m.gname)
        # only as text: GNU tar --xattrs --acls writes the attribute too, which is imported
        acl = any(k in m.pax_headers and a not in m.pax_headers for k, a in _ACL.items())
        if m.isreg() or m.type not in _KNOWN_TYPES:  # an unknown type is a regular file, as POSIX has it
            f = tf.extractfile(m)
            assert f is not None
            data = _MemberData(f, m.name, m.sparse, m.size)  # type: ignore[arg-type]
            e.digest, e.chunks, e.size = store(data, rel, m.size)  # type: ignore[arg-type]
            yield Member(e, names, None, acl, odd_type=b"" if m.isreg() else m.type)
        elif m.type == GNUTYPE_MULTIVOL:
            yield Member(e, names, None, acl, odd_type=m.type)
        elif m.islnk():
            # None: stripped away with its member, no file there (add_link says so)
            target = member_path(m.linkname, strip, link_of=m.name)
            yield Member(e, names, target, acl, m.linkname)
        elif m.type == GNUTYPE_DUMPDIR:  # a directory, as ``tar -x`` (without -g) extracts it
            e.type = T_DIR
            f = tf.extractfile(m)
            assert f is not None
            yield Member(e, names, None, acl, not_held=_not_dumped(_MemberData(f, m.name)))  # type: ignore[arg-type]
        else:
            if m.isdir():
                e.type = T_DIR
            elif m.issym():
                e.type, e.target = T_SYMLINK, os.fsencode(m.linkname)
                _refuse_nul(e.target, f"tar member '{m.name}' is a symbolic link to '{m.linkname}', which")
                e.size = len(e.target)
            elif m.isfifo():
                e.type = T_FIFO
            elif m.ischr() or m.isblk():
                e.type = T_CHARDEV if m.ischr() else T_BLOCKDEV
                e.rdev = os.makedev(m.devmajor, m.devminor)
            else:
                continue
            yield Member(e, names, None, acl)
    # No member at all: tarfile read the end block before ``watched`` was in place (a header that did not
    # read there was "not a tar").
    if count and watched.last != bytes(tarfile.BLOCKSIZE):
        if len(watched.last) == tarfile.BLOCKSIZE:  # tarfile ends quietly at a whole block that is no header
            raise IncompleteSource(f"the tar breaks off after member {count}: the block that follows it is no "
                                   f"tar header ({_not_header(watched.last)}): no snapshot saved")
        raise IncompleteSource(f"the tar ends after member {count} without its end-of-archive blocks (cut "
                               "short?): no snapshot saved")
    try:  # to its end: a compressed stream's check (gzip's CRC, zstd's checksum) comes last; a pipe's writer
        while watched.read(1 << 16):  # writes its padding, not into a closed pipe
            pass
    except _DAMAGE as exc:
        raise _damaged(exc, "after its end-of-archive blocks") from None


def read_tree(tf: tarfile.TarFile, store: Store, strip: int = 0) -> TarTree:
    """The tree of the whole tar, its files' content stored."""
    tree = TarTree()
    acl_warned = False
    not_held = 0
    for m in read_members(tf, store, strip):
        not_held += m.not_held
        if m.acl and not acl_warned:
            tree.warnings.append("the tar's POSIX ACL records (SCHILY.acl.*) are not imported")
            acl_warned = True
        shown = os.fsdecode(m.entry.path)
        if m.odd_type == GNUTYPE_MULTIVOL:
            tree.warnings.append(f"{shown}: a tar member continued from another volume (type 'M'), which tar -x "
                                 "refuses: left out")
            tree.unreadable.append(shown)
            continue
        if m.link_name is None and not NS_MIN < m.entry.mtime_ns < NS_MAX:  # held_ns moved it, as a backup's
            tree.warnings.append("modification time before 1677 or after 2262, stored as the nearest of those "
                                 f"ends: {shown}")
        if m.odd_type:
            tree.warnings.append(f"{shown}: a tar member of unknown type {os.fsdecode(m.odd_type)!r}: stored as a "
                                 "regular file, as tar -x extracts it")
        if not m.entry.path and m.entry.type != T_DIR:
            tree.warnings.append("a member named . that is not a directory: left out")
        elif m.link_name is not None:
            tree.add_link(m.entry.path, m.link, os.fsdecode(m.entry.path), m.link_name)
        elif m.entry.type == T_FILE:
            tree.add_file(m.entry, m.names)
        else:
            tree.add(m.entry, m.names)
    if not_held:  # what `tar -x` leaves too; whoever imports one level of a dump series should be told
        tree.warnings.append(f"this GNU incremental dump lists {not_held} file(s) it does not hold (unchanged "
                             "since the dump it builds on): the snapshot has only what the archive holds, as "
                             "tar -x extracts it")
    return tree
