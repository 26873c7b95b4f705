"""``archive-push --spool DIR``: files pushed ahead of PostgreSQL's asking, and the markers that say so.

PostgreSQL's ``archive_command`` runs once per file, and a process that opens the repository costs some
tenths of a second before it reads a byte: behind a busy server, WAL piles up.  A push with a spool also
pushes the files PostgreSQL has ready next (``pg_wal/archive_status/*.ready``) under the same lock, and
leaves a marker ``DIR/NAME.ok`` for each; when PostgreSQL then asks for one, the marker answers at once,
without the repository.  A marker counts only for the repository it names and the file as it was pushed
(size and modification time); otherwise the file is pushed again, which the archive takes as a no-op.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from .errors import UsageError
from .localfiles import read_regular

MARKER = ".ok"


class Spool:
    def __init__(self, path: str, repository: str):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use {path} as the spool directory: {exc.strerror or exc}") from None
        self.path = path
        self.repository = repository

    def _marker(self, name: str) -> str:
        return os.path.join(self.path, name + MARKER)

    def _describe(self, wal_path: str) -> dict:
        st = os.stat(wal_path)
        return {"repository": self.repository, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def claim(self, name: str, wal_path: str) -> bool:
        """Whether ``name`` (at ``wal_path``) was pushed ahead into this repository, as it is now; the marker
        goes either way (PostgreSQL asks once: a success ends its turn, a failure is pushed for real)."""
        marker = self._marker(name)
        try:
            recorded = json.loads(read_regular(marker, 4096))
        except (OSError, ValueError):
            return False
        try:
            now = self._describe(wal_path)
        except OSError:
            now = None
        try:
            os.unlink(marker)
        except OSError:
            return False
        return recorded == now

    def mark(self, name: str, wal_path: str) -> None:
        """Record ``name`` as pushed (after its ``wal/`` object is stored): a temporary file renamed, so a
        marker is whole or absent."""
        tmp = self._marker(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self._describe(wal_path), f)
        os.replace(tmp, self._marker(name))

    def sweep(self, ready: Iterable[str]) -> None:
        """Remove the markers of files PostgreSQL no longer has ready (archived otherwise, or a cluster put
        back from a backup): a stale marker must not answer for a later file of the same name."""
        keep = {n + MARKER for n in ready}
        for entry in os.listdir(self.path):
            if entry.endswith((MARKER, MARKER + ".tmp")) and entry not in keep:
                try:
                    os.unlink(os.path.join(self.path, entry))
                except OSError:
                    pass


def ready_files(wal_path: str) -> list[str]:
    """The names PostgreSQL has ready to archive beside ``wal_path`` (its ``archive_status/*.ready``); none
    when that directory is not there (a file not in ``pg_wal``)."""
    status = os.path.join(os.path.dirname(wal_path) or ".", "archive_status")
    try:
        entries = os.listdir(status)
    except OSError:
        return []
    return [e[:-len(".ready")] for e in entries if e.endswith(".ready")]
