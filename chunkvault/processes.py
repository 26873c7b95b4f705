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
