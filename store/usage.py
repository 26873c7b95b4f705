"""What a selection of snapshots takes: the data restoring them reads, and the data only they need.

Every snapshot's tree is resolved once, walking each chain from its full down
(a differential's tree is its parent's with its own records applied), so a
day of differentials costs a merge per differential, not a chain per
snapshot.  A chunk another snapshot's tree names is kept by that snapshot:
forgetting the selection rebases those differentials onto records they
already hold, so what only the selection needs (its chunks and the delta
bases below them that no other snapshot's chunk reaches) is what forgetting
it and then pruning frees, give or take the packs prune leaves partly used.
Pure over its inputs: the repository hands it manifests and the index.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

from . import chain
from .blob import KIND_DELTA
from .blobindex import BlobLocation
from .manifest import Record
from .chronology import chronological_key
from .snapshot import KIND_FULL, Snapshot

ID_SIZE = 32


@dataclass
class BlobTotals:
    """Distinct blobs: how many, their plaintext, and what their envelopes take (deltas among them)."""

    blobs: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    delta_blobs: int = 0
    delta_stored_bytes: int = 0

    def add(self, loc: BlobLocation) -> None:
        self.blobs += 1
        self.raw_bytes += loc.raw_length
        self.stored_bytes += loc.length
        if loc.flags == KIND_DELTA:
            self.delta_blobs += 1
            self.delta_stored_bytes += loc.length


@dataclass
class SnapshotUsage:
    snapshots: int = 0
    full_snapshots: int = 0
    files: int = 0  # the files of each selected snapshot (its restore size), summed
    bytes: int = 0
    chunks: BlobTotals = field(default_factory=BlobTotals)  # the distinct chunks the selection's trees name
    bases: BlobTotals = field(default_factory=BlobTotals)  # the delta bases below them, down every chain
    manifest_blobs: int = 0  # the manifests of the selection's chains
    manifest_stored_bytes: int = 0
    only: BlobTotals = field(default_factory=BlobTotals)  # of chunks and bases, what no other snapshot needs
    # the own manifest blobs of those selected that no kept snapshot builds on (one a kept differential builds
    # on is merged into its new manifest when a forget rebases it: about as many bytes written as freed)
    only_manifests: BlobTotals = field(default_factory=BlobTotals)
    missing_blobs: int = 0  # named by a tree or a delta, but in no index (`check` says more)
    not_resolved: list[str] = field(default_factory=list)  # ids whose chain does not reach a full

    @property
    def stored_bytes(self) -> int:
        """What restoring the selection reads at most: its chunks, their bases and its manifests."""
        return self.chunks.stored_bytes + self.bases.stored_bytes + self.manifest_stored_bytes

    @property
    def frees_stored_bytes(self) -> int:
        """What forgetting the selection, then prune, frees: the data and the manifests only it needs."""
        return self.only.stored_bytes + self.only_manifests.stored_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stored_bytes": self.stored_bytes, "frees_stored_bytes": self.frees_stored_bytes}


def chains_down(snapshots: Iterable[Snapshot]) -> tuple[list[Snapshot], dict[str, list[Snapshot]]]:
    """(full snapshots, the children of each snapshot), oldest first; a differential whose parent is not
    among ``snapshots`` is in neither."""
    snaps = list(snapshots)
    snaps.sort(key=chronological_key(snaps))
    ids = {s.id for s in snaps}
    roots = []
    children: dict[str, list[Snapshot]] = defaultdict(list)
    for s in snaps:
        if s.parent is None:
            roots.append(s)
        elif s.parent in ids:
            children[s.parent].append(s)
    return roots, children


def resolution_order(snapshots: Iterable[Snapshot]) -> list[Snapshot]:
    """The snapshots in the order ``resolved_trees`` resolves them (their manifests read ahead in it)."""
    roots, children = chains_down(snapshots)
    order: list[Snapshot] = []
    stack = list(reversed(roots))
    while stack:
        snap = stack.pop()
        order.append(snap)
        stack.extend(reversed(children.get(snap.id, ())))
    return order


def resolved_trees(snapshots: Iterable[Snapshot], own_records: Callable[[Snapshot], Iterable[Record]]
                   ) -> Iterator[tuple[Snapshot, Iterable[Record]]]:
    """(snapshot, its resolved tree) for each snapshot whose chain reaches a full among ``snapshots``,
    depth first down each chain: a tree is held only until its children are resolved (two trees at a
    time along a chain without branches).  A record's entry is only its chunk list here (the merge of a
    chain looks at paths and operations alone): whole entries made a forget's dry run of a tree of 300,000
    files take 500 MB.  The tree of a snapshot nothing builds on is an iterator, to be read before the next
    is asked for, never held: as a list beside its parent's, `stats` of a differential of 300,000 files
    held both (360 MB)."""
    roots, children = chains_down(snapshots)
    stack: list[tuple[Snapshot, list[Record] | None]] = [(s, None) for s in reversed(roots)]
    while stack:
        snap, parent_tree = stack.pop()
        own = (Record(r.op, r.path, r.entry.chunks if r.entry is not None else None) for r in own_records(snap))
        merged = own if parent_tree is None else chain.apply(parent_tree, own)
        kids = children.get(snap.id, ())
        if not kids:
            yield snap, merged
            continue
        tree = list(merged)
        yield snap, tree
        stack.extend((c, tree) for c in reversed(kids))


def _chunk_ids(tree: Iterable[Record], seen: set[bytes], into: set[bytes]) -> None:
    """Add the chunk ids of ``tree``'s files to ``into``; a chunk list already in ``seen`` (an unchanged
    file passes from a parent's tree to its children's as the same bytes) is skipped."""
    for rec in tree:
        c = rec.entry  # its chunk list (``resolved_trees``)
        if not c or c in seen:
            continue
        seen.add(c)
        into.update(c[i : i + ID_SIZE] for i in range(0, len(c), ID_SIZE))


def with_bases(ids: set[bytes], base_of: Callable[[bytes], bytes | None]) -> set[bytes]:
    """``ids`` and the bases of their deltas, down every chain."""
    return ids | bases_of(ids, base_of)


def bases_of(ids: set[bytes], base_of: Callable[[bytes], bytes | None]) -> set[bytes]:
    """The bases of the deltas among ``ids``, down every chain, that ``ids`` lacks: a set of those alone, where
    a copy of ``ids`` with them (``with_bases``) held some 16 MB more for each 300,000 ids."""
    out: set[bytes] = set()
    for start in ids:
        base = base_of(start)
        while base is not None and base not in ids and base not in out:
            out.add(base)
            base = base_of(base)
    return out


def _in_chains(snaps: list[Snapshot], chain_of: Callable[[Snapshot], list[Snapshot]]) -> dict[str, Snapshot]:
    """Every snapshot in the chain of one of ``snaps``, by id.  Newest first, a chain walked holds the chains
    of the snapshots below it, which are not walked again: each walked whole, one chain of 3,000
    differentials took a forget's dry run 8 s."""
    out: dict[str, Snapshot] = {}
    for s in reversed(snaps):
        if s.id not in out:
            out.update((a.id, a) for a in chain_of(s))
    return out


def usage(every: list[Snapshot], chosen: list[Snapshot], own_records: Callable[[Snapshot], Iterable[Record]],
          locate: Callable[[bytes], BlobLocation | None], base_of: Callable[[bytes], bytes | None],
          chain_of: Callable[[Snapshot], list[Snapshot]]) -> SnapshotUsage:
    """The usage of ``chosen`` among ``every`` snapshot (see the module docstring)."""
    out = SnapshotUsage()
    chosen_ids = {s.id for s in chosen}
    for s in chosen:
        out.snapshots += 1
        out.full_snapshots += s.kind == KIND_FULL
        out.files += int(s.stats.get("files", 0))
        out.bytes += int(s.stats.get("bytes", 0))
    mine: set[bytes] = set()
    theirs: set[bytes] = set()
    seen_mine: set[bytes] = set()
    seen_theirs: set[bytes] = set()
    resolved = set()
    for snap, tree in resolved_trees(every, own_records):
        resolved.add(snap.id)
        if snap.id in chosen_ids:
            _chunk_ids(tree, seen_mine, mine)
        else:
            _chunk_ids(tree, seen_theirs, theirs)
    out.not_resolved = [s.id for s in every if s.id not in resolved]
    theirs |= bases_of(theirs, base_of)  # grown in place: a copy with them held some 16 MB more per 300,000 ids
    for bid in itertools.chain(mine, bases_of(mine, base_of)):
        loc = locate(bid)
        if loc is None:
            out.missing_blobs += 1
            continue
        (out.chunks if bid in mine else out.bases).add(loc)
        if bid not in theirs:
            out.only.add(loc)
    in_chains = _in_chains([s for s in chosen if s.id in resolved], chain_of)
    manifests = {bytes.fromhex(h) for m in in_chains.values() for h in m.manifest}
    for bid in manifests:
        loc = locate(bid)
        if loc is None:
            out.missing_blobs += 1
            continue
        out.manifest_blobs += 1
        out.manifest_stored_bytes += loc.length
    # the selection's own manifests go with it (a snapshot of many small files is mostly manifest), but for
    # those a kept differential builds on: forget rebases it, writing what they held into its manifest
    built_on = set(_in_chains([s for s in every if s.id not in chosen_ids and s.id in resolved], chain_of))
    others = {h for s in every if s.id not in chosen_ids for h in s.manifest}
    for h in {h for s in chosen if s.id not in built_on for h in s.manifest} - others:
        loc = locate(bytes.fromhex(h))
        if loc is not None:
            out.only_manifests.add(loc)
    return out
