"""A command's standard output as a backup's stream, ended only by the command's success.

``pg_dump app | chunkvault backup --stdin`` cannot tell a finished dump from one
whose command died half-way: the pipe ends the same way, and the shell reports
the failure after the snapshot is saved. Here the stream's end is reached only
once the command has exited with status 0; any other status is raised from the
read that found the end, so the backup stops before it writes a snapshot.
"""
from __future__ import annotations

import io
import os
import select
import shlex
import signal
import subprocess
import time
from typing import IO, Callable, Mapping, Sequence

from chunkvault.errors import IncompleteSource, SourceCommandFailed, UsageError, process_end
from chunkvault.processes import without_secrets

from .locks import process_start

STOP_GRACE = 5.0  # seconds a command interrupted by a failed backup gets to end after SIGTERM
WAKE_EVERY = 0.5  # seconds a read waits on a silent pipe before the interpreter gets to handle signals


def wait_readable(fd: int, each_slice: Callable[[], None] = lambda: None) -> None:
    """Wait until ``fd`` has data or its end, in slices of ``WAKE_EVERY``, calling ``each_slice`` after each
    (it may raise to end the wait).  A signal meant to stop the process (SIGTERM, Ctrl-C) may be delivered to
    any of its threads; Python handles it on the main thread once that runs Python code again, which a read
    blocked on a silent pipe would not do."""
    while not select.select([fd], [], [], WAKE_EVERY)[0]:
        each_slice()


def descendants(pid: int) -> list[tuple[int, int]]:
    """The processes ``pid`` started, and theirs, as (pid, start time); none where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            start = process_start(child, running=True)
            if start is not None:
                found.append((child, start))
                todo.append(child)
    return found


def _signal(procs: list[tuple[int, int]], sig: int) -> bool:
    """Send ``sig`` to each of ``procs`` still running (0: only ask); whether any was."""
    alive = False
    for pid, start in procs:
        if process_start(pid, running=True) == start:
            alive = True
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    return alive


class PipeStream:
    """A backup's stream read straight from a file descriptor (standard input), waiting as ``wait_readable``
    does.  A read that fails (a socket reset by its peer, a disk's EIO) cuts the stream short: it is
    IncompleteSource, so no snapshot is saved, not an internal error."""

    def __init__(self, fd: int):
        self._fd = fd

    def read(self, n: int) -> bytes:
        try:
            wait_readable(self._fd)
            return os.read(self._fd, n)
        except OSError as exc:
            raise _unreadable(exc) from None

    def readinto(self, buf: memoryview) -> int:
        try:
            wait_readable(self._fd)
            return os.readv(self._fd, [buf])
        except OSError as exc:
            raise _unreadable(exc) from None


def _unreadable(exc: OSError) -> IncompleteSource:
    """What a failed read of standard input is: the stream breaks off there."""
    return IncompleteSource(f"standard input could not be read ({exc.strerror or exc}): no snapshot saved")


class CommandStream:
    """The command ``argv``'s stdout, the command started by the first read: once the backup holds its
    lock and has found its parent, so that a dump waiting for a prune to end holds no transaction open on
    the database meanwhile, and one the backup refuses never runs.  Its stdin is closed (a prompt goes to
    the terminal, as pg_dump's does); its stderr is ``stderr`` or ours, so a dump's errors reach the
    operator. It gets the environment (``env``, default ours) without chunkvault's passwords
    (``CHUNKVAULT_PASSWORD``, ...; a ``PGPASSWORD`` stays). Use as a context manager: leaving early stops
    the command."""

    def __init__(self, argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                 stderr: IO[bytes] | None = None):
        if isinstance(argv, (str, bytes)) or not argv:
            raise UsageError(f"a command is a list of its program and arguments, not {argv!r}")
        if not all(isinstance(a, (str, bytes, os.PathLike)) for a in argv):
            raise UsageError(f"a command's program and arguments are strings, not {list(argv)!r}")
        self.argv = [os.fsdecode(a) for a in argv]
        self.shown = shlex.join(self.argv)
        self._cwd, self._stderr = cwd, stderr
        self._env = without_secrets(os.environ if env is None else env)
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self.returncode: int | None = None

    def start(self) -> None:
        """Start the command now, if it has not been started or stopped: the first read does."""
        if self._proc is not None or self.returncode is not None:
            return
        cwd, stderr = self._cwd, self._stderr
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, bufsize=0,
                                          stderr=stderr, cwd=cwd, env=self._env)
        except io.UnsupportedOperation:
            raise UsageError(f"cannot run `{self.shown}`: its stderr must be a file with a descriptor, "
                             f"not {stderr!r}") from None
        except OSError as exc:
            where = f" in {os.fsdecode(cwd)}" if cwd is not None and not os.path.isdir(cwd) else ""
            raise SourceCommandFailed(f"cannot run `{self.shown}`{where}: {exc.strerror or exc}") from None
        except (TypeError, ValueError) as exc:  # an argument or variable of another type, a stderr with no fd
            raise UsageError(f"cannot run `{self.shown}`: {exc}") from None
        assert self._proc.stdout is not None
        self._fd = self._proc.stdout.fileno()

    def _ready(self) -> bool:
        """Started (the first read starts it), and not stopped before it was: else the stream has ended.
        Waits as ``wait_readable`` does, but a command that has failed meanwhile is told at once: what it
        started in the background (``sleep 3600 &``) may hold its output open long after it exited."""
        self.start()
        if self._proc is None:
            self._ended()
            return False
        wait_readable(self._fd, self._end_if_failed)
        return True

    def _end_if_failed(self) -> None:
        if self._proc is not None and self._proc.poll() not in (None, 0):
            self._ended()

    def read(self, n: int) -> bytes:
        if not self._ready():
            return b""
        data = os.read(self._fd, n)
        if not data:
            self._ended()
        return data

    def readinto(self, buf: memoryview) -> int:
        if not self._ready():
            return 0
        got = os.readv(self._fd, [buf])
        if not got:
            self._ended()
        return got

    def _ended(self) -> None:
        """The pipe is at its end: the stream is only complete if the command exited with status 0."""
        if self.returncode is None:
            assert self._proc is not None
            self.returncode = self._proc.wait()
        if self.returncode != 0:
            raise SourceCommandFailed(f"`{self.shown}` {process_end(self.returncode)}: no snapshot saved")

    def interrupt(self) -> None:
        """Ask the command (and what it started) to end, at once and without waiting: a backup told to stop
        while the command is silent then reads the end of its output, and ``close`` reaps it.  One not yet
        started never will be."""
        if self._proc is None:
            if self.returncode is None:
                self.returncode = -signal.SIGTERM
            return
        if self._proc.poll() is None:
            started = descendants(self._proc.pid)
            self._proc.terminate()
            _signal(started, signal.SIGTERM)

    def close(self) -> None:
        """Stop the command if it still runs (the backup failed or was interrupted), with what it started
        (``sh -c 'pg_dump | gzip'``: a shell passes no SIGTERM on), then reap it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            started = descendants(proc.pid)
            proc.terminate()
            _signal(started, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            deadline = time.monotonic() + STOP_GRACE
            while _signal(started, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(started, signal.SIGKILL)
        self.returncode = proc.returncode
        assert proc.stdout is not None
        proc.stdout.close()

    def __enter__(self) -> "CommandStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
