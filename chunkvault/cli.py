"""The chunkvault command line: one clear line and a stable exit code per error."""
from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import fcntl
import functools
import io
import itertools
import json
import os
import re
import shlex
import signal
import sys
import time
import warnings
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Collection, Iterable, Iterator, TypeVar

from . import interrupts, passwords
from .argparsing import dashes_value
from .console import STOP_WORDS, begun, stopped_as, version_line
from .display import LIST_LETTERS, one_line, shown_name, warn
from .progress import JsonProgress, Progress
from .remotes.layer import StopRequest, stop_request
from .errors import (ChunkvaultError, ChunkvaultWarning, CorruptObject, Locked, OutputClosed, PartialBackup,
                     RepositoryStateWarning, SnapshotNotFound, TargetBusy, TargetNotEmpty, TargetUnwritable,
                     UsageError, VerificationFailed, output_error, resource_exhausted)
from .store.chain import chain_lengths
from .store.manifest import (F_CHANGED_DURING_READ, F_UNREADABLE, OP_DELETE, OP_ENTRY, OP_FRESH, T_BLOCKDEV,
                             T_CHARDEV, T_DIR, T_FILE, TYPE_NAMES, Entry, Record, unread, what_changed)
from .store.overwrite import OVERWRITE_MODES, check_overwrite
from .store.snapshot import Snapshot, check_local_zone, listed_time, said_second
from .store.xattrs import decode_xattrs
from .units import format_size
from .walfetch import FATAL_EXIT

if TYPE_CHECKING:
    from .store.retention import RebaseStep
    from .store.backup import Listed

EXIT_INTERNAL = 1
T = TypeVar("T")


class _InOrder(argparse.Action):
    """An appending option whose values also go, in command-line order, into the list ``order`` names,
    as ``(kind, value)``: ``--exclude`` and ``--exclude-file`` patterns apply in the order given."""

    def __init__(self, option_strings: list[str], dest: str, order: str = "", kind: str = "glob",
                 **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.order, self.kind = order, kind

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        setattr(namespace, self.order, [*(getattr(namespace, self.order, None) or []), (self.kind, values)])


def _warn_patterns(args: argparse.Namespace, excludes: list[str], iexcludes: list[str]) -> None:
    """Refuse a bad pattern before anything is read, and say which ``!`` patterns re-include nothing (as a
    backup's warnings say)."""
    from .store.excludes import ExcludeRules
    from .store.find import tree_glob

    said = ExcludeRules(excludes, iexcludes, normalize=tree_glob).warnings()
    if not args.quiet:
        for w in said:
            warn(w)


def _ordered(args: argparse.Namespace, order: str) -> list[str]:
    """The patterns of an ``_InOrder`` pair of options, each file's lines where the file was named."""
    from .store.source import ordered_excludes

    return ordered_excludes(getattr(args, order, None) or [])


class _Parser(argparse.ArgumentParser):
    _intermixing = False

    def __init__(self, *args: Any, **kwargs: Any):
        """No option is taken from a prefix of its name: ``restore --del`` would be ``--delete``, and
        ``forget --keep-da 2`` ``--keep-daily``."""
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit code 2, like every usage error
        raise UsageError(message)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        return dashes_value(self, action, arg_strings, super()._get_values)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """A command's options may come between its arguments (``ls SNAP --json PATH``, ``forget A --prune B``):
        plain argparse takes the arguments only up to the first option and calls the rest unrecognized.
        After ``--`` (``--stdin-from-command -- pg_dump -Fc``, ``backup -- -dir``) nothing is an option:
        intermixed parsing would drop the ``--``, so such a line is parsed as before."""
        positionals = self._get_positional_actions()
        if (self._intermixing or self._subparsers is not None or not positionals or "--" in (args or ())
                or any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in positionals)):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _Given(argparse.Action):
    """An option stored as usual, noting that it was given (``wait_given``): what its default means for one use
    of it may differ from what it means for another (``target_wait``)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


# --- passwords -------------------------------------------------------------------


def _generated_secret(path: str) -> bytes:
    """A new key secret, written to ``path`` (created, mode 0600) before any key uses it.  A disk too full
    for it is a storage failure (exit 14, as a key export's), not a usage error: the path was right."""
    from .store.crypto import new_secret

    secret = new_secret()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists: a key secret is never written over another file") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise output_error(f"creating the secret file {path}", exc) from None
        raise UsageError(f"cannot create secret file {path}: {exc.strerror}") from None
    data = secret + b"\n"
    try:
        if os.write(fd, data) != len(data):  # a short write to a file: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        raise output_error(f"writing the secret file {path} (no secret file was left)", exc) from None
    os.close(fd)
    return secret


def _with_new_key(args: argparse.Namespace, new: bool, make: Callable[[bytes], T],
                  kept: Callable[[], bool] = lambda: False) -> T:
    """Run ``make`` with the new key's password (``--generate-secret``: a secret written to that file,
    removed again when ``make`` fails, unless ``kept()`` says it left a key the secret opens; else the new
    password, or for ``init`` the password)."""
    path = getattr(args, "generate_secret", None)
    if not path:
        return make(passwords.NEW.get(args, confirm=True) if new else passwords.REPOSITORY.get(args, confirm=True))
    secret = _generated_secret(path)
    try:
        return make(secret)
    except BaseException:
        if not kept():
            os.unlink(path)
        raise


KEY_HELP = {
    "export": "write the key this password opens and the repository's config to a file to keep elsewhere: "
              "every object is sealed under the secret they hold",
    "import": "put back the key and config of a key export that the repository lost or holds damaged "
              "(opens with the export's password)",
}
KDF_TIME_HELP = ("CPU seconds one password derivation costs (default 0.5; its two lanes run in parallel, "
                 "so on two or more cores opening takes about half; less makes guessing the password cheaper, "
                 "0 is for tests)")
GENERATE_SECRET_HELP = ("instead of a password, a generated key secret, written to FILE (mode 0600); "
                        "opening with it (--password-file FILE) skips the password's key derivation")


def _local_repository(args: argparse.Namespace) -> list[str]:
    """The directory of a repository on local disk, which a backup leaves out of its tree; none for another
    (or none given: opening the repository says so, after the sources are looked at)."""
    from .localfiles import absolute_path
    from .remotes import url_scheme
    from .remotes.local import local_path

    url = args.repo or os.environ.get("CHUNKVAULT_REPOSITORY")
    try:
        if url and url_scheme(url) == "file":
            return [absolute_path(local_path(url), "local repository path")]
    except UsageError:  # opening it says what is wrong with it
        pass
    return []


def _repo_url(args: argparse.Namespace) -> str:
    url = args.repo or os.environ.get("CHUNKVAULT_REPOSITORY")
    if not url:
        raise UsageError("no repository: use -r/--repo or set CHUNKVAULT_REPOSITORY")
    return url


_token_warned: list[str] = []  # said once a process: ``copy`` opens two repositories


def remote_options(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Backend options for ``url`` from ``-o SCHEME.NAME=VALUE`` and the --s3-* shortcuts."""
    from .remotes import options_for_url

    pairs = list(getattr(args, "option", None) or [])
    if getattr(args, "s3_endpoint", None):
        pairs.append(f"s3.endpoint-url={args.s3_endpoint}")
    if getattr(args, "s3_storage_class", None):
        pairs.append(f"s3.storage-class={args.s3_storage_class}")
    options = options_for_url(url, pairs)
    if "token" in options and not _token_warned:
        _token_warned.append(url)
        warn("-o http.token puts the token on this command line, which every user's process listing shows: "
             "use -o http.token-file=FILE or CHUNKVAULT_HTTP_TOKEN_FILE")
    for name in ("limit_upload", "limit_download"):
        if getattr(args, name, None):
            options[name] = getattr(args, name)
    return options


def _remote(args: argparse.Namespace) -> tuple[Any, StopRequest]:
    """The repository's remote, not yet read, and what ends its retries (a signal; the repository's stop)."""
    from .connection import connect

    url = _repo_url(args)
    retry_stop = StopRequest(parent=stop_request)
    return connect(url, stop=retry_stop, **remote_options(args, url)), retry_stop


def _open(args: argparse.Namespace, connected: tuple[Any, StopRequest] | None = None) -> Any:
    """The repository opened with its password; ``connected``: its remote, connected already (``_remote``)."""
    from .connection import key_ahead_path
    from .remotes import url_scheme
    from .store.keyahead import KeyAhead
    from .store.unlock import read_config_and_keys, unlock

    url = _repo_url(args)
    given = passwords.REPOSITORY.given(args) if url_scheme(url) != "file" and connected is None else None
    ahead = KeyAhead.start(key_ahead_path(url), given) if given else None  # derive while connecting
    remote, retry_stop = connected if connected is not None else _remote(args)
    # A missing, damaged or newer-format repository is reported before any password is asked.
    config, key_names = read_config_and_keys(remote)
    password = ahead.password if ahead is not None else passwords.REPOSITORY.get(args)
    # Before the store's modules load: see store/unlock.py.
    key = unlock(remote, password, ahead, config=config, key_names=key_names)
    from .repository import Repository

    repo = Repository.open(remote, key, lock_reads=not getattr(args, "no_lock", False), retry_stop=retry_stop)
    purpose = getattr(args, "read_lock", None)
    if purpose:  # before anything is read; released when the command ends (``main``)
        began = time.monotonic()
        args.held.enter_context(repo.reading(purpose, wait=args.wait))
        args.waited = time.monotonic() - began  # taken from what a restore waits for its target (``target_wait``)
    return repo


# --- output helpers ------------------------------------------------------------------


class _GuardedOutput:
    """Standard output whose failed writes (a full disk, an I/O error) are one clear error with exit 14,
    not an internal one; a closed pipe stays BrokenPipeError (its reader has what it wanted)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.written = False  # the command printed something (with --json: its document)
        # With --json, what ends a list the document has open (``backup --list``): a failure then ends the
        # document with its error, where one not begun is the error alone (``_emit_error_json``).
        self.open_list: str | None = None

    def write(self, text: str) -> int:
        self.written = self.written or bool(text)
        try:
            # (a character is up to 4 bytes: any text that may not fit the buffer is written whole)
            if len(text) < io.DEFAULT_BUFFER_SIZE // 4 or not hasattr(self._stream, "buffer"):
                return self._stream.write(text)
            return self._write_whole(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise _stdout_error(exc) from None

    def _write_whole(self, text: str) -> int:
        """A text larger than the stream's buffer, to its last byte.  It goes to the pipe at once, and a write
        its reader closed the pipe during returns the part written, which the stream took for the whole: the
        rest was dropped, and `ls --json | head -c 100` exited 0.  Written again, the rest meets the closed
        pipe (BrokenPipeError: exit 141)."""
        stream = self._stream
        stream.flush()
        _write_all(stream.buffer, text.encode(stream.encoding or "utf-8", stream.errors or "strict"))
        return len(text)

    def flush(self) -> None:
        with _stdout_errors():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _ClosedOutput:
    """Standard output a command was started without (``>&-``): what it prints reaches no one, and is dropped,
    with ``--json`` as without (print() drops text meant for a closed stdout; a document's write was an internal
    error).  It has no ``buffer``: ``dump``, ``cat blob`` and ``key export``, whose bytes would be lost, refuse
    to run."""

    written = False
    open_list = None

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _BestEffortErrors:
    """Standard error whose failed writes (a full disk, a closed pipe: cron's log) are dropped: the exit code
    still tells what happened, where the failure to tell it became an internal error (exit 1)."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._lost = False

    def write(self, text: str) -> int:
        if not self._lost:
            try:
                n = self._stream.write(text)
                self._stream.flush()
                return n
            except (OSError, ValueError):  # ValueError: closed
                self._lost = True
        return len(text)

    def flush(self) -> None:
        if not self._lost:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _never_strict(stream: Any) -> None:
    """Text still holding a byte that is not UTF-8 (a path given on the command line, say) is written escaped
    on a stream a strict UTF-8 locale set up, not refused with an internal error; names in listings are
    escaped before (``display.shown_name``)."""
    if getattr(stream, "errors", None) == "strict":
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


@contextlib.contextmanager
def _stdout_errors(product: str | None = None) -> Iterator[None]:
    """Failed writes to standard output as ``output_error``s, but for a closed pipe.  ``product``: what the
    output is (a dump, a key export), where it is no report of work done elsewhere."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _stdout_error(exc, product) from None


def _stdout_error(exc: OSError, product: str | None = None) -> ChunkvaultError:
    """Its exit code is a storage failure's (14); its words say that what the command had done before (a
    snapshot saved, say) stays done: only its report was cut short; or that the product is incomplete.  The
    former is the command line's hint, said where the command ends: a daemon whose report line failed goes on
    to its next run, and logged that it "stopped there"."""
    error = output_error("writing to standard output", exc)
    if product is not None:
        return type(error)(f"{error} (the {product} written there is incomplete)")
    return error.hinting(" (the command stopped there; what it had done stays done, only its report is lost or "
                         "cut short)")


_JSON = json.JSONEncoder(indent=1, sort_keys=True, default=str)
_JSON_LINE = json.JSONEncoder(sort_keys=True, default=str)  # a streamed array's items: one to a line
_WRITE_BATCH = 1 << 20  # characters of JSON (ASCII) per write to standard output
_ARRAY_BATCH = 1024  # items of a streamed array encoded together


def _write_batched(pieces: Iterable[str]) -> None:
    """Written in pieces of about 1 MiB: ``json.dump`` to the stream wrote each token on its own (2.5
    million writes for a listing of 48,000 files), one string would hold it all in memory at once.  Nothing
    is written before the first MiB is ready: a command failing before then prints only its error document
    (``_emit_error_json``)."""
    batch: list[str] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= _WRITE_BATCH:
            sys.stdout.write("".join(batch))
            batch, size = [], 0
    sys.stdout.write("".join(batch))


def _emit_json(obj: Any, after_list: bool = False) -> None:
    """``obj`` as a --json document: indented by one space, keys sorted, what JSON has no type for as its
    ``str``.  ``after_list``: the document was begun with its list (``backup --list``), and the object's keys
    follow it."""
    pieces = _JSON.iterencode(obj)
    if after_list and next(pieces) != "{":
        raise AssertionError("a document's other keys follow its list: an object")
    _write_batched(itertools.chain(pieces, ("\n",)))


def _emit_json_array(items: Iterable[Any]) -> None:
    """A list as a --json document written as the items come, one item to a line (a listing of millions of
    files is never held in memory, and a program may read it line by line; indented, an entry took 15
    lines).  An error raised by ``items`` after the first write leaves the document cut short on stdout;
    the command still fails with its line on stderr and its exit code."""
    _write_batched(_json_array_pieces(items))


def _json_array_pieces(items: Iterable[Any]) -> Iterator[str]:
    """The pieces of ``_emit_json_array``: ``[``, the items ``_ARRAY_BATCH`` at a time, each on a line of its
    own, and ``]``."""
    it = iter(items)
    opened = False
    while batch := list(itertools.islice(it, _ARRAY_BATCH)):
        yield ",\n" if opened else "[\n"
        opened = True
        yield ",\n".join(map(_JSON_LINE.encode, batch))
    yield "\n]\n" if opened else "[]\n"


def _snapshot_json(s: Snapshot, chain_length: int | None = None) -> dict[str, Any]:
    stats = _stats_json(s.stats if chain_length is None else {**s.stats, "chain_length": chain_length})
    return {"id": s.id, "short_id": s.short_id, "time": s.time, "type": s.kind, "parent": s.parent,
            "host": s.host, "tags": s.tags, **_names_json("paths", s.paths), "stdin_name": s.stdin_name,
            "size": s.stats.get("bytes", 0), "files": s.stats.get("files", 0), "stats": stats}


def _stats_json(stats: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's stats for JSON: the paths the backup could not read (``unreadable``) with their bytes
    (``unreadable_b64``) when one is not UTF-8, as every other list of paths."""
    if not stats.get("unreadable"):
        return stats
    return {**stats, **_names_json("unreadable", stats["unreadable"])}


def _name_json(key: str, name: bytes | str | None) -> dict[str, Any]:
    """A path or link target for JSON: ``key`` holds it as text, and a name that is not UTF-8 also its exact
    bytes in base64 under ``<key>_b64``.  In the text, each byte that does not decode stands as a lone
    surrogate (U+DC80-U+DCFF, Python's ``os.fsencode`` gives the bytes back); a parser in another
    language may turn those into U+FFFD, so a program that must name the file exactly reads ``_b64``.
    The text is the UTF-8 reading whatever the locale: ``os.fsdecode`` in the C locale without UTF-8 mode
    (or a Latin-1 one) gave a UTF-8 name as surrogates (or as other characters), with no ``_b64``."""
    if name is None:
        return {key: None}
    raw = os.fsencode(name)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: _json_text(raw), key + "_b64": base64.b64encode(raw).decode("ascii")}


@functools.lru_cache(maxsize=1 << 10)
def _owner_json(key: str, name: str | None) -> dict[str, Any]:
    """``_name_json`` of a user or group name: a listing has few, each named on every one of its entries
    (never changed by a caller: each is copied into the entry's)."""
    return _name_json(key, name)


def _json_text(raw: bytes) -> str:
    """A name's bytes as JSON text: UTF-8, each byte that does not decode a lone surrogate."""
    return raw.decode("utf-8", "surrogateescape")


def _names_json(key: str, names: list[str]) -> dict[str, Any]:
    """A list of paths for JSON, as ``_name_json`` gives one: ``<key>_b64`` (each path's bytes, in order)
    only when one of them is not UTF-8."""
    parts = [_name_json(key, name) for name in names]
    out: dict[str, Any] = {key: [part[key] for part in parts]}
    if any(key + "_b64" in part for part in parts):
        out[key + "_b64"] = [base64.b64encode(os.fsencode(name)).decode("ascii") for name in names]
    return out


def _entry_json(e: Entry, unread_paths: Collection[bytes] = ()) -> dict[str, Any]:
    return {**_name_json("path", e.path), "type": TYPE_NAMES[e.type], "mode": oct(e.mode), "uid": e.uid,
            "gid": e.gid, "size": e.size, "mtime": _ns_iso(e.mtime_ns), "mtime_ns": e.mtime_ns,
            **_name_json("target", e.target or None),
            "digest": e.digest.hex() if e.digest else None, "chunks": len(e.chunks) // 32,
            "device": [os.major(e.rdev), os.minor(e.rdev)] if e.type in (T_CHARDEV, T_BLOCKDEV) else None,
            **_xattrs_json(e.xattrs), "unreadable": _unreadable(e, unread_paths)}


def _xattrs_json(raw: bytes) -> dict[str, Any]:
    """An entry's extended attributes (ACLs too), name -> value in base64: a restore sets them, and diff and
    find tell versions apart by them, so a listing that left them out showed such versions alike.  A name
    that is not UTF-8 is a key with lone surrogates, as in a path, which another language's parser may read
    as U+FFFD (two such names then one key): ``xattrs_b64`` then keys each value by its name's exact bytes
    in base64."""
    if not raw:  # most entries: the listing of 300,000 files spent a tenth of its time here
        return {"xattrs": {}}
    from .store.tarformat import is_utf8

    pairs = decode_xattrs(raw)
    out: dict[str, Any] = {"xattrs": {_json_text(name): base64.b64encode(value).decode()
                                      for name, value in pairs.items()}}
    if not all(is_utf8(name) for name in pairs):
        out["xattrs_b64"] = {base64.b64encode(name).decode("ascii"): base64.b64encode(value).decode()
                             for name, value in pairs.items()}
    return out


def _size_shown(e: Entry, size: str) -> str:
    """The size column of a listing: a device node's numbers instead (as `ls -l` shows them), which a
    restore makes it with and which alone may tell two of its versions apart."""
    return f"{os.major(e.rdev)},{os.minor(e.rdev)}" if e.type in (T_CHARDEV, T_BLOCKDEV) else size


def _unreadable(e: Entry, unread_paths: Collection[bytes] = ()) -> str | None:
    """Of an entry the backup could not read (flagged, or among ``unread_paths``: the snapshot's list, which
    names the files and entries it kept as an earlier backup had them): a file's data is none, or an earlier
    backup's ("no data", "earlier data"); a directory could not be listed ("not listed"), another entry is an
    earlier backup's ("earlier entry"); its extended attributes could not be read ("attributes": read again by
    the next backup).  None for the others."""
    if not e.flags & F_UNREADABLE and e.path not in unread_paths:
        return None
    if not e.flags & F_UNREADABLE and e.flags & F_CHANGED_DURING_READ:
        return "attributes"
    if e.type == T_FILE:
        return "no data" if unread(e) else "earlier data"
    return "not listed" if e.type == T_DIR else "earlier entry"


def _listed_json(e: Entry, names: tuple[dict[int, str], dict[int, str]],
                 unread_paths: Collection[bytes] = ()) -> dict[str, Any]:
    """An entry as `ls --json` lists it: with its owner's names, as the backup recorded them."""
    return {**_entry_json(e, unread_paths), **_owner_json("user", names[0].get(e.uid)),
            **_owner_json("group", names[1].get(e.gid))}


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ns_iso(ns: int) -> str:
    """To the microsecond below (``mtime_ns`` gives the nanoseconds): through a float, a time could come
    out a microsecond later than the file's."""
    seconds, ns = divmod(ns, 10**9)
    micro = ns // 1000
    return f"{_utc_second(seconds)}.{micro:06d}+00:00" if micro else f"{_utc_second(seconds)}+00:00"


@functools.lru_cache(maxsize=1 << 14)
def _utc_second(seconds: int) -> str:
    """A second in UTC as ``isoformat`` writes it, without the offset: files written together share it."""
    return (_EPOCH + timedelta(seconds=seconds)).isoformat()[:-len("+00:00")]


def _ns_local(ns: int) -> str:
    """A file time for people, as ``snapshots`` shows snapshot times (``listed_time``): in autumn's repeated
    hour with its offset, where two files modified an hour apart read alike."""
    return _local_second(ns // 10**9)


@functools.lru_cache(maxsize=1 << 14)
def _local_second(seconds: int) -> str:
    """Files written together share their second: formatting each was two fifths of `ls`."""
    try:
        return listed_time(datetime.fromtimestamp(seconds, timezone.utc))
    except (ValueError, OverflowError, OSError):  # past datetime's years
        return f"@{seconds}"


# --- commands --------------------------------------------------------------------------


def _open_other(args: argparse.Namespace, url: str, source: passwords.PasswordSource) -> Any:
    """Open a second repository (copy destination or chunker source) with its own password."""
    from .errors import WrongPassword
    from .repository import Repository

    try:
        return Repository.open(url, source.get(args), **remote_options(args, url))
    except WrongPassword as exc:  # which of the two repositories, and where its password came from
        raise WrongPassword(f"{exc}: the {source.what} ({source.option}-file, -command or {source.env}) "
                            f"does not open {url}") from None


def cmd_init(args: argparse.Namespace) -> int:
    from .repository import Repository

    if args.generate_secret and (getattr(args, "password_file", None) or getattr(args, "password_command", None)):
        raise UsageError("--generate-secret makes the repository's only key: give it or a password, not both")
    if args.copy_chunker_params_from and args.chunk_avg:
        raise UsageError("--copy-chunker-params-from and --chunk-avg both set the chunker: give one")
    source = None
    if args.copy_chunker_params_from:
        source = _open_other(args, args.copy_chunker_params_from, passwords.FROM)
    chunker = None
    if args.chunk_avg:
        avg = args.chunk_avg
        chunker = {"min_size": avg // 4, "avg_size": avg, "max_size": avg * 8}
    url = _repo_url(args)
    repo = _with_new_key(args, False, lambda password: Repository.init(
        url, password, kdf_seconds=args.kdf_time, chunker=chunker, compression_level=args.compression,
        pack_size=args.pack_size, full_every=args.full_every, max_diff_share=args.max_diff_share,
        copy_chunker_from=source, **remote_options(args, url)))
    cfg = repo.store.config
    if args.json:
        _emit_json({"id": cfg.repo_id, **_name_json("url", repo.store.remote.display_url),  # a path, for a local one
                    "chunker": cfg.settings.chunker})
    elif not args.quiet:
        print(f"created repository {cfg.repo_id} at {one_line(repo.store.remote.display_url)}")
    return 0


def _stdin_fd(remedy: str = "give --stdin a pipe or a file") -> int:
    """Standard input's descriptor, open for reading: a stream backup of a closed one said "internal error".
    ``remedy``: what the command's user does instead (import-tar has no --stdin)."""
    try:
        fd = sys.stdin.fileno()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise OSError(errno.EBADF, "open for writing only")
    except (AttributeError, ValueError, OSError) as exc:
        raise UsageError(f"standard input is closed or not readable: {remedy} "
                         f"({getattr(exc, 'strerror', None) or 'no descriptor'})") from None
    return fd


def cmd_backup(args: argparse.Namespace) -> int:
    from .store.source import SourceWalk, markers_of, read_list_file

    args.tag = _tags(args.tag)
    if args.host is None:
        args.host = env_host()
    if args.pg_connect is not None and not args.postgres:
        raise UsageError("--pg-connect says how --postgres reaches the server: give --postgres too")
    if args.pg_checkpoint is not None and not args.postgres:
        raise UsageError("--pg-checkpoint is the checkpoint --postgres starts with: give --postgres too")
    if args.pg_standby_wait is not None and not args.postgres:
        raise UsageError("--pg-standby-wait bounds the waits of --postgres on a standby: give --postgres too")
    if args.stdin or args.stdin_from_command:
        option = "--stdin" if args.stdin else "--stdin-from-command"
        if args.stdin and args.stdin_from_command:
            raise UsageError("--stdin and --stdin-from-command: give one")
        if args.postgres:
            raise UsageError(f"--postgres reads a data directory in place; {option} stores a stream "
                             "(pg_dump's, say): give one")
        if args.files_from or args.files_from_raw or (args.stdin and args.paths):
            raise UsageError(f"{option} takes no paths")
        if args.stdin_from_command and not args.paths:
            raise UsageError(_COMMAND_AFTER_OPTIONS)
        if not args.stdin_name:
            raise UsageError(f"{option} needs --stdin-name NAME")
        if (args.exclude or args.exclude_file or args.iexclude or args.iexclude_file or args.exclude_if_present
                or args.exclude_caches or args.one_file_system or args.exclude_larger_than is not None):
            raise UsageError(f"{option} takes no exclusion rules (--exclude..., --one-file-system)")
        if args.parent or args.force or args.skip_if_unchanged or args.ignore_inode or args.ignore_ctime:
            raise UsageError(f"--parent, --force, --skip-if-unchanged and --ignore-* apply to paths, not to {option}")
        if args.list or args.list_all:
            raise UsageError(f"--list lists the entries of a backup of paths; {option} stores one file, always")
        repo = _open(args)
        options = {"kind": args.type, "tags": args.tag, "host": args.host, "delta": not args.no_delta,
                   "fixed_chunks": args.fixed_chunks, "fixed_chunk_size": args.fixed_chunk_size,
                   "dry_run": args.dry_run, "time": args.time, "wait": args.wait,
                   "compression_level": args.compression}
        bar = _progress(args, "backup")
        options["progress"] = _backup_progress(bar)
        if args.stdin:
            from .store.command_stream import PipeStream

            result = repo.backup_stream(PipeStream(_stdin_fd()), args.stdin_name, **options)
        else:
            result = repo.backup_command(args.paths, args.stdin_name, **options)
        bar.done()
        lister = None
    else:
        if args.stdin_name:
            raise UsageError("--stdin-name names a stream: give --stdin or --stdin-from-command with it")
        for listing, raw in [(f, False) for f in args.files_from] + [(f, True) for f in args.files_from_raw]:
            args.paths += read_list_file(listing, "list of files", raw=raw)
        if not args.paths:
            raise UsageError("nothing to back up: give at least one path (or --stdin)")
        excludes, iexcludes = _ordered(args, "exclude_order"), _ordered(args, "iexclude_order")
        rules = {"one_file_system": args.one_file_system, "exclude_if_present": args.exclude_if_present,
                 "exclude_caches": args.exclude_caches, "exclude_larger_than": args.exclude_larger_than}
        compare = {"reread": args.force, "skip_if_unchanged": args.skip_if_unchanged,
                   "ignore_inode": args.ignore_inode, "ignore_ctime": args.ignore_ctime, "xattrs": not args.no_xattrs}
        listing = args.list or args.list_all
        walk = None  # with --postgres, the walk begins once the base backup has (the repository's lock held)
        if not args.postgres:
            walk = SourceWalk.of_paths(args.paths, excludes, one_file_system=args.one_file_system,
                                       markers=markers_of(args.exclude_if_present, args.exclude_caches),
                                       max_file_size=args.exclude_larger_than, iexcludes=iexcludes,
                                       report_excluded=listing and args.dry_run,
                                       repositories=_local_repository(args))
            walk.start()  # overlaps the key derivation
        try:
            repo = _open(args)
        except BaseException:
            if walk is not None:
                walk.close()
            raise
        bar = _progress(args, "backup")
        lister = _BackupLister(args.json, bar) if listing else None
        result = repo.backup(args.paths, kind=args.type, tags=args.tag, host=args.host, excludes=excludes,
                             iexcludes=iexcludes, delta=not args.no_delta, no_delta=args.no_delta_path,
                             fixed_chunks=args.fixed_chunks,
                             fixed_chunk_size=args.fixed_chunk_size, progress=_backup_progress(bar), walk=walk,
                             dry_run=args.dry_run, parent=args.parent, time=args.time, wait=args.wait,
                             listing=lister, list_unchanged=args.list_all, compression_level=args.compression,
                             postgres=(args.pg_connect or "") if args.postgres else None,
                             pg_checkpoint=args.pg_checkpoint, pg_standby_wait=args.pg_standby_wait,
                             **compare, **rules)
        bar.done()
        if lister is not None and args.json:
            lister.end()  # the list, then the document's other keys
    return _report_backup(args, result, lister is not None and args.json)


def _report_backup(args: argparse.Namespace, result: Any, listed_json: bool = False) -> int:
    """What a backup (or an import-tar) saved, as text or JSON; PartialBackup when paths were left out."""
    snap = result.snapshot
    st = snap.stats
    if result.skipped:
        if args.json:
            _emit_json({"skipped": True, "id": None, "parent": snap.id, **_names_json("warnings", result.warnings),
                        "dry_run": args.dry_run}, after_list=listed_json)
        elif not args.quiet:
            for w in result.warnings:
                warn(w)
            would = "would be " if args.dry_run else ""
            print(f"nothing changed since snapshot {snap.short_id}: no snapshot {would}saved")
        return 0
    if args.json:
        saved = {"id": None, "short_id": None} if args.dry_run else {}  # a dry run's snapshot has no id
        _emit_json({**_snapshot_json(snap), **saved, "skipped": False, **_names_json("warnings", result.warnings),
                    "dry_run": args.dry_run}, after_list=listed_json)
    elif not args.quiet:
        for w in result.warnings:
            warn(w)
        parent = f" (parent {snap.parent[:8]})" if snap.parent else ""
        print(f"dry run: would save a {snap.kind} snapshot{parent}" if args.dry_run
              else f"{snap.kind} snapshot {snap.short_id} saved{parent}")
        print(f"  files: {st['new_files']} new, {st['changed_files']} changed, {st['unchanged_files']} unchanged, "
              f"{st['deleted']} removed; {st['files']} files, {st['dirs']} dirs, {format_size(st['bytes'])}")
        print(f"  {'would add' if args.dry_run else 'added'}: {format_size(st['added_raw_bytes'])} of new data, "
              f"stored as "
              f"{format_size(st['added_stored_bytes'])} ({format_size(st['delta_stored_bytes'])} as deltas, "
              f"{format_size(st['whole_stored_bytes'])} whole) in {st['duration']:.2f} s")
    if result.partial:
        what = "dry run" if args.dry_run else f"snapshot {snap.short_id} saved"
        raise PartialBackup(f"{what}, but {len(st['unreadable'])} path(s) could not be read")
    return 0


def cmd_import_tar(args: argparse.Namespace) -> int:
    args.tag = _tags(args.tag)
    if args.host is None:
        args.host = env_host()
    from .store.command_stream import PipeStream

    tar: Any = args.file
    if tar == "-":
        tar = PipeStream(_stdin_fd("pipe the tar into it, or name its file instead of -"))
    repo = _open(args)
    bar = _progress(args, "import-tar")
    result = repo.import_tar(tar, args.path, kind=args.type, tags=args.tag, host=args.host, parent=args.parent,
                             strip_components=args.strip_components, delta=not args.no_delta,
                             fixed_chunks=args.fixed_chunks, fixed_chunk_size=args.fixed_chunk_size,
                             dry_run=args.dry_run, time=args.time, wait=args.wait,
                             progress=_backup_progress(bar), compression_level=args.compression)
    bar.done()
    return _report_backup(args, result)


class _BackupLister:
    """``backup --list``: a line per entry as the backup settles it, on stdout: a letter and the name; with
    --json, an object a line in the document's ``list``, which ``end`` closes before the document's other
    keys follow (a failure before that closes it with ``error``: ``_emit_error_json``)."""

    def __init__(self, json_lines: bool, bar: Progress):
        self.json = json_lines
        self.bar = bar
        self.started = False

    def __call__(self, listed: Listed) -> None:
        if self.json:
            e = listed.entry
            line = _JSON_LINE.encode({
                "change": listed.change, **_name_json("path", listed.path),
                "type": TYPE_NAMES[e.type] if e is not None else None,
                "what": listed.what if listed.change == "modified" else None,
                "rule": listed.what if listed.change == "excluded" else None})
            sys.stdout.write((',\n' if self.started else '{"list": [\n') + line)
            sys.stdout.open_list = "\n],"  # type: ignore[union-attr]
        else:
            self.bar.clear()
            sys.stdout.write(f"{LIST_LETTERS[listed.change]} {shown_name(listed.path) or '.'}\n")
        self.started = True

    def end(self) -> None:
        """End the list (one that heard of nothing too): ``_emit_json`` writes the document's other keys."""
        sys.stdout.write('\n],' if self.started else '{"list": [\n],')
        sys.stdout.open_list = None  # type: ignore[union-attr]
        self.started = True


def _progress(args: argparse.Namespace, what: str, total: int | None = None, unit: str = "files") -> Progress:
    mode = getattr(args, "progress", "auto")
    if mode == "json":
        return JsonProgress(what, total, unit=unit)
    return Progress(what, total, enabled=False if (args.quiet or args.json or mode == "none") else None, unit=unit)


def _prune_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-unused", type=_share, default=0.05,
                        help="repack packs with more unused than this (default 5%%)")
    parser.add_argument("--max-repack-size", type=_size, metavar="SIZE",
                        help="repack at most this much live data (e.g. 500M), the packs with most unused first; "
                             "a later prune does the rest (a disk without room to repack everything at once)")


def _prune_with_progress(args: argparse.Namespace, repo: Any) -> Any:
    bar = _progress(args, "prune", unit="packs")
    try:
        return repo.prune(max_unused=args.max_unused, max_repack_size=args.max_repack_size, dry_run=args.dry_run,
                          wait=args.wait, progress=bar)
    finally:
        bar.done()


def _backup_progress(bar: Progress) -> Callable[[dict], None] | None:
    if not bar.enabled:
        return None
    return lambda counts: bar(counts.get("new_files", 0) + counts.get("changed_files", 0) +
                              counts.get("unchanged_files", 0),
                              counts.get("read_bytes", 0) + counts.get("unchanged_bytes", 0),
                              counts.get("total_bytes"))


def _time_column(snaps: Iterable[Snapshot]) -> tuple[dict[str, str], int]:
    """Each snapshot's time as listings show it, by id, and the column's width: one in autumn's repeated hour
    carries its offset, six characters more, and the rows after it stood out of line with the header."""
    times = {s.id: listed_time(s.datetime) for s in snaps}
    return times, max([19, *map(len, times.values())])


def cmd_snapshots(args: argparse.Namespace) -> int:
    repo = _open(args)
    hosts = args.host or ([env_host()] if env_host() else [])
    snaps = repo.snapshots(hosts=hosts, tags=args.tag, paths=args.path, latest=args.latest,
                           group_by=args.group_by)
    if args.json:
        # The chain as it is now: a forget's rebase or an aggregate shortens chains after the backup recorded them.
        lengths = chain_lengths({s.id: s.parent for s in repo.snapshots()})
        _emit_json([_snapshot_json(s, lengths.get(s.id, 1)) for s in snaps])
        return 0
    hosts = {s.id: one_line(s.host) for s in snaps}  # whole: db-production-01 and -02 were both db-productio
    width = max([12, *map(len, hosts.values())])
    times, time_width = _time_column(snaps)
    print(f"{'ID':8}  {'time':{time_width}}  {'type':4}  {'parent':8}  {'host':{width}}  {'size':>10}  {'files':>7}  "
          "tags / paths")
    for s in snaps:
        print(f"{s.short_id:8}  {times[s.id]:{time_width}}  {s.kind:4}  {(s.parent or '')[:8]:8}  "
              f"{hosts[s.id]:{width}}  "
              f"{format_size(s.stats.get('bytes', 0)):>10}  {s.stats.get('files', 0):>7}  "
              f"{one_line(','.join(s.tags))} {' '.join(map(shown_name, s.paths))}")
    if not args.quiet:
        print(f"{len(snaps)} snapshots")
    return 0


def _confirmed(args: argparse.Namespace, word: str) -> bool:
    """Whether ``--confirm`` gave ``word``; any other word is a usage error (exit 2), never a quiet dry run."""
    if args.confirm is None:
        return False
    if args.confirm != word:
        raise UsageError(f"--confirm takes the word {word}")
    return True


def _confirm_in_place(args: argparse.Namespace, what: str) -> bool:
    """A non-empty target is restored in place only after RESTORE is confirmed; the prompt names ``what``
    would overwrite it (a snapshot of another source, picked by ``latest``, is not what one means to type
    RESTORE for)."""
    target = args.target
    confirmed = _confirmed(args, "RESTORE")
    if not _holds_entries(target):
        return False
    if confirmed:
        return True
    if sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty():  # None: closed (<&-)
        sys.stderr.write(f"{target} is not empty: restoring {one_line(what)} overwrites it in place. "
                         "Type RESTORE to continue: ")
        sys.stderr.flush()
        if sys.stdin.readline().strip() == "RESTORE":
            return True
        raise TargetNotEmpty(f"restore target {target} is not empty, and RESTORE was not typed: nothing restored")
    raise TargetNotEmpty(f"restore target {target} is not empty: to overwrite it in place, add --confirm RESTORE")


def restore_in_place(args: argparse.Namespace, what: str, repository: bool = True) -> bool:
    """Whether a restore writes into a non-empty target (``_confirm_in_place``), its --overwrite checked
    first.  ``never`` changes nothing the target has: it needs no RESTORE (a --confirm given must still
    say it).  ``repository``: a restore from one, which --verify and if-changed (as --delta) need."""
    from .pgrecovery import refuse_running_server
    from .store.target_lock import await_target

    check_overwrite(args.overwrite, args.delete)
    refuse_running_server(args.target)  # before the prompt (a restore from a file has no other check)
    began = time.monotonic()
    await_target(args.target, target_wait(args))  # one that another restore fills is not "not empty" to confirm
    args.waited = getattr(args, "waited", 0.0) + time.monotonic() - began
    if args.overwrite == "if-changed" and not repository:
        raise UsageError("--overwrite if-changed compares chunks by their repository ids, as --delta: it needs a "
                         "repository")
    if args.verify and args.overwrite in ("if-newer", "never"):
        raise UsageError(f"--verify compares every entry with the snapshot: --overwrite {args.overwrite} keeps "
                         "entries of the target's that differ from it")
    if args.overwrite != "never":
        return _confirm_in_place(args, what)
    _confirmed(args, "RESTORE")
    return _holds_entries(args.target)


def target_wait(args: argparse.Namespace) -> float:
    """How long a restore waits for another writing into its target: what the waits before (for the
    repository's lock, ``args.waited``) left of ``--wait`` where it was given, each took the whole of it anew;
    refused at once by default (its default is the wait for a prune, which a restore waits out)."""
    if not getattr(args, "wait_given", False):
        return 0.0
    return max(0.0, args.wait - getattr(args, "waited", 0.0))


def _waits_told(args: argparse.Namespace | None, exc: ChunkvaultError) -> ChunkvaultError:
    """A TargetBusy refused with no wait left, where ``--wait`` was given: the waits before (for the
    repository's lock, for the target) used all of it.  Its hint says so; "(or use --wait SECONDS)" asked
    for what was given."""
    if isinstance(exc, TargetBusy) and exc.cli_hint and getattr(args, "wait_given", False) and args.wait > 0:
        waited = getattr(args, "waited", 0.0)
        exc.hinting(f" (--wait {args.wait:g} went on the waits before: {waited:.1f} s for the repository's lock "
                    "and the target)")
    return exc


def _holds_entries(target: str) -> bool:
    """Whether the restore target is a directory that holds something.  One this user may not list (mode 000,
    another user's 0700) is the restore's one-line error, as the restore itself would find it: it was an
    internal error (PermissionError, exit 1)."""
    from .store.restore import target_error

    try:
        return os.path.isdir(target) and bool(os.listdir(target))
    except OSError as exc:
        raise target_error(f"cannot restore into {target}", exc) from None


def add_snapshot_choice(s: argparse.ArgumentParser) -> None:
    """Which snapshot ``latest`` (or ``--until``) names, where a repository holds several sources."""
    s.add_argument("--until", help="the newest snapshot at or before this time (ISO 8601)")
    s.add_argument("--host", help="only snapshots of this host (latest and --until pick among those; default: "
                                  "CHUNKVAULT_HOST for latest and --until)")
    s.add_argument("--path", action="append", default=[], metavar="PATH", dest="snapshot_paths",
                   help="only snapshots of exactly these backed-up paths (repeatable), or of the stream of this "
                        "--stdin-name")


HOST_ENV = "CHUNKVAULT_HOST"
BATCH_DEFAULT = 8  # files one ``archive-push``/``archive-get`` with a spool moves: a segment costs some 0.1 s, a process 0.3 s


def env_host() -> str | None:
    """``CHUNKVAULT_HOST``, as restic's RESTIC_HOST: the host a machine's backups record and its choices of
    ``latest`` are made among (a container whose host name changes at each start); empty: unset."""
    return os.environ.get(HOST_ENV) or None


def source_host(args: argparse.Namespace, spec: str = "latest") -> str | None:
    """The host a snapshot is chosen among: ``--host``, else ``CHUNKVAULT_HOST`` where ``latest`` (or
    ``--until``) picks one; an id names its snapshot whatever its host."""
    if args.host is not None:
        return args.host
    return env_host() if spec == "latest" else None


def chosen_subtree(repo: Any, args: argparse.Namespace, spec: str | None = None) -> tuple[Snapshot, bytes | None]:
    """``chosen_snapshot`` of a SNAPSHOT argument that may name a path in it, ``SNAPSHOT:PATH``: the snapshot,
    and the path (as the snapshot names it) or None."""
    from .repository import split_subtree

    name, path = split_subtree(args.snapshot if spec is None else spec)
    return chosen_snapshot(repo, args, name), path


def chosen_snapshot(repo: Any, args: argparse.Namespace, spec: str | None = None) -> Snapshot:
    """The snapshot ``add_snapshot_choice``'s options and the SNAPSHOT argument (or ``spec``) name: with two
    databases in one repository, ``latest`` alone is the newest of either."""
    name = args.snapshot if spec is None else spec
    return repo.snapshot(name, until=args.until, host=source_host(args, name), paths=args.snapshot_paths or None)


def cmd_restore(args: argparse.Namespace) -> int:
    from .memory import RESTORE_TRIM_THRESHOLD, tune_allocator
    from .store.target_lock import holding

    tune_allocator(trim_threshold=RESTORE_TRIM_THRESHOLD)
    recovery = _recovery_asked(args)
    if args.from_file:
        if recovery is not None:
            raise UsageError("--pg-recover fetches WAL from a repository: restore from one, not from a file")
        if args.pg_tablespace:
            raise UsageError("--pg-tablespace restores from the repository, not --from-file")
        from .exportcli import restore_from_file_cli

        return restore_from_file_cli(args)
    _warn_patterns(args, args.exclude, args.iexclude)
    repo = _open(args)
    snap, subtree = chosen_subtree(repo, args)
    if recovery is not None:
        from .pgrecovery import reaching
        from .repository import split_subtree

        if recovery[0].picks_snapshot and args.until is None and split_subtree(args.snapshot)[0] == "latest":
            snap = reaching(repo, recovery[0], host=source_host(args, "latest"), paths=args.snapshot_paths or None,
                            subtree=subtree)
        _check_data_directory(repo, snap, subtree, recovery[0])
    relocate = []
    if args.pg_tablespace:
        from .pgtablespace import relocations

        if subtree is not None or args.include or args.exclude or args.iexclude:
            raise UsageError("--pg-tablespace restores a whole data directory: give no SNAPSHOT:PATH, --include or "
                             "--exclude with it")
        relocate = relocations(repo, snap, args.pg_tablespace)
    within = f"{shown_name(subtree)} of " if subtree else ""
    in_place = restore_in_place(args, f"{within}snapshot {snap.short_id} of "
                                      f"{snap.host}:{','.join(snap.paths) or snap.stdin_name} "
                                      f"({listed_time(snap.datetime)})")
    if (args.delta or args.delete) and not in_place and os.path.isdir(args.target) and os.listdir(args.target):
        raise UsageError("--delta and --delete work in place: add --confirm RESTORE")
    if recovery is not None and in_place and not args.delete:
        raise UsageError("--pg-recover in place needs --delete: what an earlier run of the server left in the target "
                         "(in pg_wal, a later timeline's history and segments) would steer the recovery away from "
                         "the target asked for")
    bar = _progress(args, "restore", None if subtree else snap.stats.get("bytes"))
    args.held.enter_context(holding())  # the target's lock kept until the recovery settings are written
    try:
        try:
            result = repo.restore(snap, args.target, includes=args.include, excludes=args.exclude,
                                  iexcludes=args.iexclude, force=in_place,
                                  delta=args.delta, delete=args.delete, progress=bar, processes=args.processes,
                                  verify=args.verify, xattrs=not args.no_xattrs,
                                  numeric_owner=args.numeric_owner, subtree=subtree, overwrite=args.overwrite,
                                  relocate=relocate, target_wait=target_wait(args))
        finally:
            bar.done()
    except ChunkvaultError as exc:
        if exc.partial is not None:  # the rest was restored: say what was, then fail
            _report_restore(args, snap, exc.partial, verified=False, subtree=subtree)
        raise
    written = None
    if recovery is not None:
        from .pgrecovery import write_recovery

        written = write_recovery(args.target, *recovery)
    if _report_restore(args, snap, result, verified=args.verify, subtree=subtree, recovery=written):
        print(f"restored {within}snapshot {snap.short_id} ({said_second(snap.datetime)}) to {one_line(args.target)}: "
              f"{_restored(result)}"
              + ("; read back and verified" if args.verify else ""))
        if written is not None:
            print(f"  PostgreSQL will recover from the archive ({written.signal}; settings in "
                  f"postgresql.auto.conf): " + ", ".join(f"{n} = {v}" for n, v in written.settings))
    return 0


def _recovery_asked(args: argparse.Namespace) -> tuple[Any, str] | None:
    """``--pg-recover``'s target and restore_command, checked before anything is restored; None without it."""
    from .pgrecovery import parse_target, restore_command
    from .remotes import url_scheme

    if args.pg_recover is None:
        for given, name in ((args.pg_target_action, "--pg-target-action"),
                            (args.pg_restore_command, "--pg-restore-command"), (args.pg_spool, "--pg-spool")):
            if given is not None:
                raise UsageError(f"{name} is part of the recovery --pg-recover sets up: give --pg-recover too")
        return None
    target = parse_target(args.pg_recover, args.pg_target_action)
    if args.pg_restore_command is not None:
        if args.pg_spool is not None:
            raise UsageError("--pg-spool is an option of the restore_command chunkvault writes: put it in "
                             "--pg-restore-command instead")
        if not args.pg_restore_command.strip() or "\n" in args.pg_restore_command:
            raise UsageError("--pg-restore-command is one line of shell, with %f and %p")
        return target, args.pg_restore_command
    url = _repo_url(args)
    if url_scheme(url) == "file":  # the path a file:// URL names, decoded: "%20" and "localhost/" were kept
        from .remotes.local import local_path

        url = os.path.abspath(local_path(url))
    secret = _secret_for_server(args)
    endpoint = getattr(args, "s3_endpoint", None)
    options = [_absolute_path_option(o) for o in args.option or []] + (
        [f"s3.endpoint-url={endpoint}"] if endpoint else [])
    options += _token_for_server(url, options)
    options += _environment_options_for_server(url, options)
    spool = os.path.abspath(args.pg_spool) if args.pg_spool else None
    return target, restore_command(_program(), url, secret, options, spool, fatal_errors=target.kind != "standby")


def _secret_for_server(args: argparse.Namespace) -> tuple[str, str]:
    """How the server's restore_command opens the repository: the password file or command this restore
    was given (an option, else its environment variable); a password typed or in the environment cannot be
    written into the server's configuration."""
    env = passwords.REPOSITORY.env
    if args.password_file:
        return "--password-file", os.path.abspath(args.password_file)
    if args.password_command:
        return "--password-command", args.password_command
    if os.environ.get(env + "_FILE"):
        return "--password-file", os.path.abspath(os.environ[env + "_FILE"])
    if os.environ.get(env + "_COMMAND"):
        return "--password-command", os.environ[env + "_COMMAND"]
    raise UsageError("--pg-recover writes a restore_command that opens the repository by itself: give "
                     "--password-file (or --password-command) that PostgreSQL's user can use, or "
                     "--pg-restore-command")


def _absolute_path_option(option: str) -> str:
    """A ``-o`` option naming a file (``http.token-file``, ``sftp.key-file``, ``sftp.known-hosts``, ...) with
    its path made absolute, as the password file's is: the server runs restore_command in its data directory."""
    name, sep, value = option.partition("=")
    if sep and value and name.strip().lower().replace("_", "-").endswith(("-file", "-hosts", "-config")):
        return f"{name}={os.path.abspath(os.path.expanduser(value))}"
    return option


def _token_for_server(url: str, options: list[str]) -> list[str]:
    """The ``-o`` option that gives the server's restore_command the HTTP token, as the password: a token
    file (``http.token-file``, else ``CHUNKVAULT_HTTP_TOKEN_FILE``); a token itself written there would be in
    ``postgresql.auto.conf``, ``restore --json`` and every process listing of its runs, and one in the
    environment is not the server's."""
    from .remotes import options_for_url, url_scheme
    from .remotes.http import TOKEN_ENV, TOKEN_FILE_ENV

    names = {n.lower() for n in options_for_url("http://", options)}  # the HTTP ones, whatever the URL's scheme
    if "token" in names:
        raise UsageError("--pg-recover writes the -o options into the server's restore_command, where every "
                         "user's process listing shows them: give the HTTP token with -o http.token-file=FILE "
                         "(readable by PostgreSQL's user) instead of -o http.token")
    if url_scheme(url) not in ("http", "https") or "token_file" in names:
        return []
    if os.environ.get(TOKEN_FILE_ENV):
        return [f"http.token-file={os.path.abspath(os.environ[TOKEN_FILE_ENV])}"]
    if os.environ.get(TOKEN_ENV):
        raise UsageError(f"--pg-recover writes a restore_command that reaches the service by itself: give the "
                         f"token with -o http.token-file=FILE (or {TOKEN_FILE_ENV}) that PostgreSQL's user can "
                         f"read; {TOKEN_ENV} cannot be written there")
    return []


def _environment_options_for_server(url: str, options: list[str]) -> list[str]:
    """The ``-o`` options that give the server's restore_command what this restore read from its
    environment: the SSH key and known hosts, the HTTP service's CA, the S3 endpoint.  The server runs the
    command with its own environment, so without them each ``archive-get`` fails, which PostgreSQL takes for
    the end of the archive: a recovery to ``end`` would be promoted at the snapshot's own WAL.  Credentials
    (a token, an S3 secret) are not written; files naming them are (``_token_for_server``)."""
    from .remotes import http, options_for_url, s3, sftp, url_scheme
    from .remotes.base import from_environment

    scheme = "http" if url_scheme(url) == "https" else url_scheme(url)
    given = options_for_url(url, options)
    out = []
    module = {"sftp": sftp, "http": http, "s3": s3}.get(scheme)
    for name, variables in getattr(module, "ENVIRONMENT_OPTIONS", {}).items():
        value = from_environment(variables)
        if value is not None and name not in given:
            out.append(_absolute_path_option(f"{scheme}.{name.replace('_', '-')}={value}"))
    return out


def _program() -> list[str]:
    """chunkvault as an absolute command line: the script run now, else this Python with the module."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "chunkvault" and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "chunkvault.cli"]


def _check_data_directory(repo: Any, snap: Snapshot, subtree: bytes | None, target: Any) -> None:
    """The snapshot (or SNAPSHOT:PATH) is a data directory of PostgreSQL 12 or newer, before any restore, on
    the line of the timeline the recovery follows, and for a time ``target`` one copied by then (a snapshot
    named, ``latest``, or picked by ``--until``, may not be)."""
    from .pgrecovery import at_root, check_major, copied_after, holds_data_directory, off_timeline

    version = None
    if holds_data_directory(repo, snap, subtree):
        try:
            with repo.open_file(snap, at_root(subtree, b"PG_VERSION")) as f:
                version = f.read(64)
        except UsageError:  # none there
            pass
    if version is None:
        where = f"{shown_name(subtree)} of snapshot" if subtree else "snapshot"
        raise UsageError(f"--pg-recover: {where} {snap.short_id} holds no PostgreSQL data directory at its root "
                         "(no global/pg_control or PG_VERSION)")
    check_major(version)
    with repo.open_file(snap, at_root(subtree, b"global/pg_control")) as f:
        why = copied_after(target, f.read(64))
    if why is not None:
        raise UsageError(f"--pg-recover: the data directory of snapshot {snap.short_id} cannot recover to the target: "
                         f"{why}; restore a snapshot taken before it (latest picks one)")
    why = off_timeline(snap.stats, *repo.wal_history())
    if why is not None:
        raise UsageError(f"--pg-recover: snapshot {snap.short_id} cannot recover from the archive: {why}; restore "
                         "one taken on that timeline, or on an earlier one before it branched off")


def _restored(result: Any) -> str:
    """A restore's counts for its summary line."""
    return (f"{result.files} files, {result.dirs} dirs, "
            + (f"{result.links} links, " if result.links else "")
            + (f"{result.specials} FIFOs and devices, " if result.specials else "") + format_size(result.bytes)
            + (f"; {result.skipped_existing} existing entries kept" if result.skipped_existing else "")
            + (f"; {result.deleted} entries the snapshot lacks deleted" if result.deleted else ""))


def _report_restore(args: argparse.Namespace, snap: Snapshot, result: Any, verified: bool,
                    subtree: bytes | None = None, recovery: Any = None) -> bool:
    """A restore's JSON, or its warnings on stderr; whether a summary line is still to be printed."""
    if args.json:
        _emit_json({**_restore_json(snap, result, args.target, verified, subtree),
                    **({"pg_recovery": recovery.to_dict()} if recovery is not None else {})})
        return False
    for w in result.warnings:  # under -q too: each says what of the snapshot the target lacks
        warn(w)
    return not args.quiet


def _restore_json(snap: Snapshot, result: Any, target: str, verified: bool,
                  subtree: bytes | None = None) -> dict[str, Any]:
    """A restore's result; ``subtree`` the path of ``SNAPSHOT:PATH`` ("" for the whole snapshot);
    ``not_restored`` lists the files left out because their data is damaged, ``not_written`` the entries
    the target would not take."""
    return {"snapshot": snap.id, **_name_json("subtree", subtree or b""), **_name_json("target", os.path.abspath(target)),
            "files": result.files,
            "dirs": result.dirs, "links": result.links, "specials": result.specials, "bytes": result.bytes,
            "unchanged_files": result.unchanged_files, "rewritten_bytes": result.rewritten_bytes,
            "skipped_existing": result.skipped_existing,
            "deleted": result.deleted, "processes": result.processes, **_names_json("warnings", result.warnings),
            "verified": verified,
            "not_restored": [{**_name_json("path", path), "object": obj, "reason": reason,
                              "removed": path in result.removed} for path, obj, reason, _ in result.damaged],
            "not_written": [{**_name_json("path", path), "reason": reason} for path, reason in result.unwritten]}


def cmd_find(args: argparse.Namespace) -> int:
    repo = _open(args)
    hosts = args.host or ([env_host()] if env_host() and not args.snapshot else [])  # ids name their snapshots
    found = repo.iter_find(args.patterns, snapshots=args.snapshot or None, hosts=hosts, tags=args.tag,
                           paths=args.path, ignore_case=args.ignore_case)  # one path at a time: never all held
    first = next(found, None)
    if first is None:
        _warn_rooted(args.patterns)
    found = itertools.chain([] if first is None else [first], found)
    tables: dict[str, tuple[dict[int, str], dict[int, str]]] = {}  # per snapshot: versions share them
    listing: list[Snapshot] | None = None  # read once, when a version first needs its owners' names

    def names(snap: Snapshot) -> tuple[dict[int, str], dict[int, str]]:
        nonlocal listing
        if snap.id not in tables:
            if listing is None:
                listing = repo.snapshots()
            tables[snap.id] = repo.owner_names(snap, snapshots=listing)
        return tables[snap.id]

    if args.json:
        _emit_json_array(_found_json(f, names) for f in found)
        return 0
    named: dict[str, str] = {}  # a snapshot as a version names it: its local time worked out once, not per path

    def shown(snap: Snapshot) -> str:
        if snap.id not in named:
            named[snap.id] = f"{snap.short_id} ({listed_time(snap.datetime)})"
        return named[snap.id]

    paths = versions = 0
    for f in found:
        paths += 1
        versions += len(f.versions)
        print(f"{shown_name(f.path) or '.'}  ({one_line(f.host)}: {' '.join(map(shown_name, f.paths))})")
        for v in f.versions:
            e, first, last = v.entry, v.snapshots[0], v.snapshots[-1]
            where = shown(first)
            if len(v.snapshots) > 1:
                where += f" .. {shown(last)}, {len(v.snapshots)} snapshots"
            extra = f" -> {shown_name(e.target)}" if e.target else ""
            said = _unreadable(e)  # as ls marks it: else a file no backup read passes for an empty one
            if said:
                extra += f"  (unreadable at backup time: {said})"
            users, groups = names(last)
            owner = f"{one_line(users.get(e.uid, e.uid))}/{one_line(groups.get(e.gid, e.gid))}"
            size = _size_shown(e, format_size(e.size))
            print(f"  {TYPE_NAMES[e.type]:8} {oct(e.mode)[2:]:>5} {owner:<17} {size:>10}  "
                  f"modified {_ns_local(e.mtime_ns)}  in {where}{extra}")
    if not args.quiet:
        print(f"{paths} path{'s' * (paths != 1)}, {versions} version{'s' * (versions != 1)}")
    return 0


def _found_json(f: Any, owner_names: Callable[[Snapshot], tuple[dict[int, str], dict[int, str]]]) -> dict[str, Any]:
    """One path of ``find --json`` with its versions (a ``store.find.Found``); a version's owner names are
    those its newest snapshot recorded."""
    return {"host": f.host, **_names_json("paths", f.paths), **_name_json("path", f.path),
            "versions": [{**{k: v for k, v in _listed_json(v.entry, owner_names(v.snapshots[-1])).items()
                             if k not in ("path", "path_b64")},
                          "snapshots": [s.id for s in v.snapshots]} for v in f.versions]}


def cmd_stats(args: argparse.Namespace) -> int:
    if args.snapshots or args.host or args.tag or args.path:
        return _usage(args)
    st = _open(args).stats()
    if args.json:
        _emit_json(st.to_dict())
        return 0
    print(f"snapshots      {st.snapshots} ({st.full_snapshots} full, {st.snapshots - st.full_snapshots} differential) "
          f"of {st.sources} source(s)")
    print(f"files          {format_size(st.newest_bytes)} in each source's newest snapshot, "
          f"{format_size(st.all_bytes)} in all snapshots")
    print(f"distinct data  {format_size(st.blob_raw_bytes)} in {st.blobs} blobs, "
          f"stored as {format_size(st.blob_stored_bytes)}"
          + (f" ({st.delta_blobs} deltas: {format_size(st.delta_raw_bytes)} as {format_size(st.delta_stored_bytes)})"
             if st.delta_blobs else ""))
    print(f"manifests      {format_size(st.manifest_stored_bytes)} in {st.manifest_blobs} blobs")
    if st.wal_files:
        print(f"archived WAL   {st.wal_files} files, {format_size(st.wal_bytes)}: {format_size(st.wal_raw_bytes)} "
              f"in {st.wal_blobs} blobs, stored as {format_size(st.wal_stored_bytes)}")
    print(f"packs          {format_size(st.pack_bytes)} in {st.packs} packs")
    print(f"ratios         deduplication {st.dedup_ratio:.2f}x, compression and deltas {st.compression_ratio:.2f}x, "
          f"all snapshots' files to packs {st.overall_ratio:.2f}x" + (" (the WAL's left out)" if st.wal_files else ""))
    return 0


def _usage(args: argparse.Namespace) -> int:
    repo = _open(args)
    with repo.reading("stats", wait=args.wait):
        u = repo.usage(args.snapshots or None, hosts=args.host, tags=args.tag, paths=args.path)
    if not u.snapshots:
        raise SnapshotNotFound("no snapshot matches the given snapshots, --host, --tag and --path")
    if args.json:
        _emit_json(u.to_dict())
        return 0

    def deltas(t: Any) -> str:
        return f" ({t.delta_blobs} deltas as {format_size(t.delta_stored_bytes)})" if t.delta_blobs else ""

    print(f"snapshots      {u.snapshots} ({u.full_snapshots} full, {u.snapshots - u.full_snapshots} differential)")
    print(f"files          {u.files} files, {format_size(u.bytes)} "
          f"(restore size{', summed' if u.snapshots > 1 else ''})")
    print(f"chunks         {format_size(u.chunks.raw_bytes)} in {u.chunks.blobs} distinct chunks, stored as "
          f"{format_size(u.chunks.stored_bytes)}{deltas(u.chunks)}")
    if u.bases.blobs:
        print(f"delta bases    {u.bases.blobs} blobs below those deltas, stored as {format_size(u.bases.stored_bytes)}")
    print(f"manifests      {format_size(u.manifest_stored_bytes)} in {u.manifest_blobs} blobs")
    print(f"data needed    {format_size(u.stored_bytes)} stored in all: what restoring or copying them reads")
    print(f"only these     {format_size(u.frees_stored_bytes)} stored in "
          f"{u.only.blobs + u.only_manifests.blobs} blobs{deltas(u.only)} "
          f"({format_size(u.only_manifests.stored_bytes)} "
          "of manifests): what forgetting them, then prune, frees")
    return 0


def _tags(groups: list[str]) -> list[str]:
    """``--tag a,b --tag c``: tags a, b and c."""
    return [t for group in groups for t in group.split(",") if t]


def cmd_tag(args: argparse.Namespace) -> int:
    repo = _open(args)
    changed = repo.tag(args.snapshots or None, add=_tags(args.add), remove=_tags(args.remove),
                       set_to=_tags(args.set) if args.set else None, hosts=args.host, tags=args.tag, paths=args.path,
                       wait=args.wait)
    if args.json:
        _emit_json([_snapshot_json(s) for s in changed])
    elif not args.quiet:
        for s in changed:
            print(f"{s.short_id}  {one_line(','.join(s.tags))}")
        print(f"changed the tags of {len(changed)} snapshot(s)")
    return 0


def _warn_rooted(patterns: list[str]) -> None:
    """As restore --include says: a path as it was on the backed-up machine matches nothing."""
    led = [p for p in patterns if p.startswith("/")]
    if led:
        warn(f"nothing matched {', '.join(led)}: patterns are paths as `ls` lists them, relative to the "
             "snapshot's root (without a leading /)")


def cmd_rewrite(args: argparse.Namespace) -> int:
    confirmed = _confirmed(args, "REWRITE")
    globs, iglobs = _ordered(args, "exclude_order"), _ordered(args, "iexclude_order")
    _warn_patterns(args, globs, iglobs)
    repo = _open(args)
    report = repo.rewrite(globs, args.snapshots or None, hosts=args.host, tags=args.tag, paths=args.path,
                          dry_run=not confirmed, wait=args.wait, iexcludes=iglobs, new_host=args.new_host)
    if report.new_host is not None:
        return _report_rehost(args, report)
    if not report.rewritten:
        _warn_rooted(globs)
    if args.json:
        _emit_json({**report.to_dict(),
                    "removed": [{"snapshot": sid, **_name_json("path", p)} for sid, p in report.removed]})
    elif not args.quiet:
        for sid, path in report.removed:
            print(f"{'would remove' if report.dry_run else 'removed'} {sid[:8]}:{shown_name(path)}")
        if not report.rewritten:
            print("no snapshot holds a path these globs match")
        elif report.dry_run:
            print(f"nothing changed: add --confirm REWRITE to rewrite these {len(report.rewritten)} snapshot(s), "
                  "then prune to free their data")
        else:
            print(f"rewrote {len(report.rewritten)} snapshot(s); prune frees the data they no longer reference")
        if report.inherited:
            print(f"{len(report.inherited)} differential(s) built on them {'would ' if report.dry_run else ''}lose "
                  "the same paths: "
                  + " ".join(sid[:8] for sid in report.inherited))
        if report.recounted:
            print(f"{'would count' if report.dry_run else 'counted'} again the files of {len(report.recounted)} "
                  "differential(s) a rewrite stopped part-way left counting what it removed"
                  f"{' (--confirm REWRITE does)' if report.dry_run else ''}: "
                  + " ".join(sid[:8] for sid in report.recounted))
    return 0


def _report_rehost(args: argparse.Namespace, report: Any) -> int:
    """What ``rewrite --new-host`` renamed, or would."""
    if args.json:
        _emit_json(report.to_dict())
    elif not args.quiet:
        new = one_line(report.new_host)
        for sid, old in report.renamed:
            print(f"{'would rename' if report.dry_run else 'renamed'} {sid[:8]}: host {one_line(old)} -> {new}")
        if not report.renamed:
            print(f"no selected snapshot has another host than {new}")
        elif report.dry_run:
            print(f"nothing changed: add --confirm REWRITE to give these {len(report.renamed)} snapshot(s) "
                  f"host {new}")
        else:
            print(f"gave {len(report.renamed)} snapshot(s) host {new}; `backup --host {new}` builds on them")
        if report.joined:
            print(f"they {'would join' if report.dry_run else 'join'} {len(report.joined)} snapshot(s) host {new} "
                  "has of the same paths: its next backup builds on the newest of them all")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from .repository import snapshot_path

    repo = _open(args)
    snap, subtree = chosen_subtree(repo, args)
    prefix = snapshot_path(args.path) if args.path else b""
    entries = _listed_entries(repo, snap, prefix, subtree, recursive=not args.no_recursive)
    names = repo.owner_names(snap)
    unread_paths = {b"" if p == "." else os.fsencode(p) for p in snap.stats.get("unreadable", ())}
    if subtree:  # named as the listing names them: relative to the subtree (its root: "." or, a file, its name)
        unread_paths = {q for p in unread_paths for q in _under_subtree(p, subtree)}
    if args.json:
        _emit_json_array(_listed_json(e, names, unread_paths) for e in entries)
        return 0
    for e in entries:
        name = shown_name(e.path) or "."
        extra = f" -> {shown_name(e.target)}" if e.target else ""
        said = _unreadable(e, unread_paths)
        if said:
            extra += f"  (unreadable at backup time: {said})"
        owner = f"{one_line(names[0].get(e.uid, e.uid))}/{one_line(names[1].get(e.gid, e.gid))}"
        size = _size_shown(e, str(e.size))
        print(f"{TYPE_NAMES[e.type]:8} {oct(e.mode)[2:]:>5} {owner:<17} {size:>12}  {_ns_local(e.mtime_ns)}  "
              f"{name}{extra}")
    return 0


def _under_subtree(path: bytes, subtree: bytes) -> list[bytes]:
    """``path`` of a snapshot as ``ls SNAPSHOT:SUBTREE`` may name it: none outside, both names of the root."""
    if path == subtree:
        return [b"", subtree.rpartition(b"/")[2]]
    return [path[len(subtree) + 1:]] if path.startswith(subtree + b"/") else []


def _listed_entries(repo: Any, snap: Snapshot, prefix: bytes, subtree: bytes | None = None,
                    recursive: bool = True) -> Iterator[Entry]:
    """The entries ``ls`` lists, as they come (of ``SNAPSHOT:PATH``, named relative to PATH, as a restore of
    it writes them; not ``recursive``: the path and what lies directly in it); a path with nothing there
    is an error once the listing turns out empty, before ``--json`` has written its ``[]``."""
    listed = False
    for e in repo.tree(snap, prefix, subtree=subtree, recursive=recursive):
        listed = True
        yield e
    if prefix and not listed:  # nothing there (a directory without an entry of its own lists what it holds)
        if subtree:
            raise UsageError(f"no '{shown_name(prefix)}' in {shown_name(subtree)} of snapshot {snap.short_id}")
        repo.find_entry(snap, prefix)


def cmd_diff(args: argparse.Namespace) -> int:
    repo = _open(args)
    # a merge of the two trees: streams, as the output does
    (a, in_a), (b, in_b) = chosen_subtree(repo, args, args.snap1), chosen_subtree(repo, args, args.snap2)
    changes = repo.diff(a, b, subtree_a=in_a, subtree_b=in_b)
    if args.json:
        _emit_json_array({"change": c, "what": what_changed(old, new),
                          **_name_json("path", (new or old).path),  # type: ignore[union-attr]
                          "old_size": old.size if old else None, "new_size": new.size if new else None}
                         for c, old, new in changes)
        return 0
    sign = {"added": "+", "removed": "-", "modified": "M"}
    marks = {None: "", "content": "M", "type": "T", "metadata": "U"}  # as restic marks them
    counts = dict.fromkeys(sign, 0)  # the summary, counted on the way: the changes are not kept
    for c, old, new in changes:
        counts[c] += 1
        e = new or old
        assert e is not None
        sizes = f"{old.size if old else ''} -> {new.size if new else ''}"
        print(f"{marks[what_changed(old, new)] or sign[c]} {shown_name(e.path) or '.'}  ({sizes})")
    if not args.quiet:
        print(f"{counts['added']} added, {counts['removed']} removed, {counts['modified']} modified")
    return 0


def _write_all(out: BinaryIO, data: Any) -> None:
    """Every byte of ``data`` to ``out``: a write its reader closed the pipe during returns the part written;
    written again, the rest meets the closed pipe (BrokenPipeError: exit 141)."""
    view = memoryview(data).cast("B")
    while view:
        n = out.write(view)
        if not n:
            raise BrokenPipeError(errno.EPIPE, "standard output took no more")
        view = view[n:]


class _DataOut:
    """Standard output's binary stream for a dump: once a byte of data is written there, an error is said on
    stderr alone, not as a JSON document after the data (``_emit_error_json``)."""

    def __init__(self, out: BinaryIO):
        self._out = out

    def write(self, data: Any) -> int:
        """All of ``data`` (``_write_all``: `cat blob ID | head -c 10` exited 0, the rest dropped)."""
        if not getattr(sys.stdout, "written", True):
            sys.stdout.written = True  # type: ignore[union-attr]
        _write_all(self._out, data)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


def cmd_dump(args: argparse.Namespace) -> int:
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        raise TargetUnwritable("dump: standard output is closed: redirect it to a file or a pipe")
    repo = _open(args)
    snap, subtree = chosen_subtree(repo, args)
    if args.snapshot == "latest" and args.path == "latest":  # `dump latest --path x`: the PATH was left out
        try:
            repo.is_directory(snap, args.path)
        except UsageError:
            raise UsageError("dump takes a snapshot, then a PATH (a file, or / for the whole snapshot): "
                             "dump latest PATH") from None
    one_argument = subtree is None and ":" in args.path and args.snapshot == "latest"  # `dump latest:etc/x`?
    if out.isatty() or one_argument:
        try:
            directory = repo.is_directory(snap, args.path, subtree=subtree)
        except UsageError as exc:
            if not one_argument:
                raise
            name, _, within = args.path.partition(":")
            raise UsageError(f"{exc}; SNAPSHOT:PATH is followed by a path within it (/ for all of it): dump "
                             f"{name} {within or '/'}, or dump {args.path} /") from None
        if out.isatty() and directory:
            raise UsageError(f"a directory is written as a {args.archive} archive: redirect it to a file or a pipe")
    try:
        with _stdout_errors("dump"):
            warnings = repo.dump(snap, args.path, _DataOut(out), archive=args.archive, subtree=subtree)
            out.flush()
    except BrokenPipeError:  # what it was piped into has not got the whole file or archive: not a success
        raise OutputClosed("dump: the reader of standard output closed it before the dump was complete") from None
    if not args.quiet:
        for w in warnings:
            warn(w)
    return 0


def _none_read(subset: str | None, report: Any) -> str:
    """What a check asked to read data says when its subset chose no pack: a slice ``n/m`` of the packs by
    id may hold none of them (the other slices hold them), which a summary silent on reading passed for a
    read.  (Packs chosen that could not be read are its problems.)"""
    if subset is None or not report.packs or report.packs_chosen != 0:
        return ""
    return f"; read no packs: slice {subset.strip()} of --read-data-subset holds none of them"


def cmd_check(args: argparse.Namespace) -> int:
    repo = _open(args)
    bar = _progress(args, "check", unit="packs")
    try:
        report = repo.check(read_data=args.read_data, subset=args.read_data_subset, progress=bar,
                            accept_state=args.accept_state)
    finally:
        bar.done()
    if args.json:
        doc = report.to_dict()
        for problem in doc["problems"]:  # a path that is not UTF-8 with its bytes, as ls and restore give it
            problem.update(_names_json("files", problem["files"]))
        _emit_json(doc)
    else:  # -q: the problems alone, which are errors
        for w in () if args.quiet else report.warnings:
            warn(w)
        for p in report.problems:
            print(f"error: {one_line(p.object)}: {one_line(p.problem)}")
            if p.snapshots:
                print(f"  affects snapshots: {' '.join(s[:8] for s in p.snapshots)}")
            for f in p.files[:20]:
                print(f"  affects file {shown_name(f)}")
            if len(p.files) + p.more_files > 20:
                print(f"  and {len(p.files) + p.more_files - 20} more files"
                      + (f" (--json names {len(p.files)})" if len(p.files) > 20 else ""))
    if not args.json and not args.quiet:
        print(f"checked {report.snapshots} snapshots, "
              + (f"{report.wal_files} archived WAL files, " if report.wal_files else "")
              + f"{report.packs} packs, {report.blobs} blobs"
              + (f"; read {report.packs_read} packs ({format_size(report.bytes_read)}), {report.blobs_read} blobs"
                 if report.packs_read else _none_read(args.read_data_subset, report))
              + (": no problems" if report.ok else f": {len(report.problems)} problem(s)"))
    if not report.ok:
        raise VerificationFailed(f"check found {len(report.problems)} problem(s)")
    return 0


RETENTION_FLAGS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                   "keep_within", "keep_within_hourly", "keep_within_daily", "keep_within_weekly",
                   "keep_within_monthly", "keep_within_yearly", "keep_full_within", "keep_diff_within",
                   "keep_full", "keep_diff")


def _policy(args: argparse.Namespace) -> tuple[Any, Any]:
    """The retention policy the flags and ``--preset`` give, and the zone its days are counted in: a policy
    file's ``timezone`` (as ``run`` counts them), else None (local time)."""
    from .store.retention import load_preset, policy_from_dict

    table: dict[str, Any] = {}
    tz = None
    if args.preset:
        if not args.config:
            raise UsageError("--preset needs --config FILE")
        from .schedule import zone
        from .tomlfile import read_toml

        config = read_toml(args.config, "config")
        base = load_preset(config, args.preset)
        if "timezone" in config:
            tz = zone(config["timezone"])
        # as a table again, flags then override its keys: tag sets as lists (a frozenset is not a table's),
        # and the grouping even when empty (grouping nothing is a setting)
        table = {k: v for k, v in vars(base).items() if v not in (None, ())}
        table["keep_tags"] = [sorted(ts) for ts in base.keep_tags]
    for name in RETENTION_FLAGS:
        value = getattr(args, name)
        if value is not None:
            table[name] = value
    if args.keep_tag:
        table["keep_tags"] = args.keep_tag
    if args.group_by is not None:
        table["group_by"] = [g for g in args.group_by.split(",") if g]
    return (policy_from_dict(table) if table else None), tz


def _share(text: str) -> float:
    from .units import parse_share

    try:
        return parse_share(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _report_prune(args: argparse.Namespace, plan: Any) -> None:
    if args.json:
        _emit_json({"dry_run": args.dry_run, **plan.to_dict()})
    elif not args.quiet:
        delete, repack, keep, frees = (("would delete", "repack", "keep", "frees") if args.dry_run
                                       else ("deleted", "repacked", "kept", "freed"))
        print(f"prune {delete} {len(plan.delete)} pack(s) and {len(plan.orphans)} unindexed pack(s), "
              f"{repack} {len(plan.repack)} ({format_size(plan.repacked_bytes)} moved), {keep} {len(plan.keep)}; "
              f"{frees} {format_size(plan.freed_bytes)}; {plan.live_blobs} blobs live, {plan.unused_blobs} unused"
              + (f"; removed {plan.unfinished_removed} unfinished write(s) left by killed commands"
                 if plan.unfinished_removed else ""))
        if plan.held_back:
            print(f"{len(plan.held_back)} pack(s) worth repacking left for a later prune by --max-repack-size"
                  + (f"; {plan.over_limit} of them hold more live data than the whole limit, which no prune with "
                     "it repacks" if plan.over_limit else ""))
        if plan.unfinished_error:
            warn(f"unfinished writes not cleaned up (the prune went on): {plan.unfinished_error}")


def cmd_prune(args: argparse.Namespace) -> int:
    repo = _open(args)
    _report_prune(args, _prune_with_progress(args, repo))
    return 0


def _spool_identity(args: argparse.Namespace, remote: Any) -> str | None:
    """The repository as a spool names it: its address and its id (one made anew at the same address is
    another), read from the config without the password; None when the config does not read (the opening
    that follows says why)."""
    from .store.unlock import read_config

    try:
        return f"{_repo_url(args)} {read_config(remote)[1]['id']}"
    except ChunkvaultError:
        return None


def _open_spool(args: argparse.Namespace, make: Callable[[str, str], Any], name: str,
                without: str) -> tuple[tuple[Any, StopRequest] | None, Any]:
    """With ``--spool``: the repository's remote, connected ahead of the opening, and the spool (``make``: of
    the directory and the repository's identity), or None with a warning when it cannot be used.  Without
    one: neither (the key is then derived while connecting, in ``_open``)."""
    from .store.walnames import check_wal_name

    if not args.spool:
        return None, None
    connected = _remote(args)
    identity = _spool_identity(args, connected[0])
    if identity is None:
        return connected, None
    check_wal_name(name)
    try:
        return connected, make(args.spool, identity)
    except OSError as exc:
        warn(f"the spool {args.spool} cannot be used ({exc.strerror or exc}): {without}")
        return connected, None


def cmd_archive_push(args: argparse.Namespace) -> int:
    from .store.walnames import ready_ahead
    from .walspool import Spool, ready_files

    if args.batch is not None and not args.spool:
        raise UsageError("--batch needs --spool DIR: the spool's markers are what answer PostgreSQL for the "
                         "files pushed ahead")
    ahead: list[str] = []
    name = os.path.basename(args.path)
    connected, spool = _open_spool(args, Spool, name, "pushing this file alone")
    if spool is not None:
        if spool.claim(name, args.path):  # pushed ahead by an earlier call: no password, no index
            assert connected is not None
            connected[0].close()
            if args.json:
                _emit_json({"name": name, "pushed_ahead": True})
            elif not args.quiet:
                print(f"{name} archived already, pushed ahead by an earlier archive-push")
            return 0
        ready = ready_files(args.path)
        spool.sweep(ready)
        folder = os.path.dirname(args.path)
        ahead = [os.path.join(folder, n) for n in ready_ahead(ready, name, (args.batch or BATCH_DEFAULT) - 1)]

    def marked(r: Any) -> None:
        assert spool is not None
        try:
            spool.mark(r.wal.name, os.path.join(folder, r.wal.name))
        except OSError as exc:  # archived, but nothing will answer for it: the batch ends here
            raise TargetUnwritable(f"cannot write its marker in the spool {args.spool}: "
                                   f"{exc.strerror or exc}") from None

    result = _open(args, connected).archive_push(args.path, host=args.host or env_host(), wait=args.wait,
                                                 ahead=ahead, on_ahead=marked if spool else None)
    if args.json:
        _emit_json(result.to_dict())
        return 0
    if result.ahead_error:
        warn(f"pushing ahead stopped at {result.ahead_error}")
    if not args.quiet:
        for r in [result, *result.ahead]:
            w = r.wal
            print(f"{w.name} already archived with the same content" if r.already else
                  f"archived {w.name}: {format_size(w.size)}, {r.new_blobs} new blobs "
                  f"({format_size(r.stored_bytes)} stored)")
    return 0


def cmd_archive_get(args: argparse.Namespace) -> int:
    from .walspool import Prefetched

    if args.prefetch is not None and not args.spool:
        raise UsageError("--prefetch needs --spool DIR: the directory the files fetched ahead wait in")
    connected, spool = _open_spool(args, Prefetched, args.name, "fetching this file alone")
    if spool is not None:
        try:
            taken = spool.take(args.name, args.dest)
        except OSError as exc:  # the repository has it too
            warn(f"cannot take {args.name} from the spool ({exc.strerror or exc}): fetching it from the repository")
            taken = False
        if taken:  # fetched ahead by an earlier call: no password, no index
            assert connected is not None
            connected[0].close()
            spool.sweep(args.name)
            if args.json:
                _emit_json({"name": args.name, **_name_json("dest", args.dest), "fetched_ahead": True})
            elif not args.quiet:
                print(f"restored {args.name} to {shown_name(args.dest)}, fetched ahead by an earlier archive-get")
            return 0
    args.read_lock = "archive-get"
    repo = _open(args, connected)
    wal = repo.archive_get(args.name, args.dest, wait=args.wait)
    fetched, why = [], None
    if spool is not None:  # the file is in place: nothing that follows may fail the call (PostgreSQL: not archived)
        spool.sweep(args.name)
        try:
            fetched, why = repo.archive_prefetch(args.name, spool.path, args.prefetch or BATCH_DEFAULT,
                                                 wait=args.wait)
        except ChunkvaultError as exc:  # the listing of the files ahead (a remote gone since)
            why = one_line(exc)
    if args.json:
        _emit_json({**wal.to_dict(), **_name_json("dest", args.dest), "fetched_ahead": False,
                    "prefetched": [w.name for w in fetched], "prefetch_error": why})
        return 0
    if why:
        warn(f"fetching ahead stopped at {why}")
    if not args.quiet:
        print(f"restored {wal.name} ({format_size(wal.size)}) to {shown_name(args.dest)}"
              + (f"; fetched {len(fetched)} more ahead" if fetched else ""))
    return 0


def cmd_archive_check(args: argparse.Namespace) -> int:
    from .errors import ArchiveCheckFailed

    repo = _open(args)
    try:
        result = repo.archive_check(args.pg_connect, timeout=args.timeout)
    except ArchiveCheckFailed as exc:
        if args.json and exc.partial is not None:  # the server's statistics, for a program to read
            _emit_json(exc.partial.to_dict())
        raise
    if args.json:
        _emit_json(result.to_dict())
    elif not args.quiet:
        s = result.status
        print(f"{result.segment} reached the repository in {result.waited:.1f} s (archive_mode = {s.archive_mode}; "
              f"{s.archived_count} archived, {s.failed_count} failed since the server's statistics were reset)")
    return 0


def cmd_archive_list(args: argparse.Namespace) -> int:
    from .store.walnames import timelines

    files = _open(args).archive_list()
    spans = timelines((w.name, w.size) for w in files)
    if args.json:
        _emit_json({"files": [w.to_dict() for w in files], "timelines": [t.to_dict() for t in spans]})
        return 0
    for w in files:
        print(f"{w.name:40}  {format_size(w.size):>10}  {_local_iso(w.time)}  {one_line(w.host)}")
    if args.quiet:
        return 0
    print(f"{len(files)} archived files, {format_size(sum(w.size for w in files))}")
    for t in spans:
        gap = (f"; {len(t.missing)} missing: {', '.join(t.missing[:10])}" + (", ..." if len(t.missing) > 10 else "")
               if t.missing else "")
        print(f"timeline {t.timeline}: {t.segments} segments from {t.first} to {t.last}{gap}")
    return 0


def cmd_archive_expire(args: argparse.Namespace) -> int:
    gone = _open(args).archive_expire(args.before, dry_run=args.dry_run, wait=args.wait)
    if args.json:
        _emit_json({"dry_run": args.dry_run, "removed": gone})
    elif not args.quiet:
        for name in gone:
            print(f"{'would remove' if args.dry_run else 'removed'} {name}")
        print(f"{len(gone)} archived files {'would be ' if args.dry_run else ''}removed"
              + ("" if args.dry_run or not gone else "; `chunkvault prune` frees their data"))
    return 0


def _local_iso(text: str) -> str:
    """A stored UTC time, to the second in local time, as listings show times."""
    check_local_zone()
    return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def cmd_forget(args: argparse.Namespace) -> int:
    policy, tz = _policy(args)
    repo = _open(args)
    plan = repo.forget(args.snapshots, policy=policy, dry_run=args.dry_run, hosts=args.host, tags=args.tag,
                       paths=args.path, wait=args.wait, allow_remove_all=args.unsafe_allow_remove_all, tz=tz)
    pruned, prune_error = None, None
    # A dry run's prune would see the snapshots still there: what it frees is the estimate below instead.
    if args.prune and not args.dry_run:  # the forget is done, whatever the prune does: reported, then its error
        try:
            pruned = _prune_with_progress(args, repo)
        except ChunkvaultError as exc:
            prune_error = exc
    removed = set(plan.remove)
    # What a prune after this forget would free: only a dry run can tell, the snapshots are still there.
    frees = None
    if args.dry_run and removed:
        try:
            with repo.reading("forget --dry-run", wait=args.wait):  # behind a prune: as long as --wait says
                frees = repo.usage(removed).frees_stored_bytes
        except (Locked, CorruptObject) as exc:  # the plan stands; only what a prune then frees is not known
            warn(f"what a prune then frees is left out: {exc}")  # (damaged: what `repair snapshots` says to forget)
    if args.json:
        _emit_json({"dry_run": args.dry_run, "frees_stored_bytes": frees,
                    "decisions": [{"id": d.snapshot_id, "keep": d.keep, "reasons": list(d.reasons),
                                   "time": s.time if (s := plan.listed.get(d.snapshot_id)) else None}
                                  for d in plan.decisions],
                    "rebased": _rebases_json(plan.rebases),
                    "prune": pruned.to_dict() if pruned is not None else None,
                    "prune_error": None if prune_error is None else one_line(prune_error)})
    elif not args.quiet:
        shown = [d for d in plan.decisions if d.reasons or not d.keep]  # by id: the others kept for no rule
        # with their times, a policy's buckets can be checked from the dry run; one that does not load has none
        times, width = _time_column(plan.listed[d.snapshot_id] for d in shown if d.snapshot_id in plan.listed)
        for d in shown:
            print(f"{'keep  ' if d.keep else 'remove'}  {d.snapshot_id[:8]}  "
                  f"{times.get(d.snapshot_id, '(unreadable)'):{width}}  "
                  f"{', '.join(d.reasons)}")
        _print_rebases(plan.rebases)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(removed)} snapshot(s), {'would rebase' if args.dry_run else 'rebased'} {len(plan.rebases)}"
              + (f"; a prune then frees about {format_size(frees)} (data only they need) besides what is unused already"
                 if frees is not None else ""))
        if pruned is not None:
            _report_prune(args, pruned)
    if prune_error is not None:
        raise _after_forget(prune_error, removed)
    return 0


def _after_forget(error: ChunkvaultError, removed: set[str]) -> ChunkvaultError:
    """The prune's error, saying that the forget before it was done: a caller that saw only the error took
    the snapshots for still there, and forgetting them again by id failed (12)."""
    error.args = (f"{error}; the forget was done ({len(removed)} snapshot(s) removed): only the prune failed, "
                  "run it again with `chunkvault prune`",)
    return error


def _rebases_json(rebases: list[RebaseStep]) -> list[dict]:
    return [{"id": r.diff_id, "merged": r.merge_ids, "new_parent": r.new_parent} for r in rebases]


def _print_rebases(rebases: list[RebaseStep]) -> None:
    for r in rebases:
        target = f"onto {r.new_parent[:8]}" if r.new_parent else "as a full snapshot"
        print(f"rebase  {r.diff_id[:8]}  {target}, merging {' '.join(m[:8] for m in r.merge_ids)}")


def cmd_aggregate(args: argparse.Namespace) -> int:
    repo = _open(args)
    done = repo.aggregate(args.snapshot, retire=args.retire, wait=args.wait, dry_run=args.dry_run,
                          hosts=args.host, tags=args.tag, paths=args.path)
    if args.json:
        _emit_json({**_snapshot_json(done.snapshot), "dry_run": done.dry_run, "retired": done.retired,
                    "rebased": _rebases_json(done.rebases), **_names_json("warnings", done.warnings)})
        return 0
    for w in done.warnings:
        warn(w)
    if not args.quiet:
        for sid in done.retired:
            print(f"remove  {sid[:8]}  its former chain")
        _print_rebases(done.rebases)
        short = done.snapshot.short_id
        if done.dry_run:
            print(f"snapshot {short} {'would become' if done.made_full else 'is already'} a full snapshot"
                  + (f"; retiring its former chain would remove {len(done.retired)} snapshot(s) and rebase "
                     f"{len(done.rebases)}" if args.retire else ""))
        else:
            print(f"snapshot {short} {'is now' if done.made_full else 'was already'} a full snapshot"
                  + (f"; retired its former chain: {len(done.retired)} snapshot(s) removed, "
                     f"{len(done.rebases)} rebased" if args.retire else ""))
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    src = _open(args)
    dst = _open_other(args, args.to, passwords.TO)
    bar = _progress(args, "copy", unit="blobs")
    try:
        result = src.copy_to(dst, args.snapshots, progress=bar, hosts=args.host, tags=args.tag, paths=args.path,
                             wait=args.wait, wal=args.wal)
    finally:
        bar.done()
    if args.json:
        _emit_json({"copied": [{"source": a, "destination": b} for a, b in result.copied],
                    "skipped": result.skipped, "failed": [{"source": a, "reason": r} for a, r in result.failed],
                    "other_host": [{"source": a, "destination": b, "host": h} for a, b, h in result.other_host],
                    "blobs_sent": result.blobs_sent, "bytes_sent": result.bytes_sent,
                    **({"wal_copied": result.wal_copied, "wal_skipped": result.wal_skipped,
                        "wal_unneeded": result.wal_unneeded, "wal_failed": [{"name": a, "reason": r} for a, r in result.wal_failed]} if args.wal else {})})
    elif not args.quiet:
        for a, b in result.copied:
            print(f"copied {a[:8]} -> {b[:8]}")
        for a, reason in result.failed:
            print(f"not copied {a[:8]}: {one_line(reason)}", file=sys.stderr)
        for a, reason in result.wal_failed:
            print(f"not copied wal/{a}: {one_line(reason)}", file=sys.stderr)
        print(f"{len(result.copied)} snapshot(s) copied, {len(result.skipped)} already there; "
              + (f"{len(result.wal_copied)} archived WAL file(s) copied, {result.wal_skipped} already there"
                 + (f", {result.wal_unneeded} before its oldest base backup" if result.wal_unneeded else "") + "; "
                 if args.wal else "")
              + f"{result.blobs_sent} blobs ({format_size(result.bytes_sent)}) sent")
    if result.other_host and not args.quiet:
        hosts = sorted({h for _, _, h in result.other_host})
        warn(f"{len(result.other_host)} snapshot(s) already there have another host there ({', '.join(hosts)}): "
             "renamed on one side since they were copied; `rewrite --new-host` them there too, or backups and "
             "retention see their chains apart")
    from .store.copy import CONFLICT_THERE

    if result.failed or result.wal_failed:
        # other content under a name in the destination is no damage in the source: said apart (exit 13 too)
        conflicts = [a for a, r in result.wal_failed if r.startswith(CONFLICT_THERE)]
        damaged = len(result.wal_failed) - len(conflicts)
        what = ", ".join(filter(None, [f"{len(result.failed)} snapshot(s)" if result.failed else "",
                                       f"{damaged} archived WAL file(s)" if damaged else ""]))
        clash = (f"{len(conflicts)} archived WAL file(s) not copied: the destination archived other content under "
                 "the same name (two archives of one name disagree: find which server pushed it there)")
        if not what:
            raise CorruptObject("in the destination repository", clash)
        raise CorruptObject("in the source repository", f"{what} not copied: damaged there (`check` there names "
                                                        "what; the others were copied)"
                            + (f"; {clash}" if conflicts else ""))
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    done = _open(args).unlock(remove_all=args.remove_all)
    if args.json:
        _emit_json(done.to_dict())
        return 0
    if not args.quiet:
        for lock in done.removed:
            print(f"removed {lock.kind} lock of {one_line(lock.describe())}")
        for lock in done.kept:
            print(f"held: {lock.kind} lock of {one_line(lock.describe())}")
        print(f"{len(done.removed)} lock(s) removed, {len(done.kept)} held"
              + ("; --remove-all removes live ones too, once their commands are known to be dead"
                 if done.kept and not args.remove_all else ""))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    done = _confirmed(args, "REPAIR")
    repo = _open(args)
    if args.packs and args.what != "packs":
        raise UsageError("pack ids go with `repair packs` only")
    if args.what == "index":
        report = repo.repair_index(wait=args.wait)
    elif args.what == "packs":
        if not args.packs:
            raise UsageError("repair packs: name the damaged packs (ids or unique prefixes, as `check` reports them)")
        report = repo.repair_packs(args.packs, dry_run=not done, wait=args.wait)
    elif args.what == "wal":
        report = repo.repair_wal(dry_run=not done, wait=args.wait)
    else:
        report = repo.repair_snapshots(dry_run=not done, wait=args.wait)
    # Snapshots beyond repair restore nothing: a script that repairs and goes on must not take it for done.
    code = CorruptObject.exit_code if args.what == "snapshots" and report.unrestorable else 0
    if args.json:
        _emit_json(report.to_dict())
    elif not args.quiet:
        for problem in report.unreadable_packs:
            warn(problem)
        for kept in report.kept_packs:
            warn(f"{kept}: kept the blobs the old index lists for it (`repair packs` salvages those that verify)")
        if args.what == "index":
            print(f"index rebuilt from {report.packs} pack headers ({report.blobs} blobs)")
            if report.baseless_packs:
                print(f"warning: {len(report.baseless_packs)} pack(s) hold deltas whose base is lost: "
                      "`repair packs " + " ".join(p[:12] for p in report.baseless_packs) + " --confirm REPAIR` "
                      "drops them, and the next backup of their data stores it again", file=sys.stderr)
        elif args.what == "packs":
            for p in report.salvaged:
                print(f"{p.pack}: {p.salvaged} blob(s) {'salvaged' if done else 'can be salvaged'}, "
                      f"{len(p.lost)} lost{': ' + one_line(p.problem) if p.problem else ''}")
            lost = any(p.lost for p in report.salvaged)
            print(("packs replaced: `repair snapshots` lists the files that needed a lost blob" if lost
                   else "packs replaced: no blob was lost") if done else
                  "nothing changed: add --confirm REPAIR to copy what verifies and delete these packs")
        elif args.what == "wal":
            for name, why in report.damaged_wal:
                print(f"{'removed' if done else 'would remove'} wal/{name}: {one_line(why)}")
            print(("no archived WAL object is damaged" if not report.damaged_wal else
                   f"removed {len(report.damaged_wal)} object(s): `check` names the gaps their segments leave"
                   if done else "nothing changed: add --confirm REPAIR to remove these objects"))
        else:
            for sid, path in report.dropped:
                print(f"{'dropped' if report.rewritten else 'would drop'} {sid[:8]}:{shown_name(path)}")
            for sid, reason in report.unrestorable:
                print(f"cannot repair {sid[:8]}: {one_line(reason)}")
            for sid in report.newer:
                print(f"not looked at {sid[:8]}: written by a newer chunkvault (upgrade chunkvault to repair it)")
            if report.rewritten:
                print(f"rewrote {len(report.rewritten)} snapshot(s)")
            elif report.dropped:  # dropped, a file stays lost even where the source still has it unchanged
                print("nothing changed: a backup of the same source first stores again the data of the files it "
                      "still holds unchanged, and they are whole again; then add --confirm REPAIR to rewrite these "
                      "snapshots")
            elif not report.unrestorable:
                print("no snapshot references missing data")
            if report.unrestorable:
                print("snapshots beyond repair restore nothing; forget them: chunkvault forget "
                      + " ".join(sid[:8] for sid, _ in report.unrestorable))
    return code


def _setting_changes(words: list[str]) -> dict[str, Any]:
    """``set NAME VALUE [NAME VALUE...]`` as stored names to values, each parsed as init parses its option;
    the chunker and the id are refused, saying why."""
    from .store.config import FIXED_SETTINGS

    if not words[1:] or len(words) % 2 == 0:
        raise UsageError("config set takes NAME VALUE pairs: config set compression 19 pack-size 64M")
    changes: dict[str, Any] = {}
    for name, text in zip(words[1::2], words[2::2]):
        if name.startswith("chunk"):  # chunker, chunk-avg, chunk-min...: init's --chunk-avg
            raise UsageError(FIXED_SETTINGS["chunker"])
        if name in FIXED_SETTINGS:
            raise UsageError(FIXED_SETTINGS[name])
        if name not in _SETTINGS:
            raise UsageError(f"no setting {name!r} (one of {', '.join(_SETTINGS)})")
        stored, parse = _SETTINGS[name]
        if stored in changes:
            raise UsageError(f"{name} is given twice")
        try:
            changes[stored] = parse(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{name}: {exc}") from None
    return changes


def _setting_text(name: str, value: Any) -> str:
    return format_size(value) if name == "pack_size" else str(value)


def cmd_config(args: argparse.Namespace) -> int:
    words = args.words
    if words and words[0] != "set":
        raise UsageError(f"config takes no arguments (show the settings) or set NAME VALUE..., not {words[0]!r}")
    changes = _setting_changes(words) if words else None
    repo = _open(args)
    changed = {} if changes is None else repo.set_settings(wait=args.wait, **changes)
    doc = repo.settings()
    if args.json:
        _emit_json({**doc, **({} if changes is None else
                              {"changed": {n: {"old": old, "new": new} for n, (old, new) in changed.items()}})})
        return 0
    if args.quiet:
        return 0
    if changes is not None:
        names = {stored: name for name, (stored, _) in _SETTINGS.items()}
        for n, (old, new) in changed.items():
            print(f"{names[n]}: {_setting_text(n, old)} -> {_setting_text(n, new)}")
        if not changed:
            print("nothing changed: the settings already have these values")
        return 0
    st, chunker = doc["settings"], doc["settings"]["chunker"]
    rows = [("id", doc["id"]), ("format", doc["format"]), ("created", doc["created"]),
            ("chunker", f"min {format_size(chunker['min_size'])}, avg {format_size(chunker['avg_size'])}, "
                        f"max {format_size(chunker['max_size'])} (fixed)"),
            *((name, _setting_text(stored, st[stored])) for name, (stored, _) in _SETTINGS.items()),
            *((f"extra.{k}", json.dumps(v)) for k, v in sorted(st.get("extra", {}).items()))]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_key(args: argparse.Namespace) -> int:
    if args.key_cmd == "import":
        return _key_import(args)
    if args.key_cmd == "export" and args.file in (None, "-") and getattr(sys.stdout, "buffer", None) is None:
        # started with stdout closed (>&-): the export would reach no one (as dump and cat blob, refused)
        raise TargetUnwritable("key export: standard output is closed: redirect it to a file or a pipe")
    repo = _open(args)
    if args.key_cmd == "export":
        _key_export(args, repo.export_key())
    elif args.key_cmd == "list":
        keys = repo.keys()
        if args.json:
            _emit_json(keys)
        else:
            from .store.repository import short_key_names

            shown = short_key_names(k["id"] for k in keys)
            width = max(map(len, shown.values()), default=0)
            for k in keys:  # a key file's fields are not sealed: anyone who can write the storage chooses them
                name = shown[k["id"]]
                print(one_line(f"{'*' if k['current'] else ' '} {name:{width}}  {k['kdf']:8}  " + (
                    k["problem"] + (f" (`key remove {name}`)" if k["kdf"] != "newer" else "")
                    if "problem" in k else
                    f"{k['created'][:19]}  {k['user']}@{k['host']}")))
    elif args.key_cmd == "add":
        name = _with_new_key(args, True, lambda password: repo.add_key(password, kdf_seconds=args.kdf_time))
        added = repo.store.key_found is None
        _report_key(args, {"id": name, "added": added}, f"added key {name[:12]}" if added else
                    f"key {name[:12]} opens with this password already: nothing added (`key passwd` changes it)")
    elif args.key_cmd == "remove":
        removed = repo.remove_key(args.key_id, wait=args.wait)
        _report_key(args, {"removed": removed}, f"removed key {removed[:12]}")
    elif args.key_cmd == "passwd":
        name, old = _with_new_key(args, True, lambda password: repo.change_password(
            password, kdf_seconds=args.kdf_time, wait=args.wait), kept=lambda: repo.store.key_left is not None)
        _report_key(args, {"id": name, "removed": old}, f"password changed (key {old[:12]} replaced by {name[:12]})")
    return 0


def _key_export(args: argparse.Namespace, data: bytes) -> None:
    """The export on standard output, or in a file written whole or not at all (mode 0600)."""
    if args.file in (None, "-"):
        with _stdout_errors("key export"):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return
    path = os.path.abspath(args.file)
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isfile(path):
            raise UsageError(f"{path} exists and is not a regular file (a link, a directory): name another file")
        if not args.force:
            raise UsageError(f"{path} exists (remove it, or ask to overwrite it: --force)")
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.urandom(6).hex()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:  # a write of part of it (a file size limit, a disk filling) is no error: the next one is
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise output_error(f"writing the key export {path}", exc) from None
    _report_key(args, _name_json("file", path), f"key exported to {path}: keep it away from the repository; "
                                                "`key import` puts the repository's key and config back from it")


KEY_EXPORT_LIMIT = 1 << 20  # read of a key export, which a few KiB hold: more is no key export


def _key_import(args: argparse.Namespace) -> int:
    from .repository import Repository

    url = _repo_url(args)
    what = "standard input" if args.file == "-" else args.file
    try:
        if args.file == "-":
            if sys.stdin is None:  # started with it closed (<&-)
                raise UsageError("cannot read the key export standard input: it is closed")
            data = sys.stdin.buffer.read(KEY_EXPORT_LIMIT)  # all of it was read from /dev/zero, memory running out
        else:
            with open(args.file, "rb") as f:
                data = f.read(KEY_EXPORT_LIMIT)
    except OSError as exc:
        raise UsageError(f"cannot read the key export {what}: {exc.strerror}") from None
    result = Repository.import_key(url, data, passwords.REPOSITORY.get(args), what=what, wait=args.wait,
                                   **remote_options(args, url))
    if result.note and not args.quiet:
        warn(result.note)
    _report_key(args, {"id": result.key, "restored": result.restored, "note": result.note},
                f"put back {', '.join(result.restored)}" if result.restored else
                f"nothing to put back: key {result.key[:12]} and the config are whole")
    return 0


def _report_key(args: argparse.Namespace, obj: dict[str, Any], line: str) -> None:
    """A key command's outcome: one JSON object with --json, else one line (none with --quiet)."""
    if args.json:
        _emit_json(obj)
    elif not args.quiet:
        print(one_line(line))  # it may name a file given on the command line


LIST_TYPES = ("snapshots", "index", "packs", "keys", "locks", "blobs")
CAT_TYPES = ("config", "snapshot", "index", "key", "lock", "pack", "blob", "manifest")


class _Types(tuple):
    """The types ``list`` and ``cat`` take, as choices that shell completion offers; argparse lets any word
    through, so that the command's own check names the known ones (and answers restic's ``masterkey``)."""

    def __contains__(self, item: object) -> bool:
        return True


def _connect(args: argparse.Namespace) -> Any:
    """The repository's storage alone, for what needs no key (names, key files, locks): no password is
    asked for and no lock written.  A location without a repository is said as for every command."""
    from .store.unlock import read_config

    remote = _remote(args)[0]
    args.held.callback(remote.close)
    read_config(remote)
    return remote


def cmd_list(args: argparse.Namespace) -> int:
    from .store.objects import LIST_KINDS, PUBLIC_LIST_KINDS, check_kind, object_names

    kind = check_kind(args.type, LIST_KINDS, "list")
    if kind in PUBLIC_LIST_KINDS:
        names: Iterable[Any] = object_names(_connect(args), kind)
    else:
        args.read_lock = "list"
        names = _open(args).list_objects(kind)
    if args.json:
        _emit_json_array(n if isinstance(n, str) else n.to_dict() for n in names)
        return 0
    if kind != "blobs":
        _write_batched(f"{one_line(n)}\n" for n in names)
        return 0
    _write_batched(f"{b.kind} {b.id} {b.pack} {b.offset} {b.length} {b.raw_length}"
                   f"{' ' + b.base if b.base else ''}\n" for b in names)
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    from .store.objects import PUBLIC_CAT_KINDS, check_kind, public_object

    kind = check_kind(args.type, CAT_TYPES, "cat")
    if args.raw and kind != "blob":
        raise UsageError("--raw goes with cat blob: its payload as stored")
    if kind == "config" and args.id is not None:
        raise UsageError("cat config takes no ID: a repository has one config")
    if kind != "config" and args.id is None:
        raise UsageError(f"cat {kind} takes an ID (or a unique prefix of one)")
    if kind in PUBLIC_CAT_KINDS:
        _emit_json(public_object(_connect(args), kind, args.id))
        return 0
    args.read_lock = "cat"
    repo = _open(args)
    if kind == "manifest":
        _emit_json_array(_record_json(r) for r in repo.manifest(args.id))
    elif kind == "blob":
        out = getattr(sys.stdout, "buffer", None)
        if out is None:
            raise TargetUnwritable("cat blob: standard output is closed: redirect it to a file or a pipe")
        data = repo.cat("blob", args.id, raw=args.raw)
        try:
            with _stdout_errors("blob"):
                _DataOut(out).write(data)
                out.flush()
        except BrokenPipeError:
            raise OutputClosed("cat blob: the reader of standard output closed it before it had the whole blob") \
                from None
    else:
        doc = repo.cat(kind, args.id)
        if kind == "snapshot":  # a path that is not UTF-8 with its bytes, as `snapshots --json` gives it
            doc.update(_names_json("paths", doc["paths"]), stats=_stats_json(doc["stats"]))
        _emit_json(doc)
    return 0


_OPS = {OP_ENTRY: "entry", OP_FRESH: "fresh", OP_DELETE: "delete"}


def _record_json(r: Record) -> dict[str, Any]:
    """A manifest record as stored: its op, and for an entry its fields with every chunk id."""
    if r.entry is None:
        return {"op": _OPS.get(r.op, str(r.op)), **_name_json("path", r.path)}
    return {"op": _OPS.get(r.op, str(r.op)), **_entry_json(r.entry),
            "chunk_ids": [c.hex() for c in r.entry.chunk_ids()]}


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import mount

    def mounted() -> None:
        if args.json:
            _emit_json({**_name_json("mountpoint", os.path.abspath(args.mountpoint)), "mounted": True})
            sys.stdout.flush()
        elif not args.quiet:
            print(one_line(f"snapshots mounted at {args.mountpoint}: browse snapshots/, ids/, hosts/, tags/; "
                           f"unmount with `fusermount -u {args.mountpoint}` or Ctrl-C"), file=sys.stderr, flush=True)

    mount(_open(args), args.mountpoint, allow_other=args.allow_other, wait=args.wait, on_mounted=mounted,
          numeric_owner=args.numeric_owner)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .remotes import server

    return server.main(args.serve_args)


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import bash_script, commands
    from .remotes import server

    root = commands(build_parser())
    root.subcommands["serve"] = commands(server._parser())  # it parses its own arguments
    sys.stdout.write(bash_script(root))
    return 0


# --- parser -------------------------------------------------------------------------------


def _reading_options(more_wait: str) -> argparse.ArgumentParser:
    """The options of a command that holds the shared lock while it reads: ``more_wait`` adds to what its
    ``--wait`` waits for (a restore's, for another restore writing into its target, ``target_wait``)."""
    reading = _Parser(add_help=False)
    reading.add_argument("--no-lock", action="store_true",
                         help="read without the shared lock (e.g. a read-only remote); a prune running "
                              "meanwhile can make the read fail")
    reading.add_argument("--wait", type=_seconds, default=3600.0, metavar="SECONDS", action=_Given,
                         help=f"wait this long for a running prune, forget or repair (default 3600){more_wait}")
    return reading


def _wait_option(parser: argparse.ArgumentParser, default: float, what: str) -> None:
    """``--wait SECONDS`` of a command that takes the exclusive lock: how long it waits for ``what``."""
    parser.add_argument("--wait", type=_seconds, default=default, metavar="SECONDS",
                        help=f"wait this long for {what} to end (default {default:g})")


def _size(text: str) -> int:
    from .units import parse_size

    try:
        return parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> int:
    """Bytes per second from KiB per second (restic's unit), or a size with a unit (``2M``: 2 MiB/s)."""
    t = text.strip().removesuffix("/s")
    try:
        n = _size(t) if t[-1:].isalpha() else int(float(t) * 1024)
    except (ValueError, OverflowError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (KiB per second, e.g. 512, or 2M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a rate must be positive: {text!r}")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return n


def _argument(check: Callable[[Any], None], convert: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type: ``convert``, then ``check`` (a UsageError of either is the option's error)."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
            check(value)
        except (UsageError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, UsageError) else f"not a number: {text!r}")
        return value

    return parse


def _check_chunk_avg(avg: int) -> None:
    from .chunker import ChunkerParams

    try:
        ChunkerParams(avg // 4, avg, avg * 8)
    except ValueError:
        raise UsageError(f"not a usable average chunk size: {avg} (a power of two from {CHUNK_AVG_MIN} "
                         f"to {CHUNK_AVG_MAX >> 20}M, e.g. 256K or 1M)") from None


def _check_compression(level: int) -> None:
    from .store.config import MAX_COMPRESSION_LEVEL

    if not 0 <= level <= MAX_COMPRESSION_LEVEL:
        raise UsageError(f"not a zstd level: {level} (0 = off, 1 to {MAX_COMPRESSION_LEVEL})")


def _check_strip_count(n: int) -> None:
    if n < 0:
        raise UsageError(f"must be 0 or more: {n}")


def _check_not_negative(value: float) -> None:
    if not 0 <= value < float("inf"):
        raise UsageError(f"must be a finite number, 0 or more: {value}")


def _seconds(text: str) -> float:
    return _argument(_check_not_negative, float)(text)


def _check_above_zero(value: float) -> None:
    if not 0 < value < 1e9:
        raise UsageError(f"a number of seconds above 0, not {value:g}")


# The --chunk-avg values init accepts: min = avg/4 and max = avg*8 must fit the chunker's bounds too.
CHUNK_AVG_MIN = 256
CHUNK_AVG_MAX = 8 << 20

#: The settings ``config set`` changes, by the names of init's options: their stored names, and the parsers
#: init's options use (the store checks the values again, as for init).
_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "compression": ("compression_level", _argument(_check_compression, int)),
    "pack-size": ("pack_size", _size),
    "full-every": ("full_every", _argument(_check_not_negative, int)),
    "max-diff-share": ("max_diff_share", _share),
}


class _Ignored:
    """A subcommand's parser that is not built: it takes every call and keeps nothing."""

    def __getattr__(self, name: str) -> Callable[..., "_Ignored"]:
        return lambda *args, **kwargs: self


class _OnlyCommand:
    """The subcommands, of which only ``only`` gets a parser (``None``: every one): parsing a command line
    needs its command's parser alone, and building all of them cost every command 25 ms."""

    def __init__(self, sub: Any, only: str | None):
        self.sub = sub
        self.only = only
        self.choices = sub.choices

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.only is not None and name != self.only:
            return _Ignored()
        return self.sub.add_parser(name, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser; with ``only``, one with that subcommand's parser alone (when there is no
    such command, the parser has no subcommand at all: ``parse_args`` then falls back to the whole one)."""
    from .chunker import FIXED_CHUNK_SIZE

    common = _Parser(add_help=False)
    common.add_argument("-r", "--repo", help="repository URL (or CHUNKVAULT_REPOSITORY)")
    common.add_argument("-o", "--option", action="append", metavar="SCHEME.NAME=VALUE",
                        help="remote option, repeatable: s3.region=R, s3.addressing-style=path, "
                             "sftp.accept-new-host-key=yes, sftp.key-file=F, sftp.transport=paramiko, http.token-file=F, http.ca-file=F, "
                             "file.direct-io=no, s3.read-timeout=S, http.connect-timeout=S (README: Remote URLs)")
    common.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")
    common.add_argument("--s3-storage-class", metavar="CLASS",
                        help="storage class of data packs, e.g. STANDARD_IA (metadata stays STANDARD)")
    common.add_argument("--limit-upload", type=_rate, metavar="KiB/s",
                        help="hold uploads to this rate (KiB per second, or with a unit: 2M, 500K per second)")
    common.add_argument("--limit-download", type=_rate, metavar="KiB/s", help="hold downloads to this rate")
    passwords.REPOSITORY.add_options(common, "the repository password")
    common.add_argument("--cache-dir", metavar="DIR",
                        help="the local cache of index, snapshot and wal objects (or CHUNKVAULT_CACHE_DIR; default "
                             "$XDG_CACHE_HOME/chunkvault)")
    common.add_argument("--no-cache", action="store_true",
                        help="keep nothing locally: read every object from the repository (or CHUNKVAULT_NO_CACHE=1)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    common.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    common.add_argument("--progress", choices=("auto", "json", "none"), default="auto",
                        help="progress of backup, restore, check, copy and prune: a status line on a terminal "
                             "(auto), JSON lines on stderr about once a second and at the end (json), or none")

    p = _Parser(prog="chunkvault", description="Encrypted, deduplicating backups with full and differential snapshots.")
    p.add_argument("--version", action="version", version=version_line())
    sub = _OnlyCommand(p.add_subparsers(dest="command", required=True, parser_class=_Parser), only)

    s = sub.add_parser("init", parents=[common], help="create a repository")
    s.add_argument("--kdf-time", type=_seconds, default=0.5, metavar="SECONDS", help=KDF_TIME_HELP)
    s.add_argument("--generate-secret", metavar="FILE", help=GENERATE_SECRET_HELP)
    s.add_argument("--chunk-avg", type=_argument(_check_chunk_avg, _size), metavar="SIZE",
                   help=f"average chunk size, a power of two from {CHUNK_AVG_MIN} to {CHUNK_AVG_MAX >> 20}M "
                        "(min = avg/4, max = avg*8; default 256K)")
    s.add_argument("--compression", type=_SETTINGS["compression"][1], default=3, metavar="LEVEL",
                   help="zstd level 1 to 22, 0 = off (default 3)")
    s.add_argument("--pack-size", type=_SETTINGS["pack-size"][1], default=None, help="target pack size (default 16 MiB)")
    s.add_argument("--full-every", type=_SETTINGS["full-every"][1], default=None, metavar="N",
                   help="--type auto: a full after this many differentials (default 23)")
    s.add_argument("--copy-chunker-params-from", metavar="URL",
                   help="use another repository's chunker parameters and secret, so copies between them dedup")
    passwords.FROM.add_options(s, "that repository's password")
    s.add_argument("--max-diff-share", type=_SETTINGS["max-diff-share"][1], default=None, metavar="SHARE",
                   help="--type auto: a full once a chain's differentials added this share of the full's size "
                        "(0 to 1 or a percentage; default 0.5)")
    s.set_defaults(func=cmd_init)

    exclusion = _Parser(add_help=False)
    for i in ("", "i"):
        case = " (ignoring case)" if i else ""
        exclusion.add_argument(f"--{i}exclude", action=_InOrder, order=f"{i}exclude_order", default=[],
                               metavar="GLOB", help=f"leave out paths (below the root) or names matching GLOB{case}, "
                                                    f"with their subtrees; in order, !GLOB takes back what an "
                                                    f"earlier --{i}exclude left out")
        exclusion.add_argument(f"--{i}exclude-file", action=_InOrder, order=f"{i}exclude_order", kind="file",
                               default=[], metavar="FILE", help=f"--{i}exclude each line of FILE, in its place (blank "
                                                                "lines and lines starting with # skipped)")

    s = sub.add_parser("backup", parents=[common, exclusion], help="back up files and directories")
    s.add_argument("paths", nargs="*",
                   help="what to back up (with --stdin-from-command: -- the command and its arguments)")
    s.add_argument("--files-from", action="append", default=[], metavar="FILE",
                   help="back up the paths listed in FILE, one a line, trimmed of spaces at either end (# comments, "
                        "blank lines skipped; - is stdin)")
    s.add_argument("--files-from-raw", action="append", default=[], metavar="FILE",
                   help="likewise, NUL-separated and taken as they are (find -print0)")
    _wait_option(s, 3600.0, "a running prune, forget or repair")
    s.add_argument("--type", choices=["auto", "full", "diff"], default="auto",
                   help="full, differential, or (auto, the default) a full when the chain is long (init --full-every, "
                        "--max-diff-share)")
    s.add_argument("--tag", action="append", default=[], metavar="TAG[,TAG...]",
                   help="tag the snapshot (repeatable; commas separate tags)")
    s.add_argument("--host", help="record this host name (default: CHUNKVAULT_HOST, else this machine's)")
    s.add_argument("--exclude-if-present", action="append", default=[], metavar="NAME[:HEADER]",
                   help="of a directory holding a file NAME (starting with HEADER), keep only that file")
    s.add_argument("--exclude-caches", action="store_true",
                   help="likewise for CACHEDIR.TAG files (the cache directory tagging standard)")
    s.add_argument("--exclude-larger-than", type=_size, metavar="SIZE",
                   help="leave out regular files larger than SIZE (e.g. 2G; bytes without a unit)")
    s.add_argument("-x", "--one-file-system", action="store_true",
                   help="do not list directories on other file systems than their source (mount points stay, empty)")
    s.add_argument("--dry-run", "-n", action="store_true",
                   help="read and count what a backup would store; write nothing to the repository")
    s.add_argument("--list", action="store_true",
                   help="print a line per entry stored as new or changed (A, M) or gone since the parent (D), as "
                        "the backup goes; with --dry-run also each path an exclusion rule leaves out (x)")
    s.add_argument("--list-all", action="store_true", help="as --list, and the unchanged entries too (U)")
    s.add_argument("--parent", metavar="SNAPSHOT",
                   help="compare with (and build a differential on) this snapshot instead of the newest of the "
                        "same host and paths")
    s.add_argument("--time", metavar="TIME",
                   help="the snapshot's time instead of now (ISO 8601, local unless it names a zone; 1970-01-02 to "
                        "5 minutes ahead): when the data was taken, e.g. a file system snapshot's time; the default "
                        "parent is then the newest snapshot at or before it")
    s.add_argument("--force", action="store_true",
                   help="read every file, even those whose size, times and inode say unchanged")
    s.add_argument("--ignore-inode", action="store_true",
                   help="a file is unchanged though its inode and device numbers differ (file system snapshots "
                        "and network file systems mounted anew for each backup)")
    s.add_argument("--ignore-ctime", action="store_true",
                   help="likewise though its change time differs (a change of a file's extended attributes "
                        "alone, or of its content with the mtime set back, then goes unseen)")
    s.add_argument("--no-xattrs", action="store_true",
                   help="record no extended attributes (ACLs, file capabilities, SELinux labels, user.*)")
    s.add_argument("--skip-if-unchanged", action="store_true",
                   help="save no snapshot when nothing changed since the parent (nor a full that --type auto "
                        "made due; one asked for with --type full is saved)")
    s.add_argument("--stdin", action="store_true", help="back up standard input")
    s.add_argument("--stdin-from-command", action="store_true",
                   help="back up the standard output of the command given after the options (-- pg_dump app); "
                        "the snapshot is saved only if it exits with status 0")
    s.add_argument("--stdin-name", help="file name for --stdin or --stdin-from-command")
    s.add_argument("--no-delta", action="store_true", help="never store changed chunks as deltas")
    s.add_argument("--no-delta-path", action="append", default=[], metavar="GLOB",
                   help="paths whose chunks are never stored as deltas")
    s.add_argument("--fixed-chunks", action="append", default=[], metavar="GLOB",
                   help="cut files matching GLOB at fixed offsets, not by content (database files updated in place)")
    s.add_argument("--fixed-chunk-size", type=_size, default=FIXED_CHUNK_SIZE, metavar="SIZE",
                   help=f"chunk size for --fixed-chunks (default {FIXED_CHUNK_SIZE >> 20} MiB)")
    s.add_argument("--compression", type=_argument(_check_compression, int), metavar="LEVEL",
                   help="zstd level of this backup's new data, 1 to 22, 0 = off (default: the repository's, "
                        "set at init)")
    s.add_argument("--postgres", action="store_true",
                   help="the path is a running PostgreSQL cluster's data directory: read it in place inside "
                        "pg_backup_start/stop, with backup_label and the WAL it needs (psql reaches the server)")
    s.add_argument("--pg-connect", metavar="CONNINFO",
                   help="with --postgres: psql's connection string or database name (default: the PG* variables)")
    s.add_argument("--pg-checkpoint", choices=("fast", "spread"),
                   help="with --postgres: the checkpoint the backup starts with, as pg_basebackup -c (default fast: "
                        "at once; spread waits for it at the server's checkpoint pace)")
    s.add_argument("--pg-standby-wait", type=_argument(_check_above_zero, float), metavar="SECONDS",
                   help="with --postgres on a standby: how long it may take to stream from its primary at the "
                        "start and to replay what it received at the stop before the backup fails (default 60)")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("import-tar", parents=[common],
                       help="back up the tree a tar archive holds (plain, gzip, bzip2, xz or zstd; - is stdin)")
    s.add_argument("file", metavar="FILE", help="the tar archive, or - to read it from standard input")
    s.add_argument("--path", required=True,
                   help="the absolute path the tree is a backup of (with the host, what finds the parent: "
                        "the same as a backup of that directory)")
    s.add_argument("--strip-components", type=_argument(_check_strip_count, int), default=0, metavar="N",
                   help="leave out N leading components of each member's name, as tar -x does")
    _wait_option(s, 3600.0, "a running prune, forget or repair")
    s.add_argument("--type", choices=["auto", "full", "diff"], default="auto",
                   help="full, differential, or (auto, the default) as backup chooses")
    s.add_argument("--tag", action="append", default=[], metavar="TAG[,TAG...]",
                   help="tag the snapshot (repeatable; commas separate tags)")
    s.add_argument("--host", help="record this host name (default: CHUNKVAULT_HOST, else this machine's)")
    s.add_argument("--parent", metavar="SNAPSHOT",
                   help="compare with (and build a differential on) this snapshot instead of the newest of the "
                        "same host and path")
    s.add_argument("--time", metavar="TIME", help="the snapshot's time instead of now, as for backup")
    s.add_argument("--dry-run", "-n", action="store_true",
                   help="read and count what the import would store; write nothing to the repository")
    s.add_argument("--no-delta", action="store_true", help="never store changed chunks as deltas")
    s.add_argument("--fixed-chunks", action="append", default=[], metavar="GLOB",
                   help="cut files matching GLOB at fixed offsets, not by content (database files)")
    s.add_argument("--fixed-chunk-size", type=_size, default=FIXED_CHUNK_SIZE, metavar="SIZE",
                   help=f"chunk size for --fixed-chunks (default {FIXED_CHUNK_SIZE >> 20} MiB)")
    s.add_argument("--compression", type=_argument(_check_compression, int), metavar="LEVEL",
                   help="zstd level of the new data, 1 to 22, 0 = off (default: the repository's)")
    s.set_defaults(func=cmd_import_tar)

    reading = _reading_options("")  # commands that read data hold a shared lock (store/locks.py)
    restoring = _reading_options("; given, also for another restore writing into the target, which is "
                                 "otherwise refused at once")

    select = _Parser(add_help=False)
    select.add_argument("--host", action="append", default=[], help="only snapshots of this host (repeatable)")
    select.add_argument("--tag", action="append", default=[], metavar="TAG[,TAG...]",
                        help="only snapshots having all these tags (repeatable: any of the groups)")
    select.add_argument("--path", action="append", default=[],
                        help="only snapshots of this backed-up path (repeatable: all of them)")

    s = sub.add_parser("snapshots", parents=[common, select], help="list snapshots")
    s.add_argument("--latest", type=_positive_int, metavar="N", help="only the N newest of each group")
    s.add_argument("--group-by", default="host,paths", metavar="host,paths,tags",
                   help="the groups --latest counts in (default host,paths)")
    s.set_defaults(func=cmd_snapshots)

    s = sub.add_parser("tag", parents=[common, select], help="add, remove or set the tags of snapshots")
    s.add_argument("snapshots", nargs="*", help="these snapshots (default: all the filters select)")
    s.add_argument("--add", action="append", default=[], metavar="TAG[,TAG...]", help="add these tags")
    s.add_argument("--remove", action="append", default=[], metavar="TAG[,TAG...]", help="remove these tags")
    s.add_argument("--set", action="append", default=[], metavar="TAG[,TAG...]", help="replace the tags")
    _wait_option(s, 3600.0, "running backups and reads")
    s.set_defaults(func=cmd_tag)

    s = sub.add_parser("rewrite", parents=[common, select, exclusion],
                       help="remove paths from existing snapshots (same ids, chains kept; prune then frees them), "
                            "or give them a new host")
    s.add_argument("snapshots", nargs="*", help="only these snapshots (default: all the filters select)")
    s.add_argument("--new-host", metavar="NAME",
                   help="give the selected snapshots this host (a renamed machine: its backups then build on "
                        "them); whole chains only, not with --exclude")
    s.add_argument("--confirm", metavar="REWRITE", help="type REWRITE to change the snapshots (else a dry run)")
    _wait_option(s, 3600.0, "running backups and reads")
    s.set_defaults(func=cmd_rewrite)

    s = sub.add_parser("stats", parents=[common, reading, select],
                       help="what the repository holds: snapshots, distinct data, deltas, packs, ratios; or what "
                            "some snapshots take and what only they need")
    s.add_argument("snapshots", nargs="*", metavar="SNAPSHOT",
                   help="these snapshots (id, prefix or latest; with the filters, or the filters alone): their "
                        "restore size, the data restoring them reads, and what no other snapshot needs")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("find", parents=[common, reading, select],
                       help="find files by glob in every snapshot: each version, and the snapshots holding it")
    s.add_argument("patterns", nargs="+", metavar="PATTERN",
                   help="glob matched against the path below a snapshot's root, or against the name")
    s.add_argument("--snapshot", "-s", action="append", default=[], metavar="ID",
                   help="only in this snapshot (repeatable; default: all)")
    s.add_argument("--ignore-case", "-i", action="store_true", help="match the patterns ignoring case")
    s.set_defaults(func=cmd_find, read_lock="find")

    s = sub.add_parser("restore", parents=[common, restoring], help="restore a snapshot into a directory")
    s.add_argument("snapshot", nargs="?", default="latest",
                   help="id, unique prefix, or latest; SNAPSHOT:PATH restores that directory's contents (or that "
                        "file) as the target's root")
    s.add_argument("--target", "-t", required=True, help="the directory to restore into (made if missing)")
    add_snapshot_choice(s)
    s.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="restore only paths (or names) matching GLOB, with their subtrees (repeatable)")
    s.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out paths (or names) matching GLOB, with their subtrees (repeatable; in order, "
                        "!GLOB takes back what an earlier --exclude left out)")
    s.add_argument("--iexclude", action="append", default=[], metavar="GLOB",
                   help="likewise, ignoring case")
    s.add_argument("--confirm", metavar="RESTORE", help="confirm overwriting a non-empty target in place")
    s.add_argument("--delta", action="store_true",
                   help="in place: rewrite only files and chunk ranges whose content differs (by digest)")
    s.add_argument("--delete", action="store_true", help="in place: remove files the snapshot does not have")
    s.add_argument("--overwrite", choices=OVERWRITE_MODES, default="always",
                   help="in place, what the target has: always replaced (default); if-changed (as --delta, a file "
                        "of the snapshot's size and mtime taken as right unread); if-newer (replaced where the "
                        "snapshot's mtime is newer); never (only what the target lacks is written; needs no "
                        "--confirm)")
    s.add_argument("--processes", type=_positive_int, metavar="N",
                   help="worker processes writing an empty target on local storage (default: one per core, "
                        "at most 4; up to 64)")
    s.add_argument("--verify", action="store_true",
                   help="then read every restored file back and compare it with the snapshot (exit 18 if any differs)")
    s.add_argument("--no-xattrs", action="store_true", help="set no extended attributes")
    s.add_argument("--numeric-owner", action="store_true",
                   help="as root, set owners by their recorded ids, not by the user and group names the "
                        "backup recorded")
    s.add_argument("--pg-recover", metavar="TARGET",
                   help="then set the restored PostgreSQL data directory up to recover from this repository's "
                        "WAL archive: end (all of it), immediate, time=TIME, lsn=LSN, xid=XID, name=POINT, or "
                        "standby")
    s.add_argument("--pg-target-action", choices=("pause", "promote", "shutdown"),
                   help="what the server does at the target (default PostgreSQL's: pause)")
    s.add_argument("--pg-restore-command", metavar="COMMAND",
                   help="the restore_command to write instead of chunkvault's archive-get")
    s.add_argument("--pg-spool", metavar="DIR", help="the --spool of the archive-get written")
    s.add_argument("--pg-tablespace", action="append", default=[], metavar="OID_OR_NAME=DIR",
                   help="of a backup --postgres snapshot: restore this tablespace into DIR (empty, or in place with "
                        "the target) and make pg_tblspc/OID a link to it (repeatable; default: inside the target)")
    s.set_defaults(func=cmd_restore, read_lock="restore")

    s = sub.add_parser("ls", parents=[common, reading], help="list a snapshot's entries")
    s.add_argument("snapshot", nargs="?", default="latest",
                   help="id, unique prefix, or latest (the default; with a PATH, name it: ls latest PATH); "
                        "SNAPSHOT:PATH lists that path as the root, as restore SNAPSHOT:PATH writes it")
    s.add_argument("path", nargs="?")
    s.add_argument("--no-recursive", action="store_true",
                   help="the path (the root when none) and, a directory, only the entries directly in it, not "
                        "its whole subtree")
    add_snapshot_choice(s)
    s.set_defaults(func=cmd_ls, read_lock="ls")

    s = sub.add_parser("diff", parents=[common, reading], help="what changed between two snapshots",
                       description="What changed between two snapshots; --until, --host and --path apply to both "
                                   "(latest latest --until T compares a snapshot with itself: name the older by id); "
                                   "SNAPSHOT:PATH compares that path of it, as the root")
    s.add_argument("snap1")
    s.add_argument("snap2")
    add_snapshot_choice(s)
    s.set_defaults(func=cmd_diff, read_lock="diff")

    s = sub.add_parser("dump", parents=[common, reading],
                       help="write one file of a snapshot, or a directory as a tar or zip archive, to stdout")
    s.add_argument("snapshot", nargs="?", default="latest",
                   help="id, unique prefix, or latest (the default); SNAPSHOT:PATH takes that path as the root: "
                        "the PATH that follows, and an archive's names, are relative to it")
    s.add_argument("path", help="a file, or a directory (/ for the whole snapshot, or all of SNAPSHOT:PATH)")
    s.add_argument("--archive", choices=["tar", "zip"], default="tar", help="a directory's format (default tar)")
    add_snapshot_choice(s)
    s.set_defaults(func=cmd_dump, read_lock="dump")

    s = sub.add_parser("forget", parents=[common, select], help="remove snapshots by id or retention policy")
    s.add_argument("snapshots", nargs="*", help="snapshot ids or prefixes to remove")
    for name in RETENTION_FLAGS:
        flag = "--" + name.replace("_", "-")
        if "within" in name:
            s.add_argument(flag, metavar="DURATION", help="e.g. 30d, 2w, 1y6m, 12h")
        else:
            period = name.removeprefix("keep_")
            s.add_argument(flag, type=int, metavar="N",
                           help=("keep the last N snapshots" if period == "last" else
                                 "keep the newest N full snapshots" if period == "full" else
                                 "keep the newest N differential snapshots" if period == "diff" else
                                 f"keep the newest snapshot of each of the last N "
                                 f"{period.removesuffix('ly').replace('dai', 'day')}s") + " (-1: all)")
    s.add_argument("--keep-tag", action="append", default=[], metavar="TAGS", help="keep snapshots with these tags (a,b)")
    s.add_argument("--group-by", metavar="host,paths,tags", help="group snapshots before applying rules")
    s.add_argument("--preset", help="a named retention preset from --config")
    s.add_argument("--config", help="TOML file with [presets.NAME] tables")
    s.add_argument("--dry-run", "-n", action="store_true", help="show what would happen; change nothing")
    s.add_argument("--unsafe-allow-remove-all", action="store_true",
                   help="let a retention policy remove every snapshot of a group (refused otherwise)")
    s.add_argument("--prune", action="store_true", help="prune afterwards")
    _prune_options(s)
    _wait_option(s, 0.0, "running backups and reads")
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("prune", parents=[common], help="delete data no snapshot needs, compact packs and index")
    s.add_argument("--dry-run", "-n", action="store_true", help="report what would be removed and freed")
    _prune_options(s)
    _wait_option(s, 0.0, "running backups and reads")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("aggregate", parents=[common, select],
                       help="turn a differential into a synthetic full snapshot")
    s.add_argument("snapshot", help="an id or prefix, or latest (of the snapshots --host, --tag, --path select)")
    s.add_argument("--retire", action="store_true", help="forget the chain it replaces")
    s.add_argument("--dry-run", "-n", action="store_true", help="show what it would do; change nothing")
    _wait_option(s, 0.0, "running backups and reads")
    s.set_defaults(func=cmd_aggregate)

    s = sub.add_parser("copy", parents=[common, reading, select], help="copy snapshots to another repository")
    s.add_argument("snapshots", nargs="*", help="snapshots to copy (default: all)")
    s.add_argument("--to", required=True, metavar="URL", help="destination repository")
    s.add_argument("--wal", action="store_true",
                   help="also the archived WAL files (archive-push) the destination lacks, by name")
    passwords.TO.add_options(s, "the destination's password")
    s.set_defaults(func=cmd_copy, read_lock="copy")

    s = sub.add_parser("archive-push", parents=[common],
                       help="archive a PostgreSQL WAL file (archive_command = 'chunkvault archive-push %%p')")
    s.add_argument("path", help="the file PostgreSQL archives (%%p): a segment, .partial, .backup or .history file")
    s.add_argument("--host", help="the host recorded (default: CHUNKVAULT_HOST, else this machine's name)")
    s.add_argument("--wait", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="wait this long for a running prune, forget or repair (default 3600)")
    s.add_argument("--spool", metavar="DIR",
                   help="also push the files PostgreSQL has ready next, in the same process, leaving a marker "
                        "in DIR for each that answers PostgreSQL's call for it at once")
    s.add_argument("--batch", type=_positive_int, metavar="N",
                   help=f"with --spool: at most N files in one process (default {BATCH_DEFAULT})")
    s.set_defaults(func=cmd_archive_push)

    s = sub.add_parser("archive-get", parents=[common, reading],
                       help="restore an archived WAL file (restore_command = 'chunkvault archive-get %%f \"%%p\"')")
    s.add_argument("name", help="the archived file's name (%%f)")
    s.add_argument("dest", help="where to write it (%%p), atomically")
    s.add_argument("--spool", metavar="DIR",
                   help="also fetch the segments a recovery asks for next into DIR, and take a file from there "
                        "when it was fetched ahead")
    s.add_argument("--prefetch", type=_positive_int, metavar="N",
                   help=f"with --spool: the segments fetched ahead (default {BATCH_DEFAULT})")
    s.add_argument("--fatal-errors", action="store_true",
                   help=f"exit {FATAL_EXIT} on any failure but a name not archived (a repository out of reach, "
                        "damage): PostgreSQL then stops the recovery, instead of ending it there as at the end "
                        "of the archive (not for a standby, which should keep asking)")
    s.set_defaults(func=cmd_archive_get)

    s = sub.add_parser("archive-list", parents=[common], help="list the archived WAL files: name, size, time, host")
    s.set_defaults(func=cmd_archive_list)

    s = sub.add_parser("archive-check", parents=[common],
                       help="prove that the running PostgreSQL's WAL reaches the repository: switch to a new "
                            "segment and wait until it is archived here")
    s.add_argument("--pg-connect", metavar="CONNINFO",
                   help="psql's connection string or database name (default: the PG* variables)")
    s.add_argument("--timeout", type=_argument(_check_above_zero, float), default=60.0, metavar="SECONDS",
                   help="how long the segment may take to reach the repository (default 60)")
    s.set_defaults(func=cmd_archive_check)

    s = sub.add_parser("archive-expire", parents=[common],
                       help="remove archived WAL segments before a segment of its timeline (then prune)")
    s.add_argument("--before", required=True, metavar="SEGMENT",
                   help="remove the segments of its timeline that sort before it (history files are kept); "
                        "oldest-snapshot: before the segment the oldest snapshot's backup_label starts in")
    s.add_argument("--dry-run", "-n", action="store_true", help="list what would be removed")
    _wait_option(s, 0.0, "running backups and reads")
    s.set_defaults(func=cmd_archive_expire)

    s = sub.add_parser("check", parents=[common, reading], help="verify the repository")
    s.add_argument("--read-data", action="store_true", help="decrypt, decompress and re-hash every blob")
    s.add_argument("--read-data-subset", metavar="n/m|P%|SIZE",
                   help="read only some packs: the n-th of m slices, each by chance at P%%, or random ones "
                        "holding at least SIZE (500M, 2G)")
    s.add_argument("--accept-state", action="store_true",
                   help="accept the snapshots as they are now after a replayed or rolled-back repository "
                        "was reported (resets this client's ledger)")
    s.set_defaults(func=cmd_check, read_lock="check")

    s = sub.add_parser("repair", parents=[common],
                       help="rebuild the index, salvage damaged packs, drop files whose data is gone, or remove "
                            "archived WAL objects that do not load")
    # the choices as the name errors give (not the inner "what"); no PACK among what they call missing
    s.add_argument("what", choices=["index", "packs", "snapshots", "wal"], metavar="{index,packs,snapshots,wal}")
    s.add_argument("packs", nargs="*", default=[], metavar="PACK",
                   help="repair packs: the damaged packs' ids (or prefixes)")
    s.add_argument("--confirm", metavar="REPAIR", help="repair packs, snapshots or wal: really do it")
    _wait_option(s, 3600.0, "running backups and reads")
    s.set_defaults(func=cmd_repair)

    s = sub.add_parser("unlock", parents=[common], help="remove stale locks now, and say who holds the others")
    s.add_argument("--remove-all", action="store_true",
                   help="remove live locks too (only for commands known to be dead or hung: README, Locks)")
    s.set_defaults(func=cmd_unlock)

    s = sub.add_parser("config", parents=[common], help="show the repository's settings, or change them: "
                                                       "config set NAME VALUE [NAME VALUE...]")
    s.add_argument("words", nargs="*", metavar="set NAME VALUE",
                   help=f"change settings ({', '.join(_SETTINGS)}): as init takes them; from the next command on")
    _wait_option(s, 0.0, "running backups and reads")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("key", help="manage the passwords of a repository")
    ks = s.add_subparsers(dest="key_cmd", required=True, parser_class=_Parser,
                          metavar="{list,add,remove,passwd,export,import}")
    for name in ("list", "add", "remove", "passwd", "export", "import"):
        k = ks.add_parser(name, parents=[common], help=KEY_HELP.get(name))
        if name in ("add", "passwd"):
            new_key = k.add_mutually_exclusive_group()
            passwords.NEW.add_options(new_key, "the new password")
            new_key.add_argument("--generate-secret", metavar="FILE", help=GENERATE_SECRET_HELP)
            k.add_argument("--kdf-time", type=_seconds, default=0.5, metavar="SECONDS", help=KDF_TIME_HELP)
        if name == "remove":
            k.add_argument("key_id")
        if name in ("remove", "passwd", "import"):
            _wait_option(k, 3600.0, "running backups and reads")
        if name == "export":
            k.add_argument("file", nargs="?", metavar="FILE", help="where to write it (default: standard output)")
            k.add_argument("--force", action="store_true", help="replace FILE if it exists")
        if name == "import":
            k.add_argument("file", metavar="FILE", help="a key export (- for standard input)")
    s.set_defaults(func=cmd_key)

    from . import exportcli
    from .schedulecli import add_commands as add_schedule_commands

    exportcli.add_commands(sub, common, reading)
    add_schedule_commands(sub, common)
    if only in (None, "verify-restore"):  # its module takes 13 ms to import: only for its own command
        from .verify import add_commands as add_verify_commands

        add_verify_commands(sub, common, reading)

    s = sub.add_parser("list", parents=[common, reading],
                       help="list a repository's objects of one type: snapshots, index, packs, keys, locks (no "
                            "password needed) or blobs")
    s.add_argument("type", metavar="TYPE", choices=_Types(LIST_TYPES), help=", ".join(LIST_TYPES))
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("cat", parents=[common, reading],
                       help="print one repository object decoded: config, snapshot ID, index ID, key ID, lock ID, "
                            "pack ID (its header), blob ID (its bytes) or manifest SNAPSHOT")
    s.add_argument("type", metavar="TYPE", choices=_Types(CAT_TYPES), help=", ".join(CAT_TYPES))
    s.add_argument("id", nargs="?", metavar="ID", help="the object's id or a unique prefix (a snapshot: also latest)")
    s.add_argument("--raw", action="store_true",
                   help="cat blob: its payload as stored (a zstd frame or a delta), decrypted only")
    s.set_defaults(func=cmd_cat)

    s = sub.add_parser("mount", parents=[common, reading],
                       help="browse the snapshots as a read-only file system (FUSE) until unmounted")
    s.add_argument("mountpoint", help="an empty directory")
    s.add_argument("--allow-other", action="store_true",
                   help="let other users look too, held to the recorded owners and modes (needs "
                        "user_allow_other in /etc/fuse.conf unless root)")
    s.add_argument("--numeric-owner", action="store_true",
                   help="show owners by their recorded ids, not as the local ids of the recorded names")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("serve", help="run the HTTP backup service (default 127.0.0.1:6362)", add_help=False,
                       prefix_chars="+")
    s.add_argument("serve_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_serve, json=False, quiet=False, debug=False)

    s = sub.add_parser("completion", help="print a shell completion script: source <(chunkvault completion bash)")
    s.add_argument("shell", choices=["bash"])
    s.set_defaults(func=cmd_completion, json=False, quiet=False, debug=False)
    return p


def _warning_printer(fallback: Callable[..., None]) -> Callable[..., None]:
    """chunkvault's own warnings are one line on stderr, never on stdout (--json); one about the repository's
    state once per command, however many listings meet it (verify-restore of several snapshots said it
    again for each)."""
    said: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, RepositoryStateWarning):
            if str(message) in said:
                return
            said.add(str(message))
        if issubclass(category, ChunkvaultWarning):
            warn(message)
        else:
            fallback(message, category, *rest, **kw)

    return show


@contextlib.contextmanager
def _cache_settings(args: argparse.Namespace) -> Iterator[None]:
    """``--cache-dir`` and ``--no-cache`` as the environment variables every connection reads (a copy's
    destination's too), for this command only.  An option wins over the environment: ``--cache-dir``
    over ``CHUNKVAULT_NO_CACHE``, as ``--no-cache`` over ``CHUNKVAULT_CACHE_DIR``."""
    from .connection import NO_CACHE_ENV

    cache_dir, no_cache = getattr(args, "cache_dir", None), getattr(args, "no_cache", False)
    if cache_dir is not None and no_cache:
        raise UsageError("--cache-dir and --no-cache: give one")
    given = {"CHUNKVAULT_CACHE_DIR": cache_dir,
             NO_CACHE_ENV: "1" if no_cache else "" if cache_dir is not None else None}
    before = {k: os.environ.get(k) for k, v in given.items() if v is not None}
    os.environ.update({k: v for k, v in given.items() if v is not None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse with the named command's parser alone; an unknown command, a top-level option or none at all
    (help, errors) with the whole parser."""
    first = argv[0] if argv and not argv[0].startswith("-") else None
    if first is not None:
        parser = build_parser(first)
        commands = _subcommands(parser) if parser._subparsers is not None else {}
        if first in commands:
            if commands[first]._subparsers is not None:  # `key`: its options follow its own command
                _refuse_options_before_command(argv[1:], commands[first], before=first + " ")
            if first == "backup":
                _refuse_command_without_separator(argv)
            return parser.parse_args(argv)
    parser = build_parser()
    _refuse_options_before_command(argv, parser)
    return parser.parse_args(argv)


_COMMAND_AFTER_OPTIONS = "--stdin-from-command needs the command after the options: -- COMMAND [ARG...]"


def _refuse_command_without_separator(argv: list[str]) -> None:
    """``backup --stdin-from-command`` takes its command after ``--`` only: without it, the command's options
    were read as ours (``printf -n``: a dry run; ``pg_dump --host=db``: a dump of the local server,
    recorded as from host db), or refused as unknown.  Only that option and its abbreviations count: another
    word that begins as it does (restic's ``--stdin-filename``) is an unknown option, and said to be."""
    if "--" not in argv and any(_names_stdin_from_command(w) for w in argv):
        raise UsageError(_COMMAND_AFTER_OPTIONS)


def _names_stdin_from_command(word: str) -> bool:
    """``--stdin-from-command``, or an abbreviation of it long enough to name no other option."""
    name = word.partition("=")[0]
    return len(name) >= len("--stdin-f") and "--stdin-from-command".startswith(name)


def _refuse_options_before_command(argv: list[str], parser: argparse.ArgumentParser, before: str = "") -> None:
    """``chunkvault -r REPO snapshots``, ``chunkvault key -r REPO list``: say that options follow the command
    (argparse would call REPO an invalid command, or let the command's defaults replace the options),
    showing the line as it should be."""
    if not argv or not argv[0].startswith("-") or argv[0] in ("-h", "--help", "--version"):
        return
    commands = _subcommands(parser)
    at = next((i for i, word in enumerate(argv) if word in commands), None)
    if at is not None:
        command = commands[argv[at]]
        end = at + 1  # `-r R key list`: the options after `key list`, where they go
        if command._subparsers is not None and end < len(argv) and argv[end] in _subcommands(command):
            end += 1
        fixed = _shown_command_line([*argv[at:end], *argv[:at], *argv[end:]])
        raise UsageError(f"options go after the command: chunkvault {before}{fixed}")
    if before:  # argparse would parse them and let the command's defaults replace them
        raise UsageError(f"options go after the command: chunkvault {before}COMMAND {_shown_command_line(argv)}")


#: A word of the command line that carries a secret: a ``-o SCHEME.token=VALUE`` option, a URL's password.
_SECRET_WORD = re.compile(r"(?i)^((?:-o|--option=)?[\w-]+\.token=).+|^(\w[\w+.-]*://[^/@:]*:)[^/@]*(@.*)$")


def _shown_command_line(words: list[str]) -> str:
    """``words`` as a line to paste back into a shell: quoted where a word needs it (``--password-command 'pass
    show x'`` was shown as three words), a token or a URL's password replaced by its name (the line goes to
    stderr, which a cron mail or a log keeps)."""
    def hidden(word: str) -> str:
        return _SECRET_WORD.sub(lambda m: f"{m[1]}TOKEN" if m[1] else f"{m[2]}PASSWORD{m[3]}", word)

    return shlex.join(hidden(w) for w in words)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, Any]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager stopping the job, a timeout), SIGHUP (the terminal or ssh session it
    ran in closed) or SIGQUIT (PostgreSQL's immediate shutdown, to its archive and restore commands): the
    command stops as on Ctrl-C, its locks released, its temporary files removed, what it stored whole
    indexed and a scheduled run's post hook run, instead of dying where it stands."""

    def __str__(self) -> str:
        return STOP_WORDS.get(_STOPPED_BY[0] if _STOPPED_BY else signal.SIGTERM, "terminated")


_STOPPED_BY: list[int] = []  # the stop signals received: what else the command then raises is their doing


def _error_line(text: str) -> None:
    """The command's one error line, written whole: a worker thread still warning must not split it."""
    sys.stderr.write(f"chunkvault: {text}\n")


def _stopped(args: argparse.Namespace | None, argv: list[str] | None) -> int:
    """What a command stopped by SIGTERM (143), SIGHUP (129), SIGQUIT (131) or Ctrl-C (130) says, on stderr
    and, with --json, stdout."""
    signum = next((n for n in _STOPPED_BY if n != signal.SIGINT), signal.SIGINT)
    kind, code, word = stopped_as(signum)
    _error_line(word)
    _emit_error_json(args, argv, kind, code, word)
    return code


def _stop(signum: int) -> None:
    _STOPPED_BY.append(signum)
    stop_request.request()  # uploads in flight, which the command waits for, retry no longer
    raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated


def stop_signals() -> dict[int, Callable[[int], None]]:
    """The signals that stop a command, each to ``_stop``: SIGHUP and SIGQUIT only where they are not ignored
    (``nohup``)."""
    handlers = {signal.SIGINT: _stop, signal.SIGTERM: _stop}
    for signum in (signal.SIGHUP, signal.SIGQUIT):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            handlers[signum] = _stop
    return handlers


def _flag(args: argparse.Namespace | None, argv: list[str] | None, name: str) -> bool:
    """``--name`` was given: by the parsed arguments, or, when parsing failed, by the words themselves."""
    if args is not None:
        return bool(getattr(args, name, False))
    return f"--{name}" in (sys.argv[1:] if argv is None else argv)


def _emit_error_json(args: argparse.Namespace | None, argv: list[str] | None, kind: str, code: int,
                     message: str) -> None:
    """With --json, a command that fails (or is stopped) before its document still prints one: what failed,
    for a program to read instead of parsing the line on stderr."""
    open_list = getattr(sys.stdout, "open_list", None)
    if not _flag(args, argv, "json") or (getattr(sys.stdout, "written", True) and open_list is None):
        return
    error = {"error": {"type": kind, "exit_code": code, "message": message}}
    try:
        if open_list is not None:  # the list ends, and "error" follows it in the document
            sys.stdout.write(open_list + _JSON.encode(error)[1:] + "\n")
        else:
            _emit_json(error)
        sys.stdout.flush()
    except (OSError, ChunkvaultError):
        pass  # standard output is what failed: the line on stderr says it


def _fatal_for_postgresql(args: argparse.Namespace | None, exc: BaseException) -> int | None:
    """``archive-get --fatal-errors``' exit for a failure other than a name not archived: PostgreSQL takes an
    exit above 125 as fatal and stops the recovery; any other as the end of the archive, and a recovery to
    its end was promoted short of it while the repository was out of reach."""
    from .errors import WalNotArchived

    if getattr(args, "fatal_errors", False) and not isinstance(exc, WalNotArchived):
        return FATAL_EXIT
    return None


def main(argv: list[str] | None = None) -> int:
    from .memory import tune_allocator, tune_gc

    tune_allocator()
    if argv is None:  # a process of its own, not a caller's (tests call main with arguments)
        tune_gc()
    args: argparse.Namespace | None = None
    # Cleared here, not on the way out: threads a stopped command left behind (a second signal ended its
    # wait for them) must go on retrying no longer while the interpreter waits for them to end.
    stop_request.clear()
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is not None:
        _never_strict(stdout)
    sys.stdout = _GuardedOutput(stdout) if stdout is not None else _ClosedOutput()  # type: ignore[assignment]
    if stderr is not None:
        sys.stderr = _BestEffortErrors(stderr)  # type: ignore[assignment]
    try:
        with interrupts.handled(stop_signals()):
            begun()
            args = _parse(sys.argv[1:] if argv is None else argv)
            with warnings.catch_warnings(), contextlib.ExitStack() as args.held:
                args.held.enter_context(_cache_settings(args))
                warnings.showwarning = _warning_printer(warnings.showwarning)
                code = int(args.func(args) or 0)
                sys.stdout.flush()  # here, where a failure is reported, not at the interpreter's exit
        return code
    except ChunkvaultError as exc:
        said = one_line(_waits_told(args, exc).cli_message())
        _error_line(said)
        code = _fatal_for_postgresql(args, exc) or exc.exit_code
        _emit_error_json(args, argv, type(exc).__name__, code, said)
        return code
    except KeyboardInterrupt:
        return _stopped(args, argv)
    except BrokenPipeError:  # as `cat` ends there: what it had decided (check's 18, say) never reached anyone
        return OutputClosed.exit_code
    except Exception as exc:  # a bug: still one line, unless --debug
        if _STOPPED_BY:  # the stop raised inside native code (an import, say), which wrapped it in its own error
            return _stopped(args, argv)
        if _flag(args, argv, "debug"):
            raise
        limit = resource_exhausted(exc)
        if limit is not None:  # no bug: a limit the process ran into
            _error_line(limit.cli_message())
            _emit_error_json(args, argv, type(limit).__name__, limit.exit_code, limit.cli_message())
            return limit.exit_code
        line = f"internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for details)"
        _error_line(line)
        code = _fatal_for_postgresql(args, exc) or EXIT_INTERNAL
        _emit_error_json(args, argv, "InternalError", code, line)
        return code
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        _STOPPED_BY.clear()  # a caller's next command in this process was not stopped


if __name__ == "__main__":
    sys.exit(main())
