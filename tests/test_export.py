"""Export files: a resolved snapshot in one encrypted file; import it anywhere, restore straight from it.

Damage of any kind (truncation, a flipped bit, sections moved, swapped or
spliced in from another file) is refused before anything is written.
"""
import argparse
import base64
import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import struct

import blake3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkvault import Repository
from chunkvault.errors import CorruptObject, Locked, MissingObject, UnsupportedFormat, UsageError, WrongPassword
from chunkvault.store.export import (
    HEADER_SIZE, S_BLOB, S_END, S_META, S_RECORDS, VERSION, ExportFile, blob_ref, export, import_backup, open_export,
    restore_from_file,
)
from chunkvault.store.manifest import T_DIR, T_FILE, T_HARDLINK, T_SYMLINK
from chunkvault.store.restore import Restorer, RestoreOptions
from treeutil import describe

EXPORT_PW = b"export secret"
DOC = pathlib.Path(__file__).resolve().parent.parent / "store" / "FORMAT.md"


def write_tree_v1(src):
    (src / "db").mkdir(parents=True)
    (src / "db" / "base.dat").write_bytes(random.Random(1).randbytes(1_500_000))
    (src / "db" / "copy.dat").write_bytes((src / "db" / "base.dat").read_bytes())  # same chunks: stored once
    (src / "db" / "gone.txt").write_text("removed later\n")
    (src / "notes.txt").write_text("version 1\n")
    (src / "empty").write_bytes(b"")
    os.symlink("db/base.dat", src / "link")


def change_tree_v2(src):
    (src / "db" / "gone.txt").unlink()
    (src / "notes.txt").write_text("version 2, longer\n")
    (src / "db" / "new.bin").write_bytes(random.Random(2).randbytes(300_000))
    os.link(src / "notes.txt", src / "db" / "notes-link.txt")
    os.chmod(src / "db", 0o750)


@pytest.fixture
def chain(tmp_path, new_repo):
    """A repository with a full snapshot and a differential on top; the source as of the differential."""
    src = tmp_path / "src"
    write_tree_v1(src)
    repo = new_repo()
    repo.backup([str(src)], kind="full")
    change_tree_v2(src)
    diff = repo.backup([str(src)], kind="diff").snapshot
    assert diff.kind == "diff"
    return repo, diff, src


@pytest.fixture
def exported(tmp_path, chain):
    repo, diff, src = chain
    path = tmp_path / "snap.backup"
    stats = export(repo.store, diff, str(path), EXPORT_PW, kdf_log_n=10)
    return repo, diff, src, path, stats


def other_repo(tmp_path, name="other"):
    return Repository.init(str(tmp_path / name), "a different password", kdf_seconds=0)


def data_files(repo):
    root = pathlib.Path(repo.store.remote.display_url.removeprefix("file://"))
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and not str(p.relative_to(root)).startswith("locks"))


def sections(data: bytes):
    """(offset, type, total length) of every section, by the framing in store/FORMAT.md."""
    out, pos = [], HEADER_SIZE
    while pos < len(data):
        stype, length = struct.unpack_from("<BI", data, pos)
        out.append((pos, stype, 5 + length))
        pos += 5 + length
    assert pos == len(data)
    return out


# --- round trips ---------------------------------------------------------------------


def test_an_export_removes_what_a_killed_export_of_that_name_left(tmp_path, chain):
    """A SIGKILLed export leaves its hidden temporary file, as large as it got: the next export to that name
    removes it, but not one whose writer still runs (holding its lock), nor one written less than a minute
    ago (just created, not locked yet), nor files of other names."""
    import fcntl

    repo, diff, src = chain
    old = os.path.getmtime(src) - 3600
    left = {}
    for name in (".x.backup.tmp-0123456789ab", ".x.backup.tmp-aaaaaaaaaaaa", ".x.backup.tmp-cccccccccccc",
                 ".x.backup.tmp-zz", ".y.backup.tmp-dddddddddddd", ".x.backup.tmp-0123456789ab.tmp-ffffffffffff"):
        left[name] = tmp_path / name
        left[name].write_bytes(b"part of an export")
        if name != ".x.backup.tmp-cccccccccccc":
            os.utime(left[name], (old, old))
    with open(left[".x.backup.tmp-aaaaaaaaaaaa"], "rb") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        export(repo.store, diff, str(tmp_path / "x.backup"), EXPORT_PW, kdf_log_n=10)
        assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == sorted(set(left) - {
            ".x.backup.tmp-0123456789ab"})
    export(repo.store, diff, str(tmp_path / "x.backup"), EXPORT_PW, kdf_log_n=10, overwrite=True)
    assert ".x.backup.tmp-aaaaaaaaaaaa" not in os.listdir(tmp_path)


def test_an_export_onto_a_file_system_without_locks_is_written_and_removes_nothing_running(tmp_path, chain,
                                                                                         no_flock):
    """NFS mounted nolock: flock fails with ENOLCK; the export is written all the same, and a temporary file
    that cannot be locked is never taken for an abandoned one."""
    repo, diff, src = chain
    other = tmp_path / ".x.backup.tmp-bbbbbbbbbbbb"
    other.write_bytes(b"another export's, running")
    old = os.path.getmtime(src) - 3600
    os.utime(other, (old, old))
    export(repo.store, diff, str(tmp_path / "x.backup"), EXPORT_PW, kdf_log_n=10)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".x")) == [other.name]
    assert (tmp_path / "x.backup").stat().st_size > 0


def test_export_of_a_differential_imports_as_a_full_snapshot_elsewhere(tmp_path, exported):
    repo, diff, src, path, stats = exported
    assert stats.snapshot_id == diff.id and stats.file_bytes == path.stat().st_size
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    dst = other_repo(tmp_path)
    snap = import_backup(dst.store, str(path), EXPORT_PW).snapshot
    assert snap.kind == "full" and snap.parent is None
    assert snap.stats["imported_from"] == diff.id
    assert (snap.time, snap.host, snap.paths, snap.tags) == (diff.time, diff.host, diff.paths, diff.tags)
    assert [s.id for s in dst.snapshots()] == [snap.id]
    out = tmp_path / "out"
    dst.restore(snap.id, str(out))
    assert describe(out) == describe(src)
    # Blob ids were re-derived with the destination's key: none of the source's ids appear.
    src_ids = {c for e in repo.tree(diff) for c in e.chunk_ids()}
    dst_ids = {c for e in dst.tree(snap) for c in e.chunk_ids()}
    assert len(src_ids) == len(dst_ids) and not src_ids & dst_ids
    assert all(i in dst.store.index for i in dst_ids)
    assert dst.check(read_data=True).ok


def test_each_distinct_chunk_is_written_once(exported):
    repo, diff, _src, path, stats = exported
    entries = list(repo.tree(diff))
    distinct = {c for e in entries for c in e.chunk_ids()}
    assert stats.blobs == len(distinct)
    assert stats.blob_bytes == sum(len(repo.store.read_blob(c)) for c in distinct)
    assert stats.records == len(entries)
    assert stats.bytes == sum(e.size for e in entries if e.type == T_FILE)
    counts = {t: 0 for t in (S_META, S_BLOB, S_RECORDS, S_END)}
    for _, stype, _ in sections(path.read_bytes()):
        counts[stype] += 1
    assert counts[S_META] == 1 and counts[S_END] == 1 and counts[S_BLOB] == len(distinct) and counts[S_RECORDS] >= 1


def test_a_large_file_is_exported_a_batch_of_chunks_at_a_time(tmp_path, new_repo, monkeypatch):
    """Chunks are read a batch of about 8 MiB at a time, a few batches ahead: a file's whole list went into
    one batch, so exporting a 20 GiB database file held it all in memory (330 MB: 530 MiB resident)."""
    from chunkvault.store import export as export_module

    src = tmp_path / "src"
    src.mkdir()
    (src / "table").write_bytes(random.Random(4).randbytes(20 << 20))
    repo = new_repo()
    snap = repo.backup([str(src)], fixed_chunks=["table"], fixed_chunk_size=1 << 20).snapshot
    batches = []
    real = export_module._encode_batch

    def encode(store, ids, level):
        batches.append(len(ids))
        return real(store, ids, level)

    monkeypatch.setattr(export_module, "_encode_batch", encode)
    export(repo.store, snap, str(tmp_path / "x.backup"), EXPORT_PW, kdf_log_n=10)
    assert sum(batches) == 20 and max(batches) <= 8, batches
    restore_from_file(str(tmp_path / "x.backup"), EXPORT_PW, str(tmp_path / "out"))
    assert (tmp_path / "out" / "table").read_bytes() == (src / "table").read_bytes()


def test_importing_twice_imports_once(tmp_path, exported, cli):
    """The snapshot an export brings is imported once: again (or into the repository it came from) it is
    found there and nothing is stored, where a second copy took a retention slot and became the next
    backup's parent."""
    repo, diff, src, path, _ = exported
    dst = other_repo(tmp_path)
    first = import_backup(dst.store, str(path), EXPORT_PW)
    assert not first.skipped and first.snapshot.stats["added_blobs"] > 0
    before = data_files(dst)
    second = import_backup(dst.store, str(path), EXPORT_PW)
    assert second.skipped and second.snapshot.id == first.snapshot.id
    assert data_files(dst) == before and len(dst.snapshots()) == 1
    back = import_backup(repo.store, str(path), EXPORT_PW)
    assert back.skipped and back.snapshot.id == diff.id
    env = {"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PW.decode()}
    out = json.loads(cli("import", "-r", str(tmp_path / "other"), str(path), "--json", env=env,
                         password="a different password").stdout)
    assert out["skipped"] is True and out["id"] == first.snapshot.id
    err = cli("import", "-r", str(tmp_path / "other"), str(path), env=env,
              password="a different password").stderr.decode()
    assert f"its snapshot {diff.id[:8]} is in this repository already (as {first.snapshot.short_id})" in err
    copied = other_repo(tmp_path, "copied")
    repo.copy_to(copied, [diff.id])
    skipped = import_backup(copied.store, str(path), EXPORT_PW)  # a copy of it is there too
    assert skipped.skipped and skipped.snapshot.stats["copied_from"] == diff.id and len(copied.snapshots()) == 2
    dst.forget([first.snapshot.id])  # forgotten, it comes in again
    again = import_backup(dst.store, str(path), EXPORT_PW)
    assert not again.skipped
    dst.restore(again.snapshot.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)


def test_restore_from_file_equals_the_source(tmp_path, exported):
    _repo, diff, src, path, _ = exported
    out = tmp_path / "out"
    info, result = restore_from_file(str(path), EXPORT_PW, str(out))
    assert describe(out) == describe(src)
    assert info.snapshot.id == diff.id and info.snapshot.kind == "diff"
    assert info.metadata["snapshot"]["chain_length"] == 2
    assert result.files == 5 and result.links == 2
    assert os.stat(out / "notes.txt").st_ino == os.stat(out / "db" / "notes-link.txt").st_ino


def test_restore_from_file_partial_and_in_place(tmp_path, exported):
    _repo, _diff, src, path, _ = exported
    out = tmp_path / "out"
    restore_from_file(str(path), EXPORT_PW, str(out), includes=["db/new.bin"])
    assert sorted(os.listdir(out)) == ["db"] and os.listdir(out / "db") == ["new.bin"]
    assert (out / "db" / "new.bin").read_bytes() == (src / "db" / "new.bin").read_bytes()
    (out / "stray").write_bytes(b"not in the snapshot")
    restore_from_file(str(path), EXPORT_PW, str(out), force=True, delete=True)
    assert describe(out) == describe(src)


def test_restore_from_file_refuses_delta(tmp_path, exported):
    path = exported[3]
    with open_export(str(path), EXPORT_PW) as ef, pytest.raises(UsageError, match="a delta restore .* needs a repository"):
        Restorer(ef, str(tmp_path / "out"), RestoreOptions(delta=True))


def test_export_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, chain):
    repo, diff, _src = chain
    path = tmp_path / "x.backup"
    path.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists"):
        export(repo.store, diff, str(path), EXPORT_PW, kdf_log_n=10)
    assert path.read_bytes() == b"keep me"
    with pytest.raises(UsageError, match="empty"):
        export(repo.store, diff, str(tmp_path / "y.backup"), b"", kdf_log_n=10)
    # A pack goes missing: the export fails part way and leaves no file behind.
    packs = sorted((pathlib.Path(repo.store.remote.display_url.removeprefix("file://")) / "data").rglob("*"))
    for p in packs:
        if p.is_file():
            p.unlink()
    fresh = Repository.open(repo.store.remote.display_url, "correct horse battery staple")
    with pytest.raises(CorruptObject):
        export(fresh.store, fresh.snapshot(diff.id), str(tmp_path / "z.backup"), EXPORT_PW, kdf_log_n=10)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if ".tmp-" not in n)
    assert not (tmp_path / "z.backup").exists()
    fresh.close()


def test_an_export_does_not_replace_one_written_to_its_name_while_it_ran(tmp_path, chain):
    """Two exports to one name at once (two runs of one job), neither with --force: each found the name free,
    and the one that ended last renamed its file over the other's."""
    repo, diff, _src = chain
    path = tmp_path / "x.backup"
    other = []

    def meanwhile():
        if not other:
            other.append(export(repo.store, diff, str(path), EXPORT_PW, kdf_log_n=10))

    with pytest.raises(UsageError, match="written while this export ran"):
        export(repo.store, diff, str(path), EXPORT_PW, kdf_log_n=10, checkpoint=meanwhile)
    with open_export(str(path), EXPORT_PW) as ef:
        assert ef.info.file_id == other[0].file_id
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if ".tmp-" not in n)
    stats = export(repo.store, diff, str(path), EXPORT_PW, kdf_log_n=10, overwrite=True)
    with open_export(str(path), EXPORT_PW) as ef:
        assert ef.info.file_id == stats.file_id
    assert os.stat(path).st_nlink == 1


def test_export_replaces_only_regular_files(tmp_path, chain):
    """It writes beside the output and renames over it: /dev/stdout (a symlink), a pipe or a directory
    would be replaced, for the whole machine."""
    repo, diff, _src = chain
    (tmp_path / "target").write_bytes(b"x")
    os.symlink(tmp_path / "target", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name in ("link", "fifo", "dir"):
        with pytest.raises(UsageError, match="not a regular file"):
            export(repo.store, diff, str(tmp_path / name), EXPORT_PW, kdf_log_n=10, overwrite=True)
    assert os.path.islink(tmp_path / "link") and (tmp_path / "target").read_bytes() == b"x"
    with pytest.raises(UsageError, match="not to standard output"):
        export(repo.store, diff, "-", EXPORT_PW, kdf_log_n=10)


def test_a_slow_export_password_derivation_stays_readable(tmp_path, chain, monkeypatch):
    """Where one scrypt lane is fast, a long --kdf-time asked for more lanes (or more memory) than
    readers accept: tuned to the format's bounds, N grows instead, up to what scrypt can compute."""
    from chunkvault.store import crypto
    from chunkvault.store.export import MAX_SCRYPT_P

    monkeypatch.setattr(crypto, "derive_kek", lambda *args: b"")  # the first, small derivations: instant
    for lane in (0.0001, 0.001, 0.05, 0.5):
        monkeypatch.setattr(crypto, "_lane_seconds", lambda log_n, lane=lane: lane * 2 ** (log_n - 15))
        for target in (0.5, 3, 10, 60):
            log_n, p = crypto.tune_scrypt(target, max_p=MAX_SCRYPT_P)
            assert crypto.MIN_LOG_N <= log_n <= crypto.MAX_LOG_N and 1 <= p <= MAX_SCRYPT_P, (lane, target)
    monkeypatch.undo()
    repo, diff, _src = chain
    with pytest.raises(UsageError, match="from 0 to 60 seconds"):
        export(repo.store, diff, str(tmp_path / "x.backup"), EXPORT_PW, kdf_seconds=float("inf"))


# --- refusing bad files ------------------------------------------------------------------


def assert_refused(path, tmp_path, exc=(CorruptObject, UnsupportedFormat), password=EXPORT_PW):
    target = tmp_path / "target"
    with pytest.raises(exc) as info:
        restore_from_file(str(path), password, str(target))
    assert not target.exists()
    return info.value


def test_wrong_password(tmp_path, exported):
    repo, _diff, _src, path, _ = exported
    assert_refused(path, tmp_path, WrongPassword, password=b"not it")
    before = data_files(repo)
    with pytest.raises(WrongPassword):
        import_backup(repo.store, str(path), b"not it")
    assert data_files(repo) == before


def test_truncation_anywhere_is_refused(tmp_path, exported):
    path = exported[3]
    data = path.read_bytes()
    cuts = {0, 1, 5, 8, 9, 10, 40, 79, 80, 81, 84, 85, len(data) - 1, len(data) - 17}
    for off, _stype, length in sections(data):
        cuts |= {off, off + 1, off + 4, off + 5, off + 20, off + length - 1}
    cuts |= set(random.Random(3).sample(range(len(data)), 40))
    bad = tmp_path / "cut.backup"
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        bad.write_bytes(data[:cut])
        err = assert_refused(bad, tmp_path)
        if cut == 0:
            assert isinstance(err, UnsupportedFormat)
        else:
            assert isinstance(err, CorruptObject), (cut, err)
            assert str(bad) in str(err)


def test_flipped_bits_anywhere_are_refused(tmp_path, exported):
    repo, _diff, _src, path, _ = exported
    data = path.read_bytes()
    rng = random.Random(4)
    offsets = set(range(0, HEADER_SIZE + 8)) | set(rng.sample(range(len(data)), 60)) | {len(data) - 1}
    for off, _stype, length in sections(data):
        offsets |= {off, off + 1, off + 4, off + 5, off + 17, off + length - 1}
    bad = tmp_path / "flip.backup"
    for off in sorted(offsets):
        flipped = bytearray(data)
        flipped[off] ^= 1 << rng.randrange(8)
        bad.write_bytes(flipped)
        err = assert_refused(bad, tmp_path)
        if off < 8:  # magic: not an export file
            assert isinstance(err, UnsupportedFormat), (off, err)
        else:
            assert isinstance(err, CorruptObject), (off, err)
            assert str(bad) in str(err)
    # Import is refused just the same, and stores nothing.
    before = data_files(repo)
    for off in rng.sample(range(HEADER_SIZE, len(data)), 5):
        flipped = bytearray(data)
        flipped[off] ^= 0x80
        bad.write_bytes(flipped)
        with pytest.raises(CorruptObject):
            import_backup(repo.store, str(bad), EXPORT_PW)
    assert data_files(repo) == before


def test_error_names_the_section(tmp_path, exported):
    data = exported[3].read_bytes()
    blobs = [(off, length) for off, stype, length in sections(data) if stype == S_BLOB]
    off, length = blobs[2]
    flipped = bytearray(data)
    flipped[off + length // 2] ^= 4
    bad = tmp_path / "bad.backup"
    bad.write_bytes(flipped)
    err = assert_refused(bad, tmp_path)
    assert f"blob section 2 at byte {off}" in str(err)


def test_sections_swapped_dropped_duplicated_or_spliced_are_refused(tmp_path, exported, chain):
    repo, diff, _src, path, _ = exported
    data = path.read_bytes()
    secs = sections(data)
    chunks = [data[:HEADER_SIZE]] + [data[o : o + n] for o, _, n in secs]
    kinds = [None] + [t for _, t, _ in secs]
    blob_at = [i for i, t in enumerate(kinds) if t == S_BLOB]
    rec_at = [i for i, t in enumerate(kinds) if t == S_RECORDS]
    variants = {}

    def swapped(i, j):
        c = list(chunks)
        c[i], c[j] = c[j], c[i]
        return b"".join(c)

    variants["two blobs swapped"] = swapped(blob_at[0], blob_at[1])
    variants["blob and records swapped"] = swapped(blob_at[-1], rec_at[0])
    variants["metadata and a blob swapped"] = swapped(1, blob_at[0])
    variants["a blob dropped"] = b"".join(c for i, c in enumerate(chunks) if i != blob_at[1])
    variants["the end dropped"] = b"".join(chunks[:-1])
    variants["a blob duplicated"] = b"".join(chunks[: blob_at[1] + 1] + chunks[blob_at[1]:])
    variants["bytes appended"] = data + b"\0"
    variants["a second file appended"] = data + data[HEADER_SIZE:]
    # The same snapshot exported again (same password): its sections belong to another file id.
    other = tmp_path / "again.backup"
    export(repo.store, diff, str(other), EXPORT_PW, kdf_log_n=10)
    odata = other.read_bytes()
    osecs = sections(odata)
    assert [(t, n) for _, t, n in osecs] == [(t, n) for _, t, n in secs]
    ob = osecs[blob_at[0] - 1]
    variants["a blob from another export"] = b"".join(
        chunks[: blob_at[0]] + [odata[ob[0] : ob[0] + ob[2]]] + chunks[blob_at[0] + 1 :])
    variants["the other file's header"] = odata[:HEADER_SIZE] + data[HEADER_SIZE:]
    bad = tmp_path / "bad.backup"
    for name, content in variants.items():
        bad.write_bytes(content)
        err = assert_refused(bad, tmp_path, CorruptObject)
        assert str(bad) in str(err), name


def test_empty_garbage_and_foreign_files_are_refused(tmp_path, exported):
    path = exported[3]
    bad = tmp_path / "bad.backup"
    bad.write_bytes(b"")
    assert "empty" in str(assert_refused(bad, tmp_path, UnsupportedFormat))
    bad.write_bytes(random.Random(5).randbytes(5000))
    assert "not a chunkvault export" in str(assert_refused(bad, tmp_path, UnsupportedFormat))
    bad.write_bytes(b"CVBACK")
    assert_refused(bad, tmp_path, CorruptObject)
    newer = bytearray(path.read_bytes())
    newer[8:10] = struct.pack("<H", VERSION + 1)
    bad.write_bytes(newer)  # a flipped bit in the version field: the rest of the header checks out
    assert "version field reads" in str(assert_refused(bad, tmp_path, CorruptObject))
    newer[HEADER_SIZE - 1] ^= 1  # a newer format's header (its checksum is not this format's)
    bad.write_bytes(newer)
    assert "newer" in str(assert_refused(bad, tmp_path, UnsupportedFormat))
    assert_refused(tmp_path / "missing.backup", tmp_path, UsageError)
    assert_refused(tmp_path, tmp_path, UsageError)
    read, write = os.pipe()
    os.close(write)
    assert "not a regular file" in str(assert_refused(f"/dev/fd/{read}", tmp_path, UsageError))
    os.close(read)
    os.mkfifo(tmp_path / "fifo.backup")  # no one writes to it: opening it waited for ever
    assert "not a regular file" in str(assert_refused(tmp_path / "fifo.backup", tmp_path, UsageError))


def test_standard_input_named_as_a_backup_file_is_refused_saying_why(tmp_path, exported, cli):
    """`import -` and `restore --from-file -` said "no file -", as if a file of that name were missing."""
    data = exported[3].read_bytes()
    env = {"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PW.decode()}
    proc = cli("restore", "--from-file", "-", "--target", str(tmp_path / "t"), input=data, env=env, password=None,
               check=2)
    assert "not from standard input: save it to a file first" in proc.stderr.decode()
    dst = other_repo(tmp_path, "dst")
    proc = cli("import", "-", "-r", dst.store.remote.display_url, input=data, env=env,
               password="a different password", check=2)
    assert "not from standard input: save it to a file first" in proc.stderr.decode()
    assert not (tmp_path / "t").exists() and dst.snapshots() == []


def test_a_file_changed_after_verification_is_caught_while_reading(tmp_path, exported):
    path = exported[3]
    data = path.read_bytes()
    ef = open_export(str(path), EXPORT_PW)
    try:
        off, _, length = [s for s in sections(data) if s[1] == S_BLOB][1]
        with open(path, "r+b") as f:
            f.seek(off + length - 3)
            f.write(bytes([data[off + length - 3] ^ 1]))
        assert ef.read_blob(blob_ref(0))
        with pytest.raises(CorruptObject, match="blob section 1"):
            ef.read_blob(blob_ref(1))
    finally:
        ef.close()


# --- the format, as documented --------------------------------------------------------------


@pytest.fixture(scope="module")
def vector():
    block = DOC.read_text().split("## Export file (.backup)", 1)[1]
    return bytes.fromhex(re.search(r"^export_file = ([0-9a-f]+)$", block, re.M).group(1))


def test_vector_decodes_with_the_documented_formulas(vector):
    """An independent reader built from store/FORMAT.md alone opens the metadata section."""
    magic, version, flags, file_id, kdf, log_n, r, p, salt, check, header_sum = struct.unpack_from(
        "<8sHH16sBBBB16s16s16s", vector)
    assert (magic, version, flags, kdf, log_n, r, p) == (b"CVBACKUP", 1, 0, 1, 10, 8, 1)
    assert blake3.blake3(vector[:64]).digest()[:16] == header_sum
    master = hashlib.scrypt(b"vector password", salt=salt, n=1 << log_n, r=r, p=p, dklen=32)
    assert blake3.blake3(b"chunkvault export v1 password check", key=master).digest()[:16] == check
    enc_key = blake3.blake3(b"chunkvault export v1 encryption", key=master).digest()
    stype, length = struct.unpack_from("<BI", vector, 80)
    sealed = vector[85 : 85 + length]
    ad = b"chunkvault export v1" + file_id + struct.pack("<BQ", stype, 0)
    meta = AESGCM(enc_key).decrypt(sealed[:12], sealed[12:], ad)
    assert stype == S_META and b'"host": "vector"' in meta
    end_off, end_type, end_len = sections(vector)[-1]
    end = AESGCM(enc_key).decrypt(vector[end_off + 5 : end_off + 17], vector[end_off + 17 : end_off + end_len],
                                  b"chunkvault export v1" + file_id + struct.pack("<BQ", S_END, 0))
    n_sections, blobs, records, digest = struct.unpack("<QQQ32s", end)
    assert (n_sections, blobs, records) == (3, 1, 2)  # sections before the end one
    assert digest == blake3.blake3(vector[:end_off]).digest()


def test_vector_reads_and_restores(tmp_path, vector):
    path = tmp_path / "vector.backup"
    path.write_bytes(vector)
    content = b"chunkvault export test vector\n"
    with ExportFile(str(path), b"vector password") as ef:
        info = ef.verify()
        assert info.snapshot.id == "ab" * 32 and info.snapshot.parent == "cd" * 32
        assert (info.snapshot.kind, info.snapshot.host, info.snapshot.paths, info.snapshot.tags) == (
            "diff", "vector", ["/data"], ["t"])
        assert (info.blobs, info.records, info.sections) == (1, 2, 4)
        recs = list(ef.records())
        assert [(r.path, r.entry.type, r.entry.mode) for r in recs] == [(b"", T_DIR, 0o755), (b"hello.txt", T_FILE, 0o644)]
        f = recs[1].entry
        assert f.chunks == blob_ref(0) and f.size == len(content) and f.digest == blake3.blake3(content).digest()
        assert ef.read_blob(blob_ref(0)) == content
    with pytest.raises(WrongPassword):
        ExportFile(str(path), b"vector passwore")
    out = tmp_path / "out"
    restore_from_file(str(path), b"vector password", str(out))
    assert (out / "hello.txt").read_bytes() == content
    assert os.stat(out / "hello.txt").st_mtime_ns == 1_700_000_000 * 10**9


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_change_to_the_vector_is_refused(tmp_path, vector, data):
    pos = data.draw(st.integers(0, len(vector) - 1))
    mask = data.draw(st.integers(1, 255))
    changed = bytearray(vector)
    changed[pos] ^= mask
    path = tmp_path / "v.backup"
    path.write_bytes(changed)
    with pytest.raises((CorruptObject, UnsupportedFormat)):
        open_export(str(path), b"vector password").close()


# --- the command line ------------------------------------------------------------------------


def _cli_has_export() -> bool:
    from chunkvault.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return "export" in sub.choices


needs_cli = pytest.mark.skipif(not _cli_has_export(), reason="export commands not registered in chunkvault.cli")


@needs_cli
def test_cli_export_import_restore_from_file(tmp_path, chain, cli):
    repo, diff, src = chain
    url = repo.store.remote.display_url
    env = {"CHUNKVAULT_EXPORT_PASSWORD": "cli export pw"}
    out_file = tmp_path / "cli.backup"
    cli("export", diff.id[:8], "-r", url, "--output", str(out_file), "--kdf-time", "0", env=env)
    cli("export", diff.id[:8], "-r", url, "--output", str(out_file), env=env, check=2)
    pwfile = tmp_path / "pw"
    pwfile.write_text("cli export pw\n")
    target = tmp_path / "restored"
    cli("restore", "--from-file", str(out_file), "--target", str(target), "--export-password-file", str(pwfile),
        password=None)
    assert describe(target) == describe(src)
    dst = other_repo(tmp_path, "dst")
    proc = cli("import", str(out_file), "-r", dst.store.remote.display_url, "--json", env=env,
               password="a different password")
    assert '"type": "full"' in proc.stdout.decode()
    bad_target = tmp_path / "never"
    cli("restore", "--from-file", str(out_file), "--target", str(bad_target), env={"CHUNKVAULT_EXPORT_PASSWORD": "x"},
        check=11)
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9")  # a name that is not UTF-8: given exactly in --json
    os.mkdir(odd)
    exported = json.loads(cli("export", diff.id[:8], "-r", url, "--output", os.fsdecode(odd + b"/x.backup"),
                              "--kdf-time", "0", "--json", env=env).stdout)
    assert base64.b64decode(exported["output_b64"]) == odd + b"/x.backup"
    restored = json.loads(cli("restore", "--from-file", os.fsdecode(odd + b"/x.backup"), "--target",
                              os.fsdecode(odd + b"/out"), "--json", env=env, password=None).stdout)
    assert base64.b64decode(restored["file_b64"]) == odd + b"/x.backup"
    assert base64.b64decode(restored["target_b64"]) == odd + b"/out"
    cut = tmp_path / "cut.backup"
    cut.write_bytes(out_file.read_bytes()[:-100])
    proc = cli("restore", "--from-file", str(cut), "--target", str(bad_target), env=env, check=13)
    assert "cut.backup" in proc.stderr.decode()
    assert not bad_target.exists()
    shutil.rmtree(target)


def test_restore_from_file_no_xattrs_sets_none(tmp_path, new_repo, cli):
    """`restore --from-file --no-xattrs` set the file's extended attributes all the same."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    os.setxattr(src / "f", "user.note", b"kept")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    path = tmp_path / "x.backup"
    export(repo.store, snap, str(path), EXPORT_PW, kdf_log_n=10)
    env = {"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PW.decode()}
    cli("restore", "--from-file", str(path), "--target", str(tmp_path / "with"), env=env, password=None)
    assert os.getxattr(tmp_path / "with" / "f", "user.note") == b"kept"
    cli("restore", "--from-file", str(path), "--target", str(tmp_path / "without"), "--no-xattrs", env=env,
        password=None)
    assert (tmp_path / "without" / "f").read_text() == "x\n"
    assert "user.note" not in os.listxattr(tmp_path / "without" / "f")


def test_export_without_xattrs_is_version_1(tmp_path, new_repo):
    """A file of a tree without extended attributes is written in export format 1, which a chunkvault from
    before them imports (format 2, written for every file, it refused): as a repository stays at format 1; a
    differential whose parent had some is of format 2 (its resolved tree may carry them), and imports whole."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    repo = new_repo()
    plain = repo.backup([str(src)]).snapshot
    os.setxattr(src / "f", "user.note", b"kept")
    with_xattrs = repo.backup([str(src)], kind="full").snapshot
    (src / "g").write_text("y\n")
    diff = repo.backup([str(src)], kind="diff").snapshot
    for n, (snap, want) in enumerate(((plain, 1), (with_xattrs, 2), (diff, 2))):
        path = tmp_path / f"{n}.backup"
        export(repo.store, snap, str(path), EXPORT_PW, kdf_log_n=10)
        assert struct.unpack_from("<H", path.read_bytes(), 8)[0] == want
        dest = new_repo()
        imported = import_backup(dest.store, str(path), EXPORT_PW).snapshot
        target = tmp_path / f"out{n}"
        dest.restore(imported, str(target))
        assert (target / "f").read_text() == "x\n"
        assert ("user.note" in os.listxattr(target / "f")) == (want == 2)


def test_two_imports_of_one_file_at_once_import_it_once(tmp_path, exported):
    """Each found the snapshot absent and stored it: two snapshots, and the data twice until a prune."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, _, path, _ = exported
    other_repo(tmp_path).close()
    opened = [Repository.open(str(tmp_path / "other"), "a different password", ledger=False) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda r: r.import_backup(str(path), EXPORT_PW, wait=60), opened))
    assert sorted(r.skipped for r in results) == [False, True]
    assert len({r.snapshot.id for r in results}) == 1 and len(opened[0].snapshots()) == 1
    for r in opened:
        r.close()


def test_an_export_that_meets_damaged_data_names_the_snapshot_and_the_way_on(tmp_path, chain):
    """It named a blob id alone."""
    repo, diff, _src = chain
    packs = [p for p in pathlib.Path(repo.store.remote.root, "data").rglob("*") if p.is_file()]
    max(packs, key=lambda p: p.stat().st_size).unlink()  # a data pack's, not only a manifest's
    with pytest.raises(MissingObject, match=f"snapshot {diff.short_id} cannot be exported whole: `check "
                                            r"--read-data` names the files it takes down.*\(no export file was left\)"):
        export(repo.store, diff, str(tmp_path / "x.backup"), EXPORT_PW, kdf_log_n=10)
    assert not [p for p in tmp_path.iterdir() if "x.backup" in p.name]
    (tmp_path / "x.backup").write_bytes(b"an earlier export")  # overwritten only once the new one is whole
    with pytest.raises(MissingObject, match=r"\(the file it was to replace is left as it was\)"):
        export(repo.store, diff, str(tmp_path / "x.backup"), EXPORT_PW, kdf_log_n=10, overwrite=True)
    assert (tmp_path / "x.backup").read_bytes() == b"an earlier export"


def test_an_export_takes_any_name_the_file_system_takes(tmp_path, chain):
    """Its hidden temporary name, made from a long name, would be longer than a name may be."""
    repo, diff, _src = chain
    name = "a" * 240 + ".backup"
    path = tmp_path / name
    export(repo.store, diff, str(path), EXPORT_PW, kdf_log_n=10)
    assert path.stat().st_size > 0 and not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_import_waits_for_a_prune_as_a_backup_does(tmp_path, exported, monkeypatch):
    """A scheduled import right after a nightly prune failed at once."""
    import threading

    from chunkvault.store.locks import EXCLUSIVE, RepoLock

    repo, diff, src, path, _stats = exported
    target = other_repo(tmp_path)
    held, done = threading.Event(), threading.Event()

    def prune_for(seconds: float) -> None:  # another command's prune
        with RepoLock(target.store.remote, EXCLUSIVE, "prune"):
            held.set()
            done.wait(seconds)

    holder = threading.Thread(target=prune_for, args=(60,))
    holder.start()
    held.wait(30)
    with pytest.raises(Locked, match="locked by prune.*; try again later$") as refused:
        target.import_backup(str(path), EXPORT_PW, wait=0)
    assert refused.value.cli_hint == " or use --wait"  # the command line's option; the API's is wait=
    from chunkvault.store import locks

    said = locks.announce_wait

    def announce_then_end_the_prune(*args):  # not on a timer: under load the import may start waiting late
        said(*args)
        threading.Timer(1.0, done.set).start()

    monkeypatch.setattr(locks, "announce_wait", announce_then_end_the_prune)
    with pytest.warns(Warning, match="waiting up to 60 s: repository is locked by prune"):
        snap = target.import_backup(str(path), EXPORT_PW, wait=60).snapshot
    holder.join()
    assert snap.kind == "full"


def _sealed_export(path, extra_records=(), **snapshot_fields):
    """A well-sealed one-file export whose metadata names the given snapshot fields, and with records
    after its file (as a crafted or foreign writer could): only the reader's checks stand between it and
    a repository."""
    from chunkvault.store.export import ExportWriter
    from chunkvault.store.manifest import OP_ENTRY, Entry, Record

    meta = {"snapshot": {"id": "ab" * 32, "time": "2026-01-01T00:00:00+00:00", "kind": "full", "parent": None,
                         "host": "h", "paths": ["/x"], "tags": [], "stdin_name": None, "stats": {},
                         **snapshot_fields},
            "source": {"repository": "00" * 16,
                       "chunker": {"min_size": 65536, "avg_size": 262144, "max_size": 2097152}},
            "exported": "2026-01-01T00:00:00+00:00"}
    data = b"hello\n"
    with open(path, "wb") as f:
        w = ExportWriter(f, EXPORT_PW, meta, log_n=10)
        ref = w.add_blob(data)
        w.add_record(Record(OP_ENTRY, b"", Entry(b"", T_DIR, mode=0o755, mtime_ns=10**18)))
        w.add_record(Record(OP_ENTRY, b"a", Entry(b"a", T_FILE, mode=0o644, mtime_ns=10**18, size=len(data),
                                                  digest=blake3.blake3(data).digest(), chunks=ref)))
        for rec in extra_records:
            w.add_record(rec)
        w.finish()


@pytest.mark.parametrize("field,value", [
    ("time", "2026-01-01T00:00:00"), ("time", 5), ("host", 1), ("tags", [1, 2]), ("paths", [1]),
    ("paths", "/abc"), ("id", 7), ("id", "ab"), ("id", "zz" * 32), ("stats", []), ("kind", "diff"),
    ("stdin_name", 3)])
def test_an_export_whose_snapshot_fields_are_malformed_is_refused_before_anything_is_imported(
        tmp_path, new_repo, field, value):
    """A time without a zone, imported, had made every later listing of the repository fail (naive and
    aware times do not compare), and check said nothing; a number where a string goes broke find or
    snapshots.  Such a file is damaged: refused before anything is stored."""
    _sealed_export(tmp_path / "good.backup")
    _sealed_export(tmp_path / "bad.backup", **{field: value})
    repo = new_repo(str(tmp_path / "repo"))
    import_backup(repo.store, str(tmp_path / "good.backup"), EXPORT_PW)
    with pytest.raises(CorruptObject, match="metadata section is malformed"):
        import_backup(repo.store, str(tmp_path / "bad.backup"), EXPORT_PW)
    assert len(repo.snapshots()) == 1
    assert repo.check().ok and [s.host for s in repo.snapshots()] == ["h"]


def test_scrypt_is_given_the_memory_its_parameters_need_and_refused_beyond_what_it_can_have(monkeypatch):
    """An export header may ask for log_n 19 with r 16 (1 GiB): hashlib was asked for twice that, over its
    limit, and the import died with an internal error.  Parameters past the limit are a ValueError,
    which readers report as damage."""
    import hashlib

    from chunkvault.store import crypto

    asked = {}

    def scrypt(password, *, salt, n, r, p, maxmem, dklen):
        asked["maxmem"] = maxmem
        return bytes(dklen)

    monkeypatch.setattr(hashlib, "scrypt", scrypt)
    crypto.derive_kek(b"pw", b"s" * 16, 19, 16, 16)
    assert 128 * 16 * ((1 << 19) + 16 + 2) <= asked["maxmem"] < 2**31 - 1
    with pytest.raises(ValueError, match="more than it can be given"):
        crypto.derive_kek(b"pw", b"s" * 16, 19, 32, 1)


def _entry_record(path: bytes, kind: int, target: bytes = b""):
    from chunkvault.store.manifest import OP_ENTRY, Entry, Record

    return Record(OP_ENTRY, path, Entry(path, kind, mode=0o644, mtime_ns=10**18, target=target))


def _file_record_of(path: bytes, *, digest: bytes | None = None, kind: int = T_FILE):
    """A record of ``path`` holding the one blob ``_sealed_export`` stores."""
    from chunkvault.store.manifest import OP_ENTRY, Entry, Record

    data = b"hello\n"
    return Record(OP_ENTRY, path, Entry(path, kind, mode=0o644, mtime_ns=10**18, size=len(data), chunks=blob_ref(0),
                                        digest=blake3.blake3(data).digest() if digest is None else digest))


@pytest.mark.parametrize("records,reason", [
    ([(b"h", T_HARDLINK, b"../etc/passwd")], "points out of the tree"),
    ([(b"h", T_HARDLINK, b"/etc/passwd")], "points out of the tree"),
    ([(b"l", T_SYMLINK, b"/etc"), (b"l/x", T_DIR, b"")], "lies below a symbolic link"),
    ([(b"l", T_SYMLINK, b"/etc"), (b"z", T_HARDLINK, b"l/passwd")], "points below a symbolic link"),
])
def test_an_export_whose_tree_would_lead_a_restore_out_of_its_target_is_refused_by_import_too(
        tmp_path, new_repo, records, reason):
    """Such a tree was imported, check found nothing, and every restore of it then failed; a restore
    straight from the file made its target first.  Both refuse it now, before anything is stored or made."""
    from chunkvault.store.export import restore_from_file

    _sealed_export(tmp_path / "bad.backup", extra_records=[_entry_record(*r) for r in records])
    repo = new_repo(str(tmp_path / "repo"))
    with pytest.raises(CorruptObject, match=reason):
        import_backup(repo.store, str(tmp_path / "bad.backup"), EXPORT_PW)
    assert repo.snapshots() == []
    with pytest.raises(CorruptObject, match=reason):
        restore_from_file(str(tmp_path / "bad.backup"), EXPORT_PW, str(tmp_path / "target"))
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize("records,reason", [
    ([_file_record_of(b"a/x")], "lies below an entry that is not a directory"),
    ([(b"h", T_HARDLINK, b"nothing")], "names b'nothing', which is no file before it"),
    ([(b"b", T_HARDLINK, b"z"), _file_record_of(b"z")], "names b'z', which is no file before it"),
    ([(b"d", T_DIR, b""), (b"l", T_HARDLINK, b"d")], "names b'd', which is no file before it"),
    ([_file_record_of(b"b", digest=b"12345")], "has a digest of 5 bytes"),
    ([_file_record_of(b"b", kind=T_DIR)], "is no file and refers to chunks"),
], ids=["below a file", "link to nothing", "link to a later path", "link to a directory", "short digest",
        "a directory with chunks"])
def test_an_export_whose_records_no_backup_writes_is_refused_before_anything_is_imported(
        tmp_path, new_repo, records, reason):
    """Each was imported (exit 0, `check --read-data` clean) and never restored."""
    from chunkvault.store.export import restore_from_file
    from chunkvault.store.manifest import Record

    extra = sorted((r if isinstance(r, Record) else _entry_record(*r) for r in records), key=lambda r: r.key)
    _sealed_export(tmp_path / "bad.backup", extra_records=extra)
    repo = new_repo(str(tmp_path / "repo"))
    with pytest.raises(CorruptObject, match=re.escape(reason)):
        import_backup(repo.store, str(tmp_path / "bad.backup"), EXPORT_PW)
    assert repo.snapshots() == []
    with pytest.raises(CorruptObject, match=re.escape(reason)):
        restore_from_file(str(tmp_path / "bad.backup"), EXPORT_PW, str(tmp_path / "target"))
    assert not (tmp_path / "target").exists()


def test_an_export_heals_the_snapshot_a_repository_lost_data_of(tmp_path, exported):
    """The repository's copy of the file's snapshot no longer restores whole (a pack is gone): once the
    index is repaired (before, an import would deduplicate against it, and it is refused), the file is
    imported again and restores exactly."""
    from chunkvault.errors import MissingObject

    _repo, diff, src, path, _ = exported
    dst = other_repo(tmp_path)
    first = import_backup(dst.store, str(path), EXPORT_PW).snapshot
    root = tmp_path / "other"
    largest = max((p for p in (root / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.unlink()
    with pytest.raises(MissingObject, match="`repair index` first, then import again"):
        import_backup(dst.store, str(path), EXPORT_PW)
    assert len(dst.snapshots()) == 1
    dst.repair_index()
    dst.repair_snapshots(dry_run=False)
    dst = Repository.open(str(root), "a different password")
    again = import_backup(dst.store, str(path), EXPORT_PW)
    assert not again.skipped and again.snapshot.id != first.id
    dst.restore(again.snapshot.id, str(tmp_path / "out"))
    assert describe(tmp_path / "out") == describe(src)
    assert import_backup(dst.store, str(path), EXPORT_PW).skipped  # now it is whole here


def test_an_import_heals_a_copy_that_lost_directories_only_and_comes_after_it(tmp_path, new_repo, cli):
    """A rewrite that dropped an empty directory changed no count of files or bytes, and the import said the
    snapshot was here already; a healing import tied with the copy it heals, by time, and the tie went by
    id: `latest` gave the incomplete copy half the time, and `--keep-last 1` removed the healed one."""
    from types import SimpleNamespace

    from chunkvault.store.chronology import chronological_key
    from chunkvault.store.retention import RetentionPolicy

    when = "2026-01-01T00:00:00+00:00"
    copy = SimpleNamespace(id="ff" * 32, time=when, parent=None, stats={})
    healed = SimpleNamespace(id="00" * 32, time=when, parent=None, stats={"heals": copy.id})
    assert max([copy, healed], key=chronological_key([copy, healed])) is healed

    src = tmp_path / "src"
    (src / "empty").mkdir(parents=True)
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"content")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    path = tmp_path / "s.backup"
    export(repo.store, snap, str(path), EXPORT_PW, kdf_log_n=10)
    dst = other_repo(tmp_path)
    for round_ in range(3):  # ids fall both ways
        first = import_backup(dst.store, str(path), EXPORT_PW).snapshot
        assert not dst.rewrite(["empty"], [first.id], dry_run=False).dry_run
        again = import_backup(dst.store, str(path), EXPORT_PW)
        assert not again.skipped and again.heals is not None and again.heals.id == first.id
        assert again.snapshot.stats["heals"] == first.id
        assert dst.snapshot("latest").id == again.snapshot.id
        plan = dst.forget(policy=RetentionPolicy(keep_last=1), dry_run=True)
        assert [d.snapshot_id for d in plan.decisions if d.keep] == [again.snapshot.id]
        out = tmp_path / f"out{round_}"
        dst.restore("latest", str(out))
        assert describe(out) == describe(src)
        assert import_backup(dst.store, str(path), EXPORT_PW).skipped
        dst.forget([s.id for s in dst.snapshots()], dry_run=False)
    first = import_backup(dst.store, str(path), EXPORT_PW).snapshot
    dst.rewrite(["empty"], [first.id], dry_run=False)
    proc = cli("import", "-r", str(tmp_path / "other"), str(path), "--json", password="a different password",
               env={"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PW.decode()})
    healed = json.loads(proc.stdout)
    assert healed["heals"] == first.id
    assert f"copy {first.short_id} of the file's snapshot no longer held all of it" in proc.stderr.decode()
    dst.rewrite(["empty"], [healed["id"]], dry_run=False)  # the healed copy loses it too: both are named
    proc = cli("import", "-r", str(tmp_path / "other"), str(path), password="a different password",
               env={"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PW.decode()})
    assert (f"copies {first.short_id} {healed['id'][:8]} of the file's snapshot" in proc.stderr.decode()
            or f"copies {healed['id'][:8]} {first.short_id} of the file's snapshot" in proc.stderr.decode())


def test_an_imported_snapshot_keeps_what_the_next_backup_compares_by(tmp_path, exported):
    """Its walk's times and whether it kept extended attributes: without them the next backup of the same
    paths read every file again, or took a racy one on its times."""
    _repo, diff, _src, path, _ = exported
    snap = import_backup(other_repo(tmp_path).store, str(path), EXPORT_PW).snapshot
    assert {k: snap.stats.get(k) for k in ("xattrs", "started_ns", "finished_ns")} == {
        k: diff.stats[k] for k in ("xattrs", "started_ns", "finished_ns")}


def _repository_files(repo) -> list[str]:
    """Every object a repository holds but its locks: what an import stores, if anything."""
    root = pathlib.Path(repo.store.remote.root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.parent.name != "locks")


def test_an_export_dated_in_the_future_is_refused_before_anything_is_imported(tmp_path, new_repo, cli):
    """A snapshot dated 2099, imported, stayed the newest: the parent of every later backup and what
    `restore latest` gave, for ever.  Import refuses a time further ahead of the clock than `backup --time`
    allows, and stores nothing; a time within that slack (another machine's clock) is imported."""
    from datetime import datetime, timedelta, timezone

    from chunkvault.store.backup import FUTURE_SLACK

    repo = new_repo(str(tmp_path / "repo"))
    before = _repository_files(repo)
    _sealed_export(tmp_path / "future.backup", time="2099-01-01T00:00:00+00:00")
    with pytest.raises(CorruptObject, match=r"dated 2099-01-01T00:00:00\+00:00, more than 5 minutes ahead of this "
                                            "machine's clock .*nothing was imported"):
        import_backup(repo.store, str(tmp_path / "future.backup"), EXPORT_PW)
    assert repo.snapshots() == [] and _repository_files(repo) == before
    proc = cli("import", "-r", str(tmp_path / "repo"), str(tmp_path / "future.backup"),
               env={"CHUNKVAULT_EXPORT_PASSWORD": EXPORT_PW.decode()}, check=13)
    assert len(proc.stderr.decode().strip().splitlines()) == 1 and b"ahead of this machine's clock" in proc.stderr
    restore_from_file(str(tmp_path / "future.backup"), EXPORT_PW, str(tmp_path / "out"))  # a restore stores no date
    soon = (datetime.now(timezone.utc) + FUTURE_SLACK - timedelta(minutes=1)).isoformat()
    _sealed_export(tmp_path / "soon.backup", time=soon)
    assert import_backup(repo.store, str(tmp_path / "soon.backup"), EXPORT_PW).snapshot.time == soon


def _file_record(path: bytes, size: int, chunks: bytes, flags: int = 0, digest: bytes = b"d" * 32):
    from chunkvault.store.manifest import OP_ENTRY, Entry, Record

    return Record(OP_ENTRY, path, Entry(path, T_FILE, mode=0o644, mtime_ns=10**18, size=size, digest=digest,
                                        chunks=chunks, flags=flags))


@pytest.mark.parametrize("size,chunks,held", [(2**44, blob_ref(0), 6), (5, b"", 0), (6, blob_ref(0) * 2, 12)],
                         ids=["16 TiB over 6 bytes", "a size and no chunks", "chunks past the size"])
def test_a_file_whose_size_is_not_what_its_chunks_hold_is_refused_before_anything_is_imported(
        tmp_path, new_repo, size, chunks, held):
    """A record claiming 16 TiB over 6 bytes of chunks was imported, `check --read-data` found nothing, and
    every restore of the file failed.  The file knows each blob's length: the record is refused, by import
    before it stores anything, and by a restore straight from the file before it makes anything."""
    _sealed_export(tmp_path / "bad.backup", extra_records=[_file_record(b"b", size, chunks)])
    repo = new_repo(str(tmp_path / "repo"))
    before = _repository_files(repo)
    reason = f"records a size of {size} bytes, and its chunks hold {held}"
    with pytest.raises(CorruptObject, match=reason) as refused:
        import_backup(repo.store, str(tmp_path / "bad.backup"), EXPORT_PW)
    assert "b'b'" in str(refused.value)
    assert repo.snapshots() == [] and _repository_files(repo) == before
    with pytest.raises(CorruptObject, match=reason):
        restore_from_file(str(tmp_path / "bad.backup"), EXPORT_PW, str(tmp_path / "target"))
    assert not (tmp_path / "target").exists()


def test_a_file_unreadable_at_backup_time_has_no_chunks_to_add_up(tmp_path, new_repo):
    """Such a file has no data: its size is not held to its chunks' (none), as a restore does not."""
    from chunkvault.store.manifest import F_UNREADABLE

    twice = blake3.blake3(b"hello\n" * 2).digest()
    _sealed_export(tmp_path / "ok.backup", extra_records=[_file_record(b"b", 0, b"", flags=F_UNREADABLE, digest=b""),
                                                          _file_record(b"c", 12, blob_ref(0) * 2, digest=twice)])
    repo = new_repo(str(tmp_path / "repo"))
    snap = import_backup(repo.store, str(tmp_path / "ok.backup"), EXPORT_PW).snapshot
    repo.restore(snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "c").read_bytes() == b"hello\n" * 2


@pytest.mark.parametrize("size,chunks,held", [(2**44, 1, 6), (6, 2, 12)], ids=["past its chunks", "short of them"])
def test_check_read_data_names_a_file_whose_size_is_not_what_its_chunks_hold(tmp_path, new_repo, monkeypatch,
                                                                              size, chunks, held):
    """Such a file (imported by an earlier chunkvault, which did not hold records to their chunks) fails
    every restore; `check --read-data`, which reads every chunk, said there were no problems."""
    from chunkvault.store import export as export_module

    _sealed_export(tmp_path / "bad.backup", extra_records=[_file_record(b"big", size, blob_ref(0) * chunks)])
    repo = new_repo(str(tmp_path / "repo"))
    with monkeypatch.context() as m:
        m.setattr(export_module, "unread", lambda e: True)  # an import that does not look at sizes
        snap = import_backup(repo.store, str(tmp_path / "bad.backup"), EXPORT_PW).snapshot
    assert repo.check().ok  # without reading data, sizes are not looked at
    report = repo.check(read_data=True)
    assert not report.ok
    (problem,) = report.problems
    assert problem.object == f"snapshots/{snap.id}" and problem.snapshots == [snap.id]
    assert f"'big' records a size of {size} bytes, and its chunks hold {held}" in problem.problem
    assert problem.files == [f"{snap.id[:8]}:big"]


def _forged_header(data: bytes, log_n: int, r: int, p: int) -> bytes:
    """``data`` with the header's scrypt parameters changed and its checksum made again: plain BLAKE3, which
    anyone can compute."""
    head = bytearray(data[:HEADER_SIZE])
    head[29:32] = bytes((log_n, r, p))
    head[64:80] = blake3.blake3(bytes(head[:64])).digest()[:16]
    return bytes(head) + data[HEADER_SIZE:]


@pytest.mark.parametrize("offset, value", [(10, 1), (28, 2)], ids=["flags", "key derivation"])
def test_header_flags_or_a_key_derivation_unknown_are_a_newer_writers(tmp_path, exported, offset, value):
    """A header that checks out and names flags or a key derivation this version does not know was called
    damaged (exit 13): a newer chunkvault wrote it (exit 17)."""
    from chunkvault.errors import UnsupportedFormat

    head = bytearray(exported[3].read_bytes())
    head[offset] = value
    head[64:80] = blake3.blake3(bytes(head[:64])).digest()[:16]
    bad = tmp_path / "newer.backup"
    bad.write_bytes(bytes(head))
    with pytest.raises(UnsupportedFormat, match="which a newer chunkvault writes: upgrade"):
        import_backup(exported[0].store, str(bad), EXPORT_PW)


def test_a_header_asking_for_more_scrypt_than_export_writes_is_refused_before_deriving(
        tmp_path, exported, monkeypatch):
    """A forged 185-byte header asking for log_n 19, r 16, p 16 cost 1 GiB and 40 s before the password was
    checked.  A reader derives nothing for more memory (128 r N) or work (p times that) than export ever
    writes; what export writes at most still opens."""
    from chunkvault.store import crypto
    from chunkvault.store import export as export_module
    from chunkvault.store.export import (MAX_EXPORT_MEMORY, MAX_EXPORT_WORK, MAX_SCRYPT_P, decode_header,
                                         scrypt_cost_problem)

    assert (MAX_EXPORT_MEMORY, MAX_EXPORT_WORK) == (512 << 20, 8 << 30)
    data = exported[3].read_bytes()
    derived = []
    monkeypatch.setattr(export_module, "derive_kek", lambda *args: derived.append(args) or bytes(32))
    bad = tmp_path / "forged.backup"
    for log_n, r, p in ((19, 16, 16), (19, 9, 1), (19, 16, 1)):
        bad.write_bytes(_forged_header(data, log_n, r, p)[:185])
        for read in (lambda: import_backup(exported[0].store, str(bad), EXPORT_PW),
                     lambda: restore_from_file(str(bad), EXPORT_PW, str(tmp_path / "target"))):
            with pytest.raises(CorruptObject, match=f"asks for scrypt log_n {log_n}, r {r}, p {p} .*more than "
                                                    "chunkvault writes"):
                read()
    bad.write_bytes(_forged_header(data, 17, 32, 4))
    with pytest.raises(CorruptObject, match="scrypt parameters out of range"):
        import_backup(exported[0].store, str(bad), EXPORT_PW)
    assert derived == [] and not (tmp_path / "target").exists()
    for log_n, r, p in ((19, 8, 16), (18, 16, 16), (15, 8, 16), (10, 8, 1)):  # within what export writes
        assert decode_header(_forged_header(data, log_n, r, p), "x").log_n == log_n
    # whatever the machine and --kdf-time, export writes within the bounds
    monkeypatch.setattr(crypto, "derive_kek", lambda *args: b"")
    for lane in (0.00001, 0.0001, 0.001, 0.05, 0.5, 5):
        monkeypatch.setattr(crypto, "_lane_seconds", lambda log_n, lane=lane: lane * 2 ** (log_n - 15))
        for target in (0, 0.5, 3, 10, 60):
            log_n, p = crypto.tune_scrypt(target, max_p=MAX_SCRYPT_P)
            assert scrypt_cost_problem(log_n, crypto.SCRYPT_R, p) is None, (lane, target)


def test_an_imported_snapshot_lists_what_its_backup_could_not_read(tmp_path, new_repo):
    """The exported snapshot's list, with what the tree flags: a source path that was missing is in the list
    alone (it has no entry), so an import that went by the flags alone dropped it."""
    present, missing = tmp_path / "present", tmp_path / "missing"
    present.mkdir()
    (present / "f").write_bytes(b"data")
    repo = new_repo()
    snap = repo.backup([str(present), str(missing)]).snapshot
    assert snap.stats["unreadable"] == [str(missing).lstrip("/")]
    path = str(tmp_path / "partial.backup")
    repo.export(snap, path, EXPORT_PW, kdf_seconds=0)
    imported = new_repo().import_backup(path, EXPORT_PW).snapshot
    assert imported.stats["unreadable"] == snap.stats["unreadable"]
