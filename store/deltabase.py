"""Which blob a new delta takes as its base: pure policy over a chain of blob ids.

A changed chunk is stored as a delta against the parent version's chunk, so
each delta holds one version's changes, while that chunk's chain is short
enough; then the chain restarts against the whole blob at its bottom
(store/FORMAT.md, "Delta payload").  A restart's delta holds every change
since that blob was written, so restarts are the costly part of a version.

Chunks restart in turns: a chunk's turn comes once every ``restart_period``
backups of its series, at a phase set by its place (its file's path and its
index in the file), so about the same share of a busy file's chunks restarts
in every version; a chunk that reaches ``bound`` restarts whatever its turn.
Drawing each chain's length at random between half the bound and the bound
instead left the restarts to chance: one version of a day of PostgreSQL
copies added 0.164x restic's bytes where the day's mean was 0.121x; in
turns, 0.131x at most, for the same mean.

Restarting against a younger, shallower delta (the chain's previous restart)
stored 6 % less over that day, but a restart rewrites nearly every block of
a busy chunk, so each one a read passes through costs as much as a whole
blob: the restore of the day's last version took 1.5-1.8 times a full's
instead of 1.0-1.2.
"""
from __future__ import annotations

from typing import Callable


def restart_period(bound: int) -> int:
    """Backups between a chunk's turns to restart: a little under ``bound``, so that turns, not the bound,
    end chains (10 for 12: chains average 5.5 deltas deep, as chains of random length from 7 to 12 did)."""
    return max(1, bound - max(1, bound // 6))


#: Prefixed to a path for the keyed hash that sets its turns' phase (``restart_phase``).
PHASE_CONTEXT = b"chunkvault delta restart phase\0"


def restart_phase(keyed_hash: Callable[[bytes], bytes], path: bytes) -> int:
    """Where the turns of the file at ``path`` start: from the repository's keyed hash of the path, so which
    of a version's chunks are stored whole tells whoever holds the storage nothing about the paths."""
    return int.from_bytes(keyed_hash(PHASE_CONTEXT + path)[:4], "little")


def restart_turns(sequence: int, phase: int, bound: int) -> range:
    """The indexes of the chunks of a file (turns from ``phase``, chains bounded by ``bound``) whose turn to
    restart is the backup numbered ``sequence`` of its series: every ``restart_period``-th chunk."""
    period = restart_period(bound)
    return range(-(sequence + phase) % period, 1 << 62, period)


def choose_base(chain: list[bytes], bound: int, turn: bool) -> int:
    """Index into ``chain`` of the base for a delta replacing ``chain[0]``: 0 (that blob itself), or at a
    restart the whole blob at the end.

    ``chain`` lists the blob and its bases, nearest first, down to the whole
    blob; the new delta lies at most ``bound`` deep.
    """
    depth = len(chain) - 1  # of chain[0]
    if depth >= bound or (turn and depth > 0):
        return depth
    return 0


def unreadable_deltas(bases: dict[bytes, bytes], indexed_kind: Callable[[bytes], int | None],
                      delta_kind: int) -> set[bytes]:
    """Pure: the blobs the index holds as deltas whose chain of bases does not reach a blob it holds whole
    (what ``BlobIndex.unreadable_deltas`` finds natively, from the bases its rows keep: the rule, stated here).

    ``bases``: delta id -> base id, as the index objects give them; ``indexed_kind``: the kind of the copy
    the index holds of an id, None when it holds none.  A damaged repository can index such a delta (its
    base's pack lost, the index rebuilt from the packs that remain): a backup that deduplicated against
    it, or kept a file by reference to it, would save a snapshot nothing can restore.  A chain that loops
    back on itself (damage too) counts as unreadable."""
    readable: dict[bytes, bool] = {}
    for start in bases:
        path: list[bytes] = []
        cur: bytes | None = start
        verdict = False
        while cur is not None:
            if cur in readable:
                verdict = readable[cur]
                break
            kind = indexed_kind(cur)
            if kind is None or cur in path:
                break
            if kind != delta_kind:
                verdict = True
                break
            path.append(cur)
            cur = bases.get(cur)
        for b in path:
            readable[b] = verdict
    return {b for b, ok in readable.items() if not ok}
