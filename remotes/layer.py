"""What every remote gets once, above the interface: retries, a metadata cache, a pool.

Backends only sort their failures into the error hierarchy (``RemoteUnavailable``
means "transient, worth retrying"); everything here works on any ``Remote``.
Stack them with ``wrap_remote``.
"""
from __future__ import annotations

import hashlib
import os
import random
import secrets
import struct
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from chunkvault.errors import ChunkvaultError, ObjectExists, ObjectNotFound, RemoteRetryWarning, RemoteUnavailable
from chunkvault.localfiles import make_private_dirs, read_regular, remove_if_stale

from .base import ObjectInfo, Remote, validate_key

T = TypeVar("T")
R = TypeVar("R")

#: Errors worth another attempt.  Remotes map their transport failures to
#: RemoteUnavailable; bare connection/timeout errors that slip through count too.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RemoteUnavailable, ConnectionError, TimeoutError)


def backoff_delay(attempt: int, base_delay: float, max_delay: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2**attempt)]."""
    return rng.uniform(0.0, min(max_delay, base_delay * (2**attempt)))


class StopRequest:
    """A command told to stop (Ctrl-C, SIGTERM) retries no longer for minutes.  Its uploads in flight are
    waited for before its lock is released, and a remote that stalls had them retry for up to ``timeout``
    each: past a service manager's stop timeout, into SIGKILL.  Once requested, a wait between attempts
    ends at once, and attempts are started only within ``grace`` seconds of the request or of the last
    operation that succeeded since: a remote that answers, however slowly, still gets the index of what
    was stored whole and the lock's removal; one that has answered nothing for ``grace`` seconds gets no
    new attempt."""

    def __init__(self, grace: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 parent: "StopRequest | None" = None):
        """``parent``: a request of its (the process's, made on Ctrl-C) is this one's too; one of this one's
        (one repository's operations told to stop) is not the parent's."""
        self.grace = grace
        self._clock = clock
        self._event = threading.Event()
        self._at = 0.0
        self._parent = parent
        self._children: weakref.WeakSet[StopRequest] = weakref.WeakSet()
        if parent is not None:
            parent._children.add(self)
            if parent.requested():
                self.request()

    def requested(self) -> bool:
        return self._event.is_set()

    def _live_children(self) -> list["StopRequest"]:
        """The children now: a copy of the weak set's references taken in one step, safe while another thread
        adds one (iterating the set then could fail, in a signal handler too)."""
        return [child for ref in self._children.data.copy() if (child := ref()) is not None]

    def request(self) -> None:
        if not self._event.is_set():
            self._at = self._clock()
            self._event.set()
        for child in self._live_children():
            child.request()

    def clear(self) -> None:
        """Withdraw the request, unless the parent's stands (threads a stopped command left behind go on
        retrying no longer); the children's with it."""
        if self._parent is None or not self._parent.requested():
            self._event.clear()
        for child in self._live_children():
            child.clear()

    def answered(self) -> None:
        """An operation succeeded: the remote still answers, so the grace starts again."""
        if self._event.is_set():
            self._at = self._clock()

    def left(self) -> float | None:
        """Seconds of retrying left since the stop was requested; None when none was."""
        if not self._event.is_set():
            return None
        return self.grace - (self._clock() - self._at)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was requested (at once if it was before)."""
        return self._event.wait(seconds)

    def sleep(self, seconds: float) -> None:
        """Sleep, or less once a stop is requested meanwhile."""
        if not self._event.is_set():
            self._event.wait(seconds)
        else:
            time.sleep(max(0.0, min(seconds, self.left() or 0.0)))


#: The process's stop request: the command layer makes it when told to stop, and clears it when done.
stop_request = StopRequest()


#: Seconds one operation keeps retrying a remote that answered before (restic's window too): the restart of a
#: router, a service or a NAT gateway, not a remote gone for good.
OUTAGE_SECONDS = 900.0

#: Seconds between two retry warnings of one remote: a remote that is down fails on every thread at once.
RETRY_WARNING_INTERVAL = 10.0


class RetryingRemote(Remote):
    """Retries transient failures of ``inner`` with exponential backoff and full jitter.

    Only transient errors are retried; ObjectNotFound, ObjectExists, PermissionDenied,
    StorageFull, UsageError and the like pass straight through.  An operation gives up
    after ``attempts`` attempts or ``timeout`` seconds (attempts plus waits), whichever
    comes first: a remote that is wrongly named or down is said so within a minute.
    Once the remote has answered, an operation also keeps trying for ``outage``
    seconds from its start: a link that drops in the middle of an hours-long upload is
    waited for (the minutes a router or a service takes to restart) instead of failing
    the command, which would start again from its last index.  Each attempt's own
    duration is bounded by the backend's socket timeouts.  With ``verify_reads``
    a read shorter than the object is treated as a cut-off transfer and retried
    (costs one stat per whole-object read, and one per short ranged read).
    """

    def __init__(
        self,
        inner: Remote,
        *,
        attempts: int = 8,
        base_delay: float = 0.2,
        max_delay: float = 15.0,
        timeout: float | None = 300.0,
        outage: float | None = 0.0,
        verify_reads: bool = True,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        stop: StopRequest | None = None,
    ):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.display_url = inner.display_url
        self.fork_safe = inner.fork_safe
        self.cheap_ranges = inner.cheap_ranges
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.outage = outage
        self.answered = False  # the remote has answered an operation of this process: its outages are waited for
        self.verify_reads = verify_reads
        self.stop = stop_request if stop is None else stop
        self._sleep = self.stop.sleep if sleep is None else sleep
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._clock = clock
        self.retries = 0  # transient failures absorbed so far (all threads)
        self._warned_at: float | None = None
        self._unreported = 0  # retries since the last warning

    def _gives_up(self, made: int, start: float, at: float) -> bool:
        """Whether an operation started at ``start`` that has failed ``made`` times stops retrying rather than
        try again at ``at``: past its attempts or its timeout, and, once the remote has answered, past the
        outage it is waited for too."""
        spent = made >= self.attempts or (self.timeout is not None and at > start + self.timeout)
        if not spent or not self.answered:
            return spent
        return self.outage is not None and at > start + self.outage

    def _outage_left(self, start: float, now: float) -> float | None:
        """Seconds an operation started at ``start`` keeps retrying an outage from ``now`` (inf: for ever);
        None while its attempts decide instead."""
        if not self.answered:
            return None
        if self.outage is None:
            return float("inf")
        return start + self.outage - now if start + self.outage > now else None

    def _answer(self) -> None:
        self.answered = True
        self.stop.answered()

    def _report(self, what: str, made: int, delay: float, error: BaseException, left: float | None,
                asked: bool = False) -> None:
        """Say that the remote fails and is tried again: a stalled remote otherwise kept a command silent
        for the minutes its retries may take.  Silent once a stop is requested: the command says how it
        ended, and a thread it left retrying would print the warning past it, raw, past its printer."""
        if self.stop.left() is not None:
            return
        now = self._clock()
        with self._rng_lock:
            if self._warned_at is not None and now - self._warned_at < RETRY_WARNING_INTERVAL:
                self._unreported += 1
                return
            self._warned_at, others, self._unreported = now, self._unreported, 0
        more = f"; {others} other retr{'y' if others == 1 else 'ies'} since the last message" if others else ""
        where = "" if self.display_url in str(error) else f"{self.display_url}: "
        if left is None:
            budget = f"attempt {made + 1} of {self.attempts}"
        elif left == float("inf"):
            budget = f"attempt {made + 1}, without end"
        else:
            span = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
            # both must be spent (``_gives_up``): the attempts' backoff may outlast a short outage time
            budget = (f"attempt {made + 1}; giving up in {span}" if made >= self.attempts
                      else f"attempt {made + 1}; giving up after at least {span} and {self.attempts} attempts")
        when = f"in {delay:.1f} s" if delay >= 0.05 else "now"  # a first retry's jitter: "in 0.0 s" read oddly
        if asked:
            when += " as its Retry-After asks"
        warnings.warn(f"{where}{what} failed ({error}); retrying {when} ({budget}){more}",
                      RemoteRetryWarning, stacklevel=4)

    def _delay(self, attempt: int) -> float:
        with self._rng_lock:
            return backoff_delay(attempt, self.base_delay, self.max_delay, self._rng)

    def _run(self, op: str, key: str, fn: Callable[[int], T]) -> T:
        """Call ``fn(attempt)`` until it succeeds, a permanent error occurs, or we give up."""
        start = self._clock()
        last: BaseException | None = None
        made = 0
        asked_in_all = 0.0  # the waits a Retry-After asked for, made
        refused: float | None = None  # a wait a Retry-After asked for past the time left to retry
        while True:
            left = self.stop.left()
            if left is not None and left <= 0:
                break  # each attempt may take the socket timeouts: none is started past the grace
            try:
                done = fn(made)
            except TRANSIENT_ERRORS as exc:
                last = exc
                if getattr(exc, "answered", False):
                    self.answered = True  # (the grace of a stop is for answers that serve, not for these)
            except ChunkvaultError:  # an answer all the same (not found, refused)
                self._answer()
                raise
            else:
                self._answer()
                return done
            finally:
                made += 1
            delay = self._delay(min(made - 1, 62))
            now = self._clock()
            # A remote that says when to come back (HTTP's Retry-After) is left alone that long: trying sooner only
            # spent the attempts on answers that were sure to be the same.
            asked = getattr(last, "retry_after", None)
            if asked is not None and asked > delay:
                if self._gives_up(made, start, now + asked) and not self._gives_up(made, start, now + delay):
                    refused = asked  # a wait we will not make: said at once, not tried again sooner than asked
                    break
                delay = asked
            else:
                asked = None
            if self._gives_up(made, start, now + delay):
                break
            left = self.stop.left()
            if left is not None:
                if left <= 0:
                    break
                delay = min(delay, left)
            with self._rng_lock:
                self.retries += 1
            self._report(f"{op} {key}" if key else op, made, delay, last, self._outage_left(start, now),
                         asked is not None)
            if asked is not None:
                asked_in_all += delay
            self._sleep(delay)
        what = f"{op} {key}" if key else op
        if self.stop.left() is not None:
            error = RemoteUnavailable(f"{what} on {self.display_url} given up after {made} attempt(s): the command "
                                      f"was told to stop" + (f"; last error: {last}" if last else ""))
        else:
            waits = ""
            if refused is not None:
                waits = f": it asked to wait {refused:.0f} s (Retry-After), past the time left to retry"
            elif asked_in_all:
                waits = f" (after waiting {asked_in_all:.0f} s in all as its Retry-After asked)"
            error = RemoteUnavailable(f"{self.display_url} is unavailable: {what} failed {made} time(s), giving up"
                                      f"{waits}; last error: {last}")
        error.remote = self.display_url
        raise error from last

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        validate_key(key)

        def attempt(n: int) -> None:
            try:
                self.inner.put(key, data, if_absent=if_absent)
            except ObjectExists:
                # An earlier attempt may have landed before its reply was lost:
                # finding exactly our bytes there means that attempt succeeded.
                if n > 0 and self._holds(key, data):
                    return
                raise

        self._run("put", key, attempt)

    def _holds(self, key: str, data: bytes) -> bool:
        try:
            return self.get(key) == bytes(data)
        except ObjectNotFound:
            return False

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        validate_key(key)

        def attempt(_: int) -> bytes:
            data = self.inner.get(key, start, length)
            if self.verify_reads and (length is None or len(data) < length):
                self._check_complete(key, start or 0, length, data)
            return data

        return self._run("get", key, attempt)

    def _check_complete(self, key: str, start: int, length: int | None, data: bytes) -> None:
        info = self.inner.stat(key)
        if info is None:
            raise ObjectNotFound(key)
        want = max(0, info.size - start) if length is None else max(0, min(length, info.size - start))
        if len(data) != want:
            raise RemoteUnavailable(f"read of {key} cut short: {len(data)} of {want} bytes")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # A listing that fails halfway is restarted whole, so it is collected first.
        return iter(self._run("list", prefix, lambda _: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        validate_key(key)
        self._run("delete", key, lambda _: self.inner.delete(key))

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        return self._run("stat", key, lambda _: self.inner.stat(key))

    @property
    def max_object_size(self) -> int | None:
        return self.inner.max_object_size

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        return self._run("cleanup of unfinished writes", "", lambda _: self.inner.cleanup_temp(older_than))

    def enclosing_repository(self) -> str | None:
        return self._run("look above the repository", "", lambda _: self.inner.enclosing_repository())

    def close(self) -> None:
        self.inner.close()


_CACHE_MAGIC = b"CVCACHE1"
# A rewritable object's entry (its version, then its bytes) under a magic of its own: a chunkvault from before
# versioned entries served whatever CVCACHE1 entry stood at a snapshot's path as the snapshot, so after a
# downgrade it took each one for a damaged snapshot; it discards an entry of another magic and fetches instead.
# A CVCACHE1 entry at a rewritable object's path (written so before) is discarded likewise, and fetched again.
_VERSIONED_MAGIC = b"CVCACHEV"
_CACHE_HEADER = struct.Struct(">8sQ16s")  # magic, size, blake2b-128 of the content
_CACHE_TEMP = ".tmp-"


CACHE_MARK_EVERY = 86400.0  # seconds between a long-lived process's marks of its cache directory as used


class CachingRemote(Remote):
    """Keeps metadata objects (index, snapshots, archived WAL files) on local disk.

    Index keys are content hashes, so a cached entry never goes stale.  A key
    under ``rewritable`` (snapshots: a forget rebases a differential, ``tag``
    and ``rewrite`` change one, in place, from any client; a WAL file's name
    expired and archived again) is served from the cache only when the latest
    listing gave the object a version (``ObjectInfo``) and the entry records
    that same version; where the backend's listing gives none, such objects
    are always fetched.  Nor is an index entry of another size than the
    latest listing gives its object: the stored object was cut short or
    replaced since, and a copy read in its place would hide that from this
    client alone.  Each key has one entry, so a write or delete drops it
    without a look at its neighbours (an archive holds tens of thousands).
    ``delete`` drops an entry, ``list`` and ``stat`` always ask the inner remote.  Each cache file
    records the object's size and digest: a truncated or damaged file is
    discarded and fetched again, never returned.  ``cache_dir`` should be private
    to one repository.
    """

    def __init__(self, inner: Remote, cache_dir: str | os.PathLike, *,
                 prefixes: Iterable[str] = ("index/", "snapshots/", "wal/"),
                 rewritable: Iterable[str] = ("snapshots/", "wal/")):
        self.inner = inner
        self.display_url = inner.display_url
        self.fork_safe = inner.fork_safe
        self.cheap_ranges = inner.cheap_ranges
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.prefixes = tuple(prefixes)
        self.rewritable = tuple(rewritable)
        self._versions: dict[str, str] = {}  # rewritable key -> its version in the latest listing
        self._sizes: dict[str, int] = {}  # other cached key -> its size in the latest listing
        self._lock = threading.Lock()
        self._marked = time.monotonic()  # when the directory was last marked used (opening it marks it)
        self.hits = 0
        self.misses = 0
        self.discarded = 0

    def cacheable(self, key: str) -> bool:
        return key.startswith(self.prefixes)

    def _path(self, key: str) -> str:
        return os.path.join(self.cache_dir, *validate_key(key).split("/"))

    def _forget_version(self, key: str) -> None:
        """Drop what is known of a rewritable ``key`` (its own write or delete makes it stale)."""
        with self._lock:
            self._versions.pop(key, None)
        self._remove(self._path(key))

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _load(self, path: str, magic: bytes = _CACHE_MAGIC) -> bytes | None:
        try:
            raw = read_regular(path)
        except OSError:
            return None
        data = decode_cache_entry(raw, magic)
        if data is None:
            self._count("discarded")
            self._remove(path)
        return data

    def _store(self, path: str, data: bytes, magic: bytes = _CACHE_MAGIC) -> None:
        """Atomic write (temp + rename); a failing cache never fails the operation.  Directories 0700 and
        entries 0600 whatever the umask: they are copies of the repository's objects, which it stores so."""
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, _CACHE_TEMP + secrets.token_hex(8))
        try:
            make_private_dirs(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(encode_cache_entry(data, magic))
            os.replace(tmp, path)
        except OSError:
            self._remove(tmp)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith(self.rewritable):
            self._forget_version(key)  # its new version is known at the next listing
        self.inner.put(key, data, if_absent=if_absent)
        if self.cacheable(key) and not key.startswith(self.rewritable):
            self._store(self._path(key), bytes(data))

    def drop_cached(self, key: str) -> None:
        if self.cacheable(validate_key(key)):
            self._count("discarded")
            self._remove(self._path(key))

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        if not self.cacheable(validate_key(key)):
            return self.inner.get(key, start, length)
        self._mark_used()
        with self._lock:
            version, size = self._versions.get(key), self._sizes.get(key)
        if version is None and key.startswith(self.rewritable):  # no listing vouches for a cached copy
            self._count("misses")
            return self.inner.get(key, start, length)
        path = self._path(key)
        data = self._load(path, _CACHE_MAGIC if version is None else _VERSIONED_MAGIC)
        if data is not None and version is not None:
            data = _unversioned(data, version)
        elif data is not None and size is not None and len(data) != size:  # not the object stored now
            self._count("discarded")
            data = None
        if data is None:
            self._count("misses")
            data = self.inner.get(key)
            # a rewrite since the listing makes this newer than its version: harmless
            if version is None:
                self._store(path, data)
            else:
                self._store(path, _versioned(version, data), _VERSIONED_MAGIC)
        else:
            self._count("hits")
        if start is None and length is None:
            return data
        lo = start or 0
        return data[lo : None if length is None else lo + length]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not any(c.startswith(prefix) or prefix.startswith(c) for c in self.prefixes):
            return self.inner.list(prefix)
        self._mark_used()
        return self._noting(prefix, self.inner.list(prefix))

    def _mark_used(self) -> None:
        """Keep the directory's mtime, its last use, within a day for a process open for weeks (a mount, an
        embedding service) as it lists or reads: a cache directory unused for a month is removed by the next
        command to start."""
        now = time.monotonic()
        if now - self._marked < CACHE_MARK_EVERY:
            return
        self._marked = now
        try:
            os.utime(self.cache_dir)
        except OSError:  # not made yet: its first entry makes it
            pass

    def _noting(self, prefix: str, listing: Iterator[ObjectInfo]) -> Iterator[ObjectInfo]:
        """The listing, noting each rewritable object's version; once it is read to its end, the entries
        of cached objects under ``prefix`` that it no longer holds are removed (another machine's prune
        replaced the index, a forget removed snapshots: the cache would otherwise grow for ever)."""
        listed = set()
        for info in listing:
            listed.add(info.key)
            if info.key.startswith(self.rewritable):
                with self._lock:
                    if info.version is None:
                        self._versions.pop(info.key, None)
                    else:
                        self._versions[info.key] = info.version
            elif self.cacheable(info.key):
                with self._lock:
                    self._sizes[info.key] = info.size
            yield info
        for cached in self.prefixes:
            if cached.startswith(prefix) and cached.endswith("/"):
                self._drop_unlisted(cached, listed)

    def _drop_unlisted(self, prefix: str, listed: set[str]) -> None:
        top = os.path.join(self.cache_dir, *prefix.rstrip("/").split("/"))
        for dirpath, _, names in os.walk(top):
            rel = os.path.relpath(dirpath, self.cache_dir).replace(os.sep, "/")
            for name in names:
                if name.startswith(_CACHE_TEMP):  # another process's write in progress, or a killed one's
                    remove_if_stale(os.path.join(dirpath, name))
                    continue
                if f"{rel}/{name}" not in listed:  # with "@": an entry of the layout before one per key
                    self._remove(os.path.join(dirpath, name))

    def delete(self, key: str) -> None:
        if key.startswith(self.rewritable):
            self._forget_version(validate_key(key))
        elif self.cacheable(validate_key(key)):
            self._remove(self._path(key))
        self.inner.delete(key)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    @property
    def max_object_size(self) -> int | None:
        return self.inner.max_object_size

    def uncached(self) -> Remote:
        return self.inner.uncached()

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        return self.inner.cleanup_temp(older_than)

    def enclosing_repository(self) -> str | None:
        return self.inner.enclosing_repository()

    def close(self) -> None:
        self.inner.close()


_VERSION_LENGTH = struct.Struct(">H")


def _versioned(version: str, data: bytes) -> bytes:
    """A rewritable object's entry content: the version it was cached under, then its bytes."""
    tag = version.encode()[:0xFFFF]  # a version of more is never seen: such an entry is simply not served
    return _VERSION_LENGTH.pack(len(tag)) + tag + data


def _unversioned(content: bytes, version: str) -> bytes | None:
    """The object's bytes from a rewritable entry's ``content`` when it was cached under ``version``."""
    if len(content) < _VERSION_LENGTH.size:
        return None
    (length,) = _VERSION_LENGTH.unpack_from(content)
    start = _VERSION_LENGTH.size + length
    return content[start:] if content[_VERSION_LENGTH.size:start] == version.encode() else None


def encode_cache_entry(data: bytes, magic: bytes = _CACHE_MAGIC) -> bytes:
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return _CACHE_HEADER.pack(magic, len(data), digest) + data


def decode_cache_entry(raw: bytes, magic: bytes = _CACHE_MAGIC) -> bytes | None:
    """The cached bytes, or None when the entry is truncated, padded, damaged or not of ``magic``'s kind."""
    if len(raw) < _CACHE_HEADER.size:
        return None
    found, size, digest = _CACHE_HEADER.unpack_from(raw)
    data = raw[_CACHE_HEADER.size :]
    if found != magic or size != len(data):
        return None
    if hashlib.blake2b(data, digest_size=16).digest() != digest:
        return None
    return data


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 8,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, results yielded in input order.

    At most ``max_in_flight`` items (default ``2 * workers``) are taken from
    ``items`` and not yet yielded, so a slow consumer or a slow item bounds memory.
    The first failure (in time) stops new submissions, waits for running calls,
    and is raised; items not yet started are dropped.  Closing the iterator early
    does the same cleanup.  Work starts at the first ``next()``.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    limit = max_in_flight or 2 * workers
    if limit < 1:
        raise ValueError("max_in_flight must be at least 1")
    return _parallel_map(fn, iter(items), workers, limit)


def _parallel_map(fn: Callable[[T], R], items: Iterator[T], workers: int, limit: int) -> Iterator[R]:
    changed = threading.Condition()
    failure: list[BaseException] = []

    def on_done(future: Future) -> None:
        with changed:
            if not future.cancelled() and future.exception() is not None and not failure:
                failure.append(future.exception())
            changed.notify_all()

    pending: deque[Future] = deque()
    exhausted = False
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunkvault-transfer")
    try:
        while True:
            while not exhausted and not failure and len(pending) < limit:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    break
                future = pool.submit(fn, item)
                future.add_done_callback(on_done)
                pending.append(future)
            if not pending:
                return
            head = pending[0]
            with changed:
                while not head.done() and not failure:
                    changed.wait()
            if failure:
                break
            pending.popleft()
            yield head.result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
    raise failure[0]


def wrap_remote(
    remote: Remote,
    *,
    cache_dir: str | os.PathLike | None = None,
    cache_prefixes: Iterable[str] = ("index/", "snapshots/", "wal/"),
    attempts: int = 8,
    base_delay: float = 0.2,
    max_delay: float = 15.0,
    timeout: float | None = 300.0,
    outage: float | None = OUTAGE_SECONDS,
    verify_reads: bool | None = None,
    stop: StopRequest | None = None,
) -> Remote:
    """The stack the store uses: retries around the backend, the cache (if any) on top,
    so cache misses are retried and cache hits never touch the network.  ``stop``: the request that ends
    its retries (default: the process's)."""
    if verify_reads is None:
        verify_reads = not remote.checks_read_length
    wrapped: Remote = RetryingRemote(
        remote, attempts=attempts, base_delay=base_delay, max_delay=max_delay, timeout=timeout, outage=outage,
        verify_reads=verify_reads, stop=stop,
    )
    if cache_dir is not None:
        wrapped = CachingRemote(wrapped, cache_dir, prefixes=cache_prefixes)
    return wrapped
