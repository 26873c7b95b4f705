"""verify-restore: a snapshot restored into scratch space, compared with its manifest, then checked by a command."""
import contextlib
import errno
import json
import os
import random
import shlex
import sys
import time
from datetime import datetime, timezone

import pytest

from chunkvault import cli
from chunkvault import verify as verify_mod
from chunkvault.errors import UsageError
from chunkvault.store.manifest import T_DIR, T_FILE, Entry, sort_key
from chunkvault.verify import merge_by_path, parse_since, snapshots_since, verify_restore, walk_sorted
from faults import stopped_inside_popen

PASSWORD = "correct horse battery staple"


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """The real command line, in this process (so a test can corrupt the restore step)."""
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    for k in ("CHUNKVAULT_REPOSITORY", "CHUNKVAULT_PASSWORD_FILE"):
        monkeypatch.delenv(k, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def tree(tmp_path):
    """A small tree with every kind of entry a database directory has (and a few it might)."""
    rnd = random.Random(5)
    src = tmp_path / "src"
    (src / "base" / "1").mkdir(parents=True)
    (src / "empty-dir").mkdir()
    for i in range(4):
        (src / "base" / "1" / f"{1000 + i}").write_bytes(rnd.randbytes(300_000 + i))
    (src / "PG_VERSION").write_bytes(b"15\n")
    (src / "empty").write_bytes(b"")
    (src / "zeros").write_bytes(bytes(1 << 20))
    (src / "a.b").write_bytes(b"sorts after the directory a")
    (src / "a").mkdir()
    (src / "a" / "b").write_bytes(b"inside a")
    os.symlink("base/1/1000", src / "link")
    os.link(src / "PG_VERSION", src / "PG_VERSION.hard")
    os.chmod(src / "base", 0o700)
    os.chmod(src / "PG_VERSION", 0o600)
    return src


@pytest.fixture
def repo_with_tree(tmp_path, new_repo, tree):
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(tree)]).snapshot
    return repo, snap, tree


def scratch_dir(tmp_path):
    d = tmp_path / "scratch"
    d.mkdir(exist_ok=True)
    return d


# --- the pure parts ------------------------------------------------------------------------------


def test_merge_pairs_paths_in_manifest_order():
    exp = [Entry(p, T_DIR if p in (b"", b"a") else T_FILE) for p in (b"", b"a", b"a/b", b"a.b", b"c")]
    obs = [(p, os.lstat("/")) for p in (b"", b"a", b"a/b", b"a/c", b"a.b")]
    pairs = [((e.path if e else None), (o[0] if o else None)) for e, o in merge_by_path(exp, obs)]
    assert pairs == [(b"", b""), (b"a", b"a"), (b"a/b", b"a/b"), (None, b"a/c"), (b"a.b", b"a.b"), (b"c", None)]


def test_walk_order_is_manifest_order(tree):
    errors = []
    rels = [rel for rel, _ in walk_sorted(os.fsencode(tree), errors)]
    assert not errors
    assert rels == sorted(rels, key=sort_key)
    assert rels.index(b"a/b") == rels.index(b"a") + 1 and rels.index(b"a.b") > rels.index(b"a/b")


def test_snapshots_since_is_oldest_first_and_inclusive():
    from chunkvault.store.snapshot import Snapshot

    snaps = [Snapshot(time=t, kind="full", parent=None, host="h", paths=["/x"], id=i)
             for t, i in (("2026-11-28T12:00:00+00:00", "c"), ("2026-11-28T10:00:00+00:00", "a"),
                          ("2026-11-28T11:00:00+00:00", "b"))]
    since = datetime(2026, 11, 28, 11, tzinfo=timezone.utc)
    assert [s.id for s in snapshots_since(snaps, since)] == ["b", "c"]
    now = datetime(2026, 11, 28, 12, 30, tzinfo=timezone.utc)
    assert parse_since("1h", now) == datetime(2026, 11, 28, 11, 30, tzinfo=timezone.utc)
    assert parse_since("2026-11-28T11:00:00+00:00") == since


# --- clean runs ----------------------------------------------------------------------------------


def test_clean_snapshot_verifies(repo_with_tree, tmp_path):
    repo, snap, src = repo_with_tree
    scratch = scratch_dir(tmp_path)
    report = verify_restore(repo, snap, scratch=str(scratch))
    assert report.ok, report.to_dict()
    assert report.mismatch_count == 0 and report.error is None
    assert report.files == 9  # 4 table files, PG_VERSION, empty, zeros, a.b, a/b
    assert report.bytes == sum(e.size for e in repo.tree(snap) if e.type == T_FILE)
    assert report.links == 2  # the symlink and the hard link
    assert os.listdir(scratch) == []  # removed


def test_clean_snapshot_via_cli_json(repo_with_tree, tmp_path, run_cli):
    repo, snap, src = repo_with_tree
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json",
                             "--scratch", str(scratch_dir(tmp_path)))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True
    [r] = doc["snapshots"]
    assert r["snapshot_id"] == snap.id and r["mismatches"] == [] and r["command"] is None
    assert r["bytes"] > 1 << 20


def test_command_sees_the_restored_tree_and_its_exit_code_counts(repo_with_tree, tmp_path, run_cli):
    repo, snap, src = repo_with_tree
    seen = tmp_path / "seen"
    cmd = (f'cat "$CHUNKVAULT_RESTORE_DIR/a/b" > {shlex.quote(str(seen))}; '
           f'echo " $CHUNKVAULT_SNAPSHOT_ID $CHUNKVAULT_SNAPSHOT_TIME" >> {shlex.quote(str(seen))}; '
           'echo "the check failed"; printf "\\033]0;title\\007 forged\\n"; exit 3')
    code, out, err = run_cli("verify-restore", "latest", "-r", str(tmp_path / "repo"), "--then", cmd,
                             "--scratch", str(scratch_dir(tmp_path)))
    assert code == 18
    assert seen.read_text() == f"inside a {snap.id} {snap.time}\n"
    assert "command exited 3" in out and "FAILED" in out
    assert "the check failed" in err
    assert "\x1b" not in err and "\x07" not in err and "  \\x1b]0;title\\x07 forged\n" in err  # shown, not run
    assert os.listdir(tmp_path / "scratch") == []

    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", "--then",
                             'test -s "$CHUNKVAULT_RESTORE_DIR/zeros"')
    assert code == 0, err
    assert json.loads(out)["snapshots"][0]["command"]["exit_code"] == 0
    for empty in ("", "  "):  # `--then "$CHECK"` with the variable unset passed as a database proven to start
        code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--then", empty)
        assert code == 2 and "nothing would prove the restore" in err


def test_what_the_command_leaves_running_is_stopped_and_it_gets_no_password(repo_with_tree, tmp_path, run_cli,
                                                                            monkeypatch):
    """A database it started would go on in a removed directory, with the repository password in its
    environment; a relative --scratch gives it a directory it can reach from anywhere."""
    repo, snap, src = repo_with_tree
    pidfile, seen = tmp_path / "pid", tmp_path / "seen"
    scratch_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    cmd = (f'sleep 300 & echo $! > {shlex.quote(str(pidfile))}; '
           f'cd / && test -f "$CHUNKVAULT_RESTORE_DIR/a/b" && echo "${{CHUNKVAULT_PASSWORD:-none}}" > {shlex.quote(str(seen))}')
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", "--scratch", "scratch",
                             "--then", cmd)
    assert code == 0, err
    (report,) = json.loads(out)["snapshots"]
    assert "the command left processes running: they were stopped" in report["warnings"]
    assert seen.read_text() == "none\n"
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{sleeper}") and open(f"/proc/{sleeper}/stat").read().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the command's background process is still running"
        time.sleep(0.05)
    assert os.listdir(tmp_path / "scratch") == []


def test_command_is_killed_after_the_timeout(repo_with_tree, tmp_path, run_cli):
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", "--then",
                             "sleep 60 & sleep 60", "--timeout", "0.5")
    assert code == 18
    c = json.loads(out)["snapshots"][0]["command"]
    assert c["timed_out"] is True and c["exit_code"] is None


def test_a_stopped_verification_ends_its_command_and_removes_its_scratch(repo_with_tree, tmp_path):
    """SIGTERM while the command runs (in a session of its own, out of reach of the signal): the command's
    whole group is ended with it, and the scratch directory removed."""
    import signal
    import subprocess

    scratch = scratch_dir(tmp_path)
    started = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "verify-restore", "-r", str(tmp_path / "repo"),
                             "--scratch", str(scratch), "--then", f"sleep 60 & echo $$ > {started}; wait"],
                            env={**env, "CHUNKVAULT_PASSWORD": PASSWORD}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (started.exists() and started.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    group = int(started.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    assert proc.stderr.read().decode().strip() == "chunkvault: terminated"
    deadline = time.monotonic() + 10
    while living_members(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert living_members(group) == []
    assert os.listdir(scratch) == []


def living_members(group: int) -> list[int]:
    """The processes of a process group that are not zombies (which only wait to be reaped)."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if name.isdigit() and int(fields[2]) == group and fields[0] != "Z":
            found.append(int(name))
    return found


# --- what it must catch ------------------------------------------------------------------------------


def corrupting(monkeypatch, damage):
    """Let the real restore run, then damage what it wrote (the repository itself refuses corrupt data)."""
    real = verify_mod._restore

    def restore(repo, snap, target, numeric_owner=False):
        result = real(repo, snap, target, numeric_owner)
        damage(target)
        return result

    monkeypatch.setattr(verify_mod, "_restore", restore)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_json_names_a_differing_path_that_is_not_utf8_by_its_bytes(tmp_path, new_repo, monkeypatch, run_cli):
    """A mismatch's path and a warning naming a file that is not UTF-8 held lone surrogates only, which a
    parser in another language reads as U+FFFD: ``path_b64`` and ``warnings_b64`` give the bytes, as
    every other command's JSON does."""
    import base64

    src = tmp_path / "src"
    src.mkdir()
    name = b"caf\xe9\nbill"
    with open(os.path.join(os.fsencode(src), name), "wb") as f:
        f.write(b"original")
    (src / "plain").write_bytes(b"plain")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])

    def damage(target):
        with open(os.path.join(os.fsencode(target), name), "r+b") as f:
            f.write(b"O")

    corrupting(monkeypatch, damage)
    real = verify_mod._restore

    def warned(repo, snap, target, numeric_owner=False):
        result = real(repo, snap, target, numeric_owner)
        result.warnings.append(f"about {os.fsdecode(name)}")
        return result

    monkeypatch.setattr(verify_mod, "_restore", warned)
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json",
                             "--scratch", str(scratch_dir(tmp_path)))
    assert code == 18, err
    r = json.loads(out)["snapshots"][0]
    assert {m["kind"] for m in r["mismatches"]} >= {"content"}
    for m in r["mismatches"]:
        assert base64.b64decode(m["path_b64"]) == name and m["path"] == os.fsdecode(name)
    assert [base64.b64decode(w) for w in r["warnings_b64"]][-1] == b"about " + name


def test_an_attribute_the_scratch_file_system_refuses_is_said_as_its_limit(tmp_path, new_repo, monkeypatch,
                                                                          run_cli):
    """An attribute the scratch directory's file system refuses (a value larger than a block on ext4, a
    namespace it keeps none of) read as any difference: nothing told it from a restore gone wrong.  Tried on
    a file of its own there, it is said as the target's limit; an attribute restored wrong is not."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(b"big")
    os.setxattr(src / "big", "user.big", b"x" * 100)
    (src / "other").write_bytes(b"other")
    os.setxattr(src / "other", "user.k", b"v")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    real = os.setxattr

    def setxattr(target, name, value, *args, **kwargs):  # the file system's limit
        if os.fsencode(name) == b"user.big":  # (no space for a value this small would be a full target's)
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        return real(target, name, value, *args, **kwargs)

    monkeypatch.setattr(os, "setxattr", setxattr)
    corrupting(monkeypatch, lambda target: real(os.path.join(target, "other"), "user.k", b"w"))
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json",
                             "--scratch", str(scratch_dir(tmp_path)))
    assert code == 18, err
    r = json.loads(out)["snapshots"][0]
    found = {m["path"]: m for m in r["mismatches"]}
    assert found["big"]["kind"] == "xattrs" and os.strerror(errno.ENOTSUP) in found["big"]["limit"]
    assert found["other"]["kind"] == "xattrs" and found["other"]["limit"] is None
    assert r["mismatch_count"] == 2 and r["mismatches_limited"] == 1
    assert os.listdir(scratch_dir(tmp_path)) == []  # the probe files too
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--scratch", str(scratch_dir(tmp_path)))
    assert "the target's file system refuses user.big of 100 bytes" in out
    assert "2 mismatch(es), 1 of them what the scratch directory's file system cannot hold" in out


def test_a_time_restored_wrong_is_no_limit_of_a_target_that_cannot_hold_the_right_one(tmp_path, new_repo):
    """A time the target cannot hold (past 2038 on ext4 with small inodes) was said as its limit whatever
    the copy held: a file left with another time (a restore gone wrong) read as the target's limit too.
    It is one only where the copy holds what the target keeps instead."""
    from chunkvault.verify import compare_tree
    from treeutil import mounted_ext4_whole_seconds

    src = tmp_path / "src"
    src.mkdir()
    for name in ("clamped", "wrong"):
        (src / name).write_bytes(b"data")
        os.utime(src / name, ns=(4_102_444_800 * 10**9,) * 2)  # 2100
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    target.mkdir()
    with mounted_ext4_whole_seconds(str(target)):
        repo.restore("latest", str(target / "a"))
        os.utime(target / "a" / "wrong", ns=(1_700_000_000 * 10**9,) * 2)  # a time it holds
        found = {m.path: m for m in compare_tree(repo.tree("latest"), str(target / "a")).mismatches}
        assert found["clamped"].kind == "mtime" and "holds no such time" in found["clamped"].limit
        assert found["wrong"].kind == "mtime" and found["wrong"].limit is None


def test_an_attribute_a_full_target_cannot_take_is_no_limit_of_its_file_system(tmp_path, new_repo):
    """A probe's attribute refused for want of space (the target is full, not unable to hold it) was said as
    the file system's limit: an attribute the restore left out read as one on a full target."""
    from chunkvault.verify import compare_tree
    from treeutil import mounted_ext4_whole_seconds

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    os.setxattr(src / "f", "user.k", b"v" * 500)  # fits a block: no inode of 128 bytes holds it
    (src / "g").write_bytes(b"data")
    os.setxattr(src / "g", "user.big", b"v" * 1100)  # larger than its block of 1 KiB: it holds none such
    repo = new_repo()
    repo.backup([str(src)])
    target = tmp_path / "target"
    target.mkdir()
    with mounted_ext4_whole_seconds(str(target)):
        repo.restore("latest", str(target / "a"))
        os.removexattr(target / "a" / "f", "user.k")  # the restore gone wrong
        with open(target / "fill", "wb", buffering=0) as f:
            for size in (64 << 10, 1 << 10, 1):  # to its last byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)
        found = {m.path: m for m in compare_tree(repo.tree("latest"), str(target / "a")).mismatches}
        assert found["f"].kind == "xattrs" and found["f"].limit is None, found
        assert "refuses user.big of 1100 bytes: No space left on device" in found["g"].limit
        os.unlink(target / "fill")


def test_a_changed_byte_is_caught_even_with_size_and_mtime_kept(repo_with_tree, tmp_path, monkeypatch, run_cli):
    def damage(target):
        p = os.path.join(target, "base/1/1002")
        before = os.stat(p)
        flip_byte(p, 123_457)
        os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))

    corrupting(monkeypatch, damage)
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", "--then", "true")
    assert code == 18
    r = json.loads(out)["snapshots"][0]
    assert [(m["kind"], m["path"]) for m in r["mismatches"]] == [("content", "base/1/1002")]
    assert r["command"] is None  # not worth running on a tree that is not the snapshot
    assert any("command was not run" in w for w in r["warnings"])


def test_missing_and_extra_files_are_caught(repo_with_tree, tmp_path, monkeypatch):
    def damage(target):
        os.remove(os.path.join(target, "a", "b"))
        with open(os.path.join(target, "base", "stray"), "wb") as f:
            f.write(b"not in the snapshot")

    corrupting(monkeypatch, damage)
    repo, snap, _ = repo_with_tree
    report = verify_restore(repo, snap, scratch=str(scratch_dir(tmp_path)))
    assert not report.ok
    got = {(m.kind, m.path) for m in report.mismatches}
    assert ("missing", "a/b") in got and ("extra", "base/stray") in got
    assert ("mtime", "a") in got and ("mtime", "base") in got  # the removals touched their directories
    assert report.mismatch_count == len(report.mismatches) == 4
    assert os.listdir(tmp_path / "scratch") == []  # removed after a failure too


def test_metadata_differences_are_caught(repo_with_tree, tmp_path, monkeypatch):
    def damage(target):
        j = lambda *p: os.path.join(target, *p)  # noqa: E731
        os.chmod(j("PG_VERSION"), 0o644)
        st = os.stat(j("a", "b"))
        os.utime(j("a", "b"), ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        dir_st = os.stat(target)
        os.remove(j("link"))
        os.symlink("base/1/1001", j("link"))
        os.utime(j("link"), ns=(st.st_atime_ns, os.lstat(j("link")).st_mtime_ns), follow_symlinks=False)
        os.remove(j("PG_VERSION.hard"))  # same content, but no longer the same file
        with open(j("PG_VERSION"), "rb") as src, open(j("PG_VERSION.hard"), "wb") as dst:
            dst.write(src.read())
        os.utime(target, ns=(dir_st.st_atime_ns, dir_st.st_mtime_ns))
        if os.geteuid() == 0:
            os.chown(j("empty"), 4242, 4242)

    corrupting(monkeypatch, damage)
    repo, snap, _ = repo_with_tree
    report = verify_restore(repo, snap)
    got = {(m.kind, m.path): m for m in report.mismatches}
    assert got[("mode", "PG_VERSION")].expected == "0o600" and got[("mode", "PG_VERSION")].actual == "0o644"
    assert ("mtime", "a/b") in got
    assert got[("target", "link")].actual == "base/1/1001"
    assert got[("hardlink", "PG_VERSION.hard")].expected == "a link to PG_VERSION"
    if os.geteuid() == 0:
        assert got[("owner", "empty")].actual == "4242:4242"
    assert not report.ok


def test_separate_files_restored_as_one_are_caught(tmp_path, new_repo, monkeypatch):
    """Two files of the same content, mode and times: restored as links of one file, every field compares
    equal but their inode; a change to one would be a change to the other."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b"):
        (src / name).write_bytes(b"same content\n")
        os.utime(src / name, ns=(10**18, 10**18))
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot

    def damage(target):
        st = os.stat(target)
        os.remove(os.path.join(target, "b"))
        os.link(os.path.join(target, "a"), os.path.join(target, "b"))
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    corrupting(monkeypatch, damage)
    report = verify_restore(repo, snap, scratch=str(scratch_dir(tmp_path)))
    assert [(m.kind, m.path, m.expected) for m in report.mismatches] == [("hardlink", "b", "a separate file")]


def test_a_type_change_is_caught(repo_with_tree, tmp_path, monkeypatch):
    def damage(target):
        p = os.path.join(target, "empty-dir")
        os.rmdir(p)
        open(p, "wb").close()

    corrupting(monkeypatch, damage)
    repo, snap, _ = repo_with_tree
    report = verify_restore(repo, snap)
    assert ("type", "empty-dir") in {(m.kind, m.path) for m in report.mismatches}


def test_corrupt_repository_data_fails_the_run(repo_with_tree, tmp_path, run_cli):
    repo, snap, _ = repo_with_tree
    packs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "repo" / "data") for f in fs]
    biggest = max(packs, key=os.path.getsize)
    flip_byte(biggest, os.path.getsize(biggest) // 3)
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json",
                             "--scratch", str(scratch_dir(tmp_path)))
    assert code == 18
    r = json.loads(out)["snapshots"][0]
    assert r["error"] and "corrupt" in r["error"]
    assert 0 < r["files"] < snap.stats["files"] and r["dirs"] > 0  # what the restore did write, not 0
    assert os.listdir(tmp_path / "scratch") == []


def test_keep_leaves_the_restored_tree(repo_with_tree, tmp_path, run_cli):
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", "--keep",
                             "--scratch", str(scratch_dir(tmp_path)))
    assert code == 0, err
    kept = json.loads(out)["snapshots"][0]["kept_at"]
    assert kept.startswith(str(tmp_path / "scratch"))
    assert open(os.path.join(kept, "a", "b"), "rb").read() == b"inside a"


# --- several snapshots ---------------------------------------------------------------------------------


def test_all_since_verifies_each_later_snapshot_oldest_first(tmp_path, new_repo, tree, run_cli):
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(tree)]).snapshot
    time.sleep(0.01)
    cut = datetime.now(timezone.utc)
    (tree / "a" / "b").write_bytes(b"second version")
    second = repo.backup([str(tree)]).snapshot
    os.remove(tree / "a.b")
    third = repo.backup([str(tree)]).snapshot
    assert second.kind == third.kind == "diff"
    check = 'test "$(cat "$CHUNKVAULT_RESTORE_DIR/a/b")" = "second version"'
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json",
                             "--all-since", cut.isoformat(), "--then", check)
    assert code == 0, err
    reports = json.loads(out)["snapshots"]
    assert [r["snapshot_id"] for r in reports] == [second.id, third.id]
    assert all(r["ok"] for r in reports)

    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--all-since", "2000-01-01",
                             "--then", check)
    assert code == 18  # the first snapshot has the first version
    assert f"snapshot {first.short_id}" in out and "1 failed" in out

    code, _, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--all-since", "2999-01-01")
    assert code == 12 and "no snapshot" in err
    code, _, err = run_cli("verify-restore", "latest", "-r", str(tmp_path / "repo"), "--all-since", "1d")
    assert code == 2


def test_bad_arguments(repo_with_tree, tmp_path, run_cli):
    code, _, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--scratch", str(tmp_path / "nope"))
    assert code == 2 and "scratch" in err
    for never in ("0", "nan", "inf", "1e999"):  # nan and inf meant no timeout at all
        code, _, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--timeout", never, "--then", "true")
        assert code == 2 and "--timeout must be a positive number of seconds" in err, never
    code, _, err = run_cli("verify-restore", "ffffffff", "-r", str(tmp_path / "repo"))
    assert code == 12


def test_a_scratch_path_that_is_a_file_is_said_to_be_one(repo_with_tree, tmp_path, run_cli):
    """It was said not to exist, and the user looked for a typo in a path that was there."""
    repo, snap, _ = repo_with_tree
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"^scratch directory .*afile is not a directory$"):
        verify_restore(repo, snap, scratch=str(tmp_path / "afile"))
    code, _, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--scratch", str(tmp_path / "afile"))
    assert code == 2 and "afile is not a directory" in err
    with pytest.raises(UsageError, match=r"^scratch directory does not exist: .*nope$"):
        verify_restore(repo, snap, scratch=str(tmp_path / "nope"))


def test_api_runs_the_command_with_a_given_environment(repo_with_tree, tmp_path):
    repo, snap, _ = repo_with_tree
    cmd = f'{shlex.quote(sys.executable)} -c "import os,sys; sys.exit(0 if os.environ[\'EXTRA\'] == \'1\' and ' \
          f'os.path.isdir(os.environ[\'CHUNKVAULT_RESTORE_DIR\']) else 5)"'
    report = verify_restore(repo, snap, then=cmd, env={**os.environ, "EXTRA": "1"})
    assert report.ok and report.command is not None and report.command.exit_code == 0
    report = verify_restore(repo, snap, then=cmd, env={**os.environ, "EXTRA": "0"})
    assert not report.ok and report.command.exit_code == 5


@pytest.mark.filterwarnings("ignore::chunkvault.ledger.RepositoryStateWarning")
def test_a_snapshot_object_that_does_not_load_fails_the_run(tmp_path, new_repo, tree, run_cli):
    """It cannot be dated, so it may be in the range: a verification run that skipped it would prove less
    than it says."""
    repo = new_repo(str(tmp_path / "repo"))
    first = repo.backup([str(tree)]).snapshot
    (tree / "a" / "b").write_bytes(b"second version")
    second = repo.backup([str(tree)]).snapshot
    path = tmp_path / "repo" / "snapshots" / second.id
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    for span in (["--all-since", "2000-01-01"], [], ["latest"]):  # the latest may be the one that does not load
        code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", *span)
        assert code == 18, err
        reports = {r["snapshot_id"]: r for r in json.loads(out)["snapshots"]}
        assert reports[first.id]["ok"] and not reports[second.id]["ok"]
        assert "the snapshot object is unreadable" in reports[second.id]["error"]
    code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), second.id[:8])
    assert code == 13 and "unreadable" in err  # damaged, not "no such snapshot"


def test_a_stream_stored_below_a_directory_verifies(tmp_path, new_repo, monkeypatch):
    """`--stdin-name dumps/app.sql`: the restore makes dumps/ to hold it, which the manifest does not list;
    it is not an extra (a correct snapshot failed every run), but a directory with nothing of the snapshot
    below it still is."""
    import io

    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup_stream(io.BytesIO(b"hello\n"), "dumps/daily/app.sql").snapshot
    report = verify_restore(repo, snap.id, scratch=str(scratch_dir(tmp_path)))
    assert report.ok and report.mismatch_count == 0, report.mismatches
    corrupting(monkeypatch, lambda target: os.mkdir(os.path.join(target, "dumps", "stray")))
    report = verify_restore(repo, snap.id, scratch=str(scratch_dir(tmp_path)))
    assert [(m.kind, m.path) for m in report.mismatches] == [("extra", "dumps/stray")]


def _ended(pid: int, within: float = 10.0) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["setsid", "orphaned in its group"])
@pytest.mark.parametrize("timeout", [None, 1.0])
def test_a_daemon_the_command_detached_from_its_group_is_stopped_too(tmp_path, how, timeout):
    """`pg_ctl start` runs the server in a session of its own: killing the command's process group missed
    it, and the database went on in the removed scratch directory, holding its port for the next run.
    Whatever the command detached comes to us when its parent exits, and is stopped with the rest, after
    a timeout too."""
    from chunkvault.verify import run_command

    pidfile = shlex.quote(str(tmp_path / "pid"))
    detach = {"setsid": f"setsid sleep 300 >/dev/null 2>&1 < /dev/null & echo $! > {pidfile}",
              "orphaned in its group": f"(sh -c 'sleep 300 & echo $! > {pidfile}' &)"}[how]
    rest = "sleep 30" if timeout else "sleep 0.3"
    result = run_command(f"{detach}; {rest}", dict(os.environ), timeout=timeout)
    assert result.timed_out == bool(timeout)
    assert result.leftovers != bool(timeout)  # reported when the command ended on its own
    daemon = int((tmp_path / "pid").read_text())
    assert _ended(daemon, within=0.5), f"{how}: the detached process still runs"


def test_a_scratch_directory_without_space_is_exit_14_not_a_failed_verification(tmp_path, new_repo, run_cli):
    """A full scratch disk says nothing about the backups: monitoring must tell it from a damaged
    snapshot (18).  The report names it, and the command it would have run is said not to have run
    because the restore failed."""
    from treeutil import mounted_tmpfs

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    scratch = scratch_dir(tmp_path)
    with mounted_tmpfs(str(scratch), size="1m"):
        code, out, err = run_cli("verify-restore", "-r", str(tmp_path / "repo"), "--json", "--scratch",
                                 str(scratch), "--then", "true")
        assert code == 14, err
        (report,) = json.loads(out)["snapshots"]
        assert report["error_kind"] == "no_space" and not report["ok"]
        assert "the command was not run: the restore failed" in report["warnings"]
        assert "no space left in the scratch directory" in err
        assert os.listdir(scratch) == []


def test_a_child_another_thread_starts_while_the_command_runs_is_not_taken_for_its_leftover():
    """Every new child of this process was taken for one: a program calling verify_restore lost its own."""
    import subprocess
    import threading

    from chunkvault.verify import run_command

    mine: list[subprocess.Popen] = []
    started = threading.Timer(0.3, lambda: mine.append(subprocess.Popen(["sleep", "5"])))
    started.start()
    result = run_command("sleep 1", dict(os.environ))
    started.join()
    try:
        assert mine and mine[0].poll() is None and not result.leftovers
    finally:
        mine[0].kill()
        mine[0].wait()


def test_a_scratch_tree_that_denies_its_owner_and_runs_past_path_max_is_removed(tmp_path):
    """Run as another user than root, verify-restore made the restored directories writable by their full
    paths: one longer than the system takes failed, and the whole scratch copy stayed behind."""
    import shutil
    import subprocess
    import sys

    setpriv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if os.geteuid() != 0 or shutil.which("setpriv") is None or subprocess.run([*setpriv, "true"]).returncode:
        pytest.skip("needs root and setpriv, to be denied as another user would be")
    top = tmp_path / "scratch"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    modes = []
    for level in range(30):  # 30 levels of 200-byte names: a path of about 6 KB
        name = f"{level:03}" + "d" * 197
        os.mkdir(name, dir_fd=fd)
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o400, dir_fd=fd), "wb") as f:
            f.write(b"x")
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        modes.append((fd, [0o500, 0o000, 0o300][level % 3]))
        fd = child
    os.close(fd)
    for dir_fd, mode in reversed(modes):  # deepest first: each is reached through its parent's descriptor
        os.chmod(f"/proc/self/fd/{dir_fd}", mode)
        os.close(dir_fd)
    script = "import sys; from chunkvault.verify import remove_tree; remove_tree(sys.argv[1])"
    done = subprocess.run([*setpriv, sys.executable, "-c", script, str(top)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not top.exists()


def test_an_interrupted_run_ends_what_the_command_started_with_sigterm_first(tmp_path):
    """A database server the command started is asked to shut down (SIGTERM), as when the command ends on its
    own: SIGKILL left PostgreSQL's shared memory behind for good."""
    import signal
    import subprocess
    import sys

    termed, pidfile = tmp_path / "termed", tmp_path / "pid"
    server = (f"trap 'echo stopped > {shlex.quote(str(termed))}; exit 0' TERM; "
              f"echo $$ > {shlex.quote(str(pidfile))}; while :; do sleep 0.1; done")
    command = f"setsid sh -c {shlex.quote(server)} </dev/null >/dev/null 2>&1 & sleep 60"
    script = ("import os, sys\nfrom chunkvault.verify import run_command\n"
              f"run_command({command!r}, dict(os.environ))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the trap set
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert b"KeyboardInterrupt" in err
    assert _ended(int(pidfile.read_text()), within=5)
    assert termed.read_text() == "stopped\n"


def test_a_stop_while_the_command_starts_ends_it(tmp_path, monkeypatch):
    """A stop handled inside ``subprocess.Popen``, the command running already (a loaded machine), left it
    running on its own: a database it started went on in a scratch directory about to be removed."""
    from chunkvault.verify import run_command

    started = tmp_path / "started"
    with stopped_inside_popen(monkeypatch, started) as pids:
        with pytest.raises(KeyboardInterrupt):
            run_command(f"touch {shlex.quote(str(started))}; exec sleep 60", dict(os.environ), end_leftovers=False)
        assert _ended(pids[0], within=5)


def test_the_scratch_directory_of_a_killed_run_is_removed_by_the_next(tmp_path, new_repo):
    """SIGKILL (the OOM killer) left a scratch tree as large as its restore for good.  A run's marker is
    locked while it lasts: the next run removes a tree whose marker no one holds, and leaves a kept one
    (no marker), one still running (locked) and one just made (its lock may be yet to come)."""
    import fcntl

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    scratch = scratch_dir(tmp_path)
    old = time.time() - 3600
    made = {}
    for name in ("killed", "kept", "running", "young"):
        d = scratch / f"chunkvault-verify-{name}"
        (d / "restore" / "deep").mkdir(parents=True)
        (d / "restore" / "deep" / "data").write_bytes(b"x" * 1000)
        os.chmod(d / "restore" / "deep", 0o500)  # as a restored tree may be
        if name != "kept":
            (d / ".in-use").write_bytes(b"")
            if name != "young":
                os.utime(d / ".in-use", (old, old))
        made[name] = d
    with open(made["running"] / ".in-use", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report = verify_restore(repo, "latest", scratch=str(scratch))
    assert report.ok
    assert f"removed the scratch directory {made['killed']} of a verify-restore that was killed" in report.warnings
    assert sorted(os.listdir(scratch)) == ["chunkvault-verify-kept", "chunkvault-verify-running",
                                           "chunkvault-verify-young"]
    kept = verify_restore(repo, "latest", scratch=str(scratch), keep=True)
    assert os.listdir(os.path.dirname(kept.kept_at)) == ["restore"]  # no marker: never taken for a killed run's
    for d in scratch.iterdir():
        verify_mod.remove_tree(str(d))


def test_what_the_command_of_a_killed_run_left_running_is_stopped_by_the_next(tmp_path, new_repo):
    """A run killed outright (SIGKILL, the OOM killer) while its --then command ran left the command, and a
    server it had started on the copy, running for good; the next run removed the copy under them.  The
    mark its processes carry is in the scratch directory's marker: the next run stops them first."""
    import signal
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    scratch = scratch_dir(tmp_path)
    pid_file = tmp_path / "pid"
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    run = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "verify-restore", "-r", str(tmp_path / "repo"),
                            "--scratch", str(scratch), "--then", f"sleep 300 & echo $! > {shlex.quote(str(pid_file))}; "
                            "wait"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = int(pid_file.read_text())
    run.send_signal(signal.SIGKILL)
    run.wait()
    try:
        assert not _ended(left, within=0.5)  # it outlived the run
        [leftover] = os.listdir(scratch)
        old = time.time() - 3600
        os.utime(scratch / leftover / ".in-use", (old, old))
        report = verify_restore(repo, "latest", scratch=str(scratch))
        assert report.ok and os.listdir(scratch) == []
        assert any(w.startswith("stopped what the command of a verify-restore that was killed left running")
                   for w in report.warnings)
        assert _ended(left, within=10)
    finally:
        with contextlib.suppress(OSError):
            os.kill(left, signal.SIGKILL)


def test_a_process_given_the_pid_of_a_listed_leftover_is_not_signalled(monkeypatch):
    """A killed run's command was listed as carrying its mark, then ended, and its pid passed to another
    process before the signal: that process is left alone (the mark is checked again on a descriptor that
    pins the process, and the signal goes through that descriptor)."""
    import signal
    import subprocess

    from chunkvault import processes, verify

    other = subprocess.Popen(["sleep", "60"])
    real = processes.carries
    listed = []

    def carries(pid, marker):
        if pid == other.pid and not listed:  # as the listing saw it: the pid was the command's then
            listed.append(pid)
            return True
        return real(pid, marker)

    monkeypatch.setattr(processes, "carries", carries)
    monkeypatch.setattr(verify, "carries", carries)
    try:
        assert verify._end_marked(b"CHUNKVAULT_COMMAND_RUN=0123", grace=0.2) is False
        assert listed == [other.pid] and other.poll() is None
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


@pytest.mark.parametrize("refusal", ["EPERM", "EMFILE"])
def test_a_leftover_is_stopped_where_no_pidfd_can_be_opened(monkeypatch, refusal):
    """A container's seccomp filter that predates pidfds refuses ``pidfd_open`` with EPERM (older Docker
    profiles), and a process short of descriptors gets EMFILE: the leftover carrying the mark was taken for
    one that did not, and left running, the run saying none was found.  It is signalled by its pid then."""
    import signal
    import subprocess

    from chunkvault import verify

    marker = b"CHUNKVAULT_COMMAND_RUN=" + os.urandom(8).hex().encode()
    env = {**os.environ, marker.split(b"=")[0].decode(): marker.split(b"=", 1)[1].decode()}
    left = subprocess.Popen(["sleep", "60"], env=env)

    def pidfd_open(pid, flags=0):
        raise OSError(getattr(errno, refusal), os.strerror(getattr(errno, refusal)))

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    try:
        deadline = time.monotonic() + 10
        while not verify.carries(left.pid, marker) and time.monotonic() < deadline:  # (its exec done)
            time.sleep(0.01)
        assert verify._end_marked(marker, grace=0.5) is True
        assert left.wait(timeout=5) == -signal.SIGTERM
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()


SETPRIV = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _denied_as_another_user_would_be() -> None:
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("setpriv") is None or subprocess.run([*SETPRIV, "true"]).returncode:
        pytest.skip("needs root and setpriv, to be denied as another user would be")


def _closed_tree(src) -> dict[str, int]:
    """Entries that deny their owner: a mode-000 file (with an attribute) and directory, a directory that
    may be searched but not listed, one listed but not searched; their modes by path."""
    (src / "locked" / "inner").mkdir(parents=True)
    (src / "locked" / "inner" / "f").write_bytes(b"deep")
    (src / "unlisted").mkdir()
    (src / "unlisted" / "g").write_bytes(b"g")
    (src / "unsearched").mkdir()
    (src / "unsearched" / "h").write_bytes(b"h")
    (src / "secret").write_bytes(b"secret")
    os.setxattr(src / "secret", "user.k", b"v")
    modes = {"secret": 0, "locked/inner": 0, "locked": 0, "unlisted": 0o300, "unsearched": 0o600}
    for rel, mode in modes.items():
        os.chmod(src / rel, mode)
    return modes


def test_a_tree_that_denies_its_owner_is_verified_as_another_user_than_root(tmp_path, new_repo):
    """As another user than root, verify-restore and restore --verify found a restored mode-000 file and a
    directory without read or search permission unreadable (exit 18), though the restore had written them
    as the snapshot holds them: this user's own entries are opened while compared, their modes put back."""
    import subprocess

    _denied_as_another_user_would_be()
    src = tmp_path / "src"
    src.mkdir()
    modes = _closed_tree(src)
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    repo.close()
    scratch, target = tmp_path / "scratch", tmp_path / "target"
    scratch.mkdir()
    env = {**os.environ, "CHUNKVAULT_PASSWORD": PASSWORD}
    url = str(tmp_path / "repo")
    done = subprocess.run([*SETPRIV, sys.executable, "-m", "chunkvault.cli", "verify-restore", "-r", url,
                           "--scratch", str(scratch), "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["snapshots"][0]["mismatch_count"] == 0 and report["snapshots"][0]["files"] == 4
    assert os.listdir(scratch) == []  # the scratch tree went, closed directories and all
    done = subprocess.run([*SETPRIV, sys.executable, "-m", "chunkvault.cli", "restore", "-r", url, "latest",
                           "--target", str(target), "--verify"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {rel: stat_mode(target / rel) for rel in modes} == modes  # put back after the comparison


def stat_mode(path) -> int:
    import stat

    return stat.S_IMODE(os.lstat(path).st_mode)


def test_content_behind_a_closed_entry_is_compared_and_the_modes_are_put_back(tmp_path, new_repo):
    """The comparison reads what such entries hold (a changed byte is found), and leaves each mode as found."""
    import subprocess

    _denied_as_another_user_would_be()
    src, target = tmp_path / "src", tmp_path / "target"
    src.mkdir()
    modes = _closed_tree(src)
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    repo.restore("latest", str(target))
    repo.close()
    for rel in ("secret", "locked/inner/f"):  # the same size and time, another byte
        path = target / rel
        st = os.stat(path)
        data = bytearray(path.read_bytes())
        data[0] ^= 1
        os.chmod(path, 0o600)
        path.write_bytes(bytes(data))
        os.chmod(path, st.st_mode)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    script = ("import json, sys\nfrom chunkvault import Repository\nfrom chunkvault.verify import compare_tree\n"
              "repo = Repository.open(sys.argv[1], sys.argv[2])\n"
              "found = compare_tree(repo.tree(repo.snapshot('latest')), sys.argv[3], owners=False)\n"
              "print(json.dumps(sorted([m.path, m.kind] for m in found.mismatches)))\n")
    done = subprocess.run([*SETPRIV, sys.executable, "-c", script, str(tmp_path / "repo"), PASSWORD, str(target)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["locked/inner/f", "content"], ["secret", "content"]]
    assert {rel: stat_mode(target / rel) for rel in modes} == modes


def test_a_directory_listed_but_not_searched_is_reported_not_raised(tmp_path):
    """Another user's directory that may be read but not searched: its names were listed, and the first
    lstat below it raised out of the comparison (a traceback)."""
    import subprocess

    _denied_as_another_user_would_be()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    (tmp_path / "e").write_bytes(b"after")
    os.chown(tmp_path / "d", 12345, 12345)
    os.chmod(tmp_path / "d", 0o704)
    script = ("import json, sys\nfrom chunkvault.verify import walk_sorted\nerrors = []\n"
              "seen = [p.decode() for p, _ in walk_sorted(sys.argv[1].encode(), errors)]\n"
              "print(json.dumps([seen, [[p.decode(), why] for p, why in errors]]))\n")
    done = subprocess.run([*SETPRIV, sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [["", "d", "e"], [["d", "Permission denied"]]]


def test_a_damaged_snapshot_is_warned_about_once_per_run(tmp_path, new_repo, cli):
    """verify-restore of several snapshots listed them for each, and said "unreadable and left out" again."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    for n in range(3):
        (src / "f").write_text(str(n))
        damaged = repo.backup([str(src)]).snapshot
    path = tmp_path / "repo" / "snapshots" / damaged.id
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    err = cli("verify-restore", "-r", str(tmp_path / "repo"), "--all-since", "1d", check=18).stderr.decode()
    assert err.count("is unreadable and left out") == 1


def test_archiving_is_turned_off_in_each_data_directory_of_the_copy_before_the_command(tmp_path, new_repo):
    """A server started on the proven copy kept its archive_command and pushed its WAL, under the names the
    live server's next segments take, into the live archive (whose push of them was then refused)."""
    src = tmp_path / "src"
    for d in (src, src / "standby"):
        (d / "global").mkdir(parents=True)
        (d / "global" / "pg_control").write_bytes(b"\0" * 64)
        (d / "postgresql.auto.conf").write_text("archive_mode = 'on'\n")
    (src / "other").mkdir()
    (src / "other" / "pg_control").write_bytes(b"not in global/")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    seen = tmp_path / "seen"
    check = (f'tail -n 1 "$CHUNKVAULT_RESTORE_DIR/postgresql.auto.conf" "$CHUNKVAULT_RESTORE_DIR/standby/'
             f'postgresql.auto.conf" > {shlex.quote(str(seen))}; ls "$CHUNKVAULT_RESTORE_DIR/other" >> '
             f'{shlex.quote(str(seen))}')
    report = verify_restore(repo, snap, then=check, scratch=str(scratch_dir(tmp_path)))
    assert report.ok, report.to_dict()
    assert sorted(report.archive_off) == [".", "standby"]
    assert seen.read_text().count("archive_mode = 'off'") == 2 and seen.read_text().endswith("pg_control\n")
    assert verify_restore(repo, snap, scratch=str(scratch_dir(tmp_path))).archive_off == []  # no command, no change


def test_a_fifo_restored_as_postgresql_auto_conf_fails_the_verification_in_one_line_not_hangs_it(tmp_path, new_repo):
    """A snapshot whose data directory held a FIFO as postgresql.auto.conf hung verify-restore --then for ever, in
    the open that appends archive_mode = 'off' to it (no reader).  Now it is one line, before the command."""
    import threading

    from chunkvault.errors import TargetUnwritable

    src = tmp_path / "src"
    (src / "global").mkdir(parents=True)
    (src / "global" / "pg_control").write_bytes(b"\0" * 64)
    os.mkfifo(src / "postgresql.auto.conf")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    ran = tmp_path / "ran"
    caught = []

    def verify():
        try:
            verify_restore(repo, snap, then=f"touch {shlex.quote(str(ran))}", scratch=str(scratch_dir(tmp_path)))
        except Exception as exc:  # noqa: BLE001 - what it raised, looked at below
            caught.append(exc)

    worker = threading.Thread(target=verify, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "verify-restore hung on the FIFO"
    assert len(caught) == 1 and isinstance(caught[0], TargetUnwritable), caught
    assert "postgresql.auto.conf is no file" in str(caught[0]) and "\n" not in str(caught[0])
    assert not ran.exists()


def test_archiving_is_turned_off_in_the_copy_alone_when_its_file_is_a_link_to_the_live_one(tmp_path, new_repo):
    """A copy whose postgresql.auto.conf was a symbolic link to the live server's had the line appended to the
    live file: that server would stop archiving at its next start.  Nor is the file the link names read into
    the copy: a link to any file (/etc/shadow) had its content copied into a file of the data directory's
    owner, where the run was root's."""
    live = tmp_path / "live.conf"
    live.write_text("archive_command = 'push %p'\n")
    src = tmp_path / "src"
    (src / "global").mkdir(parents=True)
    (src / "global" / "pg_control").write_bytes(b"\0" * 64)
    os.symlink(live, src / "postgresql.auto.conf")
    repo = new_repo(str(tmp_path / "repo"))
    snap = repo.backup([str(src)]).snapshot
    seen = tmp_path / "seen"
    check = (f'test -f "$CHUNKVAULT_RESTORE_DIR/postgresql.auto.conf" && ! test -L '
             f'"$CHUNKVAULT_RESTORE_DIR/postgresql.auto.conf" && cat "$CHUNKVAULT_RESTORE_DIR/postgresql.auto.conf" '
             f'> {shlex.quote(str(seen))}')
    report = verify_restore(repo, snap, then=check, scratch=str(scratch_dir(tmp_path)))
    assert report.ok and report.archive_off == ["."], report.to_dict()
    assert live.read_text() == "archive_command = 'push %p'\n"
    assert "push" not in seen.read_text() and "archive_mode = 'off'" in seen.read_text()
