"""A snapshot's subtree as one tar or zip stream: ``dump`` of a directory.

Written front to back, so the output may be a pipe (``dump latest srv/www | ssh host tar x``).
Names are relative to the snapshot's root, as a restore lays them out. tar (POSIX pax) keeps modes,
owners, nanosecond mtimes, symlinks, hard links, devices and FIFOs, extended attributes (as GNU tar
and bsdtar write them: ``SCHILY.xattr.NAME`` records; ``tar --xattrs`` sets them), and any byte in a
name (a file whose first name lies outside the subtree has its data under its first name inside);
zip keeps modes, mtimes (to the second, in Info-ZIP's extended timestamp) and symlinks, stores a hard
link as a copy of its file, and has no devices, FIFOs (each left out is a warning) or extended attributes; a
name that is not UTF-8 has U+FFFD for each byte that does not decode there (a warning too: its zip
name may even be another file's). A tar cut short by an error gets no end-of-archive blocks: the
tar reading it then fails too (ended anyway, the zeros of the end passed for a small file's data).
"""
from __future__ import annotations

import dataclasses
import io
import os
import stat
import struct
import time
import zipfile
from array import array
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

from chunkvault.errors import CorruptObject

from . import tarformat
from .manifest import T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK, ChunkIds, Entry, unread
from .xattrs import decode_xattrs

ARCHIVES = ("tar", "zip")
SPARSE_LEAST = 1 << 20  # the shortest run of zeros a tar leaves out of a file (a sparse member's hole)


def in_subtree(path: bytes, root: bytes) -> bool:
    return root == b"" or path == root or path.startswith(root + b"/")


def write_archive(out: BinaryIO, fmt: str, entries: Iterable[Entry], root: bytes,
                  content: Callable[[Entry], BinaryIO], linked: Callable[[bytes], Entry],
                  names: tuple[Mapping[int, str], Mapping[int, str]] = ({}, {}),
                  holes: Callable[[Entry], list[tuple[int, int]]] = lambda e: []) -> list[str]:
    """Write the entries below ``root`` (``entries``: a snapshot's tree in order; ``b""``: all of it) to
    ``out`` as ``fmt``; returns warnings (what the format cannot hold). ``content(entry)`` streams a
    file's bytes; ``linked(path)`` is the file entry a hard link names (for a link whose file lies
    outside the subtree, or in a zip); ``names``: the user and group names of owner ids, for a tar;
    ``holes(entry)``: a file's runs of zeros, (offset, length) in order, that a tar leaves out (a sparse
    member) rather than writing them."""
    if fmt not in ARCHIVES:
        raise ValueError(f"unknown archive format {fmt!r}")
    warnings: list[str] = []
    writer = _Tar(out, names, holes) if fmt == "tar" else _Zip(out)
    complete = False
    # A file whose first path lies outside the subtree: its first link inside carries the data, and the
    # others link to that one (each carried a copy of the data).
    stand_ins: dict[bytes, bytes] = {}
    try:
        for e in entries:
            if not in_subtree(e.path, root) or e.path == b"":
                continue
            if not writer.exact_names and not tarformat.is_utf8(e.path):
                warnings.append(f"{os.fsdecode(e.path)}: the name is not UTF-8; the {fmt} names it "
                                f"{e.path.decode('utf-8', 'replace')} (a tar keeps its bytes)")
            if e.type == T_HARDLINK and writer.hard_links and e.target in stand_ins:
                e = dataclasses.replace(e, target=stand_ins[e.target])
            elif e.type == T_HARDLINK and not (writer.hard_links and in_subtree(e.target, root)):
                stand_ins.setdefault(e.target, e.path)
                e = dataclasses.replace(linked(e.target), path=e.path)  # a copy of the file it names
            if e.type == T_FILE and unread(e):  # an empty file with its time would pass for its content
                warnings.append(f"{os.fsdecode(e.path)}: unreadable at backup time, left out (no backup read it)")
            elif e.type == T_FILE:
                with content(e) as data:
                    writer.file(e, data)
            elif not writer.other(e):
                warnings.append(f"{os.fsdecode(e.path)}: a {_KIND_NAMES[e.type]} cannot be stored in a {fmt}")
        complete = True
    finally:
        writer.close(complete)
    return warnings


_KIND_NAMES = {T_FIFO: "FIFO", T_CHARDEV: "character device", T_BLOCKDEV: "block device"}


class ChunkLengths(Sequence[tuple[bytes, int]]):
    """A file's chunks as (id, length) pairs, made when asked for: a list of the pairs took some 150 bytes a
    chunk (a dump of a 64 GiB file cut every 64 KiB: 160 MB)."""

    __slots__ = ("ids", "lengths")

    def __init__(self, ids: ChunkIds, lengths: array):
        self.ids, self.lengths = ids, lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):  # type: ignore[override]
        return self.ids[i], self.lengths[i]

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return zip(self.ids, self.lengths)


def zero_runs(chunks: Sequence[tuple[bytes, int]], zero_id: Callable[[int], bytes], cut: int,
              least: int = SPARSE_LEAST) -> list[tuple[int, int]]:
    """Pure: the (offset, length) of each run of at least ``least`` bytes of a file's chunks that hold only
    zeros, told by their ids, unread.  ``chunks``: (id, length) in order; ``zero_id(n)``: the id of n zeros.
    It is asked only of a chunk ``cut`` long (what the chunker cuts a run of zeros into), one whose id its
    neighbour repeats (a hole in fixed-size chunks) or the last one right after such a run (the rest of a file
    ending in zeros): never of every length a file's chunks have.  Inside a file the chunk after a run holds
    its data too (the rest of the zeros and what follows, cut as one): asked of each, the mount's getattr of
    an image with a run every few MiB hashed a buffer of zeros for each run, 0.2 s for 4 GiB."""
    runs: list[tuple[int, int]] = []
    pos = 0
    before: bytes | None = None
    ahead = iter(chunks)
    following = next(ahead, None)
    while following is not None:  # each chunk with its neighbours' ids, by one pass (no list of them)
        (blob_id, n), following = following, next(ahead, None)
        repeated = before == blob_id or following is not None and following[0] == blob_id
        before = blob_id
        after_run = bool(runs) and sum(runs[-1]) == pos
        if n and (n == cut or repeated or after_run and following is None) and blob_id == zero_id(n):
            if after_run:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((pos, n))
        pos += n
    return [run for run in runs if run[1] >= least]


def _data_regions(holes: list[tuple[int, int]], size: int) -> list[tuple[int, int]] | None:
    """Pure: the (offset, length) of the data between ``holes`` in a file of ``size`` bytes, the last one
    empty (at ``size``) where a hole ends the file; None where there is no hole.  Each hole is narrowed to
    whole blocks (its edges written as data, zeros): GNU tar reads each region's data in whole blocks, and
    Python's tarfile reads the regions back to back, so they agree only on regions of whole blocks (but the
    last)."""
    regions: list[tuple[int, int]] = []
    pos = 0
    for start, n in holes:
        if n <= 0 or start < pos or start + n > size:
            raise ValueError(f"holes out of order or out of the file: {holes!r}")
        end = start + n if start + n == size else (start + n) // tarformat.BLOCK * tarformat.BLOCK
        start = -(-start // tarformat.BLOCK) * tarformat.BLOCK
        if end <= start:
            continue
        if start > pos:
            regions.append((pos, start - pos))
        pos = end
    if not pos:
        return None
    regions.append((pos, size - pos))  # the data after the last hole, or none at the end
    return regions


class _Tar:
    hard_links = True
    exact_names = True
    _KINDS = {T_DIR: tarformat.DIRECTORY, T_SYMLINK: tarformat.SYMLINK, T_HARDLINK: tarformat.HARD_LINK,
              T_FIFO: tarformat.FIFO, T_CHARDEV: tarformat.CHAR_DEVICE, T_BLOCKDEV: tarformat.BLOCK_DEVICE}

    def __init__(self, out: BinaryIO, names: tuple[Mapping[int, str], Mapping[int, str]],
                 holes: Callable[[Entry], list[tuple[int, int]]] = lambda e: []):
        self.out = out
        self.written = 0
        self.names = names
        self.holes = holes

    def _write(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)

    def _header(self, e: Entry, kind: bytes, size: int = 0, real_size: int | None = None) -> None:
        link = e.target if e.type in (T_SYMLINK, T_HARDLINK) else b""
        device = e.type in (T_CHARDEV, T_BLOCKDEV)
        self._write(tarformat.header(kind, e.path, mode=e.mode, uid=e.uid, gid=e.gid, size=size,
                                     mtime_ns=e.mtime_ns, link=link, major=os.major(e.rdev) if device else 0,
                                     minor=os.minor(e.rdev) if device else 0,
                                     xattrs=decode_xattrs(e.xattrs) if e.xattrs else None, names=self.names,
                                     real_size=real_size))

    def file(self, e: Entry, data: BinaryIO) -> None:
        """The file's member: its data regions only where it has holes (a 20 GiB database file holding a few
        MiB was 20 GiB of tar).  The holes are read too, and dropped: the reader checks the whole content
        against the entry's digest at its end."""
        regions = _data_regions(self.holes(e), e.size)
        if regions is None:
            self._header(e, tarformat.REGULAR, e.size)
            stored = e.size
        else:
            sparse_map = tarformat.sparse_map(regions)
            stored = len(sparse_map) + sum(n for _, n in regions)
            self._header(e, tarformat.REGULAR, stored, real_size=e.size)
            self._write(sparse_map)
        pos = 0
        for start, n in regions or [(0, e.size)]:  # the last ends at the file's end
            self._copy(e, data, start - pos, False)
            self._copy(e, data, n, True)
            pos = start + n
        if data.read(1):  # to the end: the reader checks the content against the entry's digest there
            raise CorruptObject(f"file {os.fsdecode(e.path)}", f"its chunks hold more than the {e.size} bytes its "
                                "entry records")
        self._write(tarformat.padding(stored))

    def _copy(self, e: Entry, data: BinaryIO, n: int, keep: bool) -> None:
        """The next ``n`` bytes of the file's content, written (``keep``) or read past."""
        while n:
            block = data.read(min(n, 1 << 20))
            if not block:
                raise CorruptObject(f"file {os.fsdecode(e.path)}", "its chunks hold fewer bytes than the "
                                                                 f"{e.size} its entry records")
            if keep:
                self._write(block)
            n -= len(block)

    def other(self, e: Entry) -> bool:
        self._header(e, self._KINDS[e.type])
        return True

    def close(self, complete: bool) -> None:
        if complete:  # an archive cut short by an error has no end: `tar x` then says it is truncated
            self._write(tarformat.end(self.written))


class _Zip:
    hard_links = False
    exact_names = False

    def __init__(self, out: BinaryIO):
        self.zip = zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED)

    def _info(self, e: Entry, name_suffix: str, kind: int) -> zipfile.ZipInfo:
        seconds = e.mtime_ns // 1_000_000_000
        when = time.localtime(min(max(seconds, 315_532_800 + 86_400), 4_354_819_199))[:6]  # zip's years: 1980-2107
        info = zipfile.ZipInfo(e.path.decode("utf-8", "replace") + name_suffix, date_time=when)
        info.create_system = 3  # Unix: the mode below is read
        info.external_attr = (kind | e.mode) << 16 | (0x10 if kind == stat.S_IFDIR else 0)
        info.compress_type = zipfile.ZIP_DEFLATED
        # The extended timestamp (Info-ZIP's "UT" field): the modification time in UTC seconds, which unzip
        # restores exactly; the DOS time above has 2-second steps, local time and the years 1980-2107 only.
        info.extra = struct.pack("<HHBi", 0x5455, 5, 1, min(max(seconds, -(1 << 31)), (1 << 31) - 1))
        return info

    def file(self, e: Entry, data: BinaryIO) -> None:
        info = self._info(e, "", stat.S_IFREG)
        info.file_size = e.size
        w = self.zip.open(info, "w", force_zip64=e.size >= zipfile.ZIP64_LIMIT)
        try:
            while block := data.read(1 << 20):
                w.write(block)
        except BaseException:
            # Closed without finishing the member: its size and CRC would make the part written pass
            # for the whole file.
            io.BufferedIOBase.close(w)
            raise
        w.close()

    def other(self, e: Entry) -> bool:
        if e.type == T_DIR:
            self.zip.writestr(self._info(e, "/", stat.S_IFDIR), b"")
        elif e.type == T_SYMLINK:
            self.zip.writestr(self._info(e, "", stat.S_IFLNK), e.target)
        else:
            return False
        return True

    def close(self, complete: bool) -> None:
        if complete:  # a zip cut short has no central directory: unzip then refuses it, as tar a cut tar
            self.zip.close()
        else:  # nor is one written when the ZipFile is collected (its __del__ closes it): ``out`` is not ours
            self.zip.fp = None
