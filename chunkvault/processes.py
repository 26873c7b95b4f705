"""Child processes: the environment they get, and those that run in a session of their own (hooks,
verification commands)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
from typing import Any, Mapping

from . import interrupts

_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET")


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without chunkvault's credentials (``CHUNKVAULT_PASSWORD``, ``..._FILE``,
    ``CHUNKVAULT_TO_PASSWORD``, ``CHUNKVAULT_HTTP_TOKEN``, ...): a command we start, and what it starts,
    gets none, and cannot write one into what it backs up (a ``PGPASSWORD`` stays: it is the command's)."""
    return {k: v for k, v in env.items()
            if not (k.startswith("CHUNKVAULT_") and any(w in k for w in _SECRET_WORDS))}


def start_session(command: Any, **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(command, start_new_session=True, **kwargs)``, whole or not at all: a stop signal that
    comes while it starts is handled once it has, and then ends the child's group before going on.  Handled
    inside ``Popen``, after the child began, it left the child running (a hook's ``sleep``, a database it
    started) with no one to end it, and what it had written unread."""
    proc = None
    try:
        with interrupts.held():
            proc = subprocess.Popen(command, start_new_session=True, **kwargs)
        return proc
    except BaseException:
        if proc is not None:
            kill_group(proc)
        raise


def kill_group(proc: subprocess.Popen) -> None:
    """End ``proc``'s whole process group (it leads one: ``start_new_session``) and reap ``proc``: what it
    started in the background goes too, and no signal to our own group ever reached it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_PR_GET_CHILD_SUBREAPER = 37


def _prctl() -> Any:
    """libc's prctl (Linux), or None where there is none."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def become_subreaper() -> bool:
    """Linux: from now on, a process among our descendants whose parent exits is given to this process,
    not to init, so that what a command left running detached from its group (``pg_ctl start`` puts the
    server in a session of its own) can still be found (``children``) and ended.  True when this call
    made it so (then ``stop_being_subreaper`` undoes it); False where it was so already, or the system
    has no such thing."""
    import ctypes

    prctl = _prctl()
    was = ctypes.c_int(0)
    if prctl is None or prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) != 0 or was.value:
        return False
    return prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def stop_being_subreaper() -> None:
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def pin_carrying(pid: int, marker: bytes) -> int | None:
    """A descriptor naming process ``pid`` for as long as it is open (a pidfd), taken only if the process
    carries ``marker``: checked again once pinned, since the pid may have passed to another process since it
    was listed, and a signal sent through it never reaches one the pid passes to later.  None when it does
    not carry the marker (or is gone); -1 where no pidfd opens (a kernel older than 5.3, a seccomp filter
    that predates them refusing it with EPERM, no descriptor left): the pid is all there is to signal, and
    taken for a process without the marker, the leftover was left running."""
    if not carries(pid, marker):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        return None if exc.errno == errno.ESRCH else -1
    if carries(pid, marker):
        return fd
    os.close(fd)
    return None


def signal_pinned(pid: int, fd: int, sig: int | None) -> None:
    """Send ``sig`` (None: none) to a process ``pin_carrying`` pinned as ``fd``, and release the pin; nothing
    is sent to one that is gone."""
    try:
        if sig is None:
            pass
        elif fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        pass
    finally:
        if fd >= 0:
            os.close(fd)


def carries(pid: int, marker: bytes) -> bool:
    """Whether process ``pid``'s environment holds ``marker`` (a ``NAME=value`` its starter set, which
    its descendants inherit); False where it cannot be read (another user's, or gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def children() -> dict[int, tuple[bytes, int]]:
    """This process's child processes, read from /proc (none where there is none): id -> (state, such as
    b"Z" for one that ended and awaits its parent, and process group)."""
    me = os.getpid()
    found: dict[int, tuple[bytes, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat_line = f.read()
        except OSError:  # ended meanwhile
            continue
        fields = stat_line[stat_line.rfind(b")") + 2:].split()  # after the command name, which may hold anything
        if len(fields) > 2 and fields[1] == str(me).encode():
            found[int(name)] = (fields[0], int(fields[2]))
    return found
