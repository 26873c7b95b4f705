"""A blob stored twice (two backups at once) is read from its other copy when the one the index holds is
damaged or lost: a restore of what a good copy still holds succeeds, with a warning naming both packs."""
import os
import random
import warnings

import pytest

from chunkvault import Repository
from chunkvault.errors import CorruptObject, RepositoryStateWarning

from test_corruption import flip
from test_damaged_storage import chunk_ids
from test_prune import _running_beside

CUT = {"fixed_chunks": ["db"], "fixed_chunk_size": 64 << 10}


def pack_of(repo_dir, loc, store):
    name = store.pack_ids[loc.pack_no].hex()
    return repo_dir / "data" / name[:2] / name


def copies_of(store, blob_id):
    """The held copy's location and the other copies' (location, base)."""
    return store.locate(blob_id), store._copies.get(blob_id, [])


@pytest.fixture
def stored_twice(tmp_path, new_repo, password, monkeypatch):
    """A database file backed up by two backups at once: each of its chunks stored twice, in two packs; in
    ``delta`` mode one backup stores the changed chunks as deltas on its parent's, the other whole."""
    def make(delta: bool):
        src = tmp_path / "src"
        src.mkdir()
        data = bytearray(random.Random(5).randbytes(1 << 20))
        (src / "db").write_bytes(data)
        repo_dir = tmp_path / "repo"
        repo = new_repo(str(repo_dir), pack_size=1)  # a pack per blob
        repo.backup([str(src)], kind="full", **CUT)
        if delta:
            for at in range(0, len(data), 64 << 10):
                data[at + 100:at + 200] = os.urandom(100)
            (src / "db").write_bytes(data)
        else:
            (src / "db").write_bytes(random.Random(6).randbytes(1 << 20))
        beside = _running_beside(str(repo_dir), password, monkeypatch)
        first = repo.backup([str(src)], kind="diff", **CUT).snapshot
        second = beside.backup([str(src)], kind="full", delta=False, host="other", **CUT).snapshot
        beside.close()
        monkeypatch.undo()
        reopened = Repository.open(str(repo_dir), password)
        return repo_dir, reopened, first, second, (src / "db").read_bytes()
    return make


@pytest.mark.parametrize("damage", ["flipped", "lost"])
def test_a_blob_whose_held_copy_is_damaged_is_read_from_its_other_copy(stored_twice, tmp_path, damage):
    repo_dir, repo, first, second, content = stored_twice(delta=False)
    ids = chunk_ids(repo, first, "db")
    assert ids == chunk_ids(repo, second, "db")
    repo.store.load_index()
    held, others = copies_of(repo.store, ids[3])
    assert len(others) == 1 and others[0][0].pack_no != held.pack_no
    other = others[0][0]
    victim = pack_of(repo_dir, held, repo.store)
    if damage == "flipped":
        flip(victim, held.offset + held.length // 2)
    else:
        os.remove(victim)
    out = tmp_path / "out-first"
    with pytest.warns(RepositoryStateWarning, match=f"copy in pack {victim.name} is unreadable") as caught:
        repo.restore(first.id, str(out), processes=1)
    assert (out / "db").read_bytes() == content
    assert repo.store.locate(ids[3]) == other  # gone over to the other copy, once for all
    assert pack_of(repo_dir, other, repo.store).name in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repo.restore(second.id, str(tmp_path / "out-second"))
    assert (tmp_path / "out-second" / "db").read_bytes() == content


def test_a_blob_whose_copies_are_all_damaged_is_an_error_naming_it(stored_twice, tmp_path):
    repo_dir, repo, first, second, content = stored_twice(delta=False)
    blob = chunk_ids(repo, first, "db")[2]
    repo.store.load_index()
    held, others = copies_of(repo.store, blob)
    for loc in (held, others[0][0]):
        flip(pack_of(repo_dir, loc, repo.store), loc.offset + 40)
    with pytest.raises(CorruptObject, match=blob.hex()):
        repo.store.read_blob(blob)


def test_a_blob_whose_whole_copy_is_lost_is_read_from_its_delta_copy_and_base(stored_twice, tmp_path):
    """The index holds the copy stored whole; lost, the blob is decoded from its delta copy and that copy's
    base (which the whole copy did not have)."""
    repo_dir, repo, first, second, content = stored_twice(delta=True)
    assert first.stats["delta_blobs"] >= 16
    blob = chunk_ids(repo, first, "db")[5]
    repo.store.load_index()
    held, others = copies_of(repo.store, blob)
    (other, base), = others
    assert repo.store.delta_base(blob) is None and base is not None  # held whole, the other a delta
    os.remove(pack_of(repo_dir, held, repo.store))
    with pytest.warns(RepositoryStateWarning, match="unreadable"):
        repo.restore(first.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "db").read_bytes() == content
    assert (repo.store.locate(blob), repo.store.delta_base(blob)) == (other, base)


def test_a_prune_keeps_the_delta_copy_when_the_whole_copy_it_would_keep_is_damaged(stored_twice, tmp_path):
    """The copy stored whole is the one a prune keeps, unless it fails to verify: then the delta copy and its
    base stay, and the damaged pack goes.  Keeping the damaged copy deleted the only good one."""
    repo_dir, repo, first, second, content = stored_twice(delta=True)
    blob = chunk_ids(repo, first, "db")[5]
    repo.store.load_index()
    held, ((other, base),) = copies_of(repo.store, blob)
    assert repo.store.delta_base(blob) is None and base is not None
    victim = pack_of(repo_dir, held, repo.store)
    flip(victim, held.offset + held.length // 2)
    repo.forget([second.id])  # nothing else holds the damaged pack's blob: the prune deletes that pack
    with pytest.warns(RepositoryStateWarning, match=f"blob {blob.hex()}: its copy in .* does not verify"):
        repo.prune(max_unused=0)
    assert not victim.exists()
    repo.store.load_index()
    assert repo.store.locate(blob).pack_no is not None and repo.store.delta_base(blob) == base
    repo.restore(first.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "db").read_bytes() == content
    assert repo.check(read_data=True).ok


def test_a_prune_spurns_a_damaged_copy_in_its_one_table_of_the_blobs(stored_twice, monkeypatch):
    """Where the copy kept fails to verify, the prune keeps the other in the table it holds (the repository's
    index), where a second table of every blob's copy kept took as much again; the index then reads the copy
    kept, with its base, and the damaged pack is the one to go."""
    from chunkvault.store import prune as prune_mod
    from chunkvault.store.packtable import KeptCopies

    repo_dir, repo, first, second, content = stored_twice(delta=True)
    blob = chunk_ids(repo, first, "db")[5]
    store = repo.store
    store.load_index()
    held, ((other, base),) = copies_of(store, blob)
    victim = store.pack_ids[held.pack_no]
    flip(pack_of(repo_dir, held, store), held.offset + held.length // 2)
    repo.forget([second.id])
    monkeypatch.setattr(KeptCopies, "_build", staticmethod(lambda *a: pytest.fail("a second table of the blobs")))
    with pytest.warns(RepositoryStateWarning, match=f"blob {blob.hex()}: its copy in .* does not verify"):
        plan = prune_mod.plan_prune(store, max_unused=0)
    assert store.delta_base(blob) == base and store.locate(blob)[:2] == other[:2]
    assert victim in {u.pack_id for u in plan.delete}
    assert store.pack_ids[other.pack_no] not in {u.pack_id for u in plan.delete}



def test_a_read_that_went_over_to_a_delta_copy_reads_after_the_prune_keeps_a_third_copy(stored_twice, monkeypatch):
    """A chunk stored three times: whole (the copy held, damaged), as a delta, and whole again in a pack after
    both.  A read while the prune plans (a manifest's, or a delta's base) goes over to the first other copy,
    the delta, in a copy of the prune's table; the prune then keeps the second whole copy, and the index,
    left pointing at the delta with the kept copy's base (none), called the chunk damaged: it reads the copy
    the prune keeps."""
    import random

    from chunkvault.store import prune as prune_mod
    from chunkvault.store.blob import KIND_RAW, seal_blob
    from chunkvault.store.crypto import content_name
    from chunkvault.store.indexfile import IndexData
    from chunkvault.store.pack import PackBuilder
    from chunkvault.store.repository import pack_key

    repo_dir, repo, first, second, content = stored_twice(delta=True)
    blob = chunk_ids(repo, first, "db")[5]
    store = repo.store
    store.load_index()
    held, ((other, base),) = copies_of(store, blob)
    assert store.delta_base(blob) is None and base is not None
    envelope = (repo_dir / pack_key(store.pack_ids[held.pack_no])).read_bytes()[held.offset:held.offset + held.length]
    rnd = random.Random(3)
    while True:  # the third copy, whole, in a pack whose id comes after the two others'
        builder = PackBuilder()
        junk = rnd.randbytes(100)
        junk_id = store.blob_id(junk)
        builder.add(junk_id, KIND_RAW, bytes(seal_blob(store.sealer, junk_id, KIND_RAW, junk)), len(junk))
        builder.add(blob, held.flags, envelope, held.raw_length)
        data = builder.finish(store.sealer)
        third = bytes.fromhex(content_name(bytes(data)))
        if third > max(store.pack_ids[held.pack_no], store.pack_ids[other.pack_no]):
            break
    store.remote.put(pack_key(third), bytes(data), if_absent=True)
    store.write_index(IndexData(packs={third: builder.entries}, supersedes=[]))
    flip(pack_of(repo_dir, held, store), held.offset + held.length // 2)
    repo.forget([second.id])  # the delta copy's pack goes: the copy kept is read, and spurned
    mark_used = prune_mod.mark_used

    def reading(repo_, known):
        out = mark_used(repo_, known)
        with pytest.warns(RepositoryStateWarning, match=f"blob {blob.hex()} is read from its copy"):
            assert repo_.read_blob(blob) == content[5 << 16:6 << 16]
        assert repo_.delta_base(blob) == base  # the delta copy, in a copy of the prune's table
        return out

    monkeypatch.setattr(prune_mod, "mark_used", reading)
    with pytest.warns(RepositoryStateWarning, match=f"blob {blob.hex()}: its copy in .* does not verify"):
        plan = prune_mod.plan_prune(store, max_unused=0)
    assert third in {u.pack_id for u in plan.keep + plan.repack}
    assert store.read_blob(blob) == content[5 << 16:6 << 16]
    assert store.delta_base(blob) is None and store.pack_ids[store.locate(blob).pack_no] == third


def test_the_other_copies_are_known_whatever_order_the_index_objects_come_in(stored_twice):
    """The copy stored whole is held before a delta copy either way; the delta copy is known as the other,
    with its own base, whether its index object came first (then the whole copy took its place) or after."""
    repo_dir, repo, first, second, content = stored_twice(delta=True)
    store = repo.store
    ids = chunk_ids(repo, first, "db")
    names = store.index_names()
    objects = [(n, got) for n, got in store.read_index_objects(names)]
    seen = []
    for order in (objects, objects[::-1]):
        store.install_index(names, order)
        held = [store.locate(b) for b in ids]
        assert all(loc.flags != 2 for loc in held)  # KIND_DELTA: the whole copies are held
        others = [store._copies.get(b) for b in ids]
        assert all(o is not None and len(o) == 1 and o[0][1] is not None for o in others)
        seen.append((held, others))
    assert seen[0] == seen[1]


def test_repair_packs_keeps_a_blob_whose_other_copy_is_in_a_pack_that_is_gone(stored_twice, tmp_path):
    """The other copy's pack indexed but missing: the blob was taken for kept there, and deleted with the
    pack named, though that pack held it whole."""
    repo_dir, repo, first, second, content = stored_twice(delta=False)
    blob = chunk_ids(repo, first, "db")[4]
    repo.store.load_index()
    held, others = copies_of(repo.store, blob)
    os.remove(pack_of(repo_dir, others[0][0], repo.store))
    named = pack_of(repo_dir, held, repo.store).name
    report = repo.repair_packs([named], dry_run=False)
    (salvage,) = report.salvaged
    assert salvage.salvaged == 1 and not salvage.lost
    assert repo.store.read_blob(blob) is not None
    repo.restore(first.id, str(tmp_path / "out"), processes=1)
    assert (tmp_path / "out" / "db").read_bytes() == content


@pytest.mark.parametrize("damage", ["flipped", "lost"])
def test_check_names_the_damaged_copy_but_no_file_when_another_copy_reads(stored_twice, tmp_path, damage):
    """`check --read-data` listed the files of a blob whose other copy is whole as damaged, though every
    restore of them succeeded."""
    repo_dir, repo, first, second, content = stored_twice(delta=False)
    blob = chunk_ids(repo, first, "db")[3]
    repo.store.load_index()
    held, _ = copies_of(repo.store, blob)
    victim = pack_of(repo_dir, held, repo.store)
    if damage == "flipped":
        flip(victim, held.offset + held.length // 2)
    else:
        os.remove(victim)
    report = repo.check(read_data=True)
    assert not report.ok  # the damaged copy is named, for `repair packs`
    assert any(victim.name in p.object + p.problem for p in report.problems)
    assert not [p for p in report.problems if p.files]
    if damage == "flipped":
        (own,) = [p for p in report.problems if p.object == f"blob {blob.hex()}"]
        assert "another copy of it reads: no file is lost" in own.problem


def test_a_copy_read_after_the_held_one_is_damaged_is_not_said_to_be_garbled_on_the_way(stored_twice):
    """The held copy read again the same, then another copy read: the blob read, from its other copy, and the
    warning that it was garbled on the way from the storage said so of damage the storage holds."""
    from chunkvault.errors import RemoteRetryWarning

    repo_dir, repo, first, second, content = stored_twice(delta=False)
    blob = chunk_ids(repo, first, "db")[3]
    repo.store.load_index()
    held, _ = copies_of(repo.store, blob)
    flip(pack_of(repo_dir, held, repo.store), held.offset + held.length // 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        repo.store.read_blob(blob, verify=True)
    assert [w.category for w in caught] == [RepositoryStateWarning]
    assert not [w for w in caught if issubclass(w.category, RemoteRetryWarning)]
