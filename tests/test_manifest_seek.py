"""Looking up one path reads a few manifest blobs, and agrees with a full scan."""
import os
import random

import pytest

from chunkvault.errors import CorruptObject, UsageError
from chunkvault.store.manifest import OP_ENTRY, T_FILE, Entry, Record, sort_key
from chunkvault.store.manifest_io import store_manifest
from chunkvault.store.chain import in_listing, on_way_to
from chunkvault.store.manifest_seek import ManifestSeeker
from chunkvault.store.snapshot import KIND_FULL, Snapshot

SMALL = {"min_size": 256, "avg_size": 1024, "max_size": 4096}


def _records(rnd: random.Random, n: int) -> list[Record]:
    paths = set()
    while len(paths) < n:
        depth = rnd.randrange(1, 4)
        paths.add(b"/".join(rnd.choice([b"a", b"b", b"a.b", b"a-", b"dir", b"x"]) + str(rnd.randrange(50)).encode()
                            for _ in range(depth)))
    recs = []
    for p in sorted(paths, key=sort_key):
        chunks = rnd.randbytes(32 * rnd.choice([0, 1, 3, 400]))  # some records span several blobs
        recs.append(Record(OP_ENTRY, p, Entry(p, T_FILE, size=rnd.randrange(10 ** 6), chunks=chunks)))
    return recs


def test_seeker_agrees_with_a_scan_and_reads_few_blobs(new_repo):
    repo = new_repo(chunker=SMALL).store
    recs = _records(random.Random(3), 1500)
    ids, mw = store_manifest(repo, recs)
    assert len(ids) > 100 and -1 in mw.starts and len(mw.starts) == len(ids)
    reads = []

    def read(bid):
        reads.append(bid)
        return repo.read_blob(bid)

    seeker = ManifestSeeker(read, ids, mw.starts, "test manifest")
    for rec in random.Random(4).sample(recs, 200):
        reads.clear()
        seeker._blobs.clear()
        assert seeker.find(rec.path) == rec
        assert len(reads) < 30, len(reads)  # a binary search, not a scan of the blobs
    for missing in (b"", b"zzz", b"a0/zz", b"\x00", b"b1/a0/x9/deeper"):
        if not any(r.path == missing for r in recs):
            assert seeker.find(missing) is None
    # without offsets (or with offsets that do not fit) it still answers, by scanning
    for starts in ([], mw.starts[:-1]):
        slow = ManifestSeeker(repo.read_blob, ids, starts, "test manifest")
        assert slow.find(recs[-1].path) == recs[-1] and slow.find(b"zzz") is None


def test_a_lookup_decodes_the_record_it_finds_alone(new_repo, monkeypatch):
    """A look-up decoded every record of the blob it ends in, and took each one's sort key, to keep one: several
    milliseconds a blob (``ls`` or ``dump`` of one path, each hard link ``diff`` and ``find`` look up).  The
    records before it are passed over by their heads; only its own is decoded."""
    from chunkvault.store import manifest_seek

    repo = new_repo(chunker=SMALL).store
    recs = _records(random.Random(5), 1500)
    ids, mw = store_manifest(repo, recs)
    decoded = []
    real = manifest_seek.decode_records
    monkeypatch.setattr(manifest_seek, "decode_records",
                        lambda buf, what: decoded.append(len(real(buf, what)[0])) or real(buf, what))
    for starts in (mw.starts, []):  # by a binary search, or from the first blob
        seeker = ManifestSeeker(repo.read_blob, ids, starts, "test manifest")
        for rec in random.Random(6).sample(recs, 100):
            decoded.clear()
            assert seeker.find(rec.path) == rec
            assert decoded == [1]
        decoded.clear()
        assert seeker.find(b"a0/zz") is None and seeker.find(b"zzz") is None and not decoded


def test_a_lookup_reads_each_manifest_blob_once(new_repo):
    """The blob a binary search ends in was probed early and pushed out of the few blobs a seeker keeps by the
    probes after it, then read again for its records: a round trip more per look-up in each manifest of a
    chain, over a slow link (``diff``'s look-ups of hard-linked files, ``restore`` of one path)."""
    repo = new_repo(chunker=SMALL).store
    recs = [r for r in _records(random.Random(3), 1500) if len(r.entry.chunks) < 400 * 32]  # none spans 4 blobs
    ids, mw = store_manifest(repo, recs)
    assert len(ids) > 100
    for rec in random.Random(4).sample(recs, 200):
        reads = []
        seeker = ManifestSeeker(lambda bid: reads.append(bid) or repo.read_blob(bid), ids, mw.starts, "test manifest")
        assert seeker.find(rec.path) == rec
        assert len(reads) == len(set(reads)), rec.path


def test_records_on_the_way_to_a_directory_agree_with_a_scan_and_read_few_blobs(new_repo):
    repo = new_repo(chunker=SMALL).store
    recs = _records(random.Random(6), 1500)
    ids, mw = store_manifest(repo, recs)
    assert len(ids) > 2000
    reads = []
    seeker = ManifestSeeker(lambda bid: reads.append(bid) or repo.read_blob(bid), ids, mw.starts, "test manifest")
    dirs = {p for r in recs for p in [r.path.rsplit(b"/", 1)[0], r.path]} | {b"zzz", b"a0/none", b"\x00"}
    for directory in sorted(dirs)[::7]:
        reads.clear()
        seeker._blobs.clear()
        assert list(seeker.within(directory)) == [r for r in recs if on_way_to(r.path, directory)]
        near = sum(on_way_to(r.path, directory) for r in recs)
        assert len(reads) < 80 + 15 * near, (directory, len(reads))  # seeks, not a scan of the blobs
    slow = ManifestSeeker(repo.read_blob, ids, [], "test manifest")  # without offsets: by scanning
    assert list(slow.within(recs[700].path)) == [r for r in recs if on_way_to(r.path, recs[700].path)]


def test_a_shallow_walk_agrees_with_a_scan(new_repo):
    """``shallow``: a directory's record, those directly in it and those above it, seeking past each subtree;
    records spanning several blobs (no record starts in some) and names that sort between a directory and its
    subtree (``a-``, ``a.b``) included."""
    repo = new_repo(chunker=SMALL).store
    recs = _records(random.Random(8), 1500)
    ids, mw = store_manifest(repo, recs)
    assert len(ids) > 2000 and -1 in mw.starts
    seeker = ManifestSeeker(repo.read_blob, ids, mw.starts, "test manifest")
    dirs = {p for r in recs for p in [r.path.rsplit(b"/", 1)[0], r.path]} | {b"", b"zzz", b"a0/none", b"\x00"}
    for directory in sorted(dirs):
        assert list(seeker.shallow(directory)) == [r for r in recs if in_listing(r.path, directory)], directory
    slow = ManifestSeeker(repo.read_blob, ids, [], "test manifest")  # without offsets: by scanning
    assert list(slow.shallow(b"a1")) == [r for r in recs if in_listing(r.path, b"a1")]


def test_snapshot_with_bad_offsets_is_refused(new_repo):
    repo = new_repo().store
    for starts in ([0], [-2, 0], ["0", 0]):
        snap = Snapshot(time="2026-01-01T00:00:00+00:00", kind=KIND_FULL, parent=None, host="h", paths=["/x"],
                        manifest=["00" * 32, "11" * 32], manifest_starts=starts, id="ab" * 32)
        with pytest.raises(CorruptObject, match="manifest offsets"):
            Snapshot.decode(repo.sealer, snap.id, snap.encode(repo.sealer))


def test_find_entry_through_a_chain(tmp_path, new_repo):
    repo = new_repo(chunker=SMALL)
    src = tmp_path / "src"
    rnd = random.Random(9)
    for d in range(30):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (src / f"d{d}" / f"f{f}").write_bytes(rnd.randbytes(rnd.randrange(1, 200)))
    first = repo.backup([str(src)]).snapshot
    (src / "d3" / "f1").write_bytes(b"new content")
    for f in range(30):
        os.remove(src / "d7" / f"f{f}")
    os.rmdir(src / "d7")
    (src / "d7").write_bytes(b"now a file")
    second = repo.backup([str(src)]).snapshot
    assert second.kind == "diff"
    assert repo.open_file(second, "d3/f1").read() == b"new content"
    assert repo.open_file(first, "d3/f1").read() != b"new content"
    assert repo.open_file(second, "d7").read() == b"now a file"
    assert repo.find_entry(first, "d7/f5").type == T_FILE
    with pytest.raises(UsageError, match="no 'd7/f5'"):
        repo.find_entry(second, "d7/f5")
    assert repo.open_file(second, "/d29/f29/").read() == (src / "d29" / "f29").read_bytes()
    for snap in (first, second):
        tree = list(repo.store.tree(snap))
        for rec in tree:
            assert repo.find_entry(snap, rec.path) == rec.entry
        for directory in (b"d3", b"d7", b"d7/f5", b"d29/f29", b"none"):
            assert list(repo.store.tree_within(snap, directory)) == [r for r in tree if on_way_to(r.path, directory)]
        assert [e.path for e in repo.tree(snap, "/d3/")] == [b"d3"] + [b"d3/f%d" % f for f in sorted(range(30), key=str)]


def small_files(src, seed: int):
    """40 directories of 20 small files each."""
    rnd = random.Random(seed)
    for d in range(40):
        (src / f"d{d:02}").mkdir(parents=True)
        for f in range(20):
            (src / f"d{d:02}" / f"f{f}").write_bytes(rnd.randbytes(rnd.randrange(1, 300)))
    return src


def test_restoring_or_finding_one_file_reads_only_the_manifest_blobs_that_hold_it(tmp_path, new_repo, monkeypatch):
    repo = new_repo(chunker=SMALL)
    src = small_files(tmp_path / "src", 10)
    repo.backup([str(src)])
    (src / "d20" / "f3").write_bytes(b"changed")
    snap = repo.backup([str(src)]).snapshot
    manifests = {bytes.fromhex(h) for s in repo.store.chain_of(snap) for h in s.manifest}
    assert len(manifests) > 40
    store = repo.store
    read = []
    real = store.read_blob
    monkeypatch.setattr(store, "read_blob", lambda bid, **kw: read.append(bid) or real(bid, **kw))
    for n, (include, restored) in enumerate([(["d20/f3"], {"d20/f3": b"changed"}), (["d31/f*"], None)]):
        read.clear()
        out = tmp_path / f"out{n}"
        repo.restore(snap, str(out), includes=include)
        assert len(manifests.intersection(read)) < 25
        got = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert got == (restored or {f"d31/f{f}": (src / "d31" / f"f{f}").read_bytes() for f in range(20)})
    read.clear()
    found = repo.find(["d31/f1*"])  # find too, in every snapshot of the chain
    assert sorted(f.path for f in found) == sorted([b"d31/f1"] + [b"d31/f1%d" % i for i in range(10)])
    assert len(manifests.intersection(read)) < 25


# --- segments: decoding shared parts of manifests once --------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chunkvault.store.manifest import decode_records, encode_record  # noqa: E402
from chunkvault.store.manifest_seek import Segment, segments  # noqa: E402


def _cut(stream: bytes, record_starts: list[int], cuts: list[int]) -> tuple[list[bytes], list[int]]:
    """Blobs at ``cuts`` and their starts, computed as the manifest writer does."""
    blobs, starts, lo = [], [], 0
    for hi in cuts + [len(stream)]:
        blobs.append(stream[lo:hi])
        inside = [s - lo for s in record_starts if lo <= s < hi]
        starts.append(inside[0] if inside else -1)
        lo = hi
    return blobs, starts


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=30), data=st.data())
def test_segments_cover_the_stream_in_whole_records(sizes, data):
    recs = [Record(OP_ENTRY, b"p%03d" % i, Entry(b"p%03d" % i, T_FILE, chunks=b"\x07" * 32 * n))
            for i, n in enumerate(sizes)]
    encoded = [encode_record(r) for r in recs]
    stream = b"".join(encoded)
    record_starts = [sum(len(e) for e in encoded[:i]) for i in range(len(encoded))]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=12))))
    blobs, starts = _cut(stream, record_starts, cuts)
    segs = segments(len(blobs), starts)
    assert segs is not None
    decoded = []
    pieces = []
    for seg in segs:
        piece = seg.join(blobs[seg.first : seg.last + 1])
        records, used = decode_records(piece, "segment")
        assert used == len(piece) and records
        decoded += records
        pieces.append(piece)
    assert b"".join(pieces) == stream and decoded == recs


def test_segments_refuse_starts_that_cannot_be_right():
    assert segments(0, []) == []
    assert segments(2, [0]) is None and segments(2, [5, 0]) is None
    assert segments(3, [0, -1, 7]) == [Segment(0, 0, 2, 7), Segment(2, 7, 2, -1)]
    assert segments(3, [0, 0, -1]) == [Segment(0, 0, 0, -1), Segment(1, 0, 2, -1)]


def test_full_snapshots_of_an_unchanged_tree_are_decoded_once(tmp_path, new_repo, monkeypatch):
    repo = new_repo(chunker=SMALL)
    src = small_files(tmp_path / "src", 5)
    snaps = [repo.backup([str(src)], kind="full").snapshot for _ in range(3)]
    (src / "d20" / "f3").write_bytes(b"changed")
    snaps.append(repo.backup([str(src)], kind="full").snapshot)
    store = repo.store
    decoded = []
    real, real_many = store.read_blob, store.read_blobs
    monkeypatch.setattr(store, "read_blob", lambda bid, **kw: decoded.append(bid) or real(bid, **kw))
    # read a batch at a time (neighbours in a pack in one request): each blob of a batch counts
    monkeypatch.setattr(store, "read_blobs", lambda bids, **kw: decoded.extend(bids) or real_many(bids, **kw))
    refs = {}
    for snap, chunk_ids in store.manifest_chunk_refs(snaps):
        refs.setdefault(snap.id, []).append(chunk_ids)
    every_blob = {bytes.fromhex(b) for s in snaps for b in s.manifest}
    assert len(snaps[0].manifest) > 10 and len(every_blob) < 2 * len(snaps[0].manifest)
    # Each distinct blob once, but for the neighbours of the changed stretches (the directory's
    # record and the file's), which are decoded again with them.
    assert set(decoded) == every_blob and len(decoded) <= len(every_blob) + 4
    every = b"".join(b"".join(v) for v in refs.values())
    whole = b"".join(r.entry.chunks for s in snaps for r in store.manifest_records(s) if r.entry is not None)
    assert set(every[i : i + 32] for i in range(0, len(every), 32)) == set(
        whole[i : i + 32] for i in range(0, len(whole), 32))
    assert repo.check(read_data=True).ok


def test_record_starts_that_do_not_fit_are_reported_by_check(tmp_path, new_repo):
    repo = new_repo(chunker=SMALL)
    src = tmp_path / "src"
    rnd = random.Random(6)
    for f in range(300):
        (src / f"f{f:03}").parent.mkdir(parents=True, exist_ok=True)
        (src / f"f{f:03}").write_bytes(rnd.randbytes(rnd.randrange(1, 300)))
    a = repo.backup([str(src)], kind="full").snapshot
    b = repo.backup([str(src)], kind="full").snapshot
    i = next(i for i, s in enumerate(b.manifest_starts) if i and s > 0)
    b.manifest_starts = list(b.manifest_starts)
    b.manifest_starts[i] -= 1  # authentic object, wrong offsets: a writer bug, never silently skipped
    repo.store.save_snapshot(b, replace=True)
    report = repo.check()
    assert [p.object for p in report.problems] == [f"snapshots/{b.id}"]
    assert "record starts do not fit" in report.problems[0].problem
    with pytest.raises(CorruptObject):
        list(repo.store.manifest_chunk_refs([repo.store.load_snapshot(b.id)]))
    assert a.id not in report.problems[0].snapshots
