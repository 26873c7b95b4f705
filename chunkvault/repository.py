"""The public Python API: what a backup tool uses instead of the CLI.

    repo = Repository.init("/srv/backups", password="...")
    snap = repo.backup(["/var/lib/db"], tags=["nightly"])
    repo.restore("latest", "/tmp/restored")
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import functools
import io
import itertools
import math
import os
import re
import stat
import sys
import threading
import time
import unicodedata
import warnings
from datetime import datetime, timedelta, timezone, tzinfo
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Callable, ContextManager, Iterable, Iterator, Mapping, Sequence

import blake3

from .errors import (AmbiguousSnapshot, ChunkvaultError, CorruptObject, Locked, MissingObject, NewerObject,
                     OutputClosed, PermissionDenied, RemoteError, RollbackDetected, SnapshotNotFound, Stopped,
                     StorageFull, TargetNotEmpty, TargetUnwritable, UsageError, VerificationFailed, output_error)
from .ledger import Ledger, RepositoryStateWarning, present_of, remedy
from .store.ledger import UNREADABLE
from .connection import connect, key_ahead_dir, key_ahead_path
from .display import shown_name
from .units import parse_share, parse_size
from .remotes import Remote, url_scheme
from .remotes.layer import StopRequest, stop_request
from .chunker import FIXED_CHUNK_SIZE, UNKEYED_SECRET
from .store.backup import Backup, BackupOptions, BackupResult, Listed, check_stdin_name
from .store.chain import broken_chains, with_ancestors
from .store.find import as_file
from .store.config import Settings, check_kdf_seconds, check_settings
from .store.crypto import KEY_SIZE
from .store.manifest import T_DIR, T_FILE, T_HARDLINK, Entry, Record, unread
from .store.objects import BlobInfo, unique_name
from .store.repository import NOT_INDEXED, AheadWalk, Repo, pack_key
from .store.confinement import confined
from .store.subtree import Subtree, in_subtree
from .store.target_lock import await_target, holding, left_after, target_held
from .store.restore import (Relocation, Restorer, RestoreOptions, RestoreResult, check_content, check_overwrite,
                            include_directory, link_relocated, merged_results, refuse_overlap)
from .store.owners import OwnerMap, chain_names
from .store.snapshot import (Snapshot, SnapshotFinder, check_local_zone, find_snapshot, parse_time, parse_until,
                             said_time, select_snapshots)
from .localfiles import absolute_path
from .store.source import SourceWalk, markers_of
from .store import locks
from .store import keyahead
from .store.keyahead import KeyAhead
from .store.locks import LockInfo
from .store.unlock import Unlocked, require_openable, unlock

if TYPE_CHECKING:  # the modules of other commands load when used: a backup need not import them
    from .pgbackup import PostgresOnline
    from .store.check import CheckReport
    from .store.copy import CopyResult
    from .store.export import ExportStats, ImportResult
    from .store.lifecycle import Aggregated, ForgetPlan
    from .store.locks import LocksRemoved
    from .store.prune import PrunePlan
    from .store.repair import RepairReport
    from .store.retention import RetentionPolicy
    from .store.find import Found
    from .store.keyexport import KeyImport
    from .store.rewrite import RewriteReport
    from .store.stats import RepositoryStats
    from .store.usage import SnapshotUsage
    from .store.walarchive import PushResult, WalFile
    from .archivecheck import ArchiveCheck

__all__ = ["Repository", "Snapshot", "Entry", "SourceWalk"]


def _password(password: str | bytes) -> bytes:
    if isinstance(password, str):
        return password.encode()
    if not isinstance(password, bytes):
        raise UsageError(f"a password is a str or bytes, not {type(password).__name__}")
    return password


def _tell_dated_ahead(snap: Snapshot) -> None:
    """Warn when ``latest`` is dated ahead of this clock.  It goes by the snapshots' times, as restic's and
    borg's do: one taken while a clock ran ahead stays the latest until the clock reaches its date, and
    the snapshots saved since, dated before it, hold newer data that ``latest`` would silently pass over."""
    from .store.retention import AHEAD

    if snap.datetime > datetime.now(timezone.utc) + AHEAD:
        warnings.warn(f"snapshot {snap.id[:8]}, the latest, is dated {snap.time[:19].replace('T', ' ')} UTC, ahead "
                      "of this machine's clock (taken while a clock ran ahead, or this one is behind): snapshots "
                      "saved since may be dated before it and hold newer data (name one by id)",
                      RepositoryStateWarning, stacklevel=3)


def _time(value: str | datetime | float | None) -> datetime | None:
    """A time given as text (ISO 8601), as a datetime (local time when it has no zone), or as seconds
    since the epoch (``time.time()``)."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_time(value)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise UsageError(f"{value!r} seconds since the epoch is no time this system can hold") from None
    raise UsageError(f"a time is an ISO 8601 string, a datetime or seconds since the epoch, not {value!r}")


def _wait(value: Any) -> float:
    """Seconds to wait for a lock, checked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise UsageError(f"wait takes seconds (0 or more), not {value!r}")
    return float(value)


def _listed(value: Any) -> list[Any]:
    """A list of what ``value`` holds; a single string (or Snapshot) is one item. Iterating a string would
    make each character a glob, tag or id: ``includes="etc/*"`` would restore nearly everything."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, os.PathLike, Snapshot)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise UsageError(f"expected a string or a list of them, not {value!r}") from None


def _texts(values: Any, what: str) -> list[str]:
    """``_listed``, each a non-empty str: a tag or host of another type was stored, and then broke every
    listing of the repository."""
    out = _listed(values)
    for v in out:
        if not isinstance(v, str) or not v:
            raise UsageError(f"each {what} must be a non-empty string, not {v!r}")
        if what == "tag" and "," in v:
            raise UsageError(f"a tag cannot hold a comma ({v!r}): the command line takes a,b as two tags")
    return out


def _globs(values: Any, what: str) -> list[str]:
    """Globs as str (bytes and path objects decoded as file names are)."""
    out = []
    for v in _listed(values):
        if isinstance(v, (bytes, os.PathLike)):
            v = os.fsdecode(v)
        if not isinstance(v, str):
            raise UsageError(f"each {what} is a glob (a str or bytes), not {v!r}")
        out.append(v)
    return out


def _host(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise UsageError(f"host must be a non-empty string, not {value!r}")
    return value


def _stream_options(kind: str, tags: list[str] | None, host: str | None, delta: bool,
                    fixed_chunks: list[str] | None, fixed_chunk_size: int, dry_run: bool,
                    time: str | datetime | None, wait: float, progress: Any,
                    compression_level: int | None = None) -> BackupOptions:
    """A stream backup's options (``backup_stream``, ``backup_command``), checked."""
    if progress is not None and not callable(progress):
        raise UsageError(f"progress is a function, not {progress!r}")
    return BackupOptions(kind=kind, tags=_texts(tags, "tag"), host=_host(host), delta=delta,
                         fixed_chunks=_globs(fixed_chunks, "fixed_chunks"),
                         fixed_chunk_size=parse_size(fixed_chunk_size), dry_run=dry_run, time=_time(time),
                         lock_wait=_wait(wait), progress=progress,
                         compression_level=_compression_level(compression_level))


def _compression_level(level: Any) -> int | None:
    """A backup's own zstd level, checked (None: the repository's)."""
    from .store.config import check_compression_level

    if level is not None:
        check_compression_level(level)
    return level


def check_one_line(tags: Iterable[str], host: str | None = None) -> None:
    """Refuse tags or a host to store that hold a control character or a line break: they would split a
    listing's row (one stored before is still selected by it, and removed by ``tag``); or bytes that are not
    UTF-8 (a command line's, held as lone surrogates): JSON gives them to other languages as U+FFFD, a name
    that then selects nothing, and has no ``_b64`` field for them as for file names.  The value refused is
    shown as a listing shows a name (``\\xHH``: a byte that is not UTF-8), not as Python's repr (``\\udcHH``
    for such a byte, and ``\\xHH`` for a C1 control that is UTF-8)."""
    for what, v in [*(("tag", t) for t in tags), *([("host", host)] if host else [])]:
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") for c in v):
            raise UsageError(f"a {what} is one line of text (UTF-8) without control characters, "
                             f"not '{shown_name(v)}'")
        if v != v.strip():  # --tag "nightly, pg" stored " pg", which --tag pg then never selected
            raise UsageError(f"a {what} has no space at either end (a selection by its name would not find it), "
                             f"not '{shown_name(v)}'" + (": write --tag a,b for two tags" if what == "tag" else ""))
        if any(_invisible(c) for c in v):  # "nightly" with a BOM pasted in: listed as nightly, selected by nothing
            shown = "".join(f"\\u{ord(c):04x}" if _invisible(c) else c for c in shown_name(v))
            raise UsageError(f"a {what} holds no invisible character (a listing would show it without, and a "
                             f"selection typed as shown would not find it), not '{shown}'")


def _invisible(c: str) -> bool:
    """A format character (a byte order mark, a zero-width space, a direction mark) but the zero-width joiner,
    which joins emoji."""
    return unicodedata.category(c) == "Cf" and c != "\u200d"


def _postgres_session(postgres: object, paths: list[str], walk: SourceWalk | None,
                      checkpoint: object = None, standby_wait: object = None) -> PostgresOnline:
    """The base backup mode around a backup of one data directory; a walk begun earlier would have looked at
    files before the backup mode began."""
    if not isinstance(postgres, str) or "\n" in postgres:
        raise UsageError(f"postgres is a connection string or database name (\"\" for the PG* variables), "
                         f"not {postgres!r}")
    if walk is not None:
        walk.close()
        raise UsageError("postgres: the walk must begin once the base backup has: give no walk")
    if len(paths) != 1:
        raise UsageError("postgres backs up one data directory: give its path alone")
    from .pgbackup import PostgresOnline, checkpoint_fast
    from .pgsession import STANDBY_WAIT

    if standby_wait is None:
        standby_wait = STANDBY_WAIT
    elif isinstance(standby_wait, bool) or not isinstance(standby_wait, (int, float)) or not 0 < standby_wait < 1e9:
        raise UsageError(f"pg_standby_wait is a number of seconds above 0, not {standby_wait!r}")
    return PostgresOnline(paths[0], postgres or None, fast=checkpoint_fast(checkpoint), standby_wait=standby_wait)


def _paths(values: Any, what: str = "path to back up") -> list[str]:
    """Paths as str (bytes and path objects too: a bytes path was read and stored in full, and then the
    snapshot could not be saved; as a filter, one selected nothing)."""
    out = []
    for v in _listed(values):
        if isinstance(v, (bytes, os.PathLike)):
            v = os.fsdecode(v)
        if not isinstance(v, str) or not v:
            raise UsageError(f"a {what} must be a non-empty string, bytes or path, not {v!r}")
        out.append(v)
    return out


def _filters(hosts: Any, tags: Any, paths: Any) -> dict[str, list[str]]:
    """``select_snapshots``' filters, checked: hosts and tag groups ("a,b": both) as str, paths as ``_paths``
    (a bytes path selected nothing, and a retention policy then kept everything)."""
    return {"hosts": _texts(hosts, "host"), "tags": _texts(tags, "tag group"),
            "paths": _paths(paths, "path to select by")}


def _spec(snapshot: Any) -> Any:
    """A snapshot named by a Snapshot object, as by its id."""
    return snapshot.id if isinstance(snapshot, Snapshot) else snapshot


def _forgotten_since(snap: Snapshot) -> SnapshotNotFound:
    """A Snapshot object looked up again and gone: another command forgot it in between (a forget run while a
    restore of ``latest`` took its lock).  Named as the one looked up, not by a 64-digit id the user never gave."""
    return SnapshotNotFound(f"snapshot {snap.short_id} of {snap.host}:{','.join(snap.paths) or snap.stdin_name or '-'} "
                            f"({said_time(snap.datetime)}) is no longer in the repository: another command forgot "
                            "it after this one looked it up")


def _named(snapshots: Any) -> list[Any] | None:
    """The snapshots named (``_listed``), or None for none named (then the filters alone choose)."""
    return None if snapshots is None else _listed(snapshots)


def _check_remote_options(options: Mapping[str, Any]) -> None:
    """UsageError for a rate limit that is not a positive number of bytes per second."""
    for name in ("limit_upload", "limit_download"):
        rate = options.get(name)
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise UsageError(f"{name} must be a positive number of bytes per second, not {rate!r}")


def snapshot_path(path: str | bytes) -> bytes:
    """A path as a user gives it (``/etc/x``, ``etc/x/``, ``./etc//x``) as the snapshot names it (``etc/x``;
    the root is empty).  A snapshot's paths hold no "." or ".." components, so normalising changes no name."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise UsageError(f"a path in a snapshot is a str or bytes, not {path!r}")
    norm = os.path.normpath(os.fsencode(path) or b".").strip(b"/")
    return b"" if norm == b"." else norm


def split_subtree(spec: str) -> tuple[str, bytes | None]:
    """``SNAPSHOT:PATH`` as (SNAPSHOT, PATH as the snapshot names it: ``b""`` for ``latest:`` or ``latest:/``,
    the whole snapshot); a name without ``:`` as (name, None).  Ids are hex and ``latest`` has no ``:``, so
    the first ``:`` ends the snapshot's name, and PATH may hold more."""
    name, colon, path = spec.partition(":")
    if not colon:
        return spec, None
    if not name.strip():
        raise UsageError(f"{spec!r}: name the snapshot before the ':' (an id, a unique prefix or latest, e.g. "
                         f"latest{spec})")
    return name, snapshot_path(path)


def _announce_wait(holder: LockInfo, wait: float, label: str = "repository") -> None:
    """What a command says once, before it waits for another's lock: for one it can judge by age only (another
    host's), also how long until it goes stale and how to remove it, as a refusal says."""
    note = holder.stale_note(waiting=True) if holder.judged_by_age_only() else ""
    warnings.warn(f"waiting up to {wait:g} s: {label} is locked by {holder.describe()}{note}",
                  RepositoryStateWarning, stacklevel=4)


locks.announce_wait = _announce_wait


def _count(value: Any) -> int | None:
    """A count a snapshot's stats give, if it is one (the stats are only ever advisory)."""
    return value if type(value) is int and value >= 0 else None


def _check_ledger(where: Any) -> None:
    if not isinstance(where, (bool, str, os.PathLike)) or where == "":
        raise UsageError(f"ledger is True, False or a directory, not {where!r}")


def _file_path(path: Any, what: str) -> None:
    if not isinstance(path, (str, bytes, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"the {what} is named by a path, not {path!r}")


@contextlib.contextmanager
def _closed_on_failure(remote: Remote, given: Any) -> Iterator[None]:
    """Close the remote connected here (not one the caller gave) when opening or creating the repository on
    it fails: a wrong password or a refused init left its connection (an ssh process, a paramiko thread)."""
    try:
        yield
    except BaseException:
        if remote is not given:
            remote.close()
        raise


def _ledger_for(repo: Repo, where: bool | str | os.PathLike[str]) -> Ledger | None:
    """True: the default location ($XDG_STATE_HOME/chunkvault/ledger); a path: that directory; False: none."""
    if where is False:
        return None
    return Ledger.at(None if where is True else os.fspath(where), repo.config.repo_id)


class _Operation:
    """One running call of the API (a thread's outermost), in each repository it uses: what ``stop`` marks."""

    def __init__(self) -> None:
        self.stopped = False
        self.repositories: list["Repository"] = []
        self.on_stop: list[Callable[[], None]] = []  # what else a stop must end (the command a backup reads)

    def stop(self) -> None:
        """Marked, it stops at its next progress point; the remotes of its repositories retry no longer."""
        self.stopped = True
        for repo in list(self.repositories):
            repo._retry_stop.request()
        for end in list(self.on_stop):
            end()

    @contextlib.contextmanager
    def ending(self, end: Callable[[], None]) -> Iterator[None]:
        """Within the block, a stop also calls ``end``."""
        self.on_stop.append(end)
        try:
            if self.stopped:
                end()
            yield
        finally:
            self.on_stop.remove(end)


def _stoppable(method: Callable[..., Any]) -> Callable[..., Any]:
    """An operation: refused once the object is closed, stopped by ``Repository.stop`` (``_operation``)."""
    @functools.wraps(method)
    def run(self: "Repository", *args: Any, **kwargs: Any) -> Any:
        with self._operation():
            try:
                return method(self, *args, **kwargs)
            finally:
                self._note_rewrites()
    return run


def _edits_snapshots(method: Callable[..., Any]) -> Callable[..., Any]:
    """An operation that edits snapshots before storing them (a rebase, an aggregate, a tag, a rewrite, a
    repair): failed, it drops the snapshots loaded, for stopped between an edit and its store, it left the
    object listing the edit that was never stored.  Other operations' failures (a snapshot not found) keep
    them, and the listing other threads keep under their locks."""
    @functools.wraps(method)
    def run(self: "Repository", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._repo.drop_stale(index=False)
            raise
    return run


class Repository:
    """An open chunkvault repository.

    ``ledger`` (of ``open``/``init``) keeps this client's memory of the snapshot set, so that a
    forgotten snapshot put back or the newest ones deleted are noticed: reads warn
    (``RepositoryStateWarning``), writes raise ``RollbackDetected``, ``check`` reports them.
    """

    def __init__(self, repo: Repo, ledger: Ledger | None = None, *, lock_reads: bool = True,
                 retry_stop: StopRequest | None = None):
        self._repo = repo
        self._ledger = ledger
        repo.on_saved = self._saved
        self.lock_reads = lock_reads
        self._reading_depth = threading.local()  # per thread: one thread's read ending must not end another's lock
        # ``stop``: the operations running, and what ends their remote's retries (the one ``connect`` was
        # given).  Reentrant: ``stop`` may run in a signal handler on a thread inside ``_operation``.
        self._closed = False
        self._running: set[_Operation] = set()
        self._ops_lock = threading.RLock()
        self._ended = threading.Condition(self._ops_lock)  # notified as each operation ends (``close``)
        self._current = threading.local()  # the operation this thread runs (``_operation``)
        self._read_locks: list[Any] = []  # the locks ``reading`` blocks hold now (``close`` releases them)
        self._taking_read_locks = 0  # ``reading`` blocks taking their lock now (``close`` waits for them)
        self._retry_stop = retry_stop or StopRequest(parent=stop_request)
        # While a ``reading`` block holds the shared lock, no forget, tag or rebase changes a snapshot listed
        # under it: chains, and a Snapshot looked up by its id, come from that listing (``Repo.kept_listing``).
        # Not once another command may have taken it for stale: a forget and prune there left the listing
        # naming manifests that are gone.
        repo.listing_kept = lambda: any(not lock.may_be_lost() for lock in list(self._read_locks))
        self._indexed_listing: tuple[list[Snapshot], int, Callable[[Snapshot], list[Snapshot]]] | None = None
        self._zero_ids: Callable[[int], bytes] | None = None  # the id of n zeros, of the lengths asked last

    # --- lifecycle --------------------------------------------------------------

    @classmethod
    def init(cls, url: str | Remote, password: str | bytes, *, kdf_seconds: float = 0.5,
             chunker: dict[str, int] | None = None, compression_level: int = 3, pack_size: int | str | None = None,
             full_every: int | None = None, max_diff_share: float | None = None,
             chunker_secret: bytes | None = None, copy_chunker_from: "Repository | None" = None,
             ledger: bool | str | os.PathLike[str] = True, **remote_options: Any) -> "Repository":
        """Create a repository at ``url``; a setting no repository can work with is a UsageError, raised
        before anything is written."""
        from .chunker import ChunkerParams

        _check_ledger(ledger)
        if copy_chunker_from is not None and not isinstance(copy_chunker_from, Repository):
            raise UsageError(f"copy_chunker_from is an open Repository, not {copy_chunker_from!r}")
        if copy_chunker_from is not None:
            chunker = copy_chunker_from._repo.config.settings.chunker
            chunker_secret = copy_chunker_from._repo.material.chunker_secret
        settings = Settings(chunker=chunker or ChunkerParams().to_dict(), compression_level=compression_level)
        if pack_size is not None:
            settings.pack_size = parse_size(pack_size) if isinstance(pack_size, str) else pack_size
        if full_every is not None:
            settings.full_every = full_every
        if max_diff_share is not None:
            settings.max_diff_share = max_diff_share
        check_settings(settings)
        check_kdf_seconds(kdf_seconds)
        if chunker_secret is not None and (not isinstance(chunker_secret, bytes) or len(chunker_secret) != KEY_SIZE):
            raise UsageError(f"chunker_secret must be {KEY_SIZE} bytes (a repository's own, to copy its chunk "
                             "boundaries: copy_chunker_from gives it)")
        if chunker_secret == UNKEYED_SECRET:  # its boundaries are public: they would tell what the data is
            raise UsageError("chunker_secret must be a repository's own, not the unkeyed test secret")
        _check_remote_options(remote_options)
        retry_stop = StopRequest(parent=stop_request)
        remote = connect(url, stop=retry_stop, **remote_options)
        with _closed_on_failure(remote, url):
            repo = Repo.init(remote, _password(password), settings=settings, kdf_seconds=kdf_seconds,
                             chunker_secret=chunker_secret)
            return cls(repo, _ledger_for(repo, ledger), retry_stop=retry_stop)

    @classmethod
    def open(cls, url: str | Remote, password: str | bytes | Unlocked, *,
             ledger: bool | str | os.PathLike[str] = True, lock_reads: bool = True,
             retry_stop: StopRequest | None = None, **remote_options: Any) -> "Repository":
        """``password`` may be what ``store.unlock.unlock`` opened on the same remote already.
        ``lock_reads=False`` reads without the shared lock (see ``reading``).  ``retry_stop``: for a remote
        given as a Remote, the ``StopRequest`` its retries were built with (``connect(url, stop=...)``), so
        that ``stop`` ends them.

        Off local disk, a password's key is derived from the key file that opened ``url`` last time while
        the remote connects (``store/keyahead.py``; not with ``cache=False``, which keeps nothing locally).
        """
        _check_remote_options(remote_options)
        _check_ledger(ledger)
        if isinstance(url, (bytes, os.PathLike)):
            url = os.fsdecode(url)
        retry_stop = retry_stop or StopRequest(parent=stop_request)
        secret = None if isinstance(password, Unlocked) else _password(password)
        ahead = None
        if secret is not None and isinstance(url, str) and url_scheme(url) != "file" and \
                remote_options.get("cache", True):
            ahead = KeyAhead.start(key_ahead_path(url), secret)
        remote = connect(url, stop=retry_stop, **remote_options)
        with _closed_on_failure(remote, url):
            key = password if isinstance(password, Unlocked) else unlock(remote, secret, ahead)
            repo = Repo.open(remote, key)
            return cls(repo, _ledger_for(repo, ledger), lock_reads=lock_reads, retry_stop=retry_stop)

    def close(self) -> None:
        """Close the connections; every later call is refused, whatever the storage (idempotent).  Calls
        running in other threads are stopped first (``stop``), and waited for: closed under them, the
        remote would refuse the removal of their locks.  The locks of ``reading`` blocks, of any thread,
        are released before the connection closes; their lazy readers are refused after it."""
        mine = getattr(self._current, "op", None)
        with self._ended:
            self._closed = True
            for op in self._running:
                op.stop()
            self._ended.wait_for(lambda: not self._running - {mine} and not self._taking_read_locks)
            held, self._read_locks = self._read_locks, []
        for lock in held:  # ``reading`` blocks, of any thread: their locks go before the remote does
            with contextlib.suppress(RemoteError):
                lock.release()
        self._repo.remote.close()

    # --- stopping ------------------------------------------------------------------

    def stop(self) -> None:
        """Tell the operations this object runs now, in any thread, to stop (from another thread, or a signal
        handler that ``chunkvault.interrupts.handled`` runs).

        Each raises ``chunkvault.errors.Stopped`` (a KeyboardInterrupt) at its next progress point, with or
        without a progress callback: ``backup``, ``backup_stream`` and ``archive_push`` between reads, ``backup_command`` at once
        (its command is ended), ``restore`` between batches of chunks, ``check`` and ``copy_to`` between packs,
        ``prune`` between repacks, ``export`` between batches of chunks, ``import_backup`` between sections of
        the file, ``dump`` between writes; a wait for a lock ends too.  The remotes of its repositories start
        attempts only within 10 s of the stop or of their last answer (as after Ctrl-C), so a call waiting on a
        dead one ends then too; the others end once their current remote calls do.  ``copy_to`` stops by either
        repository's ``stop``.  What a stopped operation leaves is what Ctrl-C leaves: no snapshot, no lock, and
        what a backup stored whole reused by the next one.  An operation started afterwards runs as usual."""
        with self._ops_lock:
            running = list(self._running)
        for op in running:
            op.stop()

    @contextlib.contextmanager
    def retries_ended_by(self) -> Iterator[Callable[[], None]]:
        """A function that has its remotes start attempts only within 10 s of the call or of their last answer
        (as after Ctrl-C), for calls made outside the operations ``stop`` reaches: the reads a mount serves
        from libfuse's threads, once it is being unmounted.  Withdrawn when the block ends (unless a stop
        stands)."""
        try:
            yield self._retry_stop.request
        finally:
            with self._ops_lock:
                if not any(o.stopped for o in self._running):
                    self._retry_stop.clear()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise UsageError(f"the repository {self._repo.remote.display_url} was closed (Repository.close)")

    @contextlib.contextmanager
    def _operation(self, op: "_Operation | None" = None) -> Iterator[None]:
        """Run a call as an operation ``stop`` can stop: this thread's own, or ``op`` (another object's that
        this one serves: ``copy_to``'s destination), or, nested in one, that one.  An error an operation
        raises once told to stop (a remote call that was not retried, say) is the stop's doing: ``Stopped``."""
        self._refuse_if_closed()
        if getattr(self._current, "op", None) is not None:
            yield
            return
        op = op or _Operation()
        with self._ops_lock:  # checked with the registering: a ``close`` now either sees it or refuses it
            self._refuse_if_closed()
            self._running.add(op)
            op.repositories.append(self)
        self._current.op = op
        try:
            if op.stopped:
                self._retry_stop.request()
            with locks.waits_end_when(lambda: op.stopped):
                yield
        except Stopped:
            raise
        except BaseException as exc:
            if op.stopped:
                raise Stopped(f"stopped: {exc}") from exc
            raise
        finally:
            self._current.op = None
            with self._ops_lock:
                self._running.discard(op)
                op.repositories.remove(self)
                if not any(o.stopped for o in self._running):
                    self._retry_stop.clear()
                self._ended.notify_all()

    def _progress(self, progress: Callable[..., None] | None) -> Callable[..., None]:
        """``progress``, after a look at whether this thread's operation was told to stop: where an operation
        reports progress, it may stop."""
        checkpoint = self._checkpoint()

        def report(*counts: Any) -> None:
            checkpoint()
            if progress is not None:
                progress(*counts)
        return report

    def _checkpoint(self) -> Callable[[], None]:
        """Raises ``Stopped`` once this thread's operation was told to stop."""
        op = getattr(self._current, "op", None)

        def check() -> None:
            if op is not None and op.stopped:
                raise Stopped("stopped")
        return check

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> Repo:
        """The store-level repository (for tools that need packs, index or keys)."""
        return self._repo

    # --- the client-side ledger -------------------------------------------------

    def _list(self) -> list[Snapshot]:
        """Every readable snapshot (one warning per unreadable one); the ledger notes them (and warns once
        about a replay or rollback), judged by its state before the listing: another command of this
        client may save a snapshot, and note it, while the listing is made."""
        before = None if self._ledger is None else self._ledger.state()
        snaps = self._repo.snapshots()
        present = self._present(snaps)
        if self._ledger is not None:
            self._ledger.observe(present, before=before, digests=self._digests(snaps))
        return snaps

    def _judge(self, dry_run: bool) -> Callable[[list[Snapshot]], list[Snapshot]] | None:
        """What a backup hands the listing it makes under its lock: ``_guard``, before it stores anything (a dry
        run stores nothing, and its listing was noted before it began)."""
        return None if dry_run else self._guard

    def _present(self, snaps: list[Snapshot]) -> dict[str, datetime]:
        """The ledger's view of a listing (an unreadable snapshot is there, not rolled back); one warning
        per unreadable snapshot."""
        for name, exc in self._repo.unreadable_snapshots.items():
            if isinstance(exc, NewerObject):
                warnings.warn(f"snapshot {name[:8]} is left out: {exc.reason}", RepositoryStateWarning, stacklevel=3)
                continue
            warnings.warn(f"snapshot {name[:8]} is unreadable and left out ({exc.object_name}: {exc.reason}); "
                          f"`check` names what it takes down, `forget {name[:8]}` removes it",
                          RepositoryStateWarning, stacklevel=3)
        return present_of(snaps, self._repo.unreadable_snapshots)

    def _guard(self, snaps: list[Snapshot] | None = None, forgetting: Iterable[str] = ()) -> list[Snapshot]:
        """Before a write: RollbackDetected if the snapshot set contradicts the ledger.

        ``snaps``, a listing made earlier (under the exclusive lock, which no backup shares), is judged by
        the ledger as it is now; should another command of this client have stored a snapshot, and noted
        it, since that listing was made, a contradiction is confirmed on a listing made now, judged by the
        ledger as it was before it (a real rollback is still missing from it).  Where the ledger's mark
        moved while that listing was made, it is confirmed once more on the next.
        """
        if self._ledger is None:
            snaps = self._repo.snapshots() if snaps is None else snaps
            self._present(snaps)
            return snaps
        forgetting = set(forgetting)
        if snaps is not None:
            present = self._present(snaps)
            digests = self._digests(snaps)
            try:
                self._ledger.guard(present, forgetting=forgetting, digests=digests)
                self._ledger.observe(present, warn=False, digests=digests)
                return snaps
            except RollbackDetected:
                pass
        for _ in range(2):
            before = self._ledger.state()
            snaps = self._repo.snapshots()
            present = self._present(snaps)
            digests = self._digests(snaps)
            try:
                self._ledger.guard(present, before=before, forgetting=forgetting, digests=digests)
            except RollbackDetected:  # or a repository made anew at its place, which that error names
                require_openable(self._repo.remote, self._repo.config.repo_id)
                raise
            if self._ledger.state().newest == before.newest:
                break
            # This client noted a newer snapshot meanwhile, which the listing may lack: the rollback of it is
            # judged on a listing made now (the write about to be made would bury it).
        self._ledger.observe(present, before=before, warn=False, digests=digests)
        return snaps

    def _saved(self, *snaps: Snapshot) -> None:
        """New snapshots this client stored (``Repo.on_saved``: called while the command's lock is held)."""
        if self._ledger is not None:
            self._ledger.wrote(present_of(snaps), self._digests(snaps))

    def _note_rewrites(self) -> None:
        """The versions of snapshots this process rewrote (a tag, a rebase, a rewrite, an aggregate), noted
        as old ones, even where the command then failed: one put back later is found."""
        replaced = self._repo.take_replaced()
        if replaced and self._ledger is not None:
            self._ledger.wrote({}, replaced=replaced)

    def _digests(self, snaps: Iterable[Snapshot]) -> dict[str, str]:
        """The digest of each snapshot's object as this process read or wrote it (the ledger's versions)."""
        known = self._repo.snapshot_digests
        return {s.id: known[s.id] for s in snaps if s.id in known}

    def _present_for_check(self) -> tuple[dict[str, datetime], dict[str, str]]:
        """Every listed snapshot, and the digests of those read; one that does not decode is check's to
        report, and counts as present.  Listed afresh: a snapshot another command rewrote since this
        object last listed must not be judged by the version it read then."""
        snaps = self._repo.snapshots()
        return present_of(snaps, self._repo.unreadable_snapshots), self._digests(snaps)

    @_stoppable
    def accept_state(self) -> list[str]:
        """Accept the snapshot set as it is (after a replay or rollback was looked into);
        returns what the ledger had found, one line each."""
        if self._ledger is None:
            return []
        return [f.message() for f in self._ledger.accept(*self._present_for_check())]

    # --- backup -----------------------------------------------------------------

    @_stoppable
    def backup(self, paths: list[str] | str, *, kind: str = "auto", tags: list[str] | None = None,
               host: str | None = None, excludes: list[str] | None = None,
               iexcludes: list[str] | None = None, delta: bool = True, no_delta: list[str] | None = None,
               fixed_chunks: list[str] | None = None, fixed_chunk_size: int = FIXED_CHUNK_SIZE,
               parent: str | None = None, progress: Any = None,
               one_file_system: bool = False, exclude_if_present: list[str] | None = None,
               exclude_caches: bool = False, exclude_larger_than: int | None = None, dry_run: bool = False,
               reread: bool = False, skip_if_unchanged: bool = False, ignore_inode: bool = False,
               ignore_ctime: bool = False, xattrs: bool = True, walk: SourceWalk | None = None,
               time: str | datetime | None = None, wait: float = 3600.0,
               listing: Callable[[Listed], None] | None = None, list_unchanged: bool = False,
               compression_level: int | None = None, postgres: str | None = None,
               pg_checkpoint: str | None = None, pg_standby_wait: float | None = None) -> BackupResult:
        """Back up files and directories; one directory is stored as the snapshot's root.

        ``postgres``: the one path is a running PostgreSQL cluster's data directory, read in place as a
        base backup (README, "Online PostgreSQL backups"): this connection string or database name reaches
        the server through ``psql`` (``""``: the ``PG*`` variables say how).  The snapshot restores to a
        directory that starts and recovers to the end of the backup on its own.  ``pg_checkpoint``: the
        checkpoint the backup starts with, ``"fast"`` (the default: at once) or ``"spread"`` (paced as the
        server paces its own, so the start waits up to checkpoint_timeout * checkpoint_completion_target).
        ``pg_standby_wait``: with a standby, how many seconds (default 60) it may take to stream from its
        primary at the start and to replay what it received at the stop, before the backup fails.

        ``dry_run``: read, chunk, compress and count as a backup would, and write nothing (the
        result's snapshot, with its figures, is not saved and has no id).

        ``excludes``: globs matched against each path below a source and each name; what
        they match is left out with its subtree.  They apply in order: ``!GLOB`` takes back what an
        earlier glob left out (not below a directory left out, which is not walked into), ``\\!NAME``
        is a literal ``!``.  ``iexcludes``: likewise, ignoring case (a list of its own: a path is
        left out when either list leaves it out).  ``one_file_system``: a directory on
        another file system than its source is recorded empty (a mount point).
        ``exclude_if_present``: ``NAME`` or ``NAME:HEADER``; a directory holding such a
        file (starting with HEADER) keeps only that file.  ``exclude_caches``: likewise
        for ``CACHEDIR.TAG`` files with the cache directory tag's signature.
        ``exclude_larger_than``: regular files of more bytes are left out (a path given is kept).

        ``fixed_chunks``: globs of files cut every ``fixed_chunk_size`` bytes instead of
        by content (database files updated in place: see README, "Database differentials").
        ``compression_level``: zstd's for this backup's new data, 0 (off) to 22, instead of the repository's
        (an archival run at 19, a fast one at 1); readers need no setting, and data already stored stays as
        it is.

        ``parent``: the snapshot (id or prefix) to compare with and build a differential on, instead of
        the newest of the same host and paths. ``reread``: read every file, even one whose size, times
        and inode match the parent's entry (content still deduplicates). ``skip_if_unchanged``: when
        nothing changed since the parent (a differential would hold no record, or a full that ``auto``
        made due would list the parent's entries; a full asked for is saved), save nothing (the result
        is ``skipped``, its snapshot the parent). ``ignore_inode``, ``ignore_ctime``: a file whose other
        stat fields match is unchanged even if its inode and device numbers (which a file system snapshot
        or a network file system mounts anew each time), or its change time, differ (then a change of
        extended attributes alone goes unseen too). ``xattrs``: record extended attributes (ACLs, file
        capabilities, SELinux labels, ``user.*``).

        ``time``: the snapshot's time instead of now (ISO 8601 text, local when it has no zone, or an aware
        datetime; 1970-01-02 to 5 minutes ahead): when the data was taken, e.g. the time of the file system snapshot
        ``paths`` lie in, so that ``restore(until=...)`` finds it. The default parent is then the newest
        snapshot at or before it.

        ``listing(listed)``: called with a ``Listed`` (``change``, ``path``, ``entry``, ``what``) for each
        entry the backup stores as added or modified and each entry of the parent gone from the tree
        ("removed"), in the snapshot's order, as the backup settles it (``backup --list``); with
        ``list_unchanged``, for the unchanged entries too.  A dry run also reports each path an exclusion
        rule left out ("excluded", ``what`` the rule: "exclude", "exclude-larger-than", "exclude-if-present"
        or "one-file-system"; "repository" for the local repository written to, which is left out of the tree
        it lies in; its walk then judges every entry in Python, a little slower).

        ``walk``: a ``SourceWalk.of_paths(...).start()`` of the same paths and rules, begun
        before the repository was opened, so the walk overlaps the key derivation (for a dry run with a
        ``listing``, made with ``report_excluded=True``; with ``repositories=[path]`` where this local
        repository lies in the tree, else UsageError: the walk would back it up into itself).

        ``wait``: seconds to wait for a running prune, forget or repair (exclusive) before Locked.
        """
        paths, tags, excludes, host = _paths(paths), _texts(tags, "tag"), _globs(excludes, "exclude"), _host(host)
        iexcludes = _globs(iexcludes, "iexclude")
        check_one_line(tags, host)
        if progress is not None and not callable(progress):
            raise UsageError(f"progress is a function, not {progress!r}")
        if listing is not None and not callable(listing):
            raise UsageError(f"listing is a function, not {listing!r}")
        if list_unchanged and listing is None:
            raise UsageError("list_unchanged lists to a listing function: give listing= too")
        report_excluded = dry_run and listing is not None
        no_delta, fixed_chunks = _globs(no_delta, "no_delta"), _globs(fixed_chunks, "fixed_chunks")
        exclude_if_present = _globs(exclude_if_present, "exclude_if_present")
        fixed_chunk_size = parse_size(fixed_chunk_size)
        if exclude_larger_than is not None:
            exclude_larger_than = parse_size(exclude_larger_than)
        session = None
        if postgres is None and (pg_checkpoint is not None or pg_standby_wait is not None):
            if walk is not None:
                walk.close()
            what = ("pg_checkpoint is the checkpoint" if pg_checkpoint is not None
                    else "pg_standby_wait bounds the waits")
            raise UsageError(f"{what} of a postgres backup: give postgres too")
        if postgres is not None:
            session = _postgres_session(postgres, paths, walk, pg_checkpoint, pg_standby_wait)
            from .pgbackup import EXCLUDES as PG_EXCLUDES

            excludes = [*PG_EXCLUDES, *(excludes or [])]
        # Held open since an earlier backup, another client may have rebased since (the index is read
        # afresh by every backup).
        self._repo.drop_stale(index=False)
        try:
            markers = markers_of(exclude_if_present, exclude_caches)
            if dry_run:
                self._list()
            opts = BackupOptions(kind=kind, tags=list(tags or []), host=host, excludes=list(excludes or []),
                                 delta=delta, no_delta=list(no_delta or []), fixed_chunks=list(fixed_chunks or []),
                                 fixed_chunk_size=fixed_chunk_size, progress=self._progress(progress), dry_run=dry_run,
                                 parent=_spec(parent) if parent else None, judge=self._judge(dry_run), reread=reread,
                                 skip_if_unchanged=skip_if_unchanged, ignore_inode=ignore_inode,
                                 ignore_ctime=ignore_ctime, xattrs=xattrs, time=_time(time),
                                 lock_wait=_wait(wait), listing=listing, list_unchanged=list_unchanged,
                                 count_total=progress is not None,
                                 compression_level=_compression_level(compression_level), session=session)
        except BaseException:
            if walk is not None:
                walk.close()
            raise
        if walk is None:
            walk = SourceWalk.of_paths(list(paths), excludes, one_file_system=one_file_system, markers=markers,
                                       max_file_size=exclude_larger_than, iexcludes=iexcludes,
                                       report_excluded=report_excluded,
                                       leave_out=session.leave_out if session is not None else None,
                                       graft=session.graft if session is not None else None,
                                       repositories=_local_roots(self._repo.remote))
        elif not walk.same_rules(list(paths), excludes, one_file_system, markers, exclude_larger_than, iexcludes,
                                 report_excluded):
            walk.close()
            raise UsageError("the given walk is of other paths or exclusion rules than the backup")
        elif not walk.leaves_out(_local_roots(self._repo.remote)):
            walk.close()
            raise UsageError(f"the given walk does not leave out the repository at "
                             f"{_local_roots(self._repo.remote)[0]}, which lies in its tree: make it with "
                             "repositories=[that path]")
        return Backup(self._repo, opts).run(walk, walk.paths)

    @_stoppable
    def backup_stream(self, fileobj: BinaryIO, name: str, *, kind: str = "auto", tags: list[str] | None = None,
                      host: str | None = None, delta: bool = True, fixed_chunks: list[str] | None = None,
                      fixed_chunk_size: int = FIXED_CHUNK_SIZE, dry_run: bool = False,
                      time: str | datetime | None = None, wait: float = 3600.0, progress: Any = None,
                      compression_level: int | None = None) -> BackupResult:
        """Store a stream (e.g. a dump on stdin) as the single file ``name``.

        ``fixed_chunks``: globs; when one matches ``name`` the stream is cut at fixed offsets.
        ``dry_run``, ``time``, ``wait``, ``progress``, ``compression_level``: as for ``backup``.
        """
        opts = _stream_options(kind, tags, host, delta, fixed_chunks, fixed_chunk_size, dry_run, time, wait,
                               progress, compression_level)
        source = _BinarySource(fileobj)
        return self._backup_stream(lambda: contextlib.nullcontext(source), name, opts)

    @_stoppable
    def backup_command(self, argv: Sequence[str], name: str, *, kind: str = "auto", tags: list[str] | None = None,
                       host: str | None = None, delta: bool = True, fixed_chunks: list[str] | None = None,
                       fixed_chunk_size: int = FIXED_CHUNK_SIZE, dry_run: bool = False, cwd: str | None = None,
                       env: Mapping[str, str] | None = None, stderr: IO[bytes] | None = None,
                       time: str | datetime | None = None, wait: float = 3600.0, progress: Any = None,
                       compression_level: int | None = None) -> BackupResult:
        """Store the standard output of the command ``argv`` (e.g. ``["pg_dump", "app"]``) as the single
        file ``name``, as ``backup_stream`` does. The snapshot is saved only if the command exits with
        status 0 (else SourceCommandFailed); a backup that fails first stops the command. The command
        starts once the repository has agreed to the backup, in ``cwd`` with ``env`` (default: ours),
        less any variable holding a password; its stderr goes to ``stderr`` (a file; default: ours).
        ``time``, ``wait``, ``progress``: as for ``backup``."""
        from .store.command_stream import CommandStream

        argv = _listed(argv)
        opts = _stream_options(kind, tags, host, delta, fixed_chunks, fixed_chunk_size, dry_run, time, wait,
                               progress, compression_level)
        return self._backup_stream(lambda: CommandStream(argv, cwd=cwd, env=env, stderr=stderr), name, opts)

    def _backup_stream(self, open_stream: Callable[[], ContextManager[Any]], name: str | bytes,
                       opts: BackupOptions) -> BackupResult:
        if isinstance(name, (bytes, os.PathLike)):
            name = os.fsdecode(name)
        if not isinstance(name, str):
            raise UsageError(f"a stream's name is a str or bytes, not {name!r}")
        check_stdin_name(name)  # before a lock is waited for, or a command started
        check_one_line(opts.tags, opts.host)
        self._repo.drop_stale(index=False)
        opts.judge = self._judge(opts.dry_run)
        opts.progress = self._progress(opts.progress)
        op = self._current.op
        with open_stream() as stream:
            interrupt = getattr(stream, "interrupt", None)  # a command: a stop ends it, however silent it is
            with op.ending(interrupt) if op is not None and interrupt is not None else contextlib.nullcontext():
                result = Backup(self._repo, opts).run(None, [name], stream=stream, stdin_name=name)
        return result

    @_stoppable
    def import_tar(self, tar: BinaryIO | str | os.PathLike[str], path: str, *, kind: str = "auto",
                   tags: list[str] | None = None, host: str | None = None, parent: str | None = None,
                   strip_components: int = 0, delta: bool = True, fixed_chunks: list[str] | None = None,
                   fixed_chunk_size: int = FIXED_CHUNK_SIZE, dry_run: bool = False,
                   time: str | datetime | None = None, wait: float = 3600.0, progress: Any = None,
                   compression_level: int | None = None) -> BackupResult:
        """Back up the tree a tar archive holds (a file's path, or a binary stream read once, front to back:
        a pipe works), plain or gzip, bzip2, xz or zstd compressed, as a snapshot of ``path`` (absolute): as
        a backup of ``path`` on ``host`` would be, its parent found among those, its content deduplicated
        with theirs (README, "Importing a tar").

        ``strip_components``: leave out this many leading components of each member's name (as tar's
        ``--strip-components``: ``tar -cf - /etc`` names its members ``etc/...``).  A member named with a
        ``..`` part is refused (UsageError); a tar that breaks off or lacks its end marker saves no snapshot
        (IncompleteSource).  ``kind``, ``parent``, ``fixed_chunks``, ``dry_run``, ``time``, ``wait``,
        ``progress``, ``compression_level``: as for ``backup``."""
        from .store.backup import TarSource
        from .store.tarimport import open_tar

        (label,) = _paths([path], "path the tar is imported as")
        if not label.startswith("/") or "\x00" in label:
            raise UsageError(f"the path a tar is imported as must be absolute, not {label!r}").hinting(" (--path)")
        label = os.path.normpath(label).replace("//", "/")
        if type(strip_components) is not int or strip_components < 0:
            raise UsageError(f"strip_components is a whole number of at least 0, not {strip_components!r}")
        opts = _stream_options(kind, tags, host, delta, fixed_chunks, fixed_chunk_size, dry_run, time, wait,
                               progress, compression_level)
        opts.parent, opts.judge = (_spec(parent) if parent else None), self._judge(dry_run)
        check_one_line(opts.tags, opts.host)
        self._repo.drop_stale(index=False)
        if dry_run:
            self._list()
        opts.progress = self._progress(opts.progress)
        with contextlib.ExitStack() as stack:
            if isinstance(tar, (str, os.PathLike)):
                try:
                    raw: Any = stack.enter_context(open(tar, "rb"))
                except OSError as exc:
                    raise UsageError(f"cannot read {os.fsdecode(tar)}: {exc.strerror or exc}") from None
            else:
                raw = _BinarySource(tar)
            tf = open_tar(raw)
            return Backup(self._repo, opts).run(None, [label], tar=TarSource(tf, strip_components))

    # --- the PostgreSQL WAL archive ---------------------------------------------------

    @_stoppable
    def archive_push(self, path: str | os.PathLike[str], *, host: str | None = None, wait: float = 3600.0,
                     compression_level: int | None = None, ahead: Sequence[str | os.PathLike[str]] = (),
                     on_ahead: Callable[["PushResult"], None] | None = None) -> "PushResult":
        """Archive one file PostgreSQL hands its ``archive_command`` (``%p``) under its base name, a WAL
        segment, ``.partial`` segment, backup or timeline history file (any other name: UsageError).  Its
        data is stored as a backup stores a file, under the same shared lock, and ``wal/NAME`` written last.
        Pushed again with the same content it succeeds (``already``) storing nothing; with other content
        it raises ArchiveConflict and makes nothing new visible.  ``wait``: as for ``backup``.

        ``ahead``: more files to push after it under the same lock (those PostgreSQL has ready next), each
        passed to ``on_ahead`` once archived; the first that fails ends them, its error in the result's
        ``ahead_error``, and does not fail the push of ``path``."""
        from .store import walarchive

        _file_path(path, "path to archive")
        for other in ahead:
            _file_path(other, "path to archive")
        return walarchive.push(self._repo, os.fsdecode(path), host=_host(host), wait=_wait(wait),
                               compression_level=_compression_level(compression_level),
                               progress=self._progress(None), ahead=[os.fsdecode(p) for p in ahead],
                               on_ahead=on_ahead or (lambda r: None))

    @_stoppable
    def archive_get(self, name: str, dest: str | os.PathLike[str], *, wait: float = 3600.0) -> "WalFile":
        """Write the archived file ``name`` (``%f``) to ``dest`` (``%p``) atomically, each blob checked against
        its id.  Not archived: WalNotArchived (exit 1, what PostgreSQL's ``restore_command`` must see for a
        file that does not exist); damaged: CorruptObject naming it, and ``dest`` is not written."""
        from .store import walarchive, walnames

        walnames.check_wal_name(name)
        _file_path(dest, "destination")
        with self.reading("archive-get", wait=_wait(wait)):
            return walarchive.get(self._repo, name, os.fsdecode(dest))

    @_stoppable
    def archive_prefetch(self, after: str, directory: str | os.PathLike[str], count: int, *,
                         wait: float = 3600.0) -> tuple[list["WalFile"], str | None]:
        """Fetch the ``count`` archived segments of ``after``'s timeline that follow it into ``directory``
        (each as ``archive_get`` writes it), for a recovery's next calls; returns those fetched and why the
        next was not (None: all were, or fewer are archived)."""
        from .store import walarchive, walnames

        walnames.check_wal_name(after)
        with self.reading("archive-get", wait=_wait(wait)):
            return walarchive.prefetch(self._repo, after, os.fsdecode(directory), count)

    @_stoppable
    def archive_check(self, pg_connect: str | None = None, timeout: float = 60.0) -> "ArchiveCheck":
        """Prove that the running PostgreSQL's WAL reaches this repository (pgBackRest's ``check``): read its
        archiving settings and archiver statistics through psql (``pg_connect``: a connection string or
        database name; None: the ``PG*`` variables), write a restore point, switch to a new WAL segment, and
        wait up to ``timeout`` seconds until the segment closed is archived here, its object opens and its
        data is indexed (read under the shared lock, waiting for a prune up to ``timeout`` too).  Returns the
        ArchiveCheck (``segment``, ``waited``, ``status``: the server's settings and archiver statistics).
        ArchiveCheckFailed (exit 23, the result as its ``partial``) when the server does not archive
        (``archive_mode`` off, no ``archive_command`` nor ``archive_library``) or the segment does not come in
        time, saying what the server reports; UsageError for a standby; SourceCommandFailed (exit 20) when
        psql cannot run or the server cannot be reached.  An ``archive_command`` that does not run
        ``archive-push``, or an ``archive_library``, is warned about (ArchiveCommandWarning)."""
        from .archivecheck import archive_check, session_for
        from .errors import ArchiveCheckFailed
        from .store import walarchive

        self._refuse_if_closed()
        found: dict[str, "WalFile"] = {}

        def archived(name: str) -> bool:
            wal = walarchive.load(self._repo, name)
            if wal is not None:
                found[name] = wal
            return wal is not None

        with session_for(pg_connect) as session:
            try:
                result = archive_check(session, archived, timeout)
            except ArchiveCheckFailed as exc:
                if exc.partial is None or exc.partial.segment is None:
                    raise
                holder = self._exclusive_holder()
                if holder is None:
                    raise
                exc = exc.explained(f"; meanwhile the repository is locked by {holder}, which archive-push waits "
                                    "for (up to its --wait, an hour by default)")
                exc.partial.error = str(exc)
                raise exc from None
        assert result.segment is not None
        # its data is indexed (a push stores it before its object), read behind a prune for up to the timeout
        with self.reading("archive-check", wait=timeout):
            index = self._repo.fresh_index()
            lacking = [b for b in found[result.segment].blob_ids() if b not in index]
        if lacking:
            raise MissingObject(f"blob {lacking[0].hex()}", f"missing from the index, needed by "
                                f"{walarchive.WAL_PREFIX}{result.segment} ({len(lacking)} blobs): run check")
        return result

    def _exclusive_holder(self) -> str | None:
        """Who holds the repository's exclusive lock (a prune, a forget, an archive-expire), or None."""
        import time

        from .store.locks import SHARED, list_locks

        try:
            held = [lk for lk in list_locks(self._repo.remote) if lk.kind != SHARED and not lk.stale(time.time())]
        except ChunkvaultError:
            return None
        return held[0].describe() if held else None

    def archive_list(self) -> list["WalFile"]:
        """The archived files, by name; one that does not load is left out with a RepositoryStateWarning."""
        from .store import walarchive

        self._refuse_if_closed()
        files, bad = walarchive.load_all(self._repo)
        for name, exc in sorted(bad.items()):
            warnings.warn(f"{exc} (left out)", RepositoryStateWarning, stacklevel=2)
        return files

    def wal_history(self) -> tuple[int, dict[int, int]]:
        """The newest timeline whose history file the WAL archive holds (a recovery follows it) and where each
        of its ancestors ended, as byte positions; (0, {}) without one, or where it does not read."""
        from .store import walarchive

        self._refuse_if_closed()
        with self.reading("archive-list"):
            return walarchive.newest_history(self._repo)

    def archive_expire(self, before: str, *, dry_run: bool = False, wait: float = 0.0) -> list[str]:
        """Remove the archived segments (and partial segments and backup history files) of ``before``'s timeline
        whose segment sorts before ``before``'s, under the exclusive lock; timeline history files stay.  A
        prune then frees their data.  Returns the names removed (with ``dry_run``: that would be).
        ``before="oldest-snapshot"``: the segment the oldest snapshot's base backup starts in (its stats'
        ``postgres.start_wal``, else its ``backup_label``), so that every snapshot kept can still recover to
        any later moment; the earlier timelines' files before its position go too (no snapshot starts on
        them, and a recovery from a later timeline never reads them)."""
        from .store import walarchive, walnames

        self._refuse_if_closed()
        oldest = before == walnames.OLDEST_SNAPSHOT
        if not oldest:
            return walarchive.expire(self._repo, before, dry_run=dry_run, wait=_wait(wait))
        with self.reading("archive-expire"):
            snaps = self.snapshots()
            self._refuse_unreadable()
            seen = {s.id for s in snaps}
            starts = self._label_starts(snaps)
        if dry_run:
            return walarchive.expire(self._repo, walnames.oldest_needed(starts), dry_run=True, earlier_timelines=True)

        def before_now() -> str:
            """Under the exclusive lock: a snapshot that landed since the labels were read (a copy or an import
            of an older base backup) counts too."""
            landed = [s for s in self._repo.reload_snapshots() if s.id not in seen]
            self._refuse_unreadable()
            if landed:
                self._repo.fresh_index()  # their data came with them
            return walnames.oldest_needed(starts + self._label_starts(landed))

        return walarchive.expire(self._repo, before_now, wait=_wait(wait), earlier_timelines=True)

    def _refuse_unreadable(self) -> None:
        """One snapshot that does not load (damaged, a newer chunkvault's) may be the oldest: its WAL must not
        go."""
        self._repo.require_readable("archive-expire --before oldest-snapshot")

    def _label_starts(self, snaps: list[Snapshot]) -> list[str]:
        """The segments the base backups of ``snaps`` start in (the caller holds a lock): as a snapshot's stats
        say (``backup --postgres`` records it), else as each ``backup_label`` it holds says, wherever it is (a
        ``pg_basebackup`` copy at the root, or below it in a snapshot of several paths or of a directory above
        the copy), or the one inside a tar-format copy's ``base.tar`` (or ``.tar.gz``), or, where neither can
        be read (a ``base.tar`` compressed otherwise), its ``backup_manifest``: one missed would let its WAL
        go.  Each tree is read once, streamed (only those files are kept); a file so named that is no base
        backup's is not one; snapshots without any (other sources) need no WAL."""
        from .store.walnames import label_start_segment, manifest_start_segment, stats_start_segment

        starts = []
        for snap in snaps:
            recorded = stats_start_segment(snap.stats)
            if recorded is not None:
                starts.append(recorded)
                continue
            found: dict[bytes, list[Entry]] = {}
            for r in self._repo.tree(snap):
                name = r.path.rpartition(b"/")[2]
                if r.entry is not None and r.entry.type in (T_FILE, T_HARDLINK) and name in _BASE_BACKUP_FILES:
                    found.setdefault(r.path.rpartition(b"/")[0], []).append(r.entry)
            for entries in found.values():
                labelled = [s for e in entries if e.path.endswith((b"backup_label", b".tar", b".tar.gz"))
                            if (s := self._read_start(snap, e, label_start_segment)) is not None]
                by_manifest = [s for e in entries if e.path.endswith(b"backup_manifest")
                               if (s := self._read_start(snap, e, manifest_start_segment)) is not None]
                sealed = [e.path for e in entries if e.path.endswith(_SEALED_TARS)]
                if sealed and not labelled and not by_manifest:  # its WAL would go as another source's
                    raise UsageError(f"snapshot {snap.short_id} holds a base backup whose WAL start cannot be read "
                                     f"({os.fsdecode(sealed[0])}, no backup_manifest beside it): give --before "
                                     "SEGMENT, the file its backup_label's START WAL LOCATION names")
                starts += labelled or by_manifest
        return starts

    def _wal_gaps(self, files: list["WalFile"]) -> list[str]:
        """``check``'s warnings of segments missing between archived ones that a recovery from a snapshot
        here would replay (``recovery_gaps``: from the oldest base backup's start on, not past where a
        timeline the newest one left ended), as pgBackRest's verify: no damage, but a recovery stops at the
        first.  Where a start cannot be read (a damaged tree: check names it), every gap counts."""
        from .store.walarchive import newest_history
        from .store.walnames import format_lsn, recovery_gaps

        if not files:
            return []
        try:
            starts = self._label_starts(self._repo.snapshots())
        except (UsageError, CorruptObject):
            starts = []
        out = []
        ends = newest_history(self._repo)[1]
        for span in recovery_gaps([(w.name, w.size) for w in files], starts, ends):
            more = f" and {len(span.missing) - 3} more" if len(span.missing) > 3 else ""
            where = (f"between {span.first} and {span.last}" if span.missing[-1] < span.last else
                     f"from {span.first} up to where it ended, at {format_lsn(ends[span.timeline])}")
            out.append(f"archived WAL of timeline {span.timeline} lacks {len(span.missing)} segment(s) {where} "
                       f"({', '.join(span.missing[:3])}{more}): a recovery through them stops at the first")
        return out

    def _unneeded_wal(self, names: list[str]) -> set[str]:
        """Of the archived WAL ``names`` (that ``copy --wal`` would send here), those no base backup here can
        use: before the oldest one's start, as ``archive-expire --before oldest-snapshot`` would remove them
        (the caller holds a lock).  The trees of snapshots without a recorded start are read only when the
        recorded starts leave something to skip; with an unreadable snapshot, or a start that cannot be
        read, nothing is skipped."""
        from .store.walnames import expired, oldest_needed, stats_start_segment

        snaps = self._repo.snapshots()
        recorded = [s for snap in snaps if (s := stats_start_segment(snap.stats)) is not None]
        if self._repo.unreadable_snapshots or \
                recorded and not expired(names, oldest_needed(recorded), earlier_timelines=True):
            return set()
        try:
            starts = self._label_starts(snaps)
        except (UsageError, CorruptObject):  # a start that cannot be read (sealed, damaged): its WAL goes
            return set()
        return set(expired(names, oldest_needed(starts), earlier_timelines=True)) if starts else set()

    def _read_start(self, snap: Snapshot, e: Entry, parse: Callable[[str], str | None]) -> str | None:
        """What ``parse`` makes of the file ``e`` (a label or a manifest), or of the ``backup_label`` member a
        tar-format copy's ``base.tar`` starts with; None where it holds none, or cannot be read so."""
        import tarfile

        try:
            with self._file_content(snap, e) as f:
                if e.path.endswith(b"backup_manifest"):  # its WAL ranges come last: all of it
                    return parse(f.read().decode("utf-8", "replace"))
                if not e.path.endswith((b".tar", b".tar.gz")):
                    return parse(f.read(1 << 16).decode("utf-8", "replace"))
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member, _ in zip(tar, range(4)):  # pg_basebackup writes the label first
                        if member.name.lstrip("./") == "backup_label" and member.isfile():
                            got = tar.extractfile(member)
                            return parse(got.read(1 << 16).decode("utf-8", "replace")) if got else None
        except UsageError:  # a hard link to something else than a file
            return None
        except tarfile.TarError:  # compressed otherwise (zstd, lz4), or no tar: its manifest says
            return None
        return None

    # --- reading ----------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self, purpose: str = "read", *, wait: float = 3600.0) -> Iterator[None]:
        """Hold a shared lock while reading data, so that no prune, forget or repair (exclusive) deletes
        or rewrites what the read follows; waits up to ``wait`` seconds for one that runs (a warning says
        who), then raises Locked.  Snapshot objects and an index read before the lock are read again.

        ``restore``, ``find``, ``usage``, ``check``, ``export``, ``copy_to`` and ``verify_restore`` hold it themselves;
        a caller of the lazy readers (``tree``, ``diff``, ``open_file``) holds it around its use.  Nested uses share the
        outer lock (each thread takes its own).  With ``lock_reads`` off, or when the remote refuses to store the lock (a read-only
        token or mount, a full disk), the read goes ahead unlocked (the latter with a warning)."""
        from .store.locks import SHARED, RepoLock

        self._refuse_if_closed()
        with contextlib.ExitStack() as held:
            depth = getattr(self._reading_depth, "n", 0)
            locked = False
            if self.lock_reads and not depth:
                lock = self._read_lock(RepoLock(self._repo.remote, SHARED, purpose, wait=wait, wait_option=True))
                if lock is not None:
                    held.push(functools.partial(self._end_read_lock, lock))  # when the read ends
                    locked = True
                    self._repo.drop_stale()
            if not depth and not locked:
                self._follow_others()
            self._reading_depth.n = depth + 1
            try:
                yield
            except CorruptObject as exc:
                if not depth and not locked and self._index_replaced_meanwhile():
                    # a prune (or repair) replaced the index the read followed: what it removed is gone, not damaged
                    raise exc.explained(f"; the index changed while this {purpose} read without a lock (a prune "
                                        "ran meanwhile?): run it again before repairing anything") from None
                raise
            finally:
                self._reading_depth.n = depth

    def _read_lock(self, lock: Any) -> Any:
        """``lock`` taken for a ``reading`` block and noted for ``close`` (which releases it before the remote
        closes: taken here after that, it would stay on the storage, holding prune off until stale); None when
        the remote refuses to store it.  ``close`` waits for a lock being taken, and ends a wait for one."""
        with self._ops_lock:
            self._refuse_if_closed()
            self._taking_read_locks += 1
        op = getattr(self._current, "op", None)
        acquired = kept = False
        try:
            with locks.waits_end_when(lambda: self._closed or (op is not None and op.stopped)):
                lock.acquire()
            acquired = True
        except (PermissionDenied, StorageFull) as exc:
            warnings.warn(f"reading without a lock ({exc}): a prune running meanwhile could remove data "
                          f"this {lock.purpose} needs; `--no-lock` (API: `lock_reads=False`) skips the lock",
                          RepositoryStateWarning, stacklevel=4)
            return None
        finally:
            if acquired:
                with self._ops_lock:
                    kept = not self._closed
                    if kept:
                        self._read_locks.append(lock)
                if not kept:  # closed meanwhile: released while ``close`` waits, the remote still open
                    with contextlib.suppress(RemoteError):
                        lock.release()
            with self._ops_lock:
                self._taking_read_locks -= 1
                self._ended.notify_all()
        self._refuse_if_closed()
        return lock

    def read_lock_removed(self) -> float | None:
        """Seconds a lock held by a ``reading`` block had gone unrefreshed when it was found removed by another
        command (which took it for stale: the repository out of reach, or this process stopped), or None: a
        long read (a mount) then goes on unlocked, and a prune may run under it."""
        with self._ops_lock:
            held = list(self._read_locks)
        return next((gap for gap in (lock.removed() for lock in held) if gap is not None), None)

    def _end_read_lock(self, lock: Any, *exc: Any) -> None:
        """Release a ``reading`` block's lock as it ends (its ``__exit__``), unless ``close`` did."""
        with self._ops_lock:
            if lock not in self._read_locks:
                return
            self._read_locks.remove(lock)
        lock.__exit__(*exc)

    def _still_open(self) -> None:
        """Before each fetch of a lazy reader (``tree``, ``diff``, ``open_file``): refused once closed, whatever
        the storage, and stopped once the call it serves on this thread (``dump``'s) was told to stop."""
        self._refuse_if_closed()
        op = getattr(self._current, "op", None)
        if op is not None and op.stopped:
            raise Stopped("stopped")

    def _index_replaced_meanwhile(self) -> bool:
        """Whether the index a read without a lock followed was replaced since (a failure to list says no:
        the read's own error is the one to report)."""
        try:
            return self._repo.index_replaced()
        except ChunkvaultError:
            return False

    def _follow_others(self) -> None:
        """Before a read outside ``reading`` (or one without the lock): drop an index that other commands
        have replaced or added to since it was read (a backup's new snapshot would be called damaged).
        Closed, the repository refuses the call first (the storage's own refusal read as its failure)."""
        self._refuse_if_closed()
        if not getattr(self._reading_depth, "n", 0):
            self._repo.refresh_index()

    @_stoppable
    def snapshots(self, *, hosts: Iterable[str] = (), tags: Iterable[str] = (), paths: Iterable[str] = (),
                  latest: int | None = None, group_by: str | Iterable[str] = "host,paths") -> list[Snapshot]:
        """The snapshots, oldest first; filtered as ``select_snapshots`` does when a filter is given; with
        ``latest``, only that many of the newest of each group (by host and paths, or ``group_by``)."""
        if latest is not None and (type(latest) is not int or latest < 0):
            raise UsageError(f"latest is a count of snapshots, not {latest!r}")
        chosen = select_snapshots(self._list(), **_filters(hosts, tags, paths))
        if latest is None:
            return chosen
        from .store.retention import newest_of_groups, parse_group_by

        return newest_of_groups(chosen, latest, parse_group_by(group_by))

    @_stoppable
    def stats(self) -> RepositoryStats:
        """Snapshots, distinct data, deltas, packs, the archived WAL and the ratios between them, from the
        snapshot and WAL objects, the index and a listing of the packs (no manifest is read).  A WAL object
        that does not load is left out (its chunks count as the snapshots'): ``check`` names it."""
        from .store import walarchive
        from .store.stats import summarize

        self._follow_others()
        snaps = self._list()
        repo = self._repo
        wal, _ = walarchive.load_all(repo)
        return summarize(snaps, repo.index.items(), repo.stored_packs().values(), wal)

    @_stoppable
    def usage(self, snapshots: Iterable[str | Snapshot] | None = None, *, hosts: Iterable[str] = (),
              tags: Iterable[str] = (), paths: Iterable[str] = ()) -> SnapshotUsage:
        """What the snapshots named and selected by the filters take: their files (restore size), the
        distinct chunks restoring them reads (with the delta bases below them, and their chains'
        manifests), and of those what no other snapshot needs, which forgetting them then pruning frees
        (``store/usage.py``).  Every snapshot's tree is resolved once."""
        from .store.usage import resolution_order, usage

        with self.reading("stats"):
            every = self._list()
            chosen = self._chosen(every, snapshots, hosts, tags, paths)
            repo = self._repo
            with repo.manifests_ahead(resolution_order(every)) as ahead:
                out = usage(every, chosen, ahead.records, repo.locate, repo.delta_base, repo.chains(every))
            out.not_resolved += sorted(repo.unreadable_snapshots)
            if out.not_resolved:
                warnings.warn(f"{len(out.not_resolved)} snapshot(s) cannot be read in full (`check` says why): "
                              f"what only the selection needs may be less than shown", RepositoryStateWarning,
                              stacklevel=2)
            if out.missing_blobs:
                warnings.warn(f"{out.missing_blobs} blob(s) the selection needs are in no index (`check` says more)",
                              RepositoryStateWarning, stacklevel=2)
            return out

    def _chosen(self, every: list[Snapshot], snapshots: Iterable[str | Snapshot] | None, hosts: Iterable[str],
                tags: Iterable[str], paths: Iterable[str]) -> list[Snapshot]:
        """The snapshots the filters select, and of them those named (all, when none are): a name is looked up
        among the selected, so ``latest`` with a host, tag or path is that source's newest (it was the
        repository's, which the filters then left out: `tag latest --path /db --add pinned` pinned nothing).
        One the filters leave out is SnapshotNotFound, saying so.  With paths, ``latest`` is the newest of
        exactly those paths, as `restore latest --path` takes it (not of any that includes them: `tag latest
        --path /db --add pinned` pinned another source's snapshot than the one a restore would take)."""
        paths = list(paths)
        chosen = select_snapshots(every, **_filters(hosts, tags, paths))
        if snapshots is None:
            return chosen
        among, anywhere = SnapshotFinder(chosen), SnapshotFinder(every)
        selected = {s.id for s in chosen}
        named: set[str] = set()
        for spec in _listed(snapshots):
            if isinstance(spec, Snapshot):
                snap = spec
            elif spec == "latest" and paths:
                snap = find_snapshot(chosen, spec, filter_paths=paths)
            else:
                try:
                    snap = among(spec)
                except SnapshotNotFound:
                    try:
                        snap = anywhere(spec)
                    except SnapshotNotFound as exc:  # a name no snapshot that loads has
                        self._refuse_if_damaged(spec, exc)
                        raise
            if snap.id not in selected:
                raise SnapshotNotFound(f"snapshot {snap.short_id} is not among those the host, tag and path "
                                       "filters select")
            named.add(snap.id)
        return [s for s in chosen if s.id in named]

    def find(self, patterns: list[str], *, snapshots: Iterable[str | Snapshot] | None = None,
             hosts: Iterable[str] = (), tags: Iterable[str] = (), paths: Iterable[str] = (),
             ignore_case: bool = False) -> list[Found]:
        """Every distinct version of each path matching a glob of ``patterns`` (against the path below a
        snapshot's root, or its name), with the snapshots holding it: in all snapshots, or in those named
        and those the filters select.  Each full manifest is read once, each differential's own records
        once (``store/find.py``); patterns that all start with a directory (``etc/postgresql/*``) read only
        that directory's part of each manifest.  ``iter_find`` gives them one at a time."""
        return list(self.iter_find(patterns, snapshots=snapshots, hosts=hosts, tags=tags, paths=paths,
                                   ignore_case=ignore_case))

    @_stoppable
    def iter_find(self, patterns: list[str], *, snapshots: Iterable[str | Snapshot] | None = None,
                  hosts: Iterable[str] = (), tags: Iterable[str] = (), paths: Iterable[str] = (),
                  ignore_case: bool = False) -> Iterator[Found]:
        """``find``, each path made as it is taken: the search is done (and the repository let go) on return,
        what it found held encoded, not as a ``Found`` per path (``find '*'`` over two snapshots of 300,000
        files took 510 MB as a list)."""
        from .store.find import chain_order, held_matches, path_matcher, tree_glob, versions

        patterns = [tree_glob(p) for p in _globs(patterns, "pattern")]
        if not patterns:
            raise UsageError("find needs at least one pattern")
        with self.reading("find"):
            every = self._list()
            chosen = self._chosen(every, snapshots, hosts, tags, paths)
            by_id = {s.id: s for s in every}
            parents = {s.id: s.parent for s in every}
            needed = {sid: by_id[sid] for sid in with_ancestors((s.id for s in chosen), parents)}
            match = path_matcher(patterns, ignore_case)
            within = None if ignore_case else include_directory(patterns)
            damaged: dict[str, CorruptObject] = {}
            with self._repo.manifests_ahead(chain_order(needed.values()) if within is None else ()) as ahead:
                own: Callable[[Snapshot], Iterator[Record]] = ahead.records if within is None else (
                    lambda s: self._repo.manifest_records_within(s, within))
                held = held_matches(needed.values(), own, match, damaged)
            # read ahead into the blob cache, the manifests would stay there (up to its 256 MiB) beside the matches
            self._repo.uncache(bytes.fromhex(h) for s in needed.values() for h in s.manifest)
            for s in chosen:
                if s.id in damaged:
                    warnings.warn(f"snapshot {s.short_id} is not searched: a manifest of its chain is damaged "
                                  f"({damaged[s.id]}; `check` names what it takes down)",
                                  RepositoryStateWarning, stacklevel=2)
                elif s.id not in held:
                    warnings.warn(f"snapshot {s.short_id} is not searched: its chain does not reach a full snapshot "
                                  f"(`check` says why)", RepositoryStateWarning, stacklevel=2)
            def holder(snap: Snapshot, path: bytes) -> Entry | None:
                # the blobs a link's look-up reads stay cached for the next ones (each read its blobs anew: a
                # search over a tree of changed hard links read and decoded them once per link), until the end
                rec = self._repo.lookup(snap, path, cache=True)
                return None if rec is None else rec.entry

            found = versions(chosen, held, holder)
            try:
                first = next(found, None)  # the search and its look-ups done under the lock
            finally:
                self._repo.uncache(bytes.fromhex(h) for s in needed.values() for h in s.manifest)
        return iter(()) if first is None else itertools.chain([first], found)

    @_stoppable
    def snapshot(self, spec: str | Snapshot = "latest", *, until: str | datetime | None = None,
                 host: str | None = None, paths: list[str] | None = None) -> Snapshot:
        """An id, unique prefix or ``latest``; with ``until`` the newest at or before that time.  An id of a
        snapshot object that does not load raises its CorruptObject: it is there, damaged, not unknown.
        A Snapshot object is looked up by its id, as the repository holds it now: another command may have
        rebased, rewritten or aggregated it since it was read (or forgotten it: SnapshotNotFound), and
        what it named then may be pruned.  ``until`` as text given to the second, or as whole seconds since
        the epoch, names the whole second (``parse_until``)."""
        t = parse_until(until) if isinstance(until, str) else _time(until)
        if isinstance(until, int) and not isinstance(until, bool) and t is not None:
            t += timedelta(seconds=1) - timedelta(microseconds=1)
        kept = self._repo.kept_listing() if isinstance(spec, Snapshot) and t is None else None
        if kept is not None and spec.id in kept and _host(host) is None and not paths:
            return kept[spec.id]  # as it is now: the lock keeps it so (a restore looked each up again)
        snaps = self._list()
        looked_up, spec = spec, _spec(spec)
        try:
            snap = find_snapshot(snaps, spec, until=t, host=_host(host),
                                 filter_paths=_paths(paths, "path to select by") or None)
        except SnapshotNotFound as exc:
            self._refuse_if_damaged(spec, exc)
            if isinstance(looked_up, Snapshot) and all(s.id != looked_up.id for s in snaps):
                raise _forgotten_since(looked_up) from None
            raise
        if spec == "latest" and t is None:
            _tell_dated_ahead(snap)
        return snap

    def _refuse_if_damaged(self, spec: Any, exc: SnapshotNotFound) -> None:
        """Raise the error of the one unreadable snapshot that ``spec`` (an id or prefix) names, if so: such a
        snapshot is damaged, not missing (``copy ID`` said "no snapshot")."""
        if isinstance(exc, AmbiguousSnapshot) or not isinstance(spec, str) or not spec.strip() or spec == "latest":
            return
        damaged = [why for name, why in self._repo.unreadable_snapshots.items() if name.startswith(spec.lower())]
        if len(damaged) == 1:
            raise damaged[0] from None

    def tree(self, snapshot: str | Snapshot = "latest", path: str | bytes | None = None, *,
             subtree: str | bytes | None = None, recursive: bool = True,
             snapshots: list[Snapshot] | None = None) -> Iterator[Entry]:
        """The snapshot's entries in order; with ``path``, those of that path and below it, reading only
        the manifest blobs that hold them.  ``subtree``: a path of the snapshot taken as the root, as
        ``restore`` takes it: the entries are those below it, named relative to it (a file: under its
        name), and ``path`` is relative to it too.  ``recursive=False``: the path (the root when none)
        and, a directory, only the entries directly in it.  ``snapshots``: as ``owner_names`` takes it."""
        if not isinstance(recursive, bool):
            raise UsageError(f"recursive is True or False, not {recursive!r}")
        snap, chain = self._in_listing(snapshot, snapshots)
        sub = self._subtree(snap, subtree)
        named = snapshot_path(path) if path is not None else b""
        within = sub.snapshot_path(named) if path is not None else sub.root
        if not recursive:  # the subtrees of what lies in it are passed over, not read
            records = self._repo.tree_shallow(snap, within, chain)
        else:
            records = self._repo.tree(snap, chain) if not within else self._repo.tree_within(snap, within, chain)
        entries = (r.entry for r in sub.records(records)
                   if r.entry is not None and in_subtree(sub.snapshot_path(r.path), within))
        if not recursive:
            entries = (e for e in entries if e.path == named or e.path.rpartition(b"/")[0] == named)
        return self._guarded(entries)

    def _subtree(self, snapshot: str | Snapshot, path: str | bytes | None) -> Subtree:
        """``path`` of the snapshot as the root of a tree of its own (store/subtree.py); None or ``/``: the
        whole snapshot.  UsageError, as ``ls`` gives, when the snapshot has nothing there."""
        snap = self.snapshot(snapshot) if not isinstance(snapshot, Snapshot) else snapshot
        root = snapshot_path(path) if path is not None else b""
        e = self._entry_or_directory(snap, root) if root else None
        return Subtree(root, e is None or e.type == T_DIR, self._repo.lookups(snap),
                       f"tree of snapshot {snap.id}")

    def _guarded(self, items: Iterator[Any]) -> Iterator[Any]:
        """A lazy reader's items, each asked for after ``_still_open`` (the end too)."""
        still_open = self._still_open
        while True:
            still_open()
            try:
                item = next(items)
            except StopIteration:
                return
            yield item

    @_stoppable
    def restore(self, snapshot: str | Snapshot, target: str, *, until: str | datetime | None = None,
                host: str | None = None, paths: list[str] | None = None,
                includes: list[str] | None = None, excludes: list[str] | None = None,
                iexcludes: list[str] | None = None, force: bool = False, delta: bool = False,
                delete: bool = False, progress: Any = None, processes: int | None = None, verify: bool = False,
                xattrs: bool = True, numeric_owner: bool = False, subtree: str | bytes | None = None,
                overwrite: str = "always", relocate: Sequence[Relocation] = (), target_wait: float = 0.0
                ) -> RestoreResult:
        """Restore into ``target``: empty, or in place with ``force`` (``delta``: rewrite only what
        differs, checked by digest; ``delete``: remove what the snapshot does not have).

        The restore holds a lock on ``target`` until it is done (store/target_lock.py): another restore
        writing into it is waited for up to ``target_wait`` seconds, then refused with TargetBusy (a Locked).

        ``relocate``: directories of the snapshot restored into directories of their own instead, each
        ``Relocation``'s ``link`` in the target made a symbolic link to it (a database's tablespaces on their
        own disks: ``pgtablespace.relocations``); each such directory is empty, or restored into in place as
        the target is.  Not with ``subtree``, ``includes`` or ``excludes``: the whole snapshot is restored.

        ``overwrite``, in place: which entries the target has are replaced: ``"always"``; ``"if-changed"``
        (as ``delta``, but a file of the snapshot's size and mtime is taken as right unread); ``"if-newer"``
        (only where the snapshot's mtime is newer); ``"never"`` (only what the target lacks is written, and
        needs no ``force``: nothing the target has is changed, metadata included).  Entries kept are counted
        in ``skipped_existing``; ``never`` with ``delete``, and ``verify`` with ``if-newer`` or ``never``,
        are UsageErrors.

        ``verify``: then read every restored file back and compare it, and every restored entry's
        metadata, with the snapshot; VerificationFailed names what differs (what the target holds
        besides the restored entries is not looked at).

        An empty target on local storage is written by ``processes`` worker processes (default: one
        per core for a whole snapshot of 64 MiB or more; see store/restore_workers.py).  A restore
        narrowed by ``includes`` stays in one process unless told otherwise: each worker would read
        the whole tree to find the few files it writes.

        ``xattrs``: set the recorded extended attributes (one that cannot be set is a warning, e.g.
        ``security.*`` as another user than root, or on a file system without them).  ``host`` and ``paths``
        narrow what ``latest`` and ``until`` choose among, as in ``snapshot``.

        Owners are set when running as root: by the user and group names the snapshot recorded, where this
        machine knows them (``owner_map``), else by number; ``numeric_owner``: by number only.

        ``includes``, ``excludes``: globs matched against each path below the snapshot's root and each
        name, with their subtrees; excludes apply in order, ``!GLOB`` taking back what an earlier one left
        out (as ``backup``'s); ``iexcludes``: likewise, ignoring case.

        ``subtree``: a path of the snapshot (as ``tree`` names it) restored as the target's root, as
        `restore SNAPSHOT:PATH` does: a directory's contents land directly in the target (its own metadata
        on the target), a single file or link under its name.  Includes and excludes are then paths
        relative to it, and ``delete`` removes from the target what the directory lacks.  A hard link to a
        file outside it is restored as a copy of that file.  A path the snapshot lacks is a UsageError."""
        from .pgrecovery import refuse_running_server
        from .store import restore_workers
        from .store.forked import MAX_REQUESTED
        from .store.restore import Selection

        if type(target_wait) not in (int, float) or not 0 <= target_wait < math.inf:
            raise UsageError(f"target_wait is a number of seconds, not {target_wait!r}")
        if relocate:
            return self._restore_relocated(snapshot, target, list(relocate), until=until, host=host, paths=paths,
                                           includes=includes, excludes=excludes, iexcludes=iexcludes, force=force,
                                           delta=delta, delete=delete, progress=progress, processes=processes,
                                           verify=verify, xattrs=xattrs, numeric_owner=numeric_owner,
                                           subtree=subtree, overwrite=overwrite, target_wait=target_wait)
        includes, excludes = _globs(includes, "include"), _globs(excludes, "exclude")
        iexcludes = _globs(iexcludes, "iexclude")
        Selection(includes, excludes, iexcludes)  # a bad pattern is refused before anything is read
        if processes is not None and (type(processes) is not int or not 1 <= processes <= MAX_REQUESTED):
            raise UsageError(f"processes is a count from 1 to {MAX_REQUESTED}, not {processes!r}")
        if progress is not None and not callable(progress):
            raise UsageError(f"progress is a function (files, bytes), not {progress!r}")
        if not isinstance(target, (str, bytes, os.PathLike)) or not os.fspath(target):
            # "" was the current directory, where delete=True then deleted nothing it should have
            raise UsageError(f"a restore target must be a directory path, not {target!r} (\".\" for here)")
        absolute_path(os.fsdecode(target), "restore target")  # relative, from a directory removed: one line
        check_overwrite(overwrite, delete)
        if verify and overwrite in ("if-newer", "never"):
            raise UsageError(f"verify compares every entry with the snapshot: overwrite {overwrite} keeps entries "
                             "of the target's that differ from it")
        force = force or overwrite == "never"  # writes only what the target lacks: nothing there is changed
        began = time.monotonic()
        await_target(target, target_wait)  # one that another restore fills is that one's, not "not empty"
        target_wait = left_after(target_wait, began)  # the lock it writes under waits what is left, not all anew
        if not force and _is_nonempty_dir(target):
            raise TargetNotEmpty(f"restore target {os.fsdecode(target)} is not empty (force=True restores "
                                 "into it in place)")
        refuse_running_server(target)
        refuse_overlap(target, delete, [(root, "the repository") for root in _local_roots(self._repo.remote)])
        if subtree is not None:
            snapshot_path(subtree)  # a bad path is refused before anything is read
        with self.reading("restore"):
            snap = self.snapshot(snapshot, until=until, host=host, paths=paths)
            sub = self._subtree(snap, subtree)
            if delete and not sub.is_dir:
                # worded for both callers: the command line names its option, the API caller passed delete
                raise UsageError("deleting what the snapshot lacks").hinting(" (--delete)").explained(
                    f" with a single file ({os.fsdecode(sub.root)}) would leave the target holding that file "
                    "alone: restore its directory")
            opts = RestoreOptions(includes=includes, excludes=excludes, iexcludes=iexcludes, force=force,
                                  delta=delta, delete=delete, overwrite=overwrite, progress=self._progress(progress),
                                  checkpoint=self._checkpoint(), xattrs=xattrs, wait=target_wait,
                                  owner_map=None if numeric_owner else self.owner_map(snap))
            restorer = Restorer(self._repo, target, opts, lookup=sub.lookup, tree_name=f"tree of snapshot {snap.id}",
                                subtree=sub.root)
            restorer.result.snapshot = snap.id  # there before anything is written: an error's partial names it
            selected = restorer.selected.directory
            within = sub.root if selected is None else sub.snapshot_path(selected)

            def tree() -> Iterator[Record]:
                """What the selection can take: with a subtree, or includes that name a directory, only its
                part of the tree."""
                return sub.records(self._repo.tree(snap) if not within else self._repo.tree_within(snap, within))

            entries: int | None
            if sub.root:  # the snapshot's counts are the whole tree's: a walk of the subtree's part counts its own
                entries = expected = 0
                for rec in tree():
                    entries += 1
                    expected += rec.entry.size if rec.entry is not None and rec.entry.type == T_FILE else 0
            else:
                expected, files, dirs = (_count(snap.stats.get(k)) for k in ("bytes", "files", "dirs"))
                entries = files + (dirs or 0) if files is not None else None
            if processes is None:
                processes = 1 if includes else restore_workers.auto_processes(expected)

            with restorer:
                if delete and os.path.isdir(target):
                    restorer.check_target()  # refused before anything is deleted, not after
                    # first: frees space, and directory times end right
                    restorer.delete_extra(sub.records(self._repo.tree(snap) if not sub.root
                                                      else self._repo.tree_within(snap, sub.root)))
                result = restore_workers.restore(restorer, tree, processes, entries, expected)
                if verify:  # the target still open: compared through its descriptor (``Restorer.root``)
                    self._verify_restored(restorer, snap, tree(), target, xattrs)
            return result

    def _restore_relocated(self, snapshot: str | Snapshot, target: str, relocate: list[Relocation], *,
                           until: str | datetime | None, host: str | None, paths: list[str] | None,
                           includes: list[str] | None, excludes: list[str] | None, iexcludes: list[str] | None,
                           subtree: str | bytes | None, force: bool, overwrite: str, progress: Any,
                           **options: Any) -> RestoreResult:
        """``restore`` with ``relocate``: the target without the relocated directories, then each of them
        into its own directory (a restore of that subtree), then each link made, every lock held to the end
        (``holding``) and waited for within one ``target_wait``.  What can be refused is refused before
        anything is written."""
        with holding():
            return self._restore_relocated_held(snapshot, target, relocate, until=until, host=host, paths=paths,
                                                includes=includes, excludes=excludes, iexcludes=iexcludes,
                                                subtree=subtree, force=force, overwrite=overwrite,
                                                progress=progress, **options)

    def _restore_relocated_held(self, snapshot: str | Snapshot, target: str, relocate: list[Relocation], *,
                                until: str | datetime | None, host: str | None, paths: list[str] | None,
                                includes: list[str] | None, excludes: list[str] | None, iexcludes: list[str] | None,
                                subtree: str | bytes | None, force: bool, overwrite: str, progress: Any,
                                target_wait: float = 0.0, **options: Any) -> RestoreResult:
        if subtree is not None or includes or excludes or iexcludes:
            raise UsageError("relocating directories restores a whole snapshot: give no subtree, includes or "
                             "excludes with it")
        in_place = force or overwrite == "never"
        target_dir = os.path.abspath(os.fspath(target))
        intos: list[str] = []
        for r in relocate:
            if not isinstance(r, Relocation):
                raise UsageError(f"relocate is a list of Relocation, not {r!r}")
            into = os.path.abspath(r.into)
            for other in [target_dir, *intos]:
                if into == other or _inside_dir(into, other) or _inside_dir(other, into):
                    raise UsageError(f"{r.into} overlaps {other}: each relocated directory is one of its own, "
                                     "outside the target")
            if os.path.lexists(into) and not os.path.isdir(into):  # refused by its own restore, after the target's
                raise UsageError(f"{r.into} is not a directory: the tablespace cannot be restored into it")
            if not in_place and _is_nonempty_dir(into):
                raise UsageError(f"{r.into} is not empty (restoring into it in place takes force)")
            at = os.path.join(target_dir, os.fsdecode(r.link))
            if not os.path.islink(at) and _is_nonempty_dir(at):
                raise UsageError(f"{at} is a directory that is not empty: it cannot become the link to {r.into}")
            intos.append(into)
        snap = self.snapshot(snapshot, until=until, host=host, paths=paths)
        for r in relocate:
            if not r.subtree or not self._subtree(snap, r.subtree).is_dir:
                raise UsageError(f"{os.fsdecode(r.subtree) or '/'} is not a directory of snapshot {snap.id[:8]}")
        done = [0, 0]

        def step(files: int, nbytes: int) -> None:
            progress(done[0] + files, done[1] + nbytes)

        escaped = [os.fsdecode(re.sub(rb"([*?\[\\])", rb"[\1]", r.subtree)) for r in relocate]
        results = []
        parts = [(target_dir, None, escaped), *((i, r.subtree, None) for i, r in zip(intos, relocate))]
        for into in [target_dir, *intos]:  # each lock taken before anything is written, all from one wait
            began = time.monotonic()
            with target_held(into, target_wait):
                pass  # kept (``holding``) until all is done
            target_wait = left_after(target_wait, began)
        for into, sub, exclude in parts:
            result = self.restore(snap, into, excludes=exclude, subtree=sub, force=force, overwrite=overwrite,
                                  progress=step if progress is not None else None, target_wait=target_wait,
                                  **options)
            results.append(result)
            done[0] += result.files
            done[1] += result.bytes
        merged = merged_results(results)
        merged.snapshot = snap.id
        try:
            for into, r in zip(intos, relocate):
                link_relocated(target_dir, r, into)
        except ChunkvaultError as exc:
            exc.partial = merged  # the files are in: said, as a restore that wrote all else says it
            raise
        return merged

    def owner_names(self, snapshot: str | Snapshot, *, snapshots: list[Snapshot] | None = None
                    ) -> tuple[dict[int, str], dict[int, str]]:
        """(users, groups): the names the backups of ``snapshot``'s chain recorded for its owner ids.
        ``snapshots``: a listing the caller holds (``snapshots()``), in which a Snapshot is taken as it is
        there: asked for each version `find` gives or each snapshot a mount opens, listing the repository
        each time made those quadratic in its snapshots."""
        if snapshots is None or not isinstance(snapshot, Snapshot):
            snap = self.snapshot(snapshot)
        else:
            snap = snapshot
        return chain_names(s.stats for s in ([snap] if snap.kind_full else self._chains_in(snapshots)(snap)))

    def _chains_in(self, snapshots: list[Snapshot] | None) -> Callable[[Snapshot], list[Snapshot]]:
        """``Repo.chains`` of a listing the caller holds, indexed once for the calls that pass it again: `find`
        asks for each version's owners, a mount for each snapshot it opens, and indexing the whole listing at
        each call made them quadratic (2,000 versions among 17,000 snapshots: 33 s)."""
        if snapshots is None:
            return self._repo.chains()
        held = self._indexed_listing
        if held is None or held[0] is not snapshots or held[1] != len(snapshots):
            held = self._indexed_listing = (snapshots, len(snapshots), self._repo.chains(snapshots))
        return held[2]

    def _in_listing(self, snapshot: str | Snapshot, snapshots: list[Snapshot] | None
                    ) -> tuple[Snapshot, list[Snapshot] | None]:
        """The snapshot and its chain (None: found at the read) for a read of its tree.  A Snapshot in a listing
        the caller holds (``snapshots``) is taken as it is there, with the index read with that listing (the
        caller refreshes both): a mount's ``ls -l snapshots/`` listed the repository and its index anew for
        each snapshot it showed, quadratic in their number (2,000 snapshots: over two minutes)."""
        if snapshots is None or not isinstance(snapshot, Snapshot):
            self._follow_others()
            return self.snapshot(snapshot), None
        self._refuse_if_closed()
        return snapshot, self._chains_in(snapshots)(snapshot)

    def owner_map(self, snapshot: str | Snapshot, *, snapshots: list[Snapshot] | None = None) -> OwnerMap:
        """The ids a restore of ``snapshot`` gives its entries' recorded owner ids on this machine: those
        whose user or group name, as the backup recorded it, is known here under another id."""
        return OwnerMap.from_names(*self.owner_names(snapshot, snapshots=snapshots))

    def _verify_restored(self, restorer: Restorer, snap: Snapshot, records: Iterator[Record], target: str,
                         xattrs: bool) -> None:
        from .verify import compare_tree

        # The root's metadata left as another user's target had it (``Restorer.root_left``) is no difference.
        restored = (r.entry for r in restorer.selected_records(records)
                    if r.entry is not None and (r.path or not restorer.root_left))
        # By name, a target moved aside and replaced by a symbolic link once restored had the link's destination
        # compared (its probe files made there, its modes opened up a moment), not what was restored.
        found = compare_tree(restored, restorer.root, extras=False, max_listed=3, xattrs=xattrs)
        if found.mismatch_count:
            more = found.mismatch_count - len(found.mismatches)
            raise VerificationFailed(f"restore --verify: {found.mismatch_count} difference(s) from snapshot "
                                     f"{snap.short_id} in {target}: " + "; ".join(map(str, found.mismatches))
                                     + (f"; and {more} more" if more else ""))

    def find_entry(self, snapshot: str | Snapshot, path: str | bytes, *,
                   snapshots: list[Snapshot] | None = None) -> Entry:
        """The entry at ``path``, reading only the manifest blobs that can hold it; ``snapshots``: as
        ``owner_names`` takes it."""
        snap, chain = self._in_listing(snapshot, snapshots)
        want = snapshot_path(path)
        rec = self._repo.lookup(snap, want, chain)
        if rec is not None and rec.entry is not None:
            return rec.entry
        raise UsageError(f"no '{os.fsdecode(want)}' in snapshot {snap.short_id}")  # the CLI escapes it

    def open_file(self, snapshot: str | Snapshot, path: str | bytes) -> BinaryIO:
        """A readable stream of one file's content, fetched chunk by chunk."""
        snap = self.snapshot(snapshot)
        return self._file_content(snap, self.find_entry(snap, path))

    def _file_content(self, snap: Snapshot, e: Entry) -> BinaryIO:
        """The content of the file ``e`` names (itself, or the file a hard link names), named as ``e``."""
        name = e.path
        if e.type == T_HARDLINK:
            e = self.find_entry(snap, e.target)
        if e.type != T_FILE:
            raise UsageError(f"'{os.fsdecode(e.path)}' is not a regular file")
        if unread(e):  # an empty file would pass for its content
            raise MissingObject(f"file {os.fsdecode(name)}", "unreadable at backup time: no backup read its data")
        return self._content(e, name)

    def _content(self, e: Entry, name: bytes | None = None) -> BinaryIO:
        raw = _ChunkStream(self._repo, e.chunk_ids(), os.fsdecode(e.path if name is None else name), e,
                           self._still_open)
        return _CheckedReader(raw, buffer_size=1 << 20)

    def is_directory(self, snapshot: str | Snapshot, path: str | bytes, *, subtree: str | bytes | None = None) -> bool:
        """Whether ``path`` of the snapshot (of its ``subtree``, as ``dump`` takes it) is a directory (``dump``
        writes it as an archive); UsageError when the snapshot has nothing there."""
        snap = self.snapshot(snapshot)
        e = self._entry_within(snap, self._subtree(snap, subtree), snapshot_path(path))
        return e is None or e.type == T_DIR

    def _entry_within(self, snap: Snapshot, sub: Subtree, rel: bytes) -> Entry | None:
        """``_entry_or_directory`` of a path of ``sub`` (the snapshot's entry); None for its root, which a
        single file's tree has no entry for."""
        if not sub.is_dir and rel not in (b"", sub.name):
            raise UsageError(f"no '{os.fsdecode(rel)}' in {os.fsdecode(sub.root)} of snapshot {snap.short_id}: "
                             f"it is a single entry, named {os.fsdecode(sub.name)}")
        if not rel and sub.root:
            return None
        if not sub.root:
            return self._entry_or_directory(snap, rel)
        # named as ls names it, relative to the subtree; ".." leading out of it names nothing there (the
        # snapshot's own lookup would follow it to a path outside)
        missing = UsageError(f"no '{os.fsdecode(rel)}' in {os.fsdecode(sub.root)} of snapshot {snap.short_id}")
        if rel == b".." or rel.startswith(b"../"):
            raise missing
        try:
            return self._entry_or_directory(snap, sub.snapshot_path(rel))
        except UsageError:
            raise missing from None

    def _entry_or_directory(self, snap: Snapshot, want: bytes) -> Entry | None:
        """The entry of ``want``, or None for a directory with no entry of its own: the root of a snapshot
        of several paths, or one above a --stdin-name with a directory in it (one if something lies below
        it)."""
        try:
            return self.find_entry(snap, want)
        except UsageError:
            if want and next(iter(self.tree(snap, want)), None) is None:
                raise
            return None

    @_stoppable
    def dump(self, snapshot: str | Snapshot, path: str | bytes, out: BinaryIO, *, archive: str = "tar",
             subtree: str | bytes | None = None) -> list[str]:
        """Write ``path`` of the snapshot to ``out``: a file's content, or a directory's subtree (``/``: the
        whole snapshot) as a tar or zip ``archive`` with names relative to the snapshot's root. Returns
        warnings (entries a zip cannot hold).  ``subtree``: a path of the snapshot taken as the root (as
        ``restore`` takes it): ``path`` and the archive's names are relative to it."""
        from .store.archive import ARCHIVES, in_subtree, write_archive

        if archive not in ARCHIVES:
            raise UsageError(f"unknown archive format {archive!r} (tar or zip)")
        out = _WholeWrites(out, self._checkpoint())
        with self.reading("dump"):
            snap = self.snapshot(snapshot)
            sub = self._subtree(snap, subtree)
            rel = snapshot_path(path)
            want = sub.snapshot_path(rel)
            e = self._entry_within(snap, sub, rel)
            if e is not None and e.type != T_DIR:
                held = self.find_entry(snap, e.target) if e.type == T_HARDLINK else e
                holes = self.holes(held) if _ends_regular_file(out) else []
                with self._file_content(snap, e) as f:
                    _copy_leaving_holes(f, out, holes)
                return []
            # refused as a restore refuses them: paths out of the archive's root, links out of the tree
            records = confined(sub.records(self._repo.tree(snap) if not want else self._repo.tree_within(snap, want)),
                               f"tree of snapshot {snap.id}")
            entries = (r.entry for r in records if r.entry is not None and in_subtree(r.path, rel))

            def linked(target: bytes) -> Entry:
                rec = sub.lookup(target)
                if rec is None or rec.entry is None:
                    raise UsageError(f"no '{os.fsdecode(target)}' in snapshot {snap.short_id}")
                return rec.entry

            return write_archive(out, archive, entries, rel, self._content, linked, self.owner_names(snap),
                                 self.holes)

    def holes(self, e: Entry) -> list[tuple[int, int]]:
        """The (offset, length) of each run of 1 MiB or more of a file's chunks that hold only zeros, told by
        their ids, unread: what ``dump`` leaves out of a tar as a sparse member's holes, and what the mount's
        SEEK_HOLE finds.  No run for a file whose chunks are not all indexed or do not add up to its size: its
        read names the damage."""
        from array import array

        from .store.archive import SPARSE_LEAST, ChunkLengths, zero_runs

        if e.type != T_FILE or e.size < SPARSE_LEAST:
            return []
        if self._zero_ids is None:
            self._zero_ids = functools.lru_cache(maxsize=16)(lambda n: self._repo.blob_id(bytes(n)))
        cut = len(self._repo.chunker.zero_chunk)
        ids = e.chunk_ids()
        zeros = self._zero_ids(cut)
        after = itertools.chain(itertools.islice(ids, 1, None), (None,))
        if not any(cid == zeros or cid == nxt for cid, nxt in zip(ids, after)):
            return []  # a run starts with a chunk of zeros the chunker cut, or one repeated: none here, unlocated
        lengths = array("Q")
        for cid in ids:
            loc = self._repo.locate(cid)
            if loc is None:
                return []
            lengths.append(loc.raw_length)
        if sum(lengths) != e.size:
            return []
        return zero_runs(ChunkLengths(ids, lengths), self._zero_ids, cut)

    def diff(self, a: str | Snapshot, b: str | Snapshot, *, subtree_a: str | bytes | None = None,
             subtree_b: str | bytes | None = None) -> Iterator[tuple[str, Entry | None, Entry | None]]:
        """(change, old, new) for every path that differs: added, removed, modified.  ``subtree_a``,
        ``subtree_b``: a path of each snapshot compared as its root (as ``tree`` takes ``subtree``), with
        paths relative to it: `diff A:etc B:etc`, or a directory that moved."""
        self._follow_others()
        sa, sb = self.snapshot(a), self.snapshot(b)
        ta, tb = self._subtree(sa, subtree_a), self._subtree(sb, subtree_b)

        def holder(sub: Subtree) -> Callable[[bytes], Entry | None]:
            def find(path: bytes) -> Entry | None:
                rec = sub.lookup(path)
                return None if rec is None else rec.entry
            return find

        def walk(snap: Snapshot, sub: Subtree) -> AheadWalk:
            return self._repo.tree_within(snap, sub.root) if sub.root else self._repo.tree(snap)

        def changes() -> Iterator[tuple[str, Entry | None, Entry | None]]:
            wa, wb = walk(sa, ta), walk(sb, tb)
            wa.begin()  # both read ahead before either walks: their chains share blobs
            wb.begin()
            yield from diff_trees(ta.records(wa), tb.records(wb), holder(ta), holder(tb))

        return self._guarded(changes())

    @_stoppable
    def check(self, *, read_data: bool = False, subset: str | None = None,
              progress: Callable[[int, int, int], None] | None = None, accept_state: bool = False) -> CheckReport:
        """Verify structure; with ``read_data`` every blob too, or with ``subset`` those of some packs: "1/7" (the
        first of seven slices), "10%" (each pack by chance), "500M" (random packs holding at least that much).

        A replayed or rolled-back snapshot set (by this client's ledger) is a problem naming the
        snapshot; ``accept_state`` accepts the set as it is instead (reported as warnings).
        ``progress(packs checked, bytes read, bytes to read)`` is called as packs are done.
        """
        from .store.check import Checker, Problem

        if subset is not None and not isinstance(subset, str):
            raise UsageError(f"a check subset is text like \"1/7\", \"10%\" or \"500M\", not {subset!r}")
        with self.reading("check"):
            checker = Checker(self._repo, read_data=read_data, subset=subset, progress=self._progress(progress))
            report = checker.run()
            report.warnings += self._wal_gaps(checker.wal)
            accepted = self.accept_state() if accept_state else []  # after the check: its snapshots are loaded
            if self._ledger is not None:
                before = self._ledger.state()
                damaged = {p.object: p for p in report.problems}
                present, digests = self._present_for_check()
                for f in self._ledger.findings(present, before, digests):
                    key = f"snapshots/{f.snapshot_id}"
                    if f.kind == UNREADABLE and key in damaged:  # one problem says both
                        damaged[key].problem += f"; {f.message()}"
                    else:
                        report.problems.append(Problem(key, f"{f.message()}: inspect the storage, then {remedy(f)}",
                                                       snapshots=[f.snapshot_id]))
            report.warnings.extend(f"accepted: {line}" for line in accepted)
        return report

    @_stoppable
    @_edits_snapshots
    def forget(self, snapshots: Iterable[str] = (), *, policy: RetentionPolicy | None = None,
               dry_run: bool = False, now: datetime | None = None, hosts: Iterable[str] = (),
               tags: Iterable[str] = (), paths: Iterable[str] = (), wait: float = 3600.0,
               allow_remove_all: bool = False,
               scope: Callable[[list[Snapshot]], Iterable[Snapshot]] | None = None,
               tz: tzinfo | None = None, planned: Iterable[Snapshot] = ()) -> ForgetPlan:
        """Remove snapshots (named, or by a retention policy); kept differentials are rebased first.
        A policy that would keep none of a group's snapshots is refused unless ``allow_remove_all``.
        The policy's days, weeks, months and years are those of ``tz`` (None: this machine's local time,
        as restic's are).

        ``hosts``, ``tags``, ``paths``: the policy applies to the snapshots these select
        (``select_snapshots``) and keeps every other; ``scope`` narrows that further, given the
        listing read under the lock (a policy file's source: its own history).  The plan is made and carried out under the
        exclusive lock (waiting up to ``wait`` seconds for running backups): a backup must not
        build on a snapshot being forgotten, nor another forget rebase what this one plans from.
        ``planned`` (a dry run only): snapshots about to be saved, counted as if they were (a policy's dry
        run, whose retention follows the backups it would make)."""
        from .store.lifecycle import apply_forget
        from .store.locks import EXCLUSIVE, RepoLock
        from .store.retention import RetentionPolicy

        snapshots = [_spec(s) for s in _listed(snapshots)]
        if policy is not None and not isinstance(policy, RetentionPolicy):
            raise UsageError(f"policy is a RetentionPolicy, not {policy!r}")
        hosts, tags, paths = _filters(hosts, tags, paths).values()
        if tz is not None and not isinstance(tz, tzinfo):
            raise UsageError(f"tz is a datetime.tzinfo (or None for local time), not {tz!r}")
        if tz is None and policy is not None:
            check_local_zone()
        planned = list(planned)
        if planned and not dry_run:
            raise UsageError("planned snapshots are counted by a dry run only: nothing is removed for them")
        if dry_run:
            return self._plan_forget(self._list() + planned, snapshots, policy, now, hosts, tags, paths,
                                     allow_remove_all, scope, tz)[0]
        with RepoLock(self._repo.remote, EXCLUSIVE, "forget", wait=wait) as lock:
            snaps = self._repo.reload_snapshots()
            plan, whole = self._plan_forget(snaps, snapshots, policy, now, hosts, tags, paths, allow_remove_all,
                                            scope, tz)
            # Forgetting a replayed snapshot again, by id, is allowed: it is the natural fix.
            self._guard(snaps, forgetting=plan.remove if policy is None else ())
            self._repo.load_index()
            self._forgetting(snaps, plan.remove, lambda: apply_forget(self._repo, whole, plan, lock.ensure_held))
        return plan

    def _plan_forget(self, snaps: list[Snapshot], specs: list[str], policy: RetentionPolicy | None,
                     now: datetime | None, hosts: Iterable[str], tags: Iterable[str], paths: Iterable[str],
                     allow_remove_all: bool, scope: Callable[[list[Snapshot]], Iterable[Snapshot]] | None = None,
                     tz: tzinfo | None = None) -> tuple[ForgetPlan, list[Snapshot]]:
        """What forget does with this listing: the plan, and the snapshots whose chains are whole."""
        from .store.lifecycle import plan_forget
        from .store.retention import Decision

        damaged = self._repo.unreadable_snapshots
        find = SnapshotFinder(snaps)
        if specs and policy is not None:  # the ids were dropped, and the policy applied to every snapshot
            raise UsageError("give snapshot ids or a retention policy, not both").hinting(" (--keep-*)")
        ids, gone = [], []
        for spec in specs:
            try:
                ids.append(self._forget_id(spec, find, damaged))
            except AmbiguousSnapshot:
                raise
            except SnapshotNotFound as exc:  # a forget run again after it was stopped: the rest still go
                gone.append((spec, exc))
        # Every snapshot named gone, and forgotten by this client: a forget run again (after it was killed,
        # say), whose --prune must still run.  Otherwise an id was mistyped: the error names one such.
        forgotten = self._forgotten_here()
        unknown = [exc for spec, exc in gone if not any(spec and sid.startswith(spec.lower()) for sid in forgotten)]
        if unknown and not ids:
            raise unknown[0]
        for _, exc in gone:
            warnings.warn(f"{exc}: left out (forgotten already?)", RepositoryStateWarning, stacklevel=4)
        if policy is None and not ids and not gone:
            raise UsageError("nothing to forget: name snapshots or give a retention policy")
        hosts, tags, paths = list(hosts), list(tags), list(paths)
        filtered = bool(hosts or tags or paths) or scope is not None
        if filtered and policy is None:
            raise UsageError("host, tag and path filters select the snapshots a retention policy applies to; "
                             "give a policy (snapshots named by id need no selection)").hinting(" (--keep-*)")
        # A snapshot that does not load, and every differential built on it, cannot be placed by retention
        # nor rebased: they go by id, without rebases, and one built on a snapshot that goes must go too.
        broken = broken_chains({s.id: s.parent for s in snaps})  # readable, built on what is not: id -> that
        lost = set(damaged) | set(broken)
        newer = [exc for exc in damaged.values() if isinstance(exc, NewerObject)]
        if newer:  # it may build on what goes: it could neither be rebased nor be told from an unrelated one
            raise newer[0].explained("; forget needs every snapshot")
        if policy is not None and lost:
            named = sorted(lost)
            listed = " ".join(sid[:8] for sid in named[:10]) + (" ..." if len(named) > 10 else "")
            raise CorruptObject(f"snapshots/{named[0]}", f"unreadable, or a differential on one that is "
                                f"({len(named)} such: {listed}): retention needs every chain whole; forget them "
                                "by id first (`repair snapshots` lists them)")
        stranded = [(sid, below) for sid, below in broken.items() if below in ids and sid not in ids]
        if stranded:
            sid, below = stranded[0]
            raise CorruptObject(f"snapshots/{sid}", f"a differential on {below[:8]}, which is unreadable: "
                                "forget it too (nothing can rebase it)")
        whole = [s for s in snaps if s.id not in broken]
        selected = ({s.id for s in select_snapshots(whole, hosts=hosts, tags=tags, paths=paths)}
                    if filtered else None)
        if scope is not None:
            assert selected is not None
            selected &= {s.id for s in scope(whole)}
        plan = plan_forget(whole, policy=policy, ids=[i for i in ids if i not in lost], now=now, selected=selected,
                           allow_remove_all=allow_remove_all, tz=tz)
        direct = [i for i in ids if i in lost]
        plan.decisions += [Decision(i, False, ("named on the command line",)) for i in direct]
        plan.remove += direct
        plan.listed.update((s.id, s) for s in snaps if s.id in broken)  # the times of those that load
        return plan, whole

    def _forgotten_here(self) -> list[str]:
        """The ids this client's ledger has forgotten, or being forgotten."""
        if self._ledger is None:
            return []
        state = self._ledger.state()
        return [*state.forgotten, *state.pending]

    @staticmethod
    def _forget_id(spec: str, find: SnapshotFinder, damaged: dict[str, CorruptObject]) -> str:
        """A snapshot to forget: a readable one as ``find_snapshot`` resolves it, or an unreadable one by
        its id or a unique prefix."""
        try:
            return find(spec).id
        except SnapshotNotFound:
            found = [n for n in damaged if spec and n.startswith(spec.lower())]
            if len(found) != 1:
                raise
            return found[0]

    def _forgetting(self, snaps: list[Snapshot], remove: list[str], run: Callable[[], Any]) -> Any:
        """Delete snapshots (``run``) with the ledger told before (pending, so a forget killed
        half-way is not taken for a rollback) and after."""
        if self._ledger is None or not remove:
            return run()
        self._ledger.forgetting(remove)
        out = run()
        gone = set(remove)
        left = {n: e for n, e in self._repo.unreadable_snapshots.items() if n not in gone}
        self._ledger.forgot(remove, present_of((s for s in snaps if s.id not in gone), left))
        return out

    @_stoppable
    @_edits_snapshots
    def aggregate(self, snapshot: str | Snapshot, *, retire: bool = False, wait: float = 3600.0,
                  dry_run: bool = False, hosts: Iterable[str] = (), tags: Iterable[str] = (),
                  paths: Iterable[str] = ()) -> Aggregated:
        """Turn a differential into a synthetic full (same id, same tree); ``retire`` forgets its old chain.
        Under the exclusive lock, as forget is; ``dry_run`` says what it would do, taking no lock and writing
        nothing.  ``hosts``, ``tags``, ``paths``: ``snapshot`` is looked up among the snapshots they select
        (``latest`` with a path: that source's newest)."""
        from .store.lifecycle import aggregate, plan_aggregate, replaced_chain
        from .store.locks import EXCLUSIVE, RepoLock

        spec = _spec(snapshot)
        hosts, tags, paths = _filters(hosts, tags, paths).values()

        def chosen(snaps: list[Snapshot]) -> tuple[Snapshot, list[str]]:
            snap = self._chosen(snaps, [spec], hosts, tags, paths)[0]
            chain = replaced_chain(self._repo, snap, snaps) if retire else []  # what the ledger is told goes
            newer = [e for e in self._repo.unreadable_snapshots.values() if isinstance(e, NewerObject)]
            if chain and newer:  # it may build on the chain: it could not be rebased, as forget refuses too
                raise newer[0].explained("; aggregate --retire needs every snapshot (without --retire it "
                                         "forgets nothing)")
            return snap, chain

        if dry_run:
            snaps = self._list()
            return plan_aggregate(self._repo, chosen(snaps)[0], snaps, retire=retire)
        with RepoLock(self._repo.remote, EXCLUSIVE, "aggregate", wait=wait) as lock:
            snaps = self._guard(self._repo.reload_snapshots())
            snap, chain = chosen(snaps)
            self._repo.load_index()
            return self._forgetting(snaps, chain, lambda: aggregate(self._repo, snap, snaps, retire=retire,
                                                                    ensure_held=lock.ensure_held))

    @_stoppable
    def prune(self, *, max_unused: float = 0.05, max_repack_size: int | str | None = None, dry_run: bool = False,
              wait: float = 0.0, progress: Callable[[int, int, int], None] | None = None) -> PrunePlan:
        """Delete packs no snapshot needs; repack those more than ``max_unused`` unused, at most
        ``max_repack_size`` bytes of their live data (e.g. ``"100M"``; the packs with most unused first; the
        rest is left for a later prune: on a disk without room to repack everything at once).

        ``progress(pack operations done, bytes repacked, bytes to repack)`` is called as it goes.
        """
        from .store.prune import prune

        max_unused = parse_share(max_unused)
        max_repack = None if max_repack_size is None else parse_size(max_repack_size)
        if dry_run:
            self._list()
        else:
            self._guard()
        return prune(self._repo, max_unused=max_unused, max_repack=max_repack, dry_run=dry_run, wait=wait,
                     progress=self._progress(progress))

    @_stoppable
    def copy_to(self, destination: "Repository", snapshots: Iterable[str] = (),
                progress: Callable[[int, int], None] | None = None, *, hosts: Iterable[str] = (),
                tags: Iterable[str] = (), paths: Iterable[str] = (), wait: float = 3600.0,
                wal: bool = False) -> CopyResult:
        """Copy snapshots (default: all; or those the filters select, of them those named) with their chains;
        only what the destination lacks is sent. ``wait``: seconds to wait for a prune, forget or repair
        running on either repository.  ``wal``: the archived WAL files the destination lacks too (a
        point-in-time recovery off-site needs them beside the snapshots), but those before the start of its
        oldest base backup, which no recovery from its snapshots reads (an ``archive-expire --before
        oldest-snapshot`` there removed them; ``wal_unneeded`` counts them).

        ``progress(blobs sent, bytes sent)`` is called as blobs arrive.
        """
        from .store.copy import copy_snapshots

        if not isinstance(destination, Repository):
            raise UsageError(f"copy_to needs a destination Repository, not {destination!r}")
        if destination._repo.config.repo_id == self._repo.config.repo_id:
            raise UsageError("copy's destination has this repository's id: it is this repository, or a "
                             "file-level copy of it (a mirror kept by rsync, which stays in step by copying its "
                             "files; `init` a repository to copy snapshots into)")
        with self.reading("copy", wait=wait):
            snaps = self._list()
            snapshots = _listed(snapshots)
            hosts, tags, paths = _filters(hosts, tags, paths).values()
            ids = ([s.id for s in self._chosen(snaps, snapshots or None, hosts, tags, paths)]
                   if snapshots or hosts or tags or paths else None)
            with destination._operation(self._current.op):  # either object's stop stops it
                destination._guard()
                result = copy_snapshots(self._repo, destination._repo, ids, progress=self._progress(progress),
                                        wait=wait, wal=bool(wal), unneeded_wal=destination._unneeded_wal)
        return result

    @_stoppable
    def repair_index(self, *, wait: float = 0.0) -> RepairReport:
        """Rebuild the index from the pack headers (waiting up to ``wait`` seconds for the exclusive lock)."""
        from .store.repair import repair_index

        return repair_index(self._repo, wait=wait)

    @_stoppable
    def repair_packs(self, packs: list[str], *, dry_run: bool = True, wait: float = 3600.0) -> RepairReport:
        """Salvage damaged packs (ids or unique prefixes): copy what still verifies, drop the packs."""
        from .store.repair import repair_packs

        if not dry_run:
            self._guard()
        return repair_packs(self._repo, _listed(packs), dry_run=dry_run, wait=wait)

    @_stoppable
    @_edits_snapshots
    def repair_snapshots(self, *, dry_run: bool = True, wait: float = 3600.0) -> RepairReport:
        """Drop (list, and with ``dry_run=False`` rewrite) files whose data is gone."""
        from .store.repair import repair_snapshots

        if not dry_run:
            self._guard()
        return repair_snapshots(self._repo, dry_run=dry_run, wait=wait)

    @_stoppable
    def repair_wal(self, *, dry_run: bool = True, wait: float = 3600.0) -> RepairReport:
        """List (and with ``dry_run=False`` remove) the archived WAL objects that do not load: prune needs every
        one, and their data is lost either way."""
        from .store.repair import RepairReport
        from .store.walarchive import damaged

        if not dry_run:
            self._guard()
        return RepairReport(damaged_wal=damaged(self._repo, dry_run=dry_run, wait=wait), dry_run=dry_run)

    @_stoppable
    def unlock(self, *, remove_all: bool = False) -> LocksRemoved:
        """Remove the stale locks now (any command removes those it meets; this one tells what it removed and
        who holds the rest).  ``remove_all``: live locks too, for commands known to be dead or hung on another
        machine: a live command whose lock goes stops at its next step that relies on it (a backup saves no
        snapshot), but may take up to a second to notice, in which a prune still deletes.  This process's own
        locks always stay."""
        from .store.locks import remove_locks

        return remove_locks(self._repo.remote, remove_all=remove_all)

    @_stoppable
    @_edits_snapshots
    def tag(self, snapshots: Iterable[str | Snapshot] | None = None, *, add: Iterable[str] = (),
            remove: Iterable[str] = (), set_to: Iterable[str] | None = None, hosts: Iterable[str] = (),
            tags: Iterable[str] = (), paths: Iterable[str] = (), wait: float = 3600.0) -> list[Snapshot]:
        """Change the tags of the snapshots named (all the filters select, when none are): ``set_to``
        replaces them, then ``remove`` and ``add`` apply.  Each changed snapshot object is written again
        under its id (its data untouched); returns those changed."""
        from .store.rewrite import retag_snapshots

        add, remove = _texts(add, "tag"), _texts(remove, "tag")
        set_to = None if set_to is None else _texts(set_to, "tag")
        if set_to is None and not add and not remove:
            raise UsageError("tag: give tags to add, to remove or to set").hinting(" (--add, --remove, --set)")
        check_one_line(add + (set_to or []))
        self._guard()
        return retag_snapshots(self._repo, lambda every: self._chosen(every, snapshots, hosts, tags, paths),
                               add=add, remove=remove, set_to=set_to, wait=wait)

    @_stoppable
    @_edits_snapshots
    def rewrite(self, excludes: list[str] | None = None, snapshots: Iterable[str | Snapshot] | None = None, *,
                hosts: Iterable[str] = (), tags: Iterable[str] = (), paths: Iterable[str] = (),
                dry_run: bool = True, wait: float = 3600.0, iexcludes: list[str] | None = None,
                new_host: str | None = None) -> RewriteReport:
        """Remove the paths ``excludes`` match (as ``backup`` excludes, with their subtrees, in order, ``!GLOB``
        taking back what an earlier one left out; ``iexcludes`` ignoring case) from every snapshot, or from
        those the filters select, of them those named; same ids, chains kept.  Lists what would go until
        ``dry_run=False``; ``prune`` then frees the data nothing references.

        ``new_host`` instead: give the snapshots selected (by the filters or by name: never all by default) that
        host, so that backups under it build on them; a chain keeps one host, so one selected in part is
        refused.  Not with ``excludes``: one kind of rewrite per call."""
        from .store.rewrite import rehost_snapshots, rewrite_snapshots

        globs, iglobs = _globs(excludes, "exclude"), _globs(iexcludes, "iexclude")
        if new_host is not None:
            check_one_line([], _host(new_host))
            if globs or iglobs:
                raise UsageError("rewrite gives snapshots a new host or removes paths from them, not both at once: "
                                 "run it once for each")
            if snapshots is None and not any(_filters(hosts, tags, paths).values()):
                raise UsageError("rewrite with a new host renames only snapshots selected by host, tag, path or "
                                 "name, never every snapshot by default"
                                 ).hinting(" (--host OLD, --tag, --path, or ids)")
        self._list() if dry_run else self._guard()

        def select(every: list[Snapshot]) -> list[Snapshot]:
            return self._chosen(every, snapshots, hosts, tags, paths)

        if new_host is not None:
            return rehost_snapshots(self._repo, select, new_host, dry_run=dry_run, wait=wait)
        return rewrite_snapshots(self._repo, select, globs, dry_run=dry_run, wait=wait, iglobs=iglobs)

    @_stoppable
    def export(self, snapshot: str | Snapshot, path: str, password: str | bytes, *, kdf_seconds: float = 0.5,
               overwrite: bool = False) -> ExportStats:
        """Write one snapshot (its chain resolved) into a self-contained encrypted .backup file."""
        from .store.export import export

        _file_path(path, "export file")
        with self.reading("export"):
            snap = self.snapshot(snapshot)
            return export(self._repo, snap, path, _password(password), kdf_seconds=kdf_seconds, overwrite=overwrite,
                          checkpoint=self._checkpoint())

    @_stoppable
    def import_backup(self, path: str, password: str | bytes, *, wait: float = 3600.0, delta: bool = True,
                      no_delta: list[str] | None = None, fixed_chunks: list[str] | None = None) -> ImportResult:
        """Bring a .backup file in as a new full snapshot; chunks already here are not stored again, and
        a snapshot already here whole (the exported one, or one imported or copied from it) is not imported
        again: ``skipped``, and ``snapshot`` is that one.  Waits up to ``wait`` seconds for a prune, forget or
        repair, as a backup does.  New chunks are stored as deltas where a backup of the same tree would
        store them so, against the same parent here (the newest snapshot of its host and paths at its time):
        ``delta``, ``no_delta`` as ``backup``'s; ``fixed_chunks``: globs of the paths its backups cut at fixed
        offsets (their delta chains are deeper, as ``backup``'s)."""
        from .store.export import import_backup

        _file_path(path, ".backup file")
        self._guard()
        return import_backup(self._repo, path, _password(password), lock_wait=wait, checkpoint=self._checkpoint(),
                             delta=delta, no_delta=_globs(no_delta, "no_delta"),
                             fixed_chunks=_globs(fixed_chunks, "fixed_chunks"))

    # --- keys ----------------------------------------------------------------------

    @_stoppable
    def add_key(self, password: str | bytes, *, kdf_seconds: float = 0.5) -> str:
        """A new key file for ``password``; a ``chunkvault.new_secret()`` gets one that opens without stretching.
        Where a key opens with ``password`` already, its id, and none is added."""
        check_kdf_seconds(kdf_seconds)
        return self._repo.add_key(_password(password), kdf_seconds=kdf_seconds)

    @_stoppable
    def change_password(self, new_password: str | bytes, *, kdf_seconds: float = 0.5,
                        wait: float = 3600.0) -> tuple[str, str]:
        """Replace the key this repository was opened with by one for ``new_password``: (new key, old key).
        Under the exclusive lock, taken first (waiting up to ``wait`` seconds for running backups and
        reads); where the change fails once the new key is stored, that key is taken back unless the old
        one is already gone, and the error says which passwords open the repository; stopped meanwhile, a
        warning says so.  Once the old key is gone, this machine's cache keeps no copy of it."""
        check_kdf_seconds(kdf_seconds)
        old = self._repo.key_name
        try:
            return self._repo.replace_key(_password(new_password), kdf_seconds=kdf_seconds, wait=wait), old
        finally:
            if self._repo.key_name != old:  # the old key is gone from the repository, even where the change failed
                keyahead.forget(key_ahead_dir(), [old])  # kept here, it would still open with the old password

    @_stoppable
    def remove_key(self, name: str, *, wait: float = 3600.0) -> str:
        """Remove the key ``name`` (an id or unique prefix) and return its id, and any copy of it this
        machine's cache keeps; waits up to ``wait`` seconds for running backups and reads to end."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"a key is named by its id or a unique prefix, not {name!r}")
        removed = self._repo.remove_key(name, wait=wait)
        keyahead.forget(key_ahead_dir(), [removed])  # kept by this machine, it would still open with its password
        return removed

    @_stoppable
    def settings(self) -> dict[str, Any]:
        """The config as stored now (what ``cat config`` gives): ``format``, ``id``, ``created`` and
        ``settings`` (``chunker``, ``compression_level``, ``pack_size``, ``full_every``, ``max_diff_share``,
        ``extra``).  No secret is in it."""
        from .store.objects import config_json

        return config_json(self._repo.remote, self._repo.sealer)

    @_stoppable
    def set_settings(self, *, wait: float = 3600.0, **changes: Any) -> dict[str, tuple[Any, Any]]:
        """Change the settings ``init`` took: ``compression_level``, ``pack_size`` (bytes or a size such as
        ``"64M"``), ``full_every``, ``max_diff_share``, checked as ``init`` checks them; the chunker and the id
        are refused (UsageError).  Returns name -> (old, new) of each that changed.  Under the exclusive lock
        (waiting up to ``wait`` seconds for running backups and reads); they apply to blobs, packs and
        ``kind="auto"`` decisions from the next backup on, also in a ``Repository`` opened before."""
        wait = _wait(wait)
        if isinstance(changes.get("pack_size"), str):
            changes["pack_size"] = parse_size(changes["pack_size"])
        try:
            return self._repo.change_settings(changes, wait=wait)
        except (PermissionDenied, Locked) as exc:  # an append-only token, or a lock held past the wait
            raise exc.explained("; the settings are unchanged") from None

    @_stoppable
    def export_key(self) -> bytes:
        """A key export: the key this repository was opened with and the config, as stored.  Kept away
        from the repository, it lets ``import_key`` open it again after its key files or config are lost
        or damaged (every object is sealed under the secret they hold).  It opens with the same password."""
        from .store.keyexport import export_key

        return export_key(self._repo.remote, self._repo.key_name).encode()

    @staticmethod
    def import_key(url: str | Remote, export: bytes | str, password: str | bytes, *, what: str = "key export",
                   wait: float = 3600.0, **remote_options: Any) -> "KeyImport":
        """Put back the config and key of ``export`` (what ``export_key`` returned) that the repository at
        ``url`` lacks or holds damaged (a key absent beside others: ``note`` warns it may have been retired),
        once ``password`` has opened the exported key: a repository whose keys are gone cannot be opened to
        do it.  ``what`` names the export in errors;
        ``wait``: for running backups and reads (the exclusive lock)."""
        from .store.keyexport import KeyExport, import_key

        _check_remote_options(remote_options)
        if isinstance(export, str):  # the file read as text: its JSON is ASCII, any other character damage
            export = export.encode("utf-8", "surrogateescape")
        if not isinstance(export, (bytes, bytearray, memoryview)):
            raise UsageError(f"a key export is bytes (what export_key returned), not {type(export).__name__}")
        kit = KeyExport.decode(bytes(export), what)
        remote = connect(url, **remote_options)
        try:
            return import_key(remote, kit, _password(password), what, wait=wait)
        finally:
            if remote is not url:
                remote.close()

    @_stoppable
    def keys(self) -> list[dict[str, Any]]:
        """The key files: a ``problem`` names why one does not read, or why it opens nothing here (another
        repository's, or one asking for more derivation than chunkvault writes, which opening skips): listed
        as any other, it passed for a key that opens the repository."""
        readable, damaged = self._repo.list_keys()
        return [{"id": k.name, "kdf": k.kdf, "created": k.created, "host": k.host, "user": k.user,
                 "current": k.name == self._repo.key_name,
                 **({"problem": p} if (p := self._repo.key_problem(k)) else {})} for k in readable] + [
                {"id": name, "kdf": "newer" if isinstance(exc, NewerObject) else "damaged", "created": "", "host": "",
                 "user": "", "current": False, "problem": exc.reason} for name, exc in damaged.items()]


    # --- raw objects (restic's list and cat) ------------------------------------------------

    @_stoppable
    def list_objects(self, kind: str) -> Iterator[str] | Iterator[BlobInfo]:
        """The objects of ``kind`` (``list TYPE``): the names of the ``snapshots``, ``index`` objects,
        ``packs``, ``keys`` or ``locks`` the storage lists, sorted; for ``blobs``, a ``BlobInfo``
        (``chunkvault.store.objects``) per blob the index holds, the index read under the shared lock and the
        blobs then given from memory.  An unknown kind is a UsageError naming the kinds."""
        from .store.objects import BLOB_KIND_NAMES, LIST_KINDS, check_kind, object_names

        check_kind(kind, LIST_KINDS, "list")
        if kind != "blobs":
            return iter(object_names(self._repo.remote, kind))
        with self.reading("list"):
            store = self._repo
            index = store.index

        def blobs() -> Iterator[BlobInfo]:
            for blob_id, loc in index.items():
                pack_id = store.pack_ids[loc.pack_no]
                base = store.delta_base(blob_id)
                yield BlobInfo(blob_id.hex(), BLOB_KIND_NAMES.get(loc.flags, str(loc.flags)),
                               pack_id.hex() if pack_id is not None else "", loc.offset, loc.length,
                               loc.raw_length, base.hex() if base is not None else None)
        return blobs()

    @_stoppable
    def cat(self, kind: str, id: str | None = None, *, raw: bool = False) -> dict[str, Any] | bytes:
        """One object decoded (``cat TYPE ID``), as a dict of JSON values: the ``config`` (no ``id``; its
        settings, no secret), a ``snapshot`` (an id, unique prefix or latest), an ``index`` object, a
        ``key`` file's public fields, a ``lock``, a ``pack``'s header; or a ``blob``'s plaintext bytes (a
        delta rebuilt through its bases, checked against its id; ``raw=True``: its payload as stored, a zstd
        frame or a delta, decrypted only).  Ids may be unique prefixes: NoSuchObject or AmbiguousId (exit 12)
        otherwise.  Read under the shared lock."""
        from .store.objects import (CAT_KINDS, PUBLIC_CAT_KINDS, check_kind, config_json, index_json, pack_json,
                                    public_object)

        check_kind(kind, CAT_KINDS, "cat")
        if kind == "config" and id is not None:
            raise UsageError("cat config takes no id: a repository has one config")
        if kind != "config" and id is None:
            raise UsageError(f"cat {kind} takes an id (or a unique prefix of one)")
        if raw and kind != "blob":
            raise UsageError("raw applies to a blob (its payload as stored)")
        if kind in PUBLIC_CAT_KINDS:
            return public_object(self._repo.remote, kind, id)
        store = self._repo
        with self.reading("cat"):
            if kind == "config":
                return config_json(store.remote, store.sealer)
            if kind == "snapshot":
                return dataclasses.asdict(self.snapshot(id))  # type: ignore[arg-type]
            if kind == "index":
                name = unique_name(store.index_names(), id, "index")
                return index_json(name, store.read_index_object(name))
            if kind == "pack":
                sizes = {pid.hex(): size for pid, size in store.stored_packs().items()}
                name = unique_name(sizes, id, "pack")
                return pack_json(name, sizes[name], store.pack_header(pack_key(bytes.fromhex(name)), sizes[name]))
            return self._blob_bytes(id, raw)  # type: ignore[arg-type]

    def _blob_bytes(self, spec: str, raw: bool) -> bytes:
        """A blob's plaintext, or with ``raw`` its payload as stored; ``spec`` an id or a unique prefix."""
        from .store.blob import open_envelope

        store = self._repo
        blob_id = None
        if isinstance(spec, str) and len(spec.strip()) == 64:
            with contextlib.suppress(ValueError):
                blob_id = bytes.fromhex(spec.strip())
        if blob_id is None or store.locate(blob_id) is None:  # a prefix: the index is looked through
            blob_id = bytes.fromhex(unique_name((b.hex() for b, _ in store.index.items()), spec, "blob"))
        if raw:
            envelope, _ = store.read_envelope(blob_id)
            return bytes(open_envelope(store.sealer, blob_id, envelope)[1])
        return bytes(store.read_blob(blob_id, verify=True))

    def manifest(self, snapshot: str | Snapshot) -> Iterator[Record]:
        """The records of the snapshot's own manifest as stored (``cat manifest``): a differential's
        ENTRY, FRESH and DELETE records against its parent (store/FORMAT.md, "Manifest stream"), where
        ``tree`` gives the chain resolved.  Lazy, as ``tree``: read under ``reading``."""
        self._follow_others()
        return self._guarded(self._repo.manifest_records(self.snapshot(snapshot)))


def _local_roots(remote: Remote) -> list[str]:
    """The directory a repository on this machine's disk keeps its objects in (below any wrapping layer);
    none for one off-site."""
    from .remotes.local import LocalRemote

    while not isinstance(remote, LocalRemote) and isinstance(getattr(remote, "inner", None), Remote):
        remote = remote.inner  # type: ignore[attr-defined]
    return [remote.root] if isinstance(remote, LocalRemote) else []


#: The files of a copy that say where its WAL starts (``_label_starts``).
_BASE_BACKUP_FILES = frozenset({b"backup_label", b"base.tar", b"base.tar.gz", b"backup_manifest", b"base.tar.lz4",
                                b"base.tar.zst"})
#: A tar-format copy's base.tar compressed so that its label cannot be read: only its manifest says the start.
_SEALED_TARS = (b"base.tar.lz4", b"base.tar.zst")


def _inside_dir(path: str, other: str) -> bool:
    """Whether the absolute ``path`` lies below the absolute directory path ``other``."""
    return path.startswith(other.rstrip("/") + "/")


def _is_nonempty_dir(path: str | os.PathLike[str]) -> bool:
    """A directory holding an entry, or a symbolic link to one (the restore follows a target named so);
    what cannot be read is left to the restore."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


class _BinarySource(io.RawIOBase):
    """``backup_stream``'s source: any object with a binary ``readinto`` or ``read``; what is not one is a
    UsageError before anything is stored, what turns out not to be one (text, a non-blocking stream) one
    while reading."""

    def __init__(self, source: Any):
        super().__init__()
        if isinstance(source, io.TextIOBase):
            raise UsageError("backup_stream reads bytes: open the stream in binary mode")
        if not callable(getattr(source, "readinto", None)) and not callable(getattr(source, "read", None)):
            raise UsageError(f"backup_stream needs a binary stream (with read or readinto), not {source!r}")
        if getattr(source, "closed", False) is True:
            raise UsageError("backup_stream: the stream is closed")
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        into = getattr(self._source, "readinto", None)
        if callable(into):
            n = into(b)
            if n is None:
                raise UsageError("backup_stream needs a blocking stream: its readinto returned None")
            if type(n) is not int or not 0 <= n <= len(b):  # else the buffer's old bytes were stored as data
                raise UsageError(f"backup_stream: the stream's readinto returned {n!r} for a buffer of "
                                 f"{len(b)} bytes")
            return n
        data = self._source.read(len(b))
        if data is None:
            raise UsageError("backup_stream needs a blocking stream: its read returned None")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"backup_stream reads bytes: the stream's read returned {type(data).__name__}")
        n = len(data)
        if n > len(b):
            raise UsageError("backup_stream: the stream's read returned more bytes than asked for")
        b[:n] = data
        return n


def _ends_regular_file(out: BinaryIO) -> bool:
    """Whether ``out`` writes into a regular file at its end, not appending: what it seeks past there reads as
    zeros and takes no space (a hole).  Anywhere else (a pipe; a file holding bytes past where the dump begins,
    which a seek would leave as they are) every byte is written."""
    try:
        out.flush()
        fd = out.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return False
        return out.tell() == st.st_size
    except (OSError, AttributeError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False


def _copy_leaving_holes(f: BinaryIO, out: BinaryIO, holes: list[tuple[int, int]]) -> None:
    """Copy a file's content to ``out``, seeking past each (offset, length) run of zeros in ``holes`` (read
    all the same: the reader checks the whole content against the entry's digest at its end); a file ending
    in one is lengthened to its size.  `dump` of a 20 GiB database file holding a few MiB into a file wrote
    20 GiB of zeros."""
    pos = 0
    for start, n in [*holes, (-1, 0)]:
        while start < 0 or pos < start:
            block = f.read(1 << 20 if start < 0 else min(1 << 20, start - pos))
            if not block:
                break
            out.write(block)
            pos += len(block)
        if start < 0:
            break
        while n:
            skipped = len(f.read(min(1 << 20, n)))
            if not skipped:
                break
            out.seek(skipped, io.SEEK_CUR)
            pos, n = pos + skipped, n - skipped
    if holes and sum(holes[-1]) == pos:
        out.truncate()


class _WholeWrites:
    """``dump``'s output: each write taken whole (a raw stream or socket may take part of it), and a
    failed one a ChunkvaultError, as the command line reports it; the rest of the stream as it is."""

    def __init__(self, out: Any, checkpoint: Callable[[], None]):
        if isinstance(out, io.TextIOBase) or not callable(getattr(out, "write", None)):
            raise UsageError("dump writes bytes: give a binary stream (open(path, 'wb'), sys.stdout.buffer)")
        if getattr(out, "closed", False):
            raise UsageError("dump: the output stream is closed")
        self._out = out
        stdout = out is getattr(sys.stdout, "buffer", None) or getattr(out, "name", None) == "<stdout>"
        self._name = "standard output" if stdout else "the output"
        self._raw = isinstance(out, io.RawIOBase)  # whose write may take part, or (None) nothing yet
        self._checkpoint = checkpoint  # where a dump may stop: before each write

    def write(self, data: bytes | memoryview) -> int:
        self._checkpoint()
        view = memoryview(data).cast("B")
        try:
            while view:
                n = self._out.write(view)
                if n is None and not self._raw:  # many writers return nothing (paramiko's files, responses)
                    break
                if not n:  # a raw stream's None: non-blocking and full; 0: a stream that takes nothing
                    raise TargetUnwritable("dump: the output took no more bytes (a non-blocking stream?)")
                view = view[n:]
        except BrokenPipeError:
            raise OutputClosed(f"dump: the reader of {self._name} closed it before the dump was complete") from None
        except OSError as exc:  # what was written stays there (standard output cannot be taken back): say it is cut
            error = output_error(f"writing to {self._name}", exc)
            raise type(error)(f"{error} (the dump written there is incomplete)") from None
        return len(data)

    def flush(self) -> None:
        """The writer's own, where it has one (zipfile flushes what it writes to; a writer may have only
        ``write``)."""
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


class _CheckedReader(io.BufferedReader):
    """A ``_ChunkStream`` read through a buffer: each read asks ``still_open`` first, for one served from the
    buffer (read ahead a MiB, a small file's whole) came on after ``close`` or a stop."""

    raw: "_ChunkStream"

    def read(self, size: int | None = -1) -> bytes:
        self.raw.still_open()
        return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        self.raw.still_open()
        return super().read1(size)

    def readinto(self, b: Any) -> int:
        self.raw.still_open()
        return super().readinto(b)

    def readinto1(self, b: Any) -> int:
        self.raw.still_open()
        return super().readinto1(b)

    def peek(self, size: int = 0) -> bytes:
        self.raw.still_open()
        return super().peek(size)

    def readline(self, size: int | None = -1) -> bytes:
        self.raw.still_open()
        return super().readline(size)


class _ChunkStream(io.RawIOBase):
    """A file's content, fetched a chunk at a time; seekable (the index knows each chunk's length), so a
    caller can read any part of a large file without the parts before it."""

    def __init__(self, repo: Repo, ids: Sequence[bytes], name: str = "", entry: Entry | None = None,
                 still_open: Callable[[], None] = lambda: None):
        self.repo = repo
        self.still_open = still_open  # before each chunk is fetched: it may refuse (closed) or stop
        self.ids = ids
        self.name = name
        # read from the start to the end without a seek, the content is checked against ``entry``'s size and
        # digest (``check_content``) as it ends, as a restore checks it: an archive of it is then not complete
        self.entry = entry
        self._hasher = blake3.blake3() if entry is not None else None
        self.i = 0  # the next chunk to fetch
        self.skip = 0  # bytes of it before the position (after a seek)
        self.pos = 0
        self.buf = memoryview(b"")
        self._starts: list[int] | None = None
        self._last: tuple[bytes, bytes] = (b"", b"")  # the chunk fetched last and its id: a hole's repeats it

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.buf:
            if self.i >= len(self.ids):
                if self._hasher is not None and self.entry is not None:
                    hasher, self._hasher = self._hasher, None
                    check_content(self.entry, self.pos, hasher.digest())
                return 0
            self.still_open()
            cid = self.ids[self.i]
            if self._last[0] != cid:
                self._last = (cid, self.repo.read_blob(cid))
            self.buf = memoryview(self._last[1])[self.skip:]
            self.i += 1
            self.skip = 0
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        if self._hasher is not None:
            self._hasher.update(self.buf[:n])
        self.buf = self.buf[n:]
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self.pos + offset
        elif whence == io.SEEK_END:
            target = self.starts()[-1] + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target != self.pos:
            self._hasher = None  # no longer read in order: not checked
        starts = self.starts()
        self.i = min(bisect.bisect_right(starts, target) - 1, len(self.ids))
        self.skip = target - starts[self.i] if self.i < len(self.ids) else 0
        self.buf = memoryview(b"")
        self.pos = target
        return target

    def starts(self) -> list[int]:
        """Where each chunk starts, and the end: from the index's plaintext lengths."""
        if self._starts is None:
            starts = [0]
            for blob_id in self.ids:
                loc = self.repo.locate(blob_id)
                if loc is None:
                    raise MissingObject(f"blob {blob_id.hex()}", NOT_INDEXED)
                starts.append(starts[-1] + loc.raw_length)
            self._starts = starts
        return self._starts


def diff_trees(old: Iterator[Record], new: Iterator[Record],
               holder_old: Callable[[bytes], Entry | None] | None = None,
               holder_new: Callable[[bytes], Entry | None] | None = None,
               ) -> Iterator[tuple[str, Entry | None, Entry | None]]:
    """Pure merge of two sorted resolved trees.  A path of a multiply-linked file is compared by the file
    it names (``holder_*`` find it by path): which of its links holds the data follows the order of the
    paths, so a new link sorting first turned an unchanged file into a hard link, reported as a type change.
    Two equal links whose change times differ are compared so too: a link's entry does not carry the file's
    attributes, nor its content when size and mtime stayed (each target's pair of files is looked up once)."""
    same_file: dict[bytes, bool] = {}  # a target both trees' equal links name -> its two files alike
    a = next(old, None)
    b = next(new, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.key < b.key):
            yield "removed", a.entry, None  # type: ignore[union-attr]
            a = next(old, None)
        elif a is None or b.key < a.key:
            yield "added", None, b.entry
            b = next(new, None)
        else:
            ea, eb = a.entry, b.entry
            assert ea is not None and eb is not None
            if ea.type == T_HARDLINK and ea.ctime_ns != eb.ctime_ns and ea.same_content(eb):
                alike = same_file.get(ea.target)
                if alike is None:
                    alike = same_file[ea.target] = as_file(ea, holder_old).same_content(as_file(eb, holder_new))
                if not alike:
                    ea, eb = as_file(ea, holder_old), as_file(eb, holder_new)
            elif T_HARDLINK in (ea.type, eb.type) and not ea.same_content(eb):
                ea, eb = as_file(ea, holder_old), as_file(eb, holder_new)
            if not ea.same_content(eb):
                yield "modified", ea, eb
            a, b = next(old, None), next(new, None)

