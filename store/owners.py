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
from .posix_acl import ACL_KEYS, acl_ids, mapped_acl
from .xattrs import decode_xattrs, encode_xattrs

MISSED_SHOWN = 10  # unknown names a restore's warning lists
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
    names only refine a restore, they never stop one), a name no user database holds (with a NUL) too."""
    out: dict[int, str] = {}
    if isinstance(stored, Mapping):
        for k, v in stored.items():
            if isinstance(k, str) and k.isascii() and k.isdigit() and isinstance(v, str) and v and "\x00" not in v:
                out[int(k)] = v
    return out


def stored_names(stats: Mapping[str, object]) -> tuple[dict[int, str], dict[int, str]]:
    """(users, groups) a snapshot's stats name: empty for a snapshot that kept none."""
    owners = stats.get(OWNERS_KEY)
    if not isinstance(owners, Mapping):
        return {}, {}
    return _table(owners.get("users")), _table(owners.get("groups"))


def _unnamed(stats: Mapping[str, object]) -> tuple[set[int], set[int]]:
    """(users, groups) ids a snapshot's stats list as having had no name (``names_of``)."""
    owners = stats.get(OWNERS_KEY)
    unnamed = owners.get("unnamed") if isinstance(owners, Mapping) else None
    if not isinstance(unnamed, Mapping):
        return set(), set()

    def ids(listed: object) -> set[int]:
        return {i for i in listed if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 32} \
            if isinstance(listed, list) else set()

    return ids(unnamed.get("users")), ids(unnamed.get("groups"))


def _stored_form(users: Mapping[int, str], groups: Mapping[int, str], unnamed_users: Iterable[int] = (),
                 unnamed_groups: Iterable[int] = ()) -> dict[str, object]:
    out: dict[str, object] = {"users": {str(i): n for i, n in sorted(users.items())},
                              "groups": {str(i): n for i, n in sorted(groups.items())}}
    if unnamed_users or unnamed_groups:
        out["unnamed"] = {"users": sorted(unnamed_users), "groups": sorted(unnamed_groups)}
    return out


def note_ids(e: Entry, uids: set[int], gids: set[int]) -> None:
    """Add the user and group ids ``e`` names to ``uids`` and ``gids``: its owner's, and its ACLs' entries'."""
    uids.add(e.uid)
    gids.add(e.gid)
    if e.xattrs:
        for value in _acls(e.xattrs).values():
            u, g = acl_ids(value)
            uids |= u
            gids |= g


def _acls(raw: bytes) -> dict[bytes, bytes]:
    try:
        pairs = decode_xattrs(raw)
    except ValueError:  # not for names to mend: check reports it
        return {}
    return {k: v for k, v in pairs.items() if k in ACL_KEYS}


def names_of(uids: Iterable[int], gids: Iterable[int], inherited: Mapping[str, object] | None = None, *,
             user: IdName | None = None, group: IdName | None = None) -> dict[str, object]:
    """The ``stats["owners"]`` of a snapshot whose new entries have ``uids`` and ``gids``, with the ids
    ``inherited`` (a differential's parent's stats: its unchanged entries are not seen again): each id's
    name here and now (``user``, ``group``: how an id's name is looked up), as a full taken at the same
    moment records it; an id with no name now has none (a deleted user's, or one whose id went to another)."""
    old_users, old_groups = stored_names(inherited or {})
    unnamed_users, unnamed_groups = _unnamed(inherited or {})

    def named(ids: Iterable[int], name_of: IdName) -> dict[int, str]:
        return {i: name for i in ids if (name := name_of(i)) is not None}

    user_ids = set(uids) | set(old_users) | unnamed_users
    group_ids = set(gids) | set(old_groups) | unnamed_groups
    users, groups = named(user_ids, user or user_name), named(group_ids, group or group_name)
    # The ids without a name are listed too: a differential looks them up again, as a full would, where an
    # unchanged file's owner given a name since its parent went unnamed until the next full.
    return _stored_form(users, groups, user_ids - users.keys(), group_ids - groups.keys())


def _newest_table(chain_stats: Iterable[Mapping[str, object]]) -> Mapping[str, object]:
    """The stats of the newest snapshot of a chain (oldest first) that has an owners table: it covers the
    chain (``names_of``); a snapshot that kept none (made before names were kept) takes its parent's."""
    found: Mapping[str, object] = {}
    for stats in chain_stats:
        if isinstance(stats.get(OWNERS_KEY), Mapping):
            found = stats
    return found


def chain_names(chain_stats: Iterable[Mapping[str, object]]) -> tuple[dict[int, str], dict[int, str]]:
    """(users, groups) of a snapshot from the stats of its chain, oldest first (``_newest_table``)."""
    return stored_names(_newest_table(chain_stats))


def chain_owners(chain_stats: Iterable[Mapping[str, object]]) -> dict[str, object]:
    """The chain's table as a snapshot's stats hold it: what an export, a rebase or an aggregate keeps."""
    found = _newest_table(chain_stats)
    return _stored_form(*stored_names(found), *_unnamed(found))


class OwnerMap:
    """Recorded id -> local id, for the ids whose recorded name is known here under another id.

    The recorded names not known here are kept too (``unknown_users``, ``unknown_groups``): an entry owned
    by one keeps its number, which may be another local user's, and ``missed`` says which of them the
    entries mapped so far named, for the restore to report."""

    def __init__(self, users: Mapping[int, int] | None = None, groups: Mapping[int, int] | None = None,
                 unknown_users: Mapping[int, str] | None = None, unknown_groups: Mapping[int, str] | None = None):
        self.users = dict(users or {})
        self.groups = dict(groups or {})
        self.unknown_users = dict(unknown_users or {})
        self.unknown_groups = dict(unknown_groups or {})
        self.missed_users: set[int] = set()
        self.missed_groups: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.users or self.groups or self.unknown_users or self.unknown_groups)

    @classmethod
    def for_names(cls, chain_stats: Iterable[Mapping[str, object]]) -> "OwnerMap":
        """From the stats of a snapshot's chain, oldest first (``chain_names``)."""
        return cls.from_names(*chain_names(chain_stats))

    @classmethod
    def from_names(cls, users: Mapping[int, str], groups: Mapping[int, str], *, user: NameId | None = None,
                   group: NameId | None = None) -> "OwnerMap":
        """From the recorded names of owner ids; ``user`` and ``group`` look a name up here."""

        def moved(names: Mapping[int, str], local: NameId) -> tuple[dict[int, int], dict[int, str]]:
            out, unknown = {}, {}
            for i, name in names.items():
                here = local(name)
                if here is None:
                    unknown[i] = name
                elif here != i:
                    out[i] = here
            return out, unknown

        (u, unknown_u), (g, unknown_g) = moved(users, user or user_id), moved(groups, group or group_id)
        return cls(u, g, unknown_u, unknown_g)

    def entry(self, e: Entry) -> Entry:
        """``e`` with its owner and its ACLs' entries mapped: a copy where one moves (a tree's entries are
        never changed)."""
        if not self:
            return e
        uid, gid = self.ids(e.uid, e.gid)
        if e.uid in self.unknown_users:
            self.missed_users.add(e.uid)
        if e.gid in self.unknown_groups:
            self.missed_groups.add(e.gid)
        xattrs = self._xattrs(e.xattrs) if e.xattrs else e.xattrs
        if (uid, gid, xattrs) == (e.uid, e.gid, e.xattrs):
            return e
        return replace(e, uid=uid, gid=gid, xattrs=xattrs)

    def ids(self, uid: int, gid: int) -> tuple[int, int]:
        """The local ids of a recorded owner."""
        return self.users.get(uid, uid), self.groups.get(gid, gid)

    def missed(self) -> str | None:
        """The recorded names not known here that the entries mapped so far named, as a warning."""
        if not (self.missed_users or self.missed_groups):
            return None
        named = [f"user {self.unknown_users[i]} ({i})" for i in sorted(self.missed_users)]
        named += [f"group {self.unknown_groups[i]} ({i})" for i in sorted(self.missed_groups)]
        more = f" and {len(named) - MISSED_SHOWN} more" if len(named) > MISSED_SHOWN else ""
        return (f"owner names unknown on this machine, set by their recorded ids instead: "
                f"{', '.join(named[:MISSED_SHOWN])}{more}")

    def _xattrs(self, raw: bytes) -> bytes:
        acls = _acls(raw)
        if self.unknown_users or self.unknown_groups:
            for value in acls.values():
                uids, gids = acl_ids(value)
                self.missed_users |= uids & self.unknown_users.keys()
                self.missed_groups |= gids & self.unknown_groups.keys()
        moved = {k: mapped_acl(v, self.users, self.groups) for k, v in acls.items()}
        if moved == acls:
            return raw
        return encode_xattrs({**decode_xattrs(raw), **moved})

    def entries(self, entries: Iterable[Entry]) -> Iterable[Entry]:
        return map(self.entry, entries) if self else entries

    def records(self, records: Iterable[Record]) -> Iterable[Record]:
        if not self:
            return records
        return (rec._replace(entry=self.entry(rec.entry)) if rec.entry is not None else rec for rec in records)
