"""The one error hierarchy of chunkvault.

Every layer raises these (the chunker excepted: it raises plain ValueError /
TypeError for bad arguments, knowing nothing of the rest).  The CLI turns each
class into one line on stderr and the class's ``exit_code``; the codes are part
of the public interface and never change meaning.
"""
from __future__ import annotations

import copy

import errno
import resource
import signal
from typing import Any


class ChunkvaultWarning(UserWarning):
    """Base of the warnings chunkvault gives: the CLI prints each as one line on stderr."""


class RemoteRetryWarning(ChunkvaultWarning):
    """A remote operation failed transiently and is tried again (at most one a few seconds per remote)."""


class CleartextTokenWarning(ChunkvaultWarning):
    """A backup service's token is about to travel unencrypted (``http://`` to a host that is not this one)."""


class RepositoryStateWarning(ChunkvaultWarning):
    """The repository contradicts this client's ledger, the ledger file is unusable, or a snapshot or index
    object does not load (it is left out)."""


class LocalCacheWarning(ChunkvaultWarning):
    """The cache directory given (``--cache-dir``, ``CHUNKVAULT_CACHE_DIR``) cannot be used: the command
    goes on without a local cache, reading every object from the repository."""


class ChunkvaultError(Exception):
    """Base of every error chunkvault raises on purpose."""

    exit_code = 1
    #: What the operation did before it raised this, when it went on past the problem (a restore's
    #: RestoreResult, listing the files not restored and its warnings): a caller can still report it.
    partial: Any = None
    #: What the command line adds to the message: its own option that would have helped (" or use --wait").
    #: The message alone is worded for every caller; an API caller never reads of options it cannot pass.
    cli_hint: str = ""
    #: Where the hint goes in the message: the end of the sentence it was given for (None: the end), so that
    #: what ``explained`` adds after it stays after it.
    _hint_at: int | None = None

    def hinting(self, cli_hint: str) -> "ChunkvaultError":
        """This error, with ``cli_hint`` for the command line (``raise UsageError(...).hinting(" (--tag)")``)."""
        self.cli_hint = cli_hint
        self._hint_at = None
        return self

    def cli_message(self) -> str:
        """The message with the command line's hint in its place."""
        text = str(self)
        at = len(text) if self._hint_at is None else self._hint_at
        return text[:at] + self.cli_hint + text[at:]

    def explained(self, more: str) -> ChunkvaultError:
        """The same error (its kind, its fields) with ``more`` appended to its message: what a caller knows
        about it, e.g. which passwords open the repository after a password change failed."""
        error = copy.copy(self)
        error.args = (f"{self}{more}",)
        error._hint_at = len(str(self)) if self._hint_at is None else self._hint_at
        return error


class ResourceExhausted(ChunkvaultError):
    """The process ran out of memory or could not start a thread under its limits (``ulimit -v``, ``ulimit -u``,
    a unit's MemoryMax=, TasksMax=): nothing was stored half-way; with more room, or asked for less, a rerun
    succeeds."""


def resource_exhausted(exc: BaseException) -> ResourceExhausted | None:
    """``exc`` as the limit it ran into, where it is one: a MemoryError, an allocation refused (ENOMEM) or a
    thread that could not start each came out as an internal error, naming neither the limit nor what to
    lower."""
    if (isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
            or _ZSTD_NO_MEMORY in str(exc)):
        return memory_refused("", "it, or lower the repository's pack size or the processes a restore uses")
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return threads_refused("a thread")
    if isinstance(exc, ImportError) and _NO_ROOM_TO_MAP in str(exc) and address_space_limited():
        return memory_refused(" loading a native library")
    return None


def address_space_limited() -> bool:
    """Whether an address-space limit (ulimit -v) is set: an mmap past it fails where it would have been
    overcommitted."""
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY


def memory_refused(what: str, remedy: str = "it") -> ResourceExhausted:
    """Out of memory ``what`` (" for ...", " loading ..."), under the memory limit it names, and the remedy
    (what to raise, or lower)."""
    return ResourceExhausted(f"out of memory{what} under the process's memory limit (ulimit -v, MemoryMax=): "
                             f"raise {remedy}")


def process_end(code: int) -> str:
    """How a child process ended, from its Popen return code: a negative one is the signal that killed it
    (the OOM killer's 9), and "exited -9" said neither that nor which."""
    if code >= 0:
        return f"exited {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"was killed by signal {-code}"
    return f"was killed by signal {-code} ({name})"


def threads_refused(what: str) -> ResourceExhausted:
    """The limit that kept ``what`` (threads) from starting: under an address-space limit each thread's stack
    counts against it, so that limit is named too (naming ulimit -u alone sent users to a limit they were
    nowhere near)."""
    if address_space_limited():
        return ResourceExhausted(f"cannot start {what} under the process's memory limit (ulimit -v: each "
                                 "thread's stack counts) or its process limit (ulimit -u, TasksMax=): raise them")
    return ResourceExhausted(f"cannot start {what} under the process limit (ulimit -u, TasksMax=): raise it")


# What libzstd says (through python-zstandard's ZstdError) when an allocation fails.
_ZSTD_NO_MEMORY = "Allocation error : not enough memory"
# What the dynamic loader says when it cannot map a library: under ulimit -v, a native module imported late
# (cryptography's, at the first key file opened) is refused its room; on a noexec mount it is refused too.
_NO_ROOM_TO_MAP = "failed to map segment from shared object"


class UsageError(ChunkvaultError):
    """Bad command-line or API arguments."""

    exit_code = 2


class NoBaseBackup(UsageError):
    """``archive-expire --before oldest-snapshot``: no snapshot holds a base backup's label, so nothing says
    which WAL the snapshots need."""


class PartialBackup(ChunkvaultError):
    """Backup finished, but some source files could not be read (recorded in the snapshot)."""

    exit_code = 3


class RepositoryNotFound(ChunkvaultError):
    exit_code = 10


class RepositoryExists(ChunkvaultError):
    exit_code = 10


class WrongPassword(ChunkvaultError):
    exit_code = 11


class SnapshotNotFound(ChunkvaultError):
    exit_code = 12


class AmbiguousSnapshot(SnapshotNotFound):
    exit_code = 12


class NoSuchObject(ChunkvaultError):
    """No repository object of the kind asked for has that id or prefix (``cat``): an unknown snapshot's
    exit code, since a snapshot is one such object."""

    exit_code = 12


class AmbiguousId(NoSuchObject):
    """An id prefix that several objects of the kind asked for share."""


class CorruptObject(ChunkvaultError):
    """An object failed authentication, decoding or hashing; names the object."""

    exit_code = 13

    def __init__(self, object_name: str, reason: str):
        super().__init__(f"corrupt object {object_name}: {reason}")
        self.object_name = object_name
        self.reason = reason

    def explained(self, more: str) -> CorruptObject:
        """The same error (missing or corrupt, the same object) with ``more`` appended to its reason: what a
        caller knows about it, e.g. the snapshot whose manifest needed the object."""
        error = type(self)(self.object_name, self.reason + more)
        error.partial = self.partial
        return error


class NewerObject(CorruptObject):
    """An object a newer chunkvault wrote (a snapshot of a later version): not damage, so never to be
    forgotten for it; what reads it must be upgraded.  Left out of listings as an unreadable one is."""

    exit_code = 17  # as UnsupportedFormat

    def __init__(self, object_name: str, reason: str):
        ChunkvaultError.__init__(self, f"{object_name}: {reason}")
        self.object_name = object_name
        self.reason = reason


class MissingObject(CorruptObject):
    """An object that something references is not in the repository (its message says missing, not
    corrupt: nothing is wrong with what is stored)."""

    def __init__(self, object_name: str, reason: str = "missing"):
        ChunkvaultError.__init__(self, f"missing object {object_name}" + ("" if reason == "missing" else f": {reason}"))
        self.object_name = object_name
        self.reason = reason


class RemoteError(ChunkvaultError):
    """The storage behind a repository failed."""

    exit_code = 14


class RemoteUnavailable(RemoteError):
    """Transient: connection refused/reset, timeout, 5xx, throttling. Worth retrying."""

    #: The remote (its display URL) that stopped answering, where a retry layer gave up on it: a command
    #: holding locks on two repositories (copy) leaves only that one's lock to go stale.
    remote: str | None = None
    #: The remote itself answered, busy or failing for a moment (a service at its connection limit says 503, try
    #: again): it is there, so it is waited for as a remote that answered, not given up on as a URL that leads
    #: nowhere after the few attempts that takes.
    answered: bool = False
    #: Seconds the remote asked to be left alone before the next attempt (an HTTP answer's Retry-After), if it did.
    retry_after: float | None = None

    @staticmethod
    def gave_up_on(exc: BaseException | None, display_url: str) -> bool:
        """Whether ``exc`` is a retry layer giving up on the remote at ``display_url`` (or on one it did not
        name): another call to that remote would wait out as many retries before failing too."""
        return isinstance(exc, RemoteUnavailable) and exc.remote in (None, display_url)


class ObjectNotFound(RemoteError):
    """The remote has no object under this key."""

    def __init__(self, key: str):
        super().__init__(f"object not found: {key}")
        self.key = key


class ObjectExists(RemoteError):
    """put(..., if_absent=True) found the key already present."""

    def __init__(self, key: str):
        super().__init__(f"object already exists: {key}")
        self.key = key


class PermissionDenied(RemoteError):
    """The remote refused the operation (credentials, append-only, read-only token)."""


#: Failures of a read that say nothing of the object read: the remote gave up, or refused this user (or
#: token) the object.  `check` and the repairs stop on them, never counting the object damaged: a repair
#: would otherwise delete, or leave out of the index, a pack that is only out of this user's reach.
NOT_DAMAGE: tuple[type[RemoteError], ...] = (RemoteUnavailable, PermissionDenied)


class ObjectArchived(RemoteError):
    """The object is in an archive storage class (S3's GLACIER, DEEP_ARCHIVE): nothing is damaged, and it
    reads again once the storage restores it (S3's RestoreObject); chunkvault does not ask for that."""


class StorageFull(RemoteError):
    """No space left on the device or quota exhausted."""


class ObjectTooLarge(RemoteError):
    """The storage takes no object this large (a service's --max-object-size, a file system's or a process's
    file size limit): trying again would fail the same way."""


class TargetUnwritable(ChunkvaultError):
    """A restore could not write into its target (permission, a read-only file system, a name too long):
    the exit code of a storage failure, since the target is where the restore stores its data."""

    exit_code = 14


def output_error(what: str, exc: OSError) -> ChunkvaultError:
    """The error for a command's output that could not be written (an export file, standard output):
    no space is a storage failure, anything else a target that takes no writes."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on device while {what}")
    return TargetUnwritable(f"{what}: {exc.strerror or exc}")


class OutputClosed(ChunkvaultError):
    """What a command's output was piped into went away before it had all of it (``dump | head``): the
    data was not delivered.  The shell's code for a command ended by SIGPIPE, as ``cat`` gives."""

    exit_code = 141


class Stopped(KeyboardInterrupt):
    """An operation ``Repository.stop`` told to stop.  A KeyboardInterrupt, as Ctrl-C's is, not an error:
    nothing that takes one file's failure for a warning takes it, and it leaves what Ctrl-C leaves (no
    snapshot, the lock released, what was stored reused by the next backup)."""

    exit_code = 130


class Locked(ChunkvaultError):
    exit_code = 15


class LockLost(Locked):
    """A command's own lock went stale while it ran (it was paused or cut off): it stopped before relying on it."""


class TargetBusy(Locked):
    """Another restore is writing into the restore target (it holds the target's lock: store/target_lock.py)."""


class TargetNotEmpty(ChunkvaultError):
    exit_code = 16


class UnsupportedFormat(ChunkvaultError):
    """Written by a newer chunkvault, or not a chunkvault object at all (e.g. a file given to ``import``
    that is no export file)."""

    exit_code = 17


class VerificationFailed(ChunkvaultError):
    """check / verify-restore found problems."""

    exit_code = 18


class PgStartFailed(VerificationFailed):
    """``verify-restore --pg-start``: a restored PostgreSQL copy did not start, open its databases or answer
    as expected (kept in its report, as the run's other failures are: the snapshot fails, exit 18)."""


class WalRelayRefused(PgStartFailed):
    """``verify-restore --pg-recover``: a request to the WAL relay that is not one it answers (too long, another
    descriptor than the file to write, a name PostgreSQL does not archive, a file outside the copy); the
    client is told, and the snapshot fails with it."""


class RollbackDetected(ChunkvaultError):
    """The snapshot set contradicts this client's ledger: a snapshot it forgot is back (replayed),
    or the newest it saw is gone (rolled back).  Writes are refused until the user forgets the
    replayed snapshot again or accepts the state (``check --accept-state``)."""

    exit_code = 19


class SourceCommandFailed(ChunkvaultError):
    """The command a backup reads (``--stdin-from-command``) could not run or did not exit with
    status 0: its output may be cut short, so no snapshot was saved."""

    exit_code = 20


class IncompleteSource(SourceCommandFailed):
    """The stream a backup reads as a tree (``import-tar``) breaks off or ends before its end marker, or
    standard input (``backup --stdin``, ``import-tar -``) could not be read: what it would have held is not
    known, so no snapshot was saved (the data stored is left for prune)."""


class MountFailed(ChunkvaultError):
    """``mount`` cannot mount: no FUSE library or device, or the kernel refused."""

    exit_code = 21


class WalNotArchived(ChunkvaultError):
    """``archive-get`` of a name the WAL archive does not hold.  PostgreSQL asks for files that may not exist
    (the next timeline's history, the segment after the last): it must see a plain failure, below 126."""

    exit_code = 1


class ArchiveConflict(ChunkvaultError):
    """``archive-push`` of a name already archived with other content: nothing new is made visible."""

    exit_code = 22


class WalHeaderMismatch(ArchiveConflict):
    """``archive-push`` of a segment whose page header is not that of the segment it is named (zeroed, cut
    short, another position): no recovery would replay it, so nothing is archived."""


class ArchiveCheckFailed(ChunkvaultError):
    """``archive-check``: the server does not archive its WAL (``archive_mode`` off, no ``archive_command``),
    or the segment it switched to did not reach the repository in time; the message says what the server
    reports.  ``partial``: the check's result, with the server's archiver statistics."""

    exit_code = 23
