"""Repositories an older chunkvault wrote (tests/data/old-repository-COMMIT.tar.gz, made by
tests/data/make_old_repository.py with that commit's command line) open with this code: nothing in them is
misread or lost, and this code builds on them (README, "Upgrading")."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tarfile
from pathlib import Path

import pytest

from chunkvault import Repository

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("old-repository-*.json"))

_spec = importlib.util.spec_from_file_location("make_old_repository", DATA / "make_old_repository.py")
maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maker)


@pytest.fixture(params=FIXTURES, ids=lambda p: p.stem)
def old(request, tmp_path):
    """(repository path, what its writer recorded), the repository unpacked afresh."""
    expected = json.loads(request.param.read_text())
    with tarfile.open(request.param.with_suffix(".tar.gz")) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp_path, filter="data")
        else:  # Python before 3.11.4: our own archive, its names checked
            assert all(m.name.startswith("repo/") and ".." not in m.name.split("/") for m in tar.getmembers())
            tar.extractall(tmp_path)
    return str(tmp_path / "repo"), expected


def restored_as_recorded(repo, snapshot: dict, target: Path) -> None:
    repo.restore(snapshot["id"], str(target))
    got, want = maker.tree_state(str(target)), dict(snapshot["tree"])
    got[""] = want[""] = None  # the target's own mode, not the snapshot's root
    assert got == want, f"snapshot {snapshot['id'][:8]} (state {snapshot['step']})"


def test_an_old_repository_reads_whole_and_takes_new_differentials(old, tmp_path):
    url, expected = old
    olds, stdin = expected["snapshots"], expected["stdin"]
    assert any(s["delta_blobs"] for s in olds)  # the fixture holds the old writer's deltas
    with Repository.open(url, expected["password"]) as repo:
        report = repo.check(read_data=True)
        assert not report.problems and not report.warnings
        listed = {s.id: s for s in repo.snapshots()}
        assert set(listed) == {s["id"] for s in olds} | {stdin["id"]}  # the forgotten one pruned, no other lost
        assert "base" in listed[olds[0]["id"]].tags and "dump" in listed[stdin["id"]].tags
        for snap in olds:
            assert listed[snap["id"]].parent == snap["parent"]
            restored_as_recorded(repo, snap, tmp_path / f"r{snap['step']}")
        repo.restore(stdin["id"], str(tmp_path / "stdin"))
        assert hashlib.sha256((tmp_path / "stdin" / stdin["name"]).read_bytes()).hexdigest() == stdin["sha256"]

        # a differential on top of the old chain: deltas against the old writer's blobs
        src = tmp_path / "src"
        repo.restore(olds[-1]["id"], str(src))
        maker.step(str(src), 4)
        result = repo.backup(str(src), host=expected["host"], parent=olds[-1]["id"], fixed_chunks=["db/*"],
                             fixed_chunk_size=16384)
        new = result.snapshot
        assert new.kind == "diff" and new.parent == olds[-1]["id"] and new.stats["delta_blobs"] > 0
        mine = {"id": new.id, "step": 4, "tree": maker.tree_state(str(src))}

        # retention removes the chain's start; the differentials kept are rebased, prune keeps what they need
        repo.forget([olds[0]["id"], olds[1]["id"]])
        repo.prune(max_unused=0)
        kept = olds[2:] + [mine]
        assert {s.id for s in repo.snapshots()} == {s["id"] for s in kept} | {stdin["id"]}
        assert not repo.check(read_data=True).problems
        for snap in kept:
            restored_as_recorded(repo, snap, tmp_path / f"after-{snap['step']}")


@pytest.mark.parametrize("which", ["second_password", "secret"])
def test_every_key_the_old_writer_made_opens(old, which):
    url, expected = old
    with Repository.open(url, expected[which]) as repo:
        assert len(repo.snapshots()) == len(expected["snapshots"]) + 1
