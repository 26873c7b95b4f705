"""Crash consistency: SIGKILL at random moments, and the debris a power loss leaves.

The kill series run the real CLI in a subprocess on a changing tree (see
crashkit.py).  CHUNKVAULT_CRASH_RUNS sets how many kills each series makes
(default 20); bench/reliability.py runs the long variant.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

import crashkit
from chunkvault.errors import CorruptObject, MissingObject
from chunkvault.store.indexfile import IndexData
from chunkvault.store.pack import PackEntry
from treeutil import describe

RUNS = int(os.environ.get("CHUNKVAULT_CRASH_RUNS", "20"))
SEED = int(os.environ.get("CHUNKVAULT_CRASH_SEED", "20261128"))


def _report(fig: crashkit.Figures) -> None:
    print(fig.summary())


@pytest.mark.slow
def test_backup_survives_repeated_sigkill(tmp_path):
    fig = crashkit.crash_backup_series(str(tmp_path), RUNS, SEED)
    _report(fig)
    assert fig.runs == RUNS and fig.recoveries == RUNS
    assert fig.kills >= 1, "the kill delays no longer span the run: every backup finished first"
    assert fig.effective_kills >= 1, "no kill landed while data was being written"


@pytest.mark.slow
def test_prune_survives_repeated_sigkill(tmp_path):
    fig = crashkit.crash_prune_series(str(tmp_path), RUNS, SEED + 1)
    _report(fig)
    assert fig.runs == RUNS and fig.recoveries == RUNS
    assert fig.kills >= 1
    assert fig.effective_kills >= 1, "no kill landed while prune was changing the repository"


def _copy_available() -> bool:
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "copy", "--help"], capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _copy_available(), reason="this chunkvault has no `copy` command")
def test_copy_survives_repeated_sigkill(tmp_path):
    fig = crashkit.crash_copy_series(str(tmp_path), RUNS, SEED + 2)
    _report(fig)
    assert fig.runs == RUNS and fig.recoveries == RUNS
    assert fig.kills >= 1
    assert fig.effective_kills >= 1


# --- power loss: the debris an interrupted write can leave ----------------------------------


@pytest.fixture
def history(tmp_path):
    """A repository with two snapshots of a changing tree, and their recorded states."""
    src = tmp_path / "src"
    repo_path = str(tmp_path / "repo")
    crashkit.init_repo(repo_path, compression=3)
    tree = crashkit.SourceTree(str(src), random.Random(5), target_bytes=1 << 20)
    states = {}
    with crashkit.open_repo(repo_path) as repo:
        for _ in range(2):
            states[repo.backup([str(src)]).snapshot.id] = tree.state()
            tree.mutate()
    return repo_path, states


def _restores_exactly(repo_path, states, scratch):
    crashkit.verify_restores(repo_path, states, str(scratch), crashkit.Figures("power-loss"))


def _plant_temp_files(repo_path: str) -> list[str]:
    """Unfinished writes in every folder: empty, half a real object, random bytes."""
    rng = random.Random(9)
    planted = []
    objects = sorted(crashkit.object_listing(repo_path))
    for i, key in enumerate(k for k in objects if not k.startswith("locks/")):
        folder = os.path.join(repo_path, os.path.dirname(key))
        with open(os.path.join(repo_path, key), "rb") as f:
            data = f.read()
        body = [b"", data[: len(data) // 2], rng.randbytes(300)][i % 3]
        path = os.path.join(folder, f".tmp-{rng.randbytes(8).hex()}")
        with open(path, "wb") as f:
            f.write(body)
        planted.append(path)
    return planted


def test_unfinished_writes_are_never_taken_for_objects(history, tmp_path):
    repo_path, states = history
    planted = _plant_temp_files(repo_path)
    assert len(planted) > 10
    with crashkit.open_repo(repo_path) as repo:
        report = repo.check(read_data=True)
        assert report.ok, report.to_dict()
        assert {s.id for s in repo.snapshots()} == set(states)
        listed = {o.key for prefix in ("data/", "index/", "snapshots/", "keys/") for o in repo.store.remote.list(prefix)}
        assert not any(".tmp-" in k for k in listed)
    _restores_exactly(repo_path, states, tmp_path)
    # the next backup and a prune work around them
    with crashkit.open_repo(repo_path) as repo:
        sid = repo.backup([str(tmp_path / "src")]).snapshot.id
        states[sid] = describe(tmp_path / "src")
        repo.prune()
        assert repo.check(read_data=True).ok
    _restores_exactly(repo_path, states, tmp_path)


def test_prune_removes_leftover_temp_files(history):
    repo_path, _ = history
    planted = _plant_temp_files(repo_path)
    old = 1_600_000_000  # long finished: no live writer owns them
    for p in planted:
        os.utime(p, (old, old))
    with crashkit.open_repo(repo_path) as repo:
        repo.prune()
    assert crashkit.temp_leftovers(repo_path) == []


def test_pack_without_index_is_a_warning_then_repaired_or_pruned(history, tmp_path):
    repo_path, states = history
    with crashkit.open_repo(repo_path) as repo:
        store = repo.store
        store.load_index()
        with store.writer() as writer:  # a backup that uploaded a pack and died before its index
            blob = os.urandom(5000)
            writer.add(store.blob_id(blob), blob)
            writer.flush(write_index=False)
            writer.take_index()  # ...and died: its index never written
    stray = [k for k in crashkit.object_listing(repo_path) if k.startswith("data/")]
    with crashkit.open_repo(repo_path) as repo:
        report = repo.check()
    assert report.ok
    unindexed = [w for w in report.warnings if "in no index" in w]
    assert len(unindexed) == 1 and any(k in unindexed[0] for k in stray)
    _restores_exactly(repo_path, states, tmp_path)
    with crashkit.open_repo(repo_path) as repo:
        repo.repair_index()
        assert store.blob_id(blob) in repo.store.index
        assert not repo.check().warnings
        plan = repo.prune()
        assert plan.unused_blobs >= 1
        assert repo.check(read_data=True).ok and not repo.check().warnings
    _restores_exactly(repo_path, states, tmp_path)


def test_indexed_pack_missing_is_a_problem_naming_it(history, tmp_path):
    repo_path, states = history
    first, second = list(states)
    with crashkit.open_repo(repo_path) as repo:
        needed_by_second = crashkit.tree_blobs(repo.store, repo.snapshot(second))
        needed_by_first = crashkit.tree_blobs(repo.store, repo.snapshot(first))
        index = crashkit.indexed_blobs(repo.store)
    # a pack only the second snapshot needs, lost as if its write never reached the disk
    only_second = {index[b][0][0] for b in needed_by_second - needed_by_first}
    only_second -= {index[b][0][0] for b in needed_by_first}
    victim = sorted(only_second)[0]
    key = f"data/{victim.hex()[:2]}/{victim.hex()}"
    os.remove(os.path.join(repo_path, key))
    with crashkit.open_repo(repo_path) as repo:
        report = repo.check()
        assert not report.ok
        named = [p for p in report.problems if p.object == key]
        assert named and "missing" in named[0].problem and second in named[0].snapshots
        with pytest.raises(MissingObject) as info:
            repo.restore(second, str(tmp_path / "lost"))
        assert key in str(info.value)
        with pytest.raises(CorruptObject) as info:
            repo.prune()
        assert key in str(info.value)
    _restores_exactly(repo_path, {first: states[first]}, tmp_path)


def test_index_naming_a_pack_never_written_is_reported(history, tmp_path):
    repo_path, states = history
    ghost = bytes(range(32))
    with crashkit.open_repo(repo_path) as repo:
        repo.store.write_index(IndexData({ghost: [PackEntry(os.urandom(32), 0, 0, 100, 60)]}))
        report = repo.check()
        key = f"data/{ghost.hex()[:2]}/{ghost.hex()}"
        assert [p.object for p in report.problems] == [key]
        with pytest.raises(CorruptObject) as info:
            repo.prune()
        assert key in str(info.value)
    _restores_exactly(repo_path, states, tmp_path)


def test_snapshot_whose_index_was_lost_fails_loudly_until_repaired(history, tmp_path):
    repo_path, states = history
    for name in os.listdir(os.path.join(repo_path, "index")):
        os.remove(os.path.join(repo_path, "index", name))
    sid = list(states)[-1]
    with crashkit.open_repo(repo_path) as repo:
        assert not repo.check().ok
        with pytest.raises(MissingObject):
            repo.restore(sid, str(tmp_path / "x"))
        repo.repair_index()
        assert repo.check(read_data=True).ok
    _restores_exactly(repo_path, states, tmp_path)
