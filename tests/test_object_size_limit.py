"""Storage that takes objects up to a size (the backup service's --max-object-size): every object a backup,
a prune or a repair writes fits, index objects of many small blobs too."""
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault import Repository
from chunkvault.errors import RemoteError
from chunkvault.remotes.local import LocalRemote
from chunkvault.store.blob import KIND_DELTA
from chunkvault.store.indexfile import INDEX_SLACK, IndexData, pack_index_bytes, split_index
from chunkvault.store.pack import PackEntry
from treeutil import describe

LIMIT = 128 << 10


class LimitedRemote(LocalRemote):
    """Local disk that refuses objects above LIMIT, and says so as the service does."""

    @property
    def max_object_size(self) -> int | None:
        return LIMIT

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if len(data) > LIMIT:
            raise RemoteError(f"object of {len(data)} bytes is above the limit of {LIMIT} bytes: {key}")
        super().put(key, data, if_absent=if_absent)


def test_index_objects_of_many_small_blobs_fit_through_backup_prune_and_repair(tmp_path):
    src = tmp_path / "src"
    rnd = random.Random(3)
    for d in range(6):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(1000):  # 6,000 blobs: their index entries alone are twice the limit
            (src / f"d{d}" / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(20, 120)))
    remote = LimitedRemote(str(tmp_path / "repo"))
    chunker = {"min_size": 16 << 10, "avg_size": 32 << 10, "max_size": 64 << 10}  # manifest blobs too
    repo = Repository.init(remote, "pw", kdf_seconds=0, chunker=chunker)
    first = repo.backup([str(src)]).snapshot
    for i in range(0, 1000, 2):
        (src / "d0" / f"f{i}").write_bytes(os.urandom(50))
    repo.backup([str(src)])
    sizes = {o.key: o.size for o in remote.list("")}
    assert max(sizes.values()) <= LIMIT and sum(k.startswith("index/") for k in sizes) >= 2
    repo.forget([first.id])
    repo.prune(max_unused=0)
    repo.repair_index()
    assert max(o.size for o in remote.list("")) <= LIMIT
    assert repo.check(read_data=True).ok
    repo.restore("latest", str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5)), max_size=60), st.integers(100, 5000),
       st.integers(0, 20))
def test_split_index_keeps_every_pack_in_order_and_each_part_under_the_budget(packs, limit, superseded):
    index = IndexData({bytes([i % 256, i // 256]) * 16: [PackEntry(os.urandom(32), KIND_DELTA if j < deltas else 0,
                                                                    0, 1, 1, os.urandom(32) if j < deltas else None)
                                                          for j in range(n)]
                       for i, (n, deltas) in enumerate(packs)}, [os.urandom(32) for _ in range(superseded)])
    parts = split_index(index, limit + INDEX_SLACK)
    assert [p for part in parts for p in part.packs] == list(index.packs)
    assert parts[0].supersedes == index.supersedes and not any(part.supersedes for part in parts[1:])
    for part in parts:
        size = sum(pack_index_bytes(e) for e in part.packs.values()) + 32 * len(part.supersedes)
        # over the budget only with one pack, or none beside superseded names that alone exceed it
        assert size <= limit or len(part.packs) == 1 or (not part.packs and 32 * len(part.supersedes) > limit)
    assert len(split_index(index)) == 1


def test_index_objects_superseded_long_ago_fit_however_many(tmp_path):
    """Every index that replaces others supersedes all those deleted before it (a list that only grows): past
    what one object holds, the names go in objects of their own, still honoured by the next prune."""
    from chunkvault.store.prune import live_index_objects, packs_of, replace_index
    from chunkvault.store.repository import superseded_names

    remote = LimitedRemote(str(tmp_path / "repo"))
    repo = Repository.init(remote, "pw", kdf_seconds=0)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    repo.backup([str(tmp_path / "src")])
    store = repo.store
    long_ago = {os.urandom(32).hex() for _ in range(2 * ((LIMIT - INDEX_SLACK) // 32) + 5)}  # three objects' worth

    def superseded() -> set[str]:
        return superseded_names(store.read_index_object(n) for n in store.index_names())

    names, live = live_index_objects(store)
    replace_index(store, IndexData(packs_of(live)), names, gone=[bytes.fromhex(n) for n in long_ago])
    assert long_ago <= superseded() and max(o.size for o in remote.list("index/")) <= LIMIT
    repo.prune()
    assert long_ago <= superseded() and max(o.size for o in remote.list("index/")) <= LIMIT
    repo.restore("latest", str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == b"data"


def test_a_chunk_that_fits_in_no_pack_under_the_limit_is_named_as_a_copy_s_not_a_backup_s(tmp_path):
    """Copied into storage whose limit is below one chunk's pack, a copy was told that "a pack holding one chunk
    of this backup" needed more: the writer is the copy's, and it stores chunks another repository cut."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(4).randbytes(1 << 20))
    chunker = {"min_size": 256 << 10, "avg_size": 512 << 10, "max_size": 1 << 20}
    source = Repository.init(str(tmp_path / "source"), "pw", kdf_seconds=0, chunker=chunker)
    source.backup([str(src)])
    destination = Repository.init(LimitedRemote(str(tmp_path / "repo")), "pw", kdf_seconds=0)
    with pytest.raises(RemoteError, match=f"takes objects of at most {LIMIT} bytes, and a pack holding one chunk "
                                          r"to store needs \d+: raise that limit") as caught:
        source.copy_to(destination)
    assert "backup" not in str(caught.value)
