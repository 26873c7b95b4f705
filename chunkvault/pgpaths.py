"""Where a PostgreSQL data directory keeps its relations: rules on paths below it, shared by the base backup's
walk (what it leaves out) and its page checks (which files hold checksummed pages), so the two cannot drift."""
from __future__ import annotations

import re

#: Where a backup's tree holds the tablespaces outside the data directory, one directory per oid.
TABLESPACES = b"chunkvault_tblspc"
#: A relation's file in a database directory: its OID, its fork (none: the main fork), its segment.
RELATION = re.compile(rb"(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?")
#: A temporary relation's file (``t<backend>_<oid>``, a fork, a segment): gone at the server's next start.
TEMPORARY = re.compile(rb"t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?")


def is_database_directory(below: bytes) -> bool:
    """Whether the directory at ``below`` (under the data directory) holds a database's relations:
    ``base/OID``, or ``pg_tblspc/OID/PG_.../OID`` or ``chunkvault_tblspc/OID/PG_.../OID`` (a tablespace's)."""
    parts = below.split(b"/")
    if len(parts) == 2:
        return parts[0] == b"base" and parts[1].isdigit()
    return (len(parts) == 4 and parts[0] in (b"pg_tblspc", TABLESPACES) and parts[1].isdigit()
            and parts[2].startswith(b"PG_") and parts[3].isdigit())


def relation_segment(rel: bytes) -> int | None:
    """The segment number of a relation's file at ``rel`` (below the data directory: a database's, a
    tablespace's, or a shared catalog's in ``global/``), or None for a file that is no relation's (its pages
    carry no checksum: the control file, a map, a temporary relation's)."""
    below, _, name = rel.rpartition(b"/")
    if below != b"global" and not is_database_directory(below):
        return None
    m = RELATION.fullmatch(name)
    return None if m is None else int(m.group(3) or 0)
