"""Resolving snapshot chains: pure functions over sorted record streams.

``apply(full, diff)`` gives the full tree after a differential;
``compose(d1, d2)`` gives one differential equal to applying d1 then d2 (used
to rebase a differential when retention removes its parent); ``resolve``
folds a chain.  Everything streams: memory does not grow with the tree.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from .manifest import OP_DELETE, OP_ENTRY, OP_FRESH, Record, sort_key

try:  # the same merge in C (store/_manifest.c): resolving a chain is most of opening a snapshot's tree
    from ._manifest import Merge as _MergeC
except ImportError:
    _MergeC = None

_END = object()
T = TypeVar("T")


def _under(key: bytes, cut: bytes) -> bool:
    return key == cut or key.startswith(cut + b"\x00")


def _merge(lower: Iterable[Record], upper: Iterable[Record], lower_is_full: bool) -> Iterator[Record]:
    if _MergeC is None:
        return _merge_reference(lower, upper, lower_is_full)
    return _MergeC(lower, upper, lower_is_full, Record, OP_ENTRY, OP_FRESH, OP_DELETE)


def _merge_reference(lower: Iterable[Record], upper: Iterable[Record], lower_is_full: bool) -> Iterator[Record]:
    """``_merge`` in Python: what the C merge must match."""
    lo_it, up_it = iter(lower), iter(upper)
    lo = next(lo_it, _END)
    up = next(up_it, _END)
    lo_key = sort_key(lo.path) if lo is not _END else b""  # type: ignore[union-attr]
    up_key = sort_key(up.path) if up is not _END else b""  # type: ignore[union-attr]
    cut: bytes | None = None  # an upper DELETE/FRESH whose lower subtree is dropped
    while lo is not _END or up is not _END:
        if up is _END or (lo is not _END and lo_key < up_key):
            if cut is not None and _under(lo_key, cut):
                pass
            else:
                cut = None
                yield lo  # type: ignore[misc]
            lo = next(lo_it, _END)
            lo_key = sort_key(lo.path) if lo is not _END else b""  # type: ignore[union-attr]
            continue
        rec: Record = up  # type: ignore[assignment]
        same = lo is not _END and lo_key == up_key
        if cut is not None and not _under(up_key, cut):
            cut = None
        if cut is None and rec.op in (OP_DELETE, OP_FRESH):
            cut = up_key
        if lower_is_full:
            if rec.op != OP_DELETE:
                yield rec if rec.op == OP_ENTRY else Record(OP_ENTRY, rec.path, rec.entry)
        elif rec.op == OP_ENTRY and same and lo.op in (OP_DELETE, OP_FRESH):  # type: ignore[union-attr]
            yield Record(OP_FRESH, rec.path, rec.entry)
        else:
            yield rec
        if same:
            lo = next(lo_it, _END)
            lo_key = sort_key(lo.path) if lo is not _END else b""  # type: ignore[union-attr]
        up = next(up_it, _END)
        up_key = sort_key(up.path) if up is not _END else b""  # type: ignore[union-attr]


def apply(full: Iterable[Record], diff: Iterable[Record]) -> Iterator[Record]:
    """The full tree after applying ``diff`` to ``full`` (all ENTRY records)."""
    return _merge(full, diff, True)


def compose(first: Iterable[Record], second: Iterable[Record]) -> Iterator[Record]:
    """One differential equivalent to applying ``first`` then ``second``."""
    return _merge(first, second, False)


def resolve(full: Iterable[Record], diffs: Sequence[Iterable[Record]]) -> Iterator[Record]:
    """The tree at the end of a chain: a full manifest, then its differentials oldest first.

    The differentials are composed first, then applied once: each record of the
    full tree passes one merge instead of one per differential (a 58,000-entry
    tree under six small differentials took six merges per record).  They are
    composed in pairs, neighbours first, so a record of a differential passes
    about log2(n) merges rather than up to n (a day of 23 differentials that
    each list every file of a database).
    """
    if not diffs:
        return iter(full)
    layers: list[Iterable[Record]] = list(diffs)
    while len(layers) > 1:
        layers = [compose(layers[i], layers[i + 1]) if i + 1 < len(layers) else layers[i]
                  for i in range(0, len(layers), 2)]
    return apply(full, layers[0])


def ancestors(path: bytes) -> list[bytes]:
    """The directories above ``path`` in a manifest (``a/b/c`` -> ``a``, ``a/b``)."""
    parts = path.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


def on_way_to(path: bytes, directory: bytes) -> bool:
    """Whether ``path`` is ``directory``, lies below it, or is a directory above it (the root included).

    Such paths are closed under taking ancestors, so merging only their records of each layer gives
    the resolved tree's records of them: a differential's DELETE or FRESH that cuts a subtree holding
    one of them names the subtree's root, itself such a path (``tree_within``)."""
    return path == directory or path.startswith(directory + b"/") or directory.startswith(path + b"/") or not path


def in_listing(path: bytes, directory: bytes) -> bool:
    """Whether ``path`` is ``directory``, lies directly in it, or is a directory above it (the root included):
    closed under taking ancestors as ``on_way_to``'s paths are, so that merging only a chain's records of them
    resolves them (``ManifestSeeker.shallow``)."""
    parent = path.rpartition(b"/")[0]
    return (path == directory or (parent == directory and path != b"") or directory.startswith(path + b"/")
            or not path)


def lookup(path: bytes, layers: Sequence[Callable[[bytes], Record | None]]) -> Record | None:
    """The resolved record of one path, reading only the records of it and its ancestors.

    ``layers`` are the chain's manifests oldest first (the full, then its
    differentials), each a function giving that manifest's own record for a path
    (or None).  Equal to finding ``path`` in ``resolve`` of the whole chain, at a
    cost independent of the tree's size.
    """
    for depth, find in enumerate(reversed(layers)):
        rec = find(path)
        if rec is not None:
            return None if rec.op == OP_DELETE else Record(OP_ENTRY, rec.path, rec.entry)
        if depth == len(layers) - 1:
            return None
        for parent in ancestors(path):
            up = find(parent)
            if up is not None and up.op in (OP_DELETE, OP_FRESH):
                return None  # this differential replaced or removed the subtree
    return None


def chain_to_base(snapshot_id: str, parents: Mapping[str, str | None]) -> list[str]:
    """Ids from the full base to ``snapshot_id`` (oldest first); raises KeyError/ValueError when broken."""
    chain = [snapshot_id]
    seen = {snapshot_id}
    while True:
        parent = parents[chain[-1]]
        if parent is None:
            return chain[::-1]
        if parent in seen:
            raise ValueError(f"snapshot chain of {snapshot_id} has a cycle")
        if parent not in parents:
            raise KeyError(parent)
        seen.add(parent)
        chain.append(parent)


def lineage(snapshot_id: str, parents: dict[str, str | None]) -> list[str]:
    """``snapshot_id`` and the ancestors of it that are in ``parents``, newest first; it stops, without
    raising, at a parent that is not there or one already seen (a damaged chain)."""
    out = [snapshot_id]
    seen = {snapshot_id}
    parent = parents.get(snapshot_id)
    while parent is not None and parent in parents and parent not in seen:
        out.append(parent)
        seen.add(parent)
        parent = parents[parent]
    return out


def fold_chains(parents: dict[str, str | None], base: Callable[[str], T], step: Callable[[str, T], T]) -> dict[str, T]:
    """For every snapshot of ``parents``, a value folded down its chain: ``base(sid)`` for one whose parent
    is not among them (a full, or a chain cut off), else ``step(sid, its parent's value)``.  Each value is
    computed once: a question asked of every snapshot's whole lineage (its length, whether it reaches a
    full) cost the chain's length squared per snapshot, and a chain of 3,000 differentials took minutes.

    In a damaged chain that loops, every snapshot's lineage holds the same snapshots, the whole loop: the
    loop is folded once, from where it was entered, and all of it gets that value (folded per snapshot, a
    forged loop of 200,000 took minutes).  The folds asked here do not depend on the order within it."""
    out: dict[str, T] = {}
    for sid in parents:
        path: list[str] = []
        on_path: dict[str, int] = {}
        cur = sid
        while cur not in out:
            if cur in on_path:
                loop = path[on_path[cur]:]
                value = base(loop[-1])
                for node in reversed(loop[:-1]):
                    value = step(node, value)
                out.update(dict.fromkeys(loop, value))
                del path[on_path[cur]:]
                break
            parent = parents[cur]
            if parent is None or parent not in parents:
                out[cur] = base(cur)
                break
            on_path[cur] = len(path)
            path.append(cur)
            cur = parent
        value = out[cur]
        for node in reversed(path):
            out[node] = value = step(node, value)
    return out


def chain_lengths(parents: dict[str, str | None]) -> dict[str, int]:
    """``len(lineage(sid, parents))`` of every snapshot, in one pass."""
    return fold_chains(parents, lambda sid: 1, lambda sid, n: n + 1)


def meets(parents: dict[str, str | None], ids: set[str]) -> dict[str, bool]:
    """Whether each snapshot's lineage holds one of ``ids`` (it is one, or built on one), in one pass."""
    return fold_chains(parents, lambda sid: sid in ids, lambda sid, hit: hit or sid in ids)


def with_ancestors(ids: Iterable[str], parents: dict[str, str | None]) -> set[str]:
    """``ids`` and every ancestor of them among ``parents``: the union of their lineages, each walked once."""
    out: set[str] = set()
    for sid in ids:
        while sid is not None and sid in parents and sid not in out:
            out.add(sid)
            sid = parents[sid]
    return out


def broken_chains(parents: dict[str, str | None]) -> dict[str, str]:
    """Each snapshot whose chain reaches a parent not in ``parents`` (unreadable or gone), and that parent:
    nothing can restore or rebase it.  In one pass (``fold_chains``): walking each chain whole, a check of
    one chain of 3,000 differentials took seconds."""
    def gone(sid: str) -> str | None:
        parent = parents[sid]
        return parent if parent is not None and parent not in parents else None

    return {sid: p for sid, p in fold_chains(parents, gone, lambda sid, p: p).items() if p is not None}


def resolving_chains(parents: dict[str, str | None]) -> dict[str, bool]:
    """Whether each snapshot's chain reaches a full among ``parents`` (none gone, no loop), in one pass."""
    return fold_chains(parents, lambda sid: parents[sid] is None, lambda sid, ok: ok)


def children_first(ids: Iterable[str], parents: dict[str, str | None]) -> list[str]:
    """``ids`` ordered so that each comes before every ancestor of it among them: deleted in that order,
    a run stopped between two deletions leaves no differential whose parent is gone (the kept ones were
    rebased off those going first)."""
    lengths = chain_lengths(parents)
    return sorted(ids, key=lambda sid: lengths.get(sid, 1), reverse=True)
