"""The verifying process's side of ``verify-restore --pg-start --pg-recover``: serve archived WAL to the copy's
server, which runs as another user and must not hold the repository's password.

A unix socket (SOCK_SEQPACKET, one message each way) in pgstart's private run directory, the server user's
alone (mode 0600 in a 0700 directory), answered by a thread of ours: a request names a file PostgreSQL asks
for and carries the descriptor of the file the client (``walfetch``, PostgreSQL's restore_command) opened as
the server's user at ``%p``.  The relay writes the archived file into that descriptor, so it opens nothing in
the copy by path (no link a server user planted is followed by root), and only after checking the descriptor
is a regular file of the copy's, open for writing.  A request that is longer than a WAL name can make, that
carries other descriptors, or names anything but what PostgreSQL archives (``walnames.check_wal_name``), is
refused.  What was served, missing and refused is kept for the report.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import ChunkvaultError, UsageError, WalRelayRefused
from .store.walnames import check_wal_name
from .walfetch import GET, MAX_REPLY, MAX_REQUEST, PING

__all__ = ["Request", "parse_request", "reply", "relay_command", "inside", "WalRelay", "RELAY_SOCKET",
           "CLIENT_FILE"]

RELAY_SOCKET = "wal-relay"
CLIENT_FILE = "walfetch.py"
#: Seconds a connected client gets to send its request.
REQUEST_WAIT = 30.0
#: How often the serving thread looks whether it is to stop.
POLL = 0.2

#: Writes the archived file ``name`` into the open descriptor; its size, or None when it is not archived.
Fetch = Callable[[str, int], Optional[int]]


@dataclass(frozen=True)
class Request:
    """One request: ``GET`` a WAL file by name, or ``PING``."""

    verb: str
    name: str | None = None


# --- pure ----------------------------------------------------------------------------------------


def parse_request(data: bytes, fds: int, truncated: bool = False) -> Request:
    """A request as the client sent it (``fds``: how many descriptors came with it; ``truncated``: the
    message or its descriptors did not fit), checked; WalRelayRefused says why not."""
    if truncated or len(data) > MAX_REQUEST:
        raise WalRelayRefused(f"a request longer than {MAX_REQUEST} bytes, or with more than one descriptor")
    if data == PING:
        if fds:
            raise WalRelayRefused("a ping carries no descriptor")
        return Request("PING")
    verb, sep, rest = data.partition(b" ")
    if verb != GET or not sep:
        raise WalRelayRefused(f"not a request of the relay's: {data[:40]!r}")
    try:
        name = check_wal_name(rest.decode("ascii"))
    except (UnicodeDecodeError, UsageError):
        raise WalRelayRefused(f"{rest[:60]!r} is not the name of a file PostgreSQL archives") from None
    if fds != 1:
        raise WalRelayRefused(f"GET {name} needs one descriptor, the file to write, not {fds}")
    return Request("GET", name)


def reply(status: str, detail: str = "") -> bytes:
    """A reply message, cut to ``MAX_REPLY`` bytes, on one line."""
    text = f"{status} {' '.join(detail.split())}".strip() if detail else status
    return text.encode("utf-8", "replace")[:MAX_REPLY]


def inside(path: str, directory: str) -> bool:
    """Whether ``path`` (as the kernel names an open file: resolved, absolute) is below ``directory``."""
    directory = directory.rstrip("/") + "/"
    return path.startswith(directory) and not path.endswith(" (deleted)")


def relay_command(python: str, client: str, socket_path: str) -> str:
    """The restore_command: ``python -I client SOCKET %f "%p"`` (isolated: nothing of the server's environment or
    working directory, the copy's data directory, is imported)."""
    return " ".join(shlex.quote(a) for a in (python, "-I", client, socket_path)) + ' %f "%p"'


# --- I/O -----------------------------------------------------------------------------------------


@dataclass
class Served:
    """What the relay did, for the report."""

    names: list[str] = field(default_factory=list)  # delivered, in the order asked for
    missing: list[str] = field(default_factory=list)  # asked for, not archived
    errors: list[str] = field(default_factory=list)  # "name: why" of each failed delivery or refused request

    def to_dict(self) -> dict:
        """``first`` and ``last``: the WAL segments served first and last; a history file only when no
        segment was (PostgreSQL asks for its timeline's history again as it is promoted, after the last
        segment, which would hide the range the recovery replayed)."""
        segments = [n for n in self.names if len(n) == 24] or self.names
        return {"count": len(self.names), "first": segments[0] if segments else None,
                "last": segments[-1] if segments else None, "missing": len(self.missing),
                "errors": list(self.errors)}


def _unanswered(exc: Exception) -> str:
    """Why a request went unanswered, as the run's failure says it ("the WAL relay failed: ..."): it said
    "the relay: [Errno 32] Broken pipe" for a client gone before its answer."""
    if isinstance(exc, OSError):
        return f"a request was not answered ({exc.strerror or exc})"
    return f"a request was not answered (internal error: {type(exc).__name__}: {exc})"


class WalRelay:
    """A socket at ``path`` answered by a thread, writing with ``fetch`` into descriptors of files below
    ``datadir``; ``owner`` (uid, gid) the socket is given to (as root: the server's user).  ``close`` ends it."""

    def __init__(self, path: str, fetch: Fetch, datadir: str, owner: tuple[int, int] | None = None):
        self.path, self.fetch = path, fetch
        self.datadir = os.path.realpath(datadir)
        self.served = Served()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(path)
            if owner is not None:
                os.chown(path, *owner)
            os.chmod(path, 0o600)
            self._sock.listen(8)
            self._sock.settimeout(POLL)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="chunkvault-wal-relay", daemon=True)
        self._thread.start()

    def close(self, wait: float = 10.0) -> None:
        """Stop serving: the thread ends once a delivery under way is done (at most ``wait`` s are waited)."""
        self._stop.set()
        self._thread.join(wait)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError:  # closed under us
                return
            with conn:
                try:
                    self._answer(conn)
                except Exception as exc:  # noqa: BLE001 - a client gone mid-answer must not end the relay
                    self.served.errors.append(_unanswered(exc))
                except BaseException:  # a stop (Ctrl-C) noticed in a read: the run is ending, and so is the relay
                    return

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_WAIT)
        msg, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST + 1, 2)
        try:
            conn.sendall(self._handle(msg, fds, bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))))
        finally:
            for fd in fds:
                os.close(fd)

    def _handle(self, msg: bytes, fds: list[int], truncated: bool) -> bytes:
        name = "?"
        try:
            request = parse_request(msg, len(fds), truncated)
            if request.verb == "PING":
                return reply("OK")
            assert request.name is not None
            name = request.name
            self._check_target(fds[0])
            with self._lock:
                size = self.fetch(name, fds[0])
            if size is None:
                self.served.missing.append(name)
                return reply("MISSING")
            self.served.names.append(name)
            return reply("OK", str(size))
        except (ChunkvaultError, OSError) as exc:
            why = str(exc) if isinstance(exc, ChunkvaultError) else (exc.strerror or str(exc))
            self.served.errors.append(f"{name}: {why}")
            return reply("ERROR", why)

    def _check_target(self, fd: int) -> None:
        """The descriptor is a regular file below the copy's data directory, open for writing."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WalRelayRefused("the descriptor passed is not of a regular file")
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
            raise WalRelayRefused("the descriptor passed is not open for writing")
        where = os.readlink(f"/proc/self/fd/{fd}")
        if not inside(where, self.datadir):
            raise WalRelayRefused(f"the file passed, {where}, is not in the copy's data directory")
