"""A real S3 server for tests: moto in server mode, over HTTP on 127.0.0.1.

The server runs as its own process (no in-process patching of boto3), so every
request goes through botocore's real HTTP stack.  Use from a test module with::

    from servers_s3 import moto_s3, s3_bucket, s3_bucket_factory  # noqa: F401

``moto_s3`` (one per test run) is the running server; ``s3_bucket`` is a fresh, empty
bucket per test; ``s3_bucket_factory()`` makes as many more as a test needs.
Each ``S3Bucket`` carries the repository URL, the ``open_remote`` options and an
environment for CLI subprocesses.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest

from netutil import free_port, stop_process, wait_listening

# Fake credentials: moto accepts any; real AWS config of the machine is kept out.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "chunkvault-test-key",
    "AWS_SECRET_ACCESS_KEY": "chunkvault-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ISOLATION = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class MotoServer:
    """moto_server as a child process on a free 127.0.0.1 port, its conditional writes atomic as S3's are
    (``moto_atomic.py``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log = tempfile.TemporaryFile()
        self._names = itertools.count()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, startup_timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(TEST_CREDENTIALS)
        for _ in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "moto_atomic.py"),
                 "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            if wait_listening(self.port, self.proc, time.monotonic() + startup_timeout):
                return
            self.stop()
        self._log.seek(0)
        raise RuntimeError("moto server did not start:\n" + self._log.read().decode(errors="replace")[-2000:])

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def new_bucket_name(self) -> str:
        return f"cv-test-{os.getpid()}-{next(self._names)}"

    def create_bucket(self, name: str | None = None) -> str:
        name = name or self.new_bucket_name()
        self.client().create_bucket(Bucket=name)
        return name


@dataclass
class S3Bucket:
    """A fresh bucket on the test server, ready to hold a repository."""

    name: str
    endpoint: str
    prefix: str = "repo"
    options: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}" if self.prefix else f"s3://{self.name}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess that should reach this bucket."""
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(TEST_CREDENTIALS)
        env.update(_ISOLATION)
        env["AWS_ENDPOINT_URL"] = self.endpoint
        return env


def use_test_credentials(mp: pytest.MonkeyPatch) -> None:
    """The test credentials in the environment, and the machine's own AWS configuration kept out."""
    for name in _CLEARED:
        mp.delenv(name, raising=False)
    for name, value in {**TEST_CREDENTIALS, **_ISOLATION}.items():
        mp.setenv(name, value)


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that starts its own moto server (and may run before ``moto_s3`` set these)."""
    use_test_credentials(monkeypatch)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoServer]:
    """One moto S3 server for the whole test run, with test credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        use_test_credentials(mp)
        server = MotoServer()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket_factory(moto_s3: MotoServer) -> Callable[..., S3Bucket]:
    """Call with optional ``prefix=`` to get another fresh bucket."""

    def make(prefix: str = "repo") -> S3Bucket:
        name = moto_s3.create_bucket()
        return S3Bucket(name, moto_s3.endpoint, prefix, {"endpoint_url": moto_s3.endpoint})

    return make


@pytest.fixture
def s3_bucket(s3_bucket_factory: Callable[..., S3Bucket]) -> S3Bucket:
    return s3_bucket_factory()
