"""Repository locks: only what prune needs.

Backups never block each other: each writes a *shared* lock object when it
starts (before it reads the index) and removes it when done.  Prune takes an
*exclusive* lock and proceeds only when no live shared lock exists, so no
backup can be holding index entries that prune is about to drop.  Locks are
refreshed while held; one not refreshed for ``STALE_AFTER`` seconds, or held
by a process on this host that no longer exists, is stale and ignored (a
killed prune or backup never wedges the repository).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass

from chunkvault.errors import Locked, ObjectNotFound, RemoteError
from chunkvault.remotes import Remote

REFRESH_EVERY = 60.0
STALE_AFTER = 300.0
SHARED = "shared"
EXCLUSIVE = "exclusive"


@dataclass
class LockInfo:
    key: str
    kind: str
    host: str
    pid: int
    purpose: str
    time: float

    def stale(self, now: float) -> bool:
        if now - self.time > STALE_AFTER:
            return True
        if self.host == socket.gethostname() and self.pid != os.getpid():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def describe(self) -> str:
        age = max(0, int(time.time() - self.time))
        return f"{self.purpose} on {self.host} (pid {self.pid}, refreshed {age} s ago)"


def list_locks(remote: Remote) -> list[LockInfo]:
    out = []
    for o in remote.list("locks/"):
        try:
            d = json.loads(remote.get(o.key))
            out.append(LockInfo(o.key, d["kind"], d["host"], int(d["pid"]), d.get("purpose", "?"), float(d["time"])))
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            continue  # vanished, or not ours: a lock never parses into something it is not
    return out


class RepoLock:
    """A lock object held for the duration of a ``with`` block, refreshed in the background."""

    def __init__(self, remote: Remote, kind: str, purpose: str, *, wait: float = 0.0, poll: float = 2.0):
        self.remote = remote
        self.kind = kind
        self.purpose = purpose
        self.wait = wait
        self.poll = poll
        self.key = f"locks/{os.urandom(16).hex()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        body = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose,
                "time": time.time()}
        self.remote.put(self.key, json.dumps(body).encode())

    def _conflicts(self) -> list[LockInfo]:
        now = time.time()
        others = [lk for lk in list_locks(self.remote) if lk.key != self.key and not lk.stale(now)]
        if self.kind == EXCLUSIVE:
            return others
        return [lk for lk in others if lk.kind == EXCLUSIVE]

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            self._write()
            conflicts = self._conflicts()
            if not conflicts:
                break
            self.remote.delete(self.key)
            if time.monotonic() >= deadline:
                raise Locked(f"repository is locked by {conflicts[0].describe()}; try again later"
                             + (" or use --wait" if self.kind == EXCLUSIVE else ""))
            time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())) + os.urandom(1)[0] / 2550)
        self._thread = threading.Thread(target=self._refresh, name="lock-refresh", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self._write()
            except Exception:  # a failed refresh only risks staleness; the next one may succeed
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.remote.delete(self.key)

    def __enter__(self) -> "RepoLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except RemoteError:
            # The work is done (or its own error propagates); a lock left behind goes stale by itself.
            pass
