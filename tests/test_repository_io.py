"""Store-level reads: the lazily loaded index under concurrency, coalesced multi-blob reads."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chunkvault import Repository
from chunkvault.errors import CorruptObject, MissingObject


@pytest.fixture
def stored(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(3000 + i))
    (src / "big").write_bytes(os.urandom(3_000_000))
    repo = new_repo(str(tmp_path / "repo"), pack_size=200_000)
    snap = repo.backup([str(src)]).snapshot
    ids = [c for e in repo.tree(snap) for c in e.chunk_ids()]
    return tmp_path / "repo", ids


def test_index_loads_once_and_whole_when_many_threads_ask(stored, password, monkeypatch):
    repo_dir, ids = stored
    repo = Repository.open(str(repo_dir), password).store
    real = repo.read_index_columns
    calls = []

    def slow(name, fresh=False, **kwargs):
        calls.append(name)
        time.sleep(0.05)
        return real(name, fresh, **kwargs)

    monkeypatch.setattr(repo, "read_index_columns", slow)
    barrier = threading.Barrier(8)

    def ask(_):
        barrier.wait()
        return all(i in repo.index for i in ids)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(ask, range(8)))
    assert len(calls) == len(set(calls))


def test_read_blobs_matches_single_reads(stored, password):
    repo_dir, ids = stored
    repo = Repository.open(str(repo_dir), password).store
    order = ids[::-1] + ids[:5]  # reversed, with repeats
    assert repo.read_blobs(order) == [repo.read_blob(i) for i in order]


def test_read_blobs_asked_out_of_order_reads_each_pack_once(tmp_path, new_repo, password):
    """Neighbours in a pack come in one ranged read whatever order they are asked in: unsorted, each was a
    request of its own (33 reads of one pack, on S3 as many requests), and the data still came right."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(2 << 20))
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)], fixed_chunks=["f"], fixed_chunk_size=64 << 10).snapshot
    (entry,) = [e for e in repo.tree(snap) if e.path.endswith(b"f")]
    ids = entry.chunk_ids()
    store = Repository.open(str(tmp_path / "repo"), password, cache=False).store
    assert len({store.locate(i).pack_no for i in ids}) == 1 and len(ids) == 32
    reads = []
    real = store.remote.get

    def get(key, *args, **kwargs):
        reads.append(key)
        return real(key, *args, **kwargs)

    store.remote.get = get
    plain = store.read_blobs(ids[::-1])
    assert b"".join(plain[::-1]) == (src / "f").read_bytes()
    assert len([k for k in reads if k.startswith("data/")]) == 1


def test_read_blobs_names_damage(stored, password):
    repo_dir, ids = stored
    repo = Repository.open(str(repo_dir), password).store
    loc = repo.index.get(ids[3])
    pack = repo.pack_ids[loc.pack_no].hex()
    path = repo_dir / "data" / pack[:2] / pack
    data = bytearray(path.read_bytes())
    data[loc.offset + 20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObject) as info:
        repo.read_blobs(ids)
    assert ids[3].hex() in str(info.value)
    os.remove(path)
    with pytest.raises(MissingObject):
        repo.read_blobs(ids)


def test_a_batch_stored_across_packs_is_indexed_where_each_blob_lies(tmp_path, new_repo):
    """store_many fills a pack, starts the next and indexes each pack's part of the batch in one call: every
    blob must be found in the pack and at the offset it went to, including one stored twice in the batch."""
    repo = new_repo(str(tmp_path / "repo"), pack_size=200_000).store
    datas = [os.urandom(30_000 + i) for i in range(20)]  # about three packs' worth, incompressible
    batch = [(repo.blob_id(d), d, None) for d in datas]
    prepared = repo.prepare_blobs(batch + batch[3:4], {})
    with repo.writer() as w:
        w.store_many(prepared)
        w.flush()
    packs = {repo.locate(bid).pack_no for bid, _, _ in batch}
    assert len(packs) >= 3
    assert repo.read_blobs([bid for bid, _, _ in batch]) == datas
    for bid, data, _ in batch:
        assert repo.read_blob(bid) == data
