"""Looking up one path reads a few manifest blobs, and agrees with a full scan."""
import os
import random

import pytest

from chunkvault.errors import CorruptObject, UsageError
from chunkvault.store.manifest import OP_ENTRY, T_FILE, Entry, Record, sort_key
from chunkvault.store.manifest_io import store_manifest
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
        for rec in repo.store.tree(snap):
            assert repo.find_entry(snap, rec.path) == rec.entry
