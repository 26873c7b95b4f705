"""What keeps a snapshot's tree inside a restore's target: checked by every restore, by ``dump`` and
``import`` as they read a tree, and by ``check``, so that what check passes a restore takes."""
from __future__ import annotations

import os
from typing import Iterator

from chunkvault.errors import CorruptObject

from .chain import ancestors
from .manifest import T_DIR, T_HARDLINK, T_SYMLINK, Record


def _is_safe(path: bytes) -> bool:
    """Whether ``path`` stays below the target: relative, no NUL, no empty, "." or ".." component.
    Searched for as byte strings, not split into components: a restore asks once per entry."""
    if path == b"":
        return True
    framed = b"/" + path + b"/"
    return not (path[:1] == b"/" or b"\x00" in path or b"//" in framed or b"/./" in framed or b"/../" in framed)


def safe_relpath(path: bytes) -> bytes:
    """``path`` if it stays below the target (CorruptObject if not)."""
    if not _is_safe(path):
        raise CorruptObject("manifest", f"unsafe path {path!r}")
    return path


class Confinement:
    """What keeps a tree's records inside a restore's target, checked record by record (``check`` raises
    ValueError naming what is wrong): in order, on safe paths, none below a symbolic link of the same tree
    (which the restore would have made and would then follow), no hard link to such a path or out of the
    tree, and a root that is a directory (else it would take the target's place).  A tree read from a
    directory has none of these faults; only a crafted manifest or ``.backup`` file could, and an import
    refuses one as a restore does."""

    def __init__(self) -> None:
        self.previous: bytes | None = None
        self.link: bytes | None = None  # the newest symbolic link's key and separator: its subtree follows it
        self.links: set[bytes] = set()

    def check(self, rec: Record) -> None:
        key = rec.key
        if self.previous is not None and key <= self.previous:
            raise ValueError(f"records out of order at {os.fsdecode(rec.path)!r}")
        self.previous = key
        if not _is_safe(rec.path):
            raise ValueError(f"unsafe path {rec.path!r}")
        if self.link is not None and key.startswith(self.link):
            raise ValueError(f"{os.fsdecode(rec.path)!r} lies below a symbolic link")
        e = rec.entry
        if e is None:
            return
        if rec.path == b"" and e.type != T_DIR:
            raise ValueError("the snapshot's root is not a directory")
        if e.type == T_SYMLINK:
            self.link = key + b"\x00"
            self.links.add(rec.path)
        elif e.type == T_HARDLINK:
            if not e.target or not _is_safe(e.target):
                raise ValueError(f"hard link {os.fsdecode(rec.path)!r} points out of the tree")
            if self.links.intersection(ancestors(e.target)):
                raise ValueError(f"hard link {os.fsdecode(rec.path)!r} points below a symbolic link")


def confined(records: Iterator[Record], what: str = "manifest") -> Iterator[Record]:
    """``records``, refused (CorruptObject naming ``what``) if they would lead a restore out of its target
    (``Confinement``)."""
    confinement = Confinement()
    for rec in records:
        try:
            confinement.check(rec)
        except ValueError as exc:
            raise CorruptObject(what, str(exc)) from None
        yield rec
