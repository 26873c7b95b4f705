"""Stop signals are handled where raising cannot leave the standard library's locks held (chunkvault.interrupts)."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from chunkvault import interrupts

STORM = """
import os, signal, sys, threading, time
from concurrent.futures import Future
from chunkvault.interrupts import handled

armed = False

def stop(signum):  # raises once per arming: the storm goes on while the test looks at the future
    global armed
    if armed:
        armed = False
        raise KeyboardInterrupt

done = threading.Event()
def storm():  # SIGINT to the process every half millisecond: any thread may take it
    while not done.is_set():
        time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGINT)

if sys.argv[1] == "handled":
    handler = handled({signal.SIGINT: stop})
else:  # Python's way: raised wherever the main thread is
    signal.signal(signal.SIGINT, lambda signum, frame: stop(signum))
    handler = open(os.devnull)
stuck = interrupted = 0
with handler:
    stormer = threading.Thread(target=storm, daemon=True)
    stormer.start()
    while interrupted < 60:
        fut = Future()
        armed = True
        try:
            while True:
                fut.done()  # the main thread inside a Future's lock, most of the time
        except KeyboardInterrupt:
            interrupted += 1
        finisher = threading.Thread(target=fut.set_result, args=(None,), daemon=True)
        finisher.start()
        finisher.join(2)
        if finisher.is_alive():
            stuck += 1
            break
    done.set()
    stormer.join()
print(interrupted, stuck)
"""


def test_ctrl_c_never_leaves_a_future_that_nobody_can_complete():
    """Python's own handler, raising wherever the main thread is, leaves a Future's lock held about one
    time in three here ("default" as the script's argument shows it): the worker that completes the
    future then blocks forever (a stopped backup hung waiting for its workers)."""
    out = subprocess.run([sys.executable, "-c", STORM, "handled"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["60", "0"]


EVENT_STORM = """
import os, signal, threading, time
from chunkvault.interrupts import handled

ev, done = threading.Event(), threading.Event()
def storm():
    while not done.is_set():
        time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGINT)

with handled({signal.SIGINT: lambda signum: ev.set()}):
    stormer = threading.Thread(target=storm, daemon=True)
    stormer.start()
    for _ in range(100):
        ev.clear()
        while not ev.wait(0):  # the main thread holds the event's lock most of the time
            pass
    done.set()
    stormer.join()
print("ok")
"""


def test_a_handler_that_sets_an_event_never_waits_for_its_own_thread():
    """``serve`` and ``daemon`` stop by setting an event their main thread waits on: run where Python puts
    it, the handler can find that event's lock held by the very thread it interrupted, and wait for ever."""
    out = subprocess.run([sys.executable, "-c", EVENT_STORM], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "ok"), out.stderr[-2000:]


WAIT = """
import os, queue, signal, sys, threading, time
from concurrent.futures import Future
from chunkvault.interrupts import handled

def stop(signum):
    raise KeyboardInterrupt

never = threading.Event()

def join():
    t = threading.Thread(target=never.wait, daemon=True)
    t.start()
    t.join()

waits = {
    "future": lambda: Future().result(),
    "event": never.wait,
    "semaphore": threading.Semaphore(0).acquire,
    "queue": queue.Queue().get,
    "join": join,
}

threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
with handled({signal.SIGINT: stop}):
    try:
        waits[sys.argv[1]]()
    except KeyboardInterrupt:
        print("interrupted")
"""


@pytest.mark.parametrize("wait", ["future", "event", "semaphore", "queue", "join"])
def test_ctrl_c_stops_a_wait_on_another_thread(wait):
    """The blocking waits of the synchronisation code are left in good order by an exception: Ctrl-C still
    stops them at once rather than when they end (here, never)."""
    out = subprocess.run([sys.executable, "-c", WAIT, wait], capture_output=True, text=True, timeout=20)
    assert (out.returncode, out.stdout.strip()) == (0, "interrupted"), out.stderr


def test_a_signal_inside_the_synchronisation_code_is_handled_once_it_is_left():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled on the main thread only")  # SIGUSR1 would end the process
    seen: list[int] = []
    inside: list[list[int]] = []

    def callback(_fut: Future) -> None:  # run by Future.add_done_callback: its code is up the stack
        assert not interrupts.safe_to_interrupt(sys._getframe())
        signal.raise_signal(signal.SIGUSR1)
        inside.append(list(seen))

    assert interrupts.safe_to_interrupt(sys._getframe())
    with interrupts.handled({signal.SIGUSR1: seen.append}):
        fut: Future = Future()
        fut.set_result(None)
        fut.add_done_callback(callback)
    assert inside == [[]] and seen == [signal.SIGUSR1]


def test_signals_of_two_kinds_inside_the_synchronisation_code_are_both_handled_once_it_is_left():
    """A daemon's SIGHUP (reload) waiting there must not swallow the SIGTERM that follows; a repeat of
    one kind is one signal."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled on the main thread only")
    seen: list[int] = []

    def callback(_fut: Future) -> None:
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR1):
            signal.raise_signal(sig)

    with interrupts.handled({signal.SIGUSR1: seen.append, signal.SIGUSR2: seen.append}):
        fut: Future = Future()
        fut.set_result(None)
        fut.add_done_callback(callback)
    assert seen == [signal.SIGUSR1, signal.SIGUSR2]


def test_off_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGUSR1)
    during: list[object] = []

    def run() -> None:
        with interrupts.handled({signal.SIGUSR1: lambda s: None}):
            during.append(signal.getsignal(signal.SIGUSR1))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert during == [before] and signal.getsignal(signal.SIGUSR1) is before


def test_the_blocking_waits_are_found_in_this_python():
    """Without them Ctrl-C would wait for every wait to end: each kind must be known."""
    names = {code.co_name for code, _ in interrupts._WAITS}
    assert "wait" in names and names & {"_wait_for_tstate_lock", "join"}


def test_a_timer_set_before_is_kept_and_its_alarms_reach_their_handler():
    """The retries borrow the interval timer: a test runner's timeout set before (pytest-timeout's, say)
    still fires, during the block and after a retry put it aside."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled on the main thread only")
    alarms: list[float] = []
    before = signal.signal(signal.SIGALRM, lambda signum, frame: alarms.append(time.monotonic()))
    saved = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with interrupts.handled({signal.SIGUSR1: lambda s: None}):
            time.sleep(0.2)  # their alarm comes inside the block
        assert len(alarms) == 1
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with interrupts.handled({signal.SIGUSR1: lambda s: None}):
            fut: Future = Future()
            fut.set_result(None)
            fut.add_done_callback(lambda _f: signal.raise_signal(signal.SIGUSR1))  # a retry takes the timer
        assert 0.1 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.3  # theirs is back, its time running
        time.sleep(0.5)
        assert len(alarms) == 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        if saved[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *saved)
