"""import-tar: a tar stream backed up as a tree, an ordinary snapshot (restorable, deduplicated, differential)."""
import io
import os
import subprocess
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from chunkvault.errors import IncompleteSource, UsageError
from chunkvault.store.manifest import T_DIR, T_FILE, T_HARDLINK, Entry
from chunkvault.store.tarimport import TarTree, member_path, pax_time_ns
from chunkvault.store.xattrs import decode_xattrs
from conftest import PASSWORD
from treeutil import describe

LONG = "l" * 60 + "/" + "ö" * 40 + "/" + "n" * 120  # past ustar's 100 and 155 byte fields: GNU or pax long names


def make_tree(root):
    (root / "a" / "sub").mkdir(parents=True)
    (root / "odd").mkdir(mode=0o700)
    os.chmod(root / "odd", 0o750)
    (root / "a" / "big").write_bytes(os.urandom(3_000_000))
    (root / "a" / "mid").write_bytes(os.urandom(70_000))
    (root / "a" / "empty").write_bytes(b"")
    (root / "a" / "sub" / "small.txt").write_text("small\n")
    os.chmod(root / "a" / "sub" / "small.txt", 0o640)
    os.symlink("big", root / "a" / "link")
    os.symlink("../nowhere", root / "dangling")
    os.link(root / "a" / "big", root / "odd" / "twin")
    os.mkfifo(root / "pipe")
    (root / "café ünï").write_bytes(b"non-ascii name")
    (root / os.fsdecode(b"latin\xe9")).write_bytes(b"not utf-8")
    deep = root / LONG
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"long name")
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        if not p.is_symlink() and not p.is_fifo():
            os.utime(p, ns=(1_700_000_000_123_456_789 + i, 1_700_000_000_123_456_789 + i * 1000))
    os.utime(root, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    return src


def gnu_tar(src, fmt="gnu", compress=None) -> bytes:
    data = subprocess.run(["tar", f"--format={fmt}", "-C", str(src), "-cf", "-", "."], capture_output=True,
                          check=True).stdout
    if compress == "gz":
        import gzip
        data = gzip.compress(data)
    elif compress == "bz2":
        import bz2
        data = bz2.compress(data)
    elif compress == "xz":
        import lzma
        data = lzma.compress(data)
    elif compress == "zst":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    return data


def python_tar(src) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.add(str(src), arcname=".")
    return out.getvalue()


def restored(repo, snap, into):
    repo.restore(snap.id, str(into))
    return into


def same_tree(src, out, times=True):
    want, got = describe(src, times=times), describe(out, times=times)
    assert got == want


@pytest.mark.parametrize("maker", ["gnu", "pax", "python", "gz", "bz2", "xz", "zst"])
def test_round_trip_from_a_tar_restores_the_tree(new_repo, tree, tmp_path, maker):
    data = {"gnu": lambda: gnu_tar(tree, "gnu"), "pax": lambda: gnu_tar(tree, "pax"),
            "python": lambda: python_tar(tree), "gz": lambda: gnu_tar(tree, "pax", "gz"), "xz": lambda: gnu_tar(tree, "pax", "xz"),
            "bz2": lambda: gnu_tar(tree, "pax", "bz2"),
            "zst": lambda: gnu_tar(tree, "pax", "zst")}[maker]()
    repo = new_repo()
    result = repo.import_tar(io.BytesIO(data), "/srv/src")
    assert result.warnings == [] and result.snapshot.paths == ["/srv/src"]
    # GNU tar's pax keeps nanoseconds; its GNU format whole seconds, Python's pax writer a float's digits
    same_tree(tree, restored(repo, result.snapshot, tmp_path / "out"), times=maker in ("pax", "gz", "bz2", "xz", "zst"))


def test_import_from_a_pipe_through_the_cli(cli, new_repo, tree, tmp_path):
    repo = new_repo()
    repo.close()
    url = str(tmp_path / "repo0")
    tar = subprocess.Popen(["tar", "--format=pax", "-C", str(tree), "-cf", "-", "."], stdout=subprocess.PIPE)
    proc = subprocess.run([*cli_argv(), "import-tar", "-r", url, "--path", "/src", "--json", "-"],
                          stdin=tar.stdout, capture_output=True, env=cli_env(), timeout=120)
    tar.stdout.close()
    tar.wait()
    assert proc.returncode == 0, proc.stderr
    import json
    doc = json.loads(proc.stdout)
    assert doc["paths"] == ["/src"] and doc["stats"]["new_files"] > 5
    cli("restore", "-r", url, doc["id"], "--target", str(tmp_path / "out"))
    same_tree(tree, tmp_path / "out")


def cli_argv():
    import sys
    return [sys.executable, "-m", "chunkvault.cli"]


def cli_env():
    from conftest import PASSWORD
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    return env


def test_a_tar_of_a_backed_up_tree_adds_no_data_and_takes_the_backup_as_parent(new_repo, tree):
    repo = new_repo()
    backup = repo.backup([str(tree)]).snapshot
    result = repo.import_tar(io.BytesIO(gnu_tar(tree, "pax")), str(tree))
    snap = result.snapshot
    assert snap.kind == "diff" and snap.parent == backup.id
    assert snap.stats["added_raw_bytes"] == 0
    assert snap.stats["unchanged_files"] == backup.stats["new_files"]


def test_a_differential_import_finds_its_parent_and_restores_exactly(new_repo, tree, tmp_path):
    repo = new_repo()
    first = repo.import_tar(io.BytesIO(gnu_tar(tree, "pax")), "/src").snapshot
    (tree / "a" / "mid").write_bytes(os.urandom(70_000))
    (tree / "a" / "sub" / "small.txt").unlink()
    (tree / "new").write_bytes(b"new file")
    os.chmod(tree / "odd", 0o711)
    second = repo.import_tar(io.BytesIO(gnu_tar(tree, "pax")), "/src")
    snap = second.snapshot
    assert snap.kind == "diff" and snap.parent == first.id
    st = snap.stats
    assert (st["new_files"], st["changed_files"], st["deleted"]) == (1, 1, 1)
    assert st["added_raw_bytes"] < 100_000
    same_tree(tree, restored(repo, snap, tmp_path / "out"))
    again = repo.import_tar(io.BytesIO(gnu_tar(tree, "pax")), "/src").snapshot
    assert again.stats["manifest_records"] == 0 and again.stats["added_raw_bytes"] == 0


def test_dump_of_an_imported_snapshot_imports_to_the_same_tree(new_repo, tree, tmp_path):
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(gnu_tar(tree, "pax")), "/src").snapshot
    out = io.BytesIO()
    repo.dump(snap, "/", out, archive="tar")
    again = repo.import_tar(io.BytesIO(out.getvalue()), "/copy").snapshot
    assert again.stats["added_raw_bytes"] == 0
    restored(repo, again, tmp_path / "out")
    want, got = describe(tree), describe(tmp_path / "out")
    del want[b"."], got[b"."]  # dump leaves the root out: implied, it has the default mode and no time of its own
    assert got == want


def test_a_truncated_tar_saves_no_snapshot(new_repo, tree):
    repo = new_repo()
    data = gnu_tar(tree, "pax")
    for cut in (len(data) // 2, 1536 * 3, len(data) - 10240):
        with pytest.raises(IncompleteSource) as err:
            repo.import_tar(io.BytesIO(data[:cut]), "/src")
        assert err.value.exit_code == 20
    assert repo.snapshots() == []


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
@pytest.mark.parametrize("compress", [None, "gz"])
def test_a_tar_cut_after_the_header_that_leads_its_first_member_saves_no_snapshot(new_repo, tmp_path, fmt,
                                                                                 compress):
    """A long name goes in a header of its own (pax extended, GNU long name) before the member's.  Cut just
    after it, the tar was 'not a tar archive' (exit 2): it is one, broken off (exit 20), as tar -x says."""
    src = tmp_path / "src"
    src.mkdir()
    (src / ("n" * 150)).write_bytes(b"hi")
    whole = subprocess.run(["tar", f"--format={fmt}", "-C", str(src), "-cf", "-", "n" * 150], capture_output=True,
                           check=True).stdout
    assert whole[156:157] in (b"x", b"L")  # the leading header's type
    cut = whole[:1024]
    if compress:
        import gzip
        cut = gzip.compress(cut)
    repo = new_repo()
    with pytest.raises(IncompleteSource) as err:
        repo.import_tar(io.BytesIO(cut), "/src")
    assert err.value.exit_code == 20 and "first member" in str(err.value)
    assert repo.snapshots() == []


def test_a_tar_cut_inside_a_sparse_map_says_so_not_python_s_unpacking(new_repo, tmp_path):
    """A sparse 1.0 member's map lies in its data area; cut there, the tar broke off with Python's 'not
    enough values to unpack (expected 2, got 1)' as its reason."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "s", "wb") as f:
        for i in range(200):  # a map of 400 numbers: more than one block
            f.seek(i * 65536)
            f.write(b"x")
        f.truncate(200 * 65536)
    data = subprocess.run(["tar", "--format=pax", "--sparse-version=1.0", "-cSf", "-", "-C", str(src), "s"],
                          capture_output=True, check=True).stdout
    repo = new_repo()
    with pytest.raises(IncompleteSource) as err:
        repo.import_tar(io.BytesIO(data[:3000]), "/src")
    assert err.value.exit_code == 20 and "sparse map cut short" in str(err.value), err.value
    assert repo.snapshots() == []


def test_a_tar_cut_inside_a_gnu_sparse_header_s_extension_block_saves_no_snapshot(new_repo, tmp_path):
    """GNU tar's sparse header holds 4 blocks of the map; more go to extension blocks after it.  Cut inside one
    (first member or a later one), the tar breaks off (exit 20), not an internal error (IndexError, exit 1)."""
    big = tmp_path / "src" / "sparse"
    big.parent.mkdir()
    with open(big, "wb") as f:
        for i in range(8):
            f.seek(i * 65536)
            f.write(b"x")
        f.truncate(1 << 20)
    (tmp_path / "src" / "a").write_bytes(b"a")
    data = subprocess.run(["tar", "--format=gnu", "-cSf", "-", "-C", str(tmp_path / "src"), "a", "sparse"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert [m.name for m in tf] == ["a", "sparse"] and len(tf.getmember("sparse").sparse) > 4
    first = subprocess.run(["tar", "--format=gnu", "-cSf", "-", "-C", str(tmp_path / "src"), "sparse"],
                           capture_output=True, check=True).stdout
    repo = new_repo()
    for cut in (data[:1024 + 600], first[:600]):  # the extension block after member 'a' / as the tar's first
        with pytest.raises(IncompleteSource) as err:
            repo.import_tar(io.BytesIO(cut), "/src")
        assert err.value.exit_code == 20 and "a header cut short" in str(err.value)
    assert repo.snapshots() == []


def test_a_closed_standard_input_is_refused_saying_what_to_give_import_tar(cli, tmp_path):
    """The refusal was backup's, which told the user to give --stdin a pipe: import-tar has no such option."""
    import sys

    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    argv = [sys.executable, "-m", "chunkvault.cli", "import-tar", "-r", url, "--path", "/x", "-"]
    proc = subprocess.run(["sh", "-c", '"$@" <&-', "sh", *argv], capture_output=True, text=True,
                          env={**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD})
    assert (proc.returncode, proc.stderr) == (2, "chunkvault: standard input is closed or not readable: pipe the "
                                                 "tar into it, or name its file instead of - (no descriptor)\n")


def test_truncated_and_refused_input_through_the_cli(cli, tree, tmp_path):
    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    data = gnu_tar(tree, "pax")
    cut = cli("import-tar", "-r", url, "--path", "/src", "-", input=data[: len(data) // 2], check=20)
    assert b"no snapshot saved" in cut.stderr and len(cut.stderr.splitlines()) == 1
    plain = cli("import-tar", "-r", url, "--path", "/src", "-", input=b"hello, not a tar\n" * 100, check=2)
    assert b"not a tar archive" in plain.stderr and len(plain.stderr.splitlines()) == 1
    rel = cli("import-tar", "-r", url, "--path", "src", "-", input=data, check=2)
    assert b"must be absolute" in rel.stderr
    assert cli("snapshots", "-r", url, "--json").stdout.strip() == b"[]"


def test_dot_dot_members_are_refused_and_save_nothing(new_repo):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        t.addfile(tarfile.TarInfo("ok"), io.BytesIO())
        t.addfile(tarfile.TarInfo("a/../../etc/passwd"), io.BytesIO())
    repo = new_repo()
    with pytest.raises(UsageError, match=r"a/\.\./\.\./etc/passwd"):
        repo.import_tar(io.BytesIO(out.getvalue()), "/src")
    assert repo.snapshots() == []


def test_strip_components_and_the_last_member_named_wins(new_repo, tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, data in (("etc/x", b"old"), ("etc/y", b"y"), ("etc/x", b"new"), ("/etc/z/", None)):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(out.getvalue()), "/etc", strip_components=1).snapshot
    restored(repo, snap, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["x", "y", "z"]
    assert (tmp_path / "out" / "x").read_bytes() == b"new"
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o700  # implied: the first listed directory's mode


def test_member_path():
    assert member_path("./a/b") == b"a/b"
    assert member_path("/etc/passwd") == b"etc/passwd"
    assert member_path("./") == b""
    assert member_path("etc/x", 1) == b"x"
    assert member_path("./x", 1) == b"x"  # "." counts, as for GNU tar
    assert member_path("etc", 1) is None
    with pytest.raises(UsageError):
        member_path("x/../y")


def test_pax_time_ns():
    assert pax_time_ns("1700000000.123456789") == 1_700_000_000_123_456_789
    assert pax_time_ns("-1.5") == -1_500_000_000
    assert pax_time_ns("12") == 12_000_000_000
    with pytest.raises(ValueError):
        pax_time_ns("1e9")


def test_tree_hard_links_are_held_by_the_first_path_in_manifest_order():
    t = TarTree()
    t.add_file(Entry(b"z/file", T_FILE, 0o600, size=3, digest=b"d"))
    t.add_link(b"a/link", b"z/file", "a/link")
    t.add_link(b"m/gone", b"nowhere", "m/gone")
    by = {e.path: e for e in t.entries()}
    assert by[b"a/link"].type == T_FILE and by[b"a/link"].digest == b"d"
    assert by[b"z/file"].type == T_HARDLINK and by[b"z/file"].target == b"a/link"
    assert by[b"a"].type == T_DIR and by[b"a"].mode == 0o755
    assert b"m/gone" not in by and t.unreadable == ["m/gone"]


def test_tree_a_file_replacing_a_directory_drops_what_was_below():
    t = TarTree()
    t.add(Entry(b"d", T_DIR, 0o700))
    t.add_file(Entry(b"d/f", T_FILE))
    t.add_file(Entry(b"d", T_FILE))
    t.add_file(Entry(b"e/f", T_FILE))
    assert [e.path for e in t.entries()] == [b"", b"d", b"e", b"e/f"]


def test_tree_a_deep_chain_costs_each_member_its_new_directories_not_its_depth(monkeypatch):
    """Each member made or visited every directory from the root down to it: a tar thousands of
    directories deep (a generated tree, or one past PATH_MAX, which only a restore can write) took minutes
    to import.  The implied directories above still take the first member and directory below them."""
    made = []
    ensure = TarTree._ensure_dir
    monkeypatch.setattr(TarTree, "_ensure_dir", lambda self, rel: (made.append(rel), ensure(self, rel))[1])
    t, depth, path = TarTree(), 400, b"top/implied"
    for i in range(depth):
        path += b"/d"
        t.add(Entry(path, T_DIR, 0o750, mtime_ns=i))
        t.add_file(Entry(path + b"/f", T_FILE, 0o600, size=1, digest=b"x"))
    assert len(made) < 4 * depth
    by = {e.path: e for e in t.entries()}
    assert len(by) == 2 * depth + 3
    assert by[b""].mode == by[b"top"].mode == by[b"top/implied"].mode == 0o750  # the first directory below
    assert by[b"top/implied"].mtime_ns == 0 and by[path + b"/f"].type == T_FILE


names = st.text(alphabet="abcé", min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(files=st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=300),
                             max_size=8))
def test_random_trees_round_trip(new_repo, tmp_path_factory, files):
    src = tmp_path_factory.mktemp("src")
    for name, data in files.items():
        path = src / name
        if any(p.is_file() for p in [*path.parents]) or path.is_dir():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(gnu_tar(src, "pax")), "/src").snapshot
    out = tmp_path_factory.mktemp("out") / "t"
    restored(repo, snap, out)
    same_tree(src, out)


def test_owners_names_xattrs_devices_and_times_come_from_the_tar(new_repo):
    from chunkvault.store.xattrs import decode_xattrs
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        f = tarfile.TarInfo("data/file")
        f.size, f.uid, f.gid, f.uname, f.gname, f.mode = 2, 4321, 4322, "pgowner", "pggroup", 0o600
        f.pax_headers = {"SCHILY.xattr.user.k%3Dx": "v", "mtime": "1700000000.000000007"}
        t.addfile(f, io.BytesIO(b"hi"))
        d = tarfile.TarInfo("dev/null0")
        d.type, d.devmajor, d.devminor = tarfile.CHRTYPE, 1, 3
        t.addfile(d)
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(out.getvalue()), "/x").snapshot
    assert snap.stats["owners"]["users"]["4321"] == "pgowner"
    assert snap.stats["owners"]["groups"]["4322"] == "pggroup"
    by = {e.path: e for e in repo.tree(snap)}
    e = by[b"data/file"]
    assert (e.uid, e.gid, e.mode, e.mtime_ns) == (4321, 4322, 0o600, 1_700_000_000_000_000_007)
    assert decode_xattrs(e.xattrs) == {b"user.k=x": b"v"}
    assert by[b"dev/null0"].rdev == os.makedev(1, 3)
    assert by[b""].uid == 4321 and by[b"data"].mode == 0o755  # implied, after the first member below them


def test_dry_run_stores_nothing(new_repo, tree):
    repo = new_repo()
    result = repo.import_tar(io.BytesIO(gnu_tar(tree, "pax")), "/src", dry_run=True)
    assert result.snapshot.stats["added_raw_bytes"] > 3_000_000
    assert repo.snapshots() == []


def test_an_empty_archive_is_an_empty_tree_and_a_cut_compressed_one_saves_nothing(new_repo, tree):
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(bytes(10240)), "/empty").snapshot
    assert (snap.stats["files"], snap.stats["dirs"]) == (0, 1)
    data = gnu_tar(tree, "pax", "gz")
    with pytest.raises(IncompleteSource):
        repo.import_tar(io.BytesIO(data[: len(data) // 2]), "/src")
    assert [s.id for s in repo.snapshots()] == [snap.id]


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz", "zst"])
@pytest.mark.parametrize("cut", [1, 4, "half", "first block"])
def test_a_compressed_stream_cut_short_saves_nothing_wherever_it_breaks_off(new_repo, tree, tmp_path, compress,
                                                                            cut):
    """bzip2, xz and zstd streams cut short past the tar's end (their end marker and check missing) were
    taken as whole, and a bzip2 one cut within its first block was 'not a tar archive (empty file)', exit 2:
    tar -x fails on each ('Unexpected end of input')."""
    if cut == "first block":  # a tar small enough for one bzip2 block, cut before any of it comes out
        (tree := tmp_path / "small").mkdir()
        (tree / "f").write_bytes(b"small" * 100)
        cut = "half"
    if compress == "zst":  # as the zstd tool writes it: a checksum ends the frame
        import zstandard
        data = zstandard.ZstdCompressor(write_checksum=True).compress(gnu_tar(tree, "pax"))
    else:
        data = gnu_tar(tree, "pax", compress)
    data = data[: len(data) // 2 if cut == "half" else len(data) - cut]
    repo = new_repo()
    with pytest.raises(IncompleteSource, match="ends or breaks off"):
        repo.import_tar(io.BytesIO(data), "/src")
    assert repo.snapshots() == []


def test_a_zstd_stream_that_begins_with_a_skippable_frame_is_read(new_repo, tree, tmp_path):
    """pzstd (and zstd --format with seekable tables) begins with a skippable frame holding its frame sizes:
    such a tar.zst, which tar -x reads, was 'not a tar archive'."""
    import zstandard
    data = gnu_tar(tree, "pax")
    half = len(data) // 2
    frames = [zstandard.ZstdCompressor(write_checksum=True).compress(part) for part in (data[:half], data[half:])]
    table = b"".join(len(f).to_bytes(4, "little") for f in frames)
    skippable = (0x184D2A50).to_bytes(4, "little") + len(table).to_bytes(4, "little") + table
    repo = new_repo()
    snap = repo.import_tar(io.BytesIO(skippable + b"".join(frames)), "/src").snapshot
    same_tree(tree, restored(repo, snap, tmp_path / "out"))
    with pytest.raises(IncompleteSource):  # still told when cut short
        repo.import_tar(io.BytesIO(skippable + frames[0] + frames[1][:-2]), "/src")


@pytest.mark.parametrize("padding", [4, 4096])
def test_an_xz_file_with_stream_padding_is_read_as_xz_reads_it(new_repo, tree, tmp_path, padding):
    """xz lets zero bytes (a multiple of four) follow and separate its streams, as a tape's blocking leaves
    them: lzma.LZMAFile took them for a stream cut short, and the import saved nothing (exit 20) of a file
    that xz and GNU tar read."""
    import lzma
    data = gnu_tar(tree, "pax")
    half = len(data) // 2
    xz = [lzma.compress(part) for part in (data[:half], data[half:])]
    repo = new_repo()
    snap = repo.import_tar(Trickle(xz[0] + bytes(padding) + xz[1] + bytes(padding)), "/src").snapshot
    same_tree(tree, restored(repo, snap, tmp_path / "out"))
    with pytest.raises(IncompleteSource):  # still told when cut short
        repo.import_tar(io.BytesIO(xz[0] + bytes(padding) + xz[1][:-4]), "/src")


@pytest.mark.parametrize("where", ["between", "after"])
def test_xz_stream_padding_that_is_not_whole_words_is_damage(new_repo, tree, where):
    """The xz format pads streams by multiples of four bytes, and ``xz -t`` calls a file with 3 bytes
    of padding corrupt: the import said so too, not storing it as whole."""
    import lzma
    data = gnu_tar(tree, "pax")
    half = len(data) // 2
    xz = [lzma.compress(part) for part in (data[:half], data[half:])]
    damaged = xz[0] + bytes(3) + xz[1] if where == "between" else xz[0] + xz[1] + bytes(3)
    with pytest.raises(IncompleteSource, match="padding of 3 bytes"):
        new_repo().import_tar(Trickle(damaged), "/src")


class Trickle(io.RawIOBase):
    """A pipe whose writer is slow: each read gives at most a few bytes."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), 3, len(self.data) - self.at)
        b[:n] = self.data[self.at:self.at + n]
        self.at += n
        return n


@pytest.mark.parametrize("compress", ["bz2", "zst"])
def test_compression_is_told_from_a_stream_that_trickles(new_repo, tree, tmp_path, compress):
    repo = new_repo()
    snap = repo.import_tar(Trickle(gnu_tar(tree, "pax", compress)), "/src").snapshot
    same_tree(tree, restored(repo, snap, tmp_path / "out"))


def test_acl_records_are_left_out_with_a_warning(new_repo):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        f = tarfile.TarInfo("f")
        f.pax_headers = {"SCHILY.acl.access": "user::rw-,user:bob:r--,group::r--,mask::r--,other::---"}
        t.addfile(f, io.BytesIO())
    result = new_repo().import_tar(io.BytesIO(out.getvalue()), "/x")
    assert result.warnings == ["the tar's POSIX ACL records (SCHILY.acl.*) are not imported"]


def test_acl_records_beside_their_extended_attribute_are_imported_without_a_warning(new_repo):
    """GNU tar --xattrs --acls writes an ACL twice: as text (SCHILY.acl.access) and as the attribute
    (SCHILY.xattr.system.posix_acl_access), which is imported; the warning said it was not."""
    acl = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff" + b"\x04\x00\x04\x00\xff\xff\xff\xff"
           + b"\x20\x00\x04\x00\xff\xff\xff\xff")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        f = tarfile.TarInfo("f")
        f.pax_headers = {"SCHILY.acl.access": "user::rw-\ngroup::r--\nother::r--\n",
                         "SCHILY.xattr.system.posix_acl_access": acl.decode("utf-8", "surrogateescape")}
        t.addfile(f, io.BytesIO())
    repo = new_repo()
    result = repo.import_tar(io.BytesIO(out.getvalue()), "/x")
    assert result.warnings == []
    entry = next(e for e in repo.tree(result.snapshot.id) if e.path == b"f")
    assert decode_xattrs(entry.xattrs) == {b"system.posix_acl_access": acl}


@pytest.mark.parametrize("compress, damage", [("gz", "crc"), ("gz", "middle"), ("xz", "middle")])
def test_damaged_compressed_input_saves_nothing(new_repo, tree, compress, damage):
    """xz's damage was an internal error (LZMAError, exit 1), where the others' is the tar breaking off."""
    data = gnu_tar(tree, "pax", compress)
    if damage == "crc":  # every byte of the tar intact, the gzip trailer's CRC wrong
        data = data[:-8] + bytes(4) + data[-4:]
    else:  # the compressed data itself
        data = data[:5000] + bytes(x ^ 0xFF for x in data[5000:5200]) + data[5200:]
    repo = new_repo()
    with pytest.raises(IncompleteSource):
        repo.import_tar(io.BytesIO(data), "/src")
    assert repo.snapshots() == []


def test_a_gnu_incremental_dump_imports_as_tar_x_extracts_it(new_repo, tmp_path):
    """A GNU header's atime and ctime (``tar -g`` fills them) were read as a name prefix, and its dumpdir
    members (type D) were skipped: every path moved under a made-up directory, directories lost."""
    src = tmp_path / "src"
    (src / "priv" / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "priv" / "sub" / "secret").write_text("secret\n")
    os.chmod(src / "priv", 0o700)
    os.chmod(src / "empty", 0o711)
    snar = tmp_path / "snar"

    def dump() -> bytes:
        return subprocess.run(["tar", f"--listed-incremental={snar}", "-C", str(src), "-cf", "-", "."],
                              capture_output=True, check=True).stdout

    repo = new_repo()
    result = repo.import_tar(io.BytesIO(dump()), "/inc")
    assert result.warnings == []
    same_tree(src, restored(repo, result.snapshot, tmp_path / "out"), times=False)
    (src / "new").write_text("new\n")  # level 1: "secret" is listed in its directory, not held
    result = repo.import_tar(io.BytesIO(dump()), "/inc")
    assert len(result.warnings) == 1 and "lists 1 file(s) it does not hold" in result.warnings[0]
    by = {e.path: e for e in repo.tree(result.snapshot)}
    assert b"new" in by and b"priv/sub/secret" not in by and by[b"priv"].mode == 0o700


def test_hard_links_to_a_symlink_fifo_or_device_are_copies_of_it(new_repo, tmp_path):
    """``cp -al`` and rsnapshot trees hard-link their symlinks: tar records the second name as a hard link,
    which was left out.  Two names of one such node are two entries, as a backup records them."""
    from chunkvault.store.manifest import T_CHARDEV, T_FIFO, T_SYMLINK
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "file").write_text("data\n")
    os.symlink("file", src / "a" / "link")
    subprocess.run(["cp", "-al", str(src / "a"), str(src / "b")], check=True)
    repo = new_repo()
    result = repo.import_tar(io.BytesIO(gnu_tar(src)), "/hs")
    assert result.warnings == []
    same_tree(src, restored(repo, result.snapshot, tmp_path / "out"), times=False)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind in (("d/null", tarfile.CHRTYPE), ("d/fifo", tarfile.FIFOTYPE), ("d/sym", tarfile.SYMTYPE)):
            i = tarfile.TarInfo(name)
            i.type, i.devmajor, i.devminor, i.mode, i.uid, i.linkname = kind, 1, 3, 0o620, 7, "there"
            t.addfile(i)
            h = tarfile.TarInfo(name + "2")
            h.type, h.linkname = tarfile.LNKTYPE, name
            t.addfile(h)
    result = repo.import_tar(io.BytesIO(out.getvalue()), "/dev")
    assert result.warnings == []
    by = {e.path: e for e in repo.tree(result.snapshot)}
    assert (by[b"d/null2"].type, by[b"d/null2"].rdev, by[b"d/null2"].mode, by[b"d/null2"].uid) == \
        (T_CHARDEV, os.makedev(1, 3), 0o620, 7)
    assert by[b"d/fifo2"].type == T_FIFO and (by[b"d/sym2"].type, by[b"d/sym2"].target) == (T_SYMLINK, b"there")


def test_a_hard_link_to_nothing_or_a_directory_says_which(new_repo):
    t = TarTree()
    t.add(Entry(b"d", T_DIR, 0o700))
    t.add_link(b"x/l", b"x/none", "x/l", "./x/none")
    t.add_link(b"x/ld", b"d", "x/ld")
    t.add_link(b"ls", None, "ls", "top")
    assert t.warnings == ["hard link x/l names ./x/none, which is no member the tar lists before it: left out",
                          "hard link x/ld names d, a directory, which cannot be hard-linked: left out",
                          "hard link ls names top, which --strip-components removes: left out"]
    assert t.unreadable == ["x/l", "x/ld", "ls"]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("a/f"), io.BytesIO())
        h = tarfile.TarInfo("a/g")
        h.type, h.linkname = tarfile.LNKTYPE, "../a/f"
        tf.addfile(h)
    with pytest.raises(UsageError, match=r"tar member 'a/g' is a hard link to '\.\./a/f', which has a '\.\.'"):
        new_repo().import_tar(io.BytesIO(out.getvalue()), "/src")


def _refusal_of(cli, tmp_path, member: tarfile.TarInfo, fmt: int = tarfile.GNU_FORMAT) -> list[str]:
    """The lines import-tar says of a GNU (or ``fmt``) tar holding ``member`` alone, which it must refuse
    (exit 2)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        t.addfile(member, io.BytesIO(bytes(member.size)))
    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    return cli("import-tar", "-r", url, "--path", "/x", "-", input=out.getvalue(), check=2).stderr.decode().splitlines()


@pytest.mark.parametrize("field", ["uid", "gid", "devmajor"])
def test_an_id_beyond_32_bits_is_refused_naming_the_member(cli, tmp_path, field):
    """A pax header holds any uid; a snapshot 32 bits: this was an internal error (exit 1)."""
    i = tarfile.TarInfo("dir/member")
    if field == "devmajor":
        i.type = tarfile.CHRTYPE
    setattr(i, field, 2**40)
    assert _refusal_of(cli, tmp_path, i) == [
        f"chunkvault: tar member 'dir/member' has {field.replace('dev', 'device ')} 1099511627776, outside what "
        f"a snapshot holds (0 to {2**31 - 1 if field == 'devmajor' else 2**32 - 1}): refused"]


@pytest.mark.parametrize("field", ["devmajor", "devminor"])
def test_a_device_number_beyond_31_bits_is_refused_naming_the_member(cli, tmp_path, field):
    """A device number of 2**31 or more, within 32 bits, was an internal error (OverflowError, exit 1): the
    system makes a device of 31-bit numbers, and GNU tar refuses such a number too."""
    i = tarfile.TarInfo("dev/null2")
    i.type = tarfile.CHRTYPE
    setattr(i, field, 2**31)
    assert _refusal_of(cli, tmp_path, i) == [
        f"chunkvault: tar member 'dev/null2' has {field.replace('dev', 'device ')} 2147483648, outside what "
        "a snapshot holds (0 to 2147483647): refused"]


@pytest.mark.parametrize("mtime", ["inf", "-inf", "nan"])
def test_a_pax_time_that_is_no_number_is_refused_naming_the_member(cli, tmp_path, mtime):
    """tarfile reads a pax mtime as a float: "inf" or "nan" was an internal error (exit 1, OverflowError or
    ValueError); GNU tar calls such a header malformed."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        f = tarfile.TarInfo("data/file")
        f.size, f.pax_headers = 2, {"mtime": mtime}
        t.addfile(f, io.BytesIO(b"hi"))
    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    proc = cli("import-tar", "-r", url, "--path", "/x", "-", input=out.getvalue(), check=2)
    assert proc.stderr.decode().splitlines() == [
        f"chunkvault: tar member 'data/file' has modification time {mtime}, which is no time: refused"]


def test_a_member_name_that_is_not_utf8_is_shown_by_its_bytes_in_errors(cli, tmp_path):
    """Names in these errors went through repr(): a byte that is no UTF-8 showed as Python's '\\udcff', not as
    '\\xff', as every other message and listing shows it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as t:
        t.addfile(tarfile.TarInfo(os.fsdecode(b"a\xff/../x")), io.BytesIO())
    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    proc = cli("import-tar", "-r", url, "--path", "/x", "-", input=out.getvalue(), check=2)
    assert proc.stderr.decode().splitlines() == [
        "chunkvault: tar member 'a\\xff/../x' has a '..' component: refused (it leads out of the tree)"]


def test_a_member_of_a_type_tar_does_not_know_is_a_regular_file_as_tar_x_extracts_it(new_repo, tmp_path):
    """A member of a type no tar defines was left out without a word, where tar -x extracts it as a regular
    file (as POSIX says to); a GNU volume label is no file to either, and the rest of a file begun in another
    volume is left out with a warning, as tar -x refuses it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, kind in [("label", b"V"), ("reg", tarfile.REGTYPE), ("odd", b"Z"), ("rest", b"M")]:
            i = tarfile.TarInfo(name)
            i.type, i.size = kind, 5
            t.addfile(i, io.BytesIO(name.encode()[:1] * 5))
    repo = new_repo()
    result = repo.import_tar(io.BytesIO(out.getvalue()), "/x")
    assert result.warnings == ["odd: a tar member of unknown type 'Z': stored as a regular file, as tar -x extracts it",
                               "rest: a tar member continued from another volume (type 'M'), which tar -x refuses: "
                               "left out"]
    restored(repo, result.snapshot, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["odd", "reg"]
    assert (tmp_path / "out" / "odd").read_bytes() == b"ooooo"


def test_a_time_beyond_what_a_snapshot_holds_is_warned_of_as_a_backup_warns(new_repo):
    """A member's mtime before 1677 or after 2262 (a pax or GNU header holds any) was moved to the nearest
    end without a word, where a backup warns of each such file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, mtime in [("late", 2**40), ("early", -(2**40)), ("fine", 1_600_000_000)]:
            i = tarfile.TarInfo(name)
            i.mtime = mtime
            t.addfile(i, io.BytesIO())
    result = new_repo().import_tar(io.BytesIO(out.getvalue()), "/x")
    assert result.warnings == [
        f"modification time before 1677 or after 2262, stored as the nearest of those ends: {name}"
        for name in ("late", "early")]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_nul_in_a_pax_name_or_symlink_target_is_refused_naming_the_member(cli, tmp_path, kind):
    """A pax path or linkpath may hold a NUL (a ustar field ends at one): the snapshot saved of a name with
    one failed check, every restore and dump ("unsafe path"); of a symbolic link's target, each restore
    (an internal error, exit 1)."""
    i = tarfile.TarInfo("dir/member")
    if kind == "file":
        i.pax_headers = {"path": "dir/a\0b"}
        said = "tar member 'dir/a\\x00b' has a NUL byte"
    else:
        i.type, i.pax_headers = tarfile.SYMTYPE, {"linkpath": "to\0where"}
        said = "tar member 'dir/member' is a symbolic link to 'to\\x00where', which has a NUL byte"
    assert _refusal_of(cli, tmp_path, i, tarfile.PAX_FORMAT) == [
        f"chunkvault: {said}: refused (no file name or link holds one)"]


@pytest.mark.parametrize("name", ["", "user.a\0b", "user." + "n" * 251])
def test_an_extended_attribute_name_no_file_can_have_is_refused_naming_the_member(cli, tmp_path, new_repo, name):
    """A pax record can name an attribute with no byte, over 255 or with a NUL: the first two were internal
    errors (exit 1), the last saved, and each restore of it an internal error."""
    i = tarfile.TarInfo("dir/member")
    i.pax_headers = {"SCHILY.xattr." + name: "value"}
    shown = name.replace("\0", "\\x00")
    assert _refusal_of(cli, tmp_path, i, tarfile.PAX_FORMAT) == [
        f"chunkvault: tar member 'dir/member' has an extended attribute named '{shown}', which no file can have: "
        "refused"]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        i.pax_headers = {"SCHILY.xattr.user." + "n" * 250: "value"}  # 255 bytes: Linux's longest
        t.addfile(i)
    snap = new_repo().import_tar(io.BytesIO(out.getvalue()), "/x").snapshot
    assert snap is not None


def _global_header_refusal(cli, url: str, headers: dict[str, str]) -> list[str]:
    """What import-tar says, into a new repository at ``url``, of a pax tar of three empty members whose
    global header holds ``headers`` (every member's): a refusal (exit 2)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers=headers) as t:
        for n in range(3):
            t.addfile(tarfile.TarInfo(f"m{n}"))
    cli("init", "-r", url, "--kdf-time", "0")
    return cli("import-tar", "-r", url, "--path", "/x", "-", input=out.getvalue(), check=2).stderr.decode().splitlines()


def test_more_extended_attributes_than_a_file_can_hold_are_refused_before_any_member_is_stored(cli, tmp_path):
    """A global pax header is applied to every member: one of 100,000 attribute records, in a 90 KB tar.zst
    of 50 members, took 20 s to import, and each restore printed megabytes of warnings. A Linux file's
    attribute names fit in 64 KiB together (each with its NUL), a value in 64 KiB."""
    names = {f"SCHILY.xattr.user.{n:06}": "v" for n in range(6000)}  # 6,000 x 12 bytes: over 64 KiB of names
    url = str(tmp_path / "repo")
    assert _global_header_refusal(cli, url, names) == [
        "chunkvault: tar member 'm0' has 6000 extended attributes whose names take 72000 bytes, more than a file "
        "can hold (65536): refused"]
    i = tarfile.TarInfo("big")
    i.pax_headers = {"SCHILY.xattr.user.big": "v" * 65537}
    assert _refusal_of(cli, tmp_path / "again", i, tarfile.PAX_FORMAT) == [
        "chunkvault: tar member 'big' has an extended attribute 'user.big' of 65537 bytes, more than a file "
        "can hold (65536): refused"]
    i.pax_headers = {"SCHILY.xattr.user.big": "v" * 65536, **dict(list(names.items())[:5000])}  # the most
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(i)
    cli("import-tar", "-r", url, "--path", "/y", "-", input=out.getvalue())


def test_a_member_whose_extended_attributes_take_over_1_mib_together_is_refused(cli, tmp_path):
    """Linux bounds each value (64 KiB) and the names together, not the values together: a global pax header
    of 250 values of 65,000 bytes (16 MiB, a 22 KB tar.gz of 50 members) was every member's, and the import
    held 16 MiB a member to its end (889 MB for those 50, 1.7 GB for 100)."""
    values = {f"SCHILY.xattr.user.{n:02}": "v" * 65000 for n in range(17)}  # 17 x 65,007 bytes: over 1 MiB
    url = str(tmp_path / "repo")
    assert _global_header_refusal(cli, url, values) == [
        "chunkvault: tar member 'm0' has 17 extended attributes of 1105119 bytes together, more than an import "
        "keeps for one file (1048576): refused"]
    i = tarfile.TarInfo("most")  # 16 of them fit
    i.pax_headers = dict(list(values.items())[:16])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(i)
    cli("import-tar", "-r", url, "--path", "/y", "-", input=out.getvalue())


@pytest.mark.parametrize("key, value, said", [
    ("mtime", "abc", "modification time abc, which is no time"),
    ("mtime", "1.2.3", "modification time 1.2.3, which is no time"),
    ("uid", "abc", "uid abc, which is no number"),
    ("gid", "1x", "gid 1x, which is no number"),
    ("size", "two", "size two, which is no number"),
    ("size", "-2", "size -2, which is no size")])
def test_a_pax_number_that_is_no_number_is_refused_naming_the_member(cli, tmp_path, key, value, said):
    """tarfile reads such a record as 0: the member was saved as of 1970, owned by root, or empty (its data
    then read as the next header); GNU tar calls such a header malformed.  A size below 0 was taken too, the
    member's data then read as the next header (exit 20, "the tar breaks off")."""
    i = tarfile.TarInfo("dir/member")
    i.size, i.pax_headers = 2, {key: value}
    assert _refusal_of(cli, tmp_path, i, tarfile.PAX_FORMAT) == [
        f"chunkvault: tar member 'dir/member' has {said}: refused"]


def test_a_header_whose_checksum_fails_after_the_first_member_is_named_as_such(new_repo):
    """tarfile ends quietly at a block that is no header, as at the end blocks: the import said the tar
    ended without them ("cut short?"), of an archive whose damaged header had more members after it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in ("first", "second", "third"):
            i = tarfile.TarInfo(name)
            i.size = 3
            t.addfile(i, io.BytesIO(b"abc"))
    data = bytearray(out.getvalue())
    data[1024] ^= 1  # the name in the second header: its checksum no longer holds
    repo = new_repo()
    with pytest.raises(IncompleteSource, match=r"^the tar breaks off after member 1: the block that follows it is "
                       r"no tar header \(bad checksum\): no snapshot saved$") as err:
        repo.import_tar(io.BytesIO(bytes(data)), "/x")
    assert err.value.exit_code == 20
    assert repo.snapshots() == []


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_a_pax_header_or_long_name_too_large_to_hold_is_refused_not_read(new_repo, kind):
    """tarfile reads such a header whole, holding about three times its size: a .tar.zst of 33 KB (a pax
    header of 1 GiB of zeros) took 3 GB of memory to import."""
    import gzip

    from chunkvault.store.tarimport import HEADER_LIMIT

    big = tarfile.TarInfo("././@LongLink")
    big.type, big.size = kind, HEADER_LIMIT + 1
    member = tarfile.TarInfo("file")
    data = big.tobuf(tarfile.USTAR_FORMAT) + bytes(HEADER_LIMIT + 512) + member.tobuf(tarfile.USTAR_FORMAT)
    what = "pax extended header" if kind == tarfile.XHDTYPE else "GNU long name"
    with pytest.raises(UsageError, match=f"^the tar has a {what} of {HEADER_LIMIT + 1} bytes \\(at byte 0\\): "
                       "refused \\(no names or attributes need over 16 MiB; it is read into memory whole\\)$"):
        new_repo().import_tar(io.BytesIO(gzip.compress(data + bytes(1024), 1)), "/x")



@pytest.mark.parametrize("version", ["gnu", "0.1", "1.0"])
def test_a_sparse_map_too_long_to_hold_is_refused_not_read(new_repo, tmp_path, monkeypatch, version):
    """tarfile holds a sparse member's map as a list, about 200 bytes an extent: a 1.0 map of ten million
    extents, a .tar.zst of 3.5 KB, took 2 GB of memory and 23 s to import."""
    from chunkvault.store import tarimport

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sp", "wb") as f:
        for i in range(150):
            f.seek(i << 16)
            f.write(b"x")
        f.truncate(150 << 16)
    fmt = ["--format=gnu"] if version == "gnu" else ["--format=pax", f"--sparse-version={version}"]
    data = subprocess.run(["tar", *fmt, "-cSf", "-", "-C", str(src), "sp"], capture_output=True, check=True).stdout
    repo = new_repo()
    monkeypatch.setattr(tarimport, "SPARSE_LIMIT", 100, raising=False)
    count = "more" if version == "gnu" else "151"  # GNU tar ends a map with an empty extent; old GNU has no count
    with pytest.raises(UsageError, match=f"^tar member 'sp' has a sparse map of {count} extents: refused \\(over "
                       "100, each held in memory\\)$"):
        repo.import_tar(io.BytesIO(data), "/x")
    monkeypatch.setattr(tarimport, "SPARSE_LIMIT", 151)
    snap = repo.import_tar(io.BytesIO(data), "/x").snapshot
    assert restored(repo, snap, tmp_path / "out").joinpath("sp").read_bytes() == (src / "sp").read_bytes()
