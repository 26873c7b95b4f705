"""Prune frees what no snapshot needs and nothing else, and survives interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from chunkvault import Repository
from conftest import PASSWORD
from chunkvault.errors import Locked
from chunkvault.store.blob import KIND_DELTA, KIND_ZSTD
from chunkvault.store.locks import SHARED, RepoLock
from chunkvault.store.pack import PackEntry
from chunkvault.store.prune import add_bases, kept_copies, select_packs
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


def test_a_prune_seals_its_new_index_without_the_old_one_held(tmp_path, new_repo, monkeypatch):
    """The old index (a table of every blob) is let go of before the new one is encoded and sealed, which
    held the index a few times over; it is read again after, and every snapshot kept restores."""
    repo, states = build_history(tmp_path, new_repo)
    ids = list(states)
    repo.forget(ids[:3])
    store = repo.store
    held = []
    write_index = store.write_index
    monkeypatch.setattr(store, "write_index", lambda d, **kw: held.append(store._index is not None)
                        or write_index(d, **kw))
    plan = repo.prune(max_unused=0.0)
    assert (plan.delete or plan.repack) and held and not held[-1]  # the new index (after any marker of nothing)
    assert store._index is not None and repo.check(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(ids[-1], str(out))
    assert describe(out) == states[ids[-1]]


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


def test_a_repack_size_limit_takes_the_most_unused_packs_first_and_keeps_the_rest():
    def entry(i, length):
        return PackEntry(bytes([i]) * 32, 1, 0, length, length)

    packs = {bytes([p]) * 32: [entry(p, 10), entry(100 + p, unused)]
             for p, unused in ((1, 20), (2, 90), (3, 40), (4, 0))}
    used = {bytes([p]) * 32 for p in (1, 2, 3, 4)}
    whole = select_packs(packs, {}, used, max_unused=0.05)
    assert [u.pack_id[0] for u in whole.repack] == [1, 2, 3] and whole.repacked_bytes == 30
    part = select_packs(packs, {}, used, max_unused=0.05, max_repack=25)
    assert [u.pack_id[0] for u in part.repack] == [2, 3]  # 90 % and 80 % unused; then 10 bytes were left
    assert [u.pack_id[0] for u in part.keep] == [1, 4]
    assert [u.pack_id[0] for u in part.held_back] == [1] and part.over_limit == 0  # a later run takes it
    none = select_packs(packs, {}, used, max_unused=0.05, max_repack=9)
    assert none.repack == [] and len(none.held_back) == 3 and none.over_limit == 3  # no run with 9 ever does
    assert whole.held_back == [] and whole.to_dict()["held_back_packs"] == 0
    assert none.to_dict()["held_back_packs"] == 3 and none.to_dict()["held_back_over_limit"] == 3


def test_a_prune_limited_in_what_it_repacks_finishes_over_several_runs(tmp_path, new_repo):
    """A disk without room to repack everything at once: each prune repacks a part, every snapshot kept
    restores after each, and the last leaves nothing to repack."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"), pack_size=128 * 1024)
    for i in range(48):  # a few files to a pack
        (src / f"f{i:02}").write_bytes(os.urandom(20_000))
    first = repo.backup([str(src)]).snapshot
    for i in range(48):
        if i % 3:
            os.remove(src / f"f{i:02}")  # two of each three: every pack keeps a part
    state = describe(src)
    kept = repo.backup([str(src)]).snapshot
    repo.forget([first.id])
    whole = repo.prune(dry_run=True, max_unused=0.0)
    assert len(whole.repack) >= 2
    limit = max(u.live_bytes for u in whole.repack)
    runs = 0
    while True:
        assert runs <= len(whole.repack)  # each run repacks one pack at least: no prune is left to loop
        plan = repo.prune(max_unused=0.0, max_repack_size=limit)
        assert plan.repacked_bytes <= limit
        runs += 1
        assert repo.check(read_data=True).ok
        out = tmp_path / f"out-{runs}"
        repo.restore(kept.id, str(out))
        assert describe(out) == state
        if not plan.repack:
            break
    assert runs >= 3  # two packs' live data exceed the limit: a run each, and one that finds nothing left
    assert not plan.held_back


def test_prune_says_which_packs_its_repack_limit_left(tmp_path, new_repo, cli):
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(700_000))
    first = repo.backup([str(src)]).snapshot  # one pack
    os.remove(src / "f0")
    repo.backup([str(src)])
    repo.forget([first.id])
    r = str(tmp_path / "repo")
    for _ in range(2):  # the pack's 2 MB of live data exceed the limit: this limit never repacks it
        said = cli("prune", "-r", r, "--max-repack-size", "1M", "--max-unused", "0").stdout.decode()
        assert "repacked 0 (0 B moved)" in said
        assert ("1 pack(s) worth repacking left for a later prune by --max-repack-size; 1 of them hold more live "
                "data than the whole limit, which no prune with it repacks") in said
    doc = json.loads(cli("prune", "-r", r, "--max-unused", "0", "--json").stdout)
    assert doc["repack_packs"] == 1 and doc["held_back_packs"] == 0


@settings(max_examples=300)
@given(st.data())
def test_every_blob_the_new_index_lists_can_be_read(data):
    """Kept packs stay indexed whole, unused blobs too: whatever prune keeps or moves, each delta it leaves
    listed has its base listed, down the chain (a backup deduplicating against it must be able to read it)."""
    n = data.draw(st.integers(1, 14))
    ids = [bytes([i]) * 32 for i in range(n)]
    bases = [data.draw(st.sampled_from([None, *ids[:i]])) if i else None for i in range(n)]
    entries = [PackEntry(ids[i], 1 if bases[i] is None else 2, 0, data.draw(st.integers(1, 100)), 100, bases[i])
               for i in range(n)]
    packs: dict[bytes, list[PackEntry]] = {}
    for e in entries:
        packs.setdefault(bytes([data.draw(st.integers(0, 3))]) * 32, []).append(e)
    base_of = {e.blob_id: e.base_id for e in entries}
    used = set(data.draw(st.lists(st.sampled_from(ids), max_size=n)))
    for b in list(used):
        while base_of[b] is not None:  # prune's add_bases: used deltas come with their chains
            b = base_of[b]
            used.add(b)
    max_repack = data.draw(st.sampled_from([None, 0, 50, 200]))
    plan = select_packs(packs, {}, used, max_unused=data.draw(st.sampled_from([0.0, 0.3, 0.9])),
                        max_repack=max_repack)
    listed = {e.blob_id for use in plan.keep for e in use.entries} | {e.blob_id for use in plan.repack
                                                                        for e in use.live}
    assert used <= listed
    assert all(base_of[b] in listed for b in listed if base_of[b] is not None)
    assert max_repack is None or plan.repacked_bytes <= max_repack
    assert sorted(u.pack_id for u in plan.keep + plan.repack + plan.delete) == sorted(packs)


@settings(max_examples=300)
@given(st.data())
def test_with_blobs_stored_twice_every_copy_the_new_index_lists_can_be_read(data):
    """As above, with some blobs stored more than once, whole or as deltas against different bases (backups
    running at once): the copy prune keeps live and every copy a kept pack still lists can be read."""
    n = data.draw(st.integers(1, 10))
    ids = [bytes([i]) * 32 for i in range(n)]
    packs: dict[bytes, list[PackEntry]] = {}
    for i in range(n):
        for _ in range(data.draw(st.integers(1, 3))):
            base = data.draw(st.sampled_from([None, *ids[:i]]))
            e = PackEntry(ids[i], KIND_ZSTD if base is None else KIND_DELTA, 0, data.draw(st.integers(1, 100)), 100,
                          base)
            packs.setdefault(bytes([data.draw(st.integers(0, 5))]) * 32, []).append(e)
    used = set(data.draw(st.lists(st.sampled_from(ids), max_size=n)))
    add_bases(used, kept_copies(packs))
    plan = select_packs(packs, {}, used, max_unused=data.draw(st.sampled_from([0.0, 0.3, 0.9])))
    listed = [e for use in plan.keep for e in use.entries] + [e for use in plan.repack for e in use.live]
    listed_ids = {e.blob_id for e in listed}
    assert used <= listed_ids
    assert all(e.base_id in listed_ids for e in listed if e.kind == KIND_DELTA)


def _running_beside(url: str, password: str, monkeypatch) -> Repository:
    """The repository opened as by a backup running beside the next one: it read the index before that one
    stored anything, and does not read it again."""
    beside = Repository.open(url, password)
    beside.store.load_index()
    monkeypatch.setattr(beside.store, "load_index", lambda: None)
    monkeypatch.setattr(beside.store, "drop_stale", lambda **kwargs: None)
    monkeypatch.setattr(beside.store, "refresh_index", lambda: None)
    return beside


def test_a_chunk_two_backups_stored_at_once_keeps_the_base_of_the_copy_prune_keeps(tmp_path, new_repo, password,
                                                                                   monkeypatch):
    """Two backups at once each store a changed chunk: one as a delta against its parent's chunk, the other
    whole.  Forgetting the snapshots the bases served and pruning must leave the other snapshot whole,
    whichever pack of the two copies comes first."""
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(2 << 20))
    (src / "db").write_bytes(data)
    repo = new_repo(str(tmp_path / "repo"), pack_size=1)  # a pack per blob: the copies' packs fall in any order
    cut = {"fixed_chunks": ["db"], "fixed_chunk_size": 64 << 10}
    full = repo.backup([str(src)], kind="full", **cut).snapshot
    for at in range(0, len(data), 64 << 10):
        data[at + 100:at + 200] = os.urandom(100)
    (src / "db").write_bytes(data)
    beside = _running_beside(str(tmp_path / "repo"), password, monkeypatch)
    diff = repo.backup([str(src)], kind="diff", **cut).snapshot
    whole = beside.backup([str(src)], kind="full", delta=False, host="other", **cut).snapshot
    beside.close()
    assert diff.stats["delta_blobs"] >= 16 and whole.stats["added_blobs"] >= diff.stats["delta_blobs"]
    repo.forget([full.id, diff.id])
    repo.prune(max_unused=0.05)
    repo.restore(whole.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "db").read_bytes() == bytes(data)
    assert not repo.check(read_data=True).problems


def test_a_chunk_stored_as_deltas_on_two_bases_reads_after_prune_lists_both_copies_in_one_index(
        tmp_path, new_repo, password, monkeypatch):
    """Two series' backups at once store one changed chunk each as a delta on its own parent's chunk.  A
    prune that keeps both packs lists both copies in one index object: the index must pair the copy it
    holds with that copy's base (it took the other copy's, and every read of the chunk failed as damaged)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cut = {"fixed_chunks": ["db"], "fixed_chunk_size": 64 << 10}
    repo = new_repo(str(tmp_path / "repo"))
    data = bytearray(os.urandom(1 << 20))
    (a / "db").write_bytes(data)
    repo.backup([str(a)], host="A", **cut)
    for at in range(0, len(data), 64 << 10):
        data[at + 100:at + 200] = os.urandom(100)
    (b / "db").write_bytes(data)
    repo.backup([str(b)], host="B", **cut)
    for at in range(0, len(data), 64 << 10):
        data[at + 300:at + 400] = os.urandom(100)
    for src in (a, b):
        (src / "db").write_bytes(data)
        (src / "big").write_bytes(os.urandom(3 << 20))  # other live data: prune keeps both new packs whole
    beside = _running_beside(str(tmp_path / "repo"), password, monkeypatch)
    on_a = repo.backup([str(a)], host="A", **cut).snapshot
    on_b = beside.backup([str(b)], host="B", **cut).snapshot
    beside.close()
    assert on_a.stats["delta_blobs"] >= 16 and on_b.stats["delta_blobs"] >= 16
    plan = repo.prune()
    assert not plan.repack and not plan.delete  # both copies stay, now in one index object
    assert len(list(repo.store.remote.list("index/"))) == 1
    for opened in (repo, Repository.open(str(tmp_path / "repo"), password)):  # the index refreshed, and read anew
        for snap in (on_a, on_b):
            out = tmp_path / f"out-{id(opened)}-{snap.id[:8]}"
            opened.restore(snap.id, str(out))
            assert (out / "db").read_bytes() == bytes(data)
        assert opened.check(read_data=True).ok
    repo.repair_index()
    assert Repository.open(str(tmp_path / "repo"), password).check(read_data=True).ok


def test_an_unused_delta_in_a_kept_pack_keeps_its_base(tmp_path, new_repo):
    """Its base, alone in a pack that is repacked, moves with the live blobs instead of being dropped:
    a file that comes back to that version later is stored by reference to a delta that still reads."""
    src, back = tmp_path / "src", tmp_path / "back"
    src.mkdir()
    back.mkdir()
    repo = new_repo()
    (src / "a").write_bytes(os.urandom(1_000_000))
    (src / "b").write_bytes(os.urandom(4_000_000))
    (src / "d").write_bytes(os.urandom(2_000_000))  # gone with a: the pack is repacked whichever of a's chunks changes
    repo.backup([str(src)])  # one pack: the chunks of a, b and d
    a = bytearray((src / "a").read_bytes())
    a[500_000:504_096] = bytes(4096)
    (src / "a").write_bytes(a)
    (src / "c").write_bytes(os.urandom(1_000_000))
    assert repo.backup([str(src)]).snapshot.stats["delta_blobs"] >= 1  # a pack: a's changed chunk(s), c
    (src / "a").unlink()
    (src / "d").unlink()
    last = repo.backup([str(src)]).snapshot
    repo.forget([s.id for s in repo.snapshots() if s.id != last.id])
    plan = repo.prune()
    assert plan.repack and plan.keep  # the first pack loses a's chunks; the second keeps its unused delta
    assert repo.check().ok
    (back / "a").write_bytes(a)
    again = repo.backup([str(back)]).snapshot
    out = tmp_path / "out"
    repo.restore(again, str(out))
    assert (out / "a").read_bytes() == a


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


@pytest.mark.parametrize("refusal", ["outage", "permission"])
def test_a_pack_in_no_index_whose_header_the_remote_does_not_give_stops_the_prune_and_stays(tmp_path, new_repo,
                                                                                            refusal):
    """A pack in no index whose header could not be read for an outage (the remote gave up) or for its
    user's access was taken for one nothing can be found in, and deleted: it may be the only copy of what
    an index written by whoever may only add took out of the index."""
    from chunkvault.errors import PermissionDenied, RemoteUnavailable
    from chunkvault.store.repository import pack_key

    repo, states = build_history(tmp_path, new_repo, n=3)
    remote = repo.store.remote
    orphan = pack_key(os.urandom(32))
    remote.put(orphan, os.urandom(1000))
    error = RemoteUnavailable("the remote gave up") if refusal == "outage" else PermissionDenied("refused")
    inner_get = remote.get

    def get(key, *args, **kw):
        if key == orphan:
            raise error
        return inner_get(key, *args, **kw)

    remote.get = get
    with pytest.raises(type(error)):
        repo.prune()
    assert remote.stat(orphan) is not None
    remote.get = inner_get
    repo.unlock(remove_all=True)  # after an outage its lock is left to go stale (this process lives on)
    assert [k for k, _ in repo.prune().orphans] == [orphan]


def test_a_pack_in_no_index_in_an_archive_storage_class_stays(tmp_path, new_repo):
    """A pack in no index whose header could not be read for its storage class (S3's GLACIER, where a
    lifecycle rule moves old packs) was taken for one nothing can be found in, and deleted: nothing in it
    is damaged, and it may be the only copy of what a lost index object listed.  It stays, named, and the
    prune goes on."""
    from chunkvault.errors import ObjectArchived, RepositoryStateWarning
    from chunkvault.store.repository import pack_key

    repo, states = build_history(tmp_path, new_repo, n=3)
    remote = repo.store.remote
    archived, leftover = pack_key(os.urandom(32)), pack_key(os.urandom(32))
    remote.put(archived, os.urandom(1000))
    remote.put(leftover, os.urandom(1000))
    inner_get = remote.get

    def get(key, *args, **kw):
        if key == archived:
            raise ObjectArchived(f"S3 GET {key}: object is in an archive storage class")
        return inner_get(key, *args, **kw)

    remote.get = get
    with pytest.warns(RepositoryStateWarning, match=f"{archived} is in no index and in an archive storage class"):
        result = repo.prune()
    assert [k for k, _ in result.orphans] == [leftover]
    assert remote.stat(archived) is not None and remote.stat(leftover) is None


def test_add_bases_keeps_whole_chains_and_names_a_base_in_no_index():
    from chunkvault.errors import CorruptObject

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


def _live(objects):
    superseded = {s for d in objects.values() for s in d.supersedes}
    return {name: d for name, d in objects.items() if bytes.fromhex(name) not in superseded}


@settings(max_examples=300)
@given(st.data())
def test_index_objects_dropped_before_the_new_index_leave_every_needed_pack_indexed(data):
    """Deleting the dead index objects and then their packs never unlists a pack that is not being deleted,
    never brings a superseded index object back, and deletes only packs no remaining index names."""
    from chunkvault.store.indexfile import IndexData
    from chunkvault.store.prune import dead_index_objects

    from chunkvault.store.pack import PackEntry

    names = [bytes([0xA0 + i]) * 32 for i in range(data.draw(st.integers(1, 6)))]
    pack_ids = [bytes([i]) * 32 for i in range(6)]
    blob_ids = [bytes([0xB0 + i]) * 32 for i in range(8)]
    # each pack's blobs, some of them deltas on another blob (that pack's copy of a blob, or another's)
    contents = {p: [PackEntry(b, 1, 0, 1, 1, data.draw(st.one_of(st.none(), st.sampled_from(blob_ids))))
                    for b in data.draw(st.lists(st.sampled_from(blob_ids), max_size=3, unique=True))]
                for p in pack_ids}
    objects = {}
    for name in names:
        packs = data.draw(st.lists(st.sampled_from(pack_ids), max_size=4, unique=True))
        supersedes = data.draw(st.lists(st.sampled_from(names + [b"\xff" * 32]), max_size=2, unique=True))
        objects[name.hex()] = IndexData({p: contents[p] for p in packs}, [s for s in supersedes if s != name])
    dead_packs = set(data.draw(st.lists(st.sampled_from(pack_ids), unique=True)))
    live = _live(objects)
    dead, freed = dead_index_objects(live, objects, dead_packs)
    assert set(dead) <= set(live) and freed <= dead_packs
    remaining = {n: d for n, d in objects.items() if n not in dead}
    assert set(_live(remaining)) == set(live) - set(dead)
    indexed_before = {p for d in live.values() for p in d.packs}
    indexed_after = {p for d in _live(remaining).values() for p in d.packs}
    assert indexed_after == indexed_before - freed
    assert indexed_before - indexed_after <= dead_packs

    def blobs(packs):
        return {e.blob_id for p in packs for e in contents[p]}

    # a delta still listed in between finds every base it found before (killed there, it stays readable)
    for p in indexed_after:
        for e in contents[p]:
            if e.base_id in blobs(indexed_before):
                assert e.base_id in blobs(indexed_after), (e, dead)
    for name, d in live.items():  # and nothing that could go is left for later, unless it may hold a base
        others = {p for n, o in live.items() if n != name for p in o.packs}
        if (set(d.packs) <= dead_packs and not {bytes.fromhex(n) for n in objects} & set(d.supersedes)
                and not blobs(set(d.packs)) & {e.base_id for p in others for e in contents[p]}):
            assert name in dead


def test_a_prune_after_a_forget_sees_what_a_backup_saved_in_between(tmp_path, new_repo, password):
    """`forget --prune`: the index this process read for the forget lacks the new snapshot's manifest blobs,
    which is no damage (it was reported as a corrupt object)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)]).snapshot
    (src / "f").write_bytes(os.urandom(50_000))
    repo.backup([str(src)])
    repo.forget([first.id])
    other = tmp_path / "other"
    other.mkdir()
    (other / "g").write_bytes(os.urandom(50_000))
    with Repository.open(str(tmp_path / "repo"), password) as beside:
        saved = beside.backup([str(other)]).snapshot
    repo.prune(max_unused=0)
    repo.restore(saved.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "g").read_bytes() == (other / "g").read_bytes()
    assert repo.check(read_data=True).ok


def test_prune_refuses_while_a_differential_s_parent_object_is_missing(tmp_path, new_repo, password):
    """A snapshot object the storage lost for now (or an older copy of a rebased differential, naming a
    forgotten parent): forget already refused; prune deleted the parent's data, so the chain stayed lost
    when the object came back."""
    from chunkvault.errors import CorruptObject

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3_000_000))
    (src / "small").write_bytes(b"a")
    repo = new_repo(str(tmp_path / "repo"))
    full = repo.backup([str(src)]).snapshot
    (src / "small").write_bytes(b"ab")
    diff = repo.backup([str(src)]).snapshot
    assert diff.parent == full.id
    saved = (tmp_path / "repo" / "snapshots" / full.id).read_bytes()
    (tmp_path / "repo" / "snapshots" / full.id).unlink()
    before = sorted(p.name for p in (tmp_path / "repo" / "data").rglob("*"))
    again = Repository.open(str(tmp_path / "repo"), password)
    with pytest.raises(CorruptObject, match=f"{diff.id[:8]}.*{full.id[:8]}, which is missing.*forget"):
        again.prune()
    assert sorted(p.name for p in (tmp_path / "repo" / "data").rglob("*")) == before
    (tmp_path / "repo" / "snapshots" / full.id).write_bytes(saved)
    again = Repository.open(str(tmp_path / "repo"), password)
    again.restore(diff.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "big").read_bytes() == (src / "big").read_bytes()


def test_a_prune_stopped_before_its_new_index_leaves_no_delta_without_its_base(tmp_path, new_repo, monkeypatch):
    """An unused delta waiting in a pack to repack stays indexed until the new index replaces the old: its
    base's pack had gone early with an index object that named nothing else, so a prune stopped in between
    (SIGKILL, Ctrl-C) left it unreadable, check failed, and a later backup deduplicated against it and saved
    a snapshot that could not be restored.  That index object now waits for the new index."""
    from chunkvault.store import prune as prune_mod

    src = tmp_path / "src"
    src.mkdir()
    a = bytearray(os.urandom(4_000_000))
    (src / "A").write_bytes(a)
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)]).snapshot
    a[1_000_000:1_003_000] = os.urandom(3000)  # one chunk changed a little: stored as a delta on the first's
    (src / "A").write_bytes(a)
    (src / "B").write_bytes(os.urandom(3_000_000))
    second = repo.backup([str(src)]).snapshot
    assert second.stats["delta_blobs"] >= 1
    os.remove(src / "A")
    repo.backup([str(src)])
    repo.forget([first.id, second.id])

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_mod, "replace_index", stopped)
    with pytest.raises(KeyboardInterrupt):
        repo.prune(max_unused=0)
    monkeypatch.undo()
    assert repo.check(read_data=True).ok
    (src / "A").write_bytes(a)  # that version comes back: deduplicated against what the index lists
    again = repo.backup([str(src)]).snapshot
    repo.restore(again.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "A").read_bytes() == bytes(a)
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok


@pytest.mark.parametrize("error", ["PermissionDenied", "RemoteError", "RemoteUnavailable"])
def test_a_store_that_refuses_the_clean_up_of_unfinished_writes_is_still_pruned(tmp_path, new_repo, monkeypatch,
                                                                                 error):
    """An S3 policy may allow deletes but not listing unfinished uploads, an S3-compatible store may not
    know the request, or fail it: that step is skipped, and said."""
    from chunkvault import errors

    repo, states = build_history(tmp_path, new_repo, n=3)
    repo.forget(list(states)[:2])

    def refuse(older_than=3600.0):
        raise getattr(errors, error)("s3:ListBucketMultipartUploads: no")

    monkeypatch.setattr(repo.store.remote, "cleanup_temp", refuse)
    plan = repo.prune()
    assert plan.delete and plan.freed_bytes and "ListBucketMultipartUploads" in plan.unfinished_error
    assert repo.check(read_data=True).ok


def test_the_space_a_prune_frees_is_what_it_said(tmp_path, new_repo):
    """The repacked blobs' entries in their new pack's header count against what a repack frees: with many
    small blobs they are a sixth of the data moved, and the figure said 26 KiB more than the disk got back."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"), pack_size=64 * 1024)
    for i in range(1200):
        (src / f"f{i:04}").write_bytes(os.urandom(200))
    first = repo.backup([str(src)]).snapshot
    for i in range(0, 1200, 2):
        os.remove(src / f"f{i:04}")
    repo.backup([str(src)], kind="full")
    repo.forget([first.id])
    packs_before = set(p.name for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file())
    before = du(tmp_path / "repo" / "data")
    plan = repo.prune(max_unused=0.0)
    assert plan.repack
    written = set(p.name for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()) - packs_before
    assert 0 <= plan.freed_bytes - (before - du(tmp_path / "repo" / "data")) <= 64 * len(written)


def test_a_chunk_whose_delta_a_prune_dropped_stored_whole_later_reads_in_the_same_process(tmp_path, new_repo):
    """A Repository kept open (a backup tool's, the scheduler's) loads the index again after a prune: the
    delta bases of the index before it went too.  One left behind made a chunk stored whole after its delta
    was dropped read as that delta: the restore in the same process called it damaged."""
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    repo = new_repo()
    v1 = bytearray(os.urandom(4 * 65536))
    (src / "f").write_bytes(v1)
    repo.backup([str(src)], fixed_chunks=["f"], fixed_chunk_size=65536)
    v2 = bytearray(v1)
    v2[65536 + 7] ^= 1
    (src / "f").write_bytes(v2)
    second = repo.backup([str(src)], fixed_chunks=["f"], fixed_chunk_size=65536).snapshot
    assert second.stats["delta_blobs"] == 1
    repo.forget([second.id])
    repo.prune(max_unused=0.0)
    (other / "f").write_bytes(v2)
    third = repo.backup([str(other)], fixed_chunks=["f"], fixed_chunk_size=65536).snapshot
    assert third.stats["delta_blobs"] == 0 and third.stats["added_blobs"] == 1  # the changed chunk, whole
    repo.restore(third, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == v2


@pytest.mark.parametrize("prunes_after", [0, 1, 2])
def test_an_index_object_a_prune_deleted_put_back_counts_no_more(tmp_path, new_repo, prunes_after):
    """Whoever holds the storage keeps an index object and puts it back after a prune deleted it (and its
    packs): it named data that is gone, and the next backup of the same files deduplicated against it
    (0 B added, exit 0, a snapshot that did not restore).  Every index that replaces it supersedes it, so
    it counts no more, however many prunes later it comes back."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(300_000))
    repo_dir = tmp_path / "repo"
    repo = new_repo(str(repo_dir), ledger=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "y").write_bytes(b"kept")
    repo.backup([str(tmp_path / "other")])  # a snapshot that stays, so every prune writes an index
    first = repo.backup([str(src)]).snapshot
    saved = tmp_path / "saved-index"
    shutil.copytree(repo_dir / "index", saved)
    repo.forget([first.id])
    repo.prune()
    for i in range(prunes_after):  # more history, more prunes: the replaced index objects go too
        (tmp_path / "other" / f"n{i}").write_bytes(os.urandom(1000))
        repo.backup([str(tmp_path / "other")], kind="full")
        repo.forget([repo.snapshots()[0].id])
        repo.prune()
    for old in saved.iterdir():
        if not (repo_dir / "index" / old.name).exists():
            shutil.copy(old, repo_dir / "index" / old.name)

    repo = Repository.open(str(repo_dir), PASSWORD, ledger=False)
    assert repo.backup([str(src)]).snapshot.stats["added_raw_bytes"] >= 300_000  # stored again, not found in the put-back index
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "x.bin").read_bytes() == (src / "x.bin").read_bytes()
    assert not repo.check(read_data=True).problems


def test_a_prune_killed_after_deleting_dead_index_objects_still_supersedes_them(tmp_path, new_repo, monkeypatch):
    """Index objects naming only packs to delete go first (room on a full disk); killed before the new
    index, their names, and what they superseded, must still be carried forward by the next prune."""
    import shutil

    from chunkvault.store import prune as prune_module

    for d in ("src", "other"):
        (tmp_path / d).mkdir()
    (tmp_path / "src" / "x.bin").write_bytes(os.urandom(300_000))
    (tmp_path / "other" / "y").write_bytes(os.urandom(5000))
    repo_dir = tmp_path / "repo"
    repo = new_repo(str(repo_dir), ledger=False)
    other = repo.backup([str(tmp_path / "other")]).snapshot
    first = repo.backup([str(tmp_path / "src")]).snapshot
    shutil.copytree(repo_dir / "index", tmp_path / "saved-index")
    repo.forget([first.id])
    repo.prune()
    (tmp_path / "other" / "y").write_bytes(os.urandom(5000))
    repo.backup([str(tmp_path / "other")], kind="full")
    repo.forget([other.id])  # its index object now names only a pack to delete

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(prune_module, "replace_index", killed)
        with pytest.raises(KeyboardInterrupt):
            repo.prune()
    repo = Repository.open(str(repo_dir), PASSWORD, ledger=False)
    repo.prune()
    for old in (tmp_path / "saved-index").iterdir():
        if not (repo_dir / "index" / old.name).exists():
            shutil.copy(old, repo_dir / "index" / old.name)
    repo = Repository.open(str(repo_dir), PASSWORD, ledger=False)
    assert repo.backup([str(tmp_path / "src")]).snapshot.stats["added_raw_bytes"] >= 300_000
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "x.bin").read_bytes() == (tmp_path / "src" / "x.bin").read_bytes()


def test_a_prune_with_nothing_to_do_leaves_the_index_as_it_is(tmp_path, new_repo):
    """It wrote the one index object anew and deleted the old each time: on a disk with a few KiB free every
    prune failed (exit 14), and every other client read the whole index again."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    (src / "b").write_bytes(os.urandom(300_000))
    repo.backup([str(src)])
    index = tmp_path / "repo" / "index"
    assert len(os.listdir(index)) == 2
    repo.prune()  # two objects: compacted into one
    (compacted,) = os.listdir(index)
    for _ in range(2):
        plan = repo.prune()
        assert plan.index_unchanged and os.listdir(index) == [compacted]
    repo.forget([repo.snapshots()[0].id])
    (src / "b").unlink()
    repo.backup([str(src)])
    repo.forget([s.id for s in repo.snapshots()[:-1]])
    plan = repo.prune(max_unused=0)
    assert not plan.index_unchanged and os.listdir(index) != [compacted]  # b's data freed: written anew
    out = tmp_path / "out"
    repo.restore("latest", str(out))
    assert sorted(os.listdir(out)) == ["a"]


def _one_file_backed_up_and_its_index(tmp_path, new_repo, seed: int):
    """(source, repository, snapshot, index object names, pack id -> entries) of one 3 MiB file backed up."""
    import random

    from chunkvault.store.indexfile import decode_index

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(random.Random(seed).randbytes(3 << 20))
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    store = repo.store
    names = store.index_names()
    packs = {}
    for n in names:
        packs.update(decode_index(store.sealer, store.remote.get(f"index/{n}"), n).packs)
    return src, repo, snap, names, packs


def test_a_pack_an_added_index_took_out_of_the_index_is_not_pruned_while_it_holds_what_snapshots_use(
        tmp_path, new_repo):
    """Whoever may only add objects (an append-only token) wrote a pack of junk and an index object that
    points a real pack's blobs at it and supersedes every other: the next prune deleted the real pack as a
    killed backup's leftover, for good.  It is kept, with a warning, and `repair index` makes all whole."""
    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.store.crypto import content_name
    from chunkvault.store.indexfile import IndexData
    from chunkvault.store.repository import pack_key

    src, repo, snap, names, packs = _one_file_backed_up_and_its_index(tmp_path, new_repo, 4)
    store = repo.store
    real = max(packs, key=lambda p: sum(e.length for e in packs[p]))
    entries = packs.pop(real)
    junk = bytearray(os.urandom(max(e.offset + e.length for e in entries) + 64))
    # The manifest's copy is the real one: the prune reads it where the index says (its chunks it does not).
    stored, manifest = store.remote.get(pack_key(real)), {bytes.fromhex(h) for h in snap.manifest}
    for e in entries:
        if e.blob_id in manifest:
            junk[e.offset:e.offset + e.length] = stored[e.offset:e.offset + e.length]
    junk = bytes(junk)
    junk_id = bytes.fromhex(content_name(junk))
    store.remote.put(pack_key(junk_id), junk, if_absent=True)
    packs[junk_id] = entries
    store.write_index(IndexData(packs=packs, supersedes=[bytes.fromhex(n) for n in names]))
    with pytest.warns(RepositoryStateWarning, match=f"{pack_key(real)} is in no index but holds"):
        plan = repo.prune()
    assert pack_key(real) not in [key for key, _ in plan.orphans]
    assert store.remote.stat(pack_key(real)) is not None
    repo.repair_index()
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()


def test_delta_copies_sealed_over_other_bytes_do_not_let_a_prune_delete_the_real_pack(tmp_path, new_repo):
    """As above, but the added pack holds deltas sealed with the key to the real blobs' ids, over a base of
    junk: they authenticate, and the prune took that for their holding the blobs and deleted the real pack
    for good.  A copy that is to stand in for one about to be deleted is decoded and hashed, deltas too."""
    import zstandard

    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.store.blob import DELTA_DICT, KIND_DELTA, KIND_RAW, seal_blob
    from chunkvault.store.crypto import content_name
    from chunkvault.store.indexfile import IndexData
    from chunkvault.store.pack import PackBuilder
    from chunkvault.store.repository import pack_key

    src, repo, snap, names, packs = _one_file_backed_up_and_its_index(tmp_path, new_repo, 5)
    store = repo.store
    manifest = {bytes.fromhex(h) for h in snap.manifest}
    junk = b"junk" * 64
    junk_id = store.blob_id(junk)
    builder = PackBuilder()
    builder.add(junk_id, KIND_RAW, bytes(seal_blob(store.sealer, junk_id, KIND_RAW, junk)), len(junk))
    real = set()
    for pid, entries in packs.items():
        for e in entries:
            plain = bytes(store.read_blob(e.blob_id))
            if e.blob_id in manifest:  # the snapshot stays readable, so the prune goes on
                builder.add(e.blob_id, KIND_RAW, bytes(seal_blob(store.sealer, e.blob_id, KIND_RAW, plain)),
                            len(plain))
                continue
            real.add(pid)
            other = bytes([DELTA_DICT]) + zstandard.ZstdCompressor().compress(os.urandom(len(plain)))
            builder.add(e.blob_id, KIND_DELTA, bytes(seal_blob(store.sealer, e.blob_id, KIND_DELTA, other,
                                                               base_id=junk_id)), len(plain), junk_id)
    data = bytes(builder.finish(store.sealer))
    added = bytes.fromhex(content_name(data))
    store.remote.put(pack_key(added), data, if_absent=True)
    store.write_index(IndexData(packs={added: builder.entries}, supersedes=[bytes.fromhex(n) for n in names]))
    assert real
    with pytest.warns(RepositoryStateWarning, match="is in no index but holds"):
        plan = repo.prune()
    assert not {key for key, _ in plan.orphans} & {pack_key(p) for p in real}
    assert all(store.remote.stat(pack_key(p)) is not None for p in real)
    repo.repair_index()
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()


def test_a_damaged_blob_a_repack_would_move_stops_the_prune_before_it_deletes_anything(tmp_path, new_repo):
    """Copied unchecked into a new pack, its damaged pack deleted, and exit 0: `check` then named a pack that
    was gone, and the restore failed."""
    import random

    from chunkvault.errors import CorruptObject

    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(8)
    (src / "keep").write_bytes(rnd.randbytes(600_000))
    (src / "gone").write_bytes(rnd.randbytes(600_000))
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(src)]).snapshot
    (src / "gone").unlink()
    repo.backup([str(src)])
    repo.forget([first.id])
    packs = sorted(p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file())
    store = repo.store
    keep_id = next(e.chunk_ids()[0] for e in repo.tree("latest") if e.path.endswith(b"keep"))
    loc = store.locate(keep_id)
    victim = next(p for p in packs if p.name == store.pack_ids[loc.pack_no].hex())
    data = bytearray(victim.read_bytes())
    data[loc.offset + loc.length // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptObject, match=f"blob {keep_id.hex()}.*nothing was deleted: `repair packs "
                                            f"{victim.name[:12]}`"):
        repo.prune(max_unused=0)
    assert victim.exists()


def test_a_manifest_read_from_its_other_copy_while_the_prune_plans_keeps_that_copy(tmp_path, new_repo, monkeypatch):
    """A manifest blob stored twice, the copy the index holds (the first in pack id order) damaged: the
    prune's read of the manifest goes over to the other copy, in the index the prune's table of the copies
    it keeps shares.  That table then named the other copy's pack with the first copy's entry number: the
    blob was live in neither pack, the damaged one deleted, the good one repacked without it, and the
    snapshot lost its manifest.  The copy of the index points at the entries the table does: a copy of every
    blob's id and fields took 55 bytes a blob more."""
    import random

    from chunkvault.errors import RepositoryStateWarning
    from chunkvault.store.blob import KIND_RAW, seal_blob
    from chunkvault.store.crypto import content_name
    from chunkvault.store.indexfile import IndexData
    from chunkvault.store.pack import PackBuilder
    from chunkvault.store.repository import pack_key

    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    for i in range(3):
        (src / f"f{i}").write_bytes(rnd.randbytes(200_000))
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    store = repo.store
    m = bytes.fromhex(snap.manifest[0])
    loc = store.locate(m)
    first = store.pack_ids[loc.pack_no]
    k = next(i for i, e in enumerate(store.read_index_object(store.index_names()[0]).packs[first]) if e.blob_id == m)
    assert k >= 2  # after the files' chunks: another number than its copy's below
    envelope = (tmp_path / "repo" / pack_key(first)).read_bytes()[loc.offset:loc.offset + loc.length]
    while True:  # the second copy in a pack of its own, after an unused blob, in a pack whose id comes first
        builder = PackBuilder()
        junk = rnd.randbytes(100)
        junk_id = store.blob_id(junk)
        builder.add(junk_id, KIND_RAW, bytes(seal_blob(store.sealer, junk_id, KIND_RAW, junk)), len(junk))
        builder.add(m, loc.flags, envelope, loc.raw_length)
        data = bytearray(builder.finish(store.sealer))
        second = bytes.fromhex(content_name(bytes(data)))
        if second < first:
            break
    at = next(e.offset for e in builder.entries.decode() if e.blob_id == m)
    data[at + loc.length // 2] ^= 1  # the copy held, first in pack id order, is damaged
    store.remote.put(pack_key(second), bytes(data), if_absent=True)
    store.write_index(IndexData(packs={second: builder.entries}, supersedes=[]))
    repo.close()
    repo = Repository.open(str(tmp_path / "repo"), PASSWORD)
    from chunkvault.store.blobindex import BlobIndex

    made, copy = [], BlobIndex.copy
    monkeypatch.setattr(BlobIndex, "copy", lambda self: made.append(copy(self)) or made[-1])
    with pytest.warns(RepositoryStateWarning):
        repo.prune(max_unused=0)
    assert [c.by_ref for c in made] == [True]
    repo.restore(snap.id, str(tmp_path / "out"))
    for i in range(3):
        assert (tmp_path / "out" / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
    assert Repository.open(str(tmp_path / "repo"), PASSWORD).check(read_data=True).ok


def test_a_used_blob_live_in_no_pack_stops_the_prune_before_it_deletes_anything(tmp_path, new_repo, monkeypatch):
    """Every used blob is live in the one pack its kept copy lies in; were one live in none (a table pointing
    at a copy no pack's entries are), its packs would go with it: the prune stops instead, nothing deleted."""
    from array import array

    from chunkvault.errors import ChunkvaultError
    from chunkvault.store.packtable import KeptCopies, LiveEntries

    repo, states = build_history(tmp_path, new_repo)
    repo.forget(list(states)[:3])
    live_in = KeptCopies.live_in

    def one_short(self, no, used):
        live, total, live_bytes, entry_bytes = live_in(self, no, used)
        return LiveEntries(live.entries, array("I", list(live.numbers)[1:])), total, live_bytes, entry_bytes

    monkeypatch.setattr(KeptCopies, "live_in", one_short)
    before = sorted(p.name for p in (tmp_path / "repo").rglob("*") if p.is_file())
    with pytest.raises(ChunkvaultError, match="live in no pack it keeps; nothing was deleted"):
        repo.prune(max_unused=0)
    assert sorted(p.name for p in (tmp_path / "repo").rglob("*") if p.is_file()) == before
    monkeypatch.undo()
    repo.prune(max_unused=0)
    assert repo.check(read_data=True).ok
