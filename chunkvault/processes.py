"""Child processes that run in a session of their own (hooks, verification commands)."""
from __future__ import annotations

import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen) -> None:
    """End ``proc``'s whole process group (it leads one: ``start_new_session``) and reap ``proc``: what it
    started in the background goes too, and no signal to our own group ever reached it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper(on: bool) -> bool:
    """Linux: while on, a process among our descendants whose parent exits is given to this process, not
    to init, so that what a command left running detached from its group (``pg_ctl start`` puts the
    server in a session of its own) can still be found (``children``) and ended.  False where the
    system has no such thing."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children() -> set[int]:
    """The ids of this process's child processes, read from /proc (empty where there is none)."""
    me = os.getpid()
    found = set()
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
        if len(fields) > 1 and fields[1] == str(me).encode():
            found.add(int(name))
    return found
