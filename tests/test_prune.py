"""Prune frees what no snapshot needs and nothing else, and survives interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chunkvault import Repository
from chunkvault.errors import Locked
from chunkvault.store.locks import SHARED, RepoLock
from chunkvault.store.pack import PackEntry
from chunkvault.store.prune import select_packs
from treeutil import describe


def du(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_history(tmp_path, new_repo, n=5):
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"), pack_size=128 * 1024)
    states = {}
    for i in range(n):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
        if i:
            os.remove(src / f"f{i - 1}")
        snap = repo.backup([str(src)]).snapshot
        states[snap.id] = describe(src)
    return repo, states


def test_forget_then_prune_frees_space_and_keeps_the_rest(tmp_path, new_repo):
    repo, states = build_history(tmp_path, new_repo)
    ids = list(states)
    repo.forget(ids[:3])
    before = du(tmp_path / "repo" / "data")
    dry = repo.prune(dry_run=True)
    assert dry.freed_bytes > 0 and du(tmp_path / "repo" / "data") == before
    plan = repo.prune()
    after = du(tmp_path / "repo" / "data")
    assert before - after >= 0.9 * dry.freed_bytes
    assert after < before * 0.6  # three of five files' data went
    assert repo.check(read_data=True).ok
    for sid in ids[3:]:
        out = tmp_path / f"out-{sid[:8]}"
        repo.restore(sid, str(out))
        assert describe(out) == states[sid]
    assert plan.live_blobs > 0
    again = repo.prune(dry_run=True)
    assert not again.delete and not again.repack and not again.orphans


def test_prune_keeps_bases_of_live_deltas(tmp_path, new_repo):
    from test_delta import page_file, touch_pages
    import random

    rnd = random.Random(9)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 512, rnd)
    repo = new_repo(pack_size=256 * 1024)
    first = repo.backup([str(src)]).snapshot
    touch_pages(src / "table", 0.9, rnd)
    second = repo.backup([str(src)]).snapshot
    assert second.stats["delta_blobs"] > 0
    expected = describe(src)
    repo.forget([first.id])  # the full goes; its chunks are the bases of second's deltas
    repo.prune(max_unused=0.0)
    assert repo.check(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(second.id, str(out))
    assert describe(out) == expected


def test_select_packs_is_exact():
    def entry(i, length=10):
        return PackEntry(bytes([i]) * 32, 1, 0, length, length)

    packs = {b"\x01" * 32: [entry(1), entry(2)], b"\x02" * 32: [entry(3)], b"\x03" * 32: [entry(4), entry(1)]}
    plan = select_packs(packs, {}, {bytes([1]) * 32, bytes([4]) * 32}, max_unused=0.3)
    assert [p.pack_id for p in plan.repack] == [b"\x01" * 32, b"\x03" * 32]  # half unused each
    assert [p.pack_id for p in plan.delete] == [b"\x02" * 32]
    assert plan.live_blobs == 2 and plan.unused_blobs == 3


def test_prune_refuses_while_a_backup_runs(tmp_path, new_repo):
    repo, _ = build_history(tmp_path, new_repo, 2)
    with RepoLock(repo.store.remote, SHARED, "backup"):
        with pytest.raises(Locked) as info:
            repo.prune()
        assert "backup" in str(info.value)
    repo.prune()


def test_killed_prune_leaves_a_restorable_repository(tmp_path, new_repo, password):
    """SIGKILL prune at several moments; after each, every snapshot restores and a rerun finishes."""
    repo, states = build_history(tmp_path, new_repo, 6)
    ids = list(states)
    repo.forget(ids[:4])
    repo_dir = str(tmp_path / "repo")
    env = {**os.environ, "CHUNKVAULT_PASSWORD": password}
    for delay in (0.15, 0.3, 0.5):
        proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "prune", "-r", repo_dir, "-q",
                                 "--max-unused", "0"], env=env, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        r = Repository.open(repo_dir, password)
        for sid in ids[4:]:
            out = tmp_path / f"out-{delay}-{sid[:8]}"
            r.restore(sid, str(out))
            assert describe(out) == states[sid]
    r = Repository.open(repo_dir, password)
    r.prune(max_unused=0.0)
    assert r.check(read_data=True).ok
    assert not r.prune(dry_run=True).orphans


def test_cli_prune_json(tmp_path, new_repo, cli):
    repo, states = build_history(tmp_path, new_repo, 3)
    out = json.loads(cli("forget", "-r", str(tmp_path / "repo"), list(states)[0], "--prune", "--json").stdout)
    assert out["decisions"]
    plan = json.loads(cli("prune", "-r", str(tmp_path / "repo"), "--dry-run", "--json").stdout)
    assert plan["dry_run"] and plan["freed_bytes"] == 0


def test_prune_deletes_unindexed_packs_before_it_writes(tmp_path, new_repo):
    """On a full disk the packs of failed backups must go first, so the new index has room."""
    from chunkvault.store.repository import pack_key

    repo, states = build_history(tmp_path, new_repo, n=3)
    repo.forget(list(states)[:1])
    remote = repo.store.remote
    orphan = pack_key(os.urandom(32))
    remote.put(orphan, os.urandom(1000))
    calls = []
    for op in ("put", "delete"):
        def record(key, *args, _op=op, _inner=getattr(remote, op), **kw):
            calls.append((_op, key))
            return _inner(key, *args, **kw)
        setattr(remote, op, record)
    plan = repo.prune()
    assert [k for k, _ in plan.orphans] == [orphan]
    first_write = next(i for i, (op, key) in enumerate(calls) if op == "put" and not key.startswith("locks/"))
    assert calls.index(("delete", orphan)) < first_write
    assert repo.check(read_data=True).ok


def test_add_bases_keeps_whole_chains_and_names_a_base_in_no_index():
    from chunkvault.errors import CorruptObject
    from chunkvault.store.blob import KIND_DELTA, KIND_ZSTD
    from chunkvault.store.pack import PackEntry
    from chunkvault.store.prune import add_bases

    a, b, c, d, x = (bytes([i]) * 32 for i in range(5))
    known = {a: PackEntry(a, KIND_ZSTD, 0, 10, 100), b: PackEntry(b, KIND_DELTA, 10, 5, 100, a),
             c: PackEntry(c, KIND_DELTA, 15, 5, 100, b), d: PackEntry(d, KIND_ZSTD, 20, 10, 100)}
    used = {c, d}
    add_bases(used, known)
    assert used == {a, b, c, d}
    known[x] = PackEntry(x, KIND_DELTA, 30, 5, 100, bytes([9]) * 32)
    with pytest.raises(CorruptObject, match="its delta base 0909.* is in no index") as info:
        add_bases({x}, known)
    assert x.hex() in str(info.value)
