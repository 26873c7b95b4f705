"""A restore's writes of a run of small files: each created, filled, given its metadata and closed.

The native version (``_writefiles``) releases the GIL once for the whole run;
this module's reference does the same calls one at a time and is what runs
where the extension is not built.  Both take and give the same things.
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

HOLE_MIN = 4096  # a file of at least this many zero bytes is written as a hole
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # errors after which a run stops
_ZEROS = bytes(1 << 20)


def all_zeros(data: Plaintext) -> bool:
    """Whether ``data`` is all zeros (a hole).  A compare against zeros stops at the first other byte;
    ``bytes.count`` read every byte of every chunk with the GIL held, a seventh of a restore's CPU."""
    view = memoryview(data)
    return all(_ZEROS.startswith(view[i : i + len(_ZEROS)]) for i in range(0, len(view), len(_ZEROS)))


_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (Linux)


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


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make ``length`` bytes at ``offset`` a hole (they read as zeros, and take no space), where the system
    and file system can; False where not (the caller writes the zeros)."""
    fallocate = _fallocate()
    return fallocate is not None and fallocate(fd, _PUNCH_HOLE, offset, length) == 0


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
            view = memoryview(data)
            if len(view) >= HOLE_MIN and all_zeros(view):
                os.ftruncate(fd, len(view))
            else:
                while view:
                    view = view[os.write(fd, view):]
            if owners:
                try:
                    os.fchown(fd, uid, gid)
                except OSError as exc:
                    if exc.errno == errno.EROFS:
                        raise
                    owner_error = exc.errno or errno.EIO
            os.fchmod(fd, mode & 0o7777)
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
    from chunkvault.store._writefiles import write_small_files
except ImportError:
    write_small_files = write_small_files_reference
