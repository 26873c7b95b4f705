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

Each thread borrows an SFTP session from a pool, so parallel uploads and
downloads do not serialise on one session.  Sessions run over OpenSSH's client
(one ``ssh`` process each) where one is installed, else over paramiko's SSH
stack (``transport=paramiko``); see ``sftp_sessions``.  Either way the SFTP
requests are our own (``sftp_client``): pipelined, as large as the server takes.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import shlex
import socket
import stat as stat_mod
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

from chunkvault.errors import (
    ChunkvaultError,
    ObjectExists,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    RemoteUnavailable,
    StorageFull,
    UsageError,
)

from .base import (ObjectInfo, Remote, connections_option, from_environment, is_key, refuse_unknown_options,
                   timeout_option, validate_key, validate_prefix, yes_no_option)
from .sftp_client import StatusError
from .sftp_sessions import OpenSSHSessions, ParamikoSessions, SSHTarget, openssh_settings, resolve_transport

TEMP_PREFIX = ".tmp-"
#: The options a variable of the environment gives where the URL's options do not (the first set, in order).
ENVIRONMENT_OPTIONS = {"key_file": ("CHUNKVAULT_SFTP_KEY_FILE",), "known_hosts": ("CHUNKVAULT_SFTP_KNOWN_HOSTS",),
                       "transport": ("CHUNKVAULT_SFTP_TRANSPORT",)}


def parse_sftp_url(url: str) -> tuple[str | None, str, int | None, str]:
    """(user, host, port, path) of an ``sftp://`` URL; path is absolute or starts with ``~``."""
    parsed = urlparse(url)
    if parsed.scheme.lower() != "sftp" or not parsed.hostname:
        raise UsageError(f"not an SFTP URL (sftp://user@host[:port]/path): {url!r}")
    if parsed.password is not None:
        raise UsageError("SFTP URLs take no password; use SSH keys or the SSH agent")
    if parsed.params or parsed.query or parsed.fragment or url.endswith(("?", "#")):
        # cut off, the rest would name another directory (db;v2 and db;v3 the same repository)
        raise UsageError(f"an SFTP URL's path takes ';', '?' and '#' only percent-encoded (%3B, %3F, %23): {url!r}")
    try:
        port = parsed.port
        if port == 0:  # was taken for no port: port 22 connected to instead
            raise ValueError
    except ValueError:
        raise UsageError(f"bad port in SFTP URL {url!r}") from None
    path = unquote(parsed.path)
    if path.startswith("/~"):
        path = path[1:]
    path = path.rstrip("/") or "/"
    if path in ("~", "/"):
        raise UsageError(f"SFTP URL must name a directory below / or ~: {url!r}")
    user = unquote(parsed.username) if parsed.username else None
    # ssh would take "-oProxyCommand=..." for an option, and refuses it: the retries could never pass
    for what, name in (("host", parsed.hostname), ("user", user)):
        if name is not None and (name.startswith("-") or any(ord(c) < 32 or c == "\x7f" for c in name)
                                 or what == "host" and " " in name):
            raise UsageError(f"an SFTP {what} cannot start with '-' or hold control characters"
                             f"{' or spaces' if what == 'host' else ''}: {name!r}")
    return user, parsed.hostname, port, path


def _url_path(path: str) -> str:
    """``path`` as a URL takes it again."""
    return re.sub(r"[%;?#]", lambda m: f"%{ord(m.group()):02X}", path)


def _is_missing(exc: OSError) -> bool:
    return exc.errno == errno.ENOENT or isinstance(exc, FileNotFoundError)


def _explain_failed_write(sftp: Any, directory: str, size: int, what: str) -> None:
    """PermissionDenied if the server's file system under ``directory`` is mounted read-only, StorageFull if
    it has no room for ``size`` more bytes (a block of slack for rounding) or no free inode: a failed
    write's only word is "Failure".  Asked of the nearest directory that exists (an init's new one does not)."""
    while True:
        try:
            state = sftp.free_space(directory)
            break
        except StatusError:
            parent = directory.rsplit("/", 1)[0] or "/"
            if parent == directory or not parent.strip("~"):
                return
            directory = parent
    if state is None:
        return
    free_bytes, free_inodes, read_only = state
    if read_only:
        raise PermissionDenied(f"the SFTP server's file system is read-only: {what} failed")
    if free_bytes < size + 8192 or free_inodes == 0:
        raise StorageFull(f"no space left on the SFTP server while {what} ({free_bytes} bytes free there)")


def _info(key: str, attr: Any) -> ObjectInfo:
    """An object as listed; its version is its mtime and size, which every rewrite changes (``_outdate``)."""
    version = None if attr.st_mtime is None else f"{attr.st_mtime}.{attr.st_size or 0}"
    return ObjectInfo(key, attr.st_size or 0, version, None if attr.st_mtime is None else float(attr.st_mtime))


def _refuse_proxy(host: str, cfg: dict[str, Any]) -> None:
    """paramiko connects directly: a ProxyJump or ProxyCommand of the SSH config, which it cannot follow,
    would be passed over without a word, going round the bastion the configuration sends connections through."""
    for option, name in (("proxyjump", "ProxyJump"), ("proxycommand", "ProxyCommand")):
        if str(cfg.get(option, "none")).lower() != "none":
            raise UsageError(f"the SSH config sends {host} through {name}, which sftp.transport=paramiko cannot "
                             "follow: use OpenSSH's client (sftp.transport=openssh, package openssh-client)")


def _config_known_hosts(value: str, host: str, user: str) -> str | None:
    """The known_hosts file an SSH config's ``UserKnownHostsFile`` names, as OpenSSH reads it: the first of
    its (quoted) words, with ``%d`` ``%h`` ``%u`` ``%%`` and ``~`` expanded; ``none`` is no file (every host
    then unknown); None where it names none."""
    try:
        words = shlex.split(value)
    except ValueError:
        raise UsageError(f"the SSH config's UserKnownHostsFile does not parse: {value!r}") from None
    if not words:
        return None
    if words[0].lower() == "none":
        return os.devnull
    tokens = {"%%": "%", "%d": os.path.expanduser("~"), "%h": host, "%u": user}

    def expand(word: str) -> str:
        return os.path.expanduser(re.sub(r"%[%dhu]", lambda m: tokens[m.group()], word))

    first = expand(words[0])
    if len(words) > 1 and not re.search(r"[\"'\\]", value):
        # paramiko takes the quotes off a value quoted whole: "/srv/my dir/kh" reaches us as two words, and
        # the first, /srv/my, was read (every host unknown); several files have no file of the whole name
        whole = expand(value)
        if os.path.isfile(whole) or not os.path.exists(first) and os.path.isdir(os.path.dirname(whole)):
            return whole
    return first


class SFTPRemote(Remote):
    checks_read_length = True  # a whole read ends where the open file's size says (sftp_client.read_file)

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
        read_timeout: float | None = None,
        channels: int = 8,
        transport: str = "auto",
    ):
        self.transport = resolve_transport(transport)
        connect_timeout = timeout_option("SFTP", "connect_timeout", connect_timeout)
        # a link that stalls, connections held open, is found only by keepalives: their pace is the timeout
        read_timeout = None if read_timeout is None else timeout_option("SFTP", "read_timeout", read_timeout)
        channels = connections_option("SFTP", "channels", channels)
        known = os.path.expanduser(known_hosts) if known_hosts else None
        # else retried as an outage; /dev/null is ssh's own way (-F /dev/null) to read no config at all
        if ssh_config and not os.path.isfile(os.path.expanduser(ssh_config)) and ssh_config != os.devnull:
            there = os.path.exists(os.path.expanduser(ssh_config))  # a directory, a device: no config file
            raise UsageError(f"SSH config file {ssh_config} " + ("is not a regular file" if there else "does not exist"))
        if self.transport == "openssh":
            # ssh reads its configuration itself: it is given only what the URL and the options say, and
            # asked (ssh -G) which user and port it will use, for the name in messages and the cache's.
            target = SSHTarget(host, port, user, (key_file,) if key_file else (), known, accept_new_host_key,
                               os.path.expanduser(ssh_config) if ssh_config else None, connect_timeout,
                               read_timeout=read_timeout)
            cfg: dict[str, Any] = openssh_settings(target)
            if cfg.get("port", "").isdigit():
                target = dataclasses.replace(target, config_port=int(cfg["port"]))
            self._sessions: OpenSSHSessions | ParamikoSessions = OpenSSHSessions(target)
        else:  # paramiko takes the configuration from us
            cfg = self._ssh_config(host, ssh_config)
            _refuse_proxy(host, cfg)
        self.port = int(port or cfg.get("port") or 22)
        self.user = user or cfg.get("user") or _login_name()
        self.channels = channels
        # Bytes of the uploads under way, and of those that failed since the last one went: the room their
        # failing at once frees again before a failed upload asks the server for its free space.
        self._writing = 0
        self._failed_room = 0
        self._writing_lock = threading.Lock()
        port_part = f":{self.port}" if self.port != 22 else ""
        shown = _url_path(path)
        shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address, bracketed as a URL takes it
        self._server_url = f"sftp://{self.user}@{shown_host}{port_part}"
        self.display_url = self._server_url + (shown if shown.startswith("/") else "/" + shown)
        if self.transport == "paramiko":
            if known is None and cfg.get("userknownhostsfile"):
                known = _config_known_hosts(str(cfg["userknownhostsfile"]), cfg.get("hostname", host), self.user)
            files = [os.path.expanduser(f) for f in cfg.get("identityfile") or []]
            key_files = [key_file] if key_file else [f for f in files if os.path.exists(f)]
            target = SSHTarget(cfg.get("hostname", host), self.port, self.user, tuple(key_files), known,
                               accept_new_host_key, ssh_config, connect_timeout, read_timeout=read_timeout)
            self._sessions = ParamikoSessions(target)
        self._path_spec = path
        self._lock = threading.Lock()
        self._pool: list[Any] = []
        self._known_dirs: set[str] = set()
        self._closed = False
        self._resolved_root: str | None = None if path.startswith("~") else path.rstrip("/") or "/"
        try:
            sftp = self._sessions.open()  # fails here, at once, on a bad host key or login
        except RemoteUnavailable:
            return  # a server restarting: the first operation connects again, under the retry layer
        self._pool.append(sftp)
        try:
            self._root  # a ~ path is resolved with that session
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "SFTPRemote":
        """Options: key_file, known_hosts, accept_new_host_key, ssh_config, connect_timeout, read_timeout, channels,
        transport.

        Environment: CHUNKVAULT_SFTP_KEY_FILE, CHUNKVAULT_SFTP_KNOWN_HOSTS,
        CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY=1, CHUNKVAULT_SFTP_TRANSPORT.
        """
        user, host, port, path = parse_sftp_url(url)
        refuse_unknown_options("SFTP", options, ["key_file", "known_hosts", "accept_new_host_key", "ssh_config",
                                                 "connect_timeout", "read_timeout", "channels", "transport"])
        env = os.environ
        for name, variables in ENVIRONMENT_OPTIONS.items():
            options.setdefault(name, from_environment(variables))
        accept = options.get("accept_new_host_key")
        if accept is None:
            accept = yes_no_option("SFTP", "CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY",
                                   env.get("CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY", ""))
        options["accept_new_host_key"] = yes_no_option("SFTP", "accept_new_host_key", accept)
        return cls(host, path, user=user, port=port, **{k: v for k, v in options.items() if v is not None})

    # -- sessions -------------------------------------------------------------

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

    @property
    def _root(self) -> str:
        """The repository's absolute path on the server: a ``~`` path asks the server for the home directory."""
        if self._resolved_root is None:
            home = self._call("finding the home directory", None, lambda sftp: sftp.normalize("."))
            self._resolved_root = (home.rstrip("/") + "/" + self._path_spec[1:].lstrip("/")).rstrip("/") or "/"
        return self._resolved_root

    @contextmanager
    def _sftp(self) -> Iterator[Any]:
        """Borrow an SFTP session: a pooled one that is still alive, else a new one."""
        sftp = None
        with self._lock:
            if self._closed:
                raise RemoteError(f"{self.display_url} is closed")
            while self._pool:
                candidate = self._pool.pop()
                if self._sessions.alive(candidate):
                    sftp = candidate
                    break
                _close_quietly(candidate)
                self._known_dirs.clear()  # the server may have been reset while we were away
        if sftp is None:
            sftp = self._sessions.open()
        keep = False
        try:
            yield sftp
            keep = True
        except Exception as exc:
            keep = _session_survives(exc)
            if isinstance(exc, socket.timeout):
                self._sessions.stalled(sftp)
            raise
        finally:
            with self._lock:
                keep = keep and not self._closed
                if keep:
                    self._pool.append(sftp)
            if not keep:
                _close_quietly(sftp)

    def _call(self, what: str, key: str | None, fn: Any) -> Any:
        """Run ``fn(sftp)`` and sort failures into the error hierarchy."""
        lost = self._sessions.lost_errors
        try:
            with self._sftp() as sftp:
                try:
                    return fn(sftp)
                except OSError as exc:  # paramiko's "Socket is closed" has no errno: the link dropped, a retry may
                    if exc.errno is None and not self._sessions.alive(sftp):  # reach it again
                        raise RemoteUnavailable(f"SFTP {what} on {self.display_url}: connection lost ({exc})") from None
                    raise
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
        except lost as exc:
            raise RemoteUnavailable(f"SFTP {what} on {self.display_url}: connection lost ({exc or type(exc).__name__})") from None

    def _path(self, key: str) -> str:
        return f"{self._root}/{validate_key(key)}"

    def _ensure_dir(self, sftp: Any, d: str) -> None:
        """Create ``d`` and its missing parents (the repository root's too, as `init` on local disk makes
        them) once per connection."""
        if d in self._known_dirs:
            return
        try:
            mode = sftp.stat(d).st_mode
        except OSError as exc:
            if not _is_missing(exc):
                raise
            parent = d.rsplit("/", 1)[0]
            if parent:
                self._ensure_dir(sftp, parent)
            try:
                sftp.mkdir(d)
            except OSError:
                if not self._exists(sftp, d):  # another writer may have made it first
                    self._refuse_dangling(sftp, d)
                    raise
        else:
            # the server says "no such file" of anything below a file: an init where a file stands said no more
            if mode is not None and not stat_mod.S_ISDIR(mode):
                raise NotADirectoryError(errno.ENOTDIR, f"Not a directory ({d} is a file)")
        self._known_dirs.add(d)

    @staticmethod
    def _refuse_dangling(sftp: Any, d: str) -> None:
        """A symbolic link to nothing (a disk not mounted) where a directory is to be made: the server's word
        for its failed mkdir was "Failure"."""
        try:
            mode = sftp.lstat(d).st_mode
        except OSError:
            return
        if mode is not None and stat_mod.S_ISLNK(mode):
            raise FileNotFoundError(errno.ENOENT, f"{d} is a symbolic link to a path that does not exist")

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
            try:
                self._ensure_dir(sftp, d)
            except StatusError as exc:
                if exc.errno is None:
                    _explain_failed_write(sftp, self._root, 0, f"writing {key}")
                raise
            with self._writing_lock:
                self._writing += len(data)
            try:
                sftp.write_file(tmp, data)
                if if_absent:
                    try:
                        sftp.rename(tmp, final)
                    except OSError:
                        if self._exists(sftp, final):
                            raise ObjectExists(key) from None
                        raise
                else:
                    self._outdate(sftp, tmp, final)
                    sftp.replace(tmp, final)
            except BaseException as exc:
                explained: BaseException | None = None
                if isinstance(exc, StatusError) and exc.errno is None:
                    # asked while the part written still takes its room, for the rest only: asked after its
                    # removal, the disk looked to have room, unexplained; the other uploads under way, failing
                    # at once, may have freed theirs already: their room is counted as not there
                    try:
                        written = sftp.stat(tmp).st_size or 0
                    except OSError:
                        written = 0
                    with self._writing_lock:
                        others = self._writing - len(data) + min(self._failed_room, self.channels * len(data))
                    try:
                        _explain_failed_write(sftp, d, len(data) - written + others, f"writing {key}")
                    except ChunkvaultError as why:
                        explained = why
                with self._writing_lock:
                    self._failed_room += len(data)
                try:
                    sftp.remove(tmp)
                except Exception:
                    pass
                if explained is not None:
                    raise explained from None
                raise
            else:
                with self._writing_lock:
                    self._failed_room = 0
            finally:
                with self._writing_lock:
                    self._writing -= len(data)

        self._call(f"writing {key}", None, run)

    def _outdate(self, sftp: Any, tmp: str, final: str) -> None:
        """Give ``tmp`` a later mtime than the ``final`` it replaces: a listing's version (mtime and size,
        mtime in whole seconds) then changes with every rewrite, even two in one second to one size."""
        try:
            old = sftp.stat(final).st_mtime
        except OSError as exc:
            if _is_missing(exc):
                return
            raise
        new = sftp.stat(tmp).st_mtime
        if old is not None and new is not None and new <= old:
            try:
                sftp.set_mtime(tmp, old + 1)
            except (socket.timeout, ConnectionError):
                raise
            except OSError:  # a server refusing SETSTAT still takes the write; two rewrites to one size
                pass         # in one second then share a version there

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        path = self._path(key)

        def run(sftp: Any) -> bytes:
            return sftp.read_file(path, start or 0, length)

        return self._call(f"reading {key}", key, run)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        head, _, _ = prefix.rpartition("/")
        found: list[ObjectInfo] = []

        def walk(sftp: Any) -> None:
            def descend(sub: str, name: str) -> bool:
                return not name.startswith(TEMP_PREFIX) and (sub.startswith(prefix) or prefix.startswith(sub))

            for rel, attr in self._tree(sftp, head + "/" if head else "", descend):
                key = f"{rel}{attr.filename}"
                if not attr.filename.startswith(TEMP_PREFIX) and key.startswith(prefix) and is_key(key):
                    found.append(_info(key, attr))

        self._call(f"listing {prefix or '/'}", None, walk)
        yield from found

    def _dir(self, rel: str) -> str:
        """The server's path of the directory ``rel`` ("" or ending in "/") below the root."""
        return f"{self._root}/{rel}".rstrip("/")

    def _tree(self, sftp: Any, top: str, descend: Callable[[str, str], bool] = lambda sub, name: True
              ) -> Iterator[tuple[str, Any]]:
        """(directory, entry) for every file below ``top`` ("" or ending in "/"), directories relative to
        the root and ending in "/"; a subdirectory ``descend(its path, its name)`` refuses is skipped.  Listed a
        depth at a time, each depth's directories at once (``SFTPClient.listdirs``)."""
        level = [top]
        while level:
            listings = sftp.listdirs([self._dir(rel) for rel in level])
            deeper = []
            for rel in level:
                for attr in listings[self._dir(rel)] or ():
                    if not stat_mod.S_ISDIR(attr.st_mode or 0):
                        yield rel, attr
                    elif descend(sub := f"{rel}{attr.filename}/", attr.filename):
                        deeper.append(sub)
            level = deeper

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
            return _info(key, attr)

        return self._call(f"stat {key}", None, run)

    def enclosing_repository(self) -> str | None:
        """A directory above holding a ``config`` file and a ``keys/`` directory, as on local disk; one this
        user may not look into is passed over."""

        def kind(sftp: Any, path: str) -> int:
            try:
                return stat_mod.S_IFMT(sftp.stat(path).st_mode or 0)
            except OSError as exc:
                if _is_missing(exc) or exc.errno in (errno.EACCES, errno.EPERM):
                    return 0
                raise

        def run(sftp: Any) -> str | None:
            here = self._root
            while here not in ("", "/"):
                here = here.rsplit("/", 1)[0]
                if (kind(sftp, here + "/config") == stat_mod.S_IFREG
                        and kind(sftp, here + "/keys") == stat_mod.S_IFDIR):
                    return self._server_url + _url_path(here or "/")
            return None

        return self._call("looking above the repository", None, run)

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        cutoff = time.time() - older_than

        def run(sftp: Any) -> int:
            removed = 0
            for rel, attr in self._tree(sftp, ""):
                if attr.filename.startswith(TEMP_PREFIX) and (attr.st_mtime or 0) < cutoff:
                    try:
                        sftp.remove(f"{self._dir(rel)}/{attr.filename}")
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
            pool, self._pool = self._pool, []
        for sftp in pool:
            _close_quietly(sftp)
        self._sessions.close()


def _login_name() -> str:
    import getpass

    return getpass.getuser()


def _session_survives(exc: BaseException) -> bool:
    """Whether a session that raised ``exc`` is fit for the next request: yes after the server's answer was
    an error status (no such file, permission denied), no after anything that may have cut a reply short.
    Keeping OpenSSH sessions matters: a new one is a new connection."""
    if isinstance(exc, (ObjectExists, ObjectNotFound)):
        return True
    return (isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, socket.timeout))
            and exc.errno is not None and exc.errno != errno.EBADF)  # EPIPE arrives as BrokenPipeError


def _close_quietly(sftp: Any) -> None:
    try:
        sftp.close()
    except Exception:
        pass
