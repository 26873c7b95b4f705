"""A prune stopped part-way through its repack (no room, Ctrl-C, the remote gone) leaves the repository as
it found it: the packs and index objects it wrote are taken back, so a disk short of room ends no fuller,
and nothing a kept snapshot needs goes."""
import os
import shutil

import pytest

from chunkvault import Repository
from chunkvault.errors import RemoteUnavailable, StorageFull
from chunkvault.remotes import local as local_mod
from chunkvault.remotes.local import LocalRemote
from chunkvault.store import indexfile
from conftest import PASSWORD
from faults import FailingWrite
from treeutil import describe


def stored(path) -> set[str]:
    """Every object of the repository (locks and the reserve aside)."""
    return {str(p.relative_to(path)) for p in path.rglob("*")
            if p.is_file() and p.parts[len(path.parts)] != "locks" and p.name != local_mod.RESERVE_NAME}


def du(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def half_used(tmp_path, new_repo, files: int = 12, size: int = 60_000) -> dict[str, dict]:
    """A repository whose first backup's packs each hold a forgotten file beside a kept one: the prune
    repacks them, and writes nothing before (no pack or index object names only what goes).  The kept
    snapshots' trees, by id."""
    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"), pack_size=64 * 1024)
    for i in range(files):
        (src / f"f{i:02}").write_bytes(os.urandom(size))
    first = repo.backup([str(src)]).snapshot
    for i in range(0, files, 2):
        os.remove(src / f"f{i:02}")
    states = {}
    for n in range(2):
        (src / f"new{n}").write_bytes(os.urandom(size))
        states[repo.backup([str(src)]).snapshot.id] = describe(src)
    repo.forget([first.id])
    repo.close()
    return states


def assert_intact(repo: Repository, states: dict[str, dict], out) -> None:
    assert repo.check(read_data=True).ok
    for sid, tree in states.items():
        target = out / sid[:8]
        shutil.rmtree(target, ignore_errors=True)
        repo.restore(sid, str(target))
        assert describe(target) == tree


STOPS = {
    "disk full": dict(error=lambda: StorageFull("no space left on device (injected)")),
    "disk stays full": dict(error=lambda: StorageFull("no space left on device (injected)"), stays=True),
    "ctrl-c": dict(error=KeyboardInterrupt),
    # Stored, and then no answer: a lost reply, then the retries gave up.
    "remote gone": dict(error=lambda: RemoteUnavailable("connection reset (injected)"), landed=True),
}


@pytest.mark.parametrize("parts", [1, 2], ids=["one index object", "index in parts"])
@pytest.mark.parametrize("stop", list(STOPS))
def test_a_prune_stopped_at_any_write_of_its_repack_takes_back_what_it_wrote(tmp_path, new_repo, monkeypatch,
                                                                              stop, parts):
    """Stopped at the k-th write (each pack, each index object), for every k: the objects stored are those
    before, unless the stop fell on the index object that replaces the old ones, which may be stored (a
    lost reply, a Ctrl-C): then the new packs stay.  Stopped by the remote after a write landed, the
    object written is taken back too (named before it was sent).  Either way every snapshot restores, check
    passes, and a rerun with room succeeds in the same process."""
    if parts == 2:  # the new index in parts of two packs: parts naming new packs are written before the last
        monkeypatch.setattr(indexfile, "PACKS_PER_INDEX", 2)
    states = half_used(tmp_path, new_repo)
    pristine = tmp_path / "pristine"
    shutil.copytree(tmp_path / "repo", pristine)
    path = tmp_path / "repo"
    counter = FailingWrite(LocalRemote(str(path)), at=0, error=KeyboardInterrupt)  # fails none: counts
    with Repository.open(counter, PASSWORD, ledger=False) as clean:
        plan = clean.prune(max_unused=0)
    assert plan.repack and not plan.orphans and not plan.dead_indexes
    writes = counter.writes
    assert writes >= (4 if parts == 2 else 3)  # at least two packs and the index
    clean_size = du(path / "data")
    before = stored(pristine)
    for k in range(1, writes + 1):
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        remote = FailingWrite(LocalRemote(str(path)), at=k, **STOPS[stop])
        with Repository.open(remote, PASSWORD, ledger=False) as repo:
            with pytest.raises((StorageFull, RemoteUnavailable, KeyboardInterrupt)):
                repo.prune(max_unused=0)
            assert remote.failed
            if stop == "remote gone":  # its lock is left to go stale (the remote did not answer): gone by now
                for lock in (path / "locks").iterdir():
                    lock.unlink()
            last = k == writes
            if not last or stop.startswith("disk"):
                assert stored(path) == before, f"write {k} of {writes}"
            assert_intact(repo, states, tmp_path / f"out{k}")
            remote.heal()
            repo.prune(max_unused=0)
            assert_intact(repo, states, tmp_path / f"out{k}")
            again = repo.prune(max_unused=0, dry_run=True)
            assert not (again.delete or again.repack or again.orphans)
            assert du(path / "data") == clean_size, f"write {k} of {writes}"


def test_a_prune_that_runs_out_of_room_leaves_the_disk_as_it_found_it_and_its_reserve(tmp_path, new_repo,
                                                                                      monkeypatch):
    """On a local disk short of room for the repack (even with the reserve the exclusive lock may take):
    the free space and the reserve are back after the failure, so `prune --max-repack-size`, which fits,
    still does; before, each failed prune's packs and their index stayed and took the reserve with them."""
    monkeypatch.setattr(local_mod, "RESERVE_SIZE", 128 * 1024)
    states = half_used(tmp_path, new_repo, files=24)
    path = tmp_path / "repo"
    assert (path / local_mod.RESERVE_NAME).exists()

    class SmallDisk(LocalRemote):
        """A disk with ``free`` bytes left: what is written takes room, what is deleted gives it back."""
        free = 100 * 1024
        released = 0

        def _put(self, key, data, if_absent):
            size = memoryview(data).nbytes
            if size > self.free:
                raise StorageFull(f"no space left on device while writing {key}")
            super()._put(key, data, if_absent)
            self.free -= size

        def delete(self, key):
            info = self.stat(key)
            super().delete(key)
            self.free += info.size if info is not None else 0

        def _release_reserve(self):
            there = os.path.exists(os.path.join(self.root, local_mod.RESERVE_NAME))
            if super()._release_reserve() and there:
                self.free += local_mod.RESERVE_SIZE
                self.released += 1
                return True
            return False

        def keep_reserve(self):
            reserve = os.path.join(self.root, local_mod.RESERVE_NAME)
            if os.path.exists(reserve) or self.free < local_mod.RESERVE_SIZE:
                return
            super().keep_reserve()
            if os.path.exists(reserve):
                self.free -= local_mod.RESERVE_SIZE

    disk = SmallDisk(str(path))
    before, free = stored(path), disk.free
    with Repository.open(disk, PASSWORD, ledger=False) as repo:
        with pytest.raises(StorageFull, match="repacking needs room.*--max-repack-size"):
            repo.prune(max_unused=0)
        assert disk.released and stored(path) == before  # the repack took the reserve: it is back
        assert disk.free == free and (path / local_mod.RESERVE_NAME).exists()
        plan = repo.prune(max_unused=0, max_repack_size=70_000)
        assert plan.repack and plan.held_back and disk.free > free
        assert_intact(repo, states, tmp_path / "out")


def test_a_prune_whose_lock_went_stale_takes_nothing_back(tmp_path, new_repo, monkeypatch):
    """Another prune may have taken the lock for stale and read what this one wrote: nothing is deleted."""
    from chunkvault.errors import LockLost
    from chunkvault.store.locks import RepoLock

    states = half_used(tmp_path, new_repo)
    path = tmp_path / "repo"
    before = stored(path)
    remote = FailingWrite(LocalRemote(str(path)), at=2, error=lambda: StorageFull("no space left (injected)"))
    lost = []

    def ensure_held(self, *, ask=False):
        if lost:
            raise LockLost("lock went stale (injected)")

    def fail_and_lose(*args, **kwargs):
        lost.append(True)
        return StorageFull("no space left (injected)")

    remote.error = fail_and_lose
    monkeypatch.setattr(RepoLock, "ensure_held", ensure_held)
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        with pytest.raises(StorageFull):
            repo.prune(max_unused=0)
        left = stored(path) - before
        assert left and all(k.startswith("data/") for k in left)  # the pack stored: unindexed, not deleted
        assert_intact(repo, states, tmp_path / "out")
        monkeypatch.undo()
        plan = repo.prune(max_unused=0, dry_run=True)
        assert sorted(k for k, _ in plan.orphans) == sorted(left)  # the next prune deletes them first


@pytest.mark.parametrize("at, stop", [(1, dict(error=KeyboardInterrupt, landed=True)),
                                      (2, dict(error=lambda: StorageFull("no space left (injected)")))],
                         ids=["ctrl-c once the salvage pack is stored", "no room for the new index"])
def test_a_repair_of_packs_stopped_short_takes_back_its_salvage(tmp_path, new_repo, at, stop):
    """`repair packs` copies what still verifies into a new pack as a repack does: stopped short, that is
    taken back too, and the damaged pack is all still there for the rerun."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(30_000))
    repo = new_repo(str(tmp_path / "repo"), pack_size=1 << 20)
    repo.backup([str(src)])
    repo.close()
    path = tmp_path / "repo"
    pack = max((p for p in (path / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    damaged = bytearray(pack.read_bytes())
    damaged[45_000] ^= 1  # in the second file's chunk
    pack.write_bytes(damaged)
    before = stored(path)
    remote = FailingWrite(LocalRemote(str(path)), at=at, **stop)
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        with pytest.raises((StorageFull, KeyboardInterrupt)):
            repo.repair_packs([pack.name], dry_run=False)
        assert remote.failed and stored(path) == before
        remote.heal()
        report = repo.repair_packs([pack.name], dry_run=False)
        assert report.salvaged and report.salvaged[0].salvaged >= 2 and not pack.exists()
        repo.repair_snapshots(dry_run=False)
        assert repo.check(read_data=True).ok
        repo.restore(repo.snapshots()[-1].id, str(tmp_path / "out"))
        assert sorted(p.name for p in (tmp_path / "out").rglob("f*")) == ["f0", "f2"]
