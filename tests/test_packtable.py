"""Prune's compact view of the index (``store/packtable.py``) gives what the PackEntry dicts it replaced gave:
the same copy kept for each blob, the same plan, the same index written."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from chunkvault.store.blob import KIND_DELTA, KIND_RAW, KIND_ZSTD
from chunkvault.store.blobindex import BlobIndex
from chunkvault.store.crypto import Sealer
from chunkvault.store.indexfile import (IndexData, decode_index, decode_index_columns, encode_index,
                                        pack_index_bytes, split_index)
from chunkvault.store.pack import EncodedEntries, PackEntry, encode_entries
from chunkvault.store.packtable import KeptCopies, PackTable, UsedIds, add_ids, blob_set, id_chunks
from chunkvault.store.prune import (add_bases, bases_needed, dead_index_objects, kept_copies,
                                    select_packs)
from chunkvault.store.usage import with_bases

SEALER = Sealer(bytes(32))


@st.composite
def repositories(draw, distinct_offsets: bool = True):
    """Packs of blobs, some stored more than once (whole, or as deltas on different bases), some copies at the
    same offset of one pack (as only a made-up index has them)."""
    n = draw(st.integers(1, 10))
    ids = [bytes([i + 1]) * 32 for i in range(n)]
    packs: dict[bytes, list[PackEntry]] = {}
    for i in range(n):
        for _ in range(draw(st.integers(1, 3))):
            base = draw(st.sampled_from([None, *ids[:i]]))
            pid = bytes([draw(st.integers(0, 5))]) * 32
            entries = packs.setdefault(pid, [])
            offset = 10 * len(entries) if distinct_offsets else draw(st.integers(0, 1)) * 10
            kind = draw(st.sampled_from([KIND_ZSTD, KIND_RAW])) if base is None else KIND_DELTA
            entries.append(PackEntry(ids[i], kind, offset, draw(st.integers(1, 100)), 100, base))
    return ids, packs


def reference_select(packs, used, max_unused, max_repack=None):
    """The selection as it was, on PackEntry dicts and sets: (delete, repack, keep, held back) pack ids, the
    live entries of each repacked pack, and the counts."""
    known = kept_copies(packs)
    used = set(used)
    while True:
        delete, repack, keep = [], [], []
        for pid in sorted(packs):
            live = [e for e in packs[pid] if e.blob_id in used and known[e.blob_id] is e]
            total = sum(e.length for e in packs[pid])
            use = (pid, live, total, sum(e.length for e in live))
            if not live:
                delete.append(use)
            elif total and (total - use[3]) / total > max_unused:
                repack.append(use)
            else:
                keep.append(use)
        held = []
        if max_repack is not None:
            budget, chosen = max_repack, []
            for use in sorted(repack, key=lambda u: (-(u[2] - u[3]) / u[2], u[0])):
                if use[3] <= budget:
                    budget -= use[3]
                    chosen.append(use)
                else:
                    keep.append(use)
                    held.append(use)
            repack = sorted(chosen)
            keep.sort()
        needed = {e.base_id for u in keep for e in packs[u[0]] if e.kind == KIND_DELTA and e.base_id} - used
        grown = with_bases(needed, lambda b: known[b].base_id if b in known and known[b].kind == KIND_DELTA
                           else None) - used
        if not grown:
            live = sum(len(u[1]) for u in delete + repack + keep)
            return ([u[0] for u in delete], [(u[0], u[1]) for u in repack], [u[0] for u in keep],
                    [u[0] for u in held], live)
        used |= grown


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_compact_plan_is_the_plan_the_entry_dicts_gave(data):
    """Same packs deleted, repacked (with the same live entries), kept and held back, whatever copies there
    are, at the same offset of a pack or not."""
    ids, packs = data.draw(repositories(distinct_offsets=data.draw(st.booleans())))
    used = set(data.draw(st.lists(st.sampled_from(ids), max_size=len(ids))))
    add_bases(used, kept_copies(packs))
    max_unused = data.draw(st.sampled_from([0.0, 0.3, 0.9]))
    max_repack = data.draw(st.sampled_from([None, 0, 50, 200]))
    table = PackTable.from_entries(packs)
    compact_used = blob_set(sorted(used))
    assert bases_needed(compact_used, KeptCopies(table)) == set()
    plan = select_packs(table, {}, compact_used, max_unused, KeptCopies(table), max_repack)
    delete, repack, keep, held, live = reference_select(packs, used, max_unused, max_repack)
    assert [u.pack_id for u in plan.delete] == delete
    assert [(u.pack_id, u.live) for u in plan.repack] == repack
    assert [u.pack_id for u in plan.keep] == keep
    assert [u.pack_id for u in plan.held_back] == held
    assert plan.live_blobs == live
    assert all(list(u.entries) == packs[u.pack_id] for u in plan.keep + plan.repack + plan.delete)
    assert plan.repacked_bytes == sum(e.length for _, entries in repack for e in entries)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_copy_kept_is_the_one_the_reference_keeps(data):
    """Blob by blob, ``KeptCopies`` names the entry ``kept_copies`` on dicts chooses (the same object there:
    the same pack and place in it here), copies that failed to verify spurned or not."""
    ids, packs = data.draw(repositories(distinct_offsets=data.draw(st.booleans())))
    copies = [(pid, e.offset) for pid, entries in packs.items() for e in entries]
    spurned = frozenset(data.draw(st.lists(st.sampled_from(copies), max_size=4)))
    reference = kept_copies(packs, spurned)
    table = PackTable.from_entries(packs)
    known = kept_copies(table, spurned)
    assert isinstance(known, KeptCopies) and len(known) == len(reference) and set(known) == set(reference)
    for blob_id, e in reference.items():
        pid = next(p for p, entries in packs.items() if any(x is e for x in entries))
        at = next(i for i, x in enumerate(packs[pid]) if x is e)
        assert known.kept_at(blob_id) == (table.pack_ids.index(pid), at)
        assert known.pack_of(blob_id) == pid and known[blob_id] == e and blob_id in known
    assert dict(known.deltas()) == {b: e.base_id for b, e in reference.items() if e.kind == KIND_DELTA}
    assert bytes(32) not in known and b"short" not in known and known.kept_at(bytes(32)) is None


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_packs_read_from_index_objects_are_the_entries_they_list(data):
    """Entries left in decoded index objects read back as they were written, deltas' bases included; a pack
    two objects list is the first one's; written into an index again, they encode as they came."""
    _, packs = data.draw(repositories())
    objects = [IndexData(dict(list(packs.items())[i::2])) for i in range(2)]
    repeated = next(iter(packs), None)
    if repeated is not None:  # listed again in a third object: the first listing counts
        objects.append(IndexData({repeated: packs[repeated][:1]}))
    columns = [decode_index_columns(SEALER, encode_index(SEALER, d), "i") for d in objects]
    table = PackTable.from_columns(columns)
    assert list(table) == sorted(packs) and len(table) == len(packs)
    for pid, entries in packs.items():
        assert table[pid] == entries and len(table[pid]) == len(entries) and pid in table
        assert encode_entries(table[pid]) == encode_entries(entries)
        assert pack_index_bytes(table[pid]) == pack_index_bytes(entries)
        assert table[pid].has_deltas == any(e.kind == KIND_DELTA for e in entries)
    again = IndexData({pid: table[pid] for pid in table})
    parts = split_index(again, 2000)
    assert {pid: e for p in parts for pid, e in decode_index(SEALER, encode_index(SEALER, p), "i").packs.items()} \
        == {pid: packs[pid] for pid in packs}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_dead_index_objects_are_the_same_from_decoded_objects(data):
    """``dead_index_objects`` gives the same answer for objects whose entries stay in their bytes."""
    _, packs = data.draw(repositories())
    pids = sorted(packs)
    objects = {}
    for i in range(data.draw(st.integers(1, 4))):
        chosen = data.draw(st.lists(st.sampled_from(pids), max_size=3, unique=True))
        objects[bytes([0xA0 + i]).hex() * 32] = IndexData({p: packs[p] for p in chosen})
    dead_packs = set(data.draw(st.lists(st.sampled_from(pids), unique=True)))
    columns = {n: decode_index_columns(SEALER, encode_index(SEALER, d), n) for n, d in objects.items()}
    assert dead_index_objects(columns, objects, dead_packs) == dead_index_objects(objects, objects, dead_packs)


def test_blobs_no_index_lists_are_counted_and_named():
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    table = PackTable.from_entries({bytes(32): [PackEntry(a, KIND_ZSTD, 0, 1, 1)]})
    known = KeptCopies(table)

    def missing(ids):  # as plan_prune counts and names them
        out = blob_set()
        add_ids(out, UsedIds(known.table).mark(b"".join(ids)))
        return len(out), (out._t.rows(0, 1)[0] if len(out) else None)

    assert missing([a]) == (0, None)
    assert missing([a, b, c, b]) == (2, b)
    assert missing([]) == (0, None)
    many = [i.to_bytes(32, "big") for i in range(70_000)]  # more than one step of id_chunks
    assert b"".join(id_chunks(blob_set(many))) == b"".join(many) == b"".join(id_chunks(many))
    empty = KeptCopies(PackTable.from_entries({}))
    assert len(empty) == 0 and list(empty.deltas()) == [] and a not in empty


def test_an_encoded_pack_is_a_sequence_of_its_entries():
    entries = [PackEntry(bytes([1]) * 32, KIND_ZSTD, 0, 5, 9), PackEntry(bytes([2]) * 32, KIND_DELTA, 5, 3, 9,
                                                                          bytes([1]) * 32)]
    buf = b"head" + encode_entries(entries)
    encoded = EncodedEntries(buf, 4, 2, len(buf))
    assert list(encoded) == entries and encoded[1] == entries[1] and encoded[-1:] == entries[1:]
    assert encoded == entries and encoded.encoded == buf[4:] and encoded.has_deltas
    assert repr(encoded).startswith("EncodedEntries([PackEntry(")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_live_entries_of_each_pack_are_the_reference_s(data):
    """The blob table's ``kept_in`` (C) gives the entries, lengths and entry sizes its Python reference does,
    for any used sets (none, one, two, marks in the table or not) and packs with deltas or not, copies at the
    same offset or not."""
    ids, packs = data.draw(repositories(distinct_offsets=data.draw(st.booleans())))
    used = [blob_set(data.draw(st.lists(st.sampled_from(ids), max_size=len(ids)))) for _ in range(data.draw(
        st.integers(0, 2)))]
    table = PackTable.from_entries(packs)
    known = KeptCopies(table)
    if data.draw(st.booleans()):  # some used ids marked in the table of copies kept, as a prune holds them
        marked = UsedIds(known.table)
        marked.mark(b"".join(data.draw(st.lists(st.sampled_from(ids), max_size=len(ids)))))
        used.append(marked)
    for no in range(len(table)):
        got, want = known.live_in(no, used), known.live_in_reference(no, used)
        assert got[1:] == want[1:] and list(got[0].numbers) == list(want[0].numbers) and got[0] == want[0]
        assert known.others_in(no) == known.others_in_reference(no)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_copies_spurned_in_the_one_table_are_the_copies_the_reference_keeps(data):
    """Copies found damaged round after round and spurned in the table made without them (``spurn``, as a
    prune does where the table is the repository's index) leave each blob kept where ``kept_copies`` on dicts
    keeps it with every copy spurned so far, and where a table made anew with them keeps it; the used blobs
    marked before stay marked."""
    ids, packs = data.draw(repositories(distinct_offsets=data.draw(st.booleans())))
    table = PackTable.from_entries(packs)
    known = KeptCopies(table)
    marked = UsedIds(known.table)
    used = data.draw(st.lists(st.sampled_from(ids), max_size=len(ids)))
    marked.mark(b"".join(used))
    copies = sorted({(pid, e.offset) for pid, entries in packs.items() for e in entries})
    spurned: set = set()
    for _ in range(data.draw(st.integers(1, 3))):
        kept = {(known.pack_of(b), known[b].offset) for b in known}
        failed = set(data.draw(st.lists(st.sampled_from(copies), max_size=4))) & kept
        spurned |= failed
        moved = known.spurn(failed, spurned)
        reference, anew = kept_copies(packs, frozenset(spurned)), KeptCopies(table, frozenset(spurned))
        assert set(known) == set(reference)
        for blob_id, e in reference.items():
            assert known[blob_id] == e and known.kept_at(blob_id) == anew.kept_at(blob_id)
        assert all(known[e.blob_id] == e for e in moved)
        assert set(marked) == set(used)
        for no in range(len(table)):
            got, want = known.live_in(no, [marked]), known.live_in_reference(no, [blob_set(used)])
            assert got[1:] == want[1:] and list(got[0].numbers) == list(want[0].numbers)
            assert known.others_in(no) == known.others_in_reference(no)


def test_kept_in_checks_what_it_is_given():
    """Entries cut short, of an unknown kind, a negative count or sets that are not tables are refused; no
    entries, a pack number no row has, or an entry number the row does not have give nothing live; used
    blobs come from marks, tables, or both."""
    import pytest

    from chunkvault.store import _blobtable

    a = bytes([1]) * 32
    entries = [PackEntry(a, KIND_ZSTD, 0, 7, 9), PackEntry(bytes([2]) * 32, KIND_DELTA, 7, 5, 9, a)]
    buf = encode_entries(entries)
    owned, n = BlobIndex(), bytearray()  # rows holding copies of the entries, told by their entry numbers
    owned.add_entries(buf, 0, 2, 0, None, n)
    t, used = owned._t, blob_set([a, bytes([2]) * 32])._t
    assert t.kept_in(buf, 0, 2, 0, n, (used,)) == (bytes(4) + (1).to_bytes(4, "little"), 12, 12, 45 + 77)
    assert t.kept_in(buf, 0, 2, 0, n, ()) == (b"", 12, 0, 0)
    assert t.kept_in(buf, 0, 2, 1, n, (used,)) == (b"", 12, 0, 0)  # not this pack's copies
    assert t.kept_in(buf, 0, 2, 2**40, n, (used,)) == (b"", 12, 0, 0)
    assert t.kept_in(b"", 0, 0, 0, n, (used,)) == (b"", 0, 0, 0)
    assert t.kept_in(buf, 0, 1, 0, n, (used, used)) == (bytes(4), 7, 7, 45)
    assert t.kept_in(buf, 0, 2, 0, b"", (used,)) == (b"", 12, 0, 0)  # no numbers: no row is an entry's
    assert t.kept_in(buf, 0, 2, 0, bytes(8), (used,)) == (bytes(4), 12, 7, 45)  # the second's row: entry 0
    assert t.kept_in(buf, 0, 2, 0, n, (), bytes([0, 1])) == ((1).to_bytes(4, "little"), 12, 5, 77)
    assert t.kept_in(buf, 0, 2, 0, n, (), b"\x01") == (bytes(4), 12, 7, 45)  # marks short of the rows
    assert t.kept_in(buf, 0, 2, 0, n, (blob_set([a])._t,), bytes([0, 1])) == (n, 12, 12, 45 + 77)
    with pytest.raises(TypeError, match="numbers are needed"):
        t.kept_in(buf, 0, 2, 0, None, (used,))
    for bad in (buf[:-1], buf[:44]):
        with pytest.raises(ValueError, match="truncated"):
            t.kept_in(bad, 0, 2, 0, n, (used,))
    with pytest.raises(ValueError, match="unknown blob kind 9"):
        t.kept_in(b"\x09" + buf[1:], 0, 2, 0, n, (used,))
    with pytest.raises(ValueError, match="negative"):
        t.kept_in(buf, 0, -1, 0, n, (used,))
    with pytest.raises(TypeError, match="tuple of tables"):
        t.kept_in(buf, 0, 2, 0, n, ({a},))
    with pytest.raises(TypeError):
        t.kept_in(buf, 0, 2, 0, n, [used])
    assert isinstance(_blobtable.Table(0).kept_in(buf, 0, 2, 0, n, (used,))[0], bytes)  # an empty table: nothing


def test_used_ids_are_marks_in_the_table_of_copies_kept():
    """Marking gives back the ids the table lacks, in order; the ids marked read back as a set would, and
    marked again in another table holding them, they are the same ids."""
    import pytest

    ids = [bytes([i]) * 32 for i in range(1, 6)]
    table = PackTable.from_entries({bytes(32): [PackEntry(b, KIND_ZSTD, 10 * i, 1, 1) for i, b in enumerate(ids)]})
    known = KeptCopies(table)
    used = UsedIds(known.table)
    absent = bytes([9]) * 32
    assert used.mark(ids[3] + absent + ids[1] + ids[3] + absent) == absent + absent
    assert set(used) == {ids[1], ids[3]} and len(used) == 2 and ids[1] in used and ids[0] not in used
    assert absent not in used and b"short" not in used and b"".join(id_chunks(used)) == ids[1] + ids[3]
    again = used.onto(KeptCopies(table, frozenset({(bytes(32), 0)})).table)
    assert set(again) == set(used) and again.table is not used.table
    with pytest.raises(ValueError, match="fewer bytes"):
        known.table.mark(ids[0], bytearray())
    with pytest.raises(ValueError, match="another table"):
        KeptCopies(table).live_in(0, [used])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_an_index_made_in_pack_id_order_keeps_the_copies_the_reference_keeps(data):
    """``Repo.install_packs`` given the packs in pack id order holds, blob by blob, the copy ``kept_copies``
    on dicts keeps, with its entry number, whatever the copies (whole or delta, at one offset of a pack or
    not) and the numbers the repository gave the packs before; a prune reads that table as ``KeptCopies``."""
    import tempfile

    from chunkvault import Repository

    ids, packs = data.draw(repositories(distinct_offsets=data.draw(st.booleans())))
    table = PackTable.from_entries(packs)
    reference = kept_copies(packs)
    with tempfile.TemporaryDirectory(prefix="kept-") as tmp, \
            Repository.init(tmp + "/repo", "pw", kdf_seconds=0.01) as repo:
        store = repo.store
        for pid in data.draw(st.permutations(list(table))):  # numbered in another order before
            store.pack_no(pid)
        index = store.install_packs([], ((p, table[p]) for p in table))
        known = KeptCopies(table, table=index, row_packs=[store.pack_no(p) for p in table])
        assert len(known) == len(reference) and set(known) == set(reference)
        for blob_id, e in reference.items():
            pid = next(p for p, entries in packs.items() if any(x is e for x in entries))
            at = next(i for i, x in enumerate(packs[pid]) if x is e)
            assert known.kept_at(blob_id) == (table.pack_ids.index(pid), at) and known[blob_id] == e
            loc = index.get(blob_id)
            assert (store.pack_ids[loc.pack_no], loc.offset, loc.length, loc.flags) == (pid, e.offset, e.length,
                                                                                         e.kind)
            assert store.delta_base(blob_id) == e.base_id


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_an_index_made_of_entries_in_any_buffer_reads_each_blob_with_its_base(data):
    """``install_packs`` given entries in a bytearray or a view (its rows point into bytes alone) holds each
    blob where it does given bytes, and the base of the copy it holds: matched to the entries it points at,
    not the ones given, it took every copy for another and dropped the bases."""
    import tempfile

    from chunkvault import Repository

    _, packs = data.draw(repositories(distinct_offsets=data.draw(st.booleans())))
    wrap = data.draw(st.sampled_from([bytearray, memoryview]))
    reference = kept_copies(packs)
    with tempfile.TemporaryDirectory(prefix="kept-") as tmp, \
            Repository.init(tmp + "/repo", "pw", kdf_seconds=0.01) as repo:
        store = repo.store
        given_ = []
        for pid in sorted(packs):
            buf = encode_entries(packs[pid])
            given_.append((pid, EncodedEntries(wrap(b"xy" + buf)[2:] if wrap is memoryview else wrap(buf), 0,
                                               len(packs[pid]), len(buf))))
        index = store.install_packs([], given_)
        for blob_id, e in reference.items():
            loc = index.get(blob_id)
            assert (store.pack_ids[loc.pack_no], loc.offset, loc.flags) == (
                next(p for p, es in packs.items() if any(x is e for x in es)), e.offset, e.kind)
            assert store.delta_base(blob_id) == e.base_id


def test_the_repository_index_in_pack_id_order_is_the_copies_kept(tmp_path):
    """The repository's index made of the packs in pack id order (``install_packs``) holds, for each blob,
    the copy ``KeptCopies`` keeps, whatever the pack numbers the repository gave the packs before; the prune
    reads the manifests through it and holds no other table of the blobs."""
    from chunkvault import Repository
    from chunkvault.store.prune import live_index_columns

    src = tmp_path / "src"
    src.mkdir()
    with Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0.01) as repo:
        for i in range(3):
            (src / f"f{i}").write_bytes(bytes([i]) * 5000)
            repo.backup([str(src)])
        store = repo.store
        store.index  # loaded in the objects' order: the packs have numbers already
        names, live = live_index_columns(store)
        packs = PackTable.from_columns(live.values())
        index = store.install_packs(names, ((p, packs[p]) for p in packs))
        assert store.index is index
        row_packs = [store.pack_no(p) for p in packs]
        known = KeptCopies(packs, table=index, row_packs=row_packs)
        reference = KeptCopies(packs)
        assert len(known) == len(reference) and set(known) == set(reference)
        for blob_id in reference:
            assert known.kept_at(blob_id) == reference.kept_at(blob_id) and known[blob_id] == reference[blob_id]
        used = UsedIds(index)
        used.mark(b"".join(reference))
        for no in range(len(packs)):
            got, want = known.live_in(no, [used]), reference.live_in(no, [blob_set(sorted(reference))])
            assert got[1:] == want[1:] and list(got[0].numbers) == list(want[0].numbers)
