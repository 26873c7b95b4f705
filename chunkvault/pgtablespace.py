"""Where a restore of a ``backup --postgres`` snapshot puts the cluster's tablespaces (``restore --pg-tablespace``).

A plain restore keeps each tablespace inside the restored data directory, where the snapshot holds it (see
``pgbackup``), linked from ``pg_tblspc/<oid>``.  ``OID_OR_NAME=DIR``, as pgBackRest's ``--tablespace-map``,
puts one into ``DIR`` instead and makes ``pg_tblspc/<oid>`` a link to it: a ``Relocation`` the restore makes
like any other, found from what the snapshot recorded (``stats.postgres.tablespaces``, the link's target).
"""
from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING, Sequence

from .errors import UsageError
from .store.manifest import T_DIR, T_SYMLINK
from .store.restore import Relocation
from .store.snapshot import Snapshot

if TYPE_CHECKING:
    from .repository import Repository


def parse_mapping(spec: str) -> tuple[str, str]:
    """``OID_OR_NAME=DIR`` as (OID_OR_NAME, DIR), split at the first ``=`` (a tablespace whose name holds one
    is named by its oid)."""
    key, sep, into = spec.partition("=")
    if not sep or not key or not into:
        raise UsageError(f"a tablespace to place is OID_OR_NAME=DIR, not {spec!r}")
    return key, into


def recorded_tablespaces(snap: Snapshot) -> list[dict]:
    """The tablespaces a ``backup --postgres`` snapshot recorded (oid, name, location); UsageError for a
    snapshot of another kind."""
    pg = snap.stats.get("postgres")
    if not isinstance(pg, dict):
        raise UsageError(f"snapshot {snap.id[:8]} is not one of backup --postgres: it has no tablespaces to place")
    found = pg.get("tablespaces", [])
    return [t for t in found if isinstance(t, dict) and isinstance(t.get("oid"), int)]


def held_at(link: bytes, kind: int, target: bytes) -> bytes:
    """Where the snapshot's tree holds the files of the tablespace whose ``pg_tblspc/<oid>`` entry is
    ``link``: the directory a relative link leads to within the tree, or the entry itself (a tablespace made
    in place, a directory); b"" when it holds them nowhere (a link out of the tree, as an older one had)."""
    if kind == T_DIR:
        return link
    if kind != T_SYMLINK or target.startswith(b"/"):
        return b""
    held = posixpath.normpath(posixpath.join(posixpath.dirname(link), target))
    return b"" if held == b"." or held.startswith(b"../") or held == b".." else held


def relocations(repo: "Repository", snap: Snapshot, specs: Sequence[str]) -> list[Relocation]:
    """The ``Relocation`` of each ``OID_OR_NAME=DIR`` for a restore of ``snap`` (``repo``: the Repository it
    is in, whose tree says where each tablespace's files are).  UsageError, one line, for a snapshot not of
    ``backup --postgres``, a tablespace it does not have, or one placed twice."""
    known = recorded_tablespaces(snap)
    chosen: dict[int, str] = {}
    for spec in specs:
        key, into = parse_mapping(spec)
        match = [t for t in known if str(t["oid"]) == key] or [t for t in known if t.get("name") == key]
        if not match:
            have = ", ".join(f"{t.get('name')} (oid {t['oid']})" for t in known) or "none"
            raise UsageError(f"snapshot {snap.id[:8]} has no tablespace {key!r} (its tablespaces: {have})")
        oid = match[0]["oid"]
        if oid in chosen:
            raise UsageError(f"tablespace {key!r} is placed twice ({chosen[oid]} and {into})")
        chosen[oid] = into
    if not chosen:
        return []
    entries = {e.path: e for e in repo.tree(snap, "pg_tblspc", recursive=False)}
    out = []
    for oid, into in chosen.items():
        link = b"pg_tblspc/%d" % oid
        e = entries.get(link)
        held = held_at(link, e.type, e.target) if e is not None else b""
        if not held:
            raise UsageError(f"snapshot {snap.id[:8]} does not hold the files of tablespace {oid}")
        out.append(Relocation(held, os.path.abspath(into), link))
    return out


__all__ = ["parse_mapping", "recorded_tablespaces", "held_at", "relocations"]
