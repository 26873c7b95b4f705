"""Deriving a password's key while an off-site remote connects.

Opening a repository with a password costs a key derivation (0.5 s of CPU,
about 0.25 s on two cores) that can only start once the key file has come
from the remote, and reaching an off-site remote costs as much again
(starting ``ssh`` and its handshake, importing boto3 and building its client).
The key file that opened a repository last time is kept beside the local
cache; the next command derives from it in a thread (the derivation runs
outside the interpreter lock) while the remote connects.  Its result is used
only for a key file the remote still holds byte for byte, so the cached copy
decides nothing: a stale or planted one costs one derivation's CPU, never a
wrong key.  A key file retired (``key passwd``, ``key remove``) is dropped
from it: kept, it would still open the repository's key with the old password,
which may be why it was changed.
"""
from __future__ import annotations

import os
import threading
from typing import Iterable

from chunkvault.errors import ChunkvaultError
from chunkvault.localfiles import make_private_dirs, read_regular, remove_if_stale

from .config import KDF_SECRET, KEY_FILE_LIMIT, KeyFile
from .crypto import content_name


class KeyAhead:
    """A derivation started early from the key file remembered at ``path``; see the module docstring."""

    def __init__(self, path: str | None, password: bytes):
        self.path = path
        self.password = password
        self.raw: bytes | None = None
        self._key_file: KeyFile | None = None
        self._kek: bytes | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, path: str | None, password: bytes) -> "KeyAhead":
        """``path``: None where there is no cache to keep the key file in."""
        ahead = cls(path, password)
        if path is None:
            return ahead
        _sweep_temp(os.path.dirname(path))
        raw = _read_small(path)
        if raw is None:
            return ahead
        try:
            key_file = KeyFile.decode(content_name(raw)[:32], raw)
        except ChunkvaultError:
            return ahead
        ahead.raw = raw
        if key_file.kdf == KDF_SECRET:  # nothing to gain: a secret's key costs microseconds
            return ahead
        ahead._key_file = key_file
        ahead._thread = threading.Thread(target=ahead._derive, name="chunkvault-key-ahead", daemon=True)
        ahead._thread.start()
        return ahead

    def _derive(self) -> None:
        try:
            self._kek = self._key_file.kek(self.password)  # type: ignore[union-attr]
        except ChunkvaultError:
            self._kek = None

    def kek_for(self, raw: bytes) -> bytes | None:
        """The key derived ahead, if ``raw`` is the key file it was derived for (waiting for it), else None."""
        if self._thread is None or raw != self.raw:
            return None
        self._thread.join()
        return self._kek

    def drop_unless_held(self, held: Iterable[bytes]) -> None:
        """Remove the key file kept at ``path`` when the repository no longer holds it (another machine's
        ``key passwd`` or ``key remove`` retired it): kept, it would still open the key with the old password."""
        if self.raw is None or self.path is None or self.raw in held:
            return
        self.raw = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def remember(self, raw: bytes) -> None:
        """Keep ``raw``, the key file that opened the repository, for the next command (best effort)."""
        if raw == self.raw or self.path is None:
            return
        try:
            make_private_dirs(os.path.dirname(self.path))
            tmp = f"{self.path}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            return  # a read-only or full cache costs the next command its head start, nothing more
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)  # not one left behind by every command while the cache is full
            except OSError:
                pass


def forget(directory: str | None, names: Iterable[str]) -> None:
    """Remove the key files kept in ``directory`` (one per repository location) that are among ``names``
    (key file names, the hash of their bytes), whichever location kept them (best effort)."""
    retired = set(names)
    if directory is None or not retired:
        return
    try:
        with os.scandir(directory) as listing:
            entries = [e.path for e in listing if not e.name.endswith(".tmp")]
    except OSError:  # no cache, or none to read: nothing kept
        return
    for path in entries:
        raw = _read_small(path)
        if raw is not None and content_name(raw)[:32] in retired:
            try:
                os.unlink(path)
            except OSError:  # gone meanwhile, or a cache this user may not change
                pass


def _sweep_temp(directory: str) -> None:
    """Remove the temp files of writes killed half-way (``remember``'s) once they are stale."""
    try:
        with os.scandir(directory) as listing:
            temps = [e.path for e in listing if e.name.endswith(".tmp")]
    except OSError:
        return
    for path in temps:
        remove_if_stale(path)


def _read_small(path: str) -> bytes | None:
    try:
        raw = read_regular(path, KEY_FILE_LIMIT + 1)
    except OSError:
        return None
    return raw if 0 < len(raw) <= KEY_FILE_LIMIT else None
