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

A restore that writes more after its tree (``--pg-recover``'s settings, ``--pg-tablespace``'s links) keeps its
target's lock until then (``holding``): released between, it let another restore in, to delete or overwrite
what it wrote.  A restore's waits (for the repository's lock, then for each of its targets') draw on one
``--wait`` (``left_after``): each took the whole of it anew.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import warnings
from typing import Iterator

from chunkvault.errors import ChunkvaultWarning, TargetBusy

from .locks import stop_waiting

POLL = 0.2  # seconds between attempts while waiting

# This thread's ``holding`` blocks: each a map of the targets locked in it, (device, inode) -> a descriptor
# holding the lock until the block ends.
_scopes = threading.local()


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Within the block, each target lock this thread takes is kept until the block ends, and taken again by
    the thread (another restore's part into it, ``await_target``) at once: what a restore writes after its
    tree (recovery settings, tablespace links) is written under the lock its tree was, with no moment between
    for another restore to begin.  Another thread or process is refused (or waits) as before.  A block
    within another hands what it holds to that one (a --pg-tablespace restore's, to --pg-recover's)."""
    held: dict[tuple[int, int], int] = {}
    outer = getattr(_scopes, "held", None)
    _scopes.held = held
    try:
        yield
    finally:
        _scopes.held = outer
        for key, fd in held.items():
            if outer is not None and key not in outer:
                outer[key] = fd
            else:
                os.close(fd)


def _held(fd: int) -> int | None:
    """A descriptor of this thread's ``holding`` that holds the lock on the directory open at ``fd``, if any."""
    held = getattr(_scopes, "held", None)
    if not held:
        return None
    st = os.fstat(fd)
    return held.get((st.st_dev, st.st_ino))


def _keep(fd: int) -> None:
    """Keep the lock just taken on ``fd`` until this thread's ``holding`` block ends, if it is in one."""
    held = getattr(_scopes, "held", None)
    if held is not None:
        st = os.fstat(fd)
        held[(st.st_dev, st.st_ino)] = os.dup(fd)  # the same open file: its lock, released when all are closed


def left_after(wait: float, began: float) -> float:
    """What is left of a wait of ``wait`` seconds once a wait begun at ``began`` (time.monotonic()) is over:
    a restore's later waits for a lock take what its earlier ones left, not the whole of it anew."""
    return max(0.0, wait - (time.monotonic() - began))


def lock_target(dir_fd: int, shown: str, wait: float = 0.0) -> int | None:
    """Lock the target directory open at ``dir_fd`` (an O_PATH descriptor will do) on a descriptor of its own,
    returned for the caller to close when its restore is done (closing it releases the lock).  Waits up to
    ``wait`` seconds for another restore holding it, then TargetBusy.  None where no lock can be taken there
    (a directory this user may not read, a file system without ``flock``): the restore goes on without one.
    Held by this thread's ``holding`` already: a copy of that descriptor, at once."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        held = _held(fd)
        if held is not None:
            return os.dup(held)
        if _wait_for(fd, shown, wait):
            _keep(fd)
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@contextlib.contextmanager
def target_held(path: str | bytes, wait: float = 0.0) -> Iterator[None]:
    """The lock on the directory ``path`` held for the block (``lock_target``): for what writes into a
    restored target by its path (``pgrecovery.write_recovery``).  Unguarded where no lock can be taken."""
    try:
        dir_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # none there, or no directory: the caller says so itself
        yield
        return
    try:
        fd = lock_target(dir_fd, os.fsdecode(path), wait)
    finally:
        os.close(dir_fd)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def await_target(path: str | bytes, wait: float = 0.0) -> None:
    """Wait up to ``wait`` seconds for a restore writing into the directory ``path`` to end (TargetBusy
    after): before a target is found not empty, which one that another restore is filling would be.  One
    this thread's ``holding`` holds is its own restore's: not waited for."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # none there, or no directory: the restore says so itself
        return
    try:
        if _held(fd) is None:
            _wait_for(fd, os.fsdecode(path), wait)
    finally:
        os.close(fd)


def another_restores(dir_fd: int, name: bytes) -> str | None:
    """Whether another restore holds the directory ``name`` (in the directory open at ``dir_fd``, never
    through a link) as its target: "another restore (process N)", or None (none does, this thread's
    ``holding`` holds it, or no lock can be tried there).  A restore in place of a directory above it leaves
    it as it is, as --delete does (``target_dirs.remove_tree``): it wrote into it under the other's writes."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return None if _held(fd) is not None else locked_or_holder(fd)  # let go of at once, with the descriptor
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
            waited = f"; waited {_shown(wait)} s" if wait else ""
            raise TargetBusy(f"{_holder_named(fd)} is writing into {shown}{waited}: try again once it is "
                             "done").hinting(" (or use --wait SECONDS)" if not wait else "")
        if not told:  # no command waits in silence
            warnings.warn(f"waiting up to {_shown(wait)} s: {_holder_named(fd)} is writing into {shown}",
                          ChunkvaultWarning, stacklevel=2)
            told = True
        stop_waiting.wait(min(POLL, max(0.0, deadline - time.monotonic())))


def _shown(seconds: float) -> str:
    """A wait as told: what is left of a restore's ``--wait`` is a fraction ("59.3382 s")."""
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.2g}"


def locked_or_holder(fd: int) -> str | None:
    """Take the target lock on the directory open at ``fd`` without waiting, held while ``fd`` stays open:
    None once held (or where no lock can be taken there), else who holds it ("another restore (process N)")."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_named(fd)
    except OSError:
        pass
    return None


def _holder_named(fd: int) -> str:
    holder = _holder(fd)
    return "another restore" + (f" (process {holder})" if holder is not None else "")


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
