"""Forgetting any set of snapshots leaves every kept one restoring exactly as before."""
import json
import os
import random
import re
import shutil
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.store.retention import RetentionPolicy
from conftest import PASSWORD
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


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_aggregate_s_dry_run_is_what_it_then_does(tmp_path_factory, history, data):
    """A series of aggregates, each planned first: the plan changes nothing and is what the run then does."""
    repo_dir, ids, trees = history
    work = tmp_path_factory.mktemp("aggregate") / "repo"
    shutil.copytree(repo_dir, work)
    repo = Repository.open(str(work), PW, ledger=False)
    for _ in range(data.draw(st.integers(1, 3))):
        left = [s.id for s in repo.snapshots()]
        sid, retire = data.draw(st.sampled_from(left)), data.draw(st.booleans())
        before = sorted((p.relative_to(work), p.read_bytes()) for p in work.rglob("*") if p.is_file())
        plan = repo.aggregate(sid, retire=retire, dry_run=True)
        assert sorted((p.relative_to(work), p.read_bytes()) for p in work.rglob("*") if p.is_file()) == before
        done = repo.aggregate(sid, retire=retire)
        assert plan.dry_run and not done.dry_run
        assert (plan.retired, plan.rebases, plan.made_full, plan.warnings) == \
            (done.retired, done.rebases, done.made_full, done.warnings)
        planned, saved = plan.snapshot, repo.snapshot(sid)
        assert (planned.kind, planned.parent, planned.time, planned.stats.get("former_chain")) == \
            (saved.kind, saved.parent, saved.time, saved.stats.get("former_chain"))
        assert sorted(s.id for s in repo.snapshots()) == sorted(set(left) - set(done.retired))
    for s in repo.snapshots():
        assert tree_of(repo, s.id) == trees[s.id], s.id
    assert repo.check().ok


def backups_of_a_growing_tree(tmp_path, repo, n, kind=lambda i: "auto"):
    """``n`` backups, a file added before each: each snapshot's id -> the tree it holds."""
    src = tmp_path / "src"
    src.mkdir()
    states = {}
    for i in range(n):
        (src / f"f{i}").write_bytes(os.urandom(1000))
        states[repo.backup([str(src)], kind=kind(i)).snapshot.id] = describe(src)
    return states


def deletions_stopped_after(monkeypatch, count):
    """Snapshot deletions that stop (Ctrl-C) once ``count`` went; the ids deleted."""
    from chunkvault.store.repository import Repo

    real = Repo.delete_snapshot
    deleted = []

    def delete_then_stop(self, sid):
        if len(deleted) == count:
            raise KeyboardInterrupt
        deleted.append(sid)
        real(self, sid)

    monkeypatch.setattr(Repo, "delete_snapshot", delete_then_stop)
    return deleted


def full_then_diffs(i):
    return "full" if i == 0 else "diff"


def test_forget_by_policy_and_restore(tmp_path, new_repo):
    repo = new_repo()
    states = backups_of_a_growing_tree(tmp_path, repo, 6)
    dry = repo.forget(policy=RetentionPolicy(keep_last=2), dry_run=True)
    assert len(dry.remove) == 4 and len(repo.snapshots()) == 6
    repo.forget(policy=RetentionPolicy(keep_last=2))
    left = repo.snapshots()
    assert len(left) == 2 and left[0].kind == "full"  # the older kept diff absorbed its removed chain
    for s in left:
        out = tmp_path / f"out-{s.id[:8]}"
        repo.restore(s.id, str(out))
        assert describe(out) == states[s.id]


def test_counted_fulls_and_diffs_remove_nothing_more_when_run_again(tmp_path, new_repo, cli):
    """``--keep-full 1 --keep-diff 2`` over full, diff, diff, full, diff keeps the second chain: the first
    chain's newest differential is not kept past its full (rebased into a full, a second run would
    remove it); run again, the rules remove nothing, and what is kept restores."""
    repo = new_repo(str(tmp_path / "repo"))
    states = backups_of_a_growing_tree(tmp_path, repo, 5, kind=lambda i: "full" if i in (0, 3) else "diff")
    ids = [s.id for s in sorted(repo.snapshots(), key=lambda s: s.time)]
    args = ("forget", "-r", str(tmp_path / "repo"), "--keep-full", "1", "--keep-diff", "2")
    first = cli(*args).stdout.decode()
    assert "removed 3 snapshot(s), rebased 0" in first and "full #1" in first and "diff #1" in first
    assert sorted(s.id for s in repo.snapshots()) == sorted(ids[3:])
    assert "removed 0 snapshot(s)" in cli(*args).stdout.decode()
    for sid in ids[3:]:
        out = tmp_path / f"out-{sid[:8]}"
        repo.restore(sid, str(out))
        assert describe(out) == states[sid]


def test_differentials_kept_by_their_tier_keep_it_when_rebased_into_a_full(tmp_path, new_repo, cli):
    """``--keep-diff-within 1h`` alone over full, diff, diff: the full goes, the first differential absorbs it
    and is a full; it was taken as a differential and keeps that tier, so the same forget run again removes
    nothing (it used to remove the promoted one, and rebase the next onto nothing)."""
    repo = new_repo(str(tmp_path / "repo"))
    states = backups_of_a_growing_tree(tmp_path, repo, 3, kind=lambda i: "full" if i == 0 else "diff")
    ids = [s.id for s in sorted(repo.snapshots(), key=lambda s: s.time)]
    args = ("forget", "-r", str(tmp_path / "repo"), "--keep-diff-within", "1h", "--json")
    first = json.loads(cli(*args).stdout)
    assert [d["id"] for d in first["decisions"] if not d["keep"]] == [ids[0]]
    assert {s.id: s.kind for s in repo.snapshots()} == {ids[1]: "full", ids[2]: "diff"}
    again = json.loads(cli(*args).stdout)
    assert all(d["keep"] for d in again["decisions"]) and not again["rebased"]
    for sid in ids[1:]:
        out = tmp_path / f"out-{sid[:8]}"
        repo.restore(sid, str(out))
        assert describe(out) == states[sid]
    assert repo.aggregate(ids[2]).snapshot.kind == "full"  # made a full on purpose: a full's tier from then on
    assert [d["id"] for d in json.loads(cli(*args).stdout)["decisions"] if not d["keep"]] == [ids[2]]


def test_counted_differentials_of_a_full_a_filter_leaves_out(tmp_path, new_repo, cli):
    """``forget --tag hourly --keep-diff 2`` where the full is tagged daily: the two newest differentials
    on it stay (the full, outside the filter, stays too); before, none counted and the forget was refused
    as removing them all."""
    repo = new_repo(str(tmp_path / "repo"))
    backups_of_a_growing_tree(tmp_path, repo, 5, kind=lambda i: "full" if i == 0 else "diff")
    ids = [s.id for s in sorted(repo.snapshots(), key=lambda s: s.time)]
    repo.tag(ids[:1], add=["daily"])
    repo.tag(ids[1:], add=["hourly"])
    args = ("forget", "-r", str(tmp_path / "repo"), "--tag", "hourly", "--keep-diff", "2")
    assert "removed 2 snapshot(s)" in cli(*args).stdout.decode()
    assert sorted(s.id for s in repo.snapshots()) == sorted([ids[0], *ids[3:]])
    assert "removed 0 snapshot(s)" in cli(*args).stdout.decode()


def test_forget_needs_something(new_repo):
    with pytest.raises(UsageError):
        new_repo().forget()


def test_ids_and_a_policy_together_are_refused(tmp_path, new_repo):
    """The ids were dropped and the policy applied to every snapshot: `forget ID --keep-last 10` kept ID, and
    `forget --keep-last 1 ID` removed snapshots never named."""
    repo = new_repo()
    backups_of_a_growing_tree(tmp_path, repo, 3)
    first = repo.snapshots()[0]
    with pytest.raises(UsageError, match="snapshot ids or a retention policy"):
        repo.forget([first.id], policy=RetentionPolicy(keep_last=1))
    assert len(repo.snapshots()) == 3


def test_a_forget_by_id_run_again_removes_what_is_left_of_its_list(tmp_path, new_repo):
    """Stopped after some deletions, run again with the same ids: one already gone stopped it (exit 12), and
    none of the others went."""
    from chunkvault.errors import RepositoryStateWarning, SnapshotNotFound

    repo = new_repo()
    backups_of_a_growing_tree(tmp_path, repo, 3)
    a, b, c = (s.id for s in repo.snapshots())
    repo.forget([c])
    with pytest.warns(RepositoryStateWarning, match=f"no snapshot '{c[:12]}'.*left out \\(forgotten already\\?\\)"):
        plan = repo.forget([c[:12], b])
    assert plan.remove == [b] and [s.id for s in repo.snapshots()] == [a]
    with pytest.warns(RepositoryStateWarning, match="forgotten already"):  # all gone, forgotten here: run again
        assert repo.forget([b, c[:12]]).remove == []
    with pytest.raises(SnapshotNotFound, match="0123abcd"):  # one never there: mistyped, and named
        repo.forget([b, "0123abcd"])


def test_forget_prune_run_again_after_its_snapshots_went_still_prunes(tmp_path, new_repo, cli):
    """Killed between its deletions and its prune, run again: every id was gone (exit 12) and the prune
    never ran."""
    repo = new_repo(str(tmp_path / "repo"))
    backups_of_a_growing_tree(tmp_path, repo, 3)
    first = repo.snapshots()[0].id
    repo.forget([first])  # as the killed run left it
    assert repo.prune(dry_run=True).freed_bytes > 0
    proc = cli("forget", "-r", str(tmp_path / "repo"), first, "--prune")
    assert b"forgotten already" in proc.stderr
    assert repo.prune(dry_run=True).freed_bytes == 0


def test_a_policy_that_would_remove_a_whole_history_is_refused(tmp_path, new_repo, cli):
    """A misspelt --keep-tag would keep nothing: refused, nothing removed, unless asked for in so many words."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    for i in range(3):
        (src / "f").write_bytes(os.urandom(100 + i))
        repo.backup([str(src)], tags=["nightly"] if i == 1 else [])
    typo = RetentionPolicy(keep_tags=(("nigthly",),))
    with pytest.raises(UsageError, match="keeps none of the 3 snapshot"):
        repo.forget(policy=typo)
    assert len(repo.snapshots()) == 3
    url = repo.store.remote.display_url
    proc = cli("forget", "-r", url, "--keep-tag", "nigthly", check=2)
    assert "--unsafe-allow-remove-all" in proc.stderr.decode() and len(repo.snapshots()) == 3
    cli("forget", "-r", url, "--keep-tag", "nigthly", "--unsafe-allow-remove-all")
    assert Repository.open(url, PASSWORD, ledger=False).snapshots() == []


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
    snap = repo.aggregate(ids[3]).snapshot
    assert snap.id == ids[3] and snap.kind == "full" and snap.parent is None
    data_after = sum(p.stat().st_size for p in (tmp_path / "repo0" / "data").rglob("*") if p.is_file())
    assert data_after - data_before < 20_000  # a manifest, no data moved
    for sid, state in states.items():  # every snapshot, including the one built on it, restores as before
        out = tmp_path / f"agg-{sid[:8]}"
        repo.restore(sid, str(out))
        assert describe(out) == state
    done = repo.aggregate(ids[4], retire=True)  # its chain is now ids[3] (a full since the aggregation above)
    assert done.snapshot.id == ids[4] and done.retired == [ids[3]] and done.rebases == []
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
        assert all(d.reasons == ("not selected by the host, tag and path filters",)
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


def _three_backups(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(200_000))  # differentials stay small beside the full
    path = str(tmp_path / "repo")
    with Repository.init(path, PW, kdf_seconds=0, ledger=False) as repo:
        for i in range(3):
            (src / "f").write_bytes(os.urandom(100 + i))
            if i == 1:  # a change the next differential does not repeat: a rebase writes a new manifest
                (src / "g").write_bytes(os.urandom(50))
            repo.backup([str(src)])
        snaps = repo.snapshots()
    assert [s.parent for s in snaps] == [None, snaps[0].id, snaps[1].id]
    return path, src, snaps


def test_forget_waits_for_a_backup_that_builds_on_what_it_would_remove(tmp_path, monkeypatch):
    """A backup that chose its parent holds its lock until its snapshot is saved: a forget of that
    parent meanwhile is refused (or waits), never leaving the new differential without its parent."""
    import threading

    from chunkvault.errors import Locked
    from chunkvault.store import backup as backup_module

    path, src, (full, d1, d2) = _three_backups(tmp_path)
    records, chosen, go = backup_module.Backup.records, threading.Event(), threading.Event()

    def paused(self, *args, **kwargs):
        chosen.set()
        go.wait(30)
        yield from records(self, *args, **kwargs)

    monkeypatch.setattr(backup_module.Backup, "records", paused)
    (src / "f").write_bytes(b"new")
    made = {}

    def backup():
        with Repository.open(path, PW, ledger=False) as repo:
            made["snap"] = repo.backup([str(src)]).snapshot

    worker = threading.Thread(target=backup)
    worker.start()
    assert chosen.wait(30)
    with Repository.open(path, PW, ledger=False) as repo:
        with pytest.raises(Locked, match="locked by backup"):
            repo.forget([d2.id], wait=0)
    go.set()
    worker.join()
    assert made["snap"].parent == d2.id
    with Repository.open(path, PW, ledger=False) as repo:
        repo.forget([d2.id], wait=0)  # now it is rebased first
        assert repo.check(read_data=True).ok
        assert {e.path: e.size for e in repo.tree(made["snap"].id)}[b"f"] == 3


def test_forget_plans_from_the_snapshots_as_they_are_under_its_lock(tmp_path):
    """Listed before another forget rebased a differential, a forget still plans from the rebased one."""
    path, src, (full, d1, d2) = _three_backups(tmp_path)
    early = Repository.open(path, PW, ledger=False)
    assert len(early.snapshots()) == 3
    with Repository.open(path, PW, ledger=False) as other:
        other.forget([d1.id])  # d2 now builds on the full
    plan = early.forget([full.id])
    assert [(r.diff_id, r.new_parent) for r in plan.rebases] == [(d2.id, None)]
    early.close()
    with Repository.open(path, PW, ledger=False) as repo:
        (only,) = repo.snapshots()
        assert (only.id, only.kind, only.parent) == (d2.id, "full", None)
        assert repo.check(read_data=True).ok


def test_prune_keeps_what_a_rebase_wrote_after_it_listed_the_snapshots(tmp_path):
    """A differential rebased by another command between prune's first listing and its lock points at
    new manifest blobs: prune reads the snapshots again under its lock and keeps them."""
    path, src, (full, d1, d2) = _three_backups(tmp_path)
    early = Repository.open(path, PW, ledger=False)
    assert len(early.snapshots()) == 3
    with Repository.open(path, PW, ledger=False) as other:
        other.forget([d1.id])
    early.prune(max_unused=0.0)
    early.close()
    with Repository.open(path, PW, ledger=False) as repo:
        assert [s.id for s in repo.snapshots()] == [full.id, d2.id]
        assert repo.check(read_data=True).ok
        repo.restore(d2.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()


def test_a_long_open_repository_backs_up_onto_the_chain_another_client_rebased(tmp_path):
    """A tool keeps one Repository open between hourly backups; meanwhile another client forgets a
    differential and prune removes its manifest.  The next backup builds on the rebased chain as it is
    now (not on snapshot objects read before), with no warning about damage."""
    path, src, (full, d1, d2) = _three_backups(tmp_path)
    tool = Repository.open(path, PW, ledger=False)
    assert [s.parent for s in tool.snapshots()] == [None, full.id, d1.id]
    with Repository.open(path, PW, ledger=False) as other:
        other.forget([d1.id])
        other.prune(max_unused=0)
    (src / "f").write_bytes(b"hour four")
    result = tool.backup([str(src)])
    tool.close()
    assert result.snapshot.kind == "diff" and result.snapshot.parent == d2.id
    assert result.warnings == []
    with Repository.open(path, PW, ledger=False) as repo:
        assert repo.check(read_data=True).ok
        repo.restore(result.snapshot.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == b"hour four"


def test_a_repository_held_open_lists_snapshots_another_client_rebased_as_they_are_now(tmp_path, new_repo):
    """It listed the differential with a parent that was gone, until some read dropped its cache."""
    from chunkvault import Repository
    from conftest import PASSWORD

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one")
    held = new_repo(str(tmp_path / "repo"))
    full = held.backup([str(src)]).snapshot
    (src / "f").write_bytes(b"two")
    diff = held.backup([str(src)]).snapshot
    assert {s.id: s.kind for s in held.snapshots()} == {full.id: "full", diff.id: "diff"}
    with Repository.open(str(tmp_path / "repo"), PASSWORD) as other:
        other.forget([full.id])
    (now,) = held.snapshots()
    assert (now.id, now.kind, now.parent) == (diff.id, "full", None)
    assert held.snapshot("latest").kind == "full"


def test_a_rebased_differential_counts_its_new_manifest_and_the_data_it_absorbed(tmp_path, new_repo):
    """Rebases added the new manifest's size to the old one's, rebase after rebase, while the data of the
    merged differentials, now its chain's, counted nowhere: ``--type auto`` weighed neither as it is."""
    from chunkvault.store.backup import choose_kind

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(2000))
    repo = new_repo(str(tmp_path / "repo"))
    snaps = [repo.backup([str(src)], kind="full").snapshot]
    for n in range(4):
        for i in range(40):
            (src / f"f{i}").write_bytes(os.urandom(2000))
        snaps.append(repo.backup([str(src)], kind="diff").snapshot)
    added = {s.id: s.stats["added_stored_bytes"] for s in snaps}
    for gone in snaps[1:4]:  # the second-newest, three times over
        repo.forget([gone.id])
    (last,) = [s for s in repo.snapshots() if s.id == snaps[4].id]
    stored = sum(repo.store.locate(bytes.fromhex(h)).length for h in last.manifest)
    assert last.stats["manifest_bytes"] == stored
    assert last.stats["absorbed_stored_bytes"] == sum(added[s.id] for s in snaps[1:4])
    chain = repo.store.chain_of(last, repo.snapshots())
    assert chain[0].id == snaps[0].id and len(chain) == 2
    full_bytes = chain[0].stats["bytes"]
    weighed = last.stats["added_stored_bytes"] + last.stats["absorbed_stored_bytes"] + stored
    assert choose_kind("auto", chain, 100, (weighed - 1) / full_bytes) == "full"
    assert choose_kind("auto", chain, 100, (weighed + 1) / full_bytes) == "diff"


@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_a_forget_stopped_between_deletions_leaves_every_chain_whole(tmp_path, new_repo, monkeypatch, stop_after):
    """Snapshots go newest first along each chain: a forget stopped between two deletions (killed, its lock
    lost, the remote failing) leaves no differential whose parent is gone, and run again it finishes."""
    repo = new_repo()
    states = backups_of_a_growing_tree(tmp_path, repo, 5, full_then_diffs)
    deleted = deletions_stopped_after(monkeypatch, stop_after)
    policy = RetentionPolicy(keep_last=1)
    with pytest.raises(KeyboardInterrupt):
        repo.forget(policy=policy)
    monkeypatch.undo()
    repo = Repository.open(str(tmp_path / "repo0"), PASSWORD)
    assert repo.check().ok
    for s in repo.snapshots():
        out = tmp_path / f"out-{s.id[:8]}-{len(deleted)}"
        repo.restore(s.id, str(out))
        assert describe(out) == states[s.id]
    repo.forget(policy=policy)
    (kept,) = repo.snapshots()
    assert kept.id == list(states)[-1] and repo.check().ok


def test_an_aggregate_stopped_before_it_retired_the_chain_retires_it_when_run_again(tmp_path, new_repo, monkeypatch):
    """Stopped once the snapshot was saved as a full, before the chain it replaced was forgotten: run
    again, it forgets what is left of that chain, where it said "0 snapshot(s) removed" and left it."""
    repo = new_repo()
    states = backups_of_a_growing_tree(tmp_path, repo, 3, full_then_diffs)
    ids = list(states)
    deleted = deletions_stopped_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        repo.aggregate(ids[-1], retire=True)
    monkeypatch.undo()
    repo = Repository.open(str(tmp_path / "repo0"), PASSWORD)
    assert len(repo.snapshots()) == 2 and repo.check().ok
    done = repo.aggregate(ids[-1], retire=True)
    assert sorted(done.retired) == sorted(set(ids[:-1]) - set(deleted))
    (left,) = repo.snapshots()
    assert left.id == ids[-1] and left.kind == "full"
    repo.restore(left.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == states[ids[-1]] and repo.check().ok


def test_forget_prune_reports_the_forget_when_the_prune_then_fails(tmp_path, cli):
    """The forget is done before the prune: a failing prune printed only its own error (or, with --json,
    only an error document), and a caller took the snapshots for still there."""
    import json

    repo, src = str(tmp_path / "repo"), tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    cli("init", "-r", repo, "--kdf-time", "0")
    ids = {}
    for host in ("A", "B", "C"):
        ids[host] = json.loads(cli("backup", "-r", repo, str(src), "--host", host, "--json").stdout)["id"]
    damaged = tmp_path / "repo" / "snapshots" / ids["A"]  # prune needs every snapshot: it refuses (13)
    raw = bytearray(damaged.read_bytes())
    raw[40] ^= 1
    damaged.write_bytes(bytes(raw))
    out = cli("forget", "-r", repo, ids["B"][:8], "--prune", "--json", check=13)
    doc = json.loads(out.stdout)
    assert [d["id"] for d in doc["decisions"] if not d["keep"]] == [ids["B"]]
    assert all(datetime.fromisoformat(d["time"]).tzinfo is not None for d in doc["decisions"])
    assert doc["prune"] is None and "prune needs every snapshot" in doc["prune_error"]
    assert "the forget was done (1 snapshot(s) removed)" in out.stderr.decode()
    listed = {s["id"] for s in json.loads(cli("snapshots", "-r", repo, "--json").stdout)}
    assert listed == {ids["C"]}  # A unreadable, B forgotten
    text = cli("forget", "-r", repo, ids["C"][:8], "--prune", check=13).stdout.decode().splitlines()
    assert len(text) == 2 and text[1] == "removed 1 snapshot(s), rebased 0"
    # local time, with its UTC offset in the hour the end of summer time repeats (as the listing shows it)
    assert re.fullmatch(rf"remove  {ids['C'][:8]}  \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d([+-]\d\d:\d\d)?  named on the "
                        "command line", text[0])


def test_a_dry_run_of_forget_with_prune_runs_no_prune_plan_of_the_snapshots_still_there(tmp_path, cli):
    """It said "a prune then frees about 5.7 MiB", then "prune would delete 0 pack(s), frees 0 B": the prune's
    plan was made with the snapshots to forget still there."""
    import json

    repo, src = str(tmp_path / "repo"), tmp_path / "src"
    src.mkdir()
    cli("init", "-r", repo, "--kdf-time", "0")
    for i in range(2):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
        cli("backup", "-r", repo, str(src), "--type", "full")
        os.remove(src / f"f{i}")
    doc = json.loads(cli("forget", "-r", repo, "--keep-last", "1", "--prune", "--dry-run", "--json").stdout)
    assert doc["prune"] is None and doc["frees_stored_bytes"] >= 300_000
    text = cli("forget", "-r", repo, "--keep-last", "1", "--prune", "--dry-run").stdout.decode()
    assert "a prune then frees about" in text and "prune would" not in text


def test_retention_counts_days_in_local_time_as_restic_does(tmp_path, new_repo, monkeypatch):
    """Days were UTC's, whatever the machine's zone (and a policy file's `timezone`)."""
    import time
    from datetime import datetime, timezone

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        repo = new_repo()
        src = tmp_path / "src"
        src.mkdir()
        ids = []
        for at in ("2026-11-30T21:00:00+00:00", "2026-11-30T22:00:00+00:00", "2026-11-30T23:30:00+00:00"):
            (src / "f").write_text(at)  # Berlin: 22:00 and 23:00 on the 30th, 00:30 on 1 December
            ids.append(repo.backup([str(src)], time=at, kind="full").snapshot.id)
        now = datetime(2026, 12, 2, tzinfo=timezone.utc)
        plan = repo.forget(policy=RetentionPolicy(keep_daily=2), now=now, dry_run=True)
        assert plan.remove == [ids[0]]
        utc = repo.forget(policy=RetentionPolicy(keep_daily=2), now=now, dry_run=True, tz=timezone.utc)
        assert utc.remove == [ids[1]]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_dry_run_forget_of_a_snapshot_whose_manifest_is_damaged_shows_its_plan(tmp_path, new_repo, cli):
    """What `repair snapshots` says to forget, previewed: the estimate of what a prune frees reads the
    manifest, and its damage failed the whole dry run (exit 13, no plan)."""
    from test_damaged_storage import damage_blob

    repo = new_repo(str(tmp_path / "repo"))
    backups_of_a_growing_tree(tmp_path, repo, 3)
    middle = repo.snapshots()[1]
    repo.store.load_index()
    damage_blob(tmp_path / "repo", repo, bytes.fromhex(middle.manifest[0]))
    proc = cli("forget", "-r", str(tmp_path / "repo"), middle.id, "--dry-run")
    assert re.search(rf"^remove  {middle.id[:8]}  \S+ \S+  named on the command line$", proc.stdout.decode(), re.M)
    assert b"what a prune then frees is left out" in proc.stderr


def test_a_forget_lists_the_packs_once_whatever_the_rebases(tmp_path, new_repo):
    """Each rebase stored its manifest with a writer of its own, and each writer that found a manifest blob
    stored already listed every pack (to see the one it refers to is still there): a forget of a year of
    hourly snapshots listed data/ 83 times, on S3 a request per thousand packs each time."""
    from chunkvault.remotes.local import LocalRemote
    from faults import FaultyRemote

    class ListingsCounted(FaultyRemote):
        def __init__(self, inner):
            super().__init__(inner, seed=0)
            self.prefixes = []

        def list(self, prefix=""):
            self.prefixes.append(prefix)
            return super().list(prefix)

    src = tmp_path / "src"
    src.mkdir()
    path = str(tmp_path / "repo")
    new_repo(path)
    remote = ListingsCounted(LocalRemote(path))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        snaps = []
        for i in range(9):  # a rebased differential's manifest is its own: found stored already
            (src / "f").write_text(f"version {i}")
            snaps.append(repo.backup([str(src)], kind="full" if i == 0 else "diff").snapshot)
        kept = {s.id: tree_of(repo, s.id) for s in snaps[::2]}
        remote.prefixes.clear()
        plan = repo.forget([s.id for s in snaps[1::2]])
        assert len(plan.rebases) == 4
        assert remote.prefixes.count("data/") <= 1, remote.prefixes
        assert {s.id: tree_of(repo, s.id) for s in repo.snapshots()} == kept
        assert repo.check().ok


def test_aggregate_retire_leaves_another_host_s_broken_chain_as_forget_does(tmp_path, new_repo):
    """A differential built on an unreadable snapshot, in a chain of its own, is nothing an aggregate's
    retire rebases: it failed on it with the aggregate done and the chain kept, and so did each run again,
    where a forget of the same ids leaves it be."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    states, other = {}, []
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(20_000))
        states[repo.backup([str(src)], host="a", kind="diff").snapshot.id] = describe(src)
        other.append(repo.backup([str(src)], host="b", kind="diff").snapshot.id)
    damaged = tmp_path / "repo0" / "snapshots" / other[0]
    raw = bytearray(damaged.read_bytes())
    raw[40] ^= 1
    damaged.write_bytes(bytes(raw))
    ids = list(states)
    repo = Repository.open(str(tmp_path / "repo0"), PASSWORD)
    done = repo.aggregate(ids[-1], retire=True)
    assert sorted(done.retired) == sorted(ids[:-1]) and done.rebases == []
    assert {s.id for s in repo.snapshots()} == {ids[-1], *other[1:]}
    repo.restore(ids[-1], str(tmp_path / "out"))
    assert describe(tmp_path / "out") == states[ids[-1]]


def test_aggregate_retire_refuses_as_forget_does_while_a_newer_chunkvault_s_snapshot_is_there(tmp_path, new_repo):
    """A snapshot a newer chunkvault wrote may be a differential on the chain a retire forgets, and cannot
    be rebased: forget refuses (exit 17), where the retire deleted its parents, leaving it nothing to build on."""
    from chunkvault.errors import NewerObject
    from chunkvault.store.snapshot import SNAPSHOT_VERSION

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    ids = []
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(1000))
        ids.append(repo.backup([str(src)], kind="diff").snapshot.id)
    newer = repo.backup([str(src)], kind="diff", parent=ids[1]).snapshot.id
    store = Repository.open(str(tmp_path / "repo0"), PASSWORD, ledger=False).store
    snap = store.load_snapshot(newer)
    snap.version = SNAPSHOT_VERSION + 1
    store.save_snapshot(snap, replace=True)
    repo = Repository.open(str(tmp_path / "repo0"), PASSWORD)
    with pytest.raises(NewerObject, match="newer chunkvault"):
        repo.aggregate(ids[2], retire=True)
    assert set(store.snapshot_names()) == {*ids, newer}
    assert repo.aggregate(ids[2]).snapshot.kind == "full"  # without --retire nothing goes: it is made


def test_aggregate_retire_forgets_the_differentials_of_its_former_chain_built_on_a_damaged_one(tmp_path, new_repo):
    """Its former chain's differentials above a snapshot that no longer loads restore nothing, and were
    left behind by a retire that said the chain was retired; they go, by id, as a forget naming them does."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    ids = []
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(1000))
        ids.append(repo.backup([str(src)], kind="diff").snapshot.id)
    repo.aggregate(ids[-1])
    damaged = tmp_path / "repo0" / "snapshots" / ids[1]
    raw = bytearray(damaged.read_bytes())
    raw[40] ^= 1
    damaged.write_bytes(bytes(raw))
    repo = Repository.open(str(tmp_path / "repo0"), PASSWORD)
    done = repo.aggregate(ids[-1], retire=True)
    assert sorted(done.retired) == sorted([ids[0], ids[2], ids[3]])
    assert [s.id for s in repo.snapshots()] == [ids[-1]]
