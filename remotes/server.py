"""``chunkvault serve``: the HTTP backup service that ``remotes.http`` talks to.

It stores opaque, already encrypted objects in one directory through
``LocalRemote`` (temp file, fsync, rename), so an upload cut short never leaves
an object behind.  The protocol is described in ``remotes.http``.  Tokens carry
a mode: ``read-only`` (get, stat, list), ``append-only`` (also create objects;
overwrite and delete only shared locks) or ``full``; ``--append-only`` caps
every token at append-only, so a compromised client cannot destroy backups.
Connections are capped in total and per client address, a request's head has
a deadline and idle connections are closed, uploads stream into their temp
file: a client that misbehaves holds neither threads nor memory for long.
With ``--repositories`` the directory holds one repository per subdirectory,
each at ``/NAME/objects/KEY`` (``remotes.served``), and each token names the
repositories it reaches; any other is answered as one that does not exist.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import heapq
import hmac
import http.client
import io
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import stat
import struct
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote

from chunkvault import interrupts
from chunkvault.argparsing import dashes_value
from chunkvault.errors import (ObjectExists, ObjectTooLarge, PermissionDenied, RemoteError, StorageFull, UsageError,
                               resource_exhausted)
from chunkvault.localfiles import capped, read_regular
from chunkvault.tomlfile import read_toml
from chunkvault.units import format_size, parse_size

from .base import _KEY_SEGMENT, is_loopback, validate_key, validate_prefix
from .http import DEFAULT_PORT, LIMIT_HEADER, MISSING_HEADER, NO_REPOSITORY
from .local import EXCLUSIVE_LOCK_PREFIX, TEMP_PREFIX, os_error, ancestor_identities, file_version
from .served import (EVERY_REPOSITORY, NAME_PATTERN, RepositoryInTheWay, Served, ServedRepositories,
                     holds_repository, is_repository_name, parse_scope, repositories_below)

PROG = "chunkvault serve"
MiB = 1 << 20
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_MAX_OBJECT_SIZE = 256 * MiB
PAGE_SIZE = 10_000
MIN_TOKEN_LENGTH = 16
TOKENS_FILE_LIMIT = 1 << 20  # some ten thousand tokens
MODES = ("read-only", "append-only", "full")
LOCKS_PREFIX = "locks/"
SHARED_LOCK_KIND = "shared"  # the one kind of lock (store/FORMAT.md) a token that is not full may store
# Request bodies we refuse are read and dropped up to this much, so the client
# gets to read our answer; beyond it the connection is closed.
DRAIN_LIMIT = 64 * MiB
COPY_CHUNK = 1 * MiB
# Over TLS, an answer's body goes out in sends this large, each given body_timeout: a TLS send's timeout bounds
# the whole send, so a reader slower than a whole COPY_CHUNK per timeout was cut off while it still read.  (A
# plain send returns what the socket took, each within the timeout.)
TLS_SEND_PIECE = 64 << 10
BODY_PIECE = 1 * MiB  # an upload's buffer grows by at most this much per read (see _read_body)
# Bodies up to this size are taken into memory (a lock, which a full disk must still take from the space kept
# back for it); larger ones go straight into the temp file they are stored through.
SMALL_BODY = 64 << 10
# A request's headers, all of them: ours take a few hundred bytes, a proxy adds a few more.  The parser's own limits
# (100 lines of 64 KiB) let a client without a token have the service hold 6.4 MB per connection it kept sending
# them on, some 1.6 GB at the connection limit.
HEADERS_LIMIT = 64 << 10
READ_TIMEOUT = 120.0  # each write of an answer's head, and of a small answer
# An upload's body must keep arriving (BodyPace): no gap of body_timeout seconds without a byte (as nginx's
# client_body_timeout), and MIN_BODY_RATE bytes a second (by default; --min-upload-rate) over each window of
# RATE_WINDOWS body timeouts, as Kestrel's minimum data rate.  A deadline that followed the declared length (a
# second per 8 KiB) let a client with a token trickle bytes into a 256 MiB upload for nine hours.
MIN_BODY_RATE = 8 << 10
DEFAULT_BODY_TIMEOUT = 60.0  # the stock client waits as long for a stalled link (read_timeout) before it gives up
RATE_WINDOWS = 2  # longer than the gap allowed, so that a stall the gap lets pass does not fail the rate alone
LINGER_TIMEOUT = 2.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 64
DEFAULT_HEADER_TIMEOUT = 15.0
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_CLEANUP_INTERVAL = 3600.0
UNFINISHED_AGE = 3600.0  # a temp file this old is an abandoned upload (a body stalls for body_timeout at most)
ACCEPT_BACKOFF = 0.5  # out of file descriptors: wait this long before accepting again
REPEAT_LOG_EVERY = 60.0  # a refusal or an accept failure is logged at most this often
DEFAULT_PACK_SIZE = 16 * MiB  # what a repository's packs grow to unless it was made with another size
PACK_ROOM = DEFAULT_PACK_SIZE + 3 * MiB  # such a pack, one more chunk (2 MiB at most by default) and its header
CONFIG_KEYS = ("enabled", "listen", "path", "tokens", "append_only", "tls_cert", "tls_key", "max_object_size", "quiet",
               "max_connections", "max_connections_per_client", "header_timeout", "idle_timeout", "cleanup_interval",
               "min_upload_rate", "body_timeout", "repositories")
_RANGE = re.compile(r"^bytes=([0-9]{1,19})-([0-9]{0,19})\Z")  # ASCII, and numbers int() takes
# The objects a repository is made of (store/FORMAT.md): anything else is refused, so that no client can put a
# file where the layout needs a directory ("data/ab" in the way of every pack under data/ab/).
_LAYOUT_KEY = re.compile(r"^(config|(keys|locks|index|snapshots|wal)/[^/]+|data/[0-9a-f]{2}/[^/]+)\Z")
# A Host header's host (name, IPv4, [IPv6]) and port, for the URL a plain HTTP client is pointed to.
_HOST_HEADER = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}))(:[0-9]{1,5})?\Z")


# --- settings -------------------------------------------------------------------------


class Token(tuple):
    """A token of the tokens file: the pair (secret, mode), as which it compares and unpacks, as a service's
    tokens always were; ``scope`` holds the names of the repositories it reaches where the service serves
    several (None: every one, and the one repository of a service that serves one)."""

    scope: frozenset[str] | None

    def __new__(cls, secret: bytes, mode: str, scope: frozenset[str] | None = None) -> "Token":
        token = super().__new__(cls, (secret, mode))
        token.scope = scope
        return token

    @property
    def secret(self) -> bytes:
        return self[0]

    @property
    def mode(self) -> str:
        return self[1]


@dataclass
class Settings:
    host: str
    port: int
    path: str
    tokens: list[Token] | None = field(repr=False)  # a traceback or a log of the settings shows none
    append_only: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    max_object_size: int = DEFAULT_MAX_OBJECT_SIZE
    quiet: bool = False
    tokens_file: str | None = None  # read again on SIGHUP (a token revoked), as the TLS files are
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL
    min_upload_rate: int = MIN_BODY_RATE  # bytes per second an upload's body must bring over each rate window
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # the longest an upload's or a download's body may move no byte
    repositories: bool = False  # path holds a repository per subdirectory, each at /NAME/ (--repositories)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``HOST`` (port 6362)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"bad listen address {text!r} (use [::1]:{DEFAULT_PORT})")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise UsageError(f"bad listen address {text!r}: put an IPv6 address in brackets, e.g. [::1]:{DEFAULT_PORT}")
    else:
        host, port_text = text, str(DEFAULT_PORT)
    if not host:
        raise UsageError(f"bad listen address {text!r}: no host (use 0.0.0.0 for every interface)")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise UsageError(f"bad port in listen address {text!r}")
    return host, int(port_text)


def _origin_form(target: str) -> str:
    """A request target's path and query: as sent, or taken out of the absolute form a proxy may pass on
    (``http://host:port/objects/KEY``), which a server must accept (RFC 9112, 3.2.2)."""
    if target[:8].lower().startswith(("http://", "https://")):
        rest = target.partition("://")[2]
        return "/" + rest.partition("/")[2]
    return target


def _host_of(header: str) -> str:
    """The host of a Host header (``name``, ``name:port``, ``[v6]:port``), without port or brackets."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def load_tokens(path: str, repositories: bool = False) -> list[Token]:
    """``MODE TOKEN`` per line, or, for a service of several ``repositories``, ``MODE TOKEN SCOPE`` with SCOPE
    the names of the repositories the token reaches (``NAME[,NAME...]``) or ``*`` for every one: a token that
    names none is refused there, not taken for one that reaches every repository (a tokens file written for
    a service of one repository, reused, gave each client every other's backups).  Refuses a file others can
    read, since it holds secrets.  Only a regular file, and only TOKENS_FILE_LIMIT of it, is read:
    ``--tokens /dev/zero`` (or a pipe, a device named by mistake) was read until the kernel killed the service
    for its memory, at start or at a SIGHUP while it served."""
    try:
        st = os.stat(path)
        data = capped(read_regular(path, TOKENS_FILE_LIMIT + 1), TOKENS_FILE_LIMIT, f"tokens file {path} holds",
                      "no tokens file")
        lines = data.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read tokens file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if st.st_mode & 0o077:
        raise UsageError(
            f"tokens file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    tokens: list[Token] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"tokens file {path} line {number}"
        if len(parts) not in (2, 3):
            expected = f"'MODE TOKEN NAME[,NAME...]' (or {EVERY_REPOSITORY} for every repository)" if repositories \
                else "'MODE TOKEN'"
            raise UsageError(f"{where}: expected {expected} with MODE one of {', '.join(MODES)}")
        mode, token = parts[:2]
        if mode not in MODES:
            # a line written TOKEN MODE would put the token in the message, which a reload logs
            said = f" {mode!r}" if len(mode) < MIN_TOKEN_LENGTH else " (the line's first word: MODE comes first)"
            raise UsageError(f"{where}: unknown mode{said} (use {', '.join(MODES)})")
        if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
            raise UsageError(f"{where}: a token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters")
        if any(hmac.compare_digest(token.encode(), known) for known, _ in tokens):
            raise UsageError(f"{where}: the same token appears twice")
        tokens.append(Token(token.encode(), mode, _scope(parts[2:], repositories, where)))
    if not tokens:
        raise UsageError(f"tokens file {path} holds no tokens")
    return tokens


def _scope(fields: list[str], repositories: bool, where: str) -> frozenset[str] | None:
    """The repositories a tokens file's line reaches, from what follows its token."""
    if not repositories:
        if fields:
            raise UsageError(f"{where}: a third field names repositories, and this service serves one (the "
                             "directory --path names): give --repositories to serve each of its subdirectories "
                             "as a repository, or write the line 'MODE TOKEN'")
        return None
    if not fields:
        raise UsageError(f"{where}: name the repositories the token reaches after it, 'MODE TOKEN NAME[,NAME...]', "
                         f"or {EVERY_REPOSITORY} for every one: the service serves several (--repositories)")
    try:
        return parse_scope(fields[0])
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise UsageError(message)

        def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
            return dashes_value(self, action, arg_strings, super()._get_values)  # --path=--: the value --, not []

    p = Parser(prog=PROG, description="Serve a repository directory to chunkvault clients over HTTP(S).")
    p.add_argument("--listen", metavar="HOST:PORT", help=f"address to listen on (default {DEFAULT_LISTEN}; [::1]:PORT for IPv6)")
    p.add_argument("--path", metavar="DIR",
                   help="the repository directory to serve (with --repositories: the directory of repositories)")
    p.add_argument("--repositories", action="store_true", default=None,
                   help="serve each subdirectory of --path as a repository of its own, at /NAME/ (NAME "
                        f"{NAME_PATTERN}; init makes it), each token reaching the ones its line names")
    p.add_argument("--tokens", metavar="FILE",
                   help="'MODE TOKEN' per line, MODE one of read-only, append-only, full; each TOKEN at least "
                        f"{MIN_TOKEN_LENGTH} printable ASCII characters (file mode 0600); with --repositories "
                        f"'MODE TOKEN NAME[,NAME...]', or {EVERY_REPOSITORY} for every repository")
    p.add_argument("--append-only", action="store_true", default=None,
                   help="cap every token at append-only: no overwrites, deletes of shared locks only")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--max-object-size", metavar="SIZE", help="largest object accepted (default 256M; suffixes k, M, G)")
    p.add_argument("--max-connections", metavar="N",
                   help=f"connections served at once; more are refused (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--max-connections-per-client", metavar="N",
                   help=f"connections from one address at once (default {DEFAULT_MAX_CONNECTIONS_PER_CLIENT})")
    p.add_argument("--header-timeout", metavar="SECONDS",
                   help="time a client has to send a request's line and headers, from a new connection's start or a "
                        f"keep-alive request's first byte (default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--idle-timeout", metavar="SECONDS",
                   help=f"an idle connection is closed after this long (default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--cleanup-interval", metavar="SECONDS",
                   help="how often uploads abandoned for an hour (a crash's temp files) are removed "
                        f"(default {DEFAULT_CLEANUP_INTERVAL:g})")
    p.add_argument("--min-upload-rate", metavar="RATE",
                   help=f"bytes per second an upload must bring over each {RATE_WINDOWS} body timeouts, or it is cut "
                        "off (default 8K: 64 kbit/s; suffixes k, M)")
    p.add_argument("--body-timeout", metavar="SECONDS",
                   help="an upload that brings no byte for this long, or a download its client reads none of, is "
                        f"cut off (default {DEFAULT_BODY_TIMEOUT:g})")
    p.add_argument("--config", metavar="FILE", help="TOML file with these settings; flags override it")
    p.add_argument("--quiet", action="store_true", default=None, help="no per-request log lines")
    return p


def _load_config(path: str) -> dict[str, Any]:
    config = read_toml(path, "config")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"config {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})")
    for name in ("enabled", "append_only", "quiet", "repositories"):
        if name in config and not isinstance(config[name], bool):
            raise UsageError(f"config {path}: {name} must be true or false")
    for name in ("listen", "path", "tokens", "tls_cert", "tls_key"):
        if name in config and not isinstance(config[name], str):
            raise UsageError(f"config {path}: {name} must be a string")
    # Relative file names in the config are relative to the config file.
    base = os.path.dirname(os.path.abspath(path))
    for name in ("path", "tokens", "tls_cert", "tls_key"):
        if name in config:
            if not config[name].strip():  # joined to the config's directory, "" served it, tokens and key too
                raise UsageError(f"config {path}: {name} is empty")
            config[name] = os.path.join(base, os.path.expanduser(config[name]))
    return config


def parse_settings(argv: list[str]) -> Settings | None:
    """Flags over the config file over defaults; None when the config disables the service."""
    args = _parser().parse_args(argv)
    config = _load_config(args.config) if args.config else {}
    if not config.get("enabled", True):
        print(f"{PROG}: backup service disabled in {args.config}", file=sys.stderr)
        return None

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(args, name)
        return value if value is not None else config.get(name, default)

    def named(name: str) -> str:
        """A setting as the operator gave it, for its error: the flag, or the config file's key."""
        return f"{name} in {args.config}" if getattr(args, name) is None and name in config else _flag(name)

    path = pick("path")
    repositories = bool(pick("repositories", False))
    what = "directory of repositories" if repositories else "repository directory"
    if not path:
        raise UsageError(f"no {what}: use --path DIR (or path in --config)")
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path} does not exist (create it first)")
    if repositories and holds_repository(path):
        # its objects would be no repository's, and its keys/ or data/ taken for repositories named so (a
        # directory named config is a repository of that name: one made so kept the service from starting again)
        raise UsageError(f"{path} is a repository itself (it holds a config): serve it without "
                         f"{named('repositories')}, or give the directory its repositories are in")
    host, port = parse_listen(pick("listen", DEFAULT_LISTEN))
    tokens_file = pick("tokens")
    tokens = load_tokens(tokens_file, repositories) if tokens_file else None
    if tokens is None and not is_loopback(host):
        raise UsageError(
            f"refusing to listen on {host} without --tokens: anyone who can reach it could read, "
            "overwrite and delete the backups (give --tokens FILE, or listen on 127.0.0.1)"
        )
    tls_cert, tls_key = pick("tls_cert"), pick("tls_key")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    return Settings(
        host=host,
        port=port,
        path=path,
        tokens=tokens,
        append_only=bool(pick("append_only", False)),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_object_size=_max_object_size(named("max_object_size"), pick("max_object_size", DEFAULT_MAX_OBJECT_SIZE)),
        quiet=bool(pick("quiet", False)),
        tokens_file=tokens_file,
        max_connections=int(_number(named("max_connections"), pick("max_connections", DEFAULT_MAX_CONNECTIONS),
                                    1, int)),
        max_connections_per_client=int(_number(named("max_connections_per_client"), pick(
            "max_connections_per_client", DEFAULT_MAX_CONNECTIONS_PER_CLIENT), 1, int)),
        header_timeout=_number(named("header_timeout"), pick("header_timeout", DEFAULT_HEADER_TIMEOUT), 0.1),
        idle_timeout=_number(named("idle_timeout"), pick("idle_timeout", DEFAULT_IDLE_TIMEOUT), 0.1),
        cleanup_interval=_number(named("cleanup_interval"), pick("cleanup_interval", DEFAULT_CLEANUP_INTERVAL), 0.1),
        min_upload_rate=_upload_rate(named("min_upload_rate"), pick("min_upload_rate", MIN_BODY_RATE)),
        body_timeout=_number(named("body_timeout"), pick("body_timeout", DEFAULT_BODY_TIMEOUT), 0.1),
        repositories=repositories,
    )


def _flag(name: str) -> str:
    """A setting's command-line flag (``max_connections``: ``--max-connections``), as messages name it."""
    return "--" + name.replace("_", "-")


def _upload_rate(name: str, value: Any) -> int:
    try:
        rate = parse_size(value)
    except UsageError:
        rate = 0
    if rate < 1:
        raise UsageError(f"{name} must be a rate in bytes per second (e.g. 2K), not {value!r}")
    return rate


def _number(name: str, value: Any, minimum: float, kind: type = float) -> float:
    """A numeric setting from a flag (text) or the config file (a TOML number), with one clear error line."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}") from None
    if not minimum <= number <= 1e9:  # NaN and infinity too
        raise UsageError(f"{name} must be at least {minimum:g} (and at most 1e9), not {value!r}")
    return number


MIN_OBJECT_SIZE = 1 << 20  # a key file, a lock, a snapshot must fit: below, every command would fail


def _max_object_size(name: str, value: Any) -> int:
    try:
        size = parse_size(value)
    except UsageError as exc:  # "not a size: '1e3'" alone named no setting
        raise UsageError(f"{name}: {exc}") from None
    if size < MIN_OBJECT_SIZE:
        raise UsageError(f"{name} must be at least 1M (keys, locks and snapshots must fit), not {value!r}")
    return size


class _EncryptedKey(Exception):
    """The TLS key asked for its passphrase."""


def _no_passphrase() -> bytes:
    """The passphrase callback: the service has no terminal to ask on (OpenSSL's own prompt, at a SIGHUP, held
    the service's main thread reading a terminal, SIGTERM unanswered; without one it said "Invalid argument")."""
    raise _EncryptedKey()


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("certificate", cert), ("key", key)):
        try:  # a pipe (no writer: the start waited for one for ever) or a device is no file a reload can read again
            read_regular(path, 0)
        except OSError as exc:
            raise UsageError(f"cannot load TLS {what} {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise UsageError(f"TLS key {key} is encrypted, and the service cannot ask for its passphrase: give it the "
                         "key decrypted (openssl pkey -in KEY -out NEW), readable by its user alone") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise UsageError(f"cannot load TLS certificate {cert} with key {key}: {reason}") from None
    return context


# --- listing --------------------------------------------------------------------------


Listed = tuple[str, int, str, float]  # key, size, version, modification time


def list_page(root: str, prefix: str, after: str, limit: int) -> tuple[list[Listed], str | None]:
    """Up to ``limit`` objects under ``prefix`` that sort after ``after`` (key, size, version, modification
    time), and the next marker.  The version names the file's modification time and inode: every write
    replaces the file by a rename, so it changes whenever the object is written (clients cache rewritable
    objects by it).  The modification time is this host's clock, one for every client (locks go stale by it).

    Keys are ordered segment by segment (a depth-first walk in name order), so a
    page starts where the last one ended without listing what came before.
    """
    head = prefix.rpartition("/")[0]
    start = head.split("/") if head else []
    marker = after.split("/") if after else None
    items: list[Listed] = []
    for item in _walk(root, start, prefix, marker, frozenset(ancestor_identities(root, start)), limit + 1):
        if not _LAYOUT_KEY.match(item[0]):  # a file beside the objects (a tokens file, a key) is not one
            continue
        items.append(item)
        if len(items) == limit:
            return items, item[0]
    return items, None


def _walk(root: str, parts: list[str], prefix: str, marker: list[str] | None,
          above: frozenset[tuple[int, int]] = frozenset(), batch: int = PAGE_SIZE + 1) -> Iterator[Listed]:
    """Directories are followed where they are links, as writes follow them (data/ or data/ab moved to
    another disk: what was stored there was missing from every listing), but never into one of their own
    ``above`` (a loop); a file that is a link is no object.  A directory is read ``batch`` names at a time
    (the first ones from the marker on, read again for the next ones): each listing held all of a large
    directory's entries, and listings of one at once ran the service out of memory."""
    path = os.path.join(root, *parts)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if (st.st_dev, st.st_ino) in above:
        return
    above = above | {(st.st_dev, st.st_ino)}
    within = marker is not None and len(marker) > len(parts) and marker[: len(parts)] == parts
    first = marker[len(parts)] if within else ""  # the marker's name here: the names before it sort before it
    last: str | None = None  # the batch's last name: the next one starts after it
    while True:
        try:
            with os.scandir(path) as it:
                entries = heapq.nsmallest(batch, (e for e in it if (e.name > last if last is not None
                                                                     else e.name >= first)),
                                          key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        yield from _walk_entries(root, parts, prefix, marker, above, entries, batch)
        if len(entries) < batch:
            return
        last = entries[-1].name


def _walk_entries(root: str, parts: list[str], prefix: str, marker: list[str] | None,
                  above: frozenset[tuple[int, int]], entries: list[os.DirEntry], batch: int) -> Iterator[Listed]:
    """The objects of one batch of a directory's entries (``_walk``), in name order."""
    for entry in entries:
        name = entry.name
        if name.startswith(TEMP_PREFIX) or not _KEY_SEGMENT.match(name):
            continue
        here = parts + [name]
        key = "/".join(here)
        if entry.is_dir():
            if not ((key + "/").startswith(prefix) or prefix.startswith(key + "/")):
                continue
            if marker is not None and here < marker[: len(here)]:
                continue  # the whole subtree sorts before the marker
            yield from _walk(root, here, prefix, marker if marker and here == marker[: len(here)] else None, above,
                             batch)
        elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
            if marker is not None and here <= marker:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield key, st.st_size, file_version(st), st.st_mtime


# --- the HTTP side --------------------------------------------------------------------


class PlainHTTPOnTLS(Exception):
    """A plain HTTP request reached the HTTPS port (and was answered so)."""


class TLSHandshakeLate(Exception):
    """A TLS handshake did not end within the header timeout."""


class BadRequest(Exception):
    """A request we answer with 400 and this reason."""


class NotSharedLock(Exception):
    """A lock object stored with a token that is not full, which does not say it is shared."""


class HeadersTooLarge(http.client.HTTPException):
    """A request's headers went past HEADERS_LIMIT (answered 431 by the parser, as its own limits are)."""


class _HeadersReader:
    """The connection's reader while a request's headers are parsed (``readline``, all the parser calls): it
    hands over HEADERS_LIMIT bytes of them at most."""

    def __init__(self, rfile: Any):
        self._rfile, self._left = rfile, HEADERS_LIMIT

    def readline(self, limit: int = -1) -> bytes:
        line = self._rfile.readline(self._left + 1 if limit < 0 else min(limit, self._left + 1))
        self._left -= len(line)
        if self._left < 0:
            raise HeadersTooLarge(f"the request's headers are above {HEADERS_LIMIT >> 10} KiB")
        return line


def _says_shared(body: bytes) -> bool:
    """Whether ``body`` is a lock object of kind ``shared``, read as clients read locks (JSON, its ``kind``).
    Clients take a lock's kind from its content, not its name, and any kind but shared for exclusive: an
    append-only client that stored ``{"kind": "exclusive", ...}`` under a shared lock's name held every other
    client's backup off for as long as it refreshed it."""
    try:
        lock = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(lock, dict) and lock.get("kind") == SHARED_LOCK_KIND


def _key_from_path(raw: str) -> str:
    """The object key of ``/objects/RAW``; keys never need escaping, so escapes get no second chance."""
    if "%2f" in raw.lower() or "%5c" in raw.lower():
        raise BadRequest("encoded slashes or backslashes are not allowed in object keys")
    key = unquote(raw, errors="strict")
    try:
        return validate_key(key)
    except UsageError:
        raise BadRequest(f"invalid object key {key!r}") from None


# The escapes a token can reach the log or an answer in: the service's own quoting (repr() of a key, JSON of an
# answer that quotes one, outermost), and the percent-encoding a client chose (%XX in either case, at any depth).
_BACKSLASHED = re.compile(r"\\(?:x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4})|(.))", re.S)
_PERCENT_ENCODED = re.compile(r"%([0-9A-Fa-f]{2})")
_CONTROL_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
QUOTING_LEVELS = 2  # JSON of a repr()
ENCODING_LEVELS = 8  # a client's percent-encoding nested deeper than this is not undone
# The characters of a text searched for escaped tokens (a log line keeps LOGGED_TEXT of a path): undoing escapes
# costs, and a client needs no token to send 64 KiB of them.  Beyond, only a token as it is is found.
REDACT_SCAN = 4096


def _backslash_unescaped(match: re.Match) -> str:
    digits = match.group(1) or match.group(2)
    return chr(int(digits, 16)) if digits else _CONTROL_ESCAPES.get(match.group(3), match.group(3))


def _percent_decoded(match: re.Match) -> str:
    return chr(int(match.group(1), 16))


Spans = list[tuple[int, int]]


def _undone(pattern: re.Pattern, decode: Any, text: str, spans: Spans | None) -> tuple[str, Spans | None]:
    """``text`` with one level of ``pattern``'s escapes undone, and for each of its characters the span of the
    original text it came from (``spans`` gives ``text``'s; None: not asked for, and much faster)."""
    if spans is None:
        return pattern.sub(decode, text), None
    parts: list[str] = []
    undone: Spans = []
    pos = 0
    for match in pattern.finditer(text):
        parts.append(text[pos : match.start()])
        undone += spans[pos : match.start()]
        parts.append(decode(match))
        undone.append((spans[match.start()][0], spans[match.end() - 1][1]))
        pos = match.end()
    parts.append(text[pos:])
    undone += spans[pos:]
    return "".join(parts), undone


def _views(text: str, spanned: bool) -> Iterator[tuple[str, Spans | None]]:
    """``text``, then as it read before the service quoted it and before a client percent-encoded it, level by
    level (a token may hold "%25" or a backslash itself); ``spanned``: each with the original's span of each
    character."""
    quoted = [(text, [(i, i + 1) for i in range(len(text))] if spanned else None)]
    while len(quoted) <= QUOTING_LEVELS and "\\" in quoted[-1][0]:
        quoted.append(_undone(_BACKSLASHED, _backslash_unescaped, *quoted[-1]))
    for view, spans in quoted:
        yield view, spans
        for _ in range(ENCODING_LEVELS):
            if "%" not in view:
                break
            view, spans = _undone(_PERCENT_ENCODED, _percent_decoded, view, spans)
            yield view, spans


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` written as ``***``, in whatever escapes it appears in (``_views``): a
    token percent-encoded in a path or a query, or quoted by repr() with its backslashes doubled, was logged and
    answered as it came."""
    for secret in secrets:
        text = text.replace(secret, "***")
    if "%" not in text[:REDACT_SCAN] and "\\" not in text[:REDACT_SCAN]:
        return text
    text, rest = text[:REDACT_SCAN], text[REDACT_SCAN:]
    if not any(secret in view for view, _ in _views(text, False) for secret in secrets):
        return text + rest  # the common case: no spans made
    found: Spans = []
    for view, spans in _views(text, True):
        assert spans is not None
        for secret in secrets:
            at = view.find(secret)
            while at >= 0:
                found.append((spans[at][0], spans[at + len(secret) - 1][1]))
                at = view.find(secret, at + 1)
    parts, pos = [], 0
    for start, end in sorted(found):  # overlapping finds make one ***
        if end > pos:
            parts.append(text[pos:start] + "***" if start >= pos else "")
            pos = end
    return "".join(parts) + text[pos:] + rest


def _printable(text: str) -> str:
    """``text`` with what a terminal would act on (control characters, escapes, bidirectional overrides)
    written as escapes: request lines and keys come from anyone who can connect."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _listen_family(host: str, port: int) -> int:
    """The address family to listen in: an address's own; for a name, IPv4 where it has an IPv4 address
    (``localhost`` stays 127.0.0.1, where clients look for it, whatever the resolver puts first), IPv6 where
    it has only IPv6 ones (bound as IPv4, such a name failed).  An unknown name is left to the bind, which
    says so."""
    if ":" in host:
        return socket.AF_INET6
    try:
        families = {found[0] for found in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)}
    except (OSError, UnicodeError):
        return socket.AF_INET
    return socket.AF_INET6 if families and socket.AF_INET not in families and socket.AF_INET6 in families \
        else socket.AF_INET


class BackupServer(ThreadingHTTPServer):
    """One repository directory, or a directory of repositories (--repositories), behind HTTP(S); a thread
    per connection, up to the connection limits, which are the service's, whatever repository a connection
    reaches."""

    daemon_threads = True
    request_queue_size = socket.SOMAXCONN  # the default 5 made a burst of connections wait for SYN retransmits

    def __init__(self, settings: Settings):
        self.settings = settings
        self.served = ServedRepositories(settings.path, settings.repositories)
        try:  # the room a forget or prune takes on a full disk, there from the start
            self.served.keep_reserves()
        except RemoteError as exc:
            raise UsageError(str(exc)) from None
        self.tls = _tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
        self.address_family = _listen_family(settings.host, settings.port)
        self._log_lock = threading.Lock()
        self._active = 0
        self._idle = threading.Condition()
        self._connections_lock = threading.Lock()
        self._connections = 0
        self._per_client: dict[str, int] = {}
        # Keep-alive connections waiting for their next request, the oldest first: closed to make room for a new
        # connection at the limits (``_make_room``).
        self._waiting: dict[Any, str] = {}
        self._last_said: dict[str, float] = {}  # what is logged at most every REPEAT_LOG_EVERY: when it last was
        self._unsaid: dict[str, int] = {}  # and how often it happened since
        super().__init__((settings.host, settings.port), Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skips HTTPServer's reverse DNS lookup
        self.server_name = self.settings.host
        self.server_port = self.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.server_port}"

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            sock, addr = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays queued and the listening socket readable: accepting again at once
                # spun the serving thread at full speed, saying nothing.
                self.log_now_and_then("accept", f"cannot accept connections: {exc.strerror}; pausing "
                                      f"(raise the open files limit, or lower --max-connections)")
                time.sleep(ACCEPT_BACKOFF)
            raise
        # Headers and body go out in separate writes: without this, Nagle's
        # algorithm and delayed ACKs add ~40 ms to every answer with a body.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # The handshake happens in the connection's own thread (Handler.setup), not here.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Take a connection the limits leave room for (counted until its thread ends); refuse one they do
        not, at once and cheaply: threads held by idle or slow clients were the service's only limit."""
        client = client_address[0]
        with self._connections_lock:
            over_client = self._per_client.get(client, 0) >= self.settings.max_connections_per_client
            full = over_client or self._connections >= self.settings.max_connections
            if self._connections >= self.settings.max_connections:
                what, why = "refused", f"{self.settings.max_connections} connections at once (--max-connections)"
            elif over_client:
                what, why = "refused-client", f"{self.settings.max_connections_per_client} connections from " \
                                              "one address (--max-connections-per-client)"
            idle = self._make_room(client if over_client else None) if full else None
            if not full or idle is not None:
                self._connections += 1
                self._per_client[client] = self._per_client.get(client, 0) + 1
        if idle is not None:
            try:  # its thread, waiting for the next request, sees the connection end, and ends (under TLS too)
                socket.socket.shutdown(idle.connection, socket.SHUT_RDWR)
            except OSError:
                pass
        if not full or idle is not None:
            return True
        self._refuse(request, f"too many connections: the service serves at most {why}; try again")
        # Each limit logged on its own: under one, a flood from one address hid that the total limit was
        # refusing every other client, and the count of refusals after the line mixed the two.
        self.log_now_and_then(what, f"{client} connection refused: the service serves at most {why}")
        return False

    def _make_room(self, client: str | None) -> Any:
        """The handler of the keep-alive connection (``client``'s, if given) that has waited longest for its next
        request, taken off the waiting ones, to be closed for a new connection: at the limits, a client's pool of
        idle connections, or a flood of them, had every new client refused until the idle timeout closed one.
        None where none waits.  (The count of connections goes over the limit until its thread ends, by as many
        as were waiting: each holds no more than its socket.)  Called with ``_connections_lock`` held."""
        for handler, address in self._waiting.items():
            if client is None or address == client:
                if _unread_bytes(handler.connection):  # its next request has arrived, not yet read: not waiting
                    continue
                del self._waiting[handler]
                return handler
        return None

    def waiting(self, handler: Any, waits: bool) -> bool:
        """Say that ``handler``'s keep-alive connection waits for its next request, or no longer does; False when
        it was closed for a new connection meanwhile."""
        with self._connections_lock:
            if waits:
                self._waiting[handler] = handler.client_address[0]
                return True
            return self._waiting.pop(handler, None) is not None

    def _refuse(self, request: Any, message: str) -> None:
        """One 503 answer saying ``message``, where it fits into the socket's buffer at once (over TLS, none: the
        handshake is not made for it); the caller closes the connection.  Its Retry-After is a second, which clients
        wait: a place is free once any request ends, and 5 s had a pool of connections larger than the limit per
        client take ten times as long as its retries on the backoff did."""
        if isinstance(request, ssl.SSLSocket):
            return
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                f"\r\n{LIMIT_HEADER}: {self.settings.max_object_size}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.send(head.encode() + body, socket.MSG_DONTWAIT)
        except OSError:
            pass

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException as exc:
            self._release(client_address[0])  # no thread started, so none will release it
            limit = resource_exhausted(exc)
            if limit is not None:  # nothing read yet: a 503 says why, where a bare close read as a network fault
                self._refuse(request, f"the service cannot take this connection now: {limit}; try again")
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def _release(self, client: str) -> None:
        with self._connections_lock:
            self._connections -= 1
            left = self._per_client.pop(client, 1) - 1
            if left:
                self._per_client[client] = left

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, PlainHTTPOnTLS):
            self.log(f"{client_address[0]} plain HTTP request refused: this service speaks HTTPS")
        elif isinstance(exc, TLSHandshakeLate):
            self.log(f"{client_address[0]} connection closed: its TLS handshake did not end within "
                     f"{self.settings.header_timeout:g} s (header_timeout)")
        elif isinstance(exc, ssl.SSLError):
            self.log(f"{client_address[0]} TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
        elif (limit := resource_exhausted(exc)) is not None:  # no bug: the limits the service runs under
            self.log(f"{client_address[0]} connection closed: {limit}")
        elif isinstance(exc, OSError):
            self.log(f"{client_address[0]} connection lost: {exc.strerror or type(exc).__name__}")
        else:
            self.log(f"{client_address[0]} internal error: {type(exc).__name__}: {exc}")

    def reload(self) -> None:
        """Read the tokens file and the TLS certificate again (SIGHUP): a revoked token is refused from the
        next request on, a renewed certificate served from the next connection on, without a restart that
        would cut the backups under way.  A file that no longer loads keeps what was loaded, and says so."""
        settings = self.settings
        try:
            tokens = load_tokens(settings.tokens_file, settings.repositories) if settings.tokens_file else None
            tls = _tls_context(settings.tls_cert, settings.tls_key) if self.tls is not None else None
        except UsageError as exc:
            self.log(f"reload failed, serving with the settings loaded before: {exc}", always=True)
            return
        if tokens is not None:
            settings.tokens = tokens
        if tls is not None:
            self.tls = tls
        loaded = [f"{len(tokens)} token(s)"] if tokens is not None else []
        self.log(f"reloaded {' and '.join(loaded + (['the TLS certificate'] if tls is not None else [])) or 'nothing'}",
                 always=True)

    def remove_unfinished_uploads(self) -> None:
        """Temp files a crash of this server left behind, or an upload stopped in a way that left one (an hour
        old: a live upload writes at least every body_timeout, and the ones being written are skipped), in
        each repository."""
        removed = 0
        try:
            repositories = self.served.existing()
        except RemoteError as exc:
            self.log(f"cannot remove unfinished uploads: {exc}", always=True)
            return
        for served in repositories:  # one that fails leaves the others' cleaned up
            try:
                removed += served.remote.cleanup_temp(UNFINISHED_AGE)
            except RemoteError as exc:
                self.log(f"cannot remove unfinished uploads: {exc}", always=True)
        if removed:
            self.log(f"removed {removed} unfinished upload(s)", always=True)

    def clean_up_now_and_then(self, stop: threading.Event) -> None:
        """Remove abandoned uploads at start and every ``cleanup_interval`` seconds after, until ``stop``:
        once at start left those of a crash until the next restart."""
        while True:
            self.remove_unfinished_uploads()
            if stop.wait(self.settings.cleanup_interval):
                return

    def redacted(self, text: str) -> str:
        """``text`` with each token the service takes written as ``***``, in any escapes (``redact``): a request
        whose head arrived out of step (a header line read as the request line) had its token quoted in the log
        ("Bad request version")."""
        return redact(text, [token.decode() for token, *_ in self.settings.tokens or ()])

    def log(self, line: str, *, always: bool = False) -> None:
        if always or not self.settings.quiet:
            line = _printable(self.redacted(line))
            with self._log_lock:
                sys.stderr.write(f"{PROG}: {line}\n")
                sys.stderr.flush()

    def log_now_and_then(self, what: str, line: str) -> None:
        """Log ``line`` unless a line of this ``what`` went out less than REPEAT_LOG_EVERY ago (then count it):
        a flood of refused connections must not flood the log too."""
        now = time.monotonic()
        with self._connections_lock:
            if now - self._last_said.get(what, -REPEAT_LOG_EVERY) < REPEAT_LOG_EVERY:
                self._unsaid[what] = self._unsaid.get(what, 0) + 1
                return
            self._last_said[what] = now
            unsaid = self._unsaid.pop(what, 0)
        self.log(line + (f" ({unsaid} more like it since the last such line)" if unsaid else ""), always=True)

    def request_started(self) -> None:
        with self._idle:
            self._active += 1

    def request_done(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Let requests in flight finish (not idle keep-alive connections)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)


def _unread_bytes(sock: socket.socket) -> int:
    """The bytes that arrived on ``sock`` and were not read yet (a TLS socket's decrypted ones too); 1 when that
    cannot be told."""
    try:
        pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
        return pending or struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return 1


class BodyPace:
    """How an upload's body must keep arriving: a byte within ``gap`` seconds of the last one, and each
    ``rate * window`` bytes within ``window`` seconds of the previous ones (a burst earns no credit beyond its own
    window).  A client that holds a connection and a temp file so pays for it with bandwidth, however large the
    length it declares.  A link that stalls for less than the gap goes on while each window still brings the rate's
    bytes: one at twice the rate rides out a stall of the gap, one just above it none."""

    def __init__(self, rate: int, gap: float, window: float):
        self.rate, self.gap, self.window = rate, gap, window
        self.received = 0
        self.last = self.mark = time.monotonic()  # the last byte's arrival; the current window's start
        self.at_mark = 0  # bytes received when the current window began

    def due(self) -> float:
        """When the body is cut off unless more of it arrives."""
        return min(self.last + self.gap, self.mark + self.window)

    def arrived(self, n: int) -> None:
        self.received += n
        self.last = time.monotonic()
        if self.received - self.at_mark >= self.rate * self.window:
            self.mark, self.at_mark = self.last, self.received

    def why(self) -> str:
        """Why a body that reached ``due`` is cut off."""
        if self.last + self.gap <= self.mark + self.window:
            return f"no byte for {self.gap:g} s (--body-timeout)"
        return (f"{self.received - self.at_mark} bytes in {self.window:g} s, below the "
                f"{format_size(self.rate)}/s --min-upload-rate")


class _DeadlineReader(socket.SocketIO):
    """A connection's reads, each allowed only the time left to its handler's deadline (``Handler._timeout``):
    a timeout per read alone let a client that sends a byte a second hold its connection for ever."""

    def __init__(self, sock: socket.socket, handler: "Handler"):
        super().__init__(sock, "rb")
        self._handler = handler

    def readinto(self, b: Any) -> int | None:
        try:
            self._handler._arm_timeout()
            n = super().readinto(b)
        except TimeoutError:
            self._handler._stalled()
            raise
        if n:
            self._handler._received(n)
        return n


LOGGED_TEXT = 200  # characters of a path or reason a log line keeps: a client without a token sent 64 KiB ones


def _shortened(text: str) -> str:
    return text if len(text) <= LOGGED_TEXT else text[:LOGGED_TEXT] + f"... ({len(text)} characters)"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chunkvault-serve"
    sys_version = ""
    timeout = READ_TIMEOUT
    server: BackupServer
    # What the connection waits for: "idle" (a request's first byte: idle_timeout on a keep-alive connection,
    # header_timeout from its start on a new one), "head" (the rest of its line and headers, header_timeout from
    # the first byte, or from a new connection's start), "body" (a body's reads paced by BodyPace), "linger".
    _phase = "head"
    _deadline: float | None = None
    _pace: BodyPace | None = None  # while a body is read: how it must keep arriving
    _cut: str | None = None  # why the body was cut off, when it did not keep that pace
    _timeout_set: float | None = None
    _expecting = False  # the client waits for "100 Continue" before it sends the body
    _served = 0  # requests begun on this connection
    _repo: Served | None = None  # the repository the request is for, once its path named one
    _opened = 0.0  # when the connection was taken (setup)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))
        self._opened = time.monotonic()
        if isinstance(self.connection, ssl.SSLSocket):
            # The handshake (and a plain request's head) get the time a request's head gets: CPython bounds
            # the whole handshake, not each read in it, by the socket's timeout.
            self._deadline = self._opened + self.server.settings.header_timeout
            self._arm_timeout()
            try:  # a client that sends nothing at all is as late as one that stops half-way
                self._refuse_plain_http()
                self.connection.do_handshake()
            except TimeoutError:
                raise TLSHandshakeLate() from None

    def _arm_timeout(self) -> None:
        """Before each read: the socket's timeout is what is left to the deadline or to a body's pace (BodyPace),
        or READ_TIMEOUT."""
        timeout = READ_TIMEOUT
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
        if self._pace is not None and getattr(self, "_unread", 0) > 0:
            timeout = min(timeout, self._pace.due() - time.monotonic())
        if timeout <= 0:
            raise TimeoutError("deadline passed")
        if timeout != self._timeout_set:
            self.connection.settimeout(timeout)
            self._timeout_set = timeout

    def _received(self, n: int) -> None:
        """Bytes arrived: an idle connection's request has begun, and its head now has header_timeout; or a body
        goes on."""
        if self._phase == "idle":
            self.server.waiting(self, False)
            self._phase = "head"
            if self._served > 1:  # a new connection's first request keeps the deadline it started with
                self._deadline = time.monotonic() + self.server.settings.header_timeout
        elif self._pace is not None and self._unread > 0:
            self._pace.arrived(n)

    def _stalled(self) -> None:
        """A read timed out: a body being read fell behind its pace (which the log line of its request says)."""
        if self._pace is not None and getattr(self, "_unread", 0) > 0:
            self._cut = self._pace.why()

    def _start_pace(self) -> None:
        settings = self.server.settings
        self._pace = BodyPace(settings.min_upload_rate, settings.body_timeout, RATE_WINDOWS * settings.body_timeout)

    def handle_one_request(self) -> None:
        # What the last request on this connection named is not this one's: a malformed request after it was
        # logged under the previous request's key.
        self._what, self._unread, self._repo = "-", 0, None
        self._phase, self._expecting, self._pace, self._cut = "idle", False, None, None
        if self._served:  # a keep-alive connection, which may be closed for a new one (BackupServer._make_room)
            self._deadline = time.monotonic() + self.server.settings.idle_timeout
            self.server.waiting(self, True)
        else:
            # A new connection's first request, its line and headers all of them, within the header timeout of
            # the connection's start (the TLS handshake's included), as nginx's client_header_timeout: it waited the
            # idle timeout for its first byte, and a few hundred sockets that connect and send nothing (slowloris)
            # held every place at the connection limit for a minute at a time.
            self._deadline = self._opened + self.server.settings.header_timeout
        self._served += 1
        super().handle_one_request()

    def finish(self) -> None:
        self.server.waiting(self, False)
        super().finish()

    def parse_request(self) -> bool:
        rfile, self.rfile = self.rfile, _HeadersReader(self.rfile)
        try:
            parsed = super().parse_request()
        finally:
            self.rfile = rfile
        self._phase, self._deadline = "body", None  # the head is in; a body's reads are paced (BodyPace)
        self._arm_timeout()  # and so do the answer's writes
        return parsed

    def handle_expect_100(self) -> bool:
        """Say "100 Continue" only once the token, the key and the length passed (``_continue``), so that a
        refused upload is not sent at all."""
        self._expecting = True
        return True

    def _continue(self) -> None:
        if self._expecting:
            self._expecting = False
            self.send_response_only(100)
            self.end_headers()
            self._start_pace()  # the body is sent from now on

    def log_error(self, format: str, *args: Any) -> None:
        if format.startswith("Request timed out"):
            if self._phase == "idle":
                return  # an idle connection closed: nothing went wrong
            if self._phase == "head":
                self.server.log(f"{self.client_address[0]} connection closed: the request's line and headers did "
                                f"not arrive within {self.server.settings.header_timeout:g} s (header_timeout)")
                return
        super().log_error(format, *args)

    def _refuse_plain_http(self) -> None:
        """A client that speaks plain HTTP to the HTTPS port gets one plain answer saying so (as nginx does),
        not a dropped connection it would retry as a network fault."""
        first = socket.socket.recv(self.connection, 1, socket.MSG_PEEK)  # the TCP bytes, under the TLS layer
        if not first or 0x14 <= first[0] <= 0x17:  # a TLS record (a handshake's, or an alert a client gave up with)
            return
        asked = self._plain_head()
        said = f"this backup service speaks HTTPS: its URL is {self._https_url(asked)}{self._repository_of(asked)}"
        body = json.dumps({"error": said}).encode()  # the reason phrase says it too, for a HEAD request
        head = (f"HTTP/1.1 400 {said}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        socket.socket.sendall(self.connection, head + body)
        raise PlainHTTPOnTLS()

    def _plain_head(self) -> bytes:
        """The head of the plain HTTP request on the HTTPS port, as far as it arrives in time (at most 8 KiB)."""
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 8192:
                self._arm_timeout()
                piece = socket.socket.recv(self.connection, 8192 - len(head))
                if not piece:
                    break
                head += piece
        except OSError:
            pass
        return head

    def _repository_of(self, head: bytes) -> str:
        """``NAME/`` of the repository a plain request's line names, for the https:// URL it is told (a service of
        several repositories); "" where it names none."""
        if not self.server.settings.repositories:
            return ""
        words = head.split(b"\r\n", 1)[0].split()
        target = _origin_form(words[1].decode("latin-1")) if len(words) >= 2 else ""
        name = target[1:].partition("/")[0]
        return f"{name}/" if is_repository_name(name) else ""

    def _https_url(self, head: bytes) -> str:
        """The service's https:// URL under the name the client used (its Host header, when that is a host
        name or address with an optional port), else under the address it connected to."""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"host":
                host = value.strip().decode("latin-1")
                match = _HOST_HEADER.match(host)
                if match:
                    return f"https://{host if match.group(3) else f'{host}:{self.server.server_port}'}/"
                break
        address = self.connection.getsockname()[0]
        address = f"[{address}]" if ":" in address else address
        return f"https://{address}:{self.server.server_port}/"

    # -- plumbing -----------------------------------------------------------

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one line per request is written by _log, with the key and byte count

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.client_address[0]} " + (format % args))

    def _log(self, status: int, nbytes: int, reason: str = "") -> None:
        """One line per request; a refusal says why, and a failure of the server's own (a full or read-only
        disk) is logged under --quiet too: it said only "507 124", or nothing."""
        own = status >= 500 or reason.startswith("the server cannot")
        what, reason = self.server.redacted(self._what), self.server.redacted(reason)  # before they are cut
        self.server.log(f"{self.client_address[0]} {self.command or '-'} {_shortened(what)} {status} {nbytes}"
                        + (f": {_shortened(reason)}" if reason else ""), always=own)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests (bad request line, unknown method): JSON, then close."""
        self.close_connection = True
        if isinstance(sys.exc_info()[1], HeadersTooLarge):  # the parser says "Too many headers" of any it raised
            message = str(sys.exc_info()[1])
        self._fail(code, message or self.responses.get(code, ("error",))[0], close=True)

    def _reply(self, status: int, body: bytes = b"", *, length: int | None = None,
               headers: dict[str, str] | None = None, close: bool = False, received: int = 0,
               reason: str = "") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header(LIMIT_HEADER, str(self.server.settings.max_object_size))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self._log(status, received or (len(body) if self.command != "HEAD" else 0), reason)

    def _fail(self, status: int, reason: str, *, headers: dict[str, str] | None = None, close: bool = False) -> None:
        """An error answer; a body we will not use is dropped (or the connection closed).  A client waiting
        for "100 Continue" has not sent its body: the connection is closed, in case it sends it after all."""
        unread = self._unread
        if self._expecting:
            self._expecting, unread, self._unread = False, 0, 0
            close = True
        close = close or unread > DRAIN_LIMIT
        reason = self.server.redacted(reason)  # what the request brought, a token in it, is quoted in reasons
        body = json.dumps({"error": reason}).encode() + b"\n"
        self._reply(status, body, headers={"Content-Type": "application/json", **(headers or {})}, close=close,
                    reason=reason)
        if unread:
            if close:  # linger briefly, so a client still sending can read the answer
                self._phase, self._deadline = "linger", time.monotonic() + LINGER_TIMEOUT
            self._discard(min(unread, DRAIN_LIMIT))

    def _refused_by_storage(self, what: str, key: str, exc: PermissionDenied) -> None:
        """403 for a file or directory the service's user may not write, delete or list.  The log says whose it is
        and its mode; the answer does not: the server's paths and users are none of a client's business."""
        self.server.log(f"{self.client_address[0]} {self.command} {key}: {exc}", always=True)
        self._fail(403, f"the server cannot {what} {key}: permission denied (its log says why)")

    def _discard(self, n: int) -> None:
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, COPY_CHUNK))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            self.close_connection = True
        self._unread = 0

    # -- dispatch -----------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._what = "-"
        self._unread = 0
        self.server.request_started()
        try:
            self._route()
        finally:
            self.server.request_done()

    def _route(self) -> None:
        lengths = self.headers.get_all("Content-Length") or []
        length = lengths[0] if lengths else None
        if self.headers.get("Transfer-Encoding"):
            return self._fail(411, "send the body with Content-Length, not Transfer-Encoding", close=True)
        if length is not None:
            # ASCII digits only ("²" is a digit to str.isdigit), and one length: with two, the rest of a
            # body was read as the next request; beyond 19 digits no object's length (and past 4300, int()
            # refuses the text: the connection dropped with no answer)
            if len(lengths) > 1 or not (length.isascii() and length.isdigit()) or len(length) > 19:
                return self._fail(400, "bad Content-Length", close=True)
            self._unread = int(length)
            self._start_pace()
        several = self.server.settings.repositories
        # A service of several repositories reads the target as sent: the parser makes "//NAME/..." "/NAME/...".
        path, _, query = _origin_form(self._target() if several else self.path).partition("?")
        self._what = path
        token = self._authorize()
        if token is None:
            return None
        mode = token.mode
        if self._unread and self.command != "PUT":
            return self._fail(400, f"{self.command} takes no request body")
        if several:
            inner = self._enter_repository(path, token.scope)
            if inner is None:
                return None
            path = inner
        else:
            self._repo = self.server.served.one
        if path in ("/objects", "/objects/"):
            self._what = self._named("list")
            if self.command != "GET":
                return self._fail(405, f"{self.command} is not allowed on the listing", headers={"Allow": "GET"})
            return self._list(query)
        if not path.startswith("/objects/"):
            return self._fail(404, f"no such endpoint {self.server.redacted(path)[:100]!r} (objects live under "
                                   "/objects/)")  # redacted before it is cut
        try:
            key = _key_from_path(path[len("/objects/") :])
        except (BadRequest, UnicodeDecodeError) as exc:
            reason = str(exc) if isinstance(exc, BadRequest) else "object key is not valid UTF-8"
            return self._fail(400, reason)
        self._what = self._named(key)
        if not _LAYOUT_KEY.match(key):  # read, written or deleted: nothing else in the directory is served
            return self._fail(404 if self.command in ("GET", "HEAD") else 400,
                              f"{key} is not an object of a repository (config, keys/NAME, locks/NAME, "
                              "index/NAME, snapshots/NAME, wal/NAME, data/XX/NAME with XX two hex digits)")
        if self.command in ("GET", "HEAD"):
            return self._get(key)
        if self.command == "PUT":
            return self._put(key, mode)
        return self._delete(key, mode)

    def _append_only(self) -> str:
        """Why a request is held to append-only: a full token can do more where the service is not capped."""
        if self.server.settings.append_only:
            return "append-only (the service runs with --append-only, which caps every token)"
        return "append-only token"

    def _target(self) -> str:
        """The request's target as its line sent it."""
        words = self.requestline.split()
        return words[1] if len(words) >= 2 else self.path

    def _named(self, what: str) -> str:
        """``what`` (a key, or "list") as the log names it: with its repository's name, where there are several
        (``db1/config``, ``list db1``)."""
        name = self._repo.name if self._repo is not None else None
        if name is None:
            return what
        return f"list {name}" if what == "list" else f"{name}/{what}"

    def _enter_repository(self, path: str, scope: frozenset[str] | None) -> str | None:
        """The path within the repository ``path`` names (``/NAME/objects/KEY``: ``/objects/KEY``), that
        repository taken for the request; None after answering.  A path with an empty, "." or ".." segment
        (as sent, or percent-encoded), or a name that is no repository's, is answered 400; a repository out of
        the token's ``scope`` 404, as one that does not exist, whether it does or not."""
        if not path.startswith("/"):  # "xB/objects/KEY" had its first character taken for the slash: B was served
            return self._fail(400, "the request's target is no path (one starts with '/'): the service's URLs are "
                                   "/NAME/objects/KEY")
        segments = path.split("/")[1:]
        for segment in segments[:-1] if segments[-1:] == [""] else segments:  # "/NAME/objects/" lists
            plain = unquote(segment, errors="replace")
            if plain in ("", ".", "..") or "/" in plain or "\\" in plain:
                return self._fail(400, "the path holds an empty, '.' or '..' segment, or an encoded slash: the "
                                       "service's URLs are /NAME/objects/KEY")
        name, _, rest = path[1:].partition("/")
        if not is_repository_name(name):
            return self._fail(400, f"{self.server.redacted(name)[:100]!r} is no repository name ({NAME_PATTERN}): "
                                   "the service's URLs are /NAME/objects/KEY")
        if scope is not None and name not in scope:
            return self._fail(404, f"no repository {name!r} that this token may use (the service serves several, "
                                   "each at /NAME/)", headers={MISSING_HEADER: NO_REPOSITORY})
        if rest != "objects" and not rest.startswith("objects/"):
            return self._fail(404, f"no such endpoint {self.server.redacted(path)[:100]!r}: this service serves "
                                   "several repositories, each at /NAME/, its objects under /NAME/objects/")
        self._repo = self.server.served.get(name)
        return "/" + rest

    def _authorize(self) -> Token | None:
        """The request's token, its mode capped by --append-only (a full one for a service without tokens), or
        None after answering 401."""
        tokens = self.server.settings.tokens
        if tokens is None:
            host = _host_of(self.headers.get("Host", ""))
            if host and not is_loopback(host):
                # A web page whose name was rebound to 127.0.0.1 reaches a service without tokens: its requests
                # name that page's host, never a loopback one.
                self._fail(403, "a service without tokens answers only requests addressed to a loopback name "
                                "(127.0.0.1, ::1, localhost); give it --tokens to serve others", close=True)
                return None
            token = Token(b"", "full")
        else:
            scheme, _, value = self.headers.get("Authorization", "").partition(" ")
            found = _match(tokens, value.strip().encode()) if scheme.lower() == "bearer" else None
            if found is None:
                reason = ("the token is not in the server's tokens file" if scheme
                          else "this service requires a token (Authorization: Bearer TOKEN)")
                # Closed, not drained: a body is read for no one without a token (its declared length set
                # how long a drain may take, and a client trickling it held a connection for hours).
                self._fail(401, reason, headers={"WWW-Authenticate": 'Bearer realm="chunkvault"'}, close=True)
                return None
            token = found
        if self.server.settings.append_only and token.mode == "full":
            token = Token(token.secret, "append-only", token.scope)
        return token

    # -- operations ---------------------------------------------------------

    def _list(self, query: str) -> None:
        params = parse_qs(query, keep_blank_values=True)
        prefix = params.get("prefix", [""])[0]
        after = params.get("after", [""])[0]
        limit_text = params.get("limit", [str(PAGE_SIZE)])[0]
        try:
            validate_prefix(prefix)
            if after:
                validate_key(after)
        except UsageError as exc:
            return self._fail(400, str(exc))
        if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 19) or int(limit_text) < 1:
            return self._fail(400, "limit must be a positive number")  # "²" is a digit to isdigit() too
        self._what = self._named("list") + f" prefix={prefix!r}"
        root = self._repo.root
        try:
            items, next_after = list_page(root, prefix, after, min(int(limit_text), PAGE_SIZE))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):  # for good (a directory of root's, mode 0700): a 500 is retried
                where = os.path.relpath(exc.filename, root) if exc.filename else root
                return self._refused_by_storage("list", repr(prefix), os_error(exc, f"listing {where}", root))
            return self._fail(500, f"cannot list {prefix!r}: {exc.strerror or exc}")
        if params.get("versions", [""])[0] != "1":  # clients that ask for no versions get [key, size] pairs
            items = [(key, size) for key, size, *_ in items]  # type: ignore[misc]
        body = json.dumps({"objects": items, "next": next_after}, separators=(",", ":")).encode()
        self._reply(200, body, headers={"Content-Type": "application/json"})

    def _object_path(self, key: str) -> str:
        return os.path.join(self._repo.root, *key.split("/"))

    def _missing(self, key: str) -> None:
        self._fail(404, f"object not found: {key}", headers={MISSING_HEADER: "missing"})

    def _get(self, key: str) -> None:
        try:  # an object is a file, never a link (listings leave links out: no object is served they hide)
            f = open(self._object_path(key), "rb", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return self._missing(key)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._missing(key)
            if exc.errno in (errno.EACCES, errno.EPERM):  # for good (a file of root's, mode 0600): a 500 is retried
                return self._fail(403, f"the server cannot read {key}: {exc.strerror}")
            return self._fail(500, f"cannot read {key}: {exc.strerror}")
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return self._missing(key)
            size = st.st_size
            if self.command == "HEAD":
                return self._reply(200, length=size)
            start, end = 0, size - 1
            status, headers = 200, {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
            requested = self.headers.get("Range")
            if requested is not None:
                match = _RANGE.match(requested.strip())
                if not match:
                    return self._fail(400, "only one 'bytes=A-B' or 'bytes=A-' range is supported")
                start = int(match.group(1))
                if match.group(2):
                    end = min(end, int(match.group(2)))
                    if end < start and start < size:
                        return self._fail(400, "range ends before it starts")
                if start >= size:
                    return self._fail(416, "range starts at or past the end", headers={"Content-Range": f"bytes */{size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._stream(f, status, start, end - start + 1, headers)

    def _stream(self, f: Any, status: int, start: int, count: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(count))
        self.send_header(LIMIT_HEADER, str(self.server.settings.max_object_size))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        f.seek(start)
        sent = 0
        timeout = self._timeout_set = self.server.settings.body_timeout
        self.connection.settimeout(timeout)
        piece = TLS_SEND_PIECE if isinstance(self.connection, ssl.SSLSocket) else COPY_CHUNK
        try:
            while sent < count:
                chunk = f.read(min(COPY_CHUNK, count - sent))
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    n = self.connection.send(view[:piece])
                    view, sent = view[n:], sent + n
        except OSError as exc:
            # Logged with the key and the cause: a slow reader's line said "Request timed out: TimeoutError"
            self.close_connection = True
            stalled = isinstance(exc, TimeoutError)
            why = (f"the connection took no byte for {timeout:g} s (--body-timeout)" if stalled
                   else f"the client went away ({exc.strerror or type(exc).__name__})")
            self.server.log(f"{self.client_address[0]} {self.command} {self._what}: answer cut short after {sent} "
                            f"of {count} bytes: {why}", always=stalled)
            return
        if sent < count:
            self.close_connection = True  # the client will see the body cut short
        self._log(status, sent)

    def _put(self, key: str, mode: str) -> None:
        """Everything that can refuse the upload is checked before its body is asked for ("100 Continue")
        or read."""
        if self.headers.get("Content-Length") is None:
            return self._fail(411, "PUT needs a Content-Length", close=True)
        if mode == "read-only":
            return self._fail(403, "read-only token: writing is not allowed")
        if mode != "full" and key.startswith(EXCLUSIVE_LOCK_PREFIX):
            # Refused before anything else the command would store; and such a lock may take the disk's
            # reserve, kept for the forget or prune that frees a full disk.
            return self._fail(403, f"{self._append_only()}: an exclusive lock is for forget, prune, aggregate, tag, "
                                   "rewrite, the repairs, archive-expire, config set and key passwd, remove and import, "
                                   "which change or delete what is stored")
        length = self._unread
        limit = self.server.settings.max_object_size
        if length > limit:
            return self._fail(413, f"object of {length} bytes is above the server's limit of {limit} bytes (--max-object-size)")
        shared_only = mode != "full" and key.startswith(LOCKS_PREFIX)  # held in memory, and read, to be checked
        if shared_only and length > SMALL_BODY:
            return self._fail(403, f"{self._append_only()}: {key} of {length} bytes is no shared lock (those take a "
                                   f"few hundred bytes; the most one may be is {SMALL_BODY >> 10} KiB): a larger object "
                                   "under locks/ needs a full token")
        collision = self._collision(key)
        if collision:
            return self._fail(409, collision)
        if_absent = self.headers.get("If-None-Match", "").strip() == "*"
        guarded = mode == "append-only" and not key.startswith(LOCKS_PREFIX)
        if (if_absent or guarded) and os.path.lexists(self._object_path(key)):
            return self._exists(key, if_absent)
        if self._repo.name is not None:  # a write makes its repository (init's first), a token that may write it
            try:
                self._repo = self.server.served.create(self._repo.name)
            except RepositoryInTheWay as exc:
                return self._fail(409, f"cannot store {key}: {exc}")
            except PermissionDenied as exc:
                return self._refused_by_storage("make repository", self._repo.name, exc)
            except RemoteError as exc:
                return self._fail(500, str(exc))
        self._continue()
        try:
            stored = self._store(key, length, if_absent or guarded, shared_only, reserve=mode == "full")
        except ObjectExists:
            return self._exists(key, if_absent)
        except NotSharedLock:
            return self._fail(403, self._not_shared(key))
        except StorageFull as exc:
            return self._fail(507, str(exc))
        except ObjectTooLarge as exc:  # the server's file size limit: answered as --max-object-size is
            return self._fail(413, str(exc))
        except PermissionDenied as exc:
            return self._refused_by_storage("write", key, exc)
        except RemoteError as exc:
            collision = self._collision(key)  # made by another upload meanwhile
            return self._fail(409, collision) if collision else self._fail(500, str(exc))
        if not stored:
            self.close_connection = True
            why = self._cut or "the client stopped sending"
            self.server.log(f"{self.client_address[0]} PUT {self._what}: upload cut short after "
                            f"{length - self._unread} of {length} bytes, nothing stored: {why}",
                            always=self._cut is not None)
            return None
        self._reply(201, received=length)

    def _store(self, key: str, length: int, if_absent: bool, shared_only: bool = False, *, reserve: bool) -> bool:
        """Store the body under ``key``; False when the client stopped short.  A large body goes straight into
        the temp file it is stored through, never whole into memory: uploads at once from clients with
        append-only tokens ran the server out of memory.  With ``shared_only``, a body that is no shared lock
        is refused (NotSharedLock), nothing stored.  ``reserve``: whether a full disk may take the space kept
        back for a forget or prune (a full token's request)."""
        if length > SMALL_BODY:
            return self._repo.remote.put_stream(key, self._receive, length, if_absent=if_absent, reserve=reserve)
        body = self._read_body(length)
        if body is None:
            return False
        if shared_only and not _says_shared(bytes(body)):
            raise NotSharedLock(key)
        self._repo.remote.put(key, body, if_absent=if_absent, reserve=reserve)
        return True

    def _receive(self, n: int) -> bytes:
        """Up to ``n`` bytes of the body as they arrive; b"" when the client stopped or fell silent."""
        try:
            piece = self.rfile.read1(n)
        except OSError:
            piece = b""
        if not piece:
            self.close_connection = True
        self._unread -= len(piece)
        return piece

    def _not_shared(self, key: str) -> str:
        return (f"{self._append_only()}: {key} is no shared lock (JSON of kind {SHARED_LOCK_KIND!r}); an exclusive "
                "lock, or any other kind, which clients take for exclusive, needs a full token")

    def _exists(self, key: str, if_absent: bool) -> None:
        if if_absent:
            return self._fail(412, f"object already exists: {key}")
        return self._fail(403, f"{self._append_only()}: existing object {key} may not be overwritten (only shared locks may)")

    def _collision(self, key: str) -> str | None:
        """Why ``key`` cannot be stored, when a file stands where its path needs a directory or a directory
        where it needs a file: permanent, unlike a failing disk, so the client is told not to retry.  A link
        to a directory is one (an operator moved ``data`` to a larger disk): called a file, the message told
        the operator to remove what held every pack."""
        parts = key.split("/")
        for depth in range(1, len(parts) + 1):
            try:
                path = os.path.join(self._repo.root, *parts[:depth])
                st = os.stat(path) if depth < len(parts) else os.lstat(path)
            except OSError:
                return None
            where = "/".join(parts[:depth])
            if depth < len(parts) and not stat.S_ISDIR(st.st_mode):
                return f"cannot store {key}: {where} is a file where the repository needs a directory " \
                       "(the service's operator must remove it)"
            if depth == len(parts) and stat.S_ISDIR(st.st_mode):
                return f"cannot store {key}: a directory stands in its place (the service's operator must remove it)"
        return None

    def _read_body(self, length: int) -> bytearray | None:
        """The body, or None when the client stops short.  The buffer grows with what arrives, a piece at a
        time: allocating the declared length at once let a client that declares large objects and sends
        nothing hold the server's memory."""
        buf = bytearray()
        try:
            while len(buf) < length:
                piece = self.rfile.read1(min(length - len(buf), BODY_PIECE))
                if not piece:
                    return None
                buf += piece
        except OSError:
            return None
        finally:
            self._unread = length - len(buf)
        return buf

    def _delete(self, key: str, mode: str) -> None:
        if mode == "read-only":
            return self._fail(403, "read-only token: deleting is not allowed")
        if mode == "append-only" and not key.startswith(LOCKS_PREFIX):
            return self._fail(403, f"{self._append_only()}: deleting {key} is not allowed (only shared locks may be deleted)")
        if mode == "append-only" and key.startswith(EXCLUSIVE_LOCK_PREFIX):
            # Removing a running prune's lock let the backups it held off read the index while it deleted
            # packs; a stale exclusive lock is passed over by the commands that meet it all the same.
            return self._fail(403, f"{self._append_only()}: deleting {key} is not allowed (an exclusive lock is "
                                   "removed by its own command, or by unlock with a full token)")
        try:
            self._repo.remote.delete(key)
        except PermissionDenied as exc:
            return self._refused_by_storage("delete", key, exc)
        except RemoteError as exc:  # a directory in its place is permanent: a 500 was retried for minutes
            collision = self._collision(key)
            return self._fail(409, collision.replace("cannot store", "cannot delete", 1)) if collision \
                else self._fail(500, str(exc))
        self._reply(204)


def _match(tokens: list[Token], offered: bytes) -> Token | None:
    """Compare against every token in constant time per token; no early exit."""
    found = None
    for token in tokens:
        if hmac.compare_digest(token.secret, offered):
            found = token
    return found


# --- main -----------------------------------------------------------------------------


OWN_DESCRIPTORS = 24  # what the service holds besides its connections: listening socket, log, repository, lock


def _warnings(settings: Settings) -> list[str]:
    """What the settings will cost the clients, said once at start.  Raises the open files limit (soft, up to
    the hard one) to what the connection limits need, so that they, not the kernel, are what refuses; where
    the hard limit is lower, lowers the connection limits to what it holds."""
    warnings = []
    if settings.tokens is not None and settings.tls_cert is None and not is_loopback(settings.host):
        warnings.append(f"serving {settings.host} over plain http: each client's token (and every object, "
                        "sealed as it is) travels unencrypted, and anyone on the path who reads a token can read, "
                        "overwrite and delete the backups (--tls-cert and --tls-key serve https)")
    if not settings.repositories and not holds_repository(settings.path):
        below = repositories_below(settings.path)
        if below:
            warnings.append(f"{settings.path} holds no repository, and its subdirectories do ({', '.join(below)}): "
                            "--repositories serves each at /NAME/; without it clients reach none of them")
    if settings.max_object_size < PACK_ROOM:
        warnings.append(f"--max-object-size of {settings.max_object_size} bytes is below the {DEFAULT_PACK_SIZE >> 20} "
                        "MiB packs repositories make by default (plus a chunk): clients make smaller packs to fit "
                        "it, and a chunk larger than it cannot be stored")
    try:
        import resource

        needed = 2 * settings.max_connections + 64  # a socket and an upload's temp file each, and the rest
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            fits = min(settings.max_connections, max(1, (raised - OWN_DESCRIPTORS) // 2))
            if fits < settings.max_connections:  # connections beyond what it holds took the descriptors every
                # file open needs; one within it (``needed`` keeps room to spare) is no cause to lower it
                warnings.append(f"the open files limit ({raised}) is below the {needed} that --max-connections "
                                f"{settings.max_connections} needs: lowered to {fits} (raise the "
                                "limit: LimitNOFILE=, ulimit -n)")
                settings.max_connections = fits
                settings.max_connections_per_client = min(settings.max_connections_per_client, fits)
    except (ImportError, ValueError, OSError):
        pass
    return warnings


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT (0 then; 2 for bad settings); SIGHUP reloads the tokens and
    the TLS certificate."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # "chunkvault serve -- --listen ..." hands the separator through
        argv = argv[1:]
    try:
        settings = parse_settings(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except UsageError as exc:  # one line, whatever the arguments it quotes hold (a line break)
        print(f"{PROG}: {_printable(str(exc))}", file=sys.stderr)
        return UsageError.exit_code
    if settings is None:
        return 0
    try:
        server = BackupServer(settings)
    except UsageError as exc:
        print(f"{PROG}: {_printable(str(exc))}", file=sys.stderr)
        return UsageError.exit_code
    except OSError as exc:  # in use, a privileged port, an address not this machine's: the --listen given
        hint = (" (a port below 1024 takes root, or the capability CAP_NET_BIND_SERVICE: the default, 6362, does not)"
                if exc.errno in (errno.EACCES, errno.EPERM) and settings.port < 1024 else "")
        print(_printable(f"{PROG}: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}{hint}"),
              file=sys.stderr)
        return UsageError.exit_code
    stop = threading.Event()
    reload = threading.Event()

    # Run where setting the event cannot find its lock held by the main thread's own wait on it.
    with interrupts.handled({signal.SIGTERM: lambda _: stop.set(), signal.SIGINT: lambda _: stop.set(),
                             signal.SIGHUP: lambda _: reload.set()}):
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="serve",
                                  daemon=True)
        thread.start()
        threading.Thread(target=server.clean_up_now_and_then, args=(stop,), name="cleanup", daemon=True).start()
        if settings.tokens is None:
            server.log("warning: no --tokens: every local user and program can read, overwrite and delete "
                       + ("every repository under this directory" if settings.repositories else "this repository"),
                       always=True)
        for warning in _warnings(settings):
            server.log(f"warning: {warning}", always=True)
        extra = ", append-only" if settings.append_only else ""
        if settings.repositories:
            server.log(f"listening on {server.url} (repositories under {settings.path}, each at "
                       f"{server.url}/NAME/{extra})", always=True)
        else:
            server.log(f"listening on {server.url} (repository {settings.path}{extra})", always=True)
        try:
            while thread.is_alive() and not stop.wait(0.5):
                if reload.is_set():
                    reload.clear()
                    server.reload()
        finally:
            server.shutdown()
            server.server_close()  # the port is free at once: a new service may take it while these finish
            if not server.wait_idle(10.0):
                server.served.abandon_writes()
    server.log("stopped", always=True)
    return 0
