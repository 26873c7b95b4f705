"""Scheduled snapshots, the I/O part: ``chunkvault run`` and ``chunkvault daemon``.

``Runner.run`` opens the policy's repository, asks ``schedule.decide`` what
each source needs now, runs the source's pre hook, the backup and the post
hook, then applies each source's retention to that source's snapshots only
(same host and paths).  ``Daemon.serve`` repeats that at every slot: it
computes the next slot and sleeps until then (at most ``max_sleep`` seconds at
a time, so a clock jump or a suspend is noticed), logs every run, survives a
failing one and stops after the step in progress on SIGTERM or SIGINT (a
second signal aborts at once; a snapshot only exists once complete, so
nothing is left half-written).

The clock, the sleep function and the repository opener are parameters, so
tests drive days of schedule in seconds.  Overlapping runs of one policy are
excluded by an advisory lock file (``<policy file>.lock`` unless the policy
sets ``lock-file``).

A source may back up a command's output instead of paths (``command``, run
like a hook, its stderr logged, and ``stdin-name``): its snapshot is saved
only if the command exits with status 0.

Hooks run with ``/bin/sh -c`` (a string) or directly (a list), in the policy
file's folder, stdin closed, their output logged.  Their environment adds
CHUNKVAULT_SOURCE, CHUNKVAULT_KIND (full|diff), CHUNKVAULT_SLOT (ISO time) and
CHUNKVAULT_PATHS (joined by ``os.pathsep``); the post hook also gets
CHUNKVAULT_RESULT (ok|partial|failed, or skipped when a stop came first),
CHUNKVAULT_SNAPSHOT_ID (empty when no snapshot was saved) and
CHUNKVAULT_ERROR.  A failing pre hook skips the backup and fails the source;
the post hook runs whenever the pre hook was started, and a failing post hook
fails the source (its snapshot stays).  Retention of a source whose backup
failed in this run is skipped, so a broken backup never lets age-based rules
erode the remaining history; it never removes the snapshot its run saved, nor
counts those dated ahead of the clock (``schedule.retention_scope``).

A source with ``copy-to`` has each snapshot its run saved copied to that
second repository (with those of its snapshots saved since the newest one
there, when an earlier copy failed) before its post hook, which learns a
failed copy as a failed source; the backup stays.  A policy with ``check``
checks the repository when that is due, after retention and prune; a check
that passed is remembered in the state file (``<policy file>.state``), one
that found problems fails the run and runs again at the next one.  A policy
with ``verify`` then restores the newest snapshot of each source into a
scratch directory and compares it with its manifest (``verify_restore``,
starting a ``postgres`` source's copy, running its ``verify-then``) when that
is due: one that passed for every source is remembered beside the check, one
that failed fails the run and runs again at the next one.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Callable, Iterator, TextIO

from . import interrupts
from .store import locks
from .display import LIST_LETTERS, one_line, shown_name
from .localfiles import no_room_after
from .errors import (ChunkvaultError, ChunkvaultWarning, Locked, NewerObject, OutputClosed, PartialBackup,
                     PermissionDenied, RemoteUnavailable, SourceCommandFailed, Stopped, UsageError, VerificationFailed,
                     process_end)
from .processes import kill_group, start_session, without_secrets
from .remotes.layer import stop_request
from .schedule import (CopyTarget, Policy, RetentionScope, Source, check_due, check_slice, dated_ahead, decide,
                       iso_time, next_wakeup, parse_iso_time, parse_policy, retention_scope, state_document,
                       state_sections, verification_passed, verified_times, verify_due)
from .schedulecli import add_commands
from .units import format_size
from .store.retention import RetentionPolicy
from .store.source import excludes_of
from .tomlfile import read_toml

__all__ = ["Daemon", "Runner", "RunReport", "SourceResult", "add_commands", "cmd_daemon", "cmd_run",
           "load_policy"]

Clock = Callable[[], datetime]
Sleep = Callable[[float], None]

OK, PARTIAL, FAILED, IDLE, SKIPPED, WOULD_RUN = "ok", "partial", "failed", "idle", "skipped", "would-run"
#: The id a dry run's retention knows the backup it would make by (a stand-in: no snapshot has it).
STAND_IN_ID = "(backup due now)"
HOOK_OUTPUT_LIMIT = 4096


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def load_policy(path: str) -> Policy:
    """Read and validate a policy file; every problem is one UsageError line naming the file."""
    config = read_toml(path, "policy")
    try:
        return parse_policy(config, os.path.dirname(os.path.abspath(path)))
    except UsageError as exc:
        raise UsageError(f"policy {path}: {exc}") from None


# --------------------------------------------------------------------------- results


@dataclass
class RetentionResult:
    removed: list[str]
    rebased: list[str]
    kept: int
    reasons: dict[str, str] = field(default_factory=dict)  # removed id -> why


@dataclass
class SourceResult:
    """What one source did in one run."""

    name: str
    status: str  # ok | partial | failed | idle | skipped | would-run
    kind: str | None = None
    slot: datetime | None = None
    reason: str = ""
    snapshot_id: str | None = None
    error: str | None = None
    pre_exit: int | None = None
    post_exit: int | None = None
    duration: float = 0.0
    retention: RetentionResult | None = None
    retention_error: str | None = None
    copy: dict[str, Any] | None = None  # what copy-to sent (CopyDone.to_dict)
    copy_error: str | None = None
    copy_failed_step: str | None = None  # "copy", or "copy-retention" once the copy itself went
    # copy-wal's archived WAL files all went with this run's copy: a copy-retention that failed after them
    # (an append-only destination) does not keep wal-expire from the repository's WAL.
    wal_copied: bool = False

    @property
    def failed(self) -> bool:
        return self.status == FAILED or self.retention_error is not None

    def to_dict(self) -> dict[str, Any]:
        ret = self.retention
        return {"source": self.name, "status": self.status, "kind": self.kind, "slot": iso_time(self.slot),
                "reason": self.reason, "snapshot": self.snapshot_id, "error": self.error,
                "pre_exit": self.pre_exit, "post_exit": self.post_exit, "duration": round(self.duration, 3),
                "retention": None if ret is None else {"removed": ret.removed, "rebased": ret.rebased,
                                                       "kept": ret.kept},
                "retention_error": self.retention_error, "copy": self.copy, "copy_error": self.copy_error}


@dataclass
class CopyDone:
    """What one source's copy-to did: the snapshots sent (source id, destination id), those there already,
    and the destination's retention."""

    destination: str
    copied: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    retention: RetentionResult | None = None
    sent_through: datetime | None = None  # the date of the newest of the source's snapshots there now

    def to_dict(self) -> dict[str, Any]:
        ret = self.retention
        return {"destination": self.destination,
                "copied": [{"source": a, "destination": b} for a, b in self.copied], "skipped": self.skipped,
                "bytes_sent": self.bytes_sent,
                "retention": None if ret is None else {"removed": ret.removed, "rebased": ret.rebased,
                                                       "kept": ret.kept}}


@dataclass
class RunReport:
    """One run of a policy: per-source results, prune, and whether a stop request cut it short."""

    started: datetime
    dry_run: bool
    sources: list[SourceResult] = field(default_factory=list)
    prune: dict[str, Any] | None = None
    prune_error: str | None = None
    wal_expired: list[str] | None = None  # the archived WAL files the policy's wal-expire removed
    wal_expire_error: str | None = None
    stopped: bool = False
    error: str | None = None  # the run ended before any source (the repository out of reach, locked)
    check: dict[str, Any] | None = None  # the policy's check, when it was due
    check_error: str | None = None  # its problems, or why it could not run
    check_problems: int = 0
    verify: dict[str, Any] | None = None  # the policy's restore verification, when it was due
    verify_error: str | None = None  # the snapshots that failed it, or why it could not run
    verify_problems: int = 0  # snapshots whose verification failed (not those it could not run for)

    @property
    def failed(self) -> list[SourceResult]:
        return [r for r in self.sources if r.failed]

    @property
    def partial(self) -> list[SourceResult]:
        return [r for r in self.sources if r.status == PARTIAL]

    @property
    def ok(self) -> bool:
        return (not self.failed and not self.partial and self.prune_error is None and self.error is None
                and self.check_error is None and self.wal_expire_error is None and self.verify_error is None)

    def to_dict(self) -> dict[str, Any]:
        return {"started": iso_time(self.started), "dry_run": self.dry_run, "ok": self.ok, "stopped": self.stopped,
                "sources": [r.to_dict() for r in self.sources], "prune": self.prune,
                "prune_error": self.prune_error, "wal_expired": self.wal_expired,
                "wal_expire_error": self.wal_expire_error, "run_error": self.error, "check": self.check,
                "check_error": self.check_error, "verify": self.verify, "verify_error": self.verify_error}

    def summary(self) -> str:
        """One line per run: backups by outcome, then retention's; a source whose backup was saved but whose
        post hook or retention failed is one backup and one failed hook or retention, not a failed backup."""
        made = [r for r in self.sources if r.status in (OK, PARTIAL) or r.snapshot_id]
        failed = sum(r.status == FAILED and not r.snapshot_id for r in self.sources)
        hooks_failed = sum(r.status == FAILED and bool(r.snapshot_id) and r.post_exit not in (None, 0)
                           for r in self.sources)  # saved, then the post hook failed
        copies = [r.copy for r in self.sources if r.copy is not None]
        copied = sum(len(c["copied"]) for c in copies)  # snapshots sent, not sources that copied
        copies_failed = sum(r.copy_failed_step == "copy" for r in self.sources)
        copy_retention_failed = sum(r.copy_failed_step == "copy-retention" for r in self.sources)
        retention_failed = sum(r.retention_error is not None for r in self.sources)
        text = (f"run: {len(made)} backup(s), {failed} failed, {len(self.partial)} partial"
                + (f", {hooks_failed} post hook(s) failed" if hooks_failed else "")
                + (f"; copied {copied}" if copies or copies_failed else "")
                + (f", copy failed {copies_failed}" if copies_failed else "")
                + (f", copy-retention failed {copy_retention_failed}" if copy_retention_failed else "")
                + f"; retention removed {sum(len(r.retention.removed) for r in self.sources if r.retention)}")
        text += f", failed {retention_failed}" if retention_failed else ""
        if self.wal_expired:
            text += f"; wal-expire {'would remove' if self.dry_run else 'removed'} {len(self.wal_expired)}"
        elif self.wal_expire_error is not None:
            text += "; wal-expire failed"
        if self.check_error is not None:
            text += f"; {self.check_error}"
        elif self.check is not None and not self.dry_run:  # due: passed, or a stop skipped or cut it short
            text += "; check passed" if self.check.get("ok") else f"; check {self.check.get('stopped', 'skipped')}"
        if self.verify_error is not None:
            text += f"; {self.verify_error}"
        elif self.verify is not None and not self.dry_run:
            text += ("; verify passed" if self.verify.get("ok") else f"; verify {self.verify['stopped']}"
                     if "stopped" in self.verify else "; verify: nothing to verify")
        return text + (" (stopped early)" if self.stopped else "")

    def raise_for_status(self) -> None:
        """The CLI's verdict: exit 1 when a source failed (its copy-to included), 18 when only the check or
        the restore verification found problems (a snapshot that does not restore as saved), 3 when a backup
        was only partial.  A check or verification that could not run is exit 1, as a failed source."""
        if self.failed or self.prune_error or self.check_error or self.wal_expire_error or self.verify_error:
            names = ", ".join(f"{r.name} ({r.error or r.retention_error})" for r in self.failed)
            if self.wal_expire_error:
                names = ", ".join(filter(None, [names, f"wal-expire ({self.wal_expire_error})"]))
            if self.prune_error:
                names = ", ".join(filter(None, [names, f"prune ({self.prune_error})"]))
            if self.check_error:
                names = ", ".join(filter(None, [names, self.check_error]))
            if self.verify_error:
                names = ", ".join(filter(None, [names, self.verify_error]))
            found_only = (not self.failed and not self.prune_error and not self.wal_expire_error
                          and (self.check_error is None or self.check_problems)
                          and (self.verify_error is None or self.verify_problems))
            if found_only and (self.check_problems or self.verify_problems):
                raise VerificationFailed(f"scheduled run failed: {names}")
            raise ChunkvaultError(f"scheduled run failed: {names}")
        if self.partial:
            raise PartialBackup("scheduled run saved partial backups: "
                                + ", ".join(f"{r.name} ({r.error})" for r in self.partial))


# --------------------------------------------------------------------------- hooks and lock


def run_hook(command: str | tuple[str, ...], env: dict[str, str], cwd: str, timeout: float | None,
             log: Callable[[str], None], label: str) -> tuple[int, str | None]:
    """Run a hook; returns (exit code, error text or None).  Output goes to the log, not a pipe,
    so a hook that leaves a background process holding its stdout cannot hang the run."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = start_session(command, shell=isinstance(command, str), cwd=cwd, env=env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        except OSError as exc:  # a list's program not found (a string runs through /bin/sh, which says so)
            program = command if isinstance(command, str) else command[0]
            return 127, f"{label} hook could not start {program!r}: {exc.strerror or exc}"
        except BaseException:  # stopped as it started (its group ended): what it said is logged as below
            _log_output(out, log, label)
            raise
        try:
            rc = proc.wait(timeout=timeout)
            error = None if rc == 0 else f"{label} hook {process_end(rc)}"
            if rc != 0 and no_room_after(out.fileno(), out.seek(0, os.SEEK_END)):
                error += (f" (its output filled the temp directory {tempfile.gettempdir()}: it may have failed "
                          "for that)")
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, error = -signal.SIGKILL, f"{label} hook timed out after {timeout:g} s"
        except BaseException:  # stopped: what it said so far is what the operator needs most
            kill_group(proc)
            _log_output(out, log, label)
            raise
        _log_output(out, log, label)
    return rc, error


def _log_output(out: IO[bytes], log: Callable[[str], None], label: str) -> None:
    """What a hook or a source's command wrote to ``out``, line by line (its end, if it wrote much).  Only the
    end is read: a hook that printed gigabytes would have them all in memory."""
    size = out.seek(0, os.SEEK_END)
    start = max(0, size - 4 * HOOK_OUTPUT_LIMIT)  # a character is at most 4 bytes of UTF-8
    out.seek(start)
    text = out.read().decode(errors="replace")
    if start or len(text) > HOOK_OUTPUT_LIMIT:
        text = "..." + text[-HOOK_OUTPUT_LIMIT:]
    for line in text.splitlines():
        log(f"{label}: {line}")


def _stopped(exc: BaseException) -> str:
    """A step a stop ended, for the log: the stop's own words only where they add any ("stopped (stopped)")."""
    said = str(exc).strip().removeprefix("stopped: ")
    return "stopped" if said in ("", "stopped", "stopping") else f"stopped ({said})"


class LockFileError(ChunkvaultError):
    """A policy's lock file could not be opened.  A command ends with exit 2, as for a bad option; a daemon
    logs that run as failed and tries again at the next slot (the directory may be back by then)."""

    exit_code = 2


def _open_making_dir(path: str, flags: int) -> int:
    """``path`` opened (mode 0644 where created), its own directory made first if missing: a directory under
    /run is gone after a reboot, or when a service manager or tmpfiles cleans it.  The directories above are
    not made (a mistyped path is said, not created)."""
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        with suppress(FileExistsError):
            os.mkdir(os.path.dirname(os.path.abspath(path)), 0o755)
        return os.open(path, flags, 0o644)


def _open_lock(path: str) -> int:
    """The lock file, created if missing, and its own directory with it (``_open_making_dir``)."""
    try:
        return _open_making_dir(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise LockFileError(f"cannot open lock file {path}: {exc.strerror}") from None


@contextmanager
def policy_lock(path: str, held_by: str = "another run of this policy is in progress") -> Iterator[None]:
    """Exclusive advisory lock for one run of a policy (or one daemon); Locked, saying ``held_by``, if
    another holds it."""
    fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise Locked(f"{held_by} (lock {path})") from None
            raise
        with suppress(OSError):  # the pid is for people; the flock is the lock, held on a full disk too
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- runner


class Runner:
    """Performs what a policy says is due now (see the module docstring)."""

    def __init__(self, policy: Policy, password: bytes, *, url: str | None = None, clock: Clock = utc_now,
                 stop: threading.Event | None = None, log: Callable[[str], None] | None = None,
                 opener: Callable[[str, bytes], Any] | None = None, lock_file: str | None = None,
                 state_file: str | None = None, copy_password: Callable[[CopyTarget], bytes] | None = None):
        """``opener`` opens the repository and the copy-to destinations; ``copy_password`` gives a
        destination's password (default: its policy settings, else CHUNKVAULT_TO_PASSWORD_FILE, _COMMAND or
        CHUNKVAULT_TO_PASSWORD, as ``copy --to`` takes it); ``state_file`` remembers the last check."""
        self.policy = policy
        self.password = password
        self.url = url or policy.repository
        if not self.url:
            raise UsageError("no repository: set repository in the policy, or use -r/--repo")
        self.clock = clock
        self.stop = stop or threading.Event()
        self.log = log or (lambda line: None)
        if opener is None:
            from .repository import Repository

            opener = Repository.open
        self.opener = opener
        self.lock_file = lock_file or policy.lock_file
        self.state_file = state_file or policy.state_file
        if policy.check is not None and not self.state_file:
            raise UsageError("check needs a state file to remember the last check: set state-file")
        if policy.verify is not None and not self.state_file:
            raise UsageError("verify needs a state file to remember the last verification: set state-file")
        self.copy_password = copy_password or self._copy_password

    def _copy_password(self, target: CopyTarget) -> bytes:
        from .passwords import TO

        pw = TO.given(argparse.Namespace(), fallback=(target.password_file, target.password_command),
                      cwd=self.policy.base_dir)
        if pw is None:
            raise UsageError(f"no password for copy-to {target.url}: set copy-to-password-file or "
                             f"copy-to-password-command, or {TO.env}_FILE, {TO.env}_COMMAND or {TO.env}")
        return pw

    def run(self, *, dry_run: bool = False, only: list[str] | None = None) -> RunReport:
        """What is due now; ``only``: these sources, and no check nor verification."""
        # A source named twice runs once (its retention ran twice, and it was counted twice).
        sources = [self.policy.source(n) for n in dict.fromkeys(only)] if only else list(self.policy.sources)
        report = RunReport(self.clock(), dry_run)
        if dry_run or not self.lock_file:
            self._run(report, sources, checking=not only)
        else:
            with policy_lock(self.lock_file):
                self._run(report, sources, checking=not only)
        return report

    def _run(self, report: RunReport, sources: list[Source], checking: bool) -> None:
        repo = self.opener(self.url, self.password)
        try:
            snaps = repo.snapshots()
            for src in sources:
                if self.stop.is_set():
                    report.stopped = True
                    report.sources.append(SourceResult(src.name, SKIPPED, reason="stopping"))
                    self.log(f"{src.name}: skipped, stopping")
                    continue
                result = self._source(repo, src, snaps, report)
                report.sources.append(result)
                if result.status in (OK, PARTIAL):
                    snaps = repo.snapshots()
            removed_any = False
            for src, result in zip(sources, report.sources):
                # a snapshot saved is kept in order, a post hook that failed after it too: else a broken
                # notification hook let the snapshots pile up past every rule
                if src.retention is None or result.status in (FAILED, SKIPPED) and result.snapshot_id is None:
                    if src.retention is not None and result.status == FAILED:
                        self.log(f"{src.name}: retention skipped, the backup failed")
                    continue
                if self.stop.is_set():
                    report.stopped = True
                    self.log(f"{src.name}: retention skipped, stopping")
                    continue
                try:
                    result.retention = self._retention(repo, src, report.dry_run, result.snapshot_id,
                                                       due=result.kind if result.status == WOULD_RUN else None)
                except Locked as exc:
                    if self.stop.is_set():  # its wait for the lock ended by the stop: not a failure
                        report.stopped = True
                        self.log(f"{src.name}: retention skipped, stopping (the repository was locked)")
                        continue
                    result.retention_error = f"retention: {exc}"
                    self.log(f"{src.name}: retention failed: {exc}")
                    continue
                except ChunkvaultError as exc:
                    result.retention_error = f"retention: {exc}"
                    self.log(f"{src.name}: retention failed: {exc}")
                    continue
                removed_any |= bool(result.retention.removed)
            uncopied = [src.name for src, result in zip(sources, report.sources)
                        if src.copy_to is not None and src.copy_to.wal and not result.wal_copied]
            if self.policy.wal_expire and uncopied and not self.stop.is_set():
                self.log(f"wal-expire skipped: {', '.join(uncopied)} copied no archived WAL this run (copy-wal), "
                         "and what it has not sent yet would never reach its copy-to")
            elif self.policy.wal_expire and not self.stop.is_set():
                removed_any |= self._wal_expire(repo, report)
            if self.policy.prune and removed_any and not self.stop.is_set():
                if report.dry_run:
                    self.log("prune: would run once retention removed those")
                else:
                    self._prune(repo, report)
            if checking and self.policy.check is not None:
                self._check(repo, report)
            if checking and self.policy.verify is not None:
                self._verify(repo, report)
        finally:
            close = getattr(repo, "close", None)
            if close is not None:
                close()

    def _prefixed(self, name: str) -> Callable[[str], None]:
        return lambda line: self.log(f"{name}: {line}")

    def _host(self, src: Source) -> str:
        return src.host or socket.gethostname()

    def _source(self, repo: Any, src: Source, snaps: list[Any], report: RunReport) -> SourceResult:
        now = report.started
        history = [(s.datetime, s.kind) for s in src.history(snaps, self._host(src))]
        due = decide(src.full, src.diff, now, history)
        if due.kind is None:
            nxt = next_wakeup(src.cadences(), now)
            self.log(f"{src.name}: nothing due" + (f" (next slot {iso_time(nxt)})" if nxt else ""))
            return SourceResult(src.name, IDLE, reason=due.reason)
        result = SourceResult(src.name, WOULD_RUN if report.dry_run else FAILED, due.kind, due.slot, due.reason)
        if report.dry_run:
            self.log(f"{src.name}: would make a {due.kind} backup ({due.reason})")
            if src.copy_to is not None:
                self.log(f"{src.name}: would copy it to {_shown(src.copy_to.url)}"
                         + (", then apply copy-retention there" if src.copy_to.retention else ""))
            return result
        started = time.monotonic()
        env = dict(os.environ)
        env.update(CHUNKVAULT_SOURCE=src.name, CHUNKVAULT_KIND=due.kind, CHUNKVAULT_SLOT=iso_time(due.slot) or "",
                   CHUNKVAULT_PATHS=os.pathsep.join(src.paths))
        env = without_secrets(env)  # hooks get no secret
        try:
            pre_ok = True
            if src.pre is not None:
                result.pre_exit, error = run_hook(src.pre, env, self.policy.base_dir, src.hook_timeout,
                                                  self._prefixed(src.name), "pre")
                if error:
                    pre_ok = False
                    result.error = error
            if pre_ok and self.stop.is_set():  # the stop came during the pre hook: no backup, the post hook still
                result.status, result.reason = SKIPPED, "stopping (the stop came during the pre hook)"
            elif pre_ok:
                self._backup(repo, src, due.kind, result, env)
                if src.copy_to is not None and result.snapshot_id is not None:
                    report.stopped |= not self._copy(repo, src, result)
        except BaseException as exc:  # stopped (SIGTERM, Ctrl-C): what the pre hook set up is still undone
            result.status = FAILED
            word = str(exc) or ("interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__)
            result.error = f"stopped ({word})"
            self.log(f"{src.name}: stopped; running its post hook before stopping" if src.post else
                     f"{src.name}: stopped")
            self._post(src, env, result)
            raise
        self._post(src, env, result)
        result.duration = time.monotonic() - started
        report.stopped |= result.status == SKIPPED
        self.log(_describe(result))
        return result

    def _post(self, src: Source, env: dict[str, str], result: SourceResult) -> None:
        """The post hook, told how the backup went: it runs whenever the pre hook was started (it may have
        put a database into backup mode, or mounted a file system snapshot), a stopped run included."""
        if src.post is None:
            return
        post_env = dict(env, CHUNKVAULT_RESULT=result.status, CHUNKVAULT_SNAPSHOT_ID=result.snapshot_id or "",
                        CHUNKVAULT_ERROR=result.error or "")
        result.post_exit, error = run_hook(src.post, post_env, self.policy.base_dir, src.hook_timeout,
                                           self._prefixed(src.name), "post")
        if error:
            result.status = FAILED
            result.error = "; ".join(filter(None, [result.error, error]))

    def _backup(self, repo: Any, src: Source, kind: str, result: SourceResult, env: dict[str, str]) -> None:
        try:
            if src.command is not None:
                assert src.stdin_name is not None
                with tempfile.TemporaryFile() as err:
                    try:
                        res = repo.backup_command(src.argv(), src.stdin_name, kind=kind, tags=list(src.tags),
                                                  host=self._host(src), fixed_chunks=list(src.fixed_chunks),
                                                  cwd=self.policy.base_dir, env=env, stderr=err)
                    finally:
                        _log_output(err, self._prefixed(src.name), "command")
            else:
                excludes = excludes_of(list(src.excludes), list(src.exclude_files))
                iexcludes = excludes_of(list(src.iexcludes), list(src.iexclude_files))
                res = repo.backup(list(src.paths), kind=kind, tags=list(src.tags), host=self._host(src),
                                  excludes=excludes, iexcludes=iexcludes, fixed_chunks=list(src.fixed_chunks),
                                  one_file_system=src.one_file_system, exclude_if_present=list(src.exclude_if_present),
                                  exclude_caches=src.exclude_caches, exclude_larger_than=src.exclude_larger_than,
                                  ignore_inode=src.ignore_inode, ignore_ctime=src.ignore_ctime,
                                  listing=self._lister(src) if src.list_entries else None, postgres=src.postgres,
                                  pg_checkpoint=src.pg_checkpoint, pg_standby_wait=src.pg_standby_wait)
        except (ChunkvaultError, Stopped) as exc:
            if self._ended_by_stop(exc):
                result.status, result.reason = SKIPPED, f"stopping ({exc})"
                return
            if isinstance(exc, Stopped):  # a caller's Repository.stop, not this run's
                raise
            result.status, result.error = FAILED, str(exc)
            return
        except Exception as exc:  # a daemon outlives one broken run; the message names the bug
            result.status, result.error = FAILED, f"internal error: {type(exc).__name__}: {exc}"
            return
        snap = res.snapshot
        result.snapshot_id = snap.id
        result.kind = snap.kind
        for w in res.warnings:
            self.log(f"{src.name}: warning: {w}")
        if res.partial:
            result.status = PARTIAL
            result.error = f"{len(snap.stats.get('unreadable', []))} path(s) could not be read"
        else:
            result.status = OK

    def _lister(self, src: Source) -> Callable[[Any], None]:
        """A source's ``list``: each entry its backup lists, a log line as ``backup --list`` prints it."""
        def log(listed: Any) -> None:
            self.log(f"{src.name}: {LIST_LETTERS[listed.change]} {shown_name(listed.path) or '.'}")
        return log

    def _ended_by_stop(self, exc: BaseException) -> bool:
        """A backup that a stop ended, not a failure: its wait for the repository lock, its remote's retries
        or its uploads' turns under a rate limit, given up because the run was told to stop, or its command
        ended (a stop sent to the whole process group, as Ctrl-C and systemd send it, reaches the command
        too)."""
        return self.stop.is_set() and isinstance(exc, (Locked, RemoteUnavailable, Stopped, SourceCommandFailed))

    def _retention(self, repo: Any, src: Source, dry_run: bool, saved: str | None = None,
                   policy: RetentionPolicy | None = None, where: str = "", due: str | None = None
                   ) -> RetentionResult:
        """The source's retention (or ``policy``, in the repository ``where`` names), as ``forget`` with a
        policy applies it (planned under the lock, from every snapshot, a replayed one refused), to the
        source's own history as ``retention_scope`` sees it: never the snapshot ``saved`` by this run, nor
        one dated ahead of the clock, nor one its copy-to has not received yet.  ``due``: the kind of backup a
        dry run would make first, counted as saved, so that it predicts what the run removes after it."""
        from .store.lifecycle import NOT_SELECTED

        rules = policy or src.retention
        assert rules is not None
        host, now = self._host(src), self.clock()
        planned = [] if due is None else [self._stand_in(repo, src, host, now, due)]
        # not at the copy-to itself, nor in a dry run that would copy first (its copy sends what is missing)
        sent_through = self._sent_through(src) if policy is None and not planned else None
        saved = planned[0].id if planned else saved
        scopes: list[RetentionScope] = []

        def scope(snaps: list[Any]) -> list[Any]:
            scopes.append(retention_scope(src.history(snaps, host), rules, now, saved, src.tz, sent_through))
            return scopes[-1].weighed

        plan = repo.forget(policy=rules, scope=scope, now=now, dry_run=dry_run, tz=src.tz, planned=planned)
        if scopes:
            self._say_left_out(src, scopes[-1])
        reasons = {d.snapshot_id: ", ".join(d.reasons) for d in plan.decisions if not d.keep}
        kept = sum(1 for d in plan.decisions if d.keep and d.reasons != (NOT_SELECTED,))
        out = RetentionResult(list(plan.remove), [r.diff_id for r in plan.rebases], kept, reasons)
        if not plan.remove and not kept:
            return out
        verb = "would remove" if dry_run else "removed"
        if dry_run:
            for sid in out.removed:
                self.log(f"{src.name}: would remove {sid[:8]} ({reasons[sid]})")
            for sid in out.rebased:
                shown = "the backup it would make" if sid == STAND_IN_ID else sid[:8]
                self.log(f"{src.name}: would rebase {shown} (its parent goes)")
        self.log(f"{src.name}{where}: retention {verb} {len(out.removed)} snapshot(s), "
                 f"{'would rebase' if dry_run else 'rebased'} {len(out.rebased)}, kept {out.kept}")
        return out

    @staticmethod
    def _stand_in(repo: Any, src: Source, host: str, now: datetime, kind: str) -> Any:
        """The snapshot a dry run's backup of ``kind`` would save now, for its retention to count: a
        differential on the source's newest snapshot (a full where it has none)."""
        from .store.snapshot import KIND_DIFF, KIND_FULL, Snapshot

        newest = max(src.history(repo.snapshots(), host), key=lambda s: s.datetime, default=None)
        parent = newest.id if kind == "diff" and newest is not None else None
        return Snapshot(time=now.astimezone(timezone.utc).isoformat(timespec="microseconds"),
                        kind=KIND_DIFF if parent else KIND_FULL, parent=parent, host=host,
                        paths=list(src.paths) if src.stdin_name is None else [src.stdin_name],
                        tags=list(src.tags), stdin_name=src.stdin_name, id=STAND_IN_ID)

    def _copy(self, repo: Any, src: Source, result: SourceResult) -> bool:
        """Copy the snapshot this run saved to the source's copy-to, with those of the source's snapshots
        saved since the newest one there (an earlier copy failed), then apply copy-retention there.  A
        failure fails the source, never the backup: its snapshot stays, and its retention applies.  False
        when a stop cut it short."""
        target = src.copy_to
        assert target is not None and result.snapshot_id is not None
        shown = _shown(target.url)
        if self.stop.is_set():
            self.log(f"{src.name}: copy to {shown} skipped, stopping")
            return False
        step = "copy"
        try:
            dest = self.opener(target.url, self.copy_password(target))
            try:
                done, wal_failed = self._copy_into(repo, dest, src, result.snapshot_id, shown)
                result.copy = done.to_dict()
                self._remember_sent(src, done.sent_through)
                result.wal_copied = target.wal and not wal_failed
                if wal_failed:  # the snapshots went, and their retention runs: the run still fails
                    self._copy_failed(src, result, "copy", shown, wal_failed)
                if target.retention is not None and not self.stop.is_set():
                    step = "copy-retention"
                    saved = next((b for a, b in done.copied if a == result.snapshot_id), None)
                    try:
                        done.retention = self._retention(dest, src, False, saved, target.retention, f" at {shown}")
                    except PermissionDenied as exc:  # refused at every run alike: say what to change
                        raise exc.explained("; copy-retention forgets there, which this destination does not "
                                            "allow (an append-only token, a bucket without delete): give "
                                            "copy-to credentials that may delete, or leave copy-retention out "
                                            "and forget there from a trusted machine") from None
                    result.copy = done.to_dict()
            finally:
                close = getattr(dest, "close", None)
                if close is not None:
                    close()
        except (ChunkvaultError, Stopped) as exc:
            if self._ended_by_stop(exc):
                self.log(f"{src.name}: {step} at {shown} {_stopped(exc)}")
                return False
            if isinstance(exc, Stopped):
                raise
            self._copy_failed(src, result, step, shown, str(exc))
        except Exception as exc:  # a daemon outlives one broken run; the message names the bug
            self._copy_failed(src, result, step, shown, f"internal error: {type(exc).__name__}: {exc}")
        return True

    def _copy_into(self, repo: Any, dest: Any, src: Source, saved: str, shown: str) -> tuple[CopyDone, str]:
        """The snapshots copied (a snapshot not copied is a ChunkvaultError), and what archived WAL files were
        not, as the run's error ("": none): the snapshots that went are recorded, and their retention runs."""
        host = self._host(src)
        there = [s.datetime for s in src.history(dest.snapshots(), host)]
        newest = max(there, default=None)
        sent = [s for s in src.history(repo.snapshots(), host)
                if s.id == saved or newest is not None and s.datetime > newest]
        ids = [s.id for s in sent]
        assert src.copy_to is not None
        copied = repo.copy_to(dest, ids, wal=src.copy_to.wal)
        wal_failed = "; ".join(f"wal/{a} not copied: {why}" for a, why in copied.wal_failed)
        if copied.failed:
            raise ChunkvaultError("; ".join([f"{a[:8]} not copied: {why}" for a, why in copied.failed]
                                            + ([wal_failed] if wal_failed else [])))
        done = CopyDone(shown, list(copied.copied), list(copied.skipped), copied.bytes_sent,
                        sent_through=max(there + [s.datetime for s in sent], default=None))
        wal = f", {len(copied.wal_copied)} archived WAL file(s)" if src.copy_to.wal else ""
        self.log(f"{src.name}: copied {len(done.copied)} snapshot(s){wal} to {shown} ({len(done.skipped)} there "
                 f"already, {format_size(done.bytes_sent)} sent)")
        return done, wal_failed

    def _remember_sent(self, src: Source, through: datetime | None) -> None:
        """Remember in the state file how far the source's copies reached its copy-to (``_sent_through``)."""
        if through is None or self.state_file is None:
            return
        assert src.copy_to is not None
        sections = _read_state(self.state_file, lambda line: None)  # what does not read was said or is said
        mine = dict(sections["copies"].get(self.url, {}))
        mine[src.name] = {"to": _shown(src.copy_to.url), "through": through.isoformat(timespec="microseconds")}
        sections["copies"][self.url] = mine
        _write_state(self.state_file, sections, self.log)

    def _sent_through(self, src: Source) -> datetime | None:
        """The date of the newest of the source's snapshots its copy-to held after the last copy that went, as
        the state file remembers it; None when no copy to it is remembered (a first copy sends only the
        snapshot it is for: there is nothing the next one would send that retention must keep)."""
        if src.copy_to is None:
            return None
        entry = _read_state(self.state_file, lambda line: None)["copies"].get(self.url, {}).get(src.name)
        if not isinstance(entry, dict) or entry.get("to") != _shown(src.copy_to.url):
            return None
        return parse_iso_time(entry.get("through"))

    def _copy_failed(self, src: Source, result: SourceResult, step: str, shown: str, why: str) -> None:
        """Fail the source's copy: a second failure (copy-retention after archived WAL that did not go) is
        added to the first, which names the step the summary counts."""
        what = f"{step} at {shown}"
        said = f"{what}: {why}"
        result.copy_error = "; ".join(filter(None, [result.copy_error, said]))
        result.copy_failed_step = result.copy_failed_step or step
        result.status = FAILED
        result.error = "; ".join(filter(None, [result.error, said]))
        self.log(f"{src.name}: {what} failed: {why}")

    def _check(self, repo: Any, report: RunReport) -> None:
        """The policy's check when it is due: problems fail the run, and are named in the log; one that
        passed is remembered, so that the next is due at its next slot."""
        assert self.policy.check is not None
        state = _read_state(self.state_file, self.log)["checks"]
        mine = state.get(self.url, {})
        now = self.clock()
        last = parse_iso_time(mine.get("time"))
        due = check_due(self.policy.check, now, last)
        if due.kind is None:
            nxt = self.policy.check.next(now)
            self.log("check: not due" + (f" (next slot {iso_time(nxt)})" if nxt else ""))
            return
        subset, slice_no = check_slice(self.policy.check_subset, mine.get("slice"))
        reading = (f", reading slice {slice_no} of {subset.split('/')[1]}" if slice_no is not None
                   else f", reading {subset} of the data" if subset else "")  # "2/3 of the data" read as two thirds
        report.check = {"slot": iso_time(due.slot), "reason": due.reason, "subset": subset}
        if report.dry_run:
            self.log(f"check: would check the repository{reading} ({due.reason})")
            return
        if self.stop.is_set():
            report.stopped = True
            report.check.update(ok=None, stopped="skipped")  # not run: neither passed nor failed
            self.log("check: skipped, stopping")
            return
        self.log(f"check: checking the repository{reading} ({due.reason})")
        started = time.monotonic()
        try:
            done = repo.check(subset=subset)
        except (ChunkvaultError, Stopped) as exc:
            if self._ended_by_stop(exc):
                report.stopped = True
                report.check.update(ok=None, stopped="stopped")
                self.log(f"check: {_stopped(exc)}")
                return
            if isinstance(exc, Stopped):
                raise
            report.check_error = f"check failed: {exc}"
            self.log(f"check: failed: {exc}")
            return
        for w in done.warnings:
            self.log(f"check: warning: {w}")
        for p in done.problems:
            self.log(f"check: error: {p.object}: {p.problem}"
                     + (f" (affects snapshots {' '.join(s[:8] for s in p.snapshots)})" if p.snapshots else ""))
        report.check.update(ok=done.ok, problems=[f"{p.object}: {p.problem}" for p in done.problems],
                            snapshots=done.snapshots, packs=done.packs, packs_read=done.packs_read,
                            bytes_read=done.bytes_read, duration=round(time.monotonic() - started, 3))
        if not done.ok:
            report.check_problems = len(done.problems)
            report.check_error = f"check found {len(done.problems)} problem(s)"
            self.log(f"check: {len(done.problems)} problem(s) found; the check runs again at the next run")
            return
        self.log(f"check: no problems in {done.snapshots} snapshots, {done.packs} packs"
                 + (f"; read {done.packs_read} packs ({format_size(done.bytes_read)})" if done.packs_read else ""))
        _remember(self.state_file, "checks", self.url,
                  {"time": iso_time(now), **({"slice": slice_no} if slice_no is not None else {})}, self.log)

    def _verify(self, repo: Any, report: RunReport) -> None:
        """The policy's restore verification of each source it is due for: the source's newest snapshot is
        restored and compared, its PostgreSQL started, its command run (``verify_restore``).  Each source is
        due on its own, against the last verification of its that passed: one that passed is remembered at
        once and not due again until the next slot, while one that failed is a log line with its reason,
        fails the run and runs again at every run, alone."""
        assert self.policy.verify is not None
        said = self.policy.check is not None  # a state file that does not read was said by the check
        state = _read_state(self.state_file, (lambda line: None) if said else self.log)
        now = self.clock()
        sources = [src for src in self.policy.sources if src.verify is not None]
        last = verified_times(state["verifications"].get(self.url, {}), [src.name for src in sources])
        dues = {src.name: verify_due(self.policy.verify, now, last[src.name]) for src in sources}
        due_sources = [src for src in sources if dues[src.name].kind is not None]
        if sources and not due_sources:
            nxt = self.policy.verify.next(now)
            self.log("verify: not due" + (f" (next slot {iso_time(nxt)})" if nxt else ""))
            return
        first = dues[due_sources[0].name] if due_sources else verify_due(self.policy.verify, now, None)
        report.verify = {"slot": iso_time(first.slot), "reason": first.reason, "sources": []}
        if not report.dry_run and self.stop.is_set():
            report.stopped = True
            report.verify.update(ok=None, stopped="skipped")
            self.log("verify: skipped, stopping")
            return
        try:
            snaps = repo.snapshots()
        except ChunkvaultError as exc:
            report.verify["ok"] = None
            report.verify_error = f"verify failed: {exc}"
            self.log(f"verify: failed: {exc}")
            return
        for src in sources:
            if src not in due_sources:
                self.log(f"verify: {src.name}: not due (passed {iso_time(last[src.name])})")
        backing_up = {r.name for r in report.sources if r.status == WOULD_RUN}  # a dry run's backups to come
        picked: list[tuple[Source, Any]] = []
        for src in due_sources:
            history = [s for s in src.history(snaps, self._host(src)) if not dated_ahead(s.datetime, now)]
            newest = max(history, key=lambda s: s.datetime, default=None)
            if report.dry_run and (newest is not None or src.name in backing_up):
                which = "the one this run makes" if src.name in backing_up else f"now {newest.id[:8]}"
                report.verify["sources"].append({"source": src.name,
                                                 "snapshot": None if src.name in backing_up else newest.id})
                self.log(f"verify: would restore and compare {src.name}'s newest snapshot ({which})"
                         + _verify_extras(src) + f" ({dues[src.name].reason})")
            elif newest is None:
                self.log(f"verify: {src.name}: no snapshot to verify")
            else:
                picked.append((src, newest))
        if report.dry_run:
            return
        self.log(f"verify: verifying the newest snapshot of {len(picked)} source(s) ({first.reason})")
        failed: list[str] = []
        not_run: list[str] = []
        for src, snap in picked:
            if self.stop.is_set():
                report.verify["stopped"] = "stopped" if report.verify["sources"] else "skipped"
                self.log(f"verify: {src.name}: skipped, stopping")
                break
            entry = self._verify_one(repo, src, snap)
            if entry is None:  # a stop cut it short
                report.verify["stopped"] = "stopped"
                break
            self._fail_for_unreadable(repo, src, entry)
            entry["reason"] = dues[src.name].reason
            report.verify["sources"].append(entry)
            if entry["not_run"]:
                not_run.append(src.name)
            elif not entry["ok"]:
                failed.append(src.name)
            else:
                self._remember_verified([s.name for s in sources], src.name, snap.id, now)
        stopped = "stopped" in report.verify
        report.stopped |= stopped
        report.verify["ok"] = None if stopped or not picked else not failed and not not_run
        if failed or not_run:  # what failed before a stop still fails the run
            report.verify_problems = len(failed)
            report.verify_error = "verify " + ", ".join(filter(None, [
                f"failed for {len(failed)} of {len(picked)} snapshot(s) ({', '.join(failed)})" if failed else "",
                f"could not run for {', '.join(not_run)}" if not_run else ""]))
            self.log(f"verify: {report.verify_error}; "
                     + ("it runs" if len(failed) + len(not_run) == 1 else "they run") + " again at the next run")
            return
        if stopped:
            return
        if not picked:
            self.log(("verify: no source due has a snapshot to verify" if sources else
                      "verify: every source has verify = false") + "; it runs again at the next run")
            return
        self.log(f"verify: {len(picked)} snapshot(s) restored as saved")

    def _fail_for_unreadable(self, repo: Any, src: Source, entry: dict[str, Any]) -> None:
        """A snapshot object that does not load can be neither dated nor told whose it is: it may be this
        source's newest, which the verification then did not prove (``verify-restore`` of the latest fails
        likewise).  Such a source's verification fails, each such snapshot said; one written by a newer
        chunkvault is no damage: the verification could not run."""
        unreadable = getattr(getattr(repo, "store", None), "unreadable_snapshots", None) or {}
        for name, exc in sorted(unreadable.items()):
            newer = isinstance(exc, NewerObject)
            why = (f"snapshot {name[:8]} is left out ({exc.reason}): this chunkvault cannot verify it" if newer else
                   f"the snapshot object {name[:8]} is unreadable ({exc.object_name}: {exc.reason}), and it may "
                   f"be {src.name}'s newest: `check` names what it takes down, `forget {name[:8]}` removes it")
            self.log(f"verify: {src.name}: {why}")
            entry["not_run"] = entry["not_run"] or newer
            entry["ok"] = False
            entry["error"] = entry["error"] or why

    def _remember_verified(self, names: list[str], source: str, snapshot: str, now: datetime) -> None:
        """Remember in the state file, at once, that ``source`` passed with ``snapshot``: a later source's
        failure or a stop does not make it due again."""
        sections = _read_state(self.state_file, lambda line: None)  # what does not read was said already
        mine = sections["verifications"]
        mine[self.url] = verification_passed(mine.get(self.url, {}), names, source, snapshot, now)
        _write_state(self.state_file, sections, self.log)

    def _verify_one(self, repo: Any, src: Source, snap: Any) -> dict[str, Any] | None:
        """One source's verification as the run reports it; None when a stop cut it short.  A verification
        that could not run (the repository out of reach, no scratch directory) has ``not_run``: exit 1, not
        the exit of a snapshot found damaged."""
        from .verify import verify_restore

        v = src.verify
        assert v is not None
        # every key at once: the entry of one that could not run has the same ones as the README's row says
        entry: dict[str, Any] = {"source": src.name, "snapshot": snap.id, "ok": False, "not_run": False,
                                 "duration": 0.0, "error": None, "mismatches": 0, "pg_start": None,
                                 "command_exit": None}
        self.log(f"verify: {src.name}: restoring snapshot {snap.id[:8]}" + _verify_extras(src))
        started = time.monotonic()
        try:
            with self._stopped_with(repo):
                done = verify_restore(
                    repo=repo, snapshot=snap, then=v.then, timeout=v.timeout, scratch=v.scratch,
                    env=dict(os.environ, CHUNKVAULT_SOURCE=src.name), numeric_owner=v.numeric_owner,
                    pg_start=v.pg_start, pg_query=v.pg_query, pg_expect=v.pg_expect, pg_bindir=v.pg_bindir,
                    pg_recover="end" if v.pg_recover else None,
                    **({"pg_dbname": v.pg_dbname} if v.pg_dbname is not None else {}))
        except (ChunkvaultError, Stopped) as exc:
            if self._ended_by_stop(exc):
                self.log(f"verify: {src.name}: {_stopped(exc)}")
                return None
            if isinstance(exc, Stopped):
                raise
            # a PostgreSQL copy that would not start is the snapshot's failure; anything else kept it from running
            entry.update(not_run=not isinstance(exc, VerificationFailed), error=str(exc),
                         duration=round(time.monotonic() - started, 3))
            self.log(f"verify: {src.name}: snapshot {snap.id[:8]} "
                     + ("could not be verified" if entry["not_run"] else "failed") + f": {exc}")
            return entry
        except Exception as exc:  # a daemon outlives one broken run; the message names the bug
            entry.update(not_run=True, error=f"internal error: {type(exc).__name__}: {exc}")
            self.log(f"verify: {src.name}: snapshot {snap.id[:8]} could not be verified: {entry['error']}")
            return entry
        for w in done.warnings:
            self.log(f"verify: {src.name}: warning: {w}")
        if not done.ok and not done.mismatch_count and self.stop.is_set():
            # the stop (systemd's, Ctrl-C's) reached the copy's server or verify-then too: that they ended is
            # the stop's doing, not the snapshot's, which is neither failed nor passed (bytes that differ are)
            self.log(f"verify: {src.name}: stopped ({verify_failure(done)})")
            return None
        entry.update(ok=done.ok, duration=done.duration, mismatches=done.mismatch_count,
                     pg_start=None if done.pg_start is None else [_pg_summary(p) for p in done.pg_start],
                     command_exit=None if done.command is None else done.command.exit_code)
        if getattr(done, "error_kind", None) == "no_space":  # nothing is known of the data: it could not run
            entry["not_run"] = True
        if done.ok:
            self.log(f"verify: {src.name}: snapshot {snap.id[:8]} restored as saved ({done.files} files, "
                     f"{format_size(done.bytes)}, {done.duration:.1f} s)"
                     + "".join(f"; PostgreSQL {p.version} in {p.data_directory} started"
                               + (f", the query answered {p.answer!r}" if p.answer is not None else "")
                               for p in done.pg_start or ()))
            return entry
        entry["error"] = verify_failure(done)
        self.log(f"verify: {src.name}: snapshot {snap.id[:8]} failed: {entry['error']}")
        return entry

    @contextmanager
    def _stopped_with(self, repo: Any) -> Iterator[None]:
        """Within the block, a stop of the run (SIGTERM) also stops the repository's operation: a restore of a
        large snapshot would otherwise hold the stop for as long as it takes."""
        stop_repo = getattr(repo, "stop", None)
        if stop_repo is None:
            yield
            return
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                if self.stop.is_set():
                    stop_repo()
                    return

        watcher = threading.Thread(target=watch, name="verify-stop", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()

    def _say_left_out(self, src: Source, scope: RetentionScope) -> None:
        """Why retention kept what its rules did not weigh: snapshots dated ahead (a clock set back), and
        the run's own snapshot the rules would have removed."""
        if scope.ahead:
            newest = max(s.datetime for s in scope.ahead)
            self.log(f"{src.name}: warning: {len(scope.ahead)} snapshot(s) dated ahead of this clock (newest "
                     f"{iso_time(newest)}): kept, and not counted by retention until then (was the clock set back?)")
        if scope.unsent:
            assert src.copy_to is not None
            self.log(f"{src.name}: retention keeps {len(scope.unsent)} snapshot(s) not copied to "
                     f"{_shown(src.copy_to.url)} yet (saved since {iso_time(min(s.datetime for s in scope.unsent))}): "
                     "the next copy sends them")
        if scope.spared == STAND_IN_ID:
            self.log(f"{src.name}: warning: retention would keep the backup it would make, which its rules would "
                     "remove")
        elif scope.spared:
            self.log(f"{src.name}: warning: retention keeps the snapshot {scope.spared[:8]} this run saved, "
                     "which its rules would remove")

    def _wal_expire(self, repo: Any, report: RunReport) -> bool:
        """``wal-expire``: the archived WAL files before the oldest snapshot's base backup go (as
        ``archive-expire --before oldest-snapshot``); whether any did, so that prune frees their data.  A
        repository whose snapshots hold no base backup has nothing to expire by; a lock held is a skip."""
        from .errors import NoBaseBackup

        try:
            gone = repo.archive_expire("oldest-snapshot", dry_run=report.dry_run)
        except Locked as exc:
            self.log(f"wal-expire skipped: {exc}")
            return False
        except NoBaseBackup:
            self.log("wal-expire: no snapshot holds a base backup, nothing says which WAL they need")
            return False
        except ChunkvaultError as exc:
            report.wal_expire_error = str(exc)
            self.log(f"wal-expire failed: {exc}")
            return False
        report.wal_expired = gone
        if gone:
            self.log(f"wal-expire: {'would remove' if report.dry_run else 'removed'} {len(gone)} archived WAL "
                     f"file(s), {gone[0]} to {gone[-1]}")
        return bool(gone) and not report.dry_run

    def _prune(self, repo: Any, report: RunReport) -> None:
        try:
            plan = repo.prune(max_unused=self.policy.max_unused, max_repack_size=self.policy.max_repack_size)
        except Locked as exc:
            self.log(f"prune skipped: {exc}")
            return
        except ChunkvaultError as exc:
            report.prune_error = str(exc)
            self.log(f"prune failed: {exc}")
            return
        report.prune = plan.to_dict()
        self.log(f"prune: deleted {len(plan.delete)} pack(s), repacked {len(plan.repack)}, "
                 f"freed {format_size(plan.freed_bytes)}")


def _shown(url: str) -> str:
    """A URL for the log: without a password it may hold (``sftp://user:secret@host/``)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def _read_state(path: str | None, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The last check and the last verification that passed, by repository URL (``schedule.state_sections``).
    A state file that is missing is none yet; one that does not read is said, and taken as none yet (a
    check or verification too many, never one too few)."""
    if path is None:
        return state_sections(None)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return state_sections(None)
    except (OSError, ValueError) as exc:
        log(f"warning: state file {path} does not read ({getattr(exc, 'strerror', None) or exc}): "
            "the check and the verification are taken as due")
        return state_sections(None)
    return state_sections(doc)


def _remember(path: str | None, section: str, url: str, entry: dict[str, Any], log: Callable[[str], None]) -> None:
    """Record ``entry`` for ``url`` in one section of the state file, the other as it is there now."""
    sections = _read_state(path, lambda line: None)  # what does not read was said when the run read it
    sections[section][url] = entry
    _write_state(path, sections, log)


def _write_state(path: str | None, sections: dict[str, dict[str, Any]], log: Callable[[str], None]) -> None:
    """Replace the state file whole (a crash leaves the old one or the new one), writable by this user alone
    whatever the umask: another user who could write it would mark a failed verification passed.  Its own
    directory is made if missing, as the lock file's is (else each run checked and verified again, its
    warning alone saying why); the directories above are not."""
    if path is None:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with suppress(FileNotFoundError):
            os.unlink(tmp)  # a crashed run's, which would keep its mode
        fd = _open_making_dir(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(state_document(sections), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with suppress(OSError):
            os.unlink(tmp)
        log(f"warning: state file {path} could not be written ({exc.strerror or exc}): the step it remembers "
            "runs again at the next run")


def _verify_extras(src: Source) -> str:
    """What a source's verification does beyond the restore and the comparison, for its log lines."""
    v = src.verify
    assert v is not None
    started = "recover its PostgreSQL to the archive's end" if v.pg_recover else "start its PostgreSQL"
    extras = ([started] if v.pg_start else []) + (["run its verify-then"] if v.then else [])
    return f", then {' and '.join(extras)}" if extras else ""


def _pg_summary(p: Any) -> dict[str, Any]:
    """What the run's report keeps of starting one data directory of the copy (verify-restore's
    ``pg_start`` result, its log tail left out)."""
    return {"data_directory": p.data_directory, "version": p.version, "ok": p.ok,
            "ready_seconds": p.ready_seconds, "databases": list(p.databases), "answer": p.answer,
            "error": p.error}


def verify_failure(done: Any) -> str:
    """Why a verification (a ``VerifyReport``) failed, in one line: the restore's error, the mismatches (the
    first named), PostgreSQL's failure, or the command's."""
    if done.error:
        return str(done.error)
    if done.mismatch_count:
        first = f", first: {done.mismatches[0]}" if done.mismatches else ""
        return f"{done.mismatch_count} mismatch(es) with its manifest{first}"
    bad = [p for p in done.pg_start or () if not p.ok]
    if bad:
        return f"PostgreSQL in {bad[0].data_directory or 'the copy'} failed: {bad[0].error}"
    c = done.command
    if c is not None and c.exit_code != 0:
        return (f"verify-then killed after the timeout ({c.seconds:.1f} s)" if c.timed_out
                else f"verify-then exited {c.exit_code}")
    return "failed"


def _describe(r: SourceResult) -> str:
    if r.status == SKIPPED:
        return f"{r.name}: {r.kind} backup skipped, {r.reason}"
    slot = f"slot {iso_time(r.slot)}" if r.slot else r.reason
    if r.status in (OK, PARTIAL):
        text = f"{r.name}: {r.kind} snapshot {r.snapshot_id[:8] if r.snapshot_id else '?'} saved ({slot}, {r.duration:.1f} s)"
        return text + (f"; partial: {r.error}" if r.status == PARTIAL else "")
    if r.snapshot_id:  # saved, then the post hook failed: the source failed, as the summary counts it
        return f"{r.name}: {r.kind} snapshot {r.snapshot_id[:8]} saved ({slot}), but the source failed: {r.error}"
    return f"{r.name}: {r.kind} backup failed ({slot}): {r.error}"


# --------------------------------------------------------------------------- daemon


class Daemon:
    """Runs a policy at every slot until ``stop`` is set.  ``reload`` makes the runner of the policy file
    as it is now (with the same ``stop``): ``ask_reload`` (SIGHUP) has it called once no run is in
    progress; a policy that does not load leaves the one in use."""

    def __init__(self, runner: Runner, *, clock: Clock = utc_now, sleep: Sleep | None = None,
                 log: Callable[[str], None] | None = None, max_sleep: float = 60.0, verbose: bool = True,
                 on_report: Callable[[RunReport], None] | None = None,
                 reload: Callable[[], Runner] | None = None):
        self.runner = runner
        self.clock = clock
        self.stop = runner.stop
        self.woken = threading.Event()  # set to cut a sleep short: a stop or a reload was asked
        self.sleep = sleep or self._sleep
        self.log = log or (lambda line: None)
        self.max_sleep = max_sleep
        self.verbose = verbose
        self.on_report = on_report
        self.reload = reload
        self.reload_asked = False
        self.runs = 0

    def _run_once(self, started: datetime) -> RunReport:
        """One run, logged.  One that ended before its report (the repository out of reach, locked) gives a
        report of nothing done, with the error, so that whoever reads one line per run sees it too.  A
        UsageError (a bad option or URL fails every slot alike) is raised once it is delivered: exit 2."""
        try:
            report = self.runner.run()
        except Locked as exc:
            self.log(f"run skipped: {exc}")
            return RunReport(started, False, error=f"skipped: {exc}")
        except UsageError as exc:
            self.log(f"run failed: {exc}")
            self._deliver(RunReport(started, False, error=str(exc)))
            raise
        except ChunkvaultError as exc:
            self.log(f"run failed: {exc}")
            return RunReport(started, False, error=str(exc))
        except Exception as exc:  # survive a bug in one run; the next slot tries again
            self.log(f"run failed: internal error: {type(exc).__name__}: {exc}")
            return RunReport(started, False, error=f"internal error: {type(exc).__name__}: {exc}")
        self.log(report.summary())
        return report

    def _deliver(self, report: RunReport) -> int | None:
        """Hand the report to ``on_report``; the daemon's exit code when that ends it (its output closed
        by its reader: 141), else None.  Output that fails otherwise (a full disk) loses that line only."""
        if self.on_report is None:
            return None
        try:
            self.on_report(report)
        except OutputClosed as exc:
            self.log(f"daemon stopping: {exc}")
            return exc.exit_code
        except (ChunkvaultError, OSError) as exc:
            self.log(f"the run's report was not written: {exc}")
        return None

    def _sleep(self, seconds: float) -> None:
        self.woken.wait(seconds)
        self.woken.clear()

    def ask_reload(self) -> None:
        self.reload_asked = True
        self.woken.set()

    def _reload(self) -> bool:
        """Whether the policy file was read anew."""
        self.reload_asked = False
        if self.reload is None:
            return False
        try:
            runner = self.reload()
        except (ChunkvaultError, OSError) as exc:
            self.log(f"policy not reloaded, the one loaded before stays in use: {exc}")
            return False
        except Exception as exc:  # a bug in reading one edit of the file must not end the daemon, as in a run
            self.log(f"policy not reloaded, the one loaded before stays in use: internal error: "
                     f"{type(exc).__name__}: {exc}")
            return False
        if runner.lock_file != self.runner.lock_file:  # the daemon's own lock is beside the one it started with
            self.log(f"policy not reloaded, the one loaded before stays in use: its lock file changed (to "
                     f"{runner.lock_file}); restart the daemon to change it")
            return False
        self.runner = runner
        self.log(f"policy reloaded: {len(runner.policy.sources)} source(s)")
        return True

    def _next_slot(self, started: datetime) -> datetime | None:
        policy = self.runner.policy
        wake = next_wakeup([c for s in policy.sources for c in s.cadences()]
                           + [c for c in (policy.check, policy.verify) if c is not None], started)
        if wake is None:
            self.log("no slot is ever due again; waiting for a stop signal")
        elif self.verbose:
            self.log(f"next run at {iso_time(wake)}")
        return wake

    def serve(self) -> int:
        """Run at every slot until stopped; 0, or 141 when the reader of the reports closed them."""
        self.log(f"daemon started: {len(self.runner.policy.sources)} source(s)")
        code = 0
        while not self.stop.is_set():
            started = self.clock()
            self.runs += 1
            report = self._run_once(started)
            started = report.started
            code = self._deliver(report) or 0
            if code or self.stop.is_set():
                break
            # a slot that passed while the run went on is not "next": the next slot's run catches it up
            wake = self._next_slot(max(started, self.clock()))
            while not self.stop.is_set():
                if self.reload_asked:
                    if self._reload():
                        break  # a run at once: a source the new policy adds, or a cadence it changes, may be due
                    wake = self._next_slot(max(started, self.clock()))
                    continue
                now = self.clock()
                if wake is not None and now >= wake:
                    break
                if now < started:  # set back (NTP correcting a clock that ran ahead): the slot would be far off
                    self.log(f"the clock went back from {iso_time(started)} to {iso_time(now)}: slots are counted from now")
                    started = now
                    wake = self._next_slot(started)
                    continue
                left = self.max_sleep if wake is None else (wake - now).total_seconds()
                self.sleep(max(0.0, min(self.max_sleep, left)))
        self.log("daemon stopped")
        return code


# --------------------------------------------------------------------------- CLI


class _Log:
    """Timestamped lines to stderr or a file (line-buffered, so a crash loses nothing).  A file that cannot
    be written (its disk full) is given up for stderr, said once there: a daemon must not die of its log."""

    def __init__(self, path: str | None, clock: Clock, also: TextIO | None = None):
        self.clock = clock
        self.path = path
        try:
            self.file: TextIO = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr
        except OSError as exc:
            raise UsageError(f"cannot open log file {path}: {exc.strerror}") from None
        self.owned = bool(path)
        self.also = also
        self._reopen = False  # SIGHUP: the file is opened again at its path before the next line
        self._reopening = threading.Lock()

    def ask_reopen(self) -> None:
        """Open the file at its path again before the next line (safe from a signal handler): logrotate moved
        it, and every later line went on into the rotated file, deleted once compressed."""
        self._reopen = True

    def _reopened(self) -> None:
        with self._reopening:
            if not self._reopen:
                return
            self._reopen = False
            if not self.path:
                return
            try:
                new = open(self.path, "a", buffering=1, encoding="utf-8")
            except OSError as exc:
                self._to_stderr(f"{iso_time(self.clock())} log file {self.path} could not be opened again "
                                f"({exc.strerror or exc}): logging on where it was")
                return
            old, self.file, self.owned = self.file, new, True
            if old is not sys.stderr:
                with suppress(OSError, ValueError):
                    old.close()

    def __call__(self, line: str, echo: bool = True) -> None:
        """Log ``line``; ``echo``: to ``also`` too (not a line the command's error says there again)."""
        if self._reopen:
            self._reopened()
        line = one_line(line)  # a name or a command's output may hold control characters
        stamped = f"{iso_time(self.clock())} {line}"
        if not self.owned:
            self._to_stderr(stamped)
        else:
            try:
                self.file.write(stamped + "\n")
                self.file.flush()
            except OSError as exc:
                self._give_up_file(exc)
                self._to_stderr(stamped)
        if echo and self.also is not None:
            self.also.write(line + "\n")
            self.also.flush()

    def _give_up_file(self, exc: OSError) -> None:
        """Log to stderr from now on, saying why once: the file's next lines could be cut off, or out of order."""
        with suppress(OSError, ValueError):
            self.file.close()  # what it still buffers fails to write again: the file object is closed all the same
        self.file, self.owned = sys.stderr, False
        self._to_stderr(f"{iso_time(self.clock())} log file {self.path} could not be written ({exc.strerror or exc}): "
                        "logging to stderr from now on")

    @staticmethod
    def _to_stderr(line: str) -> None:
        """Best effort: nowhere is left to say that stderr failed, and the run goes on."""
        with suppress(OSError, ValueError):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def from_signal(self, line: str) -> None:
        """A line written from a signal handler: straight to the descriptor, past the file object's buffer
        and its lock, which the interrupted code may be holding (each line is flushed as written)."""
        try:
            os.write(self.file.fileno(), f"{iso_time(self.clock())} {one_line(line)}\n".encode("utf-8", "replace"))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self.owned:
            self.file.close()


def _password(args: argparse.Namespace, policy: Policy) -> bytes:
    """The command line's password options first, then the policy's, then the environment or a prompt."""
    from .passwords import REPOSITORY

    return REPOSITORY.get(args, fallback=(policy.password_file, policy.password_command), cwd=policy.base_dir)


def _runner(args: argparse.Namespace, stop: threading.Event | None, log: Callable[[str], None]) -> Runner:
    policy = load_policy(args.config)
    url = args.repo or policy.repository or os.environ.get("CHUNKVAULT_REPOSITORY")
    if not url:
        raise UsageError(f"no repository: set repository in {args.config}, or use -r/--repo")
    lock = policy.lock_file or os.path.abspath(args.config) + ".lock"
    state = policy.state_file or os.path.abspath(args.config) + ".state"
    return Runner(policy, _password(args, policy), url=url, stop=stop, log=log, lock_file=lock,
                  state_file=state, opener=_opener(args))


def _opener(args: argparse.Namespace) -> Callable[[str, bytes], Any]:
    """``Repository.open`` with the command line's remote options (-o, --s3-*, --limit-*) for the URL it
    opens (the repository, or a copy-to destination), as every other command applies them: the policy
    file has no place for them."""
    from .cli import remote_options
    from .repository import Repository

    return lambda where, password: Repository.open(where, password, **remote_options(args, where))


@contextmanager
def _warnings_logged(log: "_Log | None") -> Iterator[None]:
    """A command's warnings (a wait for the repository lock, a remote retried) go into its log, timestamped:
    a scheduled run could wait an hour for a lock with nothing in its log file.  They go there alone, as
    every other line does (``--log FILE``: instead of stderr, which a service manager's journal keeps too)."""
    if log is None:
        yield
        return
    shown = warnings.showwarning

    def logged(message: Any, category: type[Warning], *rest: Any) -> None:
        if issubclass(category, ChunkvaultWarning):
            log(f"warning: {message}")
        else:
            shown(message, category, *rest)

    warnings.showwarning = logged
    try:
        yield
    finally:
        warnings.showwarning = shown


def cmd_run(args: argparse.Namespace) -> int:
    """``chunkvault run --config FILE``: whatever is due now, then retention."""
    plain = not (args.json or args.quiet)
    log = _Log(args.log, utc_now, also=sys.stdout if plain and args.log else None) if args.log else None
    # -q or --json without a log: the last lines, said on stderr if the run fails, with what its commands said
    held: deque[str] = deque(maxlen=HELD_LINES)
    if log is not None:
        emit: Callable[[str], None] = log
    elif plain:
        emit = lambda line: print(one_line(line))  # noqa: E731
    else:
        emit = _quiet(held.append)
    try:
        return _run(args, log, emit)
    except BaseException:
        for line in held:
            print(one_line(line), file=sys.stderr)
        raise


#: The most lines a failed ``run -q`` shows on stderr (its last ones; each command's output is cut already).
HELD_LINES = 1000


def _run(args: argparse.Namespace, log: "_Log | None", emit: Callable[[str], None]) -> int:
    try:
        with _warnings_logged(log):
            runner = _runner(args, None, emit)
            report = runner.run(dry_run=args.dry_run, only=args.source or None)
            if not args.dry_run:  # a dry run's lines say what it would do
                emit(report.summary())
    except KeyboardInterrupt as exc:  # the log says how the run ended, not only the terminal
        if log is not None:
            log(f"run stopped ({str(exc) or 'interrupted'})")
        raise
    except ChunkvaultError as exc:  # ended before any source (another run holds the lock, no repository)
        if log is not None:
            log(f"run skipped: {exc}" if isinstance(exc, Locked) else f"run failed: {exc}", echo=False)
        raise
    finally:
        if log is not None:
            log.close()
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    report.raise_for_status()
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    """``chunkvault daemon --config FILE``: run at every slot until SIGTERM/SIGINT."""
    stop = threading.Event()
    log = _Log(args.log, utc_now)
    signals_seen: list[int] = []
    daemons: list[Daemon] = []

    def on_signal(signum: int) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # second signal: abort the step in progress
        stop.set()  # before the line that says so: a signal sent on reading it is a second one
        signals_seen.append(signum)
        log.from_signal(f"{signal.Signals(signum).name} received: stopping after the step in progress "
                        "(the same signal again stops at once)")
        # A remote that is down has its retries given up within the stop request's grace, not retry-time's
        # 15 minutes past a service manager's stop timeout; one that answers still gets the backup's end.
        stop_request.request()
        locks.stop_waiting.set()  # a backup or retention waiting for a lock stops waiting
        for d in daemons:
            d.woken.set()

    def on_hangup(signum: int) -> None:
        log.ask_reopen()
        for d in daemons:
            d.ask_reload()

    def on_report(report: RunReport) -> None:
        if args.json:
            _json_line(report.to_dict())

    stop_request.clear()  # as in the command line's main: not on the way out, where steps may still retry
    try:
        with interrupts.handled({signal.SIGTERM: on_signal, signal.SIGINT: on_signal, signal.SIGHUP: on_hangup}):
            runner_log = log if not args.quiet else _quiet(log)
            first = _runner(args, stop, runner_log)
            daemons.append(Daemon(first, log=log, verbose=not args.quiet,
                                  on_report=on_report, reload=lambda: _runner(args, stop, runner_log)))
            # A second daemon of the policy would skip every slot the first runs, logging so, for ever.
            with policy_lock(f"{first.lock_file}.daemon", "a daemon of this policy is running already"), \
                    _warnings_logged(log):
                code = daemons[0].serve()
        if signals_seen:
            log(f"stopped by {signal.Signals(signals_seen[0]).name}")
        return code
    except KeyboardInterrupt:
        log("aborted by a second signal")
        if args.json:  # a reader of the run lines learns how the last one ended, as any command's error says
            sys.stdout.write(json.dumps({"error": {"type": "Interrupted", "exit_code": 130,
                                                   "message": "aborted by a second signal"}}) + "\n")
            sys.stdout.flush()
        return 130
    finally:
        locks.stop_waiting.clear()
        log.close()


#: Lines that ``-q`` drops: nothing due, and retention's counts; never a failure nor a skip.
ROUTINE = ("nothing due", ": retention removed ", ": retention would remove ", "check: not due",
           "verify: not due")


def _quiet(log: Callable[[str], None]) -> Callable[[str], None]:
    """Drop the routine lines but keep actions and failures (a retention that failed or was skipped)."""
    return lambda line: None if any(r in line for r in ROUTINE) else log(line)


def _json_line(document: dict[str, Any]) -> None:
    """One report line on stdout.  Its reader gone (``daemon --json | head -n 1``): OutputClosed, with stdout
    pointed at /dev/null, so that the lines still buffered cannot fail again on the way out."""
    try:
        sys.stdout.write(json.dumps(document, sort_keys=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        with suppress(OSError, ValueError, AttributeError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        raise OutputClosed("standard output was closed by its reader: no more report lines can be written") from None
