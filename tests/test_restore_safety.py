"""Restores that keep what they must: hard links a selection splits, files linked elsewhere, data the
snapshot could not read, ancestors' metadata; and a target that refuses writes or runs out of space is
reported entry by entry, with no file left half-written under its name.

Permissions are enforced on root by dropping its DAC capabilities (``setpriv``); a full or read-only file
system is a small tmpfs.  Tests that need either are skipped where they are not allowed.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from chunkvault.errors import CorruptObject, MissingObject, StorageFull, TargetUnwritable, UsageError
from chunkvault.store.manifest import entry_record
from chunkvault.store.repository import Repo
from chunkvault.store.restore import RestoreResult
from treeutil import backed_up, describe, mounted_tmpfs

PASSWORD = "correct horse battery staple"
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _cli(*args: str, ok: tuple[int, ...] = (0,), unprivileged: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    cmd = [*(UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "chunkvault.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in ok, f"exit {proc.returncode}: {proc.stderr}"
    return proc


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def unprivileged():
    """Root without the capabilities that bypass file permissions, for the commands a test runs."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    if subprocess.run([*UNPRIVILEGED, "true"]).returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of small tmpfs mounts (size in KiB), unmounted afterwards; with ``bind``, a bind mount of
    that directory instead (the same file system as around it)."""
    mounted: list[Path] = []

    def mount(name: str, kib: int = 0, *, bind: Path | None = None) -> Path:
        where = tmp_path / name
        where.mkdir()
        how = ["--bind", str(bind)] if bind is not None else ["-t", "tmpfs", "-o", f"size={kib}k", "tmpfs"]
        if subprocess.run(["mount", *how, str(where)], capture_output=True).returncode != 0:
            pytest.skip("cannot mount here")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# --- hard links a selection splits --------------------------------------------------------------------

def _linked_tree(src: Path) -> None:
    (src / "a").mkdir()
    (src / "b").mkdir()
    (src / "c").mkdir()
    # several chunks, whatever the key: written in parts by workers (a repeated word was cut nowhere, one chunk)
    (src / "a" / "file").write_bytes(random.Random(8).randbytes(3 << 20))
    os.link(src / "a" / "file", src / "b" / "link")
    os.link(src / "a" / "file", src / "b" / "link2")
    (src / "c" / "other").write_bytes(b"other")


def _check_links(out: Path, src: Path) -> None:
    data = (src / "a" / "file").read_bytes()
    assert (out / "b" / "link").read_bytes() == data
    assert os.stat(out / "b" / "link").st_ino == os.stat(out / "b" / "link2").st_ino
    assert os.stat(out / "b" / "link").st_nlink == 2
    assert os.stat(out / "b" / "link").st_mtime_ns == os.stat(src / "a" / "file").st_mtime_ns
    assert not (out / "a" / "file").exists()


@pytest.mark.parametrize("selection", [{"includes": ["b/*"]}, {"excludes": ["a"]}], ids=["include", "exclude"])
def test_a_selection_without_a_hard_links_first_path_restores_the_other_links(tmp_path, new_repo, selection):
    repo, _, src = backed_up(tmp_path, new_repo, _linked_tree)
    result = repo.restore("latest", str(tmp_path / "out"), processes=1, verify=True, **selection)
    _check_links(tmp_path / "out", src)
    assert not any("hard link" in w for w in result.warnings), result.warnings
    assert result.links == 1


@pytest.mark.parametrize("also", [False, True], ids=["other files", "a file the snapshot has too"])
def test_a_restore_with_delete_into_a_link_to_a_full_directory_deletes_nothing_without_force(tmp_path, new_repo,
                                                                                           also):
    """The target named by a symbolic link to a directory that holds files: refused before anything is
    deleted (it deleted the directory's files, or deleted and then refused)."""
    from chunkvault.errors import TargetNotEmpty

    repo, _, src = backed_up(tmp_path, new_repo, _files)
    data = tmp_path / "data"
    data.mkdir()
    (data / "precious").write_bytes(b"keep me")
    if also:
        shutil.copy(src / sorted(os.listdir(src))[0], data)
    before = describe(data)
    os.symlink(data, tmp_path / "link")
    with pytest.raises(TargetNotEmpty):
        repo.restore("latest", str(tmp_path / "link"), delete=True)
    assert describe(data) == before


def test_a_restore_never_deletes_or_writes_into_what_it_reads_from(tmp_path, new_repo, cli):
    """A restore with --delete into a directory holding its repository deleted the repository, pack by pack
    as it read them (and then failed on a missing pack); one from a `.backup` file deleted the file."""
    from chunkvault.errors import UsageError

    repo, url, src = backed_up(tmp_path, new_repo, _files)
    before = describe(tmp_path / "repo")
    for target, delete in ((tmp_path, True), (tmp_path / "repo", False), (tmp_path / "repo" / "data", False)):
        with pytest.raises(UsageError, match="restore target"):
            repo.restore("latest", str(target), force=True, delete=delete)
    with pytest.raises(UsageError, match="restore target"):  # through another name of the same directory
        os.symlink(tmp_path, tmp_path / "link")
        repo.restore("latest", str(tmp_path / "link"), force=True, delete=True)
    assert describe(tmp_path / "repo") == before
    repo.restore("latest", str(tmp_path / "beside"), delete=True)  # beside the repository: as ever
    assert repo.check(read_data=True).ok
    backup = tmp_path / "out" / "x.backup"
    backup.parent.mkdir()
    repo.export("latest", str(backup), "export pw", kdf_seconds=0)
    said = cli("restore", "--from-file", str(backup), "--target", str(tmp_path / "out"), "--delete", "--confirm",
               "RESTORE", env={"CHUNKVAULT_EXPORT_PASSWORD": "export pw"}, check=2).stderr.decode()
    assert said.startswith(f"chunkvault: the .backup file {backup} lies inside the restore target")
    assert backup.is_file()


def test_worker_processes_restore_the_other_links_too(tmp_path, new_repo):
    repo, url, src = backed_up(tmp_path, new_repo, _linked_tree)
    assert len(repo.find_entry("latest", "a/file").chunk_ids()) > 1
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import json
        import chunkvault.store.restore_workers as workers
        from chunkvault import Repository
        workers.STRIPE_BYTES = 64 << 10
        workers.SPLIT_SHARE = 1 << 40  # every file over a stripe in parts
        repo = Repository.open({url!r}, {PASSWORD!r}, ledger=False)
        r = repo.restore("latest", {str(out)!r}, includes=["b/*"], processes=2)
        print(json.dumps({{"processes": r.processes, "warnings": r.warnings}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"processes": 2, "warnings": []}
    _check_links(out, src)


def test_a_restore_from_an_export_file_restores_the_other_links(tmp_path, new_repo):
    from chunkvault.store.export import restore_from_file

    repo, _, src = backed_up(tmp_path, new_repo, _linked_tree)
    repo.export("latest", str(tmp_path / "x.backup"), PASSWORD, kdf_seconds=0)
    restore_from_file(str(tmp_path / "x.backup"), PASSWORD.encode(), str(tmp_path / "out"), includes=["b/*"])
    _check_links(tmp_path / "out", src)


# --- --delta never writes through a hard link -----------------------------------------------------------

def test_delta_replaces_a_file_with_other_links_and_leaves_them_alone(tmp_path, new_repo):
    def make(src: Path) -> None:
        (src / "f").write_bytes(b"SNAPSHOT")
        (src / "a").write_bytes(b"AAAA")
        (src / "b").write_bytes(b"BBBB")
    repo, _, src = backed_up(tmp_path, new_repo, make)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "important").write_bytes(b"OUTSIDE-DATA")
    os.chmod(outside / "important", 0o640)
    os.utime(outside / "important", ns=(10**18, 10**18))
    target = tmp_path / "target"
    target.mkdir()
    os.link(outside / "important", target / "f")
    (target / "a").write_bytes(b"old")
    os.link(target / "a", target / "b")
    repo.restore("latest", str(target), force=True, delta=True, verify=True)
    st = os.stat(outside / "important")
    assert (outside / "important").read_bytes() == b"OUTSIDE-DATA"
    assert (st.st_mode & 0o7777, st.st_mtime_ns, st.st_nlink) == (0o640, 10**18, 1)
    assert describe(target) == describe(src)  # each with its own content, no link between a and b
    assert sorted(os.listdir(target)) == ["a", "b", "f"]  # nothing left beside them


def test_delta_replaces_a_file_with_other_links_whose_mtime_alone_differs(tmp_path, new_repo):
    """Its content is the snapshot's, its mtime is not: it is written anew with the snapshot's (the other
    link keeps its own), as a file of one link gets its times set."""
    def make(src: Path) -> None:
        (src / "a").write_bytes(b"content")
        os.utime(src / "a", ns=(10**18, 10**18))
    repo, _, src = backed_up(tmp_path, new_repo, make)
    target = tmp_path / "target"
    repo.restore("latest", str(target))
    os.link(target / "a", tmp_path / "elsewhere")
    os.utime(target / "a", ns=(2 * 10**18, 2 * 10**18))
    repo.restore("latest", str(target), force=True, delta=True)
    assert os.stat(target / "a").st_mtime_ns == 10**18 and describe(target) == describe(src)
    assert os.stat(tmp_path / "elsewhere").st_mtime_ns == 2 * 10**18


def test_an_in_place_restore_whose_file_data_is_damaged_leaves_its_other_links_as_they_were(tmp_path, new_repo):
    """The file could not be restored, so its hard link was made a link to the target's old file there: the
    old content of the link's own path was lost, and it counted as restored."""
    import random

    def make(src: Path) -> None:
        (src / "a").write_bytes(random.Random(3).randbytes(300_000))
        os.link(src / "a", src / "b")
    repo, url, _ = backed_up(tmp_path, new_repo, make)
    pack = max((p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[150_000] ^= 0xFF
    pack.write_bytes(bytes(data))
    target = tmp_path / "target"
    target.mkdir()
    (target / "a").write_bytes(b"OLD-A")
    (target / "b").write_bytes(b"OLD-B")
    with pytest.raises(CorruptObject, match=r"2 file\(s\) not restored: a, b"):
        repo.restore("latest", str(target), force=True)
    assert (target / "a").read_bytes() == b"OLD-A" and (target / "b").read_bytes() == b"OLD-B"
    assert os.stat(target / "a").st_ino != os.stat(target / "b").st_ino


def test_a_restore_with_delete_of_a_selection_deletes_nothing_the_selection_leaves_out(tmp_path, new_repo):
    """``--include keep --delete`` removes what the snapshot lacks inside the selection, never the rest of the
    target (a directory the snapshot has too, but the selection does not take)."""
    def make(src: Path) -> None:
        (src / "keep").mkdir()
        (src / "keep" / "a").write_bytes(b"1")
        (src / "other").mkdir()
        (src / "other" / "b").write_bytes(b"2")
    repo, _, _ = backed_up(tmp_path, new_repo, make)
    target = tmp_path / "target"
    (target / "other").mkdir(parents=True)
    (target / "other" / "notes.txt").write_bytes(b"precious")
    (target / "keep").mkdir()
    (target / "keep" / "extra").write_bytes(b"gone")
    repo.restore("latest", str(target), force=True, delete=True, includes=["keep"])
    assert (target / "other" / "notes.txt").read_bytes() == b"precious"
    assert sorted(os.listdir(target / "keep")) == ["a"]


def test_delta_over_a_file_with_other_links_reads_only_the_chunks_it_lacks(tmp_path, new_repo):
    """The replacement copies the chunks the old file holds at their offsets: only the changed ones come
    from the repository; a file right already, metadata and all, keeps its inode and its links."""
    data = os.urandom(6 << 20)

    def make(src: Path) -> None:
        (src / "big").write_bytes(data)
        (src / "same").write_bytes(b"same content")
        os.chmod(src / "same", 0o600)
    repo, _, src = backed_up(tmp_path, new_repo, make)
    target = tmp_path / "target"
    shutil.copytree(src, target)
    with open(target / "big", "r+b") as f:
        f.seek(3 << 20)
        f.write(b"X" * 100)
    os.link(target / "big", tmp_path / "other-link")
    os.link(target / "same", tmp_path / "same-link")
    before = os.stat(target / "same").st_ino
    result = repo.restore("latest", str(target), force=True, delta=True, verify=True)
    assert (target / "big").read_bytes() == data and (tmp_path / "other-link").read_bytes()[3 << 20:][:100] == b"X" * 100
    assert 0 < result.rewritten_bytes < 3 << 20  # the chunk with the change, not the whole file
    assert os.stat(target / "same").st_ino == before and os.stat(target / "same").st_nlink == 2
    assert result.unchanged_files == 1


def test_delta_writes_a_file_more_open_than_the_snapshot_anew(tmp_path, new_repo):
    """Written into in place, a 0600 secret went to whoever had the target's 0644 file open, and stayed
    theirs after its mode was set; so it did to a user an access ACL let read it."""
    import struct

    def make(src: Path) -> None:
        for name in ("secret", "acl", "same"):
            (src / name).write_bytes(b"TOP SECRET " + name.encode())
            os.chmod(src / name, 0o600)
    repo, _, src = backed_up(tmp_path, new_repo, make)
    target = tmp_path / "target"
    target.mkdir()
    for name in ("secret", "acl"):
        (target / name).write_bytes(b"old public content")
    os.chmod(target / "secret", 0o644)
    os.chmod(target / "acl", 0o600)
    grant = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
        (0x01, 6, 0xFFFFFFFF), (0x02, 4, 4321), (0x04, 0, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
    try:
        os.setxattr(target / "acl", "system.posix_acl_access", grant)
    except OSError:
        acl_kept = False
    else:
        acl_kept = True
    (target / "same").write_bytes(b"TOP SECRET same")
    os.chmod(target / "same", 0o644)
    same = os.stat(target / "same").st_ino
    with open(target / "secret", "rb") as secret, open(target / "acl", "rb") as acl:
        repo.restore("latest", str(target), force=True, delta=True, verify=True)
        assert secret.read() == b"old public content"
        assert acl.read() == b"old public content" or not acl_kept
    assert describe(target) == describe(src)
    assert os.stat(target / "same").st_ino == same  # its content already there: only its mode set
    assert sorted(os.listdir(target)) == ["acl", "same", "secret"]


def test_delta_updates_a_read_only_file_as_a_plain_restore_does(tmp_path, unprivileged):
    """Reopened for writing, a 0444 file of the restoring user failed (not written, exit 14)."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"v1")
    os.chmod(src / "file", 0o444)
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / "target"
    _cli("restore", "-r", repo, "latest", "--target", str(target), unprivileged=True)
    os.chmod(src / "file", 0o644)
    (src / "file").write_bytes(b"v2, longer")
    os.chmod(src / "file", 0o444)
    _cli("backup", "-r", repo, str(src))
    _cli("restore", "-r", repo, "latest", "--target", str(target), "--delta", "--confirm", "RESTORE",
         unprivileged=True)
    assert (target / "file").read_bytes() == b"v2, longer"
    assert os.stat(target / "file").st_mode & 0o777 == 0o444
    assert os.listdir(target) == ["file"]


# --- in place, what was unreadable at backup time stays --------------------------------------------------

def test_in_place_restore_keeps_what_was_unreadable_at_backup_time(tmp_path, unprivileged):
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "lockeddir").mkdir(parents=True)
    (src / "secret").write_bytes(b"important")
    (src / "lockeddir" / "inner").write_bytes(b"inner")
    (src / "plain").write_bytes(b"plain")
    os.chmod(src / "secret", 0)
    os.chmod(src / "lockeddir", 0)
    try:
        _cli("backup", "-r", repo, str(src), ok=(3,), unprivileged=True)
    finally:
        os.chmod(src / "secret", 0o600)
        os.chmod(src / "lockeddir", 0o700)
    for extra in ([], ["--delta", "--delete"]):
        live = tmp_path / f"live{len(extra)}"
        shutil.copytree(src, live, symlinks=True)
        (live / "plain").write_bytes(b"changed")
        proc = _cli("restore", "-r", repo, "latest", "--target", str(live), "--confirm", "RESTORE", *extra)
        assert (live / "secret").read_bytes() == b"important", extra
        assert (live / "lockeddir" / "inner").read_bytes() == b"inner", extra
        assert (live / "plain").read_bytes() == b"plain", extra
        assert "secret was unreadable at backup time: what the target holds there was left as it is" in proc.stderr
    fresh = tmp_path / "fresh"
    proc = _cli("restore", "-r", repo, "latest", "--target", str(fresh))
    assert not (fresh / "secret").exists()  # an empty stand-in with its time passed for its content
    assert "secret was unreadable at backup time: not restored (no backup read its data)" in proc.stderr
    assert "lockeddir could not be listed at backup time: restored with what an earlier backup found in it" \
        in proc.stderr and not os.listdir(fresh / "lockeddir")


# --- entries the target does not take -----------------------------------------------------------------

def test_a_path_longer_than_the_system_takes_is_restored_below_a_deep_target(tmp_path, new_repo):
    """Each directory is reached from its parent's descriptor (store/target_dirs.py), never by its whole
    path: a tree whose paths grow past PATH_MAX below a deep target restores whole (it had been refused:
    "File name too long")."""
    src = tmp_path / "src"
    deep = src
    while len(os.fsencode(deep)) < 3700:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    (deep / "deep").write_bytes(b"deep")
    (src / "zzz_after").write_bytes(b"after")
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / ("t" * 250) / ("u" * 250)
    _cli("restore", "-r", repo, "latest", "--target", str(target))
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in deep.relative_to(src).parts:
            next_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        with open(os.open("deep", os.O_RDONLY, dir_fd=fd), "rb") as f:
            assert f.read() == b"deep"
    finally:
        os.close(fd)
    assert (target / "zzz_after").read_bytes() == b"after"
    _cli("restore", "-r", repo, "latest", "--target", str(target), "--delta", "--confirm", "RESTORE")  # in place


def test_a_read_only_directory_in_place_is_reported_and_the_rest_restored(tmp_path, unprivileged):
    """Another user's, theirs in the snapshot too: one of this user's own is opened up to be written in (the test
    below); one the snapshot gives another owner is taken by a restore as root (``_take``)."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "rodir").mkdir(parents=True)
    (src / "rodir" / "f").write_bytes(b"snapshot")
    (src / "zzz_after").write_bytes(b"after")
    os.chown(src / "rodir", 65534, 65534)
    os.chmod(src / "rodir", 0o555)
    try:
        _cli("backup", "-r", repo, str(src))
        live = tmp_path / "live"
        shutil.copytree(src, live, symlinks=True)
    finally:
        os.chmod(src / "rodir", 0o755)
    (live / "zzz_after").write_bytes(b"changed")
    os.chown(live / "rodir", 65534, 65534)
    try:
        proc = _cli("restore", "-r", repo, "latest", "--target", str(live), "--confirm", "RESTORE", ok=(14,),
                    unprivileged=True)
    finally:
        os.chmod(live / "rodir", 0o755)
    line = _one_line(proc)
    assert "1 entry could not be written: rodir/f (Permission denied)" in line
    assert (live / "zzz_after").read_bytes() == b"after"
    assert (live / "rodir" / "f").read_bytes() == b"snapshot"  # never removed: it could not be replaced


def test_a_read_only_file_system_is_one_line_and_the_same_exit_code_for_a_new_or_an_empty_target(tmp_path, tmpfs):
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f")
    _cli("backup", "-r", repo, str(src))
    ro = tmpfs("ro", 1024)
    (ro / "empty").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount read-only here")
    for target in (ro / "empty", ro / "new"):
        line = _one_line(_cli("restore", "-r", repo, "latest", "--target", str(target), ok=(14,)))
        assert "Read-only file system" in line, line
    assert line.startswith("chunkvault: cannot restore into ")  # the new target: it could not be made
    line = _one_line(_cli("restore", "-r", repo, "latest", "--target", str(ro / "empty"), ok=(14,)))
    assert line.endswith("(nothing was restored)"), line


# --- a full target ------------------------------------------------------------------------------------

def _files(src: Path) -> None:
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(300_000))


def _small_files(src: Path) -> None:
    """Files of one chunk each: written a run at a time."""
    for i in range(100):
        (src / f"f{i:03}").write_bytes(os.urandom(30_000))


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize("make", [_files, _small_files])
def test_a_full_target_leaves_no_file_half_written(tmp_path, new_repo, tmpfs, processes, make):
    _, url, src = backed_up(tmp_path, new_repo, make)
    target = tmpfs("small", 1024) / "r"
    line = _one_line(_cli("restore", "-r", url, "latest", "--target", str(target), "--processes", processes,
                          ok=(14,)))
    assert "no space left on the restore target while writing f" in line
    named = line.split("while writing ")[1].split(" ")[0]
    assert not (target / named).exists()
    left = [p for p in target.iterdir()]
    assert left, "some files fit"
    for p in left:  # every file there is whole
        assert p.read_bytes() == (src / p.name).read_bytes(), p.name


def test_a_full_target_leaves_no_file_written_in_parts_by_workers(tmp_path, new_repo, tmpfs):
    _, url, src = backed_up(tmp_path, new_repo, _files)
    target = tmpfs("small", 1024) / "r"
    script = textwrap.dedent(f"""
        import json
        import chunkvault.store.restore_workers as workers
        from chunkvault import Repository
        from chunkvault.errors import StorageFull
        workers.STRIPE_BYTES = 64 << 10
        workers.SPLIT_SHARE = 1 << 40  # every file over a stripe in parts
        repo = Repository.open({url!r}, {PASSWORD!r}, ledger=False)
        try:
            repo.restore("latest", {str(target)!r}, processes=2)
        except StorageFull as exc:
            print(json.dumps(str(exc)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no space left on the restore target" in json.loads(proc.stdout)
    for p in target.iterdir():  # every file there is whole
        assert p.read_bytes() == (src / p.name).read_bytes(), p.name


def _restored_in_workers_failing(url: str, out: Path, call: str, suffix: bytes, error: str,
                                 stripe: int | None = None) -> tuple[str, int, str]:
    """(error class name, exit code, message) of a restore by two worker processes, in a process of its
    own, in which ``os.<call>`` fails with ``errno.<error>`` on every path ending in ``suffix`` (small files
    written a run at a time too: they are written by the reference, through ``os``)."""
    script = textwrap.dedent(f"""
        import errno, json, os
        import chunkvault.store.restore_workers as workers
        from chunkvault import Repository
        from chunkvault.errors import ChunkvaultError
        from chunkvault.store import writefiles
        writefiles.write_small_files = writefiles.write_small_files_reference  # its calls fail too
        if {stripe!r} is not None:
            workers.STRIPE_BYTES = {stripe!r}
            workers.SPLIT_SHARE = 1 << 40  # every file over a stripe in parts
        real = os.{call}
        def failing(path, *a, **k):
            if (b"/" + os.fsencode(path)).endswith({suffix!r}):  # a whole path, or a name in a directory
                raise OSError(errno.{error}, os.strerror(errno.{error}))
            return real(path, *a, **k)
        os.{call} = failing
        repo = Repository.open({url!r}, {PASSWORD!r}, ledger=False)
        try:
            repo.restore("latest", {str(out)!r}, processes=2)
        except ChunkvaultError as exc:
            print(json.dumps([type(exc).__name__, exc.exit_code, str(exc)]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    return tuple(json.loads(proc.stdout))


def test_a_full_target_while_making_a_directory_leaves_no_file_written_in_parts(tmp_path, new_repo):
    """The process that makes the directories stops at a full target before it met the files the
    workers write in parts: it still removes them, since none is completed."""
    def make(src: Path) -> None:
        (src / "a").mkdir()
        _files(src)
    _, url, src = backed_up(tmp_path, new_repo, make)
    out = tmp_path / "out"
    name, code, message = _restored_in_workers_failing(url, out, "mkdir", b"/a", "ENOSPC", stripe=64 << 10)
    assert (name, code) == ("StorageFull", 14)
    assert "no space left on the restore target while writing a " in message
    assert os.listdir(out) == []


def _failing_on(monkeypatch, target: Path, after: int) -> None:
    """The restore's writes of file data (``write_sparse``) fail with ENOSPC on a file below ``target`` once
    ``after`` calls succeeded there."""
    from chunkvault.store import restore as restore_module

    real = restore_module.write_sparse
    calls = {"n": 0}

    def write(fd, *args):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(target)):
            calls["n"] += 1
            if calls["n"] > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)

    monkeypatch.setattr(restore_module, "write_sparse", write)


def test_no_space_while_writing_a_file_removes_it(tmp_path, new_repo, monkeypatch):
    repo, _, src = backed_up(tmp_path, new_repo, lambda s: (s / "big").write_bytes(os.urandom(3 << 20)))
    target = tmp_path / "out"
    _failing_on(monkeypatch, target, after=1)
    with pytest.raises(StorageFull, match="while writing big"):
        repo.restore("latest", str(target), processes=1)
    assert os.listdir(target) == []


def test_no_space_while_updating_a_file_in_place_removes_it(tmp_path, new_repo, monkeypatch):
    repo, _, src = backed_up(tmp_path, new_repo, lambda s: (s / "big").write_bytes(os.urandom(3 << 20)))
    target = tmp_path / "live"
    shutil.copytree(src, target)
    with open(target / "big", "r+b") as f:  # the first chunk and a later one differ
        f.write(b"X" * 100)
        f.seek(2 << 20)
        f.write(b"X" * 100)
    _failing_on(monkeypatch, target, after=1)
    with pytest.raises(StorageFull, match="while updating big in place .removed: part of it was rewritten, so "
                                          "it held neither its old content nor the snapshot's"):
        repo.restore("latest", str(target), force=True, delta=True)
    assert os.listdir(target) == []


def test_a_file_that_grows_past_the_room_left_is_kept_as_it_was(tmp_path, new_repo):
    """--delta in place: what a file grows by is allocated before anything is written, so a disk without
    room for it leaves the file as it was (length, content, times; nothing allocated past its end), and
    says so; it was removed, rewritten in part, before."""
    repo, _, src = backed_up(tmp_path, new_repo, lambda s: (s / "a.bin").write_bytes(os.urandom(3 << 20)))
    first = repo.snapshots()[-1].id
    with open(src / "a.bin", "ab") as f:
        f.write(os.urandom(2_000_000))
    repo.backup([str(src)])
    target = tmp_path / "small"
    target.mkdir()
    with mounted_tmpfs(str(target), "4m"):
        repo.restore(first, str(target / "x"))
        before = os.stat(target / "x" / "a.bin")
        old = (target / "x" / "a.bin").read_bytes()
        free = os.statvfs(target).f_bfree
        with pytest.raises(StorageFull, match="while writing a.bin .* kept as it was"):
            repo.restore("latest", str(target / "x"), force=True, delta=True)
        after = os.stat(target / "x" / "a.bin")
        assert (target / "x" / "a.bin").read_bytes() == old
        assert (after.st_size, after.st_mtime_ns, after.st_blocks) == (before.st_size, before.st_mtime_ns,
                                                                       before.st_blocks)
        assert os.statvfs(target).f_bfree == free


def test_no_room_for_what_a_file_grows_by_leaves_it_as_it_was(tmp_path, new_repo, monkeypatch):
    """As above where no tmpfs can be mounted: the allocation for the growth refused (ENOSPC) after it took
    part of the room; the file keeps its length, content and times, and nothing past its end."""
    from chunkvault.store import restore as restore_module

    repo, _, src = backed_up(tmp_path, new_repo, lambda s: (s / "a.bin").write_bytes(os.urandom(1 << 20)))
    target = tmp_path / "live"
    repo.restore("latest", str(target))
    with open(src / "a.bin", "ab") as f:
        f.write(os.urandom(1 << 20))
    repo.backup([str(src)])
    real = restore_module.reserve

    def full_half_way(fd, offset, length):
        real(fd, offset, length // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(restore_module, "reserve", full_half_way)
    before, old = os.stat(target / "a.bin"), (target / "a.bin").read_bytes()
    with pytest.raises(StorageFull, match="while writing a.bin .* kept as it was"):
        repo.restore("latest", str(target), force=True, delta=True)
    after = os.stat(target / "a.bin")
    assert (target / "a.bin").read_bytes() == old
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_blocks <= before.st_blocks


def test_a_file_grown_by_a_hole_stays_sparse_when_updated_in_place(tmp_path, new_repo):
    """The room allocated for a file to grow into is given back where its new blocks are zeros: a file grown
    by 64 MiB of hole and a block of data takes a few blocks, as a restore anew leaves it."""
    repo, _, src = backed_up(tmp_path, new_repo, lambda s: (s / "s").write_bytes(os.urandom(100_000)))
    target = tmp_path / "live"
    repo.restore("latest", str(target))
    with open(src / "s", "r+b") as f:
        f.truncate(64 << 20)
        f.seek(0, os.SEEK_END)
        f.write(os.urandom(4096))
    repo.backup([str(src)])
    repo.restore("latest", str(target), force=True, delta=True)
    assert (target / "s").read_bytes() == (src / "s").read_bytes()
    fresh = tmp_path / "fresh"
    repo.restore("latest", str(fresh))
    if os.stat(fresh / "s").st_blocks * 512 > 1 << 20:
        pytest.skip("this file system keeps no holes")
    assert os.stat(target / "s").st_blocks * 512 < 1 << 20


def test_workers_report_what_the_target_does_not_take(tmp_path, new_repo):
    """A worker's file that cannot be written comes back in its result: reported with the others."""
    _, url, _ = backed_up(tmp_path, new_repo, _files)
    out = tmp_path / "out"
    name, code, message = _restored_in_workers_failing(url, out, "open", b"/f3", "EACCES")
    assert (name, code) == (TargetUnwritable.__name__, 14)
    assert "1 entry could not be written: f3 (Permission denied)" in message
    assert sorted(os.listdir(out)) == [f"f{i}" for i in range(8) if i != 3]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_file_whose_content_does_not_match_its_digest_is_reported_and_not_left(tmp_path, new_repo, monkeypatch,
                                                                                processes):
    """A tree whose digests do not match its chunks (a small file, written in a run, and a larger one):
    neither is left in the target, and the other files are restored."""
    def make(src: Path) -> None:
        (src / "a").write_bytes(b"a" * 100)
        (src / "b").write_bytes(os.urandom(3 << 20))
        (src / "c").write_bytes(b"c")
    repo, _, _ = backed_up(tmp_path, new_repo, make)
    real = Repo.tree

    def tree(self, snap):
        for rec in real(self, snap):
            if rec.entry is not None and rec.path in (b"a", b"b"):
                rec = entry_record(dataclasses.replace(rec.entry, digest=bytes(32)))
            yield rec
    monkeypatch.setattr(Repo, "tree", tree)
    out = tmp_path / "out"
    with pytest.raises(CorruptObject, match="restored content does not match its digest; 2 file"):
        repo.restore("latest", str(out), processes=processes)
    assert os.listdir(out) == ["c"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_owners_that_cannot_be_given_are_warned_about_and_the_files_restored(tmp_path, new_repo):
    """Root without CAP_CHOWN restores files owned by others (a small one, written in a run, and a larger
    one): each is whole, with its mode and time, and a warning names it."""
    def make(src: Path) -> None:
        (src / "small").write_bytes(b"small")
        (src / "large").write_bytes(os.urandom(3 << 20))
        for name in ("small", "large"):
            os.chown(src / name, 4321, 4321)
    _, url, src = backed_up(tmp_path, new_repo, make)
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}, "CHUNKVAULT_PASSWORD": PASSWORD}
    proc = subprocess.run(["setpriv", "--inh-caps=-chown", "--bounding-set=-chown", sys.executable, "-m",
                           "chunkvault.cli", "restore", "-r", url, "latest", "--target", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "setpriv" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    for name in ("small", "large"):
        assert f"cannot set owner of {name}: Operation not permitted" in proc.stderr
        assert (out / name).read_bytes() == (src / name).read_bytes()
        st, was = os.lstat(out / name), os.lstat(src / name)
        assert (st.st_uid, st.st_mode, st.st_mtime_ns) == (0, was.st_mode, was.st_mtime_ns)


# --- ancestors of selected paths ----------------------------------------------------------------------

def test_an_include_gives_the_selected_paths_ancestors_their_recorded_metadata(tmp_path, new_repo):
    def make(src: Path) -> None:
        (src / "private" / "sub").mkdir(parents=True)
        (src / "private" / "sub" / "key").write_bytes(b"k")
        (src / "private" / "other").write_bytes(b"left out")
        os.chmod(src / "private", 0o700)
        os.chown(src / "private", 1234, 2345)
        os.utime(src / "private" / "sub", ns=(978_307_200 * 10**9, 978_307_200 * 10**9))
        os.utime(src / "private", ns=(978_307_201 * 10**9, 978_307_201 * 10**9))
    repo, _, src = backed_up(tmp_path, new_repo, make)
    out = tmp_path / "out"
    repo.restore("latest", str(out), includes=["private/sub/key"])
    for d in ("private", "private/sub"):
        want, got = os.stat(src / d), os.stat(out / d)
        assert (got.st_mode, got.st_mtime_ns) == (want.st_mode, want.st_mtime_ns), d
    assert (os.stat(out / "private").st_uid, os.stat(out / "private").st_gid) == (1234, 2345)
    assert sorted(os.listdir(out / "private")) == ["sub"]


def test_a_restores_problem_carries_what_was_restored_and_says_whether_anything_was():
    nothing = RestoreResult(unwritten=[("f", "Permission denied")])
    with pytest.raises(TargetUnwritable, match=r"f \(Permission denied\) \(nothing was restored\)$") as caught:
        nothing.raise_for_problems()
    assert caught.value.partial is nothing
    some = RestoreResult(files=2, damaged=[("g", "blob 00", "missing", True)])
    with pytest.raises(MissingObject, match=r"g \(everything else was restored\)$") as caught:
        some.raise_for_problems()
    assert caught.value.partial is some
    RestoreResult(files=3, warnings=["w"]).raise_for_problems()


def test_a_directory_swapped_for_a_link_during_the_restore_does_not_pass_its_metadata_on(tmp_path, new_repo,
                                                                                        monkeypatch):
    """Whoever can write into the target may swap a restored directory for a symbolic link before the
    restore gives the directory its mode and times, applied last: they are not given to the link's
    destination, and the directory is reported."""
    from chunkvault.store.restore import Restorer

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"f")
    os.chmod(src / "sub", 0o777)
    os.utime(src / "sub", (1_000_000_000, 1_000_000_000))
    repo = new_repo()
    repo.backup([str(src)])
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    before = outside.stat()
    finish = Restorer._finish_directory

    def swapped_first(self, e):
        if e.path == b"sub":
            dpath = os.path.join(self.target, b"sub")
            os.rename(dpath, dpath + b".moved")
            os.symlink(outside, dpath)
        finish(self, e)

    monkeypatch.setattr(Restorer, "_finish_directory", swapped_first)
    with pytest.raises(TargetUnwritable, match="sub"):
        repo.restore("latest", str(tmp_path / "out"), processes=1)
    after = outside.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


@pytest.mark.parametrize("delete, verify", [(False, False), (True, False), (False, True)],
                         ids=["made", "in place, --delete", "made, --verify"])
def test_the_target_swapped_for_a_link_once_the_restore_opened_it_is_not_reached_through_the_link(
        tmp_path, new_repo, monkeypatch, delete, verify):
    """Whoever can write where the target lies may move it aside and put a symbolic link out of it in its
    place while the restore runs: the restore wrote through its descriptor, but then gave the target it had
    made its mode by name, made and removed its probe files there, and --delete listed what to remove there,
    all through the link (to /etc, for a restore run as root); --verify compared the link's destination (its
    probe files made there, its modes opened up), and reported its differences.  What lies out of the target
    stays as it was."""
    from chunkvault.store.restore import Restorer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "old").write_bytes(b"dated 1960")  # a time the restore checks the target holds
    os.utime(tmp_path / "a" / "old", ns=(-(10 ** 18), -(10 ** 18)))
    (tmp_path / "b" / "f").write_bytes(b"f")
    repo = new_repo()
    repo.backup([str(tmp_path / "a"), str(tmp_path / "b")])  # several paths: no root mode recorded
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    (outside / "precious").write_bytes(b"not the snapshot's")
    before = describe(outside)
    ctime = outside.stat().st_ctime_ns
    target = tmp_path / "target"
    if delete:
        repo.restore("latest", str(target))
    real = Restorer.restore_records

    def swapped_after(self, records):
        real(self, records)
        os.rename(target, tmp_path / "moved")
        os.symlink(outside, target)

    monkeypatch.setattr(Restorer, "restore_records", swapped_after)
    repo.restore("latest", str(target), processes=1, force=delete, delete=delete, verify=verify)
    assert describe(outside) == before and outside.stat().st_ctime_ns == ctime
    assert stat_mode(outside) == 0o700
    assert (tmp_path / "moved" / str(tmp_path / "b" / "f").lstrip("/")).read_bytes() == b"f"  # restored there


@pytest.mark.parametrize("when", ["made", "written"])
def test_a_directory_swapped_for_a_link_while_its_files_are_written_is_not_written_through(
        tmp_path, new_repo, monkeypatch, when):
    """Whoever can write into the target may swap a directory the restore made for a symbolic link out of
    the target (to /etc, for a restore run as root) before or while its files are written.  Nothing is
    written through it: a directory is reached from its parent's descriptor, never by its path; one not
    yet opened is refused where a link leads out, and one already open keeps taking its files where it
    went.  What could not be written is reported."""
    from chunkvault.store.restore import Restorer

    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "a_large").write_bytes(os.urandom(3 << 20))  # several chunks: written on its own
    (src / "sub" / "b_small").write_bytes(b"small")  # one chunk: written in a run
    (src / "sub" / "c_fifo_later").write_bytes(b"c")
    (src / "sub" / "deeper" / "d").write_bytes(b"d")
    os.mkfifo(src / "sub" / "fifo")
    os.link(src / "sub" / "b_small", src / "sub" / "hard")
    repo = new_repo()
    repo.backup([str(src)])
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"

    def swap():
        dpath = target / "sub"
        os.rename(dpath, target / "sub.moved")
        os.symlink(outside, dpath)

    if when == "made":
        restore_entry = Restorer._restore_entry

        def swapped_when_made(self, e, pf):
            restore_entry(self, e, pf)
            if e.path == b"sub":
                swap()
        monkeypatch.setattr(Restorer, "_restore_entry", swapped_when_made)
    else:
        write_file = Restorer._write_file

        def swapped_when_written(self, rel, e, chunks):
            write_file(self, rel, e, chunks)
            if e.path == b"sub/a_large":
                swap()
        monkeypatch.setattr(Restorer, "_write_file", swapped_when_written)
    with pytest.raises(TargetUnwritable, match="sub"):
        repo.restore("latest", str(target), processes=1)
    assert list(outside.iterdir()) == []
    if when == "written":  # the directory it had open took the rest of its files where it was moved
        moved = target / "sub.moved"
        assert sorted(p.name for p in moved.iterdir()) == ["a_large", "b_small", "c_fifo_later", "deeper",
                                                          "fifo", "hard"]
        assert (moved / "deeper" / "d").read_bytes() == b"d"


def test_a_special_file_swapped_for_a_link_before_its_metadata_does_not_pass_it_on(tmp_path, new_repo,
                                                                                   monkeypatch):
    """A FIFO's mode and times are set after it is made, through the FIFO itself: a link put in its place
    meanwhile does not give them to the file it leads to (chmod would follow it)."""
    from chunkvault.store.restore import Restorer

    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "fifo", 0o666)
    repo = new_repo()
    repo.backup([str(src)])
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    victim.chmod(0o600)
    before = victim.stat()
    apply_meta = Restorer._apply_meta

    def swapped(self, e, fd=None):
        if e.path == b"fifo":
            os.unlink(os.path.join(self.target, b"fifo"))
            os.symlink(victim, os.path.join(self.target, b"fifo"))
        apply_meta(self, e, fd)

    monkeypatch.setattr(Restorer, "_apply_meta", swapped)
    with pytest.raises(TargetUnwritable, match="fifo"):
        repo.restore("latest", str(tmp_path / "out"), processes=1)
    after = victim.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_a_restore_in_worker_processes_holds_few_descriptors_however_many_and_deep_its_directories(
        tmp_path, new_repo):
    """Directory descriptors let go of were closed only after a run of small files, which the directories'
    metadata, applied after the workers, never wrote: 1,500 directories under `ulimit -n 1024` were left
    at mode 0700 ("Too many open files").  A deep tree kept one open per level."""
    src = tmp_path / "src"
    for i in range(600):
        (src / f"d{i}" / "s").mkdir(parents=True)
        os.chmod(src / f"d{i}" / "s", 0o750)
        os.chmod(src / f"d{i}", 0o750)
    deep = str(src)
    for _ in range(300):
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    with open(os.path.join(deep, "f"), "wb") as f:
        f.write(b"deep")
    (src / "big").write_bytes(os.urandom(20 << 20))  # several stripes: files written by two workers
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    script = textwrap.dedent(f"""
        import resource
        from chunkvault import Repository
        from chunkvault.store import restore_workers
        restore_workers.STRIPE_BYTES = 1 << 20
        restore_workers.SPLIT_SHARE = 1 << 40  # every file over a stripe in parts
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
        Repository.open({str(tmp_path / "repo")!r}, {PASSWORD!r}, ledger=False).restore("latest", {str(tmp_path / "out")!r},
                                                                           processes=2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert describe(tmp_path / "out") == describe(src)


def test_a_fifo_put_at_a_files_name_during_the_restore_is_refused_not_waited_on(tmp_path, new_repo, monkeypatch):
    """Whoever can write the target could make a restore run as root block for ever on a FIFO's open."""
    import signal

    from chunkvault.store.restore import Restorer

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))  # several chunks: written on its own, not in a run
    (src / "small").write_bytes(b"small")
    repo = new_repo()
    repo.backup([str(src)])
    make_room = Restorer._make_room

    def planted(self, rel, *args, **kwargs):
        where = make_room(self, rel, *args, **kwargs)
        if rel in (b"big", b"small"):
            os.mkfifo(os.path.join(self.target, rel))
        return where

    monkeypatch.setattr(Restorer, "_make_room", planted)
    signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(60)  # a hang fails the test instead of the whole run
    try:
        with pytest.raises(TargetUnwritable, match="big .*small|small .*big"):
            repo.restore("latest", str(tmp_path / "out"), processes=1)
    finally:
        signal.alarm(0)


def test_a_fifo_put_at_a_files_name_before_verify_reads_it_is_a_difference_not_waited_on(tmp_path, new_repo,
                                                                                         monkeypatch):
    """restore --verify opened each file it read back without O_NONBLOCK: a FIFO put in a file's place after
    the comparison found a file there held the open, and the restore (verify-restore too), for ever."""
    import signal

    from chunkvault import verify
    from chunkvault.errors import VerificationFailed

    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"small")
    repo = new_repo()
    repo.backup([str(src)])
    content = verify._Comparer.content

    def swapped(self, e, path):
        if e.path == b"small":
            os.unlink(path)
            os.mkfifo(path)
        return content(self, e, path)

    monkeypatch.setattr(verify._Comparer, "content", swapped)
    signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(60)  # a hang fails the test instead of the whole run
    try:
        with pytest.raises(VerificationFailed, match="small: .*no longer a regular file"):
            repo.restore("latest", str(tmp_path / "out"), processes=1, verify=True)
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("fault", [errno.ENOENT, errno.ENOTDIR], ids=["vanished", "changed type"])
def test_what_changes_while_delete_walks_the_target_is_named_as_the_restores(tmp_path, new_repo, monkeypatch,
                                                                             fault):
    """Another process at work in the target while --delete walks it: what vanished or changed there was
    reported as "vanished during backup: /abs/target/..." or "(left out until the next backup)", of a
    backup that never ran; it is named relative to the target, as the restore's."""
    from chunkvault.store import source

    def make(src: Path) -> None:
        (src / "keep").write_bytes(b"keep")
    repo, _, _ = backed_up(tmp_path, new_repo, make)
    target = tmp_path / "target"
    repo.restore("latest", str(target))
    (target / "busy").mkdir()
    (target / "busy" / "extra").write_bytes(b"extra")
    real = source.Walker

    class Racing:  # the directory is gone by the time the walk lists it
        def __init__(self, *args):
            self.walker = real(*args)

        def __getattr__(self, name):
            return getattr(self.walker, name)

        def batch(self, *args):
            return [(rel, path, st, err, fault if rel == b"busy" else list_err)
                    for rel, path, st, err, list_err in self.walker.batch(*args) or []]

    monkeypatch.setattr(source, "Walker", Racing)
    result = repo.restore("latest", str(target), force=True, delete=True)
    assert not any("backup" in w for w in result.warnings), result.warnings
    assert ("busy: replaced or removed while --delete walked the target; what it holds now was not searched for "
            "what the snapshot lacks") in result.warnings


def test_delete_names_what_it_cannot_remove_and_the_restore_goes_on(tmp_path, new_repo, monkeypatch):
    """An extra entry --delete cannot remove (a read-only target, no permission) was an internal error,
    and nothing was restored."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"snapshot")
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    target.mkdir()
    (target / "extra").write_bytes(b"not in the snapshot")
    real_unlink = os.unlink

    def refused(path, *args, **kwargs):
        if path == b"extra":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(TargetUnwritable, match=r"extra \(not deleted: Read-only file system\)"):
        repo.restore("latest", str(target), force=True, delete=True)
    assert (target / "f").read_bytes() == b"snapshot" and (target / "extra").exists()


def test_target_directories_past_the_recursion_limit_are_reached_and_removed(tmp_path):
    """A tree 1,100 directories deep raised RecursionError on its way down (TargetDirs.dir) and in
    shutil.rmtree (--delete, an in-place restore replacing a directory)."""
    from chunkvault.store.target_dirs import KEPT_DIRS, TargetDirs, remove_tree

    dirs = TargetDirs(os.fsencode(tmp_path))
    try:
        rel = b"/".join([b"d"] * 1500)
        fd = dirs.dir(rel, make=True)
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        assert len(dirs._fds) <= KEPT_DIRS + 1 and len(dirs._retired) == 0  # not one per level
        os.symlink(tmp_path / "outside", os.path.join(os.fsencode(tmp_path), rel, b"link"))
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "kept").write_bytes(b"x")
        import resource

        limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, limits[1]))  # fewer than the tree's levels
        try:
            remove_tree(dirs.dir(b""), b"d")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        assert sorted(os.listdir(tmp_path)) == ["outside"] and (tmp_path / "outside" / "kept").exists()
    finally:
        dirs.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_tree_of_many_directories_restores_under_a_low_open_files_limit(tmp_path, new_repo, processes):
    """A restore held 64 directory descriptors (and 32 more for a run of small files) whatever the open files
    limit: under 32 (a container's, a unit's LimitNOFILE=), every file past the 20th directory or so was not
    written ("Too many open files"), while a backup of the same tree ran under 8."""
    import resource

    def tree(src: Path) -> None:
        for d in range(80):
            (src / f"d{d:02}").mkdir()
            for f in range(3):
                (src / f"d{d:02}" / f"f{f}").write_bytes(os.urandom(100 + d * 7 + f))

    _, url, src = backed_up(tmp_path, new_repo, tree)
    target = tmp_path / "target"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    proc = subprocess.run([sys.executable, "-m", "chunkvault.cli", "restore", "latest", "-r", url, "--target",
                           str(target), "--processes", str(processes)], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32)))
    assert proc.returncode == 0, proc.stderr
    assert describe(target) == describe(src)


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another owner: needs root")
def test_an_in_place_update_that_would_grant_an_owner_or_set_id_bits_writes_a_new_file(tmp_path, new_repo):
    """Whoever owns a file in the target may hold it open for writing: updated in place, it would become
    root's, or set-uid, with their descriptor still on it.  Such a file is written anew and renamed over;
    one that only changes content keeps its inode."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("owned", "setuid", "plain"):
        (src / name).write_bytes(os.urandom(3 << 20))
    os.chmod(src / "setuid", 0o4755)
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    shutil.copytree(src, target)
    os.chown(target / "owned", 4321, 4321)  # someone else's now, as a user's own file in a live tree
    os.chmod(target / "setuid", 0o755)
    for name in ("owned", "setuid", "plain"):
        with open(target / name, "r+b") as f:
            f.write(b"changed")
    before = {name: os.stat(target / name).st_ino for name in ("owned", "setuid", "plain")}
    holder = os.open(target / "owned", os.O_WRONLY)  # the owner's descriptor, kept
    try:
        repo.restore("latest", str(target), force=True, delta=True)
        os.write(holder, b"after")  # lands in the old inode, no longer at the name
    finally:
        os.close(holder)
    after = {name: os.stat(target / name) for name in ("owned", "setuid", "plain")}
    assert after["owned"].st_ino != before["owned"] and after["owned"].st_uid == os.getuid()
    assert after["setuid"].st_ino != before["setuid"] and after["setuid"].st_mode & 0o4000
    assert after["plain"].st_ino == before["plain"]
    assert describe(target) == describe(src)


def test_restore_verify_reads_back_paths_longer_than_the_system_takes(tmp_path, new_repo):
    """The restore wrote them below a deep target (each directory from its parent's descriptor); --verify's
    walk and compare took whole paths, and failed with "File name too long" (an internal error)."""
    src = tmp_path / "s"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(19):  # 3.8 KB below the source: a path backup takes
        name = b"%03d" % i + b"d" * 197
        os.mkdir(name, 0o750, dir_fd=fd)
        fd, parent = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent)
    with open(os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd), "wb") as f:
        f.write(b"deep")
    os.close(fd)
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / ("t" * 250) / ("u" * 250)  # below it, the deepest file lies past 4 KB
    result = repo.restore("latest", str(target), verify=True)
    assert (result.files, result.dirs) == (1, 20)


def test_delta_writes_into_the_file_it_judged_not_into_a_link_put_at_its_name(tmp_path, new_repo, monkeypatch):
    """It opened the file to compare, then again by name to write: a hard link to a file out of the target
    put there in between got the snapshot's data, owner and mode."""
    from chunkvault.store.restore import Restorer

    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 << 20)
    (src / "big").write_bytes(data)
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    target.mkdir()
    (target / "big").write_bytes(data[:-100] + b"X" * 100)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the restore's")
    os.chmod(victim, 0o640)
    before = victim.stat()
    holds = Restorer._holds

    def swapped(self, fd, e):
        found = holds(self, fd, e)
        os.rename(target / "big", target / "big.moved")
        os.link(victim, target / "big")
        return found

    monkeypatch.setattr(Restorer, "_holds", swapped)
    repo.restore("latest", str(target), force=True, delta=True)
    after = victim.stat()
    assert victim.read_bytes() == b"not the restore's" and (after.st_mode, after.st_uid) == (before.st_mode,
                                                                                                 before.st_uid)
    assert (target / "big.moved").read_bytes() == data  # what it judged got the snapshot's content


def test_removing_a_tree_stops_where_a_directory_in_it_was_moved_out_meanwhile(tmp_path, monkeypatch):
    """Whoever owns a directory in a tree a root restore removes (--delete, a directory replaced by a file,
    verify-restore's scratch) moves it out while it is emptied: its ".." is then the directory it was moved
    into, which the removal went on emptying (/tmp), and each parent above it that it could rmdir, up to /."""
    import errno

    from chunkvault.store.target_dirs import remove_tree

    deep = tmp_path / "target" / "junk" / "x" / "y"
    deep.mkdir(parents=True)
    for i in range(5):
        (deep / f"f{i}").write_bytes(b"theirs")
    victim = tmp_path / "victim"
    (victim / "keepdir").mkdir(parents=True)
    (victim / "important").write_bytes(b"not the restore's to delete")
    real_unlink = os.unlink
    moved = []

    def unlink_then_move(name, *, dir_fd=None):
        real_unlink(name, dir_fd=dir_fd)
        if not moved:
            moved.append(os.rename(deep, victim / "y"))

    monkeypatch.setattr(os, "unlink", unlink_then_move)
    parent = os.open(tmp_path / "target", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            remove_tree(parent, "junk")
    finally:
        os.close(parent)
    assert info.value.errno == errno.ESTALE
    assert (victim / "important").read_bytes() == b"not the restore's to delete" and (victim / "keepdir").is_dir()
    assert (tmp_path / "target" / "junk" / "x").is_dir()


def test_removing_a_tree_does_not_enter_a_file_system_mounted_in_it(tmp_path):
    """remove_tree's own guard, beside the mount points a restore reads once when it starts: a file system
    mounted in the tree after that (or below verify's scratch) is refused (EXDEV) before anything in it is
    removed, not emptied and then found busy."""
    from chunkvault.store.target_dirs import remove_tree

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "target" / "gone" / "mnt"
    mnt.mkdir(parents=True)
    with mounted_tmpfs(str(mnt), "256k"):
        (mnt / "keep").mkdir()
        (mnt / "data").write_bytes(b"precious")
        parent = os.open(tmp_path / "target", os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as info:
                remove_tree(parent, "gone")
        finally:
            os.close(parent)
        assert info.value.errno == errno.EXDEV
        assert (mnt / "data").read_bytes() == b"precious" and (mnt / "keep").is_dir()


def test_delete_leaves_what_is_mounted_in_the_target(tmp_path, new_repo, tmpfs):
    """`backup / -x` records a mount point as an empty directory; put back in place with --delete, what was
    mounted there (all of /home) was deleted, with exit 0.  One the snapshot lacks is named, not emptied."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "conf").write_bytes(b"conf")
    home = tmpfs("src/home", 256)
    (home / "thesis.tex").write_bytes(b"alice's thesis")
    repo = new_repo()
    snap = repo.backup([str(src)], one_file_system=True).snapshot
    (src / "etc" / "conf").write_bytes(b"changed")
    extra = tmpfs("src/extra", 256)
    (extra / "data").write_bytes(b"mounted after the backup")
    elsewhere = tmp_path / "elsewhere"  # never in the target, nor in any backup
    (elsewhere / "precious").mkdir(parents=True)
    (elsewhere / "precious" / "file").write_bytes(b"outside")
    (src / "more" / "deeper").mkdir(parents=True)  # not in the snapshot: removed, but for the mount in it
    for i in range(5):
        (src / "more" / f"f{i}").write_bytes(b"extra")
    bound = tmpfs("src/more/deeper/bound", bind=elsewhere)
    result = repo.restore(snap.id, str(src), force=True, delta=True, delete=True)
    assert (home / "thesis.tex").read_bytes() == b"alice's thesis"
    assert (extra / "data").read_bytes() == b"mounted after the backup"
    assert (elsewhere / "precious" / "file").read_bytes() == b"outside"
    assert (src / "etc" / "conf").read_bytes() == b"conf"
    assert sorted(os.listdir(src / "more")) == ["deeper"] and os.listdir(src / "more" / "deeper") == ["bound"]
    assert os.path.ismount(bound) or (bound / "precious").exists()
    said = [w for w in result.warnings if "a file system is mounted there" in w]
    assert said == [f"{name}: a file system is mounted there; --delete left what it holds as it is"
                    for name in ("extra", "more/deeper/bound")]  # home, in the snapshot, is kept unsaid


def test_a_file_in_place_of_a_directory_holding_a_bind_mount_is_not_written(tmp_path, new_repo, tmpfs):
    """Making room for the snapshot's file, the directory in its place was removed whole: what a bind mount
    in it showed from elsewhere with it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "thing").write_bytes(b"a file in the snapshot")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    (src / "thing").unlink()
    (src / "thing" / "in").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"outside")
    tmpfs("src/thing/in/bound", bind=elsewhere)
    with pytest.raises(TargetUnwritable, match="thing .*a file system is mounted there"):
        repo.restore(snap.id, str(src), force=True)
    assert (elsewhere / "precious").read_bytes() == b"outside"


@pytest.mark.parametrize("how", [dict(delta=True), dict(overwrite="if-changed")])
def test_delta_writes_nothing_into_a_file_bind_mounted_in_the_target(tmp_path, new_repo, how):
    """A file bind-mounted over one of the target's (a container's resolv.conf) is another file's name, as a
    hard link is: --delta wrote the snapshot's content, mode and times into the file outside the target,
    where a plain restore refused it (it cannot be renamed over).  It is not written, and named."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf").write_bytes(b"the snapshot's")
    (src / "other").write_bytes(b"other")
    repo = new_repo()
    snap = repo.backup([str(src)]).snapshot
    (src / "conf").write_bytes(b"changed")
    outside = tmp_path / "outside"
    outside.write_bytes(b"the host's own")
    os.chmod(outside, 0o600)
    before = os.stat(outside)
    if subprocess.run(["mount", "--bind", str(outside), str(src / "conf")], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here")
    try:
        with pytest.raises(TargetUnwritable, match="conf"):
            repo.restore(snap.id, str(src), force=True, **how)
        assert outside.read_bytes() == b"the host's own"
        after = os.stat(outside)
        assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    finally:
        subprocess.run(["umount", "-l", str(src / "conf")], capture_output=True)


def test_removing_a_tree_takes_empty_directories_that_may_be_read_but_not_searched(tmp_path, unprivileged):
    """Opened through a path descriptor, an empty directory of mode 0400 needed search permission on it,
    which its removal never did: a restore as a non-root user could not remove it."""
    tree = tmp_path / "tree"
    (tree / "sub" / "ro").mkdir(parents=True)
    os.chmod(tree / "sub" / "ro", 0o400)
    for d in (tmp_path, tree, tree / "sub"):
        os.chmod(d, 0o777)
    code = ("import os, sys; from chunkvault.store.target_dirs import remove_tree; "
            "fd = os.open(sys.argv[1], os.O_RDONLY); remove_tree(fd, 'tree')")
    subprocess.run([*UNPRIVILEGED, sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    assert not tree.exists()


def test_the_summary_line_counts_the_links_restored(tmp_path):
    """It counted files, directories, FIFOs and devices, and left the links out (--json had them)."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    os.link(src / "f", src / "hard")
    os.symlink("f", src / "soft")
    _cli("backup", "-r", repo, str(src))
    proc = _cli("restore", "-r", repo, "latest", "--target", str(tmp_path / "out"))
    assert ": 1 files, 1 dirs, 2 links, " in proc.stdout


def _linked_pair(tmp_path, a_owner: int | None = None) -> tuple[str, Path, Path]:
    """A repository whose snapshot has a/f and b/g as one file ("good"), and a target restored from it in
    which a/f is stale and b/g a separate file that holds the right data; ``a_owner``: a's owner."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "f").write_bytes(b"good\n")
    os.link(src / "a" / "f", src / "b" / "g")
    if a_owner is not None:
        os.chown(src / "a", a_owner, a_owner)
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / "target"
    _cli("restore", "-r", repo, "latest", "--target", str(target))
    root = next(p for p in target.rglob("a") if p.is_dir()).parent
    (root / "b" / "g").unlink()
    (root / "b" / "g").write_bytes(b"good\n")
    (root / "a" / "f").write_bytes(b"STALE\n")
    return repo, target, root


@pytest.mark.parametrize("delta", [[], ["--delta"]])
def test_a_hard_link_is_not_joined_to_a_file_the_restore_could_not_write(tmp_path, unprivileged, delta):
    """In place, a/f's directory refusing writes left the stale a/f there; b/g was then linked to it and counted
    restored.  It keeps what it held, named among the entries not written."""
    repo, target, root = _linked_pair(tmp_path, a_owner=65534)  # theirs in the snapshot too: not taken
    os.chmod(root / "a" / "f", 0o444)  # nor can --delta write into it
    os.chmod(root / "a", 0o555)
    os.chown(root / "a", 65534, 65534)  # another user's: not opened up to be written in
    try:
        proc = _cli("restore", "-r", repo, "latest", "--target", str(target), "--confirm", "RESTORE", "--json",
                    *delta, ok=(14,), unprivileged=True)
    finally:
        os.chmod(root / "a", 0o755)
    result = json.loads(proc.stdout)
    assert result["links"] == 0
    reasons = {w["path"].rsplit("/", 2)[-2] + "/" + w["path"].rsplit("/", 1)[-1]: w["reason"]
               for w in result["not_written"]}
    assert "its target" in reasons["b/g"] and "could not be written; left as it was" in reasons["b/g"]
    assert (root / "b" / "g").read_bytes() == b"good\n"
    assert not os.path.samefile(root / "b" / "g", root / "a" / "f")


def test_a_hard_link_that_cannot_be_made_leaves_what_its_path_holds(tmp_path):
    """Its target's directory is a symbolic link out of the target: b/g was removed before the link was
    refused, and the right file it held was lost."""
    repo, target, root = _linked_pair(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(root / "a")
    os.symlink(outside, root / "a")
    rel = os.path.relpath(root, target)
    _cli("restore", "-r", repo, "latest", "--target", str(target), "--confirm", "RESTORE",
         "--include", f"{rel}/a/f", "--include", f"{rel}/b/g", ok=(14,))
    assert (root / "b" / "g").read_bytes() == b"good\n" and os.listdir(outside) == []


@pytest.mark.parametrize("mode", [0o000, 0o600], ids=["000", "no search"])
@pytest.mark.parametrize("in_place", [False, True], ids=["fresh", "in place"])
def test_a_hard_link_into_a_directory_its_owner_may_not_search_is_made(tmp_path, unprivileged, mode, in_place):
    """As another user than root, in one process: a/f's directory, given its mode 000 once left, could not be
    searched when b/g was linked to a/f (Permission denied, exit 14).  It is opened up for the link, and gets
    its mode and time back."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    (src / "a" / "deep").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "f").write_bytes(b"linked\n")
    (src / "a" / "deep" / "f").write_bytes(b"deeper\n")
    os.link(src / "a" / "f", src / "b" / "g")
    os.link(src / "a" / "deep" / "f", src / "b" / "h")
    os.chmod(src / "a" / "deep", mode)
    os.chmod(src / "a", mode)
    _cli("backup", "-r", repo, str(src))
    os.chmod(src / "a", 0o755)
    os.chmod(src / "a" / "deep", 0o755)
    target = tmp_path / "target"
    if in_place:
        _cli("restore", "-r", repo, "latest", "--target", str(target), "--processes", "2")
    _cli("restore", "-r", repo, "latest", "--target", str(target), "--processes", "1", "--confirm", "RESTORE",
         unprivileged=True)
    a = target / "a"
    recorded = os.stat(src / "a").st_mtime_ns
    assert stat.S_IMODE(os.stat(a).st_mode) == mode and os.stat(a).st_mtime_ns == recorded
    assert stat.S_IMODE(os.stat(a / "deep").st_mode) == mode
    assert os.path.samefile(target / "b" / "g", a / "f") and (target / "b" / "g").read_bytes() == b"linked\n"
    assert os.path.samefile(target / "b" / "h", a / "deep" / "f")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_target_of_another_users_keeps_its_mode_and_times_with_a_warning(tmp_path, processes):
    """A shared directory (1777) another user owns, restored into by one who may not set its mode: all else
    was restored, and the restore ended with ". could not be written" (exit 14); --verify then found the
    root's mode and times different."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"restored\n")
    os.chmod(src, 0o750)
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / "shared"
    target.mkdir()
    os.chown(target, 65534, 65534)
    os.chmod(target, 0o1777)
    before = os.stat(target)
    proc = subprocess.run(["setpriv", "--bounding-set", "-chown,-fowner", sys.executable, "-m", "chunkvault.cli",
                           "restore", "-r", repo, "latest", "--target", str(target), "--processes", processes,
                           "--verify", "--json"], env={**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["verified"] and result["dirs"] == 1 and result["files"] == 1
    assert f"restore target {target} is another user's directory (uid 65534): its mode and times left as they " \
           "are" in result["warnings"]
    assert (target / "d" / "f").read_bytes() == b"restored\n"
    now = os.stat(target)
    assert stat.S_IMODE(now.st_mode) == 0o1777 and now.st_uid == 65534 and now.st_mtime_ns >= before.st_mtime_ns


@pytest.mark.parametrize("how", [[], ["--confirm", "RESTORE"], ["--overwrite", "never"]],
                         ids=["plain", "in place", "never"])
def test_a_target_this_user_may_not_list_is_one_line_and_exit_14(tmp_path, unprivileged, how):
    """Whether it was empty was asked before the restore began, and its PermissionError was an internal error
    (exit 1, "rerun with --debug")."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / "closed"
    target.mkdir(mode=0o000)
    try:
        proc = _cli("restore", "-r", repo, "latest", "--target", str(target), *how, ok=(14,), unprivileged=True)
    finally:
        os.chmod(target, 0o700)
    assert _one_line(proc) == f"chunkvault: cannot restore into {target}: Permission denied"
    assert os.listdir(target) == []


def test_hard_links_restored_in_place_replace_the_files_there_and_leave_nothing_beside(tmp_path):
    """Linked beside the file there and renamed over it; a link already right (a rerun) is left as it is."""
    repo, target, root = _linked_pair(tmp_path)
    for _ in range(2):
        _cli("restore", "-r", repo, "latest", "--target", str(target), "--confirm", "RESTORE")
        assert os.path.samefile(root / "b" / "g", root / "a" / "f")
        assert (root / "b" / "g").read_bytes() == b"good\n"
        assert sorted(os.listdir(root / "b")) == ["g"]


def test_delta_rewrites_a_file_this_user_may_not_read(tmp_path, unprivileged):
    """Mode 0200: --delta could not rerun a restore over the tree it had made itself (it opened the file to
    compare it); it is written anew, as a plain restore in place writes it."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    src.mkdir()
    (src / "wo").write_bytes(b"write only\n")
    os.chmod(src / "wo", 0o200)
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    _cli("restore", "-r", repo, "latest", "--target", str(target), unprivileged=True)
    restored = next(target.rglob("wo"))
    os.chmod(restored, 0o600)
    restored.write_bytes(b"changed since\n")
    os.chmod(restored, 0o200)
    _cli("restore", "-r", repo, "latest", "--target", str(target), "--confirm", "RESTORE", "--delta",
         unprivileged=True)
    assert restored.read_bytes() == b"write only\n" and stat_mode(restored) == 0o200


def test_delta_replaces_a_program_that_is_running_as_a_plain_restore_does(tmp_path, new_repo):
    """A program running from the target cannot be opened for writing (ETXTBSY): --delta failed that file
    (exit 14) where a plain restore replaced it; it is written anew and renamed over, the running one
    keeping its old copy."""
    program = shutil.which("sleep")
    if program is None:
        pytest.skip("needs sleep")

    def make(src: Path) -> None:
        shutil.copy2(program, src / "prog")
    repo, _, src = backed_up(tmp_path, new_repo, make)
    target = tmp_path / "target"
    repo.restore("latest", str(target))
    with open(target / "prog", "ab") as f:
        f.write(b"changed since")
    running = subprocess.Popen([str(target / "prog"), "30"])
    try:
        result = repo.restore("latest", str(target), force=True, delta=True, verify=True)
    finally:
        running.kill()
        running.wait()
    assert not result.unwritten
    assert (target / "prog").read_bytes() == (src / "prog").read_bytes()
    assert describe(target) == describe(src) and sorted(os.listdir(target)) == ["prog"]


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_a_plain_restore_in_place_writes_into_a_read_only_directory_of_this_user(tmp_path, unprivileged):
    """Mode 0555 as backed up: --delta and a fresh restore wrote into it, a plain restore in place failed
    (exit 14).  It is opened up while written, and given its recorded mode at the end."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo, "--kdf-time", "0")
    src = tmp_path / "src"
    (src / "ro").mkdir(parents=True)
    (src / "ro" / "f").write_bytes(b"first\n")
    os.chmod(src / "ro", 0o555)
    first = json.loads(_cli("backup", "-r", repo, str(src), "--json").stdout)["id"]
    os.chmod(src / "ro", 0o755)
    (src / "ro" / "f").write_bytes(b"second\n")
    os.chmod(src / "ro", 0o555)
    _cli("backup", "-r", repo, str(src))
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    _cli("restore", "-r", repo, "latest", "--target", str(target), unprivileged=True)
    _cli("restore", "-r", repo, first, "--target", str(target), "--confirm", "RESTORE", unprivileged=True)
    ro = next(target.rglob("ro"))
    assert (ro / "f").read_bytes() == b"first\n" and stat_mode(ro) == 0o555


def test_delete_in_place_opens_up_this_users_own_read_only_directories(tmp_path, unprivileged):
    """A user's tree restored with its modes (a module cache, all 0555): --delete could not remove what was
    added in such a directory, nor a directory of the user's own with mode 000 where the snapshot has a file."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "ro").mkdir(parents=True)
    (src / "ro" / "a").write_bytes(b"snapshot")
    (src / "slot").write_bytes(b"a file")
    os.chmod(src / "ro", 0o555)
    try:
        _cli("backup", "-r", repo, str(src))
    finally:
        os.chmod(src / "ro", 0o755)
    live = tmp_path / "live"
    _cli("restore", "-r", repo, "latest", "--target", str(live), unprivileged=True)
    os.chmod(live / "ro", 0o755)
    (live / "ro" / "extra").write_bytes(b"added")
    (live / "ro" / "a").write_bytes(b"changed")
    os.chmod(live / "ro", 0o555)
    (live / "slot").unlink()
    (live / "slot").mkdir()
    (live / "slot" / "inside").write_bytes(b"x")
    os.chmod(live / "slot", 0o000)
    for delta in ([], ["--delta"]):
        _cli("restore", "-r", repo, "latest", "--target", str(live), "--confirm", "RESTORE", "--delete", *delta,
             unprivileged=True)
        assert sorted(p.name for p in live.iterdir()) == ["ro", "slot"]
        assert sorted(p.name for p in (live / "ro").iterdir()) == ["a"]
        assert (live / "ro" / "a").read_bytes() == b"snapshot" and (live / "slot").read_bytes() == b"a file"
        assert stat.S_IMODE((live / "ro").stat().st_mode) == 0o555
        os.chmod(live / "ro", 0o755)
        (live / "ro" / "extra").write_bytes(b"added again")
        os.chmod(live / "ro", 0o555)


@pytest.mark.parametrize("mode", [0o000, 0o600, 0o400], ids=["000", "0600", "0400"])
def test_delete_in_place_empties_this_users_own_directories_it_may_not_list(tmp_path, unprivileged, mode):
    """A directory of mode 000 that the snapshot has, restored so by its user: --delete could not list it,
    so what was added in it stayed, with a warning and exit 0, the target no longer equal to the snapshot.
    One it may list but not search (0600, 0400): each entry's lstat failed, and what was added stayed too,
    named as not deleted (exit 14); one removed whole had a warning for each entry in it."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "locked" / "inner").mkdir(parents=True)
    (src / "locked" / "kept").write_bytes(b"snapshot")
    (src / "locked" / "inner" / "deep").write_bytes(b"deep")
    os.chmod(src / "locked" / "inner", mode)
    os.chmod(src / "locked", mode)
    _cli("backup", "-r", repo, str(src))
    live = tmp_path / "live"
    _cli("restore", "-r", repo, "latest", "--target", str(live), unprivileged=True)
    mtime = (live / "locked").stat().st_mtime_ns
    for delta in ([], ["--delta"]):
        os.chmod(live / "locked", 0o700)
        os.chmod(live / "locked" / "inner", 0o700)
        (live / "locked" / "extra").write_bytes(b"added")
        (live / "locked" / "inner" / "extra").write_bytes(b"added")
        (live / "gone").mkdir()
        (live / "gone" / "extra").write_bytes(b"added")
        os.chmod(live / "gone", mode)
        os.chmod(live / "locked" / "inner", mode)
        os.chmod(live / "locked", mode)
        proc = _cli("restore", "-r", repo, "latest", "--target", str(live), "--confirm", "RESTORE", "--delete",
                    *delta, unprivileged=True)
        assert "3 entries the snapshot lacks deleted" in proc.stdout + proc.stderr and not (live / "gone").exists()
        assert "cannot read directory" not in proc.stderr and "cannot stat" not in proc.stderr
        assert stat.S_IMODE((live / "locked").stat().st_mode) == mode
        assert (live / "locked").stat().st_mtime_ns == mtime
        os.chmod(live / "locked", 0o700)
        os.chmod(live / "locked" / "inner", 0o700)
        assert sorted(p.name for p in (live / "locked").iterdir()) == ["inner", "kept"]
        assert [p.name for p in (live / "locked" / "inner").iterdir()] == ["deep"]
        os.chmod(live / "locked" / "inner", mode)
        os.chmod(live / "locked", mode)
    os.chmod(live / "locked", 0o700)
    os.chmod(live / "locked" / "inner", 0o700)


_WATCHING_WARNINGS = textwrap.dedent("""
    import json, sys
    from chunkvault import Repository
    from chunkvault.store import restore

    given = []

    class Watched(list):
        def append(self, warning):
            given.append(warning)
            super().append(warning)

    made = restore.Restorer.__init__

    def watched(self, *args, **kwargs):
        made(self, *args, **kwargs)
        self.result.warnings = Watched()

    restore.Restorer.__init__ = watched
    repo = Repository.open(sys.argv[1], sys.argv[3])
    result = repo.restore("latest", sys.argv[2], force=True, delete=True)
    print(json.dumps({"given": given, "kept": list(result.warnings), "deleted": result.deleted}))
""")


@pytest.mark.parametrize("mode", [0o000, 0o600, 0o400], ids=["000", "0600", "0400"])
def test_delete_gives_no_warning_for_what_it_then_opens_up_or_removes_whole(tmp_path, unprivileged, mode):
    """Entries of a directory this user may list but not search (each lstat refused), and directories it may
    not list, were warned of as the walk met them, and the warning taken back once --delete had opened the
    directory up and walked it, or removed it whole: whatever watched the warnings as they came saw each."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "locked" / "inner").mkdir(parents=True)
    (src / "locked" / "kept").write_bytes(b"snapshot")
    os.chmod(src / "locked" / "inner", mode)
    os.chmod(src / "locked", mode)
    _cli("backup", "-r", repo, str(src))
    live = tmp_path / "live"
    _cli("restore", "-r", repo, "latest", "--target", str(live), unprivileged=True)
    os.chmod(live / "locked", 0o700)
    (live / "locked" / "extra").write_bytes(b"added")
    (live / "gone").mkdir()
    (live / "gone" / "extra").write_bytes(b"added")
    os.chmod(live / "gone", mode)
    os.chmod(live / "locked", mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    proc = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", _WATCHING_WARNINGS, repo, str(live), PASSWORD],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["deleted"] == 2 and not (live / "gone").exists()
    assert out["given"] == out["kept"] == []
    os.chmod(live / "locked", 0o700)
    assert sorted(p.name for p in (live / "locked").iterdir()) == ["inner", "kept"]
    os.chmod(live / "locked", mode)


AS_NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("paths", [1, 2], ids=["root-recorded-0777", "several-paths"])
def test_an_empty_target_others_may_write_in_is_closed_while_a_restore_as_root_fills_it(tmp_path, new_repo, paths):
    """Root restoring into an empty 0777 directory left it open while it wrote: another user could make a
    directory where the snapshot has one (the restore took it, and wrote the snapshot's files into a directory
    that user owned and could rearrange until the end), or put anything else in the tree.  Files and links
    planted were refused already (O_EXCL, O_NOFOLLOW, a link out of the target never followed)."""
    sources = _shared_sources(tmp_path, paths)
    repo = new_repo()
    repo.backup([str(s) for s in sources])
    reachable = Path(tempfile.mkdtemp(prefix="shared-"))  # where that user can reach it (tmp_path is 0700)
    os.chmod(reachable, 0o755)
    target = reachable / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    plant, planted = _planter(target)

    try:
        result = repo.restore("latest", str(target), progress=plant, processes=1)
        _check_closed_while_filled(target, sources, planted, result)
    finally:
        shutil.rmtree(reachable)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("paths", [1, 2], ids=["root-recorded-0777", "several-paths"])
def test_a_target_others_may_write_in_is_closed_while_a_restore_as_root_fills_it_in_place(tmp_path, new_repo,
                                                                                          paths):
    """In place, a target others may write in was left open while the restore wrote: what another user made
    there meanwhile (a directory where the snapshot has one, which the restore took, and the snapshot's files
    in it, that user's to rearrange until the end) came after --delete's walk and stayed, in a tree that was
    all root's at the end.  It is closed as an empty one is; its mode given back at the end."""
    sources = _shared_sources(tmp_path, paths)
    repo = new_repo()
    repo.backup([str(s) for s in sources])
    reachable = Path(tempfile.mkdtemp(prefix="shared-"))
    os.chmod(reachable, 0o755)
    target = reachable / "target"
    target.mkdir()
    os.chmod(target, 0o777)
    (target / "old").write_bytes(b"the snapshot lacks it")
    kept = (target if paths == 1 else target / sources[0].relative_to("/")) / "a"
    kept.mkdir(parents=True)  # what --delete leaves: the target is not empty when the restore looks again
    (kept / "f0").write_bytes(b"an older f0")
    plant, planted = _planter(target)

    try:
        result = repo.restore("latest", str(target), progress=plant, processes=1, force=True, delete=True)
        assert result.deleted == 1
        _check_closed_while_filled(target, sources, planted, result)
        assert "user.chunkvault.restore-mode" not in os.listxattr(target)
        (target / "old").write_bytes(b"again")
        repo.restore("latest", str(target), processes=1, overwrite="never")  # kept as it was: 0777, not 0700
        assert stat.S_IMODE(target.stat().st_mode) == 0o777
    finally:
        shutil.rmtree(reachable)


def _shared_sources(tmp_path, paths):
    """``paths`` source trees, each a shared directory (0777, backed up as it is) holding files in ``a`` and a
    private file in ``z``."""
    sources = []
    for n in range(paths):
        src = tmp_path / f"src{n}"
        (src / "a").mkdir(parents=True)
        for i in range(40):
            (src / "a" / f"f{i}").write_bytes(os.urandom(2000))
        (src / "z").mkdir()
        (src / "z" / "secret").write_bytes(b"secret")
        os.chmod(src / "z" / "secret", 0o600)
        os.chmod(src, 0o777)
        sources.append(src)
    return sources


def _planter(target):
    """A restore's progress callback that, the first time it is called, tries as nobody to plant entries in
    ``target``, and the list of what came of it: each attempt's exit code, then the target's mode then."""
    planted = []

    def plant(files, nbytes):
        if planted:
            return
        for what in (["mkdir", str(target / "z")], ["ln", "-s", "/etc", str(target / "z")],
                     ["touch", str(target / "extra")]):
            planted.append(subprocess.run([*AS_NOBODY, *what], capture_output=True).returncode)
        planted.append(stat.S_IMODE(target.stat().st_mode))

    return plant, planted


def _check_closed_while_filled(target, sources, planted, result):
    paths = len(sources)
    assert planted == [1, 1, 1, 0o700]
    assert result.files == 41 * paths and not result.unwritten
    assert stat.S_IMODE(target.stat().st_mode) == 0o777  # the recorded root's, or the one it had
    assert all(p.lstat().st_uid == 0 for p in target.rglob("*"))
    for src in sources:
        restored = target if paths == 1 else target / src.relative_to("/")
        assert describe(restored) == describe(src)


def test_delete_gives_no_warning_for_a_directory_it_may_not_list_inside_one_it_removes_whole(tmp_path, unprivileged):
    """A directory of this user's it may not list (000), or whose entries it may not stat (0600), inside one
    the snapshot lacks (0700, listed): the walk warned that it could not read the first, though --delete
    removed it with the directory around it."""
    repo = str(tmp_path / "repo")
    _cli("init", "-r", repo)
    src = tmp_path / "src"
    (src / "kept").mkdir(parents=True)
    _cli("backup", "-r", repo, str(src))
    live = tmp_path / "live"
    _cli("restore", "-r", repo, "latest", "--target", str(live), unprivileged=True)
    for name, mode in (("x", 0o000), ("y", 0o600)):
        (live / "gone" / name).mkdir(parents=True)
        (live / "gone" / name / "f").write_bytes(b"added")
        os.chmod(live / "gone" / name, mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    proc = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", _WATCHING_WARNINGS, repo, str(live), PASSWORD],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["deleted"] == 1 and not (live / "gone").exists()
    assert out["given"] == out["kept"] == []


@pytest.fixture
def victim_beside(tmp_path, new_repo):
    """(repository with a snapshot of one file, a directory out of the target holding a file of its own, its
    description, the target's path) for a link that leads a restore out of its target."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    repo = new_repo()
    repo.backup([str(src)])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"theirs")
    return repo, victim, describe(victim), tmp_path / "target"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a link another owner takes root")
def test_a_target_that_is_another_users_link_is_refused(victim_beside):
    """A target named as a link is followed; one another user owns may have been put in the target's place
    by that user just before the restore looked (they can write where it lies): a restore run as root then
    wrote the whole snapshot into the link's destination, and --delete removed what that held."""
    repo, victim, before, target = victim_beside
    os.symlink(victim, target)
    os.lchown(target, 65534, 65534)
    with pytest.raises(UsageError, match=r"is a symbolic link of another user \(uid 65534\): name the directory "
                                         rf"it leads to \({victim}\)"):
        repo.restore("latest", str(target), force=True, delete=True)
    assert describe(victim) == before
    os.lchown(target, 0, 0)  # one of root's, or of the user restoring, is followed as before
    assert repo.restore("latest", str(target), force=True).files == 1


def test_a_link_put_in_the_place_of_the_target_just_made_is_not_followed(victim_beside, monkeypatch):
    """The target checked (here: made, as it did not exist), then removed and replaced by a link by whoever
    can write where it lies, before the restore opened it: the open followed the link, and the snapshot was
    written into its destination, the owner check of a link named as the target never asked."""
    repo, victim, before, target = victim_beside
    mkdir = os.mkdir

    def swapped(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        if os.fsencode(path) == os.fsencode(target):
            os.rmdir(path)
            os.symlink(victim, path)

    monkeypatch.setattr(os, "mkdir", swapped)
    with pytest.raises(TargetUnwritable, match="a symbolic link was put in the place of the restore target .* "
                                               "while the restore began"):
        repo.restore("latest", str(target))
    assert describe(victim) == before


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_directory_of_another_user_in_place_is_taken_from_them_before_a_restore_as_root_writes_into_it(
        tmp_path, new_repo):
    """Root restoring in place into a directory the target had, another user's where the snapshot has root's,
    left it theirs (and as open as it was to its group) until the end, when it got the snapshot's owner and
    mode: meanwhile they could replace what the restore wrote there, or plant files, that stayed in a tree all
    root's.  It is taken (root's, 0700) before anything is written into it, as a fresh restore makes its
    directories; the snapshot's owner and mode at the end, as before."""
    src = tmp_path / "src"
    (src / "sec" / "inner").mkdir(parents=True)
    for i in range(20):
        (src / "sec" / f"f{i}").write_text(f"root's {i}")
    (src / "sec" / "inner" / "g").write_text("root's")
    os.chmod(src / "sec", 0o750)
    repo = new_repo()
    repo.backup([str(src)])
    reachable = Path(tempfile.mkdtemp(prefix="shared-"))  # where that user can reach it (tmp_path is 0700)
    os.chmod(reachable, 0o755)
    target = reachable / "target"
    (target / "sec" / "inner").mkdir(parents=True)
    for d, mode in ((target / "sec", 0o777), (target / "sec" / "inner", 0o755)):
        os.chown(d, 65534, 65534)
        os.chmod(d, mode)
    os.chown(target / "sec", 65534, 0)  # its group root's: another user's by its owner alone
    tried = []

    def plant(files, nbytes):
        if files == 3 and not tried:
            for name in ("sec/planted", "sec/inner/planted"):
                tried.append(subprocess.run([*AS_NOBODY, "touch", str(target / name)], capture_output=True)
                             .returncode)

    try:
        repo.restore("latest", str(target), progress=plant, processes=1, force=True)
        assert tried == [1, 1], "the other user wrote into the directory while the restore wrote there"
        assert not (target / "sec" / "planted").exists() and not (target / "sec" / "inner" / "planted").exists()
        for d, mode in ((target / "sec", 0o750), (target / "sec" / "inner", src.joinpath("sec", "inner").stat()
                                                   .st_mode & 0o7777)):
            st = d.stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode)
        assert describe(target) == describe(src)
    finally:
        shutil.rmtree(reachable)
