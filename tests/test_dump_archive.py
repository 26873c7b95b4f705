"""dump of a directory: a tar or zip stream that unpacks to what a restore would write."""
import io
import json
import struct
import os
import pty
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest
from hypothesis import given, settings, strategies as st

from conftest import PASSWORD
from treeutil import describe, refusing_open


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "sub").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "one").write_bytes(os.urandom(3_000_000))
    (src / "a" / "empty").write_bytes(b"")
    (src / "a" / "sub" / "deep.txt").write_text("deep\n")
    os.chmod(src / "a" / "sub" / "deep.txt", 0o640)
    os.symlink("one", src / "a" / "link")
    os.link(src / "a" / "one", src / "a" / "twin")
    os.link(src / "a" / "sub" / "deep.txt", src / "b" / "outside")  # its other name lies outside b/
    os.mkfifo(src / "b" / "pipe")
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.utime(src / "a" / "one", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return src


@pytest.fixture
def backed_up(new_repo, tree):
    repo = new_repo()
    return repo, repo.backup([str(tree)]).snapshot


def dumped(repo, snap, path, archive="tar") -> tuple[bytes, list[str]]:
    out = io.BytesIO()
    warnings = repo.dump(snap, path, out, archive=archive)
    return out.getvalue(), warnings


def untar(data: bytes, into) -> None:
    into.mkdir()
    subprocess.run(["tar", "-x", "-f", "-", "-C", str(into)], input=data, check=True)


def test_tar_of_the_whole_snapshot_unpacks_to_the_source(backed_up, tree, tmp_path):
    repo, snap = backed_up
    data, warnings = dumped(repo, snap, "/")
    assert warnings == []
    untar(data, tmp_path / "out")
    want, got = describe(tree, times=False), describe(tmp_path / "out", times=False)
    del want[b"."], got[b"."]  # the root itself is not in the archive
    assert got == want
    assert os.stat(tmp_path / "out" / "a" / "one").st_mtime_ns == 1_700_000_000_123_456_789  # to the nanosecond
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert names[:2] == ["a", "a/empty"] and all(not n.startswith(("/", "./")) for n in names)


def test_any_binary_writer_takes_an_archive(backed_up):
    """A writer with write() alone: zip's flush of it was an AttributeError."""
    repo, snap = backed_up

    class WriteOnly:
        def __init__(self):
            self.data = bytearray()

        def write(self, b):
            self.data += b
            return len(b)

    tar, zipped = WriteOnly(), WriteOnly()
    repo.dump(snap, "/", tar, archive="tar")
    repo.dump(snap, "/", zipped, archive="zip")  # not seekable: written with data descriptors
    assert tar.data == dumped(repo, snap, "/", "tar")[0]
    names = zipfile.ZipFile(io.BytesIO(dumped(repo, snap, "/", "zip")[0])).namelist()
    assert zipfile.ZipFile(io.BytesIO(bytes(zipped.data))).namelist() == names


def test_tar_keeps_exact_times_and_extended_attributes(new_repo, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_text("before 1970\n")
    (src / "tagged").write_text("with attributes\n")
    os.utime(src / "old", ns=(-4_876_543_211, -4_876_543_211))
    os.utime(src / "tagged", ns=(1_796_040_000_123_456_789,) * 2)
    try:
        os.setxattr(src / "tagged", "user.origin", b"config")
        os.setxattr(src / "tagged", "user.raw", bytes(range(200, 256)))
        os.setxattr(src / "tagged", "user.a=b%c", b"val=ue")  # a keyword ends at its "="
    except OSError:
        pytest.skip("the test directory's file system keeps no user extended attributes")
    repo = new_repo()
    data, _ = dumped(repo, repo.backup([str(src)]).snapshot, "/")
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape")}
    assert members["old"].pax_headers["mtime"] == "-4.876543211"
    assert members["tagged"].pax_headers["mtime"] == "1796040000.123456789"
    assert members["tagged"].pax_headers["SCHILY.xattr.user.origin"] == "config"
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-x", "-f", "-", "-C", str(out)], input=data, check=True)
    for name in ("old", "tagged"):
        assert os.stat(out / name).st_mtime_ns == os.stat(src / name).st_mtime_ns
    assert {n: os.getxattr(out / "tagged", n) for n in os.listxattr(out / "tagged")} == {
        "user.origin": b"config", "user.raw": bytes(range(200, 256)), "user.a=b%c": b"val=ue"}


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """Linux's binary form of a POSIX ACL: (tag, permissions, id) entries after the version."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_tar_carries_acls_as_gnu_tar_reads_them(new_repo, tmp_path):
    """GNU tar takes ACLs from SCHILY.acl.access/.default (text) and skips system.posix_acl_* attributes:
    given as attributes, every ACL was lost on extraction."""
    src = tmp_path / "src"
    (src / "shared").mkdir(parents=True)
    (src / "shared" / "f").write_text("f\n")
    access = _acl((0x01, 6, 0xFFFFFFFF), (0x02, 5, 1234), (0x04, 4, 0xFFFFFFFF), (0x10, 5, 0xFFFFFFFF),
                  (0x20, 4, 0xFFFFFFFF))
    default = _acl((0x01, 7, 0xFFFFFFFF), (0x04, 5, 0xFFFFFFFF), (0x08, 7, 4321), (0x10, 7, 0xFFFFFFFF),
                   (0x20, 0, 0xFFFFFFFF))
    try:
        os.setxattr(src / "shared" / "f", "system.posix_acl_access", access)
        os.setxattr(src / "shared", "system.posix_acl_default", default)
    except OSError:
        pytest.skip("the test directory's file system keeps no POSIX ACLs")
    repo = new_repo()
    data, _ = dumped(repo, repo.backup([str(src)]).snapshot, "/")
    members = {m.name: m.pax_headers for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert members["shared/f"]["SCHILY.acl.access"] == "user::rw-,user:1234:r-x,group::r--,mask::r-x,other::r--"
    assert members["shared"]["SCHILY.acl.default"] == "user::rwx,group::r-x,group:4321:rwx,mask::rwx,other::---"
    assert not any(k.startswith("SCHILY.xattr.system.posix_acl") for h in members.values() for k in h)
    assert not any("hdrcharset" in h for h in members.values())  # the ACLs go as text: no binary records
    if b"--acls" not in subprocess.run(["tar", "--help"], capture_output=True).stdout:
        return
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--acls", "-x", "-f", "-", "-C", str(out)], input=data, check=True)
    assert os.getxattr(out / "shared" / "f", "system.posix_acl_access") == access
    assert os.getxattr(out / "shared", "system.posix_acl_default") == default


def test_tar_of_a_subtree_copies_a_hard_link_whose_file_is_outside(backed_up, tree, tmp_path):
    repo, snap = backed_up
    data, _ = dumped(repo, snap, "b/")
    untar(data, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["b"]
    outside = tmp_path / "out" / "b" / "outside"
    assert outside.read_text() == "deep\n" and os.stat(outside).st_nlink == 1
    assert stat.S_ISFIFO(os.lstat(tmp_path / "out" / "b" / "pipe").st_mode)
    data, _ = dumped(repo, snap, "a")
    kinds = {m.name: m.type for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert {kinds["a/one"], kinds["a/twin"]} == {tarfile.REGTYPE, tarfile.LNKTYPE}  # both inside: a link
    assert kinds["a/link"] == tarfile.SYMTYPE


def test_a_tar_cut_short_by_damaged_data_does_not_end_as_a_whole_archive(backed_up, tmp_path, monkeypatch):
    """Ending it anyway made `tar x` of a pipe succeed: a small file whose data failed came out as zeros."""
    from chunkvault.errors import CorruptObject

    repo, snap = backed_up
    bad = repo.find_entry(snap, "a/sub/deep.txt").chunk_ids()[0]
    real = repo.store.read_blob

    def read_blob(blob_id, **kw):
        if blob_id == bad:
            raise CorruptObject(f"blob {blob_id.hex()}", "damaged (planted)")
        return real(blob_id, **kw)

    monkeypatch.setattr(repo.store, "read_blob", read_blob)
    out = io.BytesIO()
    with pytest.raises(CorruptObject, match="planted"):
        repo.dump(snap, "/", out)
    assert b"a/sub/deep.txt" in out.getvalue()
    into = tmp_path / "into"
    into.mkdir()
    proc = subprocess.run(["tar", "-x", "-f", "-", "-C", str(into)], input=out.getvalue(), capture_output=True)
    assert proc.returncode != 0 and b"Unexpected EOF" in proc.stderr


def test_a_zip_cut_short_by_damaged_data_has_no_central_directory(backed_up, monkeypatch):
    """It was closed anyway: the part of the file written passed for the whole (its size and CRC were
    those of that part) and `unzip -t` found no error."""
    from chunkvault.errors import CorruptObject

    repo, snap = backed_up
    ids = repo.find_entry(snap, "a/one").chunk_ids()
    assert len(ids) > 1
    real = repo.store.read_blob

    def read_blob(blob_id, **kw):
        if blob_id == ids[-1]:
            raise CorruptObject(f"blob {blob_id.hex()}", "damaged (planted)")
        return real(blob_id, **kw)

    monkeypatch.setattr(repo.store, "read_blob", read_blob)
    monkeypatch.setattr(repo.store, "read_blobs", lambda blob_ids: [read_blob(b) for b in blob_ids])
    out = io.BytesIO()
    with pytest.raises(CorruptObject, match="planted"):
        repo.dump(snap, "/", out, archive="zip")
    assert len(out.getvalue()) > 1_000_000  # what came before the damage was written
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(out.getvalue()))


def test_a_file_no_backup_could_read_is_an_error_to_dump_not_an_empty_file(new_repo, tmp_path, monkeypatch,
                                                                          python_file_reads, cli):
    """The dump was an empty file with exit 0, and `ls` listed it as an empty file."""
    from chunkvault.errors import MissingObject

    src = tmp_path / "src"
    src.mkdir()
    (src / "secret").write_bytes(b"never read")
    (src / "ok").write_bytes(b"ok")
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open("secret"))
    snap = repo.backup([str(src)]).snapshot
    monkeypatch.undo()
    with pytest.raises(MissingObject, match="file secret: unreadable at backup time"):
        repo.dump(snap, "secret", io.BytesIO())
    with pytest.raises(MissingObject):
        repo.open_file(snap, "secret")
    data, warnings = dumped(repo, snap, "/")
    assert warnings == ["secret: unreadable at backup time, left out (no backup read it)"]
    listed = json.loads(cli("ls", "-r", url, "latest", "--json").stdout)
    assert {e["path"]: e["unreadable"] for e in listed if e["path"]} == {"ok": None, "secret": "no data"}
    lines = cli("ls", "-r", url, "latest").stdout.decode().splitlines()
    assert [line for line in lines if "unreadable" in line][0].endswith("secret  (unreadable at backup time: no data)")


def test_tar_of_a_subtree_links_the_names_of_a_file_whose_first_name_is_outside(new_repo, tmp_path):
    """Each such name carried its own copy of the data, and the extracted tree held that many files."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "first").write_bytes(os.urandom(200_000))
    for name in ("x", "y", "z"):
        os.link(src / "a" / "first", src / "b" / name)
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    data, _ = dumped(repo, snap, "b")
    kinds = {m.name: (m.type, m.linkname) for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert [kinds[f"b/{n}"] for n in "xyz"] == [(tarfile.REGTYPE, ""), (tarfile.LNKTYPE, "b/x"), (tarfile.LNKTYPE, "b/x")]
    untar(data, tmp_path / "out")
    assert os.stat(tmp_path / "out" / "b" / "z").st_nlink == 3
    assert (tmp_path / "out" / "b" / "y").read_bytes() == (src / "a" / "first").read_bytes()


def test_zip_of_a_subtree_copies_each_name_of_a_file_whose_first_name_is_outside(new_repo, tmp_path):
    """A zip has no hard links: each name holds the data (the second name was an internal error)."""
    import zipfile

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "f").write_bytes(b"data\n")
    for name in ("l1", "l2"):
        os.link(src / "a" / "f", src / "b" / name)
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    out = io.BytesIO()
    repo.dump(snap, "b", out, archive="zip")
    z = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    assert {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()} == {"b/l1": b"data\n", "b/l2": b"data\n"}


@pytest.mark.parametrize("archive", ["tar", "zip"])
def test_a_file_whose_chunks_read_as_other_bytes_of_its_length_fails_the_dump(backed_up, monkeypatch, archive):
    """Every file is read to its end, so its digest is checked: a chunk that reads back otherwise (an index
    pointing at another blob of that length) went into the archive unnoticed."""
    from chunkvault.errors import CorruptObject

    repo, snap = backed_up
    target = repo.find_entry(snap, "a/sub/deep.txt")
    bad = target.chunk_ids()[0]
    real = repo.store.read_blob

    def read_blob(blob_id, **kw):
        data = bytes(real(blob_id, **kw))
        return bytes(b ^ 1 for b in data) if blob_id == bad else data

    monkeypatch.setattr(repo.store, "read_blob", read_blob)
    with pytest.raises(CorruptObject, match="digest"):
        repo.dump(snap, "/", io.BytesIO(), archive=archive)


def test_zip_keeps_files_dirs_modes_and_symlinks_and_names_what_it_cannot_hold(backed_up, tree):
    repo, snap = backed_up
    data, warnings = dumped(repo, snap, "/", archive="zip")
    assert warnings == ["b/pipe: a FIFO cannot be stored in a zip",
                        "caf\udce9: the name is not UTF-8; the zip names it caf\ufffd (a tar keeps its bytes)"]
    z = zipfile.ZipFile(io.BytesIO(data))
    assert z.testzip() is None
    info = {i.filename: i for i in z.infolist()}
    assert z.read("a/one") == (tree / "a" / "one").read_bytes()
    assert z.read("a/twin") == z.read("a/one") and z.read("b/outside") == b"deep\n"  # links as copies
    assert stat.S_ISLNK(info["a/link"].external_attr >> 16) and z.read("a/link") == b"one"
    assert info["a/sub/"].is_dir() and stat.S_IMODE(info["a/sub/deep.txt"].external_attr >> 16) == 0o640
    assert z.read("caf\ufffd") == b"latin-1 name"
    assert "b/pipe" not in info
    for name, i in info.items():  # the exact second in UTC ("UT" field), beside DOS's local 2-second steps
        (mtime,) = struct.unpack("<i", i.extra[5:9])
        assert i.extra[:5] == struct.pack("<HHB", 0x5455, 5, 1)
        assert mtime == os.lstat(tree / name.replace("\ufffd", "\udce9").rstrip("/")).st_mtime_ns // 10**9, name


def test_a_file_is_dumped_as_its_content(backed_up, tree):
    repo, snap = backed_up
    assert dumped(repo, snap, "a/one")[0] == (tree / "a" / "one").read_bytes()
    assert dumped(repo, snap, "a/twin", archive="zip")[0] == (tree / "a" / "one").read_bytes()


def test_cli_dump_of_a_directory(cli, tree, tmp_path):
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(tree))
    z = zipfile.ZipFile(io.BytesIO(cli("dump", "-r", repo, "latest", "a", "--archive", "zip").stdout))
    assert sorted(z.namelist()) == ["a/", "a/empty", "a/link", "a/one", "a/sub/", "a/sub/deep.txt", "a/twin"]
    proc = cli("dump", "-r", repo, "latest", "/", check=0)
    assert "b/pipe" in [m.name for m in tarfile.open(fileobj=io.BytesIO(proc.stdout))]

    def on_a_terminal(path: str) -> subprocess.CompletedProcess:
        leader, follower = pty.openpty()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
            return subprocess.run([sys.executable, "-m", "chunkvault.cli", "dump", "-r", repo, "latest", path],
                                  stdout=follower, stderr=subprocess.PIPE, timeout=120,
                                  env={**env, "CHUNKVAULT_PASSWORD": PASSWORD})
        finally:
            os.close(follower)
            os.close(leader)

    done = on_a_terminal("a")
    assert done.returncode == 2 and b"redirect it to a file or a pipe" in done.stderr
    cli("backup", "-r", repo, "--stdin", "--stdin-name", "db/all.sql", input=b"select 1;\n")
    assert cli("ls", "-r", repo, "latest", "db").stdout.decode().split()[-1] == "db/all.sql"
    done = on_a_terminal("db")  # a directory with no entry of its own: it said there was no 'db'
    assert done.returncode == 2 and b"redirect it to a file or a pipe" in done.stderr
    assert b"no 'dbx'" in cli("ls", "-r", repo, "latest", "dbx", check=2).stderr


def test_directories_without_an_entry_of_their_own_dump_and_list_what_they_hold(new_repo, tmp_path):
    """The root of a snapshot of several paths, and the directory of a --stdin-name, are directories the
    restore makes: `dump /` and `ls` of them said they were not there."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    (tmp_path / "b").write_bytes(b"2")
    repo = new_repo()
    several = repo.backup([str(tmp_path / "a"), str(tmp_path / "b")]).snapshot
    streamed = repo.backup_stream(io.BytesIO(b"select 1;\n"), "dump/x.sql").snapshot
    for snap, members in ((several, {"a/x": b"1", "b": b"2"}), (streamed, {"dump/x.sql": b"select 1;\n"})):
        out = io.BytesIO()
        repo.dump(snap, "/", out)
        with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
            got = {m.name.split(str(tmp_path).lstrip("/") + "/")[-1]: tar.extractfile(m).read()
                   for m in tar.getmembers() if m.isfile()}
        assert got == members
    out = io.BytesIO()
    repo.dump(streamed, "dump", out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert [m.name for m in tar.getmembers()] == ["dump/x.sql"]
    with pytest.raises(Exception, match="no 'dumpx'"):
        repo.dump(streamed, "dumpx", io.BytesIO())


@pytest.mark.parametrize("path", ["big", "/"])
def test_a_dump_whose_reader_goes_away_is_no_success(cli, tmp_path, path):
    """`dump | head -c 10` exited 0, so `set -o pipefail` could not tell a delivered dump from a cut one:
    it now ends as `cat` does there (141), saying so.  Closed standard output is exit 14, not an internal
    error."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(8 << 20))
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    cli("backup", "-r", repo, str(src))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    cmd = [sys.executable, "-m", "chunkvault.cli", "dump", "-r", repo, "latest", path]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 141, err
    assert err == "chunkvault: dump: the reader of standard output closed it before the dump was complete\n"
    closed = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: os.close(1), timeout=120)
    assert closed.returncode == 14 and b"standard output is closed" in closed.stderr


def test_ls_marks_a_file_kept_with_an_earlier_backups_data(new_repo, tmp_path, monkeypatch, python_file_reads, cli):
    """Unreadable at the second backup, the file keeps the first one's data: ls said nothing of it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret").write_bytes(b"first read")
    (src / "ok").write_bytes(b"ok")
    url = str(tmp_path / "repo")
    repo = new_repo(url)
    repo.backup([str(src)])
    (src / "secret").write_bytes(b"changed since")
    monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open("secret"))
    repo.backup([str(src)])
    monkeypatch.undo()
    listed = json.loads(cli("ls", "-r", url, "latest", "--json").stdout)
    assert {e["path"]: e["unreadable"] for e in listed if e["path"]} == {"ok": None, "secret": "earlier data"}
    assert cli("dump", "-r", url, "latest", "secret").stdout == b"first read"


def test_dump_without_a_path_says_so(cli, tmp_path):
    """``dump latest --path a.txt`` took ``latest`` for the PATH: "no 'latest' in snapshot ..."."""
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo)
    cli("backup", "-r", repo, "--stdin", "--stdin-name", "a.txt", input=b"data")
    proc = cli("dump", "-r", repo, "latest", "--path", "a.txt", check=2)
    assert proc.stderr.decode().startswith("chunkvault: dump takes a snapshot, then a PATH")
    assert cli("dump", "-r", repo, "latest", "a.txt", "--path", "a.txt").stdout == b"data"


# --- sparse files: their holes left out of a tar (pax sparse format 1.0) ------------------------------

def _sparse_layout(path, size: int, data_at: list[int], length: int = 100_000) -> bytes:
    """A file of ``size`` bytes holding random data at ``data_at`` (holes between); its content."""
    content = bytearray(size)
    with open(path, "wb") as f:
        for at in data_at:
            piece = os.urandom(min(length, size - at))
            f.seek(at)
            f.write(piece)
            content[at:at + len(piece)] = piece
        f.truncate(size)
    return bytes(content)


def test_a_sparse_file_is_dumped_as_its_data_and_unpacks_whole_and_sparse(new_repo, tmp_path):
    """A tar of a file that is mostly holes held every zero of them (a 20 GiB database file holding a few MiB
    was 20 GiB of tar); it now holds the data regions, and GNU tar, bsdtar and Python's tarfile make the same
    file of them, its holes holes again."""
    src = tmp_path / "src"
    src.mkdir()
    MiB = 1 << 20
    files = {"middle": _sparse_layout(src / "middle", 96 * MiB, [0, 40 * MiB + 123, 95 * MiB]),
             "tail": _sparse_layout(src / "tail", 64 * MiB, [5]),  # ends in a hole
             "hole": _sparse_layout(src / "hole", 48 * MiB, []),   # nothing but
             "dense": os.urandom(3 * MiB)}
    (src / "dense").write_bytes(files["dense"])
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    data, warnings = dumped(repo, snap, "/")
    assert not warnings and len(data) < 16 * MiB  # the chunks holding data, not 211 MiB of zeros
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert members["dense"].sparse is None and members["middle"].sparse
    assert members["hole"].sparse == [(48 * MiB, 0)]
    extractors = {"tarfile": lambda into: tarfile.open(fileobj=io.BytesIO(data)).extractall(into, filter="tar")}
    if shutil.which("tar"):
        extractors["gnu tar"] = lambda into: subprocess.run(["tar", "-x", "-f", "-", "-C", str(into)], input=data,
                                                            check=True)
    if shutil.which("bsdtar"):
        extractors["bsdtar"] = lambda into: subprocess.run(["bsdtar", "-x", "-f", "-", "-C", str(into)], input=data,
                                                           check=True)
    for name, extract in extractors.items():
        into = tmp_path / name
        into.mkdir()
        extract(into)
        for path, content in files.items():
            assert (into / path).read_bytes() == content, (name, path)
        if name != "tarfile":  # it writes the regions but punches no holes where it seeks past none
            assert os.stat(into / "hole").st_blocks * 512 < MiB, name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), max_size=12), st.sampled_from([1, 512, 700]))
def test_a_sparse_member_reads_back_as_its_file(segments, least):
    """Any layout of data and zeros, written as a sparse member of its runs of zero chunks as holes (narrowed
    to whole blocks), reads back through Python's tarfile as the file's bytes."""
    from chunkvault.store.archive import _Tar, zero_runs
    from chunkvault.store.manifest import T_FILE, Entry

    content = b"".join(bytes(n) if zero else bytes((i % 255) + 1 for i in range(n)) for zero, n in segments)
    chunks = [(b"z%d" % n if zero else os.urandom(8), n) for zero, n in segments]
    holes = zero_runs(chunks, lambda n: b"z%d" % n, 0, least)
    holes += zero_runs(chunks, lambda n: b"z%d" % n, 700, least)  # asked of a chunk the chunker's cut long
    holes = sorted(set(holes))
    assert all(content[a:a + n] == bytes(n) for a, n in holes)
    out = io.BytesIO()
    e = Entry(path=b"f", type=T_FILE, mode=0o644, size=len(content))
    tar = _Tar(out, ({}, {}), lambda _: holes)
    tar.file(e, io.BytesIO(content))
    tar.close(True)
    member = tarfile.open(fileobj=io.BytesIO(out.getvalue())).getmember("f")
    assert member.size == len(content)
    assert tarfile.open(fileobj=io.BytesIO(out.getvalue())).extractfile(member).read() == content


def test_zero_runs_asks_only_of_the_lengths_zeros_are_cut_into_or_repeated():
    """The id of n zeros is a hash of n bytes: asked of every chunk's length, a dump would hash as much as
    the file again."""
    from chunkvault.store.archive import zero_runs

    asked = []

    def zero_id(n):
        asked.append(n)
        return b"zero"

    chunks = [(b"a", 10), (b"zero", 4), (b"zero", 4), (b"b", 3), (b"zero", 6), (b"c", 5), (b"zero", 7)]
    assert zero_runs(chunks, zero_id, 6, least=1) == [(10, 8), (21, 6)]
    assert sorted(asked) == [4, 4, 6]  # not the chunk after a run inside the file: its data's too
    asked.clear()
    ending = [(b"a", 10), (b"zero", 6), (b"zero", 6), (b"zero", 2)]  # a file ending in zeros: its rest joins
    assert zero_runs(ending, zero_id, 6, least=1) == [(10, 14)] and sorted(asked) == [2, 6, 6]
    assert zero_runs(chunks, zero_id, 6, least=7) == [(10, 8)]


def test_the_holes_of_a_file_with_many_runs_hash_no_buffer_of_zeros_for_each(new_repo, tmp_path):
    """The chunk after a run of zeros inside a file holds the rest of the zeros and the data after them, cut
    as one: the id of zeros of its length was asked all the same, a hash of a buffer that long for each run
    (the mount's getattr of a 4 GiB image with a run every 5 MiB hashed 437 of them, in 0.2 s)."""
    import random

    MiB = 1 << 20
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    with open(src / "image", "wb") as f:
        for n in range(8):
            f.seek(n * 8 * MiB + rnd.randrange(MiB))
            f.write(rnd.randbytes(64 << 10))
        f.truncate(72 * MiB)  # ends in zeros
    snap = repo.backup([str(src)]).snapshot
    e = repo.find_entry(snap, "image")
    holes = repo.holes(e)
    assert len(holes) == 8 and holes[-1][0] + holes[-1][1] == 72 * MiB, holes  # the last runs to the end
    assert repo._zero_ids.cache_info().misses <= 2, repo._zero_ids.cache_info()  # the cut's and the last's


def test_a_sparse_member_of_over_8_gib_of_data_reads_whole_and_the_members_after_it(tmp_path):
    """A sparse member whose data regions take 8 GiB or more has a stored size past the header's octal field;
    as a pax size record, Python's tarfile took it for the file's size (20 GiB came out 9 GiB) and looked for
    the next header past the map, losing the members after it.  The tar is itself sparse here: its data are
    holes of the file it is written to."""
    from chunkvault.store import tarformat

    GiB = 1 << 30
    real, marker = 20 * GiB, b"end of the data"
    regions = [(0, 4096), (10 * GiB, 9 * GiB - 4096), (real, 0)]
    sparse_map = tarformat.sparse_map(regions)
    stored = len(sparse_map) + sum(n for _, n in regions)
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        f.write(tarformat.header(tarformat.REGULAR, b"db", size=stored, real_size=real) + sparse_map)
        f.seek(stored - len(sparse_map) - len(marker), os.SEEK_CUR)
        f.write(marker + tarformat.padding(stored))
        f.write(tarformat.header(tarformat.REGULAR, b"after", size=2) + b"hi" + tarformat.padding(2) + bytes(1024))
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [(m.name, m.size) for m in members] == [("db", real), ("after", 2)]
        assert members[0].sparse == regions
        assert tf.extractfile("after").read() == b"hi"
        data = tf.extractfile("db")
        data.seek(19 * GiB - 4096 - len(marker))  # the end of the second region
        assert data.read(len(marker) + 10) == marker + bytes(10)
    for tool in ("tar", "bsdtar"):
        if shutil.which(tool):
            listing = subprocess.run([tool, "-tvf", str(path)], capture_output=True, check=True).stdout.decode()
            assert [line.split()[-1] for line in listing.splitlines()] == ["db", "after"], tool
            assert str(real) in listing.splitlines()[0], tool
