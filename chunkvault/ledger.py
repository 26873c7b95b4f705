"""The client-side ledger file: what this client forgot and the newest snapshot it saw.

One small JSON file per repository, named by the repository's authenticated
id (not its URL, which may change or be shared), under
``$XDG_STATE_HOME/chunkvault/ledger/`` (default ``~/.local/state``).  The
logic lives in ``store/ledger.py``; this module reads and writes the file and
turns findings into warnings (reads) or ``RollbackDetected`` (writes).

The file is written atomically (temporary file, fsync, rename), mode 0600,
under a lock so that two commands of this client do not lose each other's
updates.  A missing file is a first contact; an unreadable one is reported
once and replaced, and a ledger that cannot be written never stops a backup.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import warnings
from datetime import datetime, timezone
from typing import Callable, Collection, Iterable, Mapping, Sequence

from .errors import NewerObject, RepositoryStateWarning, RollbackDetected, output_error
from .localfiles import fsync_directory
from .localfiles import make_private_dirs, read_regular, user_dir
from .store import ledger as logic
from .store.ledger import NEWER_FORMAT, OLD_VERSION, REPLAYED, ROLLED_BACK, UNDATED, Finding, LedgerState
from .store.snapshot import Snapshot


def default_dir() -> str | None:
    """$XDG_STATE_HOME/chunkvault/ledger; None when there is no home directory to keep it in."""
    base = user_dir("XDG_STATE_HOME", os.path.join(".local", "state"))
    return None if base is None else os.path.join(base, "chunkvault", "ledger")


def _warn(message: str) -> None:
    warnings.warn(message, RepositoryStateWarning, stacklevel=3)


class LedgerFile:
    """``<directory>/<repo id>.json``, read and rewritten under an exclusive lock."""

    def __init__(self, directory: str, repo_id: str):
        self.repo_id = repo_id
        self.directory = directory
        if re.fullmatch(r"[0-9a-f]{16,64}", repo_id):
            safe = repo_id
        else:
            import hashlib  # only for an id that is not hex (never one chunkvault made)

            safe = hashlib.sha256(repo_id.encode()).hexdigest()
        self.path = os.path.join(directory, f"{safe}.json")  # an id is hex; anything else never names a path
        self._warned = False

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            _warn(message)

    def read(self) -> LedgerState:
        state, _ = self._load()
        return state

    def _load(self) -> tuple[LedgerState, bool]:
        """(state, whether the file must be rewritten because it was unreadable)."""
        try:
            doc = json.loads(read_regular(self.path))
            return logic.from_json(doc, self.repo_id), False
        except FileNotFoundError:
            return LedgerState(), False
        except OSError as exc:
            self._warn_once(f"cannot read the ledger {self.path} ({exc.strerror}): "
                            f"replayed or rolled-back snapshots go unnoticed")
            return LedgerState(), False
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self._warn_once(f"ledger {self.path} is unreadable ({exc}): starting a fresh one")
            return LedgerState(), True

    def update(self, change: Callable[[LedgerState], LedgerState], *, must_store: bool = False) -> LedgerState:
        """Apply ``change`` to the stored state and store the result (when it differs).  A ledger that cannot
        be written is a warning, or with ``must_store`` (what was asked is the change itself) an error."""
        try:
            make_private_dirs(self.directory)
            lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if must_store:
                raise output_error(f"writing the ledger in {self.directory}", exc) from None
            self._warn_once(f"cannot use the ledger in {self.directory} ({exc.strerror}): "
                            f"replayed or rolled-back snapshots go unnoticed")
            return change(self._load()[0])
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as exc:  # a file system without locks (NFS mounted nolock): each replace is whole
                self._warn_once(f"cannot lock the ledger {self.path} ({exc.strerror}): commands that run at "
                                "the same time may each miss what the other noted")
            old, rewrite = self._load()
            new = change(old)
            if rewrite or new != old:
                self._save(new, must_store)
            return new
        finally:
            os.close(lock)

    def _save(self, state: LedgerState, must_store: bool = False) -> None:
        data = json.dumps(logic.to_json(state, self.repo_id), indent=1).encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            fsync_directory(self.directory)
        except OSError as exc:
            if must_store:
                raise output_error(f"writing the ledger {self.path}", exc) from None
            self._warn_once(f"cannot write the ledger {self.path} ({exc.strerror})")



def present_of(snaps: Iterable[Snapshot], unreadable: Mapping[str, Exception] | None = None) -> dict[str, datetime]:
    """``{id: time}`` of listed snapshots; an object that does not decode (-> why) counts as present, with
    no time that could stand in for a newer snapshot: ``UNDATED``, or ``NEWER_FORMAT`` for one a newer
    chunkvault wrote (not damage: the newest this client saw, so rewritten, is no finding)."""
    out = {name: NEWER_FORMAT if isinstance(exc, NewerObject) else UNDATED
           for name, exc in (unreadable or {}).items()}
    out.update((s.id, s.datetime) for s in snaps)
    return out


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Ledger:
    """What a Repository calls: after every listing and write, and before every write.
    ``present`` is always ``{snapshot id: time}`` of the whole repository (``present_of``)."""

    def __init__(self, file: LedgerFile):
        self.file = file
        self._warned: set[Finding] = set()

    @classmethod
    def at(cls, where: str | None, repo_id: str) -> "Ledger | None":
        """The ledger in directory ``where`` (None: ``default_dir``); None, with a warning, where there is
        no home directory to keep it in."""
        directory = where or default_dir()
        if directory is None:
            _warn("no home directory to keep the ledger in (HOME is not an absolute path; XDG_STATE_HOME can "
                  "name one): replayed or rolled-back snapshots go unnoticed")
            return None
        return cls(LedgerFile(directory, repo_id))

    def state(self) -> LedgerState:
        """The state now: read before a listing, it is the ``before`` the listing is judged by (what other
        commands of this client note while it is made cannot then be taken for a contradiction)."""
        return self.file.read()

    def observe(self, present: dict[str, datetime], *, before: LedgerState | None = None,
                warn: bool = True, digests: Mapping[str, str] | None = None) -> list[Finding]:
        """After a listing (``digests``: of the snapshot objects it read): update the ledger; the findings not
        warned about yet (by this Ledger) are one warning: the first, and how many more (a repository put
        back from an old copy may replay hundreds)."""
        now = _now()
        found = self._update(lambda s: logic.observe(s, present, before, now, digests), present, before, digests)
        new = [f for f in found if f not in self._warned]
        if warn and new:
            self._warned.update(new)
            more = f" (and {len(new) - 1} more: `chunkvault check` lists them)" if len(new) > 1 else ""
            _warn(new[0].message() + more)
        return found

    def findings(self, present: dict[str, datetime], before: LedgerState | None = None,
                 digests: Mapping[str, str] | None = None) -> list[Finding]:
        return logic.findings(self.file.read(), present, before, digests)

    def guard(self, present: dict[str, datetime], *, before: LedgerState | None = None,
              forgetting: Collection[str] = (), digests: Mapping[str, str] | None = None) -> None:
        """Refuse to write on top of a replayed or rolled-back repository: the write would bury
        the evidence (a new backup becomes the newest, a prune removes the replayed data)."""
        found = logic.blocking(self.findings(present, before, digests), forgetting)
        if found:
            raise RollbackDetected(refusal(found))

    def forgetting(self, ids: Collection[str]) -> None:
        now = _now()
        self.file.update(lambda s: logic.forgetting(s, ids, now))

    def forgot(self, ids: Collection[str], remaining: dict[str, datetime]) -> None:
        now = _now()
        self.file.update(lambda s: logic.forgot(s, ids, remaining, now))

    def wrote(self, written: dict[str, datetime], digests: Mapping[str, str] | None = None,
              replaced: Mapping[str, Sequence[tuple[str, str]]] | None = None) -> None:
        now = _now()
        self.file.update(lambda s: logic.wrote(s, written, digests, now, replaced))

    def accept(self, present: dict[str, datetime], digests: Mapping[str, str] | None = None) -> list[Finding]:
        """Take the repository as it is; returns the findings this clears."""
        return self._update(lambda s: logic.accept(s, present, digests), present, digests=digests, must_store=True)

    def _update(self, change: Callable[[LedgerState], LedgerState], present: dict[str, datetime],
                before: LedgerState | None = None, digests: Mapping[str, str] | None = None, *,
                must_store: bool = False) -> list[Finding]:
        """Apply ``change``; the findings of the state it was applied to."""
        found: list[Finding] = []

        def judged(state: LedgerState) -> LedgerState:
            found[:] = logic.findings(state, present, before, digests)
            return change(state)

        self.file.update(judged, must_store=must_store)
        return found


def remedy(finding: Finding) -> str:
    """The way out of a finding, once the storage has been looked at."""
    fix = ("if this is expected, accept" if finding.kind in (ROLLED_BACK, OLD_VERSION) else
           f"forget it{' again' if finding.kind == REPLAYED else ''} (`chunkvault forget {finding.snapshot_id[:8]}`) "
           "or accept")
    return f"{fix} the repository as it is with `chunkvault check --accept-state`"


def refusal(found: list[Finding]) -> str:
    """One line: the first finding, how many more, and the way out."""
    first = found[0]
    more = f" (and {len(found) - 1} more: see `chunkvault check`)" if len(found) > 1 else ""
    return (f"{first.message()}{more}; refusing to write: inspect the storage, then {remedy(first)} (a "
            f"file-level copy of this repository, a mirror kept by rsync say, shares its id and so this "
            f"client's ledger: what was done in one is expected in the other)")
