"""stats: what a repository holds, from snapshot objects, the index and the pack listing."""
from __future__ import annotations

import json
import os

import crashkit
from chunkvault import Repository
from chunkvault.store.blob import KIND_DELTA, KIND_ZSTD
from chunkvault.store.blobindex import BlobLocation
from chunkvault.store.snapshot import Snapshot
from chunkvault.store.stats import summarize


def snap(sid, t, kind="full", host="h", paths=("/a",), stdin=None, size=0, manifest=()):
    return Snapshot(time=f"2026-01-01T00:00:{t:02d}+00:00", kind=kind, parent=None, host=host, paths=list(paths),
                    stdin_name=stdin, stats={"bytes": size}, manifest=[m.hex() for m in manifest], id=sid)


def test_summarize_splits_manifests_from_data_and_counts_each_source_s_newest():
    m1, m2, d1, d2, d3 = (bytes([i]) * 32 for i in range(5))
    snaps = [snap("a", 1, size=100, manifest=[m1]), snap("b", 2, "diff", size=150, manifest=[m2]),
             snap("c", 3, host="other", size=7), snap("d", 4, paths=["x.sql"], stdin="x.sql", size=5),
             snap("e", 0, size=1000)]
    blobs = [(m1, BlobLocation(0, 0, 30, 300, KIND_ZSTD)), (m2, BlobLocation(0, 30, 10, 90, KIND_ZSTD)),
             (d1, BlobLocation(1, 0, 40, 100, KIND_ZSTD)), (d2, BlobLocation(1, 40, 5, 100, KIND_DELTA)),
             (d3, BlobLocation(2, 0, 6, 50, KIND_DELTA))]
    st = summarize(snaps, blobs, [100, 200])
    assert (st.snapshots, st.full_snapshots, st.sources) == (5, 4, 3)
    assert (st.newest_bytes, st.all_bytes) == (150 + 7 + 5, 1262)
    assert (st.manifest_blobs, st.manifest_stored_bytes) == (2, 40)
    assert (st.blobs, st.blob_raw_bytes, st.blob_stored_bytes) == (3, 250, 51)
    assert (st.delta_blobs, st.delta_raw_bytes, st.delta_stored_bytes) == (2, 150, 11)
    assert (st.packs, st.pack_bytes) == (2, 300)
    assert st.to_dict()["dedup_ratio"] == round(1262 / 250, 3)
    assert st.to_dict()["overall_ratio"] == round(1262 / 300, 3)
    assert summarize([], [], []).to_dict()["compression_ratio"] == 0.0


def test_stats_of_a_repository_with_repeats_and_deltas(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    page = os.urandom(1 << 16)
    (src / "db").write_bytes(page * 8)
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    crashkit.run_cli("backup", "-r", repo, str(src), "--fixed-chunks", "db", "--fixed-chunk-size", "64k")
    crashkit.run_cli("backup", "-r", repo, str(src), "--fixed-chunks", "db", "--fixed-chunk-size", "64k",
                     "--type", "full")
    with open(src / "db", "r+b") as f:  # a few bytes of one chunk change in place: a delta
        f.seek(3 * (1 << 16) + 100)
        f.write(b"changed")
    crashkit.run_cli("backup", "-r", repo, str(src), "--fixed-chunks", "db", "--fixed-chunk-size", "64k")
    st = json.loads(crashkit.run_cli("stats", "-r", repo, "--json").stdout)
    assert (st["snapshots"], st["full_snapshots"], st["sources"]) == (3, 2, 1)
    assert st["all_bytes"] == 3 * 8 * (1 << 16) and st["newest_bytes"] == 8 * (1 << 16)
    assert st["blobs"] == 2 and st["blob_raw_bytes"] == 2 << 16  # the page, and its changed copy
    assert st["delta_blobs"] == 1 and st["delta_stored_bytes"] < 1000
    assert st["manifest_blobs"] == 2  # the two fulls list the same entries: one blob
    data = tmp_path / "repo" / "data"
    assert st["pack_bytes"] == sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    assert st["dedup_ratio"] == round(st["all_bytes"] / st["blob_raw_bytes"], 3) == 12.0
    text = crashkit.run_cli("stats", "-r", repo).stdout.decode()
    assert "3 (2 full, 1 differential) of 1 source(s)" in text and "(1 deltas: 64.0 KiB as" in text
    with Repository.open(repo, crashkit.PASSWORD) as r:
        assert r.stats().to_dict() == st


def test_archived_wal_is_counted_apart_from_the_snapshots_data(tmp_path):
    """A PostgreSQL repository holds far more WAL than files: counted as the snapshots' distinct data, it
    gave a deduplication ratio below 1 and a files-to-packs ratio that the WAL's volume decided."""
    from walsegments import write_segment

    src = tmp_path / "src"
    src.mkdir()
    (src / "db").write_bytes(os.urandom(1 << 18))
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    for _ in range(2):
        crashkit.run_cli("backup", "-r", repo, str(src), "--type", "full")
    names = ["000000010000000000000001", "000000010000000000000002"]
    for i, name in enumerate(names):
        seg = write_segment(tmp_path / "wal", name, seed=i + 1, size=1 << 20)
        crashkit.run_cli("archive-push", "-r", repo, str(seg))
    st = json.loads(crashkit.run_cli("stats", "-r", repo, "--json").stdout)
    assert st["wal_files"] == 2 and st["wal_bytes"] == 2 << 20
    assert st["wal_blobs"] > 0 and st["wal_raw_bytes"] >= 1 << 20 and st["wal_stored_bytes"] > 0
    assert st["blob_raw_bytes"] == 1 << 18  # the file's chunks alone
    assert st["dedup_ratio"] == 2.0
    text = crashkit.run_cli("stats", "-r", repo).stdout.decode()
    assert "archived WAL   2 files, 2.0 MiB" in text and "deduplication 2.00x" in text
