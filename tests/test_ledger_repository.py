"""The client-side ledger in use: replays and rollbacks are reported by check, warned about by
reads, refused by writes, fixed by forgetting again or by accepting; the file itself is robust."""
from __future__ import annotations

import json
import os
import random
import stat
import warnings

import pytest

import crashkit
from chunkvault import Repository
from chunkvault.errors import RollbackDetected
from chunkvault.ledger import RepositoryStateWarning, default_dir
from chunkvault.remotes import open_remote
from chunkvault.store.retention import RetentionPolicy
from faults import FaultyRemote
from treeutil import describe

PW = crashkit.PASSWORD


@pytest.fixture
def chain(tmp_path):
    """Snapshots a (full), b, c (differentials) by this client; their objects' bytes kept."""
    path = str(tmp_path / "repo")
    crashkit.init_repo(path, compression=3)
    tree = crashkit.SourceTree(str(tmp_path / "src"), random.Random(11), target_bytes=300_000)
    states = {}
    with crashkit.open_repo(path) as repo:
        for _ in range(3):
            states[repo.backup([tree.root]).snapshot.id] = tree.state()
            tree.mutate()
    raw = {sid: open(os.path.join(path, "snapshots", sid), "rb").read() for sid in states}
    return path, tree, states, raw


def _problems(repo: Repository) -> list[tuple[str, str]]:
    return [(p.object, p.problem) for p in repo.check().problems]


def _restores(repo: Repository, states: dict, scratch) -> None:
    for sid, state in states.items():
        out = str(scratch / f"r-{sid[:8]}")
        repo.restore(sid, out)
        assert describe(out) == state


def test_the_ledger_is_one_private_file_named_by_the_repository_id(chain):
    path, _, _, _ = chain
    with crashkit.open_repo(path) as repo:
        repo_id = repo.store.config.repo_id
    file = os.path.join(os.environ["XDG_STATE_HOME"], "chunkvault", "ledger", f"{repo_id}.json")
    assert default_dir() == os.path.dirname(file)
    assert stat.S_IMODE(os.stat(file).st_mode) == 0o600
    doc = json.load(open(file))
    newest = max(crashkit.open_repo(path).snapshots(), key=lambda s: s.time).id
    assert doc["repository"] == repo_id and doc["newest"]["id"] == newest and doc["forgotten"] == {}
    assert not [n for n in os.listdir(os.path.dirname(file)) if n.startswith(".tmp-")]


def test_many_replayed_snapshots_are_one_warning(chain):
    """An old copy of the repository put back replays every snapshot forgotten since: one line says so,
    not one per snapshot (a restore printed 91)."""
    path, _, states, raw = chain
    a, b, c = states
    with crashkit.open_repo(path) as repo:
        repo.forget([b, c])
    for sid in (b, c):
        crashkit.put_snapshot_back(path, sid, raw)
    with crashkit.open_repo(path) as repo, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        repo.snapshots()
        repo.snapshots()
    lines = [str(w.message) for w in said if issubclass(w.category, RepositoryStateWarning)]
    assert len(lines) == 1 and "replayed" in lines[0] and "(and 1 more: `chunkvault check` lists them)" in lines[0]


def test_replayed_snapshot_is_reported_warned_refused_and_forgotten_again(chain, tmp_path):
    path, tree, states, raw = chain
    a, b, c = states
    with crashkit.open_repo(path) as repo:
        repo.forget([b])
    crashkit.put_snapshot_back(path, b, raw)
    with crashkit.open_repo(path) as repo:
        problems = _problems(repo)
        assert [o for o, _ in problems] == [f"snapshots/{b}"] and "replayed" in problems[0][1]
        assert problems[0][1].endswith(f"then forget it again (`chunkvault forget {b[:8]}`) or accept the "
                                       "repository as it is with `chunkvault check --accept-state`")
        with pytest.warns(RepositoryStateWarning, match=f"{b}.*replayed"):
            _restores(repo, {a: states[a], c: states[c]}, tmp_path)  # reads warn, and work
        for write in (lambda: repo.backup([tree.root]), lambda: repo.prune(),
                      lambda: repo.forget(policy=RetentionPolicy(keep_last=1)), lambda: repo.aggregate(c)):
            with pytest.raises(RollbackDetected, match=f"{b}.*replayed"):
                write()
        repo.forget([b])  # the natural fix needs no acceptance
        assert _problems(repo) == []
        repo.backup([tree.root])


def test_replay_after_prune_is_reported_as_replayed_too(chain):
    path, _, states, raw = chain
    a, b, c = states
    with crashkit.open_repo(path) as repo:
        repo.forget([c])
        repo.prune(max_unused=0)
    crashkit.put_snapshot_back(path, c, raw)
    with crashkit.open_repo(path) as repo:
        problems = _problems(repo)
        assert any(o == f"snapshots/{c}" and "replayed" in p for o, p in problems)


@pytest.mark.parametrize("deleted", [1, 2])
def test_deleting_the_newest_snapshots_is_a_rollback(chain, tmp_path, deleted):
    path, tree, states, _ = chain
    ids = list(states)
    for sid in ids[-deleted:]:
        os.remove(os.path.join(path, "snapshots", sid))
    newest = ids[-1]
    with crashkit.open_repo(path) as repo:
        problems = _problems(repo)
        assert [o for o, _ in problems] == [f"snapshots/{newest}"] and "rolled back" in problems[0][1]
        with pytest.warns(RepositoryStateWarning, match="rolled back"):
            _restores(repo, {sid: states[sid] for sid in ids[:-deleted]}, tmp_path)
        with pytest.raises(RollbackDetected, match=newest):
            repo.backup([tree.root])
        assert os.listdir(os.path.join(path, "locks")) == []  # judged under its lock, which it then let go
        with pytest.raises(RollbackDetected):
            repo.forget([ids[0]])
        assert _problems(repo)  # listing again keeps the evidence
        report = repo.check(accept_state=True)
        assert report.ok and any("rolled back" in w for w in report.warnings)
        assert _problems(repo) == []
        repo.backup([tree.root])


@pytest.mark.filterwarnings("ignore:snapshot .* is unreadable and left out")
@pytest.mark.parametrize("fix", ["forget", "accept"])
def test_damaging_the_newest_snapshot_is_refused_as_deleting_it_is(chain, tmp_path, fix):
    """Overwritten with garbage, the newest snapshot was left out with a warning, and backups went on from
    an older parent (exit 0): a rollback by whoever holds the storage, without deleting anything."""
    path, tree, states, _ = chain
    ids = list(states)
    newest = ids[-1]
    with open(os.path.join(path, "snapshots", newest), "wb") as f:
        f.write(os.urandom(10))
    with crashkit.open_repo(path) as repo:
        problems = _problems(repo)
        assert (f"snapshots/{newest}", next(p for o, p in problems if "newest" in p)) in problems
        with pytest.warns(RepositoryStateWarning, match=f"{newest}.*does not open"):
            _restores(repo, {sid: states[sid] for sid in ids[:-1]}, tmp_path)
        for write in (lambda: repo.backup([tree.root]), lambda: repo.forget([ids[0]])):
            with pytest.raises(RollbackDetected, match=f"{newest}.*does not open.*forget {newest[:8]}"):
                write()
        if fix == "forget":
            repo.forget([newest[:8]])  # the natural fix needs no acceptance
        else:
            assert repo.check(accept_state=True).warnings
        assert not [p for _, p in _problems(repo) if "newest" in p]
        repo.backup([tree.root])


def test_an_older_version_of_a_snapshot_put_back_is_found_and_refused(chain):
    """The object as it was before `tag --add pinned`, put back by whoever holds the storage, authenticates
    as well as the tagged one: `forget --keep-tag pinned` then removed the snapshot it was to keep."""
    path, _, states, raw = chain
    a, b, _ = states
    keep = RetentionPolicy(keep_last=1, keep_tags=(frozenset({"pinned"}),))
    with crashkit.open_repo(path) as repo:
        repo.tag([a], add=["pinned"])
    with crashkit.open_repo(path, ledger=False) as other:  # another client's rewrite: a new version, no finding
        other.tag([b], add=["elsewhere"])
    with crashkit.open_repo(path) as repo:
        assert _problems(repo) == []
        assert [s.tags for s in repo.snapshots()][:2] == [["pinned"], ["elsewhere"]]
    crashkit.put_snapshot_back(path, a, raw)
    with crashkit.open_repo(path) as repo:
        problems = _problems(repo)
        assert [o for o, _ in problems] == [f"snapshots/{a}"] and "stored as it was before a change" in problems[0][1]
        with pytest.warns(RepositoryStateWarning, match=f"{a} is stored as it was before a change"):
            assert repo.snapshots()[0].tags == []
        with pytest.raises(RollbackDetected, match=f"{a} is stored as it was before a change.*accept"):
            repo.forget(policy=keep)
        assert repo.check(accept_state=True).ok
        assert _problems(repo) == []
        repo.tag([a], add=["pinned"])
        repo.forget(policy=keep)
        assert [s.id for s in repo.snapshots()][0] == a


def test_the_current_version_put_back_after_an_older_one_is_no_finding(chain):
    """The older copy is reported at every listing while it is there; once the current object is back,
    nothing is (a listing of the old copy must not make it current)."""
    path, _, states, raw = chain
    a = next(iter(states))
    with crashkit.open_repo(path) as repo:
        repo.tag([a], add=["pinned"])
    current = {a: open(os.path.join(path, "snapshots", a), "rb").read()}
    crashkit.put_snapshot_back(path, a, raw)
    for _ in range(2):
        with crashkit.open_repo(path) as repo:
            with pytest.warns(RepositoryStateWarning, match=f"{a} is stored as it was before a change"):
                repo.snapshots()
    crashkit.put_snapshot_back(path, a, current)
    with crashkit.open_repo(path) as repo:
        assert _problems(repo) == []
        assert [s.tags for s in repo.snapshots() if s.id == a] == [["pinned"]]


def test_a_new_snapshot_is_noted_while_the_command_still_holds_its_lock(chain, tmp_path):
    """Noted after the lock was let go, a forget of it by another command of this client could come in
    between, and the late note then brought the forgotten snapshot back as the newest: a false rollback."""
    path, tree, _, _ = chain
    held = []
    with crashkit.open_repo(path) as repo:
        noted = repo.store.on_saved

        def saved(snap) -> None:
            held.append(bool(os.listdir(os.path.join(path, "locks"))))
            noted(snap)

        repo.store.on_saved = saved
        snap = repo.backup([tree.root]).snapshot
        assert held == [True]
        repo.forget([snap.id])
        assert _problems(repo) == []
        repo.backup([tree.root])


def test_another_client_without_the_ledger_sees_a_clean_repository(chain, tmp_path):
    """The documented limit: only the client that forgot, or saw the newest, can tell."""
    path, _, states, raw = chain
    a, b, c = states
    with crashkit.open_repo(path) as repo:
        repo.forget([b])
    crashkit.put_snapshot_back(path, b, raw)
    os.remove(os.path.join(path, "snapshots", c))
    for n, other in enumerate((dict(ledger=False), dict(ledger=str(tmp_path / "elsewhere")))):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RepositoryStateWarning)
            with Repository.open(path, PW, **other) as repo:
                assert repo.check(read_data=True).ok
                os.mkdir(tmp_path / f"client{n}")
                _restores(repo, {a: states[a], b: states[b]}, tmp_path / f"client{n}")


def test_disabled_ledger_writes_nothing(tmp_path):
    with Repository.init(str(tmp_path / "repo"), PW, kdf_seconds=0, ledger=False) as repo:
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "f").write_bytes(b"x")
        repo.backup([str(tmp_path / "src")])
        repo.forget(["latest"])
    assert not os.path.exists(default_dir())


def test_a_snapshot_written_back_under_a_forgotten_id_is_not_a_replay(chain, tmp_path, monkeypatch):
    """copy (or import) storing a snapshot under an id this client forgot clears it from the ledger."""
    path, _, states, _ = chain
    dst_path = str(tmp_path / "dst")
    crashkit.init_repo(dst_path, copy_from=path)
    with crashkit.open_repo(path) as src, crashkit.open_repo(dst_path) as dst:
        first = src.copy_to(dst).copied
        newest = first[-1][1]
        dst.forget([newest])
        store = dst.store
        save = store.save_snapshot

        def keep_the_forgotten_id(snap, *, replace=False, named=False):
            snap.id = newest
            return save(snap, replace=True)

        monkeypatch.setattr(store, "save_snapshot", keep_the_forgotten_id)
        copied = src.copy_to(dst, [first[-1][0]]).copied
        assert copied[0][1] == newest
        assert _problems(dst) == []


def test_a_forget_killed_before_or_after_deleting_is_no_finding(chain, monkeypatch):
    path, _, states, _ = chain
    a, b, c = states
    import chunkvault.store.lifecycle as lifecycle

    real = lifecycle.apply_forget

    def killed_before(repo, snaps, plan, *args, **kw):
        raise KeyboardInterrupt

    def killed_after(repo, snaps, plan, *args, **kw):
        real(repo, snaps, plan, *args, **kw)
        raise KeyboardInterrupt

    with crashkit.open_repo(path) as repo:
        for kill, sid in ((killed_before, c), (killed_after, c)):
            monkeypatch.setattr(lifecycle, "apply_forget", kill)
            with pytest.raises(KeyboardInterrupt):
                repo.forget([sid])
            assert _problems(repo) == []
            repo.snapshots()
        assert c not in {s.id for s in repo.snapshots()} and _problems(repo) == []


def _ledger_file(path: str, ledger) -> "os.PathLike[str]":
    """The ledger file of the repository at ``path``, in directory ``ledger``, written by a first listing."""
    with Repository.open(path, PW, ledger=str(ledger)) as repo:
        repo.snapshots()
        return ledger / f"{repo.store.config.repo_id}.json"


def test_corrupt_ledger_file_warns_once_and_starts_afresh(chain, tmp_path):
    path, _, states, _ = chain
    ledger = tmp_path / "ledger"
    file = _ledger_file(path, ledger)
    for garbage in (b"\x00not json", b'{"version": 1, "repository": "another"}', b"[]"):
        file.write_bytes(garbage)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with Repository.open(path, PW, ledger=str(ledger)) as repo:
                assert repo.check().ok
                repo.snapshots()
                repo.snapshots()
        mine = [w for w in seen if issubclass(w.category, RepositoryStateWarning)]
        assert len(mine) == 1 and "unreadable" in str(mine[0].message), [str(w.message) for w in mine]
        assert json.loads(file.read_bytes())["newest"]["id"] == list(states)[-1]


def test_an_unwritable_ledger_never_stops_a_backup(chain, tmp_path):
    path, tree, _, _ = chain
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.warns(RepositoryStateWarning, match="cannot (read|use) the ledger"):
        with Repository.open(path, PW, ledger=str(blocker / "ledger")) as repo:
            repo.backup([tree.root])


def test_accepting_the_state_into_a_ledger_that_cannot_be_written_fails_and_check_warns(chain, tmp_path):
    from chunkvault.errors import TargetUnwritable

    path, _, _, _ = chain
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with Repository.open(path, PW, ledger=str(blocker / "ledger")) as repo:
        with pytest.warns(RepositoryStateWarning, match="cannot read the ledger"):
            assert repo.check().ok
        with pytest.raises(TargetUnwritable, match="writing the ledger"):
            repo.check(accept_state=True)


def test_a_fifo_in_the_ledgers_place_warns_instead_of_hanging(chain, tmp_path):
    path, tree, _, _ = chain
    ledger = tmp_path / "ledger"
    file = _ledger_file(path, ledger)
    file.unlink()
    os.mkfifo(file)
    with pytest.warns(RepositoryStateWarning, match="not a regular file"):
        with Repository.open(path, PW, ledger=str(ledger)) as repo:
            repo.backup([tree.root])


def test_a_ledger_on_a_file_system_without_locks_is_still_kept(chain, tmp_path, no_flock):
    """NFS mounted nolock: flock fails with ENOLCK; the ledger is written without the lock, with a warning."""
    path, tree, states, _ = chain
    ledger = tmp_path / "ledger"
    with pytest.warns(RepositoryStateWarning, match="cannot lock the ledger"):
        with Repository.open(path, PW, ledger=str(ledger)) as repo:
            sid = repo.backup([tree.root]).snapshot.id
            file = ledger / f"{repo.store.config.repo_id}.json"
    assert json.loads(file.read_bytes())["newest"]["id"] == sid


# --- the command line -----------------------------------------------------------------------


def test_cli_refuses_writes_with_one_line_and_its_own_exit_code(chain, tmp_path, cli):
    path, tree, states, _ = chain
    newest = list(states)[-1]
    os.remove(os.path.join(path, "snapshots", newest))
    env = {"CHUNKVAULT_PASSWORD": PW}
    for args in (["backup", tree.root], ["prune"], ["forget", "--keep-last", "1"], ["aggregate", "latest"]):
        proc = cli(*args, "-r", path, env=env, check=19)
        err = proc.stderr.decode().strip()
        assert len(err.splitlines()) == 1 and newest in err and "rolled back" in err, err
        assert "check --accept-state" in err
    proc = cli("snapshots", "-r", path, "--json", env=env)  # reads: one warning on stderr, clean JSON
    assert [s["id"] for s in json.loads(proc.stdout)] == list(states)[:-1]
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning: ") and newest in err, err
    proc = cli("restore", "-r", path, "latest", "--target", str(tmp_path / "out"), env=env)
    assert describe(str(tmp_path / "out")) == states[list(states)[1]]
    proc = cli("check", "-r", path, env=env, check=18)
    assert f"snapshots/{newest}" in proc.stdout.decode()
    cli("check", "-r", path, "--accept-state", env=env)
    cli("check", "-r", path, env=env)
    cli("backup", "-r", path, tree.root, env=env)
    assert "--accept-state" in cli("check", "--help").stdout.decode()


def test_cli_copy_into_a_replayed_repository_is_refused(chain, tmp_path, cli):
    path, _, states, raw = chain
    dst = str(tmp_path / "dst")
    crashkit.init_repo(dst, copy_from=path)
    env = {"CHUNKVAULT_PASSWORD": PW, "CHUNKVAULT_TO_PASSWORD": PW}
    cli("copy", "-r", path, "--to", dst, env=env)
    with crashkit.open_repo(dst) as repo:
        victim = repo.snapshots()[0].id
        kept = open(os.path.join(dst, "snapshots", victim), "rb").read()
        repo.forget([victim])
    with open(os.path.join(dst, "snapshots", victim), "wb") as f:
        f.write(kept)
    proc = cli("copy", "-r", path, "--to", dst, env=env, check=19)
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and victim in err and "replayed" in err, err
    cli("forget", "-r", dst, victim[:8], env=env)
    cli("check", "-r", dst, env=env)


def test_a_snapshot_stored_after_a_listing_by_another_command_is_no_rollback(chain):
    """Two backups of one client started together: the first stores its snapshot, and raises the
    ledger's mark to it, after the second listed the snapshots.  The second must not take the
    mark missing from its listing for a rollback; a snapshot really gone still stops it."""
    path, tree, _, _ = chain
    with crashkit.open_repo(path) as second:
        stale = second.store.snapshots()  # listed before the first command's snapshot exists
        with crashkit.open_repo(path) as first:
            tree.mutate()
            stored = first.backup([tree.root]).snapshot
        assert stored.id not in {s.id for s in stale}
        assert stored.id in {s.id for s in second._guard(stale)}  # listed again, not refused
        os.remove(os.path.join(path, "snapshots", stored.id))
        with pytest.raises(RollbackDetected, match=stored.id):
            second._guard(stale)


def test_a_snapshot_another_command_of_this_client_saves_during_a_listing_is_no_rollback(tmp_path):
    """One Repository lists while another command of the same client (a thread, or a process sharing the
    ledger) saves a backup and notes it: the listing, made just before, lacks the newest snapshot the ledger
    knows by the time the listing is judged. It is judged by the ledger as it was when it began: no warning,
    and no second listing."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one")
    ledger = str(tmp_path / "ledger")
    path = str(tmp_path / "repo")
    Repository.init(path, PW, kdf_seconds=0, ledger=ledger).close()
    with Repository.open(path, PW, ledger=ledger) as lister, Repository.open(path, PW, ledger=ledger) as writer:
        writer.backup([str(src)])
        lister.snapshots()
        real = lister.store.snapshots
        calls = []

        def listed_then_a_backup():
            out = real()
            if not calls:
                (src / "f").write_bytes(b"two")
                writer.backup([str(src)])
            calls.append(len(out))
            return out

        lister.store.snapshots = listed_then_a_backup  # type: ignore[method-assign]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RepositoryStateWarning)
            assert len(lister.snapshots()) == 1
            assert calls == [1]
            assert len(lister.snapshots()) == 2


def _repository_and_two_sources(tmp_path) -> tuple[str, str]:
    """A repository with a ledger directory of its own (two objects of one client share it), and the
    sources ``a`` and ``b`` of a small file each."""
    ledger = str(tmp_path / "ledger")
    path = str(tmp_path / "repo")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_bytes(os.urandom(1000))
    Repository.init(path, PW, kdf_seconds=0, ledger=ledger).close()
    return path, ledger


def test_backups_of_this_client_finishing_during_every_listing_are_no_rollback(tmp_path):
    """Parallel backups of one client: each listing another backup makes misses the snapshot a backup
    finishing meanwhile noted in the ledger, however many finish.  No refusal and no warning."""
    path, ledger = _repository_and_two_sources(tmp_path)
    with Repository.open(path, PW, ledger=ledger) as slow, Repository.open(path, PW, ledger=ledger) as fast:
        fast.backup([str(tmp_path / "b")])
        real = slow.store.snapshots

        def listed_then_another_backup_ends():
            out = real()
            with open(tmp_path / "b" / "f", "ab") as f:
                f.write(b"x")
            fast.backup([str(tmp_path / "b")])
            return out

        slow.store.snapshots = listed_then_another_backup_ends  # type: ignore[method-assign]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RepositoryStateWarning)
            slow.backup([str(tmp_path / "a")])
            slow.snapshots()
            slow.stats()
        slow.store.snapshots = real  # type: ignore[method-assign]
        assert not [p.problem for p in slow.check().problems]


def test_a_snapshot_this_client_stored_during_a_check_and_deleted_behind_its_back_stops_the_write(tmp_path):
    """Backup C reads the ledger; backup B of this client stores T and notes it; T is deleted by whoever can
    write the storage; C's listing lacks T.  C must not store a newer snapshot over that evidence."""
    path, ledger = _repository_and_two_sources(tmp_path)
    with Repository.open(path, PW, ledger=ledger) as c, Repository.open(path, PW, ledger=ledger) as b:
        b.backup([str(tmp_path / "b")])
        real, calls = c.store.snapshots, []

        def a_snapshot_stored_then_deleted():
            if not calls:
                (tmp_path / "b" / "f").write_bytes(os.urandom(1000))
                t = b.backup([str(tmp_path / "b")]).snapshot
                os.remove(os.path.join(path, "snapshots", t.id))
                calls.append(t.id)
            return real()

        c.store.snapshots = a_snapshot_stored_then_deleted  # type: ignore[method-assign]
        with pytest.raises(RollbackDetected, match=calls[0] if calls else "rolled back"):
            c.backup([str(tmp_path / "a")])
        assert len(os.listdir(os.path.join(path, "snapshots"))) == 1


def test_a_chain_retired_by_a_second_aggregate_is_in_the_ledger(chain):
    """`aggregate c`, then `aggregate c --retire` (or the rerun of a --retire that was stopped): the ledger was
    told of no snapshot going (c was a full by then), so the retired ones put back were not called replayed."""
    path, _, states, raw = chain
    a, b, c = states
    with crashkit.open_repo(path) as repo:
        repo.aggregate(c)
        assert sorted(repo.aggregate(c, retire=True).retired) == sorted([a, b])
    crashkit.put_snapshot_back(path, b, raw)
    with crashkit.open_repo(path) as repo:
        problems = _problems(repo)
        assert {o for o, _ in problems} == {f"snapshots/{b}"} and any("replayed" in p for _, p in problems)


class _CountedListings(FaultyRemote):
    """A remote that counts the listings of snapshot objects."""

    def __init__(self, inner):
        super().__init__(inner, seed=0)
        self.snapshot_listings = 0

    def list(self, prefix: str = ""):
        self.snapshot_listings += prefix.startswith("snapshots")
        return super().list(prefix)


@pytest.mark.parametrize("parent", [None, "first"])
def test_a_backup_lists_the_snapshots_once_and_the_ledger_judges_that_listing(chain, parent):
    # Each listing reads every snapshot object's name (on S3, a page per thousand): the one made under the
    # backup's lock serves the ledger's judgement and the search for the parent alike.
    path, tree, states, _ = chain
    remote = _CountedListings(open_remote(path))
    with Repository.open(remote, PW) as repo:
        listed = remote.snapshot_listings
        tree.mutate()
        result = repo.backup([tree.root], kind="diff", parent=list(states)[0][:8] if parent else None)
        assert remote.snapshot_listings == listed + 1
        assert result.snapshot.parent == list(states)[0 if parent else -1]
