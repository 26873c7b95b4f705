"""Exclude rules: ordered globs, some re-including what an earlier one excluded, some ignoring case.

As restic's: within a list the last pattern that matches a path decides, ``!GLOB`` re-including what
an earlier pattern left out; a directory left out is not walked into, so nothing below it comes back
(``dir/*`` then ``!dir/keep`` keeps one entry of ``dir``).  A glob matches the whole path below a source
(with several sources, also the path the snapshot records) or its last name, and ``*`` crosses ``/`` (``fnmatch``).  A leading ``\\!`` stands for a literal ``!``.
Case-sensitive and case-insensitive patterns are two lists, each deciding on its own: a path is left
out when either leaves it out.  Pure logic: the backup's walk, a restore's selection and a rewrite ask
it about paths.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from chunkvault.errors import UsageError

_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Pattern:
    """One pattern as given (``text``), the glob it matches, and whether it re-includes."""

    text: str
    glob: str
    negated: bool


def parse_pattern(text: str, what: str = "exclude") -> Pattern:
    """``!GLOB`` re-includes, ``\\!NAME`` is the literal ``!NAME``, anything else excludes; a ``!``
    naming nothing is a UsageError."""
    if text.startswith("\\!"):
        return Pattern(text, text[1:], False)
    if text.startswith("!"):
        if text == "!":
            raise UsageError(f"{what} pattern '!' names nothing: '!GLOB' re-includes what an earlier "
                             "pattern excluded and GLOB matches; '\\!NAME' matches a name starting with '!'")
        return Pattern(text, text[1:], True)
    return Pattern(text, text, False)


class PatternList:
    """One ordered list of patterns: ``decides(path, name)`` is True (excluded), False (re-included by a
    ``!`` pattern) or None (no pattern matches).  Without ``!`` patterns it is one compiled pattern."""

    def __init__(self, texts: Iterable[str], *, ignore_case: bool = False, what: str = "exclude",
                 normalize: Callable[[str], str] | None = None):
        self.patterns = [parse_pattern(t, what) for t in texts]
        if normalize is not None:
            self.patterns = [Pattern(p.text, normalize(p.glob), p.negated) for p in self.patterns]
        self.ignore_case = ignore_case
        self.what = what
        self.negates = any(p.negated for p in self.patterns)
        globs = [p.glob.lower() if ignore_case else p.glob for p in self.patterns]
        if self.negates:
            self._rules = [(re.compile(fnmatch.translate(g)).match, not p.negated)
                           for g, p in reversed(list(zip(globs, self.patterns)))]
        else:
            self._any = re.compile("|".join(fnmatch.translate(g) for g in globs)).match if globs else None

    def decides(self, path: str, name: str, full: str | None = None) -> bool | None:
        """``full``: the path as a snapshot of several sources records it, matched too (see
        ``ExcludeRules.excluded``)."""
        if self.ignore_case:
            path, name = path.lower(), name.lower()
            full = full.lower() if full is not None else None
        if not self.negates:
            match = self._any
            return True if match is not None and (match(path) or match(name)
                                                  or (full is not None and match(full))) else None
        for match, excludes in self._rules:
            if match(path) or match(name) or (full is not None and match(full)):
                return excludes
        return None


class ExcludeRules:
    """The case-sensitive and the case-insensitive list of one command, asked about paths below a
    source (or a snapshot's root): ``excluded`` judges a path whose ancestors were kept (a walk's
    question), ``excluded_tree`` a path whose ancestors may have been left out (a restore's)."""

    _KEEP = 1 << 16  # directories whose answer ``excluded_tree`` remembers, at most

    def __init__(self, excludes: Iterable[str] = (), iexcludes: Iterable[str] = (), *,
                 normalize: Callable[[str], str] | None = None):
        self.lists = [lst for lst in (PatternList(excludes, normalize=normalize),
                                      PatternList(iexcludes, ignore_case=True, what="iexclude",
                                                  normalize=normalize)) if lst.patterns]
        self._dirs: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.lists)

    def plain_globs(self) -> list[str] | None:
        """The globs when the C walk can match them itself (literal bytes and ``*``, case-sensitive, none
        re-including), else None: the walk then asks ``excluded`` about each entry."""
        if any(lst.ignore_case or lst.negates for lst in self.lists):
            return None
        globs = [p.glob for lst in self.lists for p in lst.patterns]
        return None if any("?" in g or "[" in g for g in globs) else globs

    def excluded(self, path: str, full: str | None = None) -> bool:
        """Whether the path (its ancestors kept) is left out: either list's last matching pattern says so.
        ``full``: a backup of several sources asks about the path below its source and gives the path the
        snapshot records (under the source's absolute path) as ``full``, which patterns match too, so that
        patterns written as ``ls`` lists the snapshot keep working."""
        name = path.rpartition("/")[2]
        return any(lst.decides(path, name, full) for lst in self.lists)

    def excluded_tree(self, path: str) -> bool:
        """Whether the path or one of its ancestors is left out; each directory's answer is kept (a tree's
        paths come sorted: a path costs one judgement, not one per ancestor)."""
        if self.excluded(path):
            return True
        parent = path.rpartition("/")[0]
        if not parent:
            return False
        known = self._dirs.get(parent)
        if known is None:
            if len(self._dirs) >= self._KEEP:
                self._dirs.clear()
            known = self._dirs[parent] = self.excluded_tree(parent)
        return known

    def warnings(self) -> list[str]:
        """What a ``!`` pattern that can never re-include anything is told: no earlier pattern of its list
        excludes anything, or (a literal path) a directory above it is excluded and so never walked into."""
        out = []
        for lst in self.lists:
            for i, p in enumerate(lst.patterns):
                if not p.negated:
                    continue
                if not any(not q.negated for q in lst.patterns[:i]):
                    out.append(f"{lst.what} pattern {p.text!r} re-includes nothing: no pattern before it "
                               f"excludes anything (patterns apply in order, and '!' takes back what an earlier "
                               f"{lst.what} pattern left out)")
                    continue
                parts = p.glob.split("/")
                if _MAGIC.search(p.glob) or len(parts) < 2 or not all(parts):
                    continue
                top = next((a for a in ("/".join(parts[:n]) for n in range(1, len(parts))) if self.excluded_tree(a)),
                           None)
                if top is not None:
                    out.append(f"{lst.what} pattern {p.text!r} re-includes nothing: {top!r} is excluded, and "
                               f"an excluded directory is not walked into (exclude '{top}/*' instead, to keep "
                               "some of what it holds)")
        return out
