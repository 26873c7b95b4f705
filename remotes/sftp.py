"""SFTP remote: off-site storage on any host that runs an SSH server.

``sftp://user@host[:port]/absolute/path`` or ``sftp://user@host/~/relative/path``
(relative to the login directory).  Authentication uses the usual SSH places: a
key file given as an option, the SSH agent, ``~/.ssh/id_*`` and the matching
``Host`` block of ``~/.ssh/config``.  The server's host key must be in
``known_hosts``; an unknown host is refused unless ``accept_new_host_key`` is set
(then it is added, like OpenSSH's ``StrictHostKeyChecking=accept-new``); a
changed host key is always refused.

Writes go to a temporary name in the target directory and are renamed into
place.  The standard SFTP rename never replaces an existing file (OpenSSH's
server links then unlinks), which gives ``put(if_absent=True)``; plain puts use
the ``posix-rename@openssh.com`` extension, which replaces atomically.

One SSH connection carries several SFTP channels; each thread borrows one, so
parallel uploads and downloads do not serialise on a single channel.
"""
from __future__ import annotations

import errno
import os
import queue
import secrets
import socket
import stat as stat_mod
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

from chunkvault.errors import (
    ObjectExists,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    RemoteUnavailable,
    StorageFull,
    UsageError,
)

from .base import ObjectInfo, Remote, validate_key, validate_prefix

TEMP_PREFIX = ".tmp-"
_PREFETCH_ABOVE = 256 * 1024
_READ_SIZE = 32 * 1024  # paramiko's largest SFTP read request
_TRUE = ("1", "true", "yes", "on")


def parse_sftp_url(url: str) -> tuple[str | None, str, int | None, str]:
    """(user, host, port, path) of an ``sftp://`` URL; path is absolute or starts with ``~``."""
    parsed = urlparse(url)
    if parsed.scheme.lower() != "sftp" or not parsed.hostname:
        raise UsageError(f"not an SFTP URL (sftp://user@host[:port]/path): {url!r}")
    if parsed.password is not None:
        raise UsageError("SFTP URLs take no password; use SSH keys or the SSH agent")
    try:
        port = parsed.port
    except ValueError:
        raise UsageError(f"bad port in SFTP URL {url!r}") from None
    path = unquote(parsed.path)
    if path.startswith("/~"):
        path = path[1:]
    path = path.rstrip("/") or "/"
    if path in ("~", "/"):
        raise UsageError(f"SFTP URL must name a directory below / or ~: {url!r}")
    user = unquote(parsed.username) if parsed.username else None
    return user, parsed.hostname, port, path


def _is_missing(exc: OSError) -> bool:
    return exc.errno == errno.ENOENT or isinstance(exc, FileNotFoundError)


class SFTPRemote(Remote):
    def __init__(
        self,
        host: str,
        path: str,
        *,
        user: str | None = None,
        port: int | None = None,
        key_file: str | None = None,
        known_hosts: str | None = None,
        accept_new_host_key: bool = False,
        ssh_config: str | None = None,
        connect_timeout: float = 15.0,
        channels: int = 8,
    ):
        import paramiko

        self._paramiko = paramiko
        cfg = self._ssh_config(host, ssh_config)
        self.host = cfg.get("hostname", host)
        self.port = int(port or cfg.get("port") or 22)
        self.user = user or cfg.get("user") or _login_name()
        files = cfg.get("identityfile") or []
        self.key_files = [key_file] if key_file else [os.path.expanduser(f) for f in files if os.path.exists(os.path.expanduser(f))]
        self.known_hosts = os.path.expanduser(known_hosts or "~/.ssh/known_hosts")
        self.accept_new_host_key = accept_new_host_key
        self.connect_timeout = connect_timeout
        self.channels = max(1, channels)
        port_part = f":{self.port}" if self.port != 22 else ""
        self.display_url = f"sftp://{self.user}@{host}{port_part}/{path.lstrip('/') if path.startswith('~') else path}"
        self._path_spec = path
        self._root: str | None = None
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._opened = 0
        self._generation = 0
        self._known_dirs: set[str] = set()
        self._closed = False
        self._connect()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "SFTPRemote":
        """Options: key_file, known_hosts, accept_new_host_key, ssh_config, connect_timeout, channels.

        Environment: CHUNKVAULT_SFTP_KEY_FILE, CHUNKVAULT_SFTP_KNOWN_HOSTS,
        CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY=1.
        """
        user, host, port, path = parse_sftp_url(url)
        known = {"key_file", "known_hosts", "accept_new_host_key", "ssh_config", "connect_timeout", "channels"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown SFTP option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        env = os.environ
        options.setdefault("key_file", env.get("CHUNKVAULT_SFTP_KEY_FILE") or None)
        options.setdefault("known_hosts", env.get("CHUNKVAULT_SFTP_KNOWN_HOSTS") or None)
        accept = options.get("accept_new_host_key")
        if accept is None:
            accept = env.get("CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY", "").lower() in _TRUE
        elif isinstance(accept, str):
            accept = accept.lower() in _TRUE
        options["accept_new_host_key"] = bool(accept)
        return cls(host, path, user=user, port=port, **{k: v for k, v in options.items() if v is not None})

    # -- connection -----------------------------------------------------------

    @staticmethod
    def _ssh_config(host: str, path: str | None) -> dict[str, Any]:
        import paramiko

        path = os.path.expanduser(path or "~/.ssh/config")
        if not os.path.exists(path):
            return {}
        try:
            return paramiko.SSHConfig.from_path(path).lookup(host)
        except Exception as exc:  # a broken ssh config is the user's to fix, with a clear line
            raise UsageError(f"cannot read SSH config {path}: {exc}") from None

    def _connect(self) -> None:
        paramiko = self._paramiko
        client = paramiko.SSHClient()
        if os.path.exists(self.known_hosts):
            try:
                client.load_host_keys(self.known_hosts)
            except (OSError, paramiko.SSHException) as exc:
                raise UsageError(f"cannot read known_hosts file {self.known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(_AcceptNew(self.known_hosts) if self.accept_new_host_key else _Refuse())
        where = f"{self.host}:{self.port}"
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                key_filename=self.key_files or None,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                allow_agent=True,
                look_for_keys=not self.key_files,
            )
        except _UnknownHost as exc:
            client.close()
            raise PermissionDenied(
                f"unknown SSH host key for {where} ({exc.fingerprint}): not in {self.known_hosts}; "
                "add it (ssh-keyscan) or accept it once with accept_new_host_key / "
                "CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY=1") from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise PermissionDenied(
                f"SSH host key for {where} does not match {self.known_hosts} "
                f"(got {_fingerprint(exc.key)}): refusing to connect") from None
        except paramiko.AuthenticationException:
            client.close()
            raise PermissionDenied(f"SSH authentication as {self.user!r} to {where} failed (no accepted key)") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise RemoteUnavailable(f"cannot connect to SSH server {where}: {exc or type(exc).__name__}") from None
        transport = client.get_transport()
        transport.set_keepalive(30)
        _no_delay(transport.sock)
        self._client = client
        self._generation += 1
        self._pool = queue.LifoQueue()
        self._opened = 0
        if self._root is None:
            sftp = self._open_channel()
            try:
                self._root = self._resolve_root(sftp)
            finally:
                self._pool.put((self._generation, sftp))

    def _open_channel(self) -> Any:
        try:
            sftp = self._client.open_sftp()
        except (self._paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteUnavailable(f"cannot open SFTP channel on {self.host}:{self.port}: {exc}") from None
        self._opened += 1
        return sftp

    def _resolve_root(self, sftp: Any) -> str:
        spec = self._path_spec
        if spec.startswith("~"):
            home = sftp.normalize(".")
            spec = home.rstrip("/") + "/" + spec[1:].lstrip("/")
        return spec.rstrip("/") or "/"

    @contextmanager
    def _sftp(self) -> Iterator[Any]:
        """Borrow an SFTP channel; reconnect once if the connection died."""
        with self._lock:
            if self._closed:
                raise RemoteError(f"{self.display_url} is closed")
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                self._client.close()
                self._known_dirs.clear()
                self._connect()
            generation = self._generation
            try:
                _, sftp = self._pool.get_nowait()
            except queue.Empty:
                sftp = self._open_channel()
        ok = False
        try:
            yield sftp
            ok = True
        finally:
            if ok and generation == self._generation and not self._closed:
                self._pool.put((generation, sftp))
            else:
                try:
                    sftp.close()
                except Exception:
                    pass

    def _call(self, what: str, key: str | None, fn: Any) -> Any:
        """Run ``fn(sftp)`` and sort failures into the error hierarchy."""
        paramiko = self._paramiko
        try:
            with self._sftp() as sftp:
                return fn(sftp)
        except (ObjectExists, ObjectNotFound, RemoteError, UsageError):
            raise
        except OSError as exc:
            if isinstance(exc, (socket.timeout, ConnectionError)):
                raise RemoteUnavailable(f"SFTP {what} on {self.display_url}: {exc}") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDenied(f"SFTP server denied {what}: {exc.strerror or exc}") from None
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left on the SFTP server while {what}") from None
            if exc.errno == errno.ENOENT and key is not None:
                raise ObjectNotFound(key) from None
            raise RemoteError(f"SFTP {what} on {self.display_url} failed: {exc.strerror or exc}") from None
        except (paramiko.SSHException, EOFError) as exc:
            raise RemoteUnavailable(f"SFTP {what} on {self.display_url}: connection lost ({exc or type(exc).__name__})") from None

    def _path(self, key: str) -> str:
        return f"{self._root}/{validate_key(key)}"

    def _ensure_dir(self, sftp: Any, d: str) -> None:
        """Create ``d`` and its missing parents (up to the repository root) once per connection."""
        if d in self._known_dirs:
            return
        if not self._exists(sftp, d):
            parent = d.rsplit("/", 1)[0]
            if d != self._root and parent:
                self._ensure_dir(sftp, parent)
            try:
                sftp.mkdir(d)
            except OSError:
                if not self._exists(sftp, d):  # another writer may have made it first
                    raise
        self._known_dirs.add(d)

    @staticmethod
    def _exists(sftp: Any, path: str) -> bool:
        try:
            sftp.stat(path)
            return True
        except OSError as exc:
            if _is_missing(exc):
                return False
            raise

    # -- the interface -----------------------------------------------------------

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        final = self._path(key)
        d = final.rsplit("/", 1)[0]
        tmp = f"{d}/{TEMP_PREFIX}{secrets.token_hex(8)}"

        def run(sftp: Any) -> None:
            self._ensure_dir(sftp, d)
            try:
                with sftp.open(tmp, "wb") as f:
                    f.set_pipelined(True)
                    view = memoryview(data).cast("B")
                    step = 1 << 20
                    for i in range(0, len(view), step):
                        f.write(view[i : i + step])
                if if_absent:
                    try:
                        sftp.rename(tmp, final)
                    except OSError:
                        if self._exists(sftp, final):
                            raise ObjectExists(key) from None
                        raise
                else:
                    sftp.posix_rename(tmp, final)
            except BaseException:
                try:
                    sftp.remove(tmp)
                except Exception:
                    pass
                raise

        self._call(f"writing {key}", None, run)

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        path = self._path(key)

        def run(sftp: Any) -> bytes:
            with sftp.open(path, "rb") as f:
                lo = start or 0
                want = length
                if want is None or want > _PREFETCH_ABOVE:
                    # Large reads are pipelined; clip to the file so no request runs past its end.
                    want = max(0, min(f.stat().st_size - lo, want if want is not None else 1 << 62))
                if want == 0:
                    return b""
                f.seek(lo)
                if want > _PREFETCH_ABOVE:
                    f.prefetch(lo + want)
                return _read_exact(f, want)

        return self._call(f"reading {key}", key, run)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        head, _, _ = prefix.rpartition("/")
        found: list[ObjectInfo] = []

        def walk(sftp: Any, rel: str) -> None:
            path = f"{self._root}/{rel}".rstrip("/")
            try:
                entries = sftp.listdir_attr(path)
            except OSError as exc:
                if _is_missing(exc):
                    return
                raise
            for attr in entries:
                name = attr.filename
                if name.startswith(TEMP_PREFIX) or name in (".", ".."):
                    continue
                key = f"{rel}{name}"
                if stat_mod.S_ISDIR(attr.st_mode or 0):
                    sub = key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        walk(sftp, sub)
                elif key.startswith(prefix):
                    found.append(ObjectInfo(key, attr.st_size or 0))

        self._call(f"listing {prefix or '/'}", None, lambda sftp: walk(sftp, head + "/" if head else ""))
        yield from found

    def delete(self, key: str) -> None:
        path = self._path(key)

        def run(sftp: Any) -> None:
            try:
                sftp.remove(path)
            except OSError as exc:
                if not _is_missing(exc):
                    raise

        self._call(f"deleting {key}", None, run)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)

        def run(sftp: Any) -> ObjectInfo | None:
            try:
                attr = sftp.stat(path)
            except OSError as exc:
                if _is_missing(exc):
                    return None
                raise
            if stat_mod.S_ISDIR(attr.st_mode or 0):
                return None
            return ObjectInfo(key, attr.st_size or 0)

        return self._call(f"stat {key}", None, run)

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        cutoff = time.time() - older_than

        def run(sftp: Any) -> int:
            removed = 0
            stack = [self._root]
            while stack:
                d = stack.pop()
                try:
                    entries = sftp.listdir_attr(d)
                except OSError as exc:
                    if _is_missing(exc):
                        continue
                    raise
                for attr in entries:
                    path = f"{d}/{attr.filename}"
                    if stat_mod.S_ISDIR(attr.st_mode or 0):
                        stack.append(path)
                    elif attr.filename.startswith(TEMP_PREFIX) and (attr.st_mtime or 0) < cutoff:
                        try:
                            sftp.remove(path)
                            removed += 1
                        except OSError as exc:
                            if not _is_missing(exc):
                                raise
            return removed

        return self._call("removing temporary files", None, run)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    _, sftp = self._pool.get_nowait()
                except queue.Empty:
                    break
                try:
                    sftp.close()
                except Exception:
                    pass
            if self._client is not None:
                self._client.close()


def _read_exact(f: Any, want: int) -> bytes:
    """Read up to ``want`` bytes; stops early only at end of file.

    One SFTP request's worth per call: paramiko's file object appends each
    32 KiB reply to its buffer by concatenation, so one larger call copied
    the buffer over and over (reading 16 MiB cost a second of CPU)."""
    parts = []
    while want > 0:
        chunk = f.read(min(want, _READ_SIZE))
        if not chunk:
            break
        parts.append(chunk)
        want -= len(chunk)
    return b"".join(parts)


def _no_delay(sock: Any) -> None:
    """Send each SSH packet at once (as OpenSSH does).  paramiko leaves Nagle's algorithm on, and every SFTP
    request waiting for the ACK of the previous packet made a 76 KiB ranged read take 16 ms instead of 1.7."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _login_name() -> str:
    import getpass

    return getpass.getuser()


def _fingerprint(key: Any) -> str:
    import base64
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


class _UnknownHost(Exception):
    def __init__(self, fingerprint: str):
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


class _Refuse:
    """Missing-host-key policy: refuse, naming the key so the user can check it."""

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        raise _UnknownHost(_fingerprint(key))


class _AcceptNew:
    """Missing-host-key policy of ``accept-new``: trust on first use, record it in known_hosts."""

    def __init__(self, path: str):
        self.path = path

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line)
