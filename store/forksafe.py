"""Background threads that a fork never copies in the middle of their work.

A forked child keeps only the thread that forked; a lock another thread held
at that moment stays held in the child for ever.  A *quiet* thread (a lock's
refresher) sleeps most of the time and does its work only while holding
``FORK_GUARD``, which every fork takes first: so it is never mid-work when a
child is made, and ``forked.can_fork`` need not count it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable

FORK_GUARD = threading.Lock()
_quiet: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def start_quiet_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread running ``target``, which must hold FORK_GUARD whenever it is not sleeping."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    _quiet.add(thread)
    thread.start()
    return thread


def loud_threads() -> list[threading.Thread]:
    """The threads besides the caller's that a fork could copy mid-work."""
    me = threading.current_thread()
    return [t for t in threading.enumerate() if t is not me and t not in _quiet]
