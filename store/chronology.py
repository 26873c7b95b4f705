"""The order of snapshots in time, for every listing and every choice of the newest (pure)."""
from __future__ import annotations

from typing import Any, Callable, Iterable


#: In an imported snapshot's stats: the id of the repository's copy of the same snapshot that no longer held
#: all of it, which the import brought back whole.
HEALS = "heals"


def built_on(s: Any) -> list[str]:
    """The snapshots ``s`` was made on, nearest first: its parent; or, for one that has none any more (an
    aggregate made it a full), the parent it had (``follows`` in its stats) and that one's chain back to its
    full (``former_chain``).  A forget of the nearer ones (``aggregate --retire``) leaves the farther to
    order it by: by ``follows`` alone it tied with the chain's full, and by id, at random, came before it
    (``latest`` was the full, and ``--keep-last 1`` kept the full and removed the newest data).  An import
    that heals a copy (``HEALS``) of its own time is built on it too: by id, the copy that lost data was
    ``latest`` half the time, and ``--keep-last 1`` removed the healed one."""
    if s.parent:
        return [s.parent]
    stats = getattr(s, "stats", None)
    if isinstance(stats, dict):
        follows, former, heals = stats.get("follows"), stats.get("former_chain"), stats.get(HEALS)
    else:
        follows, former, heals = (getattr(s, "follows", None), getattr(s, "former_chain", ()),
                                  getattr(s, HEALS, None))
    out = [follows] if isinstance(follows, str) else []
    if isinstance(former, (list, tuple)):
        out += [f for f in reversed(former) if isinstance(f, str) and f not in out]
    if isinstance(heals, str) and heals not in out:
        out.append(heals)
    return out


def chronological_key(snapshots: Iterable[Any], time: Callable[[Any], Any] | None = None) -> Callable[[Any], tuple]:
    """A sort key, oldest first, for any of ``snapshots``: by time, then a snapshot before the differentials
    built on it at that same time (``backup --time`` may date a whole chain one instant: its latest is the
    last differential, not its full; an aggregate of that differential too), then by id. ``time`` reads a
    snapshot's time (default ``.time``)."""
    when = time or (lambda s: s.time)
    by_id = {s.id: s for s in snapshots}
    depth: dict[str, int] = {}
    for s in by_id.values():
        path: list[str] = []
        cur = s
        while cur.id not in depth:
            path.append(cur.id)
            parent = next((by_id[on] for on in built_on(cur) if on in by_id), None)
            if parent is None or when(parent) != when(cur) or parent.id in path:
                depth[path.pop()] = 0
                break
            cur = parent
        d = depth[cur.id]
        for sid in reversed(path):
            d += 1
            depth[sid] = d
    return lambda s: (when(s), depth.get(s.id, 0), s.id)
