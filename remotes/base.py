"""The small interface every storage backend implements.

A remote stores opaque, immutable objects under string keys ("data/ab/abcd...").
It never sees plaintext and knows nothing of chunks, packs or crypto.  Retries,
parallelism and caching live once, above this interface (``remotes.layer``).
"""
from __future__ import annotations

import inspect
import ipaddress
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

from chunkvault.errors import ObjectNotFound, RemoteUnavailable, UsageError

if TYPE_CHECKING:  # loaded by the remotes that speak TLS: a local repository's command need not load OpenSSL's
    import ssl

# Keys are relative, slash-separated, made of [A-Za-z0-9._-] segments; no "..",
# no leading slash, no empty segment.  Every remote (and the HTTP server) checks
# this, so a key can never escape the repository.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}\Z")


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def served_range(where: str, start: int, length: int | None, data: bytes, content_range: str | None) -> bytes:
    """The bytes of a ranged read (from ``start``, ``length`` of them or to the end) as the storage answered
    it with ``content_range`` (its Content-Range, None for a whole object: something in between dropped the
    Range header, and the range is cut from it).  An answer from elsewhere than ``start``, or of fewer bytes
    than asked where the object it names holds more, is a transfer cut short (RemoteUnavailable, to retry):
    taken as the range, it made an intact pack read as one cut short, or its blobs as damaged."""
    if content_range is None:
        return data[start : None if length is None else start + length]
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None:
        return data
    first, total = int(match[1]), match[3]
    if first != start:
        raise RemoteUnavailable(f"reading {where}: bytes from {start} were asked, and {content_range} came")
    if total != "*":
        want = max(0, int(total) - start)
        if length is not None:
            want = min(want, length)
        if len(data) != want:
            raise RemoteUnavailable(f"reading {where}: got {len(data)} of the {want} bytes asked for "
                                    f"(the object holds {total})")
    return data


def from_environment(variables: Iterable[str]) -> str | None:
    """The first of ``variables`` set to something in the environment (a remote's option it stands for)."""
    return next((os.environ[v] for v in variables if os.environ.get(v)), None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, without brackets) is this machine's loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


X509_NAME_MISMATCH = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
X509_OUT_OF_DATE = (9, 10)  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
X509_WRONG_PURPOSE = 26  # X509_V_ERR_INVALID_PURPOSE: issued for TLS clients, or for mail, not for a TLS server
# The trusted certificates hold none the chain was issued by: X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
# DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
# UNABLE_TO_VERIFY_LEAF_SIGNATURE
X509_NO_ISSUER = (2, 18, 19, 20, 21)


def cert_hint(verify_code: int | None, holder: str, trust: str) -> str:
    """What to do about the certificate of ``holder`` (its service, its endpoint) that does not verify:
    ``trust`` (how to trust a private CA) unless a CA cannot help, as for one issued for another name or
    one out of its dates (the hint said to set a CA file that was set)."""
    if verify_code in X509_NAME_MISMATCH:
        return "use the host name (or address) the certificate was issued for"
    if verify_code in X509_OUT_OF_DATE:
        return f"renew the {holder}'s certificate, or set this machine's clock right"
    if verify_code == X509_WRONG_PURPOSE:
        return f"the {holder}'s certificate is not one for a TLS server: issue it one whose purpose (extended key " \
               "usage) is serverAuth"
    return trust


_E = TypeVar("_E", bound=BaseException)


def cause_of(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first of ``exc`` and its causes (explicit or implicit) that is a ``kind``, if one is.  A chain that
    comes back on itself (``e.__cause__ = e``, or a library that re-raises what it caught) ends the walk."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def cert_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The failed verification among the causes of ``exc``, if one is."""
    import ssl

    return cause_of(exc, ssl.SSLCertVerificationError)


def text_after_bracket(netloc: str) -> str:
    """What follows the ``]`` of an IPv6 address in a URL's ``netloc`` where no ``:`` leads it ("" if nothing
    does).  ``urlparse`` drops such text: ``[::1]6362`` was taken for ``[::1]`` on the scheme's default port."""
    host = netloc.rpartition("@")[2]
    if not host.startswith("["):
        return ""
    tail = host.partition("]")[2]
    return "" if tail.startswith(":") else tail


def is_key(key: object) -> bool:
    return isinstance(key, str) and 0 < len(key) <= 1024 and all(_KEY_SEGMENT.match(seg) for seg in key.split("/"))


def validate_key(key: str) -> str:
    if not is_key(key):
        raise UsageError(f"invalid object key: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A list prefix: empty, or a key, or a key followed by '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/"))
    return prefix


#: What every off-site remote takes besides its backend's options: read by the connection's retry layer.
OFFSITE_LAYER_OPTIONS = ("retry_time",)


def spelled(option: str) -> str:
    """An option as the README and the command line spell it (``-o s3.endpoint-url``); the API's keyword
    (``endpoint_url``) has underscores."""
    return option.replace("_", "-")


def refuse_unknown_options(backend: str, given: Iterable[str], known: Iterable[str]) -> None:
    """One error line naming the options not in ``known``, and every option there is."""
    known = list(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        every = sorted(spelled(name) for name in (*known, *OFFSITE_LAYER_OPTIONS))
        raise UsageError(f"unknown {backend} option(s): {', '.join(spelled(name) for name in unknown)} "
                         f"(known: {', '.join(every)})")


def keyword_options(function: Callable[..., Any]) -> list[str]:
    """The keyword-only parameters of ``function``: a backend's options, named once, in its constructor."""
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]


def number_option(backend: str, name: str, value: object, minimum: float, kind: type = float,
                  maximum: float = math.inf) -> float:
    """A numeric backend option (``kind`` int or float), checked, with one clear error line."""
    what = "an integer" if kind is int else "a number"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise UsageError(f"{backend} option {spelled(name)} must be {what}, not {value!r}")
    number = kind(number)
    if not minimum <= number <= maximum:
        bound = f"at least {minimum:g}" if number < minimum else f"at most {maximum:g}"
        raise UsageError(f"{backend} option {spelled(name)} must be {bound}, not {number:{'d' if kind is int else 'g'}}")
    return number


#: Bounds of the options every off-site remote takes: a pool's connections are set up front (urllib3 fills
#: a queue of that many: a billion spun for minutes), and a timeout past a day is a typo, not a wait.
MAX_CONNECTIONS = 1024
MAX_TIMEOUT = 86400.0


def timeout_option(backend: str, name: str, value: object) -> float:
    """Seconds to wait for a connection or an answer: at least 0.1, at most a day."""
    return number_option(backend, name, value, 0.1, float, MAX_TIMEOUT)


def yes_no_option(backend: str, name: str, value: object) -> bool:
    """A switch: yes/no words (as ``-o`` turns them into booleans), 1/0, or empty for no; a typo is refused,
    not taken for no."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("1", "yes", "true", "on"):
        return True
    if word in ("", "0", "no", "false", "off"):
        return False
    shown = name if name.isupper() else f"{backend} option {spelled(name)}"  # a variable's name, as set
    raise UsageError(f"{shown} takes yes or no, not {value!r}")


def connections_option(backend: str, name: str, value: object) -> int:
    """Transfers at once: 1 to ``MAX_CONNECTIONS``."""
    return int(number_option(backend, name, value, 1, int, MAX_CONNECTIONS))


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    #: What the backend's listing says changes whenever the object is written (S3's ETag; the HTTP
    #: service's file identity; SFTP's mtime and size, the mtime moved on by every rewrite), or None
    #: where it says nothing exact: lets a cache trust an entry of an
    #: object that may be rewritten in place (a snapshot).  Not part of equality.
    version: str | None = field(default=None, compare=False)
    #: When the object was last written, in Unix seconds by the storage's own clock, where a listing says
    #: (S3's LastModified, the file's mtime on the disk, the SFTP host or the service): one clock for
    #: every client, so locks are judged stale by it rather than by each host's.  Not part of equality.
    modified: float | None = field(default=None, compare=False)


class Remote(ABC):
    """Object storage. Implementations must be safe to call from several threads."""

    #: URL with credentials removed, fit for logs and messages.
    display_url: str = "?"
    #: True when get() itself detects a cut-off transfer (e.g. against Content-Length),
    #: so the retry layer need not stat the object after each whole read.
    checks_read_length: bool = False
    #: True when a forked child process may go on reading through this object (no
    #: sockets, threads or file offsets shared with the parent): local disk.
    fork_safe: bool = False
    #: True when a ranged read costs no round trip (local disk): a reader may then take a large
    #: object in small ranges to hold less of it in memory; elsewhere it asks once for the whole.
    cheap_ranges: bool = False

    @abstractmethod
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Store ``data`` under ``key`` atomically: readers see all of it or nothing.

        ``data`` is any bytes-like object, the caller's again once put returns
        (a backup reuses the buffer for its next pack): copy what you keep.
        With ``if_absent`` an existing object is never replaced: raises ObjectExists.
        """

    @abstractmethod
    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        """Return the object's bytes, or ``length`` bytes from ``start``.

        Raises ObjectNotFound.  A range past the end returns what exists (maybe b"").
        """

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in no particular order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size of the object, or None when absent."""

    @property
    def max_object_size(self) -> int | None:
        """The largest object the storage takes, where it has a limit a writer must plan for (the HTTP
        service's --max-object-size): packs are made to fit under it.  None: no such limit."""
        return None

    def drop_cached(self, key: str) -> None:
        """Forget a local copy of ``key`` that turned out not to be the stored object (it does not decode, or
        is not what its name says): the next ``get`` reads the stored one.  Nothing, where nothing is kept."""

    def uncached(self) -> "Remote":
        """This remote without a local cache in front: what ``check`` reads the stored copies through (a
        cached copy, read once and kept, would hide damage done to the stored one since)."""
        return self

    def enclosing_repository(self) -> str | None:
        """Where a repository's config lies above this location (another repository holds it), if so; None
        also where the backend cannot tell.  ``init`` refuses such a place: the outer repository took the
        inner one's objects for its own (its ``snapshots`` advised forgetting the inner config)."""
        return None

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        """Remove unfinished writes (temporary objects) older than ``older_than`` seconds; returns how many.

        Only backends that leave such objects behind (local disk, SFTP) need this.
        """
        return 0

    def _empty_read(self, key: str, start: int | None, length: int | None) -> bool:
        """Check a get's arguments; True when its answer is b"" (zero bytes of an existing object)."""
        validate_key(key)
        if (start is not None and start < 0) or (length is not None and length < 0):
            raise UsageError(f"negative byte range for {key}: start={start} length={length}")
        if length == 0:
            if self.stat(key) is None:
                raise ObjectNotFound(key)
            return True
        return False

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.display_url}>"
