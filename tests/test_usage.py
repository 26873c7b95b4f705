"""stats SNAPSHOT: what snapshots take, and what only they need (store/usage.py)."""
from __future__ import annotations

import json
import random
import shutil

import pytest
from hypothesis import given, settings, strategies as st

import crashkit
from chunkvault.store import chain
from chunkvault.store.blob import KIND_DELTA
from chunkvault.store.usage import bases_of, resolved_trees, with_bases
from chunkvault.store.snapshot import Snapshot
from test_chain import as_records, diffs, full_trees
from test_delta import page_file, touch_pages


def snapshot(sid: str, parent: str | None, t: int) -> Snapshot:
    return Snapshot(time=f"2026-01-01T00:{t // 60:02d}:{t % 60:02d}+00:00", kind="diff" if parent else "full",
                    parent=parent, host="h", paths=["/a"], id=sid)


@settings(max_examples=200)
@given(full_trees(), st.lists(st.tuples(diffs(), st.integers(0, 100)), max_size=8), st.randoms())
def test_resolved_trees_equal_each_chain_resolved_on_its_own(tree, layers, rnd):
    """Walking a forest of chains (differentials of differentials, branches) depth first gives every
    snapshot the tree resolving its own chain gives."""
    snaps = [snapshot("s0", None, 0)]
    own = {"s0": as_records(tree)}
    for i, (records, pick) in enumerate(layers, 1):
        parent = snaps[pick % len(snaps)].id
        snaps.append(snapshot(f"s{i}", parent, i))
        own[f"s{i}"] = records
    snaps.append(snapshot("orphan", "gone", 99))  # its parent is not there: not resolved
    own["orphan"] = []
    rnd.shuffle(snaps)
    by_id = {s.id: s for s in snaps}
    got = {s.id: list(tree) for s, tree in resolved_trees(snaps, lambda s: iter(own[s.id]))}
    assert set(got) == set(by_id) - {"orphan"}
    for sid, tree in got.items():
        line = chain.lineage(sid, {s.id: s.parent for s in snaps})[::-1]
        resolved = chain.resolve(iter(own[line[0]]), [iter(own[p]) for p in line[1:]])
        assert tree == [(r.op, r.path, r.entry.chunks if r.entry is not None else None) for r in resolved]


def test_the_tree_of_a_snapshot_nothing_builds_on_is_read_as_it_is_walked():
    """The last snapshot of each chain had its whole tree made into a list beside its parent's, then held
    through the walk: a stats of a differential of 300,000 files peaked at 360 MB.  Its records are read as
    the caller walks them; a tree a differential builds on is still resolved whole first."""
    snaps = [snapshot("s0", None, 0), snapshot("s1", "s0", 1), snapshot("s2", "s1", 2)]
    own = {sid: as_records({b"f%d" % i: i % 9 for i in range(n)}) for sid, n in (("s0", 6), ("s1", 5), ("s2", 4))}
    read: dict[str, int] = {}

    def own_records(s):
        for r in own[s.id]:
            read[s.id] = read.get(s.id, 0) + 1
            yield r

    walked = []
    for s, tree in resolved_trees(snaps, own_records):
        it = iter(tree)
        first = next(it)
        walked.append((s.id, read[s.id], [first, *it]))
    assert [(sid, n) for sid, n, _ in walked] == [("s0", 6), ("s1", 5), ("s2", 1)]
    assert [len(t) for _, _, t in walked] == [6, 6, 6]


def test_with_bases_follows_every_chain_once():
    bases = {b"c": b"b", b"b": b"a", b"e": b"b", b"x": None}
    assert with_bases({b"c", b"x"}, bases.get) == {b"a", b"b", b"c", b"x"}
    assert with_bases(set(), bases.get) == set()
    assert bases_of({b"c", b"x", b"b"}, bases.get) == {b"a"}


def brute_force(repo, snaps):
    """Chunk ids each snapshot's tree names, with their bases, from the public API one snapshot at a time."""
    store = repo.store
    out = {}
    for s in snaps:
        ids = {c for e in repo.tree(s) for c in e.chunk_ids()}
        out[s.id] = ids | {b for c in ids for b in store.delta_chain(c)}
    return out


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    """A database file's full and differentials (deltas), beside another source's snapshots."""
    tmp = tmp_path_factory.mktemp("usage")
    rnd = random.Random(5)
    db, other = tmp / "db", tmp / "other"
    db.mkdir()
    other.mkdir()
    page_file(db / "table", 512, rnd)  # 4 MiB
    (db / "static").write_bytes(rnd.randbytes(200_000))  # in every tree, in the full's manifest only
    (other / "notes").write_bytes(rnd.randbytes(300_000))
    repo_url = str(tmp / "repo")
    crashkit.init_repo(repo_url)
    repo = crashkit.open_repo(repo_url, ledger=False)
    for v in range(4):
        if v:
            touch_pages(db / "table", 0.3, rnd)
        repo.backup([str(db)], fixed_chunks=["table"], fixed_chunk_size=256 << 10)
        if v % 2:
            (other / "notes").write_bytes(rnd.randbytes(300_000))
        repo.backup([str(other)])
    return repo, repo_url


def test_usage_of_each_snapshot_matches_a_brute_force_count(day):
    repo, _ = day
    snaps = repo.snapshots()
    needs = brute_force(repo, snaps)
    assert any(repo.store.locate(c).flags == KIND_DELTA for ids in needs.values() for c in ids)
    for s in snaps:
        u = repo.usage([s.id])
        mine = needs[s.id]
        theirs = set().union(*(ids for sid, ids in needs.items() if sid != s.id))
        tree_ids = {c for e in repo.tree(s) for c in e.chunk_ids()}
        assert (u.snapshots, u.files, u.bytes) == (1, s.stats["files"], s.stats["bytes"])
        assert u.chunks.blobs == len(tree_ids)
        assert u.chunks.raw_bytes == sum(repo.store.locate(c).raw_length for c in tree_ids)
        assert u.bases.blobs == len(mine - tree_ids)
        assert u.only.blobs == len(mine - theirs)
        assert u.only.stored_bytes == sum(repo.store.locate(c).length for c in mine - theirs)
        chain_manifests = {m for c in repo.store.chain_of(s) for m in c.manifest}
        assert u.manifest_blobs == len(chain_manifests)
        assert u.stored_bytes == (u.chunks.stored_bytes + u.bases.stored_bytes + u.manifest_stored_bytes)
    # the database's first full is the base of every later chunk: forgetting it alone frees next to nothing
    first = snaps[0]
    assert repo.usage([first.id]).only.stored_bytes < repo.usage([first.id]).chunks.stored_bytes / 10
    both = repo.usage(hosts=["nobody"])
    assert both.snapshots == 0 and both.chunks.blobs == 0


def test_only_these_is_what_forgetting_them_then_pruning_frees(tmp_path, day):
    _, url = day
    copy = tmp_path / "repo"
    shutil.copytree(url, copy)
    repo = crashkit.open_repo(str(copy), ledger=False)
    snaps = repo.snapshots()
    chosen = [snaps[2].id, snaps[5].id]  # a differential in the middle of the database's chain, and the other's
    u = repo.usage(chosen)
    assert u.only.blobs > 0

    def data_blobs():
        manifests = {bytes.fromhex(m) for s in repo.snapshots() for m in s.manifest}
        return {b: loc.length for b, loc in repo.store.index.items() if b not in manifests}

    before = data_blobs()
    repo.forget(chosen)
    repo.prune(max_unused=0.0)
    after = data_blobs()
    assert set(before) - set(after) and sum(before.values()) - sum(after.values()) == u.only.stored_bytes
    assert len(before) - len(after) == u.only.blobs
    assert repo.check(read_data=True).ok


def test_stats_cli_of_a_selection(day):
    _, url = day
    out = crashkit.run_cli("stats", "-r", url, "--json", "latest")
    data = json.loads(out.stdout)
    assert data["snapshots"] == 1 and data["stored_bytes"] >= data["chunks"]["stored_bytes"] > 0
    missing = crashkit.run_cli("stats", "-r", url, "--tag", "never-used", ok=(12,))
    assert b"no snapshot matches" in missing.stderr
    plain = crashkit.run_cli("stats", "-r", url, "latest")
    assert b"only these" in plain.stdout and b"restore size" in plain.stdout


def test_forget_dry_run_says_what_the_prune_after_it_frees(tmp_path, day):
    _, url = day
    copy = tmp_path / "repo"
    shutil.copytree(url, copy)

    def data() -> int:
        """Stored bytes of file data: every indexed blob no snapshot names as its manifest."""
        repo = crashkit.open_repo(str(copy), ledger=False)
        manifests = {bytes.fromhex(m) for s in repo.snapshots() for m in s.manifest}
        return sum(loc.length for b, loc in repo.store.index.items() if b not in manifests)

    plan = json.loads(crashkit.run_cli("forget", "-r", str(copy), "--keep-last", "2", "--group-by", "paths",
                                       "--dry-run", "--json").stdout)
    assert plan["frees_stored_bytes"] > 0
    removed = [d["id"] for d in plan["decisions"] if not d["keep"]]
    u = crashkit.open_repo(str(copy), ledger=False).usage(removed)
    assert plan["frees_stored_bytes"] == u.frees_stored_bytes  # the figure stats gives for them
    text = crashkit.run_cli("forget", "-r", str(copy), "--keep-last", "2", "--group-by", "paths", "--dry-run")
    assert b"a prune then frees about" in text.stdout
    before = data()
    crashkit.run_cli("forget", "-r", str(copy), "--keep-last", "2", "--group-by", "paths", "--prune",
                     "--max-unused", "0")
    assert before - data() == u.only.stored_bytes


def test_only_these_leaves_out_the_manifests_a_kept_differential_builds_on(tmp_path, new_repo):
    """Forgetting a full that kept differentials build on rebases them: its manifest's records are written
    into theirs, about as many bytes as go.  "only these" counted them freed (6.5 MiB where 600 B went)."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        (src / f"empty-{i:05}").touch()
    full = repo.backup([str(src)]).snapshot
    (src / "new").write_bytes(b"x")
    repo.backup([str(src)])  # a differential on it, kept
    u = repo.usage([full.id])
    assert u.only_manifests.blobs == 0 and u.frees_stored_bytes == u.only.stored_bytes


def test_only_these_counts_the_manifests_that_go_with_them(tmp_path, new_repo):
    """A snapshot of many empty files is mostly manifest: "only these" said 0 B where a prune freed it all."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        (src / f"empty-{i:05}").touch()
    keep_dir = tmp_path / "other"
    keep_dir.mkdir()
    (keep_dir / "f").write_bytes(b"x")
    snap = repo.backup([str(src)]).snapshot
    repo.backup([str(keep_dir)])
    u = repo.usage([snap.id])
    assert u.only.blobs == 0 and u.only_manifests.blobs == len(snap.manifest)
    before = sum(loc.length for _, loc in repo.store.index.items())
    repo.forget([snap.id])
    repo.prune(max_unused=0.0)
    assert before - sum(loc.length for _, loc in repo.store.index.items()) == u.only_manifests.stored_bytes


def test_a_selection_counts_its_deltas_and_not_the_manifests_another_snapshot_shares(tmp_path, new_repo):
    """Two fulls of an unchanged tree share their manifest blobs: forgetting one frees none of them.  A
    change of four bytes in a large file stores one delta: the selection says one, not every other chunk."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(random.Random(3).randbytes(3_000_000))
    (src / "big").write_bytes(data)
    for i in range(20):
        (src / f"s{i}").write_text(f"small file {i}\n")
    first = repo.backup([str(src)]).snapshot
    repo.backup([str(src)], kind="full")
    u = repo.usage([first.id])
    assert u.only_manifests.blobs == 0 and u.frees_stored_bytes == 0
    data[1_000_000:1_000_004] = b"XXXX"
    (src / "big").write_bytes(data)
    diff = repo.backup([str(src)]).snapshot
    assert diff.stats["delta_blobs"] >= 1
    u = repo.usage([diff.id])
    assert u.chunks.delta_blobs == diff.stats["delta_blobs"]
    assert u.chunks.delta_stored_bytes == diff.stats["delta_stored_bytes"]


def test_the_manifests_of_a_long_chain_are_gathered_walking_it_once():
    """Each snapshot's chain was walked whole, for the manifests the chosen ones need and for what the others
    build on: over one chain of 3,000 differentials a forget's dry run took 8 s, and a chain as long as the
    snapshots a week of hourly differentials takes (168) made it some 3 million steps over a year."""
    from chunkvault.store.usage import usage

    n = 60
    snaps = [snapshot("s0", None, 0)]
    for i in range(1, n):
        snaps.append(snapshot(f"s{i}", f"s{i - 1}", i))
    for i, s in enumerate(snaps):
        s.manifest = [f"{i:064x}"]
    by_id = {s.id: s for s in snaps}
    walked = []

    def chain_of(s: Snapshot) -> list[Snapshot]:
        ids = chain.chain_to_base(s.id, {x.id: x.parent for x in snaps})
        walked.append(len(ids))
        return [by_id[i] for i in ids]

    out = usage(snaps, snaps[: n // 2], lambda s: iter(()), lambda b: None, lambda b: None, chain_of)
    assert out.snapshots == n // 2
    assert sum(walked) <= 2 * n, sum(walked)
