"""restore --overwrite always|if-changed|if-newer|never: which entries an in-place restore replaces, what
it keeps (content and metadata), and what it reports."""
import json
import os
import shutil
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkvault.errors import TargetNotEmpty, UsageError
from chunkvault.store.manifest import T_DIR, T_FIFO, T_FILE, T_HARDLINK, T_SYMLINK
from chunkvault.store.overwrite import OVERWRITE_MODES, keeps_existing
from treeutil import describe

T0 = 1_700_000_000 * 10**9  # every entry of the snapshot is dated then
OLDER, NEWER, LATER = T0 - 10**12, T0 + 10**12, T0 + 5 * 10**12


def _date(path, ns, follow=True):
    os.utime(path, ns=(ns, ns), follow_symlinks=follow)


@pytest.fixture
def scene(tmp_path, new_repo):
    """A snapshot, and a target restored from it and then changed: a file deleted, files edited (older and
    newer than the snapshot's, one keeping its size and mtime), a file where the snapshot has a directory and
    the reverse, a symbolic link pointed elsewhere, a hard-link group with two of its three paths deleted, a
    directory deleted, and a directory's mode and time changed."""
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    (src / "gone").mkdir()
    (src / "was_dir").mkdir()
    for name in ("deleted", "newer", "older", "samemeta"):
        (src / "keep" / name).write_bytes(name.encode() * 1000)
    (src / "keep" / "deleted").chmod(0o640)
    (src / "gone" / "a").write_bytes(b"a" * 5000)
    (src / "was_dir" / "inner").write_bytes(b"inner")
    (src / "becomes_dir").write_bytes(b"a file")
    (src / "h1").write_bytes(b"linked content" * 100)
    os.link(src / "h1", src / "h2")
    os.link(src / "h1", src / "h3")
    os.symlink("keep/older", src / "link")
    os.mkfifo(src / "fifo")
    (src / "keep").chmod(0o750)
    for dirpath, dirnames, filenames in os.walk(src, topdown=False):
        for n in dirnames + filenames:
            _date(os.path.join(dirpath, n), T0, follow=False)
    _date(src, T0)
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    target = tmp_path / "target"
    repo.restore(snap, str(target))
    assert describe(target) == describe(src)

    os.remove(target / "keep" / "deleted")
    (target / "keep" / "older").write_bytes(b"edited long ago")
    _date(target / "keep" / "older", OLDER)
    (target / "keep" / "newer").write_bytes(b"edited since")
    _date(target / "keep" / "newer", NEWER)
    with open(target / "keep" / "samemeta", "r+b") as f:  # same size, same mtime, other content
        f.write(b"X")
    _date(target / "keep" / "samemeta", T0)
    os.remove(target / "becomes_dir")
    (target / "becomes_dir").mkdir()
    (target / "becomes_dir" / "mine").write_bytes(b"mine")
    shutil.rmtree(target / "was_dir")
    (target / "was_dir").write_bytes(b"now a file")
    os.remove(target / "link")
    os.symlink("elsewhere", target / "link")
    _date(target / "link", NEWER, follow=False)
    os.remove(target / "h2")
    os.remove(target / "h3")
    with open(target / "h1", "r+b") as f:
        f.write(b"LOCAL")
    _date(target / "h1", NEWER)
    shutil.rmtree(target / "gone")
    (target / "keep").chmod(0o700)
    _date(target / "keep", LATER)
    return repo, snap, src, target


def _check_kept_or_back(src, target, before, older_kept):
    """What never and if-newer leave: the missing entries back as the snapshot has them, the others as they
    were, metadata included."""
    want, got = describe(src), describe(target)
    for back in (b"keep/deleted", b"gone", b"gone/a"):
        assert got[back] == want[back]
    for kept in (b"keep/newer", b"keep/samemeta", b"becomes_dir", b"becomes_dir/mine", b"was_dir", b"link",
                 b"h1", b"fifo", b"keep"):
        assert got[kept] == before[kept], kept
    assert b"was_dir/inner" not in got
    assert got[b"keep/older"] == (before if older_kept else want)[b"keep/older"]
    # h2 and h3 hold the snapshot's content, linked to each other and not to h1, which the target kept
    assert got[b"h2"][4] == got[b"h3"][4] == want[b"h2"][4] != got[b"h1"][4]
    assert got[b"h2"][5] == got[b"h3"][5] == b"h2"
    assert os.stat(target / "h2").st_nlink == 2
    assert got[b"h2"][2] == T0 and got[b"h2"][1] == want[b"h2"][1]


def test_never_writes_only_what_the_target_lacks_and_needs_no_force(scene):
    repo, snap, src, target = scene
    before = describe(target)
    result = repo.restore(snap, str(target), overwrite="never")
    assert result.skipped_existing == 8  # becomes_dir, fifo, h1, link, keep/{newer,older,samemeta}, was_dir
    assert result.files == 3 and result.links == 1  # keep/deleted, gone/a, h2 (its data); h3 linked to h2
    assert result.bytes == os.path.getsize(src / "keep" / "deleted") + 5000 + os.path.getsize(src / "h2")
    _check_kept_or_back(src, target, before, older_kept=True)
    assert any("was_dir" in w and "nothing below it restored" in w for w in result.warnings)


def test_never_reads_only_the_data_it_writes_and_keeps_the_root_s_times(scene, monkeypatch):
    from chunkvault.store.repository import Repo

    repo, snap, src, target = scene
    root = os.stat(target)
    read = set()
    real_one, real_many = Repo.read_blob, Repo.read_blobs
    monkeypatch.setattr(Repo, "read_blob", lambda self, c, **kw: read.add(c) or real_one(self, c, **kw))
    monkeypatch.setattr(Repo, "read_blobs", lambda self, ids: read.update(ids) or real_many(self, ids))
    repo.restore(snap, str(target), overwrite="never")
    chunks = {e.path.decode(): set(e.chunk_ids()) for e in repo.tree(snap) if e.type == T_FILE}
    assert chunks["keep/deleted"] | chunks["gone/a"] | chunks["h1"] <= read  # h1's data: h2 is written with it
    for kept in ("keep/newer", "keep/older", "keep/samemeta", "becomes_dir", "was_dir/inner"):
        assert not chunks[kept] & read, kept
    assert os.stat(target).st_mtime_ns == root.st_mtime_ns  # gone/ was made in it


def test_if_newer_with_delete_removes_what_the_snapshot_lacks(scene):
    repo, snap, src, target = scene
    (target / "extra").write_bytes(b"x")
    result = repo.restore(snap, str(target), force=True, overwrite="if-newer", delete=True)
    assert result.deleted == 1 and not (target / "extra").exists()
    assert (target / "keep" / "newer").read_bytes() == b"edited since"
    # The directory kept where the snapshot has a file is kept whole: --delete used to empty it.
    assert (target / "becomes_dir" / "mine").read_bytes() == b"mine"
    assert any("becomes_dir: the target has a directory where the snapshot has a file; kept as it is, with all "
               "it holds" in w for w in result.warnings), result.warnings


def test_if_newer_replaces_what_the_snapshot_has_newer(scene):
    repo, snap, src, target = scene
    before = describe(target)
    result = repo.restore(snap, str(target), force=True, overwrite="if-newer")
    assert result.skipped_existing == 7  # as never, but for keep/older, older than the snapshot's
    _check_kept_or_back(src, target, before, older_kept=False)


@pytest.mark.parametrize("mode", ["if-newer", "never"])
def test_an_entry_of_another_type_kept_is_named_whatever_the_types(scene, mode):
    """A symbolic link (or a FIFO) kept where the snapshot has a file was kept without a word, where a
    directory in a file's place, and the reverse, were each named: the restore said nothing of a file it
    did not bring back."""
    repo, snap, src, target = scene
    os.remove(target / "keep" / "older")
    os.symlink("elsewhere", target / "keep" / "older")
    os.remove(target / "fifo")
    (target / "fifo").write_bytes(b"a file now")
    before = describe(target)
    result = repo.restore(snap, str(target), force=mode != "never", overwrite=mode)
    assert describe(target)[b"keep/older"] == before[b"keep/older"]
    assert describe(target)[b"fifo"] == before[b"fifo"]
    assert any(w == "keep/older: the target has a symbolic link where the snapshot has a file; kept as it is"
               for w in result.warnings), result.warnings
    assert any(w == "fifo: the target has a file where the snapshot has a FIFO; kept as it is"
               for w in result.warnings), result.warnings


def test_if_newer_needs_force(scene):
    repo, snap, src, target = scene
    with pytest.raises(TargetNotEmpty):
        repo.restore(snap, str(target), overwrite="if-newer")


@pytest.mark.parametrize("how", [{"overwrite": "always"}, {"overwrite": "always", "delta": True}])
def test_always_replaces_everything(scene, how):
    repo, snap, src, target = scene
    result = repo.restore(snap, str(target), force=True, **how)
    assert result.skipped_existing == 0
    assert describe(target) == describe(src)


def test_if_changed_takes_a_file_of_the_snapshot_s_size_and_mtime_as_right(scene):
    repo, snap, src, target = scene
    result = repo.restore(snap, str(target), force=True, overwrite="if-changed")
    want, got = describe(src), describe(target)
    assert got.pop(b"keep/samemeta") != want.pop(b"keep/samemeta")  # not read: restic's if-changed
    assert got == want
    assert result.skipped_existing == 0 and result.unchanged_files >= 1
    repo.restore(snap, str(target), force=True, delta=True)  # --delta reads it
    assert describe(target) == describe(src)


def test_a_kept_entry_keeps_its_owner_and_extended_attributes(scene):
    repo, snap, src, target = scene
    kept = target / "keep" / "newer"
    try:
        os.setxattr(kept, "user.mine", b"1")
    except OSError:
        pytest.skip("no user extended attributes here")
    owned = os.geteuid() == 0
    if owned:
        os.chown(kept, 4321, 4321)
    repo.restore(snap, str(target), overwrite="never")
    assert os.getxattr(kept, "user.mine") == b"1"
    if owned:
        assert (os.stat(kept).st_uid, os.stat(kept).st_gid) == (4321, 4321)
        repo.restore(snap, str(target), force=True)  # always: the snapshot's owner back
        assert os.stat(kept).st_uid == os.stat(src / "keep" / "newer").st_uid


def test_never_with_the_first_path_of_a_link_group_missing(scene):
    repo, snap, src, target = scene
    os.remove(target / "h1")
    (target / "h2").write_bytes(b"mine")
    repo.restore(snap, str(target), overwrite="never")
    assert (target / "h2").read_bytes() == b"mine"
    assert (target / "h1").read_bytes() == (src / "h1").read_bytes()
    assert os.path.samefile(target / "h1", target / "h3")


def test_never_keeps_a_read_only_directory_read_only(scene):
    repo, snap, src, target = scene
    (target / "keep").chmod(0o555)
    repo.restore(snap, str(target), overwrite="never")
    assert (target / "keep" / "deleted").read_bytes() == (src / "keep" / "deleted").read_bytes()
    st_keep = os.stat(target / "keep")
    assert stat.S_IMODE(st_keep.st_mode) == 0o555 and st_keep.st_mtime_ns == LATER


@pytest.mark.parametrize("kwargs, says", [
    ({"overwrite": "sometimes"}, "overwrite is one of always, if-changed, if-newer, never"),
    ({"overwrite": None}, "overwrite is one of"),
    ({"overwrite": "never", "delete": True}, "delete would remove"),
    ({"overwrite": "never", "verify": True}, "verify"),
    ({"overwrite": "if-newer", "verify": True, "force": True}, "verify"),
])
def test_bad_overwrite_values_are_usage_errors(scene, kwargs, says):
    repo, snap, src, target = scene
    before = describe(target)
    with pytest.raises(UsageError, match=says):
        repo.restore(snap, str(target), **kwargs)
    assert describe(target) == before


def test_the_command_line(scene, cli, tmp_path):
    repo, snap, src, target = scene
    r = str(tmp_path / "repo")
    base = ("restore", "-r", r, snap.id, "--target", str(target))
    before = describe(target)
    err = cli(*base, "--overwrite", "if-newer", check=16).stderr.decode()
    assert "--confirm RESTORE" in err
    closed = cli(*base, "--overwrite", "if-newer", check=16, wrap=("sh", "-c", '"$@" <&-', "sh"))  # stdin closed
    assert closed.stderr.decode() == err
    for bad in (["--overwrite", "sometimes"], ["--overwrite", "never", "--delete"],
                ["--overwrite", "never", "--verify"], ["--overwrite", "never", "--confirm", "yes"]):
        proc = cli(*base, *bad, check=2)
        assert len(proc.stderr.decode().strip().splitlines()) == 1 and b"Traceback" not in proc.stderr
    assert describe(target) == before
    out = json.loads(cli(*base, "--overwrite", "never", "--json").stdout)
    assert out["skipped_existing"] == 8 and out["files"] == 3
    _check_kept_or_back(src, target, before, older_kept=True)
    line = cli(*base, "--overwrite", "never").stdout.decode()
    assert "existing entries kept" in line and "0 files" in line
    out = json.loads(cli(*base, "--overwrite", "always", "--confirm", "RESTORE", "--json").stdout)
    assert out["skipped_existing"] == 0
    assert describe(target) == describe(src)


def test_restore_from_an_export_file_keeps_what_the_target_has(scene, cli, tmp_path, password):
    repo, snap, src, target = scene
    export = tmp_path / "snap.backup"
    env = {"CHUNKVAULT_EXPORT_PASSWORD": password}
    cli("export", snap.id, "-r", str(tmp_path / "repo"), "--output", str(export), "--kdf-time", "0", env=env)
    before = describe(target)
    base = ("restore", "--from-file", str(export), "--target", str(target))
    cli(*base, "--overwrite", "if-changed", "--confirm", "RESTORE", env=env, check=2)
    out = json.loads(cli(*base, "--overwrite", "never", "--json", env=env).stdout)
    assert out["skipped_existing"] == 8
    _check_kept_or_back(src, target, before, older_kept=True)


_TYPES = [T_FILE, T_HARDLINK, T_DIR, T_SYMLINK, T_FIFO]
_MODES = [stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO]


@given(st.sampled_from(OVERWRITE_MODES), st.sampled_from(_TYPES), st.integers(0, 10), st.sampled_from(_MODES),
       st.integers(0, 10))
def test_what_each_mode_keeps(mode, etype, emtime, st_mode, st_mtime):
    kept = keeps_existing(mode, etype, emtime, st_mode, st_mtime)
    same_type = {T_FILE: stat.S_IFREG, T_HARDLINK: stat.S_IFREG, T_DIR: stat.S_IFDIR, T_SYMLINK: stat.S_IFLNK,
                 T_FIFO: stat.S_IFIFO}[etype] == st_mode
    if mode in ("always", "if-changed"):
        assert not kept
    elif mode == "never":
        assert kept
    else:
        assert kept == (not same_type or emtime <= st_mtime)
