"""rewrite: paths removed from existing snapshots, chains kept, prune frees their data."""
from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crashkit
from chunkvault import Repository
from chunkvault.errors import UsageError
from chunkvault.store.chain import lineage
from chunkvault.store.manifest import OP_DELETE, OP_ENTRY, T_DIR, T_FILE, T_HARDLINK, Entry, Record
from chunkvault.store.rewrite import excluded_by, plan_rewrite
from treeutil import change_small_tree

PASSWORD = crashkit.PASSWORD


def rec(path: bytes, type_: int = T_FILE, op: int = OP_ENTRY, target: bytes = b"", size: int = 1) -> Record:
    return Record(op, path, Entry(path, type_, size=size, target=target) if op != OP_DELETE else None)


def test_excluded_paths_are_matches_and_everything_below_them():
    ex = excluded_by([".aws", "*.key"])
    assert ex(b".aws") and ex(b"home/u/.aws") and ex(b"home/u/.aws/credentials") and ex(b"etc/tls/a.key")
    assert not ex(b"") and not ex(b"home/u") and not ex(b"aws") and not ex(b"a.key.txt")
    assert excluded_by(["home/u/*"])(b"home/u/x/y") and not excluded_by(["home/u/*"])(b"home/u")


def test_a_full_loses_its_excluded_records_and_counts_the_rest():
    tree = [rec(b"", T_DIR), rec(b"d", T_DIR), rec(b"d/x.key", size=5), rec(b"d/y", size=7)]
    plan = plan_rewrite(tree, tree, True, excluded_by(["*.key"]))
    assert [r.path for r in plan.records] == [b"", b"d", b"d/y"] and plan.removed == [b"d/x.key"]
    assert (plan.stats.files, plan.stats.dirs, plan.stats.bytes) == (1, 2, 7)


def test_a_differential_deletes_what_its_parent_would_show_and_keeps_its_own_deletions():
    own = [rec(b"d/new"), rec(b"gone.key", op=OP_DELETE), rec(b"s/x", size=2)]
    tree = [rec(b"", T_DIR), rec(b"d", T_DIR), rec(b"d/new"), rec(b"d/old"), rec(b"s", T_DIR), rec(b"s/x", size=2),
            rec(b"s/y")]
    plan = plan_rewrite(own, tree, False, excluded_by(["s", "*.key"]))
    assert [(r.op, r.path) for r in plan.records] == [
        (OP_ENTRY, b"d/new"), (OP_DELETE, b"gone.key"), (OP_DELETE, b"s")]
    assert plan.removed == [b"s"] and (plan.stats.files, plan.stats.dirs) == (2, 2)


def test_a_hard_link_to_a_removed_file_is_refused():
    tree = [rec(b"", T_DIR), rec(b"a.key"), rec(b"b", T_HARDLINK, target=b"a.key")]
    with pytest.raises(UsageError, match="b is a hard link to a.key, which would go: exclude both"):
        plan_rewrite(tree, tree, True, excluded_by(["*.key"]))
    assert plan_rewrite(tree, tree, True, excluded_by(["*.key", "b"])).removed == [b"a.key", b"b"]


def tree_of(repo: Repository, sid: str) -> dict[bytes, tuple]:
    return {e.path: (e.type, e.size, e.digest, e.target) for e in repo.tree(sid)}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), globs=st.sampled_from([["*.a"], ["d0"], ["d1/*"], ["f1*", "y"], ["nothing"]]))
def test_rewritten_snapshots_lose_exactly_the_excluded_paths(tmp_path_factory, seed, globs):
    """Random fulls and differentials, a random choice of them rewritten: a chosen snapshot's tree is
    its old tree less the excluded paths; another's loses nothing else and gains nothing; each restores
    its tree, the counts are its tree's, and after a prune the repository checks clean."""
    rng = random.Random(seed)
    base = tmp_path_factory.mktemp("rewrite")
    src = base / "src"
    src.mkdir()
    excluded = excluded_by(globs)
    with Repository.init(str(base / "repo"), PASSWORD, kdf_seconds=0, ledger=False) as repo:
        for step in range(7):
            change_small_tree(src, rng, step)
            repo.backup([str(src)], kind=rng.choice(["diff", "diff", "full"]))
        snaps = repo.snapshots()
        before = {s.id: tree_of(repo, s.id) for s in snaps}
        chosen = {s.id for s in snaps if rng.random() < 0.6}
        parents = {s.id: s.parent for s in snaps}
        # what a chosen snapshot loses, every differential built on it loses too
        losing = {s.id for s in snaps if not chosen.isdisjoint(lineage(s.id, parents))}
        dry = repo.rewrite(globs, sorted(chosen))
        assert dry.dry_run and {s.id: tree_of(repo, s.id) for s in snaps} == before
        report = repo.rewrite(globs, sorted(chosen), dry_run=False)
        assert set(report.rewritten) <= losing and report.rewritten == dry.rewritten
        for s in repo.snapshots():
            after = tree_of(repo, s.id)
            old = before[s.id]
            assert after == ({p: v for p, v in old.items() if not excluded(p)} if s.id in losing else old)
            files = [v for v in after.values() if v[0] != T_DIR]
            assert (s.stats["files"], s.stats["bytes"]) == (len(files), sum(v[1] for v in files if v[0] == T_FILE))
        one = rng.choice(repo.snapshots())
        target = base / "restored"
        repo.restore(one.id, str(target))
        restored = {os.fsencode(os.path.relpath(os.path.join(d, n), target))
                    for d, ds, fs in os.walk(target) for n in ds + fs}
        assert restored == set(tree_of(repo, one.id)) - {b""}  # no file left without its directories
        repo.prune(max_unused=0.0)
        assert repo.check(read_data=True).ok


def test_rewrite_on_the_command_line_is_a_dry_run_until_confirmed(tmp_path):
    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    src = tmp_path / "src"
    (src / ".aws").mkdir(parents=True)
    (src / ".aws" / "credentials").write_text("secret")
    (src / "data").write_bytes(os.urandom(2000))
    crashkit.run_cli("backup", "-r", repo, str(src), "--tag", "a")
    (src / "data").write_bytes(os.urandom(2000))
    crashkit.run_cli("backup", "-r", repo, str(src))
    rooted = crashkit.run_cli("rewrite", "-r", repo, "--exclude", "/.aws")  # as on the machine: said, not silent
    assert b"relative to the snapshot's root (without a leading /)" in rooted.stderr
    out = crashkit.run_cli("rewrite", "-r", repo, "--exclude", ".aws").stdout.decode().splitlines()
    assert [line.split(":")[1] for line in out[:2]] == [".aws", ".aws"] and out[-1].startswith("nothing changed")
    assert len(json.loads(crashkit.run_cli("find", "-r", repo, "credentials", "--json").stdout)) == 1
    done = json.loads(crashkit.run_cli("rewrite", "-r", repo, "--exclude", ".aws", "--tag", "a",
                                       "--confirm", "REWRITE", "--json").stdout)
    assert not done["dry_run"] and len(done["rewritten"]) == len(done["inherited"]) == 1  # the full; its diff inherits
    assert json.loads(crashkit.run_cli("find", "-r", repo, "credentials", "--json").stdout) == []
    proc = crashkit.run_cli("rewrite", "-r", repo, ok=(2,))
    assert proc.stderr.decode().strip() == ("chunkvault: rewrite needs at least one exclude pattern, or a new host "
                                            "(--exclude, --new-host)")


def test_rewrite_names_a_path_that_is_not_utf8_as_the_other_commands_do(tmp_path):
    """Its text escaped the name twice (a literal backslash, then xe9) and its JSON gave no ``path_b64``,
    so a file really called ``n\\xe9`` could not be told from it."""
    import base64

    repo = str(tmp_path / "repo")
    crashkit.init_repo(repo)
    src = tmp_path / "src"
    src.mkdir()
    name = b"n\xe9"
    with open(os.path.join(os.fsencode(src), name), "wb") as f:
        f.write(b"x")
    crashkit.run_cli("backup", "-r", repo, str(src))
    glob = os.fsdecode(name)
    out = crashkit.run_cli("rewrite", "-r", repo, "--exclude", glob).stdout.decode()
    assert out.splitlines()[0].endswith(":n\\xe9")  # one escape: as ls and find show it
    (removed,) = json.loads(crashkit.run_cli("rewrite", "-r", repo, "--exclude", glob, "--json").stdout)["removed"]
    assert base64.b64decode(removed["path_b64"]) == name


def test_tags_are_added_removed_and_set_without_touching_the_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    path = str(tmp_path / "repo")
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as repo:
        a = repo.backup([str(src)], tags=["nightly"]).snapshot
        b = repo.backup([str(src)], tags=["nightly", "db"]).snapshot
        trees = {s.id: tree_of(repo, s.id) for s in (a, b)}
        assert [s.id for s in repo.tag([a.id[:8]], add=["keep", "nightly"])] == [a.id]
        assert [s.id for s in repo.tag(tags=["nightly,db"], remove=["db"], add=["x"])] == [b.id]
        assert repo.tag([a.id], add=["keep"]) == []  # nothing to change: nothing written
        with pytest.raises(UsageError, match="give tags to add, to remove or to set"):
            repo.tag([a.id])
    with Repository.open(path, PASSWORD, ledger=False) as repo:
        assert [s.tags for s in repo.snapshots()] == [["nightly", "keep"], ["nightly", "x"]]
        assert {s.id: tree_of(repo, s.id) for s in repo.snapshots()} == trees
    out = json.loads(crashkit.run_cli("tag", "-r", path, "--set", "p,q", "--remove", "q", "--json",
                                      env=crashkit.cli_env({"CHUNKVAULT_PASSWORD": PASSWORD})).stdout)
    assert [s["tags"] for s in out] == [["p"], ["p"]]
    assert crashkit.run_cli("tag", "-r", path, ok=(2,)).stderr.strip() == b"chunkvault: tag: give tags to add, to remove or to set (--add, --remove, --set)"


def test_tag_and_rewrite_read_snapshots_again_under_their_lock(tmp_path):
    """Listed before another command's forget rebased a differential, they still write the rebased
    object: a stale one would point at a parent that is gone."""
    src = tmp_path / "src"
    src.mkdir()
    path = str(tmp_path / "repo")
    (src / "big").write_bytes(os.urandom(200_000))  # differentials stay small beside the full
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as repo:
        for i in range(3):
            (src / "f").write_bytes(os.urandom(100 + i))
            (src / "x.tmp").write_bytes(b"tmp")
            repo.backup([str(src)])
    early = Repository.open(path, PASSWORD, ledger=False)
    full, d1, d2 = early.snapshots()
    assert (d1.parent, d2.parent) == (full.id, d1.id)
    with Repository.open(path, PASSWORD, ledger=False) as other:
        other.forget([d1.id])  # d2 is rebased onto the full
    early.tag([d2.id], add=["kept"])
    early.rewrite(["*.tmp"], [d2.id], dry_run=False)
    early.close()
    with Repository.open(path, PASSWORD, ledger=False) as repo:
        (f, d) = repo.snapshots()
        assert (d.id, d.parent, d.tags) == (d2.id, full.id, ["kept"])
        assert sorted(e.path for e in repo.tree(d.id)) == [b"", b"big", b"f"]
        assert repo.check(read_data=True).ok


def test_a_rewrite_dry_run_takes_no_lock(tmp_path):
    from chunkvault.store.locks import SHARED, RepoLock

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.key").write_bytes(b"k")
    with Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0, ledger=False) as repo:
        snap = repo.backup([str(src)]).snapshot
        with RepoLock(repo.store.remote, SHARED, "backup"):  # a backup running
            assert repo.rewrite(["*.key"], wait=0).removed == [(snap.id, b"a.key")]


def test_a_damaged_chain_elsewhere_does_not_stop_a_rewrite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(200_000))
    (src / "a.key").write_bytes(b"k")
    path = str(tmp_path / "repo")
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as repo:
        full = repo.backup([str(src)]).snapshot
        (src / "f").write_bytes(b"f")
        diff = repo.backup([str(src)]).snapshot
        assert diff.parent == full.id
        other = repo.backup([str(tmp_path / "src" / "big")]).snapshot  # another source: its own chain
    os.unlink(tmp_path / "repo" / "snapshots" / full.id)  # diff's chain is broken now
    with Repository.open(path, PASSWORD, ledger=False) as repo:
        report = repo.rewrite(["*.key"], [other.id], dry_run=False)
        assert report.rewritten == [] and report.inherited == []


def test_a_backup_after_a_rewrite_by_another_command_keeps_what_the_source_still_has(tmp_path, monkeypatch):
    """The backup had read its parent before the rewrite (it waited for the rewrite's lock): built on that
    parent as it was, the unchanged file the rewrite removed was left out of the new snapshot too."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "app.cfg").write_text("secret")
    path = str(tmp_path / "repo")
    from chunkvault.store import backup

    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as first:
        first.backup([str(src)])

        class RewrittenMeanwhile(backup.RepoLock):
            def acquire(self):  # the rewrite held the lock this backup waited for
                with Repository.open(path, PASSWORD, ledger=False) as other:
                    other.rewrite(["app.cfg"], dry_run=False)
                super().acquire()

        monkeypatch.setattr(backup, "RepoLock", RewrittenMeanwhile)
        after = first.backup([str(src)]).snapshot
        monkeypatch.undo()
        with first.reading():
            assert sorted(r.path for r in first.tree(after)) == [b"", b"a.txt", b"app.cfg"]


@pytest.mark.parametrize("command", ["tag", "rewrite"])
def test_tag_and_rewrite_choose_their_snapshots_once_they_hold_the_lock(tmp_path, new_repo, command, monkeypatch):
    """A snapshot a backup saved while they waited for the lock was left out: they chose before waiting."""
    import threading

    from chunkvault.store import locks
    from chunkvault.store.locks import SHARED, RepoLock

    waiting = threading.Event()
    monkeypatch.setattr(locks, "announce_wait", lambda *args: waiting.set())

    src = tmp_path / "src"
    src.mkdir()
    (src / "secret").write_text("s")
    (src / "data").write_bytes(os.urandom(1000))
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    held, release = threading.Event(), threading.Event()

    def other_backup() -> None:  # holds the tag or rewrite off, as a running backup does
        with RepoLock(repo.store.remote, SHARED, "backup"):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=other_backup)
    holder.start()
    held.wait(10)
    done: list = []
    if command == "tag":
        worker = threading.Thread(target=lambda: done.append(repo.tag(add=["kept"], wait=60)))
    else:
        worker = threading.Thread(target=lambda: done.append(repo.rewrite(["secret"], dry_run=False, wait=60)))
    worker.start()
    assert waiting.wait(30)
    (src / "data").write_bytes(os.urandom(1000))
    saved = repo.backup([str(src)], kind="full").snapshot  # while the command waits
    release.set()
    holder.join(10)
    worker.join(60)
    assert done
    if command == "tag":
        assert all(s.tags == ["kept"] for s in repo.snapshots())
    else:
        assert repo.find(["secret"]) == [] and saved.id in done[0].rewritten


class _Killed(BaseException):
    """The process killed: nothing catches it, nothing after it runs."""


def test_a_rewrite_killed_at_any_write_leaves_each_snapshot_its_old_tree_or_its_new_one(tmp_path):
    """Each differential deletes the excluded paths itself and is written before its parent.  Parents
    first, a rewrite killed between them left differentials whose own records of excluded files had lost
    their directories: restored, those came back under directories made up at restore time."""
    import shutil

    from chunkvault.remotes.local import LocalRemote
    from treeutil import describe

    src = tmp_path / "src"
    (src / "secret" / ".aws").mkdir(parents=True)
    (src / "keep").write_text("keep")
    repo = Repository.init(str(tmp_path / "pristine"), "pw", kdf_seconds=0, ledger=False)
    ids = []
    for version in range(4):
        (src / "secret" / ".aws" / "creds").write_text(f"secret {version}")
        (src / f"v{version}").write_text(str(version))
        ids.append(repo.backup([str(src)], kind="diff" if version else "full").snapshot.id)
    old, new = {}, {}
    for sid in ids:
        out = tmp_path / "out" / sid
        repo.restore(sid, str(out))
        old[sid] = describe(out)
        new[sid] = {p: v for p, v in old[sid].items() if p != b"secret" and not p.startswith(b"secret/")}
    repo.close()

    class KilledAfter(LocalRemote):
        def __init__(self, root: str, writes: int):
            super().__init__(root)
            self.left = writes

        def put(self, key, data, *, if_absent=False):
            if not key.startswith("locks/"):
                if not self.left:
                    raise _Killed
                self.left -= 1
            return super().put(key, data, if_absent=if_absent)

    writes = 0
    while True:
        shutil.rmtree(tmp_path / "repo", ignore_errors=True)
        shutil.copytree(tmp_path / "pristine", tmp_path / "repo")
        with Repository.open(KilledAfter(str(tmp_path / "repo"), writes), "pw", ledger=False) as killed:
            try:
                killed.rewrite(["secret"], [ids[0]], dry_run=False)
                finished = True
            except _Killed:
                finished = False
        again = Repository.open(str(tmp_path / "repo"), "pw", ledger=False)
        for sid in ids:
            out = tmp_path / f"after-{writes}" / sid
            again.restore(sid, str(out))
            got = describe(out)
            assert got in (old[sid], new[sid]), (writes, sid)
            assert not finished or got == new[sid]
        again.rewrite(["secret"], [ids[0]], dry_run=False)  # run again, it finishes the job
        for sid in ids:
            out = tmp_path / f"again-{writes}" / sid
            again.restore(sid, str(out))
            assert describe(out) == new[sid]
        again.close()
        if finished:
            break
        writes += 1
    assert writes >= 6  # a manifest and a snapshot object per snapshot rewritten, and more


@pytest.mark.parametrize("command", ["tag", "rehost", "rewrite"])
def test_a_tag_or_rewrite_stopped_part_way_says_how_many_it_changed(tmp_path, command):
    """The storage failing at the third of four snapshot writes: the error said nothing of the two
    written, as if none were; run again, the command finishes."""
    from chunkvault.errors import StorageFull
    from chunkvault.remotes.local import LocalRemote
    from faults import FailingWrite

    src = tmp_path / "src"
    src.mkdir()
    path = str(tmp_path / "repo")
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as repo:
        for i in range(4):
            (src / f"f{i}").write_bytes(b"x")
            (src / f"{i}.key").write_bytes(b"k")
            repo.backup([str(src)], kind="full")
        host = repo.snapshots()[0].host
    run, done, finished = {
        "tag": (lambda r: r.tag(add=["kept"]), "retagged", lambda r, s: s.tags == ["kept"]),
        "rehost": (lambda r: r.rewrite(hosts=[host], new_host="db2", dry_run=False), "renamed",
                   lambda r, s: s.host == "db2"),
        "rewrite": (lambda r: r.rewrite(["*.key"], dry_run=False), "rewritten",
                    lambda r, s: not any(e.path.endswith(b".key") for e in r.tree(s))),
    }[command]
    failing = FailingWrite(LocalRemote(path), at=3, prefixes=("snapshots/",), error=lambda: StorageFull("disk full"))
    with Repository.open(failing, PASSWORD, ledger=False) as repo:
        with pytest.raises(StorageFull, match=rf"disk full \(2 of 4 snapshot\(s\) {done} before it; the same "
                                              r"command again does the others\)$"):
            run(repo)
    with Repository.open(path, PASSWORD, ledger=False) as repo:
        assert [finished(repo, s) for s in repo.snapshots()].count(True) == 2
        run(repo)
        assert all(finished(repo, s) for s in repo.snapshots())


def test_a_rewrite_stopped_while_recounting_the_differentials_on_it_counts_them_when_run_again(tmp_path):
    """The rewritten full written, the storage failing at the recount of the first differential built on
    it: the error says so, and the same command again, with nothing left to rewrite, counts the two
    differentials again (they counted the file the rewrite removed, and no command put that right)."""
    from chunkvault.errors import StorageFull
    from chunkvault.remotes.local import LocalRemote
    from faults import FailingWrite

    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.key").write_bytes(b"k")
    path = str(tmp_path / "repo")
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False) as repo:
        full = repo.backup([str(src)], kind="full").snapshot.id
        for i in range(2):
            (src / f"f{i}").write_bytes(b"x")
            repo.backup([str(src)], kind="diff")
    failing = FailingWrite(LocalRemote(path), at=2, prefixes=("snapshots/",), error=lambda: StorageFull("disk full"))
    with Repository.open(failing, PASSWORD, ledger=False) as repo:
        with pytest.raises(StorageFull) as raised:
            repo.rewrite(["*.key"], [full], dry_run=False)
    assert str(raised.value).endswith("(1 snapshot(s) rewritten, and the counts of 0 of the 2 built on it updated "
                                      "before it; the same command again updates the others)")

    def counted(repo):
        return {s.id: (s.stats["files"], s.stats["bytes"]) for s in repo.snapshots() if s.id != full}

    with Repository.open(path, PASSWORD, ledger=False) as repo:
        diffs = sorted(counted(repo))
        assert sorted(counted(repo).values()) == [(2, 2), (3, 3)]  # secret.key still counted
        dry = repo.rewrite(["*.key"], [full])
        assert dry.rewritten == [] and sorted(dry.recounted) == diffs
        again = repo.rewrite(["*.key"], [full], dry_run=False)
        assert again.rewritten == again.inherited == [] and sorted(again.recounted) == diffs
        assert sorted(counted(repo).values()) == [(1, 1), (2, 2)]
        assert repo.rewrite(["*.key"], [full], dry_run=False).recounted == []  # put right, they stay so
        full_files = next(s for s in repo.snapshots() if s.id == full).stats["files"]
    assert full_files == 0


def _series_with_a_key(tmp_path, path: str, n: int, **init) -> list[str]:
    """``n`` snapshots (fulls and differentials) of a tree holding ``secret.key``, changed each time."""
    src = tmp_path / "src"
    src.mkdir()
    with Repository.init(path, PASSWORD, kdf_seconds=0, ledger=False, **init) as repo:
        for i in range(n):
            (src / "secret.key").write_text(f"key {i}")
            (src / f"f{i}").write_text(f"file {i}")
            repo.backup([str(src)], kind="diff" if i % 4 else "full")
        return [s.id for s in repo.snapshots()]


def test_rewriting_many_snapshots_writes_their_index_together(tmp_path):
    """Each snapshot's new manifest was flushed with an index object of its own before the snapshot was saved:
    a rewrite of a year of hourly snapshots left thousands, every one read at each later open.  They are
    written together now, each snapshot saved once an index object lists its manifest."""
    path = str(tmp_path / "repo")
    ids = _series_with_a_key(tmp_path, path, 12)
    before = len(os.listdir(os.path.join(path, "index")))
    with Repository.open(path, PASSWORD, ledger=False) as repo:
        report = repo.rewrite(["*.key"], dry_run=False)
        assert sorted(report.rewritten) == sorted(ids)
        assert len(os.listdir(os.path.join(path, "index"))) == before + 1
        assert not any(e.path.endswith(b".key") for s in repo.snapshots() for e in repo.tree(s))
        assert repo.check(read_data=True).ok


def test_no_rewritten_snapshot_is_saved_before_the_index_lists_its_manifest(tmp_path, monkeypatch):
    from chunkvault.store.repository import BlobWriter
    from faults import IndexedFirst

    monkeypatch.setattr(BlobWriter, "INDEX_EVERY_PACKS", 1)  # a batch every few snapshots
    path = str(tmp_path / "repo")
    ids = _series_with_a_key(tmp_path, path, 12, pack_size=2048)
    before = len(os.listdir(os.path.join(path, "index")))
    checking = IndexedFirst(path, PASSWORD)
    with Repository.open(checking, PASSWORD, ledger=False) as repo:
        assert sorted(repo.rewrite(["*.key"], dry_run=False).rewritten) == sorted(ids)
    assert checking.saves == 12
    added = len(os.listdir(os.path.join(path, "index"))) - before
    assert 1 < added < 12  # in batches: the writer's own at each pack, and one per batch
