"""POSIX ACLs in Linux's extended attribute form: their entries, the user and group ids they name, and
the same ACL with those ids mapped.

``system.posix_acl_access`` and ``system.posix_acl_default`` hold a version
(2, little-endian u32) and entries of tag u16, permissions u16 and a
qualifier u32: the user or group id of a named-user or named-group entry.
A restore that gives owners the local ids of their names gives these the
same (tar and borg map ACL entries by name too).
"""
from __future__ import annotations

import struct
from typing import Mapping

ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")
_VERSION = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")  # tag, permissions, user or group id
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)


def acl_entries(value: bytes) -> list[tuple[int, int, int]] | None:
    """(tag, permissions, qualifier) of each entry; None for a value that is no ACL of this form."""
    if len(value) < 4 or (len(value) - 4) % _ENTRY.size or _VERSION.unpack_from(value)[0] != 2:
        return None
    entries = list(_ENTRY.iter_unpack(value[4:]))
    if any(tag not in _TAGS or perm > 7 for tag, perm, _ in entries):
        return None
    return entries


def acl_ids(value: bytes) -> tuple[set[int], set[int]]:
    """(user ids, group ids) the named entries of an ACL name."""
    entries = acl_entries(value) or []
    return ({q for tag, _, q in entries if tag == USER}, {q for tag, _, q in entries if tag == GROUP})


def mapped_acl(value: bytes, users: Mapping[int, int], groups: Mapping[int, int]) -> bytes:
    """The ACL with its named entries' ids mapped (the value itself when none moves, or it is no ACL)."""
    entries = acl_entries(value)
    if entries is None:
        return value
    moved = [(tag, perm, users.get(q, q) if tag == USER else groups.get(q, q) if tag == GROUP else q)
             for tag, perm, q in entries]
    if moved == entries:
        return value
    return _VERSION.pack(2) + b"".join(_ENTRY.pack(*e) for e in moved)
