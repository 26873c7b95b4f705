"""A real OpenSSH server for tests: ``sshd`` on 127.0.0.1 with generated keys.

The server runs as a child process with its own configuration (its own host key,
an authorized_keys file with a generated user key, the internal SFTP subsystem),
so every request goes through a real SSH stack (OpenSSH's client or paramiko).  Use from a test module::

    from servers_ssh import sshd, sftp_repo  # noqa: F401

``sshd`` (one per test run) is the running server; ``sftp_repo`` is a fresh,
empty directory on it with the URL, ``open_remote`` options and CLI environment.
Without an ``sshd`` binary the tests skip, except under CI, where they fail.
"""
from __future__ import annotations

import getpass
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from netutil import free_port, stop_process, wait_listening

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _keygen(path: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "chunkvault-test", "-f", path],
                   check=True, capture_output=True)
    with open(path + ".pub") as f:
        return f.read().strip()


class SSHServer:
    """sshd with a private configuration on a free 127.0.0.1 port."""

    def __init__(self, workdir: str, max_sessions: int = 64) -> None:
        self.dir = workdir
        self.max_sessions = max_sessions  # channels per connection
        self.user = getpass.getuser()
        self.host_key = os.path.join(workdir, "host_ed25519")
        self.user_key = os.path.join(workdir, "user_ed25519")
        self.host_pub = _keygen(self.host_key)
        self.user_pub = _keygen(self.user_key)
        with open(os.path.join(workdir, "authorized_keys"), "w") as f:
            f.write(self.user_pub + "\n")
        self.known_hosts = os.path.join(workdir, "known_hosts")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    def _config(self) -> str:
        path = os.path.join(self.dir, "sshd_config")
        with open(path, "w") as f:
            f.write(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {os.path.join(self.dir, "sshd.pid")}
AuthorizedKeysFile {os.path.join(self.dir, "authorized_keys")}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
MaxSessions {self.max_sessions}
MaxStartups 64
Subsystem sftp internal-sftp
LogLevel ERROR
""")
        return path

    def start(self, startup_timeout: float = 20.0, port: int | None = None) -> None:
        """On a free port, or on ``port`` (a restart where clients expect it)."""
        if os.geteuid() == 0:  # sshd started by root needs its privilege-separation directory
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for _ in range(1 if port else 3):
            self.port = port or free_port()
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self._config()],
                                         stdout=self._log, stderr=subprocess.STDOUT)
            if wait_listening(self.port, self.proc, time.monotonic() + startup_timeout):
                with open(self.known_hosts, "w") as f:
                    f.write(f"[127.0.0.1]:{self.port} {self.host_pub}\n")
                return
            self.stop()
        self._log.seek(0)
        raise RuntimeError("sshd did not start:\n" + self._log.read().decode(errors="replace")[-2000:])

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def url(self, path: str) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}{path}"

    @property
    def options(self) -> dict[str, str]:
        return {"key_file": self.user_key, "known_hosts": self.known_hosts}

    @property
    def env(self) -> dict[str, str]:
        return {"CHUNKVAULT_SFTP_KEY_FILE": self.user_key, "CHUNKVAULT_SFTP_KNOWN_HOSTS": self.known_hosts}


@dataclass
class SFTPRepoDir:
    """An empty directory served over SFTP, ready to hold a repository."""

    path: str
    url: str
    options: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def require_sshd() -> None:
    """Skip the calling test without OpenSSH's server, or fail it under CI, where it must be installed."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        if os.environ.get("CI"):
            pytest.fail("sshd/ssh-keygen missing: install openssh-server and openssh-client")
        pytest.skip("OpenSSH server not installed")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> Iterator[SSHServer]:
    require_sshd()
    server = SSHServer(str(tmp_path_factory.mktemp("sshd")))
    server.start()
    yield server
    server.stop()


def known_host_entry(known_hosts: str, port: int) -> str:
    """The line of ``known_hosts`` for 127.0.0.1:port, hashed or not (``ssh-keygen -F``), or ''."""
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{port}", "-f", known_hosts],
                           capture_output=True, text=True)
    return "".join(line for line in found.stdout.splitlines(keepends=True) if not line.startswith("#"))


_counter = itertools.count()


@pytest.fixture
def sftp_repo(sshd, tmp_path) -> SFTPRepoDir:
    path = str(tmp_path / f"sftp-repo-{next(_counter)}")
    return SFTPRepoDir(path=path, url=sshd.url(path), options=sshd.options, env=sshd.env)
