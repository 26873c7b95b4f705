"""Work shared out to forked worker processes, one per core.

Python threads take turns holding the interpreter lock, so work made of
short native calls between Python steps (decoding, hashing, writing) keeps
one core busy and leaves the other half idle.  Forked workers share what the
parent has loaded (the index, the key) without copying it, and each runs its
share on a core of its own.  A worker reports progress and its result as
pickled messages over a pipe; an exception it raises comes back as itself
and is raised in the parent, which then ends the other workers.

Forking is safe only where the parent has no other thread than quiet ones
(``forksafe.py``: a lock held by another thread stays held in the child) and
its remote keeps no per-process state (``Remote.fork_safe``: local disk), on
Linux.
"""
from __future__ import annotations

import ctypes
import errno
import gc
import os
import pickle
import selectors
import signal
import struct
import sys
import time
import warnings
from typing import Any, Callable, Generic, TypeVar

from chunkvault.errors import ChunkvaultError, process_end
from chunkvault.remotes import Remote

from .forksafe import FORK_GUARD, loud_threads

T = TypeVar("T")

MAX_PROCESSES = 4  # what one job starts by default (``cores``)
MAX_REQUESTED = 64  # what one job may be asked to start: each is a pipe and a copy of the pages it touches
STOP_GRACE = 10.0  # seconds a worker asked to stop has to clean up (remove what it left half-written)
PROGRESS_EVERY = 0.1  # seconds between a worker's progress messages
_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("<I")


def can_fork(remote: Remote) -> bool:
    return sys.platform.startswith("linux") and remote.fork_safe and not loud_threads()


def cores() -> int:
    """Worker processes for a job that would use every core this process may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_PROCESSES, usable)


def _send(fd: int, message: tuple) -> None:
    data = pickle.dumps(message)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _error_message(exc: BaseException) -> tuple:
    """An exception as a message; one that does not pickle travels as its text."""
    try:
        pickle.dumps((type(exc), exc.args, vars(exc)))
        return ("error", type(exc), exc.args, vars(exc))
    except Exception:
        return ("error", ChunkvaultError, (f"a worker process failed: {type(exc).__name__}: {exc}",), {})


def _rebuild(cls: type[BaseException], args: tuple, attrs: dict) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    vars(exc).update(attrs)
    return exc


class Reporter:
    """A worker's side of its pipe: progress at most every PROGRESS_EVERY seconds."""

    def __init__(self, fd: int):
        self.fd = fd
        self.last = float("-inf")

    def progress(self, state: Any) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            _send(self.fd, ("progress", state))


class _Worker(Generic[T]):
    def __init__(self, pid: int, fd: int):
        self.pid = pid
        self.fd = fd
        self.buffer = b""
        self.progress: Any = None
        self.result: T | None = None
        self.done = False
        self.error: BaseException | None = None
        self.reaped = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            if len(self.buffer) < _HEADER.size + size:
                return
            message = pickle.loads(self.buffer[_HEADER.size:_HEADER.size + size])
            self.buffer = self.buffer[_HEADER.size + size:]
            if message[0] == "progress":
                self.progress = message[1]
            elif message[0] == "done":
                self.result, self.done = message[1], True
            else:
                self.error = _rebuild(*message[1:])

    def reap(self, kill: bool) -> None:
        """``kill``: the worker is first asked to stop (SIGUSR1: it unwinds as on Ctrl-C, removing what it
        left half-written), and killed only if it has not ended within STOP_GRACE seconds."""
        if self.reaped:
            return
        status = None
        if kill:
            status = self._stop()
        if status is None:
            _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        os.close(self.fd)
        if not self.done and self.error is None:
            self.error = ChunkvaultError(f"a worker process {process_end(os.waitstatus_to_exitcode(status))} "
                                         "before it was done")

    def _stop(self) -> int | None:
        """Ask the worker to stop, then kill it if it has not within STOP_GRACE; its wait status, if ended."""
        for sig, grace in ((signal.SIGUSR1, STOP_GRACE), (signal.SIGKILL, None)):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return None
            if grace is None:
                return None
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    return status
                time.sleep(0.01)
        return None


class WorkersNotStarted(ChunkvaultError):
    """Not every worker process could start (a descriptor, process or memory limit); none is left running,
    and nothing was done: the caller may do the work in its own process instead."""


class Workers(Generic[T]):
    """``n`` forked processes, worker ``k`` running ``work(k, reporter)``; its return value is its result.

    Use as a context manager: leaving the block early (an error in the parent)
    kills the workers; every worker is reaped either way.
    """

    def __init__(self, n: int, work: Callable[[int, Reporter], T]):
        self.workers: list[_Worker[T]] = []
        self.ok = False
        self._go: tuple[int, int] | None = None
        try:
            # Each worker waits for every one to have started before it does anything: a worker left running
            # while a later one could not start had written part of a restore, which the caller then redid
            # in its own process ('File exists', a file cut short where it was stopped).
            self._go = os.pipe()
            for k in range(n):
                self.workers.append(self._fork(k, work))
            os.write(self._go[1], bytes(n))
        except BaseException as exc:  # no pipe or process left (EMFILE, EAGAIN), or interrupted: none stays
            self._close_go()
            self.__exit__()
            if isinstance(exc, OSError):
                limit = {errno.EMFILE: " (ulimit -n, LimitNOFILE=)", errno.EAGAIN: " (ulimit -u, TasksMax=)",
                         errno.ENOMEM: " (ulimit -v, MemoryMax=)"}.get(exc.errno or 0)
                hint = f": raise the limit{limit}" if limit else ""
                raise WorkersNotStarted(f"could not start worker process {len(self.workers) + 1} of {n} "
                                        f"({exc.strerror}); none is left running{hint}") from None
            raise
        self._close_go()

    def _close_go(self) -> None:
        """The start pipe closed: a worker still waiting on it reads its end and does nothing."""
        if self._go is not None:
            for fd in self._go:
                os.close(fd)
            self._go = None

    def _fork(self, k: int, work: Callable[[int, Reporter], T]) -> _Worker[T]:
        parent = os.getpid()
        rfd, wfd = os.pipe()
        try:
            with FORK_GUARD, warnings.catch_warnings():
                # Python 3.12+ warns, in the parent, of a fork with other threads alive.  Ours are quiet ones
                # (see forksafe.py); and where warnings are errors, the warning would be raised from a fork
                # that happened, its child left at work with no parent reading it.
                warnings.filterwarnings("ignore", r"This process .* is multi-threaded, use of fork\(\)",
                                        DeprecationWarning)
                pid = os.fork()
        except BaseException:
            os.close(rfd)
            os.close(wfd)
            raise
        if pid == 0:
            code = 1
            try:
                os.close(rfd)
                for w in self.workers:
                    os.close(w.fd)
                assert self._go is not None
                os.close(self._go[1])
                code = _live(k, work, wfd, parent, self._go[0])
            finally:
                os._exit(code)  # never back into the caller's frames
        os.close(wfd)
        return _Worker(pid, rfd)

    def __enter__(self) -> "Workers[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self.workers:
            w.reap(kill=not self.ok)

    def wait(self, on_progress: Callable[[list[Any]], None] | None = None) -> list[T]:
        """Every worker's result, in order; the first error is raised (the workers are then killed on exit)."""
        with selectors.DefaultSelector() as sel:
            for w in self.workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            running = len(self.workers)
            while running:
                for key, _ in sel.select():
                    w = key.data
                    data = os.read(w.fd, 1 << 16)
                    if data:
                        w.feed(data)
                    else:
                        sel.unregister(w.fd)
                        running -= 1
                        w.reap(kill=False)
                    if w.error is not None:
                        raise w.error
                if on_progress is not None:
                    on_progress([w.progress for w in self.workers])
        self.ok = True
        return [w.result for w in self.workers]  # type: ignore[misc]


def _asked_to_stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _live(k: int, work: Callable[[int, Reporter], Any], fd: int, parent: int, go: int) -> int:
    """A worker's life: once every worker has started (a byte on ``go``), do its share, send the result or the
    error, exit."""
    gc.freeze()  # its collections leave the objects it shares with its parent (and their pages) alone
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, or a service manager stopping the whole group,
        signal.signal(signum, signal.SIG_IGN)        # reaches the parent too, which ends the workers:
    signal.signal(signal.SIGUSR1, _asked_to_stop)    # with this one
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 1
    started = os.read(go, 1)
    os.close(go)
    if not started:  # a later worker could not start: the caller does the work, none of it done here
        return 1
    try:
        result = work(k, Reporter(fd))
    except BaseException as exc:  # every failure, whatever its kind, goes to the parent
        _send(fd, _error_message(exc))
        return 1
    _send(fd, ("done", result))
    return 0
