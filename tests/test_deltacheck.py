"""The deltas check names, found from the bases the index keeps with its rows, against the pure-Python
computation it replaced (every delta entry listed, every base read into a set: the model kept here)."""
from __future__ import annotations

from typing import Callable, Iterable

import pytest
from hypothesis import example, given, settings, strategies as st

from chunkvault.store.blob import KIND_DELTA, KIND_ZSTD
from chunkvault.store.blobindex import BlobIndex
from chunkvault.store.deltacheck import delta_problems, unreadable_marks
from chunkvault.store.pack import PackEntry, decode_entries, encode_entries, readable_ids


def delta_entries_and_readable_bases(entries: Callable[[], Iterable[tuple[bytes, PackEntry]]], bases: set[bytes]
                                     ) -> tuple[list[tuple[bytes, PackEntry]], set[bytes]]:
    """The model (check's code before): the delta entries among ``entries()`` (pack id, entry), and a set that
    holds a delta's base exactly when ``readable_ids`` of all the entries would, kept from the whole entries
    that are some delta's base.  ``bases``: the bases the index objects name; ``entries`` is called again
    only when the deltas name one not among them."""
    deltas: list[tuple[bytes, PackEntry]] = []
    wholes: list[PackEntry] = []
    if not bases:
        return deltas, set()
    for pid, e in entries():
        if e.kind == KIND_DELTA:
            deltas.append((pid, e))
        elif e.blob_id in bases:
            wholes.append(e)
    missed = {e.base_id for _, e in deltas} - bases
    if missed:
        wholes += [e for _, e in entries() if e.kind != KIND_DELTA and e.blob_id in missed]
    return deltas, readable_ids([*wholes, *(e for _, e in deltas)])


def _id(i: int) -> bytes:
    return i.to_bytes(32, "big")


def _entry(blob: int, base: int | None, at: int) -> PackEntry:
    if base is None:
        return PackEntry(_id(blob), KIND_ZSTD, at, 1, 1)
    return PackEntry(_id(blob), KIND_DELTA, at, 1, 1, _id(base))


def _indexed(specs: list[tuple[int, int, int, int | None]]):
    """The index check makes of these entries (index object, pack, blob, base or None for one stored whole),
    each object's packs added in order, and each pack's entries where they lie (grouped by pack, in the
    order packs first appear, as check groups them)."""
    objects: dict[int, dict[bytes, list[PackEntry]]] = {}
    for n, (obj, pack, blob, base) in enumerate(specs):
        objects.setdefault(obj, {}).setdefault(_id(1000 + pack), []).append(_entry(blob, base, n))
    index = BlobIndex()
    pack_nos: dict[bytes, int] = {}
    packs: dict[bytes, list[tuple[bytes, int, int]]] = {}
    for obj in sorted(objects):
        for pid, entries in objects[obj].items():
            plain = b"\x09" * obj + encode_entries(entries)  # each pack's entries at some place of its object
            index.add_entries(plain, obj, len(entries), pack_nos.setdefault(pid, len(pack_nos)))
            packs.setdefault(pid, []).append((plain, len(entries), obj))
    return index, packs


def _model(index: BlobIndex, packs: dict[bytes, list[tuple[bytes, int, int]]], max_depth: int):
    def every_entry():
        return ((pid, e) for pid, sources in packs.items() for buf, count, start in sources
                for e in decode_entries(buf, count, start, "index")[0])

    bases = {e.base_id for _, e in every_entry() if e.kind == KIND_DELTA}
    deltas, readable = delta_entries_and_readable_bases(every_entry, bases)  # type: ignore[arg-type]
    out = []
    for pid, e in deltas:
        if e.base_id not in readable:
            out.append((pid, e, True))
        elif index.depth(e.blob_id, max_depth + 1) > max_depth:
            out.append((pid, e, False))
    return out


def _found(index: BlobIndex, packs: dict[bytes, list[tuple[bytes, int, int]]], max_depth: int):
    marks = unreadable_marks(index, lambda: (s for sources in packs.values() for s in sources))
    return list(delta_problems(index, packs.items(), marks, max_depth))


specs_st = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 20),
                              st.none() | st.integers(0, 24)), max_size=50)


@settings(max_examples=500, deadline=None)
@given(specs_st, st.integers(0, 4))
@example([(0, 0, 1, 5), (1, 1, 1, 2), (1, 1, 2, None)], 3)  # a blob stored as deltas on two bases, one lost
@example([(0, 0, 3, 4), (0, 0, 4, 3)], 3)  # a loop of two deltas
@example([(0, 0, 1, None), (0, 0, 2, 1), (0, 0, 3, 2), (0, 0, 4, 3)], 2)  # a chain one too long
@example([(1, 0, 2, 1), (0, 0, 1, 7), (2, 3, 1, None)], 1)  # a delta's base stored whole in a later object
def test_the_deltas_check_names_are_the_models(specs, max_depth):
    """Each delta entry whose base reads from no entry (True), or else whose chain is too long (False), in
    the order of the entries, as the sets of every delta and base found them: duplicates, blobs stored
    whole and as deltas, loops, bases absent or stored in a pack listed by two objects."""
    index, packs = _indexed(specs)
    assert _found(index, packs, max_depth) == _model(index, packs, max_depth)


def test_a_sound_index_of_deltas_is_found_so_without_a_walk_of_its_entries():
    """Every base reads: no mark is made, and the entries are not walked to find another copy's base."""
    index, packs = _indexed([(0, 0, 1, None), (0, 0, 2, 1), (1, 1, 3, 2), (1, 1, 4, None)])
    walked = []
    assert unreadable_marks(index, lambda: walked.append(1) or []) is None and not walked
    assert list(delta_problems(index, packs.items(), None, 2)) == []


def test_a_blob_stored_as_deltas_on_two_bases_reads_while_one_base_does():
    """The index keeps the first copy, whose base is lost; the other copy's base reads, and frees the deltas
    on the blob too.  The entry on the lost base is still named (`repair packs` drops it)."""
    index, packs = _indexed([(0, 0, 1, 9), (0, 1, 1, 2), (0, 1, 2, None), (1, 2, 3, 1)])
    assert index.base_of(_id(1)) == _id(9)
    marks = unreadable_marks(index, lambda: (s for sources in packs.values() for s in sources))
    assert marks is None
    (found,) = delta_problems(index, packs.items(), marks, 4)
    assert found == (_id(1000), _entry(1, 9, 0), True)


def test_rows_added_after_the_marks_were_made_are_unmarked():
    """A backup of the same repository object in another thread may add rows while check walks the entries:
    rows past the end of the marks and depths are read as unmarked (their chains walked, not kept), and a
    table grown since raises nothing."""
    index, packs = _indexed([(0, 0, 1, None), (0, 0, 2, 1), (0, 0, 3, 9)])
    marks = unreadable_marks(index, lambda: (s for sources in packs.values() for s in sources))
    assert marks == bytes([0, 0, 1])
    depths = bytearray(len(index))
    index.add(_id(9), 7, 0, 1, 1)  # the lost base, stored whole again meanwhile: row 3
    (buf, count, start), = packs[_id(1000)]
    third = start + 45 + 77  # after an entry stored whole and a delta's
    assert index.delta_entries(buf, start, count, marks) == [third]  # its own row is marked
    assert index.delta_entries(buf, start, count, None, 1, depths) == []
    assert depths == bytes([1, 2, 2])  # the chains' lengths + 1, kept for the rows the depths hold


def test_the_entries_walked_are_checked():
    index, packs = _indexed([(0, 0, 1, None), (0, 0, 2, 1)])
    (buf, count, start), = packs[_id(1000)]
    with pytest.raises(ValueError, match="truncated"):
        index.delta_entries(buf[:-1], start, count)
    with pytest.raises(ValueError, match="unknown blob kind"):
        index.delta_entries(buf[:start] + b"\x07" + buf[start + 1:], start, count)
    with pytest.raises(ValueError, match="below 254"):
        index.delta_entries(buf, start, count, None, 254, bytearray(len(index)))
    assert index.delta_entries(buf, start, count, None, 0) == [start + 45]
