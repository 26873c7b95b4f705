"""One repository's life, run the same way on every remote.

Backups with changes between them (a full and differentials), restores of each,
``check --read-data``, forget of a middle snapshot (its child is rebased),
aggregation of the chain's end, prune with repacking, and a final check: every
snapshot still restores exactly what it held.  Each backend's store tests call
``run_lifecycle`` so "works on every remote" is one shared claim, not several.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from chunkvault import Repository
from treeutil import describe

PASSWORD = "correct horse battery staple"


def _history(src: Path, repo: Repository, versions: int) -> dict[str, dict]:
    rnd = random.Random(7)
    src.mkdir()
    (src / "stable").write_bytes(rnd.randbytes(300_000))
    states: dict[str, dict] = {}
    for v in range(versions):
        (src / f"v{v}").write_bytes(rnd.randbytes(rnd.randrange(50_000, 250_000)))
        if v == 2:
            os.remove(src / "v0")
        db = bytearray(rnd.randbytes(400_000) if v == 0 else (src / "db").read_bytes())
        for _ in range(20):  # a database file rewritten in place: deltas against the parent's chunks
            at = rnd.randrange(len(db) - 8)
            db[at : at + 8] = rnd.randbytes(8)
        (src / "db").write_bytes(bytes(db))
        # Explicit kinds: with --type auto, chunk boundaries (a random chunker secret) decide
        # whether the deltas add up to a new full, so the chain's shape would vary run to run.
        snap = repo.backup([str(src)], kind="diff" if v else "full").snapshot
        states[snap.id] = describe(src)
    return states


def _restores_all(repo: Repository, states: dict[str, dict], out: Path) -> None:
    for i, (sid, state) in enumerate(states.items()):
        target = out / f"r{i}"
        repo.restore(sid, str(target))
        assert describe(target) == state, f"snapshot {sid[:8]} restored differently"


def run_lifecycle(url: str, tmp_path: Path, versions: int = 5, **remote_options: Any) -> None:
    repo = Repository.init(url, PASSWORD, kdf_seconds=0, pack_size=150_000, **remote_options)
    try:
        states = _history(tmp_path / "src", repo, versions)
    finally:
        repo.close()

    repo = Repository.open(url, PASSWORD, **remote_options)
    try:
        snaps = repo.snapshots()
        assert [s.kind for s in snaps] == ["full"] + ["diff"] * (versions - 1)
        _restores_all(repo, states, tmp_path / "before")
        assert repo.check(read_data=True).ok

        forgotten = snaps[1].id
        repo.forget([forgotten])
        del states[forgotten]
        repo.aggregate("latest")
        plan = repo.prune(max_unused=0.0)
        assert plan.delete or plan.repack
        report = repo.check(read_data=True)
        assert report.ok, report
        assert {s.id for s in repo.snapshots()} == set(states)
        _restores_all(repo, states, tmp_path / "after")
    finally:
        repo.close()


def run_rewritten_elsewhere(url: str, tmp_path: Path, monkeypatch: Any, count_gets: Any,
                            **remote_options: Any) -> None:
    """Two machines on one remote, each with its own cache: after the trusted one forgets a differential
    (rebasing the next onto the full: the same object size), tags and rewrites snapshots, the other
    lists and restores what is there now, never what its cache kept; while nothing changes, its
    commands read the snapshot objects from its cache. ``count_gets()`` returns how many snapshot
    objects the remote has served so far."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    for i in range(5):
        (src / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 300_000)))
    caches = {name: str(tmp_path / f"cache-{name}") for name in ("db", "admin")}

    def client(name: str) -> Repository:
        monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", caches[name])
        return Repository.open(url, PASSWORD, ledger=False, **remote_options)

    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", caches["admin"])
    with Repository.init(url, PASSWORD, kdf_seconds=0, pack_size=200_000, ledger=False, **remote_options) as repo:
        full = repo.backup([str(src)]).snapshot
        (src / "f1").write_bytes(b"one")
        d1 = repo.backup([str(src)], kind="diff").snapshot
        (src / "f2").write_bytes(b"two")
        d2 = repo.backup([str(src)], kind="diff").snapshot
    with client("db") as db:
        assert [s.parent for s in db.snapshots()] == [None, full.id, d1.id]  # now in db's cache
    before = count_gets()
    with client("db") as db:
        assert len(db.snapshots()) == 3
    assert count_gets() == before  # unchanged: served by the cache
    with client("admin") as admin:
        admin.forget([d1.id])
        admin.prune(max_unused=0)
    with client("db") as db:
        (latest,) = [s for s in db.snapshots() if s.id == d2.id]
        assert latest.parent == full.id
    with client("admin") as admin:
        admin.tag([d2.id], add=["kept"])
    with client("db") as db:
        (latest,) = [s for s in db.snapshots() if s.id == d2.id]
        assert (latest.parent, latest.tags) == (full.id, ["kept"])
        db.restore(d2.id, str(tmp_path / "out"))
        assert describe(tmp_path / "out") == describe(src)
        assert db.check(read_data=True).ok


def count_snapshot_gets(monkeypatch: Any, remote_class: type) -> Any:
    """Count the snapshot objects ``remote_class`` serves from now on; returns the counter to call."""
    served = []
    real = remote_class.get

    def get(self: Any, key: str, *a: Any) -> bytes:
        if key.startswith("snapshots/"):
            served.append(key)
        return real(self, key, *a)

    monkeypatch.setattr(remote_class, "get", get)
    return lambda: len(served)
