import os
import subprocess
import sys

import pytest
from hypothesis import settings

# Speed is measured in bench/, not asserted: an example slowed by a busy machine is no failure.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session", autouse=True)
def _state_home_of_session(tmp_path_factory):
    """Client state (the snapshot ledger) of module- and session-scoped fixtures stays in a tmp dir."""
    saved = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if saved is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = saved


@pytest.fixture(autouse=True)
def _state_home(tmp_path_factory, monkeypatch):
    """Each test is a client of its own: its ledger never leaks into another test or the home directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def python_file_reads(monkeypatch):
    """Small files read through ``os.open``/``os.read`` (``read_small_files``'s Python reference, not the C
    call), so that a test can make those calls fail, return short or change the file."""
    from chunkvault.store import backup, source

    monkeypatch.setattr(backup, "read_small_files", source.read_small_files_reference)


@pytest.fixture
def password() -> str:
    return PASSWORD


@pytest.fixture
def new_repo(tmp_path):
    """A factory of fresh local repositories with a cheap KDF (tests only)."""
    from chunkvault import Repository

    made = []

    def make(url: str | None = None, **kwargs):
        url = url or str(tmp_path / f"repo{len(made)}")
        kwargs.setdefault("kdf_seconds", 0)
        repo = Repository.init(url, PASSWORD, **kwargs)
        made.append(repo)
        return repo

    yield make
    for r in made:
        r.close()


@pytest.fixture
def cli(tmp_path):
    """Run the real `chunkvault` command (under ``wrap``, a command such as setpriv, if given); returns
    CompletedProcess (text)."""

    def run(*args: str, input: bytes | None = None, env: dict | None = None, password: str | None = PASSWORD,
            check: bool | int = True, wrap: tuple[str, ...] | list[str] = ()):
        e = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
        if password is not None:
            e["CHUNKVAULT_PASSWORD"] = password
        e.update(env or {})
        proc = subprocess.run([*wrap, sys.executable, "-m", "chunkvault.cli", *args], input=input, env=e,
                              capture_output=True, timeout=300)
        if check is True and proc.returncode != 0:
            raise AssertionError(f"chunkvault {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.decode()}")
        if check is not True and check is not False and proc.returncode != check:
            raise AssertionError(f"expected exit {check}, got {proc.returncode}:\n{proc.stderr.decode()}")
        return proc

    return run


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without locks (NFS mounted nolock): every flock fails with ENOLCK."""
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", refuse)


@pytest.fixture
def derivations(monkeypatch):
    """Counts password derivations (the costly step)."""
    from chunkvault.store import config as config_mod

    calls = []
    real = config_mod._password_kek

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(config_mod, "_password_kek", counted)
    return calls
