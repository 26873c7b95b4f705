"""Each delta's base as the repository's index keeps it with the delta's row (no dict of them), against a
pure model of random indexes: which copy of a blob the index holds and its base, the chain below it, the
other copies with theirs, and the deltas a writer's index leaves out for want of a base."""
from __future__ import annotations

import itertools
import warnings

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault.remotes import open_remote
from chunkvault.store.blob import KIND_DELTA, KIND_RAW, KIND_ZSTD, MAX_DELTA_DEPTH
from chunkvault.store.blobindex import BlobLocation
from chunkvault.store.deltabase import unreadable_deltas
from chunkvault.store.indexfile import IndexData, decode_index_columns, encode_index
from chunkvault.store.pack import PackEntry
from chunkvault.store.repository import Repo

PASSWORD = b"delta bases"
IDS = [bytes([i + 1]) * 32 for i in range(10)]  # few: blobs stored twice, deltas on each other
ABSENT = [bytes([0xA0 + i]) * 32 for i in range(3)]  # bases no index object lists
CHAIN = [bytes([0x40, i]) * 16 for i in range(MAX_DELTA_DEPTH + 3)]  # one chunk's versions, past the bound


@pytest.fixture(scope="module")
def repo_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("delta-bases") / "repo")
    Repo.init(open_remote(url), PASSWORD, kdf_seconds=0)
    return url


@st.composite
def indexes(draw):
    """Index objects in the order they are read: (name, IndexData, superseded by a later one's list).  Packs
    hold random entries of few ids (kinds mixed, bases among the ids, absent ones, and the chain's), a
    chain of deltas of deltas spread over them; a later object may supersede earlier ones, listing some of
    their packs again as a compaction does.  Every entry has an offset of its own."""
    offsets = itertools.count(0, 100)
    entries = []
    chain_len = draw(st.integers(0, len(CHAIN)))
    for i in range(chain_len):  # versions 1.. each a delta on the one before; some stored whole as well
        base = CHAIN[i - 1] if i else None
        entries.append((CHAIN[i], KIND_DELTA if i else KIND_ZSTD, base))
        if i and draw(st.integers(0, 9)) == 0:
            entries.append((CHAIN[i], KIND_ZSTD, None))
    ids = st.sampled_from(IDS + CHAIN[:chain_len])
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from([KIND_RAW, KIND_ZSTD, KIND_DELTA, KIND_DELTA]))
        base = draw(st.one_of(ids, st.sampled_from(ABSENT))) if kind == KIND_DELTA else None
        entries.append((draw(ids), kind, base))
    entries = draw(st.permutations(entries))
    packs: list[tuple[bytes, list[PackEntry]]] = []
    for n, (blob_id, kind, base) in enumerate(entries):
        if not packs or draw(st.integers(0, 3)) == 0:
            packs.append((bytes([0xF0, len(packs)]) * 16, []))
        length = draw(st.integers(1, 50))
        packs[-1][1].append(PackEntry(blob_id, kind, next(offsets), length, length * 3, base))
    objects: list[tuple[str, IndexData]] = []
    cut = sorted(draw(st.sets(st.integers(0, len(packs)), max_size=3)) | {0, len(packs)})
    for a, b in zip(cut, cut[1:]):
        name = bytes([0xE0, len(objects)]).hex() * 16
        supersedes: list[bytes] = []
        listed = dict(packs[a:b])
        if objects and draw(st.booleans()):  # compacts earlier objects: lists some of their packs
            gone = draw(st.sets(st.sampled_from([n for n, _ in objects]), min_size=1))
            supersedes = [bytes.fromhex(n) for n in sorted(gone)]
            for n, d in objects:
                if n in gone:
                    listed.update((pid, es) for pid, es in d.packs.items() if draw(st.booleans()))
        objects.append((name, IndexData(listed, supersedes)))
    return objects


def listed(objects: list[tuple[str, IndexData]], how: str) -> list[tuple[bytes, PackEntry]]:
    """The entries of the objects no other supersedes, in the order the index takes them: each object's packs
    in turn, or (a prune's) each pack once, in pack id order."""
    gone = {s.hex() for _, d in objects for s in d.supersedes}
    packs = [(pid, es) for n, d in objects if n not in gone for pid, es in d.packs.items()]
    if how == "packs":
        packs = sorted(dict(reversed(packs)).items())  # the first listing of each
    return [(pid, e) for pid, es in packs for e in es]


def model(listed: list[tuple[bytes, PackEntry]]):
    """The copy held of each blob (a whole one before a delta, else the first), its base, the other copies
    with theirs, and the unreadable deltas."""
    held: dict[bytes, tuple[bytes, PackEntry]] = {}
    for pid, e in listed:
        h = held.get(e.blob_id)
        if h is None or (h[1].kind == KIND_DELTA and e.kind != KIND_DELTA):
            held[e.blob_id] = (pid, e)
    others = {(e.blob_id, pid, e.offset, e.kind, e.base_id) for pid, e in listed
              if (pid, e) != held[e.blob_id]}
    bases = {b: e.base_id for b, (_, e) in held.items() if e.kind == KIND_DELTA}
    kinds = {b: e.kind for b, (_, e) in held.items()}
    return held, others, bases, unreadable_deltas(bases, kinds.get, KIND_DELTA)


def chain_of(bases: dict[bytes, bytes], blob_id: bytes) -> list[bytes]:
    out: list[bytes] = []
    cur = bases.get(blob_id)
    while cur is not None and len(out) <= MAX_DELTA_DEPTH:
        out.append(cur)
        cur = bases.get(cur)
    return out


def load(store: Repo, objects: list[tuple[str, IndexData]], how: str, split: int) -> bool:
    """The index made of ``objects`` as a repository makes it: read at once (``install_index``), the later
    ones added to a loaded index (a refresh; False where one supersedes another: then it reads anew), or
    the live objects' packs one by one into rows pointing at their entries (a prune's ``install_packs``)."""
    names = [n for n, _ in objects]
    cols = [(n, decode_index_columns(store.sealer, encode_index(store.sealer, d), n)) for n, d in objects]
    if how == "packs":
        gone = {s.hex() for _, c in cols for s in c.supersedes}
        first = dict(reversed([p for n, c in cols if n not in gone for p in c.packs()]))
        store.install_packs(names, sorted(first.items()))
    elif how == "refresh":
        store.install_index(names[:split], cols[:split])
        with store._index_lock:
            if not store._add_index_objects(cols[split:]):
                return False
    else:
        store.install_index(names, cols)
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(objects=indexes(), how=st.sampled_from(["objects", "refresh", "packs"]), split=st.integers(0, 4))
def test_bases_copies_and_withheld_deltas_match_a_model(repo_url, objects, how, split):
    store = Repo.open(open_remote(repo_url), PASSWORD)
    if not load(store, objects, how, split):
        return
    held, others, bases, unreadable = model(listed(objects, how))
    assert len(store.index) == len(held)
    for blob_id in IDS + ABSENT + CHAIN:
        h = held.get(blob_id)
        want = None if h is None else BlobLocation(store.pack_no(h[0]), h[1].offset, h[1].length,
                                                   h[1].raw_length, h[1].kind)
        assert store.locate(blob_id) == want
        assert store.delta_base(blob_id) == bases.get(blob_id)
        assert store.delta_chain(blob_id) == chain_of(bases, blob_id)
        assert store.delta_depth(blob_id) == len(chain_of(bases, blob_id))
        assert store.stored_twice(blob_id) == any(o[0] == blob_id for o in others)
    got = {(b, store.pack_ids[loc.pack_no], loc.offset, loc.flags, base)
           for b, copies in store._copies.items() for loc, base in copies}
    assert got == others

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.withhold_unreadable_deltas() == unreadable
    for blob_id in IDS + ABSENT + CHAIN:  # the others as they were; the chains as they were, to name what is lost
        assert (store.locate(blob_id) is not None) == (blob_id in held and blob_id not in unreadable)
        assert store.delta_base(blob_id) == bases.get(blob_id)
        assert store.delta_chain(blob_id) == chain_of(bases, blob_id)
        assert store.delta_depth(blob_id) == len(chain_of(bases, blob_id))
    assert len(store.index) == len(held) - len(unreadable)


def test_a_long_chain_is_followed_to_the_bound_and_withheld_where_its_whole_blob_is_missing(repo_url):
    """Deltas of deltas past the depth bound: the chain stops one past it; with the whole blob at its
    bottom missing, every delta of it is left out of a writer's index, the blobs beside it kept."""
    store = Repo.open(open_remote(repo_url), PASSWORD)
    deltas = [PackEntry(CHAIN[i], KIND_DELTA, 100 * i, 10, 30, CHAIN[i - 1]) for i in range(1, len(CHAIN))]
    other = PackEntry(IDS[0], KIND_ZSTD, 0, 10, 30)
    cols = decode_index_columns(store.sealer, encode_index(store.sealer, IndexData({b"\x01" * 32: deltas,
                                                                                    b"\x02" * 32: [other]})), "x")
    store.install_index(["x"], [("x", cols)])
    assert store.delta_chain(CHAIN[-1]) == CHAIN[-2::-1][:MAX_DELTA_DEPTH + 1]
    assert store.delta_depth(CHAIN[1]) == 1
    assert store.withhold_unreadable_deltas() == set(CHAIN[1:])
    assert len(store.index) == 1 and store.locate(IDS[0]) is not None
    assert store.delta_chain(CHAIN[2]) == [CHAIN[1], CHAIN[0]]  # a reader still names the base that is lost


def test_deltas_whose_chain_loops_are_withheld(repo_url):
    """A delta on itself, and two on each other (damage: no backup writes them): every base is in the index,
    and none of them reads; a writer's index left them in, and a backup deduplicated against them."""
    store = Repo.open(open_remote(repo_url), PASSWORD)
    a, b, c, whole, d = IDS[:5]
    entries = [PackEntry(a, KIND_DELTA, 0, 10, 30, a), PackEntry(b, KIND_DELTA, 100, 10, 30, c),
               PackEntry(c, KIND_DELTA, 200, 10, 30, b), PackEntry(whole, KIND_ZSTD, 300, 10, 30),
               PackEntry(d, KIND_DELTA, 400, 10, 30, whole)]
    cols = decode_index_columns(store.sealer, encode_index(store.sealer, IndexData({b"\x01" * 32: entries})), "x")
    store.install_index(["x"], [("x", cols)])
    assert store.withhold_unreadable_deltas() == {a, b, c}
    assert store.locate(d) is not None and store.locate(a) is None
