"""copy: snapshots reach another repository with their chains, sending only what is missing."""
import json
import os
import random

import pytest

from chunkvault import Repository
from chunkvault.errors import RemoteUnavailable
from chunkvault.remotes.local import LocalRemote
from faults import FaultyRemote
from treeutil import describe


def history(tmp_path, repo, n=4):
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(2)
    states = {}
    for i in range(n):
        (src / f"f{i}").write_bytes(rnd.randbytes(200_000))
        if i == 2:
            os.remove(src / "f0")
        snap = repo.backup([str(src)]).snapshot
        states[snap.id] = describe(src)
    return states


def test_copy_keeps_chains_and_is_incremental(tmp_path, new_repo):
    src = new_repo(str(tmp_path / "src-repo"))
    states = history(tmp_path, src)
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0, copy_chunker_from=src)
    first = src.copy_to(dst)
    assert len(first.copied) == 4 and first.blobs_sent > 0
    by_source = {s.stats["copied_from"]: s for s in dst.snapshots()}
    src_snaps = {s.id: s for s in src.snapshots()}
    for sid, state in states.items():
        d = by_source[sid]
        assert d.kind == src_snaps[sid].kind
        if d.parent:
            assert by_source[src_snaps[sid].parent].id == d.parent
        out = tmp_path / f"out-{sid[:8]}"
        dst.restore(d.id, str(out))
        assert describe(out) == state
    again = src.copy_to(dst)
    assert not again.copied and len(again.skipped) == 4 and again.blobs_sent == 0
    assert dst.check(read_data=True).ok


def test_same_chunker_secret_dedups_across_repositories(tmp_path, new_repo):
    src = new_repo(str(tmp_path / "src-repo"))
    history(tmp_path, src, 2)
    shared = Repository.init(str(tmp_path / "shared"), "pw2", kdf_seconds=0, copy_chunker_from=src)
    assert shared.store.material.chunker_secret == src.store.material.chunker_secret
    # the destination already holds the data (backed up locally): copy sends only manifests
    shared.backup([str(tmp_path / "src")])
    result = src.copy_to(shared)
    assert result.blobs_sent <= len(result.copied) * 2


def test_interrupted_copy_resumes_without_resending(tmp_path, new_repo):
    src = new_repo(str(tmp_path / "src-repo"))
    states = history(tmp_path, src)
    dst_dir = str(tmp_path / "dst")
    Repository.init(dst_dir, "pw2", kdf_seconds=0, copy_chunker_from=src, pack_size=64 * 1024)
    faulty = FaultyRemote(LocalRemote(dst_dir), seed=1, fail_after=6)
    with pytest.raises(RemoteUnavailable):
        src.copy_to(Repository.open(faulty, "pw2"))
    dst = Repository.open(dst_dir, "pw2")
    partial = len(dst.snapshots())
    result = src.copy_to(dst)
    assert len(result.copied) + partial == 4 and len(result.skipped) == partial
    for s in dst.snapshots():
        out = tmp_path / f"out-{s.id[:8]}"
        dst.restore(s.id, str(out))
        assert describe(out) == states[s.stats["copied_from"]]
    assert dst.check(read_data=True).ok


def test_cli_copy(tmp_path, new_repo, cli, password):
    src = new_repo(str(tmp_path / "src-repo"))
    history(tmp_path, src, 2)
    dst = str(tmp_path / "dst")
    cli("init", "-r", dst, "--kdf-time", "0", "--copy-chunker-params-from", str(tmp_path / "src-repo"),
        env={"CHUNKVAULT_FROM_PASSWORD": password})
    out = json.loads(cli("copy", "-r", str(tmp_path / "src-repo"), "--to", dst, "--json",
                         env={"CHUNKVAULT_TO_PASSWORD": password}).stdout)
    assert len(out["copied"]) == 2
    assert cli("copy", "-r", str(tmp_path / "src-repo"), "--to", dst, check=2).returncode == 2


def test_copy_takes_the_snapshots_the_filters_select_with_their_chains(tmp_path, new_repo):
    src = new_repo(str(tmp_path / "src-repo"))
    history(tmp_path, src, n=3)
    src.tag([src.snapshots()[-1].id], add=["offsite"])
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0, copy_chunker_from=src)
    assert src.copy_to(dst, hosts=["no such host"]).copied == []  # selects nothing: copies nothing
    assert dst.snapshots() == []
    result = src.copy_to(dst, tags=["offsite"])
    newest = src.snapshots()[-1]
    assert [a for a, _ in result.copied][-1] == newest.id  # with the chain it needs, oldest first
    assert {s.stats["copied_from"] for s in dst.snapshots()} == {s.id for s in src.store.chain_of(newest)}


def test_a_differential_copied_onto_a_parent_rewritten_since_is_copied_whole(tmp_path, new_repo):
    """Its parent's copy lost a path to a rewrite: built on it, the copy would lack what its source has."""
    src = new_repo(str(tmp_path / "src-repo"))
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "a.txt").write_text("a")
    (tree / "s.cfg").write_text("s")
    full = src.backup([str(tree)]).snapshot
    (tree / "b.txt").write_text("b")
    diff = src.backup([str(tree)]).snapshot
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0, copy_chunker_from=src)
    src.copy_to(dst, [full.id])
    dst.rewrite(["s.cfg"], dry_run=False)
    (copied,) = [d for s, d in src.copy_to(dst).copied if s == diff.id]
    again = dst.snapshot(copied)
    assert again.kind == "full" and again.parent is None
    dst.restore(copied, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(tree)
    assert dst.check(read_data=True).ok
