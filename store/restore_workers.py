"""Restoring into an empty target with one worker process per core.

In one process, a restore's decoding, hashing and writing are short native
calls between Python steps that take turns holding the interpreter lock: the
writing thread kept one core busy and left the other half idle, and handing
the lock and chunks between threads was a seventh of all CPU.  Here each
worker process restores the files of every n-th stripe of ``STRIPE_BYTES``
(in tree order, so a worker's reads stay within the same packs; a larger
file is written in parts, cut at its chunks) while this process makes the
directories, symbolic links and special files, then, once the workers are
done, completes the files written in parts and makes the hard links, and
applies the directories' metadata last.

Workers are forked, so this runs only where that is safe: on Linux, from a
process with no other thread, over a repository whose remote keeps no
per-process state (``Remote.fork_safe``: local disk).  Anywhere else the
restore runs in this process as before.
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import pickle
import selectors
import signal
import struct
import sys
import threading
import time
from typing import Callable, Iterator

from chunkvault.errors import ChunkvaultError

from .manifest import T_FILE, T_HARDLINK, Entry, Record, entry_record
from .repository import Repo
from .restore import Restorer, RestoreResult

STRIPE_BYTES = 16 << 20
AUTO_MIN_BYTES = 64 << 20  # below this, forking and decoding the tree once per worker is not worth it
MAX_PROCESSES = 4
# A worker decodes on one thread beside its writer, 4 MiB ahead: on 2 cores, more threads or a larger window
# made the restore no faster (2.6-2.9 s against 2.5-2.7 s for 2 GB) and each worker 10-20 MiB larger.
WORKER_FETCH_THREADS = 1
WORKER_WINDOW_BYTES = 4 << 20
_PROGRESS_EVERY = 0.1  # seconds between a worker's progress messages
_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("<I")


def can_fork(source: object) -> bool:
    return (sys.platform.startswith("linux") and isinstance(source, Repo) and source.remote.fork_safe
            and threading.active_count() == 1)


def auto_processes(expected_bytes: int | None) -> int:
    """One worker per core the process may run on, for a restore big enough to pay for them."""
    if expected_bytes is not None and expected_bytes < AUTO_MIN_BYTES:
        return 1
    return min(MAX_PROCESSES, len(os.sched_getaffinity(0)))


def restore(restorer: Restorer, tree: Callable[[], Iterator[Record]], processes: int) -> RestoreResult:
    """``restorer.run(tree())``, with ``processes`` workers when the target is empty and forking is safe."""
    restorer.check_target()
    if processes < 2 or not restorer.fresh or restorer.opt.delta or not can_fork(restorer.repo):
        restorer.restore_records(restorer.selected_records(tree()))
        return restorer.result
    return _Coordinator(restorer, tree, processes).run()


def split(e: Entry, start: int, chunk_length: Callable[[bytes], int | None]) -> list[tuple[Entry, int]] | None:
    """A file larger than a stripe, lying at ``start`` in the restore, cut where its chunks cross into
    another stripe: one entry per part (its chunks, its size) and the part's offset in the file.  None
    for a file restored whole: a small one, or one whose chunks the index does not know or whose
    lengths do not add up (its reader reports that)."""
    if e.type != T_FILE or not e.chunks or e.size <= STRIPE_BYTES:
        return None
    cuts: list[tuple[int, int]] = []  # (first chunk, offset)
    offset = 0
    for i, cid in enumerate(e.chunk_ids()):
        n = chunk_length(cid)
        if n is None:
            return None
        if not cuts or (start + cuts[-1][1]) // STRIPE_BYTES != (start + offset) // STRIPE_BYTES:
            cuts.append((i, offset))
        offset += n
    if offset != e.size:
        return None
    ends = cuts[1:] + [(len(e.chunks) // 32, e.size)]
    return [(dataclasses.replace(e, chunks=e.chunks[32 * i:32 * j], size=end - at), at)
            for (i, at), (j, end) in zip(cuts, ends)]


def _share(records: Iterator[Record], k: int, n: int,
           chunk_length: Callable[[bytes], int | None]) -> Iterator[tuple[Entry, int | None]]:
    """What worker ``k`` of ``n`` writes: the files, and the parts of larger files (with their offsets),
    that begin in every n-th stripe of STRIPE_BYTES, counting file sizes in tree order."""
    before = 0
    for rec in records:
        e = rec.entry
        if e is None or e.type != T_FILE:
            continue
        parts = split(e, before, chunk_length)
        if parts is None:
            if (before // STRIPE_BYTES) % n == k:
                yield e, None
        else:
            for part, offset in parts:
                if ((before + offset) // STRIPE_BYTES) % n == k:
                    yield part, offset
        before += e.size


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
        return ("error", ChunkvaultError, (f"restore worker failed: {type(exc).__name__}: {exc}",), {})


def _rebuild(cls: type[BaseException], args: tuple, attrs: dict) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    vars(exc).update(attrs)
    return exc


class _Worker:
    def __init__(self, pid: int, fd: int):
        self.pid = pid
        self.fd = fd
        self.buffer = b""
        self.files = 0
        self.bytes = 0
        self.result: RestoreResult | None = None
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
            kind = message[0]
            if kind == "progress":
                self.files, self.bytes = message[1], message[2]
            elif kind == "done":
                self.result = message[1]
                self.files, self.bytes = self.result.files, self.result.bytes
            else:
                self.error = _rebuild(*message[1:])

    def reap(self, kill: bool) -> None:
        if self.reaped:
            return
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        os.close(self.fd)
        if self.result is None and self.error is None:
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self.error = ChunkvaultError(f"a restore worker process ended ({how}) before it was done")


class _Coordinator:
    def __init__(self, restorer: Restorer, tree: Callable[[], Iterator[Record]], processes: int):
        self.restorer = restorer
        self.tree = tree
        self.n = processes
        self.workers: list[_Worker] = []

    def run(self) -> RestoreResult:
        r = self.restorer
        progress = r.opt.progress
        assert isinstance(r.repo, Repo)
        r.repo.index  # loaded once here and shared, not once per worker: 13 MiB less in all for 2 GB
        for k in range(self.n):
            self.workers.append(self._fork(k))
        failed = True
        try:
            links: list[Record] = []
            split_files: list[Entry] = []
            r.defer_directories()
            r.restore_records(self._own(links, split_files))
            self._wait(progress)
            for e in split_files:
                r.finish_parts(e)
            r.restore_records(iter(links))
            r.finish_directories()
            failed = False
        finally:
            for w in self.workers:
                w.reap(kill=failed)
        for w in self.workers:
            assert w.result is not None
            r.result.files += w.result.files
            r.result.bytes += w.result.bytes
            r.result.warnings.extend(w.result.warnings)
        r.result.processes = self.n
        return r.result

    def _chunk_length(self, cid: bytes) -> int | None:
        loc = self.restorer.repo.locate(cid)  # type: ignore[union-attr]
        return None if loc is None else loc.raw_length

    def _own(self, links: list[Record], split_files: list[Entry]) -> Iterator[Record]:
        """What this process restores: everything but files; hard links kept for after the workers,
        and the files they write in parts noted, to be completed after them."""
        before = 0
        for rec in self.restorer.selected_records(self.tree()):
            e = rec.entry
            assert e is not None
            if e.type == T_FILE:
                if split(e, before, self._chunk_length) is not None:
                    split_files.append(e)
                before += e.size
            elif e.type == T_HARDLINK:
                links.append(rec)
            else:
                yield rec

    def _fork(self, k: int) -> _Worker:
        parent = os.getpid()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(rfd)
                for w in self.workers:
                    os.close(w.fd)
                code = self._work(k, wfd, parent)
            finally:
                os._exit(code)
        os.close(wfd)
        return _Worker(pid, rfd)

    def _work(self, k: int, fd: int, parent: int) -> int:
        """A worker's life: restore its share, report, exit (never back into the caller's frames)."""
        gc.freeze()  # the worker's collections leave the objects it shares with its parent (and their pages) alone
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which ends the workers
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            return 1
        r = self.restorer
        last = 0.0

        def progress(files: int, nbytes: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY:
                last = now
                _send(fd, ("progress", files, nbytes))

        r.opt.progress = progress
        r.opt.fetch_threads = WORKER_FETCH_THREADS
        r.opt.window_bytes = min(r.opt.window_bytes, WORKER_WINDOW_BYTES)
        try:
            r.restore_records(self._mine(k))
        except BaseException as exc:  # every failure, whatever its kind, goes to the coordinator
            _send(fd, _error_message(exc))
            return 1
        _send(fd, ("done", r.result))
        return 0

    def _mine(self, k: int) -> Iterator[Record]:
        r = self.restorer
        for e, offset in _share(r.selected_records(self.tree()), k, self.n, self._chunk_length):
            if offset is not None:
                r.parts[id(e)] = (e, offset)
            yield entry_record(e)

    def _wait(self, progress: Callable[[int, int], None] | None) -> None:
        """Read the workers' messages until each is done; the first error ends them all and is raised."""
        with selectors.DefaultSelector() as sel:
            for w in self.workers:
                sel.register(w.fd, selectors.EVENT_READ, w)
            open_count = len(self.workers)
            while open_count:
                for key, _ in sel.select():
                    w = key.data
                    data = os.read(w.fd, 1 << 16)
                    if data:
                        w.feed(data)
                    else:
                        sel.unregister(w.fd)
                        open_count -= 1
                        w.reap(kill=False)
                    if w.error is not None:
                        raise w.error
                if progress is not None:
                    progress(sum(w.files for w in self.workers), sum(w.bytes for w in self.workers))
