"""Repository locks: what prune, forget and the repairs need.

Backups and reads never block each other: each backup, restore, check, copy,
export or listing of a snapshot's files writes a *shared* lock object when it
starts (before it reads the index or the snapshots) and removes it when done.
Prune, forget, aggregate, rewrite, tag and the repairs take an *exclusive*
lock and proceed only when no live shared lock exists, so no backup can be
holding index entries that prune is about to drop, and no read can be
following an index into packs that prune is about to delete.  Locks are
refreshed while held; one not refreshed for ``STALE_AFTER`` seconds, or held
by a process on this host that no longer exists, is stale: it is ignored and
removed (a killed prune or backup never wedges the repository).

A lock's age is told by the storage's clock where the remote's listing dates its objects (every remote of
ours does): the time the storage gave the lock's last write against the time it gave a lock this command
has just written.  One clock for every host, so a host whose clock runs minutes ahead neither takes fresh
locks for stale nor has its own taken so.  Where the listing dates nothing (an older service), the
``time`` inside the lock is held against this host's clock.

A lock names its process by host, pid, and (where the system tells them) the
boot id, the process's start time and its pid namespace, because pids are
reused: a killed prune's pid may belong to an unrelated process minutes
later, and a pid alone would keep its lock alive until it expires.  A
container that shares the host's name and boot (Docker's ``--uts host`` or
``--network host``, Kubernetes' ``hostNetwork``) numbers its processes
apart: its backup's pid means nothing in the host's namespace, so a lock
from another namespace is judged by its age only.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

from chunkvault.errors import (CorruptObject, Locked, LockLost, MissingObject, ObjectNotFound, PermissionDenied,
                               RemoteError, RemoteUnavailable, RepositoryStateWarning, StorageFull, UsageError)
from chunkvault.remotes import ObjectInfo, Remote
from chunkvault.remotes.layer import parallel_map

from .forksafe import FORK_GUARD, start_quiet_thread

REFRESH_EVERY = 60.0
LOCK_READERS = 8  # lock objects read at once
#: The most a lock object is read to: chunkvault's are a few hundred bytes.  Every command that locks reads
#: every lock object, and one of gigabytes (an append-only client may store shared locks) was read whole by each.
LOCK_OBJECT_LIMIT = 64 << 10
STALE_AFTER = 300.0
# A lock not written for this long may have been judged stale by another command (a paused or suspended
# process, a remote out of reach): its holder no longer trusts it (``RepoLock.ensure_held``).  Below
# STALE_AFTER by a margin for a write that reaches the storage late, and for clocks that disagree a little.
LOST_AFTER = STALE_AFTER - REFRESH_EVERY
# How long ``ensure_held`` trusts its last look at the lock object.  Its own clock telling it fresh is not
# enough: ``unlock --remove-all`` removes it, and so, where the listing dates nothing, does a host whose
# clock runs minutes ahead.
ASK_EVERY = 1.0
# A lock of another host dated further ahead than this tells of clocks out of step (warned once per host).
SKEW_WARNING = 60.0
_skew_told: set[str] = set()
SHARED = "shared"
EXCLUSIVE = "exclusive"

#: Told once, before a lock waits for another command's, who holds it and how long it will wait: the
#: command layer sets it (a warning on stderr), so that no command, whichever takes a lock, waits in silence.
announce_wait: "Callable[[LockInfo, float, str], None] | None" = None
# Set (by a daemon told to stop) to end every wait for a lock at once, with Locked: its first SIGTERM
# must not wait an hour behind a long restore.
stop_waiting = threading.Event()
_waits = threading.local()


@contextlib.contextmanager
def waits_end_when(stopped: Callable[[], bool]) -> Iterator[None]:
    """Within the block, this thread's waits for a lock end (Locked, "stopped waiting") once ``stopped()``
    says so, within a poll (``RepoLock.poll``)."""
    outer = getattr(_waits, "stopped", None)
    _waits.stopped = stopped
    try:
        yield
    finally:
        _waits.stopped = outer


def boot_id() -> str | None:
    """This boot of this machine (Linux), so a pid is only compared within the boot that issued it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def pid_namespace() -> str | None:
    """This process's pid namespace (Linux: e.g. ``pid:[4026531836]``), within which its pid means it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int, *, running: bool = False) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), or None if unknown or gone (with
    ``running``, also once it is a zombie: it has ended, its parent has yet to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if running and fields[0] == b"Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class LockInfo:
    key: str
    kind: str
    host: str
    pid: int
    purpose: str
    time: float
    boot: str | None = None
    start: int | None = None
    pidns: str | None = None
    #: Seconds since its last write by the storage's clock (see the module docstring), or None where the
    #: listing gave no dates to tell it by.
    stored_ago: float | None = None
    #: Its holder let it go but could not delete it (credentials that may not delete): stale at once.
    released: bool = False

    def stale(self, now: float) -> bool:
        if self.released:
            return True
        if self.stored_ago is not None:
            if self.stored_ago > STALE_AFTER:
                return True
        elif abs(now - self.time) > STALE_AFTER:  # not refreshed, or dated far ahead (a clock, or a forged lock)
            return True
        if self.judged_by_age_only() or self.pid == os.getpid():
            return False
        if self.boot is not None and self.start is not None:
            # gone, or its pid now names another process; or killed and not yet reaped by its parent (a zombie
            # holds nothing, however long a job runner or a container's init leaves it unreaped)
            return process_start(self.pid, running=True) != self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def judged_by_age_only(self) -> bool:
        """Whether only its age can tell that its command is gone: it was taken on another host, boot (another
        machine of the same name, or before a reboot) or pid namespace (a container of the same name: see the
        module docstring), where this process cannot look for its pid."""
        return (self.host != socket.gethostname() or (self.boot is not None and self.boot != boot_id())
                or (self.pidns is not None and self.pidns != pid_namespace()))

    def stale_note(self, *, waiting: bool = False) -> str:
        """What a command refused by this lock (or, ``waiting``, one that waits for it) is told of it: a lock
        whose command was killed elsewhere stays until it goes stale, and the refusal alone ("try again later")
        left the user to guess for how long, as "waiting up to 3600 s" alone did."""
        left = max(0.0, STALE_AFTER - self.age())
        then = "this command goes on" if waiting else "the next command removes it"
        return (f"; if that command is dead (killed, or its host down), its lock goes stale "
                f"{STALE_AFTER / 60:g} minutes after its last refresh (in {left:.0f} s) and {then}, "
                "or `chunkvault unlock --remove-all` (API: `unlock(remove_all=True)`) removes it now")

    def describe(self) -> str:
        ahead = self.time - time.time()
        when = (f"dated {ahead:.0f} s ahead" if ahead >= 1 and self.stored_ago is None
                else f"refreshed {self.age():.0f} s ago")
        return f"{self.purpose} on {self.host} (pid {self.pid}, {when})"

    def age(self) -> float:
        """Seconds since it was last written, by the storage's clock where known (0 for one dated ahead)."""
        return self.stored_ago if self.stored_ago is not None else max(0.0, time.time() - self.time)

    def to_dict(self) -> dict[str, object]:
        return {"id": self.key.split("/", 1)[-1], "kind": self.kind, "purpose": self.purpose, "host": self.host,
                "pid": self.pid, "refreshed_seconds_ago": round(self.age(), 1),
                "stale": self.stale(time.time())}


def list_locks(remote: Remote, reference: str | None = None) -> list[LockInfo]:
    """The locks there, each aged by the storage's clock against ``reference``, the key of a lock this
    process has just written, where the listing dates both; that one is left out (read back, it was a round
    trip more before every command that takes a lock, for a lock its writer knows)."""
    listed = list(remote.list("locks/"))
    now = next((o.modified for o in listed if o.key == reference), None) if reference else None

    def read(o: ObjectInfo) -> LockInfo | None:
        try:
            lock = _parsed_lock(o.key, json.loads(_lock_bytes(remote, o.key)))
        except (ObjectNotFound, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None  # vanished, or not ours: a lock never parses into something it is not
        if now is not None and o.modified is not None:
            lock.stored_ago = max(0.0, now - o.modified)  # one written after ours is as fresh as can be
        return lock

    others = [o for o in listed if o.key != reference]
    # Read several at once: one after another, the locks of a fleet's backups running together (a thousand
    # shared locks) cost each command that took a lock a round trip apiece, over a minute on S3.
    read_all = map(read, others) if len(others) < 2 else parallel_map(read, others, workers=LOCK_READERS)
    out = [lock for lock in read_all if lock is not None]
    _tell_skew(out, time.time())
    return out


def _tell_skew(locks: list[LockInfo], now: float) -> None:
    """Warn of a host whose locks are dated ahead of this machine's clock, where the locks are judged by
    the hosts' clocks: past ``STALE_AFTER`` each takes the other's fresh locks for stale and removes them,
    and a prune may then delete what a backup uses."""
    for lock in locks:
        ahead = lock.time - now
        if (ahead > SKEW_WARNING and lock.stored_ago is None and lock.host != socket.gethostname()
                and lock.host not in _skew_told):
            _skew_told.add(lock.host)
            warnings.warn(f"a lock of {lock.host} is dated {ahead:.0f} s ahead of this machine's clock: one of the "
                          f"two clocks is off; past {STALE_AFTER:.0f} s each host takes the other's locks for stale "
                          "(keep the clocks in step, with NTP)", RepositoryStateWarning, stacklevel=2)


@dataclass
class LocksRemoved:
    """What ``remove_locks`` did: the locks it removed, and those it left (live, or this process's own)."""

    removed: list[LockInfo]
    kept: list[LockInfo]

    def to_dict(self) -> dict[str, object]:
        return {"removed": [lk.to_dict() for lk in self.removed], "kept": [lk.to_dict() for lk in self.kept]}


def remove_locks(remote: Remote, *, remove_all: bool = False) -> LocksRemoved:
    """Remove the stale locks, as any command removes those it meets, and with ``remove_all`` the live
    ones too.  This process's own locks are always kept: removing them would only stop its own commands.
    A lock that vanishes meanwhile counts as removed (its command ended, or another removed it).

    A shared lock of its own, written first and removed at the end, dates the others by the storage's
    clock, as a command that takes the lock would; where the remote refuses it, the hosts' clocks do."""
    probe: str | None = _new_key(SHARED)
    try:
        remote.put(probe, _lock_body(SHARED, "unlock"))
    except (PermissionDenied, StorageFull):
        probe = None
    try:
        now = time.time()
        done = LocksRemoved([], [])
        for lock in list_locks(remote, probe):
            if lock.key in _HELD_BY_THREAD or not (remove_all or lock.key in _LEFT_BEHIND or lock.stale(now)):
                done.kept.append(lock)
                continue
            with contextlib.suppress(ObjectNotFound):
                remote.delete(lock.key)
            _LEFT_BEHIND.discard(lock.key)
            done.removed.append(lock)
        return done
    finally:
        if probe is not None:
            with contextlib.suppress(RemoteError):
                _withdraw(remote, probe, SHARED, "unlock")


def read_lock(remote: Remote, key: str) -> LockInfo:
    """The lock object stored under ``key``, as ``list_locks`` parses each (``cat lock``): MissingObject when
    it is gone, CorruptObject when it holds no lock."""
    try:
        data = _lock_bytes(remote, key)
    except ObjectNotFound:
        raise MissingObject(key) from None
    except ValueError:  # too large to be one
        raise CorruptObject(key, f"over {LOCK_OBJECT_LIMIT >> 10} KiB: not a lock object") from None
    try:
        return _parsed_lock(key, json.loads(data))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise CorruptObject(key, "not a lock object (JSON with kind, host, pid and time)") from None


def _lock_bytes(remote: Remote, key: str) -> bytes:
    """A lock object's bytes, read no further than ``LOCK_OBJECT_LIMIT``: past it, a ValueError (no lock)."""
    data = remote.get(key, 0, LOCK_OBJECT_LIMIT + 1)
    if len(data) > LOCK_OBJECT_LIMIT:
        raise ValueError(f"{key} is over {LOCK_OBJECT_LIMIT >> 10} KiB: not a lock object")
    return data


def _parsed_lock(key: str, d: dict) -> LockInfo:
    """A lock object's fields, each of the kind it must be (ValueError, TypeError or KeyError otherwise): a
    time that is no number, or a pid no process can have, would hold every command off for ever."""
    pid, when, start = int(d["pid"]), float(d["time"]), d.get("start")
    if not (0 < pid < 1 << 31) or not math.isfinite(when):
        raise ValueError("not a lock")
    return LockInfo(key, str(d["kind"]), str(d["host"]), pid, str(d.get("purpose", "?")), when,
                    d.get("boot") or None, int(start) if start is not None else None,
                    str(d["pidns"]) if d.get("pidns") else None, released=d.get("released") is True)


def _new_key(kind: str) -> str:
    return f"locks/{'x-' if kind == EXCLUSIVE else ''}{os.urandom(16).hex()}"


def _lock_body(kind: str, purpose: str, now: float | None = None, *, released: bool = False) -> bytes:
    body = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
            "time": time.time() if now is None else now, "boot": boot_id(),
            "start": process_start(os.getpid()), "pidns": pid_namespace()}
    if released:
        body["released"] = True
    return json.dumps(body).encode()


def _withdraw(remote: Remote, key: str, kind: str, purpose: str) -> None:
    """Remove this process's lock ``key``; where the remote refuses deletions (an S3 bucket policy that denies
    s3:DeleteObject), write it again marked released, which every command takes for stale at once.  Left as
    it was, it held other hosts' prune (or, exclusive, every backup) off for ``STALE_AFTER`` seconds, and a
    command backing off from another's lock failed naming its own lock instead of the one it met."""
    try:
        remote.delete(key)
    except PermissionDenied:
        remote.put(key, _lock_body(kind, purpose, released=True))


_HELD_BY_THREAD: dict[str, int] = {}  # lock key -> the thread of this process that holds it

#: The keys of locks this process left on the remote when their block ended (it was out of reach, or refused
#: the removal): to other commands they are a live process's, held until they go stale, but here they are
#: known to guard nothing.  This process's next command removes them instead of waiting ``STALE_AFTER`` for
#: its own leftovers: a service whose backup failed in an outage was refused its prune (or forget) for
#: five minutes, "locked by backup" of its own pid, once the storage was back.
_LEFT_BEHIND: set[str] = set()


def left_behind() -> frozenset[str]:
    """The keys of the locks this process left on the remote to go stale (``_LEFT_BEHIND``)."""
    return frozenset(_LEFT_BEHIND)


#: The shared locks of commands that store snapshots brought from elsewhere (into a copy's destination, an
#: import): one at a time in a repository, or each stores what the other brings, and the snapshot is there
#: twice.  Each finds what the one before brought once it has the lock.
COPY_INTO, IMPORT = "copy into", "import"
INCOMING = (COPY_INTO, IMPORT)


class RepoLock:
    """A lock object held for the duration of a ``with`` block, refreshed in the background."""

    def __init__(self, remote: Remote, kind: str, purpose: str, *, wait: float = 0.0, poll: float = 2.0,
                 wait_option: bool | None = None, label: str = "repository", alone: bool = False):
        self.remote = remote
        # A shared lock (of an ``INCOMING`` purpose) that the others of those purposes also exclude.
        self.alone = alone
        # Whether the command line's refusal names --wait: the exclusive commands and the reads have it.
        self.wait_option = kind == EXCLUSIVE if wait_option is None else wait_option
        self.kind = kind
        self.purpose = purpose
        self.label = label  # what messages call the repository (copy: "the destination repository")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise UsageError(f"a lock wait is a number of seconds, 0 or more, not {wait!r}")
        self.wait = wait
        self.poll = poll
        # Named by kind: on a full disk, a local repository frees its reserve for an exclusive lock only
        # (remotes/local.py), the one that forget and prune, which free space, take.
        self.key = _new_key(kind)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written = 0.0  # when the lock was last written (wall clock, as other commands judge it)
        self._lost = 0.0  # the gap (s) that made it lost, once one did: sticky
        self._removed = False  # another command removed it (found by ensure_held or a refresh): sticky
        self._looked = 0.0  # when ensure_held last saw the lock object on the remote
        self._unreachable = False  # a look failed for a whole retry window: removing it would wait as long
        self._left = False  # released and left to go stale, its refresh not waited for
        self._pid = os.getpid()  # a child forked while it is held must not remove it on leaving the block
        # The bodies last written (or tried: a write whose answer was lost may have landed): the object holding
        # any other was replaced by another command (marked released, say, which every command takes for stale).
        self._bodies: collections.deque[bytes] = collections.deque(maxlen=4)
        self.waited = False  # another command held the repository first: what was read before may be stale

    def _write(self) -> None:
        now = time.time()
        if self._written and now - self._written > LOST_AFTER:
            self._lost = now - self._written  # sticky: writing it again does not undo what others did meanwhile
        body = _lock_body(self.kind, self.purpose, now)
        self._bodies.append(body)
        self.remote.put(self.key, body)
        self._written = now

    def _still_mine(self) -> bool:
        """Whether the lock object is there as this command wrote it: one removed, or replaced (an append-only
        client may write locks, and one marked released is stale to every command), holds nothing off.  A
        read cut short (the start of a body written here) is read once more, then the storage's failure
        (RemoteError: it answered, so the lock is removed at the end, not left to go stale): it was taken for
        another command's replacement, which stopped the command as if its lock were lost."""
        for _ in range(2):
            try:
                body = self.remote.get(self.key, 0, LOCK_OBJECT_LIMIT + 1)  # one larger is not this command's
            except ObjectNotFound:
                return False
            if body in self._bodies:
                return True
            if not any(mine.startswith(body) for mine in self._bodies):
                return False
        raise RemoteError(f"{self.key}: read back cut short ({len(body)} bytes), twice")

    def ensure_held(self, *, ask: bool = False) -> None:
        """Before each step that relies on the lock (a backup saving an index object or its snapshot, a prune
        deleting an object): LockLost when it may have been judged stale meanwhile, or is gone.  Another
        command may then have pruned what a backup refers to, or built on what a prune is about to delete.
        Cheap enough to call before every deletion: the remote is asked at most every ``ASK_EVERY`` s, and
        every time with ``ask`` (the steps that commit: an index object before, a snapshot after, and before
        unless the index object's look came within ``ASK_EVERY``)."""
        now = time.time()
        if not self._lost and now - self._written > LOST_AFTER:
            self._lost = now - self._written
        if self._removed:
            raise self._removed_error()
        if self._lost:
            raise LockLost(f"this {self.purpose}'s repository lock went {self._lost:.0f} s without a refresh (the "
                           "process was paused, or the repository out of reach), so other commands may have "
                           f"taken it for stale; stopped before relying on it: run the {self.purpose} again")
        if not ask and now - self._looked < ASK_EVERY:
            return
        try:
            there = self._still_mine()
        except RemoteUnavailable:
            self._unreachable = True
            raise
        if not there:
            self._lost = now - self._written
            self._removed = True
            raise self._removed_error()
        self._looked = now

    def may_be_lost(self) -> bool:
        """Whether another command may have taken this lock for stale (it went unrefreshed past ``LOST_AFTER``,
        or a refresh found it removed), asking no remote: what it kept off may have run since."""
        return self._removed or bool(self._lost) or time.time() - self._written > LOST_AFTER

    def removed(self) -> float | None:
        """Seconds it had gone without a refresh when a refresh or a look found it removed or replaced by
        another command (taken for stale, or ``unlock --remove-all``); None while it holds others off."""
        return self._lost if self._removed else None

    def confirm(self) -> None:
        """``ensure_held`` asking the remote, before and after a step that commits (an index object, a
        snapshot): guards for a writer."""
        self.ensure_held(ask=True)

    def _removed_error(self) -> LockLost:
        return LockLost(f"this {self.purpose}'s repository lock was removed or replaced by another command; stopped before "
                        f"relying on it: run the {self.purpose} again")

    def _conflicts(self) -> list[LockInfo]:
        now = time.time()
        others = []
        for lk in list_locks(self.remote, self.key):
            if lk.key not in _LEFT_BEHIND and not lk.stale(now):
                others.append(lk)
                continue
            try:  # a stale lock is removed, so that a later pid reuse cannot bring it back to life
                self.remote.delete(lk.key)
            except RemoteError:
                continue
            if lk.key in _LEFT_BEHIND:
                _LEFT_BEHIND.discard(lk.key)
                continue
            if lk.host != socket.gethostname() and lk.stored_ago is None and lk.time <= now:  # by this clock: say so
                warnings.warn(f"removed the stale {lk.kind} lock of {lk.describe()}: its command was killed or "
                              "cut off, or that host's clock is behind this one's", RepositoryStateWarning,
                              stacklevel=2)
        if self.kind == EXCLUSIVE:
            return others
        # an unknown kind (a newer chunkvault's) counts as exclusive
        return [lk for lk in others if lk.kind != SHARED or (self.alone and lk.purpose in INCOMING)]

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        announced = False
        told = getattr(_waits, "stopped", None)  # this thread's operation told to stop (the API's ``stop``)
        # The other commands' locks met while waiting: backups that keep starting hold a prune off in turn,
        # none of them for long, and naming only the last made a starved wait look like one hung command.
        held_by: set[str] = set()
        while True:
            try:
                self._write()
                conflicts = self._conflicts()
            except BaseException:
                # A write whose reply was lost may have landed, and a failed listing leaves ours there:
                # removed now if the remote lets us, instead of holding others off until it goes stale.
                self._remove_quietly()
                raise
            if not conflicts:
                break
            self.waited = True
            held_by.update(lk.key for lk in conflicts)
            _withdraw(self.remote, self.key, self.kind, self.purpose)
            mine = [lk for lk in conflicts if _HELD_BY_THREAD.get(lk.key) == threading.get_ident()]
            if mine:  # waiting for it would wait for ourselves
                raise Locked(f"this thread holds the repository's {mine[0].kind} lock ({mine[0].purpose}): "
                             f"this {self.purpose} cannot run inside it")
            stopped = stop_waiting.is_set() or (told is not None and told())
            if time.monotonic() >= deadline or stopped:
                in_turn = f", in which {len(held_by)} commands held it" if len(held_by) > 1 else ""
                refused = Locked(f"{self.label} is locked by {conflicts[0].describe()}; "
                                 + ("stopped waiting" if stopped else
                                    f"waited {self.wait:g} s{in_turn}; try again later" if self.wait
                                    else "try again later"))
                refused.hinting(" or use --wait" if self.wait_option and not self.wait and not stopped else "")
                raise (refused.explained(conflicts[0].stale_note()) if conflicts[0].judged_by_age_only() and not stopped
                       else refused)
            if announce_wait is not None and not announced:
                announce_wait(conflicts[0], self.wait, self.label)
                announced = True
            stop_waiting.wait(min(self.poll, max(0.0, deadline - time.monotonic())) + os.urandom(1)[0] / 2550)
        self._thread = start_quiet_thread(self._refresh, "lock-refresh")
        _HELD_BY_THREAD[self.key] = threading.get_ident()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            with FORK_GUARD:  # a restore's workers fork while this lock is held: never mid-write
                if not self.refresh():
                    return

    def refresh(self) -> bool:
        """Write the lock again, unless another command removed it (it took it for stale): then it stays
        gone, for ``ensure_held`` to find, and False; written back, the loss would go unnoticed."""
        try:
            if not self._still_mine():
                self._lost = self._lost or max(time.time() - self._written, 1.0)
                self._removed = True
                return False
            if self._stop.is_set():  # released while this look was retried: written again, it looked held
                return True
            self._write()
            if self._left:  # released while this write was retried: landed after the next command here removed
                self._remove_quietly()  # the lock, it was a live process's again, holding others off
        except Exception:  # a failed refresh only risks staleness; the next one may succeed
            pass
        return True

    def _remove_quietly(self) -> None:
        try:
            _withdraw(self.remote, self.key, self.kind, self.purpose)
        except RemoteError:
            pass

    def release(self, *, remove: bool = True) -> None:
        """Stop refreshing the lock and remove it (``remove``); one left goes stale by itself."""
        left = self._left = not remove or self._unreachable
        self._stop.set()
        if os.getpid() != self._pid:  # a forked child: the lock is its parent's, still held there
            return
        _HELD_BY_THREAD.pop(self.key, None)
        if self._thread is not None:
            # A lock left to go stale is not waited for: a refresh under way retries the remote that stopped
            # answering for a whole retry window more (the command kept on, silent, minutes after it gave up).
            self._thread.join(0 if left else None)
        if left:
            _LEFT_BEHIND.add(self.key)
            return
        try:
            _withdraw(self.remote, self.key, self.kind, self.purpose)
        except RemoteError:
            _LEFT_BEHIND.add(self.key)
            raise

    def __enter__(self) -> "RepoLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            # After the remote stopped answering for a whole retry window, removing the lock would retry for
            # another (an HTTP service frozen mid-backup kept the command 11 minutes, saying only "retrying"):
            # it is left to go stale, and a command on this host removes it at once (its process is gone).
            # Another repository's outage (copy holds a lock on each) is no reason to leave this one's.
            self.release(remove=not RemoteUnavailable.gave_up_on(exc, self.remote.display_url))
        except RemoteError:
            # The work is done (or its own error propagates); a lock left behind goes stale by itself.
            pass
