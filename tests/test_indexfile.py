"""Index objects: what is encoded decodes to the same entries and delta bases, packs with deltas included;
damaged plaintext gives chunkvault's own error."""
import random
import struct

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from chunkvault import Repository
from chunkvault.errors import CorruptObject
from chunkvault.store.blob import KIND_DELTA, KIND_RAW, KIND_ZSTD
from chunkvault.store.blobindex import BlobIndex, BlobLocation
from chunkvault.store.crypto import Sealer
from chunkvault.store.indexfile import INDEX_AD, IndexData, decode_index, decode_index_columns, encode_index
from chunkvault.store.pack import PackEntry

SEALER = Sealer(bytes(32))


@st.composite
def indexes(draw):
    rnd = random.Random(draw(st.integers(0, 2**32)))
    packs = {}
    for _ in range(draw(st.integers(0, 4))):
        entries = []
        for _ in range(draw(st.integers(0, 30))):
            kind = rnd.choice([KIND_RAW, KIND_ZSTD, KIND_DELTA, KIND_DELTA])
            entries.append(PackEntry(rnd.randbytes(32), kind, rnd.randrange(2**32), rnd.randrange(2**32),
                                     rnd.randrange(2**32), rnd.randbytes(32) if kind == KIND_DELTA else None))
        packs[rnd.randbytes(32)] = entries
    return IndexData(packs, [rnd.randbytes(32) for _ in range(draw(st.integers(0, 2)))])


@settings(max_examples=200, deadline=None)
@given(indexes())
def test_index_round_trip_with_deltas(index):
    sealed = encode_index(SEALER, index)
    assert decode_index(SEALER, sealed, "i") == index
    cols = decode_index_columns(SEALER, sealed, "i")
    pairs = [(e.blob_id, e.base_id) for es in index.packs.values() for e in es if e.kind == KIND_DELTA]
    assert list(cols.delta_bases()) == pairs and cols.has_deltas == bool(pairs)
    want: dict[bytes, BlobLocation] = {}
    bases: dict[bytes, bytes | None] = {}
    for no, entries in enumerate(index.packs.values()):
        for e in entries:
            want.setdefault(e.blob_id, BlobLocation(no, e.offset, e.length, e.raw_length, e.kind))
            bases.setdefault(e.blob_id, e.base_id)
    loaded = _loaded(cols)
    assert dict(loaded.items()) == want
    assert {b: loaded.base_of(b) for b in want} == bases  # each delta's base read back from its row


def _loaded(cols):
    """The columns of an index object added to a blob index as a repository loads them, a pack number each."""
    loaded = BlobIndex(cols.entry_count)
    for no, (count, start) in enumerate(zip(cols.counts, cols.starts)):
        loaded.add_entries(cols.plain, start, count, no)
    return loaded


@settings(max_examples=300, deadline=None)
@given(indexes(), st.integers(0, 2**32))
def test_damaged_index_plaintext_is_our_error(index, seed):
    """Random damage is refused or decodes to what loads; a count made smaller, or bytes added after the
    last pack, leave bytes no pack holds and are always refused (never an index quietly missing packs or
    entries)."""
    plain = zstandard.ZstdDecompressor().decompress(SEALER.open(encode_index(SEALER, index), INDEX_AD))
    rnd = random.Random(seed)

    def seal(b: bytes | bytearray) -> bytes:
        return SEALER.seal(zstandard.ZstdCompressor().compress(bytes(b)), INDEX_AD)

    shrunk = []
    if index.packs:
        pack_count_at = 5 + 32 * len(index.supersedes)
        shrunk.append(bytearray(plain))
        struct.pack_into("<I", shrunk[-1], pack_count_at, len(index.packs) - 1)
        last_entries = list(index.packs.values())[-1]
        if last_entries:
            entry_count_at = decode_index_columns(SEALER, seal(plain), "i").starts[-1] - 4
            shrunk.append(bytearray(plain))
            struct.pack_into("<I", shrunk[-1], entry_count_at, len(last_entries) - 1)
    for bad in [*shrunk, plain + rnd.randbytes(rnd.randrange(1, 40))]:
        with pytest.raises(CorruptObject, match="malformed index"):
            decode_index_columns(SEALER, seal(bad), "i")
    bad = bytearray(plain)
    if rnd.random() < 0.5 and bad:
        for _ in range(rnd.randrange(1, 4)):
            bad[rnd.randrange(len(bad))] = rnd.choice([0, 1, 2, 3, 255, rnd.randrange(256)])
    else:
        bad = bad[: rnd.randrange(len(bad) + 1)]
    sealed = seal(bad)
    try:
        decode_index(SEALER, sealed, "i")
    except CorruptObject:
        pass
    try:
        cols = decode_index_columns(SEALER, sealed, "i")
    except CorruptObject:
        pass
    else:  # what decodes also loads
        assert len(_loaded(cols)) <= cols.entry_count


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([KIND_RAW, KIND_ZSTD, KIND_DELTA])), max_size=40),
       st.integers(1, 6))
def test_a_blob_stored_twice_is_read_from_its_first_copy_stored_whole_else_its_first_delta(entries, per_pack):
    """A delta's base may be lost with its pack, and a backup then stores the chunk again whole: readers
    must take that copy, whichever index object lists it first (the order is the listing's)."""
    ids = [bytes([i]) * 32 for i in range(6)]
    packed = [PackEntry(ids[i], kind, n, 100 + n, 200 + n, ids[(i + 1) % 6] if kind == KIND_DELTA else None)
              for n, (i, kind) in enumerate(entries)]
    packs = {bytes([p]) * 32: packed[a : a + per_pack] for p, a in enumerate(range(0, len(packed), per_pack))}
    want: dict[bytes, BlobLocation] = {}
    for no, es in enumerate(packs.values()):
        for e in es:
            held = want.get(e.blob_id)
            if held is None or (held.flags == KIND_DELTA and e.kind != KIND_DELTA):
                want[e.blob_id] = BlobLocation(no, e.offset, e.length, e.raw_length, e.kind)
    cols = decode_index_columns(SEALER, encode_index(SEALER, IndexData(packs)), "i")
    assert dict(_loaded(cols).items()) == want


def test_a_newer_version_or_blob_kind_is_a_newer_writers_not_damage():
    """They were called damage (exit 13), and the index object left out as unreadable, with `repair index`
    advised: an older chunkvault must refuse what a newer one wrote (exit 17), never repair it away."""
    import struct

    import pytest

    from chunkvault.errors import NewerObject
    from chunkvault.store.pack import HEADER_AD, open_header

    plain = zstandard.ZstdCompressor().compress(struct.pack("<BII", 2, 0, 0))
    with pytest.raises(NewerObject, match="index/x: index version 2, which a newer chunkvault writes") as info:
        decode_index_columns(SEALER, SEALER.seal(plain, INDEX_AD), "index/x")
    assert info.value.exit_code == 17
    entry = struct.pack("<B32sIII", 7, bytes(32), 0, 10, 10)
    with pytest.raises(NewerObject, match="blob kind 7, which a newer chunkvault writes"):
        open_header(SEALER, SEALER.seal(struct.pack("<BI", 1, 1) + entry, HEADER_AD), "data/x", 100)
    with pytest.raises(NewerObject, match="pack header version 2"):
        open_header(SEALER, SEALER.seal(struct.pack("<BI", 2, 0), HEADER_AD), "data/x", 100)
    with pytest.raises(CorruptObject, match="unsupported pack header version") as info:
        open_header(SEALER, SEALER.seal(struct.pack("<BI", 0, 0), HEADER_AD), "data/x", 100)
    assert not isinstance(info.value, NewerObject)


def test_a_newer_index_object_in_a_repository_stops_every_command_and_repair_keeps_it(tmp_path, new_repo, cli):
    """`restore` advised `repair index` for it, `check` called it damage (exit 18), and `repair index` replaced
    it with an index of the packs it could read, deleting the newer writer's object for good."""
    import struct

    import pytest

    from chunkvault.errors import NewerObject
    from chunkvault.store.crypto import content_name

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    path = tmp_path / "repo"
    repo = new_repo(str(path))
    repo.backup([str(src)])
    store = repo.store
    sealed = store.sealer.seal(zstandard.ZstdCompressor().compress(struct.pack("<BII", 2, 0, 0)), INDEX_AD)
    name = content_name(sealed)
    store.remote.put(f"index/{name}", sealed)
    before = sorted(p.name for p in (path / "index").iterdir())
    for call in (lambda: store.load_index(), lambda: repo.check(), lambda: repo.repair_index(),
                 lambda: repo.prune()):
        with pytest.raises(NewerObject, match=f"index/{name}: index version 2, which a newer chunkvault writes"
                                              r": upgrade(?!.*repair index rebuilds)") as info:
            call()
        assert info.value.exit_code == 17
    assert sorted(p.name for p in (path / "index").iterdir()) == before
    Repository.init(str(tmp_path / "to"), "pw", kdf_seconds=0).close()
    for command in (["restore", "latest", "--target", str(tmp_path / "out")], ["check"], ["repair", "index"],
                    ["find", "f"], ["verify-restore", "latest"],
                    ["copy", "--to", str(tmp_path / "to"), "--to-password-file", str(tmp_path / "to-pw")]):
        (tmp_path / "to-pw").write_text("pw\n")
        proc = cli(*command, "-r", str(path), check=17)
        assert b"repair index rebuilds" not in proc.stderr and b"newer chunkvault" in proc.stderr, command
        assert b"damaged" not in proc.stderr, command
    assert sorted(p.name for p in (path / "index").iterdir()) == before
