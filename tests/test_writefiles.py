"""A restore's writes of a run of small files: the native call and its Python reference do the same.

Each file is created, filled (zeros as a hole), given owner, mode and times;
a file an error stops is removed and the run goes on, except after no space,
where it stops.  A full file system is a small tmpfs (skipped where it
cannot be mounted); a refused chown is root without CAP_CHOWN (``setpriv``).
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault.store import writefiles
from treeutil import mounted_tmpfs

IMPLEMENTATIONS = {"reference": writefiles.write_small_files_reference}
SPARSE = {"reference": writefiles.write_sparse_reference}
try:
    from chunkvault.store._writefiles import write_small_files as native, write_sparse as native_sparse
    IMPLEMENTATIONS["native"] = native
    SPARSE["native"] = native_sparse
except ImportError:  # pragma: no cover - the extension is built by the install
    pass

MTIME = 1_600_000_000_123_456_789


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def write(request):
    return IMPLEMENTATIONS[request.param]


_DIRS: dict[bytes, int] = {}  # directories held open for the files named in them, as a restore holds them


def _file(path: Path, data: bytes | memoryview, mode: int = 0o640, uid: int | None = None,
          gid: int | None = None, mtime_ns: int = MTIME) -> tuple:
    parent = os.fsencode(path.parent)
    if parent not in _DIRS:
        _DIRS[parent] = os.open(parent, os.O_PATH | os.O_DIRECTORY)
    return (_DIRS[parent], os.fsencode(path.name), data, mode, os.getuid() if uid is None else uid,
            os.getgid() if gid is None else gid, mtime_ns)


@pytest.fixture(autouse=True)
def _close_dirs():
    yield
    for fd in _DIRS.values():
        os.close(fd)
    _DIRS.clear()


def test_the_native_call_is_built():
    assert writefiles.write_small_files is IMPLEMENTATIONS["native"]
    assert writefiles.write_sparse is SPARSE["native"]


def test_files_are_written_with_their_content_mode_and_times(write, tmp_path):
    files = {"a": b"alpha" * 1000, "empty": b"", "odd": bytes(range(256)) * 3, "few-zeros": bytes(100)}
    modes = {"a": 0o644, "empty": 0o600, "odd": 0o4755, "few-zeros": 0o400}
    out = write([_file(tmp_path / name, data, modes[name]) for name, data in files.items()], False)
    assert out == [(0, 0)] * len(files)
    for name, data in files.items():
        st = os.lstat(tmp_path / name)
        assert (tmp_path / name).read_bytes() == data
        assert (st.st_mode & 0o7777, st.st_mtime_ns, st.st_atime_ns) == (modes[name], MTIME, MTIME)


def test_content_may_be_any_buffer_and_times_before_1970(write, tmp_path):
    data = bytearray(b"0123456789" * 10)
    out = write([_file(tmp_path / "view", memoryview(data)[10:30], mtime_ns=-1_500_000_001)], False)
    assert out == [(0, 0)]
    assert (tmp_path / "view").read_bytes() == bytes(data[10:30])
    assert os.lstat(tmp_path / "view").st_mtime_ns == -1_500_000_001


def test_blocks_of_zeros_are_holes(write, tmp_path):
    """Every 4096-byte block of zeros is a hole, not only a file all zeros: one with a last byte set takes
    one block, one with zeros between data takes the blocks the data touches."""
    size = 256 << 10
    inside = bytearray(size)
    inside[:5000] = b"d" * 5000  # blocks 0 and 1
    inside[100_000:100_010] = b"e" * 10  # block 24
    files = {"zeros": bytes(size), "almost": bytes(size - 1) + b"x", "inside": bytes(inside),
             "short-zeros": bytes(100), "dense": os.urandom(size)}
    assert write([_file(tmp_path / name, data) for name, data in files.items()], False) == [(0, 0)] * len(files)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data and os.lstat(tmp_path / name).st_size == len(data)
    allocated = {name: os.lstat(tmp_path / name).st_blocks * 512 for name in files}
    if allocated["dense"] < size:
        pytest.skip("this file system reports no allocation")
    if allocated["almost"] >= size:
        pytest.skip("this file system makes no holes")
    assert allocated["zeros"] == allocated["short-zeros"] == 0
    assert allocated["almost"] <= 4096
    assert allocated["inside"] <= 3 * 4096


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files to other owners")
def test_owners_are_set_when_asked(write, tmp_path):
    out = write([_file(tmp_path / "owned", b"x", uid=12345, gid=23456)], True)
    assert out == [(0, 0)]
    st = os.lstat(tmp_path / "owned")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12345, 23456, 0o640)
    write([_file(tmp_path / "not-owned", b"x", uid=12345, gid=23456)], False)
    assert os.lstat(tmp_path / "not-owned").st_uid == os.getuid()


def test_a_file_that_cannot_be_made_is_named_and_the_run_goes_on(write, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "gone").mkdir()
    in_gone = _file(tmp_path / "gone" / "f", b"x")
    (tmp_path / "gone").rmdir()  # removed while the run waited: nothing can be made in it
    out = write([in_gone, _file(tmp_path / "link", b"x"), _file(tmp_path / "after", b"after")], False)
    assert out == [(errno.ENOENT, 0), (errno.EEXIST, 0), (0, 0)]
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "elsewhere").exists()  # nothing followed
    assert (tmp_path / "after").read_bytes() == b"after"


def test_nothing_already_at_a_name_is_written_into_or_waited_on(write, tmp_path):
    """A restore into an empty target makes each file new: a FIFO put at a name would hold the open for
    ever, and a hard link put there would take the file's data, owner and mode to the file it links."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "elsewhere").write_bytes(b"kept")
    os.link(tmp_path / "elsewhere", tmp_path / "linked")
    out = write([_file(tmp_path / "fifo", b"x"), _file(tmp_path / "linked", b"x", mode=0o4755),
                 _file(tmp_path / "after", b"after")], False)
    assert out == [(errno.EEXIST, 0), (errno.EEXIST, 0), (0, 0)]
    assert (tmp_path / "elsewhere").read_bytes() == b"kept" and not (tmp_path / "elsewhere").stat().st_mode & 0o4000
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


def test_no_space_removes_the_file_and_stops_the_run(write, tmp_path):
    target = tmp_path / "small"
    target.mkdir()
    with mounted_tmpfs(str(target), "256k"):
        big = os.urandom(200 << 10)
        out = write([_file(target / "first", big), _file(target / "second", big), _file(target / "third", b"3")],
                    False)
        assert out == [(0, 0), (errno.ENOSPC, 0)]
        assert sorted(os.listdir(target)) == ["first"]
        assert (target / "first").read_bytes() == big


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_a_refused_owner_is_reported_and_the_file_still_written(tmp_path, name):
    """Without CAP_CHOWN, root may not give a file away: the file is whole, with its mode and times."""
    script = textwrap.dedent(f"""
        import json
        from test_writefiles import IMPLEMENTATIONS, _file
        from pathlib import Path
        print(json.dumps(IMPLEMENTATIONS[{name!r}]([_file(Path({str(tmp_path)!r}) / "f", b"data", uid=4321)], True)))
    """)
    proc = subprocess.run(["setpriv", "--inh-caps=-chown", "--bounding-set=-chown", sys.executable, "-c", script],
                          capture_output=True, text=True, cwd=Path(__file__).parent, timeout=60)
    if proc.returncode != 0 and "setpriv" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"[[0, {errno.EPERM}]]"
    st = os.lstat(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"data"
    assert (st.st_uid, st.st_mode & 0o7777, st.st_mtime_ns) == (0, 0o640, MTIME)


@pytest.mark.parametrize("bad", [[("path-not-bytes", b"", 0o600, 0, 0, 0)], [(b"p", 42, 0o600, 0, 0, 0)],
                                 [(b"p", b"", 0o600, 0, 0)], [b"not a tuple"]])
def test_malformed_input_is_a_type_error_and_writes_nothing(tmp_path, bad, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError):
        IMPLEMENTATIONS["native"](bad, False)
    assert os.listdir(tmp_path) == []


_BLOCK = writefiles.HOLE_MIN
_runs = st.lists(st.tuples(st.booleans(), st.integers(1, 3 * _BLOCK)), max_size=8)


@functools.cache
def _punches(directory: str) -> bool:
    with tempfile.TemporaryFile(dir=directory) as f:
        f.write(b"x" * 2 * _BLOCK)
        f.flush()
        return writefiles.punch_hole(f.fileno(), 0, _BLOCK)


@settings(max_examples=300, deadline=None)
@given(_runs, st.integers(0, 3 * _BLOCK), st.integers(0, 2 * _BLOCK), st.sampled_from(["fresh", "old", "past"]))
def test_write_sparse_writes_the_data_and_leaves_its_blocks_of_zeros_holes(runs, offset, old_len, where):
    """The data reads back at its offset over what the file held (``old`` bytes before ``zeros_from``, zeros
    after), and the bytes left holes are those of its blocks (aligned on file offsets, partial at its ends)
    that are zeros: at or past ``zeros_from`` skipped, whole ones before it punched; native and reference
    alike."""
    data = b"".join(os.urandom(n).replace(b"\0", b"\1") if filled else bytes(n) for filled, n in runs)
    zeros_from = {"fresh": 0, "old": offset + old_len, "past": offset + len(data) + old_len}[where]
    old = bytes([0xAA]) * zeros_from
    punches = _punches(tempfile.gettempdir())
    expected_holes = 0
    i = 0
    while i < len(data):
        end = min(len(data), i + _BLOCK - (offset + i) % _BLOCK)
        if not any(data[i:end]) and (offset + i >= zeros_from or (punches and end - i == _BLOCK)):
            expected_holes += end - i
        i = end
    for name, write_sparse in SPARSE.items():
        with tempfile.TemporaryFile() as f:
            f.write(old)
            f.flush()
            assert write_sparse(f.fileno(), data, offset, zeros_from) == expected_holes, name
            size = max(zeros_from, offset + len(data))
            os.ftruncate(f.fileno(), size)
            f.seek(0)
            want = bytearray(old.ljust(size, b"\0"))
            want[offset:offset + len(data)] = data
            assert f.read() == want, name


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_write_sparse_takes_any_buffer_and_reports_errors(name, tmp_path):
    write_sparse = SPARSE[name]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert write_sparse(fd, memoryview(bytearray(b"ab" * 5000))[1:], 10, 0) == 0
        assert write_sparse(fd, bytearray(3 * _BLOCK), 20_000, 0) == 3 * _BLOCK  # past what it holds
        with pytest.raises(ValueError):
            write_sparse(fd, b"x", -1, 0)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(10) + b"ba" * 4999 + b"b"
    ro = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            write_sparse(ro, b"x", 0, 0)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(ro)
