"""A real ``chunkvault serve`` for tests: a child process on a free 127.0.0.1 port.

Use from a test module with::

    from servers_http import http_server, serve_factory  # noqa: F401

``serve_factory(*flags)`` starts a server (``--listen`` and ``--path`` are added
unless told otherwise) and stops it with SIGTERM at teardown, asserting that it
exits 0.  ``http_server`` is one server with a tokens file holding a token of
each mode.  ``run_serve(*flags)`` runs ``chunkvault serve`` to completion, for
settings that make it exit at once.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from netutil import free_port, listening

SERVE = [sys.executable, "-m", "chunkvault.cli", "serve"]
FULL_TOKEN = "full-token-0123456789abcdef"
APPEND_TOKEN = "append-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}


def write_tokens(directory: Path, tokens: dict[str, str] | None = None, mode: int = 0o600) -> Path:
    """A tokens file (``MODE TOKEN`` lines); by default one token of each mode."""
    tokens = tokens or {"full": FULL_TOKEN, "append-only": APPEND_TOKEN, "read-only": READ_TOKEN}
    path = directory / "tokens"
    path.write_text("# test tokens\n\n" + "".join(f"{m} {t}\n" for m, t in tokens.items()))
    path.chmod(mode)
    return path


def make_self_signed(directory: Path, host: str = "127.0.0.1", expired: bool = False,
                     client_only: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (its own CA) and its key, as PEM files; ``expired``: one whose
    day of validity ended yesterday; ``client_only``: one for TLS clients only (no serverAuth purpose)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chunkvault test server")])
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2 if expired else 0)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client_only
                                              else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def run_serve(*flags: str, timeout: float = 30.0, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``chunkvault serve FLAGS`` run to its end (for settings that make it exit at once), under ``wrap`` (a
    command such as setpriv) if given."""
    return subprocess.run([*wrap, *SERVE, *flags], env=_env(), capture_output=True, text=True, timeout=timeout)


class ServeProcess:
    """One ``chunkvault serve`` child process and its captured stderr."""

    def __init__(self, path: Path, flags: tuple[str, ...], *, port: int | None, add_listen: bool, add_path: bool,
                 scheme: str = "http", preexec_fn: Callable[[], None] | None = None):
        self.path = path
        self.flags = flags
        self.port = port or 0
        self.scheme = scheme
        self.add_listen = add_listen
        self.add_path = add_path
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def log(self) -> str:
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def start(self, startup_timeout: float = 20.0) -> "ServeProcess":
        """Start the server (again, after ``stop``: the fixture then stops this one too)."""
        self.returncode = None
        fixed = bool(self.port)
        for _ in range(1 if fixed else 3):  # the free port may be taken before the server binds it
            if not fixed:
                self.port = free_port()
            argv = [*SERVE]
            if self.add_listen:
                argv += ["--listen", f"127.0.0.1:{self.port}"]
            if self.add_path:
                argv += ["--path", str(self.path)]
            argv += self.flags
            self._log.truncate(0)
            self._log.seek(0)
            self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=_env(),
                                         preexec_fn=self.preexec_fn)
            deadline = time.monotonic() + startup_timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if listening(self.port) and "listening on" in self.log():  # bound, and said so
                    return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if "in use" not in self.log():
                break
        self.returncode = self.proc.returncode
        raise RuntimeError(f"chunkvault serve did not start (exit {self.proc.poll()}):\n{self.log()[-3000:]}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the server and wait; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"chunkvault serve ignored signal {sig}:\n{self.log()[-3000:]}") from None
        self.returncode = self.proc.returncode
        return self.returncode

    def close(self) -> None:
        os.unlink(self._log.name)


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``start(*flags, path=None, port=None, add_listen=True, add_path=True, tls=False, preexec_fn=None)``.

    ``path`` defaults to a fresh directory; stopped with SIGTERM at teardown,
    each server must exit 0.
    """
    started: list[ServeProcess] = []

    def start(*flags: str, path: Path | None = None, port: int | None = None, add_listen: bool = True,
              add_path: bool = True, tls: bool = False, preexec_fn: Callable[[], None] | None = None) -> ServeProcess:
        if path is None:
            path = tmp_path / f"served{len(started)}" / "repo"
            path.mkdir(parents=True)
        server = ServeProcess(path, flags, port=port, add_listen=add_listen, add_path=add_path,
                              scheme="https" if tls else "http", preexec_fn=preexec_fn)
        started.append(server)
        return server.start()

    yield start
    failures = []
    for server in started:
        if server.proc is not None and server.returncode is None:
            code = server.stop()
            if code != 0:
                failures.append(f"exit {code}:\n{server.log()[-2000:]}")
        server.close()
    assert not failures, "chunkvault serve did not exit 0 on SIGTERM: " + "\n".join(failures)


@pytest.fixture
def http_server(serve_factory: Callable[..., ServeProcess], tmp_path: Path) -> ServeProcess:
    """A server with FULL_TOKEN, APPEND_TOKEN and READ_TOKEN in its tokens file."""
    return serve_factory("--tokens", str(write_tokens(tmp_path)))


def wait_for(predicate, bound: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds or ``bound`` seconds pass (a generous bound, not a timing claim)."""
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
