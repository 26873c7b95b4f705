"""Changed chunks of a database-like file are stored as deltas against the chunks they replaced."""
import io
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault import Repository
from chunkvault.chunker import FIXED_CHUNK_SIZE
from chunkvault.errors import CorruptObject, UsageError
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


def assert_all_restore(repo, snaps_and_trees, tmp_path):
    """Each (snapshot, tree) restores exactly, and the repository checks clean with its data read."""
    for i, (snap, tree) in enumerate(snaps_and_trees):
        out = tmp_path / f"out{i}"
        repo.restore(snap.id, str(out))
        assert describe(out) == tree
    assert repo.check(read_data=True).ok


def _page_file_backed_up(tmp_path, new_repo, rnd: random.Random, share: float):
    """(repository, source): a 2 MiB page file backed up, then ``share`` of its pages changed."""
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 256, rnd)
    repo = new_repo()
    repo.backup([str(src)])
    touch_pages(src / "table", share, rnd)
    return repo, src


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
    assert_all_restore(repo, trees, tmp_path)


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


def two_versions(tmp_path, new_repo, seed):
    """A page file backed up, 90 % of its pages touched, backed up again, in small packs: the repository,
    the source, both snapshots and the second's delta chunks."""
    rnd = random.Random(seed)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 256, rnd)
    repo = new_repo(pack_size=64 * 1024)
    first = repo.backup([str(src)]).snapshot
    touch_pages(src / "table", 0.9, rnd)
    second = repo.backup([str(src)]).snapshot
    deltas = [c for c in repo.find_entry(second, "table").chunk_ids() if repo.store.delta_base(c)]
    return repo, src, first, second, deltas


def pack_of(repo, blob_id: bytes) -> str:
    return repo.store.pack_ids[repo.store.index.get(blob_id).pack_no].hex()


def test_missing_base_is_an_error_naming_both(tmp_path, new_repo):
    repo, _, _, _, deltas = two_versions(tmp_path, new_repo, 6)
    store = repo.store
    delta_id = deltas[0]
    base_id = store.delta_base(delta_id)
    pack = pack_of(repo, base_id)
    os.remove(tmp_path / "repo0" / "data" / pack[:2] / pack)
    with pytest.raises(CorruptObject) as info:
        store.read_blob(delta_id)
    assert delta_id.hex() in str(info.value) and base_id.hex() in str(info.value)


def test_deltas_that_lost_their_base_are_dropped_so_that_backups_store_their_data_again(tmp_path, new_repo):
    """A pack of bases is lost: `check` names the deltas on them, `repair index` the packs that hold those,
    `repair packs` drops them (salvaging the rest), and backups of the data heal every snapshot."""
    repo, src, first, second, deltas = two_versions(tmp_path, new_repo, 8)
    store = repo.store
    v2 = (src / "table").read_bytes()
    v1 = b"".join(store.read_blob(c) for c in repo.find_entry(first, "table").chunk_ids())
    base_pack = pack_of(repo, store.delta_base(deltas[0]))
    on_lost = [d for d in deltas if pack_of(repo, store.delta_base(d)) == base_pack]
    os.remove(tmp_path / "repo0" / "data" / base_pack[:2] / base_pack)
    assert any("pack is missing" in p.problem for p in repo.check().problems)

    rebuilt = repo.repair_index()
    holders = sorted({pack_of(repo, d) for d in on_lost})
    assert rebuilt.baseless_packs == holders
    found = {p.object: p.problem for p in repo.check().problems if "cannot be read" in p.problem}
    assert found.keys() == {f"blob {d.hex()}" for d in on_lost}
    for d in on_lost:  # each names the pack that holds it
        assert f"repair packs {pack_of(repo, d)[:12]}`" in found[f"blob {d.hex()}"]

    dry = repo.repair_packs(holders[:1], dry_run=True)
    assert dry.salvaged[0].lost and store.index.get(on_lost[0]) is not None
    repaired = repo.repair_packs(holders[:1], dry_run=False)
    assert {d for s in repaired.salvaged for d in s.lost} == set(on_lost)
    assert all(store.index.get(d) is None for d in on_lost)
    assert not [p for p in repo.check().problems if "cannot be read" in p.problem]
    for content in (v1, v2):  # the lost data comes back: stored again, not deduplicated away
        (src / "table").write_bytes(content)
        repo.backup([str(src)])
    assert repo.check(read_data=True).ok
    for snap, content in ((first, v1), (second, v2)):
        out = tmp_path / f"restored-{snap.id[:8]}"
        repo.restore(snap.id, str(out))
        assert (out / "table").read_bytes() == content


def test_repairing_a_pack_of_bases_drops_the_deltas_on_them_from_the_packs_that_hold_them(tmp_path, new_repo):
    repo, _, _, _, deltas = two_versions(tmp_path, new_repo, 9)
    store = repo.store
    base_pack = pack_of(repo, store.delta_base(deltas[0]))
    on_lost = {d for d in deltas if pack_of(repo, store.delta_base(d)) == base_pack}
    holders = {pack_of(repo, d) for d in on_lost}
    os.remove(tmp_path / "repo0" / "data" / base_pack[:2] / base_pack)
    report = repo.repair_packs([base_pack], dry_run=False)
    by_pack = {s.pack.rsplit("/", 1)[1]: s for s in report.salvaged}
    assert by_pack.keys() == {base_pack} | holders
    assert by_pack[base_pack].problem == "pack is missing"
    for h in holders:
        assert by_pack[h].problem == "holds deltas whose base is lost" and set(by_pack[h].lost) <= on_lost
    assert all(store.index.get(d) is None for d in on_lost)
    assert not [p for p in repo.check().problems if "cannot be read" in p.problem]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["edit", "insert", "truncate", "forget"]), st.integers(0, 2**32)),
                min_size=2, max_size=6))
def test_random_edit_series_with_forget(tmp_path_factory, ops):
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


SMALL = {"min_size": 16 << 10, "avg_size": 64 << 10, "max_size": 512 << 10}


def page_series(tmp_path, repo, versions, rnd, pages=256, share=0.5):
    """Back up a page file through ``versions`` versions of in-place updates; (snapshot, tree) per version."""
    src = tmp_path / "db"
    src.mkdir(exist_ok=True)
    page_file(src / "table", pages, rnd)
    out = []
    for v in range(versions):
        if v:
            touch_pages(src / "table", share, rnd)
        out.append((repo.backup([str(src)]).snapshot, describe(src)))
    return out


def chunk_depths(repo, snap):
    return [repo.store.delta_depth(c) for c in repo.find_entry(snap, "table").chunk_ids()]


def deepest_delta(repo, snap):
    return max(repo.find_entry(snap, "table").chunk_ids(), key=repo.store.delta_depth)


def test_a_delta_envelope_given_another_base_id_does_not_open():
    """The base id travels in clear ahead of the sealed bytes, and is bound by the associated data: one
    swapped for another blob's would decode the delta on the wrong base, and give wrong bytes unnoticed."""
    from chunkvault.store.blob import KIND_DELTA, delta_compress, open_envelope, seal_blob
    from chunkvault.store.crypto import Sealer

    sealer = Sealer(bytes(range(32)))
    base_id, other_id, blob_id = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    payload = delta_compress(b"new content" * 50, b"old content" * 50, 3)
    envelope = bytearray(seal_blob(sealer, blob_id, KIND_DELTA, payload, base_id=base_id))
    assert open_envelope(sealer, blob_id, bytes(envelope)) == (KIND_DELTA, payload)
    assert envelope[1:33] == base_id
    envelope[1:33] = other_id
    with pytest.raises(CorruptObject, match="authentication failed"):
        open_envelope(sealer, blob_id, bytes(envelope))


def test_block_delta_round_trips_and_falls_back_when_content_moves():
    from chunkvault.store.blob import DELTA_BLOCKS, DELTA_DICT, delta_compress, delta_decompress

    rnd = random.Random(11)
    base = rnd.randbytes(100_000)
    edited = bytearray(base)
    for _ in range(20):
        edited[rnd.randrange(len(edited))] ^= 0xFF
    shifted = rnd.randbytes(7) + base[:-7]
    for data, method in ((bytes(edited), DELTA_BLOCKS), (shifted, DELTA_DICT)):
        payload = delta_compress(data, base, 3)
        assert payload[0] == method
        assert len(payload) < 10_000
        assert delta_decompress(payload, base) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.lists(st.tuples(st.integers(0, 6000), st.binary(min_size=1, max_size=40)),
                                         max_size=6), st.integers(-3000, 3000))
def test_delta_payloads_reproduce_any_edit(base, edits, resize):
    from chunkvault.store.blob import delta_compress, delta_decompress

    data = bytearray(base)
    for at, patch in edits:
        data[at : at + len(patch)] = patch
    data = bytes(data[: max(0, len(data) + resize)] if resize < 0 else data + bytes(resize))
    assert delta_decompress(delta_compress(data, base, 3), base) == data


@pytest.fixture(params=["libzstd-in-place", "object-api-copies"])
def zstd_path(request, monkeypatch):
    """Deltas decode the same through libzstd's in-place calls and through python-zstandard's object API."""
    from chunkvault.store import zstdbuf

    if request.param == "object-api-copies":
        monkeypatch.setattr(zstdbuf, "lib", None)
    elif zstdbuf.lib is None:
        pytest.skip("python-zstandard without its cffi backend")


edit_series = st.lists(st.tuples(st.lists(st.tuples(st.integers(0, 9000), st.binary(min_size=1, max_size=1500)),
                                          max_size=5), st.integers(-2500, 2500)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.binary(max_size=8000), series=edit_series)
def test_a_chain_of_deltas_rebuilds_every_version(zstd_path, base, series):
    """Each version stored as a delta against the one before (block deltas rewrite one buffer in place, resized
    as versions grow and shrink; whole-base deltas replace it): opening the chain from any version down to the
    whole blob gives that version."""
    from chunkvault.store.blob import KIND_DELTA, compress, delta_compress, open_chain, seal_blob
    from chunkvault.store.crypto import Sealer

    sealer = Sealer(bytes(range(32)))
    versions = [base]
    for edits, resize in series:
        data = bytearray(versions[-1])
        for at, patch in edits:
            data[at : at + len(patch)] = patch
        versions.append(bytes(data[: max(0, len(data) + resize)] if resize < 0 else data + b"\x01" * resize))
    ids = [bytes([i]) * 32 for i in range(len(versions))]
    envelopes = [seal_blob(sealer, ids[0], *compress(base, 3))]
    envelopes += [seal_blob(sealer, ids[i], KIND_DELTA, delta_compress(versions[i], versions[i - 1], 3), ids[i - 1])
                  for i in range(1, len(versions))]
    for top in range(len(versions)):
        chain = [(ids[i], envelopes[i], len(versions[i])) for i in range(top, -1, -1)]
        assert open_chain(sealer, chain) == versions[top]


def test_a_base_that_starts_like_a_zstd_dictionary_is_still_raw_content(zstd_path):
    """The base bytes a delta refers to are raw content even when they begin with zstd's dictionary magic."""
    from chunkvault.store.blob import DELTA_BLOCKS, DELTA_DICT, delta_compress, delta_decompress

    rnd = random.Random(5)
    base = b"\x37\xa4\x30\xec" + rnd.randbytes(8188)
    edited = base[:100] + b"changed!" + base[108:]
    shifted = base[:4] + rnd.randbytes(5) + base[4:-5]
    for data, method in ((edited, DELTA_BLOCKS), (shifted, DELTA_DICT)):
        payload = delta_compress(data, base, 3)
        assert payload[0] == method
        assert delta_decompress(payload, base) == data


def test_a_malformed_block_map_is_refused():
    """Bits set past the last block, or a block the map takes from a base too short to hold it."""
    from chunkvault.store.blob import DELTA_BLOCKS, delta_compress, delta_decompress

    rnd = random.Random(9)
    base = rnd.randbytes(5 * 1024)  # 5 blocks: the map's one byte has 3 padding bits
    data = bytearray(base)
    data[0] ^= 1
    payload = bytearray(delta_compress(bytes(data), base, 3))
    assert payload[0] == DELTA_BLOCKS and delta_decompress(bytes(payload), base) == data
    payload[5] |= 0b1
    with pytest.raises(ValueError, match="past its last block"):
        delta_decompress(bytes(payload), base)
    with pytest.raises(ValueError, match="outside"):
        delta_decompress(delta_compress(bytes(data), base, 3), base[:2048])


@pytest.mark.parametrize("n, m", [(0, 0), (1, 1), (1023, 1023), (1024, 1024), (3000, 3000), (3000, 2100),
                                  (3000, 2047), (2048, 3000), (5000, 1), (4096, 0)])
def test_block_map_marks_exactly_the_blocks_that_differ_or_lie_past_the_base(n, m):
    from chunkvault.store.blob import BLOCK_SIZE, DELTA_BLOCKS, delta_compress, delta_decompress

    rnd = random.Random(n * 7 + m)
    base = rnd.randbytes(m)
    data = bytearray(base[:n] + rnd.randbytes(max(0, n - m)))
    for i in range(0, n, 2 * BLOCK_SIZE):  # every other block changes one byte
        data[i] ^= 1
    data = bytes(data)
    payload = delta_compress(data, base, 3)
    assert delta_decompress(payload, base) == data
    if payload[0] != DELTA_BLOCKS:
        return
    expect = [i % 2 == 0 or min((i + 1) * BLOCK_SIZE, n) > m for i in range(-(-n // BLOCK_SIZE))]
    bits = payload[5 : 5 + -(-len(expect) // 8)]
    assert [bool(bits[i // 8] >> (7 - i % 8) & 1) for i in range(len(expect))] == expect


def test_plain_compression_is_skipped_for_a_delta_far_smaller_than_the_whole_blob(tmp_path, new_repo, monkeypatch):
    from chunkvault.store import repository

    repo, src = _page_file_backed_up(tmp_path, new_repo, random.Random(14), 0.3)
    calls = []
    real = repository.compress
    monkeypatch.setattr(repository, "compress", lambda data, level: calls.append(len(data)) or real(data, level))
    snap = repo.backup([str(src)]).snapshot
    assert snap.stats["delta_blobs"] > 0
    assert len(calls) < snap.stats["delta_blobs"]  # manifest pieces only: no chunk was compressed twice


def test_a_sample_of_the_chunk_skips_plain_compression_when_the_whole_blob_says_nothing(new_repo, monkeypatch):
    """A chain restart: its base's whole blob compressed far better than the chunk does now, so only the plain
    size estimated from a sample shows the delta winning; a delta that does not clearly win is still weighed."""
    from chunkvault.store import blob, repository

    rnd = random.Random(16)
    store = new_repo().store
    monkeypatch.setattr(store, "_stored_estimate", lambda base_id, length: 100)
    calls = []
    real = repository.compress
    monkeypatch.setattr(repository, "compress", lambda data, level: calls.append(len(data)) or real(data, level))
    base = rnd.randbytes(1 << 20)
    data = bytearray(base)
    for _ in range(40):
        at = rnd.randrange(len(data) - 8)
        data[at : at + 8] = rnd.randbytes(8)
    assert blob.sampled_size(data, 3) > len(data) // 2
    prepared = store.prepare_blob(b"n" * 32, bytes(data), base_id=b"b" * 32, base_plain=base, delta_margin=0.1)
    assert prepared.kind == blob.KIND_DELTA and calls == []
    unrelated = rnd.randbytes(1 << 20)
    prepared = store.prepare_blob(b"u" * 32, unrelated, base_id=b"b" * 32, base_plain=base, delta_margin=0.1)
    assert prepared.kind == blob.KIND_RAW and calls == [len(unrelated)]
    assert blob.sampled_size(bytes(200 << 10), 3) is None


def test_chains_stay_within_the_depth_bound_and_restore(tmp_path, new_repo):
    repo = new_repo(chunker=SMALL)
    repo.store.max_delta_depth = 3  # a shorter bound than the format's, so chains restart within the test
    series = page_series(tmp_path, repo, 9, random.Random(12), share=1.0)
    depths = [chunk_depths(repo, snap) for snap, _ in series]
    assert max(depths[0]) == 0 and max(map(max, depths)) == 3  # 8 versions of deltas: chains restarted
    assert all(snap.stats["delta_blobs"] > 0 for snap, _ in series[1:])
    # each delta is taken against the previous version's chunk while the bound allows
    assert all(snap.stats["added_stored_bytes"] < 0.3 * series[0][0].stats["added_stored_bytes"]
               for snap, _ in series[1:])
    assert_all_restore(repo, series, tmp_path)


def test_batched_reads_equal_single_reads_down_chains(tmp_path, new_repo, password):
    repo = new_repo(chunker=SMALL, pack_size=64 << 10)
    series = page_series(tmp_path, repo, 5, random.Random(13), share=1.0)
    store = repo.store
    ids = [c for snap, _ in series for c in repo.find_entry(snap, "table").chunk_ids()]
    assert max(store.delta_depth(c) for c in ids) == 4
    fresh = Repository.open(str(tmp_path / "repo0"), password).store
    assert fresh.read_blobs(ids) == [fresh.read_blob(c, verify=True) for c in ids]


def test_a_chain_longer_than_the_bound_is_refused_naming_ids(tmp_path, new_repo, password, monkeypatch):
    import chunkvault.store.backup as backup_module
    from chunkvault.store.blob import MAX_DELTA_DEPTH

    repo = new_repo(chunker=SMALL)
    # a writer that ignores the format's bound, and restarts no chain in turns (whose phase the key sets)
    repo.store.max_delta_depth = 2 * MAX_DELTA_DEPTH + 2
    monkeypatch.setattr(backup_module, "CONTENT_DEFINED_DELTA_DEPTH", 2 * MAX_DELTA_DEPTH + 2)
    monkeypatch.setattr(backup_module, "restart_turns", lambda sequence, phase, bound: range(0))
    series = page_series(tmp_path, repo, MAX_DELTA_DEPTH + 3, random.Random(14), pages=64, share=1.0)
    last = series[-1][0]
    deep = deepest_delta(repo, last)
    assert repo.store.delta_depth(deep) == MAX_DELTA_DEPTH + 2
    reader = Repository.open(str(tmp_path / "repo0"), password)
    for read in (lambda: reader.store.read_blob(deep), lambda: reader.store.read_blobs([deep])):
        with pytest.raises(CorruptObject, match=f"longer than {MAX_DELTA_DEPTH}") as info:
            read()
        assert deep.hex() in str(info.value) and reader.store.delta_base(deep).hex() in str(info.value)
    report = reader.check()
    assert any(deep.hex() in p.object and "longer than" in p.problem for p in report.problems)


def test_corrupt_base_deep_in_a_chain_is_found_and_attributed(tmp_path, new_repo, password):
    repo = new_repo(chunker=SMALL, pack_size=64 << 10)
    series = page_series(tmp_path, repo, 4, random.Random(15), share=1.0)
    store = repo.store
    top = deepest_delta(repo, series[-1][0])
    root = store.delta_chain(top)[-1]
    loc = store.index.get(root)
    pack = store.pack_ids[loc.pack_no].hex()
    newest = repo.find_entry(series[-1][0], "table").chunk_ids()
    assert all(store.pack_ids[store.index.get(c).pack_no].hex() != pack for c in newest)
    path = tmp_path / "repo0" / "data" / pack[:2] / pack
    data = bytearray(path.read_bytes())
    data[loc.offset + loc.length // 2] ^= 1
    path.write_bytes(bytes(data))
    reader = Repository.open(str(tmp_path / "repo0"), password)
    with pytest.raises(CorruptObject) as info:
        reader.store.read_blob(top)
    assert top.hex() in str(info.value) and root.hex() in str(info.value)
    report = reader.check(read_data=True)
    assert any(root.hex() in p.object + p.problem or pack in p.object for p in report.problems)
    assert any(series[-1][0].id in p.snapshots for p in report.problems)
    # without reading data: a lost pack is attributed to the newest snapshot, which needs it through chains
    path.unlink()
    report = Repository.open(str(tmp_path / "repo0"), password).check()
    lost = next(p for p in report.problems if pack in p.object)
    assert series[-1][0].id in lost.snapshots


def test_prune_keeps_whole_chains_after_forgetting_their_first_snapshots(tmp_path, new_repo):
    repo = new_repo(chunker=SMALL, pack_size=64 << 10)
    series = page_series(tmp_path, repo, 5, random.Random(16), share=1.0)
    last, tree = series[-1]
    assert max(chunk_depths(repo, last)) == 4
    repo.forget([snap.id for snap, _ in series[:-1]])  # the snapshots that first stored every base
    repo.prune(max_unused=0.0)
    assert repo.check(read_data=True).ok
    out = tmp_path / "out"
    repo.restore(last.id, str(out))
    assert describe(out) == tree
    assert max(chunk_depths(repo, repo.snapshots()[-1])) == 4  # the chains were kept, not rewritten


def test_copy_keeps_chains_and_copies_a_late_snapshot_alone(tmp_path, new_repo):
    src = new_repo(str(tmp_path / "src"), chunker=SMALL)
    series = page_series(tmp_path, src, 5, random.Random(17), share=1.0)
    everything = Repository.init(str(tmp_path / "all"), "pw2", kdf_seconds=0, copy_chunker_from=src)
    src.copy_to(everything)
    alone = Repository.init(str(tmp_path / "alone"), "pw2", kdf_seconds=0, copy_chunker_from=src)
    src.copy_to(alone, [series[-1][0].id])
    for dst, wanted in ((everything, series), (alone, series[-1:])):
        copies = {s.stats["copied_from"]: s for s in dst.snapshots()}
        for snap, tree in wanted:
            out = tmp_path / f"out-{dst.store.config.repo_id[:6]}-{snap.id[:8]}"
            dst.restore(copies[snap.id].id, str(out))
            assert describe(out) == tree
        assert dst.check(read_data=True).ok
    last = {s.stats["copied_from"]: s for s in everything.snapshots()}[series[-1][0].id]
    assert max(chunk_depths(everything, last)) == max(chunk_depths(src, series[-1][0])) == 4


def test_export_and_import_of_a_mostly_delta_snapshot(tmp_path, new_repo):
    repo = new_repo(chunker=SMALL)
    series = page_series(tmp_path, repo, 4, random.Random(18))
    last, tree = series[-1]
    path = str(tmp_path / "last.backup")
    repo.export(last, path, "export pw", kdf_seconds=0)
    other = new_repo(chunker=SMALL)
    imported = other.import_backup(path, "export pw").snapshot
    out = tmp_path / "out"
    other.restore(imported.id, str(out))
    assert describe(out) == tree
    assert other.check(read_data=True).ok


def chunk_lengths(repo, snap, path):
    return [repo.store.locate(c).raw_length for c in repo.find_entry(snap, path).chunk_ids()]


def test_fixed_chunks_line_up_with_the_parent_and_store_less(tmp_path, new_repo):
    """Cut at fixed offsets, every changed chunk of a page file has a base covering exactly its bytes."""
    rnd = random.Random(8)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table.db", 1024, random.Random(9))  # 8 MiB
    page_file(src / "other", 513, rnd)  # past two of the largest chunks: at least three chunks cut by content, of differing lengths
    content = new_repo()
    fixed = new_repo()
    content.backup([str(src)])
    first = fixed.backup([str(src)], fixed_chunks=["*.db"]).snapshot
    assert chunk_lengths(fixed, first, "table.db") == [FIXED_CHUNK_SIZE] * 8
    assert len(set(chunk_lengths(fixed, first, "other"))) > 1  # other files still cut by content
    trees = [(first, describe(src))]
    added = {"fixed": 0, "content": 0}
    for step in range(3):
        with open(src / "table.db", "r+b") as f:  # a page rewritten with content that moves cut points
            for p in rnd.sample(range(1024), 200):
                f.seek(p * PAGE)
                f.write(rnd.randbytes(PAGE // 2) + bytes(PAGE // 2))
        added["content"] += content.backup([str(src)]).snapshot.stats["added_stored_bytes"]
        snap = fixed.backup([str(src)], fixed_chunks=["*.db"]).snapshot
        trees.append((snap, describe(src)))
        assert chunk_lengths(fixed, snap, "table.db") == [FIXED_CHUNK_SIZE] * 8
        assert snap.stats["delta_blobs"] == 8  # each chunk changed, each against the one it replaced
        added["fixed"] += snap.stats["added_stored_bytes"]
    # Summed over the versions: which chunks restart their chains in a version, and where content cuts, are set
    # by each repository's keys, so one version alone can go the other way (seen once); over the three, fixed
    # cuts stored 0.61-0.82 of what content cuts stored, for 46 pairs of keys.
    assert added["fixed"] < 0.95 * added["content"]
    assert_all_restore(fixed, trees, tmp_path)


def test_fixed_chunks_for_a_stream_matched_by_its_name(tmp_path, new_repo):
    data = random.Random(10).randbytes(3 << 20)
    repo = new_repo()
    size = 256 << 10
    snap = repo.backup_stream(io.BytesIO(data), "base.img", fixed_chunks=["*.img"], fixed_chunk_size=size).snapshot
    whole, rest = divmod(3 << 20, size)
    assert chunk_lengths(repo, snap, "base.img") == [size] * whole + [rest] * bool(rest)
    other = repo.backup_stream(io.BytesIO(data), "dump.sql", fixed_chunks=["*.img"]).snapshot
    assert chunk_lengths(repo, other, "dump.sql") != chunk_lengths(repo, snap, "base.img")
    with repo.open_file(snap, "base.img") as f:
        assert f.read() == data


def test_fixed_chunk_size_out_of_bounds_is_refused(tmp_path, new_repo):
    repo = new_repo()
    (tmp_path / "f").write_bytes(b"x")
    for size in (1024, 32 << 20):
        with pytest.raises(UsageError, match="fixed chunk size"):
            repo.backup([str(tmp_path / "f")], fixed_chunks=["*"], fixed_chunk_size=size)
    assert repo.snapshots() == []


def test_fixed_cut_chains_grow_deeper_than_content_defined_ones(tmp_path, new_repo):
    from chunkvault.store.blob import CONTENT_DEFINED_DELTA_DEPTH, FIXED_DELTA_DEPTH

    rnd = random.Random(15)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table.db", 64, rnd)
    page_file(src / "table", 64, rnd)
    repo = new_repo(chunker=SMALL)
    opts = {"fixed_chunks": ["*.db"], "fixed_chunk_size": 16 << 10}
    series = [(repo.backup([str(src)], **opts).snapshot, describe(src))]
    for _ in range(FIXED_DELTA_DEPTH + 4):  # past the bound, so that chains must have restarted
        touch_pages(src / "table.db", 1.0, rnd)
        touch_pages(src / "table", 1.0, rnd)
        series.append((repo.backup([str(src)], **opts).snapshot, describe(src)))
    fixed = [max(repo_depths(repo, snap, "table.db")) for snap, _ in series]
    content = [max(repo_depths(repo, snap, "table")) for snap, _ in series]
    assert CONTENT_DEFINED_DELTA_DEPTH < max(fixed) <= FIXED_DELTA_DEPTH
    assert max(content) <= CONTENT_DEFINED_DELTA_DEPTH
    assert_all_restore(repo, series[-2:], tmp_path)
    # Deep chains travel: copied whole (chains kept), and exported then imported.
    at = fixed.index(max(fixed))
    deep, deep_tree = series[at]
    copy = Repository.init(str(tmp_path / "copy"), "pw2", kdf_seconds=0, copy_chunker_from=repo)
    repo.copy_to(copy)
    copied = {s.stats["copied_from"]: s for s in copy.snapshots()}[deep.id]
    assert max(repo_depths(copy, copied, "table.db")) == max(fixed)
    path = str(tmp_path / "deep.backup")
    repo.export(deep, path, "export pw", kdf_seconds=0)
    other = Repository.init(str(tmp_path / "other"), "pw3", kdf_seconds=0)
    imported = other.import_backup(path, "export pw").snapshot
    for dst, snap in ((copy, copied), (other, imported)):
        out = tmp_path / f"out-{dst.store.config.repo_id[:6]}"
        dst.restore(snap.id, str(out))
        assert describe(out) == deep_tree
        assert dst.check(read_data=True).ok


def repo_depths(repo, snap, path):
    return [repo.store.delta_depth(c) for c in repo.find_entry(snap, path).chunk_ids()]


def test_delta_frames_decode_the_same_on_either_zstd_path(monkeypatch):
    """Delta frames are encoded through libzstd's own calls (a prefix, long-distance matching) or, without that
    binding, through python-zstandard's object API; either path reads the other's frames."""
    from chunkvault.store import zstdbuf
    from chunkvault.store.blob import delta_compress, delta_decompress

    if zstdbuf.lib is None:
        pytest.skip("python-zstandard without its cffi backend")
    rnd = random.Random(21)
    base = b"".join(rnd.randbytes(64) + b" " * 960 for _ in range(64))
    page_edits = bytearray(base)
    for at in range(0, len(base), 700):
        page_edits[at : at + 3] = rnd.randbytes(3)
    shifted = base[:5000] + rnd.randbytes(17) + base[5000:]
    cases = [bytes(page_edits), shifted]
    native = [delta_compress(d, base, 3) for d in cases]
    with monkeypatch.context() as m:
        m.setattr(zstdbuf, "lib", None)
        copied = [delta_compress(d, base, 3) for d in cases]
        assert [bytes(delta_decompress(p, base)) for p in native] == cases
    assert [bytes(delta_decompress(p, base)) for p in copied] == cases
    assert all(len(p) < len(base) // 20 for p in native)


def test_neighbouring_delta_chunks_travel_together_and_share_their_base_reads(tmp_path, new_repo, monkeypatch):
    """Changed chunks with a base go to the compressing workers several to a batch (up to
    DELTA_BATCH_BYTES), so the bases of a file's neighbouring chunks, side by side in the packs of
    each earlier backup, come with one read per pack and level; chunks without a base keep batches of
    BATCH_BYTES."""
    from chunkvault.store import backup as backup_module
    from chunkvault.store.repository import Repo

    rnd = random.Random(21)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table.db", 2048, rnd)  # 16 MiB: 16 chunks of 1 MiB
    repo = new_repo()
    trees = [(repo.backup([str(src)], fixed_chunks=["*.db"]).snapshot, describe(src))]
    touch_pages(src / "table.db", 0.3, rnd)
    trees.append((repo.backup([str(src)], fixed_chunks=["*.db"]).snapshot, describe(src)))
    touch_pages(src / "table.db", 0.3, rnd)
    page_file(src / "new.db", 1024, rnd)  # 8 MiB with no base

    batches, reads = [], []
    store_chunks, fetch = backup_module.Backup._store_chunks, Repo._fetch_envelopes

    def recording_store(self, batch):
        batches.append([(len(data), base is not None) for _, data, base in batch])
        return store_chunks(self, batch)

    def recording_fetch(self, blob_ids):
        reads.append(len(blob_ids))
        return fetch(self, blob_ids)

    monkeypatch.setattr(backup_module.Backup, "_store_chunks", recording_store)
    monkeypatch.setattr(Repo, "_fetch_envelopes", recording_fetch)
    snap = repo.backup([str(src)], fixed_chunks=["*.db"]).snapshot
    trees.append((snap, describe(src)))
    with_base = [b for b in batches if any(has for _, has in b)]
    plain = [b for b in batches if not any(has for _, has in b)]
    assert sum(has for b in batches for _, has in b) == 16 and sum(len(b) for b in batches) == 24
    assert max(len(b) for b in with_base) == backup_module.DELTA_BATCH_BYTES // FIXED_CHUNK_SIZE
    assert all(sum(n for n, _ in b) <= backup_module.DELTA_BATCH_BYTES for b in with_base)
    assert all(sum(n for n, _ in b) <= backup_module.BATCH_BYTES for b in plain)
    assert max(reads) > 1  # several bases asked for at once, level by level
    assert snap.stats["delta_blobs"] == 16
    assert_all_restore(repo, trees, tmp_path)


def test_a_copy_of_one_snapshot_holding_a_base_and_its_delta_keeps_the_delta(tmp_path, new_repo, monkeypatch):
    """A full snapshot of a table and an old copy of it holds the table's deltas and their bases: copied on
    its own, the bases go first, whatever order their packs have, and the deltas stay deltas."""
    from chunkvault.store import copy as copy_mod

    rnd = random.Random(23)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 256, rnd)  # 2 MiB
    repo = new_repo()
    repo.backup([str(src)])
    (src / "old").write_bytes((src / "table").read_bytes())
    touch_pages(src / "table", 0.5, rnd)
    assert repo.backup([str(src)]).snapshot.stats["delta_blobs"] > 0
    both = repo.backup([str(src)], kind="full").snapshot
    monkeypatch.setattr(copy_mod, "BATCH_RAW_BYTES", 1)  # a blob to a batch, the last stored first
    in_order = copy_mod._BlobMapper._batches
    monkeypatch.setattr(copy_mod._BlobMapper, "_batches", lambda self, ids: reversed(list(in_order(self, ids))))
    dst = Repository.init(str(tmp_path / "dst"), "pw2", kdf_seconds=0, copy_chunker_from=repo)
    sent = repo.copy_to(dst, [both.id])
    assert sent.copied and dst.stats().delta_blobs == repo.stats().delta_blobs
    out = tmp_path / "out"
    dst.restore(dst.snapshots()[-1].id, str(out))
    assert describe(out) == describe(src)
    assert dst.check(read_data=True).ok


def test_a_backup_sets_each_file_s_restart_turns_by_the_repository_s_keyed_hash(tmp_path, new_repo, monkeypatch):
    """The phase of a file's turns comes from the repository's keyed hash of its path, never an unkeyed one:
    which chunks a version stores whole says nothing of the paths to whoever holds the storage."""
    from chunkvault.store import backup as backup_module

    repo, src = _page_file_backed_up(tmp_path, new_repo, random.Random(5), 0.5)
    real, hashes = backup_module.restart_phase, []

    def recorded(keyed_hash, path):
        hashes.append((keyed_hash, path))
        return real(keyed_hash, path)

    monkeypatch.setattr(backup_module, "restart_phase", recorded)
    assert repo.backup([str(src)]).snapshot.stats["delta_blobs"] > 0
    assert hashes and all(h is repo.store.blob_id for h, _ in hashes)


def test_a_base_two_chains_share_deep_down_is_decoded_once_per_read(new_repo, tmp_path, monkeypatch):
    """Two copies of a file, each changed its own way twice, are deltas on deltas on one blob: ``read_blobs``
    of both decodes that blob once.  With the chains fetched ahead, only the bases right under the blobs asked
    for were counted, and a base shared further down was decoded once per chain."""
    import chunkvault.store.backup as backup_module
    import chunkvault.store.repository as repository_module

    monkeypatch.setattr(backup_module, "restart_turns", lambda sequence, phase, bound: range(0))  # none restarts
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(64 << 10)
    (src / "a").write_bytes(data)
    repo.backup([str(src)])
    (src / "b").write_bytes(data)
    repo.backup([str(src)])
    for i in range(2):
        for name, at in (("a", 100), ("b", 1000)):  # in the first chunk of each
            changed = bytearray((src / name).read_bytes())
            changed[at + i * 64 : at + 64 + i * 64] = os.urandom(64)
            (src / name).write_bytes(changed)
        repo.backup([str(src)])
    store = repo.store
    tops = [repo.find_entry("latest", n).chunk_ids()[0] for n in ("a", "b")]
    a_chain, b_chain = (store.delta_chain(t) for t in tops)
    assert len(a_chain) == len(b_chain) == 2 and a_chain[0] != b_chain[0] and a_chain[1] == b_chain[1]
    whole = [store.read_blob(t, verify=True) for t in tops]
    decoded: list[bytes] = []
    open_chain = repository_module.open_chain
    monkeypatch.setattr(repository_module, "open_chain", lambda sealer, chain, plain: decoded.extend(
        c[0] for c in chain) or open_chain(sealer, chain, plain))
    store._cache.items.clear()
    assert store.read_blobs(tops) == whole
    assert decoded.count(a_chain[1]) == 1


def _import_series(tmp_path, new_repo, versions, rnd, *, pages=256, share=0.01, fixed=False, **import_options):
    """A page file backed up through ``versions`` versions in one repository, each exported and imported into
    another, which each time first backs the same tree up in a dry run (same host and path: the same parent,
    the import before).  (source, destination, [(dry-run stats, import stats, imported snapshot, tree)])."""
    source = new_repo(chunker=SMALL)
    dest = Repository.init(str(tmp_path / "dest"), "pw2", kdf_seconds=0, copy_chunker_from=source)
    src = tmp_path / "db"
    src.mkdir()
    name = "table.db" if fixed else "table"
    opts = {"fixed_chunks": ["*.db"], "fixed_chunk_size": 16 << 10} if fixed else {}
    page_file(src / name, pages, rnd)
    out = []
    for v in range(versions):
        if v:
            touch_pages(src / name, share, rnd)
        snap = source.backup([str(src)], **opts).snapshot
        path = str(tmp_path / f"v{v}.backup")
        source.export(snap, path, "export pw", kdf_seconds=0)
        dry = dest.backup([str(src)], dry_run=True, **opts).snapshot.stats
        imported = dest.import_backup(path, "export pw", **import_options).snapshot
        out.append((dry, imported.stats, imported, describe(src)))
    return source, dest, out


DELTA_STATS = ("added_blobs", "added_raw_bytes", "delta_blobs", "delta_stored_bytes", "whole_stored_bytes")


def test_an_import_stores_deltas_where_a_backup_of_the_same_tree_would(tmp_path, new_repo):
    """Each version imported onto the one imported before stores the chunks a backup of the same tree with the
    same parent stores, and as the same deltas: the same bases (chains bounded, restarting in turns) and
    margin, so the same bytes."""
    _, dest, series = _import_series(tmp_path, new_repo, 16, random.Random(31), pages=64, share=1.0, fixed=True,
                                     fixed_chunks=["*.db"])
    for v, (dry, stats, _, _) in enumerate(series):
        assert {k: stats[k] for k in DELTA_STATS} == {k: dry[k] for k in DELTA_STATS}, v
    assert all(stats["delta_blobs"] for _, stats, _, _ in series[1:])
    depths = [max(repo_depths(dest, snap, "table.db")) for _, _, snap, _ in series]
    from chunkvault.store.blob import CONTENT_DEFINED_DELTA_DEPTH, FIXED_DELTA_DEPTH
    assert CONTENT_DEFINED_DELTA_DEPTH < max(depths) <= FIXED_DELTA_DEPTH
    assert_all_restore(dest, [(snap, tree) for _, _, snap, tree in series[-3:]], tmp_path)


def test_an_import_of_the_next_version_stores_its_changes_as_deltas(tmp_path, new_repo):
    """1 % of an 8 MiB page file's pages changed: the import of that version adds a small share of what it
    adds stored whole (`no_delta`), restores, checks with its data read, and keeps restoring once the
    version before is forgotten and pruned."""
    source, dest, series = _import_series(tmp_path, new_repo, 2, random.Random(32), pages=1024)
    (_, _, first, _), (dry, stats, snap, tree) = series
    assert stats["delta_blobs"] and stats["delta_stored_bytes"] == stats["added_stored_bytes"] - stats[
        "whole_stored_bytes"]
    whole = Repository.init(str(tmp_path / "whole"), "pw2", kdf_seconds=0, copy_chunker_from=source)
    whole.import_backup(str(tmp_path / "v0.backup"), "export pw")
    plain = whole.import_backup(str(tmp_path / "v1.backup"), "export pw", delta=False).snapshot.stats
    assert plain["delta_blobs"] == 0 and plain["added_blobs"] == stats["added_blobs"]
    assert stats["added_stored_bytes"] * 4 < plain["added_stored_bytes"]
    dest.forget([first.id])
    dest.prune(max_unused=0.0)
    assert_all_restore(dest, [(snap, tree)], tmp_path)


def test_cli_import_stores_deltas_unless_told_not_to(tmp_path, new_repo, cli):
    """`import` says what it stored as deltas; `--no-delta` and `--no-delta-path` store changed chunks whole,
    as they do for a backup; the repository restores each import and checks clean with its data read."""
    import json

    source = new_repo(chunker=SMALL)
    src = tmp_path / "db"
    src.mkdir()
    rnd = random.Random(33)
    page_file(src / "table", 512, rnd)
    page_file(src / "other", 256, rnd)
    files = []
    for v in range(2):
        if v:
            touch_pages(src / "table", 0.02, rnd)
            touch_pages(src / "other", 0.02, rnd)
        files.append(str(tmp_path / f"v{v}.backup"))
        source.export(source.backup([str(src)]).snapshot, files[-1], "export pw", kdf_seconds=0)
    env = {"CHUNKVAULT_EXPORT_PASSWORD": "export pw"}
    added = {}
    for options in ((), ("--no-delta",), ("--no-delta-path", "other")):
        dest = Repository.init(str(tmp_path / f"dest{len(added)}"), "pw2", kdf_seconds=0, copy_chunker_from=source)
        url = dest.store.remote.display_url
        cli("import", files[0], "-r", url, env=env, password="pw2")
        text = cli("import", files[1], "-r", url, *options, env=env, password="pw2").stdout.decode()
        assert " as deltas, " in text and " whole)" in text
        dest.close()
        dest = Repository.open(url, "pw2")
        stats = dest.snapshots()[-1].stats
        added[options] = stats
        assert dest.check(read_data=True).ok
        out = tmp_path / f"out{len(added)}"
        dest.restore(dest.snapshots()[-1].id, str(out))
        assert describe(out) == describe(src)
        dest.close()
    deltas, whole, table_only = added.values()
    assert deltas["delta_blobs"] and not whole["delta_blobs"]
    assert 0 < table_only["delta_blobs"] < deltas["delta_blobs"]
    assert deltas["added_stored_bytes"] < table_only["added_stored_bytes"] < whole["added_stored_bytes"]
    again = json.loads(cli("import", files[1], "-r", str(tmp_path / "dest0"), "--json", env=env,
                           password="pw2").stdout)
    assert again["skipped"] and again["warnings"] == []


def _onto_imported_version(tmp_path, new_repo, **dest_options):
    """A page file exported at two versions (a fifth of its pages changed between), the first imported into
    another repository: (destination, its copy of the first version, second file, second version's tree, the
    first version's chunks there that the second changed)."""
    source = new_repo(chunker=SMALL)
    src = tmp_path / "db"
    src.mkdir()
    rnd = random.Random(34)
    page_file(src / "table", 256, rnd)
    files, chunks = [], []
    for v in range(2):
        if v:
            touch_pages(src / "table", 0.2, rnd)
        files.append(str(tmp_path / f"v{v}.backup"))
        # cut at fixed offsets: by content, a cut point whose bytes changed moves (with the repository's key)
        snap = source.backup([str(src)], fixed_chunks=["table"], fixed_chunk_size=16 << 10).snapshot
        chunks.append(source.find_entry(snap, "table").chunk_ids())
        source.export(snap, files[-1], "export pw", kdf_seconds=0)
    dest = Repository.init(str(tmp_path / "dest"), "pw2", kdf_seconds=0, copy_chunker_from=source, **dest_options)
    first = dest.import_backup(files[0], "export pw").snapshot
    assert len(chunks[0]) == len(chunks[1])  # changed in place: cut alike
    changed = [c for c, a, b in zip(dest.find_entry(first, "table").chunk_ids(), *chunks) if a != b]
    return dest, first, files[1], describe(src), changed


def test_an_import_whose_delta_bases_are_damaged_stores_those_chunks_whole(tmp_path, new_repo):
    """A base that does not read (damaged in the destination) is never built on: the chunk, which the file
    holds, is stored whole, and the import warns naming the base; the snapshot restores exactly."""
    dest, first, second, tree, changed = _onto_imported_version(tmp_path, new_repo)
    store = dest.store
    for cid in changed:  # a byte of each base the second version's changed chunks would have
        loc = store.index.get(cid)
        pack = tmp_path / "dest" / "data" / pack_of(dest, cid)[:2] / pack_of(dest, cid)
        data = bytearray(pack.read_bytes())
        data[loc.offset + loc.length // 2] ^= 0x40
        pack.write_bytes(bytes(data))
    result = dest.import_backup(second, "export pw")
    assert result.snapshot.stats["added_blobs"] and result.snapshot.stats["delta_blobs"] == 0
    assert result.warnings and all("is damaged" in w and "stored whole" in w for w in result.warnings)
    assert result.snapshot.stats["warnings"] == len(result.warnings)
    out = tmp_path / "out"
    dest.restore(result.snapshot.id, str(out))
    assert describe(out) == tree


def test_an_import_whose_delta_base_pack_is_gone_fails_naming_it_and_saves_nothing(tmp_path, new_repo):
    """A pack the index lists but that is gone holds the bases: the import stops naming the pack (`repair
    index` first, as for a backup) before it saves a snapshot."""
    from chunkvault.errors import MissingObject

    dest, first, second, _, changed = _onto_imported_version(tmp_path, new_repo, pack_size=64 << 10)
    pack = pack_of(dest, changed[len(changed) // 2])
    os.remove(tmp_path / "dest" / "data" / pack[:2] / pack)
    with pytest.raises(MissingObject) as info:
        dest.import_backup(second, "export pw")
    assert pack in str(info.value)
    assert [s.id for s in dest.snapshots()] == [first.id]


def test_an_import_builds_on_a_backup_of_the_same_tree_and_a_stream_on_its_stream(tmp_path, new_repo):
    """The parent is whatever a backup finds: a backup of the same host and path made in the destination
    itself, and for a stream's snapshot the last of that stream name."""
    source = new_repo(chunker=SMALL)
    dest = Repository.init(str(tmp_path / "dest"), "pw2", kdf_seconds=0, copy_chunker_from=source)
    src = tmp_path / "db"
    src.mkdir()
    rnd = random.Random(35)
    page_file(src / "table", 512, rnd)
    dest.backup([str(src)])
    streams = [(src / "table").read_bytes()]
    source.backup_stream(io.BytesIO(streams[0]), "table.dump")
    dest.import_backup(_exported(source, tmp_path / "s0.backup"), "export pw")
    touch_pages(src / "table", 0.01, rnd)
    source.backup([str(src)])
    dry = dest.backup([str(src)], dry_run=True).snapshot.stats
    stats = dest.import_backup(_exported(source, tmp_path / "t1.backup"), "export pw").snapshot.stats
    assert stats["delta_blobs"] and {k: stats[k] for k in DELTA_STATS} == {k: dry[k] for k in DELTA_STATS}
    touch_pages(src / "table", 0.01, rnd)  # chunks of neither import before
    source.backup_stream(io.BytesIO((src / "table").read_bytes()), "table.dump")
    streamed = dest.import_backup(_exported(source, tmp_path / "s1.backup"), "export pw").snapshot
    assert streamed.stdin_name == "table.dump" and streamed.stats["delta_blobs"]
    assert streamed.stats["added_stored_bytes"] * 4 < stats["added_raw_bytes"]
    out = tmp_path / "out"
    dest.restore(streamed.id, str(out))
    assert (out / "table.dump").read_bytes() == (src / "table").read_bytes()


def _exported(repo, path) -> str:
    """``repo``'s newest snapshot exported to ``path``."""
    repo.export(repo.snapshots()[-1], str(path), "export pw", kdf_seconds=0)
    return str(path)


@pytest.mark.parametrize("window", [1, 3, 1 << 16])
def test_a_copy_taken_a_few_chunks_at_a_time_keeps_deltas_on_deltas_whose_bases_come_later(
        tmp_path, new_repo, monkeypatch, window):
    """Three versions of a table in one full snapshot (the two older ones as copies beside it) hold deltas on
    deltas, each base in that snapshot too: taken a window of chunks at a time, the bases in later windows
    and batches than the deltas on them, each delta waits till the blob below it is copied (a round for each
    level), and stays a delta."""
    from chunkvault.store import copy as copy_mod

    rnd = random.Random(29)
    src = tmp_path / "db"
    src.mkdir()
    page_file(src / "table", 256, rnd)  # 2 MiB
    repo = new_repo()
    repo.backup([str(src)])
    for old in ("v1", "v2"):
        (src / old).write_bytes((src / "table").read_bytes())
        touch_pages(src / "table", 0.5, rnd)
        repo.backup([str(src)])
    every = repo.backup([str(src)], kind="full").snapshot
    store = repo.store
    chunks = {i for path in ("table", "v1", "v2") for i in repo.find_entry(every, path).chunk_ids()}
    assert any(len(store.delta_chain(i)) >= 2 and set(store.delta_chain(i)) <= chunks for i in chunks)
    monkeypatch.setattr(copy_mod, "WINDOW_BLOBS", window)
    monkeypatch.setattr(copy_mod, "BATCH_RAW_BYTES", 1)  # a blob to a batch, the last stored first
    in_order = copy_mod._BlobMapper._batches
    monkeypatch.setattr(copy_mod._BlobMapper, "_batches", lambda self, ids: reversed(list(in_order(self, ids))))
    dst = Repository.init(str(tmp_path / "dst"), "pw2", kdf_seconds=0, copy_chunker_from=repo)
    assert repo.copy_to(dst, [every.id]).copied
    assert dst.stats().delta_blobs == repo.stats().delta_blobs
    for path in ("table", "v1", "v2"):  # each on the blob its source is on: chains as deep as there
        theirs = dst.find_entry("latest", path).chunk_ids()
        assert [len(dst.store.delta_chain(i)) for i in theirs] == [
            len(store.delta_chain(i)) for i in repo.find_entry(every, path).chunk_ids()]
    out = tmp_path / "out"
    dst.restore("latest", str(out))
    assert describe(out) == describe(src)
    assert dst.check(read_data=True).ok
