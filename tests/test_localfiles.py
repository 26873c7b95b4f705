"""Where per-user files go, and reading them without waiting on what is not a regular file."""
from __future__ import annotations

import os
import warnings

import pytest

from chunkvault.connection import cache_base, key_ahead_path
from chunkvault.ledger import Ledger, RepositoryStateWarning
from chunkvault.localfiles import read_regular, user_dir


def test_read_regular_reads_files_and_refuses_the_rest_without_waiting(tmp_path):
    (tmp_path / "f").write_bytes(b"abcdef")
    assert read_regular(str(tmp_path / "f")) == b"abcdef" and read_regular(str(tmp_path / "f"), 4) == b"abcd"
    os.mkfifo(tmp_path / "fifo")
    for other in ("fifo", "."):
        with pytest.raises(OSError, match="not a regular file"):
            read_regular(str(tmp_path / other))
    with pytest.raises(FileNotFoundError):
        read_regular(str(tmp_path / "none"))


def test_a_relative_xdg_directory_is_ignored_and_no_home_means_none(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")
    assert user_dir("XDG_STATE_HOME", ".local/state") == str(tmp_path / ".local/state")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "abs"))
    assert user_dir("XDG_STATE_HOME", ".local/state") == str(tmp_path / "abs")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("CHUNKVAULT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", "not-absolute")  # where "~" became a directory of that name in the working one
    assert user_dir("XDG_STATE_HOME", ".local/state") is None
    assert cache_base() is None and key_ahead_path("sftp://h/r") is None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert Ledger.at(None, "0" * 32) is None
    assert [w.category for w in seen] == [RepositoryStateWarning] and "no home directory" in str(seen[0].message)


def test_a_cache_directory_given_that_is_no_writable_directory_is_warned_of_and_not_used(monkeypatch, tmp_path):
    """A regular file, or a path below one, given as the cache: warned of once (it was silently ignored)."""
    from chunkvault.errors import LocalCacheWarning

    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "below"):
        monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(bad))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert cache_base() is None and key_ahead_path("sftp://h/r") is None
        assert [w.category for w in seen] == [LocalCacheWarning], seen
        assert f"cache directory {bad} is not a writable directory" in str(seen[0].message)
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "new" / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache_base() == str(tmp_path / "new" / "cache") and (tmp_path / "new" / "cache").is_dir()


def test_only_a_directory_holding_nothing_but_the_cache_is_tagged_as_one(monkeypatch, tmp_path):
    """``--cache-dir ~`` wrote a CACHEDIR.TAG into the home directory: every later backup with
    ``--exclude-caches`` (restic's, borg's and tar's too) left the whole of it out, without a word."""
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(home))
    assert cache_base() == str(home) and key_ahead_path("sftp://h/r") is not None
    assert not (home / "CACHEDIR.TAG").exists()
    from chunkvault.localfiles import OUR_CACHEDIR_TAG

    (home / "CACHEDIR.TAG").write_bytes(OUR_CACHEDIR_TAG)  # left by an earlier chunkvault: taken back
    assert cache_base() == str(home) and not (home / "CACHEDIR.TAG").exists()
    (home / "CACHEDIR.TAG").write_bytes(b"Signature: 8a477f597d28d172789f06886806bc55\n# the user's own\n")
    assert cache_base() == str(home) and (home / "CACHEDIR.TAG").exists()  # not ours: left alone
    for made in (tmp_path / "fresh", tmp_path / "empty", tmp_path / "used"):
        if made.name == "empty":
            made.mkdir()
        if made.name == "used":  # a cache already in use: a repository's entries, the keys kept ahead
            (made / ("ab" * 12)).mkdir(parents=True)
            (made / "key-ahead").mkdir()
        monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(made))
        assert cache_base() == str(made)
        assert (made / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f597d28d172789f06886806bc55")


@pytest.mark.parametrize("value, cached", [("", True), ("0", True), ("no", True), ("False", True), ("off", True),
                                           ("1", False), ("yes", False), ("true", False)])
def test_chunkvault_no_cache_is_read_as_a_switch(monkeypatch, tmp_path, value, cached):
    """CHUNKVAULT_NO_CACHE=no (or false) turned the cache off: any value but "" and "0" was taken as set."""
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("CHUNKVAULT_NO_CACHE", value)
    assert cache_base() == (str(tmp_path / "c") if cached else None)


def test_a_chunkvault_no_cache_that_is_no_switch_is_refused_naming_it(monkeypatch, tmp_path, cli):
    proc = cli("snapshots", "-r", "http://127.0.0.1:1/", env={"CHUNKVAULT_NO_CACHE": "maybe"}, check=2)
    assert proc.stderr.decode().strip().splitlines()[-1] == ("chunkvault: CHUNKVAULT_NO_CACHE takes yes or no, "
                                                             "not 'maybe'")


def test_cache_dir_wins_over_chunkvault_no_cache(monkeypatch, tmp_path):
    """An option wins over the environment: --cache-dir over CHUNKVAULT_NO_CACHE=1 (which silently dropped
    it), as --no-cache over CHUNKVAULT_CACHE_DIR; the environment is as it was after the command."""
    import argparse

    from chunkvault.cli import _cache_settings

    monkeypatch.setenv("CHUNKVAULT_NO_CACHE", "1")
    with _cache_settings(argparse.Namespace(cache_dir=str(tmp_path / "c"), no_cache=False)):
        assert cache_base() == str(tmp_path / "c")
    assert os.environ["CHUNKVAULT_NO_CACHE"] == "1" and cache_base() is None
    monkeypatch.delenv("CHUNKVAULT_NO_CACHE")
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "env"))
    with _cache_settings(argparse.Namespace(cache_dir=None, no_cache=True)):
        assert cache_base() is None
