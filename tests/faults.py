"""A fault-injecting Remote wrapper for tests, and a stop that lands inside ``subprocess.Popen``.

``FaultyRemote`` sits between the code under test and a real remote and makes it
misbehave the way networks and object stores do: transient errors (some of
them after a write already landed, the ambiguous case), truncated reads, slow
responses, a remote that is down, or one that goes away after N uploads.  Faults
come from a seeded RNG, so a single-threaded run is reproducible; counters say
what was injected so tests can prove the faults really happened.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

from chunkvault.errors import RemoteUnavailable
from chunkvault.remotes.base import ObjectInfo, Remote
from chunkvault.remotes.local import LocalRemote

OPS = ("put", "get", "list", "delete", "stat")


class FaultyRemote(Remote):
    """Wraps ``inner`` and injects faults.

    - ``error_rate``: chance that an operation in ``fail_ops`` (default: all) raises
      RemoteUnavailable.  Half of the injected put/delete errors happen *after* the
      inner call succeeded (the reply was "lost"); list errors may strike midway.
    - ``truncate_rate``: chance that a get silently returns a strict prefix of the bytes.
    - ``delay``: seconds slept before each operation (slow responses).
    - ``down``: every operation fails (may be toggled at run time).
    - ``fail_after``: after that many successful puts, the remote is down for good.
    - ``inject(op, count, after=...)``: queue exact faults for the next calls of ``op``.
    """

    def __init__(
        self,
        inner: Remote,
        *,
        seed: int,
        error_rate: float = 0.0,
        fail_ops: Iterable[str] | None = None,
        truncate_rate: float = 0.0,
        delay: float = 0.0,
        down: bool = False,
        fail_after: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.inner = inner
        self.display_url = inner.display_url
        self.error_rate = error_rate
        self.fail_ops = frozenset(OPS if fail_ops is None else fail_ops)
        unknown = self.fail_ops - set(OPS)
        if unknown:
            raise ValueError(f"unknown operations in fail_ops: {sorted(unknown)}")
        self.truncate_rate = truncate_rate
        self.delay = delay
        self.down = down
        self.fail_after = fail_after
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._scripted: dict[str, deque[bool]] = {op: deque() for op in OPS}
        self._scripted_cuts = 0
        self.calls: Counter[str] = Counter()  # operations attempted, per op
        self.faults: Counter[str] = Counter()  # faults injected, per kind
        self.successful_puts = 0

    # -- fault decisions (under the lock so threads share one RNG stream) ---

    def inject(self, op: str, count: int = 1, *, after: bool = False) -> None:
        """Make the next ``count`` calls of ``op`` fail; ``after``: once the inner call succeeded."""
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        with self._lock:
            self._scripted[op].extend([after] * count)

    def inject_truncation(self, count: int = 1) -> None:
        """Make the next ``count`` non-empty gets return a strict prefix of their bytes."""
        with self._lock:
            self._scripted_cuts += count

    def _decide(self, op: str) -> str | None:
        """None (no fault), "before" or "after" the inner call."""
        with self._lock:
            self.calls[op] += 1
            if self.down or (self.fail_after is not None and self.successful_puts >= self.fail_after):
                self.faults["down"] += 1
                return "down"
            if self._scripted[op]:
                self.faults["scripted"] += 1
                return "after" if self._scripted[op].popleft() else "before"
            if op in self.fail_ops and self.error_rate and self._rng.random() < self.error_rate:
                if op in ("put", "delete", "list") and self._rng.random() < 0.5:
                    self.faults["error_after"] += 1
                    return "after"
                self.faults["error"] += 1
                return "before"
            return None

    def _truncate_to(self, size: int) -> int | None:
        with self._lock:
            if size and self._scripted_cuts:
                self._scripted_cuts -= 1
                self.faults["scripted_cut"] += 1
                return self._rng.randrange(size)
            if size and self.truncate_rate and self._rng.random() < self.truncate_rate:
                self.faults["truncated"] += 1
                return self._rng.randrange(size)
            return None

    def _enter(self, op: str) -> str | None:
        if self.delay:
            with self._lock:
                self.faults["delayed"] += 1
            self._sleep(self.delay)
        fault = self._decide(op)
        if fault in ("down", "before"):
            raise RemoteUnavailable(f"{self.display_url}: injected {fault} fault in {op}")
        return fault

    @staticmethod
    def _lost_reply(op: str) -> RemoteUnavailable:
        return RemoteUnavailable(f"injected fault: reply to {op} lost")

    # -- the interface ------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        fault = self._enter("put")
        self.inner.put(key, data, if_absent=if_absent)
        with self._lock:
            self.successful_puts += 1
        if fault == "after":
            raise self._lost_reply("put")

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        fault = self._enter("get")
        data = self.inner.get(key, start, length)
        if fault == "after":
            raise self._lost_reply("get")
        cut = self._truncate_to(len(data))
        return data if cut is None else data[:cut]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        fault = self._enter("list")
        items = list(self.inner.list(prefix))
        if fault == "after":
            with self._lock:
                stop = self._rng.randrange(len(items) + 1)
            return _fail_midway(items, stop)
        return iter(items)

    def delete(self, key: str) -> None:
        fault = self._enter("delete")
        self.inner.delete(key)
        if fault == "after":
            raise self._lost_reply("delete")

    def stat(self, key: str) -> ObjectInfo | None:
        fault = self._enter("stat")
        info = self.inner.stat(key)
        if fault == "after":
            raise self._lost_reply("stat")
        return info

    def close(self) -> None:
        self.inner.close()


def _fail_midway(items: list[ObjectInfo], stop: int) -> Iterator[ObjectInfo]:
    yield from items[:stop]
    raise RemoteUnavailable("injected fault: listing connection reset")


class FailingWrite(FaultyRemote):
    """Wraps ``inner`` and fails the ``at``-th put (counted from 1) of a key under ``prefixes`` with
    ``error()``: a disk that fills up (``StorageFull``; with ``stays``, every later such put fails too, until
    ``heal``), a Ctrl-C (``KeyboardInterrupt``), a remote that goes away.  ``landed``: the put is made before
    the error is raised (a reply lost after the write).  ``writes`` counts the puts under ``prefixes``."""

    def __init__(self, inner: Remote, *, at: int, error: Callable[[], BaseException],
                 prefixes: tuple[str, ...] = ("data/", "index/"), stays: bool = False, landed: bool = False):
        super().__init__(inner, seed=0)
        self.at = at
        self.error = error
        self.prefixes = prefixes
        self.stays = stays
        self.landed = landed
        self.writes = 0
        self.failed = 0
        self._healed = False

    def heal(self) -> None:
        """Room again (or the remote back): no put fails from now on."""
        self._healed = True

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith(self.prefixes):
            with self._lock:
                self.writes += 1
                fail = not self._healed and (self.writes == self.at or (self.stays and self.writes > self.at))
                self.failed += fail
            if fail:
                if self.landed:
                    self.inner.put(key, data, if_absent=if_absent)
                raise self.error()
        super().put(key, data, if_absent=if_absent)


class IndexedFirst(LocalRemote):
    """Local storage that checks, at each snapshot object stored, that the index objects stored by then list
    every blob that snapshot needs: killed just after, the repository holds no snapshot it cannot read."""

    def __init__(self, root: str, password: str):
        super().__init__(root)
        self.password = password
        self.saves = 0

    def put(self, key, data, *, if_absent=False):
        super().put(key, data, if_absent=if_absent)
        if key.startswith("snapshots/"):
            from chunkvault import Repository
            from crashkit import indexed_blobs, tree_blobs

            with Repository.open(self.root, self.password, ledger=False) as fresh:
                store = fresh.store
                snap = store.load_snapshot(key.split("/")[1])
                lacking = tree_blobs(store, snap) - indexed_blobs(store).keys()
                assert not lacking, f"{key} saved before {len(lacking)} of its blob(s) were indexed"
            self.saves += 1


@contextlib.contextmanager
def stopped_inside_popen(monkeypatch, started: Path) -> Iterator[list[int]]:
    """Within the block, a child started through ``subprocess.Popen`` is followed, once it has begun and
    touched ``started``, by a SIGTERM handled before Popen returns (a loaded machine's timing), its handler
    raising KeyboardInterrupt.  Yields the children's pids; their groups are ended as the block ends."""
    from chunkvault import interrupts

    pids: list[int] = []
    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def slow_start(self, *args, **kwargs):
        execute_child(self, *args, **kwargs)
        pids.append(self.pid)
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # handled here, before Popen returns

    def stop(signum: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "_execute_child", slow_start)
    try:
        with interrupts.handled({signal.SIGTERM: stop}):
            yield pids
    finally:
        monkeypatch.undo()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
