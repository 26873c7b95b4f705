"""Which blob a new delta takes as its base: pure policy over a chain of blob ids.

A changed chunk is stored as a delta against the parent version's chunk, so
each delta holds one version's changes, while that chunk's chain is short
enough; at its limit the chain restarts against the whole blob at its bottom
(store/FORMAT.md, "Delta payload").  Restarting against a younger, shallower
delta instead (the chain's previous restart) stored 6 % less on a day of
PostgreSQL copies, but a restart holds nearly every block of a busy chunk, so
each one a read decodes costs as much as a whole blob: the restore of the
day's last version took 1.5-1.8 times a full's instead of 1.0-1.2.
"""
from __future__ import annotations


def restart_span(bound: int) -> int:
    """How far below ``bound`` a chain may restart: chains end between ``bound - span + 1`` and ``bound``."""
    return (bound + 1) // 2


def restart_depth(first_delta: bytes, bound: int) -> int:
    """The depth at which a chain restarts, set by the id of its first delta (the blob right above its
    whole blob).

    The chunks of a file restart in different versions, not all in one costly
    version; and since every restart begins with a new first delta, a chunk's
    next chain draws a new depth, so restarts do not fall into step (keyed by
    the whole blob, which restarts keep, every chain of a chunk had one
    length, and the chunks that restarted together once did so again and
    again: on PostgreSQL copies every other version held most restarts).
    """
    return bound - first_delta[0] % restart_span(bound)


def choose_base(chain: list[bytes], bound: int) -> int:
    """Index into ``chain`` of the base for a delta replacing ``chain[0]``: 0 (that blob itself) while its
    chain is shorter than its ``restart_depth``, else the whole blob at the end.

    ``chain`` lists the blob and its bases, nearest first, down to the whole
    blob; the new delta lies at most ``bound`` deep.
    """
    depth = len(chain) - 1  # of chain[0]
    if depth == 0 or depth < restart_depth(chain[-2] if depth > 1 else chain[0], bound):
        return 0
    return depth
