"""The C manifest decoder against the Python reference: same records, same cut, same errors."""
import pytest
from hypothesis import given, settings, strategies as st

from chunkvault.errors import CorruptObject
from chunkvault.store import manifest
from chunkvault.store.manifest import (F_XATTRS, OP_DELETE, OP_ENTRY, OP_FRESH, TYPE_NAMES, Entry, Record,
                                       decode_records, decode_records_reference, encode_record, locate_record,
                                       locate_record_reference, sort_key)

pytestmark = pytest.mark.skipif(manifest._decode_c is None, reason="the C decoder is not built")

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)

entries = st.builds(
    Entry, path=st.binary(max_size=40), type=st.sampled_from(sorted(TYPE_NAMES)), mode=u32, uid=u32, gid=u32,
    mtime_ns=i64, size=u64, ctime_ns=i64, ino=u64, dev=u64, rdev=u64, target=st.binary(max_size=30),
    digest=st.binary(max_size=32), chunks=st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(b"".join),
    flags=st.integers(0, 255).map(lambda f: f & ~F_XATTRS),  # the wire's bit, never an entry's
    xattrs=st.one_of(st.just(b""), st.binary(min_size=1, max_size=40)))  # opaque to the decoders
records = st.one_of(
    st.builds(lambda e, op: Record(op, e.path, e), entries, st.sampled_from([OP_ENTRY, OP_FRESH])),
    st.binary(max_size=40).map(lambda p: Record(OP_DELETE, p, None)))


def outcome(fn, data):
    try:
        return fn(data, "m")
    except CorruptObject as exc:
        return str(exc)


@settings(max_examples=300)
@given(st.lists(records, max_size=12), st.data())
def test_the_same_records_and_cut_as_the_reference(recs, data):
    buf = b"".join(encode_record(r) for r in recs)
    decoded, used = decode_records(buf, "m")
    assert (decoded, used) == (recs, len(buf))
    assert [type(r.entry) for r in decoded] == [type(r.entry) for r in recs]
    cut = data.draw(st.integers(0, len(buf)))
    assert decode_records(buf[:cut], "m") == decode_records_reference(buf[:cut], "m")
    assert decode_records(memoryview(buf)[:cut], "m") == decode_records_reference(buf[:cut], "m")


@settings(max_examples=300)
@given(st.lists(records, min_size=1, max_size=6), st.data())
def test_damaged_input_fails_or_decodes_as_the_reference_does(recs, data):
    buf = bytearray(b"".join(encode_record(r) for r in recs))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    assert outcome(decode_records, bytes(buf)) == outcome(decode_records_reference, bytes(buf))


@settings(max_examples=300)
@given(st.lists(records, max_size=12), st.data())
def test_a_record_is_located_by_its_head_as_the_reference_locates_it(recs, data):
    """A look-up of one path passes over the records before it by their heads and lengths, none decoded: where
    it is, where it would be (a record after it), or where the bytes end (inside a record, or after one)."""
    recs = sorted({sort_key(r.path): r for r in recs}.values(), key=lambda r: sort_key(r.path))
    buf = b"".join(encode_record(r) for r in recs)
    starts = [0]
    for r in recs:
        starts.append(starts[-1] + len(encode_record(r)))
    for i, r in enumerate(recs):
        assert locate_record(buf, r.path, "m") == (0, starts[i], starts[i + 1])
        assert decode_records(buf[starts[i] : starts[i + 1]], "m")[0] == [r]
    path = data.draw(st.binary(max_size=40))
    cut = data.draw(st.integers(0, len(buf)))
    got = locate_record(buf[:cut], path, "m")
    assert got == locate_record_reference(buf[:cut], path, "m")
    assert locate_record(memoryview(buf)[:cut], path, "m") == got
    after = [i for i, r in enumerate(recs) if sort_key(r.path) > sort_key(path)]
    # keys, not paths: a NUL byte sorts as "/" does, and no path on disk holds one
    if sort_key(path) in [sort_key(r.path) for r in recs] or not after or starts[after[0]] + 5 + len(recs[after[0]].path) > cut:
        assert got[0] != 1  # its head and path read: no more of it
    else:
        assert got == (1, starts[after[0]], starts[after[0]])


@settings(max_examples=300)
@given(st.lists(records, min_size=1, max_size=6), st.binary(max_size=40), st.data())
def test_damaged_input_is_located_in_as_the_reference_does(recs, path, data):
    buf = bytearray(b"".join(encode_record(r) for r in recs))
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    located = lambda fn: outcome(lambda b, what: fn(b, path, what), bytes(buf))  # noqa: E731
    assert located(locate_record) == located(locate_record_reference)


def test_unknown_op_and_type_name_the_object():
    e = Entry(b"a", 0)
    good = encode_record(Record(OP_ENTRY, b"a", e))
    with pytest.raises(CorruptObject, match="unknown manifest record op 3"):
        decode_records(bytes([3]) + good[1:], "manifest 1234")
    bad_type = bytearray(good)
    bad_type[5 + 1] = max(TYPE_NAMES) + 1  # the head (5 bytes), the path (1 byte), then the entry's type
    with pytest.raises(CorruptObject, match=f"manifest 1234.*unknown entry type {max(TYPE_NAMES) + 1}"):
        decode_records(bytes(bad_type), "manifest 1234")


def test_classes_it_cannot_fill_itself_are_called():
    """Entry and Record are allocated and filled in C only as slotted dataclass and plain tuple subclass
    (what the dataclass and named tuple would build); other classes get their own constructors called."""
    import dataclasses
    from typing import NamedTuple

    calls = []

    # Entry's fields, in a class with a __dict__ and a __post_init__
    LooseEntry = dataclasses.make_dataclass(
        "LooseEntry", [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(Entry)],
        namespace={"__post_init__": lambda self: calls.append(self.path)})

    class CountedRecord(NamedTuple):
        op: int
        path: bytes
        entry: object

    recs = [Record(OP_ENTRY, b"a", Entry(b"a", 0, size=5, chunks=b"c" * 32)), Record(OP_DELETE, b"b", None)]
    buf = b"".join(encode_record(r) for r in recs)
    decoded, used = manifest._decode_c(buf, CountedRecord, LooseEntry, OP_DELETE, max(TYPE_NAMES))
    assert used == len(buf) and calls == [b"a"]
    assert [type(r) for r in decoded] == [CountedRecord, CountedRecord]
    assert dataclasses.astuple(decoded[0].entry) == dataclasses.astuple(recs[0].entry)
    assert tuple(decoded[1]) == tuple(recs[1])
    hooked = dataclasses.make_dataclass(  # slots, as Entry has, but a hook to run
        "Hooked", [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(Entry)],
        namespace={"__post_init__": lambda self: calls.append(b"hooked " + self.path)}, slots=True)
    manifest._decode_c(buf, Record, hooked, OP_DELETE, max(TYPE_NAMES))
    assert calls == [b"a", b"hooked a"]
    fast, _ = manifest._decode_c(buf, Record, Entry, OP_DELETE, max(TYPE_NAMES))
    assert fast == recs and type(fast[0]) is Record and type(fast[0].entry) is Entry


_CHANGES = {"path": b"g", "type": manifest.T_SYMLINK, "mode": 0o600, "uid": 1, "gid": 1, "mtime_ns": 2,
            "size": 7, "rdev": 9, "target": b"t", "digest": b"e" * 32, "xattrs": b"x"}


@pytest.mark.parametrize("field", sorted(_CHANGES))
def test_diff_reports_a_change_of_each_field_a_restore_sets(field):
    """``same_content`` compares every field a restore gives back; a file touched only in its mtime was not
    reported by ``diff`` when one of them was left out."""
    from dataclasses import replace

    from chunkvault.repository import diff_trees

    old = Entry(b"f", manifest.T_FILE, size=6, mtime_ns=1, digest=b"d" * 32, chunks=b"c" * 32)
    new = replace(old, **{field: _CHANGES[field]})
    assert not old.same_content(new) and not new.same_content(old)
    if field != "path":
        got = list(diff_trees(iter([Record(OP_ENTRY, b"f", old)]), iter([Record(OP_ENTRY, b"f", new)])))
        assert got == [("modified", old, new)]


def test_what_a_restore_does_not_set_is_no_change():
    """ctime, inode, device and flags are the machine's, and chunks cut otherwise hold the same digest."""
    from dataclasses import replace

    old = Entry(b"f", manifest.T_FILE, size=6, mtime_ns=1, digest=b"d" * 32, chunks=b"c" * 32)
    assert old.same_content(replace(old, ctime_ns=5, ino=5, dev=5, flags=2, chunks=b"z" * 64))
    undigested = replace(old, digest=b"")
    assert not undigested.same_content(replace(undigested, chunks=b"z" * 32))
