"""Changed chunks of a database-like file are stored as deltas against the chunks they replaced."""
import io
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault.errors import CorruptObject
from treeutil import describe

PAGE = 8192


def page_file(path, pages, rnd):
    """A file of 8 KiB pages, half random bytes and half repetitive rows, like a database table."""
    with open(path, "wb") as f:
        for i in range(pages):
            row = b"%08d|name-%06d|balance=%010d|" % (i, rnd.randrange(10**6), rnd.randrange(10**9))
            f.write(rnd.randbytes(PAGE // 2) + (row * (PAGE // len(row) + 1))[: PAGE // 2])


def touch_pages(path, share, rnd):
    """Random in-place updates: a few bytes in ``share`` of the pages."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for p in range(size // PAGE):
            if rnd.random() < share:
                f.seek(p * PAGE + rnd.randrange(PAGE - 16))
                f.write(rnd.randbytes(8))


def test_differentials_of_a_page_file_are_small_and_restore(tmp_path, new_repo):
    rnd = random.Random(3)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 1024, rnd)  # 8 MiB
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    trees = [(first, describe(src))]
    plain_repo = new_repo()
    plain_repo.backup([str(src)])
    for _ in range(3):
        touch_pages(src / "table", 0.8, rnd)
        snap = repo.backup([str(src)]).snapshot
        plain = plain_repo.backup([str(src)], delta=False).snapshot
        trees.append((snap, describe(src)))
        assert snap.kind == "diff"
        assert snap.stats["delta_blobs"] > 0
        # every chunk changed, yet the differential is a small fraction of what plain dedup stores
        assert snap.stats["added_stored_bytes"] < 0.3 * plain.stats["added_stored_bytes"]
    for i, (snap, tree) in enumerate(trees):
        out = tmp_path / f"out{i}"
        repo.restore(snap.id, str(out))
        assert describe(out) == tree
    assert repo.check(read_data=True).ok


def test_no_delta_options(tmp_path, new_repo):
    rnd = random.Random(4)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 256, rnd)
    page_file(src / "skip.log", 256, rnd)
    repo = new_repo()
    repo.backup([str(src)])
    touch_pages(src / "table", 0.9, rnd)
    touch_pages(src / "skip.log", 0.9, rnd)
    assert repo.backup([str(src)], delta=False).snapshot.stats["delta_blobs"] == 0
    touch_pages(src / "table", 0.9, rnd)
    touch_pages(src / "skip.log", 0.9, rnd)
    snap = repo.backup([str(src)], no_delta=["*.log"]).snapshot
    assert snap.stats["delta_blobs"] > 0
    log_chunks = set(repo.find_entry(snap, "skip.log").chunk_ids())
    assert not any(repo.store.delta_base(c) for c in log_chunks)


def test_stream_deltas_against_previous_stream(tmp_path, new_repo):
    rnd = random.Random(5)
    page_file(tmp_path / "dump", 512, rnd)
    repo = new_repo()
    repo.backup_stream(io.BytesIO((tmp_path / "dump").read_bytes()), "dump.sql")
    touch_pages(tmp_path / "dump", 0.9, rnd)
    data = (tmp_path / "dump").read_bytes()
    snap = repo.backup_stream(io.BytesIO(data), "dump.sql").snapshot
    assert snap.stats["delta_blobs"] > 0
    with repo.open_file(snap, "dump.sql") as f:
        assert f.read() == data


def test_missing_base_is_an_error_naming_both(tmp_path, new_repo):
    rnd = random.Random(6)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 256, rnd)
    repo = new_repo(pack_size=64 * 1024)
    first = repo.backup([str(src)]).snapshot
    touch_pages(src / "table", 0.9, rnd)
    second = repo.backup([str(src)]).snapshot
    store = repo.store
    delta_id = next(c for c in repo.find_entry(second, "table").chunk_ids() if store.delta_base(c))
    base_id = store.delta_base(delta_id)
    loc = store.index.get(base_id)
    pack = store.pack_ids[loc.pack_no].hex()
    os.remove(tmp_path / "repo0" / "data" / pack[:2] / pack)
    with pytest.raises(CorruptObject) as info:
        store.read_blob(delta_id)
    assert delta_id.hex() in str(info.value) and base_id.hex() in str(info.value)
    del first


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["edit", "insert", "truncate", "forget"]), st.integers(0, 2**32)),
                min_size=2, max_size=6))
def test_random_edit_series_with_forget(tmp_path_factory, ops):
    from chunkvault import Repository

    base = tmp_path_factory.mktemp("series")
    rnd = random.Random(len(ops))
    src = base / "src"
    src.mkdir()
    page_file(src / "f", 300, rnd)
    repo = Repository.init(str(base / "repo"), "pw", kdf_seconds=0, full_every=3)
    states = {repo.backup([str(src)]).snapshot.id: (src / "f").read_bytes()}
    for op, seed in ops:
        r = random.Random(seed)
        data = bytearray((src / "f").read_bytes())
        if op == "edit":
            touch_pages(src / "f", 0.5, r)
        elif op == "insert":
            at = r.randrange(len(data) + 1)
            (src / "f").write_bytes(bytes(data[:at]) + r.randbytes(r.randrange(1, 5000)) + bytes(data[at:]))
        elif op == "truncate":
            (src / "f").write_bytes(bytes(data[: r.randrange(len(data) + 1)]))
        else:
            ids = sorted(states)
            victim = ids[r.randrange(len(ids))]
            if len(ids) > 1:
                repo.forget([victim])
                del states[victim]
            continue
        states[repo.backup([str(src)]).snapshot.id] = (src / "f").read_bytes()
    for sid, content in states.items():
        out = base / f"out-{sid[:8]}"
        repo.restore(sid, str(out))
        assert (out / "f").read_bytes() == content
