"""Which blob a new delta takes as its base: pure policy over a chain's ids and stored sizes.

A changed chunk is stored as a delta against the parent version's chunk, so
each delta holds one version's changes, while that chunk's chain is short
enough; at its limit the chain restarts.  A restart's delta holds every
change since its base was written, so the younger the base the smaller it is,
but it must be shallow: the new delta lies one deeper than its base.

Restarting against the whole blob at the bottom of the chain, the oldest and
shallowest blob, made each restart's delta grow with the age of that blob:
on a busy PostgreSQL table, 17 KiB against a base 6 versions old, 27 KiB at
12, 42 KiB at 23 (1 MiB chunks; a one-version delta is 5 KiB).  So restarts
climb a ladder instead: a restart's base is the previous restart, while that
lies in the lower half of the bound, so the new delta holds about one chain's
changes; above that, the whole blob again (store/FORMAT.md, "Delta payload").

Restarts are told from the other deltas by size alone, from the index: a
delta in the lower half of the bound at least twice the median of the
deltas above it, which each hold one version's changes.  A wrong guess costs
bytes or depth within the bound, never correctness: any blob may be a base.
"""
from __future__ import annotations

from statistics import median
from typing import Callable

#: A delta this many times the median of its chain's deltas marks where a chain restarted.
RESTART_SIZE_RATIO = 2


def restart_span(bound: int) -> int:
    """How far below ``bound`` a chain may restart: chains end between ``bound - span + 1`` and ``bound``."""
    return (bound + 1) // 2


def restart_depth(chain_start: bytes, bound: int) -> int:
    """The depth at which a chain restarts, set by the id of the blob it started from.

    The chunks of a file restart in different versions, not all in one costly
    version; and since every restart starts a new chain, a chunk's next chain
    draws a new depth, so restarts do not fall into step (keyed by the whole
    blob, which restarts kept, every chain of a chunk had one length, and the
    chunks that restarted together once did so again and again).
    """
    return bound - chain_start[0] % restart_span(bound)


def choose_base(chain: list[bytes], stored_size: Callable[[bytes], int], bound: int) -> int:
    """Index into ``chain`` of the base for a delta replacing ``chain[0]``.

    ``chain`` lists that blob and its bases, nearest first, down to the whole
    blob at its end; ``stored_size`` gives a blob's stored size (asked only
    of chains deep enough to restart).  The result's depth plus one never
    exceeds ``bound``.
    """
    depth = len(chain) - 1  # of chain[0]
    if depth == 0:
        return 0
    span = restart_span(bound)
    if depth <= bound - span:  # below every chain's limit
        return 0
    sizes = [stored_size(b) for b in chain[:depth]]  # of the deltas at depths depth .. 1
    # Restarts lie at depths up to the span; the deltas above them hold one version each.
    above = sizes[: depth - span]
    big = RESTART_SIZE_RATIO * median(above) if above else float("inf")
    # The chain's latest restart (its first delta when none shows): the blob the current chain started from.
    start = next((i for i in range(depth - span, depth) if sizes[i] >= big), depth - 1)
    if depth < restart_depth(chain[start], bound):
        return 0
    return start if depth - start < span else depth
