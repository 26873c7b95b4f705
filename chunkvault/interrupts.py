"""Stop signals (Ctrl-C, SIGTERM) handled where handling them cannot leave a lock held.

Python runs a signal's handler on the main thread between two bytecodes, wherever that thread is.  A
handler that raises inside the standard library's thread synchronisation (a ``Condition`` entered but
not yet set up to be left, a ``Future``'s bookkeeping, a waiter listed but not yet waited on) leaves
that lock held or that waiter listed for good: a worker that later completes the future blocks on its
lock forever, and so does the command's clean-up, which waits for its workers.  A Ctrl-C that lands
while the main thread looks at a future does that about one time in three.

``handled`` runs the given handlers at once when the main thread is anywhere else, or blocked waiting
inside the ``try`` that the standard library's waits keep for such exceptions (so that Ctrl-C still
stops a long wait); when it is inside that code elsewhere, the handler is run a few milliseconds later
(an interval timer), once the thread has left it.  Within ``held``, handlers wait until it ends: for a
step that must not be cut in two, such as starting a child process that is then to be ended again.
"""
from __future__ import annotations

import concurrent.futures._base
import concurrent.futures.thread
import contextlib
import dis
import queue
import signal
import threading
import time
from types import CodeType, FrameType
from typing import Callable, Iterator, Mapping

RETRY_SECONDS = 0.005

_SYNC_FILES = frozenset(m.__file__ for m in (threading, queue, concurrent.futures._base,
                                               concurrent.futures.thread))

Handler = Callable[[int], None]


def _calls_in_try(code: CodeType, attribute: str, in_try: bool) -> set[int]:
    """The lines of ``code`` that load ``attribute`` (a method about to be called), only inside a ``try``
    block when ``in_try``."""
    bytecode = dis.Bytecode(code)
    guarded = [(e.start, e.end) for e in bytecode.exception_entries]
    return {i.positions.lineno for i in bytecode
            if i.argval == attribute and i.opname in ("LOAD_ATTR", "LOAD_METHOD")
            and i.positions is not None and i.positions.lineno is not None
            and (not in_try or any(start <= i.offset < end for start, end in guarded))}


def _blocking_waits() -> frozenset[tuple[CodeType, int]]:
    """(code, line) where the main thread blocks in a wait that an exception leaves in good order: a
    ``Condition``'s wait inside its ``try`` (every Event, Semaphore, queue and Future waits there), and a
    thread's join."""
    found: set[tuple[CodeType, int]] = set()
    places: list[tuple[Callable, str, bool]] = [(threading.Condition.wait, "acquire", True),
                                                (threading.Thread.join, "join", False)]
    if hasattr(threading.Thread, "_wait_for_tstate_lock"):  # before Python 3.13
        places.append((threading.Thread._wait_for_tstate_lock, "acquire", True))
    for func, attribute, in_try in places:
        code = func.__code__
        found |= {(code, line) for line in _calls_in_try(code, attribute, in_try)}
    return frozenset(found)


_WAITS = _blocking_waits()
_holding = [0]  # depth of ``held`` blocks on the main thread
_run_waiting: list[Callable[[], None]] = []  # of each ``handled`` block entered, innermost last


def safe_to_interrupt(frame: FrameType | None) -> bool:
    """False within ``held``, and while ``frame`` (the main thread's, as a handler gets it) or a caller of
    it is inside the standard library's synchronisation code, but for its blocking waits."""
    if _holding[0]:
        return False
    if frame is not None and (frame.f_code, frame.f_lineno) in _WAITS:
        return True
    while frame is not None:
        if frame.f_code.co_filename in _SYNC_FILES:
            return False
        frame = frame.f_back
    return True


@contextlib.contextmanager
def handled(handlers: Mapping[int, Handler]) -> Iterator[None]:
    """Within the block, run ``handlers[signum](signum)`` for those signals at a point where the main
    thread may raise.  A signal still waiting for such a point when the block ends is handled then.
    Off the main thread (a caller's thread), signals cannot be handled: the block runs as it is.

    The retries borrow the interval timer (SIGALRM): a timer someone else had set (a test runner's
    timeout) is put back when they end, and an alarm of theirs meanwhile reaches their handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    waiting: list[int] = []  # signals that came where they could not be handled yet, in order
    armed: list[bool] = []  # our retry holds the timer
    theirs: list[tuple[float, float]] = []  # the timer it replaced: (deadline, interval)

    def arm() -> None:
        delay, interval = signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
        if not armed:
            armed.append(True)
            if delay > 0:
                theirs.append((time.monotonic() + delay, interval))

    def disarm() -> None:
        if not armed:
            return
        armed.clear()
        if theirs:
            deadline, interval = theirs.pop()
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-6), interval)
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def run(signum: int) -> None:
        disarm()
        handlers[signum](signum)

    def run_waiting() -> None:
        while waiting:
            try:
                signum = waiting.pop(0)
            except IndexError:  # a handler can be interrupted too: another signal's ran meanwhile
                return
            run(signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum not in waiting:  # a repeat of one still waiting is one signal; another kind is not lost
            waiting.append(signum)
        if safe_to_interrupt(frame):
            run_waiting()
        else:
            arm()

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if not armed:  # not ours
            if callable(their_alarm):
                their_alarm(signum, frame)
        elif not waiting:
            disarm()
        elif safe_to_interrupt(frame):
            run_waiting()
        else:
            arm()

    their_alarm = signal.getsignal(signal.SIGALRM)  # known before an alarm can reach on_alarm
    previous = {s: signal.signal(s, on_signal) for s in handlers}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    _run_waiting.append(run_waiting)
    try:
        yield
        run_waiting()
    finally:
        _run_waiting.remove(run_waiting)
        disarm()
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Within the block, the handlers of ``handled`` wait; a signal that came meanwhile is handled as it
    ends (its handler raising there).  Starting a child process: a stop raised inside ``subprocess.Popen``,
    after the child began, left the caller without the process to end, which ran on alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
    if not _holding[0] and _run_waiting:
        _run_waiting[-1]()
