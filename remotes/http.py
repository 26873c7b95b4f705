"""HTTP(S) remote: a client of ``chunkvault serve`` (``remotes.server``).

URL ``http(s)://host[:port][/base/path]`` (the service listens on 6362 unless
told otherwise; without a port the scheme's, 80 or 443, as for a reverse proxy
in front of the service, which the base path is for too; a service of several
repositories, ``serve --repositories``, serves each at ``/NAME/``).  The token comes from the
``token`` or ``token_file`` option, else ``CHUNKVAULT_HTTP_TOKEN`` or
``CHUNKVAULT_HTTP_TOKEN_FILE``, and travels only in a header: never in the URL,
never in a message.

Protocol (every path below is under the base path):

``GET /objects/KEY``
    200 with the object, or with ``Range: bytes=A-B`` / ``bytes=A-`` 206 and
    the bytes that exist; 416 when the range starts at or past the end (the
    client returns b"").
``HEAD /objects/KEY``
    200 with ``Content-Length`` = the object's size.
``PUT /objects/KEY``
    ``Content-Length`` required (411 otherwise); 201 when stored.  With
    ``If-None-Match: *`` an existing object is never replaced: 412.  Bodies
    above the server's limit get 413 before they are read.
``DELETE /objects/KEY``
    204, also when the object was missing.
``GET /objects/?prefix=P&after=K&limit=N[&versions=1]``
    one page of the listing in key order (segment by segment), as JSON
    ``{"objects": [[key, size], ...], "next": K2 or null}``; pages hold at
    most 10,000 objects and ``next`` is the ``after`` of the following page.
    With ``versions=1`` each item is ``[key, size, version]``: a string that
    changes whenever the object is written (the client's cache of
    rewritable objects relies on it; ``ObjectInfo.version``).

Every request carries ``Authorization: Bearer TOKEN`` (when the server has
tokens).  Errors have a JSON body ``{"error": "reason"}``: 400 bad key or
request, 401 no or unknown token, 403 refused by the token's mode, the
server's append-only setting or its file system (an object the server's user
may not read or write, a directory it may not list), 404 no such object
(marked with the header ``Chunkvault-Object: missing``; with
``Chunkvault-Object: no-repository``, a service of several repositories
has none at the base path for this token, whether one exists there or not;
a 404 without it means the URL does not lead to the service), 409 a file or directory of the
served tree in the key's way,
412 exists, 413 too large, 503 too many connections (transient), 507 storage
full, 5xx transient.  PUT takes only keys of a repository's layout (400 for
others).  Responses carry ``Chunkvault-Max-Object-Size`` so the client refuses
too-large objects before sending them (and the store makes packs that fit); a
2xx answer without it comes from some other web server.  Keys are checked with ``validate_key`` on both
sides.  Retries live in the layer above (``remotes.layer``): this module only
sorts failures into permanent and transient (``RemoteUnavailable``) ones.
"""
from __future__ import annotations

import datetime
import email.utils
import json
import math
import os
import re
import ssl
import time
import urllib.request
import warnings
from typing import Any, Iterator
from urllib.parse import quote, unquote, urlencode, urlparse

import urllib3
import urllib3.connection
import urllib3.exceptions as u3

from chunkvault.errors import (
    ObjectExists,
    ObjectNotFound,
    ObjectTooLarge,
    PermissionDenied,
    RemoteError,
    RemoteUnavailable,
    StorageFull,
    CleartextTokenWarning,
    UsageError,
)
from chunkvault.localfiles import read_capped

from .base import (X509_NO_ISSUER, ObjectInfo, Remote, cause_of, cert_failure, cert_hint, connections_option,
                   from_environment, is_key, is_loopback, keyword_options, refuse_unknown_options, served_range,
                   timeout_option, validate_key, validate_prefix)

DEFAULT_PORT = 6362
LIMIT_HEADER = "Chunkvault-Max-Object-Size"
MISSING_HEADER = "Chunkvault-Object"
NO_REPOSITORY = "no-repository"  # MISSING_HEADER's value on a 404 for a repository the token does not reach
TOKEN_ENV = "CHUNKVAULT_HTTP_TOKEN"
TOKEN_FILE_ENV = "CHUNKVAULT_HTTP_TOKEN_FILE"
CA_FILE_ENV = "CHUNKVAULT_HTTP_CA_FILE"
#: The options a variable of the environment gives where none is given (credentials apart: TOKEN_ENV ...).
ENVIRONMENT_OPTIONS = {"ca_file": (CA_FILE_ENV,)}
_TOKEN = re.compile(r"^[\x21-\x7e]+\Z")
_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


#: The most a token file holds: a device or a stream that never ends (/dev/zero) was read until memory ran out.
TOKEN_FILE_LIMIT = 64 << 10


def _read_token_file(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = read_capped(f, TOKEN_FILE_LIMIT, f"the HTTP token file {path} (from {source}) holds", "no token file")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UsageError(f"cannot read the HTTP token file {path} (from {source}): {reason}") from None
    return text.strip()


def resolve_token(token: Any = None, token_file: str | None = None) -> str | None:
    """The token from the options, else from the environment; None when there is none."""
    if token is not None and token != "":
        text, source = str(token), "the token option"
    elif token_file:
        text, source = _read_token_file(str(token_file), "the token-file option"), "the token-file option"
    elif os.environ.get(TOKEN_ENV):
        text, source = os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    elif os.environ.get(TOKEN_FILE_ENV):
        text, source = _read_token_file(os.environ[TOKEN_FILE_ENV], TOKEN_FILE_ENV), TOKEN_FILE_ENV
    else:
        return None
    if not _TOKEN.match(text):
        # Never echo the token: say only where it came from.
        raise UsageError(f"the HTTP token from {source} is empty or has spaces or non-ASCII characters")
    return text


def _clean(text: str, limit: int = 300) -> str:
    """One printable line of at most ``limit`` characters (server text goes into our messages)."""
    return _PRINTABLE.sub(" ", text).strip()[:limit]


def _transport_reason(exc: BaseException) -> str:
    """A short reason for a connection-level failure, without object addresses."""
    if isinstance(exc, u3.ConnectTimeoutError) and not isinstance(exc, u3.NewConnectionError):
        return "connection timed out"
    if isinstance(exc, u3.ReadTimeoutError):
        return "no answer in time (read timeout)"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, u3.ProxyError) and cause.original_error is not None:  # e.g. a 407 to the tunnel
            inner = cause.original_error
            reason = _transport_reason(inner)
            return str(inner) if reason == type(inner).__name__ else reason
        if isinstance(cause, u3.ProtocolError) and len(cause.args) > 1 and isinstance(cause.args[1], BaseException):
            inner = cause.args[1]
            return f"{cause.args[0]} ({type(inner).__name__})"
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


SEND_BLOCK = 64 * 1024


def _pool_classes(send_timeout: float) -> dict[str, type]:
    """Connection pools whose connections send under ``send_timeout`` per block once connected.

    urllib3 sends a request under the connect timeout, and ``sendall`` counts it over the whole
    body since Python 3.5: a 16 MiB pack then failed on any link slower than 1.6 MB/s.  Here a
    body goes out in ``SEND_BLOCK`` pieces, each given the read timeout (the time a stalled
    link is waited for), while connecting keeps the connect timeout."""
    def timed_send(base: type) -> type:
        def send(self: Any, data: Any) -> None:
            if self.sock is None:
                self.connect()
            self.sock.settimeout(send_timeout)
            base.send(self, data)
        return type(f"Timed{base.__name__}", (base,), {"send": send})

    return {"http": type("TimedHTTPPool", (urllib3.HTTPConnectionPool,),
                         {"ConnectionCls": timed_send(urllib3.connection.HTTPConnection)}),
            "https": type("TimedHTTPSPool", (urllib3.HTTPSConnectionPool,),
                          {"ConnectionCls": timed_send(urllib3.connection.HTTPSConnection)})}


#: The longest Retry-After taken as it is written (some 30 years); a longer one is taken as this.
LONGEST_RETRY_AFTER = 1e9


def retry_after(value: str | None, date: str | None = None) -> float | None:
    """Seconds a busy answer's ``Retry-After`` asks to wait (RFC 9110, 10.2.3: whole seconds, or an HTTP date,
    counted from the answer's own ``Date`` where it has one, so that a clock set apart from ours waits no longer
    or shorter); None without one that reads."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return min(float(value[:12]), LONGEST_RETRY_AFTER)
    when, now = _http_date(value), _http_date(date)
    if when is None:
        return None
    return min(max(0.0, when - (now if now is not None else time.time())), LONGEST_RETRY_AFTER)


def _http_date(text: str | None) -> float | None:
    """An HTTP date (always GMT) as seconds since the epoch, or None."""
    try:
        when = email.utils.parsedate_to_datetime(text) if text else None
        return when.replace(tzinfo=when.tzinfo or datetime.timezone.utc).timestamp() if when else None
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _seconds(rest: list) -> float | None:
    """A listing entry's modification time: a finite number of seconds, or None (a server older than it)."""
    if not rest or isinstance(rest[0], bool) or not isinstance(rest[0], (int, float)) or not math.isfinite(rest[0]):
        return None
    return float(rest[0])


def _blocks(body: bytes) -> Iterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), SEND_BLOCK):
        yield view[start : start + SEND_BLOCK]


def _check_ca_file(path: str) -> None:
    """UsageError naming a CA file that cannot be used: one holding no certificate failed every TLS handshake,
    which was retried as an outage for half a minute and then called the service unavailable."""
    if os.path.isdir(path):
        raise UsageError(f"HTTP CA file {path} is a directory (give the certificate file)")
    if not os.path.isfile(path):  # /dev/null, a FIFO: there, but no certificate file
        raise UsageError(f"HTTP CA file {path} " + ("is not a regular file" if os.path.exists(path) else "does not exist"))
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UsageError(f"HTTP CA file {path} holds no certificate that loads "
                         f"({getattr(exc, 'reason', None) or exc})") from None


def _proxy_variable(origin: str) -> str:
    return "HTTPS_PROXY" if origin.startswith("https:") else "HTTP_PROXY"


def environment_proxy(origin: str) -> str | None:
    """The proxy the environment names for the service at ``origin`` (``HTTPS_PROXY`` or ``HTTP_PROXY`` by
    its scheme, either case; ``NO_PROXY`` lists hosts reached directly), as restic's REST client and the AWS
    tools take it; None for a service on loopback, which no proxy reaches (its loopback is not ours).  Over
    https the proxy tunnels the TLS connection and sees neither the token nor the data."""
    host = urlparse(origin).hostname or ""
    if is_loopback(host):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(urlparse(origin).scheme)
    if not proxy or _bypassed(origin, proxies):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    parsed = urlparse(proxy)
    try:
        parsed.port
    except ValueError:
        parsed = None  # type: ignore[assignment]
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"{_proxy_variable(origin)} names no http:// or https:// proxy: {_shown(proxy)!r}")
    return proxy


def _bypassed(origin: str, proxies: dict[str, str]) -> bool:
    """Whether ``NO_PROXY`` names the service at ``origin``: by its host (an IPv6 address without brackets), or
    by its host and port (``vault.example:6362``), as botocore and restic read it.  Given the host alone,
    urllib matched no entry with a port: the service was still sent through the proxy."""
    parsed = urlparse(origin)
    return (urllib.request.proxy_bypass_environment(parsed.hostname or "", proxies)
            or urllib.request.proxy_bypass_environment(parsed.netloc.rpartition("@")[2], proxies))


def _shown(proxy: str) -> str:
    """A proxy URL with its password masked."""
    parsed = urlparse(proxy)
    if parsed.password is None:
        return proxy
    return proxy.replace(f":{parsed.password}@", ":***@", 1)


def _proxy_and_headers(proxy: str) -> tuple[str, dict[str, str] | None]:
    """The proxy's URL without its credentials, and the header that gives them (urllib3 does not take them
    from the URL)."""
    parsed = urlparse(proxy)
    if parsed.username is None and parsed.password is None:
        return proxy, None
    bare = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
    return bare, urllib3.make_headers(
        proxy_basic_auth=f"{unquote(parsed.username or '')}:{unquote(parsed.password or '')}")


class HTTPRemote(Remote):
    """Objects on a ``chunkvault serve`` service; one thread-safe connection pool per remote."""

    checks_read_length = True

    def __init__(
        self,
        url: str,
        *,
        token: Any = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_connections: int = 16,
    ):
        self._origin, self._base, self.display_url = parse_http_url(url)
        self._scheme_port = None if urlparse(url).port else (443 if self._origin.startswith("https") else 80)
        self._token = resolve_token(token, token_file)
        ca_file = ca_file or from_environment(ENVIRONMENT_OPTIONS["ca_file"])
        if ca_file:
            _check_ca_file(str(ca_file))
        self._ca_file = str(ca_file) if ca_file else None
        self.read_timeout = timeout_option("HTTP", "read_timeout", read_timeout)
        timeout = urllib3.Timeout(connect=timeout_option("HTTP", "connect_timeout", connect_timeout),
                                  read=self.read_timeout)
        pool_size = connections_option("HTTP", "max_connections", max_connections)
        tls: dict[str, Any] = {}
        if self._origin.startswith("https:"):
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": str(ca_file) if ca_file else None}
        self._proxy = environment_proxy(self._origin)
        if self._proxy is None:
            self._pool = urllib3.PoolManager(num_pools=1, maxsize=pool_size, block=True, timeout=timeout,
                                             retries=False, **tls)
        else:
            proxy, proxy_headers = _proxy_and_headers(self._proxy)
            self._pool = urllib3.ProxyManager(proxy, proxy_headers=proxy_headers, num_pools=1, maxsize=pool_size,
                                              block=True, timeout=timeout, retries=False, **tls)
        self._pool.pool_classes_by_scheme = _pool_classes(self.read_timeout)
        from chunkvault import __version__

        self._headers = {"User-Agent": f"chunkvault/{__version__}"}
        if self._token is not None:
            self._headers["Authorization"] = f"Bearer {self._token}"
            host = urlparse(self._origin).hostname or ""
            if self._origin.startswith("http:") and not is_loopback(host):
                warnings.warn(f"{self.display_url}: the token travels unencrypted over http:// (anyone on the "
                              "path can read it, and with it read, overwrite or delete the backups): serve "
                              "with --tls-cert and use https://", CleartextTokenWarning, stacklevel=3)
        self._limit: int | None = None  # the server's --max-object-size, once an answer told us
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "HTTPRemote":
        """Options: token, token_file, ca_file, connect_timeout, read_timeout, max_connections."""
        refuse_unknown_options("HTTP", options, keyword_options(cls.__init__))
        return cls(url, **{k: v for k, v in options.items() if v is not None})

    # -- transport ----------------------------------------------------------

    def _request(self, method: str, path: str, op: str, what: str, *, body: Any = None,
                 headers: dict[str, str] | None = None) -> Any:
        if self._closed:
            raise RemoteError(f"{self.display_url} is closed")
        all_headers = {**self._headers, **(headers or {})}
        try:
            response = self._pool.request(method, self._origin + self._base + path, body=body, headers=all_headers,
                                          redirect=False, preload_content=True, decode_content=False)
        except u3.SSLError as exc:
            failure = cert_failure(exc)
            if failure is not None:
                # with a CA file given, the hint to give one said nothing: that file holds another CA, when no issuer
                # was found; any other failure (a signature, a CA's constraints) is not said to be its lack of one
                trust = (f"to trust a private CA or self-signed certificate, set {CA_FILE_ENV} or -o http.ca-file=FILE"
                         if not self._ca_file else
                         f"the CA file {self._ca_file} holds no certificate it was issued by: give the CA that issued "
                         "the service's certificate, or a self-signed one itself"
                         if failure.verify_code in X509_NO_ISSUER else f"checked against the CA file {self._ca_file}")
                hint = cert_hint(failure.verify_code, "service", trust)
                raise RemoteError(
                    f"TLS certificate of {self.display_url} not trusted: {failure.verify_message or 'verification failed'} "
                    f"({hint})"
                ) from None
            cause = cause_of(exc, ssl.SSLError)
            if cause is not None and cause.reason == "WRONG_VERSION_NUMBER":  # what a plain HTTP server answers
                raise RemoteError(f"{self.display_url} does not answer in TLS: if the service runs without "
                                  "--tls-cert, its URL is http://") from None
            raise RemoteUnavailable(f"TLS failure talking to {self.display_url} for {op} {what}: {_transport_reason(exc)}") from None
        except u3.ProxyError as exc:
            raise RemoteUnavailable(f"cannot reach {self.display_url} through the proxy {_shown(self._proxy or '')} "
                                    f"(from the environment's {_proxy_variable(self._origin)}) for {op} {what}: "
                                    f"{_transport_reason(exc)}") from None
        except (u3.HTTPError, OSError) as exc:
            reason = _transport_reason(exc)
            if self._scheme_port and reason == "Connection refused":
                reason += (f" on port {self._scheme_port}, the URL naming none (the service listens on {DEFAULT_PORT} "
                           "unless told otherwise: give the port in the URL)")
            raise RemoteUnavailable(f"cannot reach {self.display_url} for {op} {what}: {reason}") from None
        limit = response.headers.get(LIMIT_HEADER)
        if limit and limit.isascii() and limit.isdigit():
            self._limit = int(limit)
        elif 200 <= response.status < 300:
            # Some other web server (every answer of the service names its limit): its pages are no objects,
            # and taken for them they made the repository look damaged.
            raise RemoteError(f"no chunkvault backup service at {self.display_url}: HTTP {response.status} for "
                              f"{op} {what} without the service's {LIMIT_HEADER} header (another web server "
                              "answers at this URL)")
        return response

    def _object_path(self, key: str) -> str:
        return "/objects/" + quote(key, safe="/")

    @staticmethod
    def _reason(response: Any) -> str:
        try:
            message = json.loads(response.data)["error"]
            if isinstance(message, str):
                return _clean(message)
        except (ValueError, KeyError, TypeError, RecursionError):
            pass
        text = _clean(response.data.decode("utf-8", "replace"), 200) if response.data else ""
        return text or (response.reason or f"HTTP {response.status}")

    def _error(self, response: Any, op: str, what: str) -> RemoteError:
        """Sort a failed response into the error hierarchy (one clear line, never the token)."""
        status = response.status
        reason = self._reason(response)
        where = f"{self.display_url}{what}"
        if status == 401:
            if self._token is None:
                return PermissionDenied(
                    f"the backup service at {self.display_url} wants a token and none was given "
                    f"(set {TOKEN_ENV} or {TOKEN_FILE_ENV}, or -o http.token-file=FILE)"
                )
            return PermissionDenied(f"the backup service at {self.display_url} refused the token ({reason})")
        if status == 403:
            return PermissionDenied(f"{self.display_url} refused {op} {what}: {reason}")
        if status == 404:
            marked = response.headers.get(MISSING_HEADER)
            if marked == "missing" and op in ("get", "stat", "delete"):
                return ObjectNotFound(what)
            if marked == NO_REPOSITORY:  # the service is there; the token reaches no repository at this URL
                return PermissionDenied(f"{self.display_url} refused {op} {what}: the backup service has no "
                                        "repository at this URL that the token may use (a service of several "
                                        "repositories serves each at /NAME/; its tokens file names the ones each "
                                        "token reaches)")
            return RemoteError(f"no chunkvault backup service at {self.display_url} (HTTP 404 for {op} {what}: {reason})")
        if status == 412:
            return ObjectExists(what)
        if status == 413:
            return ObjectTooLarge(f"{self.display_url} refused {op} {what}: {reason}")
        if status == 507:
            return StorageFull(f"{self.display_url} is out of space ({op} {what}): {reason}")
        if status in (408, 429) or status >= 500:
            error = RemoteUnavailable(f"{op} {where} failed, try again: HTTP {status}: {reason}")
            # the service's own answer (its header), not a proxy's whose service is gone
            error.answered = response.headers.get(LIMIT_HEADER) is not None
            error.retry_after = retry_after(response.headers.get("Retry-After"), response.headers.get("Date"))
            return error
        if 300 <= status < 400:
            return RemoteError(f"{op} {where}: unexpected redirect (HTTP {status}); use the service's own URL")
        return RemoteError(f"{op} {where} failed: HTTP {status}: {reason}")

    @property
    def max_object_size(self) -> int | None:
        """The service's --max-object-size, which every answer names; asked for once when none came yet."""
        if self._limit is None and not self._closed:
            try:
                self.stat("config")
            except RemoteError:
                pass
        return self._limit

    # -- the interface ------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        validate_key(key)
        body = data if isinstance(data, bytes) else bytes(data)
        limit = self._limit
        if limit is not None and len(body) > limit:
            raise RemoteError(
                f"{self.display_url} refused put {key}: object of {len(body)} bytes is above "
                f"the server's limit of {limit} bytes (--max-object-size)"
            )
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))}
        if if_absent:
            headers["If-None-Match"] = "*"
        response = self._request("PUT", self._object_path(key), "put", key, body=_blocks(body), headers=headers)
        if not 200 <= response.status < 300:
            raise self._error(response, "put", key)

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        if self._empty_read(key, start, length):
            return b""
        lo = start or 0
        ranged = bool(lo) or length is not None
        headers = {}
        if ranged:
            headers["Range"] = f"bytes={lo}-" if length is None else f"bytes={lo}-{lo + length - 1}"
        response = self._request("GET", self._object_path(key), "get", key, headers=headers)
        if response.status == 416:
            return b""  # the range starts at or past the end of an existing object
        if response.status not in (200, 206):
            raise self._error(response, "get", key)
        data = response.data
        expected = response.headers.get("Content-Length")
        if expected is not None and (not expected.isdigit() or len(data) != int(expected)):
            raise RemoteUnavailable(f"reading {self.display_url}{key}: got {len(data)} of {expected} bytes")
        served = response.headers.get("Content-Range")
        if ranged and (response.status == 200 or served is not None):  # answered whole (something in between
            # dropped the Range header), or as Content-Range says (cut short?); a 206 without it is taken as is
            data = served_range(f"{self.display_url}{key}", lo, length, data, served if response.status == 206 else None)
        chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()  # a cut one fails to read
        if expected is None and served is None and not chunked:
            self._check_length(key, lo, length, data)
        return data

    def _check_length(self, key: str, start: int, length: int | None, data: bytes) -> None:
        """RemoteUnavailable where ``data`` is short of what the object holds from ``start``: an answer that said
        not how long it is (a proxy passing the body on until the connection ends) was taken whole, however short
        a connection cut left it."""
        info = self.stat(key)
        if info is None:
            raise ObjectNotFound(key)
        want = max(0, info.size - start) if length is None else max(0, min(length, info.size - start))
        if len(data) != want:
            raise RemoteUnavailable(f"reading {self.display_url}{key}: got {len(data)} of {want} bytes (the answer "
                                    "gave no length)")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        return self._pages(prefix)

    def _pages(self, prefix: str) -> Iterator[ObjectInfo]:
        after = ""
        while True:
            query = {"prefix": prefix, "versions": "1", **({"after": after} if after else {})}
            response = self._request("GET", "/objects/?" + urlencode(query), "list", prefix)
            if response.status != 200:
                raise self._error(response, "list", prefix)
            try:
                page = json.loads(response.data)
                items = [(str(k), int(s), str(v[0]) if v else None, _seconds(v[1:]))
                         for k, s, *v in page["objects"]]
                after = page.get("next") or ""
            except (ValueError, KeyError, TypeError, RecursionError):
                raise RemoteError(f"{self.display_url} sent a listing that is not chunkvault's JSON") from None
            for key, size, version, modified in items:  # a server older than versions sends none
                if key.startswith(prefix) and is_key(key):
                    yield ObjectInfo(key, size, version, modified)
            if not after:
                return

    def delete(self, key: str) -> None:
        validate_key(key)
        response = self._request("DELETE", self._object_path(key), "delete", key)
        if response.status == 404 and response.headers.get(MISSING_HEADER) == "missing":
            return
        if not 200 <= response.status < 300:
            raise self._error(response, "delete", key)

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        response = self._request("HEAD", self._object_path(key), "stat", key)
        if response.status == 404 and response.headers.get(MISSING_HEADER) == "missing":
            return None
        if response.status != 200:
            raise self._error(response, "stat", key)
        size = response.headers.get("Content-Length", "")
        if not size.isdigit():
            raise RemoteError(f"{self.display_url} sent no size for {key}")
        return ObjectInfo(key, int(size))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pool.clear()


def parse_http_url(url: str) -> tuple[str, str, str]:
    """Split a service URL into (origin, base path without trailing slash, display URL)."""
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"not an http:// or https:// URL: {url!r}")
    if "@" in parsed.netloc:
        # Do not echo the URL: it may hold a secret.
        raise UsageError(
            f"credentials do not belong in an {scheme}:// URL; give the token with "
            f"{TOKEN_ENV}, {TOKEN_FILE_ENV} or -o http.token-file=FILE"
        )
    if parsed.query or parsed.fragment or parsed.params:
        raise UsageError(f"{scheme}:// repository URL takes no query or fragment: {url!r}")
    try:
        host, port = parsed.hostname, parsed.port
        if port == 0:  # no server listens there: it was retried as an outage, then called unavailable
            raise ValueError
    except ValueError:
        raise UsageError(f"invalid port in {url!r}") from None
    if not host:
        raise UsageError(f"no host in {url!r}")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    base = parsed.path.rstrip("/")
    if base:
        try:
            validate_key(base.lstrip("/"))
        except UsageError:
            raise UsageError(f"invalid base path {parsed.path!r} in {url!r}") from None
        base = "/" + base.lstrip("/")
    origin = f"{scheme}://{netloc}"
    return origin, base, f"{origin}{base}/"
