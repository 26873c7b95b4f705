"""SFTP sessions for the SFTP remote, over OpenSSH's client or over paramiko's SSH stack.

Both kinds hand out ``sftp_client.SFTPClient`` sessions; they differ in what
carries the SFTP packets:

- ``OpenSSHSessions`` runs ``ssh -s sftp`` per session, on one end of a socket
  pair, as restic does.  Encryption and MACs run in that process, in C, instead
  of in a paramiko thread of ours that needs the interpreter lock for every
  32 KiB packet (a 500 MiB restore: 3.3-3.6 s -> 2.2-2.5 s).  The user's whole
  ``ssh_config`` applies (ProxyJump, certificates, ControlMaster).
- ``ParamikoSessions`` is the SSH stack in Python, for hosts without an ``ssh``
  client: one connection, one channel per session.

Connection failures become ``PermissionDenied`` (unknown or changed host key,
refused authentication) or ``RemoteUnavailable`` (no server, no route), each
with one line saying what to do.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from chunkvault.errors import ChunkvaultError, PermissionDenied, RemoteError, RemoteUnavailable, UsageError
from chunkvault.processes import without_secrets

from .sftp_client import SFTPClient

TRANSPORTS = ("auto", "openssh", "paramiko")
KEEPALIVE_SECONDS = 30
# A paramiko channel that has moved no byte for this long is taken for a server that stopped answering (as
# OpenSSH's client gives up after ServerAliveCountMax unanswered keepalives): paramiko's keepalive detects
# nothing, and reads and writes would wait forever.
STALL_SECONDS = KEEPALIVE_SECONDS * 4


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to log in.  ``user``/``port`` are None when the URL left them to the SSH config."""

    host: str
    port: int | None
    user: str | None
    key_files: tuple[str, ...]
    known_hosts: str | None  # None: the SSH client's own (~/.ssh/known_hosts)
    accept_new_host_key: bool
    ssh_config: str | None
    connect_timeout: float
    config_port: int | None = None  # the port an SSH config sets, where the URL names none (for messages)
    #: Seconds a session that moves no byte is given up after (``-o sftp.read-timeout``); None: STALL_SECONDS.
    read_timeout: float | None = None

    def stall_seconds(self) -> float:
        return self.read_timeout or STALL_SECONDS

    def keepalive_seconds(self) -> int:
        """Between keepalives: a quarter of the stall time, so that three unanswered ones (OpenSSH's
        ServerAliveCountMax) end the session within it."""
        return KEEPALIVE_SECONDS if self.read_timeout is None else max(1, round(self.read_timeout / 4))

    def where(self) -> str:
        """host:port, an IPv6 address bracketed: ``::1:2222`` reads as another address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port or self.config_port or 22}"

    def known_hosts_name(self) -> str:
        return self.known_hosts or "~/.ssh/known_hosts"


def resolve_transport(name: str) -> str:
    """``auto`` is OpenSSH's client when one is on the PATH, else paramiko."""
    name = str(name).lower()
    if name not in TRANSPORTS:
        raise UsageError(f"SFTP option transport must be one of {', '.join(TRANSPORTS)}, not {name!r}")
    if name == "auto":
        return "openssh" if shutil.which("ssh") else "paramiko"
    return name


def unknown_host(target: SSHTarget, fingerprint: str | None, known_hosts: str | None = None) -> PermissionDenied:
    """``known_hosts``: the files searched, where they are not ``target.known_hosts_name()``."""
    seen = f" ({fingerprint})" if fingerprint else ""
    return PermissionDenied(
        f"unknown SSH host key for {target.where()}{seen}: not in {known_hosts or target.known_hosts_name()}; "
        "add it (ssh-keyscan) or accept it once with -o sftp.accept-new-host-key=yes "
        "(CHUNKVAULT_SFTP_ACCEPT_NEW_HOST_KEY=1, accept_new_host_key=True in the API)")


def known_hosts_name_of(target: SSHTarget) -> str:
    """The name a known_hosts file holds ``target`` under: ``host``, or ``[host]:port`` off port 22."""
    port = target.port or target.config_port or 22
    return target.host if port == 22 else f"[{target.host}]:{port}"


def changed_host(target: SSHTarget, fingerprint: str | None, known_hosts: str | None = None,
                 offending: str | None = None) -> PermissionDenied:
    """A host key other than the recorded one: a man in the middle, or a server whose keys were made anew.
    Says how to trust the new key once its fingerprint is confirmed: the old entry is never replaced for the
    user.  ``offending``: the ``file:line`` of the old entry, where the client named it."""
    files = known_hosts or target.known_hosts_name()
    seen = f" (got {fingerprint})" if fingerprint else ""
    entry = f"; the old one is at {offending}" if offending else ""
    file = offending.rsplit(":", 1)[0] if offending else files.split(" or ")[0]
    # expanded here: quoted, a tilde (~/.ssh/known_hosts, the default) reaches ssh-keygen as it is
    remove = f"ssh-keygen -R {shlex.quote(known_hosts_name_of(target))} -f {shlex.quote(os.path.expanduser(file))}"
    return PermissionDenied(
        f"SSH host key for {target.where()} does not match {files}{seen}{entry}: refusing to connect "
        "(someone may be intercepting the connection; if the server's keys were renewed, confirm the new "
        f"fingerprint with its administrator, remove the old entry with {remove}, then accept the new key "
        "once with -o sftp.accept-new-host-key=yes)")


def revoked_host(target: SSHTarget, key_type: str | None, known_hosts: str | None = None) -> PermissionDenied:
    """A host key a known_hosts file marks ``@revoked``: no option accepts it (a stolen key may be in use)."""
    kind = f"{key_type} " if key_type else ""
    return PermissionDenied(
        f"the {kind}SSH host key of {target.where()} is marked @revoked in {known_hosts or target.known_hosts_name()}: "
        "refusing to connect (a stolen key may be in use; ask the server's administrator for its current key)")


def openssh_known_hosts(target: SSHTarget) -> str | None:
    """The known_hosts files OpenSSH's client reads for ``target``, as a message names them: an SSH
    config's ``UserKnownHostsFile`` decides, not ``~/.ssh/known_hosts``.  None if ssh does not say."""
    if target.known_hosts:
        return None
    return " or ".join(openssh_settings(target).get("userknownhostsfile", "").split()) or None


def refused_login(target: SSHTarget, user: str | None) -> PermissionDenied:
    """Names a key file given that has a passphrase: neither client may ask for it (no terminal is read), so
    such a key is never offered unless an agent holds it, and "no accepted key" alone sent the user looking
    at the server's authorized_keys."""
    who = f" as {user!r}" if user else ""
    locked = [key for key in target.key_files if _has_passphrase(os.path.expanduser(key))]
    hint = (f"; key file {locked[0]} has a passphrase, which is never asked for: load it into ssh-agent "
            f"(ssh-add {shlex.quote(locked[0])})") if locked else ""
    return PermissionDenied(f"SSH authentication{who} to {target.where()} failed (no accepted key{hint})")


def _has_passphrase(path: str) -> bool:
    """Whether the private key file ``path`` is encrypted (OpenSSH's format: a cipher other than "none";
    PEM: an ENCRYPTED header).  False where it cannot be read or parsed."""
    import base64
    import binascii

    try:
        with open(path, "rb") as f:
            text = f.read(1 << 16)
    except OSError:
        return False
    if b"ENCRYPTED" in text.split(b"-----END", 1)[0]:
        return True
    begin, end = b"-----BEGIN OPENSSH PRIVATE KEY-----", b"-----END OPENSSH PRIVATE KEY-----"
    if begin not in text or end not in text:
        return False
    try:
        blob = base64.b64decode(b"".join(text.split(begin, 1)[1].split(end, 1)[0].split()))
    except (binascii.Error, ValueError):
        return False
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic) or len(blob) < len(magic) + 4:
        return False
    size = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
    return blob[len(magic) + 4:len(magic) + 4 + size] not in (b"none", b"")


_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]+")
# "The fingerprint for the ED25519 key sent by the remote host is", "No ED25519 host key is known for",
# "ED25519 host key for [h]:22 was revoked", "Offending ED25519 key in /path/known_hosts:3"
_KEY_TYPE = re.compile(r"fingerprint for the (\S+) key sent|No (\S+) host key is known"
                       r"|^(\S+) host key for \S+ was revoked", re.M)
_OFFENDING = re.compile(r"^Offending \S+ key in (.+:\d+)$", re.M)


def classify_ssh_failure(stderr: str, target: SSHTarget) -> ChunkvaultError:
    """The error for an ``ssh`` client that exited before the SFTP session began, from what it printed."""
    lines = [line.strip() for line in stderr.replace("\r", "").splitlines() if line.strip()]
    text = "\n".join(lines)
    typed = _KEY_TYPE.search(text)
    key_type = next((group for group in typed.groups() if group), None) if typed else None
    found = _FINGERPRINT.search(text)
    fingerprint = " ".join(filter(None, (key_type, found.group(0)))) if found else None
    if "REVOKED HOST KEY" in text or re.search(r"host key for \S+ was revoked", text):
        return revoked_host(target, key_type, openssh_known_hosts(target))
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or re.search(r"Host key for \S+ has changed", text):
        offending = _OFFENDING.search(text)
        return changed_host(target, fingerprint, openssh_known_hosts(target), offending and offending.group(1))
    if "host key is known for" in text or "Host key verification failed" in text:
        return unknown_host(target, fingerprint or (f"{key_type} key" if key_type else None),
                            openssh_known_hosts(target))
    if "Permission denied" in text or "Too many authentication failures" in text:
        match = re.search(r"^(\S+)@\S+: Permission denied", text, re.M)
        return refused_login(target, match.group(1) if match else target.user)
    bad = re.search(r": terminating, (\d+) bad configuration options?$", text, re.M)
    if bad:  # not an outage: retried, the same refusal took every attempt (15 minutes once the server answered)
        more = int(bad.group(1)) - 1
        return UsageError(f"ssh refuses its configuration: {lines[0]}" + (f" (and {more} more)" if more else ""))
    owner = re.search(r"^Bad owner or permissions on .+$", text, re.M)
    if owner:  # ~/.ssh/config writable by others: as refused as a bad option, and no retry changes it
        return UsageError(f"ssh refuses its configuration: {owner.group(0)}")
    if "subsystem request failed" in text:
        return RemoteError(f"the SSH server {target.where()} offers no SFTP subsystem")
    last = lines[-1] if lines else "the ssh client exited"
    return RemoteUnavailable(f"cannot connect to SSH server {target.where()}: {last.removeprefix('ssh: ')}")


def _ssh_option_path(path: str) -> str:
    """A path for an ``ssh -o`` value: quoted, with ``%`` escaped from ssh's token expansion."""
    return '"' + path.replace("%", "%%") + '"'


def openssh_command(target: SSHTarget, program: str = "ssh") -> list[str]:
    """``ssh`` arguments for an SFTP session: no prompts, no forwarding, strict host keys."""
    cmd = [program, "-x", "-a", "-T",
           "-o", "BatchMode=yes",
           "-o", "LogLevel=ERROR",
           "-o", "StrictHostKeyChecking=" + ("accept-new" if target.accept_new_host_key else "yes"),
           "-o", f"ConnectTimeout={max(1, round(target.connect_timeout))}",
           "-o", f"ServerAliveInterval={target.keepalive_seconds()}",
           "-o", "ServerAliveCountMax=3",
           "-o", "ClearAllForwardings=yes",
           "-o", "PermitLocalCommand=no"]
    if target.ssh_config:
        cmd += ["-F", target.ssh_config]
    if target.known_hosts:
        cmd += ["-o", "UserKnownHostsFile=" + _ssh_option_path(target.known_hosts)]
    for key in target.key_files:  # not -i: ssh drops a path with % there (it looks for it before expanding)
        cmd += ["-o", "IdentityFile=" + _ssh_option_path(key)]
    if target.port:
        cmd += ["-p", str(target.port)]
    if target.user:
        cmd += ["-l", target.user]
    return cmd + ["-s", "--", target.host, "sftp"]


def openssh_settings(target: SSHTarget, program: str = "ssh") -> dict[str, str]:
    """What ``ssh -G`` says it would use for ``target`` (user, port, ...): OpenSSH's own reading of the
    configuration, Include and Match blocks too.  Empty where it cannot say (a broken configuration,
    which the connection then reports)."""
    command = openssh_command(target, program)[:-4] + ["-G", "--", target.host]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              env=without_secrets(os.environ))  # its Match exec runs commands
    except (OSError, subprocess.SubprocessError):
        return {}
    if done.returncode != 0:
        return {}
    settings: dict[str, str] = {}
    for line in done.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key, value.strip())
    return settings


class _ProcessChannel:
    """The end of a socket pair whose other end is an ``ssh`` client's stdin and stdout.

    Offers what ``SFTPClient`` uses of a channel, and the ``ssh`` process behind it."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen, stderr: Any):
        self.sock = sock
        self.proc = proc
        self._stderr = stderr
        self.sendall = sock.sendall
        self.stderr = ""

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes, waiting for all of them (a reply's data in one object, not in the pieces the
        socket happened to hold)."""
        return self.sock.recv(n, socket.MSG_WAITALL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End the session; what ssh printed stays in ``stderr``."""
        self.sock.close()  # ssh sees end of input and exits
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self._stderr.closed:
            self._stderr.seek(0)
            self.stderr = self._stderr.read().decode(errors="replace")
            self._stderr.close()


class OpenSSHSessions:
    """One ``ssh -s sftp`` process per session.

    Each runs in its own process group, so a Ctrl-C on the terminal reaches
    chunkvault (which then releases its lock through these sessions) and not
    the ssh clients."""

    lost_errors: tuple[type[BaseException], ...] = (EOFError,)  # what a session raises when its connection is gone

    def __init__(self, target: SSHTarget, program: str = "ssh"):
        self.target = target
        self.command = openssh_command(target, program)
        _require_key_files(target)  # ssh only warns, then reports a refused login
        if target.accept_new_host_key and target.known_hosts:  # ssh would trust the host, record nothing, say nothing
            try:
                os.makedirs(os.path.dirname(os.path.expanduser(target.known_hosts)) or ".", mode=0o700, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot make the directory of known_hosts file {target.known_hosts}: "
                                 f"{exc.strerror or exc}") from None

    def open(self) -> Any:
        ours, theirs = socket.socketpair()
        stderr = tempfile.TemporaryFile()
        try:
            # without our credentials: the SSH config's ProxyCommand, LocalCommand and Match exec inherit it
            proc = subprocess.Popen(self.command, stdin=theirs, stdout=theirs, stderr=stderr,
                                    env=without_secrets(os.environ), start_new_session=True)
        except OSError as exc:
            ours.close()
            stderr.close()
            raise UsageError(f"cannot run the SSH client {self.command[0]!r} ({exc.strerror or exc}); "
                             "install OpenSSH's client or use the SFTP option transport=paramiko") from None
        finally:
            theirs.close()
        channel = _ProcessChannel(ours, proc, stderr)
        # The handshake, login and SFTP version exchange happen before the first reply.
        ours.settimeout(self.target.connect_timeout * 2 + 5)
        try:
            sftp = SFTPClient(channel)
        except socket.timeout:
            channel.close()
            raise RemoteUnavailable(f"cannot connect to SSH server {self.target.where()}: timed out") from None
        except (EOFError, OSError):
            channel.close()
            raise classify_ssh_failure(channel.stderr, self.target) from None
        ours.settimeout(None)
        return sftp

    @staticmethod
    def alive(sftp: Any) -> bool:
        return sftp.sock.alive()

    def stalled(self, sftp: Any) -> None:
        """Nothing is shared between sessions: closing the stalled one ends its ssh client."""

    def close(self) -> None:
        """Sessions end when closed; nothing is shared between them."""


def _require_key_files(target: SSHTarget) -> None:
    for key in target.key_files:
        if not os.path.exists(os.path.expanduser(key)):
            raise UsageError(f"SSH key file {key} does not exist")


class ParamikoSessions:
    """One paramiko SSH connection; each session is an SFTP channel on it.  Reconnects when it died."""

    def __init__(self, target: SSHTarget):
        import paramiko

        _quiet_paramiko()
        _require_key_files(target)  # else its OSError was retried as an outage, 8 times
        self._paramiko = paramiko
        self.lost_errors = (EOFError, paramiko.SSHException)
        self.target = target
        self._lock = threading.Lock()
        self._client: Any = None

    def _connect(self, prefer: bytes | None = None) -> Any:
        """A connected client.  paramiko compares the server's key with one key of its type listed for the host,
        while OpenSSH takes any listed: a key that known_hosts lists (not as revoked), refused as another's, is
        tried once more with that key as the one paramiko compares (``prefer``)."""
        paramiko = self._paramiko
        target = self.target
        known_hosts = os.path.expanduser(target.known_hosts_name())
        client = paramiko.SSHClient()
        entries, revoked = _read_known_hosts(known_hosts) if os.path.exists(known_hosts) else ([], set())
        port = target.port or 22
        names = (target.host,) if port == 22 else (f"[{target.host}]:{port}", target.host)  # paramiko's first
        entries, bare = _listed_for(entries, names)
        _trust(client.get_host_keys(), entries, revoked, names[0], prefer)
        also = {e.key.asbytes() for e in bare} - revoked
        client.set_missing_host_key_policy(_AcceptNew(known_hosts, revoked, also) if target.accept_new_host_key
                                           else _Refuse(revoked, also))
        try:
            client.connect(
                target.host,
                port=target.port or 22,
                username=target.user,
                key_filename=list(target.key_files) or None,
                timeout=target.connect_timeout,
                banner_timeout=target.connect_timeout,
                auth_timeout=target.connect_timeout,
                allow_agent=True,
                look_for_keys=not target.key_files,
            )
        except _UnknownHost as exc:
            client.close()
            raise unknown_host(target, exc.fingerprint) from None
        except _RevokedHost as exc:
            client.close()
            raise revoked_host(target, exc.key_type) from None
        except paramiko.BadHostKeyException as exc:
            client.close()
            shown = exc.key.asbytes()
            if shown in revoked:  # another key of its type is listed: OpenSSH says revoked, not changed
                raise revoked_host(target, exc.key.get_name()) from None
            if prefer is None and any(e.key.asbytes() == shown for e in entries):
                return self._connect(prefer=shown)
            raise changed_host(target, _fingerprint(exc.key)) from None
        except paramiko.AuthenticationException:
            client.close()
            raise refused_login(target, target.user) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise _connect_failure(target, exc) from None
        transport = client.get_transport()
        transport.set_keepalive(target.keepalive_seconds())
        _no_delay(transport.sock)
        return client

    def open(self) -> Any:
        with self._lock:
            transport = self._client.get_transport() if self._client else None
            if transport is None or not transport.is_active():
                if self._client is not None:
                    self._client.close()
                self._client = self._connect()
            client = self._client
        try:
            channel = client.get_transport().open_session(timeout=self.target.connect_timeout)
            channel.settimeout(self.target.stall_seconds())
            channel.invoke_subsystem("sftp")
            return SFTPClient(channel)
        except (self._paramiko.SSHException, OSError, EOFError) as exc:
            if not isinstance(exc, self._paramiko.ChannelException):  # a refused channel (MaxSessions) leaves
                self._drop(client)                                     # the connection's other sessions be
            raise RemoteUnavailable(f"cannot open SFTP channel on {self.target.where()}: "
                                    f"{exc or type(exc).__name__}") from None

    @staticmethod
    def alive(sftp: Any) -> bool:
        channel = sftp.sock
        return not channel.closed and channel.get_transport().is_active()

    def stalled(self, sftp: Any) -> None:
        """A session timed out: its connection is dropped, so the next session reconnects (paramiko would
        still call it active, and open every new channel on it)."""
        with self._lock:
            client = self._client
        if client is not None and client.get_transport() is sftp.sock.get_transport():
            self._drop(client)

    def _drop(self, client: Any) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        client.close()

    def transport(self) -> Any:
        return self._client.get_transport() if self._client else None

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _quiet_paramiko() -> None:
    """Keep paramiko's log off stderr: without a handler of its own it reached Python's last-resort one, and
    a server that failed the handshake printed tracebacks from paramiko's thread before chunkvault's one
    line.  An application that gave paramiko's logger handlers keeps them."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


def _connect_failure(target: SSHTarget, exc: BaseException) -> ChunkvaultError:
    """The error for a paramiko connection that failed other than on its host key or a refused key."""
    if str(exc) == "No authentication methods available":  # no key file, agent or ~/.ssh/id_*: was retried
        return refused_login(target, target.user)           # as an outage, 8 times
    if str(exc).startswith("Error reading SSH protocol banner") and isinstance(exc.__context__,
                                                                               (EOFError, ConnectionError)):
        # closed (or reset, our banner unread) before any banner (sshd's MaxStartups, a host rule), at once:
        # no wait ran out
        return RemoteUnavailable(f"cannot connect to SSH server {target.where()}: the connection was closed "
                                 "before the SSH handshake")
    if str(exc) == "No existing session" or str(exc).startswith("Error reading SSH protocol banner"):
        # a server that accepted the connection and sent no SSH banner within the time (paramiko's own word
        # for it, where its wait for the handshake ran out first, named a session)
        return RemoteUnavailable(f"cannot connect to SSH server {target.where()}: no SSH handshake within "
                                 f"{target.connect_timeout:g} s (is an SSH server listening there?)")
    return RemoteUnavailable(f"cannot connect to SSH server {target.where()}: {exc or type(exc).__name__}")


def _no_delay(sock: Any) -> None:
    """Send each SSH packet at once (as OpenSSH does).  paramiko leaves Nagle's algorithm on, and every SFTP
    request waiting for the ACK of the previous packet made a 76 KiB ranged read take 16 ms instead of 1.7."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _fingerprint(key: Any) -> str:
    import base64
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def _read_known_hosts(path: str) -> tuple[list[Any], set[bytes]]:
    """``path``'s entries, as OpenSSH reads the file, and the keys it marks ``@revoked``.  paramiko takes no
    marker lines: one made the whole file unreadable (an internal error), and its revocations went unseen.
    ``@cert-authority`` lines are passed over (paramiko checks no host certificates: such a host is unknown
    unless its own key is listed), and so are lines that do not parse, as OpenSSH does."""
    from paramiko.hostkeys import HostKeyEntry

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read known_hosts file {path}: {exc.strerror or exc}") from None
    revoked: set[bytes] = set()
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        marker = line.split(None, 1)[0] if line.startswith("@") else ""
        if not line or line.startswith("#") or marker == "@cert-authority":
            continue
        try:
            entry = HostKeyEntry.from_line(line.split(None, 1)[1] if marker else line, number)
        except Exception:  # a line paramiko cannot parse (bad base64, a key it cannot decode), or a bare marker
            entry = None
        if entry is None or entry.key is None:
            continue
        if marker == "@revoked":
            revoked.add(entry.key.asbytes())
        elif not marker:
            entries.append(entry)
    return entries, revoked


def _names_host(patterns: list[str], names: tuple[str, ...]) -> bool:
    """Whether a known_hosts line's host patterns name the host, as OpenSSH reads them: ``*`` and ``?``, a
    ``!pattern`` that names it outweighing any other, hashed names; for a port other than 22 OpenSSH takes a
    line for the bare host too (``names``: ``[host]:port`` and ``host``).  paramiko took each pattern for a
    host's name, so a host known by a pattern was unknown to it."""
    return any(_pattern_list_matches(patterns, name) for name in names)


def _listed_for(entries: list[Any], names: tuple[str, ...]) -> tuple[list[Any], list[Any]]:
    """The entries OpenSSH compares a host's key with: those naming ``[host]:port`` (``names[0]``), and apart,
    those naming the bare host for a key type none of them lists.  OpenSSH looks again without the port only
    for a key of a type it found no line of: one listed for ``[host]:port`` that differs is a changed key,
    whatever the bare host's lines (another server on port 22) list; one the bare host's lines list is
    known, and one they do not is unknown (not changed: accept-new records it for ``[host]:port``)."""
    own = [e for e in entries if _names_host(e.hostnames, names[:1])]
    types = {e.key.get_name() for e in own}
    return own, [e for e in entries if e.key.get_name() not in types and _names_host(e.hostnames, names[1:])]


def _pattern_list_matches(patterns: list[str], name: str) -> bool:
    import fnmatch

    from paramiko.hostkeys import HostKeys

    found = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern.startswith("|1|"):
            hit = HostKeys.hash_host(name, pattern) == pattern
        else:  # no [...] classes in OpenSSH's patterns: only * and ? are special
            glob = "".join("[[]" if c == "[" else "[]]" if c == "]" else c for c in pattern.lower())
            hit = fnmatch.fnmatchcase(name.lower(), glob)
        if hit and negated:
            return False
        found = found or hit
    return found


def _trust(host_keys: Any, entries: list[Any], revoked: set[bytes], name: str, prefer: bytes | None = None) -> None:
    """Put the keys of ``entries`` (those listed for the host) in paramiko's ``host_keys`` under ``name``, the
    one it looks up, but no revoked one.  paramiko keeps one key of a type for a name, and compares the
    server's with that one alone: the first listed, or ``prefer`` where listed."""
    for entry in sorted(entries, key=lambda e: e.key.asbytes() != prefer):
        if entry.key.asbytes() in revoked:
            continue
        held = host_keys.lookup(name)
        if held is None or entry.key.get_name() not in held:
            host_keys.add(name, entry.key.get_name(), entry.key)


class _UnknownHost(Exception):
    def __init__(self, fingerprint: str):
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


class _RevokedHost(Exception):
    def __init__(self, key_type: str):
        super().__init__(key_type)
        self.key_type = key_type


def _refuse_revoked(key: Any, revoked: set[bytes]) -> None:
    if key.asbytes() in revoked:
        raise _RevokedHost(key.get_name())


class _Refuse:
    """Missing-host-key policy: refuse, naming the key so the user can check it."""

    def __init__(self, revoked: set[bytes], bare: set[bytes]):
        self.revoked = revoked
        self.bare = bare  # the keys listed for the host without its port (``_listed_for``)

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        _refuse_revoked(key, self.revoked)
        if key.asbytes() not in self.bare:
            raise _UnknownHost(_fingerprint(key))


class _AcceptNew:
    """Missing-host-key policy of ``accept-new``: trust on first use, record it in known_hosts; never a
    revoked key."""

    def __init__(self, path: str, revoked: set[bytes], bare: set[bytes]):
        self.path = path
        self.revoked = revoked
        self.bare = bare  # the keys listed for the host without its port (``_listed_for``): known already

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        _refuse_revoked(key, self.revoked)
        if key.asbytes() in self.bare:
            return
        client.get_host_keys().add(hostname, key.get_name(), key)
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line)
