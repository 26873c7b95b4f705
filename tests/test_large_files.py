"""Files past 32-bit offsets, sparse files, files at the chunker's size limits, and large files that change
while a backup reads them.

The multi-GiB files are sparse: a few pages of data around 2 GiB, 4 GiB (and 8 GiB) in holes, so they
take little disk; what they cost is the time to read their zeros.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import blake3
import pytest

from chunkvault.chunker.params import DEFAULT_PARAMS
from chunkvault.store import backup, holes
from chunkvault.store.manifest import F_CHANGED_DURING_READ, T_FILE
from chunkvault.verify import compare_tree
from treeutil import counting_reads

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096


def data_extents(path) -> list[tuple[int, int]]:
    """The (start, end) of each run of data the file system holds for ``path`` (its holes left out)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def assert_same_sparse(a, b) -> None:
    """Byte for byte, reading only where either file holds data (both are zeros elsewhere)."""
    assert os.path.getsize(a) == os.path.getsize(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in sorted(data_extents(a) + data_extents(b)):
            for pos in range(start, end, 8 * MiB):
                n = min(8 * MiB, end - pos)
                fa.seek(pos)
                fb.seek(pos)
                assert fa.read(n) == fb.read(n), f"{b} differs from {a} in [{pos}, {pos + n})"


def sparse_file(path, size: int, offsets: list[int]) -> dict[int, bytes]:
    """A file of ``size`` bytes holding a random page at each offset (kept inside the file), holes around."""
    pages = {}
    with open(path, "wb") as f:
        f.truncate(size)
        for off in offsets:
            off = max(0, min(off, size - PAGE))
            pages[off] = os.urandom(PAGE)
            f.seek(off)
            f.write(pages[off])
    return pages


def keeps_holes(path) -> bool:
    return os.stat(path).st_blocks * 512 < 64 * MiB


def need_holes(directory) -> None:
    """Skip where the file system fills holes in (a restore would write GiBs of zeros) or is nearly full."""
    probe = directory / "hole-probe"
    sparse_file(probe, 256 * MiB, [128 * MiB])
    kept = keeps_holes(probe)
    probe.unlink()
    st = os.statvfs(directory)
    if not kept or st.f_bavail * st.f_frsize < 256 * MiB:
        pytest.skip("this file system keeps no holes, or has too little room")


# --- past 2 GiB and 4 GiB ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sparse_file_past_4_gib_round_trips_with_its_changes_stored_as_deltas(tmp_path, new_repo):
    """Data just below and above 2^31 and 2^32 and at the very end: a backup, a differential of pages
    changed above 4 GiB cut at fixed offsets (delta blobs), and every way back (a restore anew, in place with
    ``delta``, reads at those offsets, an export imported elsewhere) gives the same bytes, holes kept."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    size = (1 << 32) + 3 * MiB + 17  # ends inside a page
    edges = [0, (1 << 31) - PAGE, (1 << 31) - 5, 1 << 31, (1 << 32) - PAGE, (1 << 32) - 3, 1 << 32,
             (1 << 32) + 12345, size - 1]
    sparse_file(big, size, edges)
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    assert first.stats["bytes"] == size
    old = tmp_path / "old"
    repo.restore(first.id, str(old))
    assert_same_sparse(big, old / "big")
    assert keeps_holes(old / "big")

    changed = {(1 << 32) + off: os.urandom(PAGE) for off in (0, 2 * MiB, 2 * MiB + 3 * PAGE + 7)}
    with open(big, "r+b") as f:
        for off, page in changed.items():
            f.seek(off)
            f.write(page)
    second = repo.backup([str(src)], fixed_chunks=["big"])
    assert second.snapshot.stats["delta_blobs"] > 0 and second.snapshot.stats["bytes"] == size
    entry = {e.path: e for e in repo.tree(second.snapshot)}[b"big"]
    assert entry.size == size and not entry.flags & F_CHANGED_DURING_READ

    fresh = tmp_path / "fresh"
    repo.restore("latest", str(fresh))
    assert_same_sparse(big, fresh / "big")
    assert keeps_holes(fresh / "big")
    result = repo.restore("latest", str(old), force=True, delta=True)
    assert result.unchanged_files == 0 and 0 < result.rewritten_bytes < 16 * MiB
    assert_same_sparse(big, old / "big")
    assert keeps_holes(old / "big")

    with repo.open_file("latest", "big") as f, open(big, "rb") as want:
        for off in [*edges, *changed]:
            for n in (1, PAGE + 2, 3 * MiB):
                f.seek(off)
                want.seek(off)
                assert f.read(n) == want.read(n), (off, n)

    exported = tmp_path / "x.backup"
    repo.export("latest", str(exported), "export password", kdf_seconds=0)
    other = new_repo()
    other.import_backup(str(exported), "export password")
    imported = tmp_path / "imported"
    other.restore("latest", str(imported))
    assert_same_sparse(big, imported / "big")
    assert repo.check(read_data=True).ok and other.check(read_data=True).ok


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_import_tar_of_a_member_over_8_gib_from_gnu_tar_sparse(tmp_path, new_repo):
    """A member past ustar's 8 GiB size field (its size in a pax record), written by GNU tar as a sparse
    member, imports at its full size with its data at the right offsets."""
    need_holes(tmp_path)
    big = tmp_path / "big"
    size = 8 * GiB + 5 * PAGE + 3
    pages = sparse_file(big, size, [0, (1 << 32) + 1, (1 << 33) - 2, size - 1])
    tarball = tmp_path / "big.tar"
    subprocess.run(["tar", "-cSf", str(tarball), "--format=posix", "-C", str(tmp_path), "big"], check=True)
    with tarfile.open(tarball) as tf:
        assert tf.getmember("big").size == size
    repo = new_repo()
    with open(tarball, "rb") as f:
        snap = repo.import_tar(f, "/srv/big").snapshot
    entry = {e.path: e for e in repo.tree(snap)}[b"big"]
    assert entry.size == size == snap.stats["bytes"]
    with repo.open_file(snap, "big") as f:
        for off, page in pages.items():
            f.seek(off)
            assert f.read(PAGE) == page
        f.seek(size - 1)
        assert f.read(10) == pages[size - PAGE][-1:]


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_import_tar_tells_a_sparse_member_s_holes_as_a_backup_does(tmp_path, new_repo, monkeypatch, tar_format):
    """A sparse member's long holes are given to the chunker as zeros, not made and scanned: the member is
    stored as the same chunks as a backup of the file stores, its holes barely read out of the archive."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    size = 512 * MiB + 12345
    sparse_file(src / "big", size, [0, 3 * MiB + 5, 200 * MiB, size - 1])
    tarball = tmp_path / "big.tar"
    subprocess.run(["tar", "-cSf", str(tarball), f"--format={tar_format}", "-C", str(src), "big"], check=True)
    repo = new_repo()
    backed = {e.path: e for e in repo.tree(repo.backup([str(src)]).snapshot)}[b"big"]
    real, made = tarfile._FileInFile.read, []

    def counted(self, size=None):
        data = real(self, size)
        made.append(len(data))
        return data

    monkeypatch.setattr(tarfile._FileInFile, "read", counted)
    with open(tarball, "rb") as f:
        snap = repo.import_tar(f, "/srv").snapshot
    imported = {e.path: e for e in repo.tree(snap)}[b"big"]
    assert (imported.size, imported.digest, imported.chunks) == (size, backed.digest, backed.chunks)
    assert sum(made) < 32 * MiB
    out = tmp_path / "out"
    repo.restore(snap.id, str(out))
    assert_same_sparse(src / "big", out / "big")


def test_import_tar_of_a_sparse_map_running_past_the_member_s_size_keeps_its_size(tmp_path, new_repo):
    """A sparse map whose last block starts past the member's size (a damaged or crafted header) tells no hole
    past that size: the member is stored as the bytes tarfile reads, not lengthened to the block's offset."""
    size, blocks = 3 * MiB, [(0, 10), (8 * MiB, 10)]
    member = tarfile.TarInfo("f")
    member.size = 20
    member.pax_headers = {"GNU.sparse.numblocks": "2", "GNU.sparse.size": str(size),
                          "GNU.sparse.map": ",".join(f"{o},{n}" for o, n in blocks)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(member, io.BytesIO(b"a" * 10 + b"b" * 10))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        expected = tf.extractfile(tf.next()).read()
    assert len(expected) == size
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(buf.getvalue()), "/srv").snapshot
    entry = {e.path: e for e in repo.tree(snap)}[b"f"]
    assert (entry.size, entry.digest) == (size, blake3.blake3(expected).digest())


# --- holes told, not read -----------------------------------------------------------------------------

def punched(path) -> bytes:
    """A 40 MiB file: data at the start, holes longer and shorter than those a backup skips, data split by a
    one-page hole, a trailing hole; returns its bytes."""
    layout = [(0, 5000), (3 * MiB + 7, 70_000), (3 * MiB + 70_007 + PAGE, 9000), (20 * MiB, 300_000),
              (20 * MiB + 300_000 + MiB // 2, PAGE)]
    data = bytearray(40 * MiB)
    with open(path, "wb") as f:
        f.truncate(len(data))
        for off, n in layout:
            data[off:off + n] = os.urandom(n)
            f.seek(off)
            f.write(data[off:off + n])
    return bytes(data)


def test_a_sparse_file_s_holes_are_told_as_zeros(tmp_path):
    """The reader gives a sparse file's bytes whatever the read sizes, its long holes told as zeros unread."""
    need_holes(tmp_path)
    path = tmp_path / "punched"
    data = punched(path)
    for size in (PAGE, 1000, 8 * MiB):
        fd = os.open(path, os.O_RDONLY)
        try:
            reader, got, told = holes.HoleSkippingReader(fd), bytearray(), 0
            while True:
                told += reader.zeros_ahead() >= size
                piece = reader.read(size)
                if not piece:
                    break
                got += piece
        finally:
            os.close(fd)
        assert got == data and told > 0


def test_a_sparse_file_cut_short_while_read_ends_where_it_ends_now(tmp_path):
    """Zeros are not told past the end of a file truncated after its hole was found (it was stored longer
    than it ever was, zeros past its new end)."""
    need_holes(tmp_path)
    path = tmp_path / "punched"
    data = punched(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader, got = holes.HoleSkippingReader(fd), b""
        while not reader.zeros_ahead():  # the data's last block
            got += reader.read(PAGE)
        assert reader.zeros_ahead() > 2 * MiB
        os.truncate(path, 2 * MiB)
        while piece := reader.read(MiB):
            got += piece
        assert got == data[:2 * MiB]
        os.truncate(path, 2 * MiB - 100)  # now within what was read
        assert reader.zeros_ahead() == 0 and reader.read(MiB) == b""
    finally:
        os.close(fd)


def test_a_backup_reads_a_sparse_file_only_where_it_holds_data(tmp_path, new_repo, monkeypatch):
    """A sparse file is stored as its dense copy is (the same chunks, so a backup of the copy adds nothing),
    reading little more than its data; it restores byte for byte, holes kept."""
    need_holes(tmp_path)
    src, dense = tmp_path / "src", tmp_path / "dense"
    src.mkdir()
    dense.mkdir()
    data = punched(src / "f")
    (dense / "f").write_bytes(data)
    repo = new_repo()
    real, read = os.preadv, []

    def counted(fd, buffers, offset, *flags):
        n = real(fd, buffers, offset, *flags)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counted)
    sparse_snap = repo.backup([str(src)]).snapshot
    monkeypatch.setattr(os, "preadv", real)
    assert 0 < sum(read) < 8 * MiB
    dense_snap = repo.backup([str(dense)]).snapshot
    assert dense_snap.stats["added_blobs"] == 0
    entries = [{e.path: e for e in repo.tree(s)}[b"f"] for s in (sparse_snap, dense_snap)]
    assert entries[0].chunks == entries[1].chunks and entries[0].digest == entries[1].digest
    repo.restore(sparse_snap.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == data and keeps_holes(tmp_path / "out" / "f")


@pytest.mark.slow
def test_a_restored_sparse_file_is_compared_reading_only_its_data(tmp_path, new_repo, monkeypatch):
    """``verify-restore`` and ``restore --verify`` hash a restored file's holes as zeros, unread (a 20 GiB
    file holding a few MiB took 100 s to compare, five to restore); a byte written into a hole still shows."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "big", 2 * GiB, [0, GiB + 12345, 2 * GiB - 1])
    punched(src / "punched")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    out = tmp_path / "out"
    repo.restore(snap.id, str(out))
    read = counting_reads(monkeypatch)
    result = compare_tree(repo.tree(snap), str(out))
    monkeypatch.undo()
    assert not result.mismatches and result.files == 2
    assert sum(read) < 8 * MiB
    with open(out / "big", "r+b") as f:
        f.seek(GiB // 2)
        f.write(b"x")
    assert "content" in [m.kind for m in compare_tree(repo.tree(snap), str(out)).mismatches]


def test_a_small_file_is_compared_with_a_buffer_of_its_size_not_a_whole_block(tmp_path, new_repo, monkeypatch):
    """The comparison hashes each restored file into a buffer no larger than the file needs: a new one of 4 MiB,
    zeroed for each of 200,000 small files, made comparing them 20 times slower than reading them.  A file
    larger than the buffer, an empty one and a pipe still hash to what they hold."""
    src = tmp_path / "src"
    src.mkdir()
    contents = {"small": b"x" * 300, "empty": b"", "large": os.urandom(300_000)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    out = tmp_path / "out"
    repo.restore(snap.id, str(out))
    made: list[int] = []

    def counted(*args):
        if args and isinstance(args[0], int):
            made.append(args[0])
        return bytearray(*args)
    monkeypatch.setattr(holes, "bytearray", counted, raising=False)
    result = compare_tree(repo.tree(snap), str(out))
    assert not result.mismatches and result.files == 3
    assert len(made) == 3 and max(made) < MiB  # the largest file's size, not 4 MiB for each
    for name, data in contents.items():
        with open(out / name, "rb") as f:
            hasher = blake3.blake3()
            assert holes.hash_file(f.fileno(), hasher, 4 * MiB) == len(data)
            assert hasher.digest() == blake3.blake3(data).digest()
    r, w = os.pipe()
    os.write(w, contents["large"][:60_000])
    os.close(w)
    hasher = blake3.blake3()
    assert holes.hash_file(r, hasher, 4 * MiB) == 60_000
    os.close(r)
    assert hasher.digest() == blake3.blake3(contents["large"][:60_000]).digest()


@pytest.mark.slow
def test_a_restore_in_place_reads_a_sparse_file_only_where_it_holds_data(tmp_path, new_repo, monkeypatch):
    """``--delta`` takes a target file's holes for zeros, unread, both to find it unchanged and to find the
    chunks it holds (a 20 GiB file holding a few MiB was read twice over, 76 s where the restore took five);
    what it writes keeps the holes."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    sparse_file(big, 2 * GiB, [0, GiB + 12345, 2 * GiB - 1])
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    out = tmp_path / "out"
    repo.restore(first.id, str(out))
    os.utime(out / "big", ns=(0, 0))  # its content is read to tell it unchanged
    read = counting_reads(monkeypatch)
    result = repo.restore(first.id, str(out), force=True, delta=True)
    monkeypatch.undo()
    assert result.unchanged_files == 1 and sum(read) < 8 * MiB

    with open(big, "r+b") as f:
        for off in (GiB // 2, GiB + 3 * MiB + 5):
            f.seek(off)
            f.write(os.urandom(PAGE))
    repo.backup([str(src)])
    read = counting_reads(monkeypatch)
    result = repo.restore("latest", str(out), force=True, delta=True)
    monkeypatch.undo()
    assert result.unchanged_files == 0 and 0 < result.rewritten_bytes < 16 * MiB
    assert sum(read) < 16 * MiB
    assert_same_sparse(big, out / "big")
    assert keeps_holes(out / "big")


def test_a_walk_made_directory_by_directory_reads_a_sparse_file_too(tmp_path, new_repo):
    """A walk that asks Python at each directory (an exclude with "?", a case-insensitive one, PostgreSQL's
    rules) gives the lstat fields of its own listing: those tell a sparse file too, and a file longer than one
    chunk is read, not a traceback."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    data = punched(src / "f")
    dense = os.urandom(3 * MiB)
    (src / "dense").write_bytes(dense)
    repo = new_repo()
    for i, rules in enumerate(({"excludes": ["x?y"]}, {"iexcludes": ["*.TMP"]})):
        snap = repo.backup([str(src)], reread=True, **rules).snapshot
        out = tmp_path / f"out{i}"
        repo.restore(snap.id, str(out))
        assert (out / "f").read_bytes() == data and (out / "dense").read_bytes() == dense


# --- the chunker's size limits ---------------------------------------------------------------------------

LIMITS = sorted({0, 1} | {limit + d for limit in (DEFAULT_PARAMS.min_size, DEFAULT_PARAMS.avg_size,
                                                  DEFAULT_PARAMS.max_size) for d in (-1, 0, 1)})


def _write_versions(src, version: int) -> None:
    """A file of each size at the chunker's limits (random, and zeros with a last byte that changes), and one
    that moves across each limit between versions."""
    for size in LIMITS:
        (src / f"random{size}").write_bytes(os.urandom(size))
        (src / f"zeros{size}").write_bytes(bytes(max(size - 1, 0)) + (b"%d" % version)[:size])
        across = size + (1 if version else 0) if size % 2 else max(size - version, 0)
        (src / f"across{size}").write_bytes(os.urandom(across))


def _assert_same_tree(a, b) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("fixed", [False, True], ids=["content-defined", "fixed"])
def test_files_at_the_chunkers_size_limits_round_trip(tmp_path, new_repo, fixed):
    """Empty, one byte, and the least, average and greatest chunk size with a byte either side: stored,
    restored anew and in place with ``delta`` (forward and back) byte for byte, each size recorded as read."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo()
    fixed_chunks = ["*"] if fixed else None
    _write_versions(src, 0)
    first = repo.backup([str(src)], fixed_chunks=fixed_chunks, fixed_chunk_size=DEFAULT_PARAMS.avg_size)
    kept = tmp_path / "kept"
    shutil.copytree(src, kept)
    _write_versions(src, 1)
    second = repo.backup([str(src)], fixed_chunks=fixed_chunks, fixed_chunk_size=DEFAULT_PARAMS.avg_size)
    for snap, tree in ((first.snapshot, kept), (second.snapshot, src)):
        assert not snap.stats["unreadable"]
        for e in repo.tree(snap):
            if e.type == T_FILE:
                assert e.size == (tree / os.fsdecode(e.path)).stat().st_size, e.path
    out = tmp_path / "out"
    repo.restore(first.snapshot.id, str(out))
    _assert_same_tree(kept, out)
    repo.restore(second.snapshot.id, str(out), force=True, delta=True)
    _assert_same_tree(src, out)
    repo.restore(first.snapshot.id, str(out), force=True, delta=True)
    _assert_same_tree(kept, out)


# --- a large file changing while it is read --------------------------------------------------------------

def _after_reading(monkeypatch, limit: int, change) -> list[int]:
    """Run ``change()`` once the backup has read ``limit`` bytes of a file through its descriptor."""
    state = [0]
    fired: list[int] = []
    readinto, read = backup._FdReader.readinto, backup._FdReader.read

    def count(n: int) -> None:
        state[0] += n
        if not fired and state[0] >= limit:
            fired.append(state[0])
            change()

    def counted_readinto(self, buf):
        n = readinto(self, buf)
        count(n)
        return n

    def counted_read(self, n):
        data = read(self, n)
        count(len(data))
        return data

    monkeypatch.setattr(backup._FdReader, "readinto", counted_readinto)
    monkeypatch.setattr(backup._FdReader, "read", counted_read)
    return fired


def _truncate(path, size):
    return lambda: os.truncate(path, size)


def _append(path, n):
    def change():
        with open(path, "ab") as f:
            f.write(os.urandom(n))
    return change


def _replace(path, becomes):
    def change():
        if becomes == "file":
            (path.parent / "new").write_bytes(os.urandom(3 * MiB))
            os.rename(path.parent / "new", path)
        else:
            path.unlink()
            path.mkdir()
    return change


def _rewrite_keeping_mtime(path, truncate_first):
    def change():
        st = path.stat()
        with open(path, "r+b") as f:
            if truncate_first:  # a writer that rewrites the file from the start
                f.truncate(0)
                f.truncate(st.st_size)
            else:
                f.seek(st.st_size // 2)
                f.write(os.urandom(PAGE))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return change


CHANGES = {
    "truncated-below-what-was-read": lambda p: _truncate(p, 3 * MiB),
    "truncated-to-nothing": lambda p: _truncate(p, 0),
    "truncated-ahead-of-the-reads": lambda p: _truncate(p, 14 * MiB),
    "grown": lambda p: _append(p, 5 * MiB + 7),
    "replaced-by-a-file": lambda p: _replace(p, "file"),
    "replaced-by-a-directory": lambda p: _replace(p, "directory"),
    "rewritten-in-place-mtime-put-back": lambda p: _rewrite_keeping_mtime(p, False),
    "truncated-and-regrown-mtime-put-back": lambda p: _rewrite_keeping_mtime(p, True),
}


@pytest.mark.parametrize("fixed", [False, True], ids=["content-defined", "fixed"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_large_file_changing_while_read_is_flagged_and_restores_as_recorded(tmp_path, new_repo,
                                                                              monkeypatch, change, fixed):
    """Whatever happens to a file several read buffers long after its first buffer is read, the backup says
    it changed, the entry's size is the length of the data stored, the snapshot's byte count agrees, and a
    restore gives back exactly that: the file as it was, or the bytes read, never a size that disagrees."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "big"
    original = os.urandom(18 * MiB)
    path.write_bytes(original)
    (src / "steady").write_bytes(os.urandom(100_000))
    repo = new_repo()
    fired = _after_reading(monkeypatch, 8 * MiB, CHANGES[change](path))
    result = repo.backup([str(src)], fixed_chunks=["big"] if fixed else None)
    monkeypatch.undo()
    assert fired
    entries = {e.path: e for e in repo.tree(result.snapshot)}
    e = entries[b"big"]
    assert e.flags & F_CHANGED_DURING_READ and not entries[b"steady"].flags
    assert [w for w in result.warnings if "big" in w] == [f"changed while being read (stored as read): {path}"]
    assert result.snapshot.stats["bytes"] == sum(x.size for x in entries.values() if x.type == T_FILE)
    out = tmp_path / "out"
    repo.restore(result.snapshot.id, str(out))
    restored = (out / "big").read_bytes()
    assert len(restored) == e.size
    assert restored == original[:e.size] or restored[:8 * MiB] == original[:8 * MiB]
    assert (out / "steady").read_bytes() == (src / "steady").read_bytes()
    again = repo.backup([str(src)])  # flagged: read again, whatever its stat says
    if path.is_file():
        now = {x.path: x for x in repo.tree(again.snapshot)}[b"big"]
        assert now.size == path.stat().st_size and not now.flags


# --- sizes given past what a float holds exactly ---------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("9223372036854775807", (1 << 63) - 1),  # the largest file offset: the limit the error names
    ("9007199254740993", (1 << 53) + 1),  # past 2^53 a float steps by 2
    ("8191.5T", (8191 << 40) + (1 << 39)),
    ("1.0000000001k", 1024),  # a fraction of a byte rounds down
    ("0." + "9" * 60 + "T", (1 << 40) - 1),  # digits past the 40th after the point change no whole byte
    ("0" * 50 + "1k", 1024),
    ("1." + "5" * 5000 + "G", (3 << 29) + (1 << 29) // 9),
    ("1.5G", 3 << 29),
])
def test_sizes_are_parsed_exactly_up_to_the_largest_file_offset(text, size):
    from chunkvault.units import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["9223372036854775808", "8388608T", "9" * 400, "9" * 5000])
def test_sizes_past_the_largest_file_offset_are_refused(text):
    from chunkvault.errors import UsageError
    from chunkvault.units import parse_size

    with pytest.raises(UsageError, match="size must be at most 8 EiB"):
        parse_size(text)


def test_a_size_past_the_largest_file_offset_is_refused_by_its_limit(tmp_path, cli):
    """A usage error (exit 2), never an internal error: a number of hundreds of digits made a float
    infinity, which no int holds."""
    proc = cli("backup", "-r", str(tmp_path / "repo"), str(tmp_path), "--exclude-larger-than", "9" * 400, check=2)
    assert "size must be at most 8 EiB" in proc.stderr.decode()


# --- holes where two rewritten chunks meet --------------------------------------------------------------


def _blocks(path) -> int:
    """The blocks a file takes once written out: before, ext4 counts a block it reserved for delayed
    allocation into an extent allocated ahead (for a file to grow into) besides that extent."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_blocks
    finally:
        os.close(fd)


def test_delta_leaves_no_block_of_zeros_allocated_where_two_chunks_meet(tmp_path, new_repo):
    """A file grown in place by a long run of zeros, whose chunks (cut every 2 MiB from unaligned data) meet
    inside blocks: `--delta` left each such block of zeros written (one per chunk, 1 in 512 of what the file
    grew by: a sparse 5 GiB file grown to 6 GiB took half again its data), where a restore anew leaves them
    holes.  Now it takes no more blocks than a restore anew."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    head, tail = os.urandom(3 * MiB), os.urandom(5_000)  # cut by content inside the data: unaligned
    (src / "f").write_bytes(head)
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    repo.restore("latest", str(target))
    with open(src / "f", "ab") as f:
        f.truncate(len(head) + 24 * MiB)
        f.seek(0, os.SEEK_END)
        f.write(tail)
    repo.backup([str(src)])
    repo.restore("latest", str(target), force=True, delta=True)
    assert_same_sparse(src / "f", target / "f")
    fresh = tmp_path / "fresh"
    repo.restore("latest", str(fresh))
    assert _blocks(target / "f") <= _blocks(fresh / "f")


# --- memory by the number of chunks ---------------------------------------------------------------------


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


def _peak(run) -> int:
    """The most memory Python held while ``run()`` ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_a_file_of_many_chunks_is_dumped_and_exported_holding_little_beside_their_ids(tmp_path, new_repo):
    """A file's chunk ids were taken as a list of bytes objects (73 bytes a chunk beside the 32 of the ids),
    its holes found over a list of (id, length) pairs and its export references gathered in a list: a tar of a
    64 GiB file cut every 64 KiB (a million chunks, 32 MB of ids) peaked at 435 MB (160 MB now), its export at
    357 MB (215 MB now); an import mapped the references to ids through a list of them too.  The same
    arithmetic at 131,072 chunks of 4 KiB."""
    repo, snap, ids = _many_chunks(tmp_path, new_repo)
    # the entry's ids, their copy in the manifest's records, the export's references, buffers: no list of them
    assert _peak(lambda: repo.dump(snap, "/", _Discard())) < 6 * ids
    assert _peak(lambda: repo.export(snap, str(tmp_path / "img.backup"), "pw", kdf_seconds=0)) < 7 * ids
    other = new_repo()
    assert _peak(lambda: other.import_backup(str(tmp_path / "img.backup"), "pw")) < 6.5 * ids
    imported, exported = other.find_entry("latest", "img"), repo.find_entry(snap, "img")
    assert (imported.digest, len(imported.chunks)) == (exported.digest, ids)  # ids are keyed by repository


def test_delta_leaves_no_block_of_zeros_allocated_where_a_kept_chunk_meets_a_rewritten_one(tmp_path, new_repo):
    """Data written into a long run of zeros, then restored back to the version without it: the chunk that
    held it is rewritten as zeros, its neighbours of zeros are kept as the file holds them, and a block of
    zeros a kept and a rewritten chunk meet inside was left written.  Now it is punched: the file takes no
    more blocks than a restore anew gives it."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "f", "wb") as f:
        f.write(os.urandom(3 * MiB))  # cut by content inside the data: the zeros after it are cut unaligned
        f.truncate(f.tell() + 24 * MiB)
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(5_000))
    repo = new_repo()
    without = repo.backup([str(src)]).snapshot
    with open(src / "f", "r+b") as f:
        f.seek(15 * MiB + 12_345)
        f.write(os.urandom(MiB))
    repo.backup([str(src)])
    target = tmp_path / "target"
    repo.restore("latest", str(target))
    result = repo.restore(without, str(target), force=True, delta=True)
    assert 0 < result.rewritten_bytes < 8 * MiB  # not all of it: the zeros around were kept
    fresh = tmp_path / "fresh"
    repo.restore(without, str(fresh))
    assert_same_sparse(fresh / "f", target / "f")
    assert _blocks(target / "f") <= _blocks(fresh / "f")


# --- dump of a sparse file into a file ------------------------------------------------------------------


def test_dump_of_a_sparse_file_into_a_regular_file_leaves_its_runs_of_zeros_holes(tmp_path, new_repo):
    """`dump SNAPSHOT FILE > copy` wrote every zero of a sparse file: a 20 GiB database file holding a few MiB
    took 20 GiB of disk and a minute, where its tar is 16 MiB.  Into a regular file it ends, the runs of
    zeros a tar leaves out are now seeked past (holes), and a file ending in one is lengthened to its size;
    into a file that holds bytes past where the dump begins, or one opened to append, every byte is written."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "img", 96 * MiB, [0, 40 * MiB + 12_345, 70 * MiB])
    with open(src / "tail", "wb") as f:  # ends in a hole
        f.write(os.urandom(5_000))
        f.truncate(32 * MiB)
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    for name in ("img", "tail"):
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as f:
            repo.dump(snap, name, f)
        assert_same_sparse(src / name, out)
        assert _blocks(out) * 512 <= 3 * 2 * MiB, name  # the chunks holding data, whole, as a tar holds them
    with open(tmp_path / "img.out", "r+b") as f:  # bytes where the dump goes: written over, holes too
        f.write(b"x" * (64 * MiB))
        f.seek(0)
        repo.dump(snap, "img", f)
        f.truncate()
    assert_same_sparse(src / "img", tmp_path / "img.out")
    with open(tmp_path / "after", "wb") as f:  # after bytes of its own: from where it stands
        f.write(b"head")
        repo.dump(snap, "tail", f)
    with open(tmp_path / "after", "rb") as f:
        assert f.read(4) == b"head" and f.read() == (src / "tail").read_bytes()
    with open(tmp_path / "appended", "ab") as f:
        repo.dump(snap, "tail", f)
    assert (tmp_path / "appended").read_bytes() == (src / "tail").read_bytes()



def _many_chunks(tmp_path, new_repo):
    """(repository, snapshot, bytes of the file's chunk ids): a file of 131,072 chunks of 4 KiB, holes mostly."""
    need_holes(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    sparse_file(src / "img", 512 * MiB, [300 * MiB])
    repo = new_repo()
    snap = repo.backup([str(src)], fixed_chunks=["img"], fixed_chunk_size=PAGE).snapshot
    ids = len(repo.find_entry(snap, "img").chunks)
    assert ids == 32 * (512 * MiB // PAGE)
    return repo, snap, ids


@pytest.mark.slow
def test_a_record_of_many_chunks_is_read_holding_it_once_beside_its_bytes(tmp_path, new_repo):
    """A record of a file's chunk ids spans many manifest blobs: each blob was joined to all those before it
    anew, the old and the new buffer held at once beside the decoded record (and copied once a blob: a listing of
    a 64 GiB file cut every 64 KiB, 32 MB of ids, took 1.9 s, its diff 4 s and 350 MB; 0.9 s, 0.6 s and 185 MB
    now).  The same arithmetic at 131,072 chunks of 4 KiB."""
    repo, snap, ids = _many_chunks(tmp_path, new_repo)
    assert _peak(lambda: list(repo.tree(snap))) < 2.5 * ids


@pytest.mark.slow
def test_a_file_of_many_chunks_is_copied_holding_little_beside_their_ids(tmp_path, new_repo):
    """A copy joined the destination's ids of a file's chunks in one call (a list of them and a buffer view of 80
    bytes for each), while still holding the source's record: a copy of a 64 GiB file cut every 64 KiB (32 MB of
    ids) peaked at 275 MB (170 MB now).  The same arithmetic at 131,072 chunks of 4 KiB."""
    repo, snap, ids = _many_chunks(tmp_path, new_repo)
    other = new_repo()
    assert _peak(lambda: repo.copy_to(other)) < 5 * ids
    assert other.find_entry("latest", "img").digest == repo.find_entry(snap, "img").digest
    assert other.check(read_data=True).ok


@pytest.mark.slow
def test_a_file_of_many_chunks_is_restored_holding_little_beside_their_ids(tmp_path, new_repo):
    """A restore queued each of a file's chunk ids, with its expected size, in a tuple of its own to fetch
    ahead (130 bytes a chunk: a file of a million chunks queued 130 MB); it takes them from the entry's ids as
    it makes its batches now.  The same arithmetic at 131,072 chunks of 4 KiB."""
    repo, snap, ids = _many_chunks(tmp_path, new_repo)
    assert _peak(lambda: repo.restore(snap.id, str(tmp_path / "out"), processes=1)) < 3 * ids
    assert_same_sparse(tmp_path / "src" / "img", tmp_path / "out" / "img")


@pytest.mark.slow
def test_a_file_of_many_chunks_is_found_holding_little_beside_their_ids(tmp_path, new_repo):
    """``find`` held the last path's decoded record (in the locals of its merge of the trees) beside the one it
    decodes again to make what it found, as long as it handed out what it found: a 64 GiB file cut every 64 KiB
    (32 MB of ids) peaked at 3 times its ids' bytes, 2.3 now (``ls`` 2.1; 116 MB of RSS where it took 145, ``ls``
    110).  The same arithmetic at 131,072 chunks of 4 KiB, as held once the first path found is handed out (the
    peak before, reading the manifest, is ``ls``'s with a few MB besides)."""
    import tracemalloc

    repo, snap, ids = _many_chunks(tmp_path, new_repo)
    tracemalloc.start()
    try:
        found = repo.iter_find(["img"])
        first = next(found)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert [len(v.entry.chunks) for v in first.versions] == [ids]
    assert held < 2.5 * ids
    assert next(found, None) is None


@pytest.mark.slow
def test_a_record_of_many_chunks_is_read_from_an_export_file_holding_it_once_beside_its_bytes(tmp_path, new_repo):
    """An export file's record of a file's chunk references spans many sections: ``restore --from-file`` and
    ``import`` joined each section to all those before it anew, the old and the new buffer held at once beside the
    decoded record (and copied once a section).  They grow one buffer now, as a manifest's reader does.  At
    131,072 chunks of 4 KiB."""
    from chunkvault.store.export import ExportFile

    repo, snap, ids = _many_chunks(tmp_path, new_repo)
    repo.export(snap, str(tmp_path / "img.backup"), "pw", kdf_seconds=0)
    with ExportFile(str(tmp_path / "img.backup"), b"pw") as ef:
        assert _peak(ef.verify) < 2.5 * ids
        records = []
        assert _peak(lambda: records.extend(ef.records(checked=False))) < 2.5 * ids
        assert [len(r.entry.chunks) for r in records if r.path == b"img"] == [ids]
