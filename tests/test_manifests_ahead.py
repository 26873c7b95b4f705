"""Manifests read ahead (``Repo.manifests_ahead``): the records ``manifest_records`` gives, in any order asked,
their blobs read by several threads at once."""
from __future__ import annotations

import os
import threading
import time

import pytest

from chunkvault.errors import CorruptObject
from chunkvault.remotes.local import LocalRemote
from chunkvault.store.find import chain_order

from conftest import PASSWORD
from faults import FaultyRemote

SMALL_CHUNKS = {"min_size": 1024, "avg_size": 2048, "max_size": 4096}  # manifests of several blobs


class _ConcurrentGets(FaultyRemote):
    """Counts the gets of data packs in flight at once (each held a little, as a remote's round trip)."""

    def __init__(self, inner):
        super().__init__(inner, seed=0)
        self.now = self.most = 0
        self._count = threading.Lock()

    def get(self, key, start=None, length=None):
        if not key.startswith("data/"):
            return super().get(key, start, length)
        with self._count:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.01)
            return super().get(key, start, length)
        finally:
            with self._count:
                self.now -= 1


@pytest.fixture
def chains(new_repo, tmp_path):
    """A repository of two chains (a full and two differentials each) of a tree of 300 files."""
    repo = new_repo(chunker=SMALL_CHUNKS)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"file-{i:04d}-{'x' * 40}").write_bytes(os.urandom(64))
    for i in range(6):
        (src / f"file-{i:04d}-{'x' * 40}").write_bytes(os.urandom(64))
        repo.backup([str(src)], kind="full" if i % 3 == 0 else "diff")
    snaps = repo.snapshots()
    assert all(len(s.manifest) > 1 for s in snaps if s.kind == "full")
    return repo, chain_order(snaps)


def _records(records):
    return [(r.op, r.path, r.entry) for r in records]


def test_every_snapshot_in_order_reads_as_manifest_records_reads_it(chains):
    repo, order = chains
    store = repo.store
    with store.manifests_ahead(order) as ahead:
        got = [_records(ahead.records(s)) for s in order]
    assert got == [_records(store.manifest_records(s)) for s in order]


def test_snapshots_passed_over_half_read_or_asked_again_read_as_they_are(chains):
    repo, order = chains
    store = repo.store
    with store.manifests_ahead(order) as ahead:
        first = ahead.records(order[0])
        next(first)  # half read, then left
        assert _records(ahead.records(order[2])) == _records(store.manifest_records(order[2]))  # order[1] passed over
        assert _records(ahead.records(order[1])) == _records(store.manifest_records(order[1]))  # behind: read anew
        assert _records(ahead.records(order[0])) == _records(store.manifest_records(order[0]))
        assert _records(ahead.records(order[-1])) == _records(store.manifest_records(order[-1]))


def test_records_half_read_then_passed_over_read_on_whole(chains):
    """A snapshot's records left half read while the next one's are read, then read on: the rest was
    dropped with what was read ahead for it, and its manifest said to end inside a record (damaged)."""
    repo, order = chains
    store = repo.store
    with store.manifests_ahead(order) as ahead:
        first = ahead.records(order[0])
        got = [next(first)]
        assert _records(ahead.records(order[1])) == _records(store.manifest_records(order[1]))
        got += first
        assert _records(got) == _records(store.manifest_records(order[0]))
        assert _records(ahead.records(order[2])) == _records(store.manifest_records(order[2]))


def test_a_damaged_manifest_raises_when_its_records_are_read_naming_its_snapshot(chains, tmp_path):
    repo, order = chains
    store = repo.store
    damaged = order[1]
    loc = store.locate(bytes.fromhex(damaged.manifest[0]))
    pack_id = store.pack_ids[loc.pack_no].hex()
    pack = tmp_path / "repo0" / "data" / pack_id[:2] / pack_id
    data = bytearray(pack.read_bytes())
    data[loc.offset + 20] ^= 0xFF
    pack.write_bytes(bytes(data))
    store._cache.items.clear()
    with store.manifests_ahead(order) as ahead:
        assert _records(ahead.records(order[0])) == _records(store.manifest_records(order[0]))
        with pytest.raises(CorruptObject, match=f"manifest of snapshot {damaged.id}"):
            list(ahead.records(damaged))


def test_the_blobs_are_read_several_at_once(chains, tmp_path):
    """Read one after another, each manifest blob waited out a round trip of its own."""
    from chunkvault import Repository

    repo, order = chains
    remote = _ConcurrentGets(LocalRemote(str(tmp_path / "repo0")))
    with Repository.open(remote, PASSWORD, ledger=False) as again:
        store = again.store
        snaps = chain_order(again.snapshots())
        with store.manifests_ahead(snaps) as ahead:
            for s in snaps:
                list(ahead.records(s))
    assert remote.most > 1
