"""Owners by name: the user and group names a snapshot saw, and the local ids they map to at restore.

A manifest records numeric ids only.  The snapshot keeps, beside them, the
names those ids had on the backed-up machine (``stats["owners"]``); a
restore as root on another machine, where ``postgres`` may have another
uid, then gives each entry the local id of its owner's name, as tar and
borg do.  An id whose name is unknown here, or was never recorded, is kept
as a number.  The logic is pure; the lookups are passed in.
"""
from __future__ import annotations

import grp
import pwd
from dataclasses import replace
from typing import Callable, Iterable, Mapping

from .manifest import Entry, Record

OWNERS_KEY = "owners"  # in a snapshot's stats: {"users": {"1000": "alice"}, "groups": {"1000": "staff"}}
IdName = Callable[[int], "str | None"]
NameId = Callable[[str], "int | None"]


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return None


def user_id(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _table(stored: object) -> dict[int, str]:
    """A stored id -> name table as ints and strings; whatever else it holds is left out (a snapshot's
    names only refine a restore, they never stop one)."""
    out: dict[int, str] = {}
    if isinstance(stored, Mapping):
        for k, v in stored.items():
            if isinstance(k, str) and k.isascii() and k.isdigit() and isinstance(v, str) and v:
                out[int(k)] = v
    return out


def stored_names(stats: Mapping[str, object]) -> tuple[dict[int, str], dict[int, str]]:
    """(users, groups) a snapshot's stats name: empty for a snapshot that kept none."""
    owners = stats.get(OWNERS_KEY)
    if not isinstance(owners, Mapping):
        return {}, {}
    return _table(owners.get("users")), _table(owners.get("groups"))


def _stored_form(users: Mapping[int, str], groups: Mapping[int, str]) -> dict[str, dict[str, str]]:
    return {"users": {str(i): n for i, n in sorted(users.items())},
            "groups": {str(i): n for i, n in sorted(groups.items())}}


def names_of(uids: Iterable[int], gids: Iterable[int], inherited: Mapping[str, object] | None = None, *,
             user: IdName | None = None, group: IdName | None = None) -> dict[str, dict[str, str]]:
    """The ``stats["owners"]`` of a snapshot whose new entries have ``uids`` and ``gids``: their names here
    (``user``, ``group``: how an id's name is looked up), over those ``inherited`` (a differential's
    parent's stats: its unchanged entries are not seen again)."""
    users, groups = stored_names(inherited or {})
    for table, ids, name_of in ((users, uids, user or user_name), (groups, gids, group or group_name)):
        for i in set(ids):
            name = name_of(i)
            if name is not None:
                table[i] = name
    return _stored_form(users, groups)


def chain_names(chain_stats: Iterable[Mapping[str, object]]) -> tuple[dict[int, str], dict[int, str]]:
    """(users, groups) of a snapshot from the stats of its chain, oldest first: a later snapshot's name for
    an id wins, and one that kept none (made before names were kept) takes its parent's."""
    users: dict[int, str] = {}
    groups: dict[int, str] = {}
    for stats in chain_stats:
        u, g = stored_names(stats)
        users.update(u)
        groups.update(g)
    return users, groups


def chain_owners(chain_stats: Iterable[Mapping[str, object]]) -> dict[str, dict[str, str]]:
    """``chain_names`` as a snapshot's stats hold it: what an export carries for its one full snapshot."""
    return _stored_form(*chain_names(chain_stats))


class OwnerMap:
    """Recorded id -> local id, for the ids whose recorded name is known here under another id."""

    def __init__(self, users: Mapping[int, int] | None = None, groups: Mapping[int, int] | None = None):
        self.users = dict(users or {})
        self.groups = dict(groups or {})

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)

    @classmethod
    def for_names(cls, chain_stats: Iterable[Mapping[str, object]]) -> "OwnerMap":
        """From the stats of a snapshot's chain, oldest first (``chain_names``)."""
        return cls.from_names(*chain_names(chain_stats))

    @classmethod
    def from_names(cls, users: Mapping[int, str], groups: Mapping[int, str], *, user: NameId | None = None,
                   group: NameId | None = None) -> "OwnerMap":
        """From the recorded names of owner ids; ``user`` and ``group`` look a name up here."""

        def moved(names: Mapping[int, str], local: NameId) -> dict[int, int]:
            out = {}
            for i, name in names.items():
                here = local(name)
                if here is not None and here != i:
                    out[i] = here
            return out

        return cls(moved(users, user or user_id), moved(groups, group or group_id))

    def entry(self, e: Entry) -> Entry:
        """``e`` with its owner mapped: a copy where it moves (a tree's entries are never changed)."""
        uid, gid = self.users.get(e.uid, e.uid), self.groups.get(e.gid, e.gid)
        return e if (uid, gid) == (e.uid, e.gid) else replace(e, uid=uid, gid=gid)

    def entries(self, entries: Iterable[Entry]) -> Iterable[Entry]:
        return map(self.entry, entries) if self else entries

    def records(self, records: Iterable[Record]) -> Iterable[Record]:
        if not self:
            return records
        return (rec._replace(entry=self.entry(rec.entry)) if rec.entry is not None else rec for rec in records)
