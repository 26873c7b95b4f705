"""``archive-push --spool DIR`` and ``archive-get --spool DIR``: WAL files pushed ahead of PostgreSQL's
asking, with the markers that say so, and files fetched ahead of a recovery's asking.

PostgreSQL's ``archive_command`` runs once per file, and a process that opens the repository costs some
tenths of a second before it reads a byte: behind a busy server, WAL piles up.  A push with a spool also
pushes the files PostgreSQL has ready next (``pg_wal/archive_status/*.ready``) under the same lock, and
leaves a marker ``DIR/NAME.ok`` for each; when PostgreSQL then asks for one, the marker answers at once,
without the repository.  A marker counts only for the repository it names and the file as it was pushed
(size and modification time); otherwise the file is pushed again, which the archive takes as a no-op.

A recovery likewise calls ``restore_command`` once per file.  ``archive-get`` with a spool also fetches the
segments that follow on the timeline into a directory of the spool kept for the repository named; the
recovery's next calls move them into place.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from typing import Iterable

from .localfiles import fsync_directory, make_private_dirs, read_regular
from .store.walnames import is_segment

MARKER = ".ok"


def private_dir(path: str) -> None:
    """Make directory ``path`` (mode 0700, and any missing above it), or take the one there when it is this
    user's alone to write: a spool holds WAL, the database's data in clear, and its markers and files fetched
    ahead are trusted, so one another user owns or may write in could have a file archived never, or one of
    theirs replayed.  OSError otherwise."""
    make_private_dirs(path)
    st = os.stat(path)  # a link to a larger disk is the directory it leads to, judged the same
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "not a directory")
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, "owned by another user")
    if st.st_mode & 0o022:
        raise OSError(errno.EPERM, "other users may write in it")


class Spool:
    """The markers of files pushed ahead into the repository ``repository`` names (its address and id): a
    repository made anew at the same address is another, for which no marker answers.  OSError when the
    directory cannot be made."""

    def __init__(self, path: str, repository: str):
        private_dir(path)
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
        try:
            entries = os.listdir(self.path)
        except OSError:
            return
        for entry in entries:
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


class Prefetched:
    """The files ``archive-get --spool`` fetched ahead from one repository (a directory of the spool of its
    own, named by the repository's address and id: a file fetched from one is never handed out for another,
    nor for a repository made anew at the same address).  OSError when the directory cannot be made."""

    def __init__(self, spool: str, repository: str):
        self.path = os.path.join(spool, "get-" + hashlib.sha256(repository.encode()).hexdigest()[:16])
        private_dir(spool)
        private_dir(self.path)

    def take(self, name: str, dest: str) -> bool:
        """Move the file fetched ahead as ``name`` to ``dest`` (durably, as ``archive-get`` writes); False when
        there is none."""
        src = os.path.join(self.path, name)
        if not os.path.isfile(src):
            return False
        directory = os.path.dirname(os.path.abspath(dest))
        try:
            os.replace(src, dest)
        except OSError:  # the spool on another file system: copied beside ``dest``, then renamed
            tmp = os.path.join(directory, f".chunkvault-{name}.tmp")
            try:
                with open(src, "rb") as f, open(tmp, "wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            except BaseException:  # a stop (PostgreSQL's SIGQUIT) too: nothing left beside ``dest``
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            os.unlink(src)
        fsync_directory(directory)
        return True

    def sweep(self, name: str) -> None:
        """Once segment ``name`` is in place, remove what the recovery has gone past: the segments at or before
        its position, on any timeline (a recovery asks each position on its newest timeline first), and what
        a fetch that stopped left.  Nothing for another name; nothing when the spool cannot be listed (the
        file is in place: failing now would tell PostgreSQL it is not archived)."""
        if not is_segment(name):
            return
        try:
            entries = os.listdir(self.path)
        except OSError:
            return
        for entry in entries:
            if (is_segment(entry) and entry[8:] <= name[8:]) or entry.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.path, entry))
                except OSError:
                    pass
