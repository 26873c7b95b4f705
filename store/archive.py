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
from typing import BinaryIO, Callable, Iterable, Mapping

from chunkvault.errors import CorruptObject

from . import tarformat
from .manifest import T_BLOCKDEV, T_CHARDEV, T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK, Entry, unread
from .xattrs import decode_xattrs

ARCHIVES = ("tar", "zip")


def in_subtree(path: bytes, root: bytes) -> bool:
    return root == b"" or path == root or path.startswith(root + b"/")


def write_archive(out: BinaryIO, fmt: str, entries: Iterable[Entry], root: bytes,
                  content: Callable[[Entry], BinaryIO], linked: Callable[[bytes], Entry],
                  names: tuple[Mapping[int, str], Mapping[int, str]] = ({}, {})) -> list[str]:
    """Write the entries below ``root`` (``entries``: a snapshot's tree in order; ``b""``: all of it) to
    ``out`` as ``fmt``; returns warnings (what the format cannot hold). ``content(entry)`` streams a
    file's bytes; ``linked(path)`` is the file entry a hard link names (for a link whose file lies
    outside the subtree, or in a zip); ``names``: the user and group names of owner ids, for a tar."""
    if fmt not in ARCHIVES:
        raise ValueError(f"unknown archive format {fmt!r}")
    warnings: list[str] = []
    writer = _Tar(out, names) if fmt == "tar" else _Zip(out)
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


class _Tar:
    hard_links = True
    exact_names = True
    _KINDS = {T_DIR: tarformat.DIRECTORY, T_SYMLINK: tarformat.SYMLINK, T_HARDLINK: tarformat.HARD_LINK,
              T_FIFO: tarformat.FIFO, T_CHARDEV: tarformat.CHAR_DEVICE, T_BLOCKDEV: tarformat.BLOCK_DEVICE}

    def __init__(self, out: BinaryIO, names: tuple[Mapping[int, str], Mapping[int, str]]):
        self.out = out
        self.written = 0
        self.names = names

    def _write(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)

    def _header(self, e: Entry, kind: bytes, size: int = 0) -> None:
        link = e.target if e.type in (T_SYMLINK, T_HARDLINK) else b""
        device = e.type in (T_CHARDEV, T_BLOCKDEV)
        self._write(tarformat.header(kind, e.path, mode=e.mode, uid=e.uid, gid=e.gid, size=size,
                                     mtime_ns=e.mtime_ns, link=link, major=os.major(e.rdev) if device else 0,
                                     minor=os.minor(e.rdev) if device else 0,
                                     xattrs=decode_xattrs(e.xattrs) if e.xattrs else None, names=self.names))

    def file(self, e: Entry, data: BinaryIO) -> None:
        self._header(e, tarformat.REGULAR, e.size)
        left = e.size
        while left:
            block = data.read(min(left, 1 << 20))
            if not block:
                raise CorruptObject(f"file {os.fsdecode(e.path)}", f"its chunks hold {e.size - left} bytes, "
                                                                 f"not the {e.size} its entry records")
            self._write(block)
            left -= len(block)
        if data.read(1):  # to the end: the reader checks the content against the entry's digest there
            raise CorruptObject(f"file {os.fsdecode(e.path)}", f"its chunks hold more than the {e.size} bytes its "
                                "entry records")
        self._write(tarformat.padding(e.size))

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
