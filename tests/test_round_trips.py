"""Requests a command makes to an off-site repository, counted in a real ``chunkvault serve``'s log: each
round trip made one after another costs a link's latency (20-80 ms off site), whatever the bandwidth."""
from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter

import pytest

from chunkvault import Repository
from chunkvault.errors import RemoteUnavailable
from chunkvault.remotes.local import LocalRemote

from conftest import PASSWORD
from faults import FaultyRemote
from servers_http import FULL_TOKEN, http_server, serve_factory  # noqa: F401


def requests_logged(server, since: int = 0) -> list[str]:
    """The requests the server logged after the first ``since`` (``"GET config"``, ``"GET data/..."``, ...)."""
    time.sleep(0.2)  # each is logged once answered
    return re.findall(r"chunkvault serve: \S+ ([A-Z]+ \S+)", server.log())[since:]


@pytest.fixture
def served(http_server, cli, tmp_path):  # noqa: F811
    """(server, run): ``run(*args)`` runs a command against the served repository with a cache of its own."""
    env = {"CHUNKVAULT_HTTP_TOKEN": FULL_TOKEN, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str, **kwargs):
        return cli(args[0], "-r", http_server.url, *args[1:], env=env, **kwargs)

    run("init", "--kdf-time", "0")
    return http_server, run


def test_opening_a_repository_reads_its_config_once(served, tmp_path):
    """The config was read to report a damaged repository before the password, then again by the key's
    unlocking: a round trip more for every command."""
    server, run = served
    since = len(requests_logged(server))
    run("snapshots")
    assert requests_logged(server, since).count("GET config") == 1


class InARow(FaultyRemote):
    """Counts the gets (and deletions) of objects under ``prefix``, and how many of them came one after another
    (each held ``hold`` seconds, as a remote's round trip): a call's place in a row is one past the furthest of
    those done before it began."""

    def __init__(self, inner, prefix="data/", hold=0.02):
        super().__init__(inner, seed=0)
        self.prefix = prefix
        self.hold = hold
        self.gets = self.deletes = 0
        self.in_a_row = 0
        self._done = 0
        self._count = threading.Lock()

    def _held(self, call):
        with self._count:
            place = self._done + 1
        try:
            time.sleep(self.hold)
            return call()
        finally:
            with self._count:
                self._done = max(self._done, place)
                self.in_a_row = max(self.in_a_row, place)

    def get(self, key, start=None, length=None):
        if not key.startswith(self.prefix):
            return super().get(key, start, length)
        with self._count:
            self.gets += 1
        return self._held(lambda: super(InARow, self).get(key, start, length))

    def delete(self, key):
        if not key.startswith(self.prefix):
            return super().delete(key)
        with self._count:
            self.deletes += 1
        return self._held(lambda: super(InARow, self).delete(key))


@pytest.fixture
def chain_of_twelve(new_repo, tmp_path):
    """A repository holding a full snapshot and 11 differentials on it, each changing one file of 50; its path."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(100))
    for i in range(12):
        (src / f"f{i}").write_bytes(os.urandom(100))
        repo.backup([str(src)], kind="full" if i == 0 else "diff")
    return str(tmp_path / "repo0")


@pytest.mark.parametrize("within", [None, "f3"])
def test_the_manifests_of_a_chain_are_read_together(chain_of_twelve, within):
    """A differential's tree merges the manifests of its chain record by record: each manifest's first
    blob was read once the one before it had come, a round trip per snapshot of the chain in a row (``ls``,
    ``restore``, ``diff``, ``find`` of a 41st differential waited 41)."""
    remote = InARow(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        entries = list(repo.tree("latest", within))
        # read ahead for this one walk, they stayed in the blob cache, pushing out delta bases
        assert {bytes.fromhex(s.manifest[0]) for s in repo.store.snapshots()}.isdisjoint(repo.store._cache.items)
    assert entries and remote.gets == 12  # one manifest blob each
    assert remote.in_a_row <= 2


def test_a_diff_reads_the_manifests_its_two_chains_share_once(chain_of_twelve):
    """The two trees of a diff in one chain are read ahead and walked together: the first walk's hit took
    each shared manifest blob out of the cache the other had found it in, and the other read it again,
    one round trip after another (51 in a row for a diff in a chain of 41, where 16 will do)."""
    remote = InARow(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        chain = sorted(repo.store.snapshots(), key=lambda s: s.time)
        changes = list(repo.diff(chain[5].id, chain[11].id))
        assert {bytes.fromhex(s.manifest[0]) for s in chain}.isdisjoint(repo.store._cache.items)
    assert len(changes) == 6 and remote.gets == 12  # one manifest blob each
    assert remote.in_a_row <= 3


def test_a_blob_another_walk_read_ahead_meanwhile_keeps_its_hit(chain_of_twelve, monkeypatch):
    """Found missing, then put by another walk's read-ahead before this one's reader came to it: the reader
    took that walk's hit as it looked the blob up, and the other walk read it again."""
    with Repository.open(InARow(LocalRemote(chain_of_twelve)), PASSWORD, ledger=False) as repo:
        store = repo.store
        ids = [bytes.fromhex(s.manifest[0]) for s in store.snapshots()]
        store._cache.put(ids[0], store.read_blob(ids[0]), once=True)  # the other walk's, as this one began
        monkeypatch.setattr(store._cache, "expect", lambda keys: list(keys))  # looked before it came
        store._read_ahead(ids)
        assert store._cache.once[ids[0]] == 2 and all(store._cache.once[i] == 1 for i in ids[1:])


class DataDown(FaultyRemote):
    """A remote whose packs stop answering once ``down`` is set; counts each read asked for (key, offset)."""

    def __init__(self, inner):
        super().__init__(inner, seed=0)
        self.asked: Counter[tuple[str, int | None]] = Counter()
        self.data_down = False

    def get(self, key, start=None, length=None):
        if key.startswith("data/") and self.data_down:
            with self._lock:
                self.asked[(key, start)] += 1
            raise RemoteUnavailable(f"{self.display_url}: packs out of reach")
        return super().get(key, start, length)


def test_the_manifests_read_ahead_give_up_with_the_remote(chain_of_twelve):
    """The read-ahead of a chain's manifests left every failure to the reads in order: a remote out of reach
    was waited for (its retry time, 15 minutes) by each read queued there, a group of readers after another,
    then once more by the first read in order, which asked for the same blob again."""
    remote = DataDown(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        repo.store._cache.items.clear()
        remote.data_down = True
        with pytest.raises(RemoteUnavailable):
            list(repo.tree("latest"))
    assert remote.asked and max(remote.asked.values()) == 1


def test_the_manifests_read_ahead_for_a_walk_that_failed_leave_the_cache_once_read(chain_of_twelve):
    """A read-ahead stopped by the remote (out of reach) left the blobs it had read, and those it had been
    promised, counting a hit of the walk that failed: every later walk was promised one more and took one,
    so they stayed in the cache for good (up to its size, pushing out the delta bases it is for)."""
    remote = DataDown(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        cache = repo.store._cache
        chain = repo.store.snapshots()
        assert not remote.cheap_ranges and len(chain) == 12
        cache.items.clear()
        reads = remote.get

        def down_after_five(key, start=None, length=None):
            remote.data_down = remote.data_down or key.startswith("data/") and remote.asked.total() >= 5
            if key.startswith("data/") and not remote.data_down:
                remote.asked[(key, start)] += 1
            return reads(key, start, length)

        remote.get = down_after_five
        with pytest.raises(RemoteUnavailable):
            list(repo.tree("latest"))
        assert remote.asked.total() >= 5  # read before the remote stopped answering
        remote.data_down = False
        remote.get = reads
        assert len(list(repo.tree("latest"))) == 51
        assert {bytes.fromhex(s.manifest[0]) for s in chain}.isdisjoint(cache.items)


def test_a_walk_never_begun_leaves_no_blob_read_ahead_in_the_cache(chain_of_twelve):
    """``tree`` read its chain's manifests ahead when called: a reader made and dropped unread (a listing a
    service began and gave up, a ``diff`` left before its first change) left each blob counting a hit that
    never came, so every later walk was promised one more and took one, and they stayed in the cache for good."""
    remote = InARow(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        cache = repo.store._cache
        firsts = {bytes.fromhex(s.manifest[0]) for s in repo.store.snapshots()}
        cache.items.clear()
        with repo.reading():
            unread = [repo.tree("latest"), repo.tree("latest", "f3"), repo.diff("latest", "latest")]
            unread.clear()
            assert len(list(repo.tree("latest"))) == 51
        assert firsts.isdisjoint(cache.items) and not cache.once


class Counted(InARow):
    """``InARow`` for snapshot objects too, counted apart."""

    def __init__(self, inner):
        super().__init__(inner)
        self.snapshot_gets = 0
        self.snapshots_in_a_row = 0
        self._snap_done = 0

    def get(self, key, start=None, length=None):
        if not key.startswith("snapshots/"):
            return super().get(key, start, length)
        with self._count:
            self.snapshot_gets += 1
            place = self._snap_done + 1
        try:
            time.sleep(0.02)
            return FaultyRemote.get(self, key, start, length)
        finally:
            with self._count:
                self._snap_done = max(self._snap_done, place)
                self.snapshots_in_a_row = max(self.snapshots_in_a_row, place)


def test_check_reads_each_pack_header_in_one_request_and_the_snapshots_together(chain_of_twelve):
    """A pack's header was read in two requests, one after the other (its trailer, which gives the header's
    length, then the header); the snapshot objects one after another."""
    remote = Counted(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        repo.store._cache.items.clear()
        packs = len(list(remote.inner.list("data/")))
        report = repo.check()
    assert report.ok
    assert remote.snapshot_gets == 12 and remote.snapshots_in_a_row <= 2
    assert remote.gets == packs + 12  # a header each, and the 12 manifests


class OpeningInARow(InARow):
    """How many reads of the config and listings of the key files came one after another (each held a
    little), counted as ``InARow`` counts."""

    def __init__(self, inner):
        super().__init__(inner, prefix=())
        self.reads = 0

    def _opening(self, call):
        with self._count:
            self.reads += 1
        return self._held(call)

    def get(self, key, start=None, length=None):
        if key != "config":
            return super().get(key, start, length)
        return self._opening(lambda: FaultyRemote.get(self, key, start, length))

    def list(self, prefix=""):
        if prefix != "keys/":
            return super().list(prefix)
        return self._opening(lambda: FaultyRemote.list(self, prefix))

    def reset(self):
        with self._count:
            self.reads = self.in_a_row = self._done = 0


def test_the_config_and_the_key_files_are_read_together(new_repo, tmp_path):
    """Opening a repository read its config, then listed its key files; a lock's check that the repository is
    still there (another made at the same place?) did the same: two round trips in a row each."""
    new_repo().close()
    remote = OpeningInARow(LocalRemote(str(tmp_path / "repo0")))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        assert remote.reads == 2 and remote.in_a_row == 1
        remote.reset()
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(b"x")
        repo.backup([str(src)])
    assert remote.reads >= 2 and remote.in_a_row <= remote.reads // 2


def test_prune_reads_and_deletes_the_index_objects_together(chain_of_twelve):
    """Prune read each index object, and deleted each it replaced, one after another: a round trip each.  Each
    held 0.2 s: at 0.02 s, on a loaded machine, readers started more than a hold apart counted as in a row
    (9 against 8, about 1 run in 4 with a load of 5)."""
    remote = InARow(LocalRemote(chain_of_twelve), prefix="index/", hold=0.2)
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        objects = len(list(remote.inner.list("index/")))
        repo.prune(max_unused=0.0)
    assert objects == 12 and remote.gets >= 12 and remote.deletes == 12 + 1  # and one probe of the permission
    assert remote.in_a_row <= 8  # 27 when each waited for the one before


@pytest.fixture
def delta_chain(new_repo, tmp_path):
    """A repository of 16 snapshots of a file changed a little each time, each version of its chunks a delta
    of the one before; its path.  Chains restart every 7 versions at a phase set by the path, so 16 versions
    hold a chain at least 6 deep wherever the phase falls (8 held only 4 for some paths)."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(64 << 10))
    for i in range(16):
        data[1000 + i * 64 : 1064 + i * 64] = os.urandom(64)
        (src / "f").write_bytes(data)
        repo.backup([str(src)], kind="full" if i == 0 else "diff")
    return str(tmp_path / "repo0")


def test_a_delta_chain_is_read_together(delta_chain):
    """A blob stored as a delta on a delta ... was read level by level, a round trip per level in a row: a
    restore of such a file, or a backup storing its next version as a delta, waited out the chain's depth."""
    remote = InARow(LocalRemote(delta_chain))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        store = repo.store
        deepest = max((b for b, _ in store.index.items()), key=store.delta_depth)
        depth = store.delta_depth(deepest)
        store._cache.items.clear()
        one = store.read_blob(deepest)
        assert remote.in_a_row <= 2
        before = remote.gets
        store._cache.items.clear()
        assert store.read_blobs([deepest]) == [one]
    assert depth >= 5 and remote.gets - before <= depth + 1 and remote.in_a_row <= 2


def test_the_manifests_a_prune_walks_are_read_together(chain_of_twelve):
    """Prune (and export) walk each snapshot's own manifest for the chunks it needs: each snapshot's first blob
    was asked for once the one before had come, a round trip per snapshot in a row."""
    from chunkvault.store.prune import used_blobs

    remote = InARow(LocalRemote(chain_of_twelve))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        repo.store._cache.items.clear()
        used = used_blobs(repo.store)
    assert len(used) > 12 and remote.gets == 12  # one manifest blob each
    assert remote.in_a_row <= 3


def test_a_prune_reads_the_blobs_of_a_manifest_many_to_a_request(new_repo, tmp_path):
    """Prune's walk of the manifests read each manifest blob with a request of its own: some 290,000 for 200
    snapshots of a million chunks, most of a prune's planning.  Neighbours in a pack now come together."""
    from chunkvault.store.prune import used_blobs

    repo = new_repo(chunker={"min_size": 64, "avg_size": 256, "max_size": 2048})  # small manifest blobs
    src = tmp_path / "src"
    src.mkdir()
    for i in range(600):
        (src / f"{os.urandom(24).hex()}-{i}").write_bytes(os.urandom(40))
    snap = repo.backup([str(src)]).snapshot
    blobs = [bytes.fromhex(h) for h in repo.store.snapshots()[0].manifest]
    assert snap and len(blobs) > 40
    remote = InARow(LocalRemote(str(tmp_path / "repo0")), hold=0)
    with Repository.open(remote, PASSWORD, ledger=False) as again:
        again.store._cache.items.clear()
        used = used_blobs(again.store)
    assert all(b in used for b in blobs) and len(used) > 600
    assert remote.gets <= len(blobs) // 8


def test_a_listing_with_nothing_cached_reads_the_snapshots_sixteen_at_a_time(new_repo, tmp_path):
    """Eight at a time left half of the HTTP and S3 pools' connections idle: a first listing of 2,000
    snapshots on a new machine waited out some 270 round trips in a row."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(48):
        (src / "f").write_bytes(b"%d" % i)
        repo.backup([str(src)])
    repo.close()
    remote = Counted(LocalRemote(str(tmp_path / "repo0")))
    with Repository.open(remote, PASSWORD, ledger=False) as reopened:
        assert len(reopened.snapshots()) == 48
    assert remote.snapshot_gets == 48 and remote.snapshots_in_a_row <= 4  # 6 at eight at a time


def test_archive_push_looks_up_its_name_beside_the_segment_before(new_repo, tmp_path):
    """A push checked the database system of the segment archived before it (its object, then its first
    blob), then looked up whether its own name was archived already: three round trips in a row at every
    16 MB of WAL."""
    from walsegments import write_segment

    new_repo().close()
    wal = tmp_path / "wal"
    first = write_segment(wal, "000000010000000000000001", size=1 << 20)
    second = write_segment(wal, "000000010000000000000002", seed=2, size=1 << 20)
    remote = InARow(LocalRemote(str(tmp_path / "repo0")), prefix=("wal/", "data/"))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        repo.archive_push(first)
        remote.in_a_row = remote._done = remote.gets = 0
        repo.store._cache.items.clear()
        assert not repo.archive_push(second).already
    assert remote.gets == 3  # the segment before and its first blob, this one's name
    assert remote.in_a_row == 2


class OnRow(FaultyRemote):
    """Gets, puts and deletions of objects under ``prefixes`` held a little each, placed on ``row`` as
    ``InARow`` places them: two remotes on one row count what a copy waits for one after another on both."""

    def __init__(self, inner, row: InARow, prefixes=("data/", "index/", "snapshots/", "locks/")):
        super().__init__(inner, seed=0)
        self.row, self.prefixes = row, prefixes

    def get(self, key, start=None, length=None):
        if not key.startswith(self.prefixes):
            return super().get(key, start, length)
        return self.row._held(lambda: FaultyRemote.get(self, key, start, length))

    def put(self, key, data, *, if_absent=False):
        if not key.startswith(self.prefixes):
            return super().put(key, data, if_absent=if_absent)
        return self.row._held(lambda: FaultyRemote.put(self, key, data, if_absent=if_absent))


def test_copy_reads_the_next_snapshot_while_it_writes_the_one_before(chain_of_twelve, new_repo, tmp_path):
    """A copy read a snapshot's manifest, its chunks and its manifest again off the source, then wrote its
    data, index and snapshot to the destination (the lock confirmed around each), and only then began on
    the next: some ten round trips in a row for each differential of a chain."""
    new_repo().close()  # repo1, the destination
    row = InARow(LocalRemote(chain_of_twelve))
    src = OnRow(LocalRemote(chain_of_twelve), row, ("data/",))
    dst = OnRow(LocalRemote(str(tmp_path / "repo1")), row)
    with Repository.open(src, PASSWORD, ledger=False) as source, \
            Repository.open(dst, PASSWORD, ledger=False) as destination:
        source.store._cache.items.clear()
        result = source.copy_to(destination)
        assert len(result.copied) == 12
    assert row.in_a_row <= 12 * 7  # 111 when each snapshot's reads waited for the writes of the one before


def test_archive_get_reads_a_segments_blobs_together(new_repo, tmp_path):
    """A segment's blobs were read sixteen at a time, each sixteen once the sixteen before had come: four
    round trips in a row for a segment of some 64 chunks, at every file a recovery asks for."""
    from walsegments import write_segment

    new_repo().close()
    segment = write_segment(tmp_path / "wal", "000000010000000000000001", size=16 << 20, filled=1.0)
    with Repository.open(str(tmp_path / "repo0"), PASSWORD, ledger=False) as repo:
        repo.archive_push(segment)
    remote = InARow(LocalRemote(str(tmp_path / "repo0")))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        blobs = len(repo.archive_get("000000010000000000000001", tmp_path / "got").blobs)
    assert (tmp_path / "got").read_bytes() == segment.read_bytes()
    assert blobs > 3 * 16 and remote.gets >= 4
    assert remote.in_a_row <= 2


def test_the_chunks_a_copy_reads_ahead_leave_the_blob_cache_once_copied(new_repo, tmp_path):
    """Read ahead into the source's blob cache, the chunks of every snapshot copied stayed there, up to its
    256 MiB, for the rest of the copy."""
    repo = new_repo()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))
        repo.backup([str(src)])
    repo.close()
    new_repo().close()  # repo1, the destination
    with Repository.open(str(tmp_path / "repo0"), PASSWORD, ledger=False) as source, \
            Repository.open(str(tmp_path / "repo1"), PASSWORD, ledger=False) as destination:
        assert len(source.copy_to(destination).copied) == 6
        assert source.store._cache.size < 1 << 20  # manifests only: 6 MiB of chunks were read ahead


class ListsCounted(FaultyRemote):
    """Counts the listings of each prefix."""

    def __init__(self, inner):
        super().__init__(inner, seed=0)
        self.listed: Counter[str] = Counter()

    def list(self, prefix=""):
        self.listed[prefix] += 1
        return super().list(prefix)


def test_copy_lists_the_source_snapshots_once(chain_of_twelve, new_repo, tmp_path):
    """A copy listed the source's snapshots, then again as it began, under the same lock: two listings more
    (snapshots and index objects), each a round trip, and for a year of hourly snapshots a long one."""
    new_repo().close()  # repo1, the destination
    src = ListsCounted(LocalRemote(chain_of_twelve))
    with Repository.open(src, PASSWORD, ledger=False) as source, \
            Repository.open(str(tmp_path / "repo1"), PASSWORD, ledger=False) as destination:
        assert len(source.copy_to(destination).copied) == 12
    assert src.listed["snapshots/"] == 1


class LockLooks(FaultyRemote):
    """Counts the reads of lock objects (each a look whether the command still holds its lock)."""

    def __init__(self, inner):
        super().__init__(inner, seed=0)
        self.looks = 0

    def get(self, key, start=None, length=None):
        if key.startswith("locks/"):
            self.looks += 1
        return super().get(key, start, length)


def test_a_snapshot_saved_after_its_index_object_takes_that_look_at_the_lock(new_repo, tmp_path):
    """The lock was read back as it was taken, then looked at before the last pack, before the index object,
    before the snapshot and after it: five round trips in a row where the look before the index object and
    the one after the snapshot tell what the others did (the look before the snapshot came a moment after
    the index object's; the last pack refers to nothing; the lock read back was the one just written)."""
    new_repo().close()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    remote = LockLooks(LocalRemote(str(tmp_path / "repo0")))
    with Repository.open(remote, PASSWORD, ledger=False) as repo:
        repo.backup([str(src)])
    assert remote.looks == 2
