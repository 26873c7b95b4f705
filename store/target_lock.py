"""The lock a restore holds on its target directory while it writes there.

Two restores into one target interleaved their writes: into an empty one, each
took it for its own and failed on the other's files ("File exists"), though the
tree ended right; in place, each replaced what the other had written.  A
restore takes an exclusive advisory lock (``flock``) on a descriptor of the
target directory before it looks whether the target is empty, and holds it
until it is done (``--delete``'s walk, ``--verify``'s reading back included):
another one is refused at once, naming the target (``TargetBusy``, exit 15), or
waits up to the time it was given.  The kernel lets go of the lock when the
descriptor's last holder ends, however it ends: a killed restore leaves none
behind, and there is no lock file to go stale.  A file system that takes no
such lock on a directory (NFS may refuse it) leaves the restore unguarded, as
before.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
import warnings

from chunkvault.errors import ChunkvaultWarning, TargetBusy

from .locks import stop_waiting

POLL = 0.2  # seconds between attempts while waiting


def lock_target(dir_fd: int, shown: str, wait: float = 0.0) -> int | None:
    """Lock the target directory open at ``dir_fd`` (an O_PATH descriptor will do) on a descriptor of its own,
    returned for the caller to close when its restore is done (closing it releases the lock).  Waits up to
    ``wait`` seconds for another restore holding it, then TargetBusy.  None where no lock can be taken there
    (a directory this user may not read, a file system without ``flock``): the restore goes on without one."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if _wait_for(fd, shown, wait):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def await_target(path: str | bytes, wait: float = 0.0) -> None:
    """Wait up to ``wait`` seconds for a restore writing into the directory ``path`` to end (TargetBusy
    after): before a target is found not empty, which one that another restore is filling would be."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # none there, or no directory: the restore says so itself
        return
    try:
        _wait_for(fd, os.fsdecode(path), wait)
    finally:
        os.close(fd)


def _wait_for(fd: int, shown: str, wait: float) -> bool:
    """Take the lock on ``fd``, waiting up to ``wait`` s: True once held, False where it cannot be taken."""
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
        if time.monotonic() >= deadline or stop_waiting.is_set():
            holder = _holder(fd)
            by = f" (process {holder})" if holder is not None else ""
            waited = f"; waited {wait:g} s" if wait else ""
            raise TargetBusy(f"another restore{by} is writing into {shown}{waited}: try again once it is "
                             "done").hinting(" (or use --wait SECONDS)" if not wait else "")
        if not told:  # no command waits in silence
            holder = _holder(fd)
            by = f" (process {holder})" if holder is not None else ""
            warnings.warn(f"waiting up to {wait:g} s: another restore{by} is writing into {shown}", ChunkvaultWarning,
                          stacklevel=2)
            told = True
        stop_waiting.wait(min(POLL, max(0.0, deadline - time.monotonic())))


def _holder(fd: int) -> int | None:
    """The process holding the lock on the directory open at ``fd``, as /proc/locks names it; None where
    it does not (no /proc, the holder in another pid namespace)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == dev and parts[4].isdigit():
                    return int(parts[4])
    except OSError:
        pass
    return None
