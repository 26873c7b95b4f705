"""The order of snapshots in time, for every listing and every choice of the newest (pure)."""
from __future__ import annotations

from typing import Any, Callable, Iterable


def built_on(s: Any) -> str | None:
    """The snapshot ``s`` was made on: its parent, or for one that has none any more (an aggregate made
    it a full) the parent it had, which its stats keep as ``follows``."""
    if s.parent:
        return s.parent
    stats = getattr(s, "stats", None)
    follows = stats.get("follows") if isinstance(stats, dict) else getattr(s, "follows", None)
    return follows if isinstance(follows, str) else None


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
            on = built_on(cur)
            parent = by_id.get(on) if on else None
            if parent is None or when(parent) != when(cur) or parent.id in path:
                depth[path.pop()] = 0
                break
            cur = parent
        d = depth[cur.id]
        for sid in reversed(path):
            d += 1
            depth[sid] = d
    return lambda s: (when(s), depth.get(s.id, 0), s.id)
