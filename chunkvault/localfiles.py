"""This machine's own files: reading small ones (cache entries, the ledger, the key kept ahead) without
waiting: a FIFO put in a file's place would hold ``open`` until a writer came, and each command that
read it would hang (anything but a regular file is an OSError, as an unreadable file is); and telling
the leftovers of a killed writer (an export's temporary file, a verification's scratch directory)."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from typing import IO, Any, TypeVar

from .errors import UsageError

Read = TypeVar("Read", bytes, str)


def read_capped(f: IO[Any], limit: int, said: str, instead: str) -> Any:
    """What ``f`` holds, up to ``limit`` bytes (characters, read as text): a small file's, where a device or a
    stream that never ends (/dev/zero, /dev/urandom) named by mistake was read until memory ran out, the
    command hanging meanwhile.  Beyond, UsageError "``said`` more than LIMIT: ``instead``"."""
    return capped(f.read(limit + 1), limit, said, instead)


def capped(data: Read, limit: int, said: str, instead: str) -> Read:
    """``data``, read as ``limit`` + 1 at most, if it is within ``limit`` (``read_capped``)."""
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit >> 10} KiB"
        raise UsageError(f"{said} more than {size}: {instead}")
    return data


def absolute_path(path: str, what: str) -> str:
    """``os.path.abspath(path)``; UsageError naming ``what`` where ``path`` is relative and the working
    directory was removed (``getcwd`` fails: ENOENT), which was an internal error's traceback."""
    try:
        return os.path.abspath(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} is relative, and the working directory no longer exists: give it as an "
                         "absolute path, or change to a directory that exists") from None


def fsync_directory(path: str) -> None:
    """Make a rename or creation in directory ``path`` durable (a crash after it leaves the new name, not the
    old one)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: str, limit: int = -1) -> bytes:
    """The bytes of the regular file at ``path`` (at most ``limit``, when given); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


ABANDONED_AFTER = 60.0  # seconds: a file younger than this may be one whose writer has yet to lock it


def abandoned(fd: int, after: float = ABANDONED_AFTER) -> bool:
    """Whether the file open at ``fd`` was left by a writer that is gone: its writer locks it for as long as
    it runs, so one not written for ``after`` seconds (a lock may be yet to come on a new one) that no process
    holds a lock on has none.  The lock is then this process's, until ``fd`` is closed."""
    if time.time() - os.fstat(fd).st_mtime < after:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its writer runs (or a file system without locks, where nothing is taken)
        return False
    return True


#: The Cache Directory Tagging Specification's tag (https://bford.info/cachedir/): the file name and the bytes
#: it starts with, which backup tools (ours with --exclude-caches, restic's, borg's, tar's) leave a directory out by.
CACHEDIR_TAG = (b"CACHEDIR.TAG", b"Signature: 8a477f597d28d172789f06886806bc55")


def untag_as_cache(directory: str) -> None:
    """Remove the cache directory tag chunkvault wrote into ``directory``, and no other (best effort)."""
    tag = os.path.join(directory, os.fsdecode(CACHEDIR_TAG[0]))
    try:
        if read_regular(tag, len(OUR_CACHEDIR_TAG) + 1) == OUR_CACHEDIR_TAG:
            os.unlink(tag)
    except OSError:
        pass


def make_private_dirs(path: str) -> None:
    """Make directory ``path`` and each missing one above it mode 0700, whatever the umask (as the XDG base
    directory rules ask): ``os.makedirs`` gives its mode to the last alone, and one above made under umask
    000 is world-writable, where another user could move this user's cache or ledger away and put their own
    in its place.  Directories already there keep their mode; OSError when one cannot be made."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(parent):  # one there that is no directory: mkdir says so, naming ``path``
        make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


#: The tag chunkvault writes into its cache directory, whole: ``untag_as_cache`` removes this one alone.
OUR_CACHEDIR_TAG = (CACHEDIR_TAG[1] + b"\n# a cache directory tag made by chunkvault: its local cache of index, "
                    b"snapshot and wal objects (see https://bford.info/cachedir/)\n")


def tag_as_cache(directory: str) -> None:
    """Make ``directory`` (private to this user) and tag it as a cache (best effort)."""
    tag = os.path.join(directory, os.fsdecode(CACHEDIR_TAG[0]))
    if os.path.exists(tag):
        return
    tmp = f"{tag}.{os.getpid()}.tmp"
    try:
        make_private_dirs(directory)
        with open(tmp, "wb") as f:
            f.write(OUR_CACHEDIR_TAG)
        os.replace(tmp, tag)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


STALE_TEMP_AGE = 3600.0  # seconds: a temp file not written for this long was left by a writer killed mid-write


def remove_if_stale(path: str, age: float = STALE_TEMP_AGE) -> None:
    """Remove the temp file ``path`` once it is ``age`` seconds old (best effort): its writer is gone."""
    try:
        if time.time() - os.lstat(path).st_mtime > age:
            os.unlink(path)
    except OSError:
        pass


def no_room_after(fd: int, size: int) -> bool:
    """Whether the file ``fd`` (``size`` bytes) takes not one byte more at its end: a write that found its disk
    full filled what was allocated first, so a command's output file cut short there ends where nothing more
    fits (and the command may have failed for that, not for what it did)."""
    try:
        os.pwrite(fd, b"\n", size)
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    os.ftruncate(fd, size)
    return False


def user_dir(variable: str, default: str) -> str | None:
    """Where a per-user directory lies: ``$variable`` when it is an absolute path (a relative one is
    ignored, as the XDG base directory rules say: it would name another place in each working directory),
    else ``default`` below the home directory; None when there is no home directory (HOME unset or
    relative, and no password entry), where ``~`` used to become a directory of that name here."""
    value = os.environ.get(variable, "")
    if os.path.isabs(value):
        return value
    home = os.path.expanduser("~")
    return os.path.join(home, default) if os.path.isabs(home) else None
