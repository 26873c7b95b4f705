"""copy: snapshots reach another repository with their chains, sending only what is missing."""
import contextlib
import json
import os
import random
import threading
from typing import Iterator

import pytest
from hypothesis import given, strategies as st

from chunkvault import Repository
from chunkvault.errors import RemoteUnavailable
from chunkvault.remotes.local import LocalRemote
from conftest import PASSWORD
from faults import FaultyRemote, IndexedFirst
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


@contextlib.contextmanager
def held_elsewhere(repo: Repository, purpose: str) -> Iterator[None]:
    """``repo``'s shared lock of ``purpose`` (one of the incoming ones) held by another thread, as another
    process would, while inside."""
    from chunkvault.store.locks import SHARED, RepoLock

    holding, release = threading.Event(), threading.Event()

    def other_process() -> None:
        with RepoLock(repo.store.remote, SHARED, purpose, alone=True):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=other_process)
    holder.start()
    holding.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


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


def test_a_repository_seeded_by_export_and_import_gets_only_what_came_since_from_copy(tmp_path, new_repo):
    """The first full shipped as a `.backup` file, then nightly copies: copy knew only what it had copied
    itself, so it sent the seeded full again (a second full taking a retention slot, the chain built on it);
    and copying imported snapshots back to where they came from duplicated them there too."""
    src = new_repo(str(tmp_path / "src-repo"))
    states = history(tmp_path, src, n=3)
    first, second, third = src.snapshots()
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0)
    src.export(first.id, str(tmp_path / "seed.backup"), "export pw", kdf_seconds=0)
    seeded = dst.import_backup(str(tmp_path / "seed.backup"), "export pw").snapshot
    result = src.copy_to(dst)
    assert result.skipped == [first.id] and [s for s, _ in result.copied] == [second.id, third.id]
    assert len(dst.snapshots()) == 3
    copied_second = next(s for s in dst.snapshots() if s.stats.get("copied_from") == second.id)
    assert copied_second.parent == seeded.id
    for snap in dst.snapshots():
        out = tmp_path / f"out-{snap.id[:8]}"
        dst.restore(snap.id, str(out))
        origin = snap.stats.get("copied_from") or snap.stats.get("imported_from")
        assert describe(out) == states[origin]
    back = dst.copy_to(src)
    assert not back.copied and len(back.skipped) == 3 and len(src.snapshots()) == 3
    assert dst.check(read_data=True).ok


def test_a_snapshot_relayed_through_another_repository_is_not_copied_twice(tmp_path, new_repo):
    """Host to NAS to cloud, then host to cloud directly: each copy named only the repository it came from
    last, so the cloud got the host's snapshots a second time (two for --keep-last), and the host its own."""
    host = new_repo(str(tmp_path / "host"))
    states = history(tmp_path, host, n=3)
    nas = Repository.init(str(tmp_path / "nas"), "nas password", kdf_seconds=0)
    cloud = Repository.init(str(tmp_path / "cloud"), "cloud password", kdf_seconds=0)
    host.copy_to(nas)
    nas.copy_to(cloud)
    direct = host.copy_to(cloud)
    assert not direct.copied and len(direct.skipped) == 3 and len(cloud.snapshots()) == 3
    back = cloud.copy_to(host)
    assert not back.copied and len(host.snapshots()) == 3
    for snap in cloud.snapshots():
        out = tmp_path / f"out-{snap.id[:8]}"
        cloud.restore(snap.id, str(out))
        assert describe(out) == states[snap.stats["copied_from"]]


def test_a_differential_on_a_snapshot_both_got_from_elsewhere_is_copied_onto_the_destination_s_copy(
        tmp_path, new_repo):
    """B and C each got A's full by copy; B then took a differential on it.  Copied from B to C, its parent is
    C's copy of A's full, found by origin: the differential was refused as one whose parent the source lacks."""
    a = new_repo(str(tmp_path / "a"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("one\n")
    a.backup([str(src)], kind="full")
    b = Repository.init(str(tmp_path / "b"), "b password", kdf_seconds=0)
    c = Repository.init(str(tmp_path / "c"), "c password", kdf_seconds=0)
    a.copy_to(b)
    a.copy_to(c)
    (src / "f").write_text("two\n")
    diff = b.backup([str(src)], kind="diff").snapshot
    result = b.copy_to(c)
    assert [s for s, _ in result.copied] == [diff.id] and not result.failed
    copied = max(c.snapshots(), key=lambda s: s.time)
    assert copied.kind == "diff"
    c.restore(copied.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_text() == "two\n"


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
    # The remote went away before the copy could remove its lock.  A new process finds that lock stale (its
    # pid is gone); here it names this very process, which a lock never counts stale: removed by hand.
    for lock in (tmp_path / "dst" / "locks").iterdir():
        lock.unlink()
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
    wrong = cli("copy", "-r", str(tmp_path / "src-repo"), "--to", dst, env={"CHUNKVAULT_TO_PASSWORD": "nope"},
                check=11).stderr.decode()  # which repository: the source's password is right
    assert "the password of the to repository (--to-password-file, -command or CHUNKVAULT_TO_PASSWORD)" in wrong
    assert f"does not open {dst}" in wrong


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


def test_a_differential_dated_before_its_parent_is_copied_after_it(tmp_path, new_repo):
    """`backup --time` may date a chain one instant, and with --parent a differential before its parent:
    one copy takes the whole chain, each parent first (ordered by time, a child came first and was
    reported as damaged)."""
    src_repo, dst_repo = new_repo(), new_repo()
    src = tmp_path / "src"
    src.mkdir()
    made = []
    for i in range(4):
        (src / f"f{i}").write_bytes(b"%d" % i * 1000)
        made.append(src_repo.backup([str(src)], kind="diff" if i else "full", time="2026-01-02T03:00:00Z",
                                    parent=made[-1].id if made else None).snapshot)
    (src / "late").write_bytes(b"x")
    result = src_repo.backup([str(src)], kind="diff", parent=made[-1].id, time="2026-01-01T00:00:00Z")
    early = result.snapshot
    assert [w for w in result.warnings if "is newer than this one's time" in w]  # said, and done as asked
    result = src_repo.copy_to(dst_repo)
    assert not result.failed and len(result.copied) == 5
    copies = dict(result.copied)
    dst_repo.restore(copies[early.id], str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1, 12)), min_size=1, max_size=12),
       st.sets(st.integers(0, 11)))
def test_copy_order_puts_every_parent_before_its_children(specs, wanted):
    """Each needed snapshot once, its ancestors among the source's snapshots first, whatever the times."""
    from types import SimpleNamespace

    from chunkvault.store.copy import copy_order

    snaps = [SimpleNamespace(id=f"{i:02d}", time=t, parent=f"{p:02d}" if 0 <= p < i else None)
             for i, (t, p) in enumerate(specs)]
    by_id = {s.id: s for s in snaps}
    want = {f"{w:02d}" for w in wanted if w < len(snaps)}
    order = copy_order(snaps, want)
    need = set()
    for sid in want:
        while sid is not None:
            need.add(sid)
            sid = by_id[sid].parent
    assert sorted(s.id for s in order) == sorted(need)
    place = {s.id: n for n, s in enumerate(order)}
    assert all(place[s.parent] < place[s.id] for s in order if s.parent)


def test_copy_waits_for_a_prune_on_the_destination_and_says_which(tmp_path, new_repo):
    """--wait holds for both repositories; the message names the destination."""
    import time

    from chunkvault.errors import Locked
    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    src_repo, dst_repo = new_repo(), new_repo()
    history(tmp_path, src_repo, n=2)
    held, release = threading.Event(), threading.Event()

    def prune() -> None:  # another thread's lock, as another process's
        with RepoLock(dst_repo.store.remote, EXCLUSIVE, "prune"):
            held.set()
            release.wait(60)

    pruning = threading.Thread(target=prune)
    pruning.start()
    held.wait(10)
    with pytest.raises(Locked, match="^the destination repository is locked by prune .*; try again later$"):
        src_repo.copy_to(dst_repo, wait=0)
    done = {}
    worker = threading.Thread(target=lambda: done.setdefault("copy", src_repo.copy_to(dst_repo, wait=60)))
    worker.start()
    time.sleep(1)
    assert worker.is_alive() and not dst_repo.snapshots()
    release.set()
    pruning.join(10)
    worker.join(60)
    assert len(done["copy"].copied) == 2


def test_two_copies_into_one_repository_take_turns_and_backups_go_on_beside_them(tmp_path, new_repo):
    """Two copies at once each sent every snapshot: the destination held each twice, and prune freed half.
    A copy into a repository now waits for another copy into it (and then finds the snapshots there), while
    backups and reads share the repository with it as before."""
    from chunkvault.errors import Locked
    from chunkvault.store.locks import COPY_INTO

    src_repo, dst_repo = new_repo(), new_repo()
    history(tmp_path, src_repo, n=3)
    with held_elsewhere(dst_repo, COPY_INTO):
        with pytest.raises(Locked, match="^the destination repository is locked by copy into .*; try again later$"):
            src_repo.copy_to(dst_repo, wait=0)
        own = tmp_path / "own"
        own.mkdir()
        (own / "f").write_bytes(b"backed up beside a copy")
        dst_repo.backup([str(own)])  # a backup is not held off
    results: list = []
    copies = [threading.Thread(target=lambda: results.append(src_repo.copy_to(dst_repo, wait=60)))
              for _ in range(2)]
    for t in copies:
        t.start()
    for t in copies:
        t.join(120)
    assert len(results) == 2
    copied = [s for s in dst_repo.snapshots() if s.paths != [str(own)]]
    assert len(copied) == len(src_repo.snapshots()) == 3


def test_copy_reads_the_source_pack_by_pack_not_blob_by_blob(tmp_path, new_repo):
    """From S3 or an HTTP service, a request per chunk is what a copy costs: neighbours in a pack come with
    one ranged get, as a restore reads them."""
    src_path = str(tmp_path / "src-repo")
    src = new_repo(src_path)
    data = tmp_path / "data"
    data.mkdir()
    rnd = random.Random(5)
    for i in range(300):  # small files: a chunk each, many to a pack
        (data / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1000, 20_000)))
    src.backup([str(data)])
    for i in range(0, 300, 7):
        (data / f"f{i}").write_bytes(rnd.randbytes(3000))
    src.backup([str(data)], kind="diff")
    counted = FaultyRemote(LocalRemote(src_path), seed=1)
    source = Repository.open(counted, "correct horse battery staple")
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0, copy_chunker_from=src)
    counted.calls.clear()
    result = source.copy_to(dst)
    assert len(result.copied) == 2 and result.blobs_sent >= 300
    data_gets = counted.calls["get"] - sum(1 for _ in LocalRemote(src_path).list("snapshots/"))
    assert data_gets < result.blobs_sent / 10, (data_gets, result.blobs_sent)
    for s in dst.snapshots():
        dst.restore(s.id, str(tmp_path / s.id[:8]))
    assert describe(tmp_path / dst.snapshots()[-1].id[:8]) == describe(data)
    assert dst.check(read_data=True).ok


@pytest.mark.parametrize("route", ["copy, export, import", "export, import, twice", "back home"])
def test_a_snapshot_is_known_by_its_first_origin_through_copies_exports_and_imports(tmp_path, new_repo, route):
    """An import recorded the id of the snapshot exported, not the one it was first copied or imported from:
    A copied to B, exported and imported into C, then A copied to C, sent A's snapshot to C a second time."""
    host = new_repo(str(tmp_path / "host"))
    history(tmp_path, host, n=1)
    nas = Repository.init(str(tmp_path / "nas"), "nas pw", kdf_seconds=0)
    cloud = Repository.init(str(tmp_path / "cloud"), "cloud pw", kdf_seconds=0)

    def carry(src: Repository, dst: Repository, sid: str, name: str):
        src.export(sid, str(tmp_path / name), "export pw", kdf_seconds=0)
        return dst.import_backup(str(tmp_path / name), "export pw")

    (first,) = host.snapshots()
    if route == "copy, export, import":
        host.copy_to(nas)
        carry(nas, cloud, nas.snapshots()[0].id, "x.backup")
    elif route == "export, import, twice":
        seeded = carry(host, nas, first.id, "x.backup").snapshot
        carry(nas, cloud, seeded.id, "y.backup")
    else:
        host.copy_to(nas)
        there = carry(nas, cloud, nas.snapshots()[0].id, "x.backup").snapshot
        assert carry(cloud, host, there.id, "z.backup").skipped
        assert len(host.snapshots()) == 1
        return
    assert host.copy_to(cloud).copied == []
    assert len(cloud.snapshots()) == 1


def test_a_source_snapshot_that_does_not_load_is_a_failure_of_copy_not_left_out_unsaid(tmp_path, new_repo, cli):
    """copy said "1 snapshot(s) copied" and exited 0 when the source held a damaged snapshot object."""
    src_repo, dst_repo = new_repo(str(tmp_path / "from")), new_repo(str(tmp_path / "dst"))
    history(tmp_path, src_repo, n=2)
    newest = src_repo.snapshots()[-1]
    stored = tmp_path / "from" / "snapshots" / newest.id
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.warns(Warning):
        result = Repository.open(str(tmp_path / "from"), PASSWORD).copy_to(dst_repo)
    assert [sid for sid, _ in result.failed] == [newest.id] and "does not load" in result.failed[0][1]
    from chunkvault.errors import CorruptObject

    with pytest.warns(Warning), pytest.raises(CorruptObject, match="authentication failed"):  # not "no snapshot"
        Repository.open(str(tmp_path / "from"), PASSWORD).copy_to(dst_repo, snapshots=[newest.id[:8]])
    said = cli("copy", "-r", str(tmp_path / "from"), "--to", str(tmp_path / "dst"), check=13,
               env={"CHUNKVAULT_TO_PASSWORD": PASSWORD}).stderr.decode()
    assert newest.id[:8] in said


def test_a_copy_and_an_import_into_one_repository_take_turns(tmp_path, new_repo):
    """Their locks kept apart copies from copies and imports from imports only: a copy and an import of one
    snapshot at once stored it twice."""
    from chunkvault.errors import Locked
    from chunkvault.store.locks import COPY_INTO, IMPORT

    src_repo, dst_repo = new_repo(), new_repo()
    history(tmp_path, src_repo, n=1)
    (snap,) = src_repo.snapshots()
    src_repo.export(snap.id, str(tmp_path / "x.backup"), "export pw", kdf_seconds=0)
    for held, then in ((IMPORT, lambda: src_repo.copy_to(dst_repo, wait=0)),
                       (COPY_INTO, lambda: dst_repo.import_backup(str(tmp_path / "x.backup"), "export pw", wait=0))):
        with held_elsewhere(dst_repo, held), pytest.raises(Locked, match=f"locked by {held} "):
            then()
    src_repo.copy_to(dst_repo)
    assert dst_repo.import_backup(str(tmp_path / "x.backup"), "export pw").skipped


def test_a_copy_whose_destination_stops_answering_removes_its_lock_on_the_source(tmp_path, new_repo):
    """Either repository's outage left both locks to go stale (5 minutes of prunes and copies held off on
    the one that still answered)."""
    from chunkvault.remotes.layer import RetryingRemote

    src = new_repo(str(tmp_path / "src-repo"))
    history(tmp_path, src, n=2)
    dst_dir = str(tmp_path / "dst")
    Repository.init(dst_dir, "pw2", kdf_seconds=0, pack_size=64 * 1024)
    faulty = FaultyRemote(LocalRemote(dst_dir), seed=1, fail_after=6)
    gone = RetryingRemote(faulty, attempts=2, base_delay=0, sleep=lambda s: None)
    with pytest.raises(RemoteUnavailable) as failed:
        src.copy_to(Repository.open(gone, "pw2"))
    assert failed.value.remote == faulty.display_url
    assert list((tmp_path / "src-repo" / "locks").iterdir()) == []
    assert list((tmp_path / "dst" / "locks").iterdir()) != []  # left to go stale: removing it would wait as long


def test_a_differential_builds_on_the_destination_s_rebased_copy_of_its_parent(tmp_path, new_repo):
    """The destination forgot the middle differential of a chain and rebased the newest onto the full: the
    next differential builds on that rebased copy, and the forgotten one is not sent again (it was, with
    the whole chain, at every copy, for the destination's retention to forget once more)."""
    src = new_repo(str(tmp_path / "src-repo"))
    tree = tmp_path / "src"
    tree.mkdir()
    states, made = {}, []
    for i in range(3):
        (tree / f"f{i}").write_bytes(b"%d" % i * 5000)
        made.append(src.backup([str(tree)], kind="diff" if made else "full",
                               parent=made[-1].id if made else None).snapshot)
        states[made[-1].id] = describe(tree)
    full, middle, newest = made
    dst = Repository.init(str(tmp_path / "dst"), "other password", kdf_seconds=0)
    src.copy_to(dst)
    by_source = {s.stats["copied_from"]: s.id for s in dst.snapshots()}
    dst.forget([by_source[middle.id]])
    assert dst.snapshot(by_source[newest.id]).parent == by_source[full.id]
    (tree / "later").write_bytes(b"later" * 1000)
    later = src.backup([str(tree)], kind="diff", parent=newest.id).snapshot
    assert later.parent == newest.id
    result = src.copy_to(dst, [later.id])
    assert [s for s, _ in result.copied] == [later.id] and result.skipped == [newest.id]
    assert sorted(s.stats["copied_from"] for s in dst.snapshots()) == sorted([full.id, newest.id, later.id])
    copy = dict(result.copied)[later.id]
    assert dst.snapshot(copy).parent == by_source[newest.id]
    dst.restore(copy, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(tmp_path / "src")
    dst.restore(by_source[newest.id], str(tmp_path / "out2"))
    assert describe(tmp_path / "out2") == states[newest.id]
    assert dst.check(read_data=True).ok


def test_a_copy_that_would_store_deltas_on_a_base_in_a_pack_lost_in_the_destination_stops(tmp_path, new_repo, cli):
    """A delta is stored against the destination's copy of its base, whose plaintext the copy takes from the
    source: with the pack holding that copy (or a base below it) deleted by hand, the copy saved a snapshot that
    no one could read, exit 0.  It refers to that pack as a deduplicated blob does, and stops the same way."""
    rnd = random.Random(6)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    data = bytearray(rnd.randbytes(8 * 65536))
    src = new_repo(str(tmp_path / "src-repo"))
    ids = []
    for version in range(3):
        for chunk in range(8):  # a few bytes of every chunk change: each is a delta on the one before
            data[chunk * 65536 + version * 64 : chunk * 65536 + version * 64 + 8] = rnd.randbytes(8)
        (src_dir / "db").write_bytes(data)
        ids.append(src.backup([str(src_dir)], fixed_chunks=["db"], fixed_chunk_size=65536).snapshot.id)
    dst_dir = tmp_path / "dst"
    dst = Repository.init(str(dst_dir), "other password", kdf_seconds=0, pack_size="256k")
    src.copy_to(dst, ids[:2])
    first, second = sorted(dst.snapshots(), key=lambda s: s.time)
    (whole,) = [e for e in dst.tree(first) if e.path == b"db"]
    (delta,) = [e for e in dst.tree(second) if e.path == b"db"]
    assert dst.store.delta_base(delta.chunk_ids()[7]) == whole.chunk_ids()[7]
    loc = dst.store.locate(whole.chunk_ids()[7])
    lost = dst.store.pack_ids[loc.pack_no].hex()
    manifests = {bytes.fromhex(b) for s in (first, second) for b in s.manifest}
    assert all(dst.store.pack_ids[dst.store.locate(b).pack_no].hex() != lost for b in manifests)
    (dst_dir / "data" / lost[:2] / lost).unlink()
    err = cli("copy", "-r", str(tmp_path / "src-repo"), "--to", str(dst_dir), ids[2],
              env={"CHUNKVAULT_TO_PASSWORD": "other password"}, check=13).stderr.decode()
    assert f"data/{lost[:2]}/{lost}: is listed by the index but not stored" in err and "repair index" in err, err
    assert len(Repository.open(str(dst_dir), "other password").snapshots()) == 2


def test_a_pack_lost_in_the_destination_ends_the_copy_naming_the_destination(tmp_path, new_repo, cli, password):
    """A destination pack deleted by hand: copy would deduplicate against it, and stopped with "run `chunkvault
    repair index`" but never said in which of its two repositories (the source is whole); the snapshots it met
    the missing pack for were first taken for damage in the source."""
    src = new_repo(str(tmp_path / "src-repo"))
    history(tmp_path, src, n=2)
    dst_dir = tmp_path / "dst"
    dst = Repository.init(str(dst_dir), "other password", kdf_seconds=0)
    src.copy_to(dst)
    for pack in (dst_dir / "data").rglob("*"):
        if pack.is_file() and pack.stat().st_size > 100_000:
            pack.unlink()
    (tmp_path / "src" / "again").write_bytes((tmp_path / "src" / "f1").read_bytes())  # stored there: deduplicated
    (tmp_path / "src" / "f1").write_bytes(b"changed")
    src.backup([str(tmp_path / "src")])
    err = cli("copy", "-r", str(tmp_path / "src-repo"), "--to", str(dst_dir),
              env={"CHUNKVAULT_TO_PASSWORD": "other password"}, check=13).stderr.decode()
    assert "is listed by the index but not stored" in err and "repair index" in err
    assert f"in the destination repository: those commands with `-r {dst_dir}`)" in err
    assert "the next copy stores that data again" in err and "backup" not in err, err
    assert "not copied" not in err and "damaged there" not in err
    assert len(dst.snapshots()) == 2


def test_a_copy_notes_the_snapshots_it_stores_in_the_ledger_together(tmp_path, new_repo, monkeypatch):
    """The client's ledger, a file holding a line per snapshot, was read and written again for each snapshot a
    copy stored: copying a year of hourly snapshots (16,000) took 4.5 minutes, each one costing more than the
    last.  They are noted together, while the copy still holds the destination's lock."""
    from chunkvault.ledger import LedgerFile

    src = new_repo(str(tmp_path / "src-repo"))
    tree = tmp_path / "src"
    tree.mkdir()
    for i in range(12):
        (tree / "f").write_text(f"version {i}")
        src.backup([str(tree)], kind="full" if i % 4 == 0 else "diff")
    dst = new_repo(str(tmp_path / "dst"), copy_chunker_from=src)
    saves, locked = [], []
    real = LedgerFile._save

    def save(self, state, must_store=False):
        saves.append(self.repo_id)
        locked.append(bool(os.listdir(tmp_path / "dst" / "locks")))
        return real(self, state, must_store)

    monkeypatch.setattr(LedgerFile, "_save", save)
    result = src.copy_to(dst)
    assert len(result.copied) == 12
    noted = [held for repo_id, held in zip(saves, locked) if repo_id == dst.store.config.repo_id]
    assert noted and len(noted) <= 2 and all(noted), noted
    assert {s.stats["copied_from"] for s in dst.snapshots()} == {s.id for s in src.snapshots()}
    # noted: forgotten here, each copy is no rollback and its return no replay
    dst.forget([c for _, c in result.copied[-3:]])
    assert dst.check().ok
    assert len(dst.snapshots()) == 9


def test_snapshots_stored_under_a_lock_lost_since_are_not_noted_and_a_failure_stays_the_command_s(tmp_path,
                                                                                                  new_repo):
    """Noted together at the end, after the lock was lost, a snapshot another command of this client forgot
    meanwhile came back off the ledger's forgotten list (a false 'rolled back' next); and a ledger that could
    not be written replaced the copy's own error."""
    import dataclasses

    from chunkvault.errors import LockLost
    from chunkvault.store.locks import SHARED, RepoLock

    repo = new_repo()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("f")
    snap = repo.backup([str(tmp_path / "src")]).snapshot
    store = repo.store
    told = []
    store.on_saved = lambda *snaps: told.extend(s.id for s in snaps)

    def lost() -> None:
        raise LockLost("the lock was removed")

    def save(lock):
        return store.save_snapshot_held(dataclasses.replace(snap, id=""), lock)

    with RepoLock(store.remote, SHARED, "copy") as lock:
        with store.saves_noted_together(lost):
            save(lock)
        assert told == []
        with store.saves_noted_together(lock.confirm) as note:
            first = save(lock)
            note()
            second = save(lock)
        assert told == [first.id, second.id]

    def unwritable(*snaps) -> None:
        raise OSError(28, "No space left on device")

    store.on_saved = unwritable
    with RepoLock(store.remote, SHARED, "copy") as lock:
        with pytest.raises(ValueError, match="the copy's own"):
            with store.saves_noted_together(lock.confirm):
                save(lock)
                raise ValueError("the copy's own")


def many_small(path: str, n: int, *, chain: int = 4, size: int = 3000) -> list[str]:
    """A repository at ``path`` holding ``n`` small snapshots, each with a file of its own (``size`` random
    bytes), in chains of a full and ``chain - 1`` differentials; written through the store, for speed."""
    import datetime

    import blake3

    from chunkvault.store.manifest import OP_ENTRY, T_DIR, T_FILE, Entry, Record
    from chunkvault.store.manifest_io import ManifestWriter
    from chunkvault.store.snapshot import Snapshot

    rnd = random.Random(n)
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as repo:
        store, made, parent = repo.store, [], None
        with store.writer() as writer:
            for i in range(n):
                data = rnd.randbytes(size)
                bid = store.blob_id(data)
                writer.add(bid, data)
                mw = ManifestWriter(store, writer)
                name = f"f{i}".encode()
                if i % chain == 0:
                    parent = None
                    mw.add(Record(OP_ENTRY, b"", Entry(b"", T_DIR, 0o755)))
                mw.add(Record(OP_ENTRY, name, Entry(name, T_FILE, size=size, digest=blake3.blake3(data).digest(),
                                                    chunks=bid)))
                snap = Snapshot(time=(start + datetime.timedelta(hours=i)).isoformat(timespec="microseconds"),
                                kind="full" if parent is None else "diff", parent=parent, host="h", paths=["/src"],
                                manifest=[b.hex() for b in mw.finish()], manifest_starts=mw.starts,
                                stats={"files": i % chain + 1, "dirs": 1, "bytes": size * (i % chain + 1)})
                made.append(snap)
                parent = snap
            writer.flush()
        for snap in made:
            if snap.parent is not None:
                snap.parent = snap.parent.id
            store.save_snapshot(snap)
        return [s.id for s in made]


def _index_objects(path) -> int:
    return len(os.listdir(os.path.join(path, "index")))


def test_copying_many_small_snapshots_writes_their_index_together(tmp_path):
    """A copy flushed its writer before each snapshot it saved: 2,000 small snapshots left 2,000 index objects
    (and as many packs), every one read at each later open.  Their saves now wait for the index as a backup's
    snapshot does, and it is written together."""
    ids = many_small(str(tmp_path / "src-repo"), 40)
    dst_dir = str(tmp_path / "dst")
    with Repository.open(str(tmp_path / "src-repo"), PASSWORD, ledger=False) as src, \
            Repository.init(dst_dir, "pw2", kdf_seconds=0, copy_chunker_from=src, ledger=False) as dst:
        result = src.copy_to(dst)
        assert len(result.copied) == 40 and [s for s, _ in result.copied] == ids
        assert _index_objects(dst_dir) == 1 and len(os.listdir(os.path.join(dst_dir, "data"))) <= 2
        assert dst.check(read_data=True).ok
        assert {s.stats["copied_from"] for s in dst.snapshots()} == set(ids)
        last = dst.snapshots()[-1]
        assert [e.path for e in dst.tree(last)] == [b"", b"f36", b"f37", b"f38", b"f39"]


def test_no_copied_snapshot_is_saved_before_the_index_lists_its_blobs(tmp_path, monkeypatch):
    from chunkvault.store.repository import BlobWriter

    monkeypatch.setattr(BlobWriter, "INDEX_EVERY_PACKS", 2)  # a batch every few snapshots
    many_small(str(tmp_path / "src-repo"), 30)
    dst_dir = str(tmp_path / "dst")
    with Repository.open(str(tmp_path / "src-repo"), PASSWORD, ledger=False) as src:
        Repository.init(dst_dir, "pw2", kdf_seconds=0, copy_chunker_from=src, pack_size=8192, ledger=False).close()
        checking = IndexedFirst(dst_dir, "pw2")
        with Repository.open(checking, "pw2", ledger=False) as dst:
            assert len(src.copy_to(dst).copied) == 30
    assert checking.saves == 30
    assert 3 < _index_objects(dst_dir) < 20  # in batches: the writer's own every two packs, and one per batch


@pytest.mark.parametrize("fail_after", [3, 9, 17, 25])
def test_a_copy_of_many_snapshots_cut_off_by_its_destination_leaves_each_saved_one_readable(tmp_path, monkeypatch,
                                                                                            fail_after):
    """The destination gone after some uploads: each snapshot saved by then has its blobs indexed, and the
    copy run again sends the others, each snapshot once and no indexed blob twice."""
    from crashkit import duplicates, indexed_blobs
    from chunkvault.store.repository import BlobWriter

    monkeypatch.setattr(BlobWriter, "INDEX_EVERY_PACKS", 2)
    ids = many_small(str(tmp_path / "src-repo"), 24)
    dst_dir = str(tmp_path / "dst")
    src = Repository.open(str(tmp_path / "src-repo"), PASSWORD, ledger=False)
    Repository.init(dst_dir, "pw2", kdf_seconds=0, copy_chunker_from=src, pack_size=8192, ledger=False).close()
    faulty = FaultyRemote(LocalRemote(dst_dir), seed=1, fail_after=fail_after)
    with pytest.raises(RemoteUnavailable):
        src.copy_to(Repository.open(faulty, "pw2", ledger=False))
    for lock in (tmp_path / "dst" / "locks").iterdir():  # its holder's pid is this process's: not stale here
        lock.unlink()
    with Repository.open(dst_dir, "pw2", ledger=False) as dst:
        partial = dst.snapshots()
        assert dst.check(read_data=True).ok
        result = src.copy_to(dst)
        assert len(result.copied) + len(partial) == 24 and len(result.skipped) == len(partial)
        assert sorted(s.stats["copied_from"] for s in dst.snapshots()) == sorted(ids)
        assert dst.check(read_data=True).ok
        assert duplicates(indexed_blobs(dst.store)) == 0
    src.close()


def test_a_copy_of_many_snapshots_killed_part_way_resumes(tmp_path, cli):
    """SIGKILL once ten more snapshots are saved, three times: the destination checks clean with each saved
    snapshot readable, and the last run completes it, each snapshot once and no indexed blob twice."""
    import signal
    import subprocess
    import sys
    import time

    from crashkit import duplicates, indexed_blobs

    ids = many_small(str(tmp_path / "src-repo"), 400, size=6000)
    dst_dir = str(tmp_path / "dst")
    with Repository.open(str(tmp_path / "src-repo"), PASSWORD, ledger=False) as src:
        Repository.init(dst_dir, PASSWORD, kdf_seconds=0, copy_chunker_from=src, pack_size=16384,
                        ledger=False).close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env.update(CHUNKVAULT_PASSWORD=PASSWORD, CHUNKVAULT_TO_PASSWORD=PASSWORD)
    def stored() -> int:  # snapshot objects (not the temporary files they are written through)
        where = tmp_path / "dst" / "snapshots"
        return sum(len(n) == 64 for n in os.listdir(where)) if where.exists() else 0

    saved = []
    for _ in range(3):
        before = stored()
        proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "copy", "-r", str(tmp_path / "src-repo"),
                                 "--to", dst_dir, "-q"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while stored() < before + 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for lock in (tmp_path / "dst" / "locks").iterdir():  # a killed process's lock: stale by its pid anyway
            lock.unlink()
        with Repository.open(dst_dir, PASSWORD, ledger=False) as dst:
            assert dst.check().ok
            saved.append(len(dst.snapshots()))
    assert 0 < saved[0] < saved[-1] < 400, saved
    cli("copy", "-r", str(tmp_path / "src-repo"), "--to", dst_dir, "-q", env={"CHUNKVAULT_TO_PASSWORD": PASSWORD})
    with Repository.open(dst_dir, PASSWORD, ledger=False) as dst:
        assert sorted(s.stats["copied_from"] for s in dst.snapshots()) == sorted(ids)
        assert dst.check(read_data=True).ok
        assert duplicates(indexed_blobs(dst.store)) == 0


def test_a_copy_holds_its_map_of_chunk_ids_in_little_more_than_the_ids():
    """A copy maps each chunk's source id to the destination's, held to its end: a dict of them took ~170
    bytes an entry, 2.7 times the 64 bytes of the two ids (a repository of ten million chunks: 1.7 GB); a blob
    table of the keys with a column of the values by row takes ~95."""
    import tracemalloc

    from chunkvault.store import copy

    mapper = copy._BlobMapper(None, None, None, None)
    n = 100_000
    tracemalloc.start()
    try:
        for _ in range(0, n, 1000):  # as ``ensure`` adds each batch copied; the map alone holds them
            mapper.map.update([(os.urandom(32), os.urandom(32)) for _ in range(1000)])
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        mapper.close()
    assert len(mapper.map) == n
    # what Python traced, or what the map counts of its own (its table is no Python object), whichever is more
    assert max(traced, getattr(mapper.map, "memory_bytes", lambda: 0)()) < 1.7 * 64 * n


def test_a_copy_orders_the_chunks_it_sends_holding_little_beside_their_ids(tmp_path, new_repo):
    """A copy orders the chunks the destination lacks as they lie in the source's packs: a tuple of tuples for
    each took ~200 bytes a chunk, held while they were copied (a snapshot of a million new chunks: 200 MB)."""
    import tracemalloc

    from chunkvault.store import copy

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(random.Random(5).randbytes(2 << 20))
    repo = new_repo(chunker={"min_size": 64, "avg_size": 256, "max_size": 1024})
    snap = repo.backup([str(tmp_path / "src")]).snapshot
    ids = list(repo.find_entry(snap, "f").chunk_ids())
    assert len(ids) > 5000
    mapper = copy._BlobMapper(repo._repo, None, None, None)
    tracemalloc.start()
    try:
        batches = list(mapper._batches(ids))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        mapper.close()
    assert sorted(i for b in batches for i in b) == sorted(ids)
    located = [repo._repo.locate(i) for b in batches for i in b]
    assert located == sorted(located, key=lambda loc: (loc.pack_no, loc.offset))
    assert peak < 2.5 * 32 * len(ids)


@pytest.mark.slow
def test_a_copy_holds_nothing_per_chunk_beside_its_map_and_the_destination_s_index(tmp_path, new_repo, monkeypatch):
    """A copy took the ids of all of a snapshot's chunks not copied yet at once, with their order and rounds,
    read ahead as many as 64 MiB of the blob cache held and read 4 MiB a batch: a repository of a million
    chunks of 256 bytes peaked at 640-700 MiB, and here what Python held grew by ~1,200 bytes a chunk.  It
    takes them a window at a time now, its reads are bounded in blobs too, and what Python holds grows by
    little more than the map's column of destination ids (32 bytes a chunk), whatever the snapshot's size.
    The windows, batches, read-ahead and cache, and the manifests' blobs, are made small here, so that a few
    thousand chunks fill many of each."""
    import tracemalloc

    from chunkvault.store import copy

    monkeypatch.setattr(copy, "WINDOW_BLOBS", 256)
    monkeypatch.setattr(copy, "BATCH_BLOBS", 64)
    monkeypatch.setattr(copy, "READ_AHEAD_BLOBS", 128)
    monkeypatch.setattr(copy, "READ_AHEAD_BYTES", 16 << 10)
    small = {"min_size": 1024, "avg_size": 4096, "max_size": 16384}  # the manifests' blobs: ~30 records each
    rnd = random.Random(7)
    peaks = []
    for n in (1500, 4500):
        src = tmp_path / f"src{n}"
        src.mkdir()
        for i in range(n):  # a chunk each, distinct
            (src / f"{i:05}").write_bytes(rnd.randbytes(256))
        repo = new_repo(chunker=small)
        repo.backup([str(src)])
        repo.store._cache.max_blobs = 512
        dst = new_repo(chunker=small, pack_size=64 << 10)
        tracemalloc.start()
        try:
            sent = repo.copy_to(dst)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert sent.blobs_sent == n
    out = tmp_path / "out"
    dst.restore("latest", str(out))
    assert describe(out) == describe(src)
    # ~50 bytes a chunk now (the map's column, the copied snapshot's manifest ids), ~1,200 before
    assert (peaks[1] - peaks[0]) / 3000 < 150
