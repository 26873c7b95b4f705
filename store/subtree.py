"""A path of a snapshot taken as the root of a tree of its own (``SNAPSHOT:PATH``): what a restore writes
into its target, and what ``ls`` and ``diff`` show, with ``PATH/`` taken off every path below it.

A directory's entry becomes the root (its metadata lands on the target, as a whole snapshot's root does);
anything else (a file, a link) is the one entry of the tree, under its base name.  A hard link to a file
within keeps linking to it; one to a file outside cannot, so its first link within becomes a copy of the
file, and the other links within link to that one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

from chunkvault.errors import CorruptObject

from .manifest import T_FILE, T_HARDLINK, Entry, Record


def in_subtree(path: bytes, root: bytes) -> bool:
    """Whether ``path`` is ``root`` or lies below it (``b""``: the whole tree)."""
    return root == b"" or path == root or path.startswith(root + b"/")


class Subtree:
    """The tree rooted at ``root`` (a path as the snapshot names it; ``b""``: the whole snapshot).
    ``is_dir``: whether it is a directory (or a directory without an entry of its own, such as the
    root of a snapshot of several paths); ``lookup``: a path's record in the whole snapshot."""

    def __init__(self, root: bytes, is_dir: bool, lookup: Callable[[bytes], Record | None], what: str = "tree"):
        self.root = root
        self.is_dir = is_dir or root == b""
        self.name = root.rpartition(b"/")[2]
        self._lookup = lookup
        self._what = what

    def path_in(self, path: bytes) -> bytes | None:
        """A snapshot's path as this tree names it; None for one outside."""
        if self.root == b"":
            return path
        if path == self.root:
            return b"" if self.is_dir else self.name
        if self.is_dir and path.startswith(self.root + b"/"):
            return path[len(self.root) + 1:]
        return None

    def snapshot_path(self, path: bytes) -> bytes:
        """A path of this tree as the snapshot names it."""
        if self.root == b"":
            return path
        if not self.is_dir:
            return self.root
        return self.root + b"/" + path if path else self.root

    def records(self, records: Iterator[Record]) -> Iterator[Record]:
        """The records of ``records`` (a snapshot's, sorted, perhaps more than this tree's) at and below the
        root, re-rooted.  Order is kept: every path taken shares the root's prefix."""
        if self.root == b"":
            yield from records
            return
        copied: dict[bytes, bytes] = {}  # a file outside -> the path within that holds its copy
        for rec in records:
            path = self.path_in(rec.path)
            if path is None:
                continue
            e = rec.entry
            if e is not None and e.type == T_HARDLINK:
                e = self._link(e, path, copied)
            elif e is not None:
                e = dataclasses.replace(e, path=path)
            yield rec._replace(path=path, entry=e)

    def _link(self, e: Entry, path: bytes, copied: dict[bytes, bytes]) -> Entry:
        """A hard link, re-rooted: to its target within, or (the target outside) a copy of the file."""
        within = self.path_in(e.target)
        if within is not None:
            return dataclasses.replace(e, path=path, target=within)
        if e.target in copied:
            return dataclasses.replace(e, path=path, target=copied[e.target])
        first = self._lookup(e.target)
        if first is None or first.entry is None or first.entry.type != T_FILE:
            raise CorruptObject(self._what, f"hard link {e.path!r} names {e.target!r}, which is not a file of "
                                "the snapshot")
        copied[e.target] = path
        return dataclasses.replace(first.entry, path=path)

    def lookup(self, path: bytes) -> Record | None:
        """A path's record in this tree (re-rooted); a hard link to a file outside is that file."""
        if self.path_in(self.snapshot_path(path)) != path:
            return None
        rec = self._lookup(self.snapshot_path(path))
        if rec is None or rec.entry is None:
            return rec
        e = rec.entry
        if e.type == T_HARDLINK and self.path_in(e.target) is None:
            first = self._lookup(e.target)
            if first is None or first.entry is None:
                return None
            e = first.entry
        elif e.type == T_HARDLINK:
            e = dataclasses.replace(e, target=self.path_in(e.target))
        return rec._replace(path=path, entry=dataclasses.replace(e, path=path))

