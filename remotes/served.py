"""The repositories ``chunkvault serve`` serves: the one directory it is given, or, with ``--repositories``,
each subdirectory of it by name (``/NAME/objects/KEY``), each behind a ``LocalRemote`` of its own, so that
every guarantee of one repository (its reserve, its exclusive locks, its temp files) holds for each apart.

A name is one path segment, ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``: never "." or "..", no slash, no escape,
nothing hidden (the service's own files start with a dot).  Names are not nested: what follows a name is
always ``objects``, so a URL names one repository whatever the names are, and a token's scope is a plain
list of names.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

from chunkvault.errors import RemoteError
from chunkvault.localfiles import fsync_directory

from .local import LocalRemote, os_error

NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(f"^{NAME_PATTERN}\\Z")
EVERY_REPOSITORY = "*"  # a token's scope that names no repository but reaches each


def is_repository_name(text: str) -> bool:
    return bool(_NAME.match(text))


def holds_repository(path: str) -> bool:
    """Whether directory ``path`` is a repository: it holds a config file.  A directory named config is no
    sign of one: it is the repository of that name, in a directory of repositories."""
    return os.path.isfile(os.path.join(path, "config"))


def parse_scope(text: str) -> frozenset[str] | None:
    """A tokens file's scope field: ``*`` (None: every repository) or ``NAME[,NAME...]``.  ValueError says
    what is wrong without quoting the field, which may be a token written in the wrong place."""
    if text == EVERY_REPOSITORY:
        return None
    names = text.split(",")
    if EVERY_REPOSITORY in names:
        raise ValueError(f"{EVERY_REPOSITORY} stands alone: it is every repository")
    for number, name in enumerate(names, 1):
        if not is_repository_name(name):
            raise ValueError(f"its repository name number {number} is no name of {NAME_PATTERN}"
                             + (" (an empty one: a comma too many)" if not name else ""))
    return frozenset(names)


class RepositoryInTheWay(RemoteError):
    """Something that is no directory stands where a repository's directory is to be made."""


@dataclass(frozen=True)
class Served:
    """One repository: its name (None for the service's one repository), its directory and the remote that
    reads and writes it."""

    name: str | None
    root: str
    remote: LocalRemote


class ServedRepositories:
    """The service's repositories.  A named one is kept (its remote, with what that remote tracks: writes
    under way, exclusive locks held, the reserve) once its directory exists; one that does not exist is
    answered as an empty directory through a remote made for the request alone, so that requests for any
    number of names that are no repository hold no memory."""

    def __init__(self, path: str, several: bool):
        self.path = path
        self.several = several
        self._lock = threading.Lock()
        self._kept: dict[str, Served] = {}
        self.one = None if several else Served(None, path, LocalRemote(path))

    def root_of(self, name: str) -> str:
        return os.path.join(self.path, name)

    def get(self, name: str) -> Served:
        """Repository ``name`` as it is: kept once its directory exists; reads of one that does not find
        nothing in it (an object missing, an empty listing), as in an empty directory."""
        with self._lock:
            served = self._kept.get(name)
        if served is not None:
            return served
        root = self.root_of(name)
        if not os.path.isdir(root):
            return Served(name, root, LocalRemote(root))
        return self._keep(name)

    def create(self, name: str) -> Served:
        """Repository ``name`` for a write: its directory made (mode 0700, in the directory of repositories,
        which is never made) where it is missing, and its reserve kept.  RepositoryInTheWay where a file
        stands in its place; RemoteError where it cannot be made."""
        root = self.root_of(name)
        if not os.path.isdir(root):
            try:
                os.mkdir(root, 0o700)
                fsync_directory(self.path)  # the new repository's name outlives a crash
            except FileExistsError:
                if not os.path.isdir(root):
                    raise RepositoryInTheWay(f"{name} is no directory: a file stands where that repository's "
                                             "directory would be (the service's operator must remove it)") from None
            except OSError as exc:
                raise os_error(exc, f"making the directory of repository {name}", self.path) from None
        served = self._keep(name)
        served.remote.keep_reserve()
        return served

    def _keep(self, name: str) -> Served:
        with self._lock:
            served = self._kept.get(name)
            if served is None:
                root = self.root_of(name)
                served = self._kept[name] = Served(name, root, LocalRemote(root))
            return served

    def existing(self) -> list[Served]:
        """Every repository whose directory exists now (the one repository, of a service that serves one)."""
        if self.one is not None:
            return [self.one]
        try:
            with os.scandir(self.path) as entries:
                names = sorted(e.name for e in entries if is_repository_name(e.name) and e.is_dir())
        except OSError as exc:
            raise os_error(exc, "listing the repositories", self.path) from None
        return [self._keep(name) for name in names]

    def keep_reserves(self) -> None:
        """The reserve of the one repository, or of each named one there is (a directory holding a config: not
        another directory beside them), made where it is missing."""
        for served in self.existing():
            if served.name is None or holds_repository(served.root):
                served.remote.keep_reserve()

    def abandon_writes(self) -> None:
        """``LocalRemote.abandon_writes`` of every repository written to (its writes go through a kept remote)."""
        with self._lock:
            kept = list(self._kept.values())
        for served in kept + ([self.one] if self.one is not None else []):
            served.remote.abandon_writes()


def repositories_below(path: str, limit: int = 3) -> list[str]:
    """Names of up to ``limit`` subdirectories of ``path`` that hold a repository (a config file): the sign
    that a directory given to a service of one repository holds several."""
    found: list[str] = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if is_repository_name(entry.name) and holds_repository(os.path.join(path, entry.name)):
                    found.append(entry.name)
                    if len(found) == limit:
                        break
    except OSError:
        pass
    return sorted(found)

