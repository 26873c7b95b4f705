"""A restore's writes: a run of small files, each created, filled, given its metadata and closed; and a
chunk's data written at its offset with its blocks of zeros left holes (``write_sparse``).

The native versions (``_writefiles``) release the GIL, once for a whole run
of files; this module's references do the same calls one at a time and are
what runs where the extension is not built.  Both take and give the same
things.

Holes are kept at block granularity, as GNU tar's ``-S`` keeps them: a file
is cut in ``HOLE_MIN``-byte blocks aligned on file offsets, and a block that
is all zeros is never written (in a file the restore made) or is punched (in
one it writes in place), wherever it lies in a chunk.
"""
from __future__ import annotations

import errno
import functools
import os
from typing import Callable, Sequence

from chunkvault.store.blob import Plaintext

#: A file to write: (descriptor of its directory, its name there, its content, mode, uid, gid, mtime in
#: nanoseconds).  Named in a directory held open, not by a path: see store/target_dirs.py.
SmallFile = tuple[int, bytes, Plaintext, int, int, int, int]

HOLE_MIN = 4096  # the granularity of holes: a block of zeros this size, aligned on file offsets, is a hole
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # errors after which a run stops
_ZEROS = bytes(HOLE_MIN)


_KEEP_SIZE = 0x01  # FALLOC_FL_KEEP_SIZE (Linux)
_PUNCH_HOLE = _KEEP_SIZE | 0x02  # with FALLOC_FL_PUNCH_HOLE


@functools.cache
def _fallocate() -> Callable[..., int] | None:
    """libc's fallocate, looked up once (None where there is none)."""
    import ctypes

    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate ``length`` bytes at ``offset`` without changing the file's length (FALLOC_FL_KEEP_SIZE), so
    that writing them later cannot find the disk full; False where the system or file system cannot.
    OSError (ENOSPC, EDQUOT) when there is no room: part of it may be allocated, which ``punch_hole`` frees."""
    import ctypes

    fallocate = _fallocate()
    if fallocate is None:
        return False
    if fallocate(fd, _KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in NO_SPACE:
        raise OSError(err, os.strerror(err))
    return False


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make ``length`` bytes at ``offset`` a hole (they read as zeros, and take no space), where the system
    and file system can; False where not (the caller writes the zeros)."""
    fallocate = _fallocate()
    return fallocate is not None and fallocate(fd, _PUNCH_HOLE, offset, length) == 0


def write_sparse_reference(fd: int, data: Plaintext, offset: int, zeros_from: int) -> int:
    """Write ``data`` at file offset ``offset`` with one pwrite per stretch of blocks that are not all zeros;
    return how many of its bytes were left holes.  Blocks are ``HOLE_MIN`` bytes aligned on file offsets
    (partial at the data's ends).  A block of zeros at or past ``zeros_from`` (where the file reads as zeros
    already: 0 for a file the restore made, the old length for one written in place) is skipped; a whole
    one before it is punched, or written where the file system cannot punch; a partial one is written.
    The file's length is the caller's to set (a hole at its end is made by ``ftruncate``)."""
    if offset < 0:
        raise ValueError("negative offset")
    view = memoryview(data).cast("B")
    n, holes, can_punch = len(view), 0, True
    runs: list[list[int]] = []  # [kind, start, end]: 0 write, 1 skip, 2 punch
    i = 0
    while i < n:
        at = offset + i
        end = min(n, i + HOLE_MIN - at % HOLE_MIN)
        kind = 0
        if _ZEROS.startswith(view[i:end]):
            kind = 1 if at >= zeros_from else 2 if end - i == HOLE_MIN else 0
        if runs and runs[-1][0] == kind:
            runs[-1][2] = end
        else:
            runs.append([kind, i, end])
        i = end
    for kind, start, end in runs:
        if kind == 1 or (kind == 2 and can_punch and punch_hole(fd, offset + start, end - start)):
            holes += end - start
            continue
        can_punch = can_punch and kind != 2
        part, at = view[start:end], offset + start
        while part:
            written = os.pwrite(fd, part, at)
            if not written:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            part, at = part[written:], at + written
    return holes


def write_small_files_reference(files: Sequence[SmallFile], owners: bool) -> list[tuple[int, int]]:
    """Per file written, (error, owner_error): see ``_writefiles``.  A file stopped by an error is removed;
    the run stops after one that found no space."""
    out: list[tuple[int, int]] = []
    for dirfd, name, data, mode, uid, gid, mtime_ns in files:
        if not name or b"\x00" in name:
            raise ValueError("a file name is not empty and holds no NUL")
        error, owner_error = _write_one(dirfd, name, data, mode, uid, gid, mtime_ns, owners)
        out.append((error, owner_error))
        if error in NO_SPACE:
            break
    return out


def _write_one(dirfd: int, name: bytes, data: Plaintext, mode: int, uid: int, gid: int, mtime_ns: int,
               owners: bool) -> tuple[int, int]:
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    except OSError as exc:
        return exc.errno or errno.EIO, 0
    owner_error = 0
    try:
        try:
            if write_sparse_reference(fd, data, 0, 0):
                os.ftruncate(fd, len(memoryview(data)))  # a hole at its end
            if owners:
                try:
                    os.fchown(fd, uid, gid)
                except OSError as exc:
                    if exc.errno == errno.EROFS:
                        raise
                    owner_error = exc.errno or errno.EIO
            os.fchmod(fd, mode & (0o1777 if owner_error else 0o7777))  # set-id bits for their owner only
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
    except OSError as exc:
        try:
            os.unlink(name, dir_fd=dirfd)
        except OSError:
            pass
        return exc.errno or errno.EIO, owner_error
    return 0, owner_error


try:
    from chunkvault.store._writefiles import write_small_files, write_sparse
except ImportError:
    write_small_files, write_sparse = write_small_files_reference, write_sparse_reference
