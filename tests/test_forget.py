"""Forgetting any set of snapshots leaves every kept one restoring exactly as before."""
import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.store.retention import RetentionPolicy
from treeutil import describe

PW = "pw"


def tree_of(repo, snap_id):
    return [(e.path, e.type, e.mode, e.size, e.digest, e.target, e.mtime_ns) for e in repo.tree(snap_id)]


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A repository with two chains (full_every=4) built from random changes."""
    base = tmp_path_factory.mktemp("hist")
    src = base / "src"
    src.mkdir()
    rnd = random.Random(7)
    repo = Repository.init(str(base / "repo"), PW, kdf_seconds=0, full_every=4)
    for step in range(9):
        for _ in range(3):
            name = f"d{rnd.randrange(3)}/f{rnd.randrange(6)}"
            p = src / name
            action = rnd.random()
            if action < 0.2 and p.exists():
                p.unlink()
            elif action < 0.3 and (src / name.split("/")[0]).exists():
                shutil.rmtree(src / name.split("/")[0])
            else:
                p.parent.mkdir(exist_ok=True)
                p.write_bytes(rnd.randbytes(rnd.randrange(0, 5000)))
        repo.backup([str(src)])
    snaps = repo.snapshots()
    assert [s.kind for s in snaps].count("full") >= 2
    trees = {s.id: tree_of(repo, s.id) for s in snaps}
    repo.close()
    return base / "repo", [s.id for s in snaps], trees


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_removals_keep_every_kept_tree(tmp_path_factory, history, data):
    repo_dir, ids, trees = history
    work = tmp_path_factory.mktemp("forget") / "repo"
    shutil.copytree(repo_dir, work)
    remove = data.draw(st.sets(st.sampled_from(ids), min_size=1, max_size=len(ids) - 1))
    repo = Repository.open(str(work), PW, ledger=str(work.parent / "ledger"))  # each copy: a new client
    plan = repo.forget(sorted(remove))
    assert sorted(plan.remove) == sorted(remove)
    left = repo.snapshots()
    assert sorted(s.id for s in left) == sorted(set(ids) - remove)
    for s in left:
        assert tree_of(repo, s.id) == trees[s.id], s.id
    assert repo.check().ok


def test_forget_by_policy_and_restore(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    states = {}
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(1000))
        snap = repo.backup([str(src)]).snapshot
        states[snap.id] = describe(src)
    dry = repo.forget(policy=RetentionPolicy(keep_last=2), dry_run=True)
    assert len(dry.remove) == 4 and len(repo.snapshots()) == 6
    repo.forget(policy=RetentionPolicy(keep_last=2))
    left = repo.snapshots()
    assert len(left) == 2 and left[0].kind == "full"  # the older kept diff absorbed its removed chain
    for s in left:
        out = tmp_path / f"out-{s.id[:8]}"
        repo.restore(s.id, str(out))
        assert describe(out) == states[s.id]


def test_forget_needs_something(new_repo):
    with pytest.raises(UsageError):
        new_repo().forget()


def test_aggregate_makes_a_synthetic_full(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    states = {}
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(50_000))
        if i == 3:
            os.remove(src / "f1")
        states[repo.backup([str(src)]).snapshot.id] = describe(src)
    ids = list(states)
    data_before = sum(p.stat().st_size for p in (tmp_path / "repo0" / "data").rglob("*") if p.is_file())
    snap = repo.aggregate(ids[3])
    assert snap.id == ids[3] and snap.kind == "full" and snap.parent is None
    data_after = sum(p.stat().st_size for p in (tmp_path / "repo0" / "data").rglob("*") if p.is_file())
    assert data_after - data_before < 20_000  # a manifest, no data moved
    for sid, state in states.items():  # every snapshot, including the one built on it, restores as before
        out = tmp_path / f"agg-{sid[:8]}"
        repo.restore(sid, str(out))
        assert describe(out) == state
    repo.aggregate(ids[4], retire=True)  # its chain is now ids[3] (a full since the aggregation above)
    assert [s.id for s in repo.snapshots()] == ids[:3] + ids[4:]
    repo.prune()
    for sid in ids[:3] + ids[4:]:
        out = tmp_path / f"retired-{sid[:8]}"
        repo.restore(sid, str(out))
        assert describe(out) == states[sid]
    assert repo.check(read_data=True).ok


def test_a_policy_applies_to_the_selected_snapshots_and_keeps_the_others(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with Repository.init(str(tmp_path / "repo"), PW, kdf_seconds=0, ledger=False) as repo:
        made = []
        for i in range(6):
            (src / "f").write_bytes(os.urandom(100 + i))
            made.append(repo.backup([str(src)], host="a" if i % 2 else "b", tags=["t"] if i < 3 else []).snapshot)
        trees = {s.id: tree_of(repo, s.id) for s in repo.snapshots()}
        plan = repo.forget(policy=RetentionPolicy(keep_last=1), hosts=["a"], dry_run=True)
        assert [d.snapshot_id for d in plan.decisions if not d.keep] == [made[1].id, made[3].id]
        assert all(d.reasons == ("not selected (--host, --tag, --path)",)
                   for d in plan.decisions if d.snapshot_id in {made[0].id, made[2].id, made[4].id})
        plan = repo.forget(policy=RetentionPolicy(keep_last=1), tags=["t"], hosts=["a", "b"])
        assert plan.remove == [made[0].id]  # the newest tagged one of each host stays
        assert [r.diff_id for r in plan.rebases] == [made[2].id]  # made[0] was its full
        kept = repo.snapshots()
        assert {s.id for s in kept} == {s.id for s in made[1:]}
        for s in kept:  # differentials on forgotten parents were rebased
            assert tree_of(repo, s.id) == trees[s.id]
        with pytest.raises(UsageError, match="select the snapshots a retention policy applies to"):
            repo.forget([made[2].id], hosts=["a"])
